"""Helpers for the replication tests (no tests here): two sites in one process, each with a
StorageEngine in a temporary directory, a ReplicationManager, and a gRPC server on 127.0.0.1
with a port the OS picks; and the checker that replays the log of acknowledged writes."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from targetd_repl.model import PairState
from targetd_repl.replication.channel import TlsFiles, add_port, server_options
from targetd_repl.replication.manager import PairStatus, PeerSite, ReplicationManager
from targetd_repl.replication.settings import ReplicationSettings
from targetd_repl.storage.engine import StorageEngine
from targetd_repl.storage.group_store import GroupSettings
from targetd_repl.v1 import replication_pb2_grpc

BS = 512
SIZE = 4 << 20  # 4 MiB volumes
STORAGE = GroupSettings(journal_size_limit=64 << 20, journal_segment_size=1 << 20)
FAST = ReplicationSettings(
    link_timeout=2.0,
    sync_timeout=2.0,
    rpc_timeout=3.0,
    reconnect_min=0.05,
    reconnect_max=0.3,
    journal_full_dwell=0.2,
    trim_interval=0.2,
)


@dataclass
class Site:
    name: str
    path: Path
    engine: StorageEngine
    manager: ReplicationManager
    server: grpc.Server
    port: int
    tls: TlsFiles | None = None
    storage: GroupSettings = STORAGE
    settings: ReplicationSettings = FAST
    lane: bool = False  # the site offers a bulk lane (replication/bulk.py)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def lane_port(self) -> int:
        listener = self.manager.lane
        assert listener is not None, f"{self.name} offers no bulk lane"
        return listener.port

    def close(self) -> None:
        self.manager.stop()
        self.server.stop(grace=None).wait()
        self.engine.close()


def start_site(
    path: Path,
    name: str,
    *,
    peers: dict[str, str] | None = None,
    tls: TlsFiles | None = None,
    storage: GroupSettings = STORAGE,
    settings: ReplicationSettings = FAST,
    lane: bool = False,
) -> Site:
    engine = StorageEngine.open(path, site=name, settings=storage)
    manager = ReplicationManager(
        engine,
        name,
        {peer: PeerSite(peer, addr) for peer, addr in (peers or {}).items()},
        tls,
        settings,
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), options=server_options())
    register: Callable[[object, grpc.Server], None] = (
        replication_pb2_grpc.add_ReplicationServicer_to_server
    )
    register(manager.servicer(), server)
    port = add_port(server, "127.0.0.1:0", tls)
    if lane:
        manager.serve_lane("127.0.0.1")
    server.start()
    manager.start()
    return Site(name, path, engine, manager, server, port, tls, storage, settings, lane)


def restart(site: Site, peer: Site | None = None) -> Site:
    site.close()
    new = start_site(
        site.path,
        site.name,
        tls=site.tls,
        storage=site.storage,
        settings=site.settings,
        lane=site.lane,
    )
    if peer is not None:
        new.manager.set_peer_address(peer.name, peer.address)
        peer.manager.set_peer_address(new.name, new.address)
    return new


def two_sites(
    tmp_path: Path,
    *,
    tls: dict[str, TlsFiles] | None = None,
    storage: GroupSettings = STORAGE,
    settings: ReplicationSettings = FAST,
    lane: bool = False,
) -> tuple[Site, Site]:
    """Sites a and b, each knowing the other; with `lane` each offers a bulk lane."""
    a, b = (
        start_site(
            tmp_path / name[-1],
            name,
            tls=(tls or {}).get(name),
            storage=storage,
            settings=settings,
            lane=lane,
        )
        for name in ("site-a", "site-b")
    )
    a.manager.set_peer_address("site-b", b.address)
    b.manager.set_peer_address("site-a", a.address)
    return a, b


@dataclass
class WriteLog:
    """The acknowledged writes at the primary: (seq, volume, lba, data), in completion order."""

    entries: list[tuple[int, str, int, bytes]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, seq: int, volume: str, lba: int, data: bytes) -> None:
        with self.lock:
            self.entries.append((seq, volume, lba, data))

    def image(self, volume: str, upto: int, base: bytes | None = None) -> bytearray:
        """The image that the acknowledged writes with seq <= upto, applied in seq order, make."""
        image = bytearray(base if base is not None else bytes(SIZE))
        with self.lock:
            entries = sorted(e for e in self.entries if e[0] <= upto and e[1] == volume)
        for _, _, lba, data in entries:
            image[lba * BS : lba * BS + len(data)] = data
        return image


def write_load(
    site: Site,
    volumes: list[str],
    log: WriteLog,
    *,
    count: int,
    seed: int,
    threads: int = 4,
    max_blocks: int = 16,
) -> None:
    """`count` random writes through engine.write from `threads` threads, logged when acked."""
    per_thread = count // threads

    def worker(n: int) -> None:
        rng = random.Random(seed * 1000 + n)
        for _ in range(per_thread):
            volume = rng.choice(volumes)
            nblocks = rng.randint(1, max_blocks)
            lba = rng.randrange(0, SIZE // BS - nblocks)
            data = rng.randbytes(nblocks * BS)
            seq = site.engine.write(volume, lba, data)
            log.add(seq, volume, lba, data)

    workers = [threading.Thread(target=worker, args=(n,)) for n in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()


def image(site: Site, volume: str) -> bytes:
    return site.engine.read(volume, 0, SIZE // BS)


def converged(primary: Site, secondary: Site, group: str, timeout: float = 30.0) -> PairStatus:
    """Wait until the pair is paired and the secondary applied everything the primary holds."""
    store = primary.engine.group(group)

    def done(status: PairStatus) -> bool:
        return (
            status.state is PairState.PAIRED
            and status.acked_seq >= store.journal.durable_seq
            and status.applied_seq >= store.journal.durable_seq
        )

    return primary.manager.wait_for(group, done, timeout)


def make_group(site: Site, group: str, volumes: list[str]) -> None:
    site.engine.create_group(group)
    for volume in volumes:
        site.engine.create_volume(volume, SIZE, group=group)


@dataclass
class Prefix:
    """Samples of the secondary taken with its applier paused: (applied seq, images)."""

    samples: list[tuple[int, dict[str, bytes]]] = field(default_factory=list)


def sample_prefixes(
    secondary: Site, group: str, volumes: list[str], stop: threading.Event, out: Prefix
) -> None:
    receiver = secondary.manager.secondary_receiver(group)
    store = receiver.store
    while not stop.wait(0.05):
        if not receiver.consistent:
            continue
        with store._apply_lock:  # the applier is between two records
            applied = store.applied_seq
            images = {v: image(secondary, v) for v in volumes}
            if receiver.consistent:
                out.samples.append((applied, images))
