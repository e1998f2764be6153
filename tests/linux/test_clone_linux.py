"""Clones of a snapshot of the default Linux guest, with the continuity workload: two clones of
one snapshot (pyvmm.clones.start_clone: memory copy-on-write from the one file, each its own
disk copy, NIC MAC, vsock socket and CID, VM generation ID) both finish the workload the
snapshot was taken in the middle of, with nothing lost or corrupted: their counts go on from the
snapshot's, the checksummed RAM region is intact, every block each wrote is on its own disk copy
(and none on the snapshot's image), and each step's vsock ping is answered by that clone's own
host socket. Each clone is its own machine: its CID, its machine id (the agent's IDENTITY) and
the MAC its guest really uses (the agent sets the clone's new MAC on the interface that had the
snapshot's) differ from the other clone's."""

from __future__ import annotations

import socket
import threading

from helpers.continuity import BLOCK, DISK_CHECKS, HOST_PORT, ContinuityWorkload
from pyvmm.agent import AgentClient
from pyvmm.agent.client import new_machine_id
from pyvmm.clones import start_clone
from pyvmm.config import NetConfig
from pyvmm.snapshot import save_snapshot

PAUSE_AT = 10

# The continuity workload, but one vsock connection per step (retried until its pong comes): a
# clone's new CID resets the guest's connections (TRANSPORT_RESET), and its host socket is a new
# one. At the end it waits for the host's word (/tmp/identity-set, written through the agent once
# the clone's identity is applied) and prints what the guest sees of its identity.
_SCRIPT = r"""
set -e
dd if=/dev/urandom of=/tmp/region bs=1M count=4 2>/dev/null
region_sum=$(md5sum /tmp/region | cut -d' ' -f1)
i=0
while [ $i -lt STEPS ]; do
  i=$((i+1))
  printf 'block %08d\n' $i | dd of=/dev/vda bs=512 seek=$i count=1 conv=fsync 2>/dev/null
  tries=0
  until reply=$(echo "ping $i" | pyvmm-vsock connect PORT 2>/dev/null) && [ "$reply" = "pong $i" ]; do
    tries=$((tries+1))
    [ $tries -lt 200 ] || { echo "vsock-lost $i"; break; }
    sleep 0.05
  done
  echo "count $i"
  sleep PACE
done
[ "$(md5sum /tmp/region | cut -d' ' -f1)" = "$region_sum" ] && echo region-ok || echo region-bad
CHECKS
while [ ! -e /tmp/identity-set ]; do sleep 0.1; done
echo "identity cid=$(pyvmm-vsock cid) mac=$(cat /sys/class/net/eth0/address) machine-id=$(cat /etc/machine-id)"
echo workload-done
sleep 1
"""


class CloneWorkload(ContinuityWorkload):
    """ContinuityWorkload with a connection per step; every vsock socket path given to
    serve(uds) answers pings (the snapshot's and each clone's)."""

    def __init__(self, directory, **kwargs) -> None:
        self.servers: dict[str, list[str]] = {}
        self._listeners: list[socket.socket] = []
        super().__init__(directory, **kwargs)

    def command(self) -> list[str]:
        return ["sh", "-c", _SCRIPT.replace("CHECKS", DISK_CHECKS).replace("STEPS", str(self.steps))
                .replace("PACE", str(self.pace)).replace("PORT", str(HOST_PORT))]

    def _echo_server(self, path: str) -> socket.socket:
        return self.serve(path.removesuffix(f"_{HOST_PORT}"))

    def serve(self, uds: str) -> socket.socket:
        """Answer 'ping N' with 'pong N' on every connection to the vsock socket `uds`'s port."""
        pings = self.servers.setdefault(uds, [])
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(f"{uds}_{HOST_PORT}")
        listener.listen(8)
        self._listeners.append(listener)

        def answer(conn: socket.socket) -> None:
            with conn:
                buffered = b""
                while data := conn.recv(4096):
                    buffered += data
                    while b"\n" in buffered:
                        line, buffered = buffered.split(b"\n", 1)
                        pings.append(line.decode())
                        conn.sendall(line.replace(b"ping", b"pong") + b"\n")

        def accept() -> None:
            while True:
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return
                threading.Thread(target=answer, args=(conn,), daemon=True).start()

        threading.Thread(target=accept, daemon=True).start()
        return listener

    def close(self) -> None:
        for listener in self._listeners:
            listener.close()


