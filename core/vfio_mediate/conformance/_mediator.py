"""The mediator under test: found by its entry-point name, registered alone, its calls recorded."""

from __future__ import annotations

import difflib
import functools
import inspect
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, final

import pluggy

from .. import hookspecs
from .._entry_points import MEDIATOR_GROUP, PluginRecord, Priority, load_entry_point
from .._errors import ContractViolation, PluginLoadError
from .._registry import MediatorRegistry
from .._rules import Rule

__all__ = [
    "HookCall",
    "HookRecorder",
    "Implementation",
    "MediatorUnderTest",
    "installed_mediators",
]


def installed_mediators() -> dict[str, list[metadata.EntryPoint]]:
    """Every entry point of ``vfio_mediate.mediators`` by name (read from metadata, not imported).

    Unlike the registry, this ignores ``VFIO_MEDIATE_ONLY``/``VFIO_MEDIATE_DISABLE``: a mediator
    is checked because it was named, whatever the environment selects for serving devices.
    """
    found: dict[str, list[metadata.EntryPoint]] = {}
    for ep in metadata.entry_points(group=MEDIATOR_GROUP):
        found.setdefault(ep.name, []).append(ep)
    return found


@dataclass(frozen=True)
class Implementation:
    """One hook implementation of a plugin: the hook, the function and its pluggy options."""

    hook: str
    function: Callable[..., Any]
    options: dict[str, Any]


def implementations_of(plugin: Any) -> tuple[Implementation, ...]:
    """The plugin's implementations of contract hooks, as pluggy finds them."""
    manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    manager.add_hookspecs(hookspecs)
    manager.register(plugin)
    return tuple(
        Implementation(caller.name, impl.function, dict(impl.opts))
        for caller in manager.get_hookcallers(plugin) or ()
        if caller.spec is not None  # other hooks: registering the plugin refused them
        for impl in caller.get_hookimpls()
        if impl.plugin is plugin
    )


@dataclass(frozen=True)
class HookCall:
    """One call of a mediator's hook: its arguments and what it returned or raised."""

    hook: str
    args: dict[str, Any]
    """The arguments by the names the implementation declares (it may declare fewer)."""
    result: Any = None
    error: BaseException | None = None


@final
class HookRecorder:
    """Records every call of a mediator's hooks.

    ``proxy(implementations)`` is a plugin with the same hook implementations (same priority,
    same arguments), each wrapped to append a ``HookCall``. The suite registers the proxy in
    place of the plugin, so the real core (registry, ``MediatedDevice``) drives the real hooks
    and the suite sees what was called, with what, and in which order.

    ``mediator_rw`` runs for every access the suite makes, tens of thousands per test: a call
    of it is recorded only when it fails or gets another handle than the call before it.
    """

    def __init__(self) -> None:
        self.calls: list[HookCall] = []

    def of(self, hook: str, since: int = 0) -> list[HookCall]:
        """The calls of ``hook``, from call number ``since`` on."""
        return [call for call in self.calls[since:] if call.hook == hook]

    def proxy(self, name: str, implementations: Sequence[Implementation]) -> types.ModuleType:
        """A plugin whose implementations record their calls, then run the given ones."""
        proxy = types.ModuleType(f"recorded-{name}")
        for number, impl in enumerate(implementations):
            function = impl.function
            if not (impl.options.get("wrapper") or impl.options.get("hookwrapper")):
                function = self._recording(impl.hook, function)
            marked = hookspecs.hookimpl(**{**impl.options, "specname": impl.hook})(function)
            setattr(proxy, f"{impl.hook}_{number}", marked)
        return proxy

    def _recording(self, hook: str, function: Callable[..., Any]) -> Callable[..., Any]:
        calls = self.calls
        names = tuple(inspect.signature(function).parameters)
        if hook == "mediator_rw":
            return self._recording_changes(hook, function, names)

        # functools.wraps sets __wrapped__: pluggy reads the implementation's argument names
        # through it, so the proxy is called with exactly the arguments the plugin declares.
        @functools.wraps(function)
        def recorded(*args: Any) -> Any:
            try:
                result = function(*args)
            except BaseException as exc:
                calls.append(HookCall(hook, dict(zip(names, args, strict=False)), error=exc))
                raise
            calls.append(HookCall(hook, dict(zip(names, args, strict=False)), result))
            return result

        return recorded

    def _recording_changes(
        self, hook: str, function: Callable[..., Any], names: tuple[str, ...]
    ) -> Callable[..., Any]:
        calls = self.calls
        last: list[Any] = [object()]

        @functools.wraps(function)
        def recorded(*args: Any) -> Any:
            try:
                result = function(*args)
            except BaseException as exc:
                calls.append(HookCall(hook, dict(zip(names, args, strict=False)), error=exc))
                raise
            if args and args[0] is not last[0]:
                last[0] = args[0]
                calls.append(HookCall(hook, dict(zip(names, args, strict=False)), result))
            return result

        return recorded


