"""Journal append throughput against a raw sequential write of the same bytes.

For 4 KiB and 64 KiB records at 1 and 32 concurrent writers, the journal (group commit, one
fdatasync per group) is compared with the best a single thread can do with the same durability:
write `writers` records' worth of bytes (64-byte header + data each) with one write(), then
fdatasync, and repeat. Both run on the same filesystem (a fresh directory under the current
directory, or --dir; not tmpfs) for the same time, in pairs, alternating which goes first.

The machine may be shared and noisy, so each case runs several (raw, journal) pairs: MB/s
figures are the best run of each, and `journal_vs_raw_*` is the median of the per-pair ratios,
since the two runs of a pair see about the same background load. MB/s is 10**6 bytes of record
data per second.

    python -m targetd_repl_bench.journal [--quick] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

from targetd_repl.model import RecordKind
from targetd_repl.storage.journal import Journal
from targetd_repl.storage.journal_record import HEADER_SIZE

KIB = 1024
CASES = ((4 * KIB, 1), (4 * KIB, 32), (64 * KIB, 1), (64 * KIB, 32))
PAIRS = 11  # (raw, journal) pairs per case
RUN_SECONDS = 0.25  # each run appends this long: 4 cases x 11 pairs x 2 runs ~ 25-35 s
QUICK_PAIRS = 1
QUICK_RUN_SECONDS = 0.1


def _raw_run(work: Path, size: int, writers: int, seconds: float) -> tuple[int, float]:
    """Write batches of `writers` records (one write + one fdatasync each) for `seconds`;
    return the records written and the time taken."""
    path = work / "raw.bin"
    batch = os.urandom((HEADER_SIZE + size) * writers)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
    batches = 0
    try:
        start = time.perf_counter()
        deadline = start + seconds
        while True:
            os.write(fd, batch)
            os.fdatasync(fd)
            batches += 1
            now = time.perf_counter()
            if now >= deadline:
                break
        elapsed = now - start
    finally:
        os.close(fd)
        path.unlink()
    return batches * writers, elapsed


def _journal_run(work: Path, size: int, writers: int, seconds: float) -> tuple[int, float, int]:
    """`writers` threads append records for `seconds`; return the appends (all acknowledged,
    so durable), the time until the last one returned, and the fdatasyncs they took."""
    path = work / "journal"
    journal = Journal.open(path, group_id=1, size_limit=1 << 40)
    payloads = [os.urandom(size) for _ in range(writers)]
    counts = [0] * writers
    stop = threading.Event()
    gate = threading.Barrier(writers + 1)
    errors: list[BaseException] = []

    def writer(index: int) -> None:
        data = payloads[index]
        append = journal.append
        done = 0
        gate.wait()
        try:
            while not stop.is_set():
                append(RecordKind.WRITE, index, done, data, epoch=1)
                done += 1
        except BaseException as exc:
            errors.append(exc)
        counts[index] = done

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(writers)]
    for thread in threads:
        thread.start()
    try:
        gate.wait()
        start = time.perf_counter()
        stop.wait(seconds)
        stop.set()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - start
        fsyncs = journal.fsync_count
    finally:
        stop.set()
        journal.close()
        shutil.rmtree(path)
    if errors:
        raise errors[0]
    return sum(counts), elapsed, fsyncs


def _filesystem(path: Path) -> str:
    """The type of the filesystem holding `path` (longest mount point prefix)."""
    best, fstype = "", "unknown"
    try:
        with open("/proc/mounts", encoding="utf-8") as mounts:
            for line in mounts:
                fields = line.split()
                mount = fields[1]
                if str(path).startswith(mount) and len(mount) > len(best):
                    best, fstype = mount, fields[2]
    except OSError:
        pass
    return fstype


def run(quick: bool = False, directory: Path | None = None) -> dict[str, float | int | str]:
    """Measure and return the figures (see the module docstring)."""
    base = Path(directory) if directory is not None else Path.cwd()
    work = Path(tempfile.mkdtemp(prefix="bench-journal-", dir=base)).resolve()
    pairs = QUICK_PAIRS if quick else PAIRS
    seconds = QUICK_RUN_SECONDS if quick else RUN_SECONDS
    result: dict[str, float | int | str] = {
        "bench": "journal",
        "quick": int(quick),
        "journal_filesystem": _filesystem(work),
        "journal_pairs": pairs,
    }
    started = time.perf_counter()
    try:
        for size, writers in CASES:
            raw_mbps: list[float] = []
            journal_mbps: list[float] = []
            per_fsync: list[float] = []
            for pair in range(pairs):
                # Alternate which goes first so neither always runs on a cold or warm system.
                for is_raw in (True, False) if pair % 2 == 0 else (False, True):
                    if is_raw:
                        records, elapsed = _raw_run(work, size, writers, seconds)
                        raw_mbps.append(records * size / elapsed / 1e6)
                    else:
                        records, elapsed, fsyncs = _journal_run(work, size, writers, seconds)
                        journal_mbps.append(records * size / elapsed / 1e6)
                        per_fsync.append(records / max(fsyncs, 1))
            name = f"{size // KIB}k_qd{writers}"
            ratios = [j / r for j, r in zip(journal_mbps, raw_mbps, strict=True)]
            result[f"raw_{name}_mbps"] = round(max(raw_mbps), 1)
            result[f"journal_{name}_mbps"] = round(max(journal_mbps), 1)
            result[f"journal_{name}_records_per_fsync"] = round(statistics.median(per_fsync), 1)
            result[f"journal_vs_raw_{name}"] = round(statistics.median(ratios), 3)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["journal_bench_seconds"] = round(time.perf_counter() - started, 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds, for smoke tests")
    parser.add_argument("--dir", type=Path, default=None, help="where to write (not tmpfs)")
    args = parser.parse_args()
    print(json.dumps(run(quick=args.quick, directory=args.dir)))


if __name__ == "__main__":
    main()
