"""The migration v2 state machine test: random legal and illegal transitions, checked against
Linux's arc table (``vfio_mediate._migration_arcs``).

The model is the arc table and what a client wrote while RESUMING. Each step asks the device
for a state through ``MediatedDevice.set_migration_state`` (the real core, the real mediator):

- an illegal request fails with ``EINVAL``, the state does not change and the mediator is not
  asked anything;
- a legal one reaches the target, the mediator being asked for exactly the arcs of the path;
- leaving RESUMING loads what was written: a stream a device of the same kind saved must load,
  garbage must be refused (``mediator_load_state`` raises ``OSError``), and the device is in
  ERROR;
- from ERROR only a reset leads out, to RUNNING.
"""

from __future__ import annotations

import errno
from typing import Any, ClassVar

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from .._device_migration import MigrationStream
from .._errors import ContractViolation, MigrationError
from .._migration_arcs import ARCS, migration_path
from .._rules import Rule
from ..uapi import MigrationState
from ._exercises import drain
from ._rig import DeviceRig
from ._targets import Target
from ._verdict import RuleFailure, core_message

__all__ = ["SETTINGS", "check_migration"]

S = MigrationState

SETTINGS = settings(
    max_examples=30,
    stateful_step_count=15,
    deadline=None,
    database=None,  # nothing written into the vendor's project
    derandomize=True,  # seeds from the test, not from chance: a verdict must not flicker
    suppress_health_check=[HealthCheck.too_slow],
)


def _violation(message: str) -> RuleFailure:
    return RuleFailure(Rule.MIGRATION.value, message)


class MigrationMachine(RuleBasedStateMachine):
    """One open device of ``target`` driven through random migration state requests."""

    rig: ClassVar[DeviceRig]
    target: ClassVar[Target]
    flags: ClassVar[int]
    saved: ClassVar[bytes]
    """A whole stream that another device of the same kind saved (what a source sends)."""

    def __init__(self) -> None:
        super().__init__()
        self.device = self.rig.device(self.target, "migration")
        self.device.open()
        self.state = S.RUNNING
        # What the last write while RESUMING was: "saved", "garbage" or nothing yet (None).
        self.written: str | None = None

    def teardown(self) -> None:
        """Close the device and free it."""
        self.rig.discard(self.device)

    @rule(wanted=st.sampled_from(S))
    def request(self, wanted: MigrationState) -> None:
        """Ask for any state, legal or not."""
        target, current = wanted, self.state
        try:
            path = migration_path(current, target, self.flags)
        except MigrationError:
            path = None
        since = self.rig.calls
        try:
            outcome: Any = self.device.set_migration_state(target)
        except MigrationError as exc:
            outcome = exc
        except ContractViolation as exc:
            raise RuleFailure(
                exc.rule, f"{current.name} -> {target.name}: {core_message(exc)}"
            ) from exc
        arcs = [
            (S(call.args["current"]), S(call.args["new"]))
            for call in self.rig.recorder.of("mediator_set_state", since)
            if {"current", "new"} <= call.args.keys()
        ]
        if path is None:
            self._refused(current, target, outcome, arcs)
            return
        steps = list(zip([current, *path], path, strict=False))
        if current is S.RESUMING and path and self.written != "saved":
            self._garbage_refused(target, outcome)
            return
        if isinstance(outcome, MigrationError):
            raise _violation(
                f"the legal transition {current.name} -> {target.name} failed: {outcome}"
            ) from outcome
        if outcome is not target or self.device.migration_state is not target:
            raise _violation(f"{current.name} -> {target.name} ended in {outcome!r}")
        wrong = [arc for arc in arcs if arc not in ARCS]
        if wrong or (arcs and arcs != steps):
            raise _violation(f"{current.name} -> {target.name} ran arcs {arcs}, not {steps}")
        if path:
            self.written = None
        self.state = target

    def _refused(
        self,
        current: MigrationState,
        target: MigrationState,
        outcome: Any,
        arcs: list[tuple[MigrationState, MigrationState]],
    ) -> None:
        if not isinstance(outcome, MigrationError) or outcome.errno != errno.EINVAL:
            raise _violation(
                f"the illegal transition {current.name} -> {target.name} gave {outcome!r}"
            )
        if self.device.migration_state is not current or arcs:
            raise _violation(
                f"the illegal transition {current.name} -> {target.name} changed the device "
                f"(state {self.device.migration_state.name}, arcs {arcs})"
            )

    def _garbage_refused(self, target: MigrationState, outcome: Any) -> None:
        what = "garbage" if self.written == "garbage" else "nothing"
        if not isinstance(outcome, MigrationError):
            raise _violation(
                f"RESUMING -> {target.name} with {what} written loaded it: mediator_load_state "
                "must refuse a stream no device of its kind saved, with OSError(EINVAL)"
            )
        if self.device.migration_state is not S.ERROR:
            raise _violation(
                f"a refused load left the device in {self.device.migration_state.name}, not ERROR"
            )
        self.state = S.ERROR
        self.written = None

    @precondition(lambda self: self.state not in (S.ERROR, S.RESUMING))
    @rule()
    def resume(self) -> None:
        """Become a destination: to RESUMING, whatever the way there."""
        self.request(S.RESUMING)

    @precondition(lambda self: self.state is S.RESUMING)
    @rule()
    def finish_resuming(self) -> None:
        """Load what was written: RESUMING -> STOP."""
        self.request(S.STOP)

    @precondition(lambda self: self.state is S.RESUMING)
    @rule(data=st.binary(max_size=64))
    def write_garbage(self, data: bytes) -> None:
        """Write one whole chunk that no device saved."""
        chunk = b"\x00conformance-garbage\xff" + data
        self.device.write_migration_data(MigrationStream.HEADER.pack(len(chunk)) + chunk)
        self.written = "garbage"

    @precondition(lambda self: self.state is S.RESUMING)
    @rule()
    def write_saved(self) -> None:
        """Write the stream another device of the same kind saved."""
        self.device.write_migration_data(self.saved)
        self.written = "saved"

    @precondition(lambda self: self.state in (S.PRE_COPY, S.PRE_COPY_P2P, S.STOP_COPY))
    @rule()
    def read_data(self) -> None:
        """Read what is saved so far, as a client does while saving."""
        drain(self.device)

    @rule()
    def reset(self) -> None:
        """Reset the device: back to RUNNING, from any state (the only way out of ERROR)."""
        try:
            self.device.reset()
        except OSError as exc:
            raise _violation(f"reset in {self.state.name} failed: {exc}") from exc
        self.state = S.RUNNING
        self.written = None

    @invariant()
    def state_is_the_models(self) -> None:
        """The device is in the state the arc table says."""
        if self.device.migration_state is not self.state:
            raise _violation(
                f"the device is in {self.device.migration_state.name}, the arc table says "
                f"{self.state.name}"
            )


def check_migration(rig: DeviceRig, target: Target, flags: int, saved: bytes) -> None:
    """Run the state machine on devices of ``target`` (made on ``rig``) that migrate with
    ``flags``; ``saved`` is a whole stream a device of the same kind saved."""
    machine = type(
        "MigrationMachine",
        (MigrationMachine,),
        {"rig": rig, "target": target, "flags": flags, "saved": saved},
    )
    run_state_machine_as_test(machine, settings=SETTINGS)
