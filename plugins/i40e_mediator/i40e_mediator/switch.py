"""The emulated switch every VF of one serving process is a port of.

Each VF attaches with a ``deliver`` callable (it puts a frame on the VF's RX path) and gets a
``SwitchPort``: its number, its default MAC and ``transmit`` for the frames its guest sends.
A frame goes to every *other* port whose receive filter accepts its destination MAC:

- broadcast (ff:ff:ff:ff:ff:ff): every port;
- another multicast address: ports that listed it, and ports in all-multicast or promiscuous mode;
- unicast: the ports that listed it as a unicast filter, and promiscuous ports. A unicast
  address nobody listed reaches only the promiscuous ports (there is no uplink to flood to).

A new port's unicast filter is its default MAC; ``set_filters`` replaces the whole filter.

Thread safety: filters and the port set live in one immutable table swapped under a lock, so
``transmit`` reads it without locking. Delivery never blocks a transmitter: one thread at a time
delivers (a transmitter that finds another thread delivering queues its frame for that thread),
so two devices that each hold their own lock while transmitting to the other cannot deadlock.
The cost is that ``deliver`` may run on any transmitting thread, including re-entrantly inside
its own port's ``transmit``: a device lock it takes must be re-entrant (``threading.RLock``).
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable, Iterable
from typing import NamedTuple, final

__all__ = ["SWITCH", "Switch", "SwitchPort"]

logger = logging.getLogger(__name__)

MAC_SIZE = 6
HEADER_SIZE = 14  # destination, source, EtherType
BROADCAST = b"\xff" * MAC_SIZE
# Locally administered (bit 1 of the first byte), unicast (bit 0 clear): "vf" then the number.
_MAC_PREFIX = b"\x02\x76\x66"
MAX_PORTS = 1 << 24


class _Table(NamedTuple):
    """Who receives what, precomputed from every port's filter (immutable)."""

    unicast: dict[bytes, tuple[SwitchPort, ...]]  # listed MAC -> listers + promiscuous ports
    promiscuous: tuple[SwitchPort, ...]  # unicast nobody listed
    multicast: dict[bytes, tuple[SwitchPort, ...]]  # listed group -> listers + all-multicast
    all_multicast: tuple[SwitchPort, ...]  # a group nobody listed
    everyone: tuple[SwitchPort, ...]  # broadcast


_EMPTY = _Table({}, (), {}, (), ())


class _Filter(NamedTuple):
    unicast: frozenset[bytes]
    multicast: frozenset[bytes]
    promiscuous: bool
    all_multicast: bool


def _check_mac(mac: bytes, group: bool) -> bytes:
    mac = bytes(mac)
    if len(mac) != MAC_SIZE:
        raise ValueError(f"a MAC address is {MAC_SIZE} bytes, not {len(mac)}: {mac.hex(':')}")
    if bool(mac[0] & 1) != group:
        kind = "multicast" if group else "unicast"
        raise ValueError(f"{mac.hex(':')} is not a {kind} address")
    return mac


