"""The unsent bitmap of a paired primary group, and the replication state a site keeps per group.

Unsent bitmap (seeds 000/003: first difference information): one DirtyBitmap per volume of the
group, saved as `groups/<group>/unsent-<volume_id>.bitmap`. Invariant, kept by primary.py: every
region written with a seq above the peer's acknowledged seq is either still in the journal
(retained for the sender) or set here. A bit set by a tracked write is saved before the write is
acknowledged; clearing bits is saved lazily (a stale set bit costs one region copy, never data).

Saves of one volume's bitmap are serialised: two concurrent saves could otherwise rename an older
snapshot over a newer one and forget a bit whose write was already acknowledged.

Replication state (`groups/<group>/replication.json`): whether this site's image is consistent
(False while it is the target of an unfinished copy), the seq at which a running copy completes
and the history the site then adopts, the pair's fence policy, and whether the last stop was
clean.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Self

from targetd_repl.errors import BitmapCorrupt, NotFound
from targetd_repl.model import EpochEntry
from targetd_repl.storage.bitmap import DirtyBitmap
from targetd_repl.storage.fileutil import atomic_write, remove_stale_temps

STATE_FILE = "replication.json"


class UnsentBitmaps:
    """The unsent bitmaps of one group (volume id -> bitmap), thread-safe."""

    def __init__(self, directory: Path, bitmaps: dict[int, DirtyBitmap]) -> None:
        self._dir = directory
        self._bitmaps = bitmaps
        self._save_locks = {vid: threading.Lock() for vid in bitmaps}

    @staticmethod
    def path_for(directory: Path, volume_id: int) -> Path:
        return directory / f"unsent-{volume_id}.bitmap"

    @classmethod
    def open(cls, directory: Path, volumes: dict[int, int], region_size: int) -> Self:
        """Load (or start empty) the bitmap of each volume (volume id -> size in bytes). A
        bitmap whose file is damaged or of another geometry comes back all set: every region
        is copied again rather than trusting a file that may have lost bits."""
        bitmaps: dict[int, DirtyBitmap] = {}
        for volume_id, size in volumes.items():
            path = cls.path_for(directory, volume_id)
            remove_stale_temps(path)
            try:
                bitmap, _ = DirtyBitmap.load(path)
                if bitmap.size_bytes != size or bitmap.region_size != region_size:
                    raise BitmapCorrupt(f"{path}: geometry differs from volume id {volume_id}")
            except NotFound:
                bitmap = DirtyBitmap(size, region_size)
            except BitmapCorrupt:
                bitmap = DirtyBitmap(size, region_size)
                bitmap.set_all()
            bitmaps[volume_id] = bitmap
        return cls(directory, bitmaps)

    def volume_ids(self) -> list[int]:
        return list(self._bitmaps)

    def bitmap(self, volume_id: int) -> DirtyBitmap:
        return self._bitmaps[volume_id]

    def mark(self, volume_id: int, offset: int, length: int) -> int:
        """Set the regions a write touched; return how many bits are new (not yet saved)."""
        bitmap = self._bitmaps.get(volume_id)
        if bitmap is None or length <= 0:
            return 0
        return bitmap.set_range(offset, min(length, bitmap.size_bytes - offset))

    def clear(self, volume_id: int, offset: int, length: int) -> int:
        bitmap = self._bitmaps.get(volume_id)
        if bitmap is None:
            return 0
        return bitmap.clear_range(offset, min(length, bitmap.size_bytes - offset))

    def set_all(self) -> int:
        return sum(b.set_all() for b in self._bitmaps.values())

    def clear_all(self) -> int:
        return sum(b.clear_all() for b in self._bitmaps.values())

    def save(self, volume_id: int, stamp: int = 0) -> None:
        with self._save_locks[volume_id]:
            self._bitmaps[volume_id].save(self.path_for(self._dir, volume_id), stamp=stamp)

    def save_all(self, stamp: int = 0) -> None:
        for volume_id in self._bitmaps:
            self.save(volume_id, stamp)

    def any(self) -> bool:
        return any(b.any() for b in self._bitmaps.values())

    def count(self) -> int:
        return sum(b.count() for b in self._bitmaps.values())

    def ranges(self) -> Iterator[tuple[int, int, int]]:
        """(volume id, offset, length) of every run of set regions, on a copy of the bits."""
        for volume_id, bitmap in self._bitmaps.items():
            for offset, length in bitmap.copy().byte_ranges():
                yield volume_id, offset, length

    def remove_files(self) -> None:
        for volume_id in self._bitmaps:
            self.path_for(self._dir, volume_id).unlink(missing_ok=True)


@dataclass
class ReplicationState:
    """Per-group replication facts that must survive a restart (see the module docstring)."""

    consistent: bool = True
    consistent_at: int | None = None  # a copy target becomes consistent once applied >= this
    adopt_history: list[dict[str, object]] = field(default_factory=list)  # with consistent_at
    fence: str = "none"
    clean_shutdown: bool = True
    # roles/: a failback or resolve target holds the records it receives unapplied until the
    # bulk copy of the role change has arrived (seed 001 claim 17); the snapshot that keeps what
    # it replaces is named in the history it discards
    hold_apply: bool = False
    hold_restarted_at: int | None = None  # the live stream restarted the receive journal here
    saved_snapshot: str = ""

    @classmethod
    def load(cls, directory: Path) -> ReplicationState:
        path = directory / STATE_FILE
        remove_stale_temps(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            return cls()
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in raw.items() if k in known})

    def save(self, directory: Path) -> None:
        atomic_write(directory / STATE_FILE, json.dumps(asdict(self), sort_keys=True).encode())

    def history(self, group_id: int) -> tuple[EpochEntry, ...]:
        return tuple(
            EpochEntry(
                group_id=group_id,
                epoch=int(str(e["epoch"])),
                primary_site=str(e["primary_site"]),
                started_at=float(str(e["started_at"])),
                prev_last_seq=int(str(e["prev_last_seq"])),
                reason=str(e["reason"]),
            )
            for e in self.adopt_history
        )

    def set_history(self, history: tuple[EpochEntry, ...]) -> None:
        self.adopt_history = [
            {
                "epoch": e.epoch,
                "primary_site": e.primary_site,
                "started_at": e.started_at,
                "prev_last_seq": e.prev_last_seq,
                "reason": e.reason,
            }
            for e in history
        ]

    @staticmethod
    def remove(directory: Path) -> None:
        (directory / STATE_FILE).unlink(missing_ok=True)
