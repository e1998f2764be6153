"""pyvmm's parser built for the one command given: the same parsing and help as with all of them."""

from __future__ import annotations

import argparse

import pytest

from pyvmm.cli import build_parser, command_named


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


FULL = _commands(build_parser())


def test_the_full_parser_has_every_command():
    assert {"run", "image", "define", "list", "exec", "mem", "ui", "kvm-info", "info", "firecracker"} <= set(FULL)


@pytest.mark.parametrize("name", sorted(FULL))
def test_a_command_parsed_alone_has_the_help_and_options_it_has_among_all(name):
    alone = _commands(build_parser(name))
    assert name in alone and len(set(map(id, alone.values()))) == 1  # that command (and its aliases) only
    assert alone[name].format_help() == FULL[name].format_help()
    assert [a.option_strings for a in alone[name]._actions] == [a.option_strings for a in FULL[name]._actions]


def test_an_unknown_command_builds_them_all_so_the_error_lists_them(capsys):
    parser = build_parser("nosuch")
    assert set(_commands(parser)) == set(FULL)
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(["nosuch"])
    assert exit_.value.code == 2 and "'define'" in capsys.readouterr().err


def test_arguments_parse_the_same_with_one_command_or_all():
    argv = ["-v", "run", "--memory", "512M", "--cpus", "2", "--disk", "a.img,readonly", "--", "uname", "-a"]
    assert vars(build_parser(command_named(argv)).parse_args(argv)) == vars(build_parser().parse_args(argv))


@pytest.mark.parametrize("argv, command", [
    (["run", "--kernel", "k"], "run"),
    (["-v", "--debug", "list"], "list"),
    (["-vv", "mem", "stats", "x"], "mem"),
    (["--help"], None), (["-h", "run"], None), (["--version"], None), (["--memory", "1G", "run"], None), ([], None),
])
def test_the_command_is_the_first_word_after_flags_without_a_value(argv, command):
    assert command_named(argv) == command
