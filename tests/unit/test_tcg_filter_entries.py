"""The C filters a patched engine helper's stub calls (hook_trampolines.set_filter, used by
helper_patch.install where the compiled group is built): called here through the stub's C
signature, filter(env, arg1, arg2, &out) -> action."""

from __future__ import annotations

import ctypes

import pytest

from pyvmm.accel.tcg.helper_patch import FILTER, HANDLED, PASS, PASS_WITH_ARG1
from pyvmm.compiled import c_module


@pytest.fixture(scope="module")
def trampolines():
    module = c_module("pyvmm.accel.tcg.hook_trampolines")
    if module is None:
        pytest.skip("hook_trampolines is not built (scripts/compile) or PYVMM_COMPILED=0")
    return module


class Filter:
    """One slot's handler (its answers scripted per test) and what it was called with."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int, int]] = []
        self.failures: list[BaseException] = []
        self.answer: object = (PASS, 0)

    def handler(self, env, arg1, arg2):
        self.calls.append((env, arg1, arg2))
        if isinstance(self.answer, BaseException):
            raise self.answer
        return self.answer

    def failed(self, exc):
        self.failures.append(exc)


@pytest.fixture(scope="module")
def slot(trampolines):
    """The last slot (helper_patch gives the engine's helpers the first ones): its C entry,
    called as the stub calls it, and its scripted handler."""
    recorder = Filter()
    address = trampolines.set_filter(trampolines.FILTER_SLOTS - 1, recorder.handler, recorder.failed)
    return FILTER(address), recorder


def call(entry, env, arg1, arg2):
    out = ctypes.c_uint64(0xDEAD)
    action = entry(env, arg1, arg2, ctypes.byref(out))
    return action, out.value


def test_the_handlers_action_and_value_reach_the_stub(slot):
    entry, recorder = slot
    recorder.calls.clear()
    recorder.answer = (HANDLED, 0x1234_5678_9ABC)
    assert call(entry, 0x7F00_0000_1000, 0x10, 2**64 - 1) == (HANDLED, 0x1234_5678_9ABC)
    recorder.answer = (PASS_WITH_ARG1, -1)           # a value is stored as 64 bits
    assert call(entry, None, 0, 0) == (PASS_WITH_ARG1, 2**64 - 1)
    assert recorder.calls == [(0x7F00_0000_1000, 0x10, 2**64 - 1), (0, 0, 0)]   # a NULL env is 0


def test_a_pass_leaves_out_as_the_handler_set_it(slot):
    entry, recorder = slot
    recorder.answer = (PASS, 0)
    assert call(entry, 1, 2, 3) == (PASS, 0)


@pytest.mark.parametrize("answer, error", [
    (RuntimeError("filter bug"), RuntimeError),
    ("not a pair", TypeError),
    ((1, 2, 3), TypeError),
    (("one", 2), TypeError),
])
def test_a_failing_handler_is_reported_and_the_helper_runs(slot, answer, error):
    entry, recorder = slot
    recorder.failures.clear()
    recorder.answer = answer
    assert call(entry, 1, 2, 3) == (PASS, 0xDEAD)     # PASS, out untouched
    assert len(recorder.failures) == 1 and isinstance(recorder.failures[0], error)


def test_a_slot_set_again_calls_its_new_handler_from_the_same_entry(trampolines, slot):
    entry, recorder = slot
    other = Filter()
    other.answer = (HANDLED, 7)
    last = trampolines.FILTER_SLOTS - 1
    assert FILTER(trampolines.set_filter(last, other.handler, other.failed)) is not None
    try:
        assert call(entry, 1, 2, 3) == (HANDLED, 7) and other.calls == [(1, 2, 3)]
    finally:
        trampolines.set_filter(last, recorder.handler, recorder.failed)


def test_bad_slots_and_handlers_are_refused(trampolines):
    with pytest.raises(ValueError):
        trampolines.set_filter(trampolines.FILTER_SLOTS, print, print)
    with pytest.raises(ValueError):
        trampolines.set_filter(-1, print, print)
    with pytest.raises(TypeError):
        trampolines.set_filter(0, None, print)
