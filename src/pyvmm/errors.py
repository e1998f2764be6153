"""pyvmm's exception root: every error pyvmm raises derives from PyvmmError.

UserError is the branch whose message is one line meant for the user as it stands (bad
input, an unusable host): front ends print it and exit with status 2. Everything else under
PyvmmError is an internal error. ConfigError names the config field it is about, so each
front end can say it in its own terms (the CLI a flag, an API a JSON field).

This module imports nothing from pyvmm, so every layer can raise these.
"""

from __future__ import annotations


class PyvmmError(Exception):
    """Root of every exception pyvmm defines."""


class UserError(PyvmmError):
    """Bad input or an unusable host; str() is one line fit to print."""


class ConfigError(UserError, ValueError):
    """A machine description or run option is invalid.

    `field` is the config path it concerns ("memory", "disks[1].path", "vsock.cid") or None;
    `detail` is the message without the field's name. str() names the field as the config
    spells it; front ends call `render(name)` with their own name for it.
    """

    def __init__(self, detail: str, field: str | None = None) -> None:
        self.detail = detail
        self.field = field
        super().__init__(self.render(field) if field else detail)

    def render(self, name: str) -> str:
        """The message with `name` standing for the field (e.g. the CLI flag that set it)."""
        return f"{name}{'' if self.detail.startswith(':') else ' '}{self.detail}"


def user_error_message(exc: BaseException) -> str:
    """One line for the user: 'FILE: reason' for a host I/O error, else the first line of str()."""
    if isinstance(exc, OSError) and exc.filename and exc.strerror:
        return f"{exc.filename}: {exc.strerror}"
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
