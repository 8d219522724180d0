"""Replication benchmark: two sites in one process, talking gRPC over 127.0.0.1.

    python -m targetd_repl_bench.replication [--quick] [--dir DIR]

Prints one JSON object:
  ship_vs_tcp: journal shipping throughput between two managers (state on tmpfs /dev/shm when
      present) divided by a raw loopback TCP copy of the same number of bytes, measured in the
      same run (goal >= 0.5). The backlog is written while the pair is suspended, then the
      resume ships it: time from resume to the last acknowledgement.
  receive_floor_vs_tcp / ship_vs_receive_floor: the same copy where the receiver also does
      the least a durable receiver must (a fresh buffer per 4 MiB batch, CRC32C, append to a new
      tmpfs file, fdatasync), against the raw copy and against our shipping: how much of the
      gap to raw TCP is the work any durable journal receiver does, and how much is ours.
      `receive_floor_recycled_*`: the same into a file whose pages exist (recycled segments).
  async_on_vs_off: write throughput through StorageEngine.write (the I/O entry point the TCMU
      handler and `io write` share) with an async pair, divided by the same load with no pair
      (goal >= 0.9). Both sets of sites are open at once and the load alternates between them
      in rounds (`_min`/`_max`: the spread of the per-round ratios). The primary's state is on
      the disk (`--dir`); the peer's on tmpfs, standing in for the other machine's own disk.
      `async_on_vs_off_shared_disk` puts the peer on the same disk: it adds the two sites'
      fsyncs contending for one device, which a real pair does not have. On 2 shared cores the
      peer's process also takes CPU the writers would have had: `primary_cpu_us_per_write_*`
      (this process, no pair / async pair) and `peer_cpu_us_per_write_async` show the cost per
      write on each side, steadier than the wall-clock ratio.
  lag_p99_ms: replication lag (a write's acknowledgement at the primary to the peer's durable
      receipt acknowledged back) at half the maximum write rate, 99th percentile (goal <= 100).
  sync_latency_vs_async: median latency of one writer, sync pair over async pair.
The absolute figures (MB/s, writes/s, ms) are printed beside the ratios, and the CPU seconds
each site's process spent per GB shipped (ship_cpu_s_per_gb_primary / _secondary): on a shared,
noisy machine the wall-clock ratios swing, the CPU cost per byte much less.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path

import crc32c
import grpc

from targetd_repl.model import PairMode, PairState
from targetd_repl.replication.channel import add_port, server_options
from targetd_repl.replication.manager import PairStatus, ReplicationManager
from targetd_repl.replication.settings import ReplicationSettings
from targetd_repl.storage.engine import StorageEngine
from targetd_repl.storage.group_store import GroupSettings
from targetd_repl.v1 import replication_pb2_grpc

VOLUME_SIZE = 256 << 20
STORAGE = GroupSettings(journal_size_limit=2 << 30, journal_segment_size=64 << 20)
SETTINGS = ReplicationSettings()


class _Site:
    def __init__(self, path: Path, name: str, lane: bool = True) -> None:
        self.engine = StorageEngine.open(path, site=name, settings=STORAGE)
        self.manager = ReplicationManager(self.engine, name, {}, None, SETTINGS)
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=8), options=server_options()
        )
        register: Callable[[object, grpc.Server], None] = (
            replication_pb2_grpc.add_ReplicationServicer_to_server
        )
        register(self.manager.servicer(), self.server)
        self.port = add_port(self.server, "127.0.0.1:0", None)
        if lane:
            self.manager.serve_lane("127.0.0.1")
        self.server.start()
        self.manager.start()
        self.peer_pid = 0  # the other site's process (set by _sites)

    def close(self) -> None:
        self.manager.stop()
        self.server.stop(grace=None).wait()
        self.engine.close()


def _serve(path: Path, name: str) -> None:
    """The secondary controller of the benchmark, in its own process (as in production, the
    two sites do not share an interpreter): print the port, serve until stdin closes."""
    site = _Site(path, name)
    print(site.port, flush=True)
    sys.stdin.read()
    site.close()


@contextmanager
def _sites(base: Path, mode: PairMode | None, peer_base: Path | None = None) -> Iterator[_Site]:
    """Site A here (its state under `base`) and site B in a child process (under `peer_base`,
    default `base`), a group `g` with volume `v` at A, paired in `mode` (None: no pair).
    Yields site A."""
    work = Path(tempfile.mkdtemp(prefix="bench-repl-", dir=base))
    peer_work = Path(tempfile.mkdtemp(prefix="bench-repl-peer-", dir=peer_base or base))
    child = subprocess.Popen(
        [sys.executable, "-m", "targetd_repl_bench.replication", "--serve", str(peer_work)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    a = _Site(work / "a", "site-a")
    try:
        assert child.stdout is not None
        port = int(child.stdout.readline())
        a.peer_pid = child.pid
        a.manager.set_peer_address("site-b", f"127.0.0.1:{port}")
        a.engine.create_group("g")
        a.engine.create_volume("v", VOLUME_SIZE, group="g")
        if mode is not None:
            a.manager.create_pair("g", "site-b", mode)
            _wait(a, lambda s: s.state is PairState.PAIRED, 120)
        yield a
    finally:
        a.close()
        if child.stdin is not None:
            child.stdin.close()
        child.wait(timeout=60)
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(peer_work, ignore_errors=True)


def _wait(site: _Site, predicate: object, timeout: float) -> PairStatus:
    assert callable(predicate)
    return site.manager.wait_for("g", predicate, timeout)


def _tmpfs() -> Path:
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


# --- ship_vs_tcp ------------------------------------------------------------------------------


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds process `pid` has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _ship(base: Path, total: int, record: int) -> tuple[float, int, float, float]:
    """Seconds to ship a backlog of `total` bytes in `record`-byte writes, bytes shipped, and
    the CPU seconds the primary's and the secondary's processes spent meanwhile."""
    with _sites(base, PairMode.ASYNC) as a:
        a.manager.suspend("g")
        store = a.engine.group("g")
        data = random.Random(1).randbytes(record)
        blocks = VOLUME_SIZE // 512
        per = record // 512
        first = store.journal.next_seq
        count = total // record
        lock = threading.Lock()
        position = [0]

        def writer() -> None:
            while True:
                with lock:
                    i = position[0]
                    position[0] += 1
                if i >= count:
                    return
                a.engine.write("v", (i * per) % blocks, data)

        threads = [threading.Thread(target=writer) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        last = store.journal.durable_seq
        shipped = (last - first + 1) * (record + 64)
        cpu_a, cpu_b = _cpu_seconds(os.getpid()), _cpu_seconds(a.peer_pid)
        started = time.perf_counter()
        a.manager.resume("g")
        status = _wait(a, lambda s: s.acked_seq >= last, 300)
        elapsed = time.perf_counter() - started
        if status.acked_seq != last:
            # The backlog must ship from the journal: a trim would turn it into a region copy
            # (whose records come after `last`).
            raise RuntimeError(f"the backlog was not shipped from the journal: {status}")
        used_a = _cpu_seconds(os.getpid()) - cpu_a
        return elapsed, shipped, used_a, _cpu_seconds(a.peer_pid) - cpu_b


def _tcp_copy(
    total: int, chunk: int = 1 << 20, store: Path | None = None, recycled: bool = False
) -> float:
    """Seconds to copy `total` bytes over a loopback TCP connection (sendall / recv_into).

    With `store` (a directory) the receiver also does the least a durable journal receiver
    must: it takes each chunk into a fresh buffer, computes its CRC32C, appends it to a file
    there and fdatasyncs: the floor of shipping on this machine, with no replication logic.
    The file is new, or with `recycled` written beforehand (untimed) and overwritten, as the
    journal's recycled segments are."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    payload = random.Random(2).randbytes(chunk)
    received = [0]

    def sink() -> None:
        conn, _ = listener.accept()
        buf = bytearray(chunk)
        view = memoryview(buf)
        with conn:
            while True:
                n = conn.recv_into(view)
                if not n:
                    return
                received[0] += n

    def durable_sink() -> None:
        assert store is not None
        conn, _ = listener.accept()
        fd = os.open(store / "floor.journal", os.O_WRONLY)
        try:
            with conn:
                while True:
                    data = conn.recv(chunk, socket.MSG_WAITALL)
                    if not data:
                        return
                    crc32c.crc32c(data)
                    os.write(fd, data)
                    os.fdatasync(fd)
                    received[0] += len(data)
        finally:
            os.close(fd)
            os.unlink(store / "floor.journal")

    if store is not None:
        with open(store / "floor.journal", "wb") as prepared:
            if recycled:
                for _ in range(0, total, chunk):
                    prepared.write(payload)
    thread = threading.Thread(target=sink if store is None else durable_sink)
    thread.start()
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as out:
        sent = 0
        while sent < total:
            out.sendall(payload)
            sent += chunk
        out.shutdown(socket.SHUT_WR)
        thread.join()
    elapsed = time.perf_counter() - started
    listener.close()
    return elapsed


