"""Crash recovery: damage the files the way a crash (or the disk) would, reopen, and check the
promise: every acknowledged record reads back identical, or the open refuses with JournalCorrupt
because a later record proves the damaged one had been acknowledged; a torn tail is cut and the
journal is appendable again with contiguous seqs. Plus a real SIGKILL of an appending process."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from targetd_repl.errors import JournalCorrupt
from targetd_repl.model import RecordKind
from targetd_repl.storage.journal import Journal
from targetd_repl.storage.journal_record import Record, encode_record, iter_records

GROUP = 3
WRITE = RecordKind.WRITE
SEGMENT = 6 * 1024
CRASH_SETTINGS = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@dataclass(frozen=True)
class Acked:
    seq: int
    volume_id: int
    lba: int
    data: bytes


def data_for(tag: int, size: int) -> bytes:
    return random.Random(tag).randbytes(size)


def build(jdir: Path, sizes: list[int], writers: int = 1) -> list[Acked]:
    """Append records of the given sizes (from `writers` threads) and close; return the acks."""
    acked: list[Acked] = []
    lock = threading.Lock()
    with Journal.open(jdir, group_id=GROUP, size_limit=1 << 30, segment_size=SEGMENT) as j:

        def writer(index: int) -> None:
            for n, size in enumerate(sizes[index::writers]):
                tag = index * 100_000 + n
                data = data_for(tag, size)
                seq = j.append(WRITE, index, tag, data, epoch=1)
                with lock:
                    acked.append(Acked(seq, index, tag, data))

        threads = [threading.Thread(target=writer, args=(i,)) for i in range(writers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    return sorted(acked, key=lambda a: a.seq)


def segments(jdir: Path) -> list[Path]:
    return sorted(jdir.glob("seg-*.log"))


def on_disk(path: Path) -> list[tuple[int, int, Record]]:
    """(start, end, record) of every record of an intact segment file."""
    out: list[tuple[int, int, Record]] = []
    pos = 0
    for record in iter_records(path.read_bytes()):
        out.append((pos, pos + record.encoded_size, record))
        pos += record.encoded_size
    return out


def check_acked(j: Journal, acked: list[Acked], upto: int | None = None) -> None:
    want = [a for a in acked if upto is None or a.seq < upto]
    if not want:
        return
    got = {r.seq: r for r in j.read_from(want[0].seq)}
    for a in want:
        r = got[a.seq]
        assert (r.volume_id, r.lba, bytes(r.data)) == (a.volume_id, a.lba, a.data), a.seq


def check_appendable(j: Journal) -> None:
    seq = j.next_seq
    assert j.append(WRITE, 9, 9, b"after recovery", epoch=2) == seq
    assert [bytes(r.data) for r in j.read_from(seq)] == [b"after recovery"]


# --- a torn, unacknowledged last batch -------------------------------------------------------


@pytest.mark.parametrize("damage", ["cut", "zeros", "random", "sectors", "garbage-after"])
@settings(CRASH_SETTINGS, max_examples=15)
@given(
    sizes=st.lists(st.integers(0, 1500), max_size=12),
    batch_sizes=st.lists(st.integers(0, 1500), min_size=0, max_size=6),
    seed=st.integers(0, 2**32),
)
def test_a_torn_unacknowledged_batch_is_cut_and_nothing_acked_is_lost(
    tmp_path_factory: pytest.TempPathFactory,
    damage: str,
    sizes: list[int],
    batch_sizes: list[int],
    seed: int,
) -> None:
    rng = random.Random(seed)
    jdir = tmp_path_factory.mktemp("j")
    acked = build(jdir, sizes)
    last_acked = acked[-1].seq if acked else 0
    # The batch the crashed process was writing: its records all carry the commit floor of the
    # last acknowledged seq, as the journal stamps them.
    batch = [
        encode_record(
            kind=WRITE,
            group_id=GROUP,
            seq=last_acked + 1 + i,
            epoch=1,
            volume_id=8,
            lba=i,
            timestamp_ns=1,
            commit_floor=last_acked,
            data=data_for(10**9 + i, size),
        )
        for i, size in enumerate(batch_sizes)
    ]
    tail = segments(jdir)[-1]
    start = tail.stat().st_size
    with tail.open("ab") as f:
        f.write(b"".join(batch))
    end = tail.stat().st_size
    raw = bytearray(tail.read_bytes())
    if damage == "garbage-after" or end == start:
        extra = bytes(rng.randrange(0, 40) * 512) if rng.random() < 0.5 else rng.randbytes(700)
        raw += extra
    elif damage == "cut":
        raw = raw[: rng.randrange(start, end + 1)]
    elif damage in ("zeros", "random"):
        a = rng.randrange(start, end)
        b = rng.randrange(a + 1, end + 1)
        raw[a:b] = bytes(b - a) if damage == "zeros" else rng.randbytes(b - a)
    else:  # a few sectors of the batch never reached the disk
        for sector in range(start // 512, (end + 511) // 512):
            if rng.random() < 0.3:
                lo, hi = max(sector * 512, start), min(sector * 512 + 512, end)
                raw[lo:hi] = bytes(hi - lo)
    tail.write_bytes(raw)

    # Which batch records survived intact (a prefix of them may be kept)?
    original = b"".join(batch)
    survivors = 0
    pos = start
    for record in batch:
        stop = pos + len(record)
        if stop <= len(raw) and raw[pos:stop] == original[pos - start : stop - start]:
            survivors += 1
            pos = stop
        else:
            break

    event(f"{damage}: kept {'all' if survivors == len(batch) else 'some' if survivors else 'none'}")
    with Journal.open(jdir, group_id=GROUP, size_limit=1 << 30, segment_size=SEGMENT) as j:
        check_acked(j, acked)
        assert j.next_seq == last_acked + survivors + 1
        kept = list(j.read_from(last_acked + 1))
        assert [r.encode() for r in kept] == batch[:survivors]  # whole and identical, or gone
        assert tail.stat().st_size == pos  # the tail was cut right after the last good record
        check_appendable(j)
    with Journal.open(jdir, group_id=GROUP, size_limit=1 << 30) as j:  # and it stays opened
        check_acked(j, acked)


# --- damage to acknowledged records ------------------------------------------------------------


@CRASH_SETTINGS
@given(
    sizes=st.lists(st.integers(0, 1200), min_size=1, max_size=24),
    writers=st.sampled_from([1, 1, 4]),
    where=st.floats(0, 1, exclude_max=True),
    flip=st.integers(1, 255),
)
def test_damage_to_an_acknowledged_record_is_reported_when_provable(
    tmp_path_factory: pytest.TempPathFactory,
    sizes: list[int],
    writers: int,
    where: float,
    flip: int,
) -> None:
    jdir = tmp_path_factory.mktemp("j")
    acked = build(jdir, sizes, writers)
    tail = segments(jdir)[-1]
    layout = on_disk(tail)
    if not layout:
        return  # an empty last segment: nothing acknowledged in it to damage
    raw = bytearray(tail.read_bytes())
    offset = int(where * len(raw))
    raw[offset] ^= flip
    tail.write_bytes(raw)
    index = next(i for i, (s, e, _) in enumerate(layout) if s <= offset < e)
    bad = layout[index][2]
    proven = any(r.commit_floor >= bad.seq for _, _, r in layout[index + 1 :])
    event(f"writers={writers} proven={proven}")
    if proven:
        with pytest.raises(JournalCorrupt, match=f"seq {bad.seq} had been acknowledged"):
            Journal.open(jdir, group_id=GROUP, size_limit=1 << 30)
        return
    # Nothing later proves it durable: indistinguishable from a torn last batch, so it is cut.
    # (With one writer every record proves its predecessor, so only the last one can go.)
    assert writers > 1 or index == len(layout) - 1
    with Journal.open(jdir, group_id=GROUP, size_limit=1 << 30, segment_size=SEGMENT) as j:
        assert j.next_seq == bad.seq
        check_acked(j, acked, upto=bad.seq)
        check_appendable(j)


@CRASH_SETTINGS
@given(where=st.floats(0, 1, exclude_max=True), flip=st.integers(1, 255))
def test_any_damage_in_a_sealed_segment_is_corruption(
    tmp_path_factory: pytest.TempPathFactory, where: float, flip: int
) -> None:
    jdir = tmp_path_factory.mktemp("j")
    build(jdir, [700] * 20)
    sealed = segments(jdir)[:-1]
    assert len(sealed) >= 2
    victim = sealed[int(where * len(sealed))]
    raw = bytearray(victim.read_bytes())
    raw[int(where * len(raw))] ^= flip
    victim.write_bytes(raw)
    with pytest.raises(JournalCorrupt, match="in a sealed segment"):
        Journal.open(jdir, group_id=GROUP, size_limit=1 << 30)


def test_a_cut_sealed_segment_is_corruption(tmp_path: Path) -> None:
    build(tmp_path, [700] * 20)
    victim = segments(tmp_path)[0]
    os.truncate(victim, victim.stat().st_size - 10)
    with pytest.raises(JournalCorrupt, match="truncated data"):
        Journal.open(tmp_path, group_id=GROUP, size_limit=1 << 30)


def test_a_missing_segment_is_corruption(tmp_path: Path) -> None:
    build(tmp_path, [700] * 30)
    segments(tmp_path)[1].unlink()
    with pytest.raises(JournalCorrupt, match="records are missing"):
        Journal.open(tmp_path, group_id=GROUP, size_limit=1 << 30)


def test_a_zero_filled_tail_is_cut(tmp_path: Path) -> None:
    acked = build(tmp_path, [100, 200, 300])
    tail = segments(tmp_path)[-1]
    size = tail.stat().st_size
    os.truncate(tail, size + 8192)  # the size reached the disk, the data did not
    with Journal.open(tmp_path, group_id=GROUP, size_limit=1 << 30) as j:
        check_acked(j, acked)
        assert tail.stat().st_size == size
        check_appendable(j)


def test_a_torn_first_record_of_a_new_segment_keeps_the_old_ones(tmp_path: Path) -> None:
    acked = build(tmp_path, [1000] * 12)
    tail = segments(tmp_path)[-1]
    layout = on_disk(tail)
    os.truncate(tail, layout[0][1] - 1)  # even the first record of the last segment is torn
    with Journal.open(tmp_path, group_id=GROUP, size_limit=1 << 30) as j:
        first_lost = layout[0][2].seq
        assert j.next_seq == first_lost
        check_acked(j, acked, upto=first_lost)
        check_appendable(j)


# --- a real crash ------------------------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import os, random, sys, threading
    from pathlib import Path
    from targetd_repl.model import RecordKind
    from targetd_repl.storage.journal import Journal

    journal = Journal.open(Path(sys.argv[1]), group_id=3, size_limit=1 << 34,
                           segment_size=256 * 1024)
    round_ = int(sys.argv[2])

    def writer(index):
        n = 0
        while True:
            tag = (round_ * 64 + index) * 1_000_000 + n
            size = random.Random(tag).randrange(0, 20000)
            data = random.Random(tag).randbytes(size)
            seq = journal.append(RecordKind.WRITE, index, tag, data, epoch=1)
            os.write(1, f"{seq} {tag} {size}\\n".encode())
            n += 1

    def trimmer():  # keeps ~100 records: trimmed segments become spares, then are reused
        spares = 0
        while True:
            journal.trim(journal.durable_seq - 100)
            if journal.spare_count < spares:  # a roll-over took a spare: say so
                open(sys.argv[1] + ".reused", "w").close()
            spares = journal.spare_count
            threading.Event().wait(0.002)

    for i in range(6):
        threading.Thread(target=writer, args=(i,), daemon=True).start()
    if sys.argv[3] == "trim":
        threading.Thread(target=trimmer, daemon=True).start()
    threading.Event().wait()
    """
)


