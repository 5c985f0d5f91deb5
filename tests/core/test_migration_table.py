"""The core's migration v2 arc table and next-step rule, checked exhaustively."""

from __future__ import annotations

import itertools

import pytest

from vfio_mediate import MigrationError
from vfio_mediate._migration_arcs import ARCS, migration_path
from vfio_mediate.uapi import MigrationFlag, MigrationState

S = MigrationState
F = MigrationFlag
FLAG_SETS = [
    F.STOP_COPY,
    F.STOP_COPY | F.P2P,
    F.STOP_COPY | F.PRE_COPY,
    F.STOP_COPY | F.P2P | F.PRE_COPY,
]
INTERIOR_FORBIDDEN = {S.PRE_COPY, S.PRE_COPY_P2P, S.STOP_COPY, S.RESUMING}


def supported(state: MigrationState, flags: int) -> bool:
    if state in (S.RUNNING_P2P, S.PRE_COPY_P2P) and not flags & F.P2P:
        return False
    return not (state in (S.PRE_COPY, S.PRE_COPY_P2P) and not flags & F.PRE_COPY)


@pytest.mark.parametrize("flags", FLAG_SETS, ids=lambda f: repr(F(f)))
def test_every_path_uses_single_arcs_and_never_saves_on_the_way(flags: int) -> None:
    states = [s for s in S if s is not S.ERROR and supported(s, flags)]
    for current, target in itertools.product(states, states):
        forbidden = {(S.STOP_COPY, S.PRE_COPY), (S.STOP_COPY, S.PRE_COPY_P2P)}
        if (current, target) in forbidden:
            with pytest.raises(MigrationError, match="not permitted"):
                migration_path(current, target, flags)
            continue
        path = migration_path(current, target, flags)
        assert (path[-1] if path else current) is target
        for before, after in zip([current, *path], path, strict=False):
            assert (before, after) in ARCS, f"{before.name}->{after.name}"
            assert supported(after, flags)
        interior = set(path[:-1])
        if current in (S.PRE_COPY, S.PRE_COPY_P2P):
            interior -= {S.PRE_COPY, S.PRE_COPY_P2P}  # the open saving stream goes on
        assert not INTERIOR_FORBIDDEN & interior, [s.name for s in path]


def test_unsupported_and_error_states_are_refused() -> None:
    with pytest.raises(MigrationError, match="not supported"):
        migration_path(S.RUNNING, S.RUNNING_P2P, F.STOP_COPY)
    with pytest.raises(MigrationError, match="not supported"):
        migration_path(S.RUNNING, S.PRE_COPY, F.STOP_COPY | F.P2P)
    with pytest.raises(MigrationError, match="not permitted"):
        migration_path(S.RUNNING, S.ERROR, F.STOP_COPY)
    with pytest.raises(MigrationError, match="not permitted"):
        migration_path(S.ERROR, S.RUNNING, F.STOP_COPY)


def test_known_linux_paths() -> None:
    full = F.STOP_COPY | F.P2P | F.PRE_COPY
    assert migration_path(S.RUNNING, S.STOP_COPY, full) == [S.RUNNING_P2P, S.STOP, S.STOP_COPY]
    assert migration_path(S.PRE_COPY, S.STOP_COPY, full) == [S.PRE_COPY_P2P, S.STOP_COPY]
    assert migration_path(S.RESUMING, S.RUNNING, full) == [S.STOP, S.RUNNING_P2P, S.RUNNING]
    assert migration_path(S.RUNNING, S.STOP_COPY, F.STOP_COPY) == [S.STOP, S.STOP_COPY]
