"""The journal of one consistency group: append-only, segmented, group-committed, crash-safe.

Files. A journal is a directory of segments `seg-<first_seq:020d>.log`, each a run of records
(see journal_record.py) with contiguous sequence numbers; the last segment is the active one.
A batch never spans segments, and a segment is fdatasync'ed before the next one is created, so
every segment but the last is complete: damage there is corruption, never a torn tail.

Group commit (leader/follower: no dedicated thread, two roles taken by appenders). An appender
computes its payload CRC with no lock held, then under the lock takes the next seq and joins the
open batch. If nobody holds the writer role it takes it: it takes the whole open batch, stamps
the headers (seq, commit floor, CRC) and writes them with one pwritev. Then it takes the syncer
role if that is free: one fdatasync covers everything written so far, and the appenders of every
batch it completes are woken (per-thread locks). If another thread is syncing, the writer keeps
the writer role and writes the batch that formed meanwhile, so the next batch is copied into the
page cache while this one is flushed, without waking anyone; when there is nothing to write it
parks until a sync covers its batch or hands it the syncer role. A syncer keeps syncing while
more has been written (bounded), and may wait up to group_commit_wait for as many records as its
last fdatasync covered, so steady load shares fsyncs between all writers. At queue depth 1 the
appender does all of it in its own thread: no hand-off, no wait.

Recycling. A trimmed segment is not unlinked but renamed `spare-<first_seq:020d>.log` (up to
`spare_segments` of them) and renamed into place by the next roll-over, which then overwrites it
from offset 0, as PostgreSQL recycles WAL segments: writing into pages the file already has costs
about half of allocating new ones (tmpfs: 3 GB/s against 1.5 measured here; a disk file system
also skips block allocation and its metadata commit in every fdatasync). A recycled file holds
stale records past what was written into it. They can never pass for records of its new life:
they are whole records of the same group, but with seqs below the segment's first seq (seqs only
grow while spares are kept: a journal that restarts with no segment drops its spares first), so a
scan stops at them as at a gap, and their commit floors are below any seq they could be mistaken
for. A sealed segment may therefore end in stale bytes: it is complete when its records reach the
next segment's first seq.

Recovery. Each record carries commit_floor, the highest seq durable when it was written. At open
the last segment is scanned; the first record S that fails its checks is a torn tail (truncated)
unless a later valid record has commit_floor >= S.seq, which proves S was acknowledged: then the
journal raises JournalCorrupt rather than drop acknowledged data.
"""

from __future__ import annotations

import bisect
import os
import re
import threading
import time
from _thread import LockType, allocate_lock
from array import array
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import crc32c

from targetd_repl.errors import (
    InvalidArgument,
    JournalClosed,
    JournalCorrupt,
    JournalError,
    JournalFull,
    SequenceGap,
    SequenceTrimmed,
)
from targetd_repl.model import RecordKind
from targetd_repl.storage.journal_record import (
    CRC_FIELD,
    CRC_OFFSET,
    FORMAT_VERSION,
    HEADER,
    HEADER_SIZE,
    MAGIC,
    U32_MAX,
    U64_MAX,
    Record,
    check_fields,
    decode_at,
    payload_size,
    verify_at,
)

__all__ = [
    "DEFAULT_GROUP_COMMIT_WAIT",
    "DEFAULT_SEGMENT_SIZE",
    "Journal",
    "ShippedEntry",
    "pwritev_all",
    "remove_segments",
    "segment_name",
]

DEFAULT_SEGMENT_SIZE = 64 * 1024 * 1024
# How long an fdatasync may wait for more appends to share it (see Journal._gather).
DEFAULT_GROUP_COMMIT_WAIT = 0.0005
# How many fdatasyncs in a row one syncer runs before it hands the role on (see Journal._sync).
SYNC_ROUNDS = 16
IOV_MAX = min(os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 1024, 1024)
READ_CHUNK = 1 << 20
_NO_WATCH = 1 << 64  # no tailer waits beyond a seq (above every seq)
SEGMENT_RE = re.compile(r"^seg-(\d{20})\.log$")
SPARE_RE = re.compile(r"^spare-(\d{20})\.log$")
DEFAULT_SPARE_SEGMENTS = 2
_WRITE = int(RecordKind.WRITE)
# Payloads from this size on get their CRC32C computed without the GIL (crc32c's
# gil_release_mode): the data path's loop thread parses and serves reads meanwhile. Smaller ones
# keep it: taking the GIL back may wait a switch interval, far more than their CRC costs.
_GIL_FREE_CRC = 64 << 10

# The fields of one append: kind, epoch, volume_id, length, lba, timestamp_ns, data, data_crc.
_Fields = tuple[int, int, int, int, int, int, bytes | memoryview, int]
# A checked record of a shipped batch (Journal.check_shipped), in the order of _Fields.
ShippedEntry = _Fields
# One queued append: its seq and its fields.
_Entry = tuple[int, _Fields]


def segment_name(first_seq: int) -> str:
    return f"seg-{first_seq:020d}.log"


def spare_name(first_seq: int) -> str:
    return f"spare-{first_seq:020d}.log"


def remove_segments(path: Path) -> None:
    """Delete a closed journal's files (spares first: see Recycling) and fsync the directory."""
    for pattern in (SPARE_RE, SEGMENT_RE):
        for name in sorted(os.listdir(path)):
            if pattern.match(name):
                os.unlink(path / name)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Segment:
    """One segment file and its record index (offsets[i] is where seq first_seq + i starts)."""

    __slots__ = ("first_seq", "offsets", "path", "size", "write_fd")

    def __init__(self, path: Path, first_seq: int, offsets: array[int], size: int) -> None:
        self.path = path
        self.first_seq = first_seq
        self.offsets = offsets
        self.size = size  # bytes written (records only; a torn tail was cut at open)
        self.write_fd: int | None = None  # open only on the active segment

    @property
    def end_seq(self) -> int:
        """One past the last seq written to this segment."""
        return self.first_seq + len(self.offsets)