@pytest.mark.parametrize("trim", ["no-trim", "trim"])
def test_sigkill_mid_append_loses_no_acknowledged_record(tmp_path: Path, trim: str) -> None:
    """With "trim" the child also trims all the time, so it appends into recycled segment
    files that still hold stale records of their earlier use (journal.py, Recycling)."""
    jdir = tmp_path / "journal"
    acked: dict[int, tuple[int, int]] = {}
    recycled = False  # a spare was seen taken, or spares were on disk at a reopen
    for round_ in range(3):
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(jdir), str(round_), trim],
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
        )
        assert child.stdout is not None
        deadline = time.monotonic() + 20
        lines: list[bytes] = []
        while len(lines) < 150 + 100 * round_ and time.monotonic() < deadline:
            line = child.stdout.readline()
            if not line:
                break
            lines.append(line)
        os.kill(child.pid, signal.SIGKILL)  # mid-append: some threads are inside write/fsync
        rest, _ = child.communicate()
        assert lines, "the child acknowledged nothing"
        for line in [*lines, *rest.splitlines()]:  # every line printed was acknowledged
            seq, tag, size = map(int, line.split())
            acked[seq] = (tag, size)
        with Journal.open(jdir, group_id=GROUP, size_limit=1 << 34) as j:
            records = {r.seq: r for r in j.read_from(j.first_seq)}
            assert list(records) == list(range(j.first_seq, j.next_seq))
            for seq, (tag, size) in acked.items():
                if seq < j.first_seq:
                    assert trim == "trim"  # trimmed on purpose
                    continue
                record = records[seq]
                assert record.lba == tag and bytes(record.data) == data_for(tag, size)
            assert max(acked) < j.next_seq
            if trim == "trim":
                assert j.first_seq > 1, "the child trimmed nothing"
                recycled |= j.spare_count > 0 or Path(f"{jdir}.reused").exists()
    assert recycled or trim == "no-trim", "the child recycled no segment"
