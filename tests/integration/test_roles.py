"""Role changes between two real controllers on 127.0.0.1 (harness.py), through the CLI and the
control API: snapshots, failover, failback, switchover, split-brain and its resolution, and the
one-command extent copy. Each scenario ends with a byte comparison of both images and the
acknowledged-write checker."""

from __future__ import annotations

import os
import time

import pytest

from tests.integration.conftest import MakeCluster
from tests.integration.harness import Site
from tests.integration.roles_support import (
    BLOCK,
    REGION,
    WriteLog,
    Writer,
    pair,
    read,
    role_of,
    wait_pair,
    wait_role,
    write_some,
)
from tests.integration.tcp_proxy import TcpProxy

pytestmark = pytest.mark.integration

MiB = 1 << 20
FAST = {"link_timeout": 1.0, "sync_timeout": 1.0}
# The tests that shape the link with a TcpProxy in front of the gRPC port keep the journal on
# gRPC: a bulk lane is reached at the port its receiver announces, past the proxy. The lane under
# link faults is tested in test_replication_link_faults (through a proxy route).
PROXIED: dict[str, str | int | float] = {**FAST, "bulk_lane": False}


def _pair_up(site_a: Site, group: str, size: str = "16M", mode: str = "async") -> None:
    site_a.cli_json("group", "create", group)
    site_a.cli_json("volume", "create", "v1", "--size", size, "--group", group)
    site_a.cli_json("pair", "create", group, "--peer", "b", "--mode", mode)
    wait_pair(site_a, group, lambda s: s["state"] == "paired")


# --- snapshots ------------------------------------------------------------------------------------


def test_snapshot_commands(cluster: MakeCluster) -> None:
    c = cluster("a", "b")
    a = c["a"]
    a.cli_json("volume", "create", "v", "--size", "1M")
    first = os.urandom(256 * 1024)
    with a.connected() as client:
        client.write("v", 0, first)
    snap = a.cli_json("snapshot", "create", "v", "before")
    assert (snap["volume"], snap["name"], snap["kind"]) == ("v", "before", "user")
    with a.connected() as client:
        client.write("v", 64 * 1024, os.urandom(128 * 1024))
    listed = a.cli_json("snapshot", "list", "v")
    assert [s["name"] for s in listed] == ["before"]
    assert listed[0]["preserved_bytes"] == 128 * 1024  # two regions overwritten since
    human = a.cli("snapshot", "list")
    assert human.returncode == 0 and b"before" in human.stdout

    rolled = a.cli_json("snapshot", "rollback", "v", "before")
    assert rolled["regions"] == 2
    assert read(a, "v", 256 * 1024) == first

    # paired: a rollback is refused, naming the pair's state
    a.cli_json("pair", "create", "v", "--peer", "b", "--mode", "async")
    wait_pair(a, "v", lambda s: s["state"] == "paired")
    refused = a.cli("snapshot", "rollback", "v", "before")
    assert refused.returncode == 1
    message = refused.stderr.decode()
    assert message.count("\n") == 1 and "paired" in message and "site b" in message

    missing = a.cli("snapshot", "delete", "v", "nope")
    assert missing.returncode == 1 and "nope" in missing.stderr.decode()
    assert a.cli_json("snapshot", "delete", "v", "before") == {"deleted": "before", "volume": "v"}
    assert a.cli_json("snapshot", "list") == []


# --- failover -------------------------------------------------------------------------------------


