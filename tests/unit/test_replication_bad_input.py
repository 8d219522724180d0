"""Bad input at the replication server: each refusal is a precise gRPC status with a message,
and nothing is stored or applied."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from targetd_repl.errors import FailedPrecondition
from targetd_repl.model import PairMode, PairState, RecordKind, Role
from targetd_repl.replication import wire
from targetd_repl.storage.journal_record import encode_record
from targetd_repl.v1 import replication_pb2, replication_pb2_grpc
from tests.unit.test_replication_support import (
    BS,
    SIZE,
    Site,
    converged,
    make_group,
    two_sites,
)


@pytest.fixture
def paired(tmp_path: Path) -> Iterator[tuple[Site, Site]]:
    a, b = two_sites(tmp_path)
    make_group(a, "g", ["v1"])
    a.manager.create_pair("g", "site-b", PairMode.ASYNC)
    a.engine.write("v1", 0, b"a" * BS)
    converged(a, b, "g")
    a.manager.suspend("g")  # the primary stops shipping: the test drives the stream itself
    a.manager.wait_for("g", lambda s: s.state is PairState.SUSPENDED)
    yield a, b
    a.close()
    b.close()


def _stub(site: Site) -> tuple[grpc.Channel, replication_pb2_grpc.ReplicationStub]:
    channel = grpc.insecure_channel(site.address)
    return channel, replication_pb2_grpc.ReplicationStub(channel)


def _open(a: Site, b: Site, **overrides: object) -> replication_pb2.ShipRequest:
    store = a.engine.group("g")
    fields: dict[str, object] = {
        "group": "g",
        "site": "site-a",
        "epoch": store.info.epoch,
        "start_seq": b.engine.group("g").journal.next_seq,
        "resync": False,
        "volumes": [wire.volume_to_proto(store.volume(v).info) for v in store.volume_ids()],
    }
    fields.update(overrides)
    return replication_pb2.ShipRequest(open=replication_pb2.ShipOpen(**fields))  # type: ignore[arg-type]


def _record(a: Site, seq: int, data: bytes = b"z" * BS) -> bytes:
    store = a.engine.group("g")
    return encode_record(
        kind=RecordKind.WRITE,
        group_id=store.info.id,
        seq=seq,
        epoch=store.info.epoch,
        volume_id=store.volume_ids()[0],
        lba=8,
        timestamp_ns=time.time_ns(),
        commit_floor=seq - 1,
        data=data,
    )


def _ship(b: Site, messages: list[replication_pb2.ShipRequest]) -> grpc.RpcError:
    channel, stub = _stub(b)
    try:
        with pytest.raises(grpc.RpcError) as caught:
            for _ in stub.Ship(iter(messages), timeout=5):
                pass
        return caught.value
    finally:
        channel.close()


def _batch(
    a: Site, first: int, payload: bytes, count: int = 1, epoch: int | None = None
) -> replication_pb2.ShipRequest:
    return replication_pb2.ShipRequest(
        batch=replication_pb2.RecordBatch(
            epoch=a.engine.group("g").info.epoch if epoch is None else epoch,
            first_seq=first,
            count=count,
            records=payload,
        )
    )


def _unchanged(b: Site, before: tuple[int, int, bytes]) -> None:
    store = b.engine.group("g")
    assert (store.journal.next_seq, store.applied_seq, b.engine.read("v1", 0, SIZE // BS)) == before


def _state(b: Site) -> tuple[int, int, bytes]:
    store = b.engine.group("g")
    return store.journal.next_seq, store.applied_seq, b.engine.read("v1", 0, SIZE // BS)


def test_bad_checksum_is_data_loss_and_nothing_is_stored(paired: tuple[Site, Site]) -> None:
    a, b = paired
    before = _state(b)
    seq = before[0]
    good = _record(a, seq)
    bad = bytearray(_record(a, seq + 1))
    bad[100] ^= 0xFF  # a payload byte flipped on the wire
    error = _ship(b, [_open(a, b), _batch(a, seq, good + bytes(bad), count=2)])
    assert error.code() is grpc.StatusCode.DATA_LOSS
    assert "CRC32C mismatch" in (error.details() or "")
    _unchanged(b, before)  # not even the good first record of the batch


def test_out_of_order_batch_is_out_of_range(paired: tuple[Site, Site]) -> None:
    a, b = paired
    before = _state(b)
    seq = before[0] + 3
    error = _ship(b, [_open(a, b), _batch(a, seq, _record(a, seq))])
    assert error.code() is grpc.StatusCode.OUT_OF_RANGE
    assert f"expected seq {before[0]}" in (error.details() or "")
    _unchanged(b, before)


def test_stream_not_starting_at_the_next_seq_is_out_of_range(paired: tuple[Site, Site]) -> None:
    a, b = paired
    before = _state(b)
    error = _ship(b, [_open(a, b, start_seq=before[0] + 10)])
    assert error.code() is grpc.StatusCode.OUT_OF_RANGE
    _unchanged(b, before)


def test_stale_epoch_is_failed_precondition(paired: tuple[Site, Site]) -> None:
    a, b = paired
    before = _state(b)
    assert b.engine.group("g").info.epoch == 1  # adopted from the primary
    error = _ship(b, [_open(a, b, epoch=0)])
    assert error.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "stale epoch" in (error.details() or "")
    seq = before[0]
    error = _ship(b, [_open(a, b), _batch(a, seq, _record(a, seq), epoch=0)])
    assert error.code() is grpc.StatusCode.FAILED_PRECONDITION
    _unchanged(b, before)


def test_malformed_stream_is_invalid_argument(paired: tuple[Site, Site]) -> None:
    a, b = paired
    before = _state(b)
    seq = before[0]
    error = _ship(b, [_batch(a, seq, _record(a, seq))])  # no `open` first
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    error = _ship(b, [_open(a, b), _batch(a, seq, _record(a, seq), count=2)])  # count lies
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    error = _ship(b, [_open(a, b), _batch(a, seq, _record(a, seq)[:-7])])  # truncated
    assert error.code() is grpc.StatusCode.DATA_LOSS
    _unchanged(b, before)


def test_unknown_group_is_not_found(paired: tuple[Site, Site]) -> None:
    a, b = paired
    error = _ship(b, [_open(a, b, group="nope")])
    assert error.code() is grpc.StatusCode.NOT_FOUND
    assert "'nope'" in (error.details() or "")
    channel, stub = _stub(b)
    try:
        view = replication_pb2.HandshakeView(site="site-a", group="nope", journal_first_seq=1)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Handshake(replication_pb2.HandshakeRequest(view=view), timeout=5)
        assert caught.value.code() is grpc.StatusCode.NOT_FOUND
    finally:
        channel.close()


def test_wrong_sender_site_is_refused(paired: tuple[Site, Site]) -> None:
    a, b = paired
    error = _ship(b, [_open(a, b, site="site-c")])
    assert error.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "site-c" in (error.details() or "")


def test_peer_volume_of_another_size_is_refused_naming_it(tmp_path: Path) -> None:
    a, b = two_sites(tmp_path)
    try:
        make_group(a, "g", ["v1", "v2"])
        b.engine.create_group("g", role=Role.SECONDARY)
        b.engine.create_volume("v2", SIZE * 2, group="g")
        with pytest.raises(FailedPrecondition, match="'v2'"):
            a.manager.create_pair("g", "site-b", PairMode.ASYNC)
        assert not a.engine.metadata.list_pairs() and not b.engine.metadata.list_pairs()
        assert [v.name for v in b.engine.list_volumes()] == ["v2"]  # nothing created
    finally:
        a.close()
        b.close()
