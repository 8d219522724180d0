"""Host side of the lab: boot a QEMU guest on the prepared kernel, run one scenario, read back
its result. `run_scenario()` is the API pytest uses; the CLI (`python -m targetd_repl.lab run`)
wraps it.

Each run gets a directory `<lab dir>/runs/<scenario>-<time>-<pid>/` holding `console.log` (the
serial console) and `results/` (the guest's read-write 9p share: result.json, scenario.log,
dmesg.txt). The guest has no network card (`-nic none`); its iSCSI traffic stays on its own
loopback. QEMU runs under TCG unless KVM is asked for or a short probe proved it works here
(nested KVM hangs on some hosts: the probe has a hard timeout and its verdict is cached).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from targetd_repl.lab.errors import LabError, ScenarioFailed
from targetd_repl.lab.prepare import REPO_ROOT, LabImage, prepare
from targetd_repl.lab.registry import load_all

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


def _base_command(image: LabImage, accel: str, mem_mb: int, smp: int) -> list[str]:
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
        "-nic",
        "none",
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


def _new_run_dir(image: LabImage, name: str) -> Path:
    runs = Path(image.lab_dir) / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    old = sorted(runs.iterdir(), key=lambda p: p.stat().st_mtime)
    for stale in old[: max(0, len(old) - KEEP_RUNS)]:
        shutil.rmtree(stale, ignore_errors=True)
    run_dir = runs / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    (run_dir / "results").mkdir(parents=True)
    return run_dir


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
    limit = timeout if timeout is not None else scenarios[name].timeout_s
    image = image or prepare()
    accel = "kvm" if kvm_usable(image, kvm) else "tcg"
    _precompile()
    run_dir = _new_run_dir(image, name)
    console = run_dir / "console.log"
    results = run_dir / "results"
    for guest_name, source in (files or {}).items():
        shutil.copy2(source, results / guest_name)
    cmdline = _kernel_cmdline(
        {
            "lab_init": image.stage2_init,
            "lab_scenario": name,
            "lab_python": sys.executable,
            "lab_repo": str(REPO_ROOT),
            # the guest's watchdog leaves stacks and dmesg behind before the host kills it
            "lab_deadline": str(max(30, int(limit) - WATCHDOG_MARGIN_S)),
            **(params or {}),
        }
    )
    cmd = [
        *_base_command(image, accel, mem_mb, smp),
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
    result_path = results / "result.json"
    raw: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        raw = json.loads(result_path.read_text())
    result = ScenarioResult(
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
    )
    log.info("lab: %s %s in %.1f s", name, "passed" if result.ok else "FAILED", duration)
    if check and not result.ok:
        if timed_out:
            why = f"timed out after {limit:.0f} s (QEMU killed)"
        elif not raw:
            qemu_said = _tail(run_dir / "qemu.log", 5)
            why = f"produced no result (QEMU exit {proc.returncode}; {qemu_said})"
        else:
            why = f"failed: {result.error}"
        raise ScenarioFailed(
            f"lab scenario {name} {why}\n"
            f"--- console ({console}), last lines ---\n{_tail(console, 40)}\n"
            f"--- scenario log ({result.log_path}), last lines ---\n{_tail(result.log_path, 60)}"
        )
    return result
