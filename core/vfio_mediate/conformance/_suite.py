"""The conformance suite: one test (at least) per rule of the hook contract.

Collected once per ``--mediator NAME``; every test runs the real core (``MediatedDevice``,
``EmulatedPciDevice``) against the installed mediator, alone in its registry, on the devices
its ``mediator_targets`` names, and fails with a message that starts with the broken rule's id.
"""

from __future__ import annotations

import errno
import functools
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from .._device import MediatedDevice
from .._errors import MigrationError
from .._pci import EmulatedPciDevice
from .._rules import Rule
from ..uapi import PAGE_SIZE, PCI_NUM_REGIONS, IrqIndex, MigrationState, RegionFlag
from ._capabilities import MediatorCapabilities
from ._exercises import (
    GUEST_IOVA,
    GUEST_SIZE,
    differences,
    fill,
    guest_memory,
    load_state,
    logged_writes,
    mmap_workload,
    observe,
    pattern,
    register_plan,
    rw_workload,
    save_state,
    shown,
    workout,
)
from ._imports import ImportReport, core_imports_by, import_fresh
from ._machine import check_migration
from ._mediator import HookCall, MediatorUnderTest
from ._plugin import DIRTY_LOGGING_PROPERTY, LEDGER, LOADED
from ._rig import DeviceRig
from ._targets import Target, TargetError, decoys_for, targets_from
from ._traffic import logged_traffic, workload_for
from ._verdict import Ledger, checks, describe, fail, reporting_to

S = MigrationState
_RELAY_WAIT = 10.0
"""Seconds the interrupts of observed vectors may take through the relay thread."""


@dataclass(frozen=True)
class Targets:
    """The mediator's targets and decoys, or why it has none."""

    targets: tuple[Target, ...] = ()
    decoys: tuple[Target, ...] = ()
    error: str | None = None

    def __iter__(self) -> Iterator[Target]:
        if self.error is not None:
            pytest.skip(f"the mediator names no usable targets (see test_targets): {self.error}")
        return iter(self.targets)


@pytest.fixture(scope="module")
def mediator(request: pytest.FixtureRequest) -> MediatorUnderTest:
    """The mediator under test, imported from its entry point and registered once (at
    collection: a mediator that cannot be loaded has no suite, only a failure saying why)."""
    loaded: MediatorUnderTest = request.node.stash[LOADED]
    return loaded


@pytest.fixture(scope="module")
def ledger(request: pytest.FixtureRequest) -> Ledger:
    """Where each rule the mediator breaks is reported (once)."""
    found: Ledger = request.node.stash[LEDGER]
    return found


@pytest.fixture(autouse=True)
def _reported(ledger: Ledger) -> Iterator[None]:
    with reporting_to(ledger):
        yield


@pytest.fixture(scope="module")
def targets(mediator: MediatorUnderTest) -> Targets:
    """What ``mediator_targets`` names, with decoys shaped like them."""
    hook = mediator.hook("mediator_targets")
    if hook is None:
        return Targets(error="it does not implement mediator_targets")
    try:
        found = targets_from(hook())
    except TargetError as exc:
        return Targets(error=str(exc))
    except Exception as exc:
        return Targets(error=f"mediator_targets raised {exc!r}")
    return Targets(found, decoys_for(found))


@pytest.fixture(scope="module")
def capabilities(mediator: MediatorUnderTest, targets: Targets) -> MediatorCapabilities:
    """What the mediator declares beyond the basic contract."""
    return MediatorCapabilities.probe(mediator, list(targets))


@pytest.fixture(scope="module")
def import_report(
    mediator: MediatorUnderTest, tmp_path_factory: pytest.TempPathFactory
) -> ImportReport:
    """What importing the mediator in a fresh interpreter without the core did."""
    return import_fresh(mediator.name, tmp_path_factory.mktemp("import"))


@pytest.fixture
def rig(mediator: MediatorUnderTest) -> Iterator[DeviceRig]:
    """Devices for one test, all freed at its end."""
    made = DeviceRig(mediator)
    yield made
    made.close()


