"""The CPU hotplug controller: which vCPUs are present, and the events the guest has not seen.

Four 32-bit registers at layout.CPU_HOTPLUG_PORT; the guest's AML (arch/x86_64/cpu_hotplug.py)
selects a vCPU, then reads or writes about it:

    +0   SELECT  write: the vCPU index the next accesses are about
    +4   STATUS  read: bit 0 = the selected vCPU is present (its processor's _STA)
    +8   EVENTS  read: bit 0 = plugged in, bit 1 = asked to leave (reading clears both)
    +12  EJECT   write: the guest has let the selected vCPU go (its processor's _EJ0)

The VMM marks a vCPU present (or asks for its removal) and raises the Generic Event Device's
CPU-hotplug event; \\_SB.CPUS.CSCN then reads each vCPU's events and notifies its processor
device: Notify 1 (device check: Linux adds the CPU, then onlines it where userspace says so),
Notify 3 (eject request: Linux offlines the CPU, then runs _EJ0).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable

from ...persist import State

PORT_COUNT = 16
SELECT, STATUS, EVENTS, EJECT = 0, 4, 8, 12
EVENT_INSERT, EVENT_REMOVE = 1, 2
MAX_CPUS = 255


class CpuHotplugController:
    def __init__(self, present: int, notify: Callable[[], None]) -> None:
        """`present`: vCPUs 0..present-1 are there at start; `notify()` interrupts the guest."""
        self._notify = notify
        self._changed = threading.Condition()
        self._present = set(range(present))
        self._events: dict[int, int] = {}
        self._ejected: set[int] = set()
        self._selected = 0

    def inserted(self, index: int) -> None:
        with self._changed:
            self._present.add(index)
            self._events[index] = EVENT_INSERT
            self._ejected.discard(index)
        self._notify()

    def request_eject(self, index: int) -> None:
        """(Asked again, an eject the guest has done already still counts.)"""
        with self._changed:
            if index in self._ejected:
                return
            self._events[index] = EVENT_REMOVE
        self._notify()

    def wait_ejected(self, index: int, timeout: float | None) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: index in self._ejected, timeout)

    def removed(self, index: int) -> None:
        """The vCPU is gone: absent to the guest from now on."""
        with self._changed:
            self._present.discard(index)
            self._events.pop(index, None)
            self._ejected.discard(index)

    def read(self, offset: int, size: int) -> bytes:
        with self._changed:
            index = self._selected
            if offset == STATUS:
                value = int(index in self._present)
            elif offset == EVENTS:
                value = self._events.pop(index, 0)
            else:
                value = index if offset == SELECT else 0
        return value.to_bytes(4, "little")[:size].ljust(size, b"\0")

    def write(self, offset: int, data: bytes) -> None:
        value = int.from_bytes(data[:4].ljust(4, b"\0"), "little")
        with self._changed:
            if offset == SELECT:
                self._selected = value
            elif offset == EJECT and value & 1 and self._selected in self._present and self._selected != 0:
                # absent from now on: Linux reads _STA after _EJ0 to see that the eject took
                self._present.discard(self._selected)
                self._ejected.add(self._selected)
                self._changed.notify_all()

    def save(self) -> CpuHotplugState:
        with self._changed:
            return CpuHotplugState(present=tuple(sorted(self._present)), selected=self._selected,
                                   events=dict(sorted(self._events.items())))

    def restore(self, state: CpuHotplugState) -> None:
        with self._changed:
            self._present, self._selected = set(state.present), state.selected
            self._events, self._ejected = dict(state.events), set()
        if state.events:
            self._notify()


@dataclass(frozen=True)
class CpuHotplugState(State):
    KIND = "cpu-hotplug"
    present: tuple[int, ...]
    selected: int
    events: dict[int, int]

    def validate(self) -> None:
        self.check_items("present", 0, MAX_CPUS - 1)
        self.check_range("selected", 0, 0xFFFFFFFF)
        for index, events in self.events.items():
            if not 0 <= index < MAX_CPUS or events not in (EVENT_INSERT, EVENT_REMOVE):
                self.fail("events", f"vCPU {index}: {events} is not an event")
