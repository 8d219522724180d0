"""The only module that imports rtslib_fb: reads configfs into a `LioState` and applies actions.

Every rtslib call runs under one process-wide lock (rtslib has races: backstore index
allocation, lookups racing deletions) and inside `_rtslib_errors`, which turns RTSLibError and
the plain OSError/FileNotFoundError rtslib lets through (configfs absent, module not loaded) into
`LioError("LIO: cannot <what> '<name>': <reason>")`. After a change the whole configuration is
saved (`RTSRoot().save_to_file()`, /etc/target/saveconfig.json), as targetcli would.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import rtslib_fb
from rtslib_fb import (
    LUN,
    TPG,
    ALUATargetPortGroup,
    FabricModule,
    FileIOStorageObject,
    MappedLUN,
    NetworkPortal,
    NodeACL,
    RTSLibError,
    RTSLibNotInCFSError,
    RTSRoot,
    Target,
    UserBackedStorageObject,
)

from targetd_repl.errors import LioError
from targetd_repl.lio.config import (
    TPG_TAG,
    AclSpec,
    AluaGroupSpec,
    AluaState,
    BackstoreKind,
    Chap,
    LioConfig,
    LunSpec,
    Portal,
    new_wwn,
    site_iqn,
)
from targetd_repl.lio.plan import (
    Action,
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
    backstore_matches,
    plan,
)

log = logging.getLogger(__name__)

CONFIGFS = Path("/sys/kernel/config")
SAVE_FILE = Path("/etc/target/saveconfig.json")
OBSERVED_TPG_ATTRIBUTES = (
    "generate_node_acls",
    "cache_dynamic_acls",
    "authentication",
    "demo_mode_write_protect",
)
_LOCK = threading.RLock()
_SO_CLASSES: dict[str, Any] = {
    BackstoreKind.USER: UserBackedStorageObject,
    BackstoreKind.FILEIO: FileIOStorageObject,
}


# --- errors ------------------------------------------------------------------------------------


def _is_mounted(path: Path) -> bool:
    return os.path.ismount(path)


def _configfs_problem() -> str | None:
    """Why LIO cannot be configured here, or None when configfs and target_core_mod are there."""
    if not (CONFIGFS / "target").is_dir():
        if not _is_mounted(CONFIGFS):
            return f"configfs not mounted at {CONFIGFS}"
        return f"target_core_mod not loaded (no {CONFIGFS / 'target'})"
    return None


def _reason(exc: BaseException) -> str:
    problem = _configfs_problem()
    if problem is not None:
        return problem
    if isinstance(exc, OSError) and exc.strerror:
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{exc.strerror}{where}"
    return str(exc) or type(exc).__name__


@contextlib.contextmanager
def _rtslib_errors(what: str) -> Iterator[None]:
    """Run rtslib calls for `what` ("create user backstore 'db1'"), mapping their errors."""
    problem = _configfs_problem()
    if problem is not None:
        raise LioError(f"LIO: cannot {what}: {problem}")
    # rtslib caches backstore indexes process-wide; another tool may have changed configfs.
    rtslib_fb.tcm.bs_cache.clear()
    try:
        yield
    except LioError:
        raise
    except (RTSLibError, OSError, RuntimeError, ValueError, KeyError) as exc:
        raise LioError(f"LIO: cannot {what}: {_reason(exc)}") from exc


# --- lookups -----------------------------------------------------------------------------------


def _root() -> Any:
    return RTSRoot()


def _iscsi() -> Any:
    return FabricModule("iscsi")


def _find_so(plugin: str, name: str) -> Any | None:
    cls = _SO_CLASSES.get(plugin)
    if cls is not None:
        try:
            return cls(name)
        except RTSLibNotInCFSError:
            return None
    for so in _root().storage_objects:
        if so.plugin == plugin and so.name == name:
            return so
    return None


def _target(iqn: str) -> Any:
    return Target(_iscsi(), iqn, mode="lookup")


def _tpg(iqn: str) -> Any:
    return TPG(_target(iqn), TPG_TAG, mode="lookup")


def _find_tpg(iqn: str) -> Any | None:
    try:
        return _tpg(iqn)
    except RTSLibNotInCFSError:
        return None


# --- reading configfs --------------------------------------------------------------------------


def _int_or_none(getter: Any) -> int | None:
    try:
        return int(getter())
    except (RTSLibError, OSError, TypeError, ValueError):
        return None


def _observe_backstore(so: Any) -> ObservedBackstore:
    plugin = str(so.plugin)
    size = _int_or_none(lambda: so.size) or 0
    config = so.config if plugin == BackstoreKind.USER else None
    path = so.udev_path if plugin == BackstoreKind.FILEIO else None
    hw_max = _int_or_none(lambda: so.hw_max_sectors) if plugin == BackstoreKind.USER else None
    block_attribute = "hw_block_size" if plugin == BackstoreKind.USER else "block_size"
    block_size = _int_or_none(lambda: so.get_attribute(block_attribute))
    wwn = None
    with contextlib.suppress(RTSLibError, OSError):
        wwn = str(so.wwn)
    groups: dict[str, tuple[int, int]] = {}
    with contextlib.suppress(RTSLibError, OSError):
        for group in so.alua_tpgs:
            if group.name != "default_tg_pt_gp":
                groups[group.name] = (int(group.tg_pt_gp_id), int(group.alua_access_state))
    return ObservedBackstore(
        plugin=plugin,
        name=str(so.name),
        size_bytes=size,
        config=config,
        path=path,
        block_size=block_size,
        hw_max_sectors=hw_max,
        wwn=wwn,
        alua_groups=groups,
    )


def _observe_chap(acl: Any) -> Chap | None:
    userid = acl.chap_userid or ""
    password = acl.chap_password or ""
    if not userid or not password:
        return None
    mutual_userid = acl.chap_mutual_userid or None
    mutual_password = acl.chap_mutual_password or None
    if mutual_userid is None or mutual_password is None:
        mutual_userid = mutual_password = None
    return Chap(userid, password, mutual_userid, mutual_password)


def _observe_target(target: Any) -> ObservedTarget:
    tpg = None
    for candidate in target.tpgs:
        if candidate.tag == TPG_TAG:
            tpg = candidate
    if tpg is None:
        return ObservedTarget(iqn=str(target.wwn), has_tpg=False)
    attributes: dict[str, str] = {}
    for name in OBSERVED_TPG_ATTRIBUTES:
        with contextlib.suppress(RTSLibError, OSError):
            attributes[name] = str(tpg.get_attribute(name)).strip()
    luns: dict[int, ObservedLun] = {}
    for lun in tpg.luns:
        try:
            so = lun.storage_object
            plugin, so_name = str(so.plugin), str(so.name)
        except (RTSLibError, OSError):
            plugin, so_name = "?", "?"  # a broken link: stale by definition
        group = None
        with contextlib.suppress(RTSLibError, OSError):
            group = lun.alua_tg_pt_gp_name
        luns[int(lun.lun)] = ObservedLun(int(lun.lun), plugin, so_name, group)
    acls: dict[str, ObservedAcl] = {}
    for acl in tpg.node_acls:
        mapped: dict[int, int] = {}
        for mlun in acl.mapped_luns:
            try:
                mapped[int(mlun.mapped_lun)] = int(mlun.tpg_lun.lun)
            except (RTSLibError, OSError):
                mapped[int(mlun.mapped_lun)] = -1
        acls[str(acl.node_wwn)] = ObservedAcl(str(acl.node_wwn), _observe_chap(acl), mapped)
    return ObservedTarget(
        iqn=str(target.wwn),
        has_tpg=True,
        enabled=bool(tpg.enable),
        attributes=attributes,
        portals=frozenset(Portal(str(np.ip_address), int(np.port)) for np in tpg.network_portals),
        luns=luns,
        acls=acls,
    )


def read_state() -> LioState:
    """What configfs holds now: every storage object, and every iSCSI target."""
    with _LOCK, _rtslib_errors("read the LIO configuration"):
        root = _root()
        backstores = {}
        for so in root.storage_objects:
            observed = _observe_backstore(so)
            backstores[observed.key] = observed
        fabric = _iscsi()
        targets = {}
        if fabric.exists:
            for target in fabric.targets:
                observed_target = _observe_target(target)
                targets[observed_target.iqn] = observed_target
        return LioState(backstores=backstores, targets=targets)


# --- applying actions --------------------------------------------------------------------------


def _user_control(spec: LunSpec) -> str | None:
    return None if spec.block_size == 512 else f"hw_block_size={spec.block_size}"


def _create_backstore(spec: LunSpec) -> None:
    if spec.kind is BackstoreKind.USER:
        so = UserBackedStorageObject(
            spec.storage_object,
            config=spec.config,
            size=spec.size_bytes,
            hw_max_sectors=spec.hw_max_sectors,
            control=_user_control(spec),
            wwn=new_wwn(),
        )
        if spec.cmd_time_out is not None:  # only settable before the first export
            so.set_attribute("cmd_time_out", spec.cmd_time_out)
        return
    assert spec.path is not None  # LunSpec checks it
    path = Path(spec.path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("xb") as backing:
            backing.truncate(spec.size_bytes)
    so = FileIOStorageObject(  # a distinct rtslib class: same name, other type
        spec.storage_object,
        dev=str(path),
        size=spec.size_bytes,
        write_back=spec.write_back,
        wwn=new_wwn(),
    )
    if spec.block_size != 512:
        try:
            so.set_attribute("block_size", spec.block_size)
        except RTSLibError:
            so.delete()
            raise


def _set_chap(acl: Any, chap: Chap | None) -> None:
    acl.chap_userid = chap.userid if chap else ""
    acl.chap_password = chap.password if chap else ""
    mutual = chap is not None and chap.mutual_userid is not None
    acl.chap_mutual_userid = chap.mutual_userid if mutual and chap else ""
    acl.chap_mutual_password = chap.mutual_password if mutual and chap else ""


def _ensure_alua_group(plugin: str, name: str, group: AluaGroupSpec) -> None:
    so = _find_so(plugin, name)
    if so is None:
        raise RTSLibNotInCFSError(f"no {plugin} backstore {name!r}")
    if not so.alua_supported:
        raise RTSLibError(f"{plugin} backstore {name!r} does not support ALUA (alua_support=0)")
    try:
        tg = ALUATargetPortGroup(so, group.name)
    except RTSLibNotInCFSError:
        tg = ALUATargetPortGroup(so, group.name, group.group_id)
        tg.alua_access_type = 1  # implicit: the controller moves the state, not the initiators
    if int(tg.tg_pt_gp_id) != group.group_id:
        raise RTSLibError(f"ALUA group {group.name} has id {tg.tg_pt_gp_id}, not {group.group_id}")
    if int(tg.alua_access_state) != int(group.state):
        tg.alua_access_state = int(group.state)


def _apply(action: Action) -> None:
    match action:
        case CreateBackstore(spec=spec):
            _create_backstore(spec)
        case RemoveBackstore(plugin=plugin, name=name):
            so = _find_so(plugin, name)
            if so is not None:
                so.delete()
        case CreateTarget(target=iqn):
            Target(_iscsi(), iqn, mode="any")
        case RemoveTarget(target=iqn):
            with contextlib.suppress(RTSLibNotInCFSError):
                _target(iqn).delete()
        case CreateTpg(target=iqn):
            TPG(_target(iqn), TPG_TAG, mode="any")
        case SetTpgAttribute(target=iqn, name=name, value=value):
            _tpg(iqn).set_attribute(name, value)
        case EnableTpg(target=iqn):
            _tpg(iqn).enable = True
        case CreatePortal(target=iqn, portal=portal):
            NetworkPortal(_tpg(iqn), portal.ip, portal.port, mode="any")
        case RemovePortal(target=iqn, portal=portal):
            with contextlib.suppress(RTSLibNotInCFSError):
                NetworkPortal(_tpg(iqn), portal.ip, portal.port, mode="lookup").delete()
        case CreateLun(target=iqn, lun=number, plugin=plugin, storage_object=name):
            so = _find_so(plugin, name)
            if so is None:
                raise RTSLibNotInCFSError(f"no {plugin} backstore {name!r} to export")
            LUN(_tpg(iqn), number, storage_object=so)
        case RemoveLun(target=iqn, lun=number):
            with contextlib.suppress(RTSLibNotInCFSError):
                LUN(_tpg(iqn), number).delete()
        case EnsureAluaGroup(plugin=plugin, storage_object=name, group=group):
            _ensure_alua_group(plugin, name, group)
        case SetLunAluaGroup(target=iqn, lun=number, group=group_name):
            lun = LUN(_tpg(iqn), number)
            rtslib_fb.utils.fwrite(f"{lun.path}/alua_tg_pt_gp", group_name)
            if lun.alua_tg_pt_gp_name != group_name:
                raise RTSLibError(f"LUN {number} stayed in {lun.alua_tg_pt_gp_name}")
        case CreateAcl(target=iqn, acl=acl):
            NodeACL(_tpg(iqn), acl.initiator_iqn, mode="any")
        case RemoveAcl(target=iqn, initiator=initiator):
            with contextlib.suppress(RTSLibNotInCFSError):
                NodeACL(_tpg(iqn), initiator, mode="lookup").delete()
        case SetAclChap(target=iqn, initiator=initiator, chap=chap):
            _set_chap(NodeACL(_tpg(iqn), initiator, mode="lookup"), chap)
        case MapLun(target=iqn, initiator=initiator, lun=number):
            acl = NodeACL(_tpg(iqn), initiator, mode="lookup")
            MappedLUN(acl, number, tpg_lun=number, write_protect=False)
        case UnmapLun(target=iqn, initiator=initiator, mapped_lun=number):
            acl = NodeACL(_tpg(iqn), initiator, mode="lookup")
            with contextlib.suppress(RTSLibNotInCFSError):
                MappedLUN(acl, number).delete()
        case _:  # pragma: no cover - the Action union is closed
            raise AssertionError(f"unknown LIO action {action!r}")


def apply(actions: list[Action], *, save: bool = True) -> list[str]:
    """Apply actions in order (each under the lock, errors naming the object); save if any."""
    done: list[str] = []
    with _LOCK:
        try:
            for action in actions:
                what = action.describe()
                with _rtslib_errors(what):
                    _apply(action)
                log.info("LIO: %s", what)
                done.append(what)
        finally:
            if done and save:
                save_config()
    return done


def save_config(path: Path | None = None) -> None:
    """Save the whole LIO configuration (what targetcli saveconfig writes)."""
    target = path or SAVE_FILE
    with _LOCK, _rtslib_errors(f"save the configuration to {target}"):
        target.parent.mkdir(parents=True, exist_ok=True)
        _root().save_to_file(str(target))


def reconcile(wanted: LioConfig, *, save: bool = True) -> list[str]:
    """Make configfs hold `wanted`: create what is missing, replace what differs, remove what is
    ours and stale, leave foreign objects alone. Returns the changes made (empty: converged)."""
    with _LOCK:
        return apply(plan(wanted, read_state()), save=save)


# --- one object at a time ----------------------------------------------------------------------


def _ensure_backstore(spec: LunSpec, *, save: bool) -> bool:
    action = CreateBackstore(spec)
    with _LOCK:
        with _rtslib_errors(action.describe()):
            so = _find_so(str(spec.kind), spec.storage_object)
            existing = None if so is None else _observe_backstore(so)
        if existing is not None:
            if backstore_matches(spec, existing):
                return False
            raise LioError(
                f"LIO: cannot {action.describe()}: it exists with other settings "
                f"(size {existing.size_bytes}, config {existing.config or existing.path!r})"
            )
        apply([action], save=save)
        return True


def ensure_user_backstore(
    volume: str,
    size_bytes: int,
    *,
    block_size: int = 512,
    hw_max_sectors: int | None = None,
    cmd_time_out: int | None = None,
    save: bool = True,
) -> bool:
    """A TCMU backstore named after the volume, config `targetd/<volume>`. True if created."""
    spec = LunSpec(
        volume,
        size_bytes,
        block_size,
        BackstoreKind.USER,
        hw_max_sectors=hw_max_sectors,
        cmd_time_out=cmd_time_out,
    )
    return _ensure_backstore(spec, save=save)


def ensure_fileio_backstore(
    volume: str,
    path: str,
    size_bytes: int,
    *,
    block_size: int = 512,
    write_back: bool = False,
    save: bool = True,
) -> bool:
    """A kernel fileio backstore on `path` (created sparse when missing). True if created."""
    spec = LunSpec(
        volume, size_bytes, block_size, BackstoreKind.FILEIO, path=path, write_back=write_back
    )
    return _ensure_backstore(spec, save=save)


def remove_backstore(kind: BackstoreKind, volume: str, *, save: bool = True) -> bool:
    """Remove a backstore and every LUN exporting it. True if it existed."""
    action = RemoveBackstore(str(kind), volume)
    with _LOCK:
        with _rtslib_errors(action.describe()):
            present = _find_so(str(kind), volume) is not None
        return bool(present and apply([action], save=save))


def ensure_target(site: str, *, save: bool = True) -> bool:
    """The site's iSCSI target with its TPG. True if anything was created."""
    iqn = site_iqn(site)
    with _LOCK:
        with _rtslib_errors(f"look up target {iqn}"):
            exists = _iscsi().exists and any(t.wwn == iqn for t in _iscsi().targets)
            tpg = _find_tpg(iqn) if exists else None
        actions: list[Action] = [] if exists else [CreateTarget(iqn)]
        if tpg is None:
            actions.append(CreateTpg(iqn))
        return bool(apply(actions, save=save))


