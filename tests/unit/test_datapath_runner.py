"""Unit tests of the loop (runner.py), the service (service.py), the uio doorbell (uio.py),
discovery parsing (discovery.py) and the entry point (__main__.py), with the fake kernel."""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from targetd_repl.datapath.__main__ import parse_size
from targetd_repl.datapath.backend import Backend, VolumeIdentity
from targetd_repl.datapath.discovery import TcmuDevice, parse_uio_name, read_device
from targetd_repl.datapath.fake_kernel import (
    STALE,
    FakeKernel,
    cdb_inquiry,
    cdb_mode_sense,
    cdb_rw,
)
from targetd_repl.datapath.memory_backend import FileBackend, MemoryBackend
from targetd_repl.datapath.ring import Ring
from targetd_repl.datapath.runner import Runner
from targetd_repl.datapath.scsi import ScsiDevice
from targetd_repl.datapath.service import DataPathService, OpenedDevice
from targetd_repl.datapath.uio import DeviceGone, FdDoorbell, UioDevice

BS = 512
READ_10, WRITE_10 = 0x28, 0x2A


class Gate:
    """A MemoryBackend whose I/O on chosen LBAs waits for a gate; `kill()` makes waiting calls
    fail, as a process killed with -9 would never finish them."""

    def __init__(self, inner: MemoryBackend, gated: set[int] | None = None) -> None:
        self.inner = inner
        self.gated = gated or set()
        self.opened = threading.Event()
        self.entered = threading.Semaphore(0)
        self.killed = False
        self.ops: list[tuple[str, int]] = []

    block_size = property(lambda self: self.inner.block_size)
    num_blocks = property(lambda self: self.inner.num_blocks)
    writable = property(lambda self: self.inner.writable)
    identity = property(lambda self: self.inner.identity)

    def _gate(self, op: str, lba: int) -> None:
        self.ops.append((op, lba))
        if lba in self.gated:
            self.entered.release()
            self.opened.wait(30)
            if self.killed:
                raise RuntimeError("process killed")

    def readinto(self, lba: int, buffers: Sequence[memoryview]) -> None:
        self._gate("read", lba)
        self.inner.readinto(lba, buffers)

    def write(self, lba: int, buffers: Sequence[memoryview]) -> None:
        self._gate("write", lba)
        self.inner.write(lba, buffers)

    def write_zeros(self, lba: int, nblocks: int) -> None:
        self._gate("zeros", lba)
        self.inner.write_zeros(lba, nblocks)

    def flush(self) -> None:
        pass


@pytest.fixture
def kernel() -> Iterator[FakeKernel]:
    k = FakeKernel(ring_area=128 + 8192, data_size=2 * 1024 * 1024, fragment=True, seed=7)
    yield k
    k.close()


def start_runner(kernel: FakeKernel, backend: Backend, workers: int = 4) -> Runner:
    runner = Runner(
        Ring(kernel.buffer), kernel.doorbell(), ScsiDevice(backend), workers=workers, name="t"
    )
    runner.start()
    return runner


def block(lba: int, n: int = 1) -> bytes:
    return b"".join(
        struct.pack(">Q", lba + i).ljust(BS, bytes([(lba + i) & 0xFF])) for i in range(n)
    )


# --- the loop -------------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 4])
def test_serves_writes_and_reads_with_scattered_buffers(kernel: FakeKernel, workers: int) -> None:
    backend = MemoryBackend("vol1", 1 << 20)
    runner = start_runner(kernel, backend, workers)
    try:
        writes = [
            kernel.submit(cdb_rw(WRITE_10, 16 * i, 16), data_out=block(16 * i, 16))
            for i in range(20)
        ]
        assert all(c.status == 0 for c in kernel.wait_for(writes).values())
        reads = {kernel.submit(cdb_rw(READ_10, 16 * i, 16), data_in=16 * BS): i for i in range(20)}
        for cmd_id, c in kernel.wait_for(list(reads)).items():
            assert c.status == 0 and c.data == block(16 * reads[cmd_id], 16)
        assert kernel.completed_ids == writes + list(reads)  # the kernel sees ring order
    finally:
        assert runner.stop()
    assert runner.failed is None and runner.dispatched == runner.completed == 40


