"""Host preparation for the QEMU lab: the Debian guest kernel, its modules and a busybox initramfs.

Everything lands in one cache directory (default `<repo>/.lab/`, or env TARGETD_REPL_LAB_DIR):

    downloads/linux-image-<ver>_*.deb        fetched with `apt-get download` (never installed)
    kernel/<ver>/root/                       `dpkg-deb -x` of it, then `depmod -b root <ver>`
    kernel/<ver>/vmlinux                     the ELF kernel extracted from vmlinuz (PVH boot)
    initramfs-<ver>-<hash>.cpio              busybox + the modules that mount the root, + /init
    guest-modules-<ver>.txt                  stage 2's insmod list (modprobe --show-depends order)
    guest-net-modules-<ver>.txt              the NIC driver's list, loaded by two-site guests only
    guest-init.sh                            stage 2: PID 1 inside the guest, in the host userland

The guest boots like this: the initramfs `/init` (stage 1) loads virtio-pci, 9p and overlay in
`modprobe --show-depends` order, mounts the host's `/` read-only over virtio-9p, puts a tmpfs
overlay on top, mounts the read-write `results` share at /lab-results, bind-mounts the unpacked
kernel's modules at /lib/modules/<ver> (so plain `modprobe` works in the guest) and
`switch_root`s into the host's own userland, where `guest-init.sh` (stage 2) loads the target and
initiator modules, mounts configfs and runs the scenario with the host's Python (the project's
venv, same absolute path). A two-site guest (kernel parameter `lab_site`) first loads the
virtio-net driver (NET_MODULES); single-site guests have no NIC and skip it. `prepare()` is
idempotent: a second call only checks the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import lzma
import os
import re
import shutil
import subprocess
import tempfile
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

from targetd_repl.lab.errors import LabError

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
LAB_DIR_ENV = "TARGETD_REPL_LAB_DIR"
KERNEL_ENV = "TARGETD_REPL_LAB_KERNEL"  # force a kernel version, e.g. 6.1.0-50-amd64
BUSYBOX = Path("/bin/busybox")
KERNEL_META_PACKAGE = "linux-image-amd64"
_KVER_RE = re.compile(r"linux-image-(\d+\.\d+\.\d+-\d+-amd64)\b")

# Stage 1 needs only what mounts the root; stage 2 modprobes the rest from the bind-mounted tree.
INITRAMFS_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "overlay")
# Stage 2 loads these (targets first, after /etc/target/{pr,alua} exist; then the initiators).
GUEST_MODULES = (
    "configfs",
    "target_core_mod",
    "target_core_user",
    "target_core_file",
    "target_core_iblock",
    "iscsi_target_mod",
    "tcm_loop",
    "iscsi_tcp",
    "sd_mod",
    "sg",
)

# Two-site guests only (`lab_site` set): the NIC of the private guest-to-guest network.
NET_MODULES = ("virtio_net",)

NINEP_MSIZE = 262144
MODULES_DONE = "/run/lab-modules-loaded"  # in the guest: its uptime when the modules were in

STAGE1_TEMPLATE = r"""#!/bin/busybox sh
# targetd_repl lab, stage 1 (initramfs): mount the host's root read-only over 9p with a tmpfs
# overlay, then switch_root into the host userland and run stage 2 ($lab_init).
/bin/busybox mkdir -p /bin /proc /sys /dev /lower /rw /newroot
/bin/busybox --install -s /bin
export PATH=/bin
mount -t devtmpfs devtmpfs /dev
exec 0</dev/console 1>/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
fail() {{ echo "LAB-STAGE1-FAILED: $*"; sleep 1; poweroff -f; }}
echo "lab: stage 1 at $(cut -d' ' -f1 /proc/uptime) s"
{insmods}
if [ "$lab_probe" = 1 ]; then echo LAB-PROBE-OK; poweroff -f; fi
mount -t 9p -o ro,trans=virtio,version=9p2000.L,msize={msize},cache=loose hostroot /lower \
    || fail "cannot mount the host root (9p tag hostroot)"
mount -t tmpfs -o mode=0755 tmpfs /rw || fail "tmpfs"
mkdir -p /rw/upper /rw/work
mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work overlay /newroot \
    || fail "cannot mount the overlay"
mkdir -p /newroot/lab-results
mount -t 9p -o trans=virtio,version=9p2000.L,msize={msize} results /newroot/lab-results \
    || fail "cannot mount the results share (9p tag results)"
