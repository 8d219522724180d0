"""The pure half of LIO reconcile: wanted config vs observed state -> actions (no rtslib)."""

from __future__ import annotations

import pytest

from targetd_repl.errors import FailedPrecondition, InvalidArgument, LioError
from targetd_repl.lio import (
    AclSpec,
    AluaGroupSpec,
    AluaState,
    BackstoreKind,
    Chap,
    LioConfig,
    LioConflict,
    LunSpec,
    Portal,
    parse_uio_name,
    site_iqn,
    user_config,
)
from targetd_repl.lio.plan import (
    CreateAcl,
    CreateBackstore,
    CreateLun,
    CreatePortal,
    CreateTarget,
    CreateTpg,
    EnableTpg,
    EnsureAluaGroup,
    LioState,
    MapLun,
    ObservedAcl,
    ObservedBackstore,
    ObservedLun,
    ObservedTarget,
    RemoveAcl,
    RemoveBackstore,
    RemoveLun,
    RemovePortal,
    RemoveTarget,
    SetAclChap,
    SetLunAluaGroup,
    SetTpgAttribute,
    UnmapLun,
    assign_luns,
    plan,
)

MiB = 1 << 20
SITE = "site-a"
IQN = site_iqn(SITE)
DEMO_ATTRS = {
    "generate_node_acls": "1",
    "cache_dynamic_acls": "1",
    "authentication": "0",
    "demo_mode_write_protect": "0",
}


def demo(*luns: LunSpec, alua: AluaGroupSpec | None = None) -> LioConfig:
    return LioConfig(site=SITE, luns=luns, demo_mode=True, alua=alua)


def user_bs(name: str, size: int = 64 * MiB, **kw: object) -> ObservedBackstore:
    return ObservedBackstore(
        "user",
        name,
        size,
        config=user_config(name),
        block_size=512,
        **kw,  # type: ignore[arg-type]
    )


def converged_state(wanted: LioConfig) -> LioState:
    """What configfs holds after a successful reconcile of `wanted` (built by hand)."""
    backstores = {}
    luns = {}
    numbers = assign_luns(wanted, None)
    for spec in wanted.luns:
        groups = {}
        if wanted.alua is not None:
            groups = {wanted.alua.name: (wanted.alua.group_id, int(wanted.alua.state))}
        bs = ObservedBackstore(
            str(spec.kind),
            spec.volume,
            spec.size_bytes,
            config=spec.config,
            path=spec.path,
            block_size=spec.block_size,
            hw_max_sectors=spec.hw_max_sectors,
            wwn="targetd-1234",
            alua_groups=groups,
        )
        backstores[bs.key] = bs
        number = numbers[spec.volume]
        group = wanted.alua.name if wanted.alua else "default_tg_pt_gp"
        luns[number] = ObservedLun(number, str(spec.kind), spec.volume, group)
    acls = {
        acl.initiator_iqn: ObservedAcl(acl.initiator_iqn, acl.chap, {n: n for n in luns})
        for acl in wanted.acls
    }
    target = ObservedTarget(
        iqn=wanted.target_iqn,
        enabled=True,
        attributes=wanted.tpg_attributes(),
        portals=frozenset(wanted.portals),
        luns=luns,
        acls=acls,
    )
    return LioState(backstores=backstores, targets={target.iqn: target})


def test_empty_state_builds_everything_in_a_safe_order() -> None:
    spec = LunSpec("db1", 64 * MiB, hw_max_sectors=2048)
    actions = plan(demo(spec), LioState())
    assert actions == [
        CreateBackstore(spec),
        CreateTarget(IQN),
        CreateTpg(IQN),
        *(SetTpgAttribute(IQN, name, value) for name, value in DEMO_ATTRS.items()),
        CreateLun(IQN, 0, "user", "db1"),
        CreatePortal(IQN, Portal("127.0.0.1", 3260)),
        EnableTpg(IQN),
    ]
    assert actions[0].describe() == "create user backstore 'db1'"


