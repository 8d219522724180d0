"""Role-change benchmark: two sites in one process (engine, replication, roles, gRPC on
127.0.0.1 with a throttling proxy on the link), one scenario in order:

    python -m targetd_repl_bench.roles [--quick] [--dir DIR]

  failover_s: `failover` with 64 MB received but not yet applied at the secondary (its
      applier held), the primary gone: from the command to the new primary accepting writes.
  failback_bytes_vs_changed: after 1% of the volume (1 GiB; 64 MiB with --quick) changed on
      each side of the split, the bytes the failback moved over the link (counted by the proxy,
      both directions, TLS and gRPC included) divided by the bytes of the regions changed on
      either side (goal <= 1.1).
  failback_vs_full_copy: the failback's time over the initial full copy's time of the same
      volume (fully written) in the same run (goal <= 0.05).
  switchover_s: with a 100 MB backlog (16 MB with --quick) on a throttled link, from the
      `switchover` command to the new primary's first completed write (goal <= 1).
The absolute figures are printed beside the ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent import futures
from pathlib import Path

import grpc

from targetd_repl.model import PairMode, PairState
from targetd_repl.replication.channel import add_port, server_options
from targetd_repl.replication.manager import PairStatus, ReplicationManager
from targetd_repl.replication.settings import ReplicationSettings
from targetd_repl.roles.manager import RoleManager
from targetd_repl.storage.engine import StorageEngine
from targetd_repl.storage.group_store import GroupSettings
from targetd_repl.v1 import replication_pb2_grpc

REGION = 64 * 1024
STORAGE = GroupSettings(journal_size_limit=2 << 30, journal_segment_size=64 << 20)
SETTINGS = ReplicationSettings(link_timeout=2.0, reconnect_min=0.05, reconnect_max=0.5)


class _Proxy:
    """A TCP relay on 127.0.0.1 that counts bytes and can throttle (bytes per second)."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.rate = 0
        self.bytes = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self._closed = False
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        self._closed = True
        self._listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=2)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if self.rate:
                    time.sleep(len(data) / self.rate)
                dst.sendall(data)
                with self._lock:
                    self.bytes += len(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


class _Site:
    def __init__(self, path: Path, name: str, port: int = 0) -> None:
        self.path = path
        self.name = name
        self.engine = StorageEngine.open(path, site=name, settings=STORAGE)
        self.manager = ReplicationManager(self.engine, name, {}, None, SETTINGS)
        self.roles = RoleManager(self.engine, self.manager, name, None)
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=16), options=server_options()
        )
        register: Callable[[object, grpc.Server], None] = (
            replication_pb2_grpc.add_ReplicationServicer_to_server
        )
        register(self.manager.servicer(), self.server)
        replication_pb2_grpc.add_RolePeerServicer_to_server(self.roles.servicer(), self.server)
        self.port = add_port(self.server, f"127.0.0.1:{port}", None)
        self.server.start()
        self.roles.start()
        self.manager.start()
        self.roles.resume()

    def close(self) -> None:
        self.server.stop(grace=None).wait()
        self.roles.stop()
        self.manager.stop()
        self.engine.close()

    def wait(self, check: Callable[[PairStatus], bool], timeout: float = 600) -> PairStatus:
        return self.manager.wait_for("g", check, timeout)


def _tmpfs() -> Path:
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


