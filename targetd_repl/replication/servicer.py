"""The site-to-site gRPC servicer: thin, it checks the caller's certificate, delegates to the
ReplicationManager, and turns errors into status codes (status.abort: one log line each)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from queue import Full, Queue
from typing import TYPE_CHECKING, TypeVar, cast

import grpc
from google.protobuf.message import DecodeError

from targetd_repl.errors import InvalidArgument
from targetd_repl.replication import bulk, wire
from targetd_repl.replication.channel import check_peer
from targetd_repl.replication.primary import PrimaryPair
from targetd_repl.replication.secondary import SecondaryGroup
from targetd_repl.replication.status import abort
from targetd_repl.v1 import replication_pb2, replication_pb2_grpc

if TYPE_CHECKING:
    from targetd_repl.replication.manager import ReplicationManager

log = logging.getLogger(__name__)
T = TypeVar("T")


class ReplicationServicer(replication_pb2_grpc.ReplicationServicer):
    def __init__(self, manager: ReplicationManager) -> None:
        self._manager = manager

    def CreateSecondary(  # noqa: N802 (the gRPC method name)
        self, request: replication_pb2.CreateSecondaryRequest, context: grpc.ServicerContext
    ) -> replication_pb2.CreateSecondaryResponse:
        try:
            check_peer(context, request.primary_site)
            created = self._manager.create_secondary(request)
            return replication_pb2.CreateSecondaryResponse(created_volumes=created)
        except Exception as error:
            abort(context, error, f"CreateSecondary {request.group!r} from {request.primary_site}")

    def PeerCommand(  # noqa: N802 (the gRPC method name)
        self, request: replication_pb2.PeerCommandRequest, context: grpc.ServicerContext
    ) -> replication_pb2.PeerCommandResponse:
        try:
            check_peer(context, request.site)
            state = self._manager.peer_command(request)
            return replication_pb2.PeerCommandResponse(state=wire.state_to_proto(state))
        except Exception as error:
            abort(context, error, f"PeerCommand {request.group!r} from {request.site}")

    def Handshake(  # noqa: N802 (the gRPC method name)
        self, request: replication_pb2.HandshakeRequest, context: grpc.ServicerContext
    ) -> replication_pb2.HandshakeResponse:
        what = f"Handshake {request.view.group!r} from {request.view.site}"
        try:
            check_peer(context, request.view.site)
            running = self._manager.running(request.view.group)
            if isinstance(running, PrimaryPair):
                # Primary here (roles/: a failover made it so): fence a stale caller, or report
                # a split-brain on both sides.
                peer = wire.view_from_proto(request.view, running.store.info.id)
                view, decision = self._manager.answer_handshake(peer, list(request.volumes))
            else:
                receiver = self._manager.secondary_for(request.view.group, request.view.site)
                peer = wire.view_from_proto(request.view, receiver.store.info.id)
                view, decision = receiver.handshake(peer, list(request.volumes))
            return replication_pb2.HandshakeResponse(
                view=wire.view_to_proto(view),
                decision=decision.action.value,
                rule=decision.rule,
                reason=decision.reason,
            )
        except Exception as error:
            abort(context, error, what)

    def Ship(  # noqa: N802 (the gRPC method name)
        self,
        request_iterator: Iterator[replication_pb2.ShipRequest],
        context: grpc.ServicerContext,
    ) -> Iterator[replication_pb2.ShipAck]:
        """Two threads per stream: a reader (`_ShipReader`) takes the messages in order and
        stores each batch durably, while this generator sends acknowledgements. So storing the
        next batch never waits for the last acknowledgement to be sent, and acknowledgements
        that pile up meanwhile go as one (it covers every batch durable when it is built).
        With a bulk lane (bulk.py) the reader takes the messages from the lane instead."""
        what = "Ship"
        try:
            first = next(request_iterator, None)
            if first is None or first.WhichOneof("body") != "open":
                raise InvalidArgument("the first message of a Ship stream must be `open`")
            opening = first.open
            what = f"Ship {opening.group!r} from {opening.site}"
            check_peer(context, opening.site)
            receiver = self._manager.secondary_for(opening.group, opening.site)
            stream = receiver.open_stream(opening)
        except Exception as error:
            abort(context, error, what)
        lane = self._manager.lane if opening.bulk else None
        offer = lane.offer(opening.site) if lane is not None else None
        reader = _ShipReader(receiver, stream, request_iterator, opening.group, offer)
        try:
            ack = receiver.ack()
            if offer is not None:
                ack.bulk_port = offer.port
                ack.bulk_token = offer.token
            yield ack
            reader.start(self._manager.settings.link_timeout)
            while True:
                echo_ns = reader.wait(_ACK_POLL)
                if echo_ns is not None:
                    # Built now, after the batches it covers are durable: it may cover more.
                    yield receiver.ack(echo_ns)
                    continue
                if reader.error is not None:
                    raise reader.error
                if reader.ended:
                    break
                if not context.is_active():
                    raise grpc.RpcError()  # the sender went away while nothing arrived
        except Exception as error:
            reader.stop()
            if not context.is_active() or isinstance(error, grpc.RpcError):
                receiver.stream_ended(stream, "the sender went away")
                log.info("%s: stream closed by the sender", what)
                return
            receiver.stream_ended(stream, str(error))
            abort(context, error, what)
        finally:
            reader.stop()
        receiver.stream_ended(stream, None)


_ACK_POLL = 0.5  # seconds between checks that the sender is still there while nothing arrives

_Item = bulk.Batch | replication_pb2.ShipRequest


def _grpc_items(requests: Iterator[replication_pb2.ShipRequest]) -> Iterator[_Item]:
    """The stream's messages as they came over gRPC, batches unwrapped."""
    for message in requests:
        if message.WhichOneof("body") == "batch":
            batch = message.batch
            yield bulk.Batch(batch.epoch, batch.first_seq, batch.count, batch.records)
        else:
            yield message


