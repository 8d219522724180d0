"""The pair state machine: every (role, state, event) combination, structural invariants of the
table, idempotent commands, random event sequences at one site, and a two-site simulation with
an orchestrator (fencing, split-brain, journal-full recovery)."""

from __future__ import annotations

import itertools
import random
import sys
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from targetd_repl.errors import FailedPrecondition, IllegalTransition
from targetd_repl.model import PairState, Role
from targetd_repl.roles.pair_state import (
    ADMIN_EVENTS,
    TABLE,
    Action,
    Event,
    Transition,
    apply,
    legal_events,
)

P, S = Role.PRIMARY, Role.SECONDARY
ALL = list(itertools.product(Role, PairState, Event))
PROMOTIONS = {Event.SWITCHOVER, Event.FAILOVER, Event.FORCE_FAILOVER, Event.RESOLVE_SURVIVOR}


def other(role: Role) -> Role:
    return S if role is P else P


# --- every combination ------------------------------------------------------------------------


@pytest.mark.parametrize(("role", "state", "event"), ALL, ids=str)
def test_every_combination(role: Role, state: PairState, event: Event) -> None:
    key = (role, state, event)
    if key in TABLE:
        t = apply(state, event, role=role, pair="g1")
        assert t == TABLE[key]
        assert isinstance(t.state, PairState) and isinstance(t.role, Role)
        assert len(set(t.actions)) == len(t.actions)  # no action twice
        return
    with pytest.raises(IllegalTransition) as err:
        apply(state, event, role=role, pair="g1")
    msg = str(err.value)
    assert f"pair 'g1' is {state} ({role} here)" in msg
    assert msg.startswith(f"cannot {event}:" if event in ADMIN_EVENTS else f"unexpected {event}:")
    assert f"{event} applies to " in msg
    assert isinstance(err.value, FailedPrecondition)  # the API maps it to FAILED_PRECONDITION


def test_the_briefs_example_message() -> None:
    with pytest.raises(IllegalTransition, match=r"^cannot failback: pair 'g1' is paired"):
        apply(PairState.PAIRED, Event.FAILBACK, role=P, pair="g1")
    with pytest.raises(IllegalTransition) as err:
        apply(PairState.PAIRED, Event.FAILBACK, role=P, pair="g1")
    assert str(err.value).endswith("failback applies to swapped")
    with pytest.raises(IllegalTransition) as err:
        apply(PairState.PAIRED, Event.FAILOVER, role=P, pair="g1")
    assert str(err.value).endswith(
        "failover applies to the secondary in suspended, suspended-error"
    )
    with pytest.raises(IllegalTransition, match="force-failover applies to paired, suspended"):
        apply(PairState.COPYING, Event.FORCE_FAILOVER, role=S, pair="g1")


# --- the flows of the MISSION, spelled out ----------------------------------------------------


def run(role: Role, state: PairState, *events: Event) -> tuple[Role, PairState, list[Action]]:
    done: list[Action] = []
    for e in events:
        t = apply(state, e, role=role, pair="g1")
        role, state = t.role, t.state
        done += t.actions
    return role, state, done


def test_create_copy_and_pair() -> None:
    assert run(P, PairState.SIMPLEX, Event.CREATE, Event.COPY_DONE) == (
        P,
        PairState.PAIRED,
        [Action.START_SENDER, Action.START_INITIAL_COPY, Action.CLEAR_RESYNCED_BITMAPS],
    )
    r, st_, acts = run(S, PairState.SIMPLEX, Event.CREATE, Event.COPY_DONE)
    assert (r, st_) == (S, PairState.PAIRED)
    assert acts.index(Action.MARK_INCONSISTENT) < acts.index(Action.MARK_CONSISTENT)
    assert Action.ADOPT_PEER_HISTORY in acts


