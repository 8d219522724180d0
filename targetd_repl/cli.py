"""The `targetd-repl` command line.

Subcommands that act on a site (volume, group, pair, io, site) speak the control API only
(cli_commands.py over api/client.py), found with `--socket PATH`, `--site-config FILE` (its
control socket), or `--address HOST:PORT` with `--site-config` (TCP with mutual TLS, the
site's TLS files); without any, the one socket in /run/targetd-repl/. Every call has a deadline
(`--timeout`). Output is a human table, or JSON with `--json`.

`serve` runs a site's controller (daemon.py), `certs` makes lab certificates, `bench` runs the
benchmarks of bench/ locally.

Exit status: 0 done; 1 the site (or the local side) refused or failed, with one line on stderr
(`targetd-repl: volume 'x' not found`); 2 bad arguments or a bad configuration, with one line.
Never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from targetd_repl import __version__, config
from targetd_repl import cli_commands as commands
from targetd_repl.api.client import ControlClient
from targetd_repl.errors import InvalidArgument, TargetdReplError
from targetd_repl.model import PairMode, PairState, check_name
from targetd_repl.replication.settings import FencePolicy

BenchResult = dict[str, Any]
Connect = Callable[[argparse.Namespace], Any]

PROG = "targetd-repl"
DEFAULT_TIMEOUT = 30.0

# bench name -> modules of bench/ (package targetd_repl_bench) whose run() results are merged.
BENCHES: dict[str, tuple[str, ...]] = {
    "journal": ("journal", "snapshot"),
    "datapath": ("datapath",),
    "replication": ("replication",),
    "roles": ("roles",),
}


class UsageError(Exception):
    """Arguments that parse but do not fit together: exit 2 with one line."""


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (`targetd-repl volume create: ...`), exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


# --- argument types -------------------------------------------------------------------------------


def size_arg(text: str) -> int:
    """A positive size: bytes or K/M/G/T suffix."""
    value = offset_arg(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: must be positive")
    return value


def offset_arg(text: str) -> int:
    """A byte count or offset (0 allowed): bytes or K/M/G/T suffix."""
    try:
        return config.parse_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def byte_arg(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        value = -1
    if not 0 <= value <= 255:
        raise argparse.ArgumentTypeError(f"invalid byte {text!r}: use 0-255 or 0x00-0xff")
    return value


def address_arg(text: str) -> str:
    try:
        config.parse_address(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def sites_arg(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("name at least one site: --sites a,b")
    try:
        for name in names:
            check_name("site", name)
    except InvalidArgument as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"a site is named twice in {text!r}")
    return names


def source_extent_arg(text: str) -> tuple[str, int, int]:
    """VOLUME or VOLUME:OFFSET+LENGTH (sizes with K/M/G/T); LENGTH 0 means to the end."""
    name, _, extent = text.partition(":")
    try:
        check_name("volume", name)
    except InvalidArgument as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    if not extent:
        return name, 0, 0
    offset, plus, length = extent.partition("+")
    if not plus:
        raise argparse.ArgumentTypeError(f"invalid extent {text!r}: use VOLUME:OFFSET+LENGTH")
    return name, offset_arg(offset), size_arg(length)


def target_extent_arg(text: str) -> tuple[str, str, int]:
    """SITE:VOLUME or SITE:VOLUME:OFFSET."""
    parts = text.split(":")
    if len(parts) not in (2, 3):
        raise argparse.ArgumentTypeError(f"invalid target {text!r}: use SITE:VOLUME[:OFFSET]")
    try:
        check_name("site", parts[0])
        check_name("volume", parts[1])
    except InvalidArgument as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return parts[0], parts[1], offset_arg(parts[2]) if len(parts) == 3 else 0


# --- connecting -----------------------------------------------------------------------------------


def connect(args: argparse.Namespace) -> ControlClient:
    """The ControlClient the arguments name (see the module docstring)."""
    settings = config.load(Path(args.site_config)) if args.site_config else None
    if args.address:
        if settings is None:
            raise UsageError("--address needs --site-config (its [tls] files authenticate us)")
        tls = settings.tls
        return ControlClient.for_tcp(
            args.address,
            ca=tls.ca.read_bytes(),
            cert=tls.cert.read_bytes(),
            key=tls.key.read_bytes(),
            server_name=settings.name,
            timeout=args.timeout,
        )
    if args.socket:
        return ControlClient.for_socket(args.socket, timeout=args.timeout)
    if settings is not None:
        return ControlClient.for_socket(settings.control_socket, timeout=args.timeout)
    sockets = (
        sorted(config.DEFAULT_SOCKET_DIR.glob("*.sock"))
        if config.DEFAULT_SOCKET_DIR.is_dir()
        else []
    )
    if len(sockets) == 1:
        return ControlClient.for_socket(sockets[0], timeout=args.timeout)
    raise UsageError(
        "name the site: --socket PATH or --site-config FILE"
        + (f" ({len(sockets)} sockets in {config.DEFAULT_SOCKET_DIR})" if sockets else "")
    )


# --- local commands -------------------------------------------------------------------------------


def _run_bench(args: argparse.Namespace) -> int:
    result: BenchResult = {"bench": args.name}
    for module_name in BENCHES[args.name]:
        module = importlib.import_module(f"targetd_repl_bench.{module_name}")
        run: Callable[..., BenchResult] = module.run
        result.update(run(quick=args.quick))
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        width = max(len(key) for key in result)
        for key, value in sorted(result.items()):
            shown = f"{value:.3f}" if isinstance(value, float) else str(value)
            print(f"{key:<{width}}  {shown}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    settings = config.load(Path(args.config))  # a bad file: exit 2 before anything starts
    # The daemon pulls in storage and replication: only `serve` needs them.
    from targetd_repl import daemon  # noqa: PLC0415

    return daemon.serve(settings)


def _certs(args: argparse.Namespace) -> int:
    """A lab CA and one certificate per site (replication/certs.py)."""
    from targetd_repl.replication import certs  # noqa: PLC0415 - cryptography: only here

    out = Path(args.out)
    made = certs.make_lab(out, tuple(args.sites))
    document = {
        "ca": str(out / "ca.pem"),
        "sites": {
            site: {"cert": str(files.cert), "key": str(files.key)} for site, files in made.items()
        },
    }
    if args.json:
        print(json.dumps(document, sort_keys=True))
    else:
        print(f"CA {document['ca']} (its key: {out / 'ca.key'})")
        for site, files in made.items():
            print(f"site {site}: {files.cert}, key {files.key}")
    return 0


# --- the parser -----------------------------------------------------------------------------------


def _add_site_options(parser: Parser, *, top: bool) -> None:
    """Options of every site command, accepted before or after the subcommand. Below the top
    level their default is SUPPRESS, so a subcommand does not reset what came before it."""

    def default(value: object) -> object:
        return value if top else argparse.SUPPRESS

    group = parser.add_argument_group("site")
    group.add_argument("--socket", metavar="PATH", default=default(None), help="control socket")
    group.add_argument(
        "--site-config",
        metavar="FILE",
        default=default(None),
        help="the site's configuration (its control socket and TLS files)",
    )
    group.add_argument(
        "--address",
        metavar="HOST:PORT",
        type=address_arg,
        default=default(None),
        help="control API over TCP with mutual TLS (needs --site-config)",
    )
    group.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=float,
        default=default(DEFAULT_TIMEOUT),
        help=f"deadline of each call (default {DEFAULT_TIMEOUT:g})",
    )
    group.add_argument(
        "--json", action="store_true", default=default(False), help="print JSON documents"
    )


def _add(
    commands_: argparse._SubParsersAction[Parser],
    name: str,
    help_: str,
    handler: commands.Handler,
    site: Parser,
) -> Parser:
    parser = commands_.add_parser(name, help=help_, description=help_, parents=[site])
    parser.set_defaults(site_handler=handler)
    return parser


def build_parser() -> Parser:
    parser = Parser(prog=PROG, description="Two-site block replication for Linux iSCSI.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    _add_site_options(parser, top=True)
    site = Parser(add_help=False)
    _add_site_options(site, top=False)
    top = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=Parser
    )

    # volume
    volume = top.add_parser("volume", help="create, list, resize, delete volumes")
    vcmd = volume.add_subparsers(
        dest="action", required=True, metavar="ACTION", parser_class=Parser
    )
    p = _add(vcmd, "create", "create a volume", commands.volume_create, site)
    p.add_argument("name")
    p.add_argument("--size", type=size_arg, required=True, help="bytes, or with K/M/G/T")
    p.add_argument("--block-size", type=int, choices=(512, 4096), default=512)
    p.add_argument("--group", help="an existing group (default: a new group named NAME)")
    p = _add(vcmd, "list", "list volumes", commands.volume_list, site)
    p.add_argument("--group", help="only the volumes of this group")
    p = _add(vcmd, "resize", "resize a volume (unpaired)", commands.volume_resize, site)
    p.add_argument("name")
    p.add_argument("--size", type=size_arg, required=True, help="the new size")
    p = _add(vcmd, "delete", "delete a volume", commands.volume_delete, site)
    p.add_argument("name")

    # group
    group = top.add_parser("group", help="create and list consistency groups, add volumes")
    gcmd = group.add_subparsers(dest="action", required=True, metavar="ACTION", parser_class=Parser)
    p = _add(gcmd, "create", "create an empty group", commands.group_create, site)
    p.add_argument("name")
    p = _add(gcmd, "add", "move a volume into a group", commands.group_add, site)
    p.add_argument("group")
    p.add_argument("volume")
    _add(gcmd, "list", "list groups", commands.group_list, site)

    # pair
    pair = top.add_parser("pair", help="replicate groups to a peer site")
    pcmd = pair.add_subparsers(dest="action", required=True, metavar="ACTION", parser_class=Parser)
    p = _add(
        pcmd, "create", "pair a group with the same group at a peer", commands.pair_create, site
    )
    p.add_argument("group")
    p.add_argument("--peer", required=True, metavar="SITE", help="the peer site")
    p.add_argument("--mode", required=True, choices=[m.value for m in PairMode])
    p.add_argument(
        "--fence",
        choices=[f.value for f in FencePolicy],
        default=FencePolicy.NONE.value,
        help="sync pairs, peer unreachable: none = suspended-error and writes go on locally "
        "(default); fail-writes = writes fail until the peer is back",
    )
    p = _add(pcmd, "status", "show pairs (one GROUP, or all)", commands.pair_status, site)
    p.add_argument("group", nargs="?")
    p.add_argument("--watch", action="store_true", help="refresh until interrupted")
    p.add_argument("--interval", type=float, default=1.0, metavar="SECONDS")
    p.add_argument(
        "--until",
        choices=[s.value for s in PairState],
        help="watch until every pair shown is in this state, then exit 0",
    )
    p.add_argument(
        "--wait-timeout",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="with --until: give up (exit 1) after this long (default: never)",
    )
    for name, handler, help_ in (
        ("suspend", commands.pair_suspend, "split a pair (both sides track changes)"),
        ("resume", commands.pair_resume, "resync and rejoin a suspended pair"),
        ("delete", commands.pair_delete, "dissolve a pair; the group stays unpaired"),
    ):
        p = _add(pcmd, name, help_, handler, site)
        p.add_argument("group")

    # io
    io = top.add_parser("io", help="write or read a volume through the site's I/O entry point")
    icmd = io.add_subparsers(dest="action", required=True, metavar="ACTION", parser_class=Parser)
    p = _add(icmd, "write", "write bytes at an offset", commands.io_write, site)
    p.add_argument("volume")
    p.add_argument("--offset", type=offset_arg, required=True, help="bytes, or with K/M/G/T")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data-file", metavar="FILE", help="write this file's bytes")
    source.add_argument("--pattern", type=byte_arg, metavar="BYTE", help="write this byte ...")
    p.add_argument("--length", type=size_arg, help="... this many times (with --pattern)")
    p = _add(icmd, "read", "read bytes at an offset", commands.io_read, site)
    p.add_argument("volume")
    p.add_argument("--offset", type=offset_arg, required=True)
    p.add_argument("--length", type=size_arg, required=True)
    p.add_argument("--out", metavar="FILE", help="write the bytes here (default: stdout)")

    # site
    site_cmd = top.add_parser("site", help="this site and its peers")
    scmd = site_cmd.add_subparsers(
        dest="action", required=True, metavar="ACTION", parser_class=Parser
    )
    _add(scmd, "info", "who and where the site is", commands.site_info, site)
    p = _add(
        scmd,
        "set-peer",
        "point the site at a peer's replication address",
        commands.site_set_peer,
        site,
    )
    p.add_argument("name", metavar="SITE")
    p.add_argument("peer_address", type=address_arg, metavar="HOST:PORT")

    # snapshots
    snapshot = top.add_parser("snapshot", help="create, list, delete, roll back snapshots")
    ncmd = snapshot.add_subparsers(
        dest="action", required=True, metavar="ACTION", parser_class=Parser
    )
    p = _add(ncmd, "create", "snapshot a volume now", commands.snapshot_create, site)
    p.add_argument("volume")
    p.add_argument("name")
    p = _add(ncmd, "list", "list snapshots (of one VOLUME, or all)", commands.snapshot_list, site)
    p.add_argument("volume", nargs="?")
    p = _add(ncmd, "delete", "delete a snapshot", commands.snapshot_delete, site)
    p.add_argument("volume")
    p.add_argument("name")
    p.add_argument(
        "--force", action="store_true", help="also a snapshot a role change made (it keeps data)"
    )
    p = _add(ncmd, "rollback", "roll a volume back to a snapshot", commands.snapshot_rollback, site)
    p.add_argument("volume")
    p.add_argument("name")

    # role changes
    for name, handler, help_ in (
        (
            "failover",
            commands.failover,
            "promote this site (the secondary) when the primary is gone",
        ),
        (
            "failback",
            commands.failback,
            "after a failover: resync the returning old primary (only what differs) as secondary",
        ),
        (
            "switchover",
            commands.switchover,
            "planned: make this site (the secondary) primary now, whatever the backlog",
        ),
        (
            "resolve",
            commands.resolve,
            "after a split-brain: keep one site's data, save and resync the other's",
        ),
    ):
        p = _add(top, name, help_, handler, site)
        p.add_argument("group")
        if name == "failover":
            p.add_argument(
                "--force",
                action="store_true",
                help="also while the primary answers (it is fenced when it next connects)",
            )
        if name == "resolve":
            p.add_argument("--survivor", required=True, metavar="SITE", help="the site to keep")
        p.add_argument("--no-wait", action="store_true", help="return once started; do not follow")
        p.add_argument(
            "--wait-timeout",
            type=float,
            default=0.0,
            metavar="SECONDS",
            help="stop following after this long (exit 1; the role change goes on)",
        )
        p.add_argument("--interval", type=float, default=0.5, metavar="SECONDS")
    role = top.add_parser("role", help="the role change of a group at this site")
    rcmd = role.add_subparsers(dest="action", required=True, metavar="ACTION", parser_class=Parser)
    p = _add(rcmd, "status", "the role change running or last run", commands.role_status, site)
    p.add_argument("group")

    p = _add(
        top,
        "copy",
        "copy an extent of a volume to a volume at another site, in one command",
        commands.copy,
        site,
    )
    p.add_argument("source", type=source_extent_arg, metavar="VOLUME[:OFFSET+LENGTH]")
    p.add_argument("target", type=target_extent_arg, metavar="SITE:VOLUME[:OFFSET]")
    p.add_argument(
        "--via",
        metavar="INTERMEDIATE",
        help="a volume at the target site to copy into first; then only the extent changes",
    )

    p = _add(
        top,
        "verify",
        "compare a paired group's images at both sites by region hashes (at its primary); "
        "exit 0 equal, 1 regions differ, 2 it could not compare",
        commands.verify,
        site,
    )
    p.add_argument("group")
    p.add_argument("--volume", default="", help="one volume of the group (default: all)")

    # local commands
    serve = top.add_parser("serve", help="run this site's controller")
    serve.add_argument("--config", required=True, metavar="FILE", help="the site's TOML file")
    serve.set_defaults(handler=_serve)

    certs = top.add_parser("certs", help="make a CA and site certificates for labs")
    certs.add_argument("--out", required=True, metavar="DIR")
    certs.add_argument("--sites", required=True, type=sites_arg, metavar="A,B")
    certs.add_argument("--json", action="store_true", help="print one JSON object")
    certs.set_defaults(handler=_certs)

    bench = top.add_parser("bench", help="run a benchmark and print its ratios")
    bench.add_argument("name", choices=sorted(BENCHES))
    bench.add_argument("--json", action="store_true", help="print one JSON object")
    bench.add_argument("--quick", action="store_true", help="short run (smoke test)")
    bench.set_defaults(handler=_run_bench)
    return parser


def _check(parser: Parser, args: argparse.Namespace) -> None:
    """Rules argparse cannot say: exit 2 with one line."""
    if args.command == "io" and args.action == "write":
        if args.pattern is not None and args.length is None:
            parser.exit(2, f"{PROG} io write: --pattern needs --length (see --help)\n")
        if args.data_file is not None and args.length is not None:
            parser.exit(2, f"{PROG} io write: --length goes with --pattern, not --data-file\n")
    if args.command == "pair" and args.action == "status":
        if args.interval <= 0:
            parser.exit(2, f"{PROG} pair status: --interval must be positive\n")
        if args.wait_timeout and not args.until:
            parser.exit(2, f"{PROG} pair status: --wait-timeout goes with --until\n")
    if args.command in ("failover", "failback", "switchover", "resolve") and args.interval <= 0:
        parser.exit(2, f"{PROG} {args.command}: --interval must be positive\n")
    if getattr(args, "timeout", 1.0) <= 0:
        parser.exit(2, f"{PROG}: --timeout must be positive\n")


def main(argv: Sequence[str] | None = None, *, connect_with: Connect = connect) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check(parser, args)
    try:
        site_handler: commands.Handler | None = getattr(args, "site_handler", None)
        if site_handler is not None:
            try:
                client = connect_with(args)
            except UsageError as error:
                print(f"{PROG}: {error}", file=sys.stderr)
                return 2
            try:
                return site_handler(args, client)
            finally:
                client.close()
        handler: Callable[[argparse.Namespace], int] = args.handler
        return handler(args)
    except config.ConfigError as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return 2
    except TargetdReplError as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1
    except OSError as error:  # a local file or socket: one line, no traceback
        print(
            f"{PROG}: {error.strerror or error}: {error.filename or ''}".rstrip(": "),
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
