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
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._writers = 0
        self._closed = False
        self._closers_waiting = 0
        # Every data-path command passes here: one shared hold object whose enter/exit take
        # the plain lock (no generator, no Condition method per command).
        self._hold = _WriterHold(self)

    def writer(self) -> _WriterHold:
        """Hold (`with barrier.writer():`) while a write goes from journal to volume."""
        return self._hold

    def enter_writer(self) -> None:
        with self._lock:
            if self._closed or self._closers_waiting:
                while self._closed or self._closers_waiting:
                    self._cond.wait()
            self._writers += 1

    def exit_writer(self) -> None:
        with self._lock:
            self._writers -= 1
            # Only a closer waits for the writers to leave; writers wait for closers (below).
            if self._writers == 0 and self._closers_waiting:
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


class _WriterHold:
    """The context manager `WriteBarrier.writer()` returns; shared by every writer (it keeps no
    state of its own, so concurrent holders do not interfere)."""

    __slots__ = ("enter", "exit")

    def __init__(self, barrier: WriteBarrier) -> None:
        self.enter = barrier.enter_writer
        self.exit = barrier.exit_writer

    def __enter__(self) -> None:
        self.enter()

    def __exit__(self, *exc: object) -> None:
        self.exit()
