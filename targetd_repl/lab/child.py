"""A scenario's long-lived child process (the controller, the TCMU handler), run the one way the
lab runs them: started in its own session with its output appended to `<name>.log` in the
results, stopped by its PID only (kill -9, or SIGTERM and a bounded wait), and the log of its
current run at hand for the failure messages.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from targetd_repl.lab.errors import ScenarioAssertion

if TYPE_CHECKING:
    from targetd_repl.lab.guest import GuestContext

LOG_TAIL_CHARS = 3000  # how much of the child's log a failure message carries


def cli_prefix() -> list[str]:
    """The venv's `targetd-repl` console script (the guest shares the host's venv)."""
    script = Path(sys.executable).parent / "targetd-repl"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "targetd_repl.cli"]


class ChildProcess:
    """One command run as our child, restartable. Each start appends a header line and the new
    process's output to `<name>.log` in the results; `output()` is what the current process has
    written so far. Subclasses add how to tell that it is ready."""

    def __init__(
        self,
        ctx: GuestContext,
        name: str,
        cmd: list[str],
        *,
        cleanup_timeout: float,
        env: dict[str, str] | None = None,
    ) -> None:
        """`env`: variables added to this process's environment at each start (None: the child
        inherits it unchanged); `cleanup_timeout`: how long `cleanup` waits after SIGTERM."""
        self.ctx = ctx
        self.name = name
        self.cmd = cmd
        self.env = env
        self.cleanup_timeout = cleanup_timeout
        self.log_path = ctx.out / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self._mark = 0  # offset in the log where the current process's lines start

    def spawn(self) -> subprocess.Popen[bytes]:
        """Start the command (it does not wait for anything); returns the new process."""
        self.starts += 1
        with self.log_path.open("ab") as log:
            log.write(f"--- {self.name} start {self.starts}: {' '.join(self.cmd)}\n".encode())
            self._mark = log.tell()
            self.proc = subprocess.Popen(
                self.cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env=None if self.env is None else {**os.environ, **self.env},
            )
        self.ctx.log.info("%s started, pid %d", self.name, self.proc.pid)
        return self.proc

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def output(self) -> str:
        """What the current process has logged so far."""
        with self.log_path.open("rb") as f:
            f.seek(self._mark)
            return f.read().decode(errors="replace")

    def log_tail(self) -> str:
        """The end of the current process's log, for a failure message."""
        return self.output()[-LOG_TAIL_CHARS:]

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()  # SIGKILL, by PID
        self.proc.wait(timeout=30)
        self.ctx.log.info("%s pid %d killed with -9", self.name, self.proc.pid)

    def sigterm_and_wait(self, timeout: float, refused: str) -> int:
        """SIGTERM, then wait up to `timeout` s for the exit status. Past it: kill -9 and raise
        ScenarioAssertion(`refused`)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)
            raise ScenarioAssertion(refused) from None

    def cleanup(self) -> None:
        """For the scenario's cleanup stack: if it still runs, log every iSCSI session out first
        (a session with commands on a ring nobody serves waits for them), then SIGTERM it."""
        with contextlib.suppress(Exception):
            if self.running():
                self.ctx.run(["iscsiadm", "-m", "node", "--logoutall=all"], check=False)
                self.sigterm_and_wait(
                    self.cleanup_timeout,
                    f"the {self.name} did not stop within {self.cleanup_timeout} s",
                )
