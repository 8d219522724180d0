#!/usr/bin/python
# Copyright: targetd_repl developers
# Apache-2.0 (see the project's LICENSE)
from __future__ import annotations

DOCUMENTATION = r"""
module: volume
short_description: Create, grow, move or delete a targetd-repl volume
description:
  - Makes a volume of a targetd-repl site exist with a given size, block size and consistency
    group, or makes it absent, through C(targetd-repl volume ... --json).
  - A volume that exists and is smaller than O(size) is grown (C(volume resize)); the site refuses
    to resize a volume of a paired group, and the module fails with its message.
  - A volume larger than O(size) is never shrunk (it would discard data): the module fails.
  - The block size of an existing volume cannot change: the module fails when it differs.
version_added: 0.1.0
author: targetd_repl developers
extends_documentation_fragment:
  - targetd_repl.replication.connection
options:
  name:
    description: The volume's name (1-63 of A-Z a-z 0-9 _ . -, starting alphanumeric).
    type: str
    required: true
  state:
    description: Whether the volume exists.
    type: str
    choices: [present, absent]
    default: present
  size:
    description:
      - Size in bytes, or with a K, M, G or T suffix (powers of 1024), e.g. C(64M).
      - Required to create the volume. On an existing volume, a larger size grows it.
    type: str
  block_size:
    description:
      - Logical block size in bytes. Default 512 when the volume is created; on an existing
        volume, only checked.
    type: int
    choices: [512, 4096]
  group:
    description:
      - The consistency group. Created when missing. Default, when the volume is created, a
        new group named like the volume; an existing volume in another group is moved into it.
    type: str
attributes:
  check_mode:
    support: full
  diff_mode:
    support: full
"""

EXAMPLES = r"""
- name: A 64 MiB volume with 4 KiB blocks in group web
  targetd_repl.replication.volume:
    site_config: /etc/targetd-repl/site.toml
    name: web-data
    size: 64M
    block_size: 4096
    group: web

- name: Grow it (never shrinks)
  targetd_repl.replication.volume:
    name: web-data
    size: 128M

- name: Delete it
  targetd_repl.replication.volume:
    name: web-data
    state: absent
"""

RETURN = r"""
volume:
  description: The volume as the site describes it after the task (predicted in check mode);
    null when absent.
  returned: always
  type: dict
  sample: {"name": "web-data", "size_bytes": 67108864, "block_size": 4096, "group": "web"}
commands:
  description: The C(targetd-repl) commands that changed the site (in check mode, that would).
  returned: always
  type: list
  elements: str
  sample: ["volume create web-data --size 67108864 --block-size 4096 --group web"]
"""

from typing import Any

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.targetd_repl.replication.plugins.module_utils.cli import (
    CONNECTION_ARGS,
    Cli,
    find,
    parse_size,
)

VIEW = ("name", "size_bytes", "block_size", "group")


def view(volume: dict[str, Any] | None) -> dict[str, Any]:
    return {k: volume[k] for k in VIEW} if volume else {}


def ensure_group(cli: Cli, group: str, volumes: list[dict[str, Any]]) -> None:
    """Create `group` unless it exists (a group with volumes is in the volume list already)."""
    if (
        find(volumes, "group", group) is None
        and find(cli.query("group", "list"), "name", group) is None
    ):
        cli.change("group", "create", group)


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            **CONNECTION_ARGS,
            "name": {"type": "str", "required": True},
            "state": {"type": "str", "choices": ["present", "absent"], "default": "present"},
            "size": {"type": "str"},
            "block_size": {"type": "int", "choices": [512, 4096]},
            "group": {"type": "str"},
        },
        supports_check_mode=True,
    )
    p = module.params
    name: str = p["name"]
    size: int | None = None
    if p["size"] is not None:
        try:
            size = parse_size(p["size"])
        except ValueError as error:
            module.fail_json(msg=f"volume {name!r}: {error}")

    cli = Cli(module)
    volumes = cli.query("volume", "list") or []
    current = find(volumes, "name", name)
    after: dict[str, Any] | None = dict(current) if current else None

    if p["state"] == "absent":
        if current is not None:
            cli.change("volume", "delete", name)
            after = None
    elif current is None:
        if size is None:
            module.fail_json(msg=f"volume {name!r} does not exist: give its size to create it")
        block_size = p["block_size"] or 512
        args = ["volume", "create", name, "--size", str(size), "--block-size", str(block_size)]
        if p["group"]:
            ensure_group(cli, p["group"], volumes)
            args += ["--group", p["group"]]
        made = cli.change(*args)
        after = made or {
            "name": name,
            "size_bytes": size,
            "block_size": block_size,
            "group": p["group"] or name,
        }
    else:
        assert after is not None
        if p["block_size"] is not None and p["block_size"] != current["block_size"]:
            module.fail_json(
                msg=f"volume {name!r} has block size {current['block_size']}; a block size "
                f"cannot change (asked {p['block_size']})",
                volume=view(current),
            )
        if size is not None and size < current["size_bytes"]:
            module.fail_json(
                msg=f"refusing to shrink volume {name!r} from {current['size_bytes']} to {size} "
                "bytes: it would discard data (delete and re-create it to make it smaller)",
                volume=view(current),
            )
        if size is not None and size > current["size_bytes"]:
            grown = cli.change("volume", "resize", name, "--size", str(size))
            after = grown or {**after, "size_bytes": size}
        if p["group"] and p["group"] != current["group"]:
            ensure_group(cli, p["group"], volumes)
            moved = cli.change("group", "add", p["group"], name)
            after = moved or {**after, "group": p["group"]}

    changed = bool(cli.commands)
    module.exit_json(
        changed=changed,
        diff={"before": view(current), "after": view(after)},
        **cli.result(volume=view(after) or None),
    )


if __name__ == "__main__":
    main()
