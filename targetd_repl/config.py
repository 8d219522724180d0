"""A site's settings: the TOML file `targetd-repl serve --config` reads, as typed, validated,
frozen dataclasses. `parse` is pure (no I/O); `load` reads the file and checks that the files it
names exist. Every error is one line that names the key: `ConfigError`.

    [site]
    name = "a"                                  # this site's name (required)
    state_dir = "/var/lib/targetd-repl"         # volumes, journals, metadata (required)
    log_level = "info"                          # debug | info | warning | error

    [control]
    socket = "/run/targetd-repl/a.sock"         # default /run/targetd-repl/<site>.sock
    tcp_address = "127.0.0.1:7600"              # optional; served with mutual TLS only

    [replication]
    listen = "0.0.0.0:7700"                     # host:port; port 0 lets the OS choose (the
                                                # bound port goes to <state_dir>/endpoints.json)
    sync_timeout = 5.0                          # seconds a sync write waits for the peer, then
                                                # the pair goes suspended-error
    link_timeout = 5.0                          # seconds without acknowledgement: link lost
    copy_rate = "200M"                          # resync copy limit per second; 0: none
    bulk_lane = true                            # journal bytes over a plain TLS socket beside
                                                # the gRPC stream (replication/bulk.py)
    bulk_lane_port = 0                          # its TCP port on the listen host; 0: the OS
                                                # chooses (set one where a firewall sits
                                                # between the sites)

    [tls]                                       # required: site-to-site gRPC is mutual TLS
    ca = "/etc/targetd-repl/ca.pem"             # the CA both sites trust
    cert = "/etc/targetd-repl/a.pem"            # this site's certificate
    key = "/etc/targetd-repl/a.key"             # and its private key

    [journal]
    size_limit = "1G"                           # per group; past it a pair goes journal-full
    segment_size = "64M"

    [peers.b]                                   # one table per peer site
    address = "198.51.100.7:7700"               # its replication address
    bulk_lane_address = "198.51.100.7:7701"     # optional: where its bulk lane is reached when
                                                # not at that host and the port it announces
                                                # (a NAT or port forward between the sites)

    [export]                                    # optional: this controller owns the site's LIO
    portals = ["0.0.0.0:3260"]                  # iSCSI portals, IP:port (default 0.0.0.0:3260)
    demo_mode = false                           # labs only: any initiator, no ACL, no CHAP
    workers = 4                                 # data path threads per LUN (0: the ring's own)
    hw_max_sectors = 2048                       # largest command the kernel passes up (sectors)
    cmd_time_out = 60                           # seconds LIO waits for the data path before it
                                                # fails a command (covers a controller restart)

    [[export.acls]]                             # one per initiator allowed in (not in demo mode)
    initiator = "iqn.1993-08.org.debian:01:host1"
    chap_userid = "host1"                       # optional CHAP: both or neither, and either
    chap_password = "a-long-secret"             # every ACL has CHAP or none has

    [metrics]                                   # optional: Prometheus text format at
    listen = "127.0.0.1:9477"                   # GET http://HOST:PORT/metrics (metrics.py)

Without `[export]` the controller touches no LIO object and runs no data path (volumes are
reached through the control API only). With it, the controller exports every volume of the site
as a LUN of its iSCSI target on a TCMU `user:` backstore, serves those LUNs in-process, and
repairs configfs at every start (export.py).

Relative paths are relative to the directory of the configuration file. Sizes are bytes, or a
string with a K, M, G or T suffix (powers of 1024).
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from targetd_repl.errors import InvalidArgument
from targetd_repl.model import check_name

DEFAULT_SOCKET_DIR = Path("/run/targetd-repl")
DEFAULT_JOURNAL_SIZE_LIMIT = 1 << 30
DEFAULT_JOURNAL_SEGMENT_SIZE = 64 << 20
LOG_LEVELS = ("debug", "info", "warning", "error")
DEFAULT_PORTAL = ("0.0.0.0", 3260)
DEFAULT_EXPORT_WORKERS = 4
DEFAULT_HW_MAX_SECTORS = 2048  # 1 MiB: the optimal transfer length our VPD page B0 reports
CHAP_MAX = 255
# sun_path is 108 bytes on Linux, including the terminating NUL.
MAX_SOCKET_PATH = 107

_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}
_ADDRESS = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9_.-]+)):(?P<port>\d+)$")

_SECTIONS: dict[str, frozenset[str]] = {
    "site": frozenset({"name", "state_dir", "log_level"}),
    "control": frozenset({"socket", "tcp_address"}),
    "replication": frozenset(
        {"listen", "sync_timeout", "link_timeout", "copy_rate", "bulk_lane", "bulk_lane_port"}
    ),
    "tls": frozenset({"ca", "cert", "key"}),
    "journal": frozenset({"size_limit", "segment_size"}),
    "export": frozenset(
        {"portals", "demo_mode", "acls", "workers", "hw_max_sectors", "cmd_time_out"}
    ),
    "metrics": frozenset({"listen"}),
}
_ACL_KEYS = frozenset({"initiator", "chap_userid", "chap_password"})
_INITIATOR = re.compile(
    r"^(?:iqn\.\d{4}-\d{2}\.[^\s_A-Z]+|eui\.[0-9a-f]{16}|naa\.[0-9a-f]{16}(?:[0-9a-f]{16})?)$"
)


class ConfigError(InvalidArgument):
    """The configuration cannot be used; the message names the file and the key."""


# --- values --------------------------------------------------------------------------------------


def parse_size(text: str | int) -> int:
    """`1G`, `512K`, `4096`, `64MiB` -> bytes. Raises ValueError with a message for people."""
    if isinstance(text, bool):
        raise ValueError(
            f"invalid size {text!r}: use a number with an optional K, M, G or T suffix"
        )
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"invalid size {text}: must not be negative")
        return text
    match = _SIZE.match(text)
    if match is None:
        raise ValueError(
            f"invalid size {text!r}: use a number with an optional K, M, G or T suffix"
        )
    return int(match.group(1)) << _UNITS[match.group(2).upper()]


def parse_address(text: str, *, allow_port_zero: bool = False) -> tuple[str, int]:
    """`host:port` or `[v6]:port` -> (host, port). Raises ValueError."""
    match = _ADDRESS.match(text)
    if match is None:
        raise ValueError(f"invalid address {text!r}: use host:port (IPv6: [addr]:port)")
    port = int(match.group("port"))
    lowest = 0 if allow_port_zero else 1
    if not lowest <= port <= 65535:
        raise ValueError(f"invalid address {text!r}: port must be {lowest}-65535")
    host = match.group("v6") or match.group("host")
    return host, port


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --- settings ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TlsSettings:
    ca: Path
    cert: Path
    key: Path


@dataclass(frozen=True, slots=True)
class PeerSettings:
    name: str
    address: str  # host:port of its replication endpoint
    bulk_lane_address: str | None = None  # where to reach its bulk lane, if not there


@dataclass(frozen=True, slots=True)
class JournalSettings:
    size_limit: int = DEFAULT_JOURNAL_SIZE_LIMIT
    segment_size: int = DEFAULT_JOURNAL_SEGMENT_SIZE


@dataclass(frozen=True, slots=True)
class ReplicationTuning:
    """Replication tunables set in the file; None keeps replication's own default."""

    sync_timeout: float | None = None
    link_timeout: float | None = None
    copy_rate_bytes: int | None = None
    bulk_lane: bool = True  # offer a bulk lane to senders, and ask peers for theirs
    bulk_lane_port: int = 0  # 0: a port the OS chooses


