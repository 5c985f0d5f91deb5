"""A Linux guest drives the served X710 VF through its BAR: trapped pages reach the mediator,
mapped pages go straight to device memory without the server."""

from __future__ import annotations

import re
import types
from collections.abc import Callable
from typing import Any

import i40e_mediator.mediator as i40e
import pluggy
import pytest

from vfio_mediate import MediatorRegistry

from .conftest import RunningVm, ServedDevice, device_option

hookimpl = pluggy.HookimplMarker("vfio_mediate")

RX_TAIL_0 = 0x2000
RSS_KEY_0 = 0xCC00
VFGEN_RSTAT = 0x8800

INIT = r"""
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for d in /sys/bus/pci/devices/*; do
  if [ "$(cat $d/vendor)" = 0x8086 ] && [ "$(cat $d/device)" = 0x154c ]; then
    echo 1 > $d/enable
    bar0=$(( $(head -n1 $d/resource | cut -d' ' -f1) ))
    echo "VF $d BAR0 $bar0"
    devmem $((bar0 + 0x2000)) 32 0x5
    devmem $((bar0 + 0xCC00)) 32 0x12345678
    echo "RSTAT $(devmem $((bar0 + 0x8800)) 32)"
    echo "RSSKEY $(devmem $((bar0 + 0xCC00)) 32)"
  fi
done
echo GUEST-DONE
poweroff -f
"""


def spied_i40e(calls: list[tuple[int, int, bool]]) -> Any:
    """The real i40e mediator's hooks, with ``mediator_rw`` recording each access it sees."""
    hooks = {name: getattr(i40e, name) for name in dir(i40e) if name.startswith("mediator_")}
    real_rw = hooks.pop("mediator_rw")

    @hookimpl
    def mediator_rw(
        handle: Any, index: int, offset: int, count: int, data: bytes | None, is_write: bool
    ) -> Any:
        calls.append((index, offset, is_write))
        return real_rw(handle, index, offset, count, data, is_write)

    return types.SimpleNamespace(**hooks, mediator_rw=mediator_rw)


def test_guest_writes_trapped_and_mapped_registers(
    qemu_root: Any,
    provisioner: Any,
    serve: Callable[..., ServedDevice],
    start_vm: Callable[..., RunningVm],
) -> None:
    calls: list[tuple[int, int, bool]] = []
    registry = MediatorRegistry()
    registry.register(spied_i40e(calls), "i40e")
    served = serve(registry=registry)
    initrd = provisioner.build_initramfs(qemu_root, INIT)
    vm = start_vm(
        "-kernel", qemu_root.kernel, "-initrd", initrd,
        "-append", "console=ttyS0 quiet panic=-1",
        "-device", device_option(served.socket_in_root),
        serial=True,
    )  # fmt: skip
    try:
        vm.process.wait(timeout=120)
    except Exception:
        pytest.fail(f"the guest did not power off:\n{vm.log_text()}")
    assert vm.serial is not None
    console = vm.serial.read_text(errors="replace")
    assert "GUEST-DONE" in console, console + vm.log_text()
    assert "VF /sys/bus/pci/devices/" in console, console
    # the trapped RX tail write went through the server to the mediator, and reached the device
    assert (0, RX_TAIL_0, True) in calls, calls
    assert int.from_bytes(served.device.backend.read(0, RX_TAIL_0, 4), "little") == 5
    # the mapped RSS key write never reached the server, yet the device's memory holds it
    assert all(offset != RSS_KEY_0 for _, offset, _ in calls), calls
    assert served.device.backend.read(0, RSS_KEY_0, 4) == (0x12345678).to_bytes(4, "little")
    assert "RSSKEY 0x12345678" in console
    # VFGEN_RSTAT reads "reset completed" (QEMU reset the device at boot) or "VF active":
    # the two states a guest driver accepts
    assert re.search(r"RSTAT 0x0000000[12]\b", console), console
    # the trapped pages were never handed out to QEMU as mappable
    handed = served.endpoint.mapped_areas.get(0, set())
    assert handed, "QEMU was given no BAR0 area to map"
    for offset, size in handed:
        assert not offset <= RX_TAIL_0 < offset + size
        assert not offset <= 0x7000 < offset + size
