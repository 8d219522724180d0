# Copyright: targetd_repl developers
# Apache-2.0 (see the project's LICENSE)
"""The options every module of targetd_repl.replication shares: how to reach the site."""

from __future__ import annotations


class ModuleDocFragment:
    DOCUMENTATION = r"""
options:
  site_config:
    description:
      - The site's configuration file (C(site.toml)); the CLI uses its control socket.
      - Without O(site_config) and O(socket), the CLI uses the only socket in C(/run/targetd-repl/).
    type: path
  socket:
    description:
      - The site's control socket (C(targetd-repl --socket)). Takes precedence over the socket
        named in O(site_config).
    type: path
  executable:
    description:
      - The C(targetd-repl) command. Default, the one on E(PATH), then in
        C(/opt/targetd-repl/venv/bin) (where C(install.yml) puts it).
    type: path
  timeout:
    description:
      - Deadline, in seconds, of each control API call (C(targetd-repl --timeout)).
    type: float
    default: 30.0
notes:
  - The module runs C(targetd-repl ... --json) on the managed node and parses its answer.
    When the CLI fails, the module fails with the CLI's one-line message as RV(ignore:msg),
    with RV(ignore:cmd), RV(ignore:rc), RV(ignore:stdout) and RV(ignore:stderr) in the result.
"""
