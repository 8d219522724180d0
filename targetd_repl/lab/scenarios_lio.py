"""Lab scenarios for the LIO configuration layer and the kernel's TCMU ring (issue 3).

- `lio_fileio_smoke`: LIO configured only through `targetd_repl.lio` (reconcile, twice: the
  second call must change nothing; a portal removed behind its back is put back; a foreign
  backstore is left alone), a demo-mode target on 127.0.0.1:3260, open-iscsi discovery and
  login, a pattern written with O_DIRECT through /dev/sdX, read back, and found byte for byte
  in the backing file.
- `lio_acl_chap`: an ACL with CHAP, then mutual CHAP: a wrong password and a wrong target
  secret are refused, the right ones log in and write.
- `lio_alua_standby`: the site's ALUA group moved to standby refuses writes (and REPORT TARGET
  PORT GROUPS says standby); moved back to active/optimized, writes pass in the same session.
- `tcmu_ring_probe`: a `user:` backstore (config `targetd/<volume>`), its /dev/uioN found with
  pyudev by its sysfs name, mmapped, and its mailbox read; then an open-iscsi login puts the
  initiator's first command on the ring (cmd_head advances) without anyone serving it, and a
  short `cmd_time_out` lets the kernel fail it so the LUN can be removed cleanly.
"""

from __future__ import annotations

import mmap
import os
import random
import struct
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyudev

from targetd_repl import lio
from targetd_repl.lab import initiator
from targetd_repl.lab.data import read_range, sha256
from targetd_repl.lab.registry import scenario

if TYPE_CHECKING:
    from targetd_repl.lab.guest import GuestContext

MiB = 1 << 20
SITE = "lab"
PORTAL = lio.Portal("127.0.0.1", 3260)
WORKDIR = Path("/var/lib/targetd-lab")  # in the guest's tmpfs overlay

# linux/target_core_user.h (confirmed on a live ring, see LAB-NOTES.md)
MAILBOX = struct.Struct("<HHIII")  # version, flags, cmdr_off, cmdr_size, cmd_head
MAILBOX_TAIL_OFFSET = 64
ENTRY_HEADER = struct.Struct("<IHBB")  # len_op, cmd_id, kflags, uflags
ENTRY_REQ = struct.Struct("<III")  # iov_cnt, iov_bidi_cnt, iov_dif_cnt (at +8)
ENTRY_CDB_OFF = struct.Struct("<Q")  # cdb_off (at +24)
TCMU_OP_MASK = 0x7
TCMU_OP_NAMES = {0: "PAD", 1: "CMD"}


