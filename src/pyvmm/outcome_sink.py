"""Where device callbacks send the end of the VM, before the Vm exists.

The builder creates the sink first and hands its `stop` to the devices that can end the
machine (the debug-exit port, ACPI power, pvpanic, the RTC timer, the I/O thread); once the
Vm is built the sink delivers to it. A stop requested in between (a device failing while the
machine is assembled) is kept and delivered when the Vm connects: the first outcome wins.
"""

from __future__ import annotations

import threading
from typing import Any, Callable


class OutcomeSink:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._target: Callable[[Any], None] | None = None
        self._early: Any = None

    def stop(self, outcome: Any) -> None:
        """Ask the VM to stop with `outcome` (safe from any thread, before or after connect)."""
        with self._lock:
            target = self._target
            if target is None:
                if self._early is None:
                    self._early = outcome
                return
        target(outcome)

    def connect(self, target: Callable[[Any], None]) -> None:
        """From now on stop() calls `target` (the Vm's request_stop); an earlier stop is delivered now."""
        with self._lock:
            if self._target is not None:
                raise RuntimeError("the outcome sink is connected already")
            self._target, early = target, self._early
        if early is not None:
            target(early)
