"""The two-site story in the real-kernel lab (issue 5): one guest per site, each running its own
controller (`targetd-repl serve` with `[export]`: its own LIO target, its TCMU rings served
in-process), replicating to the other over the private guest network with mutual TLS, and an
open-iscsi initiator on each site logged in to its own site's LUN.

`twosite_roles`, step by step (a is the first primary, b the first secondary):

1. both controllers start; a creates volume `web` and an async pair to b (initial copy);
2. a's initiator makes an ext4 file system on a's LUN and writes files; their checksums are
   taken; once b has acknowledged every record, site a dies: its controller is killed with -9;
3. b: `failover web` (unplanned); b's LUN turns writable with no target change; b's initiator
   finds a clean file system (fsck), the files identical, and writes more files;
4. a's controller returns: stale epoch, fenced — a write through a's LUN is refused with the
   write-protect sense; b runs `failback web`: only what differs moves, the pair is `paired`
   b -> a;
5. a: `switchover web` brings the primary role home; a's initiator finds every file of both
   sites; both sites read their whole LUN through iSCSI (O_DIRECT) and the hashes are equal.

Every step is timed; the host prints a summary (`summary()`), which is also `make demo`'s story.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from targetd_repl.lab import initiator
from targetd_repl.lab.child import cli_prefix
from targetd_repl.lab.data import read_direct, sha256_file
from targetd_repl.lab.errors import ScenarioAssertion
from targetd_repl.lab.registry import scenario
from targetd_repl.lab.scenarios_controller import Controller

if TYPE_CHECKING:
    from targetd_repl.lab.guest import GuestContext
    from targetd_repl.lab.sites import SiteInfo

MiB = 1 << 20
SITES = ("a", "b")
FIRST_PRIMARY = SITES[0]
GROUP = VOLUME = "web"
VOLUME_SIZE = 64 * MiB
REPLICATION_PORT = 7700
ISCSI_PORT = 3260
WORKDIR = Path("/var/lib/targetd-lab/roles")  # in the guest's tmpfs overlay
SHARED_CERTS = Path("/lab-shared/certs")
STEP_TIMEOUT_S = 600.0  # how long one half waits for the other's next step (TCG is slow)
CMD_TIME_OUT = 120  # LIO's wait for our data path: a controller restart under TCG fits


def _site_toml(site: SiteInfo, state: Path, sock: Path, certs: Path) -> str:
    return f"""[site]
name = "{site.name}"
state_dir = "{state}"
log_level = "info"

[control]
socket = "{sock}"

[replication]
listen = "{site.address}:{REPLICATION_PORT}"

[tls]
ca = "{certs / "ca.pem"}"
cert = "{certs / f"{site.name}.pem"}"
key = "{certs / f"{site.name}.key"}"

[peers.{site.peer}]
address = "{site.peer_address}:{REPLICATION_PORT}"

