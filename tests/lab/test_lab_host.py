"""Host-side pieces of the lab that need no guest: scripts, command line, registry, kernel
extraction. Fast; not marked `lab`."""

from __future__ import annotations

import lzma
from pathlib import Path

import pytest

from targetd_repl.lab.errors import LabError
from targetd_repl.lab.prepare import (
    GUEST_MODULES,
    extract_vmlinux,
    stage1_script,
    stage2_script,
)
from targetd_repl.lab.qemu import _kernel_cmdline
from targetd_repl.lab.registry import load_all


def test_scenarios_are_registered() -> None:
    scenarios = load_all()
    assert {"lio_fileio_smoke", "tcmu_ring_probe", "script"} <= set(scenarios)
    assert "iscsid" in scenarios["lio_fileio_smoke"].needs
    assert all(spec.doc for spec in scenarios.values())


def test_kernel_cmdline_carries_params_and_refuses_spaces() -> None:
    line = _kernel_cmdline({"lab_scenario": "tcmu_ring_probe", "lab_python": "/x/.venv/bin/py"})
    assert line.startswith("console=ttyS0 rdinit=/init panic=-1")
    assert "lab_scenario=tcmu_ring_probe lab_python=/x/.venv/bin/py" in line
    with pytest.raises(LabError):
        _kernel_cmdline({"lab_script": "/a b.py"})
    with pytest.raises(LabError):
        _kernel_cmdline({"lab.dotted": "x"})  # a dot makes it a module parameter


def test_stage_scripts() -> None:
    modules = [Path("/k/virtio.ko"), Path("/k/9p.ko")]
    stage1 = stage1_script(
        "6.1.0-50-amd64", Path("/lab/kernel/root/lib/modules/6.1.0-50-amd64"), modules
    )
    assert stage1.startswith("#!/bin/busybox sh\n")
    assert stage1.index("insmod /modules/virtio.ko") < stage1.index("insmod /modules/9p.ko")
    assert "trans=virtio" in stage1 and "cache=loose" in stage1
    assert 'exec switch_root /newroot "$lab_init"' in stage1
    stage2 = stage2_script("6.1.0-50-amd64", Path("/lab/guest-modules.txt"))
    # /etc/target/{pr,alua} must exist before target_core_mod loads
    assert stage2.index("mkdir -p /etc/target/pr /etc/target/alua") < stage2.index("insmod")
    assert "dmesg -n 1" in stage2
    assert "-m targetd_repl.lab.guest" in stage2
    assert "poweroff -f" in stage2
    assert "target_core_user" in GUEST_MODULES and "iscsi_tcp" in GUEST_MODULES


def test_extract_vmlinux_from_an_xz_bzimage(tmp_path: Path) -> None:
    elf = b"\x7fELF" + bytes(range(256)) * 64
    bzimage = tmp_path / "vmlinuz"
    bzimage.write_bytes(
        b"MZ setup code" * 100 + lzma.compress(elf, format=lzma.FORMAT_XZ) + b"tail"
    )
    out = tmp_path / "vmlinux"
    extract_vmlinux(bzimage, out)
    assert out.read_bytes() == elf
    bzimage.write_bytes(b"no kernel in here")
    with pytest.raises(LabError, match="cannot find"):
        extract_vmlinux(bzimage, tmp_path / "none")
