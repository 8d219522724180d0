"""Guest side of the lab: `python -m targetd_repl.lab.guest SCENARIO --out DIR`.

Stage 2 of the guest init runs this with the project's venv. It starts what the scenario needs
(iscsid), runs the scenario function with a `GuestContext`, and always writes, under DIR (the
read-write 9p share the host reads back):

    result.json    {"scenario", "ok", "error", "traceback", "data", "timings", "kernel"}
    scenario.log   the scenario's log (commands run, their output, assertions)
    dmesg.txt      the guest kernel log (the console gets only emergencies: `dmesg -n 1`)

The exit status is 0 when the scenario passed.

In a two-site run (kernel parameter `lab_site`, see `sites`) the runner also mounts the shared
rendezvous directory, gives the guest its own hostname and initiator name, brings its NIC up
with its static address, meets the peer (`_net_up` barrier, then a ping), runs the scenario with
`ctx.site` set, and meets the peer again (`_done`) before the cleanups, so that neither guest
tears down what the other still uses. A failure is signalled to the peer (`_failed`) at once.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from targetd_repl.lab import initiator
from targetd_repl.lab.errors import ScenarioAssertion
from targetd_repl.lab.prepare import MODULES_DONE
from targetd_repl.lab.registry import load_all
from targetd_repl.lab.sites import (
    SHARED_MOUNT,
    PeerFailed,
    Rendezvous,
    SiteInfo,
    configure_network,
    mount_shared,
    ping,
    set_identity,
)

log = logging.getLogger("targetd_repl.lab.guest")


def param(name: str) -> str | None:
    """A `lab_<name>=value` from the kernel command line (`run_scenario(params=...)`)."""
    return os.environ.get(f"lab_{name}")


def uptime_s() -> float:
    with open("/proc/uptime") as f:
        return float(f.read().split()[0])


@dataclass
class GuestContext:
    """What a scenario gets: a results directory, a logger, timers and a cleanup stack; in a
    two-site run also `site` (its name, address, peer) and the rendezvous with the peer."""

    out: Path
    log: logging.Logger
    timings: dict[str, float] = field(default_factory=dict)
    cleanups: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    site: SiteInfo | None = None
    rendezvous: Rendezvous | None = None

    def _meeting(self) -> Rendezvous:
        if self.rendezvous is None:
            raise ScenarioAssertion("signal/wait_for need a two-site run (run_pair_scenario)")
        return self.rendezvous

    def signal(self, name: str, data: Any = None) -> None:
        """Two-site runs: tell the peer that `name` happened, with JSON-able `data` (once)."""
        self._meeting().signal(name, data)

    def wait_for(self, name: str, timeout: float = 120.0, *, site: str | None = None) -> Any:
        """Two-site runs: wait for the peer's `signal(name, data)`, return its data. Raises
        PeerFailed at once if the peer fails or dies, ScenarioAssertion after `timeout`."""
        return self._meeting().wait_for(name, timeout, site=site)

    def barrier(self, name: str, data: Any = None, timeout: float = 120.0) -> Any:
        """Two-site runs: signal `name` and wait for the peer's; returns the peer's data."""
        meeting = self._meeting()
        return meeting.barrier(name, data, timeout)[meeting.peers[0]]

    def run(
        self,
        cmd: Sequence[str],
        *,
        timeout: float = 120,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command, log it and its output; raise ScenarioAssertion on failure if check."""
        started = time.monotonic()
        try:
            proc = subprocess.run(
                list(cmd),
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise ScenarioAssertion(f"{' '.join(cmd)} timed out after {timeout} s") from exc
        self.log.info(
            "$ %s  -> %d (%.2f s)", " ".join(cmd), proc.returncode, time.monotonic() - started
        )
        for stream, text in (("out", proc.stdout), ("err", proc.stderr)):
            if text.strip():
                self.log.info("  std%s: %s", stream, text.strip()[-4000:])
        if check and proc.returncode != 0:
            raise ScenarioAssertion(
                f"{' '.join(cmd)} failed with exit {proc.returncode}: "
                f"{(proc.stderr or proc.stdout).strip()[-1000:]}"
            )
        return proc

    @contextlib.contextmanager
    def timed(self, name: str) -> Iterator[None]:
        started = time.monotonic()
        try:
            yield
        finally:
            self.timings[name] = round(time.monotonic() - started, 3)
            self.log.info("timing %s: %.3f s", name, self.timings[name])

    def check(self, condition: object, message: str) -> None:
        if not condition:
            self.log.error("CHECK FAILED: %s", message)
            raise ScenarioAssertion(message)
        self.log.info("check ok: %s", message)


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
    tmp.replace(path)


def _save_dmesg(out: Path) -> None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        dmesg = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=30, check=False)
        (out / "dmesg.txt").write_text(dmesg.stdout)


def _all_stacks() -> str:
    frames = sys._current_frames()
    parts = []
    for thread in threading.enumerate():
        frame = frames.get(thread.ident or -1)
        if frame is not None:
            parts.append(f"--- thread {thread.name} ---\n{''.join(traceback.format_stack(frame))}")
    return "\n".join(parts)