class TestContract:
    """The plugin as a whole: its hooks and its imports."""

    @checks(Rule.HOOK_SIGNATURE)
    def test_hooks_are_the_contracts(self, mediator: MediatorUnderTest) -> None:
        """Every hook it implements is a hook of the contract with its arguments, and it
        implements ``mediator_open`` (the registry checked both when the fixture loaded it);
        each hook once, as a plain implementation: the core calls the winner's function
        directly, so a second one would never run and a wrapper would return a generator."""
        seen: set[str] = set()
        for impl in mediator.implementations:
            if impl.options.get("wrapper") or impl.options.get("hookwrapper"):
                fail(Rule.HOOK_SIGNATURE, f"{impl.hook} is a pluggy wrapper, not a plain hook")
            if impl.hook in seen:
                fail(Rule.HOOK_SIGNATURE, f"{impl.hook} is implemented more than once")
            seen.add(impl.hook)

    @checks(Rule.NO_CORE_IMPORT)
    def test_does_not_import_the_core(
        self,
        mediator: MediatorUnderTest,
        targets: Targets,
        rig: DeviceRig,
        import_report: ImportReport,
    ) -> None:
        """It imports without ``vfio_mediate`` (a fresh interpreter that refuses it), and its
        code imports nothing of it while every hook runs."""
        if import_report.attempts:
            fail(
                Rule.NO_CORE_IMPORT,
                f"importing {mediator.describe()} imports {', '.join(import_report.attempts)}",
            )
        if import_report.error is not None:
            fail(
                Rule.NO_CORE_IMPORT,
                f"{mediator.describe()} cannot be imported in an interpreter without the core: "
                f"{import_report.error}",
            )
        with core_imports_by(mediator.modules) as seen:
            for number, target in enumerate(targets):
                with rig.opened(target, "imports") as device:
                    workout(device, target, seed=number)
        if seen:
            fail(Rule.NO_CORE_IMPORT, f"while its hooks ran: {'; '.join(dict.fromkeys(seen))}")


class TestOpen:
    """Which devices it claims and what it returns for them."""

    @checks(Rule.OPEN_TARGETS)
    def test_targets(self, targets: Targets) -> None:
        """``mediator_targets`` names the devices it is meant to claim."""
        if targets.error is not None:
            fail(
                Rule.OPEN_TARGETS,
                f"the suite cannot tell which devices it targets: {targets.error}",
            )

    @checks(Rule.OPEN_TARGETS)
    def test_claims_its_targets(self, targets: Targets, rig: DeviceRig) -> None:
        """It claims each device it names as a target."""
        for target in targets:
            since = rig.calls
            with rig.opened(target, "claim") as device:
                if device.mediator is None:
                    (call,) = rig.recorder.of("mediator_open", since)
                    why = f"raised {call.error!r}" if call.error else "returned None"
                    fail(
                        Rule.OPEN_TARGETS,
                        f"it did not claim {target}, which mediator_targets names: "
                        f"mediator_open {why}",
                    )

    @checks(Rule.OPEN_TARGETS)
    def test_declines_other_devices(
        self, targets: Targets, capabilities: MediatorCapabilities, rig: DeviceRig
    ) -> None:
        """It declines, with ``None``, devices shaped like its targets but with another vendor
        or device id (a fallback, ``trylast``, may claim anything)."""
        capabilities.require_not_fallback()
        for decoy in targets.decoys:
            since = rig.calls
            with rig.opened(decoy, "decoy") as device:
                (call,) = rig.recorder.of("mediator_open", since)
                # A falsy result meant to decline breaks open-result (test_open_result says so).
                if device.mediator is not None and call.result:
                    fail(
                        Rule.OPEN_TARGETS,
                        f"it claimed {decoy}, which is none of its targets: mediator_open "
                        f"returned {describe(call.result)}",
                    )

    @checks(Rule.OPEN_RESULT)
    def test_open_result(
        self, targets: Targets, capabilities: MediatorCapabilities, rig: DeviceRig
    ) -> None:
        """``mediator_open`` declines by returning ``None``, never by raising nor with another
        falsy value; the handle it returns is what every later hook of that device receives."""
        for number, target in enumerate([*targets, *targets.decoys]):
            since = rig.calls
            with rig.opened(target, "open") as device:
                (call,) = rig.recorder.of("mediator_open", since)
                if call.error is not None:
                    fail(
                        Rule.OPEN_RESULT,
                        f"mediator_open raised {call.error!r} for {target}: decline a device "
                        "by returning None",
                    )
                if target in targets.decoys:
                    _check_decline(call, target, capabilities)
                if target in targets.decoys or call.result is None:
                    continue
                workout(device, target, seed=number)
            for later in rig.recorder.calls[since:]:
                if "handle" in later.args and later.args["handle"] is not call.result:
                    fail(
                        Rule.OPEN_RESULT,
                        f"{later.hook} got {describe(later.args['handle'])}, not the handle "
                        f"{describe(call.result)} that mediator_open returned",
                    )


