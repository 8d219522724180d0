"""The control API's gRPC servicers: protobuf in, a ControlService call, protobuf out. Errors
leave as status codes through the project's one mapping (replication/status.py: one log line
each; an unexpected exception is INTERNAL with its traceback logged). No decisions here.
"""

# Method names are the RPC names of control.proto (CamelCase, as grpc dispatches them).
# ruff: noqa: N802

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TypeVar

import grpc

from targetd_repl.api import convert
from targetd_repl.api.service import ControlService
from targetd_repl.replication.status import abort
from targetd_repl.v1 import control_pb2, control_pb2_grpc

T = TypeVar("T")

# The services of control.proto, by full name (for the health service).
SERVICE_NAMES = tuple(
    control_pb2.DESCRIPTOR.services_by_name[name].full_name
    for name in ("Volumes", "Groups", "Pairs", "Io", "Site", "Snapshots", "Roles")
)


def _serve(context: grpc.ServicerContext, method: str, call: Callable[[], T]) -> T:
    """Run one RPC's service call; end the RPC with the status of what it raises."""
    try:
        return call()
    except Exception as error:
        abort(context, error, method)


def _optional(text: str) -> str | None:
    return text or None


class VolumesServicer(control_pb2_grpc.VolumesServicer):
    def __init__(self, service: ControlService) -> None:
        self._service = service

    def Create(
        self, request: control_pb2.CreateVolumeRequest, context: grpc.ServicerContext
    ) -> control_pb2.Volume:
        view = _serve(
            context,
            "Volumes.Create",
            lambda: self._service.create_volume(
                request.name,
                request.size_bytes,
                block_size=request.block_size or 512,
                group=_optional(request.group),
            ),
        )
        return convert.volume_to_pb(view)

    def List(
        self, request: control_pb2.ListVolumesRequest, context: grpc.ServicerContext
    ) -> control_pb2.ListVolumesResponse:
        views = _serve(
            context, "Volumes.List", lambda: self._service.list_volumes(_optional(request.group))
        )
        return control_pb2.ListVolumesResponse(volumes=[convert.volume_to_pb(v) for v in views])

    def Resize(
        self, request: control_pb2.ResizeVolumeRequest, context: grpc.ServicerContext
    ) -> control_pb2.Volume:
        view = _serve(
            context,
            "Volumes.Resize",
            lambda: self._service.resize_volume(request.name, request.size_bytes),
        )
        return convert.volume_to_pb(view)

    def Delete(
        self, request: control_pb2.DeleteVolumeRequest, context: grpc.ServicerContext
    ) -> control_pb2.DeleteVolumeResponse:
        _serve(context, "Volumes.Delete", lambda: self._service.delete_volume(request.name))
        return control_pb2.DeleteVolumeResponse()


class GroupsServicer(control_pb2_grpc.GroupsServicer):
    def __init__(self, service: ControlService) -> None:
        self._service = service

    def Create(
        self, request: control_pb2.CreateGroupRequest, context: grpc.ServicerContext
    ) -> control_pb2.Group:
        view = _serve(context, "Groups.Create", lambda: self._service.create_group(request.name))
        return convert.group_to_pb(view)

    def AddVolume(
        self, request: control_pb2.AddVolumeRequest, context: grpc.ServicerContext
    ) -> control_pb2.Volume:
        view = _serve(
            context,
            "Groups.AddVolume",
            lambda: self._service.add_volume(request.group, request.volume),
        )
        return convert.volume_to_pb(view)

    def List(
        self, request: control_pb2.ListGroupsRequest, context: grpc.ServicerContext
    ) -> control_pb2.ListGroupsResponse:
        views = _serve(context, "Groups.List", self._service.list_groups)
        return control_pb2.ListGroupsResponse(groups=[convert.group_to_pb(g) for g in views])


