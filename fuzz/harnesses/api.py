"""The per-VM API's request parsing, from raw bytes on the socket to the instance's answer: the
HTTP request line and headers (http.server), the route, Content-Length, the JSON body and every
resource's field checks (api/server.py, api/schema.py, the rate limiters...). A few requests per
input go to one fresh instance, so later ones meet what earlier ones configured. Every answer
must be a well-formed HTTP response other than a 500 (which means a pyvmm bug). Nothing is
started, loaded, migrated or written: the operations that would are stubbed out after their
body is checked."""

from __future__ import annotations

import io
import os
import re
import tempfile

from pyvmm.api import instance as instance_module
from pyvmm.api.instance import VmInstance
from pyvmm.api.server import _Handler, _InFlight
from pyvmm.errors import UserError


class _NoSideEffects(VmInstance):
    def start(self) -> None:
        raise UserError("fuzzing: no VM is started")

    def load_snapshot(self, body) -> None:
        from pyvmm.api.schema import SNAPSHOT_LOAD, check_body

        check_body(body, SNAPSHOT_LOAD)
        raise UserError("fuzzing: no snapshot is loaded")

    def put_metrics(self, body) -> None:
        from pyvmm.api.schema import METRICS, check_body

        check_body(body, METRICS)


class _Socket:
    """What BaseHTTPRequestHandler needs of a connection: the request in, the answer out."""

    def __init__(self, request: bytes) -> None:
        self.request, self.sent = request, bytearray()

    def makefile(self, mode: str, buffering: int = -1):
        return io.BytesIO(self.request)

    def sendall(self, data: bytes) -> None:
        self.sent += data


class _Server:
    pass


_STATUS = re.compile(rb"^HTTP/1\.[01] (\d{3}) ")
_scratch = tempfile.mkdtemp(prefix="pyvmm-fuzz-api-")


def one_input(data: bytes) -> None:
    handler = type("Handler", (_Handler,), {"instance": _NoSideEffects("fuzz"), "in_flight": _InFlight()})
    cwd, add_log_file = os.getcwd(), instance_module._add_log_file
    os.chdir(_scratch)   # relative paths in bodies land here
    instance_module._add_log_file = lambda logger: None   # no log file opened wherever a body says
    try:
        _requests(handler, data)
    finally:
        os.chdir(cwd)
        instance_module._add_log_file = add_log_file


def _requests(handler, data: bytes) -> None:
    for request in data.split(b"\n\n\n")[:4]:
        connection = _Socket(request.replace(b"\n", b"\r\n"))
        handler(connection, "unix", _Server())
        answer = bytes(connection.sent)
        if not answer:
            continue          # nothing at all arrived (an empty request): http.server answers nothing
        match = _STATUS.match(answer)
        assert match, answer[:200]
        assert match.group(1) != b"500", answer[:400]
