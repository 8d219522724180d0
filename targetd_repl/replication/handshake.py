"""The handshake on every (re)connect: two sites compare epoch histories and journal positions
and decide what must move, in which direction, or refuse.

Pure: no I/O, no clock, no threads. The replication layer builds a `HandshakeView` from the
site's metadata, journal and bitmaps, exchanges it with the peer, and both sites call
`decide(local, peer)`. Because every field of the result names sites, never "local" or "peer",
`decide(a, b) == decide(b, a)`: both sites reach the same decision without another round trip.

The model, after DRBD's generation identifiers
-------------------------------------------------
* A *generation* is one `EpochEntry`: (epoch, primary_site, started_at, prev_last_seq). It is
  created once, by the site that becomes primary (pair creation, switchover, failover), and copied
  verbatim by the peer when it joins. Two entries are the same generation only when all four
  fields match, so two sites that both promoted themselves to "epoch 5" are two generations. This
  is DRBD's *current UUID*; the history is its *history UUIDs* (we keep all of it).
* Sequence numbers continue across generations: a generation's writes start at its
  `prev_last_seq + 1`, and `prev_last_seq` is where its creator's image stood in the previous
  generation (the restart point of seed 001 after a failover). Every write a primary acknowledges
  gets a sequence number, even when the journal is full and only the unsent bitmap records it.
* The *unsent bitmap* covers every region this site wrote with a sequence number above its
  `acked_seq` (seeds 000/003: first difference information). The *changed bitmap* covers every
  region this site wrote since its current generation began, and is kept until the peer joins
  that generation (seeds 001/003: second difference information). Together they play DRBD's
  *bitmap UUID*: each tracks changes against a known point of the shared history.
* A site's image is *consistent* unless it is the target of an unfinished copy or resync. A
  target adopts the source's history only when the copy completes; during a journal resume (which
  keeps it consistent) it adopts each generation as the replay reaches that generation's start
  (its `prev_last_seq`: the journal's epoch markers), so its history never claims a generation
  its image has not reached. An interrupted copy or replay therefore meets the same rule on the
  next handshake and resumes.

How a decision is reached
-------------------------
`_situation` classifies the two histories into one `Relation` (like DRBD's `uuid_compare`):
none, one-sided, unrelated, the same generation, one side stale (its current generation is an
ancestor of the other's), or forked (each side has generations the other lacks). It orients the
pair (which site would be the source, which the target), works out the common point of their
images, which bitmaps cover the differences, and the set of facts (`Cond`) that hold. `RULES`
is the decision table: rows are checked in order and the first whose conditions all hold fires.
The table is written out for users, with an example per row, in docs/handshake.md;
`table_markdown()` renders it from the data so the two never disagree.

Safety, in one paragraph: a site whose claim to the primary role is older than the peer's
current generation is fenced first (it must not serve writes); a stale site's writes after the
split are rolled back to the newer generation's data, saved in a snapshot first; two independent
forks that both wrote are a split-brain and nothing moves until an admin names the survivor
(`resolve`); a copy never starts from an inconsistent image; whenever a bitmap cannot be shown to
cover every difference, the decision falls back to a full copy (and saves the target's image if
it might hold writes the source lacks).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Final, NamedTuple

from targetd_repl.errors import InvalidArgument
from targetd_repl.model import EpochEntry, Role, SnapshotKind, check_name

__all__ = [
    "RULES",
    "Action",
    "BitmapKind",
    "BitmapRef",
    "Cond",
    "HandshakeDecision",
    "HandshakeView",
    "Point",
    "Relation",
    "Rule",
    "Save",
    "decide",
    "generation_key",
    "resolve",
    "table_markdown",
]


# --- vocabulary ---------------------------------------------------------------------------------


class Action(enum.StrEnum):
    """What the pair does after the handshake."""

    NOTHING_TO_DO = "nothing-to-do"  # same data; replication continues at resume_seq
    RESUME_JOURNAL = "resume-journal"  # source ships its journal from resume_seq
    BITMAP_RESYNC = "bitmap-resync"  # source copies the union of `bitmaps` to target
    FULL_COPY = "full-copy"  # source copies every region to target
    FINISH_SWITCHOVER = "finish-switchover"  # old primary sends its backlog to the new one
    STALE_PEER_MUST_DEMOTE = "stale-peer-must-demote"  # fence `fence` first, then after_fence
    SPLIT_BRAIN = "split-brain"  # refuse until an admin names the survivor
    UNRELATED = "unrelated"  # histories share nothing: refuse until resolve
    NO_PRIMARY = "no-primary"  # neither side has a history: nothing to copy from
    NO_CONSISTENT_SOURCE = "no-consistent-source"  # the only source is unusable

    @property
    def refuses(self) -> bool:
        """The pair stays disconnected until an admin acts."""
        return self in _REFUSALS

    @property
    def moves_data(self) -> bool:
        return self in _MOVES_DATA


_REFUSALS: Final = frozenset(
    {Action.SPLIT_BRAIN, Action.UNRELATED, Action.NO_PRIMARY, Action.NO_CONSISTENT_SOURCE}
)
_MOVES_DATA: Final = frozenset(
    {Action.RESUME_JOURNAL, Action.BITMAP_RESYNC, Action.FULL_COPY, Action.FINISH_SWITCHOVER}
)


class BitmapKind(enum.StrEnum):
    UNSENT = "unsent"  # regions this site wrote above its acked_seq
    CHANGED = "changed"  # regions this site wrote since its current generation began


@dataclass(frozen=True, slots=True, order=True)
class BitmapRef:
    """One site's bitmap. A resync copies the union of the regions of all listed bitmaps."""

    site: str
    kind: BitmapKind

    def __str__(self) -> str:
        return f"{self.site}'s {self.kind} bitmap"


