"""The Ansible collection (ansible/, targetd_repl.replication) against real controllers.

`ansible-galaxy collection install ansible/` into a temporary collections path, then
`ansible-playbook -c local` runs the collection's own playbooks against two real controller
processes on 127.0.0.1 (harness.py): the inventory names them `a` and `b`, two local hosts whose
`targetd_repl_site_config` is each site's site.toml, with `ansible_python_interpreter` the venv's
Python (the modules run the venv's `targetd-repl`). What a play did is read from the play recap
and from the sites themselves, through the CLI and testinfra (`local://`).

Covered: volumes created (changed), again (ok), grown, shrink refused, deleted; check mode
changing nothing; a pair reaching `paired` and a second run a no-op; switchover, failover and
failback playbooks moving the primary, each second run a no-op; a bad argument failing with the
CLI's one-line message; install.yml writing a site.toml that a controller serves from, its
certificates and its systemd unit (with `-i localhost,`), idempotent and inert in check mode.

Not covered here (no systemd, no network registry, no kernel modules in this container):
install.yml's apt, pip and modprobe steps and the start of the systemd service; `resolve`
(split-brain needs two forced failovers with the link cut: tests/integration/test_roles.py).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import testinfra

from targetd_repl import config
from targetd_repl.cli_output import pair_doc, volume_doc
from targetd_repl.model import PairMode
from tests.integration.conftest import _CLUSTERS
from tests.integration.harness import CLI, Cluster, Site
from tests.integration.roles_support import wait_pair

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
COLLECTION_SRC = REPO / "ansible"
BIN = Path(sys.executable).parent
PYTHON = sys.executable
TARGETD_REPL = BIN / "targetd-repl"
FQCN = "targetd_repl.replication"
MiB = 1 << 20
PLAY_TIMEOUT = 300.0
FAST = {"link_timeout": 1.0, "sync_timeout": 1.0}

_RECAP = re.compile(r"^(\S+)\s*:\s*((?:\w+=\d+\s*)+)$", re.MULTILINE)


# --- running ansible ------------------------------------------------------------------------------


def _tool(name: str) -> Path:
    """An Ansible command of the venv: a missing one is a failure, never a skip."""
    path = BIN / name
    if not path.exists():
        pytest.fail(
            f"{path} is missing: ansible-core is a dev dependency "
            "(.venv/bin/pip install -e '.[dev]')"
        )
    return path


@dataclass
class PlayRun:
    """One `ansible-playbook` run: its exit status, output and the recap per host."""

    command: list[str]
    rc: int
    stdout: str
    stderr: str
    recap: dict[str, dict[str, int]]

    def __str__(self) -> str:
        return (
            f"$ {' '.join(self.command)}\nexit {self.rc}\n--- stdout\n{self.stdout}\n"
            f"--- stderr\n{self.stderr}"
        )

    def count(self, host: str, what: str) -> int:
        assert host in self.recap, f"no recap for {host}:\n{self}"
        return self.recap[host][what]

    def fatal(self, host: str) -> str:
        """The `msg` of the task that failed on `host`."""
        # `fatal: [a]: FAILED! => {...}`, or in a loop `failed: [a] (item=v1) => {...}`
        line = rf"^(?:fatal|failed): \[{re.escape(host)}\].*? => (\{{.*\}})$"
        match = re.search(line, self.stdout, re.MULTILINE)
        assert match, f"no failed task on {host}:\n{self}"
        result: dict[str, Any] = json.loads(match.group(1))
        return str(result["msg"])

    def items(self, host: str, task: str) -> dict[str, str]:
        """Loop item label -> `ok`, `changed` or `failed`, for one task on `host`."""
        found: dict[str, str] = {}
        for section in self.stdout.split("\nTASK [")[1:]:
            if section.split("]", 1)[0] != task:
                continue
            line = rf"^(ok|changed|failed): \[{re.escape(host)}\](?: =>)? \(item=(.+?)\)"
            for status, label in re.findall(line, section, re.MULTILINE):
                found[label] = status
        return found

    def changed_tasks(self, host: str) -> list[str]:
        """The tasks that changed something on `host` (or would have, in check mode)."""
        return [
            section.split("]", 1)[0]
            for section in self.stdout.split("\nTASK [")[1:]
            if re.search(rf"^changed: \[{re.escape(host)}\]", section, re.MULTILINE)
        ]

    def rendered(self, task: str) -> str:
        """The whole file a template task would write, from its --diff (ANSIBLE_DIFF_CONTEXT is
        large, so the one hunk holds every line)."""
        section = next(
            (s for s in self.stdout.split("\nTASK [")[1:] if s.split("]", 1)[0].endswith(task)),
            "",
        )
        after: list[str] = []
        for line in section.split("\n@@ ", 1)[-1].splitlines()[1:]:
            if not line or line[0] not in " +-\\":
                break
            if line[0] in " +":
                after.append(line[1:] + "\n")
        return "".join(after)


class Ansible:
    """`ansible-playbook` with the collection installed under `root` and nothing of the user's
    (ANSIBLE_HOME, temporary directories and configuration under `root`)."""

    def __init__(self, collections: Path, root: Path) -> None:
        self.playbook = _tool("ansible-playbook")
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.env = {
            **os.environ,
            "ANSIBLE_CONFIG": str(root / "ansible.cfg"),  # absent: defaults only
            "ANSIBLE_HOME": str(root / "home"),
            "ANSIBLE_LOCAL_TEMP": str(root / "tmp"),
            "ANSIBLE_REMOTE_TEMP": str(root / "remote-tmp"),
            "ANSIBLE_COLLECTIONS_PATH": str(collections),
            "ANSIBLE_COLLECTIONS_SCAN_SYS_PATH": "false",
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_RETRY_FILES_ENABLED": "false",
            "ANSIBLE_STDOUT_CALLBACK": "default",
            "ANSIBLE_CALLBACK_RESULT_FORMAT": "json",
            "ANSIBLE_CALLBACK_FORMAT_PRETTY": "false",
            "ANSIBLE_DIFF_CONTEXT": "100000",
            "PYTHONUNBUFFERED": "1",
        }
        self.runs = 0

    def inventory(self, sites: Cluster) -> Path:
        """Each site a local host named like it, the venv's Python and CLI, its site.toml."""
        hosts = {
            name: {
                "ansible_connection": "local",
                "ansible_python_interpreter": PYTHON,
                "targetd_repl_site_config": str(site.config_path),
                "targetd_repl_cli": str(TARGETD_REPL),
            }
            for name, site in sites.sites.items()
        }
        path = self.root / "inventory.json"
        path.write_text(json.dumps({"all": {"children": {"targetd_repl_sites": {"hosts": hosts}}}}))
        return path

    def play(
        self,
        playbook: str,
        inventory: Path | str,
        *,
        check: bool = False,
        diff: bool = False,
        extra: dict[str, Any] | None = None,
    ) -> PlayRun:
        self.runs += 1
        command = [str(self.playbook), "-c", "local", "-i", str(inventory), f"{FQCN}.{playbook}"]
        if extra:
            vars_file = self.root / f"vars-{self.runs}.json"
            vars_file.write_text(json.dumps(extra))
            command += ["-e", f"@{vars_file}"]
        if check:
            command.append("--check")
        if diff:
            command.append("--diff")
        done = subprocess.run(
            command,
            env=self.env,
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=PLAY_TIMEOUT,
            check=False,
        )
        recap = {
            host: {k: int(v) for k, v in (pair.split("=") for pair in counts.split())}
            for host, counts in _RECAP.findall(done.stdout.split("PLAY RECAP", 1)[-1])
        }
        return PlayRun(command, done.returncode, done.stdout, done.stderr, recap)


