"""The primary's side of one pair: the sender that tails the journal, the sync-mode wait, the
unsent-bitmap tracking, and the resync copier. One `PrimaryPair` per paired group at its primary.

Threads. A runner thread owns the connection: it connects, runs the handshake, and streams
(`Ship`) until the link fails or a command stops it; then it marks the link lost and retries with
back-off. Inside a stream, gRPC consumes the request generator (`_requests`) in its own thread:
it reads durable records from the journal from the seq the handshake agreed on and sends them in
batches, never more than `window_bytes` unacknowledged (flow control), a heartbeat when idle, and
the end of a resync copy in its place in the stream. A batch is the journal's stored bytes of a
run of records, read with one pread (Journal.read_raw) and sent pre-encoded
(wire.encode_batch_request): no Record objects and no protobuf message object per batch; the
receiver verifies every CRC. An async pair lingers up to `linger` for `linger_records` records,
waking once when they are there (not at every commit), so a busy group ships few large batches.
The runner thread reads the acknowledgements (one may cover several batches). During a resync
a copier thread appends region copies to the journal.

The one ordered stream. Resync copies are ordinary journal records (GroupStore.copy_region reads
a region under its range lock inside the write slot), so the secondary applies copies and new
writes in a single sequence order: a region's copy holds exactly the writes below its seq.

Invariant (the handshake's reading of the unsent bitmap): every region written with a seq above
`acked` (what the peer holds durably) is either in the journal, retained for the sender, or set
in the unsent bitmap. While the pair ships (copying, paired) the journal retains everything above
`acked`; when shipping stops (suspended, suspended-error, journal-full) the pair starts
*tracking*: the backlog above `acked` is converted into bits, new writes mark their regions
(saved before the write is acknowledged), and the journal may trim freely. Bits are cleared only
when the copy of their region is acknowledged, or all at once once a journal resume has shipped
every write they stood for. `_converted_upto` remembers how far the backlog was converted, so a
flapping link does not re-read it.

Pair states follow roles/pair_state.py (`_fire`); events this runner raises: link-lost,
journal-over-limit, journal-drained, in-sync, resync-needed, copy-done, split-brain-detected,
handshake-refused, fenced, and the admin's suspend, resume, delete.

Lock order: the group's write barrier before `_lock` (a writer calls the hooks inside its write
slot; the resync start closes the barrier, then takes `_lock`). Nothing waits for the barrier
while holding `_lock`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from targetd_repl.errors import (
    IllegalTransition,
    SequenceTrimmed,
    TargetdReplError,
)
from targetd_repl.model import PairInfo, PairMode, PairState, RecordKind, Role
from targetd_repl.replication import bulk, wire
from targetd_repl.replication.bulk import LaneSender
from targetd_repl.replication.channel import TlsFiles, open_channel
from targetd_repl.replication.errors import PeerUnavailable, StaleEpoch
from targetd_repl.replication.handshake import (
    Action,
    BitmapKind,
    HandshakeDecision,
    HandshakeView,
    Save,
    decide,
)
from targetd_repl.replication.settings import FencePolicy, ReplicationSettings
from targetd_repl.replication.status import error_from_rpc
from targetd_repl.replication.tracking import ReplicationState, UnsentBitmaps
from targetd_repl.roles import pair_state
from targetd_repl.roles.pair_state import Event
from targetd_repl.storage.group_store import GroupStore
from targetd_repl.storage.journal import Journal, RawRun
from targetd_repl.storage.metadata import MetadataStore
from targetd_repl.v1 import replication_pb2, replication_pb2_grpc

log = logging.getLogger(__name__)

_TRACKING_STATES = frozenset(
    {PairState.SUSPENDED, PairState.SUSPENDED_ERROR, PairState.JOURNAL_FULL, PairState.SWAPPED}
)


def decide_handshake(local: HandshakeView, peer: HandshakeView) -> HandshakeDecision:
    """The one place replication calls the handshake table (handshake.py is another module's;
    if its API moves, only this wrapper changes)."""
    return decide(local, peer)


def adopts_history_now(decision: HandshakeDecision) -> bool:
    """A journal resume keeps the target a prefix of the source's history: it takes the
    source's newer epoch entries at once (a copy's target takes them when the copy is done)."""
    return decision.action in (Action.RESUME_JOURNAL, Action.NOTHING_TO_DO)


@dataclass(frozen=True, slots=True)
class RawBatch:
    """A batch the bulk lane sends straight from the journal's file (Journal.open_raw)."""

    epoch: int
    first_seq: int
    run: RawRun


@dataclass(frozen=True)
class StreamPlan:
    """What a role change in progress (roles/) asks the sender to stream instead of what the
    handshake table alone would decide: the journal from `start_seq`, and with
    `restart_target` the receiver restarts its receive journal there and stays inconsistent
    (ShipOpen.resync) until the role change completes it. No copier runs and no pair event
    fires: the roles layer owns the state until it calls `fire(COPY_DONE)`."""

    start_seq: int
    restart_target: bool


PlanHook = Callable[[HandshakeDecision, HandshakeView], StreamPlan | None]
ViewHook = Callable[[HandshakeView], HandshakeView]


@dataclass
class CopyProgress:
    total_bytes: int = 0
    done_bytes: int = 0


