"""Unit tests of the SCSI emulation (targetd_repl/datapath/scsi.py and pages.py): every command
with valid and invalid input, sense key / ASC / ASCQ asserted, driven through
`ScsiDevice.execute` with scattered buffers (no ring)."""

from __future__ import annotations

import errno
import itertools
import struct
import threading
import time
from collections.abc import Sequence

import pytest

from targetd_repl.datapath.backend import Backend, VolumeIdentity
from targetd_repl.datapath.fake_kernel import (
    cdb_compare_and_write,
    cdb_inquiry,
    cdb_mode_sense,
    cdb_read_capacity_16,
    cdb_rw,
    cdb_unmap,
    unmap_parameters,
)
from targetd_repl.datapath.memory_backend import MemoryBackend
from targetd_repl.datapath.pages import ScsiConfig, naa_designator
from targetd_repl.datapath.scsi import Result, ScsiDevice
from targetd_repl.datapath.sense import Asc, SenseKey
from targetd_repl.errors import OutOfRange, WriteProtected

BS = 512
BLOCKS = 256

READ_6, READ_10, READ_12, READ_16 = 0x08, 0x28, 0xA8, 0x88
WRITE_6, WRITE_10, WRITE_12, WRITE_16 = 0x0A, 0x2A, 0xAA, 0x8A
WAV_10, WAV_16, VERIFY_10, VERIFY_16 = 0x2E, 0x8E, 0x2F, 0x8F
SYNC_10, SYNC_16, WS_10, WS_16 = 0x35, 0x91, 0x41, 0x93


