"""The lab's shared guest-side helpers, on the host: `lab.data` (hashes, file ranges, O_DIRECT
reads) and `lab.child` (a scenario's child process: start, log, kill -9, SIGTERM, cleanup)."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import pytest

from targetd_repl.lab import child, data
from targetd_repl.lab.errors import ScenarioAssertion

if TYPE_CHECKING:
    from targetd_repl.lab.guest import GuestContext

MiB = 1 << 20


# --- data ----------------------------------------------------------------------------------------


def test_sha256_of_any_buffer() -> None:
    blob = os.urandom(1000)
    want = hashlib.sha256(blob).hexdigest()
    assert data.sha256(blob) == data.sha256(bytearray(blob)) == data.sha256(memoryview(blob))
    assert data.sha256(blob) == want


def test_sha256_file_and_read_range(tmp_path: Path) -> None:
    blob = os.urandom(3 * MiB + 123)
    path = tmp_path / "blob.bin"
    path.write_bytes(blob)
    assert data.sha256_file(path) == data.sha256_file(str(path)) == hashlib.sha256(blob).hexdigest()
    assert data.read_range(path, MiB, 4096) == blob[MiB : MiB + 4096]
    assert data.read_range(str(path), len(blob) - 10, 100) == blob[-10:]  # stops at the end


@pytest.fixture
def direct_file(tmp_path: Path) -> tuple[Path, bytes]:
    """A file whose file system takes O_DIRECT (tmpfs does not: skip there)."""
    blob = os.urandom(2 * MiB + 8192)
    path = tmp_path / "disk.img"
    path.write_bytes(blob)
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            pytest.skip("the temporary directory's file system refuses O_DIRECT")
        raise
    return path, blob


def test_read_direct(direct_file: tuple[Path, bytes]) -> None:
    path, blob = direct_file
    assert data.read_direct(str(path), 4096, 3 * 4096) == blob[4096 : 4 * 4096]
    assert data.read_direct(str(path), 0, len(blob)) == blob
    with pytest.raises(ScenarioAssertion, match="short O_DIRECT read"):
        data.read_direct(str(path), len(blob) - 4096, 2 * 4096)


def test_sha256_direct_reads_to_the_end(direct_file: tuple[Path, bytes]) -> None:
    path, blob = direct_file
    assert data.sha256_direct(str(path)) == (hashlib.sha256(blob).hexdigest(), len(blob))


def test_writes_done_reads_field_5_of_the_block_stat() -> None:
    names = (
        sorted(p.name for p in Path("/sys/block").glob("*")) if Path("/sys/block").is_dir() else []
    )
    if not names:
        pytest.skip("no block devices in /sys/block")
    stat = Path(f"/sys/block/{names[0]}/stat").read_text().split()
    assert data.writes_done(f"/dev/{names[0]}") == int(stat[4])


# --- child ---------------------------------------------------------------------------------------


class FakeContext:
    """What ChildProcess uses of GuestContext: the results directory, the log, `run`."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.log = logging.getLogger("test_lab_helpers")
        self.ran: list[list[str]] = []

    def run(self, cmd: Sequence[str], **_: Any) -> subprocess.CompletedProcess[str]:
        self.ran.append(list(cmd))
        return subprocess.CompletedProcess(list(cmd), 0, "", "")


def _python(code: str) -> list[str]:
    return [sys.executable, "-u", "-c", code]


def _child(tmp_path: Path, code: str, **kw: Any) -> tuple[child.ChildProcess, FakeContext]:
    ctx = FakeContext(tmp_path)
    proc = child.ChildProcess(
        cast("GuestContext", ctx), "thing", _python(code), cleanup_timeout=10, **kw
    )
    return proc, ctx


def _wait_output(proc: child.ChildProcess, text: str, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while text not in (out := proc.output()):
        assert time.monotonic() < deadline, f"no {text!r} in {out!r}"
        time.sleep(0.02)
    return out


SLEEPER = "import os, time; print('up', os.environ.get('LAB_EXTRA')); time.sleep(60)"


def test_child_logs_each_start_and_dies_by_kill9(tmp_path: Path) -> None:
    proc, _ = _child(tmp_path, SLEEPER)
    assert not proc.running()
    first = proc.spawn()
    assert proc.running() and proc.starts == 1
    assert _wait_output(proc, "up") == "up None\n"
    proc.kill9()
    assert first.returncode == -9 and not proc.running()
    proc.spawn()
    assert proc.starts == 2 and proc.proc is not first
    assert _wait_output(proc, "up") == "up None\n"  # the current process's lines only
    assert proc.sigterm_and_wait(30, "unused") == -15
    log = (tmp_path / "thing.log").read_text()
    assert log.count("--- thing start ") == 2
    assert f"--- thing start 2: {' '.join(proc.cmd)}\n" in log


def test_child_env_adds_to_the_environment(tmp_path: Path) -> None:
    proc, _ = _child(tmp_path, SLEEPER, env={"LAB_EXTRA": "yes"})
    proc.spawn()
    assert _wait_output(proc, "up") == "up yes\n"
    proc.kill9()


def test_child_ignoring_sigterm_is_killed_and_reported(tmp_path: Path) -> None:
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up'); "
    proc, _ = _child(tmp_path, code + "time.sleep(60)")
    proc.spawn()
    _wait_output(proc, "up")
    with pytest.raises(ScenarioAssertion, match=r"^it ignored SIGTERM$"):
        proc.sigterm_and_wait(0.5, "it ignored SIGTERM")
    assert proc.proc is not None and proc.proc.returncode == -9


def test_child_log_tail_is_the_end_of_the_output(tmp_path: Path) -> None:
    proc, _ = _child(tmp_path, "print('x' * 5000, end=''); print('END')")
    proc.spawn()
    assert proc.proc is not None and proc.proc.wait(timeout=30) == 0
    tail = proc.log_tail()
    assert len(tail) == child.LOG_TAIL_CHARS and tail.endswith("xEND\n")


def test_child_cleanup_logs_out_then_stops_a_running_child(tmp_path: Path) -> None:
    proc, ctx = _child(tmp_path, SLEEPER)
    proc.cleanup()  # never started: nothing to do
    assert ctx.ran == []
    proc.spawn()
    _wait_output(proc, "up")
    proc.cleanup()
    assert ctx.ran == [["iscsiadm", "-m", "node", "--logoutall=all"]]
    assert not proc.running()
    proc.cleanup()  # stopped: nothing more
    assert len(ctx.ran) == 1


def test_cli_prefix_runs_the_cli() -> None:
    prefix = child.cli_prefix()
    assert prefix[-1].endswith("targetd-repl") or prefix[-2:] == ["-m", "targetd_repl.cli"]