def test_failover_after_the_primary_dies_mid_stream(cluster: MakeCluster) -> None:
    """kill -9 of the primary under async load with a slow link: the secondary promoted by
    `failover` is exactly a prefix of the acknowledged writes; it accepts writes; the old
    primary, restarted, is fenced and never serves a write again."""
    c = cluster("a", "b", replication_options=PROXIED)
    a, b = c["a"], c["b"]
    proxy = TcpProxy(("127.0.0.1", int(b.replication_address.rsplit(":", 1)[1])))
    try:
        c.point(a, b, proxy.address)
        size = 16 * MiB
        _pair_up(a, "g")
        base = read(a, "v1", size)
        refused = b.cli("failover", "g")  # the primary answers: refused, use switchover
        assert refused.returncode == 1 and "switchover" in refused.stderr.decode()
        log = WriteLog()
        proxy.rate(400_000)  # a slow link: the secondary falls behind
        writer = Writer(a, "v1", size, log, seed=1, blocks=2).start()
        time.sleep(3.0)
        a.kill()  # the primary site dies mid-stream
        writer.join()
        acked = log.last_seq
        assert acked > 100

        started = time.monotonic()
        done = b.cli_json("failover", "g")
        took = time.monotonic() - started
        assert done["phase"] == "done" and done["command"] == "failover"
        assert done["snapshot"].startswith("restart-point-")
        restart = done["seq"]
        assert done["pair"]["state"] == "swapped" and done["pair"]["role"] == "primary"
        assert done["epoch"] == 2
        # the acknowledged-write checker: exactly the prefix up to the restart point
        assert 0 < restart <= acked + 1, (restart, acked)
        expected = bytearray(log.image("v1", size, restart, base))
        if restart == acked + 1:  # the write in flight at the kill reached the secondary
            _, offset, data = log.inflight[0]
            expected[offset : offset + len(data)] = data
        assert read(b, "v1", size) == bytes(expected)
        assert restart < acked, "the slow link should have left a backlog behind"
        snaps = b.cli_json("snapshot", "list", "v1")
        assert [(s["kind"], s["seq"]) for s in snaps] == [("restart-point", restart)]

        # the new primary takes writes; a rerun is a no-op
        after = WriteLog()
        write_some(b, "v1", after, 50, seed=2, size=size)
        assert min(seq for seq, *_ in after.entries) == restart + 1  # the journal continues
        assert b.cli_json("failover", "g")["phase"] == "done"

        # the old primary comes back: fenced by the new epoch, it refuses writes
        proxy.rate(0)
        a.start()
        wait_pair(a, "g", lambda s: s["state"] == "swapped" and s["role"] == "secondary")
        assert role_of(a, "g") == "secondary"
        denied = a.cli("io", "write", "v1", "--offset", "0", "--pattern", "7", "--length", "4K")
        assert denied.returncode == 1 and "read-only" in denied.stderr.decode()
        assert took < 30
    finally:
        proxy.close()


