"""Property test of the whole data path: random batches of READ / WRITE / WRITE SAME / UNMAP /
COMPARE AND WRITE go through the fake kernel's ring, the runner's worker pool (out-of-order
completion), the SCSI layer and a MemoryBackend, and must agree with a plain bytearray model -
status, sense, data-in and the final image."""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from targetd_repl.datapath.fake_kernel import (
    Completion,
    FakeKernel,
    cdb_compare_and_write,
    cdb_rw,
    cdb_unmap,
    unmap_parameters,
)
from targetd_repl.datapath.memory_backend import MemoryBackend
from targetd_repl.datapath.ring import Ring
from targetd_repl.datapath.runner import Runner
from targetd_repl.datapath.scsi import ScsiDevice

BS = 512
BLOCKS = 40
READS = (0x08, 0x28, 0xA8, 0x88)
WRITES = (0x0A, 0x2A, 0xAA, 0x8A)
WS_10, WS_16 = 0x41, 0x93

OK = (0, 0, 0)
OUT_OF_RANGE = (2, 5, 0x2100)
INVALID_CDB = (2, 5, 0x2400)
MISCOMPARE = (2, 0xE, 0x1D00)


def _data(seed: int, nblocks: int) -> bytes:
    return random.Random(seed).randbytes(nblocks * BS)


@dataclass(frozen=True)
class Op:
    kind: str
    opcode: int
    lba: int
    nblocks: int
    seed: int = 0
    flag: str = ""
    ranges: tuple[tuple[int, int], ...] = ()

    def footprint(self) -> range:
        if self.kind == "unmap":
            if not self.ranges:
                return range(0)
            return range(min(a for a, _ in self.ranges), max(a + n for a, n in self.ranges))
        n = (
            256
            if self.kind == "read" and self.opcode == 0x08 and self.nblocks == 0
            else self.nblocks
        )
        return range(self.lba, self.lba + n)


lbas = st.integers(0, BLOCKS + 2)
ops = st.one_of(
    st.builds(Op, st.just("read"), st.sampled_from(READS), lbas, st.integers(0, 5)),
    st.builds(
        Op, st.just("write"), st.sampled_from(WRITES), lbas, st.integers(1, 5), st.integers(0, 99)
    ),
    st.builds(
        Op,
        st.just("write_same"),
        st.sampled_from((WS_10, WS_16)),
        lbas,
        st.integers(0, 6),
        st.integers(0, 99),
        st.sampled_from(("data", "zero", "unmap-zero", "unmap-data", "ndob")),
    ),
    st.builds(
        Op,
        st.just("unmap"),
        st.just(0x42),
        st.just(0),
        st.just(0),
        ranges=st.lists(st.tuples(lbas, st.integers(0, 4)), max_size=3).map(tuple),
    ),
    st.builds(
        Op,
        st.just("caw"),
        st.just(0x89),
        lbas,
        st.just(1),
        st.integers(0, 99),
        st.sampled_from(("match", "mismatch")),
    ),
)


def _disjoint(batch: list[Op]) -> list[Op]:
    """Keep ops whose blocks no earlier op of the batch touches: their results do not depend on
    the order the workers run them in."""
    kept: list[Op] = []
    used: set[int] = set()
    for op in batch:
        blocks = set(op.footprint())
        if not blocks & used:
            kept.append(op)
            used |= blocks
    return kept


