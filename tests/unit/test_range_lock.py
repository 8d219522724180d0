"""RangeLock: overlapping holders serialise, disjoint holders run together."""

from __future__ import annotations

import threading
import time

from targetd_repl.storage.range_lock import RangeLock


def test_overlapping_ranges_serialise() -> None:
    lock = RangeLock(4096)
    inside = 0
    peak = 0
    guard = threading.Lock()

    def worker() -> None:
        nonlocal inside, peak
        for _ in range(50):
            with lock.hold(1000, 5000):  # regions 0 and 1
                with guard:
                    inside += 1
                    peak = max(peak, inside)
                time.sleep(0.0001)
                with guard:
                    inside -= 1

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert peak == 1


def test_disjoint_ranges_do_not_block() -> None:
    lock = RangeLock(4096)
    entered = threading.Event()
    with lock.hold(0, 4096):

        def other() -> None:
            with lock.hold(4096, 4096):
                entered.set()

        thread = threading.Thread(target=other)
        thread.start()
        assert entered.wait(2.0), "a disjoint range waited for a held one"
        thread.join()


def test_partial_overlap_waits_until_release() -> None:
    lock = RangeLock(4096)
    entered = threading.Event()
    with lock.hold(0, 8192):

        def other() -> None:
            with lock.hold(4096, 1):
                entered.set()

        thread = threading.Thread(target=other)
        thread.start()
        assert not entered.wait(0.2), "an overlapping range entered while held"
    assert entered.wait(2.0)
    thread.join()
