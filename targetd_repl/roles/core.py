"""What every role change shares: the site's storage and replication, per-group locks and
persisted state (state.py), the status the control API reports, and calls to the peer's
RolePeer service (site-to-site, mutual TLS, one channel per call unless cached).

The commands live in failover.py, rejoin.py (failback and resolve), switchover.py and extent.py;
manager.py composes them into RoleManager.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeVar

import grpc

from targetd_repl.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    SequenceTrimmed,
    TargetdReplError,
)
from targetd_repl.model import DEFAULT_REGION_SIZE, PairInfo, RecordKind, SnapshotKind
from targetd_repl.replication.channel import TlsFiles, open_channel
from targetd_repl.replication.manager import ReplicationManager
from targetd_repl.replication.primary import PrimaryPair
from targetd_repl.replication.secondary import SecondaryGroup
from targetd_repl.replication.status import error_from_rpc
from targetd_repl.replication.tracking import UnsentBitmaps
from targetd_repl.roles.state import ChangedBitmaps, RegionBitmaps, RolesState, StateStore
from targetd_repl.storage.bitmap import DirtyBitmap
from targetd_repl.storage.engine import StorageEngine
from targetd_repl.storage.group_store import GroupStore
from targetd_repl.v1 import replication_pb2, replication_pb2_grpc

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class RoleSettings:
    probe_timeout: float = 2.0  # failover: a primary that answers within this is "reachable"
    rpc_timeout: float = 10.0  # unary calls to the peer
    bulk_piece: int = 1 << 20  # bytes per region message of a bulk copy or drain
    drain_regions: int = 16  # regions per ReadRegions call of a switchover's drain
    retry_delay: float = 0.2  # between attempts of a step that waits for the peer
    region_size: int = DEFAULT_REGION_SIZE


@dataclass
class RoleStatus:
    """The role change running (or last run) for one group at this site."""

    group: str
    command: str = ""
    phase: str = ""  # running, done, failed
    step: str = ""
    done_bytes: int = 0
    total_bytes: int = 0
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    detail: str = ""
    epoch: int = 0
    snapshot: str = ""
    seq: int = 0
    regions: int = 0
    live_records: int = 0
    promoted_seconds: float = 0.0

    @property
    def elapsed(self) -> float:
        end = self.finished if self.finished is not None else time.monotonic()
        return max(0.0, end - self.started)

    def done(self, step: str, detail: str = "") -> RoleStatus:
        self.phase = "done"
        self.step = step
        if detail:
            self.detail = detail
        self.finished = time.monotonic()
        return self

    def failed(self, detail: str) -> RoleStatus:
        self.phase = "failed"
        self.detail = detail
        self.finished = time.monotonic()
        return self


FAULT_ENV = "TARGETD_REPL_ROLES_FAULT"


def fault(point: str) -> None:
    """Tests: die here like kill -9 when the environment names this step (a comma-separated
    list in TARGETD_REPL_ROLES_FAULT), to prove that a rerun or a restart completes the role
    change from every step. Inert otherwise."""
    wanted = os.environ.get(FAULT_ENV)
    if wanted and point in wanted.split(","):
        log.critical("fault injection: dying at %s", point)
        logging.shutdown()
        os._exit(137)


def mark_from_journal(
    store: GroupStore, start: int, bitmaps: UnsentBitmaps, upto: int | None = None
) -> int:
    """Set in `bitmaps` the regions of every record from `start` to `upto` (default: the last
    durable one) still in the journal; return how many records were read."""
    journal = store.journal
    last = journal.durable_seq if upto is None else min(upto, journal.durable_seq)
    first = max(start, journal.first_seq)
    if first > last:
        return 0
    count = 0
    try:
        for record in journal.read_from(first, last - first + 1):
            if record.kind is not RecordKind.MARKER and record.length:
                block = store.volume(record.volume_id).volume.block_size
                bitmaps.mark(record.volume_id, record.lba * block, record.length)
            count += 1
    except SequenceTrimmed:
        log.warning("group %s: journal trimmed while reading seq %d on", store.name, first)
    return count


class RoleCore:
    """Shared state of the role-change commands (see the module docstring)."""

    def __init__(
        self,
        engine: StorageEngine,
        replication: ReplicationManager,
        site: str,
        tls: TlsFiles | None,
        settings: RoleSettings | None = None,
    ) -> None:
        self._engine = engine
        self._repl = replication
        self._site = site
        self._tls = tls
        self._settings = settings or RoleSettings()
        self._states = StateStore()
        self._guard = threading.Lock()
        self._locks: dict[str, threading.RLock] = {}
        self._statuses: dict[str, RoleStatus] = {}
        self._stopping = threading.Event()
        self._threads: dict[str, threading.Thread] = {}
        # failover.py: the changed bitmaps whose hook is installed (one instance per group: a
        # second open would remove the temporary file of a save in flight)
        self._changed: dict[str, ChangedBitmaps] = {}

    @property
    def site(self) -> str:
        return self._site

    # --- groups, state, status ---------------------------------------------------------------

    def _lock(self, group: str) -> threading.RLock:
        with self._guard:
            lock = self._locks.get(group)
            if lock is None:
                lock = self._locks[group] = threading.RLock()
            return lock

    def _store(self, group: str) -> GroupStore:
        return self._engine.group(group)

    def _pair(self, group: str) -> PairInfo:
        metadata = self._engine.metadata
        metadata.get_group(group)  # NotFound names an unknown group
        try:
            return metadata.get_pair(group)
        except NotFound:
            raise FailedPrecondition(
                f"group {group!r} has no pair at site {self._site}: role changes need a pair"
            ) from None

    def _state(self, store: GroupStore) -> RolesState:
        return self._states.get(store.group_dir)

    def _save(self, store: GroupStore) -> None:
        self._states.save(store.group_dir)

    def _begin(self, group: str, command: str, step: str) -> RoleStatus:
        status = RoleStatus(group, command=command, phase="running", step=step)
        with self._guard:
            self._statuses[group] = status
        log.info("group %s: %s: %s", group, command, step)
        return status

    def _status(self, group: str) -> RoleStatus:
        with self._guard:
            status = self._statuses.get(group)
        return status if status is not None else RoleStatus(group)

    def _running(self, group: str) -> PrimaryPair | SecondaryGroup | None:
        return self._repl.running(group)

    def _primary_runner(self, group: str) -> PrimaryPair:
        running = self._repl.running(group)
        if not isinstance(running, PrimaryPair):
            raise FailedPrecondition(f"group {group!r} is not primary at site {self._site}")
        return running

    def _spawn(self, key: str, target: Callable[[], None]) -> None:
        """Run `target` in a daemon thread named after `key` (one per key at a time)."""
        with self._guard:
            old = self._threads.get(key)
            if old is not None and old.is_alive():
                return
            thread = threading.Thread(target=target, name=f"roles-{key}", daemon=True)
            self._threads[key] = thread
        thread.start()

    def _join(self, key: str, timeout: float = 30.0) -> None:
        with self._guard:
            thread = self._threads.get(key)
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    # --- the peer ----------------------------------------------------------------------------

    def _channel(self, peer: str) -> grpc.Channel:
        return open_channel(self._repl.peer_address(peer), peer, self._tls)

    def _peer_call(
        self,
        peer: str,
        call: Callable[[replication_pb2_grpc.RolePeerStub], T],
    ) -> T:
        channel = self._channel(peer)
        try:
            return call(replication_pb2_grpc.RolePeerStub(channel))
        except grpc.RpcError as error:
            raise error_from_rpc(error, peer) from None
        finally:
            channel.close()

    def _probe(self, group: str, peer: str, timeout: float) -> replication_pb2.ProbeResponse | None:
        """The peer's answer about the group, or None when it cannot be reached in time."""
        request = replication_pb2.ProbeRequest(group=group, site=self._site)
        try:
            response: replication_pb2.ProbeResponse = self._peer_call(
                peer, lambda stub: stub.Probe(request, timeout=timeout)
            )
        except TargetdReplError as error:
            log.info("group %s: site %s does not answer: %s", group, peer, error)
            return None
        return response

    def _check_peer(self, pair: PairInfo, site: str, group: str) -> None:
        if pair.peer_site != site:
            raise FailedPrecondition(
                f"group {group!r} is paired with site {pair.peer_site} at site {self._site}, "
                f"not with {site}"
            )

    # --- storage helpers -----------------------------------------------------------------------

    @staticmethod
    def _sizes(store: GroupStore) -> dict[int, int]:
        return {v: store.volume(v).info.size_bytes for v in store.volume_ids()}

    @staticmethod
    def _apply_all(store: GroupStore) -> int:
        """Apply every record the receive journal holds (the receiver is stopped)."""
        while store.applied_seq < store.journal.durable_seq:
            store.apply_received()
        store.checkpoint()
        return store.applied_seq

    def _ensure_snapshot(self, store: GroupStore, name: str, kind: SnapshotKind) -> int:
        """A group-consistent snapshot `name` of every volume (taken now unless every volume
        has it already: a rerun); return its seq."""
        metadata = self._engine.metadata
        vids = store.volume_ids()
        have = [v for v in vids if name in store.volume(v).snapshots]
        if len(have) == len(vids):
            return metadata.get_snapshot(vids[0], name).seq
        for vid in have:  # a crash between two volumes: take it again, whole
            store.delete_snapshot(vid, name)
        return store.create_snapshot(vids, name, kind)[0].seq

    @staticmethod
    def _drop_snapshot(store: GroupStore, name: str) -> None:
        if not name:
            return
        for vid in store.volume_ids():
            if name in store.volume(vid).snapshots:
                with contextlib.suppress(NotFound):
                    store.delete_snapshot(vid, name)

    def _bitmaps_to_proto(
        self, store: GroupStore, bitmaps: RegionBitmaps
    ) -> list[replication_pb2.RegionBitmap]:
        out = []
        for vid in store.volume_ids():
            bm = bitmaps.bitmap(vid)
            out.append(
                replication_pb2.RegionBitmap(
                    volume=store.volume(vid).info.name,
                    size_bytes=bm.size_bytes,
                    region_size=bm.region_size,
                    bits=bm.to_bytes(),
                )
            )
        return out

    def _bitmaps_from_proto(
        self, store: GroupStore, msgs: Iterable[replication_pb2.RegionBitmap]
    ) -> dict[int, DirtyBitmap]:
        """The peer's region bitmaps under our volume ids (same names and sizes)."""
        ids = {store.volume(v).info.name: v for v in store.volume_ids()}
        out: dict[int, DirtyBitmap] = {}
        for msg in msgs:
            vid = ids.get(msg.volume)
            if vid is None:
                raise NotFound(f"volume {msg.volume!r} is not in group {store.name!r} here")
            size = store.volume(vid).info.size_bytes
            if msg.size_bytes != size or msg.region_size != self._settings.region_size:
                raise InvalidArgument(
                    f"volume {msg.volume!r}: the peer's bitmap covers {msg.size_bytes} bytes in "
                    f"{msg.region_size}-byte regions, here {size} in "
                    f"{self._settings.region_size}"
                )
            out[vid] = DirtyBitmap.from_bytes(
                msg.bits, size_bytes=size, region_size=self._settings.region_size
            )
        return out
