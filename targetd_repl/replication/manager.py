"""The replication service a site controller composes: pairs at this site, both roles.

`ReplicationManager` is the facade the daemon and the control API call. At the primary of a
group it runs a `PrimaryPair` (primary.py: sender, sync waits, tracking, resync); at the
secondary a `SecondaryGroup` (secondary.py: receiver, applier). `servicer()` is the site-to-site
gRPC servicer the daemon registers on the replication server
(`replication_pb2_grpc.add_ReplicationServicer_to_server(manager.servicer(), server)`, with
`channel.server_options()` and `channel.add_port(server, address, tls)`).

Pair creation (at the primary): the peer creates the secondary side — the group as secondary
(epoch 0, no history) and every volume of the group with the same name, size and block size if
it does not exist; an existing volume of another size (or block size), in another group, or a
group that is primary there, is refused with FAILED_PRECONDITION naming it, and nothing is
created. Then the pair row is written here (state `copying`) and the first handshake decides the
full copy (the secondary has no history yet).

Order of shutdown: `stop()` before `StorageEngine.close()` (the hooks live in the group stores).
Errors are targetd_repl.errors types; replication/status.py maps them to gRPC codes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import grpc

from targetd_repl.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    TargetdReplError,
)
from targetd_repl.model import (
    DEFAULT_REGION_SIZE,
    PairInfo,
    PairMode,
    PairState,
    Role,
    check_name,
)
from targetd_repl.replication import wire
from targetd_repl.replication.bulk import LaneListener
from targetd_repl.replication.channel import TlsFiles, open_channel
from targetd_repl.replication.errors import PeerUnavailable
from targetd_repl.replication.handshake import HandshakeDecision, HandshakeView
from targetd_repl.replication.primary import PrimaryPair
from targetd_repl.replication.secondary import SecondaryGroup, check_volumes
from targetd_repl.replication.servicer import ReplicationServicer
from targetd_repl.replication.settings import FencePolicy, ReplicationSettings
from targetd_repl.replication.status import error_from_rpc
from targetd_repl.roles.pair_state import Event
from targetd_repl.storage.engine import StorageEngine
from targetd_repl.v1 import replication_pb2, replication_pb2_grpc

__all__ = [
    "FencePolicy",
    "PairStatus",
    "PeerSite",
    "ReplicationManager",
    "ReplicationSettings",
    "TlsFiles",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PeerSite:
    name: str
    address: str  # "host:port" of the peer's replication server
    lane_address: str | None = None  # its bulk lane, if not at that host and announced port


@dataclass(frozen=True)
class PairStatus:
    group: str
    peer: str
    mode: PairMode
    state: PairState
    role: Role
    epoch: int
    last_seq: int  # primary: last durable seq; secondary: last received seq
    acked_seq: int  # what the secondary holds durably (received)
    applied_seq: int  # what the secondary applied to its volumes
    lag_records: int  # primary: last_seq - acked_seq; secondary: received - applied
    lag_seconds: float  # age of the oldest unacknowledged record (primary)
    unsent_regions: int  # set bits of the unsent bitmap (primary)
    resync_done_bytes: int
    resync_total_bytes: int
    detail: str  # the last error or note that came with the state


class ReplicationManager:
    """Pairs at this site. Thread-safe; see the module docstring."""

    def __init__(
        self,
        engine: StorageEngine,
        site_name: str,
        peers: Mapping[str, PeerSite],
        tls: TlsFiles | None,
        settings: ReplicationSettings | None = None,
    ) -> None:
        check_name("site", site_name)
        self._engine = engine
        self._site = site_name
        self._peers = dict(peers)
        self._tls = tls
        self._settings = settings or ReplicationSettings()
        self._lock = threading.RLock()
        self._primaries: dict[str, PrimaryPair] = {}
        self._secondaries: dict[str, SecondaryGroup] = {}
        self._started = False
        self._lane: LaneListener | None = None
        # roles/: called with each runner or receiver before it starts (installs its hooks),
        # and with the group's name once its pair is deleted here (forgets its role changes)
        self.on_attach: Callable[[str, PrimaryPair | SecondaryGroup], None] | None = None
        self.on_delete: Callable[[str], None] | None = None

    @property
    def site(self) -> str:
        return self._site

    @property
    def settings(self) -> ReplicationSettings:
        return self._settings

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Resume every persisted pair from its persisted state."""
        with self._lock:
            if self._started:
                return
            self._started = True
            metadata = self._engine.metadata
            for pair in metadata.list_pairs():
                group = metadata.get_group_by_id(pair.group_id)
                try:
                    self._attach(group.name, pair)
                except TargetdReplError as error:
                    log.error("pair %s: cannot resume: %s", group.name, error)

    def stop(self) -> None:
        """Stop every pair cleanly: streams closed, acked seqs and bitmaps saved."""
        with self._lock:
            primaries = list(self._primaries.values())
            secondaries = list(self._secondaries.values())
            self._primaries.clear()
            self._secondaries.clear()
            self._started = False
        for runner in primaries:
            runner.stop()
        for receiver in secondaries:
            receiver.stop()
        with self._lock:
            lane, self._lane = self._lane, None
        if lane is not None:
            lane.close()

    def serve_lane(self, host: str, port: int = 0) -> int:
        """Offer a bulk lane (bulk.py) to the senders of this site's secondaries, listening on
        `host`:`port` (0: a port the OS chooses, told to each sender in its stream's first
        acknowledgement). Returns the port. Without it every stream stays on gRPC."""
        with self._lock:
            if self._lane is None:
                self._lane = LaneListener(host, port, self._tls)
            return self._lane.port

    @property
    def lane(self) -> LaneListener | None:
        return self._lane

    def servicer(self) -> replication_pb2_grpc.ReplicationServicer:
        return ReplicationServicer(self)

    def set_peer_address(self, name: str, address: str, lane_address: str | None = None) -> None:
        check_name("site", name)
        with self._lock:
            self._peers[name] = PeerSite(name, address, lane_address)

    def peer_lane_address(self, name: str) -> str | None:
        with self._lock:
            peer = self._peers.get(name)
        return None if peer is None else peer.lane_address

    def peer_address(self, name: str) -> str:
        with self._lock:
            peer = self._peers.get(name)
        if peer is None:
            raise NotFound(f"peer site {name!r} is not configured at site {self._site}")
        return peer.address

    def _attach(self, group: str, pair: PairInfo) -> None:
        """Start the runner (primary) or receiver (secondary) of a persisted pair (lock held)."""
        store = self._engine.group(group)
        metadata = self._engine.metadata
        if store.role is Role.PRIMARY:
            runner = PrimaryPair(
                store=store,
                metadata=metadata,
                site=self._site,
                pair=pair,
                address=self._address_of(pair.peer_site),
                lane_address=self._lane_address_of(pair.peer_site),
                tls=self._tls,
                settings=self._settings,
                region_size=self._region_size(),
            )
            if self.on_attach is not None:
                self.on_attach(group, runner)
            runner.start()
            self._primaries[group] = runner
        else:
            receiver = SecondaryGroup(
                store=store,
                metadata=metadata,
                site=self._site,
                pair=pair,
                settings=self._settings,
            )
            if self.on_attach is not None:
                self.on_attach(group, receiver)
            receiver.start()
            self._secondaries[group] = receiver

    # --- role changes (roles/ calls these) ------------------------------------------------------

    def detach(self, group: str) -> None:
        """Stop the group's runner or receiver (files and pair row stay): a role change is about
        to turn one into the other."""
        with self._lock:
            runner = self._primaries.pop(group, None)
            receiver = self._secondaries.pop(group, None)
        if runner is not None:
            runner.stop()
        if receiver is not None:
            receiver.stop()

    def reattach(self, group: str) -> PrimaryPair | SecondaryGroup:
        """Stop what runs for the group and start what its role here calls for (a PrimaryPair
        at the primary, a SecondaryGroup at the secondary), from the persisted pair row."""
        self.detach(group)
        with self._lock:
            pair = self._engine.metadata.get_pair(group)
            self._attach(group, pair)
            runner = self._primaries.get(group)
            if runner is not None:
                return runner
            return self._secondaries[group]

    def running(self, group: str) -> PrimaryPair | SecondaryGroup | None:
        """The group's runner or receiver here, if any."""
        with self._lock:
            return self._primaries.get(group) or self._secondaries.get(group)

    def answer_handshake(
        self, peer: HandshakeView, volumes: list[replication_pb2.ReplVolume]
    ) -> tuple[HandshakeView, HandshakeDecision]:
        """A handshake for a group this site runs as primary (servicer.py): the caller may be a
        stale primary to fence, or the other side of a split-brain (roles/)."""
        with self._lock:
            runner = self._primaries.get(peer.group)
        if runner is None:
            raise NotFound(f"group {peer.group!r} has no pair at site {self._site}")
        if runner.peer != peer.site:
            raise FailedPrecondition(
                f"group {peer.group!r} is paired with site {runner.peer} here, not {peer.site}"
            )
        check_volumes(self._engine.metadata, runner.store, volumes)
        return runner.answer_handshake(peer)

    def _address_of(self, peer: str) -> Callable[[], str]:
        return lambda: self.peer_address(peer)

    def _lane_address_of(self, peer: str) -> Callable[[], str | None]:
        return lambda: self.peer_lane_address(peer)

    @staticmethod
    def _region_size() -> int:
        """The unsent bitmap's region: what one bit stands for, and a resync's copy unit."""
        return DEFAULT_REGION_SIZE

    # --- pairs (the control API calls these) --------------------------------------------------

    def create_pair(
        self, group: str, peer: str, mode: PairMode, *, fence: FencePolicy = FencePolicy.NONE
    ) -> PairStatus:
        """Pair `group` (primary here) with site `peer`; the initial copy starts at once."""
        check_name("group", group)
        check_name("site", peer)
        mode = PairMode(mode)
        fence = FencePolicy(fence)
        metadata = self._engine.metadata
        with self._lock:
            info = metadata.get_group(group)
            if info.role is not Role.PRIMARY:
                raise FailedPrecondition(
                    f"group {group!r} is {info.role} at site {self._site}: create the pair at "
                    "its primary site"
                )
            if any(p.group_id == info.id for p in metadata.list_pairs()):
                raise AlreadyExists(f"group {group!r} is already paired")
            if peer == self._site:
                raise InvalidArgument(f"cannot pair group {group!r} with this site ({peer})")
            store = self._engine.group(group)
            if not store.volume_ids():
                raise FailedPrecondition(f"group {group!r} has no volume to replicate")
            request = replication_pb2.CreateSecondaryRequest(
                group=group,
                primary_site=self._site,
                mode=wire.mode_to_proto(mode),
                volumes=[wire.volume_to_proto(store.volume(v).info) for v in store.volume_ids()],
            )
            self._call(peer, lambda stub: stub.CreateSecondary(request, timeout=self._rpc_timeout))
            pair = metadata.create_pair(group, peer, mode, state=PairState.COPYING)
            self._attach(group, pair)
            runner = self._primaries[group]
            if fence is not FencePolicy.NONE:
                runner.set_fence(fence)
            log.info("pair %s created with site %s (%s)", group, peer, mode)
            return self._status(group)

    @property
    def _rpc_timeout(self) -> float:
        return self._settings.rpc_timeout

    def _call(
        self,
        peer: str,
        call: Callable[[replication_pb2_grpc.ReplicationStub], object],
    ) -> object:
        channel = open_channel(self.peer_address(peer), peer, self._tls)
        try:
            stub = replication_pb2_grpc.ReplicationStub(channel)
            return call(stub)
        except grpc.RpcError as error:
            raise error_from_rpc(error, peer) from None
        finally:
            channel.close()

    def pair_status(self, group: str) -> PairStatus:
        with self._lock:
            return self._status(group)

    def list_pairs(self) -> list[PairStatus]:
        with self._lock:
            names = sorted({*self._primaries, *self._secondaries})
            return [self._status(name) for name in names]

    def _status(self, group: str) -> PairStatus:
        runner = self._primaries.get(group)
        if runner is not None:
            fields = runner.status_fields()
            return PairStatus(**fields)  # type: ignore[arg-type]
        receiver = self._secondaries.get(group)
        if receiver is None:
            self._engine.metadata.get_group(group)  # NotFound names an unknown group
            raise NotFound(f"group {group!r} has no pair at site {self._site}")
        store = receiver.store
        pair = receiver.pair
        received = store.journal.durable_seq
        applied = min(store.applied_seq, received)
        return PairStatus(
            group=group,
            peer=pair.peer_site,
            mode=pair.mode,
            state=pair.state,
            role=Role.SECONDARY,
            epoch=store.info.epoch,
            last_seq=received,
            acked_seq=received,
            applied_seq=applied,
            lag_records=received - applied,
            lag_seconds=0.0,
            unsent_regions=0,
            resync_done_bytes=0,
            resync_total_bytes=0,
            detail=pair.detail,
        )

    def suspend(self, group: str) -> PairStatus:
        runner = self._primary(group)
        runner.suspend()
        self._tell_peer(runner, replication_pb2.PEER_COMMAND_SUSPEND)
        return self.pair_status(group)

    def resume(self, group: str) -> PairStatus:
        runner = self._primary(group)
        self._tell_peer(runner, replication_pb2.PEER_COMMAND_RESUME)
        runner.resume()
        return self.pair_status(group)

    def delete_pair(self, group: str) -> None:
        """Delete the pair here (and at the peer, best effort). Both sites keep their volumes;
        the secondary's group stays secondary (read-only) until an admin promotes it."""
        with self._lock:
            runner = self._primaries.pop(group, None)
            receiver = self._secondaries.pop(group, None)
            if runner is None and receiver is None:
                self._engine.metadata.get_group(group)
                raise NotFound(f"group {group!r} has no pair at site {self._site}")
        if runner is not None:
            runner.stop()
            self._tell_peer(runner, replication_pb2.PEER_COMMAND_DELETE)
            self._engine.metadata.delete_pair(group)
            runner.remove_files()
        if receiver is not None:
            receiver.stop()
            self._engine.metadata.delete_pair(group)
            receiver.remove_files()
        if self.on_delete is not None:
            self.on_delete(group)
        log.info("pair %s deleted at site %s", group, self._site)

    def _primary(self, group: str) -> PrimaryPair:
        with self._lock:
            runner = self._primaries.get(group)
            if runner is not None:
                return runner
            if group in self._secondaries:
                raise FailedPrecondition(
                    f"group {group!r} is secondary at site {self._site}: run the command at "
                    "its primary site"
                )
            self._engine.metadata.get_group(group)
            raise NotFound(f"group {group!r} has no pair at site {self._site}")

    def _tell_peer(self, runner: PrimaryPair, command: replication_pb2.PeerCommand) -> None:
        request = replication_pb2.PeerCommandRequest(
            group=runner.group, site=self._site, command=command
        )
        try:
            self._call(
                runner.peer,
                lambda stub: stub.PeerCommand(request, timeout=min(2.0, self._rpc_timeout)),
            )
        except TargetdReplError as error:
            log.warning(
                "pair %s: could not tell site %s (it learns at the next handshake): %s",
                runner.group,
                runner.peer,
                error,
            )

    # --- for tests and benchmarks -------------------------------------------------------------

    def primary_runner(self, group: str) -> PrimaryPair:
        return self._primary(group)

    def secondary_receiver(self, group: str) -> SecondaryGroup:
        with self._lock:
            receiver = self._secondaries.get(group)
        if receiver is None:
            raise NotFound(f"group {group!r} is not a secondary at site {self._site}")
        return receiver

    def wait_for(
        self, group: str, predicate: Callable[[PairStatus], bool], timeout: float = 30.0
    ) -> PairStatus:
        """Poll the pair's status until `predicate` holds (PeerUnavailable after `timeout`)."""
        deadline = time.monotonic() + timeout
        status = self.pair_status(group)
        while not predicate(status):
            if time.monotonic() > deadline:
                raise PeerUnavailable(f"pair {group}: timed out waiting; last status {status}")
            time.sleep(0.01)
            status = self.pair_status(group)
        return status

    # --- the servicer's side (called by servicer.py) ------------------------------------------

    def secondary_for(self, group: str, site: str) -> SecondaryGroup:
        """The receiver of `group` paired with `site` (NotFound / FailedPrecondition)."""
        check_name("group", group)
        with self._lock:
            receiver = self._secondaries.get(group)
            if receiver is not None:
                return receiver
            info = self._engine.metadata.get_group(group)  # NotFound: unknown group
            if group in self._primaries:
                raise FailedPrecondition(
                    f"group {group!r} is primary at site {self._site}: it does not receive "
                    f"from site {site}"
                )
            raise NotFound(f"group {info.name!r} has no pair with site {site} at site {self._site}")

    def create_secondary(self, request: replication_pb2.CreateSecondaryRequest) -> list[str]:
        """The peer's CreateSecondary: create our side of the pair (see the module docstring);
        return the volumes created. Everything is checked before anything is created."""
        group, site = request.group, request.primary_site
        check_name("group", group)
        check_name("site", site)
        mode = wire.mode_from_proto(request.mode)
        if not request.volumes:
            raise InvalidArgument(f"pair request for group {group!r} names no volume")
        engine = self._engine
        metadata = engine.metadata
        with self._lock:
            existing = {g.name: g for g in metadata.list_groups()}.get(group)
            if existing is not None:
                if existing.role is Role.PRIMARY:
                    raise FailedPrecondition(
                        f"group {group!r} is primary at site {self._site}; it cannot become "
                        f"the secondary of site {site}"
                    )
                pair = next((p for p in metadata.list_pairs() if p.group_id == existing.id), None)
                if pair is not None:
                    if pair.peer_site != site:
                        raise AlreadyExists(
                            f"group {group!r} is already paired with site {pair.peer_site}"
                        )
                    check_volumes(metadata, engine.group(group), list(request.volumes))
                    return []  # the same request again
            missing = []
            for spec in request.volumes:
                check_name("volume", spec.name)
                try:
                    info = metadata.get_volume(spec.name)
                except NotFound:
                    missing.append(spec)
                    continue
                in_group = existing is not None and info.group_id == existing.id
                if not in_group:
                    raise FailedPrecondition(
                        f"volume {spec.name!r} exists at site {self._site} outside group {group!r}"
                    )
                if info.size_bytes != spec.size_bytes or info.block_size != spec.block_size:
                    raise FailedPrecondition(
                        f"volume {spec.name!r} is {info.size_bytes} bytes "
                        f"({info.block_size}-byte blocks) at site {self._site}, the primary's "
                        f"is {spec.size_bytes} bytes ({spec.block_size}-byte blocks)"
                    )
            if existing is None:
                engine.create_group(group, Role.SECONDARY)
            for spec in missing:
                engine.create_volume(
                    spec.name, spec.size_bytes, block_size=spec.block_size, group=group
                )
            check_volumes(metadata, engine.group(group), list(request.volumes))
            pair = metadata.create_pair(group, site, mode, state=PairState.COPYING)
            self._attach(group, pair)
            log.info(
                "pair %s: secondary side created for site %s (%d volume(s) created)",
                group,
                site,
                len(missing),
            )
            return [spec.name for spec in missing]

    def peer_command(self, request: replication_pb2.PeerCommandRequest) -> PairState:
        group = request.group
        receiver = self.secondary_for(group, request.site)
        if receiver.peer != request.site:
            raise FailedPrecondition(
                f"group {group!r} is paired with site {receiver.peer}, not {request.site}"
            )
        if request.command == replication_pb2.PEER_COMMAND_DELETE:
            self.delete_pair(group)
            return PairState.SIMPLEX
        if request.command == replication_pb2.PEER_COMMAND_SUSPEND:
            return receiver.command(Event.SUSPEND)
        if request.command == replication_pb2.PEER_COMMAND_RESUME:
            return receiver.command(Event.RESUME)
        raise InvalidArgument(f"unknown pair command {request.command}")
