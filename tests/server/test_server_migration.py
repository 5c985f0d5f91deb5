"""Migration v2 and DMA dirty logging over the socket (DEVICE_FEATURE, MIG_DATA_READ/WRITE)."""

from __future__ import annotations

import errno
import struct
from collections.abc import Callable

import pytest
from server_testlib import (
    CMD_FILL,
    PAGE,
    REG_DONE,
    REG_DOORBELL,
    REG_SRC,
    TRAPPED_BY_MEDIATOR,
    TrapMediator,
)

from vfio_mediate import AccessError, MediatedDevice
from vfio_mediate.server import DeviceEndpoint, VfioUserClient
from vfio_mediate.uapi import DeviceFeature, FeatureFlag, MigrationFlag, MigrationState

IOVA = 0x4000_0000
GET, SET, PROBE = FeatureFlag.GET, FeatureFlag.SET, FeatureFlag.PROBE


def refused(call: Callable[[], object]) -> int:
    with pytest.raises(AccessError) as failure:
        call()
    return failure.value.errno or 0


def test_migration_round_trip_between_two_served_devices(
    make_test_device: Callable[[str], MediatedDevice],
    serve: Callable[[MediatedDevice], DeviceEndpoint],
    connect: Callable[..., VfioUserClient],
    mediator: TrapMediator,
) -> None:
    source = connect(serve(make_test_device("svtest-source")))
    target = connect(serve(make_test_device("svtest-target")))
    registers = struct.pack("<QQI", 0x1234_5678_9ABC, 0xFEDC_BA98, 77)
    source.write(0, REG_SRC, registers)
    source.write(0, TRAPPED_BY_MEDIATOR * PAGE, b"trapped state")
    assert source.migration_flags == MigrationFlag.STOP_COPY | MigrationFlag.PRE_COPY
    assert source.migration_state is MigrationState.RUNNING

    source.set_migration_state(MigrationState.PRE_COPY)
    assert source.migration_pending > 0
    precopy = source.read_all_migration_data(chunk=16)
    assert source.migration_pending == 0
    source.write(0, REG_DONE, struct.pack("<I", 5))  # the device runs on during pre-copy
    source.set_migration_state(MigrationState.STOP_COPY)
    final = source.read_all_migration_data()
    assert source.migration_state is MigrationState.STOP_COPY

    target.set_migration_state(MigrationState.RESUMING)
    target.write_migration_data(precopy + final, chunk=10)
    target.set_migration_state(MigrationState.RUNNING)
    assert target.migration_state is MigrationState.RUNNING
    assert target.read(0, REG_SRC, len(registers)) == registers
    assert target.read(0, REG_DONE, 4) == struct.pack("<I", 5)
    assert target.read(0, TRAPPED_BY_MEDIATOR * PAGE, 13) == b"trapped state"
    source_handle, target_handle = mediator.handles
    assert target_handle.loaded is not None
    assert target_handle.counter == source_handle.counter == 3
    source.set_migration_state(MigrationState.STOP)
    assert source.migration_state is MigrationState.STOP


def test_migration_errors_go_on_the_wire(
    test_endpoint: DeviceEndpoint, connect: Callable[..., VfioUserClient]
) -> None:
    client = connect(test_endpoint)
    assert refused(lambda: client.set_migration_state(99)) == errno.EINVAL
    assert refused(lambda: client.read_migration_data(16)) == errno.EINVAL
    assert refused(lambda: client.write_migration_data(b"x")) == errno.EINVAL
    client.set_migration_state(MigrationState.RESUMING)
    client.write_migration_data(struct.pack("<Q", 3) + b"bad")
    assert refused(lambda: client.set_migration_state(MigrationState.STOP)) == errno.EINVAL
    assert client.migration_state is MigrationState.ERROR
    client.reset()
    assert client.migration_state is MigrationState.RUNNING


