"""Unplanned failover (seeds 001, 003, 004): the secondary takes over when the primary is gone.

At the secondary, in this order (roles/pair_state.py, event failover or force-failover):

  1. refuse while the primary answers a probe, unless --force (a planned change is a
     switchover); refuse an inconsistent image (a copy into it was interrupted);
  2. STOP_RECEIVER, APPLY_RECEIVED: the receiver stops and every record the receive journal holds
     is applied, so the image is the primary's history up to seq P (a prefix: write order holds
     across the group);
  3. TAKE_RESTART_POINT: a group-consistent snapshot at P, kind restart-point (seed 001 claim 1):
     the failback later reads from it the data the old primary's unsent regions roll back to;
  4. START_CHANGED_BITMAP: an empty changed bitmap per volume; from now on every write sets its
     region's bit (saved before the write is acknowledged: GroupStore.on_changed);
  5. BUMP_EPOCH: a new epoch naming this site, starting after P (record_epoch, with the role
     primary, in one transaction): a stale primary that comes back is fenced by it;
  6. SWAP_JOURNALS: nothing to move: the receive journal continues as the transfer journal,
     its next seq is P + 1 (seed 004's role swap);
  7. SET_WRITABLE: the replication runner is replaced by a primary runner in state `swapped`
     (it tracks writes and checks epochs with the peer now and then, and ships nothing until a
     failback).

The record in roles.json is written before step 2, so a rerun (or the next start, for the steps
after the epoch) completes the failover; every step is idempotent.
"""

from __future__ import annotations

import logging
import time

from targetd_repl.errors import FailedPrecondition
from targetd_repl.model import EpochEntry, PairState, Role, SnapshotKind
from targetd_repl.replication.secondary import SecondaryGroup
from targetd_repl.replication.tracking import ReplicationState, UnsentBitmaps
from targetd_repl.replication.wire import state_from_proto
from targetd_repl.roles import pair_state
from targetd_repl.roles.core import RoleCore, RoleStatus, fault, mark_from_journal
from targetd_repl.roles.pair_state import Event
from targetd_repl.roles.state import ChangedBitmaps, FailoverRecord
from targetd_repl.storage.group_store import GroupStore

log = logging.getLogger(__name__)


