"""Journal append throughput against a raw sequential write of the same bytes.

For 4 KiB and 64 KiB records at 1 and 32 concurrent writers, the journal (group commit, one
fdatasync per batch) is compared with the best a single thread can do with the same durability:
write `writers` records' worth of bytes (header + data) with one write(), fdatasync, repeat.
Both run on the same filesystem (a fresh directory under the current directory, not tmpfs), in
alternating rounds; each figure is the best round, because the machine is shared and noisy.

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
MIB = 1024 * KIB
CASES = ((4 * KIB, 1), (4 * KIB, 32), (64 * KIB, 1), (64 * KIB, 32))
# Records per run, sized so a raw run takes about a quarter of a second on a ~1 GB/s disk.
RECORDS = {
    (4 * KIB, 1): 1_500,
    (4 * KIB, 32): 16_384,
    (64 * KIB, 1): 1_000,
    (64 * KIB, 32): 4_096,
}
PAIRS = 7
QUICK_DIVISOR = 8


def _raw_run(work: Path, size: int, writers: int, records: int) -> tuple[float, int]:
    """Seconds to write `records` records in batches of `writers`, one fdatasync per batch."""
    path = work / "raw.bin"
    batch = os.urandom((HEADER_SIZE + size) * writers)
    batches = records // writers
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
    try:
        start = time.perf_counter()
        for _ in range(batches):
            os.write(fd, batch)
            os.fdatasync(fd)
        elapsed = time.perf_counter() - start
    finally:
        os.close(fd)
        path.unlink()
    return elapsed, batches


def _journal_run(work: Path, size: int, writers: int, records: int) -> tuple[float, int]:
    """Seconds for `writers` threads to append `records` records in all; and the fsync count."""
    path = work / "journal"
    journal = Journal.open(path, group_id=1, size_limit=1 << 40)
    per_writer = records // writers
    payloads = [os.urandom(size) for _ in range(writers)]
    gate = threading.Barrier(writers + 1)
    errors: list[BaseException] = []

    def writer(index: int) -> None:
        data = payloads[index]
        append = journal.append
        gate.wait()
        try:
            for lba in range(per_writer):
                append(RecordKind.WRITE, index, lba, data, epoch=1)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(writers)]
    for thread in threads:
        thread.start()
    try:
        gate.wait()
        start = time.perf_counter()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - start
        fsyncs = journal.fsync_count
    finally:
        journal.close()
        shutil.rmtree(path)
    if errors:
        raise errors[0]
    return elapsed, fsyncs


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
    """Measure and return the figures (MB/s are 10**6 bytes of record data per second).

    Each case runs `pairs` times as a (raw, journal) pair, alternating which goes first. MB/s
    figures are the best run; `journal_vs_raw_*` is the median of the per-pair ratios, since the
    two runs of a pair see about the same background load."""
    base = Path(directory) if directory is not None else Path.cwd()
    work = Path(tempfile.mkdtemp(prefix="bench-journal-", dir=base)).resolve()
    pairs = 1 if quick else PAIRS
    result: dict[str, float | int | str] = {
        "bench": "journal",
        "filesystem": _filesystem(work),
        "pairs": pairs,
        "quick": int(quick),
    }
    started = time.perf_counter()
    try:
        for size, writers in CASES:
            records = RECORDS[size, writers] // (QUICK_DIVISOR if quick else 1)
            records -= records % writers
            mbytes = records * size / 1e6
            raw_mbps: list[float] = []
            journal_mbps: list[float] = []
            fsyncs: list[int] = []
            for pair in range(pairs):
                order = (True, False) if pair % 2 == 0 else (False, True)
                for is_raw in order:
                    if is_raw:
                        seconds, _ = _raw_run(work, size, writers, records)
                        raw_mbps.append(mbytes / seconds)
                    else:
                        seconds, syncs = _journal_run(work, size, writers, records)
                        journal_mbps.append(mbytes / seconds)
                        fsyncs.append(syncs)
            name = f"{size // KIB}k_qd{writers}"
            ratios = [j / r for j, r in zip(journal_mbps, raw_mbps, strict=True)]
            result[f"raw_{name}_mbps"] = round(max(raw_mbps), 1)
            result[f"journal_{name}_mbps"] = round(max(journal_mbps), 1)
            result[f"journal_{name}_records_per_fsync"] = round(
                records / statistics.median(fsyncs), 1
            )
            result[f"journal_vs_raw_{name}"] = round(statistics.median(ratios), 3)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds, for smoke tests")
    parser.add_argument("--dir", type=Path, default=None, help="where to write (not tmpfs)")
    args = parser.parse_args()
    print(json.dumps(run(quick=args.quick, directory=args.dir)))


if __name__ == "__main__":
    main()
