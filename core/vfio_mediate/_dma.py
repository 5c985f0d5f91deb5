"""A device's DMA address space: IOVA ranges mapped to memory the device may read and write."""

from __future__ import annotations

import bisect
import contextlib
import errno
import fcntl
import mmap
import os
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import final

from ._dma_memory import (
    OFFSET_LIMIT,
    FileMemory,
    OpenFiles,
    fd_access_problem,
    map_shared,
    sealed_against_shrinking,
)
from ._errors import AccessError

__all__ = ["DmaMapping", "DmaSpace", "RemoteMemory"]


class RemoteMemory:
    """Memory that is reached by messages instead of a mapping (vfio-user DMA_READ/DMA_WRITE).

    A subclass implements ``read`` and ``write`` for offsets inside the mapping.
    """

    def read(self, offset: int, length: int) -> bytes:
        """Read ``length`` bytes at ``offset`` of the mapping."""
        raise NotImplementedError

    def write(self, offset: int, data: bytes) -> None:
        """Write ``data`` at ``offset`` of the mapping."""
        raise NotImplementedError


@dataclass(eq=False)
class DmaMapping:
    """One mapped IOVA range, backed by exactly one of: a buffer (``memory``), a file read and
    written by ``pread``/``pwrite`` (``file``, for memory that can shrink) or ``remote``
    messages."""

    iova: int
    size: int
    readable: bool
    writable: bool
    memory: memoryview | None = None
    remote: RemoteMemory | None = None
    file: FileMemory | None = None

    @property
    def end(self) -> int:
        """The first IOVA past the mapping."""
        return self.iova + self.size

    def close(self) -> None:
        """Drop the mapping's memory. Memory the space mapped is unmapped with the last view
        of it; a file's fd is closed with the file's last mapping."""
        if self.memory is not None:
            # Still exported (a buffer taken from it): then the memory goes with that.
            with contextlib.suppress(BufferError):
                self.memory.release()
            self.memory = None
        if self.file is not None:
            self.file.close()
            self.file = None


WriteWatcher = Callable[[int, int], None]