[export]
portals = ["{site.address}:{ISCSI_PORT}"]
demo_mode = true
cmd_time_out = {CMD_TIME_OUT}
"""


class Site:
    """This guest's half: its controller, its CLI, its initiator and its LUN."""

    def __init__(self, ctx: GuestContext) -> None:
        if ctx.site is None:
            raise ScenarioAssertion("twosite_roles runs only under run_pair_scenario")
        self.ctx = ctx
        self.info = ctx.site
        self.name = ctx.site.name
        self.portal = f"{ctx.site.address}:{ISCSI_PORT}"
        self.state = WORKDIR / "state"
        self.sock = WORKDIR / "run" / "control.sock"
        self.certs = WORKDIR / "certs"
        self.config = WORKDIR / "site.toml"
        self.cli = cli_prefix()
        self.controller: Controller | None = None
        self.device: str | None = None
        self.mount = WORKDIR / "mnt"
        self.steps: dict[str, float] = {}

    # -- the controller and its CLI ------------------------------------------------------------

    def setup(self) -> None:
        WORKDIR.mkdir(parents=True, exist_ok=True)
        self.mount.mkdir(exist_ok=True)
        if self.name == FIRST_PRIMARY:  # one CA for both sites, handed over on the shared 9p
            sites = ",".join(SITES)
            self.ctx.run(
                [*self.cli, "certs", "--out", str(SHARED_CERTS), "--sites", sites], timeout=180
            )
            self.ctx.signal("certs")
        else:
            self.ctx.wait_for("certs", STEP_TIMEOUT_S)
        self.certs.mkdir(exist_ok=True)
        for name in ("ca.pem", f"{self.name}.pem", f"{self.name}.key"):
            shutil.copyfile(SHARED_CERTS / name, self.certs / name)
            os.chmod(self.certs / name, 0o600)
        self.config.write_text(_site_toml(self.info, self.state, self.sock, self.certs))
        self.controller = Controller(self.ctx, self.config, self.state)
        self.ctx.cleanups.callback(self.controller.cleanup)
        self.ctx.cleanups.callback(self.teardown_lio)

    def teardown_lio(self) -> None:
        from targetd_repl import lio  # noqa: PLC0415 - rtslib: guest only

        with contextlib.suppress(Exception):
            lio.reconcile(lio.LioConfig(site=self.name, portals=()))
            lio.remove_target(self.name)

    def start(self) -> float:
        assert self.controller is not None
        return self.controller.start()

    def cli_json(self, *args: str, timeout: float = 300, check: bool = True) -> Any:
        proc = self.ctx.run(
            [*self.cli, *args, "--socket", str(self.sock), "--json"], timeout=timeout, check=check
        )
        if proc.returncode != 0:
            return {"exit": proc.returncode, "error": proc.stderr.strip()}
        return json.loads(proc.stdout) if proc.stdout.strip() else None

    def pair_status(self) -> dict[str, Any]:
        status = self.cli_json("pair", "status", GROUP)
        pair: dict[str, Any] = status[0] if isinstance(status, list) else status
        return pair

    def wait_pair(self, until: str = "paired") -> dict[str, Any]:
        wait = str(int(STEP_TIMEOUT_S))
        status = self.cli_json(
            "pair", "status", GROUP, "--until", until, "--wait-timeout", wait,
            timeout=STEP_TIMEOUT_S + 60,
        )  # fmt: skip
        pair: dict[str, Any] = status[0] if isinstance(status, list) else status
        return pair

    def wait_role(self, role: str) -> dict[str, Any]:
        """Wait until this site's end of the pair has `role` (a returning site is demoted once
        it meets the peer: its LUN refuses writes from then on)."""
        deadline = time.monotonic() + STEP_TIMEOUT_S
        while True:
            pair = self.pair_status()
            if pair.get("role") == role:
                return pair
            if time.monotonic() > deadline:
                raise ScenarioAssertion(
                    f"{self.name} is not {role} after {STEP_TIMEOUT_S} s: {pair}"
                )
            time.sleep(0.5)

    def wait_applied(self, seq: int) -> dict[str, Any]:
        """Wait until this secondary has applied every record up to `seq`."""
        deadline = time.monotonic() + STEP_TIMEOUT_S
        while True:
            pair = self.pair_status()
            if pair.get("applied_seq", 0) >= seq:
                return pair
            if time.monotonic() > deadline:
                raise ScenarioAssertion(f"{self.name} has not applied seq {seq}: {pair}")
            time.sleep(0.5)

    def wait_drained(self) -> dict[str, Any]:
        """Wait until the peer has acknowledged every record this primary journaled."""
        deadline = time.monotonic() + STEP_TIMEOUT_S
        while True:
            pair = self.pair_status()
            if pair["state"] == "paired" and pair["acked_seq"] >= pair["last_seq"]:
                return pair
            if time.monotonic() > deadline:
                raise ScenarioAssertion(f"the peer did not catch up: {pair}")
            time.sleep(0.5)

    # -- the initiator ---------------------------------------------------------------------------

    @property
    def iqn(self) -> str:
        from targetd_repl import lio  # noqa: PLC0415

        return lio.site_iqn(self.name)

    def login(self) -> str:
        offered = initiator.discover(self.ctx, self.portal)
        self.ctx.check(self.iqn in offered, f"{self.portal} offers {self.iqn} ({offered})")
        initiator.login(self.ctx, self.iqn, self.portal)
        self.device = initiator.disk_for(self.ctx, self.iqn, lun=0)
        size = initiator.block_size_bytes(self.device)
        self.ctx.check(size == VOLUME_SIZE, f"{self.device} is {size} bytes")
        return self.device

    def logout(self) -> None:
        initiator.logout(self.ctx, self.iqn, self.portal)
        self.device = None

    def mount_fs(self) -> None:
        assert self.device is not None
        self.ctx.run(["mount", "-t", "ext4", self.device, str(self.mount)], timeout=120)

    def umount_fs(self) -> None:
        self.ctx.run(["umount", str(self.mount)], timeout=180)

    def write_files(self, prefix: str, count: int, size: int) -> dict[str, str]:
        written = {}
        for i in range(count):
            path = self.mount / f"{prefix}-{i}.bin"
            path.write_bytes(os.urandom(size))
            written[path.name] = sha256_file(path)
        self.ctx.run(["sync", "-f", str(self.mount)], timeout=180)
        return written

    def read_files(self) -> dict[str, str]:
        # Drop the page cache: the bytes must come from the LUN, not from memory.
        Path("/proc/sys/vm/drop_caches").write_text("3")
        return {p.name: sha256_file(p) for p in sorted(self.mount.glob("*.bin"))}

    def fsck(self) -> int:
        assert self.device is not None
        return self.ctx.run(
            ["fsck.ext4", "-n", "-f", self.device], timeout=300, check=False
        ).returncode

    def device_sha256(self) -> str:
        assert self.device is not None
        digest = hashlib.sha256()
        for offset in range(0, VOLUME_SIZE, 4 * MiB):
            digest.update(read_direct(self.device, offset, 4 * MiB))
        return digest.hexdigest()

    def write_refused(self) -> dict[str, Any]:
        """A direct write through this site's LUN: does the kernel see it refused?"""
        assert self.device is not None
        proc = self.ctx.run(
            ["dd", "if=/dev/urandom", f"of={self.device}", "bs=4k", "count=1", "seek=100",
             "oflag=direct", "conv=notrunc", "status=none"],
            timeout=120, check=False,
        )  # fmt: skip
        return {"dd_exit": proc.returncode, "error": proc.stderr.strip()[-300:]}

    def timed(self, step: str) -> contextlib.AbstractContextManager[None]:
        return _StepTimer(self.steps, step, self.ctx)


