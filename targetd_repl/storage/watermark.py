"""A sequence watermark: the highest N such that every sequence number <= N is complete.

Writes of a group finish out of order (many initiator threads); the checkpoint may only claim a
prefix of the journal, so it reads this watermark rather than the newest completed seq.
"""

from __future__ import annotations

import heapq
import threading


class SequenceWatermark:
    def __init__(self, start: int) -> None:
        self._value = start
        self._done_ahead: list[int] = []  # completed seqs above the watermark (a min-heap)
        self._lock = threading.Lock()

    @property
    def value(self) -> int:
        return self._value

    def complete(self, seq: int) -> int:
        """Mark `seq` complete; return the watermark afterwards."""
        with self._lock:
            if seq <= self._value:
                return self._value  # already covered (a replayed or duplicate completion)
            heapq.heappush(self._done_ahead, seq)
            while self._done_ahead and self._done_ahead[0] == self._value + 1:
                self._value = heapq.heappop(self._done_ahead)
            return self._value

    def reset(self, value: int) -> None:
        """Restart from `value` (after a replay or a rollback that rewrote the history)."""
        with self._lock:
            self._value = value
            self._done_ahead.clear()