class Save(enum.StrEnum):
    """What the target keeps in a snapshot before the copy overwrites it (never destroyed)."""

    NONE = "none"  # the target holds nothing the source lacks
    DIVERGENT = "divergent"  # the regions of the target's own bitmaps listed in `bitmaps`
    WHOLE = "whole"  # the whole image: which regions differ is not known


class Point(NamedTuple):
    """A position in a write history: generation epoch and sequence number."""

    epoch: int
    seq: int


GenerationKey = tuple[int, str, float, int]


def generation_key(entry: EpochEntry) -> GenerationKey:
    """The identity of a generation across sites (group ids are site-local and not part of it)."""
    return (entry.epoch, entry.primary_site, entry.started_at, entry.prev_last_seq)


# --- the view each site sends --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HandshakeView:
    """What one site knows about one group, as exchanged on every (re)connect.

    history: the epoch history, oldest first (empty on a site that never joined a pair).
    last_seq: the highest sequence number in this site's image, written here as primary or
        received as secondary (a secondary's *received* seq: it applies the rest locally).
    applied_seq: the highest seq applied to the volumes (informational: <= last_seq).
    acked_seq: the highest seq the peer is known to hold every record up to (on a secondary,
        which received its records from the peer, this is last_seq).
    journal_first_seq: the lowest seq from which this site's journal holds every record through
        last_seq without a gap (last_seq + 1 when it holds none: trimmed or overflowed).
    has_unsent / has_changed: the unsent / changed bitmap is non-empty (or, for unsent, records
        above acked_seq exist).
    clean_shutdown: the site's last stop was orderly. Decisions do not depend on it (the journal
        is write-ahead and bitmap bits are set before the write they cover is acknowledged, so
        both survive a crash as supersets); reasons mention it when a site lost records.
    consistent: False while this site is the target of an unfinished copy or resync.
    backlog_from_seq: on a new primary whose switchover has not finished draining, the first seq
        of the previous generation it still lacks (None otherwise).
    survivor: an admin's pending split-brain resolution naming the site whose data is kept;
        persisted until the resync it starts completes.
    """

    site: str
    group: str
    role: Role
    history: tuple[EpochEntry, ...]
    last_seq: int
    acked_seq: int
    journal_first_seq: int
    applied_seq: int = 0
    has_unsent: bool = False
    has_changed: bool = False
    clean_shutdown: bool = True
    consistent: bool = True
    backlog_from_seq: int | None = None
    survivor: str | None = None

    def __post_init__(self) -> None:
        check_name("site", self.site)
        check_name("group", self.group)
        if self.survivor is not None:
            check_name("site", self.survivor)
        who = f"handshake view of group {self.group!r} from site {self.site!r}"
        for prev, entry in zip(self.history, self.history[1:], strict=False):
            if entry.epoch <= prev.epoch:
                raise InvalidArgument(f"{who}: epochs must grow ({prev.epoch} then {entry.epoch})")
            if entry.prev_last_seq < prev.prev_last_seq:
                raise InvalidArgument(
                    f"{who}: epoch {entry.epoch} starts before epoch {prev.epoch}"
                )
        for entry in self.history:
            check_name("site", entry.primary_site)
            if entry.prev_last_seq < 0:
                raise InvalidArgument(f"{who}: epoch {entry.epoch} has a negative prev_last_seq")
        if min(self.last_seq, self.acked_seq, self.applied_seq) < 0:
            raise InvalidArgument(f"{who}: sequence numbers cannot be negative")
        if self.acked_seq > self.last_seq or self.applied_seq > self.last_seq:
            raise InvalidArgument(
                f"{who}: acked_seq {self.acked_seq} and applied_seq {self.applied_seq}"
                f" cannot pass last_seq {self.last_seq}"
            )
        if not 1 <= self.journal_first_seq <= self.last_seq + 1:
            raise InvalidArgument(
                f"{who}: journal_first_seq {self.journal_first_seq} must lie in"
                f" 1..{self.last_seq + 1}"
            )
        if self.last_seq > self.acked_seq and not self.has_unsent:
            raise InvalidArgument(
                f"{who}: seqs {self.acked_seq + 1}..{self.last_seq} are not acknowledged,"
                " so has_unsent must be set"
            )
        cur = self.current
        if cur is None:
            if self.role is Role.PRIMARY:
                raise InvalidArgument(f"{who}: a primary must have an epoch history")
            if self.has_changed or self.backlog_from_seq is not None:
                raise InvalidArgument(f"{who}: a changed bitmap or backlog needs a history")
            return
        own = cur.primary_site == self.site
        if self.has_changed and not own:
            raise InvalidArgument(
                f"{who}: a changed bitmap exists only on the primary of the current epoch"
            )
        if self.backlog_from_seq is not None and not (
            own and 1 <= self.backlog_from_seq <= cur.prev_last_seq
        ):
            raise InvalidArgument(
                f"{who}: backlog_from_seq {self.backlog_from_seq} must name a seq of the"
                f" previous epoch (1..{cur.prev_last_seq}) on the primary of epoch {cur.epoch}"
            )

    @property
    def current(self) -> EpochEntry | None:
        return self.history[-1] if self.history else None

    @property
    def epoch(self) -> int:
        return self.history[-1].epoch if self.history else 0