class _StepTimer(contextlib.AbstractContextManager[None]):
    def __init__(self, steps: dict[str, float], name: str, ctx: GuestContext) -> None:
        self.steps, self.name, self.ctx = steps, name, ctx

    def __enter__(self) -> None:
        self.started = time.monotonic()
        self.ctx.log.info("=== step %s", self.name)

    def __exit__(self, *exc: object) -> None:
        self.steps[self.name] = round(time.monotonic() - self.started, 3)


def _primary_first(site: Site) -> dict[str, Any]:
    """Site a: first primary, dies, returns fenced, takes the role back by switchover."""
    ctx, out = site.ctx, dict[str, Any]()
    with site.timed("a_controller_start"):
        site.start()
    ctx.barrier("serving", timeout=STEP_TIMEOUT_S)
    with site.timed("a_volume_and_pair"):
        site.cli_json("volume", "create", VOLUME, "--size", str(VOLUME_SIZE))
        site.cli_json("pair", "create", GROUP, "--peer", "b", "--mode", "async")
        out["initial_copy"] = site.wait_pair()
    with site.timed("a_mkfs_and_files"):
        site.login()
        ctx.run(["mkfs.ext4", "-q", "-F", "-E", "nodiscard", str(site.device)], timeout=300)
        site.mount_fs()
        files_a = site.write_files("site-a", 4, 2 * MiB)
        site.umount_fs()
        site.logout()
    with site.timed("a_drain_before_failure"):
        out["before_failure"] = site.wait_drained()
    with site.timed("a_site_failure"):
        assert site.controller is not None
        site.controller.kill9()
    ctx.signal("a_down", {"files": files_a})

    after_failover = ctx.wait_for("b_wrote", STEP_TIMEOUT_S)
    with site.timed("a_returns_fenced"):
        site.start()
        out["fenced_pair"] = site.wait_role("secondary")
        site.login()
        out["fenced_write"] = site.write_refused()
        site.logout()
    ctx.check(
        out["fenced_write"]["dd_exit"] != 0,
        f"the returning a refuses writes: {out['fenced_write']}",
    )
    ctx.signal("a_back")

    ctx.wait_for("failed_back", STEP_TIMEOUT_S)
    with site.timed("a_switchover"):
        out["switchover"] = site.cli_json("switchover", GROUP, timeout=STEP_TIMEOUT_S)
        out["after_switchover"] = site.wait_pair()
    with site.timed("a_verify_files"):
        site.login()
        out["fsck_exit"] = site.fsck()
        site.mount_fs()
        found = site.read_files()
        site.umount_fs()
    wanted = {**files_a, **after_failover["files"]}
    ctx.check(
        out["fsck_exit"] == 0, f"a's file system is clean after switchover ({out['fsck_exit']})"
    )
    ctx.check(found == wanted, f"a holds every file of both sites ({len(found)} of {len(wanted)})")
    with site.timed("a_drain_after_switchover"):
        out["drained"] = site.wait_drained()
        out["device_sha256"] = site.device_sha256()
        site.logout()
    ctx.signal("drained", out["drained"]["last_seq"])
    peer_sha = ctx.barrier("image_hash", out["device_sha256"], timeout=STEP_TIMEOUT_S * 2)
    ctx.check(peer_sha == out["device_sha256"], f"both sites' LUNs are equal ({peer_sha})")
    out.update(files=found, images_equal=True, steps=site.steps)
    return out


