"""Two-site lab scenarios: two guests, each a site with its own LIO, joined by a private network.

- `twosite_smoke`: the guest network carries data both ways (16 MiB over TCP from b to a and
  16 MiB back, sha256 compared on both ends, throughput measured by the receiver), and iSCSI
  crosses it: site a exports a kernel fileio LUN (demo mode, portal on its own address), site b's
  open-iscsi discovers it, logs in over the network, writes a random pattern with O_DIRECT, reads
  it back and logs out; site a then finds the pattern byte for byte in its backing file.

Both guests run the same function; `ctx.site.name` says which half this is, and the halves
coordinate with `ctx.signal(name, data)` / `ctx.wait_for(name)` (see `sites.Rendezvous`).
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from targetd_repl import lio
from targetd_repl.lab import initiator
from targetd_repl.lab.data import read_range, sha256
from targetd_repl.lab.errors import ScenarioAssertion
from targetd_repl.lab.registry import scenario
from targetd_repl.lab.sites import find_interface

if TYPE_CHECKING:
    from targetd_repl.lab.guest import GuestContext
    from targetd_repl.lab.sites import SiteInfo

MiB = 1 << 20
SITES = ("a", "b")
TARGET_SITE = SITES[0]  # exports the LUN, receives first over TCP
TCP_PORT = 5001
TCP_BYTES = 16 * MiB
ISCSI_PORT = 3260
LUN_SIZE = 32 * MiB
PATTERN_OFFSET = 1 * MiB
PATTERN_BYTES = 4 * MiB
WORKDIR = Path("/var/lib/targetd-lab")  # in the guest's tmpfs overlay
STEP_TIMEOUT_S = 180.0  # how long one half waits for the other's next step (TCG is slow)


def _site(ctx: GuestContext) -> SiteInfo:
    if ctx.site is None:
        raise ScenarioAssertion("a two-site scenario runs only under run_pair_scenario")
    return ctx.site


def _recv_all(conn: socket.socket, expected: int) -> tuple[bytearray, float]:
    """Read to EOF (at most `expected` + 1 bytes kept); returns the bytes and the seconds from
    the first byte to EOF."""
    buf = bytearray(expected + 1)
    view = memoryview(buf)
    got = 0
    first: float | None = None
    while True:
        n = conn.recv_into(view[got:], min(1 * MiB, len(buf) - got) or 1)
        if n == 0:
            break
        if first is None:
            first = time.monotonic()
        got += n
        if got > expected:
            break
    seconds = time.monotonic() - (first or time.monotonic())
    return buf[:got], seconds


def _mb_s(nbytes: int, seconds: float) -> float:
    return round(nbytes / MiB / seconds, 2) if seconds > 0 else 0.0


def _nic_bytes(iface: str) -> dict[str, int]:
    stats = Path(f"/sys/class/net/{iface}/statistics")
    return {name: int((stats / name).read_text()) for name in ("rx_bytes", "tx_bytes")}


def _tcp_exchange(ctx: GuestContext) -> dict[str, Any]:
    """16 MiB from b to a, then 16 MiB from a to b, on one TCP connection over the guest NIC."""
    site = _site(ctx)
    outgoing = os.urandom(TCP_BYTES)
    sent_sha = sha256(outgoing)
    if site.name == TARGET_SITE:
        with socket.create_server((site.address, TCP_PORT)) as server:
            server.settimeout(STEP_TIMEOUT_S)
            ctx.signal("tcp_listening", {"address": site.address, "port": TCP_PORT})
            conn, peer = server.accept()
        with conn:
            conn.settimeout(STEP_TIMEOUT_S)
            received, recv_s = _recv_all(conn, TCP_BYTES)
            started = time.monotonic()
            conn.sendall(outgoing)
            conn.shutdown(socket.SHUT_WR)
            conn.recv(1)  # b closes after reading everything: our bytes have arrived
            send_s = time.monotonic() - started
    else:
        listening = ctx.wait_for("tcp_listening", STEP_TIMEOUT_S)
        with socket.create_connection(
            (site.peer_address, int(listening["port"])), timeout=STEP_TIMEOUT_S
        ) as conn:
            peer = conn.getpeername()
            started = time.monotonic()
            conn.sendall(outgoing)
            conn.shutdown(socket.SHUT_WR)
            send_s = time.monotonic() - started  # until the kernel took it all (not the peer)
            received, recv_s = _recv_all(conn, TCP_BYTES)
    received_sha = sha256(received)
    mine = {
        "peer": f"{peer[0]}:{peer[1]}",
        "sent_bytes": len(outgoing),
        "sent_sha256": sent_sha,
        "received_bytes": len(received),
        "received_sha256": received_sha,
        "receive_s": round(recv_s, 3),
        "receive_mb_s": _mb_s(len(received), recv_s),
        "send_s": round(send_s, 3),
    }
    ctx.log.info("tcp on %s: %s", site.name, mine)
    theirs = ctx.barrier("tcp_done", mine, timeout=STEP_TIMEOUT_S)
    ctx.check(len(received) == TCP_BYTES, f"{site.name} received {len(received)} of {TCP_BYTES}")
    ctx.check(
        received_sha == theirs["sent_sha256"],
        f"{site.name} received what {site.peer} sent ({received_sha[:16]})",
    )
    ctx.check(
        theirs["received_sha256"] == sent_sha,
        f"{site.peer} received what {site.name} sent ({sent_sha[:16]})",
    )
    return {**mine, "peer_report": theirs}


def _export_and_check(ctx: GuestContext) -> dict[str, Any]:
    """Site a: a demo-mode fileio LUN on its own address; after b wrote, the file has it."""
    site = _site(ctx)
    WORKDIR.mkdir(parents=True, exist_ok=True)
    backing = WORKDIR / "twosite.img"
    portal = lio.Portal(site.address, ISCSI_PORT)
    lio_site = f"lab-{site.name}"
    wanted = lio.LioConfig(
        site=lio_site,
        luns=(
            lio.LunSpec("xsite", LUN_SIZE, kind=lio.BackstoreKind.FILEIO, path=str(backing), lun=0),
        ),
        portals=(portal,),
        demo_mode=True,
    )
    with ctx.timed("lio_reconcile"):
        changes = lio.reconcile(wanted)
    ctx.check(f"create portal {portal} on {wanted.target_iqn}" in changes, f"portal: {changes}")
    ctx.signal("target_ready", {"iqn": wanted.target_iqn, "portal": str(portal)})
    with ctx.timed("wait_for_initiator"):
        written = ctx.wait_for("iscsi_written", STEP_TIMEOUT_S)
    head = read_range(backing, 0, PATTERN_OFFSET)
    in_file = sha256(read_range(backing, PATTERN_OFFSET, PATTERN_BYTES))
    ctx.check(
        in_file == written["sha256"],
        f"the backing file holds at 1 MiB what {site.peer} wrote ({in_file[:16]})",
    )
    ctx.check(head == bytes(PATTERN_OFFSET), "the first MiB of the backing file is still zeros")
    with ctx.timed("lio_teardown"):
        teardown = lio.reconcile(lio.LioConfig(site=lio_site, portals=(portal,), demo_mode=True))
        lio.remove_target(lio_site)
    ctx.signal("iscsi_checked", {"sha256_backing": in_file})
    return {
        "role": "target",
        "target_iqn": wanted.target_iqn,
        "portal": str(portal),
        "reconcile": changes,
        "teardown": teardown,
        "sha256_backing": in_file,
        "peer_wrote": written,
    }


def _login_and_write(ctx: GuestContext, iface: str) -> dict[str, Any]:
    """Site b: discover a's target over the network, log in, write and read back, log out."""
    site = _site(ctx)
    with ctx.timed("wait_for_target"):
        ready = ctx.wait_for("target_ready", STEP_TIMEOUT_S)
    iqn, portal = ready["iqn"], ready["portal"]
    ctx.check(portal.startswith(site.peer_address + ":"), f"the portal {portal} is the peer's")
    with ctx.timed("iscsi_discovery"):
        offered = initiator.discover(ctx, portal)
    ctx.check(iqn in offered, f"discovery at {portal} offers {iqn} (got {offered})")
    with ctx.timed("iscsi_login"):
        initiator.login(ctx, iqn, portal)
        device = initiator.disk_for(ctx, iqn, lun=0)
    size = initiator.block_size_bytes(device)
    ctx.check(size == LUN_SIZE, f"{device} has the LUN's size {LUN_SIZE} (got {size})")
    pattern = os.urandom(PATTERN_BYTES)
    written = sha256(pattern)
    pattern_file = Path("/tmp/twosite-pattern.bin")
    pattern_file.write_bytes(pattern)
    nic_before = _nic_bytes(iface)
    started = time.monotonic()
    with ctx.timed("write_4MiB_direct"):
        ctx.run(
            [
                *("dd", f"if={pattern_file}", f"of={device}", "bs=1M"),
                *(f"seek={PATTERN_OFFSET // MiB}", "oflag=direct", "conv=fsync", "status=none"),
            ]
        )
    write_s = time.monotonic() - started
    nic_after = _nic_bytes(iface)
    readback = Path("/tmp/twosite-readback.bin")
    with ctx.timed("read_4MiB_direct"):
        ctx.run(
            [
                *("dd", f"if={device}", f"of={readback}", "bs=1M"),
                *(f"skip={PATTERN_OFFSET // MiB}", f"count={PATTERN_BYTES // MiB}"),
                *("iflag=direct", "status=none"),
            ]
        )
    read_back = sha256(readback.read_bytes())
    ctx.check(read_back == written, f"read back what was written ({written[:16]})")
    with ctx.timed("iscsi_logout"):
        initiator.logout(ctx, iqn, portal)
    sent = nic_after["tx_bytes"] - nic_before["tx_bytes"]
    ctx.check(sent >= PATTERN_BYTES, f"the write left through {iface} ({sent} bytes sent)")
    ctx.signal("iscsi_written", {"sha256": written, "offset": PATTERN_OFFSET, "device": device})
    checked = ctx.wait_for("iscsi_checked", STEP_TIMEOUT_S)
    ctx.check(
        checked["sha256_backing"] == written,
        f"{site.peer}'s backing file holds what {site.name} wrote",
    )
    return {
        "role": "initiator",
        "target_iqn": iqn,
        "portal": portal,
        "offered_targets": offered,
        "device": device,
        "device_size": size,
        "sha256_written": written,
        "sha256_read": read_back,
        "sha256_peer_backing": checked["sha256_backing"],
        "write_mb_s": _mb_s(PATTERN_BYTES, write_s),
        "nic_tx_bytes_during_write": sent,
    }


def _meminfo() -> dict[str, int]:
    wanted = ("MemTotal", "MemAvailable", "Shmem")
    out: dict[str, int] = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in wanted:
            out[f"{key}_mib"] = int(value.split()[0]) // 1024
    return out


@scenario("twosite_smoke", needs=("iscsid",), timeout_s=420, sites=SITES)
def twosite_smoke(ctx: GuestContext) -> dict[str, Any]:
    """Two guests: TCP both ways over their network; b writes over iSCSI to a's fileio LUN."""
    site = _site(ctx)
    iface = find_interface(site.mac)
    data: dict[str, Any] = {
        "site": site.name,
        "address": site.address,
        "peer": site.peer,
        "peer_address": site.peer_address,
        "interface": iface,
    }
    with ctx.timed("tcp_exchange"):
        data["tcp"] = _tcp_exchange(ctx)
    if site.name == TARGET_SITE:
        data["iscsi"] = _export_and_check(ctx)
    else:
        data["iscsi"] = _login_and_write(ctx, iface)
    data["nic"] = _nic_bytes(iface)
    data["memory"] = _meminfo()
    return data