# --- the decision -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HandshakeDecision:
    """The outcome both sites agree on. Sites are named, never "local"/"peer".

    rule: the id of the table row that fired (docs/handshake.md lists them).
    source / target: the data direction (None when nothing moves or the handshake refuses).
    resume_seq: RESUME_JOURNAL: first seq the source sends; NOTHING_TO_DO: the next seq
        replication continues with; FINISH_SWITCHOVER from the journal: first backlog seq.
    bitmaps: the bitmaps whose union of regions a BITMAP_RESYNC (or a FINISH_SWITCHOVER without
        journal) copies from source to target.
    save / save_kind: what the target snapshots before it is overwritten.
    common: the last point of history both images share (the restart point of a failback).
    fence: a site that must demote (refuse writes, role secondary) before anything else.
    after_fence: what follows once `fence` has demoted (STALE_PEER_MUST_DEMOTE only).

    A target adopts the source's epoch history when a BITMAP_RESYNC or FULL_COPY completes. For
    RESUME_JOURNAL and NOTHING_TO_DO it follows the journal: it drops any generation the source
    lacks and adopts each of the source's generations once its image reaches that generation's
    start (prev_last_seq) - those it has already reached, at once.
    """

    action: Action
    rule: str
    reason: str
    source: str | None = None
    target: str | None = None
    resume_seq: int | None = None
    bitmaps: tuple[BitmapRef, ...] = ()
    save: Save = Save.NONE
    save_kind: SnapshotKind | None = None
    common: Point | None = None
    fence: str | None = None
    after_fence: HandshakeDecision | None = None

    @property
    def target_adopts_history_with_journal(self) -> bool:
        """True: adopt generation by generation as the replay passes each start; False: adopt
        the whole history when the copy completes (or nothing moves)."""
        return self.action in (Action.RESUME_JOURNAL, Action.NOTHING_TO_DO)


# --- the decision table -----------------------------------------------------------------------


class Relation(enum.StrEnum):
    """How the two epoch histories relate (the first column of the table)."""

    RESOLUTION = "resolution"  # an admin named a survivor: keep its data
    NO_HISTORY = "no-history"  # neither side has an epoch history
    ONE_HISTORY = "one-history"  # only one side has a history: a new (or rebuilt) peer
    UNRELATED = "unrelated"  # both have histories with no generation in common
    SAME = "same"  # both are in the same current generation
    STALE = "stale"  # one side's current generation is an ancestor of the other's
    FORKED = "forked"  # both have generations the other lacks, after a common one


class Cond(enum.StrEnum):
    """The facts a row may require. `source` and `target` are the orientation the relation
    gives (see `Rule`); each fact is computed by `_situation`."""

    CONFLICTING_SURVIVORS = "the two sites name different survivors"
    SOURCE_INCONSISTENT = "the source's image is inconsistent (an unfinished copy)"
    SOURCE_DRAINING = "the source still lacks part of a switchover backlog"
    TARGET_DRAINING = "the target still lacks part of a switchover backlog"
    TARGET_CLAIMS_PRIMARY = "the target claims the primary role"
    TARGET_AHEAD = "the target holds seqs the writer of the generation lacks"
    TARGET_DIVERGED = "the target holds seqs past the common point"
    BOTH_DIVERGED = "both sides hold seqs past the common point"
    AMBIGUOUS_PRIMARY = "neither side moved past the common point, and not exactly one is primary"
    TARGET_CONSISTENT = "the target's image is consistent"
    IN_SYNC = "the target holds everything the source holds"
    JOURNAL_COVERS = "the source's journal holds every seq after the target's last"
    SOURCE_BITMAPS_COVER = "the source's bitmaps cover its writes past the common point"
    TARGET_BITMAPS_COVER = "the target's bitmaps cover its writes past the common point"
    BACKLOG_IN_JOURNAL = "the old primary's journal holds the missing backlog"
    BACKLOG_IN_BITMAP = "the old primary's unsent bitmap covers the missing backlog"


class Plan(enum.StrEnum):
    """Which bitmaps a row's resync copies."""

    NONE = "none"
    SOURCE = "source"  # the source's covering bitmap
    UNION = "union"  # the target's covering bitmap and the source's
    BACKLOG = "backlog"  # the old primary's unsent bitmap (FINISH_SWITCHOVER)


@dataclass(frozen=True, slots=True)
class Rule:
    """One row: when the relation holds and every condition in `when` holds, `action` fires.

    Orientation per relation: RESOLUTION source = survivor; ONE_HISTORY source = the side with a
    history; SAME source = the primary named by the generation (the writer); STALE source = the
    newer side, target = the stale one; FORKED source = the only side that moved past the common
    point, or (if neither did) the only primary. `reverse` flips the data direction (the old
    primary sends its switchover backlog to the new one).
    """

    id: str
    relation: Relation
    when: tuple[Cond, ...]
    action: Action
    summary: str
    plan: Plan = Plan.NONE
    save: Save = Save.NONE
    reverse: bool = False


