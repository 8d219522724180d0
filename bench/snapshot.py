"""Benchmark: volume write throughput through the copy-on-write path, one snapshot vs none.

Same volume, same write pattern, same run: rounds alternate (plain, snap, snap, plain, ...) and
the median of each side is reported, because the machine is shared and noisy. Two patterns:

  * rand4k:  4 KiB writes at random 4 KiB-aligned offsets over the whole volume (with a fresh
             snapshot many are a first overwrite of their 64 KiB chunk: copy + fdatasync);
  * seq64k:  one sequential pass of 64 KiB writes (every write a first overwrite);
  * rand4k in batches of 32 (`snapshot_batch32_*`): each batch's before-images preserved with
             one `before_write_many` (one record, one fdatasync), as the data path does for the
             WRITEs of one ring poll; `snapshot_batch32_vs_single` is the group commit's gain.

A timed round is: for each write, `SnapshotSet.before_write` then `Volume.pwrite` (exactly the
data path's order), then one `Volume.flush()` so both sides pay for getting their data to disk.
The snapshot is created before and deleted after the timed part. A "warm" pass repeats the
pattern with the snapshot still there (every chunk already preserved): the steady-state cost.
Files live in a temporary directory under the current directory (the work disk, not tmpfs).

Prints JSON: `python -m targetd_repl_bench.snapshot [--quick]`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from targetd_repl.model import DEFAULT_REGION_SIZE
from targetd_repl.storage.bitmap import DirtyBitmap
from targetd_repl.storage.snapshot import SnapshotSet
from targetd_repl.storage.volume import Volume

MiB = 1 << 20
BATCH = 32  # writes per before_write_many: one ring poll at queue depth 32
Result = dict[str, float | int | str]


def _timed(
    vol: Volume, ss: SnapshotSet, offsets: list[int], payload: bytes, batch: int
) -> tuple[float, int]:
    """Write `payload` at each offset through the COW path, then flush; (seconds, preserved).
    `batch` > 1: the writes go in groups, each preserved with one `before_write_many` (the
    data path's batch of one ring poll) before its overwrites."""
    vol.flush()  # start with no dirty data of the previous round
    preserved = 0
    n = len(payload)
    pwrite = vol.pwrite
    t0 = time.perf_counter()
    if batch == 1:
        before_write = ss.before_write
        for off in offsets:
            preserved += before_write(off, n)
            pwrite(off, payload)
    else:
        for lo in range(0, len(offsets), batch):
            group = offsets[lo : lo + batch]
            preserved += ss.before_write_many([(off, n) for off in group])
            for off in group:
                pwrite(off, payload)
    vol.flush()
    return time.perf_counter() - t0, preserved


def _round(
    vol: Volume,
    ss: SnapshotSet,
    offsets: list[int],
    payload: bytes,
    with_snapshot: bool,
    batch: int,
) -> tuple[float, int, float]:
    """One round; returns (seconds, chunks preserved, seconds of a second pass with the
    snapshot still there: every chunk already preserved, the steady state)."""
    if not with_snapshot:
        secs, _ = _timed(vol, ss, offsets, payload, batch)
        return secs, 0, 0.0
    ss.create("bench")
    secs, preserved = _timed(vol, ss, offsets, payload, batch)
    warm, _ = _timed(vol, ss, offsets, payload, batch)
    ss.delete("bench")
    return secs, preserved, warm


def _pattern(
    vol: Volume, ss: SnapshotSet, offsets: list[int], payload: bytes, pairs: int, batch: int = 1
) -> tuple[float, float, float, float]:
    """Alternate plain and snapshot rounds (ABBA order); return median MB/s of plain, of
    snapshot (first overwrites), of snapshot (warm), and the mean chunks preserved."""
    plain: list[float] = []
    snap: list[float] = []
    warm: list[float] = []
    preserved: list[int] = []
    total = len(offsets) * len(payload) / 1e6
    for i in range(pairs):
        order = (False, True) if i % 2 == 0 else (True, False)
        for with_snapshot in order:
            secs, kept, warm_secs = _round(vol, ss, offsets, payload, with_snapshot, batch)
            if with_snapshot:
                snap.append(total / secs)
                warm.append(total / warm_secs)
                preserved.append(kept)
            else:
                plain.append(total / secs)
    return (
        statistics.median(plain),
        statistics.median(snap),
        statistics.median(warm),
        statistics.mean(preserved),
    )


def _set_range_us(calls: int) -> float:
    """Cost of DirtyBitmap.set_range for one 4 KiB write on a 1 TiB bitmap (microseconds)."""
    bm = DirtyBitmap(1 << 40)
    rng = random.Random(3)
    offs = [rng.randrange((1 << 40) // 4096) * 4096 for _ in range(calls)]
    set_range = bm.set_range
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for o in offs:
            set_range(o, 4096)
        best = min(best, (time.perf_counter() - t0) / calls)
    return best * 1e6


def run(quick: bool = False) -> Result:
    started = time.perf_counter()
    size = (128 if quick else 256) * MiB
    rand_writes = 3000 if quick else 8192
    seq_bytes = (32 if quick else 128) * MiB
    pairs = 2 if quick else 3
    chunk = DEFAULT_REGION_SIZE
    rng = random.Random(42)
    workdir = Path(tempfile.mkdtemp(prefix=".bench-snapshot-", dir=os.getcwd()))
    try:
        vol = Volume.create(workdir / "bench.img", size_bytes=size, block_size=4096)
        fill = rng.randbytes(MiB)
        for off in range(0, size, MiB):  # a written volume, not holes: copies read real data
            vol.pwrite(off, fill)
        vol.flush()
        ss = SnapshotSet(workdir / "snapshots", vol, chunk_size=chunk)
        rand_offsets = [rng.randrange(size // 4096) * 4096 for _ in range(rand_writes)]
        seq_offsets = list(range(0, seq_bytes, 64 * 1024))
        r_plain, r_snap, r_warm, r_kept = _pattern(
            vol, ss, rand_offsets, rng.randbytes(4096), pairs
        )
        s_plain, s_snap, s_warm, s_kept = _pattern(
            vol, ss, seq_offsets, rng.randbytes(65536), pairs
        )
        b_plain, b_snap, _, _ = _pattern(
            vol, ss, rand_offsets, rng.randbytes(4096), pairs, batch=BATCH
        )
        ss.close()
        vol.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "snapshot_write_vs_plain": round(r_snap / r_plain, 4),
        "snapshot_seq64k_write_vs_plain": round(s_snap / s_plain, 4),
        "snapshot_batch32_write_vs_plain": round(b_snap / b_plain, 4),
        "snapshot_batch32_vs_single": round(b_snap / r_snap, 3),
        "snapshot_warm_write_vs_plain": round(r_warm / r_plain, 4),
        "snapshot_warm_seq64k_write_vs_plain": round(s_warm / s_plain, 4),
        "plain_rand4k_mb_s": round(r_plain, 2),
        "snapshot_rand4k_mb_s": round(r_snap, 2),
        "snapshot_rand4k_batch32_mb_s": round(b_snap, 2),
        "plain_seq64k_mb_s": round(s_plain, 2),
        "snapshot_seq64k_mb_s": round(s_snap, 2),
        "rand4k_writes": rand_writes,
        "rand4k_first_overwrites": round(r_kept),
        "seq64k_mib": seq_bytes // MiB,
        "seq64k_first_overwrites": round(s_kept),
        "volume_mib": size // MiB,
        "chunk_kib": chunk // 1024,
        "round_pairs": pairs,
        "bitmap_set_range_us": round(_set_range_us(20_000 if quick else 100_000), 3),
        "quick": int(quick),
        "elapsed_s": round(time.perf_counter() - started, 2),
        "note": "median of alternating rounds; each round ends with one fdatasync of the volume",
    }


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    print(json.dumps(run(quick="--quick" in args)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