# --- failback -------------------------------------------------------------------------------------


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def test_failback_moves_only_the_changed_regions(cluster: MakeCluster) -> None:
    """A partition; the secondary fails over and both sides write; the link heals and the old
    primary is fenced; `failback` saves its unsent writes in a snapshot, rolls them back and
    receives the new primary's changes: only the union of the two bitmaps crosses the link, new
    writes keep flowing meanwhile, and both images end equal to the acknowledged writes."""
    c = cluster("a", "b", replication_options=PROXIED)
    a, b = c["a"], c["b"]
    to_b = TcpProxy(("127.0.0.1", _port(b.replication_address)))
    to_a = TcpProxy(("127.0.0.1", _port(a.replication_address)))
    try:
        c.point(a, b, to_b.address)
        c.point(b, a, to_a.address)
        size = 64 * MiB
        _pair_up(a, "g", size="64M")
        base = read(a, "v1", size)
        before = WriteLog()
        write_some(a, "v1", before, 200, seed=3, size=size)
        shipped = wait_pair(a, "g", lambda s: s["lag_records"] == 0)["acked_seq"]
        time.sleep(0.5)  # the acknowledged seq is persisted
        base = before.image("v1", size, shipped, base)

        # partition: both sides go on alone
        to_b.refuse()
        to_a.refuse()
        wait_pair(a, "g", lambda s: s["state"] == "suspended-error")
        nregions = size // REGION
        old_side = WriteLog()
        write_some(a, "v1", old_side, 60, seed=4, size=size, regions=list(range(0, nregions, 7)))
        failover = b.cli_json("failover", "g")
        assert failover["phase"] == "done" and failover["seq"] == shipped
        new_side = WriteLog()
        write_some(b, "v1", new_side, 60, seed=5, size=size, regions=list(range(3, nregions, 11)))

        # the link heals: the old primary is fenced (it still claims primary at epoch 1)
        to_b.heal()
        to_a.heal()
        wait_pair(a, "g", lambda s: s["state"] == "swapped" and s["role"] == "secondary", 30)
        assert role_of(a, "g") == "secondary"

        union = old_side.regions("v1") | new_side.regions("v1")
        union_bytes = len(union) * REGION
        forwarded = to_a.bytes_forwarded + to_b.bytes_forwarded
        live = WriteLog()
        writer = Writer(b, "v1", size, live, seed=6, delay=0.01).start()  # writes go on
        started = time.monotonic()
        done = b.cli_json("failback", "g", "--wait-timeout", "120")
        took = time.monotonic() - started
        writer.join()
        assert not writer.errors, writer.errors
        assert done["phase"] == "done" and done["command"] == "failback"
        # the union of both bitmaps at the source snapshot: the live writes before it too
        before_snapshot = WriteLog(entries=[e for e in live.entries if e[0] <= done["seq"]])
        union = old_side.regions("v1") | new_side.regions("v1") | before_snapshot.regions("v1")
        assert done["total_bytes"] == len(union) * REGION, (done["total_bytes"], union_bytes)
        assert done["regions"] == len(union)
        moved = to_a.bytes_forwarded + to_b.bytes_forwarded - forwarded
        live_bytes = sum(len(e[3]) for e in live.entries)
        # only the union crossed the link (plus the live writes and protocol overhead)
        assert moved < 1.1 * (union_bytes + 2 * live_bytes) + 2 * MiB, (moved, union_bytes)
        assert moved < size // 4

        status_b = wait_pair(b, "g", lambda s: s["state"] == "paired" and s["lag_records"] == 0)
        assert status_b["role"] == "primary"
        wait_pair(
            a,
            "g",
            lambda s: s["state"] == "paired" and s["applied_seq"] >= status_b["last_seq"],
        )
        assert pair(a, "g")["role"] == "secondary" and pair(a, "g")["epoch"] == 2
        # the acknowledged-write checker: the old side's writes are gone, the new side's there
        expected = WriteLog(entries=new_side.entries + live.entries).image(
            "v1", size, 1 << 62, base
        )
        assert read(b, "v1", size) == expected
        assert read(a, "v1", size) == expected
        # the rolled-back writes are kept, listed, at the old primary
        saved = [s for s in a.cli_json("snapshot", "list", "v1") if s["kind"] == "rollback-save"]
        assert len(saved) == 1 and saved[0]["preserved_bytes"] >= len(old_side.regions("v1"))
        assert [s["kind"] for s in b.cli_json("snapshot", "list", "v1")] == []
        assert took < 120
        # replication runs reversed
        more = WriteLog()
        write_some(b, "v1", more, 20, seed=7, size=size)
        wait_pair(a, "g", lambda s: s["applied_seq"] >= more.last_seq)
        assert read(a, "v1", size) == read(b, "v1", size)
    finally:
        to_a.close()
        to_b.close()


# --- switchover -----------------------------------------------------------------------------------


