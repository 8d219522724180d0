"""The CLI's site commands: each turns parsed arguments into control API calls (api/client.py)
and hands the replies to cli_output. They speak the control API only.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from targetd_repl import cli_output as out
from targetd_repl.api.client import ControlClient
from targetd_repl.errors import TargetdReplError
from targetd_repl.model import PairMode, PairState
from targetd_repl.replication.settings import FencePolicy
from targetd_repl.v1 import control_pb2

Handler = Callable[[argparse.Namespace, ControlClient], int]


R = TypeVar("R")


class CommandError(TargetdReplError):
    """A command failed on this side: a file it cannot read or write, a wait that timed out."""


# --- volumes --------------------------------------------------------------------------------------


def volume_create(args: argparse.Namespace, client: ControlClient) -> int:
    volume = client.create_volume(
        args.name, args.size, block_size=args.block_size, group=args.group or ""
    )
    if args.json:
        out.print_json(out.volume_doc(volume))
    else:
        print(
            f"volume {volume.name} created: {out.human_size(volume.size_bytes)}, "
            f"block size {volume.block_size}, group {volume.group}"
        )
    return 0


def volume_list(args: argparse.Namespace, client: ControlClient) -> int:
    volumes = client.list_volumes(args.group or "")
    if args.json:
        out.print_json([out.volume_doc(v) for v in volumes])
    else:
        out.print_volumes(volumes)
    return 0


def volume_resize(args: argparse.Namespace, client: ControlClient) -> int:
    volume = client.resize_volume(args.name, args.size)
    if args.json:
        out.print_json(out.volume_doc(volume))
    else:
        print(f"volume {volume.name} resized: {out.human_size(volume.size_bytes)}")
    return 0


def volume_delete(args: argparse.Namespace, client: ControlClient) -> int:
    client.delete_volume(args.name)
    if args.json:
        out.print_json({"deleted": args.name})
    else:
        print(f"volume {args.name} deleted")
    return 0


# --- groups ---------------------------------------------------------------------------------------


def group_create(args: argparse.Namespace, client: ControlClient) -> int:
    group = client.create_group(args.name)
    if args.json:
        out.print_json(out.group_doc(group))
    else:
        print(f"group {group.name} created")
    return 0


def group_add(args: argparse.Namespace, client: ControlClient) -> int:
    volume = client.add_volume(args.group, args.volume)
    if args.json:
        out.print_json(out.volume_doc(volume))
    else:
        print(f"volume {volume.name} is in group {volume.group}")
    return 0


def group_list(args: argparse.Namespace, client: ControlClient) -> int:
    groups = client.list_groups()
    if args.json:
        out.print_json([out.group_doc(g) for g in groups])
    else:
        out.print_groups(groups)
    return 0


# --- pairs ----------------------------------------------------------------------------------------


def _show_pair(args: argparse.Namespace, pair: control_pb2.Pair, verb: str) -> int:
    if args.json:
        out.print_json(out.pair_doc(pair))
    else:
        doc = out.pair_doc(pair)
        print(f"pair {pair.group} {verb}: peer {pair.peer}, {doc['mode']}, {doc['state']}")
    return 0


def pair_create(args: argparse.Namespace, client: ControlClient) -> int:
    pair = client.create_pair(args.group, args.peer, PairMode(args.mode), FencePolicy(args.fence))
    return _show_pair(args, pair, "created")


def pair_suspend(args: argparse.Namespace, client: ControlClient) -> int:
    return _show_pair(args, client.suspend_pair(args.group), "suspended")


def pair_resume(args: argparse.Namespace, client: ControlClient) -> int:
    return _show_pair(args, client.resume_pair(args.group), "resumed")


def pair_delete(args: argparse.Namespace, client: ControlClient) -> int:
    client.delete_pair(args.group)
    if args.json:
        out.print_json({"deleted": args.group})
    else:
        print(f"pair {args.group} deleted")
    return 0


def _pairs(args: argparse.Namespace, client: ControlClient) -> list[control_pb2.Pair]:
    return [client.pair_status(args.group)] if args.group else client.list_pairs()


def pair_status(args: argparse.Namespace, client: ControlClient) -> int:
    if args.watch or args.until:
        return _watch(args, client)
    if args.group:
        pair = client.pair_status(args.group)
        if args.json:
            out.print_json(out.pair_doc(pair))
        else:
            out.print_pair(pair)
        return 0
    pairs = client.list_pairs()
    if args.json:
        out.print_json([out.pair_doc(p) for p in pairs])
    else:
        out.print_pairs(pairs)
    return 0


def _watch(args: argparse.Namespace, client: ControlClient) -> int:
    """Refresh every --interval seconds until interrupted, or until every pair is in --until
    state (exit 0), or --until and --wait-timeout seconds passed (exit 1)."""
    until = PairState(args.until) if args.until else None
    deadline = time.monotonic() + args.wait_timeout if until and args.wait_timeout else None
    try:
        if args.json:
            return _watch_loop(args, client, until, deadline, _print_json_line)
        with out.PairWatch() as view:
            return _watch_loop(args, client, until, deadline, view.update)
    except KeyboardInterrupt:
        return 0


def _print_json_line(pairs: list[control_pb2.Pair]) -> None:
    out.print_json([out.pair_doc(p) for p in pairs])
    sys.stdout.flush()


def _watch_loop(
    args: argparse.Namespace,
    client: ControlClient,
    until: PairState | None,
    deadline: float | None,
    show: Callable[[list[control_pb2.Pair]], None],
) -> int:
    while True:
        pairs = _pairs(args, client)
        show(pairs)
        if until is not None and pairs and all(out.pair_doc(p)["state"] == until for p in pairs):
            return 0
        if deadline is not None and time.monotonic() >= deadline:
            states = ", ".join(f"{p.group} {out.pair_doc(p)['state']}" for p in pairs)
            raise CommandError(
                f"pairs not {until} after {args.wait_timeout:g} s: {states or 'no pairs'}"
            )
        time.sleep(args.interval)


# --- I/O ------------------------------------------------------------------------------------------


def io_write(args: argparse.Namespace, client: ControlClient) -> int:
    if args.data_file is not None:
        try:
            data = Path(args.data_file).read_bytes()
        except OSError as error:
            raise CommandError(f"cannot read {args.data_file}: {error.strerror}") from None
    else:
        data = bytes([args.pattern]) * args.length
    seq = client.write(args.volume, args.offset, data)
    if args.json:
        out.print_json(
            {"volume": args.volume, "offset": args.offset, "length": len(data), "seq": seq}
        )
    else:
        print(f"wrote {len(data)} bytes to {args.volume} at offset {args.offset} (seq {seq})")
    return 0


def io_read(args: argparse.Namespace, client: ControlClient) -> int:
    data = client.read(args.volume, args.offset, args.length)
    digest = hashlib.sha256(data).hexdigest()
    if args.out is not None:
        try:
            Path(args.out).write_bytes(data)
        except OSError as error:
            raise CommandError(f"cannot write {args.out}: {error.strerror}") from None
    if args.json:
        document: out.Document = {
            "volume": args.volume,
            "offset": args.offset,
            "length": len(data),
            "sha256": digest,
        }
        if args.out is None:
            document["data_base64"] = base64.b64encode(data).decode()
        out.print_json(document)
    elif args.out is not None:
        print(f"read {len(data)} bytes of {args.volume} at offset {args.offset} into {args.out}")
    elif sys.stdout.isatty():
        print(out.hexdump(data, args.offset))
    else:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    return 0


# --- the site -------------------------------------------------------------------------------------


def site_info(args: argparse.Namespace, client: ControlClient) -> int:
    info = client.site_info()
    if args.json:
        out.print_json(out.site_doc(info))
    else:
        out.print_site(info)
    return 0


def site_set_peer(args: argparse.Namespace, client: ControlClient) -> int:
    peer = client.set_peer_address(args.name, args.peer_address)
    if args.json:
        out.print_json({"name": peer.name, "address": peer.address})
    else:
        print(f"peer {peer.name} is at {peer.address}")
    return 0


# --- snapshots ------------------------------------------------------------------------------------


def snapshot_create(args: argparse.Namespace, client: ControlClient) -> int:
    snap = client.create_snapshot(args.volume, args.name)
    if args.json:
        out.print_json(out.snapshot_doc(snap))
    else:
        print(f"snapshot {snap.name} of volume {snap.volume} created (seq {snap.seq})")
    return 0


def snapshot_list(args: argparse.Namespace, client: ControlClient) -> int:
    snaps = client.list_snapshots(args.volume or "")
    if args.json:
        out.print_json([out.snapshot_doc(s) for s in snaps])
    else:
        out.print_snapshots(snaps)
    return 0


def snapshot_delete(args: argparse.Namespace, client: ControlClient) -> int:
    client.delete_snapshot(args.volume, args.name, force=args.force)
    if args.json:
        out.print_json({"deleted": args.name, "volume": args.volume})
    else:
        print(f"snapshot {args.name} of volume {args.volume} deleted")
    return 0


def snapshot_rollback(args: argparse.Namespace, client: ControlClient) -> int:
    reply = client.rollback_snapshot(args.volume, args.name)
    if args.json:
        out.print_json(
            {
                "volume": args.volume,
                "snapshot": args.name,
                "regions": reply.regions,
                "bytes": reply.bytes,
            }
        )
    else:
        print(
            f"volume {args.volume} rolled back to snapshot {args.name}: "
            f"{reply.regions} regions ({out.human_size(reply.bytes)})"
        )
    return 0


# --- role changes ---------------------------------------------------------------------------------


def _follow(args: argparse.Namespace, client: ControlClient, first: control_pb2.RoleChange) -> int:
    """Show a role change until it is no longer running (or --no-wait): a progress bar, then the
    result; exit 1 when it failed or --wait-timeout passed."""
    reply = first
    if not args.no_wait and reply.phase == "running":
        deadline = time.monotonic() + args.wait_timeout if args.wait_timeout else None
        show = not args.json and sys.stderr.isatty()
        progress = out.RoleProgress(reply.command or args.command) if show else None
        try:
            if progress is not None:
                progress.__enter__()
            while reply.phase == "running":
                if progress is not None:
                    progress.update(reply.step, reply.done_bytes, reply.total_bytes)
                if deadline is not None and time.monotonic() >= deadline:
                    raise CommandError(
                        f"{reply.command} of group {reply.group} still running after "
                        f"{args.wait_timeout:g} s (step {reply.step}); run it again to follow"
                    )
                time.sleep(args.interval)
                reply = client.role_status(reply.group)
        finally:
            if progress is not None:
                progress.__exit__(None, None, None)
    if args.json:
        out.print_json(out.role_change_doc(reply))
    else:
        out.print_role_change(reply)
    if reply.phase == "failed":
        raise CommandError(f"{reply.command} of group {reply.group} failed: {reply.detail}")
    return 0


def failover(args: argparse.Namespace, client: ControlClient) -> int:
    return _follow(args, client, client.failover(args.group, force=args.force))


def failback(args: argparse.Namespace, client: ControlClient) -> int:
    return _follow(args, client, client.failback(args.group))


def switchover(args: argparse.Namespace, client: ControlClient) -> int:
    return _follow(args, client, client.switchover(args.group))


def resolve(args: argparse.Namespace, client: ControlClient) -> int:
    return _follow(args, client, client.resolve(args.group, args.survivor))


def role_status(args: argparse.Namespace, client: ControlClient) -> int:
    reply = client.role_status(args.group)
    if args.json:
        out.print_json(out.role_change_doc(reply))
    else:
        out.print_role_change(reply)
    return 0


def _last_of(
    args: argparse.Namespace,
    what: str,
    replies: Iterator[R],
    step: Callable[[R], tuple[str, int, int]],
) -> R:
    """Follow a stream of progress reports (a progress bar on a terminal, unless --json) and
    return the last one, which must carry `done`."""
    progress = out.RoleProgress(what) if not args.json and sys.stderr.isatty() else None
    last: R | None = None
    try:
        if progress is not None:
            progress.__enter__()
        for reply in replies:
            last = reply
            if progress is not None:
                progress.update(*step(reply))
    finally:
        if progress is not None:
            progress.__exit__(None, None, None)
    if last is None or not getattr(last, "done", False):
        raise CommandError(f"{what} ended without a result")
    return last


def copy(args: argparse.Namespace, client: ControlClient) -> int:
    volume, offset, length = args.source
    site, target, target_offset = args.target
    last = _last_of(
        args,
        "copy",
        client.copy(
            volume, offset, length, site, target, target_offset, args.via or "", timeout=None
        ),
        lambda r: (r.step, r.done_bytes, r.total_bytes),
    )
    if args.json:
        out.print_json(out.copy_doc(last))
    else:
        print(
            f"copied {out.human_size(last.done_bytes)} of {volume} to {site}:{target} at "
            f"{target_offset}{' via ' + args.via if args.via else ''} in {last.seconds:.2f} s, "
            f"sha256 {last.sha256}"
        )
        print(f"  {last.detail}")
    return 0


def verify(args: argparse.Namespace, client: ControlClient) -> int:
    """Exit 0: the images are equal; 1: regions differ (listed); 2: no comparison (one line),
    as cmp(1) does."""
    try:
        last = _last_of(
            args,
            "verify",
            client.verify(args.group, args.volume, timeout=None),
            lambda r: (f"volume {r.volume}", r.done_bytes, r.total_bytes),
        )
    except TargetdReplError as error:
        print(f"targetd-repl: {error}", file=sys.stderr)
        return 2
    if args.json:
        out.print_json(out.verify_doc(args.group, last))
    else:
        out.print_verify(args.group, last)
    return 1 if last.differing else 0
