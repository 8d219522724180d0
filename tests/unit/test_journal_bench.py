"""Smoke test of the journal benchmark: it runs (quick mode) and reports every figure."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import cast

# bench/ is installed as the package targetd_repl_bench (a package-dir mapping mypy cannot see).
run = cast(
    Callable[..., dict[str, float | int | str]],
    importlib.import_module("targetd_repl_bench.journal").run,
)


def test_quick_bench_reports_every_ratio(tmp_path: Path) -> None:
    result = run(quick=True, directory=tmp_path)
    for case in ("4k_qd1", "4k_qd32", "64k_qd1", "64k_qd32"):
        assert float(result[f"raw_{case}_mbps"]) > 0
        assert float(result[f"journal_{case}_mbps"]) > 0
        assert float(result[f"journal_vs_raw_{case}"]) > 0
    assert float(result["journal_4k_qd32_records_per_fsync"]) > 1  # group commit shares fsyncs
    assert list(tmp_path.iterdir()) == []  # it cleans up after itself
