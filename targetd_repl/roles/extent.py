"""One-command extent copy between sites (seed 002): `targetd-repl copy VOLUME[:OFFSET+LENGTH]
SITE:VOLUME[:OFFSET] [--via INTERMEDIATE]`.

At the source, one command does every step and reports each one:

  snapshot   an instant snapshot of the source volume (kind extent-copy): the source stays
             online, the copy reads a frozen image;
  pair       a temporary pair to the target site: a RolePeer.CopyExtent stream over the sites'
             mutual-TLS link, set up and torn down by the command (no admin step, no pair row);
  copy       the extent's bytes, in pieces, written at the target through its group's write path
             (journaled, so a pair the target volume is in replicates them onward) — into the
             target extent, or with --via into the intermediate volume;
  via-copy   with --via: the target snapshots the intermediate and copies it into the final
             extent, so the target volume stays online and only the extent changes, at the end;
  verify     the target reads the extent back and answers its SHA-256; it must equal the
             source snapshot's;
  cleanup    the snapshots are deleted and the temporary pair goes, also after a failure.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc

from targetd_repl.errors import FailedPrecondition, InvalidArgument, TargetdReplError
from targetd_repl.model import Role, SnapshotKind, check_name
from targetd_repl.replication.status import error_from_rpc
from targetd_repl.roles.switchover import Switchover
from targetd_repl.storage.group_store import GroupStore
from targetd_repl.v1 import replication_pb2, replication_pb2_grpc

log = logging.getLogger(__name__)

PIECE = 1 << 20


@dataclass
class CopyStep:
    """One progress report of an extent copy."""

    step: str
    done_bytes: int = 0
    total_bytes: int = 0
    done: bool = False
    sha256: str = ""
    target_sha256: str = ""
    seconds: float = 0.0
    snapshot: str = ""
    detail: str = ""
    steps: list[str] = field(default_factory=list)


class ExtentCopy(Switchover):
    def copy_extent(
        self,
        volume: str,
        offset: int,
        length: int,
        site: str,
        target_volume: str,
        target_offset: int,
        via: str = "",
    ) -> Iterator[CopyStep]:
        """Run the copy, yielding progress; the last report has `done` (or it raises)."""
        started = time.monotonic()
        check_name("volume", volume)
        check_name("volume", target_volume)
        if via:
            check_name("volume", via)
        if site == self._site:
            raise InvalidArgument(f"copy to site {site}: that is this site")
        address = self._repl.peer_address(site)  # NotFound for an unknown peer
        store, vid = self._engine.group_of(volume)
        info = store.volume(vid).info
        if length == 0:
            length = info.size_bytes - offset
        bs = info.block_size
        if offset < 0 or length <= 0 or offset + length > info.size_bytes:
            raise InvalidArgument(
                f"extent {offset}+{length} is outside volume {volume!r} ({info.size_bytes} bytes)"
            )
        if offset % bs or length % bs or target_offset % bs:
            raise InvalidArgument(
                f"extent {offset}+{length} to offset {target_offset}: use multiples of volume "
                f"{volume!r}'s block size {bs}"
            )
        name = f"extent-copy-{time.strftime('%Y%m%d%H%M%S')}-{threading.get_ident() % 10000}"
        report = CopyStep("snapshot", total_bytes=length, snapshot=name)
        store.create_snapshot([vid], name, SnapshotKind.EXTENT_COPY)
        report.steps.append(f"snapshot {name} of {volume}")
        yield report
        digest = hashlib.sha256()
        sent = [0]
        failure: list[str] = []
        try:
            snap = store.volume(vid).snapshots.get(name)

            def messages() -> Iterator[replication_pb2.ExtentWrite]:
                yield replication_pb2.ExtentWrite(
                    open=replication_pb2.ExtentOpen(
                        site=self._site,
                        source=f"{self._site}:{volume}:{offset}+{length}",
                        volume=target_volume,
                        offset=target_offset,
                        length=length,
                        via=via,
                    )
                )
                at = 0
                while at < length:
                    n = min(PIECE, length - at)
                    data = snap.read_bytes(offset + at, n)
                    digest.update(data)
                    zero = data == bytes(n)
                    yield replication_pb2.ExtentWrite(
                        data=replication_pb2.RegionData(
                            volume=target_volume,
                            offset=at,
                            length=n,
                            data=b"" if zero else data,
                            zero=zero,
                        )
                    )
                    at += n
                    sent[0] = at
                yield replication_pb2.ExtentWrite(
                    done=replication_pb2.ExtentDone(sha256=digest.hexdigest())
                )

            from targetd_repl.replication.channel import open_channel  # noqa: PLC0415

            channel = open_channel(address, site, self._tls)
            report.step = "pair"
            report.steps.append(
                f"temporary pair {self._site}:{volume} -> {site}:{via or target_volume}"
            )
            yield report
            try:
                stub = replication_pb2_grpc.RolePeerStub(channel)
                future = stub.CopyExtent.future(messages(), timeout=None)
                report.step = "copy"
                while not future.done():
                    time.sleep(0.2)
                    report.done_bytes = sent[0]
                    report.seconds = time.monotonic() - started
                    yield report
                try:
                    result: replication_pb2.ExtentCopyResult = future.result()
                except grpc.RpcError as error:
                    raise error_from_rpc(error, site) from None
            finally:
                channel.close()
                report.steps.append("temporary pair removed")
            report.done_bytes = int(result.bytes)
            if via:
                report.steps.append(f"snapshot-copy {site}:{via} -> {target_volume}")
            report.step = "verify"
            report.sha256 = digest.hexdigest()
            report.target_sha256 = result.sha256
            if result.sha256 != report.sha256:
                raise FailedPrecondition(
                    f"copy to {site}:{target_volume}: the target's extent reads back with "
                    f"SHA-256 {result.sha256}, the source's is {report.sha256}"
                )
            report.steps.append("verified")
        except TargetdReplError as error:
            failure.append(f"step {report.step}: {error}")
            raise TargetdReplError(f"copy failed at step {report.step}: {error}") from None
        finally:
            try:
                store.delete_snapshot(vid, name)
                report.steps.append(f"snapshot {name} deleted")
            except TargetdReplError as error:  # pragma: no cover - reported, not fatal
                log.error("copy: cannot delete snapshot %s of %s: %s", name, volume, error)
        report.step = "done"
        report.done = True
        report.seconds = time.monotonic() - started
        report.detail = "; ".join(report.steps)
        log.info(
            "copy %s:%d+%d -> %s:%s:%d%s: %d bytes in %.2f s, sha256 %s",
            volume,
            offset,
            length,
            site,
            target_volume,
            target_offset,
            f" via {via}" if via else "",
            length,
            report.seconds,
            report.sha256,
        )
        yield report

    # --- the target ------------------------------------------------------------------------------

    def _writable(self, volume: str, what: str) -> tuple[GroupStore, int]:
        store, vid = self._engine.group_of(volume)
        if store.role is not Role.PRIMARY:
            raise FailedPrecondition(
                f"{what} {volume!r} is read-only at site {self._site}: group {store.name!r} is "
                f"{store.role} here"
            )
        return store, vid

    def receive_extent(
        self, opening: replication_pb2.ExtentOpen, messages: Iterator[replication_pb2.ExtentWrite]
    ) -> replication_pb2.ExtentCopyResult:
        started = time.monotonic()
        store, vid = self._writable(opening.volume, "target volume")
        info = store.volume(vid).info
        bs = info.block_size
        length, offset = opening.length, opening.offset
        if offset % bs or length % bs or offset + length > info.size_bytes:
            raise InvalidArgument(
                f"target extent {offset}+{length} does not fit volume {opening.volume!r} "
                f"({info.size_bytes} bytes, {bs}-byte blocks) at site {self._site}"
            )
        dest_store, dest_vid, base = store, vid, offset
        if opening.via:
            if opening.via == opening.volume:
                raise InvalidArgument("the intermediate volume must differ from the target")
            dest_store, dest_vid = self._writable(opening.via, "intermediate volume")
            via_info = dest_store.volume(dest_vid).info
            if via_info.size_bytes < length or via_info.block_size != bs:
                raise InvalidArgument(
                    f"intermediate volume {opening.via!r} ({via_info.size_bytes} bytes, "
                    f"{via_info.block_size}-byte blocks) cannot hold the {length}-byte extent"
                )
            base = 0
        written = 0
        for message in messages:
            kind = message.WhichOneof("body")
            if kind == "done":
                break
            if kind != "data":
                raise InvalidArgument(f"CopyExtent: unexpected {kind or 'empty'} message")
            piece = message.data
            if piece.offset + piece.length > length:
                raise InvalidArgument("CopyExtent: data past the extent's end")
            lba = (base + piece.offset) // bs
            if piece.zero:
                dest_store.write_zeros(dest_vid, lba, piece.length // bs)
            else:
                dest_store.write(dest_vid, lba, piece.data)
            written += piece.length
        else:
            raise InvalidArgument("CopyExtent: the stream ended before `done`")
        if written != length:
            raise InvalidArgument(f"CopyExtent: {written} bytes arrived of {length}")
        via_copied = False
        if opening.via:
            # snapshot-copy: the intermediate's frozen image into the final extent, last
            name = f"extent-via-{time.strftime('%Y%m%d%H%M%S')}"
            dest_store.create_snapshot([dest_vid], name, SnapshotKind.EXTENT_COPY)
            try:
                snap = dest_store.volume(dest_vid).snapshots.get(name)
                at = 0
                while at < length:
                    n = min(PIECE, length - at)
                    data = snap.read_bytes(at, n)
                    store.write(vid, (offset + at) // bs, data)
                    at += n
            finally:
                dest_store.delete_snapshot(dest_vid, name)
            via_copied = True
        digest = hashlib.sha256()
        at = 0
        while at < length:
            n = min(PIECE, length - at)
            digest.update(store.read(vid, (offset + at) // bs, n // bs))
            at += n
        log.info(
            "extent from %s (%s) written into %s at %d%s: %d bytes",
            opening.site,
            opening.source,
            opening.volume,
            offset,
            f" via {opening.via}" if opening.via else "",
            written,
        )
        return replication_pb2.ExtentCopyResult(
            bytes=written,
            sha256=digest.hexdigest(),
            seconds=time.monotonic() - started,
            via_copied=via_copied,
        )