@final
class DmaSpace:
    """IOVA -> memory, as an IOMMU gives a device: ``read``/``write`` at IOVAs, nothing else.

    Accesses outside every mapping raise ``AccessError(EFAULT)``; writes to a read-only mapping
    ``AccessError(EPERM)``. Mapping over an existing mapping raises ``AccessError(EEXIST)``.
    ``watch`` registers a callback for every write the device makes (the ground truth that
    tests compare dirty logging against; a real device cannot tell this).
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._starts: list[int] = []
        self._maps: list[DmaMapping] = []
        self._watchers: tuple[WriteWatcher, ...] = ()
        self._files = OpenFiles()

    def map_memory(
        self,
        iova: int,
        memory: memoryview | bytearray | mmap.mmap,
        *,
        readable: bool = True,
        writable: bool = True,
    ) -> DmaMapping:
        """Map ``memory`` (a writable buffer) at ``iova``."""
        view = memoryview(memory).cast("B")
        return self._add(DmaMapping(iova, len(view), readable, writable, memory=view))

    def map_fd(
        self,
        iova: int,
        size: int,
        fd: int,
        offset: int = 0,
        *,
        readable: bool = True,
        writable: bool = True,
    ) -> DmaMapping:
        """Map ``size`` bytes of the file ``fd`` from ``offset`` at ``iova`` (shared with
        whoever else has the file); the caller keeps ownership of ``fd``.

        Memory that cannot shrink (a memfd sealed against it, sealed here if it allows
        sealing) is mapped and holds no fd. Anything else (a file on disk, tmpfs or hugetlbfs;
        a memfd without seals; a device) is reached by ``pread``/``pwrite`` through one fd per
        file, so that a peer's truncation makes a DMA fail with EFAULT instead of killing the
        process with SIGBUS; device memory without read/write (/dev/dax) is mapped; the rest
        (hugetlbfs for a writable mapping, pipes) is refused with ``AccessError(EINVAL)``
        naming the reason, and a file past ``MAX_OPEN_FILES`` with ``ENOSPC``.
        """
        if (
            size <= 0
            or offset < 0
            or offset % mmap.ALLOCATIONGRANULARITY
            or offset + size > OFFSET_LIMIT
        ):
            raise AccessError(errno.EINVAL, f"bad DMA mapping size {size:#x} or offset {offset:#x}")
        try:
            status = os.fstat(fd)
        except OSError as exc:
            raise AccessError(errno.EBADF, f"cannot map fd {fd} for DMA: {exc}") from exc
        if stat.S_ISREG(status.st_mode) and status.st_size < offset + size:
            raise AccessError(
                errno.EINVAL,
                f"fd {fd} holds {status.st_size:#x} bytes, less than {offset:#x}+{size:#x}",
            )
        with self._lock:
            if sealed_against_shrinking(fd, status):
                return self._add_mapped(iova, size, fd, offset, readable, writable)
            problem = fd_access_problem(fd, offset, writable=writable)
            if problem is None:
                file = self._files.memory(fd, status, offset)
                return self._add_closing(DmaMapping(iova, size, readable, writable, file=file))
            if stat.S_ISCHR(status.st_mode):
                # Device memory without read/write (/dev/dax) has no size to lose.
                return self._add_mapped(iova, size, fd, offset, readable, writable)
            raise AccessError(
                errno.EINVAL,
                f"fd {fd} may shrink under a mapping (a SIGBUS would kill the server) and "
                f"cannot be {problem}; give memory sealed against shrinking, e.g. "
                "memory-backend-memfd,seal=on",
            )

    def _add_mapped(
        self, iova: int, size: int, fd: int, offset: int, readable: bool, writable: bool
    ) -> DmaMapping:
        try:
            memory = map_shared(fd, size, offset, writable=writable)
        except OSError as exc:
            # ENOMEM: out of address space or of mappings (vm.max_map_count), not a bad request
            code = errno.ENOMEM if exc.errno == errno.ENOMEM else errno.EINVAL
            raise AccessError(code, f"cannot map fd {fd} for DMA: {exc.strerror}") from exc
        return self._add_closing(DmaMapping(iova, size, readable, writable, memory=memory))

    def _add_closing(self, mapping: DmaMapping) -> DmaMapping:
        """``_add``, closing the mapping's memory when it is refused."""
        try:
            return self._add(mapping)
        except AccessError:
            mapping.close()
            raise

    def map_remote(
        self,
        iova: int,
        size: int,
        remote: RemoteMemory,
        *,
        readable: bool = True,
        writable: bool = True,
    ) -> DmaMapping:
        """Map ``size`` bytes at ``iova`` reached through ``remote``."""
        return self._add(DmaMapping(iova, size, readable, writable, remote=remote))

    def _add(self, mapping: DmaMapping) -> DmaMapping:
        if mapping.size <= 0 or mapping.iova < 0 or mapping.end > 1 << 64:
            raise AccessError(errno.EINVAL, f"bad DMA range {mapping.iova:#x}+{mapping.size:#x}")
        with self._lock:
            at = bisect.bisect_left(self._starts, mapping.iova)
            before = self._maps[at - 1] if at else None
            after = self._maps[at] if at < len(self._maps) else None
            if (before and before.end > mapping.iova) or (after and after.iova < mapping.end):
                raise AccessError(
                    errno.EEXIST, f"DMA range {mapping.iova:#x}+{mapping.size:#x} is already mapped"
                )
            self._starts.insert(at, mapping.iova)
            self._maps.insert(at, mapping)
        return mapping

    def unmap(self, iova: int, size: int) -> None:
        """Unmap the mapping that is exactly ``[iova, iova + size)``."""
        with self._lock:
            at = bisect.bisect_left(self._starts, iova)
            if at == len(self._maps) or self._maps[at].iova != iova or self._maps[at].size != size:
                raise AccessError(errno.EINVAL, f"no DMA mapping is exactly {iova:#x}+{size:#x}")
            del self._starts[at]
            self._maps.pop(at).close()

    def unmap_all(self) -> None:
        """Unmap everything."""
        with self._lock:
            for mapping in self._maps:
                mapping.close()
            self._starts.clear()
            self._maps.clear()

    @property
    def open_files(self) -> int:
        """How many fds the space holds (one per file reached by ``pread``/``pwrite``)."""
        with self._lock:
            return len(self._files)

    @property
    def mappings(self) -> tuple[DmaMapping, ...]:
        """The current mappings, by IOVA."""
        with self._lock:
            return tuple(self._maps)

    def watch(self, watcher: WriteWatcher) -> Callable[[], None]:
        """Call ``watcher(iova, length)`` after every write; returns the function that stops it."""
        with self._lock:
            self._watchers = (*self._watchers, watcher)

        def stop() -> None:
            with self._lock:
                self._watchers = tuple(w for w in self._watchers if w is not watcher)

        return stop

    def _pieces(self, iova: int, length: int, write: bool) -> list[tuple[DmaMapping, int, int]]:
        """Split an access into (mapping, offset in it, length) pieces, or raise."""
        pieces = []
        at = bisect.bisect_right(self._starts, iova) - 1
        position, end = iova, iova + length
        while position < end:
            if (
                at < 0
                or at >= len(self._maps)
                or not (self._maps[at].iova <= position < self._maps[at].end)
            ):
                raise AccessError(errno.EFAULT, f"DMA address {position:#x} is not mapped")
            mapping = self._maps[at]
            if not (mapping.writable if write else mapping.readable):
                raise AccessError(
                    errno.EPERM,
                    f"DMA {'write to' if write else 'read of'} {position:#x}: mapping forbids it",
                )
            piece = min(end, mapping.end) - position
            pieces.append((mapping, position - mapping.iova, piece))
            position += piece
            at += 1
        return pieces

    def read(self, iova: int, length: int) -> bytes:
        """Read ``length`` bytes at ``iova``."""
        chunks: list[bytes | tuple[RemoteMemory, int, int]] = []
        with self._lock:
            for mapping, offset, piece in self._pieces(iova, length, write=False):
                if mapping.memory is not None:
                    chunks.append(bytes(mapping.memory[offset : offset + piece]))
                elif mapping.file is not None:
                    chunks.append(mapping.file.read(offset, piece))
                else:
                    assert mapping.remote is not None
                    chunks.append((mapping.remote, offset, piece))
        # A message round trip must not hold the lock: other threads' DMA to memory goes on.
        return b"".join(
            chunk if isinstance(chunk, bytes) else chunk[0].read(chunk[1], chunk[2])
            for chunk in chunks
        )

    def write(self, iova: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` at ``iova``."""
        remote: list[tuple[RemoteMemory, int, bytes]] = []
        with self._lock:
            done = 0
            for mapping, offset, piece in self._pieces(iova, len(data), write=True):
                if mapping.memory is not None:
                    mapping.memory[offset : offset + piece] = data[done : done + piece]
                elif mapping.file is not None:
                    mapping.file.write(offset, data[done : done + piece])
                else:
                    assert mapping.remote is not None
                    remote.append((mapping.remote, offset, bytes(data[done : done + piece])))
                done += piece
            watchers = self._watchers
        for target, offset, chunk in remote:  # message round trips, outside the lock
            target.write(offset, chunk)
        for watcher in watchers:
            watcher(iova, len(data))


_SIZE_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW


def anonymous_memory(size: int, name: str = "vfio-mediate") -> tuple[int, mmap.mmap]:
    """Shareable memory: a memfd of ``size`` bytes, sealed against resizing (whoever gets the
    fd can map it but never shrink it under us), and a shared mapping of it."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SIZE_SEALS | fcntl.F_SEAL_SEAL)
        return fd, mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
    except BaseException:
        os.close(fd)
        raise
