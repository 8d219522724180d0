"""SIGKILL of either controller under write load (two real processes on 127.0.0.1, I/O through
the control API): no acknowledged write is lost at the primary, and the secondary converges to
exactly the primary's image once both run again."""

from __future__ import annotations

import random
import threading
import time
from typing import Any

import pytest

from targetd_repl.cli_output import pair_doc
from tests.integration.conftest import MakeCluster
from tests.integration.harness import Site

pytestmark = pytest.mark.integration

SIZE = 4 << 20
BLOCK = 4096


def _wait(site: Site, check: Any, timeout: float = 90.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            with site.connected() as client:
                status = pair_doc(client.pair_status("g"))
            if check(status):
                return status
        except Exception:  # the site is restarting
            pass
        time.sleep(0.1)
    raise AssertionError(f"pair g at {site.name} never got there: {status}")


def test_sigkill_either_site_under_load(cluster: MakeCluster) -> None:
    c = cluster("a", "b")
    a, b = c["a"], c["b"]
    a.cli_json("group", "create", "g")
    a.cli_json("volume", "create", "v1", "--size", "4M", "--group", "g")
    a.cli_json("pair", "create", "g", "--peer", "b", "--mode", "async")
    _wait(a, lambda s: s["state"] == "paired")

    acked: list[tuple[int, bytes]] = []  # (offset, data) in acknowledgement order: one writer
    unacked: list[tuple[int, int, bytes]] = []  # (acked writes before it, offset, data)
    stop = threading.Event()
    paused = threading.Event()
    rng = random.Random(42)

    def writer() -> None:
        while not stop.is_set():
            if paused.is_set():
                time.sleep(0.02)
                continue
            offset = rng.randrange(0, SIZE // BLOCK) * BLOCK
            data = rng.randbytes(BLOCK)
            try:
                with a.connected(timeout=5) as client:
                    for _ in range(20):
                        client.write("v1", offset, data)
                        acked.append((offset, data))
                        offset = rng.randrange(0, SIZE // BLOCK) * BLOCK
                        data = rng.randbytes(BLOCK)
            except Exception:  # the primary is down: this write may or may not have landed
                unacked.append((len(acked), offset, data))
                time.sleep(0.05)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        for victim in (b, a, b):
            time.sleep(rng.uniform(0.5, 1.5))
            if victim is a:
                paused.set()  # the write in flight at the kill is not acknowledged
            victim.kill()
            time.sleep(0.3)
            victim.start()
            paused.clear()
        time.sleep(1.0)
    finally:
        stop.set()
        thread.join()
    assert len(acked) > 50

    expected = bytearray(SIZE)
    last_acked: dict[int, int] = {}
    for index, (offset, data) in enumerate(acked):
        expected[offset : offset + len(data)] = data
        last_acked[offset] = index
    with a.connected() as client:
        primary = client.read("v1", 0, SIZE)
    # No acknowledged write lost: every block holds its last acknowledged data, or the data of
    # a write that failed (unacknowledged) after it, which may have landed before the crash.
    for offset in range(0, SIZE, BLOCK):
        got = primary[offset : offset + BLOCK]
        if got == expected[offset : offset + BLOCK]:
            continue
        maybe = [d for n, o, d in unacked if o == offset and n > last_acked.get(offset, -1)]
        assert got in maybe, f"block at {offset} lost its acknowledged data"
    with a.connected() as client:
        seq = client.write("v1", 0, bytes(expected[:BLOCK]))  # a marker write after the crashes
    _wait(a, lambda s: s["state"] == "paired" and s["acked_seq"] >= seq)
    _wait(b, lambda s: s["applied_seq"] >= seq)
    with a.connected() as client:
        primary = client.read("v1", 0, SIZE)
    with b.connected() as client:
        assert client.read("v1", 0, SIZE) == primary
