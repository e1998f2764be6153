"""The guest agent on the default guest (software CPU): pyvmm.agent.AgentClient through the
VM's vsock socket runs commands (output, status, stdin, env, cwd, errors, timeouts,
concurrency) and copies files; `pyvmm exec` / `pyvmm cp` do the same from the command line;
a port nobody serves is a clear error, not a hang. The VM is then shut down by its power
button."""

from __future__ import annotations

import os
import subprocess
import threading
import time

import pytest

from pyvmm.agent import AgentClient, AgentError, AgentUnavailable, protocol

POWER_OFF_TIMEOUT = 60


def agent_cli(pyvmm, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess:
    """`pyvmm exec` / `pyvmm cp` (through the fixture, like every pyvmm command here)."""
    run = pyvmm.start(*args, stdin=subprocess.PIPE)
    run.process.stdin.write(stdin)
    run.process.stdin.close()
    return run.finish(timeout=120)


def test_commands_and_files_through_the_guest_agent(pyvmm, tmp_path):
    uds = str(tmp_path / "vsock")
    run = pyvmm.start("run", "--vsock", f"cid=3,uds={uds}", "--timeout", "900", "--",
                      "sh", "-c", "echo guest-ready; sleep 1000", terminal=True)
    run.wait_for(b"guest-ready\r")
    client = AgentClient(uds)

    result = client.exec(["sh", "-c", "echo out; echo err >&2; exit 7"])
    assert (result.stdout, result.stderr, result.status) == (b"out\n", b"err\n", 7)
    big = os.urandom(300_000)
    assert client.exec(["cat"], big).stdout == big                        # stdin, both ways at once
    result = client.exec(["sh", "-c", 'echo "$GREETING"; pwd'], env={"GREETING": "hello there"}, cwd="/tmp")
    assert result.stdout == b"hello there\n/tmp\n"
    killed = client.exec(["sh", "-c", "kill -TERM $$"])
    assert (killed.status, killed.signal) == (128 + 15, 15)
    with pytest.raises(AgentError, match="^exec no-such-command: No such file or directory$"):
        client.exec(["no-such-command"])
    with pytest.raises(AgentError, match="^chdir /nowhere: No such file or directory$"):
        client.exec(["true"], cwd="/nowhere")
    started = time.monotonic()
    with pytest.raises(AgentError, match="timed out after 2 s: killed"):
        client.exec(["sleep", "600"], timeout=2)
    assert time.monotonic() - started < 60

    results = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, client.exec(["sh", "-c", f"echo {i}"])))
               for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert {i: r.stdout for i, r in results.items()} == {i: f"{i}\n".encode() for i in range(4)}

    blob = os.urandom(200_000)
    client.write_file("/root/blob", blob, mode=0o600)
    assert client.read_file("/root/blob") == blob
    assert client.exec(["stat", "-c", "%a %s", "/root/blob"]).stdout == b"600 200000\n"
    with pytest.raises(AgentError, match="^open /no/such/file: No such file or directory$"):
        client.read_file("/no/such/file")
    with pytest.raises(AgentUnavailable, match="refused vsock port 53 .*no guest agent is listening"):
        AgentClient(uds, port=53, connect_timeout=1).exec(["true"])

    # the command line: streamed stdio and the exit status; files both ways
    cli = agent_cli(pyvmm, "exec", "--vsock", uds, "--env", "X=1", "--", "sh", "-c", 'tr a-z A-Z; echo "x=$X" >&2; exit 3',
                    stdin=b"shout\n")
    assert (cli.returncode, cli.stdout, cli.stderr) == (3, "SHOUT\n", "x=1\n")
    local = tmp_path / "local.bin"
    local.write_bytes(blob[:5000])
    assert agent_cli(pyvmm, "cp", "--vsock", uds, str(local), ":/tmp/copied").returncode == 0
    back = tmp_path / "back.bin"
    assert agent_cli(pyvmm, "cp", "--vsock", uds, ":/tmp/copied", str(back)).returncode == 0
    assert back.read_bytes() == blob[:5000]
    bad = agent_cli(pyvmm, "cp", "--vsock", uds, ":/nope", str(back))
    assert bad.returncode == 2 and bad.stderr.strip() == \
        "pyvmm: error: open /nope: No such file or directory"

    # a client that goes away while its command still prints: the agent kills the command
    sock = client.connect()
    # (ignoring SIGPIPE, the loop would outlive its closed output pipe)
    sock.sendall(protocol.exec_request(["sh", "-c", "trap '' PIPE; while :; do echo flood-from-agent-test; done 2>/dev/null"]))
    sock.recv(65536)
    sock.close()
    deadline = time.monotonic() + 60
    while b"flood-from-agent-test" in client.exec(["ps", "-o", "args"]).stdout and time.monotonic() < deadline:
        time.sleep(0.5)
    assert b"flood-from-agent-test" not in client.exec(["ps", "-o", "args"]).stdout

    run.send(b"\x01p")   # done: the power button shuts the guest down
    result = run.finish(timeout=POWER_OFF_TIMEOUT)
    assert result.returncode == 0, result.stdout[-2000:]


def test_a_vm_without_vsock_gives_a_one_line_error(pyvmm, tmp_path):
    cli = agent_cli(pyvmm, "exec", "--vsock", str(tmp_path / "none"), "--", "true")
    assert cli.returncode == 2
    assert cli.stderr.splitlines() == [
        f"pyvmm: error: {tmp_path / 'none'}: no such vsock socket (is the VM running with a vsock device?)"]
