"""Copy-on-write snapshots of one volume: before-image stores, reads, rollback, delete.

A snapshot is instant: creating it writes an empty before-image store. From then on the write
path calls `SnapshotSet.before_write(offset, length)` before every volume write or zero; for each
snapshot that has not yet preserved a chunk the range touches, the chunk's current bytes are
appended to that snapshot's store and made durable (fdatasync) before `before_write` returns
(`before_write_many` does the same for a batch of ranges with one record and one fdatasync per
snapshot: group commit for before-images). A
snapshot's image is therefore: the preserved chunk where there is one, else the live volume
(which has not changed there since the snapshot). The chunk size is the dirty-bitmap region size
(default 64 KiB); a snapshot's last chunk is short when its size is not a multiple.

Contract with the write path (the caller):
  * call `before_write` for the exact range of every volume write and zero, and start the volume
    write only after it returns (it may raise: then fail the write, the snapshot could not keep
    its before-image);
  * call `create` with no write in flight between its `before_write` and its volume write (the
    data path drains or pauses the volume's writes, which it does anyway to record the journal
    sequence the snapshot contains); a write already past `before_write` when the snapshot is
    created would otherwise land in the snapshot's image;
  * call `before_resize` before shrinking the volume.

Store file `<dir>/<name>.cow` (little-endian):

    header (64 bytes)  magic "TRSNAPCW" | version u32 | flags u32 | size_bytes u64 |
                       chunk_size u32 | block_size u32 | salt u64 | created_ns u64 | crc32c u32 |
                       zero padding
    records            magic "CoWr" | count u32 | payload_len u32 | crc32c u32 |
                       count x chunk_index u64 (strictly increasing) | the chunks' data

One record holds every chunk that one `before_write` preserves for one snapshot (up to
`MAX_RECORD_CHUNKS`) and is followed by one fdatasync. The record CRC covers the store's salt,
the header fields, the indices and the data, so a record copied from another store (a volume that
holds a snapshot store as data) never validates here. Deviation from a one-chunk-per-record
format, on purpose: with one fdatasync per batch, a crash can persist any subset of the batch's
pages; a single record makes the whole batch one unit that is either valid or a torn tail.

Recovery on open: records are scanned and the chunk index rebuilt. An invalid record with no
valid record after it is a torn tail (an append that never completed, so its chunks were never
overwritten) and is truncated; an invalid record followed by a valid one raises `SnapshotCorrupt`,
and so does an invalid record whose header is intact but is followed by non-zero bytes past its
declared end: a torn append is always the last thing written, so no data can lie beyond it (zeros
can: a crash may leave the file longer than what reached the disk).
Limitation: bit rot inside the very last record looks exactly like a torn append and is dropped.
"""

from __future__ import annotations

import mmap
import os
import secrets
import struct
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType

import crc32c

from targetd_repl.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    SnapshotCorrupt,
    SnapshotError,
    StorageError,
)
from targetd_repl.model import DEFAULT_REGION_SIZE, NAME_PATTERN, check_name
from targetd_repl.storage.bitmap import DirtyBitmap
from targetd_repl.storage.fileutil import TMP_INFIX, StrPath, atomic_write, fsync_dir, pwrite_all
from targetd_repl.storage.volume import Volume

STORE_SUFFIX = ".cow"
STORE_MAGIC = b"TRSNAPCW"
STORE_VERSION = 1
_STORE_HDR = struct.Struct("<8sIIQIIQQ")
_CRC = struct.Struct("<I")
STORE_HEADER_SIZE = 64
REC_MAGIC = b"CoWr"
_REC_HDR = struct.Struct("<4sIII")
MAX_RECORD_CHUNKS = 256  # 16 MiB of 64 KiB chunks per record: bounds memory and record size


def _check_chunk_size(chunk_size: int) -> None:
    if chunk_size < 4096 or chunk_size & (chunk_size - 1):
        raise InvalidArgument(f"invalid snapshot chunk size {chunk_size}: a power of two >= 4096")