@dataclass(frozen=True, slots=True)
class ExportAcl:
    """An initiator allowed to log in to the site's target, with optional CHAP credentials."""

    initiator: str
    chap_userid: str | None = None
    chap_password: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class ExportSettings:
    """The `[export]` section: how the controller exports the site's volumes through LIO."""

    portals: tuple[tuple[str, int], ...] = (DEFAULT_PORTAL,)
    demo_mode: bool = False
    acls: tuple[ExportAcl, ...] = ()
    workers: int = DEFAULT_EXPORT_WORKERS
    hw_max_sectors: int = DEFAULT_HW_MAX_SECTORS
    cmd_time_out: int | None = None  # None: the kernel's default (30 s)


@dataclass(frozen=True, slots=True)
class SiteSettings:
    name: str
    state_dir: Path
    control_socket: Path
    replication_listen: str
    tls: TlsSettings
    control_tcp_address: str | None = None
    journal: JournalSettings = field(default_factory=JournalSettings)
    replication: ReplicationTuning = field(default_factory=ReplicationTuning)
    peers: Mapping[str, PeerSettings] = field(default_factory=dict)
    log_level: str = "info"
    export: ExportSettings | None = None  # None: no [export] section, no LIO, no data path
    metrics_listen: str | None = None  # None: no [metrics] section, no endpoint
    source: Path | None = None  # the file these settings came from

    @property
    def endpoints_file(self) -> Path:
        """Where the controller writes its bound addresses once serving."""
        return self.state_dir / "endpoints.json"


