"""`pyvmm ui`'s HTTP side without a VM: the token on every request and on the WebSocket, no
CORS, the Host check, the create form's field errors, and the console WebSocket bridged to
a stand-in console socket that speaks the VM console's attach protocol."""

from __future__ import annotations

import base64
import http.client
import json
import os
import socket
import struct
import threading

import pytest

from pyvmm.manage.client import connect
from pyvmm.manage.records import RunDir
from pyvmm.ui.server import UiServer
from pyvmm.ui.websocket import accept_key


@pytest.fixture
def ui(tmp_path):
    host = connect(tmp_path / "cfg", tmp_path / "run")
    server = UiServer(host, ("127.0.0.1", 0), snapshots=tmp_path / "snapshots").start()
    yield server
    server.close()


def request(server, method, path, *, headers=None, body=None):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        connection.request(method, path, body=None if body is None else json.dumps(body),
                           headers={"Host": f"127.0.0.1:{server.port}", **(headers or {})})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def good(server):
    return {"X-Pyvmm-Token": server.token}


def test_no_token_is_401_and_a_wrong_one_403_on_pages_api_and_static(ui):
    for path in ("/", "/create", "/vm/x", "/api/vms", "/static/common.js", "/static/xterm.js", "/nowhere"):
        status, headers, _ = request(ui, "GET", path)
        assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer"), path
        assert request(ui, "GET", path, headers={"X-Pyvmm-Token": "x" + ui.token})[0] == 403, path
        assert request(ui, "GET", path + "?token=wrong")[0] == 403, path
        cookie = {"Cookie": f"{ui.cookie}=nope"}
        assert request(ui, "GET", path, headers=cookie)[0] == 403, path
    assert request(ui, "POST", "/api/vms", body={"name": "x"})[0] == 401
    # one good and one bad token together: refused
    assert request(ui, "GET", f"/api/vms?token=bad", headers=good(ui))[0] == 403


def test_the_printed_url_sets_a_strict_cookie_and_drops_the_token_from_the_address(ui):
    status, headers, _ = request(ui, "GET", f"/?token={ui.token}")
    assert status == 303 and headers["Location"] == "/"
    cookie = headers["Set-Cookie"]
    assert cookie.startswith(f"{ui.cookie}={ui.token};") and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    status, headers, page = request(ui, "GET", "/", headers={"Cookie": f"{ui.cookie}={ui.token}"})
    assert status == 200 and b"<h1>Virtual machines</h1>" in page
    policy = headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy and "script-src 'self'" in policy and "frame-ancestors 'none'" in policy
    assert request(ui, "GET", "/static/xterm.js", headers={"Cookie": f"{ui.cookie}={ui.token}"})[0] == 200


def test_no_cors_headers_and_no_preflight(ui):
    origin = {"Origin": "http://evil.example"}
    for method, path in (("GET", "/api/vms"), ("OPTIONS", "/api/vms"), ("GET", "/")):
        status, headers, _ = request(ui, method, path, headers={**good(ui), **origin,
                                                                "Access-Control-Request-Method": "POST"})
        assert not [key for key in headers if key.lower().startswith("access-control-")], (method, path, headers)
        assert method != "OPTIONS" or status == 405


def test_changes_need_the_token_header_not_just_the_cookie(ui):
    cookie = {"Cookie": f"{ui.cookie}={ui.token}"}
    status, _, body = request(ui, "POST", "/api/vms", headers=cookie, body={"name": "a"})
    assert status == 403 and b"X-Pyvmm-Token" in body
    assert request(ui, "GET", "/api/vms", headers=cookie)[0] == 200


def test_a_host_other_than_loopback_is_refused(ui):
    status, _, body = request(ui, "GET", "/api/vms", headers={**good(ui), "Host": f"attacker.example:{ui.port}"})
    assert status == 403 and b"loopback" in body


def test_create_form_errors_name_the_field(ui, tmp_path):
    def create(**fields):
        form = {"name": "vm1", "vcpus": "1", "memory": "256", "source": "default", **fields}
        status, _, body = request(ui, "POST", "/api/vms", headers=good(ui), body=form)
        return status, json.loads(body)

    assert create(memory="abc") == (400, {"field": "memory", "error": "must be an integer (got 'abc')"})
    assert create(vcpus="0")[1]["field"] == "vcpus"
    assert create(name="-bad")[1]["field"] == "name"
    status, answer = create(source="kernel", kernel=str(tmp_path / "missing"))
    assert status == 400 and answer["field"] == "kernel" and "no such file" in answer["error"]
    assert create(net="a-name-far-too-long-for-a-tap")[1]["field"] == "net"
    assert create(accel="quantum")[1]["field"] == "accel"
    status, answer = create(virtio_mem="100")
    assert status == 400 and answer["field"] == "virtio_mem", answer
    assert create(source="kernel", kernel=__file__, kernel_args="x")[1]["field"] == "kernel_args"
    status, _, body = request(ui, "GET", "/api/vms", headers=good(ui))
    assert json.loads(body)["vms"] == []  # nothing was defined by the refused forms


