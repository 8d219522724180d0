"""The lab data-path benchmark's summary: ratios of ours, the plain handler and fileio."""

from __future__ import annotations

from typing import Any

from targetd_repl_bench.datapath import summarize


def _figures(iops: float, mb_s: float) -> dict[str, float]:
    return {"iops": iops, "mb_s": mb_s, "lat_ms": 1.0}


def _data(with_plain: bool) -> dict[str, Any]:
    results = {
        "ours": {"seq_write": _figures(10, 40.0), "rand4k_read_qd32": _figures(500, 2.0)},
        "fileio": {"seq_write": _figures(20, 100.0), "rand4k_read_qd32": _figures(1000, 4.0)},
    }
    data: dict[str, Any] = {
        "results": results,
        "round_ratios": {"seq_write": [0.3, 0.5], "rand4k_read_qd32": [0.5]},
        "runtime_s": 5,
        "rounds": 2,
        "workers": 4,
        "durability": "write-through",
    }
    if with_plain:
        results["plain"] = {"seq_write": _figures(15, 80.0), "rand4k_read_qd32": _figures(800, 3)}
        data["plain_round_ratios"] = {"seq_write": [0.7, 0.9], "rand4k_read_qd32": [0.8]}
    return data


def test_plain_handler_splits_the_gap_to_fileio() -> None:
    out = summarize(_data(with_plain=True))
    assert out["seq_write_vs_fileio"] == 0.4
    assert out["plain_seq_write_vs_fileio"] == 0.8
    assert out["seq_write_vs_plain"] == 0.5
    assert out["rand4k_read_vs_fileio"] == 0.5
    assert out["plain_rand4k_read_vs_fileio"] == 0.8
    assert out["rand4k_read_vs_plain"] == 0.625
    assert (out["plain_seq_write_vs_fileio_min"], out["plain_seq_write_vs_fileio_max"]) == (
        0.7,
        0.9,
    )
    assert "plain_rand4k_read_vs_fileio_min" not in out  # one round: no spread
    assert out["plain_seq_write_mb_s"] == 80.0


def test_without_plain_handler_only_fileio_ratios() -> None:
    out = summarize(_data(with_plain=False))
    assert out["seq_write_vs_fileio"] == 0.4
    assert not any(key.startswith("plain") or "_vs_plain" in key for key in out)
