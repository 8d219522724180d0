"""Domain values <-> protobuf messages of the control API. Pure translation: no decisions.

The enums of common.proto convert with replication/wire.py, the one place that knows them.
"""

from __future__ import annotations

from targetd_repl.api.service import (
    GroupView,
    PairStatusView,
    RoleChangeView,
    SiteView,
    SnapshotView,
    VolumeView,
)
from targetd_repl.errors import InvalidArgument
from targetd_repl.model import PairMode
from targetd_repl.replication.settings import FencePolicy
from targetd_repl.replication.wire import (
    mode_from_proto,
    mode_to_proto,
    role_to_proto,
    state_to_proto,
)
from targetd_repl.roles.manager import CopyStep, VerifyStep
from targetd_repl.v1 import control_pb2


def mode_from_pb(value: int) -> PairMode:
    """A request's mode; an unspecified or unknown one is an InvalidArgument."""
    try:
        return mode_from_proto(value)
    except InvalidArgument:
        raise InvalidArgument(
            f"pair mode must be {' or '.join(m.value for m in PairMode)} (got value {value})"
        ) from None


def fence_from_pb(value: int) -> FencePolicy:
    """A request's fence policy; UNSPECIFIED is the default (none)."""
    if value in (control_pb2.FENCE_POLICY_UNSPECIFIED, control_pb2.FENCE_POLICY_NONE):
        return FencePolicy.NONE
    if value == control_pb2.FENCE_POLICY_FAIL_WRITES:
        return FencePolicy.FAIL_WRITES
    raise InvalidArgument(f"unknown fence policy value {value}")


def fence_to_pb(fence: FencePolicy) -> control_pb2.FencePolicy:
    if fence is FencePolicy.FAIL_WRITES:
        return control_pb2.FENCE_POLICY_FAIL_WRITES
    return control_pb2.FENCE_POLICY_NONE


def volume_to_pb(view: VolumeView) -> control_pb2.Volume:
    return control_pb2.Volume(
        name=view.name,
        size_bytes=view.size_bytes,
        block_size=view.block_size,
        group=view.group,
        created_at=view.created_at,
    )


def group_to_pb(view: GroupView) -> control_pb2.Group:
    return control_pb2.Group(
        name=view.name,
        role=role_to_proto(view.role),
        epoch=view.epoch,
        volumes=list(view.volumes),
        applied_seq=view.applied_seq,
        peer=view.peer,
        created_at=view.created_at,
    )


def pair_to_pb(status: PairStatusView) -> control_pb2.Pair:
    return control_pb2.Pair(
        group=status.group,
        peer=status.peer,
        mode=mode_to_proto(status.mode),
        state=state_to_proto(status.state),
        role=role_to_proto(status.role),
        epoch=status.epoch,
        last_seq=status.last_seq,
        acked_seq=status.acked_seq,
        applied_seq=status.applied_seq,
        lag_records=status.lag_records,
        lag_seconds=status.lag_seconds,
        unsent_regions=status.unsent_regions,
        resync_done_bytes=status.resync_done_bytes,
        resync_total_bytes=status.resync_total_bytes,
        detail=status.detail,
    )


def site_to_pb(view: SiteView) -> control_pb2.SiteInfo:
    return control_pb2.SiteInfo(
        name=view.name,
        version=view.version,
        state_dir=view.state_dir,
        replication_address=view.replication_address,
        control_socket=view.control_socket,
        control_address=view.control_address,
        peers=[control_pb2.Peer(name=n, address=a) for n, a in view.peers],
        pid=view.pid,
        started_at=view.started_at,
    )


def snapshot_to_pb(view: SnapshotView) -> control_pb2.Snapshot:
    return control_pb2.Snapshot(
        volume=view.volume,
        name=view.name,
        kind=view.kind.value,
        created_at=view.created_at,
        epoch=view.epoch,
        seq=view.seq,
        size_bytes=view.size_bytes,
        preserved_bytes=view.preserved_bytes,
    )


def role_change_to_pb(view: RoleChangeView) -> control_pb2.RoleChange:
    status = view.status
    message = control_pb2.RoleChange(
        group=status.group,
        command=status.command,
        phase=status.phase,
        step=status.step,
        done_bytes=status.done_bytes,
        total_bytes=status.total_bytes,
        elapsed_seconds=status.elapsed,
        detail=status.detail,
        epoch=status.epoch,
        snapshot=status.snapshot,
        seq=status.seq,
        regions=status.regions,
        live_records=status.live_records,
        promoted_seconds=status.promoted_seconds,
    )
    if view.pair is not None:
        message.pair.CopyFrom(pair_to_pb(view.pair))
    return message


def copy_step_to_pb(step: CopyStep) -> control_pb2.CopyProgress:
    return control_pb2.CopyProgress(
        step=step.step,
        done_bytes=step.done_bytes,
        total_bytes=step.total_bytes,
        done=step.done,
        sha256=step.sha256,
        target_sha256=step.target_sha256,
        seconds=step.seconds,
        snapshot=step.snapshot,
        detail=step.detail,
    )


def verify_step_to_pb(step: VerifyStep) -> control_pb2.VerifyProgress:
    return control_pb2.VerifyProgress(
        done_bytes=step.done_bytes,
        total_bytes=step.total_bytes,
        done=step.done,
        regions=step.regions,
        differing=[
            control_pb2.DifferingRegion(volume=volume, offset=offset, length=length)
            for volume, offset, length in (step.differing if step.done else ())
        ],
        first_seq=step.first_seq,
        last_seq=step.last_seq,
        seconds=step.seconds,
        max_pause_ms=step.max_pause_ms,
        volume=step.volume,
    )
