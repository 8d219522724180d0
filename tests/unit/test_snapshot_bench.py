"""Smoke test of the snapshot benchmark: it runs (quick mode), reports every figure, cleans up."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import cast

import pytest

# bench/ is installed as the package targetd_repl_bench (a package-dir mapping mypy cannot see).
run = cast(
    Callable[..., dict[str, float | int | str]],
    importlib.import_module("targetd_repl_bench.snapshot").run,
)


def test_quick_bench_reports_every_ratio(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the bench works in a directory under the current one
    result = run(quick=True)
    for key in (
        "snapshot_write_vs_plain",
        "snapshot_seq64k_write_vs_plain",
        "snapshot_batch32_write_vs_plain",
        "snapshot_batch32_vs_single",
        "snapshot_warm_write_vs_plain",
    ):
        assert float(result[key]) > 0, key
    # a fresh snapshot: thousands of random 4 KiB writes are first overwrites of some region
    assert int(result["rand4k_first_overwrites"]) > 1000
    assert int(result["seq64k_first_overwrites"]) == int(result["seq64k_mib"]) * 16
    assert list(tmp_path.iterdir()) == []
