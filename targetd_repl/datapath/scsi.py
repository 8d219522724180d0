"""SCSI emulation of a direct-access block device over a `Backend`: (CDB, buffers) -> Result.

The kernel passes up every command except REPORT LUNS and the reservation commands; this module
answers them. It is transport-free: `ScsiDevice.execute(cdb, buffers)` reads data-out from the
buffers, writes data-in into them (zero copy for READ: the backend fills the ring's data area),
and returns status, sense and the data-in length. Errors of every kind - bad CDBs, ranges, a
read-only LUN, backend exceptions - become status + sense in `execute`, the one place; nothing
above this layer sees an exception from a command.

Implemented: TEST UNIT READY, REQUEST SENSE, INQUIRY (standard; VPD 00 80 83 B0 B1 B2),
READ CAPACITY (10) and (16), MODE SENSE (6) and (10) (pages 01 08 0A 3F; WP on a read-only LUN),
READ/WRITE (6/10/12/16), WRITE AND VERIFY (10/12/16), VERIFY (10/12/16), SYNCHRONIZE CACHE
(10/16), UNMAP, WRITE SAME (10/16, UNMAP and NDOB bits), COMPARE AND WRITE.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable, Sequence
from typing import NamedTuple, Protocol, TypeVar

from targetd_repl.datapath import cdb as op
from targetd_repl.datapath import pages
from targetd_repl.datapath.backend import Backend, SupportsCompareAndWrite, SupportsWriteBatch
from targetd_repl.datapath.cdb import (
    BATCH_WRITE_OPCODES,
    RW_FIELDS,
    Buffer,
    be16,
    be32,
    be64,
    lba_and_length,
)
from targetd_repl.datapath.pages import ScsiConfig
from targetd_repl.datapath.rangelock import RangeLock
from targetd_repl.datapath.sense import (
    CHECK_CONDITION,
    GOOD,
    Asc,
    CheckCondition,
    SenseKey,
    fixed_sense,
    illegal_request,
    invalid_cdb,
    invalid_param,
    lba_out_of_range,
    miscompare,
    write_protected,
)
from targetd_repl.datapath.sgl import (
    first_difference,
    gather,
    scatter,
    slice_buffers,
    total_length,
)
from targetd_repl.errors import InvalidArgument, OutOfRange, WriteProtected

log = logging.getLogger(__name__)


class Result(NamedTuple):
    """The outcome of one command. `data_in`: bytes of data-in placed in the buffers (None for
    commands without a data-in phase); the transport zeroes the rest and reports the length."""

    status: int
    sense: bytes = b""
    data_in: int | None = None


RESULT_GOOD = Result(GOOD)

# Commands that touch the backend (may block on I/O or on the peer): run on a worker thread.
# Everything else is answered from memory on the ring's own thread.
BACKEND_OPCODES = frozenset(
    {
        op.READ_6,
        op.READ_10,
        op.READ_12,
        op.READ_16,
        op.WRITE_6,
        op.WRITE_10,
        op.WRITE_12,
        op.WRITE_16,
        op.WRITE_AND_VERIFY_10,
        op.WRITE_AND_VERIFY_12,
        op.WRITE_AND_VERIFY_16,
        op.VERIFY_10,
        op.VERIFY_12,
        op.VERIFY_16,
        op.SYNCHRONIZE_CACHE_10,
        op.SYNCHRONIZE_CACHE_16,
        op.UNMAP,
        op.WRITE_SAME_10,
        op.WRITE_SAME_16,
        op.COMPARE_AND_WRITE,
    }
)

_WRITE_OPCODES = frozenset(
    {
        op.WRITE_6,
        op.WRITE_10,
        op.WRITE_12,
        op.WRITE_16,
        op.WRITE_AND_VERIFY_10,
        op.WRITE_AND_VERIFY_12,
        op.WRITE_AND_VERIFY_16,
        op.UNMAP,
        op.WRITE_SAME_10,
        op.WRITE_SAME_16,
        op.COMPARE_AND_WRITE,
    }
)

_CHUNK = 1 << 20  # bounce and pattern buffers


Handler = Callable[[Buffer, Sequence[memoryview]], Result]


class Request(Protocol):
    """What `execute_all` needs of a command: its CDB and data buffers (a ring.Command)."""

    @property
    def cdb(self) -> Buffer: ...

    @property
    def iovecs(self) -> Sequence[memoryview]: ...


R = TypeVar("R", bound=Request)


class ScsiDevice:
    """The SCSI personality of one LUN. Thread-safe: `execute` runs on many workers at once;
    writes to overlapping ranges serialise on the LUN's range lock."""

    def __init__(self, backend: Backend, config: ScsiConfig | None = None) -> None:
        self.backend = backend
        self.config = config or ScsiConfig()
        self.block_size = backend.block_size
        self.locks = RangeLock()
        # The LUN's size as last read from the backend: READ and WRITE check their range
        # against it and read the backend's size again only when a command reaches past it (a
        # grown LUN). A shrink the cache misses is still refused: the backend checks every
        # range itself (OutOfRange, the same LBA OUT OF RANGE sense). Other commands read the
        # size afresh (`_check_range`).
        self._known_blocks = 0
        self._zero_block = bytes(self.block_size)
        self._atomic_caw: SupportsCompareAndWrite | None = (
            backend if isinstance(backend, SupportsCompareAndWrite) else None
        )
        # Batches only where the backend also orders writes itself (it takes their range locks);
        # otherwise a batch would skip this LUN's range lock (see _write).
        self._batch: SupportsWriteBatch | None = (
            backend
            if isinstance(backend, SupportsWriteBatch) and self._atomic_caw is not None
            else None
        )
        self._handlers: dict[int, Handler] = {
            op.TEST_UNIT_READY: self._test_unit_ready,
            op.REQUEST_SENSE: self._request_sense,
            op.INQUIRY: self._inquiry,
            op.READ_CAPACITY_10: self._read_capacity_10,
            op.SERVICE_ACTION_IN_16: self._service_action_in,
            op.MODE_SENSE_6: self._mode_sense,
            op.MODE_SENSE_10: self._mode_sense,
            op.READ_6: self._read,
            op.READ_10: self._read,
            op.READ_12: self._read,
            op.READ_16: self._read,
            op.WRITE_6: self._write,
            op.WRITE_10: self._write,
            op.WRITE_12: self._write,
            op.WRITE_16: self._write,
            op.WRITE_AND_VERIFY_10: self._write,
            op.WRITE_AND_VERIFY_12: self._write,
            op.WRITE_AND_VERIFY_16: self._write,
            op.VERIFY_10: self._verify,
            op.VERIFY_12: self._verify,
            op.VERIFY_16: self._verify,
            op.SYNCHRONIZE_CACHE_10: self._synchronize_cache,
            op.SYNCHRONIZE_CACHE_16: self._synchronize_cache,
            op.UNMAP: self._unmap,
            op.WRITE_SAME_10: self._write_same,
            op.WRITE_SAME_16: self._write_same,
            op.COMPARE_AND_WRITE: self._compare_and_write,
        }

    # -- the one place where errors become sense ------------------------------------------------

    def execute(self, cdb: Buffer, buffers: Sequence[memoryview] = ()) -> Result:
        """Run one command. Never raises."""
        opcode = cdb[0] if len(cdb) else -1
        try:
            handler = self._handlers.get(opcode)
            if handler is None:
                raise illegal_request(Asc.INVALID_COMMAND_OPERATION_CODE, field=0)
            return handler(cdb, buffers)
        except Exception as exc:
            return self._error_result(opcode, exc)

    def execute_all(self, requests: Sequence[R]) -> list[tuple[R, int, bytes, int | None]]:
        """`execute` for each of `requests` (the commands a ring poll answers inline), as
        (request, status, sense, data-in length): what Ring.complete_many takes, without a
        call and a Result per command in between. Never raises."""
        handlers = self._handlers
        answered: list[tuple[R, int, bytes, int | None]] = []
        for request in requests:
            cdb = request.cdb
            opcode = cdb[0] if len(cdb) else -1
            try:
                handler = handlers.get(opcode)
                if handler is None:
                    raise illegal_request(Asc.INVALID_COMMAND_OPERATION_CODE, field=0)
                status, sense, data_in = handler(cdb, request.iovecs)
            except Exception as exc:
                status, sense, data_in = self._error_result(opcode, exc)
            answered.append((request, status, sense, data_in))
        return answered

    @staticmethod
    def _error_result(opcode: int, exc: BaseException) -> Result:
        """The status and sense for a command that raised `exc`."""
        if isinstance(exc, CheckCondition):
            return Result(CHECK_CONDITION, exc.sense)
        if isinstance(exc, OutOfRange):
            log.warning("opcode %#04x: backend: %s", opcode, exc)
            return Result(CHECK_CONDITION, lba_out_of_range().sense)
        if isinstance(exc, WriteProtected):
            return Result(CHECK_CONDITION, fixed_sense(SenseKey.DATA_PROTECT, Asc.WRITE_PROTECTED))
        if isinstance(exc, InvalidArgument):
            log.error("opcode %#04x: backend refused the request: %s", opcode, exc)
            return Result(
                CHECK_CONDITION, fixed_sense(SenseKey.HARDWARE_ERROR, Asc.INTERNAL_TARGET_FAILURE)
            )
        if isinstance(exc, OSError):
            log.error("opcode %#04x: backend I/O error: %s", opcode, exc)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                key, asc = SenseKey.DATA_PROTECT, Asc.SPACE_ALLOCATION_FAILED_WRITE_PROTECT
            elif opcode in _WRITE_OPCODES:
                key, asc = SenseKey.MEDIUM_ERROR, Asc.WRITE_ERROR
            else:
                key, asc = SenseKey.MEDIUM_ERROR, Asc.UNRECOVERED_READ_ERROR
            return Result(CHECK_CONDITION, fixed_sense(key, asc))
        log.error("opcode %#04x failed", opcode, exc_info=exc)
        return Result(
            CHECK_CONDITION, fixed_sense(SenseKey.HARDWARE_ERROR, Asc.INTERNAL_TARGET_FAILURE)
        )

    @property
    def batches_writes(self) -> bool:
        """True when `execute_writes` is cheaper than `execute` per WRITE (the backend writes a
        batch as one journal group commit)."""
        return self._batch is not None

    def execute_writes(
        self, commands: Sequence[tuple[Buffer, Sequence[memoryview]]]
    ) -> list[Result]:
        """Run several plain WRITE (6/10/12/16) commands - those of one ring poll - with one
        backend call for all of them (`SupportsWriteBatch`; else one `execute` each). Each gets
        the checks and the outcome `execute` would give it; overlapping writes land in list
        order. Never raises."""
        batch = self._batch
        if batch is None:
            return [self.execute(cdb, buffers) for cdb, buffers in commands]
        results: list[Result] = [RESULT_GOOD] * len(commands)
        todo: list[tuple[int, int, Sequence[memoryview]]] = []  # (index, lba, buffers)
        fua = False
        # Once for the batch: the backend checks the role again inside its write slot.
        writable = self.backend.writable
        check_write = self._check_write
        for i, (cdb, buffers) in enumerate(commands):
            opcode = cdb[0] if len(cdb) else -1
            try:
                if opcode not in BATCH_WRITE_OPCODES:
                    results[i] = self.execute(cdb, buffers)
                    continue
                lba = check_write(cdb, buffers, writable)
            except Exception as exc:
                results[i] = self._error_result(opcode, exc)
                continue
            if lba is not None:
                todo.append((i, lba, buffers))
                fua = fua or (opcode != op.WRITE_6 and bool(cdb[1] & 0x08))
        if not todo:
            return results
        try:
            errors = batch.write_batch([(lba, buffers) for _, lba, buffers in todo])
            if fua:  # FUA: one flush after the batch covers every FUA write in it
                self.backend.flush()
        except Exception as exc:
            errors = [exc] * len(todo)
        for (i, _, _), error in zip(todo, errors, strict=True):
            if error is not None:
                results[i] = self._error_result(commands[i][0][0], error)
        return results

    # -- shared checks ----------------------------------------------------------------------------

    def _check_range(self, lba: int, nblocks: int) -> None:
        if lba + nblocks > self.backend.num_blocks:
            raise lba_out_of_range()

    def _check_writable(self) -> None:
        if not self.backend.writable:
            raise write_protected()

    def _check_transfer(self, opcode: int, nblocks: int) -> None:
        if nblocks * self.block_size > self.config.max_transfer_bytes:
            raise invalid_cdb(op.length_field_offset(opcode))

    @staticmethod
    def _check_protect(cdb: Buffer) -> None:
        if cdb[0] not in (op.READ_6, op.WRITE_6) and cdb[1] & 0xE0:
            raise invalid_cdb(1, 7)  # RDPROTECT/WRPROTECT/VRPROTECT: no protection information

    def _decode_rw(self, cdb: Buffer, writable: bool | None) -> tuple[int, int]:
        """(LBA, blocks) of a READ, WRITE or WRITE AND VERIFY after the checks each gets before
        data moves, in this order: protection fields, write protection (`writable` None: a
        read, not checked), range, transfer limit. Raises the CheckCondition."""
        opcode = cdb[0]
        layout = RW_FIELDS.get(opcode)
        if layout is not None:  # READ/WRITE (10/12/16): the common case, one unpack
            flags, lba, nblocks = layout.unpack_from(cdb)
            if flags & 0xE0:
                raise invalid_cdb(1, 7)  # RDPROTECT/WRPROTECT: no protection information
        else:
            self._check_protect(cdb)
            lba, nblocks = lba_and_length(cdb)
            if nblocks == 0 and opcode in (op.READ_6, op.WRITE_6):
                nblocks = 256
        if writable is not None and not writable:
            raise write_protected()
        end = lba + nblocks
        if end > self._known_blocks:
            self._known_blocks = self.backend.num_blocks
            if end > self._known_blocks:
                raise lba_out_of_range()
        if nblocks and nblocks * self.block_size > self.config.max_transfer_bytes:
            raise invalid_cdb(op.length_field_offset(opcode))
        return lba, nblocks

    @staticmethod
    def _data_in(data: bytes, alloc_len: int, buffers: Sequence[memoryview]) -> Result:
        return Result(GOOD, data_in=scatter(memoryview(data)[:alloc_len], buffers))

    # -- no data / emulated data-in ---------------------------------------------------------------

    def _test_unit_ready(self, cdb: Buffer, buffers: Sequence[memoryview]) -> Result:
        return RESULT_GOOD

    def _request_sense(self, cdb: Buffer, buffers: Sequence[memoryview]) -> Result:
        # Sense is returned with each CHECK CONDITION (autosense); nothing is ever pending.
        if cdb[1] & 0x01:  # DESC: descriptor format, NO SENSE
            data = bytes([0x72, 0, 0, 0, 0, 0, 0, 0])
        else:
            data = fixed_sense(SenseKey.NO_SENSE, Asc.NO_ADDITIONAL_SENSE)
        return self._data_in(data, cdb[4], buffers)

    def _inquiry(self, cdb: Buffer, buffers: Sequence[memoryview]) -> Result:
        alloc_len = be16(cdb, 3)
        if cdb[1] & 0x02:
            raise invalid_cdb(1, 1)  # CMDDT (obsolete)
        if not cdb[1] & 0x01:
            if cdb[2]:
                raise invalid_cdb(2)
            return self._data_in(pages.standard_inquiry(self.config), alloc_len, buffers)
        data = pages.vpd_page(cdb[2], self.config, self.backend.identity, self.block_size)
        if data is None:
            raise invalid_cdb(2)
        return self._data_in(data, alloc_len, buffers)

    def _read_capacity_10(self, cdb: Buffer, buffers: Sequence[memoryview]) -> Result:
        data = pages.read_capacity_10(self.backend.num_blocks, self.block_size)
        return self._data_in(data, len(data), buffers)

    def _service_action_in(self, cdb: Buffer, buffers: Sequence[memoryview]) -> Result:
        if cdb[1] & 0x1F != op.SAI_READ_CAPACITY_16:
            raise invalid_cdb(1, 4)
        data = pages.read_capacity_16(self.backend.num_blocks, self.block_size)
        return self._data_in(data, be32(cdb, 10), buffers)

    def _mode_sense(self, cdb: Buffer, buffers: Sequence[memoryview]) -> Result:
        ten = cdb[0] == op.MODE_SENSE_10
        dbd = bool(cdb[1] & 0x08)
        long_lba = ten and bool(cdb[1] & 0x10)
        pc = cdb[2] >> 6
        page = cdb[2] & 0x3F
        subpage = cdb[3]
        alloc_len = be16(cdb, 7) if ten else cdb[4]
        if pc == 3:
            raise illegal_request(Asc.SAVING_PARAMETERS_NOT_SUPPORTED, field=2, bit=7)
        if subpage not in (0x00, 0xFF):
            raise invalid_cdb(3)
        read_only = not self.backend.writable
        body = pages.mode_pages(page, read_only=read_only, changeable=pc == 1)
        if body is None:
            raise invalid_cdb(2, 5)
        block_desc = b""
        if not dbd:
            block_desc = pages.block_descriptor(
                self.backend.num_blocks, self.block_size, long_lba=long_lba
            )
        device_specific = (0x80 if read_only else 0x00) | 0x10  # WP, DPOFUA
        if ten:
            length = 8 + len(block_desc) + len(body)
            header = bytes(
                [
                    (length - 2) >> 8,
                    (length - 2) & 0xFF,
                    0x00,
                    device_specific,
                    0x01 if long_lba else 0x00,
                    0x00,
                    len(block_desc) >> 8,
                    len(block_desc) & 0xFF,
                ]
            )
        else:
            length = 4 + len(block_desc) + len(body)
            header = bytes([length - 1, 0x00, device_specific, len(block_desc)])
        return self._data_in(header + block_desc + body, alloc_len, buffers)

    # -- block commands ---------------------------------------------------------------------------

    def _read(self, cdb: Buffer, buffers: Sequence[memoryview]) -> Result:
        lba, nblocks = self._decode_rw(cdb, None)
        if nblocks == 0:
            return Result(GOOD, b"", 0)
        bs = self.block_size
        need = nblocks * bs
        have = len(buffers[0]) if len(buffers) == 1 else total_length(buffers)
        if have == need:  # the usual case: straight into the ring's data area
            self.backend.readinto(lba, buffers)
            # Result(GOOD, b"", need) without NamedTuple's __new__ (a Python function).
            return tuple.__new__(Result, (GOOD, b"", need))
        if have > need:
            self.backend.readinto(lba, slice_buffers(buffers, 0, need))
            return Result(GOOD, b"", need)
        # The initiator's expected length is shorter than the CDB's (overflow): send what fits.
        whole = have // bs
        if whole:
            self.backend.readinto(lba, slice_buffers(buffers, 0, whole * bs))
        rest = have - whole * bs
        if rest:
            bounce = bytearray(bs)
            self.backend.readinto(lba + whole, [memoryview(bounce)])
            scatter(memoryview(bounce)[:rest], slice_buffers(buffers, whole * bs, rest))
        return Result(GOOD, data_in=have)

    def _check_write(
        self, cdb: Buffer, buffers: Sequence[memoryview], writable: bool | None = None
    ) -> int | None:
        """The checks of a WRITE / WRITE AND VERIFY before any data moves: raises the
        CheckCondition, or returns the LBA (None: zero blocks, nothing to write). `writable`:
        the backend's, when the caller read it already (a batch reads it once)."""
        lba, nblocks = self._decode_rw(cdb, self.backend.writable if writable is None else writable)
        if nblocks == 0:
            return None
        have = len(buffers[0]) if len(buffers) == 1 else total_length(buffers)
        if have != nblocks * self.block_size:
            raise illegal_request(Asc.INVALID_FIELD_IN_COMMAND_IU)
        return lba

    def _write(self, cdb: Buffer, buffers: Sequence[memoryview]) -> Result:
        """WRITE (6/10/12/16) and WRITE AND VERIFY (10/12/16)."""
        opcode = cdb[0]
        checked = self._check_write(cdb, buffers)
        if checked is None:
            return RESULT_GOOD
        lba = checked
        nblocks = total_length(buffers) // self.block_size
        verify = opcode in (op.WRITE_AND_VERIFY_10, op.WRITE_AND_VERIFY_12, op.WRITE_AND_VERIFY_16)
        bytchk = verify and bool(cdb[1] & 0x02)
        if self._atomic_caw is not None and not bytchk:
            # The backend orders overlapping writes and makes its own COMPARE AND WRITE atomic
            # against them (the engine's range lock): ours would only cost two more lock rounds.
            self.backend.write(lba, buffers)
        else:
            held = self.locks.acquire(lba, nblocks)
            try:
                self.backend.write(lba, buffers)
                if bytchk:  # read back and compare, with no other write in between
                    self._compare_medium(lba, nblocks, buffers)
            finally:
                self.locks.release(held)
        if not verify and opcode != op.WRITE_6 and cdb[1] & 0x08:  # FUA
            self.backend.flush()
        return RESULT_GOOD

    def _compare_medium(self, lba: int, nblocks: int, buffers: Sequence[memoryview]) -> None:
        """MISCOMPARE (INFORMATION = byte offset) unless the medium equals the buffers."""
        bs = self.block_size
        step = max(1, _CHUNK // bs)
        medium = bytearray(min(nblocks, step) * bs)
        done = 0
        while done < nblocks:
            k = min(step, nblocks - done)
            view = memoryview(medium)[: k * bs]
            self.backend.readinto(lba + done, [view])
            diff = first_difference(view, slice_buffers(buffers, done * bs, k * bs))
            if diff is not None:
                raise miscompare(done * bs + diff)
            done += k

    def _verify(self, cdb: Buffer, buffers: Sequence[memoryview]) -> Result:
        opcode = cdb[0]
        self._check_protect(cdb)
        bytchk = (cdb[1] >> 1) & 0x03
        lba, nblocks = lba_and_length(cdb)
        if bytchk == 2:
            raise invalid_cdb(1, 2)
        self._check_range(lba, nblocks)
        if nblocks == 0 or bytchk == 0:
            return RESULT_GOOD  # nothing to compare; the blocks exist
        bs = self.block_size
        if bytchk == 1:
            self._check_transfer(opcode, nblocks)
            if total_length(buffers) != nblocks * bs:
                raise illegal_request(Asc.INVALID_FIELD_IN_COMMAND_IU)
            self._compare_medium(lba, nblocks, buffers)
            return RESULT_GOOD
        # BYTCHK 11b: one block of data-out, compared with every block of the range
        if total_length(buffers) < bs:
            raise illegal_request(Asc.INVALID_FIELD_IN_COMMAND_IU)
        block = gather(buffers, bs)
        step = max(1, _CHUNK // bs)
        medium = bytearray(min(nblocks, step) * bs)
        done = 0
        while done < nblocks:
            k = min(step, nblocks - done)
            view = memoryview(medium)[: k * bs]
            self.backend.readinto(lba + done, [view])
            for i in range(k):
                if view[i * bs : (i + 1) * bs] != block:
                    diff = first_difference(view[i * bs : (i + 1) * bs], [memoryview(block)])
                    raise miscompare((done + i) * bs + (diff or 0))
            done += k
        return RESULT_GOOD

    def _synchronize_cache(self, cdb: Buffer, buffers: Sequence[memoryview]) -> Result:
        lba, nblocks = lba_and_length(cdb)
        self._check_range(lba, nblocks)  # 0 blocks: from lba to the end
        self.backend.flush()
        return RESULT_GOOD

    def _unmap(self, cdb: Buffer, buffers: Sequence[memoryview]) -> Result:
        if cdb[1] & 0x01:
            raise invalid_cdb(1, 0)  # ANCHOR: not supported (ANC_SUP 0)
        param_len = be16(cdb, 7)
        self._check_writable()
        if param_len == 0:
            return RESULT_GOOD
        if param_len < 8:
            raise illegal_request(Asc.PARAMETER_LIST_LENGTH_ERROR, field=7)
        data = gather(buffers, param_len)
        if len(data) < param_len:
            raise illegal_request(Asc.PARAMETER_LIST_LENGTH_ERROR, field=7)
        # Descriptors truncated by the parameter list length (or a BLOCK DESCRIPTOR DATA LENGTH
        # that is not a multiple of 16) are ignored (SBC-3 5.28).
        count = min(be16(data, 2), param_len - 8) // 16
        if count > self.config.max_unmap_descriptors:
            raise invalid_param(2)
        max_blocks = self.config.max_unmap_bytes // self.block_size
        ranges = []
        for i in range(count):
            off = 8 + 16 * i
            lba = be64(data, off)
            nblocks = be32(data, off + 8)
            if nblocks > max_blocks:
                raise invalid_param(off + 8)
            self._check_range(lba, nblocks)
            if nblocks:
                ranges.append((lba, nblocks))
        for lba, nblocks in ranges:
            with self.locks.hold(lba, nblocks):
                self.backend.write_zeros(lba, nblocks)
        return RESULT_GOOD

    def _write_same(self, cdb: Buffer, buffers: Sequence[memoryview]) -> Result:
        opcode = cdb[0]
        flags = cdb[1]
        self._check_protect(cdb)
        if flags & 0x10:
            raise invalid_cdb(1, 4)  # ANCHOR
        if flags & 0x06:
            raise invalid_cdb(1, 2)  # PBDATA / LBDATA (obsolete): not supported
        ndob = opcode == op.WRITE_SAME_16 and bool(flags & 0x01)
        lba, nblocks = lba_and_length(cdb)
        bs = self.block_size
        if nblocks == 0 or nblocks * bs > self.config.max_write_same_bytes:
            raise invalid_cdb(op.length_field_offset(opcode))  # WSNZ = 1, MAXIMUM WRITE SAME
        self._check_writable()
        self._check_range(lba, nblocks)
        zeros = ndob
        block = b""
        if not ndob:
            # Exactly one block of data-out: more is as wrong as less (the data-out of WRITE
            # SAME is one logical block; libiscsi's WriteSame*.InvalidDataOutSize checks both).
            if total_length(buffers) != bs:
                raise illegal_request(Asc.INVALID_FIELD_IN_COMMAND_IU)
            block = gather(buffers, bs)
            zeros = block == self._zero_block
        with self.locks.hold(lba, nblocks):
            if zeros:  # UNMAP bit or not, the blocks read as zeros afterwards (LBPRZ)
                self.backend.write_zeros(lba, nblocks)
                return RESULT_GOOD
            step = min(nblocks, max(1, _CHUNK // bs))
            pattern = memoryview(block * step)
            done = 0
            while done < nblocks:
                k = min(step, nblocks - done)
                self.backend.write(lba + done, [pattern[: k * bs]])
                done += k
        return RESULT_GOOD

    def _compare_and_write(self, cdb: Buffer, buffers: Sequence[memoryview]) -> Result:
        self._check_protect(cdb)
        lba = be64(cdb, 2)
        nblocks = cdb[13]
        if nblocks > self.config.max_compare_and_write_blocks:
            raise invalid_cdb(13)
        if nblocks == 0:
            # Zero blocks: nothing to do - unless data-out came with it, which makes the NUMBER
            # OF LOGICAL BLOCKS field the wrong one (libiscsi's CompareAndWrite.Simple and
            # .Miscompare expect INVALID FIELD IN CDB there, not GOOD).
            if total_length(buffers):
                raise invalid_cdb(13)
            return RESULT_GOOD
        self._check_writable()
        self._check_range(lba, nblocks)
        half = nblocks * self.block_size
        if total_length(buffers) != 2 * half:
            raise illegal_request(Asc.INVALID_FIELD_IN_COMMAND_IU)
        expected = slice_buffers(buffers, 0, half)
        new = slice_buffers(buffers, half, half)
        with self.locks.hold(lba, nblocks):
            if self._atomic_caw is not None:
                diff = self._atomic_caw.compare_and_write(lba, expected, new)
            else:
                medium = bytearray(half)
                self.backend.readinto(lba, [memoryview(medium)])
                diff = first_difference(medium, expected)
                if diff is None:
                    self.backend.write(lba, new)
            if diff is not None:
                raise miscompare(diff)
        if cdb[1] & 0x08:  # FUA
            self.backend.flush()
        return RESULT_GOOD
