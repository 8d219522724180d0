"""Sync mode, suspend/resume with a bitmap resync, journal-full and its catch-up, restart from
persisted state, and fencing of a stale primary."""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path

import pytest

from targetd_repl.errors import WriteProtected
from targetd_repl.model import EpochEntry, PairMode, PairState, Role
from targetd_repl.replication.errors import PeerUnavailable
from targetd_repl.replication.settings import FencePolicy
from targetd_repl.storage.group_store import GroupSettings
from tests.integration.tcp_proxy import TcpProxy
from tests.unit.test_replication_support import (
    BS,
    FAST,
    Site,
    WriteLog,
    converged,
    image,
    make_group,
    restart,
    two_sites,
    write_load,
)


def _via_proxy(a: Site, b: Site) -> TcpProxy:
    proxy = TcpProxy(("127.0.0.1", b.port))
    a.manager.set_peer_address("site-b", proxy.address)
    return proxy


def _same(a: Site, b: Site, volumes: list[str]) -> None:
    for volume in volumes:
        assert image(b, volume) == image(a, volume), volume


def test_sync_write_completes_only_once_the_peer_holds_it(tmp_path: Path) -> None:
    a, b = two_sites(tmp_path)
    try:
        make_group(a, "g", ["v1"])
        a.manager.create_pair("g", "site-b", PairMode.SYNC)
        converged(a, b, "g")
        received = b.engine.group("g").journal
        for i in range(50):
            seq = a.engine.write("v1", i * 8, bytes([i]) * (8 * BS))
            assert received.durable_seq >= seq  # durable at the peer before the ack
        converged(a, b, "g")
        _same(a, b, ["v1"])
    finally:
        a.close()
        b.close()


def test_sync_peer_unreachable_goes_suspended_error_and_resyncs(tmp_path: Path) -> None:
    a, b = two_sites(tmp_path)
    proxy = _via_proxy(a, b)
    try:
        make_group(a, "g", ["v1"])
        a.manager.create_pair("g", "site-b", PairMode.SYNC)
        converged(a, b, "g")
        proxy.drop()  # a black hole: the write's ack never comes
        started = time.monotonic()
        seq = a.engine.write("v1", 0, b"q" * (4 * BS))
        waited = time.monotonic() - started
        assert FAST.sync_timeout * 0.9 <= waited < FAST.sync_timeout + 3, waited
        status = a.manager.pair_status("g")
        assert status.state is PairState.SUSPENDED_ERROR and status.unsent_regions >= 1
        assert "did not acknowledge" in status.detail or "no acknowledgement" in status.detail
        # Writes go on locally, at once, tracked in the unsent bitmap.
        started = time.monotonic()
        a.engine.write("v1", 64, b"r" * (4 * BS))
        assert time.monotonic() - started < 1.0
        assert b.engine.group("g").journal.durable_seq < seq
        proxy.heal()
        converged(a, b, "g", timeout=30)
        _same(a, b, ["v1"])
    finally:
        proxy.close()
        a.close()
        b.close()


def test_sync_fence_fail_writes_fails_the_write(tmp_path: Path) -> None:
    a, b = two_sites(tmp_path)
    proxy = _via_proxy(a, b)
    try:
        make_group(a, "g", ["v1"])
        a.manager.create_pair("g", "site-b", PairMode.SYNC, fence=FencePolicy.FAIL_WRITES)
        converged(a, b, "g")
        proxy.refuse()
        with pytest.raises(PeerUnavailable, match="fail-writes"):
            a.engine.write("v1", 0, b"q" * BS)
        with pytest.raises(PeerUnavailable):
            a.engine.write("v1", 8, b"q" * BS)  # at once now: the pair is suspended-error
        proxy.heal()
        converged(a, b, "g", timeout=30)
        a.engine.write("v1", 16, b"s" * BS)  # back in sync: writes complete again
        converged(a, b, "g")
        _same(a, b, ["v1"])
    finally:
        proxy.close()
        a.close()
        b.close()


def test_suspend_resume_resyncs_only_the_bitmap(tmp_path: Path) -> None:
    storage = GroupSettings(journal_size_limit=64 << 20, journal_segment_size=256 << 10)
    a, b = two_sites(tmp_path, storage=storage)
    try:
        make_group(a, "g", ["v1", "v2"])
        a.manager.create_pair("g", "site-b", PairMode.ASYNC)
        converged(a, b, "g")
        status = a.manager.suspend("g")
        assert status.state is PairState.SUSPENDED
        b.manager.wait_for("g", lambda s: s.state is PairState.SUSPENDED)
        # 2 MiB of writes to the first 256 KiB of v1 (4 regions), more than the segments.
        for i in range(256):
            a.engine.write("v1", (i % 64) * 8, bytes([i % 251]) * (8 * BS))
        assert a.manager.pair_status("g").unsent_regions == 4
        store = a.engine.group("g")
        store.checkpoint_and_trim()  # suspended: nothing is retained for the peer
        assert store.journal.first_seq > b.engine.group("g").journal.next_seq
        a.manager.resume("g")
        status = converged(a, b, "g")
        assert status.resync_total_bytes == 4 * 64 * 1024  # the 4 regions, not the volumes
        assert status.unsent_regions == 0
        _same(a, b, ["v1", "v2"])
    finally:
        a.close()
        b.close()


