"""Unit tests of the metadata store (targetd_repl/storage/metadata.py and migrations.py)."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from targetd_repl.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    MetadataError,
    NotFound,
)
from targetd_repl.model import (
    EpochEntry,
    PairMode,
    PairState,
    Role,
    SnapshotKind,
)
from targetd_repl.storage.metadata import DB_FILE_NAME, MetadataStore
from targetd_repl.storage.migrations import (
    APPLICATION_ID,
    MIGRATIONS,
    SCHEMA_VERSION,
    Migration,
    migrate,
)

SITE = "site-a"
PEER = "site-b"


class Clock:
    """A deterministic clock: every reading is one second after the previous one."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / DB_FILE_NAME


@pytest.fixture
def store(db_path: Path, clock: Clock) -> Iterator[MetadataStore]:
    with MetadataStore.open(db_path, site=SITE, clock=clock) as s:
        yield s


def raw(path: Path) -> sqlite3.Connection:
    """A second, plain connection to inspect the file as another process would."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.row_factory = sqlite3.Row
    return conn


def entry(group_id: int, epoch: int, site: str = SITE, prev: int = 0) -> EpochEntry:
    return EpochEntry(group_id, epoch, site, 2000.0 + epoch, prev, f"test epoch {epoch}")


# --- open, close, settings ---------------------------------------------------------------------


def test_open_creates_db_with_durable_settings(store: MetadataStore, db_path: Path) -> None:
    assert db_path.exists()
    conn = store._live()  # the store's own connection: per-connection pragmas
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] > 0
    other = raw(db_path)
    assert other.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert other.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
    other.close()
    store.check_integrity()


def test_open_in_state_dir(tmp_path: Path) -> None:
    with MetadataStore.open_in(tmp_path, site=SITE) as s:
        assert s.path == tmp_path / "metadata.db"
        assert s.site_name() == SITE


def test_open_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(MetadataError, match="no such directory"):
        MetadataStore.open(tmp_path / "nope" / DB_FILE_NAME)


def test_open_garbage_file(db_path: Path) -> None:
    db_path.write_bytes(b"this is not a database at all" * 100)
    with pytest.raises(MetadataError, match=str(db_path)):
        MetadataStore.open(db_path)


def test_open_foreign_sqlite_db(db_path: Path) -> None:
    conn = raw(db_path)
    conn.execute("CREATE TABLE theirs (x)")
    conn.close()
    with pytest.raises(MetadataError, match="not a targetd-repl metadata database"):
        MetadataStore.open(db_path)
    conn = raw(db_path)
    conn.execute("PRAGMA application_id = 42")
    conn.close()
    with pytest.raises(MetadataError, match="not a targetd-repl metadata database"):
        MetadataStore.open(db_path)


def test_open_newer_schema_refuses_downgrade(db_path: Path) -> None:
    MetadataStore.open(db_path).close()
    conn = raw(db_path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(
        MetadataError, match=r"newer than this code supports.*refusing to downgrade"
    ):
        MetadataStore.open(db_path)
    conn = raw(db_path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1
    conn.close()


def test_close_is_idempotent_and_final(db_path: Path) -> None:
    s = MetadataStore.open(db_path, site=SITE)
    s.close()
    s.close()
    with pytest.raises(MetadataError, match="closed"):
        s.list_volumes()
    with pytest.raises(MetadataError, match="closed"):
        s.create_volume("v", 4096, 512)


def test_data_survives_reopen(db_path: Path) -> None:
    with MetadataStore.open(db_path, site=SITE) as s:
        v = s.create_volume("db1", 1 << 20, 4096)
        g = s.create_group("g1", Role.PRIMARY)
        s.add_volume_to_group("g1", "db1")
        s.create_pair("g1", PEER, PairMode.SYNC)
        s.create_snapshot("db1", "s1", SnapshotKind.USER, epoch=1, seq=7)
    with MetadataStore.open(db_path) as s:
        assert s.site_name() == SITE
        assert s.get_volume("db1") == s.get_volume_by_id(v.id)
        assert s.get_volume("db1").group_id == g.id
        assert s.get_group("g1") == g
        assert s.get_pair("g1").mode is PairMode.SYNC
        assert s.get_snapshot("db1", "s1").seq == 7
        assert len(s.epoch_history(g.id)) == 1


def test_sqlite_failure_becomes_metadata_error(store: MetadataStore) -> None:
    # Simulate a failure under the API (here: a schema defect) and check the mapping + rollback.
    conn = store._live()
    conn.execute("DROP TABLE snapshots")
    store.create_volume("v", 4096, 512)
    with pytest.raises(MetadataError, match="no such table"):
        store.create_snapshot("v", "s", SnapshotKind.USER, epoch=0, seq=0)
    assert not conn.in_transaction
    assert [v.name for v in store.list_volumes()] == ["v"]


# --- site ----------------------------------------------------------------------------------


def test_site_name_set_once(db_path: Path) -> None:
    with MetadataStore.open(db_path) as s:
        assert s.site_name() is None
        s.set_site_name(SITE)
        s.set_site_name(SITE)  # the same name again: no-op
        assert s.site_name() == SITE
        with pytest.raises(FailedPrecondition, match=r"already named 'site-a'.*'site-c'"):
            s.set_site_name("site-c")
        with pytest.raises(InvalidArgument, match="invalid site name"):
            s.set_site_name("bad name")
    with pytest.raises(FailedPrecondition, match="refusing to rename"):
        MetadataStore.open(db_path, site="site-c")
    with MetadataStore.open(db_path, site=SITE) as s:
        assert s.site_name() == SITE


# --- volumes -------------------------------------------------------------------------------


def test_create_get_list_volumes(store: MetadataStore) -> None:
    v1 = store.create_volume("db1", 10 * 4096, 4096)
    v2 = store.create_volume("db2", 3 * 512, 512)
    assert (v1.name, v1.size_bytes, v1.block_size, v1.group_id) == ("db1", 40960, 4096, None)
    assert v1.num_blocks == 10
    assert v1.created_at < v2.created_at
    assert store.get_volume("db1") == v1
    assert store.get_volume(v2.id) == v2
    assert store.get_volume_by_id(v1.id) == v1
    assert store.list_volumes() == [v1, v2]


def test_create_volume_errors(store: MetadataStore) -> None:
    store.create_volume("db1", 4096, 512)
    with pytest.raises(AlreadyExists, match="volume 'db1' already exists"):
        store.create_volume("db1", 8192, 4096)
    with pytest.raises(InvalidArgument, match="invalid volume name"):
        store.create_volume("-bad", 4096, 512)
    with pytest.raises(InvalidArgument, match="invalid volume name"):
        store.create_volume("", 4096, 512)
    with pytest.raises(InvalidArgument, match="block size 1024"):
        store.create_volume("v", 4096, 1024)
    with pytest.raises(InvalidArgument, match="not a multiple of its block size"):
        store.create_volume("v", 4096 + 512, 4096)
    for bad in (0, -4096, True, 4096.0, "4096", 2**64):
        with pytest.raises(InvalidArgument, match="size of volume 'v'"):
            store.create_volume("v", bad, 512)  # type: ignore[arg-type]
    assert [v.name for v in store.list_volumes()] == ["db1"]


def test_volume_not_found(store: MetadataStore) -> None:
    with pytest.raises(NotFound, match="volume 'db1' not found"):
        store.get_volume("db1")
    with pytest.raises(NotFound, match="volume id 99 not found"):
        store.get_volume_by_id(99)
    with pytest.raises(NotFound, match="volume 'db1' not found"):
        store.resize_volume("db1", 8192)
    with pytest.raises(NotFound, match="volume 'db1' not found"):
        store.delete_volume("db1")
    with pytest.raises(InvalidArgument, match="invalid volume name"):
        store.get_volume("no/slash")
    with pytest.raises(InvalidArgument):
        store.get_volume_by_id("db1")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        store.get_volume(1.5)  # type: ignore[arg-type]


def test_resize_volume(store: MetadataStore) -> None:
    v = store.create_volume("db1", 4 * 4096, 4096)
    grown = store.resize_volume("db1", 8 * 4096)
    assert grown.size_bytes == 8 * 4096 and grown.id == v.id and grown.created_at == v.created_at
    assert store.resize_volume(v.id, 8 * 4096).size_bytes == 8 * 4096  # same size: no-op
    with pytest.raises(FailedPrecondition, match="refusing to shrink volume 'db1'"):
        store.resize_volume("db1", 4096)
    with pytest.raises(InvalidArgument, match="not a multiple"):
        store.resize_volume("db1", 9 * 4096 + 512)
    with pytest.raises(InvalidArgument):
        store.resize_volume("db1", 0)
    assert store.get_volume("db1").size_bytes == 8 * 4096


def test_delete_volume(store: MetadataStore) -> None:
    v = store.create_volume("db1", 4096, 512)
    store.delete_volume("db1")
    assert store.list_volumes() == []
    again = store.create_volume("db1", 4096, 512)
    assert again.id != v.id  # ids are never reused
    store.delete_volume(again.id)


def test_delete_volume_with_snapshots_or_group_refused(store: MetadataStore) -> None:
    store.create_volume("db1", 4096, 512)
    store.create_snapshot("db1", "s1", SnapshotKind.USER, epoch=0, seq=0)
    store.create_snapshot("db1", "s2", SnapshotKind.RESTART_POINT, epoch=0, seq=0)
    with pytest.raises(FailedPrecondition, match=r"'db1' still has 2 snapshot\(s\) \(s1, s2\)"):
        store.delete_volume("db1")
    store.delete_snapshot("db1", "s1")
    store.delete_snapshot("db1", "s2")
    store.create_group("g1", Role.PRIMARY)
    store.add_volume_to_group("g1", "db1")
    with pytest.raises(FailedPrecondition, match="'db1' belongs to group 'g1'"):
        store.delete_volume("db1")
    store.remove_volume_from_group("g1", "db1")
    store.delete_volume("db1")


# --- groups --------------------------------------------------------------------------------


def test_create_primary_group_starts_epoch_1_naming_this_site(store: MetadataStore) -> None:
    g = store.create_group("g1", Role.PRIMARY)
    assert (g.name, g.role, g.epoch, g.applied_seq, g.acked_seq) == ("g1", Role.PRIMARY, 1, 0, 0)
    assert store.epoch_history("g1") == [EpochEntry(g.id, 1, SITE, g.created_at, 0, "created")]


def test_create_secondary_group_has_no_history_until_it_adopts_one(store: MetadataStore) -> None:
    g = store.create_group("g1", "secondary")  # type: ignore[arg-type]
    assert (g.role, g.epoch) == (Role.SECONDARY, 0)
    assert store.epoch_history(g.id) == []
    # The first handshake adopts the primary's history, entry by entry.
    peer_history = [entry(g.id, 1, PEER), entry(g.id, 2, PEER, prev=10)]
    for e in peer_history:
        store.record_epoch(g.id, e)
    assert store.epoch_history(g.id) == peer_history
    assert store.get_group(g.id).epoch == 2


def test_create_group_errors(db_path: Path) -> None:
    with MetadataStore.open(db_path) as s:
        with pytest.raises(FailedPrecondition, match="site's name is not set"):
            s.create_group("g1", Role.PRIMARY)
        s.create_group("g0", Role.SECONDARY)  # needs no site name
        s.set_site_name(SITE)
        s.create_group("g1", Role.PRIMARY)
        with pytest.raises(AlreadyExists, match="group 'g1' already exists"):
            s.create_group("g1", Role.SECONDARY)
        with pytest.raises(InvalidArgument, match="invalid role 'master'"):
            s.create_group("g2", "master")  # type: ignore[arg-type]
        with pytest.raises(InvalidArgument, match="invalid group name"):
            s.create_group("g 2", Role.PRIMARY)
        assert [g.name for g in s.list_groups()] == ["g0", "g1"]


def test_group_lookups(store: MetadataStore) -> None:
    g1 = store.create_group("g1", Role.PRIMARY)
    g2 = store.create_group("g2", Role.SECONDARY)
    assert store.get_group("g1") == g1 == store.get_group_by_id(g1.id)
    assert store.list_groups() == [g1, g2]
    with pytest.raises(NotFound, match="group 'g3' not found"):
        store.get_group("g3")
    with pytest.raises(NotFound, match="group id 77 not found"):
        store.get_group_by_id(77)
    with pytest.raises(InvalidArgument):
        store.get_group_by_id(True)
    with pytest.raises(NotFound, match="group 'g3' not found"):
        store.list_volumes("g3")
    with pytest.raises(NotFound, match="group 'g3' not found"):
        store.epoch_history("g3")


def test_add_and_remove_volumes(store: MetadataStore) -> None:
    g1 = store.create_group("g1", Role.PRIMARY)
    g2 = store.create_group("g2", Role.PRIMARY)
    store.create_volume("a", 4096, 512)
    store.create_volume("b", 4096, 512)
    store.create_volume("c", 4096, 512)
    assert store.add_volume_to_group("g1", "a").group_id == g1.id
    assert store.add_volume_to_group(g1.id, "b").group_id == g1.id
    assert store.add_volume_to_group("g1", "a").group_id == g1.id  # again: no-op
    assert [v.name for v in store.list_volumes("g1")] == ["a", "b"]
    assert store.list_volumes(g2.id) == []
    with pytest.raises(FailedPrecondition, match="'a' already belongs to group 'g1'"):
        store.add_volume_to_group("g2", "a")
    with pytest.raises(FailedPrecondition, match="'c' is not in group 'g1'"):
        store.remove_volume_from_group("g1", "c")
    with pytest.raises(FailedPrecondition, match="'a' is not in group 'g2'"):
        store.remove_volume_from_group("g2", "a")
    with pytest.raises(NotFound, match="volume 'zz' not found"):
        store.add_volume_to_group("g1", "zz")
    with pytest.raises(NotFound, match="group 'zz' not found"):
        store.add_volume_to_group("zz", "c")
    assert store.remove_volume_from_group("g1", "a").group_id is None
    assert store.add_volume_to_group("g2", "a").group_id == g2.id


def test_group_membership_frozen_while_paired(store: MetadataStore) -> None:
    store.create_group("g1", Role.PRIMARY)
    store.create_volume("a", 4096, 512)
    store.create_volume("b", 4096, 512)
    store.add_volume_to_group("g1", "a")
    store.create_pair("g1", PEER, PairMode.ASYNC)
    with pytest.raises(FailedPrecondition, match="'g1' is paired with site 'site-b'"):
        store.add_volume_to_group("g1", "b")
    with pytest.raises(FailedPrecondition, match="'g1' is paired with site 'site-b'"):
        store.remove_volume_from_group("g1", "a")
    store.delete_pair("g1")
    store.add_volume_to_group("g1", "b")


def test_delete_group(store: MetadataStore, db_path: Path) -> None:
    g = store.create_group("g1", Role.PRIMARY)
    store.record_epoch(g.id, entry(g.id, 2))
    store.create_volume("a", 4096, 512)
    store.add_volume_to_group("g1", "a")
    with pytest.raises(FailedPrecondition, match=r"'g1' still has 1 volume\(s\) \(a\)"):
        store.delete_group("g1")
    store.remove_volume_from_group("g1", "a")
    store.create_pair("g1", PEER, PairMode.ASYNC)
    with pytest.raises(
        FailedPrecondition, match=r"cannot delete group 'g1'.*delete the pair first"
    ):
        store.delete_group("g1")
    store.delete_pair("g1")
    store.delete_group("g1")
    with pytest.raises(NotFound):
        store.get_group("g1")
    with pytest.raises(NotFound):
        store.delete_group("g1")
    conn = raw(db_path)  # the history went with the group
    assert conn.execute("SELECT COUNT(*) FROM epoch_history").fetchone()[0] == 0
    conn.close()
    assert store.create_group("g1", Role.PRIMARY).id != g.id


def test_set_role(store: MetadataStore) -> None:
    g = store.create_group("g1", Role.PRIMARY)
    demoted = store.set_role("g1", Role.SECONDARY)
    assert demoted.role is Role.SECONDARY and demoted.epoch == g.epoch
    assert store.get_group(g.id).role is Role.SECONDARY
    with pytest.raises(InvalidArgument, match="invalid role"):
        store.set_role("g1", "boss")  # type: ignore[arg-type]
    with pytest.raises(NotFound):
        store.set_role("nope", Role.PRIMARY)


# --- epochs --------------------------------------------------------------------------------


def test_record_epoch_bumps_and_appends(store: MetadataStore) -> None:
    g = store.create_group("g1", Role.SECONDARY)
    store.record_epoch(g.id, entry(g.id, 1, PEER))
    promoted = store.record_epoch("g1", entry(g.id, 5, SITE, prev=42), role=Role.PRIMARY)
    assert (promoted.epoch, promoted.role) == (5, Role.PRIMARY)  # epochs may jump
    history = store.epoch_history("g1")
    assert [(e.epoch, e.primary_site, e.prev_last_seq) for e in history] == [
        (1, PEER, 0),
        (5, SITE, 42),
    ]
    assert history[1] == entry(g.id, 5, SITE, prev=42)


def test_record_epoch_refuses_non_increasing_and_changes_nothing(store: MetadataStore) -> None:
    g = store.create_group("g1", Role.PRIMARY)
    store.record_epoch(g.id, entry(g.id, 3))
    before = (store.get_group(g.id), store.epoch_history(g.id))
    for epoch in (3, 2):
        with pytest.raises(FailedPrecondition, match=f"'g1' is at epoch 3; refusing epoch {epoch}"):
            store.record_epoch(g.id, entry(g.id, epoch, PEER), role=Role.SECONDARY)
    assert (store.get_group(g.id), store.epoch_history(g.id)) == before


def test_record_epoch_validation(store: MetadataStore) -> None:
    g = store.create_group("g1", Role.PRIMARY)
    other = store.create_group("g2", Role.PRIMARY)
    with pytest.raises(InvalidArgument, match="names group id"):
        store.record_epoch(g.id, entry(other.id, 2))
    with pytest.raises(InvalidArgument, match="epoch 0 out of range"):
        store.record_epoch(g.id, entry(g.id, 0))
    with pytest.raises(InvalidArgument, match="prev_last_seq"):
        store.record_epoch(g.id, EpochEntry(g.id, 2, SITE, 1.0, -1, "x"))
    with pytest.raises(InvalidArgument, match="invalid site name"):
        store.record_epoch(g.id, EpochEntry(g.id, 2, "a b", 1.0, 0, "x"))
    with pytest.raises(InvalidArgument, match="started_at"):
        store.record_epoch(g.id, EpochEntry(g.id, 2, SITE, "now", 0, "x"))  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="invalid role"):
        store.record_epoch(g.id, entry(g.id, 2), role="x")  # type: ignore[arg-type]
    with pytest.raises(NotFound, match="group 'g9' not found"):
        store.record_epoch("g9", entry(g.id, 2))
    assert store.get_group(g.id).epoch == 1
    assert len(store.epoch_history(g.id)) == 1


def test_epoch_history_is_append_only_in_the_schema(store: MetadataStore, db_path: Path) -> None:
    g = store.create_group("g1", Role.PRIMARY)
    conn = raw(db_path)
    conn.execute("PRAGMA foreign_keys = ON")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("UPDATE epoch_history SET primary_site = 'evil' WHERE group_id = ?", (g.id,))
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("DELETE FROM epoch_history WHERE group_id = ?", (g.id,))
    conn.close()
    assert store.epoch_history(g.id)[0].primary_site == SITE


# --- checkpoints ---------------------------------------------------------------------------


def test_set_checkpoint(store: MetadataStore) -> None:
    g = store.create_group("g1", Role.PRIMARY)
    assert store.set_checkpoint(g.id, applied_seq=10).applied_seq == 10
    after = store.set_checkpoint("g1", acked_seq=7)
    assert (after.applied_seq, after.acked_seq) == (10, 7)
    assert store.set_checkpoint(g.id) == after  # nothing asked: nothing changes
    both = store.set_checkpoint(g.id, applied_seq=12, acked_seq=12)
    assert (both.applied_seq, both.acked_seq) == (12, 12)
    assert store.set_checkpoint(g.id, applied_seq=12).applied_seq == 12  # equal is fine
    with pytest.raises(FailedPrecondition, match="applied_seq 11 is behind the recorded 12"):
        store.set_checkpoint(g.id, applied_seq=11)
    with pytest.raises(FailedPrecondition, match="acked_seq 3 is behind"):
        store.set_checkpoint(g.id, applied_seq=20, acked_seq=3)
    assert store.get_group(g.id).applied_seq == 12  # the failed call changed nothing
    rewound = store.set_checkpoint(g.id, applied_seq=5, acked_seq=0, rewind=True)
    assert (rewound.applied_seq, rewound.acked_seq) == (5, 0)
    with pytest.raises(InvalidArgument, match="applied_seq"):
        store.set_checkpoint(g.id, applied_seq=-1)
    with pytest.raises(NotFound):
        store.set_checkpoint("nope", applied_seq=1)
    assert store.get_group(g.id) == rewound


# --- pairs ---------------------------------------------------------------------------------


def test_pairs(store: MetadataStore, clock: Clock) -> None:
    g1 = store.create_group("g1", Role.PRIMARY)
    g2 = store.create_group("g2", Role.SECONDARY)
    p1 = store.create_pair("g1", PEER, PairMode.ASYNC)
    assert (p1.group_id, p1.peer_site, p1.mode, p1.state, p1.detail) == (
        g1.id,
        PEER,
        PairMode.ASYNC,
        PairState.COPYING,
        "",
    )
    p2 = store.create_pair(g2.id, "site-c", "sync", state=PairState.PAIRED)  # type: ignore[arg-type]
    assert p2.mode is PairMode.SYNC and p2.state is PairState.PAIRED
    assert store.get_pair("g1") == p1
    assert store.list_pairs() == [p1, p2]

    err = store.set_pair_state("g1", PairState.SUSPENDED_ERROR, detail="link down: timeout")
    assert (err.state, err.detail) == (PairState.SUSPENDED_ERROR, "link down: timeout")
    assert err.updated_at > p1.updated_at
    ok = store.set_pair_state(g1.id, PairState.PAIRED)
    assert (ok.state, ok.detail) == (PairState.PAIRED, "")  # the detail is cleared
    assert store.set_pair_mode("g1", PairMode.SYNC).mode is PairMode.SYNC
    assert store.get_pair("g1").state is PairState.PAIRED

    store.delete_pair("g1")
    with pytest.raises(NotFound, match="group 'g1' has no pair"):
        store.get_pair("g1")
    assert store.list_pairs() == [p2]


def test_pair_errors(store: MetadataStore) -> None:
    store.create_group("g1", Role.PRIMARY)
    store.create_pair("g1", PEER, PairMode.ASYNC)
    with pytest.raises(AlreadyExists, match="'g1' already has a pair with site 'site-b'"):
        store.create_pair("g1", "site-c", PairMode.ASYNC)
    store.create_group("g2", Role.PRIMARY)
    with pytest.raises(InvalidArgument, match="that is this site"):
        store.create_pair("g2", SITE, PairMode.ASYNC)
    with pytest.raises(InvalidArgument, match="invalid site name"):
        store.create_pair("g2", "", PairMode.ASYNC)
    with pytest.raises(InvalidArgument, match="invalid pair mode 'semi'"):
        store.create_pair("g2", PEER, "semi")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="simplex means no pair"):
        store.create_pair("g2", PEER, PairMode.ASYNC, state=PairState.SIMPLEX)
    with pytest.raises(InvalidArgument, match="simplex means no pair"):
        store.set_pair_state("g1", PairState.SIMPLEX)
    with pytest.raises(InvalidArgument, match="invalid pair state 'broken'"):
        store.set_pair_state("g1", "broken")  # type: ignore[arg-type]
    with pytest.raises(NotFound, match="group 'g2' has no pair"):
        store.set_pair_state("g2", PairState.PAIRED)
    with pytest.raises(NotFound, match="group 'g2' has no pair"):
        store.set_pair_mode("g2", PairMode.SYNC)
    with pytest.raises(NotFound, match="group 'g2' has no pair"):
        store.delete_pair("g2")
    with pytest.raises(NotFound, match="group 'g3' not found"):
        store.create_pair("g3", PEER, PairMode.ASYNC)
    assert len(store.list_pairs()) == 1


# --- snapshots -----------------------------------------------------------------------------


def test_snapshots(store: MetadataStore) -> None:
    a = store.create_volume("a", 4096, 512)
    b = store.create_volume("b", 4096, 512)
    s1 = store.create_snapshot("a", "s1", SnapshotKind.USER, epoch=1, seq=10)
    s2 = store.create_snapshot(a.id, "rp", SnapshotKind.RESTART_POINT, epoch=2, seq=20)
    s3 = store.create_snapshot("b", "s1", "rollback-save", epoch=0, seq=0)  # type: ignore[arg-type]
    assert (s1.volume_id, s1.name, s1.kind, s1.epoch, s1.seq) == (
        a.id,
        "s1",
        SnapshotKind.USER,
        1,
        10,
    )
    assert s3.kind is SnapshotKind.ROLLBACK_SAVE and s3.volume_id == b.id
    assert store.get_snapshot("a", "s1") == s1 == store.get_snapshot_by_id(s1.id)
    assert store.list_snapshots() == [s1, s2, s3]
    assert store.list_snapshots("a") == [s1, s2]
    assert store.list_snapshots(b.id) == [s3]
    assert store.list_snapshots(kind=SnapshotKind.RESTART_POINT) == [s2]
    assert store.list_snapshots("b", kind=SnapshotKind.USER) == []
    store.delete_snapshot("a", "s1")
    assert store.list_snapshots("a") == [s2]
    assert store.get_snapshot("b", "s1") == s3


def test_snapshot_errors(store: MetadataStore) -> None:
    store.create_volume("a", 4096, 512)
    store.create_snapshot("a", "s1", SnapshotKind.USER, epoch=0, seq=0)
    with pytest.raises(AlreadyExists, match="snapshot 's1' of volume 'a' already exists"):
        store.create_snapshot("a", "s1", SnapshotKind.EXTENT_COPY, epoch=0, seq=0)
    with pytest.raises(NotFound, match="volume 'zz' not found"):
        store.create_snapshot("zz", "s1", SnapshotKind.USER, epoch=0, seq=0)
    with pytest.raises(InvalidArgument, match="invalid snapshot name"):
        store.create_snapshot("a", "s/1", SnapshotKind.USER, epoch=0, seq=0)
    with pytest.raises(InvalidArgument, match="invalid snapshot kind 'cow'"):
        store.create_snapshot("a", "s2", "cow", epoch=0, seq=0)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="snapshot seq"):
        store.create_snapshot("a", "s2", SnapshotKind.USER, epoch=0, seq=-1)
    with pytest.raises(InvalidArgument, match="snapshot epoch"):
        store.create_snapshot("a", "s2", SnapshotKind.USER, epoch=-1, seq=0)
    with pytest.raises(NotFound, match="snapshot 's2' of volume 'a' not found"):
        store.get_snapshot("a", "s2")
    with pytest.raises(NotFound, match="snapshot 's2' of volume 'a' not found"):
        store.delete_snapshot("a", "s2")
    with pytest.raises(NotFound, match="snapshot id 999 not found"):
        store.get_snapshot_by_id(999)
    with pytest.raises(NotFound, match="volume 'zz' not found"):
        store.list_snapshots("zz")
    with pytest.raises(InvalidArgument, match="invalid snapshot kind"):
        store.list_snapshots(kind="x")  # type: ignore[arg-type]
    assert len(store.list_snapshots()) == 1


# --- migrations ----------------------------------------------------------------------------


def test_migrations_are_numbered_in_order() -> None:
    assert [m.version for m in MIGRATIONS] == list(range(1, SCHEMA_VERSION + 1))
    with pytest.raises(ValueError, match="declares version"):
        migrate(sqlite3.connect(":memory:", isolation_level=None), [MIGRATIONS[1]])


def test_migrate_from_v1_preserves_data(db_path: Path) -> None:
    conn = raw(db_path)
    conn.execute("PRAGMA foreign_keys = ON")
    assert migrate(conn, MIGRATIONS[:1]) == 1
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
    # Data as a version-1 site wrote it (no checkpoints, no pair detail yet).
    conn.execute("INSERT INTO site (id, name, created_at) VALUES (1, 'site-a', 1.0)")
    conn.execute(
        "INSERT INTO groups (name, role, epoch, created_at) VALUES ('g1', 'primary', 2, 2.0)"
    )
    conn.execute(
        "INSERT INTO epoch_history VALUES (1, 1, 'site-a', 2.0, 0, 'created'),"
        " (1, 2, 'site-b', 3.0, 17, 'failover')"
    )
    conn.execute(
        "INSERT INTO volumes (name, size_bytes, block_size, group_id, created_at)"
        " VALUES ('db1', 8192, 4096, 1, 4.0), ('db2', 512, 512, NULL, 5.0)"
    )
    conn.execute("INSERT INTO pairs VALUES (1, 'site-b', 'async', 'swapped', 6.0)")
    conn.execute(
        "INSERT INTO snapshots (volume_id, name, kind, created_at, epoch, seq)"
        " VALUES (1, 'rp', 'restart-point', 7.0, 2, 17)"
    )
    conn.close()

    with MetadataStore.open(db_path, site=SITE) as s:
        g = s.get_group("g1")
        assert (g.id, g.role, g.epoch, g.created_at, g.applied_seq, g.acked_seq) == (
            1, Role.PRIMARY, 2, 2.0, 0, 0,
        )  # fmt: skip
        assert [
            (e.epoch, e.primary_site, e.prev_last_seq, e.reason) for e in s.epoch_history(1)
        ] == [
            (1, "site-a", 0, "created"),
            (2, "site-b", 17, "failover"),
        ]
        assert [(v.name, v.size_bytes, v.block_size, v.group_id) for v in s.list_volumes()] == [
            ("db1", 8192, 4096, 1),
            ("db2", 512, 512, None),
        ]
        p = s.get_pair("g1")
        assert (p.peer_site, p.mode, p.state, p.updated_at, p.detail) == (
            "site-b", PairMode.ASYNC, PairState.SWAPPED, 6.0, "",
        )  # fmt: skip
        snap = s.get_snapshot("db1", "rp")
        assert (snap.kind, snap.epoch, snap.seq) == (SnapshotKind.RESTART_POINT, 2, 17)
        # The new columns and the append-only guard work on the migrated data.
        assert s.set_checkpoint("g1", applied_seq=17).applied_seq == 17
        s.check_integrity()
    conn = raw(db_path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("UPDATE epoch_history SET reason = 'x'")
    conn.close()


def test_migration_function_step_and_failed_step_rolls_back(db_path: Path) -> None:
    def fill(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO t VALUES (1), (2)")

    steps = [
        Migration(1, "table", (f"PRAGMA application_id = {APPLICATION_ID}", "CREATE TABLE t (x)")),
        Migration(2, "rows", function=fill),
        Migration(3, "broken", ("CREATE TABLE u (y)", "INSERT INTO nowhere VALUES (1)")),
    ]
    conn = raw(db_path)
    with pytest.raises(MetadataError, match=r"migration to version 3 \(broken\) failed"):
        migrate(conn, steps)
    assert not conn.in_transaction
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 2  # steps 1 and 2 committed
    assert conn.execute("SELECT COUNT(*) FROM t").fetchone()[0] == 2
    assert conn.execute("SELECT name FROM sqlite_master WHERE name = 'u'").fetchone() is None
    assert migrate(conn, steps[:2]) == 2  # nothing left to do: idempotent
    conn.close()


def test_migration_foreign_key_violation_is_refused(db_path: Path) -> None:
    steps = [
        Migration(
            1,
            "tables",
            (
                f"PRAGMA application_id = {APPLICATION_ID}",
                "CREATE TABLE p (id INTEGER PRIMARY KEY)",
                "CREATE TABLE c (pid INTEGER REFERENCES p (id))",
            ),
        ),
        Migration(2, "orphan", ("INSERT INTO c VALUES (5)",)),
    ]
    conn = raw(db_path)  # foreign keys off, as during a table rebuild
    with pytest.raises(MetadataError, match="foreign-key violations"):
        migrate(conn, steps)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
    assert conn.execute("SELECT COUNT(*) FROM c").fetchone()[0] == 0
    conn.close()


# --- concurrency ---------------------------------------------------------------------------


def test_threads_share_a_store_and_a_second_connection(db_path: Path) -> None:
    first = MetadataStore.open(db_path, site=SITE)
    second = MetadataStore.open(db_path)  # another connection to the same file
    g = first.create_group("g1", Role.PRIMARY)
    threads_n, per_thread = 6, 15
    errors: list[BaseException] = []
    won: list[int] = []
    won_lock = threading.Lock()
    start = threading.Barrier(threads_n)

    def work(t: int) -> None:
        s = first if t % 2 else second
        try:
            start.wait()
            for j in range(per_thread):
                name = f"t{t}-v{j}"
                s.create_volume(name, 4096 * (j + 1), 512)
                s.create_snapshot(name, "s", SnapshotKind.USER, epoch=1, seq=j)
                # Race for the next epoch: exactly one thread may win each number.
                epoch = s.get_group(g.id).epoch + 1
                try:
                    s.record_epoch(g.id, entry(g.id, epoch, SITE, prev=j))
                except FailedPrecondition:
                    continue
                with won_lock:
                    won.append(epoch)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(threads_n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    assert errors == []
    total = threads_n * per_thread
    assert len(first.list_volumes()) == total == len(second.list_snapshots())
    history = [e.epoch for e in second.epoch_history(g.id)]
    assert sorted(won) == history[1:]  # every winner is in the history, once
    assert history == list(range(1, len(history) + 1))
    assert first.get_group(g.id).epoch == history[-1]
    first.check_integrity()
    first.close()
    second.close()


# --- crash safety --------------------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from targetd_repl.model import EpochEntry, Role, SnapshotKind
    from targetd_repl.storage.metadata import MetadataStore

    store = MetadataStore.open(Path(sys.argv[1]), site="site-a")
    g = store.create_group("g", Role.PRIMARY)
    print("ready", flush=True)
    i = 0
    while True:
        i += 1
        store.create_volume(f"v{i}", 512 * i, 512)
        store.create_snapshot(f"v{i}", "s", SnapshotKind.USER, epoch=1, seq=i)
        store.set_checkpoint(g.id, applied_seq=i)
        store.record_epoch(g.id, EpochEntry(g.id, i + 1, "site-a", float(i), i, "t"))
        if i > 1:
            store.delete_snapshot(f"v{i - 1}", "s")
        print(i, flush=True)
    """
)


