"""IoThread.pause(): the handler in progress finishes, then nothing runs until resume()."""

from __future__ import annotations

import os
import threading

from pyvmm.iothread import IoThread, make_eventfd

WAIT = 10  # seconds: only a failure waits this long


def test_pause_waits_for_the_work_item_in_flight_and_holds_the_rest():
    thread = IoThread()
    thread.start()
    started, release, paused = threading.Event(), threading.Event(), threading.Event()
    finished, kicks = [], []
    kicked = threading.Event()
    fd = make_eventfd()
    try:
        def work_item():
            started.set()
            release.wait(WAIT)
            finished.append(True)

        thread.add_eventfd(fd, lambda: (kicks.append(1), kicked.set()))
        thread.call_soon(work_item)
        assert started.wait(WAIT)
        pauser = threading.Thread(target=lambda: (thread.pause(), paused.set()))
        pauser.start()
        assert not paused.wait(0.3), "pause() returned while a work item was running"
        release.set()
        assert paused.wait(WAIT) and finished == [True]
        pauser.join()

        os.eventfd_write(fd, 1)  # readiness while paused is served after resume(), not before
        assert not kicked.wait(0.3)
        thread.resume()
        assert kicked.wait(WAIT) and kicks == [1]
    finally:
        release.set()
        thread.stop()
        os.close(fd)


def test_stop_while_paused_ends_the_thread():
    thread = IoThread()
    thread.start()
    thread.pause()
    worker = thread._thread
    thread.stop()
    assert not worker.is_alive()


def test_pause_before_start_holds_from_the_first_item():
    thread = IoThread()
    thread.pause()
    ran = threading.Event()
    thread.start()
    thread.call_soon(ran.set)
    try:
        assert not ran.wait(0.3)
        thread.resume()
        assert ran.wait(WAIT)
    finally:
        thread.stop()


def test_call_later_runs_on_the_thread_after_the_delay_in_deadline_order_and_not_while_paused():
    import time as _time

    thread = IoThread(name="test-timers")
    thread.start()
    try:
        ran: list[tuple[str, str]] = []
        done = threading.Event()
        start = _time.monotonic_ns()
        thread.call_later(60_000_000, lambda: (ran.append(("late", threading.current_thread().name)), done.set()))
        thread.call_later(20_000_000, lambda: ran.append(("early", threading.current_thread().name)))
        thread.call_later(30_000_000, lambda: ran.append(("cancelled", ""))).cancel()
        assert done.wait(5)
        assert ran == [("early", "test-timers"), ("late", "test-timers")]
        assert _time.monotonic_ns() - start >= 60_000_000
        thread.pause()
        fired = threading.Event()
        thread.call_later(0, fired.set)
        assert not fired.wait(0.1)          # a paused thread runs no timer
        thread.resume()
        assert fired.wait(5)
    finally:
        thread.stop()


def test_a_yielding_io_thread_is_sched_batch_and_the_default_one_is_not():
    policies = {}
    for yields in (False, True):
        iothread = IoThread(yields=yields)
        iothread.start()
        done = threading.Event()

        def record(yields=yields, done=done):
            policies[yields] = os.sched_getscheduler(0)
            done.set()
        iothread.call_soon(record)
        assert done.wait(5)
        iothread.stop()
    assert policies == {False: os.SCHED_OTHER, True: os.SCHED_BATCH}


def test_a_reader_removed_by_a_call_in_the_same_wake_up_is_not_called():
    """One select() can return an fd together with the wake-up whose calls remove it and close it
    (a NIC's thread closed by a reset): its stale event must not be served (its callback would
    read a closed fd, or another file that got the number)."""
    thread = IoThread()
    errors: list[BaseException] = []
    thread.on_error = errors.append
    thread.start()
    busy, go, done = threading.Event(), threading.Event(), threading.Event()
    fd = make_eventfd()
    events: list[str] = []
    try:
        thread.add_eventfd(fd, lambda: events.append("read"))

        def hold():
            busy.set()
            go.wait(WAIT)

        def remove_and_close():
            thread.remove_reader(fd)  # (on the thread: runs at once)
            os.close(fd)
            events.append("removed")

        thread.call_soon(hold)
        assert busy.wait(WAIT)
        thread.call_soon(remove_and_close)  # the wake-up is ready first ...
        os.eventfd_write(fd, 1)             # ... then the fd: one select() returns both, in that order
        go.set()
        thread.call_soon(done.set)
        assert done.wait(WAIT)
        assert events == ["removed"] and errors == []
    finally:
        go.set()
        thread.stop()
