"""Plain domain types shared by every layer: no I/O, no behaviour beyond validation."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from targetd_repl.errors import InvalidArgument

BLOCK_SIZES = (512, 4096)
DEFAULT_REGION_SIZE = 64 * 1024
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


def check_name(kind: str, name: str) -> str:
    """Names become file names, IQN parts and LIO object names: keep them to a safe alphabet."""
    if not NAME_PATTERN.fullmatch(name):
        raise InvalidArgument(
            f"invalid {kind} name {name!r}: use 1-63 of A-Z a-z 0-9 _ . - starting alphanumeric"
        )
    return name


class Role(enum.StrEnum):
    PRIMARY = "primary"
    SECONDARY = "secondary"


class PairMode(enum.StrEnum):
    ASYNC = "async"
    SYNC = "sync"


class PairState(enum.StrEnum):
    SIMPLEX = "simplex"
    COPYING = "copying"
    PAIRED = "paired"
    SUSPENDED = "suspended"
    SUSPENDED_ERROR = "suspended-error"
    JOURNAL_FULL = "journal-full"
    SWAPPED = "swapped"


class SnapshotKind(enum.StrEnum):
    USER = "user"  # made by an admin
    RESTART_POINT = "restart-point"  # the secondary's image at takeover (seed 001)
    ROLLBACK_SAVE = "rollback-save"  # writes rolled back at failback, kept, never destroyed
    SPLIT_BRAIN_LOSER = "split-brain-loser"  # the loser's divergent data after resolve
    EXTENT_COPY = "extent-copy"  # the source extent of a one-command copy (seed 002)
    # roles/: the source image of a failback or resolve bulk copy (the "second snapshot" of seed
    # 001 claim 8), taken when the copy starts and deleted when it completes
    RESYNC_SOURCE = "resync-source"


class RecordKind(enum.IntEnum):
    """What a journal record does to its volume."""

    WRITE = 1  # data follows the header
    ZERO = 2  # the range reads as zeros afterwards (UNMAP, WRITE SAME of zeros); no data
    MARKER = 3  # no volume change: an ordering point (epoch change, copy barrier)


@dataclass(frozen=True, slots=True)
class VolumeInfo:
    id: int
    name: str
    size_bytes: int
    block_size: int
    group_id: int | None
    created_at: float

    @property
    def num_blocks(self) -> int:
        return self.size_bytes // self.block_size


@dataclass(frozen=True, slots=True)
class GroupInfo:
    id: int
    name: str
    role: Role
    epoch: int
    created_at: float
    applied_seq: int = 0  # highest journal seq applied to the volumes and flushed (checkpoint)
    acked_seq: int = 0  # highest journal seq the peer acknowledged


@dataclass(frozen=True, slots=True)
class PairInfo:
    group_id: int
    peer_site: str
    mode: PairMode
    state: PairState
    updated_at: float
    detail: str = ""  # the last error or note that came with the state (free-form)
    # roles/ (handshake fields a site must remember across restarts, migration 4):
    # a new primary whose switchover has not finished draining: the first seq of the previous
    # generation it still lacks (HandshakeView.backlog_from_seq)
    backlog_from_seq: int | None = None
    # an admin's pending `resolve --survivor SITE`, kept until the copy it starts completes
    survivor: str | None = None


@dataclass(frozen=True, slots=True)
class EpochEntry:
    """One step of a group's epoch history: who became primary, when, and how far the old
    history reached (last_seq of the previous epoch as this site knew it)."""

    group_id: int
    epoch: int
    primary_site: str
    started_at: float
    prev_last_seq: int
    reason: str


@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    id: int
    volume_id: int
    name: str
    kind: SnapshotKind
    created_at: float
    epoch: int
    seq: int  # journal sequence number the snapshot's image contains up to
