"""The memory inspector in the Python client: VmHandle.translate() and VmHandle.read_memory()
(GET /pyvmm/memory/translate and /pyvmm/memory/read of the VM's API, api/memory.py)."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode


class MemoryMethods:
    """Mixed into VmHandle (manage/client.py), which provides _live_api()."""

    def _live_api(self) -> Any:
        raise NotImplementedError

    def translate(self, gva: int, *, vcpu: int = 0) -> dict[str, Any]:
        """vCPU `vcpu`'s page walk of guest-virtual `gva`: levels, GPA, HVA, HPA, KVM's answer
        (see the PyvmmMemoryTranslation schema). An unmapped address has mapped False and the
        fault saying where the walk stopped."""
        return self._live_api().get("/pyvmm/memory/translate?" + urlencode({"gva": hex(gva), "vcpu": vcpu}))

    def virtio_mem(self) -> dict[str, Any]:
        """The virtio-mem device: address, region_size_mib, block_size_mib, requested_size_mib,
        plugged_size_mib."""
        return self._live_api().get("/pyvmm/memory/virtio-mem")

    def resize_memory(self, requested_size_mib: int) -> None:
        """Ask the guest to plug (or unplug) virtio-mem blocks until that many MiB are plugged."""
        self._live_api().put("/pyvmm/memory/virtio-mem", {"requested_size_mib": requested_size_mib})

    def read_memory(self, address: int, length: int, *, physical: bool = False, vcpu: int = 0) -> bytes:
        """`length` bytes (at most 1 MiB) of guest memory at a guest-virtual address (through
        vCPU `vcpu`'s page tables) or, with physical=True, a guest-physical one."""
        query = {"address": hex(address), "length": length, "physical": "true" if physical else "false", "vcpu": vcpu}
        data = self._live_api().get("/pyvmm/memory/read?" + urlencode(query))
        return data if isinstance(data, bytes) else b""
