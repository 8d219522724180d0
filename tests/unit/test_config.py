"""Unit tests of a site's settings (targetd_repl/config.py): parsing, defaults, and that every
bad configuration is one line naming the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from targetd_repl.config import (
    DEFAULT_EXPORT_WORKERS,
    DEFAULT_HW_MAX_SECTORS,
    DEFAULT_JOURNAL_SEGMENT_SIZE,
    DEFAULT_JOURNAL_SIZE_LIMIT,
    ConfigError,
    ExportAcl,
    ExportSettings,
    load,
    parse_address,
    parse_size,
    parse_text,
)

GOOD = """
[site]
name = "a"
state_dir = "state"

[replication]
listen = "127.0.0.1:0"

[tls]
ca = "certs/ca.pem"
cert = "certs/a.pem"
key = "certs/a.key"

[peers.b]
address = "127.0.0.1:7701"
"""


def test_good_config_with_defaults() -> None:
    s = parse_text(GOOD, where="site.toml", base_dir=Path("/etc/tr"))
    assert s.name == "a"
    assert s.state_dir == Path("/etc/tr/state")
    assert s.control_socket == Path("/run/targetd-repl/a.sock")
    assert s.control_tcp_address is None
    assert s.replication_listen == "127.0.0.1:0"
    assert s.tls.ca == Path("/etc/tr/certs/ca.pem")
    assert s.tls.key == Path("/etc/tr/certs/a.key")
    assert s.journal.size_limit == DEFAULT_JOURNAL_SIZE_LIMIT
    assert s.journal.segment_size == DEFAULT_JOURNAL_SEGMENT_SIZE
    assert dict(s.peers) == {"b": s.peers["b"]}
    assert s.peers["b"].address == "127.0.0.1:7701"
    assert s.log_level == "info"
    assert s.endpoints_file == Path("/etc/tr/state/endpoints.json")


def test_every_setting() -> None:
    s = parse_text(
        GOOD
        + """
[control]
socket = "/tmp/x/a.sock"
tcp_address = "[::1]:0"

