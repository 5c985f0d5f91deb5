"""Discovery, order, isolation, duplicates and lifetime of mediators."""

from __future__ import annotations

import logging
import sys
import types
from typing import Any

import pluggy
import pytest

from vfio_mediate import (
    DuplicateMediatorError,
    EmulatedPciDevice,
    MediatedDevice,
    MediatorInUseError,
    MediatorRegistry,
    PluginLoadError,
    RegistryError,
)
from vfio_mediate._entry_points import Priority

hookimpl = pluggy.HookimplMarker("vfio_mediate")


def test_installed_null_mediator_is_discovered() -> None:
    registry = MediatorRegistry.from_entry_points()
    null = registry.get("null")
    assert null.distribution == "null-mediator"
    assert null.priority is Priority.LAST
    assert null.status == "loaded"


def test_third_party_distribution_wins_by_priority(
    with_test_plugins: object, virtio_device: EmulatedPciDevice
) -> None:
    registry = MediatorRegistry.from_entry_points()
    order = [record.name for record in registry.mediators]
    # tryfirst first, then default priority by name, then trylast
    assert order.index("vendor-first") < order.index("aaa-default") < order.index("null")
    with MediatedDevice(virtio_device, registry) as device:
        assert device.mediator is not None
        assert device.mediator.name == "vendor-first"
        assert device.mediator.distribution == "vendor-first"
        assert device.read(0, 0, 4) == b"\xee" * 4


