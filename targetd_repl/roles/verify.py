"""`verify GROUP [--volume V]`: compare a paired group's images at both sites by region hashes,
without moving the data (MISSION capability 10).

The two images only mean to be equal at the same point of the group's history, and an async
secondary lags. So the primary works in slices of regions (`SLICE_BYTES`), each compared at one
seq S:

  1. the group's writes pause (GroupStore.writes_paused: none in flight, none admitted), so its
     volumes hold exactly the history up to S, the journal's durable seq;
  2. the primary hashes the slice's regions (BLAKE2b-128 each);
  3. still paused, it asks the secondary for the same regions at S (RolePeer.HashRegions): the
     secondary waits until it has received S, applies exactly up to S (nothing past S can
     exist while the primary's writes pause) and hashes with its applier held;
  4. the writes resume; regions whose hashes differ are reported.

Before each pause the primary waits (up to `PAUSE_TIMEOUT`) until the peer holds what is already
written, so a pause lasts one slice's hashing at each site plus the lag of the writes made
since, and at most `PAUSE_TIMEOUT` seconds: past that the call fails, the writes resume and
verify reports the error. The figure of the longest pause comes with the result (`max_pause_ms`).
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from targetd_repl.errors import FailedPrecondition, NotFound
from targetd_repl.model import PairState, Role
from targetd_repl.replication.errors import PeerUnavailable
from targetd_repl.replication.secondary import SecondaryGroup
from targetd_repl.roles.extent import ExtentCopy
from targetd_repl.storage.volume import Volume
from targetd_repl.v1 import replication_pb2, replication_pb2_grpc

SLICE_BYTES = 8 << 20  # bytes of regions compared per pause of the writes
PAUSE_TIMEOUT = 5.0  # seconds one pause may last (the secondary's wait for S and its hashing)


@dataclass
class VerifyStep:
    """One progress report of a verify; the last has `done` and the result."""

    volume: str = ""
    done_bytes: int = 0
    total_bytes: int = 0
    regions: int = 0
    differing: list[tuple[str, int, int]] = field(default_factory=list)  # volume, offset, len
    first_seq: int = 0
    last_seq: int = 0
    seconds: float = 0.0
    max_pause_ms: float = 0.0
    done: bool = False


def region_hashes(volume: Volume, regions: Sequence[int], region_size: int) -> list[bytes]:
    """BLAKE2b-128 of each region's bytes (the last region of the volume may be shorter)."""
    block = volume.block_size
    hashes = []
    for region in regions:
        start = region * region_size
        length = min(region_size, volume.size_bytes - start)
        data = volume.read(start // block, length // block)
        hashes.append(hashlib.blake2b(data, digest_size=16).digest())
    return hashes


def slices(size_bytes: int, region_size: int, slice_bytes: int = SLICE_BYTES) -> list[list[int]]:
    """The region indexes of a volume of `size_bytes`, in slices of about `slice_bytes`."""
    count = -(-size_bytes // region_size)
    per = max(1, slice_bytes // region_size)
    return [list(range(first, min(count, first + per))) for first in range(0, count, per)]


class Verify(ExtentCopy):
    def verify(self, group: str, volume: str = "") -> Iterator[VerifyStep]:
        """At the primary: compare the group's volumes (or `volume`) with the secondary's,
        yielding progress; the last report has `done` and the differing regions."""
        pair = self._pair(group)
        store = self._store(group)
        if store.role is not Role.PRIMARY:
            raise FailedPrecondition(
                f"group {group!r} is secondary at site {self._site}: run verify at its primary "
                f"site {pair.peer_site}"
            )
        if pair.state is not PairState.PAIRED:
            raise FailedPrecondition(
                f"pair {group!r} is {pair.state.value}: verify compares the images of a pair "
                "that is paired (the secondary must be able to reach every seq)"
            )
        volumes = [store.volume(v) for v in store.volume_ids()]
        if volume:
            volumes = [ov for ov in volumes if ov.info.name == volume]
            if not volumes:
                raise NotFound(f"volume {volume!r} is not in group {group!r}")
        region_size = self._settings.region_size
        started = time.monotonic()
        step = VerifyStep(total_bytes=sum(ov.info.size_bytes for ov in volumes))
        for ov in sorted(volumes, key=lambda v: v.info.name):
            name = ov.info.name
            step.volume = name
            for regions in slices(ov.info.size_bytes, region_size):
                self._catch_up(group, store.journal.durable_seq)
                paused = time.monotonic()
                with store.writes_paused() as seq:  # order: S fixed before either site hashes
                    ours = region_hashes(ov.volume, regions, region_size)
                    request = replication_pb2.HashRegionsRequest(
                        group=group,
                        site=self._site,
                        volume=name,
                        seq=seq,
                        region_size=region_size,
                        regions=regions,
                    )
                    reply = self._peer_hashes(pair.peer_site, request)
                step.max_pause_ms = max(step.max_pause_ms, (time.monotonic() - paused) * 1e3)
                theirs = list(reply.hashes)
                if len(theirs) != len(ours):
                    raise FailedPrecondition(
                        f"site {pair.peer_site} answered {len(theirs)} hashes for "
                        f"{len(ours)} regions of volume {name!r}"
                    )
                for region, mine, other in zip(regions, ours, theirs, strict=True):
                    if mine != other:
                        offset = region * region_size
                        length = min(region_size, ov.info.size_bytes - offset)
                        step.differing.append((name, offset, length))
                step.first_seq = step.first_seq or seq
                step.last_seq = seq
                step.regions += len(regions)
                step.done_bytes += sum(
                    min(region_size, ov.info.size_bytes - r * region_size) for r in regions
                )
                step.seconds = time.monotonic() - started
                yield step
        step.done = True
        step.seconds = time.monotonic() - started
        yield step

    def _catch_up(self, group: str, seq: int) -> None:
        """Wait (a while) until the peer holds `seq`, so that a pause of the writes does not
        also wait out a backlog; a peer still behind after that is waited for in the pause."""
        with contextlib.suppress(PeerUnavailable):  # the pause's own deadline decides
            self._repl.wait_for(group, lambda status: status.acked_seq >= seq, PAUSE_TIMEOUT)

    def _peer_hashes(
        self, peer: str, request: replication_pb2.HashRegionsRequest
    ) -> replication_pb2.HashRegionsResponse:
        def call(stub: replication_pb2_grpc.RolePeerStub) -> replication_pb2.HashRegionsResponse:
            reply: replication_pb2.HashRegionsResponse = stub.HashRegions(
                request, timeout=PAUSE_TIMEOUT
            )
            return reply

        return self._peer_call(peer, call)

    def hash_regions(
        self, request: replication_pb2.HashRegionsRequest
    ) -> replication_pb2.HashRegionsResponse:
        """At the secondary (RolePeer.HashRegions): the regions' hashes at exactly request.seq."""
        group = request.group
        pair = self._pair(group)
        self._check_peer(pair, request.site, group)
        runner = self._running(group)
        if not isinstance(runner, SecondaryGroup):
            raise FailedPrecondition(f"group {group!r} is not a running secondary here")
        if not runner.consistent or runner.held:
            raise FailedPrecondition(
                f"group {group!r}: the image at site {self._site} is not a consistent copy now "
                "(a copy or a role change is in progress)"
            )
        store = runner.store
        named = [store.volume(v) for v in store.volume_ids()]
        ov = next((v for v in named if v.info.name == request.volume), None)
        if ov is None:
            raise NotFound(f"volume {request.volume!r} is not in group {group!r} here")
        if request.region_size != self._settings.region_size:
            raise FailedPrecondition(
                f"regions of {request.region_size} bytes asked, {self._settings.region_size} here"
            )
        count = -(-ov.info.size_bytes // request.region_size)
        if any(r >= count for r in request.regions):
            raise NotFound(f"volume {request.volume!r} has {count} regions here")
        # The primary's writes pause until we answer: wait for S a little less than its
        # deadline, so that a seq that does not come is answered with a message.
        store.journal.wait_durable_beyond(request.seq - 1, PAUSE_TIMEOUT * 0.8)
        hashes = store.at_applied_seq(
            request.seq,
            lambda: region_hashes(ov.volume, list(request.regions), request.region_size),
        )
        return replication_pb2.HashRegionsResponse(hashes=hashes, applied_seq=request.seq)
