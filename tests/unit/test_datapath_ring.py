"""Unit tests of the TCMU ring (targetd_repl/datapath/ring.py) against hand-built and
fake-kernel rings: layout, parsing, PAD wrap-around, out-of-order completion, short data-in,
malformed entries, and a restart on the same map."""

from __future__ import annotations

import ctypes
import struct

import pytest

from targetd_repl.datapath import ring as r
from targetd_repl.datapath.fake_kernel import STALE, FakeKernel, RingBroken, cdb_rw
from targetd_repl.datapath.ring import Command, Ring, RingError
from targetd_repl.datapath.sense import CHECK_CONDITION, GOOD

# --- the C layout, independently: ctypes applies the same rules as the compiler -------------------


class _Hdr(ctypes.Structure):
    _pack_ = 1
    _fields_ = (
        ("len_op", ctypes.c_uint32),
        ("cmd_id", ctypes.c_uint16),
        ("kflags", ctypes.c_uint8),
        ("uflags", ctypes.c_uint8),
    )


class _Req(ctypes.Structure):  # not packed in target_core_user.h
    _fields_ = (
        ("iov_cnt", ctypes.c_uint32),
        ("iov_bidi_cnt", ctypes.c_uint32),
        ("iov_dif_cnt", ctypes.c_uint32),
        ("cdb_off", ctypes.c_uint64),
        ("pad1", ctypes.c_uint64),
        ("pad2", ctypes.c_uint64),
    )


class _Rsp(ctypes.Structure):
    _fields_ = (
        ("scsi_status", ctypes.c_uint8),
        ("pad1", ctypes.c_uint8),
        ("pad2", ctypes.c_uint16),
        ("read_len", ctypes.c_uint32),
        ("sense_buffer", ctypes.c_char * 96),
    )


class _U(ctypes.Union):
    _fields_ = (("req", _Req), ("rsp", _Rsp))


class _Entry(ctypes.Structure):  # struct tcmu_cmd_entry { hdr; union {req; rsp}; } __packed
    _pack_ = 1
    _fields_ = (("hdr", _Hdr), ("u", _U))


def test_entry_layout_matches_the_c_structs() -> None:
    u = _Entry.u.offset
    assert u == 8
    assert _Hdr.cmd_id.offset == r.HDR_CMD_ID
    assert _Hdr.uflags.offset == r.HDR_UFLAGS
    assert u + _Req.iov_cnt.offset == r.REQ_IOV_CNT
    assert u + _Req.iov_bidi_cnt.offset == r.REQ_IOV_BIDI_CNT
    assert u + _Req.iov_dif_cnt.offset == r.REQ_IOV_DIF_CNT
    assert r.REQ_CDB_OFF == u + _Req.cdb_off.offset == 24  # LAB-NOTES: 24, not 20
    assert r.REQ_IOV == u + ctypes.sizeof(_Req) == 48
    assert u + _Rsp.scsi_status.offset == r.RSP_SCSI_STATUS
    assert r.RSP_READ_LEN == u + _Rsp.read_len.offset == 12
    assert r.RSP_SENSE == u + _Rsp.sense_buffer.offset == 16
    assert (r.MB_CMD_HEAD, r.MB_CMD_TAIL, r.MAILBOX_SIZE) == (12, 64, 128)


# --- a ring built by hand, byte by byte -----------------------------------------------------------

MAP = 8192
CMDR_OFF = 128
CMDR_SIZE = 1024
DATA_OFF = CMDR_OFF + CMDR_SIZE


def _hand_built(
    cdb: bytes, iovecs: list[tuple[int, int]], *, at: int = 0, cmd_id: int = 7
) -> bytearray:
    buf = bytearray(MAP)
    struct.pack_into("<HHIII", buf, 0, 2, 1, CMDR_OFF, CMDR_SIZE, 0)  # head filled below
    entry = CMDR_OFF + at
    base_size = max(48 + 16 * len(iovecs), 112)  # the kernel's tcmu_cmd_get_base_cmd_size
    size = base_size + ((len(cdb) + 7) & ~7)
    struct.pack_into("<IHBB", buf, entry, size | 1, cmd_id, 0, 0)
    cdb_off = entry + base_size
    struct.pack_into("<III", buf, entry + 8, len(iovecs), 0, 0)
    struct.pack_into("<Q", buf, entry + 24, cdb_off)
    for i, (base, length) in enumerate(iovecs):
        struct.pack_into("<QQ", buf, entry + 48 + 16 * i, base, length)
    buf[cdb_off : cdb_off + len(cdb)] = cdb
    struct.pack_into("<I", buf, 64, at)  # tail
    struct.pack_into("<I", buf, 12, (at + size) % CMDR_SIZE)  # head
    return buf