def remove_target(site: str, *, save: bool = True) -> bool:
    """Remove the site's target (its TPG, LUNs, ACLs and portals; backstores stay)."""
    iqn = site_iqn(site)
    with _LOCK:
        with _rtslib_errors(f"look up target {iqn}"):
            exists = _iscsi().exists and any(t.wwn == iqn for t in _iscsi().targets)
        return bool(exists and apply([RemoveTarget(iqn)], save=save))


DEFAULT_PORTAL = Portal()


def ensure_portal(site: str, portal: Portal = DEFAULT_PORTAL, *, save: bool = True) -> bool:
    iqn = site_iqn(site)
    with _LOCK:
        with _rtslib_errors(f"look up portals of {iqn}"):
            have = {Portal(str(np.ip_address), int(np.port)) for np in _tpg(iqn).network_portals}
        if portal in have:
            return False
        return bool(apply([CreatePortal(iqn, portal)], save=save))


def remove_portal(site: str, portal: Portal, *, save: bool = True) -> bool:
    iqn = site_iqn(site)
    with _LOCK:
        with _rtslib_errors(f"look up portals of {iqn}"):
            have = {Portal(str(np.ip_address), int(np.port)) for np in _tpg(iqn).network_portals}
        return bool(portal in have and apply([RemovePortal(iqn, portal)], save=save))