def test_suspend_resume_within_the_journal_resumes_shipping(tmp_path: Path) -> None:
    a, b = two_sites(tmp_path)
    try:
        make_group(a, "g", ["v1"])
        a.manager.create_pair("g", "site-b", PairMode.ASYNC)
        converged(a, b, "g")
        a.manager.suspend("g")
        for i in range(20):
            a.engine.write("v1", i * 8, b"w" * (8 * BS))
        a.manager.resume("g")
        status = converged(a, b, "g")
        assert status.resync_total_bytes == 0 or status.state is PairState.PAIRED
        assert status.unsent_regions == 0
        _same(a, b, ["v1"])
    finally:
        a.close()
        b.close()


def test_journal_full_tracks_in_the_bitmap_and_catches_up(tmp_path: Path) -> None:
    storage = GroupSettings(journal_size_limit=2 << 20, journal_segment_size=128 << 10)
    # A link timeout the slow link cannot trip first on a loaded machine: the journal must fill.
    settings = dataclasses.replace(FAST, link_timeout=15.0)
    a, b = two_sites(tmp_path, storage=storage, settings=settings)
    proxy = _via_proxy(a, b)
    try:
        make_group(a, "g", ["v1", "v2"])
        a.manager.create_pair("g", "site-b", PairMode.ASYNC)
        converged(a, b, "g")
        states: set[PairState] = set()
        stop = threading.Event()

        def watch() -> None:
            while not stop.wait(0.01):
                states.add(a.manager.pair_status("g").state)

        watcher = threading.Thread(target=watch)
        watcher.start()
        proxy.rate(100_000)  # 100 KB/s: far below any writer, even on a loaded machine
        log = WriteLog()
        write_load(a, ["v1", "v2"], log, count=800, seed=7, max_blocks=32)  # ~6 MiB: never fails
        assert PairState.JOURNAL_FULL in states
        proxy.rate(0)
        converged(a, b, "g", timeout=60)
        stop.set()
        watcher.join()
        _same(a, b, ["v1", "v2"])
        assert a.manager.pair_status("g").unsent_regions == 0
    finally:
        proxy.close()
        a.close()
        b.close()


def test_restart_resumes_from_persisted_state(tmp_path: Path) -> None:
    a, b = two_sites(tmp_path)
    try:
        make_group(a, "g", ["v1"])
        a.manager.create_pair("g", "site-b", PairMode.ASYNC)
        converged(a, b, "g")
        log = WriteLog()
        write_load(a, ["v1"], log, count=200, seed=3)
        b = restart(b, a)  # the secondary restarts
        write_load(a, ["v1"], log, count=200, seed=4)
        a = restart(a, b)  # then the primary
        assert a.manager.pair_status("g").role is Role.PRIMARY
        write_load(a, ["v1"], log, count=200, seed=5)
        converged(a, b, "g")
        _same(a, b, ["v1"])
        assert a.engine.metadata.get_group("g").acked_seq > 0
    finally:
        a.close()
        b.close()


def test_stale_primary_is_fenced(tmp_path: Path) -> None:
    a, b = two_sites(tmp_path)
    try:
        make_group(a, "g", ["v1"])
        a.manager.create_pair("g", "site-b", PairMode.ASYNC)
        converged(a, b, "g")
        a.manager.suspend("g")
        # site-b took over (a failover, as the roles layer does it): a new epoch names it.
        group = b.engine.metadata.get_group("g")
        b.engine.metadata.record_epoch(
            "g",
            EpochEntry(
                group.id,
                2,
                "site-b",
                time.time(),
                b.engine.group("g").journal.durable_seq,
                "failover",
            ),
            role=Role.PRIMARY,
        )
        b.engine.group("g").refresh()
        a.manager.resume("g")
        status = a.manager.wait_for("g", lambda s: s.state is PairState.SWAPPED, timeout=15)
        assert "stale epoch" in status.detail
        assert a.engine.group("g").role is Role.SECONDARY  # it refuses writes now
        with pytest.raises(WriteProtected):
            a.engine.write("v1", 0, b"x" * BS)
    finally:
        a.close()
        b.close()