def ok(run: PlayRun, host: str, *, changed: bool) -> None:
    """The play succeeded on `host`; something changed there, or nothing did."""
    assert run.count(host, "failed") == run.count(host, "unreachable") == 0, str(run)
    if not any(counts["failed"] or counts["unreachable"] for counts in run.recap.values()):
        assert run.rc == 0, str(run)
    assert (run.count(host, "changed") > 0) is changed, str(run)


@pytest.fixture(scope="module")
def collections(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The collection as `ansible-galaxy collection install ansible/` lays it out."""
    path = tmp_path_factory.mktemp("collections")
    done = subprocess.run(
        [str(_tool("ansible-galaxy")), "collection", "install", str(COLLECTION_SRC), "-p", path],
        env={**os.environ, "ANSIBLE_HOME": str(path / ".home"), "ANSIBLE_NOCOLOR": "1"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert (path / "ansible_collections" / "targetd_repl" / "replication").is_dir()
    return path


@pytest.fixture(scope="module")
def shared_sites(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Sites a and b for every test of the module (each test uses its own groups): starting
    controllers costs more than the tests themselves."""
    sites = Cluster(tmp_path_factory.mktemp("sites"), ["a", "b"], replication_options=FAST)
    try:
        sites.start()
        yield sites
    finally:
        # SIGKILL: a clean stop waits out the gRPC grace of the open replication streams (5 s),
        # and the state directories are thrown away
        for site in sites.sites.values():
            site.kill()


@pytest.fixture
def sites(shared_sites: Cluster, request: pytest.FixtureRequest) -> Cluster:
    request.node.stash[_CLUSTERS] = [shared_sites]  # conftest attaches their logs on failure
    return shared_sites


@pytest.fixture
def ansible(collections: Path, tmp_path: Path) -> Ansible:
    return Ansible(collections, tmp_path / "ansible")


def with_hostvars(inventory: Path, **hostvars: dict[str, Any]) -> Path:
    """Give hosts of the inventory these variables (extra vars would give them to all)."""
    data = json.loads(inventory.read_text())
    for host, values in hostvars.items():
        data["all"]["children"]["targetd_repl_sites"]["hosts"][host].update(values)
    inventory.write_text(json.dumps(data))
    return inventory


# The sites' view through their control API: the documents `targetd-repl ... --json` prints,
# without a CLI process per look (the CLI itself checks check mode and the failures below).


def volumes(site: Site, prefix: str = "") -> dict[str, dict[str, Any]]:
    with site.connected() as client:
        found = [volume_doc(v) for v in client.list_volumes()]
    return {v["name"]: v for v in found if v["name"].startswith(prefix)}


def cli_volumes(site: Site, prefix: str) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in site.cli_json("volume", "list") if v["name"].startswith(prefix)}


