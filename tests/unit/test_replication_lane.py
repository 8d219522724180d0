"""The bulk lane (replication/bulk.py): a Ship stream's messages over a plain TCP connection
(mutual TLS with the site certificates) beside the gRPC stream. Pairs replicate over it; a
refused lane or a bad frame changes nothing; a receiver without a lane, or a lane that cannot be
reached, leaves the stream on gRPC."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from targetd_repl.errors import InvalidArgument
from targetd_repl.model import PairMode, PairState
from targetd_repl.replication import bulk
from targetd_repl.replication.certs import make_lab
from targetd_repl.replication.errors import PeerUnavailable
from targetd_repl.v1 import replication_pb2, replication_pb2_grpc
from tests.integration.tcp_proxy import TcpProxy
from tests.unit.test_replication_bad_input import _open, _record, _state, _unchanged
from tests.unit.test_replication_support import (
    BS,
    Site,
    WriteLog,
    converged,
    image,
    make_group,
    two_sites,
    write_load,
)

VOLUMES = ["v1", "v2"]


def _closed(sock: socket.socket) -> bool:
    """The server closed `sock` (end of file or a reset), rather than leaving it open."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def _replicate(a: Site, b: Site, count: int = 400) -> None:
    """An async pair under a write load; afterwards b's images equal a's."""
    make_group(a, "g", VOLUMES)
    a.manager.create_pair("g", "site-b", PairMode.ASYNC)
    converged(a, b, "g")
    write_load(a, VOLUMES, WriteLog(), count=count, seed=5)
    converged(a, b, "g")
    for volume in VOLUMES:
        assert image(a, volume) == image(b, volume)


def test_an_async_pair_ships_over_the_lane(tmp_path: Path) -> None:
    a, b = two_sites(tmp_path, lane=True)
    try:
        _replicate(a, b)
        assert b.manager.lane is not None and b.manager.lane.admitted >= 1
    finally:
        a.close()
        b.close()


def test_a_sync_pair_over_the_lane_completes_writes_once_the_peer_holds_them(
    tmp_path: Path,
) -> None:
    a, b = two_sites(tmp_path, lane=True)
    try:
        make_group(a, "g", ["v1"])
        a.manager.create_pair("g", "site-b", PairMode.SYNC)
        converged(a, b, "g")
        for i in range(20):
            seq = a.engine.write("v1", i * 8, bytes([i + 1]) * (8 * BS))
            assert b.engine.group("g").journal.durable_seq >= seq  # held before the ack
        assert b.manager.lane is not None and b.manager.lane.admitted >= 1
    finally:
        a.close()
        b.close()


def test_the_lane_over_mutual_tls_checks_both_certificates(tmp_path: Path) -> None:
    tls = make_lab(tmp_path / "pki", ("site-a", "site-b", "site-c"))
    a, b = two_sites(tmp_path, tls={"site-a": tls["site-a"], "site-b": tls["site-b"]}, lane=True)
    try:
        _replicate(a, b, count=100)
        listener = b.manager.lane
        assert listener is not None and listener.admitted >= 1

        # A certificate of the same CA naming another site, with a token offered to site-a:
        # TLS completes (the CA signed it), then the server refuses the lane and closes it.
        admitted = listener.admitted
        offer = listener.offer("site-a")
        with contextlib.suppress(PeerUnavailable):
            bulk.open_lane("127.0.0.1", offer.port, offer.token, "site-b", tls["site-c"], 5).close()
        with pytest.raises(PeerUnavailable, match="did not open the bulk lane"):
            offer.accept(1.0)
        assert listener.admitted == admitted

        # The sender checks the server: site-b's certificate does not name site-c.
        offer = listener.offer("site-a")
        with pytest.raises(PeerUnavailable):
            bulk.open_lane("127.0.0.1", offer.port, offer.token, "site-c", tls["site-a"], 5)
        offer.withdraw()

        # Plaintext to the TLS lane: no lane.
        offer = listener.offer("site-a")
        with socket.create_connection(("127.0.0.1", offer.port)) as raw:
            raw.sendall(offer.token)
            raw.settimeout(5)
            assert _closed(raw)  # the TLS handshake failed
        with pytest.raises(PeerUnavailable):
            offer.accept(0.5)
    finally:
        a.close()
        b.close()


@pytest.fixture
def listener() -> Iterator[bulk.LaneListener]:
    lane = bulk.LaneListener("127.0.0.1", 0, None)
    yield lane
    lane.close()