class _Session:
    """One connection attempt's stream: flags shared by the runner, the request generator and
    the copier."""

    def __init__(self, start_seq: int, resync: bool) -> None:
        self.start_seq = start_seq
        self.resync = resync
        self.call: grpc.Future[object] | None = None  # the Ship call (a Future and a Call)
        self.stopped = threading.Event()
        self.by_command = False  # stopped by suspend/delete/stop: not a link failure
        self.failure: str | None = None
        self.last_ack = time.monotonic()
        self.copy_last_seq: int | None = None  # set when the copier has appended every copy
        self.copier: threading.Thread | None = None
        self.first_ack = threading.Event()  # the receiver's first acknowledgement arrived
        self.lane_offer: tuple[int, bytes] | None = None  # its bulk lane (port, token), if any
        self.lane: LaneSender | None = None

    def stop(self, *, by_command: bool = False, failure: str | None = None) -> None:
        if by_command:
            self.by_command = True
        if failure is not None and self.failure is None:
            self.failure = failure
        self.stopped.set()
        self.first_ack.set()  # a sender waiting for the offer goes on to see the stop
        call = self.call
        if call is not None:
            call.cancel()
        lane = self.lane
        if lane is not None:
            lane.close()  # a sender blocked in a send fails and ends


class PrimaryPair:
    """See the module docstring. Create, then `start()`; `stop()` before the engine closes."""

    def __init__(
        self,
        *,
        store: GroupStore,
        metadata: MetadataStore,
        site: str,
        pair: PairInfo,
        address: Callable[[], str],
        tls: TlsFiles | None,
        lane_address: Callable[[], str | None] = lambda: None,
        settings: ReplicationSettings,
        region_size: int,
    ) -> None:
        self._store = store
        self._metadata = metadata
        self._site = site
        self._pair = pair
        self._address = address
        self._lane_address = lane_address
        self._tls = tls
        self._settings = settings
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._convert_lock = threading.Lock()
        self._persist_lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._refused = False
        self._thread: threading.Thread | None = None
        self._session: _Session | None = None
        info = store.info
        self._acked = info.acked_seq
        self._acked_persisted = info.acked_seq
        self._acked_persisted_at = 0.0
        self._peer_applied = 0
        self._peer_consistent = False
        self._converted_upto = 0
        self._retain_min = 0
        self._pin: int | None = None
        self._converting_from: int | None = None
        self._inflight: deque[tuple[int, int, int]] = deque()  # (last seq, bytes, first ts_ns)
        self._inflight_bytes = 0
        self._pending_copies: deque[tuple[int, int, int, int, int]] = (
            deque()
        )  # seq, vid, off, len, bytes
        self._copy_inflight = 0
        self._progress = CopyProgress()
        self._clear_all_at: int | None = None
        self._last_trim = 0.0
        self._rstate = ReplicationState.load(store.group_dir)
        volumes = {vid: store.volume(vid).info.size_bytes for vid in store.volume_ids()}
        self._unsent = UnsentBitmaps.open(store.group_dir, volumes, region_size)
        self._block = {vid: store.volume(vid).info.block_size for vid in store.volume_ids()}
        self._tracking = pair.state in _TRACKING_STATES
        self._lane_retry_at = 0.0  # ask for a bulk lane from then on
        self.on_ack: Callable[[int, int], None] | None = None  # (acked seq, applied seq): benches
        # roles/ (role changes): a plan for the stream (failback, resolve), extra view fields
        # (changed bitmap, switchover backlog, survivor), a journal floor kept for a plan, and
        # `held`: the sender does not connect (a switchover's new primary until it drained).
        self.plan_hook: PlanHook | None = None
        self.view_hook: ViewHook | None = None
        self.held = False
        self._roles_floor: int | None = None
        self._last_check = 0.0

    # --- identity -----------------------------------------------------------------------------

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

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Install the write-path hooks and start the runner. A pair persisted in a tracking
        state converts its journal backlog into bits first (the bits of a crash are a superset:
        converting again only sets what is already set)."""
        store = self._store
        if self._tracking:
            self._tracking = False
            self._start_tracking()
        store.retain_from = self._retain_from
        store.on_written = self._on_written
        store.after_write = self._after_write
        store.on_journal_full = self._on_journal_full
        self._rstate.clean_shutdown = False
        self._rstate.save(store.group_dir)
        self._thread = threading.Thread(
            target=self._run, name=f"repl-primary-{self.group}", daemon=True
        )
        self._thread.start()

    def stop(self, *, clean: bool = True) -> None:
        """Stop streaming, persist the acknowledged seq and the bitmaps, remove the hooks."""
        with self._lock:
            self._stopping = True
            session = self._session
            self._cond.notify_all()
        if session is not None:
            session.stop(by_command=True)
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        store = self._store
        store.after_write = None
        store.on_journal_full = None
        store.on_written = None
        # Keep retaining what the peer lacks until the group closes (a checkpoint may still run).
        self._persist_acked(force=True)
        self._unsent.save_all()
        if clean:
            self._rstate.clean_shutdown = True
            self._rstate.save(store.group_dir)

    def remove_files(self) -> None:
        """After the pair is deleted: forget the bitmaps and the replication state."""
        self._store.retain_from = None
        self._unsent.remove_files()
        ReplicationState.remove(self._store.group_dir)

    # --- admin commands (the manager calls them) ----------------------------------------------

    def suspend(self) -> PairInfo:
        with self._lock:
            self._fire(Event.SUSPEND, "suspended by the admin", strict=True)
            session = self._session
        if session is not None:
            session.stop(by_command=True)
        return self._pair

    def resume(self) -> PairInfo:
        with self._lock:
            self._fire(Event.RESUME, strict=True)
            self._refused = False
        self._wake.set()
        return self._pair

    # --- role changes (roles/ calls these) ------------------------------------------------------

    def fire(self, event: Event, detail: str | None = None, *, strict: bool = False) -> bool:
        """Apply a pair event (see `_fire`) for the roles layer."""
        with self._lock:
            return self._fire(event, detail, strict=strict)

    def set_roles_floor(self, seq: int | None) -> None:
        """Keep the journal from `seq` on (a role change will stream from there), or stop."""
        with self._lock:
            self._roles_floor = seq

    def release(self) -> None:
        """Let a held sender connect (a switchover's new primary once it drained)."""
        with self._lock:
            self.held = False
            self._refused = False
        self._wake.set()

    def wake(self) -> None:
        with self._lock:
            self._refused = False
        self._wake.set()

    def set_acked(self, seq: int) -> None:
        """What the peer is known to hold (a role change established it), persisted."""
        with self._lock:
            self._acked = max(self._acked, seq)
        self._persist_acked(force=True)

    @property
    def peer_consistent(self) -> bool:
        """The peer's last acknowledgement said its image is whole (no copy running there)."""
        return self._peer_consistent

    @property
    def peer_applied(self) -> int:
        return self._peer_applied

    def view(self) -> HandshakeView:
        """This site's handshake view (not pinning the journal)."""
        return self._view(pin=False)

    def answer_handshake(self, peer: HandshakeView) -> tuple[HandshakeView, HandshakeDecision]:
        """The peer's handshake reached this site while the group is primary here (a failover
        made it primary, or two sites claim it): decide, fence the stale side, report a
        split-brain on both. StaleEpoch when the caller must demote."""
        view = self._view(pin=False)
        decision = decide_handshake(view, peer)
        if decision.fence == peer.site:
            raise StaleEpoch(
                f"stale epoch: site {peer.site} is at epoch {peer.epoch}, site {self._site} at"
                f" epoch {view.epoch}; {decision.reason}"
            )
        if decision.fence == self._site:
            self._fenced(decision.reason)
        elif decision.action is Action.SPLIT_BRAIN:
            with self._lock:
                self._fire(Event.SPLIT_BRAIN_DETECTED, decision.reason)
                self._refused = True
        return view, decision

    def _maybe_check_epochs(self, state: PairState) -> None:
        """A primary that waits (swapped after a failover) still compares epochs with the peer
        now and then: a stale peer is told to demote, a split-brain is reported (roles/)."""
        if (
            state is not PairState.SWAPPED
            or self._store.role is not Role.PRIMARY
            or self._refused
            or self.held
        ):
            return
        now = time.monotonic()
        if now - self._last_check < max(self._settings.reconnect_max, 1.0):
            return
        self._last_check = now
        try:
            channel = open_channel(self._address(), self.peer, self._tls)
        except (TargetdReplError, OSError):
            return
        try:
            stub = replication_pb2_grpc.ReplicationStub(channel)
            view = self._view(pin=False)
            request = replication_pb2.HandshakeRequest(
                view=wire.view_to_proto(view), volumes=self._volumes()
            )
            try:
                response = stub.Handshake(request, timeout=self._settings.rpc_timeout)
            except grpc.RpcError as error:
                raise error_from_rpc(error, self.peer) from None
            decision = decide_handshake(
                view, wire.view_from_proto(response.view, self._store.info.id)
            )
            if decision.fence == self._site:
                raise StaleEpoch(decision.reason)
            if decision.action is Action.SPLIT_BRAIN:
                with self._lock:
                    self._fire(Event.SPLIT_BRAIN_DETECTED, decision.reason)
                    self._refused = True
        except StaleEpoch as error:
            self._fenced(str(error))
        except (TargetdReplError, OSError) as error:
            log.debug("pair %s: epoch check with %s: %s", self.group, self.peer, error)
        finally:
            channel.close()

    def set_fence(self, fence: FencePolicy) -> None:
        self._rstate.fence = fence.value
        self._rstate.save(self._store.group_dir)

    # --- status -------------------------------------------------------------------------------

    def status_fields(self) -> dict[str, object]:
        journal = self._store.journal
        with self._lock:
            last = journal.durable_seq
            acked = min(self._acked, last)
            lag_seconds = 0.0
            if self._inflight:
                lag_seconds = max(0.0, time.time() - self._inflight[0][2] / 1e9)
            return {
                "group": self.group,
                "peer": self.peer,
                "mode": self._pair.mode,
                "state": self._pair.state,
                "role": self._store.role,  # secondary once fenced (roles/)
                "epoch": self._store.info.epoch,
                "last_seq": last,
                "acked_seq": acked,
                "applied_seq": self._peer_applied,
                "lag_records": max(0, last - acked),
                "lag_seconds": lag_seconds,
                "unsent_regions": self._unsent.count(),
                "resync_done_bytes": self._progress.done_bytes,
                "resync_total_bytes": self._progress.total_bytes,
                "detail": self._pair.detail,
            }

    @property
    def acked_seq(self) -> int:
        return self._acked

    @property
    def tracking(self) -> bool:
        return self._tracking

    @property
    def unsent(self) -> UnsentBitmaps:
        return self._unsent

    # --- pair state ---------------------------------------------------------------------------

    def _fire(self, event: Event, detail: str | None = None, *, strict: bool = False) -> bool:
        """Apply `event` to the pair's state (lock held) and perform the local actions. Returns
        False (and changes nothing) when the table has no entry, or raises IllegalTransition
        for an admin command (`strict`)."""
        try:
            transition = pair_state.apply(
                self._pair.state, event, role=Role.PRIMARY, pair=self.group
            )
        except IllegalTransition:
            if strict:
                raise
            log.debug("pair %s: %s ignored in state %s", self.group, event, self._pair.state)
            return False
        new_detail = detail if detail is not None else self._pair.detail
        if transition.state is not PairState.SIMPLEX and (
            transition.state is not self._pair.state or new_detail != self._pair.detail
        ):
            self._pair = self._metadata.set_pair_state(self.group, transition.state, new_detail)
            log.info(
                "pair %s -> %s: %s%s",
                self.group,
                self.peer,
                transition.state,
                f" ({new_detail})" if new_detail else "",
            )
        for action in transition.actions:
            if action is pair_state.Action.START_TRACKING_UNSENT:
                self._start_tracking()
            elif action is pair_state.Action.STOP_SENDER and self._session is not None:
                self._session.stop(by_command=True)
        self._cond.notify_all()
        return True

    def _link_lost(self, why: str) -> None:
        with self._lock:
            if self._stopping:
                return
            self._fire(Event.LINK_LOST, why)
            self._start_tracking()  # whatever the state was: the bitmap must cover from here
            self._pin = None

    # --- write-path hooks ---------------------------------------------------------------------

    def _retain_from(self) -> int:
        """The lowest seq the journal must keep (GroupStore.retain_from)."""
        value = self._retain_from_replication()
        floor = self._roles_floor  # roles/: a plan that will stream from this seq
        return value if floor is None else min(value, floor)

    def _retain_from_replication(self) -> int:
        pin = self._pin
        if pin is not None:
            return pin
        floor = self._converting_from
        if floor is not None:
            return floor  # the backlog is being converted into bits: keep it until done
        if self._tracking:
            return self._store.journal.next_seq  # the bitmap covers the backlog
        return max(self._acked + 1, self._retain_min)

    def _on_written(self, seq: int, volume_id: int, offset: int, length: int) -> None:
        """Inside the write slot: while tracking, mark the region and save a new bit before the
        write is acknowledged."""
        if self._tracking and self._unsent.mark(volume_id, offset, length):
            self._unsent.save(volume_id)

    def _after_write(self, seq: int) -> None:
        """Before the ack: a sync pair waits until the peer holds `seq` durably. A held sender
        (roles/: a switchover still draining) ships later: the write completes locally."""
        if self._pair.mode is not PairMode.SYNC or self._acked >= seq or self.held:
            return
        timeout = self._settings.sync_timeout
        with self._cond:
            deadline = time.monotonic() + timeout
            while self._acked < seq and not self._tracking and not self._stopping:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._link_lost(
                        f"sync write seq {seq}: site {self.peer} did not acknowledge it within "
                        f"{timeout:g} s"
                    )
                    break
                self._cond.wait(remaining)
            if self._acked >= seq:
                return
        if self._rstate.fence == FencePolicy.FAIL_WRITES.value:
            raise PeerUnavailable(
                f"group {self.group!r}: sync pair with site {self.peer} is "
                f"{self._pair.state} and its fence policy is fail-writes: write seq {seq} is "
                "not replicated"
            )

    def _on_journal_full(self) -> bool:
        """The journal is full with the peer's backlog: give up the retention, track the
        backlog in the unsent bitmap, and let the writer trim and go on."""
        with self._lock:
            if self._tracking and self._pin is None:
                return False  # nothing is retained for the peer: the journal is simply full
            journal = self._store.journal
            detail = (
                f"journal over its limit ({journal.used_bytes} of {journal.size_limit} bytes,"
                f" {journal.durable_seq - self._acked} records unacknowledged): tracking in "
                "the unsent bitmap"
            )
            if not self._fire(Event.JOURNAL_OVER_LIMIT, detail):
                self._start_tracking()
            self._pin = None
            session = self._session
        if session is not None:
            session.stop(failure="journal full")
        self._wake.set()
        return True

    # --- tracking -----------------------------------------------------------------------------

    def _start_tracking(self, *, all_set: bool = False) -> None:
        """Track changes in the unsent bitmap from now on and convert the journal's backlog
        above `acked` into bits (idempotent). The flag goes up before the backlog is read: a
        write whose hook missed the flag was durable before the read began. Until the backlog
        is converted and saved, the journal keeps it (`_converting_from`)."""
        with self._lock:
            if self._tracking:
                # Every write since the first conversion marked its region itself.
                self._converted_upto = max(self._converted_upto, self._store.journal.durable_seq)
                if all_set:
                    self._unsent.save_all()
                return
            acked = self._acked
            self._converting_from = max(acked, self._converted_upto) + 1
            self._tracking = True
            self._pending_copies.clear()
            self._copy_inflight = 0
            self._clear_all_at = None
        try:
            self._persist_acked(force=True)
            with self._convert_lock:
                journal = self._store.journal
                upto = journal.durable_seq
                start = max(acked, self._converted_upto) + 1
                if not all_set and start <= upto:
                    first = journal.first_seq
                    if first > start and self._converted_upto:
                        log.error(
                            "pair %s: journal trimmed to seq %d before seqs %d.. were tracked",
                            self.group,
                            first,
                            start,
                        )
                    # At start-up the journal may begin past `acked`: those writes were tracked
                    # (saved bits) before the journal was trimmed in an earlier run.
                    self._mark_records(journal, max(start, first), upto)
                self._converted_upto = max(self._converted_upto, upto)
                self._unsent.save_all()
        finally:
            with self._lock:
                self._converting_from = None

    def _mark_records(self, journal: Journal, start: int, upto: int) -> None:
        count = 0
        try:
            for record in journal.read_from(start, upto - start + 1):
                if record.kind is not RecordKind.MARKER and record.length:
                    block = self._block.get(record.volume_id, 512)
                    self._unsent.mark(record.volume_id, record.lba * block, record.length)
                count += 1
        except SequenceTrimmed:
            # Trimmed while not retained: only possible for records the bits already cover.
            log.warning("pair %s: journal trimmed during conversion at seq %d", self.group, start)
        if count:
            log.info(
                "pair %s: %d unacknowledged records (seq %d..%d) now tracked in the unsent bitmap",
                self.group,
                count,
                start,
                upto,
            )

    # --- acknowledgements ---------------------------------------------------------------------

    def _persist_acked(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._acked_persisted_at < self._settings.ack_persist_interval:
            return
        with self._persist_lock:
            acked = self._acked
            if acked > self._acked_persisted:
                try:
                    self._metadata.set_checkpoint(self.group, acked_seq=acked)
                    self._acked_persisted = acked
                except TargetdReplError as error:
                    log.warning("pair %s: cannot record acked seq %d: %s", self.group, acked, error)
            self._acked_persisted_at = now

    def _on_ack(self, ack: replication_pb2.ShipAck, session: _Session) -> None:
        copy_done = False
        with self._lock:
            session.last_ack = time.monotonic()
            acked = ack.received_seq
            self._acked = max(self._acked, acked)
            acked = self._acked
            self._peer_applied = ack.applied_seq
            self._peer_consistent = ack.consistent
            while self._inflight and self._inflight[0][0] <= acked:
                self._inflight_bytes -= self._inflight.popleft()[1]
            cleared = False
            while self._pending_copies and self._pending_copies[0][0] <= acked:
                _, vid, off, length, nbytes = self._pending_copies.popleft()
                self._copy_inflight -= nbytes
                self._progress.done_bytes += length
                if not self._tracking:
                    self._unsent.clear(vid, off, length)
                    cleared = True
            if (
                self._clear_all_at is not None
                and acked >= self._clear_all_at
                and not self._tracking
            ):
                self._unsent.clear_all()
                self._clear_all_at = None
                cleared = True
            if (
                session.resync
                and session.copy_last_seq is not None
                and acked >= session.copy_last_seq
                and ack.consistent
                and self._pair.state is PairState.COPYING
            ):
                copy_done = True
                self._fire(Event.COPY_DONE, "")
            self._cond.notify_all()
        if cleared or copy_done:
            self._unsent.save_all()
        if copy_done:
            log.info("pair %s: copy to %s complete at seq %d", self.group, self.peer, acked)
        callback = self.on_ack
        if callback is not None:
            callback(acked, ack.applied_seq)
        self._persist_acked()
        self._maybe_trim()

    def _maybe_trim(self) -> None:
        """Checkpoint and trim acknowledged records outside the write path."""
        now = time.monotonic()
        journal = self._store.journal
        if now - self._last_trim < self._settings.trim_interval:
            return
        self._last_trim = now
        if journal.used_bytes * 2 > journal.size_limit:
            try:
                self._store.checkpoint_and_trim()
            except TargetdReplError as error:
                log.warning("pair %s: background trim failed: %s", self.group, error)

    # --- the runner -----------------------------------------------------------------------------

    def _run(self) -> None:
        delay = self._settings.reconnect_min
        while True:
            with self._lock:
                if self._stopping:
                    return
                state = self._pair.state
                idle = (
                    state in (PairState.SUSPENDED, PairState.SWAPPED) or self._refused or self.held
                )
            if idle:
                self._maybe_check_epochs(state)
                self._maybe_trim()
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            if state is PairState.JOURNAL_FULL:
                self._wake.wait(timeout=self._settings.journal_full_dwell)
                self._wake.clear()
                with self._lock:
                    if self._pair.state is PairState.JOURNAL_FULL and not self._stopping:
                        self._fire(Event.JOURNAL_DRAINED, "catching up from the unsent bitmap")
                continue
            try:
                self._run_session()
                delay = self._settings.reconnect_min
            except StaleEpoch as error:
                self._fenced(str(error))
            except (TargetdReplError, grpc.RpcError, OSError) as error:
                why = str(error) if not isinstance(error, grpc.RpcError) else repr(error)
                log.warning("pair %s: link to %s lost: %s", self.group, self.peer, why)
                self._link_lost(why)
                self._maybe_trim()
                self._wake.wait(timeout=delay)
                self._wake.clear()
                delay = min(delay * 2, self._settings.reconnect_max)
            except Exception as error:  # a bug: show it, keep the pair alive and tracking
                log.exception("pair %s: sender failed", self.group)
                self._link_lost(f"internal error: {error}")
                self._wake.wait(timeout=self._settings.reconnect_max)
                self._wake.clear()

    def _fenced(self, why: str) -> None:
        log.error("pair %s: fenced by site %s: %s", self.group, self.peer, why)
        with self._lock:
            self._start_tracking()
            fired = self._fire(Event.FENCED, why)
            demote = fired and self._pair.state is PairState.SWAPPED
            if not fired:
                self._fire(Event.LINK_LOST, why)
                self._refused = True
        if demote:
            # SET_READONLY: writes must stop here; outside _lock (set_role closes the barrier).
            self._store.set_role(Role.SECONDARY)

    # --- one session: handshake, then stream ----------------------------------------------------

    def _volumes(self) -> list[replication_pb2.ReplVolume]:
        return [wire.volume_to_proto(self._store.volume(v).info) for v in self._store.volume_ids()]

    def _view(self, *, pin: bool = True) -> HandshakeView:
        view = self._base_view(pin=pin)
        hook = self.view_hook
        return view if hook is None else hook(view)

    def _base_view(self, *, pin: bool) -> HandshakeView:
        store = self._store
        journal = store.journal
        with self._lock:
            # Pin the journal: what the view says it holds must still be there afterwards.
            if pin:
                self._pin = journal.first_seq
            # Applied before durable: writes keep flowing, and both only grow with applied never
            # past durable, so this order can never report applied_seq above last_seq.
            applied = store.applied_seq
            last = journal.durable_seq
            acked = min(self._acked, last)
            return HandshakeView(
                site=self._site,
                group=store.name,
                role=store.role,
                history=tuple(self._metadata.epoch_history(store.info.id)),
                last_seq=last,
                acked_seq=acked,
                journal_first_seq=min(journal.first_seq, last + 1),
                applied_seq=applied,
                has_unsent=self._unsent.any() or last > acked,
                clean_shutdown=self._rstate.clean_shutdown,
                consistent=self._rstate.consistent,
            )

    def _run_session(self) -> None:
        channel = open_channel(self._address(), self.peer, self._tls)
        try:
            stub = replication_pb2_grpc.ReplicationStub(channel)
            view = self._view()
            request = replication_pb2.HandshakeRequest(
                view=wire.view_to_proto(view), volumes=self._volumes()
            )
            try:
                response = stub.Handshake(request, timeout=self._settings.rpc_timeout)
            except grpc.RpcError as error:
                raise error_from_rpc(error, self.peer) from None
            peer_view = wire.view_from_proto(response.view, self._store.info.id)
            decision = decide_handshake(view, peer_view)
            log.info("pair %s: handshake with %s: %s", self.group, self.peer, decision.reason)
            plan = self._act_on(decision, peer_view)
            if plan is None:
                return
            if isinstance(plan, StreamPlan):
                self._stream(channel, plan.start_seq, plan.restart_target, False, plan)
                return
            start_seq, resync, full = plan
            self._stream(channel, start_seq, resync, full)
        finally:
            with self._lock:
                self._pin = None
            channel.close()

    def _act_on(
        self, decision: HandshakeDecision, peer: HandshakeView
    ) -> tuple[int, bool, bool] | StreamPlan | None:
        """Turn the decision into (start seq, resync?, full copy?), or None when nothing moves
        (the pair state then says why); a role change in progress answers with its own plan."""
        action = decision.action
        if decision.fence == self._site:
            raise StaleEpoch(decision.reason)
        hook = self.plan_hook
        if hook is not None:
            plan = hook(decision, peer)
            if plan is not None:
                return plan
        if (
            action.refuses
            or decision.source != self._site
            or action
            not in (
                Action.NOTHING_TO_DO,
                Action.RESUME_JOURNAL,
                Action.BITMAP_RESYNC,
                Action.FULL_COPY,
            )
        ):
            why = decision.reason
            if action.moves_data and decision.source != self._site:
                why += " (this site is not the source: a failback must move the data)"
            with self._lock:
                self._link_lost(why)
                event = (
                    Event.SPLIT_BRAIN_DETECTED
                    if action is Action.SPLIT_BRAIN
                    else Event.HANDSHAKE_REFUSED
                )
                self._fire(event, why)
                self._refused = True
            log.error("pair %s: handshake with %s refused: %s", self.group, self.peer, why)
            return None
        if action in (Action.NOTHING_TO_DO, Action.RESUME_JOURNAL):
            assert decision.resume_seq is not None
            with self._lock:
                self._acked = max(self._acked, peer.last_seq)
            return decision.resume_seq, False, False
        ours = {(b.site, b.kind) for b in decision.bitmaps}
        if decision.save is not Save.NONE or not ours <= {(self._site, BitmapKind.UNSENT)}:
            with self._lock:
                self._link_lost(decision.reason)
                self._fire(
                    Event.HANDSHAKE_REFUSED,
                    f"{decision.reason} (needs the failback orchestration)",
                )
                self._refused = True
            return None
        return 0, True, action is Action.FULL_COPY

    def _begin_journal(self, start_seq: int) -> None:
        """Journal resume: from the quiet point on, writes ship and nothing is tracked; bits
        set so far stand for writes the stream is about to send, and go once it has."""
        store = self._store
        with store.quiesced(), self._lock:
            journal = store.journal
            if journal.first_seq > start_seq:
                raise PeerUnavailable(
                    f"journal trimmed past seq {start_seq} during the handshake; reconnecting"
                )
            if self._tracking:
                self._tracking = False
                if self._unsent.any():
                    self._clear_all_at = journal.next_seq - 1
            self._retain_min = 0
            self._pin = None
            if self._pair.state is PairState.COPYING:
                self._fire(Event.COPY_DONE, "")
            else:
                self._fire(Event.IN_SYNC, "")

    def _begin_resync(self, full: bool) -> tuple[int, list[tuple[int, int, int]]]:
        """Resync: the bitmap gets every write below a quiet point, the stream starts at it."""
        with self._lock:
            if self._pair.state is not PairState.COPYING:
                self._fire(Event.RESYNC_NEEDED, "resync copy running")
        if full:
            self._unsent.set_all()
        self._start_tracking(all_set=full)
        store = self._store
        with store.quiesced(), self._lock:
            start = store.journal.next_seq
            self._converted_upto = start - 1
            self._tracking = False
            self._retain_min = start
            self._pin = None
            self._pending_copies.clear()
            self._copy_inflight = 0
            todo = list(self._unsent.ranges())
            self._progress = CopyProgress(total_bytes=sum(r[2] for r in todo))
        self._unsent.save_all()
        log.info(
            "pair %s: %s copy to %s from seq %d: %d bytes in %d runs",
            self.group,
            "full" if full else "bitmap",
            self.peer,
            start,
            self._progress.total_bytes,
            len(todo),
        )
        return start, todo

    def _begin_plan(self, plan: StreamPlan) -> None:
        """A role change's stream (roles/): ship the journal from the plan's seq; bits set so
        far stand for writes the role change copies, and go once the peer acknowledges."""
        store = self._store
        with store.quiesced(), self._lock:
            journal = store.journal
            if journal.first_seq > plan.start_seq:
                raise PeerUnavailable(
                    f"journal trimmed past seq {plan.start_seq}, where the role change streams"
                    " from; reconnecting"
                )
            if self._tracking:
                self._tracking = False
                if self._unsent.any():
                    self._clear_all_at = journal.next_seq - 1
            self._retain_min = plan.start_seq
            self._pin = None

    def _stream(
        self,
        channel: grpc.Channel,
        start_seq: int,
        resync: bool,
        full: bool,
        plan: StreamPlan | None = None,
    ) -> None:
        todo: list[tuple[int, int, int]] = []
        if plan is not None:
            self._begin_plan(plan)
        elif resync:
            start_seq, todo = self._begin_resync(full)
        else:
            self._begin_journal(start_seq)
        session = _Session(start_seq, resync)
        with self._lock:
            if self._stopping:
                return
            self._session = session
            self._inflight.clear()
            self._inflight_bytes = 0
        try:
            call = _ship_method(channel)(self._requests(session))
            session.call = call
            if session.stopped.is_set():
                call.cancel()
            if resync and plan is None:
                session.copier = threading.Thread(
                    target=self._copy,
                    args=(session, todo),
                    name=f"repl-copy-{self.group}",
                    daemon=True,
                )
                session.copier.start()
            for ack in call:
                if not session.first_ack.is_set():
                    if ack.bulk_port:
                        session.lane_offer = (ack.bulk_port, ack.bulk_token)
                    session.first_ack.set()
                self._on_ack(ack, session)
        except grpc.RpcError as error:
            if self._ended_on_purpose(session):
                return
            if session.failure is not None:
                raise PeerUnavailable(session.failure) from None
            raise error_from_rpc(error, self.peer) from None
        finally:
            session.stop()
            with self._lock:
                if self._session is session:
                    self._session = None
                self._cond.notify_all()
            if session.copier is not None:
                session.copier.join(timeout=30)
        if not self._ended_on_purpose(session):
            raise PeerUnavailable(session.failure or f"site {self.peer} ended the stream")

    def _ended_on_purpose(self, session: _Session) -> bool:
        """A command, a stop, or the journal-full fallback ended the stream (not the link)."""
        return session.by_command or self._stopping or self._pair.state is PairState.JOURNAL_FULL

    # --- the request stream ---------------------------------------------------------------------

    def _requests(self, session: _Session) -> Iterator[replication_pb2.ShipRequest | bytes]:
        """The Ship call's request stream: the opening, then every message on gRPC, or
        nothing more when the receiver offers a bulk lane (the messages go over it)."""
        store = self._store
        ask_lane = self._settings.bulk and time.monotonic() >= self._lane_retry_at
        yield replication_pb2.ShipRequest(
            open=replication_pb2.ShipOpen(
                group=store.name,
                site=self._site,
                epoch=store.info.epoch,
                start_seq=session.start_seq,
                resync=session.resync,
                volumes=self._volumes(),
                bulk=ask_lane,
            )
        )
        if ask_lane:
            session.first_ack.wait(self._settings.link_timeout)
            if session.lane_offer is not None and not session.stopped.is_set():
                self._send_on_lane(session, *session.lane_offer)
                return
        for item in self._outgoing(session):
            if isinstance(item, tuple):
                yield wire.encode_batch_request(*item)
            elif isinstance(item, replication_pb2.ShipRequest):
                yield item

    def _send_on_lane(self, session: _Session, port: int, token: bytes) -> None:
        """Send the stream's messages over the bulk lane the receiver offered (bulk.py) until
        the session stops. A lane that cannot be opened ends the session; the next one asks
        for no lane for a while (a firewall may block the lane's port but not gRPC's)."""
        override = self._lane_address()
        if override is not None:  # a NAT or port forward: the peer's own port means nothing here
            host, port = bulk.host_of(override), int(override.rpartition(":")[2])
        else:
            host = bulk.host_of(self._address())
        try:
            lane = bulk.open_lane(
                host, port, token, self.peer, self._tls, self._settings.link_timeout
            )
            log.info("pair %s: shipping over the bulk lane to %s:%d", self.group, host, port)
        except PeerUnavailable as error:
            self._lane_retry_at = time.monotonic() + LANE_RETRY_AFTER
            log.warning("pair %s: %s; the next streams stay on gRPC for a while", self.group, error)
            session.stop(failure=str(error))
            return
        session.lane = lane
        try:
            if session.stopped.is_set():
                return
            for item in self._outgoing(session, files=lane.zero_copy):
                if isinstance(item, RawBatch):
                    run = item.run
                    try:
                        lane.send_file(
                            item.epoch, item.first_seq, run.count, run.fd, run.offset, run.length
                        )
                    finally:
                        os.close(run.fd)
                elif isinstance(item, tuple):
                    lane.send_batch(*item)
                else:
                    lane.send_message(item.SerializeToString())
        except OSError as error:
            # The receiver ends the gRPC call with the reason (a refused batch): wait for that
            # status rather than report the closed lane.
            if not session.stopped.wait(self._settings.link_timeout):
                session.stop(failure=f"bulk lane to site {self.peer}: {error}")
        finally:
            lane.close()

    def _outgoing(
        self, session: _Session, *, files: bool = False
    ) -> Iterator[tuple[int, int, int, bytes] | RawBatch | replication_pb2.ShipRequest]:
        """The stream's messages after the opening, in order, until the session stops: a
        batch as (epoch, first seq, count, the journal's stored bytes of its records) or, with
        `files`, as a RawBatch (the journal's file left open where those bytes are: the
        consumer sends and closes it), or a ShipRequest (resync_done, heartbeat)."""
        store = self._store
        settings = self._settings
        next_seq = session.start_seq
        last_sent = time.monotonic()
        done_sent = False
        session.last_ack = time.monotonic()
        while not session.stopped.is_set():
            now = time.monotonic()
            if now - session.last_ack > settings.link_timeout:
                session.stop(
                    failure=f"no acknowledgement from site {self.peer} for "
                    f"{settings.link_timeout:g} s"
                )
                return
            with self._cond:
                if self._inflight_bytes >= settings.window_bytes:
                    self._cond.wait(settings.heartbeat_interval)
                    continue
            journal = store.journal
            if journal.durable_seq >= next_seq:
                # Under a steady load, linger briefly for more records: one batch of many costs
                # the sender (and the GIL the writers share) far less than many of one.
                if (
                    settings.linger > 0
                    and self._pair.mode is PairMode.ASYNC  # sync writers wait for each ack
                    and journal.durable_seq - next_seq < settings.linger_records
                    and time.monotonic() - last_sent < settings.linger
                ):
                    try:
                        journal.wait_durable_beyond(
                            next_seq + settings.linger_records - 1, settings.linger
                        )
                    except TargetdReplError as error:
                        session.stop(failure=f"journal: {error}")
                        return
                try:
                    # The journal's bytes as stored: the receiver verifies each CRC.
                    run = None
                    if files:
                        run = journal.open_raw(next_seq, settings.batch_bytes)
                        count, size, head = (0, 0, b"") if run is None else run.shape
                    else:
                        count, payload = journal.read_raw(next_seq, settings.batch_bytes)
                        size, head = len(payload), payload
                except SequenceTrimmed as error:
                    session.stop(failure=f"journal trimmed under the sender: {error}")
                    return
                except TargetdReplError as error:
                    session.stop(failure=f"journal: {error}")
                    return
                if not count:
                    continue
                last = next_seq + count - 1
                first_ts = int.from_bytes(head[_TS_AT : _TS_AT + 8], "little")
                with self._lock:
                    self._inflight.append((last, size, first_ts))
                    self._inflight_bytes += size
                # Order: batches go out in seq order on the one stream, each right after the last.
                if run is not None:
                    yield RawBatch(store.info.epoch, next_seq, run)
                else:
                    yield (store.info.epoch, next_seq, count, payload)
                next_seq = last + 1
                last_sent = time.monotonic()
                continue
            copy_last = session.copy_last_seq
            if session.resync and not done_sent and copy_last is not None and copy_last < next_seq:
                history = self._metadata.epoch_history(store.info.id)
                yield replication_pb2.ShipRequest(
                    resync_done=replication_pb2.ResyncDone(
                        last_seq=copy_last, history=[wire.epoch_to_proto(e) for e in history]
                    )
                )
                done_sent = True
                last_sent = time.monotonic()
                continue
            if time.monotonic() - last_sent >= settings.heartbeat_interval:
                yield replication_pb2.ShipRequest(
                    heartbeat=replication_pb2.ShipHeartbeat(sent_at_ns=time.monotonic_ns())
                )
                last_sent = time.monotonic()
                continue
            try:
                journal.wait_durable_beyond(next_seq - 1, settings.heartbeat_interval)
            except TargetdReplError as error:
                session.stop(failure=f"journal: {error}")
                return

    # --- the resync copier ----------------------------------------------------------------------

    def _copy(self, session: _Session, todo: list[tuple[int, int, int]]) -> None:
        settings = self._settings
        store = self._store
        # Copies alone must never fill the journal: a window of a quarter of it, at most.
        limit = store.journal.size_limit
        window = max(min(settings.copy_window_bytes, limit // 4), 4096)
        chunk = min(settings.copy_chunk_bytes, max(limit // 16, 4096))
        chunk = max(chunk - chunk % 4096, 4096)
        rate = settings.copy_rate_bytes
        started = time.monotonic()
        copied = 0
        last_seq = session.start_seq - 1
        try:
            for volume_id, offset, length in todo:
                end = offset + length
                pos = offset
                while pos < end:
                    piece = min(chunk - pos % chunk, end - pos)
                    with self._cond:
                        while self._copy_inflight >= window and not session.stopped.is_set():
                            self._cond.wait(settings.heartbeat_interval)
                    if session.stopped.is_set():
                        return
                    if rate:
                        ahead = copied / rate - (time.monotonic() - started)
                        if ahead > 0:
                            time.sleep(ahead)
                    seq = store.copy_region(volume_id, pos, piece)
                    with self._lock:
                        if self._tracking:
                            return  # the journal filled or the link went: the bits remain
                        self._pending_copies.append((seq, volume_id, pos, piece, piece))
                        self._copy_inflight += piece
                    last_seq = seq
                    copied += piece
                    pos += piece
            with self._lock:
                session.copy_last_seq = last_seq
            log.info("pair %s: copy appended up to seq %d", self.group, last_seq)
        except TargetdReplError as error:
            log.warning("pair %s: resync copy stopped: %s", self.group, error)
            session.stop(failure=f"resync copy: {error}")


LANE_RETRY_AFTER = 300.0  # seconds a pair whose bulk lane failed to open ships over gRPC only
_TS_AT = 52  # offset of timestamp_ns in a record header (journal_record.py)


def _ship_method(
    channel: grpc.Channel,
) -> Callable[[Iterator[replication_pb2.ShipRequest | bytes]], Any]:
    """The Ship call on `channel` with a request serializer that sends pre-encoded batches
    (wire.encode_batch_request) as they are: the wire format is the generated code's."""
    return channel.stream_stream(
        "/targetd_repl.v1.Replication/Ship",
        request_serializer=wire.serialize_ship_request,
        response_deserializer=replication_pb2.ShipAck.FromString,
    )
