"""EmulatedPciDevice: config space like hardware, BARs in shareable memory, MSI-X."""

from __future__ import annotations

import errno
import mmap
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from vfio_mediate import AccessError, DeviceSpec, DeviceSpecError, EmulatedPciDevice
from vfio_mediate._pci import PciConfig
from vfio_mediate._regions import Reader, Writer
from vfio_mediate._spec import load_spec
from vfio_mediate.uapi import IrqIndex, RegionFlag, RegionIndex

CFG = RegionIndex.CONFIG


def cfg_read(device: EmulatedPciDevice, offset: int, size: int) -> int:
    return int.from_bytes(device.read(CFG, offset, size), "little")


def cfg_write(device: EmulatedPciDevice, offset: int, size: int, value: int) -> None:
    device.write(CFG, offset, value.to_bytes(size, "little"))


def assert_refused(read: Reader, write: Writer, accesses: tuple[tuple[int, int], ...]) -> None:
    """Each ``(offset, count)`` read and written through the handlers is refused (EINVAL)."""
    for offset, count in accesses:
        with pytest.raises(AccessError) as error:
            read(offset, count)
        assert error.value.errno == errno.EINVAL
        with pytest.raises(AccessError) as error:
            write(offset, b"\0" * count)
        assert error.value.errno == errno.EINVAL


def test_identity_is_read_only(virtio_device: EmulatedPciDevice) -> None:
    assert cfg_read(virtio_device, PciConfig.VENDOR_ID, 4) == 0x1041_1AF4
    cfg_write(virtio_device, PciConfig.VENDOR_ID, 4, 0xFFFF_FFFF)
    assert cfg_read(virtio_device, PciConfig.VENDOR_ID, 4) == 0x1041_1AF4
    assert cfg_read(virtio_device, PciConfig.CLASS_CODE, 3) == 0x020000
    assert cfg_read(virtio_device, PciConfig.REVISION, 1) == 1
    assert cfg_read(virtio_device, PciConfig.SUBSYSTEM_VENDOR_ID, 4) == 0x0001_1AF4
    assert cfg_read(virtio_device, PciConfig.HEADER_TYPE, 1) == 0


def test_bar_sizing_and_64_bit_pairs(virtio_device: EmulatedPciDevice) -> None:
    bar0, bar1 = PciConfig.BAR0, PciConfig.BAR0 + 4
    assert cfg_read(virtio_device, bar0, 4) == PciConfig.BAR_MEM64
    cfg_write(virtio_device, bar0, 4, 0xFFFF_FFFF)
    cfg_write(virtio_device, bar1, 4, 0xFFFF_FFFF)
    low = cfg_read(virtio_device, bar0, 4)
    high = cfg_read(virtio_device, bar1, 4)
    mask = (high << 32) | (low & ~0xF)
    assert low & 0xF == PciConfig.BAR_MEM64
    assert (~mask & 0xFFFF_FFFF_FFFF_FFFF) + 1 == 0x4000
    cfg_write(virtio_device, bar0, 4, 0xFEB0_0000)
    cfg_write(virtio_device, bar1, 4, 0x0000_0001)
    assert cfg_read(virtio_device, bar0, 8) == 0x1_FEB0_0000 | PciConfig.BAR_MEM64
    # I/O BAR: bit 0 set, 32 bytes
    cfg_write(virtio_device, PciConfig.BAR0 + 8, 4, 0xFFFF_FFFF)
    io = cfg_read(virtio_device, PciConfig.BAR0 + 8, 4)
    assert io & 1 and (~(io & ~0x3) & 0xFFFF_FFFF) + 1 == 0x20
    # BAR3 (the high half of nothing) and BAR5 do not exist: they stay 0
    cfg_write(virtio_device, PciConfig.BAR0 + 20, 4, 0xFFFF_FFFF)
    assert cfg_read(virtio_device, PciConfig.BAR0 + 20, 4) == 0


def test_command_register_keeps_only_writable_bits(virtio_device: EmulatedPciDevice) -> None:
    cfg_write(virtio_device, PciConfig.COMMAND, 2, 0xFFFF)
    assert cfg_read(virtio_device, PciConfig.COMMAND, 2) == PciConfig.COMMAND_WRITABLE
    assert cfg_read(virtio_device, PciConfig.STATUS, 2) & PciConfig.STATUS_CAP_LIST


def walk_capabilities(device: EmulatedPciDevice) -> dict[int, int]:
    caps, at = {}, cfg_read(device, PciConfig.CAPABILITIES, 1)
    while at:
        caps[cfg_read(device, at, 1)] = at
        at = cfg_read(device, at + 1, 1)
    return caps


