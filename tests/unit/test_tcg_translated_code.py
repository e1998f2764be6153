"""Code a device rewrites is translated again, and dropping the old translation leaves the guest alone.

The guest runs code from a physical page mapped at a different virtual address, with
nothing mapped at the virtual address equal to that physical one (Linux's case: RAM
is reached through the direct map). A device then rewrites the page through pyvmm's
mapping, and the vCPU's translated code for that physical range is dropped, as the
accelerator does between slices.
"""

from __future__ import annotations

import pytest

pytest.importorskip("unicorn")
import unicorn.x86_const as X  # noqa: E402

from pyvmm.accel.tcg.private_state import context_offsets  # noqa: E402
from pyvmm.accel.tcg.translated_code import physical_invalidation  # noqa: E402
from pyvmm.accel.tcg.vcpu import TcgVcpu  # noqa: E402
from pyvmm.arch.x86_64 import layout  # noqa: E402
from pyvmm.arch.x86_64.boot_tables import long_mode_state  # noqa: E402
from pyvmm.bus.bus import MmioBus, PioBus  # noqa: E402
from pyvmm.kvm.exits import Hlt  # noqa: E402
from pyvmm.memory.guest_memory import GuestMemory, RegionSpec  # noqa: E402

CODE_PHYSICAL = 0x20_0000         # a 2 MiB page of RAM ...
CODE_VIRTUAL = 0x4000_0000        # ... that the guest reaches here only
HUGE_PAGE_FLAGS = 0x87            # present, writable, user, 2 MiB page
CR2_BEFORE = 0xDEAD_B000


def _mov_eax_hlt(value: int) -> bytes:
    return b"\xb8" + value.to_bytes(4, "little") + b"\xf4"


@pytest.fixture
def vcpu():
    memory = GuestMemory.from_specs([RegionSpec(0, 4 << 20)])
    cpu = TcgVcpu(0, memory, PioBus(), MmioBus(), context_offsets(), cpuid_table=None)
    state = long_mode_state(memory, CODE_VIRTUAL)
    # boot tables identity-map 4 GiB with 2 MiB pages: unmap virtual == CODE_PHYSICAL and
    # point CODE_VIRTUAL at it instead
    memory.write_u64(layout.PAGE_DIRECTORIES + 8 * (CODE_PHYSICAL >> 21), 0)
    memory.write_u64(layout.PAGE_DIRECTORIES + 0x1000 * (CODE_VIRTUAL >> 30), CODE_PHYSICAL | HUGE_PAGE_FLAGS)
    cpu.set_state(state)
    yield cpu, memory
    cpu.close()
    memory.close()


def _run_from_start(cpu) -> int:
    cpu.regs.write(X.UC_X86_REG_RIP, CODE_VIRTUAL)
    assert isinstance(cpu.run(), Hlt)
    return cpu.regs.read(X.UC_X86_REG_RAX)


def test_the_installed_unicorn_drops_code_by_physical_address():
    assert physical_invalidation() is not None  # else every device write flushes all translated code


def test_code_rewritten_by_a_device_runs_after_its_translation_is_dropped(vcpu):
    cpu, memory = vcpu
    memory.write(CODE_PHYSICAL, _mov_eax_hlt(1))
    assert _run_from_start(cpu) == 1
    memory.write(CODE_PHYSICAL, _mov_eax_hlt(2))  # behind the translator's back, like DMA
    assert _run_from_start(cpu) == 1  # the stale translation: what dropping it is for
    cpu.translated_code.drop(CODE_PHYSICAL, CODE_PHYSICAL + 0x1000)
    assert _run_from_start(cpu) == 2


def test_dropping_translated_code_leaves_cr2_alone(vcpu):
    """A page fault being delivered must keep its address: Unicorn's own virtual-address
    removal walked the page tables for the physical address and overwrote CR2."""
    cpu, memory = vcpu
    memory.write(CODE_PHYSICAL, _mov_eax_hlt(1))
    _run_from_start(cpu)
    cpu.set_cr2(CR2_BEFORE)
    cpu.translated_code.drop(CODE_PHYSICAL, CODE_PHYSICAL + 0x1000)
    assert cpu.regs.read(X.UC_X86_REG_CR2) == CR2_BEFORE


def test_dropping_code_of_pages_outside_ram_is_harmless(vcpu):
    cpu, memory = vcpu
    memory.write(CODE_PHYSICAL, _mov_eax_hlt(3))
    cpu.translated_code.drop(8 << 20, 9 << 20)
    assert _run_from_start(cpu) == 3
