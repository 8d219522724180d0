"""Lab scenarios for our data path on the real kernel (issue 3): the TCMU handler runs as its own
process, `python -m targetd_repl.datapath --engine STATE_DIR`, serving volumes of a storage
engine whose state lives on the guest's tmpfs; LIO is configured only through targetd_repl.lio
(user backstore `targetd/<volume>`, demo mode, portal 127.0.0.1:3260).

- `datapath_mkfs`: open-iscsi logs in, mkfs.ext4, files written and checksummed, logout;
  re-login, the files verify; the whole device read with O_DIRECT equals the engine's volume
  image byte for byte, and the group's journal holds the records.
- `datapath_kill9`: fio writes with crc32c verification while the handler is killed with -9
  (twice, at random moments) and restarted; fio verifies, the kernel logs no I/O error. Only
  the handler dies: LIO, the iSCSI connection and its NOP-Out pings stay up, so the iSCSI
  replacement/noop timeouts never fire. What must outlast a restart is the LUN's TCMU
  `cmd_time_out` (60 s here; the kernel fails a command the ring holds longer) and the SCSI
  disk's command timeout (raised to 120 s; else the initiator aborts and retries). A restart
  takes ~0.5 s on real hardware and 8-12 s under TCG, nearly all of it Python's imports.
- `datapath_conformance`: libiscsi's `iscsi-test-cu` against our LUN and a kernel fileio LUN of
  the same size: per-test pass/fail/skip lists, our pass count >= fileio's.
- `datapath_write_protect`: a demoted group's LUN (SIGUSR1) refuses writes with DATA PROTECT /
  WRITE PROTECTED (dd, sg_raw, sg_write_same, sg_dd) and MODE SENSE reports WP; promoted
  (SIGUSR2), writes pass in the same session.
- `datapath_bench`: fio against our LUN and a fileio LUN in one guest (bench/datapath.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import crc32c

from targetd_repl import lio
from targetd_repl.lab import initiator
from targetd_repl.lab.child import ChildProcess
from targetd_repl.lab.data import sha256, sha256_direct, sha256_file, writes_done
from targetd_repl.lab.errors import ScenarioAssertion
from targetd_repl.lab.guest import param
from targetd_repl.lab.registry import scenario

if TYPE_CHECKING:
    from targetd_repl.lab.guest import GuestContext

MiB = 1 << 20
SITE = "lab"
PORTAL = lio.Portal("127.0.0.1", 3260)
WORKDIR = Path("/var/lib/targetd-lab")  # in the guest's tmpfs overlay
# Largest command the kernel passes to the handler (sectors): 1 MiB, the size our VPD B0 says
# is optimal, so a 1 MiB write is one command (LAB-NOTES: the TCMU default, 128 sectors = 64 KiB,
# splits larger I/O).
HW_MAX_SECTORS = 2048
# Seconds the kernel waits for the handler before failing a command: a restarted handler must
# get there well before (python startup + journal replay take a few seconds under TCG).
CMD_TIME_OUT = 60
# Kernel I/O error lines that must not appear while our handler restarts.
_IO_ERROR = re.compile(r"I/O error|critical (target|medium|space allocation) error|Buffer I/O")


class Handler(ChildProcess):
    """Our TCMU handler as a separate process (`python -m targetd_repl.datapath --engine`),
    logging to handler.log in the results. Started, killed and stopped by its PID only."""

    def __init__(
        self,
        ctx: GuestContext,
        state_dir: Path,
        volumes: list[str],
        *extra: str,
        memory: bool = False,
        plain_files: bool = False,
        name: str = "handler",
    ) -> None:
        """`volumes` are NAME:SIZE; `memory` serves them from memory (`--memory`, no engine:
        the benchmark's measure of the ring and SCSI layers alone); `plain_files` from plain
        files in `state_dir` (`--file`, O_DSYNC, no journal: the benchmark's plain handler)."""
        if memory:
            backend = [arg for volume in volumes for arg in ("--memory", volume)]
        elif plain_files:
            backend = []
            for volume in volumes:
                vol_name, _, size = volume.partition(":")
                backend += ["--file", f"{vol_name}:{state_dir / vol_name}.img:{size}"]
        else:
            backend = [
                *("--engine", str(state_dir)),
                *(arg for volume in volumes for arg in ("--volume", volume)),
            ]
        cmd = [sys.executable, "-m", "targetd_repl.datapath", *backend, *extra]
        super().__init__(ctx, name, cmd, cleanup_timeout=30)
        self.state_dir = state_dir

    def start(self) -> None:
        self.spawn()

    def wait_for(self, pattern: str, timeout: float = 90) -> re.Match[str]:
        """Wait until the current process logs a line matching `pattern`."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            found = regex.search(self.output())
            if found is not None:
                return found
            if not self.running():
                raise ScenarioAssertion(
                    f"the handler exited before logging /{pattern}/:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise ScenarioAssertion(f"the handler did not log /{pattern}/ in {timeout} s")
            time.sleep(0.05)

    def wait_serving(self, volume: str, timeout: float = 90) -> dict[str, int]:
        """Wait until the handler serves `volume`'s ring; returns the ring pointers it found."""
        found = self.wait_for(
            rf"uio\d+:{re.escape(volume)}: serving \(cmd_tail=(\d+) cmd_head=(\d+)\)", timeout
        )
        return {"cmd_tail": int(found.group(1)), "cmd_head": int(found.group(2))}

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM; the handler finishes in-flight commands and checkpoints the engine."""
        if not self.running():
            return self.proc.returncode if self.proc is not None else 0
        return self.sigterm_and_wait(timeout, f"the handler did not stop within {timeout} s")


def _user_lun(volume: str, size: int, lun: int = 0, **kw: Any) -> lio.LunSpec:
    return lio.LunSpec(
        volume,
        size,
        lun=lun,
        hw_max_sectors=kw.pop("hw_max_sectors", HW_MAX_SECTORS),
        cmd_time_out=kw.pop("cmd_time_out", CMD_TIME_OUT),
        **kw,
    )


def _export(ctx: GuestContext, *luns: lio.LunSpec) -> str:
    wanted = lio.LioConfig(site=SITE, luns=luns, portals=(PORTAL,), demo_mode=True)
    with ctx.timed("lio_reconcile"):
        changes = lio.reconcile(wanted)
    ctx.log.info("LIO changes: %s", changes)

    def teardown() -> None:
        with contextlib.suppress(Exception):
            lio.reconcile(lio.LioConfig(site=SITE, portals=(PORTAL,), demo_mode=True))
            lio.remove_target(SITE)

    ctx.cleanups.callback(teardown)
    return wanted.target_iqn


def _dmesg_since(mark: int) -> list[str]:
    out = subprocess.run(["dmesg"], capture_output=True, text=True, check=False).stdout
    return out.splitlines()[mark:]


def _dmesg_mark() -> int:
    return len(_dmesg_since(0))


def _journal_stats(state_dir: Path, volume: str) -> dict[str, int]:
    """Open the engine the (stopped) handler left and count its group's journal records."""
    from targetd_repl.model import RecordKind  # noqa: PLC0415
    from targetd_repl.storage.engine import StorageEngine  # noqa: PLC0415

    engine = StorageEngine.open(state_dir, site=SITE)
    try:
        store, volume_id = engine.group_of(volume)
        journal = store.journal
        records = writes = zeros = written_bytes = 0
        for record in journal.read_from(journal.first_seq):
            records += 1
            if record.volume_id != volume_id:
                continue
            if record.kind is RecordKind.WRITE:
                writes += 1
                written_bytes += record.length
            elif record.kind is RecordKind.ZERO:
                zeros += 1
        return {
            "records": records,
            "write_records": writes,
            "zero_records": zeros,
            "write_bytes": written_bytes,
            "first_seq": journal.first_seq,
            "last_seq": journal.next_seq - 1,
            "applied_seq": store.applied_seq,
        }
    finally:
        engine.close()


# --- 1. mkfs -------------------------------------------------------------------------------------


@scenario("datapath_mkfs", needs=("iscsid",), timeout_s=420)
def datapath_mkfs(ctx: GuestContext) -> dict[str, Any]:
    """Our handler + engine: mkfs.ext4, files checksummed across re-login, volume == device."""
    volume, size = "dpfs", 128 * MiB
    state = WORKDIR / "engine-mkfs"
    handler = Handler(ctx, state, [f"{volume}:{size}"], "--trim-interval", "0")
    ctx.cleanups.callback(handler.cleanup)
    with ctx.timed("handler_start"):
        handler.start()
        handler.wait_for(r"waiting for TCMU devices")
    iqn = _export(ctx, _user_lun(volume, size))
    with ctx.timed("handler_attach"):
        handler.wait_serving(volume)
    with ctx.timed("iscsi_login"):
        device = initiator.login_lun(ctx, iqn, str(PORTAL))
    device_size = initiator.block_size_bytes(device)
    ctx.check(device_size == size, f"{device} has the volume's size ({device_size})")
    queue_dir = Path(f"/sys/block/{os.path.basename(device)}/queue")
    max_sectors_kb = int((queue_dir / "max_sectors_kb").read_text())

    with ctx.timed("mkfs_ext4"):
        ctx.run(
            ["mkfs.ext4", "-F", "-q", "-E", "lazy_itable_init=0,lazy_journal_init=0", device],
            timeout=300,
        )
    mnt = Path("/mnt/datapath")
    mnt.mkdir(parents=True, exist_ok=True)
    rng = random.Random(20251122)
    files = {f"file{i}.bin": rng.randbytes(rng.randrange(MiB // 2, 3 * MiB)) for i in range(5)}
    wanted = {name: sha256(data) for name, data in files.items()}
    with ctx.timed("mount_write_sync"):
        ctx.run(["mount", "-t", "ext4", device, str(mnt)])
        (mnt / "dir").mkdir()
        for name, data in files.items():
            (mnt / "dir" / name).write_bytes(data)
        ctx.run(["sync"])
        written = {name: sha256_file(mnt / "dir" / name) for name in files}
        ctx.run(["umount", str(mnt)])
    ctx.check(written == wanted, "the files read back before unmount")
    with ctx.timed("iscsi_logout"):
        initiator.logout(ctx, iqn, str(PORTAL))

    with ctx.timed("relogin_verify"):
        device = initiator.login_lun(ctx, iqn, str(PORTAL))
        ctx.run(["mount", "-t", "ext4", "-o", "ro", device, str(mnt)])
        after = {name: sha256_file(mnt / "dir" / name) for name in files}
        listing = sorted(p.name for p in (mnt / "dir").iterdir())
        ctx.run(["umount", str(mnt)])
    ctx.check(after == wanted, f"after re-login every file verifies ({len(after)} files)")
    ctx.check(listing == sorted(files), f"the directory lists the files ({listing})")
    fsck = ctx.run(["e2fsck", "-f", "-n", device], check=False, timeout=300)
    ctx.check(fsck.returncode == 0, f"e2fsck -f -n finds the file system clean ({fsck.returncode})")
    with ctx.timed("read_device_direct"):
        device_sha, device_bytes = sha256_direct(device)
    ctx.check(device_bytes == size, f"read the whole device ({device_bytes} bytes)")
    initiator.logout(ctx, iqn, str(PORTAL))

    with ctx.timed("handler_stop"):
        rc = handler.stop()
    ctx.check(rc == 0, f"the handler stopped cleanly (exit {rc})")
    image = state / "volumes" / f"{volume}.img"
    image_sha = sha256_file(image)
    ctx.check(image_sha == device_sha, "the volume image equals the device, byte for byte")
    journal = _journal_stats(state, volume)
    ctx.check(journal["write_records"] > 0, f"the journal holds write records ({journal})")
    ctx.check(
        journal["write_bytes"] >= sum(map(len, files.values())),
        "the journal holds at least the files' bytes",
    )
    return {
        "device": device,
        "device_size": device_size,
        "max_sectors_kb": max_sectors_kb,
        "files": wanted,
        "files_after_relogin": after,
        "device_sha256": device_sha,
        "image_sha256": image_sha,
        "journal": journal,
        "fsck_exit": fsck.returncode,
        "handler_log_tail": handler.output()[-2000:],
    }


# --- 2. kill -9 ----------------------------------------------------------------------------------


def _fio_json(text: str) -> dict[str, Any]:
    start = text.find("{")
    if start < 0:
        return {}
    with contextlib.suppress(ValueError):
        return dict(json.loads(text[start:]))
    return {}


@scenario("datapath_kill9", needs=("iscsid",), timeout_s=600)
def datapath_kill9(ctx: GuestContext) -> dict[str, Any]:
    """fio --verify while the handler is killed with -9 twice and restarted: nothing lost."""
    volume, size = "dpfio", 64 * MiB
    state = WORKDIR / "engine-kill9"
    # No periodic trim: the journal keeps every write of the run, for the count at the end.
    handler = Handler(ctx, state, [f"{volume}:{size}"], "--trim-interval", "0")
    ctx.cleanups.callback(handler.cleanup)
    handler.start()
    iqn = _export(ctx, _user_lun(volume, size))
    handler.wait_serving(volume)
    device = initiator.login_lun(ctx, iqn, str(PORTAL))
    # The SCSI layer's own command timeout must outlast a restart too (default 30 s).
    sd_timeout = Path(f"/sys/block/{os.path.basename(device)}/device/timeout")
    sd_timeout.write_text("120")
    seed = int(param("seed") or time.time_ns() % 1_000_000)
    rng = random.Random(seed)
    fio_size = 32 * MiB
    fio = [
        "fio",
        "--name=kill9",
        f"--filename={device}",
        "--rw=randwrite",
        "--bs=8k",
        "--direct=1",
        "--ioengine=libaio",
        "--iodepth=16",
        f"--size={fio_size}",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--output-format=json",
    ]
    mark = _dmesg_mark()
    kills: list[dict[str, Any]] = []
    out_path = ctx.out / "fio-kill9.json"
    started = time.monotonic()
    with out_path.open("w") as out, ctx.timed("fio_with_kills"):
        proc = subprocess.Popen(fio, stdout=out, stderr=subprocess.STDOUT, text=True)
        try:
            for _ in range(2):
                # Kill under load: once writes complete again, at a random moment after that.
                base = writes_done(device)
                while writes_done(device) < base + 32 and proc.poll() is None:
                    time.sleep(0.05)
                delay = rng.uniform(0.2, 3.0)
                time.sleep(delay)
                if proc.poll() is not None:
                    break
                writes_before = writes_done(device)
                killed_at = time.monotonic()
                handler.kill9()
                handler.start()
                pointers = handler.wait_serving(volume, timeout=CMD_TIME_OUT - 10)
                serving_at = time.monotonic()
                replayed = re.search(r"replayed (\d+) journal records", handler.output())
                kills.append(
                    {
                        "after_s": round(killed_at - started, 2),
                        "delay_s": round(delay, 2),
                        "restart_s": round(serving_at - killed_at, 2),
                        "writes_completed_before": writes_before,
                        "pending_entries_found": pointers["cmd_tail"] != pointers["cmd_head"],
                        **pointers,
                        "replayed_records": int(replayed.group(1)) if replayed else 0,
                        "fio_running": proc.poll() is None,
                    }
                )
                ctx.log.info("kill -9 #%d: %s", len(kills), kills[-1])
            rc = proc.wait(timeout=420)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    fio_s = round(time.monotonic() - started, 2)
    text = out_path.read_text()
    report = _fio_json(text)
    ctx.check(len(kills) == 2, f"the handler was killed twice while fio ran ({kills})")
    ctx.check(rc == 0, f"fio exited 0 (got {rc}): {text[-1500:]}")
    job = (report.get("jobs") or [{}])[0]
    ctx.check(job.get("error") == 0, f"fio reports no error ({job.get('error')})")
    verified = int(job.get("read", {}).get("io_bytes", 0))
    ctx.check(verified >= fio_size, f"fio verified what it wrote ({verified} bytes read)")
    errors = [line for line in _dmesg_since(mark) if _IO_ERROR.search(line)]
    kernel_lines = [
        line for line in _dmesg_since(mark) if os.path.basename(device) in line or "iSCSI" in line
    ]
    ctx.check(not errors, f"the kernel logged no I/O error ({errors})")

    # A clean restart, and fio verifies the same pattern again from the replayed engine.
    rc_stop = handler.stop()
    ctx.check(rc_stop == 0, f"the handler stopped cleanly (exit {rc_stop})")
    handler.start()
    handler.wait_serving(volume)
    with ctx.timed("fio_verify_only"):
        again = ctx.run(
            [*fio, "--verify_only"],
            check=False,
            timeout=300,
        )
    ctx.check(
        again.returncode == 0, f"fio --verify_only after a restart passes ({again.stdout[-800:]})"
    )
    initiator.logout(ctx, iqn, str(PORTAL))
    handler.stop()
    journal = _journal_stats(state, volume)
    return {
        "seed": seed,
        "device": device,
        "fio_exit": rc,
        "fio_s": fio_s,
        "fio_write_iops": job.get("write", {}).get("iops"),
        "fio_verify_bytes": verified,
        "fio_write_bytes": job.get("write", {}).get("io_bytes"),
        "kills": kills,
        "verify_only_exit": again.returncode,
        "io_errors": errors,
        "kernel_lines": kernel_lines[-40:],
        "journal": journal,
        "handler_starts": handler.starts,
    }


# --- 3. conformance ------------------------------------------------------------------------------

_SUITE = re.compile(r"^Suite: (\S+)")
_TEST = re.compile(r"^\s+Test: (\S+) \.\.\.")
_STATUS = re.compile(r"(?:^|\.\.\.|\s)(passed|FAILED)(?=\s|$)")
_SUMMARY = re.compile(r"^\s+tests\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)")


def _outcome(status: str, notes: list[str]) -> dict[str, Any]:
    skips = [n for n in notes if "[SKIPPED]" in n]
    if status == "FAILED":
        # what the test said ([FAILED], [WARNING] lines), then CUnit's failed assertions
        said = [n for n in notes if n.startswith("[") and "[SKIPPED]" not in n]
        asserts = [n for n in notes if re.match(r"^\d+\. ", n)]
        reason = " | ".join(dict.fromkeys(said + asserts[:3]))
        return {"outcome": "fail", "reason": reason[:700] or "FAILED (no message)"}
    if skips:
        return {"outcome": "skip", "reason": " | ".join(dict.fromkeys(skips))[:400]}
    return {"outcome": "pass", "reason": ""}


def parse_test_cu(text: str) -> dict[str, Any]:
    """Parse `iscsi-test-cu` (CUnit, verbose) output: every test's outcome, with the reason of a
    skip ("[SKIPPED]" lines: CUnit counts those tests as passed) or of a failure (the test's
    own [FAILED]/[WARNING] lines and CUnit's failed assertions, printed after "FAILED")."""
    tests: dict[str, dict[str, Any]] = {}
    suite = ""
    current: str | None = None
    status: str | None = None
    notes: list[str] = []

    def finish() -> None:
        if current is not None and status is not None:
            tests[current] = _outcome(status, notes)

    for raw in text.splitlines():
        line = raw.rstrip()
        suite_match = _SUITE.match(line)
        test_match = _TEST.match(line)
        if suite_match or test_match or line.startswith("Run Summary"):
            finish()
            current, status, notes = None, None, []
            if suite_match:
                suite = suite_match.group(1)
                continue
            if test_match is None:
                continue
            current = f"{suite}.{test_match.group(1)}"
            line = line[test_match.end() :]
        if current is None:
            continue
        found = _STATUS.search(line)
        if found is not None and status is None:
            status = found.group(1)
            line = line[: found.start()] + line[found.end() :]
        if line.strip():
            notes.append(line.strip())
    finish()
    summary = None
    for line in text.splitlines():
        found_summary = _SUMMARY.match(line)
        if found_summary:
            total, ran, passed, failed_n, inactive = map(int, found_summary.groups())
            summary = {
                "total": total,
                "ran": ran,
                "passed": passed,
                "failed": failed_n,
                "inactive": inactive,
            }
    counts = {"pass": 0, "fail": 0, "skip": 0}
    for t in tests.values():
        counts[t["outcome"]] += 1
    return {"tests": tests, "counts": counts, "cunit_summary": summary}


def _test_cu(ctx: GuestContext, url: str, label: str, tests: str = "ALL") -> dict[str, Any]:
    out = ctx.out / f"iscsi-test-cu-{label}.txt"
    with ctx.timed(f"iscsi_test_cu_{label}"), out.open("w") as f:
        proc = subprocess.run(
            ["iscsi-test-cu", "-d", "-t", tests, url],
            stdout=f,
            stderr=subprocess.STDOUT,
            text=True,
            check=False,
            timeout=2100,
        )
    text = out.read_text(errors="replace")
    parsed = parse_test_cu(text)
    parsed["exit"] = proc.returncode
    ctx.log.info("iscsi-test-cu %s: exit %d, %s", label, proc.returncode, parsed["counts"])
    return parsed


@scenario("datapath_conformance", timeout_s=2400)
def datapath_conformance(ctx: GuestContext) -> dict[str, Any]:
    """libiscsi iscsi-test-cu on our LUN and on a kernel fileio LUN: we pass at least as many.
    Parameter `tests` (lab_tests=SCSI.WriteSame16, comma-separated as iscsi-test-cu -t takes
    them) runs a subset: minutes instead of a quarter of an hour, for checking one fix."""
    tests = param("tests") or "ALL"
    size = 32 * MiB
    state = WORKDIR / "engine-conformance"
    handler = Handler(ctx, state, [f"dpconf:{size}"])
    ctx.cleanups.callback(handler.cleanup)
    handler.start()
    fileio = lio.LunSpec(
        "fileconf",
        size,
        kind=lio.BackstoreKind.FILEIO,
        path=str(WORKDIR / "fileconf.img"),
        lun=1,
    )
    iqn = _export(ctx, _user_lun("dpconf", size, lun=0), fileio)
    handler.wait_serving("dpconf")
    ours = _test_cu(ctx, f"iscsi://{PORTAL}/{iqn}/0", "ours", tests)
    theirs = _test_cu(ctx, f"iscsi://{PORTAL}/{iqn}/1", "fileio", tests)
    rc = handler.stop()
    enough = 100 if tests == "ALL" else 1
    ctx.check(ours["counts"]["pass"] + ours["counts"]["fail"] >= enough, "our run has results")
    ctx.check(theirs["counts"]["pass"] + theirs["counts"]["fail"] >= enough, "fileio's too")
    ctx.check(
        ours["counts"]["pass"] >= theirs["counts"]["pass"],
        f"our pass count {ours['counts']} >= fileio's {theirs['counts']}",
    )
    # CUnit's own count takes skips ("not implemented") for passes: at least fileio's too
    ours_cunit, theirs_cunit = ours["cunit_summary"], theirs["cunit_summary"]
    ctx.check(
        ours_cunit is not None
        and theirs_cunit is not None
        and ours_cunit["passed"] >= theirs_cunit["passed"],
        f"CUnit's pass count {ours_cunit} >= fileio's {theirs_cunit}",
    )
    ours_not_passed = {k: v for k, v in ours["tests"].items() if v["outcome"] != "pass"}
    theirs_not_passed = {k: v for k, v in theirs["tests"].items() if v["outcome"] != "pass"}
    skips_by_reason: dict[str, list[str]] = {}
    for name, outcome in sorted(ours_not_passed.items()):
        if outcome["outcome"] == "skip":
            skips_by_reason.setdefault(outcome["reason"].split(" | ")[0], []).append(name)
    return {
        # the README's list: every test we fail with its reason, every skip grouped by reason
        "ours_failures": {
            k: v["reason"] for k, v in ours_not_passed.items() if v["outcome"] == "fail"
        },
        "ours_skips_by_reason": skips_by_reason,
        "ours": {k: v for k, v in ours.items() if k != "tests"},
        "fileio": {k: v for k, v in theirs.items() if k != "tests"},
        "ours_not_passed": ours_not_passed,
        "fileio_not_passed": theirs_not_passed,
        "we_fail_fileio_passes": sorted(
            k
            for k, v in ours_not_passed.items()
            if v["outcome"] == "fail" and theirs["tests"].get(k, {}).get("outcome") == "pass"
        ),
        "handler_exit": rc,
    }


def _served_uio(handler: Handler) -> str:
    """The uio device the handler process holds open (from /proc/PID/fd), or ''."""
    assert handler.proc is not None
    fd_dir = Path(f"/proc/{handler.proc.pid}/fd")
    with contextlib.suppress(OSError):
        for fd in fd_dir.iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("/dev/uio"):
                    return target
    return ""


# --- 4. write protect ----------------------------------------------------------------------------

_RAW_SENSE = re.compile(
    r"Raw sense data \(in hex\)[^\n]*\n((?:[ \t]+(?:[0-9a-f]{2}[ \t]*)+\n?)+)", re.IGNORECASE
)


def _sense_of(output: str) -> dict[str, int] | None:
    """Sense key and ASC/ASCQ from sg3_utils' "Raw sense data (in hex)" dump (fixed format)."""
    found = _RAW_SENSE.search(output)
    if found is None:
        return None
    data = bytes(int(b, 16) for b in found.group(1).split())
    if len(data) < 14:
        return None
    if data[0] & 0x7F in (0x72, 0x73):  # descriptor format
        return {"key": data[1] & 0x0F, "asc": data[2], "ascq": data[3]}
    return {"key": data[2] & 0x0F, "asc": data[12], "ascq": data[13]}


def _sg_device(device: str) -> str:
    sg = Path(f"/sys/block/{os.path.basename(device)}/device/scsi_generic")
    names = sorted(p.name for p in sg.iterdir())
    return f"/dev/{names[0]}"


# 512-byte LBAs the sg3_utils writes aim at, clear of the 64 KiB dd writes at 0, 64K and 128K.
RAW_LBA, SAME_LBA, SG_DD_LBA = 1024, 2048, 3072


def _write10_cdb(lba: int, nblocks: int) -> list[str]:
    cdb = bytes([0x2A, 0]) + lba.to_bytes(4, "big") + bytes([0]) + nblocks.to_bytes(2, "big")
    return [f"{b:02x}" for b in cdb + b"\0"]


@scenario("datapath_write_protect", needs=("iscsid",), timeout_s=420)
def datapath_write_protect(ctx: GuestContext) -> dict[str, Any]:
    """A demoted group's LUN refuses writes (DATA PROTECT, WP in MODE SENSE); promoted, same
    session, writes pass."""
    volume, size = "dpwp", 16 * MiB
    state = WORKDIR / "engine-wp"
    handler = Handler(ctx, state, [f"{volume}:{size}"])
    ctx.cleanups.callback(handler.cleanup)
    handler.start()
    iqn = _export(ctx, _user_lun(volume, size))
    handler.wait_serving(volume)
    device = initiator.login_lun(ctx, iqn, str(PORTAL))
    session = initiator.session_dir(iqn)
    sg = _sg_device(device)
    blocks = {name: random.Random(name).randbytes(64 * 1024) for name in ("a", "b", "c", "d")}
    for name, data in blocks.items():
        Path(f"/tmp/wp-{name}.bin").write_bytes(data)
    Path("/tmp/wp-one.bin").write_bytes(blocks["c"][:512])

    def dd(name: str, seek_64k: int) -> int:
        return ctx.run(
            [
                *("dd", f"if=/tmp/wp-{name}.bin", f"of={device}", "bs=64k", f"seek={seek_64k}"),
                *("oflag=direct", "conv=fsync", "status=none"),
            ],
            check=False,
        ).returncode

    def modes() -> str:
        return ctx.run(["sg_modes", "-p", "0x3f", device], check=False).stdout

    ctx.check(dd("a", 0) == 0, "primary: the write passes")
    modes_primary = modes()
    ctx.check("WP=0" in modes_primary, "primary: MODE SENSE reports WP=0")
    inquiry = ctx.run(["sg_inq", device]).stdout
    vpd_83 = ctx.run(["sg_inq", "-p", "0x83", device]).stdout

    with ctx.timed("demote"):
        handler.signal(signal.SIGUSR1)
        handler.wait_for(r"every LUN now read-only", timeout=60)
    dd_exit = dd("b", 1)
    ctx.check(dd_exit != 0, f"secondary: dd oflag=direct fails (exit {dd_exit})")
    modes_secondary = modes()
    ctx.check("WP=1" in modes_secondary, "secondary: MODE SENSE reports WP=1")
    raw = ctx.run(
        ["sg_raw", "-v", "-s", "512", "-i", "/tmp/wp-one.bin", sg, *_write10_cdb(RAW_LBA, 1)],
        check=False,
    )
    raw_sense = _sense_of(raw.stdout + raw.stderr)
    ctx.check(
        raw_sense is not None and (raw_sense["key"], raw_sense["asc"]) == (0x7, 0x27),
        f"sg_raw WRITE(10): sense key 0x7 ASC 0x27 ({raw_sense})",
    )
    ws = ctx.run(
        ["sg_write_same", "-v", f"--lba={SAME_LBA}", "--num=8", "--in=/tmp/wp-one.bin", device],
        check=False,
    )
    ws_text = ws.stdout + ws.stderr
    ctx.check(ws.returncode != 0, f"sg_write_same fails (exit {ws.returncode})")
    ctx.check(
        "data protect" in ws_text.lower() and "write protected" in ws_text.lower(),
        "sg_write_same reports DATA PROTECT / WRITE PROTECTED",
    )
    sgdd = ctx.run(
        [
            *("sg_dd", "if=/tmp/wp-one.bin", f"of={sg}", "bs=512", "count=1"),
            *(f"seek={SG_DD_LBA}", "verbose=1"),
        ],
        check=False,
    )
    sgdd_text = sgdd.stdout + sgdd.stderr
    ctx.check(sgdd.returncode != 0, f"sg_dd fails (exit {sgdd.returncode})")
    ctx.check(
        "data protect" in sgdd_text.lower() and "write protected" in sgdd_text.lower(),
        "sg_dd reports DATA PROTECT / WRITE PROTECTED",
    )

    with ctx.timed("promote"):
        handler.signal(signal.SIGUSR2)
        handler.wait_for(r"every LUN now writable", timeout=60)
    promoted_dd = dd("d", 2)
    ctx.check(promoted_dd == 0, f"promoted: dd passes in the same session (exit {promoted_dd})")
    raw_after = ctx.run(
        ["sg_raw", "-v", "-s", "512", "-i", "/tmp/wp-one.bin", sg, *_write10_cdb(RAW_LBA, 1)],
        check=False,
    )
    ctx.check(raw_after.returncode == 0, f"promoted: sg_raw WRITE(10) passes ({raw_after.stderr})")
    modes_promoted = modes()
    ctx.check("WP=0" in modes_promoted, "promoted: MODE SENSE reports WP=0 again")
    ctx.check(initiator.session_dir(iqn) == session, "the same iSCSI session: no re-login")
    initiator.logout(ctx, iqn, str(PORTAL))
    rc = handler.stop()
    ctx.check(rc == 0, f"the handler stopped cleanly (exit {rc})")

    image = (state / "volumes" / f"{volume}.img").read_bytes()
    k64 = 64 * 1024
    ctx.check(image[:k64] == blocks["a"], "the volume holds the write made as primary")
    ctx.check(image[k64 : 2 * k64] == bytes(k64), "nothing written while secondary reached it")
    ctx.check(image[2 * k64 : 3 * k64] == blocks["d"], "it holds the write made after promotion")
    ctx.check(image[RAW_LBA * 512 : (RAW_LBA + 1) * 512] == blocks["c"][:512], "and sg_raw's")
    ctx.check(image[SAME_LBA * 512 : (SAME_LBA + 8) * 512] == bytes(8 * 512), "no WRITE SAME")
    ctx.check(image[SG_DD_LBA * 512 : (SG_DD_LBA + 1) * 512] == bytes(512), "no sg_dd write")
    return {
        "device": device,
        "sg_device": sg,
        "dd_exit_secondary": dd_exit,
        "dd_exit_promoted": promoted_dd,
        "modes_primary_wp": "WP=1" in modes_primary,
        "modes_secondary_wp": "WP=1" in modes_secondary,
        "modes_promoted_wp": "WP=1" in modes_promoted,
        "sg_raw_sense": raw_sense,
        "sg_raw_output": (raw.stdout + raw.stderr)[-1200:],
        "sg_raw_exit_promoted": raw_after.returncode,
        "sg_write_same_exit": ws.returncode,
        "sg_write_same_output": ws_text[-800:],
        "sg_dd_exit": sgdd.returncode,
        "sg_dd_output": sgdd_text[-800:],
        "sg_inq": inquiry[-1200:],
        "vpd_83": vpd_83[-1200:],
        "same_session": True,
    }


# --- benchmark -----------------------------------------------------------------------------------

# name -> (fio rw, block size, queue depth)
BENCH_JOBS: dict[str, tuple[str, str, int]] = {
    "seq_write": ("write", "1M", 8),
    "seq_read": ("read", "1M", 8),
    "rand4k_write_qd8": ("randwrite", "4k", 8),
    "rand4k_read_qd8": ("randread", "4k", 8),
    "rand4k_write_qd32": ("randwrite", "4k", 32),
    "rand4k_read_qd32": ("randread", "4k", 32),
}


def _fio_bench(
    ctx: GuestContext, device: str, label: str, job: str, runtime: int, ramp: int
) -> dict[str, float]:
    rw, bs, depth = BENCH_JOBS[job]
    proc = ctx.run(
        [
            "fio",
            f"--name={label}-{job}",
            f"--filename={device}",
            f"--rw={rw}",
            f"--bs={bs}",
            f"--iodepth={depth}",
            "--direct=1",
            "--ioengine=libaio",
            "--time_based",
            f"--runtime={runtime}",
            f"--ramp_time={ramp}",
            "--randrepeat=0",
            "--norandommap",
            "--output-format=json",
        ],
        timeout=runtime + ramp + 120,
    )
    (ctx.out / f"fio-{label}-{job}.json").write_text(proc.stdout)  # the last round
    side = _fio_json(proc.stdout)["jobs"][0]["write" if "write" in rw else "read"]
    return {
        "iops": round(float(side["iops"]), 1),
        "mb_s": round(float(side["bw_bytes"]) / 1e6, 2),
        "lat_ms": round(float(side["lat_ns"]["mean"]) / 1e6, 3),
        "ios": int(side["total_ios"]),
        "bytes": int(side["io_bytes"]),
        "ms": int(side["runtime"]),
    }


def _aggregate(runs: list[dict[str, float]]) -> dict[str, float]:
    """Several short fio runs of one job on one LUN as one: total I/O over total time."""
    ms = sum(r["ms"] for r in runs) or 1
    lat = sum(r["lat_ms"] * r["ios"] for r in runs) / max(1, sum(r["ios"] for r in runs))
    return {
        "iops": round(sum(r["ios"] for r in runs) * 1000 / ms, 1),
        "mb_s": round(sum(r["bytes"] for r in runs) / 1000 / ms, 2),
        "lat_ms": round(lat, 3),
    }


def _round_ratios(
    runs: dict[str, dict[str, list[dict[str, float]]]], label: str, base: str
) -> dict[str, list[float | None]]:
    """Per job, each round's IOPS ratio label / base."""
    return {
        job: [
            round(o["iops"] / b["iops"], 3) if b["iops"] else None
            for o, b in zip(per_job, runs[base][job], strict=True)
        ]
        for job, per_job in runs[label].items()
    }


@scenario("datapath_bench", needs=("iscsid",), timeout_s=1200)
def datapath_bench(ctx: GuestContext) -> dict[str, Any]:
    """fio on our LUN and on a kernel fileio LUN in one guest (bench/datapath.py)."""
    quick = param("quick") == "1"
    # The machines are shared: load drifts by 2x within minutes. Each job runs in `rounds`
    # short slices alternating between the two LUNs, and the totals are compared.
    runtime = int(param("runtime") or (3 if quick else 5))
    rounds = int(param("rounds") or (1 if quick else 3))
    ramp = 1
    jobs = [j for j in (param("jobs") or ",".join(BENCH_JOBS)).split(",") if j]
    workers = param("workers") or "4"
    size = 128 * MiB
    state = WORKDIR / "engine-bench"
    memory = param("backend") == "memory"
    # A third LUN served by the same ring and SCSI code from a plain O_DSYNC file, every command
    # on the loop thread, no journal: the fastest any pure-Python TCMU handler goes in this
    # guest, so what the journal costs (ours / plain) and what Python costs (plain / fileio)
    # are measured apart, in the same run.
    plain = param("plain") != "0"
    engine_args = ("--segment-size", "16M", "--journal-size", "96M", "--trim-interval", "1")
    handler = Handler(
        ctx,
        state,
        [f"dpbench:{size}"],
        *(() if memory else engine_args),
        *("--workers", workers, "--log-level", "WARNING"),
        memory=memory,
    )
    ctx.cleanups.callback(handler.cleanup)
    handler.start()
    plain_handler = None
    if plain:
        plain_dir = WORKDIR / "plain-bench"
        plain_dir.mkdir(parents=True, exist_ok=True)
        plain_handler = Handler(
            ctx,
            plain_dir,
            [f"plainbench:{size}"],
            *("--workers", "0", "--log-level", "WARNING"),
            plain_files=True,
            name="plain-handler",
        )
        ctx.cleanups.callback(plain_handler.cleanup)
        plain_handler.start()
    # Both LUNs write through: the fileio LUN opens its file O_DSYNC (write_back=False, WCE=0),
    # ours acknowledges a write once the journal's fdatasync returned. Both files are on the
    # guest's tmpfs, where a sync costs nothing: the ratio measures the data path itself.
    fileio = lio.LunSpec(
        "filebench",
        size,
        kind=lio.BackstoreKind.FILEIO,
        path=str(WORKDIR / "filebench.img"),
        lun=1,
        write_back=False,
    )
    plain_lun = (_user_lun("plainbench", size, lun=2),) if plain else ()
    iqn = _export(ctx, _user_lun("dpbench", size, lun=0), fileio, *plain_lun)
    deadline = time.monotonic() + 90
    for served in (handler, plain_handler):
        while served is not None and not _served_uio(served):
            ctx.check(time.monotonic() < deadline, f"the {served.name} opened its uio device")
            time.sleep(0.2)
    offered = initiator.discover(ctx, str(PORTAL))
    ctx.check(iqn in offered, f"discovery offers {iqn}")
    initiator.login(ctx, iqn, str(PORTAL))
    devices = {
        "ours": initiator.disk_for(ctx, iqn, lun=0),
        "fileio": initiator.disk_for(ctx, iqn, lun=1),
    }
    if plain:
        devices["plain"] = initiator.disk_for(ctx, iqn, lun=2)
    queue_limits = {
        label: {
            name: Path(f"/sys/block/{os.path.basename(dev)}/queue/{name}").read_text().strip()
            for name in ("max_sectors_kb", "max_hw_sectors_kb", "nr_requests")
        }
        for label, dev in devices.items()
    }
    runs: dict[str, dict[str, list[dict[str, float]]]] = {
        label: {job: [] for job in jobs} for label in devices
    }
    profile = param("profile")
    slices = [(job, r) for r in range(rounds) for job in jobs]
    for i, (job, r) in enumerate(slices):
        labels = list(devices)
        order = labels[i % len(labels) :] + labels[: i % len(labels)]  # each goes first in turn
        for label in order:
            spy = None
            if profile and label == "ours" and job == profile and r == 0:
                assert handler.proc is not None
                spy = subprocess.Popen(
                    [
                        *(param("pyspy") or "py-spy", "record", "--pid", str(handler.proc.pid)),
                        *("--duration", str(runtime + ramp), "--rate", "100", "--nonblocking"),
                        *("--format", "raw", "-o", str(ctx.out / f"pyspy-{job}.txt")),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            with ctx.timed(f"fio_{label}_{job}_{r}"):
                run = _fio_bench(ctx, devices[label], label, job, runtime, ramp)
            runs[label][job].append(run)
            if spy is not None:
                spy.wait(timeout=120)
            ctx.log.info("%s %s round %d: %s", label, job, r, run)
    results = {
        label: {job: _aggregate(job_runs) for job, job_runs in per_job.items()}
        for label, per_job in runs.items()
    }
    initiator.logout(ctx, iqn, str(PORTAL))
    handler.stop()
    if plain_handler is not None:
        plain_handler.stop()
    return {
        "quick": quick,
        "runtime_s": runtime,
        "rounds": rounds,
        "ramp_s": ramp,
        # the spread: each round's ratio (ours / fileio, plain / fileio), IOPS
        "round_ratios": _round_ratios(runs, "ours", "fileio"),
        "plain_round_ratios": _round_ratios(runs, "plain", "fileio") if plain else {},
        "workers": int(workers),
        "backend": "memory" if memory else "engine",
        "size": size,
        "hw_max_sectors": HW_MAX_SECTORS,
        "queue_limits": queue_limits,
        "results": results,
        "durability": "all write-through: fileio and plain O_DSYNC (fileio write_back=False), "
        "ours journal fdatasync before the ack; every file on the guest's tmpfs",
        # the handler inherits this environment (lab_crc: software under TCG, see qemu.py)
        "crc32c": "hardware" if crc32c.hardware_based else "software",
    }