class _Batch:
    """Appends that share one write. Every waiting appender blocks on a lock of its own, released
    when the batch is finished (durable, or failed with `error`). Two of them may instead be
    woken to take a role: the first appender of a batch that formed behind a busy writer
    (`lead_waiter`, handed the writer role) and the batch's writer once it has written
    (`sync_waiter`, parked while another thread syncs, maybe handed the syncer role).
    Bare locks rather than Events: this is the hot path, and an Event costs a Condition."""

    __slots__ = (
        "entries",
        "error",
        "finished",
        "last_seq",
        "lead_waiter",
        "sync_waiter",
        "waiters",
    )

    def __init__(self) -> None:
        self.entries: list[_Entry] = []
        self.last_seq = 0
        self.error: str | None = None
        self.finished = False
        self.waiters: list[LockType] = []
        self.lead_waiter: LockType | None = None
        self.sync_waiter: LockType | None = None

    def grant_lead(self) -> None:
        """Wake the candidate to write this batch (journal lock held)."""
        if self.lead_waiter is not None:
            self.lead_waiter.release()
            self.lead_waiter = None

    def grant_sync(self) -> bool:
        """Wake this batch's parked writer to run the next fdatasync (journal lock held)."""
        if self.sync_waiter is None:
            return False
        self.sync_waiter.release()
        self.sync_waiter = None
        return True

    def finish(self, error: str | None = None) -> None:
        """Record the outcome and wake every appender of the batch (journal lock held)."""
        if self.finished:
            return
        self.finished = True
        self.error = error
        for waiter in self.waiters:
            waiter.release()
        # Role waiters wake too; they see `finished` and return (or raise `error`).
        self.grant_lead()
        self.grant_sync()


@dataclass(frozen=True, slots=True)
class RawRun:
    """A run of durable records as stored (Journal.open_raw): `length` bytes at `offset` of
    the open file `fd` (the caller closes it), `count` records, the first one's header."""

    path: Path
    fd: int
    offset: int
    length: int
    count: int
    head: bytes

    @property
    def shape(self) -> tuple[int, int, bytes]:
        """(count, length, head)."""
        return self.count, self.length, self.head


