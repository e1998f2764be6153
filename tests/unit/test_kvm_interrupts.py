"""The KVM backend's GSI routing table and MSI vectors, against a fake VM fd (no /dev/kvm)."""

import errno
import os

import pytest

from pyvmm.accel.kvm.interrupts import (
    FIRST_MSI_GSI, GsiExhausted, GsiRoutingTable, KvmIoEventFds, KvmMsiRouter, default_routes,
)
from pyvmm.kvm import KvmError, KvmUnavailable, uapi
from pyvmm.kvm.vm import IrqchipRoute, MsiRoute

IOAPIC, MASTER, SLAVE = uapi.KVM_IRQCHIP_IOAPIC, uapi.KVM_IRQCHIP_PIC_MASTER, uapi.KVM_IRQCHIP_PIC_SLAVE


class FakeVmFd:
    """Records what KvmMsiRouter asks of KVM; answers capabilities from `caps`."""

    def __init__(self, caps=None):
        self.fd = 99
        self.caps = caps if caps is not None else {uapi.KVM_CAP_IRQ_ROUTING: 4096, uapi.KVM_CAP_IRQFD: 1,
                                                   uapi.KVM_CAP_IOEVENTFD: 1}
        self.tables: list[list] = []
        self.irqfds: dict[int, int] = {}  # eventfd -> gsi
        self.calls: list[tuple] = []
        self.fail_routing = False

    def check_extension(self, cap):
        return self.caps.get(cap, 0)

    def set_gsi_routing(self, routes):
        if self.fail_routing:
            raise KvmError("KVM_SET_GSI_ROUTING", errno.EINVAL)
        self.tables.append(list(routes))
        self.calls.append(("routing",))

    def irqfd(self, eventfd, gsi, *, deassign=False):
        self.calls.append(("irqfd", gsi, deassign))
        if deassign:
            assert self.irqfds.pop(eventfd) == gsi
        else:
            assert eventfd not in self.irqfds, "KVM refuses an eventfd bound twice (EBUSY)"
            self.irqfds[eventfd] = gsi

    def ioeventfd(self, eventfd, address, length, *, pio=False, datamatch=None, deassign=False):
        self.calls.append(("ioeventfd", address, length, pio, datamatch, deassign))


def msi_routes(table):
    return {r.gsi: (r.address, r.data) for r in table if isinstance(r, MsiRoute)}


# --- the table ------------------------------------------------------------------------------

def test_default_routes_match_kvm_create_irqchip():
    routes = default_routes()
    assert len(routes) == 24 + 16
    for gsi in range(24):
        assert IrqchipRoute(gsi, IOAPIC, gsi) in routes
    for gsi in range(8):
        assert IrqchipRoute(gsi, MASTER, gsi) in routes
        assert IrqchipRoute(gsi + 8, SLAVE, gsi) in routes
    assert not any(r.irqchip != IOAPIC for r in routes if r.gsi >= 16)


def test_msi_gsis_are_allocated_above_the_ioapic_and_reused():
    table = GsiRoutingTable()
    a, b, c = (table.allocate(0xFEE00000, 0x40 + i) for i in range(3))
    assert (a, b, c) == (FIRST_MSI_GSI, FIRST_MSI_GSI + 1, FIRST_MSI_GSI + 2) == (24, 25, 26)
    table.free(b)
    assert table.allocate() == 25  # the lowest free GSI again
    routes = table.routes()
    assert routes[:40] == default_routes()  # defaults always first and whole
    assert msi_routes(routes) == {24: (0xFEE00000, 0x40), 25: (0, 0), 26: (0xFEE00000, 0x42)}


def test_update_and_free_change_only_their_route():
    table = GsiRoutingTable()
    gsi = table.allocate(0xFEE00000, 0x41)
    other = table.allocate(0xFEE01000, 0x42)
    assert table.update(gsi, 0xFEE00000, 0x41) is False  # unchanged: no need to tell KVM
    assert table.update(gsi, 0xFEE02000, 0x51) is True
    assert msi_routes(table.routes()) == {gsi: (0xFEE02000, 0x51), other: (0xFEE01000, 0x42)}
    table.free(gsi)
    assert msi_routes(table.routes()) == {other: (0xFEE01000, 0x42)}
    with pytest.raises(KeyError):
        table.free(gsi)
    with pytest.raises(KeyError):
        table.update(gsi, 0, 0)


def test_exhaustion_is_a_one_line_user_error():
    table = GsiRoutingTable(max_routes=42)  # 40 defaults + 2
    table.allocate()
    table.allocate()
    with pytest.raises(GsiExhausted, match="no GSI left"):
        table.allocate()


def test_out_of_range_messages_are_refused():
    table = GsiRoutingTable()
    with pytest.raises(ValueError, match="out of range"):
        table.allocate(1 << 64, 0)
    gsi = table.allocate()
    with pytest.raises(ValueError, match="out of range"):
        table.update(gsi, 0, 1 << 32)


# --- vectors on the router --------------------------------------------------------------------

def test_first_vector_installs_defaults_plus_its_route():
    vm = FakeVmFd()
    router = KvmMsiRouter(vm)
    vector = router.vector()
    try:
        assert vector.gsi == 24 and vector.eventfd is not None
        assert vm.tables[-1][:40] == default_routes()
        assert msi_routes(vm.tables[-1]) == {24: (0, 0)}
        assert vm.irqfds == {}  # masked until configured
    finally:
        router.close()