def test_capability_list_has_msix_and_pci_express(virtio_device: EmulatedPciDevice) -> None:
    caps = walk_capabilities(virtio_device)
    assert set(caps) == {PciConfig.CAP_ID_MSIX, PciConfig.CAP_ID_PCIE}
    msix = caps[PciConfig.CAP_ID_MSIX]
    control = cfg_read(virtio_device, msix + 2, 2)
    assert control & 0x7FF == 3  # four vectors
    assert cfg_read(virtio_device, msix + 4, 4) == 4  # table at offset 0 of BAR4
    assert cfg_read(virtio_device, msix + 8, 4) == 0x1000 | 4
    cfg_write(virtio_device, msix + 2, 2, 0xFFFF)
    assert cfg_read(virtio_device, msix + 2, 2) == 0xC003  # enable + mask writable, size not
    assert cfg_read(virtio_device, caps[PciConfig.CAP_ID_PCIE] + 2, 2) & 0xF == 2
    assert virtio_device.region_info(CFG).size == 4096


def test_region_infos(virtio_device: EmulatedPciDevice) -> None:
    bar0 = virtio_device.region_info(0)
    assert bar0.flags == RegionFlag.READ | RegionFlag.WRITE | RegionFlag.MMAP
    assert bar0.sparse_mmap is None and bar0.size == 0x4000
    assert virtio_device.region_info(1).size == 0  # high half of BAR0
    io = virtio_device.region_info(2)
    assert io.size == 0x20 and not io.flags & RegionFlag.MMAP
    msix_bar = virtio_device.region_info(4)
    # table page and PBA page both trapped: nothing of BAR4 is mapped
    assert not msix_bar.flags & RegionFlag.MMAP
    assert virtio_device.region_info(RegionIndex.ROM).size == 0


def test_bar_memory_is_a_shareable_file(virtio_device: EmulatedPciDevice) -> None:
    fd, offset = virtio_device.mmap(0, 0x1000, 0x1000)
    with mmap.mmap(fd, 0x1000, offset=offset) as mapped:
        mapped[0:4] = b"\x11\x22\x33\x44"
        assert virtio_device.read(0, 0x1000, 4) == b"\x11\x22\x33\x44"
        virtio_device.write(0, 0x1004, b"\x55")
        assert mapped[4] == 0x55
    # another process writes through the same fd
    script = "import mmap,os,sys; m=mmap.mmap(int(sys.argv[1]),0x4000); m[8:12]=b'peer'"
    subprocess.run([sys.executable, "-c", script, str(fd)], pass_fds=[fd], check=True)
    assert virtio_device.read(0, 8, 4) == b"peer"


def test_msix_fires_eventfd_or_sets_pending(virtio_device: EmulatedPciDevice) -> None:
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        virtio_device.raise_msix(2)  # no trigger yet: pending
        pba = virtio_device.read(4, 0x1000, 8)
        assert pba[0] == 1 << 2
        virtio_device.set_irq_triggers(IrqIndex.MSIX, 2, [lambda: os.eventfd_write(efd, 1)])
        assert os.eventfd_read(efd) == 1  # the pending vector fired on assignment
        assert virtio_device.read(4, 0x1000, 8)[0] == 0
        virtio_device.raise_msix(2)
        assert os.eventfd_read(efd) == 1
        # masking the vector in the table holds it pending
        virtio_device.write(4, 2 * 16 + 12, struct.pack("<I", 1))
        virtio_device.raise_msix(2)
        with pytest.raises(BlockingIOError):
            os.eventfd_read(efd)
        assert virtio_device.read(4, 0x1000, 1)[0] == 1 << 2
        virtio_device.write(4, 0x1000, b"\x00")  # the PBA is read-only
        assert virtio_device.read(4, 0x1000, 1)[0] == 1 << 2
        virtio_device.write(4, 2 * 16 + 12, struct.pack("<I", 0))  # unmask: delivered now
        assert os.eventfd_read(efd) == 1
        assert virtio_device.read(4, 0x1000, 1)[0] == 0
        # the function mask holds vectors too, and clearing it delivers them
        control = PciConfig.MSIX_CAP + PciConfig.MSIX_CONTROL
        cfg_write(virtio_device, control, 2, PciConfig.MSIX_FUNCTION_MASK)
        virtio_device.raise_msix(2)
        with pytest.raises(BlockingIOError):
            os.eventfd_read(efd)
        cfg_write(virtio_device, control, 2, 0)
        assert os.eventfd_read(efd) == 1
        with pytest.raises(AccessError) as error:
            virtio_device.set_irq_triggers(IrqIndex.MSIX, 3, [None, None])
        assert error.value.errno == errno.EINVAL
    finally:
        os.close(efd)


