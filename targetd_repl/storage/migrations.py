"""Versioned schema migrations of the metadata store (`metadata.py`).

The schema version lives in SQLite's `PRAGMA user_version`; `MIGRATIONS[i]` takes the database
from version i to version i + 1. Each step runs in its own `BEGIN IMMEDIATE` transaction together
with the version bump and a `PRAGMA foreign_key_check`, so a crash or an error mid-step leaves the
database at the previous version, never half-migrated. A database newer than the code raises
`MetadataError`: we never downgrade silently.

Rules for new steps: append, never edit a released step; one step per schema change; statements
must be plain SQL run with `execute` (no `executescript`, which commits on its own) or a function
that uses the connection it is given. A step that rebuilds a table cannot switch foreign keys
off (the pragma is a no-op inside a transaction): copy, drop and rename within the step and let
the foreign-key check at its end catch mistakes.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from targetd_repl.errors import MetadataError

# `PRAGMA application_id`: marks the file as ours ("TREP"), so we never migrate a stranger's db.
APPLICATION_ID = 0x54524550


@dataclass(frozen=True, slots=True)
class Migration:
    """One schema step: to `version` (from `version - 1`), by statements or by a function."""

    version: int
    description: str
    statements: tuple[str, ...] = ()
    function: Callable[[sqlite3.Connection], None] | None = None

    def apply(self, conn: sqlite3.Connection) -> None:
        for statement in self.statements:
            conn.execute(statement)
        if self.function is not None:
            self.function(conn)


_V1_INITIAL = Migration(
    1,
    "initial schema: site, volumes, groups, pairs, epoch history, snapshots",
    (
        f"PRAGMA application_id = {APPLICATION_ID}",
        """CREATE TABLE site (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            name TEXT NOT NULL,
            created_at REAL NOT NULL
        )""",
        """CREATE TABLE groups (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            name TEXT NOT NULL UNIQUE,
            role TEXT NOT NULL,
            epoch INTEGER NOT NULL CHECK (epoch >= 0),
            created_at REAL NOT NULL
        )""",
        """CREATE TABLE volumes (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            name TEXT NOT NULL UNIQUE,
            size_bytes INTEGER NOT NULL CHECK (size_bytes > 0),
            block_size INTEGER NOT NULL CHECK (block_size IN (512, 4096)),
            group_id INTEGER REFERENCES groups (id) ON DELETE RESTRICT,
            created_at REAL NOT NULL,
            CHECK (size_bytes % block_size = 0)
        )""",
        "CREATE INDEX volumes_group_id ON volumes (group_id)",
        """CREATE TABLE pairs (
            group_id INTEGER PRIMARY KEY REFERENCES groups (id) ON DELETE RESTRICT,
            peer_site TEXT NOT NULL,
            mode TEXT NOT NULL,
            state TEXT NOT NULL,
            updated_at REAL NOT NULL
        )""",
        """CREATE TABLE epoch_history (
            group_id INTEGER NOT NULL REFERENCES groups (id) ON DELETE CASCADE,
            epoch INTEGER NOT NULL CHECK (epoch >= 1),
            primary_site TEXT NOT NULL,
            started_at REAL NOT NULL,
            prev_last_seq INTEGER NOT NULL CHECK (prev_last_seq >= 0),
            reason TEXT NOT NULL,
            PRIMARY KEY (group_id, epoch)
        ) WITHOUT ROWID""",
        """CREATE TABLE snapshots (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            volume_id INTEGER NOT NULL REFERENCES volumes (id) ON DELETE RESTRICT,
            name TEXT NOT NULL,
            kind TEXT NOT NULL,
            created_at REAL NOT NULL,
            epoch INTEGER NOT NULL CHECK (epoch >= 0),
            seq INTEGER NOT NULL CHECK (seq >= 0),
            UNIQUE (volume_id, name)
        )""",
    ),
)

_V2_BOOKKEEPING = Migration(
    2,
    "journal bookkeeping on groups (applied_seq, acked_seq) and the pair's last error (detail)",
    (
        "ALTER TABLE groups ADD COLUMN applied_seq INTEGER NOT NULL DEFAULT 0"
        " CHECK (applied_seq >= 0)",
        "ALTER TABLE groups ADD COLUMN acked_seq INTEGER NOT NULL DEFAULT 0 CHECK (acked_seq >= 0)",
        "ALTER TABLE pairs ADD COLUMN detail TEXT NOT NULL DEFAULT ''",
    ),
)

# The handshake detects split-brain by comparing epoch histories, so a past entry must never
# change. The API offers no update or delete; these triggers make the database refuse them too.
# Deleting the whole group (cascade) stays possible: the guard only fires while the group exists.
_V3_APPEND_ONLY = Migration(
    3,
    "epoch history is append-only (triggers refuse update and delete of entries)",
    (
        """CREATE TRIGGER epoch_history_no_update BEFORE UPDATE ON epoch_history
        BEGIN
            SELECT RAISE(ABORT, 'epoch_history is append-only');
        END""",
        """CREATE TRIGGER epoch_history_no_delete BEFORE DELETE ON epoch_history
        WHEN EXISTS (SELECT 1 FROM groups WHERE id = OLD.group_id)
        BEGIN
            SELECT RAISE(ABORT, 'epoch_history is append-only');
        END""",
    ),
)

# Role changes (roles/): what the handshake must remember across restarts (a switchover's
# undrained backlog, a pending resolve's survivor), and the one way an epoch entry may leave the
# history: a fork's loser replaces its history with the survivor's, and every discarded entry is
# archived first (with the snapshot that keeps the loser's data), so the delete guard of step 3
# still refuses any deletion that left no trace.
_V4_ROLES = Migration(
    4,
    "pair backlog_from_seq and survivor; archive of epoch entries discarded by a resolve",
    (
        "ALTER TABLE pairs ADD COLUMN backlog_from_seq INTEGER CHECK (backlog_from_seq >= 1)",
        "ALTER TABLE pairs ADD COLUMN survivor TEXT",
        """CREATE TABLE epoch_history_discarded (
            group_id INTEGER NOT NULL REFERENCES groups (id) ON DELETE CASCADE,
            epoch INTEGER NOT NULL,
            primary_site TEXT NOT NULL,
            started_at REAL NOT NULL,
            prev_last_seq INTEGER NOT NULL,
            reason TEXT NOT NULL,
            discarded_at REAL NOT NULL,
            snapshot TEXT NOT NULL,
            PRIMARY KEY (group_id, epoch, started_at, primary_site)
        ) WITHOUT ROWID""",
        "DROP TRIGGER epoch_history_no_delete",
        """CREATE TRIGGER epoch_history_no_delete BEFORE DELETE ON epoch_history
        WHEN EXISTS (SELECT 1 FROM groups WHERE id = OLD.group_id)
            AND NOT EXISTS (
                SELECT 1 FROM epoch_history_discarded d
                WHERE d.group_id = OLD.group_id AND d.epoch = OLD.epoch
                    AND d.started_at = OLD.started_at AND d.primary_site = OLD.primary_site)
        BEGIN
            SELECT RAISE(ABORT, 'epoch_history is append-only');
        END""",
    ),
)

MIGRATIONS: tuple[Migration, ...] = (_V1_INITIAL, _V2_BOOKKEEPING, _V3_APPEND_ONLY, _V4_ROLES)
SCHEMA_VERSION = len(MIGRATIONS)


def schema_version(conn: sqlite3.Connection) -> int:
    row = conn.execute("PRAGMA user_version").fetchone()
    return int(row[0])


def _check_sequence(migrations: Sequence[Migration]) -> None:
    for index, step in enumerate(migrations, start=1):
        if step.version != index:
            raise ValueError(f"migration #{index} declares version {step.version}")


def _check_ownership(conn: sqlite3.Connection, where: str) -> None:
    app_id = int(conn.execute("PRAGMA application_id").fetchone()[0])
    if app_id == APPLICATION_ID:
        return
    if app_id != 0 or schema_version(conn) != 0:
        raise MetadataError(
            f"{where} is not a targetd-repl metadata database"
            f" (application_id {app_id:#x}, user_version {schema_version(conn)})"
        )
    if conn.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchone() is not None:
        raise MetadataError(
            f"{where} already holds tables but is not a targetd-repl metadata database"
        )


def migrate(
    conn: sqlite3.Connection,
    migrations: Sequence[Migration] = MIGRATIONS,
    *,
    where: str = "metadata database",
) -> int:
    """Bring the database up to `len(migrations)`, one transaction per step; return the version.

    `conn` must be in autocommit mode (`isolation_level=None`) with no open transaction.
    Safe against a concurrent opener: each step re-reads the version under the write lock.
    """
    _check_sequence(migrations)
    latest = len(migrations)
    while True:
        conn.execute("BEGIN IMMEDIATE")
        try:
            _check_ownership(conn, where)
            current = schema_version(conn)
            if current > latest:
                raise MetadataError(
                    f"{where} has schema version {current}, newer than this code supports"
                    f" ({latest}): upgrade targetd-repl; refusing to downgrade"
                )
            if current == latest:
                conn.execute("COMMIT")
                return current
            step = migrations[current]
            try:
                step.apply(conn)
                conn.execute(f"PRAGMA user_version = {step.version}")
                problems = conn.execute("PRAGMA foreign_key_check").fetchall()
            except (sqlite3.Error, ValueError, TypeError, LookupError) as exc:
                raise MetadataError(
                    f"{where}: migration to version {step.version} ({step.description})"
                    f" failed: {exc}"
                ) from exc
            if problems:
                raise MetadataError(
                    f"{where}: migration to version {step.version} leaves"
                    f" {len(problems)} foreign-key violations, first {tuple(problems[0])}"
                )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
