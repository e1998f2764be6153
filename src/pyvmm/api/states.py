"""The instance's states and the error for an operation its state forbids (instance.py and
migration.py share them)."""

from __future__ import annotations

from ..errors import UserError

NOT_STARTED, RUNNING, PAUSED, STOPPED = "Not started", "Running", "Paused", "Stopped"
INCOMING = "Incoming"  # started to wait for a live migration


class InvalidState(UserError):
    """The operation does not fit the VM's state (configuring a running VM, pausing a stopped one)."""
