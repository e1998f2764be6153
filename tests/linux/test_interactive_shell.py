"""`pyvmm run` without a command, used as a person uses it: in a terminal (a pseudo-terminal
here), typing at the guest shell's prompt, reading the answers, and leaving with `exit` or
with C-a x. The terminal must be raw while the guest runs and as it was afterwards, and no
kernel message may show up between the commands (the kernel-warning gate reads it all)."""

from __future__ import annotations

import re
import termios

import pytest

PROMPT = b"pyvmm:~# "  # init.sh: PS1='\h:\w\$ ' for root in /root


def type_line(run, text: str) -> None:
    """Type `text` key by key, then Enter (a terminal in raw mode sends CR)."""
    for key in text:
        run.send(key.encode())
    run.send(b"\r")


def session(run, image) -> int:
    """Boot to the prompt, run two commands; the console offset where the session began."""
    _, start = run.wait_for(PROMPT, timeout=300)
    mode = termios.tcgetattr(run.master)
    assert not mode[3] & (termios.ECHO | termios.ICANON | termios.ISIG), "pyvmm left the terminal cooked"
    # what the guest prints differs from what was typed (the echo of the typed line)
    type_line(run, "echo $((6 * 7)) answers")
    _, after = run.wait_for(b"42 answers", after=start, timeout=60)
    _, after = run.wait_for(PROMPT, after=after, timeout=60)
    type_line(run, "echo kernel=$(uname -r) cpus=$(grep -c ^processor /proc/cpuinfo)")
    _, after = run.wait_for(f"kernel={image.kernel_version} cpus=1".encode(), after=after, timeout=60)
    run.wait_for(PROMPT, after=after, timeout=60)
    return start


def assert_quiet(output: bytes) -> None:
    """What the person saw between the first prompt and leaving: their commands, their output,
    prompts; no kernel line ("[   12.345678] ...")."""
    kernel_lines = [line for line in output.decode(errors="replace").splitlines()
                    if re.match(r"\s*\[\s*\d+\.\d+\]", line)]
    assert not kernel_lines, kernel_lines


@pytest.mark.parametrize("leave", ["exit", "C-a x"])
def test_shell_in_a_terminal(pyvmm, image, leave):
    run = pyvmm.start("run", terminal=True)
    start = session(run, image)
    if leave == "exit":
        type_line(run, "exit")
        run.wait_for(b"reboot: Power down", after=start, timeout=60)
        seen = run.output[start:run.output.rindex(b"exit\r")]
    else:
        seen = run.output[start:]
        run.send(b"\x01x")
    run.process.wait(60)
    after = termios.tcgetattr(run.master)  # before finish(): it closes the terminal's master side
    result = run.finish(timeout=60)
    assert result.returncode == 0, result.stdout[-2000:]
    assert after == run.terminal_mode_before, "pyvmm did not restore the terminal"
    assert_quiet(seen)