def test_switchover_under_load_with_a_backlog(cluster: MakeCluster) -> None:
    """A throttled link and a large backlog: `switchover` at the secondary makes it primary at
    once; the old primary refuses writes from that moment; the new one serves reads of regions
    still on the old primary by fetching them (copy-on-read) and its new writes win over the
    backlog still arriving; once drained, replication runs the other way."""
    c = cluster("a", "b", replication_options=PROXIED)
    a, b = c["a"], c["b"]
    to_b = TcpProxy(("127.0.0.1", _port(b.replication_address)))
    to_a = TcpProxy(("127.0.0.1", _port(a.replication_address)))
    try:
        c.point(a, b, to_b.address)
        c.point(b, a, to_a.address)
        size = 64 * MiB
        _pair_up(a, "g", size="64M")
        base = read(a, "v1", size)
        to_b.rate(1_000_000)  # 1 MB/s: the backlog cannot drain during the test's writes
        to_a.rate(4_000_000)
        old = WriteLog()
        write_some(a, "v1", old, 300, seed=8, size=size, blocks=16)  # ~19 MiB, 64 KiB each
        backlog = pair(a, "g")
        assert backlog["lag_records"] > 100, backlog

        writer = Writer(a, "v1", size, old, seed=9).start()  # still writing when it switches
        time.sleep(0.5)
        started = time.monotonic()
        result = b.cli_json("switchover", "g", "--no-wait")
        writer.join()
        with b.connected() as client:
            first = client.write("v1", 0, b"\x5a" * BLOCK)  # the new primary's first write
        first_write_s = time.monotonic() - started
        assert result["command"] == "switchover" and result["phase"] == "running"
        final = result["seq"]
        assert first == final + 1  # the journal continues after the old primary's last seq
        assert old.last_seq <= final
        assert role_of(a, "g") == "secondary"
        denied = a.cli("io", "write", "v1", "--offset", "0", "--pattern", "1", "--length", "4K")
        assert denied.returncode == 1 and "read-only" in denied.stderr.decode()

        # copy-on-read: the newest backlog data reads back at once, though not yet drained
        _, _, offset, data = max(old.entries)
        with b.connected() as client:
            assert client.read("v1", offset, len(data)) == data
        new = WriteLog(entries=[(first, "v1", 0, b"\x5a" * BLOCK)])
        write_some(b, "v1", new, 100, seed=10, size=size, blocks=2)  # newer writes win
        assert b.cli_json("switchover", "g", "--no-wait")["command"] == "switchover"  # rerun

        done = wait_role(b, "g", timeout=240)
        assert done["phase"] == "done", done
        assert done["promoted_seconds"] < 5.0
        status_b = wait_pair(b, "g", lambda s: s["state"] == "paired" and s["lag_records"] == 0)
        assert status_b["role"] == "primary" and status_b["epoch"] == 2
        wait_pair(a, "g", lambda s: s["role"] == "secondary" and s["state"] == "paired")
        wait_pair(a, "g", lambda s: s["applied_seq"] >= status_b["last_seq"])
        expected = WriteLog(entries=old.entries + new.entries).image("v1", size, 1 << 62, base)
        assert read(b, "v1", size) == expected
        assert read(a, "v1", size) == expected
        assert first_write_s < 5.0, first_write_s
    finally:
        to_a.close()
        to_b.close()


# --- split-brain ----------------------------------------------------------------------------------