@final
class Switch:
    """A learning-free L2 switch of VF ports (see the module docstring). Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ports: dict[int, SwitchPort] = {}
        self._table = _EMPTY
        self._delivering = threading.Lock()
        self._backlog: collections.deque[tuple[SwitchPort, tuple[SwitchPort, ...], bytes]] = (
            collections.deque()
        )

    def default_mac(self, port_number: int) -> bytes:
        """Port ``port_number``'s default MAC: locally administered unicast, distinct per
        number, the same in every process (02:76:66 then the number in 3 bytes)."""
        if not 0 <= port_number < MAX_PORTS:
            raise ValueError(f"port number {port_number} is outside 0..{MAX_PORTS - 1}")
        return _MAC_PREFIX + port_number.to_bytes(3, "big")

    def attach(self, deliver: Callable[[bytes], None]) -> SwitchPort:
        """A new port that hands the frames it receives to ``deliver``. It takes the lowest
        free number (so the same attach order gives the same numbers and MACs) and filters on
        its default MAC until told otherwise."""
        with self._lock:
            number = next(n for n in range(len(self._ports) + 1) if n not in self._ports)
            if number >= MAX_PORTS:
                raise ValueError(f"the switch has all its {MAX_PORTS} ports in use")
            port = SwitchPort(self, number, self.default_mac(number), deliver)
            self._ports[number] = port
            self._rebuild()
        return port

    @property
    def ports(self) -> tuple[SwitchPort, ...]:
        """The attached ports, by number."""
        return self._table.everyone

    # -- for SwitchPort ------------------------------------------------------------------

    def _update(self, port: SwitchPort, detach: bool) -> None:
        with self._lock:
            if self._ports.get(port.number) is not port:
                return
            if detach:
                del self._ports[port.number]
            self._rebuild()

    def _rebuild(self) -> None:
        ports = tuple(self._ports[n] for n in sorted(self._ports))
        promiscuous = tuple(p for p in ports if p._filter.promiscuous)
        all_multicast = tuple(p for p in ports if p._filter.promiscuous or p._filter.all_multicast)
        unicast: dict[bytes, tuple[SwitchPort, ...]] = {}
        multicast: dict[bytes, tuple[SwitchPort, ...]] = {}
        for mac in {mac for p in ports for mac in p._filter.unicast}:
            unicast[mac] = tuple(p for p in ports if p in promiscuous or mac in p._filter.unicast)
        for mac in {mac for p in ports for mac in p._filter.multicast}:
            multicast[mac] = tuple(
                p for p in ports if p in all_multicast or mac in p._filter.multicast
            )
        self._table = _Table(unicast, promiscuous, multicast, all_multicast, ports)

    def _forward(self, sender: SwitchPort, frame: bytes) -> None:
        table = self._table
        destination = bytes(frame[:MAC_SIZE])
        if not destination[0] & 1:
            targets = table.unicast.get(destination, table.promiscuous)
        elif destination == BROADCAST:
            targets = table.everyone
        else:
            targets = table.multicast.get(destination, table.all_multicast)
        if not targets or targets == (sender,):
            return
        self._backlog.append((sender, targets, frame))
        # Whoever holds the delivery lock drains the backlog, then looks again after letting
        # go: a frame queued meanwhile is delivered by this thread or by the next holder.
        while self._delivering.acquire(blocking=False):
            try:
                while self._backlog:
                    self._send(*self._backlog.popleft())
            finally:
                self._delivering.release()
            if not self._backlog:
                return

    @staticmethod
    def _send(sender: SwitchPort, targets: tuple[SwitchPort, ...], frame: bytes) -> None:
        for port in targets:
            if port is sender or port._detached:
                continue
            try:
                port._deliver(frame)
            except Exception as exc:  # one port's failure must not cost the others the frame
                port.delivery_errors += 1
                logger.warning("switch port %d could not take a frame: %s", port.number, exc)


@final
class SwitchPort:
    """One VF's port on a ``Switch``: its number, its default MAC, its receive filter."""

    def __init__(
        self, switch: Switch, number: int, mac: bytes, deliver: Callable[[bytes], None]
    ) -> None:
        self.number = number
        self.mac = mac
        self.delivery_errors = 0
        self._switch = switch
        self._deliver = deliver
        self._filter = _Filter(frozenset((mac,)), frozenset(), False, False)
        self._detached = False

    def set_filters(
        self,
        unicast: Iterable[bytes],
        multicast: Iterable[bytes],
        *,
        promiscuous: bool,
        all_multicast: bool,
    ) -> None:
        """Replace the receive filter: the unicast and multicast MACs this port accepts, and
        whether it takes every frame (``promiscuous``) or every multicast (``all_multicast``).
        Broadcast is always accepted. A MAC of the wrong kind or size raises ``ValueError``
        and leaves the filter as it was."""
        new = _Filter(
            frozenset(_check_mac(mac, False) for mac in unicast),
            frozenset(_check_mac(mac, True) for mac in multicast),
            bool(promiscuous),
            bool(all_multicast),
        )
        self._filter = new
        self._switch._update(self, detach=False)

    @property
    def filters(self) -> tuple[frozenset[bytes], frozenset[bytes], bool, bool]:
        """The filter now in force: (unicast, multicast, promiscuous, all_multicast)."""
        current = self._filter
        return current.unicast, current.multicast, current.promiscuous, current.all_multicast

    def transmit(self, frame: bytes) -> None:
        """Send ``frame`` (an Ethernet frame without FCS) to every other port that accepts its
        destination. A frame shorter than an Ethernet header, or sent after ``detach``, goes
        nowhere."""
        if len(frame) < HEADER_SIZE or self._detached:
            return
        self._switch._forward(self, frame)

    def detach(self) -> None:
        """Leave the switch: nothing more is delivered to this port, its number is free again.
        Idempotent."""
        self._detached = True
        self._switch._update(self, detach=True)


SWITCH = Switch()
"""The switch of this serving process: every VF model attaches to it."""