@pytest.mark.parametrize(
    "wanted",
    [
        demo(LunSpec("db1", 64 * MiB), LunSpec("db2", 8 * MiB, block_size=4096, lun=5)),
        demo(LunSpec("db1", 64 * MiB), alua=AluaGroupSpec("site-a", 16, AluaState.STANDBY)),
        LioConfig(
            site=SITE,
            luns=(LunSpec("f1", 8 * MiB, kind=BackstoreKind.FILEIO, path="/srv/f1.img"),),
            acls=(
                AclSpec("iqn.2025-01.io.test:host1", Chap("user1", "pass1234567", "tgt", "pw2")),
                AclSpec("iqn.2025-01.io.test:host2", Chap("user2", "pass7654321")),
            ),
            portals=(Portal("127.0.0.1", 3260), Portal("10.0.0.1", 3261)),
        ),
    ],
)
def test_converged_state_needs_nothing(wanted: LioConfig) -> None:
    assert plan(wanted, converged_state(wanted)) == []


def test_disabled_tpg_is_enabled() -> None:
    wanted = demo(LunSpec("db1", 64 * MiB))
    state = converged_state(wanted)
    target = state.targets[IQN]
    off = ObservedTarget(
        target.iqn, True, False, target.attributes, target.portals, target.luns, target.acls
    )
    assert plan(wanted, LioState(state.backstores, {IQN: off})) == [EnableTpg(IQN)]


def test_missing_portal_is_the_only_change() -> None:
    wanted = demo(LunSpec("db1", 64 * MiB))
    state = converged_state(wanted)
    target = state.targets[IQN]
    no_portal = ObservedTarget(
        target.iqn, True, True, target.attributes, frozenset(), target.luns, target.acls
    )
    actions = plan(wanted, LioState(state.backstores, {IQN: no_portal}))
    assert actions == [CreatePortal(IQN, Portal())]
    assert actions[0].describe() == f"create portal 127.0.0.1:3260 on {IQN}"


def test_extra_portal_is_removed() -> None:
    wanted = demo(LunSpec("db1", 64 * MiB))
    state = converged_state(wanted)
    target = state.targets[IQN]
    extra = frozenset({Portal(), Portal("0.0.0.0", 3260)})
    more = ObservedTarget(target.iqn, True, True, target.attributes, extra, target.luns, {})
    assert plan(wanted, LioState(state.backstores, {IQN: more})) == [
        RemovePortal(IQN, Portal("0.0.0.0", 3260))
    ]


def test_stale_objects_of_ours_go_foreign_ones_stay() -> None:
    wanted = demo(LunSpec("db1", 64 * MiB))
    state = converged_state(wanted)
    target = state.targets[IQN]
    luns = {**target.luns, 3: ObservedLun(3, "user", "old")}
    backstores = {
        **state.backstores,
        ("user", "old"): user_bs("old"),  # ours (config targetd/old), no longer wanted
        ("user", "rbd1"): ObservedBackstore("user", "rbd1", MiB, config="rbd/pool/img"),
        ("fileio", "theirs"): ObservedBackstore("fileio", "theirs", MiB, path="/x", wwn="abc"),
        ("fileio", "mine"): ObservedBackstore("fileio", "mine", MiB, path="/y", wwn="targetd-1"),
    }
    foreign_target = ObservedTarget("iqn.2003-01.org.linux-iscsi.host:sn.1234")
    our_old_site = ObservedTarget(site_iqn("old-site"))
    targets = {
        IQN: ObservedTarget(IQN, True, True, target.attributes, target.portals, luns, target.acls),
        foreign_target.iqn: foreign_target,
        our_old_site.iqn: our_old_site,
    }
    actions = plan(wanted, LioState(backstores, targets))
    assert actions == [
        RemoveLun(IQN, 3),
        RemoveTarget(our_old_site.iqn),
        RemoveBackstore("fileio", "mine"),
        RemoveBackstore("user", "old"),
    ]


