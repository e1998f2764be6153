"""The command the guest's /init runs, carried on the kernel command line as ``pyvmm.cmd=<base64>``."""

from __future__ import annotations

import base64
import shlex

from .image import ImageError

CMD_PARAM = "pyvmm.cmd="
# x86 COMMAND_LINE_SIZE is 2048 bytes with the NUL; leave room for the default line and VMM extras
# (noxsave, clearcpuid=..., tsc_early_khz=...).
MAX_CMD_PARAM = 1536


def encode_command(argv: list[str]) -> str:
    """The kernel argument ``pyvmm.cmd=<base64>`` that makes the guest's init run `argv`.

    `argv` is joined with shlex.join (init runs it with ``sh -c``) and base64-encoded with the
    standard alphabet (A-Z a-z 0-9 + / =): no spaces or quotes, so the kernel's command line
    parser keeps it one argument, and the shell's word splitting in init leaves it whole.
    """
    if isinstance(argv, str):
        raise TypeError("encode_command takes a list of arguments, not a string")
    if not argv:
        raise ValueError("encode_command: empty argv")
    for arg in argv:
        if "\0" in arg:
            raise ValueError("encode_command: NUL bytes cannot be passed to the guest's shell")
    script = shlex.join(argv)
    try:
        encoded = script.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"encode_command: argument is not valid Unicode text ({exc.reason})") from None
    param = CMD_PARAM + base64.b64encode(encoded).decode("ascii")
    if len(param) > MAX_CMD_PARAM:
        raise ImageError(f"guest command too long for the kernel command line ({len(param)} > {MAX_CMD_PARAM} "
                         "characters after encoding)")
    return param


def decode_command(param: str) -> str:
    """The shell command carried by a ``pyvmm.cmd=...`` argument (or its bare base64 value)."""
    if param.startswith(CMD_PARAM):
        param = param[len(CMD_PARAM):]
    return base64.b64decode(param.encode("ascii"), validate=True).decode("utf-8")