def test_failover_and_failback_at_both_sites() -> None:
    # the secondary loses its primary and takes over
    r, st_, acts = run(S, PairState.PAIRED, Event.LINK_LOST, Event.FAILOVER)
    assert (r, st_) == (P, PairState.SWAPPED)
    assert acts[-1] is Action.SET_WRITABLE
    for a in (Action.APPLY_RECEIVED, Action.TAKE_RESTART_POINT, Action.START_CHANGED_BITMAP):
        assert acts.index(a) < acts.index(Action.BUMP_EPOCH) < acts.index(Action.SET_WRITABLE)
    # the old primary kept writing, then learns it is stale
    r2, st2, acts2 = run(P, PairState.PAIRED, Event.LINK_LOST, Event.LINK_RESTORED, Event.FENCED)
    assert (r2, st2) == (S, PairState.SWAPPED)
    assert Action.START_TRACKING_UNSENT in acts2 and Action.SET_READONLY in acts2
    # failback at both, then the copy completes: paired in the reversed direction
    assert run(r, st_, Event.FAILBACK, Event.COPY_DONE)[:2] == (P, PairState.PAIRED)
    r3, st3, acts3 = run(r2, st2, Event.FAILBACK, Event.COPY_DONE)
    assert (r3, st3) == (S, PairState.PAIRED)
    assert acts3[:2] == [Action.SAVE_DIVERGENT, Action.ROLLBACK_UNSENT]
    assert Action.ADOPT_PEER_HISTORY in acts3


def test_switchover_steps_down_first_then_promotes() -> None:
    old = apply(PairState.PAIRED, Event.PEER_SWITCHOVER, role=P, pair="g1")
    assert (old.role, old.state) == (S, PairState.PAIRED)
    assert old.actions[0] is Action.SET_READONLY
    new = apply(PairState.PAIRED, Event.SWITCHOVER, role=S, pair="g1")
    assert (new.role, new.state) == (P, PairState.PAIRED)
    assert new.actions[0] is Action.BUMP_EPOCH and new.actions[-1] is Action.SET_WRITABLE
    assert Action.START_COPY_ON_READ in new.actions
    assert Action.ADOPT_PEER_HISTORY in TABLE[(S, PairState.PAIRED, Event.BACKLOG_DRAINED)].actions


def test_journal_full_resyncs_by_itself() -> None:
    r, st_, acts = run(
        P, PairState.PAIRED, Event.JOURNAL_OVER_LIMIT, Event.JOURNAL_DRAINED, Event.COPY_DONE
    )
    assert (r, st_) == (P, PairState.PAIRED)
    assert acts == [
        Action.START_TRACKING_UNSENT,
        Action.START_RESYNC,
        Action.CLEAR_RESYNCED_BITMAPS,
    ]


def test_split_brain_then_resolve() -> None:
    r, st_, acts = run(P, PairState.SWAPPED, Event.SPLIT_BRAIN_DETECTED)
    assert (r, st_, acts) == (P, PairState.SUSPENDED_ERROR, [Action.REPORT_SPLIT_BRAIN])
    loser = apply(st_, Event.RESOLVE_LOSER, role=P, pair="g1")
    assert (loser.role, loser.state) == (S, PairState.COPYING)
    assert loser.actions.index(Action.SET_READONLY) < loser.actions.index(Action.SAVE_DIVERGENT)
    survivor = apply(PairState.SUSPENDED_ERROR, Event.RESOLVE_SURVIVOR, role=S, pair="g1")
    assert (survivor.role, survivor.state) == (P, PairState.COPYING)
    assert survivor.actions.index(Action.BUMP_EPOCH) < survivor.actions.index(Action.SET_WRITABLE)


def test_inconsistent_image_cannot_become_primary_source_or_in_sync() -> None:
    for event in (Event.FAILOVER, Event.FORCE_FAILOVER, Event.RESOLVE_SURVIVOR, Event.IN_SYNC):
        with pytest.raises(IllegalTransition, match="inconsistent image"):
            apply(PairState.SUSPENDED_ERROR, event, role=S, pair="g1", consistent=False)
    with pytest.raises(IllegalTransition, match="inconsistent image"):
        apply(PairState.PAIRED, Event.SWITCHOVER, role=S, pair="g1", consistent=False)
    # an already-done promotion stays an idempotent no-op, and other events are unaffected
    assert apply(PairState.SWAPPED, Event.FAILOVER, role=P, pair="g1", consistent=False)
    t = apply(PairState.SUSPENDED_ERROR, Event.RESYNC_NEEDED, role=S, pair="g1", consistent=False)
    assert t.state is PairState.COPYING


