"""The shipping fast path: the sender reads the journal's bytes in one pread (Journal.read_raw)
and sends them pre-encoded (wire.encode_batch_request); the receiver checks and stores them as
one group commit (Journal.check_shipped / append_checked) and applies them from memory, in seq
order (GroupStore.apply_received); a tailer waiting for a batch is not woken at every commit."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from targetd_repl.errors import InvalidArgument, JournalCorrupt, SequenceGap, SequenceTrimmed
from targetd_repl.model import PairMode, RecordKind
from targetd_repl.replication import wire
from targetd_repl.storage.journal import Journal
from targetd_repl.storage.journal_record import HEADER_SIZE, iter_records
from targetd_repl.v1 import replication_pb2
from tests.unit.test_replication_support import BS, converged, make_group, two_sites


def _fill(journal: Journal, sizes: list[int]) -> None:
    for i, size in enumerate(sizes):
        journal.append(RecordKind.WRITE, 3, i * 8, bytes([i % 251]) * size, epoch=1)


def test_read_raw_returns_the_stored_bytes_of_whole_records(tmp_path: Path) -> None:
    sizes = [512 * (1 + (i * 7) % 9) for i in range(60)]
    with Journal.open(tmp_path, group_id=7, size_limit=64 << 20, segment_size=64 << 10) as j:
        _fill(j, sizes)
        j.append(RecordKind.ZERO, 3, 0, b"", epoch=1, length=4096)
        last = j.durable_seq
        for max_bytes in (1, 600, 5000, 20000, 1 << 20):
            seq = 1
            while seq <= last:
                count, data = j.read_raw(seq, max_bytes)
                records = list(iter_records(data))  # every CRC verifies
                assert [r.seq for r in records] == list(range(seq, seq + count))
                expected = list(j.read_from(seq, count))
                assert [r.encode() for r in records] == [r.encode() for r in expected]
                assert count == 1 or len(data) <= max_bytes  # at least one whole record
                seq += count
        assert j.read_raw(last + 1, 1 << 20) == (0, b"")
        j.trim(last)
        with pytest.raises(SequenceTrimmed):
            j.read_raw(1, 1 << 20)


def test_the_pre_encoded_batch_is_the_generated_encoding() -> None:
    for epoch, first, count, records in [
        (1, 5, 3, b"abc" * 100),
        (0, 0, 0, b""),
        (300, 1 << 40, 70000, bytes(300000)),
        ((1 << 64) - 1, (1 << 64) - 1, (1 << 32) - 1, b"x"),
    ]:
        message = replication_pb2.ShipRequest(
            batch=replication_pb2.RecordBatch(
                epoch=epoch, first_seq=first, count=count, records=records
            )
        )
        encoded = wire.encode_batch_request(epoch, first, count, records)
        assert encoded == message.SerializeToString()
        assert wire.serialize_ship_request(encoded) is encoded
        assert wire.serialize_ship_request(message) == encoded


def _shipped(tmp_path: Path, count: int) -> bytes:
    with Journal.open(tmp_path / "peer", group_id=9, size_limit=64 << 20) as peer:
        _fill(peer, [4096] * count)
        n, data = peer.read_raw(1, 1 << 30)
        assert n == count
        return data


def test_check_shipped_refuses_a_bad_batch_whole(tmp_path: Path) -> None:
    data = _shipped(tmp_path, 4)
    with Journal.open(tmp_path / "j", group_id=1, size_limit=64 << 20) as j:
        damaged = bytearray(data)
        damaged[HEADER_SIZE * 3 + 4096 * 2 + 100] ^= 1  # a payload byte of the third record
        with pytest.raises(JournalCorrupt, match="CRC32C mismatch"):
            j.append_shipped(bytes(damaged), first_seq=1, count=4, volume_map={3: 5})
        with pytest.raises(InvalidArgument, match="claims 5 records"):
            j.append_shipped(data, first_seq=1, count=5, volume_map={3: 5})
        with pytest.raises(InvalidArgument, match="from seq 1"):
            j.append_shipped(data, first_seq=2, count=4, volume_map={3: 5})
        with pytest.raises(InvalidArgument, match="maps to no volume"):
            j.append_shipped(data, first_seq=1, count=4, volume_map={4: 5})
        with pytest.raises(JournalCorrupt):
            j.append_shipped(data[:-7], first_seq=1, count=4, volume_map={3: 5})
        assert j.next_seq == 1 and j.durable_seq == 0  # nothing stored
        before = j.fsync_count
        assert j.append_shipped(data, first_seq=1, count=4, volume_map={3: 5}) == 4
        assert j.fsync_count - before == 1
        stored = list(j.read_from(1))  # restamped under our ids, CRCs verify
        assert {(r.group_id, r.volume_id) for r in stored} == {(1, 5)}
        assert [bytes(r.data) for r in stored] == [bytes([i]) * 4096 for i in range(4)]
        with pytest.raises(SequenceGap):
            j.append_shipped(data, first_seq=1, count=4, volume_map={3: 5})


def test_a_tailer_waiting_for_a_batch_is_woken_once_it_is_there(tmp_path: Path) -> None:
    with Journal.open(tmp_path, group_id=7, size_limit=64 << 20) as j:
        wakes: list[int] = []
        original = j._state_cond.notify_all

        def counting() -> None:
            wakes.append(j.durable_seq)
            original()

        j._state_cond.notify_all = counting  # type: ignore[method-assign]
        result: list[int] = []
        waiter = threading.Thread(target=lambda: result.append(j.wait_durable_beyond(9, 10)))
        waiter.start()
        time.sleep(0.05)
        _fill(j, [512] * 9)
        assert not result and not wakes  # nine commits, none past seq 9: no wake-up
        _fill(j, [512])
        waiter.join(5)
        assert result == [10] and wakes == [10]


def test_the_secondary_applies_what_it_received_in_order(tmp_path: Path) -> None:
    a, b = two_sites(tmp_path)
    try:
        make_group(a, "g", ["v1"])
        a.manager.create_pair("g", "site-b", PairMode.ASYNC)
        for i in range(300):  # overlapping writes: only the seq order gives the same image
            a.engine.write("v1", (i % 7) * 8, bytes([i % 251]) * (BS * 8))
        converged(a, b, "g")
        assert b.engine.read("v1", 0, 64) == a.engine.read("v1", 0, 64)
        store = b.engine.group("g")
        assert store.applied_seq == a.engine.group("g").journal.durable_seq
    finally:
        a.close()
        b.close()