@scenario("lio_fileio_smoke", needs=("iscsid",), timeout_s=300)
def lio_fileio_smoke(ctx: GuestContext) -> dict[str, Any]:
    """fileio LUN via targetd_repl.lio; open-iscsi writes a pattern; the backing file has it."""
    WORKDIR.mkdir(parents=True, exist_ok=True)
    size = 64 * MiB
    backing = WORKDIR / "smoke.img"
    wanted = lio.LioConfig(
        site=SITE,
        luns=(lio.LunSpec("smoke", size, kind=lio.BackstoreKind.FILEIO, path=str(backing), lun=0),),
        portals=(PORTAL,),
        demo_mode=True,
    )
    iqn = wanted.target_iqn

    # A backstore someone else made (no mark of ours, exported by nobody): reconcile keeps it.
    foreign = WORKDIR / "foreign.img"
    with foreign.open("wb") as f:
        f.truncate(4 * MiB)
    with ctx.timed("foreign_backstore"):
        _make_foreign_fileio(ctx, "foreign", str(foreign), 4 * MiB)

    with ctx.timed("lio_reconcile_first"):
        first = lio.reconcile(wanted)
    ctx.check("create fileio backstore 'smoke'" in first, f"first reconcile built it: {first}")
    with ctx.timed("lio_reconcile_second"):
        second = lio.reconcile(wanted)
    ctx.check(second == [], f"second reconcile changed nothing (got {second})")
    lio.remove_portal(SITE, PORTAL)
    with ctx.timed("lio_reconcile_repair"):
        repaired = lio.reconcile(wanted)
    ctx.check(
        repaired == [f"create portal {PORTAL} on {iqn}"],
        f"reconcile put back only the portal removed behind its back (got {repaired})",
    )
    state = lio.read_state()
    ctx.check(("fileio", "foreign") in state.backstores, "the foreign backstore is left alone")
    ctx.check(
        state.targets[iqn].attributes.get("generate_node_acls") == "1",
        "demo mode: generate_node_acls=1",
    )

    with ctx.timed("iscsi_discovery"):
        offered = initiator.discover(ctx, str(PORTAL))
    ctx.check(iqn in offered, f"discovery offers {iqn} (got {offered})")
    with ctx.timed("iscsi_login"):
        initiator.login(ctx, iqn, str(PORTAL))
        device = initiator.disk_for(ctx, iqn, lun=0)
    device_size = initiator.block_size_bytes(device)
    ctx.check(device_size == size, f"{device} has the LUN's size {size} (got {device_size})")

    pattern = random.Random(20250101).randbytes(4 * MiB)
    offset = 1 * MiB
    pattern_file = Path("/tmp/pattern.bin")
    pattern_file.write_bytes(pattern)
    with ctx.timed("write_4MiB_direct"):
        ctx.run(
            [
                *("dd", f"if={pattern_file}", f"of={device}", "bs=1M", f"seek={offset // MiB}"),
                *("oflag=direct", "conv=fsync", "status=none"),
            ]
        )
    readback_file = Path("/tmp/readback.bin")
    with ctx.timed("read_4MiB_direct"):
        ctx.run(
            [
                *("dd", f"if={device}", f"of={readback_file}", "bs=1M", f"skip={offset // MiB}"),
                *("count=4", "iflag=direct", "status=none"),
            ]
        )
    written = sha256(pattern)
    read_back = sha256(readback_file.read_bytes())
    ctx.check(read_back == written, f"read back {read_back} == written {written}")
    with ctx.timed("iscsi_logout"):
        initiator.logout(ctx, iqn, str(PORTAL))

    in_file = sha256(read_range(str(backing), offset, len(pattern)))
    ctx.check(in_file == written, f"backing file holds the pattern at 1 MiB ({in_file})")
    head = read_range(str(backing), 0, offset)
    ctx.check(head == bytes(offset), "the first MiB of the backing file is still zeros")

    with ctx.timed("lio_teardown"):
        teardown = lio.reconcile(lio.LioConfig(site=SITE, portals=(PORTAL,), demo_mode=True))
        lio.remove_target(SITE)
    state = lio.read_state()
    ctx.check(("fileio", "smoke") not in state.backstores, "teardown removed our backstore")
    ctx.check(iqn not in state.targets, "teardown removed our target")
    ctx.check(("fileio", "foreign") in state.backstores, "the foreign backstore survived")
    saved = Path("/etc/target/saveconfig.json")
    ctx.check(saved.is_file(), "the configuration was saved")
    return {
        "target_iqn": iqn,
        "device": device,
        "device_size": device_size,
        "reconcile_first": first,
        "reconcile_second": second,
        "reconcile_repair": repaired,
        "reconcile_teardown": teardown,
        "sha256_written": written,
        "sha256_read": read_back,
        "sha256_backing": in_file,
        "offered_targets": offered,
    }


def _initiator_name() -> str:
    for line in Path("/etc/iscsi/initiatorname.iscsi").read_text().splitlines():
        if line.startswith("InitiatorName="):
            return line.split("=", 1)[1].strip()
    raise AssertionError("no InitiatorName in /etc/iscsi/initiatorname.iscsi")


def _login_fails(ctx: GuestContext, iqn: str, settings: dict[str, str]) -> dict[str, Any]:
    """Try a login that must be refused; return iscsiadm's exit status and complaint."""
    initiator.set_node(ctx, iqn, str(PORTAL), settings)
    node = ["iscsiadm", "-m", "node", "-T", iqn, "-p", str(PORTAL)]
    proc = ctx.run([*node, "--login"], check=False, timeout=120)
    ctx.check(proc.returncode != 0, f"the login was refused (exit {proc.returncode})")
    ctx.check(initiator.session_dir(iqn) is None, "no session remains")
    return {"exit": proc.returncode, "message": " ".join((proc.stderr or proc.stdout).split())}


