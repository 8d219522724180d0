"""The control service: every operation of the control API over the site's StorageEngine and its
replication manager, with domain types in and out. No protobuf, no gRPC here: the servicer
(control_servicer.py) translates, this module decides.

Byte ranges of `write`/`read` are checked against the volume's block size here, then handed to
`StorageEngine.write/read`, the entry point the TCMU handler uses too.

When the site exports its volumes (`[export]`, export.py), every volume change (create, resize,
delete, move into a group) runs inside `export.changing(...)`: the LUNs of the groups involved
pause while the engine reopens them, and LIO is reconciled with the metadata afterwards.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

from targetd_repl import __version__
from targetd_repl.config import parse_address
from targetd_repl.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    Misaligned,
    NotFound,
)
from targetd_repl.model import (
    PairMode,
    PairState,
    Role,
    SnapshotInfo,
    SnapshotKind,
    VolumeInfo,
    check_name,
)
from targetd_repl.replication.settings import FencePolicy
from targetd_repl.roles.manager import CopyStep, RoleManager, RoleStatus, VerifyStep
from targetd_repl.storage.engine import StorageEngine

log = logging.getLogger(__name__)

MAX_IO_BYTES = 4 << 20  # one Io.Write / Io.Read moves at most this much


# --- what the service needs from replication (filled by replication.manager) ----------------------


class ExportHooks(Protocol):
    """The site's LIO export (export.SiteExport), as the service drives it."""

    def changing(
        self, *, volumes: Sequence[str] = (), groups: Sequence[str] = ()
    ) -> AbstractContextManager[None]: ...


class PairStatusView(Protocol):
    """The status of one pair, as the replication manager reports it."""

    @property
    def group(self) -> str: ...
    @property
    def peer(self) -> str: ...
    @property
    def mode(self) -> PairMode: ...
    @property
    def state(self) -> PairState: ...
    @property
    def role(self) -> Role: ...
    @property
    def epoch(self) -> int: ...
    @property
    def last_seq(self) -> int: ...
    @property
    def acked_seq(self) -> int: ...
    @property
    def applied_seq(self) -> int: ...
    @property
    def lag_records(self) -> int: ...
    @property
    def lag_seconds(self) -> float: ...
    @property
    def unsent_regions(self) -> int: ...
    @property
    def resync_done_bytes(self) -> int: ...
    @property
    def resync_total_bytes(self) -> int: ...
    @property
    def detail(self) -> str: ...


class PairInfoLike(Protocol):
    @property
    def peer_site(self) -> str: ...
    @property
    def state(self) -> PairState: ...


class Replication(Protocol):
    """The pair operations of replication.manager.ReplicationManager the control API exposes."""

    def set_peer_address(self, name: str, address: str) -> None: ...
    def create_pair(
        self, group: str, peer: str, mode: PairMode, *, fence: FencePolicy = ...
    ) -> PairStatusView: ...
    def pair_status(self, group: str) -> PairStatusView: ...
    def list_pairs(self) -> Sequence[PairStatusView]: ...
    def suspend(self, group: str) -> PairStatusView: ...
    def resume(self, group: str) -> PairStatusView: ...
    def delete_pair(self, group: str) -> None: ...


# --- domain views the service returns -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VolumeView:
    name: str
    size_bytes: int
    block_size: int
    group: str
    created_at: float


@dataclass(frozen=True, slots=True)
class GroupView:
    name: str
    role: Role
    epoch: int
    volumes: tuple[str, ...]
    applied_seq: int
    peer: str  # "" when not paired
    created_at: float


@dataclass(frozen=True, slots=True)
class JournalView:
    """One group's journal: how far it got and how full it is."""

    group: str
    role: Role
    last_seq: int  # durable records so far (a counter: its rate is the group's writes/s)
    used_bytes: int
    limit_bytes: int


@dataclass(frozen=True, slots=True)
class SnapshotView:
    volume: str
    name: str
    kind: SnapshotKind
    created_at: float
    epoch: int
    seq: int
    size_bytes: int
    preserved_bytes: int


@dataclass(frozen=True, slots=True)
class RoleChangeView:
    """A role change's status at this site, with the pair's (None when there is no pair)."""

    status: RoleStatus
    pair: PairStatusView | None


@dataclass(frozen=True, slots=True)
class SiteView:
    name: str
    version: str
    state_dir: str
    replication_address: str
    control_socket: str
    control_address: str
    peers: tuple[tuple[str, str], ...]  # (name, address), by name
    pid: int
    started_at: float


@dataclass(frozen=True, slots=True)
class Endpoints:
    """Where this controller serves, known once its servers are bound."""

    replication_address: str
    control_socket: str
    control_address: str = ""
    bulk_lane_address: str = ""  # "": no bulk lane offered (replication/bulk.py)


