"""The pair state machine as a pure table: (role, state, event) -> Transition.

Pure: no I/O. The orchestration layer (roles/) persists a pair's state and the group's role at
each site, feeds admin commands and system events through `apply`, and performs the returned
actions in order. An absent combination raises IllegalTransition naming the pair, its state and
where the command applies; nothing changes then.

Why the key includes the role
-----------------------------
Each site keeps its own record of the pair (model.PairInfo.state) next to the group's role, and
the same command means different work on each side: `link-lost` makes a primary track writes in
its unsent bitmap but only stops a secondary's receiver; `failover` is legal on a secondary and
meaningless on a primary; `failback` saves and rolls back on the returning old primary and
starts the resync on the new one. Folding the role into the state would double the states users
see; keying the table by (role, state) keeps the seven pair states of the MISSION and makes the
role change explicit in each Transition (`role` is the role after the transition).

Commands are delivered per site. `switchover` goes to the site that becomes primary and
`peer-switchover` to the one that steps down (first, so it refuses writes before the other bumps
the epoch). `failover` and `force-failover` go to the secondary; `failback` and `resolve-*` to
both sites (the survivor gets `resolve-survivor`, the loser `resolve-loser`). The handshake
(replication/handshake.py) turns into events: `in-sync` (nothing to do, resume journal, finish
switchover), `resync-needed` (bitmap resync, full copy), `fenced` at a site whose epoch is stale,
`peer-stale` at the newer one, `split-brain-detected`, and `handshake-refused` (unrelated
histories, no consistent source).

An admin split (`suspended`) stops data, not fencing: when the link returns the sites still
compare epochs (`check-epochs`), so a stale primary is fenced and a split-brain reported at
once; replication itself waits for `resume`.

Idempotence: repeating a role change where it already took effect is a no-op (switchover on the
site that is already primary, failover on a site already swapped, failback or resolve while the
copy they started runs, suspend on a suspended pair, delete on a simplex one), so an
orchestrator killed at any step can rerun the command. `create` is not: on an existing pair it
is refused (AlreadyExists semantics belong to the caller, which compares the peer and mode).

States at a glance (the `swapped` state exists on both sides after a failover: on the new
primary until failback starts, and on the fenced old primary, which refuses writes and waits
for failback). A failover or switchover additionally needs a consistent image (no copy or resync
interrupted on it), and so do `resolve-survivor` and `in-sync`: `apply(..., consistent=False)`
refuses them, whatever the state. The survivor of a resolution becomes primary (a secondary
survivor with a new epoch), so a secondary in `copying` is always the target of a copy and its
`copy-done` adopts the peer's history.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

from targetd_repl.errors import IllegalTransition
from targetd_repl.model import PairState, Role

__all__ = [
    "ADMIN_EVENTS",
    "TABLE",
    "Action",
    "Event",
    "Transition",
    "apply",
    "legal_events",
]


class Event(enum.StrEnum):
    # admin commands
    CREATE = "create"
    SUSPEND = "suspend"
    RESUME = "resume"
    DELETE = "delete"
    SWITCHOVER = "switchover"  # at the site that becomes primary
    FAILOVER = "failover"  # at the secondary, primary unreachable or pair split
    FORCE_FAILOVER = "force-failover"  # failover --force: also while paired
    FAILBACK = "failback"  # at both sites after a failover
    RESOLVE_SURVIVOR = "resolve-survivor"  # resolve --survivor THIS_SITE
    RESOLVE_LOSER = "resolve-loser"  # resolve --survivor OTHER_SITE
    # system events
    COPY_DONE = "copy-done"
    LINK_LOST = "link-lost"
    LINK_RESTORED = "link-restored"
    JOURNAL_OVER_LIMIT = "journal-over-limit"
    JOURNAL_DRAINED = "journal-drained"  # journal records sent; the overflow bitmap remains
    PEER_SWITCHOVER = "peer-switchover"  # the peer takes over by switchover: step down
    BACKLOG_DRAINED = "backlog-drained"  # switchover: the old primary's backlog has arrived
    IN_SYNC = "in-sync"  # handshake: nothing to do / resume the journal / finish switchover
    RESYNC_NEEDED = "resync-needed"  # handshake: bitmap resync or full copy
    FENCED = "fenced"  # handshake: this site's epoch is stale, it must not serve writes
    PEER_STALE = "peer-stale"  # handshake: the peer's epoch is stale and it was told so
    SPLIT_BRAIN_DETECTED = "split-brain-detected"
    HANDSHAKE_REFUSED = "handshake-refused"  # unrelated histories, no consistent source

    @property
    def is_admin(self) -> bool:
        return self in ADMIN_EVENTS


ADMIN_EVENTS: Final = frozenset(
    {
        Event.CREATE,
        Event.SUSPEND,
        Event.RESUME,
        Event.DELETE,
        Event.SWITCHOVER,
        Event.FAILOVER,
        Event.FORCE_FAILOVER,
        Event.FAILBACK,
        Event.RESOLVE_SURVIVOR,
        Event.RESOLVE_LOSER,
    }
)


class Action(enum.StrEnum):
    """Side effects the orchestration layer performs, in the order given."""

    SET_WRITABLE = "set-writable"  # LUNs accept writes (always after BUMP_EPOCH)
    SET_READONLY = "set-readonly"  # LUNs refuse writes (DATA PROTECT)
    START_SENDER = "start-sender"
    STOP_SENDER = "stop-sender"
    START_RECEIVER = "start-receiver"
    STOP_RECEIVER = "stop-receiver"
    START_INITIAL_COPY = "start-initial-copy"  # source side: copy every region
    START_TRACKING_UNSENT = "start-tracking-unsent"  # new writes also go to the unsent bitmap
    START_RESYNC = "start-resync"  # source side: copy what the handshake decided
    CLEAR_RESYNCED_BITMAPS = "clear-resynced-bitmaps"
    MARK_INCONSISTENT = "mark-inconsistent"  # target side: image is not usable until done
    MARK_CONSISTENT = "mark-consistent"
    ADOPT_PEER_HISTORY = "adopt-peer-history"  # take the source's epoch history
    APPLY_RECEIVED = "apply-received"  # apply every record held in the receive journal
    TAKE_RESTART_POINT = "take-restart-point"  # snapshot of the image at takeover (seed 001)
    START_CHANGED_BITMAP = "start-changed-bitmap"
    BUMP_EPOCH = "bump-epoch"  # new history entry naming this site primary
    SWAP_JOURNALS = "swap-journals"  # receive journal <-> transfer journal (seed 004)
    START_COPY_ON_READ = "start-copy-on-read"  # switchover: fetch missing regions on read
    STOP_COPY_ON_READ = "stop-copy-on-read"
    DRAIN_BACKLOG = "drain-backlog"  # old primary: send everything it holds, then stop
    SAVE_DIVERGENT = "save-divergent"  # snapshot what the resync will overwrite
    ROLLBACK_UNSENT = "rollback-unsent"  # unsent regions return to the new primary's data
    RECORD_SURVIVOR = "record-survivor"  # persist the admin's choice until the copy is done
    RUN_HANDSHAKE = "run-handshake"
    CHECK_EPOCHS = "check-epochs"  # handshake for fencing and split-brain only: no data moves
    REPORT_SPLIT_BRAIN = "report-split-brain"
    REPORT_REFUSAL = "report-refusal"
    DELETE_PAIR = "delete-pair"


@dataclass(frozen=True, slots=True)
class Transition:
    state: PairState  # the state after the transition
    role: Role  # the role after the transition
    actions: tuple[Action, ...] = ()

    def is_noop(self, role: Role, state: PairState) -> bool:
        return self.state is state and self.role is role and not self.actions


# --- the table -------------------------------------------------------------------------------

P, S = Role.PRIMARY, Role.SECONDARY
SIMPLEX, COPYING, PAIRED = PairState.SIMPLEX, PairState.COPYING, PairState.PAIRED
SUSPENDED, SUSP_ERR = PairState.SUSPENDED, PairState.SUSPENDED_ERROR
JFULL, SWAPPED = PairState.JOURNAL_FULL, PairState.SWAPPED
E = Event
A = Action

# Promotion of a secondary that lost its primary (seeds 001, 003, 004): apply what it holds,
# keep the restart point, track changes, fence with a new epoch, and only then accept writes.
_FAILOVER: Final = Transition(
    SWAPPED,
    P,
    (
        A.STOP_RECEIVER,
        A.APPLY_RECEIVED,
        A.TAKE_RESTART_POINT,
        A.START_CHANGED_BITMAP,
        A.BUMP_EPOCH,
        A.SWAP_JOURNALS,
        A.SET_WRITABLE,
    ),
)


def _t(state: PairState, role: Role, *actions: Action) -> Transition:
    return Transition(state, role, actions)


TABLE: Final[dict[tuple[Role, PairState, Event], Transition]] = {
    # ---- at the primary ------------------------------------------------------------------------
    (P, SIMPLEX, E.CREATE): _t(COPYING, P, A.START_SENDER, A.START_INITIAL_COPY),
    (P, SIMPLEX, E.DELETE): _t(SIMPLEX, P),
    (P, COPYING, E.COPY_DONE): _t(PAIRED, P, A.CLEAR_RESYNCED_BITMAPS),
    (P, COPYING, E.LINK_LOST): _t(SUSP_ERR, P, A.STOP_SENDER, A.START_TRACKING_UNSENT),
    (P, COPYING, E.SUSPEND): _t(SUSPENDED, P, A.STOP_SENDER, A.START_TRACKING_UNSENT),
    (P, COPYING, E.RESUME): _t(COPYING, P),
    (P, COPYING, E.DELETE): _t(SIMPLEX, P, A.STOP_SENDER, A.DELETE_PAIR),
    (P, COPYING, E.JOURNAL_OVER_LIMIT): _t(JFULL, P, A.START_TRACKING_UNSENT),
    (P, COPYING, E.SWITCHOVER): _t(COPYING, P),
    (P, COPYING, E.FAILBACK): _t(COPYING, P),
    (P, COPYING, E.RESOLVE_SURVIVOR): _t(COPYING, P),
    (P, COPYING, E.FENCED): _t(SWAPPED, S, A.SET_READONLY, A.STOP_SENDER),
    (P, PAIRED, E.LINK_LOST): _t(SUSP_ERR, P, A.STOP_SENDER, A.START_TRACKING_UNSENT),
    (P, PAIRED, E.SUSPEND): _t(SUSPENDED, P, A.STOP_SENDER, A.START_TRACKING_UNSENT),
    (P, PAIRED, E.RESUME): _t(PAIRED, P),
    (P, PAIRED, E.DELETE): _t(SIMPLEX, P, A.STOP_SENDER, A.DELETE_PAIR),
    (P, PAIRED, E.JOURNAL_OVER_LIMIT): _t(JFULL, P, A.START_TRACKING_UNSENT),
    (P, PAIRED, E.SWITCHOVER): _t(PAIRED, P),
    (P, PAIRED, E.PEER_SWITCHOVER): _t(PAIRED, S, A.SET_READONLY, A.DRAIN_BACKLOG),
    (P, PAIRED, E.BACKLOG_DRAINED): _t(
        PAIRED, P, A.STOP_COPY_ON_READ, A.START_SENDER, A.CLEAR_RESYNCED_BITMAPS
    ),
    (P, PAIRED, E.FENCED): _t(SWAPPED, S, A.SET_READONLY, A.STOP_SENDER),
    (P, SUSPENDED, E.SUSPEND): _t(SUSPENDED, P),
    (P, SUSPENDED, E.RESUME): _t(SUSP_ERR, P, A.RUN_HANDSHAKE),
    (P, SUSPENDED, E.DELETE): _t(SIMPLEX, P, A.DELETE_PAIR),
    (P, SUSPENDED, E.LINK_LOST): _t(SUSPENDED, P),
    (P, SUSPENDED, E.LINK_RESTORED): _t(SUSPENDED, P, A.CHECK_EPOCHS),
    (P, SUSPENDED, E.PEER_STALE): _t(SUSPENDED, P),
    (P, SUSPENDED, E.SPLIT_BRAIN_DETECTED): _t(SUSP_ERR, P, A.REPORT_SPLIT_BRAIN),
    (P, SUSPENDED, E.JOURNAL_OVER_LIMIT): _t(SUSPENDED, P),
    (P, SUSPENDED, E.SWITCHOVER): _t(SUSPENDED, P),
    (P, SUSPENDED, E.FENCED): _t(SWAPPED, S, A.SET_READONLY),
    (P, SUSP_ERR, E.LINK_LOST): _t(SUSP_ERR, P),
    (P, SUSP_ERR, E.LINK_RESTORED): _t(SUSP_ERR, P, A.RUN_HANDSHAKE),
    (P, SUSP_ERR, E.IN_SYNC): _t(PAIRED, P, A.START_SENDER),
    (P, SUSP_ERR, E.RESYNC_NEEDED): _t(COPYING, P, A.START_SENDER, A.START_RESYNC),
    (P, SUSP_ERR, E.SUSPEND): _t(SUSPENDED, P),
    (P, SUSP_ERR, E.RESUME): _t(SUSP_ERR, P, A.RUN_HANDSHAKE),
    (P, SUSP_ERR, E.DELETE): _t(SIMPLEX, P, A.DELETE_PAIR),
    (P, SUSP_ERR, E.JOURNAL_OVER_LIMIT): _t(SUSP_ERR, P),
    (P, SUSP_ERR, E.SWITCHOVER): _t(SUSP_ERR, P),
    (P, SUSP_ERR, E.FENCED): _t(SWAPPED, S, A.SET_READONLY),
    (P, SUSP_ERR, E.PEER_STALE): _t(SUSP_ERR, P),
    (P, SUSP_ERR, E.SPLIT_BRAIN_DETECTED): _t(SUSP_ERR, P, A.REPORT_SPLIT_BRAIN),
    (P, SUSP_ERR, E.HANDSHAKE_REFUSED): _t(SUSP_ERR, P, A.REPORT_REFUSAL),
    (P, SUSP_ERR, E.RESOLVE_SURVIVOR): _t(
        COPYING, P, A.RECORD_SURVIVOR, A.START_SENDER, A.START_RESYNC
    ),
    (P, SUSP_ERR, E.RESOLVE_LOSER): _t(
        COPYING,
        S,
        A.RECORD_SURVIVOR,
        A.SET_READONLY,
        A.SAVE_DIVERGENT,
        A.MARK_INCONSISTENT,
        A.START_RECEIVER,
    ),
    (P, JFULL, E.JOURNAL_DRAINED): _t(COPYING, P, A.START_RESYNC),
    (P, JFULL, E.LINK_LOST): _t(SUSP_ERR, P, A.STOP_SENDER),
    (P, JFULL, E.SUSPEND): _t(SUSPENDED, P, A.STOP_SENDER),
    (P, JFULL, E.RESUME): _t(JFULL, P),
    (P, JFULL, E.DELETE): _t(SIMPLEX, P, A.STOP_SENDER, A.DELETE_PAIR),
    (P, JFULL, E.JOURNAL_OVER_LIMIT): _t(JFULL, P),
    (P, JFULL, E.SWITCHOVER): _t(JFULL, P),
    (P, JFULL, E.FENCED): _t(SWAPPED, S, A.SET_READONLY, A.STOP_SENDER),
    (P, SWAPPED, E.FAILOVER): _t(SWAPPED, P),
    (P, SWAPPED, E.FORCE_FAILOVER): _t(SWAPPED, P),
    (P, SWAPPED, E.SWITCHOVER): _t(SWAPPED, P),
    (P, SWAPPED, E.LINK_LOST): _t(SWAPPED, P),
    (P, SWAPPED, E.LINK_RESTORED): _t(SWAPPED, P, A.RUN_HANDSHAKE),
    (P, SWAPPED, E.JOURNAL_OVER_LIMIT): _t(SWAPPED, P),
    (P, SWAPPED, E.PEER_STALE): _t(SWAPPED, P),
    (P, SWAPPED, E.FAILBACK): _t(COPYING, P, A.START_SENDER, A.START_RESYNC),
    (P, SWAPPED, E.DELETE): _t(SIMPLEX, P, A.DELETE_PAIR),
    (P, SWAPPED, E.FENCED): _t(SWAPPED, S, A.SET_READONLY),
    (P, SWAPPED, E.SPLIT_BRAIN_DETECTED): _t(SUSP_ERR, P, A.REPORT_SPLIT_BRAIN),
    (P, SWAPPED, E.HANDSHAKE_REFUSED): _t(SUSP_ERR, P, A.REPORT_REFUSAL),
    # ---- at the secondary ----------------------------------------------------------------------
    (S, SIMPLEX, E.CREATE): _t(COPYING, S, A.SET_READONLY, A.MARK_INCONSISTENT, A.START_RECEIVER),
    (S, SIMPLEX, E.DELETE): _t(SIMPLEX, S),
    (S, COPYING, E.COPY_DONE): _t(
        PAIRED, S, A.MARK_CONSISTENT, A.ADOPT_PEER_HISTORY, A.CLEAR_RESYNCED_BITMAPS
    ),
    (S, COPYING, E.LINK_LOST): _t(SUSP_ERR, S, A.STOP_RECEIVER),
    (S, COPYING, E.SUSPEND): _t(SUSPENDED, S, A.STOP_RECEIVER),
    (S, COPYING, E.RESUME): _t(COPYING, S),
    (S, COPYING, E.DELETE): _t(SIMPLEX, S, A.STOP_RECEIVER, A.DELETE_PAIR),
    (S, COPYING, E.JOURNAL_OVER_LIMIT): _t(JFULL, S),
    (S, COPYING, E.FAILBACK): _t(COPYING, S),
    (S, COPYING, E.RESOLVE_LOSER): _t(COPYING, S),
    (S, COPYING, E.FENCED): _t(SWAPPED, S, A.STOP_RECEIVER),
    (S, PAIRED, E.LINK_LOST): _t(SUSP_ERR, S, A.STOP_RECEIVER),
    (S, PAIRED, E.SUSPEND): _t(SUSPENDED, S, A.STOP_RECEIVER),
    (S, PAIRED, E.RESUME): _t(PAIRED, S),
    (S, PAIRED, E.DELETE): _t(SIMPLEX, S, A.STOP_RECEIVER, A.DELETE_PAIR),
    (S, PAIRED, E.JOURNAL_OVER_LIMIT): _t(JFULL, S),
    (S, PAIRED, E.SWITCHOVER): _t(
        PAIRED,
        P,
        A.BUMP_EPOCH,
        A.SWAP_JOURNALS,
        A.START_CHANGED_BITMAP,
        A.START_COPY_ON_READ,
        A.SET_WRITABLE,
    ),
    (S, PAIRED, E.PEER_SWITCHOVER): _t(PAIRED, S),
    (S, PAIRED, E.BACKLOG_DRAINED): _t(
        PAIRED, S, A.SWAP_JOURNALS, A.ADOPT_PEER_HISTORY, A.START_RECEIVER
    ),
    (S, PAIRED, E.FORCE_FAILOVER): _FAILOVER,
    (S, PAIRED, E.FENCED): _t(SWAPPED, S, A.STOP_RECEIVER),
    (S, SUSPENDED, E.SUSPEND): _t(SUSPENDED, S),
    (S, SUSPENDED, E.RESUME): _t(SUSP_ERR, S, A.RUN_HANDSHAKE),
    (S, SUSPENDED, E.DELETE): _t(SIMPLEX, S, A.DELETE_PAIR),
    (S, SUSPENDED, E.LINK_LOST): _t(SUSPENDED, S),
    (S, SUSPENDED, E.LINK_RESTORED): _t(SUSPENDED, S, A.CHECK_EPOCHS),
    (S, SUSPENDED, E.SPLIT_BRAIN_DETECTED): _t(SUSP_ERR, S, A.REPORT_SPLIT_BRAIN),
    (S, SUSPENDED, E.JOURNAL_OVER_LIMIT): _t(SUSPENDED, S),
    (S, SUSPENDED, E.FAILOVER): _FAILOVER,
    (S, SUSPENDED, E.FORCE_FAILOVER): _FAILOVER,
    (S, SUSPENDED, E.FENCED): _t(SWAPPED, S),
    (S, SUSP_ERR, E.LINK_LOST): _t(SUSP_ERR, S),
    (S, SUSP_ERR, E.LINK_RESTORED): _t(SUSP_ERR, S, A.RUN_HANDSHAKE),
    (S, SUSP_ERR, E.IN_SYNC): _t(PAIRED, S, A.START_RECEIVER),
    (S, SUSP_ERR, E.RESYNC_NEEDED): _t(COPYING, S, A.MARK_INCONSISTENT, A.START_RECEIVER),
    (S, SUSP_ERR, E.SUSPEND): _t(SUSPENDED, S),
    (S, SUSP_ERR, E.RESUME): _t(SUSP_ERR, S, A.RUN_HANDSHAKE),
    (S, SUSP_ERR, E.DELETE): _t(SIMPLEX, S, A.DELETE_PAIR),
    (S, SUSP_ERR, E.JOURNAL_OVER_LIMIT): _t(SUSP_ERR, S),
    (S, SUSP_ERR, E.FAILOVER): _FAILOVER,
    (S, SUSP_ERR, E.FORCE_FAILOVER): _FAILOVER,
    (S, SUSP_ERR, E.FENCED): _t(SWAPPED, S),
    (S, SUSP_ERR, E.SPLIT_BRAIN_DETECTED): _t(SUSP_ERR, S, A.REPORT_SPLIT_BRAIN),
    (S, SUSP_ERR, E.HANDSHAKE_REFUSED): _t(SUSP_ERR, S, A.REPORT_REFUSAL),
    # a survivor that is secondary becomes primary in a new epoch: the data it keeps is served
    # from it, and a secondary in `copying` is then always a copy's target, never its source
    (S, SUSP_ERR, E.RESOLVE_SURVIVOR): _t(
        COPYING,
        P,
        A.RECORD_SURVIVOR,
        A.BUMP_EPOCH,
        A.START_SENDER,
        A.START_RESYNC,
        A.SET_WRITABLE,
    ),
    (S, SUSP_ERR, E.RESOLVE_LOSER): _t(
        COPYING, S, A.RECORD_SURVIVOR, A.SAVE_DIVERGENT, A.MARK_INCONSISTENT, A.START_RECEIVER
    ),
    (S, JFULL, E.JOURNAL_DRAINED): _t(COPYING, S, A.MARK_INCONSISTENT),
    (S, JFULL, E.LINK_LOST): _t(SUSP_ERR, S, A.STOP_RECEIVER),
    (S, JFULL, E.SUSPEND): _t(SUSPENDED, S, A.STOP_RECEIVER),
    (S, JFULL, E.RESUME): _t(JFULL, S),
    (S, JFULL, E.DELETE): _t(SIMPLEX, S, A.STOP_RECEIVER, A.DELETE_PAIR),
    (S, JFULL, E.JOURNAL_OVER_LIMIT): _t(JFULL, S),
    (S, JFULL, E.FORCE_FAILOVER): _FAILOVER,
    (S, JFULL, E.FENCED): _t(SWAPPED, S, A.STOP_RECEIVER),
    (S, SWAPPED, E.LINK_LOST): _t(SWAPPED, S),
    (S, SWAPPED, E.LINK_RESTORED): _t(SWAPPED, S, A.RUN_HANDSHAKE),
    (S, SWAPPED, E.FENCED): _t(SWAPPED, S),
    # the new primary's site is lost too: --force brings the fenced old primary back with what
    # it holds; its new epoch forks the history, and the next handshake reports a split-brain
    (S, SWAPPED, E.FORCE_FAILOVER): _FAILOVER,
    (S, SWAPPED, E.FAILBACK): _t(
        COPYING, S, A.SAVE_DIVERGENT, A.ROLLBACK_UNSENT, A.MARK_INCONSISTENT, A.START_RECEIVER
    ),
    (S, SWAPPED, E.DELETE): _t(SIMPLEX, S, A.DELETE_PAIR),
    (S, SWAPPED, E.SPLIT_BRAIN_DETECTED): _t(SUSP_ERR, S, A.REPORT_SPLIT_BRAIN),
    (S, SWAPPED, E.HANDSHAKE_REFUSED): _t(SUSP_ERR, S, A.REPORT_REFUSAL),
}
del E, A

# Events that need a consistent local image, whatever the table says: becoming primary or a
# copy's source, or declaring the pair in sync.
_NEEDS_CONSISTENT: Final = frozenset(
    {
        Event.SWITCHOVER,
        Event.FAILOVER,
        Event.FORCE_FAILOVER,
        Event.RESOLVE_SURVIVOR,
        Event.IN_SYNC,
    }
)


def legal_events(role: Role, state: PairState) -> frozenset[Event]:
    return frozenset(e for (r, s, e) in TABLE if r is role and s is state)


def _where(event: Event, role: Role) -> str:
    """Where `event` does something (entries that are only idempotent no-ops are left out)."""

    def states(r: Role) -> list[str]:
        return [
            s.value
            for s in PairState
            if (r, s, event) in TABLE and not TABLE[(r, s, event)].is_noop(r, s)
        ]

    here = states(role)
    if here:
        return ", ".join(here)
    other = Role.SECONDARY if role is Role.PRIMARY else Role.PRIMARY
    there = states(other)
    return f"the {other} in {', '.join(there)}" if there else "no state"


def apply(
    state: PairState, event: Event, *, role: Role, pair: str, consistent: bool = True
) -> Transition:
    """The transition for `event` at a site where `pair` is `state` and the group is `role`.

    Raises IllegalTransition (nothing changes) when the table has no entry, or when the event
    would make an inconsistent image primary, a copy's source, or "in sync"."""
    verb = f"cannot {event}" if event.is_admin else f"unexpected {event}"
    here = f"pair {pair!r} is {state} ({role} here)"
    try:
        transition = TABLE[(role, state, event)]
    except KeyError:
        raise IllegalTransition(
            f"{verb}: {here}; {event} applies to {_where(event, role)}"
        ) from None
    if not consistent and event in _NEEDS_CONSISTENT and not transition.is_noop(role, state):
        raise IllegalTransition(
            f"{verb}: {here} with an inconsistent image (a copy or resync into it was"
            " interrupted); resume the pair and let the copy finish first"
        )
    return transition
