"""The site's metadata store: an embedded SQLite database at `<state>/metadata.db`.

It owns the catalogue of one site: the site's own name (set once), volumes, consistency groups
(role, epoch, and the journal checkpoints `applied_seq` / `acked_seq`), pairs (peer, mode, state,
last error), each group's epoch history, and the snapshot catalogue. Volume data, journals,
bitmaps and snapshot before-images live in files owned by the other storage modules; this store
only names them. No external server; the schema is versioned (`migrations.py`).

Durability: WAL with `synchronous=FULL`, so a change is on stable storage when its call returns.
With `NORMAL`, WAL commits may be lost on power failure, and role and epoch changes are fencing
decisions: a site that forgets it was demoted, or which epoch it granted, can serve stale writes
or miss a split-brain. The rate of metadata changes is low, so the fsync per commit is cheap.

Concurrency: one connection, guarded by one lock, shared by every thread (gRPC handlers call in
from their own threads). Every change runs in one `BEGIN IMMEDIATE` transaction (`_tx`), which
also serialises against another process opening the same file (busy timeout). Reads run in a
deferred transaction so a multi-statement read sees one snapshot.

Objects are referred to by name (`str`, as the CLI and Ansible do) or by id (`int`, as the
engine does). Ids come from AUTOINCREMENT and are never reused, so a stale id held anywhere can
never silently name a newer object. Errors are typed and name the object: `NotFound`,
`AlreadyExists`, `FailedPrecondition`, `InvalidArgument`; an SQLite failure becomes
`MetadataError`.

Epochs: a group created as primary here starts at epoch 1 with a first history entry naming
this site as primary (prev_last_seq 0, reason "created"): this site is where the group's write
history begins. A group created as secondary starts at epoch 0 with an empty history: it has no
history of its own yet and must not invent one (an invented entry would look like a divergent
past to the split-brain check); it adopts the primary's entries with `record_epoch` when it
first connects. `record_epoch` is the only way the epoch moves, always upward, together with
the history entry (and, if given, the new role) in one transaction. History entries are
append-only; the schema's triggers refuse updates and deletes of them too.
"""

from __future__ import annotations

import itertools
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from enum import StrEnum
from pathlib import Path
from types import EllipsisType, TracebackType
from typing import TypeVar

from targetd_repl.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    MetadataError,
    NotFound,
)
from targetd_repl.model import (
    BLOCK_SIZES,
    EpochEntry,
    GroupInfo,
    PairInfo,
    PairMode,
    PairState,
    Role,
    SnapshotInfo,
    SnapshotKind,
    VolumeInfo,
    check_name,
)
from targetd_repl.storage.migrations import MIGRATIONS, migrate

DB_FILE_NAME = "metadata.db"
DEFAULT_BUSY_TIMEOUT = 10.0  # seconds another connection may hold the write lock before we fail
MAX_INT = 2**63 - 1  # SQLite INTEGER
CREATED_REASON = "created"

Ref = int | str  # an object's id or its name

_E = TypeVar("_E", bound=StrEnum)


def _enum(kind: type[_E], value: object, what: str) -> _E:
    if isinstance(value, kind):
        return value
    if isinstance(value, str):
        try:
            return kind(value)
        except ValueError:
            pass
    allowed = ", ".join(m.value for m in kind)
    raise InvalidArgument(f"invalid {what} {value!r}: use one of {allowed}")


def _int(what: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"{what} must be an integer, not {value!r}")
    if not minimum <= value <= MAX_INT:
        raise InvalidArgument(f"{what} {value} out of range [{minimum}, {MAX_INT}]")
    return value


def _size(name: str, size_bytes: object, block_size: int) -> int:
    size = _int(f"size of volume {name!r}", size_bytes, 1)
    if size % block_size:
        raise InvalidArgument(
            f"size of volume {name!r} ({size} bytes) is not a multiple of its block size"
            f" {block_size}"
        )
    return size


def _volume(row: sqlite3.Row) -> VolumeInfo:
    return VolumeInfo(
        id=row["id"],
        name=row["name"],
        size_bytes=row["size_bytes"],
        block_size=row["block_size"],
        group_id=row["group_id"],
        created_at=row["created_at"],
    )


def _group(row: sqlite3.Row) -> GroupInfo:
    return GroupInfo(
        id=row["id"],
        name=row["name"],
        role=Role(row["role"]),
        epoch=row["epoch"],
        created_at=row["created_at"],
        applied_seq=row["applied_seq"],
        acked_seq=row["acked_seq"],
    )


