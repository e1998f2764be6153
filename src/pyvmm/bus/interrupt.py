"""What a device sees of interrupt delivery: a line it can drive or pulse."""

from __future__ import annotations

from typing import Protocol


class IrqLine(Protocol):
    def set_level(self, high: bool) -> None:
        """Drive the line (level-triggered semantics: the controller sees rising edges)."""

    def trigger(self) -> None:
        """Signal one edge-triggered interrupt."""


class NullIrqLine:
    """A line connected to nothing (devices used without an interrupt controller)."""

    def set_level(self, high: bool) -> None:
        pass

    def trigger(self) -> None:
        pass


class MsiVector(Protocol):
    """One MSI/MSI-X vector of a device: the message the guest programmed, delivered on trigger().

    `eventfd` is an fd whose writes (8-byte counter, e.g. 1) deliver the message without Python
    (KVM's irqfd): hand it to an out-of-process back-end as its "call" fd. None when the backend
    has no such shortcut; then only trigger() delivers.
    """

    eventfd: int | None

    def configure(self, address: int, data: int, masked: bool) -> None:
        """The message as the guest programmed it (MSI-X table entry); masked: deliver nothing."""

    def trigger(self) -> None:
        """Deliver the message once unless masked (any thread)."""

    def close(self) -> None:
        """Release the vector (its routing and eventfd); trigger() is then a no-op."""


class NullMsiVector:
    """A vector connected to nothing (devices used without an interrupt controller)."""

    eventfd: int | None = None

    def configure(self, address: int, data: int, masked: bool) -> None:
        pass

    def trigger(self) -> None:
        pass

    def close(self) -> None:
        pass