def _check_decline(call: HookCall, decoy: Target, capabilities: MediatorCapabilities) -> None:
    """A mediator that is not a fallback declines a decoy with ``None``, not another falsy
    value, which claims it (``open-result``)."""
    if not capabilities.fallback and call.result is not None and not call.result:
        fail(
            Rule.OPEN_RESULT,
            f"mediator_open returned {call.result!r} for {decoy}, which is none of its "
            "targets: that claims the device (0, False and b'' are handles); decline with None",
        )


class TestRelease:
    """The end of a claim."""

    @checks(Rule.RELEASE_ONCE)
    def test_release_once(
        self, targets: Targets, capabilities: MediatorCapabilities, rig: DeviceRig
    ) -> None:
        """``mediator_release`` runs once, at the last close, with the claimed handle, and
        completes; never for a device it declined."""
        for number, target in enumerate([*targets, *targets.decoys]):
            device = rig.device(target, "release")
            since = rig.calls
            device.open()
            (opened,) = rig.recorder.of("mediator_open", since)
            if target in targets.decoys:
                _check_decline(opened, target, capabilities)
            device.open()
            if device.mediator is not None and target not in targets.decoys:
                workout(device, target, seed=number)
            device.close()
            if rig.recorder.of("mediator_release", since):
                fail(Rule.RELEASE_ONCE, f"{target}: released at a close that was not the last")
            device.close()
            releases = rig.recorder.of("mediator_release", since)
            expected = 0 if opened.result is None else 1
            if len(releases) != expected:
                fail(
                    Rule.RELEASE_ONCE,
                    f"{target}: mediator_release ran {len(releases)} times, not {expected}",
                )
            for release in releases:
                if release.args.get("handle", opened.result) is not opened.result:
                    fail(Rule.RELEASE_ONCE, f"{target}: released another handle than it claimed")
                if release.error is not None:
                    fail(
                        Rule.RELEASE_ONCE,
                        f"{target}: mediator_release raised {release.error!r}; the core logs it "
                        "and goes on, and whatever the handle held is left behind",
                    )


class TestRegions:
    """What the mediator says about the device's regions."""

    @checks(Rule.REGIONS_RESULT)
    def test_regions_result(self, targets: Targets, rig: DeviceRig) -> None:
        """``mediator_regions`` names regions the device has (the core checks it at open);
        the regions it names, and its own, are the ones mediated."""
        for target in targets:
            with rig.opened(target, "mediated") as device:
                own = {info.index for info in device.regions if info.index >= PCI_NUM_REGIONS}
                if not own <= device.mediated_regions:
                    fail(
                        Rule.REGIONS_RESULT,
                        f"{target}: its own region(s) {sorted(own - device.mediated_regions)} "
                        "are not mediated",
                    )

    @checks(Rule.REGION_INFO_VALID)
    def test_region_info_valid(self, targets: Targets, rig: DeviceRig) -> None:
        """Valid info for every region (the core checks it narrows the device's); a region it
        does not mediate keeps the device's own info exactly; no MSI-X mmap it lacks."""
        for target in targets:
            with rig.opened(target, "regions") as device:
                for index in range(PCI_NUM_REGIONS):
                    info = device.region_info(index)
                    own = device.backend.region_info(index)
                    if index not in device.mediated_regions and info != own:
                        fail(
                            Rule.REGION_INFO_VALID,
                            f"{target}: region {index} is not mediated, yet its info changed "
                            f"from {own.to_plain()} to {info.to_plain()}",
                        )
                    if info.msix_mappable and not own.msix_mappable:
                        fail(
                            Rule.REGION_INFO_VALID,
                            f"{target}: region {index} claims an mmap-able MSI-X table",
                        )

    @checks(Rule.DEVICE_REGIONS_VALID)
    def test_device_regions_valid(self, capabilities: MediatorCapabilities, rig: DeviceRig) -> None:
        """Its device-specific regions have a size and access flags, are accessible, and can
        be mapped where they say so."""
        for number, profile in enumerate(capabilities.with_device_regions()):
            with rig.opened(profile.target, "own-regions") as device:
                for index in profile.device_regions:
                    info = device.region_info(index)
                    if not info.size or not info.flags & (RegionFlag.READ | RegionFlag.WRITE):
                        fail(
                            Rule.DEVICE_REGIONS_VALID,
                            f"{profile.target}: region {index} cannot be accessed: "
                            f"{info.to_plain()}",
                        )
                    rw_workload(device, profile.target, index, seed=number)
                refused = mmap_workload(
                    device, profile.target, verify=True, regions=profile.device_regions
                )
                if refused:
                    fail(
                        Rule.DEVICE_REGIONS_VALID,
                        f"{profile.target}: the {refused[0].what} was refused, yet the region "
                        f"says it can be mapped: {refused[0].error}",
                    )


