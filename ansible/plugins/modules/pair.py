#!/usr/bin/python
# Copyright: targetd_repl developers
# Apache-2.0 (see the project's LICENSE)
from __future__ import annotations

DOCUMENTATION = r"""
module: pair
short_description: Pair a targetd-repl group with a peer site, suspend, resume or dissolve it
description:
  - Makes a consistency group of a targetd-repl site replicate to the same group at a peer site
    (C(targetd-repl pair create)), suspends it, resumes it, or deletes the pair, through
    C(targetd-repl pair ... --json).
  - Run O(state=present) at the site that holds the data (it becomes the primary); the pair then
    exists at both sites, and O(state=present) at either site is satisfied.
  - The peer and the mode of an existing pair are never changed; the module fails when they
    differ (delete the pair first). O(fence) applies when the pair is created.
  - O(state=present) resumes a pair an admin suspended; other states (V(copying),
    V(suspended-error), V(journal-full), V(swapped)) belong to the controller and are reported.
version_added: 0.1.0
author: targetd_repl developers
extends_documentation_fragment:
  - targetd_repl.replication.connection
options:
  group:
    description: The consistency group.
    type: str
    required: true
  state:
    description:
      - V(present) paired (and not suspended by an admin), V(suspended), or V(absent).
      - V(suspended) creates the pair first when it does not exist.
    type: str
    choices: [present, suspended, absent]
    default: present
  peer:
    description: The peer site's name (a C([peers.NAME]) table of C(site.toml)). Required to
      create the pair.
    type: str
  mode:
    description: Replication mode. Required to create the pair.
    type: str
    choices: [async, sync]
  fence:
    description:
      - Sync pairs, peer unreachable. V(none) the pair goes V(suspended-error) and writes go on
        locally; V(fail-writes) writes fail until the peer is back. Used at creation.
    type: str
    choices: [none, fail-writes]
    default: none
  wait:
    description:
      - With O(state=present), wait until the pair is V(paired) (the initial copy done) before
        returning. Not in check mode.
    type: bool
    default: false
  wait_timeout:
    description: Seconds O(wait) waits before the module fails.
    type: float
    default: 300
attributes:
  check_mode:
    support: full
  diff_mode:
    support: full
"""

EXAMPLES = r"""
- name: Replicate group web to site-b, asynchronously; wait for the initial copy
  targetd_repl.replication.pair:
    site_config: /etc/targetd-repl/site.toml
    group: web
    peer: site-b
    mode: async
    wait: true

- name: Split it (both sites track their changes)
  targetd_repl.replication.pair:
    group: web
    state: suspended

- name: Dissolve it; the group stays, unpaired
  targetd_repl.replication.pair:
    group: web
    state: absent
"""

RETURN = r"""
pair:
  description: The pair as the site describes it after the task (C(pair status --json));
    null when absent. In check mode, the state before the task.
  returned: always
  type: dict
  sample: {"group": "web", "peer": "site-b", "mode": "async", "state": "paired", "role": "primary"}
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
    find,
)

VIEW = ("group", "peer", "mode", "state", "role")


def view(pair: dict[str, Any] | None) -> dict[str, Any]:
    return {k: pair[k] for k in VIEW} if pair else {}


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            **CONNECTION_ARGS,
            "group": {"type": "str", "required": True},
            "state": {
                "type": "str",
                "choices": ["present", "suspended", "absent"],
                "default": "present",
            },
            "peer": {"type": "str"},
            "mode": {"type": "str", "choices": ["async", "sync"]},
            "fence": {"type": "str", "choices": ["none", "fail-writes"], "default": "none"},
            "wait": {"type": "bool", "default": False},
            "wait_timeout": {"type": "float", "default": 300.0},
        },
        supports_check_mode=True,
    )
    p = module.params
    group: str = p["group"]
    cli = Cli(module)
    current = find(cli.query("pair", "status"), "group", group)
    after: dict[str, Any] | None = dict(current) if current else None

    if p["state"] == "absent":
        if current is not None:
            cli.change("pair", "delete", group)
            after = None
    else:
        if current is None:
            missing = [o for o in ("peer", "mode") if not p[o]]
            if missing:
                module.fail_json(
                    msg=f"group {group!r} is not paired: give {' and '.join(missing)} to pair it"
                )
            made = cli.change(
                "pair", "create", group, "--peer", p["peer"], "--mode", p["mode"],
                "--fence", p["fence"],
            )  # fmt: skip
            after = made or {
                "group": group, "peer": p["peer"], "mode": p["mode"], "state": "copying",
                "role": "primary",
            }  # fmt: skip
        else:
            for option in ("peer", "mode"):
                if p[option] and p[option] != current[option]:
                    module.fail_json(
                        msg=f"pair {group!r} has {option} {current[option]!r}, not "
                        f"{p[option]!r}: a pair's {option} cannot change (delete the pair "
                        "and create it again)",
                        pair=view(current),
                    )
        assert after is not None
        if p["state"] == "suspended" and after["state"] != "suspended":
            suspended = cli.change("pair", "suspend", group)
            after = suspended or {**after, "state": "suspended"}
        elif p["state"] == "present" and after["state"] == "suspended":
            resumed = cli.change("pair", "resume", group)
            after = resumed or {**after, "state": "copying"}
        if p["state"] == "present" and p["wait"] and not module.check_mode:
            after = cli.query(
                "pair", "status", group, "--until", "paired",
                "--wait-timeout", f"{p['wait_timeout']:g}", "--interval", "0.2",
            )  # fmt: skip
            if isinstance(after, list):
                after = after[0] if after else None

    module.exit_json(
        changed=bool(cli.commands),
        diff={"before": view(current), "after": view(after)},
        **cli.result(pair=after),
    )


if __name__ == "__main__":
    main()
