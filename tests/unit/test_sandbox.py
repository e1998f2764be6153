"""The sandbox layer without a guest: which `pyvmm run` options the warm snapshot serves, when
a cached warm snapshot is usable, and a Sandbox used outside its life."""

from __future__ import annotations

import json

import pytest

from pyvmm.cli import build_parser
from pyvmm.sandbox import RunResult, Sandbox, SandboxError
from pyvmm.sandbox import warm
from pyvmm.sandbox.run import warm_refusal


def run_args(*words: str):
    return build_parser().parse_args(["run", *words, "--", "true"])


def test_a_plain_command_run_is_served_from_the_warm_snapshot():
    assert warm_refusal(run_args()) is None
    assert warm_refusal(run_args("--timeout", "5", "--accel", "tcg", "--console-log", "/tmp/x")) is None
    assert warm_refusal(run_args("--memory", "262144K", "--cpus", "1")) is None     # the warm machine's, spelt otherwise


@pytest.mark.parametrize("words, flag", [
    (("--kernel", "k"), "--kernel"), (("--memory", "512M"), "--memory"), (("-c", "2"), "--cpus"),
    (("--append", "quiet"), "--append"), (("--disk", "d.img"), "--disk"), (("--vsock", "cid=3,uds=/x"), "--vsock"),
    (("--net", "tap=auto"), "--net"), (("--console", "virtio"), "--console"), (("--rng",), "--rng"),
    (("--initrd", "i"), "--initrd"), (("--reboot",), "--reboot"), (("--cpu-hide", "xsave"), "--cpu-hide")])
def test_options_for_another_machine_need_a_cold_boot(words, flag):
    assert warm_refusal(run_args(*words)) == f"{flag} asks for another machine than the warm snapshot's"


def test_bad_warm_and_cold_combinations_are_one_line(capsys):
    from pyvmm.cli import main

    assert main(["run", "--warm", "--memory", "512M", "--", "true"]) == 2
    assert capsys.readouterr().err == "pyvmm: error: --warm: --memory asks for another machine than the warm snapshot's\n"
    assert main(["run", "--warm"]) == 2
    assert "give the command after --" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["run", "--warm", "--cold", "--", "true"])
    assert "not allowed with argument" in capsys.readouterr().err


PARTS = {"pyvmm": "0", "recipe": "r", "accel": "tcg"}


def _snapshot_dir(tmp_path, parts=PARTS):
    directory = tmp_path / "k"
    directory.mkdir()
    (directory / warm.STATE_FILE).write_bytes(b"s" * 10)
    (directory / warm.MEMORY_FILE).write_bytes(b"m" * 20)
    meta = {"parts": parts, "sizes": {warm.STATE_FILE: 10, warm.MEMORY_FILE: 20}}
    (directory / warm.META_FILE).write_text(json.dumps(meta))
    return directory


def test_a_complete_warm_snapshot_of_the_same_parts_is_usable(tmp_path):
    assert warm._problem(_snapshot_dir(tmp_path), PARTS) == ""


@pytest.mark.parametrize("damage, problem", [
    (lambda d: (d / warm.META_FILE).unlink(), "missing"),
    (lambda d: (d / warm.META_FILE).write_text("{not json"), "meta.json unreadable"),
    (lambda d: (d / warm.MEMORY_FILE).write_bytes(b"m" * 19), "vm.mem has the wrong size"),
    (lambda d: (d / warm.STATE_FILE).unlink(), "vm.state missing")])
def test_an_incomplete_warm_snapshot_is_not_used(tmp_path, damage, problem):
    directory = _snapshot_dir(tmp_path)
    damage(directory)
    assert warm._problem(directory, PARTS).startswith(problem)


def test_a_warm_snapshot_of_another_image_or_accelerator_is_not_used(tmp_path):
    directory = _snapshot_dir(tmp_path)
    assert warm._problem(directory, {**PARTS, "recipe": "other"}) == "made from something else"
    assert warm._problem(directory, {**PARTS, "accel": "kvm"}) == "made from something else"
    assert warm.key_of(PARTS) != warm.key_of({**PARTS, "recipe": "other"})


def test_a_sandbox_outside_its_life_says_so():
    sb = Sandbox()
    with pytest.raises(SandboxError, match="not started"):
        sb.run("true")
    assert sb.started_from is None and not sb.running
    sb.close()
    with pytest.raises(SandboxError, match="closed"):
        sb.files.read("/etc/hostname")
    with pytest.raises(SandboxError, match="closed: make a new one"):
        sb.start()


def test_run_result():
    result = RunResult(b"h\xffi\n", b"", 0)
    assert result.ok and result.text == "h\ufffdi\n" and not RunResult(b"", b"", 1).ok
