"""verify's pure parts: how a volume is cut into slices of regions, and the region hashes."""

from __future__ import annotations

import hashlib
from pathlib import Path

from targetd_repl.roles.verify import region_hashes, slices
from targetd_repl.storage.volume import Volume

KiB = 1 << 10


def test_slices_cover_every_region_once_in_order() -> None:
    cut = slices(10 * 64 * KiB + 512, 64 * KiB, slice_bytes=256 * KiB)
    assert cut == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]  # the 512-byte tail is region 10
    assert slices(64 * KiB, 64 * KiB) == [[0]]
    assert slices(128 * KiB, 64 * KiB, slice_bytes=1) == [[0], [1]]  # at least one per slice


def test_region_hashes_are_blake2b_of_each_region_and_the_short_tail(tmp_path: Path) -> None:
    size = 3 * 64 * KiB + 4 * KiB
    volume = Volume.create(tmp_path / "v.img", size_bytes=size, block_size=512)
    try:
        data = bytes(range(256)) * (size // 256)
        volume.write(0, data)
        hashes = region_hashes(volume, [0, 3], 64 * KiB)
        assert hashes == [
            hashlib.blake2b(data[: 64 * KiB], digest_size=16).digest(),
            hashlib.blake2b(data[3 * 64 * KiB :], digest_size=16).digest(),
        ]
        volume.write(1, b"x" * 512)  # a change in region 0 changes its hash only
        again = region_hashes(volume, [0, 3], 64 * KiB)
        assert again[0] != hashes[0] and again[1] == hashes[1]
    finally:
        volume.close()