def test_fileio_exported_by_our_target_is_ours() -> None:
    wanted = demo()
    luns = {0: ObservedLun(0, "fileio", "cmp")}
    target = ObservedTarget(IQN, True, True, DEMO_ATTRS, frozenset({Portal()}), luns)
    backstores = {("fileio", "cmp"): ObservedBackstore("fileio", "cmp", MiB, path="/c", wwn="x")}
    assert plan(wanted, LioState(backstores, {IQN: target})) == [
        RemoveLun(IQN, 0),
        RemoveBackstore("fileio", "cmp"),
    ]


def test_size_change_replaces_lun_and_backstore() -> None:
    old = demo(LunSpec("db1", 64 * MiB))
    new_spec = LunSpec("db1", 128 * MiB)
    actions = plan(demo(new_spec), converged_state(old))
    assert actions == [
        RemoveLun(IQN, 0),
        RemoveBackstore("user", "db1"),
        CreateBackstore(new_spec),
        CreateLun(IQN, 0, "user", "db1"),
    ]


def test_foreign_backstore_with_our_name_is_a_conflict() -> None:
    state = LioState(
        backstores={("user", "db1"): ObservedBackstore("user", "db1", MiB, config="rbd/p/db1")}
    )
    with pytest.raises(LioConflict, match=r"LIO: cannot create user backstore 'db1'") as info:
        plan(demo(LunSpec("db1", 64 * MiB)), state)
    assert isinstance(info.value, LioError)
    assert isinstance(info.value, FailedPrecondition)


def test_foreign_fileio_on_the_same_file_is_adopted() -> None:
    spec = LunSpec("f1", 8 * MiB, kind=BackstoreKind.FILEIO, path="/srv/f1.img")
    bs = ObservedBackstore("fileio", "f1", 8 * MiB, path="/srv/f1.img", block_size=512, wwn="x")
    actions = plan(demo(spec), LioState(backstores={bs.key: bs}))
    assert CreateBackstore(spec) not in actions
    assert CreateLun(IQN, 0, "fileio", "f1") in actions


def test_lun_numbers_are_stable_and_fixed_ones_win() -> None:
    current = ObservedTarget(
        IQN,
        luns={
            0: ObservedLun(0, "user", "b"),
            1: ObservedLun(1, "user", "a"),
        },
    )
    wanted = demo(LunSpec("a", MiB), LunSpec("b", MiB), LunSpec("c", MiB), LunSpec("d", MiB, lun=2))
    assert assign_luns(wanted, current) == {"a": 1, "b": 0, "c": 3, "d": 2}
    assert assign_luns(wanted, None) == {"d": 2, "a": 0, "b": 1, "c": 3}


def test_acls_chap_and_mappings() -> None:
    host1 = "iqn.2025-01.io.test:host1"
    host2 = "iqn.2025-01.io.test:host2"
    chap1 = Chap("user1", "pass1234567")
    wanted = LioConfig(site=SITE, luns=(LunSpec("db1", MiB, lun=0),), acls=(AclSpec(host1, chap1),))
    state = converged_state(wanted)
    target = state.targets[IQN]
    acls = {
        host1: ObservedAcl(host1, Chap("user1", "old-password"), {0: 0, 7: 0}),
        host2: ObservedAcl(host2, None, {0: 0}),
    }
    changed = ObservedTarget(IQN, True, True, target.attributes, target.portals, target.luns, acls)
    actions = plan(wanted, LioState(state.backstores, {IQN: changed}))
    assert actions == [
        UnmapLun(IQN, host1, 7),
        RemoveAcl(IQN, host2),
        SetAclChap(IQN, host1, chap1),
    ]
    fresh = plan(wanted, LioState())
    assert CreateAcl(IQN, AclSpec(host1, chap1)) in fresh
    assert SetAclChap(IQN, host1, chap1) in fresh
    assert MapLun(IQN, host1, 0) in fresh
    assert SetTpgAttribute(IQN, "authentication", "1") in fresh
    assert fresh.index(CreateLun(IQN, 0, "user", "db1")) < fresh.index(MapLun(IQN, host1, 0))
    assert "pass1234567" not in repr(fresh)  # passwords stay out of logs and reprs


