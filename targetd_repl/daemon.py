"""The composition root of a site's controller (`targetd-repl serve`): it opens the storage
engine, the replication manager and the gRPC servers, serves until SIGTERM or SIGINT, and shuts
down in the reverse order.

    control server      Unix socket (directory 0700, socket 0600), and TCP with mutual TLS if
                        configured: the control API (api/) and the health service
    replication server  TCP with mutual TLS: the manager's Replication servicer and health
    export              with `[export]` only: the site's LIO target (repaired to match the
                        metadata at start) and the in-process TCMU data path (export.py)

Start, step by step: lock the state directory (one controller per site), open the engine, start
the manager (it resumes every pair from persisted state) and the role manager, reconcile LIO and
start the data path (with `[export]`; a host without LIO fails the start here with one LioError
line), bind and start both servers, mark the health service SERVING, then write
`<state_dir>/endpoints.json` atomically: its presence with our pid means "serving" (tests and
tools read the bound port there). Stop: health NOT_SERVING, stop accepting and drain RPCs (grace
period), stop the data path (in-flight SCSI commands finish; LIO objects stay, so initiators wait
for the next start instead of losing the LUN), stop the role manager and the manager, close the
engine, remove endpoints.json and the socket, unlock. A half-done start is undone the same way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import logging
import os
import signal
import socket
import stat
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent import futures
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from targetd_repl.api import control_servicer
from targetd_repl.api.service import ControlService, Endpoints
from targetd_repl.config import (
    ConfigError,
    SiteSettings,
    TlsSettings,
    format_address,
    parse_address,
)
from targetd_repl.errors import TargetdReplError
from targetd_repl.metrics import MetricsServer
from targetd_repl.replication.channel import TlsFiles, server_credentials, server_options
from targetd_repl.replication.manager import PeerSite, ReplicationManager
from targetd_repl.replication.settings import ReplicationSettings
from targetd_repl.roles.manager import RoleManager
from targetd_repl.storage.engine import StorageEngine
from targetd_repl.storage.fileutil import atomic_write
from targetd_repl.storage.group_store import GroupSettings
from targetd_repl.v1 import replication_pb2, replication_pb2_grpc

if TYPE_CHECKING:
    from targetd_repl.export import SiteExport

log = logging.getLogger(__name__)

T = TypeVar("T")

LOCK_FILE = "controller.lock"
DRAIN_SECONDS = 5.0
CONTROL_MAX_MESSAGE = 8 << 20  # an Io call moves at most 4 MiB (api.service.MAX_IO_BYTES)
CONTROL_WORKERS = 8
REPLICATION_WORKERS = 32  # each open stream holds one thread

# A second process must not bind the same port silently (grpc enables SO_REUSEPORT).
_NO_REUSEPORT = ("grpc.so_reuseport", 0)
_CONTROL_OPTIONS: Sequence[tuple[str, int]] = (
    _NO_REUSEPORT,
    ("grpc.max_receive_message_length", CONTROL_MAX_MESSAGE),
    ("grpc.max_send_message_length", CONTROL_MAX_MESSAGE),
)


class StartupError(TargetdReplError):
    """The controller cannot start (state directory locked, port taken, socket in use)."""


def configure_logging(level: str) -> None:
    """One line per event, to stderr."""
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )


# --- TLS -----------------------------------------------------------------------------------------


def check_tls(tls: TlsSettings) -> TlsFiles:
    """The site's TLS files, each readable and PEM; a bad one is a ConfigError naming its key."""
    for key in ("ca", "cert", "key"):
        path: Path = getattr(tls, key)
        try:
            data = path.read_bytes()
        except OSError as error:
            raise ConfigError(f"tls.{key}: cannot read {path}: {error.strerror}") from None
        if b"-----BEGIN" not in data:
            raise ConfigError(f"tls.{key}: {path} holds no PEM data")
    return TlsFiles(ca=tls.ca, cert=tls.cert, key=tls.key)


def replication_settings(settings: SiteSettings) -> ReplicationSettings:
    """Replication's defaults, with what the site's file sets."""
    tuning = settings.replication
    defaults = ReplicationSettings()
    return dataclasses.replace(
        defaults,
        sync_timeout=_or(tuning.sync_timeout, defaults.sync_timeout),
        link_timeout=_or(tuning.link_timeout, defaults.link_timeout),
        copy_rate_bytes=_or(tuning.copy_rate_bytes, defaults.copy_rate_bytes),
        bulk=tuning.bulk_lane,
    )


