"""The storage boundary of the data path: what the SCSI emulation needs from a volume.

Like tcmu-runner's `struct tcmur_handler`, a backend is a handful of operations on logical blocks.
The storage engine implements it over a Volume (journal first, then the image); tests and the lab
use `MemoryBackend` or `FileBackend`. The SCSI layer is the only caller.

Contract
--------
* `block_size` is fixed for the backend's life; `writable` and `identity` are read for every
  command (a promotion takes effect on the next command). `num_blocks` is cached by the SCSI layer
  and read again when a command reaches past the cached end, so a grow takes effect at once; after
  a shrink the backend's own range check (`OutOfRange`) answers for the blocks that went away.
* `buffers` are memoryviews into the TCMU data area (zero copy): `readinto` fills exactly
  `sum(len(b))` bytes, `write` stores exactly that many; the total is always a positive multiple
  of `block_size`, the individual buffers need not be (use `os.preadv`/`os.pwritev`).
* `write` and `write_zeros` return only once the change is durable (in the journal): the SCSI
  layer reports no volatile write cache (WCE = 0), so the initiator never sends a flush to make
  an acknowledged write safe. `write_zeros` leaves the range reading as zeros (UNMAP, WRITE SAME
  of zeros: the engine may punch holes or journal a ZERO record).
* Errors are typed: `targetd_repl.errors.OutOfRange` (LBA OUT OF RANGE), `WriteProtected`
  (DATA PROTECT / WRITE PROTECTED: the group turned secondary under the command), `OSError`
  (MEDIUM ERROR; ENOSPC becomes DATA PROTECT / SPACE ALLOCATION FAILED); anything else becomes
  HARDWARE ERROR / INTERNAL TARGET FAILURE with a log line. The SCSI layer checks ranges and
  `writable` before calling, so these are races and real failures, not the normal path.
* Calls come from several worker threads at once. Atomicity between overlapping SCSI commands
  of this LUN (COMPARE AND WRITE against WRITE) is the SCSI layer's job (a range lock per LUN);
  the backend only needs each call to be safe against concurrent calls.
* A backend that can write several commands at once cheaper than one by one (the engine: one
  journal group commit for the writes of one ring poll) also implements `SupportsWriteBatch`;
  the runner then hands it every plain WRITE of a poll together.
* A backend that can compare-and-write atomically itself (the storage engine's group store can,
  against every writer of the volume, not just this LUN) also implements
  `SupportsCompareAndWrite`; the SCSI layer then uses it for COMPARE AND WRITE instead of
  read + compare + write.
* In production each buffer is whole blocks (the kernel hands out its data area in 4 KiB pages),
  but do not rely on it.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass(frozen=True, slots=True)
class VolumeIdentity:
    """What INQUIRY reports about a volume. Both sites of a pair must report the same identity
    for a replicated volume, so that an initiator (VMware, dm-multipath) sees one device whose
    paths move between sites, not a new disk after failover: derive `uuid` from data the pair
    shares (the volume's creation uuid replicated to the peer), never from the site."""

    name: str
    uuid: str

    @classmethod
    def from_name(cls, name: str) -> VolumeIdentity:
        """A stable identity for demos and tests: uuid5 of the name."""
        return cls(name=name, uuid=str(uuid.uuid5(uuid.NAMESPACE_URL, f"targetd-repl:{name}")))


@runtime_checkable
class Backend(Protocol):
    """One exported volume, in logical blocks."""

    @property
    def block_size(self) -> int: ...

    @property
    def num_blocks(self) -> int: ...

    @property
    def writable(self) -> bool: ...

    @property
    def identity(self) -> VolumeIdentity: ...

    def readinto(self, lba: int, buffers: Sequence[memoryview]) -> None: ...

    def write(self, lba: int, buffers: Sequence[memoryview]) -> None: ...

    def write_zeros(self, lba: int, nblocks: int) -> None: ...

    def flush(self) -> None: ...


@runtime_checkable
class SupportsCompareAndWrite(Protocol):
    def compare_and_write(
        self, lba: int, expected: Sequence[memoryview], new: Sequence[memoryview]
    ) -> int | None:
        """Atomically: if the blocks at `lba` equal `expected`, write `new` there (durably) and
        return None; else write nothing and return the offset of the first differing byte."""
        ...


@runtime_checkable
class SupportsWriteBatch(Protocol):
    def write_batch(
        self, writes: Sequence[tuple[int, Sequence[memoryview]]]
    ) -> list[BaseException | None]:
        """Write several (lba, buffers), each as `write` would, sharing the cost of durability
        (the engine: one journal group commit for all). Overlapping writes land in list order.
        Returns, in order, None for each write done or the exception that failed it (typed as
        for `write`). The SCSI layer checks each write's range and `writable` first."""
        ...