def test_alua_state_change_touches_only_the_group() -> None:
    active = AluaGroupSpec("site-a", 16, AluaState.ACTIVE_OPTIMIZED)
    standby = AluaGroupSpec("site-a", 16, AluaState.STANDBY)
    state = converged_state(demo(LunSpec("db1", MiB), alua=active))
    actions = plan(demo(LunSpec("db1", MiB), alua=standby), state)
    assert actions == [EnsureAluaGroup("user", "db1", standby)]
    assert actions[0].describe() == "ALUA group site-a (id 16) on user/db1: standby"


def test_alua_group_for_new_lun() -> None:
    group = AluaGroupSpec("site-a", 16)
    actions = plan(demo(LunSpec("db1", MiB), alua=group), LioState())
    lun = actions.index(CreateLun(IQN, 0, "user", "db1"))
    assert actions.index(EnsureAluaGroup("user", "db1", group)) > lun
    assert actions.index(SetLunAluaGroup(IQN, 0, "site-a")) > lun
    assert actions[-1] == EnableTpg(IQN)


def test_naming_rules() -> None:
    assert site_iqn("Site_A") == "iqn.2025-01.io.github.targetd-repl:site-a"
    assert user_config("db1") == "targetd/db1"
    parsed = parse_uio_name("tcm-user/3/db1/targetd/db1")
    assert parsed is not None
    assert (parsed.hba, parsed.storage_object, parsed.volume) == (3, "db1", "db1")
    other = parse_uio_name("tcm-user/0/x/rbd/pool/image")
    assert other is not None and other.volume is None and other.config == "pool/image"
    assert parse_uio_name("uio_pci_generic") is None
    assert parse_uio_name("tcm-user/x/y") is None
    with pytest.raises(InvalidArgument):
        site_iqn("bad name")


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: LunSpec("db1", 1000), "multiple of the block size"),
        (lambda: LunSpec("db1", MiB, block_size=1024), "block size"),
        (lambda: LunSpec("db1", MiB, kind=BackstoreKind.FILEIO), "needs a path"),
        (lambda: LunSpec("db1", MiB, path="/x"), "takes no path"),
        (lambda: LunSpec("db1", MiB, lun=70000), "out of 0-65535"),
        (lambda: LunSpec("db 1", MiB), "invalid volume name"),
        (lambda: Chap("user", ""), "CHAP password"),
        (lambda: Chap("user", "pw", mutual_userid="t"), "both a userid and a password"),
        (lambda: AclSpec("IQN.Upper"), "initiator IQN"),
        (lambda: AluaGroupSpec("default_tg_pt_gp", 1), "belongs to the kernel"),
        (
            lambda: LioConfig(site=SITE, demo_mode=True, acls=(AclSpec("iqn.2025-01.io.t:h"),)),
            "demo mode takes no ACLs",
        ),
        (
            lambda: LioConfig(
                site=SITE,
                acls=(AclSpec("iqn.2025-01.io.t:a", Chap("u", "p")), AclSpec("iqn.2025-01.io.t:b")),
            ),
            "every ACL uses CHAP or none",
        ),
        (
            lambda: LioConfig(site=SITE, luns=(LunSpec("a", MiB, lun=1), LunSpec("b", MiB, lun=1))),
            "same LUN",
        ),
    ],
)
def test_bad_descriptions_are_refused(build: object, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        build()  # type: ignore[operator]