def test_split_brain_and_its_resolution(cluster: MakeCluster) -> None:
    """Two forced failovers during partitions: both sites write on forks of the history; when
    they reconnect the handshake refuses and `pair status` says split-brain on both. `resolve
    --survivor b`, run at the loser, keeps b's data, saves a's divergent regions in a snapshot
    and copies only the union of the divergent regions; the pair ends paired, b primary."""
    c = cluster("a", "b", replication_options=PROXIED)
    a, b = c["a"], c["b"]
    to_b = TcpProxy(("127.0.0.1", _port(b.replication_address)))
    to_a = TcpProxy(("127.0.0.1", _port(a.replication_address)))

    def partition() -> None:
        to_b.refuse()
        to_a.refuse()

    def heal() -> None:
        to_b.heal()
        to_a.heal()

    try:
        c.point(a, b, to_b.address)
        c.point(b, a, to_a.address)
        size = 32 * MiB
        nregions = size // REGION
        _pair_up(a, "g", size="32M")
        base = read(a, "v1", size)
        common = WriteLog()
        write_some(a, "v1", common, 100, seed=11, size=size)
        shipped = wait_pair(a, "g", lambda s: s["lag_records"] == 0)["acked_seq"]
        time.sleep(0.5)
        base = common.image("v1", size, shipped, base)

        partition()  # (b may not notice a silent link loss: its failover probes a)
        a_side = WriteLog()
        write_some(a, "v1", a_side, 30, seed=12, size=size, regions=list(range(0, nregions, 5)))
        assert b.cli_json("failover", "g")["epoch"] == 2  # first failover: b
        b_side = WriteLog()
        write_some(b, "v1", b_side, 30, seed=13, size=size, regions=list(range(2, nregions, 9)))
        heal()  # a is fenced by b's newer epoch
        wait_pair(a, "g", lambda s: s["state"] == "swapped" and s["role"] == "secondary", 30)
        partition()
        time.sleep(1.5)
        forced = a.cli_json("failover", "g", "--force")  # second failover: a, b unreachable
        assert forced["phase"] == "done" and forced["epoch"] == 2
        write_some(a, "v1", a_side, 30, seed=14, size=size, regions=list(range(0, nregions, 5)))
        write_some(b, "v1", b_side, 30, seed=15, size=size, regions=list(range(2, nregions, 9)))

        heal()
        for site in (a, b):
            refused = wait_pair(site, "g", lambda s: "split-brain" in s["detail"], 30)
            assert refused["state"] == "suspended-error", refused
        human = a.cli("pair", "status", "g")
        assert b"split-brain" in human.stdout

        union = a_side.regions("v1") | b_side.regions("v1")
        forwarded = to_a.bytes_forwarded + to_b.bytes_forwarded
        result = a.cli_json("resolve", "g", "--survivor", "b", "--no-wait")
        assert result["command"] == "resolve"
        done = wait_role(b, "g")
        assert done["phase"] == "done", done
        assert done["total_bytes"] == len(union) * REGION, (done["total_bytes"], len(union))
        moved = to_a.bytes_forwarded + to_b.bytes_forwarded - forwarded
        assert moved < 1.1 * len(union) * REGION + 2 * MiB, moved
        status_b = wait_pair(b, "g", lambda s: s["state"] == "paired" and s["role"] == "primary")
        wait_pair(
            a,
            "g",
            lambda s: s["state"] == "paired" and s["applied_seq"] >= status_b["last_seq"],
        )
        expected = WriteLog(entries=b_side.entries).image("v1", size, 1 << 62, base)
        assert read(b, "v1", size) == expected
        assert read(a, "v1", size) == expected
        kinds = [s["kind"] for s in a.cli_json("snapshot", "list", "v1")]
        assert kinds == ["split-brain-loser"], kinds
        assert pair(a, "g")["epoch"] == pair(b, "g")["epoch"]
        # replication runs b -> a
        more = WriteLog()
        write_some(b, "v1", more, 20, seed=16, size=size)
        wait_pair(a, "g", lambda s: s["applied_seq"] >= more.last_seq)
        assert read(a, "v1", size) == read(b, "v1", size)
    finally:
        to_a.close()
        to_b.close()


# --- extent copy ----------------------------------------------------------------------------------