def test_parse_and_complete_a_hand_built_entry() -> None:
    cdb = cdb_rw(0x28, 5, 2)
    buf = _hand_built(cdb, [(DATA_OFF, 512), (DATA_OFF + 2048, 512)], at=64)
    buf[DATA_OFF : DATA_OFF + 4] = b"abcd"
    ring = Ring(buf)
    assert (ring.cmdr_off, ring.cmdr_size, ring.data_off, ring.ooo_capable) == (
        CMDR_OFF,
        CMDR_SIZE,
        DATA_OFF,
        True,
    )
    commands, moved = ring.poll()
    assert not moved
    [cmd] = commands
    assert cmd.cmd_id == 7 and cmd.offset == 64 and cmd.length == 128
    assert bytes(cmd.cdb) == cdb
    assert [len(v) for v in cmd.iovecs] == [512, 512] and cmd.data_length == 1024
    assert bytes(cmd.iovecs[0][:4]) == b"abcd"
    cmd.iovecs[1][:2] = b"zz"  # zero copy: the view writes the map
    assert buf[DATA_OFF + 2048 : DATA_OFF + 2050] == b"zz"

    sense = bytes([0x70, 0, 5]) + bytes(15)
    assert ring.complete(cmd, CHECK_CONDITION, sense)
    entry = CMDR_OFF + 64
    assert buf[entry + 8] == CHECK_CONDITION
    assert buf[entry + 16 : entry + 16 + 18] == sense
    assert buf[entry + 16 + 18 : entry + 16 + 96] == bytes(96 - 18)
    assert struct.unpack_from("<IH", buf, entry) == (128 | 1, 7)  # len_op and cmd_id kept
    assert buf[entry + 112 : entry + 122] == cdb  # the response stops short of the CDB
    assert struct.unpack_from("<I", buf, 64)[0] == 192 == ring.tail == ring.head
    with pytest.raises(ValueError):
        cmd.cdb[0]  # views are released once the response is written


def test_short_data_in_zeroes_the_rest_and_sets_read_len() -> None:
    buf = _hand_built(cdb_rw(0x28, 0, 8), [(DATA_OFF, 4096)])
    buf[DATA_OFF : DATA_OFF + 4096] = bytes([STALE]) * 4096
    ring = Ring(buf)
    [cmd], _ = ring.poll()
    cmd.iovecs[0][:100] = b"x" * 100
    ring.complete(cmd, GOOD, read_len=100)
    assert buf[CMDR_OFF + 7] == r.UFLAG_READ_LEN
    assert struct.unpack_from("<I", buf, CMDR_OFF + 12)[0] == 100
    assert buf[DATA_OFF : DATA_OFF + 100] == b"x" * 100
    assert buf[DATA_OFF + 100 : DATA_OFF + 4096] == bytes(3996)


def test_full_data_in_sets_no_read_len() -> None:
    buf = _hand_built(cdb_rw(0x28, 0, 8), [(DATA_OFF, 4096)])
    ring = Ring(buf)
    [cmd], _ = ring.poll()
    ring.complete(cmd, GOOD, read_len=4096)
    assert buf[CMDR_OFF + 7] == 0


@pytest.mark.parametrize(
    ("field", "value"),
    [(0, 1), (4, 32), (8, 16), (8, 1 << 20)],  # version, cmdr_off, cmdr_size too small / large
)
def test_bad_mailbox_is_refused(field: int, value: int) -> None:
    buf = _hand_built(b"\0" * 6, [])
    struct.pack_into("<H" if field == 0 else "<I", buf, field, value)
    with pytest.raises(RingError):
        Ring(buf)


def test_entry_crossing_the_end_is_corruption() -> None:
    buf = _hand_built(b"\0" * 6, [])
    struct.pack_into("<I", buf, CMDR_OFF, 4096 | 1)
    ring = Ring(buf)
    with pytest.raises(RingError):
        ring.poll()


def test_command_entry_too_short_for_a_response_is_corruption() -> None:
    buf = _hand_built(b"\0" * 6, [])
    struct.pack_into("<I", buf, CMDR_OFF, 64 | 1)
    struct.pack_into("<I", buf, 12, 64)
    with pytest.raises(RingError):
        Ring(buf).poll()


def test_iovec_outside_the_data_area_is_answered_with_hardware_error() -> None:
    buf = _hand_built(cdb_rw(0x28, 0, 1), [(CMDR_OFF, 512)])  # points into the command ring
    ring = Ring(buf)
    commands, moved = ring.poll()
    assert commands == [] and moved  # answered and retired at once
    assert buf[CMDR_OFF + 8] == CHECK_CONDITION
    assert buf[CMDR_OFF + 16 + 2] == 0x04 and buf[CMDR_OFF + 16 + 12] == 0x44


def test_readonly_buffer_is_refused() -> None:
    with pytest.raises(RingError):
        Ring(memoryview(bytes(_hand_built(b"\0" * 6, []))))


# --- against the fake kernel ----------------------------------------------------------------------