class ControlService:
    """The operations of the control API. Thread-safe as far as the engine and manager are."""

    def __init__(
        self,
        engine: StorageEngine,
        replication: Replication,
        *,
        site: str,
        endpoints: Endpoints,
        peers: Mapping[str, str],
        roles: RoleManager | None = None,
        export: ExportHooks | None = None,
    ) -> None:
        self._engine = engine
        self._export = export
        self._replication = replication
        self._roles = roles
        self._site = site
        self._endpoints = endpoints
        self._peers = dict(peers)
        self._started_at = time.time()

    # --- volumes -------------------------------------------------------------------------------

    def _changing(
        self, *, volumes: Sequence[str] = (), groups: Sequence[str] = ()
    ) -> AbstractContextManager[None]:
        """Around a volume change: the export pauses and re-exports what it touches (if any)."""
        if self._export is None:
            return contextlib.nullcontext()
        return self._export.changing(volumes=volumes, groups=groups)

    def _volume_view(self, info: VolumeInfo, groups: Mapping[int, str] | None = None) -> VolumeView:
        if groups is not None and info.group_id is not None:
            group = groups.get(info.group_id, "")
        elif info.group_id is not None:
            group = self._engine.metadata.get_group_by_id(info.group_id).name
        else:
            group = ""
        return VolumeView(info.name, info.size_bytes, info.block_size, group, info.created_at)

    def create_volume(
        self, name: str, size_bytes: int, *, block_size: int = 512, group: str | None = None
    ) -> VolumeView:
        if size_bytes <= 0:
            raise InvalidArgument(f"volume {name!r}: size must be positive, not {size_bytes}")
        if any(v.name == name for v in self._engine.list_volumes()):
            raise AlreadyExists(f"volume {name!r} already exists")
        with self._changing(volumes=[name], groups=[group] if group else []):
            info = self._engine.create_volume(name, size_bytes, block_size=block_size, group=group)
        view = self._volume_view(info)
        log.info(
            "volume %s created: %d bytes, block size %d, group %s",
            name,
            size_bytes,
            block_size,
            view.group,
        )
        return view

    def list_volumes(self, group: str | None = None) -> list[VolumeView]:
        groups = {g.id: g.name for g in self._engine.list_groups()}
        if group is not None:
            self._engine.metadata.get_group(group)  # NotFound names it
        views = [self._volume_view(v, groups) for v in self._engine.list_volumes()]
        if group is not None:
            views = [v for v in views if v.group == group]
        return sorted(views, key=lambda v: v.name)

    def resize_volume(self, name: str, size_bytes: int) -> VolumeView:
        if size_bytes <= 0:
            raise InvalidArgument(f"volume {name!r}: size must be positive, not {size_bytes}")
        old = self._engine.metadata.get_volume(name)
        with self._changing(volumes=[name]):
            info = self._engine.resize_volume(name, size_bytes)
        log.info("volume %s resized: %d -> %d bytes", name, old.size_bytes, size_bytes)
        return self._volume_view(info)

    def delete_volume(self, name: str) -> None:
        with self._changing(volumes=[name]):
            self._engine.delete_volume(name)
        log.info("volume %s deleted", name)

    # --- groups --------------------------------------------------------------------------------

    def create_group(self, name: str) -> GroupView:
        self._engine.create_group(name)
        log.info("group %s created", name)
        return self._group_view(name)

    def add_volume(self, group: str, volume: str) -> VolumeView:
        with self._changing(volumes=[volume], groups=[group]):
            info = self._engine.move_volume(volume, group)
        log.info("volume %s moved into group %s", volume, group)
        return self._volume_view(info)

    def _group_view(self, name: str) -> GroupView:
        return next(g for g in self.list_groups() if g.name == name)

    def list_groups(self) -> list[GroupView]:
        metadata = self._engine.metadata
        peers = {p.group_id: p.peer_site for p in metadata.list_pairs()}
        members: dict[int, list[str]] = {}
        for volume in self._engine.list_volumes():
            if volume.group_id is not None:
                members.setdefault(volume.group_id, []).append(volume.name)
        views = [
            GroupView(
                name=g.name,
                role=g.role,
                epoch=g.epoch,
                volumes=tuple(sorted(members.get(g.id, []))),
                applied_seq=g.applied_seq,
                peer=peers.get(g.id, ""),
                created_at=g.created_at,
            )
            for g in self._engine.list_groups()
        ]
        return sorted(views, key=lambda g: g.name)

    def journals(self) -> list[JournalView]:
        """Every group's journal figures (for metrics)."""
        views = []
        for info in self._engine.list_groups():
            try:
                journal = self._engine.group(info.name).journal
            except (NotFound, KeyError):
                continue  # deleted since it was listed
            views.append(
                JournalView(
                    info.name,
                    info.role,
                    journal.durable_seq,
                    journal.used_bytes,
                    journal.size_limit,
                )
            )
        return sorted(views, key=lambda v: v.group)

    # --- pairs ---------------------------------------------------------------------------------

    def _check_peer(self, peer: str) -> None:
        if peer not in self._peers:
            known = ", ".join(sorted(self._peers)) or "none"
            raise NotFound(
                f"peer site {peer!r} not found in this site's configuration (known: {known})"
            )

    def create_pair(
        self, group: str, peer: str, mode: PairMode, fence: FencePolicy = FencePolicy.NONE
    ) -> PairStatusView:
        check_name("group", group)
        self._check_peer(peer)
        if fence is not FencePolicy.NONE and mode is not PairMode.SYNC:
            raise InvalidArgument(
                f"pair {group!r}: fence policy {fence} applies to sync pairs only"
            )
        status = self._replication.create_pair(group, peer, mode, fence=fence)
        log.info(
            "pair %s created: peer %s, mode %s, fence %s, state %s",
            group,
            peer,
            mode,
            fence,
            status.state,
        )
        return status

    def pair_status(self, group: str) -> PairStatusView:
        return self._replication.pair_status(group)

    def list_pairs(self) -> list[PairStatusView]:
        return sorted(self._replication.list_pairs(), key=lambda p: p.group)

    def suspend_pair(self, group: str) -> PairStatusView:
        status = self._replication.suspend(group)
        log.info("pair %s suspended: state %s", group, status.state)
        return status

    def resume_pair(self, group: str) -> PairStatusView:
        status = self._replication.resume(group)
        log.info("pair %s resumed: state %s", group, status.state)
        return status

    def delete_pair(self, group: str) -> None:
        self._replication.delete_pair(group)
        log.info("pair %s deleted", group)

    # --- snapshots -----------------------------------------------------------------------------

    def _snapshot_view(self, info: SnapshotInfo, volume: str | None = None) -> SnapshotView:
        name = volume or self._engine.metadata.get_volume(info.volume_id).name
        store, vid = self._engine.group_of(name)
        ov = store.volume(vid)
        preserved = 0
        size = ov.info.size_bytes
        if info.name in ov.snapshots:
            snap = ov.snapshots.get(info.name)
            preserved = snap.preserved_count * snap.chunk_size
            size = snap.size_bytes
        return SnapshotView(
            volume=name,
            name=info.name,
            kind=info.kind,
            created_at=info.created_at,
            epoch=info.epoch,
            seq=info.seq,
            size_bytes=size,
            preserved_bytes=preserved,
        )

    def create_snapshot(self, volume: str, name: str) -> SnapshotView:
        check_name("volume", volume)
        check_name("snapshot", name)
        info = self._engine.create_snapshot(volume, name, SnapshotKind.USER)
        log.info("snapshot %s of volume %s created at seq %d", name, volume, info.seq)
        return self._snapshot_view(info, volume)

    def list_snapshots(self, volume: str | None = None) -> list[SnapshotView]:
        if volume is not None:
            self._engine.metadata.get_volume(volume)  # NotFound names it
        names = {v.id: v.name for v in self._engine.list_volumes()}
        return [
            self._snapshot_view(info, names.get(info.volume_id))
            for info in self._engine.list_snapshots(volume)
        ]

    def delete_snapshot(self, volume: str, name: str, *, force: bool = False) -> None:
        info = self._engine.metadata.get_snapshot(volume, name)
        if info.kind is not SnapshotKind.USER and not force:
            raise FailedPrecondition(
                f"snapshot {name!r} of volume {volume!r} was made by a role change "
                f"({info.kind}); it keeps data nothing else holds: delete it with --force"
            )
        if info.kind in (SnapshotKind.RESTART_POINT, SnapshotKind.RESYNC_SOURCE):
            store, _ = self._engine.group_of(volume)
            pair = self._pair_of(store.info.id)
            if pair is not None and pair.state in (PairState.SWAPPED, PairState.COPYING):
                raise FailedPrecondition(
                    f"snapshot {name!r} of volume {volume!r} ({info.kind}) is in use: group "
                    f"{store.name!r} is {pair.state}; it goes when the failback completes"
                )
        self._engine.delete_snapshot(volume, name)
        log.info("snapshot %s of volume %s deleted", name, volume)

    def _pair_of(self, group_id: int) -> PairInfoLike | None:
        return next((p for p in self._engine.metadata.list_pairs() if p.group_id == group_id), None)

    def rollback_snapshot(self, volume: str, name: str) -> tuple[int, int]:
        """Roll a volume back to a snapshot; return (regions, bytes) copied back."""
        self._engine.metadata.get_snapshot(volume, name)  # NotFound names it
        store, vid = self._engine.group_of(volume)
        pair = self._pair_of(store.info.id)
        if pair is not None:
            raise FailedPrecondition(
                f"cannot roll back volume {volume!r}: group {store.name!r} is paired with site "
                f"{pair.peer_site} (pair {pair.state}, {store.role} here); the peer would not "
                "see the change: delete the pair first (a failback rolls back by itself)"
            )
        regions = self._engine.rollback_snapshot(volume, name)
        chunk = store.volume(vid).snapshots.chunk_size
        log.info("volume %s rolled back to snapshot %s: %d regions", volume, name, regions)
        return regions, regions * chunk

    # --- role changes --------------------------------------------------------------------------

    def _role_manager(self) -> RoleManager:
        if self._roles is None:
            raise FailedPrecondition("role changes are not available at this site")
        return self._roles

    def _role_view(self, status: RoleStatus) -> RoleChangeView:
        try:
            pair: PairStatusView | None = self._replication.pair_status(status.group)
        except NotFound:
            pair = None
        return RoleChangeView(status, pair)

    def failover(self, group: str, *, force: bool = False) -> RoleChangeView:
        check_name("group", group)
        return self._role_view(self._role_manager().failover(group, force=force))

    def failback(self, group: str) -> RoleChangeView:
        check_name("group", group)
        return self._role_view(self._role_manager().failback(group))

    def switchover(self, group: str) -> RoleChangeView:
        check_name("group", group)
        return self._role_view(self._role_manager().switchover(group))

    def resolve(self, group: str, survivor: str) -> RoleChangeView:
        check_name("group", group)
        check_name("site", survivor)
        return self._role_view(self._role_manager().resolve_split_brain(group, survivor))

    def role_status(self, group: str) -> RoleChangeView:
        check_name("group", group)
        return self._role_view(self._role_manager().status(group))

    def copy(
        self,
        volume: str,
        offset: int,
        length: int,
        site: str,
        target_volume: str,
        target_offset: int,
        via: str = "",
    ) -> Iterator[CopyStep]:
        self._check_peer(site)
        return self._role_manager().copy_extent(
            volume, offset, length, site, target_volume, target_offset, via
        )

    def verify(self, group: str, volume: str = "") -> Iterator[VerifyStep]:
        check_name("group", group)
        if volume:
            check_name("volume", volume)
        return self._role_manager().verify(group, volume)

    # --- I/O -----------------------------------------------------------------------------------

    def _blocks(self, volume: str, offset: int, length: int) -> tuple[int, int]:
        """(lba, block_size) of a byte range, checked for alignment and size."""
        info = self._engine.metadata.get_volume(volume)
        bs = info.block_size
        if length <= 0:
            raise InvalidArgument(f"volume {volume!r}: length must be positive, not {length}")
        if length > MAX_IO_BYTES:
            raise InvalidArgument(
                f"volume {volume!r}: {length} bytes is more than one call moves "
                f"({MAX_IO_BYTES} bytes); split the range"
            )
        if offset < 0 or offset % bs or length % bs:
            raise Misaligned(
                f"volume {volume!r}: offset {offset} and length {length} must be multiples "
                f"of its block size {bs}"
            )
        return offset // bs, bs

    def write(self, volume: str, offset: int, data: bytes) -> int:
        """Write `data` at byte `offset`; return the journal seq."""
        lba, _ = self._blocks(volume, offset, len(data))
        return self._engine.write(volume, lba, data)

    def read(self, volume: str, offset: int, length: int) -> bytes:
        lba, bs = self._blocks(volume, offset, length)
        return self._engine.read(volume, lba, length // bs)

    # --- the site ------------------------------------------------------------------------------

    def site_info(self) -> SiteView:
        return SiteView(
            name=self._site,
            version=__version__,
            state_dir=str(self._engine.state_dir),
            replication_address=self._endpoints.replication_address,
            control_socket=self._endpoints.control_socket,
            control_address=self._endpoints.control_address,
            peers=tuple(sorted(self._peers.items())),
            pid=os.getpid(),
            started_at=self._started_at,
        )

    def set_peer_address(self, name: str, address: str) -> tuple[str, str]:
        self._check_peer(name)
        try:
            parse_address(address)
        except ValueError as error:
            raise InvalidArgument(f"peer site {name!r}: {error}") from None
        self._replication.set_peer_address(name, address)
        old, self._peers[name] = self._peers[name], address
        log.info("peer %s address set: %s -> %s", name, old, address)
        return name, address
