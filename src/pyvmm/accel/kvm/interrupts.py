"""The KVM backend's interrupt fast paths: GSI routing, MSI vectors on irqfds, ioeventfds.

An MSI vector is a GSI above the IOAPIC's 24 pins whose routing entry carries the guest's
MSI message, plus an eventfd bound to that GSI with KVM_IRQFD: a write to the eventfd (from
pyvmm's trigger() or from an external vhost-user back-end) injects the MSI in the kernel.

KVM_SET_GSI_ROUTING replaces the VM's whole table, and KVM_CREATE_IRQCHIP's defaults are
only there until the first call: the table therefore always repeats those defaults (GSI
0-23 to IOAPIC pins 0-23, GSI 0-7 / 8-15 to the master / slave 8259 pins), or the legacy
devices and the in-kernel PIT would lose their interrupts.
"""

from __future__ import annotations

import logging
import os
import threading

from ...errors import UserError
from ...kvm import KvmError, KvmUnavailable, uapi
from ...kvm.vm import IrqchipRoute, MsiRoute

log = logging.getLogger(__name__)

IOAPIC_PINS = 24
PIC_PINS = 8
ISA_GSIS = 16
FIRST_MSI_GSI = IOAPIC_PINS


class GsiExhausted(UserError):
    """No GSI is left for another MSI vector."""


def default_routes() -> list[IrqchipRoute]:
    """The routes KVM_CREATE_IRQCHIP installs: each GSI < 16 to both the 8259 pair and the IOAPIC."""
    routes = []
    for gsi in range(IOAPIC_PINS):
        routes.append(IrqchipRoute(gsi, uapi.KVM_IRQCHIP_IOAPIC, gsi))
        if gsi < ISA_GSIS:
            chip = uapi.KVM_IRQCHIP_PIC_MASTER if gsi < PIC_PINS else uapi.KVM_IRQCHIP_PIC_SLAVE
            routes.append(IrqchipRoute(gsi, chip, gsi % PIC_PINS))
    return routes


class GsiRoutingTable:
    """The VM's one routing table: KVM's defaults plus one MSI route per allocated GSI.

    Pure bookkeeping (no fd): the owner pushes `routes()` to KVM after each change.
    """

    def __init__(self, max_routes: int = uapi.KVM_MAX_IRQ_ROUTES) -> None:
        self._defaults = default_routes()
        # KVM bounds both the GSI numbers and the table's length by the same limit.
        self.max_routes = max_routes
        self._msi: dict[int, tuple[int, int]] = {}

    def allocate(self, address: int = 0, data: int = 0) -> int:
        """A free GSI (the lowest above the IOAPIC pins) routed to the MSI (`address`, `data`)."""
        _check_message(address, data)
        if len(self._defaults) + len(self._msi) >= self.max_routes:
            raise GsiExhausted(f"no GSI left for another MSI vector (KVM allows {self.max_routes} routes)")
        gsi = FIRST_MSI_GSI
        while gsi in self._msi:
            gsi += 1
        if gsi >= self.max_routes:
            raise GsiExhausted(f"no GSI left for another MSI vector (KVM allows GSIs below {self.max_routes})")
        self._msi[gsi] = (address, data)
        return gsi

    def update(self, gsi: int, address: int, data: int) -> bool:
        """Route `gsi` to a new message; True if that changed the table."""
        _check_message(address, data)
        if gsi not in self._msi:
            raise KeyError(f"GSI {gsi} is not an allocated MSI vector")
        if self._msi[gsi] == (address, data):
            return False
        self._msi[gsi] = (address, data)
        return True

    def free(self, gsi: int) -> None:
        if self._msi.pop(gsi, None) is None:
            raise KeyError(f"GSI {gsi} is not an allocated MSI vector")

    def message(self, gsi: int) -> tuple[int, int]:
        return self._msi[gsi]

    def __contains__(self, gsi: int) -> bool:
        return gsi in self._msi

    def routes(self) -> list[IrqchipRoute | MsiRoute]:
        return [*self._defaults, *(MsiRoute(gsi, a, d) for gsi, (a, d) in sorted(self._msi.items()))]