# --- write throughput and latency ---------------------------------------------------------------


def _load(a: _Site, seconds: float, threads: int, size: int) -> float:
    """Writes per second through engine.write from `threads` writers for `seconds`."""
    data = random.Random(3).randbytes(size)
    blocks = VOLUME_SIZE // 512 - size // 512
    stop = time.perf_counter() + seconds
    counts = [0] * threads

    def writer(n: int) -> None:
        rng = random.Random(n)
        while time.perf_counter() < stop:
            a.engine.write("v", rng.randrange(0, blocks) & ~7, data)
            counts[n] += 1

    workers = [threading.Thread(target=writer, args=(n,)) for n in range(threads)]
    started = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return sum(counts) / (time.perf_counter() - started)


def _on_vs_off(
    disk: Path, peer_base: Path, seconds: float, rounds: int
) -> tuple[float, float, list[float], dict[str, float]]:
    """Writes per second with no pair and with an async pair: both sets of sites open at once
    and the load alternating between them in `rounds` rounds (the machine's load drifts; both
    sides see the same drift). Returns (off, on, the per-round ratios, CPU microseconds per
    write: this process with no pair and with the pair, and the pair's peer process)."""
    with _sites(disk, None) as off_site, _sites(disk, PairMode.ASYNC, peer_base) as on_site:
        totals = {"off": [0.0, 0.0, 0.0], "on": [0.0, 0.0, 0.0]}  # writes, cpu here, cpu peer
        spread: list[float] = []
        me = os.getpid()

        def measure(label: str, site: _Site) -> float:
            here, peer = _cpu_seconds(me), _cpu_seconds(on_site.peer_pid)
            started = time.perf_counter()
            rate = _load(site, seconds / rounds, 8, 4096)
            entry = totals[label]
            entry[0] += rate * (time.perf_counter() - started)
            entry[1] += _cpu_seconds(me) - here
            entry[2] += _cpu_seconds(on_site.peer_pid) - peer
            return rate

        off = on = 0.0
        for n in range(rounds):
            # Each side goes first in every other round: the first load leaves dirty pages that
            # the kernel writes back during the second.
            order = (
                [("on", on_site), ("off", off_site)]
                if n % 2
                else [
                    ("off", off_site),
                    ("on", on_site),
                ]
            )
            rates = {label: measure(label, site) for label, site in order}
            off += rates["off"]
            on += rates["on"]
            spread.append(rates["on"] / rates["off"])
        cpu = {
            "primary_cpu_us_per_write_no_pair": totals["off"][1] / totals["off"][0] * 1e6,
            "primary_cpu_us_per_write_async": totals["on"][1] / totals["on"][0] * 1e6,
            "peer_cpu_us_per_write_async": totals["on"][2] / totals["on"][0] * 1e6,
        }
        return off / rounds, on / rounds, spread, cpu


