"""What the engine and its command groups share: the handler shape, the reply path, the
errors a handler raises, and the base of a command group.

A command group is a module of handlers for related commands (negotiation, regions, DMA maps,
IRQs, features and migration data). The engine calls a handler with the message id, header
flags, payload and fds of one command; the handler answers through ``_respond`` (or raises: an
``OSError``'s errno goes on the wire, ``FatalError`` also ends the session). Handlers may keep
the fds they take (removing them from the list); the engine closes the rest.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from ._codec import HEADER, HEADER_SIZE
from ._config import ServerConfig
from ._served import ServedDevice

__all__ = ["NO_REPLY", "REPLY", "CommandGroup", "FatalError", "Handler", "Send"]

REPLY = 1
"""The header's type bits of a reply (plain ints: no flag arithmetic per message)."""
NO_REPLY = 1 << 4
"""The header flag of a command that wants no reply."""

Handler = Callable[[int, int, memoryview, list[int]], None]
"""``handler(msg_id, flags, payload, fds)``: runs one command."""


class Send(Protocol):
    """Sends one whole message (its bytes, then the fds riding on its first byte)."""

    def __call__(self, data: bytes | bytearray, fds: Sequence[int] = ()) -> None: ...


class FatalError(Exception):
    """A protocol violation after which the stream cannot be trusted: reply (when ``code``),
    then close."""

    def __init__(self, code: int | None, message: str) -> None:
        super().__init__(message)
        self.code = code


class CommandGroup:
    """The base of a command group: the device, the configuration, the session's label and
    the reply path. ``handlers`` maps command numbers to handlers; ``teardown`` undoes what the
    group holds for its client when the session ends (on the session's thread)."""

    def __init__(self, device: ServedDevice, config: ServerConfig, label: str, send: Send) -> None:
        self.device = device
        self.config = config
        self.label = label
        self._send = send

    def handlers(self) -> dict[int, Handler]:
        """The commands this group answers."""
        raise NotImplementedError

    def teardown(self) -> None:
        """Release what the client held (default: nothing)."""

    def _respond(
        self,
        msg_id: int,
        command: int,
        flags: int,
        payload: bytes | bytearray | memoryview = b"",
        fds: Sequence[int] = (),
    ) -> None:
        if not flags & NO_REPLY:
            self._send(
                HEADER.pack(msg_id, command, HEADER_SIZE + len(payload), REPLY, 0) + payload, fds
            )
