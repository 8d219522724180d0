"""GroupStore.write_batch: the writes of one ring poll as one journal group commit. One
fdatasync for the batch, seqs in list order, overlapping writes applied in journal order,
refused writes leave no record, a crash (kill -9) loses no acknowledged write; and the runner
hands a poll's WRITEs to it as one batch."""

from __future__ import annotations

import errno
import os
import random
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from targetd_repl.datapath.cdb import WRITE_10, WRITE_16
from targetd_repl.datapath.engine_backend import EngineBackend
from targetd_repl.datapath.fake_kernel import FakeKernel, cdb_rw
from targetd_repl.datapath.memory_backend import MemoryBackend
from targetd_repl.datapath.ring import Ring
from targetd_repl.datapath.runner import Runner
from targetd_repl.datapath.scsi import ScsiDevice
from targetd_repl.errors import (
    JournalFull,
    Misaligned,
    OutOfRange,
    StorageError,
    WriteProtected,
)
from targetd_repl.model import RecordKind, Role
from targetd_repl.storage import group_store as group_store_module
from targetd_repl.storage.engine import StorageEngine
from targetd_repl.storage.group_store import GroupSettings, GroupStore
from targetd_repl.storage.journal import Journal

BS = 512
SIZE = 4 << 20
BLOCKS = SIZE // BS
SMALL = GroupSettings(journal_size_limit=64 << 20, journal_segment_size=1 << 20)


def open_engine(path: Path, settings: GroupSettings = SMALL) -> StorageEngine:
    return StorageEngine.open(path, site="site-a", settings=settings)


def journal_image(store: GroupStore) -> bytearray:
    image = bytearray(SIZE)
    for record in store.journal.read_from(store.journal.first_seq):
        start = record.lba * BS
        if record.kind == RecordKind.WRITE:
            image[start : start + record.length] = record.data
        elif record.kind == RecordKind.ZERO:
            image[start : start + record.length] = bytes(record.length)
    return image


def test_batch_is_one_group_commit_in_list_order(tmp_path: Path) -> None:
    engine = open_engine(tmp_path)
    engine.create_volume("v1", SIZE)
    store, vid = engine.group_of("v1")
    rng = random.Random(5)
    writes = []
    for i in range(32):  # overlapping on purpose: a few regions only
        nblocks = rng.choice((1, 8, 130))
        lba = rng.randrange(0, 600)
        writes.append((lba, bytes([i + 1]) * (nblocks * BS)))
    model = bytearray(SIZE)
    for lba, data in writes:
        model[lba * BS : lba * BS + len(data)] = data
    syncs = store.journal.fsync_count
    first = store.journal.next_seq
    assert store.write_batch(vid, writes) == [None] * len(writes)
    assert store.journal.fsync_count == syncs + 1  # one fdatasync for the whole batch
    records = list(store.journal.read_from(first))
    assert [r.seq for r in records] == list(range(first, first + len(writes)))
    assert [(r.lba, bytes(r.data)) for r in records] == writes  # journal order == list order
    assert store.applied_seq == first + len(writes) - 1
    assert engine.read("v1", 0, BLOCKS) == model == journal_image(store)  # apply order too
    engine.close()


def test_refused_writes_leave_no_record_the_others_go(tmp_path: Path) -> None:
    engine = open_engine(tmp_path)
    engine.create_volume("v1", SIZE)
    store, vid = engine.group_of("v1")
    first = store.journal.next_seq
    results = store.write_batch(
        vid,
        [
            (0, b"a" * BS),
            (BLOCKS, b"b" * BS),
            (1, b"c" * BS),
            (BLOCKS - 1, b"d" * 2 * BS),
            (2, b"e" * 100),  # not whole blocks
        ],
    )
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], OutOfRange) and isinstance(results[3], OutOfRange)
    assert isinstance(results[4], Misaligned)
    assert [(r.seq, r.lba) for r in store.journal.read_from(first)] == [(first, 0), (first + 1, 1)]
    assert engine.read("v1", 0, 2) == b"a" * BS + b"c" * BS
    store.set_role(Role.SECONDARY)
    refused = store.write_batch(vid, [(0, b"x" * BS), (5, b"y" * BS), (BLOCKS, b"z" * BS)])
    assert all(isinstance(r, WriteProtected) for r in refused[:2])
    assert isinstance(refused[2], OutOfRange)  # a bad range is that on a secondary too
    assert store.journal.next_seq == first + 2  # nothing journaled
    engine.close()


