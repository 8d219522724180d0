"""A stand-in for the kernel side of TCMU, for tests and benchmarks on machines without LIO.

It lays out a map exactly as target_core_user.c does (mailbox at 0, cmdr_off 128, command ring,
data area after the ring) and queues commands the way the kernel does: entry = header + request +
iovecs, at least the size of a response, then the CDB, 8-byte aligned; a PAD entry when an entry
would cross the ring's end; iovecs are runs of 4 KiB data blocks, scattered on demand; the data-in
area pre-filled with a stale pattern so a test notices bytes that leak. It advances cmd_head,
rings the doorbell, and reaps completions up to cmd_tail by cmd_id - raising `RingBroken` where
the kernel would mark the ring broken.
"""

from __future__ import annotations

import contextlib
import mmap
import random
import struct
import tempfile
import threading
import time
from dataclasses import dataclass

from targetd_repl.datapath.ring import (
    ENTRY_RSP_END,
    FLAG_CAP_OOOC,
    FLAG_CAP_READ_LEN,
    MAILBOX_SIZE,
    MB_CMD_HEAD,
    MB_CMD_TAIL,
    OP_CMD,
    OP_MASK,
    OP_PAD,
    REQ_IOV,
    SENSE_BUFFERSIZE,
    TCMU_MAILBOX_VERSION,
    UFLAG_READ_LEN,
)

DATA_BLOCK = 4096
STALE = 0xA5

_U32 = struct.Struct("@I")
_MAILBOX = struct.Struct("=HHII")
_HDR = struct.Struct("=IHBB")
_REQ = struct.Struct("=III4xQ")
_RSP = struct.Struct(f"=B3xI{SENSE_BUFFERSIZE}s")


class RingFull(Exception):
    """No room in the command ring or the data area: reap completions first."""


class RingBroken(AssertionError):
    """What the kernel would flag TCMU_DEV_BIT_BROKEN for: a completion it cannot match."""


@dataclass(frozen=True, slots=True)
class Completion:
    cmd_id: int
    status: int
    sense: bytes  # the 96-byte sense buffer
    read_len: int | None  # rsp.read_len when TCMU_UFLAG_READ_LEN was set
    data: bytes | None  # data-in as the kernel delivers it (read_len bytes, or all)
    buffer: bytes | None  # the whole data-in buffer after completion (stale-byte checks)


@dataclass(slots=True)
class _Queued:
    cmd_id: int
    offset: int
    iovecs: list[tuple[int, int]]
    blocks: list[int]
    data_in: bool
    length: int