def pair_of(site: Site, group: str) -> dict[str, Any]:
    with site.connected() as client:
        return pair_doc(client.pair_status(group))


def roles(c: Cluster, group: str) -> dict[str, str]:
    return {name: pair_of(site, group)["role"] for name, site in c.sites.items()}


def paired_group(c: Cluster, group: str) -> None:
    """`group` with one 8 MiB volume at a, paired to b (async), copied."""
    with c["a"].connected() as client:
        client.create_group(group)
        client.create_volume(f"{group}-data", 8 * MiB, group=group)
        client.create_pair(group, "b", PairMode.ASYNC)
    wait_pair(c["a"], group, lambda p: p["state"] == "paired")


# --- the collection -------------------------------------------------------------------------------


def test_modules_are_documented(ansible: Ansible) -> None:
    """ansible-doc reads every module's documentation (YAML, the shared doc fragment)."""
    modules = [f"{FQCN}.{m}" for m in ("volume", "pair", "role_change", "snapshot", "info")]
    done = subprocess.run(
        [str(_tool("ansible-doc")), "-t", "module", "--json", *modules],
        env=ansible.env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    docs = json.loads(done.stdout)
    assert sorted(docs) == sorted(modules)
    for name, doc in docs.items():
        options = doc["doc"]["options"]
        assert {"site_config", "socket", "executable", "timeout"} <= set(options), name
        assert doc["examples"].strip() and doc["return"], name
    assert docs[f"{FQCN}.role_change"]["doc"]["options"]["action"]["choices"] == [
        "switchover", "failover", "failback", "resolve",
    ]  # fmt: skip


# --- volumes --------------------------------------------------------------------------------------


def test_volume_created_then_ok_check_mode_grow_shrink_refused_delete(
    sites: Cluster, ansible: Ansible
) -> None:
    a = sites["a"]
    inventory = ansible.inventory(sites)

    def configure(*wanted: dict[str, Any], check: bool = False) -> PlayRun:
        extra = {"targetd_repl_hosts": "a", "targetd_repl_volumes": list(wanted)}
        return ansible.play("configure", inventory, check=check, extra=extra)

    v1 = {"name": "vol-1", "size": "16M", "block_size": 4096, "group": "vol"}
    first = configure(v1)
    ok(first, "a", changed=True)
    made = volumes(a)["vol-1"]
    assert (made["size_bytes"], made["block_size"], made["group"]) == (16 * MiB, 4096, "vol")

    # again: vol-1 is as wanted (ok, not changed); vol-2 and vol-3 are new
    v2 = {"name": "vol-2", "size": "8M", "group": "vol"}
    v3 = {"name": "vol-3", "size": "1M"}
    again = configure(v1, v2, v3)
    assert again.items("a", "Volumes") == {"vol-1": "ok", "vol-2": "changed", "vol-3": "changed"}
    before = volumes(a, "vol-")
    assert sorted(before) == ["vol-1", "vol-2", "vol-3"] and before["vol-1"] == made
    assert before["vol-2"]["group"] == "vol" and before["vol-3"]["group"] == "vol-3"

    # check mode: growing vol-1, deleting vol-3, a new vol-4 in a new group are reported; the
    # site is untouched
    grow, gone = {**v1, "size": "32M"}, {"name": "vol-3", "state": "absent"}
    v4 = {"name": "vol-4", "size": "1M", "group": "vol-new"}
    check = configure(grow, gone, v4, check=True)
    ok(check, "a", changed=True)
    statuses = check.items("a", "Volumes")
    assert statuses == {"vol-1": "changed", "vol-3": "changed", "vol-4": "changed"}, str(check)
    assert cli_volumes(a, "vol-") == before
    assert "vol-new" not in {g["name"] for g in a.cli_json("group", "list")}

    # for real, with vol-2 asked smaller: refused with a clear message, nothing done to it;
    # the other items go on (vol-1 grown, vol-3 deleted)
    run = configure(grow, {**v2, "size": "4M"}, gone)
    assert run.count("a", "failed") == 1, str(run)
    statuses = run.items("a", "Volumes")
    assert statuses == {"vol-1": "changed", "vol-2": "failed", "vol-3": "changed"}, str(run)
    assert run.fatal("a").startswith(
        f"refusing to shrink volume 'vol-2' from {8 * MiB} to {4 * MiB} bytes: it would discard"
    )
    after = volumes(a, "vol-")
    assert sorted(after) == ["vol-1", "vol-2"]
    assert after["vol-1"]["size_bytes"] == 32 * MiB and after["vol-2"] == before["vol-2"]


# --- pairs ----------------------------------------------------------------------------------------


def test_pair_created_reaches_paired_and_a_second_run_is_a_noop(
    sites: Cluster, ansible: Ansible
) -> None:
    c = sites
    a, b = c["a"], c["b"]
    inventory = ansible.inventory(c)
    setup = {
        "targetd_repl_hosts": "a",
        "targetd_repl_volumes": [{"name": "pr-data", "size": "8M", "group": "pr"}],
        "targetd_repl_pairs": [{"group": "pr", "peer": "b", "mode": "async", "wait": True}],
        "targetd_repl_snapshots": [{"volume": "pr-data", "name": "baseline"}],
    }
    first = ansible.play("configure", inventory, extra=setup)
    ok(first, "a", changed=True)
    # wait: true returned once paired, at the primary; the secondary agrees
    assert pair_of(a, "pr") | {"state": "paired", "role": "primary", "peer": "b"} == pair_of(
        a, "pr"
    )
    assert pair_of(b, "pr")["role"] == "secondary"
    with a.connected() as client:
        assert [s.name for s in client.list_snapshots("pr-data")] == ["baseline"]

    again = ansible.play("configure", inventory, extra=setup)
    ok(again, "a", changed=False)

    # check mode, both sites at once: suspending at a is reported, not done; at b, the
    # secondary, a different peer is refused (a pair's peer cannot change)
    with_hostvars(
        inventory,
        a={"targetd_repl_pairs": [{"group": "pr", "state": "suspended"}]},
        b={"targetd_repl_pairs": [{"group": "pr", "peer": "c", "mode": "async"}]},
    )
    check = ansible.play("configure", inventory, check=True)
    ok(check, "a", changed=True)
    assert check.items("a", "Pairs") == {"pr": "changed"}, str(check)
    assert check.count("b", "failed") == 1, str(check)
    assert check.fatal("b").startswith("pair 'pr' has peer 'a', not 'c': a pair's peer cannot")
    assert pair_of(a, "pr")["state"] == pair_of(b, "pr")["state"] == "paired"


def test_a_bad_argument_fails_with_the_clis_message(sites: Cluster, ansible: Ansible) -> None:
    c = sites
    a, b = c["a"], c["b"]
    with b.connected() as client:
        client.create_volume("bad-data", 1 * MiB)
    expected = {
        "a": a.cli("volume", "create", "bad/name", "--size", "1M", "--json"),
        "b": b.cli("pair", "create", "bad-data", "--peer", "nosuch", "--mode", "async", "--json"),
    }
    for done in expected.values():
        assert done.returncode == 1 and done.stderr.count(b"\n") == 1, done
    # one play, both hosts: a gets a volume name the site refuses, b a peer it does not know
    inventory = with_hostvars(
        ansible.inventory(c),
        a={"targetd_repl_volumes": [{"name": "bad/name", "size": "1M"}]},
        b={"targetd_repl_pairs": [{"group": "bad-data", "peer": "nosuch", "mode": "async"}]},
    )
    run = ansible.play("configure", inventory)
    assert run.rc != 0, str(run)
    for host, done in expected.items():
        assert run.count(host, "failed") == 1, str(run)
        assert run.fatal(host) == done.stderr.decode().strip(), str(run)
    assert "bad/name" not in volumes(a)
    with b.connected() as client:
        assert "bad-data" not in {p.group for p in client.list_pairs()}


# --- role changes ---------------------------------------------------------------------------------


def test_switchover_playbook_moves_the_primary_and_a_second_run_is_a_noop(
    sites: Cluster, ansible: Ansible
) -> None:
    c = sites
    paired_group(c, "sw")
    inventory = ansible.inventory(c)
    to_b = {"new_primary": "b", "targetd_repl_role_groups": ["sw"]}

    check = ansible.play("switchover", inventory, check=True, extra=to_b)
    ok(check, "b", changed=True)
    assert {n: c[n].cli_json("pair", "status", "sw")["role"] for n in "ab"} == {
        "a": "primary",
        "b": "secondary",
    }

    run = ansible.play("switchover", inventory, extra=to_b)
    ok(run, "b", changed=True)
    assert "a" not in run.recap  # the play ran at the new primary only
    assert roles(c, "sw") == {"a": "secondary", "b": "primary"}
    b = c["b"]
    assert pair_of(b, "sw")["state"] == "paired"

    again = ansible.play("switchover", inventory, extra=to_b)
    ok(again, "b", changed=False)
    assert roles(c, "sw") == {"a": "secondary", "b": "primary"}
    # the site wrote through the new primary: the group serves writes at b now
    with b.connected() as client:
        client.write("sw-data", 0, b"\x07" * 4096)


def test_failover_then_failback_playbooks_and_a_second_run_is_a_noop(
    sites: Cluster, ansible: Ansible
) -> None:
    c = sites
    paired_group(c, "fo")
    inventory = ansible.inventory(c)
    groups = {"targetd_repl_role_groups": ["fo"]}

    forced = {**groups, "new_primary": "b", "failover_force": True}
    run = ansible.play("failover", inventory, extra=forced)
    ok(run, "b", changed=True)
    assert pair_of(c["b"], "fo")["role"] == "primary"

    # failback at b resyncs a as its secondary; return_to=a then switches back
    back = {**groups, "primary": "b", "return_to": "a"}
    run = ansible.play("failback", inventory, extra=back)
    ok(run, "b", changed=True)
    ok(run, "a", changed=True)
    assert roles(c, "fo") == {"a": "primary", "b": "secondary"}
    assert pair_of(c["a"], "fo")["state"] == "paired"

    again = ansible.play("failback", inventory, extra=back)
    ok(again, "b", changed=False)
    ok(again, "a", changed=False)


# --- install.yml ----------------------------------------------------------------------------------


@contextmanager
def _serve(config_path: Path, socket: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`targetd-repl serve --config` on the written file, as the systemd unit would run it."""
    log = config_path.with_suffix(".log")
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*CLI, "serve", "--config", str(config_path)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60
        while not socket.exists():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_install_playbook_writes_a_site_a_controller_serves(
    ansible: Ansible, tmp_path: Path
) -> None:
    """Everything install.yml does but apt, pip, modprobe and systemctl, which need a machine
    with systemd and a package index (targetd_repl_manage_service=false and friends)."""
    root = tmp_path / "host"
    etc, state, run_dir, units = root / "etc", root / "state", root / "run", root / "systemd"
    socket = run_dir / "a.sock"
    fetched = tmp_path / "certs-on-the-control-node"
    install: dict[str, Any] = {
        "targetd_repl_hosts": "all",
        "targetd_repl_become": False,
        "targetd_repl_install_os_packages": False,
        "targetd_repl_load_kernel_modules": False,
        "targetd_repl_pip_install": False,
        "targetd_repl_manage_service": False,
        "targetd_repl_venv": sys.prefix,
        "targetd_repl_site_name": "a",
        "targetd_repl_config_dir": str(etc),
        "targetd_repl_state_dir": str(state),
        "targetd_repl_socket": str(socket),
        "targetd_repl_unit_dir": str(units),
        "targetd_repl_listen": "127.0.0.1:0",
        "targetd_repl_peers": {"b": "127.0.0.1:1"},
        "targetd_repl_journal_size_limit": "64M",
        "targetd_repl_journal_segment_size": "16M",
        "targetd_repl_replication_tuning": {"link_timeout": 2.0, "copy_rate": "50M"},
        "targetd_repl_lab_certs": True,
        "targetd_repl_lab_certs_cli": str(TARGETD_REPL),
        "targetd_repl_certs_src": str(fetched),
        "ansible_python_interpreter": PYTHON,
    }
    inventory = "localhost,"
    host = testinfra.get_host("local://")

    first = ansible.play("install", inventory, extra=install)
    ok(first, "localhost", changed=True)

    settings = config.load(etc / "site.toml")  # the controller's own parser accepts it
    assert (settings.name, settings.state_dir, settings.control_socket) == ("a", state, socket)
    assert {n: p.address for n, p in settings.peers.items()} == {"b": "127.0.0.1:1"}
    assert settings.journal.size_limit == 64 * MiB
    assert settings.replication.copy_rate_bytes == 50 * MiB
    assert settings.tls.cert == etc / "a.pem" and settings.export is None
    toml = host.file(str(etc / "site.toml"))
    assert toml.exists and toml.mode == 0o640
    assert host.file(str(etc)).mode == 0o750 and host.file(str(state)).mode == 0o700
    assert host.file(str(etc / "a.key")).mode == 0o600
    assert host.file(str(etc / "ca.pem")).content == host.file(str(fetched / "ca.pem")).content
    # lab certificates were made on the control node for every site of the play, only them
    assert sorted(p.name for p in fetched.iterdir()) == ["a.key", "a.pem", "ca.key", "ca.pem"]

    # the unit is the project's packaging/targetd-repl.service with this install's paths
    unit = host.file(str(units / "targetd-repl.service")).content_string
    packaged = (REPO / "packaging" / "targetd-repl.service").read_text()

    def body(text: str) -> list[str]:
        return [line for line in text.splitlines() if not line.startswith(("#", "ExecStart="))]

    assert body(unit) == body(packaged)
    assert f"ExecStart={sys.prefix}/bin/targetd-repl serve --config {etc}/site.toml\n" in unit

    # what systemd would start: a controller from the written configuration, through the CLI
    with _serve(etc / "site.toml", socket):
        assert host.file(str(socket)).is_socket
        assert host.socket(f"unix://{socket}").is_listening
        info = host.run(f"{TARGETD_REPL} --site-config {etc / 'site.toml'} site info --json")
        assert info.rc == 0, info.stderr
        assert json.loads(info.stdout) | {"name": "a", "peers": {"b": "127.0.0.1:1"}} == (
            json.loads(info.stdout)
        )

    # again, in check mode with --diff and an [export] section added: only site.toml would
    # change (every other task is idempotent), nothing is written, and the site.toml it would
    # write is one the controller's parser accepts
    export = {
        "portals": ["192.0.2.10:3260"],
        "cmd_time_out": 60,
        "acls": [
            {"initiator": "iqn.2026-01.lab:initiator", "chap_userid": "lab",
             "chap_password": 'se"cr\\et'},
        ],
    }  # fmt: skip
    written = {p: host.file(str(p)).content for p in (etc / "site.toml", etc / "a.key")}
    check = ansible.play(
        "install",
        inventory,
        check=True,
        diff=True,
        extra={**install, "targetd_repl_export": export},
    )
    ok(check, "localhost", changed=True)
    assert check.changed_tasks("localhost") == ["targetd_repl.replication.site : Write site.toml"]
    assert {p: host.file(str(p)).content for p in written} == written
    would = config.parse(tomllib.loads(check.rendered("Write site.toml")))
    assert would.name == "a" and would.tls.ca == etc / "ca.pem"
    assert would.export is not None
    assert would.export.portals == (("192.0.2.10", 3260),) and would.export.cmd_time_out == 60
    assert [(x.initiator, x.chap_userid, x.chap_password) for x in would.export.acls] == [
        ("iqn.2026-01.lab:initiator", "lab", 'se"cr\\et')
    ]
