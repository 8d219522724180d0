"""Lab scenarios for the controller that owns the site's LIO export (issue 3): `targetd-repl
serve` with `[export]` reconciles LIO with its metadata at start and serves every volume's
TCMU ring in-process; volumes come from the CLI over the control socket.

- `controller_export`: a site.toml with `[export]` (demo mode, portal 127.0.0.1:3260); the
  controller starts; `targetd-repl volume create` makes a LUN appear; open-iscsi logs in; data
  written with `dd oflag=direct` reads back identical through `targetd-repl io read` and through
  the device (O_DIRECT). Then the controller is killed with -9 right after an acknowledged
  write, the volume's LUN is removed from configfs behind its back (`lio.remove_lun`: drift),
  and the controller restarts: its reconcile restores the LUN, and after a re-login both the
  first data and the last acknowledged write read back identical. Then SIGTERM while `dd`
  writes 16 MiB: exit 0; the commands left in the ring are served after the next start, dd exits
  0 and the data is whole. Then `volume resize` (logged out): LUN 0 again, the new size, the data
  kept. Last, SIGTERM: exit 0.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from targetd_repl.lab import initiator
from targetd_repl.lab.child import ChildProcess, cli_prefix
from targetd_repl.lab.data import read_direct, sha256, writes_done
from targetd_repl.lab.errors import ScenarioAssertion
from targetd_repl.lab.registry import scenario

if TYPE_CHECKING:
    from targetd_repl.lab.guest import GuestContext

MiB = 1 << 20
SITE = "lab"
PORTAL = "127.0.0.1:3260"
WORKDIR = Path("/var/lib/targetd-lab/controller")  # in the guest's tmpfs overlay
# Seconds LIO waits for the data path: a controller restart under TCG (imports of grpc, the
# engine, rtslib) must fit well inside it.
CMD_TIME_OUT = 120
START_TIMEOUT = 180.0


def _site_toml(state: Path, socket: Path, certs: Path) -> str:
    return f"""[site]
name = "{SITE}"
state_dir = "{state}"
log_level = "info"

[control]
socket = "{socket}"

[replication]
listen = "127.0.0.1:0"

[tls]
ca = "{certs / "ca.pem"}"
cert = "{certs / f"{SITE}.pem"}"
key = "{certs / f"{SITE}.key"}"