@final
@dataclass
class MediatorUnderTest:
    """An installed mediator, loaded from its entry point ``name`` for the suite."""

    name: str
    distribution: str | None
    version: str | None
    plugin: Any
    priority: Priority
    implementations: tuple[Implementation, ...]
    modules: frozenset[str] = field(default_factory=frozenset)
    """Top-level module names of the plugin's code (for the ``no-core-import`` check)."""

    @classmethod
    def load(cls, name: str) -> MediatorUnderTest:
        """Import the entry point ``name`` and check that it registers as a mediator.

        Raises ``LookupError`` when no or several distributions define it, ``PluginLoadError``
        when it cannot be imported and ``ContractViolation`` (``hook-signature``) when its hooks
        do not fit the contract.
        """
        found = installed_mediators().get(name, [])
        if len(found) != 1:
            where = ", ".join(sorted(ep.dist.name if ep.dist else "?" for ep in found))
            raise LookupError(
                f"mediator {name!r} is defined by {len(found)} installed distributions"
                + (f" ({where})" if where else "")
            )
        (ep,) = found
        record, plugin = load_entry_point(ep, MEDIATOR_GROUP)
        if plugin is None:
            raise PluginLoadError(record.describe(), str(record.error))
        unknown = _unknown_hooks(plugin)
        if unknown:
            raise ContractViolation(record.describe(), Rule.HOOK_SIGNATURE.value, unknown)
        try:
            registered = MediatorRegistry().register(
                plugin, name, distribution=record.distribution, version=record.version
            )
        except PluginLoadError as exc:
            raise ContractViolation(
                record.describe(), Rule.HOOK_SIGNATURE.value, str(exc.__cause__ or exc)
            ) from exc
        assert registered.priority is not None
        return cls(
            name,
            record.distribution,
            record.version,
            plugin,
            registered.priority,
            implementations_of(plugin),
            _modules_of(ep, plugin),
        )

    def describe(self) -> str:
        """``'name' (distribution version)``, as the core names plugins."""
        return PluginRecord(self.name, MEDIATOR_GROUP, self.distribution, self.version).describe()

    def registry(self, recorder: HookRecorder | None = None) -> MediatorRegistry:
        """A registry with this mediator alone, recorded by ``recorder`` when given."""
        registry = MediatorRegistry()
        plugin = self.plugin
        if recorder is not None:
            plugin = recorder.proxy(self.name, self.implementations)
        registry.register(plugin, self.name, distribution=self.distribution, version=self.version)
        return registry

    def hook(self, name: str) -> Callable[..., Any] | None:
        """The plugin's implementation of hook ``name`` (called directly), or ``None``."""
        for impl in self.implementations:
            if impl.hook == name:
                return impl.function
        return None


def _unknown_hooks(plugin: Any) -> str:
    """What is wrong with the plugin's hook implementations that name no hook of the contract
    (each with the hook it may mean), or ``""``."""
    manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    known = [name for name in dir(hookspecs) if name.startswith("mediator_")]
    wrong = []
    for attribute in dir(plugin):
        options = manager.parse_hookimpl_opts(plugin, attribute)
        if options is None:
            continue
        hook = options.get("specname") or attribute
        if hook not in known:
            close = difflib.get_close_matches(hook, known, n=1)
            wrong.append(hook + (f" (did you mean {close[0]}?)" if close else ""))
    if not wrong:
        return ""
    return f"{', '.join(wrong)}: not a hook of the vfio_mediate contract"


def _modules_of(ep: metadata.EntryPoint, plugin: Any) -> frozenset[str]:
    """The plugin's own top-level modules: its distribution's and the entry point's."""
    names = {ep.module.partition(".")[0]}
    owner = plugin.__name__ if isinstance(plugin, types.ModuleType) else type(plugin).__module__
    names.add(owner.partition(".")[0])
    for path in (ep.dist.files or []) if ep.dist else []:
        if path.suffix != ".py" or not path.parts:
            continue
        top = path.stem if len(path.parts) == 1 else path.parts[0]
        if top.isidentifier():  # leaves out *.dist-info, *.data and paths like ../../bin
            names.add(top)
    return frozenset(names)