@scenario("lio_acl_chap", needs=("iscsid",), timeout_s=300)
def lio_acl_chap(ctx: GuestContext) -> dict[str, Any]:
    """ACL + CHAP via targetd_repl.lio: wrong secrets are refused, right ones log in and write."""
    WORKDIR.mkdir(parents=True, exist_ok=True)
    size = 16 * MiB
    backing = WORKDIR / "chap.img"
    me = _initiator_name()
    one_way = lio.Chap("labuser", "labpassword12")
    mutual = lio.Chap("labuser", "labpassword12", "labtarget", "targetsecret34")
    lun = lio.LunSpec("chap", size, kind=lio.BackstoreKind.FILEIO, path=str(backing), lun=0)

    def config(chap: lio.Chap) -> lio.LioConfig:
        return lio.LioConfig(
            site=SITE, luns=(lun,), portals=(PORTAL,), acls=(lio.AclSpec(me, chap),)
        )

    iqn = config(one_way).target_iqn
    with ctx.timed("lio_reconcile_first"):
        first = lio.reconcile(config(one_way))
    ctx.check(lio.reconcile(config(one_way)) == [], "a second reconcile changes nothing")
    acl = lio.read_state().targets[iqn].acls[me]
    ctx.check(acl.chap == one_way and dict(acl.mapped_luns) == {0: 0}, f"ACL as wanted: {acl}")
    ctx.check(iqn in initiator.discover(ctx, str(PORTAL)), "discovery offers the target")

    chap_node = {"node.session.auth.authmethod": "CHAP", "node.session.auth.username": "labuser"}
    refused_password = _login_fails(
        ctx, iqn, {**chap_node, "node.session.auth.password": "wrong-password"}
    )
    ctx.check(
        refused_password["exit"] == initiator.ISCSI_LOGIN_AUTH_FAILED,
        f"a wrong password fails authorization ({refused_password})",
    )
    with ctx.timed("iscsi_login_chap"):
        initiator.login(ctx, iqn, str(PORTAL), chap=("labuser", "labpassword12"))
        device = initiator.disk_for(ctx, iqn, lun=0)
    pattern = random.Random(7).randbytes(MiB)
    Path("/tmp/chap-pattern.bin").write_bytes(pattern)
    ctx.run(
        [
            *("dd", "if=/tmp/chap-pattern.bin", f"of={device}", "bs=1M", "oflag=direct"),
            *("conv=fsync", "status=none"),
        ]
    )
    initiator.logout(ctx, iqn, str(PORTAL))
    in_file = sha256(read_range(str(backing), 0, MiB))
    ctx.check(in_file == sha256(pattern), "the CHAP session's write is in the backing file")

    # Mutual CHAP: the target must prove itself too. Only the ACL's CHAP changes.
    with ctx.timed("lio_reconcile_mutual"):
        to_mutual = lio.reconcile(config(mutual))
    ctx.check(
        to_mutual == [f"set CHAP user 'labuser' for ACL {me} of {iqn}"],
        f"only the ACL's CHAP changed ({to_mutual})",
    )
    initiator.discover(ctx, str(PORTAL))
    mutual_node = {
        **chap_node,
        "node.session.auth.password": "labpassword12",
        "node.session.auth.username_in": "labtarget",
    }
    refused_target = _login_fails(
        ctx, iqn, {**mutual_node, "node.session.auth.password_in": "not-the-target"}
    )
    ctx.check(
        refused_target["exit"] == initiator.ISCSI_LOGIN_FAILED_NO_RETRY,
        f"the initiator refuses a target with the wrong secret ({refused_target})",
    )
    with ctx.timed("iscsi_login_mutual"):
        initiator.login(
            ctx,
            iqn,
            str(PORTAL),
            settings={**mutual_node, "node.session.auth.password_in": "targetsecret34"},
        )
        initiator.disk_for(ctx, iqn, lun=0)
    initiator.logout(ctx, iqn, str(PORTAL))

    teardown = lio.reconcile(lio.LioConfig(site=SITE, portals=(PORTAL,)))
    lio.remove_target(SITE)
    ctx.check(("fileio", "chap") not in lio.read_state().backstores, "teardown removed it")
    return {
        "initiator": me,
        "target_iqn": iqn,
        "reconcile_first": first,
        "reconcile_mutual": to_mutual,
        "refused_wrong_password": refused_password,
        "refused_wrong_target_secret": refused_target,
        "sha256_written": sha256(pattern),
        "sha256_backing": in_file,
        "teardown": teardown,
    }


