"""Crash-safe file helpers shared by the storage engine: atomic replace, directory fsync, and
full-length positional writes.

`atomic_write` is the one way this project replaces a small file (bitmaps, snapshot store
headers, settings): after a crash the path holds either the complete old content or the complete
new content, never a mix. A crash may leave a stray temporary file `<name>.tmp-*` beside it;
`remove_stale_temps` deletes those and is safe to call at open time.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterable
from pathlib import Path

StrPath = str | os.PathLike[str]

TMP_INFIX = ".tmp-"


def fsync_dir(path: StrPath) -> None:
    """fsync a directory, making the creation, rename or removal of its entries durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    """Write all of `data` at `offset`, looping over short writes (no seek, thread-safe)."""
    view = memoryview(data).cast("B")
    done = 0
    total = len(view)
    while done < total:
        n = os.pwrite(fd, view[done:], offset + done)
        if n <= 0:  # pragma: no cover - pwrite raises on errors; 0 would loop forever
            raise OSError(f"pwrite wrote {n} bytes at offset {offset + done}")
        done += n


def atomic_write(
    path: StrPath,
    data: bytes | bytearray | memoryview | Iterable[bytes | bytearray | memoryview],
    *,
    mode: int = 0o644,
) -> None:
    """Replace `path` with `data` atomically and durably.

    Steps: write a temporary file in the same directory, fsync it, rename it over `path`, fsync
    the directory. `data` may be one buffer or an iterable of buffers written back to back.
    """
    target = Path(path)
    directory = target.parent
    tmp = directory / f"{target.name}{TMP_INFIX}{os.getpid()}-{secrets.token_hex(4)}"
    chunks: Iterable[bytes | bytearray | memoryview] = (
        (data,) if isinstance(data, bytes | bytearray | memoryview) else data
    )
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        try:
            offset = 0
            for chunk in chunks:
                pwrite_all(fd, chunk, offset)
                offset += memoryview(chunk).nbytes
            # fsync the content before the rename: otherwise a crash could expose the new name
            # pointing at a file whose data never reached the disk (zero-length or holes).
            os.fsync(fd)
        finally:
            os.close(fd)
        # rename is the commit point: readers see the old file or the new one, never a mix.
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    # fsync the directory after the rename: the rename itself lives in the directory entry.
    fsync_dir(directory)


def remove_stale_temps(path: StrPath) -> list[Path]:
    """Delete temporary files that a crashed `atomic_write(path, ...)` left; return them."""
    target = Path(path)
    removed: list[Path] = []
    for stale in target.parent.glob(f"{target.name}{TMP_INFIX}*"):
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()
            removed.append(stale)
    return removed
