"""Snapshot files with the default Linux guest on the software CPU, in each restore mode: the
continuity workload (helpers/continuity.py: counting in memory, a checksummed RAM region, disk
blocks written with fsync, one vsock connection to the host) is paused mid-way, snapshotted to
files, its VM closed and a new VM loaded from the files; the guest finishes with nothing lost.
The host end of the vsock connection is this test's socket: the VM replaced in this process
hands its host side over (restore.carry_over), so the connection goes on."""

from __future__ import annotations

import pytest

from helpers.continuity import ContinuityWorkload
from pyvmm.restore import carry_over
from pyvmm.snapshot import load_snapshot, save_snapshot

PAUSE_AT = 12


@pytest.mark.parametrize("mode", ["copy", "cow", "uffd"])
def test_linux_workload_continues_from_snapshot_files(pyvmm, tmp_path, mode):
    work = ContinuityWorkload(tmp_path)
    guest = pyvmm.in_process(work.machine(), work.command(), accel="tcg")
    try:
        guest.vm.start()
        guest.wait_for(work.marker(PAUSE_AT))
        guest.vm.pause()
        saved = save_snapshot(guest.vm, tmp_path / "vm.state", tmp_path / "vm.mem")
        assert saved.memory_size == 256 << 20 and saved.memory_bytes < saved.memory_size // 2   # sparse
        carried = carry_over(guest.vm)
        guest.vm.close()
        guest.vm = load_snapshot(tmp_path / "vm.state", tmp_path / "vm.mem", guest.console_write, mode=mode,
                                 carryover=carried)
        guest.vm.symbols = guest.symbols
        guest.vm.resume()
        outcome = guest.vm.wait(300)
    finally:
        guest.kill()
        work.close()
    text = guest.text()
    guest.check_kernel_warnings()
    counted = work.counts(text)
    assert PAUSE_AT <= len(counted) and counted[-1] == work.steps
    work.verify(text, outcome)
