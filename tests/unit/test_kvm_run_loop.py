"""The KVM run loop's decoding of kvm_run (accel/kvm/vcpu.py) and KVM_RUN's error path
(kvm/vcpu.py), without KVM: a VcpuFd over a memfd, KVM_RUN replaced by a script that writes
each exit into the page the way KVM does. Every access must reach the device exactly as the
shared ExitDispatcher would serve it, and every answer land where KVM reads it back. Each
case runs both hot loops: native_run.c's (where the compiled group is built) and
io_exits.py's."""

from __future__ import annotations

import ctypes
import errno
import os
import threading

import pytest

from pyvmm.accel.dispatch import ExitDispatcher
from pyvmm.accel.kvm import vcpu as accel_vcpu
from pyvmm.accel.kvm.vcpu import KvmVcpu
from pyvmm.bus import MmioBus, PioBus
from pyvmm.kvm import KvmError, uapi
from pyvmm.kvm import run as kvm_run
from pyvmm.kvm import vcpu as kvm_vcpu

PAGE_SIZE = 4096
DATA_OFFSET = PAGE_SIZE  # where this fake KVM puts port-I/O data (real KVM: the next page)


class Recorder:
    def __init__(self, tag: int) -> None:
        self.tag, self.reads, self.writes = tag, [], []

    def read(self, offset, size):
        self.reads.append((offset, size))
        return bytes((self.tag + i) & 0xFF for i in range(size))

    def write(self, offset, data):
        self.writes.append((offset, bytes(data)))


class Services:
    symbols = None
    pause_requested = False

    def __init__(self) -> None:
        self.stop_requested = threading.Event()
        self.ended: list[object] = []

    def pause_point(self) -> None:
        pass

    def guest_exit(self, vcpu, exit_) -> None:
        self.ended.append(exit_)
        self.stop_requested.set()


@pytest.fixture(autouse=True, params=["native", "python"])
def hot_loop(request, monkeypatch):
    """Which loop serves the single accesses: native_run.c's, or io_exits.py's."""
    if request.param == "native" and not kvm_run.NATIVE_IO_EXITS:
        pytest.skip("native_run.c is not built here (scripts/compile; PYVMM_COMPILED=0)")
    monkeypatch.setattr(accel_vcpu, "NATIVE_IO_EXITS", request.param == "native")
    return request.param


@pytest.fixture
def vcpu_fd():
    fd = os.memfd_create("kvm-run")
    os.ftruncate(fd, 3 * PAGE_SIZE)
    vcpu_fd = kvm_vcpu.VcpuFd(fd, 0, 3 * PAGE_SIZE)
    yield vcpu_fd
    vcpu_fd.close()


def io_exit(direction, port, size, count, data=b""):
    def write(run, page):
        run.exit_reason = uapi.KVM_EXIT_IO
        io = run.exit.io
        io.direction, io.size, io.port, io.count, io.data_offset = direction, size, port, count, DATA_OFFSET
        page[DATA_OFFSET:DATA_OFFSET + len(data)] = data
    return write


def mmio_exit(address, length, data=None):
    def write(run, page):
        run.exit_reason = uapi.KVM_EXIT_MMIO
        mmio = run.exit.mmio
        mmio.phys_addr, mmio.len, mmio.is_write = address, length, data is not None
        mmio.data[:] = list((data or b"").ljust(8, b"\xee"))
    return write


def run_script(monkeypatch, vcpu_fd, script):
    """Run the loop over `script` (exit writers) with recording devices on both buses; returns
    them, what the page held after each exit was served (the answers KVM would read back), and
    the buses."""
    pio, mmio = PioBus(), MmioBus()
    ports, registers = Recorder(0x10), Recorder(0x80)
    pio.register(0x60, 8, ports)
    mmio.register(0xFED0_0000, 0x100, registers)
    after: list[bytes] = []
    play(monkeypatch, vcpu_fd, script, pio, mmio, after)
    return ports, registers, after, pio, mmio


def play(monkeypatch, vcpu_fd, script, pio, mmio, after: list[bytes] | None = None) -> None:
    """Run the loop with KVM_RUN playing `script`, then a HLT after a stop; `after` receives
    the page after each exit of the script was served."""
    services = Services()
    page, run = vcpu_fd.page, vcpu_fd.run_struct
    steps = iter(script)

    def fake_kvm_run(fd, request, arg):
        if after is not None and len(after) < len(script) and run.exit_reason:
            after.append(bytes(page[:2 * PAGE_SIZE]))
        step = next(steps, None)
        if step is None:
            services.stop_requested.set()
            run.exit_reason = uapi.KVM_EXIT_HLT
        else:
            step(run, page)
        return 0

    monkeypatch.setattr(kvm_run, "_run_ioctl", fake_kvm_run)
    KvmVcpu(None, vcpu_fd, 0).run_loop(services, ExitDispatcher(pio, mmio, services))


