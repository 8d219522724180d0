"""Journal.append_records: a received batch is one group commit, all or nothing, stored under
this site's group and volume ids."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from targetd_repl.errors import InvalidArgument, JournalCorrupt, SequenceGap
from targetd_repl.model import RecordKind
from targetd_repl.storage.journal import Journal
from targetd_repl.storage.journal_record import Record, decode_record, encode_record


def _records(first: int, count: int, *, group: int = 7, volume: int = 3) -> list[Record]:
    return [
        decode_record(
            encode_record(
                kind=RecordKind.WRITE,
                group_id=group,
                seq=seq,
                epoch=1,
                volume_id=volume,
                lba=seq * 8,
                timestamp_ns=time.time_ns(),
                commit_floor=seq - 1,
                data=bytes([seq % 251]) * 4096,
            )
        )
        for seq in range(first, first + count)
    ]


def test_a_batch_is_one_fdatasync_and_keeps_peer_data(tmp_path: Path) -> None:
    with Journal.open(tmp_path, group_id=1, size_limit=64 << 20) as journal:
        before = journal.fsync_count
        assert journal.append_records(_records(1, 200), volume_map={3: 5}) == 200
        assert journal.fsync_count - before == 1
        stored = list(journal.read_from(1))
        assert [r.seq for r in stored] == list(range(1, 201))
        assert {(r.group_id, r.volume_id) for r in stored} == {(1, 5)}
        assert stored[9].data == bytes([10]) * 4096 and stored[9].lba == 80


def test_a_bad_batch_stores_nothing(tmp_path: Path) -> None:
    with Journal.open(tmp_path, group_id=1, size_limit=64 << 20) as journal:
        good = _records(1, 3)
        with pytest.raises(SequenceGap):
            journal.append_records(_records(2, 3), volume_map={3: 5})  # not next_seq
        with pytest.raises(SequenceGap):
            journal.append_records([good[0], good[2]], volume_map={3: 5})  # a hole inside
        damaged = bytearray(good[2].encode())
        damaged[-1] ^= 1
        bad = Record(
            **{**{f: getattr(good[2], f) for f in Record.__slots__}, "data": bytes(damaged[64:])}
        )
        with pytest.raises(JournalCorrupt):
            journal.append_records([good[0], good[1], bad], volume_map={3: 5})
        with pytest.raises(InvalidArgument, match="volume id 3"):
            journal.append_records(good, volume_map={4: 5})
        with pytest.raises(InvalidArgument, match="group 7"):
            journal.append_records(good)  # no map: the group id must be ours
        assert journal.next_seq == 1 and journal.durable_seq == 0
        assert journal.append_records(good, volume_map={3: 5}) == 3
