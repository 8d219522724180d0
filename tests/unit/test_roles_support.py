"""What role changes add below them: the pair's persisted backlog and survivor (migration 4),
the one way an epoch entry may leave a history (archived first), the roles state file, and the
CLI's extent arguments."""

from __future__ import annotations

import argparse
import sqlite3
import time
from pathlib import Path

import pytest

from targetd_repl.cli import build_parser, source_extent_arg, target_extent_arg
from targetd_repl.errors import InvalidArgument, MetadataError
from targetd_repl.model import EpochEntry, PairMode, Role
from targetd_repl.roles.state import (
    ChangedBitmaps,
    FailoverRecord,
    RejoinRecord,
    RolesState,
    StateStore,
)
from targetd_repl.storage.metadata import MetadataStore

MiB = 1 << 20


@pytest.fixture
def store(tmp_path: Path) -> MetadataStore:
    return MetadataStore.open(tmp_path / "metadata.db", site="a")


def test_pair_remembers_backlog_and_survivor(store: MetadataStore) -> None:
    store.create_group("g", Role.PRIMARY)
    pair = store.create_pair("g", "b", PairMode.ASYNC)
    assert (pair.backlog_from_seq, pair.survivor) == (None, None)
    pair = store.set_pair_roles("g", backlog_from_seq=12, survivor="b")
    assert (pair.backlog_from_seq, pair.survivor) == (12, "b")
    pair = store.set_pair_roles("g", survivor=None)  # the other field is kept
    assert (pair.backlog_from_seq, pair.survivor) == (12, None)
    with pytest.raises(InvalidArgument):
        store.set_pair_roles("g", backlog_from_seq=0)
    with pytest.raises(InvalidArgument):
        store.set_pair_roles("g", survivor="bad name")


def test_replace_history_archives_what_it_discards(store: MetadataStore) -> None:
    info = store.create_group("g", Role.PRIMARY)
    gid = info.id
    first = store.epoch_history(gid)[0]
    mine = EpochEntry(gid, 2, "a", time.time(), 30, "forced failover")
    store.record_epoch(gid, mine, role=Role.PRIMARY)
    theirs = EpochEntry(gid, 2, "b", time.time() + 1, 25, "failover")
    after = store.replace_history(gid, [first, theirs], snapshot="loser-1", role=Role.SECONDARY)
    assert (after.epoch, after.role) == (2, Role.SECONDARY)
    assert [(e.epoch, e.primary_site) for e in store.epoch_history(gid)] == [(1, "a"), (2, "b")]
    discarded = store.discarded_epochs(gid)
    assert [(e.epoch, e.primary_site, snap) for e, snap in discarded] == [(2, "a", "loser-1")]
    # the append-only guard still refuses a deletion that left no trace
    conn = sqlite3.connect(store.path)
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("DELETE FROM epoch_history WHERE group_id = ? AND epoch = 1", (gid,))
    conn.close()
    with pytest.raises(InvalidArgument):
        store.replace_history(gid, [], snapshot="x")
    with pytest.raises(InvalidArgument):
        store.replace_history(gid, [theirs, first], snapshot="x")


def test_a_newer_schema_is_still_refused(tmp_path: Path) -> None:
    path = tmp_path / "metadata.db"
    MetadataStore.open(path, site="a").close()
    conn = sqlite3.connect(path)
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    assert version == 4
    conn.execute("PRAGMA user_version = 5")
    conn.commit()
    conn.close()
    with pytest.raises(MetadataError, match="newer"):
        MetadataStore.open(path)


def test_roles_state_round_trips(tmp_path: Path) -> None:
    states = StateStore()
    state = states.get(tmp_path)
    assert state.empty()
    state.failover = FailoverRecord(epoch=3, restart_point="restart-point-e3", restart_seq=40)
    state.rejoin = RejoinRecord(kind="failback", target="a", snapshot="s", seq=41, generation=2)
    states.save(tmp_path)
    again = RolesState.load(tmp_path)
    assert again.failover == state.failover and again.rejoin == state.rejoin
    assert again.target is None and not again.empty()
    states.forget(tmp_path)
    assert RolesState.load(tmp_path).empty()


def test_changed_bitmaps_have_their_own_files(tmp_path: Path) -> None:
    changed = ChangedBitmaps.open(tmp_path, {1: 4 * MiB}, 64 * 1024)
    changed.mark(1, 70_000, 10)
    changed.save_all()
    assert (tmp_path / "changed-1.bitmap").exists()
    again = ChangedBitmaps.open(tmp_path, {1: 4 * MiB}, 64 * 1024)
    assert list(again.bitmap(1).regions()) == [1]
    assert again.total_bytes() == 64 * 1024
    again.remove_files()
    assert not ChangedBitmaps.exists(tmp_path, [1])


def test_extent_arguments() -> None:
    assert source_extent_arg("v1") == ("v1", 0, 0)
    assert source_extent_arg("v1:1M+4M") == ("v1", MiB, 4 * MiB)
    assert target_extent_arg("b:v2") == ("b", "v2", 0)
    assert target_extent_arg("b:v2:8K") == ("b", "v2", 8192)
    for bad in ("v1:1M", "bad name", "v1:x+1M"):
        with pytest.raises(argparse.ArgumentTypeError):
            source_extent_arg(bad)
    for bad in ("v2", "b:v2:1:2", "b:bad name"):
        with pytest.raises(argparse.ArgumentTypeError):
            target_extent_arg(bad)
    args = build_parser().parse_args(["copy", "v1:0+1M", "b:v2:2M", "--via", "stage", "--json"])
    assert (args.source, args.target, args.via, args.json) == (
        ("v1", 0, MiB),
        ("b", "v2", 2 * MiB),
        "stage",
        True,
    )
    args = build_parser().parse_args(["failover", "g", "--force", "--no-wait"])
    assert (args.group, args.force, args.no_wait) == ("g", True, True)
    args = build_parser().parse_args(["resolve", "g", "--survivor", "b"])
    assert args.survivor == "b"
