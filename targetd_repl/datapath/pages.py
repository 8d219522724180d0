"""What the LUN says about itself: standard INQUIRY data, VPD pages, mode pages and READ CAPACITY
parameter data (SPC-4, SBC-3). Pure functions from a backend's description to bytes.

Identity: the VPD 0x83 NAA designator is type 6 (IEEE Registered Extended): NAA 6, the OUI, and
100 bits of SHA-256 over the volume's uuid. Same uuid, same designator - on every restart and on
both sites of a pair, which is what lets multipath and VMware treat the secondary's LUN, once
promoted, as the same disk.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from targetd_repl.datapath.backend import VolumeIdentity

OUI_OPENFABRICS = 0x001405  # the OUI LIO and tcmu-runner use for NAA identifiers

VPD_SUPPORTED = 0x00
VPD_UNIT_SERIAL = 0x80
VPD_DEVICE_ID = 0x83
VPD_BLOCK_LIMITS = 0xB0
VPD_BLOCK_CHARACTERISTICS = 0xB1
VPD_LOGICAL_BLOCK_PROVISIONING = 0xB2
VPD_PAGES = (
    VPD_SUPPORTED,
    VPD_UNIT_SERIAL,
    VPD_DEVICE_ID,
    VPD_BLOCK_LIMITS,
    VPD_BLOCK_CHARACTERISTICS,
    VPD_LOGICAL_BLOCK_PROVISIONING,
)

MODE_RW_ERROR_RECOVERY = 0x01
MODE_CACHING = 0x08
MODE_CONTROL = 0x0A
MODE_ALL = 0x3F

MIB = 1 << 20


@dataclass(frozen=True, slots=True)
class ScsiConfig:
    """Limits and names the LUN advertises (and the SCSI layer enforces)."""

    vendor: str = "LIO-ORG"
    product: str = "targetd-repl"
    revision: str = "0001"
    oui: int = OUI_OPENFABRICS
    # READ/WRITE larger than this: INVALID FIELD IN CDB. 32 MiB = 65536 blocks of 512 bytes:
    # libiscsi's WriteSame16.Unmap writes and reads 65536 blocks in ONE command (whatever this
    # limit says) on LUNs of that size; the TCMU data area (1 GiB) holds such a command.
    max_transfer_bytes: int = 32 * MIB
    optimal_transfer_bytes: int = 1 * MIB
    # per UNMAP block descriptor; 512 MiB keeps MAXIMUM UNMAP LBA COUNT <= 2^20 blocks at 512-byte
    # blocks, the largest count libiscsi's conformance suite accepts as sane
    max_unmap_bytes: int = 512 * MIB
    max_unmap_descriptors: int = 256
    max_write_same_bytes: int = 1024 * MIB
    max_compare_and_write_blocks: int = 1  # what ESXi's ATS uses; LIO advertises the same
    unmap_granularity_bytes: int = 4096
    thin: bool = True  # sparse volumes: provisioning type "thin" in VPD 0xB2


def _ascii(text: str, width: int) -> bytes:
    return text.encode("ascii", "replace")[:width].ljust(width, b" ")


# VERSION DESCRIPTORs of the standard INQUIRY data (SPC-4 table 146), as LIO reports them. SBC-3
# must be claimed: initiators and conformance suites read VPD 0xB0's 0x3C-byte layout (our
# page), UNMAP and WRITE SAME semantics as SBC-3 only when it is.
VERSION_SAM5 = 0x00A0
VERSION_SPC4 = 0x0460
VERSION_SBC3 = 0x04C0
STANDARD_INQUIRY_LEN = 96  # with the version descriptors (bytes 58-73), as LIO answers


def standard_inquiry(config: ScsiConfig) -> bytes:
    buf = bytearray(STANDARD_INQUIRY_LEN)
    buf[0] = 0x00  # peripheral qualifier 0, direct access block device
    buf[2] = 0x06  # SPC-4
    buf[3] = 0x12  # HISUP, response data format 2
    buf[4] = len(buf) - 5
    buf[7] = 0x02  # CMDQUE
    buf[8:16] = _ascii(config.vendor, 8)
    buf[16:32] = _ascii(config.product, 16)
    buf[32:36] = _ascii(config.revision, 4)
    struct.pack_into(">HHH", buf, 58, VERSION_SAM5, VERSION_SPC4, VERSION_SBC3)
    return bytes(buf)


def naa_designator(identity: VolumeIdentity, oui: int = OUI_OPENFABRICS) -> bytes:
    """16 bytes: NAA 6 | 24-bit OUI | 100 bits of SHA-256("targetd-repl:" + uuid)."""
    digest = hashlib.sha256(f"targetd-repl:{identity.uuid}".encode()).digest()
    vendor_bits = int.from_bytes(digest[:13], "big") >> 4  # 100 bits
    value = (0x6 << 124) | ((oui & 0xFFFFFF) << 100) | vendor_bits
    return value.to_bytes(16, "big")


def unit_serial(identity: VolumeIdentity) -> str:
    serial = "".join(ch for ch in identity.uuid if ch.isascii() and ch.isprintable())
    return serial[:64] or hashlib.sha256(identity.name.encode()).hexdigest()[:32]


def _vpd(page: int, body: bytes) -> bytes:
    return struct.pack(">BBH", 0x00, page, len(body)) + body


def vpd_page(
    page: int, config: ScsiConfig, identity: VolumeIdentity, block_size: int
) -> bytes | None:
    """The VPD page, or None when not supported."""
    if page == VPD_SUPPORTED:
        return _vpd(page, bytes(VPD_PAGES))
    if page == VPD_UNIT_SERIAL:
        return _vpd(page, unit_serial(identity).encode("ascii"))
    if page == VPD_DEVICE_ID:
        naa = naa_designator(identity, config.oui)
        t10 = _ascii(config.vendor, 8) + unit_serial(identity).encode("ascii")
        body = (
            # code set binary, association LU, designator type NAA
            struct.pack(">BBBB", 0x01, 0x03, 0x00, len(naa))
            + naa
            # code set ASCII, association LU, designator type T10 vendor ID
            + struct.pack(">BBBB", 0x02, 0x01, 0x00, len(t10))
            + t10
        )
        return _vpd(page, body)
    if page == VPD_BLOCK_LIMITS:
        limits = bytearray(0x3C)
        limits[0] = 0x01  # WSNZ: WRITE SAME with zero blocks is refused
        limits[1] = min(255, config.max_compare_and_write_blocks)
        gran = max(1, 4096 // block_size)
        unmap_gran = max(1, config.unmap_granularity_bytes // block_size)
        struct.pack_into(
            ">HIIIII",
            limits,
            2,
            gran,  # OPTIMAL TRANSFER LENGTH GRANULARITY
            config.max_transfer_bytes // block_size,  # MAXIMUM TRANSFER LENGTH
            config.optimal_transfer_bytes // block_size,  # OPTIMAL TRANSFER LENGTH
            0,  # MAXIMUM PREFETCH LENGTH
            config.max_unmap_bytes // block_size,  # MAXIMUM UNMAP LBA COUNT
            config.max_unmap_descriptors,  # MAXIMUM UNMAP BLOCK DESCRIPTOR COUNT
        )
        struct.pack_into(">II", limits, 24, unmap_gran, 0x80000000)  # granularity; UGAVALID, 0
        struct.pack_into(">Q", limits, 32, config.max_write_same_bytes // block_size)
        return _vpd(page, bytes(limits))
    if page == VPD_BLOCK_CHARACTERISTICS:
        chars = bytearray(0x3C)
        struct.pack_into(">H", chars, 0, 0x0001)  # MEDIUM ROTATION RATE: non-rotating
        return _vpd(page, bytes(chars))
    if page == VPD_LOGICAL_BLOCK_PROVISIONING:
        # LBPU (UNMAP), LBPWS (WRITE SAME 16 + UNMAP), LBPWS10, LBPRZ = 001b (unmapped reads 0)
        flags = 0x80 | 0x40 | 0x20 | 0x04
        return _vpd(page, bytes([0x00, flags, 0x02 if config.thin else 0x00, 0x00]))
    return None


def read_capacity_10(num_blocks: int, block_size: int) -> bytes:
    last = num_blocks - 1
    return struct.pack(">II", last if last < 0xFFFFFFFF else 0xFFFFFFFF, block_size)


def read_capacity_16(num_blocks: int, block_size: int) -> bytes:
    buf = bytearray(32)
    struct.pack_into(">QI", buf, 0, num_blocks - 1, block_size)
    exponent = max(0, (4096 // block_size).bit_length() - 1)  # logical blocks per 4 KiB
    buf[13] = exponent & 0x0F
    buf[14] = 0x80 | 0x40  # LBPME, LBPRZ
    return bytes(buf)


def mode_page(page: int, *, read_only: bool, changeable: bool) -> bytes | None:
    """One mode page (no subpages). `changeable` gives the changeable-values mask: nothing."""
    body: bytearray
    if page == MODE_RW_ERROR_RECOVERY:
        body = bytearray(12)
    elif page == MODE_CACHING:
        body = bytearray(20)  # WCE 0: writes are durable when they complete; RCD 0
    elif page == MODE_CONTROL:
        body = bytearray(12)
        if not changeable:
            body[2] = 0x02  # GLTSD
            body[3] = 0x10  # QUEUE ALGORITHM MODIFIER 1: unrestricted reordering
            body[4] = 0x08 if read_only else 0x00  # SWP
            body[5] = 0x40  # TAS
            body[8:10] = b"\xff\xff"  # BUSY TIMEOUT PERIOD: unlimited
    else:
        return None
    body[0] = page
    body[1] = len(body) - 2
    return bytes(body)


def mode_pages(page: int, *, read_only: bool, changeable: bool) -> bytes | None:
    if page == MODE_ALL:
        return b"".join(
            mode_page(p, read_only=read_only, changeable=changeable) or b""
            for p in (MODE_RW_ERROR_RECOVERY, MODE_CACHING, MODE_CONTROL)
        )
    return mode_page(page, read_only=read_only, changeable=changeable)


def block_descriptor(num_blocks: int, block_size: int, *, long_lba: bool) -> bytes:
    if long_lba:
        return struct.pack(">Q4xI", num_blocks, block_size)
    count = num_blocks if num_blocks <= 0xFFFFFFFF else 0xFFFFFFFF
    return struct.pack(">IB", count, 0) + block_size.to_bytes(3, "big")
