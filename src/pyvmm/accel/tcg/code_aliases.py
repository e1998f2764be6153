"""Code written through any mapping of a page drops what was translated from it.

Unicorn finds self-modifying code through its TLB: an entry that may write to RAM starts with
QEMU's NOTDIRTY flag, and a write through a flagged entry takes a slow path that drops the
translations overlapping the bytes written. Unicorn 2.1 parts from QEMU twice there, and a guest
that writes a page through one mapping while it runs code from it through another gets
translations that no longer match its memory:

1. After the first write through an entry of a non-executable mapping, Unicorn takes the flag
   off (tlb_set_dirty), though the page may hold translated code beyond the bytes written:
   later writes through that entry drop nothing. QEMU keeps the flag while the page holds code.
2. When code is first translated from a page, Unicorn flags again only the entries of the
   address it was translated through; QEMU's tlb_protect_code flags every entry that writes
   the page (Unicorn's does nothing).

Linux hits the first. A module's init section is freed after its init ran, and the next
module's often lands at the same address, on the same physical page; the loader writes the new
code through a non-executable mapping, so only the translation under its first write went. The
next init ran a block of the previous module's translated code: the virtio vsock transport's
store of its workqueue pointer never happened, and its probe queued work on NULL (the
"early-boot panic" of the earlier notes, about one boot in eight on a busy host).

pyvmm patches both functions with machine code (no Python on the way):

- tlb_set_dirty(cpu, vaddr): before an entry loses its flag, every translation from its page is
  dropped (tb_invalidate_phys_page_range). Keeping the flag while code remains, as QEMU does,
  would need the page's translation list; dropping them is as correct, and the code is
  translated again when it next runs.
- tlb_protect_code(uc, ram_addr): flags every entry that writes the page (tlb_reset_dirty by
  host address), as QEMU does.

The offsets the stubs use (CPUState.env_ptr, the TLB's tables, an entry's layout, the NOTDIRTY
bit) are this build's: tlb_set_dirty's own code is checked byte for byte, CPUState.uc is found
on a scratch engine, and a scratch guest that rewrites its code through an alias must then run
the new code (`_check`). Any other libunicorn keeps Unicorn's behaviour, with a warning.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import struct
import threading

from . import helper_patch

log = logging.getLogger(__name__)

SET_DIRTY, PROTECT_CODE = "tlb_set_dirty_x86_64", "tlb_protect_code_x86_64"
# tlb_set_dirty as this build has it, up to its first victim-TLB compare: env = cpu->env_ptr
# (0x128); for each of the three MMU indexes the fast table's mask and table at env-0x40+16*i
# and env-0x38+16*i; 64-byte entries; addr_write at +8; NOTDIRTY = 0x400 (`or $4,%dh`)
SET_DIRTY_CODE = bytes.fromhex(
    "488b8728010000" "4889f1" "48c1ee0c" "4881e100f0ffff" "4989f0" "488b78c0" "4889ca" "80ce04"
    "48c1ef06" "4821f7" "48c1e706" "480378c8" "483b5708" "7504" "48894f08"
    "488b78d0" "48c1ef06" "4c21c7" "48c1e706" "480378d8" "483b5708" "7504" "48894f08"
    "488b70e0" "48c1ee06" "4c21c6" "48c1e606" "480370e8" "483b5608" "7504" "48894e08")
SET_DIRTY_PROLOGUE = SET_DIRTY_CODE[:14]  # the jump to the stub replaces these (position-independent)
# tlb_protect_code: mov %rsi,%rdi; mov $1,%edx; mov $0x1000,%esi; jmp <the no-op
# cpu_physical_memory_test_and_clear_dirty>
PROTECT_CODE_START = bytes.fromhex("4889f7" "ba01000000" "be00100000" "e9")
ENV_PTR, ENTRY_ADDEND = 0x128, 0x20
PAGE = 0x1000

_lock = threading.Lock()
_installed: bool | None = None  # the answer, once known for this process


def _symbol(name: str) -> int:
    from unicorn.unicorn_py3.unicorn import uclib

    address = ctypes.cast(getattr(uclib, name), ctypes.c_void_p).value
    assert address is not None
    return address


def _call(function: int) -> bytes:
    return b"\x48\xb8" + struct.pack("<Q", function) + b"\xff\xd0"  # mov $function,%rax; call *%rax


def set_dirty_stub(uc_offset: int, ram_addr_from_host: int, invalidate_page: int) -> bytes:
    """Before tlb_set_dirty(cpu, vaddr) (followed by its displaced start): find the flagged
    entry for vaddr's page in any MMU index; if there is one, drop every translation from the
    RAM page behind it."""
    def probe(mask: int, table: int) -> bytes:   # %rdi = the entry for vaddr; %rdx = page|NOTDIRTY
        return (bytes.fromhex("488b78") + struct.pack("<b", mask) + bytes.fromhex("48c1ef06" "4c21c7" "48c1e706")
                + bytes.fromhex("480378") + struct.pack("<b", table) + bytes.fromhex("483b5708"))
    head = bytes.fromhex(
        "53" "4154" "4155"             # push %rbx, %r12, %r13 (the stack is 16-byte aligned for calls)
        "4889fb" "4989f4"              # %rbx = cpu, %r12 = vaddr
        "488b87") + struct.pack("<i", ENV_PTR) + bytes.fromhex(  # %rax = env
        "4889f1" "4881e100f0ffff"      # %rcx = vaddr's page
        "4889ca" "4881ca00040000"      # %rdx = page | NOTDIRTY
        "4989f0" "49c1e80c")           # %r8 = vaddr >> 12
    found = (bytes.fromhex("488b77") + struct.pack("<b", ENTRY_ADDEND) + bytes.fromhex("4801ce")  # %rsi = host page
             + bytes.fromhex("4c8bab") + struct.pack("<i", uc_offset) + bytes.fromhex("4c89ef")  # %rdi = %r13 = uc
             + _call(ram_addr_from_host)
             + bytes.fromhex("4883f8ff"))                              # RAM_ADDR_INVALID: not RAM
    drop = (bytes.fromhex("482500f0ffff" "4c89ef" "4889c6" "488d9000100000")  # (uc, page, page + 4096)
            + _call(invalidate_page))
    tail = bytes.fromhex("4889df" "4c89e6" "415d" "415c" "5b")  # the arguments back; pop
    found += bytes([0x74, len(drop)]) + drop                     # je tail
    probes = [probe(-0x40 + 16 * i, -0x38 + 16 * i) for i in range(3)]
    code = head
    for index, test in enumerate(probes):
        rest = sum(len(p) + 2 for p in probes[index + 1:]) + 2    # the later probes and the jmp
        code += test + bytes([0x74, rest])                         # je found
    return code + bytes([0xEB, len(found)]) + found + tail       # jmp tail (no flagged entry)


def protect_code_stub(cpu_offset: int, map_ram_ptr: int, reset_dirty: int) -> bytes:
    """tlb_protect_code(uc, ram_addr), whole: tlb_reset_dirty(uc->cpu, host page, 4096)."""
    return (bytes.fromhex("53" "488b9f") + struct.pack("<i", cpu_offset)   # push %rbx; %rbx = uc->cpu
            + bytes.fromhex("4889f2" "31f6") + _call(map_ram_ptr)          # qemu_map_ram_ptr(uc, NULL, ram_addr)
            + bytes.fromhex("4889df" "4889c6" "ba00100000") + _call(reset_dirty)
            + bytes.fromhex("5b" "c3"))


def install(cpu_offset: int) -> bool:
    """Patch both functions once per process (`cpu_offset`: uc->cpu, engine_state's); False
    where this libunicorn cannot be patched or the check fails (Unicorn's behaviour stays)."""
    global _installed
    with _lock:
        if _installed is None:
            _installed = _install(cpu_offset)
        return _installed


def _install(cpu_offset: int) -> bool:
    try:
        set_dirty, protect_code = _symbol(SET_DIRTY), _symbol(PROTECT_CODE)
        helpers = [_symbol(name) for name in ("qemu_ram_addr_from_host_x86_64", "tb_invalidate_phys_page_range_x86_64",
                                              "qemu_map_ram_ptr_x86_64", "tlb_reset_dirty_x86_64")]
    except AttributeError as exc:
        return _unpatched(f"libunicorn lacks {exc}")
    if ctypes.string_at(set_dirty, len(SET_DIRTY_CODE)) != SET_DIRTY_CODE or \
            ctypes.string_at(protect_code, len(PROTECT_CODE_START)) != PROTECT_CODE_START:
        return _unpatched("tlb_set_dirty or tlb_protect_code is not the code pyvmm knows")
    uc_offset = _find_uc_offset(cpu_offset)
    if uc_offset is None:
        return _unpatched("CPUState.uc not found")
    from_host, invalidate_page, map_ram_ptr, reset_dirty = helpers
    if not helper_patch.prepend(SET_DIRTY, SET_DIRTY_PROLOGUE,
                                set_dirty_stub(uc_offset, from_host, invalidate_page)):
        return _unpatched("tlb_set_dirty could not be patched")
    if not helper_patch.replace(PROTECT_CODE, PROTECT_CODE_START, protect_code_stub(cpu_offset, map_ram_ptr, reset_dirty)):
        helper_patch.restore(SET_DIRTY)
        return _unpatched("tlb_protect_code could not be patched")
    problem = _check()
    if problem is not None:
        helper_patch.restore(SET_DIRTY)
        helper_patch.restore(PROTECT_CODE)
        return _unpatched(problem)
    return True


def _unpatched(why: str) -> bool:
    log.warning("software CPU: code a guest rewrites through another mapping of its page may keep running as it "
                "was translated (%s)", why)
    return False


def _scratch_engine(size: int):
    import unicorn as U

    ram = mmap.mmap(-1, size)
    holder = ctypes.c_char.from_buffer(ram)
    uc = U.Uc(U.UC_ARCH_X86, U.UC_MODE_64)
    uc.mem_map_ptr(0, size, U.UC_PROT_ALL, ctypes.addressof(holder))
    return uc, ram, holder


def _find_uc_offset(cpu_offset: int) -> int | None:
    """CPUState.uc: the one place in the CPUState (before CPUX86State) that holds the engine."""
    from .engine_state import _engine_address

    uc, _ram, _holder = _scratch_engine(PAGE)
    engine = _engine_address(uc)
    cpu = ctypes.c_uint64.from_address(engine + cpu_offset).value
    env = ctypes.c_uint64.from_address(cpu + ENV_PTR).value
    if not cpu < env < cpu + 0x10_0000:
        return None
    hits = [offset for offset in range(0, env - cpu, 8) if ctypes.c_uint64.from_address(cpu + offset).value == engine]
    return hits[0] if len(hits) == 1 else None


# The check: a 2 MiB identity page (executable) and an alias of it at 2 MiB (not executable).
_ALIAS = 0x20_0000
_PML4, _PDPT, _PD, _FUNCTION, _STACK, _MAIN = 0x8000, 0x9000, 0xA000, 0x3800, 0x7000, 0x1000


def _store_byte(address: int, value: int) -> bytes:
    return bytes.fromhex("c60425") + struct.pack("<I", address) + bytes([value])  # movb $value, address


def _check() -> str | None:
    """Both ways Unicorn lost a rewrite: the function `mov $1,%eax; ret` is translated, then its
    immediate rewritten through the alias, after a first write to the page through the alias
    (1: that write drops only what it overlaps) or before the translation (2: the alias was
    not flagged again); the call after the rewrite must return 2."""
    import unicorn as U
    import unicorn.x86_const as X

    call = b"\xff\xd3"  # call *%rbx
    touch, rewrite = _store_byte(_ALIAS + (_FUNCTION & ~(PAGE - 1)), 0x90), _store_byte(_ALIAS + _FUNCTION + 1, 2)
    for order, code in (("a write to the page before the rewrite", call + touch + rewrite + call + b"\xf4"),
                        ("a write to the page before its translation", touch + call + rewrite + call + b"\xf4")):
        uc, ram, holder = _scratch_engine(0x10000)
        try:
            for table, entry in ((_PML4, _PDPT | 3), (_PDPT, _PD | 3), (_PD, 0x83), (_PD + 8, 0x83 | 1 << 63)):
                ram[table:table + 8] = struct.pack("<Q", entry)
            ram[_MAIN:_MAIN + len(code)] = code
            ram[_FUNCTION:_FUNCTION + 6] = bytes.fromhex("b801000000c3")
            uc.reg_write(X.UC_X86_REG_CR3, _PML4)
            uc.reg_write(X.UC_X86_REG_CR4, 0x20)                # PAE
            uc.msr_write(0xC0000080, 0xD00)                     # EFER: LME, LMA, NXE
            uc.reg_write(X.UC_X86_REG_CR0, 0x8000_0011)         # PG, ET, PE
            uc.reg_write(X.UC_X86_REG_RSP, _STACK)
            uc.reg_write(X.UC_X86_REG_RBX, _FUNCTION)
            uc.emu_start(_MAIN, _MAIN + len(code) - 1)
            if uc.reg_read(X.UC_X86_REG_RAX) != 2:
                return f"code rewritten through an alias ran as first translated ({order})"
        except U.UcError as exc:
            return f"the check guest failed: {exc}"
        finally:
            del uc, holder
            ram.close()
    return None
