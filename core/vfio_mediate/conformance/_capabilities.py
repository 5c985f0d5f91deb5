"""What a mediator offers beyond the basic contract, and how the suite learns it.

A mediator declares its capabilities the way a VMM learns them, through the contract itself;
there is no second list to keep in step with the code:

- **migration v2**: ``mediator_migration_flags`` returns flags (STOP_COPY at least) for a target
  device (``VFIO_DEVICE_FEATURE_MIGRATION``); ``None`` or no hook means no migration;
- **dirty logging**: the mediator implements ``mediator_dma_logging_start``
  (``VFIO_DEVICE_FEATURE_DMA_LOGGING_START`` is then offered);
- **device-specific regions**: ``mediator_device_regions`` returns regions for a target device;
- **fallback**: ``trylast=True`` on ``mediator_open`` declares a fallback, asked after every
  other mediator and free to claim any device (the null mediator). No device must be declined
  by a fallback; every other mediator must decline devices it does not target.

The suite opens each target once to read them; the tests of a capability a mediator does not
declare are skipped with the reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest

from .._device import MediatedDevice
from .._entry_points import Priority
from .._errors import ContractViolation
from ..uapi import PCI_NUM_REGIONS
from ._mediator import MediatorUnderTest
from ._targets import Target

__all__ = ["MediatorCapabilities", "Profile"]


@dataclass(frozen=True)
class Profile:
    """What the mediator offers for one target device, as a client sees it after open."""

    target: Target
    claimed: bool
    migration_flags: int
    device_regions: tuple[int, ...]


@dataclass(frozen=True)
class MediatorCapabilities:
    """The capabilities a mediator declares (see the module docstring for how)."""

    mediator: str
    fallback: bool
    dirty_logging: bool
    profiles: tuple[Profile, ...]
    violation: ContractViolation | None = field(default=None, compare=False)
    """What the core found wrong when it opened the targets (none can then be probed):
    raised again by each question asked of the capabilities, inside the test that asks."""

    @classmethod
    def probe(cls, mediator: MediatorUnderTest, targets: Sequence[Target]) -> MediatorCapabilities:
        """Open each target once (the mediator alone in a registry) and read what it offers."""
        registry = mediator.registry()
        profiles = []
        violation = None
        for number, target in enumerate(targets):
            backend = target.build(f"probe-{number}")
            try:
                with MediatedDevice(backend, registry) as device:
                    regions = tuple(
                        info.index for info in device.regions if info.index >= PCI_NUM_REGIONS
                    )
                    claimed = device.mediator is not None
                    profiles.append(Profile(target, claimed, device.migration_flags, regions))
            except ContractViolation as exc:
                violation = exc
                break
            finally:
                backend.close()
        return cls(
            mediator.name,
            mediator.priority is Priority.LAST,
            mediator.hook("mediator_dma_logging_start") is not None,
            tuple(profiles),
            violation,
        )

    def _usable(self) -> None:
        if self.violation is not None:
            raise self.violation

    def migrating(self) -> tuple[Profile, ...]:
        """The targets the mediator migrates; skips the test when there are none."""
        self._usable()
        found = tuple(profile for profile in self.profiles if profile.migration_flags)
        if not found:
            pytest.skip(
                f"mediator {self.mediator!r} declares no migration v2 support: "
                "mediator_migration_flags gives no flags for any of its targets"
            )
        return found

    def with_device_regions(self) -> tuple[Profile, ...]:
        """The targets for which the mediator adds device-specific regions; skips when none."""
        self._usable()
        found = tuple(profile for profile in self.profiles if profile.device_regions)
        if not found:
            pytest.skip(
                f"mediator {self.mediator!r} adds no device-specific regions "
                "(mediator_device_regions) to any of its targets"
            )
        return found

    def logging(self) -> tuple[Profile, ...]:
        """The targets whose dirty pages the mediator logs (those it claims, when it implements
        ``mediator_dma_logging_start``); skips the test when there are none."""
        self._usable()
        if not self.dirty_logging:
            pytest.skip(
                f"mediator {self.mediator!r} declares no dirty logging: it does not implement "
                "mediator_dma_logging_start"
            )
        found = tuple(profile for profile in self.profiles if profile.claimed)
        if not found:
            pytest.skip(f"mediator {self.mediator!r} claims none of its targets")
        return found

    def require_not_fallback(self) -> None:
        """Skip the test for a fallback mediator, which may claim any device."""
        self._usable()
        if self.fallback:
            pytest.skip(
                f"mediator {self.mediator!r} is a fallback (trylast=True on mediator_open): "
                "it may claim any device, so there is no device it must decline"
            )
