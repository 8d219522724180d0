"""Real controller processes on 127.0.0.1 for integration tests.

A `Site` is one `targetd-repl serve` process (`python -m targetd_repl.cli serve --config ...`)
with its own directory: `site.toml`, `state/`, `run/control.sock` (0700 directory) and
`site.log` (stderr of every run, appended). `start()` waits until the controller wrote
`state/endpoints.json` with its pid and its health service answers SERVING on the control
socket. `stop()` sends SIGTERM and waits for a clean exit; `kill()` sends SIGKILL (a crash);
`start()` again resumes from the same state directory.

Ports: the first start listens on 127.0.0.1:0 (the OS chooses); `Cluster.start()` then pins each
site's bound port in its site.toml and points every peer at it (Site.SetPeerAddress, and the
peers' site.toml), so a site restarted after a kill comes back on the same address. Until a
peer's port is known its address is 127.0.0.1:1, where nothing listens.

Certificates come from `targetd-repl certs`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from targetd_repl.api.client import ControlClient

PYTHON = sys.executable
CLI = [PYTHON, "-m", "targetd_repl.cli"]
UNKNOWN_PEER = "127.0.0.1:1"  # nothing listens on port 1: "address not known yet"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 60.0


class HarnessError(AssertionError):
    """A controller did not start or stop as expected; the message carries its log's tail."""


# --- certificates ---------------------------------------------------------------------------------