def test_a_failing_hook_fails_its_write_only_and_the_batch_is_applied(tmp_path: Path) -> None:
    engine = open_engine(tmp_path)
    engine.create_volume("v1", SIZE)
    store, vid = engine.group_of("v1")
    first = store.journal.next_seq

    def on_written(seq: int, volume_id: int, offset: int, length: int) -> None:
        if seq == first + 1:
            raise RuntimeError("bitmap full")

    store.on_written = on_written
    results = store.write_batch(vid, [(i * 8, bytes([i + 1]) * BS) for i in range(4)])
    assert [r is None for r in results] == [True, False, True, True]
    assert store.applied_seq == first + 3  # every journaled record reached the volume
    assert [engine.read("v1", i * 8, 1) for i in range(4)] == [
        bytes([i + 1]) * BS for i in range(4)
    ]
    store.on_written = None
    engine.close()


def test_batch_that_does_not_fit_goes_one_by_one_after_a_checkpoint(tmp_path: Path) -> None:
    settings = GroupSettings(journal_size_limit=256 << 10, journal_segment_size=64 << 10)
    engine = open_engine(tmp_path, settings)
    engine.create_volume("v1", SIZE)
    store, vid = engine.group_of("v1")
    for i in range(6):  # fill most of the journal
        store.write(vid, i * 64, bytes([i]) * (32 << 10))
    writes = [(1000 + 40 * i, bytes([0x80 + i]) * (16 << 10)) for i in range(8)]  # 128 KiB
    assert store.write_batch(vid, writes) == [None] * 8
    for lba, data in writes:
        assert engine.read("v1", lba, len(data) // BS) == data
    engine.close()


def test_replay_applies_a_batch_the_volume_lost(tmp_path: Path) -> None:
    engine = open_engine(tmp_path / "site")
    engine.create_volume("v1", SIZE)
    store, vid = engine.group_of("v1")
    store.checkpoint()
    image_path = tmp_path / "site" / "volumes" / "v1.img"
    shutil.copyfile(image_path, tmp_path / "at-checkpoint.img")
    writes = [(8 * i % 300, bytes([i + 1]) * (8 * BS)) for i in range(40)]
    assert store.write_batch(vid, writes) == [None] * 40
    model = engine.read("v1", 0, BLOCKS)
    engine._metadata.close()  # crash: no checkpoint; the volume loses what was not flushed
    shutil.copyfile(tmp_path / "at-checkpoint.img", image_path)
    reopened = open_engine(tmp_path / "site")
    assert reopened.read("v1", 0, BLOCKS) == model
    reopened.close()


CHILD = textwrap.dedent(
    """
    import random, sys
    from pathlib import Path
    from targetd_repl.storage.engine import StorageEngine
    from targetd_repl.storage.group_store import GroupSettings

    engine = StorageEngine.open(Path(sys.argv[1]), site="site-a",
                                settings=GroupSettings(journal_segment_size=1 << 20))
    if not engine.list_volumes():
        engine.create_volume("v1", 4 << 20)
    store, vid = engine.group_of("v1")
    print("ready", flush=True)
    rng = random.Random(int(sys.argv[2]))
    runs = sys.argv[3] == "runs"
    while True:
        count = rng.randrange(1, 33)
        if runs:  # runs of writes that continue one another (one vectored write each), and
            # overlapping ones between them
            start = rng.randrange(0, 256)
            writes = [(start + 8 * (i % 9), rng.randbytes(4096)) for i in range(count)]
        else:
            writes = [(rng.randrange(0, 512), rng.randbytes(4096)) for _ in range(count)]
        first = store.journal.next_seq
        assert store.write_batch(vid, writes) == [None] * len(writes)
        for i, (lba, data) in enumerate(writes):  # acknowledged: the batch call returned
            print(first + i, lba, data.hex(), flush=True)
    """
)


@pytest.mark.parametrize(("seed", "shape"), [(1, "random"), (2, "random"), (3, "runs")])
def test_kill9_loses_no_acknowledged_batched_write(tmp_path: Path, seed: int, shape: str) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path), str(seed), shape],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "ready"
    acked: list[tuple[int, int, bytes]] = []
    stop_after = random.Random(seed).randrange(100, 600)
    for line in child.stdout:
        seq, lba, data = line.split()
        acked.append((int(seq), int(lba), bytes.fromhex(data)))
        if len(acked) >= stop_after:
            break
    os.kill(child.pid, 9)
    child.wait()
    engine = open_engine(tmp_path)
    store, _ = engine.group_of("v1")
    assert store.applied_seq >= acked[-1][0]
    by_seq = {r.seq: r for r in store.journal.read_from(store.journal.first_seq)}
    for seq, lba, data in acked:
        assert (by_seq[seq].lba, bytes(by_seq[seq].data)) == (lba, data), f"acked {seq} lost"
    # the volume is the journal applied in seq order (overlaps included)
    assert engine.read("v1", 0, BLOCKS) == journal_image(store)
    engine.close()


