"""Device work served inside the running slice (TcgAccelerator.serve_device_work).

A register write of the guest (a virtio kick) reaches a device on the thread running the guest;
the accelerator runs the device's work right there, drops the code translated from guest RAM the
device wrote before the guest runs on, within the same slice, and keeps the device's `after`
for the slice's end: the guest calls a function, kicks a device that rewrites the function (as
a disk read into a page the guest then executes), and calls it again.
"""


from __future__ import annotations

import pytest

pytest.importorskip("unicorn")
import unicorn.x86_const as X  # noqa: E402

from pyvmm.accel.exits import Hlt, Interrupted  # noqa: E402
from pyvmm.accel.tcg.accelerator import KICKS_SETTING, MAX_DMA_RUNS, TcgAccelerator  # noqa: E402
from pyvmm.accel.tcg.vcpu import TcgVcpu  # noqa: E402
from pyvmm.arch.x86_64 import layout  # noqa: E402
from pyvmm.arch.x86_64.boot_tables import long_mode_state  # noqa: E402

CODE = 0x20_0000                  # identity-mapped by the boot tables
FUNCTION = CODE + 0x1000          # another 4 KiB page: the device rewrites only this one
KICK = layout.LOW_RAM_END         # a register in the 32-bit MMIO hole
STACK_TOP = 0x30_0000


def _call(target: int, at: int) -> bytes:
    return b"\xe8" + (target - (at + 5)).to_bytes(4, "little", signed=True)


def _guest(kicks: int = 1) -> bytes:
    """call FUNCTION; mov ebx, eax; mov ecx, KICK; (mov dword [rcx], 1) x kicks; call FUNCTION; hlt"""
    code = _call(FUNCTION, CODE)
    code += b"\x89\xc3"
    code += b"\xb9" + KICK.to_bytes(4, "little") + (b"\xc7\x01" + (1).to_bytes(4, "little")) * kicks
    code += _call(FUNCTION, CODE + len(code))
    return code + b"\xf4"


def _returns(value: int) -> bytes:
    return b"\xb8" + value.to_bytes(4, "little") + b"\xc3"  # mov eax, value; ret


class Kickable:
    """A device whose kick asks the accelerator to serve it in place; its work rewrites FUNCTION."""

    def __init__(self, accel: TcgAccelerator, memory) -> None:
        self.accel, self.memory = accel, memory
        self.served: list[bool] = []
        self.busy = False
        self.finished = 0
        self.end_slice = False

    def read(self, offset: int, size: int) -> bytes:
        return bytes(size)

    def write(self, offset: int, data: bytes) -> None:
        self.served.append(self.accel.serve_device_work(self._work, self.finish))
        if self.end_slice:
            self.accel.end_running_slice()

    def finish(self) -> None:
        self.finished += 1

    def _work(self) -> bool:
        if self.busy:
            return False
        code = _returns(2)
        self.memory.write(FUNCTION, code)  # through pyvmm's mapping, as device DMA ...
        self.memory.on_device_writes([(FUNCTION, len(code))])  # ... which a virtqueue's push reports
        return True


@pytest.fixture
def machine(translator):
    memory = translator.memory
    accel = TcgAccelerator()
    accel.map_memory(memory)  # device writes note their pages
    accel._translator = translator
    device = Kickable(accel, memory)
    translator.dispatch.mmio_bus.register(KICK, 0x1000, device, "kickable")
    cpu = TcgVcpu(0, translator, cpuid_table=None)
    cpu.set_state(long_mode_state(memory, CODE))
    yield cpu, memory, device
    cpu.close()


def _run(cpu, memory, code: bytes, function: bytes = _returns(1)) -> tuple[int, int]:
    memory.write(CODE, code)
    memory.write(FUNCTION, function)
    cpu.translator.activate(cpu)
    cpu.regs.write(X.UC_X86_REG_RIP, CODE)
    cpu.regs.write(X.UC_X86_REG_RSP, STACK_TOP)
    for _ in range(1000):  # (a loaded host can end a slice before the guest gets far)
        exit_ = cpu.run()
        if not isinstance(exit_, Interrupted):
            break
    assert isinstance(exit_, Hlt)
    return cpu.regs.read(X.UC_X86_REG_RBX), cpu.regs.read(X.UC_X86_REG_RAX)