def _dd_write(ctx: GuestContext, source: Path, device: str, seek_mib: int) -> int:
    return ctx.run(
        [
            *("dd", f"if={source}", f"of={device}", "bs=1M", f"seek={seek_mib}"),
            *("oflag=direct", "conv=fsync", "status=none"),
        ],
        check=False,
    ).returncode


@scenario("lio_alua_standby", needs=("iscsid",), timeout_s=300)
def lio_alua_standby(ctx: GuestContext) -> dict[str, Any]:
    """ALUA via targetd_repl.lio: standby refuses writes; back to active they pass, same session."""
    WORKDIR.mkdir(parents=True, exist_ok=True)
    backing = WORKDIR / "alua.img"
    lun = lio.LunSpec("alua", 16 * MiB, kind=lio.BackstoreKind.FILEIO, path=str(backing), lun=0)
    active = lio.AluaGroupSpec("site-lab", 16, lio.AluaState.ACTIVE_OPTIMIZED)
    standby = lio.AluaGroupSpec("site-lab", 16, lio.AluaState.STANDBY)

    def config(group: lio.AluaGroupSpec) -> lio.LioConfig:
        return lio.LioConfig(site=SITE, luns=(lun,), portals=(PORTAL,), demo_mode=True, alua=group)

    iqn = config(active).target_iqn
    lio.reconcile(config(active))
    initiator.discover(ctx, str(PORTAL))
    initiator.login(ctx, iqn, str(PORTAL))
    device = initiator.disk_for(ctx, iqn, lun=0)
    session = initiator.session_dir(iqn)
    dh_file = Path(f"/sys/block/{os.path.basename(device)}/device/dh_state")
    dh_state = dh_file.read_text().strip() if dh_file.exists() else None
    first, second = Path("/tmp/alua-a.bin"), Path("/tmp/alua-b.bin")
    first.write_bytes(random.Random(1).randbytes(MiB))
    second.write_bytes(random.Random(2).randbytes(MiB))
    ctx.check(_dd_write(ctx, first, device, 0) == 0, "active/optimized: the write passes")
    rtpg_active = ctx.run(["sg_rtpg", "-d", device]).stdout

    with ctx.timed("to_standby"):
        to_standby = lio.reconcile(config(standby))
    ctx.check(
        to_standby == ["ALUA group site-lab (id 16) on fileio/alua: standby"],
        f"only the group's state changed ({to_standby})",
    )
    # The first command after the change gets the UNIT ATTENTION "asymmetric access state
    # changed" (2A/06); REPORT TARGET PORT GROUPS is allowed in standby and tells the state.
    rtpg_tries = [ctx.run(["sg_rtpg", "-d", device], check=False) for _ in range(2)]
    ctx.check(rtpg_tries[0].returncode == 6, "the first command saw the UNIT ATTENTION")
    rtpg_standby = rtpg_tries[1].stdout
    ctx.check("(standby)" in rtpg_standby, "REPORT TARGET PORT GROUPS says standby")
    refused = _dd_write(ctx, second, device, 1)
    ctx.check(refused != 0, f"standby: the write fails (dd exit {refused})")
    ctx.check(read_range(str(backing), MiB, MiB) == bytes(MiB), "standby: nothing reached the file")

    with ctx.timed("to_active"):
        to_active = lio.reconcile(config(active))
        # what multipathd would do: make the ALUA device handler re-read the port state
        Path(f"/sys/block/{os.path.basename(device)}/device/rescan").write_text("1")
        deadline = time.monotonic() + 30
        while _dd_write(ctx, second, device, 1) != 0:
            ctx.check(time.monotonic() < deadline, "active again: the write passes within 30 s")
            time.sleep(1)
    ctx.check(initiator.session_dir(iqn) == session, "the same iSCSI session: no re-login")
    ctx.check(
        read_range(str(backing), 0, 2 * MiB) == first.read_bytes() + second.read_bytes(),
        "the backing file has both writes",
    )
    initiator.logout(ctx, iqn, str(PORTAL))
    lio.reconcile(lio.LioConfig(site=SITE, portals=(PORTAL,), demo_mode=True))
    lio.remove_target(SITE)
    return {
        "device": device,
        "dh_state": dh_state,
        "to_standby": to_standby,
        "to_active": to_active,
        "rtpg_active": rtpg_active,
        "rtpg_standby": rtpg_standby,
        "standby_write_exit": refused,
    }


