#!/usr/bin/env python3
"""The management plane's latency: pyvmm's per-VM API vs QEMU's QMP, and the agent.

    .venv/bin/python benchmarks/api.py                    # about a minute
    .venv/bin/python benchmarks/api.py --requests 5000 --runs 5 --skip-qemu

Measured in one run, on running VMs booted from the same default Debian guest (256 MiB, one
vCPU, the software CPU; QEMU with -accel tcg -machine microvm, the same kernel and initramfs):

  API round trip   GET / (Firecracker's describeInstance) on pyvmm's Unix socket: a new
                   connection per request (what pyvmm's client and curl do) and on one kept-alive
                   connection; p50 and p99 over --requests requests, after a warm-up.
  QMP round trip   {"execute": "query-status"} on QEMU's QMP Unix socket, one connection (QMP
                   has no other way), after qmp_capabilities; p50 and p99 likewise.
  start -> ready   `pyvmm start NAME` spawned until the guest's agent first runs `true` (the
                   time a user waits before `pyvmm exec` works), and until `start` returns.
  exec true        on the running VM: `pyvmm exec NAME -- true` (a CLI process each time), the
                   API's PUT /pyvmm/agent/exec, and AgentClient over the vsock socket directly.
  run -- true      `pyvmm run -- true`: boot the default guest, run `true`, power off.
Median of --runs for the whole-command timings. Wall-clock on the host, from outside each
VMM (time.perf_counter). Take measurements on an otherwise idle machine: the load average
is printed with the results.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))  # this checkout's pyvmm, installed or not

from pyvmm.agent.client import AgentClient  # noqa: E402
from pyvmm.manage.client import ApiClient, connect  # noqa: E402

QEMU = "qemu-system-x86_64"
PROMPT = b"pyvmm:~# "


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(fraction * len(ordered)), len(ordered) - 1)]


def describe(values: list[float]) -> str:
    return f"p50 {percentile(values, 0.5) * 1e6:8.0f} us   p99 {percentile(values, 0.99) * 1e6:8.0f} us"


def http_get(sock: socket.socket, path: str) -> bytes:
    """One HTTP/1.1 GET on a kept-alive connection; the answer's body."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(body) < length:
        body += sock.recv(65536)
    return body


def api_round_trips(api_sock: str, count: int) -> tuple[list[float], list[float]]:
    client = ApiClient(api_sock, timeout=30)
    fresh, kept = [], []
    for _ in range(50):
        client.get("/")  # warm-up
    for _ in range(count):
        began = time.perf_counter()
        answer = client.get("/")
        fresh.append(time.perf_counter() - began)
    assert answer["state"] == "Running", answer
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(api_sock)
        for _ in range(50):
            http_get(sock, "/")
        for _ in range(count):
            began = time.perf_counter()
            body = http_get(sock, "/")
            kept.append(time.perf_counter() - began)
    assert json.loads(body)["state"] == "Running"
    return fresh, kept


class Qmp:
    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        deadline = time.monotonic() + 60
        while True:
            try:
                self.sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.file = self.sock.makefile("rb")
        json.loads(self.file.readline())  # the greeting
        self.execute("qmp_capabilities")

    def execute(self, command: str) -> dict:
        self.sock.sendall(json.dumps({"execute": command}).encode() + b"\n")
        while True:
            answer = json.loads(self.file.readline())
            if "event" not in answer:
                return answer


def qmp_round_trips(image, scratch: str, count: int) -> tuple[list[float], str]:
    qmp_path = os.path.join(scratch, "qmp.sock")
    argv = [QEMU, "-machine", "microvm", "-accel", "tcg", "-m", "256", "-smp", "1", "-nodefaults", "-no-user-config",
            "-display", "none", "-serial", "null", "-kernel", str(image.kernel), "-initrd", str(image.initramfs),
            "-append", "console=ttyS0 quiet", "-qmp", f"unix:{qmp_path},server=on,wait=off"]
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        qmp = Qmp(qmp_path)
        time.sleep(5)  # the guest boots meanwhile: a running VM, as pyvmm's is
        assert qmp.execute("query-status")["return"]["status"] == "running"
        for _ in range(50):
            qmp.execute("query-status")
        times = []
        for _ in range(count):
            began = time.perf_counter()
            qmp.execute("query-status")
            times.append(time.perf_counter() - began)
        version = qmp.execute("query-version")["return"]["qemu"]
        return times, f"{version['major']}.{version['minor']}.{version['micro']}"
    finally:
        process.kill()
        process.wait()


