"""Tunables of replication (one instance per site; tests shrink the timeouts)."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class FencePolicy(enum.StrEnum):
    """What a sync pair does with writes while the peer is unreachable (DRBD's fencing).

    none: after `sync_timeout` the pair goes suspended-error and writes complete locally,
        tracked in the unsent bitmap (availability first; the default).
    fail-writes: writes fail (the initiator sees an error) until the peer is back: the two sites
        never differ by an acknowledged write (consistency first).
    """

    NONE = "none"
    FAIL_WRITES = "fail-writes"


@dataclass(frozen=True)
class ReplicationSettings:
    batch_bytes: int = 4 << 20  # records per RecordBatch, by encoded size (channel.py: max)
    window_bytes: int = 64 << 20  # bytes sent but not yet acknowledged (flow control)
    heartbeat_interval: float = 0.2  # an idle stream sends a heartbeat this often
    linger: float = 0.01  # a busy stream waits up to this long to fill a batch ...
    linger_records: int = 512  # ... with this many records (0 linger: ship at once)
    link_timeout: float = 5.0  # no acknowledgement for this long: the link is lost
    sync_timeout: float = 5.0  # a sync write waits this long for the peer, then suspended-error
    rpc_timeout: float = 10.0  # deadline of every unary call to the peer
    reconnect_min: float = 0.1  # first retry delay after a lost link (doubles up to max)
    reconnect_max: float = 2.0
    copy_chunk_bytes: int = 1 << 20  # bytes per resync copy record (whole regions)
    copy_window_bytes: int = 8 << 20  # resync copy bytes appended but not yet acknowledged
    copy_rate_bytes: int = 0  # resync copy rate limit in bytes per second (0: none)
    journal_full_dwell: float = 0.5  # seconds a pair shows journal-full before resyncing
    ack_persist_interval: float = 0.2  # how often the acknowledged seq is written to metadata
    trim_interval: float = 1.0  # how often a checkpoint + trim runs outside the write path
    apply_batch: int = 4096  # records the secondary applies per step
    bulk: bool = True  # ask the receiver for a bulk lane (bulk.py); it may offer none
