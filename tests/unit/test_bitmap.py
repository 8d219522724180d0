"""DirtyBitmap against a set-of-regions model, and its crash-safe file."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from targetd_repl.errors import BitmapCorrupt, InvalidArgument, NotFound, OutOfRange
from targetd_repl.model import DEFAULT_REGION_SIZE
from targetd_repl.storage import fileutil
from targetd_repl.storage.bitmap import DirtyBitmap

RS = 4096  # small regions keep examples small


def model_runs(regions: set[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for r in sorted(regions):
        if out and out[-1][0] + out[-1][1] == r:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((r, 1))
    return out


def touched(offset: int, length: int) -> set[int]:
    if length == 0:
        return set()
    return set(range(offset // RS, (offset + length - 1) // RS + 1))


def covered(offset: int, length: int, size: int) -> set[int]:
    end = offset + length
    first = -(-offset // RS)
    last = -(-size // RS) if end == size else end // RS
    return set(range(first, last)) if length else set()


class BitmapMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.size = 0
        self.bm = DirtyBitmap(0, RS)
        self.model: set[int] = set()

    @initialize(size=st.integers(0, RS * 200))
    def init(self, size: int) -> None:
        self.size = size
        self.bm = DirtyBitmap(size, RS)
        self.model = set()

    def nregions(self) -> int:
        return -(-self.size // RS)

    @rule(data=st.data())
    def set_range(self, data: st.DataObject) -> None:
        off = data.draw(st.integers(0, self.size))
        length = data.draw(st.integers(0, self.size - off))
        new = touched(off, length) - self.model
        assert self.bm.set_range(off, length) == len(new)
        self.model |= new

    @rule(data=st.data())
    def clear_range(self, data: st.DataObject) -> None:
        off = data.draw(st.integers(0, self.size))
        length = data.draw(st.integers(0, self.size - off))
        gone = covered(off, length, self.size) & self.model
        assert self.bm.clear_range(off, length) == len(gone)
        self.model -= gone

    @precondition(lambda self: self.size > 0)
    @rule(data=st.data(), value=st.booleans())
    def one_region(self, data: st.DataObject, value: bool) -> None:
        r = data.draw(st.integers(0, self.nregions() - 1))
        if value:
            assert self.bm.set_region(r) == (r not in self.model)
            self.model.add(r)
        else:
            assert self.bm.clear_region(r) == (r in self.model)
            self.model.discard(r)

    @rule(data=st.data())
    def union(self, data: st.DataObject) -> None:
        other = DirtyBitmap(self.size, RS)
        regs = set(data.draw(st.lists(st.integers(0, max(0, self.nregions() - 1)), max_size=20)))
        if self.size == 0:
            regs = set()
        for r in regs:
            other.set_region(r)
        assert self.bm.union_update(other) == len(regs - self.model)
        self.model |= regs

    @rule(size=st.integers(0, RS * 200))
    def resize(self, size: int) -> None:
        self.bm.resize(size)
        self.size = size
        self.model = {r for r in self.model if r < self.nregions()}

    @rule(value=st.booleans())
    def all_bits(self, value: bool) -> None:
        if value:
            assert self.bm.set_all() == self.nregions() - len(self.model)
            self.model = set(range(self.nregions()))
        else:
            assert self.bm.clear_all() == len(self.model)
            self.model = set()

    @rule()
    def roundtrip(self) -> None:
        copy = DirtyBitmap.from_bytes(self.bm.to_bytes(), size_bytes=self.size, region_size=RS)
        assert copy == self.bm
        assert self.bm.copy() == self.bm

    @invariant()
    def agrees(self) -> None:
        bm, model = self.bm, self.model
        assert bm.nbits == self.nregions()
        assert bm.count() == len(model)
        assert bm.any() == bool(model)
        runs = model_runs(model)
        assert list(bm.runs()) == runs
        assert list(bm.regions()) == sorted(model)
        assert list(bm.byte_ranges()) == [
            (s * RS, min((s + n) * RS, self.size) - s * RS) for s, n in runs
        ]
        for r in list(model)[:5]:
            assert bm.is_set(r)


TestBitmapModel = BitmapMachine.TestCase
TestBitmapModel.settings = settings(max_examples=100, stateful_step_count=30, deadline=None)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 3 * 4096 * 8 - 1), max_size=300))
def test_runs_across_windows(regions: list[int]) -> None:
    # spans several 4096-byte scan windows and 64-byte sub-windows
    size = 3 * 4096 * 8 * RS
    bm = DirtyBitmap(size, RS)
    for r in regions:
        bm.set_region(r)
    assert list(bm.runs()) == model_runs(set(regions))


def test_runs_long_and_dense() -> None:
    size = 100_000 * RS + 17
    bm = DirtyBitmap(size, RS)
    rng = random.Random(7)
    model: set[int] = set()
    for _ in range(300):
        a = rng.randrange(bm.nbits)
        b = min(bm.nbits, a + rng.choice([1, 3, 9, 64, 511, 4097]))
        bm.set_range(a * RS, min(b * RS, size) - a * RS)
        model |= set(range(a, b))
    assert list(bm.runs()) == model_runs(model)
    assert bm.set_all() == bm.nbits - len(model)
    assert list(bm.runs()) == [(0, bm.nbits)]


def test_geometry_and_argument_errors() -> None:
    with pytest.raises(InvalidArgument):
        DirtyBitmap(100, 3000)
    with pytest.raises(InvalidArgument):
        DirtyBitmap(100, 2048)
    with pytest.raises(InvalidArgument):
        DirtyBitmap(-1)
    bm = DirtyBitmap(10 * DEFAULT_REGION_SIZE)
    assert bm.region_size == DEFAULT_REGION_SIZE and bm.nbits == 10
    with pytest.raises(OutOfRange):
        bm.set_range(10 * DEFAULT_REGION_SIZE - 1, 2)
    with pytest.raises(OutOfRange):
        bm.set_range(-1, 1)
    with pytest.raises(InvalidArgument):
        bm.set_range(0, -1)
    with pytest.raises(OutOfRange):
        bm.set_region(10)
    with pytest.raises(OutOfRange):
        bm.is_set(-1)
    assert bm.set_range(0, 0) == 0
    with pytest.raises(InvalidArgument, match="geometry"):
        bm.union_update(DirtyBitmap(11 * DEFAULT_REGION_SIZE))
    with pytest.raises(InvalidArgument, match="geometry"):
        bm.union_update(DirtyBitmap(10 * DEFAULT_REGION_SIZE, 8192))
    with pytest.raises(InvalidArgument):
        DirtyBitmap.from_bytes(b"\x00\x04", size_bytes=10 * DEFAULT_REGION_SIZE)  # bit 10 set
    with pytest.raises(InvalidArgument):
        DirtyBitmap.from_bytes(b"\x00", size_bytes=10 * DEFAULT_REGION_SIZE)
    assert bm.region_span(9) == (9 * DEFAULT_REGION_SIZE, DEFAULT_REGION_SIZE)
    short = DirtyBitmap(DEFAULT_REGION_SIZE + 4096)
    assert short.region_span(1) == (DEFAULT_REGION_SIZE, 4096)


def test_clear_range_only_clears_covered_regions() -> None:
    bm = DirtyBitmap(4 * RS + 100, RS)
    bm.set_all()
    assert bm.clear_range(100, RS) == 0  # covers no region completely
    assert bm.clear_range(RS, RS + 1) == 1
    assert bm.clear_range(4 * RS, 100) == 1  # the short last region, reaching the end
    assert list(bm.regions()) == [0, 2, 3]


def test_shrink_keeps_padding_clear() -> None:
    bm = DirtyBitmap(20 * RS, RS)
    bm.set_all()
    bm.resize(11 * RS)
    assert bm.count() == 11
    bm.resize(20 * RS)
    assert bm.count() == 11 and list(bm.runs()) == [(0, 11)]
    bm.resize(0)
    assert bm.count() == 0 and bm.to_bytes() == b""


def test_set_range_cost() -> None:
    """The write path updates the bitmap on every write: a call must cost microseconds."""
    bm = DirtyBitmap(1 << 40)  # 1 TiB, 16 Mi regions
    rng = random.Random(1)
    offs = [rng.randrange(0, (1 << 40) // 4096) * 4096 for _ in range(20_000)]
    t0 = time.perf_counter()
    for o in offs:
        bm.set_range(o, 4096)
    per_call = (time.perf_counter() - t0) / len(offs)
    assert per_call < 50e-6  # ~1.5 us measured; generous for a noisy shared machine
    t0 = time.perf_counter()
    assert sum(n for _, n in bm.runs()) == bm.count()
    assert time.perf_counter() - t0 < 5.0


# --- persistence ---------------------------------------------------------------------------------


def _random_bitmap(rng: random.Random, size: int) -> DirtyBitmap:
    bm = DirtyBitmap(size, RS)
    for _ in range(rng.randrange(0, 20)):
        off = rng.randrange(0, max(1, size))
        bm.set_range(off, rng.randrange(0, size - off + 1))
    return bm


def test_save_load_roundtrip(tmp_path: Path) -> None:
    path = tmp_path / "unsent.bitmap"
    bm = DirtyBitmap(123 * RS + 5, RS)
    bm.set_range(7 * RS, 3 * RS)
    bm.save(path, stamp=2**64 - 1)
    loaded, stamp = DirtyBitmap.load(path)
    assert loaded == bm and stamp == 2**64 - 1
    assert loaded.size_bytes == bm.size_bytes and loaded.region_size == RS
    empty = DirtyBitmap(0, RS)
    empty.save(path, stamp=3)
    assert DirtyBitmap.load(path) == (empty, 3)
    with pytest.raises(InvalidArgument):
        bm.save(path, stamp=-1)
    with pytest.raises(NotFound):
        DirtyBitmap.load(tmp_path / "missing")
    assert not list(tmp_path.glob("*.tmp-*"))


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    seed=st.integers(0, 2**32),
    size=st.integers(0, RS * 300),
    damage=st.sampled_from(["cut", "flip", "overwrite", "extend", "zero-tail"]),
    where=st.floats(0, 1, exclude_max=True),
)
def test_damaged_file_never_loads_a_wrong_state(
    tmp_path: Path, seed: int, size: int, damage: str, where: float
) -> None:
    rng = random.Random(seed)
    bm = _random_bitmap(rng, size)
    path = tmp_path / f"b-{seed}-{damage}"
    stamp = rng.randrange(2**64)
    bm.save(path, stamp=stamp)
    raw = bytearray(path.read_bytes())
    pos = int(where * len(raw))
    if damage == "cut":
        raw = raw[:pos]
    elif damage == "flip":
        raw[pos] ^= 1 << rng.randrange(8)
    elif damage == "overwrite":
        n = rng.randrange(1, 64)
        raw[pos : pos + n] = rng.randbytes(min(n, len(raw) - pos))
    elif damage == "extend":
        raw += rng.randbytes(rng.randrange(1, 100))
    else:
        raw[pos:] = bytes(len(raw) - pos)
    path.write_bytes(bytes(raw))
    try:
        loaded, got_stamp = DirtyBitmap.load(path)
    except BitmapCorrupt:
        return
    # loading is only allowed when the damage changed nothing
    assert (loaded, got_stamp) == (bm, stamp)


@pytest.mark.parametrize("fail_at", ["write", "fsync", "replace", "dirsync"])
def test_crash_during_save_leaves_old_or_new(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail_at: str
) -> None:
    path = tmp_path / "changed.bitmap"
    old = DirtyBitmap(50 * RS, RS)
    old.set_range(0, 5 * RS)
    old.save(path, stamp=1)
    new = old.copy()
    new.set_range(20 * RS, 10 * RS)

    class Crash(Exception):
        pass

    def boom(*args: object, **kwargs: object) -> None:
        raise Crash

    real_pwrite = os.pwrite

    def torn_pwrite(fd: int, data: bytes, offset: int) -> int:
        # the "crash" hits after part of the new content reached the temp file
        real_pwrite(fd, bytes(memoryview(data)[: len(data) // 2]), offset)
        raise Crash

    if fail_at == "write":
        monkeypatch.setattr(os, "pwrite", torn_pwrite)
    elif fail_at == "fsync":
        monkeypatch.setattr(os, "fsync", boom)
    elif fail_at == "replace":
        monkeypatch.setattr(os, "replace", boom)
    else:
        monkeypatch.setattr(fileutil, "fsync_dir", boom)
    with pytest.raises(Crash):
        new.save(path, stamp=2)
    monkeypatch.undo()
    loaded = DirtyBitmap.load(path)
    if fail_at == "dirsync":
        assert loaded == (new, 2)  # renamed already: the new state is there
    else:
        assert loaded == (old, 1)
    assert not list(tmp_path.glob("*.tmp-*"))  # the failed save cleaned up after itself


def test_stale_temp_files_are_removed(tmp_path: Path) -> None:
    path = tmp_path / "x.bitmap"
    DirtyBitmap(RS, RS).save(path)
    stale = tmp_path / "x.bitmap.tmp-123-abcd"
    stale.write_bytes(b"partial")
    assert fileutil.remove_stale_temps(path) == [stale]
    assert not stale.exists() and path.exists()
