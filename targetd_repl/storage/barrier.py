"""A write barrier: many writers share it; a checkpoint, snapshot or role change closes it,
waits for the writers inside to finish, and holds it closed while it works.

Writer preference is reversed on purpose: once a barrier is waiting, new writers queue behind it,
so a snapshot under a steady write load still gets its quiet moment.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class WriteBarrier:
    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._writers = 0
        self._closed = False
        self._closers_waiting = 0

    @contextmanager
    def writer(self) -> Iterator[None]:
        """Hold while a write goes from journal to volume."""
        with self._cond:
            while self._closed or self._closers_waiting:
                self._cond.wait()
            self._writers += 1
        try:
            yield
        finally:
            with self._cond:
                self._writers -= 1
                if self._writers == 0:
                    self._cond.notify_all()

    @contextmanager
    def closed(self) -> Iterator[None]:
        """Hold with no writer inside and none admitted."""
        with self._cond:
            self._closers_waiting += 1
            try:
                while self._closed or self._writers:
                    self._cond.wait()
            finally:
                self._closers_waiting -= 1
            self._closed = True
        try:
            yield
        finally:
            with self._cond:
                self._closed = False
                self._cond.notify_all()
