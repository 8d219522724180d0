"""Fixtures for the QEMU lab tests: the prepared guest image, or a loud failure under CI."""

from __future__ import annotations

import os
import shutil

import pytest

from targetd_repl.lab.errors import LabError
from targetd_repl.lab.prepare import LabImage, prepare
from targetd_repl.lab.qemu import QEMU


def lab_unavailable(reason: str) -> None:
    """Fail under CI (the lab must run there), skip with the reason elsewhere."""
    if os.environ.get("CI"):
        pytest.fail(f"the QEMU lab cannot run, and CI is set: {reason}", pytrace=False)
    pytest.skip(f"QEMU lab unavailable: {reason} (make deps installs what it needs)")


@pytest.fixture(scope="session")
def lab_image() -> LabImage:
    if shutil.which(QEMU) is None:
        lab_unavailable(f"{QEMU} is not installed")
    try:
        return prepare()
    except LabError as exc:
        lab_unavailable(str(exc))
        raise  # unreachable: lab_unavailable always raises
