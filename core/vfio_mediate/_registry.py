"""The mediator registry: deterministic first-match order, isolation, use counts.

Discovery (the entry-point groups, the environment's filter) is ``_entry_points``'.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from typing import Any, NamedTuple, final

import pluggy

from . import hookspecs
from ._entry_points import (
    ENV_DISABLE,
    MEDIATOR_GROUP,
    PluginRecord,
    Priority,
    entry_points,
    load_entry_point,
)
from ._errors import (
    DuplicateMediatorError,
    MediatorInUseError,
    PluginLoadError,
    RegistryError,
)
from ._rules import Rule

__all__ = ["Claim", "MediatorRegistry"]

logger = logging.getLogger(__name__)


class Claim(NamedTuple):
    """The winner of a first-match search and the handle it returned."""

    record: PluginRecord
    handle: Any


@final
class MediatorRegistry:
    """The registered mediators, asked in a deterministic order at each device's first open.

    Order: ``Priority`` (``tryfirst``, none, ``trylast`` on ``mediator_open``), then name.
    """

    def __init__(self) -> None:
        self._pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self._pm.add_hookspecs(hookspecs)
        self._lock = threading.RLock()
        self._records: dict[str, PluginRecord] = {}
        self._failures: list[PluginRecord] = []

    @classmethod
    def from_entry_points(cls, group: str = MEDIATOR_GROUP) -> MediatorRegistry:
        """A registry with every installed mediator the environment allows."""
        registry = cls()
        registry.load_entry_points(group)
        return registry

    def load_entry_points(self, group: str = MEDIATOR_GROUP) -> list[PluginRecord]:
        """Import and register the group's entry points; failures are kept, not raised."""
        records = []
        for ep in entry_points(group):
            record, plugin = load_entry_point(ep, group)
            if plugin is not None:
                try:
                    record = self.register(
                        plugin, ep.name, distribution=record.distribution, version=record.version
                    )
                except (PluginLoadError, DuplicateMediatorError) as exc:
                    record.error = str(exc)
                    logger.warning("mediator %s not registered: %s", record.describe(), exc)
            if record.error is not None:
                with self._lock:
                    self._failures.append(record)
            records.append(record)
        return records

    def register(
        self,
        plugin: Any,
        name: str,
        *,
        distribution: str | None = None,
        version: str | None = None,
    ) -> PluginRecord:
        """Register ``plugin`` (a module or object with hook implementations) as ``name``.

        Raises ``DuplicateMediatorError`` for a name or object already registered and
        ``PluginLoadError`` when its hooks do not fit the contract; a failed registration leaves
        nothing behind.
        """
        record = PluginRecord(name, MEDIATOR_GROUP, distribution, version, plugin)
        with self._lock:
            if name in self._records:
                raise DuplicateMediatorError(f"a mediator named {name!r} is already registered")
            for other in self._records.values():
                if other.plugin is plugin:
                    raise DuplicateMediatorError(
                        f"{record.describe()}: this object is already registered as {other.name!r}"
                    )
            try:
                self._pm.register(plugin, name)
            except Exception as exc:  # pluggy raises ValueError or PluginValidationError
                self._rollback(plugin, name)
                raise PluginLoadError(
                    record.describe(), f"rule {Rule.HOOK_SIGNATURE.value!r}: {exc}"
                ) from exc
            try:
                record.priority = self._validate(plugin)
            except ValueError as exc:
                self._rollback(plugin, name)
                raise PluginLoadError(
                    record.describe(), f"rule {Rule.HOOK_SIGNATURE.value!r}: {exc}"
                ) from exc
            self._records[name] = record
        logger.debug("registered mediator %s at priority %s", record.describe(), record.priority)
        return record

    def _rollback(self, plugin: Any, name: str) -> None:
        # pluggy keeps what it registered before a failing hook: take it all out again.
        if self._pm.is_registered(plugin) or self._pm.has_plugin(name):
            self._pm.unregister(
                plugin=plugin if self._pm.is_registered(plugin) else None, name=name
            )

    def _validate(self, plugin: Any) -> Priority:
        """The plugin's priority; ``ValueError`` when its hooks do not make a mediator."""
        callers = self._pm.get_hookcallers(plugin) or []
        unknown = sorted(caller.name for caller in callers if caller.spec is None)
        if unknown:
            raise ValueError(f"{', '.join(unknown)} is not a hook of the vfio_mediate contract")
        for caller in callers:
            impls = [i for i in caller.get_hookimpls() if i.plugin is plugin]
            # The core calls the one implementation directly: a wrapper's generator or a second
            # implementation would never be run the pluggy way.
            if len(impls) > 1:
                raise ValueError(f"{caller.name} is implemented {len(impls)} times")
            if impls[0].wrapper or impls[0].hookwrapper:
                raise ValueError(f"{caller.name} is a hook wrapper; mediators implement hooks")
        opens = [i for i in self._pm.hook.mediator_open.get_hookimpls() if i.plugin is plugin]
        if not opens:
            raise ValueError("a mediator must implement mediator_open")
        if opens[0].tryfirst:
            return Priority.FIRST
        return Priority.LAST if opens[0].trylast else Priority.DEFAULT

    def unregister(self, name: str) -> PluginRecord:
        """Remove the mediator ``name``; ``MediatorInUseError`` while a device uses it."""
        with self._lock:
            record = self._records.get(name)
            if record is None:
                raise RegistryError(f"no mediator named {name!r} is registered")
            if record.users:
                devices = ", ".join(sorted(getattr(d, "name", repr(d)) for d in record.users))
                raise MediatorInUseError(
                    f"mediator {record.describe()} is in use by open device(s) {devices}; "
                    "close them first"
                )
            self._pm.unregister(plugin=record.plugin, name=name)
            del self._records[name]
            return record

    @property
    def mediators(self) -> tuple[PluginRecord, ...]:
        """The registered mediators, in the order they are asked."""
        with self._lock:
            records = list(self._records.values())
        return tuple(sorted(records, key=lambda r: (r.priority, r.name)))

    @property
    def failures(self) -> tuple[PluginRecord, ...]:
        """Entry points that could not be loaded or registered, with their errors."""
        with self._lock:
            return tuple(self._failures)

    def require_loaded(self) -> None:
        """Raise ``PluginLoadError`` naming every mediator entry point that failed to load,
        its error and how to go on without it (``VFIO_MEDIATE_DISABLE``).

        A device such a mediator would have claimed would otherwise be served unmediated
        (its traps and migration gone) as if nothing were wrong: serving refuses instead.
        """
        failures = self.failures
        if not failures:
            return
        which, it = ("mediator", "it") if len(failures) == 1 else ("mediators", "they")
        plugins = ", ".join(record.describe() for record in failures)
        errors = "; ".join(_one_line(record) for record in failures)
        names = ",".join(record.name for record in failures)
        raise PluginLoadError(
            f"{which} {plugins}",
            f"failed to load: {errors}; a device {it} would claim would be served unmediated "
            f"(no traps, no migration). Fix or uninstall, or leave {it} out: "
            f"{ENV_DISABLE}={names}",
        )

    def get(self, name: str) -> PluginRecord:
        """The registered mediator ``name``."""
        with self._lock:
            try:
                return self._records[name]
            except KeyError:
                raise RegistryError(f"no mediator named {name!r} is registered") from None

    def hookspec_names(self) -> tuple[str, ...]:
        """The names of every hook of the contract."""
        return tuple(
            name for name, caller in vars(self._pm.hook).items() if caller.spec is not None
        )

    def hook(self, record: PluginRecord, name: str) -> Any:
        """The function implementing hook ``name`` in ``record``'s plugin, or ``None``."""
        caller = getattr(self._pm.hook, name)
        for impl in caller.get_hookimpls():
            if impl.plugin is record.plugin:
                return _positional(impl.function, impl.argnames, caller.spec.argnames)
        return None

    def claim(self, device: Any, owner: Any) -> Claim | None:
        """Ask each mediator in order to open ``device``; the first non-``None`` handle wins.

        The winner's use count is taken for ``owner`` (released with ``release_use``). A mediator
        that raises is logged with its name, distribution and version, and skipped.
        """
        for record in self.mediators:
            opener = self.hook(record, "mediator_open")
            release = self.hook(record, "mediator_release")
            if opener is None:
                continue  # unregistered since the list was taken
            try:
                handle = opener(device)
            except Exception:  # a plugin's failure must not stop the search
                logger.exception(
                    "mediator %s raised in mediator_open for %s; skipped",
                    record.describe(),
                    getattr(device, "name", device),
                )
                continue
            if handle is not None:
                with self._lock:
                    if self._records.get(record.name) is record:
                        record.users.add(owner)
                        return Claim(record, handle)
                # Unregistered while it was deciding: give the handle back, ask the next one.
                if release is not None:
                    try:
                        release(handle)
                    except Exception:
                        logger.exception(
                            "mediator %s raised in mediator_release", record.describe()
                        )
        return None

    def release_use(self, record: PluginRecord, owner: Any) -> None:
        """Drop ``owner``'s use of ``record`` (the device closed)."""
        with self._lock:
            record.users.discard(owner)


def _one_line(record: PluginRecord) -> str:
    """``name: error`` on one line, without the record's description twice."""
    error = record.error or ""
    error = error.removeprefix(f"{record.describe()}: ")
    return f"{record.name}: {' '.join(error.split())}"


def _positional(function: Any, argnames: Iterable[str], spec_argnames: Iterable[str]) -> Any:
    """``function`` callable with the spec's arguments in order, however few it declares."""
    wanted, spec = tuple(argnames), tuple(spec_argnames)
    if wanted == spec:
        return function
    positions = [spec.index(name) for name in wanted]

    def call(*args: Any) -> Any:
        return function(*[args[i] for i in positions])

    return call
