"""`make demo`: the whole story, in three parts, each on real parts.

1. The storage engine of one site: a consistency group of two volumes, writes journaled with
   group commit, an instant snapshot, a writer killed with SIGKILL mid-stream and every
   acknowledged write found again after the restart, a rollback to the snapshot.
2. Two controller processes on loopback driven by the CLI (demo_pair): an async pair, an
   unplanned failover, the fenced return and failback, a switchover; images compared.
3. The real kernel (demo_lab): two QEMU guests, one per site, each with its controller, its LIO
   target and an open-iscsi initiator; ext4 on the primary's LUN, the primary killed, failover,
   writes on the new primary, failback, switchover home, both LUNs read whole and compared.

`--no-lab` stops after part 2 (a machine without QEMU).
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

from targetd_repl import demo_lab, demo_pair
from targetd_repl.storage.engine import StorageEngine

MIB = 1 << 20
BS = 4096

WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from targetd_repl.demo import demo_writes
    from targetd_repl.storage.engine import StorageEngine
    engine = StorageEngine.open(Path(sys.argv[1]), site="site-a")
    print("ready", flush=True)
    for volume, lba, data in demo_writes():
        seq = engine.write(volume, lba, data)
        print(seq, flush=True)  # printed only once acknowledged
    """
)


def demo_writes() -> Iterator[tuple[str, int, bytes]]:
    """The killed writer's deterministic stream, so the parent can rebuild what it wrote."""
    rng = random.Random(42)
    while True:
        yield rng.choice(["db", "logs"]), rng.randrange(0, 4096 - 16), rng.randbytes(16 * BS)


def step(title: str) -> float:
    print(f"\n== {title}")
    return time.monotonic()


def done(started: float, what: str) -> None:
    print(f"   {what} ({(time.monotonic() - started) * 1000:.0f} ms)")


def main(argv: list[str] | None = None) -> int:
    with_lab = "--no-lab" not in (sys.argv[1:] if argv is None else argv)
    state = Path(tempfile.mkdtemp(prefix="targetd-repl-demo-"))
    print(f"targetd_repl demo — site state directory: {state}")

    t = step("create a consistency group 'app' with two 64 MiB volumes (sparse files)")
    engine = StorageEngine.open(state, site="site-a")
    engine.create_group("app")
    engine.create_volume("db", 64 * MIB, block_size=BS, group="app")
    engine.create_volume("logs", 64 * MIB, block_size=BS, group="app")
    done(t, f"{len(engine.list_volumes())} volumes in group 'app'")

    t = step("write 8 MiB through the journaled write path, then snapshot 'db'")
    for i in range(128):
        engine.write("db", i * 16, bytes([i % 251 + 1]) * (16 * BS))
    before = hashlib.sha256(engine.read("db", 0, 4096)).hexdigest()
    snap = engine.create_snapshot("db", "before-batch")
    done(t, f"snapshot {snap.name!r} holds the image up to journal seq {snap.seq}")

    t = step("a second process writes to both volumes and is killed with SIGKILL")
    engine.close()
    child = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(state)], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    child.stdout.readline()
    kill_after = random.randrange(200, 600)
    acked = 0
    for _line in child.stdout:
        acked += 1
        if acked == kill_after:
            break
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    done(t, f"killed after at least {acked} acknowledged writes")

    t = step("restart: the journal is recovered; the volumes hold exactly its writes, in order")
    engine = StorageEngine.open(state, site="site-a")
    store = engine.group("app")
    journaled = store.applied_seq - snap.seq  # the writer's records, all replayed in order
    snapshot_image = engine.read_snapshot("db", snap.name, 0, 4096)
    model = {"db": bytearray(snapshot_image), "logs": bytearray(4096 * BS)}
    for _, (volume, lba, data) in zip(range(journaled), demo_writes(), strict=False):
        model[volume][lba * BS : lba * BS + len(data)] = data
    intact = all(engine.read(v, 0, 4096) == bytes(image) for v, image in model.items())
    done(
        t,
        f"{journaled} writes in the journal (>= {acked} acknowledged: "
        f"{journaled >= acked}); both volumes equal them replayed in order: {intact}",
    )
    ok = (
        intact
        and acked > 0
        and journaled >= acked
        and hashlib.sha256(snapshot_image).hexdigest() == before
    )

    t = step("roll 'db' back to the snapshot")
    regions = engine.rollback_snapshot("db", "before-batch")
    after = hashlib.sha256(engine.read("db", 0, 4096)).hexdigest()
    done(t, f"{regions} regions restored; image equals the snapshot: {after == before}")
    engine.close()

    shutil.rmtree(state)

    print("\n# Two controller processes on loopback, driven by the CLI")
    pair_root = Path(tempfile.mkdtemp(prefix="targetd-repl-demo-pair-"))
    paired = demo_pair.run(pair_root, step, done)
    shutil.rmtree(pair_root, ignore_errors=True)

    in_lab = True
    if with_lab:
        print("\n# The real kernel: LIO, our TCMU handler, open-iscsi on each site (QEMU lab)")
        in_lab = demo_lab.run(step, done)
    passed = ok and after == before and paired and in_lab
    print(f"\ndemo {'passed' if passed else 'FAILED'}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
