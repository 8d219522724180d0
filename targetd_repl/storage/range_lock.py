"""Region locks: writers to overlapping byte ranges of one volume go one at a time.

The write path holds a range from before its journal append until its volume write is done, so
overlapping writes reach the volume in journal order; otherwise the primary's image and the
secondary's (which applies strictly in sequence) could end with different data. COMPARE AND
WRITE holds the range across its compare and its write for the same reason.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from targetd_repl.model import DEFAULT_REGION_SIZE


class RangeLock:
    """Locks whole regions (default 64 KiB): cheap to compute, coarse enough to stay small."""

    def __init__(self, region_size: int = DEFAULT_REGION_SIZE) -> None:
        self._shift = region_size.bit_length() - 1
        if 1 << self._shift != region_size:
            raise ValueError(f"region size {region_size} is not a power of two")
        self._busy: set[int] = set()
        self._released = threading.Condition(threading.Lock())

    def _regions(self, offset: int, length: int) -> range:
        first = offset >> self._shift
        last = (offset + max(length, 1) - 1) >> self._shift
        return range(first, last + 1)

    @contextmanager
    def hold(self, offset: int, length: int) -> Iterator[None]:
        """Hold every region [offset, offset+length) touches; waits while any is held."""
        regions = self._regions(offset, length)
        with self._released:
            # All-or-nothing acquisition: no partial holds, so no lock-order deadlock.
            while not self._busy.isdisjoint(regions):
                self._released.wait()
            self._busy.update(regions)
        try:
            yield
        finally:
            with self._released:
                self._busy.difference_update(regions)
                self._released.notify_all()

    @contextmanager
    def hold_spans(self, spans: Iterable[tuple[int, int]]) -> Iterator[None]:
        """Hold every region any (offset, length) span touches, all at once (a batch of writes:
        spans may overlap one another; they are one holder, so they never wait on each other)."""
        regions: set[int] = set()
        for offset, length in spans:
            regions.update(self._regions(offset, length))
        with self._released:
            # All-or-nothing, as hold(): no partial holds, so no lock-order deadlock.
            while not self._busy.isdisjoint(regions):
                self._released.wait()
            self._busy.update(regions)
        try:
            yield
        finally:
            with self._released:
                self._busy.difference_update(regions)
                self._released.notify_all()
