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