def test_short_data_in_through_the_loop_leaves_no_stale_bytes(kernel: FakeKernel) -> None:
    runner = start_runner(kernel, MemoryBackend("vol1", 1 << 20))
    try:
        c = kernel.run(cdb_inquiry(255), data_in=255)
        assert c.status == 0 and c.read_len == 96 and c.buffer is not None
        assert STALE not in c.buffer[96:] and c.buffer[96:] == bytes(255 - 96)
        c = kernel.run(cdb_rw(READ_10, 0, 1), data_in=3 * BS)  # larger than the CDB asks
        assert c.read_len == BS and c.buffer == bytes(3 * BS)
        c = kernel.run(bytes([0xEE]) + bytes(9), data_in=BS)  # unknown opcode
        assert c.status == 2 and c.sense[2] == 5 and c.sense[12] == 0x20
    finally:
        runner.stop()


def test_slow_write_does_not_hold_up_reads_but_completes_in_ring_order(
    kernel: FakeKernel,
) -> None:
    backend = Gate(MemoryBackend("vol1", 1 << 20), gated={100})
    runner = start_runner(kernel, backend)
    try:
        slow = kernel.submit(cdb_rw(WRITE_10, 100, 1), data_out=block(100))
        assert backend.entered.acquire(timeout=10)  # the write is stuck "waiting for the peer"
        reads = [kernel.submit(cdb_rw(READ_10, i, 1), data_in=BS) for i in range(6)]
        deadline = time.monotonic() + 10
        while runner.completed < 6 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert runner.completed == 6  # the reads ran on other workers ...
        assert kernel.reap() == []  # ... but cmd_tail waits for the slow write
        backend.opened.set()
        done = kernel.wait_for([slow, *reads])
        assert all(c.status == 0 for c in done.values())
        assert kernel.completed_ids == [slow, *reads]
    finally:
        backend.opened.set()
        runner.stop()


def test_restart_serves_pending_entries_nothing_lost_nothing_doubled(kernel: FakeKernel) -> None:
    image = MemoryBackend("vol1", 1 << 20)
    gate_a = Gate(image, gated={200})
    runner_a = start_runner(kernel, gate_a)
    first = kernel.submit(cdb_rw(WRITE_10, 0, 1), data_out=block(0))
    assert kernel.wait_for([first])[first].status == 0  # answered and reaped before the crash
    stuck = kernel.submit(cdb_rw(WRITE_10, 200, 1), data_out=block(200))
    assert gate_a.entered.acquire(timeout=10)
    behind = [kernel.submit(cdb_rw(WRITE_10, 10 + i, 1), data_out=block(10 + i)) for i in range(5)]
    behind.append(kernel.submit(cdb_rw(READ_10, 0, 1), data_in=BS))
    deadline = time.monotonic() + 10
    while runner_a.completed < 7 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert runner_a.completed == 7 and kernel.reap() == []  # done in A, never published

    # kill -9: A's ring is abandoned, its stuck call never completes anything
    runner_a._stop.set()
    runner_a.ring.close()
    gate_b = Gate(image)
    runner_b = start_runner(kernel, gate_b)
    try:
        done = kernel.wait_for([stuck, *behind])
        assert all(c.status == 0 for c in done.values())
        assert done[behind[-1]].data == block(0)
        assert ("write", 0) not in gate_b.ops  # the answered write is not redone
        assert sorted(op for op in gate_b.ops) == sorted(
            [("write", 200), *(("write", 10 + i) for i in range(5)), ("read", 0)]
        )
        gate_a.killed = True
        gate_a.opened.set()  # A's late completion lands on a closed ring: dropped
        time.sleep(0.05)
        assert kernel.reap() == [] and kernel.outstanding == 0
        assert sorted(kernel.completed_ids) == sorted([first, stuck, *behind])
        assert len(set(kernel.completed_ids)) == len(kernel.completed_ids)
        for lba in (0, 200, 10, 14):
            assert bytes(image.image[lba * BS : (lba + 1) * BS]) == block(lba)
    finally:
        gate_a.opened.set()
        runner_b.stop()


def test_stop_waits_for_in_flight_commands(kernel: FakeKernel) -> None:
    backend = Gate(MemoryBackend("vol1", 1 << 20), gated={5})
    runner = start_runner(kernel, backend)
    cmd = kernel.submit(cdb_rw(WRITE_10, 5, 1), data_out=block(5))
    assert backend.entered.acquire(timeout=10)
    threading.Timer(0.1, backend.opened.set).start()
    assert runner.stop(timeout=10)
    assert kernel.wait_for([cmd], timeout=1)[cmd].status == 0