def _wait(check: Callable[[], bool], timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError("benchmark step timed out")
        time.sleep(0.02)


def _scenario(work: Path, size: int, backlog: int, waiting: int) -> dict[str, float | int]:
    rng = random.Random(7)
    b = _Site(work / "b", "site-b")
    to_b = _Proxy(b.port)
    a = _Site(work / "a", "site-a")
    to_a = _Proxy(a.port)
    a.manager.set_peer_address("site-b", to_b.address)
    b.manager.set_peer_address("site-a", to_a.address)
    sites = [a, b]
    try:
        a.engine.create_group("g")
        a.engine.create_volume("v", size, group="g")
        piece = rng.randbytes(1 << 20)
        for offset in range(0, size, 1 << 20):  # a fully written volume
            a.engine.write("v", offset // 512, piece[offset % 4096 :] + piece[: offset % 4096])
        # the initial full copy
        started = time.monotonic()
        a.manager.create_pair("g", "site-b", PairMode.ASYNC)
        a.wait(lambda s: s.state is PairState.PAIRED and s.lag_records == 0)
        full_copy_s = time.monotonic() - started

        # failover with `waiting` bytes received but not applied at b
        store_b = b.engine.group("g")
        apply = store_b.apply_received
        store_b.apply_received = lambda max_records=None: store_b.applied_seq  # type: ignore[method-assign]
        chunk = rng.randbytes(256 * 1024)
        for at in range(0, waiting, len(chunk)):
            a.engine.write("v", (at % size) // 512, chunk)
        last = a.engine.group("g").journal.durable_seq
        a.wait(lambda s: s.acked_seq >= last)
        # the split: a goes on alone (1% of the volume), then a is gone
        a.manager.suspend("g")
        regions = size // REGION
        changed_a = rng.sample(range(regions), max(1, regions // 100))
        for region in changed_a:
            a.engine.write("v", region * REGION // 512, rng.randbytes(REGION))
        a.close()
        sites.remove(a)
        store_b.apply_received = apply  # type: ignore[method-assign]
        started = time.monotonic()
        b.roles.failover("g")
        failover_s = time.monotonic() - started
        changed_b = rng.sample(range(regions), max(1, regions // 100))
        for region in changed_b:
            b.engine.write("v", region * REGION // 512, rng.randbytes(REGION))

        # failback
        a = _Site(work / "a", "site-a", a.port)
        sites.append(a)
        a.manager.set_peer_address("site-b", to_b.address)
        _wait(lambda: a.engine.group("g").role.value == "secondary", 60)
        moved_before = to_a.bytes + to_b.bytes
        started = time.monotonic()
        b.roles.failback("g")
        _wait(lambda: b.roles.status("g").phase != "running")
        failback_s = time.monotonic() - started
        moved = to_a.bytes + to_b.bytes - moved_before
        changed_bytes = len(set(changed_a) | set(changed_b)) * REGION
        b.wait(lambda s: s.state is PairState.PAIRED)

        # switchover with a backlog on a throttled link
        to_a.rate = 20_000_000
        to_b.rate = 20_000_000
        for at in range(0, backlog, len(chunk)):
            b.engine.write("v", (at % size) // 512, chunk)
        lag = b.manager.pair_status("g").lag_records * len(chunk)
        started = time.monotonic()
        a.roles.switchover("g")
        a.engine.write("v", 0, b"\x01" * 4096)
        switchover_s = time.monotonic() - started
        _wait(lambda: a.roles.status("g").phase != "running")
        drain_s = time.monotonic() - started
        return {
            "size_bytes": size,
            "full_copy_s": round(full_copy_s, 3),
            "failover_s": round(failover_s, 3),
            "failover_waiting_bytes": waiting,
            "failback_s": round(failback_s, 3),
            "failback_bytes_moved": moved,
            "failback_changed_bytes": changed_bytes,
            "failback_bytes_vs_changed": round(moved / changed_bytes, 3),
            "failback_vs_full_copy": round(failback_s / full_copy_s, 4),
            "switchover_s": round(switchover_s, 3),
            "switchover_backlog_bytes": lag,
            "switchover_drain_s": round(drain_s, 3),
        }
    finally:
        for site in sites:
            site.close()
        to_a.close()
        to_b.close()


def run(quick: bool = False, directory: Path | None = None) -> dict[str, float | int]:
    base = directory or _tmpfs()
    work = Path(tempfile.mkdtemp(prefix="bench-roles-", dir=base))
    try:
        if quick:
            return _scenario(work, 64 << 20, 16 << 20, 8 << 20)
        return _scenario(work, 1 << 30, 100 << 20, 64 << 20)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--dir", type=Path)
    args = parser.parse_args()
    print(json.dumps(run(quick=args.quick, directory=args.dir), sort_keys=True))


if __name__ == "__main__":
    main()