class TestAccess:
    """Reads, writes and mappings of mediated regions."""

    @checks(Rule.RW_RESULT)
    def test_rw_result(self, targets: Targets, rig: DeviceRig) -> None:
        """Every access of a mediated region returns exactly the bytes read or the count
        written, and changes nothing outside the access."""
        for number, target in enumerate(targets):
            with rig.opened(target, "rw") as device:
                for index in sorted(device.mediated_regions):
                    rw_workload(device, target, index, seed=number)

    @checks(Rule.ACCESS_ERRORS)
    def test_access_errors(self, targets: Targets, rig: DeviceRig) -> None:
        """Whatever the mediator refuses, it refuses with an ``OSError`` that has an errno."""
        for number, target in enumerate(targets):
            with rig.opened(target, "errors") as device:
                for refusal in workout(device, target, seed=number, dense=True):
                    code = refusal.error.errno
                    if not isinstance(code, int) or code not in errno.errorcode:
                        fail(
                            Rule.ACCESS_ERRORS,
                            f"{target}: the {refusal.what} was refused with "
                            f"{refusal.error!r}, which has no valid errno",
                        )

    @checks(Rule.MMAP_RESULT)
    def test_mmap_result(self, targets: Targets, rig: DeviceRig) -> None:
        """Each mmap-able area maps: a file descriptor and offset whose memory shows the
        region's bytes (and, on a plain device, is the region's memory)."""
        for number, target in enumerate(targets):
            with rig.opened(target, "mmap") as device:
                for info in device.regions:
                    fill(device, target, info.index, seed=number)
                mmap_workload(device, target, verify=True)