def test_single_port_accesses_reach_the_device_and_answer_in_the_page(monkeypatch, vcpu_fd):
    script = [io_exit(uapi.KVM_EXIT_IO_OUT, 0x61, 1, 1, b"\x42"),
              io_exit(uapi.KVM_EXIT_IO_OUT, 0x62, 4, 1, b"\x01\x02\x03\x04"),
              io_exit(uapi.KVM_EXIT_IO_IN, 0x63, 2, 1),
              io_exit(uapi.KVM_EXIT_IO_IN, 0x3F8, 1, 1)]  # no device: all-ones
    ports, _, after, pio, _ = run_script(monkeypatch, vcpu_fd, script)
    assert ports.writes == [(1, b"\x42"), (2, b"\x01\x02\x03\x04")]
    assert ports.reads == [(3, 2)]
    assert after[2][DATA_OFFSET:DATA_OFFSET + 2] == b"\x10\x11"
    assert after[3][DATA_OFFSET:DATA_OFFSET + 1] == b"\xff"
    assert pio.unclaimed_accesses == 1


def test_string_port_io_is_served_item_by_item(monkeypatch, vcpu_fd):
    script = [io_exit(uapi.KVM_EXIT_IO_OUT, 0x64, 2, 3, b"\xa1\xa2\xb1\xb2\xc1\xc2"),
              io_exit(uapi.KVM_EXIT_IO_IN, 0x65, 1, 3)]
    ports, _, after, _, _ = run_script(monkeypatch, vcpu_fd, script)
    assert ports.writes == [(4, b"\xa1\xa2"), (4, b"\xb1\xb2"), (4, b"\xc1\xc2")]
    assert ports.reads == [(5, 1)] * 3
    assert after[1][DATA_OFFSET:DATA_OFFSET + 3] == b"\x10\x10\x10"


def test_mmio_accesses_reach_the_device_and_reads_answer_in_kvm_run(monkeypatch, vcpu_fd):
    data_at = uapi.kvm_run.exit.offset + uapi.kvm_run_mmio.data.offset
    script = [mmio_exit(0xFED0_0010, 4, b"\x0a\x0b\x0c\x0d"),
              mmio_exit(0xFED0_0020, 8, b"12345678"),
              mmio_exit(0xFED0_0030, 2),
              mmio_exit(0xD000_0000, 4)]  # no device: all-ones
    _, registers, after, _, mmio = run_script(monkeypatch, vcpu_fd, script)
    assert registers.writes == [(0x10, b"\x0a\x0b\x0c\x0d"), (0x20, b"12345678")]
    assert registers.reads == [(0x30, 2)]
    assert after[2][data_at:data_at + 2] == b"\x80\x81"
    assert after[3][data_at:data_at + 4] == b"\xff" * 4
    assert mmio.unclaimed_accesses == 1


def test_each_exit_is_counted_by_reason(monkeypatch, vcpu_fd):
    script = [io_exit(uapi.KVM_EXIT_IO_OUT, 0x61, 1, 1, b"\x00"), mmio_exit(0xFED0_0000, 4, b"\x00" * 4)]
    run_script(monkeypatch, vcpu_fd, script)
    counts = vcpu_fd.exit_counts
    assert (counts[uapi.KVM_EXIT_IO], counts[uapi.KVM_EXIT_MMIO], counts[uapi.KVM_EXIT_HLT]) == (1, 1, 1)


def test_kvm_run_is_issued_without_ctypes_where_the_group_is_built():
    from pyvmm import compiled

    built = compiled.status()[0]
    assert (getattr(kvm_run._run_ioctl, "__module__", None) == "pyvmm.kvm.native_run") == built
    assert kvm_run.NATIVE_IO_EXITS == built


def test_the_native_loop_reads_kvm_run_where_uapi_says():
    if not kvm_run.NATIVE_IO_EXITS:
        pytest.skip("native_run.c is not built here")
    from pyvmm.kvm import ioctls, native_run

    assert native_run.KVM_RUN == ioctls.KVM_RUN
    assert native_run.KVM_RUN_EXIT_OFFSET == uapi.kvm_run.exit.offset


def test_a_failed_kvm_run_names_its_errno(vcpu_fd):
    """The real ioctl on a memfd fails (not a vCPU): the error read after it is the one raised
    (through native_run.c where the group is built, else libc's through ctypes)."""
    with pytest.raises(KvmError) as failure:
        vcpu_fd.run()
    assert failure.value.errno == errno.ENOTTY
    assert "KVM_RUN" in str(failure.value)


def test_eagain_and_eintr_mean_interrupted(monkeypatch, vcpu_fd):
    """A kick (EINTR, or EAGAIN from immediate_exit): a failing libc call stands for KVM_RUN."""
    libc = ctypes.CDLL(None)
    reader, writer = os.pipe()
    os.set_blocking(reader, False)
    buffer = ctypes.create_string_buffer(1)
    try:
        monkeypatch.setattr(kvm_run, "_run_ioctl", lambda fd, request, arg: libc.read(reader, buffer, 1))
        assert vcpu_fd.run() == kvm_run.RUN_INTERRUPTED  # EAGAIN: the pipe is empty
        assert sum(vcpu_fd.exit_counts) == 0
    finally:
        os.close(reader)
        os.close(writer)