def test_mode_sense_write_protect_round_trip_through_the_ring(kernel: FakeKernel) -> None:
    backend = MemoryBackend("vol1", 1 << 20)
    backend.writable = False  # a secondary
    runner = start_runner(kernel, backend)
    try:
        six = kernel.run(cdb_mode_sense(0x3F, 255), data_in=255)
        ten = kernel.run(cdb_mode_sense(0x3F, 255, ten=True), data_in=255)
        assert six.data is not None and six.data[2] & 0x80
        assert ten.data is not None and ten.data[3] & 0x80
        w = kernel.run(cdb_rw(WRITE_10, 0, 1), data_out=block(0))
        assert (w.status, w.sense[2], w.sense[12], w.sense[13]) == (2, 7, 0x27, 0)
        backend.writable = True  # promoted: same LUN, no reconfiguration
        assert kernel.run(cdb_rw(WRITE_10, 0, 1), data_out=block(0)).status == 0
        six = kernel.run(cdb_mode_sense(0x3F, 255), data_in=255)
        assert six.data is not None and not six.data[2] & 0x80
    finally:
        runner.stop()


def test_a_corrupt_ring_stops_the_runner(kernel: FakeKernel) -> None:
    runner = start_runner(kernel, MemoryBackend("vol1", 1 << 20))
    kernel.submit_raw(1, 8)  # a CMD entry too short to hold a response
    deadline = time.monotonic() + 5
    while runner.alive and time.monotonic() < deadline:
        time.sleep(0.01)
    assert runner.failed is not None and not runner.alive
    runner.stop(timeout=1)


# --- the service ----------------------------------------------------------------------------------


class FakeSource:
    def __init__(self, devices: list[TcmuDevice]) -> None:
        self.devices = devices
        self.on_add: Callable[[TcmuDevice], None] | None = None
        self.on_remove: Callable[[str], None] | None = None
        self.closed = False

    def scan(self) -> list[TcmuDevice]:
        return list(self.devices)

    def watch(self, on_add: Callable[[TcmuDevice], None], on_remove: Callable[[str], None]) -> None:
        self.on_add, self.on_remove = on_add, on_remove

    def close(self) -> None:
        self.closed = True


def _dev(uio: str, subtype: str, cfg: str) -> TcmuDevice:
    return TcmuDevice(uio, f"/dev/{uio}", "1", f"lun-{cfg}", subtype, cfg, 0)


def test_service_serves_our_devices_and_follows_add_remove() -> None:
    kernels: dict[str, FakeKernel] = {}

    def opener(dev: TcmuDevice) -> OpenedDevice:
        k = kernels.setdefault(dev.uio, FakeKernel(ring_area=128 + 4096, data_size=64 * 1024))
        return OpenedDevice(k.buffer, k.doorbell(), lambda: None)

    volumes = {"vol1": MemoryBackend("vol1", 1 << 20)}
    source = FakeSource(
        [
            _dev("uio0", "targetd", "vol1"),
            _dev("uio1", "rbd", "pool/img"),
            _dev("uio2", "targetd", "vol2"),
        ]
    )
    service = DataPathService(
        volumes.get, source=source, opener=opener, workers=2, rescan_interval=0
    )
    service.start()
    try:
        assert service.served() == {"uio0": "vol1"}  # not tcmu-runner's, not an unknown volume
        assert kernels["uio0"].run(cdb_inquiry(36), data_in=36).status == 0
        volumes["vol2"] = MemoryBackend("vol2", 1 << 20)
        service.rescan()
        assert service.served() == {"uio0": "vol1", "uio2": "vol2"}
        assert source.on_add is not None and source.on_remove is not None
        source.on_add(_dev("uio3", "targetd", "vol1"))  # a second LUN on the same volume
        assert kernels["uio3"].run(cdb_rw(READ_10, 0, 1), data_in=BS).status == 0
        runner = service.runner("uio0")
        source.on_remove("uio0")
        assert runner is not None and not runner.alive and "uio0" not in service.served()
        # a missed remove event: the next scan no longer lists uio2, and uio3 now names another LUN
        source.devices = [_dev("uio3", "targetd", "vol2")]
        old = service.runner("uio3")
        service.rescan()
        assert service.served() == {"uio3": "vol2"} and old is not None and not old.alive
    finally:
        service.stop()
    assert source.closed and service.served() == {}
    for k in kernels.values():
        k.close()


