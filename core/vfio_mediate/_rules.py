"""The rules of the hook contract, each with a stable id, and the rule each hook answers to.

``ContractViolation.rule`` and the conformance suite's failure messages name these ids;
``vfio_mediate.hookspecs`` states each rule in full, by its id.
"""

from __future__ import annotations

from enum import StrEnum
from types import MappingProxyType

__all__ = ["HOOK_RULES", "Rule"]


class Rule(StrEnum):
    """A rule of the hook contract."""

    OPEN_RESULT = "open-result"
    """``mediator_open`` returns ``None`` to decline, any other object to claim."""
    OPEN_TARGETS = "open-targets"
    """A mediator claims the devices it says it targets, and only those."""
    RELEASE_ONCE = "release-once"
    """``mediator_release`` runs once per claimed handle, at the last close."""
    REGIONS_RESULT = "regions-result"
    """``mediator_regions`` returns indexes of regions the device has."""
    REGION_INFO_VALID = "region-info-valid"
    """Region info a mediator returns is valid and only ever traps more than the device."""
    DEVICE_REGIONS_VALID = "device-regions-valid"
    """Device-specific regions are indexes >= 9 with a TYPE capability, each index once."""
    RW_RESULT = "rw-result"
    """``mediator_rw`` returns ``None`` or exactly the bytes asked for (read) or written."""
    ACCESS_ERRORS = "access-errors"
    """A refused access raises ``OSError`` with an errno, nothing else."""
    MMAP_RESULT = "mmap-result"
    """``mediator_mmap`` returns ``None`` or an ``(fd, file_offset)`` pair."""
    QUIET = "quiet"
    """Plugins never print; they log through ``logging``."""
    ISOLATION = "isolation"
    """No state is shared between two devices' handles."""
    REOPEN = "reopen"
    """A device works again after its last close and a new open, as it did before."""
    NO_CORE_IMPORT = "no-core-import"
    """A plugin does not import ``vfio_mediate`` at run time."""
    MIGRATION = "migration"
    """Migration hooks follow the migration v2 state machine and restore what they saved."""
    DIRTY_LOGGING = "dirty-logging"
    """Dirty logging reports every page the device wrote while logging."""
    HOOK_SIGNATURE = "hook-signature"
    """Every hook implementation names a hook of the contract with its arguments."""


HOOK_RULES: MappingProxyType[str, Rule] = MappingProxyType(
    {
        "mediator_open": Rule.OPEN_RESULT,
        "mediator_targets": Rule.OPEN_TARGETS,
        "mediator_release": Rule.RELEASE_ONCE,
        "mediator_regions": Rule.REGIONS_RESULT,
        "mediator_get_region_info": Rule.REGION_INFO_VALID,
        "mediator_device_regions": Rule.DEVICE_REGIONS_VALID,
        "mediator_rw": Rule.ACCESS_ERRORS,
        "mediator_mmap": Rule.MMAP_RESULT,
        "mediator_reset": Rule.ACCESS_ERRORS,
        "mediator_irq_observe": Rule.ACCESS_ERRORS,
        "mediator_irq": Rule.ACCESS_ERRORS,
        "mediator_migration_flags": Rule.MIGRATION,
        "mediator_set_state": Rule.MIGRATION,
        "mediator_load_state": Rule.MIGRATION,
        "mediator_dma_logging_start": Rule.DIRTY_LOGGING,
        "mediator_dma_logging_report": Rule.DIRTY_LOGGING,
        "mediator_dma_logging_stop": Rule.DIRTY_LOGGING,
    }
)
"""The rule a hook breaks when it raises anything but an ``OSError`` with an errno (a refusal):
each hook answers to the rule of its own clause in ``vfio_mediate.hookspecs``."""
