"""Schema-driven fuzzing of the per-VM API: schemathesis generates requests from the OpenAPI
document the VM serves (valid ones and, in its coverage phase, invalid ones) and sends them to a
real VM process's Unix socket. Any 5xx fails the test: each one is a pyvmm bug; so does an
answer that does not match the document's response schema (stats, status, errors...).

The target is `pyvmm firecracker --api-sock`, a VM process that serves the API before the VM
starts, with a tiny guest (the echo guest: a COM1 poll loop) already set as its boot source, so
a generated InstanceStart boots in milliseconds and later requests meet a running, paused or
stopped VM. When a generated Stop ends the VM, its process ends (as Firecracker's does) and the
next request goes to a fresh one. Host paths in generated bodies are kept inside the test's
directory (the VM process runs as root here: a generated log_path must not append to /etc/...).
Bounded: a fixed number of examples per operation, about a minute on our 2 cores.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from requests.adapters import HTTPAdapter
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance
from urllib3.connection import HTTPConnection
from urllib3.connectionpool import HTTPConnectionPool

from pyvmm.api.openapi import document
from pyvmm.guests import build

EXAMPLES_PER_OPERATION = 150
PATH_FIELDS = ("kernel_image_path", "initrd_path", "path_on_host", "socket", "uds_path", "log_path", "metrics_path")

schema = schemathesis.openapi.from_dict(document())


class _UnixHTTPConnection(HTTPConnection):
    def __init__(self, socket_path: str, **kw) -> None:
        super().__init__("localhost", **kw)
        self.socket_path = socket_path

    def _new_conn(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(60)
        sock.connect(self.socket_path)
        return sock


class _UnixPool(HTTPConnectionPool):
    ConnectionCls = _UnixHTTPConnection

    def __init__(self, socket_path: str) -> None:
        super().__init__("localhost")
        self.socket_path = socket_path

    def _new_conn(self) -> _UnixHTTPConnection:
        return _UnixHTTPConnection(self.socket_path, timeout=self.timeout.connect_timeout)


class UnixAdapter(HTTPAdapter):
    """requests over one Unix socket, whatever host the URL names."""

    def __init__(self, socket_path: str) -> None:
        super().__init__()
        self.socket_path = socket_path

    def get_connection_with_tls_context(self, request, verify, proxies=None, cert=None) -> _UnixPool:
        return _UnixPool(self.socket_path)


class Target:
    """A `pyvmm firecracker` process with the echo guest as its boot source; restarted when a
    request ended its VM (and so the process)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.socket_path = str(directory / "api.sock")
        self.kernel = str(build("echo"))
        self.process: subprocess.Popen | None = None
        self.session = requests.Session()
        self.session.mount("http://", UnixAdapter(self.socket_path))
        self.starts = 0

    def ensure(self) -> None:
        if self.process is not None and self.process.poll() is None:
            try:
                status = self.session.get("http://localhost/pyvmm/status", timeout=60)
            except requests.ConnectionError:  # going away as we asked: its VM has just ended
                status = None
            if status is not None:
                assert status.status_code == 200, status.text
                if status.json()["state"] != "Stopped":
                    return
            self.process.wait(60)  # its VM has ended: so does the process, as Firecracker's does
        if self.process is not None:
            assert self.process.returncode in (0, 1), self._log()  # 1: the guest's own error outcome
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pyvmm.cli", "firecracker", "--api-sock", self.socket_path, "--id", "fuzz"],
            cwd=self.directory, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=open(self.directory / "vmm.log", "ab"))
        with open(self.directory / "vmm.log", "a") as log:
            log.write(f"--- VM process {self.process.pid} started\n")
        self.starts += 1
        deadline = time.monotonic() + 60
        while not os.path.exists(self.socket_path):
            assert self.process.poll() is None and time.monotonic() < deadline, self._log()
            time.sleep(0.05)
        answer = self.session.put("http://localhost/boot-source", json={"kernel_image_path": self.kernel})
        assert answer.status_code == 204, answer.text

    def contain_paths(self, body) -> None:
        """Host paths in a generated body, put inside the test's directory (same text, '/' escaped)."""
        if isinstance(body, dict):
            for key, value in body.items():
                if key in PATH_FIELDS and isinstance(value, str) and value != self.kernel:
                    body[key] = str(self.directory / "paths" / (value.replace("/", "%") or "%"))
                else:
                    self.contain_paths(value)
        elif isinstance(body, list):
            for item in body:
                self.contain_paths(item)

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def _log(self) -> str:
        return (self.directory / "vmm.log").read_text(errors="replace")[-3000:]

    def log_tail(self) -> str:
        lines = (self.directory / "vmm.log").read_text(errors="replace").splitlines()
        return "\n".join(line for line in lines if not line.startswith((" ", "Traceback", "BrokenPipe")))[-4000:]


def bound_agent_waits(case) -> None:
    """The echo guest has no agent: a well-formed agent request waits connect_timeout (10 s by
    default) before its 400. One second keeps the run short; every other field stays generated."""
    if not case.path.startswith("/pyvmm/agent/"):
        return
    if isinstance(case.body, dict):
        case.body["connect_timeout"] = 1
        if isinstance(case.body.get("timeout"), int):
            case.body["timeout"] = 1
    elif case.method == "GET" and isinstance(case.query, dict):
        case.query["connect_timeout"] = 1


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    directory = tmp_path_factory.mktemp("fuzz")
    (directory / "paths").mkdir()
    target = Target(directory)
    yield target
    target.close()
    log = (directory / "vmm.log").read_text(errors="replace")
    assert "] ERROR " not in log and "internal error" not in log, log[-3000:]


@schema.parametrize()
@settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_no_request_makes_the_api_fail(case, target):
    target.ensure()
    if isinstance(case.body, (dict, list)):
        target.contain_paths(case.body)
    bound_agent_waits(case)
    try:
        case.call_and_validate(base_url="http://localhost", session=target.session, timeout=60,
                               checks=[not_a_server_error, response_schema_conformance])
    except requests.ConnectionError as exc:
        # Only acceptable when the VM had just ended by itself (a generated configuration the
        # guest cannot run: its outcome ends the process, as Firecracker's does) and the
        # process was going away as the request came: it then ends cleanly, with 0 or 1.
        try:
            code = target.process.wait(30)
        except subprocess.TimeoutExpired:
            code = None
        if code not in (0, 1):
            raise AssertionError(f"{exc} (the VM process: {code}); its log ends:\n{target.log_tail()}") from None
