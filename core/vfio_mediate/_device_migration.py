"""``DeviceMigration``: one device's migration v2 state and its data stream."""

from __future__ import annotations

import errno
import struct
from typing import final

from ._errors import ContractViolation, MigrationError
from ._migration_arcs import SAVING_ARCS, migration_path
from ._rules import Rule
from ._winner import WinningMediator
from .uapi import MigrationFlag, MigrationState

__all__ = ["DeviceMigration", "MigrationStream"]

_ALL_FLAGS = int(sum(MigrationFlag))


class MigrationStream:
    """The migration data of one save or load: framed chunks ``[u64 length][data]``.

    Each saving arc appends one chunk; loading hands the mediator the last complete chunk, so
    a destination that also received pre-copy data restores the final state.
    """

    HEADER = struct.Struct("<Q")

    def __init__(self) -> None:
        self.data = bytearray()
        self.position = 0

    def append_chunk(self, chunk: bytes) -> None:
        """Add one saved chunk."""
        self.data += self.HEADER.pack(len(chunk)) + chunk

    def read(self, size: int) -> bytes:
        """Up to ``size`` bytes not yet read; ``b""`` at the end of what is saved so far."""
        piece = bytes(self.data[self.position : self.position + size])
        self.position += len(piece)
        return piece

    @property
    def pending(self) -> int:
        """Bytes saved but not yet read."""
        return len(self.data) - self.position

    def last_chunk(self) -> bytes:
        """The last complete chunk written; ``EINVAL`` when the stream is not whole chunks."""
        position, last = 0, None
        while position < len(self.data):
            if position + self.HEADER.size > len(self.data):
                break
            (length,) = self.HEADER.unpack_from(self.data, position)
            start = position + self.HEADER.size
            if start + length > len(self.data):
                break
            last, position = bytes(self.data[start : start + length]), start + length
        if last is None or position != len(self.data):
            raise MigrationError(errno.EINVAL, "migration data is truncated or not framed")
        return last


@final
class DeviceMigration:
    """The migration v2 state machine of one open device, each arc done by the winner.

    The core owns the arc table (``migration_path``) and the data stream; the winner's
    ``mediator_set_state`` does each single arc and ``mediator_load_state`` takes the state a
    destination received. Without a winner a device has no migration (flags 0). The caller
    serializes the calls.
    """

    def __init__(self, name: str, winner: WinningMediator | None) -> None:
        self.name = name
        self.winner = winner
        self.state = MigrationState.RUNNING
        self._stream: MigrationStream | None = None

    def flags(self) -> int:
        """The ``MigrationFlag`` bits the winner offers (0: no migration), checked."""
        if self.winner is None:
            return 0
        flags = self.winner.call("mediator_migration_flags")
        if flags is None:
            return 0
        if not isinstance(flags, int) or flags & ~_ALL_FLAGS or not flags & MigrationFlag.STOP_COPY:
            raise self.winner.violation(Rule.MIGRATION, f"migration flags {flags!r} are not valid")
        return flags

    def reset(self) -> None:
        """The device was reset: RUNNING, and no stream."""
        self.state, self._stream = MigrationState.RUNNING, None

    def set_state(self, target: int) -> MigrationState:
        """Go to ``target`` through single arcs; returns the new state.

        An illegal transition raises ``MigrationError(EINVAL)`` with the state unchanged; a step
        the mediator fails puts the device in ERROR and raises ``MigrationError``.
        """
        flags = self.flags()
        if not flags:
            raise MigrationError(errno.ENOTTY, f"{self.name} does not support migration")
        try:
            target_state = MigrationState(target)
        except ValueError:
            raise MigrationError(errno.EINVAL, f"no migration state {target}") from None
        for step in migration_path(self.state, target_state, flags):
            self._step(step)
        return self.state

    def _step(self, step: MigrationState) -> None:
        winner, current = self.winner, self.state
        assert winner is not None  # set_state checked the flags
        try:
            if current is MigrationState.RESUMING:
                assert self._stream is not None
                winner.call("mediator_load_state", self._stream.last_chunk())
            result = winner.call("mediator_set_state", int(current), int(step))
        except OSError as exc:
            self.state, self._stream = MigrationState.ERROR, None
            raise MigrationError(
                exc.errno or errno.EIO,
                f"{self.name}: migration {current.name} -> {step.name} failed: {exc}",
            ) from exc
        except ContractViolation:
            self.state, self._stream = MigrationState.ERROR, None
            raise
        if (current, step) in SAVING_ARCS:
            if not isinstance(result, bytes | bytearray):
                self.state, self._stream = MigrationState.ERROR, None
                raise winner.violation(
                    Rule.MIGRATION, f"arc {current.name} -> {step.name} returned no state bytes"
                )
            if self._stream is None or current is MigrationState.STOP:
                self._stream = MigrationStream()
            self._stream.append_chunk(bytes(result))
        elif step is MigrationState.RESUMING:
            self._stream = MigrationStream()
        elif step not in (MigrationState.PRE_COPY, MigrationState.PRE_COPY_P2P):
            self._stream = None
        self.state = step

    def read_data(self, size: int) -> bytes:
        """Read saved state (in PRE_COPY, PRE_COPY_P2P or STOP_COPY); ``b""`` at the end."""
        if self._stream is None or self.state is MigrationState.RESUMING:
            raise MigrationError(errno.EINVAL, f"{self.name} is not saving ({self.state.name})")
        return self._stream.read(size)

    def write_data(self, data: bytes) -> int:
        """Write state to load (in RESUMING)."""
        if self.state is not MigrationState.RESUMING or self._stream is None:
            raise MigrationError(errno.EINVAL, f"{self.name} is not resuming ({self.state.name})")
        self._stream.data += data
        return len(data)

    @property
    def pending(self) -> int:
        """Saved bytes not yet read (``VFIO_DEVICE_FEATURE_MIG_DATA_SIZE``)."""
        stream = self._stream
        return stream.pending if stream is not None else 0
