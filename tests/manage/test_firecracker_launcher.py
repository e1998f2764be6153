"""`pyvmm firecracker` driven the way Firecracker's users drive Firecracker: its command line,
and its REST API through a client written from Firecracker's API documentation (raw HTTP/1.1
over the Unix socket, not pyvmm's client). The default guest's kernel and initramfs are the
boot source."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time

import pytest

from pyvmm.images.kernel_warnings import CONSOLE_LOGLEVEL, describe, find_kernel_warnings

PROMPT = b"pyvmm:~# "


def firecracker_request(sock_path: str, method: str, path: str, body: dict | None = None) -> tuple[int, dict | None]:
    """One request as Firecracker's documentation shows them (curl --unix-socket ... -X PUT)."""
    data = json.dumps(body).encode() if body is not None else b""
    head = (f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\nConnection: close\r\n\r\n")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(60)
        conn.connect(sock_path)
        conn.sendall(head.encode() + data)
        reply = b""
        while chunk := conn.recv(65536):
            reply += chunk
    status_line, _, rest = reply.partition(b"\r\n")
    _, _, payload = rest.partition(b"\r\n\r\n")
    return int(status_line.split()[1]), json.loads(payload) if payload else None


def launcher(*args: str, stdin=subprocess.DEVNULL) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pyvmm.cli", "firecracker", *args], stdin=stdin,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def read_until(process: subprocess.Popen, pattern: bytes, timeout: float = 300) -> bytes:
    data, deadline = b"", time.monotonic() + timeout
    fd = process.stdout.fileno()
    while not re.search(pattern, data):
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        assert ready, f"no {pattern!r} on the console: {data[-500:]!r}"
        chunk = os.read(fd, 65536)
        assert chunk, f"the launcher ended: {data[-500:]!r} {process.stderr.read()!r}"
        data += chunk
    return data


def test_version_and_flags_pyvmm_ignores():
    result = subprocess.run([sys.executable, "-m", "pyvmm.cli", "firecracker", "--version"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0 and re.match(r"Firecracker v\d+\.\d+\.\d+", result.stdout)
    result = subprocess.run([sys.executable, "-m", "pyvmm.cli", "firecracker", "--no-api"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "--config-file" in result.stderr


def test_sigterm_before_a_start_ends_the_launcher_cleanly(tmp_path):
    sock = str(tmp_path / "firecracker.socket")
    process = launcher("--api-sock", sock)
    deadline = time.monotonic() + 60
    while not os.path.exists(sock):
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)  # how Firecracker's users stop it
    assert process.wait(60) == 0 and not os.path.exists(sock)
    again = launcher("--api-sock", sock)  # the socket is gone: a new launcher can have it
    try:
        while not os.path.exists(sock):
            assert again.poll() is None, again.stderr.read()
            time.sleep(0.05)
    finally:
        again.send_signal(signal.SIGTERM)
        assert again.wait(60) == 0


def test_configured_and_started_through_firecrackers_api(image, tmp_path):
    sock = str(tmp_path / "firecracker.socket")
    process = launcher("--api-sock", sock, "--id", "fc-test", "--seccomp-filter", "none.bpf", "--boot-timer")
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(sock):  # Firecracker's clients wait for the socket the same way
            assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
            time.sleep(0.05)
        assert firecracker_request(sock, "GET", "/") == (200, {"id": "fc-test", "state": "Not started",
                                                               "vmm_version": firecracker_request(sock, "GET", "/")[1]["vmm_version"],
                                                               "app_name": "pyvmm"})
        assert firecracker_request(sock, "PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 256})[0] == 204
        status, fault = firecracker_request(sock, "PUT", "/boot-source", {"kernel_image_path": 5})
        assert status == 400 and fault["fault_message"].startswith("kernel_image_path")
        boot_args = f"{image.cmdline} {CONSOLE_LOGLEVEL}"
        assert firecracker_request(sock, "PUT", "/boot-source", {
            "kernel_image_path": str(image.kernel), "initrd_path": str(image.initramfs), "boot_args": boot_args})[0] == 204
        assert firecracker_request(sock, "PUT", "/actions", {"action_type": "InstanceStart"})[0] == 204
        assert firecracker_request(sock, "GET", "/")[1]["state"] == "Running"
        console = read_until(process, re.escape(PROMPT))
        assert firecracker_request(sock, "PATCH", "/vm", {"state": "Paused"})[0] == 204
        assert firecracker_request(sock, "GET", "/")[1]["state"] == "Paused"
        assert firecracker_request(sock, "PATCH", "/vm", {"state": "Resumed"})[0] == 204
        status, fault = firecracker_request(sock, "PUT", "/machine-config", {"vcpu_count": 2, "mem_size_mib": 256})
        assert status == 400 and "after starting" in fault["fault_message"]
        config = firecracker_request(sock, "GET", "/vm/config")[1]
        assert config["boot-source"]["boot_args"] == boot_args and config["machine-config"]["mem_size_mib"] == 256
        warnings = find_kernel_warnings(console)
        assert not warnings, describe(warnings)
        # Firecracker's graceful stop: the guest gets the power button and powers off
        assert firecracker_request(sock, "PUT", "/actions", {"action_type": "SendCtrlAltDel"})[0] == 204
        assert process.wait(300) == 0
        assert not os.path.exists(sock)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_config_file_without_api_runs_to_the_guests_end(image, tmp_path):
    # pci=off, as Firecracker's guests are booted: the drive is on virtio-mmio, found through ACPI
    disk = tmp_path / "data.img"
    disk.write_bytes(b"pyvmm-drive-marker".ljust(1 << 20, b"\0"))
    config = tmp_path / "vm_config.json"
    command = ["sh", "-c", "echo size=$(cat /sys/block/vda/size); head -c 18 /dev/vda; echo"]
    config.write_text(json.dumps({
        "boot-source": {"kernel_image_path": str(image.kernel), "initrd_path": str(image.initramfs),
                        "boot_args": image.command_line(command, extra=f"pci=off {CONSOLE_LOGLEVEL}")},
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 256},
        "drives": [{"drive_id": "data", "path_on_host": str(disk), "is_root_device": False, "is_read_only": True}],
        "network-interfaces": []}))
    process = launcher("--no-api", "--config-file", str(config), "--level", "Info")
    out, err = process.communicate(timeout=400)
    assert process.returncode == 0, err
    assert b"size=2048" in out and b"pyvmm-drive-marker" in out, out[-2000:]
    warnings = find_kernel_warnings(out)
    assert not warnings, describe(warnings)
