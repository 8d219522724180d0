"""Serve TCMU LUNs from memory or plain files, without the storage engine (lab and demo tool).

    python -m targetd_repl.datapath --memory vol1:64M --file vol2:/var/tmp/vol2.img:1G

serves the LUNs whose LIO config string is `targetd/vol1` and `targetd/vol2`. SIGUSR1 turns every
LUN read-only (DATA PROTECT on writes, WP in MODE SENSE), SIGUSR2 writable again: a stand-in for
demotion and promotion. SIGINT/SIGTERM stop after in-flight commands finish.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from types import FrameType

from targetd_repl.datapath.backend import Backend
from targetd_repl.datapath.memory_backend import FileBackend, MemoryBackend
from targetd_repl.datapath.service import DataPathService

_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    suffix = text[-1:] if text[-1:] in _SUFFIXES else ""
    number = text[: len(text) - len(suffix)]
    try:
        value = int(number) * _SUFFIXES[suffix]
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad size {text!r}: use e.g. 512M or 2G") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size {text!r} must be positive")
    return value


def _memory_spec(text: str) -> tuple[str, int]:
    name, sep, size = text.partition(":")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"--memory {text!r}: use VOLUME:SIZE")
    return name, parse_size(size)


def _file_spec(text: str) -> tuple[str, str, int | None]:
    parts = text.split(":")
    if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
        raise argparse.ArgumentTypeError(f"--file {text!r}: use VOLUME:PATH[:SIZE]")
    return parts[0], parts[1], parse_size(parts[2]) if len(parts) == 3 else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m targetd_repl.datapath",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--memory", type=_memory_spec, action="append", default=[])
    parser.add_argument("--file", type=_file_spec, action="append", default=[])
    parser.add_argument("--block-size", type=int, choices=(512, 4096), default=512)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--read-only", action="store_true", help="start with every LUN read-only")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    backends: dict[str, MemoryBackend | FileBackend] = {}
    for name, size in args.memory:
        backends[name] = MemoryBackend(name, size, block_size=args.block_size)
    for name, path, file_size in args.file:
        backends[name] = FileBackend(name, path, size_bytes=file_size, block_size=args.block_size)
    if not backends:
        parser.error("give at least one --memory or --file volume")
    for b in backends.values():
        b.writable = not args.read_only

    def backend_for(volume: str) -> Backend | None:
        return backends.get(volume)

    service = DataPathService(backend_for, workers=args.workers)
    done = threading.Event()

    def on_stop(signum: int, frame: FrameType | None) -> None:
        done.set()

    def on_writable(signum: int, frame: FrameType | None) -> None:
        writable = signum == signal.SIGUSR2
        for b in backends.values():
            b.writable = writable
        logging.getLogger(__name__).info(
            "every LUN now %s", "writable" if writable else "read-only"
        )

    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGUSR1, on_writable)
    signal.signal(signal.SIGUSR2, on_writable)
    service.start()
    logging.getLogger(__name__).info(
        "waiting for TCMU devices targetd/{%s}", ",".join(sorted(backends))
    )
    while not done.wait(1.0):
        pass
    service.stop()
    for b in backends.values():
        if isinstance(b, FileBackend):
            b.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
