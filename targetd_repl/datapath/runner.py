"""The loop that serves one TCMU ring: wait for the doorbell, drain new entries, dispatch each
command, complete, kick.

Commands that touch the backend run on a small worker pool, so a write that waits (a sync-mode
write waiting for the peer's acknowledgement, a flush) does not hold up reads queued behind it;
they complete out of order and the ring publishes them in ring order (see ring.py). Commands
answered from memory (INQUIRY, MODE SENSE, ...) run on the loop thread, and so do READs
(`inline_reads`, the default): a read never waits for the peer, and handing it to a worker
costs two thread switches, more than the read itself (measured on the lab's real kernel). Every
command the loop answers in one pass is published with one kick (`Ring.complete_many`: one lock
round, one cmd_tail store).

WRITE batches (`batch_writes`, with a backend that implements `SupportsWriteBatch`: the engine):
the plain WRITEs of one poll go to the backend together - one journal append, one pwritev, one
fdatasync for all of them, then the volume writes in ring order - as ONE hand-off to the one
writer thread, which also merges every batch that queued while it was busy (or on the loop
thread with `workers=0`). Their completions are published only after the batch
call returned, i.e. after every write of it is durable in the journal and applied.

Kicks from the workers are coalesced: a completion that finds a kick under way asks that kick
to go once more instead of making its own write() to the uio device (each kick is a system call
in which the kernel reaps every completed entry up to cmd_tail, so one covers many).

Restart safety: a runner starts at the ring's current cmd_tail, so entries a dead process left
between cmd_tail and cmd_head are served first; the ring never moves cmd_tail over an entry
before its response is written.
"""

from __future__ import annotations

import logging
import queue
import threading

