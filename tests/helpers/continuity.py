"""A workload for the default Linux guest that shows whether anything was lost when the VM was
taken apart and put back together (snapshot/restore, clone, migration).

The guest shell:
- counts in memory (a shell variable, echoed as "count N" each step): a gap, a repeat or a
  restart shows;
- fills a 4 MiB region of RAM (a tmpfs file) with random bytes at the start, records its
  checksum, and checks it again at the end ("region-ok" / "region-bad");
- writes numbered 512-byte blocks to its disk with O_SYNC (conf=fsync) each step, and reads
  them all back from the device at the end, caches dropped ("disk-bad=0");
- keeps one vsock stream connection to the host open, sending "ping N" each step; the host
  (ContinuityWorkload's echo server) answers "pong N" and records the pings.
It ends with a second's sleep: the guest's serial driver sends the last lines from its buffer
after the shell printed them, and a power-off right away cut them off once (status 0, the
last two lines missing; the kernel's own "Power down", printed synchronously, arrived).

Use:
    work = ContinuityWorkload(tmp_path)
    guest = pyvmm.in_process(work.machine(), work.command(), accel="tcg")
    guest.vm.start(); guest.wait_for(work.marker(12)); ... pause, snapshot, restore, resume ...
    outcome = vm.wait(300); work.verify(guest.text(), outcome)
"""

from __future__ import annotations

import re
import socket
import threading
from pathlib import Path

from pyvmm.config import DiskConfig, MachineConfig, VsockConfig

BLOCK = 512
HOST_PORT = 1234

# What both continuity workloads (this one and tests/linux/test_roundtrip.py's) print at their
# end, after dropping the page cache: blocks 1..STEPS of the disk read back as written (DISK_CHECKS,
# which the clone workload uses alone), and the vsock replies the guest got.
DISK_CHECKS = r"""sync; echo 3 > /proc/sys/vm/drop_caches
bad=0
j=1
while [ $j -le STEPS ]; do
  [ "$(dd if=/dev/vda bs=512 skip=$j count=1 2>/dev/null | head -c 14)" = "$(printf 'block %08d' $j)" ] || bad=$((bad+1))
  j=$((j+1))
done
echo "disk-bad=$bad"
""".rstrip("\n")
DISK_AND_VSOCK_CHECKS = DISK_CHECKS + r"""
echo "vsock-replies=$(grep -c '^pong ' /tmp/from_host) last=$(tail -n 1 /tmp/from_host)"
""".rstrip("\n")

_SCRIPT = r"""
set -e
dd if=/dev/urandom of=/tmp/region bs=1M count=4 2>/dev/null
region_sum=$(md5sum /tmp/region | cut -d' ' -f1)
mkfifo /tmp/to_host
pyvmm-vsock connect PORT < /tmp/to_host > /tmp/from_host &
exec 3> /tmp/to_host
i=0
while [ $i -lt STEPS ]; do
  i=$((i+1))
  printf 'block %08d\n' $i | dd of=/dev/vda bs=512 seek=$i count=1 conv=fsync 2>/dev/null
  echo "ping $i" >&3
  echo "count $i"
  sleep PACE
done
exec 3>&-
wait
[ "$(md5sum /tmp/region | cut -d' ' -f1)" = "$region_sum" ] && echo region-ok || echo region-bad
CHECKS
echo workload-done
sleep 1
"""


class ContinuityWorkload:
    def __init__(self, directory: Path, *, steps: int = 40, pace: float = 0.05, transport: str = "pci",
                 uds: str | None = None) -> None:
        """`directory`: where the disk image lives; `uds`: the vsock socket path (short: Unix
        socket paths are limited to 108 bytes; default beside the disk)."""
        self.steps, self.pace, self.transport = steps, pace, transport
        self.disk = Path(directory) / "continuity.img"
        self.disk.write_bytes(bytes(1 << 20))
        self.uds = uds or str(Path(directory) / "v.sock")
        self.pings: list[str] = []
        self._listener = self._echo_server(f"{self.uds}_{HOST_PORT}")

    def machine(self, **changes) -> MachineConfig:
        return MachineConfig(disks=(DiskConfig(str(self.disk), transport=self.transport),),
                             vsock=VsockConfig(cid=9, uds=self.uds, transport=self.transport), **changes)

    def command(self) -> list[str]:
        script = (_SCRIPT.replace("CHECKS", DISK_AND_VSOCK_CHECKS).replace("STEPS", str(self.steps)).replace("PACE", str(self.pace))
                  .replace("PORT", str(HOST_PORT)))
        return ["sh", "-c", script]

    @staticmethod
    def marker(step: int) -> bytes:
        """The console line the guest prints at `step`."""
        return f"count {step}\r\n".encode()

    @staticmethod
    def counts(text: str) -> list[int]:
        return [int(n) for n in re.findall(r"^count (\d+)\r?$", text, re.M)]

    def verify(self, text: str, outcome) -> None:
        """Everything the workload did arrived whole: the counts 1..steps once each, the RAM
        region unchanged, every disk block back from the device (and in the image), every
        ping answered on the one connection."""
        assert outcome is not None, "the guest did not finish"
        assert (outcome.reason, outcome.status) == ("poweroff", 0), (outcome.message, text[-3000:])
        assert self.counts(text) == list(range(1, self.steps + 1)), text[-3000:]   # no gap, repeat, restart
        assert "region-ok" in text, text[-2000:]
        assert "disk-bad=0" in text, text[-2000:]
        assert f"vsock-replies={self.steps} last=pong {self.steps}" in text, text[-2000:]
        assert "workload-done" in text
        assert self.pings == [f"ping {i}" for i in range(1, self.steps + 1)]   # one connection, all of it
        image = self.disk.read_bytes()
        for i in range(1, self.steps + 1):
            assert image[i * BLOCK:i * BLOCK + 15] == f"block {i:08d}\n".encode()

    def close(self) -> None:
        self._listener.close()

    def _echo_server(self, path: str) -> socket.socket:
        """Answers each 'ping N' line on one connection with 'pong N' until the guest closes it."""
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(1)

        def serve() -> None:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                buffered = b""
                while True:
                    data = conn.recv(4096)
                    if not data:
                        break
                    buffered += data
                    while b"\n" in buffered:
                        line, buffered = buffered.split(b"\n", 1)
                        self.pings.append(line.decode())
                        conn.sendall(line.replace(b"ping", b"pong") + b"\n")

        threading.Thread(target=serve, daemon=True).start()
        return listener
