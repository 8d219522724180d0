"""Smoke test of the replication benchmark: it runs (quick mode: two controller processes over
loopback, the bulk lane) and reports every figure."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import cast

# bench/ is installed as the package targetd_repl_bench (a package-dir mapping mypy cannot see).
run = cast(
    Callable[..., dict[str, float | int | str]],
    importlib.import_module("targetd_repl_bench.replication").run,
)


def test_quick_bench_reports_every_figure(tmp_path: Path) -> None:
    result = run(quick=True, directory=tmp_path)
    for key in (
        "ship_vs_tcp",
        "ship_mb_s",
        "tcp_mb_s",
        "async_on_vs_off",
        "async_on_vs_off_shared_disk",
        "writes_s_async",
        "writes_s_no_pair",
        "primary_cpu_us_per_write_async",
        "peer_cpu_us_per_write_async",
        "lag_p99_ms",
        "sync_latency_vs_async",
    ):
        assert float(result[key]) > 0, key
    assert float(result["async_on_vs_off_min"]) <= float(result["async_on_vs_off_max"])
    assert list(tmp_path.iterdir()) == []  # it cleans up after itself
