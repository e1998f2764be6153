"""DeadlineTimer (deadline_timer.py) on a fake clock: what it calls, not how fast."""

import threading

from pyvmm.deadline_timer import DeadlineTimer

WAIT = 10  # seconds: only a failure waits this long


class Clock:
    def __init__(self, ns=1000):
        self.ns = ns

    def __call__(self):
        return self.ns


def test_a_due_deadline_calls_back_once_on_the_timer_thread():
    called, threads = threading.Event(), []
    timer = DeadlineTimer(lambda: (threads.append(threading.current_thread()), called.set()), clock=Clock())
    try:
        timer.arm(1000)
        assert called.wait(WAIT)
    finally:
        timer.close()
    assert len(threads) == 1 and threads[0] is not threading.current_thread()


def test_the_callback_may_arm_the_next_deadline():
    clock, calls, done = Clock(), [], threading.Event()

    def callback():
        calls.append(clock.ns)
        if len(calls) < 3:
            clock.ns += 10
            timer.arm(clock.ns)   # as the RTC does from poll(), under its own lock
        else:
            done.set()

    timer = DeadlineTimer(callback, clock=clock)
    try:
        timer.arm(1000)
        assert done.wait(WAIT)
    finally:
        timer.close()
    assert calls == [1000, 1010, 1020]


def test_a_cancelled_or_future_deadline_never_calls_back():
    calls = []
    timer = DeadlineTimer(lambda: calls.append(1), clock=Clock())
    timer.arm(5000)        # the fake clock never gets there
    timer.arm(None)
    timer.close()
    timer.arm(0)           # closed: ignored
    assert calls == []


def test_no_thread_until_armed():
    timer = DeadlineTimer(lambda: None)
    assert timer._thread is None
    timer.arm(None)
    assert timer._thread is None
    timer.close()


def test_a_failing_callback_is_reported():
    errors, reported = [], threading.Event()
    timer = DeadlineTimer(lambda: 1 / 0, clock=Clock(),
                          on_error=lambda exc: (errors.append(exc), reported.set()))
    try:
        timer.arm(0)
        assert reported.wait(WAIT)
    finally:
        timer.close()
    assert isinstance(errors[0], ZeroDivisionError)
