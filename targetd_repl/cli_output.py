"""How the CLI shows what a site answers: JSON documents (`--json`), human tables (rich), and the
live view of `pair status --watch` with a progress bar per copy. Pure presentation: the messages
of control.proto in, text out.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn
from rich.table import Table

from targetd_repl.replication.wire import mode_from_proto, role_from_proto, state_from_proto
from targetd_repl.v1 import control_pb2

Document = dict[str, Any]

_UNITS = (("T", 40), ("G", 30), ("M", 20), ("K", 10))


def human_size(n: int) -> str:
    """1073741824 -> '1 GiB', 1536 -> '1.5 KiB', 100 -> '100 B'."""
    for suffix, shift in _UNITS:
        if n >= 1 << shift:
            value = n / (1 << shift)
            shown = f"{value:.0f}" if value == int(value) else f"{value:.1f}"
            return f"{shown} {suffix}iB"
    return f"{n} B"


# --- documents (--json) ---------------------------------------------------------------------------


def volume_doc(v: control_pb2.Volume) -> Document:
    return {
        "name": v.name,
        "size_bytes": v.size_bytes,
        "block_size": v.block_size,
        "group": v.group,
        "created_at": v.created_at,
    }


def group_doc(g: control_pb2.Group) -> Document:
    return {
        "name": g.name,
        "role": role_from_proto(g.role).value,
        "epoch": g.epoch,
        "volumes": list(g.volumes),
        "applied_seq": g.applied_seq,
        "peer": g.peer,
        "created_at": g.created_at,
    }


def pair_doc(p: control_pb2.Pair) -> Document:
    return {
        "group": p.group,
        "peer": p.peer,
        "mode": mode_from_proto(p.mode).value,
        "state": state_from_proto(p.state).value,
        "role": role_from_proto(p.role).value,
        "epoch": p.epoch,
        "last_seq": p.last_seq,
        "acked_seq": p.acked_seq,
        "applied_seq": p.applied_seq,
        "lag_records": p.lag_records,
        "lag_seconds": p.lag_seconds,
        "unsent_regions": p.unsent_regions,
        "resync_done_bytes": p.resync_done_bytes,
        "resync_total_bytes": p.resync_total_bytes,
        "detail": p.detail,
    }


def site_doc(s: control_pb2.SiteInfo) -> Document:
    return {
        "name": s.name,
        "version": s.version,
        "state_dir": s.state_dir,
        "replication_address": s.replication_address,
        "control_socket": s.control_socket,
        "control_address": s.control_address,
        "peers": {p.name: p.address for p in s.peers},
        "pid": s.pid,
        "started_at": s.started_at,
    }


def print_json(document: object) -> None:
    print(json.dumps(document, sort_keys=True))


# --- tables ---------------------------------------------------------------------------------------


def _console() -> Console:
    return Console(file=sys.stdout, highlight=False, soft_wrap=False)


def _table(title: str, columns: Sequence[str], rows: Iterable[Sequence[str]]) -> Table:
    table = Table(title=title, title_justify="left", show_edge=False, pad_edge=False)
    for column in columns:
        justify = "right" if column in _NUMERIC else "left"
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for row in rows:
        table.add_row(*row)
    return table


_NUMERIC = {
    *("OFFSET", "LENGTH", "SIZE", "BLOCK", "EPOCH", "APPLIED", "LAST", "ACKED", "LAG", "LAG S"),
    *("UNSENT", "COPY"),
}


def print_volumes(volumes: Sequence[control_pb2.Volume]) -> None:
    if not volumes:
        print("no volumes")
        return
    rows = [(v.name, human_size(v.size_bytes), str(v.block_size), v.group) for v in volumes]
    _console().print(_table("", ("NAME", "SIZE", "BLOCK", "GROUP"), rows))


def print_groups(groups: Sequence[control_pb2.Group]) -> None:
    if not groups:
        print("no groups")
        return
    rows = [
        (
            g.name,
            role_from_proto(g.role).value,
            str(g.epoch),
            ", ".join(g.volumes) or "-",
            g.peer or "-",
            str(g.applied_seq),
        )
        for g in groups
    ]
    _console().print(_table("", ("NAME", "ROLE", "EPOCH", "VOLUMES", "PEER", "APPLIED"), rows))


def _copy_progress(p: control_pb2.Pair) -> str:
    if not p.resync_total_bytes:
        return "-"
    return f"{100 * p.resync_done_bytes / p.resync_total_bytes:.0f}%"


def print_pairs(pairs: Sequence[control_pb2.Pair]) -> None:
    if not pairs:
        print("no pairs")
        return
    rows = [
        (
            d["group"],
            d["peer"],
            d["mode"],
            d["state"],
            d["role"],
            str(d["epoch"]),
            str(d["last_seq"]),
            str(d["acked_seq"]),
            str(d["lag_records"]),
            f"{d['lag_seconds']:.1f}",
            str(d["unsent_regions"]),
            _copy_progress(p),
        )
        for p, d in ((p, pair_doc(p)) for p in pairs)
    ]
    columns = (
        "GROUP", "PEER", "MODE", "STATE", "ROLE", "EPOCH", "LAST", "ACKED", "LAG", "LAG S",
        "UNSENT", "COPY",
    )  # fmt: skip
    _console().print(_table("", columns, rows))


def print_pair(pair: control_pb2.Pair) -> None:
    doc = pair_doc(pair)
    table = Table(show_header=False, show_edge=False, pad_edge=False, box=None)
    table.add_column(style="bold")
    table.add_column()
    for key, value in doc.items():
        if key == "resync_total_bytes" and value:
            shown = f"{human_size(value)} ({_copy_progress(pair)} copied)"
        elif key == "lag_seconds":
            shown = f"{value:.3f}"
        else:
            shown = str(value) if value != "" else "-"
        table.add_row(key.replace("_", " "), shown)
    _console().print(table)


def print_site(site: control_pb2.SiteInfo) -> None:
    doc = site_doc(site)
    table = Table(show_header=False, show_edge=False, pad_edge=False, box=None)
    table.add_column(style="bold")
    table.add_column()
    for key, value in doc.items():
        if key == "peers":
            shown = ", ".join(f"{n} at {a}" for n, a in value.items()) or "-"
        elif key == "started_at":
            shown = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(value))
        else:
            shown = str(value) if value != "" else "-"
        table.add_row(key.replace("_", " "), shown)
    _console().print(table)


def hexdump(data: bytes, offset: int = 0) -> str:
    lines = []
    for at in range(0, len(data), 16):
        chunk = data[at : at + 16]
        hexes = " ".join(f"{b:02x}" for b in chunk)
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        lines.append(f"{offset + at:08x}  {hexes:<47}  {text}")
    return "\n".join(lines)


# --- pair status --watch --------------------------------------------------------------------------


class PairWatch:
    """A live view of pairs: one line each with state and lag, and a bar while a copy runs."""

    def __init__(self) -> None:
        self._progress = Progress(
            TextColumn("{task.fields[group]:<12} {task.fields[state]:<15}"),
            BarColumn(),
            TextColumn("{task.fields[copied]}"),
            TextColumn("lag {task.fields[lag]}"),
            console=Console(file=sys.stdout),
            auto_refresh=False,
        )
        self._tasks: dict[str, TaskID] = {}

    def __enter__(self) -> PairWatch:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def update(self, pairs: Sequence[control_pb2.Pair]) -> None:
        for pair in pairs:
            doc = pair_doc(pair)
            copying = doc["state"] == "copying" and pair.resync_total_bytes > 0
            total = pair.resync_total_bytes if copying else 1
            done = pair.resync_done_bytes if copying else (1 if doc["state"] == "paired" else 0)
            copied = ""
            if copying:
                percent = 100 * pair.resync_done_bytes / pair.resync_total_bytes
                copied = (
                    f"{percent:3.0f}% {human_size(pair.resync_done_bytes)} "
                    f"of {human_size(pair.resync_total_bytes)}"
                )
            fields = {
                "group": pair.group,
                "state": doc["state"],
                "copied": copied,
                "lag": f"{pair.lag_records} rec / {pair.lag_seconds:.1f} s",
            }
            task = self._tasks.get(pair.group)
            if task is None:
                self._tasks[pair.group] = self._progress.add_task(
                    pair.group, total=total, completed=done, **fields
                )
            else:
                self._progress.update(task, total=total, completed=done, **fields)
        self._progress.refresh()


# --- snapshots and role changes -------------------------------------------------------------------


def snapshot_doc(s: control_pb2.Snapshot) -> Document:
    return {
        "volume": s.volume,
        "name": s.name,
        "kind": s.kind,
        "created_at": s.created_at,
        "epoch": s.epoch,
        "seq": s.seq,
        "size_bytes": s.size_bytes,
        "preserved_bytes": s.preserved_bytes,
    }


def print_snapshots(snapshots: Sequence[control_pb2.Snapshot]) -> None:
    if not snapshots:
        print("no snapshots")
        return
    rows = [
        (
            s.volume,
            s.name,
            s.kind,
            str(s.epoch),
            str(s.seq),
            human_size(s.preserved_bytes),
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.created_at)),
        )
        for s in snapshots
    ]
    columns = ("VOLUME", "NAME", "KIND", "EPOCH", "SEQ", "KEPT", "CREATED")
    _console().print(_table("", columns, rows))


def role_change_doc(r: control_pb2.RoleChange) -> Document:
    doc: Document = {
        "group": r.group,
        "command": r.command,
        "phase": r.phase,
        "step": r.step,
        "done_bytes": r.done_bytes,
        "total_bytes": r.total_bytes,
        "elapsed_seconds": r.elapsed_seconds,
        "detail": r.detail,
        "epoch": r.epoch,
        "snapshot": r.snapshot,
        "seq": r.seq,
        "regions": r.regions,
        "promoted_seconds": r.promoted_seconds,
    }
    doc["pair"] = pair_doc(r.pair) if r.HasField("pair") else None
    return doc


def print_role_change(r: control_pb2.RoleChange) -> None:
    doc = role_change_doc(r)
    table = Table(show_header=False, show_edge=False, pad_edge=False, box=None)
    table.add_column(style="bold")
    table.add_column()
    for key in ("group", "command", "phase", "step", "epoch", "seq", "snapshot", "regions"):
        value = doc[key]
        table.add_row(key, str(value) if value not in ("", 0) else "-")
    if r.total_bytes:
        table.add_row("copied", f"{human_size(r.done_bytes)} of {human_size(r.total_bytes)}")
    if r.promoted_seconds:
        table.add_row("writable after", f"{r.promoted_seconds:.3f} s")
    table.add_row("elapsed", f"{r.elapsed_seconds:.1f} s")
    if r.HasField("pair"):
        p = pair_doc(r.pair)
        table.add_row(
            "pair", f"{p['state']}, {p['role']} here, peer {p['peer']}, epoch {p['epoch']}"
        )
    if r.detail:
        table.add_row("detail", r.detail)
    _console().print(table)


class RoleProgress:
    """A progress bar for a running role change (on stderr, so stdout stays the result)."""

    def __init__(self, what: str) -> None:
        self._progress = Progress(
            TextColumn("{task.fields[what]:<12} {task.fields[step]:<28}"),
            BarColumn(),
            TextColumn("{task.fields[copied]}"),
            console=Console(file=sys.stderr),
            auto_refresh=False,
            transient=True,
        )
        self._what = what
        self._task: TaskID | None = None

    def __enter__(self) -> RoleProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def update(self, step: str, done: int, total: int) -> None:
        copied = f"{human_size(done)} of {human_size(total)}" if total else ""
        if self._task is None:
            self._task = self._progress.add_task(
                self._what, total=total or 1, what=self._what, step=step[:28], copied=copied
            )
        self._progress.update(
            self._task,
            total=total or 1,
            completed=done if total else 0,
            what=self._what,
            step=step[:28],
            copied=copied,
        )
        self._progress.refresh()


def copy_doc(p: control_pb2.CopyProgress) -> Document:
    return {
        "step": p.step,
        "done": p.done,
        "bytes": p.done_bytes,
        "total_bytes": p.total_bytes,
        "sha256": p.sha256,
        "target_sha256": p.target_sha256,
        "seconds": p.seconds,
        "snapshot": p.snapshot,
        "detail": p.detail,
    }


def verify_doc(group: str, p: control_pb2.VerifyProgress) -> Document:
    return {
        "group": group,
        "equal": not p.differing,
        "regions": p.regions,
        "bytes": p.done_bytes,
        "differing": [
            {"volume": d.volume, "offset": d.offset, "length": d.length} for d in p.differing
        ],
        "first_seq": p.first_seq,
        "last_seq": p.last_seq,
        "seconds": p.seconds,
        "max_pause_ms": p.max_pause_ms,
    }


def print_verify(group: str, p: control_pb2.VerifyProgress) -> None:
    seqs = f"seq {p.first_seq}" if p.first_seq == p.last_seq else f"seqs {p.first_seq}-{p.last_seq}"
    verdict = "equal at both sites" if not p.differing else f"{len(p.differing)} region(s) differ"
    print(
        f"group {group}: {p.regions} regions ({human_size(p.done_bytes)}) compared at {seqs}: "
        f"{verdict} ({p.seconds:.2f} s, writes paused at most {p.max_pause_ms:.0f} ms at a time)"
    )
    if p.differing:
        rows = [(d.volume, str(d.offset), human_size(d.length)) for d in p.differing]
        _console().print(_table("", ("VOLUME", "OFFSET", "LENGTH"), rows))
