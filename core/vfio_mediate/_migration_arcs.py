"""The migration v2 state machine: Linux's arc table and its next-step rule.

The core owns it so that every mediator gets the same, correct answer to "which arcs, in which
order" (``vfio_mig_get_next_state()`` in Linux's ``drivers/vfio/vfio_main.c``).
"""

from __future__ import annotations

import errno

from ._errors import MigrationError
from .uapi import MigrationFlag, MigrationState

__all__ = ["ARCS", "SAVING_ARCS", "migration_path", "next_step"]

S = MigrationState

# The single arcs a device implements; the last three only without P2P, where the way through
# RUNNING_P2P or PRE_COPY_P2P is skipped.
ARCS: frozenset[tuple[MigrationState, MigrationState]] = frozenset(
    {
        (S.RUNNING_P2P, S.STOP),
        (S.STOP_COPY, S.STOP),
        (S.RESUMING, S.STOP),
        (S.PRE_COPY, S.RUNNING),
        (S.RUNNING_P2P, S.RUNNING),
        (S.PRE_COPY_P2P, S.RUNNING_P2P),
        (S.RUNNING, S.RUNNING_P2P),
        (S.STOP, S.RUNNING_P2P),
        (S.RUNNING, S.PRE_COPY),
        (S.RUNNING_P2P, S.PRE_COPY_P2P),
        (S.STOP, S.STOP_COPY),
        (S.PRE_COPY, S.PRE_COPY_P2P),
        (S.PRE_COPY_P2P, S.PRE_COPY),
        (S.PRE_COPY_P2P, S.STOP_COPY),
        (S.STOP, S.RESUMING),
        (S.RUNNING, S.STOP),
        (S.STOP, S.RUNNING),
        (S.PRE_COPY, S.STOP_COPY),
    }
)

# Arcs that open a saving stream (the mediator returns the state bytes).
SAVING_ARCS = frozenset(
    {
        (S.RUNNING, S.PRE_COPY),
        (S.RUNNING_P2P, S.PRE_COPY_P2P),
        (S.STOP, S.STOP_COPY),
        (S.PRE_COPY_P2P, S.STOP_COPY),
        (S.PRE_COPY, S.STOP_COPY),
    }
)

# _NEXT[current][target]: the next state on the way, as Linux's vfio_from_fsm_table.
_E = S.ERROR
_NEXT: dict[MigrationState, dict[MigrationState, MigrationState]] = {
    S.STOP: {
        S.STOP: S.STOP,
        S.RUNNING: S.RUNNING_P2P,
        S.STOP_COPY: S.STOP_COPY,
        S.RESUMING: S.RESUMING,
        S.RUNNING_P2P: S.RUNNING_P2P,
        S.PRE_COPY: S.RUNNING_P2P,
        S.PRE_COPY_P2P: S.RUNNING_P2P,
        S.ERROR: _E,
    },
    S.RUNNING: {
        S.STOP: S.RUNNING_P2P,
        S.RUNNING: S.RUNNING,
        S.STOP_COPY: S.RUNNING_P2P,
        S.RESUMING: S.RUNNING_P2P,
        S.RUNNING_P2P: S.RUNNING_P2P,
        S.PRE_COPY: S.PRE_COPY,
        S.PRE_COPY_P2P: S.RUNNING_P2P,
        S.ERROR: _E,
    },
    S.PRE_COPY: {
        S.STOP: S.RUNNING,
        S.RUNNING: S.RUNNING,
        S.STOP_COPY: S.PRE_COPY_P2P,
        S.RESUMING: S.RUNNING,
        S.RUNNING_P2P: S.RUNNING,
        S.PRE_COPY: S.PRE_COPY,
        S.PRE_COPY_P2P: S.PRE_COPY_P2P,
        S.ERROR: _E,
    },
    S.PRE_COPY_P2P: {
        S.STOP: S.RUNNING_P2P,
        S.RUNNING: S.PRE_COPY,
        S.STOP_COPY: S.STOP_COPY,
        S.RESUMING: S.RUNNING_P2P,
        S.RUNNING_P2P: S.RUNNING_P2P,
        S.PRE_COPY: S.PRE_COPY,
        S.PRE_COPY_P2P: S.PRE_COPY_P2P,
        S.ERROR: _E,
    },
    S.STOP_COPY: {
        S.STOP: S.STOP,
        S.RUNNING: S.STOP,
        S.STOP_COPY: S.STOP_COPY,
        S.RESUMING: S.STOP,
        S.RUNNING_P2P: S.STOP,
        S.PRE_COPY: _E,
        S.PRE_COPY_P2P: _E,
        S.ERROR: _E,
    },
    S.RESUMING: {
        S.STOP: S.STOP,
        S.RUNNING: S.STOP,
        S.STOP_COPY: S.STOP,
        S.RESUMING: S.RESUMING,
        S.RUNNING_P2P: S.STOP,
        S.PRE_COPY: S.STOP,
        S.PRE_COPY_P2P: S.STOP,
        S.ERROR: _E,
    },
    S.RUNNING_P2P: {
        S.STOP: S.STOP,
        S.RUNNING: S.RUNNING,
        S.STOP_COPY: S.STOP,
        S.RESUMING: S.STOP,
        S.RUNNING_P2P: S.RUNNING_P2P,
        S.PRE_COPY: S.RUNNING,
        S.PRE_COPY_P2P: S.PRE_COPY_P2P,
        S.ERROR: _E,
    },
    S.ERROR: dict.fromkeys(S, _E),
}

_NEEDS: dict[MigrationState, MigrationFlag] = {
    S.RUNNING_P2P: MigrationFlag.STOP_COPY | MigrationFlag.P2P,
    S.PRE_COPY: MigrationFlag.STOP_COPY | MigrationFlag.PRE_COPY,
    S.PRE_COPY_P2P: MigrationFlag.STOP_COPY | MigrationFlag.P2P | MigrationFlag.PRE_COPY,
}


def _supported(state: MigrationState, flags: int) -> bool:
    needs = _NEEDS.get(state, MigrationFlag.STOP_COPY)
    return flags & needs == needs


def next_step(current: MigrationState, target: MigrationState, flags: int) -> MigrationState:
    """The next state on the way from ``current`` to ``target`` for a device with ``flags``.

    Raises ``MigrationError(EINVAL)`` when the transition is not allowed: to or from ERROR,
    STOP_COPY to a PRE_COPY state, or a state the device does not support.
    """
    if not _supported(target, flags) or not _supported(current, flags):
        raise MigrationError(
            errno.EINVAL,
            f"migration state {target.name} is not supported by this device "
            f"(flags {MigrationFlag(flags)!r})",
        )
    step = _NEXT[current][target]
    while step is not S.ERROR and not _supported(step, flags):
        step = _NEXT[step][target]
    if step is S.ERROR:
        raise MigrationError(
            errno.EINVAL, f"migration arc {current.name} -> {target.name} is not permitted"
        )
    return step


def migration_path(
    current: MigrationState, target: MigrationState, flags: int
) -> list[MigrationState]:
    """Every state after ``current`` on the way to ``target`` (empty when already there)."""
    path = []
    while current is not target:
        current = next_step(current, target, flags)
        path.append(current)
    return path
