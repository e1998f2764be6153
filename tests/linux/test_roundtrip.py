"""Proof by round trip with the default Linux guest on the software CPU: a workload counts in
memory, writes numbered disk blocks with fsync and keeps a vsock connection to the host busy;
mid-workload the VM is paused, saved (through JSON), the old VM closed with its memory kept,
a fresh VM built from the state and that memory, and resumed. The guest sees no error: the
count goes on without a gap or a repeat, every block reads back (from the device, caches
dropped) and the same vsock connection carries the rest of the exchange. The host end of the
connection is this test's socket, which never notices: pyvmm's side of it (the vsock host's
stream) is carried over to the new VM (restore.carry_over)."""

from __future__ import annotations

import json
import re
import socket
import threading

import pytest

from helpers.continuity import DISK_AND_VSOCK_CHECKS
from pyvmm.config import DiskConfig, MachineConfig, VsockConfig
from pyvmm.restore import carry_over, restore_vm
from pyvmm.vm_state import VmState

STEPS = 40
PAUSE_AT = 12
BLOCK = 512

WORKLOAD = r"""
set -e
mkfifo /tmp/to_host
pyvmm-vsock connect 1234 < /tmp/to_host > /tmp/from_host &
exec 3> /tmp/to_host
i=0
while [ $i -lt STEPS ]; do
  i=$((i+1))
  echo $i > /tmp/count
  printf 'block %08d\n' $i | dd of=/dev/vda bs=512 seek=$i count=1 conv=fsync 2>/dev/null
  echo "ping $i" >&3
  echo "count $(cat /tmp/count)"
  sleep 0.05
done
exec 3>&-
wait
CHECKS
[ $bad -eq 0 ] && [ "$(tail -n 1 /tmp/from_host)" = "pong STEPS" ] && echo workload-ok
""".replace("CHECKS", DISK_AND_VSOCK_CHECKS).replace("STEPS", str(STEPS))


def _echo_server(path: str, lines: list[str]) -> socket.socket:
    """Answers each 'ping N' line on one connection with 'pong N' until the guest closes it."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            buffered = b""
            while True:
                data = conn.recv(4096)
                if not data:
                    break
                buffered += data
                while b"\n" in buffered:
                    line, buffered = buffered.split(b"\n", 1)
                    lines.append(line.decode())
                    conn.sendall(line.replace(b"ping", b"pong") + b"\n")

    threading.Thread(target=serve, daemon=True).start()
    return listener


@pytest.mark.parametrize("transport", ["pci", "mmio"])
def test_linux_workload_continues_in_a_vm_rebuilt_from_its_state(pyvmm, tmp_path, transport):
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    uds = str(tmp_path / "vsock")
    received: list[str] = []
    listener = _echo_server(f"{uds}_1234", received)
    machine = MachineConfig(disks=(DiskConfig(str(disk), transport=transport),),
                            vsock=VsockConfig(cid=9, uds=uds, transport=transport))
    guest = pyvmm.in_process(machine, ["sh", "-c", WORKLOAD], accel="tcg")
    try:
        guest.vm.start()
        guest.wait_for(f"count {PAUSE_AT}\r\n".encode())
        guest.vm.pause()
        counted = _counts(guest.text())
        state = VmState.from_dict(json.loads(json.dumps(guest.vm.save().to_dict())))
        assert state.accelerator == "tcg" and {"virtio-blk0", "virtio-vsock"} <= set(state.devices)
        assert any(c.guest_port for c in state.devices["virtio-vsock"].device.connections)
        carried = carry_over(guest.vm)
        guest.vm.close()
        guest.vm = restore_vm(state, carried.memory, guest.console_write, carryover=carried)
        guest.vm.symbols = guest.symbols
        guest.vm.resume()
        outcome = guest.vm.wait(300)
        assert outcome is not None, "the restored guest did not finish"
    finally:
        guest.kill()
        listener.close()
    text = guest.text()
    guest.check_kernel_warnings()
    assert (outcome.reason, outcome.status) == ("poweroff", 0), (outcome.message, text[-3000:])
    assert len(counted) >= PAUSE_AT and counted[-1] < STEPS     # paused mid-workload
    assert _counts(text) == list(range(1, STEPS + 1))            # no gap, no repeat, no restart
    assert "disk-bad=0" in text and f"vsock-replies={STEPS} last=pong {STEPS}" in text, text[-2000:]
    assert "workload-ok" in text
    assert received == [f"ping {i}" for i in range(1, STEPS + 1)]  # one connection, all of it
    image = disk.read_bytes()
    for i in range(1, STEPS + 1):
        assert image[i * BLOCK:i * BLOCK + 15] == f"block {i:08d}\n".encode()


def _counts(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"^count (\d+)$", text, re.M)]
