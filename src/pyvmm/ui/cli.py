"""`pyvmm ui`: the web console's command line. It serves until Ctrl-C or SIGTERM; stopping it
detaches its console viewers and touches no VM."""

from __future__ import annotations

import argparse
import signal
import sys

from ..errors import UserError

COMMANDS = ("ui",)


def register(sub, common: argparse.ArgumentParser) -> None:
    ui = sub.add_parser("ui", parents=[common], help="a web console for your VMs (serves a local page; prints its URL)",
                        description="Serve the web console: VM list with live graphs, each VM's charts, devices, "
                                    "definition and snapshots, its serial console, and a form to create VMs. "
                                    "The printed URL carries the access token every request needs.")
    ui.add_argument("--listen", metavar="ADDRESS[:PORT]", default="127.0.0.1",
                    help="address to listen on (default 127.0.0.1, a free port); other than loopback is "
                         "reachable from the network: plain HTTP, guarded only by the token")
    ui.add_argument("--port", type=int, metavar="N", help="port (default: a free one)")


def parse_listen(text: str, port: int | None) -> tuple[str, int]:
    address, given = text, None
    if text.startswith("["):                       # [::1]:8080
        address, _, rest = text[1:].partition("]")
        given = rest[1:] if rest.startswith(":") else None
    elif text.count(":") == 1:                     # 0.0.0.0:8080
        address, given = text.split(":")
    if given is not None:
        if not (given.isascii() and given.isdigit()):
            raise UserError(f"--listen: {given!r} is not a port number")
        if port is not None and int(given) != port:
            raise UserError("--listen names a port and --port another")
        port = int(given)
    if port is not None and not 0 <= port <= 65535:
        raise UserError(f"--port: {port} is not a port number (0-65535)")
    if not address:
        raise UserError("--listen needs an address")
    return address, port or 0


def run(args) -> int:
    from ..manage.client import connect
    from .server import UiServer, is_loopback

    address = parse_listen(args.listen, args.port)
    try:
        server = UiServer(connect(), address)
    except OSError as exc:
        raise UserError(f"cannot listen on {args.listen}: {exc.strerror or exc}") from None
    if not is_loopback(address[0]):
        print(f"pyvmm ui: warning: listening on {address[0]}, not loopback: whoever reaches it with the token "
              "controls your VMs, and plain HTTP carries the token unencrypted", file=sys.stderr)
    print(f"pyvmm ui: open {server.url()}", flush=True)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def _interrupt(_signum, _frame) -> None:
    raise KeyboardInterrupt  # SIGTERM ends serve_forever like Ctrl-C
