"""Exceptions raised by the KVM layer."""

from __future__ import annotations

import errno as _errno
import os

from ..errors import PyvmmError, UserError


class KvmError(PyvmmError, OSError):
    """An ioctl on a KVM fd failed; the message names the ioctl."""

    errno: int      # always set (OSError's may be None)
    strerror: str

    def __init__(self, request_name: str, err: int, detail: str = "") -> None:
        self.request_name = request_name
        text = f"{request_name} failed: {os.strerror(err)}"
        if detail:
            text += f" ({detail})"
        super().__init__(err, text)

    def __str__(self) -> str:  # OSError's default prefixes "[Errno N]"
        return self.strerror or ""

    @property
    def interrupted(self) -> bool:
        return self.errno == _errno.EINTR


class KvmUnavailable(UserError):
    """KVM cannot be used on this host: a one-line reason for the user."""
