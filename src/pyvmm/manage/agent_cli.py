"""`pyvmm exec` and `pyvmm cp`: the guest agent from the command line.

    pyvmm exec [--env NAME=VALUE] [--cwd DIR] [--timeout S] (VM | --vsock UDS) -- COMMAND [ARG...]
    pyvmm cp VM:/guest/path local | pyvmm cp local VM:/guest/path
    pyvmm cp --vsock UDS SRC DST          one of SRC, DST is a guest path written :PATH

VM is a managed VM's name (its definition's vsock uds_path); UDS is the vsock socket of any
VM (`pyvmm run --vsock cid=N,uds=UDS`). `exec` streams its stdin,
stdout and stderr and exits with the command's status; errors are one line, status 2.
"""

from __future__ import annotations

import argparse
import os
import sys

__all__ = ["register_cli", "run_agent_command"]


def register_cli(subparsers, common: argparse.ArgumentParser) -> None:
    exec_ = subparsers.add_parser(
        "exec", parents=[common], usage="pyvmm exec [options] (VM | --vsock UDS) -- COMMAND [ARG...]",
        help="run a command in a running guest through its agent (stdin/stdout/stderr streamed)",
        description="Run COMMAND in the guest through pyvmm's guest agent on vsock; exits with its status.")
    exec_.add_argument("--vsock", metavar="UDS", help="the VM's vsock Unix socket (run --vsock ...,uds=UDS), for a VM "
                                                       "not named")
    exec_.add_argument("--env", metavar="NAME=VALUE", action="append", default=[], help="set in the command's environment")
    exec_.add_argument("--cwd", metavar="DIR", help="the command's working directory (default /)")
    exec_.add_argument("--timeout", metavar="SECONDS", type=float, help="kill the command after SECONDS")
    exec_.add_argument("guest_command", nargs=argparse.REMAINDER, metavar="[VM] -- COMMAND")
    exec_.set_defaults(handler=run_agent_command)
    cp = subparsers.add_parser(
        "cp", parents=[common], usage="pyvmm cp [--vsock UDS] SRC DST",
        help="copy a file into or out of a running guest (the guest side written VM:PATH, or :PATH with --vsock)")
    cp.add_argument("--vsock", metavar="UDS", help="the VM's vsock Unix socket, for a VM not named")
    cp.add_argument("source", metavar="SRC")
    cp.add_argument("destination", metavar="DST")
    cp.set_defaults(handler=run_agent_command)


def run_agent_command(args: argparse.Namespace) -> int:
    from ..agent.client import AgentClient
    from ..errors import UserError

    if args.subcommand == "exec":
        words = list(args.guest_command)
        name = words.pop(0) if words and words[0] != "--" else None
        command = words[1:] if words[:1] == ["--"] else words
        if not command:
            raise UserError("exec: no command given (pyvmm exec VM -- COMMAND, or --vsock UDS -- COMMAND)")
        client = AgentClient(_vsock_path(name, args.vsock))
        env = {}
        for item in args.env:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise UserError(f"--env: NAME=VALUE expected, got {item!r}")
            env[key] = value
        stdin = None if os.isatty(0) else 0
        return client.exec_stream(command, stdin=stdin, stdout=_writer(1), stderr=_writer(2), env=env,
                                  cwd=args.cwd, timeout=args.timeout)
    source, destination = _guest_side(args.source, args.vsock), _guest_side(args.destination, args.vsock)
    if (source is None) == (destination is None):
        raise UserError("cp: exactly one of SRC and DST must be a guest path (VM:PATH, or :PATH with --vsock)")
    if destination is not None:
        uds, path = destination
        with open(args.source, "rb") as file:
            data = file.read()
        AgentClient(uds).write_file(path, data, os.stat(args.source).st_mode & 0o777)
    elif source is not None:
        uds, path = source
        data = AgentClient(uds).read_file(path)
        if args.destination == "-":
            _writer(1)(data)
        else:
            with open(args.destination, "wb") as file:
                file.write(data)
    return 0


def _guest_side(text: str, vsock: str | None) -> tuple[str, str] | None:
    """(vsock socket, guest path) for "VM:PATH" (or ":PATH" with --vsock); None for a host path."""
    name, sep, path = text.partition(":")
    if not sep or "/" in name or not path:
        return None
    if vsock is not None and name:
        return None
    return _vsock_path(name or None, vsock), path


def _vsock_path(name: str | None, vsock: str | None) -> str:
    """The vsock socket of the managed VM `name`, or the --vsock one."""
    from ..errors import UserError

    if (name is None) == (vsock is None):
        raise UserError("name a managed VM or give --vsock UDS (one of the two)")
    if vsock is not None:
        return vsock
    assert name is not None
    from .client import connect

    config = connect().vm(name).config()
    uds = (config.get("vsock") or {}).get("uds_path")
    if not uds:
        raise UserError(f"VM {name!r} has no vsock device: the guest agent needs one (define it with vsock)")
    return uds


def _writer(fd: int):
    def write(data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    return write
