"""VmHandle's balloon methods: the balloon (Firecracker's /balloon resources), virsh's setmem,
and the memory part of the VM's stats."""

from __future__ import annotations

from typing import Any

from ..errors import UserError


class BalloonMethods:
    """Mixed into VmHandle (which provides `name` and `_live_api()`)."""

    def balloon(self) -> dict[str, Any]:
        """The balloon's configuration and current target (GET /balloon)."""
        return self._live_api().get("/balloon")  # type: ignore[attr-defined]

    def set_balloon(self, amount_mib: int) -> None:
        """Ask the guest to give `amount_mib` MiB to the balloon (PATCH /balloon)."""
        self._live_api().patch("/balloon", {"amount_mib": amount_mib})  # type: ignore[attr-defined]

    def balloon_statistics(self) -> dict[str, Any]:
        """Target, actual size and the guest's memory statistics (GET /balloon/statistics)."""
        return self._live_api().get("/balloon/statistics")  # type: ignore[attr-defined]

    def set_balloon_stats_interval(self, seconds: int) -> None:
        self._live_api().patch("/balloon/statistics",  # type: ignore[attr-defined]
                               {"stats_polling_interval_s": seconds})

    def set_memory(self, size: int) -> int:
        """virsh setmem: set the balloon so that the guest keeps `size` bytes of its RAM.
        Returns the balloon target in MiB."""
        memory_mib = self._live_api().get("/machine-config")["mem_size_mib"]  # type: ignore[attr-defined]
        if size < 0:
            raise UserError(f"{self.name}: the memory size cannot be negative")  # type: ignore[attr-defined]
        if size > memory_mib << 20:
            raise UserError(f"{self.name}: {size >> 20} MiB is more than the guest's {memory_mib} MiB "  # type: ignore[attr-defined]
                            f"(setmem can only take memory back; the most is {memory_mib} MiB)")
        amount = memory_mib - size // (1 << 20)
        self.set_balloon(amount)
        return amount

    def memory_stats(self) -> dict[str, Any]:
        """The memory part of the VM's stats: resident, KSM-merged pages, balloon, guest's free memory."""
        return self._live_api().get("/pyvmm/stats")["memory"]  # type: ignore[attr-defined]
