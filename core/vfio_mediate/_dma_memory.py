"""The memory behind a DMA mapping of a file descriptor: mapped without holding the fd, or,
for a file that can shrink under a mapping, read and written with ``pread``/``pwrite``.

A shared mapping of a file that is truncated afterwards turns the next access into SIGBUS,
which kills the process and every device it serves; a ``pread`` past the end of the file only
comes back short. So only memory that cannot shrink (a memfd sealed against it) is mapped, and
anything else that ``pread``/``pwrite`` can reach (a regular file on disk or tmpfs, a memfd
without seals) goes through the fd.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import itertools
import mmap
import os
import stat
import weakref
from typing import final

from ._errors import AccessError

__all__ = [
    "MAX_OPEN_FILES",
    "OFFSET_LIMIT",
    "FileMemory",
    "OpenFiles",
    "fd_access_problem",
    "map_address",
    "map_shared",
    "sealed_against_shrinking",
    "unmap_address",
]

_libc = ctypes.CDLL(None, use_errno=True)
_mmap = getattr(_libc, "mmap64", None) or _libc.mmap
_mmap.restype = ctypes.c_void_p
_mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int64,
]
_munmap = _libc.munmap
_munmap.restype = ctypes.c_int
_munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value

OFFSET_LIMIT = 1 << 63
"""File offsets (``off_t``) are below this."""
MAX_OPEN_FILES = 64
"""The most files one DMA space reaches through their fds (a VMM hands one per memory
backend): more would let one client run the process out of fds."""


def map_address(fd: int, size: int, offset: int, *, writable: bool) -> int:
    """Map ``size`` bytes of ``fd`` from ``offset`` shared, at an address of the kernel's
    choosing, and return it (the caller unmaps it with ``unmap_address``); holds no fd."""
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
    address = _mmap(None, size, prot, mmap.MAP_SHARED, fd, offset)
    if address is None or address == _MAP_FAILED:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return int(address)


def unmap_address(address: int, size: int) -> None:
    """Unmap what ``map_address`` mapped."""
    _munmap(address, size)


def map_shared(fd: int, size: int, offset: int, *, writable: bool) -> memoryview:
    """A shared mapping of ``size`` bytes of ``fd`` from ``offset`` as a byte view (read-only
    unless ``writable``). Unlike ``mmap.mmap``, which keeps a duplicate of the fd for as long as
    the mapping lives, this holds no fd: the caller may close ``fd`` at once. The memory is
    unmapped when the last view of it is released."""
    address = map_address(fd, size, offset, writable=writable)
    try:
        buffer = (ctypes.c_ubyte * size).from_address(address)
    except BaseException:
        _munmap(address, size)
        raise
    # The views keep ``buffer`` alive; when the last one goes, so does the mapping. Not at
    # interpreter exit: another thread may still be reading it then.
    weakref.finalize(buffer, _munmap, address, size).atexit = False
    view = memoryview(buffer).cast("B")
    return view if writable else view.toreadonly()


def sealed_against_shrinking(fd: int, status: os.stat_result) -> bool:
    """Whether ``fd`` is a regular file that can never get shorter: a memfd sealed against
    shrinking, or one that allows sealing, which is then sealed here (whoever holds it can
    still write it, never pull pages from under a mapping). Any other file (on disk, tmpfs or
    hugetlbfs, a memfd made without sealing) can shrink."""
    if not stat.S_ISREG(status.st_mode):
        return False
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        return False  # a file system without seals
    if seals & fcntl.F_SEAL_SHRINK:
        return True
    if seals & fcntl.F_SEAL_SEAL:
        return False  # made without MFD_ALLOW_SEALING, or a plain tmpfs/hugetlbfs file
    try:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    except OSError:
        return False
    return True


def fd_access_problem(fd: int, offset: int, *, writable: bool) -> str | None:
    """Why ``fd`` cannot be read with ``pread`` (or written with ``pwrite`` when ``writable``),
    or ``None``. Zero-length calls fail as real ones would: EINVAL where the file system has
    no ``write`` (hugetlbfs), EBADF for an fd opened without that access, ESPIPE for pipes."""
    try:
        os.pread(fd, 0, offset)
    except OSError as exc:
        return f"read with pread ({exc.strerror})"
    if writable:
        try:
            os.pwrite(fd, b"", offset)
        except OSError as exc:
            return f"written with pwrite ({exc.strerror}; hugetlbfs files cannot be)"
    return None


@final
class _OpenFile:
    """One fd of a file, shared by every mapping of that file in one DMA space."""

    def __init__(self, fd: int, key: tuple[int, int, int], files: OpenFiles) -> None:
        self.fd = fd
        self.key = key
        self.regular = key[0] >= 0
        self.users = 0
        self._files = files

    def release(self) -> None:
        self.users -= 1
        if not self.users:
            self._files.forget(self)
            os.close(self.fd)


@final
class OpenFiles:
    """The fds a DMA space keeps for its ``FileMemory`` mappings, at most ``limit``: one per
    regular file (and access mode), however many mappings of it there are; one per mapping of
    anything else (whose inode numbers may be shared). Not thread-safe: the space's lock
    guards it."""

    def __init__(self, limit: int = MAX_OPEN_FILES) -> None:
        self.limit = limit
        self._open: dict[tuple[int, int, int], _OpenFile] = {}
        self._unshared = itertools.count()

    def __len__(self) -> int:
        return len(self._open)

    def memory(self, fd: int, status: os.stat_result, offset: int) -> FileMemory:
        """``FileMemory`` of ``fd`` from ``offset`` (checked readable and writable as needed
        by ``fd_access_problem``); ``AccessError(ENOSPC)`` for a file past the ``limit``."""
        mode = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
        if stat.S_ISREG(status.st_mode):
            key = (status.st_dev, status.st_ino, mode)
        else:
            key = (-1, next(self._unshared), mode)
        shared = self._open.get(key)
        if shared is None:
            if len(self._open) >= self.limit:
                raise AccessError(
                    errno.ENOSPC,
                    f"{len(self._open)} files that can shrink are mapped already, the most one "
                    "device keeps open; map memory that cannot shrink (a sealed memfd) instead",
                )
            shared = _OpenFile(os.dup(fd), key, self)
            self._open[key] = shared
        shared.users += 1
        return FileMemory(shared, offset)

    def forget(self, shared: _OpenFile) -> None:
        """Drop ``shared`` (its last mapping is gone)."""
        if self._open.get(shared.key) is shared:
            del self._open[shared.key]


@final
class FileMemory:
    """A file from ``offset`` on, read and written with ``pread``/``pwrite``.

    An access past the file's current end (a peer truncated it) raises ``AccessError(EFAULT)``;
    a write never extends the file. Callers serialize ``close`` with accesses.
    """

    def __init__(self, shared: _OpenFile, offset: int) -> None:
        self._shared: _OpenFile | None = shared
        self._regular = shared.regular
        self.offset = offset

    def _fd(self) -> int:
        if self._shared is None:
            raise AccessError(errno.EFAULT, "DMA mapping is closed")
        return self._shared.fd

    def read(self, offset: int, length: int) -> bytes:
        """Read ``length`` bytes at ``offset`` of the mapping."""
        fd, position = self._fd(), self.offset + offset
        try:
            data = os.pread(fd, length, position)
            while len(data) < length:
                more = os.pread(fd, length - len(data), position + len(data))
                if not more:
                    raise AccessError(
                        errno.EFAULT,
                        f"DMA read at file offset {position:#x}+{length:#x}: "
                        "the file is shorter than its mapping (truncated)",
                    )
                data += more
        except AccessError:
            raise
        except OSError as exc:
            raise AccessError(errno.EFAULT, f"DMA read of the file failed: {exc}") from exc
        return data

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` at ``offset`` of the mapping."""
        fd, position = self._fd(), self.offset + offset
        try:
            # A pwrite past the end would grow the file: refuse instead, as a mapping would.
            # (A truncation racing this check leaves a hole, never a signal.)
            if self._regular and os.fstat(fd).st_size < position + len(data):
                raise AccessError(
                    errno.EFAULT,
                    f"DMA write at file offset {position:#x}+{len(data):#x}: "
                    "the file is shorter than its mapping (truncated)",
                )
            view = memoryview(data).cast("B")
            while view:
                done = os.pwrite(fd, view, position)
                if not done:
                    raise AccessError(errno.EFAULT, "DMA write to the file made no progress")
                view, position = view[done:], position + done
        except AccessError:
            raise
        except OSError as exc:
            raise AccessError(errno.EFAULT, f"DMA write to the file failed: {exc}") from exc

    def close(self) -> None:
        """Give up the mapping's share of the fd (closed with the file's last mapping)."""
        if self._shared is not None:
            self._shared.release()
            self._shared = None
