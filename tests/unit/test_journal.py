"""The journal's API: append, read, segments, trim, size limit, replicated appends, tailing,
close, group commit under many writers, and what an I/O error does."""

from __future__ import annotations

import errno
import os
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

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
from targetd_repl.storage import journal as journal_module
from targetd_repl.storage.journal import Journal, segment_name
from targetd_repl.storage.journal_record import (
    HEADER_SIZE,
    decode_record,
    encode_record,
    iter_records,
)

GROUP = 7
WRITE = RecordKind.WRITE


@pytest.fixture
def jdir(tmp_path: Path) -> Path:
    return tmp_path / "journal"


@pytest.fixture
def journal(jdir: Path) -> Iterator[Journal]:
    with Journal.open(jdir, group_id=GROUP, size_limit=1 << 30) as j:
        yield j


def payload(seq_hint: int, size: int = 512) -> bytes:
    return (seq_hint.to_bytes(8, "little") * (size // 8 + 1))[:size]


def segment_files(jdir: Path) -> list[str]:
    return sorted(p.name for p in jdir.iterdir() if p.name.startswith("seg-"))


def test_append_returns_contiguous_seqs_and_reads_back(journal: Journal) -> None:
    assert (journal.first_seq, journal.next_seq, journal.durable_seq) == (1, 1, 0)
    s1 = journal.append(WRITE, 3, 16, b"a" * 4096, epoch=5)
    s2 = journal.append(RecordKind.ZERO, 3, 24, b"", epoch=5, length=8192)
    s3 = journal.append(RecordKind.MARKER, 0, 0, b"", epoch=6)
    assert (s1, s2, s3) == (1, 2, 3)
    assert (journal.next_seq, journal.durable_seq) == (4, 3)
    records = list(journal.read_from(1))
    assert [(r.seq, r.kind, r.volume_id, r.lba, r.length, r.epoch) for r in records] == [
        (1, WRITE, 3, 16, 4096, 5),
        (2, RecordKind.ZERO, 3, 24, 8192, 5),
        (3, RecordKind.MARKER, 0, 0, 0, 6),
    ]
    assert bytes(records[0].data) == b"a" * 4096 and records[1].data == b""
    assert [r.commit_floor for r in records] == [0, 1, 2]  # each append synced the one before
    assert all(r.group_id == GROUP and r.timestamp_ns > 0 for r in records)


def test_bytearray_and_memoryview_payloads(journal: Journal) -> None:
    buf = bytearray(b"z" * 1024)
    journal.append(WRITE, 1, 0, buf, epoch=1)
    journal.append(WRITE, 1, 2, memoryview(buf)[512:], epoch=1)
    journal.append(WRITE, 1, 4, memoryview(bytes(range(256)) * 4).cast("I"), epoch=1)
    lengths = [r.length for r in journal.read_from(1)]
    assert lengths == [1024, 512, 1024]


def test_reopen_keeps_records_and_start_seq_applies_only_to_an_empty_journal(jdir: Path) -> None:
    with Journal.open(jdir, group_id=GROUP, size_limit=1 << 20, start_seq=100) as j:
        assert (j.first_seq, j.next_seq) == (100, 100)
        for i in range(5):
            assert j.append(WRITE, 1, i, payload(i), epoch=1) == 100 + i
    assert segment_files(jdir) == [segment_name(100)]
    with Journal.open(jdir, group_id=GROUP, size_limit=1 << 20, start_seq=1) as j:
        assert (j.first_seq, j.next_seq, j.durable_seq) == (100, 105, 104)
        assert [bytes(r.data) for r in j.read_from(102)] == [payload(2), payload(3), payload(4)]
        assert j.append(WRITE, 1, 9, b"q" * 8, epoch=1) == 105


def test_read_from_bounds(journal: Journal) -> None:
    for i in range(10):
        journal.append(WRITE, 1, i, payload(i, 64), epoch=1)
    assert [r.seq for r in journal.read_from(4, max_records=3)] == [4, 5, 6]
    assert list(journal.read_from(11)) == []
    assert list(journal.read_from(50)) == []
    with pytest.raises(SequenceTrimmed, match="seq 0 was trimmed, the first kept is 1"):
        journal.read_from(0)


def test_segments_roll_over_without_splitting_a_batch(jdir: Path) -> None:
    record = HEADER_SIZE + 1000
    with Journal.open(jdir, group_id=GROUP, size_limit=1 << 30, segment_size=3 * record) as j:
        for i in range(10):
            j.append(WRITE, 1, i, payload(i, 1000), epoch=1)
        assert j.segment_count == 4
        assert [r.seq for r in j.read_from(1)] == list(range(1, 11))
        assert [r.seq for r in j.read_from(5, max_records=2)] == [5, 6]
    names = segment_files(jdir)
    assert names == [segment_name(s) for s in (1, 4, 7, 10)]
    for name in names:  # each file holds whole records, starting with the seq in its name
        seqs = [r.seq for r in iter_records((jdir / name).read_bytes())]
        assert seqs[0] == int(name[4:24]) and seqs == list(range(seqs[0], seqs[0] + len(seqs)))
        assert (jdir / name).stat().st_size <= 3 * record


def test_a_record_larger_than_a_segment_gets_one_of_its_own(jdir: Path) -> None:
    with Journal.open(jdir, group_id=GROUP, size_limit=1 << 30, segment_size=1024) as j:
        j.append(WRITE, 1, 0, b"s" * 100, epoch=1)
        j.append(WRITE, 1, 1, b"L" * 5000, epoch=1)
        j.append(WRITE, 1, 2, b"t" * 100, epoch=1)
        assert [r.length for r in j.read_from(1)] == [100, 5000, 100]
    assert segment_files(jdir) == [segment_name(1), segment_name(2), segment_name(3)]


def test_trim_frees_whole_segments_and_moves_first_seq(jdir: Path) -> None:
    record = HEADER_SIZE + 1000
    with Journal.open(jdir, group_id=GROUP, size_limit=1 << 30, segment_size=4 * record) as j:
        for i in range(10):
            j.append(WRITE, 1, i, payload(i, 1000), epoch=1)
        assert j.used_bytes == 10 * record
        assert j.trim(6) == 4 * record  # segment 1..4 goes; 5..8 still holds 7 and 8
        assert j.first_seq == 5 and j.used_bytes == 6 * record
        with pytest.raises(SequenceTrimmed):
            j.read_from(4)
        assert [r.seq for r in j.read_from(5)] == list(range(5, 11))
        assert j.trim(6) == 0
    with Journal.open(jdir, group_id=GROUP, size_limit=1 << 30, segment_size=4 * record) as j:
        assert (j.first_seq, j.next_seq) == (5, 11)


def test_trimmed_segments_are_recycled_and_their_stale_records_never_come_back(
    jdir: Path,
) -> None:
    record = HEADER_SIZE + 1000
    opts = {"group_id": GROUP, "size_limit": 1 << 30, "segment_size": 4 * record}
    with Journal.open(jdir, **opts) as j:  # type: ignore[arg-type]
        for i in range(1, 17):  # segments from seq 1, 5, 9, 13
            j.append(WRITE, 1, i, payload(i, 1000), epoch=1)
        inodes = {p.name: p.stat().st_ino for p in jdir.iterdir()}
        assert j.trim(11) == 8 * record  # 1..4 and 5..8 become spares; 9..12 holds 12
        assert j.spare_count == 2 and segment_files(jdir) == [segment_name(9), segment_name(13)]
        spares = {p.stat().st_ino for p in jdir.glob("spare-*.log")}
        assert spares == {inodes[segment_name(1)], inodes[segment_name(5)]}
        # the next roll-overs reuse them; a shorter record leaves stale bytes behind it
        for i in range(17, 23):
            j.append(WRITE, 1, i, payload(i, 1000 if i < 21 else 100), epoch=1)
        assert j.spare_count == 0
        assert {(jdir / segment_name(s)).stat().st_ino for s in (17, 21)} == spares
        assert (jdir / segment_name(21)).stat().st_size == 4 * record  # stale tail
        assert j.used_bytes == 12 * record + 2 * (HEADER_SIZE + 100)
    with Journal.open(jdir, **opts) as j:  # type: ignore[arg-type]
        records = list(j.read_from(j.first_seq))
        assert [r.seq for r in records] == list(range(9, 23))
        assert all(bytes(r.data) == payload(r.seq, len(r.data)) for r in records)
        assert (jdir / segment_name(21)).stat().st_size == 2 * (HEADER_SIZE + 100)  # cut
        assert j.append(WRITE, 1, 23, payload(23, 1000), epoch=1) == 23
        j.trim(22)  # everything up to 22 goes: a sealed segment with a stale tail was fine
    # a journal that starts afresh (no segment) drops its spares: its seqs may restart lower
    for name in segment_files(jdir):
        os.unlink(jdir / name)
    assert list(jdir.glob("spare-*.log"))
    with Journal.open(jdir, **opts, start_seq=3) as j:  # type: ignore[arg-type]
        assert j.spare_count == 0 and not list(jdir.glob("spare-*.log"))
        assert (j.first_seq, j.next_seq) == (3, 3)


def test_a_sealed_recycled_segment_must_still_reach_the_next_one(jdir: Path) -> None:
    record = HEADER_SIZE + 1000
    opts = {"group_id": GROUP, "size_limit": 1 << 30, "segment_size": 4 * record}
    with Journal.open(jdir, **opts) as j:  # type: ignore[arg-type]
        for i in range(1, 13):
            j.append(WRITE, 1, i, payload(i, 1000), epoch=1)
        j.trim(8)
        for i in range(13, 25):
            j.append(WRITE, 1, i, payload(i, 1000), epoch=1)
    sealed = jdir / segment_name(13)  # a recycled file, sealed: seqs 13..16
    with open(sealed, "r+b") as f:
        f.seek(2 * record + 100)
        f.write(b"\xff" * 8)  # damage seq 15: the segment no longer reaches seq 17
    with pytest.raises(JournalCorrupt, match="sealed segment"):
        Journal.open(jdir, **opts)  # type: ignore[arg-type]


def test_trimming_everything_frees_the_active_segment_too(journal: Journal) -> None:
    for i in range(4):
        journal.append(WRITE, 1, i, payload(i), epoch=1)
    freed = journal.trim(4)
    assert freed == 4 * (HEADER_SIZE + 512)
    assert journal.used_bytes == 0
    assert (journal.first_seq, journal.next_seq) == (5, 5)
    assert journal.append(WRITE, 1, 0, b"n" * 8, epoch=1) == 5
    assert [r.seq for r in journal.read_from(5)] == [5]


def test_trim_never_passes_durable_seq(journal: Journal) -> None:
    journal.append(WRITE, 1, 0, b"x", epoch=1)
    assert journal.trim(10**6) > 0
    assert journal.first_seq == 2 == journal.next_seq


def test_journal_full_appends_nothing(jdir: Path) -> None:
    record = HEADER_SIZE + 1000
    with Journal.open(
        jdir, group_id=GROUP, size_limit=3 * record + 64, segment_size=2 * record
    ) as j:
        for i in range(3):
            j.append(WRITE, 1, i, payload(i, 1000), epoch=1)
        used = j.used_bytes
        with pytest.raises(JournalFull, match="would pass the size limit"):
            j.append(WRITE, 1, 3, payload(3, 1000), epoch=1)
        assert (j.next_seq, j.durable_seq, j.used_bytes) == (4, 3, used)
        j.append(RecordKind.MARKER, 0, 0, b"", epoch=1)  # 64 bytes still fit under the limit
        j.trim(2)
        assert j.append(WRITE, 1, 3, payload(3, 1000), epoch=1) == 5
        assert [r.seq for r in j.read_from(3)] == [3, 4, 5]


def _shipped(seq: int, data: bytes, group: int = GROUP, floor: int | None = None) -> bytes:
    return encode_record(
        kind=WRITE,
        group_id=group,
        seq=seq,
        epoch=3,
        volume_id=2,
        lba=seq * 8,
        timestamp_ns=1000 + seq,
        commit_floor=seq - 1 if floor is None else floor,
        data=data,
    )


def test_append_record_keeps_the_peers_fields_and_restamps_the_floor(jdir: Path) -> None:
    with Journal.open(jdir, group_id=GROUP, size_limit=1 << 20, start_seq=41) as j:
        for seq in (41, 42, 43):
            assert j.append_record(decode_record(_shipped(seq, payload(seq), floor=0))) == seq
        with pytest.raises(SequenceGap, match="got record seq 45, expected 44"):
            j.append_record(decode_record(_shipped(45, b"x")))
        with pytest.raises(SequenceGap):
            j.append_record(decode_record(_shipped(43, b"x")))
        with pytest.raises(InvalidArgument, match="is for group 8"):
            j.append_record(decode_record(_shipped(44, b"x", group=8)))
        got = list(j.read_from(41))
    assert [(r.seq, r.epoch, r.lba, r.timestamp_ns) for r in got] == [
        (41, 3, 328, 1041),
        (42, 3, 336, 1042),
        (43, 3, 344, 1043),
    ]
    assert [bytes(r.data) for r in got] == [payload(41), payload(42), payload(43)]
    assert [r.commit_floor for r in got] == [
        40,
        41,
        42,
    ]  # this journal's durability, not the peer's


def test_append_record_verifies_the_crc_first(journal: Journal) -> None:
    good = decode_record(_shipped(1, b"abcd"))
    forged = type(good)(**{**{f: getattr(good, f) for f in good.__slots__}, "data": b"abce"})
    with pytest.raises(JournalCorrupt, match="CRC32C mismatch"):
        journal.append_record(forged)
    assert journal.next_seq == 1


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((99, 1, 0, b""), {"epoch": 1}, "unknown journal record kind"),
        ((WRITE, 1, 0, b"abc"), {"epoch": 1, "length": 4}, "needs 4 bytes of data, got 3"),
        ((RecordKind.ZERO, 1, 0, b"abc"), {"epoch": 1, "length": 3}, "needs 0 bytes"),
        ((WRITE, 1 << 32, 0, b"a"), {"epoch": 1}, "volume id"),
        ((WRITE, 1, -1, b"a"), {"epoch": 1}, "lba"),
        ((WRITE, 1, 0, b"a"), {"epoch": -1}, "epoch"),
    ],
)
def test_bad_appends_are_refused_before_anything_changes(
    journal: Journal, args: tuple[object, ...], kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(InvalidArgument, match=message):
        journal.append(*args, **kwargs)  # type: ignore[arg-type]
    assert journal.next_seq == 1 and journal.used_bytes == 0


def test_open_rejects_bad_settings(jdir: Path) -> None:
    with pytest.raises(InvalidArgument):
        Journal.open(jdir, group_id=1, size_limit=0)
    with pytest.raises(InvalidArgument):
        Journal.open(jdir, group_id=1, size_limit=10, start_seq=0)
    with pytest.raises(InvalidArgument):
        Journal.open(jdir, group_id=-1, size_limit=10)


def test_wait_durable_beyond_tails_appends(journal: Journal) -> None:
    assert journal.wait_durable_beyond(0, timeout=0.01) == 0  # timed out
    seen: list[int] = []

    def tail() -> None:
        seq = 0
        while seq < 20:
            seq = journal.wait_durable_beyond(seq, timeout=5)
            seen.extend(r.seq for r in journal.read_from(len(seen) + 1))

    reader = threading.Thread(target=tail)
    reader.start()
    for i in range(20):
        journal.append(WRITE, 1, i, payload(i, 64), epoch=1)
    reader.join(5)
    assert seen == list(range(1, 21))


def test_close_wakes_tailers_and_refuses_appends(jdir: Path) -> None:
    j = Journal.open(jdir, group_id=GROUP, size_limit=1 << 20)
    errors: list[BaseException] = []

    def tail() -> None:
        try:
            j.wait_durable_beyond(0, timeout=10)
        except BaseException as exc:
            errors.append(exc)

    reader = threading.Thread(target=tail)
    reader.start()
    time.sleep(0.05)
    j.close()
    reader.join(5)
    assert len(errors) == 1 and isinstance(errors[0], JournalClosed)
    with pytest.raises(JournalClosed):
        j.append(WRITE, 1, 0, b"x", epoch=1)
    with pytest.raises(JournalClosed):
        j.read_from(1)
    j.close()  # idempotent


def test_group_commit_many_writers_share_fsyncs(jdir: Path) -> None:
    writers, per_writer = 32, 40
    with Journal.open(jdir, group_id=GROUP, size_limit=1 << 30, segment_size=256 << 10) as j:
        acked: list[list[tuple[int, int]]] = [[] for _ in range(writers)]
        gate = threading.Barrier(writers)

        def writer(index: int) -> None:
            gate.wait()
            for n in range(per_writer):
                seq = j.append(WRITE, index, n, payload(index * 1000 + n, 4096), epoch=1)
                acked[index].append((seq, n))

        threads = [threading.Thread(target=writer, args=(i,)) for i in range(writers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        total = writers * per_writer
        seqs = sorted(seq for per in acked for seq, _ in per)
        assert seqs == list(range(1, total + 1))  # unique and contiguous
        assert j.durable_seq == total
        assert j.fsync_count < total, f"{j.fsync_count} fsyncs for {total} appends"
        by_seq = {r.seq: r for r in j.read_from(1)}
        for index, per in enumerate(acked):
            assert [seq for seq, _ in per] == sorted(seq for seq, _ in per)  # per-writer order
            for seq, n in per:
                record = by_seq[seq]
                assert (record.volume_id, record.lba) == (index, n)
                assert bytes(record.data) == payload(index * 1000 + n, 4096)
        assert j.segment_count > 1
    with Journal.open(jdir, group_id=GROUP, size_limit=1 << 30) as j:
        assert j.next_seq == total + 1


def test_readers_run_concurrently_with_writers_and_trim(jdir: Path) -> None:
    with Journal.open(jdir, group_id=GROUP, size_limit=1 << 30, segment_size=16 << 10) as j:
        stop = threading.Event()
        problems: list[BaseException] = []

        def reader() -> None:
            try:
                while not stop.is_set():
                    start = j.first_seq
                    previous = start - 1
                    try:
                        for record in j.read_from(start):
                            assert record.seq == previous + 1
                            previous = record.seq
                    except SequenceTrimmed:
                        pass  # trimmed under us: fine, start again
            except BaseException as exc:
                problems.append(exc)

        def writer(index: int) -> None:
            for n in range(60):
                j.append(WRITE, index, n, payload(n, 1000), epoch=1)

        readers = [threading.Thread(target=reader) for _ in range(2)]
        writers = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
        for thread in readers + writers:
            thread.start()
        for _ in range(20):
            j.trim(j.durable_seq - 50)
            time.sleep(0.005)
        for thread in writers:
            thread.join()
        stop.set()
        for thread in readers:
            thread.join()
        assert not problems, problems
        assert j.next_seq == 481


def test_an_fdatasync_error_fails_the_append_and_poisons_the_journal(
    jdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    j = Journal.open(jdir, group_id=GROUP, size_limit=1 << 20)
    j.append(WRITE, 1, 0, b"durable", epoch=1)

    def broken(fd: int) -> None:
        raise OSError(errno.EIO, "simulated")

    monkeypatch.setattr(os, "fdatasync", broken)
    with pytest.raises(JournalError, match=r"I/O error syncing .* simulated; journal failed"):
        j.append(WRITE, 1, 1, b"never acknowledged", epoch=1)
    monkeypatch.undo()
    with pytest.raises(JournalError, match="journal failed"):  # poisoned: no later append
        j.append(WRITE, 1, 2, b"x", epoch=1)
    assert j.durable_seq == 1
    assert [bytes(r.data) for r in j.read_from(1)] == [b"durable"]  # durable data stays readable
    j.close()
    with Journal.open(jdir, group_id=GROUP, size_limit=1 << 20) as j:
        # The failed append was never acknowledged: it may or may not be there, but whole.
        assert [bytes(r.data) for r in j.read_from(1)][:1] == [b"durable"]
        assert j.next_seq in (2, 3)


def test_a_write_error_fails_every_waiting_append(
    jdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    j = Journal.open(jdir, group_id=GROUP, size_limit=1 << 20)

    def full(fd: int, buffers: list[bytes], offset: int) -> int:
        raise OSError(errno.ENOSPC, "simulated")

    monkeypatch.setattr(os, "pwritev", full)
    outcomes: list[BaseException | int] = []

    def writer(n: int) -> None:
        try:
            outcomes.append(j.append(WRITE, 1, n, b"w" * 100, epoch=1))
        except BaseException as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(outcomes) == 8
    assert all(isinstance(o, JournalError) and "journal failed" in str(o) for o in outcomes)
    assert j.durable_seq == 0
    j.close()


def test_short_writes_are_resumed(jdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.pwritev

    def dribble(fd: int, buffers: list[bytes], offset: int) -> int:
        first = memoryview(buffers[0]).cast("B")
        return real(fd, [first[: max(1, len(first) // 3)]], offset)  # a third of one buffer

    monkeypatch.setattr(os, "pwritev", dribble)
    with Journal.open(jdir, group_id=GROUP, size_limit=1 << 20) as j:
        for i in range(3):
            j.append(WRITE, 1, i, payload(i, 3000), epoch=1)
        assert [bytes(r.data) for r in j.read_from(1)] == [payload(i, 3000) for i in range(3)]


def test_writes_longer_than_iov_max_are_split(tmp_path: Path) -> None:
    buffers = [bytes([i % 251]) * (i % 7 + 1) for i in range(3000)]
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        total = sum(len(b) for b in buffers)
        journal_module.pwritev_all(fd, list(buffers), 10, total)
    finally:
        os.close(fd)
    assert (tmp_path / "f").read_bytes() == bytes(10) + b"".join(buffers)


def test_an_unknown_file_in_the_directory_is_ignored(jdir: Path) -> None:
    with Journal.open(jdir, group_id=GROUP, size_limit=1 << 20) as j:
        j.append(WRITE, 1, 0, b"x", epoch=1)
    (jdir / "notes.txt").write_text("hello")
    with Journal.open(jdir, group_id=GROUP, size_limit=1 << 20) as j:
        assert j.next_seq == 2


def test_a_journal_of_another_group_is_corrupt_here(jdir: Path) -> None:
    with Journal.open(jdir, group_id=GROUP, size_limit=1 << 20) as j:
        j.append(WRITE, 1, 0, b"x", epoch=1)
        j.append(WRITE, 1, 0, b"y", epoch=1)
    with pytest.raises(JournalCorrupt, match="belongs to group 7, this journal is group 8"):
        Journal.open(jdir, group_id=GROUP + 1, size_limit=1 << 20)


def test_append_records_is_one_all_or_nothing_group_commit(jdir: Path) -> None:
    with Journal.open(jdir, group_id=GROUP, size_limit=1 << 20, start_seq=10) as j:
        assert j.append_records([]) == 9
        peer = [
            decode_record(
                encode_record(
                    kind=WRITE,
                    group_id=99,  # the peer's ids for the group and its volumes
                    seq=seq,
                    epoch=2,
                    volume_id=100 + seq % 2,
                    lba=seq,
                    timestamp_ns=5,
                    commit_floor=0,
                    data=payload(seq),
                )
            )
            for seq in range(10, 15)
        ]
        fsyncs = j.fsync_count
        assert j.append_records(peer, volume_map={100: 1, 101: 2}) == 14
        assert j.fsync_count == fsyncs + 1
        got = list(j.read_from(10))
        assert [(r.seq, r.group_id, r.volume_id) for r in got] == [
            (10, GROUP, 1),
            (11, GROUP, 2),
            (12, GROUP, 1),
            (13, GROUP, 2),
            (14, GROUP, 1),
        ]
        assert [bytes(r.data) for r in got] == [payload(s) for s in range(10, 15)]
        again = [decode_record(r.encode()) for r in got]  # stored CRCs verify with our ids
        with pytest.raises(SequenceGap):
            j.append_records(again)
        shifted = [decode_record(_shipped(s, b"x")) for s in (15, 17)]
        with pytest.raises(SequenceGap, match="has seq 17 at position 1"):
            j.append_records(shifted)
        with pytest.raises(InvalidArgument, match="maps to no volume"):
            j.append_records([decode_record(_shipped(15, b"x"))], volume_map={})
        good = decode_record(_shipped(15, b"x"))
        bad = type(good)(**{**{f: getattr(good, f) for f in good.__slots__}, "data": b"y"})
        with pytest.raises(JournalCorrupt):
            j.append_records([decode_record(_shipped(15, b"z")), bad])
        assert j.next_seq == 15  # nothing of a refused batch was appended


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_bursts_of_writers_with_random_latencies(
    jdir: Path, monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    """Short bursts of writers, with trims and segment roll-overs among them, against writes
    and syncs of random (seeded) latency: writers hand roles over, take over batches, park and
    roll over in every order. Each append must come back (a lost wake-up strands it), and only
    once it is durable (an early return is a broken promise)."""
    rng = random.Random(seed)
    real_sync, real_write = os.fdatasync, os.pwritev

    def slow_sync(fd: int) -> None:
        time.sleep(rng.random() * 0.0008)
        real_sync(fd)

    def slow_write(fd: int, buffers: list[bytes], offset: int) -> int:
        if rng.random() < 0.5:
            time.sleep(rng.random() * 0.0008)
        return real_write(fd, buffers, offset)

    monkeypatch.setattr(os, "fdatasync", slow_sync)
    monkeypatch.setattr(os, "pwritev", slow_write)
    j = Journal.open(jdir, group_id=GROUP, size_limit=1 << 30, segment_size=4096)
    early: list[tuple[int, int]] = []
    acked: dict[int, bytes] = {}

    def writer(n: int, done: list[int]) -> None:
        data = payload(n, rng.randrange(0, 1500))
        seq = j.append(WRITE, 1, n, data, epoch=1)
        durable = j.durable_seq
        if durable < seq:
            early.append((seq, durable))
        acked[seq] = data
        done.append(seq)

    for burst in range(150):
        count = rng.randint(1, 12)
        done: list[int] = []
        threads = [
            threading.Thread(target=writer, args=(n, done), daemon=True) for n in range(count)
        ]
        if rng.random() < 0.3:
            upto = j.durable_seq - rng.randrange(0, 20)
            threads.append(threading.Thread(target=j.trim, args=(upto,), daemon=True))
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 10
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if len(done) != count or any(t.is_alive() for t in threads):
            # Leave the journal open: close() would wait forever for the stranded append.
            pytest.fail(f"burst {burst}: {count - len(done)} appends never returned")
        assert not early, f"acknowledged before durable: (seq, durable_seq) {early}"
    j.close()
    with Journal.open(jdir, group_id=GROUP, size_limit=1 << 30) as j:
        assert j.next_seq == max(acked) + 1
        kept = {r.seq: bytes(r.data) for r in j.read_from(j.first_seq)}
        assert all(kept[seq] == data for seq, data in acked.items() if seq >= j.first_seq)
