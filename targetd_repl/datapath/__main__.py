"""Serve TCMU LUNs from the storage engine, from memory or from plain files (lab and demo tool).

    python -m targetd_repl.datapath --engine /var/lib/targetd --volume vol1:64M
    python -m targetd_repl.datapath --memory vol1:64M --file vol2:/var/tmp/vol2.img:1G

`--engine STATE_DIR` opens the StorageEngine in STATE_DIR (created if needed) and serves every
volume of it: a write is in the group's journal (fdatasync'ed) and the volume before its command
completes. `--volume NAME:SIZE[:BLOCKSIZE]` creates a volume first if the engine lacks it. A
restarted handler (after kill -9) replays the journal when it opens the engine and reattaches to
the rings, serving the commands the dead process left in them.

Without `--engine`, the LUNs whose LIO config string is `targetd/vol1` and `targetd/vol2` are
served from memory or a file (no journal).

SIGUSR1 demotes: with `--engine`, every group becomes SECONDARY (GroupStore.set_role; the LUN
answers writes with DATA PROTECT / WRITE PROTECTED and MODE SENSE reports WP); otherwise every
LUN turns read-only. SIGUSR2 promotes back (PRIMARY / writable). `--read-only` starts demoted.
Nothing on the LIO side changes. An engine's role is stored in its metadata: it outlives the
process (a restart without `--read-only` serves a demoted group read-only until SIGUSR2).
SIGINT/SIGTERM stop after in-flight commands finish; the engine is then checkpointed and closed.
"""

from __future__ import annotations

import argparse
import logging
import queue
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from targetd_repl.datapath.backend import Backend
from targetd_repl.datapath.memory_backend import FileBackend, MemoryBackend
from targetd_repl.datapath.service import DataPathService

log = logging.getLogger("targetd_repl.datapath")

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


def _volume_spec(text: str) -> tuple[str, int, int]:
    parts = text.split(":")
    if len(parts) not in (2, 3) or not parts[0]:
        raise argparse.ArgumentTypeError(f"--volume {text!r}: use NAME:SIZE[:BLOCKSIZE]")
    block_size = 512
    if len(parts) == 3:
        if parts[2] not in ("512", "4096"):
            raise argparse.ArgumentTypeError(f"--volume {text!r}: block size 512 or 4096")
        block_size = int(parts[2])
    return parts[0], parse_size(parts[1]), block_size


class _Served:
    """What the handler serves: backend lookup, demote/promote, close. One per mode."""

    def __init__(
        self,
        backend_for: Callable[[str], Backend | None],
        set_writable: Callable[[bool], None],
        close: Callable[[], None],
        names: list[str],
        housekeeping: Callable[[], None] | None = None,
    ) -> None:
        self.backend_for = backend_for
        self.set_writable = set_writable
        self.close = close
        self.names = names
        self.housekeeping = housekeeping


def _plain_backends(args: argparse.Namespace, parser: argparse.ArgumentParser) -> _Served:
    backends: dict[str, MemoryBackend | FileBackend] = {}
    for name, size in args.memory:
        backends[name] = MemoryBackend(name, size, block_size=args.block_size)
    for name, path, file_size in args.file:
        backends[name] = FileBackend(name, path, size_bytes=file_size, block_size=args.block_size)
    if not backends:
        parser.error("give --engine, or at least one --memory or --file volume")

    def set_writable(writable: bool) -> None:
        for b in backends.values():
            b.writable = writable

    def close() -> None:
        for b in backends.values():
            if isinstance(b, FileBackend):
                b.close()

    return _Served(backends.get, set_writable, close, sorted(backends))