def timed(argv: list[str], env: dict[str, str]) -> float:
    began = time.perf_counter()
    result = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=600)
    elapsed = time.perf_counter() - began
    if result.returncode != 0:
        sys.exit(f"api.py: {' '.join(argv[3:])} failed: {result.stderr.decode(errors='replace').strip()}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="API and QMP round trips (default 2000)")
    parser.add_argument("--runs", type=int, default=3, help="runs of each whole-command timing (default 3)")
    parser.add_argument("--skip-qemu", action="store_true")
    args = parser.parse_args()
    if not args.skip_qemu and shutil.which(QEMU) is None:
        sys.exit(f"api.py: {QEMU} missing: apt-get install qemu-system-x86, or use --skip-qemu")
    from pyvmm.images import default_image

    image = default_image()
    pyvmm = [sys.executable, "-m", "pyvmm.cli"]
    with tempfile.TemporaryDirectory(prefix="pyvmm-api-bench-") as scratch:
        env = dict(os.environ, XDG_CONFIG_HOME=f"{scratch}/cfg", XDG_RUNTIME_DIR=f"{scratch}/rt",
                   PYTHONPATH=str(REPO / "src"))
        host = connect(f"{scratch}/cfg/pyvmm/vms", f"{scratch}/rt/pyvmm")
        uds = f"{scratch}/bench.vsock"
        definition = pathlib.Path(scratch, "bench.toml")
        definition.write_text(f'[machine-config]\nvcpu_count = 1\nmem_size_mib = 256\n'
                              f'[vsock]\nguest_cid = 9\nuds_path = "{uds}"\n')
        subprocess.run([*pyvmm, "define", str(definition)], env=env, check=True, capture_output=True)

        ready, start_returns = [], []
        for _ in range(args.runs):
            began = time.perf_counter()
            subprocess.run([*pyvmm, "start", "bench"], env=env, check=True, capture_output=True)
            start_returns.append(time.perf_counter() - began)
            agent = AgentClient(uds, connect_timeout=300)
            assert agent.exec(["true"]).status == 0
            ready.append(time.perf_counter() - began)
            subprocess.run([*pyvmm, "destroy", "bench"], env=env, check=True, capture_output=True)

        subprocess.run([*pyvmm, "start", "bench"], env=env, check=True, capture_output=True)
        vm = host.vm("bench")
        agent = AgentClient(uds, connect_timeout=300)
        agent.exec(["true"])
        fresh, kept = api_round_trips(str(vm.run.api_sock), args.requests)
        exec_cli = [timed([*pyvmm, "exec", "bench", "--", "true"], env) for _ in range(args.runs * 3)]
        exec_api, exec_direct = [], []
        for _ in range(args.runs * 10):
            began = time.perf_counter()
            assert vm.exec(["true"]).status == 0
            exec_api.append(time.perf_counter() - began)
            began = time.perf_counter()
            assert agent.exec(["true"]).status == 0
            exec_direct.append(time.perf_counter() - began)
        subprocess.run([*pyvmm, "destroy", "bench"], env=env, check=True, capture_output=True)

        run_true = [timed([*pyvmm, "run", "--", "true"], env) for _ in range(args.runs)]
        qmp, qemu_version = ([], None) if args.skip_qemu else qmp_round_trips(image, scratch, args.requests)

    median = statistics.median
    print(f"load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs; {args.requests} round trips, "
          f"{args.runs} runs; default guest, 256 MiB, 1 vCPU, software CPU")
    print(f"pyvmm API GET /, new connection each   {describe(fresh)}")
    print(f"pyvmm API GET /, kept-alive connection  {describe(kept)}")
    if qmp:
        print(f"QEMU {qemu_version} QMP query-status        {describe(qmp)}")
    print(f"pyvmm start -> returns                  {median(start_returns):6.2f} s")
    print(f"pyvmm start -> agent runs `true`        {median(ready):6.2f} s")
    print(f"exec true: pyvmm exec (CLI process)     {median(exec_cli) * 1e3:6.0f} ms")
    print(f"exec true: API PUT /pyvmm/agent/exec    {median(exec_api) * 1e3:6.0f} ms")
    print(f"exec true: AgentClient over vsock       {median(exec_direct) * 1e3:6.0f} ms")
    print(f"pyvmm run -- true (boot, run, poweroff) {median(run_true):6.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
