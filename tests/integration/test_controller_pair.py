"""Two real controllers on 127.0.0.1, paired through the CLI: an async pair's initial copy and
journal shipping converge, so both sites read the same bytes; pair commands and their errors.
(Kill and link-fault tests live with the replication tests; the harness supports them.)"""

from __future__ import annotations

import hashlib
import os
import time
import urllib.request
from typing import Any

import pytest

from targetd_repl.cli_output import pair_doc
from tests.integration.conftest import MakeCluster
from tests.integration.harness import Site

pytestmark = pytest.mark.integration

MiB = 1 << 20


def wait_pair(site: Site, group: str, check: Any, timeout: float = 60.0) -> dict[str, Any]:
    """Poll `pair status GROUP` until check(status) holds; return that status."""
    deadline = time.monotonic() + timeout
    status: dict[str, Any] = {}
    with site.connected() as client:
        while time.monotonic() < deadline:
            status = pair_doc(client.pair_status(group))
            if check(status):
                return status
            time.sleep(0.1)
    raise AssertionError(f"pair {group} at site {site.name} never got there: {status}")


def digest(site: Site, volume: str, size: int) -> str:
    with site.connected() as client:
        return hashlib.sha256(client.read(volume, 0, size)).hexdigest()


def test_async_pair_created_through_the_cli_converges(cluster: MakeCluster) -> None:
    c = cluster("a", "b", metrics=True)
    a, b = c["a"], c["b"]
    a.cli_json("group", "create", "db")
    a.cli_json("volume", "create", "v1", "--size", "4M", "--group", "db")
    a.cli_json("volume", "create", "v2", "--size", "2M", "--group", "db", "--block-size", "4096")
    # Data written before the pair exists moves with the initial copy.
    before = os.urandom(MiB)
    with a.connected() as client:
        client.write("v1", MiB, before)

    pair = a.cli_json("pair", "create", "db", "--peer", "b", "--mode", "async")
    assert (pair["group"], pair["peer"], pair["mode"], pair["role"]) == (
        "db",
        "b",
        "async",
        "primary",
    )
    assert pair["state"] in ("copying", "paired")

    # Writes while the copy runs and after it: journal shipping keeps their order.
    with a.connected() as client:
        for i in range(64):
            client.write("v2", (i % 16) * 4096, os.urandom(4096))
            client.write("v1", i * 8192, os.urandom(1024))
    done = a.cli("pair", "status", "db", "--until", "paired", "--wait-timeout", "120", "--json")
    assert done.returncode == 0, done.stderr
    status = wait_pair(a, "db", lambda s: s["state"] == "paired" and s["lag_records"] == 0)
    assert status["acked_seq"] == status["last_seq"]

    # The secondary applied everything: both sites read the same bytes, volume by volume.
    wait_pair(b, "db", lambda s: s["applied_seq"] >= status["last_seq"])
    for volume, size in (("v1", 4 * MiB), ("v2", 2 * MiB)):
        assert digest(a, volume, size) == digest(b, volume, size), volume
    # The journal went over b's bulk lane (mutual TLS), announced in its endpoints file.
    assert b.endpoints["bulk_lane"].startswith("127.0.0.1:")
    assert "shipping over the bulk lane" in a.log_text()
    # Prometheus: both sites report the pair, in sync, and the group's journal.
    for site, role in ((a, "primary"), (b, "secondary")):
        url = f"http://{site.endpoints['metrics']}/metrics"
        with urllib.request.urlopen(url, timeout=10) as reply:
            text = reply.read().decode()
        who = f'group="db",peer="{"b" if site is a else "a"}",role="{role}"'
        assert f'targetd_repl_pair_state{{{who},state="paired"}} 1' in text, text
        assert f"targetd_repl_pair_lag_records{{{who}}} 0" in text, text
        assert f'targetd_repl_journal_records_total{{group="db",role="{role}"}}' in text

    # What the secondary shows through the CLI.
    groups = {g["name"]: g for g in b.cli_json("group", "list")}
    assert (groups["db"]["role"], groups["db"]["peer"]) == ("secondary", "a")
    assert [v["name"] for v in b.cli_json("volume", "list", "--group", "db")] == ["v1", "v2"]
    pairs = b.cli_json("pair", "status")
    assert [(p["group"], p["role"], p["peer"]) for p in pairs] == [("db", "secondary", "a")]
    refused = b.cli("io", "write", "v1", "--offset", "0", "--pattern", "1", "--length", "512")
    assert refused.returncode == 1
    assert refused.stderr.decode().count("\n") == 1
    assert "read-only here" in refused.stderr.decode()


def test_pair_commands_and_their_errors(cluster: MakeCluster) -> None:
    c = cluster("a", "b")
    a, b = c["a"], c["b"]
    a.cli_json("volume", "create", "v", "--size", "1M")
    a.cli_json("pair", "create", "v", "--peer", "b", "--mode", "sync")
    wait_pair(a, "v", lambda s: s["state"] == "paired")

    again = a.cli("pair", "create", "v", "--peer", "b", "--mode", "sync")
    assert (again.returncode, again.stderr.decode()) == (
        1,
        "targetd-repl: group 'v' is already paired\n",
    )
    unknown = a.cli("pair", "status", "nope")
    assert unknown.returncode == 1
    assert unknown.stderr.decode().count("\n") == 1 and "nope" in unknown.stderr.decode()

    suspended = a.cli_json("pair", "suspend", "v")
    assert suspended["state"] == "suspended"
    a.cli_json("io", "write", "v", "--offset", "0", "--pattern", "7", "--length", "4K")
    assert a.cli_json("pair", "status", "v")["unsent_regions"] >= 1
    a.cli_json("pair", "resume", "v")
    wait_pair(a, "v", lambda s: s["state"] == "paired" and s["lag_records"] == 0)
    wait_pair(b, "v", lambda s: s["applied_seq"] >= 1)
    assert digest(a, "v", MiB) == digest(b, "v", MiB)

    # Human output: the watch view ends when the pair is paired.
    watched = a.cli("pair", "status", "v", "--until", "paired", "--wait-timeout", "30")
    assert watched.returncode == 0, watched.stderr

    assert a.cli_json("pair", "delete", "v") == {"deleted": "v"}
    assert a.cli_json("pair", "status") == []
    gone = a.cli("pair", "status", "v")
    assert gone.returncode == 1


def test_restarts_resume_the_pair_from_persisted_state(cluster: MakeCluster) -> None:
    c = cluster("a", "b")
    a, b = c["a"], c["b"]
    a.cli_json("volume", "create", "v", "--size", "2M")
    a.cli_json("pair", "create", "v", "--peer", "b", "--mode", "async")
    wait_pair(a, "v", lambda s: s["state"] == "paired")

    assert b.stop() == 0  # the secondary goes away cleanly; writes go on at the primary
    with a.connected() as client:
        for i in range(16):
            client.write("v", i * 4096, os.urandom(4096))
    assert a.stop() == 0
    a.start()
    b.start()  # same ports: each finds the other where it was
    status = wait_pair(a, "v", lambda s: s["state"] == "paired" and s["lag_records"] == 0)
    wait_pair(b, "v", lambda s: s["applied_seq"] >= status["last_seq"])
    assert digest(a, "v", 2 * MiB) == digest(b, "v", 2 * MiB)
