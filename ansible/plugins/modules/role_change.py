#!/usr/bin/python
# Copyright: targetd_repl developers
# Apache-2.0 (see the project's LICENSE)
from __future__ import annotations

DOCUMENTATION = r"""
module: role_change
short_description: Move the primary role of a targetd-repl group (switchover, failover, failback,
  resolve)
description:
  - Runs a role change of a paired group at the site the module talks to, through
    C(targetd-repl switchover|failover|failback|resolve GROUP --json), and follows it until it is
    done (unless O(wait=false)). See the project's C(docs/roles.md).
  - Idempotent. Before anything, the module reads C(role status GROUP --json); when the site is
    already where the action leads, nothing runs and RV(changed) is false. A role change still
    running (a switchover's drain, a failback's copy) is followed, not started again.
  - V(switchover) and V(failover) run at the site that becomes primary; they are done when this
    site is primary for the group.
  - V(failback) runs at the site that took over by a failover; it is done when the pair is
    V(paired) again (the old primary resynchronised as secondary; or the role since switched
    back).
  - V(resolve) runs at either site after a split-brain, naming the O(survivor); it is done when
    the pair is V(paired) again (V(copying) while the survivor's copy runs).
version_added: 0.1.0
author: targetd_repl developers
extends_documentation_fragment:
  - targetd_repl.replication.connection
options:
  group:
    description: The paired consistency group.
    type: str
    required: true
  action:
    description: The role change.
    type: str
    required: true
    choices: [switchover, failover, failback, resolve]
  survivor:
    description: With O(action=resolve), the site whose data is kept.
    type: str
  force:
    description:
      - With O(action=failover), promote this site even while the primary answers (it is fenced
        when it next connects). Without it the site refuses when the primary is reachable.
    type: bool
    default: false
  wait:
    description:
      - Follow the role change until it is no longer running. V(false) returns once it started
        (C(--no-wait)).
    type: bool
    default: true
  wait_timeout:
    description:
      - Seconds to follow before the module fails (the role change goes on at the site). 0 for
        no limit.
    type: float
    default: 600
attributes:
  check_mode:
    support: full
  diff_mode:
    support: full
"""

EXAMPLES = r"""
- name: Planned switchover - run at site-b, the secondary, which becomes primary
  targetd_repl.replication.role_change:
    site_config: /etc/targetd-repl/site.toml
    group: web
    action: switchover

- name: Site-a is gone; promote site-b
  targetd_repl.replication.role_change:
    group: web
    action: failover

- name: Site-a is back; resync it from site-b (run at site-b)
  targetd_repl.replication.role_change:
    group: web
    action: failback

- name: After a split-brain, keep site-a's data
  targetd_repl.replication.role_change:
    group: web
    action: resolve
    survivor: site-a
"""

RETURN = r"""
role_change:
  description: The role change as C(targetd-repl ... --json) reports it (command, phase, step,
    epoch, snapshot, pair); when nothing ran, C(role status --json).
  returned: always
  type: dict
before:
  description: This site's role and the pair's state before the task.
  returned: always
  type: dict
  sample: {"role": "secondary", "state": "paired"}
after:
  description: This site's role and the pair's state after the task (predicted in check mode).
  returned: always
  type: dict
  sample: {"role": "primary", "state": "paired"}
commands:
  description: The C(targetd-repl) commands that changed the site (in check mode, that would).
  returned: always
  type: list
  elements: str
"""

from typing import Any

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.targetd_repl.replication.plugins.module_utils.cli import (
    CONNECTION_ARGS,
    Cli,
)

# Check mode: where each action leads (None: unchanged).
PREDICTED: dict[str, dict[str, str | None]] = {
    "switchover": {"role": "primary", "state": None},
    "failover": {"role": "primary", "state": "swapped"},
    "failback": {"role": "primary", "state": "paired"},
    "resolve": {"role": None, "state": "paired"},
}


def where(status: dict[str, Any]) -> dict[str, Any]:
    pair = status.get("pair") or {}
    return {"role": pair.get("role"), "state": pair.get("state")}


def reached(action: str, now: dict[str, Any]) -> bool:
    """Whether the site is already where `action` leads."""
    if action in ("switchover", "failover"):
        return bool(now["role"] == "primary")
    # failback, resolve: the pair is whole again (here primary, or secondary once the role
    # was switched back: nothing is left to fail back or resolve)
    return bool(now["state"] == "paired")


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            **CONNECTION_ARGS,
            "group": {"type": "str", "required": True},
            "action": {
                "type": "str",
                "required": True,
                "choices": ["switchover", "failover", "failback", "resolve"],
            },
            "survivor": {"type": "str"},
            "force": {"type": "bool", "default": False},
            "wait": {"type": "bool", "default": True},
            "wait_timeout": {"type": "float", "default": 600.0},
        },
        required_if=[("action", "resolve", ("survivor",))],
        supports_check_mode=True,
    )
    p = module.params
    group: str = p["group"]
    action: str = p["action"]
    if p["force"] and action != "failover":
        module.fail_json(msg=f"force goes with action=failover, not {action}")
    if p["survivor"] and action != "resolve":
        module.fail_json(msg=f"survivor goes with action=resolve, not {action}")

    cli = Cli(module)
    status: dict[str, Any] = cli.query("role", "status", group)
    before = where(status)
    if before["role"] is None:
        module.fail_json(
            msg=f"group {group!r} is not paired at this site: there is no role to change",
            before=before,
        )

    args = [action, group]
    if action == "failover" and p["force"]:
        args.append("--force")
    if action == "resolve":
        args += ["--survivor", p["survivor"]]
    if p["wait"]:
        args += ["--wait-timeout", f"{p['wait_timeout']:g}", "--interval", "0.2"]
    else:
        args.append("--no-wait")

    running = status.get("phase") == "running"
    if reached(action, before) and not (running and status.get("command") == action):
        after = before  # already there: nothing runs
    elif reached(action, before):
        # Already there, its tail still running (a drain, a copy): follow it, change nothing.
        if p["wait"] and not module.check_mode:
            status = cli.query(*args)
        after = where(status)
    else:
        reply = cli.change(*args)
        if reply is not None:
            status = reply
            after = where(status)
        else:  # check mode: where the action leads
            after = dict(PREDICTED[action])
            after = {k: v if v is not None else before[k] for k, v in after.items()}

    module.exit_json(
        changed=bool(cli.commands),
        before=before,
        after=after,
        diff={"before": before, "after": after},
        **cli.result(role_change=status),
    )


if __name__ == "__main__":
    main()