def test_runner_hands_a_polls_writes_to_one_group_commit(tmp_path: Path) -> None:
    engine = open_engine(tmp_path)
    engine.create_volume("v1", SIZE)
    store, _ = engine.group_of("v1")
    kernel = FakeKernel(ring_area=128 + 65536, data_size=1 << 20, fragment=True, seed=2)
    runner = Runner(
        Ring(kernel.buffer), kernel.doorbell(), ScsiDevice(EngineBackend(engine, "v1")), workers=0
    )
    model = bytearray(SIZE)
    ids = []
    for i in range(24):
        lba = (i * 3) % 20  # overlapping: ring order must win
        data = bytes([i + 1]) * (4 * BS)
        model[lba * BS : lba * BS + len(data)] = data
        opcode = WRITE_16 if i % 2 else WRITE_10
        ids.append(kernel.submit(cdb_rw(opcode, lba, 4), data_out=data, notify=False))
    syncs = store.journal.fsync_count
    assert runner.step() == 24
    assert store.journal.fsync_count == syncs + 1
    done = kernel.reap()
    assert sorted(c.cmd_id for c in done) == sorted(ids) and all(c.status == 0 for c in done)
    assert engine.read("v1", 0, BLOCKS) == model
    runner.stop()
    kernel.close()
    engine.close()


def test_journal_append_batch_is_all_or_nothing(tmp_path: Path) -> None:
    journal = Journal.open(tmp_path / "j", group_id=1, size_limit=64 << 10, segment_size=16 << 10)
    try:
        syncs = journal.fsync_count
        items = [(RecordKind.WRITE, 1, 8 * i, bytes([i]) * BS, BS) for i in range(10)]
        items.append((RecordKind.ZERO, 1, 100, b"", 4 * BS))
        last = journal.append_batch(items, epoch=1)
        assert last == 11 and journal.durable_seq == 11
        assert journal.fsync_count == syncs + 1
        got = [(r.seq, r.kind, r.lba, bytes(r.data)) for r in journal.read_from(1)]
        assert got == [(i + 1, k, lba, bytes(d)) for i, (k, _, lba, d, _) in enumerate(items)]
        big = [(RecordKind.WRITE, 1, 0, bytes(8 << 10), 8 << 10)] * 8  # past the size limit
        with pytest.raises(JournalFull):
            journal.append_batch(big, epoch=1)
        assert journal.next_seq == 12  # nothing of it was appended
    finally:
        journal.close()


class _GatedBatches(MemoryBackend):
    """A batching backend whose first batch waits on a gate; records each batch's size."""

    def __init__(self) -> None:
        super().__init__("gated", SIZE)
        self.gate = threading.Event()
        self.sizes: list[int] = []

    def compare_and_write(
        self, lba: int, expected: Sequence[memoryview], new: Sequence[memoryview]
    ) -> int | None:
        raise AssertionError("not used")

    def write_batch(
        self, writes: Sequence[tuple[int, Sequence[memoryview]]]
    ) -> list[BaseException | None]:
        self.sizes.append(len(writes))
        self.gate.wait(10)
        for lba, buffers in writes:
            self.write(lba, buffers)
        return [None] * len(writes)


def test_the_writer_merges_batches_that_queued_while_it_was_busy() -> None:
    backend = _GatedBatches()
    kernel = FakeKernel(ring_area=128 + 65536, data_size=1 << 20)
    runner = Runner(Ring(kernel.buffer), kernel.doorbell(), ScsiDevice(backend), workers=2)
    runner.start()
    runner._stop.set()  # drive the ring from this thread; the writer thread stays
    runner.doorbell.interrupt()
    assert runner._thread is not None
    runner._thread.join(5)
    model = bytearray(SIZE)
    for poll in range(3):
        for i in range(4):
            lba = (poll * 4 + i) % 6  # overlapping across the polls: ring order must win
            data = bytes([poll * 4 + i + 1]) * BS
            model[lba * BS : (lba + 1) * BS] = data
            kernel.submit(cdb_rw(WRITE_10, lba, 1), data_out=data, notify=False)
        assert runner.step() == 4
        if poll == 0:
            deadline = time.monotonic() + 5
            while not backend.sizes and time.monotonic() < deadline:
                time.sleep(0.01)  # the writer took the first batch and waits on the gate
    backend.gate.set()
    assert runner.wait_idle(10)
    assert backend.sizes == [4, 8]  # polls 2 and 3: one batch
    assert len(kernel.reap()) == 12
    assert bytes(backend.image) == bytes(model)
    assert runner.stop()
    kernel.close()