def _make_foreign_fileio(ctx: GuestContext, name: str, path: str, size: int) -> None:
    """Create a fileio backstore the way another tool would: raw configfs, no mark of ours."""
    hba = Path("/sys/kernel/config/target/core/fileio_77")
    so = hba / name
    so.mkdir(parents=True)
    (so / "control").write_text(f"fd_dev_name={path},fd_dev_size={size}")
    (so / "udev_path").write_text(path)
    (so / "enable").write_text("1")
    (so / "wwn" / "vpd_unit_serial").write_text("00000000-1111-2222-3333-444444444444\n")
    ctx.log.info("created a foreign fileio backstore %s", so)


def _find_uio(volume: str) -> tuple[Any, lio.UioName]:
    context = pyudev.Context()
    for device in context.list_devices(subsystem="uio"):
        name = device.attributes.asstring("name")
        parsed = lio.parse_uio_name(name)
        if parsed is not None and parsed.volume == volume:
            return device, parsed
    raise AssertionError(f"no uio device names volume {volume!r}")


def _mailbox(ring: mmap.mmap) -> dict[str, int]:
    version, flags, cmdr_off, cmdr_size, cmd_head = MAILBOX.unpack_from(ring, 0)
    (cmd_tail,) = struct.unpack_from("<I", ring, MAILBOX_TAIL_OFFSET)
    return {
        "version": version,
        "flags": flags,
        "cmdr_off": cmdr_off,
        "cmdr_size": cmdr_size,
        "cmd_head": cmd_head,
        "cmd_tail": cmd_tail,
    }


def _entry(ring: mmap.mmap, cmdr_off: int, offset: int) -> dict[str, Any]:
    base = cmdr_off + offset
    len_op, cmd_id, kflags, uflags = ENTRY_HEADER.unpack_from(ring, base)
    op = len_op & TCMU_OP_MASK
    entry: dict[str, Any] = {
        "offset": offset,
        "op": TCMU_OP_NAMES.get(op, str(op)),
        "length": len_op & ~TCMU_OP_MASK,
        "cmd_id": cmd_id,
        "kflags": kflags,
        "uflags": uflags,
    }
    if op == 1:
        iov_cnt, iov_bidi_cnt, iov_dif_cnt = ENTRY_REQ.unpack_from(ring, base + 8)
        (cdb_off,) = ENTRY_CDB_OFF.unpack_from(ring, base + 24)
        entry.update(
            iov_cnt=iov_cnt,
            iov_bidi_cnt=iov_bidi_cnt,
            iov_dif_cnt=iov_dif_cnt,
            cdb_off=cdb_off,
            cdb_opcode=ring[cdb_off],
            cdb_hex=bytes(ring[cdb_off : cdb_off + 16]).hex(),
        )
    return entry


