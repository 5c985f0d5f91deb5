"""The rules of the hook contract, each with a stable id.

``ContractViolation.rule`` and the conformance suite's failure messages name these ids;
``vfio_mediate.hookspecs`` states each rule in full.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["Rule"]


class Rule(StrEnum):
    """A rule of the hook contract."""

    OPEN_RESULT = "open-result"
    """``mediator_open`` returns ``None`` to decline, any other object to claim."""
    OPEN_TARGETS = "open-targets"
    """A mediator claims only the devices it says it targets."""
    RELEASE_ONCE = "release-once"
    """``mediator_release`` runs once per claimed handle, at the last close."""
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
    """A device works again after its last close and a new open."""
    NO_CORE_IMPORT = "no-core-import"
    """A plugin does not import ``vfio_mediate`` at run time."""
    MIGRATION = "migration"
    """Migration hooks follow the migration v2 state machine."""
    DIRTY_LOGGING = "dirty-logging"
    """Dirty logging reports every page the device wrote while logging."""
    HOOK_SIGNATURE = "hook-signature"
    """Every hook implementation names a hook of the contract with its arguments."""
