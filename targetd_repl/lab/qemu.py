"""Host side of the lab: boot a QEMU guest on the prepared kernel, run one scenario, read back
its result. `run_scenario()` is the API pytest uses; the CLI (`python -m targetd_repl.lab run`)
wraps it.

Each run gets a directory `<lab dir>/runs/<scenario>-<time>-<pid>/` holding `console.log` (the
serial console) and `results/` (the guest's read-write 9p share: result.json, scenario.log,
dmesg.txt). The guest has no network card (`-nic none`); its iSCSI traffic stays on its own
loopback. QEMU runs under TCG unless KVM is asked for or a short probe proved it works here
(nested KVM hangs on some hosts: the probe has a hard timeout and its verdict is cached).

Two-site scenarios (registered with `sites=("a", "b")`) run with `run_pair_scenario()`: two
guests boot at once, each with one virtio-net NIC, the two NICs joined by QEMU `dgram` netdevs
sending UDP between two ports on 127.0.0.1 (nothing leaves the machine, and neither QEMU has to
start first). Site i gets 10.77.0.<i+1>/24. Their run directory holds `a/` and `b/` (each like a
single run's directory) and `shared/`, the 9p share both guests mount at /lab-shared for their
rendezvous (`sites.Rendezvous`); the host writes `shared/_host/abort.json` when one guest dies,
so that the other stops waiting for it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from targetd_repl.lab.errors import LabError, ScenarioFailed
from targetd_repl.lab.prepare import REPO_ROOT, LabImage, net_modules_list, prepare
from targetd_repl.lab.registry import Scenario, load_all

log = logging.getLogger(__name__)

QEMU = "qemu-system-x86_64"
KvmMode = Literal["auto", "on", "off"]
DEFAULT_MEM_MB = 1024
DEFAULT_SMP = 2
DEFAULT_TIMEOUT_S = 240.0
KVM_PROBE_TIMEOUT_S = 15.0
KEEP_RUNS = 30
WATCHDOG_MARGIN_S = 20
_CMDLINE_VALUE = re.compile(r"^[A-Za-z0-9_./:,+=@-]+$")
_CMDLINE_KEY = re.compile(r"^lab_[a-z0-9_]+$")
NO_NIC = ("-nic", "none")
# Two-site runs: a private /24 between the guests, QEMU's UDP sockets on loopback only.
PAIR_NET = "10.77.0"
PAIR_PREFIX = 24
PAIR_MAC = "52:54:00:77:00:{:02x}"
PAIR_MTU = 1500  # 9000 measured no faster under TCG (same run, alternating: 2-4 vs 4-6 MB/s)
LOOPBACK = "127.0.0.1"
DEFAULT_PAIR_MEM_MB = 768  # the smoke scenario leaves ~770 of 960 MiB available at 1024
DEFAULT_PAIR_SMP = 1
PEER_GRACE_S = 30.0  # after one guest died: how long the other gets to notice and stop
PORT_RETRIES = 3  # a free port picked here may be taken before QEMU binds it


@dataclass(frozen=True)
class ScenarioResult:
    """What a guest run produced: the parsed result.json plus where the logs are."""

    name: str
    ok: bool
    data: dict[str, Any]
    error: str | None
    timings: dict[str, Any]
    duration_s: float  # wall clock on the host, boot and power-off included
    accel: str
    run_dir: Path
    log_path: Path  # the scenario's log (guest side)
    console_path: Path  # the serial console
    raw: dict[str, Any] = field(repr=False, default_factory=dict)
    site: str | None = None  # two-site runs: which site this guest was


@dataclass(frozen=True)
class PairResult:
    """What a two-site run produced: one ScenarioResult per site (`sites["a"].data`)."""

    name: str
    ok: bool
    sites: dict[str, ScenarioResult]
    duration_s: float  # wall clock on the host, from the first launch to the last power-off
    accel: str
    run_dir: Path
    smp: int
    mem_mb: int


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"({path} missing)"
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\x1bc", "", text)  # SeaBIOS terminal resets
    return "\n".join(text.splitlines()[-lines:])


def _qemu_version() -> str:
    try:
        out = subprocess.run(
            [QEMU, "--version"], capture_output=True, text=True, timeout=30, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LabError(
            f"lab: {QEMU} is not installed (make deps installs qemu-system-x86)"
        ) from exc
    return out.splitlines()[0] if out else "unknown"


def _base_command(
    image: LabImage, accel: str, mem_mb: int, smp: int, net: Sequence[str] = NO_NIC
) -> list[str]:
    return [
        QEMU,
        "-accel",
        accel,
        "-cpu",
        "host" if accel == "kvm" else "max",
        "-m",
        str(mem_mb),
        "-smp",
        str(smp),
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-no-reboot",
        *net,
        "-monitor",
        "none",
        "-kernel",
        image.vmlinux,
        "-initrd",
        image.initramfs,
    ]


def _kernel_cmdline(params: dict[str, str]) -> str:
    base = "console=ttyS0 rdinit=/init panic=-1 quiet loglevel=4"
    for key, value in params.items():
        if not _CMDLINE_KEY.fullmatch(key) or not _CMDLINE_VALUE.fullmatch(value):
            raise LabError(f"lab: {key}={value!r} cannot travel on the kernel command line")
    return " ".join([base, *(f"{key}={value}" for key, value in params.items())])


def _user_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "targetd-repl"


def kvm_usable(image: LabImage, mode: KvmMode = "auto") -> bool:
    """Whether to use KVM: never for "off", always for "on"; for "auto", a cached probe that
    boots the initramfs with KVM and a hard timeout (KVM hangs on nested hosts)."""
    if mode != "auto":
        return mode == "on"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    key = f"{os.uname().release} {_qemu_version()}"
    # Kept outside the lab dir: a fresh clone (CI) must not pay the probe's timeout again.
    cache = _user_cache_dir() / "kvm-probe.json"
    with contextlib.suppress(OSError, ValueError):
        cached = json.loads(cache.read_text())
        if cached.get("key") == key:
            return bool(cached["usable"])
    console = Path(image.lab_dir) / "kvm-probe.console.log"
    cmd = [
        *_base_command(image, "kvm", 256, 1),
        "-serial",
        f"file:{console}",
        "-append",
        _kernel_cmdline({}) + " lab_probe=1",
    ]
    started = time.monotonic()
    usable = False
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        proc.wait(timeout=KVM_PROBE_TIMEOUT_S)
        usable = proc.returncode == 0 and "LAB-PROBE-OK" in _tail(console, 50)
    except subprocess.TimeoutExpired:
        proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
    log.info(
        "lab: KVM probe %s in %.1f s", "passed" if usable else "failed", time.monotonic() - started
    )
    with contextlib.suppress(OSError):
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"key": key, "usable": usable}) + "\n")
    return usable


def _new_run_dir(image: LabImage, name: str, subdirs: Sequence[str] = ("results",)) -> Path:
    runs = Path(image.lab_dir) / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    old = sorted(runs.iterdir(), key=lambda p: p.stat().st_mtime)
    for stale in old[: max(0, len(old) - KEEP_RUNS)]:
        shutil.rmtree(stale, ignore_errors=True)
    run_dir = runs / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    run_dir.mkdir(parents=True)
    for sub in subdirs:
        (run_dir / sub).mkdir(parents=True)
    return run_dir


def _guest_command(
    image: LabImage,
    accel: str,
    mem_mb: int,
    smp: int,
    *,
    console: Path,
    cmdline: str,
    results: Path,
    net: Sequence[str] = NO_NIC,
    shares: Sequence[tuple[str, Path]] = (),
) -> list[str]:
    """The QEMU command of one guest: the host root read-only, `results` read-write, and each
    of `shares` (tag, host directory) read-write."""
    cmd = [
        *_base_command(image, accel, mem_mb, smp, net),
        "-serial",
        f"file:{console}",
        "-append",
        cmdline,
        "-fsdev",
        "local,id=hostroot,path=/,security_model=passthrough,readonly=on,multidevs=remap",
        "-device",
        "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot",
        "-fsdev",
        f"local,id=results,path={results},security_model=none,multidevs=remap",
        "-device",
        "virtio-9p-pci,fsdev=results,mount_tag=results",
    ]
    for tag, path in shares:
        cmd += [
            "-fsdev",
            f"local,id={tag},path={path},security_model=none,multidevs=remap",
            "-device",
            f"virtio-9p-pci,fsdev={tag},mount_tag={tag}",
        ]
    return cmd


def _guest_params(image: LabImage, name: str, limit: float, accel: str) -> dict[str, str]:
    return {
        "lab_init": image.stage2_init,
        "lab_scenario": name,
        "lab_python": sys.executable,
        "lab_repo": str(REPO_ROOT),
        # the guest's watchdog leaves stacks and dmesg behind before the host kills it
        "lab_deadline": str(max(30, int(limit) - WATCHDOG_MARGIN_S)),
        # TCG emulates SSE4.2's crc32 instruction at ~67 MiB/s, the crc32c package's table
        # code runs at ~495 MiB/s under it (qemu-x86_64, measured here); KVM runs the real one
        "lab_crc": "software" if accel == "tcg" else "hardware",
    }


def _read_result(
    name: str,
    run_dir: Path,
    results: Path,
    console: Path,
    *,
    accel: str,
    duration: float,
    timed_out: bool,
    site: str | None = None,
) -> ScenarioResult:
    raw: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        raw = json.loads((results / "result.json").read_text())
    return ScenarioResult(
        name=name,
        ok=bool(raw.get("ok")) and not timed_out,
        data=raw.get("data") or {},
        error=raw.get("error"),
        timings=raw.get("timings") or {},
        duration_s=duration,
        accel=accel,
        run_dir=run_dir,
        log_path=results / "scenario.log",
        console_path=console,
        raw=raw,
        site=site,
    )


def _why_failed(
    result: ScenarioResult, timed_out: bool, limit: float, returncode: int | None
) -> str:
    if timed_out:
        return f"timed out after {limit:.0f} s (QEMU killed)"
    if not result.raw:
        qemu_said = _tail(result.run_dir / "qemu.log", 5)
        return f"produced no result (QEMU exit {returncode}; {qemu_said})"
    return f"failed: {result.error}"


def _logs(result: ScenarioResult, console_lines: int = 40, log_lines: int = 60) -> str:
    return (
        f"--- console ({result.console_path}), last lines ---\n"
        f"{_tail(result.console_path, console_lines)}\n"
        f"--- scenario log ({result.log_path}), last lines ---\n"
        f"{_tail(result.log_path, log_lines)}"
    )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Kill one QEMU we started (by its PID) and reap it."""
    if proc.poll() is None:
        proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)


