"""WriteBarrier: writers share it, a closer waits for those inside and holds new ones out."""

from __future__ import annotations

import threading
import time

from targetd_repl.storage.barrier import WriteBarrier


def _started(target: object) -> threading.Thread:
    thread = threading.Thread(target=target, daemon=True)  # type: ignore[arg-type]
    thread.start()
    return thread


def test_a_closer_waits_for_writers_inside_and_new_writers_wait_for_it() -> None:
    barrier = WriteBarrier()
    events: list[str] = []
    inside = threading.Event()
    leave = threading.Event()

    def writer() -> None:
        with barrier.writer():
            events.append("writer in")
            inside.set()
            leave.wait(5)
            events.append("writer out")

    def closer() -> None:
        with barrier.closed():
            events.append("closed")
            time.sleep(0.05)
            events.append("reopened")

    def late_writer() -> None:
        with barrier.writer():
            events.append("late writer in")

    first = _started(writer)
    assert inside.wait(5)
    closing = _started(closer)
    time.sleep(0.05)  # the closer is waiting for the writer inside
    assert events == ["writer in"]
    late = _started(late_writer)
    time.sleep(0.05)  # a waiting closer goes first: the late writer queues behind it
    assert events == ["writer in"]
    leave.set()
    for thread in (first, closing, late):
        thread.join(5)
        assert not thread.is_alive()
    assert events == ["writer in", "writer out", "closed", "reopened", "late writer in"]


def test_many_writers_share_the_barrier_and_nest_across_threads() -> None:
    barrier = WriteBarrier()
    inside = threading.Barrier(3, timeout=5)

    def writer() -> None:
        with barrier.writer():
            inside.wait()  # all three are inside at once

    threads = [_started(writer) for _ in range(3)]
    for thread in threads:
        thread.join(5)
        assert not thread.is_alive()
    with barrier.closed():  # nobody left inside
        pass


def test_a_writer_that_raises_still_leaves() -> None:
    barrier = WriteBarrier()
    try:
        with barrier.writer():
            raise ValueError("boom")
    except ValueError:
        pass
    closed = threading.Event()

    def closer() -> None:
        with barrier.closed():
            closed.set()

    thread = _started(closer)
    thread.join(5)
    assert closed.is_set()  # the writer that raised is not counted inside any more
