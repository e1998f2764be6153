"""SpinLoops: end a vCPU's slice when it spins in a PAUSE loop while another vCPU could run.

The software CPU runs its vCPUs in turn on one thread, so a vCPU spinning on a lock or
waiting for another vCPU's answer (spin locks, smp_call_function, TLB shootdowns) cannot see
it before its slice ends: it used to spin for the whole slice (a 2-vCPU Linux boot spent about
an eighth of its CPU time there). Hardware has PAUSE-loop exiting for this, and QEMU's
round-robin TCG switches vCPUs at every PAUSE; Unicorn has no hook for PAUSE. So when a slice
ends near a PAUSE in kernel code (the scheduler's `at_pause`), that PAUSE gets a code hook of
its own (one address: no other code pays for it), and a later slice that runs it
PAUSES_PER_SLICE times while another vCPU is runnable ends there. Where nobody else can run (a
delay loop, a device poll) the hook only counts.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable

import unicorn as U

from ...arch.x86_64.paging import translate

if TYPE_CHECKING:
    from .translated_code import TranslatedCode
    from .vcpu import TcgVcpu

log = logging.getLogger(__name__)

PAUSE = b"\xf3\x90"
REACH = 16                  # bytes on either side of RIP searched for the PAUSE (as at_pause does)
PAUSES_PER_SLICE = 16       # a spin loop's turns before its slice ends (each costs a hook call)
MAX_HOOKED = 64             # PAUSE sites hooked at most (a kernel has a few dozen spin loops)
MAX_REMEMBERED = 4096      # at_pause answers kept
KERNEL_HALF = 1 << 63       # hooks by virtual address: only kernel code, the same in every process


class SpinLoops:
    def __init__(self, uc, stop: Callable[[], None], translated_code: TranslatedCode) -> None:
        """`stop`: ends the running slice as the slice timer does (a stopped slice, never
        mistaken for a HLT)."""
        self._uc, self._stop, self._code = uc, stop, translated_code
        self.hooked: set[int] = set()
        self.lowest_address = KERNEL_HALF  # PAUSEs below are left alone (a test's code lowers it)
        self._left = 0          # PAUSEs the running slice may still execute; 0: never stops
        # at_pause's answers for kernel RIPs: a page walk in Python after every interrupted
        # turn cost ~40 us; kernel text is the same in every process and rarely rewritten (a
        # stale answer only costs a turn of the wrong length)
        self._near_pause: dict[int, bool] = {}
        self._learned: set[int] = set()  # RIPs whose PAUSE is hooked: no page walk for them again
        self.slice_ends = 0     # slices ended at a PAUSE

    def arm(self, others_runnable: bool) -> None:
        """Before a slice: stop it at a hooked PAUSE only if another vCPU could use the time."""
        self._left = PAUSES_PER_SLICE if others_runnable else 0

    def at_pause(self, vcpu: TcgVcpu) -> bool:
        """vcpu.at_pause(), remembered for kernel addresses."""
        rip = vcpu.linear_rip
        if rip < KERNEL_HALF:
            return vcpu.at_pause()
        known = self._near_pause.get(rip)
        if known is None:
            if len(self._near_pause) >= MAX_REMEMBERED:
                self._near_pause.clear()
            known = self._near_pause[rip] = vcpu.at_pause()
        return known

    def learn(self, vcpu: TcgVcpu) -> bool:
        """After a slice ended near a PAUSE (between slices): hook that PAUSE. True if it did."""
        rip = vcpu.linear_rip
        if len(self.hooked) >= MAX_HOOKED or rip in self._learned:
            return False
        try:
            start = rip - REACH
            found = vcpu.read_linear(start, 2 * REACH).find(PAUSE)
            if found < 0 or start + found < self.lowest_address or start + found in self.hooked:
                return False
            address = start + found
            physical = translate(vcpu.memory, vcpu.paging, address, fetch=True, set_accessed=False).physical
        except Exception:  # not mapped now: the next slice that ends there tries again
            return False
        self._uc.hook_add(U.UC_HOOK_CODE, self._on_pause, None, address, address)
        self.hooked.add(address)
        self._learned.add(rip)
        # code translated before the hook runs without it: translate it again, by physical
        # address (translated_code.py: a virtual drop would clobber the guest's CR2)
        self._code.drop(physical, physical + len(PAUSE))
        log.debug("software CPU: a spin loop's PAUSE at %#x ends slices (%d hooked)", address, len(self.hooked))
        return True

    def _on_pause(self, uc, address, size, _) -> None:
        left = self._left
        if left:
            if left == 1:
                self.slice_ends += 1
                self._stop()  # honoured where the next block starts: right after this PAUSE
            self._left = left - 1
