"""Unit tests of the CLI's arguments (targetd_repl/cli.py): a bad command line is one line on
stderr and exit 2, before any site is contacted; a good one reaches the control API with the
values it names. The control API is faked here only to see those values; everything a site
answers is tested against real controllers in tests/integration/."""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from targetd_repl import cli, config
from targetd_repl.model import PairMode
from targetd_repl.replication.settings import FencePolicy


class FakeClient:
    """Records the control API calls a command makes; answers nothing useful."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def __getattr__(self, name: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls.append((name, args, kwargs))
            raise _Stop

        return call

    def close(self) -> None:
        pass


class _Stop(Exception):
    pass


def run(argv: Sequence[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    def never(args: argparse.Namespace) -> Any:
        raise AssertionError("a bad command line must not contact a site")

    try:
        code = cli.main(list(argv), connect_with=never)
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def reach(
    argv: Sequence[str],
) -> tuple[argparse.Namespace, tuple[str, tuple[Any, ...], dict[str, Any]]]:
    """Run a good command line against the fake; return its arguments and its first call."""
    fake = FakeClient()
    seen: list[argparse.Namespace] = []

    def connect(args: argparse.Namespace) -> FakeClient:
        seen.append(args)
        return fake

    with pytest.raises(_Stop):
        cli.main(list(argv), connect_with=connect)
    return seen[0], fake.calls[0]


BAD: list[tuple[list[str], str]] = [
    ([], r"^targetd-repl: the following arguments are required: COMMAND"),
    (["volume"], r"^targetd-repl volume: the following arguments are required: ACTION"),
    (["frobnicate"], r"^targetd-repl: argument COMMAND: invalid choice: 'frobnicate'"),
    (["volume", "create", "v"],
     r"^targetd-repl volume create: the following arguments are required: --size"),
    (["volume", "create", "v", "--size", "1X"],
     r"^targetd-repl volume create: argument --size: invalid size '1X': use a number"),
    (["volume", "create", "v", "--size", "0"],
     r"^targetd-repl volume create: argument --size: invalid size '0': must be positive"),
    (["volume", "create", "v", "--size", "-5"],
     r"argument --size: (invalid size|expected one argument)"),
    (["volume", "create", "v", "--size", "1G", "--block-size", "1024"],
     r"argument --block-size: invalid choice: '?1024'? \(choose from '?512'?, '?4096'?\)"),
    (["volume", "resize", "v", "--size", "1.5G"], r"argument --size: invalid size '1\.5G'"),
    (["volume", "delete"], r"the following arguments are required: name"),
    (["group", "add", "g"], r"the following arguments are required: volume"),
    (["pair", "create", "g", "--peer", "b"], r"the following arguments are required: --mode"),
    (["pair", "create", "g", "--peer", "b", "--mode", "semi"],
     r"argument --mode: invalid choice: 'semi' \(choose from '?async'?, '?sync'?\)"),
    (["pair", "create", "g", "--peer", "b", "--mode", "sync", "--fence", "maybe"],
     r"argument --fence: invalid choice: 'maybe'"),
    (["pair", "status", "--until", "happy"], r"argument --until: invalid choice: 'happy'"),
    (["pair", "status", "--interval", "0", "--watch"], r"--interval must be positive"),
    (["pair", "status", "--wait-timeout", "5"], r"--wait-timeout goes with --until"),
    (["io", "write", "v", "--offset", "0"],
     r"one of the arguments --data-file --pattern is required"),
    (["io", "write", "v", "--offset", "0", "--pattern", "7"],
     r"^targetd-repl io write: --pattern needs --length"),
    (["io", "write", "v", "--offset", "0", "--pattern", "256", "--length", "4K"],
     r"argument --pattern: invalid byte '256': use 0-255 or 0x00-0xff"),
    (["io", "write", "v", "--offset", "0", "--pattern", "zz", "--length", "4K"],
     r"invalid byte 'zz'"),
    (["io", "write", "v", "--offset", "0", "--data-file", "f", "--pattern", "1"],
     r"argument --pattern: not allowed with argument --data-file"),
    (["io", "write", "v", "--offset", "0", "--data-file", "f", "--length", "4K"],
     r"--length goes with --pattern, not --data-file"),
    (["io", "write", "v", "--offset", "x", "--pattern", "1", "--length", "1"],
     r"argument --offset: invalid size 'x'"),
    (["io", "read", "v", "--offset", "0"], r"the following arguments are required: --length"),
    (["io", "read", "v", "--offset", "0", "--length", "0"], r"argument --length: invalid size '0'"),
    (["site", "set-peer", "b", "nowhere"], r"argument HOST:PORT: invalid address 'nowhere'"),
    (["--timeout", "0", "volume", "list"], r"--timeout must be positive"),
    (["volume", "list", "--timeout", "soon"], r"argument --timeout: invalid float value: 'soon'"),
    (["volume", "list", "--address", "x"], r"argument --address: invalid address 'x'"),
    (["serve"], r"^targetd-repl serve: the following arguments are required: --config"),
    (["certs", "--out", "d", "--sites", "a,a"], r"argument --sites: a site is named twice"),
    (["certs", "--out", "d", "--sites", "a,b/c"], r"argument --sites: invalid site name 'b/c'"),
    (["certs", "--out", "d", "--sites", ","], r"argument --sites: name at least one site"),
    (["bench", "nope"], r"argument name: invalid choice: 'nope'"),
]  # fmt: skip


@pytest.mark.parametrize(("argv", "pattern"), BAD, ids=[" ".join(a) or "-" for a, _ in BAD])
def test_bad_arguments_are_one_line_and_exit_2(
    argv: list[str], pattern: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(argv, capsys)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1, err
    assert err.startswith("targetd-repl")
    assert "Traceback" not in err
    assert re.search(pattern, err), err


def test_address_without_site_config_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["volume", "list", "--address", "127.0.0.1:1"])
    err = capsys.readouterr().err
    assert code == 2
    assert err == "targetd-repl: --address needs --site-config (its [tls] files authenticate us)\n"


def test_no_site_named_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(config, "DEFAULT_SOCKET_DIR", tmp_path / "none")
    code = cli.main(["volume", "list"])
    assert code == 2
    assert capsys.readouterr().err == (
        "targetd-repl: name the site: --socket PATH or --site-config FILE\n"
    )


def test_bad_site_config_is_one_line_exit_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "site.toml"
    path.write_text("[site]\nname = 'a'\n")
    for argv in (["volume", "list", "--site-config", str(path)], ["serve", "--config", str(path)]):
        code = cli.main(argv)
        err = capsys.readouterr().err
        assert code == 2
        assert err == f"targetd-repl: config {path}: site.state_dir: missing (required)\n"


def test_unreachable_socket_is_one_line_exit_1(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code = cli.main(["--timeout", "2", "volume", "list", "--socket", str(tmp_path / "no.sock")])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith(f"targetd-repl: cannot reach the site at unix:{tmp_path}/no.sock")
    assert err.count("\n") == 1


def test_sizes_and_options_reach_the_api() -> None:
    args, call = reach(["volume", "create", "v1", "--size", "1G", "--block-size", "4096",
                        "--group", "g", "--socket", "/s"])  # fmt: skip
    assert call == ("create_volume", ("v1", 1 << 30), {"block_size": 4096, "group": "g"})
    assert args.socket == "/s"
    assert args.json is False

    _, call = reach(["volume", "resize", "v1", "--size", "512M"])
    assert call == ("resize_volume", ("v1", 512 << 20), {})

    _, call = reach(["pair", "create", "g", "--peer", "b", "--mode", "sync"])
    assert call == ("create_pair", ("g", "b", PairMode.SYNC, FencePolicy.NONE), {})
    _, call = reach(
        ["pair", "create", "g", "--peer", "b", "--mode", "sync", "--fence", "fail-writes"]
    )
    assert call == ("create_pair", ("g", "b", PairMode.SYNC, FencePolicy.FAIL_WRITES), {})

    _, call = reach(["io", "read", "v1", "--offset", "4K", "--length", "1M"])
    assert call == ("read", ("v1", 4096, 1 << 20), {})

    _, call = reach(["io", "write", "v1", "--offset", "8K", "--pattern", "0xab", "--length", "1K"])
    assert call == ("write", ("v1", 8192, b"\xab" * 1024), {})

    _, call = reach(["group", "add", "g", "v1"])
    assert call == ("add_volume", ("g", "v1"), {})


def test_site_options_before_or_after_the_subcommand() -> None:
    before, _ = reach(["--json", "--socket", "/a", "--timeout", "5", "volume", "list"])
    after, _ = reach(["volume", "list", "--json", "--socket", "/a", "--timeout", "5"])
    for args in (before, after):
        assert (args.json, args.socket, args.timeout) == (True, "/a", 5.0)
    mixed, _ = reach(["--socket", "/a", "volume", "list", "--json"])
    assert (mixed.json, mixed.socket, mixed.timeout) == (True, "/a", cli.DEFAULT_TIMEOUT)


def test_io_write_data_file(tmp_path: Path) -> None:
    data = tmp_path / "blob"
    data.write_bytes(b"x" * 512)
    _, call = reach(["io", "write", "v", "--offset", "0", "--data-file", str(data)])
    assert call == ("write", ("v", 0, b"x" * 512), {})


def test_io_write_missing_data_file_is_one_line_exit_1(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code = cli.main(
        ["io", "write", "v", "--offset", "0", "--data-file", str(tmp_path / "nope")],
        connect_with=lambda args: FakeClient(),
    )
    assert code == 1
    assert capsys.readouterr().err == (
        f"targetd-repl: cannot read {tmp_path / 'nope'}: No such file or directory\n"
    )
