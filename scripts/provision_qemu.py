#!/usr/bin/env python3
"""Provision, once, a QEMU with the ``vfio-user-pci`` device inside a Debian trixie root.

The host (Debian 12) ships QEMU 7.2, which has no vfio-user client; QEMU 11.1 from
trixie-backports has one. Rather than changing the host's packages, this script builds a
Debian trixie root with debootstrap in a cache directory and installs QEMU there, plus a
kernel, busybox and cpio so that tests can boot a tiny Linux guest that sees the emulated
device. QEMU then runs chrooted into that root, so every path it is given (kernel, initrd,
sockets) is a path inside the root; sockets go in :func:`shared_dir`.

Command line (stdout gets a JSON object with the paths, progress goes to stderr)::

    provision_qemu.py [--cache-dir DIR] [--force] [--mirror URL] [--verbose]
    provision_qemu.py [--cache-dir DIR] --print

The cache directory is ``--cache-dir``, else ``$VFIO_MEDIATE_CACHE``, else
``${XDG_CACHE_HOME:-~/.cache}/vfio-mediate``; the root is ``<cache>/trixie-root``. A stamp
file written last marks a finished provision: with it present nothing is done; without it
the root is taken as half-built and is unmounted, removed and rebuilt. Packages added later
(``GUEST_PYTHON_PACKAGES``: the guest's Python, to run the project inside a nested guest) are
installed in place into a finished root whose stamp has an older ``additions`` number.

Python API (load this file by path, e.g. with ``importlib.util.spec_from_file_location``)::

    prov = provision(cache_dir)                  # -> Provision(root, qemu, kernel, ...)
    initrd = build_initramfs(prov, "echo hi\\npoweroff -f\\n")
    sock = shared_dir(prov) / "dev0.sock"        # QEMU sees it as /run/vfio-mediate/dev0.sock
    proc = run_in_root(prov, [prov.qemu, "-kernel", prov.kernel, "-initrd", initrd, ...])
"""

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

PROG = "provision_qemu"
SUITE = "trixie"
BACKPORTS = f"{SUITE}-backports"
ROOT_DIR_NAME = f"{SUITE}-root"
# Bumped whenever the recipe below changes, so an older root is rebuilt, not half-reused.
RECIPE_VERSION = 1
# Bumped whenever packages are only added: a root of the same recipe with an older (or no)
# "additions" number gets them installed in place (apt-get install), without a rebuild.
ADDITIONS_VERSION = 1
STAMP_NAME = ".vfio-mediate-provisioned.json"
LOCK_NAME = f".{ROOT_DIR_NAME}.lock"
LOG_NAME = "provision.log"

QEMU_PACKAGES = ("qemu-system-x86", "qemu-system-data", "seabios", "ipxe-qemu")
GUEST_PACKAGES = ("linux-image-amd64", "busybox-static", "cpio")
# What the guest needs to run the project itself (tests of real vfio-pci devices run inside a
# guest that boots this root over virtio-9p): Debian's Python and the core's dependencies.
GUEST_PYTHON_PACKAGES = ("python3", "python3-pydantic", "python3-pluggy", "python3-pytest")
VFIO_USER_DEVICE = "vfio-user-pci"

# Paths as seen inside the root.
QEMU_IN_ROOT = "/usr/bin/qemu-system-x86_64"
BIOS_DIR_IN_ROOT = "/usr/share/qemu"
SHARED_DIR_IN_ROOT = "/run/vfio-mediate"
INITRAMFS_DIR_IN_ROOT = "/var/cache/vfio-mediate/initramfs"
BUSYBOX_CANDIDATES = ("/usr/bin/busybox", "/bin/busybox")

# Commands in the root get a clean environment: the caller's PATH may name host-only
# tools (virtualenvs, pyenv shims) and its locale may not exist in a minbase root.
ROOT_ENV: dict[str, str] = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
}
APT_ENV: dict[str, str] = {**ROOT_ENV, "DEBIAN_FRONTEND": "noninteractive"}
TAIL_LINES = 15


class ProvisionError(Exception):
    """A provisioning step failed; the message is meant for the user as is."""


