"""Backends for tests, demos and the lab before the storage engine is wired in.

`MemoryBackend` keeps the volume in a bytearray (fast, lost with the process). `FileBackend`
keeps it in a file with `os.preadv`/`os.pwritev` and `O_DSYNC`, so a handler killed with -9 and
restarted still has every acknowledged write (what the lab's kill -9 scenario needs). Neither
journals anything: the real backend is the storage engine's Volume.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence

from targetd_repl.datapath.backend import VolumeIdentity
from targetd_repl.errors import InvalidArgument, OutOfRange, WriteProtected

_ZERO_CHUNK = bytes(1 << 20)


class _BlockBackend:
    def __init__(
        self, name: str, num_blocks: int, block_size: int, identity: VolumeIdentity | None
    ) -> None:
        if block_size not in (512, 4096):
            raise InvalidArgument(f"volume {name!r}: block size {block_size} is not 512 or 4096")
        if num_blocks <= 0:
            raise InvalidArgument(f"volume {name!r}: size must be at least one block")
        self.name = name
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.identity = identity or VolumeIdentity.from_name(name)
        self.writable = True
        self.flushes = 0

    def _check(self, lba: int, nbytes: int, *, write: bool) -> int:
        if write and not self.writable:
            raise WriteProtected(f"volume {self.name!r} is read-only")
        if nbytes % self.block_size:
            raise InvalidArgument(f"volume {self.name!r}: {nbytes} bytes is not whole blocks")
        nblocks = nbytes // self.block_size
        if lba < 0 or lba + nblocks > self.num_blocks:
            raise OutOfRange(
                f"volume {self.name!r}: blocks {lba}+{nblocks} past the end ({self.num_blocks})"
            )
        return lba * self.block_size


class MemoryBackend(_BlockBackend):
    """A volume in memory. `writable` may be flipped at any time (promotion / demotion)."""

    def __init__(
        self,
        name: str,
        size_bytes: int,
        *,
        block_size: int = 512,
        identity: VolumeIdentity | None = None,
    ) -> None:
        super().__init__(name, size_bytes // block_size, block_size, identity)
        self.image = bytearray(self.num_blocks * block_size)
        self._view = memoryview(self.image)

    def readinto(self, lba: int, buffers: Sequence[memoryview]) -> None:
        pos = self._check(lba, sum(map(len, buffers)), write=False)
        view = self._view
        for buf in buffers:
            n = len(buf)
            buf[:] = view[pos : pos + n]
            pos += n

    def write(self, lba: int, buffers: Sequence[memoryview]) -> None:
        pos = self._check(lba, sum(map(len, buffers)), write=True)
        view = self._view
        for buf in buffers:
            n = len(buf)
            view[pos : pos + n] = buf
            pos += n

    def write_zeros(self, lba: int, nblocks: int) -> None:
        pos = self._check(lba, nblocks * self.block_size, write=True)
        end = pos + nblocks * self.block_size
        while pos < end:
            n = min(len(_ZERO_CHUNK), end - pos)
            self._view[pos : pos + n] = _ZERO_CHUNK[:n]
            pos += n

    def flush(self) -> None:
        self.flushes += 1


class FileBackend(_BlockBackend):
    """A volume in a regular file, written with O_DSYNC (durable when `write` returns)."""

    def __init__(
        self,
        name: str,
        path: str,
        *,
        size_bytes: int | None = None,
        block_size: int = 512,
        identity: VolumeIdentity | None = None,
    ) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_DSYNC | os.O_CLOEXEC, 0o600)
        try:
            if size_bytes is not None and os.fstat(fd).st_size != size_bytes:
                os.ftruncate(fd, size_bytes)
            size = os.fstat(fd).st_size
            super().__init__(name, size // block_size, block_size, identity)
        except BaseException:
            os.close(fd)
            raise
        self.path = path
        self._fd = fd
        self._lock = threading.Lock()

    def readinto(self, lba: int, buffers: Sequence[memoryview]) -> None:
        total = sum(len(b) for b in buffers)
        pos = self._check(lba, total, write=False)
        done = os.preadv(self._fd, buffers, pos)
        if done != total:  # a short read means the file shrank under us: read the rest as zeros
            _zero_from(buffers, done)

    def write(self, lba: int, buffers: Sequence[memoryview]) -> None:
        total = sum(len(b) for b in buffers)
        pos = self._check(lba, total, write=True)
        done = os.pwritev(self._fd, buffers, pos)
        if done != total:
            raise OSError(f"volume {self.name!r}: short write {done} of {total} bytes")

    def write_zeros(self, lba: int, nblocks: int) -> None:
        pos = self._check(lba, nblocks * self.block_size, write=True)
        end = pos + nblocks * self.block_size
        while pos < end:
            n = min(len(_ZERO_CHUNK), end - pos)
            pos += os.pwrite(self._fd, memoryview(_ZERO_CHUNK)[:n], pos)

    def flush(self) -> None:
        self.flushes += 1
        os.fdatasync(self._fd)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def _zero_from(buffers: Sequence[memoryview], start: int) -> None:
    pos = 0
    for buf in buffers:
        n = len(buf)
        if pos + n > start:
            lo = max(0, start - pos)
            buf[lo:] = _ZERO_CHUNK[: n - lo] if n - lo <= len(_ZERO_CHUNK) else bytes(n - lo)
        pos += n
