"""The site storage engine: the write path (journal -> before-images -> volume), replay after a
crash, write order under concurrency, snapshots at one seq, role refusal, bad input, and group
reopens (listeners told; commands held at the group's handle across the swap)."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from targetd_repl.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    Misaligned,
    NotFound,
    OutOfRange,
    SequenceGap,
    WriteProtected,
)
from targetd_repl.model import RecordKind, Role
from targetd_repl.storage.engine import GroupListener, StorageEngine
from targetd_repl.storage.group_store import GroupSettings, GroupStore
from tests.unit.test_snapshot import store_records

BS = 512
SIZE = 4 << 20  # 4 MiB volumes: 64 regions of 64 KiB
SMALL = GroupSettings(journal_size_limit=64 << 20, journal_segment_size=1 << 20)


def open_engine(path: Path) -> StorageEngine:
    return StorageEngine.open(path, site="site-a", settings=SMALL)


def replay_image(engine: StorageEngine, volume: str, upto: int | None = None) -> bytearray:
    """The image that applying the group's journal in sequence order produces (from zeros)."""
    store, volume_id = engine.group_of(volume)
    image = bytearray(SIZE)
    for record in store.journal.read_from(store.journal.first_seq):
        if upto is not None and record.seq > upto:
            break
        if record.volume_id != volume_id:
            continue
        start = record.lba * BS
        if record.kind == RecordKind.WRITE:
            image[start : start + record.length] = record.data
        elif record.kind == RecordKind.ZERO:
            image[start : start + record.length] = bytes(record.length)
    return image


def test_write_read_and_seq(tmp_path: Path) -> None:
    engine = open_engine(tmp_path)
    engine.create_volume("v1", SIZE)
    first = engine.write("v1", 8, b"a" * 1024)
    second = engine.write("v1", 9, b"b" * 512)
    assert second == first + 1
    assert engine.read("v1", 8, 2) == b"a" * 512 + b"b" * 512
    engine.write_zeros("v1", 8, 1)
    assert engine.read("v1", 8, 2) == bytes(512) + b"b" * 512
    assert engine.list_groups()[0].name == "v1"  # a lone volume gets a group of its own
    engine.close()


def test_io_follows_volumes_moved_deleted_and_recreated(tmp_path: Path) -> None:
    """The engine remembers which group serves a volume (no SQLite lookup per command); every
    change of that map is seen by the next command."""
    engine = open_engine(tmp_path)
    engine.create_group("g1")
    engine.create_group("g2")
    engine.create_volume("v", SIZE, group="g1")
    engine.write("v", 0, b"1" * BS)  # looked up once, then remembered
    engine.move_volume("v", "g2")
    seq = engine.write("v", 1, b"2" * BS)
    g2 = engine.group("g2")
    assert g2.journal.durable_seq == seq  # the write went to g2's journal
    assert [r.seq for r in g2.journal.read_from(g2.journal.first_seq)][-1] == seq
    assert engine.read("v", 0, 2) == b"1" * BS + b"2" * BS
    engine.delete_volume("v")
    with pytest.raises(NotFound):
        engine.write("v", 0, b"3" * BS)
    engine.create_volume("v", SIZE, group="g1")  # the same name, a new volume
    assert engine.read("v", 0, 2) == bytes(2 * BS)
    engine.write("v", 0, b"4" * BS)
    assert engine.group_of("v")[0] is engine.group("g1")
    engine.close()


