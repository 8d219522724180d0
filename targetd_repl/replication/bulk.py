"""The bulk lane: a Ship stream's messages over a plain TCP connection beside the gRPC stream.

gRPC-Python copies every message several times between Python and its core, and its threads
hold the GIL the writers need; a lane moves journal bytes with one `sendall` of the journal's
stored bytes at the sender and one `recv_into` a fresh buffer at the receiver, which the
receive journal then writes without another copy. The gRPC stream stays the control channel:
the opening, the receiver's checks and every acknowledgement travel on it, and when either
ends the other is closed.

Negotiation (replication.proto, revision 1.2). The sender sets `ShipOpen.bulk`; a receiver with
a lane answers in its first ShipAck with the lane's port and a token of 32 random bytes good for
this stream only. The sender connects to that port at the host its gRPC channel dialed, with
mutual TLS when the channel uses TLS (the same site certificates: the receiver checks that the
client's certificate names the site that opened the stream, the sender that the server's names
the peer), and sends the token. From then on every message of the stream goes over the lane, in
order; a receiver that offered no lane (a 1.1 site) keeps the stream on gRPC.

Framing: each frame is a 32-byte header, then `length` bytes.

    offset  size  field (little-endian)
       0      1   kind: 1 batch (the journal's stored records), 2 a serialized ShipRequest
       1      3   zero
       4      4   count      records in a batch (0 for kind 2)
       8      8   epoch      the sender's epoch (batch; 0 for kind 2)
      16      8   first_seq  the batch's first seq (0 for kind 2)
      24      8   length     bytes that follow (at most channel.MAX_MESSAGE_BYTES)

A frame the receiver cannot read (another kind, a length past the limit, a connection that ends
inside a frame) is InvalidArgument and ends the stream; the records themselves are checked as
any shipped batch (CRC32C, seqs, volume ids) before anything is stored.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import ssl
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from targetd_repl.errors import InvalidArgument
from targetd_repl.replication.channel import MAX_MESSAGE_BYTES, TlsFiles
from targetd_repl.replication.errors import PeerUnavailable, PermissionDenied

log = logging.getLogger(__name__)

FRAME = struct.Struct("<B3xIQQQ")
KIND_BATCH = 1
KIND_MESSAGE = 2
TOKEN_BYTES = 32
_HANDSHAKE_TIMEOUT = 10.0  # seconds a new connection has to finish TLS and send its token
_SOCKET_BUFFER = 4 << 20  # a batch in flight in the kernel while the last one is stored


@dataclass(frozen=True, slots=True)
class Batch:
    """A batch frame as received: `records` is a fresh buffer the receiver may keep."""

    epoch: int
    first_seq: int
    count: int
    records: bytes | bytearray  # a fresh buffer from the lane, or a message's bytes


@dataclass(frozen=True, slots=True)
class Message:
    """A kind-2 frame: the bytes of one serialized ShipRequest."""

    data: bytes | bytearray


def _tune(sock: socket.socket) -> None:
    # Small frames (a sync write's batch, a heartbeat) must not wait for Nagle's timer.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_BUFFER)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCKET_BUFFER)


def _certificate_names(sock: ssl.SSLSocket) -> set[str]:
    """The subject CN and DNS subject alternative names of the peer's verified certificate."""
    cert: dict[str, Any] = dict(sock.getpeercert() or {})
    names: set[str] = set()
    for rdn in cert.get("subject", ()):
        names.update(str(value) for key, value in rdn if key == "commonName")
    names.update(str(value) for key, value in cert.get("subjectAltName", ()) if key == "DNS")
    return names


def _recv_exactly(sock: socket.socket, view: memoryview) -> bool:
    """Fill `view`; False if the connection ended before the first byte, InvalidArgument if it
    ended inside."""
    got = 0
    total = view.nbytes
    while got < total:
        n = sock.recv_into(view[got:])
        if not n:
            if got == 0:
                return False
            raise InvalidArgument(f"the bulk lane ended inside a frame ({got} of {total} bytes)")
        got += n
    return True