class PairsServicer(control_pb2_grpc.PairsServicer):
    def __init__(self, service: ControlService) -> None:
        self._service = service

    def Create(
        self, request: control_pb2.CreatePairRequest, context: grpc.ServicerContext
    ) -> control_pb2.Pair:
        status = _serve(
            context,
            "Pairs.Create",
            lambda: self._service.create_pair(
                request.group,
                request.peer,
                convert.mode_from_pb(request.mode),
                convert.fence_from_pb(request.fence),
            ),
        )
        return convert.pair_to_pb(status)

    def Status(
        self, request: control_pb2.PairStatusRequest, context: grpc.ServicerContext
    ) -> control_pb2.Pair:
        status = _serve(context, "Pairs.Status", lambda: self._service.pair_status(request.group))
        return convert.pair_to_pb(status)

    def List(
        self, request: control_pb2.ListPairsRequest, context: grpc.ServicerContext
    ) -> control_pb2.ListPairsResponse:
        pairs = _serve(context, "Pairs.List", self._service.list_pairs)
        return control_pb2.ListPairsResponse(pairs=[convert.pair_to_pb(p) for p in pairs])

    def Suspend(
        self, request: control_pb2.PairRequest, context: grpc.ServicerContext
    ) -> control_pb2.Pair:
        status = _serve(context, "Pairs.Suspend", lambda: self._service.suspend_pair(request.group))
        return convert.pair_to_pb(status)

    def Resume(
        self, request: control_pb2.PairRequest, context: grpc.ServicerContext
    ) -> control_pb2.Pair:
        status = _serve(context, "Pairs.Resume", lambda: self._service.resume_pair(request.group))
        return convert.pair_to_pb(status)

    def Delete(
        self, request: control_pb2.PairRequest, context: grpc.ServicerContext
    ) -> control_pb2.DeletePairResponse:
        _serve(context, "Pairs.Delete", lambda: self._service.delete_pair(request.group))
        return control_pb2.DeletePairResponse()


class IoServicer(control_pb2_grpc.IoServicer):
    def __init__(self, service: ControlService) -> None:
        self._service = service

    def Write(
        self, request: control_pb2.WriteRequest, context: grpc.ServicerContext
    ) -> control_pb2.WriteResponse:
        seq = _serve(
            context,
            "Io.Write",
            lambda: self._service.write(request.volume, request.offset, request.data),
        )
        return control_pb2.WriteResponse(seq=seq)

    def Read(
        self, request: control_pb2.ReadRequest, context: grpc.ServicerContext
    ) -> control_pb2.ReadResponse:
        data = _serve(
            context,
            "Io.Read",
            lambda: self._service.read(request.volume, request.offset, request.length),
        )
        return control_pb2.ReadResponse(data=data)


class SiteServicer(control_pb2_grpc.SiteServicer):
    def __init__(self, service: ControlService) -> None:
        self._service = service

    def Info(
        self, request: control_pb2.SiteInfoRequest, context: grpc.ServicerContext
    ) -> control_pb2.SiteInfo:
        return convert.site_to_pb(_serve(context, "Site.Info", self._service.site_info))

    def SetPeerAddress(
        self, request: control_pb2.SetPeerAddressRequest, context: grpc.ServicerContext
    ) -> control_pb2.Peer:
        name, address = _serve(
            context,
            "Site.SetPeerAddress",
            lambda: self._service.set_peer_address(request.name, request.address),
        )
        return control_pb2.Peer(name=name, address=address)


class SnapshotsServicer(control_pb2_grpc.SnapshotsServicer):
    def __init__(self, service: ControlService) -> None:
        self._service = service

    def Create(
        self, request: control_pb2.CreateSnapshotRequest, context: grpc.ServicerContext
    ) -> control_pb2.Snapshot:
        view = _serve(
            context,
            "Snapshots.Create",
            lambda: self._service.create_snapshot(request.volume, request.name),
        )
        return convert.snapshot_to_pb(view)

    def List(
        self, request: control_pb2.ListSnapshotsRequest, context: grpc.ServicerContext
    ) -> control_pb2.ListSnapshotsResponse:
        views = _serve(
            context,
            "Snapshots.List",
            lambda: self._service.list_snapshots(_optional(request.volume)),
        )
        return control_pb2.ListSnapshotsResponse(
            snapshots=[convert.snapshot_to_pb(v) for v in views]
        )

    def Delete(
        self, request: control_pb2.DeleteSnapshotRequest, context: grpc.ServicerContext
    ) -> control_pb2.DeleteSnapshotResponse:
        _serve(
            context,
            "Snapshots.Delete",
            lambda: self._service.delete_snapshot(
                request.volume, request.name, force=request.force
            ),
        )
        return control_pb2.DeleteSnapshotResponse()

    def Rollback(
        self, request: control_pb2.RollbackSnapshotRequest, context: grpc.ServicerContext
    ) -> control_pb2.RollbackSnapshotResponse:
        regions, nbytes = _serve(
            context,
            "Snapshots.Rollback",
            lambda: self._service.rollback_snapshot(request.volume, request.name),
        )
        return control_pb2.RollbackSnapshotResponse(regions=regions, bytes=nbytes)