# --- invariants of the table ------------------------------------------------------------------


def test_swapped_is_entered_only_by_failover_or_fencing() -> None:
    for (role, state, event), t in TABLE.items():
        if t.state is PairState.SWAPPED and state is not PairState.SWAPPED:
            if t.role is P:
                assert event in (Event.FAILOVER, Event.FORCE_FAILOVER), (role, state, event)
            else:
                assert event is Event.FENCED, (role, state, event)


def test_journal_full_never_returns_to_paired_without_a_resync() -> None:
    for (role, state, event), t in TABLE.items():
        if state is PairState.JOURNAL_FULL:
            assert t.state is not PairState.PAIRED, (role, event)
            if event is Event.JOURNAL_DRAINED:
                assert t.state is PairState.COPYING


def test_role_changes_fence_and_unfence_in_the_right_order() -> None:
    for (role, state, event), t in TABLE.items():
        acts = t.actions
        if role is S and t.role is P:
            assert event in PROMOTIONS, (state, event)
            assert Action.BUMP_EPOCH in acts and acts[-1] is Action.SET_WRITABLE, (state, event)
        if role is P and t.role is S:
            assert Action.SET_READONLY in acts, (state, event)
            assert Action.SET_WRITABLE not in acts
        if t.role is S:
            assert Action.SET_WRITABLE not in acts and Action.BUMP_EPOCH not in acts
        if t.role is P:
            assert Action.SET_READONLY not in acts
            assert Action.MARK_INCONSISTENT not in acts  # a primary is never a copy's target


def test_copying_at_the_secondary_is_always_a_target() -> None:
    for (role, state, event), t in TABLE.items():
        if t.role is S and t.state is PairState.COPYING and state is not PairState.COPYING:
            assert Action.MARK_INCONSISTENT in t.actions, (role, state, event)
            assert Action.START_SENDER not in t.actions
        if role is S and state is PairState.COPYING and t.state is PairState.PAIRED:
            assert {Action.MARK_CONSISTENT, Action.ADOPT_PEER_HISTORY} <= set(t.actions)


def test_every_pair_can_be_deleted_and_hear_link_and_fencing_events() -> None:
    for role, state in itertools.product(Role, PairState):
        legal = legal_events(role, state)
        assert Event.DELETE in legal
        assert TABLE[(role, state, Event.DELETE)].state is PairState.SIMPLEX
        if state is not PairState.SIMPLEX:
            assert {Event.LINK_LOST, Event.FENCED} <= legal, (role, state)
        else:
            assert legal <= {Event.CREATE, Event.DELETE}


