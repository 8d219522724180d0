"""Benchmark: our TCMU data path against the kernel's own fileio backstore, on a real kernel.

One QEMU lab guest (scenario `datapath_bench`) exports two LUNs of 128 MiB from one target: LUN 0
served by our handler (`python -m targetd_repl.datapath --engine`, journal + volume on the
guest's tmpfs) and LUN 1 a kernel fileio backstore on a file in the same tmpfs. open-iscsi logs
in to both; fio (libaio, direct=1, time based) runs each job on both LUNs: 1 MiB sequential
write and read (queue depth 8), 4 KiB random write and read at queue depth 8 and 32. The machines
are shared and their load drifts, so each job runs in several short rounds (3 x 5 s; --quick:
1 x 3 s) alternating between the LUNs, and the totals are compared; `<ratio>_min/_max` give the
spread of the per-round ratios.

Durability is the same on both sides: write-through. The fileio LUN opens its file O_DSYNC
(write_back=False, no volatile cache advertised); our LUN acknowledges a write once the journal's
fdatasync returned. On tmpfs neither sync costs anything, so the ratios measure the data paths
(ring, SCSI emulation, journal and volume writes in Python versus the kernel's fileio), not a
disk.

LUN 2 is the plain handler: the same ring and SCSI code (`python -m targetd_repl.datapath --file`,
every command on the loop thread) serving a plain O_DSYNC file on the same tmpfs, with no journal,
no CRC, no replication hook: the fastest a pure-Python TCMU handler goes in this guest. Its
ratios split the gap to fileio in two, measured in the same run: `plain_<ratio>` (plain /
fileio: what userspace TCMU in Python costs, the floor under any such handler) and
`<job>_vs_plain` (ours / plain: what journaling every write before its completion costs).

Absolute figures under TCG (software emulation) are slow and noisy; compare the ratios, which are
measured in the same guest at the same time. Prints JSON:

    seq_write_vs_fileio, seq_read_vs_fileio          MB/s ratios (ours / fileio)
    rand4k_write_vs_fileio, rand4k_read_vs_fileio    IOPS ratios at queue depth 32
    rand4k_write_qd8_vs_fileio, rand4k_read_qd8_vs_fileio
    plain_<ratio>, <job>_vs_plain                    the plain handler's split (above)
    ours_<job>_iops|mb_s, fileio_<job>_iops|mb_s     the raw figures

    python -m targetd_repl_bench.datapath [--quick] [--jobs seq_write,...] [--profile JOB]
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from targetd_repl.lab.qemu import run_scenario

SCENARIO = "datapath_bench"
MEM_MB = 1536
RATIOS = {
    "seq_write_vs_fileio": ("seq_write", "mb_s"),
    "seq_read_vs_fileio": ("seq_read", "mb_s"),
    "rand4k_write_vs_fileio": ("rand4k_write_qd32", "iops"),
    "rand4k_read_vs_fileio": ("rand4k_read_qd32", "iops"),
    "rand4k_write_qd8_vs_fileio": ("rand4k_write_qd8", "iops"),
    "rand4k_read_qd8_vs_fileio": ("rand4k_read_qd8", "iops"),
}


def summarize(data: dict[str, Any]) -> dict[str, float | int | str]:
    """The ratios and raw figures from the scenario's result data."""
    results: dict[str, dict[str, dict[str, float]]] = data["results"]
    out: dict[str, float | int | str] = {}
    spread: dict[str, list[float | None]] = data.get("round_ratios", {})
    for key, (job, metric) in RATIOS.items():
        ours = results["ours"].get(job, {}).get(metric)
        theirs = results["fileio"].get(job, {}).get(metric)
        if ours is not None and theirs:
            out[key] = round(ours / theirs, 3)
        rounds = [r for r in spread.get(job, []) if r is not None]
        if len(rounds) > 1:  # how much the shared machine moved the ratio between rounds
            out[f"{key}_min"] = min(rounds)
            out[f"{key}_max"] = max(rounds)
    plain = results.get("plain")
    plain_spread: dict[str, list[float | None]] = data.get("plain_round_ratios", {})
    for key, (job, metric) in RATIOS.items() if plain else ():
        ours = results["ours"].get(job, {}).get(metric)
        floor = plain.get(job, {}).get(metric) if plain else None
        theirs = results["fileio"].get(job, {}).get(metric)
        if floor is not None and theirs:
            out[f"plain_{key}"] = round(floor / theirs, 3)
        if ours is not None and floor:
            out[key.replace("_vs_fileio", "_vs_plain")] = round(ours / floor, 3)
        rounds = [r for r in plain_spread.get(job, []) if r is not None]
        if len(rounds) > 1:
            out[f"plain_{key}_min"] = min(rounds)
            out[f"plain_{key}_max"] = max(rounds)
    for label, jobs in results.items():
        for job, figures in jobs.items():
            out[f"{label}_{job}_iops"] = figures["iops"]
            out[f"{label}_{job}_mb_s"] = figures["mb_s"]
            out[f"{label}_{job}_lat_ms"] = figures["lat_ms"]
    out["runtime_s"] = int(data["runtime_s"])
    out["rounds"] = int(data.get("rounds", 1))
    out["workers"] = int(data["workers"])
    out["durability"] = str(data["durability"])
    out["crc32c"] = str(data.get("crc32c", "unknown"))
    return out


def run(
    quick: bool = False,
    *,
    jobs: list[str] | None = None,
    profile: str | None = None,
    pyspy: str | None = None,
    workers: int | None = None,
    plain: bool = True,
) -> dict[str, float | int | str]:
    """Boot one lab guest, run the fio jobs on both LUNs, return ratios and raw figures."""
    params = {"lab_quick": "1" if quick else "0"}
    if jobs:
        params["lab_jobs"] = ",".join(jobs)
    if profile:
        params["lab_profile"] = profile
    if pyspy:
        params["lab_pyspy"] = pyspy
    if workers is not None:
        params["lab_workers"] = str(workers)
    if not plain:
        params["lab_plain"] = "0"
    result = run_scenario(SCENARIO, params=params, mem_mb=MEM_MB)
    out = summarize(result.data)
    out["accel"] = result.accel
    out["guest_run_s"] = round(result.duration_s, 1)
    out["run_dir"] = str(result.run_dir)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--jobs", help="comma-separated subset of the fio jobs")
    parser.add_argument("--profile", help="py-spy the handler during this job (ours)")
    parser.add_argument("--pyspy", help="path of the py-spy binary (seen by the guest)")
    parser.add_argument("--workers", type=int, help="handler worker threads")
    parser.add_argument("--no-plain", action="store_true", help="skip the plain handler's LUN")
    args = parser.parse_args(argv)
    out = run(
        args.quick,
        jobs=args.jobs.split(",") if args.jobs else None,
        profile=args.profile,
        pyspy=args.pyspy,
        workers=args.workers,
        plain=not args.no_plain,
    )
    print(json.dumps(out, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
