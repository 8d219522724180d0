"""Dirty-region bitmaps: one bit per region of a byte range (a volume), and their crash-safe file.

Region `r` covers bytes `[r * region_size, min((r + 1) * region_size, size_bytes))`; the last
region is short when the size is not a multiple of the region size. Bit `r` lives in byte `r >> 3`
at mask `1 << (r & 7)` (little-endian bit order, so `int.from_bytes(bits, "little")` has bit `r` =
region `r`). Bits past the last region are always zero.

Semantics: `set_range` marks every region the byte range touches (a write of one byte dirties its
whole region); `clear_range` clears only regions the range covers completely (clearing after a
partial copy must never forget data that was not copied). `set_range` returns how many bits were
newly set, so a write path can persist the bitmap before acknowledging only when that number is
non-zero (DRBD activity-log style): repeated writes to dirty regions cost no I/O.

Thread safety: every method takes the bitmap's own lock; iterators work on a copy taken at the
start. File format (`save`/`load`), little-endian:

    header  magic "TRBITMAP" | version u32 | flags u32 | region_size u64 | size_bytes u64 |
            nbits u64 | stamp u64 | bits_len u64
    bits    bits_len bytes
    crc     u32 CRC32C over header and bits

`stamp` is an opaque u64 the caller supplies (e.g. the journal sequence number the bitmap covers).
The file is replaced atomically, so `load` returns exactly the last saved state or raises
`BitmapCorrupt`.
"""

from __future__ import annotations

import re
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import crc32c

from targetd_repl.errors import BitmapCorrupt, InvalidArgument, NotFound, OutOfRange
from targetd_repl.model import DEFAULT_REGION_SIZE
from targetd_repl.storage.fileutil import StrPath, atomic_write

MAGIC = b"TRBITMAP"
VERSION = 1
_HEADER = struct.Struct("<8sIIQQQQQ")
_CRC = struct.Struct("<I")
MIN_REGION_SIZE = 4096
_U64 = (1 << 64) - 1

# Runs of set bits inside one byte value: (first bit, length) pairs, low bit first.
_BYTE_RUNS: tuple[tuple[tuple[int, int], ...], ...] = tuple(
    tuple(
        (m.start(), m.end() - m.start())
        for m in re.finditer("1+", format(v, "08b")[::-1])  # reversed: index = bit number
    )
    for v in range(256)
)
# One token per full byte run (all bits set) or per mixed byte.
_TOKENS = re.compile(rb"\xff+|[^\x00\xff]")
_WINDOW = 4096  # bytes compared with zero at once (32768 regions: 2 GiB at 64 KiB regions)
_SUB = 64  # bytes per sub-window inside a non-empty window
_ZERO_WINDOW = bytes(_WINDOW)
_ZERO_SUB = bytes(_SUB)
_FULL_SUB = b"\xff" * _SUB


def _pieces(data: bytes) -> Iterator[tuple[int, int]]:
    """Yield (first bit, n bits) runs of set bits in order; adjacent pieces may touch (the
    caller merges them). Zero windows and zero sub-windows are skipped by slice comparison."""
    if len(data) % _WINDOW:
        data += bytes(_WINDOW - len(data) % _WINDOW)  # zero padding yields no runs
    zero_window = _ZERO_WINDOW
    zero_sub = _ZERO_SUB
    full_sub = _FULL_SUB
    byte_runs = _BYTE_RUNS
    for w in range(0, len(data), _WINDOW):
        if data[w : w + _WINDOW] == zero_window:
            continue
        for s in range(w, w + _WINDOW, _SUB):
            sub = data[s : s + _SUB]
            if sub == zero_sub:
                continue
            if sub == full_sub:
                yield s << 3, _SUB << 3
                continue
            for m in _TOKENS.finditer(data, s, s + _SUB):
                start = m.start()
                value = data[start]
                if value == 0xFF:
                    yield start << 3, (m.end() - start) << 3
                else:
                    base = start << 3
                    for bit, n in byte_runs[value]:
                        yield base + bit, n


def _check_geometry(size_bytes: int, region_size: int) -> None:
    if region_size < MIN_REGION_SIZE or region_size & (region_size - 1):
        raise InvalidArgument(
            f"invalid bitmap region size {region_size}: use a power of two >= {MIN_REGION_SIZE}"
        )
    if size_bytes < 0:
        raise InvalidArgument(f"invalid bitmap size {size_bytes}: must be >= 0")


