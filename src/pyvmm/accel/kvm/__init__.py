"""The KVM accelerator: guest code runs on the host CPU through /dev/kvm (pyvmm.kvm's fds).

accelerator.py (the VM: platform, memory, interrupt lines, vCPUs, the pause's clock),
vcpu.py (one vCPU and its KVM_RUN loop), assist.py (instructions a software-assisted KVM
fails to emulate), interrupts.py (GSI routing, MSI vectors on irqfds, ioeventfds).
"""

from .accelerator import KvmAccelerator, KvmIrqLine
from .vcpu import KvmVcpu

__all__ = ["KvmAccelerator", "KvmIrqLine", "KvmVcpu"]
