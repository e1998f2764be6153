"""Finish a long REP STOS between two slices, in one go (Bochs calls this a repeat speed-up).

Unicorn translates every iteration of a REP string instruction as a block of its own: about
40 ns per REP STOSB iteration, so a guest that clears megabytes with it spends a long time
there (Linux clears its 5 MiB BSS with REP STOSB at boot: about 0.2 s of a 2 s boot).

A REP instruction can stop between iterations; RCX and RDI say how far it got, and RIP stays
on it. So when a slice ends in the middle of one, pyvmm performs the remaining iterations on
guest RAM itself: it translates the destination with the CPU's own checks (and sets the
accessed and dirty bits), writes a page at a time, and drops code translated from the
written pages. It stops short of anything it would have to think about: a page that would
fault, SMAP, protection keys, memory that is not RAM, an element split across pages. Unicorn
then goes on from there, and raises any fault itself.

Only the 64-bit forms with 64-bit addressing and DF clear: F3 AA (STOSB), F3 AB (STOSD),
F3 REX.W AB (STOSQ).
"""

from __future__ import annotations

import unicorn.x86_const as X

from ...arch.x86_64.paging import PageFault, translate

STOS_FORMS = {b"\xf3\xaa": 1, b"\xf3\xab": 4, b"\xf3\x48\xab": 8}
RFLAGS_DF, RFLAGS_AC = 1 << 10, 1 << 18
CR4_SMAP, CR4_PKE = 1 << 21, 1 << 22
MOST_BYTES = 16 << 20  # per assist: the rest waits for the next slice, which keeps a turn short
_CANONICAL_LOW, _CANONICAL_HIGH = 1 << 47, 0xFFFF_8000_0000_0000


def _stos_form(code: bytes) -> tuple[int, int] | None:
    """(element size, instruction length) if `code` starts with a REP STOS pyvmm finishes."""
    for prefix, size in STOS_FORMS.items():
        if code.startswith(prefix):
            return size, len(prefix)
    return None


def finish_rep_stos(vcpu) -> int:
    """If `vcpu` (between slices, in 64-bit code) stands on a REP STOS, perform its remaining
    iterations as far as that is plain; returns the number of bytes written."""
    regs = vcpu.regs
    rip = regs.read(X.UC_X86_REG_RIP)
    try:
        form = _stos_form(vcpu.read_linear(rip, 3))
    except PageFault:
        return 0
    if form is None or not vcpu.in_64bit_code():
        return 0
    size, length = form
    count, rdi = regs.read(X.UC_X86_REG_RCX), regs.read(X.UC_X86_REG_RDI)
    rflags = regs.read(X.UC_X86_REG_RFLAGS)
    mode = vcpu.paging
    if not count or rflags & RFLAGS_DF or mode.cr4 & CR4_PKE:
        return 0
    user = vcpu.cpl == 3
    smap = not user and mode.cr4 & CR4_SMAP and not rflags & RFLAGS_AC
    element = (regs.read(X.UC_X86_REG_RAX) & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
    memory, written = vcpu.memory, 0
    while count and written < MOST_BYTES:
        if _CANONICAL_LOW <= rdi < _CANONICAL_HIGH:
            break  # non-canonical: a #GP, Unicorn's to raise
        try:
            page = translate(memory, mode, rdi, write=True, user=user)
        except PageFault:
            break
        if smap and page.user:
            break
        room = page.page_size - (rdi & (page.page_size - 1))
        elements = min(count, room // size, (MOST_BYTES - written) // size)
        if not elements or not memory.contains(page.physical, elements * size):
            break
        chunk = elements * size
        memory.view(page.physical, chunk)[:] = element * elements
        vcpu.drop_translations(page.physical, page.physical + chunk)
        rdi, count, written = (rdi + chunk) & 0xFFFF_FFFF_FFFF_FFFF, count - elements, written + chunk
    if written:
        regs.write(X.UC_X86_REG_RDI, rdi)
        regs.write(X.UC_X86_REG_RCX, count)
        if not count:
            vcpu.set_rip_between_slices(rip + length)
    return written