C = Cond
A = Action
RULES: Final[tuple[Rule, ...]] = (
    # An admin named a survivor (`resolve`): its data is kept whatever the histories say.
    Rule("X1", Relation.RESOLUTION, (C.CONFLICTING_SURVIVORS,), A.SPLIT_BRAIN,
         "the sites name different survivors: resolve again with one name"),
    Rule("X2", Relation.RESOLUTION, (C.SOURCE_INCONSISTENT,), A.NO_CONSISTENT_SOURCE,
         "the survivor's image is inconsistent and cannot be a source"),
    Rule("X3", Relation.RESOLUTION, (C.SOURCE_DRAINING,), A.NO_CONSISTENT_SOURCE,
         "the survivor still lacks part of a switchover backlog"),
    Rule("X4", Relation.RESOLUTION,
         (C.TARGET_DIVERGED, C.TARGET_BITMAPS_COVER, C.SOURCE_BITMAPS_COVER), A.BITMAP_RESYNC,
         "keep the survivor: save the loser's divergent regions, copy the union of both sides'",
         Plan.UNION, Save.DIVERGENT),
    Rule("X5", Relation.RESOLUTION, (C.TARGET_BITMAPS_COVER, C.SOURCE_BITMAPS_COVER),
         A.BITMAP_RESYNC, "keep the survivor: the loser wrote nothing after the common point",
         Plan.UNION),
    Rule("X6", Relation.RESOLUTION, (), A.FULL_COPY,
         "keep the survivor: no bitmap covers the differences, save the loser and copy all",
         save=Save.WHOLE),
    # Neither or one side has a history.
    Rule("N1", Relation.NO_HISTORY, (), A.NO_PRIMARY,
         "neither site has an epoch history: create the pair on the primary site"),
    Rule("O1", Relation.ONE_HISTORY, (C.SOURCE_INCONSISTENT,), A.NO_CONSISTENT_SOURCE,
         "the only site with a history has an inconsistent image"),
    Rule("O2", Relation.ONE_HISTORY, (C.SOURCE_DRAINING,), A.NO_CONSISTENT_SOURCE,
         "the only site with a history still lacks part of a switchover backlog"),
    Rule("O3", Relation.ONE_HISTORY, (), A.FULL_COPY,
         "first connect of a new pair (or a rebuilt site): full copy from the site with history"),
    Rule("U1", Relation.UNRELATED, (), A.UNRELATED,
         "the histories share no generation: resolve --survivor SITE to full-copy from SITE"),
    # Same current generation: the writer (its primary) is the source.
    Rule("S1", Relation.SAME, (C.TARGET_CLAIMS_PRIMARY,), A.STALE_PEER_MUST_DEMOTE,
         "a site claims primary in a generation that names the other: fence it"),
    Rule("S2", Relation.SAME, (C.SOURCE_INCONSISTENT,), A.NO_CONSISTENT_SOURCE,
         "the writer's image is inconsistent"),
    Rule("S3", Relation.SAME, (C.SOURCE_DRAINING,), A.NO_CONSISTENT_SOURCE,
         "the writer lacks a backlog its predecessor no longer offers (out-of-order join)"),
    Rule("S4", Relation.SAME, (C.TARGET_AHEAD,), A.SPLIT_BRAIN,
         "the writer lost records its secondary holds: an admin must choose"),
    Rule("S5", Relation.SAME, (C.IN_SYNC, C.TARGET_CONSISTENT), A.NOTHING_TO_DO,
         "identical: replication continues"),
    Rule("S6", Relation.SAME, (C.TARGET_CONSISTENT, C.JOURNAL_COVERS), A.RESUME_JOURNAL,
         "the secondary is behind and the journal still holds its next seq: resume shipping"),
    Rule("S7", Relation.SAME, (C.SOURCE_BITMAPS_COVER,), A.BITMAP_RESYNC,
         "the secondary is behind and the journal was trimmed past it: resync the unsent bitmap",
         Plan.SOURCE),
    Rule("S8", Relation.SAME, (), A.FULL_COPY,
         "the secondary lost records it had acknowledged and no bitmap covers them: full copy"),
    # One side is stale: the newer generation wins (epoch precedence), the stale side follows.
    Rule("T1", Relation.STALE, (C.TARGET_CLAIMS_PRIMARY,), A.STALE_PEER_MUST_DEMOTE,
         "a site claims primary with a stale epoch: fence it"),
    Rule("T2", Relation.STALE, (C.SOURCE_INCONSISTENT,), A.NO_CONSISTENT_SOURCE,
         "the newer site's image is inconsistent"),
    Rule("T3", Relation.STALE, (C.SOURCE_DRAINING, C.TARGET_DIVERGED), A.SPLIT_BRAIN,
         "the old primary wrote after handing over while the new one lacks its backlog"),
    Rule("T4", Relation.STALE, (C.SOURCE_DRAINING, C.BACKLOG_IN_JOURNAL), A.FINISH_SWITCHOVER,
         "interrupted switchover: the old primary sends the rest of its backlog from its journal",
         reverse=True),
    Rule("T5", Relation.STALE, (C.SOURCE_DRAINING, C.BACKLOG_IN_BITMAP), A.FINISH_SWITCHOVER,
         "interrupted switchover: the old primary sends its unsent regions (newer writes win)",
         Plan.BACKLOG, reverse=True),
    Rule("T6", Relation.STALE, (C.SOURCE_DRAINING,), A.NO_CONSISTENT_SOURCE,
         "interrupted switchover: nobody can supply the missing backlog"),
    Rule("T7", Relation.STALE, (C.TARGET_DRAINING,), A.FULL_COPY,
         "the stale site is itself an unfinished switchover: save it and copy all",
         save=Save.WHOLE),
    Rule("T8", Relation.STALE,
         (C.TARGET_DIVERGED, C.TARGET_BITMAPS_COVER, C.SOURCE_BITMAPS_COVER), A.BITMAP_RESYNC,
         "failback: the old primary wrote after the split; save and roll back its unsent regions"
         " and receive the new primary's changes (union)", Plan.UNION, Save.DIVERGENT),
    Rule("T9", Relation.STALE, (C.TARGET_DIVERGED,), A.FULL_COPY,
         "the stale site wrote after the split but no bitmap covers it: save it and copy all",
         save=Save.WHOLE),
    Rule("T10", Relation.STALE, (C.TARGET_CONSISTENT, C.JOURNAL_COVERS), A.RESUME_JOURNAL,
         "the stale site wrote nothing after the split and the newer journal reaches back to it"),
    Rule("T11", Relation.STALE, (C.SOURCE_BITMAPS_COVER,), A.BITMAP_RESYNC,
         "the stale site wrote nothing after the split: resync the newer site's changed bitmap",
         Plan.SOURCE),
    Rule("T12", Relation.STALE, (), A.FULL_COPY,
         "the stale site lacks records no bitmap covers: full copy"),
    # Forked: both sides created generations the other never saw.
    Rule("F1", Relation.FORKED, (C.BOTH_DIVERGED,), A.SPLIT_BRAIN,
         "split-brain: both sides wrote after the histories forked"),
    Rule("F2", Relation.FORKED, (C.AMBIGUOUS_PRIMARY,), A.SPLIT_BRAIN,
         "forked histories, no data diverged, but no single primary: an admin must choose"),
    Rule("F3", Relation.FORKED, (C.TARGET_CLAIMS_PRIMARY,), A.SPLIT_BRAIN,
         "forked histories: the side with nothing new still holds a primary role"),
    Rule("F4", Relation.FORKED, (C.SOURCE_INCONSISTENT,), A.NO_CONSISTENT_SOURCE,
         "forked histories: the side that moved on has an inconsistent image"),
    Rule("F5", Relation.FORKED, (C.SOURCE_DRAINING,), A.NO_CONSISTENT_SOURCE,
         "forked histories: the side that moved on lacks a switchover backlog"),
    Rule("F6", Relation.FORKED, (C.TARGET_CONSISTENT, C.JOURNAL_COVERS), A.RESUME_JOURNAL,
         "one-sided fork: only one side moved on; the other follows from the journal"),
    Rule("F7", Relation.FORKED, (C.SOURCE_BITMAPS_COVER,), A.BITMAP_RESYNC,
         "one-sided fork: only one side moved on; resync its bitmap", Plan.SOURCE),
    Rule("F8", Relation.FORKED, (), A.FULL_COPY,
         "one-sided fork: no journal or bitmap covers the difference: full copy"),
)  # fmt: skip
del C, A

