"""VcpuFd: one virtual CPU. `run()` enters the guest and returns KVM's exit reason.

The kvm_run page is mmapped once and read through a ctypes view (`run_struct`); an exit
that needs an answer (port or MMIO read) is completed by writing into that page before
the next `run()`. Turning the page into typed exits is the accelerator's job
(accel/kvm/vcpu.py), so that the rest of pyvmm sees the same exits from every backend.
"""

from __future__ import annotations

import ctypes
import mmap

from . import ioctls, uapi
from .fd import KvmFd, ioctl
from .run import KvmRun
from .stats import StatsFd, open_stats

EXIT_REASON_NAMES = {
    value: name[len("KVM_EXIT_"):].lower()
    for name, value in vars(uapi).items()
    if name.startswith("KVM_EXIT_") and name not in ("KVM_EXIT_IO_IN", "KVM_EXIT_IO_OUT")
}


class VcpuFd(KvmFd):
    def __init__(self, fd: int, vcpu_id: int, mmap_size: int) -> None:
        super().__init__(fd)
        self.id = vcpu_id
        self._page = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.run_struct = uapi.kvm_run.from_buffer(self._page)
        self.runner = KvmRun(fd, self._page)
        self.exit_counts = self.runner.exit_counts  # by KVM exit reason
        self._stats: StatsFd | None | bool = False  # False: not opened yet; None: the host has none

    def binary_stats(self) -> StatsFd | None:
        """KVM's binary stats for this vCPU (KVM_GET_STATS_FD), or None where the host has none."""
        if self._stats is False:
            self._stats = open_stats(self.fd)
        return self._stats if isinstance(self._stats, StatsFd) else None

    def close(self) -> None:
        stats = getattr(self, "_stats", None)
        if isinstance(stats, StatsFd):
            stats.close()
        if getattr(self, "_page", None) is not None:
            # drop the views of the run page so that it can be unmapped: a closed fd is not used again
            self.run_struct = None  # type: ignore[assignment]
            self.runner.release()
            try:
                self._page.close()
            except BufferError:  # a stray exit object still holds a view; the fd close frees it later
                pass
            self._page = None  # type: ignore[assignment]
        super().close()

    # --- the hot path ----------------------------------------------------------------

    def run(self) -> int:
        """Enter the guest; returns the KVM exit reason (the details are in `run_struct`), or
        RUN_INTERRUPTED when a signal or `immediate_exit` ended KVM_RUN before any exit."""
        return self.runner.enter()

    @property
    def page(self) -> mmap.mmap:
        """The kvm_run page: port-I/O data lives in it at `exit.io.data_offset`."""
        return self._page

    @property
    def immediate_exit(self) -> bool:
        return bool(self.run_struct.immediate_exit)

    @immediate_exit.setter
    def immediate_exit(self, value: bool) -> None:
        run = self.run_struct
        if run is None:     # closed: nothing will enter the guest again (a late kick from a stop)
            return
        run.immediate_exit = 1 if value else 0

    # --- architectural state -----------------------------------------------------------

    def get_regs(self) -> uapi.kvm_regs:
        return self._get(ioctls.KVM_GET_REGS, uapi.kvm_regs())

    def set_regs(self, regs: uapi.kvm_regs) -> None:
        ioctl(self.fd, ioctls.KVM_SET_REGS, regs)

    def get_sregs(self) -> uapi.kvm_sregs:
        return self._get(ioctls.KVM_GET_SREGS, uapi.kvm_sregs())

    def set_sregs(self, sregs: uapi.kvm_sregs) -> None:
        ioctl(self.fd, ioctls.KVM_SET_SREGS, sregs)

    def get_fpu(self) -> uapi.kvm_fpu:
        return self._get(ioctls.KVM_GET_FPU, uapi.kvm_fpu())

    def set_fpu(self, fpu: uapi.kvm_fpu) -> None:
        ioctl(self.fd, ioctls.KVM_SET_FPU, fpu)

    def get_xsave(self, size: int = 4096) -> bytes:
        """The XSAVE area in KVM's (standard, uncompacted) layout. `size` above 4096 is what
        KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2) reports on the VM fd: read with KVM_GET_XSAVE2."""
        if size > ctypes.sizeof(uapi.kvm_xsave):
            buf = uapi.kvm_xsave2(size)()
            ioctl(self.fd, ioctls.KVM_GET_XSAVE2, buf)
        else:
            buf = self._get(ioctls.KVM_GET_XSAVE, uapi.kvm_xsave())
        return bytes(buf)

    def set_xsave(self, area: bytes) -> None:
        """KVM_SET_XSAVE reads as many bytes as KVM_CAP_XSAVE2 reports (at least 4096)."""
        if len(area) < ctypes.sizeof(uapi.kvm_xsave) or len(area) % 4:
            raise ValueError(f"an XSAVE area of {len(area)} bytes (KVM takes 4096 or more, whole words)")
        buf = uapi.kvm_xsave2(len(area)).from_buffer_copy(area)
        ioctl(self.fd, ioctls.KVM_SET_XSAVE, buf)

    def get_debugregs(self) -> uapi.kvm_debugregs:
        return self._get(ioctls.KVM_GET_DEBUGREGS, uapi.kvm_debugregs())

    def set_debugregs(self, debugregs: uapi.kvm_debugregs) -> None:
        ioctl(self.fd, ioctls.KVM_SET_DEBUGREGS, debugregs)

    def kvmclock_ctrl(self) -> None:
        """Tell the guest (kvm-clock's PVCLOCK_GUEST_STOPPED) that the VMM held it paused, so its
        soft-lockup watchdog does not fire on the gap."""
        ioctl(self.fd, ioctls.KVM_KVMCLOCK_CTRL)

    def get_xcrs(self) -> uapi.kvm_xcrs:
        return self._get(ioctls.KVM_GET_XCRS, uapi.kvm_xcrs())

    def set_xcrs(self, xcrs: uapi.kvm_xcrs) -> None:
        ioctl(self.fd, ioctls.KVM_SET_XCRS, xcrs)

    def get_lapic(self) -> uapi.kvm_lapic_state:
        return self._get(ioctls.KVM_GET_LAPIC, uapi.kvm_lapic_state())

    def set_lapic(self, lapic: uapi.kvm_lapic_state) -> None:
        ioctl(self.fd, ioctls.KVM_SET_LAPIC, lapic)

    def get_mp_state(self) -> int:
        return self._get(ioctls.KVM_GET_MP_STATE, uapi.kvm_mp_state()).mp_state

    def set_mp_state(self, state: int) -> None:
        ioctl(self.fd, ioctls.KVM_SET_MP_STATE, uapi.kvm_mp_state(state))

    def get_vcpu_events(self) -> uapi.kvm_vcpu_events:
        return self._get(ioctls.KVM_GET_VCPU_EVENTS, uapi.kvm_vcpu_events())

    def set_vcpu_events(self, events: uapi.kvm_vcpu_events) -> None:
        ioctl(self.fd, ioctls.KVM_SET_VCPU_EVENTS, events)

    def set_cpuid2(self, entries) -> None:
        buf = uapi.kvm_cpuid2(len(entries))()
        buf.nent = len(entries)
        for slot, e in zip(buf.entries, entries):
            slot.function, slot.index, slot.flags = e.function, e.index, e.flags
            slot.eax, slot.ebx, slot.ecx, slot.edx = e.eax, e.ebx, e.ecx, e.edx
        ioctl(self.fd, ioctls.KVM_SET_CPUID2, buf)

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        """Read MSRs; KVM stops at the first it refuses, so the result may hold fewer."""
        buf = uapi.kvm_msrs(len(indices))()
        buf.nmsrs = len(indices)
        for slot, index in zip(buf.entries, indices):
            slot.index = index
        done = ioctl(self.fd, ioctls.KVM_GET_MSRS, buf)
        return {buf.entries[i].index: buf.entries[i].data for i in range(done)}

    def get_msrs_skipping_refused(self, indices: list[int]) -> tuple[dict[int, int], list[int]]:
        """Read every MSR KVM will give: (values, the indices it refused)."""
        values: dict[int, int] = {}
        refused: list[int] = []
        rest = list(indices)
        while rest:
            got = self.get_msrs(rest)
            values.update(got)
            if len(got) == len(rest):
                break
            refused.append(rest[len(got)])
            rest = rest[len(got) + 1:]
        return values, refused

    def set_msrs(self, values: dict[int, int]) -> int:
        """Write MSRs; returns how many KVM accepted (it stops at the first it refuses)."""
        buf = uapi.kvm_msrs(len(values))()
        buf.nmsrs = len(values)
        for slot, (index, data) in zip(buf.entries, values.items()):
            slot.index, slot.data = index, data
        return ioctl(self.fd, ioctls.KVM_SET_MSRS, buf)

    def translate(self, linear_address: int) -> uapi.kvm_translation:
        tr = uapi.kvm_translation(linear_address=linear_address)
        ioctl(self.fd, ioctls.KVM_TRANSLATE, tr)
        return tr

    def get_tsc_khz(self) -> int:
        return ioctl(self.fd, ioctls.KVM_GET_TSC_KHZ)

    def set_tsc_khz(self, khz: int) -> None:
        """Scale this vCPU's TSC to `khz` (KVM_CAP_TSC_CONTROL)."""
        ioctl(self.fd, ioctls.KVM_SET_TSC_KHZ, khz)

    def _get(self, request: int, struct):
        ioctl(self.fd, request, struct)
        return struct
