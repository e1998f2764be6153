"""The KVM accelerator: guest code runs on the host CPU through /dev/kvm (pyvmm.kvm's fds).

accelerator.py (the VM: platform, memory, interrupt lines, vCPUs, the pause's clock),
vcpu.py (one vCPU and its KVM_RUN loop), assist.py (instructions a software-assisted KVM
fails to emulate), interrupts.py (GSI routing, MSI vectors on irqfds, ioeventfds).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...lazy_exports import lazy_exports

if TYPE_CHECKING:
    from .accelerator import KvmAccelerator, KvmIrqLine
    from .vcpu import KvmVcpu

# loaded at first use (lazy_exports.py): a saved state's reader imports state.py for its
# classes, which a VM on the software CPU restores without the KVM machinery
_SOURCES = {"KvmAccelerator": "accelerator", "KvmIrqLine": "accelerator", "KvmVcpu": "vcpu"}
__all__ = sorted(_SOURCES)
__getattr__, __dir__ = lazy_exports(__name__, _SOURCES)