def test_extent_copy_with_and_without_via(cluster: MakeCluster) -> None:
    """`copy VOLUME:OFFSET+LENGTH SITE:VOLUME:OFFSET [--via INTERMEDIATE]`: one command; the
    source stays online (writes during the copy do not reach the copied extent, which comes
    from an instant snapshot); with --via the target extent changes only at the end; the report
    carries bytes, time and matching checksums; nothing temporary is left behind."""
    c = cluster("a", "b")
    a, b = c["a"], c["b"]
    a.cli_json("volume", "create", "src", "--size", "8M")
    b.cli_json("volume", "create", "dst", "--size", "8M")
    b.cli_json("volume", "create", "stage", "--size", "4M")
    payload = os.urandom(3 * MiB)
    with a.connected() as client:
        client.write("src", MiB, payload)
    before = read(b, "dst", 8 * MiB)

    done = a.cli_json("copy", "src:1M+3M", "b:dst:2M")
    assert done["done"] and done["bytes"] == 3 * MiB
    assert done["sha256"] == done["target_sha256"]
    assert "temporary pair removed" in done["detail"]
    after = read(b, "dst", 8 * MiB)
    assert after[2 * MiB : 5 * MiB] == payload
    assert after[: 2 * MiB] == before[: 2 * MiB] and after[5 * MiB :] == before[5 * MiB :]

    # --via: into the intermediate first, then only the extent changes
    second = os.urandom(2 * MiB)
    with a.connected() as client:
        client.write("src", 0, second)
    via = a.cli_json("copy", "src:0+2M", "b:dst:6M", "--via", "stage")
    assert via["done"] and via["sha256"] == via["target_sha256"]
    assert "snapshot-copy b:stage -> dst" in via["detail"]
    final = read(b, "dst", 8 * MiB)
    assert final[6 * MiB :] == second and final[2 * MiB : 5 * MiB] == payload
    assert read(b, "stage", 2 * MiB) == second
    assert a.cli_json("snapshot", "list") == [] and b.cli_json("snapshot", "list") == []

    # failures are one clear line naming the step
    bad = a.cli("copy", "src:0+1M", "b:nope")
    assert bad.returncode == 1 and "nope" in bad.stderr.decode()
    assert bad.stderr.decode().count("\n") == 1
    big = a.cli("copy", "src", "b:stage")  # 8 MiB into a 4 MiB volume
    assert big.returncode == 1 and "stage" in big.stderr.decode()
    human = a.cli("copy", "src:0+64K", "b:dst")
    assert human.returncode == 0 and b"copied 64 KiB" in human.stdout
    assert a.cli_json("snapshot", "list") == []


# --- kills in the middle: rerun or restart completes the role change ------------------------------


def _until(check: object, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    assert callable(check)
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.1)
    raise AssertionError("condition never held")


def test_failback_survives_kills_of_either_site(cluster: MakeCluster) -> None:
    """SIGKILL of the target, then of the source, while the failback copies on a slow link:
    each restart resumes it (a new plan from a new snapshot), and it completes exactly."""
    c = cluster("a", "b", replication_options=PROXIED)
    a, b = c["a"], c["b"]
    to_a = TcpProxy(("127.0.0.1", _port(a.replication_address)))
    try:
        c.point(b, a, to_a.address)
        size = 64 * MiB
        _pair_up(a, "g", size="64M")
        base = read(a, "v1", size)
        a.kill()  # the primary dies
        assert b.cli_json("failover", "g")["phase"] == "done"
        new_side = WriteLog()
        write_some(b, "v1", new_side, 160, seed=21, size=size, blocks=16)  # ~10 MiB changed
        to_a.rate(2_000_000)
        a.start()
        wait_pair(a, "g", lambda s: s["role"] == "secondary", 30)
        started = b.cli_json("failback", "g", "--no-wait")
        assert started["phase"] == "running"

        def copied(fraction: float) -> bool:
            with b.connected() as client:
                status = client.role_status("g")
            return status.total_bytes > 0 and status.done_bytes > fraction * status.total_bytes

        _until(lambda: copied(0.2))
        a.kill()  # the target, mid-copy
        a.start()
        _until(lambda: copied(0.3))
        b.kill()  # the source, mid-copy
        b.start()
        rerun = b.cli_json("failback", "g", "--no-wait")  # a rerun reports progress
        assert rerun["command"] == "failback"
        to_a.rate(0)
        done = wait_role(b, "g", timeout=180)
        assert done["phase"] == "done", done
        status_b = wait_pair(b, "g", lambda s: s["state"] == "paired" and s["lag_records"] == 0)
        wait_pair(
            a,
            "g",
            lambda s: s["state"] == "paired" and s["applied_seq"] >= status_b["last_seq"],
        )
        expected = new_side.image("v1", size, 1 << 62, base)
        assert read(b, "v1", size) == expected
        assert read(a, "v1", size) == expected
    finally:
        to_a.close()