def make_certs(directory: Path, sites: Sequence[str]) -> Path:
    """`targetd-repl certs`: ca.pem, and <site>.pem and <site>.key per site, in `directory`."""
    subprocess.run(
        [*CLI, "certs", "--out", str(directory), "--sites", ",".join(sites)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return directory


# --- one site -------------------------------------------------------------------------------------


class Site:
    """One controller process and its directory."""

    def __init__(
        self,
        name: str,
        root: Path,
        certs: Path,
        *,
        peers: Sequence[str] = (),
        journal_size_limit: str = "256M",
        journal_segment_size: str = "16M",
        control_tcp: bool = False,
        replication_options: dict[str, str | int | float] | None = None,
        extra_env: dict[str, str] | None = None,
        metrics: bool = False,
    ) -> None:
        self.name = name
        self.root = root
        self.certs = certs
        self.state_dir = root / "state"
        self.socket = root / "run" / "control.sock"
        self.config_path = root / "site.toml"
        self.log_path = root / "site.log"
        self.listen = "127.0.0.1:0"
        self.peers: dict[str, str] = {p: UNKNOWN_PEER for p in peers}
        self.journal_size_limit = journal_size_limit
        self.journal_segment_size = journal_segment_size
        self.control_tcp = "127.0.0.1:0" if control_tcp else ""
        self.replication_options = dict(replication_options or {})
        self.extra_env = extra_env or {}
        self.metrics = metrics  # serve GET /metrics on a port the OS chooses
        self.proc: subprocess.Popen[bytes] | None = None
        self.endpoints: dict[str, Any] = {}
        root.mkdir(parents=True, exist_ok=True)
        self.write_config()

    # --- configuration -------------------------------------------------------------------------

    def config_text(self) -> str:
        lines = [
            "[site]",
            f'name = "{self.name}"',
            f'state_dir = "{self.state_dir}"',
            'log_level = "info"',
            "",
            "[control]",
            f'socket = "{self.socket}"',
            *([f'tcp_address = "{self.control_tcp}"'] if self.control_tcp else []),
            "",
            "[replication]",
            f'listen = "{self.listen}"',
            *(f"{k} = {json.dumps(v)}" for k, v in sorted(self.replication_options.items())),
            "",
            "[tls]",
            f'ca = "{self.certs / "ca.pem"}"',
            f'cert = "{self.certs / f"{self.name}.pem"}"',
            f'key = "{self.certs / f"{self.name}.key"}"',
            "",
            "[journal]",
            f'size_limit = "{self.journal_size_limit}"',
            f'segment_size = "{self.journal_segment_size}"',
        ]
        for peer, address in sorted(self.peers.items()):
            lines += ["", f"[peers.{peer}]", f'address = "{address}"']
        if self.metrics:
            lines += ["", "[metrics]", 'listen = "127.0.0.1:0"']
        return "\n".join(lines) + "\n"

    def write_config(self) -> None:
        self.config_path.write_text(self.config_text())

    @property
    def replication_address(self) -> str:
        return str(self.endpoints["replication"])

    # --- the process ---------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start the controller and wait until it serves."""
        if self.running():
            raise HarnessError(f"site {self.name} is already running (pid {self.pid})")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.extra_env}
        with self.log_path.open("ab") as log:
            log.write(f"--- harness: starting site {self.name} ---\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [*CLI, "serve", "--config", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # a ^C in the terminal is not a signal to the site
            )
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Wait for endpoints.json with our pid, then for SERVING from the health service."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        endpoints_file = self.state_dir / "endpoints.json"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise HarnessError(
                    f"site {self.name} exited with status {self.proc.returncode} while "
                    f"starting:\n{self.log_tail()}"
                )
            try:
                endpoints = json.loads(endpoints_file.read_text())
            except (OSError, ValueError):
                endpoints = {}
            if endpoints.get("pid") == self.proc.pid:
                with self.client(timeout=2.0) as client:
                    if client.serving():
                        self.endpoints = endpoints
                        return
            time.sleep(0.05)
        raise HarnessError(f"site {self.name} not serving after {timeout:g} s:\n{self.log_tail()}")

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM, then wait for the exit; returns the exit status (0 for a clean shutdown)."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise HarnessError(
                    f"site {self.name} ignored SIGTERM for {timeout:g} s (killed):\n"
                    f"{self.log_tail()}"
                ) from None
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL: a crash. The state directory stays as the process left it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(STOP_TIMEOUT)

    def restart(self, *, crash: bool = False) -> None:
        if crash:
            self.kill()
        else:
            code = self.stop()
            if code != 0:
                raise HarnessError(f"site {self.name} exited with {code}:\n{self.log_tail()}")
        self.start()

    def pin_port(self) -> None:
        """Listen on the bound ports from now on, so a restart keeps the addresses."""
        self.listen = self.replication_address
        if self.control_tcp:
            self.control_tcp = str(self.endpoints["control_address"])
        self.write_config()

    # --- talking to it -------------------------------------------------------------------------

    def client(self, timeout: float = 30.0) -> ControlClient:
        return ControlClient.for_socket(self.socket, timeout=timeout)

    @contextmanager
    def connected(self, timeout: float = 30.0) -> Iterator[ControlClient]:
        client = self.client(timeout)
        try:
            yield client
        finally:
            client.close()

    def cli(
        self, *args: str, input_: bytes | None = None, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[bytes]:
        """Run `targetd-repl --socket <ours> ARGS...` and return what it did (not checked)."""
        return subprocess.run(
            [*CLI, "--socket", str(self.socket), *args],
            input=input_,
            capture_output=True,
            timeout=timeout,
            check=False,
        )

    def cli_json(self, *args: str, timeout: float = 120.0) -> Any:
        """Run a CLI command with --json; it must succeed; return the parsed document."""
        done = self.cli(*args, "--json", timeout=timeout)
        if done.returncode != 0:
            raise AssertionError(
                f"targetd-repl {' '.join(args)} exited {done.returncode}: "
                f"{done.stderr.decode(errors='replace')}"
            )
        return json.loads(done.stdout)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


# --- several sites --------------------------------------------------------------------------------


class Cluster:
    """Sites that are each other's peers, under one directory with shared certificates."""

    def __init__(self, root: Path, names: Sequence[str], **site_options: Any) -> None:
        self.root = root
        certs = make_certs(root / "certs", names)
        self.sites = {
            name: Site(
                name, root / name, certs, peers=[p for p in names if p != name], **site_options
            )
            for name in names
        }

    def __getitem__(self, name: str) -> Site:
        return self.sites[name]

    def start(self) -> None:
        """Start every site, pin its port, and tell every peer where it is."""
        for site in self.sites.values():
            site.start()
            site.pin_port()
        for site in self.sites.values():
            for peer in self.sites.values():
                if peer is not site:
                    self.point(site, peer)

    def point(self, site: Site, peer: Site, address: str | None = None) -> None:
        """Tell `site` where `peer` listens — or `address`, e.g. a fault-injecting proxy in
        front of it — now if it runs, and in its configuration for its next start."""
        address = address or peer.replication_address
        site.peers[peer.name] = address
        site.write_config()
        if site.running():
            with site.connected() as client:
                client.set_peer_address(peer.name, address)

    def stop(self) -> dict[str, int]:
        """Stop every running site (SIGTERM; SIGKILL if it hangs); return the exit codes."""
        codes: dict[str, int] = {}
        for name, site in self.sites.items():
            try:
                codes[name] = site.stop()
            except HarnessError:
                codes[name] = -9
        return codes

    def logs(self) -> dict[str, str]:
        return {name: site.log_text() for name, site in self.sites.items()}
