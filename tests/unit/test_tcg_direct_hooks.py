"""Port I/O and MMIO hooks registered with libunicorn directly (accel/tcg/direct_hooks.py):
C functions (hook_trampolines.c) where the compiled group is built, ctypes callbacks
otherwise; each test runs both ways where it can."""

from __future__ import annotations

import pytest

U = pytest.importorskip("unicorn")
import unicorn.x86_const as X  # noqa: E402

from pyvmm.accel.tcg import direct_hooks  # noqa: E402
from pyvmm.bus.bus import MmioBus, PioBus  # noqa: E402
from pyvmm import compiled  # noqa: E402

CODE, MMIO = 0x1000, 0x100000


class RecordingPorts:
    """A device on the port bus: records every access (offsets from 0), fails on `fail_on`."""

    def __init__(self, seen, fail_on):
        self.seen, self.fail_on = seen, fail_on

    def read(self, offset, size):
        self.seen.append(("in", offset, size))
        return bytes([0x5A]) * size

    def write(self, offset, data):
        self.seen.append(("out", offset, len(data), int.from_bytes(data, "little")))
        if offset == self.fail_on:
            raise RuntimeError("device failed")


class RecordingRegisters:
    """A device on the MMIO bus: records every access (its bus addresses), answers reads."""

    def __init__(self, seen):
        self.seen = seen

    def read(self, offset, size):
        self.seen.append(("read", MMIO + offset, size))
        return (0x11223344).to_bytes(size, "little")

    def write(self, offset, data):
        self.seen.append(("write", MMIO + offset, len(data), int.from_bytes(data, "little")))


class Vcpu:
    """What guest_io.py serves for the running vCPU: its counters, port and MMIO buses, LAPIC
    (none here)."""

    def __init__(self, fail_on=None):
        self.seen, self.stats, self.lapic = [], {"port_io": 0, "mmio": 0}, None
        self.pio_bus, self.mmio_bus = PioBus(), MmioBus()
        self.ports = RecordingPorts(self.seen, fail_on)
        self.pio_bus.register(0, 0x400, self.ports)
        self.registers = RecordingRegisters(self.seen)
        self.mmio_bus.register(MMIO, 0x1000, self.registers)

    @property
    def fail_on(self):
        return self.ports.fail_on

    @fail_on.setter
    def fail_on(self, port):
        self.ports.fail_on = port


class Translator:
    def __init__(self, vcpu):
        self.current = vcpu


@pytest.fixture(params=["c", "ctypes"])
def kind(request):
    if request.param == "c" and not compiled.status()[0]:
        pytest.skip(f"no compiled build here ({compiled.status()[1]}): the C hooks are not built")
    return request.param


def engine(code: bytes, vcpu: Vcpu, kind: str):
    uc = U.Uc(U.UC_ARCH_X86, U.UC_MODE_64)
    uc.mem_map(CODE, 0x1000)
    uc.mem_write(CODE, code)
    hooks = direct_hooks.install(uc)
    assert hooks is not None, "this binding is the one direct_hooks.py is written against"
    assert (hooks.trampolines is not None) == compiled.status()[0]  # C wherever the group is built
    if kind == "ctypes":
        hooks.trampolines = None
    hooks.port_io(Translator(vcpu))
    hooks.mmio(MMIO, 0x1000, Translator(vcpu))
    return uc, hooks


def test_port_and_mmio_accesses_reach_the_running_vcpu_with_their_values(kind):
    vcpu = Vcpu()
    # mov $0x3f8,%dx; mov $0x41,%al; out %al,(%dx); in (%dx),%al; mov %al,%bl;
    # mov $0x100010,%ecx; mov (%rcx),%eax; movl $0xcafe,4(%rcx)
    code = bytes.fromhex("66baf803" "b041" "ee" "ec" "88c3" "b910001000" "8b01" "c74104feca0000")
    uc, _ = engine(code, vcpu, kind)
    uc.emu_start(CODE, CODE + len(code))
    assert vcpu.seen == [("out", 0x3F8, 1, 0x41), ("in", 0x3F8, 1), ("read", MMIO + 0x10, 4),
                         ("write", MMIO + 0x14, 4, 0xCAFE)]
    assert uc.reg_read(X.UC_X86_REG_BL) == 0x5A and uc.reg_read(X.UC_X86_REG_EAX) == 0x11223344
    assert vcpu.stats == {"port_io": 2, "mmio": 2}


def test_a_failing_handler_stops_the_slice_and_its_exception_comes_out_of_emu_start(kind):
    """As through the binding's guard: the exception is the slice's outcome, and the engine
    stops (here at the end of the translation block: a VM's engine stops between instructions,
    engine_state.py)."""
    vcpu = Vcpu(fail_on=0x80)
    # mov $0x80,%dx; out %al,(%dx); jmp . (a loop only a stop ends)
    code = bytes.fromhex("66ba8000" "ee" "ebfe")
    uc, _ = engine(code, vcpu, kind)
    with pytest.raises(RuntimeError, match="device failed"):
        uc.emu_start(CODE, CODE + len(code))
    assert vcpu.seen == [("out", 0x80, 1, 0)]
    vcpu.fail_on = None
    uc.emu_start(CODE, CODE + 5)  # the next slice starts clean: nothing left over
    assert vcpu.seen == [("out", 0x80, 1, 0)] * 2


def test_a_failing_read_stops_the_slice_with_its_exception(kind):
    vcpu = Vcpu()

    def broken(offset, size):
        raise ValueError("no such register")

    vcpu.registers.read = broken
    # mov $0x100010,%ecx; mov (%rcx),%eax; jmp .
    code = bytes.fromhex("b910001000" "8b01" "ebfe")
    uc, _ = engine(code, vcpu, kind)
    with pytest.raises(ValueError, match="no such register"):
        uc.emu_start(CODE, CODE + len(code))
    assert vcpu.stats["mmio"] == 1