def test_switchover_survives_kills_of_either_site(cluster: MakeCluster) -> None:
    """SIGKILL of the new primary, then of the old one, while a switchover drains on a slow
    link: the drain resumes after each restart and ends with equal images."""
    c = cluster("a", "b", replication_options=PROXIED)
    a, b = c["a"], c["b"]
    to_b = TcpProxy(("127.0.0.1", _port(b.replication_address)))
    to_a = TcpProxy(("127.0.0.1", _port(a.replication_address)))
    try:
        c.point(a, b, to_b.address)
        c.point(b, a, to_a.address)
        size = 64 * MiB
        _pair_up(a, "g", size="64M")
        base = read(a, "v1", size)
        to_b.rate(500_000)
        to_a.rate(2_000_000)
        old = WriteLog()
        write_some(a, "v1", old, 250, seed=31, size=size, blocks=16)
        result = b.cli_json("switchover", "g", "--no-wait")
        assert result["phase"] == "running"
        new = WriteLog()
        write_some(b, "v1", new, 30, seed=32, size=size, blocks=2)

        def drained(fraction: float) -> bool:
            with b.connected() as client:
                status = client.role_status("g")
            return status.done_bytes > fraction * status.total_bytes

        _until(lambda: drained(0.2))
        b.kill()  # the new primary, mid-drain
        b.start()
        write_some(b, "v1", new, 30, seed=33, size=size, blocks=2)  # copy-on-read again
        _until(lambda: drained(0.3))
        a.kill()  # the old primary, mid-drain
        a.start()
        to_a.rate(0)
        to_b.rate(0)
        assert b.cli_json("switchover", "g", "--no-wait")["command"] == "switchover"
        done = wait_role(b, "g", timeout=180)
        assert done["phase"] == "done", done
        status_b = wait_pair(b, "g", lambda s: s["state"] == "paired" and s["lag_records"] == 0)
        wait_pair(a, "g", lambda s: s["applied_seq"] >= status_b["last_seq"])
        expected = WriteLog(entries=old.entries + new.entries).image("v1", size, 1 << 62, base)
        assert read(b, "v1", size) == expected
        assert read(a, "v1", size) == expected
    finally:
        to_a.close()
        to_b.close()


def _restart_with_fault(site: Site, point: str) -> None:
    """Restart `site` so that it dies (like kill -9) when the role change reaches `point`."""
    site.stop()
    site.extra_env = {"TARGETD_REPL_ROLES_FAULT": point}
    site.start()


def _restart_clean(site: Site) -> None:
    site.extra_env = {}
    site.start()


@pytest.mark.parametrize("point", ["failover-applied", "failover-snapshot", "failover-epoch"])
def test_failover_completes_after_a_crash_at_each_step(cluster: MakeCluster, point: str) -> None:
    c = cluster("a", "b", replication_options=FAST)
    a, b = c["a"], c["b"]
    size = 16 * MiB
    _pair_up(a, "g")
    base = read(a, "v1", size)
    log = WriteLog()
    write_some(a, "v1", log, 100, seed=41, size=size)
    wait_pair(b, "g", lambda s: s["applied_seq"] >= log.last_seq)
    a.kill()
    _restart_with_fault(b, point)
    crashed = b.cli("failover", "g")
    assert crashed.returncode == 1
    assert b.proc is not None and b.proc.wait(30) == 137  # it died at `point`
    _restart_clean(b)
    done = b.cli_json("failover", "g")  # the rerun completes it
    assert done["phase"] == "done" and done["pair"]["state"] == "swapped", done
    assert done["pair"]["role"] == "primary" and done["pair"]["epoch"] == 2
    assert read(b, "v1", size) == log.image("v1", size, log.last_seq, base)
    kinds = [s["kind"] for s in b.cli_json("snapshot", "list", "v1")]
    assert kinds == ["restart-point"]
    promoted = read(b, "v1", size)
    more = WriteLog()
    write_some(b, "v1", more, 10, seed=42, size=size)
    assert read(b, "v1", size) == more.image("v1", size, 1 << 62, promoted)