[export]
portals = ["{PORTAL}"]
demo_mode = true
cmd_time_out = {CMD_TIME_OUT}
"""


class Controller(ChildProcess):
    """`targetd-repl serve --config site.toml` as our child, logging to controller.log in the
    results. Started, killed and stopped by its PID only."""

    def __init__(self, ctx: GuestContext, config: Path, state: Path) -> None:
        super().__init__(
            ctx,
            "controller",
            [*cli_prefix(), "serve", "--config", str(config)],
            env={"PYTHONUNBUFFERED": "1"},
            cleanup_timeout=60,
        )
        self.endpoints = state / "endpoints.json"

    def start(self) -> float:
        """Start and wait until it serves (endpoints.json names its pid); returns seconds."""
        started = time.monotonic()
        proc = self.spawn()
        deadline = started + START_TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise ScenarioAssertion(
                    f"the controller exited with {proc.returncode} while starting:\n"
                    f"{self.log_tail()}"
                )
            with contextlib.suppress(OSError, ValueError):
                if json.loads(self.endpoints.read_text()).get("pid") == proc.pid:
                    return round(time.monotonic() - started, 3)
            time.sleep(0.1)
        raise ScenarioAssertion(f"the controller did not serve within {START_TIMEOUT} s")

    def terminate(self, timeout: float = 120) -> int:
        """SIGTERM; returns the exit status."""
        return self.sigterm_and_wait(timeout, f"the controller ignored SIGTERM for {timeout} s")


def _lun_of(volume: str) -> dict[int, str]:
    """The LUNs of the site's target that export `volume`'s user backstore (configfs now)."""
    from targetd_repl import lio  # noqa: PLC0415 - rtslib: guest only

    target = lio.read_state().targets.get(lio.site_iqn(SITE))
    if target is None:
        return {}
    return {
        number: f"{lun.plugin}/{lun.storage_object}"
        for number, lun in target.luns.items()
        if lun.storage_object == volume
    }


def _teardown_lio() -> None:
    from targetd_repl import lio  # noqa: PLC0415

    with contextlib.suppress(Exception):
        lio.reconcile(lio.LioConfig(site=SITE, portals=(lio.Portal("127.0.0.1", 3260),)))
        lio.remove_target(SITE)


@scenario("controller_export", needs=("iscsid",), timeout_s=900)
def controller_export(ctx: GuestContext) -> dict[str, Any]:
    """The controller owns LIO: CLI volume -> LUN; data identical via iSCSI and io read; kill -9
    + a LUN removed behind its back: the restart restores it and the data; SIGTERM under I/O
    exits 0 and the I/O completes after the next start; resize re-exports; SIGTERM exits 0."""
    from targetd_repl import lio  # noqa: PLC0415

    volume, size = "vol1", 64 * MiB
    WORKDIR.mkdir(parents=True, exist_ok=True)
    state, certs = WORKDIR / "state", WORKDIR / "certs"
    socket = WORKDIR / "run" / "control.sock"
    config = WORKDIR / "site.toml"
    cli = cli_prefix()
    site = ["--socket", str(socket)]
    ctx.run([*cli, "certs", "--out", str(certs), "--sites", SITE], timeout=180)
    config.write_text(_site_toml(state, socket, certs))
    ctx.cleanups.callback(_teardown_lio)
    controller = Controller(ctx, config, state)
    ctx.cleanups.callback(controller.cleanup)

    with ctx.timed("controller_start"):
        first_start_s = controller.start()
    with ctx.timed("volume_create"):
        created = ctx.run([*cli, "volume", "create", volume, "--size", "64M", *site, "--json"])
    lun_after_create = _lun_of(volume)
    ctx.check(
        lun_after_create == {0: f"user/{volume}"}, f"LUN 0 exports {volume} ({lun_after_create})"
    )
    iqn = lio.site_iqn(SITE)
    with ctx.timed("iscsi_login"):
        device = initiator.login_lun(ctx, iqn, PORTAL)
    device_size = initiator.block_size_bytes(device)
    ctx.check(device_size == size, f"{device} has the volume's size ({device_size})")

    rng = random.Random(20261122)
    first = rng.randbytes(4 * MiB)  # at 1 MiB
    last = rng.randbytes(MiB)  # at 8 MiB, the acknowledged write right before the kill
    (WORKDIR / "first.bin").write_bytes(first)
    (WORKDIR / "last.bin").write_bytes(last)

    def dd(source: str, seek_mib: int) -> None:
        ctx.run(
            ["dd", f"if={WORKDIR / source}", f"of={device}", "bs=1M", f"seek={seek_mib}",
             "oflag=direct", "conv=notrunc", "status=none"],
            timeout=300,
        )  # fmt: skip

    def io_read(offset: int, length: int, name: str) -> bytes:
        out = WORKDIR / name
        ctx.run(
            [*cli, "io", "read", volume, "--offset", str(offset), "--length", str(length),
             "--out", str(out), *site],
            timeout=120,
        )  # fmt: skip
        return out.read_bytes()

    with ctx.timed("dd_first"):
        dd("first.bin", 1)
    io_first = io_read(MiB, len(first), "io-first.bin")
    device_first = read_direct(device, MiB, len(first))
    ctx.check(sha256(io_first) == sha256(first), "io read returns what dd wrote")
    ctx.check(sha256(device_first) == sha256(first), "the device reads back what dd wrote")

    with ctx.timed("dd_last"):
        dd("last.bin", 8)  # dd returned: every O_DIRECT write was acknowledged
    controller.kill9()
    initiator.logout(ctx, iqn, PORTAL)
    with ctx.timed("drift"):
        removed = lio.remove_lun(SITE, lio.BackstoreKind.USER, volume)
    lun_after_drift = _lun_of(volume)
    ctx.check(removed and lun_after_drift == {}, f"the LUN is gone from configfs ({removed})")

    with ctx.timed("controller_restart"):
        restart_s = controller.start()
    restart_log = controller.output()
    lun_after_restart = _lun_of(volume)
    ctx.check(
        lun_after_restart == {0: f"user/{volume}"},
        f"the restart restored LUN 0 for {volume} ({lun_after_restart})",
    )
    with ctx.timed("iscsi_relogin"):
        initiator.discover(ctx, PORTAL)  # logout deleted the node record
        initiator.login(ctx, iqn, PORTAL)
        device = initiator.disk_for(ctx, iqn, lun=0)
    device_first_after = read_direct(device, MiB, len(first))
    device_last_after = read_direct(device, 8 * MiB, len(last))
    io_last_after = io_read(8 * MiB, len(last), "io-last.bin")
    ctx.check(sha256(device_first_after) == sha256(first), "the first data reads back identical")
    ctx.check(
        sha256(device_last_after) == sha256(last),
        "the write acknowledged right before kill -9 is on the device",
    )
    ctx.check(sha256(io_last_after) == sha256(last), "... and io read returns it too")
    listed = json.loads(ctx.run([*cli, "volume", "list", *site, "--json"]).stdout)

    # SIGTERM under I/O: in-flight commands finish, the rest wait in the ring for the next start.
    # The SCSI disk's command timeout must outlast a restart (default 30 s).
    Path(f"/sys/block/{os.path.basename(device)}/device/timeout").write_text("180")
    third = rng.randbytes(16 * MiB)  # at 16 MiB
    (WORKDIR / "third.bin").write_bytes(third)
    writer = subprocess.Popen(
        ["dd", f"if={WORKDIR / 'third.bin'}", f"of={device}", "bs=256K", "seek=64",
         "oflag=direct", "conv=notrunc", "status=none"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip

    def stop_writer() -> None:
        if writer.poll() is None:
            writer.kill()  # by PID
            writer.wait(timeout=30)

    ctx.cleanups.callback(stop_writer)
    base = writes_done(device)
    deadline = time.monotonic() + 120
    while writes_done(device) < base + 8 and writer.poll() is None:
        if time.monotonic() > deadline:
            raise ScenarioAssertion("dd made no progress in 120 s")
        time.sleep(0.05)
    writes_before_sigterm = writes_done(device) - base
    with ctx.timed("controller_sigterm_under_io"):
        sigterm_under_io_rc = controller.terminate()
    sigterm_under_io_log = controller.output()
    dd_running_at_stop = writer.poll() is None
    ctx.check(sigterm_under_io_rc == 0, f"SIGTERM under I/O: exit {sigterm_under_io_rc}")
    with ctx.timed("controller_start_after_sigterm"):
        controller.start()
    try:
        _, dd_err = writer.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        raise ScenarioAssertion("dd did not finish within 300 s of the restart") from None
    ctx.check(writer.returncode == 0, f"dd across SIGTERM + start exits 0 ({dd_err!r})")
    device_third = read_direct(device, 16 * MiB, len(third))
    io_third_tail = io_read(28 * MiB, 4 * MiB, "io-third-tail.bin")
    ctx.check(sha256(device_third) == sha256(third), "the write across SIGTERM is whole")
    ctx.check(sha256(io_third_tail) == sha256(third[12 * MiB :]), "... and io read agrees")

    # Resize re-exports the LUN under the same number, at the new size, data kept.
    initiator.logout(ctx, iqn, PORTAL)
    with ctx.timed("volume_resize"):
        ctx.run([*cli, "volume", "resize", volume, "--size", "96M", *site], timeout=300)
    lun_after_resize = _lun_of(volume)
    with ctx.timed("iscsi_login_after_resize"):
        initiator.discover(ctx, PORTAL)
        initiator.login(ctx, iqn, PORTAL)
        device = initiator.disk_for(ctx, iqn, lun=0)
    device_size_after_resize = initiator.block_size_bytes(device)
    device_first_after_resize = read_direct(device, MiB, len(first))
    ctx.check(lun_after_resize == {0: f"user/{volume}"}, f"resize kept LUN 0 ({lun_after_resize})")
    ctx.check(device_size_after_resize == 96 * MiB, f"resized: {device_size_after_resize} bytes")
    ctx.check(sha256(device_first_after_resize) == sha256(first), "resize kept the data")

    initiator.logout(ctx, iqn, PORTAL)
    with ctx.timed("controller_sigterm"):
        sigterm_rc = controller.terminate()
    stop_log = controller.output()
    ctx.check(sigterm_rc == 0, f"SIGTERM: the controller exited {sigterm_rc}")
    return {
        "device": device,
        "device_size": device_size,
        "volume_created": json.loads(created.stdout),
        "volumes_after_restart": listed,
        "lun_after_create": lun_after_create,
        "lun_after_drift": lun_after_drift,
        "lun_removed_by_drift": removed,
        "lun_after_restart": lun_after_restart,
        "first_sha256": sha256(first),
        "io_read_first_sha256": sha256(io_first),
        "device_first_sha256": sha256(device_first),
        "device_first_after_restart_sha256": sha256(device_first_after),
        "last_sha256": sha256(last),
        "device_last_after_restart_sha256": sha256(device_last_after),
        "io_read_last_after_restart_sha256": sha256(io_last_after),
        "first_start_s": first_start_s,
        "restart_s": restart_s,
        "restart_repaired": [
            line.split("LIO: ", 1)[1]
            for line in restart_log.splitlines()
            if " LIO: " in line and "export" in line
        ],
        "restart_log_tail": restart_log[-3000:],
        "third_sha256": sha256(third),
        "writes_before_sigterm": writes_before_sigterm,
        "dd_running_at_sigterm": dd_running_at_stop,
        "sigterm_under_io_exit": sigterm_under_io_rc,
        "sigterm_under_io_log_tail": sigterm_under_io_log[-1500:],
        "dd_across_sigterm_exit": writer.returncode,
        "device_third_sha256": sha256(device_third),
        "io_read_third_tail_sha256": sha256(io_third_tail),
        "third_tail_sha256": sha256(third[12 * MiB :]),
        "lun_after_resize": lun_after_resize,
        "device_size_after_resize": device_size_after_resize,
        "device_first_after_resize_sha256": sha256(device_first_after_resize),
        "sigterm_exit": sigterm_rc,
        "sigterm_log_tail": stop_log[-1500:],
        "controller_starts": controller.starts,
    }