def _shut(sock: socket.socket) -> None:
    """Shut down and close `sock`; a thread blocked on it wakes up with an error or EOF."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


class _Lane:
    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._closed = False

    def close(self) -> None:
        """Close the lane (also from another thread: a blocked send or receive then ends)."""
        if not self._closed:
            self._closed = True
            _shut(self._sock)


class LaneReceiver(_Lane):
    """The receiving end of one stream's lane (the secondary)."""

    def _payload(self, length: int) -> bytes | bytearray:
        """The next `length` bytes in a fresh buffer (the receive cache keeps views into it).
        A plain socket fills an uninitialised bytes object in one call (MSG_WAITALL): a
        zeroed bytearray would cost one more pass over every batch."""
        got = b""
        if not isinstance(self._sock, ssl.SSLSocket):
            got = self._sock.recv(length, socket.MSG_WAITALL) if length else b""
            if len(got) == length:
                return got
            if not got:
                raise InvalidArgument("the bulk lane ended after a frame header")
            # A signal cut the wait short (MSG_WAITALL returns what it has): fetch the rest.
        buffer = bytearray(length)
        buffer[: len(got)] = got
        view = memoryview(buffer)[len(got) :]
        if view.nbytes and not _recv_exactly(self._sock, view):
            raise InvalidArgument(
                f"the bulk lane ended inside a frame ({len(got)} of {length} bytes)"
            )
        return buffer

    def frames(self) -> Iterator[Batch | Message]:
        """Frames in the order sent, until the sender closes the lane."""
        header = bytearray(FRAME.size)
        header_view = memoryview(header)
        while True:
            if not _recv_exactly(self._sock, header_view):
                return
            kind, count, epoch, first_seq, length = FRAME.unpack(header)
            if kind not in (KIND_BATCH, KIND_MESSAGE):
                raise InvalidArgument(f"the bulk lane sent a frame of unknown kind {kind}")
            if length > MAX_MESSAGE_BYTES:
                raise InvalidArgument(
                    f"the bulk lane sent a frame of {length} bytes (at most {MAX_MESSAGE_BYTES})"
                )
            data = self._payload(length)
            if kind == KIND_BATCH:
                yield Batch(epoch, first_seq, count, data)
            else:
                yield Message(data)


class _Expected:
    """A lane a stream offered and waits for."""

    def __init__(self, site: str) -> None:
        self.site = site
        self.token = secrets.token_bytes(TOKEN_BYTES)
        self.arrived = threading.Event()
        self.receiver: LaneReceiver | None = None


class Offer:
    """What the servicer hands the sender (`port`, `token`) and waits on (`accept`)."""

    def __init__(self, listener: LaneListener, expected: _Expected) -> None:
        self._listener = listener
        self._expected = expected

    @property
    def port(self) -> int:
        return self._listener.port

    @property
    def token(self) -> bytes:
        return self._expected.token

    def accept(self, timeout: float) -> LaneReceiver:
        """The lane once the sender connected with the token (PeerUnavailable after
        `timeout` seconds without it)."""
        try:
            if not self._expected.arrived.wait(timeout) or self._expected.receiver is None:
                raise PeerUnavailable(
                    f"site {self._expected.site} did not open the bulk lane it was offered "
                    f"within {timeout:g} s"
                )
            return self._expected.receiver
        finally:
            self._listener.withdraw(self._expected)

    def withdraw(self) -> None:
        self._listener.withdraw(self._expected)