def test_work_served_in_the_slice_drops_the_code_it_rewrote(machine):
    cpu, memory, device = machine
    # the first call ran the translated FUNCTION; the second runs what the device wrote there
    assert _run(cpu, memory, _guest()) == (1, 2)
    assert device.served == [True]
    assert cpu.stats["kicks_served"] == 1


def test_what_the_work_leaves_for_the_slices_end_runs_once_there(machine):
    cpu, memory, device = machine
    assert _run(cpu, memory, _guest(kicks=3)) == (1, 2)
    assert device.served == [True] * 3 and device.finished == 0  # (the scheduler's loop runs it)
    device.accel._finish_slice_work()
    device.accel._finish_slice_work()
    assert device.finished == 1


def test_work_that_finds_its_device_busy_is_not_counted_nor_finished(machine):
    cpu, memory, device = machine
    device.busy = True
    assert _run(cpu, memory, _guest()) == (1, 1)
    assert device.served == [False]
    assert cpu.stats["kicks_served"] == 0
    device.accel._finish_slice_work()
    assert device.finished == 0


@pytest.mark.parametrize("end_slice", [False, True])
def test_work_that_asks_for_it_ends_the_slice_after_the_write(machine, end_slice):
    """The slice ends where the block with the kick ends (the slice timer's stop), not at the HLT
    that follows: a slice of a minute would otherwise end there as a HLT."""
    cpu, memory, device = machine
    device.end_slice = end_slice
    memory.write(CODE, b"\xb9" + KICK.to_bytes(4, "little") + b"\xc7\x01" + (1).to_bytes(4, "little") + b"\xf4")
    memory.write(FUNCTION, _returns(1))
    cpu.translator.activate(cpu)
    cpu.regs.write(X.UC_X86_REG_RIP, CODE)
    cpu.regs.write(X.UC_X86_REG_RSP, STACK_TOP)
    exit_ = cpu.run(60)
    assert device.served == [True]
    assert isinstance(exit_, Interrupted if end_slice else Hlt)
    assert cpu.stats["slices_ended_by_kicks"] == end_slice


def test_no_work_is_served_off_the_vcpu_thread(machine):
    """From another thread (no vCPU running there) the caller hands the work to the I/O thread."""
    _, _, device = machine
    ran = []
    assert device.accel.serve_device_work(lambda: ran.append(1) or True, device.finish) is False
    assert ran == []


def test_the_setting_sends_every_kick_to_the_io_thread(monkeypatch, request):
    monkeypatch.setenv(KICKS_SETTING, "io-thread")
    cpu, memory, device = request.getfixturevalue("machine")  # (built with the setting in place)
    assert _run(cpu, memory, _guest()) == (1, 1)
    assert device.served == [False]



def test_device_writes_noted_while_no_vcpu_runs_stay_bounded_and_drop_everything(machine):
    """(A long pause with a device writing: the list would grow with every request.)"""
    cpu, memory, device = machine
    accel = device.accel
    assert _run(cpu, memory, _guest(kicks=0)) == (1, 1)  # FUNCTION translated
    accel._note_device_writes([(STACK_TOP, 8)])
    accel._drop_stale_code()
    # rewritten behind the translator's back, not noted: its stale translation runs
    assert _run(cpu, memory, _guest(kicks=0), function=_returns(3)) == (1, 1)
    for _ in range(MAX_DMA_RUNS // 1024 + 1):
        accel._note_device_writes([(STACK_TOP, 8)] * 1024)
    assert len(accel._dma_writes) <= MAX_DMA_RUNS
    accel._drop_stale_code()  # (what the scheduler does before the next slice)
    assert _run(cpu, memory, _guest(kicks=0), function=_returns(3)) == (3, 3)
