"""Snapshots of managed VMs through the CLI, on the default Debian guest (the software CPU on
our hosts): `pyvmm snapshot` (the VM runs on), `pyvmm save` (the VM stops) and `pyvmm restore`
in each restore mode: the guest's ticker goes on from where it stood, with no tick lost or
repeated, in a VM of its own. Bad files are one line and exit 2. One boot."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from pyvmm.images.kernel_warnings import CONSOLE_LOGLEVEL, describe, find_kernel_warnings

from test_managed_vms import PROMPT, TICKER, cli, read_until, ticks


def _continues(vm, after: int) -> None:
    """The restored guest prints tick after+1, after+2, ... and nothing before them."""
    conn = vm.open_console(replay=1 << 20)
    data = read_until(conn, rf"tick-{after + 3}\r?\n".encode())
    conn.close()
    seen = ticks(data)
    assert seen[:3] == [after + 1, after + 2, after + 3], seen
    warnings = find_kernel_warnings(vm.console_history())
    assert not warnings, describe(warnings)


def test_snapshot_save_and_restore_in_each_mode(env, tmp_path):
    values, host = env
    definition = tmp_path / "alpha.toml"
    definition.write_text(f'[machine-config]\nvcpu_count = 1\nmem_size_mib = 256\n[pyvmm]\nkernel_args = "{CONSOLE_LOGLEVEL}"\n')
    cli(env, "define", str(definition))
    cli(env, "start", "alpha")
    alpha = host.vm("alpha")
    conn = alpha.open_console(replay=1 << 20)
    read_until(conn, re.escape(PROMPT))
    conn.sendall(TICKER)
    read_until(conn, rb"tick-3\r?\n")

    # snapshot: paused for it, running again after
    snap = tmp_path / "snap.state"
    cli(env, "snapshot", "alpha", str(snap))
    assert alpha.state() == "running" and (tmp_path / "snap.state.mem").exists()
    at_snapshot = max(ticks(read_until(conn, rb"tick-\d+\r?\n", timeout=5)) or [0])
    read_until(conn, rf"tick-{at_snapshot + 2}\r?\n".encode())

    # save: the VM stops
    saved = tmp_path / "alpha.state"
    cli(env, "save", "alpha", str(saved), "--mem-file", str(tmp_path / "alpha.mem"))
    conn.close()
    assert alpha.state() == "shut off"
    at_save = ticks(alpha.console_history())[-1]
    assert at_save > at_snapshot

    # restore (copy): alpha again, from where it was saved
    cli(env, "restore", str(saved), "--mem-file", str(tmp_path / "alpha.mem"))
    assert alpha.state() == "running"
    _continues(alpha, at_save)
    cli(env, "destroy", "alpha")

    # the snapshot, twice more: a VM of its own in each of the other modes
    snapshot_ticks = None
    for name, mode in (("beta", "cow"), ("gamma", "uffd")):
        cli(env, "restore", str(snap), "--name", name, "--mode", mode)
        vm = host.vm(name)
        assert vm.state() == "running"
        data = read_until(vm.open_console(replay=1 << 20), rb"tick-\d+\r?\n")
        first = ticks(data)[0]
        snapshot_ticks = snapshot_ticks or first - 1
        assert first - 1 == snapshot_ticks and at_snapshot - 1 <= snapshot_ticks <= at_snapshot + 1
        _continues(vm, snapshot_ticks)
        cli(env, "destroy", name)

    # bad input: one line, exit 2, nothing started
    corrupted = tmp_path / "corrupted.state"
    data = bytearray(saved.read_bytes())
    data[len(data) // 2] ^= 1
    corrupted.write_bytes(bytes(data))
    (tmp_path / "short.mem").write_bytes(b"\0" * 4096)
    for args, message in (
            (("restore", str(corrupted), "--mem-file", str(tmp_path / "alpha.mem")),
             rf"^pyvmm: error: {re.escape(str(corrupted))}: bad checksum: the state file is corrupted$"),
            (("restore", str(saved), "--name", "delta", "--mem-file", str(tmp_path / "short.mem")),
             r"^pyvmm: error: delta: .*short\.mem: the memory file holds 4096 bytes"),
            (("snapshot", "nosuchvm", str(tmp_path / "x.state")), r"^pyvmm: error: no VM named 'nosuchvm'$"),
            (("save", "alpha", str(tmp_path / "x.state")), r"^pyvmm: error: alpha is not running$")):
        result = subprocess.run([sys.executable, "-m", "pyvmm.cli", *args], capture_output=True, env=values,
                                timeout=300)
        stderr = result.stderr.decode()
        assert result.returncode == 2 and stderr.count("\n") == 1, (args, stderr)
        assert re.match(message, stderr), (args, stderr)
    assert host.vm("delta").state() in ("shut off", "crashed") and not os.path.exists(tmp_path / "x.state")
