"""A mediator that observes MSI-X vector 1 and swallows its first interrupt: the interrupt
routing tests of both backends use it."""

from __future__ import annotations

import threading
from typing import Any

import pluggy

from vfio_mediate.uapi import IrqIndex

hookimpl = pluggy.HookimplMarker("vfio_mediate")


class IrqObserver:
    """Claims every device; ``seen`` has ``(index, vector, thread name)`` per relayed
    interrupt."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int, str]] = []

    @hookimpl
    def mediator_open(self, device: Any) -> Any:
        return self

    @hookimpl
    def mediator_irq_observe(self, handle: Any, index: int) -> Any:
        return [1] if index == IrqIndex.MSIX else None

    @hookimpl
    def mediator_irq(self, handle: Any, index: int, vector: int) -> Any:
        self.seen.append((index, vector, threading.current_thread().name))
        return vector != 1 or len(self.seen) > 1
