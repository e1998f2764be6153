"""What the virtio transports share: device status, feature negotiation, queue selection and
reset (virtio 1.2 sections 2.1, 2.2, 3.1). mmio.py and pci.py lay the registers out
differently; the rules behind them live here, mixed into both transport classes.

DEVICE_NEEDS_RESET is kept apart from the status the driver wrote: the device raises it from
an I/O thread while a vCPU may be writing the status register, and neither may lose the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ...persist import State
from .device import STATUS_DEVICE_NEEDS_RESET, STATUS_DRIVER_OK, STATUS_FAILED, STATUS_FEATURES_OK, VirtioDevice
from .queue import SplitQueue

_CORE_FIELDS = ("device_features_sel", "driver_features_sel", "driver_features", "queue_sel", "config_generation")


class VirtioTransportCore:
    """Mixed into a transport class; the transport is the device's VirtioInterrupt."""

    device: VirtioDevice
    on_notify: Callable[[int], None]

    def _init_core(self, device: VirtioDevice) -> None:
        self.device = device
        # Who serves a kick: the device inline by default; an I/O thread when wired to an eventfd.
        self.on_notify = device.notify
        self._driver_status = 0
        self._needs_reset = False
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.driver_features = 0
        self.queue_sel = 0
        self.config_generation = 0

    # --- status -----------------------------------------------------------------------------------

    @property
    def status(self) -> int:
        """The device status as the driver reads it."""
        return self._driver_status | (STATUS_DEVICE_NEEDS_RESET if self._needs_reset else 0)

    @status.setter
    def status(self, value: int) -> None:
        """Set both parts at once (restore)."""
        self._driver_status = int(value) & 0xFF & ~STATUS_DEVICE_NEEDS_RESET
        self._needs_reset = bool(value & STATUS_DEVICE_NEEDS_RESET)

    def write_status(self, value: int) -> None:
        """The driver wrote the device status: 0 resets; FEATURES_OK is checked against what
        the device can do (cleared again if not); DRIVER_OK starts the device."""
        if value == 0:
            self.reset()
            return
        old = self._driver_status
        # Only the device sets NEEDS_RESET, and a driver never clears a bit (spec 2.1.1): only a
        # reset does. Dropping DRIVER_OK would reopen queue setup under a running device.
        self._driver_status = (old | value) & 0xFF & ~STATUS_DEVICE_NEEDS_RESET
        if value & STATUS_FEATURES_OK and not old & STATUS_FEATURES_OK:
            self.device.set_driver_features(self.driver_features)
            if self.driver_features & ~self.device.offered_features or not self.device.features_ok():
                self._driver_status &= ~STATUS_FEATURES_OK  # the driver reads it back and gives up
        if value & STATUS_DRIVER_OK and not old & STATUS_DRIVER_OK and not value & STATUS_FAILED:
            self.device.activate()

    def mark_needs_reset(self) -> bool:
        """Raise DEVICE_NEEDS_RESET; True if the driver is running and should hear about it."""
        self._needs_reset = True
        return bool(self._driver_status & STATUS_DRIVER_OK)

    # --- features -----------------------------------------------------------------------------------

    def device_features_word(self) -> int:
        """The 32 offered feature bits device_features_sel selects (0 past bit 63)."""
        if self.device_features_sel > 1:
            return 0
        return (self.device.offered_features >> (32 * self.device_features_sel)) & 0xFFFFFFFF

    def driver_features_word(self) -> int:
        if self.driver_features_sel > 1:
            return 0
        return (self.driver_features >> (32 * self.driver_features_sel)) & 0xFFFFFFFF

    def write_driver_features_word(self, value: int) -> None:
        """Frozen once FEATURES_OK is set (section 3.1.1)."""
        if self._driver_status & STATUS_FEATURES_OK or self.driver_features_sel > 1:
            return
        shift = 32 * self.driver_features_sel
        self.driver_features = (self.driver_features & ~(0xFFFFFFFF << shift)) | ((value & 0xFFFFFFFF) << shift)

    # --- queues -------------------------------------------------------------------------------------

    def selected_queue(self) -> SplitQueue | None:
        queues = self.device.queues
        return queues[self.queue_sel] if 0 <= self.queue_sel < len(queues) else None

    def queue_for_setup(self) -> SplitQueue | None:
        """The selected queue if the driver may still program it: setup freezes at DRIVER_OK."""
        if self._driver_status & STATUS_DRIVER_OK:
            return None
        return self.selected_queue()

    # --- reset and snapshots ---------------------------------------------------------------------------

    def reset(self) -> None:
        self.device.reset()
        self._driver_status = 0
        self._needs_reset = False
        self.driver_features = 0
        self.device_features_sel = self.driver_features_sel = self.queue_sel = 0

    def core_save(self) -> TransportCoreState:
        return TransportCoreState(**{name: getattr(self, name) for name in _CORE_FIELDS}, status=self.status)

    def core_restore(self, state: TransportCoreState) -> None:
        for name in _CORE_FIELDS:
            setattr(self, name, getattr(state, name))
        self.status = state.status


@dataclass(frozen=True)
class TransportCoreState(State):
    """The registers both virtio transports have: feature selectors, the driver's features, the
    selected queue, the configuration generation and the device status (NEEDS_RESET included)."""
    KIND = "virtio_transport"
    device_features_sel: int
    driver_features_sel: int
    driver_features: int
    queue_sel: int
    config_generation: int
    status: int

    def validate(self) -> None:
        for name in ("device_features_sel", "driver_features_sel", "queue_sel", "config_generation"):
            self.check_range(name, 0, 0xFFFFFFFF)
        self.check_range("driver_features", 0, (1 << 64) - 1)
        self.check_range("status", 0, 0xFF)