def test_a_falsy_handle_is_a_claim(
    with_test_plugins: object, virtio_device: EmulatedPciDevice, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VFIO_MEDIATE_DISABLE", "vendor-first,raising-open")
    registry = MediatorRegistry.from_entry_points()
    with MediatedDevice(virtio_device, registry) as device:
        assert device.mediator is not None and device.mediator.name == "aaa-default"


def test_broken_plugins_are_reported_and_the_others_work(
    with_test_plugins: object,
    virtio_device: EmulatedPciDevice,
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = MediatorRegistry.from_entry_points()
    failures = {record.name: record for record in registry.failures}
    assert set(failures) == {"broken-import", "broken-signature", "hook-typo"}
    assert "mediator_get_region_inof is not a hook" in (failures["hook-typo"].error or "")
    assert "ModuleNotFoundError" in (failures["broken-import"].error or "")
    assert failures["broken-import"].distribution == "broken-import"
    assert failures["broken-import"].version == "0.0.1"
    signature = failures["broken-signature"].error or ""
    assert "'broken-signature' (broken-signature 0.0.2)" in signature
    assert "hook-signature" in signature and "region" in signature
    # the half-registered plugin left nothing behind
    assert "broken-signature" not in [r.name for r in registry.mediators]
    # raising-open is asked (tryfirst), raises, is reported, and the search goes on
    with caplog.at_level(logging.ERROR), MediatedDevice(virtio_device, registry) as device:
        assert device.mediator is not None and device.mediator.name == "vendor-first"
    assert "'raising-open' (raising-open 0.0.3) raised in mediator_open" in caplog.text
    assert "firmware handshake failed" in caplog.text


BROKEN = "broken-import,broken-signature,hook-typo"


def test_require_loaded_names_each_failed_mediator_and_how_to_go_on_without_it(
    with_test_plugins: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = MediatorRegistry.from_entry_points()
    with pytest.raises(PluginLoadError) as refused:
        registry.require_loaded()
    message = str(refused.value)
    assert "\n" not in message
    for described in (
        "'broken-import' (broken-import 0.0.1)",
        "'broken-signature' (broken-signature 0.0.2)",
        "'hook-typo' (hook-typo 0.0.4)",
    ):
        assert described in refused.value.plugin
    assert "No module named 'a_module_that_does_not_exist'" in message
    assert "mediator_get_region_inof is not a hook" in message
    assert "served unmediated" in message
    assert message.endswith(f"VFIO_MEDIATE_DISABLE={BROKEN}")
    monkeypatch.setenv("VFIO_MEDIATE_DISABLE", BROKEN)
    MediatorRegistry.from_entry_points().require_loaded()
    MediatorRegistry().require_loaded()  # nothing from entry points: nothing failed


def test_disable_keeps_a_plugin_from_being_imported(
    with_test_plugins: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VFIO_MEDIATE_DISABLE", "broken-import, vendor-first")
    monkeypatch.delitem(sys.modules, "vendor_first", raising=False)
    registry = MediatorRegistry.from_entry_points()
    names = {r.name for r in (*registry.mediators, *registry.failures)}
    assert "broken-import" not in names and "vendor-first" not in names
    assert "vendor_first" not in sys.modules


def test_only_loads_just_the_named_plugins(
    with_test_plugins: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VFIO_MEDIATE_ONLY", "aaa-default,null")
    registry = MediatorRegistry.from_entry_points()
    assert [r.name for r in registry.mediators] == ["aaa-default", "null"]
    assert registry.failures == ()


def make_mediator(name: str, **options: Any) -> types.SimpleNamespace:
    @hookimpl(**options)
    def mediator_open(device: Any) -> object:
        return object()

    return types.SimpleNamespace(mediator_open=mediator_open, __name__=name)


def test_duplicates_are_refused() -> None:
    registry = MediatorRegistry()
    plugin = make_mediator("a")
    registry.register(plugin, "a")
    with pytest.raises(DuplicateMediatorError, match="named 'a'"):
        registry.register(make_mediator("a"), "a")
    with pytest.raises(DuplicateMediatorError, match="already registered as 'a'"):
        registry.register(plugin, "b")


def test_registration_of_a_non_mediator_is_refused_and_rolled_back() -> None:
    registry = MediatorRegistry()

    @hookimpl
    def mediator_release(handle: Any) -> None: ...

    @hookimpl
    def mediator_frobnicate(handle: Any) -> None: ...

    no_open = types.SimpleNamespace(mediator_release=mediator_release)
    with pytest.raises(PluginLoadError, match="must implement mediator_open"):
        registry.register(no_open, "no-open")
    unknown = types.SimpleNamespace(
        mediator_open=make_mediator("x").mediator_open, mediator_frobnicate=mediator_frobnicate
    )
    with pytest.raises(PluginLoadError, match="mediator_frobnicate is not a hook"):
        registry.register(unknown, "unknown")
    assert registry.mediators == ()
    # both names are free again
    registry.register(make_mediator("no-open"), "no-open")
    registry.register(make_mediator("unknown"), "unknown")


def test_order_is_priority_then_name_not_registration_order() -> None:
    registry = MediatorRegistry()
    registry.register(make_mediator("z", trylast=True), "z")
    registry.register(make_mediator("m"), "m")
    registry.register(make_mediator("b"), "b")
    registry.register(make_mediator("y", tryfirst=True), "y")
    assert [r.name for r in registry.mediators] == ["y", "b", "m", "z"]


def test_a_mediator_in_use_cannot_be_unregistered(virtio_device: EmulatedPciDevice) -> None:
    registry = MediatorRegistry()
    registry.register(make_mediator("vendor"), "vendor")
    device = MediatedDevice(virtio_device, registry)
    device.open()
    with pytest.raises(MediatorInUseError, match=r"in use by open device.*testdev"):
        registry.unregister("vendor")
    device.open()
    device.close()
    with pytest.raises(MediatorInUseError):
        registry.unregister("vendor")
    device.close()
    registry.unregister("vendor")
    with pytest.raises(RegistryError, match="no mediator named"):
        registry.unregister("vendor")


def test_hook_wrappers_and_double_implementations_are_refused() -> None:
    registry = MediatorRegistry()

    @hookimpl(wrapper=True)
    def mediator_open(device: Any) -> Any:
        return (yield)

    with pytest.raises(PluginLoadError, match="mediator_open is a hook wrapper"):
        registry.register(types.SimpleNamespace(mediator_open=mediator_open), "wrapper")

    @hookimpl(specname="mediator_open")
    def another_open(device: Any) -> object:
        return object()

    twice = types.SimpleNamespace(
        mediator_open=make_mediator("x").mediator_open, other=another_open
    )
    with pytest.raises(PluginLoadError, match="implemented 2 times"):
        registry.register(twice, "twice")
    assert registry.mediators == ()


def test_a_mediator_unregistered_while_it_opens_does_not_win(
    virtio_device: EmulatedPciDevice,
) -> None:
    registry = MediatorRegistry()
    released: list[object] = []
    handle = object()

    @hookimpl(tryfirst=True)
    def mediator_open(device: Any) -> object:
        registry.unregister("leaving")  # as another thread would, between ask and claim
        return handle

    @hookimpl
    def mediator_release(handle: Any) -> None:
        released.append(handle)

    leaving = types.SimpleNamespace(mediator_open=mediator_open, mediator_release=mediator_release)
    registry.register(leaving, "leaving")
    registry.register(make_mediator("staying"), "staying")
    with MediatedDevice(virtio_device, registry) as device:
        assert device.mediator is not None and device.mediator.name == "staying"
    assert released == [handle]
