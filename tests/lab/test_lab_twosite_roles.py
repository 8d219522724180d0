"""Issue 5 in the real-kernel lab: two guests, each a site with its own controller, LIO target and
open-iscsi initiator; unplanned failover, fenced return, failback, switchover, images equal."""

from __future__ import annotations

import re

import pytest

from targetd_repl.lab.prepare import LabImage
from targetd_repl.lab.qemu import run_pair_scenario
from targetd_repl.lab.scenarios_twosite_roles import VOLUME_SIZE, summary

pytestmark = pytest.mark.lab

SHA256 = re.compile(r"^[0-9a-f]{64}$")


def test_twosite_failover_failback_switchover(lab_image: LabImage) -> None:
    result = run_pair_scenario("twosite_roles", image=lab_image)
    assert result.ok
    a, b = result.sites["a"].data, result.sites["b"].data

    # the initial copy finished and b acknowledged every record before site a died
    assert a["initial_copy"]["state"] == "paired"
    before = a["before_failure"]
    assert before["acked_seq"] == before["last_seq"] > 0

    # failover on b: a clean file system, a's files intact, more files written there
    assert b["failover"]["epoch"] > before["epoch"]
    assert b["failover"]["snapshot"]  # the restart-point snapshot
    assert b["fsck_exit"] == 0
    assert len(b["files_written"]) == 2

    # a came back fenced: demoted by the handshake, its LUN refuses the initiator's write
    assert a["fenced_pair"]["role"] == "secondary"
    assert a["fenced_write"]["dd_exit"] != 0

    # failback moved only what differs: far less than the volume
    failback = b["failback"]
    assert b["after_failback"]["state"] == "paired"
    assert 0 < failback["total_bytes"] < VOLUME_SIZE // 2

    # switchover home: a primary, every file of both sites, a clean file system
    assert a["after_switchover"]["role"] == "primary"
    assert a["fsck_exit"] == 0
    assert len(a["files"]) == 6 and all(SHA256.match(h) for h in a["files"].values())
    assert {name for name in a["files"] if name.startswith("site-b")} == set(b["files_written"])

    # both LUNs, read whole through iSCSI on each site, are byte-identical; b refuses writes
    assert SHA256.match(a["device_sha256"])
    assert a["device_sha256"] == b["device_sha256"]
    assert b["pair_at_end"]["role"] == "secondary"
    assert b["secondary_write"]["dd_exit"] != 0

    story = summary({"a": a, "b": b})
    assert any("images equal: True" in line for line in story)
