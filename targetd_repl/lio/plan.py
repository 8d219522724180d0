"""The pure half of `reconcile`: compare what configfs holds (a `LioState`) with the wanted
`LioConfig` and list the actions that close the gap. No rtslib, no I/O: unit-testable anywhere.

Ownership rules (what reconcile may remove):
- targets whose IQN starts with our prefix are ours; every object under them is ours;
- a user backstore is ours when its config subtype is `targetd`;
- a fileio backstore is ours when its T10 unit serial carries our mark (`targetd-...`) or one
  of our targets exports it;
- everything else is foreign and left alone. A wanted name taken by a foreign object is a
  conflict: reported as an error, never overwritten.

Actions come out in a safe order: unexport and remove the stale first, then create backstores,
target, TPG settings, LUNs, ALUA, ACLs and portals, and enable the TPG last, so an initiator never
logs in to a half-built TPG.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from targetd_repl.errors import FailedPrecondition, LioError
from targetd_repl.lio.config import (
    TPG_TAG,
    AclSpec,
    AluaGroupSpec,
    BackstoreKind,
    Chap,
    LioConfig,
    LunSpec,
    Portal,
    is_our_iqn,
    is_our_user_config,
    is_our_wwn,
)


class LioConflict(LioError, FailedPrecondition):
    """A name we need is taken by a foreign LIO object: never overwritten."""


# --- what configfs holds ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ObservedBackstore:
    plugin: str  # "user", "fileio", "block", ...
    name: str
    size_bytes: int
    config: str | None = None  # user backstores
    path: str | None = None  # fileio backstores
    block_size: int | None = None
    hw_max_sectors: int | None = None
    wwn: str | None = None  # the T10 unit serial
    alua_groups: Mapping[str, tuple[int, int]] = field(default_factory=dict)  # name: (id, state)

    @property
    def key(self) -> tuple[str, str]:
        return (self.plugin, self.name)


@dataclass(frozen=True, slots=True)
class ObservedLun:
    lun: int
    plugin: str
    storage_object: str
    alua_group: str | None = None


@dataclass(frozen=True, slots=True)
class ObservedAcl:
    initiator_iqn: str
    chap: Chap | None
    mapped_luns: Mapping[int, int] = field(default_factory=dict)  # mapped LUN: TPG LUN


@dataclass(frozen=True, slots=True)
class ObservedTarget:
    iqn: str
    has_tpg: bool = True
    enabled: bool = False
    attributes: Mapping[str, str] = field(default_factory=dict)
    portals: frozenset[Portal] = frozenset()
    luns: Mapping[int, ObservedLun] = field(default_factory=dict)
    acls: Mapping[str, ObservedAcl] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class LioState:
    backstores: Mapping[tuple[str, str], ObservedBackstore] = field(default_factory=dict)
    targets: Mapping[str, ObservedTarget] = field(default_factory=dict)  # iSCSI targets, all


# --- actions ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RemoveLun:
    target: str
    lun: int

    def describe(self) -> str:
        return f"remove LUN {self.lun} of {self.target}"


@dataclass(frozen=True, slots=True)
class RemoveAcl:
    target: str
    initiator: str

    def describe(self) -> str:
        return f"remove ACL {self.initiator} of {self.target}"


@dataclass(frozen=True, slots=True)
class UnmapLun:
    target: str
    initiator: str
    mapped_lun: int

    def describe(self) -> str:
        return f"unmap LUN {self.mapped_lun} from ACL {self.initiator} of {self.target}"


@dataclass(frozen=True, slots=True)
class RemovePortal:
    target: str
    portal: Portal

    def describe(self) -> str:
        return f"remove portal {self.portal} of {self.target}"


@dataclass(frozen=True, slots=True)
class RemoveTarget:
    target: str

    def describe(self) -> str:
        return f"remove target {self.target}"


@dataclass(frozen=True, slots=True)
class RemoveBackstore:
    plugin: str
    name: str

    def describe(self) -> str:
        return f"remove {self.plugin} backstore {self.name!r}"


@dataclass(frozen=True, slots=True)
class CreateBackstore:
    spec: LunSpec

    def describe(self) -> str:
        return f"create {self.spec.kind} backstore {self.spec.storage_object!r}"


@dataclass(frozen=True, slots=True)
class CreateTarget:
    target: str

    def describe(self) -> str:
        return f"create target {self.target}"


@dataclass(frozen=True, slots=True)
class CreateTpg:
    target: str

    def describe(self) -> str:
        return f"create TPG {TPG_TAG} of {self.target}"


@dataclass(frozen=True, slots=True)
class SetTpgAttribute:
    target: str
    name: str
    value: str

    def describe(self) -> str:
        return f"set TPG attribute {self.name}={self.value} on {self.target}"


@dataclass(frozen=True, slots=True)
class CreateLun:
    target: str
    lun: int
    plugin: str
    storage_object: str

    def describe(self) -> str:
        return f"export {self.plugin}/{self.storage_object} as LUN {self.lun} of {self.target}"


@dataclass(frozen=True, slots=True)
class EnsureAluaGroup:
    plugin: str
    storage_object: str
    group: AluaGroupSpec

    def describe(self) -> str:
        return (
            f"ALUA group {self.group.name} (id {self.group.group_id}) on "
            f"{self.plugin}/{self.storage_object}: {self.group.state.name.lower()}"
        )


@dataclass(frozen=True, slots=True)
class SetLunAluaGroup:
    target: str
    lun: int
    group: str

    def describe(self) -> str:
        return f"put LUN {self.lun} of {self.target} in ALUA group {self.group}"


@dataclass(frozen=True, slots=True)
class CreateAcl:
    target: str
    acl: AclSpec

    def describe(self) -> str:
        return f"create ACL {self.acl.initiator_iqn} on {self.target}"


@dataclass(frozen=True, slots=True)
class SetAclChap:
    target: str
    initiator: str
    chap: Chap | None

    def describe(self) -> str:
        what = "clear CHAP" if self.chap is None else f"set CHAP user {self.chap.userid!r}"
        return f"{what} for ACL {self.initiator} of {self.target}"


@dataclass(frozen=True, slots=True)
class MapLun:
    target: str
    initiator: str
    lun: int

    def describe(self) -> str:
        return f"map LUN {self.lun} to ACL {self.initiator} of {self.target}"


@dataclass(frozen=True, slots=True)
class CreatePortal:
    target: str
    portal: Portal

    def describe(self) -> str:
        return f"create portal {self.portal} on {self.target}"


@dataclass(frozen=True, slots=True)
class EnableTpg:
    target: str

    def describe(self) -> str:
        return f"enable TPG {TPG_TAG} of {self.target}"


Action = (
    RemoveLun
    | RemoveAcl
    | UnmapLun
    | RemovePortal
    | RemoveTarget
    | RemoveBackstore
    | CreateBackstore
    | CreateTarget
    | CreateTpg
    | SetTpgAttribute
    | CreateLun
    | EnsureAluaGroup
    | SetLunAluaGroup
    | CreateAcl
    | SetAclChap
    | MapLun
    | CreatePortal
    | EnableTpg
)


# --- the comparison --------------------------------------------------------------------------


def backstore_is_ours(bs: ObservedBackstore, state: LioState) -> bool:
    if bs.plugin == BackstoreKind.USER:
        return is_our_user_config(bs.config)
    if bs.plugin == BackstoreKind.FILEIO and is_our_wwn(bs.wwn):
        return True
    for target in state.targets.values():
        if is_our_iqn(target.iqn) and any(
            (lun.plugin, lun.storage_object) == bs.key for lun in target.luns.values()
        ):
            return True
    return False


def backstore_matches(spec: LunSpec, bs: ObservedBackstore) -> bool:
    """True when the existing backstore is what `spec` asks for (else it must be replaced)."""
    if bs.plugin != spec.kind or bs.size_bytes != spec.size_bytes:
        return False
    if bs.block_size is not None and bs.block_size != spec.block_size:
        return False
    if spec.kind is BackstoreKind.USER:
        if bs.config != spec.config:
            return False
        if spec.hw_max_sectors is not None and bs.hw_max_sectors != spec.hw_max_sectors:
            return False
    return spec.kind is not BackstoreKind.FILEIO or bs.path == spec.path


def _check_conflicts(wanted: LioConfig, state: LioState) -> None:
    for spec in wanted.luns:
        for (plugin, name), bs in state.backstores.items():
            if name != spec.storage_object:
                continue
            if plugin == spec.kind and not backstore_is_ours(bs, state):
                if spec.kind is BackstoreKind.FILEIO and bs.path == spec.path:
                    continue  # the same file: adopt it
                raise LioConflict(
                    f"LIO: cannot create {spec.kind} backstore {name!r}: a foreign {plugin} "
                    f"backstore of that name exists (config {bs.config or bs.path!r})"
                )


def assign_luns(wanted: LioConfig, current: ObservedTarget | None) -> dict[str, int]:
    """LUN numbers per volume: fixed ones as asked, else the number it already has, else the
    lowest free one (stable across restarts)."""
    result: dict[str, int] = {}
    taken: set[int] = set()
    for spec in wanted.luns:
        if spec.lun is not None:
            result[spec.volume] = spec.lun
            taken.add(spec.lun)
    if current is not None:
        for spec in wanted.luns:
            if spec.volume in result:
                continue
            for lun in sorted(current.luns.values(), key=lambda lun: lun.lun):
                if (
                    lun.plugin == spec.kind
                    and lun.storage_object == spec.storage_object
                    and lun.lun not in taken
                ):
                    result[spec.volume] = lun.lun
                    taken.add(lun.lun)
                    break
    next_free = 0
    for spec in wanted.luns:
        if spec.volume in result:
            continue
        while next_free in taken:
            next_free += 1
        result[spec.volume] = next_free
        taken.add(next_free)
    return result


def plan(wanted: LioConfig, state: LioState) -> list[Action]:
    """The actions that turn `state` into `wanted`; empty when they already agree."""
    _check_conflicts(wanted, state)
    iqn = wanted.target_iqn
    current = state.targets.get(iqn)
    removals: list[Action] = []
    creations: list[Action] = []

    # Stale targets of ours (another site name): removed whole, with everything under them.
    for other in sorted(state.targets):
        if other != iqn and is_our_iqn(other):
            removals.append(RemoveTarget(other))

    # Backstores: replace the ones that differ, create the missing ones.
    replaced: set[tuple[str, str]] = set()
    wanted_keys = {(str(spec.kind), spec.storage_object) for spec in wanted.luns}
    for spec in wanted.luns:
        key = (str(spec.kind), spec.storage_object)
        bs = state.backstores.get(key)
        if bs is None:
            creations.append(CreateBackstore(spec))
        elif not backstore_matches(spec, bs):
            replaced.add(key)
            creations.append(CreateBackstore(spec))

    # LUNs of our target: remove the stale and those whose backstore is replaced.
    lun_of = assign_luns(wanted, current)
    wanted_luns = {lun_of[spec.volume]: spec for spec in wanted.luns}
    kept_luns: set[int] = set()
    if current is not None:
        for number, lun in sorted(current.luns.items()):
            want = wanted_luns.get(number)
            key = (lun.plugin, lun.storage_object)
            if want is None or key != (str(want.kind), want.storage_object) or key in replaced:
                removals.append(RemoveLun(iqn, number))
            else:
                kept_luns.add(number)

    # Stale backstores of ours (not wanted any more), then the replaced ones.
    for key, bs in sorted(state.backstores.items()):
        if key in replaced or (key not in wanted_keys and backstore_is_ours(bs, state)):
            removals.append(RemoveBackstore(bs.plugin, bs.name))

    # Target and TPG.
    if current is None:
        creations.append(CreateTarget(iqn))
        creations.append(CreateTpg(iqn))
    elif not current.has_tpg:
        creations.append(CreateTpg(iqn))
    fresh = current is None or not current.has_tpg
    observed_attrs = {} if fresh or current is None else current.attributes
    for name, value in wanted.tpg_attributes().items():
        if observed_attrs.get(name) != value:
            creations.append(SetTpgAttribute(iqn, name, value))

    # LUNs.
    for number, spec in sorted(wanted_luns.items()):
        if number not in kept_luns:
            creations.append(CreateLun(iqn, number, str(spec.kind), spec.storage_object))

    # ALUA: the site's group on every exported storage object, each LUN a member of it.
    if wanted.alua is not None:
        group = wanted.alua
        for number, spec in sorted(wanted_luns.items()):
            key = (str(spec.kind), spec.storage_object)
            bs = None if key in replaced else state.backstores.get(key)
            have = None if bs is None else bs.alua_groups.get(group.name)
            if have != (group.group_id, int(group.state)):
                creations.append(EnsureAluaGroup(str(spec.kind), spec.storage_object, group))
            lun_now = current.luns.get(number) if current is not None else None
            if number not in kept_luns or lun_now is None or lun_now.alua_group != group.name:
                creations.append(SetLunAluaGroup(iqn, number, group.name))

    # ACLs (none in demo mode): each maps every LUN of the TPG under the same number.
    wanted_acls = {acl.initiator_iqn: acl for acl in wanted.acls}
    observed_acls = {} if fresh or current is None else dict(current.acls)
    for initiator in sorted(observed_acls):
        if initiator not in wanted_acls:
            removals.append(RemoveAcl(iqn, initiator))
    for initiator, acl in sorted(wanted_acls.items()):
        seen = observed_acls.get(initiator)
        if seen is None:
            creations.append(CreateAcl(iqn, acl))
            if acl.chap is not None:
                creations.append(SetAclChap(iqn, initiator, acl.chap))
            mapped: Mapping[int, int] = {}
        else:
            if seen.chap != acl.chap:
                creations.append(SetAclChap(iqn, initiator, acl.chap))
            mapped = seen.mapped_luns
        for mapped_lun, tpg_lun in sorted(mapped.items()):
            if mapped_lun != tpg_lun or tpg_lun not in kept_luns:
                removals.append(UnmapLun(iqn, initiator, mapped_lun))
        for number in sorted(wanted_luns):
            if mapped.get(number) != number or number not in kept_luns:
                creations.append(MapLun(iqn, initiator, number))

    # Portals.
    observed_portals = frozenset() if current is None else current.portals
    for portal in sorted(observed_portals - set(wanted.portals)):
        removals.append(RemovePortal(iqn, portal))
    for portal in wanted.portals:
        if portal not in observed_portals:
            creations.append(CreatePortal(iqn, portal))

    if current is None or not current.enabled or fresh:
        creations.append(EnableTpg(iqn))
    return _ordered(removals) + creations


_REMOVAL_ORDER = {UnmapLun: 0, RemoveAcl: 1, RemoveLun: 2, RemovePortal: 3, RemoveTarget: 4}


def _ordered(removals: list[Action]) -> list[Action]:
    """Mappings before ACLs before LUNs before targets before backstores (stable otherwise)."""
    return sorted(removals, key=lambda action: _REMOVAL_ORDER.get(type(action), 5))
