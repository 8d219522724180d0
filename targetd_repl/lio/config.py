"""The wanted LIO configuration of one site, as plain data, and the naming rules (no rtslib here).

This module alone knows how our objects are named in LIO:

- one iSCSI target per site, IQN `iqn.2025-01.io.github.targetd-repl:<site>` (lowercased, `_`
  becomes `-`: IQNs allow neither upper case nor underscores), with one TPG (tag 1);
- one storage object per volume, named after the volume, its T10 unit serial starting with
  `targetd-` (our ownership mark); a `user` (TCMU) backstore carries the
  config string `targetd/<volume>`, so its uio device is named
  `tcm-user/<hba>/<volume>/targetd/<volume>` and the data path finds its volume by that name;
- an optional ALUA target port group per site on each storage object (promotion flips its state).
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass, field

from targetd_repl.errors import InvalidArgument
from targetd_repl.model import BLOCK_SIZES, check_name

IQN_PREFIX = "iqn.2025-01.io.github.targetd-repl"
USER_SUBTYPE = "targetd"
TPG_TAG = 1
DEFAULT_PORT = 3260
UIO_NAME_PREFIX = "tcm-user/"
# The T10 unit serial (vpd_unit_serial) of every backstore we create starts with this: it marks
# the object as ours (a fileio backstore has no other place to say so).
WWN_PREFIX = "targetd-"
CHAP_MAX = 255


class BackstoreKind(enum.StrEnum):
    USER = "user"  # TCMU: served by our userspace handler
    FILEIO = "fileio"  # kernel file backstore: comparison LUNs in tests and benchmarks


class AluaState(enum.IntEnum):
    """ALUA access states as LIO's `alua_access_state` numbers them."""

    ACTIVE_OPTIMIZED = 0
    ACTIVE_NONOPTIMIZED = 1
    STANDBY = 2
    UNAVAILABLE = 3
    OFFLINE = 14
    TRANSITIONING = 15


def site_iqn(site: str) -> str:
    """The IQN of a site's target."""
    check_name("site", site)
    return f"{IQN_PREFIX}:{site.lower().replace('_', '-')}"


def is_our_iqn(iqn: str) -> bool:
    return iqn.startswith(IQN_PREFIX + ":")


def user_config(volume: str) -> str:
    """The TCMU config string (`<subtype>/<cfg>`) of a volume's user backstore."""
    return f"{USER_SUBTYPE}/{check_name('volume', volume)}"


def is_our_user_config(config: str | None) -> bool:
    return config is not None and config.startswith(USER_SUBTYPE + "/")


def new_wwn() -> str:
    """A fresh T10 unit serial carrying our ownership mark."""
    return f"{WWN_PREFIX}{uuid.uuid4()}"


def is_our_wwn(wwn: str | None) -> bool:
    return wwn is not None and wwn.startswith(WWN_PREFIX)


@dataclass(frozen=True, slots=True)
class UioName:
    """A TCMU uio device name, `tcm-user/<hba>/<storage object>/<subtype>/<cfg>`, parsed."""

    hba: int
    storage_object: str
    subtype: str
    config: str

    @property
    def volume(self) -> str | None:
        """The volume this device serves, or None when it is not ours (another subtype)."""
        return self.config if self.subtype == USER_SUBTYPE else None


def parse_uio_name(name: str) -> UioName | None:
    """Parse the sysfs `name` of a uio device; None when it is not a TCMU device."""
    if not name.startswith(UIO_NAME_PREFIX):
        return None
    parts = name.strip().split("/", 4)
    if len(parts) != 5 or not parts[1].isdigit():
        return None
    return UioName(hba=int(parts[1]), storage_object=parts[2], subtype=parts[3], config=parts[4])


@dataclass(frozen=True, slots=True, order=True)
class Portal:
    ip: str = "127.0.0.1"
    port: int = DEFAULT_PORT

    def __str__(self) -> str:
        return f"{self.ip}:{self.port}"


@dataclass(frozen=True, slots=True)
class Chap:
    """CHAP credentials an initiator must present (and, when mutual, the target's own)."""

    userid: str
    password: str = field(repr=False)
    mutual_userid: str | None = None
    mutual_password: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        for label, value in (("userid", self.userid), ("password", self.password)):
            if not value or len(value) > CHAP_MAX or value.strip() != value or value == "NULL":
                raise InvalidArgument(f"invalid CHAP {label}: 1-{CHAP_MAX} chars, no spaces")
        if (self.mutual_userid is None) != (self.mutual_password is None):
            raise InvalidArgument("mutual CHAP needs both a userid and a password")
        if self.mutual_userid is not None and self.mutual_password is not None:
            for label, value in (
                ("mutual userid", self.mutual_userid),
                ("mutual password", self.mutual_password),
            ):
                if not value or len(value) > CHAP_MAX or value.strip() != value:
                    raise InvalidArgument(f"invalid CHAP {label}: 1-{CHAP_MAX} chars, no spaces")


