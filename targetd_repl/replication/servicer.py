"""The site-to-site gRPC servicer: thin, it checks the caller's certificate, delegates to the
ReplicationManager, and turns errors into status codes (status.abort: one log line each)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

import grpc

from targetd_repl.errors import InvalidArgument
from targetd_repl.replication import wire
from targetd_repl.replication.channel import check_peer
from targetd_repl.replication.primary import PrimaryPair
from targetd_repl.replication.status import abort
from targetd_repl.v1 import replication_pb2, replication_pb2_grpc

if TYPE_CHECKING:
    from targetd_repl.replication.manager import ReplicationManager

log = logging.getLogger(__name__)


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
        yield receiver.ack()
        try:
            for message in request_iterator:
                kind = message.WhichOneof("body")
                if kind == "batch":
                    receiver.receive_batch(stream, message.batch)
                    yield receiver.ack()
                elif kind == "heartbeat":
                    receiver.heartbeat(stream)
                    yield receiver.ack(message.heartbeat.sent_at_ns)
                elif kind == "resync_done":
                    receiver.resync_done(stream, message.resync_done)
                    yield receiver.ack()
                else:
                    raise InvalidArgument(
                        f"unexpected {kind or 'empty'} message inside the Ship stream of group "
                        f"{opening.group!r}"
                    )
        except Exception as error:
            if not context.is_active() or isinstance(error, grpc.RpcError):
                receiver.stream_ended(stream, "the sender went away")
                log.info("%s: stream closed by the sender", what)
                return
            receiver.stream_ended(stream, str(error))
            abort(context, error, what)
        receiver.stream_ended(stream, None)