def test_feature_operations_follow_linux(
    test_endpoint: DeviceEndpoint, connect: Callable[..., VfioUserClient]
) -> None:
    client = connect(test_endpoint)
    assert client.probe_feature(DeviceFeature.MIG_DEVICE_STATE, GET | SET)
    assert client.probe_feature(DeviceFeature.DMA_LOGGING_START, SET)
    assert not client.probe_feature(DeviceFeature.DMA_LOGGING_START, GET)
    assert not client.probe_feature(DeviceFeature.LOW_POWER_ENTRY)
    assert refused(lambda: client.feature(DeviceFeature.PCI_VF_TOKEN | SET)) == errno.ENOTTY
    assert refused(lambda: client.feature(0x1234 | GET)) == errno.ENOTTY
    assert refused(lambda: client.feature(DeviceFeature.MIGRATION | SET)) == errno.EINVAL
    assert refused(lambda: client.feature(DeviceFeature.MIGRATION | GET | SET)) == errno.EINVAL
    assert refused(lambda: client.feature(DeviceFeature.MIGRATION)) == errno.EINVAL
    assert refused(lambda: client.feature(DeviceFeature.MIGRATION | GET, argsz=12)) == errno.EINVAL
    assert refused(lambda: client.feature(DeviceFeature.MIGRATION | 1 << 20)) == errno.EINVAL


def test_a_device_without_migration_answers_enotty(
    i40e: MediatedDevice,
    serve: Callable[[MediatedDevice], DeviceEndpoint],
    connect: Callable[..., VfioUserClient],
) -> None:
    client = connect(serve(i40e))
    assert client.migration_flags == 0
    assert refused(lambda: client.feature(DeviceFeature.MIGRATION | GET)) == errno.ENOTTY
    assert not client.probe_feature(DeviceFeature.MIGRATION, GET)
    assert refused(lambda: client.dma_logging_start(PAGE, [(IOVA, PAGE)])) == errno.ENOTTY


def fill(client: VfioUserClient, value: int, iova: int, length: int) -> None:
    client.write(0, REG_SRC, struct.pack("<QQI", value, iova, length))
    client.write(0, REG_DOORBELL, struct.pack("<I", CMD_FILL))


def dirty_pages(bitmap: bytes) -> list[int]:
    value = int.from_bytes(bitmap, "little")
    return [page for page in range(len(bitmap) * 8) if value >> page & 1]


def test_dirty_logging_start_report_stop(
    test_endpoint: DeviceEndpoint, connect: Callable[..., VfioUserClient]
) -> None:
    client = connect(test_endpoint)
    memory = client.dma_map_memfd(IOVA, 16 * PAGE)
    try:
        assert client.dma_logging_start(PAGE, [(IOVA, 16 * PAGE)]) == PAGE
        fill(client, 0xEE, IOVA + 3 * PAGE + 100, PAGE)  # pages 3 and 4
        fill(client, 0xEE, IOVA + 15 * PAGE, 8)
        bitmap = client.dma_logging_report(IOVA, 16 * PAGE, PAGE)
        assert len(bitmap) == 8 and dirty_pages(bitmap) == [3, 4, 15]
        assert dirty_pages(client.dma_logging_report(IOVA, 16 * PAGE, PAGE)) == []
        fill(client, 0xEE, IOVA, 1)
        assert dirty_pages(client.dma_logging_report(IOVA + 8 * PAGE, 8 * PAGE, PAGE)) == []
        assert dirty_pages(client.dma_logging_report(IOVA, 8 * PAGE, PAGE)) == [0]
        client.dma_logging_stop()
        report = lambda: client.dma_logging_report(IOVA, 16 * PAGE, PAGE)  # noqa: E731
        assert refused(report) == errno.EINVAL
        assert refused(client.dma_logging_stop) == errno.EINVAL
    finally:
        memory.close()


def test_dirty_logging_of_every_mapping_with_a_page_size_hint(
    test_endpoint: DeviceEndpoint, connect: Callable[..., VfioUserClient]
) -> None:
    client = connect(test_endpoint)
    first = client.dma_map_memfd(IOVA, 4 * PAGE)
    second = client.dma_map_memfd(IOVA + 64 * PAGE, 4 * PAGE)
    try:
        assert client.dma_logging_start(512, []) == PAGE, "the device picks its page size"
        fill(client, 1, IOVA + 64 * PAGE + 2 * PAGE, 10)
        assert dirty_pages(client.dma_logging_report(IOVA + 64 * PAGE, 4 * PAGE, PAGE)) == [2]
        assert dirty_pages(client.dma_logging_report(IOVA, 4 * PAGE, PAGE)) == []
        not_logged = lambda: client.dma_logging_report(IOVA, 8 * PAGE, PAGE)  # noqa: E731
        assert refused(not_logged) == errno.EINVAL
        huge = lambda: client.dma_logging_report(IOVA, 1 << 40, PAGE)  # noqa: E731
        assert refused(huge) == errno.E2BIG
        client.dma_logging_stop()
    finally:
        first.close()
        second.close()