class TestConduct:
    """How the mediator behaves around the accesses."""

    @checks(Rule.QUIET)
    def test_quiet(
        self,
        targets: Targets,
        rig: DeviceRig,
        import_report: ImportReport,
        capfd: pytest.CaptureFixture[str],
    ) -> None:
        """Nothing reaches stdout, at import or from any hook (it logs through ``logging``)."""
        if import_report.printed:
            fail(Rule.QUIET, f"importing it printed {describe(import_report.printed)}")
        capfd.readouterr()
        for number, target in enumerate(targets):
            with rig.opened(target, "quiet") as device:
                workout(device, target, seed=number)
        for decoy in targets.decoys:
            with rig.opened(decoy, "quiet"):
                pass
        printed = capfd.readouterr().out
        if printed:
            fail(Rule.QUIET, f"its hooks printed {describe(printed)}")

    @checks(Rule.ACCESS_ERRORS)
    def test_interrupt_routing(self, targets: Targets, rig: DeviceRig) -> None:
        """Routing every MSI-X vector asks the mediator which it observes: vectors the device
        has, or none (a refusal is an ``OSError`` with an errno). Then every vector the device
        raises reaches the client, an observed one through ``mediator_irq`` first (on the
        device's relay thread)."""
        for target in targets:
            with rig.opened(target, "irq") as device:
                vectors = device.irq_info(IrqIndex.MSIX).count
                if vectors:
                    _route_and_raise(device, target, rig, vectors)

    @checks(Rule.ISOLATION)
    def test_isolation(self, targets: Targets, rig: DeviceRig) -> None:
        """Using, resetting, migrating and closing one device changes nothing another device
        of the same kind shows: region info, flags and (on a plain device) contents, at every
        register of its trapped pages, which the first device writes, every one."""
        for target in targets:
            with rig.opened(target, "isolation-b") as other:
                # Contents are compared on plain devices only: only there does writing every
                # register (each device its own pattern) pay.
                for index in sorted(other.mediated_regions):
                    rw_workload(other, target, index, seed=2, dense=target.is_plain)
                before = observe(other, contents=target.is_plain)
                with rig.opened(target, "isolation-a") as device:
                    workout(device, target, seed=1, dense=target.is_plain)
                after = observe(other, contents=target.is_plain)
                changed = differences(before, after)
                if changed:
                    fail(
                        Rule.ISOLATION,
                        f"{target}: using and closing another device of the same kind changed "
                        f"this one's {'; '.join(changed[:3])}",
                    )
                workout(other, target, seed=3)

    @checks(Rule.REOPEN)
    def test_reopen(self, targets: Targets, rig: DeviceRig) -> None:
        """After the last close and a new open the device is claimed again and looks and
        works as it did: the same region info and flags, the same accesses refused and, on a
        plain device, the same contents of the device's regions."""
        for number, target in enumerate(targets):
            device = rig.device(target, "reopen")
            with device:
                workout(device, target, seed=number)
                # Writes every register through the mediator (a mediator may shadow them).
                refused = _refused(device, target, seed=number)
                first = observe(device, contents=target.is_plain, own_regions=False)
            with device:
                if first["mediator"] is not None and device.mediator is None:
                    fail(Rule.REOPEN, f"{target}: not claimed again after its last close")
                again = observe(device, contents=target.is_plain, own_regions=False)
                changed = differences(first, again)
                if changed:
                    fail(
                        Rule.REOPEN,
                        f"{target}: after close and open again its {'; '.join(changed[:3])}",
                    )
                now_refused = _refused(device, target, seed=number)
                if now_refused != refused:
                    which = sorted(now_refused ^ refused)[0]
                    was = "refused" if which in refused else "allowed"
                    fail(
                        Rule.REOPEN,
                        f"{target}: the {which[0]} was {was} at the first open, not after "
                        f"close and open again ({len(now_refused ^ refused)} accesses differ)",
                    )
                workout(device, target, seed=number)


def _refused(device: MediatedDevice, target: Target, seed: int) -> set[tuple[str, int | None]]:
    """The accesses of every mediated region the mediator refuses now, with their errno."""
    return {
        (refusal.what, refusal.error.errno)
        for index in sorted(device.mediated_regions)
        for refusal in rw_workload(device, target, index, seed=seed)
    }


