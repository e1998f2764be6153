"""The per-VM HTTP/1.1 API on a Unix socket: Firecracker's resources plus pyvmm's.

Stdlib only (http.server on a threading UnixStreamServer), imported when a VM is managed,
never by `pyvmm run`. Every request is routed through ROUTES to a VmInstance method;
answers follow Firecracker: 200 with JSON for reads, 204 for a successful change, 400 with
{"fault_message": ...} for bad input or an operation the state forbids, 404 for an unknown
path, 405 (with Allow) for a known path and a wrong method, 500 only for pyvmm's own bugs
(logged with the traceback, answered with one line). The socket is created mode 0600.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import socketserver
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

from .. import __version__
from ..errors import ConfigError, UserError, user_error_message
from . import agent, balloon, hotplug, memory
from .instance import VmInstance

log = logging.getLogger(__name__)

MAX_BODY = 64 << 10
MAX_AGENT_BODY = 16 << 20  # a command's stdin or a file's contents, base64: larger files go by `pyvmm cp`


class HttpError(UserError):
    """A request the server answers with `status` before it reaches the VM (404, 405, a bad body)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.headers = status, headers or {}


@dataclass(frozen=True)
class Route:
    method: str
    path: str                                          # '/drives/{drive_id}'
    call: Callable[[VmInstance, dict[str, str], Any], Any]
    body: bool = False                                 # the request carries a JSON body
    max_body: int = MAX_BODY                           # its largest accepted length

    @property
    def pattern(self) -> re.Pattern[str]:
        return re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", self.path) + "$")


def _console(instance: VmInstance, query: dict[str, str], _body: Any) -> bytes:
    tail = query.get("tail")
    if tail is not None and not (tail.isascii() and tail.isdigit()):  # int() refuses "³"
        raise ConfigError(f"must be a number of bytes (got {tail!r:.40})", "tail")
    return instance.console.history(int(tail) if tail is not None else None)


def _openapi(_instance: VmInstance, _params: dict[str, str], _body: Any) -> dict[str, Any]:
    from .openapi import document

    return document()


