"""A volume: a fixed-size sparse file addressed by logical block (LBA).

`Volume` owns one file descriptor and does all I/O with positional calls (os.pread, os.pwrite,
os.preadv), so one instance is safe to share between threads without locking. Every request is
validated before it touches the file: a request past the end raises `OutOfRange`, a length that is
not a whole number of blocks raises `Misaligned`; both name the volume, the LBA and the limit.

Durability: writes land in the page cache; `flush()` (fdatasync) makes them durable. The data path
calls it for SYNCHRONIZE CACHE and whenever it must order volume data before something else.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import threading
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from targetd_repl.errors import (
    AlreadyExists,
    InvalidArgument,
    Misaligned,
    NotFound,
    OutOfRange,
    StorageError,
)
from targetd_repl.model import BLOCK_SIZES
from targetd_repl.storage.fileutil import StrPath, fsync_dir, pwrite_all

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
_ZERO_CHUNK = 1 << 20  # bytes written per call when hole punching is not supported


class _Fallocate:
    """fallocate(2) through ctypes: the os module has no call that takes a mode."""

    _lock = threading.Lock()
    _func: Callable[[int, int, int, int], int] | None = None
    _loaded = False

    @classmethod
    def get(cls) -> Callable[[int, int, int, int], int] | None:
        with cls._lock:
            if not cls._loaded:
                cls._loaded = True
                name = ctypes.util.find_library("c")
                try:
                    libc = ctypes.CDLL(name, use_errno=True)
                    func = libc.fallocate
                except (OSError, AttributeError):
                    func = None
                if func is not None:
                    func.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
                    func.restype = ctypes.c_int
                cls._func = func
            return cls._func


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Deallocate a byte range (it reads as zeros afterwards); False if unsupported here."""
    func = _Fallocate.get()
    if func is None:
        return False
    rc = func(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        return False
    raise OSError(err, f"fallocate(PUNCH_HOLE) failed: {os.strerror(err)}")


def _check_block_size(block_size: int) -> None:
    if block_size not in BLOCK_SIZES:
        raise InvalidArgument(
            f"invalid block size {block_size}: use one of {', '.join(map(str, BLOCK_SIZES))}"
        )


class Volume:
    """A named block device stored as a sparse file. Create with `create`, reopen with `open`."""

    __slots__ = ("_block_size", "_fd", "_name", "_path", "_punch_ok", "_resize_lock", "_size")

    def __init__(self, path: Path, fd: int, size_bytes: int, block_size: int) -> None:
        self._path = path
        self._name = path.stem
        self._fd = fd
        self._size = size_bytes
        self._block_size = block_size
        self._punch_ok = True
        self._resize_lock = threading.Lock()

    # --- lifecycle ---------------------------------------------------------------------------

    @classmethod
    def create(cls, path: StrPath, *, size_bytes: int, block_size: int) -> Volume:
        """Create a new sparse volume file; AlreadyExists if `path` exists."""
        _check_block_size(block_size)
        p = Path(path)
        if size_bytes <= 0 or size_bytes % block_size:
            raise InvalidArgument(
                f"volume {p.stem!r}: size {size_bytes} must be a positive multiple of the "
                f"block size {block_size}"
            )
        try:
            fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            raise AlreadyExists(f"volume {p.stem!r}: file {p} already exists") from None
        try:
            os.ftruncate(fd, size_bytes)  # sparse: no blocks are allocated
            # fsync the file (its size) and then the directory (its name): a volume reported
            # as created must survive a crash.
            os.fsync(fd)
            fsync_dir(p.parent)
        except BaseException:
            os.close(fd)
            p.unlink(missing_ok=True)
            raise
        return cls(p, fd, size_bytes, block_size)

    @classmethod
    def open(cls, path: StrPath, *, block_size: int) -> Volume:
        """Open an existing volume file. The block size is not stored in the file: pass it."""
        _check_block_size(block_size)
        p = Path(path)
        try:
            fd = os.open(p, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotFound(f"volume {p.stem!r}: file {p} does not exist") from None
        try:
            size = os.fstat(fd).st_size
            if size % block_size:
                raise Misaligned(
                    f"volume {p.stem!r}: file size {size} is not a multiple of the block size "
                    f"{block_size}"
                )
        except BaseException:
            os.close(fd)
            raise
        return cls(p, fd, size, block_size)

    def close(self) -> None:
        """Close the file. Call only when no I/O is in flight on this instance."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> Volume:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Volume(name={self._name!r}, size_bytes={self._size}, block_size={self._block_size})"
        )

    # --- properties ----------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._name

    @property
    def path(self) -> Path:
        return self._path

    @property
    def size_bytes(self) -> int:
        return self._size

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def num_blocks(self) -> int:
        return self._size // self._block_size

    @property
    def closed(self) -> bool:
        return self._fd < 0

    # --- validation ----------------------------------------------------------------------------

    def _fileno(self) -> int:
        fd = self._fd
        if fd < 0:
            raise StorageError(f"volume {self._name!r} is closed")
        return fd

    def check_range(self, lba: int, nblocks: int) -> int:
        """Validate a block range; return its byte offset."""
        limit = self._size // self._block_size
        if nblocks < 0:
            raise InvalidArgument(
                f"volume {self._name!r}: negative block count {nblocks} at LBA {lba}"
            )
        if lba < 0 or lba + nblocks > limit:
            raise OutOfRange(
                f"volume {self._name!r}: LBA {lba} + {nblocks} blocks is past the end "
                f"(limit {limit} blocks)"
            )
        return lba * self._block_size

    def blocks_of(self, lba: int, length: int) -> int:
        """The number of whole blocks in `length` bytes; Misaligned if it is not whole."""
        bs = self._block_size
        if length % bs:
            raise Misaligned(
                f"volume {self._name!r}: length {length} at LBA {lba} is not a multiple of "
                f"the block size {bs}"
            )
        return length // bs

    def _check_bytes(self, offset: int, length: int) -> None:
        if length < 0:
            raise InvalidArgument(
                f"volume {self._name!r}: negative length {length} at offset {offset}"
            )
        if offset < 0 or offset + length > self._size:
            raise OutOfRange(
                f"volume {self._name!r}: byte range {offset} + {length} is past the end "
                f"(limit {self._size} bytes)"
            )

    # --- block I/O -----------------------------------------------------------------------------

    def read(self, lba: int, nblocks: int) -> bytes:
        """Read `nblocks` blocks starting at `lba`."""
        offset = self.check_range(lba, nblocks)
        return self._pread(offset, nblocks * self._block_size)

    def readinto(self, lba: int, buf: bytearray | memoryview) -> None:
        """Fill `buf` (a whole number of blocks long) with the blocks starting at `lba`."""
        view = memoryview(buf).cast("B")
        offset = self.check_range(lba, self.blocks_of(lba, view.nbytes))
        self._preadinto(offset, view)

    def write(self, lba: int, data: bytes | bytearray | memoryview) -> None:
        """Write `data` (a whole number of blocks long) starting at `lba`."""
        view = memoryview(data).cast("B")
        offset = self.check_range(lba, self.blocks_of(lba, view.nbytes))
        pwrite_all(self._fileno(), view, offset)

    def write_zeros(self, lba: int, nblocks: int) -> None:
        """Make blocks read as zeros, deallocating them where the filesystem can punch holes."""
        offset = self.check_range(lba, nblocks)
        length = nblocks * self._block_size
        if length == 0:
            return
        fd = self._fileno()
        if self._punch_ok:
            if punch_hole(fd, offset, length):
                return
            self._punch_ok = False  # remember: this filesystem cannot punch holes
        zeros = bytes(min(length, _ZERO_CHUNK))
        done = 0
        while done < length:
            n = min(length - done, len(zeros))
            pwrite_all(fd, memoryview(zeros)[:n], offset + done)
            done += n

    # --- byte I/O (region copies: bounds-checked, no block alignment required) ----------------

    def pread(self, offset: int, length: int) -> bytes:
        self._check_bytes(offset, length)
        return self._pread(offset, length)

    def preadinto(self, offset: int, buf: bytearray | memoryview) -> None:
        view = memoryview(buf).cast("B")
        self._check_bytes(offset, view.nbytes)
        self._preadinto(offset, view)

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        self._check_bytes(offset, view.nbytes)
        pwrite_all(self._fileno(), view, offset)

    def _pread(self, offset: int, length: int) -> bytes:
        fd = self._fileno()
        data = os.pread(fd, length, offset)
        if len(data) == length:
            return data
        buf = bytearray(length)
        self._preadinto(offset, memoryview(buf))
        return bytes(buf)

    def _preadinto(self, offset: int, view: memoryview) -> None:
        fd = self._fileno()
        done = 0
        total = view.nbytes
        while done < total:
            n = os.preadv(fd, [view[done:]], offset + done)
            if n == 0:
                raise StorageError(
                    f"volume {self._name!r}: file {self._path} ends at {offset + done}, "
                    f"before its size {self._size} (truncated outside the controller?)"
                )
            done += n

    # --- size and durability -------------------------------------------------------------------

    def flush(self) -> None:
        """Make every completed write durable (fdatasync)."""
        os.fdatasync(self._fileno())

    def resize(self, new_size_bytes: int) -> None:
        """Grow (new space reads as zeros, sparse) or shrink the volume.

        Callers with snapshots must call `SnapshotSet.before_resize` first when shrinking.
        """
        bs = self._block_size
        if new_size_bytes <= 0 or new_size_bytes % bs:
            raise InvalidArgument(
                f"volume {self._name!r}: new size {new_size_bytes} must be a positive multiple "
                f"of the block size {bs}"
            )
        with self._resize_lock:
            fd = self._fileno()
            old = self._size
            if new_size_bytes < old:
                # publish the smaller size first: no new request may reach the cut-off range.
                self._size = new_size_bytes
            try:
                os.ftruncate(fd, new_size_bytes)
                # fsync, not fdatasync: the size is the change we need durable.
                os.fsync(fd)
            except BaseException:
                # the file may or may not have changed: never claim more than it holds.
                actual = os.fstat(fd).st_size
                self._size = min(old, actual - actual % bs)
                raise
            self._size = new_size_bytes