@pytest.mark.parametrize(
    ("victim", "point"),
    [("b", "rejoin-prepared"), ("b", "rejoin-planned"), ("a", "target-prepared")],
)
def test_failback_completes_after_a_crash_at_each_step(
    cluster: MakeCluster, victim: str, point: str
) -> None:
    c = cluster("a", "b", replication_options=FAST)
    a, b = c["a"], c["b"]
    size = 16 * MiB
    _pair_up(a, "g")
    base = read(a, "v1", size)
    a.kill()
    assert b.cli_json("failover", "g")["phase"] == "done"
    new_side = WriteLog()
    write_some(b, "v1", new_side, 40, seed=43, size=size, blocks=16)
    a.start()
    wait_pair(a, "g", lambda s: s["role"] == "secondary", 30)
    dying = c[victim]
    _restart_with_fault(dying, point)
    if victim == "a":
        wait_pair(a, "g", lambda s: s["role"] == "secondary", 30)
    b.cli("failback", "g", "--no-wait")  # fails or returns: the victim died at `point`
    deadline = time.monotonic() + 30
    while dying.running() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not dying.running()
    _restart_clean(dying)
    for _ in range(20):  # rerun until it is accepted (the peer may still be starting)
        rerun = b.cli("failback", "g", "--no-wait", "--json")
        if rerun.returncode == 0:
            break
        time.sleep(0.5)
    done = wait_role(b, "g", timeout=120)
    assert done["phase"] == "done", done
    status_b = wait_pair(b, "g", lambda s: s["state"] == "paired" and s["lag_records"] == 0)
    wait_pair(a, "g", lambda s: s["state"] == "paired" and s["applied_seq"] >= status_b["last_seq"])
    expected = new_side.image("v1", size, 1 << 62, base)
    assert read(b, "v1", size) == expected
    assert read(a, "v1", size) == expected


@pytest.mark.parametrize(
    ("victim", "point"),
    [("b", "switchover-stepped"), ("b", "switchover-restarted"), ("a", "stepdown-done")],
)
def test_switchover_completes_after_a_crash_at_each_step(
    cluster: MakeCluster, victim: str, point: str
) -> None:
    c = cluster("a", "b", replication_options=FAST)
    a, b = c["a"], c["b"]
    size = 16 * MiB
    _pair_up(a, "g")
    base = read(a, "v1", size)
    old = WriteLog()
    write_some(a, "v1", old, 60, seed=44, size=size, blocks=4)
    dying = c[victim]
    _restart_with_fault(dying, point)
    wait_pair(a, "g", lambda s: s["state"] == "paired" and s["role"] == "primary", 30)
    first = b.cli("switchover", "g", "--no-wait")
    deadline = time.monotonic() + 30
    while dying.running() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not dying.running(), first.stderr
    _restart_clean(dying)
    for _ in range(20):
        rerun = b.cli("switchover", "g", "--no-wait", "--json")
        if rerun.returncode == 0:
            break
        time.sleep(0.5)
    assert rerun.returncode == 0, rerun.stderr
    done = wait_role(b, "g", timeout=120)
    assert done["phase"] == "done", done
    new = WriteLog()
    write_some(b, "v1", new, 20, seed=45, size=size)
    status_b = wait_pair(b, "g", lambda s: s["state"] == "paired" and s["lag_records"] == 0)
    assert status_b["role"] == "primary"
    wait_pair(a, "g", lambda s: s["applied_seq"] >= status_b["last_seq"])
    expected = WriteLog(entries=old.entries + new.entries).image("v1", size, 1 << 62, base)
    assert read(b, "v1", size) == expected
    assert read(a, "v1", size) == expected
