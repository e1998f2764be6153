"""External interrupts delivered by the engine (accel/tcg/native_interrupts.py).

The probe guest is the check the software CPU runs before it relies on the patched path: an
armed vector stays pending while IF is clear, is taken right after the instruction in STI's
shadow, through the IDT gate, with the frame the SDM gives. These tests run it, show that it
fails when the vector never reaches the engine, and that an engine's entry is freed once.
"""

from __future__ import annotations

import ctypes
import platform

import pytest

pytest.importorskip("unicorn")
if platform.machine() not in ("x86_64", "AMD64"):
    pytest.skip("the stub is x86-64 code", allow_module_level=True)

from pyvmm.accel.tcg import native_interrupts as N  # noqa: E402


@pytest.fixture
def patched():
    from pyvmm.accel.tcg import interrupt_window
    from pyvmm.accel.tcg.engine_state import engine_offsets
    interrupt_window.install(engine_offsets())  # (as attach() does: its patch goes first)
    if not N._install_patch():
        pytest.skip("this libunicorn build cannot be patched (the software CPU delivers in Python)")


def test_the_probe_guest_takes_the_armed_vector_after_the_sti_shadow(patched) -> None:
    assert N._probe()


def test_the_probe_fails_when_the_vector_is_not_armed(patched, monkeypatch) -> None:
    monkeypatch.setattr(N.NativeInterrupts, "arm", lambda self, vector: None)
    assert not N._probe()


def test_the_probe_fails_without_the_interrupt_request(patched, monkeypatch) -> None:
    monkeypatch.setattr(N.NativeInterrupts, "arm", lambda self, vector: setattr(self._entry, "vector", vector))
    assert not N._probe()


def test_disarm_returns_a_vector_the_engine_did_not_take(patched) -> None:
    request = ctypes.c_uint64(0)
    interrupts = N.NativeInterrupts._claim(ctypes.addressof(request) - int(N._patch["request_offset"]))
    assert interrupts is not None
    try:
        interrupts.arm(0x41)
        assert request.value & N.CPU_INTERRUPT_HARD
        assert interrupts.disarm() == 0x41
        assert not request.value & N.CPU_INTERRUPT_HARD
        assert interrupts.disarm() is None
    finally:
        interrupts.close()


def test_an_entry_is_freed_once(patched) -> None:
    first = N.NativeInterrupts._claim(0x10000)
    assert first is not None
    entry = first._entry
    first.close()
    second = N.NativeInterrupts._claim(0x20000)
    assert second is not None and ctypes.addressof(second._entry) == ctypes.addressof(entry)  # reused
    try:
        first.close()  # (a finalizer after close()) must not free the new owner's entry
        assert entry.env == 0x20000 + int(N._patch["env_offset"])
    finally:
        second.close()