def _pair(row: sqlite3.Row) -> PairInfo:
    return PairInfo(
        group_id=row["group_id"],
        peer_site=row["peer_site"],
        mode=PairMode(row["mode"]),
        state=PairState(row["state"]),
        updated_at=row["updated_at"],
        detail=row["detail"],
        backlog_from_seq=row["backlog_from_seq"],
        survivor=row["survivor"],
    )


def _epoch(row: sqlite3.Row) -> EpochEntry:
    return EpochEntry(
        group_id=row["group_id"],
        epoch=row["epoch"],
        primary_site=row["primary_site"],
        started_at=row["started_at"],
        prev_last_seq=row["prev_last_seq"],
        reason=row["reason"],
    )


def _snapshot(row: sqlite3.Row) -> SnapshotInfo:
    return SnapshotInfo(
        id=row["id"],
        volume_id=row["volume_id"],
        name=row["name"],
        kind=SnapshotKind(row["kind"]),
        created_at=row["created_at"],
        epoch=row["epoch"],
        seq=row["seq"],
    )


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class MetadataStore:
    """The metadata of one site. Open with `MetadataStore.open(path)`; thread-safe."""

    def __init__(self, conn: sqlite3.Connection, path: Path, clock: Callable[[], float]) -> None:
        self._conn: sqlite3.Connection | None = conn
        self._path = path
        self._clock = clock
        self._lock = threading.RLock()

    # --- lifecycle -----------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: Path,
        *,
        site: str | None = None,
        clock: Callable[[], float] = time.time,
        busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
    ) -> MetadataStore:
        """Open (creating if absent) and migrate the database at `path`.

        `site`, if given, is this site's name: recorded on first open, checked afterwards.
        The directory must exist: a missing state directory is a configuration error.
        """
        path = Path(path)
        if not path.parent.is_dir():
            raise MetadataError(f"cannot open metadata database {path}: no such directory")
        created = not path.exists()
        try:
            conn = sqlite3.connect(
                path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise MetadataError(f"cannot open metadata database {path}: {exc}") from exc
        try:
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise MetadataError(
                    f"cannot open metadata database {path}: WAL journal mode refused ({mode})"
                )
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = ON")
            migrate(conn, MIGRATIONS, where=f"metadata database {path}")
            if created:
                _fsync_dir(path.parent)  # the new file's directory entry survives power loss
        except sqlite3.Error as exc:
            conn.close()
            raise MetadataError(f"cannot open metadata database {path}: {exc}") from exc
        except BaseException:
            conn.close()
            raise
        store = cls(conn, path, clock)
        if site is not None:
            try:
                store.set_site_name(site)
            except BaseException:
                store.close()
                raise
        return store

    @classmethod
    def open_in(cls, state_dir: Path, *, site: str | None = None) -> MetadataStore:
        """Open `<state_dir>/metadata.db`."""
        return cls.open(Path(state_dir) / DB_FILE_NAME, site=site)

    @property
    def path(self) -> Path:
        return self._path

    def close(self) -> None:
        """Close the connection (checkpointing the WAL). Idempotent."""
        with self._lock:
            if self._conn is not None:
                conn, self._conn = self._conn, None
                conn.close()

    def __enter__(self) -> MetadataStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def check_integrity(self) -> None:
        """Raise MetadataError unless `PRAGMA integrity_check` and the foreign keys are clean."""
        with self._read() as conn:
            result = [str(r[0]) for r in conn.execute("PRAGMA integrity_check")]
            fk = conn.execute("PRAGMA foreign_key_check").fetchall()
        if result != ["ok"] or fk:
            raise MetadataError(
                f"metadata database {self._path} fails its checks: {'; '.join(result)}"
                f" ({len(fk)} foreign-key violations)"
            )

    # --- transactions --------------------------------------------------------------------------

    def _live(self) -> sqlite3.Connection:
        if self._conn is None:
            raise MetadataError(f"metadata store {self._path} is closed")
        return self._conn

    @contextmanager
    def _transaction(self, begin: str) -> Iterator[sqlite3.Connection]:
        with self._lock:
            conn = self._live()
            if conn.in_transaction:
                raise RuntimeError("metadata store transactions do not nest")
            try:
                conn.execute(begin)
                try:
                    yield conn
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise MetadataError(f"metadata store {self._path}: {exc}") from exc

    def _tx(self) -> AbstractContextManager[sqlite3.Connection]:
        """A write transaction: all or nothing, durable when the block exits."""
        return self._transaction("BEGIN IMMEDIATE")

    def _read(self) -> AbstractContextManager[sqlite3.Connection]:
        """A read transaction: one consistent snapshot for several statements."""
        return self._transaction("BEGIN")

    # --- lookups (inside a transaction) --------------------------------------------------------

    @staticmethod
    def _row(conn: sqlite3.Connection, kind: str, table: str, ref: Ref) -> sqlite3.Row:
        if isinstance(ref, bool) or not isinstance(ref, int | str):
            raise InvalidArgument(f"{kind} must be named by id or name, not {ref!r}")
        if isinstance(ref, int):
            row = conn.execute(f"SELECT * FROM {table} WHERE id = ?", (ref,)).fetchone()
            if row is None:
                raise NotFound(f"{kind} id {ref} not found")
        else:
            check_name(kind, ref)
            row = conn.execute(f"SELECT * FROM {table} WHERE name = ?", (ref,)).fetchone()
            if row is None:
                raise NotFound(f"{kind} {ref!r} not found")
        assert isinstance(row, sqlite3.Row)
        return row

    def _volume_row(self, conn: sqlite3.Connection, ref: Ref) -> sqlite3.Row:
        return self._row(conn, "volume", "volumes", ref)

    def _group_row(self, conn: sqlite3.Connection, ref: Ref) -> sqlite3.Row:
        return self._row(conn, "group", "groups", ref)

    @staticmethod
    def _site(conn: sqlite3.Connection) -> str | None:
        row = conn.execute("SELECT name FROM site WHERE id = 1").fetchone()
        return None if row is None else str(row["name"])

    @staticmethod
    def _pair_of(conn: sqlite3.Connection, group_id: int) -> sqlite3.Row | None:
        row = conn.execute("SELECT * FROM pairs WHERE group_id = ?", (group_id,)).fetchone()
        assert row is None or isinstance(row, sqlite3.Row)
        return row

    def _refuse_if_paired(self, conn: sqlite3.Connection, group: sqlite3.Row, what: str) -> None:
        pair = self._pair_of(conn, group["id"])
        if pair is not None:
            raise FailedPrecondition(
                f"cannot {what}: group {group['name']!r} is paired with site"
                f" {pair['peer_site']!r} ({pair['state']}); delete the pair first"
            )

    # --- site ----------------------------------------------------------------------------------

    def site_name(self) -> str | None:
        """This site's name, or None before it was set."""
        with self._read() as conn:
            return self._site(conn)

    def set_site_name(self, name: str) -> None:
        """Record this site's name once. Setting the same name again is a no-op; a different
        name raises FailedPrecondition: the name is written into epoch histories and peers'
        pairs, so renaming would silently rewrite who was primary when."""
        check_name("site", name)
        with self._tx() as conn:
            current = self._site(conn)
            if current == name:
                return
            if current is not None:
                raise FailedPrecondition(
                    f"site is already named {current!r}; refusing to rename it to {name!r}"
                )
            conn.execute(
                "INSERT INTO site (id, name, created_at) VALUES (1, ?, ?)", (name, self._clock())
            )

    # --- volumes -------------------------------------------------------------------------------

    def create_volume(self, name: str, size_bytes: int, block_size: int) -> VolumeInfo:
        check_name("volume", name)
        if isinstance(block_size, bool) or block_size not in BLOCK_SIZES:
            raise InvalidArgument(
                f"invalid block size {block_size!r} for volume {name!r}: use one of"
                f" {', '.join(map(str, BLOCK_SIZES))}"
            )
        size = _size(name, size_bytes, block_size)
        with self._tx() as conn:
            if conn.execute("SELECT 1 FROM volumes WHERE name = ?", (name,)).fetchone():
                raise AlreadyExists(f"volume {name!r} already exists")
            cur = conn.execute(
                "INSERT INTO volumes (name, size_bytes, block_size, group_id, created_at)"
                " VALUES (?, ?, ?, NULL, ?)",
                (name, size, block_size, self._clock()),
            )
            return _volume(self._volume_row(conn, int(cur.lastrowid or 0)))

    def get_volume(self, volume: Ref) -> VolumeInfo:
        """The volume named `volume` (or with that id)."""
        with self._read() as conn:
            return _volume(self._volume_row(conn, volume))

    def get_volume_by_id(self, volume_id: int) -> VolumeInfo:
        if isinstance(volume_id, bool) or not isinstance(volume_id, int):
            raise InvalidArgument(f"volume id must be an integer, not {volume_id!r}")
        return self.get_volume(volume_id)

    def list_volumes(self, group: Ref | None = None) -> list[VolumeInfo]:
        """All volumes by id, or those of one group."""
        with self._read() as conn:
            if group is None:
                rows = conn.execute("SELECT * FROM volumes ORDER BY id").fetchall()
            else:
                gid = self._group_row(conn, group)["id"]
                rows = conn.execute(
                    "SELECT * FROM volumes WHERE group_id = ? ORDER BY id", (gid,)
                ).fetchall()
            return [_volume(r) for r in rows]

    def resize_volume(self, volume: Ref, size_bytes: int) -> VolumeInfo:
        """Grow a volume. Shrinking raises FailedPrecondition: it would discard data that
        initiators, snapshots and the peer may still hold."""
        with self._tx() as conn:
            row = self._volume_row(conn, volume)
            size = _size(row["name"], size_bytes, row["block_size"])
            if size < row["size_bytes"]:
                raise FailedPrecondition(
                    f"refusing to shrink volume {row['name']!r} from {row['size_bytes']} to"
                    f" {size} bytes: it would discard data"
                )
            conn.execute("UPDATE volumes SET size_bytes = ? WHERE id = ?", (size, row["id"]))
            return _volume(self._volume_row(conn, row["id"]))

    def delete_volume(self, volume: Ref) -> None:
        """Delete a volume that is in no group and has no snapshots."""
        with self._tx() as conn:
            row = self._volume_row(conn, volume)
            if row["group_id"] is not None:
                group = self._group_row(conn, row["group_id"])
                raise FailedPrecondition(
                    f"volume {row['name']!r} belongs to group {group['name']!r};"
                    " remove it from the group first"
                )
            snaps = [
                r["name"]
                for r in conn.execute(
                    "SELECT name FROM snapshots WHERE volume_id = ? ORDER BY id", (row["id"],)
                )
            ]
            if snaps:
                raise FailedPrecondition(
                    f"volume {row['name']!r} still has {len(snaps)} snapshot(s)"
                    f" ({', '.join(snaps)}); delete them first"
                )
            conn.execute("DELETE FROM volumes WHERE id = ?", (row["id"],))

    # --- groups --------------------------------------------------------------------------------

    def create_group(self, name: str, role: Role) -> GroupInfo:
        """Create a group. As primary: epoch 1 and a first history entry naming this site (the
        site name must be set). As secondary: epoch 0 and no history until it adopts the
        primary's with `record_epoch` (see the module docstring)."""
        check_name("group", name)
        role = _enum(Role, role, "role")
        with self._tx() as conn:
            if conn.execute("SELECT 1 FROM groups WHERE name = ?", (name,)).fetchone():
                raise AlreadyExists(f"group {name!r} already exists")
            site = self._site(conn)
            if role is Role.PRIMARY and site is None:
                raise FailedPrecondition(
                    f"cannot create group {name!r} as primary: this site's name is not set"
                )
            now = self._clock()
            epoch = 1 if role is Role.PRIMARY else 0
            cur = conn.execute(
                "INSERT INTO groups (name, role, epoch, created_at) VALUES (?, ?, ?, ?)",
                (name, role.value, epoch, now),
            )
            gid = int(cur.lastrowid or 0)
            if role is Role.PRIMARY:
                conn.execute(
                    "INSERT INTO epoch_history"
                    " (group_id, epoch, primary_site, started_at, prev_last_seq, reason)"
                    " VALUES (?, 1, ?, ?, 0, ?)",
                    (gid, site, now, CREATED_REASON),
                )
            return _group(self._group_row(conn, gid))

    def get_group(self, group: Ref) -> GroupInfo:
        with self._read() as conn:
            return _group(self._group_row(conn, group))

    def get_group_by_id(self, group_id: int) -> GroupInfo:
        if isinstance(group_id, bool) or not isinstance(group_id, int):
            raise InvalidArgument(f"group id must be an integer, not {group_id!r}")
        return self.get_group(group_id)

    def list_groups(self) -> list[GroupInfo]:
        with self._read() as conn:
            return [_group(r) for r in conn.execute("SELECT * FROM groups ORDER BY id")]

    def delete_group(self, group: Ref) -> None:
        """Delete a group that has no volumes and no pair (its epoch history goes with it)."""
        with self._tx() as conn:
            row = self._group_row(conn, group)
            self._refuse_if_paired(conn, row, f"delete group {row['name']!r}")
            members = [
                r["name"]
                for r in conn.execute(
                    "SELECT name FROM volumes WHERE group_id = ? ORDER BY id", (row["id"],)
                )
            ]
            if members:
                raise FailedPrecondition(
                    f"group {row['name']!r} still has {len(members)} volume(s)"
                    f" ({', '.join(members)}); remove them first"
                )
            conn.execute("DELETE FROM groups WHERE id = ?", (row["id"],))

    def add_volume_to_group(self, group: Ref, volume: Ref) -> VolumeInfo:
        """Put a volume into a group. A volume belongs to at most one group; adding it to the
        group it is already in is a no-op. Refused while the group has a pair (the peer and the
        journal would not know the volume)."""
        with self._tx() as conn:
            grow = self._group_row(conn, group)
            vrow = self._volume_row(conn, volume)
            if vrow["group_id"] == grow["id"]:
                return _volume(vrow)
            if vrow["group_id"] is not None:
                other = self._group_row(conn, vrow["group_id"])
                raise FailedPrecondition(
                    f"volume {vrow['name']!r} already belongs to group {other['name']!r}"
                )
            self._refuse_if_paired(
                conn, grow, f"add volume {vrow['name']!r} to group {grow['name']!r}"
            )
            conn.execute("UPDATE volumes SET group_id = ? WHERE id = ?", (grow["id"], vrow["id"]))
            return _volume(self._volume_row(conn, vrow["id"]))

    def remove_volume_from_group(self, group: Ref, volume: Ref) -> VolumeInfo:
        """Take a volume out of its group. Refused while the group has a pair."""
        with self._tx() as conn:
            grow = self._group_row(conn, group)
            vrow = self._volume_row(conn, volume)
            if vrow["group_id"] != grow["id"]:
                raise FailedPrecondition(
                    f"volume {vrow['name']!r} is not in group {grow['name']!r}"
                )
            self._refuse_if_paired(
                conn, grow, f"remove volume {vrow['name']!r} from group {grow['name']!r}"
            )
            conn.execute("UPDATE volumes SET group_id = NULL WHERE id = ?", (vrow["id"],))
            return _volume(self._volume_row(conn, vrow["id"]))

    def set_role(self, group: Ref, role: Role) -> GroupInfo:
        """Change the group's role here without an epoch change (e.g. a demotion that follows
        a peer's newer epoch already recorded). To promote with a new epoch, use
        `record_epoch(..., role=...)`, which does both in one transaction."""
        role = _enum(Role, role, "role")
        with self._tx() as conn:
            row = self._group_row(conn, group)
            conn.execute("UPDATE groups SET role = ? WHERE id = ?", (role.value, row["id"]))
            return _group(self._group_row(conn, row["id"]))

    # --- epochs --------------------------------------------------------------------------------

    def record_epoch(self, group: Ref, entry: EpochEntry, *, role: Role | None = None) -> GroupInfo:
        """Append `entry` to the group's epoch history and move the group to its epoch, in one
        transaction; with `role`, also set the role (promotion/demotion with its fencing epoch).
        The epoch must be greater than the group's current one (FailedPrecondition otherwise):
        epochs only grow, and past entries are never rewritten."""
        new_role = None if role is None else _enum(Role, role, "role")
        epoch = _int("epoch", entry.epoch, 1)
        prev_last_seq = _int("prev_last_seq", entry.prev_last_seq, 0)
        check_name("site", entry.primary_site)
        if not isinstance(entry.reason, str):
            raise InvalidArgument(f"epoch reason must be text, not {entry.reason!r}")
        if isinstance(entry.started_at, bool) or not isinstance(entry.started_at, int | float):
            raise InvalidArgument(f"epoch started_at must be a time, not {entry.started_at!r}")
        with self._tx() as conn:
            row = self._group_row(conn, group)
            if entry.group_id != row["id"]:
                raise InvalidArgument(
                    f"epoch entry names group id {entry.group_id}, not group {row['name']!r}"
                    f" (id {row['id']})"
                )
            if epoch <= row["epoch"]:
                raise FailedPrecondition(
                    f"group {row['name']!r} is at epoch {row['epoch']}; refusing epoch {epoch}:"
                    " epochs only grow"
                )
            conn.execute(
                "INSERT INTO epoch_history"
                " (group_id, epoch, primary_site, started_at, prev_last_seq, reason)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (
                    row["id"],
                    epoch,
                    entry.primary_site,
                    float(entry.started_at),
                    prev_last_seq,
                    entry.reason,
                ),
            )
            conn.execute(
                "UPDATE groups SET epoch = ?, role = ? WHERE id = ?",
                (epoch, row["role"] if new_role is None else new_role.value, row["id"]),
            )
            return _group(self._group_row(conn, row["id"]))

    def replace_history(
        self, group: Ref, history: Sequence[EpochEntry], *, snapshot: str, role: Role | None = None
    ) -> GroupInfo:
        """roles/: make `history` the group's epoch history (a fork's loser takes the survivor's,
        a resolve). Entries both share stay; every entry only this site has is archived in
        `epoch_history_discarded` with `snapshot` (the snapshot that keeps the data written under
        it) before it is deleted; the survivor's other entries are appended. The group moves to
        the last entry's epoch (which may be equal to or lower than its own). One transaction."""
        new_role = None if role is None else _enum(Role, role, "role")
        if not history:
            raise InvalidArgument("a replacement epoch history cannot be empty")
        for prev, entry in itertools.pairwise(history):
            if entry.epoch <= prev.epoch:
                raise InvalidArgument(
                    f"replacement history: epochs must grow ({prev.epoch} then {entry.epoch})"
                )

        def key(e: EpochEntry) -> tuple[int, str, float, int]:
            return (e.epoch, e.primary_site, float(e.started_at), e.prev_last_seq)

        with self._tx() as conn:
            row = self._group_row(conn, group)
            gid = row["id"]
            current = [
                _epoch(r)
                for r in conn.execute(
                    "SELECT * FROM epoch_history WHERE group_id = ? ORDER BY epoch", (gid,)
                )
            ]
            wanted = {key(e) for e in history}
            now = self._clock()
            for entry in current:
                if key(entry) in wanted:
                    continue
                conn.execute(
                    "INSERT OR IGNORE INTO epoch_history_discarded (group_id, epoch,"
                    " primary_site, started_at, prev_last_seq, reason, discarded_at, snapshot)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        gid,
                        entry.epoch,
                        entry.primary_site,
                        entry.started_at,
                        entry.prev_last_seq,
                        entry.reason,
                        now,
                        snapshot,
                    ),
                )
                conn.execute(
                    "DELETE FROM epoch_history WHERE group_id = ? AND epoch = ?",
                    (gid, entry.epoch),
                )
            kept = {key(e) for e in current}
            for entry in history:
                if key(entry) in kept:
                    continue
                conn.execute(
                    "INSERT INTO epoch_history"
                    " (group_id, epoch, primary_site, started_at, prev_last_seq, reason)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        gid,
                        _int("epoch", entry.epoch, 1),
                        check_name("site", entry.primary_site),
                        float(entry.started_at),
                        _int("prev_last_seq", entry.prev_last_seq, 0),
                        str(entry.reason),
                    ),
                )
            conn.execute(
                "UPDATE groups SET epoch = ?, role = ? WHERE id = ?",
                (
                    history[-1].epoch,
                    row["role"] if new_role is None else new_role.value,
                    gid,
                ),
            )
            return _group(self._group_row(conn, gid))

    def discarded_epochs(self, group: Ref) -> list[tuple[EpochEntry, str]]:
        """Epoch entries a resolve discarded, with the snapshot that keeps their data."""
        with self._read() as conn:
            gid = self._group_row(conn, group)["id"]
            rows = conn.execute(
                "SELECT * FROM epoch_history_discarded WHERE group_id = ?"
                " ORDER BY discarded_at, epoch",
                (gid,),
            ).fetchall()
            return [(_epoch(r), str(r["snapshot"])) for r in rows]

    def epoch_history(self, group: Ref) -> list[EpochEntry]:
        """The group's epoch history, oldest first."""
        with self._read() as conn:
            gid = self._group_row(conn, group)["id"]
            rows = conn.execute(
                "SELECT * FROM epoch_history WHERE group_id = ? ORDER BY epoch", (gid,)
            ).fetchall()
            return [_epoch(r) for r in rows]

    def set_checkpoint(
        self,
        group: Ref,
        *,
        applied_seq: int | None = None,
        acked_seq: int | None = None,
        rewind: bool = False,
    ) -> GroupInfo:
        """Record the journal checkpoints of a group. They only move forward unless `rewind`
        (a rollback to a restart point, a resync): a backward move without it raises
        FailedPrecondition, which catches out-of-order updates from concurrent threads."""
        values: dict[str, int] = {}
        if applied_seq is not None:
            values["applied_seq"] = _int("applied_seq", applied_seq, 0)
        if acked_seq is not None:
            values["acked_seq"] = _int("acked_seq", acked_seq, 0)
        with self._tx() as conn:
            row = self._group_row(conn, group)
            for column, value in values.items():
                if value < row[column] and not rewind:
                    raise FailedPrecondition(
                        f"group {row['name']!r}: {column} {value} is behind the recorded"
                        f" {row[column]}; pass rewind=True to move it back"
                    )
            if values:
                assignments = ", ".join(f"{column} = ?" for column in values)
                conn.execute(
                    f"UPDATE groups SET {assignments} WHERE id = ?", (*values.values(), row["id"])
                )
            return _group(self._group_row(conn, row["id"]))

    # --- pairs ---------------------------------------------------------------------------------

    @staticmethod
    def _pair_state(state: object) -> PairState:
        value = _enum(PairState, state, "pair state")
        if value is PairState.SIMPLEX:
            raise InvalidArgument("a pair is never simplex: simplex means no pair (delete it)")
        return value

    def create_pair(
        self,
        group: Ref,
        peer_site: str,
        mode: PairMode,
        *,
        state: PairState = PairState.COPYING,
        detail: str = "",
    ) -> PairInfo:
        """Pair a group with `peer_site`. A group has at most one pair; it starts `copying`
        (the initial copy) unless told otherwise."""
        check_name("site", peer_site)
        mode = _enum(PairMode, mode, "pair mode")
        state = self._pair_state(state)
        with self._tx() as conn:
            row = self._group_row(conn, group)
            if peer_site == self._site(conn):
                raise InvalidArgument(
                    f"cannot pair group {row['name']!r} with site {peer_site!r}: that is this site"
                )
            existing = self._pair_of(conn, row["id"])
            if existing is not None:
                raise AlreadyExists(
                    f"group {row['name']!r} already has a pair with site {existing['peer_site']!r}"
                )
            conn.execute(
                "INSERT INTO pairs (group_id, peer_site, mode, state, updated_at, detail)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (row["id"], peer_site, mode.value, state.value, self._clock(), str(detail)),
            )
            return _pair(self._need_pair(conn, row))

    def _need_pair(self, conn: sqlite3.Connection, group: sqlite3.Row) -> sqlite3.Row:
        pair = self._pair_of(conn, group["id"])
        if pair is None:
            raise NotFound(f"group {group['name']!r} has no pair")
        return pair

    def get_pair(self, group: Ref) -> PairInfo:
        with self._read() as conn:
            return _pair(self._need_pair(conn, self._group_row(conn, group)))

    def list_pairs(self) -> list[PairInfo]:
        with self._read() as conn:
            return [_pair(r) for r in conn.execute("SELECT * FROM pairs ORDER BY group_id")]

    def set_pair_state(self, group: Ref, state: PairState, detail: str = "") -> PairInfo:
        """Set the pair's state and its detail (the last error; empty clears it). Transitions
        are the roles layer's business; this store records what it decided."""
        state = self._pair_state(state)
        with self._tx() as conn:
            row = self._group_row(conn, group)
            self._need_pair(conn, row)
            conn.execute(
                "UPDATE pairs SET state = ?, detail = ?, updated_at = ? WHERE group_id = ?",
                (state.value, str(detail), self._clock(), row["id"]),
            )
            return _pair(self._need_pair(conn, row))

    def set_pair_roles(
        self,
        group: Ref,
        *,
        backlog_from_seq: int | EllipsisType | None = ...,
        survivor: str | EllipsisType | None = ...,
    ) -> PairInfo:
        """roles/: set (or clear with None) the pair's switchover backlog and pending survivor;
        a field left out is unchanged."""
        values: dict[str, object] = {}
        if backlog_from_seq is not ...:
            if backlog_from_seq is not None:
                backlog_from_seq = _int("backlog_from_seq", backlog_from_seq, 1)
            values["backlog_from_seq"] = backlog_from_seq
        if survivor is not ...:
            if survivor is not None:
                if not isinstance(survivor, str):
                    raise InvalidArgument(f"survivor must be a site name, not {survivor!r}")
                check_name("site", survivor)
            values["survivor"] = survivor
        with self._tx() as conn:
            row = self._group_row(conn, group)
            self._need_pair(conn, row)
            if values:
                assignments = ", ".join(f"{column} = ?" for column in values)
                conn.execute(
                    f"UPDATE pairs SET {assignments}, updated_at = ? WHERE group_id = ?",
                    (*values.values(), self._clock(), row["id"]),
                )
            return _pair(self._need_pair(conn, row))

    def set_pair_mode(self, group: Ref, mode: PairMode) -> PairInfo:
        mode = _enum(PairMode, mode, "pair mode")
        with self._tx() as conn:
            row = self._group_row(conn, group)
            self._need_pair(conn, row)
            conn.execute(
                "UPDATE pairs SET mode = ?, updated_at = ? WHERE group_id = ?",
                (mode.value, self._clock(), row["id"]),
            )
            return _pair(self._need_pair(conn, row))

    def delete_pair(self, group: Ref) -> None:
        with self._tx() as conn:
            row = self._group_row(conn, group)
            self._need_pair(conn, row)
            conn.execute("DELETE FROM pairs WHERE group_id = ?", (row["id"],))

    # --- snapshots -----------------------------------------------------------------------------

    def create_snapshot(
        self, volume: Ref, name: str, kind: SnapshotKind, *, epoch: int, seq: int
    ) -> SnapshotInfo:
        """Catalogue a snapshot of `volume` holding the image up to journal `seq` in `epoch`.
        Snapshot names are unique per volume."""
        check_name("snapshot", name)
        kind = _enum(SnapshotKind, kind, "snapshot kind")
        epoch = _int("snapshot epoch", epoch, 0)
        seq = _int("snapshot seq", seq, 0)
        with self._tx() as conn:
            vrow = self._volume_row(conn, volume)
            if conn.execute(
                "SELECT 1 FROM snapshots WHERE volume_id = ? AND name = ?", (vrow["id"], name)
            ).fetchone():
                raise AlreadyExists(f"snapshot {name!r} of volume {vrow['name']!r} already exists")
            cur = conn.execute(
                "INSERT INTO snapshots (volume_id, name, kind, created_at, epoch, seq)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (vrow["id"], name, kind.value, self._clock(), epoch, seq),
            )
            row = conn.execute(
                "SELECT * FROM snapshots WHERE id = ?", (int(cur.lastrowid or 0),)
            ).fetchone()
            return _snapshot(row)

    def _snapshot_row(self, conn: sqlite3.Connection, volume: Ref, name: str) -> sqlite3.Row:
        check_name("snapshot", name)
        vrow = self._volume_row(conn, volume)
        row = conn.execute(
            "SELECT * FROM snapshots WHERE volume_id = ? AND name = ?", (vrow["id"], name)
        ).fetchone()
        if row is None:
            raise NotFound(f"snapshot {name!r} of volume {vrow['name']!r} not found")
        assert isinstance(row, sqlite3.Row)
        return row

    def get_snapshot(self, volume: Ref, name: str) -> SnapshotInfo:
        with self._read() as conn:
            return _snapshot(self._snapshot_row(conn, volume, name))

    def get_snapshot_by_id(self, snapshot_id: int) -> SnapshotInfo:
        snapshot_id = _int("snapshot id", snapshot_id, 0)
        with self._read() as conn:
            row = conn.execute("SELECT * FROM snapshots WHERE id = ?", (snapshot_id,)).fetchone()
            if row is None:
                raise NotFound(f"snapshot id {snapshot_id} not found")
            return _snapshot(row)

    def list_snapshots(
        self, volume: Ref | None = None, *, kind: SnapshotKind | None = None
    ) -> list[SnapshotInfo]:
        """Snapshots by id (creation order), of every volume or of one, optionally one kind."""
        where: list[str] = []
        args: list[object] = []
        if kind is not None:
            where.append("kind = ?")
            args.append(_enum(SnapshotKind, kind, "snapshot kind").value)
        with self._read() as conn:
            if volume is not None:
                where.append("volume_id = ?")
                args.append(self._volume_row(conn, volume)["id"])
            clause = f" WHERE {' AND '.join(where)}" if where else ""
            rows = conn.execute(f"SELECT * FROM snapshots{clause} ORDER BY id", args).fetchall()
            return [_snapshot(r) for r in rows]

    def delete_snapshot(self, volume: Ref, name: str) -> None:
        with self._tx() as conn:
            row = self._snapshot_row(conn, volume, name)
            conn.execute("DELETE FROM snapshots WHERE id = ?", (row["id"],))


__all__ = ["DB_FILE_NAME", "MetadataStore", "Ref"]