def _lag(a: _Site, rate: float, seconds: float, size: int) -> list[float]:
    """Writes paced at `rate` per second; for each, seconds from its local ack to the peer's
    acknowledgement reaching the primary."""
    runner = a.manager.primary_runner("g")
    done: dict[int, float] = {}
    acked_at: list[tuple[int, float]] = []

    def on_ack(acked: int, _applied: int) -> None:
        acked_at.append((acked, time.perf_counter()))

    runner.on_ack = on_ack
    data = random.Random(4).randbytes(size)
    blocks = VOLUME_SIZE // 512 - size // 512
    rng = random.Random(5)
    interval = 1.0 / rate
    start = time.perf_counter()
    n = 0
    while time.perf_counter() - start < seconds:
        target = start + n * interval
        delay = target - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        seq = a.engine.write("v", rng.randrange(0, blocks) & ~7, data)
        done[seq] = time.perf_counter()
        n += 1
    last = max(done)
    _wait(a, lambda s: s.acked_seq >= last, 60)
    runner.on_ack = None
    lags: list[float] = []
    pending = sorted(done.items())
    i = 0
    for acked, when in acked_at:
        while i < len(pending) and pending[i][0] <= acked:
            lags.append(max(0.0, when - pending[i][1]))
            i += 1
    return lags