def test_every_state_is_reachable_and_can_get_back_to_paired() -> None:
    graph: dict[tuple[Role, PairState], set[tuple[Role, PairState]]] = {}
    for (role, state, _), t in TABLE.items():
        graph.setdefault((role, state), set()).add((t.role, t.state))

    def reach(start: set[tuple[Role, PairState]]) -> set[tuple[Role, PairState]]:
        seen, todo = set(start), deque(start)
        while todo:
            for nxt in graph.get(todo.popleft(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    reachable = reach({(P, PairState.SIMPLEX), (S, PairState.SIMPLEX)})
    assert reachable == set(itertools.product(Role, PairState))
    for node in reachable:
        assert {(P, PairState.PAIRED), (S, PairState.PAIRED)} & reach({node}), node


# --- idempotence ------------------------------------------------------------------------------


@pytest.mark.parametrize("event", sorted(ADMIN_EVENTS - {Event.CREATE}))
def test_admin_commands_are_idempotent(event: Event) -> None:
    """Repeating a command where it took effect leaves role and state as they are, so a killed
    orchestrator can rerun it; role changes repeat as pure no-ops."""
    for (role, state, ev), first in TABLE.items():
        if ev is not event:
            continue
        again = apply(first.state, event, role=first.role, pair="g1")
        assert (again.role, again.state) == (first.role, first.state), (role, state)
        if event is not Event.RESUME:
            assert again.is_noop(first.role, first.state), (role, state, again)


def test_create_is_not_repeatable() -> None:
    t = apply(PairState.SIMPLEX, Event.CREATE, role=P, pair="g1")
    with pytest.raises(IllegalTransition, match="create applies to simplex"):
        apply(t.state, Event.CREATE, role=t.role, pair="g1")


def test_switchover_on_an_already_switched_pair_is_a_noop() -> None:
    new = apply(PairState.PAIRED, Event.SWITCHOVER, role=S, pair="g1")
    assert apply(new.state, Event.SWITCHOVER, role=new.role, pair="g1") == Transition(
        PairState.PAIRED, P
    )
    old = apply(PairState.PAIRED, Event.PEER_SWITCHOVER, role=P, pair="g1")
    assert apply(old.state, Event.PEER_SWITCHOVER, role=old.role, pair="g1").is_noop(
        S, PairState.PAIRED
    )


# --- random event sequences at one site -------------------------------------------------------


@dataclass
class OneSite:
    role: Role
    state: PairState = PairState.SIMPLEX
    writable: bool = False
    consistent: bool = True
    trail: list[tuple[PairState, Event]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.writable = self.role is P

    def step(self, event: Event) -> None:
        before = (self.role, self.state)
        try:
            t = apply(self.state, event, role=self.role, pair="g1", consistent=self.consistent)
        except IllegalTransition as e:
            assert str(self.state) in str(e)
            assert (self.role, self.state) == before
            return
        for a in t.actions:
            if a is Action.SET_WRITABLE:
                self.writable = True
            elif a is Action.SET_READONLY:
                self.writable = False
            elif a is Action.MARK_INCONSISTENT:
                self.consistent = False
            elif a is Action.MARK_CONSISTENT:
                self.consistent = True
        self.trail.append((self.state, event))
        self.role, self.state = t.role, t.state


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(Role), st.lists(st.sampled_from(Event), max_size=60))
def test_random_event_sequences_keep_the_invariants(role: Role, events: list[Event]) -> None:
    site = OneSite(role)
    for event in events:
        site.step(event)
        assert site.writable == (site.role is P)  # only a primary accepts writes
        if site.role is P:
            assert site.consistent  # a primary never serves an inconsistent image
        if site.state is PairState.PAIRED:
            assert site.consistent
        if site.trail and site.trail[-1][0] is PairState.JOURNAL_FULL:
            assert site.state is not PairState.PAIRED  # journal-full resyncs first


# --- two sites and an orchestrator -------------------------------------------------------------

Gen = tuple[int, str]


@dataclass
class Node:
    name: str
    role: Role
    history: list[Gen]
    state: PairState = PairState.SIMPLEX
    writable: bool = False
    consistent: bool = True
    overflowed: bool = False  # journal overflowed since the peer was last in sync
    full_pending: bool = False  # went journal-full and has not resynced since

    def __post_init__(self) -> None:
        self.writable = self.role is P

    @property
    def gen(self) -> Gen | None:
        return self.history[-1] if self.history else None


@dataclass
class Pair:
    a: Node
    b: Node
    link: bool = True

    def nodes(self) -> tuple[Node, Node]:
        return self.a, self.b

    def peer(self, n: Node) -> Node:
        return self.b if n is self.a else self.a


def deliver(pair: Pair, n: Node, event: Event) -> bool:
    try:
        t = apply(n.state, event, role=n.role, pair="g1", consistent=n.consistent)
    except IllegalTransition:
        return False
    peer = pair.peer(n)
    for act in t.actions:
        if act is Action.BUMP_EPOCH:
            epoch = max(g[0] for g in n.history) + 1 if n.history else 1
            n.history = [*n.history, (epoch, n.name)]
        elif act is Action.ADOPT_PEER_HISTORY:
            n.history = list(peer.history)
        elif act is Action.SET_WRITABLE:
            n.writable = True
        elif act is Action.SET_READONLY:
            n.writable = False
        elif act is Action.MARK_INCONSISTENT:
            n.consistent = False
        elif act is Action.MARK_CONSISTENT:
            n.consistent = True
        elif act is Action.START_RESYNC:
            n.overflowed = peer.overflowed = False
    if t.state is PairState.JOURNAL_FULL:
        n.full_pending = True
    if t.state is PairState.COPYING:
        n.full_pending = False
    if t.state is PairState.PAIRED and n.state is not PairState.PAIRED:
        assert not n.full_pending, "journal-full came back to paired without a resync"
    n.role, n.state = t.role, t.state
    return True


def handshake(pair: Pair) -> None:
    """What replication/handshake.py would say, reduced to generations."""
    a, b = pair.nodes()
    if not pair.link or PairState.SIMPLEX in (a.state, b.state):
        return
    if a.gen is not None and b.gen is not None and a.gen != b.gen:
        if a.gen in b.history or b.gen in a.history:
            stale, newer = (a, b) if a.gen in b.history else (b, a)
            deliver(pair, stale, Event.FENCED)
            deliver(pair, newer, Event.PEER_STALE)
            return
        for n in (a, b):
            deliver(pair, n, Event.SPLIT_BRAIN_DETECTED)
        return
    if PairState.SUSPENDED in (a.state, b.state):
        return  # an admin split: epochs were checked, data waits for resume
    if PairState.SWAPPED in (a.state, b.state):
        return  # waits for the failback command
    behind = a.overflowed or b.overflowed or not (a.consistent and b.consistent)
    event = Event.RESYNC_NEEDED if behind or a.gen is None or b.gen is None else Event.IN_SYNC
    for n in (a, b):
        deliver(pair, n, event)


def orchestrate(pair: Pair, op: str, who: Node) -> None:
    a, b = pair.nodes()
    other_ = pair.peer(who)
    if (
        op == "create"
        and pair.link
        and a.state is b.state is PairState.SIMPLEX
        and a.role != b.role
    ):
        primary = a if a.role is P else b
        if not primary.history:
            primary.history = [(1, primary.name)]
        for n in (a, b):
            deliver(pair, n, Event.CREATE)
    elif op in ("suspend", "delete"):
        for n in (a, b):
            deliver(pair, n, Event(op))
    elif op == "resume":
        for n in (a, b):
            deliver(pair, n, Event.RESUME)
        handshake(pair)
    elif op == "switchover" and pair.link and who.role is S and who.consistent:
        if deliver(pair, other_, Event.PEER_SWITCHOVER):  # step down first
            assert deliver(pair, who, Event.SWITCHOVER)
            deliver(pair, other_, Event.BACKLOG_DRAINED)
            deliver(pair, who, Event.BACKLOG_DRAINED)
    elif op == "switchover-cut" and pair.link and who.role is P:
        # the old primary stepped down, then the link dropped before the other side took over
        if deliver(pair, who, Event.PEER_SWITCHOVER):
            orchestrate(pair, "link-down", who)
    elif op == "failover" and not pair.link:
        deliver(pair, who, Event.FAILOVER)
    elif op == "force-failover" and deliver(pair, who, Event.FORCE_FAILOVER) and pair.link:
        deliver(pair, other_, Event.FENCED)  # the next message carries the newer epoch
    elif op == "failback" and pair.link and PairState.SWAPPED in (a.state, b.state):
        if a.gen is not None and b.gen is not None and (a.gen in b.history or b.gen in a.history):
            for n in (a, b):
                deliver(pair, n, Event.FAILBACK)
    elif op == "resolve" and pair.link:
        if all(n.state is PairState.SUSPENDED_ERROR for n in (a, b)) and who.consistent:
            deliver(pair, other_, Event.RESOLVE_LOSER)  # the loser demotes first
            deliver(pair, who, Event.RESOLVE_SURVIVOR)
    elif op == "link-down" and pair.link:
        pair.link = False
        for n in (a, b):
            deliver(pair, n, Event.LINK_LOST)
    elif op == "link-up" and not pair.link:
        pair.link = True
        for n in (a, b):
            deliver(pair, n, Event.LINK_RESTORED)
        handshake(pair)
    elif op == "journal-over-limit" and pair.link and who.role is P:
        if deliver(pair, who, Event.JOURNAL_OVER_LIMIT):
            who.overflowed = True
            deliver(pair, other_, Event.JOURNAL_OVER_LIMIT)
    elif op == "journal-over-limit" and who.role is P and who.state is not PairState.SIMPLEX:
        who.overflowed = True  # disconnected: the overflow goes to the unsent bitmap
    elif op == "journal-drained" and pair.link:
        for n in (a, b):
            deliver(pair, n, Event.JOURNAL_DRAINED)
    elif op == "copy-done" and pair.link and a.state is b.state is PairState.COPYING:
        source = a if a.role is P else b
        for n in (source, pair.peer(source)):  # the source finishes first
            deliver(pair, n, Event.COPY_DONE)
    elif op == "handshake":
        handshake(pair)


OPS = [
    "create", "suspend", "resume", "delete", "switchover", "failover", "force-failover",
    "failback", "resolve", "link-down", "link-up", "journal-over-limit", "journal-drained",
    "copy-done", "copy-done", "handshake", "switchover-cut",
]  # fmt: skip


def check_pair(pair: Pair) -> None:
    writers = [n for n in pair.nodes() if n.writable]
    for n in pair.nodes():
        assert n.writable == (n.role is P)
        if n.writable and n.state is not PairState.SIMPLEX:
            assert n.gen is not None and n.gen[1] == n.name, n  # writes in its own epoch
    if len(writers) == 2 and all(n.state is not PairState.SIMPLEX for n in writers):
        assert writers[0].gen != writers[1].gen
        if pair.link:  # connected: never a stale writer, only an unresolved split-brain
            x, y = writers
            assert x.gen not in y.history and y.gen not in x.history, (x, y)
            stopped = (PairState.SUSPENDED_ERROR, PairState.SUSPENDED)
            assert x.state in stopped and y.state in stopped, (x, y)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(OPS), st.booleans()), min_size=1, max_size=70))