def _connect(listener: bulk.LaneListener) -> tuple[socket.socket, bulk.LaneReceiver]:
    offer = listener.offer("site-a")
    raw = socket.create_connection(("127.0.0.1", offer.port))
    raw.sendall(offer.token)
    return raw, offer.accept(5)


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (bulk.FRAME.pack(9, 0, 0, 0, 0), "unknown kind 9"),
        (bulk.FRAME.pack(bulk.KIND_BATCH, 1, 1, 1, 65 << 20), "at most"),
        (bulk.FRAME.pack(bulk.KIND_BATCH, 1, 1, 1, 1000) + b"x" * 10, "ended inside a frame"),
        (bulk.FRAME.pack(bulk.KIND_BATCH, 1, 1, 1, 0)[:20], "ended inside a frame"),
    ],
)
def test_a_frame_the_receiver_cannot_read_is_invalid_argument(
    listener: bulk.LaneListener, frame: bytes, message: str
) -> None:
    raw, lane = _connect(listener)
    raw.sendall(frame)
    raw.shutdown(socket.SHUT_WR)
    with pytest.raises(InvalidArgument, match=message):
        list(lane.frames())
    raw.close()
    lane.close()


def test_frames_arrive_whole_and_in_order(listener: bulk.LaneListener) -> None:
    offer = listener.offer("site-a")
    sender = bulk.open_lane("127.0.0.1", offer.port, offer.token, "site-b", None, 5)
    receiver = offer.accept(5)
    big = os.urandom(3 << 20)
    path = Path(f"/dev/shm/lane-test-{os.getpid()}")
    path.write_bytes(b"head" + big)
    fd = os.open(path, os.O_RDONLY)
    try:
        sender.send_batch(2, 10, 3, b"abc")
        sender.send_message(b"hello")
        sender.send_file(2, 13, 7, fd, 4, len(big))
        sender.close()
        frames = list(receiver.frames())
    finally:
        os.close(fd)
        path.unlink()
        receiver.close()
    assert frames == [
        bulk.Batch(2, 10, 3, b"abc"),
        bulk.Message(b"hello"),
        bulk.Batch(2, 13, 7, big),
    ]


def test_a_signal_during_a_frame_loses_nothing(listener: bulk.LaneListener) -> None:
    """MSG_WAITALL returns early when a signal arrives mid-frame (a profiler's, a handler's):
    the receiver fetches the rest, the frame is whole."""
    payload = os.urandom(1 << 20)
    raw, lane = _connect(listener)
    seen: list[int] = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: seen.append(signum))

    def send() -> None:
        raw.sendall(bulk.FRAME.pack(bulk.KIND_BATCH, 1, 1, 1, len(payload)) + payload[:1000])
        time.sleep(0.3)  # the receiver waits inside recv for the rest
        os.kill(os.getpid(), signal.SIGUSR1)  # delivered to the main thread: the receiver
        time.sleep(0.3)
        raw.sendall(payload[1000:])
        raw.close()

    sender = threading.Thread(target=send)
    sender.start()
    try:
        frames = list(lane.frames())
    finally:
        sender.join()
        signal.signal(signal.SIGUSR1, previous)
        lane.close()
    assert seen == [signal.SIGUSR1]
    assert frames == [bulk.Batch(1, 1, 1, payload)]


def test_an_unknown_token_is_refused(listener: bulk.LaneListener) -> None:
    offer = listener.offer("site-a")
    with socket.create_connection(("127.0.0.1", offer.port)) as raw:
        raw.sendall(os.urandom(bulk.TOKEN_BYTES))
        raw.settimeout(5)
        assert _closed(raw)
    with pytest.raises(PeerUnavailable):
        offer.accept(0.2)
    assert listener.admitted == 0


def _batch_frame(a: Site, first: int, count: int, records: bytes) -> bytes:
    epoch = a.engine.group("g").info.epoch
    return bulk.FRAME.pack(bulk.KIND_BATCH, count, epoch, first, len(records)) + records


def _ship_over_lane(
    b: Site, opening: replication_pb2.ShipRequest, frames: list[bytes] | None
) -> grpc.RpcError:
    """Open a Ship stream asking for the lane, send `frames` over it (None: never connect to
    the lane), return the call's error."""
    channel = grpc.insecure_channel(b.address)
    done = threading.Event()

    def requests() -> Iterator[replication_pb2.ShipRequest]:
        yield opening
        done.wait(10)  # the rest goes over the lane

    try:
        call = replication_pb2_grpc.ReplicationStub(channel).Ship(requests(), timeout=10)
        with pytest.raises(grpc.RpcError) as caught:
            first = next(call)
            assert first.bulk_port == b.lane_port and len(first.bulk_token) == bulk.TOKEN_BYTES
            if frames is not None:
                with socket.create_connection(("127.0.0.1", first.bulk_port)) as raw:
                    raw.sendall(first.bulk_token)
                    for frame in frames:
                        raw.sendall(frame)
                    for _ in call:
                        pass
            for _ in call:
                pass
        return caught.value
    finally:
        done.set()
        channel.close()


