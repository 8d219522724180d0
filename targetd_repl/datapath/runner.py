"""The loop that serves one TCMU ring: wait for the doorbell, drain new entries, dispatch each
command, complete, kick.

Commands that touch the backend run on a small worker pool, so a write that waits (a sync-mode
write waiting for the peer's acknowledgement, a flush) does not hold up reads queued behind it;
they complete out of order and the ring publishes them in ring order (see ring.py). Commands
answered from memory (INQUIRY, MODE SENSE, ...) run on the loop thread.

Restart safety: a runner starts at the ring's current cmd_tail, so entries a dead process left
between cmd_tail and cmd_head are served first; the ring never moves cmd_tail over an entry
before its response is written.
"""

from __future__ import annotations

import logging
import queue
import threading

from targetd_repl.datapath.ring import Command, Ring, RingError
from targetd_repl.datapath.scsi import ScsiDevice, needs_worker
from targetd_repl.datapath.uio import DeviceGone, Doorbell

log = logging.getLogger(__name__)


class Runner:
    """Serves one ring with one SCSI device. `workers=0` runs every command on the loop thread
    (deterministic; used by some tests and as a benchmark baseline)."""

    def __init__(
        self,
        ring: Ring,
        doorbell: Doorbell,
        device: ScsiDevice,
        *,
        workers: int = 4,
        name: str = "tcmu",
        idle_timeout: float = 1.0,
    ) -> None:
        self.ring = ring
        self.doorbell = doorbell
        self.device = device
        self.name = name
        self.idle_timeout = idle_timeout
        self.workers = workers
        self.failed: BaseException | None = None
        self.dispatched = 0
        self.completed = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._queue: queue.SimpleQueue[Command | None] = queue.SimpleQueue()
        self._pool: list[threading.Thread] = []
        self._inflight = 0
        self._idle = threading.Condition()

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError(f"runner {self.name} already started")
        for i in range(self.workers):
            t = threading.Thread(target=self._work, name=f"{self.name}-w{i}", daemon=True)
            t.start()
            self._pool.append(t)
        self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop taking new entries, let in-flight commands finish (up to `timeout`), close the
        ring. Returns False when some command was still running: its entry stays in the ring,
        unanswered, for the next handler."""
        self._stop.set()
        self.doorbell.interrupt()
        if self._thread is not None:
            self._thread.join(timeout)
        drained = self.wait_idle(timeout)
        for _ in self._pool:
            self._queue.put(None)
        if drained:
            for t in self._pool:
                t.join(timeout)
        else:
            log.warning("%s: stopped with %d command(s) still running", self.name, self._inflight)
        self._pool.clear()
        self.ring.close()
        return drained

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no dispatched command is still running."""
        with self._idle:
            return self._idle.wait_for(lambda: self._inflight == 0, timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- the loop ----------------------------------------------------------------------------------

    def _loop(self) -> None:
        log.info("%s: serving (cmd_tail=%d cmd_head=%d)", self.name, self.ring.tail, self.ring.head)
        try:
            while not self._stop.is_set():
                if not self.step():
                    self.doorbell.wait(self.idle_timeout)
        except (RingError, DeviceGone) as exc:
            self.failed = exc
            log.error("%s: stopped serving: %s", self.name, exc)
        except BaseException as exc:
            self.failed = exc
            log.exception("%s: loop failed", self.name)

    def step(self) -> int:
        """Poll the ring once and dispatch what is new. Returns the number of commands."""
        commands, moved = self.ring.poll()
        if commands:
            self.dispatched += len(commands)
            execute = self.device.execute
            complete = self.ring.complete
            for cmd in commands:
                if self.workers and needs_worker(cmd.cdb[0]):
                    with self._idle:
                        self._inflight += 1
                    self._queue.put(cmd)
                    continue
                try:  # answered on this thread: one kick for all of them below
                    result = execute(cmd.cdb, cmd.iovecs)
                    moved = complete(cmd, result.status, result.sense, result.data_in) or moved
                except Exception:
                    log.exception("%s: completing %r failed", self.name, cmd)
                self.completed += 1
        if moved:
            self._kick()
        return len(commands)

    def _work(self) -> None:
        execute = self.device.execute
        complete = self.ring.complete
        while True:
            cmd = self._queue.get()
            if cmd is None:
                return
            try:
                result = execute(cmd.cdb, cmd.iovecs)
                if complete(cmd, result.status, result.sense, result.data_in):
                    self._kick()
            except Exception:  # a bug in the ring or doorbell; the command stays unanswered
                log.exception("%s: completing %r failed", self.name, cmd)
            finally:
                with self._idle:
                    self._inflight -= 1
                    self.completed += 1
                    if self._inflight == 0:
                        self._idle.notify_all()

    def _kick(self) -> None:
        try:
            self.doorbell.kick()
        except DeviceGone as exc:
            self.failed = exc
            self._stop.set()
            log.error("%s: kick failed: %s", self.name, exc)