@pytest.mark.parametrize("delay", [0.0, 0.013, 0.037])
def test_sigkill_loses_no_committed_change(tmp_path: Path, delay: float) -> None:
    db = tmp_path / DB_FILE_NAME
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(db)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None
    reported = 0
    deadline = time.monotonic() + 30
    try:
        assert proc.stdout.readline().strip() == "ready"
        while reported < 150 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, "child died"
            reported = int(line)
        time.sleep(delay)
    finally:
        proc.send_signal(signal.SIGKILL)
        rest = proc.stdout.read()
        proc.wait()
    reported = max([reported, *(int(x) for x in rest.split())])
    assert reported >= 150
    with MetadataStore.open(db) as s:
        s.check_integrity()
        names = {v.name for v in s.list_volumes()}
        assert {f"v{i}" for i in range(1, reported + 1)} <= names
        assert names <= {f"v{i}" for i in range(1, reported + 2)}  # at most one unreported
        g = s.get_group("g")
        assert g.applied_seq >= reported and g.epoch >= reported + 1
        history = [e.epoch for e in s.epoch_history(g.id)]
        assert history == list(range(1, g.epoch + 1))
        snaps = [(s.get_volume_by_id(x.volume_id).name) for x in s.list_snapshots()]
        assert f"v{reported}" in snaps or f"v{reported + 1}" in snaps
        assert len(snaps) <= 2