def _latency(a: _Site, count: int, size: int) -> float:
    data = random.Random(6).randbytes(size)
    samples = []
    for i in range(count):
        started = time.perf_counter()
        a.engine.write("v", (i * 8) % (VOLUME_SIZE // 512 - 8), data)
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def _percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))] if ordered else 0.0


def run(quick: bool = False, directory: Path | None = None) -> dict[str, float | int | str]:
    tmpfs = _tmpfs()
    disk = directory or Path(tempfile.gettempdir())
    total = (32 if quick else 256) << 20
    seconds = 1.5 if quick else 5.0
    result: dict[str, float | int | str] = {"replication_quick": int(quick)}

    ship_s, shipped, cpu_a, cpu_b = _ship(tmpfs, total, 64 << 10)
    tcp_s = _tcp_copy(shipped)
    # one batch of settings.batch_bytes per chunk
    floor_s = _tcp_copy(shipped, 4 << 20, store=tmpfs)
    floor_recycled_s = _tcp_copy(shipped, 4 << 20, store=tmpfs, recycled=True)
    result["ship_cpu_s_per_gb_primary"] = cpu_a / (shipped / 1e9)
    result["ship_cpu_s_per_gb_secondary"] = cpu_b / (shipped / 1e9)
    result["ship_mb_s"] = shipped / ship_s / 1e6
    result["tcp_mb_s"] = shipped / tcp_s / 1e6
    result["ship_vs_tcp"] = tcp_s / ship_s
    result["receive_floor_mb_s"] = shipped / floor_s / 1e6
    result["receive_floor_vs_tcp"] = tcp_s / floor_s
    result["ship_vs_receive_floor"] = floor_s / ship_s
    result["receive_floor_recycled_mb_s"] = shipped / floor_recycled_s / 1e6
    result["receive_floor_recycled_vs_tcp"] = tcp_s / floor_recycled_s

    # The peer of a real pair is another machine with its own disk; here its state goes to
    # tmpfs so that its fsyncs do not queue behind the primary's on the one disk (the figure
    # with both on the disk is printed too: it measures that contention, not replication).
    for key, peer_base in (("async_on_vs_off", tmpfs), ("async_on_vs_off_shared_disk", disk)):
        off, on, spread, cpu = _on_vs_off(disk, peer_base, seconds, rounds=4 if not quick else 2)
        result[key] = on / off
        result[f"{key}_min"], result[f"{key}_max"] = min(spread), max(spread)
        if peer_base is tmpfs:
            result["writes_s_no_pair"] = off
            result["writes_s_async"] = on
            result.update(cpu)
    with _sites(disk, PairMode.ASYNC, tmpfs) as a:
        rate = max(float(result["writes_s_async"]) / 2, 1.0)
        lags = _lag(a, rate, seconds, 4096)
        result["lag_p50_ms"] = _percentile(lags, 0.5) * 1e3
        result["lag_p99_ms"] = _percentile(lags, 0.99) * 1e3
        async_latency = _latency(a, 200 if quick else 1000, 4096)
    with _sites(disk, PairMode.SYNC, tmpfs) as a:
        sync_latency = _latency(a, 200 if quick else 1000, 4096)
    result["latency_ms_async"] = async_latency * 1e3
    result["latency_ms_sync"] = sync_latency * 1e3
    result["sync_latency_vs_async"] = sync_latency / async_latency
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a few seconds, for smoke tests")
    parser.add_argument("--dir", type=Path, help="where the write-path sites live (a disk)")
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)  # the child site
    args = parser.parse_args()
    if args.serve is not None:
        _serve(args.serve, "site-b")
        return
    print(json.dumps(run(quick=args.quick, directory=args.dir), sort_keys=True))


if __name__ == "__main__":
    main()