mkdir -p "/newroot/lib/modules/{kver}"
mount --bind "/newroot{moddir}" "/newroot/lib/modules/{kver}" || fail "cannot bind the modules"
[ -x "/newroot$lab_init" ] || fail "stage 2 init '$lab_init' is missing in the host root"
mount --move /dev /newroot/dev
mount --move /proc /newroot/proc
mount --move /sys /newroot/sys
exec switch_root /newroot "$lab_init"
"""

STAGE2_SCRIPT = r"""#!/bin/busybox sh
# targetd_repl lab, stage 2: PID 1 in the guest, running in the host's userland (9p + overlay).
# busybox (static, its applets run in-process) keeps each step cheap under TCG.
# Kernel command line key=value pairs arrive as environment variables: lab_scenario, lab_python,
# lab_repo. Writes its results under /lab-results, then powers off.
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH HOME=/root LANG=C.UTF-8 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 TERM=dumb
# the crc32c package's software CRC under TCG, whose emulated crc32 instruction is 7x slower
[ "$lab_crc" = software ] && export CRC32C_SW_MODE=force
uptime_s() {{ cut -d' ' -f1 /proc/uptime; }}
t_init=$(uptime_s)
grep -q ' /proc ' /proc/mounts 2>/dev/null || mount -t proc proc /proc
grep -q ' /sys ' /proc/mounts || mount -t sysfs sysfs /sys
grep -q ' /dev ' /proc/mounts || mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs -o mode=0755 tmpfs /run
# No tmpfs over /tmp: the repo, its venv or the lab dir may live there (a CI clone), and writes
# land in the overlay's tmpfs anyway.
mkdir -p /run/lock/iscsi /var/lib/iscsi
hostname targetd-lab
ifconfig lo 127.0.0.1 up
dmesg -n 1
# rtslib needs /etc/target; the kernel needs pr/ and alua/ there BEFORE target_core_mod loads.
mkdir -p /etc/target/pr /etc/target/alua
# The modules of {modules}, dependencies first (modprobe --show-depends, computed by prepare),
# loaded in the background while Python starts; the guest runner waits for MODULES_DONE.
# A two-site guest ($lab_site set) loads its NIC driver ({net_modules}) first.
load_list() {{
    while read -r ko; do
        name=$(basename "$ko" .ko | tr - _)
        [ -d "/sys/module/$name" ] || insmod "/lib/modules/{kver}/$ko" \
            || echo "lab: insmod $ko failed"
    done < "$1"
}}
(
    if [ -n "$lab_site" ] && [ -s "{net_modlist}" ]; then
        load_list "{net_modlist}"
    elif [ -n "$lab_site" ]; then
        echo "lab: no NIC driver list {net_modlist}"
    fi
    load_list "{modlist}"
    grep -q ' /sys/kernel/config ' /proc/mounts || mount -t configfs configfs /sys/kernel/config
    uptime_s > {modules_done}.tmp && mv {modules_done}.tmp {modules_done}
    echo "lab: modules loaded at $(uptime_s) s"
) &
echo "lab: stage 2 at $t_init s"
cd "${{lab_repo:-/}}"
"${{lab_python:-python3}}" -m targetd_repl.lab.guest "$lab_scenario" --out /lab-results \
    --boot-s "$t_init"