@dataclass(frozen=True, slots=True)
class AclSpec:
    """A node ACL: an initiator allowed to log in (sees every LUN of the TPG)."""

    initiator_iqn: str
    chap: Chap | None = None

    def __post_init__(self) -> None:
        iqn = self.initiator_iqn
        if not iqn or " " in iqn or "_" in iqn or iqn != iqn.lower():
            raise InvalidArgument(f"invalid initiator IQN {iqn!r}")


@dataclass(frozen=True, slots=True)
class LunSpec:
    """One exported volume: its backstore and, optionally, a fixed LUN number."""

    volume: str
    size_bytes: int
    block_size: int = 512
    kind: BackstoreKind = BackstoreKind.USER
    path: str | None = None  # fileio: the backing file (created sparse when missing)
    lun: int | None = None  # None: keep the number it has, else the lowest free one
    hw_max_sectors: int | None = None  # user: largest command the kernel passes up, in sectors
    cmd_time_out: int | None = None  # user: seconds before the kernel fails an unserved command
    write_back: bool = False  # fileio only

    def __post_init__(self) -> None:
        check_name("volume", self.volume)
        if self.block_size not in BLOCK_SIZES:
            raise InvalidArgument(
                f"volume {self.volume!r}: block size must be one of {BLOCK_SIZES}"
            )
        if self.size_bytes <= 0 or self.size_bytes % self.block_size:
            raise InvalidArgument(
                f"volume {self.volume!r}: size {self.size_bytes} is not a positive multiple of "
                f"the block size {self.block_size}"
            )
        if self.kind is BackstoreKind.FILEIO and not self.path:
            raise InvalidArgument(f"volume {self.volume!r}: a fileio backstore needs a path")
        if self.kind is BackstoreKind.USER and self.path:
            raise InvalidArgument(f"volume {self.volume!r}: a user backstore takes no path")
        if self.lun is not None and not 0 <= self.lun <= 65535:
            raise InvalidArgument(f"volume {self.volume!r}: LUN {self.lun} out of 0-65535")
        if self.cmd_time_out is not None and (
            self.kind is not BackstoreKind.USER or self.cmd_time_out < 0
        ):
            raise InvalidArgument(f"volume {self.volume!r}: cmd_time_out is for user backstores")
        if self.hw_max_sectors is not None and not 8 <= self.hw_max_sectors <= 65536:
            raise InvalidArgument(f"volume {self.volume!r}: hw_max_sectors out of 8-65536")

    @property
    def storage_object(self) -> str:
        return self.volume

    @property
    def config(self) -> str | None:
        return user_config(self.volume) if self.kind is BackstoreKind.USER else None


@dataclass(frozen=True, slots=True)
class AluaGroupSpec:
    """The site's ALUA target port group, created on every exported storage object."""

    name: str
    group_id: int
    state: AluaState = AluaState.ACTIVE_OPTIMIZED

    def __post_init__(self) -> None:
        check_name("ALUA group", self.name)
        if self.name == "default_tg_pt_gp":
            raise InvalidArgument("the ALUA group name default_tg_pt_gp belongs to the kernel")
        if not 1 <= self.group_id <= 65535:
            raise InvalidArgument(f"ALUA group id {self.group_id} out of 1-65535")


DEMO_ATTRIBUTES = {
    "generate_node_acls": "1",
    "cache_dynamic_acls": "1",
    "authentication": "0",
    "demo_mode_write_protect": "0",
}


@dataclass(frozen=True, slots=True)
class LioConfig:
    """Everything one site wants LIO to hold. `reconcile()` makes configfs match it."""

    site: str
    luns: tuple[LunSpec, ...] = ()
    portals: tuple[Portal, ...] = (Portal(),)
    acls: tuple[AclSpec, ...] = ()
    demo_mode: bool = False
    alua: AluaGroupSpec | None = None

    def __post_init__(self) -> None:
        check_name("site", self.site)
        names = [spec.volume for spec in self.luns]
        if len(set(names)) != len(names):
            raise InvalidArgument(f"site {self.site!r}: a volume is exported twice")
        fixed = [spec.lun for spec in self.luns if spec.lun is not None]
        if len(set(fixed)) != len(fixed):
            raise InvalidArgument(f"site {self.site!r}: two volumes ask for the same LUN")
        initiators = [acl.initiator_iqn for acl in self.acls]
        if len(set(initiators)) != len(initiators):
            raise InvalidArgument(f"site {self.site!r}: an initiator has two ACLs")
        if self.demo_mode and self.acls:
            raise InvalidArgument(f"site {self.site!r}: demo mode takes no ACLs")
        with_chap = {acl.chap is not None for acl in self.acls}
        if len(with_chap) > 1:
            raise InvalidArgument(f"site {self.site!r}: either every ACL uses CHAP or none does")

    @property
    def target_iqn(self) -> str:
        return site_iqn(self.site)

    def tpg_attributes(self) -> dict[str, str]:
        """The TPG attributes this configuration implies (demo mode, or ACLs with/without CHAP)."""
        if self.demo_mode:
            return dict(DEMO_ATTRIBUTES)
        chap = any(acl.chap is not None for acl in self.acls)
        return {
            "generate_node_acls": "0",
            "cache_dynamic_acls": "0",
            "authentication": "1" if chap else "0",
        }
