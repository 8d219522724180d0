"""SCSI operation codes and CDB field decoding (SPC-4, SBC-3). Pure functions over bytes.

Owns the numbers: which opcode is which, how long a CDB of each group is, and where the LBA and
transfer length sit in each CDB size. Nothing here knows about rings, backends or sense data.
"""

from __future__ import annotations

import struct
from typing import Final

Buffer = bytes | bytearray | memoryview

TEST_UNIT_READY: Final = 0x00
REQUEST_SENSE: Final = 0x03
READ_6: Final = 0x08
WRITE_6: Final = 0x0A
INQUIRY: Final = 0x12
MODE_SENSE_6: Final = 0x1A
START_STOP_UNIT: Final = 0x1B
READ_CAPACITY_10: Final = 0x25
READ_10: Final = 0x28
WRITE_10: Final = 0x2A
WRITE_AND_VERIFY_10: Final = 0x2E
VERIFY_10: Final = 0x2F
SYNCHRONIZE_CACHE_10: Final = 0x35
WRITE_SAME_10: Final = 0x41
UNMAP: Final = 0x42
MODE_SENSE_10: Final = 0x5A
READ_16: Final = 0x88
COMPARE_AND_WRITE: Final = 0x89
WRITE_16: Final = 0x8A
WRITE_AND_VERIFY_16: Final = 0x8E
VERIFY_16: Final = 0x8F
SYNCHRONIZE_CACHE_16: Final = 0x91
WRITE_SAME_16: Final = 0x93
SERVICE_ACTION_IN_16: Final = 0x9E
READ_12: Final = 0xA8
WRITE_12: Final = 0xAA
WRITE_AND_VERIFY_12: Final = 0xAE
VERIFY_12: Final = 0xAF

SAI_READ_CAPACITY_16: Final = 0x10

# READ (6/10/12/16): the runner answers them on its loop thread (inline reads).
READ_OPCODES: Final = frozenset({READ_6, READ_10, READ_12, READ_16})
# Plain WRITE (6/10/12/16): what the runner hands to the backend as one batch (execute_writes).
BATCH_WRITE_OPCODES: Final = frozenset({WRITE_6, WRITE_10, WRITE_12, WRITE_16})

_BE16 = struct.Struct(">H")
_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")

# (flags byte 1, LBA, TRANSFER LENGTH) of the 10/12/16-byte READ and WRITE CDBs in one unpack:
# the data path's per-command decode (lba_and_length says the same, field by field).
_RW10 = struct.Struct(">xBIxH")
_RW12 = struct.Struct(">xBII")
_RW16 = struct.Struct(">xBQI")
RW_FIELDS: Final[dict[int, struct.Struct]] = {
    READ_10: _RW10,
    WRITE_10: _RW10,
    READ_12: _RW12,
    WRITE_12: _RW12,
    READ_16: _RW16,
    WRITE_16: _RW16,
}


def cdb_length(opcode: int) -> int:
    """The CDB length implied by the opcode's group code (SPC-4 4.2.5.1); 16 for the vendor and
    reserved groups, whose commands we reject anyway."""
    group = opcode >> 5
    if group == 0:
        return 6
    if group in (1, 2):
        return 10
    if group == 5:
        return 12
    return 16


def be16(buf: Buffer, off: int) -> int:
    return int(_BE16.unpack_from(buf, off)[0])


def be32(buf: Buffer, off: int) -> int:
    return int(_BE32.unpack_from(buf, off)[0])


def be64(buf: Buffer, off: int) -> int:
    return int(_BE64.unpack_from(buf, off)[0])


def lba_and_length(cdb: Buffer) -> tuple[int, int]:
    """(LBA, TRANSFER LENGTH in blocks) of a READ/WRITE/VERIFY/WRITE SAME/SYNC CACHE CDB.

    6-byte CDBs: 21-bit LBA and an 8-bit length (0 means 256 for READ(6)/WRITE(6); the caller
    applies that rule). 10-byte: LBA at 2, length (16 bit) at 7. 12-byte: LBA at 2, length
    (32 bit) at 6. 16-byte: LBA (64 bit) at 2, length (32 bit) at 10.
    """
    size = cdb_length(cdb[0])
    if size == 6:
        return ((cdb[1] & 0x1F) << 16) | (cdb[2] << 8) | cdb[3], cdb[4]
    if size == 10:
        return be32(cdb, 2), be16(cdb, 7)
    if size == 12:
        return be32(cdb, 2), be32(cdb, 6)
    return be64(cdb, 2), be32(cdb, 10)


def length_field_offset(opcode: int) -> int:
    """Byte offset of the TRANSFER LENGTH / NUMBER OF LOGICAL BLOCKS field (sense pointers)."""
    return {6: 4, 10: 7, 12: 6, 16: 10}[cdb_length(opcode)]
