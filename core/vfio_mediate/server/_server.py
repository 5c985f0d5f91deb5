"""``VfioUserServer``: serve devices, one UNIX socket each; accepted on an asyncio loop, each
session then on a thread of its own."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import os
import socket
import stat
import struct
import threading
from collections.abc import Coroutine, Iterable
from pathlib import Path
from typing import Any, TypeVar, final

from .._device import MediatedDevice
from ._acl import grant_user
from ._config import PeerCredentials, ServerConfig
from ._engine import Session, fd_budget
from ._log import logger

__all__ = ["BackgroundServer", "DeviceEndpoint", "VfioUserServer", "check_socket_directory"]

_PEERCRED = struct.Struct("iII")
_BACKLOG = 4
_CLOSE_TIMEOUT = 10.0
_READ_WRITE, _SEARCH = 6, 1
_T = TypeVar("_T")


def check_socket_directory(directory: Path) -> None:
    """Refuse a directory another user owns or may write to: there a socket could be replaced
    or connected to by someone else. Raises ``PermissionError`` or ``FileNotFoundError``."""
    status = directory.stat()
    if not stat.S_ISDIR(status.st_mode):
        raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(directory))
    if status.st_uid != os.geteuid():
        raise PermissionError(
            errno.EACCES,
            f"socket directory is owned by uid {status.st_uid}, not by this user "
            f"({os.geteuid()}); use a directory of your own",
            str(directory),
        )
    if status.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise PermissionError(
            errno.EACCES,
            f"socket directory is writable by others (mode {stat.S_IMODE(status.st_mode):o})",
            str(directory),
        )


def _remove_stale_socket(path: Path) -> None:
    """Remove a socket file no server listens on; refuse any other file or a live socket."""
    try:
        status = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(status.st_mode):
        raise FileExistsError(errno.EEXIST, "exists and is not a socket", str(path))
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)
        return
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, "another server listens on this socket", str(path))


def _listen(path: Path, others: Iterable[int] = ()) -> socket.socket:
    """Listen at ``path``: a socket of mode 0600, opened by ACL entries to the user ids
    ``others`` (read and write on the socket, search on its directory) and nobody else."""
    check_socket_directory(path.parent)
    _remove_stale_socket(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # Linux gives the socket file the socket inode's mode: set it before bind, so the file
        # is never reachable by others, not even for an instant.
        os.fchmod(listener.fileno(), 0o600)
        listener.bind(str(path))
        os.chmod(path, 0o600)
        for uid in others:
            try:
                grant_user(path, uid, _READ_WRITE)
                grant_user(path.parent, uid, _SEARCH)
            except OSError as exc:
                raise OSError(
                    exc.errno,
                    f"cannot open the socket to uid {uid} (POSIX ACLs: {exc.strerror})",
                    str(path),
                ) from None
        listener.listen(_BACKLOG)
        listener.setblocking(False)
    except BaseException:
        listener.close()
        raise
    return listener


def _peer_credentials(conn: socket.socket) -> PeerCredentials:
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    return PeerCredentials(*_PEERCRED.unpack(raw))


@final
class DeviceEndpoint:
    """One served device: its socket, its current session, and what it handed out.

    ``mapped_areas`` maps a region index to every ``(offset, size)`` area whose fd any session
    of this endpoint gave a client (what a client could ever map, as opposed to trap);
    ``sessions_served`` counts the sessions started, ``refused`` the connections turned away.
    """

    def __init__(self, device: MediatedDevice, path: Path, listener: socket.socket) -> None:
        self.device = device
        self.path = path
        self.session: Session | None = None
        self.sessions_served = 0
        self.refused = 0
        self.mapped_areas: dict[int, set[tuple[int, int]]] = {}
        self._listener = listener
        self._inode = os.stat(path).st_ino
        self._accepting: asyncio.Task[None] | None = None
        self._idle = threading.Event()
        self._idle.set()

    def __repr__(self) -> str:
        busy = "busy" if self.session is not None else "idle"
        return f"<DeviceEndpoint {self.device.name} {self.path} {busy}>"

    @property
    def name(self) -> str:
        """The device's name."""
        return self.device.name

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until no session is connected (from any thread but the loop's); ``False``
        on timeout."""
        return self._idle.wait(timeout)


@final
class VfioUserServer:
    """Serves ``MediatedDevice``s over vfio-user, each on its own UNIX socket, from the running
    asyncio loop.

    A connection gets a ``Session`` (a thread of its own) if its peer's uid is allowed (the
    server's own euid unless ``allow_uids`` says otherwise) and the device has no client yet;
    anything else is closed and logged. Socket files are created with mode 0600 in a directory
    the user owns, and removed when the device stops being served; each allowed uid other than
    the server's own gets read and write on the socket and search on its directory by a POSIX
    ACL entry (the directory's parents must let it through), nobody else gets anything.
    """

    def __init__(
        self,
        config: ServerConfig | None = None,
        *,
        allow_uids: Iterable[int] | None = None,
    ) -> None:
        self.config = config if config is not None else ServerConfig()
        self.allow_uids = (
            frozenset(allow_uids) if allow_uids is not None else frozenset({os.geteuid()})
        )
        self._endpoints: list[DeviceEndpoint] = []

    @property
    def endpoints(self) -> tuple[DeviceEndpoint, ...]:
        """The devices being served."""
        return tuple(self._endpoints)

    async def add(self, device: MediatedDevice, path: str | os.PathLike[str]) -> DeviceEndpoint:
        """Start serving ``device`` on a new socket at ``path``."""
        socket_path = Path(path).absolute()
        if any(endpoint.path == socket_path for endpoint in self._endpoints):
            raise OSError(errno.EADDRINUSE, "already served by this server", str(socket_path))
        listener = _listen(socket_path, sorted(self.allow_uids - {os.geteuid()}))
        endpoint = DeviceEndpoint(device, socket_path, listener)
        endpoint._accepting = asyncio.get_running_loop().create_task(
            self._accept(endpoint), name=f"vfio-user accept {device.name}"
        )
        self._endpoints.append(endpoint)
        logger.debug("serving %s on %s", device.name, socket_path)
        return endpoint

    async def remove(self, endpoint: DeviceEndpoint) -> None:
        """Stop serving ``endpoint``: close its socket and session, remove its socket file."""
        if endpoint not in self._endpoints:
            return
        self._endpoints.remove(endpoint)
        if endpoint._accepting is not None:
            endpoint._accepting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await endpoint._accepting
        endpoint._listener.close()
        with contextlib.suppress(FileNotFoundError):
            if endpoint.path.lstat().st_ino == endpoint._inode:
                endpoint.path.unlink()
        session = endpoint.session
        if session is not None:
            session.close("the server stops serving the device")
            try:
                await asyncio.wait_for(asyncio.shield(session.closed), _CLOSE_TIMEOUT)
            except TimeoutError:
                logger.error("%s: the session did not end in %s s", endpoint.name, _CLOSE_TIMEOUT)

    async def aclose(self) -> None:
        """Stop serving every device."""
        for endpoint in list(self._endpoints):
            await self.remove(endpoint)

    async def __aenter__(self) -> VfioUserServer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def _accept(self, endpoint: DeviceEndpoint) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(endpoint._listener)
            except OSError as exc:
                logger.error("%s: accept failed: %s", endpoint.name, exc)
                await asyncio.sleep(0.1)
                continue
            # _welcome raises only before it hands ``conn`` to a session, so ``conn`` is ours.
            try:
                await self._welcome(endpoint, conn)
            except Exception:
                logger.exception("%s: a new connection failed", endpoint.name)
                conn.close()
            except BaseException:
                # remove() cancelled this task while the welcome waited for the old session.
                conn.close()
                raise

    async def _welcome(self, endpoint: DeviceEndpoint, conn: socket.socket) -> None:
        peer = _peer_credentials(conn)
        if peer.uid not in self.allow_uids:
            endpoint.refused += 1
            logger.warning(
                "%s: refused pid %d: uid %d is not allowed", endpoint.name, peer.pid, peer.uid
            )
            conn.close()
            return
        current = endpoint.session
        if current is not None and current.peer_hung_up():
            # The old client is gone and its EOF is not read yet: let its session end first.
            await current.finish(_CLOSE_TIMEOUT)
        if endpoint.session is not None:
            endpoint.refused += 1
            logger.warning(
                "%s: refused pid %d: the device already has a client", endpoint.name, peer.pid
            )
            conn.close()
            return
        session = Session(
            endpoint.device,
            conn,
            self.config,
            peer=peer,
            label=f"{endpoint.name}#{endpoint.sessions_served + 1}",
            mapped_areas=endpoint.mapped_areas,
            on_closed=lambda _: _ended(endpoint),
            max_dma_maps=fd_budget(len(self._endpoints)),
        )
        # The session's thread may serve (and end) before this one runs again: first the books.
        endpoint.sessions_served += 1
        endpoint.session = session
        endpoint._idle.clear()
        try:
            session.start()
        except Exception as exc:
            logger.error("%s: cannot open the device for pid %d: %s", endpoint.name, peer.pid, exc)
            endpoint.sessions_served -= 1
            _ended(endpoint)
            conn.close()


def _ended(endpoint: DeviceEndpoint) -> None:
    endpoint.session = None
    endpoint._idle.set()


@final
class BackgroundServer:
    """A ``VfioUserServer`` on an event loop of its own thread, for blocking code: tests,
    scripts, a program that is not asyncio. A context manager; ``close`` stops everything."""

    def __init__(
        self, config: ServerConfig | None = None, *, allow_uids: Iterable[int] | None = None
    ) -> None:
        self.server = VfioUserServer(config, allow_uids=allow_uids)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="vfio-user server", daemon=True
        )
        self._thread.start()

    def __enter__(self) -> BackgroundServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The server's event loop."""
        return self._loop

    def call(self, coroutine: Coroutine[Any, Any, _T], timeout: float | None = 30.0) -> _T:
        """Run ``coroutine`` on the server's loop and wait for its result."""
        future: concurrent.futures.Future[_T] = asyncio.run_coroutine_threadsafe(
            coroutine, self._loop
        )
        return future.result(timeout)

    def add(self, device: MediatedDevice, path: str | os.PathLike[str]) -> DeviceEndpoint:
        """Serve ``device`` on ``path`` (see ``VfioUserServer.add``)."""
        return self.call(self.server.add(device, path))

    def remove(self, endpoint: DeviceEndpoint) -> None:
        """Stop serving ``endpoint``."""
        self.call(self.server.remove(endpoint))

    def close(self) -> None:
        """Stop serving everything and end the loop's thread."""
        if self._loop.is_closed():
            return
        if self._thread.is_alive():
            self.call(self.server.aclose())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
        self._loop.close()