def _lane_items(lane: bulk.LaneReceiver) -> Iterator[_Item]:
    """The stream's messages as they came over its bulk lane, read ahead by a thread of their
    own: the next batch crosses the socket while this one is checked and stored."""
    for frame in _read_ahead(lane.frames(), LANE_READ_AHEAD):
        if isinstance(frame, bulk.Batch):
            yield frame
            continue
        try:
            yield replication_pb2.ShipRequest.FromString(bytes(frame.data))
        except DecodeError:
            raise InvalidArgument("the bulk lane sent a message that does not decode") from None


LANE_READ_AHEAD = 2  # frames received but not yet taken (each up to settings.batch_bytes)
_END = object()


def _read_ahead(frames: Iterator[T], depth: int) -> Iterator[T]:
    """`frames` produced by a helper thread, at most `depth` ahead of the consumer; its error
    is raised here, in order. The consumer going away ends the helper (at its next put)."""
    queue: Queue[object] = Queue(maxsize=depth)
    abandoned = threading.Event()

    def produce() -> None:
        try:
            for frame in frames:
                while not abandoned.is_set():
                    try:
                        queue.put(frame, timeout=_ACK_POLL)
                        break
                    except Full:
                        continue
                if abandoned.is_set():
                    return
            queue.put(_END)
        except BaseException as error:  # re-raised in the consumer's thread
            queue.put(error)

    threading.Thread(target=produce, name="repl-lane-read", daemon=True).start()
    try:
        while True:
            item = queue.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield cast(T, item)
    finally:
        abandoned.set()


class _ShipReader:
    """The reading half of one Ship stream: it stores batches in order, as they arrive, and
    tells the sending half what to acknowledge (`wait`)."""

    def __init__(
        self,
        receiver: SecondaryGroup,
        stream: int,
        requests: Iterator[replication_pb2.ShipRequest],
        group: str,
        offer: bulk.Offer | None,
    ) -> None:
        self._receiver = receiver
        self._stream = stream
        self._requests = requests
        self._group = group
        self._offer = offer
        self._lane: bulk.LaneReceiver | None = None
        self._cond = threading.Condition()
        self._pending = False  # something to acknowledge
        self._echo_ns = 0  # the newest heartbeat's sent_at_ns among what is pending
        self._stopped = False
        self.ended = False  # the sender closed its half of the stream
        self.error: BaseException | None = None  # the first failure: the stream ends with it

    def start(self, lane_timeout: float) -> None:
        threading.Thread(
            target=self._run, args=(lane_timeout,), name=f"repl-ship-{self._group}", daemon=True
        ).start()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            lane = self._lane
        if self._offer is not None:
            self._offer.withdraw()
        if lane is not None:
            lane.close()  # a reader blocked on the lane wakes up and ends

    def wait(self, timeout: float) -> int | None:
        """The echo_ns of the next acknowledgement to send (0: none to echo), or None when
        there is nothing to acknowledge (then see `error` and `ended`) after `timeout`."""
        with self._cond:
            if not self._pending and self.error is None and not self.ended:
                self._cond.wait(timeout)
            if self._pending:  # acknowledge what is stored before reporting an end or error
                self._pending = False
                echo, self._echo_ns = self._echo_ns, 0
                return echo
            return None

    def _post(self, echo_ns: int = 0) -> None:
        with self._cond:
            self._pending = True
            if echo_ns:
                self._echo_ns = echo_ns
            self._cond.notify()

    def _items(self, lane_timeout: float) -> Iterator[_Item]:
        if self._offer is None:
            return _grpc_items(self._requests)
        lane = self._offer.accept(lane_timeout)
        with self._cond:
            self._lane = lane
            stopped = self._stopped
        if stopped:
            lane.close()
        return _lane_items(lane)

    def _run(self, lane_timeout: float) -> None:
        receiver = self._receiver
        stream = self._stream
        try:
            # Order: messages are handled one at a time in the order they were sent.
            for item in self._items(lane_timeout):
                if self._stopped:
                    return
                if isinstance(item, bulk.Batch):
                    receiver.receive_batch(
                        stream, item.epoch, item.first_seq, item.count, item.records
                    )
                    self._post()
                    continue
                kind = item.WhichOneof("body")
                if kind == "heartbeat":
                    receiver.heartbeat(stream)
                    self._post(item.heartbeat.sent_at_ns)
                elif kind == "resync_done":
                    receiver.resync_done(stream, item.resync_done)
                    self._post()
                else:
                    raise InvalidArgument(
                        f"unexpected {kind or 'empty'} message inside the Ship stream of group "
                        f"{self._group!r}"
                    )
        except BaseException as error:  # handed to the sending half, which ends the stream
            with self._cond:
                if self._stopped and isinstance(error, (OSError, InvalidArgument)):
                    return  # our own stop closed the lane under the reader
                self.error = error
                self._cond.notify()
            return
        with self._cond:
            self.ended = True
            self._cond.notify()
