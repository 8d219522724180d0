"""Finding TCMU uio devices: a scan at start and add/remove events, with pyudev.

A TCMU LUN appears as a uio device whose sysfs `name` reads
`tcm-user/<hba>/<lio object name>/<subtype>/<cfg>`; `<subtype>/<cfg>` is the `config` string the
LIO side gave `UserBackedStorageObject`. Ours is `targetd/<volume>`. `maps/map0/size` is the
length to mmap. Other handlers (tcmu-runner) may own other TCMU devices on the same host: we only
report devices and let the service filter on the subtype.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import pyudev

log = logging.getLogger(__name__)

TCMU_PREFIX = "tcm-user/"
SUBTYPE = "targetd"


@dataclass(frozen=True, slots=True)
class TcmuDevice:
    """One TCMU uio device as sysfs describes it."""

    uio: str  # "uio0"
    devnode: str  # "/dev/uio0"
    hba: str  # LIO hba number ("user_<hba>" in configfs)
    lio_name: str  # LIO storage object name
    subtype: str  # handler subtype: ours is "targetd"
    cfg: str  # handler config after the subtype: our volume name
    map_size: int  # bytes to mmap (maps/map0/size)


def parse_uio_name(name: str) -> tuple[str, str, str, str] | None:
    """`tcm-user/<hba>/<name>/<subtype>/<cfg>` -> (hba, name, subtype, cfg); None when the name
    is not a TCMU device. `cfg` may be empty (config string without a '/')."""
    name = name.strip()
    if not name.startswith(TCMU_PREFIX):
        return None
    parts = name[len(TCMU_PREFIX) :].split("/", 3)
    if len(parts) < 3 or not all(parts[:3]):
        return None
    hba, lio_name, subtype = parts[:3]
    cfg = parts[3] if len(parts) == 4 else ""
    return hba, lio_name, subtype, cfg


def read_device(
    sys_path: str, devnode: str | None = None, *, wait: float = 1.0
) -> TcmuDevice | None:
    """Describe the uio device at `sys_path` (a /sys/class/uio/uioN directory), or None when it
    is not a TCMU device. On an `add` event the kernel creates `maps/` just after the uevent, so
    wait up to `wait` seconds for `maps/map0/size`."""
    uio = os.path.basename(sys_path.rstrip("/"))
    try:
        with open(os.path.join(sys_path, "name")) as f:
            parsed = parse_uio_name(f.read())
    except OSError:
        return None
    if parsed is None:
        return None
    size_path = os.path.join(sys_path, "maps", "map0", "size")
    deadline = time.monotonic() + wait
    while True:
        try:
            with open(size_path) as f:
                map_size = int(f.read().strip(), 0)
            break
        except (OSError, ValueError):
            if time.monotonic() >= deadline:
                log.warning("%s: no readable %s; skipped", uio, size_path)
                return None
            time.sleep(0.02)
    hba, lio_name, subtype, cfg = parsed
    return TcmuDevice(uio, devnode or f"/dev/{uio}", hba, lio_name, subtype, cfg, map_size)


class DeviceSource(Protocol):
    """What the service needs from discovery (pyudev in production, a fake in tests)."""

    def scan(self) -> list[TcmuDevice]: ...

    def watch(
        self, on_add: Callable[[TcmuDevice], None], on_remove: Callable[[str], None]
    ) -> None: ...

    def close(self) -> None: ...


class UdevDiscovery:
    """pyudev enumeration of subsystem `uio` plus a Monitor thread for add/remove.

    The monitor listens to the kernel's uevents (`source="kernel"`), not udevd's: the lab guest
    runs no udevd, and we need no udev rules (devtmpfs creates /dev/uioN)."""

    def __init__(self, context: Any = None, *, source: str = "kernel") -> None:
        self._context = context or pyudev.Context()
        self._source = source
        self._observer: Any = None

    def scan(self) -> list[TcmuDevice]:
        found = []
        for dev in self._context.list_devices(subsystem="uio"):
            info = read_device(dev.sys_path, dev.device_node, wait=0.0)
            if info is not None:
                found.append(info)
        return sorted(found, key=lambda d: d.uio)

    def watch(self, on_add: Callable[[TcmuDevice], None], on_remove: Callable[[str], None]) -> None:
        monitor = pyudev.Monitor.from_netlink(self._context, source=self._source)
        monitor.filter_by("uio")

        def handle(device: Any) -> None:
            try:
                if device.action == "add":
                    info = read_device(device.sys_path, device.device_node)
                    if info is not None:
                        on_add(info)
                elif device.action == "remove":
                    on_remove(device.sys_name)
            except Exception:
                log.exception("uio %s event for %s failed", device.action, device.sys_name)

        self._observer = pyudev.MonitorObserver(monitor, callback=handle, name="uio-monitor")
        self._observer.daemon = True
        self._observer.start()

    def close(self) -> None:
        if self._observer is not None:
            self._observer.send_stop()
            self._observer = None
