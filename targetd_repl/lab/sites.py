"""Two-site lab, guest side: who this guest is, its NIC on the private guest network, and the
rendezvous the two halves of a scenario coordinate through.

A two-site run (`qemu.run_pair_scenario`) boots one guest per site. Each gets, on its kernel
command line, `lab_site` (its name), `lab_addr` (its address with prefix, e.g. 10.77.0.1/24),
`lab_mac` (its NIC's MAC), `lab_mtu` and `lab_peers` (`name:address`, comma separated), and both
mount the same read-write 9p share (tag `shared`) at /lab-shared.

Rendezvous: `signal(name, data)` writes `/lab-shared/<site>/<name>.json` atomically (a hidden
temporary file renamed into place; a 9p rename is a rename on the host), `wait_for(name)` polls
for the peer's file. The share is mounted without caching, so every poll asks the host. Names
starting with `_` are the runner's own: `_failed` (this site's scenario failed: a peer waiting on
it stops at once instead of timing out), `_net_up` and `_done` (barriers before and after the
scenario, so neither guest powers off while the other still uses it), and the host's
`_host/abort` (the other guest died).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from targetd_repl.lab.errors import ScenarioAssertion

if TYPE_CHECKING:
    import logging

SHARED_TAG = "shared"
SHARED_MOUNT = Path("/lab-shared")
HOST_DIR = "_host"  # written by the host only
ABORT = "abort"
FAILED = "_failed"
BUSYBOX = "/bin/busybox"  # busybox-static is a lab dependency; iproute2 may be missing
NINEP_MSIZE = 262144
_EVENT_NAME = re.compile(r"^_?[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


class PeerFailed(ScenarioAssertion):
    """The other site failed (or its guest died) while this one waited for it."""


@dataclass(frozen=True)
class SiteInfo:
    """This guest's place in a two-site run."""

    name: str
    address: str  # e.g. 10.77.0.1
    prefix: int  # e.g. 24
    mac: str
    peers: dict[str, str]  # site name -> address
    mtu: int = 1500

    @property
    def peer(self) -> str:
        """The other site's name (a run has exactly two sites)."""
        if len(self.peers) != 1:
            raise ScenarioAssertion(f"site {self.name} has {len(self.peers)} peers, not one")
        return next(iter(self.peers))

    @property
    def peer_address(self) -> str:
        return self.peers[self.peer]

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> SiteInfo | None:
        """The site the kernel command line describes, or None in a single-site guest."""
        env = dict(os.environ) if env is None else env
        name = env.get("lab_site")
        if not name:
            return None
        address, _, prefix = env.get("lab_addr", "").partition("/")
        peers: dict[str, str] = {}
        for item in filter(None, env.get("lab_peers", "").split(",")):
            peer, _, peer_address = item.partition(":")
            peers[peer] = peer_address
        if not address or not prefix.isdigit() or not peers:
            raise ScenarioAssertion(
                f"site {name}: lab_addr={env.get('lab_addr')!r} lab_peers="
                f"{env.get('lab_peers')!r} do not describe an address and a peer"
            )
        mtu = int(env.get("lab_mtu") or 1500)
        return cls(name, address, int(prefix), env.get("lab_mac", "").lower(), peers, mtu)


def _write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, sort_keys=True, default=str) + "\n")
    tmp.replace(path)


def _uptime() -> float:
    try:
        with open("/proc/uptime") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError):
        return time.monotonic()


class Rendezvous:
    """Events between the sites of one run, as files in a directory both can see."""

    def __init__(
        self,
        root: Path,
        me: str,
        peers: tuple[str, ...],
        *,
        log: logging.Logger | None = None,
        poll_s: float = 0.05,
    ) -> None:
        self.root = root
        self.me = me
        self.peers = peers
        self.log = log
        self.poll_s = poll_s
        (root / me).mkdir(parents=True, exist_ok=True)

    def _path(self, site: str, name: str) -> Path:
        if not _EVENT_NAME.fullmatch(name):
            raise ValueError(f"bad event name {name!r} (letters, digits, _ . -)")
        return self.root / site / f"{name}.json"

    def signal(self, name: str, data: Any = None) -> None:
        """Tell the peers `name` happened, with JSON-able `data`. Each event is signalled once."""
        path = self._path(self.me, name)
        if path.exists():
            raise ScenarioAssertion(f"site {self.me} signalled {name!r} twice")
        _write_json_atomic(path, {"site": self.me, "data": data, "uptime": _uptime()})
        if self.log:
            self.log.info("rendezvous: %s signalled %s", self.me, name)

    def _read(self, site: str, name: str) -> dict[str, Any] | None:
        try:
            text = self._path(site, name).read_text()
        except FileNotFoundError:
            return None
        try:
            payload: dict[str, Any] = json.loads(text)
        except ValueError:  # cannot happen with the atomic rename, but never crash on it
            return None
        return payload

    def failure(self, site: str | None = None) -> str | None:
        """Why `site` (default: any peer) failed or the host aborted the run, else None."""
        abort = self.root / HOST_DIR / f"{ABORT}.json"
        with contextlib.suppress(OSError, ValueError):
            return f"host aborted the run: {json.loads(abort.read_text()).get('reason')}"
        for peer in (site,) if site else self.peers:
            failed = self._read(peer, FAILED)
            if failed is not None:
                return f"site {peer} failed: {failed.get('data')}"
        return None

    def wait_for(self, name: str, timeout: float = 120.0, *, site: str | None = None) -> Any:
        """Wait until `site` (default: the only peer) signals `name`; return its data.

        Raises PeerFailed as soon as that site reports a failure or the host aborts the run,
        and ScenarioAssertion after `timeout` seconds."""
        if site is None:
            if len(self.peers) != 1:
                raise ValueError(f"wait_for({name!r}) needs site= with peers {self.peers}")
            site = self.peers[0]
        started = time.monotonic()
        while True:
            payload = self._read(site, name)
            if payload is not None:
                if self.log:
                    self.log.info(
                        "rendezvous: %s saw %s from %s after %.2f s",
                        self.me,
                        name,
                        site,
                        time.monotonic() - started,
                    )
                return payload.get("data")
            why = self.failure(site)
            if why is not None:
                raise PeerFailed(f"waiting for {name!r} from {site}: {why}")
            if time.monotonic() - started > timeout:
                raise ScenarioAssertion(f"site {site} did not signal {name!r} within {timeout} s")
            time.sleep(self.poll_s)

    def barrier(self, name: str, data: Any = None, timeout: float = 120.0) -> dict[str, Any]:
        """Signal `name` and wait for every peer to signal it too; returns their data by site."""
        self.signal(name, data)
        return {peer: self.wait_for(name, timeout, site=peer) for peer in self.peers}

    def fail(self, error: str) -> None:
        """Mark this site failed (once) so that peers waiting on it stop now."""
        path = self._path(self.me, FAILED)
        if not path.exists():
            with contextlib.suppress(OSError):
                _write_json_atomic(path, {"site": self.me, "data": error, "uptime": _uptime()})


