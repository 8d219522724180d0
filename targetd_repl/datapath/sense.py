"""SCSI status codes, sense keys, additional sense codes, and fixed-format sense data.

Owns the bytes of a sense buffer (SPC-4 4.5.3, fixed format, response code 0x70) and the
`CheckCondition` exception the emulation raises internally. The exception never leaves the SCSI
layer: `scsi.ScsiDevice.execute` turns it (and every backend error) into status + sense in one
place.
"""

from __future__ import annotations

import enum
import struct

# --- SAM status ------------------------------------------------------------------------------

GOOD = 0x00
CHECK_CONDITION = 0x02
BUSY = 0x08
TASK_SET_FULL = 0x28

FIXED_SENSE_LEN = 18


class SenseKey(enum.IntEnum):
    NO_SENSE = 0x0
    RECOVERED_ERROR = 0x1
    NOT_READY = 0x2
    MEDIUM_ERROR = 0x3
    HARDWARE_ERROR = 0x4
    ILLEGAL_REQUEST = 0x5
    UNIT_ATTENTION = 0x6
    DATA_PROTECT = 0x7
    ABORTED_COMMAND = 0xB
    MISCOMPARE = 0xE


class Asc(enum.IntEnum):
    """Additional sense code and qualifier, as ASC << 8 | ASCQ."""

    NO_ADDITIONAL_SENSE = 0x0000
    WRITE_ERROR = 0x0C00
    INVALID_FIELD_IN_COMMAND_IU = 0x0E03
    UNRECOVERED_READ_ERROR = 0x1100
    PARAMETER_LIST_LENGTH_ERROR = 0x1A00
    MISCOMPARE_DURING_VERIFY = 0x1D00
    INVALID_COMMAND_OPERATION_CODE = 0x2000
    LBA_OUT_OF_RANGE = 0x2100
    INVALID_FIELD_IN_CDB = 0x2400
    INVALID_FIELD_IN_PARAMETER_LIST = 0x2600
    WRITE_PROTECTED = 0x2700
    SPACE_ALLOCATION_FAILED_WRITE_PROTECT = 0x2707
    SAVING_PARAMETERS_NOT_SUPPORTED = 0x3900
    INTERNAL_TARGET_FAILURE = 0x4400


def fixed_sense(
    key: int,
    asc: int,
    *,
    information: int | None = None,
    field_pointer: int | None = None,
    in_cdb: bool = True,
    bit_pointer: int | None = None,
) -> bytes:
    """18 bytes of fixed-format, current sense data.

    `information` fills the INFORMATION field (bytes 3-6) and sets VALID. `field_pointer` fills
    the sense-key-specific field pointer (bytes 15-17, SKSV set) for ILLEGAL REQUEST: the byte of
    the CDB (`in_cdb`, C/D = 1) or of the parameter list (C/D = 0) that is wrong, and optionally
    the bit (`bit_pointer`, BPV set).
    """
    buf = bytearray(FIXED_SENSE_LEN)
    buf[0] = 0x70
    buf[2] = key & 0x0F
    if information is not None:
        buf[0] |= 0x80
        struct.pack_into(">I", buf, 3, information & 0xFFFFFFFF)
    buf[7] = FIXED_SENSE_LEN - 8
    buf[12] = (asc >> 8) & 0xFF
    buf[13] = asc & 0xFF
    if field_pointer is not None:
        sks = 0x80 | (0x40 if in_cdb else 0)
        if bit_pointer is not None:
            sks |= 0x08 | (bit_pointer & 0x07)
        buf[15] = sks
        struct.pack_into(">H", buf, 16, field_pointer & 0xFFFF)
    return bytes(buf)


class CheckCondition(Exception):
    """Raised inside the emulation to end a command with CHECK CONDITION and this sense."""

    def __init__(self, sense: bytes) -> None:
        super().__init__(describe(sense))
        self.sense = sense


def illegal_request(
    asc: int = Asc.INVALID_FIELD_IN_CDB,
    *,
    field: int | None = None,
    bit: int | None = None,
    in_cdb: bool = True,
) -> CheckCondition:
    return CheckCondition(
        fixed_sense(
            SenseKey.ILLEGAL_REQUEST, asc, field_pointer=field, bit_pointer=bit, in_cdb=in_cdb
        )
    )


def invalid_cdb(field: int, bit: int | None = None) -> CheckCondition:
    return illegal_request(Asc.INVALID_FIELD_IN_CDB, field=field, bit=bit)


def invalid_param(field: int, bit: int | None = None) -> CheckCondition:
    return illegal_request(Asc.INVALID_FIELD_IN_PARAMETER_LIST, field=field, bit=bit, in_cdb=False)


def lba_out_of_range() -> CheckCondition:
    return CheckCondition(fixed_sense(SenseKey.ILLEGAL_REQUEST, Asc.LBA_OUT_OF_RANGE))


def write_protected() -> CheckCondition:
    return CheckCondition(fixed_sense(SenseKey.DATA_PROTECT, Asc.WRITE_PROTECTED))


def miscompare(offset: int) -> CheckCondition:
    return CheckCondition(
        fixed_sense(SenseKey.MISCOMPARE, Asc.MISCOMPARE_DURING_VERIFY, information=offset)
    )


def describe(sense: bytes | bytearray | memoryview) -> str:
    """A short human form of fixed-format sense, for logs and test messages."""
    if len(sense) < 14:
        return f"sense({bytes(sense).hex()})"
    key = sense[2] & 0x0F
    try:
        key_name = SenseKey(key).name
    except ValueError:
        key_name = hex(key)
    return f"{key_name} asc/ascq {sense[12]:#04x}/{sense[13]:#04x}"