def _engine_backends(args: argparse.Namespace) -> _Served:
    # The engine pulls in the storage package (SQLite, crc32c): only this mode needs it.
    from targetd_repl.datapath.engine_backend import EngineBackend  # noqa: PLC0415
    from targetd_repl.model import Role  # noqa: PLC0415
    from targetd_repl.storage.engine import StorageEngine  # noqa: PLC0415
    from targetd_repl.storage.group_store import GroupSettings  # noqa: PLC0415

    settings = GroupSettings(
        journal_size_limit=args.journal_size, journal_segment_size=args.segment_size
    )
    engine = StorageEngine.open(Path(args.engine), site=args.site, settings=settings)
    try:
        existing = {v.name for v in engine.list_volumes()}
        for name, size, block_size in args.volume:
            if name not in existing:
                engine.create_volume(name, size, block_size=block_size)
                log.info("created volume %r (%d bytes, %d-byte blocks)", name, size, block_size)
        backends = {v.name: EngineBackend(engine, v.name) for v in engine.list_volumes()}
        for group in engine.list_groups():
            store = engine.group(group.name)
            log.info(
                "group %r: %s, journal seq %d..%d, applied %d",
                group.name,
                store.role.value,
                store.journal.first_seq,
                store.journal.next_seq - 1,
                store.applied_seq,
            )
    except BaseException:
        engine.close()
        raise

    def set_writable(writable: bool) -> None:
        role = Role.PRIMARY if writable else Role.SECONDARY
        for group in engine.list_groups():
            store = engine.group(group.name)
            if store.role is not role:
                store.set_role(role)  # waits for the writes inside the group to finish

    def housekeeping() -> None:
        # Nothing else checkpoints in this process: free journal segments the volumes have.
        for group in engine.list_groups():
            engine.group(group.name).checkpoint_and_trim()

    def close() -> None:
        for group in engine.list_groups():
            store = engine.group(group.name)
            log.info(
                "group %r: journal seq %d..%d, %d fdatasyncs since open",
                group.name,
                store.journal.first_seq,
                store.journal.next_seq - 1,
                store.journal.fsync_count,
            )
        engine.close()

    return _Served(backends.get, set_writable, close, sorted(backends), housekeeping)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m targetd_repl.datapath",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--engine", metavar="STATE_DIR", help="serve the storage engine's volumes")
    parser.add_argument("--site", default="lab", help="with --engine: the engine's site name")
    parser.add_argument(
        "--volume",
        type=_volume_spec,
        action="append",
        default=[],
        metavar="NAME:SIZE[:BLOCKSIZE]",
        help="with --engine: create this volume if the engine lacks it",
    )
    parser.add_argument("--journal-size", type=parse_size, default=1 << 30)
    parser.add_argument("--segment-size", type=parse_size, default=64 << 20)
    parser.add_argument(
        "--trim-interval",
        type=float,
        default=5.0,
        help="with --engine: seconds between checkpoints that trim the journal (0: never)",
    )
    parser.add_argument("--memory", type=_memory_spec, action="append", default=[])
    parser.add_argument("--file", type=_file_spec, action="append", default=[])
    parser.add_argument("--block-size", type=int, choices=(512, 4096), default=512)
    parser.add_argument(
        "--workers",
        type=int,
        default=4,
        help="threads for backend commands (flushes, UNMAP, ...; with --engine each ring poll's "
        "WRITEs go to one of them as one journal group commit); 0 runs everything on the "
        "ring's own thread: fastest under emulation, but reads then wait behind each batch's "
        "fdatasync and, on a sync pair, behind the peer's acknowledgement",
    )
    parser.add_argument("--read-only", action="store_true", help="start with every LUN read-only")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.engine is not None and (args.memory or args.file):
        parser.error("--engine serves the engine's volumes: no --memory or --file with it")
    if args.volume and args.engine is None:
        parser.error("--volume needs --engine")
    served = _engine_backends(args) if args.engine is not None else _plain_backends(args, parser)
    if args.read_only:
        served.set_writable(False)

    # Signal handlers only queue the request: a demotion waits for in-flight writes, which
    # must not happen inside a handler that interrupted who knows what.
    requests: queue.SimpleQueue[str] = queue.SimpleQueue()
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if signum in (signal.SIGINT, signal.SIGTERM):
            stop.set()
        requests.put(signal.Signals(signum).name)

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(signum, on_signal)

    service = DataPathService(served.backend_for, workers=args.workers)
    service.start()
    log.info("waiting for TCMU devices targetd/{%s}", ",".join(served.names))
    interval = args.trim_interval if served.housekeeping is not None else 0.0
    try:
        while not stop.is_set():
            try:
                request = requests.get(timeout=interval if interval > 0 else 1.0)
            except queue.Empty:
                if served.housekeeping is not None and interval > 0:
                    served.housekeeping()
                continue
            if request in ("SIGUSR1", "SIGUSR2"):
                writable = request == "SIGUSR2"
                served.set_writable(writable)
                log.info("every LUN now %s", "writable" if writable else "read-only")
    finally:
        service.stop()
        served.close()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
