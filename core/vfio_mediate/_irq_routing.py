"""``IrqRouting``: where one device's interrupts go: to the client's eventfds directly, or
through its mediator for the vectors it observes."""

from __future__ import annotations

import functools
import logging
import queue
import threading
from collections.abc import Callable, Sequence
from typing import final

from ._backend import DeviceBackend, Trigger
from ._rules import Rule
from ._winner import WinningMediator

__all__ = ["IrqRouting"]

logger = logging.getLogger(__name__)
_CLOSE_TIMEOUT = 5.0
"""Seconds ``close`` waits for the relay thread to deliver what is queued."""


@final
class IrqRouting:
    """Sets a device's interrupt triggers. The vectors the winner observes
    (``mediator_irq_observe``) get a relay, on whatever backend: each interrupt calls
    ``mediator_irq`` on a relay thread, then the client's trigger. A backend with
    ``direct_irqs`` (a device bound to vfio-pci) relays on its own thread and gets a client's
    eventfds for the other vectors as eventfds, so the kernel signals them and no Python runs.
    Other backends get the other triggers as they are; their relayed interrupts are queued
    to a thread of this routing's (started at the first relay, stopped by ``close``), so that
    ``mediator_irq`` never runs inside the device's lock, where a model raises interrupts."""

    def __init__(self, name: str, backend: DeviceBackend, winner: WinningMediator | None) -> None:
        self.name = name
        self.backend = backend
        self.winner = winner
        self._queue: queue.SimpleQueue[Callable[[], None] | None] | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False

    def close(self) -> None:
        """Deliver what is queued, then stop the relay thread (if one was started); later
        interrupts of relayed vectors are dropped (the mediator is gone)."""
        with self._lock:
            self._closed = True
            relaying, thread = self._queue, self._thread
            self._queue = self._thread = None
        if relaying is not None and thread is not None:
            relaying.put(None)
            thread.join(_CLOSE_TIMEOUT)

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

        if self.backend.direct_irqs:
            return relay  # the backend's relay thread calls it
        return functools.partial(self._post, relay)

    def _post(self, relay: Callable[[], None]) -> None:
        with self._lock:
            if self._closed:
                return
            if self._queue is None:
                self._queue = queue.SimpleQueue()
                self._thread = threading.Thread(
                    target=_run_relays,
                    args=(self._queue, self.name),
                    name=f"{self.name}-irq-relay",
                    daemon=True,
                )
                self._thread.start()
            self._queue.put(relay)


def _run_relays(relays: queue.SimpleQueue[Callable[[], None] | None], name: str) -> None:
    while True:
        relay = relays.get()
        if relay is None:
            return
        try:
            relay()
        except Exception:
            logger.exception("%s: an interrupt relay failed", name)
