"""The site's iSCSI export, owned by the controller (`[export]` in site.toml): every volume of
the site is a LUN of the site's target, on a TCMU `user:` backstore served in this process.

Two halves:

- `wanted_config(site, volumes, settings)` is pure: the `LioConfig` the metadata asks for. One
  user backstore `targetd/<volume>` per volume, sized like the volume, with its block size; one
  LUN each on the site's target (TPG 1); the portals, and demo mode or the ACLs (with CHAP) of
  `[export]`. LUN numbers: a LUN keeps the number configfs gives it; a new one takes the lowest
  free number, volumes in creation order (so a site rebuilt from nothing numbers them as before
  when none was deleted).
- `SiteExport` is the runtime. `start()` makes configfs match the metadata (`lio.reconcile`:
  creates what is missing, replaces what differs, removes our stale objects, never touches
  foreign ones) and starts the data path (`DataPathService` with one `EngineBackend` per
  volume). `changing(...)` wraps a volume change of the control API: the LUNs of the groups
  involved stop being served (in-flight commands finish; new ones wait in the kernel's ring),
  the engine changes (it reopens those groups), then LIO is reconciled and the LUNs are served
  again from the reopened groups. A change behind the control API (a peer's pair request
  creating volumes in a secondary group) needs no pause: a LUN's EngineBackend follows its
  group's reopen by itself (commands wait at the group's handle while the engine swaps the
  store). The export hears of every reopen (a `GroupListener`) and wakes its watcher thread,
  which exports the new volumes at once (`refresh`: only the volumes whose export changed are
  re-served). Every `watch_interval` the watcher also checkpoints the groups' journals
  (initiator writes keep coming; a short journal is a short replay after a crash) and retries a
  re-export whose LIO reconcile failed.
  `stop()` stops the data path (in-flight commands finish) before the engine closes.

Lock order: `SiteExport._lock` -> `StorageEngine._admin` -> a group's gate, and
`SiteExport._lock` -> the data path's lock -> a group's gate. The engine calls its listeners
under `_admin`, so the export's listener takes no lock: it only wakes the watcher.

Resize re-exports: LIO cannot grow a TCMU backstore under a live device without a netlink
listener answering the kernel's reconfigure event, so a volume whose size changed gets a new
backstore under the same LUN number. A logged-in initiator sees the LUN leave and return (a
REPORTED LUNS DATA HAS CHANGED unit attention) and picks up the new capacity with a rescan
(`iscsiadm -m session --rescan`); no acknowledged write is affected (the data is in the engine).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from targetd_repl import lio
from targetd_repl.config import ExportSettings
from targetd_repl.datapath.backend import Backend
from targetd_repl.datapath.engine_backend import EngineBackend
from targetd_repl.errors import LioError, NotFound
from targetd_repl.lio.config import AclSpec, BackstoreKind, Chap, LioConfig, LunSpec, Portal
from targetd_repl.model import VolumeInfo
from targetd_repl.storage.engine import GroupListener, StorageEngine
from targetd_repl.storage.group_store import GroupStore

log = logging.getLogger(__name__)

WATCH_INTERVAL = 5.0  # seconds between journal checkpoints (and retries of a failed re-export)


# --- the wanted configuration (pure) -------------------------------------------------------------


def wanted_config(site: str, volumes: Iterable[VolumeInfo], settings: ExportSettings) -> LioConfig:
    """The LIO configuration that exports every volume of `site` as `settings` say."""
    ordered = sorted(volumes, key=lambda v: (v.created_at, v.id, v.name))
    luns = tuple(
        LunSpec(
            volume.name,
            volume.size_bytes,
            volume.block_size,
            BackstoreKind.USER,
            hw_max_sectors=settings.hw_max_sectors,
            cmd_time_out=settings.cmd_time_out,
        )
        for volume in ordered
    )
    acls = tuple(
        AclSpec(
            acl.initiator,
            None
            if acl.chap_userid is None or acl.chap_password is None
            else Chap(acl.chap_userid, acl.chap_password),
        )
        for acl in settings.acls
    )
    return LioConfig(
        site=site,
        luns=luns,
        portals=tuple(Portal(ip, port) for ip, port in settings.portals),
        acls=acls,
        demo_mode=settings.demo_mode,
    )


@dataclass(frozen=True, slots=True)
class ExportedVolume:
    """What a volume looks like to the export: a change of any field needs the LUN re-served."""

    size_bytes: int
    block_size: int
    group_id: int | None


def snapshot(volumes: Iterable[VolumeInfo]) -> dict[str, ExportedVolume]:
    return {v.name: ExportedVolume(v.size_bytes, v.block_size, v.group_id) for v in volumes}


def changed_volumes(
    before: dict[str, ExportedVolume], after: dict[str, ExportedVolume]
) -> set[str]:
    """Volumes added, removed, resized or moved between two snapshots."""
    return {name for name in before.keys() | after.keys() if before.get(name) != after.get(name)}


# --- the runtime ---------------------------------------------------------------------------------


class DataPath(Protocol):
    """What SiteExport needs of the data path (datapath.service.DataPathService)."""

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def rescan(self) -> None: ...
    def served(self) -> dict[str, str]: ...
    def device_removed(self, uio: str) -> None: ...


Reconcile = Callable[[LioConfig], list[str]]
DataPathFactory = Callable[[Callable[[str], Backend | None], int], DataPath]


def _real_datapath(backend_for: Callable[[str], Backend | None], workers: int) -> DataPath:
    # pyudev and the ring: only a running export needs them (unit tests pass a fake).
    from targetd_repl.datapath.service import DataPathService  # noqa: PLC0415

    return DataPathService(backend_for, workers=workers)


def _engine_backend(engine: StorageEngine, volume: str) -> Backend | None:
    try:
        return EngineBackend(engine, volume)
    except (NotFound, KeyError):
        return None


class _WakeOnReopen(GroupListener):
    """Wakes the export's watcher when the engine reopens a group. Called under the engine's
    admin lock: takes no lock (the export's lock comes before the engine's)."""

    def __init__(self, wake: threading.Event) -> None:
        self._wake = wake

    def reopened(self, group_id: int, store: GroupStore | None) -> None:
        self._wake.set()


class SiteExport:
    """The controller's LIO export and data path. start() / changing() / stop().

    `watch_interval` 0 (unit tests) runs no watcher: no checkpoints, and a change behind the
    control API is exported only by calling `refresh()`."""

    def __init__(
        self,
        engine: StorageEngine,
        site: str,
        settings: ExportSettings,
        *,
        reconcile: Reconcile = lio.reconcile,
        datapath: DataPathFactory = _real_datapath,
        backend_for: Callable[[StorageEngine, str], Backend | None] = _engine_backend,
        watch_interval: float = WATCH_INTERVAL,
    ) -> None:
        self._engine = engine
        self._site = site
        self._settings = settings
        self._reconcile_fn = reconcile
        self._datapath_factory = datapath
        self._make_backend = backend_for
        self._watch_interval = watch_interval
        self._datapath: DataPath | None = None
        self._lock = threading.RLock()  # one change of the export at a time
        self._paused: set[str] = set()  # volumes not served while their group changes
        self._exported: dict[str, ExportedVolume] = {}
        self._stopping = threading.Event()
        self._wake = threading.Event()  # a group was reopened: refresh now
        self._listener = _WakeOnReopen(self._wake)
        self._watcher: threading.Thread | None = None

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> list[str]:
        """Repair configfs to match the metadata, then serve every LUN. Returns the LIO changes
        made (empty: configfs already matched). A host without LIO fails here with a LioError."""
        with self._lock:
            try:
                changes = self._reconcile()
            except LioError as error:
                raise LioError(
                    f"[export] needs LIO on this host: {error} (mount configfs and load "
                    "target_core_user, or remove [export] from the site's configuration)"
                ) from None
            self._datapath = self._datapath_factory(self._backend_for, self._settings.workers)
            self._datapath.start()
        log.info(
            "export: site %s, %d LUN(s) on portal(s) %s%s; %s",
            self._site,
            len(self._exported),
            ", ".join(f"{ip}:{port}" for ip, port in self._settings.portals),
            " (demo mode)" if self._settings.demo_mode else "",
            f"{len(changes)} LIO change(s) repaired" if changes else "LIO already matched",
        )
        if self._watch_interval > 0:
            self._stopping.clear()
            self._wake.clear()
            self._engine.add_listener(self._listener)
            self._watcher = threading.Thread(target=self._watch, name="export-watch", daemon=True)
            self._watcher.start()
        return changes

    def stop(self) -> None:
        """Stop serving: in-flight commands finish; the LIO objects stay (the kernel keeps the
        rings; the next start serves what they hold). Idempotent."""
        self._engine.remove_listener(self._listener)
        self._stopping.set()
        self._wake.set()
        if self._watcher is not None:
            self._watcher.join()
            self._watcher = None
        with self._lock:
            if self._datapath is not None:
                self._datapath.stop()
                self._datapath = None
                log.info("export: data path stopped")

    # --- changes -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def changing(
        self, *, volumes: Sequence[str] = (), groups: Sequence[str] = ()
    ) -> Iterator[None]:
        """Around a change of these volumes or groups: their groups' LUNs are not served
        during it, LIO is reconciled after it. A LIO failure after a successful change raises
        LioError (the change stands; the next change or start repairs LIO)."""
        with self._lock:
            group_ids = self._group_ids(volumes, groups)
            paused = self._pause(group_ids)
            try:
                yield
            except BaseException:
                self._settle(paused, raise_errors=False)
                raise
            self._settle(paused, raise_errors=True)

    def refresh(self, *, only_if_changed: bool = False) -> list[str]:
        """Bring LIO and the data path in line with the metadata now: the volumes whose export
        changed (resized, moved, deleted) stop being served, LIO is reconciled, and every LUN
        is served (the others never stopped: their backends follow their group's reopen). With
        `only_if_changed` (the watcher), nothing happens unless the volume list differs from
        the last export."""
        with self._lock:
            now = snapshot(self._engine.list_volumes())
            if only_if_changed:
                if now == self._exported:
                    return []
                log.info("export: the volume list changed behind the control API; re-exporting")
            paused = self._pause_volumes(changed_volumes(self._exported, now))
            return self._settle(paused, raise_errors=True)

    def _watch(self) -> None:
        # Kept for three jobs: act on the engine's reopen notices (its listener may not take
        # self._lock, see the lock order above); checkpoint the journals; and, every interval,
        # retry a refresh whose LIO reconcile failed (nothing else would re-export the volume).
        due = time.monotonic() + self._watch_interval
        while True:
            self._wake.wait(max(0.0, due - time.monotonic()))
            if self._stopping.is_set():
                return
            self._wake.clear()  # before the refresh: a reopen during it wakes us again
            try:
                self.refresh(only_if_changed=True)
            except Exception:
                log.exception("export: refresh after a volume change failed")
            if time.monotonic() < due:
                continue
            due = time.monotonic() + self._watch_interval
            try:
                self.housekeeping()
            except Exception:
                log.exception("export: journal checkpoint failed")

    def housekeeping(self) -> None:
        """Checkpoint every group and free the journal segments nobody needs (a paired group's
        trim stops at what its peer still needs). Initiator writes arrive all the time; without
        this an unpaired group's journal fills before it is trimmed, and a crash leaves the whole
        journal to replay before the LUNs are served again."""
        with self._lock:
            for group in self._engine.list_groups():
                with self._engine.group_handle(group.name).use() as store:  # not mid-reopen
                    store.checkpoint_and_trim()

    # --- pieces ------------------------------------------------------------------------------

    def _group_ids(self, volumes: Sequence[str], groups: Sequence[str]) -> set[int]:
        metadata = self._engine.metadata
        ids: set[int] = set()
        for name in volumes:
            with contextlib.suppress(NotFound):
                group_id = metadata.get_volume(name).group_id
                if group_id is not None:
                    ids.add(group_id)
        for name in groups:
            with contextlib.suppress(NotFound):
                ids.add(metadata.get_group(name).id)
        return ids

    def _pause(self, group_ids: set[int]) -> set[str]:
        """Stop serving every volume of these groups (their stores are about to be reopened)."""
        return self._pause_volumes(
            {
                v.name
                for v in self._engine.list_volumes()
                if v.group_id is not None and v.group_id in group_ids
            }
        )

    def _pause_volumes(self, names: set[str]) -> set[str]:
        """Stop serving these volumes until `_settle` (in-flight commands finish; new ones wait
        in the kernel's ring). Returns those not paused already."""
        names = names - self._paused
        self._paused |= names
        if self._datapath is not None and names:
            for uio, volume in sorted(self._datapath.served().items()):
                if volume in names:
                    self._datapath.device_removed(uio)
        return names

    def _settle(self, paused: set[str], *, raise_errors: bool) -> list[str]:
        changes: list[str] = []
        try:
            changes = self._reconcile()
        except LioError as error:
            if raise_errors:
                raise
            log.error("export: %s", error)
        finally:
            self._paused -= paused
            if self._datapath is not None:
                self._datapath.rescan()
        return changes

    def _reconcile(self) -> list[str]:
        volumes = self._engine.list_volumes()
        changes = self._reconcile_fn(wanted_config(self._site, volumes, self._settings))
        self._exported = snapshot(volumes)
        return changes

    def _backend_for(self, volume: str) -> Backend | None:
        if volume in self._paused:
            return None
        return self._make_backend(self._engine, volume)

    @property
    def exported(self) -> list[str]:
        """The volumes exported by the last reconcile, by name."""
        return sorted(self._exported)
