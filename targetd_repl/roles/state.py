"""What a role change must remember across a crash, per group: `groups/<group>/roles.json`,
and the region bitmaps beside it.

One record per kind of role change this site takes part in, each written (atomically) before
the step it allows, so that a rerun of the command, or the controller's next start, finds where
it stood:

  failover      this site was promoted: the restart-point snapshot, its seq, the new epoch, and
                that the *changed* bitmap (`changed-<volume id>.bitmap`) tracks every write since;
                kept until a failback or resolve makes the peer join this generation
  rejoin        this site is the source of a failback or resolve: the target, the snapshot the
                bulk copy reads (`resync-source`), its seq, and the regions to copy
                (`rejoin-<volume id>.bitmap`: the union of both sides' bitmaps)
  target        this site is the target of a failback or resolve: the source, the snapshot that
                keeps what it loses, and the regions it told the source (`target-<id>.bitmap`)
  switchover    this site is the new primary of a switchover that has not drained: the old
                primary, its final seq, and the regions still missing (`missing-<id>.bitmap`)
  stepdown      this site is the old primary of a switchover: the new primary and the final seq;
                its image stays frozen at that seq until the new primary finished draining

Bitmaps use the storage DirtyBitmap format through replication's UnsentBitmaps (one file per
volume of the group, saved atomically).
"""

from __future__ import annotations

import json
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from targetd_repl.replication.tracking import UnsentBitmaps
from targetd_repl.storage.bitmap import DirtyBitmap
from targetd_repl.storage.fileutil import atomic_write, remove_stale_temps

STATE_FILE = "roles.json"


class RegionBitmaps(UnsentBitmaps):
    """UnsentBitmaps under another file prefix (changed-, rejoin-, target-, missing-)."""

    prefix = "regions"

    @classmethod
    def path_for(cls, directory: Path, volume_id: int) -> Path:
        return directory / f"{cls.prefix}-{volume_id}.bitmap"

    def copy_bits(self) -> dict[int, DirtyBitmap]:
        """A copy of every volume's bits (volume id -> bitmap)."""
        return {vid: self.bitmap(vid).copy() for vid in self.volume_ids()}

    def total_bytes(self) -> int:
        return sum(length for _, _, length in self.ranges())

    @classmethod
    def exists(cls, directory: Path, volume_ids: list[int]) -> bool:
        return any(cls.path_for(directory, v).exists() for v in volume_ids)


class ChangedBitmaps(RegionBitmaps):
    """Regions written since this site's current generation began (seeds 001/003)."""

    prefix = "changed"


class RejoinBitmaps(RegionBitmaps):
    """At the source of a failback or resolve: the regions the bulk copy moves."""

    prefix = "rejoin"


class TargetBitmaps(RegionBitmaps):
    """At the target of a failback or resolve: the regions it wrote that the source resends."""

    prefix = "target"


class MissingBitmaps(RegionBitmaps):
    """At a switchover's new primary: regions of the old primary's backlog not yet here."""

    prefix = "missing"


@dataclass
class FailoverRecord:
    epoch: int
    restart_point: str  # snapshot name (kind restart-point) on every volume of the group
    restart_seq: int = 0
    forced: bool = False
    done: bool = False
    started_at: float = 0.0


@dataclass
class RejoinRecord:
    kind: str  # failback | resolve
    target: str
    snapshot: str  # kind resync-source: what the bulk copy reads
    seq: int  # the snapshot's seq: the live stream starts after it
    total_bytes: int = 0
    regions: int = 0
    restart_point: str = ""  # failback: regions only the target wrote come from here
    streamed: bool = False  # the live stream for this plan was opened once
    bulk_done: bool = False
    started_at: float = 0.0
    generation: int = 0  # bumped at every re-plan (names the snapshot)


@dataclass
class TargetRecord:
    kind: str
    source: str
    saved_snapshot: str  # "" when nothing had to be saved
    whole: bool = False
    regions: int = 0
    rule: str = ""
    started_at: float = 0.0


@dataclass
class SwitchoverRecord:
    old_primary: str
    final_seq: int
    received_seq: int
    promoted: bool = False
    started_at: float = 0.0
    total_bytes: int = 0


@dataclass
class StepDownRecord:
    new_primary: str
    final_seq: int
    started_at: float = 0.0


@dataclass
class RolesState:
    failover: FailoverRecord | None = None
    rejoin: RejoinRecord | None = None
    target: TargetRecord | None = None
    switchover: SwitchoverRecord | None = None
    stepdown: StepDownRecord | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, directory: Path) -> RolesState:
        path = directory / STATE_FILE
        remove_stale_temps(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            return cls()

        def record(kind: type[Any], key: str) -> Any:
            value = raw.get(key)
            if not isinstance(value, dict):
                return None
            known = set(kind.__dataclass_fields__)
            return kind(**{k: v for k, v in value.items() if k in known})

        return cls(
            failover=record(FailoverRecord, "failover"),
            rejoin=record(RejoinRecord, "rejoin"),
            target=record(TargetRecord, "target"),
            switchover=record(SwitchoverRecord, "switchover"),
            stepdown=record(StepDownRecord, "stepdown"),
            extra=dict(raw.get("extra") or {}),
        )

    def save(self, directory: Path) -> None:
        atomic_write(directory / STATE_FILE, json.dumps(asdict(self), sort_keys=True).encode())

    def empty(self) -> bool:
        return not (self.failover or self.rejoin or self.target or self.switchover or self.stepdown)


class StateStore:
    """The RolesState of every group of a site, loaded once, saved on every change."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._states: dict[Path, RolesState] = {}

    def get(self, directory: Path) -> RolesState:
        with self._lock:
            state = self._states.get(directory)
            if state is None:
                state = RolesState.load(directory)
                self._states[directory] = state
            return state

    def save(self, directory: Path) -> None:
        with self._lock:
            state = self._states.get(directory)
        if state is not None:
            directory.mkdir(parents=True, exist_ok=True)
            state.save(directory)

    def forget(self, directory: Path) -> None:
        with self._lock:
            self._states.pop(directory, None)
        (directory / STATE_FILE).unlink(missing_ok=True)