@pytest.fixture
def kernel() -> FakeKernel:
    return FakeKernel(ring_area=128 + 1000, data_size=256 * 1024, fragment=True, seed=3)


def _ids(done: list[Command]) -> list[int]:
    return [c.cmd_id for c in done]


def test_pad_entries_at_wrap_around_are_skipped(kernel: FakeKernel) -> None:
    ring = Ring(kernel.buffer)
    seen = 0
    for round_ in range(40):
        ids = [kernel.submit(cdb_rw(0x28, i, 1), data_in=512) for i in range(3)]
        commands, _ = ring.poll()
        assert _ids(commands) == ids
        for cmd in commands:
            cmd.iovecs[0][:4] = struct.pack(">I", round_)
            ring.complete(cmd, GOOD, read_len=512)
        got = kernel.reap()
        assert [c.cmd_id for c in got] == ids
        assert all(c.data is not None and c.data[:4] == struct.pack(">I", round_) for c in got)
        seen += len(got)
    assert kernel.pads > 3 and seen == 120
    assert ring.tail == ring.head == kernel.head


def test_out_of_order_completion_advances_only_over_a_completed_prefix(
    kernel: FakeKernel,
) -> None:
    ring = Ring(kernel.buffer)
    ids = [kernel.submit(cdb_rw(0x28, i, 1), data_in=512) for i in range(4)]
    commands, _ = ring.poll()
    first, second, third, fourth = commands
    tail0 = ring.tail
    assert not ring.complete(third, GOOD, read_len=512)
    assert not ring.complete(second, GOOD, read_len=512)
    assert ring.tail == tail0 and kernel.reap() == []
    assert ring.complete(first, GOOD, read_len=512)  # prefix 1, 2, 3 done
    assert [c.cmd_id for c in kernel.reap()] == ids[:3]
    assert ring.tail == fourth.offset
    assert ring.complete(fourth, GOOD, read_len=512)
    assert [c.cmd_id for c in kernel.reap()] == ids[3:]
    assert ring.in_flight == 0
    with pytest.raises(RuntimeError):
        ring.complete(fourth, GOOD)


def test_unknown_and_tmr_entries_are_skipped(kernel: FakeKernel) -> None:
    ring = Ring(kernel.buffer)
    a = kernel.submit(cdb_rw(0x00, 0, 0))
    unknown_at = kernel.submit_raw(5, 64)
    kernel.submit_raw(r.OP_TMR, 64)
    b = kernel.submit(cdb_rw(0x00, 0, 0))
    commands, _ = ring.poll()
    assert _ids(commands) == [a, b]
    for cmd in commands:
        ring.complete(cmd, GOOD)
    assert [c.cmd_id for c in kernel.reap()] == [a, b]
    assert kernel.buffer[kernel.cmdr_off + unknown_at + 7] & r.UFLAG_UNKNOWN_OP
    assert ring.tail == ring.head


def test_restart_serves_what_the_dead_ring_left_exactly_once(kernel: FakeKernel) -> None:
    ring_a = Ring(kernel.buffer)
    ids = [kernel.submit(cdb_rw(0x28, i, 1), data_in=512) for i in range(5)]
    commands, _ = ring_a.poll()
    ring_a.complete(commands[0], GOOD, read_len=512)  # retired: the kernel sees it
    ring_a.complete(commands[2], GOOD, read_len=512)  # done, held behind commands[1]
    ring_a.complete(commands[3], GOOD, read_len=512)
    assert [c.cmd_id for c in kernel.reap()] == ids[:1]
    ring_a.close()  # the process dies: held responses are never written

    ring_b = Ring(kernel.buffer)
    again, _ = ring_b.poll()
    assert _ids(again) == ids[1:]  # requests intact behind cmd_tail, nothing doubled
    assert [bytes(c.cdb) for c in again] == [cdb_rw(0x28, i, 1) for i in range(1, 5)]
    for cmd in reversed(again):
        ring_b.complete(cmd, GOOD, read_len=512)
    assert [c.cmd_id for c in kernel.reap()] == ids[1:]
    assert not ring_a.complete(commands[1], GOOD)  # the dead ring's late completion: dropped
    assert kernel.reap() == [] and kernel.outstanding == 0
    assert sorted(kernel.completed_ids) == sorted(ids)


def test_fake_kernel_flags_a_double_completion(kernel: FakeKernel) -> None:
    ring = Ring(kernel.buffer)
    kernel.submit(cdb_rw(0x00, 0, 0))
    [cmd], _ = ring.poll()
    ring.complete(cmd, GOOD)
    kernel.reap()
    # Rewind our tail by hand: the kernel would find the cmd_id unknown and break the ring.
    struct.pack_into("@I", kernel.buffer, r.MB_CMD_TAIL, 0)
    struct.pack_into("@I", kernel.buffer, r.MB_CMD_TAIL, cmd.length)
    kernel._last_cleaned = 0
    with pytest.raises(RingBroken):
        kernel.reap()