def test_execute_writes_gives_each_command_its_own_outcome(tmp_path: Path) -> None:
    engine = open_engine(tmp_path)
    engine.create_volume("v1", SIZE)
    lun = ScsiDevice(EngineBackend(engine, "v1"))
    assert lun.batches_writes
    a, b = bytearray(b"a" * BS), bytearray(b"b" * 2 * BS)
    results = lun.execute_writes(
        [
            (cdb_rw(WRITE_10, 3, 1), [memoryview(a)]),
            (cdb_rw(WRITE_16, BLOCKS, 1), [memoryview(a)]),  # LBA OUT OF RANGE
            (cdb_rw(WRITE_10, 9, 1), [memoryview(b)]),  # data-out longer than the CDB says
            (cdb_rw(WRITE_16, 4, 2, flags=0x08), [memoryview(b)]),  # FUA
            (cdb_rw(WRITE_10, 7, 0), []),  # zero blocks: GOOD, nothing written
        ]
    )
    assert [r.status for r in results] == [0, 2, 2, 0, 0]
    assert (results[1].sense[12], results[1].sense[13]) == (0x21, 0x00)
    assert (results[2].sense[12], results[2].sense[13]) == (0x0E, 0x03)
    assert engine.read("v1", 3, 3) == b"a" * BS + b"b" * 2 * BS
    store, _ = engine.group_of("v1")
    store.set_role(Role.SECONDARY)
    refused = lun.execute_writes([(cdb_rw(WRITE_10, 0, 1), [memoryview(a)])])
    assert (refused[0].sense[2] & 0x0F, refused[0].sense[12]) == (0x07, 0x27)  # WRITE PROTECTED
    engine.close()


# --- the apply: runs of contiguous writes, one vectored write each ------------------------------


def _spy_vectored_writes(
    monkeypatch: pytest.MonkeyPatch, fail_at: int | None = None
) -> list[tuple[int, int, int]]:
    """Record each vectored volume write of the apply as (offset, bytes, buffers); the
    `fail_at`-th (0-based) fails with EIO instead."""
    calls: list[tuple[int, int, int]] = []
    real = group_store_module.pwritev_all

    def spy(fd: int, iov: list[bytes | memoryview], offset: int, nbytes: int) -> None:
        if fail_at is not None and len(calls) == fail_at:
            calls.append((offset, nbytes, -1))
            raise OSError(errno.EIO, "injected volume write error")
        calls.append((offset, nbytes, len(iov)))
        real(fd, iov, offset, nbytes)

    monkeypatch.setattr(group_store_module, "pwritev_all", spy)
    return calls


# (lba, blocks): A B C continue one another, D stands alone, E overlaps A and B and F continues E
RUNS = [(0, 8), (8, 8), (16, 4), (100, 2), (4, 8), (12, 2)]


def test_contiguous_writes_of_a_batch_reach_the_volume_as_one_write_in_seq_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = open_engine(tmp_path)
    engine.create_volume("v1", SIZE)
    store, vid = engine.group_of("v1")
    writes = [(lba, bytes([i + 1]) * (n * BS)) for i, (lba, n) in enumerate(RUNS)]
    model = bytearray(SIZE)
    for lba, payload in writes:
        model[lba * BS : lba * BS + len(payload)] = payload
    written: list[tuple[int, int, int]] = []
    store.on_written = lambda seq, volume_id, offset, length: written.append((seq, offset, length))
    calls = _spy_vectored_writes(monkeypatch)
    first = store.journal.next_seq
    assert store.write_batch(vid, writes) == [None] * len(writes)
    # three runs: A+B+C, D, E+F (E overlaps A and B: a run of its own, after theirs)
    assert calls == [(0, 20 * BS, 3), (100 * BS, 2 * BS, 1), (4 * BS, 10 * BS, 2)]
    assert written == [
        (first + i, lba * BS, len(payload)) for i, (lba, payload) in enumerate(writes)
    ]  # every write marked, in seq order
    assert store.applied_seq == first + len(writes) - 1
    assert engine.read("v1", 0, BLOCKS) == model == journal_image(store)
    store.on_written = None
    engine.close()


