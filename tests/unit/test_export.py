"""The controller's LIO export (targetd_repl/export.py): the wanted LioConfig built from the
metadata (pure), what reconcile would do with it against configfs (lio.plan, pure), and the
runtime's order of work around volume changes (through the control API, and behind it: a volume
a peer's pair request creates is served at once, with I/O going on), with a real StorageEngine, a
fake LIO and a fake data path."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from targetd_repl.api.service import ControlService, Endpoints
from targetd_repl.config import ExportAcl, ExportSettings
from targetd_repl.datapath.backend import Backend
from targetd_repl.datapath.engine_backend import EngineBackend
from targetd_repl.errors import AlreadyExists, LioError
from targetd_repl.export import (
    ExportedVolume,
    SiteExport,
    changed_volumes,
    snapshot,
    wanted_config,
)
from targetd_repl.lio import BackstoreKind, Chap, LioConfig, LunSpec, Portal, site_iqn
from targetd_repl.lio.plan import (
    CreateBackstore,
    CreateLun,
    LioState,
    RemoveBackstore,
    RemoveLun,
    plan,
)
from targetd_repl.model import VolumeInfo
from targetd_repl.storage.engine import StorageEngine
from targetd_repl.storage.group_store import GroupSettings
from tests.unit.test_lio_plan import converged_state

MiB = 1 << 20
SITE = "a"
DEMO = ExportSettings(portals=(("127.0.0.1", 3260),), demo_mode=True)


def vol(
    name: str, size: int = 64 * MiB, *, id_: int = 1, group: int = 1, at: float = 0.0
) -> VolumeInfo:
    return VolumeInfo(id_, name, size, 512, group, at)


# --- wanted_config --------------------------------------------------------------------------------


def test_every_volume_is_a_user_backstore_and_a_lun() -> None:
    volumes = [vol("db", id_=2, at=2.0), VolumeInfo(1, "logs", 8 * MiB, 4096, 1, 1.0)]
    wanted = wanted_config(SITE, volumes, DEMO)
    assert wanted == LioConfig(
        site=SITE,
        luns=(  # in creation order: a rebuilt site numbers them as they were
            LunSpec("logs", 8 * MiB, 4096, BackstoreKind.USER, hw_max_sectors=2048),
            LunSpec("db", 64 * MiB, 512, BackstoreKind.USER, hw_max_sectors=2048),
        ),
        portals=(Portal("127.0.0.1", 3260),),
        demo_mode=True,
    )
    assert [spec.config for spec in wanted.luns] == ["targetd/logs", "targetd/db"]
    assert wanted.target_iqn == site_iqn(SITE)


def test_acls_with_chap_and_lun_settings() -> None:
    settings = ExportSettings(
        portals=(("0.0.0.0", 3260), ("192.0.2.1", 3261)),
        acls=(ExportAcl("iqn.2020-01.org.example:h1", "h1", "secret1"),),
        hw_max_sectors=256,
        cmd_time_out=90,
    )
    wanted = wanted_config(SITE, [vol("db")], settings)
    assert wanted.portals == (Portal("0.0.0.0", 3260), Portal("192.0.2.1", 3261))
    assert not wanted.demo_mode
    assert [(a.initiator_iqn, a.chap) for a in wanted.acls] == [
        ("iqn.2020-01.org.example:h1", Chap("h1", "secret1"))
    ]
    assert wanted.tpg_attributes()["authentication"] == "1"
    assert (wanted.luns[0].hw_max_sectors, wanted.luns[0].cmd_time_out) == (256, 90)


def test_no_volumes_still_exports_the_target() -> None:
    wanted = wanted_config(SITE, [], DEMO)
    assert wanted.luns == ()
    assert plan(wanted, converged_state(wanted)) == []


def test_restart_repairs_a_removed_lun_and_nothing_else() -> None:
    wanted = wanted_config(SITE, [vol("db", at=1.0), vol("logs", id_=2, at=2.0)], DEMO)
    state = converged_state(wanted)
    assert plan(wanted, state) == []  # converged: a restart changes nothing
    target = state.targets[wanted.target_iqn]
    drifted = LioState(
        backstores=state.backstores,
        targets={
            target.iqn: type(target)(
                iqn=target.iqn,
                enabled=target.enabled,
                attributes=target.attributes,
                portals=target.portals,
                luns={n: lun for n, lun in target.luns.items() if lun.storage_object != "logs"},
                acls=target.acls,
            )
        },
    )
    assert plan(wanted, drifted) == [CreateLun(wanted.target_iqn, 1, "user", "logs")]


def test_resize_replaces_the_backstore_under_the_same_lun() -> None:
    before = wanted_config(SITE, [vol("db", 64 * MiB)], DEMO)
    after = wanted_config(SITE, [vol("db", 128 * MiB)], DEMO)
    actions = plan(after, converged_state(before))
    iqn = site_iqn(SITE)
    assert actions == [
        RemoveLun(iqn, 0),
        RemoveBackstore("user", "db"),
        CreateBackstore(after.luns[0]),
        CreateLun(iqn, 0, "user", "db"),  # the same LUN number, the new size
    ]


def test_a_deleted_volume_leaves_lio() -> None:
    before = wanted_config(SITE, [vol("db"), vol("old", id_=2, at=1.0)], DEMO)
    after = wanted_config(SITE, [vol("db")], DEMO)
    actions = plan(after, converged_state(before))
    assert actions == [RemoveLun(site_iqn(SITE), 1), RemoveBackstore("user", "old")]


def test_changed_volumes() -> None:
    def snap(*volumes: VolumeInfo) -> dict[str, ExportedVolume]:
        return snapshot(volumes)

    a, b = vol("a", group=1), vol("b", id_=2, group=1)
    assert changed_volumes(snap(a, b), snap(a, b)) == set()
    assert changed_volumes(snap(a), snap(a, b)) == {"b"}  # created: "a" of its group unchanged
    assert changed_volumes(snap(a, b), snap(a)) == {"b"}  # deleted
    assert changed_volumes(snap(a, b), snap(vol("a", 128 * MiB, group=1), b)) == {"a"}  # resized
    assert changed_volumes(snap(a, b), snap(vol("a", group=2), b)) == {"a"}  # moved


# --- the runtime ----------------------------------------------------------------------------------


class FakeLio:
    """Records what reconcile was asked to hold; may fail like a host without configfs."""

    def __init__(self) -> None:
        self.wanted: list[LioConfig] = []
        self.fail: str | None = None
        self.on_reconcile: Callable[[], None] | None = None

    def reconcile(self, wanted: LioConfig) -> list[str]:
        if self.on_reconcile is not None:
            self.on_reconcile()
        if self.fail is not None:
            raise LioError(self.fail)
        changed = not self.wanted or self.wanted[-1] != wanted
        self.wanted.append(wanted)
        return ["changed"] if changed else []

    @property
    def volumes(self) -> list[str]:
        return [spec.volume for spec in self.wanted[-1].luns]


class FakeDataPath:
    """Serves one 'uio' per exported volume whose backend exists, as DataPathService would."""

    def __init__(self, backend_for: Callable[[str], Backend | None], lio: FakeLio) -> None:
        self.backend_for = backend_for
        self.lio = lio
        self.devices: dict[str, str] = {}  # uio -> volume, as LIO would have made them
        self.serving: dict[str, Backend] = {}
        self.events: list[str] = []
        self.running = False

    def start(self) -> None:
        self.running = True
        self.events.append("start")
        self.rescan()

    def stop(self) -> None:
        self.running = False
        self.events.append("stop")
        for uio in list(self.serving):
            self.device_removed(uio)

    def rescan(self) -> None:
        self.devices = {f"uio{i}": v for i, v in enumerate(sorted(self.lio.volumes))}
        for uio in [u for u in self.serving if u not in self.devices]:
            self.device_removed(uio)
        for uio, volume in self.devices.items():
            if uio not in self.serving and self.running:
                backend = self.backend_for(volume)
                if backend is not None:
                    self.serving[uio] = backend
                    self.events.append(f"serve {volume}")

    def served(self) -> dict[str, str]:
        return {uio: self.devices[uio] for uio in self.serving}

    def device_removed(self, uio: str) -> None:
        if self.serving.pop(uio, None) is not None:
            self.events.append(f"unserve {self.devices[uio]}")


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[StorageEngine]:
    engine = StorageEngine.open(tmp_path / "state", site=SITE)
    yield engine
    engine.close()


def make_export(
    engine: StorageEngine, *, watch_interval: float = 0
) -> tuple[SiteExport, FakeLio, list[FakeDataPath]]:
    """watch_interval 0: no watcher (the tests refresh by hand); > 0: a watcher that also acts
    on the engine's reopen notices at once."""
    lio = FakeLio()
    made: list[FakeDataPath] = []

    def datapath(backend_for: Callable[[str], Backend | None], workers: int) -> FakeDataPath:
        assert workers == DEMO.workers
        made.append(FakeDataPath(backend_for, lio))
        return made[-1]

    export = SiteExport(
        engine,
        SITE,
        DEMO,
        reconcile=lio.reconcile,
        datapath=datapath,
        watch_interval=watch_interval,
    )
    return export, lio, made


