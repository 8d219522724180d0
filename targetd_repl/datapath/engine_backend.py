"""The data path's Backend over the storage engine: a LUN's reads and writes go through the
group's journaled write path (journal -> before-images -> volume) before the command completes."""

from __future__ import annotations

from collections.abc import Sequence

from targetd_repl.datapath.backend import VolumeIdentity
from targetd_repl.model import Role
from targetd_repl.storage.engine import StorageEngine


def _one_buffer(buffers: Sequence[memoryview]) -> memoryview:
    # The kernel usually hands one contiguous buffer; a scattered one is joined (one copy).
    if len(buffers) == 1:
        return buffers[0]
    return memoryview(b"".join(buffers))


class EngineBackend:
    """One exported volume of a StorageEngine (implements Backend, SupportsCompareAndWrite and
    SupportsWriteBatch)."""

    def __init__(self, engine: StorageEngine, volume: str) -> None:
        self._store, self._volume_id = engine.group_of(volume)
        self._volume = self._store.volume(self._volume_id).volume
        self._identity = VolumeIdentity.from_name(volume)

    @property
    def block_size(self) -> int:
        return self._volume.block_size

    @property
    def num_blocks(self) -> int:
        return self._volume.num_blocks

    @property
    def writable(self) -> bool:
        return self._store.role is Role.PRIMARY

    @property
    def identity(self) -> VolumeIdentity:
        return self._identity

    def readinto(self, lba: int, buffers: Sequence[memoryview]) -> None:
        if len(buffers) == 1:
            self._store.readinto(self._volume_id, lba, buffers[0])
            return
        data = memoryview(self._store.read(self._volume_id, lba, self._blocks(buffers)))
        at = 0
        for buffer in buffers:
            buffer[:] = data[at : at + buffer.nbytes]
            at += buffer.nbytes

    def write(self, lba: int, buffers: Sequence[memoryview]) -> None:
        self._store.write(self._volume_id, lba, _one_buffer(buffers))

    def write_batch(
        self, writes: Sequence[tuple[int, Sequence[memoryview]]]
    ) -> list[BaseException | None]:
        """One journal group commit for all of them (GroupStore.write_batch)."""
        return self._store.write_batch(
            self._volume_id, [(lba, _one_buffer(buffers)) for lba, buffers in writes]
        )

    def write_zeros(self, lba: int, nblocks: int) -> None:
        self._store.write_zeros(self._volume_id, lba, nblocks)

    def flush(self) -> None:
        """Nothing to do: every acknowledged write is already durable in the journal."""

    def compare_and_write(
        self, lba: int, expected: Sequence[memoryview], new: Sequence[memoryview]
    ) -> int | None:
        offset = self._store.compare_and_write(
            self._volume_id, lba, _one_buffer(expected), _one_buffer(new)
        )
        return None if offset < 0 else offset

    def _blocks(self, buffers: Sequence[memoryview]) -> int:
        return sum(b.nbytes for b in buffers) // self._volume.block_size