class FakeKernel:
    def __init__(
        self,
        *,
        ring_area: int = 64 * 1024,
        data_size: int = 4 * 1024 * 1024,
        flags: int = FLAG_CAP_OOOC | FLAG_CAP_READ_LEN,
        fragment: bool = False,
        seed: int = 0,
    ) -> None:
        """`ring_area` is mailbox + command ring (the kernel's CMDR_SIZE); the data area
        follows. `fragment` scatters each command's data blocks (many iovecs)."""
        self.cmdr_off = MAILBOX_SIZE
        self.cmdr_size = ring_area - MAILBOX_SIZE
        self.data_off = ring_area
        self.map_size = ring_area + data_size
        self._file = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the map
        self._file.truncate(self.map_size)
        self.buffer = mmap.mmap(self._file.fileno(), self.map_size)
        self._mv = memoryview(self.buffer)
        _MAILBOX.pack_into(self._mv, 0, TCMU_MAILBOX_VERSION, flags, self.cmdr_off, self.cmdr_size)
        self._head = 0
        self._last_cleaned = 0
        self._free = list(range(data_size // DATA_BLOCK))
        self._fragment = fragment
        self._rng = random.Random(seed)
        self._queued: dict[int, _Queued] = {}
        self._next_id = 1
        self._lock = threading.Lock()
        self._cond = threading.Condition()
        self.events = 0  # doorbell signals to userspace
        self.kicks = 0  # 4-byte writes from userspace
        self.completed_ids: list[int] = []
        self.pads = 0  # PAD entries inserted at the ring's end

    # -- userspace-facing --------------------------------------------------------------------------

    def doorbell(self) -> FakeDoorbell:
        """A new listener, as a fresh open() of /dev/uioN is (its own event count)."""
        return FakeDoorbell(self)

    @property
    def head(self) -> int:
        return int(_U32.unpack_from(self._mv, MB_CMD_HEAD)[0])

    @property
    def tail(self) -> int:
        return int(_U32.unpack_from(self._mv, MB_CMD_TAIL)[0])

    @property
    def outstanding(self) -> int:
        return len(self._queued)

    # -- queueing ----------------------------------------------------------------------------------

    def submit(
        self,
        cdb: bytes,
        *,
        data_out: bytes | None = None,
        data_in: int = 0,
        notify: bool = True,
    ) -> int:
        """Queue one command; returns its cmd_id."""
        if data_out is not None and data_in:
            raise ValueError("bidirectional commands are not modelled")
        nbytes = len(data_out) if data_out is not None else data_in
        with self._lock:
            blocks = self._alloc(-(-nbytes // DATA_BLOCK))
            try:
                iovecs = self._iovecs(blocks, nbytes)
                # tcmu_cmd_get_base_cmd_size: room for the iovecs and at least for a response;
                # the CDB follows, so a response never overwrites it.
                base_size = max(REQ_IOV + 16 * len(iovecs), ENTRY_RSP_END)
                size = base_size + ((len(cdb) + 7) & ~7)
                pad = self.cmdr_size - self._head if self._head + size > self.cmdr_size else 0
                used = (self._head - self._last_cleaned) % self.cmdr_size
                if pad + size > self.cmdr_size - used - 8:
                    raise RingFull(f"command ring: {size + pad} bytes needed")
            except BaseException:
                self._free.extend(blocks)
                raise
            mv = self._mv
            if data_out is not None:
                pos = 0
                for base, length in iovecs:
                    mv[base : base + length] = data_out[pos : pos + length]
                    pos += length
            else:
                for base, length in iovecs:
                    mv[base : base + length] = bytes([STALE]) * length
            if pad:
                _HDR.pack_into(mv, self.cmdr_off + self._head, pad | OP_PAD, 0, 0, 0)
                self._head = 0
                self.pads += 1
            cmd_id = self._new_id()
            off = self._head
            base = self.cmdr_off + off
            mv[base : base + size] = bytes(size)
            cdb_off = base + base_size
            _HDR.pack_into(mv, base, size | OP_CMD, cmd_id, 0, 0)
            _REQ.pack_into(mv, base + 8, len(iovecs), 0, 0, cdb_off)
            for i, (iov_base, iov_len) in enumerate(iovecs):
                struct.pack_into("=QQ", mv, base + REQ_IOV + 16 * i, iov_base, iov_len)
            mv[cdb_off : cdb_off + len(cdb)] = cdb
            self._queued[cmd_id] = _Queued(cmd_id, off, iovecs, blocks, data_out is None, nbytes)
            self._head = (off + size) % self.cmdr_size
            _U32.pack_into(mv, MB_CMD_HEAD, self._head)  # publish after the entry is complete
        if notify:
            self.signal()
        return cmd_id

    def submit_raw(self, op: int, length: int, *, notify: bool = True) -> int:
        """Queue a non-CMD entry (PAD, TMR, an unknown opcode) of `length` bytes at the head;
        returns its ring offset."""
        with self._lock:
            off = self._head
            if off + length > self.cmdr_size:
                raise RingFull("raw entry would cross the ring's end")
            base = self.cmdr_off + off
            self._mv[base : base + length] = bytes(length)
            _HDR.pack_into(self._mv, base, length | (op & OP_MASK), 0, 0, 0)
            self._head = (off + length) % self.cmdr_size
            _U32.pack_into(self._mv, MB_CMD_HEAD, self._head)
        if notify:
            self.signal()
        return off

    def signal(self) -> None:
        with self._cond:
            self.events += 1
            self._cond.notify_all()

    def _new_id(self) -> int:
        while True:
            cmd_id = self._next_id
            self._next_id = self._next_id % 0xFFFF + 1
            if cmd_id not in self._queued:
                return cmd_id

    def _alloc(self, count: int) -> list[int]:
        if count > len(self._free):
            raise RingFull(f"data area: {count} blocks needed, {len(self._free)} free")
        if self._fragment:
            picked = self._rng.sample(self._free, count)
            chosen = set(picked)
            self._free = [b for b in self._free if b not in chosen]
            return picked
        self._free.sort()
        picked, self._free = self._free[:count], self._free[count:]
        return picked

    def _iovecs(self, blocks: list[int], nbytes: int) -> list[tuple[int, int]]:
        iovecs: list[tuple[int, int]] = []
        left = nbytes
        for b in blocks:
            length = min(DATA_BLOCK, left)
            addr = self.data_off + b * DATA_BLOCK
            if iovecs and iovecs[-1][0] + iovecs[-1][1] == addr:
                iovecs[-1] = (iovecs[-1][0], iovecs[-1][1] + length)
            else:
                iovecs.append((addr, length))
            left -= length
        return iovecs

    # -- completion --------------------------------------------------------------------------------

    def reap(self) -> list[Completion]:
        """Consume every entry up to cmd_tail, as tcmu_handle_completions does."""
        out: list[Completion] = []
        mv = self._mv
        with self._lock:
            tail = self.tail
            while self._last_cleaned != tail:
                off = self._last_cleaned
                len_op, cmd_id, _kflags, uflags = _HDR.unpack_from(mv, self.cmdr_off + off)
                length = len_op & ~OP_MASK
                if length == 0:
                    raise RingBroken(f"zero-length entry at {off}")
                if len_op & OP_MASK == OP_CMD:
                    queued = self._queued.pop(cmd_id, None)
                    if queued is None:
                        raise RingBroken(f"cmd_id {cmd_id} not found, ring is broken")
                    if queued.offset != off:
                        raise RingBroken(f"cmd_id {cmd_id} answered at {off}, not {queued.offset}")
                    status, read_len, sense = _RSP.unpack_from(mv, self.cmdr_off + off + 8)
                    valid = bool(uflags & UFLAG_READ_LEN)
                    data = buffer = None
                    if queued.data_in:
                        buffer = b"".join(bytes(mv[b : b + n]) for b, n in queued.iovecs)
                        data = buffer[: min(read_len, queued.length)] if valid else buffer
                    self._free.extend(queued.blocks)
                    out.append(
                        Completion(cmd_id, status, sense, read_len if valid else None, data, buffer)
                    )
                    self.completed_ids.append(cmd_id)
                self._last_cleaned = (off + length) % self.cmdr_size
        return out

    def wait_for(self, cmd_ids: list[int], timeout: float = 10.0) -> dict[int, Completion]:
        """Reap until every one of `cmd_ids` completed; raises TimeoutError otherwise."""
        want = set(cmd_ids)
        got: dict[int, Completion] = {}
        deadline = time.monotonic() + timeout
        while True:
            with self._cond:
                kicks = self.kicks
            for c in self.reap():
                if c.cmd_id in want:
                    got[c.cmd_id] = c
            if want <= got.keys():
                return got
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(want - got.keys())
                raise TimeoutError(f"commands {missing} not completed in {timeout} s")
            with self._cond:
                if self.kicks == kicks:
                    self._cond.wait(min(remaining, 0.05))

    def run(self, cdb: bytes, *, data_out: bytes | None = None, data_in: int = 0) -> Completion:
        """Submit one command and wait for it."""
        cmd_id = self.submit(cdb, data_out=data_out, data_in=data_in)
        return self.wait_for([cmd_id])[cmd_id]

    def _kicked(self) -> None:
        with self._cond:
            self.kicks += 1
            self._cond.notify_all()

    def close(self) -> None:
        self._mv.release()
        with contextlib.suppress(BufferError):
            self.buffer.close()
        self._file.close()


class FakeDoorbell:
    """The uio doorbell of one open() of the fake device."""

    def __init__(self, kernel: FakeKernel) -> None:
        self._kernel = kernel
        with kernel._cond:
            self._seen = kernel.events
        self._interrupted = False

    def wait(self, timeout: float | None) -> bool:
        k = self._kernel
        with k._cond:
            k._cond.wait_for(lambda: k.events != self._seen or self._interrupted, timeout)
            self._interrupted = False
            kicked = k.events != self._seen
            self._seen = k.events
            return kicked

    def kick(self) -> None:
        self._kernel._kicked()

    def interrupt(self) -> None:
        with self._kernel._cond:
            self._interrupted = True
            self._kernel._cond.notify_all()


# -- the initiator's side: CDB builders (tests, benchmarks) -------------------------------------


def cdb_rw(opcode: int, lba: int, nblocks: int, flags: int = 0) -> bytes:
    """READ/WRITE/VERIFY/WRITE AND VERIFY/SYNCHRONIZE CACHE/WRITE SAME in any CDB size;
    `flags` is byte 1 (FUA, BYTCHK, UNMAP, ...)."""
    group = opcode >> 5
    if group == 0:
        return bytes([opcode, (lba >> 16) & 0x1F, (lba >> 8) & 0xFF, lba & 0xFF, nblocks & 0xFF, 0])
    if group in (1, 2):
        return struct.pack(">BBIBHB", opcode, flags, lba, 0, nblocks, 0)
    if group == 5:
        return struct.pack(">BBIIBB", opcode, flags, lba, nblocks, 0, 0)
    return struct.pack(">BBQIBB", opcode, flags, lba, nblocks, 0, 0)


def cdb_compare_and_write(lba: int, nblocks: int, flags: int = 0) -> bytes:
    return struct.pack(">BBQ3xB2x", 0x89, flags, lba, nblocks)


def cdb_inquiry(alloc_len: int = 255, *, evpd: bool = False, page: int = 0) -> bytes:
    return struct.pack(">BBBHB", 0x12, 1 if evpd else 0, page, alloc_len, 0)


def cdb_mode_sense(
    page: int,
    alloc_len: int = 255,
    *,
    ten: bool = False,
    dbd: bool = False,
    pc: int = 0,
    subpage: int = 0,
    llbaa: bool = False,
) -> bytes:
    byte1 = (0x08 if dbd else 0) | (0x10 if llbaa and ten else 0)
    byte2 = (pc << 6) | page
    if ten:
        return struct.pack(">BBBB3xHB", 0x5A, byte1, byte2, subpage, alloc_len, 0)
    return struct.pack(">BBBBBB", 0x1A, byte1, byte2, subpage, alloc_len, 0)


def cdb_read_capacity_16(alloc_len: int = 32) -> bytes:
    return struct.pack(">BB8xIBB", 0x9E, 0x10, alloc_len, 0, 0)


def cdb_unmap(param_len: int, anchor: bool = False) -> bytes:
    return struct.pack(">BB5xHB", 0x42, 1 if anchor else 0, param_len, 0)


def unmap_parameters(ranges: list[tuple[int, int]], *, bddl: int | None = None) -> bytes:
    body = b"".join(struct.pack(">QI4x", lba, n) for lba, n in ranges)
    bd_len = len(body) if bddl is None else bddl
    return struct.pack(">HH4x", 6 + len(body), bd_len) + body