def _watchdog(deadline: float, out: Path, result: dict[str, Any]) -> None:
    """Shortly before the host kills the guest, leave the stacks, the kernel log and a failed
    result behind, and end the scenario so the guest powers off by itself."""
    while uptime_s() < deadline:
        time.sleep(1)
    log.error("watchdog: scenario still running at guest uptime %.0f s", deadline)
    (out / "stacks.txt").write_text(_all_stacks())
    _save_dmesg(out)
    failed = {**result, "ok": False, "error": f"watchdog: still running at {deadline:.0f} s"}
    failed["traceback"] = "see stacks.txt"
    _write_json(out / "result.json", failed)
    logging.shutdown()
    os._exit(3)


def wait_for_modules(timeout: float = 180) -> float | None:
    """Stage 2 loads the kernel modules while Python starts: wait for them (their uptime)."""
    marker = Path(MODULES_DONE)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            return float(marker.read_text().strip())
        time.sleep(0.1)
    return None


def _join_sites(ctx: GuestContext, site: SiteInfo) -> dict[str, Any]:
    """Two-site runs: rendezvous share, identity, network up, peer met and pinged."""
    with ctx.timed("site_setup"):
        mount_shared()
        ctx.rendezvous = Rendezvous(SHARED_MOUNT, site.name, tuple(site.peers), log=ctx.log)
        ctx.site = site
        initiator_name = set_identity(site)
        net = configure_network(site)
    ctx.log.info("site %s: %s, initiator %s", site.name, net, initiator_name)
    with ctx.timed("peer_meet"):
        ctx.rendezvous.barrier("_net_up", {"uptime": uptime_s()}, timeout=_time_left(300))
    with ctx.timed("peer_ping"):
        rtt = ping(site.peer_address)
    ctx.log.info("site %s reaches %s (%s): %.2f ms", site.name, site.peer, site.peer_address, rtt)
    return {**net, "initiator_name": initiator_name, "ping_ms": rtt, "peers": site.peers}


def _time_left(default: float) -> float:
    """Seconds until the guest's watchdog deadline (a little less), else `default`."""
    deadline = param("deadline")
    if not deadline:
        return default
    return max(5.0, float(deadline) - uptime_s() - 5)


def run(name: str, out: Path, boot_s: float | None, modules_s: float | None) -> int:
    out.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(out / "scenario.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    python_ready = uptime_s()
    result: dict[str, Any] = {
        "scenario": name,
        "ok": False,
        "error": None,
        "traceback": None,
        "data": {},
        "kernel": os.uname().release,
    }
    ctx = GuestContext(out=out, log=log)
    deadline = param("deadline")
    if deadline:
        threading.Thread(
            target=_watchdog, args=(float(deadline), out, result), daemon=True, name="watchdog"
        ).start()
    started = time.monotonic()
    try:
        scenarios = load_all()
        if name not in scenarios:
            raise ScenarioAssertion(f"unknown scenario {name!r}; known: {sorted(scenarios)}")
        spec = scenarios[name]
        if modules_s is None:
            modules_s = wait_for_modules()
            if modules_s is None:
                raise ScenarioAssertion(f"the kernel modules were not loaded ({MODULES_DONE})")
        log.info(
            "scenario %s starts (guest uptime %.2f s, modules in at %.2f s)",
            name,
            uptime_s(),
            modules_s,
        )
        site = SiteInfo.from_env()
        if bool(spec.sites) != (site is not None):
            raise ScenarioAssertion(
                f"scenario {name} is for sites {spec.sites or 'none'}, this guest is site "
                f"{site.name if site else 'none'} (two-site scenarios use run_pair_scenario)"
            )
        if site is not None:
            result["site"] = site.name
            result["network"] = _join_sites(ctx, site)
        with ctx.cleanups:
            try:
                if "iscsid" in spec.needs:
                    with ctx.timed("iscsid_start"):
                        initiator.start_iscsid(ctx)
                result["data"] = spec.func(ctx)
            except BaseException as exc:
                if ctx.rendezvous is not None:  # the peer stops waiting for us now
                    ctx.rendezvous.fail(f"{type(exc).__name__}: {exc}")
                raise
            if ctx.rendezvous is not None:
                # before the cleanups: the peer may still use our target, or we its
                with ctx.timed("peer_done"), contextlib.suppress(PeerFailed):
                    ctx.rendezvous.barrier("_done", timeout=_time_left(600))
        result["ok"] = True
    except BaseException as exc:  # the result must be written whatever happened
        log.exception("scenario %s failed", name)
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["traceback"] = traceback.format_exc()
        if ctx.rendezvous is not None:
            ctx.rendezvous.fail(result["error"])
    finally:
        result["timings"] = {
            "boot_s": boot_s,
            "modules_s": modules_s,
            "python_ready_s": python_ready,
            "scenario_s": round(time.monotonic() - started, 3),
            "steps": ctx.timings,
        }
        _save_dmesg(out)
        _write_json(out / "result.json", result)
        log.info("scenario %s: %s", name, "PASSED" if result["ok"] else "FAILED")
        handler.flush()
    print(f"lab: scenario {name}: {'PASSED' if result['ok'] else 'FAILED'}", flush=True)
    if not result["ok"]:
        print(f"lab: {result['error']}", flush=True)
    return 0 if result["ok"] else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m targetd_repl.lab.guest")
    parser.add_argument("scenario")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--boot-s", type=float, default=None)
    parser.add_argument("--modules-s", type=float, default=None)
    args = parser.parse_args(argv)
    return run(args.scenario, args.out, args.boot_s, args.modules_s)


if __name__ == "__main__":
    sys.exit(main())
