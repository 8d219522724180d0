"""The `targetd-repl` command line. Subcommands that act on a site speak the control API only;
`bench` runs the benchmarks of bench/ locally. Errors end in one line on stderr and exit 1; bad
arguments exit 2 (argparse).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from targetd_repl import __version__
from targetd_repl.errors import TargetdReplError

BenchResult = dict[str, Any]

# bench name -> modules of bench/ (package targetd_repl_bench) whose run() results are merged.
BENCHES: dict[str, tuple[str, ...]] = {
    "journal": ("journal", "snapshot"),
}


def _run_bench(args: argparse.Namespace) -> int:
    result: BenchResult = {"bench": args.name}
    for module_name in BENCHES[args.name]:
        module = importlib.import_module(f"targetd_repl_bench.{module_name}")
        run: Callable[..., BenchResult] = module.run
        result.update(run(quick=args.quick))
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        width = max(len(key) for key in result)
        for key, value in sorted(result.items()):
            shown = f"{value:.3f}" if isinstance(value, float) else str(value)
            print(f"{key:<{width}}  {shown}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="targetd-repl", description="Two-site block replication for Linux iSCSI."
    )
    parser.add_argument("--version", action="version", version=f"targetd-repl {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    bench = commands.add_parser("bench", help="run a benchmark and print its ratios")
    bench.add_argument("name", choices=sorted(BENCHES))
    bench.add_argument("--json", action="store_true", help="print one JSON object")
    bench.add_argument("--quick", action="store_true", help="short run (smoke test)")
    bench.set_defaults(handler=_run_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except TargetdReplError as error:
        print(f"targetd-repl: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("targetd-repl: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
