"""The Prometheus endpoint (metrics.py): every family in the exposition format, the figures
read live from the engine and the pairs, and only /metrics served."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from targetd_repl.api.service import ControlService, Endpoints
from targetd_repl.metrics import CONTENT_TYPE, MetricsServer
from targetd_repl.model import PairMode, PairState
from targetd_repl.storage.engine import StorageEngine
from tests.unit.test_control_service import FakeReplication


@pytest.fixture
def site(tmp_path: Path) -> Iterator[tuple[StorageEngine, FakeReplication, MetricsServer]]:
    engine = StorageEngine.open(tmp_path / "state", site="a")
    replication = FakeReplication()
    service = ControlService(
        engine,
        replication,
        site="a",
        endpoints=Endpoints("127.0.0.1:7700", str(tmp_path / "control.sock")),
        peers={"b": "127.0.0.1:7701"},
    )
    server = MetricsServer(service, "127.0.0.1", 0)
    try:
        yield engine, replication, server
    finally:
        server.stop()
        engine.close()


def _scrape(server: MetricsServer, path: str = "/metrics") -> tuple[str, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}{path}", timeout=10) as reply:
        return reply.headers["Content-Type"], reply.read().decode()


def _samples(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def test_metrics_report_pairs_and_journals(
    site: tuple[StorageEngine, FakeReplication, MetricsServer],
) -> None:
    engine, replication, server = site
    engine.create_group("db")
    engine.create_volume("v1", 1 << 20, group="db")
    for i in range(5):
        engine.write("v1", i * 8, b"x" * 4096)
    replication.create_pair("db", "b", PairMode.ASYNC)
    content_type, text = _scrape(server)
    assert content_type == CONTENT_TYPE
    assert "# TYPE targetd_repl_journal_records_total counter" in text
    samples = _samples(text)
    who = 'group="db",peer="b",role="primary"'
    assert samples['targetd_repl_journal_records_total{group="db",role="primary"}'] == 5
    assert samples['targetd_repl_journal_used_bytes{group="db",role="primary"}'] > 5 * 4096
    assert samples[f"targetd_repl_pair_resync_total_bytes{{{who}}}"] == 10
    assert samples[f'targetd_repl_pair_state{{{who},state="copying"}}'] == 1
    assert samples[f'targetd_repl_pair_state{{{who},state="paired"}}'] == 0
    assert samples['targetd_repl_start_time_seconds{site="a"}'] > 0

    engine.write("v1", 0, b"y" * 512)  # read live at each scrape
    replication.resume("db")
    samples = _samples(_scrape(server)[1])
    assert samples['targetd_repl_journal_records_total{group="db",role="primary"}'] == 6
    assert samples[f'targetd_repl_pair_state{{{who},state="paired"}}'] == 1
    assert sum(v for k, v in samples.items() if k.startswith("targetd_repl_pair_state{")) == 1
    assert len(PairState) == sum(1 for k in samples if k.startswith("targetd_repl_pair_state{"))


def test_only_metrics_is_served(
    site: tuple[StorageEngine, FakeReplication, MetricsServer],
) -> None:
    _, _, server = site
    with pytest.raises(urllib.error.HTTPError) as caught:
        _scrape(server, "/")
    assert caught.value.code == 404
