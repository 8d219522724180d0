"""Volume: creation, block and byte I/O, validation errors, zeroing, resize."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from targetd_repl.errors import (
    AlreadyExists,
    InvalidArgument,
    Misaligned,
    NotFound,
    OutOfRange,
    StorageError,
)
from targetd_repl.storage import volume as volume_mod
from targetd_repl.storage.volume import Volume

MiB = 1 << 20


@pytest.fixture
def vol(tmp_path: Path) -> Iterator[Volume]:
    v = Volume.create(tmp_path / "vol1.img", size_bytes=4 * MiB, block_size=512)
    yield v
    v.close()


def test_create_properties_and_sparse(tmp_path: Path) -> None:
    path = tmp_path / "data1.img"
    with Volume.create(path, size_bytes=64 * MiB, block_size=4096) as v:
        assert v.name == "data1"
        assert v.path == path
        assert v.size_bytes == 64 * MiB
        assert v.block_size == 4096
        assert v.num_blocks == 64 * MiB // 4096
    st_ = os.stat(path)
    assert st_.st_size == 64 * MiB
    assert st_.st_blocks * 512 < MiB  # sparse: nothing allocated
    with Volume.open(path, block_size=4096) as v2:
        assert v2.size_bytes == 64 * MiB
        assert v2.read(0, 2) == bytes(8192)


def test_create_errors(tmp_path: Path) -> None:
    path = tmp_path / "v.img"
    with pytest.raises(InvalidArgument, match="block size"):
        Volume.create(path, size_bytes=MiB, block_size=1024)
    with pytest.raises(InvalidArgument, match="positive multiple"):
        Volume.create(path, size_bytes=1000, block_size=512)
    with pytest.raises(InvalidArgument):
        Volume.create(path, size_bytes=0, block_size=512)
    assert not path.exists()
    Volume.create(path, size_bytes=MiB, block_size=512).close()
    with pytest.raises(AlreadyExists, match="'v'"):
        Volume.create(path, size_bytes=MiB, block_size=512)
    with pytest.raises(NotFound, match="nope"):
        Volume.open(tmp_path / "nope.img", block_size=512)
    os.truncate(path, 4096 + 512)
    with pytest.raises(Misaligned):
        Volume.open(path, block_size=4096)


def test_block_io_roundtrip(vol: Volume) -> None:
    data = os.urandom(3 * 512)
    vol.write(10, data)
    assert vol.read(10, 3) == data
    assert vol.read(9, 1) == bytes(512)
    buf = bytearray(2 * 512)
    vol.readinto(11, buf)
    assert bytes(buf) == data[512:]
    mv = memoryview(bytearray(1024))
    vol.readinto(10, mv)
    assert mv.tobytes() == data[:1024]
    vol.write(vol.num_blocks - 1, memoryview(data)[:512])  # last block
    assert vol.read(vol.num_blocks - 1, 1) == data[:512]
    assert vol.read(5, 0) == b""
    vol.write(vol.num_blocks, b"")  # empty request at the end is in range


def test_out_of_range_names_volume_lba_and_limit(vol: Volume) -> None:
    limit = vol.num_blocks
    with pytest.raises(OutOfRange) as ei:
        vol.read(limit - 1, 2)
    msg = str(ei.value)
    assert "'vol1'" in msg and str(limit - 1) in msg and str(limit) in msg
    with pytest.raises(OutOfRange):
        vol.read(-1, 1)
    with pytest.raises(OutOfRange):
        vol.write(limit, bytes(512))
    with pytest.raises(OutOfRange):
        vol.write_zeros(limit - 3, 4)
    with pytest.raises(InvalidArgument):
        vol.read(0, -1)
    with pytest.raises(OutOfRange):
        vol.pread(vol.size_bytes - 10, 11)
    with pytest.raises(OutOfRange):
        vol.pwrite(-1, b"x")
    # OutOfRange is also an InvalidArgument (mapped the same way by upper layers)
    assert issubclass(OutOfRange, InvalidArgument)


def test_misaligned(vol: Volume) -> None:
    with pytest.raises(Misaligned) as ei:
        vol.write(7, bytes(1000))
    assert "'vol1'" in str(ei.value) and "LBA 7" in str(ei.value) and "512" in str(ei.value)
    with pytest.raises(Misaligned):
        vol.readinto(0, bytearray(100))


def test_byte_io_unaligned(vol: Volume) -> None:
    vol.pwrite(1000, b"hello")
    assert vol.pread(998, 9) == b"\0\0hello\0\0"
    buf = bytearray(5)
    vol.preadinto(1000, buf)
    assert buf == b"hello"


def test_write_zeros_punches_holes(vol: Volume) -> None:
    vol.write(0, os.urandom(MiB))
    vol.flush()
    before = os.stat(vol.path).st_blocks
    vol.write_zeros(0, 1024)  # 512 KiB
    vol.write_zeros(0, 0)
    assert vol.read(0, 1024) == bytes(512 * 1024)
    assert vol.read(1024, 1) != bytes(512)
    assert os.stat(vol.path).st_blocks < before  # ext4/xfs/tmpfs punch holes


def test_write_zeros_fallback(vol: Volume, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    def no_punch(fd: int, offset: int, length: int) -> bool:
        calls.append(length)
        return False

    monkeypatch.setattr(volume_mod, "punch_hole", no_punch)
    vol.write(0, os.urandom(3 * MiB))
    vol.write_zeros(1, 5000)  # > 1 MiB chunk of zeros: several writes
    vol.write_zeros(0, 1)
    assert vol.read(0, 5001) == bytes(5001 * 512)
    assert vol.read(5001, 1) != bytes(512)
    assert calls == [5000 * 512]  # remembered as unsupported after the first try


def test_resize(vol: Volume) -> None:
    vol.write(vol.num_blocks - 1, b"\x01" * 512)
    old = vol.num_blocks
    vol.resize(8 * MiB)
    assert vol.size_bytes == 8 * MiB and os.stat(vol.path).st_size == 8 * MiB
    assert vol.read(old - 1, 1) == b"\x01" * 512
    assert vol.read(old, 10) == bytes(5120)
    vol.resize(MiB)
    assert vol.num_blocks == MiB // 512
    with pytest.raises(OutOfRange):
        vol.read(vol.num_blocks, 1)
    vol.resize(2 * MiB)
    assert vol.read(MiB // 512, 1) == bytes(512)  # shrunk data does not come back
    with pytest.raises(InvalidArgument):
        vol.resize(MiB + 100)
    with pytest.raises(InvalidArgument):
        vol.resize(0)


def test_closed(tmp_path: Path) -> None:
    v = Volume.create(tmp_path / "c.img", size_bytes=MiB, block_size=512)
    v.close()
    v.close()  # idempotent
    assert v.closed
    with pytest.raises(StorageError, match="closed"):
        v.read(0, 1)


def test_truncated_outside_is_reported(vol: Volume) -> None:
    os.truncate(vol.path, 512)
    with pytest.raises(StorageError, match="truncated"):
        vol.read(1, 1)


def test_concurrent_writers(vol: Volume) -> None:
    def worker(k: int) -> None:
        for i in range(200):
            vol.write(k * 200 + i, bytes([k + 1]) * 512)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in range(4):
        assert vol.read(k * 200, 200) == bytes([k + 1]) * 512 * 200


_op = st.one_of(
    st.tuples(st.just("w"), st.integers(0, 70), st.integers(0, 8), st.integers(0, 255)),
    st.tuples(st.just("z"), st.integers(0, 70), st.integers(0, 8), st.just(0)),
    st.tuples(st.just("r"), st.integers(0, 70), st.integers(0, 8), st.just(0)),
    st.tuples(st.just("s"), st.integers(1, 70), st.just(0), st.just(0)),
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=st.lists(_op, max_size=30), bs=st.sampled_from([512, 4096]))
def test_matches_model(tmp_path: Path, ops: list[tuple[str, int, int, int]], bs: int) -> None:
    path = tmp_path / f"m{os.urandom(4).hex()}.img"
    nblocks = 64
    model = bytearray(nblocks * bs)
    with Volume.create(path, size_bytes=nblocks * bs, block_size=bs) as v:
        for kind, lba, n, fill in ops:
            fits = lba + n <= len(model) // bs
            if kind == "s":
                v.resize(lba * bs)
                del model[lba * bs :]
                model.extend(bytes(lba * bs - len(model)))
                continue
            if not fits:
                with pytest.raises(OutOfRange):
                    if kind == "w":
                        v.write(lba, bytes([fill]) * (n * bs))
                    elif kind == "z":
                        v.write_zeros(lba, n)
                    else:
                        v.read(lba, n)
                continue
            if kind == "w":
                v.write(lba, bytes([fill]) * (n * bs))
                model[lba * bs : (lba + n) * bs] = bytes([fill]) * (n * bs)
            elif kind == "z":
                v.write_zeros(lba, n)
                model[lba * bs : (lba + n) * bs] = bytes(n * bs)
            else:
                assert v.read(lba, n) == model[lba * bs : (lba + n) * bs]
        assert v.size_bytes == len(model)
        assert v.pread(0, len(model)) == model
    path.unlink()
