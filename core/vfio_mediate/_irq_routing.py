"""``IrqRouting``: where one device's interrupts go: to the client's eventfds directly, or
through its mediator for the vectors it observes."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import final

from ._backend import DeviceBackend, Trigger
from ._rules import Rule
from ._winner import WinningMediator

__all__ = ["IrqRouting"]

logger = logging.getLogger(__name__)


@final
class IrqRouting:
    """Sets a device's interrupt triggers. The vectors the winner observes
    (``mediator_irq_observe``) get a relay that calls ``mediator_irq`` first, on whatever
    backend. A backend with ``direct_irqs`` (a device bound to vfio-pci) gets a client's
    eventfds for the other vectors as eventfds, so the kernel signals them and no Python runs;
    other backends get the other triggers as they are."""

    def __init__(self, name: str, backend: DeviceBackend, winner: WinningMediator | None) -> None:
        self.name = name
        self.backend = backend
        self.winner = winner

    def set_triggers(self, index: int, start: int, triggers: Sequence[Trigger | None]) -> None:
        """Set (or with ``None`` unset) the triggers of vectors ``start`` onward."""
        observed = self._observed(index)
        if (
            self.backend.direct_irqs
            and all(t is None or hasattr(t, "fileno") for t in triggers)
            and not observed.intersection(range(start, start + len(triggers)))
        ):
            fds = [-1 if t is None else t.fileno() for t in triggers]  # type: ignore[attr-defined]
            self.backend.set_irq_eventfds(index, start, fds)
            return
        self.backend.set_irq_triggers(
            index,
            start,
            [
                self._relay(index, vector, t) if t is not None and vector in observed else t
                for vector, t in enumerate(triggers, start)
            ],
        )

    def _observed(self, index: int) -> frozenset[int]:
        winner = self.winner
        if winner is None:
            return frozenset()
        answer = winner.call("mediator_irq_observe", index)
        if answer is None:
            return frozenset()
        try:
            return frozenset(int(vector) for vector in answer)
        except (TypeError, ValueError):
            raise winner.violation(
                Rule.ACCESS_ERRORS, f"mediator_irq_observe returned {answer!r}"
            ) from None

    def _relay(self, index: int, vector: int, trigger: Trigger) -> Trigger:
        assert self.winner is not None
        hook, handle, name = self.winner.hook("mediator_irq"), self.winner.handle, self.name

        def relay() -> None:
            if hook is not None:
                try:
                    if hook(handle, index, vector) is False:
                        return
                except Exception:
                    logger.exception("%s: mediator_irq raised", name)
            trigger()

        return relay