class Journal:
    """See the module docstring. Thread-safe; open with Journal.open()."""

    def __init__(
        self,
        *,
        path: Path,
        dir_fd: int,
        group_id: int,
        size_limit: int,
        segment_size: int,
        group_commit_wait: float,
        segments: list[_Segment],
        spares: list[Path],
        spare_segments: int,
    ) -> None:
        self._path = path
        self._dir_fd = dir_fd
        self._group_id = group_id
        self._size_limit = size_limit
        self._segment_size = segment_size
        self._segments = segments
        self._segment_starts = [s.first_seq for s in segments]
        self._spares = spares  # trimmed segment files kept for reuse (see Recycling)
        self._spare_limit = spare_segments
        self._active = segments[-1]
        self._lock = threading.Lock()
        # Two conditions on the one lock, so a write wakes only who waits for writes.
        # A gathering syncer waits for writes; a roll-over waits for the syncer role.
        self._written_cond = threading.Condition(self._lock)
        self._state_cond = threading.Condition(self._lock)  # durable_seq, failure, close
        last = self._active.end_seq - 1
        self._next_seq = last + 1
        self._written_seq = last  # highest seq whose bytes are in the file
        self._durable_seq = last  # highest seq made durable by an fdatasync
        self._used = sum(s.size for s in segments)  # bytes on disk plus bytes reserved by appends
        self._open_batch = _Batch()
        self._inflight: deque[_Batch] = deque()  # taken by a writer, not yet durable, seq order
        self._writer_busy = False  # a writer is writing, or the role was handed to a candidate
        self._syncing = False  # a thread holds the syncer role (gathering, syncing, rolling)
        self._gathering = False
        self._sync_group = 1  # records the last fdatasync covered: what _gather() waits for
        self._sync_woke = 0  # appenders the last fdatasync woke (besides the syncer itself)
        self._group_commit_wait = group_commit_wait
        self._roll_waiting = False
        self._roll_requested = False
        self._io_threads = 0  # threads inside a syscall on our fds: close() waits for them
        self._state_watchers = 0  # threads in wait_durable_beyond(), and close()
        self._watch_seqs: list[int] = []  # the seqs they wait beyond
        self._watch_min = _NO_WATCH  # the lowest of them
        self._closing = False
        self._closed = False
        self._failure: str | None = None
        self._fsyncs = 0

    # --- opening and recovery ---------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: Path,
        *,
        group_id: int,
        size_limit: int,
        segment_size: int = DEFAULT_SEGMENT_SIZE,
        start_seq: int = 1,
        group_commit_wait: float = DEFAULT_GROUP_COMMIT_WAIT,
        spare_segments: int = DEFAULT_SPARE_SEGMENTS,
    ) -> Journal:
        """Open (or create) the journal in directory `path`, cutting a torn tail left by a crash.

        `start_seq` names the first seq only when the directory holds no segment yet.
        `group_commit_wait` bounds how long an fdatasync may wait for more appends to share it.
        `spare_segments` trimmed segment files are kept for reuse by later roll-overs.
        Raises JournalCorrupt when damage hits a record that was acknowledged (as the commit
        floor of a later record proves) or any record of a sealed segment."""
        if not 0 <= group_id <= U32_MAX:
            raise InvalidArgument(f"group id {group_id} out of range 0..{U32_MAX}")
        if size_limit <= 0 or segment_size <= 0 or group_commit_wait < 0 or spare_segments < 0:
            raise InvalidArgument(
                "journal size_limit and segment_size must be positive, group_commit_wait and "
                "spare_segments >= 0"
            )
        if start_seq < 1:
            raise InvalidArgument(f"journal start_seq must be >= 1, got {start_seq}")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        write_fd = -1
        try:
            segments, spares = _recover(path, dir_fd, group_id, start_seq)
            write_fd = os.open(segments[-1].path, os.O_WRONLY | os.O_CLOEXEC)
            # Records the previous process wrote but never synced are on disk only in the page
            # cache: sync them before calling them durable.
            os.fdatasync(write_fd)
        except BaseException:
            if write_fd >= 0:
                os.close(write_fd)
            os.close(dir_fd)
            raise
        segments[-1].write_fd = write_fd
        return cls(
            path=path,
            dir_fd=dir_fd,
            group_id=group_id,
            size_limit=size_limit,
            segment_size=segment_size,
            group_commit_wait=group_commit_wait,
            segments=segments,
            spares=spares,
            spare_segments=spare_segments,
        )

    # --- properties ---------------------------------------------------------------------------

    @property
    def path(self) -> Path:
        return self._path

    @property
    def group_id(self) -> int:
        return self._group_id

    @property
    def first_seq(self) -> int:
        """The oldest seq still readable (== next_seq when the journal holds no record)."""
        with self._lock:
            return self._segments[0].first_seq

    @property
    def next_seq(self) -> int:
        """The seq the next append gets (last assigned + 1)."""
        return self._next_seq

    @property
    def durable_seq(self) -> int:
        """Every seq up to this one is durable and readable."""
        return self._durable_seq

    @property
    def used_bytes(self) -> int:
        """Bytes of the records in segment files (not stale bytes of a recycled file) plus bytes
        reserved by appends not yet written."""
        return self._used

    @property
    def size_limit(self) -> int:
        return self._size_limit

    @property
    def segment_size(self) -> int:
        return self._segment_size

    @property
    def fsync_count(self) -> int:
        """fdatasync calls made for appends since open (group commit keeps this below appends)."""
        return self._fsyncs

    @property
    def spare_segments(self) -> int:
        """How many trimmed segment files are kept for reuse at most."""
        return self._spare_limit

    @property
    def spare_count(self) -> int:
        """Trimmed segment files kept for reuse."""
        with self._lock:
            return len(self._spares)

    @property
    def segment_count(self) -> int:
        return len(self._segments)

    # --- appending ----------------------------------------------------------------------------

    def append(
        self,
        kind: RecordKind,
        volume_id: int,
        lba: int,
        data: bytes | bytearray | memoryview,
        *,
        epoch: int,
        length: int | None = None,
    ) -> int:
        """Append one record and return its seq once it is durable (fdatasync'ed).

        WRITE records carry `data` (length defaults to its size); ZERO and MARKER records carry
        none and `length` gives the range they affect. Raises JournalFull (nothing appended),
        InvalidArgument, JournalClosed, or JournalError after an I/O error."""
        if type(data) is not bytes:
            data = memoryview(data).cast("B")
        size = len(data)
        if length is None:
            length = size
        check_fields(kind, volume_id=volume_id, lba=lba, length=length, data_size=size, epoch=epoch)
        # The payload CRC is the costly part: compute it before taking any lock (and a large
        # payload's without the GIL, see _GIL_FREE_CRC).
        data_crc: int = crc32c.crc32c(data, 0, size >= _GIL_FREE_CRC) if size else 0
        return self._enqueue(
            None, (int(kind), epoch, volume_id, length, lba, time.time_ns(), data, data_crc)
        )

    def append_batch(
        self,
        items: Sequence[tuple[RecordKind, int, int, bytes | bytearray | memoryview, int]],
        *,
        epoch: int,
    ) -> int:
        """Append local records (kind, volume_id, lba, data, length) as ONE group commit: one
        lock round, one pwritev, one fdatasync for all of them. They get contiguous seqs in list
        order; returns the last seq once every record is durable (the first is last -
        len(items) + 1). All or nothing: each record is checked before any is queued, and
        JournalFull (nothing appended) if the batch does not fit. Raises as `append`."""
        if not items:
            raise InvalidArgument("append_batch needs at least one record")
        entries: list[_Fields] = []
        now = time.time_ns()
        crc = crc32c.crc32c
        epoch_ok = 0 <= epoch <= U64_MAX
        for kind, volume_id, lba, raw, length in items:
            data = raw if type(raw) is bytes else memoryview(raw).cast("B")
            size = len(data)
            if not (
                kind == _WRITE
                and size == length <= U32_MAX
                and 0 <= volume_id <= U32_MAX
                and 0 <= lba <= U64_MAX
                and epoch_ok
            ):  # not a plain WRITE record the header holds: the full checks say why, or pass
                check_fields(
                    kind, volume_id=volume_id, lba=lba, length=length, data_size=size, epoch=epoch
                )
            # The payload CRCs are computed before any lock is taken, as in append(); a large
            # payload's without the GIL (see _GIL_FREE_CRC).
            entries.append(
                (
                    int(kind),
                    epoch,
                    volume_id,
                    length,
                    lba,
                    now,
                    data,
                    crc(data, 0, size >= _GIL_FREE_CRC) if size else 0,
                )
            )
        return self._queue_batch(None, entries)

    def append_record(self, record: Record) -> int:
        """Append a record replicated from the peer, keeping its seq, epoch and timestamp.

        Its seq must be next_seq (else SequenceGap) and its CRC must verify (else
        JournalCorrupt). The local commit_floor is stamped, so the stored header differs from the
        shipped one in that field and the crc."""
        if record.group_id != self._group_id:
            raise InvalidArgument(
                f"record seq {record.seq} is for group {record.group_id}, "
                f"this journal is group {self._group_id}"
            )
        data = record.data
        check_fields(
            record.kind,
            volume_id=record.volume_id,
            lba=record.lba,
            length=record.length,
            data_size=len(data),
            epoch=record.epoch,
        )
        data_crc = record.data_crc()  # verifies the shipped CRC first
        return self._enqueue(
            record.seq,
            (
                int(record.kind),
                record.epoch,
                record.volume_id,
                record.length,
                record.lba,
                record.timestamp_ns,
                data,
                data_crc,
            ),
        )

    def append_records(
        self, records: Sequence[Record], *, volume_map: Mapping[int, int] | None = None
    ) -> int:
        """Append a batch of records replicated from the peer as ONE group commit (one write,
        one fdatasync for the batch, not one per record); return the last seq once durable.

        All or nothing: every record is checked first — contiguous seqs from next_seq
        (SequenceGap), a CRC that verifies as shipped (JournalCorrupt), fields the header can
        hold (InvalidArgument) — and only then is the batch queued. Group and volume ids are
        site-local: with `volume_map` (peer volume id -> ours) the records are stored under this
        journal's group id and our volume ids, with the payload CRC computed once for both the
        check and the restamped header; without it they must already carry our group id."""
        if not records:
            return self._durable_seq
        entries: list[_Fields] = []
        for record in records:
            if volume_map is None:
                if record.group_id != self._group_id:
                    raise InvalidArgument(
                        f"record seq {record.seq} is for group {record.group_id}, "
                        f"this journal is group {self._group_id}"
                    )
                volume_id = record.volume_id
            else:
                try:
                    volume_id = volume_map[record.volume_id]
                except KeyError:
                    raise InvalidArgument(
                        f"record seq {record.seq} names the peer's volume id {record.volume_id}, "
                        "which maps to no volume of the group here"
                    ) from None
            data = record.data
            check_fields(
                record.kind,
                volume_id=volume_id,
                lba=record.lba,
                length=record.length,
                data_size=len(data),
                epoch=record.epoch,
            )
            data_crc = record.data_crc()  # verifies the shipped CRC (with the peer's ids)
            entries.append(
                (
                    int(record.kind),
                    record.epoch,
                    volume_id,
                    record.length,
                    record.lba,
                    record.timestamp_ns,
                    data,
                    data_crc,
                )
            )
        first = records[0].seq
        for offset, record in enumerate(records):
            if record.seq != first + offset:
                raise SequenceGap(
                    f"journal {self._path}: batch from seq {first} has seq {record.seq} "
                    f"at position {offset}"
                )
        return self._queue_batch(first, entries)

    def append_shipped(
        self,
        buf: bytes | memoryview,
        *,
        first_seq: int,
        count: int,
        volume_map: Mapping[int, int],
        peer_group_id: int | None = None,
    ) -> int:
        """Append a shipped batch, `count` records encoded back to back in `buf` (the sender's
        journal bytes, as read_raw returns them), as ONE group commit; return the last seq once
        durable: `check_shipped`, then `append_checked`."""
        entries = self.check_shipped(
            buf,
            first_seq=first_seq,
            count=count,
            volume_map=volume_map,
            peer_group_id=peer_group_id,
        )
        return self.append_checked(first_seq, entries)

    def append_checked(self, first_seq: int, entries: list[ShippedEntry]) -> int:
        """Append what `check_shipped` returned as ONE group commit (SequenceGap unless
        first_seq is next_seq, JournalFull if it does not fit); return the last seq once
        durable. The payloads are written from the checked buffer without a copy."""
        return self._queue_batch(first_seq, entries)

    def check_shipped(
        self,
        buf: bytes | memoryview,
        *,
        first_seq: int,
        count: int,
        volume_map: Mapping[int, int],
        peer_group_id: int | None = None,
    ) -> list[ShippedEntry]:
        """Check a shipped batch and return its entries for `append_checked`, (kind, epoch,
        volume_id, length, lba, timestamp_ns, data, data_crc) per record under our volume ids,
        `data` a view into `buf` (keep `buf` alive and unchanged while they are used). The lean
        form of append_records for the replication receiver: no Record objects, one CRC32C pass
        over each payload, which both verifies the shipped CRC and restamps the header.

        Every check comes before anything is queued: a record that does not verify is
        JournalCorrupt; bytes that do not hold exactly `count` records from `first_seq`, a
        volume id `volume_map` does not map, or (with `peer_group_id`) another group id, are
        InvalidArgument; seqs that are not contiguous are SequenceGap."""
        view = memoryview(buf).cast("B")
        total = view.nbytes
        entries: list[_Fields] = []
        offset = 0
        expected = first_seq
        while offset < total:
            fields, data_crc = verify_at(view, offset)
            kind, group_id, seq, epoch, _, peer_volume, length, lba, timestamp_ns, _ = fields
            if seq != expected:
                if entries:
                    raise SequenceGap(
                        f"journal {self._path}: batch from seq {first_seq} has seq {seq} "
                        f"at position {len(entries)}"
                    )
                raise InvalidArgument(
                    f"batch claims {count} records from seq {first_seq}, its bytes hold "
                    f"records from seq {seq}"
                )
            if peer_group_id is not None and group_id != peer_group_id:
                raise InvalidArgument(
                    f"record seq {seq} is for the peer's group {group_id}, "
                    f"the stream is for group {peer_group_id}"
                )
            try:
                volume_id = volume_map[peer_volume]
            except KeyError:
                raise InvalidArgument(
                    f"record seq {seq} names the peer's volume id {peer_volume}, "
                    "which maps to no volume of the group here"
                ) from None
            start = offset + HEADER_SIZE
            size = length if kind == _WRITE else 0
            entries.append(
                (
                    kind,
                    epoch,
                    volume_id,
                    length,
                    lba,
                    timestamp_ns,
                    view[start : start + size],
                    data_crc,
                )
            )
            offset = start + size
            expected += 1
        if len(entries) != count or not entries:
            raise InvalidArgument(
                f"batch claims {count} records from seq {first_seq}, its bytes hold {len(entries)}"
            )
        return entries

    def _queue_batch(self, first: int | None, entries: list[_Fields]) -> int:
        """Queue checked entries for seqs first.. (None: from next_seq, a local batch) as one
        group commit and wait until durable; return the last seq."""
        # Queue the whole batch under one lock hold, then wait exactly as _enqueue does: the
        # records join the open batch, so one pwritev and one fdatasync cover them all.
        with self._lock:
            self._check_usable()
            if first is None:
                first = self._next_seq  # seqs taken under the lock: contiguous, in list order
            last = first + len(entries) - 1
            if first != self._next_seq:
                raise SequenceGap(
                    f"journal {self._path}: got record seq {first}, expected {self._next_seq}"
                )
            size = HEADER_SIZE * len(entries) + sum([len(fields[6]) for fields in entries])
            if self._used + size > self._size_limit:
                raise JournalFull(
                    f"journal {self._path}: {size} more bytes would pass the size limit "
                    f"({self._used} of {self._size_limit} bytes used)"
                )
            self._next_seq = last + 1
            self._used += size
            batch = self._open_batch
            was_empty = not batch.entries
            batch.entries.extend(zip(range(first, last + 1), entries, strict=True))
            batch.last_seq = last
            waiter: LockType | None
            if self._writer_busy:
                waiter = allocate_lock()
                waiter.acquire()
                if was_empty:
                    batch.lead_waiter = waiter  # first of the next batch: it will write it
                else:
                    batch.waiters.append(waiter)
            else:
                self._writer_busy = True
                waiter = None
        if waiter is not None:
            waiter.acquire()
        if not batch.finished:
            self._lead(batch)
        self._wait_finished(batch)
        if batch.error is not None:
            raise JournalError(batch.error)
        return last

    def _enqueue(self, seq: int | None, fields: _Fields) -> int:
        record_size = HEADER_SIZE + len(fields[6])
        with self._lock:
            self._check_usable()
            if self._used + record_size > self._size_limit:
                raise JournalFull(
                    f"journal {self._path}: {record_size} more bytes would pass the size limit "
                    f"({self._used} of {self._size_limit} bytes used)"
                )
            if seq is None:
                seq = self._next_seq
            elif seq != self._next_seq:
                raise SequenceGap(
                    f"journal {self._path}: got record seq {seq}, expected {self._next_seq}"
                )
            self._next_seq = seq + 1
            self._used += record_size
            batch = self._open_batch
            batch.entries.append((seq, fields))
            batch.last_seq = seq
            if self._writer_busy:
                waiter = allocate_lock()
                waiter.acquire()
                if len(batch.entries) == 1:
                    batch.lead_waiter = waiter  # first of the next batch: it will write it
                else:
                    batch.waiters.append(waiter)
            else:
                self._writer_busy = True
                waiter = None  # no writer: this appender writes its batch itself, now
        if waiter is not None:
            waiter.acquire()  # released when the batch is finished, or handed to us to write
        if not batch.finished:
            self._lead(batch)
        self._wait_finished(batch)
        if batch.error is not None:
            raise JournalError(batch.error)
        return seq

    def _wait_finished(self, batch: _Batch) -> None:
        """Block until `batch` is durable or failed: the one place that decides an ack. A writer
        can leave its roles before its batch is synced (a roll-over took the syncer role); it
        then waits here like any appender for the sync that covers it."""
        with self._lock:
            if batch.finished:
                return
            waiter = allocate_lock()
            waiter.acquire()
            batch.waiters.append(waiter)
        waiter.acquire()

    # --- group commit: the writer role --------------------------------------------------------

    def _lead(self, batch: _Batch) -> None:
        """Write `batch` as the writer, then see it synced.

        A writer keeps the role while a sync runs and writes whatever batch formed meanwhile
        itself: it would only wait otherwise, and handing the role to a sleeping appender costs
        a wake-up per write. It answers for the newest batch it wrote (`current`; durable implies
        every earlier one is): it leaves once that one is durable, or it runs the next fdatasync
        itself, or it parks on that batch until a sync covers it or hands it the syncer role. So
        whenever something written is not durable, a syncer runs or will be handed the role."""
        with self._lock:
            if batch.finished:
                return
            self._take(batch)
        current = batch
        while True:
            try:
                self._write_batch(current.entries)
            except Exception as exc:
                with self._lock:
                    self._io_threads -= 1
                    self._writer_busy = False
                    self._poison(f"writing {self._active.path}", exc)
                if not isinstance(exc, OSError):
                    raise  # a bug, not an I/O error: the journal is poisoned, show it loudly
                return
            with self._lock:
                self._io_threads -= 1
                if self._failure is not None:
                    self._writer_busy = False
                    self._state_cond.notify_all()
                    return
                if current.finished:  # durable already (a roll-over inside the write synced it)
                    self._release_writer_role()
                    return
                if not self._syncing:
                    self._syncing = True
                    self._release_writer_role()
                    parked = None
                    break
                if self._open_batch.entries:
                    current = self._open_batch
                    self._take(current)
                    continue
                # Nothing to write and a sync is running: park until a sync covers `current`
                # or the syncer hands us its role.
                self._release_writer_role()
                parked = allocate_lock()
                parked.acquire()
                current.sync_waiter = parked
                break
        if parked is not None:
            parked.acquire()
            if current.finished:
                return
        self._sync()

    def _take(self, batch: _Batch) -> None:
        """Take the open batch for writing (lock held, writer role held)."""
        assert batch is self._open_batch
        self._open_batch = _Batch()
        self._inflight.append(batch)
        self._io_threads += 1
        if batch.lead_waiter is not None:
            # Its candidate writer will not be needed: it waits for the batch like the rest.
            batch.waiters.append(batch.lead_waiter)
            batch.lead_waiter = None

    def _release_writer_role(self) -> None:
        """Give the writer role to the first appender of the open batch, or free it (lock held).
        Handing it on before syncing lets the next batch be copied into the page cache while
        this one is being flushed."""
        if self._open_batch.entries:
            self._open_batch.grant_lead()
        else:
            self._writer_busy = False

    def _write_batch(self, entries: list[_Entry]) -> None:
        """Stamp headers and write `entries` at the end of the active segment, rolling over to a
        new segment first whenever the next records would not fit (never mid-record)."""
        sizes = [HEADER_SIZE + len(fields[6]) for _, fields in entries]
        start = 0
        count = len(entries)
        while start < count:
            seg = self._active
            if self._roll_requested and seg.size:
                self._roll_over()
                continue
            room = self._segment_size - seg.size
            end = start
            chunk = 0
            while end < count and chunk + sizes[end] <= room:
                chunk += sizes[end]
                end += 1
            if end == start:
                if seg.size:
                    self._roll_over()
                    continue
                end = start + 1  # a record larger than a segment gets a segment of its own
                chunk = sizes[start]
            self._write_chunk(seg, entries[start:end], chunk)
            start = end

    def _write_chunk(self, seg: _Segment, entries: list[_Entry], nbytes: int) -> None:
        # Reading durable_seq without the lock is safe: it only grows, and a stale (lower)
        # floor only makes recovery more lenient about what it may call a torn tail.
        floor = self._durable_seq
        group_id = self._group_id
        pack_header = HEADER.pack_into
        pack_crc = CRC_FIELD.pack_into
        crc = crc32c.crc32c
        headers = bytearray(HEADER_SIZE * len(entries))
        view = memoryview(headers)
        iov: list[bytes | memoryview] = []
        offsets = array("Q")
        pos = seg.size
        at = 0
        for seq, (kind, epoch, volume_id, length, lba, timestamp_ns, data, data_crc) in entries:
            pack_header(
                headers,
                at,
                MAGIC,
                FORMAT_VERSION,
                kind,
                0,
                group_id,
                seq,
                epoch,
                floor,
                volume_id,
                length,
                lba,
                timestamp_ns,
                0,
            )
            pack_crc(headers, at + CRC_OFFSET, crc(view[at : at + CRC_OFFSET], data_crc))
            iov.append(view[at : at + HEADER_SIZE])
            if kind == _WRITE and length:
                iov.append(data)
            offsets.append(pos)
            pos += HEADER_SIZE + len(data)
            at += HEADER_SIZE
        assert seg.write_fd is not None
        pwritev_all(seg.write_fd, iov, seg.size, nbytes)
        with self._lock:
            seg.offsets.extend(offsets)
            seg.size = pos
            self._written_seq = entries[-1][0]
            if self._gathering:
                self._written_cond.notify()

    # --- group commit: the syncer role --------------------------------------------------------

    def _sync(self) -> None:
        """Run fdatasyncs as the syncer, then pass the role on (called holding the role).

        One fdatasync at a time: an error reported to a concurrent fdatasync on the same file
        could be consumed by the wrong caller, and a lost batch acknowledged. While more has
        been written meanwhile, the syncer goes on syncing (up to SYNC_ROUNDS times, so its own
        caller is not held long): handing the role to a parked writer costs a thread wake-up,
        which under load is much of the gap between two fdatasyncs."""
        rounds = 0
        while True:
            with self._lock:
                target = self._next_sync_target() if rounds < SYNC_ROUNDS else None
                if target is None:
                    self._pass_sync_role()
                    return
                fd = self._active.write_fd
            assert fd is not None
            try:
                os.fdatasync(fd)
            except OSError as exc:
                with self._lock:
                    self._io_threads -= 1
                    self._poison(f"syncing {self._active.path}", exc)
                    self._pass_sync_role()
                return
            rounds += 1
            with self._lock:
                self._io_threads -= 1
                self._fsyncs += 1
                self._sync_group = target - self._durable_seq
                wake = self._complete(target)
                self._sync_woke = len(wake)
            # Wake appenders only after fdatasync returned: an ack promises durability.
            for waiter in wake:
                waiter.release()

    def _next_sync_target(self) -> int | None:
        """The seq the next fdatasync will make durable, or None if there is no reason to sync
        (lock held; on a target the caller holds an I/O slot until the sync is done)."""
        pending = self._written_seq - self._durable_seq
        if 0 < pending < self._sync_group and self._sync_woke:
            self._gather()
        if (
            self._failure is not None
            or self._roll_waiting
            or self._written_seq == self._durable_seq
        ):
            return None
        self._io_threads += 1
        return self._written_seq  # everything written before the sync starts is covered

    def _gather(self) -> None:
        """Wait (lock held) until as many records are written as the last fdatasync covered,
        while they keep coming: at most group_commit_wait, and no longer than a quarter of it
        without a new write. Under a steady load this turns two half-size fsyncs into one (the
        appenders the last sync woke are on their way back); at queue depth 1 the last group
        was one record, so there is no wait at all. Nor is there when the last sync woke nobody
        but the syncer: one appender of whole batches (the data path's writer thread) has
        nobody on the way back, and would only wait out the timeout."""
        now = time.monotonic()
        deadline = now + self._group_commit_wait
        idle = self._group_commit_wait / 4
        quiet_until = now + idle
        seen = self._written_seq
        self._gathering = True
        while (
            self._written_seq - self._durable_seq < self._sync_group
            and self._failure is None
            and not self._closing
            and not self._roll_waiting
        ):
            now = time.monotonic()
            if self._written_seq != seen:
                seen = self._written_seq
                quiet_until = now + idle
            wait = min(deadline, quiet_until) - now
            if wait <= 0:
                break
            self._written_cond.wait(wait)
        self._gathering = False

    def _pass_sync_role(self) -> None:
        """Give the syncer role to the oldest parked writer whose batch is not durable yet, or
        release it (lock held)."""
        if self._failure is None and not self._roll_waiting:
            for batch in self._inflight:
                if batch.grant_sync():
                    return
        self._syncing = False
        if self._roll_waiting:
            self._written_cond.notify_all()  # the roll-over waits for the role
        if self._closing:
            self._state_cond.notify_all()  # so does close()

    def _complete(self, target: int) -> list[LockType]:
        """Advance durable_seq to `target` (lock held); mark the batches it completes finished
        and return the locks that wake their appenders (for the caller to release)."""
        self._durable_seq = max(self._durable_seq, target)
        wake: list[LockType] = []
        inflight = self._inflight
        while inflight and inflight[0].last_seq <= self._durable_seq:
            batch = inflight.popleft()
            batch.finished = True
            wake.extend(batch.waiters)
            if batch.sync_waiter is not None:
                wake.append(batch.sync_waiter)
                batch.sync_waiter = None
        if self._state_watchers and (self._durable_seq > self._watch_min or self._closing):
            self._state_cond.notify_all()
        return wake

    def _roll_over(self) -> None:
        """Seal the active segment and start the next one (called by the writer)."""
        with self._lock:
            # Take the syncer role for the whole switch: no fdatasync may use the old fd while
            # it is closed, and the old segment must be durable before a later segment exists.
            self._roll_waiting = True  # the syncer passes the role to us, not to a writer
            self._written_cond.notify_all()  # and stops gathering
            while self._syncing and self._failure is None:
                self._written_cond.wait()
            self._roll_waiting = False
            if self._failure is not None:
                raise OSError(f"journal failed earlier: {self._failure}")
            self._syncing = True
            self._io_threads += 1
            old = self._active
            target = self._written_seq
            durable = self._durable_seq
        new: _Segment | None = None
        try:
            assert old.write_fd is not None
            if durable < target:
                os.fdatasync(old.write_fd)
            new = _Segment(self._path / segment_name(old.end_seq), old.end_seq, array("Q"), 0)
            spare = self._take_spare()
            if spare is not None:
                # Reuse: its stale records have seqs below old.end_seq (see Recycling).
                os.rename(spare, new.path)
                new.write_fd = os.open(new.path, os.O_WRONLY | os.O_CLOEXEC)
            else:
                new.write_fd = os.open(
                    new.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644
                )
            os.fsync(self._dir_fd)  # the new segment's name must survive a crash
        except OSError:
            with self._lock:
                self._syncing = False
                self._io_threads -= 1
            if new is not None and new.write_fd is not None:
                os.close(new.write_fd)
            raise
        with self._lock:
            self._io_threads -= 1
            if durable < target:
                self._fsyncs += 1
            self._segments.append(new)
            self._segment_starts.append(new.first_seq)
            self._active = new
            self._roll_requested = False
            os.close(old.write_fd)
            old.write_fd = None
            wake = self._complete(target)
            self._pass_sync_role()
        for waiter in wake:
            waiter.release()

    def _take_spare(self) -> Path | None:
        with self._lock:
            return self._spares.pop() if self._spares else None

    def _poison(self, what: str, exc: Exception) -> None:
        """After an I/O error nothing more is written or acknowledged (lock held)."""
        if self._failure is None:
            self._failure = f"journal {self._path}: I/O error {what}: {exc}; journal failed"
        for batch in (*self._inflight, self._open_batch):
            batch.finish(self._failure)
        self._inflight.clear()
        self._open_batch = _Batch()
        self._state_cond.notify_all()
        self._written_cond.notify_all()

    def _check_usable(self) -> None:
        if self._failure is not None:
            raise JournalError(self._failure)
        self._check_open()

    def _check_open(self) -> None:
        if self._closing:
            raise JournalClosed(f"journal {self._path} is closed")

    # --- reading ------------------------------------------------------------------------------

    def read_from(self, seq: int, max_records: int | None = None) -> Iterator[Record]:
        """Yield durable records from `seq` on, in order, up to the durable_seq of this call.

        Raises SequenceTrimmed (now, not at the first next()) when `seq` was trimmed away; the
        iterator raises JournalCorrupt if a record no longer verifies."""
        with self._lock:
            self._check_open()  # durable records stay readable after an I/O error
            first = self._segments[0].first_seq
            if seq < first:
                raise SequenceTrimmed(
                    f"journal {self._path}: seq {seq} was trimmed, the first kept is {first}"
                )
            last = self._durable_seq
        if max_records is not None:
            last = min(last, seq + max_records - 1)
        return self._iter_records(seq, last)

    def read_raw(self, seq: int, max_bytes: int) -> tuple[int, bytes]:
        """The durable records from `seq` on as their stored bytes, back to back, with one pread:
        (count, bytes). Stops at about `max_bytes` (at least one record), at the end of the
        segment that holds `seq`, and at the durable_seq of this call; (0, b"") when `seq` is
        not durable yet. For the replication sender, which ships these bytes as they are: the
        receiver verifies every record's CRC32C. Only the first header is checked here (its
        seq and group: the index must point at the record asked for).

        Raises SequenceTrimmed when `seq` was trimmed away, JournalCorrupt on a short read or a
        first header that names another record."""
        run = self.open_raw(seq, max_bytes)
        if run is None:
            return 0, b""
        try:
            data = os.pread(run.fd, run.length, run.offset)
        finally:
            os.close(run.fd)
        if len(data) != run.length:
            raise JournalCorrupt(
                f"{run.path}: reading {run.count} records from seq {seq}: {len(data)} of "
                f"{run.length} bytes"
            )
        return run.count, data

    def open_raw(self, seq: int, max_bytes: int) -> RawRun | None:
        """Where `read_raw` would read, as an open file: the caller sends the bytes (sendfile)
        and closes `fd`. None when `seq` is not durable yet; the first header is read and
        checked (same errors as read_raw)."""
        with self._lock:
            self._check_open()  # durable records stay readable after an I/O error
            if seq < self._segments[0].first_seq:
                raise SequenceTrimmed(
                    f"journal {self._path}: seq {seq} was trimmed, the first kept is "
                    f"{self._segments[0].first_seq}"
                )
            last = self._durable_seq
            if seq > last:
                return None
            index = bisect.bisect_right(self._segment_starts, seq) - 1
            seg = self._segments[index]
            offsets = seg.offsets
            base = seg.first_seq
            start = offsets[seq - base]
            most = min(last + 1, seg.end_seq)  # one past the last seq we may read
            # offsets[i] is where record base + i starts, so where record base + i - 1 ends:
            # the records up to the last that ends within max_bytes (at least one record).
            limit = start + max_bytes
            hi = min(most - base + 1, len(offsets))
            stop = base + bisect.bisect_right(offsets, limit, seq - base + 1, hi) - 1
            if stop == most - 1 and most == seg.end_seq and seg.size <= limit:
                stop = most  # the segment's last record ends at its size
            stop = max(stop, seq + 1)
            end = offsets[stop - base] if stop < seg.end_seq else seg.size
            # Open under the lock: trim() cannot unlink the file between lookup and open.
            fd = os.open(seg.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            head = os.pread(fd, HEADER_SIZE, start)
            head_seq = int.from_bytes(head[12:20], "little")
            head_group = int.from_bytes(head[8:12], "little")
            if head[:4] != MAGIC or head_seq != seq or head_group != self._group_id:
                raise JournalCorrupt(
                    f"{seg.path}: offset {start} holds seq {head_seq} of group {head_group}, "
                    f"expected seq {seq} of group {self._group_id}"
                )
        except BaseException:
            os.close(fd)
            raise
        return RawRun(seg.path, fd, start, end - start, stop - seq, head)

    def _iter_records(self, seq: int, last: int) -> Iterator[Record]:
        while seq <= last:
            with self._lock:
                self._check_open()
                index = bisect.bisect_right(self._segment_starts, seq) - 1
                if index < 0 or seq < self._segments[0].first_seq:
                    raise SequenceTrimmed(
                        f"journal {self._path}: seq {seq} was trimmed while being read"
                    )
                seg = self._segments[index]
                stop = min(last + 1, seg.end_seq)
                start_off = seg.offsets[seq - seg.first_seq]
                end_off = seg.offsets[stop - seg.first_seq] if stop < seg.end_seq else seg.size
                # Open under the lock: trim() cannot unlink the file between lookup and open.
                fd = os.open(seg.path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                yield from self._read_segment(fd, seg.path, seq, stop, pos=start_off, end=end_off)
            finally:
                os.close(fd)
            seq = stop

    def _read_segment(
        self, fd: int, path: Path, seq: int, stop: int, *, pos: int, end: int
    ) -> Iterator[Record]:
        buf = b""
        at = 0  # position of `pos` inside buf
        while seq < stop:
            if len(buf) - at < HEADER_SIZE:
                buf, at = os.pread(fd, min(READ_CHUNK, end - pos), pos), 0
                if len(buf) < HEADER_SIZE:
                    raise JournalCorrupt(
                        f"{path}: reading seq {seq}: file ends at {pos + len(buf)}"
                    )
            need = HEADER_SIZE + payload_size(buf[at + 6], _u32(buf, at + 40))
            if need > end - pos:
                raise JournalCorrupt(
                    f"{path}: reading seq {seq}: record at offset {pos} claims {need} bytes, "
                    f"only {end - pos} are left in the indexed range"
                )
            if len(buf) - at < need:
                buf, at = os.pread(fd, max(need, min(READ_CHUNK, end - pos)), pos), 0
            try:
                record = decode_at(buf, at)
            except JournalCorrupt as exc:
                raise JournalCorrupt(f"{path}: reading seq {seq}: {exc}") from None
            if record.seq != seq or record.group_id != self._group_id:
                raise JournalCorrupt(
                    f"{path}: offset {pos} holds seq {record.seq} of group "
                    f"{record.group_id}, expected seq {seq} of group {self._group_id}"
                )
            yield record
            at += need
            pos += need
            seq += 1

    def wait_durable_beyond(self, seq: int, timeout: float | None) -> int:
        """Block until durable_seq > seq (or the timeout passes); return durable_seq.

        For a tailing reader such as the replication sender. Raises JournalClosed when the
        journal closes while waiting, JournalError after an I/O error."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            # Appends notify _state_cond only when someone watches, and a commit only once it
            # passes the lowest seq a watcher waits beyond: a tailer that waits for a batch of
            # records is not woken (and does not take the GIL from the writers) at every one.
            self._state_watchers += 1
            self._watch_seqs.append(seq)
            self._watch_min = min(self._watch_min, seq)
            try:
                while self._durable_seq <= seq:
                    if self._failure is not None:
                        raise JournalError(self._failure)
                    if self._closing:
                        raise JournalClosed(f"journal {self._path} closed while waiting")
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        break
                    self._state_cond.wait(remaining)
            finally:
                self._state_watchers -= 1
                self._watch_seqs.remove(seq)
                self._watch_min = min(self._watch_seqs, default=_NO_WATCH)
            return self._durable_seq

    # --- space --------------------------------------------------------------------------------

    def trim(self, upto_seq: int) -> int:
        """Free space held by records <= upto_seq (those the peer acknowledged and the volumes
        hold); return the bytes freed. Whole segments go; when every record of the active
        segment may go too, the journal starts a new segment (now if no append is being
        written, else at the next write) so that it can be freed."""
        with self._lock:
            self._check_usable()
            limit = min(upto_seq, self._durable_seq)
            active = self._active
            roll_now = False
            if active.size and active.end_seq - 1 <= limit:
                if self._writer_busy:
                    self._roll_requested = True
                else:
                    self._writer_busy = True  # take the writer role: no write may race the roll
                    roll_now = True
        if roll_now:
            try:
                self._roll_over()
            except OSError as exc:
                with self._lock:
                    self._writer_busy = False
                    self._poison(f"starting a segment after {active.path}", exc)
                raise JournalError(self._failure or str(exc)) from exc
            with self._lock:
                if self._open_batch.entries:
                    self._open_batch.grant_lead()  # appends queued meanwhile: let them write
                else:
                    self._writer_busy = False
        with self._lock:
            removed: list[_Segment] = []
            while len(self._segments) > 1 and self._segments[0].end_seq - 1 <= limit:
                removed.append(self._segments.pop(0))
                self._segment_starts.pop(0)
            if not removed:
                return 0
            freed = sum(seg.size for seg in removed)
            self._used -= freed
            self._io_threads += 1
        try:
            for seg in removed:  # oldest first: a crash mid-trim leaves a contiguous journal
                with self._lock:
                    keep = len(self._spares) < self._spare_limit and not self._closing
                if keep:
                    spare = self._path / spare_name(seg.first_seq)
                    os.rename(seg.path, spare)
                    with self._lock:
                        self._spares.append(spare)
                else:
                    os.unlink(seg.path)
            os.fsync(self._dir_fd)  # so the space is really free after a crash, too
        finally:
            with self._lock:
                self._io_threads -= 1
                self._state_cond.notify_all()
        return freed

    # --- closing ------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop accepting appends, let accepted ones finish, close the files. Tailers waiting
        in wait_durable_beyond() get JournalClosed. Idempotent."""
        with self._lock:
            if self._closing:
                while not self._closed:
                    self._state_cond.wait()
                return
            self._closing = True
            self._state_watchers += 1  # from now on every state change notifies
            self._state_cond.notify_all()  # tailers waiting for durable_seq get JournalClosed
            self._written_cond.notify_all()  # a gathering syncer stops waiting
            # Drain: appends already accepted are written and synced, then acknowledged.
            while self._failure is None and (self._open_batch.entries or self._inflight):
                self._state_cond.wait()
            # No thread may be inside a syscall on an fd we close (it could be reused). After a
            # failure the syncer role may be left to a thread that saw its batch fail and left.
            while self._io_threads or (self._syncing and self._failure is None):
                self._state_cond.wait()
            for seg in self._segments:
                if seg.write_fd is not None:
                    os.close(seg.write_fd)
                    seg.write_fd = None
            os.close(self._dir_fd)
            self._closed = True
            self._state_cond.notify_all()

    def __enter__(self) -> Journal:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _u32(buf: bytes, at: int) -> int:
    return int.from_bytes(buf[at : at + 4], "little")


def pwritev_all(fd: int, iov: list[bytes | memoryview], offset: int, nbytes: int) -> None:
    """pwritev all of `iov` at `offset`, IOV_MAX buffers per call, resuming after short writes."""
    if len(iov) <= IOV_MAX:
        written = os.pwritev(fd, iov, offset)
        if written == nbytes:
            return
    else:
        written = 0
    pending = [memoryview(b).cast("B") for b in iov]
    offset += written
    _skip(pending, written)
    while pending:
        part = pending[:IOV_MAX]
        written = os.pwritev(fd, part, offset)
        if written <= 0:
            raise OSError(f"pwritev wrote {written} bytes")
        offset += written
        _skip(pending, written)


def _skip(pending: list[memoryview], count: int) -> None:
    """Drop `count` written bytes from the front of `pending` (in place)."""
    drop = 0
    while count and drop < len(pending):
        size = pending[drop].nbytes
        if size > count:
            pending[drop] = pending[drop][count:]
            break
        count -= size
        drop += 1
    del pending[:drop]


# --- recovery ----------------------------------------------------------------------------------


def _recover(
    path: Path, dir_fd: int, group_id: int, start_seq: int
) -> tuple[list[_Segment], list[Path]]:
    """Scan every segment, cut a torn tail off the last one, and return the segments and the
    spare files."""
    names = os.listdir(path)
    found = sorted(
        (int(match.group(1)), path / name) for name in names if (match := SEGMENT_RE.match(name))
    )
    spares = sorted(path / name for name in names if SPARE_RE.match(name))
    if not found:
        # A journal starting afresh may start below seqs a spare holds: drop the spares first.
        for spare in spares:
            os.unlink(spare)
        seg_path = path / segment_name(start_seq)
        fd = os.open(seg_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        os.close(fd)
        os.fsync(dir_fd)  # the first segment's name must survive a crash
        return [_Segment(seg_path, start_seq, array("Q"), 0)], []
    segments: list[_Segment] = []
    for number, (first_seq, seg_path) in enumerate(found):
        if segments and segments[-1].end_seq != first_seq:
            prev = segments[-1]
            raise JournalCorrupt(
                f"journal {path}: {prev.path.name} ends before seq {prev.end_seq} but the next "
                f"segment is {seg_path.name}: records are missing"
            )
        data = seg_path.read_bytes()
        offsets, end, failure = _scan(seg_path, data, first_seq, group_id)
        sealed = number != len(found) - 1
        if failure is not None and sealed and failure[0] == found[number + 1][0]:
            failure = None  # complete: what follows is stale, from the file's earlier use
        if failure is not None:
            bad_seq, reason = failure
            where = f"{seg_path}: seq {bad_seq} at offset {end}"
            if sealed:
                raise JournalCorrupt(f"{where}: {reason} (in a sealed segment)")
            proof = _durability_proof(data, end + 1, bad_seq)
            if proof is not None:
                raise JournalCorrupt(
                    f"{where}: {reason}; record seq {proof.seq} at a later offset has "
                    f"commit_floor {proof.commit_floor}, so seq {bad_seq} had been acknowledged"
                )
            # A torn tail: the unacknowledged last batch. Cut it, durably, before appending.
            fd = os.open(seg_path, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.ftruncate(fd, end)
                os.fdatasync(fd)
            finally:
                os.close(fd)
        segments.append(_Segment(seg_path, first_seq, offsets, end))
    return segments, spares


def _scan(
    path: Path, data: bytes, first_seq: int, group_id: int
) -> tuple[array[int], int, tuple[int, str] | None]:
    """Walk the records of one segment. Returns their offsets, the end of the valid prefix and,
    if a record fails, (the seq expected there, why it failed)."""
    offsets = array("Q")
    pos = 0
    seq = first_seq
    total = len(data)
    while pos < total:
        try:
            record = decode_at(data, pos)
        except JournalCorrupt as exc:
            return offsets, pos, (seq, str(exc))
        if record.group_id != group_id:
            # A whole, checksummed record of another group is no torn write: refuse to open
            # (and so to cut) what is probably another group's journal.
            raise JournalCorrupt(
                f"{path}: record seq {record.seq} at offset {pos} belongs to group "
                f"{record.group_id}, this journal is group {group_id}"
            )
        if record.seq != seq:
            return offsets, pos, (seq, f"found seq {record.seq} instead (sequence gap)")
        offsets.append(pos)
        pos += record.encoded_size
        seq += 1
    return offsets, pos, None


def _durability_proof(data: bytes, start: int, bad_seq: int) -> Record | None:
    """A valid record after `start` whose commit_floor shows `bad_seq` had been durable."""
    pos = data.find(MAGIC, start)
    while pos >= 0:
        try:
            record = decode_at(data, pos)
        except JournalCorrupt:
            record = None
        if record is not None and record.commit_floor >= bad_seq:
            return record
        pos = data.find(MAGIC, pos + 1)
    return None
