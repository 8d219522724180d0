"""One consistency group at this site: the write path every writer uses (the TCMU handler, the
control API's `io write`, later the replication receiver), crash replay, checkpoints, snapshots.

The write path, in this order, each step deliberate:
  1. validate the request (a bad LBA must leave no journal record);
  2. hold the write barrier (shared) and the range lock of the bytes written;
  3. append the record to the group's journal — returns once durable (group commit);
  4. save before-images for every snapshot that lacks them — durable before the overwrite;
  5. write the volume (page cache: the journal already holds the data durably);
  6. mark the seq applied in the watermark.
The write is acknowledged after step 6. `write_batch` takes the same steps for the writes of one
ring poll together: step 1 for each, step 2 once for the union of their ranges, step 3 as one group
commit (contiguous seqs in list order), steps 4-6 per write in seq order. A crash anywhere is
repaired at open by replaying the journal from the checkpoint (`applied_seq` in the metadata
store), which only ever names a seq whose data every volume of the group had fdatasync'ed.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from targetd_repl.errors import (
    FailedPrecondition,
    InvalidArgument,
    JournalCorrupt,
    JournalFull,
    NotFound,
    StorageError,
    WriteProtected,
)
from targetd_repl.model import (
    DEFAULT_REGION_SIZE,
    GroupInfo,
    RecordKind,
    Role,
    SnapshotInfo,
    SnapshotKind,
    VolumeInfo,
)
from targetd_repl.storage.barrier import WriteBarrier
from targetd_repl.storage.journal import Journal, ShippedEntry, pwritev_all, remove_segments
from targetd_repl.storage.journal_record import HEADER_SIZE, Record
from targetd_repl.storage.metadata import MetadataStore
from targetd_repl.storage.range_lock import RangeLock
from targetd_repl.storage.snapshot import SnapshotSet
from targetd_repl.storage.volume import Volume
from targetd_repl.storage.watermark import SequenceWatermark

T = TypeVar("T")

log = logging.getLogger(__name__)

Buffer = bytes | bytearray | memoryview
# Received batches a secondary keeps in memory for its applier (beyond: read from the journal).
RECEIVED_CACHE_BYTES = 64 << 20
# Records read from the journal per before-image group commit when the secondary applies (bounds
# the data held in memory at once).
PRESERVE_AHEAD_RECORDS = 256


@dataclass(frozen=True, slots=True)
class GroupSettings:
    journal_size_limit: int = 1 << 30
    journal_segment_size: int = 64 << 20
    region_size: int = DEFAULT_REGION_SIZE


@dataclass(slots=True)
class OpenVolume:
    """A volume of the group with what its writes need beside it."""

    info: VolumeInfo
    volume: Volume
    snapshots: SnapshotSet
    ranges: RangeLock

    def close(self) -> None:
        self.snapshots.close()
        self.volume.close()


class GroupStore:
    """A group's journal and volumes. Thread-safe; one instance per group per process."""

    def __init__(
        self,
        info: GroupInfo,
        journal: Journal,
        metadata: MetadataStore,
        volumes: list[OpenVolume],
    ) -> None:
        self._info = info
        self._journal = journal
        self._metadata = metadata
        self._volumes = {v.info.id: v for v in volumes}
        self._barrier = WriteBarrier()
        self._applied = SequenceWatermark(info.applied_seq)
        self._checkpointed = info.applied_seq
        self._checkpoint_lock = threading.Lock()
        self._apply_lock = threading.Lock()  # one applier: records are applied in seq order
        # The secondary's newest received batches, durable, kept in memory for the applier so
        # it need not read them back from the journal: (first seq, checked entries), seq order,
        # at most RECEIVED_CACHE_BYTES (older ones are read from the journal as before).
        self._received: deque[tuple[int, list[ShippedEntry]]] = deque()
        self._received_bytes = 0
        self._received_lock = threading.Lock()
        self._failure: BaseException | None = None
        # Replication sets this: the lowest seq the peer still needs; trim never passes it.
        self.retain_from: Callable[[], int] | None = None
        # Replication hooks (replication/primary.py sets them on a paired primary; None = off).
        # on_written(seq, volume_id, offset, length): inside the write slot (barrier and range
        #   held), after the journal append and the volume write: marks the unsent bitmap while
        #   the pair tracks changes. A barrier close (`quiesced`) therefore sees every write below
        #   the next seq already marked.
        # after_write(seq): after the slot is released, before the write is acknowledged: a sync
        #   pair waits here until the peer holds the seq (it may raise to fail the write).
        # on_journal_full(): the journal is full and a checkpoint freed nothing: replication
        #   gives up its retention (tracking the backlog in the unsent bitmap instead); True if
        #   a second trim may now free space. A local write never fails because the peer is slow.
        self.on_written: Callable[[int, int, int, int], None] | None = None
        self.after_write: Callable[[int], None] | None = None
        self.on_journal_full: Callable[[], bool] | None = None
        # Role-change hooks (roles/ sets them; None = off), beside replication's:
        # before_io(volume_id, offset, length, write): before a read or a write takes its slot:
        #   a new primary whose switchover backlog has not arrived fetches the regions it lacks
        #   from the old primary first (copy-on-read, seed 000). It may raise to fail the I/O.
        # on_changed(seq, volume_id, offset, length): inside the write slot, next to on_written:
        #   marks the changed bitmap of a promoted site (seeds 001/003), saved before the ack.
        self.before_io: Callable[[int, int, int, bool], None] | None = None
        self.on_changed: Callable[[int, int, int, int], None] | None = None

    @classmethod
    def open(
        cls,
        group_dir: Path,
        info: GroupInfo,
        metadata: MetadataStore,
        volumes: list[OpenVolume],
        settings: GroupSettings,
    ) -> GroupStore:
        journal = Journal.open(
            group_dir / "journal",
            group_id=info.id,
            size_limit=settings.journal_size_limit,
            segment_size=settings.journal_segment_size,
            start_seq=info.applied_seq + 1,
        )
        store = cls(info, journal, metadata, volumes)
        try:
            store._replay()
        except BaseException:
            journal.close()
            raise
        return store

    def close(self) -> None:
        """Checkpoint (so the next open replays nothing) and close the journal and volumes."""
        try:
            if self._failure is None:
                self.checkpoint()
        finally:
            self._journal.close()
            for ov in self._volumes.values():
                ov.close()
            self._volumes.clear()

    # --- identity and role -----------------------------------------------------------------

    @property
    def info(self) -> GroupInfo:
        return self._info

    @property
    def name(self) -> str:
        return self._info.name

    @property
    def role(self) -> Role:
        return self._info.role

    @property
    def journal(self) -> Journal:
        return self._journal

    @property
    def group_dir(self) -> Path:
        """The group's directory (the journal lives in its `journal/`; replication keeps its
        bitmaps and state beside it)."""
        return self._journal.path.parent

    @property
    def applied_seq(self) -> int:
        return self._applied.value

    def volume_ids(self) -> list[int]:
        return list(self._volumes)

    def set_role(self, role: Role) -> None:
        """Change the role here. Writers inside finish first: a demotion must not let a write
        that started as primary land after the demotion is reported."""
        with self._barrier.closed():
            self._info = self._metadata.set_role(self._info.id, role)

    def refresh(self) -> None:
        """Reload the group's row (epoch, role) after another component changed it."""
        self._info = self._metadata.get_group_by_id(self._info.id)

    def _open_volume(self, volume_id: int) -> OpenVolume:
        try:
            return self._volumes[volume_id]
        except KeyError:
            raise NotFound(f"volume id {volume_id} is not in group {self.name!r}") from None

    def _check_usable(self) -> None:
        if self._failure is not None:
            raise StorageError(
                f"group {self.name!r} stopped after an I/O failure ({self._failure}); "
                "restart the controller to replay its journal"
            )

    # --- the write path ------------------------------------------------------------------------

    def write(self, volume_id: int, lba: int, data: Buffer) -> int:
        """Write whole blocks at `lba`; return the journal seq once durable and applied."""
        view = memoryview(data).cast("B")
        return self._mutate(RecordKind.WRITE, volume_id, lba, view, view.nbytes)

    def write_batch(
        self, volume_id: int, writes: Sequence[tuple[int, Buffer]]
    ) -> list[BaseException | None]:
        """Write several (lba, data) of one volume - the writes the data path took from one ring
        poll - as ONE journal group commit (one lock round, one pwritev, one fdatasync), then
        apply them in seq order. Same steps and guarantees as `write`, per write; returns, in
        order, None for each write durable and applied, or the exception that failed it (a write
        refused by validation leaves no record; the others still go)."""
        results: list[BaseException | None] = [None] * len(writes)
        todo: list[tuple[int, int, int, memoryview]] = []  # (index, lba, offset, view)
        try:
            self._check_usable()
            ov = self._open_volume(volume_id)
        except Exception as exc:
            return [exc] * len(writes)
        volume = ov.volume
        check_range = volume.check_range
        block_size = volume.block_size
        primary = self._info.role is Role.PRIMARY
        for i, (lba, data) in enumerate(writes):
            view = memoryview(data).cast("B")
            nbytes = view.nbytes
            try:
                # Step 1 for every write before anything is journaled: _check_write's checks,
                # in its order (a bad range is refused as such on a secondary too).
                if nbytes % block_size:
                    volume.blocks_of(lba, nbytes)  # raises Misaligned
                offset = check_range(lba, nbytes // block_size)
                if not primary:
                    self._require_primary(ov)  # raises WriteProtected
                if self.before_io is not None:
                    self.before_io(volume_id, offset, nbytes, True)
            except Exception as exc:
                results[i] = exc
                continue
            todo.append((i, lba, offset, view))
        if not todo:
            return results
        applied: list[tuple[int, int]] = []  # (index, seq) of writes durable and applied
        try:
            # Step 2: the barrier once, and the regions of ALL the batch's writes at once (they
            # may overlap one another), held from before the append until the last apply.
            with self._barrier.writer(), ov.ranges.hold_spans([(t[2], t[3].nbytes) for t in todo]):
                self._require_primary(ov)  # re-checked inside the slot, as in _journal_and_apply
                # Step 3: one append for all; seqs are contiguous in list (ring) order. It
                # returns once every record is durable (fdatasync'ed): only then the volume.
                last = self._journal.append_batch(
                    [(RecordKind.WRITE, ov.info.id, t[1], t[3], t[3].nbytes) for t in todo],
                    epoch=self._info.epoch,
                )
                # Steps 4-6 in seq order, one thread: overlapping writes of the batch reach the
                # volume in journal order (what the secondary's in-order apply will do).
                self._apply_batch(ov, todo, last - len(todo) + 1, results, applied)
        except JournalFull:
            # Nothing of the batch was appended: one at a time, in order, with write()'s
            # checkpoint-and-retry (and replication's release of its retention).
            for i, lba, _offset, view in todo:
                try:
                    self.write(volume_id, lba, view)
                except Exception as exc:
                    results[i] = exc
            return results
        except Exception as exc:
            done = {i for i, _ in applied}
            for i, *_ in todo:
                if i not in done:
                    results[i] = exc
        if self.after_write is not None:
            # After the slot is released, before the acks (a sync pair waits for the peer here).
            for i, seq in applied:
                if results[i] is not None:
                    continue
                try:
                    self.after_write(seq)
                except Exception as exc:
                    results[i] = exc
        return results

    def _apply_batch(
        self,
        ov: OpenVolume,
        todo: list[tuple[int, int, int, memoryview]],
        seq: int,
        results: list[BaseException | None],
        applied: list[tuple[int, int]],
    ) -> None:
        """Steps 4-6 of write_batch for its journaled writes `todo` (seqs from `seq`, in list
        order), inside its write slot: each run of writes that continue one another (each
        starting where the one before it ends: disjoint, in seq order) reaches the volume as
        ONE vectored write, after the before-images of the whole batch (one group commit
        per snapshot, `SnapshotSet.before_write_many`); runs go in seq order, so overlapping
        writes land in journal order. Then each write's seq is marked applied and its hooks
        run. Appends (index, seq) to `applied` per write applied; a hook's error fails only
        its own write (in `results`)."""
        volume = ov.volume
        block_size = volume.block_size
        count = len(todo)
        runs: list[tuple[int, int, int, int]] = []  # (start, stop, offset, end) into todo
        start = 0
        while start < count:
            offset = todo[start][2]
            end = offset + todo[start][3].nbytes
            stop = start + 1
            while stop < count and todo[stop][2] == end:
                end += todo[stop][3].nbytes
                stop += 1
            runs.append((start, stop, offset, end))
            start = stop
        try:
            # Ordering point: the before-images of every chunk the batch touches are durable
            # (one record and one fdatasync per snapshot for the whole batch) before any of
            # its overwrites starts.
            ov.snapshots.before_write_many([(offset, end - offset) for _, _, offset, end in runs])
        except BaseException as error:
            self._stop_after_journaled(error)
            raise
        for start, stop, offset, end in runs:
            run = todo[start:stop]
            try:
                # The run's range is checked as Volume.write checks a write; its bytes go
                # with one pwritev straight from the callers' buffers (the ring's data area).
                # Volume has no vectored write: its fd, used as its methods do.
                volume.check_range(run[0][1], (end - offset) // block_size)
                iov: list[bytes | memoryview] = [t[3] for t in run]
                pwritev_all(volume._fileno(), iov, offset, end - offset)
            except BaseException as error:
                self._stop_after_journaled(error)
                raise
            for i, _, write_offset, write_view in run:
                self._applied.complete(seq)
                applied.append((i, seq))
                try:
                    # A failing hook fails its own write, never the apply of the rest: the
                    # batch is journaled, so every record of it must reach the volume now.
                    if self.on_written is not None:
                        self.on_written(seq, ov.info.id, write_offset, write_view.nbytes)
                    if self.on_changed is not None:
                        self.on_changed(seq, ov.info.id, write_offset, write_view.nbytes)
                except Exception as exc:
                    results[i] = exc
                seq += 1

    def _stop_after_journaled(self, error: BaseException) -> None:
        """A batch is journaled but could not be applied: stop the group; the replay at the
        next open applies the rest of it (as in _journal_and_apply)."""
        self._failure = error
        log.error("group %s: volume write failed after journaling: %s", self.name, error)

    def write_zeros(self, volume_id: int, lba: int, nblocks: int) -> int:
        """Make blocks read as zeros (UNMAP, WRITE SAME of zeros); journaled without data."""
        ov = self._open_volume(volume_id)
        return self._mutate(RecordKind.ZERO, volume_id, lba, None, nblocks * ov.volume.block_size)

    def compare_and_write(self, volume_id: int, lba: int, expected: Buffer, new: Buffer) -> int:
        """Atomically: if the blocks at `lba` equal `expected`, write `new` there and return -1;
        else write nothing and return the offset of the first differing byte."""
        expect = memoryview(expected).cast("B")
        view = memoryview(new).cast("B")
        ov, offset = self._check_write(volume_id, lba, view.nbytes)
        self._before_io(volume_id, offset, view.nbytes, True)
        # One hold across the compare and the write: no other write may slip between them.
        with self._write_slot(ov, offset, view.nbytes):
            current = ov.volume.pread(offset, expect.nbytes)
            if current != expect:
                return next(
                    i for i, (a, b) in enumerate(zip(current, expect, strict=True)) if a != b
                )
            seq = self._journal_and_apply(RecordKind.WRITE, ov, lba, offset, view)
        if self.after_write is not None:
            self.after_write(seq)
        return -1

    def _check_write(self, volume_id: int, lba: int, length: int) -> tuple[OpenVolume, int]:
        """Validate before anything is journaled: a refused write must leave no record."""
        self._check_usable()
        ov = self._open_volume(volume_id)
        offset = ov.volume.check_range(lba, ov.volume.blocks_of(lba, length))
        self._require_primary(ov)
        return ov, offset

    def _require_primary(self, ov: OpenVolume) -> None:
        if self._info.role is not Role.PRIMARY:
            raise WriteProtected(
                f"volume {ov.info.name!r} is read-only here: group {self.name!r} is "
                f"{self._info.role.value} at this site"
            )

    @contextmanager
    def _write_slot(self, ov: OpenVolume, offset: int, length: int) -> Iterator[None]:
        # Barrier before range, always in this order, so a snapshot never deadlocks a writer.
        # Overlapping writes reach the volume in journal order: the secondary applies in that
        # order, so any other order would leave the two images different.
        with self._barrier.writer(), ov.ranges.hold(offset, length):
            yield

    def _mutate(
        self, kind: RecordKind, volume_id: int, lba: int, data: memoryview | None, length: int
    ) -> int:
        ov, offset = self._check_write(volume_id, lba, length)
        self._before_io(volume_id, offset, length, True)
        with self._write_slot(ov, offset, length):
            seq = self._journal_and_apply(kind, ov, lba, offset, data, length)
        if self.after_write is not None:
            self.after_write(seq)
        return seq

    def _journal_and_apply(
        self,
        kind: RecordKind,
        ov: OpenVolume,
        lba: int,
        offset: int,
        data: memoryview | None,
        length: int | None = None,
    ) -> int:
        if length is None:
            assert data is not None
            length = data.nbytes
        # Re-checked inside the slot: a demotion closes the barrier, so no write passes it late.
        self._require_primary(ov)
        seq = self._append(kind, ov, lba, data, length)
        try:
            self._apply(ov, kind, lba, offset, data, length)
        except BaseException as error:
            # The journal now holds a record the volume lacks: stop the group; the replay at the
            # next open applies it. Serving on would let reads disagree with the journal.
            self._stop_after_journaled(error)
            raise
        self._applied.complete(seq)
        if self.on_written is not None:
            self.on_written(seq, ov.info.id, offset, length)
        if self.on_changed is not None:
            self.on_changed(seq, ov.info.id, offset, length)
        return seq

    def _before_io(self, volume_id: int, offset: int, length: int, write: bool) -> None:
        hook = self.before_io
        if hook is not None:
            hook(volume_id, offset, length, write)

    def _append(
        self, kind: RecordKind, ov: OpenVolume, lba: int, data: memoryview | None, length: int
    ) -> int:
        payload = data if data is not None else memoryview(b"")
        try:
            return self._journal.append(
                kind, ov.info.id, lba, payload, epoch=self._info.epoch, length=length
            )
        except JournalFull:
            # Without a peer holding records back, a checkpoint frees the journal; try once.
            if self.on_journal_full is None:
                if self.checkpoint_and_trim() == 0:
                    raise
                return self._journal.append(
                    kind, ov.info.id, lba, payload, epoch=self._info.epoch, length=length
                )
        # Paired: the peer's retention is released (on_journal_full) and the journal trimmed.
        # Concurrent writers race for the space freed, so try a few times before failing.
        released = False
        for attempt in range(8):
            self.checkpoint_and_trim()
            try:
                return self._journal.append(
                    kind, ov.info.id, lba, payload, epoch=self._info.epoch, length=length
                )
            except JournalFull:
                hook = self.on_journal_full
                if attempt == 7 or (released and hook is None):
                    raise
                if not released and hook is not None:
                    released = hook()
        raise AssertionError("unreachable")

    @staticmethod
    def _apply(
        ov: OpenVolume,
        kind: RecordKind,
        lba: int,
        offset: int,
        data: memoryview | None,
        length: int,
    ) -> None:
        if kind is RecordKind.MARKER or length == 0:
            return
        # before_write returns only once the before-images are durable: the overwrite follows.
        ov.snapshots.before_write(offset, length)
        if kind is RecordKind.WRITE:
            assert data is not None
            ov.volume.write(lba, data)
        else:
            ov.volume.write_zeros(lba, length // ov.volume.block_size)

    # --- the secondary's side: store replicated records, apply them in order ----------------

    def receive(
        self, records: Sequence[Record], volume_map: Mapping[int, int] | None = None
    ) -> int:
        """Store records shipped by the primary in the receive journal, strictly in sequence
        (SequenceGap otherwise, JournalCorrupt on a bad CRC: nothing of a bad batch is
        stored), as one group commit. `volume_map` maps the primary's volume ids to ours (ids
        are site-local). Returns the highest seq durably received: the acknowledgement."""
        self._check_usable()
        if self._info.role is Role.PRIMARY:
            raise WriteProtected(
                f"group {self.name!r} is primary here: it does not take replicated records"
            )
        self._journal.append_records(records, volume_map=volume_map)
        return self._journal.durable_seq

    def receive_shipped(
        self, buf: bytes | memoryview, first_seq: int, count: int, volume_map: Mapping[int, int]
    ) -> int:
        """`receive` for a batch as shipped (`count` encoded records back to back from
        `first_seq`): the same checks and the one group commit, without decoding into Records
        (Journal.append_shipped). Returns the highest seq durably received."""
        self._check_usable()
        if self._info.role is Role.PRIMARY:
            raise WriteProtected(
                f"group {self.name!r} is primary here: it does not take replicated records"
            )
        journal = self._journal
        entries = journal.check_shipped(
            buf, first_seq=first_seq, count=count, volume_map=volume_map
        )
        journal.append_checked(first_seq, entries)
        # Durable now: the applier may take these records from memory (in seq order only).
        nbytes = memoryview(buf).nbytes
        with self._received_lock:
            if self._received and self._received[-1][0] + len(self._received[-1][1]) != first_seq:
                self._drop_received()  # not contiguous with what is kept: start afresh
            self._received.append((first_seq, entries))
            self._received_bytes += nbytes
            while self._received_bytes > RECEIVED_CACHE_BYTES and len(self._received) > 1:
                self._pop_received()
        return journal.durable_seq

    def _pop_received(self) -> None:
        """Forget the oldest cached batch (_received_lock held)."""
        _, entries = self._received.popleft()
        self._received_bytes -= sum(HEADER_SIZE + len(e[6]) for e in entries)

    def _drop_received(self) -> None:
        """Forget every cached batch (_received_lock held)."""
        self._received.clear()
        self._received_bytes = 0

    def _received_from(self, seq: int) -> tuple[int, list[ShippedEntry]] | int | None:
        """The cached batch that holds `seq` (first seq, entries); else the first seq of the
        next cached batch above it (read the journal up to there), or None: none is cached."""
        with self._received_lock:
            cache = self._received
            while cache and cache[0][0] + len(cache[0][1]) <= seq:
                self._pop_received()  # applied already
            if not cache:
                return None
            first, entries = cache[0]
            return (first, entries) if first <= seq else first

    def restart_journal(self, start_seq: int, *, discard: bool = False) -> None:
        """Secondary, at the start of a resync copy: apply every record received, checkpoint,
        and start the receive journal afresh at `start_seq` (the first seq the copy stream
        carries; the seqs in between are covered by the copy, never shipped).

        `discard` (roles/: the target of a failback or resolve) allows a `start_seq` at or below
        what the journal holds: this site's own seqs past it are replaced by the source's (the
        role change saved them in a snapshot first) and the checkpoint moves back.

        Crash order: the segments go first, the checkpoint second. A crash between leaves an
        empty journal at the old checkpoint + 1, which the next handshake resyncs again."""
        with self._apply_lock, self._barrier.closed():
            self._check_usable()
            journal = self._journal
            if start_seq <= journal.durable_seq and not discard:
                raise FailedPrecondition(
                    f"group {self.name!r}: cannot restart the receive journal at seq "
                    f"{start_seq}, it already holds up to {journal.durable_seq}"
                )
            start = self._applied.value + 1
            if discard:
                start = journal.durable_seq + 1  # held records are covered by the role change
            for record in journal.read_from(start) if start <= journal.durable_seq else ():
                self._apply_record(record)
                self._applied.complete(record.seq)
            self.checkpoint()
            path = journal.path
            with self._received_lock:
                self._drop_received()  # the seqs start afresh
            journal.close()
            remove_segments(path)  # spares too: the seqs may start below what they hold
            self._journal = Journal.open(
                path,
                group_id=self._info.id,
                size_limit=journal.size_limit,
                segment_size=journal.segment_size,
                start_seq=start_seq,
                spare_segments=journal.spare_segments,
            )
            with self._checkpoint_lock:
                self._info = self._metadata.set_checkpoint(
                    self._info.id, applied_seq=start_seq - 1, rewind=discard
                )
                self._applied.reset(start_seq - 1)
                self._checkpointed = start_seq - 1

    # --- replication: resync copies and quiet points (the primary's side) -------------------

    @contextmanager
    def quiesced(self) -> Iterator[None]:
        """Hold with no write inside its slot: every seq below journal.next_seq has finished
        its journal append, volume write and on_written hook."""
        with self._barrier.closed():
            yield

    def copy_region(self, volume_id: int, offset: int, length: int) -> int:
        """Journal the bytes [offset, offset+length) of a volume as they are now, as an ordinary
        record, and return its seq: a resync copy that takes its place in the one ordered
        stream. Read under the range lock inside the write slot, so the copy holds exactly the
        writes with a lower seq. All-zero ranges (holes) travel as ZERO records, without data.
        The volume itself is not written (it already holds these bytes)."""
        self._check_usable()
        ov = self._open_volume(volume_id)
        block = ov.volume.block_size
        if offset % block or length % block or length <= 0:
            raise InvalidArgument(
                f"volume {ov.info.name!r}: copy range {offset}+{length} is not whole blocks"
            )
        lba = offset // block
        with self._write_slot(ov, offset, length):
            if _is_hole(ov.volume.path, offset, length):
                data: memoryview | None = None
            else:
                data = memoryview(ov.volume.pread(offset, length))
                if data == _zeros(length):
                    data = None
            kind = RecordKind.ZERO if data is None else RecordKind.WRITE
            seq = self._append(kind, ov, lba, data, length)
            self._applied.complete(seq)
        return seq

    def apply_received(self, max_records: int | None = None) -> int:
        """Apply received records past the applied watermark, strictly in sequence order, so
        the image is always a prefix of the primary's history; return the applied seq. Records
        come from the batches receive_shipped keeps in memory, else from the journal."""
        with self._apply_lock:
            return self._apply_received_locked(max_records)

    def _apply_received_locked(self, max_records: int | None) -> int:
        """apply_received's body, with _apply_lock held."""
        self._check_usable()
        budget = max_records if max_records is not None else 1 << 62
        while budget > 0:
            # Order: always the next seq after the applied watermark, from either source.
            start = self._applied.value + 1
            durable = self._journal.durable_seq
            if start > durable:
                break
            cached = self._received_from(start)
            snapshots = self._has_snapshots()
            if isinstance(cached, tuple):
                first, entries = cached
                stop = min(len(entries), start - first + budget)
                if snapshots:
                    self._preserve_ahead(
                        (e[0], e[2], e[4], e[3]) for e in entries[start - first : stop]
                    )
                for index in range(start - first, stop):
                    kind, _, volume_id, length, lba, _, data, _ = entries[index]
                    self._apply_received_one(first + index, kind, volume_id, lba, length, data)
                budget -= stop - (start - first)
                continue
            last = durable if cached is None else min(durable, cached - 1)
            count = min(budget, last - start + 1)
            records = self._journal.read_from(start, count)
            while chunk := list(itertools.islice(records, PRESERVE_AHEAD_RECORDS)):
                if snapshots:
                    self._preserve_ahead((r.kind, r.volume_id, r.lba, r.length) for r in chunk)
                for record in chunk:
                    self._apply_received_one(
                        record.seq,
                        record.kind,
                        record.volume_id,
                        record.lba,
                        record.length,
                        record.data,
                    )
            budget -= count
        return self._applied.value

    def _has_snapshots(self) -> bool:
        return any(ov.snapshots.has_active for ov in self._volumes.values())

    def _preserve_ahead(self, records: Iterable[tuple[int, int, int, int]]) -> None:
        """Secondary apply: save the before-images of every chunk that a run of received
        WRITE records (kind, volume id, lba, length) touches, with one group commit per
        snapshot (`before_write_many`), before the first of them is applied. Saving early is
        always safe: a chunk not yet preserved still holds its snapshot's image. Each record's
        own before_write then finds its chunks kept (and still covers a snapshot created in
        between). ZERO records (ranges with no data, possibly huge) and records this cannot
        place (unknown volume, bad range) are left to the apply, which refuses the latter with
        its precise error."""
        spans: dict[int, list[tuple[int, int]]] = {}
        for kind, volume_id, lba, length in records:
            ov = self._volumes.get(volume_id)
            if kind != RecordKind.WRITE or ov is None or not ov.snapshots.has_active:
                continue
            offset = lba * ov.volume.block_size
            if length > 0 and offset >= 0 and offset + length <= ov.volume.size_bytes:
                spans.setdefault(volume_id, []).append((offset, length))
        for volume_id, ranges in spans.items():
            try:
                # Ordering point: durable before-images before the run's first overwrite.
                self._volumes[volume_id].snapshots.before_write_many(ranges)
            except BaseException as error:
                self._failure = error  # the snapshot failed closed: stop, as the apply would
                raise

    def at_applied_seq(self, seq: int, action: Callable[[], T]) -> T:
        """Secondary (verify): apply received records up to exactly `seq`, then run `action`
        while no record past it can be applied (the applier waits for _apply_lock). The
        journal must hold `seq` already; an image applied past it cannot go back
        (FailedPrecondition)."""
        with self._apply_lock:
            self._check_usable()
            if self._journal.durable_seq < seq:
                raise FailedPrecondition(
                    f"group {self.name!r}: seq {seq} has not been received here "
                    f"(received up to {self._journal.durable_seq})"
                )
            if self._applied.value > seq:
                raise FailedPrecondition(
                    f"group {self.name!r}: applied up to seq {self._applied.value} here, past "
                    f"seq {seq}"
                )
            self._apply_received_locked(seq - self._applied.value)
            return action()

    @contextmanager
    def writes_paused(self) -> Iterator[int]:
        """Primary (verify): hold with no write in flight and none admitted; yields the seq the
        volumes hold exactly the history up to (every journaled write is applied in its slot)."""
        with self._barrier.closed():
            yield self._journal.durable_seq

    def _apply_received_one(
        self, seq: int, kind: int, volume_id: int, lba: int, length: int, data: Buffer
    ) -> None:
        with self._barrier.writer():
            try:
                self._apply_fields(seq, kind, volume_id, lba, length, data)
            except BaseException as error:
                self._failure = error  # the replay at the next open retries it
                raise
        self._applied.complete(seq)

    # --- reads ---------------------------------------------------------------------------------

    def read(self, volume_id: int, lba: int, nblocks: int) -> bytes:
        self._check_usable()
        volume = self._open_volume(volume_id).volume
        if self.before_io is not None and nblocks > 0:
            bs = volume.block_size
            self._before_io(volume_id, volume.check_range(lba, nblocks), nblocks * bs, False)
        return volume.read(lba, nblocks)

    def readinto(self, volume_id: int, lba: int, buf: bytearray | memoryview) -> None:
        if self._failure is not None:
            self._check_usable()
        ov = self._volumes.get(volume_id)
        volume = ov.volume if ov is not None else self._open_volume(volume_id).volume
        nbytes = buf.nbytes if type(buf) is memoryview else -1
        if self.before_io is None and nbytes > 0 and not nbytes % volume.block_size:
            # The data path's read (one view into the ring's data area), kept short: the range
            # checked as Volume.readinto checks it, one preadv straight into the view. A short
            # read (the file shrank) goes the long way, which says why.
            offset = volume.check_range(lba, nbytes // volume.block_size)
            if os.preadv(volume._fileno(), [buf], offset) == nbytes:
                return
        if self.before_io is not None:
            view = memoryview(buf).cast("B")
            nblocks = view.nbytes // volume.block_size
            if nblocks > 0:
                offset = volume.check_range(lba, nblocks)
                self._before_io(volume_id, offset, view.nbytes, False)
        volume.readinto(lba, buf)

    # --- role changes: data that bypasses the journal (roles/) -------------------------------

    def install_region(self, volume_id: int, offset: int, length: int, data: Buffer | None) -> None:
        """Write bytes into a volume *without* journaling them (role is not checked): data the
        peer already holds, installed by a role change — a switchover's backlog and
        copy-on-read fetches at the new primary, the bulk copy of a failback or resolve at its
        target. `data` None writes zeros. Snapshots keep their before-images as for any write.
        Durable only after `flush_volumes()`."""
        self._check_usable()
        ov = self._open_volume(volume_id)
        block = ov.volume.block_size
        if offset % block or length % block or length <= 0:
            raise InvalidArgument(
                f"volume {ov.info.name!r}: region {offset}+{length} is not whole blocks"
            )
        if data is not None and len(data) != length:
            raise InvalidArgument(
                f"volume {ov.info.name!r}: {len(data)} bytes for a region of {length}"
            )
        lba = ov.volume.check_range(offset // block, length // block) // block
        with self._write_slot(ov, offset, length):
            ov.snapshots.before_write(offset, length)
            if data is None:
                ov.volume.write_zeros(lba, length // block)
            else:
                ov.volume.write(lba, data)

    def flush_volumes(self) -> None:
        """fdatasync every volume of the group (after install_region)."""
        for ov in list(self._volumes.values()):
            ov.volume.flush()

    def volume(self, volume_id: int) -> OpenVolume:
        return self._open_volume(volume_id)

    # --- replay and checkpoints ----------------------------------------------------------------

    def _replay(self) -> None:
        """Apply every journal record past the checkpoint, in sequence order, then checkpoint."""
        start = self._info.applied_seq + 1
        journal = self._journal
        if journal.next_seq <= start:
            return
        if journal.first_seq > start:
            raise JournalCorrupt(
                f"group {self.name!r}: the journal starts at seq {journal.first_seq} but the "
                f"checkpoint needs every record from seq {start}"
            )
        count = 0
        for record in journal.read_from(start):
            self._apply_record(record)
            count += 1
        last = journal.next_seq - 1
        self._applied.reset(last)
        self.checkpoint()
        log.info("group %s: replayed %d journal records up to seq %d", self.name, count, last)

    def _apply_record(self, record: Record) -> None:
        self._apply_fields(
            record.seq, record.kind, record.volume_id, record.lba, record.length, record.data
        )

    def _apply_fields(
        self, seq: int, kind: int, volume_id: int, lba: int, length: int, data: Buffer
    ) -> None:
        ov = self._volumes.get(volume_id)
        if ov is None:
            raise JournalCorrupt(
                f"group {self.name!r}: journal record seq {seq} names volume id "
                f"{volume_id}, which is not in the group"
            )
        record_kind = RecordKind(kind)
        offset = ov.volume.check_range(lba, ov.volume.blocks_of(lba, length))
        view = memoryview(data) if record_kind is RecordKind.WRITE else None
        self._apply(ov, record_kind, lba, offset, view, length)

    def checkpoint(self) -> int:
        """Make every applied record durable in the volumes and record that; return the seq."""
        with self._checkpoint_lock:
            upto = self._applied.value
            if upto == self._checkpointed:
                return upto
            for ov in self._volumes.values():
                ov.volume.flush()
            # Record the checkpoint only after the flush: it promises the volumes hold `upto`.
            self._info = self._metadata.set_checkpoint(self._info.id, applied_seq=upto)
            self._checkpointed = upto
            return upto

    def checkpoint_and_trim(self) -> int:
        """Checkpoint, then free journal segments nobody needs; return the bytes freed."""
        upto = self.checkpoint()
        if self.retain_from is not None:
            upto = min(upto, self.retain_from() - 1)
        before = self._journal.used_bytes
        self._journal.trim(upto)
        return before - self._journal.used_bytes

    # --- snapshots -----------------------------------------------------------------------------

    def create_snapshot(
        self, volume_ids: list[int], name: str, kind: SnapshotKind = SnapshotKind.USER
    ) -> list[SnapshotInfo]:
        """Snapshot the given volumes of the group at one instant (one seq for all)."""
        self._check_usable()
        opened = [self._open_volume(v) for v in volume_ids]
        for ov in opened:
            if name in ov.snapshots:
                raise FailedPrecondition(
                    f"snapshot {name!r} of volume {ov.info.name!r} already exists"
                )
        with self._barrier.closed():
            # No write inside and a checkpoint at `seq`: the snapshots hold exactly the records
            # up to `seq`, and a replay after a crash never re-applies one from before them.
            seq = self.checkpoint()
            infos = []
            for ov in opened:
                # Store first, catalogue second: a crash between leaves an orphan store that
                # open() removes, never a catalogued snapshot without its before-images.
                ov.snapshots.create(name)
                infos.append(
                    self._metadata.create_snapshot(
                        ov.info.id, name, kind, epoch=self._info.epoch, seq=seq
                    )
                )
            return infos

    def delete_snapshot(self, volume_id: int, name: str) -> None:
        ov = self._open_volume(volume_id)
        # Catalogue first: once the row is gone nobody can reach the snapshot; a crash before
        # the store is removed leaves an orphan store that open() removes.
        self._metadata.delete_snapshot(ov.info.id, name)
        ov.snapshots.delete(name)

    def rollback_snapshot(self, volume_id: int, name: str, regions: list[int] | None) -> int:
        """Copy a snapshot's preserved regions back into the volume; return how many."""
        self._check_usable()
        ov = self._open_volume(volume_id)
        ov.snapshots.get(name)  # NotFound before anything changes
        with self._barrier.closed():
            # Checkpoint first: records before the rollback must never be replayed over it.
            self.checkpoint()
            restored = ov.snapshots.rollback(name, regions)
            # The rollback is not journaled: it is durable in the volume before we report it.
            ov.volume.flush()
            return restored


def _is_hole(path: Path, offset: int, length: int) -> bool:
    """True if [offset, offset+length) of the file holds no data extent (SEEK_DATA): a sparse
    region reads as zeros without reading it. False when the filesystem cannot tell."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        data_at = os.lseek(fd, offset, os.SEEK_DATA)
    except OSError as error:
        # ENXIO: no data at or after offset. EINVAL: SEEK_DATA unsupported; read the bytes.
        return error.errno == errno.ENXIO
    finally:
        os.close(fd)
    return data_at >= offset + length


_ZEROS: dict[int, bytes] = {}


def _zeros(length: int) -> bytes:
    """A cached run of zero bytes to compare a copied range with (memcmp speed)."""
    zeros = _ZEROS.get(length)
    if zeros is None:
        zeros = _ZEROS.setdefault(length, bytes(length))
    return zeros


def _first_difference(a: bytes, b: memoryview) -> int:
    return next(i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y)
