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

from pyvmm.accel.tcg.translated_code import physical_invalidation  # noqa: E402
from pyvmm.accel.tcg.vcpu import TcgVcpu  # noqa: E402
from pyvmm.arch.x86_64 import layout  # noqa: E402
from pyvmm.arch.x86_64.boot_tables import long_mode_state  # noqa: E402
from pyvmm.accel.exits import Hlt, Interrupted  # noqa: E402

CODE_PHYSICAL = 0x20_0000         # a 2 MiB page of RAM ...
CODE_VIRTUAL = 0x4000_0000        # ... that the guest reaches here only
HUGE_PAGE_FLAGS = 0x87            # present, writable, user, 2 MiB page
CR2_BEFORE = 0xDEAD_B000


def _mov_eax_hlt(value: int) -> bytes:
    return b"\xb8" + value.to_bytes(4, "little") + b"\xf4"


@pytest.fixture
def vcpu(translator):
    memory = translator.memory
    cpu = TcgVcpu(0, translator, cpuid_table=None)
    state = long_mode_state(memory, CODE_VIRTUAL)
    # boot tables identity-map 4 GiB with 2 MiB pages: unmap virtual == CODE_PHYSICAL and
    # point CODE_VIRTUAL at it instead
    memory.write_u64(layout.PAGE_DIRECTORIES + 8 * (CODE_PHYSICAL >> 21), 0)
    memory.write_u64(layout.PAGE_DIRECTORIES + 0x1000 * (CODE_VIRTUAL >> 30), CODE_PHYSICAL | HUGE_PAGE_FLAGS)
    cpu.set_state(state)
    yield cpu, memory
    cpu.close()


def _run_to_exit(cpu):
    """Run slices until one ends with an exit: a slice can end on its timer before two
    instructions ran when the host is loaded (the first slice also translates the code)."""
    for _ in range(1000):
        exit_ = cpu.run()
        if not isinstance(exit_, Interrupted):
            return exit_
    raise AssertionError("the guest never left its time slices")


def _run_from_start(cpu, offset: int = 0) -> int:
    cpu.translator.activate(cpu)
    cpu.regs.write(X.UC_X86_REG_RIP, CODE_VIRTUAL + offset)
    assert isinstance(_run_to_exit(cpu), Hlt)
    return cpu.regs.read(X.UC_X86_REG_RAX)


def test_the_installed_unicorn_drops_code_by_physical_address():
    assert physical_invalidation() is not None  # else every device write flushes all translated code


def test_code_rewritten_by_a_device_runs_after_its_translation_is_dropped(vcpu):
    cpu, memory = vcpu
    memory.write(CODE_PHYSICAL, _mov_eax_hlt(1))
    assert _run_from_start(cpu) == 1
    memory.write(CODE_PHYSICAL, _mov_eax_hlt(2))  # behind the translator's back, like DMA
    assert _run_from_start(cpu) == 1  # the stale translation: what dropping it is for
    cpu.translator.translated_code.drop(CODE_PHYSICAL, CODE_PHYSICAL + 0x1000)
    assert _run_from_start(cpu) == 2


def test_dropping_translated_code_leaves_cr2_alone(vcpu):
    """A page fault being delivered must keep its address: Unicorn's own virtual-address
    removal walked the page tables for the physical address and overwrote CR2."""
    cpu, memory = vcpu
    memory.write(CODE_PHYSICAL, _mov_eax_hlt(1))
    _run_from_start(cpu)
    cpu.set_cr2(CR2_BEFORE)
    cpu.translator.translated_code.drop(CODE_PHYSICAL, CODE_PHYSICAL + 0x1000)
    assert cpu.regs.read(X.UC_X86_REG_CR2) == CR2_BEFORE


def test_dropping_code_of_pages_outside_ram_is_harmless(vcpu):
    cpu, memory = vcpu
    memory.write(CODE_PHYSICAL, _mov_eax_hlt(3))
    cpu.translator.translated_code.drop(16 << 20, 17 << 20)
    assert _run_from_start(cpu) == 3


@pytest.fixture(params=["native", "ctypes"])
def drop_path(request, vcpu):
    """drop_written through native_code_drop.c (where the compiled group is built) or ctypes."""
    cpu, memory = vcpu
    code = cpu.translator.translated_code
    if request.param == "ctypes":
        code.native = None
    elif code.native is None:
        pytest.skip("native_code_drop is not built (scripts/compile) or PYVMM_COMPILED=0")
    return cpu, memory


def test_what_devices_wrote_is_dropped_in_one_call_and_nothing_else(drop_path):
    """Runs on two pages and one outside RAM: the two run anew; a page rewritten but not
    reported keeps its stale translation (only the runs are dropped, not the whole cache)."""
    cpu, memory = drop_path
    pages = (0, 0x3000, 0x5000)
    for n, offset in enumerate(pages):
        memory.write(CODE_PHYSICAL + offset, _mov_eax_hlt(10 + n))
        assert _run_from_start(cpu, offset) == 10 + n
        memory.write(CODE_PHYSICAL + offset + 1, bytes([20 + n]))  # behind the translator's back
    cpu.translator.translated_code.drop_written([(CODE_PHYSICAL + 1, 1), (CODE_PHYSICAL + 0x3000, 4096),
                                                 (16 << 20, 4096)])
    assert [_run_from_start(cpu, offset) for offset in pages] == [20, 21, 12]