def _check_message(address: int, data: int) -> None:
    if not 0 <= address < 1 << 64 or not 0 <= data < 1 << 32:
        raise ValueError(f"msi: address {address:#x} / data {data:#x} out of range (64 / 32 bits)")


def _require(vm_fd, cap: int, name: str, what: str) -> None:
    if vm_fd.check_extension(cap) <= 0:
        raise KvmUnavailable(f"this host's KVM lacks {name}, which {what} needs")


def new_eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


class KvmMsiRouter:
    """Owns the routing table of one VM and the MSI vectors allocated on it."""

    def __init__(self, vm_fd) -> None:
        _require(vm_fd, uapi.KVM_CAP_IRQ_ROUTING, "KVM_CAP_IRQ_ROUTING", "MSI delivery")
        _require(vm_fd, uapi.KVM_CAP_IRQFD, "KVM_CAP_IRQFD", "MSI delivery")
        self._vm_fd = vm_fd
        self._lock = threading.Lock()
        self.table = GsiRoutingTable(min(vm_fd.check_extension(uapi.KVM_CAP_IRQ_ROUTING), uapi.KVM_MAX_IRQ_ROUTES))
        self._vectors: dict[int, KvmMsiVector] = {}

    def vector(self) -> "KvmMsiVector":
        with self._lock:
            gsi = self.table.allocate()
            eventfd = -1
            try:
                eventfd = new_eventfd()
                self._push()
            except BaseException:
                self.table.free(gsi)
                if eventfd >= 0:
                    os.close(eventfd)
                raise
            vector = KvmMsiVector(self, gsi, eventfd)
            self._vectors[gsi] = vector
            return vector

    def _push(self) -> None:
        self._vm_fd.set_gsi_routing(self.table.routes())

    def _configure(self, vector: "KvmMsiVector", address: int, data: int, masked: bool) -> None:
        with self._lock:
            if vector.gsi not in self.table:
                raise ValueError(f"msi: vector on GSI {vector.gsi} was closed")
            # Mask: detach the irqfd first, so nothing is injected with a half-updated route.
            if masked and vector._irqfd_attached:
                self._vm_fd.irqfd(vector.eventfd, vector.gsi, deassign=True)
                vector._irqfd_attached = False
            vector._masked = masked
            old = self.table.message(vector.gsi)
            if self.table.update(vector.gsi, address, data):
                try:
                    self._push()
                except KvmError:
                    self.table.update(vector.gsi, *old)
                    raise
            # Unmask last: KVM_IRQFD notices a count an external back-end left while masked
            # and injects it then, as MSI-X delivers a pending message on unmask.
            if not masked and not vector._irqfd_attached:
                self._vm_fd.irqfd(vector.eventfd, vector.gsi)
                vector._irqfd_attached = True

    def _close(self, vector: "KvmMsiVector") -> None:
        with self._lock:
            if vector.gsi not in self.table:
                return
            try:
                if vector._irqfd_attached and self._vm_fd.fd >= 0:
                    self._vm_fd.irqfd(vector.eventfd, vector.gsi, deassign=True)
            finally:
                vector._irqfd_attached = False
                self.table.free(vector.gsi)
                self._vectors.pop(vector.gsi, None)
                vector._release_eventfd()
            if self._vm_fd.fd >= 0:
                self._push()

    def close(self) -> None:
        """The VM is going away: its fd takes the routes and irqfds with it; free our eventfds."""
        with self._lock:
            for vector in self._vectors.values():
                vector._irqfd_attached = False
                vector._release_eventfd()
            self._vectors.clear()


