#!/usr/bin/python
# Copyright: targetd_repl developers
# Apache-2.0 (see the project's LICENSE)
from __future__ import annotations

DOCUMENTATION = r"""
module: snapshot
short_description: Create or delete a snapshot of a targetd-repl volume
description:
  - Makes a named copy-on-write snapshot of a volume exist (C(targetd-repl snapshot create)), or
    makes it absent (C(snapshot delete)). An existing snapshot is left as it is, keeping the
    image of the moment it was taken.
  - Rolling a volume back is not a state and has no module; use C(targetd-repl snapshot rollback).
version_added: 0.1.0
author: targetd_repl developers
extends_documentation_fragment:
  - targetd_repl.replication.connection
options:
  volume:
    description: The volume.
    type: str
    required: true
  name:
    description: The snapshot's name.
    type: str
    required: true
  state:
    description: Whether the snapshot exists.
    type: str
    choices: [present, absent]
    default: present
  force:
    description: With O(state=absent), also delete a snapshot a role change made (it keeps data).
    type: bool
    default: false
attributes:
  check_mode:
    support: full
  diff_mode:
    support: none
"""

EXAMPLES = r"""
- name: Snapshot web-data before an upgrade
  targetd_repl.replication.snapshot:
    site_config: /etc/targetd-repl/site.toml
    volume: web-data
    name: before-upgrade
"""

RETURN = r"""
snapshot:
  description: The snapshot (C(snapshot list --json)); null when absent or in check mode before
    it exists.
  returned: always
  type: dict
  sample: {"volume": "web-data", "name": "before-upgrade", "kind": "user", "epoch": 1, "seq": 42}
commands:
  description: The C(targetd-repl) commands that changed the site (in check mode, that would).
  returned: always
  type: list
  elements: str
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.targetd_repl.replication.plugins.module_utils.cli import (
    CONNECTION_ARGS,
    Cli,
    find,
)


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            **CONNECTION_ARGS,
            "volume": {"type": "str", "required": True},
            "name": {"type": "str", "required": True},
            "state": {"type": "str", "choices": ["present", "absent"], "default": "present"},
            "force": {"type": "bool", "default": False},
        },
        supports_check_mode=True,
    )
    p = module.params
    cli = Cli(module)
    current = find(cli.query("snapshot", "list", p["volume"]), "name", p["name"])
    after = current
    if p["state"] == "present" and current is None:
        after = cli.change("snapshot", "create", p["volume"], p["name"])
    elif p["state"] == "absent" and current is not None:
        cli.change(
            "snapshot", "delete", p["volume"], p["name"], *(["--force"] if p["force"] else [])
        )
        after = None
    module.exit_json(changed=bool(cli.commands), **cli.result(snapshot=after))


if __name__ == "__main__":
    main()
