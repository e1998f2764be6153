"""VmFd: one KVM virtual machine (memory slots, in-kernel irqchip and PIT, irqfd/ioeventfd)."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

from . import ioctls, uapi
from .fd import KvmFd, ioctl

if TYPE_CHECKING:
    from .system import Kvm
    from .vcpu import VcpuFd


@dataclass(frozen=True)
class IrqchipRoute:
    """GSI `gsi` drives input `pin` of an in-kernel chip (uapi.KVM_IRQCHIP_PIC_MASTER/_SLAVE/_IOAPIC)."""

    gsi: int
    irqchip: int
    pin: int


@dataclass(frozen=True)
class MsiRoute:
    """GSI `gsi` sends the MSI message (`address`, `data`) when raised."""

    gsi: int
    address: int
    data: int


class VmFd(KvmFd):
    def __init__(self, fd: int, kvm: "Kvm") -> None:
        super().__init__(fd)
        self.kvm = kvm
        self._irq_level = uapi.kvm_irq_level()

    def check_extension(self, cap: int) -> int:
        # The VM fd answers per-VM (KVM_CAP_CHECK_EXTENSION_VM); fall back to the system fd.
        try:
            return ioctl(self.fd, ioctls.KVM_CHECK_EXTENSION, cap)
        except OSError:
            return self.kvm.check_extension(cap)

    def set_user_memory_region(self, slot: int, guest_phys_addr: int, memory_size: int,
                               userspace_addr: int, flags: int = 0) -> None:
        region = uapi.kvm_userspace_memory_region(slot, flags, guest_phys_addr, memory_size, userspace_addr)
        ioctl(self.fd, ioctls.KVM_SET_USER_MEMORY_REGION, region)

    def set_tss_addr(self, address: int) -> None:
        ioctl(self.fd, ioctls.KVM_SET_TSS_ADDR, address)

    def set_identity_map_addr(self, address: int) -> None:
        ioctl(self.fd, ioctls.KVM_SET_IDENTITY_MAP_ADDR, ctypes.c_uint64(address))

    def create_irqchip(self) -> None:
        ioctl(self.fd, ioctls.KVM_CREATE_IRQCHIP)

    def create_pit2(self, flags: int = uapi.KVM_PIT_SPEAKER_DUMMY) -> None:
        ioctl(self.fd, ioctls.KVM_CREATE_PIT2, uapi.kvm_pit_config(flags))

    def irq_line(self, irq: int, level: int) -> None:
        """Set the level of an input of the in-kernel irqchip (GSI `irq`)."""
        arg = uapi.kvm_irq_level(irq, level)
        ioctl(self.fd, ioctls.KVM_IRQ_LINE, arg)

    def irqfd(self, eventfd: int, gsi: int, *, deassign: bool = False) -> None:
        flags = uapi.KVM_IRQFD_FLAG_DEASSIGN if deassign else 0
        ioctl(self.fd, ioctls.KVM_IRQFD, uapi.kvm_irqfd(fd=eventfd, gsi=gsi, flags=flags))

    def set_gsi_routing(self, routes: Iterable[IrqchipRoute | MsiRoute]) -> None:
        """Replace the VM's whole GSI routing table with `routes`."""
        routes = list(routes)
        table = uapi.kvm_irq_routing(len(routes))()
        table.nr = len(routes)
        for slot, route in zip(table.entries, routes):
            slot.gsi = route.gsi
            if isinstance(route, MsiRoute):
                slot.type = uapi.KVM_IRQ_ROUTING_MSI
                msi = slot.u.msi
                msi.address_lo, msi.address_hi = route.address & 0xFFFFFFFF, route.address >> 32
                msi.data = route.data
            else:
                slot.type = uapi.KVM_IRQ_ROUTING_IRQCHIP
                slot.u.irqchip.irqchip, slot.u.irqchip.pin = route.irqchip, route.pin
        ioctl(self.fd, ioctls.KVM_SET_GSI_ROUTING, table)

    def signal_msi(self, address: int, data: int) -> bool:
        """Inject one MSI directly (no GSI); False when the guest had it blocked (e.g. LAPIC off)."""
        msi = uapi.kvm_msi(address_lo=address & 0xFFFFFFFF, address_hi=address >> 32, data=data)
        return ioctl(self.fd, ioctls.KVM_SIGNAL_MSI, msi) > 0

    def ioeventfd(self, eventfd: int, address: int, length: int, *, pio: bool = False,
                  datamatch: int | None = None, deassign: bool = False) -> None:
        flags = 0
        if pio:
            flags |= uapi.KVM_IOEVENTFD_FLAG_PIO
        if datamatch is not None:
            flags |= uapi.KVM_IOEVENTFD_FLAG_DATAMATCH
        if deassign:
            flags |= uapi.KVM_IOEVENTFD_FLAG_DEASSIGN
        arg = uapi.kvm_ioeventfd(datamatch=datamatch or 0, addr=address, len=length, fd=eventfd, flags=flags)
        ioctl(self.fd, ioctls.KVM_IOEVENTFD, arg)

    def get_dirty_log(self, slot: int, bitmap: ctypes.Array) -> None:
        ioctl(self.fd, ioctls.KVM_GET_DIRTY_LOG, uapi.kvm_dirty_log(slot, 0, ctypes.addressof(bitmap)))

    def get_irqchip(self, chip_id: int) -> uapi.kvm_irqchip:
        """One in-kernel chip's state (KVM_IRQCHIP_PIC_MASTER, _PIC_SLAVE or _IOAPIC)."""
        chip = uapi.kvm_irqchip(chip_id=chip_id)
        ioctl(self.fd, ioctls.KVM_GET_IRQCHIP, chip)
        return chip

    def set_irqchip(self, chip) -> None:
        """`chip`: a kvm_irqchip (or its bytes) naming the chip in chip_id."""
        if not isinstance(chip, uapi.kvm_irqchip):
            chip = uapi.kvm_irqchip.from_buffer_copy(chip)
        ioctl(self.fd, ioctls.KVM_SET_IRQCHIP, chip)

    def get_pit2(self) -> uapi.kvm_pit_state2:
        state = uapi.kvm_pit_state2()
        ioctl(self.fd, ioctls.KVM_GET_PIT2, state)
        return state

    def set_pit2(self, state) -> None:
        if not isinstance(state, uapi.kvm_pit_state2):
            state = uapi.kvm_pit_state2.from_buffer_copy(state)
        ioctl(self.fd, ioctls.KVM_SET_PIT2, state)

    def get_clock(self) -> uapi.kvm_clock_data:
        """kvm-clock's time (ns); flags say which of realtime/host_tsc KVM filled in."""
        clock = uapi.kvm_clock_data()
        ioctl(self.fd, ioctls.KVM_GET_CLOCK, clock)
        return clock

    def set_clock(self, clock) -> None:
        """Set kvm-clock to `clock` (nanoseconds, or a kvm_clock_data / its bytes from get_clock)
        now. No KVM_CLOCK_REALTIME: the guest's clock does not advance by the time in between."""
        nanoseconds = clock if isinstance(clock, int) else uapi.kvm_clock_data.from_buffer_copy(clock).clock
        ioctl(self.fd, ioctls.KVM_SET_CLOCK, uapi.kvm_clock_data(clock=nanoseconds))

    def create_vcpu(self, vcpu_id: int) -> "VcpuFd":
        from .vcpu import VcpuFd

        fd = ioctl(self.fd, ioctls.KVM_CREATE_VCPU, vcpu_id)
        return VcpuFd(fd, vcpu_id, self.kvm.vcpu_mmap_size)
