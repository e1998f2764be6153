"""The host's TSC rate, which the software CPU's guest sees: Unicorn's RDTSC returns the
host TSC as is, so the guest's CPUID and timers are announced at that rate.

Asked of KVM (KVM_GET_TSC_KHZ of a scratch vCPU) where there is one, else measured.
"""

from __future__ import annotations

import functools


@functools.cache
def host_tsc_hz() -> int:
    """The host TSC rate, which Unicorn's RDTSC returns as is (once per process: every reboot
    builds a new machine, the host's TSC rate stays what it was)."""
    try:
        from ...kvm import Kvm

        with Kvm() as kvm:
            vm = kvm.create_vm()
            try:
                vcpu = vm.create_vcpu(0)
                try:
                    return vcpu.get_tsc_khz() * 1000
                finally:
                    vcpu.close()
            finally:
                vm.close()
    except Exception:  # no KVM: measure against the monotonic clock
        return _measure_tsc_hz()


def _measure_tsc_hz() -> int:
    import time

    import unicorn as U
    import unicorn.x86_const as X

    uc = U.Uc(U.UC_ARCH_X86, U.UC_MODE_64)
    uc.mem_map(0x1000, 0x1000)
    uc.mem_write(0x1000, b"\x0f\x31")

    def sample() -> tuple[int, int]:
        uc.emu_start(0x1000, 0x1002)
        return time.monotonic_ns(), uc.reg_read(X.UC_X86_REG_RDX) << 32 | uc.reg_read(X.UC_X86_REG_RAX)

    t0, c0 = sample()
    time.sleep(0.2)
    t1, c1 = sample()
    # to the kHz, as KVM_GET_TSC_KHZ would say it: host rates need not be round MHz
    return round((c1 - c0) * 1e6 / (t1 - t0)) * 1000
