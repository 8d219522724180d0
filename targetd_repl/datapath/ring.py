"""The TCMU command ring over a shared buffer: mailbox, entries, completion. Bytes and offsets only.

Layout (`include/uapi/linux/target_core_user.h`, TCMU_MAILBOX_VERSION 2; host byte order; every
address is an offset from the start of the map, never a pointer):

    mailbox   version@0 u16 (= 2)  flags@2 u16 (CAP_OOOC 1, CAP_READ_LEN 2, CAP_TMR 4,
              CAP_KEEP_BUF 8)  cmdr_off@4 u32 (= 128)  cmdr_size@8 u32  cmd_head@12 u32 (kernel)
              cmd_tail@64 u32 (us; `__aligned__(64)`, so the mailbox is 128 bytes)
    entry     at cmdr_off + offset, 8-byte aligned, never wraps (the kernel pads the ring's end
              with a PAD entry instead). hdr: len_op@0 u32 (op = low 3 bits: PAD 0, CMD 1, TMR 2;
              length = len_op & ~7)  cmd_id@4 u16  kflags@6 u8  uflags@7 u8 (UNKNOWN_OP 1,
              READ_LEN 2, KEEP_BUF 4)
    request   iov_cnt@8 u32  iov_bidi_cnt@12 u32  iov_dif_cnt@16 u32  cdb_off@24 u64 (the inner
              struct is not packed, so the u64 is aligned: 24, not 20)  iov[]@48, 16 bytes each
              (iov_base u64 offset into the map, iov_len u64); the kernel makes every command
              entry at least sizeof(struct tcmu_cmd_entry) = 112 bytes and puts the CDB after
              max(iov[] end, 112), so a response never overwrites the CDB
    response  scsi_status@8 u8  read_len@12 u32  sense_buffer@16 (96 bytes) - a union with the
              request: writing a response destroys the request it answers.

Protocol: the kernel writes entries and advances cmd_head; we parse from our cursor to cmd_head;
when we complete, we write the response into the entry and advance cmd_tail past it, then the
caller kicks the kernel (a 4-byte write to the uio fd). The kernel reaps entries from its last
position up to cmd_tail and looks each completed command up by the entry's cmd_id.

Out-of-order completion: commands finish in any order on worker threads. A response is kept in
memory until every older entry is also done, then the responses of that contiguous prefix are
written into their own entries and cmd_tail moves past them in one store. So every entry between
cmd_tail and cmd_head always still holds its intact request: a new process that maps the same
ring after a crash (kill -9) serves exactly those entries - nothing lost, nothing answered twice.
(The kernel's CAP_OOOC also allows "stealing" the oldest entry for a younger command's response,
rewriting its cmd_id. That frees ring space sooner but destroys a pending request in the ring, so
a restarted handler could neither serve it nor know the younger one was answered; we do not
steal. The cost: a slow command delays the kernel's view of younger completions, not their
execution.)

Short data-in: `complete(read_len=n)` zeroes the data area after byte n and sets
TCMU_UFLAG_READ_LEN + rsp.read_len, so no stale bytes of an earlier command reach the initiator.
"""

from __future__ import annotations

import logging
import mmap
import struct
import threading
from collections import deque
from typing import Final

from targetd_repl.datapath.cdb import cdb_length
from targetd_repl.datapath.sense import CHECK_CONDITION, Asc, SenseKey, fixed_sense

log = logging.getLogger(__name__)

# --- target_core_user.h ------------------------------------------------------------------------

TCMU_MAILBOX_VERSION: Final = 2
MAILBOX_SIZE: Final = 128  # sizeof(struct tcmu_mailbox): cmd_tail is aligned to 64
FLAG_CAP_OOOC: Final = 1 << 0
FLAG_CAP_READ_LEN: Final = 1 << 1
FLAG_CAP_TMR: Final = 1 << 2
FLAG_CAP_KEEP_BUF: Final = 1 << 3

MB_VERSION: Final = 0
MB_FLAGS: Final = 2
MB_CMDR_OFF: Final = 4
MB_CMDR_SIZE: Final = 8
MB_CMD_HEAD: Final = 12
MB_CMD_TAIL: Final = 64