class KvmMsiVector:
    """One MSI vector on KVM (see KvmMsiRouter). `trigger()` is an 8-byte eventfd write."""

    def __init__(self, router: KvmMsiRouter, gsi: int, eventfd: int) -> None:
        self._router = router
        self.gsi = gsi
        self.eventfd: int | None = eventfd
        self._masked = True  # MSI-X entries come out of reset masked
        self._irqfd_attached = False
        self._fd_lock = threading.Lock()  # trigger() never writes to an fd close() released

    @property
    def masked(self) -> bool:
        return self._masked

    @property
    def message(self) -> tuple[int, int]:
        """(address, data) as last configured."""
        return self._router.table.message(self.gsi)

    def configure(self, address: int, data: int, masked: bool) -> None:
        self._router._configure(self, address, data, bool(masked))

    def trigger(self) -> None:
        with self._fd_lock:
            if self._masked or self.eventfd is None:
                return
            os.eventfd_write(self.eventfd, 1)

    def close(self) -> None:
        self._router._close(self)

    def _release_eventfd(self) -> None:
        with self._fd_lock:
            if self.eventfd is not None:
                os.close(self.eventfd)
                self.eventfd = None

    def __repr__(self) -> str:
        return f"KvmMsiVector(gsi={self.gsi}, eventfd={self.eventfd}, masked={self._masked})"


class KvmIoEventFds:
    """ioeventfds of one VM: guest writes to an address signal an eventfd inside KVM, no exit."""

    def __init__(self, vm_fd) -> None:
        self._vm_fd = vm_fd
        self._lock = threading.Lock()
        self._registered: dict[int, tuple[int, int, bool, int | None]] = {}
        self._borrowed: set[int] = set()  # eventfds the caller owns: never closed here
        self._checked = False

    def add(self, address: int, length: int, *, pio: bool = False, datamatch: int | None = None,
            eventfd: int | None = None) -> int:
        """Register a new eventfd, or the caller's `eventfd` (which stays the caller's to close:
        a vhost-user back-end's kick fd, so guest kicks reach it without pyvmm)."""
        _check_ioeventfd(address, length, pio, datamatch)
        if not self._checked:
            _require(self._vm_fd, uapi.KVM_CAP_IOEVENTFD, "KVM_CAP_IOEVENTFD", "ioeventfd notification")
            self._checked = True
        owned = eventfd is None
        if eventfd is None:
            eventfd = new_eventfd()
        try:
            self._vm_fd.ioeventfd(eventfd, address, length, pio=pio, datamatch=datamatch)
        except KvmError as exc:
            if owned:
                os.close(eventfd)
            raise KvmError("KVM_IOEVENTFD", exc.errno, _describe(address, length, pio, datamatch)) from None
        with self._lock:
            self._registered[eventfd] = (address, length, pio, datamatch)
            if not owned:
                self._borrowed.add(eventfd)
        return eventfd

    def remove(self, eventfd: int, address: int, length: int, *, pio: bool = False,
               datamatch: int | None = None) -> None:
        with self._lock:
            key = self._registered.get(eventfd)
            if key != (address, length, pio, datamatch):
                raise ValueError(f"no ioeventfd {eventfd} at {_describe(address, length, pio, datamatch)}")
            del self._registered[eventfd]
            borrowed = eventfd in self._borrowed
            self._borrowed.discard(eventfd)
        try:
            if self._vm_fd.fd >= 0:
                self._vm_fd.ioeventfd(eventfd, address, length, pio=pio, datamatch=datamatch, deassign=True)
        finally:
            if not borrowed:
                os.close(eventfd)

    def close(self) -> None:
        with self._lock:
            for eventfd in self._registered:
                if eventfd not in self._borrowed:
                    os.close(eventfd)
            self._registered.clear()
            self._borrowed.clear()


def _check_ioeventfd(address: int, length: int, pio: bool, datamatch: int | None) -> None:
    if length not in (0, 1, 2, 4, 8) or (length == 0 and (pio or datamatch is not None)):
        raise ValueError(f"ioeventfd: length {length} is not 1, 2, 4 or 8 (0: any MMIO write, no datamatch)")
    limit = 1 << 16 if pio else 1 << 64
    if not 0 <= address or address + max(length, 1) > limit:
        raise ValueError(f"ioeventfd: address {address:#x} is outside the {'port' if pio else 'MMIO'} space")
    if datamatch is not None and not 0 <= datamatch < 1 << (8 * length):
        raise ValueError(f"ioeventfd: datamatch {datamatch:#x} does not fit in {length} bytes")


def _describe(address: int, length: int, pio: bool, datamatch: int | None) -> str:
    text = f"{'port' if pio else 'MMIO'} {address:#x} length {length}"
    return text if datamatch is None else f"{text} datamatch {datamatch:#x}"