@pytest.fixture
def lane_paired(tmp_path: Path) -> Iterator[tuple[Site, Site]]:
    a, b = two_sites(tmp_path, lane=True)
    make_group(a, "g", ["v1"])
    a.manager.create_pair("g", "site-b", PairMode.ASYNC)
    a.engine.write("v1", 0, b"a" * BS)
    converged(a, b, "g")
    a.manager.suspend("g")  # the test drives the stream itself
    a.manager.wait_for("g", lambda s: s.state is PairState.SUSPENDED)
    yield a, b
    a.close()
    b.close()


def _bad_checksum(a: Site, seq: int) -> list[bytes] | None:
    bad = bytearray(_record(a, seq + 1))
    bad[100] ^= 0xFF  # a payload byte flipped on the wire
    return [_batch_frame(a, seq, 2, _record(a, seq) + bytes(bad))]


def _out_of_order(a: Site, seq: int) -> list[bytes] | None:
    return [_batch_frame(a, seq + 1, 1, _record(a, seq + 1))]  # one past the next seq


def _never_connects(a: Site, seq: int) -> list[bytes] | None:
    return None


@pytest.mark.parametrize(
    ("frames", "code", "message"),
    [
        (_bad_checksum, grpc.StatusCode.DATA_LOSS, "CRC32C mismatch"),
        (_out_of_order, grpc.StatusCode.OUT_OF_RANGE, "out-of-order batch"),
        (_never_connects, grpc.StatusCode.UNAVAILABLE, "did not open the bulk lane"),
    ],
)
def test_refusals_over_the_lane_store_nothing(
    lane_paired: tuple[Site, Site],
    frames: Callable[[Site, int], list[bytes] | None],
    code: grpc.StatusCode,
    message: str,
) -> None:
    a, b = lane_paired
    before = _state(b)
    error = _ship_over_lane(b, _open(a, b, bulk=True), frames(a, before[0]))
    assert error.code() is code
    assert message in (error.details() or "")
    _unchanged(b, before)  # not even the good first record of a batch


def test_without_a_lane_at_the_receiver_the_stream_stays_on_grpc(tmp_path: Path) -> None:
    a, b = two_sites(tmp_path)  # no lane offered: a 1.1 receiver
    try:
        assert a.settings.bulk  # a asks for one
        _replicate(a, b, count=100)
        assert b.manager.lane is None
    finally:
        a.close()
        b.close()


def test_a_lane_that_cannot_be_reached_falls_back_to_grpc(tmp_path: Path) -> None:
    a, b = two_sites(tmp_path, lane=True)
    try:
        # Where a is told the lane is, nothing listens (a NAT mapping gone wrong).
        a.manager.set_peer_address("site-b", b.address, lane_address="127.0.0.1:1")
        _replicate(a, b, count=100)
        assert b.manager.lane is not None and b.manager.lane.admitted == 0
    finally:
        a.close()
        b.close()


def test_the_lane_reached_through_its_configured_address(tmp_path: Path) -> None:
    a, b = two_sites(tmp_path, lane=True)
    proxy = TcpProxy(("127.0.0.1", b.port))
    lane_address = proxy.route(("127.0.0.1", b.lane_port))
    a.manager.set_peer_address("site-b", proxy.address, lane_address=lane_address)
    try:
        _replicate(a, b, count=100)
        assert b.manager.lane is not None and b.manager.lane.admitted >= 1
        assert proxy.connections >= 2  # the gRPC channel and the lane both went through it
    finally:
        proxy.close()
        a.close()
        b.close()


def test_tls_lane_uses_the_site_certificates_only(tmp_path: Path) -> None:
    """A lane with TLS refuses a client without a certificate (mutual TLS, as gRPC's server)."""
    tls = make_lab(tmp_path / "pki", ("site-a", "site-b"))
    listener = bulk.LaneListener("127.0.0.1", 0, tls["site-b"])
    try:
        offer = listener.offer("site-a")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(tls["site-a"].ca)
        with (
            socket.create_connection(("127.0.0.1", offer.port)) as raw,
            context.wrap_socket(raw, server_hostname="site-b") as wrapped,
        ):
            wrapped.settimeout(5)
            try:
                wrapped.sendall(offer.token)
                refused = _closed(wrapped)
            except (ssl.SSLError, OSError):
                refused = True
            assert refused
        with pytest.raises(PeerUnavailable):
            offer.accept(0.5)
        assert listener.admitted == 0
    finally:
        listener.close()
