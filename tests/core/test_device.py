"""MediatedDevice: first match, region table, handlers, lifetime, migration, dirty logging."""

from __future__ import annotations

import errno
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pluggy
import pytest
from irq_observer import IrqObserver

from vfio_mediate import (
    AccessError,
    ContractViolation,
    DeviceNotOpenError,
    EmulatedPciDevice,
    MediatedDevice,
    MediatorRegistry,
    MigrationError,
)
from vfio_mediate.uapi import IrqIndex, MigrationState, RegionFlag, RegionIndex

hookimpl = pluggy.HookimplMarker("vfio_mediate")
S = MigrationState


class Trapper:
    """A mediator that traps BAR0's second page, doubles bytes written there, counts calls."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.released: list[Any] = []
        self.saved = b"state-v1"
        self.loaded: list[bytes] = []

    @hookimpl
    def mediator_open(self, device: Any) -> dict[str, Any]:
        self.calls["open"] += 1
        return {"device": device, "arcs": []}

    @hookimpl
    def mediator_release(self, handle: Any) -> None:
        self.released.append(handle)

    @hookimpl
    def mediator_regions(self, handle: Any) -> list[int]:
        return [0]

    @hookimpl
    def mediator_get_region_info(self, handle: Any, info: dict[str, Any]) -> Any:
        if info["index"] != 0:
            return None
        info["sparse_mmap"] = [[0, 0x1000], [0x2000, 0x2000]]
        return info

    @hookimpl
    def mediator_rw(
        self, handle: Any, index: int, offset: int, count: int, data: bytes | None, is_write: bool
    ) -> Any:
        self.calls["rw"] += 1
        if is_write and data is not None and 0x1000 <= offset < 0x2000:
            return handle["device"].write(index, offset, bytes(b * 2 & 0xFF for b in data))
        return None

    @hookimpl
    def mediator_migration_flags(self, handle: Any) -> int:
        return 1 | 4  # STOP_COPY | PRE_COPY

    @hookimpl
    def mediator_set_state(self, handle: Any, current: int, new: int) -> Any:
        handle["arcs"].append((S(current), S(new)))
        if new in (S.PRE_COPY, S.STOP_COPY):
            return self.saved if new == S.STOP_COPY else b"pre"
        return None

    @hookimpl
    def mediator_load_state(self, handle: Any, data: bytes) -> None:
        if not data.startswith(b"state-"):
            raise OSError(errno.EINVAL, "not a Trapper state")
        self.loaded.append(data)


@pytest.fixture
def trapper() -> Trapper:
    return Trapper()


@pytest.fixture
def device(virtio_device: EmulatedPciDevice, trapper: Trapper) -> MediatedDevice:
    registry = MediatorRegistry()
    registry.register(trapper, "trapper")
    return MediatedDevice(virtio_device, registry)


def test_use_count_releases_exactly_once(device: MediatedDevice, trapper: Trapper) -> None:
    device.open()
    device.open()
    device.close()
    assert trapper.released == []
    device.close()
    assert len(trapper.released) == 1
    # Not open is one error, whatever was asked, with ENODEV for the wire.
    for operation in (
        device.close,
        lambda: device.read(0, 0, 4),
        lambda: device.write(0, 0, b"x"),
        lambda: device.region_info(0),
        lambda: device.mmap(0, 0, 4096),
        lambda: device.reset(),
        lambda: device.migration_flags,
        lambda: device.set_migration_state(S.STOP),
        lambda: device.dma_logging_start(4096, [(0, 4096)]),
    ):
        with pytest.raises(DeviceNotOpenError, match="not open") as error:
            operation()
        assert error.value.errno == errno.ENODEV
    device.open()  # reopen asks the mediator anew
    device.close()
    assert trapper.calls["open"] == 2 and len(trapper.released) == 2


def test_concurrent_opens_and_closes_release_once(device: MediatedDevice, trapper: Trapper) -> None:
    barrier = threading.Barrier(8)

    def churn() -> None:
        barrier.wait()
        for _ in range(200):
            device.open()
            device.read(7, 0, 4)
            device.close()

    device.open()
    threads = [threading.Thread(target=churn) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert trapper.calls["open"] == 1 and trapper.released == []
    device.close()
    assert len(trapper.released) == 1


def test_unmediated_regions_cost_no_plugin_call(device: MediatedDevice, trapper: Trapper) -> None:
    with device:
        assert device.mediated_regions == {0}
        device.read(RegionIndex.CONFIG, 0, 4)
        device.write(4, 0x20, b"x")
        assert trapper.calls["rw"] == 0
        device.read(0, 0, 4)
        assert trapper.calls["rw"] == 1


def test_mediator_uses_the_default_handlers(device: MediatedDevice) -> None:
    with device:
        device.write(0, 0x1000, b"\x01\x02")  # trapped page: doubled on the way
        assert device.read(0, 0x1000, 2) == b"\x02\x04"
        device.write(0, 0x10, b"\x01")  # mediated region, passed through unchanged
        assert device.read(0, 0x10, 1) == b"\x01"


def test_region_table_and_sparse_mmap(device: MediatedDevice) -> None:
    with device:
        bar0 = device.region_info(0)
        assert [(a.offset, a.size) for a in bar0.mmap_areas()] == [(0, 0x1000), (0x2000, 0x2000)]
        assert bar0.wire_flags & RegionFlag.CAPS
        assert device.mmap(0, 0x2000, 0x1000).file_offset == 0x2000
        with pytest.raises(AccessError, match="not mmap-able") as error:
            device.mmap(0, 0x1000, 0x1000)  # the trapped page
        assert error.value.errno == errno.EINVAL
        assert device.device_info().num_regions == 9


@pytest.mark.parametrize(
    ("index", "offset", "count"),
    [(0, 0x3FFF, 2), (0, -1, 1), (7, 4096, 1), (0, 0, 0), (1, 0, 1)],
)
def test_out_of_range_accesses_are_refused(
    device: MediatedDevice, trapper: Trapper, index: int, offset: int, count: int
) -> None:
    with device:
        with pytest.raises(AccessError) as error:
            device.read(index, offset, count)
        assert error.value.errno == errno.EINVAL
        assert trapper.calls["rw"] == 0  # the mediator never saw it
        with pytest.raises(AccessError):
            device.read(42, 0, 1)


def test_unclaimed_device_is_plain_passthrough(virtio_device: EmulatedPciDevice) -> None:
    with MediatedDevice(virtio_device, MediatorRegistry()) as device:
        assert device.mediator is None
        device.write(0, 0x1000, b"\x01")
        assert device.read(0, 0x1000, 1) == b"\x01"
        assert device.region_info(0) == virtio_device.region_info(0)


def register(virtio_device: EmulatedPciDevice, **hooks: Any) -> MediatedDevice:
    @hookimpl
    def mediator_open(device: Any) -> object:
        return object()

    namespace = type("Plugin", (), {"mediator_open": staticmethod(mediator_open)})
    for name, function in hooks.items():
        setattr(namespace, name, staticmethod(hookimpl(function)))
    registry = MediatorRegistry()
    registry.register(namespace, "bad")
    return MediatedDevice(virtio_device, registry)


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        ({"size": 0x8000}, "size changed"),
        ({"sparse_mmap": [[0x800, 0x1000]]}, "not page-aligned"),
        ({"flags": 0x1F}, "unknown region flag"),
    ],
)
def test_invalid_region_info_names_plugin_and_rule(
    virtio_device: EmulatedPciDevice, answer: dict[str, Any], message: str
) -> None:
    def mediator_get_region_info(handle: Any, info: dict[str, Any]) -> Any:
        return {**info, **answer} if info["index"] == 0 else None

    device = register(virtio_device, mediator_get_region_info=mediator_get_region_info)
    with pytest.raises(ContractViolation, match=message) as error:
        device.open()
    assert error.value.rule == "region-info-valid"
    assert "'bad'" in str(error.value)
    assert not device.is_open
    device.registry.unregister("bad")  # the failed open left no use behind


def test_a_mediator_cannot_map_what_the_device_traps(virtio_device: EmulatedPciDevice) -> None:
    def mediator_get_region_info(handle: Any, info: dict[str, Any]) -> Any:
        if info["index"] == 4:  # the MSI-X BAR: nothing is mappable
            return {**info, "flags": info["flags"] | 4}
        return None

    device = register(virtio_device, mediator_get_region_info=mediator_get_region_info)
    with pytest.raises(ContractViolation, match="MMAP"):
        device.open()


def test_wrong_rw_results_are_contract_violations(virtio_device: EmulatedPciDevice) -> None:
    def mediator_rw(handle: Any, index: int, offset: int, count: int, data: Any, is_write: bool):
        if index == 7:
            raise KeyError("oops")
        return 3 if is_write else b"\x00"

    with register(virtio_device, mediator_rw=mediator_rw) as device:
        with pytest.raises(
            ContractViolation, match=r"a read of region 0 at 0x0\+0x4 returned b'\\x00'"
        ) as error:
            device.read(0, 0, 4)
        assert error.value.rule == "rw-result"
        with pytest.raises(ContractViolation, match="returned 3"):
            device.write(0, 0, b"\x00\x00")
        with pytest.raises(ContractViolation, match="KeyError") as raised:
            device.read(7, 0, 4)
        assert raised.value.rule == "access-errors"


def test_oserror_from_a_mediator_passes_through(virtio_device: EmulatedPciDevice) -> None:
    def mediator_rw(handle: Any, index: int, offset: int, count: int, data: Any, is_write: bool):
        raise OSError(errno.EPERM, "read-only register")

    with register(virtio_device, mediator_rw=mediator_rw) as device:
        with pytest.raises(OSError) as error:
            device.write(0, 0, b"\x00")
        assert error.value.errno == errno.EPERM


def test_device_specific_region(virtio_device: EmulatedPciDevice) -> None:
    store = bytearray(0x1000)

    def mediator_device_regions(handle: Any) -> list[dict[str, Any]]:
        return [{"index": 9, "flags": 3, "size": 0x1000, "type": [0x80001AF4, 1]}]

    def mediator_rw(handle: Any, index: int, offset: int, count: int, data: Any, is_write: bool):
        if index != 9:
            return None
        if is_write:
            store[offset : offset + count] = data
            return count
        return bytes(store[offset : offset + count])

    device = register(
        virtio_device, mediator_device_regions=mediator_device_regions, mediator_rw=mediator_rw
    )
    with device:
        assert device.device_info().num_regions == 10
        info = device.region_info(9)
        assert info.type is not None and info.type.type == 0x80001AF4
        device.write(9, 0x10, b"hello")
        assert device.read(9, 0x10, 5) == b"hello" and store[0x10:0x15] == b"hello"


def test_device_regions_must_use_new_indexes(virtio_device: EmulatedPciDevice) -> None:
    def mediator_device_regions(handle: Any) -> list[dict[str, Any]]:
        return [{"index": 7, "flags": 3, "size": 0x1000, "type": [1, 1]}]

    with pytest.raises(ContractViolation, match="not a new index") as error:
        register(virtio_device, mediator_device_regions=mediator_device_regions).open()
    assert error.value.rule == "device-regions-valid"


def test_migration_round_trip_through_arcs(device: MediatedDevice, trapper: Trapper) -> None:
    with device:
        assert device.migration_state is S.RUNNING
        device.set_migration_state(S.PRE_COPY)
        precopy = device.read_migration_data(1 << 20)
        device.set_migration_state(S.STOP_COPY)
        final = device.read_migration_data(1 << 20)
        assert device.read_migration_data(10) == b""
        device.set_migration_state(S.STOP)
        device.set_migration_state(S.RESUMING)
        device.write_migration_data(precopy + final)
        device.set_migration_state(S.RUNNING)
    assert trapper.loaded == [b"state-v1"]
    # without P2P the way skips RUNNING_P2P and PRE_COPY_P2P: one arc each
    assert trapper.released[0]["arcs"] == [
        (S.RUNNING, S.PRE_COPY),
        (S.PRE_COPY, S.STOP_COPY),
        (S.STOP_COPY, S.STOP),
        (S.STOP, S.RESUMING),
        (S.RESUMING, S.STOP),
        (S.STOP, S.RUNNING),
    ]


def test_illegal_transitions_leave_the_state_unchanged(device: MediatedDevice) -> None:
    with device:
        for target in (S.RUNNING_P2P, S.ERROR, 99):
            with pytest.raises(MigrationError) as error:
                device.set_migration_state(target)
            assert error.value.errno == errno.EINVAL
            assert device.migration_state is S.RUNNING
        device.set_migration_state(S.STOP)
        device.set_migration_state(S.STOP_COPY)
        with pytest.raises(MigrationError, match="STOP_COPY -> PRE_COPY is not permitted"):
            device.set_migration_state(S.PRE_COPY)
        assert device.migration_state is S.STOP_COPY


def test_refused_stream_puts_the_device_in_error_until_reset(device: MediatedDevice) -> None:
    with device:
        device.set_migration_state(S.STOP)
        device.set_migration_state(S.RESUMING)
        device.write_migration_data(b"\x05\x00\x00\x00\x00\x00\x00\x00other")
        with pytest.raises(MigrationError, match="not a Trapper state"):
            device.set_migration_state(S.STOP)
        assert device.migration_state is S.ERROR
        with pytest.raises(MigrationError):
            device.set_migration_state(S.RUNNING)
        device.reset()
        assert device.migration_state is S.RUNNING


def test_no_migration_without_a_migrating_mediator(virtio_device: EmulatedPciDevice) -> None:
    with MediatedDevice(virtio_device, MediatorRegistry()) as device:
        assert device.migration_flags == 0
        with pytest.raises(MigrationError) as error:
            device.set_migration_state(S.STOP)
        assert error.value.errno == errno.ENOTTY
        with pytest.raises(AccessError) as logging_error:
            device.dma_logging_start(4096, [(0, 0x1000)])
        assert logging_error.value.errno == errno.ENOTTY


def test_dirty_logging_through_the_hooks(virtio_device: EmulatedPciDevice) -> None:
    events: list[str] = []

    def mediator_dma_logging_start(handle: Any, log: Any) -> None:
        events.append("start")
        log.mark(0x3000, 1)

    def mediator_dma_logging_report(handle: Any, log: Any, iova: int, length: int) -> None:
        events.append("report")
        log.mark(0x5000, 0x2000)

    def mediator_dma_logging_stop(handle: Any) -> None:
        events.append("stop")

    device = register(
        virtio_device,
        mediator_dma_logging_start=mediator_dma_logging_start,
        mediator_dma_logging_report=mediator_dma_logging_report,
        mediator_dma_logging_stop=mediator_dma_logging_stop,
    )
    with device:
        device.dma_logging_start(4096, [(0, 0x10000)])
        with pytest.raises(AccessError) as busy:
            device.dma_logging_start(4096, [(0, 0x10000)])
        assert busy.value.errno == errno.EBUSY
        bitmap = int.from_bytes(device.dma_logging_report(0, 0x10000, 4096), "little")
        assert bitmap == (1 << 3) | (1 << 5) | (1 << 6)
        device.dma_logging_stop()
        assert events == ["start", "report", "stop"]
        device.dma_logging_start(4096, [(0, 0x10000)])
    assert events[-1] == "stop"  # the last close stops logging


def test_accesses_the_flags_forbid_are_refused(virtio_device: EmulatedPciDevice) -> None:
    def mediator_get_region_info(handle: Any, info: dict[str, Any]) -> Any:
        if info["index"] == 0:
            return {**info, "flags": int(RegionFlag.READ)}  # BAR0 becomes read-only
        return None

    with register(virtio_device, mediator_get_region_info=mediator_get_region_info) as device:
        assert device.read(0, 0, 4) == bytes(4)
        with pytest.raises(AccessError, match="does not allow write") as error:
            device.write(0, 0, b"\x01")
        assert error.value.errno == errno.EINVAL
        assert virtio_device.read(0, 0, 1) == b"\x00"


def test_oserror_without_errno_is_a_contract_violation(virtio_device: EmulatedPciDevice) -> None:
    def mediator_rw(handle: Any, index: int, offset: int, count: int, data: Any, is_write: bool):
        raise OSError("no errno here")

    with register(virtio_device, mediator_rw=mediator_rw) as device:
        with pytest.raises(ContractViolation, match="without an errno") as error:
            device.read(0, 0, 4)
        assert error.value.rule == "access-errors"


def test_a_mediator_cannot_claim_msix_mappable(virtio_device: EmulatedPciDevice) -> None:
    def mediator_get_region_info(handle: Any, info: dict[str, Any]) -> Any:
        return {**info, "msix_mappable": True} if info["index"] == 4 else None

    with pytest.raises(ContractViolation, match="MSIX_MAPPABLE"):
        register(virtio_device, mediator_get_region_info=mediator_get_region_info).open()


@pytest.mark.parametrize(
    ("hooks", "rule"),
    [
        (
            {"mediator_regions": lambda handle: (_ for _ in ()).throw(RuntimeError("x"))},
            "regions-result",
        ),
        ({"mediator_device_regions": lambda handle: 5}, "device-regions-valid"),
    ],
)
def test_broken_open_time_hooks_name_the_rule(
    virtio_device: EmulatedPciDevice, hooks: dict[str, Any], rule: str
) -> None:
    def mediator_rw(handle: Any, index: int, offset: int, count: int, data: Any, is_write: bool):
        return None

    device = register(virtio_device, mediator_rw=mediator_rw, **hooks)
    with pytest.raises(ContractViolation) as error:
        device.open()
    assert error.value.rule == rule and "'bad'" in str(error.value)


def test_a_read_returning_a_number_is_a_contract_violation(
    virtio_device: EmulatedPciDevice,
) -> None:
    def mediator_rw(handle: Any, index: int, offset: int, count: int, data: Any, is_write: bool):
        return 4

    with register(virtio_device, mediator_rw=mediator_rw) as device:
        with pytest.raises(ContractViolation) as error:
            device.read(0, 0, 4)
        assert error.value.rule == "rw-result"


def test_flags_changed_after_open_take_effect(virtio_device: EmulatedPciDevice) -> None:
    read_only = [False]

    def mediator_get_region_info(handle: Any, info: dict[str, Any]) -> Any:
        if info["index"] == 0 and read_only[0]:
            return {**info, "flags": int(RegionFlag.READ)}
        return None

    with register(virtio_device, mediator_get_region_info=mediator_get_region_info) as device:
        device.write(0, 0, b"\x01")
        read_only[0] = True
        device.region_info(0)
        with pytest.raises(AccessError, match="does not allow write"):
            device.write(0, 0, b"\x02")
        assert device.read(0, 0, 1) == b"\x01"


def test_an_observed_vector_of_an_emulated_device_goes_through_the_mediator(
    virtio_device: EmulatedPciDevice,
) -> None:
    """Interrupt routing is the same contract on every backend: an observed vector reaches
    ``mediator_irq`` first, on the device's relay thread (never inside the device's lock, which
    a model raising from a register write holds), which may swallow it; the others go straight
    to the client's trigger. The relay thread ends with the last close."""
    registry = MediatorRegistry()
    observer = IrqObserver()
    registry.register(observer, "observer")
    device = MediatedDevice(virtio_device, registry)
    fired: list[int] = []

    def wait_for(condition: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 10
        while not condition() and time.monotonic() < deadline:
            time.sleep(0.01)

    with device:
        device.set_irq_triggers(
            IrqIndex.MSIX, 0, [lambda: fired.append(0), lambda: fired.append(1)]
        )
        with virtio_device._lock:  # as a model's register write raising interrupts holds it
            virtio_device.raise_msix(1)
            virtio_device.raise_msix(1)
            virtio_device.raise_msix(0)
            wait_for(lambda: len(observer.seen) == 2)  # relayed while the lock is held
        wait_for(lambda: len(fired) == 2)
    assert [seen[:2] for seen in observer.seen] == [(IrqIndex.MSIX, 1)] * 2
    assert {seen[2] for seen in observer.seen} == {f"{virtio_device.name}-irq-relay"}
    assert sorted(fired) == [0, 1]  # the first interrupt of vector 1 swallowed
    assert not [t for t in threading.enumerate() if t.name.endswith("-irq-relay")]
