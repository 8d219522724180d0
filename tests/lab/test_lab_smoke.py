"""Real-kernel lab: LIO configured by targetd_repl.lio and the TCMU ring, in a QEMU guest."""

from __future__ import annotations

import pytest

from targetd_repl.lab.prepare import LabImage
from targetd_repl.lab.qemu import run_scenario
from targetd_repl.lio import parse_uio_name, site_iqn

pytestmark = pytest.mark.lab

MiB = 1 << 20
INQUIRY, TEST_UNIT_READY, REPORT_LUNS = 0x12, 0x00, 0xA0


def test_lio_fileio_smoke(lab_image: LabImage) -> None:
    result = run_scenario("lio_fileio_smoke", image=lab_image)
    data = result.data
    assert result.ok
    assert data["target_iqn"] == site_iqn("lab")
    assert data["target_iqn"] in data["offered_targets"]
    assert data["device"].startswith("/dev/sd")
    assert data["device_size"] == 64 * MiB
    # the data path: what open-iscsi wrote is what it read back and what the file holds
    assert data["sha256_written"] == data["sha256_read"] == data["sha256_backing"]
    # reconcile: builds, then converges, then repairs exactly what was broken
    assert "create fileio backstore 'smoke'" in data["reconcile_first"]
    assert data["reconcile_second"] == []
    assert data["reconcile_repair"] == [f"create portal 127.0.0.1:3260 on {site_iqn('lab')}"]
    assert data["reconcile_teardown"] == [
        f"remove LUN 0 of {site_iqn('lab')}",
        "remove fileio backstore 'smoke'",
    ]


def test_tcmu_ring_probe(lab_image: LabImage) -> None:
    result = run_scenario("tcmu_ring_probe", image=lab_image)
    data = result.data
    mailbox = data["mailbox"]
    assert mailbox["version"] == 2
    assert mailbox["cmdr_off"] == 128
    assert mailbox["cmdr_size"] > 0
    assert mailbox["cmd_head"] == mailbox["cmd_tail"] == 0
    assert data["data_area_offset"] == mailbox["cmdr_off"] + mailbox["cmdr_size"]
    assert data["map_size"] > data["data_area_offset"]
    parsed = parse_uio_name(data["uio_name"])
    assert parsed is not None
    assert (parsed.storage_object, parsed.subtype, parsed.volume) == ("probe1", "targetd", "probe1")
    assert data["uio_device"].startswith("/dev/uio")
    # a login put a command on the ring, and nobody served it
    after = data["mailbox_after_login"]
    assert after["cmd_head"] != mailbox["cmd_head"]
    assert after["cmd_tail"] == mailbox["cmd_tail"]
    first = data["first_entry"]
    assert first["op"] == "CMD"
    assert first["cdb_opcode"] in (INQUIRY, TEST_UNIT_READY, REPORT_LUNS)
    assert first["length"] > 0 and first["length"] % 8 == 0
    assert "create user backstore 'probe1'" in data["changes"]
    assert "remove user backstore 'probe1'" in data["teardown"]


def test_lio_acl_chap(lab_image: LabImage) -> None:
    result = run_scenario("lio_acl_chap", image=lab_image)
    data = result.data
    iqn = site_iqn("lab")
    me = data["initiator"]
    assert f"create ACL {me} on {iqn}" in data["reconcile_first"]
    assert f"set TPG attribute authentication=1 on {iqn}" in data["reconcile_first"]
    assert data["reconcile_mutual"] == [f"set CHAP user 'labuser' for ACL {me} of {iqn}"]
    assert data["refused_wrong_password"]["exit"] == 24  # authorization failure
    assert data["refused_wrong_target_secret"]["exit"] == 19  # mutual CHAP: target refused
    assert data["sha256_written"] == data["sha256_backing"]
    assert f"remove ACL {me} of {iqn}" in data["teardown"]


def test_lio_alua_standby(lab_image: LabImage) -> None:
    result = run_scenario("lio_alua_standby", image=lab_image)
    data = result.data
    assert data["to_standby"] == ["ALUA group site-lab (id 16) on fileio/alua: standby"]
    assert data["to_active"] == ["ALUA group site-lab (id 16) on fileio/alua: active_optimized"]
    assert "asymmetric access state : 0x00 (active/optimized)" in data["rtpg_active"]
    assert "asymmetric access state : 0x02 (standby)" in data["rtpg_standby"]
    assert data["standby_write_exit"] != 0