ROUTES: tuple[Route, ...] = (
    Route("GET", "/", lambda i, p, b: i.info()),
    Route("GET", "/version", lambda i, p, b: i.version()),
    Route("GET", "/machine-config", lambda i, p, b: i.machine_config()),
    Route("PUT", "/machine-config", lambda i, p, b: i.put_machine_config(b), body=True),
    Route("PATCH", "/machine-config", lambda i, p, b: i.put_machine_config(b, partial=True), body=True),
    Route("PUT", "/boot-source", lambda i, p, b: i.put_boot_source(b), body=True),
    Route("PUT", "/drives/{drive_id}", lambda i, p, b: i.put_drive(p["drive_id"], b), body=True),
    Route("PATCH", "/drives/{drive_id}", lambda i, p, b: i.patch_drive(p["drive_id"], b), body=True),
    Route("PUT", "/network-interfaces/{iface_id}", lambda i, p, b: i.put_interface(p["iface_id"], b), body=True),
    Route("PATCH", "/network-interfaces/{iface_id}", lambda i, p, b: i.patch_interface(p["iface_id"], b), body=True),
    Route("PUT", "/pyvmm/vcpus", lambda i, p, b: hotplug.put_vcpus(i, b), body=True),
    Route("GET", "/pyvmm/vcpus", lambda i, p, b: hotplug.get_vcpus(i)),
    Route("DELETE", "/drives/{drive_id}", lambda i, p, b: hotplug.delete_drive(i, p.pop("drive_id"), p)),
    Route("DELETE", "/vsock", lambda i, p, b: hotplug.delete_single(i, "vsock", p)),
    Route("DELETE", "/entropy", lambda i, p, b: hotplug.delete_single(i, "entropy", p)),
    Route("DELETE", "/network-interfaces/{iface_id}", lambda i, p, b: hotplug.delete_interface(i, p.pop("iface_id"), p)),
    Route("PUT", "/vsock", lambda i, p, b: i.put_vsock(b), body=True),
    Route("PUT", "/entropy", lambda i, p, b: i.put_entropy(b), body=True),
    Route("PUT", "/balloon", lambda i, p, b: balloon.put(i, b), body=True),
    Route("PATCH", "/balloon", lambda i, p, b: balloon.patch(i, b), body=True),
    Route("GET", "/balloon", lambda i, p, b: balloon.get(i)),
    Route("GET", "/balloon/statistics", lambda i, p, b: balloon.statistics(i)),
    Route("PATCH", "/balloon/statistics", lambda i, p, b: balloon.patch_statistics(i, b), body=True),
    Route("PUT", "/logger", lambda i, p, b: i.put_logger(b), body=True),
    Route("PUT", "/metrics", lambda i, p, b: i.put_metrics(b), body=True),
    Route("PUT", "/actions", lambda i, p, b: i.action(b), body=True),
    Route("PATCH", "/vm", lambda i, p, b: i.set_vm_state(b), body=True),
    Route("GET", "/vm/config", lambda i, p, b: i.vm_config()),
    Route("PUT", "/snapshot/create", lambda i, p, b: i.create_snapshot(b), body=True),
    Route("PUT", "/snapshot/load", lambda i, p, b: i.load_snapshot(b), body=True),
    Route("GET", "/openapi.json", _openapi),
    Route("GET", "/pyvmm/status", lambda i, p, b: i.status()),
    Route("GET", "/pyvmm/devices", lambda i, p, b: i.devices()),
    Route("GET", "/pyvmm/stats", lambda i, p, b: i.stats()),
    Route("GET", "/pyvmm/console", _console),
    Route("PUT", "/pyvmm/actions", lambda i, p, b: i.pyvmm_action(b), body=True),
    Route("PUT", "/pyvmm/migration", lambda i, p, b: i.migrate(b), body=True),
    Route("GET", "/pyvmm/migration", lambda i, p, b: i.migration_progress()),
    Route("PUT", "/pyvmm/migration/cancel", lambda i, p, b: i.cancel_migration()),
    Route("PUT", "/pyvmm/agent/exec", lambda i, p, b: agent.exec_command(i, b), body=True, max_body=MAX_AGENT_BODY),
    Route("GET", "/pyvmm/agent/files", lambda i, p, b: agent.read_file(i, p)),
    Route("PUT", "/pyvmm/agent/files", lambda i, p, b: agent.write_file(i, b), body=True, max_body=MAX_AGENT_BODY),
    Route("GET", "/pyvmm/memory/translate", lambda i, p, b: memory.translate(i, p)),
    Route("GET", "/pyvmm/memory/read", lambda i, p, b: memory.read(i, p)),
    Route("GET", "/pyvmm/memory/virtio-mem", lambda i, p, b: memory.virtio_mem_status(i)),
    Route("PUT", "/pyvmm/memory/virtio-mem", lambda i, p, b: memory.resize_virtio_mem(i, b), body=True),
)