class Snapshot:
    """One snapshot of a volume: its before-image store and reads of its image.

    Obtain from `SnapshotSet`; reads are safe concurrently with the set's writers.
    """

    __slots__ = (
        "_block_size",
        "_chunk_size",
        "_created_ns",
        "_end",
        "_failed",
        "_fd",
        "_index",
        "_name",
        "_path",
        "_readers",
        "_readers_done",
        "_salt",
        "_salt_crc",
        "_size",
        "_volume",
    )

    def __init__(
        self,
        path: Path,
        fd: int,
        volume: Volume,
        *,
        size_bytes: int,
        chunk_size: int,
        block_size: int,
        salt: int,
        created_ns: int,
    ) -> None:
        self._path = path
        self._name = path.name[: -len(STORE_SUFFIX)]
        self._fd = fd
        self._volume = volume
        self._size = size_bytes
        self._chunk_size = chunk_size
        self._block_size = block_size
        self._salt = salt
        self._salt_crc = crc32c.crc32c(struct.pack("<Q", salt))
        self._created_ns = created_ns
        self._index: dict[int, int] = {}  # chunk -> offset of its data in the store
        self._end = STORE_HEADER_SIZE  # where the next record goes
        self._failed: str | None = None
        self._readers = 0  # reads in progress: close waits for them (no fd-number reuse race)
        self._readers_done = threading.Condition(threading.Lock())

    # --- properties ----------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._name

    @property
    def path(self) -> Path:
        return self._path

    @property
    def size_bytes(self) -> int:
        """The volume's size when the snapshot was taken: the size of the snapshot's image."""
        return self._size

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def num_blocks(self) -> int:
        return self._size // self._block_size

    @property
    def chunk_size(self) -> int:
        return self._chunk_size

    @property
    def nchunks(self) -> int:
        return -(-self._size // self._chunk_size)

    @property
    def created_ns(self) -> int:
        return self._created_ns

    @property
    def stored_bytes(self) -> int:
        """Size of the before-image store on disk (header and records)."""
        return self._end

    @property
    def preserved_count(self) -> int:
        return len(self._index)

    def is_preserved(self, region: int) -> bool:
        return region in self._index

    def preserved_regions(self) -> list[int]:
        """Chunks (regions) the volume has overwritten since the snapshot, sorted."""
        return sorted(self._index)

    def preserved_bitmap(self) -> DirtyBitmap:
        """The preserved chunks as a bitmap over the snapshot's size (region = chunk)."""
        bm = DirtyBitmap(self._size, self._chunk_size)
        for region in list(self._index):
            bm.set_region(region)
        return bm

    def __repr__(self) -> str:
        return (
            f"Snapshot(name={self._name!r}, size_bytes={self._size}, "
            f"preserved={len(self._index)}/{self.nchunks})"
        )

    # --- reads ---------------------------------------------------------------------------------

    def read(self, lba: int, nblocks: int) -> bytes:
        """Read blocks of the snapshot's image (the volume as it was at snapshot time)."""
        limit = self.num_blocks
        if nblocks < 0:
            raise InvalidArgument(f"snapshot {self._name!r}: negative block count {nblocks}")
        if lba < 0 or lba + nblocks > limit:
            raise OutOfRange(
                f"snapshot {self._name!r}: LBA {lba} + {nblocks} blocks is past the end "
                f"(limit {limit} blocks)"
            )
        return self.read_bytes(lba * self._block_size, nblocks * self._block_size)

    def read_bytes(self, offset: int, length: int) -> bytes:
        """Read a byte range of the snapshot's image."""
        if length < 0:
            raise InvalidArgument(f"snapshot {self._name!r}: negative length {length}")
        if offset < 0 or offset + length > self._size:
            raise OutOfRange(
                f"snapshot {self._name!r}: byte range {offset} + {length} is past the end "
                f"(limit {self._size} bytes)"
            )
        out = bytearray(length)
        fd = self._enter_read()
        try:
            self._read_into(fd, offset, memoryview(out))
        finally:
            self._exit_read()
        return bytes(out)

    def _read_into(self, fd: int, offset: int, view: memoryview) -> None:
        cs = self._chunk_size
        end = offset + view.nbytes
        pos = offset
        index = self._index
        while pos < end:
            chunk = pos // cs
            stop = min((chunk + 1) * cs, end)
            if chunk in index:
                self._read_store(fd, chunk, pos, view[pos - offset : stop - offset])
                pos = stop
                continue
            # a run of chunks not preserved: read it from the live volume in one call
            first = chunk
            while stop < end and (stop // cs) not in index:
                stop = min(stop + cs, end)
            try:
                self._volume.preadinto(pos, view[pos - offset : stop - offset])
            except OutOfRange:
                # the volume shrank meanwhile: before_resize preserved the lost chunks first
                if any(c not in index for c in range(first, (stop - 1) // cs + 1)):
                    raise
            # check again after reading: a chunk preserved meanwhile may have been overwritten
            # after our read started, so its before-image in the store is the right data. A chunk
            # still not preserved now was not overwritten before our read (preservation precedes
            # every overwrite), so what we read is the snapshot's data.
            for c in range(first, (stop - 1) // cs + 1):
                if c in index:
                    s = max(c * cs, pos)
                    e = min((c + 1) * cs, stop)
                    self._read_store(fd, c, s, view[s - offset : e - offset])
            pos = stop

    def _read_store(self, fd: int, chunk: int, pos: int, dest: memoryview) -> None:
        at = self._index[chunk] + (pos - chunk * self._chunk_size)
        done = 0
        while done < dest.nbytes:
            n = os.preadv(fd, [dest[done:]], at + done)
            if n == 0:
                raise SnapshotCorrupt(
                    f"snapshot {self._name!r}: store {self._path} ends inside chunk {chunk}"
                )
            done += n

    def _fileno(self) -> int:
        fd = self._fd
        if fd < 0:
            raise StorageError(f"snapshot {self._name!r} is closed (deleted?)")
        return fd

    def _enter_read(self) -> int:
        with self._readers_done:
            fd = self._fileno()
            self._readers += 1
            return fd

    def _exit_read(self) -> None:
        with self._readers_done:
            self._readers -= 1
            if self._readers == 0:
                self._readers_done.notify_all()

    # --- store ---------------------------------------------------------------------------------

    def _chunk_len(self, chunk: int) -> int:
        return min(self._chunk_size, self._size - chunk * self._chunk_size)

    def _append(self, chunks: Sequence[int], datas: Sequence[bytes | memoryview]) -> None:
        """Append one record with `chunks` (sorted, not yet preserved) and make it durable.
        Caller holds the set's lock."""
        if self._failed is not None:
            raise SnapshotError(f"snapshot {self._name!r} cannot preserve data: {self._failed}")
        fd = self._fileno()
        indices = struct.pack(f"<{len(chunks)}Q", *chunks)
        payload_len = len(indices) + sum(len(d) for d in datas)
        head = _REC_HDR.pack(REC_MAGIC, len(chunks), payload_len, 0)[:12]
        crc = crc32c.crc32c(indices, crc32c.crc32c(head, self._salt_crc))
        for d in datas:
            crc = crc32c.crc32c(d, crc)
        record = b"".join((head, _CRC.pack(crc), indices, *datas))
        start = self._end
        try:
            pwrite_all(fd, record, start)
        except OSError as e:
            # cut the partial record off: a torn record followed later by a valid one would read
            # as corruption on the next open.
            try:
                os.ftruncate(fd, start)
            except OSError as e2:
                self._failed = f"append failed ({e}) and could not be undone ({e2})"
            raise SnapshotError(
                f"snapshot {self._name!r}: cannot write before-image to {self._path}: {e}"
            ) from e
        try:
            # fdatasync the before-image before returning: the overwrite must not reach the
            # disk before the data it replaces is safe in the store.
            os.fdatasync(fd)
        except OSError as e:
            # after a failed fdatasync the page cache state is unknown (the kernel may have
            # dropped the pages): refuse every later preservation, fail closed.
            self._failed = f"fdatasync failed: {e}"
            raise SnapshotError(
                f"snapshot {self._name!r}: cannot make before-image durable in {self._path}: {e}"
            ) from e
        self._end = start + len(record)
        pos = start + _REC_HDR.size + len(indices)
        for chunk, d in zip(chunks, datas, strict=True):
            # publish only after the record is durable: readers switch to the store from here.
            self._index[chunk] = pos
            pos += len(d)

    def _close(self) -> None:
        with self._readers_done:
            fd, self._fd = self._fd, -1
            # wait for reads in progress: closing under them could hand their fd number to
            # another file before they finish.
            while self._readers:
                self._readers_done.wait()
        if fd >= 0:
            os.close(fd)

    @classmethod
    def _create(cls, path: Path, volume: Volume, chunk_size: int) -> Snapshot:
        salt = secrets.randbits(64)
        created_ns = time.time_ns()
        fields = _STORE_HDR.pack(
            STORE_MAGIC,
            STORE_VERSION,
            0,
            volume.size_bytes,
            chunk_size,
            volume.block_size,
            salt,
            created_ns,
        )
        header = fields + _CRC.pack(crc32c.crc32c(fields))
        header += bytes(STORE_HEADER_SIZE - len(header))
        # atomic and durable (tmp, fsync, rename, fsync dir): after create returns, a crash
        # cannot lose the snapshot, so writes that follow may rely on it.
        atomic_write(path, header, mode=0o600)
        return cls._open(path, volume, chunk_size)

    @classmethod
    def _open(cls, path: Path, volume: Volume, chunk_size: int) -> Snapshot:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            snap = cls._from_header(path, fd, volume, chunk_size)
            snap._recover()
        except BaseException:
            os.close(fd)
            raise
        return snap

    @classmethod
    def _from_header(cls, path: Path, fd: int, volume: Volume, chunk_size: int) -> Snapshot:
        raw = os.pread(fd, STORE_HEADER_SIZE, 0)
        need = _STORE_HDR.size + _CRC.size
        if len(raw) < STORE_HEADER_SIZE:
            raise SnapshotCorrupt(f"snapshot store {path}: header is {len(raw)} bytes")
        (stored,) = _CRC.unpack_from(raw, _STORE_HDR.size)
        if crc32c.crc32c(raw[: _STORE_HDR.size]) != stored or any(raw[need:]):
            raise SnapshotCorrupt(f"snapshot store {path}: header checksum mismatch")
        magic, version, flags, size, csize, bsize, salt, created_ns = _STORE_HDR.unpack_from(raw)
        if magic != STORE_MAGIC or version != STORE_VERSION or flags != 0:
            raise SnapshotCorrupt(
                f"snapshot store {path}: bad magic {magic!r}, version {version} or flags {flags}"
            )
        if csize != chunk_size:
            raise SnapshotError(
                f"snapshot store {path}: chunk size {csize} differs from the set's {chunk_size}"
            )
        if bsize != volume.block_size or size <= 0 or size % bsize:
            raise SnapshotCorrupt(
                f"snapshot store {path}: size {size} / block size {bsize} do not fit volume "
                f"{volume.name!r} (block size {volume.block_size})"
            )
        return cls(
            path,
            fd,
            volume,
            size_bytes=size,
            chunk_size=csize,
            block_size=bsize,
            salt=salt,
            created_ns=created_ns,
        )

    def _parse_header(self, buf: mmap.mmap, pos: int, end: int) -> tuple[list[int], int] | None:
        """The chunk list and declared end of the record at `pos` if its header and index are
        self-consistent (the CRC is not checked), else None."""
        hsize = _REC_HDR.size
        if end - pos < hsize:
            return None
        magic, count, payload_len, _ = _REC_HDR.unpack_from(buf, pos)
        if magic != REC_MAGIC or count == 0 or count > MAX_RECORD_CHUNKS:
            return None
        idx_end = pos + hsize + 8 * count
        if idx_end > end:
            return None
        chunks = list(struct.unpack_from(f"<{count}Q", buf, pos + hsize))
        nchunks = self.nchunks
        prev = -1
        data_len = 0
        for c in chunks:
            if c <= prev or c >= nchunks:
                return None
            prev = c
            data_len += self._chunk_len(c)
        if payload_len != 8 * count + data_len:
            return None
        return chunks, idx_end + data_len

    def _parse(self, buf: mmap.mmap, pos: int, end: int) -> tuple[list[int], int, int] | None:
        """Validate the record at `pos`; return (chunks, data offset, next record offset), or
        None if there is no valid record there."""
        head = self._parse_header(buf, pos, end)
        if head is None:
            return None
        chunks, rec_end = head
        if rec_end > end:
            return None
        idx_end = pos + _REC_HDR.size + 8 * len(chunks)
        (stored,) = struct.unpack_from("<I", buf, pos + 12)
        view = memoryview(buf)
        try:
            crc = crc32c.crc32c(view[pos : pos + 12], self._salt_crc)
            crc = crc32c.crc32c(view[pos + _REC_HDR.size : rec_end], crc)
        finally:
            view.release()
        if crc != stored:
            return None
        return chunks, idx_end, rec_end

    def _recover(self) -> None:
        """Scan the store, rebuild the index, truncate a torn tail, detect corruption."""
        fd = self._fd
        end = os.fstat(fd).st_size
        if end <= STORE_HEADER_SIZE:
            return
        with mmap.mmap(fd, end, prot=mmap.PROT_READ) as buf:
            pos = STORE_HEADER_SIZE
            while pos < end:
                rec = self._parse(buf, pos, end)
                if rec is None:
                    break
                chunks, data_at, nxt = rec
                for c in chunks:
                    # keep the first before-image of a chunk: it is the one from snapshot time.
                    self._index.setdefault(c, data_at)
                    data_at += self._chunk_len(c)
                pos = nxt
            if pos < end:
                head = self._parse_header(buf, pos, end)
                if head is not None and head[1] < end and not _all_zero(buf, head[1], end):
                    # a torn append is the last write: data past its declared end means damage
                    raise SnapshotCorrupt(
                        f"snapshot {self._name!r}: invalid record at offset {pos} of "
                        f"{self._path} ends at {head[1]} but the store goes on to {end}"
                    )
                probe = buf.find(REC_MAGIC, pos + 1)
                while probe != -1:
                    if self._parse(buf, probe, end) is not None:
                        raise SnapshotCorrupt(
                            f"snapshot {self._name!r}: invalid record at offset {pos} of "
                            f"{self._path} is followed by a valid record at {probe}"
                        )
                    probe = buf.find(REC_MAGIC, probe + 1)
        if pos < end:
            # a torn tail: cut it (durably) so the next record starts on a record boundary.
            os.ftruncate(fd, pos)
            os.fsync(fd)
        self._end = pos


def _all_zero(buf: mmap.mmap, start: int, end: int) -> bool:
    """True if buf[start:end] holds only zero bytes (read a MiB at a time)."""
    for at in range(start, end, 1 << 20):
        if buf[at : min(end, at + (1 << 20))].strip(b"\0"):
            return False
    return True


class SnapshotSet:
    """All snapshots of one volume, stored as `<directory>/<name>.cow`, behind one lock."""

    def __init__(
        self, directory: StrPath, volume: Volume, *, chunk_size: int = DEFAULT_REGION_SIZE
    ) -> None:
        _check_chunk_size(chunk_size)
        if chunk_size % volume.block_size:
            raise InvalidArgument(
                f"snapshot chunk size {chunk_size} is not a multiple of volume "
                f"{volume.name!r}'s block size {volume.block_size}"
            )
        self._dir = Path(directory)
        self._volume = volume
        self._chunk_size = chunk_size
        self._lock = threading.Lock()
        self._snaps: dict[str, Snapshot] = {}
        self._dir.mkdir(parents=True, exist_ok=True)
        try:
            for stale in self._dir.glob(f"*{STORE_SUFFIX}{TMP_INFIX}*"):  # crashed creations
                stale.unlink(missing_ok=True)
            for path in sorted(self._dir.glob(f"*{STORE_SUFFIX}")):
                if not NAME_PATTERN.fullmatch(path.name[: -len(STORE_SUFFIX)]):
                    continue  # not a name this class creates: not ours
                snap = Snapshot._open(path, volume, chunk_size)
                self._snaps[snap.name] = snap
        except BaseException:
            self.close()
            raise

    @property
    def directory(self) -> Path:
        return self._dir

    @property
    def volume(self) -> Volume:
        return self._volume

    @property
    def chunk_size(self) -> int:
        return self._chunk_size

    @property
    def has_active(self) -> bool:
        """True when at least one snapshot exists: the write path may skip `before_write`
        entirely when False (a dict truth test, no lock)."""
        return bool(self._snaps)

    def close(self) -> None:
        with self._lock:
            for snap in self._snaps.values():
                snap._close()
            self._snaps.clear()

    def __enter__(self) -> SnapshotSet:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- catalogue -----------------------------------------------------------------------------

    def _path_of(self, name: str) -> Path:
        return self._dir / f"{check_name('snapshot', name)}{STORE_SUFFIX}"

    def create(self, name: str) -> Snapshot:
        """Take a snapshot now (see the module contract: no write in flight)."""
        path = self._path_of(name)
        with self._lock:
            if name in self._snaps or path.exists():
                raise AlreadyExists(
                    f"snapshot {name!r} of volume {self._volume.name!r} already exists"
                )
            # flush the volume first: every chunk not yet preserved is read from the live volume,
            # so the data the snapshot contains must be durable before the snapshot exists.
            self._volume.flush()
            snap = Snapshot._create(path, self._volume, self._chunk_size)
            # publish last: before_write starts preserving for it only once its store is durable.
            self._snaps[name] = snap
            return snap

    def get(self, name: str) -> Snapshot:
        try:
            return self._snaps[name]
        except KeyError:
            raise NotFound(
                f"snapshot {name!r} of volume {self._volume.name!r} does not exist"
            ) from None

    def list(self) -> list[Snapshot]:
        """Snapshots, oldest first."""
        return sorted(self._snaps.values(), key=lambda s: (s.created_ns, s.name))

    def __contains__(self, name: object) -> bool:
        return name in self._snaps

    def delete(self, name: str) -> None:
        """Delete a snapshot and its store. Its readers get an error afterwards."""
        with self._lock:
            snap = self._snaps.pop(name, None)
            if snap is None:
                raise NotFound(f"snapshot {name!r} of volume {self._volume.name!r} does not exist")
            snap._close()
            snap.path.unlink(missing_ok=True)
            # fsync the directory: a deletion reported done must not come back after a crash.
            fsync_dir(self._dir)

    # --- the write path ------------------------------------------------------------------------

    def before_write(self, offset: int, length: int) -> int:
        """Preserve, in every snapshot that lacks them, the chunks that bytes [offset,
        offset+length) of the volume touch; return the number of (snapshot, chunk) pairs
        preserved. Durable on return. MUST precede every volume write and zero; the caller's
        volume write starts only after this returns."""
        snaps = tuple(self._snaps.values())  # an atomic copy: create/delete may run meanwhile
        if length <= 0 or offset < 0 or offset + length > self._volume.size_bytes:
            self._check_range(offset, length)
            return 0  # an empty range
        if not snaps:  # fast path: no snapshot, nothing to keep
            return 0
        cs = self._chunk_size
        first = offset // cs
        last = (offset + length - 1) // cs
        # lock-free check first: a published chunk stays preserved for good (the store is
        # append-only), so when every snapshot has them there is nothing to wait for, not even
        # another writer's fdatasync.
        if first == last:  # the common case, kept cheap: one dict lookup per snapshot
            for s in snaps:
                if first not in s._index and first < s.nchunks:
                    break
            else:
                return 0
        elif all(c in s._index for s in snaps for c in range(first, min(last + 1, s.nchunks))):
            return 0
        # hold the lock across check and preserve: two writers of one chunk must not both copy
        # it, and neither may overwrite it before the first copy is durable.
        with self._lock:
            return self._preserve_locked(offset, length)

    def before_write_many(self, ranges: Sequence[tuple[int, int]]) -> int:
        """`before_write` for several (offset, length) ranges at once - one batch of the write
        path - with one record and one fdatasync per snapshot (per MAX_RECORD_CHUNKS chunks)
        for all the chunks they touch, instead of one per range: group commit for
        before-images. Durable on return; the caller's volume writes of ALL the ranges start
        only after this returns (then every chunk still holds its content from before the
        batch, whatever order the writes overlap in). Meant for ranges whose data is in
        memory (the chunk list is built whole). Returns (snapshot, chunk) pairs preserved."""
        if len(ranges) == 1:
            offset, length = ranges[0]
            return self.before_write(offset, length)
        snaps = tuple(self._snaps.values())  # an atomic copy: create/delete may run meanwhile
        size = self._volume.size_bytes
        for offset, length in ranges:
            if length <= 0 or offset < 0 or offset + length > size:
                self._check_range(offset, length)  # raises unless the range is empty
        if not snaps:  # fast path: no snapshot, nothing to keep
            return 0
        cs = self._chunk_size
        chunks = sorted(
            {
                c
                for offset, length in ranges
                if length > 0
                for c in range(offset // cs, (offset + length - 1) // cs + 1)
            }
        )
        # lock-free check first, as in before_write: published chunks stay preserved.
        if all(c in s._index or c >= s.nchunks for s in snaps for c in chunks):
            return 0
        # hold the lock across check and preserve (see before_write).
        with self._lock:
            done = 0
            for lo in range(0, len(chunks), MAX_RECORD_CHUNKS):
                done += self._preserve_chunks(chunks[lo : lo + MAX_RECORD_CHUNKS])
            return done

    def before_resize(self, new_size_bytes: int) -> int:
        """Call before resizing the volume: when shrinking, preserve the chunks past the new
        end for every snapshot (the shrink destroys them)."""
        old = self._volume.size_bytes
        if new_size_bytes >= old:
            return 0
        if new_size_bytes < 0:
            raise InvalidArgument(f"volume {self._volume.name!r}: negative size {new_size_bytes}")
        return self.before_write(new_size_bytes, old - new_size_bytes)

    def _check_range(self, offset: int, length: int) -> None:
        size = self._volume.size_bytes
        if length < 0:
            raise InvalidArgument(
                f"volume {self._volume.name!r}: negative length {length} at offset {offset}"
            )
        if offset < 0 or offset + length > size:
            raise OutOfRange(
                f"volume {self._volume.name!r}: byte range {offset} + {length} is past the end "
                f"(limit {size} bytes)"
            )

    def _preserve_locked(self, offset: int, length: int) -> int:
        cs = self._chunk_size
        first = offset // cs
        last = (offset + length - 1) // cs
        done = 0
        for lo in range(first, last + 1, MAX_RECORD_CHUNKS):
            done += self._preserve_chunks(range(lo, min(lo + MAX_RECORD_CHUNKS, last + 1)))
        return done

    def _preserve_chunks(self, chunks: Sequence[int]) -> int:
        """Preserve chunks (sorted, at most MAX_RECORD_CHUNKS) in every snapshot lacking them:
        one record and one fdatasync per snapshot."""
        cs = self._chunk_size
        needs: list[tuple[Snapshot, list[int]]] = []
        want: dict[int, int] = {}  # chunk -> bytes to read from the volume
        for snap in self._snaps.values():
            lim = snap.nchunks
            todo = [c for c in chunks if c < lim and c not in snap._index]
            if todo:
                needs.append((snap, todo))
                for c in todo:
                    want[c] = max(want.get(c, 0), snap._chunk_len(c))
        if not needs:
            return 0
        vol = self._volume
        data = {c: vol.pread(c * cs, n) for c, n in want.items()}
        done = 0
        for snap, todo in needs:
            datas = [memoryview(data[c])[: snap._chunk_len(c)] for c in todo]
            snap._append(todo, datas)
            done += len(todo)
        return done

    # --- rollback ------------------------------------------------------------------------------

    def rollback(self, name: str, regions: Iterable[int] | None = None) -> int:
        """Copy the snapshot's preserved chunks back to the volume (only `regions` if given;
        chunks never preserved already hold the snapshot's data). Other snapshots keep their
        images (the overwrite goes through before_write). Idempotent: after a crash, run it
        again. Durable on return. Returns the number of chunks copied."""
        with self._lock:
            snap = self.get(name)
            vol = self._volume
            if vol.size_bytes < snap.size_bytes:
                raise FailedPrecondition(
                    f"volume {vol.name!r} ({vol.size_bytes} bytes) is smaller than snapshot "
                    f"{name!r} ({snap.size_bytes} bytes): grow it back before a rollback"
                )
            nchunks = snap.nchunks
            if regions is None:
                chunks = sorted(snap._index)
            else:
                wanted = sorted(set(regions))
                for r in wanted:
                    if r < 0 or r >= nchunks:
                        raise OutOfRange(
                            f"snapshot {name!r}: region {r} out of range (limit {nchunks})"
                        )
                chunks = [r for r in wanted if r in snap._index]
            fd = snap._fileno()
            cs = self._chunk_size
            buf = bytearray(cs)
            for c in chunks:
                n = snap._chunk_len(c)
                # preserve what the rollback overwrites in every other snapshot first: their
                # images must not change.
                self._preserve_locked(c * cs, n)
                view = memoryview(buf)[:n]
                snap._read_store(fd, c, c * cs, view)
                vol.pwrite(c * cs, view)
            # flush before reporting success: a finished rollback must survive a crash.
            vol.flush()
            return len(chunks)
