"""Model-based test: random sequences of appends (one or many writers), replicated appends,
trims, reopens, crashes with a torn last batch, and reads, checked against a plain dict."""

from __future__ import annotations

import random
import shutil
import tempfile
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from targetd_repl.errors import JournalFull, SequenceGap, SequenceTrimmed
from targetd_repl.model import RecordKind
from targetd_repl.storage.journal import Journal
from targetd_repl.storage.journal_record import HEADER_SIZE, decode_record, encode_record

GROUP = 5
SEGMENT = 2000
LIMIT = 10_000

# What the model remembers of a record: kind, volume, lba, length, data.
Entry = tuple[RecordKind, int, int, int, bytes]


class JournalMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="journal-model-"))
        self.jdir = self.root / "journal"
        self.journal = self._open()
        self.model: dict[int, Entry] = {}
        self.next_seq = 1
        self.tag = 0

    def _open(self) -> Journal:
        return Journal.open(self.jdir, group_id=GROUP, size_limit=LIMIT, segment_size=SEGMENT)

    def _data(self, size: int) -> bytes:
        self.tag += 1
        return random.Random(self.tag).randbytes(size)

    def teardown(self) -> None:
        self.journal.close()
        shutil.rmtree(self.root, ignore_errors=True)

    # --- rules -------------------------------------------------------------------------------

    @rule(
        kind=st.sampled_from(list(RecordKind)),
        size=st.integers(0, 1500),
        lba=st.integers(0, 1 << 40),
    )
    def append(self, kind: RecordKind, size: int, lba: int) -> None:
        data = self._data(size) if kind is RecordKind.WRITE else b""
        length = size if kind is RecordKind.WRITE else size * 2
        full = self.journal.used_bytes + HEADER_SIZE + len(data) > LIMIT
        try:
            seq = self.journal.append(kind, 1, lba, data, epoch=1, length=length)
        except JournalFull:
            assert full
            return
        assert not full
        assert seq == self.next_seq
        self.model[seq] = (kind, 1, lba, length, data)
        self.next_seq += 1

    @rule(size=st.integers(0, 1500))
    def fill(self, size: int) -> None:
        """Append until the size limit refuses one; the refused append leaves no trace."""
        for _ in range(LIMIT // (HEADER_SIZE + size) + 1):
            used = self.journal.used_bytes
            self.append(RecordKind.WRITE, size, 0)
            if self.journal.used_bytes == used:  # refused
                assert used + HEADER_SIZE + size > LIMIT
                return
        raise AssertionError("the journal never filled up")

    @rule(sizes=st.lists(st.integers(0, 800), min_size=2, max_size=12))
    def append_concurrently(self, sizes: list[int]) -> None:
        if self.journal.used_bytes + sum(HEADER_SIZE + s for s in sizes) > LIMIT:
            return  # the concurrent case only checks ordering; fullness is covered above
        datas = [self._data(size) for size in sizes]
        acked: dict[int, Entry] = {}

        def writer(index: int) -> None:
            seq = self.journal.append(RecordKind.WRITE, 2, index, datas[index], epoch=1)
            acked[seq] = (RecordKind.WRITE, 2, index, len(datas[index]), datas[index])

        threads = [threading.Thread(target=writer, args=(i,)) for i in range(len(sizes))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(acked) == list(range(self.next_seq, self.next_seq + len(sizes)))
        self.model.update(acked)
        self.next_seq += len(sizes)

    @rule(skew=st.sampled_from([0, 0, 0, -1, 1, 5]), size=st.integers(0, 600))
    def append_replicated(self, skew: int, size: int) -> None:
        seq = self.next_seq + skew
        if seq < 1:
            return
        data = self._data(size)
        record = decode_record(
            encode_record(
                kind=RecordKind.WRITE,
                group_id=GROUP,
                seq=seq,
                epoch=4,
                volume_id=3,
                lba=seq,
                timestamp_ns=7,
                commit_floor=seq - 1,
                data=data,
            )
        )
        if self.journal.used_bytes + record.encoded_size > LIMIT:
            return
        if skew:
            with pytest.raises(SequenceGap):
                self.journal.append_record(record)
            return
        assert self.journal.append_record(record) == seq
        self.model[seq] = (RecordKind.WRITE, 3, seq, size, data)
        self.next_seq += 1

    @rule(fraction=st.floats(0, 1))
    def trim(self, fraction: float) -> None:
        first = self.journal.first_seq
        upto = first - 1 + int(fraction * (self.next_seq - first))
        self.journal.trim(upto)
        new_first = self.journal.first_seq
        assert first <= new_first <= upto + 1 or new_first == first
        for seq in range(first, new_first):
            del self.model[seq]

    @rule()
    def reopen(self) -> None:
        self.journal.close()
        self.journal = self._open()

    @rule(
        sizes=st.lists(st.integers(0, 900), min_size=1, max_size=5),
        cut=st.floats(0, 1),
        zero_sectors=st.booleans(),
        seed=st.integers(0, 2**32),
    )
    def crash_with_a_torn_batch(
        self, sizes: list[int], cut: float, zero_sectors: bool, seed: int
    ) -> None:
        """The process dies while its last batch is half on disk: the records of that batch
        were written (floor = the last acknowledged seq) but some bytes never got there."""
        self.journal.close()
        last = self.next_seq - 1
        batch = [
            encode_record(
                kind=RecordKind.WRITE,
                group_id=GROUP,
                seq=self.next_seq + i,
                epoch=1,
                volume_id=4,
                lba=i,
                timestamp_ns=1,
                commit_floor=last,
                data=self._data(size),
            )
            for i, size in enumerate(sizes)
        ]
        tail = sorted(self.jdir.glob("seg-*.log"))[-1]
        tail_first = int(tail.name[4:24])
        # where the next write goes: the end of the tail's records, not of the file (a recycled
        # file holds stale bytes past them, which the torn write leaves in place)
        start = sum(HEADER_SIZE + len(e[4]) for seq, e in self.model.items() if seq >= tail_first)
        blob = b"".join(batch)
        end = start + int(cut * len(blob))
        old = tail.read_bytes()
        raw = bytearray(old[:start] + blob[: end - start] + old[end:])
        if zero_sectors:
            rng = random.Random(seed)
            for sector in range(start // 512, (end + 511) // 512):
                if rng.random() < 0.25:
                    lo, hi = max(sector * 512, start), min(sector * 512 + 512, end)
                    raw[lo:hi] = bytes(hi - lo)
        tail.write_bytes(raw)
        self.journal = self._open()
        pos = start
        for record in batch:  # the intact prefix of the batch survives, as if it were synced
            if raw[pos : pos + len(record)] != record:
                break
            decoded = decode_record(record)
            self.model[decoded.seq] = (
                RecordKind.WRITE,
                4,
                decoded.lba,
                decoded.length,
                record[64:],
            )
            self.next_seq += 1
            pos += len(record)

    @precondition(lambda self: self.model)
    @rule(where=st.floats(0, 1), count=st.integers(1, 30))
    def read(self, where: float, count: int) -> None:
        first = self.journal.first_seq
        start = first + int(where * (self.next_seq - first))
        got = list(self.journal.read_from(start, max_records=count))
        want = [s for s in range(start, min(self.next_seq, start + count))]
        assert [r.seq for r in got] == want
        for record in got:
            kind, volume, lba, length, data = self.model[record.seq]
            assert (record.kind, record.volume_id, record.lba, record.length) == (
                kind,
                volume,
                lba,
                length,
            )
            assert bytes(record.data) == data
        if first > 1:
            with pytest.raises(SequenceTrimmed):
                self.journal.read_from(first - 1)

    # --- invariants --------------------------------------------------------------------------

    @invariant()
    def counters_match_the_model(self) -> None:
        j = self.journal
        assert j.next_seq == self.next_seq
        assert j.durable_seq == self.next_seq - 1
        assert sorted(self.model) == list(range(j.first_seq, j.next_seq))

    @invariant()
    def used_bytes_is_what_the_records_take(self) -> None:
        records = sum(HEADER_SIZE + len(entry[4]) for entry in self.model.values())
        assert self.journal.used_bytes == records
        # a recycled segment file may also hold stale bytes past its records (journal.py)
        on_disk = sum(p.stat().st_size for p in self.jdir.glob("seg-*.log"))
        assert on_disk >= records
        assert len(list(self.jdir.glob("spare-*.log"))) == self.journal.spare_count <= 2


JournalMachine.TestCase.settings = settings(
    max_examples=25,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_journal_model = JournalMachine.TestCase