def ensure_lun(
    site: str, kind: BackstoreKind, volume: str, lun: int | None = None, *, save: bool = True
) -> int:
    """Export a backstore from the site's TPG; returns its LUN number (kept if exported)."""
    iqn = site_iqn(site)
    with _LOCK:
        with _rtslib_errors(f"look up LUNs of {iqn}"):
            current = _observe_target(_target(iqn))
        for number, observed in current.luns.items():
            if (observed.plugin, observed.storage_object) == (str(kind), volume) and (
                lun is None or lun == number
            ):
                return number
        if lun is None:
            lun = min(set(range(len(current.luns) + 1)) - set(current.luns))
        elif lun in current.luns:
            raise LioError(
                f"LIO: cannot export {kind}/{volume} as LUN {lun} of {iqn}: LUN {lun} exports "
                f"{current.luns[lun].plugin}/{current.luns[lun].storage_object}"
            )
        actions: list[Action] = [CreateLun(iqn, lun, str(kind), volume)]
        for initiator, acl in current.acls.items():
            if lun not in acl.mapped_luns:
                actions.append(MapLun(iqn, initiator, lun))
        apply(actions, save=save)
        return lun


def remove_lun(site: str, kind: BackstoreKind, volume: str, *, save: bool = True) -> bool:
    """Stop exporting a backstore from the site's TPG (the backstore stays)."""
    iqn = site_iqn(site)
    with _LOCK:
        with _rtslib_errors(f"look up LUNs of {iqn}"):
            tpg = _find_tpg(iqn)
            current = _observe_target(_target(iqn)) if tpg is not None else None
        if current is None:
            return False
        actions: list[Action] = [
            RemoveLun(iqn, number)
            for number, observed in sorted(current.luns.items())
            if (observed.plugin, observed.storage_object) == (str(kind), volume)
        ]
        return bool(apply(actions, save=save))