# --- property-based: the store against a model ---------------------------------------------

VOLUMES = [f"v{i}" for i in range(3)]  # small pools: names collide, rules meet each other
GROUPS = ["g0", "g1"]
SNAPS = ["s0", "s1"]


class MetadataMachine(RuleBasedStateMachine):
    """Volumes, groups, pairs and snapshots through create/delete/add/remove/reopen, compared
    with plain dictionaries after every step."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="md-"))
        self.store = MetadataStore.open(self.dir / DB_FILE_NAME, site=SITE)
        self.volumes: dict[str, tuple[int, int, str | None]] = {}  # size, block, group
        self.groups: dict[str, Role] = {}
        self.paired: set[str] = set()
        self.snaps: dict[tuple[str, str], SnapshotKind] = {}

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    @rule(name=st.sampled_from(VOLUMES), blocks=st.integers(1, 64), bs=st.sampled_from([512, 4096]))
    def create_volume(self, name: str, blocks: int, bs: int) -> None:
        if name in self.volumes:
            with pytest.raises(AlreadyExists):
                self.store.create_volume(name, blocks * bs, bs)
            return
        v = self.store.create_volume(name, blocks * bs, bs)
        assert (v.name, v.size_bytes, v.block_size, v.group_id) == (name, blocks * bs, bs, None)
        self.volumes[name] = (blocks * bs, bs, None)

    @rule(name=st.sampled_from(VOLUMES), extra=st.integers(-2, 4))
    def resize_volume(self, name: str, extra: int) -> None:
        if name not in self.volumes:
            with pytest.raises(NotFound):
                self.store.resize_volume(name, 4096)
            return
        size, bs, group = self.volumes[name]
        new = size + extra * bs
        if new < size:
            with pytest.raises((FailedPrecondition, InvalidArgument)):
                self.store.resize_volume(name, new)
            return
        assert self.store.resize_volume(name, new).size_bytes == new
        self.volumes[name] = (new, bs, group)

    @rule(name=st.sampled_from(VOLUMES))
    def delete_volume(self, name: str) -> None:
        if name not in self.volumes:
            with pytest.raises(NotFound):
                self.store.delete_volume(name)
        elif self.volumes[name][2] is not None or any(v == name for v, _ in self.snaps):
            with pytest.raises(FailedPrecondition):
                self.store.delete_volume(name)
        else:
            self.store.delete_volume(name)
            del self.volumes[name]

    @rule(name=st.sampled_from(GROUPS), role=st.sampled_from(Role))
    def create_group(self, name: str, role: Role) -> None:
        if name in self.groups:
            with pytest.raises(AlreadyExists):
                self.store.create_group(name, role)
            return
        g = self.store.create_group(name, role)
        assert g.epoch == (1 if role is Role.PRIMARY else 0)
        self.groups[name] = role

    @rule(name=st.sampled_from(GROUPS))
    def delete_group(self, name: str) -> None:
        if name not in self.groups:
            with pytest.raises(NotFound):
                self.store.delete_group(name)
        elif name in self.paired or any(g == name for _, _, g in self.volumes.values()):
            with pytest.raises(FailedPrecondition):
                self.store.delete_group(name)
        else:
            self.store.delete_group(name)
            del self.groups[name]

    @rule(group=st.sampled_from(GROUPS), volume=st.sampled_from(VOLUMES))
    def add(self, group: str, volume: str) -> None:
        if group not in self.groups or volume not in self.volumes:
            with pytest.raises(NotFound):
                self.store.add_volume_to_group(group, volume)
            return
        size, bs, current = self.volumes[volume]
        if current == group:
            self.store.add_volume_to_group(group, volume)
        elif current is not None or group in self.paired:
            with pytest.raises(FailedPrecondition):
                self.store.add_volume_to_group(group, volume)
        else:
            self.store.add_volume_to_group(group, volume)
            self.volumes[volume] = (size, bs, group)

    @rule(group=st.sampled_from(GROUPS), volume=st.sampled_from(VOLUMES))
    def remove(self, group: str, volume: str) -> None:
        if group not in self.groups or volume not in self.volumes:
            with pytest.raises(NotFound):
                self.store.remove_volume_from_group(group, volume)
            return
        size, bs, current = self.volumes[volume]
        if current != group or group in self.paired:
            with pytest.raises(FailedPrecondition):
                self.store.remove_volume_from_group(group, volume)
        else:
            self.store.remove_volume_from_group(group, volume)
            self.volumes[volume] = (size, bs, None)

    @rule(group=st.sampled_from(GROUPS))
    def toggle_pair(self, group: str) -> None:
        if group not in self.groups:
            with pytest.raises(NotFound):
                self.store.create_pair(group, PEER, PairMode.ASYNC)
        elif group in self.paired:
            self.store.delete_pair(group)
            self.paired.discard(group)
        else:
            self.store.create_pair(group, PEER, PairMode.ASYNC)
            self.paired.add(group)

    @rule(
        volume=st.sampled_from(VOLUMES),
        name=st.sampled_from(SNAPS),
        kind=st.sampled_from(SnapshotKind),
    )
    def create_snapshot(self, volume: str, name: str, kind: SnapshotKind) -> None:
        if volume not in self.volumes:
            with pytest.raises(NotFound):
                self.store.create_snapshot(volume, name, kind, epoch=0, seq=0)
        elif (volume, name) in self.snaps:
            with pytest.raises(AlreadyExists):
                self.store.create_snapshot(volume, name, kind, epoch=0, seq=0)
        else:
            self.store.create_snapshot(volume, name, kind, epoch=0, seq=0)
            self.snaps[volume, name] = kind

    @rule(volume=st.sampled_from(VOLUMES), name=st.sampled_from(SNAPS))
    def delete_snapshot(self, volume: str, name: str) -> None:
        if (volume, name) not in self.snaps:
            with pytest.raises(NotFound):
                self.store.delete_snapshot(volume, name)
        else:
            self.store.delete_snapshot(volume, name)
            del self.snaps[volume, name]

    @rule()
    def reopen(self) -> None:
        self.store.close()
        self.store = MetadataStore.open(self.dir / DB_FILE_NAME, site=SITE)

    @invariant()
    def matches_model(self) -> None:
        groups = {g.name: g for g in self.store.list_groups()}
        assert {n: g.role for n, g in groups.items()} == self.groups
        by_id = {g.id: n for n, g in groups.items()}
        volumes = {
            v.name: (v.size_bytes, v.block_size, None if v.group_id is None else by_id[v.group_id])
            for v in self.store.list_volumes()
        }
        assert volumes == self.volumes
        assert {by_id[p.group_id] for p in self.store.list_pairs()} == self.paired
        vol_names = {v.id: v.name for v in self.store.list_volumes()}
        snaps = {(vol_names[s.volume_id], s.name): s.kind for s in self.store.list_snapshots()}
        assert snaps == self.snaps
        for name in self.groups:
            expected = [v for v, (_, _, g) in self.volumes.items() if g == name]
            assert sorted(v.name for v in self.store.list_volumes(name)) == sorted(expected)


MetadataMachine.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestMetadataMachine = MetadataMachine.TestCase


def test_ids_are_never_reused(store: MetadataStore) -> None:
    # Deleting the newest row must not let its id come back (AUTOINCREMENT, not max(id)+1).
    seen: set[tuple[int, int, int]] = set()
    for _ in range(3):
        v = store.create_volume("v", 512, 512)
        g = store.create_group("g", Role.SECONDARY)
        snap = store.create_snapshot("v", "s", SnapshotKind.USER, epoch=0, seq=0)
        ids = (v.id, g.id, snap.id)
        assert all(ids[k] not in {old[k] for old in seen} for k in range(3))
        seen.add(ids)
        store.delete_snapshot(v.id, "s")
        store.delete_volume(v.id)
        store.delete_group(g.id)
