"""open-iscsi as a lab initiator (guest side): iscsid, discovery, login, the /dev/sdX of a LUN,
logout. Every command goes through `GuestContext.run`, so it lands in the scenario log.
"""

from __future__ import annotations

import contextlib
import glob
import os
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

from targetd_repl.lab.errors import ScenarioAssertion

if TYPE_CHECKING:
    from targetd_repl.lab.guest import GuestContext

ISCSID_NOT_CONNECTED = 20  # iscsiadm: ISCSI_ERR_ISCSID_NOTCONN
ISCSI_NO_OBJECTS = 21  # iscsiadm: ISCSI_ERR_NO_OBJS_FOUND (iscsid up, no session)
ISCSI_LOGIN_FAILED_NO_RETRY = 19  # ISCSI_ERR_FATAL_LOGIN (e.g. the target failed mutual CHAP)
ISCSI_LOGIN_AUTH_FAILED = 24  # ISCSI_ERR_LOGIN_AUTH_FAILED (the target refused our CHAP)

# Short timeouts: a lab must fail in seconds, not in minutes of retries.
FAST_NODE_SETTINGS = {
    "node.session.timeo.replacement_timeout": "15",
    "node.conn[0].timeo.login_timeout": "10",
    "node.conn[0].timeo.logout_timeout": "10",
    "node.session.initial_login_retry_max": "2",
}


def start_iscsid(ctx: GuestContext, timeout: float = 30) -> None:
    """Start iscsid in the foreground as our child (stopped by PID at cleanup); wait for it."""
    logfile = (ctx.out / "iscsid.log").open("w")
    proc = subprocess.Popen(
        ["iscsid", "-f"],
        stdout=logfile,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,  # iscsid signals its whole process group when it stops
    )
    ctx.log.info("iscsid started, pid %d", proc.pid)

    def stop() -> None:
        with contextlib.suppress(Exception):
            ctx.run(["iscsiadm", "-m", "node", "--logoutall=all"], check=False, timeout=60)
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        logfile.close()
        ctx.log.info("iscsid stopped")

    ctx.cleanups.callback(stop)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ScenarioAssertion(f"iscsid exited with {proc.returncode} (see iscsid.log)")
        probe = ctx.run(["iscsiadm", "-m", "session"], check=False, timeout=30)
        if probe.returncode in (0, ISCSI_NO_OBJECTS):
            return
        time.sleep(0.2)
    raise ScenarioAssertion(f"iscsid did not answer within {timeout} s")


def discover(ctx: GuestContext, portal: str) -> list[str]:
    """SendTargets discovery: the target IQNs offered at `portal` (ip:port)."""
    out = ctx.run(["iscsiadm", "-m", "discovery", "-t", "st", "-p", portal], timeout=60).stdout
    targets = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0].startswith(portal.split(":", maxsplit=1)[0]):
            targets.append(parts[1])
    return targets


def _node(target: str, portal: str) -> list[str]:
    return ["iscsiadm", "-m", "node", "-T", target, "-p", portal]


def set_node(ctx: GuestContext, target: str, portal: str, settings: dict[str, str]) -> None:
    for name, value in settings.items():
        ctx.run([*_node(target, portal), "-o", "update", "-n", name, "-v", value])


def login(
    ctx: GuestContext,
    target: str,
    portal: str,
    *,
    chap: tuple[str, str] | None = None,
    settings: dict[str, str] | None = None,
) -> None:
    """Log in to a discovered target (node record exists after `discover`)."""
    wanted = dict(FAST_NODE_SETTINGS)
    if chap is not None:
        wanted.update(
            {
                "node.session.auth.authmethod": "CHAP",
                "node.session.auth.username": chap[0],
                "node.session.auth.password": chap[1],
            }
        )
    wanted.update(settings or {})
    set_node(ctx, target, portal, wanted)
    ctx.run([*_node(target, portal), "--login"], timeout=90)


def login_lun(ctx: GuestContext, target: str, portal: str, lun: int = 0) -> str:
    """Discover `portal` (checked: it offers `target`), log in, and wait for the disk of `lun`;
    returns its /dev/sdX."""
    offered = discover(ctx, portal)
    ctx.check(target in offered, f"discovery offers {target} (got {offered})")
    login(ctx, target, portal)
    return disk_for(ctx, target, lun=lun)


def logout(ctx: GuestContext, target: str, portal: str) -> None:
    ctx.run([*_node(target, portal), "--logout"], timeout=90)
    ctx.run([*_node(target, portal), "-o", "delete"], check=False)


def session_dir(target: str) -> Path | None:
    """The /sys/class/iscsi_session/sessionN of our session to `target`, if logged in."""
    for path in sorted(Path("/sys/class/iscsi_session").glob("session*")):
        with contextlib.suppress(OSError):
            if (path / "targetname").read_text().strip() == target:
                return path
    return None


def disk_for(ctx: GuestContext, target: str, lun: int = 0, timeout: float = 60) -> str:
    """Wait for the SCSI disk of `lun` behind our session to `target`; returns /dev/sdX."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        session = session_dir(target)
        if session is not None:
            pattern = f"{session}/device/target*/*:*:*:{lun}/block/*"
            for block in sorted(glob.glob(pattern)):
                device = f"/dev/{os.path.basename(block)}"
                if os.path.exists(device):
                    ctx.log.info("LUN %d of %s is %s", lun, target, device)
                    return device
        time.sleep(0.2)
    raise ScenarioAssertion(f"no disk for LUN {lun} of {target} after {timeout} s")


def block_size_bytes(device: str) -> int:
    """The size of a block device (from sysfs, in bytes)."""
    name = os.path.basename(device)
    return int(Path(f"/sys/block/{name}/size").read_text()) * 512
