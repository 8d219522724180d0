#!/usr/bin/python
# Copyright: targetd_repl developers
# Apache-2.0 (see the project's LICENSE)
from __future__ import annotations

DOCUMENTATION = r"""
module: info
short_description: What a targetd-repl site holds - the site, volumes, groups and pairs
description:
  - Reads C(targetd-repl site info), C(volume list), C(group list) and C(pair status), each with
    C(--json). Changes nothing.
version_added: 0.1.0
author: targetd_repl developers
extends_documentation_fragment:
  - targetd_repl.replication.connection
options: {}
attributes:
  check_mode:
    support: full
  diff_mode:
    support: none
"""

EXAMPLES = r"""
- name: Read the site
  targetd_repl.replication.info:
    site_config: /etc/targetd-repl/site.toml
  register: site

- name: This site is primary for web
  ansible.builtin.assert:
    that: site.roles.web == 'primary'
"""

RETURN = r"""
site:
  description: C(site info --json) (name, version, addresses, peers, pid).
  returned: always
  type: dict
volumes:
  description: C(volume list --json).
  returned: always
  type: list
  elements: dict
groups:
  description: C(group list --json).
  returned: always
  type: list
  elements: dict
pairs:
  description: C(pair status --json).
  returned: always
  type: list
  elements: dict
roles:
  description: Group name to this site's role for it.
  returned: always
  type: dict
  sample: {"web": "primary"}
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.targetd_repl.replication.plugins.module_utils.cli import (
    CONNECTION_ARGS,
    Cli,
)


def main() -> None:
    module = AnsibleModule(argument_spec=dict(CONNECTION_ARGS), supports_check_mode=True)
    cli = Cli(module)
    groups = cli.query("group", "list") or []
    module.exit_json(
        changed=False,
        site=cli.query("site", "info"),
        volumes=cli.query("volume", "list") or [],
        groups=groups,
        pairs=cli.query("pair", "status") or [],
        roles={g["name"]: g["role"] for g in groups},
    )


if __name__ == "__main__":
    main()