def _or(value: T | None, default: T) -> T:
    return default if value is None else value


# --- the pieces ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _state_lock(state_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on the state directory: one controller per site."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise StartupError(
                f"state directory {state_dir} is in use by another controller (pid {holder})"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def _prepare_socket(path: Path) -> None:
    """Make the socket's directory root-only (created 0700), and clear a stale socket file.
    Refuses a directory others can enter, and a socket another process still serves."""
    directory = path.parent
    if not directory.exists():
        directory.mkdir(mode=0o700, parents=True)
    mode = stat.S_IMODE(directory.stat().st_mode)
    if mode & 0o077:
        raise StartupError(
            f"control socket directory {directory} is open to others (mode {mode:04o}); "
            "give the socket a directory of its own (it is created 0700)"
        )
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise StartupError(f"control socket {path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # left by a process that is gone
        else:
            raise StartupError(f"control socket {path} is served by another process")
        finally:
            probe.close()


def _bind(server: grpc.Server, address: str, credentials: grpc.ServerCredentials | None) -> int:
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError as error:
        raise StartupError(f"cannot listen on {address}: {error}") from None
    if port == 0 and not address.startswith("unix:"):
        raise StartupError(f"cannot listen on {address}")
    return port


def _health(server: grpc.Server, services: Sequence[str]) -> health.HealthServicer:
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    for name in ("", *services):
        servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    return servicer


def _set_serving(servicer: health.HealthServicer, services: Sequence[str]) -> None:
    for name in ("", *services):
        servicer.set(name, health_pb2.HealthCheckResponse.SERVING)


def _stop_server(server: grpc.Server, what: str, grace: float) -> None:
    if not server.stop(grace).wait(grace + 5.0):
        log.warning("%s server did not stop within %.0f s", what, grace + 5.0)


# --- the controller ------------------------------------------------------------------------------


class Controller:
    """One site's controller. `start()` serves, `stop()` undoes everything `start()` did."""

    def __init__(self, settings: SiteSettings, *, drain_seconds: float = DRAIN_SECONDS) -> None:
        self._settings = settings
        self._drain = drain_seconds
        self._stack = contextlib.ExitStack()
        self.endpoints: Endpoints | None = None
        self._metrics_address = ""  # "host:port" of GET /metrics, once serving ([metrics])

    def start(self) -> Endpoints:
        try:
            return self._start()
        except BaseException:
            self._stack.close()
            raise

    def _start(self) -> Endpoints:
        s = self._settings
        tls = check_tls(s.tls)
        self._stack.enter_context(_state_lock(s.state_dir))
        s.endpoints_file.unlink(missing_ok=True)

        engine = StorageEngine.open(
            s.state_dir,
            site=s.name,
            settings=GroupSettings(
                journal_size_limit=s.journal.size_limit,
                journal_segment_size=s.journal.segment_size,
            ),
        )
        self._stack.callback(engine.close)
        manager = ReplicationManager(
            engine,
            s.name,
            {p.name: PeerSite(p.name, p.address, p.bulk_lane_address) for p in s.peers.values()},
            tls,
            replication_settings(s),
        )
        # roles/: role changes. Recovery before replication starts (a finished failover's epoch,
        # the changed bitmap, a switchover's copy-on-read); background work after it.
        roles = RoleManager(engine, manager, s.name, tls)
        roles.start()
        manager.start()
        self._stack.callback(manager.stop)
        roles.resume()
        self._stack.callback(roles.stop)
        export = self._start_export(engine)

        # Replication: TCP with mutual TLS.
        replication = grpc.server(
            futures.ThreadPoolExecutor(REPLICATION_WORKERS, thread_name_prefix="replication"),
            options=[*server_options(), _NO_REUSEPORT],
        )
        repl_services = tuple(
            svc.full_name for svc in replication_pb2.DESCRIPTOR.services_by_name.values()
        )
        replication_pb2_grpc.add_ReplicationServicer_to_server(manager.servicer(), replication)
        replication_pb2_grpc.add_RolePeerServicer_to_server(roles.servicer(), replication)
        repl_health = _health(replication, repl_services)
        host, _ = parse_address(s.replication_listen, allow_port_zero=True)
        port = _bind(replication, s.replication_listen, server_credentials(tls))
        replication_address = format_address(host, port)
        lane_address = ""
        metrics_address = ""
        if s.replication.bulk_lane:
            try:
                lane_address = format_address(
                    host, manager.serve_lane(host, s.replication.bulk_lane_port)
                )
            except OSError as error:
                raise StartupError(
                    f"cannot listen for the bulk lane on {host}:{s.replication.bulk_lane_port}: "
                    f"{error}"
                ) from None

        # Control: the Unix socket, and TCP with mutual TLS if configured.
        control = grpc.server(
            futures.ThreadPoolExecutor(CONTROL_WORKERS, thread_name_prefix="control"),
            options=_CONTROL_OPTIONS,
        )
        _prepare_socket(s.control_socket)
        _bind(control, f"unix:{s.control_socket}", None)
        control_address = ""
        if s.control_tcp_address:
            tcp_host, _ = parse_address(s.control_tcp_address, allow_port_zero=True)
            tcp_port = _bind(control, s.control_tcp_address, server_credentials(tls))
            control_address = format_address(tcp_host, tcp_port)
        endpoints = Endpoints(
            replication_address=replication_address,
            control_socket=str(s.control_socket),
            control_address=control_address,
            bulk_lane_address=lane_address,
        )
        service = ControlService(
            engine,
            manager,
            site=s.name,
            endpoints=endpoints,
            peers={p.name: p.address for p in s.peers.values()},
            roles=roles,
            export=export,
        )
        control_services = control_servicer.add_to_server(service, control)
        if s.metrics_listen:
            metrics_host, metrics_port = parse_address(s.metrics_listen, allow_port_zero=True)
            try:
                metrics = MetricsServer(service, metrics_host, metrics_port)
            except OSError as error:
                raise StartupError(f"cannot serve metrics on {s.metrics_listen}: {error}") from None
            self._stack.callback(metrics.stop)
            metrics_address = format_address(metrics_host, metrics.port)
        control_health = _health(control, control_services)

        replication.start()
        self._stack.callback(_stop_server, replication, "replication", self._drain)
        self._stack.callback(repl_health.enter_graceful_shutdown)
        control.start()
        self._stack.callback(s.control_socket.unlink, missing_ok=True)
        self._stack.callback(_stop_server, control, "control", self._drain)
        self._stack.callback(control_health.enter_graceful_shutdown)
        os.chmod(s.control_socket, 0o600)

        _set_serving(repl_health, repl_services)
        _set_serving(control_health, control_services)
        self._metrics_address = metrics_address
        self._write_endpoints(endpoints)
        self._stack.callback(s.endpoints_file.unlink, missing_ok=True)
        self.endpoints = endpoints
        log.info(
            "site %s serving: control unix:%s%s, replication %s%s (mutual TLS), %d volume(s), "
            "%d pair(s)",
            s.name,
            s.control_socket,
            f" and {control_address} (mutual TLS)" if control_address else "",
            replication_address,
            f" and bulk lane {lane_address}" if lane_address else "",
            len(engine.list_volumes()),
            len(engine.metadata.list_pairs()),
        )
        return endpoints

    def _start_export(self, engine: StorageEngine) -> SiteExport | None:
        """With `[export]`: reconcile LIO with the metadata and serve the LUNs in-process."""
        s = self._settings
        if s.export is None:
            return None
        # rtslib and pyudev: only a site that exports needs them.
        from targetd_repl.export import SiteExport  # noqa: PLC0415

        export = SiteExport(engine, s.name, s.export)
        export.start()
        self._stack.callback(export.stop)
        return export

    def _write_endpoints(self, endpoints: Endpoints) -> None:
        document = {
            "site": self._settings.name,
            "pid": os.getpid(),
            "replication": endpoints.replication_address,
            "control_socket": endpoints.control_socket,
            "control_address": endpoints.control_address,
            "bulk_lane": endpoints.bulk_lane_address,
            "metrics": self._metrics_address,
            "started_at": time.time(),
        }
        atomic_write(
            self._settings.endpoints_file, (json.dumps(document, indent=2) + "\n").encode()
        )

    def stop(self) -> None:
        """Stop serving and close everything, in the reverse order of start. Idempotent."""
        log.info("site %s stopping", self._settings.name)
        self._stack.close()
        log.info("site %s stopped", self._settings.name)


def serve(settings: SiteSettings) -> int:
    """Run a controller until SIGTERM or SIGINT; return the exit status."""
    configure_logging(settings.log_level)
    stopping = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("received %s: shutting down", signal.Signals(signum).name)
        stopping.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        controller = Controller(settings)
        controller.start()
        try:
            while not stopping.wait(1.0):
                pass
        finally:
            controller.stop()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