def _precompile() -> None:
    """Byte-compile the project on the host: the guest would otherwise compile every module on
    each boot, under TCG, with nowhere to keep the result (its overlay is a tmpfs)."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        subprocess.run(
            [sys.executable, "-m", "compileall", "-q", "-j", "0", str(REPO_ROOT / "targetd_repl")],
            capture_output=True,
            timeout=120,
            check=False,
            stdin=subprocess.DEVNULL,
        )


def run_scenario(
    name: str,
    timeout: float | None = None,
    *,
    kvm: KvmMode = "auto",
    mem_mb: int = DEFAULT_MEM_MB,
    smp: int = DEFAULT_SMP,
    params: dict[str, str] | None = None,
    files: dict[str, Path] | None = None,
    check: bool = True,
    image: LabImage | None = None,
) -> ScenarioResult:
    """Boot a guest, run scenario `name` in it, return its result.

    `params` (keys `lab_<word>`) travel on the kernel command line and reach the scenario as
    environment variables. `files` are copied into the results share before boot (the guest
    sees `/lab-results/<key>`, kept with the run). With `check` (the default) a failed,
    timed-out or silent run raises ScenarioFailed, whose message carries the tails of the
    console and scenario logs."""
    scenarios = load_all()
    if name not in scenarios:
        raise LabError(f"lab: unknown scenario {name!r}; known: {', '.join(sorted(scenarios))}")
    if scenarios[name].sites:
        raise LabError(f"lab: {name} is a two-site scenario: run it with run_pair_scenario()")
    limit = timeout if timeout is not None else scenarios[name].timeout_s
    image = image or prepare()
    accel = "kvm" if kvm_usable(image, kvm) else "tcg"
    _precompile()
    run_dir = _new_run_dir(image, name)
    console = run_dir / "console.log"
    results = run_dir / "results"
    for guest_name, source in (files or {}).items():
        shutil.copy2(source, results / guest_name)
    cmdline = _kernel_cmdline({**_guest_params(image, name, limit, accel), **(params or {})})
    cmd = _guest_command(
        image, accel, mem_mb, smp, console=console, cmdline=cmdline, results=results
    )
    (run_dir / "qemu-command.txt").write_text(" ".join(cmd) + "\n")
    log.info("lab: booting %s (%s) in %s", name, accel, run_dir)
    started = time.monotonic()
    timed_out = False
    with (run_dir / "qemu.log").open("w") as qemu_log:
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=qemu_log, stderr=qemu_log)
        except OSError as exc:
            raise LabError(f"lab: cannot start {QEMU}: {exc} (make deps)") from exc
        try:
            proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            timed_out = True
            proc.kill()  # by PID: only the QEMU we started
            proc.wait(timeout=30)
        except BaseException:
            proc.kill()
            proc.wait(timeout=30)
            raise
    duration = round(time.monotonic() - started, 2)
    result = _read_result(
        name, run_dir, results, console, accel=accel, duration=duration, timed_out=timed_out
    )
    log.info("lab: %s %s in %.1f s", name, "passed" if result.ok else "FAILED", duration)
    if check and not result.ok:
        why = _why_failed(result, timed_out, limit, proc.returncode)
        raise ScenarioFailed(f"lab scenario {name} {why}\n{_logs(result)}")
    return result


def _free_udp_ports(count: int) -> list[int]:
    """`count` distinct UDP ports free on 127.0.0.1 right now (QEMU binds them moments later)."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(count)]
    try:
        for sock in socks:
            sock.bind((LOOPBACK, 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def pair_network(site_index: int, local_port: int, remote_port: int) -> list[str]:
    """QEMU arguments for a two-site guest's one NIC: virtio-net on a `dgram` netdev that sends
    the frames as UDP datagrams from 127.0.0.1:`local_port` to 127.0.0.1:`remote_port`."""
    netdev = ",".join(
        [
            "dgram",
            "id=n0",
            "local.type=inet",
            f"local.host={LOOPBACK}",
            f"local.port={local_port}",
            "remote.type=inet",
            f"remote.host={LOOPBACK}",
            f"remote.port={remote_port}",
        ]
    )
    mac = PAIR_MAC.format(site_index + 1)
    # romfile=: no iPXE option ROM (we boot -kernel; the ROM costs ~1 s of TCG per boot)
    return ["-netdev", netdev, "-device", f"virtio-net-pci,netdev=n0,mac={mac},romfile="]


def pair_site_params(sites: Sequence[str]) -> dict[str, dict[str, str]]:
    """The kernel parameters that tell each guest its site, address, MAC and peer."""
    addresses = {site: f"{PAIR_NET}.{index + 1}" for index, site in enumerate(sites)}
    return {
        site: {
            "lab_site": site,
            "lab_addr": f"{addresses[site]}/{PAIR_PREFIX}",
            "lab_mac": PAIR_MAC.format(index + 1),
            "lab_mtu": str(PAIR_MTU),
            "lab_peers": ",".join(f"{p}:{addresses[p]}" for p in sites if p != site),
        }
        for index, site in enumerate(sites)
    }


def _pair_spec(name: str) -> Scenario:
    scenarios = load_all()
    if name not in scenarios:
        raise LabError(f"lab: unknown scenario {name!r}; known: {', '.join(sorted(scenarios))}")
    spec = scenarios[name]
    if len(spec.sites) != 2:
        raise LabError(f"lab: {name} is not a two-site scenario: run it with run_scenario()")
    return spec


def _abort(shared: Path, reason: str) -> None:
    """Tell the guests still running that the run is over (they poll the shared share)."""
    host = shared / "_host"
    host.mkdir(exist_ok=True)
    tmp = host / ".abort.json.tmp"
    tmp.write_text(json.dumps({"reason": reason}) + "\n")
    tmp.replace(host / "abort.json")


def run_pair_scenario(
    name: str,
    timeout: float | None = None,
    *,
    kvm: KvmMode = "auto",
    mem_mb: int = DEFAULT_PAIR_MEM_MB,
    smp: int = DEFAULT_PAIR_SMP,
    params: dict[str, str] | None = None,
    site_params: dict[str, dict[str, str]] | None = None,
    files: dict[str, Path] | None = None,
    check: bool = True,
    image: LabImage | None = None,
) -> PairResult:
    """Boot one guest per site of two-site scenario `name`, concurrently, on a private network
    between them; run the scenario in both; return both results (`result.sites["a"]`).

    `params` go to both guests, `site_params[site]` to one; `files` are copied into the shared
    directory (both guests see `/lab-shared/<key>`). `timeout` (default: the scenario's) covers
    both guests, boot included: at the limit both are killed. When one guest ends without
    passing, the other is told (`_host/abort`) and killed if still running PEER_GRACE_S later.
    With `check`, any failure raises ScenarioFailed carrying both guests' logs."""
    spec = _pair_spec(name)
    limit = timeout if timeout is not None else spec.timeout_s
    image = image or prepare()
    net_list = net_modules_list(image.lab_dir, image.kernel_version)
    if not net_list.is_file() or not net_list.read_text().strip():
        raise LabError(
            f"lab: {net_list} lists no NIC driver: kernel {image.kernel_version} has no "
            "virtio_net module, two-site runs cannot work (run prepare again?)"
        )
    accel = "kvm" if kvm_usable(image, kvm) else "tcg"
    _precompile()
    sites = spec.sites
    run_dir = _new_run_dir(image, name, [*(f"{site}/results" for site in sites), "shared/_host"])
    shared = run_dir / "shared"
    for shared_name, source in (files or {}).items():
        shutil.copy2(source, shared / shared_name)
    per_site = pair_site_params(sites)
    for site in sites:
        per_site[site].update(params or {})
        per_site[site].update((site_params or {}).get(site, {}))
    for attempt in range(1, PORT_RETRIES + 1):
        ports = _free_udp_ports(len(sites))
        commands = {}
        for index, site in enumerate(sites):
            site_dir = run_dir / site
            cmdline = _kernel_cmdline(
                {**_guest_params(image, name, limit, accel), **per_site[site]}
            )
            commands[site] = _guest_command(
                image,
                accel,
                mem_mb,
                smp,
                console=site_dir / "console.log",
                cmdline=cmdline,
                results=site_dir / "results",
                net=pair_network(index, ports[index], ports[1 - index]),
                shares=[("shared", shared)],
            )
            (site_dir / "qemu-command.txt").write_text(" ".join(commands[site]) + "\n")
        log.info("lab: booting %s, sites %s (%s, UDP %s) in %s", name, sites, accel, ports, run_dir)
        outcome = _run_pair(commands, run_dir, shared, limit)
        if outcome is not None:
            break
        log.warning("lab: a UDP port was taken before QEMU bound it (attempt %d)", attempt)
    else:
        raise LabError(f"lab: {name}: no free UDP port pair on {LOOPBACK} after {PORT_RETRIES}")
    started, ended, returncodes, timed_out = outcome
    results = {
        site: _read_result(
            name,
            run_dir / site,
            run_dir / site / "results",
            run_dir / site / "console.log",
            accel=accel,
            duration=round(ended[site] - started, 2),
            timed_out=site in timed_out,
            site=site,
        )
        for site in sites
    }
    result = PairResult(
        name=name,
        ok=all(r.ok for r in results.values()),
        sites=results,
        duration_s=round(max(ended.values()) - started, 2),
        accel=accel,
        run_dir=run_dir,
        smp=smp,
        mem_mb=mem_mb,
    )
    log.info("lab: %s %s in %.1f s", name, "passed" if result.ok else "FAILED", result.duration_s)
    if check and not result.ok:
        parts = [f"lab two-site scenario {name} failed ({run_dir}):"]
        for site, site_result in results.items():
            state = (
                "passed"
                if site_result.ok
                else _why_failed(site_result, site in timed_out, limit, returncodes[site])
            )
            parts.append(f"site {site}: {state}")
        for site, site_result in results.items():
            parts.append(f"=== site {site} ===\n{_logs(site_result, 30, 50)}")
        raise ScenarioFailed("\n".join(parts))
    return result


PairOutcome = tuple[float, dict[str, float], dict[str, int | None], set[str]]


def _run_pair(
    commands: dict[str, list[str]], run_dir: Path, shared: Path, limit: float
) -> PairOutcome | None:
    """Run the guests' QEMUs to the end. Returns (start, end time by site, exit status by site,
    sites killed at the limit), or None when a QEMU could not bind its UDP port (retry)."""
    procs: dict[str, subprocess.Popen[bytes]] = {}
    logs = {}
    ended: dict[str, float] = {}
    timed_out: set[str] = set()
    started = time.monotonic()
    try:
        for site, cmd in commands.items():
            logs[site] = (run_dir / site / "qemu.log").open("w")
            try:
                procs[site] = subprocess.Popen(
                    cmd, stdin=subprocess.DEVNULL, stdout=logs[site], stderr=logs[site]
                )
            except OSError as exc:
                raise LabError(f"lab: cannot start {QEMU}: {exc} (make deps)") from exc
        kill_at: float | None = None
        while len(ended) < len(procs):
            now = time.monotonic()
            for site, proc in procs.items():
                if site in ended or proc.poll() is None:
                    continue
                ended[site] = now
                if now - started < 10 and "in use" in _tail(run_dir / site / "qemu.log", 5):
                    return None  # the finally kills the other one
                raw: dict[str, Any] = {}
                with contextlib.suppress(OSError, ValueError):
                    raw = json.loads((run_dir / site / "results" / "result.json").read_text())
                if not raw.get("ok") and kill_at is None:
                    why = raw.get("error") or f"QEMU exit {proc.returncode}, no result"
                    _abort(shared, f"site {site} ended without passing: {why}")
                    kill_at = now + PEER_GRACE_S
                    log.warning("lab: site %s failed; stopping the others", site)
            if now - started > limit:
                for site, proc in procs.items():
                    if site not in ended:
                        timed_out.add(site)
                        _stop(proc)
                        ended[site] = time.monotonic()
                break
            if kill_at is not None and now > kill_at:
                for site, proc in procs.items():
                    if site not in ended:
                        _stop(proc)
                        ended[site] = time.monotonic()
                break
            time.sleep(0.2)
        return started, ended, {site: proc.returncode for site, proc in procs.items()}, timed_out
    finally:
        for proc in procs.values():
            _stop(proc)  # by PID: only the QEMUs we started
        for handle in logs.values():
            handle.close()