[journal]
size_limit = "2G"
segment_size = 8388608
""".replace("[site]\n", '[site]\nlog_level = "DEBUG"\n'),
        where="site.toml",
    )
    assert s.control_socket == Path("/tmp/x/a.sock")
    assert s.control_tcp_address == "[::1]:0"
    assert s.journal.size_limit == 2 << 30
    assert s.journal.segment_size == 8 << 20
    assert s.replication.sync_timeout is None


def test_replication_tuning() -> None:
    s = parse_text(
        GOOD.replace(
            'listen = "127.0.0.1:0"',
            'listen = "127.0.0.1:0"\nsync_timeout = 2\nlink_timeout = 0.5\ncopy_rate = "100M"',
        )
    )
    assert s.replication.sync_timeout == 2.0
    assert s.replication.link_timeout == 0.5
    assert s.replication.copy_rate_bytes == 100 << 20
    unlimited = parse_text(
        GOOD.replace('listen = "127.0.0.1:0"', 'listen = "127.0.0.1:0"\ncopy_rate = 0')
    )
    assert unlimited.replication.copy_rate_bytes == 0


def test_bulk_lane_settings() -> None:
    default = parse_text(GOOD)
    assert default.replication.bulk_lane and default.replication.bulk_lane_port == 0
    assert default.peers["b"].bulk_lane_address is None
    s = parse_text(
        GOOD.replace(
            'listen = "127.0.0.1:0"',
            'listen = "127.0.0.1:0"\nbulk_lane = false\nbulk_lane_port = 7711',
        ).replace(
            'address = "127.0.0.1:7701"',
            'address = "127.0.0.1:7701"\nbulk_lane_address = "127.0.0.1:7712"',
        )
    )
    assert not s.replication.bulk_lane and s.replication.bulk_lane_port == 7711
    assert s.peers["b"].bulk_lane_address == "127.0.0.1:7712"
    for bad, message in [
        ("bulk_lane = 1", r"replication\.bulk_lane: must be true or false"),
        ("bulk_lane_port = 70000", r"replication\.bulk_lane_port: must be a whole number 0-65535"),
    ]:
        with pytest.raises(ConfigError, match=message):
            parse_text(GOOD.replace('listen = "127.0.0.1:0"', f'listen = "127.0.0.1:0"\n{bad}'))


@pytest.mark.parametrize(
    ("text", "value"),
    [("0", 0), ("4096", 4096), ("1K", 1024), ("1k", 1024), ("64M", 64 << 20), ("1G", 1 << 30),
     ("2T", 2 << 40), ("64MiB", 64 << 20), (" 3 G ", 3 << 30), (512, 512)],
)  # fmt: skip
def test_sizes(text: str | int, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "1X", "G", "-1", "1.5G", "1 GB x", "0x10"])
def test_bad_sizes(text: str) -> None:
    with pytest.raises(ValueError, match="invalid size"):
        parse_size(text)


def test_addresses() -> None:
    assert parse_address("127.0.0.1:7700") == ("127.0.0.1", 7700)
    assert parse_address("[::1]:7700") == ("::1", 7700)
    assert parse_address("site-b.example:1") == ("site-b.example", 1)
    assert parse_address("127.0.0.1:0", allow_port_zero=True) == ("127.0.0.1", 0)
    for bad in ("127.0.0.1", "127.0.0.1:0", ":7700", "host:99999", "::1:7700", "a b:1"):
        with pytest.raises(ValueError, match="invalid address"):
            parse_address(bad)


def _without(text: str, line: str) -> str:
    assert line in text
    return text.replace(line + "\n", "")


BAD: list[tuple[str, str]] = [
    ("[site\nname=1", r"^config site\.toml: invalid TOML: "),
    (GOOD.replace("[site]", "[sight]"), r"\[sight\]: unknown section"),
    (_without(GOOD, 'name = "a"'), r"^config site\.toml: site\.name: missing \(required\)$"),
    (GOOD.replace('name = "a"', 'name = "a/b"'), r"site\.name: invalid site name 'a/b'"),
    (GOOD.replace('name = "a"', "name = 7"), r"site\.name: must be a non-empty string, not 7"),
    (GOOD.replace('name = "a"', 'name = ""'), r"site\.name: must be a non-empty string"),
    (_without(GOOD, 'state_dir = "state"'), r"site\.state_dir: missing \(required\)"),
    (GOOD.replace('name = "a"', 'name = "a"\nnmae = "x"'), r"site\.nmae: unknown key \(known: "),
    (GOOD.replace('name = "a"', 'name = "a"\nlog_level = "loud"'), r"site\.log_level: must be one"),
    (GOOD.replace("[replication]\n", "").replace('listen = "127.0.0.1:0"\n', ""),
     r"\[replication\]: missing section"),
    (GOOD.replace('listen = "127.0.0.1:0"', 'listen = "127.0.0.1"'),
     r"replication\.listen: invalid address '127\.0\.0\.1': use host:port"),
    (GOOD.replace('listen = "127.0.0.1:0"', 'listen = "127.0.0.1:70000"'),
     r"replication\.listen: invalid address .*port must be 0-65535"),
    (GOOD.replace('listen = "127.0.0.1:0"', 'listen = "127.0.0.1:0"\nport = 1'),
     r"replication\.port: unknown key"),
    (GOOD.replace("[tls]", "[tls_]"), r"\[tls_\]: unknown section"),
    (GOOD.replace('[tls]\nca = "certs/ca.pem"\ncert = "certs/a.pem"\nkey = "certs/a.key"\n', ""),
     r"\[tls\]: missing section \(site-to-site gRPC needs mutual TLS"),
    (_without(GOOD, 'key = "certs/a.key"'), r"tls\.key: missing \(required\)"),
    (GOOD.replace('address = "127.0.0.1:7701"', 'address = "127.0.0.1:0"'),
     r"peers\.b\.address: invalid address '127\.0\.0\.1:0': port must be 1-65535"),
    (GOOD.replace('address = "127.0.0.1:7701"', ""), r"peers\.b\.address: missing \(required\)"),
    (GOOD.replace("[peers.b]", "[peers.a]"), r"peers\.a: a site cannot be its own peer"),
    (GOOD.replace("[peers.b]", '[peers."b c"]'), r"peers\.b c: invalid site name 'b c'"),
    (GOOD.replace('address = "127.0.0.1:7701"', 'address = "127.0.0.1:7701"\nport = 2'),
     r"peers\.b\.port: unknown key \(known: address, bulk_lane_address\)"),
    (GOOD.replace('[peers.b]\naddress = "127.0.0.1:7701"', '[peers]\nb = "127.0.0.1:7701"'),
     r"peers\.b: must be a table"),
    (GOOD.replace('listen = "127.0.0.1:0"', 'listen = "127.0.0.1:0"\nsync_timeout = 0'),
     r"replication\.sync_timeout: must be a positive number of seconds, not 0"),
    (GOOD.replace('listen = "127.0.0.1:0"', 'listen = "127.0.0.1:0"\nlink_timeout = "5s"'),
     r"replication\.link_timeout: must be a positive number of seconds, not '5s'"),
    (GOOD.replace('listen = "127.0.0.1:0"', 'listen = "127.0.0.1:0"\ncopy_rate = "fast"'),
     r"replication\.copy_rate: invalid size 'fast'"),
    (GOOD + "[journal]\nsize_limit = \"1X\"\n",
     r"journal\.size_limit: invalid size '1X': use a number with an optional K, M, G or T"),
    (GOOD + "[journal]\nsize_limit = 0\n", r"journal\.size_limit: must be positive"),
    (GOOD + "[journal]\nsize_limit = 1.5\n", r"journal\.size_limit: must be a size like"),
    (GOOD + '[journal]\nsize_limit = "1M"\nsegment_size = "2M"\n',
     r"journal\.segment_size: 2097152 bytes is more than journal\.size_limit"),
    (GOOD + '[control]\nsocket = "/' + "x" * 120 + '.sock"\n',
     r"control\.socket: path is longer than 107 bytes"),
    (GOOD + '[control]\ntcp_address = "localhost"\n', r"control\.tcp_address: invalid address"),
    ("site = 1\n", r"^config site\.toml: site: must be a table"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "pattern"), BAD)
def test_bad_config_is_one_line_naming_the_key(text: str, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern) as caught:
        parse_text(text, where="site.toml")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("config site.toml: ")


def _write_site(tmp_path: Path, text: str = GOOD) -> Path:
    (tmp_path / "certs").mkdir()
    for name in ("ca.pem", "a.pem", "a.key"):
        (tmp_path / "certs" / name).write_text("-----BEGIN X-----\n")
    path = tmp_path / "site.toml"
    path.write_text(text)
    return path


def test_load_resolves_relative_paths_against_the_file(tmp_path: Path) -> None:
    path = _write_site(tmp_path)
    s = load(path)
    assert s.state_dir == tmp_path / "state"
    assert s.tls.cert == tmp_path / "certs" / "a.pem"
    assert s.source == path


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^config .*nope\.toml: cannot read: No such file"):
        load(tmp_path / "nope.toml")


def test_load_missing_tls_file(tmp_path: Path) -> None:
    path = _write_site(tmp_path)
    (tmp_path / "certs" / "a.key").unlink()
    with pytest.raises(ConfigError, match=r"tls\.key: no such file: .*a\.key$"):
        load(path)


# --- [export] ------------------------------------------------------------------------------------


def test_no_export_section_means_no_export() -> None:
    assert parse_text(GOOD).export is None


def test_export_demo_mode_with_defaults() -> None:
    s = parse_text(GOOD + "[export]\ndemo_mode = true\n")
    assert s.export == ExportSettings(
        portals=(("0.0.0.0", 3260),),
        demo_mode=True,
        acls=(),
        workers=DEFAULT_EXPORT_WORKERS,
        hw_max_sectors=DEFAULT_HW_MAX_SECTORS,
        cmd_time_out=None,
    )


def test_export_every_setting() -> None:
    s = parse_text(
        GOOD
        + """