# --- uio doorbell, device, discovery, entry point -------------------------------------------------


def test_fd_doorbell_protocol() -> None:
    ours, kernel_side = socket.socketpair()
    ours.setblocking(False)
    bell = FdDoorbell(ours.fileno())
    try:
        assert bell.wait(0.01) is False  # nothing yet: timeout
        kernel_side.send(b"\1\0\0\0")  # the kernel signals
        assert bell.wait(1) is True and bell.events == 1
        bell.kick()
        assert kernel_side.recv(16) == b"\0\0\0\0"  # exactly 4 bytes per kick
        threading.Timer(0.05, bell.interrupt).start()
        t0 = time.monotonic()
        assert bell.wait(5) is False and time.monotonic() - t0 < 2
        kernel_side.close()
        with pytest.raises(DeviceGone):
            bell.wait(1)
    finally:
        bell.close()
        ours.close()


def test_uio_device_maps_the_region(tmp_path: Path) -> None:
    path = tmp_path / "uio0"
    k = FakeKernel(ring_area=128 + 1024, data_size=16 * 1024)
    path.write_bytes(bytes(k.buffer))
    k.close()
    dev = UioDevice(str(path), os.path.getsize(path))
    ring = Ring(dev.buffer)
    assert ring.cmdr_off == 128 and ring.cmdr_size == 1024
    ring.close()
    dev.close()


def test_parse_uio_name() -> None:
    assert parse_uio_name("tcm-user/1/lun_vol1/targetd/vol1\n") == (
        "1",
        "lun_vol1",
        "targetd",
        "vol1",
    )
    assert parse_uio_name("tcm-user/3/x/targetd") == ("3", "x", "targetd", "")
    assert parse_uio_name("tcm-user/3/x/rbd/pool/image") == ("3", "x", "rbd", "pool/image")
    assert parse_uio_name("uio_pdrv_genirq") is None
    assert parse_uio_name("tcm-user/1//targetd/v") is None


def test_read_device_from_sysfs(tmp_path: Path) -> None:
    uio = tmp_path / "uio4"
    (uio / "maps" / "map0").mkdir(parents=True)
    (uio / "name").write_text("tcm-user/2/lun0/targetd/vol9\n")
    (uio / "maps" / "map0" / "size").write_text("0x40800000\n")
    assert read_device(str(uio)) == TcmuDevice(
        "uio4", "/dev/uio4", "2", "lun0", "targetd", "vol9", 0x40800000
    )
    (uio / "name").write_text("some-other-driver\n")
    assert read_device(str(uio)) is None
    other = tmp_path / "uio5"
    other.mkdir()
    (other / "name").write_text("tcm-user/2/lun1/targetd/v\n")
    assert read_device(str(other), wait=0.05) is None  # maps/ never appeared


def test_parse_size() -> None:
    assert parse_size("512") == 512
    assert parse_size("64M") == 64 << 20 == parse_size("64MiB")
    assert parse_size("2g") == 2 << 30
    with pytest.raises(Exception, match="bad size"):
        parse_size("lots")


def test_file_backend_round_trip(tmp_path: Path) -> None:
    path = str(tmp_path / "vol.img")
    backend = FileBackend("vol", path, size_bytes=1 << 20, identity=VolumeIdentity("vol", "u-1"))
    dev = ScsiDevice(backend)
    data = bytearray(block(3, 4))
    assert (
        dev.execute(cdb_rw(WRITE_10, 3, 4), [memoryview(data)[:700], memoryview(data)[700:]]).status
        == 0
    )
    out = bytearray(4 * BS)
    assert dev.execute(cdb_rw(READ_10, 3, 4), [memoryview(out)]).status == 0
    assert out == data and dev.execute(bytes([0x35]) + bytes(9)).status == 0
    backend.close()
    again = FileBackend("vol", path)
    assert again.num_blocks == (1 << 20) // BS
    out2 = bytearray(4 * BS)
    again.readinto(3, [memoryview(out2)])
    assert out2 == data
    again.close()