def test_two_sites_never_have_two_writers_in_one_generation(ops: list[tuple[str, bool]]) -> None:
    pair = Pair(Node("A", P, []), Node("B", S, []))
    for op, first in ops:
        orchestrate(pair, op, pair.a if first else pair.b)
        check_pair(pair)


def test_two_site_sweep_reaches_the_role_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    """A seeded sweep of uniform random runs (cheaper per run than hypothesis): every run keeps
    the invariants, and together they exercise most of the table, split-brain included."""
    seen: set[tuple[Role, PairState, Event]] = set()
    real = apply

    def spy(state: PairState, event: Event, **kw: Any) -> Transition:
        t = real(state, event, **kw)
        seen.add((kw["role"], state, event))
        return t

    monkeypatch.setattr(sys.modules[__name__], "apply", spy)
    rng = random.Random(7)
    for _ in range(2500):
        pair = Pair(Node("A", P, []), Node("B", S, []))
        for _ in range(rng.randint(1, 70)):
            orchestrate(pair, rng.choice(OPS), rng.choice(pair.nodes()))
            check_pair(pair)
    wanted = {
        (S, PairState.SUSPENDED_ERROR, Event.FAILOVER),
        (S, PairState.SWAPPED, Event.FORCE_FAILOVER),
        (P, PairState.SUSPENDED_ERROR, Event.FENCED),
        (P, PairState.SWAPPED, Event.FAILBACK),
        (S, PairState.SWAPPED, Event.FAILBACK),
        (P, PairState.SUSPENDED_ERROR, Event.SPLIT_BRAIN_DETECTED),
        (P, PairState.SUSPENDED_ERROR, Event.RESOLVE_LOSER),
        (P, PairState.SUSPENDED_ERROR, Event.RESOLVE_SURVIVOR),
        (P, PairState.JOURNAL_FULL, Event.JOURNAL_DRAINED),
        (S, PairState.PAIRED, Event.SWITCHOVER),
        (P, PairState.PAIRED, Event.PEER_SWITCHOVER),
        (S, PairState.COPYING, Event.COPY_DONE),
    }
    assert wanted <= seen, sorted(map(str, wanted - seen))
    assert len(seen) >= 0.8 * len(TABLE), len(seen)
