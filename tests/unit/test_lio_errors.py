"""rtslib failures become LioError naming the object (runs on hosts without configfs)."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import pytest
from rtslib_fb import RTSLibError

from targetd_repl import lio
from targetd_repl.errors import LioError, TargetdReplError
from targetd_repl.lio import rts

MiB = 1 << 20


@pytest.fixture
def no_configfs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    missing = tmp_path / "config"
    monkeypatch.setattr(rts, "CONFIGFS", missing)
    return missing


@pytest.fixture
def fake_configfs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A directory that looks like a mounted configfs with target_core_mod loaded."""
    root = tmp_path / "config"
    (root / "target").mkdir(parents=True)
    monkeypatch.setattr(rts, "CONFIGFS", root)
    return root


def test_configfs_absent_names_the_object(no_configfs: Path) -> None:
    with pytest.raises(LioError) as info:
        lio.ensure_user_backstore("db1", 64 * MiB)
    assert str(info.value) == (
        f"LIO: cannot create user backstore 'db1': configfs not mounted at {no_configfs}"
    )
    assert isinstance(info.value, TargetdReplError)


@pytest.mark.parametrize(
    ("call", "what"),
    [
        (lambda: lio.ensure_fileio_backstore("f1", "/tmp/f1", MiB), "create fileio backstore 'f1'"),
        (lambda: lio.ensure_target("site-a"), "look up target iqn.2025-01.io.github.targetd-repl"),
        (lio.read_state, "read the LIO configuration"),
        (lambda: lio.reconcile(lio.LioConfig(site="a")), "read the LIO configuration"),
        (
            lambda: lio.remove_backstore(lio.BackstoreKind.USER, "db1"),
            "remove user backstore 'db1'",
        ),
        (lio.save_config, "save the configuration to /etc/target/saveconfig.json"),
        (
            lambda: lio.set_backstore_attribute(lio.BackstoreKind.USER, "db1", "cmd_time_out", 5),
            "set attribute cmd_time_out=5 of user backstore 'db1'",
        ),
    ],
)
def test_every_entry_point_refuses_without_configfs(
    no_configfs: Path, call: Any, what: str
) -> None:
    with pytest.raises(LioError, match="configfs not mounted at") as info:
        call()
    assert str(info.value).startswith(f"LIO: cannot {what}")


def test_target_core_mod_missing(fake_configfs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (fake_configfs / "target").rmdir()
    monkeypatch.setattr(rts, "_is_mounted", lambda path: path == fake_configfs)
    with pytest.raises(LioError, match=r"target_core_mod not loaded"):
        lio.ensure_user_backstore("db1", MiB)


def test_plain_oserror_from_rtslib_is_mapped(
    fake_configfs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def vanished(plugin: str, name: str) -> None:
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "/sys/kernel/x")

    monkeypatch.setattr(rts, "_find_so", vanished)
    with pytest.raises(LioError) as info:
        lio.ensure_user_backstore("db1", MiB)
    assert str(info.value) == (
        "LIO: cannot create user backstore 'db1': No such file or directory (/sys/kernel/x)"
    )
    assert isinstance(info.value.__cause__, FileNotFoundError)


def test_rtslib_error_is_mapped_with_its_message(
    fake_configfs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rts, "_find_so", lambda plugin, name: None)

    def refuse(action: object) -> None:
        raise RTSLibError("Storage object user/db1 exists")

    monkeypatch.setattr(rts, "_apply", refuse)
    monkeypatch.setattr(rts, "save_config", lambda path=None: None)
    with pytest.raises(LioError) as info:
        lio.ensure_user_backstore("db1", MiB)
    assert str(info.value) == (
        "LIO: cannot create user backstore 'db1': Storage object user/db1 exists"
    )


def test_apply_saves_what_was_done_before_a_failure(
    fake_configfs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    applied: list[str] = []
    saved: list[bool] = []

    def apply_one(action: Any) -> None:
        if len(applied) == 2:
            raise RTSLibError("boom")
        applied.append(action.describe())

    monkeypatch.setattr(rts, "_apply", apply_one)
    monkeypatch.setattr(rts, "save_config", lambda path=None: saved.append(True))
    actions = lio.plan(
        lio.LioConfig(site="a", luns=(lio.LunSpec("db1", MiB),), demo_mode=True), lio.LioState()
    )
    with pytest.raises(LioError, match=r"LIO: cannot create TPG 1 of .*: boom"):
        lio.apply(actions)
    assert applied == [actions[0].describe(), actions[1].describe()]
    assert saved == [True]  # the two changes that happened are on disk


def test_existing_backstore_with_other_settings_is_refused(
    fake_configfs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class FakeSo:
        plugin = "user"
        name = "db1"
        size = 32 * MiB
        config = "targetd/db1"
        hw_max_sectors = 128
        wwn = "targetd-x"
        alua_tpgs: tuple[object, ...] = ()

        def get_attribute(self, name: str) -> str:
            return "512"

    monkeypatch.setattr(rts, "_find_so", lambda plugin, name: FakeSo())
    assert lio.ensure_user_backstore("db1", 32 * MiB) is False  # same: nothing to do
    with pytest.raises(LioError, match=r"it exists with other settings \(size 33554432"):
        lio.ensure_user_backstore("db1", 64 * MiB)