def resolve(method: str, path: str) -> tuple[Route, dict[str, str]]:
    """The route for `method` on `path` and its path parameters; HttpError 404/405 if none."""
    allowed = []
    for route in ROUTES:
        match = route.pattern.match(path)
        if match:
            if route.method == method:
                return route, match.groupdict()
            allowed.append(route.method)
    if allowed:
        raise HttpError(405, f"{method} is not allowed on {path} (allowed: {', '.join(allowed)})",
                        {"Allow": ", ".join(allowed)})
    raise HttpError(404, f"no resource at {path}")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = f"pyvmm/{__version__}"
    instance: VmInstance  # set on the subclass the server makes
    in_flight: "_InFlight"

    def parse_request(self) -> bool:
        if not super().parse_request():
            return False
        if self.request_version == "HTTP/0.9":  # "GET /path": its answer would have no status line
            self.send_error(400, "HTTP/0.9 requests are not supported: send HTTP/1.1 (METHOD PATH HTTP/1.1)")
            return False
        return True

    def do_GET(self) -> None:
        self._handle()

    do_PUT = do_PATCH = do_POST = do_DELETE = do_HEAD = do_OPTIONS = do_GET

    def _handle(self) -> None:
        with self.in_flight:
            self._answer()

    def _answer(self) -> None:
        try:
            url = urlsplit(self.path)
            route, params = resolve(self.command, url.path)
            body = self._read_body(route.body, route.max_body)
            if not route.body:
                params.update({k: v[-1] for k, v in parse_qs(url.query).items()})
            result = route.call(self.instance, params, body)
        except HttpError as exc:
            self.close_connection = True  # a body may be left unread: the connection cannot go on
            self._send_fault(exc.status, str(exc), exc.headers)
        except ConfigError as exc:
            self._send_fault(400, str(exc))
        except (UserError, OSError) as exc:
            self._send_fault(400, user_error_message(exc))
        except Exception as exc:  # pyvmm's own bug: logged in full, one line to the client
            log.exception("API %s %s failed", self.command, self.path)
            self._send_fault(500, f"internal error: {type(exc).__name__}: {exc}")
        else:
            if result is None:
                self._send(204, b"", None)
            elif isinstance(result, bytes):
                self._send(200, result, "application/octet-stream")
            else:
                self._send(200, json.dumps(result).encode(), "application/json")

    def _read_body(self, wanted: bool, limit: int = MAX_BODY) -> Any:
        if self.headers.get("Transfer-Encoding"):
            raise HttpError(400, "chunked request bodies are not supported: send Content-Length")
        length_text = self.headers.get("Content-Length", "0")
        if not (length_text.isascii() and length_text.isdigit()):  # int() refuses "³"
            raise HttpError(400, f"bad Content-Length {length_text!r:.40}")
        length = int(length_text)
        if length > limit:
            self.close_connection = True  # the unread body must not be taken for the next request
            raise HttpError(400, f"the body is {length} bytes; at most {limit} are accepted here")
        raw = self.rfile.read(length) if length else b""
        if not wanted:
            return None
        if not raw.strip():
            raise HttpError(400, "the request needs a JSON body")
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, ValueError) as exc:
            raise HttpError(400, f"the body is not valid JSON: {exc}") from None

    def _send_fault(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps({"fault_message": message}).encode(), "application/json", headers)

    def _send(self, status: int, data: bytes, content_type: str | None,
              headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (a malformed request line, a header too long) as JSON."""
        self.close_connection = True
        if self.request_version == "HTTP/0.9":  # an unparsable request line: answer in HTTP/1.1 anyway
            self.request_version = "HTTP/1.1"
        if code == 501:  # a method no route has (TRACE, CONNECT, made-up ones): 405 or 404, as for any other
            try:
                resolve(self.command, urlsplit(self.path).path)
            except HttpError as exc:
                self._send_fault(exc.status, str(exc), exc.headers)
                return
        self._send_fault(code, message or explain or "bad request")

    def address_string(self) -> str:
        return "unix"  # a Unix socket's peer has no address; the default indexes into ''

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("API: " + format, *args)


class _InFlight:
    """Counts requests being answered, so that closing the server lets them finish: a Stop
    ends the VM and so the process, and its 204 must still reach the client."""

    def __init__(self) -> None:
        self._count = 0
        self._idle = threading.Condition()

    def __enter__(self) -> None:
        with self._idle:
            self._count += 1

    def __exit__(self, *exc: object) -> None:
        with self._idle:
            self._count -= 1
            self._idle.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        with self._idle:
            return self._idle.wait_for(lambda: self._count == 0, timeout)


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 64

    def handle_error(self, request, client_address) -> None:
        # a client that went away mid-answer (BrokenPipe): pyvmm's log, not a traceback on stderr
        log.debug("API connection failed", exc_info=True)


class ApiServer:
    """Serves `instance` on the Unix socket `path` (created mode 0600) from a thread."""

    def __init__(self, instance: VmInstance, path: str | os.PathLike) -> None:
        self._in_flight = _InFlight()
        handler = type("Handler", (_Handler,), {"instance": instance, "in_flight": self._in_flight})
        old_umask = os.umask(0o177)
        try:
            self._server = _UnixServer(str(path), handler)
        finally:
            os.umask(old_umask)
        self.path = str(path)
        self._closing = False
        self._thread = threading.Thread(target=self._serve, name="api-server", daemon=True)

    def start(self) -> "ApiServer":
        self._thread.start()
        return self

    def _serve(self) -> None:
        # handle_request() blocks until a connection comes (no polling); close() makes one
        while not self._closing:
            self._server.handle_request()

    def close(self, grace: float = 10.0) -> None:
        """Stop accepting connections; answers being written get `grace` seconds to finish."""
        self._closing = True
        if self._thread.is_alive():
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as wake:
                    wake.connect(self.path)
            except OSError:
                pass
            self._thread.join(5)
        self._in_flight.wait_idle(grace)
        self._server.server_close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