def test_a_failed_run_stops_the_group_and_the_replay_applies_the_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = open_engine(tmp_path / "site")
    engine.create_volume("v1", SIZE)
    store, vid = engine.group_of("v1")
    writes = [(lba, bytes([0x40 + i]) * (n * BS)) for i, (lba, n) in enumerate(RUNS)]
    model = bytearray(SIZE)
    for lba, payload in writes:
        model[lba * BS : lba * BS + len(payload)] = payload
    calls = _spy_vectored_writes(monkeypatch, fail_at=1)  # the second run: D
    results = store.write_batch(vid, writes)
    assert results[:3] == [None, None, None]  # run A+B+C reached the volume: acknowledged
    assert all(isinstance(r, OSError) for r in results[3:])  # D, E, F: failed, not acked
    assert len(calls) == 2 and store.applied_seq == store.journal.durable_seq - 3
    with pytest.raises(StorageError):
        store.write(vid, 0, b"z" * BS)  # the group stopped: nothing more until a replay
    monkeypatch.undo()
    engine.close()  # no checkpoint after a failure: the reopen replays the journal
    reopened = open_engine(tmp_path / "site")
    assert reopened.read("v1", 0, BLOCKS) == model  # journaled, so applied by the replay
    reopened.close()


def test_reads_come_straight_from_the_volume_and_a_short_file_is_an_error(
    tmp_path: Path,
) -> None:
    engine = open_engine(tmp_path / "site")
    engine.create_volume("v1", SIZE)
    store, vid = engine.group_of("v1")
    store.write_batch(vid, [(8, b"r" * (4 * BS)), (12, b"s" * BS)])
    buf = bytearray(6 * BS)
    store.readinto(vid, 7, memoryview(buf))
    assert bytes(buf) == bytes(BS) + b"r" * (4 * BS) + b"s" * BS
    with pytest.raises(OutOfRange):
        store.readinto(vid, BLOCKS - 1, memoryview(buf))
    with pytest.raises(Misaligned):
        store.readinto(vid, 0, memoryview(buf)[:100])
    store.checkpoint()
    os.truncate(tmp_path / "site" / "volumes" / "v1.img", 10 * BS)  # behind the store's back
    with pytest.raises(StorageError, match="truncated outside the controller"):
        store.readinto(vid, 8, memoryview(buf))
    engine.close()


def test_a_batch_preserves_its_before_images_in_one_record(tmp_path: Path) -> None:
    """With a snapshot, a batch's before-images are one group commit (one store record) that
    precedes every overwrite of the batch: the snapshot reads the image from before the batch,
    even where the batch's writes overlap one another."""
    engine = open_engine(tmp_path)
    engine.create_volume("v1", SIZE)
    store, vid = engine.group_of("v1")
    rng = random.Random(11)
    engine.write("v1", 0, rng.randbytes(SIZE))
    image = engine.read("v1", 0, BLOCKS)
    engine.create_snapshot("v1", "before")
    region = SMALL.region_size // BS  # blocks per chunk
    writes = [  # overlapping runs over chunks 0-3, then chunk 5 and the last one
        (region - 4, b"a" * (8 * BS)),
        (region + 4, b"b" * (2 * region * BS)),
        (region - 2, b"c" * (4 * BS)),
        (5 * region, b"d" * BS),
        (BLOCKS - 1, b"e" * BS),
    ]
    model = bytearray(image)
    for lba, payload in writes:
        model[lba * BS : lba * BS + len(payload)] = payload
    assert store.write_batch(vid, writes) == [None] * len(writes)
    assert engine.read("v1", 0, BLOCKS) == model
    assert engine.read_snapshot("v1", "before", 0, BLOCKS) == image
    cow = engine.state_dir / "snapshots" / "v1" / "before.cow"
    raw = cow.read_bytes()
    assert raw[64:68] == b"CoWr" and int.from_bytes(raw[68:72], "little") == 6  # one record
    assert len(raw) == 64 + 16 + 6 * 8 + 6 * region * BS  # ...and nothing after it
    engine.close()
    reopened = open_engine(tmp_path)
    assert reopened.read_snapshot("v1", "before", 0, BLOCKS) == image
    reopened.close()
