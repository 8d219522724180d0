"""The two-site lab: two QEMU guests on a private network (tests marked `lab`), and the host-side
pieces that need no guest (the rendezvous, the network arguments, the registry rules)."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import pytest

from targetd_repl.lab.errors import LabError, ScenarioAssertion
from targetd_repl.lab.prepare import LabImage
from targetd_repl.lab.qemu import (
    PAIR_MTU,
    pair_network,
    pair_site_params,
    run_pair_scenario,
    run_scenario,
)
from targetd_repl.lab.registry import load_all, scenario
from targetd_repl.lab.sites import PeerFailed, Rendezvous, SiteInfo

MiB = 1 << 20


@pytest.mark.lab
def test_twosite_smoke(lab_image: LabImage) -> None:
    result = run_pair_scenario("twosite_smoke", image=lab_image)
    assert result.ok
    a, b = result.sites["a"], result.sites["b"]

    # no traffic can leave the machine: one dgram NIC per guest, QEMU's sockets on 127.0.0.1
    for site in (a, b):
        cmd = (site.run_dir / "qemu-command.txt").read_text()
        netdevs = re.findall(r"-netdev (\S+)", cmd)
        assert len(netdevs) == 1 and netdevs[0].startswith("dgram,")
        assert set(re.findall(r"\d+\.\d+\.\d+\.\d+", netdevs[0])) == {"127.0.0.1"}
        assert "-nic " not in cmd

    # each guest got its address, its own initiator name, and reached the other
    net_a, net_b = a.raw["network"], b.raw["network"]
    assert (net_a["address"], net_b["address"]) == ("10.77.0.1/24", "10.77.0.2/24")
    assert net_a["mtu"] == net_b["mtu"] == PAIR_MTU
    assert net_a["initiator_name"] != net_b["initiator_name"]
    assert net_a["ping_ms"] > 0 and net_b["ping_ms"] > 0

    # TCP both ways: what each end sent is what the other received
    tcp_a, tcp_b = a.data["tcp"], b.data["tcp"]
    assert tcp_a["received_bytes"] == tcp_b["received_bytes"] == 16 * MiB
    assert tcp_a["received_sha256"] == tcp_b["sent_sha256"]
    assert tcp_b["received_sha256"] == tcp_a["sent_sha256"]
    assert tcp_a["sent_sha256"] != tcp_b["sent_sha256"]
    assert tcp_a["peer"].startswith("10.77.0.2:") and tcp_b["peer"] == "10.77.0.1:5001"

    # iSCSI across the guest network: b wrote through a's portal, a's file holds it
    target, initiator = a.data["iscsi"], b.data["iscsi"]
    assert target["portal"] == initiator["portal"] == "10.77.0.1:3260"
    assert target["target_iqn"] in initiator["offered_targets"]
    assert initiator["device"].startswith("/dev/sd")
    assert initiator["device_size"] == 32 * MiB
    assert initiator["sha256_written"] == initiator["sha256_read"] == target["sha256_backing"]
    assert initiator["nic_tx_bytes_during_write"] >= 4 * MiB

    boots = {site: r.timings["boot_s"] for site, r in result.sites.items()}
    print(
        f"\ntwosite_smoke: {result.duration_s:.1f} s wall ({result.accel}, smp {result.smp}, "
        f"{result.mem_mb} MiB each); stage 2 at {boots} s guest uptime; TCP b->a "
        f"{tcp_a['receive_mb_s']} MB/s, a->b {tcp_b['receive_mb_s']} MB/s; iSCSI write "
        f"{initiator['write_mb_s']} MB/s"
    )


# --- host side, no guest ------------------------------------------------------------------


def test_pair_network_stays_on_loopback() -> None:
    args = pair_network(0, 40001, 40002)
    netdev = args[args.index("-netdev") + 1]
    assert netdev.startswith("dgram,id=n0,")
    assert "local.host=127.0.0.1" in netdev and "local.port=40001" in netdev
    assert "remote.host=127.0.0.1" in netdev and "remote.port=40002" in netdev
    assert "virtio-net-pci,netdev=n0,mac=52:54:00:77:00:01" in args[args.index("-device") + 1]


def test_pair_site_params_describe_each_half() -> None:
    params = pair_site_params(("a", "b"))
    assert params["a"]["lab_addr"] == "10.77.0.1/24"
    assert params["b"]["lab_peers"] == "a:10.77.0.1"
    site = SiteInfo.from_env(params["b"])
    assert site is not None
    assert (site.name, site.address, site.prefix, site.peer, site.peer_address) == (
        "b",
        "10.77.0.2",
        24,
        "a",
        "10.77.0.1",
    )
    assert site.mac == "52:54:00:77:00:02" and site.mtu == PAIR_MTU
    assert SiteInfo.from_env({}) is None
    with pytest.raises(ScenarioAssertion):
        SiteInfo.from_env({"lab_site": "a", "lab_addr": "10.77.0.1"})


def test_two_site_scenarios_are_registered_apart() -> None:
    scenarios = load_all()
    assert scenarios["twosite_smoke"].sites == ("a", "b")
    assert scenarios["lio_fileio_smoke"].sites == ()
    with pytest.raises(LabError, match="run_pair_scenario"):
        run_scenario("twosite_smoke")
    with pytest.raises(LabError, match="not a two-site"):
        run_pair_scenario("lio_fileio_smoke")
    for bad in (("a",), ("a", "a"), ("a", "B"), ("a", "b", "c")):
        with pytest.raises(ValueError, match="sites"):
            scenario("bad", sites=bad)


def test_rendezvous_signal_wait_and_barrier(tmp_path: Path) -> None:
    a = Rendezvous(tmp_path, "a", ("b",), poll_s=0.01)
    b = Rendezvous(tmp_path, "b", ("a",), poll_s=0.01)
    a.signal("ready", {"port": 3260})
    assert b.wait_for("ready", timeout=1) == {"port": 3260}
    with pytest.raises(ScenarioAssertion, match="twice"):
        a.signal("ready")
    with pytest.raises(ScenarioAssertion, match="did not signal"):
        a.wait_for("never", timeout=0.05)
    got: dict[str, object] = {}
    thread = threading.Thread(target=lambda: got.update(b.barrier("met", "from b", timeout=5)))
    thread.start()
    time.sleep(0.05)
    assert a.barrier("met", "from a", timeout=5) == {"b": "from b"}
    thread.join(5)
    assert got == {"a": "from a"}
    assert not list(tmp_path.rglob(".*.tmp"))  # written atomically, nothing left behind


def test_rendezvous_stops_waiting_when_the_peer_fails(tmp_path: Path) -> None:
    a = Rendezvous(tmp_path, "a", ("b",), poll_s=0.01)
    b = Rendezvous(tmp_path, "b", ("a",), poll_s=0.01)
    b.fail("AssertionError: boom")
    started = time.monotonic()
    with pytest.raises(PeerFailed, match="site b failed: AssertionError: boom"):
        a.wait_for("ready", timeout=60)
    assert time.monotonic() - started < 5


def test_rendezvous_stops_waiting_when_the_host_aborts(tmp_path: Path) -> None:
    a = Rendezvous(tmp_path, "a", ("b",), poll_s=0.01)
    (tmp_path / "_host").mkdir()
    (tmp_path / "_host" / "abort.json").write_text('{"reason": "site b died"}')
    with pytest.raises(PeerFailed, match="host aborted the run: site b died"):
        a.wait_for("ready", timeout=60)