class LaneListener:
    """A site's lane server: one listening socket; each connection is matched by its token to
    the stream that offered it. `close()` stops it."""

    def __init__(self, host: str, port: int, tls: TlsFiles | None) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._server = socket.create_server((host, port), family=family, backlog=16)
        self.port: int = self._server.getsockname()[1]
        self._context: ssl.SSLContext | None = None
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            context.load_cert_chain(tls.cert, tls.key)
            context.load_verify_locations(tls.ca)
            context.verify_mode = ssl.CERT_REQUIRED  # mutual TLS, as the gRPC server
            self._context = context
        self._lock = threading.Lock()
        self._expected: dict[bytes, _Expected] = {}
        self._closed = False
        self.admitted = 0  # connections matched to a stream (for status and tests)
        self._thread = threading.Thread(target=self._accept_loop, name="repl-lane", daemon=True)
        self._thread.start()

    def offer(self, site: str) -> Offer:
        expected = _Expected(site)
        with self._lock:
            self._expected[expected.token] = expected
        return Offer(self, expected)

    def withdraw(self, expected: _Expected) -> None:
        with self._lock:
            self._expected.pop(expected.token, None)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            waiting = list(self._expected.values())
            self._expected.clear()
        for expected in waiting:
            expected.arrived.set()  # no receiver: accept() says the lane did not come
        _shut(self._server)
        self._thread.join(timeout=5)

    def _accept_loop(self) -> None:
        while True:
            try:
                sock, address = self._server.accept()
            except OSError:
                return  # closed
            threading.Thread(
                target=self._admit, args=(sock, address), name="repl-lane-admit", daemon=True
            ).start()

    def _admit(self, sock: socket.socket, address: object) -> None:
        """TLS, then the token; a connection that fails either is closed with one log line."""
        try:
            sock.settimeout(_HANDSHAKE_TIMEOUT)
            _tune(sock)
            names: set[str] | None = None
            if self._context is not None:
                sock = self._context.wrap_socket(sock, server_side=True)
                names = _certificate_names(sock)
            token = bytearray(TOKEN_BYTES)
            if not _recv_exactly(sock, memoryview(token)):
                raise InvalidArgument("closed before sending its token")
            with self._lock:
                expected = self._expected.pop(bytes(token), None)
            if expected is None:
                raise PermissionDenied("unknown or expired token")
            if names is not None and expected.site not in names:
                shown = ", ".join(sorted(names)) or "no name"
                raise PermissionDenied(
                    f"the stream was opened by site {expected.site!r} but the lane's "
                    f"certificate names {shown}"
                )
            sock.settimeout(None)
            with self._lock:
                self.admitted += 1
            expected.receiver = LaneReceiver(sock)
            expected.arrived.set()
        except (OSError, ssl.SSLError, InvalidArgument, PermissionDenied) as error:
            log.warning("bulk lane connection from %s refused: %s", address, error)
            sock.close()


class LaneSender(_Lane):
    """The sending end (the primary): connect with `open_lane`, then frames in order."""

    def send_batch(self, epoch: int, first_seq: int, count: int, records: bytes) -> None:
        header = FRAME.pack(KIND_BATCH, count, epoch, first_seq, len(records))
        self._sock.sendall(header)
        self._sock.sendall(records)

    def send_file(
        self, epoch: int, first_seq: int, count: int, fd: int, offset: int, length: int
    ) -> None:
        """A batch straight from the journal's file (sendfile: no copy through Python); only
        on a plain lane (`zero_copy`)."""
        self._sock.sendall(FRAME.pack(KIND_BATCH, count, epoch, first_seq, length))
        out = self._sock.fileno()
        end = offset + length
        while offset < end:
            sent = os.sendfile(out, fd, offset, end - offset)
            if sent == 0:
                raise OSError(f"the journal file ended {end - offset} bytes early")
            offset += sent

    @property
    def zero_copy(self) -> bool:
        """True when batches may go with `send_file` (no TLS layer between)."""
        return not isinstance(self._sock, ssl.SSLSocket)

    def send_message(self, data: bytes) -> None:
        self._sock.sendall(FRAME.pack(KIND_MESSAGE, 0, 0, 0, len(data)) + data)


def open_lane(
    host: str, port: int, token: bytes, peer_site: str, tls: TlsFiles | None, timeout: float
) -> LaneSender:
    """Connect to the lane `peer_site` offered (PeerUnavailable if it cannot be reached or its
    certificate does not name `peer_site`)."""
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as error:
        raise PeerUnavailable(
            f"cannot reach the bulk lane of site {peer_site} at {host}:{port}: {error}"
        ) from None
    try:
        _tune(sock)
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            context.load_verify_locations(tls.ca)
            context.load_cert_chain(tls.cert, tls.key)
            # The server's certificate must name the peer site, whatever its address.
            sock = context.wrap_socket(sock, server_hostname=peer_site)
        sock.sendall(token)
        sock.settimeout(None)
    except (OSError, ssl.SSLError) as error:
        sock.close()
        raise PeerUnavailable(f"bulk lane of site {peer_site} at {host}:{port}: {error}") from None
    return LaneSender(sock)


def host_of(address: str) -> str:
    """The host of a "host:port" or "[v6]:port" address (the lane's host is the one the gRPC
    channel dials)."""
    host = address.rpartition(":")[0] if ":" in address else address
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host
