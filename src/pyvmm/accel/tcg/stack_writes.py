"""Let the guest write its stack at full speed where its page tables map the stack executable.

Unicorn keeps no record of which guest pages hold translated code. To catch self-modifying
code, it sends every store to a page the guest maps *executable* down a slow path (find the
memory region, lock the page's translations, look for code to drop), forever; a page mapped
non-executable takes that path once per TLB fill and is then written directly. Linux boots
on a stack inside its kernel image (init_thread_union), which its page tables map executable
until the end of boot, when it makes its data non-executable. In a counted boot, 14.6 M of
the 17.8 M slow-path stores went to that stack: about a tenth of the boot time.

So between two slices pyvmm gives the page under the stack pointer (and the one below it,
when the pointer is near the page's bottom) the treatment Unicorn gives every
non-executable page: it drops whatever was translated from the page, and clears the TLB's
write check for it (QEMU's tlb_set_dirty, which libunicorn exports). Translating code from
the page again re-arms the check, through whichever address the page is written
(code_aliases.py).

After boot every stack is non-executable, and the page walk that says so was a tenth of the
Python calls of a slice. So a stack page found non-executable under a CR3 is not walked again
under that CR3: were it to become executable, its stores would only take the slow path again.
"""

from __future__ import annotations

import ctypes
import logging

import unicorn.x86_const as X

from ...arch.x86_64.paging import PageFault, translate

log = logging.getLogger(__name__)

PAGE = 0x1000
NEAR_BOTTOM = 0x800  # a stack pointer this close to its page's start will soon use the page below
KNOWN_LIMIT = 4096   # (CR3, page) pairs remembered as non-executable, per vCPU, before starting over


def _bind_tlb_set_dirty():
    try:
        from unicorn.unicorn_py3.unicorn import uclib

        function = uclib.tlb_set_dirty_x86_64
    except (ImportError, AttributeError) as exc:
        log.info("software CPU: stack writes through executable mappings stay on the slow path (%s)", exc)
        return None
    function.restype, function.argtypes = None, [ctypes.c_void_p, ctypes.c_uint64]
    return function


_tlb_set_dirty = _bind_tlb_set_dirty()


def release_stack_pages(vcpu, in_64bit_code: bool | None = None) -> list[int]:
    """For a vCPU between slices in 64-bit code: take the write check off its stack page(s)
    where they are mapped executable (see above). Returns the linear pages released.
    `in_64bit_code`: the caller's answer, if it has one (else it is read from the vCPU)."""
    if _tlb_set_dirty is None or not vcpu.translator.translated_code.precise:
        return []  # (dropping a page's code would flush the whole cache at every slice)
    if not (vcpu.in_64bit_code() if in_64bit_code is None else in_64bit_code):
        return []
    regs = vcpu.regs
    rsp, cr3 = regs.read(X.UC_X86_REG_RSP), regs.read(X.UC_X86_REG_CR3)
    known = vcpu.non_executable_stack_pages
    page = rsp & ~(PAGE - 1)
    pages = [page] if (cr3, page) not in known else []
    if rsp & (PAGE - 1) < NEAR_BOTTOM and (cr3, page - PAGE) not in known:
        pages.append(page - PAGE)
    if not pages:
        return []
    mode, released = vcpu.paging, []
    for page in pages:
        try:
            mapping = translate(vcpu.memory, mode, page, set_accessed=False)  # a look, not an access
        except PageFault:
            continue
        if not mapping.executable:  # Unicorn does this itself
            if len(known) >= KNOWN_LIMIT:
                known.clear()
            known.add((cr3, page))
            continue
        if not mapping.writable:
            continue  # stores fault anyway
        physical = mapping.physical & ~(PAGE - 1)
        vcpu.drop_translations(physical, physical + PAGE)
        _tlb_set_dirty(vcpu.engine.cpu_address, page)
        released.append(page)
    return released