def set_demo_mode(site: str, enabled: bool, *, save: bool = True) -> bool:
    """Demo mode (labs only): any initiator logs in without ACL or CHAP and may write."""
    iqn = site_iqn(site)
    wanted = (
        LioConfig(site=site, demo_mode=True).tpg_attributes()
        if enabled
        else LioConfig(site=site).tpg_attributes()
    )
    with _LOCK:
        with _rtslib_errors(f"look up TPG {TPG_TAG} of {iqn}"):
            tpg = _tpg(iqn)
            have = {name: str(tpg.get_attribute(name)).strip() for name in wanted}
        actions: list[Action] = [
            SetTpgAttribute(iqn, name, value)
            for name, value in wanted.items()
            if have.get(name) != value
        ]
        return bool(apply(actions, save=save))


def ensure_acl(site: str, acl: AclSpec, *, save: bool = True) -> bool:
    """A node ACL with its CHAP credentials, mapping every LUN of the TPG. True if changed."""
    iqn = site_iqn(site)
    with _LOCK:
        with _rtslib_errors(f"look up ACLs of {iqn}"):
            current = _observe_target(_target(iqn))
        seen = current.acls.get(acl.initiator_iqn)
        actions: list[Action] = []
        if seen is None:
            actions.append(CreateAcl(iqn, acl))
        if seen is None or seen.chap != acl.chap:
            actions.append(SetAclChap(iqn, acl.initiator_iqn, acl.chap))
        mapped = {} if seen is None else seen.mapped_luns
        for number in sorted(current.luns):
            if mapped.get(number) != number:
                actions.append(MapLun(iqn, acl.initiator_iqn, number))
        return bool(apply(actions, save=save))