def test_controls_reach_only_the_vm_api_operations_the_page_has(ui):
    for method, path in (("PATCH", "/vm"), ("PUT", "/actions"), ("PUT", "/drives/../vm"), ("GET", "/balloon")):
        status, _, body = request(ui, "POST", "/api/vms/ghost/control", headers=good(ui),
                                  body={"method": method, "path": path, "body": {}})
        assert status == 400 and b"is not a control of this page" in body, (method, path)
    status, _, _ = request(ui, "POST", "/api/vms/ghost/control", headers=good(ui),
                           body={"method": "PATCH", "path": "/balloon", "body": {"amount_mib": 1}})
    assert status == 404


def test_controls_follow_the_operations_the_vm_api_offers():
    from pyvmm.ui.handlers import CONTROLS, capabilities

    none = capabilities({}, {"balloon": {"amount_mib": 0}})
    assert not any(none.values())
    offered = {"/balloon": ["GET", "PATCH", "PUT"], "/pyvmm/vcpus": ["GET", "PUT"], "/drives/{drive_id}": ["DELETE", "PUT"],
               "/network-interfaces/{iface_id}": ["PUT"], "/pyvmm/memory/virtio-mem": ["GET", "PUT"]}
    assert capabilities(offered, {"balloon": {"amount_mib": 0}, "pyvmm": {"virtio_mem_mib": 128}}) == {
        "balloon": True, "virtio_mem": True, "vcpus": True, "disk_hotplug": True, "nic_hotplug": False}
    assert capabilities(offered, {})["balloon"] is False and capabilities(offered, {})["virtio_mem"] is False
    for method, path in (("PUT", "/pyvmm/vcpus"), ("PUT", "/pyvmm/memory/virtio-mem"), ("DELETE", "/drives/d1")):
        assert (method, path.replace("d1", "{drive_id}")) in CONTROLS


def test_unknown_vm_and_action_answers(ui):
    assert request(ui, "GET", "/api/vms/ghost", headers=good(ui))[0] == 404
    assert request(ui, "POST", "/api/vms/ghost/actions/suspend", headers=good(ui), body={})[0] == 404
    assert request(ui, "DELETE", "/api/vms", headers=good(ui))[0] == 405
    assert request(ui, "GET", "/api/nothing", headers=good(ui))[0] == 404
    assert request(ui, "GET", "/static/..%2Fserver.py", headers=good(ui))[0] == 404


# --- the console WebSocket ---------------------------------------------------------------------

class FakeConsole:
    """A console socket as api/console.py serves it: `attach N` -> `ok LEN` + history, then live."""

    def __init__(self, run: RunDir) -> None:
        run.path.mkdir(parents=True)
        run.write_pid()  # this process stands for the VM's: the client sees a live VM
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(run.console_sock))
        self.server.listen()
        self.typed = b""
        self.received = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        conn, _ = self.server.accept()
        line = b""
        while not line.endswith(b"\n"):
            line += conn.recv(1)
        assert line.startswith(b"attach ")
        conn.sendall(b"ok 9\nhistory\r\n")
        conn.sendall(b"live\r\n")
        while True:
            data = conn.recv(4096)
            if not data:
                return
            self.typed += data
            if self.typed.endswith(b"\r"):
                self.received.set()


def handshake(server, name, headers):
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [f"GET /api/vms/{name}/console HTTP/1.1", f"Host: 127.0.0.1:{server.port}", "Upgrade: websocket",
             "Connection: Upgrade", f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13",
             *(f"{k}: {v}" for k, v in headers.items())]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    answer = b""
    while b"\r\n\r\n" not in answer:
        chunk = sock.recv(4096)
        if not chunk:
            break
        answer += chunk
    head, _, rest = answer.partition(b"\r\n\r\n")
    return sock, key, head.decode(), rest


def read_frame(sock, pending: bytes) -> tuple[int, bytes, bytes]:
    data = pending
    while True:
        if len(data) >= 2:
            length, offset = data[1] & 0x7F, 2
            if length == 126 and len(data) >= 4:
                length, offset = struct.unpack("!H", data[2:4])[0], 4
            if len(data) >= offset + length:
                return data[0] & 0x0F, data[offset:offset + length], data[offset + length:]
        data += sock.recv(4096)


