"""Exclusive locks on block ranges of one LUN: the atomicity SCSI promises between commands.

COMPARE AND WRITE must read, compare and write with no other write landing in between; every
command that changes blocks holds the lock on its range while it does, so a write and an ATS on
the same blocks serialise and writes to other ranges run in parallel. Reads take no lock.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class RangeLock:
    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._held: list[tuple[int, int]] = []

    @contextmanager
    def hold(self, start: int, count: int) -> Iterator[None]:
        """Hold blocks [start, start + count) exclusively. `count` 0 takes no lock."""
        if count <= 0:
            yield
            return
        end = start + count
        entry = (start, end)
        with self._cond:
            while any(s < end and start < e for s, e in self._held):
                self._cond.wait()
            self._held.append(entry)
        try:
            yield
        finally:
            with self._cond:
                self._held.remove(entry)
                self._cond.notify_all()

    @property
    def held(self) -> int:
        return len(self._held)
