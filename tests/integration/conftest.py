"""Fixtures for integration tests: real controller processes on 127.0.0.1 (harness.py).

`cluster(names...)` makes and starts sites that are each other's peers; every site still
running at the end of the test is stopped (SIGTERM, SIGKILL if it hangs). When a test fails,
each site's log is attached to its report.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.harness import Cluster

MakeCluster = Callable[..., Cluster]

_CLUSTERS = pytest.StashKey[list[Cluster]]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed and report.when in ("setup", "call"):
        for cluster in item.stash.get(_CLUSTERS, []):
            for name, text in cluster.logs().items():
                tail = "\n".join(text.splitlines()[-200:])
                report.sections.append((f"site {name} log (last 200 lines)", tail))
    return report


@pytest.fixture
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MakeCluster]:
    """cluster("a", "b", start=True, **site_options) -> a started Cluster."""
    made: list[Cluster] = []
    request.node.stash[_CLUSTERS] = made

    def make(*names: str, start: bool = True, **site_options: Any) -> Cluster:
        made_cluster = Cluster(tmp_path / f"c{len(made)}", names, **site_options)
        made.append(made_cluster)
        if start:
            made_cluster.start()
        return made_cluster

    yield make
    for made_cluster in made:
        made_cluster.stop()