# --- parsing -------------------------------------------------------------------------------------


class _Reader:
    """Typed access to the parsed TOML that turns every problem into one ConfigError line."""

    def __init__(self, data: Mapping[str, Any], where: str, base_dir: Path) -> None:
        self._data = data
        self._where = where
        self._base = base_dir

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"config {self._where}: {key}: {message}")

    def section(self, name: str, *, required: bool = False) -> Mapping[str, Any]:
        value = self._data.get(name)
        if value is None:
            if required:
                raise ConfigError(f"config {self._where}: [{name}]: missing section")
            return {}
        if not isinstance(value, dict):
            raise self.error(name, "must be a table ([" + name + "])")
        return value

    def check_keys(self, name: str, table: Mapping[str, Any], allowed: frozenset[str]) -> None:
        for key in table:
            if key not in allowed:
                raise self.error(
                    f"{name}.{key}", f"unknown key (known: {', '.join(sorted(allowed))})"
                )

    def string(self, table: Mapping[str, Any], section: str, key: str, *, required: bool) -> str:
        value = table.get(key)
        if value is None:
            if required:
                raise self.error(f"{section}.{key}", "missing (required)")
            return ""
        if not isinstance(value, str) or not value.strip():
            raise self.error(f"{section}.{key}", f"must be a non-empty string, not {value!r}")
        return value

    def path(self, table: Mapping[str, Any], section: str, key: str, *, required: bool) -> Path:
        text = self.string(table, section, key, required=required)
        if not text:
            return Path()
        path = Path(text).expanduser()
        return path if path.is_absolute() else self._base / path

    def size(
        self,
        table: Mapping[str, Any],
        section: str,
        key: str,
        default: int,
        *,
        allow_zero: bool = False,
    ) -> int:
        value = table.get(key)
        if value is None:
            return default
        if not isinstance(value, str | int) or isinstance(value, bool):
            raise self.error(f"{section}.{key}", f'must be a size like "1G", not {value!r}')
        try:
            size = parse_size(value)
        except ValueError as error:
            raise self.error(f"{section}.{key}", str(error)) from None
        if size <= 0 and not (allow_zero and size == 0):
            raise self.error(f"{section}.{key}", "must be positive")
        return size

    def seconds(self, table: Mapping[str, Any], section: str, key: str) -> float | None:
        value = table.get(key)
        if value is None:
            return None
        if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
            raise self.error(
                f"{section}.{key}", f"must be a positive number of seconds, not {value!r}"
            )
        return float(value)

    def address(
        self, table: Mapping[str, Any], section: str, key: str, *, required: bool, port_zero: bool
    ) -> str:
        text = self.string(table, section, key, required=required)
        if not text:
            return ""
        try:
            parse_address(text, allow_port_zero=port_zero)
        except ValueError as error:
            raise self.error(f"{section}.{key}", str(error)) from None
        return text

    def boolean(self, table: Mapping[str, Any], section: str, key: str, default: bool) -> bool:
        value = table.get(key, default)
        if not isinstance(value, bool):
            raise self.error(f"{section}.{key}", f"must be true or false, not {value!r}")
        return value

    def integer(
        self, table: Mapping[str, Any], section: str, key: str, lowest: int, highest: int
    ) -> int | None:
        value = table.get(key)
        if value is None:
            return None
        if not isinstance(value, int) or isinstance(value, bool) or not lowest <= value <= highest:
            raise self.error(
                f"{section}.{key}", f"must be a whole number {lowest}-{highest}, not {value!r}"
            )
        return value


def _parse_portal(text: str) -> tuple[str, int]:
    """`ip:port` -> (ip, port); LIO binds portals to IP addresses, not host names."""
    host, port = parse_address(text)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"invalid portal {text!r}: use an IP address, not a host name") from None
    return host, port


def _parse_acl(reader: _Reader, key: str, table: object) -> ExportAcl:
    if not isinstance(table, dict):
        raise reader.error(key, 'must be a table ([[export.acls]] with initiator = "iqn...")')
    reader.check_keys(key, table, _ACL_KEYS)
    initiator = reader.string(table, key, "initiator", required=True)
    if not _INITIATOR.match(initiator):
        raise reader.error(
            f"{key}.initiator",
            f"invalid initiator name {initiator!r}: an iqn./eui./naa. name, lower case, "
            "no spaces or underscores",
        )
    userid = reader.string(table, key, "chap_userid", required=False) or None
    password = reader.string(table, key, "chap_password", required=False) or None
    if (userid is None) != (password is None):
        missing = "chap_password" if password is None else "chap_userid"
        raise reader.error(f"{key}.{missing}", "missing (CHAP needs a userid and a password)")
    for name, value in (("chap_userid", userid), ("chap_password", password)):
        if value is not None and (
            len(value) > CHAP_MAX or value != value.strip() or " " in value or value == "NULL"
        ):
            raise reader.error(f"{key}.{name}", f"must be 1-{CHAP_MAX} characters, no spaces")
    return ExportAcl(initiator, userid, password)


