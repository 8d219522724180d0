"""Planned switchover with no I/O freeze (seed 000).

At the secondary N (the new primary), with the old primary O reachable:

  1. N stops receiving and applies what it received (seq R).
  2. StepDown at O: O turns secondary at once (the write barrier closes: no write completes there
     from this moment), its final seq F is the end of its generation, and it answers the regions
     N lacks: those written by its records in (R, F], from its journal, and its unsent bitmap's
     (the backlog it tracked in bits). O's image stays frozen at F until step 5.
  3. N restarts its journal after F (the receive journal becomes the transfer journal and the
     seq continues: seed 004), takes a new epoch naming it (prev_last_seq F), records
     `backlog_from_seq` = R + 1 and the missing regions, and accepts writes at once, whatever
     the backlog: its sender is held (it ships nothing to O while O's image is still the source
     of the backlog).
  4. Copy-on-read (seed 000 claims 1, 12): a read or a write of a missing region first fetches
     the region from O's frozen image and stores it (saved in the bitmap before the I/O goes on);
     a drain thread fetches the rest meanwhile. A region fetched once is never written by the
     backlog again, so N's new writes win over older data still arriving.
  5. Drained: N clears `backlog_from_seq`, FinishSwitchover makes O adopt N's history (its image
     is at F, the new generation's start) and become N's secondary, and N's sender starts: the
     handshake finds both in the same generation and N ships its journal from F + 1.

Every step is idempotent; N's record in roles.json (written before its journal restarts) and O's
(written when it steps down) let a rerun of `switchover` at N, or a restart of either site,
finish the drain.
"""

from __future__ import annotations

import logging
import threading
import time

import grpc

from targetd_repl.errors import FailedPrecondition, TargetdReplError
from targetd_repl.model import EpochEntry, PairState, Role
from targetd_repl.replication import wire
from targetd_repl.replication.channel import open_channel
from targetd_repl.replication.primary import PrimaryPair
from targetd_repl.replication.secondary import SecondaryGroup
from targetd_repl.replication.status import error_from_rpc
from targetd_repl.replication.tracking import UnsentBitmaps
from targetd_repl.roles import pair_state
from targetd_repl.roles.core import RoleStatus, fault, mark_from_journal
from targetd_repl.roles.pair_state import Event
from targetd_repl.roles.rejoin import Rejoin, _is_zero
from targetd_repl.roles.state import MissingBitmaps, StepDownRecord, SwitchoverRecord
from targetd_repl.roles.views import site_view
from targetd_repl.storage.group_store import GroupStore
from targetd_repl.v1 import replication_pb2, replication_pb2_grpc

log = logging.getLogger(__name__)


class _Backlog:
    """A new primary's missing regions and the one lock under which regions are installed."""

    def __init__(self, store: GroupStore, old: str, missing: MissingBitmaps) -> None:
        self.store = store
        self.old = old
        self.missing = missing
        self.lock = threading.Lock()
        self.channel: grpc.Channel | None = None  # for copy-on-read: not behind the drain
        self.fetched_on_read = 0


