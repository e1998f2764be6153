"""`pyvmm clone --from-snapshot` with the default Debian guest: the clone's NIC has a new MAC
and its guest really uses it (the guest agent sets it on the interface that had the
snapshot's: a guest reads its NIC's MAC only when the driver probes), while the VM the
snapshot was taken of keeps its own."""

from __future__ import annotations

import re

from pyvmm.images.kernel_warnings import CONSOLE_LOGLEVEL, describe, find_kernel_warnings

from test_managed_vms import PROMPT, cli, read_until


def guest_mac(vm) -> str:
    result = vm.exec(["cat", "/sys/class/net/eth0/address"])
    assert result.status == 0, result.stderr
    return result.stdout.decode().strip()


def test_a_clone_of_a_snapshot_uses_its_new_mac(env, tmp_path):
    _, host = env
    definition = tmp_path / "alpha.toml"
    definition.write_text(f'[machine-config]\nvcpu_count = 1\nmem_size_mib = 256\n'
                          f'[vsock]\nguest_cid = 7\nuds_path = "{tmp_path / "alpha.vsock"}"\n'
                          f'[[network-interfaces]]\niface_id = "eth0"\nhost_dev_name = "auto"\n'
                          f'[pyvmm]\nkernel_args = "{CONSOLE_LOGLEVEL}"\n')
    cli(env, "define", str(definition))
    cli(env, "start", "alpha")
    alpha = host.vm("alpha")
    read_until(alpha.open_console(), re.escape(PROMPT))
    before = guest_mac(alpha)
    assert before == alpha.config()["network-interfaces"][0].get("guest_mac", before)

    snap = tmp_path / "snap.state"
    cli(env, "snapshot", "alpha", str(snap))
    cli(env, "clone", "--from-snapshot", str(snap), "beta")
    beta = host.vm("beta")
    new = beta.config()["network-interfaces"][0]["guest_mac"]
    assert new != before
    assert guest_mac(beta) == new
    assert guest_mac(alpha) == before
    for vm in (alpha, beta):
        warnings = find_kernel_warnings(vm.console_history())
        assert not warnings, describe(warnings)
    cli(env, "destroy", "beta")
    cli(env, "destroy", "alpha")
