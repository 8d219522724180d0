"""A client of one site's control API, for the CLI, the Ansible modules and the tests.

Every call carries a deadline. A status from the site comes back as the error class the
project's one mapping gives it (replication/status.py: NOT_FOUND -> NotFound, ...) with the
site's message; a site that cannot be reached or does not answer in time raises
`PeerUnavailable`. Replies are the protobuf messages of control.proto.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar, cast

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from targetd_repl.api.convert import fence_to_pb
from targetd_repl.model import PairMode
from targetd_repl.replication.errors import PeerUnavailable
from targetd_repl.replication.settings import FencePolicy
from targetd_repl.replication.status import error_from_rpc
from targetd_repl.replication.wire import mode_to_proto
from targetd_repl.v1 import control_pb2, control_pb2_grpc

DEFAULT_TIMEOUT = 30.0
MAX_MESSAGE = 8 << 20
IO_CHUNK = 1 << 20  # bytes per Io call when a range is split

T = TypeVar("T")


class ControlClient:
    """Talks to one site. `target` is `unix:/path` or `host:port` (then `credentials` is
    required: the control API listens on TCP with mutual TLS only)."""

    def __init__(
        self,
        target: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        server_name: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_MESSAGE),
        ]
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        if credentials is None:
            self._channel = grpc.insecure_channel(target, options=options)
        else:
            self._channel = grpc.secure_channel(target, credentials, options=options)
        self.target = target
        self.timeout = timeout
        self._volumes: Any = control_pb2_grpc.VolumesStub(self._channel)
        self._groups: Any = control_pb2_grpc.GroupsStub(self._channel)
        self._pairs: Any = control_pb2_grpc.PairsStub(self._channel)
        self._io: Any = control_pb2_grpc.IoStub(self._channel)
        self._site: Any = control_pb2_grpc.SiteStub(self._channel)
        self._snapshots: Any = control_pb2_grpc.SnapshotsStub(self._channel)
        self._roles: Any = control_pb2_grpc.RolesStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    @classmethod
    def for_socket(cls, path: Path | str, *, timeout: float = DEFAULT_TIMEOUT) -> ControlClient:
        return cls(f"unix:{path}", timeout=timeout)

    @classmethod
    def for_tcp(
        cls,
        address: str,
        *,
        ca: bytes,
        cert: bytes,
        key: bytes,
        server_name: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> ControlClient:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=ca, private_key=key, certificate_chain=cert
        )
        return cls(address, credentials=credentials, server_name=server_name, timeout=timeout)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: Callable[..., Any], request: object, reply: type[T]) -> T:
        """Call `method` with the deadline; `reply` is the message type it answers with."""
        try:
            return cast(T, method(request, timeout=self.timeout))
        except grpc.RpcError as error:
            raise self._error(error) from None

    def _error(self, error: grpc.RpcError) -> Exception:
        code = error.code() if isinstance(error, grpc.Call) else grpc.StatusCode.UNKNOWN
        details = (error.details() if isinstance(error, grpc.Call) else "") or code.name.lower()
        if code is grpc.StatusCode.UNAVAILABLE:
            return PeerUnavailable(f"cannot reach the site at {self.target}: {details}")
        if code is grpc.StatusCode.DEADLINE_EXCEEDED:
            return PeerUnavailable(
                f"the site at {self.target} did not answer within {self.timeout:g} s"
            )
        # The class from the one mapping; the message as the site wrote it (it names the object).
        return type(error_from_rpc(error))(details)

    # --- health --------------------------------------------------------------------------------

    def serving(self, service: str = "", timeout: float = 2.0) -> bool:
        """True once the site's health service reports SERVING (False if it cannot be reached)."""
        try:
            reply = self._health.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    # --- volumes -------------------------------------------------------------------------------

    def create_volume(
        self, name: str, size_bytes: int, *, block_size: int = 512, group: str = ""
    ) -> control_pb2.Volume:
        request = control_pb2.CreateVolumeRequest(
            name=name, size_bytes=size_bytes, block_size=block_size, group=group
        )
        return self._call(self._volumes.Create, request, control_pb2.Volume)

    def list_volumes(self, group: str = "") -> list[control_pb2.Volume]:
        reply = self._call(
            self._volumes.List,
            control_pb2.ListVolumesRequest(group=group),
            control_pb2.ListVolumesResponse,
        )
        return list(reply.volumes)

    def resize_volume(self, name: str, size_bytes: int) -> control_pb2.Volume:
        request = control_pb2.ResizeVolumeRequest(name=name, size_bytes=size_bytes)
        return self._call(self._volumes.Resize, request, control_pb2.Volume)

    def delete_volume(self, name: str) -> None:
        self._call(
            self._volumes.Delete,
            control_pb2.DeleteVolumeRequest(name=name),
            control_pb2.DeleteVolumeResponse,
        )

    # --- groups --------------------------------------------------------------------------------

    def create_group(self, name: str) -> control_pb2.Group:
        return self._call(
            self._groups.Create, control_pb2.CreateGroupRequest(name=name), control_pb2.Group
        )

    def add_volume(self, group: str, volume: str) -> control_pb2.Volume:
        request = control_pb2.AddVolumeRequest(group=group, volume=volume)
        return self._call(self._groups.AddVolume, request, control_pb2.Volume)

    def list_groups(self) -> list[control_pb2.Group]:
        return list(
            self._call(
                self._groups.List, control_pb2.ListGroupsRequest(), control_pb2.ListGroupsResponse
            ).groups
        )

    # --- pairs ---------------------------------------------------------------------------------

    def create_pair(
        self, group: str, peer: str, mode: PairMode, fence: FencePolicy = FencePolicy.NONE
    ) -> control_pb2.Pair:
        request = control_pb2.CreatePairRequest(
            group=group, peer=peer, mode=mode_to_proto(mode), fence=fence_to_pb(fence)
        )
        return self._call(self._pairs.Create, request, control_pb2.Pair)

    def pair_status(self, group: str) -> control_pb2.Pair:
        return self._call(
            self._pairs.Status, control_pb2.PairStatusRequest(group=group), control_pb2.Pair
        )

    def list_pairs(self) -> list[control_pb2.Pair]:
        return list(
            self._call(
                self._pairs.List, control_pb2.ListPairsRequest(), control_pb2.ListPairsResponse
            ).pairs
        )

    def suspend_pair(self, group: str) -> control_pb2.Pair:
        return self._call(
            self._pairs.Suspend, control_pb2.PairRequest(group=group), control_pb2.Pair
        )

    def resume_pair(self, group: str) -> control_pb2.Pair:
        return self._call(
            self._pairs.Resume, control_pb2.PairRequest(group=group), control_pb2.Pair
        )

    def delete_pair(self, group: str) -> None:
        self._call(
            self._pairs.Delete, control_pb2.PairRequest(group=group), control_pb2.DeletePairResponse
        )

    # --- I/O -----------------------------------------------------------------------------------

    def write(self, volume: str, offset: int, data: bytes) -> int:
        """Write `data` at `offset` in calls of at most IO_CHUNK bytes; return the last seq."""
        seq = 0
        for at, chunk in _chunks(offset, memoryview(data)):
            request = control_pb2.WriteRequest(volume=volume, offset=at, data=bytes(chunk))
            seq = self._call(self._io.Write, request, control_pb2.WriteResponse).seq
        return seq

    def read(self, volume: str, offset: int, length: int) -> bytes:
        """Read `length` bytes at `offset` in calls of at most IO_CHUNK bytes."""
        if length <= 0:  # let the site refuse it with its own message
            return self._call(
                self._io.Read, control_pb2.ReadRequest(volume=volume), control_pb2.ReadResponse
            ).data
        parts: list[bytes] = []
        for at in range(offset, offset + length, IO_CHUNK):
            n = min(IO_CHUNK, offset + length - at)
            request = control_pb2.ReadRequest(volume=volume, offset=at, length=n)
            parts.append(self._call(self._io.Read, request, control_pb2.ReadResponse).data)
        return b"".join(parts)

    # --- the site ------------------------------------------------------------------------------

    def site_info(self) -> control_pb2.SiteInfo:
        return self._call(self._site.Info, control_pb2.SiteInfoRequest(), control_pb2.SiteInfo)

    def set_peer_address(self, name: str, address: str) -> control_pb2.Peer:
        request = control_pb2.SetPeerAddressRequest(name=name, address=address)
        return self._call(self._site.SetPeerAddress, request, control_pb2.Peer)

    # --- snapshots -----------------------------------------------------------------------------

    def create_snapshot(self, volume: str, name: str) -> control_pb2.Snapshot:
        request = control_pb2.CreateSnapshotRequest(volume=volume, name=name)
        return self._call(self._snapshots.Create, request, control_pb2.Snapshot)

    def list_snapshots(self, volume: str = "") -> list[control_pb2.Snapshot]:
        reply = self._call(
            self._snapshots.List,
            control_pb2.ListSnapshotsRequest(volume=volume),
            control_pb2.ListSnapshotsResponse,
        )
        return list(reply.snapshots)

    def delete_snapshot(self, volume: str, name: str, *, force: bool = False) -> None:
        request = control_pb2.DeleteSnapshotRequest(volume=volume, name=name, force=force)
        self._call(self._snapshots.Delete, request, control_pb2.DeleteSnapshotResponse)

    def rollback_snapshot(self, volume: str, name: str) -> control_pb2.RollbackSnapshotResponse:
        request = control_pb2.RollbackSnapshotRequest(volume=volume, name=name)
        return self._call(self._snapshots.Rollback, request, control_pb2.RollbackSnapshotResponse)

    # --- role changes --------------------------------------------------------------------------

    def failover(self, group: str, *, force: bool = False) -> control_pb2.RoleChange:
        request = control_pb2.FailoverRequest(group=group, force=force)
        return self._call(self._roles.Failover, request, control_pb2.RoleChange)

    def failback(self, group: str) -> control_pb2.RoleChange:
        request = control_pb2.RoleRequest(group=group)
        return self._call(self._roles.Failback, request, control_pb2.RoleChange)

    def switchover(self, group: str) -> control_pb2.RoleChange:
        request = control_pb2.RoleRequest(group=group)
        return self._call(self._roles.Switchover, request, control_pb2.RoleChange)

    def resolve(self, group: str, survivor: str) -> control_pb2.RoleChange:
        request = control_pb2.ResolveRequest(group=group, survivor=survivor)
        return self._call(self._roles.Resolve, request, control_pb2.RoleChange)

    def role_status(self, group: str) -> control_pb2.RoleChange:
        request = control_pb2.RoleRequest(group=group)
        return self._call(self._roles.Status, request, control_pb2.RoleChange)

    def copy(
        self,
        volume: str,
        offset: int,
        length: int,
        site: str,
        target_volume: str,
        target_offset: int,
        via: str = "",
        *,
        timeout: float | None = None,
    ) -> Iterator[control_pb2.CopyProgress]:
        """The extent copy's progress reports; the last one has `done`. `timeout` bounds the
        whole copy (default: none beyond the site's own)."""
        request = control_pb2.CopyRequest(
            volume=volume,
            offset=offset,
            length=length,
            site=site,
            target_volume=target_volume,
            target_offset=target_offset,
            via=via,
        )
        try:
            yield from self._roles.Copy(request, timeout=timeout)
        except grpc.RpcError as error:
            raise self._error(error) from None

    def verify(
        self, group: str, volume: str = "", *, timeout: float | None = None
    ) -> Iterator[control_pb2.VerifyProgress]:
        """The verify's progress reports; the last one has `done` and the differing regions.
        `timeout` bounds the whole comparison (default: none beyond the site's own)."""
        request = control_pb2.VerifyRequest(group=group, volume=volume)
        try:
            yield from self._roles.Verify(request, timeout=timeout)
        except grpc.RpcError as error:
            raise self._error(error) from None


def _chunks(offset: int, data: memoryview) -> Iterator[tuple[int, memoryview]]:
    if not data.nbytes:
        yield offset, data  # let the site refuse an empty write with its own message
        return
    for start in range(0, data.nbytes, IO_CHUNK):
        yield offset + start, data[start : start + IO_CHUNK]
