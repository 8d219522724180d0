"""Async replication between two in-process sites over gRPC on 127.0.0.1: initial copy, write
load, convergence, the secondary always a prefix of the primary's acknowledged history."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from targetd_repl.model import PairMode, PairState, Role
from tests.unit.test_replication_support import (
    BS,
    Prefix,
    WriteLog,
    converged,
    image,
    make_group,
    sample_prefixes,
    two_sites,
    write_load,
)

VOLUMES = ["v1", "v2"]


def test_async_pair_converges_and_secondary_is_always_a_prefix(tmp_path: Path) -> None:
    a, b = two_sites(tmp_path)
    try:
        make_group(a, "g", VOLUMES)
        # Data written before the pair exists reaches the peer through the initial copy.
        a.engine.write("v1", 100, b"x" * (8 * BS))
        status = a.manager.create_pair("g", "site-b", PairMode.ASYNC)
        assert status.state is PairState.COPYING and status.role is Role.PRIMARY
        converged(a, b, "g")
        assert image(b, "v1") == image(a, "v1")
        base = {v: image(a, v) for v in VOLUMES}

        log = WriteLog()
        stop = threading.Event()
        prefixes = Prefix()
        sampler = threading.Thread(target=sample_prefixes, args=(b, "g", VOLUMES, stop, prefixes))
        sampler.start()
        write_load(a, VOLUMES, log, count=800, seed=1)
        status = converged(a, b, "g")
        stop.set()
        sampler.join()
        for volume in VOLUMES:
            assert image(b, volume) == image(a, volume), volume
        # Every sample of the secondary is the primary's history up to the applied seq.
        assert prefixes.samples, "the sampler never saw the secondary"
        for applied, images in prefixes.samples:
            for volume in VOLUMES:
                assert images[volume] == log.image(volume, applied, base[volume]), (
                    f"secondary at seq {applied} is not a prefix ({volume})"
                )
        assert status.lag_records == 0
        secondary = b.manager.pair_status("g")
        assert secondary.role is Role.SECONDARY and secondary.state is PairState.PAIRED
        # The secondary's group refuses initiator writes.
        with pytest.raises(Exception, match="read-only"):
            b.engine.write("v1", 0, b"y" * BS)
    finally:
        a.close()
        b.close()