def remove_acl(site: str, initiator_iqn: str, *, save: bool = True) -> bool:
    iqn = site_iqn(site)
    with _LOCK:
        with _rtslib_errors(f"look up ACLs of {iqn}"):
            present = initiator_iqn in _observe_target(_target(iqn)).acls
        return bool(present and apply([RemoveAcl(iqn, initiator_iqn)], save=save))


def ensure_alua_group(
    kind: BackstoreKind, volume: str, group: AluaGroupSpec, *, save: bool = True
) -> bool:
    """The site's ALUA target port group on a backstore, in `group.state`. True if changed."""
    with _LOCK:
        with _rtslib_errors(f"look up ALUA groups of {kind}/{volume}"):
            so = _find_so(str(kind), volume)
            groups = {} if so is None else _observe_backstore(so).alua_groups
        if groups.get(group.name) == (group.group_id, int(group.state)):
            return False
        return bool(apply([EnsureAluaGroup(str(kind), volume, group)], save=save))


def set_alua_state(
    kind: BackstoreKind, volume: str, group: AluaGroupSpec, state: AluaState, *, save: bool = True
) -> bool:
    """Move the site's ALUA group of a backstore to `state` (promotion: standby -> active)."""
    return ensure_alua_group(
        kind,
        volume,
        AluaGroupSpec(group.name, group.group_id, state),
        save=save,
    )