def test_two_clones_of_a_linux_snapshot_both_continue_with_nothing_lost_and_are_not_twins(pyvmm, tmp_path):
    work = CloneWorkload(tmp_path, steps=24)
    original = pyvmm.in_process(work.machine(nets=(NetConfig(tap="auto"),)), work.command(), accel="tcg")
    clones = []
    try:
        original.vm.start()
        original.wait_for(work.marker(PAUSE_AT))
        original.vm.pause()
        save_snapshot(original.vm, tmp_path / "vm.state", tmp_path / "vm.mem")
        snapshot_mac = snapshot_mac_of(original)
        original.kill()
        before = original.text()
        image_at_snapshot = work.disk.read_bytes()

        for name in ("alpha", "beta"):
            made: dict = {}

            def make(console_write, name=name, made=made):
                vm, made["identity"] = start_clone(tmp_path / "vm.state", tmp_path / "vm.mem", name, tmp_path,
                                                   console_write)
                return vm

            work.serve(str(tmp_path / f"{name}.vsock"))
            guest = pyvmm.adopt(make, symbols=original.symbols)
            clones.append((name, guest, made["identity"]))
        for _, guest, _ in clones:
            guest.vm.resume()
        machine_ids = {}
        for name, guest, identity in clones:
            agent = AgentClient(str(tmp_path / f"{name}.vsock"), connect_timeout=60)
            machine_ids[name] = new_machine_id()
            agent.set_identity(machine_ids[name])
            assert list(identity.macs) == [snapshot_mac]
            agent.set_mac_addresses(identity.macs)
            agent.exec(["touch", "/tmp/identity-set"])
        outcomes = {name: guest.vm.wait(600) for name, guest, _ in clones}
    finally:
        for _, guest, _ in clones:
            guest.kill()
        original.kill()
        work.close()

    assert work.counts(before)[-1] >= PAUSE_AT
    seen = {}
    for name, guest, identity in clones:
        text = guest.text()
        guest.check_kernel_warnings()
        outcome = outcomes[name]
        assert outcome is not None and (outcome.reason, outcome.status) == ("poweroff", 0), (name, text[-3000:])
        counted = work.counts(before) + work.counts(text)
        assert counted == list(range(1, work.steps + 1)), (name, text[-3000:])   # no gap, repeat or restart
        assert "region-ok" in text and "disk-bad=0" in text and "vsock-lost" not in text, text[-2000:]
        assert "workload-done" in text
        # every step after the snapshot was answered by this clone's own socket
        answered = {int(p.split()[1]) for p in work.servers[str(tmp_path / f"{name}.vsock")]}
        assert set(range(work.counts(before)[-1] + 1, work.steps + 1)) <= answered
        image = (tmp_path / f"{name}-disk0.img").read_bytes()
        for i in range(1, work.steps + 1):
            assert image[i * BLOCK:i * BLOCK + 15] == f"block {i:08d}\n".encode(), (name, i)
        line = next(row for row in text.splitlines() if row.startswith("identity "))
        fields = dict(part.split("=", 1) for part in line.split()[1:])
        new_mac = identity.macs[snapshot_mac]
        assert fields == {"cid": str(identity.vsock_cid), "mac": new_mac, "machine-id": machine_ids[name]}, line
        seen[name] = fields
    assert work.disk.read_bytes() == image_at_snapshot        # the clones wrote their own copies only
    alpha, beta = seen["alpha"], seen["beta"]
    assert alpha["cid"] != beta["cid"] and alpha["mac"] != beta["mac"] and alpha["machine-id"] != beta["machine-id"]


def snapshot_mac_of(guest) -> str:
    """The MAC the snapshot's NIC had (the builder's default for NIC 0: no MAC was configured)."""
    from pyvmm.config import default_mac

    assert guest.vm.machine.nets[0].mac is None
    return default_mac(0)
