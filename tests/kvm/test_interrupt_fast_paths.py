"""MSI vectors and ioeventfds through each CPU backend, with tiny guests.

msi.S reports each interrupt vector it takes on port 0x510; the test fires MSI vectors from
its own thread (as a device's I/O thread would) and reads the reports. On KVM the MSI goes
eventfd -> irqfd -> GSI route -> in-kernel LAPIC, with no Python on the way.
"""

from __future__ import annotations

import os
import pathlib
import queue
import select
import threading

import pytest

from pyvmm.accel.select import choose_accelerator
from pyvmm.builder import build_vm
from pyvmm.config import MachineConfig
from pyvmm.guests import build_source

GUESTS = pathlib.Path(__file__).parent / "guests"
REPORT_PORT, READY_PORT = 0x510, 0x514
LOAD = 0x100000


def msi_address(apic_id: int = 0) -> int:
    return 0xFEE00000 | apic_id << 12


class Recorder:
    """A PIO/MMIO device that queues every write's value."""

    def __init__(self) -> None:
        self.writes: queue.Queue[int] = queue.Queue()

    def read(self, offset: int, size: int) -> bytes:
        return bytes(size)

    def write(self, offset: int, data: bytes) -> None:
        self.writes.put(int.from_bytes(data, "little"))

    def next(self, timeout: float) -> int | None:
        try:
            return self.writes.get(timeout=timeout)
        except queue.Empty:
            return None


@pytest.fixture
def msi_vm(accel):
    yield from _msi_vm(accel)


@pytest.fixture
def kvm_msi_vm():
    """For what only KVM has (irqfds a back-end can write, KVM_SIGNAL_MSI)."""
    yield from _msi_vm("kvm")


def _msi_vm(accel):
    config = MachineConfig(kernel=str(build_source(GUESTS / "msi.S", 32)), memory=16 << 20)
    vm = build_vm(config, lambda data: None, accel=choose_accelerator(accel).create())
    reports, ready = Recorder(), Recorder()
    vm.pio_bus.register(REPORT_PORT, 4, reports, "msi-report")
    vm.pio_bus.register(READY_PORT, 4, ready, "msi-ready")
    vm.start()
    try:
        # Guest code at CPL0 is emulated on a nested KVM: give it time.
        assert ready.next(timeout=60) == 1, f"guest never got ready: {vm.outcome}"
        yield vm, reports
    finally:
        vm.close()


def fire(vector) -> None:
    """trigger() from another thread, as an I/O thread would."""
    thread = threading.Thread(target=vector.trigger)
    thread.start()
    thread.join()


def test_msi_vector_reaches_the_guest_with_its_vector(msi_vm, accel):
    vm, reports = msi_vm
    vector = vm.accel.msi_vector()
    assert (vector.eventfd is not None) == (accel == "kvm")
    vector.configure(msi_address(0), 0x61, masked=False)
    fire(vector)
    assert reports.next(timeout=30) == 0x61, vm.outcome

    vector.configure(msi_address(0), 0x72, masked=False)  # the guest rewrote its MSI-X entry
    fire(vector)
    assert reports.next(timeout=30) == 0x72, vm.outcome

    vector.configure(msi_address(0), 0x73, masked=True)
    fire(vector)
    assert reports.next(timeout=1) is None  # masked: nothing delivered

    vector.configure(msi_address(0), 0x73, masked=False)
    fire(vector)
    assert reports.next(timeout=30) == 0x73, vm.outcome

    vector.configure(msi_address(5), 0x74, masked=False)  # no LAPIC with APIC ID 5
    fire(vector)
    assert reports.next(timeout=1) is None
    vector.close()
    assert vm.outcome is None  # still running: no fault, no error


def test_two_vectors_keep_their_own_messages(msi_vm):
    vm, reports = msi_vm
    first, second = vm.accel.msi_vector(), vm.accel.msi_vector()
    first.configure(msi_address(0), 0x81, masked=False)
    second.configure(msi_address(0), 0x92, masked=False)
    fire(second)
    assert reports.next(timeout=30) == 0x92, vm.outcome
    first.close()  # the routing table shrinks; the other route stays
    fire(second)
    assert reports.next(timeout=30) == 0x92, vm.outcome
    second.close()


def test_an_external_eventfd_write_injects_without_python(kvm_msi_vm):
    vm, reports = kvm_msi_vm
    vector = vm.accel.msi_vector()
    vector.configure(msi_address(0), 0xA3, masked=False)
    os.eventfd_write(vector.eventfd, 1)  # what a vhost-user back-end does with its call fd
    assert reports.next(timeout=30) == 0xA3, vm.outcome
    # Written while masked: kept in the eventfd, delivered once on unmask (MSI-X pending bit).
    vector.configure(msi_address(0), 0xA4, masked=True)
    os.eventfd_write(vector.eventfd, 1)
    assert reports.next(timeout=1) is None
    vector.configure(msi_address(0), 0xA4, masked=False)
    assert reports.next(timeout=30) == 0xA4, vm.outcome
    vector.close()


def test_signal_msi_injects_one_message(kvm_msi_vm):
    vm, reports = kvm_msi_vm
    assert vm.accel.signal_msi(msi_address(0), 0x55) is True
    assert reports.next(timeout=30) == 0x55, vm.outcome


