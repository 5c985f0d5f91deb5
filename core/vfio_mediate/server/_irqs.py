"""DEVICE_GET_IRQ_INFO and DEVICE_SET_IRQS: interrupt indexes and the client's eventfds,
which die with the session."""

from __future__ import annotations

import errno
import logging
from typing import final

from .._errors import AccessError, ContractViolation
from ..uapi import IrqInfoFlag, IrqSetFlag
from ._codec import IRQ_INFO, IRQ_SET, Command
from ._command import CommandGroup, Handler, Send
from ._config import ServerConfig
from ._log import logger
from ._served import ServedDevice
from ._transport import EventfdTrigger, is_eventfd

__all__ = ["Irqs"]

_DEBUG = logging.DEBUG


@final
class Irqs(CommandGroup):
    """Answers IRQ info and SET_IRQS; holds the eventfd triggers the client assigned."""

    def __init__(self, device: ServedDevice, config: ServerConfig, label: str, send: Send) -> None:
        super().__init__(device, config, label, send)
        self._triggers: dict[tuple[int, int], EventfdTrigger] = {}

    def handlers(self) -> dict[int, Handler]:
        return {
            Command.DEVICE_GET_IRQ_INFO: self._irq_info,
            Command.DEVICE_SET_IRQS: self._set_irqs,
        }

    def teardown(self) -> None:
        for (index, vector), trigger in self._triggers.items():
            try:
                self.device.set_irq_triggers(index, vector, [None])
            except (OSError, ContractViolation) as exc:
                logger.debug("%s: clearing irq %d/%d: %s", self.label, index, vector, exc)
            trigger.close()
        self._triggers.clear()

    def _irq_info(self, msg_id: int, flags: int, payload: memoryview, fds: list[int]) -> None:
        if len(payload) < IRQ_INFO.size:
            raise AccessError(errno.EINVAL, f"GET_IRQ_INFO payload of {len(payload)} bytes")
        argsz, _, index, _ = IRQ_INFO.unpack_from(payload)
        if argsz < IRQ_INFO.size:
            raise AccessError(errno.EINVAL, f"GET_IRQ_INFO argsz {argsz} < 16")
        info = self.device.irq_info(index)
        self._respond(
            msg_id,
            Command.DEVICE_GET_IRQ_INFO,
            flags,
            IRQ_INFO.pack(IRQ_INFO.size, info.flags, index, info.count),
        )

    def _set_irqs(self, msg_id: int, flags: int, payload: memoryview, fds: list[int]) -> None:
        if len(payload) < IRQ_SET.size:
            raise AccessError(errno.EINVAL, f"SET_IRQS payload of {len(payload)} bytes")
        argsz, set_flags, index, start, count = IRQ_SET.unpack_from(payload)
        if argsz < IRQ_SET.size:
            raise AccessError(errno.EINVAL, f"SET_IRQS argsz {argsz} < 20")
        data_kind = set_flags & (
            IrqSetFlag.DATA_NONE | IrqSetFlag.DATA_BOOL | IrqSetFlag.DATA_EVENTFD
        )
        action = set_flags & (
            IrqSetFlag.ACTION_MASK | IrqSetFlag.ACTION_UNMASK | IrqSetFlag.ACTION_TRIGGER
        )
        if (
            set_flags & ~int(data_kind | action)
            or data_kind.bit_count() != 1
            or action.bit_count() != 1
        ):
            raise AccessError(errno.EINVAL, f"SET_IRQS flags {set_flags:#x}")
        if fds and data_kind != IrqSetFlag.DATA_EVENTFD:
            raise AccessError(errno.EINVAL, "SET_IRQS carries fds without DATA_EVENTFD")
        info = self.device.irq_info(index)
        if count == 0 and start == 0 and data_kind == IrqSetFlag.DATA_NONE:
            if action == IrqSetFlag.ACTION_TRIGGER:
                self._drop_triggers(index, 0, info.count)
        elif count == 0 or start + count > info.count:
            raise AccessError(
                errno.EINVAL, f"IRQ index {index} has {info.count} vectors, not {start}+{count}"
            )
        elif action != IrqSetFlag.ACTION_TRIGGER:
            # The device has no interrupt masking: mask/unmask of a maskable index is accepted
            # and changes nothing; eventfd notifications of masking cannot be given.
            if not info.flags & IrqInfoFlag.MASKABLE or data_kind == IrqSetFlag.DATA_EVENTFD:
                raise AccessError(errno.EINVAL, f"IRQ index {index} cannot do {action!r}")
        elif data_kind == IrqSetFlag.DATA_EVENTFD:
            if fds:
                if len(fds) != count:
                    raise AccessError(errno.EINVAL, f"{len(fds)} eventfds for {count} vectors")
                self._assign_triggers(index, start, fds)
            else:
                self._drop_triggers(index, start, count)
        elif data_kind == IrqSetFlag.DATA_BOOL:
            if len(payload) < IRQ_SET.size + count:
                raise AccessError(errno.EINVAL, f"SET_IRQS lacks {count} booleans")
            chosen = payload[IRQ_SET.size : IRQ_SET.size + count]
            for vector, value in enumerate(chosen, start):
                if value:
                    self.device.fire_irqs(index, vector, 1)
        else:
            self.device.fire_irqs(index, start, count)
        self._respond(msg_id, Command.DEVICE_SET_IRQS, flags)

    def _assign_triggers(self, index: int, start: int, fds: list[int]) -> None:
        # Anything but an eventfd could block the trigger's write (and the loop thread with it).
        for position, fd in enumerate(fds):
            if not is_eventfd(fd):
                raise AccessError(errno.EINVAL, f"SET_IRQS fd #{position} is not an eventfd")
        triggers = [EventfdTrigger(fd) for fd in fds]
        fds.clear()
        try:
            self.device.set_irq_triggers(index, start, triggers)
        except BaseException:
            for trigger in triggers:
                trigger.close()
            raise
        for vector, trigger in enumerate(triggers, start):
            old = self._triggers.pop((index, vector), None)
            if old is not None:
                old.close()
            self._triggers[(index, vector)] = trigger
        if logger.isEnabledFor(_DEBUG):
            logger.debug(
                "%s: irq %d vectors %d+%d on eventfds", self.label, index, start, len(triggers)
            )

    def _drop_triggers(self, index: int, start: int, count: int) -> None:
        if count:
            self.device.set_irq_triggers(index, start, [None] * count)
        for vector in range(start, start + count):
            old = self._triggers.pop((index, vector), None)
            if old is not None:
                old.close()