def _parse_export(reader: _Reader, table: Mapping[str, Any]) -> ExportSettings:
    reader.check_keys("export", table, _SECTIONS["export"])
    portals: list[tuple[str, int]] = []
    raw_portals = table.get("portals", [f"{DEFAULT_PORTAL[0]}:{DEFAULT_PORTAL[1]}"])
    if not isinstance(raw_portals, list) or not raw_portals:
        raise reader.error("export.portals", 'must be a non-empty list like ["0.0.0.0:3260"]')
    for index, text in enumerate(raw_portals):
        key = f"export.portals[{index}]"
        if not isinstance(text, str):
            raise reader.error(key, f'must be a string "ip:port", not {text!r}')
        try:
            portal = _parse_portal(text)
        except ValueError as error:
            raise reader.error(key, str(error)) from None
        if portal in portals:
            raise reader.error(key, f"portal {text} is listed twice")
        portals.append(portal)
    demo_mode = reader.boolean(table, "export", "demo_mode", False)
    raw_acls = table.get("acls", [])
    if not isinstance(raw_acls, list):
        raise reader.error("export.acls", "must be a list of tables ([[export.acls]])")
    acls = [_parse_acl(reader, f"export.acls[{i}]", t) for i, t in enumerate(raw_acls)]
    if demo_mode and acls:
        raise reader.error("export.acls", "demo mode lets any initiator in: give no ACLs with it")
    if not demo_mode and not acls:
        raise reader.error(
            "export.acls",
            "missing: list the initiators allowed in ([[export.acls]]), or set demo_mode = true "
            "(labs only)",
        )
    seen: set[str] = set()
    for index, acl in enumerate(acls):
        if acl.initiator in seen:
            raise reader.error(f"export.acls[{index}].initiator", f"{acl.initiator} has two ACLs")
        seen.add(acl.initiator)
    if len({acl.chap_userid is None for acl in acls}) > 1:
        raise reader.error(
            "export.acls", "either every ACL has CHAP credentials or none has (one TPG setting)"
        )
    workers = reader.integer(table, "export", "workers", 0, 64)
    hw_max_sectors = reader.integer(table, "export", "hw_max_sectors", 8, 65536)
    cmd_time_out = reader.integer(table, "export", "cmd_time_out", 0, 3600)
    return ExportSettings(
        portals=tuple(portals),
        demo_mode=demo_mode,
        acls=tuple(acls),
        workers=DEFAULT_EXPORT_WORKERS if workers is None else workers,
        hw_max_sectors=DEFAULT_HW_MAX_SECTORS if hw_max_sectors is None else hw_max_sectors,
        cmd_time_out=cmd_time_out,
    )