class TestMigration:
    """Migration v2, for targets whose ``mediator_migration_flags`` gives flags."""

    @checks(Rule.MIGRATION)
    def test_migration_flags(self, capabilities: MediatorCapabilities, rig: DeviceRig) -> None:
        """The flags are valid (STOP_COPY at least) and the same at every open."""
        for profile in capabilities.migrating():
            with rig.opened(profile.target, "flags") as device:
                flags = device.migration_flags
            if flags != profile.migration_flags:
                fail(
                    Rule.MIGRATION,
                    f"{profile.target}: migration flags {flags:#x} at one open, "
                    f"{profile.migration_flags:#x} at another",
                )

    @checks(Rule.MIGRATION)
    def test_migration_round_trip(self, capabilities: MediatorCapabilities, rig: DeviceRig) -> None:
        """A state one device saves loads into another device of the same kind."""
        for profile in capabilities.migrating():
            with rig.opened(profile.target, "source") as source:
                stream = save_state(source)
            with rig.opened(profile.target, "destination") as destination:
                load_state(destination, stream)
                if destination.migration_state is not S.RUNNING:
                    fail(Rule.MIGRATION, f"{profile.target}: loaded, but not running")

    @checks(Rule.MIGRATION)
    def test_migration_restores_what_it_saved(
        self, capabilities: MediatorCapabilities, rig: DeviceRig
    ) -> None:
        """A device loaded with another's state shows what that one showed through the
        mediator: its own regions, and on a plain device whatever the mediator shows
        differently from the device (its shadows), after the source was filled with a
        pattern through the mediator."""
        for number, profile in enumerate(capabilities.migrating()):
            target = profile.target
            with rig.opened(target, "filled") as source:
                _fill_through(source, target, seed=number + 7)
                shows = _mediator_state(source, target)
                stream = save_state(source)
            with rig.opened(target, "restored") as destination:
                load_state(destination, stream)
                restored = _mediator_state(destination, target)
            changed = differences(shows, restored)
            if changed:
                fail(
                    Rule.MIGRATION,
                    f"{target}: after loading the state of a device filled with a pattern, "
                    f"{'; '.join(changed[:3])}",
                )

    @checks(Rule.MIGRATION)
    def test_migration_refuses_another_models_stream(
        self, capabilities: MediatorCapabilities, rig: DeviceRig
    ) -> None:
        """A stream saved by a device of one target does not load into a device of another
        (another vendor or device id): ``mediator_load_state`` refuses it."""
        kinds = {profile.target.identity: profile.target for profile in capabilities.migrating()}
        if len(kinds) < 2:
            pytest.skip(
                f"mediator {capabilities.mediator!r} migrates one kind of device only: there "
                "is no other model's stream to offer"
            )
        streams = {}
        for identity, target in kinds.items():
            with rig.opened(target, "saving") as source:
                streams[identity] = save_state(source)
        for identity, target in kinds.items():
            for other, stream in streams.items():
                if other == identity:
                    continue
                with rig.opened(target, "crossed") as destination:
                    try:
                        destination.set_migration_state(S.RESUMING)
                        destination.write_migration_data(stream)
                        destination.set_migration_state(S.STOP)
                    except MigrationError:
                        continue
                fail(
                    Rule.MIGRATION,
                    f"{target} loaded the stream a device of {kinds[other]} saved: refuse "
                    "another model's state with OSError(EINVAL)",
                )

    @checks(Rule.MIGRATION)
    def test_migration_state_machine(
        self, capabilities: MediatorCapabilities, rig: DeviceRig
    ) -> None:
        """Random legal and illegal transitions follow the arc table; garbage does not load;
        only reset leaves ERROR."""
        for profile in capabilities.migrating():
            with rig.opened(profile.target, "saved") as source:
                saved = save_state(source)
            check_migration(rig, profile.target, profile.migration_flags, saved)


class TestDirtyLogging:
    """DMA dirty page logging, for mediators that implement ``mediator_dma_logging_start``."""

    @checks(Rule.DIRTY_LOGGING)
    def test_dirty_logging_lifecycle(
        self, capabilities: MediatorCapabilities, rig: DeviceRig
    ) -> None:
        """Logging starts, reports, stops, starts again, and stops at close."""
        for profile in capabilities.logging():
            device = rig.device(profile.target, "logging")
            with device, guest_memory(device):
                for _ in range(2):
                    device.dma_logging_start(PAGE_SIZE, [(GUEST_IOVA, GUEST_SIZE)])
                    device.dma_logging_report(GUEST_IOVA, GUEST_SIZE, PAGE_SIZE)
                    device.dma_logging_stop()
                device.dma_logging_start(PAGE_SIZE, [(GUEST_IOVA, GUEST_SIZE)])
                since = rig.calls
            if len(rig.recorder.of("mediator_dma_logging_stop", since)) != 1:
                fail(
                    Rule.DIRTY_LOGGING, f"{profile.target}: logging did not stop at the last close"
                )

    @checks(Rule.DIRTY_LOGGING)
    def test_dirty_logging_reports_device_writes(
        self, capabilities: MediatorCapabilities, rig: DeviceRig, request: pytest.FixtureRequest
    ) -> None:
        """Every page the device writes by DMA while logging is reported (checked against the
        DMA space's own record of writes): for the DMA the suite's accesses make the device do
        and, when the target's device model ships a guest workload, under its traffic, in
        reports between slices of it and across a stop and a new start of logging."""
        written_any = False
        for number, profile in enumerate(capabilities.logging()):
            with rig.opened(profile.target, "dirty") as device:
                written, reported, _ = logged_writes(device, profile.target, seed=number)
            missed = sorted(written - reported)
            if missed:
                fail(
                    Rule.DIRTY_LOGGING,
                    f"{profile.target}: the device wrote page(s) {missed[:8]} of guest memory "
                    "by DMA while logging, and they were not reported",
                )
            written_any = written_any or bool(written)
            workload = workload_for(profile.target)
            if workload is None:
                continue
            with rig.opened(profile.target, "traffic") as device:
                traffic = logged_traffic(device, workload, seed=number)
            request.node.user_properties.append(
                (DIRTY_LOGGING_PROPERTY, f"{profile.target}: {traffic.summary()}")
            )
            if traffic.missed:
                fail(
                    Rule.DIRTY_LOGGING,
                    f"{profile.target}: under its guest workload's traffic the device wrote "
                    f"{len(traffic.missed)} page(s) of guest memory by DMA while logging that "
                    f"no later report of the same logging session had: {traffic.name_missed()}"
                    f" ({traffic.summary()})",
                )
            written_any = written_any or bool(traffic.written)
        if not written_any:
            pytest.skip(
                "the suite's register accesses made none of the targets write guest memory by "
                "DMA, so there is nothing to compare the log with, and no target's device model "
                "ships a guest workload whose traffic did (an entry point of "
                "vfio_mediate.workloads named after the model); drive the device with its own "
                "traffic in the vendor's tests"
            )