_BY_ID: Final[dict[str, Rule]] = {r.id: r for r in RULES}


def rule(rule_id: str) -> Rule:
    return _BY_ID[rule_id]


# --- computing the situation --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Situation:
    relation: Relation
    facts: frozenset[Cond]
    detail: str
    source: HandshakeView | None = None
    target: HandshakeView | None = None
    common: Point | None = None
    source_bitmaps: tuple[BitmapRef, ...] = ()
    target_bitmaps: tuple[BitmapRef, ...] = ()
    backlog_bitmaps: tuple[BitmapRef, ...] = ()


def _keys(view: HandshakeView) -> list[GenerationKey]:
    return [generation_key(e) for e in view.history]


def _own_ranges(view: HandshakeView) -> list[tuple[int, float]]:
    """Seq ranges (lo, hi] in which this site was the primary of its lineage."""
    out: list[tuple[int, float]] = []
    hist = view.history
    for i, entry in enumerate(hist):
        if entry.primary_site == view.site:
            hi: float = hist[i + 1].prev_last_seq if i + 1 < len(hist) else float("inf")
            out.append((entry.prev_last_seq, hi))
    return out


def _all_own(view: HandshakeView, after: int) -> bool:
    """Every seq in (after, last_seq] of this site's image was written by this site."""
    lo = after
    for r_lo, r_hi in sorted(_own_ranges(view)):
        if lo >= view.last_seq:
            break
        if r_lo <= lo < r_hi:
            lo = int(min(r_hi, view.last_seq))
    return lo >= view.last_seq


def _covering(view: HandshakeView, after: int, changed_valid: bool) -> tuple[BitmapRef, ...]:
    """The one bitmap that covers every difference between this site's image and the shared
    history at seq `after`, or () if none can be shown to. The differences are this site's own
    writes after `after` (anything else it holds past `after`, e.g. records it received that the
    other side lost, is covered by no bitmap). The changed bitmap covers writes since the current
    generation began, only while the peer has not joined it (`changed_valid`); the unsent bitmap
    covers writes above acked_seq. When nothing differs, either is trivially enough and is still
    listed: stale bits cost a region copy, never correctness."""
    if not _all_own(view, after):
        return ()
    cur = view.current
    nothing_new = view.last_seq <= after
    own_cur = changed_valid and cur is not None and cur.primary_site == view.site
    if own_cur and cur is not None and (cur.prev_last_seq <= after or nothing_new):
        return (BitmapRef(view.site, BitmapKind.CHANGED),)
    if view.acked_seq <= after or nothing_new:
        return (BitmapRef(view.site, BitmapKind.UNSENT),)
    return ()


def _point_in(view: HandshakeView, index: int) -> int:
    """How far `view`'s image reaches into its generation `index` (the split point)."""
    hist = view.history
    if index + 1 >= len(hist):
        return view.last_seq
    point = hist[index + 1].prev_last_seq
    if view.backlog_from_seq is not None and index + 2 == len(hist):
        point = min(point, view.backlog_from_seq - 1)
    return point


