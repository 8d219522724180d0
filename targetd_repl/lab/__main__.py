"""`python -m targetd_repl.lab`: prepare the host, list and run guest scenarios.

prepare                      fetch the kernel, build the initramfs (idempotent, cached)
list                         the scenarios and what they prove
run SCENARIO [--timeout S] [--kvm auto|on|off] [--mem MB] [--smp N] [--json]
run --all                    every scenario, one guest each
run script --script FILE     run FILE with the venv's Python inside a guest (exploration)

Two-site scenarios (`list` shows their sites) boot two guests on a private network.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from targetd_repl.lab.errors import LabError
from targetd_repl.lab.prepare import prepare
from targetd_repl.lab.qemu import (
    DEFAULT_MEM_MB,
    DEFAULT_PAIR_MEM_MB,
    DEFAULT_PAIR_SMP,
    DEFAULT_SMP,
    PairResult,
    ScenarioResult,
    run_pair_scenario,
    run_scenario,
)
from targetd_repl.lab.registry import load_all


def _summary(result: ScenarioResult | PairResult) -> dict[str, object]:
    if isinstance(result, PairResult):
        return {
            "scenario": result.name,
            "ok": result.ok,
            "accel": result.accel,
            "duration_s": result.duration_s,
            "sites": {site: _summary(one) for site, one in result.sites.items()},
            "run_dir": str(result.run_dir),
        }
    return {
        "scenario": result.name,
        "ok": result.ok,
        "accel": result.accel,
        "duration_s": result.duration_s,
        "timings": result.timings,
        "data": result.data,
        "run_dir": str(result.run_dir),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m targetd_repl.lab",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("prepare", help="fetch the guest kernel and build the initramfs")
    sub.add_parser("list", help="list the scenarios")
    run = sub.add_parser("run", help="boot a guest and run a scenario")
    run.add_argument("scenario", nargs="?")
    run.add_argument("--all", action="store_true", help="run every scenario")
    run.add_argument("--timeout", type=float, default=None, help="seconds, boot included")
    run.add_argument("--kvm", choices=("auto", "on", "off"), default="auto")
    run.add_argument(
        "--mem",
        type=int,
        default=None,
        help=f"guest memory in MiB (default {DEFAULT_MEM_MB}, two-site {DEFAULT_PAIR_MEM_MB})",
    )
    run.add_argument(
        "--smp",
        type=int,
        default=None,
        help=f"guest CPUs (default {DEFAULT_SMP}, two-site {DEFAULT_PAIR_SMP} each)",
    )
    run.add_argument("--script", help="for the `script` scenario: a Python file to run")
    run.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")

    try:
        if args.command == "prepare":
            started = time.monotonic()
            image = prepare()
            print(image.to_json())
            print(f"lab: prepared in {time.monotonic() - started:.1f} s", file=sys.stderr)
            return 0
        if args.command == "list":
            for name, spec in sorted(load_all().items()):
                sites = f"[sites {' '.join(spec.sites)}] " if spec.sites else ""
                print(f"{name:24} {sites}{spec.doc}")
            return 0
        if args.all == bool(args.scenario):
            parser.error("run takes a SCENARIO or --all")
        names = sorted(load_all()) if args.all else [args.scenario]
        if args.all:
            names = [name for name in names if name != "script"]
        params = {"lab_script": "/lab-results/script.py"} if args.script else None
        files = {"script.py": Path(args.script)} if args.script else None
        failed = 0
        summaries = []
        scenarios = load_all()
        for name in names:
            result: ScenarioResult | PairResult
            try:
                if name in scenarios and scenarios[name].sites:
                    result = run_pair_scenario(
                        name,
                        args.timeout,
                        kvm=args.kvm,
                        mem_mb=args.mem or DEFAULT_PAIR_MEM_MB,
                        smp=args.smp or DEFAULT_PAIR_SMP,
                        params=params,
                    )
                else:
                    result = run_scenario(
                        name,
                        args.timeout,
                        kvm=args.kvm,
                        mem_mb=args.mem or DEFAULT_MEM_MB,
                        smp=args.smp or DEFAULT_SMP,
                        params=params,
                        files=files,
                    )
            except LabError as exc:
                failed += 1
                print(str(exc), file=sys.stderr)
                continue
            summaries.append(_summary(result))
            if not args.json:
                print(
                    f"lab: {name} passed in {result.duration_s:.1f} s ({result.accel}); "
                    f"logs in {result.run_dir}"
                )
        if args.json:
            print(json.dumps(summaries, indent=2, sort_keys=True, default=str))
        return 1 if failed else 0
    except LabError as exc:
        print(str(exc), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