def test_a_run_across_the_end_of_ram_drops_the_part_in_it(drop_path):
    cpu, memory = drop_path
    ram_end = max(r.guest_base + r.size for r in memory.regions)
    memory.write_u64(layout.PAGE_DIRECTORIES + 0x1000 * (CODE_VIRTUAL >> 30) + 8,
                     (ram_end - 0x20_0000) | HUGE_PAGE_FLAGS)  # CODE_VIRTUAL + 2 MiB: RAM's last 2 MiB
    offset = 0x20_0000 + 0x1F_F000  # RAM's last page, seen from CODE_VIRTUAL
    memory.write(ram_end - 0x1000, _mov_eax_hlt(1))
    assert _run_from_start(cpu, offset) == 1
    memory.write(ram_end - 0x1000 + 1, b"\x02")
    cpu.translator.translated_code.drop_written([(ram_end - 0x1000, 1 << 40)])
    assert _run_from_start(cpu, offset) == 2


def test_the_native_drop_refuses_malformed_arguments(vcpu):
    cpu, _ = vcpu
    code = cpu.translator.translated_code
    if code.native is None:
        pytest.skip("native_code_drop is not built (scripts/compile) or PYVMM_COMPILED=0")
    addresses = code._functions.addresses
    with pytest.raises(ValueError, match="an item of 1 values, not 2"):
        code.native.drop_written(*addresses, code._engine, code._regions, [(CODE_PHYSICAL,)])
    with pytest.raises(TypeError, match="not a sequence"):
        code.native.drop_written(*addresses, code._engine, code._regions, [CODE_PHYSICAL])
    with pytest.raises(ValueError, match="NULL"):
        code.native.drop_written(0, addresses[1], code._engine, code._regions, [])


# --- several vCPUs on one translator ----------------------------------------------------------

OTHER_CODE_PHYSICAL = 0x40_0000  # another 2 MiB page


def test_code_one_vcpu_writes_is_what_another_vcpu_runs(translator, vcpu):
    """vCPU 1 runs code, vCPU 0 rewrites it with a guest store; vCPU 1 must run the new code
    (with a translation cache per vCPU it kept running its old translation)."""
    cpu0, memory = vcpu
    cpu1 = TcgVcpu(1, translator, cpuid_table=None)
    cpu1.set_state(cpu0.get_state())
    memory.write(CODE_PHYSICAL, _mov_eax_hlt(1))
    assert _run_from_start(cpu1) == 1
    # vCPU 0: movb $2, (CODE_VIRTUAL + 1) ; hlt -- through the same mapping, at CODE_VIRTUAL + 0x100
    store = b"\xc6\x04\x25" + (CODE_VIRTUAL + 1).to_bytes(4, "little") + b"\x02" + b"\xf4"
    memory.write(CODE_PHYSICAL + 0x100, store)
    translator.activate(cpu0)
    cpu0.regs.write(X.UC_X86_REG_RIP, CODE_VIRTUAL + 0x100)
    assert isinstance(_run_to_exit(cpu0), Hlt)
    assert memory.read(CODE_PHYSICAL + 1, 1) == b"\x02"
    assert _run_from_start(cpu1) == 2


def test_each_vcpu_keeps_its_own_registers_and_address_space(translator, vcpu):
    """The same virtual address maps different code for two vCPUs (different CR3): a switch must
    load each vCPU's registers and leave nothing of the other's translation lookaside buffer."""
    cpu0, memory = vcpu
    cpu1 = TcgVcpu(1, translator, cpuid_table=None)
    state = cpu0.get_state()
    # vCPU 1's page tables: a copy of vCPU 0's with CODE_VIRTUAL pointing at other code
    pml4, pdpt, directory = 0x60_0000, 0x60_1000, 0x60_2000
    memory.write(pdpt, memory.read(layout.PDPT, 0x1000))
    memory.write(directory, memory.read(layout.PAGE_DIRECTORIES + 0x1000 * (CODE_VIRTUAL >> 30), 0x1000))
    memory.write_u64(directory, OTHER_CODE_PHYSICAL | HUGE_PAGE_FLAGS)
    memory.write_u64(pdpt + 8 * (CODE_VIRTUAL >> 30), directory | 0x7)
    memory.write_u64(pml4, pdpt | 0x7)
    state.cr3 = pml4
    state.gprs["rbx"] = 0x1111
    cpu1.set_state(state)
    memory.write(CODE_PHYSICAL, _mov_eax_hlt(10))
    memory.write(OTHER_CODE_PHYSICAL, _mov_eax_hlt(11))
    for _ in range(3):
        assert _run_from_start(cpu0) == 10
        assert _run_from_start(cpu1) == 11
    assert cpu1.get_state().gprs["rbx"] == 0x1111
    assert cpu0.get_state().gprs["rbx"] != 0x1111