def _draining(view: HandshakeView) -> bool:
    return view.backlog_from_seq is not None


def _is_primary(view: HandshakeView) -> bool:
    return view.role is Role.PRIMARY


def _facts(**flags: bool) -> frozenset[Cond]:
    return frozenset(Cond[name] for name, on in flags.items() if on)


def _pair_check(a: HandshakeView, b: HandshakeView) -> None:
    if a.group != b.group:
        raise InvalidArgument(f"handshake between different groups {a.group!r} and {b.group!r}")
    if a.site == b.site:
        raise InvalidArgument(f"handshake of site {a.site!r} with itself (group {a.group!r})")
    for v in (a, b):
        if v.survivor is not None and v.survivor not in (a.site, b.site):
            raise InvalidArgument(
                f"site {v.site!r} names survivor {v.survivor!r}, which is not in the pair"
                f" {a.site!r}/{b.site!r}"
            )


def _ordered(a: HandshakeView, b: HandshakeView) -> tuple[HandshakeView, HandshakeView]:
    """A deterministic order, used only where the outcome is symmetric anyway."""
    return (a, b) if a.site < b.site else (b, a)


def _common(x: HandshakeView, y: HandshakeView) -> tuple[int, int, int] | None:
    """Indices in x and y of the newest generation both histories hold, and the common seq."""
    ykeys = {k: i for i, k in enumerate(_keys(y))}
    for ix in range(len(x.history) - 1, -1, -1):
        iy = ykeys.get(generation_key(x.history[ix]))
        if iy is not None:
            return ix, iy, min(_point_in(x, ix), _point_in(y, iy))
    return None


def _resolution(a: HandshakeView, b: HandshakeView) -> _Situation:
    names = {v.survivor for v in (a, b) if v.survivor is not None}
    if len(names) > 1:
        return _Situation(
            Relation.RESOLUTION,
            _facts(CONFLICTING_SURVIVORS=True),
            f"{a.site} names survivor {a.survivor}, {b.site} names {b.survivor}",
        )
    (name,) = names
    src, tgt = (a, b) if a.site == name else (b, a)
    found = _common(src, tgt) if src.history and tgt.history else None
    if found is None:
        return _Situation(
            Relation.RESOLUTION,
            _facts(SOURCE_INCONSISTENT=not src.consistent, SOURCE_DRAINING=_draining(src)),
            f"survivor {src.site}, loser {tgt.site}; no common history",
            src,
            tgt,
        )
    i_src, _, seq = found
    skeys, tkeys = set(_keys(src)), set(_keys(tgt))
    assert src.current is not None and tgt.current is not None
    src_bm = _covering(src, seq, generation_key(src.current) not in tkeys)
    tgt_bm = _covering(tgt, seq, generation_key(tgt.current) not in skeys)
    common = Point(src.history[i_src].epoch, seq)
    return _Situation(
        Relation.RESOLUTION,
        _facts(
            SOURCE_INCONSISTENT=not src.consistent,
            SOURCE_DRAINING=_draining(src),
            TARGET_DIVERGED=tgt.last_seq > seq,
            SOURCE_BITMAPS_COVER=bool(src_bm),
            TARGET_BITMAPS_COVER=bool(tgt_bm),
        ),
        f"survivor {src.site}, loser {tgt.site}; common point epoch {common.epoch} seq {seq}",
        src,
        tgt,
        common,
        src_bm,
        tgt_bm,
    )


def _same(a: HandshakeView, b: HandshakeView) -> _Situation:
    cur = a.current
    assert cur is not None
    if cur.primary_site not in (a.site, b.site):
        raise InvalidArgument(
            f"group {a.group!r}: epoch {cur.epoch} names primary {cur.primary_site!r},"
            f" which is neither {a.site!r} nor {b.site!r}"
        )
    w, r = (a, b) if cur.primary_site == a.site else (b, a)
    src_bm = _covering(w, r.last_seq, False) if r.last_seq <= w.last_seq else ()
    lost = "" if w.clean_shutdown else f" ({w.site}'s last shutdown was not clean)"
    return _Situation(
        Relation.SAME,
        _facts(
            TARGET_CLAIMS_PRIMARY=_is_primary(r),
            SOURCE_INCONSISTENT=not w.consistent,
            SOURCE_DRAINING=_draining(w),
            TARGET_AHEAD=r.last_seq > w.last_seq,
            IN_SYNC=r.last_seq == w.last_seq,
            TARGET_CONSISTENT=r.consistent,
            JOURNAL_COVERS=w.journal_first_seq <= r.last_seq + 1,
            SOURCE_BITMAPS_COVER=bool(src_bm),
        ),
        f"both at epoch {cur.epoch} (primary {w.site}); {w.site} at seq {w.last_seq},"
        f" {r.site} at seq {r.last_seq}{lost}",
        w,
        r,
        Point(cur.epoch, min(w.last_seq, r.last_seq)),
        src_bm,
    )