echo "$?" > /lab-results/exit-code
echo "lab: scenario exited at $(uptime_s) s, powering off"
sync
umount /lab-results
poweroff -f
echo o > /proc/sysrq-trigger
sleep 5
"""


@dataclass(frozen=True)
class LabImage:
    """What `prepare()` produced: everything `run` needs to boot a guest."""

    lab_dir: str
    kernel_version: str
    vmlinux: str  # the ELF kernel, booted through its PVH entry
    modules_dir: str
    initramfs: str
    stage2_init: str

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)


def lab_dir() -> Path:
    """The cache directory: env TARGETD_REPL_LAB_DIR, else `<repo>/.lab`."""
    env = os.environ.get(LAB_DIR_ENV)
    return Path(env).resolve() if env else REPO_ROOT / ".lab"


def _run(cmd: list[str], *, cwd: Path | None = None, timeout: float = 600) -> str:
    log.debug("lab: running %s", " ".join(cmd))
    try:
        proc = subprocess.run(
            cmd,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except FileNotFoundError as exc:
        raise LabError(f"lab: {cmd[0]} is not installed (run `make deps` as root)") from exc
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"lab: {' '.join(cmd)} timed out after {timeout:.0f} s") from exc
    if proc.returncode != 0:
        raise LabError(
            f"lab: {' '.join(cmd)} failed (exit {proc.returncode}): "
            f"{(proc.stderr or proc.stdout).strip()[-2000:]}"
        )
    return proc.stdout


def pick_kernel_version(cache: Path) -> str:
    """The kernel apt offers for this Debian (what `linux-image-amd64` depends on).

    Env TARGETD_REPL_LAB_KERNEL forces one. When apt knows none (no package lists yet), the
    newest kernel already unpacked in the cache is used."""
    forced = os.environ.get(KERNEL_ENV)
    if forced:
        return forced
    try:
        out = _run(["apt-cache", "depends", KERNEL_META_PACKAGE], timeout=120)
        match = _KVER_RE.search(out)
    except LabError:
        match = None
    if match is None and os.geteuid() == 0:
        log.info("lab: apt knows no %s yet: running apt-get update", KERNEL_META_PACKAGE)
        _run(["apt-get", "update", "-q"], timeout=600)
        match = _KVER_RE.search(_run(["apt-cache", "depends", KERNEL_META_PACKAGE]))
    if match is not None:
        return match.group(1)
    cached = sorted((p.name for p in (cache / "kernel").glob("*-amd64")), reverse=True)
    if cached:
        return cached[0]
    raise LabError(
        f"lab: apt offers no {KERNEL_META_PACKAGE} (a Debian 12 host with its package lists is "
        f"needed; or set {KERNEL_ENV}=<version>-amd64)"
    )


def _fetch_kernel(cache: Path, kver: str) -> Path:
    """Download and unpack linux-image-<kver>; depmod it. Returns the unpacked root."""
    kroot = cache / "kernel" / kver / "root"
    moddir = kroot / "lib" / "modules" / kver
    if (moddir / "modules.dep").is_file() and (kroot / "boot" / f"vmlinuz-{kver}").is_file():
        return kroot
    downloads = cache / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    package = f"linux-image-{kver}"
    debs = sorted(downloads.glob(f"{package}_*.deb"))
    if not debs:
        log.info("lab: apt-get download %s", package)
        try:
            _run(["apt-get", "download", "-q", package], cwd=downloads, timeout=900)
        except LabError:
            if os.geteuid() != 0:
                raise
            _run(["apt-get", "update", "-q"], timeout=600)
            _run(["apt-get", "download", "-q", package], cwd=downloads, timeout=900)
        debs = sorted(downloads.glob(f"{package}_*.deb"))
        if not debs:
            raise LabError(f"lab: apt-get download {package} produced no .deb in {downloads}")
    (cache / "kernel").mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{kver}.", dir=cache / "kernel"))
    staging.chmod(0o755)
    try:
        log.info("lab: unpacking %s", debs[-1].name)
        _run(["dpkg-deb", "-x", str(debs[-1]), str(staging)])
        _run(["depmod", "-b", str(staging), kver])
        if kroot.exists():
            shutil.rmtree(kroot)
        kroot.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(kroot)
        (cache / "kernel" / kver / "deb").write_text(debs[-1].name + "\n")
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return kroot


def module_load_order(kroot: Path, kver: str, modules: tuple[str, ...]) -> list[Path]:
    """The .ko files to insmod, dependencies first, each once (`modprobe --show-depends`)."""
    order: list[Path] = []
    for module in modules:
        out = _run(["modprobe", "-d", str(kroot), "-S", kver, "--show-depends", module])
        for line in out.splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "insmod":
                path = Path(parts[1])
                if path not in order:
                    order.append(path)
            elif parts and parts[0] == "builtin":
                continue
    if not order:
        raise LabError(f"lab: no modules found for {modules} in {kroot}")
    return order


def stage1_script(kver: str, moddir: Path, modules: list[Path]) -> str:
    insmods = "\n".join(f'insmod /modules/{ko.name} || fail "insmod {ko.name}"' for ko in modules)
    return STAGE1_TEMPLATE.format(insmods=insmods, msize=NINEP_MSIZE, kver=kver, moddir=moddir)


def stage2_script(kver: str, modlist: Path, net_modlist: Path | None = None) -> str:
    return STAGE2_SCRIPT.format(
        modules=" ".join(GUEST_MODULES),
        kver=kver,
        modlist=modlist,
        modules_done=MODULES_DONE,
        net_modules=" ".join(NET_MODULES),
        net_modlist=net_modlist or modlist.with_name(f"guest-net-modules-{kver}.txt"),
    )


def net_modules_list(lab_dir: str | Path, kver: str) -> Path:
    """Where `prepare()` writes the NIC driver's insmod list (empty when the kernel lacks it)."""
    return Path(lab_dir) / f"guest-net-modules-{kver}.txt"