OP_PAD: Final = 0
OP_CMD: Final = 1
OP_TMR: Final = 2
OP_MASK: Final = 0x7
ENTRY_ALIGN: Final = 8

UFLAG_UNKNOWN_OP: Final = 0x1
UFLAG_READ_LEN: Final = 0x2
UFLAG_KEEP_BUF: Final = 0x4

HDR_LEN_OP: Final = 0
HDR_CMD_ID: Final = 4
HDR_KFLAGS: Final = 6
HDR_UFLAGS: Final = 7
REQ_IOV_CNT: Final = 8
REQ_IOV_BIDI_CNT: Final = 12
REQ_IOV_DIF_CNT: Final = 16
REQ_CDB_OFF: Final = 24
REQ_IOV: Final = 48
IOV_SIZE: Final = 16
RSP_SCSI_STATUS: Final = 8
RSP_READ_LEN: Final = 12
RSP_SENSE: Final = 16
SENSE_BUFFERSIZE: Final = 96
ENTRY_RSP_END: Final = RSP_SENSE + SENSE_BUFFERSIZE  # 112: bytes a response overwrites

# Host byte order throughout (the ABI is native). cmd_head/cmd_tail go through "@I" (native,
# memcpy of 4 bytes: one load/store) so the kernel never sees a torn value; the byte-by-byte
# "<I" packers could tear.
_U32_ATOMIC = struct.Struct("@I")
_MAILBOX = struct.Struct("=HHII")
_HDR = struct.Struct("=IHBB")
_REQ = struct.Struct("=III4xQ")
_RSP = struct.Struct(f"=B3xI{SENSE_BUFFERSIZE}s")
_IOV_STRUCTS: dict[int, struct.Struct] = {}
_IOV1 = struct.Struct("=QQ")
# CDB length by group code (opcode >> 5), as cdb_length() says: the fast path's lookup.
_CDB_LENGTHS = tuple(cdb_length(group << 5) for group in range(8))
_VARIABLE_LENGTH_CDB = 0x7F
_ZEROS = bytes(1 << 20)

_MALFORMED_SENSE = fixed_sense(SenseKey.HARDWARE_ERROR, Asc.INTERNAL_TARGET_FAILURE)


class RingError(Exception):
    """The ring is not a TCMU v2 ring, or an entry/pointer in it is corrupt. Unrecoverable for
    this device: the runner stops serving it (the kernel times the commands out)."""


def _iov_struct(count: int) -> struct.Struct:
    st = _IOV_STRUCTS.get(count)
    if st is None:
        st = _IOV_STRUCTS[count] = struct.Struct(f"={2 * count}Q")
    return st


class _Skip:
    """A ring entry that needs no response: PAD, TMR notification, or an unknown opcode."""

    __slots__ = ("done", "length", "offset", "uflags")

    def __init__(self, offset: int, length: int, uflags: int) -> None:
        self.offset = offset
        self.length = length
        self.uflags = uflags
        self.done = True


class Command:
    """One CMD entry: the CDB and data buffers as memoryviews into the map (zero copy).

    `iovecs` are the data-out or data-in buffers (`iov_cnt`); `bidi_iovecs` the data-in buffers
    of a bidirectional command. All views are released when the response is written: from
    then on the kernel may reuse that memory.
    """

    __slots__ = (
        "bidi_iovecs",
        "cdb",
        "cmd_id",
        "data_length",
        "done",
        "iovecs",
        "length",
        "offset",
        "read_len",
        "sense",
        "status",
        "uflags",
    )

    def __init__(
        self,
        offset: int,
        length: int,
        cmd_id: int,
        cdb: memoryview,
        iovecs: list[memoryview],
        bidi_iovecs: list[memoryview],
        data_length: int | None = None,
    ) -> None:
        self.offset = offset
        self.length = length
        self.cmd_id = cmd_id
        self.cdb = cdb
        self.iovecs = iovecs
        self.bidi_iovecs = bidi_iovecs
        if data_length is None:
            data_length = len(iovecs[0]) if len(iovecs) == 1 else sum(map(len, iovecs))
        self.data_length = data_length
        self.done = False
        self.status = 0
        self.sense = b""
        self.read_len = 0
        self.uflags = 0

    def __repr__(self) -> str:
        op = f"{self.cdb[0]:#04x}" if not self.done else "done"
        return f"Command(id={self.cmd_id}, off={self.offset}, op={op}, len={self.data_length})"

    def _release(self) -> None:
        self.cdb.release()
        for v in self.iovecs:
            v.release()
        for v in self.bidi_iovecs:
            v.release()
        self.iovecs = []
        self.bidi_iovecs = []


