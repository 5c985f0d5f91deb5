"""The uAPI numbers the shipped plugins copy (they import nothing of the core) are the core's.

A plugin keeps its own copy of the VFIO numbers it uses, as a kernel driver includes vfio.h;
these tests are what keeps each copy equal to ``vfio_mediate.uapi`` and the core's PCI and
MSI-X facts.
"""

from __future__ import annotations

from i40e_mediator import guest, mediator, model, registers

from vfio_mediate._pci import PciConfig
from vfio_mediate._spec import MSIX_ENTRY_SIZE, DeviceSpec
from vfio_mediate.uapi import (
    PAGE_SIZE,
    PCI_NUM_REGIONS,
    REGION_TYPE_PCI_VENDOR_TYPE,
    IrqIndex,
    MigrationFlag,
    MigrationState,
    RegionFlag,
    RegionIndex,
)


def test_the_i40e_mediator_copies_the_uapi() -> None:
    assert mediator.REGION_FLAG_READ == RegionFlag.READ
    assert mediator.REGION_FLAG_MMAP == RegionFlag.MMAP
    assert mediator.MIGRATION_STOP_COPY == MigrationFlag.STOP_COPY
    assert mediator.MIGRATION_P2P == MigrationFlag.P2P
    assert mediator.MIGRATION_PRE_COPY == MigrationFlag.PRE_COPY
    for state in MigrationState:
        if state is not MigrationState.ERROR:
            assert getattr(mediator, f"STATE_{state.name}") == state
    assert mediator.STATE_REGION == PCI_NUM_REGIONS
    assert mediator.PCI_VENDOR_TYPE == REGION_TYPE_PCI_VENDOR_TYPE


def test_the_i40e_guest_and_model_copy_the_uapi_and_pci() -> None:
    assert guest.CONFIG_REGION == RegionIndex.CONFIG
    assert guest.MSIX_IRQ_INDEX == IrqIndex.MSIX
    assert guest.PCI_COMMAND == PciConfig.COMMAND
    assert guest.PCI_COMMAND_MEMORY == PciConfig.COMMAND_MEMORY
    assert guest.PCI_COMMAND_MASTER == PciConfig.COMMAND_MASTER
    assert registers.PAGE_SIZE == PAGE_SIZE
    assert registers.MSIX_ENTRY_SIZE == MSIX_ENTRY_SIZE


def test_the_i40e_model_sizes_its_pba_as_the_core_does() -> None:
    plain, vf = model.create()
    spec = DeviceSpec.from_plain(plain, source="i40e-vf")
    assert spec.msix is not None
    assert vf._pba_size == spec.msix.pba_size
    assert spec.msix.vectors == registers.MSIX_VECTORS