def masked(opcode: int, payload: bytes) -> bytes:
    mask = os.urandom(4)
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def test_the_console_websocket_needs_the_token_and_bridges_both_ways(ui, tmp_path):
    console = FakeConsole(RunDir.of("vm1", tmp_path / "run"))
    sock, _, head, _ = handshake(ui, "vm1", {})
    assert head.startswith("HTTP/1.1 401") and "Upgrade: websocket" not in head
    sock.close()
    sock, _, head, _ = handshake(ui, "vm1", {"Cookie": f"{ui.cookie}=wrong"})
    assert head.startswith("HTTP/1.1 403")
    sock.close()
    origin = {"Cookie": f"{ui.cookie}={ui.token}", "Origin": "http://evil.example"}
    sock, _, head, _ = handshake(ui, "vm1", origin)
    assert head.startswith("HTTP/1.1 403") and "Upgrade: websocket" not in head
    sock.close()

    sock, key, head, rest = handshake(ui, "vm1", {"Cookie": f"{ui.cookie}={ui.token}",
                                                  "Origin": f"http://127.0.0.1:{ui.port}"})
    assert head.startswith("HTTP/1.1 101"), head
    assert f"Sec-WebSocket-Accept: {accept_key(key)}" in head
    assert "Access-Control" not in head
    opcode, payload, rest = read_frame(sock, rest)
    output = payload
    while b"live" not in output:
        opcode, payload, rest = read_frame(sock, rest)
        output += payload
    assert opcode == 0x2 and output == b"history\r\nlive\r\n"
    sock.sendall(masked(0x1, b"uname -a\r"))
    assert console.received.wait(10) and console.typed == b"uname -a\r"
    sock.sendall(masked(0x8, struct.pack("!H", 1000)))
    opcode, _, _ = read_frame(sock, rest)
    assert opcode == 0x8
    sock.close()


def test_listen_addresses_and_bad_ones():
    from pyvmm.errors import UserError
    from pyvmm.ui.cli import parse_listen

    assert parse_listen("127.0.0.1", None) == ("127.0.0.1", 0)
    assert parse_listen("0.0.0.0:8080", None) == ("0.0.0.0", 8080)
    assert parse_listen("[::1]:9000", None) == ("::1", 9000)
    assert parse_listen("::1", 7000) == ("::1", 7000)
    for text, port in (("1.2.3.4:http", None), ("1.2.3.4:80", 81), ("", None), ("::1", 70000)):
        with pytest.raises(UserError):
            parse_listen(text, port)


def test_pyvmm_ui_refuses_a_bad_listen_address_in_one_line(tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "pyvmm.cli", "ui", "--listen", "256.1.1.1"], capture_output=True,
                            text=True, timeout=60, env=dict(os.environ, XDG_CONFIG_HOME=str(tmp_path)))
    assert result.returncode == 2 and result.stderr.startswith("pyvmm: error: cannot listen on 256.1.1.1")
    assert len(result.stderr.splitlines()) == 1


def test_a_vm_whose_sockets_this_user_cannot_open_is_refused(ui, tmp_path, monkeypatch):
    # root can open any socket: stand in for another user's VM by answering access() with no
    FakeConsole(RunDir.of("vm1", tmp_path / "run"))
    monkeypatch.setattr("pyvmm.ui.handlers.os.access", lambda path, mode: False)
    sock, _, head, _ = handshake(ui, "vm1", {"Cookie": f"{ui.cookie}={ui.token}"})
    assert head.startswith("HTTP/1.1 403") and "Upgrade: websocket" not in head
    sock.close()
    for path in ("/api/vms/vm1/actions/suspend", "/api/vms/vm1/snapshots"):
        status, _, body = request(ui, "POST", path, headers=good(ui), body={"label": "s"})
        assert status == 403 and b"permission denied" in body, path
    assert request(ui, "GET", "/api/vms/vm1/history", headers=good(ui))[0] == 403


@pytest.mark.parametrize("gone", [ConnectionResetError, BrokenPipeError])
def test_a_browser_that_drops_its_connection_leaves_no_traceback(ui, capfd, gone):
    # (Chromium resets a preconnected socket at exit; socketserver hands that to handle_error)
    try:
        raise gone(104, "Connection reset by peer")
    except ConnectionError:
        ui.handle_error(None, ("127.0.0.1", 1))
    assert capfd.readouterr().err == ""


def test_other_request_errors_are_still_reported(ui, capfd):
    try:
        raise ValueError("a handler bug")
    except ValueError:
        ui.handle_error(None, ("127.0.0.1", 1))
    assert "ValueError: a handler bug" in capfd.readouterr().err
