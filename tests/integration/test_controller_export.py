"""A controller with `[export]` on a host without LIO (no configfs, as on CI hosts outside the
lab): the start fails with one line naming the problem, and leaves nothing serving. With LIO the
export is tested in the real-kernel lab (tests/lab/test_lab_controller.py)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.integration.harness import CLI, Site, make_certs

pytestmark = pytest.mark.integration


@pytest.mark.skipif(
    Path("/sys/kernel/config/target").is_dir(), reason="this host has LIO: the lab tests it"
)
def test_export_without_lio_fails_the_start_with_one_line(tmp_path: Path) -> None:
    site = Site("a", tmp_path / "a", make_certs(tmp_path / "certs", ["a"]))
    site.config_path.write_text(
        site.config_text() + '\n[export]\nportals = ["127.0.0.1:3260"]\ndemo_mode = true\n'
    )
    done = subprocess.run(
        [*CLI, "serve", "--config", str(site.config_path)],
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 1
    last = done.stderr.decode().strip().splitlines()[-1]
    assert last.startswith("targetd-repl: [export] needs LIO on this host: LIO: cannot "), last
    assert "configfs not mounted at /sys/kernel/config" in last or "target_core_mod" in last
    assert "Traceback" not in done.stderr.decode()
    # the half-done start was undone: no endpoints file, no socket, the state lock released
    assert not (site.state_dir / "endpoints.json").exists()
    assert not site.socket.exists()
