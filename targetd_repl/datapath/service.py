"""DataPathService: one runner per TCMU device of ours, started and stopped as devices come and
go.

Discovery reports uio devices; the service keeps those whose subtype is `targetd`, asks
`backend_for(volume name)` for the volume behind `targetd/<volume>`, opens the uio device and
starts a runner on its ring. A device whose volume is unknown here is left alone (logged);
`rescan()` picks it up once the volume exists.
"""

from __future__ import annotations

import logging
import mmap
import threading
from collections.abc import Callable
from dataclasses import dataclass

from targetd_repl.datapath.backend import Backend
from targetd_repl.datapath.discovery import SUBTYPE, DeviceSource, TcmuDevice, UdevDiscovery
from targetd_repl.datapath.pages import ScsiConfig
from targetd_repl.datapath.ring import Ring, RingError
from targetd_repl.datapath.runner import Runner
from targetd_repl.datapath.scsi import ScsiDevice
from targetd_repl.datapath.uio import Doorbell, UioDevice

log = logging.getLogger(__name__)

BackendFor = Callable[[str], Backend | None]


@dataclass(slots=True)
class OpenedDevice:
    """A device's shared map and doorbell, and how to let go of them."""

    buffer: mmap.mmap | bytearray | memoryview
    doorbell: Doorbell
    close: Callable[[], None]


Opener = Callable[[TcmuDevice], OpenedDevice]


def open_uio(dev: TcmuDevice) -> OpenedDevice:
    uio = UioDevice(dev.devnode, dev.map_size)
    return OpenedDevice(uio.buffer, uio.doorbell, uio.close)


@dataclass(slots=True)
class _Served:
    device: TcmuDevice
    runner: Runner
    opened: OpenedDevice


class DataPathService:
    def __init__(
        self,
        backend_for: BackendFor,
        *,
        subtype: str = SUBTYPE,
        workers: int = 4,
        config: ScsiConfig | None = None,
        source: DeviceSource | None = None,
        opener: Opener = open_uio,
        stop_timeout: float = 10.0,
        rescan_interval: float = 10.0,
    ) -> None:
        """`rescan_interval` (seconds, 0 = never): how often to reconcile with a full scan, in
        case a uevent was missed."""
        self._backend_for = backend_for
        self._subtype = subtype
        self._workers = workers
        self._config = config
        self._source = source
        self._opener = opener
        self._stop_timeout = stop_timeout
        self._served: dict[str, _Served] = {}
        self._lock = threading.RLock()
        self._started = False
        self._rescan_interval = rescan_interval
        self._stopping = threading.Event()
        self._rescanner: threading.Thread | None = None

    def start(self) -> None:
        """Watch for add/remove events, then serve every device already present. (Watching
        first means a device added during the scan is not missed; adding twice is a no-op.)"""
        with self._lock:
            if self._source is None:
                self._source = UdevDiscovery()
            self._started = True
            self._stopping.clear()
            self._source.watch(self.device_added, self.device_removed)
        self.rescan()
        if self._rescan_interval > 0:
            self._rescanner = threading.Thread(
                target=self._rescan_loop, name="uio-rescan", daemon=True
            )
            self._rescanner.start()

    def rescan(self) -> None:
        """Reconcile with what is present: stop serving devices that are gone (a missed remove
        event, or a uio number reused for another LUN) and serve every present device of ours
        not served yet (e.g. a LUN whose volume was created after the device appeared)."""
        if self._source is None:
            raise RuntimeError("DataPathService.rescan() before start()")
        present = {dev.uio: dev for dev in self._source.scan()}
        with self._lock:
            stale = [uio for uio, s in self._served.items() if present.get(uio) != s.device]
        for uio in stale:
            self.device_removed(uio)
        for dev in present.values():
            self.device_added(dev)

    def _rescan_loop(self) -> None:
        while not self._stopping.wait(self._rescan_interval):
            try:
                self.rescan()
            except Exception:
                log.exception("periodic rescan of uio devices failed")

    def stop(self) -> None:
        self._stopping.set()
        if self._rescanner is not None:
            self._rescanner.join()
            self._rescanner = None
        with self._lock:
            self._started = False
            if self._source is not None:
                self._source.close()
            uios = list(self._served)
        for uio in uios:
            self.device_removed(uio)

    def served(self) -> dict[str, str]:
        """uio device name -> volume name, for every device being served."""
        with self._lock:
            return {uio: s.device.cfg for uio, s in self._served.items()}

    def runner(self, uio: str) -> Runner | None:
        with self._lock:
            served = self._served.get(uio)
            return served.runner if served else None

    def device_added(self, dev: TcmuDevice) -> None:
        with self._lock:
            if not self._started or dev.uio in self._served:
                return
            if dev.subtype != self._subtype:
                log.debug("%s: subtype %r is not ours", dev.uio, dev.subtype)
                return
            backend = self._backend_for(dev.cfg)
            if backend is None:
                log.warning("%s: no volume %r at this site; not served", dev.uio, dev.cfg)
                return
            try:
                opened = self._opener(dev)
            except OSError as exc:
                log.error("%s: cannot open %s: %s", dev.uio, dev.devnode, exc)
                return
            try:
                ring = Ring(opened.buffer)
            except RingError as exc:
                log.error("%s: not a usable TCMU ring: %s", dev.uio, exc)
                opened.close()
                return
            runner = Runner(
                ring,
                opened.doorbell,
                ScsiDevice(backend, self._config),
                workers=self._workers,
                name=f"{dev.uio}:{dev.cfg}",
            )
            self._served[dev.uio] = _Served(dev, runner, opened)
            runner.start()
            log.info("%s: serving volume %r (%s)", dev.uio, dev.cfg, dev.lio_name)

    def device_removed(self, uio: str) -> None:
        with self._lock:
            served = self._served.pop(uio, None)
        if served is None:
            return
        served.runner.stop(self._stop_timeout)
        served.opened.close()
        log.info("%s: no longer serving volume %r", uio, served.device.cfg)
