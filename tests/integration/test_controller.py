"""One real controller process (`targetd-repl serve`) driven through the CLI and the control API:
volume and group lifecycle, I/O round trips, errors as one line with the right exit status,
clean shutdown on SIGTERM, restart and crash (SIGKILL) recovery, and the endpoints' security."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
import subprocess
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from targetd_repl.api.client import ControlClient
from targetd_repl.errors import NotFound
from tests.integration.conftest import MakeCluster
from tests.integration.harness import CLI, Site

pytestmark = pytest.mark.integration

MiB = 1 << 20


def one_line_error(done: subprocess.CompletedProcess[bytes]) -> str:
    err = done.stderr.decode()
    assert err.count("\n") == 1, err
    assert "Traceback" not in err
    return err.rstrip("\n")


def test_volume_and_group_lifecycle_through_the_cli(cluster: MakeCluster) -> None:
    a = cluster("a")["a"]
    v1 = a.cli_json("volume", "create", "v1", "--size", "4M")
    assert v1 == {**v1, "name": "v1", "size_bytes": 4 * MiB, "block_size": 512, "group": "v1"}
    v2 = a.cli_json("volume", "create", "v2", "--size", "1M", "--block-size", "4096")
    assert (v2["block_size"], v2["group"]) == (4096, "v2")

    db = a.cli_json("group", "create", "db")
    assert db == {**db, "name": "db", "role": "primary", "epoch": 1, "volumes": [], "peer": ""}
    moved = a.cli_json("group", "add", "db", "v1")
    assert moved["group"] == "db"
    a.cli_json("volume", "create", "v3", "--size", "2M", "--group", "db")

    groups = {g["name"]: g for g in a.cli_json("group", "list")}
    assert groups["db"]["volumes"] == ["v1", "v3"]
    assert groups["v1"]["volumes"] == []  # the group made for v1 stays, empty
    assert groups["v2"]["volumes"] == ["v2"]

    volumes = a.cli_json("volume", "list")
    assert [(v["name"], v["group"]) for v in volumes] == [("v1", "db"), ("v2", "v2"), ("v3", "db")]
    assert [v["name"] for v in a.cli_json("volume", "list", "--group", "db")] == ["v1", "v3"]

    assert a.cli_json("volume", "resize", "v3", "--size", "8M")["size_bytes"] == 8 * MiB
    assert a.cli_json("volume", "delete", "v2") == {"deleted": "v2"}
    assert [v["name"] for v in a.cli_json("volume", "list")] == ["v1", "v3"]
    assert "v2" not in {g["name"] for g in a.cli_json("group", "list")}

    # Human output: tables with the names in them, exit 0.
    table = a.cli("volume", "list")
    assert table.returncode == 0
    assert b"v1" in table.stdout and b"4 MiB" in table.stdout and b"db" in table.stdout


def test_io_round_trip(cluster: MakeCluster, tmp_path: Path) -> None:
    a = cluster("a")["a"]
    a.cli_json("volume", "create", "v", "--size", "8M")

    first = a.cli_json("io", "write", "v", "--offset", "1M", "--pattern", "0x5a", "--length", "64K")
    assert first == {"volume": "v", "offset": MiB, "length": 64 << 10, "seq": first["seq"]}
    blob = os.urandom(3 * MiB + 4096)  # more than one call moves: the client splits it
    source = tmp_path / "blob"
    source.write_bytes(blob)
    second = a.cli_json("io", "write", "v", "--offset", "2M", "--data-file", str(source))
    assert second["seq"] > first["seq"]

    out = tmp_path / "back"
    done = a.cli_json(
        "io", "read", "v", "--offset", "2M", "--length", str(len(blob)), "--out", str(out)
    )
    assert out.read_bytes() == blob
    assert done["sha256"] == hashlib.sha256(blob).hexdigest()

    read = a.cli_json("io", "read", "v", "--offset", "1M", "--length", "64K")
    assert base64.b64decode(read["data_base64"]) == b"\x5a" * (64 << 10)
    raw = a.cli("io", "read", "v", "--offset", "0", "--length", "4K")  # not a tty: raw bytes
    assert raw.returncode == 0 and raw.stdout == bytes(4096)

    with a.connected() as client:  # the API directly, as the Ansible modules will
        seq = client.write("v", 0, b"\x01" * 512)
        assert seq > second["seq"]
        assert client.read("v", 0, 1024) == b"\x01" * 512 + bytes(512)


ERRORS: list[tuple[list[str], int, str]] = [
        (["volume", "delete", "nope"], 1, "targetd-repl: volume 'nope' not found"),
        (["io", "read", "nope", "--offset", "0", "--length", "512"], 1,
         "targetd-repl: volume 'nope' not found"),
        (["volume", "create", "v", "--size", "1M"], 1, "targetd-repl: volume 'v' already exists"),
        (["volume", "create", "w", "--size", "1M", "--group", "nogroup"], 1,
         "targetd-repl: group 'nogroup' not found"),
        (["volume", "create", "bad/name", "--size", "1M"], 1,
         "targetd-repl: invalid volume name 'bad/name'"),
        (["volume", "create", "w", "--size", "1000"], 1, "targetd-repl: "),
        (["io", "write", "v", "--offset", "100", "--pattern", "1", "--length", "512"], 1,
         "targetd-repl: volume 'v': offset 100 and length 512 must be multiples of its block size"),
        (["io", "write", "v", "--offset", "1M", "--pattern", "1", "--length", "512"], 1,
         "targetd-repl: volume 'v': LBA 2048 + 1 blocks is past the end"),
        (["pair", "create", "v", "--peer", "zz", "--mode", "async"], 1,
         "targetd-repl: peer site 'zz' not found in this site's configuration"),
        (["volume", "create", "w", "--size", "1X"], 2,
         "targetd-repl volume create: argument --size: invalid size '1X'"),
        (["io", "read", "v", "--offset", "0"], 2,
         "targetd-repl io read: the following arguments are required: --length"),
]  # fmt: skip


def test_errors_are_one_line_with_the_right_status(cluster: MakeCluster) -> None:
    a = cluster("a")["a"]
    a.cli_json("volume", "create", "v", "--size", "1M")
    for argv, code, message in ERRORS:
        done = a.cli(*argv)
        assert done.returncode == code, (argv, done.stderr)
        assert done.stdout == b"", argv
        assert one_line_error(done).startswith(message), argv
    assert [v["name"] for v in a.cli_json("volume", "list")] == ["v"]  # nothing changed


def test_errors_as_typed_exceptions_through_the_client(cluster: MakeCluster) -> None:
    a = cluster("a")["a"]
    with a.connected() as client, pytest.raises(NotFound, match=r"^volume 'nope' not found$"):
        client.read("nope", 0, 512)


def test_sigterm_is_a_clean_shutdown_and_restart_keeps_everything(cluster: MakeCluster) -> None:
    c = cluster("a")
    a = c["a"]
    a.cli_json("volume", "create", "v", "--size", "2M")
    a.cli_json("group", "create", "g")
    a.cli_json("group", "add", "g", "v")
    data = os.urandom(64 << 10)
    with a.connected() as client:
        client.write("v", 4096, data)
    address = a.replication_address

    assert a.stop() == 0
    log = a.log_text()
    assert "received SIGTERM: shutting down" in log and "site a stopped" in log
    assert not (a.state_dir / "endpoints.json").exists()
    assert not a.socket.exists()

    a.start()
    assert a.replication_address == address  # pinned by the cluster: same port after restart
    assert [(v["name"], v["group"]) for v in a.cli_json("volume", "list")] == [("v", "g")]
    with a.connected() as client:
        assert client.read("v", 4096, len(data)) == data
    info = a.cli_json("site", "info")
    assert (info["name"], info["pid"], info["replication_address"]) == ("a", a.pid, address)


def test_sigkill_then_restart_keeps_acknowledged_writes(cluster: MakeCluster) -> None:
    a = cluster("a")["a"]
    a.cli_json("volume", "create", "v", "--size", "4M")
    written: dict[int, bytes] = {}
    with a.connected() as client:
        for i in range(32):
            block = os.urandom(4096)
            client.write("v", i * 8192, block)
            written[i * 8192] = block
    a.kill()
    a.start()  # same state directory, same socket, same port
    with a.connected() as client:
        for offset, block in written.items():
            assert client.read("v", offset, 4096) == block


def test_a_second_controller_on_the_same_state_is_refused(cluster: MakeCluster) -> None:
    a = cluster("a")["a"]
    done = subprocess.run(
        [*CLI, "serve", "--config", str(a.config_path)],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    last = done.stderr.decode().strip().splitlines()[-1]
    assert last == (
        f"targetd-repl: state directory {a.state_dir} is in use by another controller (pid {a.pid})"
    )
    assert a.cli_json("volume", "list") == []  # the first one still serves


def test_bad_config_exits_2_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "site.toml"
    path.write_text('[site]\nname = "a"\nstate_dir = "s"\n[replication]\nlisten = "nowhere"\n')
    done = subprocess.run(
        [*CLI, "serve", "--config", str(path)], capture_output=True, timeout=60, check=False
    )
    assert done.returncode == 2
    assert one_line_error(done) == (
        f"targetd-repl: config {path}: replication.listen: invalid address 'nowhere': "
        "use host:port (IPv6: [addr]:port)"
    )


def test_control_socket_is_root_only(cluster: MakeCluster) -> None:
    a = cluster("a")["a"]
    assert stat.S_IMODE(a.socket.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(a.socket.stat().st_mode) == 0o600
    endpoints = json.loads((a.state_dir / "endpoints.json").read_text())
    assert endpoints["control_socket"] == str(a.socket)
    assert endpoints["pid"] == a.pid


def _tls(site: Site, name: str) -> grpc.ChannelCredentials:
    certs = site.certs
    return grpc.ssl_channel_credentials(
        root_certificates=(certs / "ca.pem").read_bytes(),
        private_key=(certs / f"{name}.key").read_bytes(),
        certificate_chain=(certs / f"{name}.pem").read_bytes(),
    )


def _health(channel: grpc.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
    return int(reply.status)


def test_replication_endpoint_needs_a_certificate_from_our_ca(cluster: MakeCluster) -> None:
    c = cluster("a", "b")
    a = c["a"]
    options = [("grpc.ssl_target_name_override", "a")]
    with grpc.secure_channel(a.replication_address, _tls(a, "b"), options=options) as channel:
        assert _health(channel) == health_pb2.HealthCheckResponse.SERVING
        assert _health(channel, "targetd_repl.v1.Replication") == (
            health_pb2.HealthCheckResponse.SERVING
        )
    no_cert = grpc.ssl_channel_credentials(root_certificates=(a.certs / "ca.pem").read_bytes())
    with grpc.secure_channel(a.replication_address, no_cert, options=options) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            _health(channel)
        assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
    with grpc.insecure_channel(a.replication_address) as channel, pytest.raises(grpc.RpcError):
        _health(channel)


def test_control_over_tcp_with_mutual_tls(cluster: MakeCluster) -> None:
    a = cluster("a", control_tcp=True)["a"]
    address = str(a.endpoints["control_address"])
    assert address.startswith("127.0.0.1:") and not address.endswith(":0")
    done = a.cli("--address", address, "--site-config", str(a.config_path), "group", "create", "g")
    assert done.returncode == 0, done.stderr
    tls = ControlClient.for_tcp(
        address,
        ca=(a.certs / "ca.pem").read_bytes(),
        cert=(a.certs / "a.pem").read_bytes(),
        key=(a.certs / "a.key").read_bytes(),
        server_name="a",
    )
    with tls:
        assert [g.name for g in tls.list_groups()] == ["g"]
    with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError):
        _health(channel)
