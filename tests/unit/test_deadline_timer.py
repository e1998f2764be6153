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


def test_a_paused_timer_calls_nothing_back_until_resumed():
    called = threading.Event()
    timer = DeadlineTimer(called.set, clock=Clock())
    try:
        timer.pause()
        timer.arm(1000)  # already due
        assert not called.wait(0.3)
        timer.resume()
        assert called.wait(WAIT)
    finally:
        timer.close()


def test_pause_waits_for_the_callback_in_progress():
    entered, release, paused = threading.Event(), threading.Event(), threading.Event()
    finished = []

    def callback():
        entered.set()
        release.wait(WAIT)
        finished.append(True)

    timer = DeadlineTimer(callback, clock=Clock())
    try:
        timer.arm(1000)
        assert entered.wait(WAIT)
        pauser = threading.Thread(target=lambda: (timer.pause(), paused.set()))
        pauser.start()
        assert not paused.wait(0.3)
        release.set()
        assert paused.wait(WAIT) and finished == [True]
        pauser.join()
    finally:
        release.set()
        timer.close()


def test_close_while_paused_joins_the_thread():
    timer = DeadlineTimer(lambda: None, clock=Clock())
    timer.arm(2000)
    timer.pause()
    timer.close()
    assert timer._thread is not None and not timer._thread.is_alive()
