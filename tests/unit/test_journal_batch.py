"""Journal.append_batch, the data path's group commit: the checks append makes, large payloads
(their CRC computed without the GIL), and no waiting to gather when nobody else appends."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from targetd_repl.errors import InvalidArgument
from targetd_repl.model import RecordKind
from targetd_repl.storage import journal as journal_module
from targetd_repl.storage.journal import Journal

GROUP = 7
WRITE = RecordKind.WRITE
ZERO = RecordKind.ZERO


def data(tag: int, size: int) -> bytes:
    return (tag.to_bytes(8, "little") * (size // 8 + 1))[:size]


@pytest.mark.parametrize(
    ("item", "epoch", "message"),
    [
        ((99, 1, 0, b"", 0), 1, "unknown journal record kind"),
        ((WRITE, 1, 0, b"abc", 4), 1, "needs 4 bytes of data, got 3"),
        ((ZERO, 1, 0, b"abc", 3), 1, "needs 0 bytes"),
        ((WRITE, 1 << 32, 0, b"a", 1), 1, "volume id"),
        ((WRITE, 1, -1, b"a", 1), 1, "lba"),
        ((WRITE, 1, 1 << 64, b"a", 1), 1, "lba"),
        ((WRITE, 1, 0, b"a", 1), -1, "epoch"),
    ],
)
def test_append_batch_refuses_what_append_refuses_and_appends_nothing(
    tmp_path: Path, item: tuple[object, ...], epoch: int, message: str
) -> None:
    with Journal.open(tmp_path / "j", group_id=GROUP, size_limit=1 << 30) as journal:
        good = (WRITE, 1, 0, b"x" * 512, 512)
        with pytest.raises(InvalidArgument, match=message):
            journal.append_batch([good, item], epoch=epoch)  # type: ignore[list-item]
        assert journal.next_seq == 1 and journal.used_bytes == 0


def test_batches_of_large_and_small_payloads_read_back_and_survive_a_reopen(
    tmp_path: Path,
) -> None:
    big = journal_module._GIL_FREE_CRC  # from here on the CRC runs without the GIL
    sizes = [512, big, 4096, 4 * big + 512, big - 512]
    items = [(WRITE, 3, 100 * i, data(i, size), size) for i, size in enumerate(sizes)]
    items.append((ZERO, 3, 5000, b"", 8192))
    with Journal.open(tmp_path / "j", group_id=GROUP, size_limit=1 << 30) as journal:
        assert journal.append_batch(items, epoch=2) == len(items)
    with Journal.open(tmp_path / "j", group_id=GROUP, size_limit=1 << 30) as journal:
        records = list(journal.read_from(1))
        assert journal.durable_seq == len(items)
    assert [(r.kind, r.lba, r.length, bytes(r.data)) for r in records] == [
        (kind, lba, length, bytes(payload)) for kind, _, lba, payload, length in items
    ]
    for record in records:
        record.data_crc()  # verifies the stored CRC32C (raises JournalCorrupt otherwise)


def test_crc_of_a_large_payload_lets_other_threads_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The GIL release mode crc32c gets: on for payloads from _GIL_FREE_CRC bytes, off below."""
    modes: list[tuple[int, int]] = []
    real = journal_module.crc32c.crc32c

    def spy(buf: bytes | memoryview, value: int = 0, gil_release_mode: int = -1) -> int:
        modes.append((len(buf), int(gil_release_mode)))
        return int(real(buf, value, gil_release_mode))

    monkeypatch.setattr(journal_module.crc32c, "crc32c", spy)
    big = journal_module._GIL_FREE_CRC
    with Journal.open(tmp_path / "j", group_id=GROUP, size_limit=1 << 30) as journal:
        journal.append_batch(
            [(WRITE, 1, 0, data(1, big), big), (WRITE, 1, 0, data(2, 4096), 4096)], epoch=1
        )
        journal.append(WRITE, 1, 0, data(3, 2 * big), epoch=1)
    payload_modes = [mode for size, mode in modes if size >= 4096]
    assert payload_modes == [1, 0, 1]


def test_a_lone_batch_appender_does_not_wait_to_gather(tmp_path: Path) -> None:
    """The data path's writer thread appends whole batches, one at a time: a sync that woke
    nobody else has nobody coming back, so a smaller batch after a larger one is synced at once
    instead of waiting up to group_commit_wait for records that cannot come."""
    with Journal.open(
        tmp_path / "j", group_id=GROUP, size_limit=1 << 30, group_commit_wait=4.0
    ) as journal:
        journal.append_batch([(WRITE, 1, i, data(i, 512), 512) for i in range(16)], epoch=1)
        syncs = journal.fsync_count
        t0 = time.monotonic()
        for n in (8, 4, 1):
            journal.append_batch([(WRITE, 1, i, data(i, 512), 512) for i in range(n)], epoch=1)
        assert time.monotonic() - t0 < 1.0  # the gather's quiet timeout alone would be 1 s
        assert journal.fsync_count == syncs + 3


def test_appenders_a_sync_woke_still_share_the_next_one(tmp_path: Path) -> None:
    """Many single-record appenders: each sync wakes several of them, so the syncer still
    gathers their next records into one fdatasync."""
    writers, per_writer = 16, 25
    with Journal.open(
        tmp_path / "j", group_id=GROUP, size_limit=1 << 30, group_commit_wait=0.005
    ) as journal:
        gate = threading.Barrier(writers)

        def writer(index: int) -> None:
            gate.wait()
            for n in range(per_writer):
                journal.append(WRITE, index, n, data(index * 100 + n, 512), epoch=1)

        threads = [threading.Thread(target=writer, args=(i,)) for i in range(writers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert journal.durable_seq == writers * per_writer
        assert journal.fsync_count < writers * per_writer // 2