def set_lun_alua_group(site: str, lun: int, group_name: str, *, save: bool = True) -> bool:
    iqn = site_iqn(site)
    with _LOCK:
        with _rtslib_errors(f"look up LUN {lun} of {iqn}"):
            current = _observe_target(_target(iqn)).luns.get(lun)
        if current is not None and current.alua_group == group_name:
            return False
        return bool(apply([SetLunAluaGroup(iqn, lun, group_name)], save=save))


def get_backstore_attribute(kind: BackstoreKind, volume: str, name: str) -> str:
    """Read an attribute of a backstore (attrib/<name> in configfs)."""
    with _LOCK, _rtslib_errors(f"read attribute {name} of {kind} backstore {volume!r}"):
        so = _find_so(str(kind), volume)
        if so is None:
            raise RTSLibNotInCFSError(f"no {kind} backstore {volume!r}")
        return str(so.get_attribute(name)).strip()


def set_backstore_attribute(
    kind: BackstoreKind, volume: str, name: str, value: int | str, *, save: bool = True
) -> bool:
    """Set an attribute of a backstore (e.g. TCMU cmd_time_out, before the LUN is exported).
    True if it changed."""
    what = f"set attribute {name}={value} of {kind} backstore {volume!r}"
    with _LOCK:
        with _rtslib_errors(what):
            so = _find_so(str(kind), volume)
            if so is None:
                raise RTSLibNotInCFSError(f"no {kind} backstore {volume!r}")
            if str(so.get_attribute(name)).strip() == str(value):
                return False
            so.set_attribute(name, value)
        log.info("LIO: %s", what)
        if save:
            save_config()
        return True
