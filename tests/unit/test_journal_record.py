"""The journal record codec: round trips, the CRC layout, and precise rejection of bad bytes."""

from __future__ import annotations

import struct

import crc32c
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from targetd_repl.errors import InvalidArgument, JournalCorrupt
from targetd_repl.model import RecordKind
from targetd_repl.storage.journal_record import (
    HEADER,
    HEADER_SIZE,
    MAGIC,
    U32_MAX,
    U64_MAX,
    Record,
    decode_at,
    decode_record,
    encode_record,
    iter_records,
)

u32 = st.integers(0, U32_MAX)
u64 = st.integers(0, U64_MAX)


@st.composite
def records(draw: st.DrawFn) -> dict[str, object]:
    kind = draw(st.sampled_from(list(RecordKind)))
    data = draw(st.binary(max_size=600)) if kind is RecordKind.WRITE else b""
    seq = draw(st.integers(1, U64_MAX))
    return {
        "kind": kind,
        "group_id": draw(u32),
        "seq": seq,
        "epoch": draw(u64),
        "volume_id": draw(u32),
        "lba": draw(u64),
        "timestamp_ns": draw(u64),
        "commit_floor": draw(st.integers(0, seq - 1)),
        "data": data,
        "length": len(data) if kind is RecordKind.WRITE else draw(u32),
    }


@settings(max_examples=200)
@given(records())
def test_encode_decode_round_trip(fields: dict[str, object]) -> None:
    raw = encode_record(**fields)  # type: ignore[arg-type]
    record = decode_record(raw)
    for name, value in fields.items():
        assert getattr(record, name) == value
    assert record.encoded_size == len(raw)
    assert record.encode() == raw  # the shipped bytes are reproducible from the record
    assert record.data_crc() == crc32c.crc32c(fields["data"])  # type: ignore[arg-type]


@settings(max_examples=200)
@given(records(), st.data())
def test_any_flipped_bit_is_detected(fields: dict[str, object], data: st.DataObject) -> None:
    raw = bytearray(encode_record(**fields))  # type: ignore[arg-type]
    bit = data.draw(st.integers(0, len(raw) * 8 - 1))
    raw[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(JournalCorrupt):
        decode_record(bytes(raw))


def test_crc_covers_data_first_then_header() -> None:
    raw = encode_record(
        kind=RecordKind.WRITE,
        group_id=3,
        seq=10,
        epoch=2,
        volume_id=4,
        lba=8,
        timestamp_ns=123,
        commit_floor=9,
        data=b"hello world",
    )
    (stored,) = struct.unpack_from("<I", raw, 60)
    assert stored == crc32c.crc32c(raw[:60], crc32c.crc32c(raw[HEADER_SIZE:]))
    assert raw[:4] == MAGIC and len(raw) == HEADER_SIZE + 11


def _good(**overrides: object) -> bytes:
    fields: dict[str, object] = {
        "kind": RecordKind.WRITE,
        "group_id": 1,
        "seq": 5,
        "epoch": 1,
        "volume_id": 2,
        "lba": 0,
        "timestamp_ns": 1,
        "commit_floor": 4,
        "data": b"x" * 16,
    }
    fields.update(overrides)
    return encode_record(**fields)  # type: ignore[arg-type]


def _patch(raw: bytes, offset: int, fmt: str, value: object) -> bytes:
    """Change one header field and fix the CRC, so only the field check can object."""
    buf = bytearray(raw)
    struct.pack_into(fmt, buf, offset, value)
    crc = crc32c.crc32c(bytes(buf[:60]), crc32c.crc32c(bytes(buf[HEADER_SIZE:])))
    struct.pack_into("<I", buf, 60, crc)
    return bytes(buf)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda raw: raw[:40], "truncated record header at offset 0: 40 of 64 bytes"),
        (lambda raw: b"XXXX" + raw[4:], "bad magic b'XXXX'"),
        (lambda raw: _patch(raw, 4, "<H", 2), "unsupported format version 2"),
        (lambda raw: _patch(raw, 6, "<B", 9), "record seq 5 at offset 0: unknown kind 9"),
        (lambda raw: _patch(raw, 7, "<B", 1), "unknown flags 0x01"),
        (lambda raw: _patch(raw, 28, "<Q", 5), "commit_floor 5 is not below seq"),
        (lambda raw: raw[:-1], "truncated data, 15 of 16 bytes"),
        (lambda raw: raw[:-1] + b"y", "CRC32C mismatch"),
    ],
)
def test_rejections_name_the_check(mutate: object, message: str) -> None:
    with pytest.raises(JournalCorrupt, match=message.replace("(", r"\(")):
        decode_record(mutate(_good()))  # type: ignore[operator]


def test_decode_record_refuses_trailing_bytes_but_decode_at_allows_them() -> None:
    raw = _good()
    with pytest.raises(JournalCorrupt, match="4 unexpected bytes"):
        decode_record(raw + b"more")
    assert decode_at(raw + b"more").seq == 5


def test_zero_and_marker_carry_no_payload() -> None:
    raw = _good(kind=RecordKind.ZERO, data=b"", length=1 << 20)
    record = decode_record(raw)
    assert record.kind is RecordKind.ZERO and record.length == 1 << 20 and record.data == b""
    assert len(raw) == HEADER_SIZE
    with pytest.raises(InvalidArgument, match="ZERO record with length 8 needs 0 bytes"):
        _good(kind=RecordKind.ZERO, data=b"12345678", length=8)
    with pytest.raises(InvalidArgument, match="WRITE record with length 3 needs 3 bytes"):
        _good(data=b"ab", length=3)


@pytest.mark.parametrize(
    "overrides",
    [
        {"volume_id": U32_MAX + 1},
        {"lba": -1},
        {"epoch": U64_MAX + 1},
        {"commit_floor": 5},
        {"seq": 0, "commit_floor": 0},
        {"group_id": -1},
    ],
)
def test_encode_refuses_unrepresentable_fields(overrides: dict[str, object]) -> None:
    with pytest.raises(InvalidArgument):
        _good(**overrides)


def test_iter_records_decodes_a_shipped_batch() -> None:
    batch = b"".join(_good(seq=s, commit_floor=s - 1, data=bytes([s]) * s) for s in (1, 2, 3))
    assert [(r.seq, bytes(r.data)) for r in iter_records(batch)] == [
        (1, b"\x01"),
        (2, b"\x02\x02"),
        (3, b"\x03\x03\x03"),
    ]
    with pytest.raises(JournalCorrupt):
        list(iter_records(batch[:-1]))


def test_decoded_data_does_not_alias_mutable_buffers() -> None:
    buf = bytearray(_good())
    record = decode_record(buf)
    buf[HEADER_SIZE] ^= 0xFF
    assert bytes(record.data) == b"x" * 16
    assert hash(record) == hash(decode_record(_good()))


def test_data_crc_rejects_a_forged_record() -> None:
    record = decode_record(_good())
    forged = Record(
        record.kind,
        record.group_id,
        record.seq,
        record.epoch,
        record.volume_id,
        record.lba,
        record.length,
        record.timestamp_ns,
        b"y" * 16,
        record.commit_floor,
        record.crc,
    )
    with pytest.raises(JournalCorrupt, match="record seq 5 of group 1: CRC32C mismatch"):
        forged.data_crc()


def test_header_layout_is_64_bytes_little_endian() -> None:
    assert HEADER.size == 64
    raw = _good(group_id=0x01020304)
    assert raw[8:12] == bytes([4, 3, 2, 1])
