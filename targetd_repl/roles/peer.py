"""The site-to-site RolePeer servicer (replication.proto): thin, it checks the caller's
certificate, delegates to the RoleManager, and turns errors into status codes through the one
mapping (replication/status.py)."""

# Method names are the RPC names of replication.proto (CamelCase, as grpc dispatches them).
# ruff: noqa: N802

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

import grpc

from targetd_repl.errors import InvalidArgument
from targetd_repl.replication.channel import check_peer
from targetd_repl.replication.status import abort
from targetd_repl.v1 import replication_pb2, replication_pb2_grpc

if TYPE_CHECKING:
    from targetd_repl.roles.manager import RoleManager

log = logging.getLogger(__name__)


class RolePeerServicer(replication_pb2_grpc.RolePeerServicer):
    def __init__(self, roles: RoleManager) -> None:
        self._roles = roles

    def Probe(
        self, request: replication_pb2.ProbeRequest, context: grpc.ServicerContext
    ) -> replication_pb2.ProbeResponse:
        try:
            check_peer(context, request.site)
            return self._roles.probe_answer(request.group, request.site)
        except Exception as error:
            abort(context, error, f"Probe {request.group!r} from {request.site}")

    def StepDown(
        self, request: replication_pb2.StepDownRequest, context: grpc.ServicerContext
    ) -> replication_pb2.StepDownResponse:
        try:
            check_peer(context, request.site)
            return self._roles.step_down(request)
        except Exception as error:
            abort(context, error, f"StepDown {request.group!r} from {request.site}")

    def ReadRegions(
        self, request: replication_pb2.ReadRegionsRequest, context: grpc.ServicerContext
    ) -> Iterator[replication_pb2.RegionData]:
        try:
            check_peer(context, request.site)
            regions = self._roles.read_regions(request)
        except Exception as error:
            abort(context, error, f"ReadRegions {request.group!r} from {request.site}")
        yield from regions

    def FinishSwitchover(
        self, request: replication_pb2.FinishSwitchoverRequest, context: grpc.ServicerContext
    ) -> replication_pb2.FinishSwitchoverResponse:
        try:
            check_peer(context, request.site)
            return self._roles.finish_switchover(request)
        except Exception as error:
            abort(context, error, f"FinishSwitchover {request.group!r} from {request.site}")

    def PrepareRejoin(
        self, request: replication_pb2.PrepareRejoinRequest, context: grpc.ServicerContext
    ) -> replication_pb2.PrepareRejoinResponse:
        try:
            check_peer(context, request.site)
            return self._roles.prepare_rejoin(request)
        except Exception as error:
            abort(context, error, f"PrepareRejoin {request.group!r} from {request.site}")

    def WriteRegions(
        self,
        request_iterator: Iterator[replication_pb2.RegionWrite],
        context: grpc.ServicerContext,
    ) -> replication_pb2.WriteRegionsResponse:
        what = "WriteRegions"
        try:
            first = next(request_iterator, None)
            if first is None or first.WhichOneof("body") != "open":
                raise InvalidArgument("the first message of a WriteRegions stream must be `open`")
            what = f"WriteRegions {first.open.group!r} from {first.open.site}"
            check_peer(context, first.open.site)

            def messages() -> Iterator[replication_pb2.RegionWrite]:
                yield first
                yield from request_iterator

            return self._roles.write_regions(messages())
        except Exception as error:
            if not context.is_active():
                log.info("%s: the sender went away", what)
            abort(context, error, what)

    def FinishRejoin(
        self, request: replication_pb2.FinishRejoinRequest, context: grpc.ServicerContext
    ) -> replication_pb2.FinishRejoinResponse:
        try:
            check_peer(context, request.site)
            return self._roles.finish_rejoin(request)
        except Exception as error:
            abort(context, error, f"FinishRejoin {request.group!r} from {request.site}")

    def RecordSurvivor(
        self, request: replication_pb2.RecordSurvivorRequest, context: grpc.ServicerContext
    ) -> replication_pb2.ProbeResponse:
        try:
            check_peer(context, request.site)
            return self._roles.record_survivor(request)
        except Exception as error:
            abort(context, error, f"RecordSurvivor {request.group!r} from {request.site}")

    def CopyExtent(
        self,
        request_iterator: Iterator[replication_pb2.ExtentWrite],
        context: grpc.ServicerContext,
    ) -> replication_pb2.ExtentCopyResult:
        what = "CopyExtent"
        try:
            first = next(request_iterator, None)
            if first is None or first.WhichOneof("body") != "open":
                raise InvalidArgument("the first message of a CopyExtent stream must be `open`")
            what = f"CopyExtent into {first.open.volume!r} from {first.open.site}"
            check_peer(context, first.open.site)
            return self._roles.receive_extent(first.open, request_iterator)
        except Exception as error:
            abort(context, error, what)

    def HashRegions(
        self, request: replication_pb2.HashRegionsRequest, context: grpc.ServicerContext
    ) -> replication_pb2.HashRegionsResponse:
        try:
            check_peer(context, request.site)
            return self._roles.hash_regions(request)
        except Exception as error:
            abort(context, error, f"HashRegions {request.group!r} from {request.site}")