class RolesServicer(control_pb2_grpc.RolesServicer):
    def __init__(self, service: ControlService) -> None:
        self._service = service

    def Failover(
        self, request: control_pb2.FailoverRequest, context: grpc.ServicerContext
    ) -> control_pb2.RoleChange:
        view = _serve(
            context,
            "Roles.Failover",
            lambda: self._service.failover(request.group, force=request.force),
        )
        return convert.role_change_to_pb(view)

    def Failback(
        self, request: control_pb2.RoleRequest, context: grpc.ServicerContext
    ) -> control_pb2.RoleChange:
        view = _serve(context, "Roles.Failback", lambda: self._service.failback(request.group))
        return convert.role_change_to_pb(view)

    def Switchover(
        self, request: control_pb2.RoleRequest, context: grpc.ServicerContext
    ) -> control_pb2.RoleChange:
        view = _serve(context, "Roles.Switchover", lambda: self._service.switchover(request.group))
        return convert.role_change_to_pb(view)

    def Resolve(
        self, request: control_pb2.ResolveRequest, context: grpc.ServicerContext
    ) -> control_pb2.RoleChange:
        view = _serve(
            context,
            "Roles.Resolve",
            lambda: self._service.resolve(request.group, request.survivor),
        )
        return convert.role_change_to_pb(view)

    def Status(
        self, request: control_pb2.RoleRequest, context: grpc.ServicerContext
    ) -> control_pb2.RoleChange:
        view = _serve(context, "Roles.Status", lambda: self._service.role_status(request.group))
        return convert.role_change_to_pb(view)

    def Copy(
        self, request: control_pb2.CopyRequest, context: grpc.ServicerContext
    ) -> Iterator[control_pb2.CopyProgress]:
        steps = _serve(
            context,
            "Roles.Copy",
            lambda: self._service.copy(
                request.volume,
                request.offset,
                request.length,
                request.site,
                request.target_volume,
                request.target_offset,
                request.via,
            ),
        )
        try:
            for step in steps:
                yield convert.copy_step_to_pb(step)
        except Exception as error:
            abort(context, error, "Roles.Copy")

    def Verify(
        self, request: control_pb2.VerifyRequest, context: grpc.ServicerContext
    ) -> Iterator[control_pb2.VerifyProgress]:
        what = f"Roles.Verify {request.group!r}"
        steps = _serve(context, what, lambda: self._service.verify(request.group, request.volume))
        try:
            for step in steps:
                yield convert.verify_step_to_pb(step)
        except Exception as error:
            abort(context, error, what)


def add_to_server(service: ControlService, server: grpc.Server) -> tuple[str, ...]:
    """Register every control servicer on `server`; return their service names."""
    control_pb2_grpc.add_VolumesServicer_to_server(VolumesServicer(service), server)
    control_pb2_grpc.add_GroupsServicer_to_server(GroupsServicer(service), server)
    control_pb2_grpc.add_PairsServicer_to_server(PairsServicer(service), server)
    control_pb2_grpc.add_IoServicer_to_server(IoServicer(service), server)
    control_pb2_grpc.add_SiteServicer_to_server(SiteServicer(service), server)
    control_pb2_grpc.add_SnapshotsServicer_to_server(SnapshotsServicer(service), server)
    control_pb2_grpc.add_RolesServicer_to_server(RolesServicer(service), server)
    return SERVICE_NAMES
