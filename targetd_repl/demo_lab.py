"""The real-kernel part of `make demo`: the two-site story in the QEMU lab (`twosite_roles`).

Two guests, one per site, each with its own controller, LIO target and open-iscsi initiator, on
a private network between them: ext4 on site a's LUN, site a killed, failover to b, writes on b,
a's fenced return, failback, switchover home, both LUNs read whole and compared. The story is
printed step by step from both guests' results, with how long each step took and what moved.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from targetd_repl.lab.errors import LabError
from targetd_repl.lab.qemu import run_pair_scenario
from targetd_repl.lab.scenarios_twosite_roles import summary

Step = Callable[[str], float]
Done = Callable[[float, str], None]


def run(step: Step, done: Done) -> bool:
    """Run the lab story; True when every check in both guests passed and the images match."""
    t = step("the real kernel: two QEMU guests (one per site), a private network between them")
    started = time.monotonic()
    try:
        result = run_pair_scenario("twosite_roles", check=False)
    except LabError as exc:
        done(t, f"the lab cannot run here: {exc}")
        return False
    if not result.ok:
        for name, site in sorted(result.sites.items()):
            print(f"   site {name}: {site.error or 'ok'}")
        done(t, f"FAILED after {time.monotonic() - started:.0f} s; logs in {result.run_dir}")
        return False
    data = {name: site.data for name, site in result.sites.items()}
    for line in summary(data):
        print(f"   {line}")
    done(t, f"{result.accel.upper()} guests, {result.duration_s:.0f} s in all")
    return bool(data["a"].get("images_equal"))
