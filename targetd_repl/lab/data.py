"""The bytes a lab scenario checks, read the one way every scenario reads them: sha256 of data,
of a file and of a whole block device, a range of a file, a range of a block device read with
O_DIRECT (the page cache cannot answer), and a block device's count of completed writes.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
from collections.abc import Iterator
from pathlib import Path

from targetd_repl.lab.errors import ScenarioAssertion

MiB = 1 << 20


def sha256(data: bytes | bytearray | memoryview) -> str:
    """The hex sha256 of `data`."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path | str) -> str:
    """The hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MiB):
            digest.update(chunk)
    return digest.hexdigest()


def read_range(path: Path | str, offset: int, length: int) -> bytes:
    """Up to `length` bytes of a file from `offset` (through the page cache)."""
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


@contextlib.contextmanager
def _open_direct(device: str, buffer_size: int) -> Iterator[tuple[int, mmap.mmap]]:
    """A block device opened read-only with O_DIRECT, and a page-aligned buffer (as O_DIRECT
    wants) of `buffer_size` bytes; both closed on exit."""
    buf = mmap.mmap(-1, buffer_size)
    fd = os.open(device, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    try:
        yield fd, buf
    finally:
        os.close(fd)
        buf.close()


def read_direct(device: str, offset: int, length: int) -> bytes:
    """`length` bytes of a block device from `offset`, read with O_DIRECT; a short read (the
    device ends or fails) raises ScenarioAssertion."""
    with _open_direct(device, length) as (fd, buf):
        done = 0
        while done < length:
            n = os.preadv(fd, [memoryview(buf)[done:]], offset + done)
            if n <= 0:
                raise ScenarioAssertion(f"short O_DIRECT read of {device} at {offset + done}")
            done += n
        return bytes(buf)


def sha256_direct(device: str) -> tuple[str, int]:
    """The hex sha256 of a whole block device read with O_DIRECT, and the bytes read."""
    digest = hashlib.sha256()
    total = 0
    with _open_direct(device, MiB) as (fd, buf):
        while True:
            n = os.preadv(fd, [buf], total)
            if n <= 0:
                break
            digest.update(memoryview(buf)[:n])
            total += n
    return digest.hexdigest(), total


def writes_done(device: str) -> int:
    """Writes the block device completed (field 5 of /sys/block/<dev>/stat)."""
    return int(Path(f"/sys/block/{os.path.basename(device)}/stat").read_text().split()[4])