def _stale(newer: HandshakeView, stale: HandshakeView, index: int) -> _Situation:
    """`stale`'s current generation is `newer.history[index]`, and newer has later ones."""
    cur = stale.current
    assert cur is not None
    nxt = newer.history[index + 1]
    split = nxt.prev_last_seq
    point = min(stale.last_seq, split)
    src_bm = _covering(newer, point, True)
    tgt_bm = _covering(stale, point, False)
    backlog_bm: tuple[BitmapRef, ...] = ()
    in_journal = False
    if newer.backlog_from_seq is not None:
        need_from = newer.backlog_from_seq
        holds_all = stale.last_seq >= split
        in_journal = holds_all and stale.journal_first_seq <= need_from
        if holds_all:
            backlog_bm = _covering(stale, need_from - 1, False)
    return _Situation(
        Relation.STALE,
        _facts(
            TARGET_CLAIMS_PRIMARY=_is_primary(stale),
            SOURCE_INCONSISTENT=not newer.consistent,
            SOURCE_DRAINING=_draining(newer),
            TARGET_DRAINING=_draining(stale),
            TARGET_DIVERGED=stale.last_seq > split,
            TARGET_CONSISTENT=stale.consistent,
            JOURNAL_COVERS=newer.journal_first_seq <= stale.last_seq + 1,
            SOURCE_BITMAPS_COVER=bool(src_bm),
            TARGET_BITMAPS_COVER=bool(tgt_bm),
            BACKLOG_IN_JOURNAL=in_journal,
            BACKLOG_IN_BITMAP=bool(backlog_bm),
        ),
        f"{stale.site} is at epoch {cur.epoch} (seq {stale.last_seq}); {newer.site} moved on to"
        f" epoch {newer.epoch} from seq {split} of epoch {cur.epoch}",
        newer,
        stale,
        Point(cur.epoch, point),
        src_bm,
        tgt_bm,
        backlog_bm,
    )


def _forked(a: HandshakeView, b: HandshakeView, ia: int, ib: int, seq: int) -> _Situation:
    base = a.history[ia]
    a_div, b_div = a.last_seq > seq, b.last_seq > seq
    primaries = [v for v in (a, b) if _is_primary(v)]
    src: HandshakeView | None
    if a_div != b_div:
        src = a if a_div else b
    elif not a_div and len(primaries) == 1:
        src = primaries[0]
    else:
        src = None
    detail = (
        f"histories fork after epoch {base.epoch} seq {seq}: {a.site} went on to epoch"
        f" {a.epoch} (seq {a.last_seq}), {b.site} to epoch {b.epoch} (seq {b.last_seq})"
    )
    if src is None:
        return _Situation(
            Relation.FORKED,
            _facts(BOTH_DIVERGED=a_div and b_div, AMBIGUOUS_PRIMARY=not (a_div or b_div)),
            detail,
            common=Point(base.epoch, seq),
        )
    tgt = b if src is a else a
    src_bm = _covering(src, tgt.last_seq, True)
    return _Situation(
        Relation.FORKED,
        _facts(
            TARGET_CLAIMS_PRIMARY=_is_primary(tgt),
            SOURCE_INCONSISTENT=not src.consistent,
            SOURCE_DRAINING=_draining(src),
            TARGET_CONSISTENT=tgt.consistent,
            JOURNAL_COVERS=src.journal_first_seq <= tgt.last_seq + 1,
            SOURCE_BITMAPS_COVER=bool(src_bm),
        ),
        detail,
        src,
        tgt,
        Point(base.epoch, seq),
        src_bm,
    )


def _situation(a: HandshakeView, b: HandshakeView) -> _Situation:
    a, b = _ordered(a, b)  # texts list sites in a fixed order, so both sides build equal reasons
    if a.survivor is not None or b.survivor is not None:
        return _resolution(a, b)
    if not a.history and not b.history:
        return _Situation(Relation.NO_HISTORY, frozenset(), f"{a.site} and {b.site} are new")
    if not a.history or not b.history:
        src, tgt = (a, b) if a.history else (b, a)
        return _Situation(
            Relation.ONE_HISTORY,
            _facts(SOURCE_INCONSISTENT=not src.consistent, SOURCE_DRAINING=_draining(src)),
            f"{src.site} is at epoch {src.epoch} (seq {src.last_seq}); {tgt.site} has no history",
            src,
            tgt,
        )
    assert a.current is not None and b.current is not None
    if generation_key(a.current) == generation_key(b.current):
        return _same(a, b)
    found = _common(a, b)
    if found is None:
        return _Situation(
            Relation.UNRELATED,
            frozenset(),
            f"{a.site} (epoch {a.epoch}) and {b.site} (epoch {b.epoch}) share no generation",
        )
    ia, ib, seq = found
    if ia == len(a.history) - 1:
        return _stale(b, a, ib)
    if ib == len(b.history) - 1:
        return _stale(a, b, ia)
    return _forked(a, b, ia, ib, seq)


# --- building the decision --------------------------------------------------------------------


def _match(sit: _Situation) -> Rule:
    for row in RULES:
        if row.relation is sit.relation and all(c in sit.facts for c in row.when):
            return row
    raise AssertionError(f"no rule for {sit.relation}")  # every relation ends in a catch-all


def _describe(d: HandshakeDecision, group: str) -> str:
    if d.action is Action.NOTHING_TO_DO:
        return f"{d.source} continues replicating to {d.target} from seq {d.resume_seq}"
    if d.action is Action.RESUME_JOURNAL:
        return f"{d.source} ships its journal to {d.target} from seq {d.resume_seq}"
    if d.action is Action.FINISH_SWITCHOVER and d.resume_seq is not None:
        return f"{d.source} sends its backlog to {d.target} from seq {d.resume_seq}"
    if d.action in (Action.BITMAP_RESYNC, Action.FINISH_SWITCHOVER):
        what = " + ".join(str(b) for b in d.bitmaps)
        return f"{d.source} copies to {d.target} the regions of {what}"
    if d.action is Action.FULL_COPY:
        return f"{d.source} copies every region to {d.target}"
    if d.action is Action.STALE_PEER_MUST_DEMOTE:
        return f"{d.fence} must refuse writes and become secondary first"
    if d.action is Action.NO_PRIMARY:
        return f"nothing moves; run `targetd-repl pair create {group}` on the primary site"
    if d.action is Action.NO_CONSISTENT_SOURCE:
        return (
            "nothing moves: no consistent image to copy from; finish or restore one site, or"
            f" run `targetd-repl resolve {group} --survivor SITE` naming a consistent site"
        )
    return f"nothing moves until an admin runs `targetd-repl resolve {group} --survivor SITE`"


