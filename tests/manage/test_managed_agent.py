"""The guest agent of a managed VM (the default Debian guest with a vsock device), end to end:
`pyvmm exec NAME -- CMD` streams stdin, stdout and stderr and exits with CMD's status;
`pyvmm cp` copies a file in and out; the per-VM API's /pyvmm/agent/exec and /pyvmm/agent/files
(through the Python client) do the same; a VM without a vsock device gets a one-line refusal."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from pyvmm.images.kernel_warnings import CONSOLE_LOGLEVEL, describe, find_kernel_warnings
from pyvmm.manage.client import ApiError

from test_managed_vms import PROMPT, cli, read_until


def pyvmm(env, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess:
    values, _ = env
    return subprocess.run([sys.executable, "-m", "pyvmm.cli", *args], input=stdin, capture_output=True,
                          env=values, timeout=300)


def test_exec_and_cp_against_a_managed_vm_from_the_cli_and_the_api(env, tmp_path):
    _, host = env
    uds = tmp_path / "agent.vsock"
    definition = tmp_path / "agent.toml"
    definition.write_text(f'[machine-config]\nvcpu_count = 1\nmem_size_mib = 256\n'
                          f'[vsock]\nguest_cid = 7\nuds_path = "{uds}"\n'
                          f'[pyvmm]\nkernel_args = "{CONSOLE_LOGLEVEL}"\n')
    cli(env, "define", str(definition))
    cli(env, "start", "agent")
    vm = host.vm("agent")
    read_until(vm.open_console(), re.escape(PROMPT))

    # the CLI: stdin in, stdout and stderr apart, the command's exit status out
    run = pyvmm(env, "exec", "--env", "WHO=pyvmm", "agent", "--", "sh", "-c",
                'tr a-z A-Z; echo "to stderr $WHO" >&2; exit 3', stdin=b"hello, guest\n")
    assert (run.returncode, run.stdout, run.stderr) == (3, b"HELLO, GUEST\n", b"to stderr pyvmm\n")
    assert pyvmm(env, "exec", "agent", "--", "true").returncode == 0

    payload = os.urandom(200_000) + b"\0end"
    local, back = tmp_path / "payload.bin", tmp_path / "back.bin"
    local.write_bytes(payload)
    assert pyvmm(env, "cp", str(local), "agent:/tmp/payload.bin").returncode == 0
    assert pyvmm(env, "cp", "agent:/tmp/payload.bin", str(back)).returncode == 0
    assert back.read_bytes() == payload
    listed = pyvmm(env, "exec", "agent", "--", "wc", "-c", "/tmp/payload.bin")
    assert listed.stdout.split()[0] == str(len(payload)).encode()

    # the API, through the Python client: the same agent, base64 over JSON
    result = vm.exec(["sh", "-c", "cat; cat /tmp/payload.bin | wc -c; echo oops >&2; exit 5"], b"from the api\n")
    assert (result.stdout, result.stderr, result.status) == (f"from the api\n{len(payload)}\n".encode(), b"oops\n", 5)
    assert vm.exec(["cat", "/tmp/payload.bin"]).stdout == payload
    vm.write_file("/tmp/api.txt", b"written through the API\n", 0o600)
    assert vm.read_file("/tmp/api.txt") == b"written through the API\n"
    assert vm.exec(["stat", "-c", "%a", "/tmp/api.txt"]).stdout == b"600\n"
    with pytest.raises(ApiError) as missing:
        vm.read_file("/no/such/file")
    assert missing.value.status == 400 and "/no/such/file" in missing.value.fault_message

    cli(env, "shutdown", "agent", "--timeout", "300")
    warnings = find_kernel_warnings(vm.console_history())
    assert not warnings, describe(warnings)


def test_agent_requests_to_a_vm_without_vsock_are_refused_in_one_line(env, tmp_path):
    _, host = env
    definition = tmp_path / "plain.toml"
    definition.write_text(f'[machine-config]\nvcpu_count = 1\nmem_size_mib = 128\n'
                          f'[pyvmm]\nkernel_args = "{CONSOLE_LOGLEVEL}"\n')
    cli(env, "define", str(definition))
    cli(env, "start", "plain")
    with pytest.raises(ApiError) as refused:
        host.vm("plain").exec(["true"])
    assert refused.value.status == 400 and "no vsock device" in refused.value.fault_message
    run = pyvmm(env, "exec", "plain", "--", "true")
    assert run.returncode == 2 and b"no vsock device" in run.stderr and b"Traceback" not in run.stderr
    cli(env, "destroy", "plain")