class Model:
    def __init__(self) -> None:
        self.image = bytearray(BLOCKS * BS)

    def fits(self, lba: int, n: int) -> bool:
        return lba + n <= BLOCKS

    def submit(self, kernel: FakeKernel, op: Op) -> tuple[int, tuple[int, int, int], bytes | None]:
        """Queue `op`; return (cmd_id, expected (status, key, asc), expected data-in)."""
        img = self.image
        if op.kind == "read":
            n = 256 if op.opcode == 0x08 and op.nblocks == 0 else op.nblocks
            cmd_id = kernel.submit(cdb_rw(op.opcode, op.lba, op.nblocks), data_in=n * BS)
            if not self.fits(op.lba, n):
                return cmd_id, OUT_OF_RANGE, None
            return cmd_id, OK, bytes(img[op.lba * BS : (op.lba + n) * BS])
        if op.kind == "write":
            data = _data(op.seed, op.nblocks)
            cmd_id = kernel.submit(cdb_rw(op.opcode, op.lba, op.nblocks), data_out=data)
            if not self.fits(op.lba, op.nblocks):
                return cmd_id, OUT_OF_RANGE, None
            img[op.lba * BS : (op.lba + op.nblocks) * BS] = data
            return cmd_id, OK, None
        if op.kind == "write_same":
            ndob = op.flag == "ndob" and op.opcode == WS_16
            block = bytes(BS) if "zero" in op.flag or op.flag == "ndob" else _data(op.seed, 1)
            flags = (0x08 if op.flag.startswith("unmap") else 0) | (0x01 if ndob else 0)
            cdb = cdb_rw(op.opcode, op.lba, op.nblocks, flags=flags)
            cmd_id = kernel.submit(cdb, data_out=None if ndob else block)
            if op.nblocks == 0:
                return cmd_id, INVALID_CDB, None
            if not self.fits(op.lba, op.nblocks):
                return cmd_id, OUT_OF_RANGE, None
            img[op.lba * BS : (op.lba + op.nblocks) * BS] = block * op.nblocks
            return cmd_id, OK, None
        if op.kind == "unmap":
            params = unmap_parameters(list(op.ranges))
            cmd_id = kernel.submit(cdb_unmap(len(params)), data_out=params)
            if not all(self.fits(a, n) for a, n in op.ranges):
                return cmd_id, OUT_OF_RANGE, None
            for a, n in op.ranges:
                img[a * BS : (a + n) * BS] = bytes(n * BS)
            return cmd_id, OK, None
        # COMPARE AND WRITE of one block
        new = _data(op.seed + 1000, 1)
        if self.fits(op.lba, 1):
            expected = bytearray(img[op.lba * BS : (op.lba + 1) * BS])
        else:
            expected = bytearray(BS)
        if op.flag == "mismatch":
            expected[op.seed * 5 % BS] ^= 0x81
        cmd_id = kernel.submit(cdb_compare_and_write(op.lba, 1), data_out=bytes(expected) + new)
        if not self.fits(op.lba, 1):
            return cmd_id, OUT_OF_RANGE, None
        if op.flag == "mismatch":
            return cmd_id, MISCOMPARE, None
        img[op.lba * BS : (op.lba + 1) * BS] = new
        return cmd_id, OK, None


def _outcome(c: Completion) -> tuple[int, int, int]:
    if c.status == 0:
        return OK
    return c.status, c.sense[2] & 0x0F, (c.sense[12] << 8) | c.sense[13]


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(batches=st.lists(st.lists(ops, min_size=1, max_size=8), min_size=1, max_size=10))
def test_random_command_batches_match_a_model_image(batches: list[list[Op]]) -> None:
    kernel = FakeKernel(ring_area=128 + 8192, data_size=512 * 1024, fragment=True, seed=1)
    backend = MemoryBackend("vol", BLOCKS * BS)
    runner = Runner(Ring(kernel.buffer), kernel.doorbell(), ScsiDevice(backend), workers=3)
    runner.start()
    model = Model()
    submitted: list[int] = []
    try:
        for batch in batches:
            expected = {}
            for op in _disjoint(batch):
                cmd_id, outcome, data = model.submit(kernel, op)
                expected[cmd_id] = (op, outcome, data)
            done = kernel.wait_for(list(expected))
            for cmd_id, (op, outcome, data) in expected.items():
                c = done[cmd_id]
                assert _outcome(c) == outcome, op
                if outcome == MISCOMPARE:
                    assert struct.unpack_from(">I", c.sense, 3)[0] == op.seed * 5 % BS
                if data is not None:
                    assert c.data == data, op
            submitted += list(expected)
            assert bytes(backend.image) == bytes(model.image)
    finally:
        runner.stop()
        kernel.close()
    assert kernel.completed_ids == submitted  # every command answered once, in ring order
    assert runner.failed is None