def extract_vmlinux(vmlinuz: Path, target: Path) -> None:
    """Decompress the bzImage payload to the ELF vmlinux, which QEMU boots directly (PVH entry,
    CONFIG_PVH=y in Debian's kernels): this skips the in-guest XZ decompression, ~7 s under TCG."""
    data = vmlinuz.read_bytes()
    for magic, factory in (
        (b"\xfd7zXZ\x00", lzma.LZMADecompressor),
        (b"\x28\xb5\x2f\xfd", None),
        (b"\x1f\x8b\x08", lambda: zlib.decompressobj(16 + zlib.MAX_WBITS)),
    ):
        offset = data.find(magic)
        if offset < 0 or factory is None:
            continue
        try:
            elf = factory().decompress(data[offset:])
        except (lzma.LZMAError, zlib.error):
            continue
        if elf[:4] == b"\x7fELF":
            tmp = target.with_name(target.name + ".tmp")
            tmp.write_bytes(elf)
            tmp.replace(target)
            return
    raise LabError(f"lab: cannot find an XZ or gzip compressed ELF kernel inside {vmlinuz}")


def _build_initramfs(target: Path, init: str, modules: list[Path]) -> None:
    if not BUSYBOX.is_file():
        raise LabError(f"lab: {BUSYBOX} missing: install busybox-static (make deps)")
    if shutil.which("cpio") is None:
        raise LabError("lab: cpio missing: install cpio (make deps)")
    with tempfile.TemporaryDirectory(prefix="initramfs.", dir=target.parent) as tmp:
        root = Path(tmp) / "root"
        for sub in ("bin", "modules", "dev", "proc", "sys", "newroot"):
            (root / sub).mkdir(parents=True)
        shutil.copy2(BUSYBOX, root / "bin" / "busybox")
        (root / "bin" / "sh").symlink_to("busybox")
        for ko in modules:
            shutil.copy2(ko, root / "modules" / ko.name)
        (root / "init").write_text(init)
        (root / "init").chmod(0o755)
        names = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
        # Uncompressed: QEMU loads it in no time, while gunzip in the guest costs ~1 s of TCG.
        partial = Path(tmp) / "initramfs.cpio"
        with partial.open("wb") as out:
            cpio = subprocess.run(
                ["cpio", "--quiet", "-o", "-H", "newc", "-R", "0:0"],
                cwd=root,
                input=("\n".join(names) + "\n").encode(),
                stdout=out,
                stderr=subprocess.PIPE,
                check=False,
            )
        if cpio.returncode != 0:
            raise LabError(f"lab: cpio failed: {cpio.stderr.decode(errors='replace')}")
        partial.replace(target)


def _write_if_changed(path: Path, text: str, mode: int) -> None:
    if not path.is_file() or path.read_text() != text:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.chmod(mode)
        tmp.replace(path)


def prepare(cache: Path | None = None) -> LabImage:
    """Make sure the guest kernel, its modules and the initramfs are in the cache. Idempotent."""
    cache = (cache or lab_dir()).resolve()
    cache.mkdir(parents=True, exist_ok=True)
    kver = pick_kernel_version(cache)
    kroot = _fetch_kernel(cache, kver)
    moddir = kroot / "lib" / "modules" / kver
    vmlinux = kroot.parent / "vmlinux"
    if not vmlinux.is_file():
        log.info("lab: extracting vmlinux (PVH boot)")
        extract_vmlinux(kroot / "boot" / f"vmlinuz-{kver}", vmlinux)
    modules = module_load_order(kroot, kver, INITRAMFS_MODULES)
    init = stage1_script(kver, moddir, modules)
    digest = hashlib.sha256(init.encode()).hexdigest()[:12]
    initramfs = cache / f"initramfs-{kver}-{digest}.cpio"
    if not initramfs.is_file():
        log.info("lab: building %s", initramfs.name)
        for stale in cache.glob("initramfs-*.cpio*"):
            stale.unlink()
        _build_initramfs(initramfs, init, modules)
    modlist = cache / f"guest-modules-{kver}.txt"
    guest_modules = module_load_order(kroot, kver, GUEST_MODULES)
    _write_if_changed(
        modlist, "".join(f"{ko.relative_to(moddir)}\n" for ko in guest_modules), 0o644
    )
    net_modlist = net_modules_list(cache, kver)
    try:
        net_modules = module_load_order(kroot, kver, NET_MODULES)
    except LabError as exc:  # single-site guests need no NIC; two-site runs refuse an empty list
        log.warning("lab: no NIC driver in %s: %s", kver, exc)
        net_modules = []
    _write_if_changed(
        net_modlist, "".join(f"{ko.relative_to(moddir)}\n" for ko in net_modules), 0o644
    )
    stage2 = cache / "guest-init.sh"
    _write_if_changed(stage2, stage2_script(kver, modlist, net_modlist), 0o755)
    image = LabImage(
        lab_dir=str(cache),
        kernel_version=kver,
        vmlinux=str(vmlinux),
        modules_dir=str(moddir),
        initramfs=str(initramfs),
        stage2_init=str(stage2),
    )
    _write_if_changed(cache / "image.json", image.to_json() + "\n", 0o644)
    return image
