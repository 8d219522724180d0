# Copyright: targetd_repl developers
# Apache-2.0 (see the project's LICENSE)
"""What every module of targetd_repl.replication shares: the options that find the site, and a
wrapper around `targetd-repl ... --json` (AnsibleModule.run_command).

The CLI prints one JSON document on stdout and exits 0, or prints one line on stderr
(`targetd-repl: volume 'x' not found`) and exits 1 (the site refused) or 2 (bad arguments, bad
configuration). A failure becomes `fail_json(msg=<that line>)`, with the command, its exit status
and both streams in the result. The modules never talk gRPC themselves: the CLI is the contract.
"""

from __future__ import annotations

import json
import re
from typing import Any

# The options of every module (doc fragment: targetd_repl.replication.connection).
CONNECTION_ARGS: dict[str, dict[str, Any]] = {
    "site_config": {"type": "path"},
    "socket": {"type": "path"},
    "executable": {"type": "path"},
    "timeout": {"type": "float", "default": 30.0},
}

# Where install.yml puts the CLI, searched after PATH.
SEARCH_DIRS = ["/opt/targetd-repl/venv/bin", "/usr/local/bin"]

_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}


def parse_size(value: object) -> int:
    """`64M`, `1G`, `4096`, `64MiB` -> bytes (powers of 1024), as the CLI and site.toml read
    sizes. Raises ValueError with a message for people."""
    if isinstance(value, bool):
        raise ValueError(f"invalid size {value!r}: use a number with an optional K/M/G/T suffix")
    if isinstance(value, int):
        number, shift = value, 0
    else:
        match = _SIZE.match(str(value))
        if match is None:
            raise ValueError(
                f"invalid size {value!r}: use a number with an optional K, M, G or T suffix"
            )
        number, shift = int(match.group(1)), _UNITS[match.group(2).upper()]
    if number <= 0:
        raise ValueError(f"invalid size {value!r}: must be positive")
    return number << shift


class Cli:
    """`targetd-repl` for one site, as the module's options name it."""

    def __init__(self, module: Any) -> None:
        self.module = module
        params = module.params
        executable = params.get("executable") or module.get_bin_path(
            "targetd-repl", required=True, opt_dirs=SEARCH_DIRS
        )
        self.base: list[str] = [executable]
        if params.get("socket"):
            self.base += ["--socket", params["socket"]]
        if params.get("site_config"):
            self.base += ["--site-config", params["site_config"]]
        self.base += ["--timeout", f"{params.get('timeout') or 30.0:g}"]
        self.commands: list[list[str]] = []  # every command that changed (or would change) state

    def query(self, *args: str) -> Any:
        """A read-only command: its JSON document; a failure fails the module."""
        return self._run(list(args), record=False)

    def change(self, *args: str) -> Any:
        """A command that changes the site: recorded in `commands`; in check mode it is only
        recorded, not run, and None is returned."""
        self.commands.append([*args])
        if self.module.check_mode:
            return None
        return self._run(list(args), record=True)

    def _run(self, args: list[str], *, record: bool) -> Any:
        cmd = [*self.base, *args, "--json"]
        rc, out, err = self.module.run_command(
            cmd, check_rc=False, environ_update={"LC_ALL": "C.UTF-8", "NO_COLOR": "1"}
        )
        if rc != 0:
            self.fail(cmd, rc, out, err)
        lines = [line for line in out.splitlines() if line.strip()]
        if not lines:
            return None
        try:
            # `pair status --until` prints one document per refresh: the last one is the answer.
            return json.loads(lines[-1]) if len(lines) > 1 else json.loads(out)
        except ValueError as error:
            self.module.fail_json(
                msg=f"targetd-repl printed something that is not JSON ({error})",
                cmd=cmd,
                rc=rc,
                stdout=out,
                stderr=err,
            )
        return None  # not reached

    def fail(self, cmd: list[str], rc: int, out: str, err: str) -> None:
        lines = [line.strip() for line in err.splitlines() if line.strip()]
        msg = lines[-1] if lines else f"targetd-repl exited with status {rc} and said nothing"
        self.module.fail_json(msg=msg, cmd=cmd, rc=rc, stdout=out, stderr=err)

    def result(self, **fields: Any) -> dict[str, Any]:
        """The common part of every result: the commands run (or that would run)."""
        return {"commands": [" ".join(c) for c in self.commands], **fields}


def find(items: list[dict[str, Any]] | None, key: str, value: str) -> dict[str, Any] | None:
    for item in items or []:
        if item.get(key) == value:
            return item
    return None
