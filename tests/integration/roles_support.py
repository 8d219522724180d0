"""Helpers for the role-change tests (no tests here): a single-writer log of acknowledged writes
with their seqs (the acknowledged-write checker), waits on pair and role status, image reads."""

from __future__ import annotations

import hashlib
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from targetd_repl.cli_output import pair_doc, role_change_doc
from tests.integration.harness import Site

BLOCK = 4096
REGION = 64 * 1024


@dataclass
class WriteLog:
    """Acknowledged writes in acknowledgement order: (seq, volume, offset, data); with one writer
    per site the seqs of its writes grow. `inflight` is the write whose reply never came."""

    entries: list[tuple[int, str, int, bytes]] = field(default_factory=list)
    inflight: list[tuple[str, int, bytes]] = field(default_factory=list)

    def image(self, volume: str, size: int, upto: int, base: bytes | None = None) -> bytes:
        out = bytearray(base if base is not None else bytes(size))
        for seq, vol, offset, data in sorted(self.entries, key=lambda e: e[0]):
            if vol == volume and seq <= upto:
                out[offset : offset + len(data)] = data
        return bytes(out)

    def regions(self, volume: str, after: int = 0) -> set[int]:
        found: set[int] = set()
        for seq, vol, offset, data in self.entries:
            if vol == volume and seq > after:
                found.update(range(offset // REGION, (offset + len(data) - 1) // REGION + 1))
        return found

    @property
    def last_seq(self) -> int:
        return max((e[0] for e in self.entries), default=0)


class Writer:
    """One thread writing random blocks through the control API of `site` until stopped."""

    def __init__(
        self,
        site: Site,
        volume: str,
        size: int,
        log: WriteLog,
        *,
        seed: int,
        blocks: int = 1,
        regions: list[int] | None = None,
        delay: float = 0.0,
    ) -> None:
        self.site = site
        self.volume = volume
        self.size = size
        self.log = log
        self.rng = random.Random(seed)
        self.blocks = blocks
        self.regions = regions
        self.delay = delay
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Writer:
        self.thread.start()
        return self

    def join(self) -> None:
        self.stop.set()
        self.thread.join(60)

    def _offset(self) -> int:
        if self.regions:
            region = self.rng.choice(self.regions)
            within = self.rng.randrange(0, REGION // BLOCK - self.blocks + 1) * BLOCK
            return region * REGION + within
        return self.rng.randrange(0, self.size // BLOCK - self.blocks + 1) * BLOCK

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                with self.site.connected(timeout=5) as client:
                    while not self.stop.is_set():
                        offset = self._offset()
                        data = self.rng.randbytes(BLOCK * self.blocks)
                        self.log.inflight = [(self.volume, offset, data)]
                        seq = client.write(self.volume, offset, data)
                        self.log.entries.append((seq, self.volume, offset, data))
                        self.log.inflight = []
                        if self.delay:
                            time.sleep(self.delay)
            except Exception as error:  # the site went down or refuses writes now
                self.errors.append(str(error))
                return


def write_some(
    site: Site, volume: str, log: WriteLog, count: int, seed: int, size: int, **kw: Any
) -> None:
    """`count` writes, one after the other, logged with their seqs."""
    writer = Writer(site, volume, size, log, seed=seed, **kw)
    with site.connected() as client:
        for _ in range(count):
            offset = writer._offset()
            data = writer.rng.randbytes(BLOCK * writer.blocks)
            seq = client.write(volume, offset, data)
            log.entries.append((seq, volume, offset, data))


def pair(site: Site, group: str) -> dict[str, Any]:
    with site.connected() as client:
        return pair_doc(client.pair_status(group))


def wait_pair(site: Site, group: str, check: Any, timeout: float = 90.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            status = pair(site, group)
            if check(status):
                return status
        except Exception as error:  # restarting, or no pair yet
            status = {"error": str(error)}
        time.sleep(0.1)
    raise AssertionError(f"pair {group} at site {site.name} never got there: {status}")


def wait_role(site: Site, group: str, timeout: float = 120.0) -> dict[str, Any]:
    """Wait until the role change at `site` is no longer running; return its status."""
    deadline = time.monotonic() + timeout
    doc: dict[str, Any] = {}
    while time.monotonic() < deadline:
        with site.connected() as client:
            doc = role_change_doc(client.role_status(group))
        if doc["phase"] != "running":
            return doc
        time.sleep(0.1)
    raise AssertionError(f"role change of {group} at {site.name} still running: {doc}")


def read(site: Site, volume: str, size: int) -> bytes:
    with site.connected() as client:
        return client.read(volume, 0, size)


def digest(site: Site, volume: str, size: int) -> str:
    return hashlib.sha256(read(site, volume, size)).hexdigest()


def role_of(site: Site, group: str) -> str:
    groups = {g["name"]: g for g in site.cli_json("group", "list")}
    return str(groups[group]["role"])