def test_configure_routes_the_message_and_binds_the_irqfd_only_while_unmasked():
    vm = FakeVmFd()
    router = KvmMsiRouter(vm)
    vector = router.vector()
    try:
        vector.configure(0xFEE01000, 0x4041, masked=False)
        assert msi_routes(vm.tables[-1]) == {24: (0xFEE01000, 0x4041)}
        assert vm.irqfds == {vector.eventfd: 24}
        # the route is in place before the irqfd can inject through it
        assert vm.calls[-2:] == [("routing",), ("irqfd", 24, False)]

        pushes = len(vm.tables)
        vector.configure(0xFEE01000, 0x4041, masked=True)
        assert vm.irqfds == {} and len(vm.tables) == pushes  # mask: unbind, no routing change
        vector.configure(0xFEE00000, 0x51, masked=True)  # reprogrammed while masked
        assert msi_routes(vm.tables[-1]) == {24: (0xFEE00000, 0x51)} and vm.irqfds == {}
        vector.configure(0xFEE00000, 0x51, masked=False)
        assert vm.irqfds == {vector.eventfd: 24} and len(vm.tables) == pushes + 1
    finally:
        router.close()


def test_trigger_writes_the_eventfd_only_when_unmasked():
    vm = FakeVmFd()
    router = KvmMsiRouter(vm)
    vector = router.vector()
    try:
        vector.trigger()
        with pytest.raises(BlockingIOError):
            os.eventfd_read(vector.eventfd)
        vector.configure(0xFEE00000, 0x41, masked=False)
        vector.trigger()
        vector.trigger()
        assert os.eventfd_read(vector.eventfd) == 2  # KVM would have consumed these
    finally:
        router.close()


def test_close_unbinds_removes_the_route_and_frees_the_gsi():
    vm = FakeVmFd()
    router = KvmMsiRouter(vm)
    first, second = router.vector(), router.vector()
    first.configure(0xFEE00000, 0x41, masked=False)
    second.configure(0xFEE00000, 0x42, masked=False)
    fd = first.eventfd
    first.close()
    assert first.eventfd is None and fd not in vm.irqfds
    assert msi_routes(vm.tables[-1]) == {25: (0xFEE00000, 0x42)}
    first.trigger()  # closed: a no-op, not a write to a stale fd
    first.close()  # twice is harmless
    assert router.vector().gsi == 24
    router.close()
    assert second.eventfd is None


def test_a_refused_routing_update_keeps_the_old_message():
    vm = FakeVmFd()
    router = KvmMsiRouter(vm)
    vector = router.vector()
    try:
        vector.configure(0xFEE00000, 0x41, masked=False)
        vm.fail_routing = True
        with pytest.raises(KvmError, match="KVM_SET_GSI_ROUTING failed"):
            vector.configure(0xFEE00000, 0x99, masked=False)
        assert vector.message == (0xFEE00000, 0x41)
    finally:
        router.close()


@pytest.mark.parametrize("missing", [uapi.KVM_CAP_IRQ_ROUTING, uapi.KVM_CAP_IRQFD])
def test_missing_capability_is_refused_in_one_line(missing):
    vm = FakeVmFd()
    del vm.caps[missing]
    with pytest.raises(KvmUnavailable, match=r"^this host's KVM lacks KVM_CAP_IRQ(_ROUTING|FD), which MSI"):
        KvmMsiRouter(vm)


# --- ioeventfds -------------------------------------------------------------------------------

def test_ioeventfd_add_and_remove():
    vm = FakeVmFd()
    fds = KvmIoEventFds(vm)
    fd = fds.add(0xD0000000, 4, datamatch=7)
    assert os.get_blocking(fd) is False and os.get_inheritable(fd) is False
    assert vm.calls[-1] == ("ioeventfd", 0xD0000000, 4, False, 7, False)
    with pytest.raises(ValueError, match="no ioeventfd"):
        fds.remove(fd, 0xD0000000, 4, datamatch=8)
    fds.remove(fd, 0xD0000000, 4, datamatch=7)
    assert vm.calls[-1] == ("ioeventfd", 0xD0000000, 4, False, 7, True)
    with pytest.raises(OSError):
        os.fstat(fd)  # closed


def test_a_callers_eventfd_is_registered_but_never_closed():
    """A vhost-user back-end's kick fd: KVM signals it, the device keeps owning it."""
    vm = FakeVmFd()
    fds = KvmIoEventFds(vm)
    own = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        assert fds.add(0xD0000050, 4, datamatch=0, eventfd=own) == own
        fds.remove(own, 0xD0000050, 4, datamatch=0)
        assert vm.calls[-1] == ("ioeventfd", 0xD0000050, 4, False, 0, True)
        os.fstat(own)  # still open
        fds.add(0xD0000050, 4, datamatch=0, eventfd=own)
        fds.close()
        os.fstat(own)
    finally:
        os.close(own)


@pytest.mark.parametrize("args,kwargs,message", [
    ((0x500, 3), {"pio": True}, "length 3"),
    ((0x500, 0), {"pio": True}, "length 0"),
    ((0xD0000000, 0), {"datamatch": 1}, "length 0"),
    ((0xFFFF, 2), {"pio": True}, "outside the port space"),
    ((0xD0000000, 1), {"datamatch": 0x100}, "does not fit in 1 bytes"),
])
def test_ioeventfd_bad_arguments(args, kwargs, message):
    fds = KvmIoEventFds(FakeVmFd())
    with pytest.raises(ValueError, match=message):
        fds.add(*args, **kwargs)


def test_ioeventfd_needs_the_capability():
    vm = FakeVmFd()
    del vm.caps[uapi.KVM_CAP_IOEVENTFD]
    with pytest.raises(KvmUnavailable, match="KVM_CAP_IOEVENTFD"):
        KvmIoEventFds(vm).add(0x500, 2, pio=True)
