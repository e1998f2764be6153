"""Eight managed VMs at once on our 2 cores: eight `pyvmm start`s run concurrently (one process
each, default guest, 128 MiB), every start succeeds, `list` shows all eight running, every
console reaches the shell prompt with no kernel warning, and every VM powers off when its ACPI
power button is pressed (`shutdown`, all eight at once): `list --all` then shows each one shut
off with a poweroff outcome. None is lost on the way."""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor

from pyvmm.images.kernel_warnings import CONSOLE_LOGLEVEL, describe, find_kernel_warnings

from test_managed_vms import PROMPT, cli

VMS = 8
BOOT_TIMEOUT = 600.0  # eight software-CPU boots sharing two cores with whatever else runs


def test_eight_vms_start_at_once_are_listed_and_shut_down_cleanly(env, tmp_path):
    _, host = env
    names = [f"vm{i}" for i in range(1, VMS + 1)]
    definition = tmp_path / "small.toml"
    definition.write_text(f'[machine-config]\nvcpu_count = 1\nmem_size_mib = 128\n'
                          f'[pyvmm]\nkernel_args = "{CONSOLE_LOGLEVEL}"\n')
    for name in names:
        cli(env, "define", str(definition), "--name", name)

    with ThreadPoolExecutor(VMS) as pool:
        started = list(pool.map(lambda name: cli(env, "start", name), names))  # cli() asserts status 0
    assert all(b"started" in result.stdout for result in started)
    listing = cli(env, "list").stdout.decode()
    assert all(re.search(rf"^ {name}\s+running\s+\d+", listing, re.M) for name in names), listing

    deadline = time.monotonic() + BOOT_TIMEOUT
    waiting = set(names)
    while waiting and time.monotonic() < deadline:
        waiting = {name for name in waiting if PROMPT not in host.vm(name).console_history()}
        time.sleep(0.5)
    assert not waiting, {name: host.vm(name).console_history()[-300:] for name in waiting}
    for name in names:
        warnings = find_kernel_warnings(host.vm(name).console_history())
        assert not warnings, f"{name}: {describe(warnings)}"
    assert [info.name for info in host.list() if info.state == "running"] == sorted(names)

    with ThreadPoolExecutor(VMS) as pool:  # the ACPI power button, pressed in all eight at once
        list(pool.map(lambda name: cli(env, "shutdown", name, "--timeout", "300"), names))
    listing = cli(env, "list", "--all").stdout.decode()
    for name in names:
        assert re.search(rf"^ {name}\s+shut off", listing, re.M), listing
        info = host.vm(name).info()
        assert info.outcome["reason"] == "poweroff" and info.outcome["status"] == 0, (name, info.outcome)