[export]
portals = ["192.0.2.10:3260", "[2001:db8::1]:3261"]
workers = 0
hw_max_sectors = 256
cmd_time_out = 90

[[export.acls]]
initiator = "iqn.1993-08.org.debian:01:host1"
chap_userid = "host1"
chap_password = "secret-one"

[[export.acls]]
initiator = "iqn.1991-05.com.microsoft:win1"
chap_userid = "win1"
chap_password = "secret-two"
"""
    )
    assert s.export is not None
    assert s.export.portals == (("192.0.2.10", 3260), ("2001:db8::1", 3261))
    assert not s.export.demo_mode
    assert (s.export.workers, s.export.hw_max_sectors, s.export.cmd_time_out) == (0, 256, 90)
    assert s.export.acls == (
        ExportAcl("iqn.1993-08.org.debian:01:host1", "host1", "secret-one"),
        ExportAcl("iqn.1991-05.com.microsoft:win1", "win1", "secret-two"),
    )
    assert "secret" not in repr(s.export)  # passwords stay out of logs


def test_export_acl_without_chap() -> None:
    s = parse_text(GOOD + '[[export.acls]]\ninitiator = "iqn.2020-01.org.example:h"\n')
    assert s.export is not None
    assert s.export.acls == (ExportAcl("iqn.2020-01.org.example:h"),)


_ACL = '[[export.acls]]\ninitiator = "iqn.2020-01.org.example:h"\n'
BAD_EXPORT: list[tuple[str, str]] = [
    ("[export]\n", r"export\.acls: missing: list the initiators allowed in"),
    ("[export]\ndemo_mode = 1\n", r"export\.demo_mode: must be true or false, not 1"),
    ("[export]\ndemo_mode = true\nportal = 1\n", r"export\.portal: unknown key \(known: "),
    ("[export]\ndemo_mode = true\nportals = []\n", r"export\.portals: must be a non-empty list"),
    ("[export]\ndemo_mode = true\nportals = \"0.0.0.0:3260\"\n",
     r"export\.portals: must be a non-empty list"),
    ("[export]\ndemo_mode = true\nportals = [\"0.0.0.0\"]\n",
     r"export\.portals\[0\]: invalid address '0\.0\.0\.0': use host:port"),
    ("[export]\ndemo_mode = true\nportals = [\"san.example:3260\"]\n",
     r"export\.portals\[0\]: invalid portal 'san\.example:3260': use an IP address"),
    ("[export]\ndemo_mode = true\nportals = [\"0.0.0.0:0\"]\n",
     r"export\.portals\[0\]: invalid address .*port must be 1-65535"),
    ("[export]\ndemo_mode = true\nportals = [\"0.0.0.0:3260\", \"0.0.0.0:3260\"]\n",
     r"export\.portals\[1\]: portal 0\.0\.0\.0:3260 is listed twice"),
    ("[export]\ndemo_mode = true\nportals = [3260]\n", r"export\.portals\[0\]: must be a string"),
    ("[export]\ndemo_mode = true\nworkers = -1\n", r"export\.workers: must be a whole number 0-64"),
    ("[export]\ndemo_mode = true\nworkers = 2.5\n", r"export\.workers: must be a whole number"),
    ("[export]\ndemo_mode = true\nhw_max_sectors = 4\n", r"export\.hw_max_sectors: must be"),
    ("[export]\ndemo_mode = true\ncmd_time_out = true\n", r"export\.cmd_time_out: must be a whole"),
    ("[export]\ndemo_mode = true\n" + _ACL, r"export\.acls: demo mode lets any initiator in"),
    ("[export]\nacls = 1\n", r"export\.acls: must be a list of tables"),
    ('[[export.acls]]\ninitiator = "Host1"\n',
     r"export\.acls\[0\]\.initiator: invalid initiator name 'Host1'"),
    ('[[export.acls]]\ninitiator = "iqn.2020-01.org.example:my_host"\n',
     r"export\.acls\[0\]\.initiator: invalid initiator name"),
    ("[[export.acls]]\nchap_userid = \"u\"\n", r"export\.acls\[0\]\.initiator: missing"),
    (_ACL + 'chap_userid = "u"\n',
     r"export\.acls\[0\]\.chap_password: missing \(CHAP needs a userid and a password\)"),
    (_ACL + 'chap_password = "p"\n', r"export\.acls\[0\]\.chap_userid: missing"),
    (_ACL + 'chap_userid = "u"\nchap_password = "two words"\n',
     r"export\.acls\[0\]\.chap_password: must be 1-255 characters, no spaces"),
    (_ACL + 'chap_user = "u"\n', r"export\.acls\[0\]\.chap_user: unknown key"),
    (_ACL + _ACL, r"export\.acls\[1\]\.initiator: iqn\.2020-01\.org\.example:h has two ACLs"),
    (_ACL + 'chap_userid = "u"\nchap_password = "p"\n'
     + '[[export.acls]]\ninitiator = "iqn.2020-01.org.example:g"\n',
     r"export\.acls: either every ACL has CHAP credentials or none has"),
]  # fmt: skip


@pytest.mark.parametrize(("section", "pattern"), BAD_EXPORT)
def test_bad_export_is_one_line_naming_the_key(section: str, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern) as caught:
        parse_text(GOOD + section, where="site.toml")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("config site.toml: ")


def test_metrics_endpoint() -> None:
    assert parse_text(GOOD).metrics_listen is None
    s = parse_text(GOOD + '\n[metrics]\nlisten = "127.0.0.1:9477"\n')
    assert s.metrics_listen == "127.0.0.1:9477"
    with pytest.raises(ConfigError, match=r"metrics\.listen: missing \(required\)"):
        parse_text(GOOD + "\n[metrics]\n")
    with pytest.raises(ConfigError, match=r"metrics\.port: unknown key"):
        parse_text(GOOD + '\n[metrics]\nlisten = "127.0.0.1:0"\nport = 1\n')
