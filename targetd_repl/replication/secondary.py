"""The secondary's side of one pair: it stores shipped batches in the receive journal (one group
commit per batch: one pwritev, one fdatasync), acknowledges them, and applies them strictly in
sequence order on an applier thread, so its image is always a prefix of the primary's history
across every volume of the group. The applier takes the newest batches from memory (kept by
GroupStore.receive_shipped once durable) rather than reading them back. One `SecondaryGroup`
per paired group at its secondary.

Checks, each before anything is stored (a refused batch changes nothing):
  * the stream is the group's newest (a reconnect supersedes the old stream: ABORTED);
  * the sender's epoch is not older than ours (StaleEpoch: FAILED_PRECONDITION);
  * the batch decodes into exactly `count` records from `first_seq` (InvalidArgument), every
    CRC32C verifies (JournalCorrupt: DATA_LOSS), and `first_seq` is the receive journal's next
    seq (SequenceGap: OUT_OF_RANGE);
  * every record names a volume of the group (the primary's ids map to ours by name, checked
    against names and sizes when the stream opens: FAILED_PRECONDITION on another size).

Consistency. A resync stream (`open.resync`) makes the image inconsistent at once (persisted)
and restarts the receive journal at the stream's first seq; `resync_done` names the seq after
which the image is whole again and the history to adopt then. The applier marks the image
consistent, and adopts the history, once it has applied that seq (also after a restart).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace

from targetd_repl.errors import (
    FailedPrecondition,
    JournalFull,
    NotFound,
    SequenceGap,
    TargetdReplError,
)
from targetd_repl.model import EpochEntry, PairInfo, PairState, Role
from targetd_repl.replication import wire
from targetd_repl.replication.errors import Aborted, StaleEpoch
from targetd_repl.replication.handshake import HandshakeDecision, HandshakeView, generation_key
from targetd_repl.replication.primary import adopts_history_now, decide_handshake
from targetd_repl.replication.settings import ReplicationSettings
from targetd_repl.replication.tracking import ReplicationState
from targetd_repl.roles import pair_state
from targetd_repl.roles.pair_state import Event
from targetd_repl.storage.group_store import GroupStore
from targetd_repl.storage.metadata import MetadataStore
from targetd_repl.v1 import replication_pb2

log = logging.getLogger(__name__)

# Event paths that bring a secondary's (informational) pair state to a target state.
_PATHS: dict[PairState, tuple[tuple[Event, ...], ...]] = {
    PairState.COPYING: ((Event.RESYNC_NEEDED,), (Event.LINK_LOST, Event.RESYNC_NEEDED)),
    PairState.PAIRED: ((Event.COPY_DONE,), (Event.IN_SYNC,), (Event.LINK_LOST, Event.IN_SYNC)),
    PairState.SUSPENDED_ERROR: ((Event.LINK_LOST,),),
}


def check_volumes(
    metadata: MetadataStore, store: GroupStore, volumes: list[replication_pb2.ReplVolume]
) -> dict[int, int]:
    """Match the primary's volumes with ours by name; return peer volume id -> our id.
    A missing volume is NotFound, another size or block size FailedPrecondition naming it."""
    ours = {store.volume(v).info.name: store.volume(v).info for v in store.volume_ids()}
    mapping: dict[int, int] = {}
    for spec in volumes:
        info = ours.pop(spec.name, None)
        if info is None:
            raise NotFound(f"volume {spec.name!r} is not in group {store.name!r} here")
        if info.size_bytes != spec.size_bytes:
            raise FailedPrecondition(
                f"volume {spec.name!r} of group {store.name!r} is {info.size_bytes} bytes here "
                f"but {spec.size_bytes} bytes at the primary"
            )
        if info.block_size != spec.block_size:
            raise FailedPrecondition(
                f"volume {spec.name!r} has {info.block_size}-byte blocks here but "
                f"{spec.block_size}-byte blocks at the primary"
            )
        mapping[spec.volume_id] = info.id
    if ours:
        raise FailedPrecondition(
            f"group {store.name!r} has volume(s) {', '.join(sorted(ours))} here that the "
            "primary's group lacks"
        )
    return mapping


class SecondaryGroup:
    """See the module docstring. `start()` runs the applier; `stop()` before the engine closes."""

    def __init__(
        self,
        *,
        store: GroupStore,
        metadata: MetadataStore,
        site: str,
        pair: PairInfo,
        settings: ReplicationSettings,
    ) -> None:
        self._store = store
        self._metadata = metadata
        self._site = site
        self._pair = pair
        self._settings = settings
        self._lock = threading.RLock()  # stream state; one batch stored at a time
        self._applied_cond = threading.Condition()
        self._stream_id = 0
        self._volume_map: dict[int, int] = {}
        self._rstate = ReplicationState.load(store.group_dir)
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._last_trim = 0.0

    @property
    def group(self) -> str:
        return self._store.name

    @property
    def peer(self) -> str:
        return self._pair.peer_site

    @property
    def pair(self) -> PairInfo:
        return self._pair

    @property
    def store(self) -> GroupStore:
        return self._store

    @property
    def consistent(self) -> bool:
        return self._rstate.consistent

    @property
    def held(self) -> bool:
        """A role change holds the applier (roles/: failback or resolve bulk copy running)."""
        return self._rstate.hold_apply

    # --- role changes (roles/ calls these) ------------------------------------------------------

    def hold(self, saved_snapshot: str) -> None:
        """A failback or resolve starts with this site as its target: the image is inconsistent
        from now on and received records wait, unapplied, until `release` (persisted)."""
        with self._lock:
            self._rstate.consistent = False
            self._rstate.consistent_at = None
            self._rstate.hold_apply = True
            self._rstate.hold_restarted_at = None
            self._rstate.saved_snapshot = saved_snapshot
            self._rstate.save(self._store.group_dir)
        with self._applied_cond:
            self._applied_cond.notify_all()

    @property
    def restarted_at(self) -> int | None:
        """The seq a held target's receive journal restarted at (roles/), if it did."""
        return self._rstate.hold_restarted_at if self._rstate.hold_apply else None

    def release(self, consistent_at: int, history: tuple[EpochEntry, ...]) -> None:
        """The bulk copy arrived: the image is the source's at `consistent_at` once applied that
        far; then this site takes `history` and the held records are applied in order."""
        with self._lock:
            self._rstate.hold_restarted_at = None
            self._rstate.consistent_at = consistent_at
            self._rstate.set_history(history)
            self._rstate.hold_apply = False
            self._rstate.save(self._store.group_dir)
        self._check_consistent(self._store.applied_seq)
        with self._applied_cond:
            self._applied_cond.notify_all()

    def set_state(self, state: PairState, detail: str = "") -> None:
        """Record the pair's state here as a role change decided it."""
        with self._lock:
            self._pair = self._metadata.set_pair_state(self.group, state, detail)

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        self._rstate.clean_shutdown = False
        self._rstate.save(self._store.group_dir)
        self._check_consistent(self._store.applied_seq)
        self._thread = threading.Thread(
            target=self._apply_loop, name=f"repl-apply-{self.group}", daemon=True
        )
        self._thread.start()

    def stop(self, *, clean: bool = True) -> None:
        with self._lock:
            self._stream_id += 1  # any open stream is superseded
        with self._applied_cond:
            self._stopping = True
            self._applied_cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if clean:
            self._rstate.clean_shutdown = True
            self._rstate.save(self._store.group_dir)

    def remove_files(self) -> None:
        ReplicationState.remove(self._store.group_dir)

    # --- pair state (informational at the secondary) --------------------------------------------

    def _fire(self, event: Event, detail: str | None = None) -> bool:
        try:
            transition = pair_state.apply(
                self._pair.state, event, role=Role.SECONDARY, pair=self.group
            )
        except TargetdReplError:
            return False
        new_detail = detail if detail is not None else self._pair.detail
        if transition.state is not PairState.SIMPLEX and (
            transition.state is not self._pair.state or new_detail != self._pair.detail
        ):
            self._pair = self._metadata.set_pair_state(self.group, transition.state, new_detail)
        return True

    def _reach(self, state: PairState, detail: str = "") -> None:
        with self._lock:
            if self._pair.state is state:
                if detail != self._pair.detail:
                    self._pair = self._metadata.set_pair_state(self.group, state, detail)
                return
            if self._pair.state is PairState.SUSPENDED:
                return  # the admin's split holds until resume
            for path in _PATHS.get(state, ()):
                if pair_state.TABLE.get((Role.SECONDARY, self._pair.state, path[0])) is None:
                    continue
                for event in path:
                    self._fire(event, detail)
                if self._pair.state is state:
                    return

    def command(self, event: Event) -> PairState:
        """A suspend or resume the primary passed on."""
        with self._lock:
            self._fire(
                event, "suspended by the admin at the primary" if event is Event.SUSPEND else ""
            )
            return self._pair.state

    # --- the handshake --------------------------------------------------------------------------

    def view(self) -> HandshakeView:
        store = self._store
        journal = store.journal
        last = journal.durable_seq
        return HandshakeView(
            site=self._site,
            group=store.name,
            role=store.role,
            history=tuple(self._metadata.epoch_history(store.info.id)),
            last_seq=last,
            acked_seq=last,
            journal_first_seq=min(journal.first_seq, last + 1),
            applied_seq=min(store.applied_seq, last),
            has_unsent=False,
            clean_shutdown=self._rstate.clean_shutdown,
            consistent=self._rstate.consistent,
        )

    def handshake(
        self, peer: HandshakeView, volumes: list[replication_pb2.ReplVolume]
    ) -> tuple[HandshakeView, HandshakeDecision]:
        """Run the table on both views; act on our side of the decision; return our view."""
        # Epochs first: a stale caller is told so even where this site took over meanwhile.
        self._check_sender(peer.site, receiving=False)
        check_volumes(self._metadata, self._store, volumes)
        with self._lock:
            view = self.view()
            decision = decide_handshake(view, peer)
            if decision.fence == peer.site:
                raise StaleEpoch(
                    f"stale epoch: site {peer.site} is at epoch {peer.epoch}, "
                    f"site {self._site} at epoch {view.epoch}; {decision.reason}"
                )
            if self._rstate.hold_apply:
                return view, decision  # a role change decides here (roles/), not the table
            self._check_sender(peer.site)
            if decision.target == self._site and adopts_history_now(decision):
                self._adopt(peer.history)
            if decision.action.refuses:
                self._reach(PairState.SUSPENDED_ERROR, decision.reason)
            return view, decision

    def _adopt(self, history: tuple[EpochEntry, ...]) -> None:
        """Take the source's epoch history entries newer than ours (it is a continuation). If
        ours holds a generation the source's lacks (a fork this site lost: roles/ resolve, or
        an empty fork), ours is replaced; the entries dropped are archived with the snapshot
        that kept this site's data (metadata.replace_history)."""
        store = self._store
        gid = store.info.id
        ours = self._metadata.epoch_history(gid)
        theirs = [replace(e, group_id=gid) for e in history]
        keys = {generation_key(e) for e in theirs}
        if any(generation_key(e) not in keys for e in ours) and theirs:
            self._metadata.replace_history(gid, theirs, snapshot=self._rstate.saved_snapshot)
            log.warning(
                "group %s: epoch history replaced by site %s's (%d entries archived)",
                self.group,
                self.peer,
                sum(1 for e in ours if generation_key(e) not in keys),
            )
        else:
            current = store.info.epoch
            for entry in theirs:
                if entry.epoch > current:
                    self._metadata.record_epoch(gid, entry)
                    current = entry.epoch
        store.refresh()

    def _check_sender(self, site: str, *, receiving: bool = True) -> None:
        if site != self._pair.peer_site:
            raise FailedPrecondition(
                f"group {self.group!r} is paired with site {self._pair.peer_site!r} here, "
                f"not with {site!r}"
            )
        if receiving and self._store.role is not Role.SECONDARY:
            raise FailedPrecondition(
                f"group {self.group!r} is {self._store.role} here: it does not receive"
            )

    def _check_epoch(self, epoch: int, site: str) -> None:
        ours = self._store.info.epoch
        if epoch < ours and not self._rstate.hold_apply:  # roles/: a held target takes its
            # source's epoch with the history it adopts (a resolve's survivor may be behind)
            raise StaleEpoch(
                f"stale epoch: site {site} sends group {self.group!r} at epoch {epoch}, "
                f"this site is at epoch {ours}"
            )

    # --- the stream -----------------------------------------------------------------------------

    def open_stream(self, msg: replication_pb2.ShipOpen) -> int:
        """Check and start a Ship stream; return its id (a newer one supersedes it)."""
        self._check_sender(msg.site)
        self._check_epoch(msg.epoch, msg.site)
        mapping = check_volumes(self._metadata, self._store, list(msg.volumes))
        with self._lock:
            store = self._store
            if msg.resync:
                journal = store.journal
                held = self._rstate.hold_apply
                # roles/: a held target (failback, resolve) discards its own seqs past the
                # source's snapshot (saved in a snapshot before the hold began)
                if msg.start_seq <= journal.durable_seq and not held:
                    raise SequenceGap(
                        f"group {self.group!r}: a resync from seq {msg.start_seq} cannot start "
                        f"below the received seq {journal.durable_seq}"
                    )
                self._rstate.consistent = False
                self._rstate.consistent_at = None
                self._rstate.save(store.group_dir)
                if msg.start_seq != journal.next_seq or held:
                    store.restart_journal(msg.start_seq, discard=held)
                if held:
                    self._rstate.hold_restarted_at = msg.start_seq
                    self._rstate.save(store.group_dir)
                self._reach(PairState.COPYING, "")
            elif msg.start_seq != store.journal.next_seq:
                raise SequenceGap(
                    f"group {self.group!r}: stream starts at seq {msg.start_seq}, the receive "
                    f"journal expects seq {store.journal.next_seq}"
                )
            elif self._rstate.consistent:
                self._reach(PairState.PAIRED, "")
            self._stream_id += 1
            self._volume_map = mapping
            return self._stream_id

    def _check_stream(self, stream: int) -> None:
        if stream != self._stream_id:
            raise Aborted(f"group {self.group!r}: this stream was superseded by a newer one")

    def receive_batch(
        self, stream: int, epoch: int, first_seq: int, count: int, records: bytes | bytearray
    ) -> None:
        """Store one batch (`count` records from `first_seq`, as the sender's journal stored
        them) durably in the receive journal (one write, one fdatasync) or refuse it whole:
        every CRC is verified and every seq checked before anything is stored. `records` must
        stay unchanged afterwards: the applier reads the newest batches from it."""
        with self._lock:
            self._check_stream(stream)
            self._check_epoch(epoch, self._pair.peer_site)
            store = self._store
            # Order: a batch is stored only right after the seq the journal holds last.
            if first_seq != store.journal.next_seq:
                raise SequenceGap(
                    f"group {self.group!r}: out-of-order batch from seq {first_seq}, "
                    f"expected seq {store.journal.next_seq}"
                )
            try:
                store.receive_shipped(memoryview(records), first_seq, count, self._volume_map)
            except JournalFull:
                if self._rstate.hold_apply:
                    raise  # held records cannot be applied early (roles/ bulk copy running)
                # The applier is behind: apply and trim here, then try once more.
                store.apply_received()
                store.checkpoint_and_trim()
                store.receive_shipped(memoryview(records), first_seq, count, self._volume_map)
        with self._applied_cond:
            self._applied_cond.notify_all()

    def resync_done(self, stream: int, msg: replication_pb2.ResyncDone) -> None:
        with self._lock:
            self._check_stream(stream)
            if self._rstate.consistent:
                return
            self._rstate.consistent_at = msg.last_seq
            self._rstate.set_history(wire.history_from_proto(msg.history, self._store.info.id))
            self._rstate.save(self._store.group_dir)
        self._check_consistent(self._store.applied_seq)
        with self._applied_cond:
            self._applied_cond.notify_all()

    def heartbeat(self, stream: int) -> None:
        with self._lock:
            self._check_stream(stream)

    def stream_ended(self, stream: int, error: str | None) -> None:
        with self._lock:
            if stream == self._stream_id and error is not None:
                self._reach(PairState.SUSPENDED_ERROR, f"stream from {self.peer} ended: {error}")

    def ack(self, echo_ns: int = 0) -> replication_pb2.ShipAck:
        store = self._store
        return replication_pb2.ShipAck(
            received_seq=store.journal.durable_seq,
            applied_seq=store.applied_seq,
            consistent=self._rstate.consistent,
            echo_ns=echo_ns,
        )

    # --- the applier ----------------------------------------------------------------------------

    def _check_consistent(self, applied: int) -> None:
        state = self._rstate
        if state.consistent or state.consistent_at is None or applied < state.consistent_at:
            return
        with self._lock:
            if state.consistent or state.consistent_at is None:
                return
            self._adopt(state.history(self._store.info.id))
            state.consistent = True
            state.consistent_at = None
            state.adopt_history = []
            state.save(self._store.group_dir)
            self._reach(PairState.PAIRED, "")
        log.info(
            "group %s: copy from %s complete; image consistent at seq %d",
            self.group,
            self.peer,
            applied,
        )

    def _apply_loop(self) -> None:
        store = self._store
        while True:
            with self._applied_cond:
                while not self._stopping and (
                    self._rstate.hold_apply  # roles/: a bulk copy must land first
                    or (
                        store.journal.durable_seq <= store.applied_seq
                        and self._rstate.consistent_at is None
                    )
                ):
                    self._applied_cond.wait(self._settings.trim_interval)
                    self._maybe_trim()
                if self._stopping:
                    return
            try:
                applied = store.apply_received(max_records=self._settings.apply_batch)
                self._check_consistent(applied)
                self._maybe_trim()
                if self._rstate.consistent_at is not None and applied < store.journal.durable_seq:
                    continue
                if self._rstate.consistent_at is not None:
                    time.sleep(0.01)  # waiting for the rest of the copy to arrive
            except TargetdReplError as error:
                log.error("group %s: applying received records failed: %s", self.group, error)
                time.sleep(1.0)

    def _maybe_trim(self) -> None:
        now = time.monotonic()
        if now - self._last_trim < self._settings.trim_interval:
            return
        self._last_trim = now
        try:
            self._store.checkpoint_and_trim()
        except TargetdReplError as error:
            log.warning("group %s: checkpoint failed: %s", self.group, error)
