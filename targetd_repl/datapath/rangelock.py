"""Exclusive locks on block ranges of one LUN: the atomicity SCSI promises between commands.

COMPARE AND WRITE must read, compare and write with no other write landing in between; every
command that changes blocks holds the lock on its range while it does, so a write and an ATS on
the same blocks serialise and writes to other ranges run in parallel. Reads take no lock.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

Held = tuple[int, int]


class RangeLock:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._held: list[Held] = []
        self._waiters = 0

    def acquire(self, start: int, count: int) -> Held:
        """Hold blocks [start, start + count) exclusively; pass the result to `release`."""
        end = start + max(count, 1)
        with self._lock:
            while True:
                for s, e in self._held:
                    if s < end and start < e:
                        break
                else:
                    entry = (start, end)
                    self._held.append(entry)
                    return entry
                self._waiters += 1
                self._cond.wait()
                self._waiters -= 1

    def release(self, entry: Held) -> None:
        with self._lock:
            self._held.remove(entry)
            if self._waiters:
                self._cond.notify_all()

    @contextmanager
    def hold(self, start: int, count: int) -> Iterator[None]:
        entry = self.acquire(start, count)
        try:
            yield
        finally:
            self.release(entry)

    @property
    def held(self) -> int:
        return len(self._held)