def test_start_reconciles_then_serves_every_volume(engine: StorageEngine) -> None:
    engine.create_volume("db", 8 * MiB)
    engine.create_volume("logs", 8 * MiB)
    export, lio, made = make_export(engine)
    assert export.start() == ["changed"]
    assert lio.volumes == ["db", "logs"]
    dp = made[0]
    assert dp.events == ["start", "serve db", "serve logs"]
    assert {b.num_blocks for b in dp.serving.values()} == {8 * MiB // 512}
    export.stop()
    assert dp.events[-3:] == ["stop", "unserve db", "unserve logs"]
    export.stop()  # idempotent


def test_start_without_lio_is_one_clear_line(engine: StorageEngine) -> None:
    export, lio, made = make_export(engine)
    lio.fail = "LIO: cannot read the LIO configuration: configfs not mounted at /sys/kernel/config"
    with pytest.raises(LioError) as caught:
        export.start()
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("[export] needs LIO on this host: LIO: cannot read")
    assert "configfs not mounted" in message
    assert made == []  # no data path started


def _service(engine: StorageEngine, export: SiteExport) -> ControlService:
    return ControlService(
        engine,
        None,  # type: ignore[arg-type]  # no pair calls here
        site=SITE,
        endpoints=Endpoints("127.0.0.1:1", "/x.sock"),
        peers={},
        export=export,
    )


def test_volume_changes_through_the_service_re_export(engine: StorageEngine) -> None:
    engine.create_volume("db", 8 * MiB)
    export, lio, made = make_export(engine)
    export.start()
    service = _service(engine, export)
    dp = made[0]

    service.create_volume("logs", 4 * MiB)
    assert lio.volumes == ["db", "logs"]
    assert dp.events[-1] == "serve logs"
    assert "unserve db" not in dp.events  # another group: db kept serving

    dp.events.clear()
    service.resize_volume("db", 16 * MiB)
    assert [s.size_bytes for s in lio.wanted[-1].luns if s.volume == "db"] == [16 * MiB]
    assert dp.events == ["unserve db", "serve db"]  # paused around the group's reopen
    served_db = next(b for u, b in dp.serving.items() if dp.devices[u] == "db")
    assert served_db.num_blocks == 16 * MiB // 512  # a backend of the reopened group

    dp.events.clear()
    service.create_group("app")
    service.add_volume("app", "logs")
    assert dp.events == ["unserve logs", "serve logs"]

    dp.events.clear()
    service.delete_volume("logs")
    assert lio.volumes == ["db"]
    assert dp.events == ["unserve logs"]
    assert list(dp.served().values()) == ["db"]


def test_volumes_of_a_changing_group_pause_together(engine: StorageEngine) -> None:
    engine.create_group("app")
    engine.create_volume("db", 8 * MiB, group="app")
    engine.create_volume("logs", 8 * MiB, group="app")
    export, lio, made = make_export(engine)
    export.start()
    dp = made[0]
    dp.events.clear()
    seen: list[dict[str, str]] = []
    lio.on_reconcile = lambda: seen.append(dp.served())
    _service(engine, export).create_volume("more", 8 * MiB, group="app")
    assert seen == [{}]  # nothing of the group was served while it was reopened
    assert sorted(dp.events) == sorted(
        ["unserve db", "unserve logs", "serve db", "serve logs", "serve more"]
    )


def test_a_failed_change_still_resumes_serving(engine: StorageEngine) -> None:
    engine.create_volume("db", 8 * MiB)
    export, _lio, made = make_export(engine)
    export.start()
    with pytest.raises(AlreadyExists), export.changing(volumes=["db"]):
        engine.create_volume("db", 8 * MiB)
    assert list(made[0].served().values()) == ["db"]


def test_a_lio_failure_after_a_change_is_reported_and_serving_resumes(
    engine: StorageEngine,
) -> None:
    engine.create_volume("db", 8 * MiB)
    export, lio, made = make_export(engine)
    export.start()
    lio.fail = "LIO: cannot create user backstore 'x': no space"
    with pytest.raises(LioError, match="cannot create user backstore"):
        _service(engine, export).create_volume("x", 8 * MiB)
    assert [v.name for v in engine.list_volumes()] == ["db", "x"]  # the change stands
    assert list(made[0].served().values()) == ["db"]
    lio.fail = None
    assert export.refresh() == ["changed"]  # the next change repairs LIO
    assert sorted(made[0].served().values()) == ["db", "x"]


def test_refresh_picks_up_volumes_made_behind_the_api(engine: StorageEngine) -> None:
    export, lio, made = make_export(engine)
    export.start()
    assert export.refresh(only_if_changed=True) == []  # the watcher: nothing changed
    calls = len(lio.wanted)
    assert export.refresh(only_if_changed=True) == [] and len(lio.wanted) == calls
    engine.create_volume("peer-made", 8 * MiB)  # e.g. a secondary created by a pair request
    assert export.refresh(only_if_changed=True) == ["changed"]
    assert lio.volumes == ["peer-made"]
    assert list(made[0].served().values()) == ["peer-made"]
    assert export.exported == ["peer-made"]


def _served(dp: FakeDataPath, volume: str) -> Backend:
    return next(b for uio, b in dp.serving.items() if dp.devices[uio] == volume)


def _wait_until(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def test_a_volume_added_behind_the_export_keeps_io_going_and_is_served_at_once(
    engine: StorageEngine,
) -> None:
    """A peer's pair request creates a volume in an exported group through the engine alone
    (no changing()): the group's LUN keeps serving across the reopen - no command fails, none
    runs on the closed store, the backend moves to the new store - and the new volume is in LIO
    and served at once, long before the watcher's interval."""
    engine.create_group("app")
    engine.create_volume("db", 8 * MiB, group="app")
    export, lio, made = make_export(engine, watch_interval=3600)  # no periodic tick here
    export.start()
    dp = made[0]
    backend = _served(dp, "db")
    old_store = engine.group("app")

    stop = threading.Event()
    failures: list[BaseException] = []
    written: dict[int, bytes] = {}
    count = [0]
    count_lock = threading.Lock()

    def io(first_lba: int) -> None:
        i = 0
        try:
            while not stop.is_set():
                lba = first_lba + (i % 256) * 8
                data = bytes([(first_lba + i) % 251 + 1]) * 4096
                backend.write(lba, [memoryview(data)])
                back = bytearray(4096)
                view = memoryview(back)
                backend.readinto(lba, [view[:1024], view[1024:]])  # scattered, like the ring
                assert back == data, f"LBA {lba}: read back other data"
                written[lba] = data
                i += 1
                with count_lock:
                    count[0] += 1
        except BaseException as error:
            failures.append(error)

    threads = [threading.Thread(target=io, args=(base,)) for base in (0, 4096, 8192)]
    for thread in threads:
        thread.start()
    try:
        _wait_until(lambda: count[0] >= 30 or bool(failures), "I/O before the change")
        engine.create_volume("more", 4 * MiB, group="app")  # the peer path: engine only
        # (events, not dp.serving: the watcher's thread changes that dict meanwhile)
        _wait_until(lambda: "serve more" in dp.events, "the new volume served")
        after = count[0]
        _wait_until(lambda: count[0] >= after + 30 or bool(failures), "I/O after the change")
    finally:
        stop.set()
        for thread in threads:
            thread.join()

    assert failures == []
    assert lio.volumes == ["db", "more"]
    assert "unserve db" not in dp.events  # the LUN was never paused; its backend followed
    new_store = engine.group("app")
    assert new_store is not old_store
    assert isinstance(backend, EngineBackend) and backend.store is new_store
    for lba, data in written.items():
        assert engine.read("db", lba, 8) == data
    more = _served(dp, "more")
    more.write(0, [memoryview(b"m" * 512)])
    back = bytearray(512)
    more.readinto(0, [memoryview(back)])
    assert back == b"m" * 512
    export.stop()
    assert made[0].events[-1].startswith("unserve")


def test_housekeeping_checkpoints_and_trims_the_journal(tmp_path: Path) -> None:
    settings = GroupSettings(journal_size_limit=8 * MiB, journal_segment_size=MiB)
    engine = StorageEngine.open(tmp_path / "state", site=SITE, settings=settings)
    try:
        engine.create_volume("db", 8 * MiB)
        export, _lio, _made = make_export(engine)
        export.start()
        for i in range(6):
            engine.write("db", i * 2048, bytes([i + 1]) * MiB)
        journal = engine.group("db").journal
        used = journal.used_bytes
        assert used >= 6 * MiB
        export.housekeeping()
        assert journal.used_bytes < used  # full segments freed
        assert engine.group("db").info.applied_seq == 6  # the checkpoint is recorded
        assert engine.read("db", 5 * 2048, 1) == bytes([6]) * 512
        export.stop()
    finally:
        engine.close()