def _nbits(size_bytes: int, region_size: int) -> int:
    return -(-size_bytes // region_size)


def _tail_mask(nbits: int) -> int:
    """Mask of the valid bits in the last byte (0xFF when nbits is a multiple of 8)."""
    rem = nbits & 7
    return (1 << rem) - 1 if rem else 0xFF


class DirtyBitmap:
    """A bitmap of dirty regions over `size_bytes` bytes, `region_size` bytes per bit."""

    __slots__ = ("_bits", "_lock", "_nbits", "_region_size", "_shift", "_size")

    def __init__(self, size_bytes: int, region_size: int = DEFAULT_REGION_SIZE) -> None:
        _check_geometry(size_bytes, region_size)
        self._size = size_bytes
        self._region_size = region_size
        self._shift = region_size.bit_length() - 1
        self._nbits = _nbits(size_bytes, region_size)
        self._bits = bytearray((self._nbits + 7) >> 3)
        self._lock = threading.Lock()

    # --- geometry ------------------------------------------------------------------------------

    @property
    def size_bytes(self) -> int:
        return self._size

    @property
    def region_size(self) -> int:
        return self._region_size

    @property
    def nbits(self) -> int:
        """Number of regions (bits)."""
        return self._nbits

    def region_span(self, region: int) -> tuple[int, int]:
        """(offset, length) of a region, the last one clipped to size_bytes."""
        self._check_region(region)
        start = region << self._shift
        return start, min(self._region_size, self._size - start)

    def _check_region(self, region: int) -> None:
        if region < 0 or region >= self._nbits:
            raise OutOfRange(f"bitmap region {region} out of range (limit {self._nbits} regions)")

    def _check_range(self, offset: int, length: int) -> None:
        if length < 0:
            raise InvalidArgument(f"bitmap range: negative length {length} at offset {offset}")
        if offset < 0 or offset + length > self._size:
            raise OutOfRange(
                f"bitmap range {offset} + {length} is past the end (limit {self._size} bytes)"
            )

    # --- updates -------------------------------------------------------------------------------

    def set_range(self, offset: int, length: int) -> int:
        """Mark every region that bytes [offset, offset+length) touch; return newly set bits."""
        if offset < 0 or length <= 0 or offset + length > self._size:
            self._check_range(offset, length)
            return 0
        shift = self._shift
        first = offset >> shift
        last = (offset + length - 1) >> shift
        with self._lock:
            if first == last:  # the common case: a write inside one region
                bits = self._bits
                i = first >> 3
                m = 1 << (first & 7)
                b = bits[i]
                if b & m:
                    return 0
                bits[i] = b | m
                return 1
            return self._fill(first, last + 1, True)

    def clear_range(self, offset: int, length: int) -> int:
        """Clear the regions that bytes [offset, offset+length) cover completely (the short
        last region counts as covered when the range reaches size_bytes); return cleared bits."""
        self._check_range(offset, length)
        if length == 0:
            return 0
        rs = self._region_size
        end = offset + length
        first = -(-offset // rs)
        last = self._nbits if end == self._size else end // rs
        if first >= last:
            return 0
        with self._lock:
            return self._fill(first, last, False)

    def set_region(self, region: int) -> bool:
        """Set one region's bit; True if it was clear."""
        self._check_region(region)
        with self._lock:
            return self._fill(region, region + 1, True) == 1

    def clear_region(self, region: int) -> bool:
        """Clear one region's bit; True if it was set."""
        self._check_region(region)
        with self._lock:
            return self._fill(region, region + 1, False) == 1

    def set_all(self) -> int:
        """Set every region (e.g. a full initial copy); return newly set bits."""
        with self._lock:
            return self._fill(0, self._nbits, True)

    def clear_all(self) -> int:
        """Clear every region; return cleared bits."""
        with self._lock:
            return self._fill(0, self._nbits, False)

    def _fill(self, lo: int, hi: int, value: bool) -> int:
        """Set or clear bits [lo, hi); return how many changed. Caller holds the lock."""
        if lo >= hi:
            return 0
        bits = self._bits
        changed = 0
        blo = lo >> 3
        bhi = (hi - 1) >> 3  # byte of the last bit
        if blo == bhi:
            mask = ((1 << (hi - lo)) - 1) << (lo & 7)
            b = bits[blo]
            if value:
                changed = (mask & ~b).bit_count()
                bits[blo] = b | mask
            else:
                changed = (mask & b).bit_count()
                bits[blo] = b & ~mask
            return changed
        # partial head byte, whole middle bytes, partial tail byte
        head_mask = (0xFF << (lo & 7)) & 0xFF
        tail_mask = _tail_mask(hi)
        mid_lo = blo + 1
        mid_hi = bhi
        b = bits[blo]
        t = bits[bhi]
        mid = bits[mid_lo:mid_hi]
        ones_mid = int.from_bytes(mid, "little").bit_count()
        if value:
            changed = (
                (head_mask & ~b).bit_count()
                + (tail_mask & ~t).bit_count()
                + (mid_hi - mid_lo) * 8
                - ones_mid
            )
            bits[blo] = b | head_mask
            bits[bhi] = t | tail_mask
            bits[mid_lo:mid_hi] = b"\xff" * (mid_hi - mid_lo)
        else:
            changed = (head_mask & b).bit_count() + (tail_mask & t).bit_count() + ones_mid
            bits[blo] = b & ~head_mask
            bits[bhi] = t & ~tail_mask
            bits[mid_lo:mid_hi] = bytes(mid_hi - mid_lo)
        return changed

    def union_update(self, other: DirtyBitmap) -> int:
        """self |= other (same size and region size required); return newly set bits."""
        if other._size != self._size or other._region_size != self._region_size:
            raise InvalidArgument(
                f"bitmap union needs the same geometry: {self._size} bytes / "
                f"{self._region_size}-byte regions vs {other._size} / {other._region_size}"
            )
        theirs = other.to_bytes()  # copied under the other's lock: never hold both locks
        with self._lock:
            mine = int.from_bytes(self._bits, "little")
            merged = mine | int.from_bytes(theirs, "little")
            self._bits[:] = merged.to_bytes(len(self._bits), "little")
            return merged.bit_count() - mine.bit_count()

    def resize(self, size_bytes: int) -> None:
        """Change the covered size. Growing adds clear regions (the old short last region keeps
        its bit); shrinking drops regions past the new end."""
        _check_geometry(size_bytes, self._region_size)
        with self._lock:
            nbits = _nbits(size_bytes, self._region_size)
            nbytes = (nbits + 7) >> 3
            if nbytes < len(self._bits):
                del self._bits[nbytes:]
            else:
                self._bits.extend(bytes(nbytes - len(self._bits)))
            if nbits < self._nbits and nbytes:
                self._bits[-1] &= _tail_mask(nbits)  # keep bits past the end zero
            self._size = size_bytes
            self._nbits = nbits

    # --- queries -------------------------------------------------------------------------------

    def is_set(self, region: int) -> bool:
        with self._lock:
            self._check_region(region)
            return bool(self._bits[region >> 3] & (1 << (region & 7)))

    def count(self) -> int:
        """Number of set regions."""
        with self._lock:
            return int.from_bytes(self._bits, "little").bit_count()

    def any(self) -> bool:
        with self._lock:
            return self._bits.count(0) != len(self._bits)

    def runs(self) -> Iterator[tuple[int, int]]:
        """Yield (first_region, n_regions) for each maximal run of set regions, in order.

        Works on a copy. Empty space is skipped a window at a time by comparing slices with a
        zero constant (memcmp), never bit by bit.
        """
        run_start = -1
        run_end = -1
        for s, n in _pieces(self.to_bytes()):
            if s == run_end:
                run_end = s + n
            else:
                if run_start >= 0:
                    yield run_start, run_end - run_start
                run_start, run_end = s, s + n
        if run_start >= 0:
            yield run_start, run_end - run_start

    def regions(self) -> Iterator[int]:
        """Yield every set region, in order."""
        for start, n in self.runs():
            yield from range(start, start + n)

    def byte_ranges(self) -> Iterator[tuple[int, int]]:
        """Yield (offset, length) of each run of set regions, clipped to size_bytes."""
        shift = self._shift
        size = self._size
        for start, n in self.runs():
            off = start << shift
            yield off, min((start + n) << shift, size) - off

    # --- copies and serialisation --------------------------------------------------------------

    def copy(self) -> DirtyBitmap:
        return DirtyBitmap.from_bytes(
            self.to_bytes(), size_bytes=self._size, region_size=self._region_size
        )

    def to_bytes(self) -> bytes:
        with self._lock:
            return bytes(self._bits)

    @classmethod
    def from_bytes(
        cls,
        data: bytes | bytearray | memoryview,
        *,
        size_bytes: int,
        region_size: int = DEFAULT_REGION_SIZE,
    ) -> DirtyBitmap:
        """Build a bitmap from `to_bytes()` output; InvalidArgument if it cannot be one."""
        bm = cls(size_bytes, region_size)
        raw = bytes(data)
        if len(raw) != len(bm._bits):
            raise InvalidArgument(
                f"bitmap bytes: {len(raw)} bytes for {bm._nbits} regions (expected {len(bm._bits)})"
            )
        if raw and raw[-1] & ~_tail_mask(bm._nbits) & 0xFF:
            raise InvalidArgument("bitmap bytes: bits set past the last region")
        bm._bits[:] = raw
        return bm

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DirtyBitmap):
            return NotImplemented
        return (
            self._size == other._size
            and self._region_size == other._region_size
            and self.to_bytes() == other.to_bytes()
        )

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return (
            f"DirtyBitmap(size_bytes={self._size}, region_size={self._region_size}, "
            f"set={self.count()}/{self._nbits})"
        )

    # --- persistence ---------------------------------------------------------------------------

    def save(self, path: StrPath, *, stamp: int = 0) -> None:
        """Write the bitmap with `stamp` to `path`, replacing it atomically and durably."""
        if not 0 <= stamp <= _U64:
            raise InvalidArgument(f"bitmap stamp {stamp} does not fit in an unsigned 64-bit int")
        with self._lock:
            bits = bytes(self._bits)
            header = _HEADER.pack(
                MAGIC, VERSION, 0, self._region_size, self._size, self._nbits, stamp, len(bits)
            )
        crc = crc32c.crc32c(bits, crc32c.crc32c(header))
        atomic_write(path, (header, bits, _CRC.pack(crc)))

    @classmethod
    def load(cls, path: StrPath) -> tuple[DirtyBitmap, int]:
        """Read a bitmap saved by `save`; return (bitmap, stamp). BitmapCorrupt on any check
        failure, NotFound if the file does not exist."""
        p = Path(path)
        try:
            raw = p.read_bytes()
        except FileNotFoundError:
            raise NotFound(f"bitmap file {p} does not exist") from None

        def corrupt(why: str) -> BitmapCorrupt:
            return BitmapCorrupt(f"bitmap file {p}: {why}")

        hsize = _HEADER.size
        if len(raw) < hsize + _CRC.size:
            raise corrupt(f"{len(raw)} bytes is shorter than header and checksum")
        magic, version, flags, region_size, size_bytes, nbits, stamp, bits_len = (
            _HEADER.unpack_from(raw)
        )
        if magic != MAGIC:
            raise corrupt(f"bad magic {magic!r}")
        if len(raw) != hsize + bits_len + _CRC.size:
            raise corrupt(f"length {len(raw)} does not match header ({bits_len} bitmap bytes)")
        (stored_crc,) = _CRC.unpack_from(raw, hsize + bits_len)
        crc = crc32c.crc32c(memoryview(raw)[: hsize + bits_len])
        if crc != stored_crc:
            raise corrupt(f"checksum mismatch (stored {stored_crc:#010x}, computed {crc:#010x})")
        if version != VERSION:
            raise corrupt(f"unsupported version {version}")
        if flags != 0:
            raise corrupt(f"unknown flags {flags:#x}")
        try:
            _check_geometry(size_bytes, region_size)
        except InvalidArgument as e:
            raise corrupt(str(e)) from None
        if nbits != _nbits(size_bytes, region_size) or bits_len != (nbits + 7) >> 3:
            raise corrupt(f"inconsistent geometry: {nbits} bits, {bits_len} bytes")
        try:
            bm = cls.from_bytes(
                memoryview(raw)[hsize : hsize + bits_len],
                size_bytes=size_bytes,
                region_size=region_size,
            )
        except InvalidArgument as e:
            raise corrupt(str(e)) from None
        return bm, stamp