def test_legacy_gsis_still_reach_the_ioapic_after_msi_routing(msi_vm, accel):
    """KVM_SET_GSI_ROUTING replaces the table: the IOAPIC routes must survive it."""
    vm, reports = msi_vm
    vm.accel.msi_vector().configure(msi_address(0), 0x61, masked=True)  # installs the table on KVM
    program_ioapic_pin(vm, 20, vector=0xB5)
    line = vm.accel.irq_line(20)
    line.set_level(True)
    line.set_level(False)
    assert reports.next(timeout=30) == 0xB5, vm.outcome
    if accel == "kvm":  # and through an irqfd on a legacy GSI, as an INTx back-end would
        from pyvmm.accel.kvm.interrupts import new_eventfd

        program_ioapic_pin(vm, 21, vector=0xB6)
        fd = new_eventfd()
        try:
            vm.accel.vm_fd.irqfd(fd, 21)
            os.eventfd_write(fd, 1)
            assert reports.next(timeout=30) == 0xB6, vm.outcome
            vm.accel.vm_fd.irqfd(fd, 21, deassign=True)
        finally:
            os.close(fd)


def program_ioapic_pin(vm, pin: int, vector: int) -> None:
    """Edge-triggered, unmasked, physical destination APIC 0 -- as the guest's kernel would."""
    if vm.accel.name == "kvm":
        import ctypes

        from pyvmm.kvm import uapi

        chip = uapi.kvm_irqchip.from_buffer_copy(vm.accel.vm_fd.get_irqchip(uapi.KVM_IRQCHIP_IOAPIC))
        # struct kvm_ioapic_state: base_address u64, ioregsel u32, id u32, irr u32, pad u32, redirtbl[24] u64
        offset = ctypes.sizeof(chip) - 512 + 24 + 8 * pin
        raw = bytearray(bytes(chip))
        raw[offset:offset + 8] = vector.to_bytes(8, "little")
        vm.accel.vm_fd.set_irqchip(bytes(raw))
    else:
        ioapic = vm.accel.platform.ioapic
        ioapic.write(0x00, (0x10 + 2 * pin).to_bytes(4, "little"))
        ioapic.write(0x10, vector.to_bytes(4, "little"))
        ioapic.write(0x00, (0x11 + 2 * pin).to_bytes(4, "little"))
        ioapic.write(0x10, bytes(4))


# --- ioeventfd --------------------------------------------------------------------------------

NOTIFY_PORT, NOTIFY_MMIO = 0x520, 0xD0000000
# 32-bit protected mode at LOAD: out 1, 2, 2 to NOTIFY_PORT; movl $5 then $6 to NOTIFY_MMIO; debug exit 0.
IOEVENT_CODE = bytes.fromhex(
    "66ba2005"        # mov $0x520, %dx
    "b001" "ee"       # mov $1, %al; out %al, %dx
    "b002" "ee"       # mov $2, %al; out %al, %dx
    "ee"              # out %al, %dx
    "c705000000d005000000"    # movl $5, 0xd0000000
    "c705000000d006000000"    # movl $6, 0xd0000000
    "31c0" "e7f4"     # xor %eax, %eax; out %eax, $0xf4
    "f4"              # hlt
)


def test_ioeventfd_datamatch_and_mmio(tmp_path, accel):
    image = tmp_path / "ioevent.bin"
    image.write_bytes(IOEVENT_CODE)
    config = MachineConfig(kernel=str(image), flat_address=LOAD, memory=16 << 20)
    vm = build_vm(config, lambda data: None, accel=choose_accelerator(accel).create())
    port_bus, mmio_bus = Recorder(), Recorder()
    vm.pio_bus.register(NOTIFY_PORT, 1, port_bus, "notify-port")
    vm.mmio_bus.register(NOTIFY_MMIO, 4, mmio_bus, "notify-mmio")
    port_fd = vm.accel.add_ioeventfd(NOTIFY_PORT, 1, pio=True, datamatch=2)
    mmio_fd = vm.accel.add_ioeventfd(NOTIFY_MMIO, 4, datamatch=6)
    with vm:
        vm.start()
        outcome = vm.wait(60)
        assert outcome is not None and outcome.reason == "debug-exit", outcome
        bus_port = list(port_bus.writes.queue)
        bus_mmio = list(mmio_bus.writes.queue)
        if accel == "kvm":
            # matching writes signalled the eventfds in the kernel; only the others reached the bus
            assert (os.eventfd_read(port_fd), os.eventfd_read(mmio_fd)) == (2, 1)
            assert (bus_port, bus_mmio) == ([1], [5])
        else:
            assert port_fd is None and mmio_fd is None
            assert (bus_port, bus_mmio) == ([1, 2, 2], [5, 6])
    if port_fd is not None:  # the accelerator closed what was still registered
        with pytest.raises(OSError):
            os.fstat(port_fd)


def test_ioeventfd_wakes_a_waiting_io_thread(tmp_path):
    """The eventfd is pollable: an I/O thread blocked in select() wakes on the guest's write."""
    image = tmp_path / "ioevent.bin"
    image.write_bytes(IOEVENT_CODE)
    config = MachineConfig(kernel=str(image), flat_address=LOAD, memory=16 << 20)
    vm = build_vm(config, lambda data: None, accel=choose_accelerator("kvm").create())
    vm.pio_bus.register(NOTIFY_PORT, 1, Recorder(), "notify-port")
    vm.mmio_bus.register(NOTIFY_MMIO, 4, Recorder(), "notify-mmio")
    fd = vm.accel.add_ioeventfd(NOTIFY_PORT, 1, pio=True)  # any value
    woke: list[int] = []
    waiter = threading.Thread(target=lambda: woke.extend(select.select([fd], [], [], 60)[0]))
    waiter.start()
    vm.start()
    waiter.join()
    vm.wait(60)
    assert woke == [fd] and os.eventfd_read(fd) == 3
    vm.accel.remove_ioeventfd(fd, NOTIFY_PORT, 1, pio=True)
    with pytest.raises(OSError):
        os.fstat(fd)  # remove closed it
    vm.close()