class Spy:
    """A MemoryBackend that counts calls and can fail on demand."""

    def __init__(self, inner: MemoryBackend) -> None:
        self.inner = inner
        self.calls: list[tuple[str, int, int]] = []
        self.fail: BaseException | None = None
        self.slow = 0.0
        self.num_blocks_override: int | None = None

    @property
    def block_size(self) -> int:
        return self.inner.block_size

    @property
    def num_blocks(self) -> int:
        return self.num_blocks_override or self.inner.num_blocks

    @property
    def writable(self) -> bool:
        return self.inner.writable

    @property
    def identity(self) -> VolumeIdentity:
        return self.inner.identity

    def _maybe_fail(self) -> None:
        if self.fail is not None:
            raise self.fail

    def readinto(self, lba: int, buffers: Sequence[memoryview]) -> None:
        self.calls.append(("read", lba, sum(len(b) for b in buffers) // BS))
        self._maybe_fail()
        self.inner.readinto(lba, buffers)
        if self.slow:  # what was read may be stale by the time the caller uses it
            time.sleep(self.slow)

    def write(self, lba: int, buffers: Sequence[memoryview]) -> None:
        self.calls.append(("write", lba, sum(len(b) for b in buffers) // BS))
        self._maybe_fail()
        self.inner.write(lba, buffers)

    def write_zeros(self, lba: int, nblocks: int) -> None:
        self.calls.append(("zeros", lba, nblocks))
        self._maybe_fail()
        self.inner.write_zeros(lba, nblocks)

    def flush(self) -> None:
        self.calls.append(("flush", 0, 0))
        self._maybe_fail()

    def kinds(self) -> list[str]:
        return [c[0] for c in self.calls]


@pytest.fixture
def spy() -> Spy:
    return Spy(MemoryBackend("vol1", BLOCKS * BS, block_size=BS))


@pytest.fixture
def dev(spy: Spy) -> ScsiDevice:
    return ScsiDevice(spy)


def _split(buf: bytearray) -> list[memoryview]:
    """Uneven scatter/gather pieces, as the kernel's iovecs may be."""
    view = memoryview(buf)
    cuts = sorted({0, len(buf)} | {c for c in (7, 300, 1000, 4099) if c < len(buf)})
    return [view[a:b] for a, b in itertools.pairwise(cuts)]


def run(
    dev: ScsiDevice, cdb: bytes, *, data_out: bytes | None = None, data_in: int = 0
) -> tuple[Result, bytes]:
    buf = bytearray(data_out) if data_out is not None else bytearray(b"\xa5" * data_in)
    result = dev.execute(cdb, _split(buf) if buf else [])
    if data_out is None and result.data_in is not None:
        return result, bytes(buf[: result.data_in])
    return result, b""


def good(result: Result) -> None:
    assert result.status == 0, result.sense.hex()
    assert result.sense == b""


def check(
    result: Result, key: int, asc: int, *, field: int | None = None, in_cdb: bool = True
) -> bytes:
    sense = result.sense
    assert result.status == 2
    assert len(sense) >= 18 and sense[0] & 0x7F == 0x70 and sense[7] == 10
    assert (sense[2], (sense[12] << 8) | sense[13]) == (key, asc), sense.hex()
    if field is not None:
        assert sense[15] & 0x80, "SKSV"
        assert bool(sense[15] & 0x40) == in_cdb, "C/D"
        assert struct.unpack_from(">H", sense, 16)[0] == field
    return sense


def pattern(nblocks: int, seed: int = 1) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(nblocks * BS))


# --- no data, sense -------------------------------------------------------------------------------


def test_unknown_opcodes_are_invalid_command_operation_code(dev: ScsiDevice) -> None:
    for opcode in (0x04, 0x15, 0x1E, 0x37, 0x83, 0xA0, 0xC0, 0xFF):
        check(run(dev, bytes([opcode]) + bytes(15))[0], 5, Asc.INVALID_COMMAND_OPERATION_CODE)
    check(dev.execute(b""), 5, Asc.INVALID_COMMAND_OPERATION_CODE)


def test_test_unit_ready(dev: ScsiDevice) -> None:
    good(run(dev, bytes(6))[0])


def test_request_sense_reports_no_sense(dev: ScsiDevice) -> None:
    result, data = run(dev, bytes([0x03, 0, 0, 0, 252, 0]), data_in=252)
    good(result)
    assert data == bytes([0x70, 0, 0, 0, 0, 0, 0, 10]) + bytes(10)
    result, data = run(dev, bytes([0x03, 0, 0, 0, 8, 0]), data_in=252)
    assert result.data_in == 8 and data[:3] == b"\x70\x00\x00"
    result, data = run(dev, bytes([0x03, 1, 0, 0, 252, 0]), data_in=252)
    assert data == bytes([0x72]) + bytes(7)


# --- INQUIRY --------------------------------------------------------------------------------------


def test_standard_inquiry(dev: ScsiDevice) -> None:
    result, data = run(dev, cdb_inquiry(255), data_in=255)
    good(result)
    assert len(data) == 96 and data[4] == 91
    assert struct.unpack_from(">HHH", data, 58) == (0x00A0, 0x0460, 0x04C0)  # SAM-5 SPC-4 SBC-3
    assert data[0] == 0 and data[2] == 6 and data[3] & 0x0F == 2 and data[7] & 0x02
    assert data[8:16] == b"LIO-ORG " and data[16:32] == b"targetd-repl".ljust(16)
    result, data = run(dev, cdb_inquiry(5), data_in=5)
    assert result.data_in == 5 and data[4] == 91  # truncated, the length field is not


def test_inquiry_invalid_fields(dev: ScsiDevice) -> None:
    check(run(dev, cdb_inquiry(255, page=0x80), data_in=255)[0], 5, 0x2400, field=2)
    check(run(dev, cdb_inquiry(255, evpd=True, page=0x99), data_in=255)[0], 5, 0x2400, field=2)
    cmddt = bytearray(cdb_inquiry(255))
    cmddt[1] = 0x02
    sense = check(run(dev, bytes(cmddt), data_in=255)[0], 5, 0x2400, field=1)
    assert sense[15] & 0x08 and sense[15] & 0x07 == 1  # bit pointer


def vpd(dev: ScsiDevice, page: int) -> bytes:
    result, data = run(dev, cdb_inquiry(1024, evpd=True, page=page), data_in=1024)
    good(result)
    assert data[1] == page and struct.unpack_from(">H", data, 2)[0] == len(data) - 4
    return data


def test_vpd_supported_pages(dev: ScsiDevice) -> None:
    assert vpd(dev, 0x00)[4:] == bytes([0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2])


def test_vpd_unit_serial_is_the_volume_uuid(dev: ScsiDevice, spy: Spy) -> None:
    assert vpd(dev, 0x80)[4:].decode() == spy.identity.uuid


def _designators(page: bytes) -> list[tuple[int, int, bytes]]:
    out = []
    pos = 4
    while pos < len(page):
        code_set, dtype, _, length = page[pos : pos + 4]
        out.append((code_set & 0x0F, dtype & 0x0F, page[pos + 4 : pos + 4 + length]))
        pos += 4 + length
    return out


def test_vpd_device_identification_naa_is_stable_per_volume(dev: ScsiDevice, spy: Spy) -> None:
    designators = _designators(vpd(dev, 0x83))
    (cs1, t1, naa), (cs2, t2, t10) = designators
    assert (cs1, t1, len(naa)) == (1, 3, 16)  # binary, NAA
    assert naa[0] >> 4 == 6  # IEEE Registered Extended
    assert int.from_bytes(naa[:4], "big") >> 4 & 0xFFFFFF == 0x001405  # the OUI
    assert (cs2, t2) == (2, 1) and t10.startswith(b"LIO-ORG ")  # ASCII, T10 vendor ID
    # same uuid -> same NAA (a restart, or the other site); another volume -> another NAA
    twin = MemoryBackend("vol1-at-site-b", BS * 8, identity=spy.identity)
    assert _designators(vpd(ScsiDevice(twin), 0x83))[0][2] == naa
    other = MemoryBackend("vol2", BS * 8)
    assert naa_designator(other.identity) != naa


def test_vpd_block_limits(dev: ScsiDevice) -> None:
    page = vpd(dev, 0xB0)
    assert len(page) == 64
    cfg = ScsiConfig()
    assert page[4] & 0x01  # WSNZ
    assert page[5] == cfg.max_compare_and_write_blocks
    gran, max_xfer, opt_xfer = struct.unpack_from(">HII", page, 6)
    assert (gran, max_xfer, opt_xfer) == (8, cfg.max_transfer_bytes // BS, 2048)
    max_unmap, max_desc, unmap_gran, align = struct.unpack_from(">IIII", page, 20)
    assert (max_unmap, max_desc) == (cfg.max_unmap_bytes // BS, cfg.max_unmap_descriptors)
    assert unmap_gran == 8 and align == 0x80000000  # UGAVALID
    assert struct.unpack_from(">Q", page, 36)[0] == cfg.max_write_same_bytes // BS


def test_vpd_block_characteristics_non_rotating(dev: ScsiDevice) -> None:
    assert struct.unpack_from(">H", vpd(dev, 0xB1), 4)[0] == 1


def test_vpd_logical_block_provisioning(dev: ScsiDevice) -> None:
    page = vpd(dev, 0xB2)
    assert page[5] & 0xE0 == 0xE0  # LBPU, LBPWS, LBPWS10
    assert page[5] >> 2 & 0x07 == 1  # LBPRZ
    assert page[6] & 0x07 == 2  # thin


# --- READ CAPACITY --------------------------------------------------------------------------------


def test_read_capacity_10_and_16(dev: ScsiDevice, spy: Spy) -> None:
    result, data = run(dev, bytes([0x25]) + bytes(9), data_in=8)
    good(result)
    assert struct.unpack(">II", data) == (BLOCKS - 1, BS)
    result, data = run(dev, cdb_read_capacity_16(32), data_in=32)
    good(result)
    assert struct.unpack_from(">QI", data) == (BLOCKS - 1, BS)
    assert data[13] & 0x0F == 3 and data[14] & 0xC0 == 0xC0  # 4 KiB physical, LBPME, LBPRZ
    result, data = run(dev, cdb_read_capacity_16(12), data_in=32)
    assert result.data_in == 12
    spy.num_blocks_override = 1 << 33  # past what READ CAPACITY (10) can say
    _, data = run(dev, bytes([0x25]) + bytes(9), data_in=8)
    assert data[:4] == b"\xff\xff\xff\xff"
    _, data = run(dev, cdb_read_capacity_16(32), data_in=32)
    assert struct.unpack_from(">Q", data)[0] == (1 << 33) - 1


def test_other_service_actions_are_invalid_field(dev: ScsiDevice) -> None:
    cdb = bytearray(cdb_read_capacity_16())
    cdb[1] = 0x12  # GET LBA STATUS
    check(run(dev, bytes(cdb), data_in=32)[0], 5, 0x2400, field=1)


# --- MODE SENSE -----------------------------------------------------------------------------------


def _pages(body: bytes) -> dict[int, bytes]:
    out = {}
    while body:
        code, length = body[0] & 0x3F, body[1]
        out[code] = body[: 2 + length]
        body = body[2 + length :]
    return out


def test_mode_sense_6_all_pages_with_block_descriptor(dev: ScsiDevice) -> None:
    result, data = run(dev, cdb_mode_sense(0x3F, 255), data_in=255)
    good(result)
    assert data[0] == len(data) - 1 and data[2] == 0x10 and data[3] == 8  # DPOFUA, one desc
    blocks, bs = struct.unpack_from(">I", data, 4)[0], int.from_bytes(data[9:12], "big")
    assert (blocks, bs) == (BLOCKS, BS)
    pages = _pages(data[12:])
    assert sorted(pages) == [0x01, 0x08, 0x0A]
    assert pages[0x08][1] == 0x12 and pages[0x08][2] & 0x04 == 0  # caching: WCE 0
    assert pages[0x0A][1] == 0x0A and pages[0x0A][4] & 0x08 == 0  # control: SWP 0


def test_mode_sense_10_dbd_llbaa_and_single_pages(dev: ScsiDevice) -> None:
    result, data = run(dev, cdb_mode_sense(0x08, 255, ten=True, dbd=True), data_in=255)
    good(result)
    assert struct.unpack_from(">H", data)[0] == len(data) - 2 and data[6:8] == b"\0\0"
    assert list(_pages(data[8:])) == [0x08]
    result, data = run(dev, cdb_mode_sense(0x0A, 255, ten=True, llbaa=True), data_in=255)
    assert data[4] & 0x01 and struct.unpack_from(">H", data, 6)[0] == 16  # LONGLBA
    assert struct.unpack_from(">Q4xI", data, 8) == (BLOCKS, BS)
    assert list(_pages(data[24:])) == [0x0A]
    result, data = run(dev, cdb_mode_sense(0x3F, 255, subpage=0xFF), data_in=255)
    good(result)


def test_mode_sense_allocation_length_truncates(dev: ScsiDevice) -> None:
    _, full = run(dev, cdb_mode_sense(0x3F, 255), data_in=255)
    result, data = run(dev, cdb_mode_sense(0x3F, 10), data_in=255)
    assert result.data_in == 10 and data == full[:10] and data[0] == len(full) - 1
    result, data = run(dev, cdb_mode_sense(0x3F, 0), data_in=0)
    good(result)
    assert result.data_in == 0


def test_mode_sense_write_protect_follows_the_backend(dev: ScsiDevice, spy: Spy) -> None:
    spy.inner.writable = False
    _, six = run(dev, cdb_mode_sense(0x3F, 255), data_in=255)
    _, ten = run(dev, cdb_mode_sense(0x3F, 255, ten=True), data_in=255)
    assert six[2] & 0x80 and ten[3] & 0x80
    assert _pages(six[12:])[0x0A][4] & 0x08  # SWP in the control page too
    spy.inner.writable = True
    _, six = run(dev, cdb_mode_sense(0x3F, 255), data_in=255)
    assert not six[2] & 0x80


def test_mode_sense_changeable_and_saved_values(dev: ScsiDevice) -> None:
    result, data = run(dev, cdb_mode_sense(0x0A, 255, pc=1, dbd=True), data_in=255)
    good(result)
    assert data[4:] == bytes([0x0A, 0x0A]) + bytes(10)  # nothing changeable
    check(run(dev, cdb_mode_sense(0x08, 255, pc=3), data_in=255)[0], 5, 0x3900, field=2)


def test_mode_sense_unsupported_page_or_subpage(dev: ScsiDevice) -> None:
    check(run(dev, cdb_mode_sense(0x19, 255), data_in=255)[0], 5, 0x2400, field=2)
    check(run(dev, cdb_mode_sense(0x08, 255, subpage=5), data_in=255)[0], 5, 0x2400, field=3)


# --- READ / WRITE ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("write", "read"),
    [(WRITE_6, READ_6), (WRITE_10, READ_10), (WRITE_12, READ_12), (WRITE_16, READ_16)],
)
def test_write_then_read_each_cdb_size(dev: ScsiDevice, write: int, read: int) -> None:
    data = pattern(9, seed=write)
    good(run(dev, cdb_rw(write, 17, 9), data_out=data)[0])
    result, back = run(dev, cdb_rw(read, 17, 9), data_in=9 * BS)
    good(result)
    assert result.data_in == 9 * BS and back == data


def test_read_6_and_write_6_length_zero_mean_256(dev: ScsiDevice, spy: Spy) -> None:
    data = pattern(256)
    good(run(dev, cdb_rw(WRITE_6, 0, 0), data_out=data)[0])
    _result, back = run(dev, cdb_rw(READ_6, 0, 0), data_in=256 * BS)
    assert back == data and spy.calls[-1] == ("read", 0, 256)
    check(run(dev, cdb_rw(READ_6, 1, 0), data_in=256 * BS)[0], 5, Asc.LBA_OUT_OF_RANGE)


def test_transfer_length_zero_is_not_an_error(dev: ScsiDevice, spy: Spy) -> None:
    for opcode in (READ_10, READ_16, WRITE_10, WRITE_16):
        result, _ = run(dev, cdb_rw(opcode, BLOCKS, 0))
        good(result)
    check(run(dev, cdb_rw(READ_10, BLOCKS + 1, 0))[0], 5, Asc.LBA_OUT_OF_RANGE)
    assert spy.calls == []


@pytest.mark.parametrize("opcode", [READ_10, READ_16, WRITE_10, WRITE_16])
def test_out_of_range(dev: ScsiDevice, spy: Spy, opcode: int) -> None:
    kw = {"data_out": pattern(2)} if opcode in (WRITE_10, WRITE_16) else {"data_in": 2 * BS}
    check(run(dev, cdb_rw(opcode, BLOCKS - 1, 2), **kw)[0], 5, Asc.LBA_OUT_OF_RANGE)
    big = 0xFFFFFFFF if opcode in (READ_10, WRITE_10) else (1 << 64) - 1
    check(run(dev, cdb_rw(opcode, big, 2), **kw)[0], 5, Asc.LBA_OUT_OF_RANGE)
    assert spy.calls == []


def test_protection_fields_and_transfer_limit(dev: ScsiDevice) -> None:
    sense = check(run(dev, cdb_rw(READ_10, 0, 1, flags=0x20), data_in=BS)[0], 5, 0x2400, field=1)
    assert sense[15] & 0x07 == 7
    check(run(dev, cdb_rw(WRITE_16, 0, 1, flags=0x40), data_out=pattern(1))[0], 5, 0x2400)
    too_many = ScsiConfig().max_transfer_bytes // BS + 1
    small = ScsiDevice(MemoryBackend("big", (too_many + 1) * BS))
    check(run(small, cdb_rw(READ_16, 0, too_many), data_in=BS)[0], 5, 0x2400, field=10)
    limited = ScsiDevice(small.backend, ScsiConfig(max_transfer_bytes=1 << 20))
    check(run(limited, cdb_rw(READ_10, 0, 2049), data_in=BS)[0], 5, 0x2400, field=7)
    good(run(limited, cdb_rw(READ_10, 0, 2048), data_in=2048 * BS)[0])


def test_read_into_a_larger_buffer_reports_the_shorter_length(dev: ScsiDevice) -> None:
    good(run(dev, cdb_rw(WRITE_10, 3, 2), data_out=pattern(2))[0])
    result, data = run(dev, cdb_rw(READ_10, 3, 2), data_in=8 * BS)
    assert result.data_in == 2 * BS and data == pattern(2)


def test_read_into_a_smaller_buffer_sends_what_fits(dev: ScsiDevice) -> None:
    good(run(dev, cdb_rw(WRITE_10, 3, 4), data_out=pattern(4))[0])
    result, data = run(dev, cdb_rw(READ_10, 3, 4), data_in=2 * BS + 100)
    good(result)
    assert result.data_in == 2 * BS + 100 and data == pattern(4)[: 2 * BS + 100]


def test_write_data_length_must_match_the_cdb(dev: ScsiDevice, spy: Spy) -> None:
    check(run(dev, cdb_rw(WRITE_10, 0, 2), data_out=pattern(1))[0], 5, 0x0E03)
    check(run(dev, cdb_rw(WRITE_10, 0, 1), data_out=pattern(2))[0], 5, 0x0E03)
    assert spy.calls == []


def test_fua_write_flushes(dev: ScsiDevice, spy: Spy) -> None:
    good(run(dev, cdb_rw(WRITE_10, 0, 1, flags=0x08), data_out=pattern(1))[0])
    assert spy.kinds() == ["write", "flush"]
    good(run(dev, cdb_rw(WRITE_16, 0, 1), data_out=pattern(1))[0])
    assert spy.kinds() == ["write", "flush", "write"]


def test_writes_to_a_read_only_lun_are_data_protect(dev: ScsiDevice, spy: Spy) -> None:
    spy.inner.writable = False
    for cdb, data in [
        (cdb_rw(WRITE_6, 0, 1), pattern(1)),
        (cdb_rw(WRITE_10, 0, 1), pattern(1)),
        (cdb_rw(WRITE_12, 0, 1), pattern(1)),
        (cdb_rw(WRITE_16, 0, 1), pattern(1)),
        (cdb_rw(WAV_10, 0, 1), pattern(1)),
        (cdb_rw(WS_10, 0, 1), pattern(1)),
        (cdb_rw(WS_16, 0, 1, flags=0x08), pattern(1)),
        (cdb_unmap(24), unmap_parameters([(0, 1)])),
        (cdb_compare_and_write(0, 1), bytes(2 * BS)),
    ]:
        check(run(dev, cdb, data_out=data)[0], SenseKey.DATA_PROTECT, Asc.WRITE_PROTECTED)
    assert spy.calls == []
    good(run(dev, cdb_rw(READ_10, 0, 1), data_in=BS)[0])  # reads still work
    good(run(dev, cdb_rw(SYNC_10, 0, 0))[0])
    spy.inner.writable = True  # promotion: no reconfiguration
    good(run(dev, cdb_rw(WRITE_10, 0, 1), data_out=pattern(1))[0])


# --- WRITE AND VERIFY, VERIFY ---------------------------------------------------------------------


def test_write_and_verify(dev: ScsiDevice, spy: Spy) -> None:
    good(run(dev, cdb_rw(WAV_16, 5, 3, flags=0x02), data_out=pattern(3))[0])
    assert spy.kinds() == ["write", "read"]
    good(run(dev, cdb_rw(WAV_10, 5, 3), data_out=pattern(3, 9))[0])
    assert spy.kinds() == ["write", "read", "write"]
    assert bytes(spy.inner.image[5 * BS : 8 * BS]) == pattern(3, 9)


class _Lossy(Spy):
    def write(self, lba: int, buffers: Sequence[memoryview]) -> None:
        super().write(lba, buffers)
        self.inner.image[lba * BS + 700] ^= 0xFF  # the medium does not hold what we wrote


def test_write_and_verify_reports_miscompare() -> None:
    dev = ScsiDevice(_Lossy(MemoryBackend("v", BLOCKS * BS)))
    sense = check(run(dev, cdb_rw(WAV_10, 1, 2, flags=0x02), data_out=pattern(2))[0], 0xE, 0x1D00)
    assert sense[0] & 0x80 and struct.unpack_from(">I", sense, 3)[0] == 700


def test_verify_bytchk_0_checks_the_range(dev: ScsiDevice, spy: Spy) -> None:
    good(run(dev, cdb_rw(VERIFY_10, 0, BLOCKS))[0])
    check(run(dev, cdb_rw(VERIFY_16, BLOCKS - 1, 2))[0], 5, Asc.LBA_OUT_OF_RANGE)
    assert spy.calls == []


def test_verify_bytchk_1_compares(dev: ScsiDevice) -> None:
    good(run(dev, cdb_rw(WRITE_10, 10, 4), data_out=pattern(4))[0])
    good(run(dev, cdb_rw(VERIFY_16, 10, 4, flags=0x02), data_out=pattern(4))[0])
    wrong = bytearray(pattern(4))
    wrong[3 * BS + 17] ^= 1
    result, _ = run(dev, cdb_rw(VERIFY_10, 10, 4, flags=0x02), data_out=bytes(wrong))
    sense = check(result, SenseKey.MISCOMPARE, Asc.MISCOMPARE_DURING_VERIFY)
    assert sense[0] & 0x80 and struct.unpack_from(">I", sense, 3)[0] == 3 * BS + 17
    check(run(dev, cdb_rw(VERIFY_10, 10, 4, flags=0x02), data_out=pattern(3))[0], 5, 0x0E03)


def test_verify_bytchk_3_compares_one_block_with_each(dev: ScsiDevice) -> None:
    block = pattern(1, 5)
    good(run(dev, cdb_rw(WS_10, 20, 6), data_out=block)[0])
    good(run(dev, cdb_rw(VERIFY_10, 20, 6, flags=0x06), data_out=block)[0])
    result, _ = run(dev, cdb_rw(VERIFY_10, 20, 7, flags=0x06), data_out=block)
    sense = check(result, SenseKey.MISCOMPARE, Asc.MISCOMPARE_DURING_VERIFY)
    assert struct.unpack_from(">I", sense, 3)[0] == 6 * BS  # first byte of block 27
    check(run(dev, cdb_rw(VERIFY_10, 20, 6, flags=0x04), data_out=block)[0], 5, 0x2400, field=1)


# --- SYNCHRONIZE CACHE ----------------------------------------------------------------------------


def test_synchronize_cache(dev: ScsiDevice, spy: Spy) -> None:
    good(run(dev, cdb_rw(SYNC_10, 0, 0))[0])
    good(run(dev, cdb_rw(SYNC_16, 10, 20))[0])
    assert spy.kinds() == ["flush", "flush"]
    check(run(dev, cdb_rw(SYNC_10, BLOCKS + 1, 0))[0], 5, Asc.LBA_OUT_OF_RANGE)
    check(run(dev, cdb_rw(SYNC_16, 10, BLOCKS))[0], 5, Asc.LBA_OUT_OF_RANGE)


# --- UNMAP ----------------------------------------------------------------------------------------


def _fill(dev: ScsiDevice) -> None:
    good(run(dev, cdb_rw(WRITE_16, 0, BLOCKS), data_out=b"\x5a" * (BLOCKS * BS))[0])


def test_unmap_zeroes_every_descriptor(dev: ScsiDevice, spy: Spy) -> None:
    _fill(dev)
    spy.calls.clear()
    params = unmap_parameters([(4, 2), (100, 0), (200, 8)])
    good(run(dev, cdb_unmap(len(params)), data_out=params)[0])
    assert spy.calls == [("zeros", 4, 2), ("zeros", 200, 8)]
    image = spy.inner.image
    assert image[4 * BS : 6 * BS] == bytes(2 * BS) and image[6 * BS] == 0x5A
    assert image[200 * BS : 208 * BS] == bytes(8 * BS) and image[199 * BS] == 0x5A


def test_unmap_parameter_list_checks(dev: ScsiDevice, spy: Spy) -> None:
    good(run(dev, cdb_unmap(0))[0])
    check(run(dev, cdb_unmap(6), data_out=bytes(6))[0], 5, Asc.PARAMETER_LIST_LENGTH_ERROR)
    params = unmap_parameters([(0, 1)])
    check(run(dev, cdb_unmap(len(params)), data_out=params[:-4])[0], 5, 0x1A00)
    check(run(dev, cdb_unmap(len(params), anchor=True), data_out=params)[0], 5, 0x2400, field=1)
    too_many = unmap_parameters([(i, 1) for i in range(ScsiConfig().max_unmap_descriptors + 1)])
    check(run(dev, cdb_unmap(len(too_many)), data_out=too_many)[0], 5, 0x2600, in_cdb=False)
    huge = unmap_parameters([(0, 1), (0, ScsiConfig().max_unmap_bytes // BS + 1)])
    check(run(dev, cdb_unmap(len(huge)), data_out=huge)[0], 5, 0x2600, field=32, in_cdb=False)
    oor = unmap_parameters([(0, 1), (BLOCKS - 1, 2)])
    check(run(dev, cdb_unmap(len(oor)), data_out=oor)[0], 5, Asc.LBA_OUT_OF_RANGE)
    assert spy.calls == []  # every descriptor is checked before any is applied


def test_unmap_ignores_truncated_descriptors(dev: ScsiDevice, spy: Spy) -> None:
    params = unmap_parameters([(1, 1), (2, 1)], bddl=30)  # one whole descriptor and a piece
    good(run(dev, cdb_unmap(len(params)), data_out=params)[0])
    params = unmap_parameters([(5, 1), (6, 1)])
    good(run(dev, cdb_unmap(len(params) - 8), data_out=params)[0])  # list length cuts the second
    assert spy.calls == [("zeros", 1, 1), ("zeros", 5, 1)]


# --- WRITE SAME -----------------------------------------------------------------------------------


def test_write_same_pattern(dev: ScsiDevice, spy: Spy) -> None:
    block = pattern(1, 3)
    good(run(dev, cdb_rw(WS_10, 30, 40), data_out=block)[0])
    assert bytes(spy.inner.image[30 * BS : 70 * BS]) == block * 40
    assert spy.inner.image[29 * BS] == 0 and spy.inner.image[70 * BS] == 0
    big = Spy(MemoryBackend("big", 4096 * BS))
    good(run(ScsiDevice(big), cdb_rw(WS_16, 10, 3000), data_out=block)[0])
    assert bytes(big.inner.image[10 * BS : 3010 * BS]) == block * 3000
    assert big.calls == [("write", 10, 2048), ("write", 2058, 952)]  # 1 MiB pattern chunks


def test_write_same_of_zeros_unmap_and_ndob(dev: ScsiDevice, spy: Spy) -> None:
    _fill(dev)
    spy.calls.clear()
    good(run(dev, cdb_rw(WS_10, 0, 4), data_out=bytes(BS))[0])  # zeros without UNMAP
    good(run(dev, cdb_rw(WS_16, 8, 4, flags=0x08), data_out=bytes(BS))[0])  # UNMAP
    good(run(dev, cdb_rw(WS_16, 16, 4, flags=0x01))[0])  # NDOB
    assert spy.calls == [("zeros", 0, 4), ("zeros", 8, 4), ("zeros", 16, 4)]
    good(run(dev, cdb_rw(WS_16, 24, 2, flags=0x08), data_out=pattern(1))[0])  # UNMAP, data
    assert (
        spy.kinds()[-1] == "write" and bytes(spy.inner.image[24 * BS : 26 * BS]) == pattern(1) * 2
    )


def test_write_same_16_unmap_as_libiscsi_runs_it() -> None:
    """libiscsi's WriteSame16.Unmap on a 32 MiB LUN (512-byte blocks): WRITE(16) 65536 blocks of
    0xFF in ONE command, WRITE SAME(16) with UNMAP over them, READ(16) all 65536 back as zeros
    (LBPRZ). The test sends those 32 MiB commands whatever MAXIMUM TRANSFER LENGTH says, so the
    limit must cover them; with the old 8 MiB limit the WRITE and READ were INVALID FIELD IN CDB
    and the blocks "did not read back as zero"."""
    n = 65536
    lun = ScsiDevice(MemoryBackend("conf", n * BS))
    for i in (1, 255, 256):  # the test's loop, at the start and at the end of the LUN
        for lba in (0, n - i):
            good(run(lun, cdb_rw(WRITE_16, lba, i), data_out=b"\xff" * (i * BS))[0])
            good(run(lun, cdb_rw(WS_16, lba, i, flags=0x08), data_out=bytes(BS))[0])
            result, data = run(lun, cdb_rw(READ_16, lba, i), data_in=i * BS)
            good(result)
            assert data == bytes(i * BS)
    good(run(lun, cdb_rw(WRITE_16, 0, n), data_out=b"\xff" * (n * BS))[0])
    good(run(lun, cdb_rw(WS_16, 0, n, flags=0x08), data_out=bytes(BS))[0])
    result, data = run(lun, cdb_rw(READ_16, 0, n), data_in=n * BS)
    good(result)
    assert data == bytes(n * BS)
    assert struct.unpack_from(">I", vpd(lun, 0xB0), 8)[0] >= n  # MAXIMUM TRANSFER LENGTH
    # ANCHOR is refused with or without UNMAP (ANC_SUP 0 in VPD 0xB2)
    check(run(lun, cdb_rw(WS_16, 0, 1, flags=0x10), data_out=bytes(BS))[0], 5, 0x2400, field=1)
    check(run(lun, cdb_rw(WS_16, 0, 1, flags=0x18), data_out=bytes(BS))[0], 5, 0x2400, field=1)


def test_write_same_invalid(dev: ScsiDevice, spy: Spy) -> None:
    check(run(dev, cdb_rw(WS_10, 0, 0), data_out=pattern(1))[0], 5, 0x2400, field=7)  # WSNZ
    check(run(dev, cdb_rw(WS_16, 0, 0), data_out=pattern(1))[0], 5, 0x2400, field=10)
    limit = ScsiConfig(max_write_same_bytes=8 * BS)
    check(run(ScsiDevice(spy, limit), cdb_rw(WS_16, 0, 9), data_out=pattern(1))[0], 5, 0x2400)
    check(run(dev, cdb_rw(WS_16, 0, 1, flags=0x10), data_out=pattern(1))[0], 5, 0x2400, field=1)
    check(run(dev, cdb_rw(WS_10, 0, 1, flags=0x02), data_out=pattern(1))[0], 5, 0x2400, field=1)
    check(run(dev, cdb_rw(WS_10, BLOCKS - 1, 2), data_out=pattern(1))[0], 5, 0x2100)
    check(run(dev, cdb_rw(WS_10, 0, 2), data_out=pattern(1)[:100])[0], 5, 0x0E03)
    check(run(dev, cdb_rw(WS_16, 0, 2), data_out=pattern(2))[0], 5, 0x0E03)  # too much data-out
    assert spy.calls == []


# --- COMPARE AND WRITE ----------------------------------------------------------------------------


def test_compare_and_write_success(dev: ScsiDevice, spy: Spy) -> None:
    good(run(dev, cdb_rw(WRITE_10, 9, 1), data_out=pattern(1, 1))[0])
    good(run(dev, cdb_compare_and_write(9, 1), data_out=pattern(1, 1) + pattern(1, 2))[0])
    assert bytes(spy.inner.image[9 * BS : 10 * BS]) == pattern(1, 2)


def test_compare_and_write_miscompare_reports_the_offset(dev: ScsiDevice, spy: Spy) -> None:
    good(run(dev, cdb_rw(WRITE_10, 9, 1), data_out=pattern(1, 1))[0])
    expected = bytearray(pattern(1, 1))
    expected[321] ^= 0x40
    spy.calls.clear()
    result, _ = run(dev, cdb_compare_and_write(9, 1), data_out=bytes(expected) + pattern(1, 2))
    sense = check(result, SenseKey.MISCOMPARE, Asc.MISCOMPARE_DURING_VERIFY)
    assert sense[0] & 0x80 and struct.unpack_from(">I", sense, 3)[0] == 321
    assert spy.kinds() == ["read"]  # nothing written
    assert bytes(spy.inner.image[9 * BS : 10 * BS]) == pattern(1, 1)


def test_compare_and_write_multi_block_and_limits(spy: Spy) -> None:
    dev = ScsiDevice(spy, ScsiConfig(max_compare_and_write_blocks=4))
    good(run(dev, cdb_rw(WRITE_10, 0, 3), data_out=pattern(3))[0])
    expected = bytearray(pattern(3))
    expected[2 * BS + 5] ^= 1
    result, _ = run(dev, cdb_compare_and_write(0, 3), data_out=bytes(expected) + pattern(3, 8))
    assert struct.unpack_from(">I", result.sense, 3)[0] == 2 * BS + 5
    good(run(dev, cdb_compare_and_write(0, 3), data_out=pattern(3) + pattern(3, 8))[0])
    good(run(dev, cdb_compare_and_write(0, 0))[0])  # zero blocks: nothing, not an error
    # ... but zero blocks with data-out attached: the NUMBER OF LOGICAL BLOCKS field is wrong
    check(run(dev, cdb_compare_and_write(0, 0), data_out=bytes(2 * BS))[0], 5, 0x2400, field=13)
    check(run(dev, cdb_compare_and_write(0, 5), data_out=bytes(10 * BS))[0], 5, 0x2400, field=13)
    check(run(dev, cdb_compare_and_write(0, 2), data_out=bytes(2 * BS))[0], 5, 0x0E03)
    check(run(dev, cdb_compare_and_write(BLOCKS - 1, 2), data_out=bytes(4 * BS))[0], 5, 0x2100)


def test_compare_and_write_is_atomic_against_other_writers(spy: Spy) -> None:
    """Threads increment a counter block with read + COMPARE AND WRITE (how VMFS takes locks);
    a slow medium widens the window. Every successful ATS must count: no lost update."""
    spy.slow = 0.0005
    dev = ScsiDevice(spy)
    good(run(dev, cdb_rw(WRITE_10, 7, 1), data_out=bytes(BS))[0])
    successes = [0] * 4

    def worker(idx: int) -> None:
        while successes[idx] < 15:
            _, old = run(dev, cdb_rw(READ_10, 7, 1), data_in=BS)
            value = struct.unpack_from(">Q", old)[0]
            new = struct.pack(">Q", value + 1).ljust(BS, b"\0")
            result, _ = run(dev, cdb_compare_and_write(7, 1), data_out=old + new)
            if result.status == 0:
                successes[idx] += 1
            else:
                check(result, SenseKey.MISCOMPARE, Asc.MISCOMPARE_DURING_VERIFY)
            # plain writes to a neighbouring block must not disturb block 7
            good(run(dev, cdb_rw(WRITE_10, 8, 1), data_out=pattern(1, idx))[0])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    _, final = run(dev, cdb_rw(READ_10, 7, 1), data_in=BS)
    assert struct.unpack_from(">Q", final)[0] == sum(successes) == 60


class _AtomicCaw(Spy):
    def compare_and_write(
        self, lba: int, expected: Sequence[memoryview], new: Sequence[memoryview]
    ) -> int | None:
        self.calls.append(("caw", lba, 1))
        current = bytes(self.inner.image[lba * BS : (lba + 1) * BS])
        want = b"".join(expected)
        if current != want:
            return next(i for i in range(BS) if current[i] != want[i])
        self.inner.image[lba * BS : (lba + 1) * BS] = b"".join(new)
        return None


def test_compare_and_write_uses_the_backends_own_atomic_operation() -> None:
    spy = _AtomicCaw(MemoryBackend("v", BLOCKS * BS))
    dev = ScsiDevice(spy)
    good(run(dev, cdb_compare_and_write(3, 1), data_out=bytes(BS) + pattern(1))[0])
    result, _ = run(dev, cdb_compare_and_write(3, 1), data_out=bytes(BS) + pattern(1))
    sense = check(result, SenseKey.MISCOMPARE, Asc.MISCOMPARE_DURING_VERIFY)
    assert struct.unpack_from(">I", sense, 3)[0] == next(i for i, b in enumerate(pattern(1)) if b)
    assert spy.kinds() == ["caw", "caw"]
    assert bytes(spy.inner.image[3 * BS : 4 * BS]) == pattern(1)


# --- backend errors become sense in one place -----------------------------------------------------


@pytest.mark.parametrize(
    ("error", "opcode", "key", "asc"),
    [
        (OutOfRange("past the end"), READ_10, 5, 0x2100),
        (WriteProtected("demoted"), WRITE_10, 7, 0x2700),
        (OSError(errno.EIO, "EIO"), READ_10, 3, 0x1100),
        (OSError(errno.EIO, "EIO"), WRITE_10, 3, 0x0C00),
        (OSError(errno.ENOSPC, "ENOSPC"), WRITE_10, 7, 0x2707),
        (RuntimeError("bug"), READ_10, 4, 0x4400),
        (RuntimeError("bug"), SYNC_10, 4, 0x4400),
    ],
)
def test_backend_errors_map_to_sense(
    dev: ScsiDevice, spy: Spy, error: BaseException, opcode: int, key: int, asc: int
) -> None:
    spy.fail = error
    kw = {"data_out": pattern(1)} if opcode == WRITE_10 else {"data_in": BS}
    result, _ = run(dev, cdb_rw(opcode, 0, 1 if opcode != SYNC_10 else 0), **kw)
    check(result, key, asc)


def test_memory_backend_satisfies_the_protocol() -> None:
    assert isinstance(MemoryBackend("v", 4096), Backend)
    assert isinstance(Spy(MemoryBackend("v", 4096)), Backend)


# --- the per-command fast paths ---------------------------------------------------------------


def test_the_lun_size_is_read_again_when_a_command_reaches_past_it() -> None:
    """READ and WRITE check their range against the size last read from the backend, and read
    it again only when a command reaches past it: a grown LUN is seen on the next command."""
    inner = MemoryBackend("grows", 2 * BLOCKS * BS, block_size=BS)
    inner.num_blocks = BLOCKS
    dev = ScsiDevice(inner)
    good(run(dev, cdb_rw(READ_16, BLOCKS - 1, 1), data_in=BS)[0])
    check(run(dev, cdb_rw(READ_16, BLOCKS, 1), data_in=BS)[0], 5, Asc.LBA_OUT_OF_RANGE)
    inner.num_blocks = 2 * BLOCKS  # grown
    good(run(dev, cdb_rw(WRITE_10, 2 * BLOCKS - 2, 2), data_out=pattern(2))[0])
    result, data = run(dev, cdb_rw(READ_10, 2 * BLOCKS - 2, 2), data_in=2 * BS)
    good(result)
    assert data == pattern(2)
    check(run(dev, cdb_rw(READ_10, 2 * BLOCKS - 1, 2), data_in=2 * BS)[0], 5, 0x2100)


def test_a_shrunk_lun_is_refused_by_the_backend_with_the_same_sense(spy: Spy) -> None:
    """A shrink the cached size misses: the backend checks every range itself (OutOfRange),
    which becomes the LBA OUT OF RANGE the SCSI layer's own check would have given."""
    dev = ScsiDevice(spy)
    good(run(dev, cdb_rw(READ_16, BLOCKS - 1, 1), data_in=BS)[0])  # caches BLOCKS
    spy.inner.num_blocks = BLOCKS // 2
    for cdb, kw in (
        (cdb_rw(READ_16, BLOCKS - 1, 1), {"data_in": BS}),
        (cdb_rw(WRITE_10, BLOCKS - 1, 1), {"data_out": pattern(1)}),
    ):
        check(run(dev, cdb, **kw)[0], 5, Asc.LBA_OUT_OF_RANGE)  # type: ignore[arg-type]
    # every other command reads the size afresh
    check(run(dev, cdb_rw(VERIFY_16, BLOCKS - 1, 1))[0], 5, Asc.LBA_OUT_OF_RANGE)
    check(run(dev, cdb_rw(SYNC_10, BLOCKS - 1, 1))[0], 5, Asc.LBA_OUT_OF_RANGE)


class _Cmd:
    def __init__(self, cdb: bytes, buf: bytearray) -> None:
        self.cdb = memoryview(cdb)
        self.iovecs = _split(buf) if buf else []


def test_execute_all_answers_each_command_as_execute_does(spy: Spy) -> None:
    """What the runner answers inline in one pass: each command gets execute's outcome (data,
    status, sense, data-in length), errors included, in order."""
    spy.inner.image[: 8 * BS] = pattern(8, 5)
    cases: list[tuple[bytes, int, bytes | None]] = [  # (cdb, data-in length, data-out)
        (cdb_rw(READ_10, 0, 4), 4 * BS, None),
        (cdb_inquiry(96), 96, None),
        (cdb_rw(READ_16, BLOCKS, 1), BS, None),  # LBA OUT OF RANGE
        (bytes([0xC0, 0, 0, 0, 0, 0]), 0, None),  # INVALID COMMAND OPERATION CODE
        (cdb_rw(READ_10, 2, 2), 8 * BS, None),  # a larger buffer: the shorter length
        (cdb_rw(READ_6, 1, 1, flags=0), BS // 2, None),  # a smaller one: what fits
        (cdb_rw(READ_10, 0, 1, flags=0x20), BS, None),  # RDPROTECT
        (cdb_rw(WRITE_16, 9, 1), 0, pattern(1, 9)),
    ]
    one_by_one = ScsiDevice(Spy(MemoryBackend("twin", BLOCKS * BS, block_size=BS)))
    assert isinstance(one_by_one.backend, Spy)
    one_by_one.backend.inner.image[: 8 * BS] = pattern(8, 5)
    commands = [
        _Cmd(cdb, bytearray(out) if out is not None else bytearray(b"\xa5" * n))
        for cdb, n, out in cases
    ]
    answered = ScsiDevice(spy).execute_all(commands)
    assert [a[0] for a in answered] == commands
    for (cmd, status, sense, data_in), (cdb, n, out) in zip(answered, cases, strict=True):
        buf = bytearray(out) if out is not None else bytearray(b"\xa5" * n)
        expected = one_by_one.execute(cdb, _split(buf) if buf else [])
        assert (status, sense, data_in) == tuple(expected)
        got = b"".join(bytes(v) for v in cmd.iovecs)
        assert got == bytes(buf)  # the same bytes landed in the buffers
    assert bytes(spy.inner.image) == bytes(one_by_one.backend.inner.image)
