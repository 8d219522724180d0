"""The replication part of `make demo`: two real controller processes on loopback, driven only
through the `targetd-repl` CLI (the control API), an async pair that copies and then ships the
journal, both images compared by hash; then an unplanned failover, the old primary's return and
failback, and a planned switchover back, each through one command."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

MIB = 1 << 20
CLI = [sys.executable, "-m", "targetd_repl.cli"]


def _config(root: Path, site: str, peer: str) -> Path:
    path = root / f"{site}.toml"
    path.write_text(
        f'[site]\nname = "{site}"\nstate_dir = "{root / site}"\n\n'
        f'[control]\nsocket = "{root / site}.sock"\n\n'
        '[replication]\nlisten = "127.0.0.1:0"\n\n'
        f'[tls]\nca = "certs/ca.pem"\ncert = "certs/{site}.pem"\nkey = "certs/{site}.key"\n\n'
        f'[peers.{peer}]\naddress = "127.0.0.1:1"\n'  # the real port is set once it is bound
    )
    return path


def _cli(config: Path, *args: str) -> Any:
    done = subprocess.run(
        [*CLI, "--site-config", str(config), *args, "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"demo: targetd-repl {' '.join(args)}: {done.stderr.strip()}")
    return json.loads(done.stdout) if done.stdout.strip() else None


def _serve(config: Path, state: Path, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    state.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*CLI, "serve", "--config", str(config)], stdout=out, stderr=out, start_new_session=True
        )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            endpoints = json.loads((state / "endpoints.json").read_text())
            if endpoints.get("pid") == proc.pid:
                return proc, str(endpoints["replication"])
        except (OSError, ValueError):
            pass
        if proc.poll() is not None:
            raise SystemExit(f"demo: controller exited:\n{log.read_text()[-2000:]}")
        time.sleep(0.1)
    raise SystemExit(f"demo: controller not serving after 60 s:\n{log.read_text()[-2000:]}")


def _sha(config: Path, volume: str, size: int) -> str:
    digest = hashlib.sha256()
    for offset in range(0, size, 4 * MIB):
        out = Path(str(config) + ".read")
        _cli(config, "io", "read", volume, "--offset", str(offset), "--length", str(4 * MIB),
             "--out", str(out))  # fmt: skip
        digest.update(out.read_bytes())
    return digest.hexdigest()


def run(root: Path, step: Any, done: Any) -> bool:
    """Tell the two-site story that exists; return True when both images are equal."""
    t = step("two controllers on loopback (mutual TLS between them), each its own process")
    subprocess.run([*CLI, "certs", "--out", str(root / "certs"), "--sites", "a,b"],
                   check=True, capture_output=True)  # fmt: skip
    config_a, config_b = _config(root, "a", "b"), _config(root, "b", "a")
    site_a, address_a = _serve(config_a, root / "a", root / "a.log")
    site_b, address_b = _serve(config_b, root / "b", root / "b.log")
    try:
        _cli(config_a, "site", "set-peer", "b", address_b)
        _cli(config_b, "site", "set-peer", "a", address_a)
        done(t, f"site a at {address_a}, site b at {address_b}")

        t = step("volume 'web' (32 MiB) on site a; 8 MiB written before any pair exists")
        _cli(config_a, "volume", "create", "web", "--size", "32M", "--block-size", "4096")
        data = os.urandom(8 * MIB)
        (root / "payload").write_bytes(data)
        _cli(config_a, "io", "write", "web", "--offset", "0", "--data-file", str(root / "payload"))
        done(t, "written through the journaled write path")

        t = step("async pair 'web' a -> b: initial copy, then the journal ships every new write")
        _cli(config_a, "pair", "create", "web", "--peer", "b", "--mode", "async")
        _cli(config_a, "io", "write", "web", "--offset", str(16 * MIB), "--pattern", "0x5a",
             "--length", str(4 * MIB))  # fmt: skip
        status = _cli(config_a, "pair", "status", "web", "--until", "paired",
                      "--wait-timeout", "120")  # fmt: skip
        pair = status[0] if isinstance(status, list) else status
        done(t, f"pair {pair.get('state')}, last seq {pair.get('last_seq')}, acked by b up to "
                f"{pair.get('acked_seq')}")  # fmt: skip

        t = step("the secondary refuses writes; both images compared by SHA-256")
        refused = subprocess.run(
            [*CLI, "--site-config", str(config_b), "io", "write", "web", "--offset", "0",
             "--pattern", "1", "--length", "4096"], capture_output=True, text=True, check=False,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while True:
            equal = _sha(config_a, "web", 32 * MIB) == _sha(config_b, "web", 32 * MIB)
            if equal or time.monotonic() > deadline:
                break
            time.sleep(0.5)  # async: b applies the last records a moment after acking them
        done(t, f"write on b refused: {refused.stderr.strip()!r}; images equal: {equal}")
        if not (equal and refused.returncode != 0):
            return False

        t = step("site a dies (SIGKILL); unplanned failover: b promotes itself")
        site_a.kill()
        site_a.wait()
        _cli(config_b, "failover", "web")
        _cli(config_b, "io", "write", "web", "--offset", str(24 * MIB), "--pattern", "0xb2",
             "--length", str(2 * MIB))  # fmt: skip
        done(t, "b is primary at a new epoch, kept a restart-point snapshot, took 2 MiB of writes")

        t = step("a returns with a stale epoch: fenced; failback moves only what differs")
        site_a, address_a = _serve(config_a, root / "a", root / "a2.log")
        _cli(config_b, "site", "set-peer", "a", address_a)
        _cli(config_a, "site", "set-peer", "b", address_b)
        fenced = subprocess.run(
            [*CLI, "--site-config", str(config_a), "io", "write", "web", "--offset", "0",
             "--pattern", "1", "--length", "4096"], capture_output=True, text=True, check=False,
        )  # fmt: skip
        _cli(config_b, "failback", "web")
        _cli(config_b, "pair", "status", "web", "--until", "paired", "--wait-timeout", "120")
        done(t, f"write on the returning a refused: {fenced.returncode != 0}; pair paired b -> a")

        t = step("planned switchover back to a, no I/O freeze; images compared again")
        _cli(config_a, "switchover", "web")
        _cli(config_a, "io", "write", "web", "--offset", str(28 * MIB), "--pattern", "0xa3",
             "--length", str(1 * MIB))  # fmt: skip
        _cli(config_a, "pair", "status", "web", "--until", "paired", "--wait-timeout", "120")
        deadline = time.monotonic() + 60
        while True:
            equal = _sha(config_a, "web", 32 * MIB) == _sha(config_b, "web", 32 * MIB)
            if equal or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        done(t, f"a is primary again; images equal: {equal}")
        return equal and fenced.returncode != 0
    finally:
        for proc in (site_a, site_b):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in (site_a, site_b):
            proc.wait(30)