class Switchover(Rejoin):
    def _switchover_init(self) -> None:
        self._backlogs: dict[str, _Backlog] = {}

    # --- the new primary -----------------------------------------------------------------------

    def switchover(self, group: str) -> RoleStatus:
        with self._lock(group):
            pair = self._pair(group)
            store = self._store(group)
            state = self._state(store)
            record = state.switchover
            if store.role is Role.PRIMARY:
                status = self._status(group)
                if record is not None and record.promoted:
                    self._start_drain(group)
                    if status.command != "switchover":
                        status = self._begin(group, "switchover", "drain")
                    return status
                pair_state.apply(pair.state, Event.SWITCHOVER, role=Role.PRIMARY, pair=group)
                if status.command == "switchover":
                    return status
                return self._begin(group, "switchover", "done").done(
                    "done", f"site {self._site} is already primary ({pair.state})"
                )
            if state.stepdown is not None:
                raise FailedPrecondition(
                    f"group {group!r}: site {self._site} stepped down for site "
                    f"{state.stepdown.new_primary}; run the switchover there"
                )
            consistent = self._consistent(store)
            if record is None:  # a rerun after an interruption skips the table: it was checked
                pair_state.apply(
                    pair.state,
                    Event.SWITCHOVER,
                    role=Role.SECONDARY,
                    pair=group,
                    consistent=consistent,
                )
            old = pair.peer_site
            status = self._begin(group, "switchover", f"site {old} steps down")
            started = time.monotonic()
            # 1. stop receiving, apply everything received
            self._repl.detach(group)
            try:
                received = self._apply_all(store)
                if record is not None:
                    received = record.received_seq
                # 2. the old primary refuses writes from now on
                request = replication_pb2.StepDownRequest(
                    group=group, site=self._site, received_seq=received
                )
                answer: replication_pb2.StepDownResponse = self._peer_call(
                    old, lambda stub: stub.StepDown(request, timeout=self._settings.rpc_timeout)
                )
            except TargetdReplError as error:
                if record is None:
                    self._repl.reattach(group)  # nothing changed here: receive again
                raise FailedPrecondition(
                    f"switchover of group {group!r} needs site {old}: {error}; if it is down, "
                    f"use `targetd-repl failover {group}`"
                ) from None
            final = answer.final_seq
            fault("switchover-stepped")
            if record is None:
                record = SwitchoverRecord(
                    old_primary=old, final_seq=final, received_seq=received, started_at=time.time()
                )
                state.switchover = record
                self._save(store)
            missing = MissingBitmaps.open(
                store.group_dir, self._sizes(store), self._settings.region_size
            )
            missing.clear_all()
            if received < final:
                for vid, bitmap in self._bitmaps_from_proto(store, answer.missing).items():
                    missing.bitmap(vid).union_update(bitmap)
            missing.save_all()
            record.total_bytes = missing.total_bytes()
            # 3. the journal continues after F; a new epoch; writable at once
            status.step = "promote"
            if store.journal.next_seq != final + 1:
                store.restart_journal(final + 1)
            fault("switchover-restarted")
            self._take_epoch(store, final, "switchover")
            metadata = self._engine.metadata
            metadata.set_pair_roles(group, backlog_from_seq=received + 1 if missing.any() else None)
            metadata.set_pair_state(
                group,
                PairState.PAIRED,
                f"switchover from site {old} at seq {final}: "
                + (
                    f"fetching its backlog ({record.total_bytes} bytes), copy-on-read meanwhile"
                    if missing.any()
                    else "nothing to drain"
                ),
            )
            record.promoted = True
            self._save(store)
            self._install_backlog(store, old, missing)
            self._repl.reattach(group)  # primary, sender held until drained (_on_attach)
            status.promoted_seconds = time.monotonic() - started
            status.seq = final
            status.epoch = store.info.epoch
            status.total_bytes = record.total_bytes
            status.step = "drain"
            log.warning(
                "group %s: switchover: site %s is primary at epoch %d after seq %d (received "
                "%d); %d bytes of backlog to fetch from site %s",
                group,
                self._site,
                store.info.epoch,
                final,
                received,
                record.total_bytes,
                old,
            )
            self._start_drain(group)
            return status

    def _take_epoch(self, store: GroupStore, prev_last_seq: int, reason: str) -> None:
        metadata = self._engine.metadata
        gid = store.info.id
        history = metadata.epoch_history(gid)
        current = history[-1] if history else None
        if current is None or not (
            current.primary_site == self._site and current.prev_last_seq == prev_last_seq
        ):
            epoch = store.info.epoch + 1
            metadata.record_epoch(
                gid,
                EpochEntry(gid, epoch, self._site, time.time(), prev_last_seq, reason),
                role=Role.PRIMARY,
            )
        elif store.info.role is not Role.PRIMARY:
            metadata.set_role(gid, Role.PRIMARY)
        metadata.set_checkpoint(gid, acked_seq=prev_last_seq, rewind=True)
        store.refresh()

    def _install_backlog(self, store: GroupStore, old: str, missing: MissingBitmaps) -> None:
        backlog = _Backlog(store, old, missing)
        with self._guard:
            self._backlogs[store.name] = backlog
        if missing.any():
            store.before_io = lambda vid, offset, length, write: self._copy_on_read(
                backlog, vid, offset, length
            )

    def _copy_on_read(self, backlog: _Backlog, vid: int, offset: int, length: int) -> None:
        """Before an I/O at the new primary: fetch the regions it touches that have not arrived
        from the old primary yet, and store them (seed 000 claim 1)."""
        bitmap = backlog.missing.bitmap(vid)
        rs = bitmap.region_size
        first, last = offset // rs, (offset + length - 1) // rs
        need = [r for r in range(first, last + 1) if bitmap.is_set(r)]
        if not need:
            return
        with backlog.lock:
            if backlog.channel is None:
                backlog.channel = open_channel(
                    self._repl.peer_address(backlog.old), backlog.old, self._tls
                )
            channel = backlog.channel
        try:
            regions = self._fetch(backlog, channel, vid, need)
        except TargetdReplError as error:
            raise TargetdReplError(
                f"group {backlog.store.name!r}: region(s) {need} of volume id {vid} are still "
                f"on site {backlog.old} (switchover backlog) and cannot be read: {error}"
            ) from None
        backlog.fetched_on_read += self._install(backlog, vid, regions)

    def _fetch(
        self, backlog: _Backlog, channel: grpc.Channel, vid: int, regions: list[int]
    ) -> list[replication_pb2.RegionData]:
        store = backlog.store
        request = replication_pb2.ReadRegionsRequest(
            group=store.name,
            site=self._site,
            volume=store.volume(vid).info.name,
            regions=regions,
            region_size=self._settings.region_size,
        )
        stub = replication_pb2_grpc.RolePeerStub(channel)
        try:
            return list(stub.ReadRegions(request, timeout=self._settings.rpc_timeout * 3))
        except grpc.RpcError as error:
            raise error_from_rpc(error, backlog.old) from None

    def _install(
        self, backlog: _Backlog, vid: int, regions: list[replication_pb2.RegionData]
    ) -> int:
        """Store fetched regions that are still missing (under the backlog's lock: a region
        installed once, then written, is never installed again); durable before the bits go."""
        store = backlog.store
        bitmap = backlog.missing.bitmap(vid)
        rs = bitmap.region_size
        installed = 0
        with backlog.lock:
            done: list[tuple[int, int]] = []
            for region in regions:
                if not bitmap.is_set(region.offset // rs):
                    continue  # arrived meanwhile, maybe written since: newer data wins
                store.install_region(
                    vid, region.offset, region.length, None if region.zero else region.data
                )
                done.append((region.offset, region.length))
                installed += region.length
            if done:
                store.flush_volumes()
                for offset, length in done:
                    backlog.missing.clear(vid, offset, length)
                backlog.missing.save(vid)
        return installed

    def _start_drain(self, group: str) -> None:
        self._spawn(f"drain-{group}", lambda: self._drain(group))

    def _drain(self, group: str) -> None:
        delay = self._settings.retry_delay
        while not self._stopping.is_set():
            with self._guard:
                backlog = self._backlogs.get(group)
            if backlog is None:
                return
            try:
                while backlog.missing.any() and not self._stopping.is_set():
                    self._drain_once(backlog)
                if self._stopping.is_set():
                    return
                self._finish_new_primary(group)
                return
            except (TargetdReplError, grpc.RpcError, OSError) as error:
                log.warning("group %s: switchover drain: %s (retrying)", group, error)
                self._status(group).detail = f"drain: {error} (retrying)"
            self._stopping.wait(delay)
            delay = min(delay * 2, 2.0)

    def _drain_once(self, backlog: _Backlog) -> None:
        store = backlog.store
        status = self._status(store.name)
        if status.command != "switchover":
            status = self._begin(store.name, "switchover", "drain")
        record = self._state(store).switchover
        status.total_bytes = record.total_bytes if record is not None else 0
        channel = open_channel(self._repl.peer_address(backlog.old), backlog.old, self._tls)
        try:
            for vid in store.volume_ids():
                bitmap = backlog.missing.bitmap(vid)
                pending = list(bitmap.regions())
                step = self._settings.drain_regions
                for at in range(0, len(pending), step):
                    if self._stopping.is_set():
                        return
                    batch = [r for r in pending[at : at + step] if bitmap.is_set(r)]
                    if not batch:
                        continue
                    regions = self._fetch(backlog, channel, vid, batch)
                    self._install(backlog, vid, regions)
                    left = backlog.missing.total_bytes()
                    status.done_bytes = max(0, status.total_bytes - left)
        finally:
            channel.close()

    def _finish_new_primary(self, group: str) -> None:
        """Drained: clear the backlog, make the old primary our secondary, start shipping."""
        with self._guard:
            backlog = self._backlogs.get(group)
        if backlog is None or backlog.missing.any():
            return
        store = backlog.store
        metadata = self._engine.metadata
        metadata.set_pair_roles(group, backlog_from_seq=None)
        store.before_io = None
        history = metadata.epoch_history(store.info.id)
        request = replication_pb2.FinishSwitchoverRequest(
            group=group, site=self._site, history=[wire.epoch_to_proto(e) for e in history]
        )
        status = self._status(group)
        status.step = f"site {backlog.old} joins"
        delay = self._settings.retry_delay
        while not self._stopping.is_set():
            try:
                self._peer_call(
                    backlog.old,
                    lambda stub: stub.FinishSwitchover(request, timeout=self._settings.rpc_timeout),
                )
                break
            except TargetdReplError as error:
                status.detail = f"site {backlog.old} joins: {error} (retrying)"
                self._stopping.wait(delay)
                delay = min(delay * 2, 2.0)
        if self._stopping.is_set():
            return
        with self._lock(group):
            state = self._state(store)
            record = state.switchover
            state.switchover = None
            self._save(store)
            backlog.missing.remove_files()
            with self._guard:
                self._backlogs.pop(group, None)
            if backlog.channel is not None:
                backlog.channel.close()
            metadata.set_pair_state(group, PairState.PAIRED, "")
            runner = self._running(group)
            if isinstance(runner, PrimaryPair):
                runner.release()
            status.done_bytes = status.total_bytes
            status.done(
                "done",
                f"site {backlog.old} is secondary; replication runs from site {self._site}"
                + (f" after seq {record.final_seq}" if record is not None else "")
                + f" ({backlog.fetched_on_read} bytes fetched on read)",
            )
        log.info("group %s: switchover complete: site %s is secondary", group, backlog.old)

    def _recover_switchover(self, store: GroupStore) -> None:
        """At start: a promoted new primary still draining installs copy-on-read again."""
        record = self._state(store).switchover
        if record is None or not record.promoted or store.role is not Role.PRIMARY:
            return
        missing = MissingBitmaps.open(
            store.group_dir, self._sizes(store), self._settings.region_size
        )
        self._install_backlog(store, record.old_primary, missing)

    # --- the old primary -----------------------------------------------------------------------

    def step_down(
        self, request: replication_pb2.StepDownRequest
    ) -> replication_pb2.StepDownResponse:
        group, new = request.group, request.site
        with self._lock(group):
            pair = self._pair(group)
            self._check_peer(pair, new, group)
            store = self._store(group)
            state = self._state(store)
            record = state.stepdown
            if record is None or record.new_primary != new:
                if store.role is not Role.PRIMARY:
                    raise FailedPrecondition(
                        f"group {group!r} is {store.role} at site {self._site} (pair "
                        f"{pair.state}): it cannot step down for site {new}"
                    )
                # SET_READONLY before anything else: no write completes here from now on
                store.set_role(Role.SECONDARY)
                record = StepDownRecord(new, store.journal.durable_seq, time.time())
                state.stepdown = record
                self._save(store)
                self._repl.detach(group)  # the sender stops (bitmaps saved)
                self._engine.metadata.set_pair_state(
                    group,
                    PairState.PAIRED,
                    f"switchover to site {new}: frozen at seq {record.final_seq} until it "
                    "fetched its backlog",
                )
                self._repl.reattach(group)  # a receiver: the new primary ships here when done
                fault("stepdown-done")
                self._begin(
                    group, "switchover", f"serve the backlog to site {new}"
                ).seq = record.final_seq
                log.warning(
                    "group %s: stepped down for site %s at seq %d (it received up to %d)",
                    group,
                    new,
                    record.final_seq,
                    request.received_seq,
                )
            sizes = self._sizes(store)
            missing = MissingBitmaps.open(store.group_dir, sizes, self._settings.region_size)
            missing.clear_all()
            if request.received_seq < record.final_seq:
                mark_from_journal(store, request.received_seq + 1, missing, upto=record.final_seq)
                if UnsentBitmaps.path_for(store.group_dir, store.volume_ids()[0]).exists():
                    unsent = UnsentBitmaps.open(store.group_dir, sizes, self._settings.region_size)
                    for vid in store.volume_ids():
                        missing.bitmap(vid).union_update(unsent.bitmap(vid))
            view = site_view(self._site, store, self._engine.metadata, self._running(group))
            return replication_pb2.StepDownResponse(
                final_seq=record.final_seq,
                missing=self._bitmaps_to_proto(store, missing),
                view=wire.view_to_proto(view),
            )

    def read_regions(
        self, request: replication_pb2.ReadRegionsRequest
    ) -> list[replication_pb2.RegionData]:
        group = request.group
        pair = self._pair(group)
        self._check_peer(pair, request.site, group)
        store = self._store(group)
        record = self._state(store).stepdown
        if record is None or record.new_primary != request.site:
            raise FailedPrecondition(
                f"group {group!r}: site {self._site} serves regions only while stepping down "
                f"for site {request.site}"
            )
        ids = {store.volume(v).info.name: v for v in store.volume_ids()}
        vid = ids.get(request.volume)
        if vid is None:
            raise FailedPrecondition(f"volume {request.volume!r} is not in group {group!r} here")
        volume = store.volume(vid).volume
        rs = request.region_size or self._settings.region_size
        out = []
        for region in request.regions:
            offset = region * rs
            length = min(rs, volume.size_bytes - offset)
            if length <= 0:
                continue
            data = volume.pread(offset, length)
            zero = _is_zero(data)
            out.append(
                replication_pb2.RegionData(
                    volume=request.volume,
                    offset=offset,
                    length=length,
                    data=b"" if zero else data,
                    zero=zero,
                )
            )
        return out

    def finish_switchover(
        self, request: replication_pb2.FinishSwitchoverRequest
    ) -> replication_pb2.FinishSwitchoverResponse:
        group = request.group
        with self._lock(group):
            pair = self._pair(group)
            self._check_peer(pair, request.site, group)
            store = self._store(group)
            state = self._state(store)
            record = state.stepdown
            metadata = self._engine.metadata
            if record is not None:
                if record.new_primary != request.site:
                    raise FailedPrecondition(
                        f"group {group!r} stepped down for site {record.new_primary}, not "
                        f"{request.site}"
                    )
                gid = store.info.id
                current = store.info.epoch
                for entry in wire.history_from_proto(request.history, gid):
                    if entry.epoch > current:
                        metadata.record_epoch(gid, entry)
                        current = entry.epoch
                store.refresh()
                sizes = self._sizes(store)
                UnsentBitmaps.open(
                    store.group_dir, sizes, self._settings.region_size
                ).remove_files()
                state.stepdown = None
                self._save(store)
                metadata.set_pair_state(group, PairState.PAIRED, "")
                self._status(group).done(
                    "done", f"secondary of site {request.site} from seq {record.final_seq + 1}"
                )
                log.info("group %s: switchover to site %s complete here", group, request.site)
            running = self._running(group)
            if not isinstance(running, SecondaryGroup):
                running = None
            view = site_view(self._site, store, metadata, running)
            return replication_pb2.FinishSwitchoverResponse(view=wire.view_to_proto(view))