def _fill_through(device: MediatedDevice, target: Target, seed: int) -> None:
    """Write a pattern through the mediator: every register of the trapped pages of its own
    regions and, on a plain device, of the device's mediated regions (refusals are fine)."""
    for index in sorted(device.mediated_regions):
        info = device.region_info(index)
        if not info.flags & RegionFlag.WRITE or (index < PCI_NUM_REGIONS and not target.is_plain):
            continue
        for offset, count in register_plan(info):
            if count == min(4, info.size):
                try:
                    device.write(index, offset, pattern(count, seed + offset))
                except OSError:
                    continue


def _mediator_state(device: MediatedDevice, target: Target) -> dict[str, object]:
    """What the mediator shows of its own: its regions' contents and, on a plain device, each
    register of a mediated device region that reads otherwise through the mediator than
    from the device."""
    state: dict[str, object] = {}
    for index in sorted(device.mediated_regions):
        if index >= PCI_NUM_REGIONS:
            state.update(shown(device, index))
        elif target.is_plain:
            for key, value in shown(device, index).items():
                if isinstance(value, tuple):
                    state[key] = tuple(
                        (offset, read if _shadowed(device, index, offset, read) else None)
                        for offset, read in value
                    )
    return state


def _shadowed(device: MediatedDevice, index: int, offset: int, read: object) -> bool:
    """Whether a register read through the mediator shows other bytes than the device has."""
    return isinstance(read, bytes) and read != device.backend.read(index, offset, len(read))


def _route_and_raise(device: MediatedDevice, target: Target, rig: DeviceRig, vectors: int) -> None:
    fired: list[int] = []
    since = len(rig.recorder.calls)
    try:
        device.set_irq_triggers(
            IrqIndex.MSIX, 0, [functools.partial(fired.append, vector) for vector in range(vectors)]
        )
    except OSError:
        return  # refused, with an errno (the core checks that)
    try:
        observed = {
            int(vector)
            for call in rig.recorder.of("mediator_irq_observe", since)
            for vector in call.result or ()
        }
        absent = sorted(vector for vector in observed if not 0 <= vector < vectors)
        if absent:
            fail(
                Rule.ACCESS_ERRORS,
                f"{target}: mediator_irq_observe named MSI-X vector(s) {absent[:4]}, which the "
                f"device (with {vectors}) does not have",
            )
        backend = device.backend
        assert isinstance(backend, EmulatedPciDevice)  # the rig's devices are
        for vector in range(vectors):
            backend.raise_msix(vector)
        deadline = time.monotonic() + _RELAY_WAIT
        while True:
            relayed = {call.args.get("vector") for call in rig.recorder.of("mediator_irq", since)}
            if observed <= relayed or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        lost = [v for v in range(vectors) if v not in observed and fired.count(v) != 1]
        unasked = sorted(observed - relayed)
        if lost or unasked:
            fail(
                Rule.ACCESS_ERRORS,
                f"{target}: MSI-X vector(s) {lost[:4]} did not reach the client, observed "
                f"vector(s) {unasked[:4]} never reached mediator_irq",
            )
    finally:
        device.set_irq_triggers(IrqIndex.MSIX, 0, [None] * vectors)