class Failover(RoleCore):
    # --- the changed bitmap ------------------------------------------------------------------

    def _install_changed(self, store: GroupStore, since: int) -> ChangedBitmaps:
        """Open the changed bitmap and mark every write from now on (before its ack). At a
        restart, the records past `since` still in the journal are marked again: a write whose
        bit was not saved before a crash was not acknowledged, but its record replays."""
        with self._guard:
            changed = self._changed.get(store.name)
        if changed is not None:
            return changed
        changed = ChangedBitmaps.open(
            store.group_dir, self._sizes(store), self._settings.region_size
        )
        mark_from_journal(store, since + 1, changed)
        changed.save_all()

        def mark(seq: int, volume_id: int, offset: int, length: int) -> None:
            if changed.mark(volume_id, offset, length):
                changed.save(volume_id)

        with self._guard:
            self._changed[store.name] = changed
        store.on_changed = mark
        return changed

    def _changed_bitmaps(self, store: GroupStore) -> ChangedBitmaps:
        """The group's changed bitmap: the installed instance, or read from its files."""
        with self._guard:
            changed = self._changed.get(store.name)
        if changed is not None:
            return changed
        return ChangedBitmaps.open(store.group_dir, self._sizes(store), self._settings.region_size)

    def _remove_changed(self, store: GroupStore) -> None:
        """The peer joined this generation: stop marking (no writer inside the hook) and
        delete the changed bitmap."""
        with store.quiesced():
            store.on_changed = None
        with self._guard:
            changed = self._changed.pop(store.name, None)
        if changed is None:
            changed = ChangedBitmaps.open(
                store.group_dir, self._sizes(store), self._settings.region_size
            )
        changed.remove_files()

    # --- the command ---------------------------------------------------------------------------

    def failover(self, group: str, *, force: bool = False) -> RoleStatus:
        with self._lock(group):
            pair = self._pair(group)
            store = self._store(group)
            state = self._state(store)
            event = Event.FORCE_FAILOVER if force else Event.FAILOVER
            record = state.failover
            if store.role is Role.PRIMARY:
                if record is not None and record.done:
                    status = self._status(group)
                    if status.command != "failover":
                        status = self._begin(group, "failover", "done")
                        status.epoch, status.seq = record.epoch, record.restart_seq
                        status.snapshot = record.restart_point
                    return status.done("done", f"site {self._site} is already primary (swapped)")
                # the table names the state and where a failover applies
                pair_state.apply(pair.state, event, role=Role.PRIMARY, pair=group)
                return self._begin(group, "failover", "done").done(
                    "done", f"site {self._site} is already primary ({pair.state})"
                )
            running = self._running(group)
            if isinstance(running, SecondaryGroup):
                consistent = running.consistent
            else:
                consistent = ReplicationState.load(store.group_dir).consistent
            peer = pair.peer_site
            table_state = pair.state
            if not force:
                answer = self._probe(group, peer, self._settings.probe_timeout)
                if answer is not None:
                    there = state_from_proto(answer.state)
                    raise FailedPrecondition(
                        f"cannot failover group {group!r}: site {peer}, its primary, is reachable"
                        f" (pair {there} there): use `targetd-repl switchover {group}` for a "
                        f"planned role change, or `failover --force` to promote site "
                        f"{self._site} anyway (site {peer} is fenced when it next connects)"
                    )
                if table_state is PairState.PAIRED:
                    table_state = PairState.SUSPENDED_ERROR  # the probe found the link lost
            transition = pair_state.apply(
                table_state, event, role=Role.SECONDARY, pair=group, consistent=consistent
            )
            status = self._begin(group, "failover", "apply received records")
            started = time.monotonic()
            if record is None:
                epoch = store.info.epoch + 1
                record = FailoverRecord(
                    epoch=epoch,
                    restart_point=f"restart-point-e{epoch}",
                    forced=force,
                    started_at=time.time(),
                )
                state.failover = record
                self._save(store)
            # STOP_RECEIVER, APPLY_RECEIVED
            self._repl.detach(group)
            seq = self._apply_all(store)
            fault("failover-applied")
            # TAKE_RESTART_POINT
            status.step = "restart-point snapshot"
            record.restart_seq = self._ensure_snapshot(
                store, record.restart_point, SnapshotKind.RESTART_POINT
            )
            self._save(store)
            fault("failover-snapshot")
            # START_CHANGED_BITMAP
            changed = ChangedBitmaps.open(
                store.group_dir, self._sizes(store), self._settings.region_size
            )
            changed.clear_all()
            changed.save_all()
            # BUMP_EPOCH (SWAP_JOURNALS: the receive journal goes on as the transfer journal)
            status.step = "new epoch"
            self._promote(store, record, peer, seq)
            self._install_changed(store, record.restart_seq)
            record.done = True
            self._save(store)
            # SET_WRITABLE: a primary runner, swapped (tracking, no stream until failback)
            self._repl.reattach(group)
            status.promoted_seconds = time.monotonic() - started
            status.epoch, status.seq, status.snapshot = record.epoch, seq, record.restart_point
            log.warning(
                "group %s: failover%s: site %s is primary at epoch %d from seq %d (restart point "
                "%s); actions %s",
                group,
                " (forced)" if force else "",
                self._site,
                record.epoch,
                seq,
                record.restart_point,
                ", ".join(transition.actions),
            )
            return status.done(
                "done",
                f"site {self._site} is primary at epoch {record.epoch}; restart point "
                f"{record.restart_point} at seq {seq}; site {peer} is fenced when it returns, "
                f"then run `targetd-repl failback {group}` here",
            )

    def _promote(self, store: GroupStore, record: FailoverRecord, peer: str, seq: int) -> None:
        """The epoch, role, acknowledged seq and pair state of a promoted site (idempotent)."""
        metadata = self._engine.metadata
        gid = store.info.id
        history = metadata.epoch_history(gid)
        current = history[-1] if history else None
        if not (
            current is not None
            and current.epoch == record.epoch
            and current.primary_site == self._site
        ):
            reason = "forced failover" if record.forced else "failover"
            metadata.record_epoch(
                gid,
                EpochEntry(gid, record.epoch, self._site, time.time(), seq, reason),
                role=Role.PRIMARY,
            )
            fault("failover-epoch")
        elif store.info.role is not Role.PRIMARY:
            metadata.set_role(gid, Role.PRIMARY)
        # What the old primary is known to hold: everything this site received, up to the
        # restart point. A fenced old primary promoted again (--force) keeps its acknowledged
        # seq: its unsent bitmap still covers the writes the other site never received.
        if not UnsentBitmaps.path_for(store.group_dir, store.volume_ids()[0]).exists():
            metadata.set_checkpoint(gid, acked_seq=seq, rewind=True)
        store.refresh()
        metadata.set_pair_roles(store.name, backlog_from_seq=None)
        metadata.set_pair_state(
            store.name,
            PairState.SWAPPED,
            f"failover at seq {seq}: site {self._site} is primary at epoch {record.epoch};"
            f" site {peer} is fenced when it returns",
        )

    def _recover_failover(self, store: GroupStore) -> None:
        """At start, before replication starts: finish a failover whose epoch was recorded, and
        mark writes again in the changed bitmap while this site is the promoted one."""
        state = self._state(store)
        record = state.failover
        if record is None:
            return
        history = self._engine.metadata.epoch_history(store.info.id)
        promoted = any(e.epoch == record.epoch and e.primary_site == self._site for e in history)
        if not record.done:
            if not promoted:
                return  # the epoch was not recorded: the group is still secondary; rerun
            pair = self._engine.metadata.get_pair(store.name)
            self._promote(store, record, pair.peer_site, history[-1].prev_last_seq)
            record.done = True
            self._save(store)
        if store.role is Role.PRIMARY and history and history[-1].primary_site == self._site:
            self._install_changed(store, record.restart_seq)
