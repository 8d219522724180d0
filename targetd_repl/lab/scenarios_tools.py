"""Tool scenarios: `script` runs a Python file in a guest (exploring the kernel by hand)."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import TYPE_CHECKING, Any

from targetd_repl.lab.guest import param
from targetd_repl.lab.registry import scenario

if TYPE_CHECKING:
    from targetd_repl.lab.guest import GuestContext


@scenario("script", needs=("iscsid",), timeout_s=600)
def run_script(ctx: GuestContext) -> dict[str, Any]:
    """Run the file named by lab_script (`run script --script FILE`) with the venv's Python."""
    path = param("script")
    ctx.check(path and os.path.isfile(path), f"lab_script names a file ({path!r})")
    assert path is not None
    env = {**os.environ, "LAB_OUT": str(ctx.out)}
    with ctx.timed("script"), (ctx.out / "script.log").open("w") as output:
        proc = subprocess.run(
            [sys.executable, path],
            stdout=output,
            stderr=subprocess.STDOUT,
            env=env,
            check=False,
            timeout=3600,
        )
    tail = (ctx.out / "script.log").read_text(errors="replace")[-4000:]
    ctx.log.info("script output (tail):\n%s", tail)
    ctx.check(proc.returncode == 0, f"{path} exited with {proc.returncode}")
    return {"returncode": proc.returncode, "output_tail": tail}
