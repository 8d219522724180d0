"""`verify` on two real controllers on 127.0.0.1: an async pair compares equal while writes keep
flowing, a region changed behind replication's back is found exactly, and bad requests get one
line and exit 2."""

from __future__ import annotations

import json
import os
import random
import threading

import pytest

from tests.integration.conftest import MakeCluster
from tests.integration.test_controller_pair import wait_pair

pytestmark = pytest.mark.integration

MiB = 1 << 20
REGION = 64 << 10  # RoleSettings.region_size


def test_verify_compares_both_images_at_one_seq_and_finds_a_changed_region(
    cluster: MakeCluster,
) -> None:
    c = cluster("a", "b")
    a, b = c["a"], c["b"]
    a.cli_json("group", "create", "db")
    a.cli_json("volume", "create", "v1", "--size", "16M", "--group", "db")
    a.cli_json("volume", "create", "v2", "--size", "4M", "--group", "db")
    with a.connected() as client:
        client.write("v1", 3 * MiB, os.urandom(MiB))
        client.write("v2", 0, os.urandom(MiB))
    a.cli_json("pair", "create", "db", "--peer", "b", "--mode", "async")
    wait_pair(a, "db", lambda s: s["state"] == "paired", timeout=120)

    # Writes keep flowing through the whole verify: each slice is compared at one seq.
    stop = threading.Event()
    written = [0]

    def writer() -> None:
        rng = random.Random(7)
        with a.connected() as client:
            while not stop.is_set():
                client.write("v1", rng.randrange(0, 16 * MiB // 4096) * 4096, rng.randbytes(4096))
                written[0] += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        run = a.cli("verify", "db", "--json")
    finally:
        stop.set()
        thread.join()
    assert run.returncode == 0, run.stderr.decode()
    doc = json.loads(run.stdout)
    assert doc["equal"] is True and doc["differing"] == []
    assert doc["regions"] == (16 + 4) * MiB // REGION and doc["bytes"] == 20 * MiB
    assert written[0] > 0 and 0 < doc["first_seq"] <= doc["last_seq"]
    assert doc["max_pause_ms"] > 0

    # One volume only.
    one = json.loads(a.cli("verify", "db", "--volume", "v2", "--json").stdout)
    assert (one["equal"], one["regions"], one["bytes"]) == (True, 4 * MiB // REGION, 4 * MiB)

    # Change b's image behind replication's back: verify names exactly that region.
    status = wait_pair(a, "db", lambda s: s["lag_records"] == 0)
    wait_pair(b, "db", lambda s: s["applied_seq"] >= status["last_seq"])
    assert b.stop() == 0
    image = b.state_dir / "volumes" / "v2.img"
    fd = os.open(image, os.O_RDWR)
    try:
        original = os.pread(fd, 16, 2 * MiB + 4096 + 100)
        os.pwrite(fd, bytes(x ^ 0xFF for x in original), 2 * MiB + 4096 + 100)
    finally:
        os.close(fd)
    b.start()
    wait_pair(a, "db", lambda s: s["state"] == "paired", timeout=120)
    run = a.cli("verify", "db", "--json")
    assert run.returncode == 1, run.stderr.decode()
    doc = json.loads(run.stdout)
    assert doc["equal"] is False
    assert doc["differing"] == [{"volume": "v2", "offset": 2 * MiB, "length": REGION}]
    human = a.cli("verify", "db")
    assert human.returncode == 1
    assert "1 region(s) differ" in human.stdout.decode()

    # Bad requests: one line, exit 2, nothing changed.
    for site, args, expected in (
        (b, ("verify", "db"), "run verify at its primary site a"),
        (a, ("verify", "nope"), "nope"),
        (a, ("verify", "db", "--volume", "v9"), "v9"),
    ):
        bad = site.cli(*args)
        lines = bad.stderr.decode().strip().splitlines()
        assert bad.returncode == 2 and len(lines) == 1 and expected in lines[0], lines
