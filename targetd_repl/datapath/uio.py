"""The uio character device of one TCMU LUN: open, mmap, and the 4-byte doorbell protocol.

* `mmap(/dev/uioN, size of maps/map0, MAP_SHARED, offset 0)` is the whole shared region:
  mailbox, command ring, data area (see ring.py).
* A 4-byte `read()` blocks until the kernel signals (uio event count changed since our last read);
  we poll() the fd first so a stop request can interrupt the wait.
* A 4-byte `write()` tells the kernel that cmd_tail moved (it reaps the completed entries).

`Doorbell` is the small interface the runner uses; `FdDoorbell` implements it on any fd with
those semantics (a uio fd in production, a socket in tests), `fake_kernel.FakeDoorbell` in
memory.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import select
from typing import Protocol

log = logging.getLogger(__name__)

_KICK = b"\0\0\0\0"


class DeviceGone(OSError):
    """The uio device went away (LUN deleted, module unloaded): stop serving it."""


class Doorbell(Protocol):
    def wait(self, timeout: float | None) -> bool:
        """Block until the kernel signals, `interrupt` is called, or `timeout` passes. True when
        the kernel signalled. Called by one thread only."""
        ...

    def kick(self) -> None:
        """Tell the kernel cmd_tail moved. Any thread."""
        ...

    def interrupt(self) -> None:
        """Wake a thread blocked in `wait` (it returns False). Any thread."""
        ...


class FdDoorbell:
    """The uio doorbell over a file descriptor: 4-byte read to consume an event, 4-byte write
    to kick. The fd should be non-blocking; the caller owns (and closes) it."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._poller = select.poll()
        self._poller.register(fd, select.POLLIN)
        self._poller.register(self._wake_r, select.POLLIN)
        self.kicks = 0
        self.events = 0

    def wait(self, timeout: float | None) -> bool:
        ms = None if timeout is None else max(0, int(timeout * 1000))
        kicked = False
        for fd, ev in self._poller.poll(ms):
            if fd == self._fd:
                if ev & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
                    raise DeviceGone(f"uio fd {fd}: poll events {ev:#x}")
                try:
                    data = os.read(fd, 4)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    raise DeviceGone(f"uio fd {fd}: read failed: {exc}") from exc
                if len(data) != 4:
                    raise DeviceGone(f"uio fd {fd}: read returned {len(data)} bytes")
                self.events += 1
                kicked = True
            else:
                try:
                    while os.read(self._wake_r, 64):
                        pass
                except BlockingIOError:
                    pass
        return kicked

    def kick(self) -> None:
        try:
            written = os.write(self._fd, _KICK)
        except BlockingIOError:
            return  # the kernel is already being woken
        except OSError as exc:
            raise DeviceGone(f"uio fd {self._fd}: write failed: {exc}") from exc
        if written != 4:
            raise DeviceGone(f"uio fd {self._fd}: short write {written}")
        self.kicks += 1

    def interrupt(self) -> None:
        with contextlib.suppress(BlockingIOError):  # a wake-up is already pending
            os.write(self._wake_w, b"x")

    def close(self) -> None:
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)


class UioDevice:
    """/dev/uioN opened and mapped. `buffer` is the shared map (give it to `ring.Ring`)."""

    def __init__(self, devnode: str, map_size: int) -> None:
        self.devnode = devnode
        self.map_size = map_size
        self._fd = os.open(devnode, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            self.buffer = mmap.mmap(
                self._fd,
                map_size,
                flags=mmap.MAP_SHARED,
                prot=mmap.PROT_READ | mmap.PROT_WRITE,
                offset=0,
            )
        except BaseException:
            os.close(self._fd)
            raise
        self.doorbell = FdDoorbell(self._fd)

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        self.doorbell.close()
        try:
            self.buffer.close()
        except BufferError:
            # a view into the map is still alive somewhere: the map goes when it is collected
            log.warning("%s: map still referenced at close; left to the garbage collector", self)
        with contextlib.suppress(OSError):
            os.close(self._fd)

    def __repr__(self) -> str:
        return f"UioDevice({self.devnode!r}, {self.map_size})"
