"""Scatter/gather lists: a command's data buffers as a list of memoryviews (no copies unless a
function says so)."""

from __future__ import annotations

from collections.abc import Sequence

Buffer = bytes | bytearray | memoryview


def total_length(buffers: Sequence[memoryview]) -> int:
    return len(buffers[0]) if len(buffers) == 1 else sum(map(len, buffers))


def slice_buffers(buffers: Sequence[memoryview], start: int, length: int) -> list[memoryview]:
    """Views of bytes [start, start + length) of the list (clipped to what exists)."""
    out: list[memoryview] = []
    pos = 0
    end = start + length
    for buf in buffers:
        n = len(buf)
        if pos >= end:
            break
        if pos + n > start:
            lo = max(0, start - pos)
            hi = min(n, end - pos)
            out.append(buf if lo == 0 and hi == n else buf[lo:hi])
        pos += n
    return out


def scatter(data: Buffer, buffers: Sequence[memoryview]) -> int:
    """Copy `data` into the buffers, truncated to their total length; returns bytes copied."""
    src = memoryview(data)
    copied = 0
    remaining = len(src)
    for buf in buffers:
        if not remaining:
            break
        n = min(len(buf), remaining)
        buf[:n] = src[copied : copied + n]
        copied += n
        remaining -= n
    return copied


def gather(buffers: Sequence[memoryview], length: int) -> bytes:
    """The first `length` bytes of the buffers as one bytes object (a copy; fewer bytes when the
    buffers are shorter)."""
    parts = slice_buffers(buffers, 0, length)
    if len(parts) == 1:
        return parts[0].tobytes()
    return b"".join(parts)


def first_difference(medium: Buffer, buffers: Sequence[memoryview]) -> int | None:
    """Offset of the first byte where `buffers` differ from `medium`, None when equal over the
    buffers' length. Equal slices are compared whole (memcmp); only a differing slice is
    bisected."""
    view = memoryview(medium)
    pos = 0
    for buf in buffers:
        n = len(buf)
        a = view[pos : pos + n]
        if a != buf:
            return pos + _bisect_difference(a, buf)
        pos += n
    return None


def _bisect_difference(a: memoryview, b: memoryview) -> int:
    lo, hi = 0, min(len(a), len(b))
    while hi - lo > 64:
        mid = (lo + hi) // 2
        if a[lo:mid] != b[lo:mid]:
            hi = mid
        else:
            lo = mid
    for i in range(lo, hi):
        if a[i] != b[i]:
            return i
    return hi