def test_bad_requests_leave_no_record(tmp_path: Path) -> None:
    engine = open_engine(tmp_path)
    engine.create_volume("v1", SIZE)
    store, _ = engine.group_of("v1")
    before = store.journal.next_seq
    with pytest.raises(OutOfRange, match="v1"):
        engine.write("v1", SIZE // BS, b"x" * BS)
    with pytest.raises(Misaligned):
        engine.write("v1", 0, b"x" * 100)
    with pytest.raises(NotFound, match="nope"):
        engine.write("nope", 0, b"x" * BS)
    with pytest.raises(InvalidArgument):
        engine.create_volume("bad/name", SIZE)
    with pytest.raises(InvalidArgument):
        engine.create_volume("v2", SIZE, block_size=1024)
    assert store.journal.next_seq == before
    engine.close()


def test_secondary_refuses_writes_then_accepts_when_promoted(tmp_path: Path) -> None:
    engine = open_engine(tmp_path)
    engine.create_group("g", Role.SECONDARY)
    engine.create_volume("v1", SIZE, group="g")
    store = engine.group("g")
    with pytest.raises(WriteProtected, match="secondary"):
        engine.write("v1", 0, b"x" * BS)
    assert store.journal.next_seq == store.journal.first_seq  # nothing journaled
    store.set_role(Role.PRIMARY)
    engine.write("v1", 0, b"x" * BS)
    assert engine.read("v1", 0, 1) == b"x" * BS
    engine.close()


def test_overlapping_concurrent_writes_land_in_journal_order(tmp_path: Path) -> None:
    """The volume must equal the journal applied in seq order: that is what the secondary
    builds, so any other order would let the two sites differ."""
    engine = open_engine(tmp_path)
    engine.create_volume("v1", SIZE)

    def writer(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(60):
            lba = rng.randrange(0, 64)  # all writers fight over the first 32 KiB
            nblocks = rng.randrange(1, 17)
            engine.write("v1", lba, rng.randbytes(nblocks * BS))

    threads = [threading.Thread(target=writer, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert engine.read("v1", 0, SIZE // BS) == replay_image(engine, "v1")
    engine.close()


def test_snapshot_under_load_is_the_image_at_its_seq(tmp_path: Path) -> None:
    engine = open_engine(tmp_path)
    engine.create_volume("v1", SIZE)
    stop = threading.Event()

    def writer(seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            lba = rng.randrange(0, SIZE // BS - 16)
            engine.write("v1", lba, rng.randbytes(16 * BS))

    threads = [threading.Thread(target=writer, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    try:
        snaps = []
        for i in range(3):
            threading.Event().wait(0.05)
            snaps.append(engine.create_snapshot("v1", f"s{i}"))
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    for snap in snaps:
        image = engine.read_snapshot("v1", snap.name, 0, SIZE // BS)
        assert image == replay_image(engine, "v1", upto=snap.seq), snap.name
    engine.close()


def test_rollback_restores_the_snapshot_image(tmp_path: Path) -> None:
    engine = open_engine(tmp_path)
    engine.create_volume("v1", SIZE)
    engine.write("v1", 0, b"1" * 4096)
    engine.create_snapshot("v1", "before")
    engine.write("v1", 0, b"2" * 4096)
    engine.write("v1", 200, b"3" * 512)
    assert engine.rollback_snapshot("v1", "before") == 2  # two regions had been preserved
    assert engine.read("v1", 0, 8) == b"1" * 4096
    assert engine.read("v1", 200, 1) == bytes(512)
    with pytest.raises(FailedPrecondition, match="snapshot"):
        engine.delete_volume("v1")  # snapshots first
    engine.delete_snapshot("v1", "before")
    engine.delete_volume("v1")
    assert engine.list_volumes() == []
    engine.close()


def test_compare_and_write(tmp_path: Path) -> None:
    engine = open_engine(tmp_path)
    engine.create_volume("v1", SIZE)
    store, vid = engine.group_of("v1")
    engine.write("v1", 4, b"o" * 512)
    assert store.compare_and_write(vid, 4, b"o" * 512, b"n" * 512) == -1
    assert engine.read("v1", 4, 1) == b"n" * 512
    seq = store.journal.next_seq
    assert store.compare_and_write(vid, 4, b"n" * 100 + b"X" * 412, b"z" * 512) == 100
    assert engine.read("v1", 4, 1) == b"n" * 512
    assert store.journal.next_seq == seq  # a miscompare journals nothing
    engine.close()


def test_replay_restores_writes_the_volume_lost(tmp_path: Path) -> None:
    """Simulate a power loss: the volume file goes back to its state at the last checkpoint
    (unflushed page cache lost); reopening replays the journal and every acked write is back."""
    rng = random.Random(7)
    engine = open_engine(tmp_path / "site")
    engine.create_volume("v1", SIZE)
    model = bytearray(SIZE)
    for _ in range(40):
        lba = rng.randrange(0, SIZE // BS - 8)
        data = rng.randbytes(8 * BS)
        engine.write("v1", lba, data)
        model[lba * BS : lba * BS + len(data)] = data
    store, _ = engine.group_of("v1")
    checkpoint = store.checkpoint()
    image_path = tmp_path / "site" / "volumes" / "v1.img"
    shutil.copyfile(image_path, tmp_path / "at-checkpoint.img")
    for _ in range(40):
        lba = rng.randrange(0, SIZE // BS - 8)
        data = rng.randbytes(8 * BS)
        engine.write("v1", lba, data)
        model[lba * BS : lba * BS + len(data)] = data
    # Crash: no close, no checkpoint; the volume loses what was not flushed.
    engine._metadata.close()
    shutil.copyfile(tmp_path / "at-checkpoint.img", image_path)
    reopened = open_engine(tmp_path / "site")
    assert reopened.group("v1").applied_seq > checkpoint
    assert reopened.read("v1", 0, SIZE // BS) == model
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
    print("ready", flush=True)
    rng = random.Random(int(sys.argv[2]))
    while True:
        lba = rng.randrange(0, 8192 - 8)
        data = rng.randbytes(4096)
        seq = engine.write("v1", lba, data)
        print(seq, lba, data.hex(), flush=True)
    """
)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_kill9_loses_no_acknowledged_write(tmp_path: Path, seed: int) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path), str(seed)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "ready"
    acked: list[tuple[int, int, bytes]] = []
    deadline = random.Random(seed).randrange(50, 400)
    for line in child.stdout:
        seq, lba, data = line.split()
        acked.append((int(seq), int(lba), bytes.fromhex(data)))
        if len(acked) >= deadline:
            break
    os.kill(child.pid, 9)
    child.wait()
    engine = open_engine(tmp_path)
    store, _ = engine.group_of("v1")
    assert store.applied_seq >= acked[-1][0]
    # Every acknowledged write is in the journal, and the volume is the journal applied in order.
    volume = engine.read("v1", 0, 8192)
    by_seq = {r.seq: r for r in store.journal.read_from(store.journal.first_seq)}
    for seq, lba, data in acked:
        assert (by_seq[seq].lba, by_seq[seq].data) == (lba, data), f"acked seq {seq} lost"
    expected = bytearray(8192 * BS)
    for record in by_seq.values():
        expected[record.lba * BS : record.lba * BS + record.length] = record.data
    assert volume == expected
    engine.close()


def primary_and_secondary(
    tmp_path: Path, volumes: tuple[str, ...]
) -> tuple[StorageEngine, StorageEngine]:
    """Two engines holding group "g" with `volumes`: primary at site-a, secondary at site-b."""
    primary = StorageEngine.open(tmp_path / "a", site="site-a", settings=SMALL)
    secondary = StorageEngine.open(tmp_path / "b", site="site-b", settings=SMALL)
    primary.create_group("g")
    secondary.create_group("g", Role.SECONDARY)
    for engine in (primary, secondary):
        for name in volumes:
            engine.create_volume(name, SIZE, group="g")
    return primary, secondary


def test_secondary_receives_and_applies_in_order(tmp_path: Path) -> None:
    primary, secondary = primary_and_secondary(tmp_path, ("v1", "v2"))
    rng = random.Random(5)
    for _ in range(50):
        volume = rng.choice(["v1", "v2"])
        primary.write(volume, rng.randrange(0, 1000), rng.randbytes(4 * BS))
    primary.write_zeros("v1", 0, 64)
    source, target = primary.group("g"), secondary.group("g")
    records = list(source.journal.read_from(source.journal.first_seq))
    with pytest.raises(SequenceGap):
        target.receive(records[1:2])  # out of order: refused, nothing stored
    assert target.receive(records[:30]) == records[29].seq
    assert target.apply_received(max_records=10) == records[9].seq  # a prefix, in order
    assert target.receive(records[30:]) == records[-1].seq
    assert target.apply_received() == records[-1].seq
    for volume in ("v1", "v2"):
        assert secondary.read(volume, 0, SIZE // BS) == primary.read(volume, 0, SIZE // BS)
    with pytest.raises(WriteProtected):
        source.receive(records[:1])  # a primary never takes replicated records
    primary.close()
    secondary.close()


def test_duplicate_volume_is_refused_by_name(tmp_path: Path) -> None:
    engine = open_engine(tmp_path)
    engine.create_volume("v1", SIZE)
    with pytest.raises(AlreadyExists, match="volume 'v1' already exists"):
        engine.create_volume("v1", SIZE, group="v1")
    engine.close()


# --- reopens: listeners and the group handle ------------------------------------------------------


class Recorder(GroupListener):
    """Records each notice, and what it found at the time."""

    def __init__(self, engine: StorageEngine) -> None:
        self.engine = engine
        self.calls: list[tuple[str, int, GroupStore | None]] = []
        self.old_store_open: list[bool] = []

    def reopening(self, group_id: int) -> None:
        try:
            store = self.engine.group(self.engine.metadata.get_group_by_id(group_id).name)
        except NotFound:  # a group being deleted is gone from the metadata already
            self.calls.append(("reopening", group_id, None))
            return
        self.calls.append(("reopening", group_id, store))
        try:
            store.read(store.volume_ids()[0], 0, 1)
            self.old_store_open.append(True)
        except Exception:
            self.old_store_open.append(False)

    def reopened(self, group_id: int, store: GroupStore | None) -> None:
        self.calls.append(("reopened", group_id, store))


def test_listeners_hear_of_every_reopen(tmp_path: Path) -> None:
    engine = open_engine(tmp_path)
    engine.create_group("g", Role.SECONDARY)
    engine.create_volume("v1", SIZE, group="g")
    gid = engine.group("g").info.id
    old = engine.group("g")
    heard = Recorder(engine)
    engine.add_listener(heard)

    engine.create_volume("v2", SIZE, group="g")  # what a peer's pair request does
    new = engine.group("g")
    assert new is not old
    assert heard.calls == [("reopening", gid, old), ("reopened", gid, new)]
    assert heard.old_store_open == [True]  # told before the old store closed
    assert sorted(new.volume_ids()) == [v.id for v in engine.list_volumes()]
    assert old.volume_ids() == []  # closed now: its volumes let go

    heard.calls.clear()
    engine.delete_volume("v2")
    engine.delete_volume("v1")
    engine.delete_group("g")
    assert [(what, store is None) for what, _, store in heard.calls] == [
        ("reopening", False),
        ("reopened", False),
        ("reopening", False),
        ("reopened", False),
        ("reopening", True),  # (the group's row is gone already)
        ("reopened", True),  # deleted: no store any more
    ]
    assert {gid} == {group_id for _, group_id, _ in heard.calls}

    heard.calls.clear()
    engine.create_volume("solo", SIZE)  # its own new group: a first store, nothing closed
    assert [(what, store is engine.group("solo")) for what, _, store in heard.calls] == [
        ("reopened", True)
    ]
    engine.remove_listener(heard)
    heard.calls.clear()
    engine.create_volume("solo2", SIZE, group="solo")
    assert heard.calls == []
    engine.close()


def test_a_failing_listener_does_not_stop_the_change(tmp_path: Path) -> None:
    class Broken(GroupListener):
        def reopening(self, group_id: int) -> None:
            raise RuntimeError("listener bug")

    engine = open_engine(tmp_path)
    engine.create_volume("v1", SIZE)
    engine.add_listener(Broken())
    engine.create_volume("v2", SIZE, group="v1")
    assert engine.write("v2", 0, b"x" * BS) > 0
    engine.close()


def test_a_reopen_waits_for_commands_in_flight_and_holds_new_ones(tmp_path: Path) -> None:
    """No command runs on a closed store: the reopen waits for the one inside; the one that
    arrives meanwhile waits for the swap and runs on the new store."""
    engine = open_engine(tmp_path)
    engine.create_volume("v1", SIZE)
    handle, vid = engine.handle_of("v1")
    old = handle.store
    heard = Recorder(engine)
    engine.add_listener(heard)
    inside, release = threading.Event(), threading.Event()
    seen: list[GroupStore] = []

    def in_flight() -> None:
        with handle.use() as store:
            inside.set()
            release.wait(10)
            store.write(vid, 0, b"a" * BS)  # the old store is still open under it
            seen.append(store)

    def arriving() -> None:
        with handle.use() as store:
            store.write(vid, 1, b"b" * BS)
            seen.append(store)

    first = threading.Thread(target=in_flight)
    first.start()
    assert inside.wait(10)
    change = threading.Thread(
        target=engine.create_volume, args=("v2", SIZE), kwargs={"group": "v1"}
    )
    change.start()
    _wait(lambda: len(heard.calls) == 1)  # reopening told, now waiting at the gate
    later = threading.Thread(target=arriving)
    later.start()
    time.sleep(0.2)
    assert change.is_alive() and later.is_alive() and seen == []
    release.set()
    for thread in (first, change, later):
        thread.join(10)
        assert not thread.is_alive()
    new = engine.group("v1")
    assert seen == [old, new]
    assert handle.store is new  # the same handle, the new store
    assert engine.read("v1", 0, 2) == b"a" * BS + b"b" * BS
    engine.close()
    with pytest.raises(NotFound, match="closed"), handle.use():
        pass


def _wait(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.005)


@pytest.mark.parametrize("shipped", [False, True], ids=["from-journal", "from-memory"])
def test_secondary_apply_saves_a_runs_before_images_in_one_record(
    tmp_path: Path, shipped: bool
) -> None:
    """A secondary with a snapshot (a DR test copy, say) applies a run of received records
    after saving the before-images of every chunk they touch in one store record (one
    fdatasync), not one per record; the snapshot keeps the image it was taken at."""
    primary, secondary = primary_and_secondary(tmp_path, ("v1",))
    source, target = primary.group("g"), secondary.group("g")
    rng = random.Random(9)
    primary.write("v1", 0, rng.randbytes(SIZE))
    target.receive(list(source.journal.read_from(source.journal.first_seq)))
    target.apply_received()
    secondary.create_snapshot("v1", "dr")
    image = secondary.read("v1", 0, SIZE // BS)
    region = SMALL.region_size // BS
    first = source.journal.next_seq
    for i in range(40):  # 20 chunks, each written twice; one write spans two chunks
        lba = (i % 20) * 3 * region + rng.randrange(region - 8)
        primary.write("v1", lba, bytes([i + 1]) * (4 * BS if i != 7 else region * BS))
    primary.write_zeros("v1", 61 * region, 8)  # a ZERO record: preserved on its own
    if shipped:
        count, raw = source.journal.read_raw(first, 1 << 30)
        vmap = {primary.group_of("v1")[1]: secondary.group_of("v1")[1]}
        target.receive_shipped(raw, first, count, vmap)
    else:
        target.receive(list(source.journal.read_from(first)))
    assert target.apply_received() == source.journal.durable_seq
    assert secondary.read("v1", 0, SIZE // BS) == primary.read("v1", 0, SIZE // BS)
    assert secondary.read_snapshot("v1", "dr", 0, SIZE // BS) == image
    cow = secondary.state_dir / "snapshots" / "v1" / "dr.cow"
    assert store_records(cow) == 2  # the run's 21 chunks in one record, the ZERO's chunk
    primary.close()
    secondary.close()