def _build(
    row: Rule, sit: _Situation, group: str, hook: Callable[[HandshakeView], HandshakeDecision]
) -> HandshakeDecision:
    src, tgt = sit.source, sit.target
    if row.action.refuses or src is None or tgt is None:
        d = HandshakeDecision(row.action, row.id, "", common=sit.common)
    elif row.action is Action.STALE_PEER_MUST_DEMOTE:
        d = HandshakeDecision(row.action, row.id, "", fence=tgt.site, after_fence=hook(tgt))
    else:
        if row.reverse:
            src, tgt = tgt, src
        bitmaps: tuple[BitmapRef, ...] = {
            Plan.NONE: (),
            Plan.SOURCE: sit.source_bitmaps,
            Plan.UNION: tuple(sorted(set(sit.target_bitmaps + sit.source_bitmaps))),
            Plan.BACKLOG: sit.backlog_bitmaps,
        }[row.plan]
        resume: int | None = None
        if row.action is Action.NOTHING_TO_DO:
            resume = src.last_seq + 1
        elif row.action is Action.RESUME_JOURNAL:
            resume = tgt.last_seq + 1
        elif row.action is Action.FINISH_SWITCHOVER and row.plan is Plan.NONE:
            resume = tgt.backlog_from_seq
        kind: SnapshotKind | None = None
        if row.save is not Save.NONE:
            kind = (
                SnapshotKind.SPLIT_BRAIN_LOSER
                if sit.relation is Relation.RESOLUTION
                else SnapshotKind.ROLLBACK_SAVE
            )
        d = HandshakeDecision(
            row.action,
            row.id,
            "",
            source=src.site,
            target=tgt.site,
            resume_seq=resume,
            bitmaps=bitmaps,
            save=row.save,
            save_kind=kind,
            common=sit.common,
            fence=tgt.site if sit.relation is Relation.RESOLUTION and _is_primary(tgt) else None,
        )
    saving = ""
    if d.save is Save.DIVERGENT:
        saving = f"; {d.target} first saves the regions it will lose in a snapshot"
    elif d.save is Save.WHOLE:
        saving = f"; {d.target} first saves its whole image in a snapshot"
    if d.fence is not None and d.action is not Action.STALE_PEER_MUST_DEMOTE:
        saving += f"; {d.fence} demotes first"
    reason = f"[{row.id}] {row.summary}: {sit.detail}; {_describe(d, group)}{saving}"
    return replace(d, reason=reason)


def decide(local: HandshakeView, peer: HandshakeView) -> HandshakeDecision:
    """What the pair does after this (re)connect. `decide(a, b) == decide(b, a)`.

    Raises InvalidArgument for views that cannot belong to one pair (different groups, the same
    site twice, a survivor outside the pair, a current generation naming a third site)."""
    _pair_check(local, peer)
    sit = _situation(local, peer)

    def demoted(site_view: HandshakeView) -> HandshakeDecision:
        other = peer if site_view.site == local.site else local
        return decide(replace(site_view, role=Role.SECONDARY), other)

    return _build(_match(sit), sit, local.group, demoted)


def resolve(local: HandshakeView, peer: HandshakeView, survivor: str) -> HandshakeDecision:
    """The admin's answer to a refusal: keep `survivor`'s data. The loser saves what it will
    lose (its divergent regions, or its whole image when they are not known), demotes if it is
    primary (`fence`), and receives the union of both sides' differences. The orchestrator
    persists the survivor on both sites until the copy completes, so `decide` keeps returning
    this decision across reconnects (rows X1-X6)."""
    if survivor not in (local.site, peer.site):
        raise InvalidArgument(
            f"survivor {survivor!r} is not in the pair {local.site!r}/{peer.site!r}"
            f" (group {local.group!r})"
        )
    return decide(replace(local, survivor=survivor), replace(peer, survivor=survivor))


def table_markdown(rows: Iterable[Rule] = RULES) -> str:
    """The decision table as a Markdown table (docs/handshake.md embeds this text)."""
    lines = [
        "| rule | relation | conditions (all hold) | action | copies | saves | meaning |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        when = "; ".join(c.value for c in r.when) or "(otherwise)"
        direction = "old → new primary" if r.reverse else "source → target"
        copies = {
            Plan.NONE: "—" if not r.action.moves_data else direction,
            Plan.SOURCE: f"{direction}: source's bitmap",
            Plan.UNION: f"{direction}: target's + source's bitmaps",
            Plan.BACKLOG: f"{direction}: old primary's unsent bitmap",
        }[r.plan]
        if r.action is Action.FULL_COPY:
            copies = f"{direction}: every region"
        lines.append(
            f"| {r.id} | {r.relation} | {when} | {r.action} | {copies} | {r.save} | {r.summary} |"
        )
    return "\n".join(lines) + "\n"
