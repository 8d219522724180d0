"""A site's storage: the state directory, the metadata store and one GroupStore per group.

Layout under the state directory:
    metadata.db                     SQLite: volumes, groups, pairs, epochs, snapshot catalogue
    volumes/<volume>.img            the volume images (sparse files)
    snapshots/<volume>/<name>.cow   before-images of each snapshot
    groups/<group>/journal/         the group's journal segments

Every volume belongs to exactly one group (a group is the unit that journals and replicates);
a volume created without a group gets a group of its own, named after it.

A group's store is reopened when its volume set changes (a volume created in it, resized, moved
or deleted - by the control API or by a peer's pair request). The data path therefore holds a
`GroupHandle`, not the store: I/O runs inside `handle.use()`, and a reopen closes the handle's
gate first (commands inside finish, new ones wait), swaps the store, and lets the waiting commands
run on the new one - no command is ever served from a closed store. `GroupListener`s registered
with `add_listener` hear of every reopen (`reopening` before the old store closes, `reopened`
after the new one serves): the export uses it to put a volume created behind its back into LIO.

Lock order: `StorageEngine._admin` -> a group's gate (`GroupHandle`) -> the GroupStore's locks.
Listeners are called under `_admin` (outside the gate): they must not wait for anything that
takes `_admin`, nor for a lock held around calls into the engine's admin operations.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from targetd_repl.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    StorageError,
)
from targetd_repl.model import (
    BLOCK_SIZES,
    GroupInfo,
    Role,
    SnapshotInfo,
    SnapshotKind,
    VolumeInfo,
    check_name,
)
from targetd_repl.storage.barrier import WriteBarrier
from targetd_repl.storage.group_store import Buffer, GroupSettings, GroupStore, OpenVolume
from targetd_repl.storage.metadata import MetadataStore
from targetd_repl.storage.range_lock import RangeLock
from targetd_repl.storage.snapshot import SnapshotSet
from targetd_repl.storage.volume import Volume

log = logging.getLogger(__name__)


class GroupHandle:
    """One group's store across reopens: what a long-lived user (a LUN's backend) holds instead
    of the store, which a reopen replaces.

    I/O runs inside `use()`, which admits many commands at once. A reopen closes the gate: the
    commands inside finish, new ones wait (even under a steady load: a waiting reopen goes
    first), then they run on the new store. Never nest `use()` in one thread: a reopen waiting
    between the two would wait for the outer one forever."""

    def __init__(self, store: GroupStore) -> None:
        self._store = store
        self._gone: NotFound | StorageError | None = None  # why there is no store any more
        self._gate = WriteBarrier()
        # Every command of the LUN passes here: one shared hold object, no generator per command.
        self._hold = _StoreHold(self)

    @property
    def store(self) -> GroupStore:
        """The current store, without waiting: for its name, role and info. A reopen may be
        closing it right now; do I/O inside `use()`."""
        return self._store

    def use(self) -> _StoreHold:
        """Hold (`with handle.use() as store:`) while a command runs on the group's store
        (waits while a reopen swaps it)."""
        return self._hold

    def _enter(self) -> GroupStore:
        self._gate.enter_writer()
        if self._gone is not None:
            self._gate.exit_writer()
            raise type(self._gone)(str(self._gone))
        return self._store

    # The engine's side (StorageEngine, under its admin lock): close the gate, swap or retire.

    @contextlib.contextmanager
    def _closed(self) -> Iterator[None]:
        with self._gate.closed():
            yield

    def _replace(self, store: GroupStore) -> None:
        self._store = store

    def _retire(self, why: NotFound | StorageError) -> None:
        self._gone = why


class _StoreHold:
    """What `GroupHandle.use()` returns; shared by every command (it keeps no per-use state)."""

    __slots__ = ("enter", "exit")

    def __init__(self, handle: GroupHandle) -> None:
        self.enter = handle._enter
        self.exit = handle._gate.exit_writer

    def __enter__(self) -> GroupStore:
        return self.enter()

    def __exit__(self, *exc: object) -> None:
        self.exit()


class GroupListener:
    """Told of every reopen of a group's store (subclass and override; the defaults do nothing).
    Both calls run in the thread changing the group, under the engine's admin lock: return
    quickly, and never wait for anything that takes that lock (see the module docstring)."""

    def reopening(self, group_id: int) -> None:
        """The group's store is about to close (to reopen, or for good: when a group is deleted
        its row is gone already). It is still open, and `reopened` follows whatever happens."""

    def reopened(self, group_id: int, store: GroupStore | None) -> None:
        """The group's volume set changed and `store` now serves it (also a group's first store,
        when creating a volume created the group); commands held at the group's handle run on
        it. None: the group has no store any more (deleted, or its reopen failed)."""


class StorageEngine:
    """Thread-safe facade over a site's storage. Open with `StorageEngine.open`."""

    def __init__(self, state_dir: Path, metadata: MetadataStore, settings: GroupSettings) -> None:
        self._dir = state_dir
        self._metadata = metadata
        self._settings = settings
        self._groups: dict[int, GroupHandle] = {}
        self._admin = threading.RLock()  # create/delete/move: one at a time
        self._listeners: list[GroupListener] = []
        self._listeners_lock = threading.Lock()
        # volume name -> (group id, volume id): every I/O looks its volume up, and SQLite per
        # command costs the writers more than replication does. Forgotten under `_admin` before
        # the metadata changes a volume's group and again once its groups reopened.
        self._volumes: dict[str, tuple[int, int]] = {}
        self._volumes_generation = 0

    @classmethod
    def open(
        cls, state_dir: Path, *, site: str, settings: GroupSettings | None = None
    ) -> StorageEngine:
        state_dir = Path(state_dir)
        for sub in ("volumes", "snapshots", "groups"):
            (state_dir / sub).mkdir(parents=True, exist_ok=True)
        metadata = MetadataStore.open_in(state_dir, site=site)
        engine = cls(state_dir, metadata, settings or GroupSettings())
        try:
            for group in metadata.list_groups():
                engine._open_group(group)
        except BaseException:
            engine.close()
            raise
        return engine

    def close(self) -> None:
        with self._admin:
            groups, self._groups = self._groups, {}
            for handle in groups.values():
                with handle._closed():  # commands inside finish; later ones fail
                    handle._retire(NotFound("the storage engine is closed"))
                    try:
                        handle.store.close()
                    except Exception as error:  # close the rest; the next open replays this one
                        log.error("group %s did not close cleanly: %s", handle.store.name, error)
            self._metadata.close()

    # --- listeners -----------------------------------------------------------------------------

    def add_listener(self, listener: GroupListener) -> None:
        with self._listeners_lock:
            self._listeners.append(listener)

    def remove_listener(self, listener: GroupListener) -> None:
        with self._listeners_lock, contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    def _tell(self, group_id: int, notice: Callable[[GroupListener], None]) -> None:
        with self._listeners_lock:
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                notice(listener)
            except Exception:  # a listener's failure must not stop the change
                log.exception("group %d: a listener failed on its reopen", group_id)

    def _tell_reopening(self, group_id: int) -> None:
        self._tell(group_id, lambda listener: listener.reopening(group_id))

    def _tell_reopened(self, group_id: int, store: GroupStore | None) -> None:
        self._tell(group_id, lambda listener: listener.reopened(group_id, store))

    @property
    def metadata(self) -> MetadataStore:
        return self._metadata

    @property
    def state_dir(self) -> Path:
        return self._dir

    # --- paths ---------------------------------------------------------------------------------

    def _volume_path(self, name: str) -> Path:
        return self._dir / "volumes" / f"{name}.img"

    def _snapshot_dir(self, name: str) -> Path:
        return self._dir / "snapshots" / name

    def _group_dir(self, name: str) -> Path:
        return self._dir / "groups" / name

    # --- opening -------------------------------------------------------------------------------

    def _open_volume(self, info: VolumeInfo) -> OpenVolume:
        volume = Volume.open(self._volume_path(info.name), block_size=info.block_size)
        try:
            snapshots = SnapshotSet(
                self._snapshot_dir(info.name), volume, chunk_size=self._settings.region_size
            )
        except BaseException:
            volume.close()
            raise
        self._drop_uncatalogued_snapshots(info, snapshots)
        return OpenVolume(info, volume, snapshots, RangeLock(self._settings.region_size))

    def _drop_uncatalogued_snapshots(self, info: VolumeInfo, snapshots: SnapshotSet) -> None:
        """A store without a catalogue row was never reported created (crash in between)."""
        catalogued = {s.name for s in self._metadata.list_snapshots(info.id)}
        for snap in snapshots.list():
            if snap.name not in catalogued:
                log.warning("volume %s: removing uncatalogued snapshot %s", info.name, snap.name)
                snapshots.delete(snap.name)

    def _open_store(self, info: GroupInfo) -> GroupStore:
        opened: list[OpenVolume] = []
        try:
            for vinfo in self._metadata.list_volumes(info.id):
                opened.append(self._open_volume(vinfo))
            return GroupStore.open(
                self._group_dir(info.name), info, self._metadata, opened, self._settings
            )
        except BaseException:
            for ov in opened:
                ov.close()
            raise

    def _open_group(self, info: GroupInfo) -> GroupStore:
        store = self._open_store(info)
        self._groups[info.id] = GroupHandle(store)
        return store

    def _reopen_group(self, group_id: int) -> GroupStore:
        """Close and open a group again after its membership changed (under `_admin`)."""
        info = self._metadata.get_group_by_id(group_id)
        if group_id not in self._groups:  # a group created with its first volume
            store = self._open_group(info)
            self._forget_volumes()
            self._tell_reopened(group_id, store)
            return store
        swapped = self._swap_store(group_id, info)
        assert swapped is not None  # None only when closing for good
        return swapped

    def _swap_store(self, group_id: int, info: GroupInfo | None) -> GroupStore | None:
        """Replace the group's store by one opened from `info` (None: close it for good), with
        the group's commands held at its handle meanwhile. Under `_admin`."""
        handle = self._groups[group_id]
        name = handle.store.name
        store: GroupStore | None = None
        self._tell_reopening(group_id)
        try:
            with handle._closed():  # in-flight commands finish; new ones wait for the swap
                try:
                    handle.store.close()
                    if info is not None:
                        store = self._open_store(info)
                except BaseException as error:
                    del self._groups[group_id]
                    handle._retire(
                        StorageError(
                            f"group {name!r} failed to reopen ({error}); restart the controller"
                        )
                    )
                    raise
                if store is None:
                    del self._groups[group_id]
                    handle._retire(NotFound(f"group {name!r} was deleted"))
                else:
                    handle._replace(store)
        finally:
            self._forget_volumes()
            self._tell_reopened(group_id, store)
        return store

    # --- lookups -------------------------------------------------------------------------------

    def group(self, name: str) -> GroupStore:
        return self.group_handle(name).store

    def group_handle(self, name: str) -> GroupHandle:
        info = self._metadata.get_group(name)
        return self._groups[info.id]

    def group_of(self, volume: str) -> tuple[GroupStore, int]:
        """The group store serving `volume`, and the volume's id."""
        handle, volume_id = self.handle_of(volume)
        return handle.store, volume_id

    def handle_of(self, volume: str) -> tuple[GroupHandle, int]:
        """The handle of the group serving `volume` (it outlives reopens), and the volume's id."""
        cached = self._volumes.get(volume)
        if cached is None:
            generation = self._volumes_generation
            info = self._metadata.get_volume(volume)
            if info.group_id is None:  # only reachable if the metadata was edited by hand
                raise FailedPrecondition(f"volume {volume!r} belongs to no group")
            cached = (info.group_id, info.id)
            if generation == self._volumes_generation:  # no change began meanwhile
                self._volumes[volume] = cached
        group_id, volume_id = cached
        handle = self._groups.get(group_id)
        if handle is None:
            raise NotFound(f"volume {volume!r} is not served (its group is gone)")
        return handle, volume_id

    def _forget_volumes(self) -> None:
        """Under `_admin`: the volume -> group map is about to change, or just changed."""
        self._volumes_generation += 1
        self._volumes.clear()

    def list_volumes(self) -> list[VolumeInfo]:
        return self._metadata.list_volumes()

    def list_groups(self) -> list[GroupInfo]:
        return self._metadata.list_groups()

    # --- volumes -------------------------------------------------------------------------------

    def create_volume(
        self,
        name: str,
        size_bytes: int,
        *,
        block_size: int = 512,
        group: str | None = None,
        role: Role = Role.PRIMARY,
    ) -> VolumeInfo:
        """Create a sparse volume in `group` (default: a new group named after the volume)."""
        check_name("volume", name)
        if block_size not in BLOCK_SIZES:
            raise InvalidArgument(f"block size {block_size} is not one of {BLOCK_SIZES}")
        with self._admin:
            if name in {v.name for v in self._metadata.list_volumes()}:
                raise AlreadyExists(f"volume {name!r} already exists")
            path = self._volume_path(name)
            if path.exists():
                raise AlreadyExists(
                    f"volume {name!r}: the image {path} exists but is not catalogued; "
                    "move it away to reuse the name"
                )
            group_info = (
                self._metadata.get_group(group)
                if group is not None
                else self._metadata.create_group(name, role)
            )
            # Image first, catalogue second: a crash between leaves a file, never a row without one.
            Volume.create(path, size_bytes=size_bytes, block_size=block_size).close()
            try:
                info = self._metadata.create_volume(name, size_bytes, block_size)
                info = self._metadata.add_volume_to_group(group_info.id, info.id)
            except BaseException:
                path.unlink(missing_ok=True)
                raise
            self._reopen_group(group_info.id)
            return info

    def resize_volume(self, name: str, size_bytes: int) -> VolumeInfo:
        with self._admin:
            self._forget_volumes()
            store, volume_id = self.group_of(name)
            ov = store.volume(volume_id)
            if store.info.id in {p.group_id for p in self._metadata.list_pairs()}:
                raise FailedPrecondition(
                    f"cannot resize volume {name!r}: group {store.name!r} is paired "
                    "(both sites must resize together)"
                )
            store.checkpoint()
            ov.snapshots.before_resize(size_bytes)
            ov.volume.resize(size_bytes)
            info = self._metadata.resize_volume(name, size_bytes)
            self._reopen_group(store.info.id)
            return info

    def delete_volume(self, name: str) -> None:
        """Delete a volume (no snapshots left, group unpaired). The group made for it alone
        goes with it."""
        with self._admin:
            self._forget_volumes()
            info = self._metadata.get_volume(name)
            snapshots = [s.name for s in self._metadata.list_snapshots(info.id)]
            if snapshots:
                raise FailedPrecondition(
                    f"volume {name!r} still has snapshot(s) {', '.join(snapshots)}; "
                    "delete them first"
                )
            group_id = info.group_id
            if group_id is not None:
                self._groups[group_id].store.checkpoint()  # no record of it left to replay
                self._metadata.remove_volume_from_group(group_id, info.id)  # refuses if paired
            self._metadata.delete_volume(info.id)
            # Catalogue first, files second: a crash between leaves an orphan file, no dangling row.
            self._volume_path(name).unlink(missing_ok=True)
            shutil.rmtree(self._snapshot_dir(name), ignore_errors=True)
            if group_id is not None:
                group = self._metadata.get_group_by_id(group_id)
                if group.name == name and not self._metadata.list_volumes(group_id):
                    self.delete_group(group.name)
                else:
                    self._reopen_group(group_id)

    # --- groups --------------------------------------------------------------------------------

    def create_group(self, name: str, role: Role = Role.PRIMARY) -> GroupInfo:
        with self._admin:
            info = self._metadata.create_group(name, role)
            self._open_group(info)
            return info

    def move_volume(self, volume: str, group: str) -> VolumeInfo:
        """Move a volume into another group (both unpaired); its old journal is checkpointed
        first so no record of it is left to replay in the old group."""
        with self._admin:
            self._forget_volumes()
            vinfo = self._metadata.get_volume(volume)
            ginfo = self._metadata.get_group(group)
            if vinfo.group_id == ginfo.id:
                return vinfo
            if vinfo.group_id is not None:
                self._groups[vinfo.group_id].store.checkpoint()
                self._metadata.remove_volume_from_group(vinfo.group_id, vinfo.id)
                self._reopen_group(vinfo.group_id)
            info = self._metadata.add_volume_to_group(ginfo.id, vinfo.id)
            self._reopen_group(ginfo.id)
            return info

    def delete_group(self, name: str) -> None:
        with self._admin:
            self._forget_volumes()
            info = self._metadata.get_group(name)
            self._metadata.delete_group(name)  # refuses while volumes or a pair remain
            if info.id in self._groups:
                self._swap_store(info.id, None)
            shutil.rmtree(self._group_dir(name), ignore_errors=True)

    # --- I/O (the entry point the TCMU handler and `io write|read` share) ----------------------

    def write(self, volume: str, lba: int, data: Buffer) -> int:
        handle, volume_id = self.handle_of(volume)
        with handle.use() as store:
            return store.write(volume_id, lba, data)

    def write_zeros(self, volume: str, lba: int, nblocks: int) -> int:
        handle, volume_id = self.handle_of(volume)
        with handle.use() as store:
            return store.write_zeros(volume_id, lba, nblocks)

    def read(self, volume: str, lba: int, nblocks: int) -> bytes:
        handle, volume_id = self.handle_of(volume)
        with handle.use() as store:
            return store.read(volume_id, lba, nblocks)

    # --- snapshots -----------------------------------------------------------------------------

    def create_snapshot(
        self, volume: str, name: str, kind: SnapshotKind = SnapshotKind.USER
    ) -> SnapshotInfo:
        check_name("snapshot", name)
        store, volume_id = self.group_of(volume)
        return store.create_snapshot([volume_id], name, kind)[0]

    def list_snapshots(self, volume: str | None = None) -> list[SnapshotInfo]:
        return self._metadata.list_snapshots(volume)

    def delete_snapshot(self, volume: str, name: str) -> None:
        store, volume_id = self.group_of(volume)
        store.delete_snapshot(volume_id, name)

    def read_snapshot(self, volume: str, name: str, lba: int, nblocks: int) -> bytes:
        store, volume_id = self.group_of(volume)
        self._metadata.get_snapshot(volume, name)  # NotFound names the catalogue
        return store.volume(volume_id).snapshots.get(name).read(lba, nblocks)

    def rollback_snapshot(self, volume: str, name: str, regions: list[int] | None = None) -> int:
        store, volume_id = self.group_of(volume)
        self._metadata.get_snapshot(volume, name)
        if store.info.id in {p.group_id for p in self._metadata.list_pairs()}:
            raise FailedPrecondition(
                f"cannot roll back volume {volume!r}: group {store.name!r} is paired; "
                "suspend and delete the pair, or use failback"
            )
        return store.rollback_snapshot(volume_id, name, regions)
