"""`pyvmm ui`'s HTTP and WebSocket server (the standard library's threading HTTP server).

Access: every request needs the token printed at start. The URL the server prints carries it
as ?token=...; that first request sets an HttpOnly, SameSite=Strict cookie and is redirected
to the same page without the token. Later requests are let in by the cookie, an
`X-Pyvmm-Token` header or `Authorization: Bearer`; requests that change something (POST,
DELETE) need the header, which a page of another origin cannot send without a CORS
preflight, and this server answers none: it sends no Access-Control-* header at all. No
token: 401; a wrong one: 403. The console's WebSocket needs the token too, and an Origin
of this server. Listening on loopback, the Host header must name loopback (DNS rebinding).
Pages carry a Content-Security-Policy that lets them load and connect to this server only.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import mimetypes
import re
import secrets
import socket
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

from ..errors import PyvmmError, UserError
from ..manage.client import ApiError, Host
from ..manage.records import UnknownVm, VmExists
from . import handlers
from .console import bridge_console
from .forms import FormError
from .websocket import WebSocket, accept_key, valid_client_key

log = logging.getLogger(__name__)

PAGES = {"/": "list.html", "/create": "create.html"}
VM_PAGE = re.compile(r"^/vm/(?P<name>[^/]+)(?P<console>/console)?$")
MAX_BODY = 64 << 10


class HttpError(PyvmmError):
    """A request refused with `status` (internal to the server: it becomes the answer)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


class UiServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, host: Host, address: tuple[str, int] = ("127.0.0.1", 0), *, token: str | None = None,
                 snapshots: Path | None = None) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, UiRequestHandler)
        self.vms = host
        self.token = token or secrets.token_urlsafe(24)
        self.snapshots = snapshots or handlers.snapshot_root()
        self.loopback = is_loopback(address[0])
        self.cookie = f"pyvmm_ui_{self.server_address[1]}"
        self.static = resources.files("pyvmm.ui") / "static"
        self._thread: threading.Thread | None = None

    def handle_error(self, request, client_address) -> None:
        # a browser that dropped its connection (a reset, a closed tab): the log, not a traceback
        # on stderr, as the per-VM API does; anything else keeps socketserver's report
        if isinstance(sys.exc_info()[1], ConnectionError):
            log.debug("UI connection from %s failed", client_address, exc_info=True)
            return
        super().handle_error(request, client_address)

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def url(self, host: str | None = None) -> str:
        name = host or str(self.server_address[0])
        if ":" in name:
            name = f"[{name}]"
        return f"http://{name}:{self.port}/?token={self.token}"

    def start(self) -> "UiServer":
        """Serve on a thread of its own (tests); `serve_forever` in the foreground otherwise."""
        self._thread = threading.Thread(target=self.serve_forever, args=(0.1,), name="pyvmm-ui", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving. Consoles attached through it detach; no VM is touched."""
        self.shutdown()
        self.server_close()
        if self._thread is not None:
            self._thread.join(10)


class UiRequestHandler(BaseHTTPRequestHandler):
    server: UiServer
    protocol_version = "HTTP/1.1"
    server_version = "pyvmm-ui"

    def do_GET(self) -> None:
        self._handle()

    do_POST = do_DELETE = do_PUT = do_PATCH = do_OPTIONS = do_HEAD = do_GET

    # --- access ------------------------------------------------------------------------------

    def _presented_tokens(self) -> dict[str, str]:
        found = {}
        header = self.headers.get("X-Pyvmm-Token")
        if header:
            found["header"] = header
        authorization = self.headers.get("Authorization", "")
        if authorization.startswith("Bearer "):
            found["header"] = authorization[7:].strip()
        query = parse_qs(urlsplit(self.path).query).get("token")
        if query:
            found["query"] = query[0]
        for part in self.headers.get("Cookie", "").split(";"):
            key, _, value = part.strip().partition("=")
            if key == self.server.cookie and value:
                found["cookie"] = value
        return found

    def _authenticate(self) -> str:
        """How the request proved itself (header, query or cookie); HttpError otherwise."""
        if self.server.loopback:
            host = (self.headers.get("Host") or "").rsplit(":", 1)[0]
            if not is_loopback(host):
                raise HttpError(403, f"this server answers to loopback addresses only (Host: {host[:60]!r})")
        tokens = self._presented_tokens()
        if not tokens:
            raise HttpError(401, "an access token is needed: open the URL `pyvmm ui` printed",
                            {"WWW-Authenticate": 'Bearer realm="pyvmm ui"'})
        good = [how for how, value in tokens.items()
                if hmac.compare_digest(value.encode(), self.server.token.encode())]
        if len(good) != len(tokens):
            raise HttpError(403, "wrong access token")
        return "header" if "header" in good else good[0]

    # --- dispatch ----------------------------------------------------------------------------

    def _handle(self) -> None:
        try:
            how = self._authenticate()
            self._route(how)
        except HttpError as exc:
            self._send_json(exc.status, {"error": exc.message}, exc.headers)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _route(self, how: str) -> None:
        parts = urlsplit(self.path)
        path, method = parts.path, self.command
        if method == "GET" and "query" in self._presented_tokens() and not path.startswith("/api/"):
            # the printed URL: keep the token in a cookie, out of the address bar and history
            cookie = f"{self.server.cookie}={self.server.token}; HttpOnly; SameSite=Strict; Path=/"
            return self._send(303, b"", None, {"Location": path, "Set-Cookie": cookie})
        if method not in ("GET", "HEAD") and how != "header":
            raise HttpError(403, "requests that change something need the X-Pyvmm-Token header")
        if path.startswith("/api/"):
            return self._api(method, path[len("/api"):], parse_qs(parts.query))
        if method not in ("GET", "HEAD"):
            raise HttpError(405, f"{method} is not allowed here", {"Allow": "GET, HEAD"})
        if path.startswith("/static/"):
            return self._static(path[len("/static/"):])
        page = PAGES.get(path)
        match = VM_PAGE.match(path)
        if match:
            page = "console.html" if match.group("console") else "vm.html"
        if page is None:
            raise HttpError(404, f"no page {path[:80]!r}")
        self._page(page)

    def _page(self, page: str) -> None:
        text = (self.server.static / page).read_text().replace("{{TOKEN}}", self.server.token)
        host = re.sub(r"[^A-Za-z0-9.:\[\]-]", "", self.headers.get("Host", ""))  # nothing but a host[:port]
        policy = ("default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
                  f"connect-src 'self' ws://{host}; font-src 'self'; form-action 'self'; base-uri 'none'; "
                  "frame-ancestors 'none'")
        self._send(200, text.encode(), "text/html; charset=utf-8", {"Content-Security-Policy": policy})

    def _static(self, name: str) -> None:
        if not re.fullmatch(r"[a-z0-9_-]+(\.[a-z0-9]+)+", name):
            raise HttpError(404, "no such file")
        resource = self.server.static / name
        if not resource.is_file():
            raise HttpError(404, "no such file")
        kind = mimetypes.guess_type(name)[0] or "application/octet-stream"
        if kind.startswith("text/") or kind.endswith("javascript"):
            kind += "; charset=utf-8"
        self._send(200, resource.read_bytes(), kind)

    def _api(self, method: str, path: str, query: dict[str, list[str]]) -> None:
        vms, snapshots = self.server.vms, self.server.snapshots
        words = [word for word in path.split("/") if word]
        routes: list[tuple[str, str, Callable[..., Any]]] = [
            ("GET", "vms", lambda: handlers.list_vms(vms)),
            ("POST", "vms", lambda: handlers.create_vm(vms, self._body())),
            ("GET", "vms/*", lambda: handlers.vm_detail(vms, words[1], snapshots)),
            ("GET", "vms/*/console", lambda: self._console(words[1], query)),
            ("GET", "vms/*/history", lambda: handlers.console_history(vms, words[1])),
            ("POST", "vms/*/actions/*", lambda: handlers.vm_action(vms, words[1], words[3], self._body())),
            ("POST", "vms/*/control", lambda: handlers.vm_control(vms, words[1], self._body())),
            ("GET", "vms/*/snapshots", lambda: handlers.list_snapshots(snapshots, words[1])),
            ("POST", "vms/*/snapshots", lambda: handlers.take_snapshot(vms, snapshots, words[1],
                                                                       self._body().get("label", ""))),
            ("POST", "vms/*/snapshots/*/restore", lambda: handlers.restore_snapshot(vms, snapshots, words[1],
                                                                                    words[3])),
            ("DELETE", "vms/*/snapshots/*", lambda: handlers.delete_snapshot(snapshots, words[1], words[3])),
        ]
        shape = [word if index % 2 == 0 else "*" for index, word in enumerate(words)]
        for known in (r for r in routes if r[1].split("/") == shape):
            if known[0] != method and not (method == "HEAD" and known[0] == "GET"):
                continue
            try:
                result = known[2]()
            except FormError as exc:
                return self._send_json(400, {"error": exc.message, "field": exc.field})
            except UnknownVm as exc:
                return self._send_json(404, {"error": str(exc)})
            except handlers.Unreachable as exc:
                return self._send_json(403, {"error": str(exc)})
            except (VmExists, handlers.Conflict) as exc:
                return self._send_json(409, {"error": str(exc)})
            except ApiError as exc:
                return self._send_json(exc.status if exc.status < 500 else 502, {"error": exc.fault_message})
            except UserError as exc:
                return self._send_json(400, {"error": str(exc)})
            except OSError as exc:
                return self._send_json(502, {"error": f"{exc.strerror or exc}"})
            if isinstance(result, bytes):
                self._send(200, result, "application/octet-stream")
            elif result is not _UPGRADED:
                self._send_json(200, result)
            return
        allowed = sorted({r[0] for r in routes if r[1].split("/") == shape})
        if allowed:
            raise HttpError(405, f"{method} is not allowed here", {"Allow": ", ".join(allowed)})
        raise HttpError(404, f"no resource {path[:80]!r}")

    def _body(self) -> dict[str, Any]:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            raise HttpError(413, "request body too large")
        data = self.rfile.read(length) if length else b"{}"
        try:
            body = json.loads(data)
        except ValueError:
            raise HttpError(400, "the body is not JSON") from None
        if not isinstance(body, dict):
            raise HttpError(400, "the body must be a JSON object")
        return body

    # --- the console's WebSocket -------------------------------------------------------------

    def _console(self, name: str, query: dict[str, list[str]]) -> object:
        if self.headers.get("Upgrade", "").lower() != "websocket":
            raise HttpError(426, "the console is a WebSocket", {"Upgrade": "websocket"})
        origin = self.headers.get("Origin")
        if origin is not None and urlsplit(origin).netloc != self.headers.get("Host"):
            raise HttpError(403, "the console is for this server's own pages (Origin differs)")
        key = self.headers.get("Sec-WebSocket-Key")
        if not valid_client_key(key) or self.headers.get("Sec-WebSocket-Version") != "13":
            raise HttpError(400, "not a WebSocket version 13 handshake")
        replay = query.get("replay", ["65536"])[0]
        if not (replay.isascii() and replay.isdigit()):
            raise HttpError(400, "replay must be a number of bytes")
        vm = self.server.vms.vm(name)
        handlers.require_reachable(vm)
        console, history = vm.attach_console(int(replay))   # refused before the upgrade: a plain error
        assert key is not None
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept_key(key))
        self.end_headers()
        self.close_connection = True
        bridge_console(WebSocket(self.connection, self.rfile), console, history)
        return _UPGRADED

    # --- answers -----------------------------------------------------------------------------

    def _send_json(self, status: int, value: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(value).encode(), "application/json", headers)

    def _send(self, status: int, data: bytes, content_type: str | None, headers: dict[str, str] | None = None) -> None:
        self.send_response(status, HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else None)
        if content_type:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("X-Frame-Options", "DENY")
        self.send_header("Referrer-Policy", "no-referrer")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if status >= 400:  # a refused request's body may be unread: no second request on this connection
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)


_UPGRADED = object()
