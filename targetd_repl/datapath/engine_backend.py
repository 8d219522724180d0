"""The data path's Backend over the storage engine: a LUN's reads and writes go through the
group's journaled write path (journal -> before-images -> volume) before the command completes.

The backend holds the group's `GroupHandle`, not its store: when the engine reopens the group
(its volume set changed, e.g. a peer's pair request added a volume to it), commands in flight
finish on the old store, new ones wait for the swap and then run on the new store - whoever made
the change, with no re-export of the LUN."""

from __future__ import annotations

from collections.abc import Sequence

from targetd_repl.datapath.backend import VolumeIdentity
from targetd_repl.model import Role
from targetd_repl.storage.engine import StorageEngine
from targetd_repl.storage.group_store import GroupStore


def _one_buffer(buffers: Sequence[memoryview]) -> memoryview:
    # The kernel usually hands one contiguous buffer; a scattered one is joined (one copy).
    if len(buffers) == 1:
        return buffers[0]
    return memoryview(b"".join(buffers))


class EngineBackend:
    """One exported volume of a StorageEngine (implements Backend, SupportsCompareAndWrite and
    SupportsWriteBatch)."""

    def __init__(self, engine: StorageEngine, volume: str) -> None:
        self._group, self._volume_id = engine.handle_of(volume)
        with self._group.use() as store:
            self._block_size = store.volume(self._volume_id).volume.block_size
        self._identity = VolumeIdentity.from_name(volume)

    @property
    def store(self) -> GroupStore:
        """The group store commands run on now (a reopen of the group replaces it)."""
        return self._group.store

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def num_blocks(self) -> int:
        with self._group.use() as store:
            return store.volume(self._volume_id).volume.num_blocks

    @property
    def writable(self) -> bool:
        return self._group.store.role is Role.PRIMARY

    @property
    def identity(self) -> VolumeIdentity:
        return self._identity

    def readinto(self, lba: int, buffers: Sequence[memoryview]) -> None:
        with self._group.use() as store:
            if len(buffers) == 1:
                store.readinto(self._volume_id, lba, buffers[0])
                return
            data = memoryview(store.read(self._volume_id, lba, self._blocks(buffers)))
        at = 0
        for buffer in buffers:
            buffer[:] = data[at : at + buffer.nbytes]
            at += buffer.nbytes

    def write(self, lba: int, buffers: Sequence[memoryview]) -> None:
        with self._group.use() as store:
            store.write(self._volume_id, lba, _one_buffer(buffers))

    def write_batch(
        self, writes: Sequence[tuple[int, Sequence[memoryview]]]
    ) -> list[BaseException | None]:
        """One journal group commit for all of them (GroupStore.write_batch)."""
        batch = [(lba, _one_buffer(buffers)) for lba, buffers in writes]
        with self._group.use() as store:
            return store.write_batch(self._volume_id, batch)

    def write_zeros(self, lba: int, nblocks: int) -> None:
        with self._group.use() as store:
            store.write_zeros(self._volume_id, lba, nblocks)

    def flush(self) -> None:
        """Nothing to do: every acknowledged write is already durable in the journal."""

    def compare_and_write(
        self, lba: int, expected: Sequence[memoryview], new: Sequence[memoryview]
    ) -> int | None:
        old, replacement = _one_buffer(expected), _one_buffer(new)
        with self._group.use() as store:
            offset = store.compare_and_write(self._volume_id, lba, old, replacement)
        return None if offset < 0 else offset

    def _blocks(self, buffers: Sequence[memoryview]) -> int:
        return sum(b.nbytes for b in buffers) // self._block_size