def parse(
    data: Mapping[str, Any], *, where: str = "<string>", base_dir: Path = Path()
) -> SiteSettings:
    """Validate parsed TOML into SiteSettings. Pure: checks no file."""
    reader = _Reader(data, where, base_dir)
    for name in data:
        if name not in _SECTIONS and name != "peers":
            known = ", ".join(f"[{s}]" for s in [*_SECTIONS, "peers.NAME"])
            raise ConfigError(f"config {where}: [{name}]: unknown section (known: {known})")

    site = reader.section("site", required=True)
    reader.check_keys("site", site, _SECTIONS["site"])
    name = reader.string(site, "site", "name", required=True)
    try:
        check_name("site", name)
    except InvalidArgument as error:
        raise reader.error("site.name", str(error)) from None
    state_dir = reader.path(site, "site", "state_dir", required=True)
    log_level = reader.string(site, "site", "log_level", required=False) or "info"
    if log_level.lower() not in LOG_LEVELS:
        raise reader.error("site.log_level", f"must be one of {', '.join(LOG_LEVELS)}")

    control = reader.section("control")
    reader.check_keys("control", control, _SECTIONS["control"])
    socket = reader.path(control, "control", "socket", required=False)
    if socket == Path():
        socket = DEFAULT_SOCKET_DIR / f"{name}.sock"
    if len(str(socket).encode()) > MAX_SOCKET_PATH:
        raise reader.error(
            "control.socket", f"path is longer than {MAX_SOCKET_PATH} bytes: {socket}"
        )
    tcp_address = reader.address(control, "control", "tcp_address", required=False, port_zero=True)

    replication = reader.section("replication", required=True)
    reader.check_keys("replication", replication, _SECTIONS["replication"])
    listen = reader.address(replication, "replication", "listen", required=True, port_zero=True)
    copy_rate = None
    if "copy_rate" in replication:
        copy_rate = reader.size(replication, "replication", "copy_rate", 0, allow_zero=True)
    tuning = ReplicationTuning(
        sync_timeout=reader.seconds(replication, "replication", "sync_timeout"),
        link_timeout=reader.seconds(replication, "replication", "link_timeout"),
        copy_rate_bytes=copy_rate,
        bulk_lane=reader.boolean(replication, "replication", "bulk_lane", True),
        bulk_lane_port=reader.integer(replication, "replication", "bulk_lane_port", 0, 65535) or 0,
    )

    tls_table = reader.section("tls")
    if not tls_table:
        raise ConfigError(
            f"config {where}: [tls]: missing section (site-to-site gRPC needs mutual TLS: "
            "ca, cert and key; `targetd-repl certs` makes them for labs)"
        )
    reader.check_keys("tls", tls_table, _SECTIONS["tls"])
    tls = TlsSettings(
        ca=reader.path(tls_table, "tls", "ca", required=True),
        cert=reader.path(tls_table, "tls", "cert", required=True),
        key=reader.path(tls_table, "tls", "key", required=True),
    )

    journal_table = reader.section("journal")
    reader.check_keys("journal", journal_table, _SECTIONS["journal"])
    journal = JournalSettings(
        size_limit=reader.size(journal_table, "journal", "size_limit", DEFAULT_JOURNAL_SIZE_LIMIT),
        segment_size=reader.size(
            journal_table, "journal", "segment_size", DEFAULT_JOURNAL_SEGMENT_SIZE
        ),
    )
    if journal.segment_size > journal.size_limit:
        raise reader.error(
            "journal.segment_size",
            f"{journal.segment_size} bytes is more than journal.size_limit "
            f"({journal.size_limit} bytes)",
        )

    peers: dict[str, PeerSettings] = {}
    peer_tables = reader.section("peers")
    for peer_name, table in peer_tables.items():
        key = f"peers.{peer_name}"
        if not isinstance(table, dict):
            raise reader.error(key, 'must be a table ([peers.NAME] with address = "host:port")')
        try:
            check_name("site", peer_name)
        except InvalidArgument as error:
            raise reader.error(key, str(error)) from None
        if peer_name == name:
            raise reader.error(key, "a site cannot be its own peer")
        reader.check_keys(key, table, frozenset({"address", "bulk_lane_address"}))
        address = reader.address(table, key, "address", required=True, port_zero=False)
        lane = reader.address(table, key, "bulk_lane_address", required=False, port_zero=False)
        peers[peer_name] = PeerSettings(peer_name, address, lane or None)

    export = None
    if "export" in data:
        export = _parse_export(reader, reader.section("export"))
    metrics = None
    if "metrics" in data:
        table = reader.section("metrics")
        reader.check_keys("metrics", table, _SECTIONS["metrics"])
        metrics = reader.address(table, "metrics", "listen", required=True, port_zero=True)

    return SiteSettings(
        name=name,
        state_dir=state_dir,
        control_socket=socket,
        replication_listen=listen,
        tls=tls,
        control_tcp_address=tcp_address or None,
        journal=journal,
        replication=tuning,
        peers=peers,
        log_level=log_level.lower(),
        export=export,
        metrics_listen=metrics,
    )


def parse_text(text: str, *, where: str = "<string>", base_dir: Path = Path()) -> SiteSettings:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"config {where}: invalid TOML: {error}") from None
    return parse(data, where=where, base_dir=base_dir)


def load(path: Path) -> SiteSettings:
    """Read and validate a site's configuration file, and check that its TLS files exist."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        raise ConfigError(f"config {path}: cannot read: {reason}") from None
    settings = parse_text(text, where=str(path), base_dir=path.resolve().parent)
    for key in ("ca", "cert", "key"):
        file = getattr(settings.tls, key)
        if not file.is_file():
            raise ConfigError(f"config {path}: tls.{key}: no such file: {file}")
    return replace(settings, source=path)