def mount_shared(mountpoint: Path = SHARED_MOUNT) -> None:
    """Mount the run's shared 9p directory (no cache: each poll reaches the host)."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    with open("/proc/mounts") as f:
        if any(line.split()[1] == str(mountpoint) for line in f):
            return
    opts = f"trans=virtio,version=9p2000.L,msize={NINEP_MSIZE}"
    proc = subprocess.run(
        ["mount", "-t", "9p", "-o", opts, SHARED_TAG, str(mountpoint)],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    if proc.returncode != 0:
        raise ScenarioAssertion(f"cannot mount the shared 9p share: {proc.stderr.strip()}")


def _busybox(*args: str) -> str:
    proc = subprocess.run([BUSYBOX, *args], capture_output=True, text=True, check=False, timeout=30)
    if proc.returncode != 0:
        raise ScenarioAssertion(
            f"busybox {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}"
        )
    return proc.stdout


def find_interface(mac: str, timeout: float = 30.0) -> str:
    """The network interface with MAC `mac` (any non-loopback one if `mac` is empty)."""
    deadline = time.monotonic() + timeout
    seen: dict[str, str] = {}
    while time.monotonic() < deadline:
        seen = {}
        for path in sorted(Path("/sys/class/net").iterdir()):
            with contextlib.suppress(OSError):
                seen[path.name] = (path / "address").read_text().strip().lower()
        for name, address in seen.items():
            if name != "lo" and (not mac or address == mac):
                return name
        time.sleep(0.1)
    raise ScenarioAssertion(f"no network interface with MAC {mac!r} (have {seen})")


def configure_network(site: SiteInfo, timeout: float = 30.0) -> dict[str, Any]:
    """Bring `lo` and this site's NIC up with its static address; return what was set."""
    _busybox("ip", "link", "set", "lo", "up")
    iface = find_interface(site.mac, timeout)
    _busybox("ip", "link", "set", iface, "mtu", str(site.mtu))
    _busybox("ip", "addr", "add", f"{site.address}/{site.prefix}", "dev", iface)
    _busybox("ip", "link", "set", iface, "up")
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        state = Path(f"/sys/class/net/{iface}/operstate").read_text().strip()
        if state in ("up", "unknown"):
            break
        time.sleep(0.1)
    else:
        raise ScenarioAssertion(f"{iface} is {state!r}, not up, after {timeout} s")
    return {
        "interface": iface,
        "mac": site.mac,
        "address": f"{site.address}/{site.prefix}",
        "operstate": state,
        "mtu": int(Path(f"/sys/class/net/{iface}/mtu").read_text()),
        "addresses": _busybox("ip", "-o", "addr", "show", "dev", iface).strip(),
    }


def ping(address: str, attempts: int = 20) -> float:
    """Ping `address` until it answers (ARP included); return the round trip in ms."""
    last = ""
    for _ in range(attempts):
        proc = subprocess.run(
            [BUSYBOX, "ping", "-c", "1", "-W", "1", address],
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )
        if proc.returncode == 0:
            match = re.search(r"time=([0-9.]+) ms", proc.stdout)
            return float(match.group(1)) if match else -1.0
        last = (proc.stdout + proc.stderr).strip()
        time.sleep(0.2)
    raise ScenarioAssertion(f"{address} does not answer ping: {last[-500:]}")


def set_identity(site: SiteInfo) -> str:
    """A hostname and an iSCSI initiator name of the site's own (the host's root, which both
    guests share, holds one InitiatorName; two initiators with one name evict each other's
    sessions). Call before iscsid starts. Returns the initiator name."""
    _busybox("hostname", f"targetd-lab-{site.name}")
    iqn = f"iqn.2025-01.io.github.targetd-repl.lab:initiator-{site.name.lower()}"
    path = Path("/etc/iscsi/initiatorname.iscsi")  # the tmpfs overlay: the host is untouched
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"InitiatorName={iqn}\n")
    return iqn