from targetd_repl.datapath.cdb import BATCH_WRITE_OPCODES, READ_OPCODES
from targetd_repl.datapath.ring import Command, Ring, RingError
from targetd_repl.datapath.scsi import BACKEND_OPCODES, ScsiDevice
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
        inline_reads: bool = True,
        batch_writes: bool = True,
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
        # WRITE batches go to one writer thread, which merges every batch queued meanwhile
        # into one (see _write_loop); None stops it.
        self._writes: queue.SimpleQueue[list[Command] | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._inflight = 0
        # A plain lock for the counters (taken twice per worker command); the condition on it
        # only matters to wait_idle().
        self._counts = threading.Lock()
        self._idle = threading.Condition(self._counts)
        self._idle_waiters = 0  # threads in wait_idle(): only they need a notify
        # With batch_writes (and a backend that batches), the plain WRITEs of one poll go to
        # the backend together: one journal append and one fdatasync for all of them.
        self._batch_writes = batch_writes and device.batches_writes
        # How step() sorts a command, by opcode: to the writer as part of the poll's batch, to
        # the worker pool, or (every other opcode) answered on the loop thread; with
        # inline_reads, READs too (see the module docstring).
        self._batch_opcodes = BATCH_WRITE_OPCODES if self._batch_writes else frozenset()
        worker_opcodes = BACKEND_OPCODES - self._batch_opcodes if workers else frozenset()
        self._worker_opcodes = worker_opcodes - READ_OPCODES if inline_reads else worker_opcodes
        self._kick_lock = threading.Lock()
        self._kicking = False
        self._kick_again = False

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError(f"runner {self.name} already started")
        for i in range(self.workers):
            t = threading.Thread(target=self._work, name=f"{self.name}-w{i}", daemon=True)
            t.start()
            self._pool.append(t)
        if self.workers and self._batch_writes:
            self._writer = threading.Thread(
                target=self._write_loop, name=f"{self.name}-writer", daemon=True
            )
            self._writer.start()
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
        writer = self._writer
        if writer is not None:
            self._writes.put(None)
        if drained:
            for t in self._pool:
                t.join(timeout)
            if writer is not None:
                writer.join(timeout)
        else:
            log.warning("%s: stopped with %d command(s) still running", self.name, self._inflight)
        self._writer = None
        self._pool.clear()
        self.ring.close()
        return drained

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no dispatched command is still running."""
        with self._idle:
            self._idle_waiters += 1
            try:
                return self._idle.wait_for(lambda: self._inflight == 0, timeout)
            finally:
                self._idle_waiters -= 1

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- the loop ----------------------------------------------------------------------------------

    def _loop(self) -> None:
        log.info("%s: serving (cmd_tail=%d cmd_head=%d)", self.name, self.ring.tail, self.ring.head)
        step = self.step
        stopping = self._stop.is_set
        try:
            while not stopping():
                # Drain what the kernel queued meanwhile, then sleep until it signals again.
                if not step():
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
            batch_opcodes = self._batch_opcodes
            worker_opcodes = self._worker_opcodes
            writes: list[Command] = []
            inline: list[Command] = []
            for cmd in commands:
                opcode = cmd.cdb[0]
                if opcode in batch_opcodes:
                    writes.append(cmd)  # all of this poll's WRITEs: one journal commit, below
                elif opcode in worker_opcodes:
                    with self._counts:
                        self._inflight += 1
                    self._queue.put(cmd)
                else:
                    inline.append(cmd)
            if writes and self.workers:
                # One hand-off for the whole batch, and before the inline commands run: the
                # worker's journal write and fdatasync (GIL released) overlap with them.
                with self._counts:
                    self._inflight += len(writes)
                self._writes.put(writes)
            if inline:
                # Answered on this thread; published together, with one kick below.
                answered = self.device.execute_all(inline)
                try:
                    moved = self.ring.complete_many(answered) or moved
                except Exception:
                    log.exception("%s: completing %d commands failed", self.name, len(answered))
                self.completed += len(answered)
            if writes and not self.workers:
                moved = self._run_writes(writes) or moved
                self.completed += len(writes)
        if moved:
            self._kick_coalesced()
        return len(commands)

    def _run_writes(self, writes: list[Command]) -> bool:
        """Execute a batch of WRITEs (one journal group commit) and complete each; True when
        cmd_tail moved. Completions are published only after execute_writes returned: every
        write of the batch is durable (journal fdatasync'ed) and applied by then."""
        try:
            results = self.device.execute_writes([(cmd.cdb, cmd.iovecs) for cmd in writes])
        except Exception:  # execute_writes never raises; a bug: leave the entries unanswered
            log.exception("%s: a batch of %d writes failed", self.name, len(writes))
            return False
        try:
            # Ordering point: execute_writes returned, so each record is durable (fdatasync
            # returned) and applied; only now are the completions published.
            return self.ring.complete_many(
                [
                    (cmd, result.status, result.sense, result.data_in)
                    for cmd, result in zip(writes, results, strict=True)
                ]
            )
        except Exception:
            log.exception("%s: completing %d writes failed", self.name, len(writes))
            return False

    def _work(self) -> None:
        execute = self.device.execute
        complete = self.ring.complete
        while True:
            item = self._queue.get()
            if item is None:
                return
            try:
                result = execute(item.cdb, item.iovecs)
                if complete(item, result.status, result.sense, result.data_in):
                    self._kick_coalesced()
            except Exception:  # a bug in the ring or doorbell; the command stays unanswered
                log.exception("%s: completing %r failed", self.name, item)
            finally:
                self._finished(1)

    def _write_loop(self) -> None:
        """The writer thread: run WRITE batches in queue (= ring) order. Every batch queued
        while the previous one was being written joins the next one, so a loop that polls
        often still feeds the journal big group commits, at one thread hand-off per commit."""
        stop = False
        writes = self._writes
        while not stop:
            first = writes.get()
            if first is None:
                return
            batch = list(first)
            # Merge what queued meanwhile, keeping queue order (ring order). This thread is the
            # only consumer: a queue that is not empty has an item for get_nowait.
            while not writes.empty():
                more = writes.get_nowait()
                if more is None:
                    stop = True  # finish what was queued before the stop, then leave
                    break
                batch.extend(more)
            try:
                if self._run_writes(batch):
                    self._kick_coalesced()
            finally:
                self._finished(len(batch))

    def _finished(self, count: int) -> None:
        with self._counts:
            self._inflight -= count
            self.completed += count
            if self._inflight == 0 and self._idle_waiters:
                self._idle.notify_all()

    def _kick_coalesced(self) -> None:
        """Kick for a completion that moved cmd_tail. If another thread is kicking, ask it to
        kick once more (its kick may have read cmd_tail before our move) and return."""
        with self._kick_lock:
            if self._kicking:
                self._kick_again = True
                return
            self._kicking = True
        while True:
            try:
                self.doorbell.kick()
            except DeviceGone as exc:
                self.failed = exc
                self._stop.set()
                log.error("%s: kick failed: %s", self.name, exc)
            with self._kick_lock:
                if not self._kick_again:
                    self._kicking = False
                    return
                self._kick_again = False