def test_a_failed_kvm_run_in_the_loop_names_its_errno(vcpu_fd):
    """The loop's KVM_RUN is the real ioctl here (on a memfd: ENOTTY): a KvmError, either loop."""
    with pytest.raises(KvmError) as failure:
        KvmVcpu(None, vcpu_fd, 0).run_loop(Services(), ExitDispatcher(PioBus(), MmioBus(), Services()))
    assert failure.value.errno == errno.ENOTTY


class Failing:
    def read(self, offset, size):
        return b"\x01\x02\x03\x04\x05\x06\x07\x08\x09"  # more than any access asks for

    def write(self, offset, data):
        raise OSError(errno.EPIPE, "the device's host side is gone")


def _served(monkeypatch, vcpu_fd, device, script, bus_kind="pio"):
    pio, mmio = PioBus(), MmioBus()
    (pio if bus_kind == "pio" else mmio).register(0x60 if bus_kind == "pio" else 0xFED0_0000, 0x100, device)
    play(monkeypatch, vcpu_fd, script, pio, mmio)
    return vcpu_fd.page


def test_a_devices_error_comes_out_of_the_loop_as_it_is(monkeypatch, vcpu_fd):
    with pytest.raises(OSError) as failure:
        _served(monkeypatch, vcpu_fd, Failing(), [io_exit(uapi.KVM_EXIT_IO_OUT, 0x61, 1, 1, b"\x00")])
    assert type(failure.value) is BrokenPipeError and failure.value.errno == errno.EPIPE  # not a KvmError


def test_a_long_answer_fills_only_the_access(monkeypatch, vcpu_fd):
    page = _served(monkeypatch, vcpu_fd, Failing(), [io_exit(uapi.KVM_EXIT_IO_IN, 0x61, 2, 1, b"\xaa" * 8)])
    assert page[DATA_OFFSET:DATA_OFFSET + 8] == b"\x01\x02" + b"\xaa" * 6
    data_at = uapi.kvm_run.exit.offset + uapi.kvm_run_mmio.data.offset
    page = _served(monkeypatch, vcpu_fd, Failing(), [mmio_exit(0xFED0_0000, 4)], bus_kind="mmio")
    assert page[data_at:data_at + 8] == b"\x01\x02\x03\x04\x05\x06\x07\x08"  # kvm_run's 8 bytes, no more
    assert page[data_at + 8:data_at + 9] != b"\x09"


def test_port_data_outside_the_mapping_is_an_error_not_a_stray_access(monkeypatch, vcpu_fd, hot_loop):
    """A read whose data slot runs past the kvm_run mapping: native_run.c refuses it by name,
    io_exits.py's slice assignment does not fit (mmap's IndexError); neither writes there."""
    def beyond(run, page):
        io_exit(uapi.KVM_EXIT_IO_IN, 0x61, 4, 1)(run, page)
        run.exit.io.data_offset = 3 * PAGE_SIZE - 2

    expected = (ValueError, "outside the kvm_run mapping") if hot_loop == "native" else (IndexError, "size")
    with pytest.raises(expected[0], match=expected[1]):
        _served(monkeypatch, vcpu_fd, Failing(), [beyond])
    assert vcpu_fd.page[3 * PAGE_SIZE - 2:] == bytes(2)


def test_a_stop_kicks_the_vcpu_out_of_a_stream_of_port_io(monkeypatch, vcpu_fd):
    """The I/O loop never looks at stop_requested: the stop's kick (immediate_exit, then KVM_RUN
    fails with EAGAIN) ends it, at the exit after the access that stopped the VM."""
    libc = ctypes.CDLL(None)
    reader, writer = os.pipe()
    os.set_blocking(reader, False)
    buffer = ctypes.create_string_buffer(1)
    services = Services()
    pio = PioBus()
    vcpu = KvmVcpu(None, vcpu_fd, 0)

    class Stopper:
        writes = 0

        def read(self, offset, size):
            return b"\x00" * size

        def write(self, offset, data):
            self.writes += 1
            if self.writes == 5:
                services.stop_requested.set()
                vcpu.kick()

    stopper = Stopper()
    pio.register(0x61, 1, stopper)
    run, page = vcpu_fd.run_struct, vcpu_fd.page
    entries = []

    def fake_kvm_run(fd, request, arg):
        entries.append(run.immediate_exit)
        if run.immediate_exit:
            return libc.read(reader, buffer, 1)  # EAGAIN, as KVM_RUN with immediate_exit set
        io_exit(uapi.KVM_EXIT_IO_OUT, 0x61, 1, 1, b"\x01")(run, page)
        return 0

    monkeypatch.setattr(kvm_run, "_run_ioctl", fake_kvm_run)
    try:
        vcpu.run_loop(services, ExitDispatcher(pio, MmioBus(), services))
    finally:
        os.close(reader)
        os.close(writer)
    assert stopper.writes == 5
    assert entries == [0] * 5 + [1]
