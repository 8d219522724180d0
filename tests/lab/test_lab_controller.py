"""Real-kernel lab: the controller (`targetd-repl serve` with `[export]`) owns the site's LIO
export and serves its LUNs in-process; every assertion is on data read back from the guest."""

from __future__ import annotations

import re

import pytest

from targetd_repl.lab.prepare import LabImage
from targetd_repl.lab.qemu import run_scenario

pytestmark = pytest.mark.lab

MiB = 1 << 20
SHA256 = re.compile(r"^[0-9a-f]{64}$")


def test_controller_export(lab_image: LabImage) -> None:
    result = run_scenario("controller_export", image=lab_image)
    data = result.data
    # `volume create` through the CLI made LUN 0 of the site's target, a 64 MiB disk
    assert data["volume_created"]["name"] == "vol1"
    assert data["lun_after_create"] == {"0": "user/vol1"}
    assert data["device"].startswith("/dev/sd")
    assert data["device_size"] == 64 * MiB
    # what dd wrote with O_DIRECT reads back identical through the control API and the device
    first = data["first_sha256"]
    assert SHA256.match(first)
    assert data["io_read_first_sha256"] == first
    assert data["device_first_sha256"] == first
    # kill -9, the LUN removed from configfs behind the controller's back ...
    assert data["lun_removed_by_drift"] is True
    assert data["lun_after_drift"] == {}
    # ... the restart's reconcile puts it back (and says so), under the same number
    assert data["lun_after_restart"] == {"0": "user/vol1"}
    assert any("as LUN 0" in line for line in data["restart_repaired"])
    # after a re-login the data is identical, including the write acknowledged before the kill
    assert data["device_first_after_restart_sha256"] == first
    last = data["last_sha256"]
    assert SHA256.match(last) and last != first
    assert data["device_last_after_restart_sha256"] == last
    assert data["io_read_last_after_restart_sha256"] == last
    assert [v["name"] for v in data["volumes_after_restart"]] == ["vol1"]
    # SIGTERM while dd writes 16 MiB with O_DIRECT: a clean exit; what was left in the ring is
    # served after the next start, dd exits 0, and the 16 MiB read back whole
    assert data["writes_before_sigterm"] >= 8
    assert data["sigterm_under_io_exit"] == 0
    assert data["dd_across_sigterm_exit"] == 0
    third = data["third_sha256"]
    assert SHA256.match(third) and third not in (first, last)
    assert data["device_third_sha256"] == third
    assert data["io_read_third_tail_sha256"] == data["third_tail_sha256"]
    # resize re-exports the LUN under the same number, with the new size and the same data
    assert data["lun_after_resize"] == {"0": "user/vol1"}
    assert data["device_size_after_resize"] == 96 * MiB
    assert data["device_first_after_resize_sha256"] == first
    # SIGTERM: a clean exit
    assert data["sigterm_exit"] == 0
    assert data["controller_starts"] == 3