def _secondary_first(site: Site) -> dict[str, Any]:
    """Site b: first secondary, fails over, writes, runs the failback, ends secondary."""
    ctx, out = site.ctx, dict[str, Any]()
    with site.timed("b_controller_start"):
        site.start()
    ctx.barrier("serving", timeout=STEP_TIMEOUT_S)

    down = ctx.wait_for("a_down", STEP_TIMEOUT_S * 2)
    with site.timed("b_failover"):
        out["failover"] = site.cli_json("failover", GROUP, timeout=STEP_TIMEOUT_S)
    with site.timed("b_verify_and_write"):
        site.login()
        out["fsck_exit"] = site.fsck()
        ctx.check(out["fsck_exit"] == 0, f"b finds a clean file system ({out['fsck_exit']})")
        site.mount_fs()
        found = site.read_files()
        ctx.check(found == down["files"], f"b holds a's files: {sorted(found)}")
        files_b = site.write_files("site-b", 2, 2 * MiB)
        site.umount_fs()
        site.logout()
    ctx.signal("b_wrote", {"files": files_b})

    ctx.wait_for("a_back", STEP_TIMEOUT_S)
    with site.timed("b_failback"):
        out["failback"] = site.cli_json("failback", GROUP, timeout=STEP_TIMEOUT_S)
        out["after_failback"] = site.wait_pair()
    ctx.signal("failed_back")

    with site.timed("b_wait_switchover"):
        last_seq = ctx.wait_for("drained", STEP_TIMEOUT_S * 2)
    with site.timed("b_image_hash"):
        out["pair_at_end"] = site.wait_applied(last_seq)
        site.login()
        out["secondary_write"] = site.write_refused()
        out["device_sha256"] = site.device_sha256()
        site.logout()
    peer_sha = ctx.barrier("image_hash", out["device_sha256"], timeout=STEP_TIMEOUT_S)
    ctx.check(peer_sha == out["device_sha256"], f"both sites' LUNs are equal ({peer_sha})")
    ctx.check(out["secondary_write"]["dd_exit"] != 0, "b, secondary again, refuses writes")
    out.update(files_written=files_b, steps=site.steps)
    return out


@scenario("twosite_roles", needs=("iscsid",), timeout_s=2400, sites=SITES)
def twosite_roles(ctx: GuestContext) -> dict[str, Any]:
    """Two sites, one controller and one initiator each: ext4 on a, a dies, failover to b, b
    writes, a returns fenced, failback, switchover home, files and whole images equal."""
    site = Site(ctx)
    with site.timed(f"{site.name}_setup"):
        site.setup()
    if site.name == FIRST_PRIMARY:
        return _primary_first(site)
    return _secondary_first(site)


def summary(sites: dict[str, dict[str, Any]]) -> list[str]:
    """The human story of a `twosite_roles` run from both halves' data (for `make demo`)."""
    a, b = sites["a"], sites["b"]
    failover = b.get("failover") or {}
    failback = b.get("failback") or {}
    switchover = a.get("switchover") or {}

    def took(step: dict[str, Any], site: dict[str, Any], name: str) -> str:
        # the command's own time, then the step's wall time under TCG (CLI start-up, waits)
        return f"{step.get('elapsed_seconds', 0):.1f} s ({site['steps'].get(name, 0):.0f} s step)"

    lines = [
        f"initial copy a -> b: {a['steps'].get('a_volume_and_pair', 0):.1f} s",
        f"ext4 + {len(a['files']) - len(b['files_written'])} files on a through open-iscsi: "
        f"{a['steps'].get('a_mkfs_and_files', 0):.1f} s",
        f"site a killed (-9); failover on b: {took(failover, b, 'b_failover')}, "
        f"writable after {failover.get('promoted_seconds', 0):.3f} s",
        f"b: fsck clean, a's files intact, {len(b['files_written'])} files written",
        f"a returns fenced: write refused (dd exit {a['fenced_write']['dd_exit']})",
        f"failback b -> a: {took(failback, b, 'b_failback')}, "
        f"{failback.get('total_bytes', 0) / MiB:.1f} MiB moved (volume {VOLUME_SIZE // MiB} MiB)",
        f"switchover home to a: {took(switchover, a, 'a_switchover')}",
        f"images equal: {a['images_equal']} ({a['device_sha256'][:16]}...)",
    ]
    return lines