def test_reset_restores_config_and_clears_memory(virtio_device: EmulatedPciDevice) -> None:
    cfg_write(virtio_device, PciConfig.COMMAND, 2, PciConfig.COMMAND_MEMORY)
    virtio_device.write(0, 0, b"junk")
    virtio_device.reset()
    assert cfg_read(virtio_device, PciConfig.COMMAND, 2) == 0
    assert virtio_device.read(0, 0, 4) == bytes(4)


def test_spec_from_toml(tmp_path: Path) -> None:
    path = tmp_path / "nic.toml"
    path.write_text(
        "vendor_id = 0x1234\ndevice_id = 0x5678\nclass_code = 0x020000\n"
        '[[bars]]\nindex = 0\nsize = 0x1000\nkind = "mem32"\nprefetchable = false\n'
    )
    spec = load_spec(path)
    assert spec.name == "nic" and spec.bars[0].size == 0x1000


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("vendor_id = 1\ndevice_id = 2\n", "class_code: Field required"),
        ("vendor_id = 0x10000\ndevice_id = 2\nclass_code = 0\n", "vendor_id"),
        (
            "vendor_id = 1\ndevice_id = 2\nclass_code = 0\n[[bars]]\nindex = 5\nsize = 4096\n"
            'kind = "mem64"\n',
            "not BAR5",
        ),
        (
            "vendor_id = 1\ndevice_id = 2\nclass_code = 0\n[[bars]]\nindex = 0\nsize = 4096\n"
            'kind = "mem64"\n[[bars]]\nindex = 1\nsize = 4096\n',
            "BAR1 is used twice",
        ),
        (
            "vendor_id = 1\ndevice_id = 2\nclass_code = 0\n[[bars]]\nindex = 0\nsize = 3000\n",
            "not a power of two",
        ),
        (
            "vendor_id = 1\ndevice_id = 2\nclass_code = 0\n[[bars]]\nindex = 0\nsize = 4096\n"
            "[msix]\nvectors = 300\ntable_bar = 0\npba_bar = 0\npba_offset = 0xF00\n",
            "does not fit",
        ),
        ("vendor_id = [", "not valid TOML"),
    ],
)
def test_bad_specs_are_refused_with_the_reason(tmp_path: Path, body: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(body)
    with pytest.raises(DeviceSpecError, match=message) as error:
        load_spec(path)
    assert str(path) in str(error.value)


def test_a_model_read_of_the_wrong_length_is_an_error(virtio_spec: DeviceSpec) -> None:
    class Sloppy:
        def bar_read(self, bar: int, offset: int, count: int) -> bytes:
            return bytes(8)

    device = EmulatedPciDevice(virtio_spec, Sloppy())
    try:
        handlers = device.region_handlers(0, 0x4000)
        assert handlers is not None
        for read in (lambda: device.read(0, 0, 4), lambda: handlers[0](0, 4)):
            with pytest.raises(AccessError, match="8 bytes for a 4-byte read") as error:
                read()
            assert error.value.errno == errno.EIO
    finally:
        device.close()


def test_bound_config_handlers_behave_as_read_and_write(virtio_device: EmulatedPciDevice) -> None:
    """The config handlers a MediatedDevice calls keep the write mask, the bounds and the
    delivery of vectors an MSI-X function unmask releases, whatever the size of the write."""
    handlers = virtio_device.region_handlers(CFG, 0x1000)
    assert handlers is not None and virtio_device.region_handlers(RegionIndex.VGA, 0) is None
    read, write = handlers
    assert read(PciConfig.VENDOR_ID, 4) == virtio_device.read(CFG, PciConfig.VENDOR_ID, 4)
    for size in (1, 2, 3, 4):  # 3 bytes goes byte by byte
        assert write(PciConfig.VENDOR_ID, b"\xff" * size) == size
    assert read(PciConfig.VENDOR_ID, 4) == struct.pack("<I", 0x1041_1AF4)
    write(PciConfig.COMMAND, struct.pack("<H", 0xFFFF))
    assert cfg_read(virtio_device, PciConfig.COMMAND, 2) == 0x0547  # the writable bits only
    assert_refused(read, write, ((-1, 4), (0xFFE, 4), (0, 0)))
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        virtio_device.set_irq_triggers(IrqIndex.MSIX, 1, [lambda: os.eventfd_write(efd, 1)])
        control = PciConfig.MSIX_CAP + PciConfig.MSIX_CONTROL
        masked = cfg_read(virtio_device, control - 2, 4) | PciConfig.MSIX_FUNCTION_MASK << 16
        write(control - 2, struct.pack("<I", masked))
        virtio_device.raise_msix(1)
        with pytest.raises(BlockingIOError):
            os.eventfd_read(efd)
        write(control - 2, struct.pack("<I", masked & ~(PciConfig.MSIX_FUNCTION_MASK << 16)))
        assert os.eventfd_read(efd) == 1  # a 4-byte write that reaches the control word
    finally:
        virtio_device.set_irq_triggers(IrqIndex.MSIX, 1, [None])
        os.close(efd)


def test_bound_config_writes_merge_like_the_full_path(virtio_spec: DeviceSpec) -> None:
    """Every size and alignment, each offset written twice (the second time from what the
    first write left): the bound handler leaves config space exactly as ``write`` does."""
    bound, full = EmulatedPciDevice(virtio_spec), EmulatedPciDevice(virtio_spec)
    try:
        handlers = bound.region_handlers(CFG, 0x1000)
        assert handlers is not None
        write = handlers[1]
        for value in (0xFFFF_FFFF, 0x5A5A_A5A5):
            for size in (1, 2, 3, 4):
                for offset in range(0, 0x100 - size):
                    data = (value >> (8 * (offset % 4))).to_bytes(8, "little")[:size]
                    assert write(offset, data) == size
                    full.write(CFG, offset, data)
                    assert bound.read(CFG, 0, 0x100) == full.read(CFG, 0, 0x100), (offset, size)
        assert bound.read(CFG, 0, 0x100) != EmulatedPciDevice(virtio_spec).read(CFG, 0, 0x100)
    finally:
        bound.close()
        full.close()


class _Registers:
    """A model that computes the register at 0x10 and counts the reads it is asked."""

    def __init__(self, computed: object = ((0x10, 4),)) -> None:
        self.computed = computed
        self.asked: list[tuple[int, int]] = []

    def computed_reads(self, bar: int) -> object:
        return self.computed if bar == 0 else []

    def bar_read(self, bar: int, offset: int, count: int) -> bytes | None:
        self.asked.append((offset, count))
        return bytes(count) if offset < 0x14 and offset + count > 0x10 else None


def test_reads_outside_computed_registers_skip_the_model(virtio_spec: DeviceSpec) -> None:
    """A model that declares its computed registers is asked only the reads that touch one;
    the others read the BAR's memory. Declaring ``None`` sends every read to the model."""
    model = _Registers()
    device = EmulatedPciDevice(virtio_spec, model)
    try:
        device.bar_memory(0)[0:0x20] = bytes(range(1, 0x21))
        handlers = device.region_handlers(0, 0x4000)
        assert handlers is not None
        read = handlers[0]
        assert read(0, 8) == bytes(range(1, 9))
        assert read(0x14, 4) == bytes(range(0x15, 0x19))
        assert read(0x0C, 8) == bytes(8)  # overlaps the register: the model's answer
        assert read(0x13, 1) == bytes(1)
        assert model.asked == [(0x0C, 8), (0x13, 1)]
    finally:
        device.close()
    every = _Registers(None)
    device = EmulatedPciDevice(virtio_spec, every)
    try:
        handlers = device.region_handlers(0, 0x4000)
        assert handlers is not None
        handlers[0](0, 8)
        assert every.asked == [(0, 8)]
    finally:
        device.close()


@pytest.mark.parametrize("computed", [[(0x3FFE, 4)], [(-4, 4)], [(0, 0)], [("a", 4)], 5])
def test_a_bad_computed_reads_answer_is_refused(virtio_spec: DeviceSpec, computed: object) -> None:
    with pytest.raises(DeviceSpecError, match=r"computed_reads\(0\)"):
        EmulatedPciDevice(virtio_spec, _Registers(computed))


def test_bound_bar_handlers_behave_as_read_and_write(virtio_device: EmulatedPciDevice) -> None:
    """A BAR's bound handlers read and write its memory, keep the PBA read-only and refuse
    accesses outside the BAR."""
    handlers = virtio_device.region_handlers(4, 0x2000)
    assert handlers is not None
    read, write = handlers
    assert write(8, b"bar4") == 4
    assert read(8, 4) == b"bar4" == virtio_device.read(4, 8, 4)
    virtio_device.raise_msix(0)
    assert write(0x1000, b"\x00") == 1  # the PBA is read-only
    assert read(0x1000, 1)[0] == 1
    assert_refused(read, write, ((-1, 4), (0x1FFE, 4), (0, 0)))
