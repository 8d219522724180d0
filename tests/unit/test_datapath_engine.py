"""The ring, the SCSI emulation and the storage engine together (the kernel side faked).

A SCSI WRITE is in the journal and the volume before its completion reaches the ring; a
secondary's LUN answers DATA PROTECT / WRITE PROTECTED and turns writable on promotion with
nothing reconfigured; a LUN keeps serving, every command GOOD, while its group is reopened."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from targetd_repl.datapath.cdb import READ_10, READ_16, WRITE_10, WRITE_16, WRITE_SAME_16
from targetd_repl.datapath.engine_backend import EngineBackend
from targetd_repl.datapath.fake_kernel import (
    FakeKernel,
    cdb_compare_and_write,
    cdb_mode_sense,
    cdb_rw,
)
from targetd_repl.datapath.ring import Ring
from targetd_repl.datapath.runner import Runner
from targetd_repl.datapath.scsi import ScsiDevice
from targetd_repl.model import Role
from targetd_repl.storage.engine import StorageEngine
from targetd_repl.storage.group_store import GroupSettings

BS = 512
CHECK_CONDITION = 2
DATA_PROTECT, MISCOMPARE = 0x07, 0x0E


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[StorageEngine]:
    eng = StorageEngine.open(
        tmp_path, site="a", settings=GroupSettings(journal_segment_size=1 << 20)
    )
    eng.create_group("g", Role.PRIMARY)
    eng.create_volume("v1", 1 << 20, group="g")
    yield eng
    eng.close()


@pytest.fixture
def lun(engine: StorageEngine) -> Iterator[FakeKernel]:
    kernel = FakeKernel(ring_area=128 + 8192, data_size=1 << 20, fragment=True, seed=3)
    runner = Runner(
        Ring(kernel.buffer),
        kernel.doorbell(),
        ScsiDevice(EngineBackend(engine, "v1")),
        workers=4,
        name="v1",
    )
    runner.start()
    yield kernel
    assert runner.stop()
    kernel.close()


def test_scsi_write_is_journaled_and_applied_before_completion(
    engine: StorageEngine, lun: FakeKernel
) -> None:
    store = engine.group("g")
    data = bytes(range(256)) * 16  # 8 blocks
    done = lun.run(cdb_rw(WRITE_10, 40, 8), data_out=data)
    assert done.status == 0
    records = list(store.journal.read_from(store.journal.first_seq))
    assert [(r.lba, bytes(r.data)) for r in records] == [(40, data)]
    assert engine.read("v1", 40, 8) == data
    back = lun.run(cdb_rw(READ_10, 40, 8), data_in=8 * BS)
    assert back.status == 0 and back.buffer == data


def test_secondary_lun_refuses_writes_until_promoted(
    engine: StorageEngine, lun: FakeKernel
) -> None:
    store = engine.group("g")
    store.set_role(Role.SECONDARY)
    refused = lun.run(cdb_rw(WRITE_10, 0, 1), data_out=b"x" * BS)
    assert refused.status == CHECK_CONDITION
    sense = (refused.sense[2] & 0x0F, refused.sense[12], refused.sense[13])
    assert sense == (DATA_PROTECT, 0x27, 0)
    mode = lun.run(cdb_mode_sense(0x3F), data_in=255)
    assert mode.buffer is not None and mode.buffer[2] & 0x80  # WP bit
    assert store.journal.next_seq == store.journal.first_seq  # nothing journaled
    store.set_role(Role.PRIMARY)  # promotion: no target or ring reconfiguration
    accepted = lun.run(cdb_rw(WRITE_10, 0, 1), data_out=b"y" * BS)
    assert accepted.status == 0 and engine.read("v1", 0, 1) == b"y" * BS


def test_compare_and_write_goes_through_the_group(engine: StorageEngine, lun: FakeKernel) -> None:
    assert lun.run(cdb_rw(WRITE_10, 7, 1), data_out=b"a" * BS).status == 0
    ok = lun.run(cdb_compare_and_write(7, 1), data_out=b"a" * BS + b"b" * BS)
    assert ok.status == 0 and engine.read("v1", 7, 1) == b"b" * BS
    miss = lun.run(cdb_compare_and_write(7, 1), data_out=b"b" * 9 + b"?" * 503 + b"c" * BS)
    assert miss.status == CHECK_CONDITION and miss.sense[2] & 0x0F == MISCOMPARE
    assert int.from_bytes(miss.sense[3:7], "big") == 9  # first differing byte
    assert engine.read("v1", 7, 1) == b"b" * BS


def test_write_same_16_unmap_of_a_whole_32_mib_lun_through_the_journal(
    engine: StorageEngine,
) -> None:
    """libiscsi's WriteSame16.Unmap through the engine: one 32 MiB WRITE(16) (a journal record
    larger than a segment), WRITE SAME(16) UNMAP of all of it, READ(16) reads zeros."""
    n = 65536
    engine.create_volume("conf", n * BS, group="g")
    lun = ScsiDevice(EngineBackend(engine, "conf"))
    ones = bytearray(b"\xff" * (n * BS))
    assert lun.execute(cdb_rw(WRITE_16, 0, n), [memoryview(ones)]).status == 0
    assert engine.read("conf", n - 1, 1) == b"\xff" * BS
    assert lun.execute(cdb_rw(WRITE_SAME_16, 0, n, flags=0x08), [memoryview(bytes(BS))]).status == 0
    back = bytearray(n * BS)
    result = lun.execute(cdb_rw(READ_16, 0, n), [memoryview(back)])
    assert result.status == 0 and result.data_in == n * BS
    assert back == bytes(n * BS)


def test_a_lun_keeps_serving_while_its_group_reopens(engine: StorageEngine) -> None:
    """A peer's pair request adds volumes to the group of a served LUN (the engine reopens the
    group, no re-export): the SCSI commands in flight finish, the next ones wait for the swap and
    run on the new store - every one completes GOOD, and the data is there afterwards."""
    kernel = FakeKernel(ring_area=128 + 8192, data_size=1 << 20, fragment=True, seed=5)
    backend = EngineBackend(engine, "v1")
    runner = Runner(
        Ring(kernel.buffer), kernel.doorbell(), ScsiDevice(backend), workers=4, name="v1"
    )
    runner.start()
    old = engine.group("g")
    stop = threading.Event()
    failures: list[str] = []
    rounds = [0]
    written: dict[int, bytes] = {}

    def io() -> None:
        r = 0
        while not stop.is_set() and not failures:
            batch = {(r % 16) * 64 + i * 8: bytes([r % 250 + 1, i]) * (4 * BS) for i in range(8)}
            ids = {
                kernel.submit(cdb_rw(WRITE_10, lba, 8), data_out=d): lba for lba, d in batch.items()
            }
            for cmd_id, done in kernel.wait_for(list(ids)).items():
                if done.status != 0:
                    failures.append(f"WRITE at {ids[cmd_id]}: status {done.status}")
            written.update(batch)
            ids = {kernel.submit(cdb_rw(READ_10, lba, 8), data_in=8 * BS): lba for lba in batch}
            for cmd_id, done in kernel.wait_for(list(ids)).items():
                if done.status != 0 or done.buffer != batch[ids[cmd_id]]:
                    failures.append(f"READ at {ids[cmd_id]}: status {done.status}")
            r += 1
            rounds[0] = r

    thread = threading.Thread(target=io)
    thread.start()
    try:
        for name in ("v2", "v3"):
            start = rounds[0]
            deadline = time.monotonic() + 30
            while rounds[0] < start + 3 and not failures and time.monotonic() < deadline:
                time.sleep(0.002)
            engine.create_volume(name, 1 << 20, group="g")  # the peer path: engine only
        start = rounds[0]
        deadline = time.monotonic() + 30
        while rounds[0] < start + 3 and not failures and time.monotonic() < deadline:
            time.sleep(0.002)
    finally:
        stop.set()
        thread.join(30)
        assert runner.stop()
        kernel.close()
    assert failures == []
    assert rounds[0] >= 9
    assert backend.store is engine.group("g") and backend.store is not old
    assert sorted(backend.store.volume_ids()) == [v.id for v in engine.list_volumes()]
    for lba, data in written.items():
        assert engine.read("v1", lba, 8) == data
