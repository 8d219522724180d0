"""Unit tests of the control API in one process: ControlClient -> gRPC (Unix socket) -> the
servicers -> ControlService -> a real StorageEngine in a temporary directory. Replication is a
small fake here (pairs are tested against real controllers in tests/integration/)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import pytest

from targetd_repl.api import control_servicer
from targetd_repl.api.client import ControlClient
from targetd_repl.api.service import MAX_IO_BYTES, ControlService, Endpoints
from targetd_repl.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    TargetdReplError,
)
from targetd_repl.model import PairMode, PairState, Role
from targetd_repl.replication.errors import PeerUnavailable
from targetd_repl.replication.settings import FencePolicy
from targetd_repl.storage.engine import StorageEngine


@dataclass(frozen=True)
class Status:
    group: str
    peer: str
    mode: PairMode
    state: PairState
    role: Role = Role.PRIMARY
    epoch: int = 1
    last_seq: int = 0
    acked_seq: int = 0
    applied_seq: int = 0
    lag_records: int = 0
    lag_seconds: float = 0.0
    unsent_regions: int = 0
    resync_done_bytes: int = 0
    resync_total_bytes: int = 0
    detail: str = ""


class FakeReplication:
    def __init__(self) -> None:
        self.pairs: dict[str, Status] = {}
        self.peers: dict[str, str] = {}
        self.fences: dict[str, FencePolicy] = {}

    def set_peer_address(self, name: str, address: str) -> None:
        self.peers[name] = address

    def create_pair(
        self, group: str, peer: str, mode: PairMode, *, fence: FencePolicy = FencePolicy.NONE
    ) -> Status:
        if group in self.pairs:
            raise AlreadyExists(f"group {group!r} is already paired")
        self.pairs[group] = Status(group, peer, mode, PairState.COPYING, resync_total_bytes=10)
        self.fences[group] = fence
        return self.pairs[group]

    def pair_status(self, group: str) -> Status:
        if group not in self.pairs:
            raise NotFound(f"group {group!r} has no pair")
        return self.pairs[group]

    def list_pairs(self) -> Sequence[Status]:
        return list(self.pairs.values())

    def suspend(self, group: str) -> Status:
        self.pairs[group] = replace(self.pair_status(group), state=PairState.SUSPENDED)
        return self.pairs[group]

    def resume(self, group: str) -> Status:
        self.pairs[group] = replace(self.pair_status(group), state=PairState.PAIRED)
        return self.pairs[group]

    def delete_pair(self, group: str) -> None:
        self.pair_status(group)
        del self.pairs[group]


@dataclass
class Served:
    client: ControlClient
    engine: StorageEngine
    replication: FakeReplication


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    engine = StorageEngine.open(tmp_path / "state", site="a")
    replication = FakeReplication()
    socket = tmp_path / "control.sock"
    service = ControlService(
        engine,
        replication,
        site="a",
        endpoints=Endpoints("127.0.0.1:7700", str(socket)),
        peers={"b": "127.0.0.1:7701"},
    )
    server = grpc.server(futures.ThreadPoolExecutor(4))
    control_servicer.add_to_server(service, server)
    server.add_insecure_port(f"unix:{socket}")
    server.start()
    client = ControlClient.for_socket(socket, timeout=10)
    try:
        yield Served(client, engine, replication)
    finally:
        client.close()
        server.stop(None).wait()
        engine.close()


def test_volumes_and_groups(served: Served) -> None:
    c = served.client
    v = c.create_volume("v1", 1 << 20)
    assert (v.name, v.size_bytes, v.block_size, v.group) == ("v1", 1 << 20, 512, "v1")
    c.create_group("db")
    assert c.add_volume("db", "v1").group == "db"
    c.create_volume("v2", 1 << 20, block_size=4096, group="db")
    groups = {g.name: g for g in c.list_groups()}
    assert list(groups["db"].volumes) == ["v1", "v2"]
    assert [v.name for v in c.list_volumes("db")] == ["v1", "v2"]
    assert c.resize_volume("v2", 2 << 20).size_bytes == 2 << 20
    c.delete_volume("v2")
    assert [v.name for v in c.list_volumes()] == ["v1"]


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda c: c.delete_volume("nope"), NotFound, r"^volume 'nope' not found$"),
        (lambda c: c.list_volumes("nope"), NotFound, r"^group 'nope' not found$"),
        (lambda c: c.create_volume("v", 1 << 20), AlreadyExists, r"^volume 'v' already exists$"),
        (lambda c: c.create_volume("x", 0), InvalidArgument, r"size must be positive"),
        (lambda c: c.create_volume("x/y", 512), InvalidArgument, r"invalid volume name 'x/y'"),
        (lambda c: c.create_volume("x", 512, block_size=1024), InvalidArgument, r"block size"),
        (lambda c: c.write("v", 1, b"x" * 512), InvalidArgument, r"multiples of its block size"),
        (lambda c: c.write("v", 0, b""), InvalidArgument, r"length must be positive"),
        (lambda c: c.read("v", 0, 0), InvalidArgument, r"length must be positive"),
        (lambda c: c.read("v", 1 << 20, 512), TargetdReplError, r"past the end"),
        (lambda c: c.create_pair("v", "zz", PairMode.ASYNC), NotFound, r"peer site 'zz' not found"),
        (lambda c: c.create_pair("v", "b", PairMode.ASYNC, FencePolicy.FAIL_WRITES),
         InvalidArgument, r"fence policy fail-writes applies to sync pairs only"),
        (lambda c: c.pair_status("v"), NotFound, r"^group 'v' has no pair$"),
        (lambda c: c.set_peer_address("zz", "127.0.0.1:1"), NotFound, r"peer site 'zz'"),
        (lambda c: c.set_peer_address("b", "nowhere"), InvalidArgument, r"invalid address"),
    ],
)  # fmt: skip
def test_errors_come_back_typed_with_the_site_message(
    served: Served, call: object, error: type[Exception], message: str
) -> None:
    served.client.create_volume("v", 1 << 20)
    with pytest.raises(error, match=message):
        call(served.client)  # type: ignore[operator]


def test_io_goes_through_the_engine(served: Served) -> None:
    c = served.client
    c.create_volume("v", 8 << 20)
    data = bytes(range(256)) * (MAX_IO_BYTES // 256 + 4)  # over one call: the client splits
    seq = c.write("v", 4096, data)
    assert seq >= 2
    assert c.read("v", 4096, len(data)) == data
    assert served.engine.read("v", 8, 1) == data[:512]


def test_secondary_volume_refuses_writes(served: Served) -> None:
    served.engine.create_group("r", Role.SECONDARY)
    served.client.create_volume("v", 1 << 20, group="r")
    with pytest.raises(FailedPrecondition, match="read-only here"):
        served.client.write("v", 0, b"x" * 512)


def test_pairs_and_site(served: Served) -> None:
    c = served.client
    c.create_volume("v", 1 << 20)
    pair = c.create_pair("v", "b", PairMode.SYNC, FencePolicy.FAIL_WRITES)
    assert (pair.group, pair.peer, pair.resync_total_bytes) == ("v", "b", 10)
    assert served.replication.fences["v"] is FencePolicy.FAIL_WRITES
    assert [p.group for p in c.list_pairs()] == ["v"]
    c.suspend_pair("v")
    c.resume_pair("v")
    c.delete_pair("v")
    assert c.list_pairs() == []

    assert c.set_peer_address("b", "127.0.0.1:9").address == "127.0.0.1:9"
    assert served.replication.peers == {"b": "127.0.0.1:9"}
    info = c.site_info()
    assert (info.name, info.replication_address) == ("a", "127.0.0.1:7700")
    assert [(p.name, p.address) for p in info.peers] == [("b", "127.0.0.1:9")]


def test_unreachable_site(tmp_path: Path) -> None:
    with ControlClient.for_socket(tmp_path / "none.sock", timeout=2) as client:
        with pytest.raises(PeerUnavailable, match="cannot reach the site at unix:"):
            client.list_volumes()
        assert not client.serving()
