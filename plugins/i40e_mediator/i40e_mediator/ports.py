"""Switch ports owned by objects that may be collected (VF models, link partners).

A port's owner holds it; the switch holds only a ``deliver`` that does not keep the owner
alive. When the owner is collected its port must leave the switch, but a finalizer may run
inside any allocation, also one made under the switch's own lock: it only queues the port,
and the next ``attach_port`` detaches it.
"""

from __future__ import annotations

import weakref
from collections import deque
from collections.abc import Callable

from .switch import Switch, SwitchPort

__all__ = ["attach_port"]

_ORPHANS: deque[SwitchPort] = deque()


def attach_port(switch: Switch, owner: object, deliver: Callable[[bytes], None]) -> SwitchPort:
    """A port of ``switch`` for ``owner``, detached some time after ``owner`` is collected."""
    while _ORPHANS:
        _ORPHANS.popleft().detach()
    port = switch.attach(deliver)
    weakref.finalize(owner, _ORPHANS.append, port)
    return port
