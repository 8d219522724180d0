"""Link faults between two in-process sites, through a TCP proxy, under write load: delay, cut,
drop (black hole) and reconnect. Afterwards the secondary equals the primary, and every sample
taken while it was consistent is a prefix of the primary's acknowledged history."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from targetd_repl.model import PairMode, PairState
from tests.integration.tcp_proxy import TcpProxy
from tests.unit.test_replication_support import (
    FAST,
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


@pytest.mark.parametrize("lane", [False, True], ids=["grpc", "bulk-lane"])
def test_delay_cut_drop_reconnect_under_load(tmp_path: Path, lane: bool) -> None:
    a, b = two_sites(tmp_path, lane=lane)
    proxy = TcpProxy(("127.0.0.1", b.port))
    # With a bulk lane, the lane crosses the same faulty link as the gRPC stream.
    lane_address = proxy.route(("127.0.0.1", b.lane_port)) if lane else None
    a.manager.set_peer_address("site-b", proxy.address, lane_address=lane_address)
    try:
        make_group(a, "g", VOLUMES)
        a.manager.create_pair("g", "site-b", PairMode.ASYNC)
        converged(a, b, "g")
        base = {v: image(a, v) for v in VOLUMES}
        log = WriteLog()
        stop = threading.Event()
        prefixes = Prefix()
        sampler = threading.Thread(target=sample_prefixes, args=(b, "g", VOLUMES, stop, prefixes))
        sampler.start()
        loader = threading.Thread(
            target=write_load, args=(a, VOLUMES, log), kwargs={"count": 1600, "seed": 11}
        )
        loader.start()
        states: list[PairState] = []
        try:
            proxy.delay(0.02)
            time.sleep(1.0)
            proxy.delay(0.0)
            proxy.cut()  # both ends reset: the sender reconnects
            time.sleep(1.0)
            proxy.drop()  # a black hole longer than the link timeout
            time.sleep(FAST.link_timeout + 1.0)
            states.append(a.manager.pair_status("g").state)
            proxy.heal()
        finally:
            loader.join()
        converged(a, b, "g", timeout=60)
        stop.set()
        sampler.join()
        assert PairState.SUSPENDED_ERROR in states or proxy.connections >= 3
        assert proxy.connections >= 3  # it reconnected after the cut and after the drop
        if lane:  # every stream after a reconnect opened its lane again
            assert b.manager.lane is not None and b.manager.lane.admitted >= 2
        for volume in VOLUMES:
            assert image(b, volume) == image(a, volume), volume
        for applied, images in prefixes.samples:
            for volume in VOLUMES:
                assert images[volume] == log.image(volume, applied, base[volume]), applied
    finally:
        proxy.close()
        a.close()
        b.close()