_Slot = Command | _Skip


class Ring:
    """The command ring of one TCMU device, over any writable buffer (the uio mmap in
    production, a bytearray or a temp-file mmap in tests).

    `poll` is called by one thread (the device's loop); `complete` by any thread.
    """

    def __init__(self, buf: bytearray | memoryview | mmap.mmap) -> None:
        mv = memoryview(buf)
        if mv.readonly:
            raise RingError("the ring buffer is read-only")
        if mv.format != "B" or mv.ndim != 1:
            mv = mv.cast("B")
        self._mv = mv
        self.size = len(mv)
        if self.size < MAILBOX_SIZE:
            raise RingError(f"map of {self.size} bytes is smaller than the mailbox")
        version, flags, cmdr_off, cmdr_size = _MAILBOX.unpack_from(mv, 0)
        if version != TCMU_MAILBOX_VERSION:
            raise RingError(f"mailbox version {version}, expected {TCMU_MAILBOX_VERSION}")
        if (
            cmdr_off < MB_CMD_TAIL + 4
            or cmdr_size < 64
            or cmdr_size % ENTRY_ALIGN
            or cmdr_off + cmdr_size > self.size
        ):
            raise RingError(f"bad command ring cmdr_off={cmdr_off} cmdr_size={cmdr_size}")
        self.flags: int = flags
        self.cmdr_off: int = cmdr_off
        self.cmdr_size: int = cmdr_size
        self.data_off: int = cmdr_off + cmdr_size
        tail = self._check_pointer("cmd_tail", self._load(MB_CMD_TAIL))
        self._next = tail  # parse cursor: the first entry not yet handed out
        self._tail = tail  # our copy of mailbox cmd_tail
        self._pending: deque[_Slot] = deque()  # handed out, not yet retired, in ring order
        self._lock = threading.Lock()
        self._closed = False

    # -- mailbox --------------------------------------------------------------------------------

    def _load(self, off: int) -> int:
        return int(_U32_ATOMIC.unpack_from(self._mv, off)[0])

    def _check_pointer(self, what: str, value: int) -> int:
        if value >= self.cmdr_size or value % ENTRY_ALIGN:
            raise RingError(f"{what}={value} is outside the ring (cmdr_size={self.cmdr_size})")
        return value

    @property
    def head(self) -> int:
        return self._load(MB_CMD_HEAD)

    @property
    def tail(self) -> int:
        return self._load(MB_CMD_TAIL)

    @property
    def ooo_capable(self) -> bool:
        return bool(self.flags & FLAG_CAP_OOOC)

    @property
    def in_flight(self) -> int:
        """Entries handed out but not yet retired (includes skips waiting behind a command)."""
        return len(self._pending)

    @property
    def closed(self) -> bool:
        return self._closed

    # -- parsing ----------------------------------------------------------------------------------

    def poll(self) -> tuple[list[Command], bool]:
        """Parse the entries the kernel added since the last poll.

        Returns the new commands and whether cmd_tail moved (PAD entries or malformed commands
        at the front were retired): if so, the caller kicks the kernel.
        """
        if self._closed:
            return [], False
        mv = self._mv
        head = _U32_ATOMIC.unpack_from(mv, MB_CMD_HEAD)[0]
        if head == self._next:
            return [], False  # nothing new: the most frequent answer, kept short
        self._check_pointer("cmd_head", head)
        cmdr_off = self.cmdr_off
        cmdr_size = self.cmdr_size
        commands: list[Command] = []
        slots: list[_Slot] = []
        pos = self._next
        while pos != head:
            len_op, cmd_id, _kflags, _uflags = _HDR.unpack_from(mv, cmdr_off + pos)
            op = len_op & OP_MASK
            length = len_op & ~OP_MASK
            if length == 0 or pos + length > cmdr_size:
                raise RingError(f"entry at {pos}: length {length} crosses the ring's end")
            if op == OP_CMD:
                if length < ENTRY_RSP_END:
                    raise RingError(
                        f"command entry at {pos}: {length} bytes cannot hold a response"
                    )
                cmd = self._parse_command(pos, length, cmd_id)
                slots.append(cmd)
                if not cmd.done:
                    commands.append(cmd)
            elif op in (OP_PAD, OP_TMR):
                slots.append(_Skip(pos, length, 0))
            else:
                log.warning("ring entry at %d has unknown TCMU opcode %d: skipped", pos, op)
                slots.append(_Skip(pos, length, UFLAG_UNKNOWN_OP))
            pos = (pos + length) % cmdr_size
        self._next = pos
        if not slots:
            return commands, False
        with self._lock:
            if self._closed:
                return [], False
            self._pending.extend(slots)
            moved = self._retire_locked()
        return commands, moved

    def _parse_command(self, pos: int, length: int, cmd_id: int) -> Command:
        mv = self._mv
        base = self.cmdr_off + pos
        iov_cnt, bidi_cnt, dif_cnt, cdb_off = _REQ.unpack_from(mv, base + REQ_IOV_CNT)
        size = self.size
        if iov_cnt == 1 and not bidi_cnt and not dif_cnt and cdb_off < size:
            # The common case, kept short: one data buffer (the kernel hands out contiguous
            # runs of its data area), a fixed-length CDB, everything inside the map. Anything
            # else takes the general path below, which says what is wrong.
            iov_base, iov_len = _IOV1.unpack_from(mv, base + REQ_IOV)
            opcode = mv[cdb_off]
            cdb_end = cdb_off + _CDB_LENGTHS[opcode >> 5]
            if (
                length >= REQ_IOV + IOV_SIZE
                and iov_base >= self.data_off
                and iov_base + iov_len <= size
                and opcode != _VARIABLE_LENGTH_CDB
                and cdb_end <= size
            ):
                return Command(
                    pos,
                    length,
                    cmd_id,
                    mv[cdb_off:cdb_end],
                    [mv[iov_base : iov_base + iov_len]],
                    [],
                    iov_len,
                )
        problem = ""
        iovecs: list[memoryview] = []
        bidi: list[memoryview] = []
        n_iov = iov_cnt + bidi_cnt + dif_cnt
        if REQ_IOV + IOV_SIZE * n_iov > length:
            problem = f"{n_iov} iovecs do not fit in an entry of {length} bytes"
        else:
            n_used = iov_cnt + bidi_cnt
            raw = _iov_struct(n_used).unpack_from(mv, base + REQ_IOV) if n_used else ()
            for i in range(n_used):
                iov_base, iov_len = raw[2 * i], raw[2 * i + 1]
                if iov_base < self.data_off or iov_base + iov_len > self.size:
                    problem = f"iovec {i} ({iov_base}+{iov_len}) is outside the data area"
                    break
                (iovecs if i < iov_cnt else bidi).append(mv[iov_base : iov_base + iov_len])
        cdb_len = 0
        if not problem:
            if cdb_off >= self.size:
                problem = f"cdb_off {cdb_off} is outside the map"
            else:
                cdb_len = cdb_length(mv[cdb_off])
                if mv[cdb_off] == 0x7F and cdb_off + 8 < self.size:  # variable length CDB
                    cdb_len = 8 + mv[cdb_off + 7]
                if cdb_off + cdb_len > self.size:
                    problem = f"cdb at {cdb_off} runs past the map"
        cmd = Command(pos, length, cmd_id, mv[cdb_off : cdb_off + cdb_len], iovecs, bidi)
        if problem:
            log.error("malformed TCMU command id %d at ring offset %d: %s", cmd_id, pos, problem)
            cmd.status = CHECK_CONDITION
            cmd.sense = _MALFORMED_SENSE
            cmd.done = True
        return cmd

    # -- completion -------------------------------------------------------------------------------

    def complete(
        self, cmd: Command, status: int, sense: bytes = b"", read_len: int | None = None
    ) -> bool:
        """Record the response of `cmd`; write every response of the now-complete prefix into
        its entry and advance cmd_tail past them. Returns True when cmd_tail moved (kick the
        kernel). `read_len` (data-in commands): bytes of valid data-in; a shorter read zeroes
        the rest of the buffers and sets READ_LEN. Safe to call from any thread, once per
        command. After `close`, responses are dropped (the ring belongs to someone else)."""
        if cmd.done:
            raise RuntimeError(f"{cmd!r} completed twice")
        if self._closed:
            cmd.done = True
            return False
        if read_len is not None and read_len < cmd.data_length:
            _zero_from(cmd.iovecs, max(read_len, 0))
            cmd.uflags |= UFLAG_READ_LEN
            cmd.read_len = max(read_len, 0)
        cmd.status = status
        cmd.sense = sense
        with self._lock:
            cmd.done = True
            if self._closed:
                return False
            return self._retire_locked()

    def complete_many(self, done: list[tuple[Command, int, bytes, int | None]]) -> bool:
        """`complete` for several commands (cmd, status, sense, read_len) with one lock round
        and at most one cmd_tail store: the commands a runner answered in one pass. Returns
        True when cmd_tail moved."""
        if self._closed:
            for cmd, *_ in done:
                cmd.done = True
            return False
        for cmd, status, sense, read_len in done:
            if cmd.done:
                raise RuntimeError(f"{cmd!r} completed twice")
            if read_len is not None and read_len < cmd.data_length:
                _zero_from(cmd.iovecs, max(read_len, 0))
                cmd.uflags |= UFLAG_READ_LEN
                cmd.read_len = max(read_len, 0)
            cmd.status = status
            cmd.sense = sense
        with self._lock:
            # Marked done only under the lock, all together: the retire below publishes them
            # (responses first, then one cmd_tail store), as complete() does for one.
            for cmd, *_ in done:
                cmd.done = True
            if self._closed:
                return False
            return self._retire_locked()

    def _retire_locked(self) -> bool:
        pending = self._pending
        if not pending or not pending[0].done:
            return False
        mv = self._mv
        cmdr_off = self.cmdr_off
        tail = self._tail
        while pending and pending[0].done:
            slot = pending.popleft()
            base = cmdr_off + slot.offset
            if isinstance(slot, Command):
                _RSP.pack_into(mv, base + RSP_SCSI_STATUS, slot.status, slot.read_len, slot.sense)
                mv[base + HDR_UFLAGS] = slot.uflags
                slot._release()
            elif slot.uflags:
                mv[base + HDR_UFLAGS] |= slot.uflags
            tail = (tail + slot.length) % self.cmdr_size
        self._tail = tail
        _U32_ATOMIC.pack_into(mv, MB_CMD_TAIL, tail)  # after every response: the publish point
        return True

    def close(self) -> None:
        """Stop touching the map: later completions are dropped. Responses not yet written stay
        unwritten and their entries stay between cmd_tail and cmd_head, for the next handler."""
        with self._lock:
            self._closed = True
            for slot in self._pending:
                if isinstance(slot, Command) and slot.done:
                    slot._release()
            self._pending.clear()
        self._mv.release()


def _zero_from(buffers: list[memoryview], start: int) -> None:
    pos = 0
    for buf in buffers:
        n = len(buf)
        if pos + n > start:
            lo = max(0, start - pos)
            while lo < n:
                k = min(n - lo, len(_ZEROS))
                buf[lo : lo + k] = _ZEROS[:k]
                lo += k
        pos += n
