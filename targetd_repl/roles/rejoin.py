"""Failback (seeds 001, 003) and split-brain resolution: a *rejoin* copies to the target site only
the regions that differ, on two streams at once, and leaves the pair `paired` with the source as
primary.

The source S (the new primary of a failback, the survivor of a resolve) and the target T (the
returning old primary, the loser):

  1. PrepareRejoin at T: the handshake table decides (rows T8 / X4 and their neighbours). T
     demotes if it still claims primary, saves what it will lose in a snapshot (kind
     rollback-save or split-brain-loser: a copy-on-write snapshot taken now keeps exactly the
     regions the rejoin overwrites; listed, never deleted silently), marks its image
     inconsistent and *holds*: records it receives are kept, unapplied, until step 4. It answers
     the regions it wrote after the common point (its unsent bitmap; for a loser also its
     changed bitmap), or "whole" when no bitmap covers them.
  2. At S: a group-consistent snapshot at seq s2 (kind resync-source: seed 001's second
     snapshot), and the union U of S's changed bitmap and T's regions (every region when
     whole). The plan is persisted; S's journal keeps every seq after s2.
  3. Two streams at once (seed 001 claims 3, 7): the live stream is Replication.Ship from s2 + 1
     (T restarts its receive journal there, discarding its own seqs past s2, saved in step 1),
     and the bulk stream RolePeer.WriteRegions writes U into T's volumes: regions S changed read
     from the s2 snapshot, regions only T wrote read from the restart point (a failback: the
     "restart-point data" of seed 001 claim 11; S has not changed them, so they are the same
     bytes the s2 snapshot holds). Only U crosses the link.
  4. FinishRejoin at T: once its receive journal restarted after s2 and the bulk arrived, T's
     image is S's at s2: it adopts S's history (a loser's fork is replaced, its entries archived
     with the saved snapshot), is consistent, and applies the held records in order.
  5. S fires copy-done (pair `paired`, S primary), deletes the s2 snapshot and, for a failback,
     the restart point; its changed bitmap goes (T joined its generation).

Any reconnect of the live stream while the rejoin runs re-plans from step 2 (a new snapshot;
the union only grows), so a crash or a cut link at any step is repaired by the sender's next
connection, and `failback` / `resolve` run again only report progress.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Mapping

import grpc

from targetd_repl.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    TargetdReplError,
)
from targetd_repl.model import EpochEntry, PairState, Role, SnapshotKind
from targetd_repl.replication import wire
from targetd_repl.replication.errors import Aborted
from targetd_repl.replication.handshake import (
    Action,
    BitmapKind,
    HandshakeDecision,
    HandshakeView,
    Save,
    decide,
    resolve,
)
from targetd_repl.replication.primary import PrimaryPair, StreamPlan
from targetd_repl.replication.secondary import SecondaryGroup
from targetd_repl.replication.status import error_from_rpc
from targetd_repl.replication.tracking import UnsentBitmaps
from targetd_repl.roles import pair_state
from targetd_repl.roles.core import RoleStatus, fault
from targetd_repl.roles.failover import Failover
from targetd_repl.roles.pair_state import Event
from targetd_repl.roles.state import (
    RejoinBitmaps,
    RejoinRecord,
    TargetBitmaps,
    TargetRecord,
)
from targetd_repl.roles.views import site_view
from targetd_repl.storage.bitmap import DirtyBitmap
from targetd_repl.storage.group_store import GroupStore
from targetd_repl.v1 import replication_pb2, replication_pb2_grpc

log = logging.getLogger(__name__)

_ZERO_CACHE: dict[int, bytes] = {}


def _is_zero(data: bytes) -> bool:
    zeros = _ZERO_CACHE.get(len(data))
    if zeros is None:
        zeros = _ZERO_CACHE.setdefault(len(data), bytes(len(data)))
    return data == zeros


class Rejoin(Failover):
    """Failback and resolve, at both sites (see the module docstring)."""

    def _rejoin_init(self) -> None:
        self._bulk_generation: dict[str, int] = {}  # target side: the newest bulk stream
        self._bulk_lock = threading.Lock()
        self._cancel: dict[str, threading.Event] = {}  # source side: per running bulk thread

    # --- commands ------------------------------------------------------------------------------

    def failback(self, group: str) -> RoleStatus:
        with self._lock(group):
            pair = self._pair(group)
            store = self._store(group)
            state = self._state(store)
            if state.rejoin is not None:
                return self._continue_rejoin(group)
            if store.role is Role.SECONDARY:
                if state.target is not None:
                    raise FailedPrecondition(
                        f"group {group!r}: site {state.target.source} runs the {state.target.kind}"
                        f" into this site; watch it there (`targetd-repl failback {group}`"
                        f" at site {state.target.source} shows its progress)"
                    )
                raise FailedPrecondition(
                    f"cannot failback group {group!r} at site {self._site}: it is "
                    f"{store.role} here (pair {pair.state}); run the command at site "
                    f"{pair.peer_site}, the primary"
                )
            status = self._status(group)
            if pair.state is PairState.PAIRED and status.command == "failback":
                return status  # done already
            pair_state.apply(pair.state, Event.FAILBACK, role=Role.PRIMARY, pair=group)
            if state.failover is None:
                raise FailedPrecondition(
                    f"cannot failback group {group!r}: site {self._site} is primary but no "
                    f"failover made it so (pair {pair.state}); nothing to fail back"
                )
            status = self._begin(group, "failback", f"prepare site {pair.peer_site}")
            return self._start_rejoin(group, "failback", status, None)

    def resolve_split_brain(self, group: str, survivor: str) -> RoleStatus:
        with self._lock(group):
            pair = self._pair(group)
            store = self._store(group)
            peer = pair.peer_site
            if survivor not in (self._site, peer):
                raise InvalidArgument(
                    f"survivor {survivor!r} is not a site of group {group!r}'s pair "
                    f"({self._site}, {peer})"
                )
            state = self._state(store)
            if state.rejoin is not None and state.rejoin.kind == "resolve":
                return self._continue_rejoin(group)
            if state.target is not None and state.target.kind == "resolve":
                return self._status(group)
            status = self._status(group)
            if pair.state is PairState.PAIRED and status.command == "resolve":
                return status
            event = Event.RESOLVE_SURVIVOR if survivor == self._site else Event.RESOLVE_LOSER
            consistent = self._consistent(store)
            pair_state.apply(pair.state, event, role=store.role, pair=group, consistent=consistent)
            self._engine.metadata.set_pair_roles(group, survivor=survivor)
            status = self._begin(group, "resolve", f"record survivor {survivor}")
            request = replication_pb2.RecordSurvivorRequest(
                group=group, site=self._site, survivor=survivor
            )
            self._peer_call(
                peer, lambda stub: stub.RecordSurvivor(request, timeout=self._settings.rpc_timeout)
            )
            if survivor != self._site:
                status.step = f"site {survivor} copies its data here"
                status.detail = (
                    f"site {survivor} keeps its data; this site saves its divergent regions and"
                    f" receives the union of both sides' (run `targetd-repl resolve {group}"
                    f" --survivor {survivor}` again, or `pair status`, to follow)"
                )
                return status
            return self._become_survivor(group, status)

    def _continue_rejoin(self, group: str) -> RoleStatus:
        """A rerun, or a restart, finds a persisted plan: make sure both streams run (a crash
        after the plan was saved may have left the pair in its old state, the sender idle)."""
        store = self._store(group)
        record = self._state(store).rejoin
        status = self._status(group)
        if record is None:
            return status
        if status.command != record.kind:
            status = self._begin(group, record.kind, "copy")
            status.total_bytes, status.regions, status.seq = (
                record.total_bytes,
                record.regions,
                record.seq,
            )
        running = self._running(group)
        if isinstance(running, PrimaryPair):
            running.set_roles_floor(record.seq + 1)
            state = self._engine.metadata.get_pair(group).state
            if state is PairState.SWAPPED:
                running.fire(Event.FAILBACK, f"{record.kind} to {record.target}")
            elif state is PairState.SUSPENDED_ERROR:
                event = Event.RESOLVE_SURVIVOR if record.kind == "resolve" else Event.RESYNC_NEEDED
                if not running.fire(event, f"{record.kind} to {record.target}"):
                    running.fire(Event.RESYNC_NEEDED, f"{record.kind} to {record.target}")
            running.wake()
        self._ensure_bulk(group)
        return status

    def _consistent(self, store: GroupStore) -> bool:
        running = self._running(store.name)
        if isinstance(running, SecondaryGroup):
            return running.consistent
        if isinstance(running, PrimaryPair):
            return running.view().consistent
        return True

    def _become_survivor(self, group: str, status: RoleStatus) -> RoleStatus:
        """The survivor of a resolve: primary (a secondary survivor takes a new epoch), then the
        source of the rejoin."""
        with self._lock(group):
            store = self._store(group)
            metadata = self._engine.metadata
            if store.role is not Role.PRIMARY:
                gid = store.info.id
                self._repl.detach(group)
                seq = self._apply_all(store)
                metadata.record_epoch(
                    gid,
                    EpochEntry(gid, store.info.epoch + 1, self._site, time.time(), seq, "resolve"),
                    role=Role.PRIMARY,
                )
                metadata.set_checkpoint(gid, acked_seq=seq, rewind=True)
                store.refresh()
                metadata.set_pair_state(group, PairState.SUSPENDED_ERROR, "resolve: survivor")
                self._repl.reattach(group)
            return self._start_rejoin(group, "resolve", status, self._site)

    def _survivor_recorded(self, group: str, survivor: str) -> None:
        """RecordSurvivor reached this site: when it is the survivor, it starts the copy."""
        if survivor != self._site:
            return
        status = self._begin(group, "resolve", "start the copy to the loser")

        def run() -> None:
            try:
                self._become_survivor(group, status)
            except TargetdReplError as error:
                log.error("group %s: resolve as survivor failed: %s", group, error)
                status.failed(str(error))

        self._spawn(f"survivor-{group}", run)

    # --- the source ------------------------------------------------------------------------------

    def _start_rejoin(
        self, group: str, kind: str, status: RoleStatus, survivor: str | None
    ) -> RoleStatus:
        store = self._store(group)
        pair = self._pair(group)
        target = pair.peer_site
        runner = self._primary_runner(group)
        view = site_view(self._site, store, self._engine.metadata, runner)
        request = replication_pb2.PrepareRejoinRequest(
            group=group, site=self._site, kind=kind, view=wire.view_to_proto(view)
        )
        if survivor is not None:
            request.survivor = survivor
        status.step = f"prepare site {target}"
        response: replication_pb2.PrepareRejoinResponse = self._peer_call(
            target,
            lambda stub: stub.PrepareRejoin(request, timeout=self._settings.rpc_timeout * 3),
        )
        regions = self._bitmaps_from_proto(store, response.regions)
        fault("rejoin-prepared")
        status.snapshot = response.saved_snapshot
        status.detail = response.reason
        self._plan(group, kind, target, regions, whole=response.whole, status=status)
        return status

    def _plan(
        self,
        group: str,
        kind: str,
        target: str,
        regions: Mapping[int, DirtyBitmap] | None,
        *,
        whole: bool,
        status: RoleStatus,
    ) -> RejoinRecord:
        """Steps 2-3: snapshot, union, persisted plan, then both streams go (see the module
        docstring). Also a re-plan: the union only grows and a new snapshot replaces the old."""
        # The running bulk stream ends first, outside the group's lock (it may be waiting for
        # it); a caller that holds the lock runs no bulk stream (no plan existed).
        self._stop_bulk(group)
        with self._lock(group):
            store = self._store(group)
            state = self._state(store)
            runner = self._primary_runner(group)
            old = state.rejoin
            runner.set_roles_floor(store.journal.next_seq)  # nothing past here may be trimmed
            generation = (old.generation + 1) if old is not None else 1
            if old is not None:
                self._drop_snapshot(store, old.snapshot)
            name = f"resync-{kind}-e{store.info.epoch}-g{generation}"
            status.step = "source snapshot"
            seq = self._ensure_snapshot(store, name, SnapshotKind.RESYNC_SOURCE)
            runner.set_roles_floor(seq + 1)
            union = RejoinBitmaps.open(
                store.group_dir, self._sizes(store), self._settings.region_size
            )
            if old is None:
                union.clear_all()
            if whole:
                union.set_all()
            for vid, bitmap in (regions or {}).items():
                union.bitmap(vid).union_update(bitmap)
            changed = self._changed_bitmaps(store)
            for vid in store.volume_ids():
                union.bitmap(vid).union_update(changed.bitmap(vid))
            union.save_all()
            failover = state.failover
            record = RejoinRecord(
                kind=kind,
                target=target,
                snapshot=name,
                seq=seq,
                total_bytes=union.total_bytes(),
                regions=union.count(),
                restart_point=failover.restart_point if failover and kind == "failback" else "",
                started_at=old.started_at if old is not None else time.time(),
                generation=generation,
            )
            state.rejoin = record
            self._save(store)
            fault("rejoin-planned")
            pair = self._engine.metadata.get_pair(group)
            if pair.state is PairState.SWAPPED:
                event = Event.FAILBACK
            elif pair.state is PairState.SUSPENDED_ERROR and kind == "resolve" and old is None:
                event = Event.RESOLVE_SURVIVOR
            else:
                event = Event.RESYNC_NEEDED
            runner.fire(
                event,
                f"{kind} to {target}: {record.total_bytes} bytes in {record.regions} regions "
                f"(source snapshot at seq {seq})",
            )
            status.step = "copy"
            status.seq = seq
            status.total_bytes = record.total_bytes
            status.done_bytes = 0
            status.regions = record.regions
            status.epoch = store.info.epoch
            log.info(
                "group %s: %s plan %d to %s: snapshot %s at seq %d, %d regions (%d bytes)",
                group,
                kind,
                generation,
                target,
                name,
                seq,
                record.regions,
                record.total_bytes,
            )
            self._ensure_bulk(group)
            runner.wake()
            return record

    def _plan_hook(
        self, group: str, decision: HandshakeDecision, peer: HandshakeView
    ) -> StreamPlan | None:
        """The live stream of a rejoin (PrimaryPair asks at every connect)."""
        store = self._store(group)
        with self._lock(group):
            record = self._state(store).rejoin
            if record is None:
                return None
            if not record.streamed:
                record.streamed = True
                self._save(store)
                return StreamPlan(record.seq + 1, restart_target=True)
        # A reconnect while the rejoin runs: plan again (the target restarts from a new seq).
        status = self._status(group)
        if status.command != record.kind:
            status = self._begin(group, record.kind, "re-plan after a reconnect")
        record = self._plan(group, record.kind, record.target, None, whole=False, status=status)
        with self._lock(group):
            record.streamed = True
            self._save(store)
        return StreamPlan(record.seq + 1, restart_target=True)

    def _ensure_bulk(self, group: str) -> None:
        with self._guard:
            cancel = self._cancel.get(group)
            if cancel is None or cancel.is_set():
                cancel = self._cancel[group] = threading.Event()
        self._spawn(f"bulk-{group}", lambda: self._bulk(group, cancel))

    def _stop_bulk(self, group: str) -> None:
        with self._guard:
            cancel = self._cancel.get(group)
        if cancel is not None:
            cancel.set()
        self._join(f"bulk-{group}")

    def _bulk(self, group: str, cancel: threading.Event) -> None:
        """The bulk stream of the current plan, then FinishRejoin, then completion."""
        delay = self._settings.retry_delay
        while not cancel.is_set() and not self._stopping.is_set():
            try:
                if self._bulk_once(group, cancel):
                    return
            except (TargetdReplError, grpc.RpcError, OSError) as error:
                if cancel.is_set():
                    return
                log.warning("group %s: rejoin bulk copy: %s (retrying)", group, error)
                self._status(group).detail = f"bulk copy: {error} (retrying)"
            cancel.wait(delay)
            delay = min(delay * 2, 2.0)

    def _bulk_once(self, group: str, cancel: threading.Event) -> bool:
        store = self._store(group)
        with self._lock(group):
            record = self._state(store).rejoin
            if record is None:
                return True
            generation = record.generation
        status = self._status(group)
        if status.command != record.kind:
            status = self._begin(group, record.kind, "copy")
            status.total_bytes, status.regions, status.seq = (
                record.total_bytes,
                record.regions,
                record.seq,
            )
        if not record.bulk_done:
            sent = self._send_regions(store, record, cancel, status)
            if sent is None:
                return True  # cancelled: a newer plan runs
            log.info(
                "group %s: %s bulk copy to %s: %d bytes written there",
                group,
                record.kind,
                record.target,
                sent,
            )
        status.step = "wait for the live stream"
        history = self._engine.metadata.epoch_history(store.info.id)
        request = replication_pb2.FinishRejoinRequest(
            group=group,
            site=self._site,
            consistent_at=record.seq,
            history=[wire.epoch_to_proto(e) for e in history],
            generation=generation,
        )
        while not cancel.is_set():
            try:
                self._peer_call(
                    record.target,
                    lambda stub: stub.FinishRejoin(request, timeout=self._settings.rpc_timeout),
                )
                break
            except FailedPrecondition as error:
                status.detail = str(error)
                cancel.wait(self._settings.retry_delay)
        if cancel.is_set():
            return True
        self._complete_rejoin(group, generation)
        return True

    def _send_regions(
        self, store: GroupStore, record: RejoinRecord, cancel: threading.Event, status: RoleStatus
    ) -> int | None:
        union = RejoinBitmaps.open(store.group_dir, self._sizes(store), self._settings.region_size)
        changed = self._changed_bitmaps(store).copy_bits()
        status.total_bytes = union.total_bytes()
        status.done_bytes = 0
        status.step = "copy"

        def messages() -> Iterator[replication_pb2.RegionWrite]:
            yield replication_pb2.RegionWrite(
                open=replication_pb2.RegionWriteOpen(
                    group=store.name,
                    site=self._site,
                    epoch=store.info.epoch,
                    consistent_at=record.seq,
                    total_bytes=status.total_bytes,
                    generation=record.generation,
                )
            )
            rs = self._settings.region_size
            for vid in store.volume_ids():
                ov = store.volume(vid)
                name = ov.info.name
                current = ov.snapshots.get(record.snapshot)
                restart = (
                    ov.snapshots.get(record.restart_point)
                    if record.restart_point and record.restart_point in ov.snapshots
                    else None
                )
                size = ov.info.size_bytes
                for first, count in union.bitmap(vid).runs():
                    region = first
                    while region < first + count:
                        if cancel.is_set():
                            return
                        from_restart = restart is not None and not changed[vid].is_set(region)
                        end = region + 1
                        while (
                            end < first + count
                            and (end - region) * rs < self._settings.bulk_piece
                            and (restart is not None and not changed[vid].is_set(end))
                            == from_restart
                        ):
                            end += 1
                        offset = region * rs
                        length = min(end * rs, size) - offset
                        snap = restart if from_restart and restart is not None else current
                        data = snap.read_bytes(offset, length)
                        zero = _is_zero(data)
                        yield replication_pb2.RegionWrite(
                            region=replication_pb2.RegionData(
                                volume=name,
                                offset=offset,
                                length=length,
                                data=b"" if zero else data,
                                zero=zero,
                            )
                        )
                        status.done_bytes += length
                        region = end

        channel = self._channel(record.target)
        try:
            stub = replication_pb2_grpc.RolePeerStub(channel)
            future = stub.WriteRegions.future(messages())
            while not future.done():
                if cancel.wait(0.05):
                    future.cancel()
                    return None
            try:
                response: replication_pb2.WriteRegionsResponse = future.result()
            except grpc.RpcError as error:
                raise error_from_rpc(error, record.target) from None
        finally:
            channel.close()
        if cancel.is_set():
            return None
        with self._lock(store.name):
            current_record = self._state(store).rejoin
            if current_record is record:
                record.bulk_done = True
                self._save(store)
        return int(response.bytes)

    def _complete_rejoin(self, group: str, generation: int) -> None:
        with self._lock(group):
            store = self._store(group)
            state = self._state(store)
            record = state.rejoin
            if record is None or record.generation != generation:
                return
            runner = self._primary_runner(group)
            runner.fire(Event.COPY_DONE, "")
            runner.set_roles_floor(None)
            runner.set_acked(record.seq)
            self._drop_snapshot(store, record.snapshot)
            # the peer joined this generation: the restart point has served its purpose
            self._drop_snapshot(store, record.restart_point)
            if state.failover is not None:
                self._drop_snapshot(store, state.failover.restart_point)
            self._remove_changed(store)
            RejoinBitmaps.open(
                store.group_dir, self._sizes(store), self._settings.region_size
            ).remove_files()
            self._engine.metadata.set_pair_roles(group, survivor=None)
            state.rejoin = None
            state.failover = None
            self._save(store)
            status = self._status(group)
            status.done_bytes = status.total_bytes
            status.done(
                "done",
                f"site {record.target} joined: pair paired, site {self._site} primary; "
                f"{record.total_bytes} bytes in {record.regions} regions copied",
            )
            log.info(
                "group %s: %s to %s complete (%d bytes in %d regions)",
                group,
                record.kind,
                record.target,
                record.total_bytes,
                record.regions,
            )

    # --- the target ------------------------------------------------------------------------------

    def prepare_rejoin(
        self, request: replication_pb2.PrepareRejoinRequest
    ) -> replication_pb2.PrepareRejoinResponse:
        group, source, kind = request.group, request.site, request.kind
        if kind not in ("failback", "resolve"):
            raise InvalidArgument(f"unknown rejoin kind {kind!r}")
        with self._lock(group):
            pair = self._pair(group)
            self._check_peer(pair, source, group)
            store = self._store(group)
            state = self._state(store)
            record = state.target
            if record is not None and record.source == source and record.kind == kind:
                return self._prepared(store, record, "", "prepared already")
            if state.rejoin is not None:
                raise FailedPrecondition(
                    f"group {group!r}: site {self._site} is itself the source of a "
                    f"{state.rejoin.kind} to site {state.rejoin.target}"
                )
            running = self._running(group)
            mine = site_view(self._site, store, self._engine.metadata, running)
            theirs = wire.view_from_proto(request.view, store.info.id)
            decision = self._decide_rejoin(kind, mine, theirs, request)
            if decision.target != self._site or decision.source != source:
                raise FailedPrecondition(
                    f"site {self._site} is not the target of a {kind} from site {source}: "
                    f"{decision.reason}"
                )
            whole = decision.action is Action.FULL_COPY
            sizes = self._sizes(store)
            regions = TargetBitmaps.open(store.group_dir, sizes, self._settings.region_size)
            regions.clear_all()
            kinds = {ref.kind for ref in decision.bitmaps if ref.site == self._site}
            has_unsent = UnsentBitmaps.path_for(store.group_dir, store.volume_ids()[0]).exists()
            if has_unsent and (kind == "failback" or BitmapKind.UNSENT in kinds):
                unsent = UnsentBitmaps.open(store.group_dir, sizes, self._settings.region_size)
                for vid in store.volume_ids():
                    regions.bitmap(vid).union_update(unsent.bitmap(vid))
            if BitmapKind.CHANGED in kinds or (kind == "resolve" and not whole):
                changed = self._changed_bitmaps(store)
                for vid in store.volume_ids():
                    regions.bitmap(vid).union_update(changed.bitmap(vid))
            # DEMOTE (SET_READONLY): no write may land after what the save keeps
            if store.role is Role.PRIMARY:
                store.set_role(Role.SECONDARY)
            self._repl.detach(group)
            store.on_changed = None
            saved = ""
            if decision.save is not Save.NONE or kind == "resolve":
                snap_kind = decision.save_kind or (
                    SnapshotKind.SPLIT_BRAIN_LOSER
                    if kind == "resolve"
                    else SnapshotKind.ROLLBACK_SAVE
                )
                saved = f"{snap_kind.value}-e{store.info.epoch}-{time.strftime('%Y%m%d%H%M%S')}"
                self._ensure_snapshot(store, saved, snap_kind)
            regions.save_all()
            record = TargetRecord(
                kind=kind,
                source=source,
                saved_snapshot=saved,
                whole=whole,
                regions=regions.count(),
                rule=decision.rule,
                started_at=time.time(),
            )
            state.target = record
            self._save(store)
            if request.HasField("survivor"):
                self._engine.metadata.set_pair_roles(group, survivor=request.survivor)
            self._engine.metadata.set_pair_state(
                group,
                PairState.COPYING,
                f"{kind} from site {source}: receiving the regions that differ"
                + (f"; what this site loses is kept in snapshot {saved}" if saved else ""),
            )
            self._repl.reattach(group)  # a receiver, held (see _on_attach)
            fault("target-prepared")
            status = self._begin(group, kind, f"receiving from site {source}")
            status.snapshot = saved
            status.detail = decision.reason
            log.warning(
                "group %s: %s from site %s: %s; saved %s",
                group,
                kind,
                source,
                decision.reason,
                saved or "nothing (nothing to lose)",
            )
            return self._prepared(store, record, decision.rule, decision.reason)

    def _decide_rejoin(
        self,
        kind: str,
        mine: HandshakeView,
        theirs: HandshakeView,
        request: replication_pb2.PrepareRejoinRequest,
    ) -> HandshakeDecision:
        if kind == "resolve":
            survivor = request.survivor if request.HasField("survivor") else request.site
            decision = resolve(mine, theirs, survivor)
        else:
            decision = decide(mine, theirs)
        if decision.action is Action.STALE_PEER_MUST_DEMOTE and decision.fence == self._site:
            assert decision.after_fence is not None
            decision = decision.after_fence  # this site demotes below, then that applies
        if decision.action.refuses:
            raise FailedPrecondition(f"site {self._site} refuses the {kind}: {decision.reason}")
        if decision.action in (Action.NOTHING_TO_DO, Action.RESUME_JOURNAL) and (
            decision.target == self._site
        ):
            return decision  # nothing of ours to lose; the source's changed regions move
        if decision.action not in (Action.BITMAP_RESYNC, Action.FULL_COPY):
            raise FailedPrecondition(
                f"site {self._site} cannot be the target of a {kind}: {decision.reason}"
            )
        return decision

    def _prepared(
        self, store: GroupStore, record: TargetRecord, rule: str, reason: str
    ) -> replication_pb2.PrepareRejoinResponse:
        regions = TargetBitmaps.open(
            store.group_dir, self._sizes(store), self._settings.region_size
        )
        view = site_view(self._site, store, self._engine.metadata, self._running(store.name))
        return replication_pb2.PrepareRejoinResponse(
            view=wire.view_to_proto(view),
            regions=self._bitmaps_to_proto(store, regions),
            whole=record.whole,
            saved_snapshot=record.saved_snapshot,
            rule=rule or record.rule,
            reason=reason,
        )

    def write_regions(
        self, messages: Iterator[replication_pb2.RegionWrite]
    ) -> replication_pb2.WriteRegionsResponse:
        first = next(messages, None)
        if first is None or first.WhichOneof("body") != "open":
            raise InvalidArgument("the first message of a WriteRegions stream must be `open`")
        opening = first.open
        group = opening.group
        store = self._store(group)
        with self._lock(group):
            record = self._state(store).target
            if record is None or record.source != opening.site:
                raise FailedPrecondition(
                    f"group {group!r}: site {self._site} is not the target of a rejoin from "
                    f"site {opening.site}"
                )
        with self._bulk_lock:
            newest = self._bulk_generation.get(group, 0)
            if opening.generation < newest:
                raise Aborted(f"group {group!r}: bulk plan {opening.generation} is superseded")
            self._bulk_generation[group] = opening.generation
        ids = {store.volume(v).info.name: v for v in store.volume_ids()}
        written = 0
        count = 0
        for message in messages:
            if message.WhichOneof("body") != "region":
                raise InvalidArgument("WriteRegions: only region messages follow `open`")
            region = message.region
            vid = ids.get(region.volume)
            if vid is None:
                raise NotFound(f"volume {region.volume!r} is not in group {group!r} here")
            with self._bulk_lock:
                if self._bulk_generation.get(group, 0) != opening.generation:
                    raise Aborted(f"group {group!r}: bulk plan {opening.generation} superseded")
                store.install_region(
                    vid, region.offset, region.length, None if region.zero else region.data
                )
            written += region.length
            count += 1
            status = self._status(group)
            status.done_bytes = written
            status.total_bytes = opening.total_bytes
        store.flush_volumes()
        return replication_pb2.WriteRegionsResponse(bytes=written, regions=count)

    def finish_rejoin(
        self, request: replication_pb2.FinishRejoinRequest
    ) -> replication_pb2.FinishRejoinResponse:
        group = request.group
        with self._lock(group):
            store = self._store(group)
            state = self._state(store)
            record = state.target
            running = self._running(group)
            if record is None:
                if isinstance(running, SecondaryGroup) and running.consistent:
                    view = site_view(self._site, store, self._engine.metadata, running)
                    return replication_pb2.FinishRejoinResponse(
                        consistent=True, view=wire.view_to_proto(view)
                    )
                raise FailedPrecondition(f"group {group!r} has no rejoin at site {self._site}")
            if record.source != request.site:
                raise FailedPrecondition(
                    f"group {group!r}: the rejoin here is from site {record.source}"
                )
            with self._bulk_lock:
                newest = self._bulk_generation.get(group, 0)
            if request.generation != newest:
                raise FailedPrecondition(
                    f"group {group!r}: the bulk copy here is plan {newest}, not "
                    f"{request.generation}"
                )
            if not isinstance(running, SecondaryGroup) or running.restarted_at != (
                request.consistent_at + 1
            ):
                raise FailedPrecondition(
                    f"group {group!r}: the live stream from site {request.site} has not "
                    f"restarted the receive journal at seq {request.consistent_at + 1} here yet"
                )
            store.flush_volumes()
            running.release(
                request.consistent_at, wire.history_from_proto(request.history, store.info.id)
            )
            sizes = self._sizes(store)
            UnsentBitmaps.open(store.group_dir, sizes, self._settings.region_size).remove_files()
            TargetBitmaps.open(store.group_dir, sizes, self._settings.region_size).remove_files()
            self._remove_changed(store)
            self._engine.metadata.set_pair_roles(group, survivor=None, backlog_from_seq=None)
            if state.failover is not None:  # a loser's own failover: its generation is gone
                self._drop_snapshot(store, state.failover.restart_point)
            state.target = None
            state.failover = None
            self._save(store)
            status = self._status(group)
            status.done_bytes = status.total_bytes
            status.done(
                "done",
                f"image is site {request.site}'s at seq {request.consistent_at}; pair paired"
                + (
                    f"; what this site had is kept in snapshot {record.saved_snapshot}"
                    if record.saved_snapshot
                    else ""
                ),
            )
            log.warning(
                "group %s: %s from site %s complete at seq %d",
                group,
                record.kind,
                request.site,
                request.consistent_at,
            )
            view = site_view(self._site, store, self._engine.metadata, running)
            return replication_pb2.FinishRejoinResponse(
                consistent=running.consistent, view=wire.view_to_proto(view)
            )
