"""Real-kernel lab: our TCMU handler (`python -m targetd_repl.datapath --engine`) serving LIO user
backstores to open-iscsi and libiscsi in a QEMU guest; every test asserts on data."""

from __future__ import annotations

import re

import pytest

from targetd_repl.lab.prepare import LabImage
from targetd_repl.lab.qemu import run_scenario
from targetd_repl.lab.scenarios_datapath import parse_test_cu

pytestmark = pytest.mark.lab

MiB = 1 << 20
SHA256 = re.compile(r"^[0-9a-f]{64}$")


def test_datapath_mkfs(lab_image: LabImage) -> None:
    result = run_scenario("datapath_mkfs", image=lab_image)
    data = result.data
    assert data["device"].startswith("/dev/sd")
    assert data["device_size"] == 128 * MiB
    # every file written through the file system verifies after logout and a new login
    assert len(data["files"]) == 5
    assert all(SHA256.match(sha) for sha in data["files"].values())
    assert data["files_after_relogin"] == data["files"]
    assert data["fsck_exit"] == 0
    # the whole device, read with O_DIRECT, is the engine's volume image byte for byte
    assert SHA256.match(data["device_sha256"])
    assert data["device_sha256"] == data["image_sha256"]
    # ... and every write went through the journal first
    journal = data["journal"]
    assert journal["write_records"] > 0
    assert journal["write_bytes"] >= 5 * MiB // 2
    assert journal["applied_seq"] == journal["last_seq"] >= journal["records"]


def test_datapath_kill9(lab_image: LabImage) -> None:
    result = run_scenario("datapath_kill9", image=lab_image)
    data = result.data
    assert data["fio_exit"] == 0
    assert data["verify_only_exit"] == 0
    assert data["fio_verify_bytes"] >= 32 * MiB
    assert len(data["kills"]) == 2
    for kill in data["kills"]:
        assert kill["fio_running"]  # the handler died under load, and came back under load
        assert kill["restart_s"] < 60  # well inside the LUN's cmd_time_out
        assert kill["writes_completed_before"] > 0
    assert data["io_errors"] == []
    assert data["handler_starts"] == 4  # first, two restarts after -9, one clean restart
    # every acknowledged write went through the journal (kept whole: no trim in this run)
    assert data["journal"]["write_bytes"] >= 32 * MiB


@pytest.mark.timeout(2700)
def test_datapath_conformance(lab_image: LabImage) -> None:
    result = run_scenario("datapath_conformance", image=lab_image)
    data = result.data
    ours, fileio = data["ours"]["counts"], data["fileio"]["counts"]
    assert ours["pass"] + ours["fail"] + ours["skip"] > 200
    assert ours["pass"] >= fileio["pass"]  # passes that ran, skips not counted
    # CUnit's count, where a skipped ("not implemented") test counts as passed
    assert data["ours"]["cunit_summary"]["passed"] >= data["fileio"]["cunit_summary"]["passed"]
    # every test we do not pass is listed with its reason (the README lists them)
    for name, outcome in data["ours_not_passed"].items():
        assert outcome["outcome"] in ("fail", "skip"), name
        assert outcome["reason"], name
    assert len(data["ours_not_passed"]) == ours["fail"] + ours["skip"]
    assert len(data["ours_failures"]) == ours["fail"]
    assert sum(map(len, data["ours_skips_by_reason"].values())) == ours["skip"]


def test_datapath_write_protect(lab_image: LabImage) -> None:
    result = run_scenario("datapath_write_protect", image=lab_image)
    data = result.data
    assert data["dd_exit_secondary"] != 0
    assert data["dd_exit_promoted"] == 0
    assert (data["modes_primary_wp"], data["modes_secondary_wp"]) == (False, True)
    assert data["modes_promoted_wp"] is False
    assert data["sg_raw_sense"] == {"key": 0x7, "asc": 0x27, "ascq": 0x00}
    assert data["sg_raw_exit_promoted"] == 0
    assert data["sg_write_same_exit"] != 0
    assert data["sg_dd_exit"] != 0
    assert data["same_session"] is True


def test_parse_test_cu() -> None:
    """The parser of iscsi-test-cu's output (host only, no guest)."""
    text = """Suite: Inquiry
  Test: Standard ...passed
  Test: EVPD ...
    [SKIPPED] page not implemented
passed
Suite: Write10
  Test: Flags ...FAILED
    1. test_write10_flags.c:44  - Expected GOOD
"""
    parsed = parse_test_cu(text)
    assert parsed["tests"]["Inquiry.Standard"] == {"outcome": "pass", "reason": ""}
    assert parsed["tests"]["Inquiry.EVPD"]["outcome"] == "skip"
    assert "not implemented" in parsed["tests"]["Inquiry.EVPD"]["reason"]
    assert parsed["tests"]["Write10.Flags"]["outcome"] == "fail"
    assert parsed["counts"] == {"pass": 1, "fail": 1, "skip": 1}