@scenario("tcmu_ring_probe", needs=("iscsid",), timeout_s=300)
def tcmu_ring_probe(ctx: GuestContext) -> dict[str, Any]:
    """user: backstore via lio; its uio ring mmapped; a login's first command seen on the ring."""
    volume = "probe1"
    size = 32 * MiB
    wanted = lio.LioConfig(
        site=SITE,
        luns=(lio.LunSpec(volume, size, lun=0, hw_max_sectors=2048, cmd_time_out=3),),
        portals=(PORTAL,),
        demo_mode=True,
        alua=lio.AluaGroupSpec("site-lab", 16, lio.AluaState.ACTIVE_OPTIMIZED),
    )
    iqn = wanted.target_iqn
    with ctx.timed("lio_reconcile"):
        changes = lio.reconcile(wanted)
    ctx.check(f"create user backstore {volume!r}" in changes, f"reconcile built it: {changes}")
    ctx.check(lio.reconcile(wanted) == [], "a second reconcile changes nothing")
    observed = lio.read_state().backstores[("user", volume)]
    ctx.check(observed.config == f"targetd/{volume}", f"config is targetd/{volume}")
    ctx.check(observed.hw_max_sectors == 2048, "hw_max_sectors=2048 reached the kernel")
    ctx.check(
        observed.alua_groups.get("site-lab") == (16, 0), "ALUA group site-lab, active/optimized"
    )

    with ctx.timed("uio_discovery"):
        device, parsed = _find_uio(volume)
    uio_name = device.attributes.asstring("name")
    map_size = int(Path(device.sys_path, "maps", "map0", "size").read_text().strip(), 16)
    node = device.device_node or f"/dev/{device.sys_name}"
    ctx.check(parsed.subtype == "targetd" and parsed.storage_object == volume, f"{uio_name}")
    fd = os.open(node, os.O_RDWR | os.O_CLOEXEC)
    ctx.cleanups.callback(os.close, fd)
    ring = mmap.mmap(fd, map_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    ctx.cleanups.callback(ring.close)
    before = _mailbox(ring)
    ctx.log.info("mailbox before login: %s", before)
    ctx.check(before["version"] == 2, f"mailbox version 2 (got {before['version']})")
    ctx.check(before["cmdr_off"] == 128, f"cmdr_off 128 (got {before['cmdr_off']})")
    ctx.check(before["cmdr_size"] > 0, "cmdr_size > 0")
    ctx.check(before["cmd_head"] == before["cmd_tail"], "the ring starts empty")
    ctx.check(map_size > before["cmdr_off"] + before["cmdr_size"], "a data area follows the ring")

    # The initiator's first command reaches the ring; nobody serves it (cmd_time_out=3 fails
    # it in the kernel, so the scan gives up and the LUN can be removed).
    with ctx.timed("iscsi_login"):
        initiator.discover(ctx, str(PORTAL))
        initiator.login(ctx, iqn, str(PORTAL))
    deadline = time.monotonic() + 30
    after = _mailbox(ring)
    while after["cmd_head"] == before["cmd_head"] and time.monotonic() < deadline:
        time.sleep(0.1)
        after = _mailbox(ring)
    ctx.log.info("mailbox after login: %s", after)
    ctx.check(after["cmd_head"] != before["cmd_head"], "cmd_head advanced: a command arrived")
    ctx.check(after["cmd_tail"] == before["cmd_tail"], "cmd_tail did not move: nobody served it")
    first = _entry(ring, after["cmdr_off"], before["cmd_tail"])
    ctx.log.info("first ring entry: %s", first)
    ctx.check(first["op"] == "CMD", f"the first entry is a command ({first})")
    with ctx.timed("iscsi_logout"):
        initiator.logout(ctx, iqn, str(PORTAL))

    with ctx.timed("lio_teardown"):
        teardown = lio.reconcile(lio.LioConfig(site=SITE, portals=(PORTAL,), demo_mode=True))
        lio.remove_target(SITE)
    ctx.check(("user", volume) not in lio.read_state().backstores, "the user backstore is gone")
    ctx.check(not Path(device.sys_path).exists(), f"{node} is gone with it")
    return {
        "uio_device": node,
        "uio_name": uio_name,
        "map_size": map_size,
        "data_area_offset": before["cmdr_off"] + before["cmdr_size"],
        "mailbox": before,
        "mailbox_after_login": after,
        "first_entry": first,
        "changes": changes,
        "teardown": teardown,
    }