@dataclass(frozen=True)
class Provision:
    """A finished provision: ``root`` is a host path, the other paths are inside the root."""

    root: Path
    qemu: str = QEMU_IN_ROOT
    kernel: str = ""
    bios_dir: str = BIOS_DIR_IN_ROOT
    qemu_version: str = ""

    def host_path(self, inner: str | os.PathLike[str]) -> Path:
        """Return the host path of ``inner``, a path as seen inside the root."""
        return self.root / os.fspath(inner).lstrip("/")

    def to_json(self) -> dict[str, str]:
        """Return the paths as a JSON-ready dict (the script's output)."""
        return {
            "root": str(self.root),
            "qemu": self.qemu,
            "kernel": self.kernel,
            "bios_dir": self.bios_dir,
            "shared_dir": str(self.host_path(SHARED_DIR_IN_ROOT)),
            "qemu_version": self.qemu_version,
        }


# --------------------------------------------------------------------------- helpers


def _say(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def default_cache_dir() -> Path:
    """Return ``$VFIO_MEDIATE_CACHE`` or ``${XDG_CACHE_HOME:-~/.cache}/vfio-mediate``."""
    explicit = os.environ.get("VFIO_MEDIATE_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "vfio-mediate"


def _find_tool(name: str) -> str | None:
    # Root's PATH under some sudo/CI set-ups lacks the sbin directories, where
    # debootstrap and chroot live; look there as well.
    found = shutil.which(name)
    if found:
        return found
    for directory in ("/usr/sbin", "/sbin"):
        candidate = os.path.join(directory, name)
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def _require_tool(name: str) -> str:
    path = _find_tool(name)
    if path is None:
        raise ProvisionError(f"'{name}' not found on this host")
    return path


def _chroot_argv(root: Path, argv: Sequence[str | os.PathLike[str]]) -> list[str]:
    return [_require_tool("chroot"), str(root), *(os.fspath(arg) for arg in argv)]


def _run_logged(
    argv: Sequence[str],
    log: Path,
    what: str,
    *,
    verbose: bool = False,
    env: Mapping[str, str] | None = None,
    hint: str = "",
) -> None:
    """Run ``argv``, appending its output to ``log``; on failure raise with its last lines."""
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    with log.open("a", encoding="utf-8", errors="replace") as logf:
        logf.write(f"\n$ {shlex.join(argv)}\n")
        logf.flush()
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                text=True,
                errors="replace",
            )
        except OSError as exc:
            raise ProvisionError(f"cannot run {argv[0]}: {exc.strerror}") from None
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                logf.write(line)
                tail.append(line.rstrip("\n"))
                if verbose:
                    sys.stderr.write(line)
            returncode = proc.wait()
        except BaseException:
            # Interrupted (Ctrl-C, SIGTERM): stop the child before our finally blocks
            # unmount what it may still be using.
            proc.kill()
            proc.wait()
            raise
    if returncode != 0:
        shown = "\n".join(f"  | {line}" for line in tail) or "  | (no output)"
        hint_text = f" ({hint})" if hint else ""
        raise ProvisionError(
            f"{what} failed with exit code {returncode}{hint_text}; "
            f"last lines of its output (full log: {log}):\n{shown}"
        )


# --------------------------------------------------------------------------- mounts


def _unescape_mountinfo(field: str) -> str:
    # /proc/self/mountinfo writes space, tab, newline and backslash as octal escapes.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _mount_points_under(path: Path) -> list[str]:
    """Return mount points at or below ``path``, deepest first."""
    prefix = os.path.realpath(path)
    found: set[str] = set()
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as mountinfo:
        for line in mountinfo:
            fields = line.split()
            if len(fields) < 5:
                continue
            point = _unescape_mountinfo(fields[4])
            if point == prefix or point.startswith(prefix + "/"):
                found.add(point)
    # A mount below another must go first; deeper paths are longer.
    return sorted(found, key=len, reverse=True)


def _umount(point: str) -> bool:
    """Unmount ``point``; fall back to a lazy detach if it is busy."""
    for argv in (["umount", point], ["umount", "--lazy", point]):
        result = subprocess.run(argv, capture_output=True, text=True, check=False)
        if result.returncode == 0:
            return True
    return False


def _unmount_all_under(root: Path) -> None:
    # Stacked mounts on one point need one umount each, hence the rounds.
    for _ in range(8):
        points = _mount_points_under(root)
        if not points:
            return
        for point in points:
            _umount(point)
    left = _mount_points_under(root)
    if left:
        raise ProvisionError(f"cannot unmount {', '.join(left)}")


@contextlib.contextmanager
def _apt_mounts(root: Path) -> Iterator[None]:
    """Mount proc and bind /dev into ``root`` for apt; always unmount them again."""
    mounted: list[Path] = []
    mounts = (
        (root / "proc", ["mount", "-t", "proc", "proc"]),
        (root / "dev", ["mount", "--bind", "/dev"]),
    )
    try:
        for target, argv in mounts:
            target.mkdir(exist_ok=True)
            result = subprocess.run(
                [*argv, str(target)], capture_output=True, text=True, check=False
            )
            if result.returncode != 0:
                raise ProvisionError(
                    f"cannot mount {target}: {result.stderr.strip() or 'mount failed'}"
                )
            mounted.append(target)
        yield
    finally:
        for target in reversed(mounted):
            if not _umount(str(target)):
                _say(f"warning: could not unmount {target}")


def _remove_root(root: Path) -> None:
    """Remove a half-built root, unmounting anything under it first."""
    if root.is_symlink():
        # Not ours to empty: drop the link itself and build a real directory in its place.
        root.unlink()
        return
    _unmount_all_under(root)
    # Deleting with /dev still bound inside would delete the host's device nodes.
    if _mount_points_under(root):
        raise ProvisionError(f"refusing to delete {root}: something is still mounted in it")
    shutil.rmtree(root)


@contextlib.contextmanager
def _locked(cache: Path) -> Iterator[None]:
    """Hold an exclusive lock so that parallel test runs do not provision twice."""
    with open(cache / LOCK_NAME, "w", encoding="utf-8") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _say("waiting for another provision of this cache to finish")
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


# --------------------------------------------------------------------------- provision


def _read_stamp(root: Path, *, additions: bool = True) -> Provision | None:
    """The finished provision in ``root``; with ``additions``, only if it also has the
    packages of :data:`ADDITIONS_VERSION` (else see :func:`_add_packages`)."""
    try:
        data = json.loads((root / STAMP_NAME).read_text(encoding="utf-8"))
        if data.get("recipe") != RECIPE_VERSION:
            return None
        if additions and data.get("additions", 0) != ADDITIONS_VERSION:
            return None
        prov = Provision(
            root=root,
            qemu=str(data["qemu"]),
            kernel=str(data["kernel"]),
            bios_dir=str(data["bios_dir"]),
            qemu_version=str(data.get("qemu_version", "")),
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    # A stamp whose files were pruned by hand is no provision.
    if not (prov.host_path(prov.qemu).is_file() and prov.host_path(prov.kernel).is_file()):
        return None
    return prov


def _write_stamp(prov: Provision) -> None:
    data = {
        "recipe": RECIPE_VERSION,
        "additions": ADDITIONS_VERSION,
        "qemu": prov.qemu,
        "kernel": prov.kernel,
        "bios_dir": prov.bios_dir,
        "qemu_version": prov.qemu_version,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    stamp = prov.root / STAMP_NAME
    partial = stamp.with_name(stamp.name + ".partial")
    partial.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(partial, stamp)


def load_provision(cache_dir: str | os.PathLike[str] | None = None) -> Provision | None:
    """Return the finished provision in ``cache_dir`` (default: :func:`default_cache_dir`).

    Returns None if there is none; never needs root.
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return _read_stamp(cache.absolute() / ROOT_DIR_NAME)


def _ensure_debootstrap(log: Path, verbose: bool) -> str:
    found = _find_tool("debootstrap")
    if found:
        return found
    apt_get = _find_tool("apt-get")
    if apt_get is None:
        raise ProvisionError(
            "debootstrap is not installed and there is no apt-get to install it; "
            "install debootstrap and run again"
        )
    _say("debootstrap is missing; installing it on the host with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = [apt_get, "install", "-y", "debootstrap"]
    try:
        _run_logged(install, log, "apt-get install debootstrap", verbose=verbose, env=env)
    except ProvisionError:
        # A fresh machine may have no package lists yet: fetch them and retry once.
        try:
            _run_logged(
                [apt_get, "update"],
                log,
                "apt-get update (to install debootstrap)",
                verbose=verbose,
                env=env,
                hint="is the network up?",
            )
            _run_logged(install, log, "apt-get install debootstrap", verbose=verbose, env=env)
        except ProvisionError as exc:
            raise ProvisionError(f"cannot install debootstrap: {exc}") from None
    found = _find_tool("debootstrap")
    if found is None:
        raise ProvisionError("debootstrap was installed but cannot be found on PATH")
    return found


def _write_backports_source(root: Path) -> None:
    """Add trixie-backports, derived from the mirror debootstrap wrote into sources.list."""
    lines: list[str] = []
    sources = root / "etc/apt/sources.list"
    for line in sources.read_text(encoding="utf-8").splitlines():
        words = line.split()
        if not words or words[0] not in ("deb", "deb-src"):
            continue
        # Skip an optional "[option=value ...]" block to reach "URI suite components".
        index = 1
        if index < len(words) and words[index].startswith("["):
            while index < len(words) and not words[index].endswith("]"):
                index += 1
            index += 1
        if index + 1 < len(words) and words[index + 1] == SUITE:
            words[index + 1] = BACKPORTS
            lines.append(" ".join(words))
    if not lines:
        raise ProvisionError(f"no '{SUITE}' entry in {sources} to derive {BACKPORTS} from")
    target = root / "etc/apt/sources.list.d/backports.list"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _block_service_starts(root: Path) -> None:
    # Packages must not start daemons inside a chroot that shares the host's /dev and
    # network; exit code 101 of policy-rc.d means "action forbidden".
    policy = root / "usr/sbin/policy-rc.d"
    policy.write_text("#!/bin/sh\nexit 101\n", encoding="utf-8")
    policy.chmod(0o755)


def _version_key(name: str) -> list[int | str]:
    # re.split with a group alternates text and digits, so items compare like with like.
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _find_kernel(root: Path) -> str:
    kernels = sorted((root / "boot").glob("vmlinuz-*"), key=lambda p: _version_key(p.name))
    if not kernels:
        raise ProvisionError(f"no /boot/vmlinuz-* in {root} after installing linux-image-amd64")
    return f"/boot/{kernels[-1].name}"


def _check_qemu(root: Path) -> str:
    """Return QEMU's version line; fail unless ``-device help`` lists vfio-user-pci."""

    def ask(*args: str) -> str:
        result = subprocess.run(
            _chroot_argv(root, [QEMU_IN_ROOT, *args]),
            capture_output=True,
            text=True,
            env=ROOT_ENV,
            check=False,
            timeout=60,
        )
        if result.returncode != 0:
            raise ProvisionError(
                f"{QEMU_IN_ROOT} {' '.join(args)} failed in {root}: "
                f"{result.stderr.strip() or result.stdout.strip()}"
            )
        return result.stdout

    version = ask("--version").splitlines()[0].strip()
    if not re.search(rf'^name "{re.escape(VFIO_USER_DEVICE)}"', ask("-device", "help"), re.M):
        raise ProvisionError(
            f"{version} in {root} has no {VFIO_USER_DEVICE} device "
            f"('-device help' does not list it); a QEMU >= 10.1 is needed"
        )
    return version


def provision(
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    force: bool = False,
    verbose: bool = False,
    mirror: str | None = None,
) -> Provision:
    """Provision the trixie root with QEMU and guest packages, or return the existing one.

    ``cache_dir`` defaults to :func:`default_cache_dir`. A finished provision (stamp present)
    is returned at once without needing root; otherwise this must run as root, and it
    rebuilds a half-built root from scratch. ``force`` rebuilds even a finished one;
    ``mirror`` is passed to debootstrap (default: debootstrap's own). Raises
    :class:`ProvisionError` with a user-facing message on failure.
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    cache = cache.absolute()
    root = cache / ROOT_DIR_NAME
    if not force:
        done = _read_stamp(root)
        if done is not None:
            return done
    if os.geteuid() != 0:
        if _read_stamp(root, additions=False) is not None:
            raise ProvisionError(
                f"the provision in {cache} lacks packages added since it was made "
                f"({' '.join(GUEST_PYTHON_PACKAGES)}); run this script as root once to add them"
            )
        raise ProvisionError(
            f"not provisioned yet in {cache}, and provisioning must run as root "
            "(debootstrap, mount and chroot need it)"
        )
    if platform.machine() != "x86_64":
        raise ProvisionError(f"needs an x86_64 host (linux-image-amd64), not {platform.machine()}")
    cache.mkdir(parents=True, exist_ok=True)
    with _locked(cache):
        # Another process may have finished while we waited for the lock.
        done = None if force else _read_stamp(root)
        if done is not None:
            return done
        older = None if force else _read_stamp(root, additions=False)
        if older is not None:
            return _add_packages(older, cache / LOG_NAME, verbose=verbose)
        return _build(root, cache / LOG_NAME, verbose=verbose, mirror=mirror)


def _build(root: Path, log: Path, *, verbose: bool, mirror: str | None) -> Provision:
    started = time.monotonic()
    log.write_text(f"{PROG}: provisioning {root}\n", encoding="utf-8")

    def step(message: str) -> None:
        _say(f"[{time.monotonic() - started:5.1f}s] {message}")

    if root.exists() or os.path.islink(root):
        step(f"removing the existing root {root} (unfinished, outdated or --force)")
        _remove_root(root)
    debootstrap = _ensure_debootstrap(log, verbose)

    step(f"debootstrap --variant=minbase {SUITE} (about half a minute)")
    argv = [debootstrap, "--variant=minbase", SUITE, str(root)]
    if mirror:
        argv.append(mirror)
    _run_logged(argv, log, "debootstrap", verbose=verbose, hint="is the Debian mirror reachable?")
    # debootstrap mounts proc/sys itself; make sure nothing of it outlives a failure.
    _unmount_all_under(root)

    _write_backports_source(root)
    _block_service_starts(root)
    apt_get = ["apt-get", "-o", "Dpkg::Use-Pty=0"]
    with _apt_mounts(root):
        step("apt-get update")
        _run_logged(
            _chroot_argv(root, [*apt_get, "update"]),
            log,
            "apt-get update in the root",
            verbose=verbose,
            env=APT_ENV,
            hint="is the Debian mirror reachable?",
        )
        step(f"installing {' '.join(QEMU_PACKAGES)} from {BACKPORTS}")
        _run_logged(
            _chroot_argv(
                root,
                [
                    *apt_get,
                    "install",
                    "-y",
                    "--no-install-recommends",
                    "-t",
                    BACKPORTS,
                    *QEMU_PACKAGES,
                ],
            ),
            log,
            f"installing QEMU from {BACKPORTS}",
            verbose=verbose,
            env=APT_ENV,
        )
        step(f"installing {' '.join(GUEST_PACKAGES)} for the guest")
        _run_logged(
            _chroot_argv(
                root,
                [*apt_get, "install", "-y", "--no-install-recommends", *GUEST_PACKAGES],
            ),
            log,
            "installing the guest packages",
            verbose=verbose,
            # Tests boot the kernel with their own busybox initramfs, so the kernel's hook
            # need not build an initrd (it would take about 15 s and 36 MB, twice over).
            env={**APT_ENV, "INITRD": "No"},
        )
        _install_guest_python(root, log, verbose=verbose, step=step)
        # The downloaded .deb files are not needed again and are a good share of the size.
        _run_logged(_chroot_argv(root, [*apt_get, "clean"]), log, "apt-get clean", env=APT_ENV)
    _unmount_all_under(root)

    step(f"checking that QEMU lists {VFIO_USER_DEVICE}")
    # Checked after unmounting, as tests will run it: without proc or /dev mounted.
    qemu_version = _check_qemu(root)
    prov = Provision(
        root=root,
        qemu=QEMU_IN_ROOT,
        kernel=_find_kernel(root),
        bios_dir=BIOS_DIR_IN_ROOT,
        qemu_version=qemu_version,
    )
    shared_dir(prov)
    _write_stamp(prov)
    step(f"done: {qemu_version}, kernel {prov.kernel}")
    return prov


def _install_guest_python(root: Path, log: Path, *, verbose: bool, step: Any) -> None:
    step(f"installing {' '.join(GUEST_PYTHON_PACKAGES)} for the project inside the guest")
    _run_logged(
        _chroot_argv(
            root,
            [
                "apt-get",
                "-o",
                "Dpkg::Use-Pty=0",
                "install",
                "-y",
                "--no-install-recommends",
                *GUEST_PYTHON_PACKAGES,
            ],
        ),
        log,
        "installing the guest's Python packages",
        verbose=verbose,
        env=APT_ENV,
        hint="is the Debian mirror reachable?",
    )


def _add_packages(prov: Provision, log: Path, *, verbose: bool) -> Provision:
    """Install into a finished root of this recipe the packages added since it was made."""
    started = time.monotonic()
    log.write_text(f"{PROG}: adding packages to {prov.root}\n", encoding="utf-8")

    def step(message: str) -> None:
        _say(f"[{time.monotonic() - started:5.1f}s] {message}")

    apt_get = ["apt-get", "-o", "Dpkg::Use-Pty=0"]
    with _apt_mounts(prov.root):
        step("apt-get update")
        _run_logged(
            _chroot_argv(prov.root, [*apt_get, "update"]),
            log,
            "apt-get update in the root",
            verbose=verbose,
            env=APT_ENV,
            hint="is the Debian mirror reachable?",
        )
        _install_guest_python(prov.root, log, verbose=verbose, step=step)
        _run_logged(_chroot_argv(prov.root, [*apt_get, "clean"]), log, "apt-get clean", env=APT_ENV)
    _unmount_all_under(prov.root)
    _write_stamp(prov)
    step("done")
    return prov


# --------------------------------------------------------------------------- running


def shared_dir(provision: Provision) -> Path:
    """Return (creating it) the host path of ``/run/vfio-mediate`` inside the root.

    Sockets for QEMU go here: a server binds ``shared_dir(p) / "x.sock"`` on the host and
    QEMU, chrooted, opens ``/run/vfio-mediate/x.sock``.
    """
    path = provision.host_path(SHARED_DIR_IN_ROOT)
    path.mkdir(parents=True, exist_ok=True)
    return path


def run_in_root(
    provision: Provision, argv: Sequence[str | os.PathLike[str]], **popen_kwargs: Any
) -> "subprocess.Popen[Any]":
    """Start ``argv`` chrooted into the provision's root and return its ``Popen``.

    Paths in ``argv`` are paths inside the root. ``popen_kwargs`` go to
    :class:`subprocess.Popen`; an ``env`` given there is laid over a clean default (the
    host's PATH means nothing inside the root). ``chroot`` starts the command in the root's
    ``/``, so ``cwd`` only affects the ``chroot`` process on the host. Needs root.
    """
    if os.geteuid() != 0:
        raise ProvisionError("run_in_root needs root (chroot)")
    env = {**ROOT_ENV, **(popen_kwargs.pop("env", None) or {})}
    return subprocess.Popen(_chroot_argv(provision.root, argv), env=env, **popen_kwargs)


def _member_path(name: str) -> str:
    """Check an initramfs member name: relative, no '..', not /init or busybox itself."""
    clean = name.strip("/")
    parts = clean.split("/")
    if not clean or any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"bad initramfs path {name!r}")
    if clean in ("init", "bin/busybox"):
        raise ValueError(f"initramfs path {name!r} is reserved")
    return clean


def _busybox_in_root(provision: Provision) -> str:
    for candidate in BUSYBOX_CANDIDATES:
        if provision.host_path(candidate).is_file():
            return candidate
    raise ProvisionError(f"no busybox in {provision.root}; is busybox-static installed?")


def build_initramfs(
    provision: Provision, init_script: str, extra_files: Mapping[str, bytes] | None = None
) -> str:
    """Build (or reuse) a gzip'd busybox initramfs and return its path inside the root.

    ``/init`` is ``init_script`` (a ``#!/bin/sh`` line is added if it has none); it runs
    with every busybox applet linked in ``/bin``, ``/sbin``, ``/usr/bin`` and ``/usr/sbin``
    but nothing mounted: mount proc, sysfs and devtmpfs yourself. ``extra_files`` maps
    paths in the initramfs to contents; contents starting with ``#!`` or an ELF header
    are made executable. The archive is cached by a hash of busybox and all contents.
    """
    busybox = _busybox_in_root(provision)
    members = {_member_path(name): data for name, data in (extra_files or {}).items()}
    if not init_script.startswith("#!"):
        init_script = "#!/bin/sh\n" + init_script

    digest = hashlib.sha256()

    def feed(chunk: bytes) -> None:
        # Length prefixes keep ("ab", "c") and ("a", "bc") from hashing alike.
        digest.update(len(chunk).to_bytes(8, "little"))
        digest.update(chunk)

    feed(b"vfio-mediate initramfs v1")
    feed(hashlib.sha256(provision.host_path(busybox).read_bytes()).digest())
    feed(init_script.encode())
    for name in sorted(members):
        feed(name.encode())
        feed(members[name])
    inner = f"{INITRAMFS_DIR_IN_ROOT}/initramfs-{digest.hexdigest()[:20]}.cpio.gz"
    output = provision.host_path(inner)
    if output.is_file():
        return inner

    output.parent.mkdir(parents=True, exist_ok=True)
    token = f"{digest.hexdigest()[:12]}-{os.getpid()}"
    staging_inner = f"/tmp/vfio-mediate-initramfs-{token}"
    staging = provision.host_path(staging_inner)
    partial_inner = f"{inner}.{os.getpid()}.partial"
    try:
        staging.mkdir(parents=True)
        for directory in ("bin", "sbin", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp"):
            (staging / directory).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(provision.host_path(busybox), staging / "bin/busybox")
        (staging / "bin/busybox").chmod(0o755)
        # Links are made here rather than by "busybox --install" in the guest so that
        # /init can use any applet from its first line.
        applets = subprocess.run(
            _chroot_argv(provision.root, [busybox, "--list-full"]),
            capture_output=True,
            text=True,
            env=ROOT_ENV,
            check=True,
        ).stdout.split()
        for applet in applets:
            link = staging / applet.strip("/")
            if applet.strip("/") == "bin/busybox" or link.exists():
                continue
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to("/bin/busybox")
        (staging / "init").write_text(init_script, encoding="utf-8")
        (staging / "init").chmod(0o755)
        for name, data in members.items():
            path = staging / name
            if path.is_symlink():
                path.unlink()  # a caller's file replaces a busybox applet link
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            path.chmod(0o755 if data.startswith((b"#!", b"\x7fELF")) else 0o644)
        # Sorted names and fixed owners make the archive reproducible.
        pack = (
            'set -euo pipefail; cd "$1"; '
            "find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0 "
            '| gzip -9n > "$2"'
        )
        result = subprocess.run(
            _chroot_argv(
                provision.root, ["bash", "-c", pack, "pack", staging_inner, partial_inner]
            ),
            capture_output=True,
            text=True,
            env=ROOT_ENV,
            check=False,
        )
        if result.returncode != 0:
            raise ProvisionError(f"building the initramfs failed: {result.stderr.strip()}")
        os.replace(provision.host_path(partial_inner), output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        provision.host_path(partial_inner).unlink(missing_ok=True)
    return inner


# --------------------------------------------------------------------------- CLI


def _exit_on_sigterm(signum: int, frame: object) -> NoReturn:
    # Turning SIGTERM into SystemExit lets the finally blocks unmount proc and /dev.
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code (0 ok, 1 not provisioned, 2 error)."""
    parser = argparse.ArgumentParser(
        prog="provision_qemu.py",
        description="Provision QEMU 11.1 with vfio-user-pci in a Debian trixie root "
        "(made with debootstrap) and print its paths as JSON.",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        help="cache directory (default: $VFIO_MEDIATE_CACHE or "
        "${XDG_CACHE_HOME:-~/.cache}/vfio-mediate)",
    )
    parser.add_argument(
        "--print",
        dest="print_only",
        action="store_true",
        help="only print the JSON of an existing provision (exit 1 if there is none)",
    )
    parser.add_argument(
        "--force", action="store_true", help="rebuild the root even if it is finished"
    )
    parser.add_argument("--mirror", help="Debian mirror URL for debootstrap")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="show debootstrap and apt output"
    )
    args = parser.parse_args(argv)
    cache = args.cache_dir if args.cache_dir is not None else default_cache_dir()

    if args.print_only:
        found = load_provision(cache)
        if found is None:
            print(
                f"{PROG}: not provisioned in {cache}; run provision_qemu.py as root first",
                file=sys.stderr,
            )
            return 1
        print(json.dumps(found.to_json(), indent=2))
        return 0

    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        prov = provision(cache, force=args.force, verbose=args.verbose, mirror=args.mirror)
    except ProvisionError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; the unfinished root will be redone next time", file=sys.stderr)
        return 130
    except OSError as exc:
        # Disk full, permissions and the like: one line, not a traceback.
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(prov.to_json(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
