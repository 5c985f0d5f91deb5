"""``WinningMediator``: the mediator that claimed a device, with its handle and its hooks."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, final

from ._entry_points import PluginRecord
from ._errors import ContractViolation
from ._registry import Claim, MediatorRegistry
from ._rules import HOOK_RULES, Rule

__all__ = ["WinningMediator"]

logger = logging.getLogger(__name__)


@final
class WinningMediator:
    """The winner of a device's first-match search, from its claim to its release.

    ``record`` names the mediator, ``handle`` is what its ``mediator_open`` returned, and its
    hook implementations are resolved once, here. A device nobody claimed has no winner: the
    device holds ``None`` instead of an object standing for nobody.
    """

    __slots__ = ("_hooks", "_owner", "_registry", "handle", "record")

    def __init__(self, registry: MediatorRegistry, claim: Claim, owner: object) -> None:
        self.record: PluginRecord = claim.record
        self.handle: Any = claim.handle
        self._registry = registry
        self._owner = owner
        self._hooks: dict[str, Callable[..., Any] | None] = {
            name: registry.hook(claim.record, name) for name in registry.hookspec_names()
        }

    @classmethod
    def search(
        cls, registry: MediatorRegistry, view: object, owner: object
    ) -> WinningMediator | None:
        """Ask ``registry``'s mediators in order to open ``view``; the winner, or ``None``.
        The winner's use count is taken for ``owner`` until ``release``."""
        claim = registry.claim(view, owner)
        return None if claim is None else cls(registry, claim, owner)

    def __repr__(self) -> str:
        return f"<WinningMediator {self.record.describe()}>"

    def hook(self, name: str) -> Callable[..., Any] | None:
        """The mediator's implementation of hook ``name`` (called with the handle first), or
        ``None`` when it has none."""
        return self._hooks.get(name)

    def implements(self, name: str) -> bool:
        """Whether the mediator implements hook ``name``."""
        return self._hooks.get(name) is not None

    def call(self, name: str, *args: Any) -> Any:
        """Call hook ``name`` with the handle and ``args`` (``None`` if not implemented).

        An ``OSError`` with an errno passes as the mediator's refusal; anything else it raises
        becomes a ``ContractViolation`` of the hook's own rule (``HOOK_RULES``).
        """
        function = self._hooks.get(name)
        if function is None:
            return None
        try:
            return function(self.handle, *args)
        except OSError as exc:
            if not exc.errno:
                raise self.without_errno(exc) from exc
            raise
        except Exception as exc:
            raise self.violation(HOOK_RULES[name], f"{name} raised {exc!r}") from exc

    def call_quietly(self, name: str, *args: Any) -> None:
        """Call hook ``name`` where nobody could take an error (teardown): log what it raises."""
        function = self._hooks.get(name)
        if function is None:
            return
        try:
            function(self.handle, *args)
        except Exception:
            logger.exception("mediator %s raised in %s", self.record.describe(), name)

    def release(self) -> None:
        """Give the device back: drop the use count, then ``mediator_release`` once."""
        self._registry.release_use(self.record, self._owner)
        self.call_quietly("mediator_release")
        self._hooks = {}

    def violation(self, rule: Rule, message: str) -> ContractViolation:
        """The error of this mediator breaking ``rule``."""
        return ContractViolation(self.record.describe(), rule.value, message)

    def without_errno(self, exc: OSError, where: str = "") -> ContractViolation:
        """The error of this mediator refusing with an ``OSError`` that carries no errno."""
        return self.violation(Rule.ACCESS_ERRORS, f"raised {exc!r} without an errno{where}")
