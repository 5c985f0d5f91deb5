"""The PF's side of virtchnl, played by the device model: what the i40e PF driver answers a VF.

``PfResponder.request`` takes one VF request (its opcode and payload, from the admin send
queue) and queues exactly one reply on the admin receive queue - except RESET_VF, which has
none and resets the VF. Implemented: VERSION (1.1), GET_VF_RESOURCES (one SR-IOV VSI, the
model's queue pairs, its vectors, the port's MAC, plain L2 only), CONFIG_VSI_QUEUES,
CONFIG_IRQ_MAP, ENABLE_QUEUES / DISABLE_QUEUES (a LINK_CHANGE up event follows every enable),
ADD_ETH_ADDR / DEL_ETH_ADDR, CONFIG_PROMISCUOUS_MODE, GET_STATS, RESET_VF. Every other opcode
is answered NOT_SUPPORTED (opcodes 0 and EVENT are ignored: a reply naming 0 would end iavf's
drain of the receive queue, one naming EVENT would read as an event); a message of the wrong
length, a wrong VSI id, a queue or vector out of range or a ring the device cannot reach
ERR_PARAM, with a log line at INFO (``-v``).

The filters (unicast and multicast addresses, promiscuous flags) are the VF's switch-port
state: every change is handed to the port, and they are saved and restored with the VF.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, final

from . import registers as r
from . import virtchnl as vc

if TYPE_CHECKING:
    from .model import I40eVf

__all__ = ["VSI_ID", "PfResponder", "PortState"]

logger = logging.getLogger(__name__)

VSI_ID = 3
"""The VSI id of the VF's only VSI (any value; the VF echoes it in every request)."""

_BROADCAST = b"\xff" * 6
MAX_FILTERS = 64
"""Unicast plus multicast addresses one VF may filter on (the PF's limit for a VF)."""


@dataclass
class PortState:
    """The VF's switch-port state: its default MAC and its receive filters."""

    mac: bytes
    unicast: list[bytes] = field(default_factory=list)
    multicast: list[bytes] = field(default_factory=list)
    promiscuous: bool = False
    all_multicast: bool = False


class _Refused(Exception):
    """A request answered with ``status``."""

    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status


@final
class PfResponder:
    """The PF of one VF (see the module docstring)."""

    def __init__(self, vf: I40eVf, mac: bytes) -> None:
        self.vf = vf
        self.api_minor: int | None = None  # the VF's virtchnl minor version, once told
        self.caps = 0
        self.port = PortState(mac, [mac])

    def reset(self) -> None:
        """A VF reset: the filters go back to the default MAC, promiscuous modes off."""
        self.port = PortState(self.port.mac, [self.port.mac])
        self.caps = 0
        self.vf.apply_filters(self.port)

    def forget_version(self) -> None:
        """A function reset: the VF negotiates the version again."""
        self.api_minor = None

    def request(self, opcode: int, payload: bytes) -> bool:
        """Answer one request; ``True`` for RESET_VF (the reset follows its completion)."""
        if opcode in (vc.OP_UNKNOWN, vc.OP_EVENT):
            # A reply naming opcode 0 ends iavf's ARQ drain, one naming EVENT reads as an event.
            logger.info(
                "%s: virtchnl opcode %d ignored (no reply can name it)", self.vf.name, opcode
            )
            return False
        fits = vc.request_length_ok(opcode, payload)
        if fits is None:
            self._refuse(opcode, vc.STATUS_ERR_NOT_SUPPORTED, "opcode not supported")
            return False
        if not fits:
            self._refuse(opcode, vc.STATUS_ERR_PARAM, f"a message of {len(payload)} bytes")
            return False
        if opcode == vc.OP_RESET_VF:
            return True
        try:
            reply = self._answer(opcode, payload)
        except _Refused as exc:
            self._refuse(opcode, exc.status, str(exc))
            return False
        self.vf.aq.send(opcode, vc.STATUS_SUCCESS, reply)
        if opcode == vc.OP_ENABLE_QUEUES:
            self.vf.aq.send(
                vc.OP_EVENT,
                vc.STATUS_SUCCESS,
                vc.EVENT.pack(vc.EVENT_LINK_CHANGE, vc.LINK_SPEED_10GB, 1, 0),
            )
        return False

    def _refuse(self, opcode: int, status: int, why: str) -> None:
        if logger.isEnabledFor(logging.INFO):
            logger.info(
                "%s: virtchnl opcode %d refused (status %d): %s", self.vf.name, opcode, status, why
            )
        self.vf.aq.send(opcode, status)

    def _answer(self, opcode: int, payload: bytes) -> bytes:
        if opcode == vc.OP_VERSION:
            major, minor = vc.VERSION.unpack(payload)
            self.api_minor = minor if major == vc.VERSION_MAJOR else 0
            return vc.VERSION.pack(vc.VERSION_MAJOR, vc.VERSION_MINOR)
        if opcode == vc.OP_GET_VF_RESOURCES:
            return self._resources(payload)
        if opcode == vc.OP_GET_STATS:
            self._check_vsi(vc.QUEUE_SELECT.unpack(payload)[0])
            return vc.ETH_STATS.pack(*self.vf.stats)
        if opcode == vc.OP_CONFIG_VSI_QUEUES:
            self._config_queues(payload)
        elif opcode == vc.OP_CONFIG_IRQ_MAP:
            self._config_irq_map(payload)
        elif opcode in (vc.OP_ENABLE_QUEUES, vc.OP_DISABLE_QUEUES):
            vsi, _, rx_queues, tx_queues = vc.QUEUE_SELECT.unpack(payload)
            self._check_vsi(vsi)
            try:
                self.vf.set_queues_enabled(rx_queues, tx_queues, opcode == vc.OP_ENABLE_QUEUES)
            except ValueError as exc:
                raise _Refused(vc.STATUS_ERR_PARAM, str(exc)) from exc
        elif opcode in (vc.OP_ADD_ETH_ADDR, vc.OP_DEL_ETH_ADDR):
            self._filters(payload, add=opcode == vc.OP_ADD_ETH_ADDR)
        elif opcode == vc.OP_CONFIG_PROMISCUOUS_MODE:
            vsi, flags = vc.PROMISC.unpack(payload)
            self._check_vsi(vsi)
            self.port.promiscuous = bool(flags & vc.PROMISC_UNICAST)
            self.port.all_multicast = bool(flags & vc.PROMISC_MULTICAST)
            self.vf.apply_filters(self.port)
        return b""

    def _check_vsi(self, vsi: int) -> None:
        if vsi != VSI_ID:
            raise _Refused(vc.STATUS_ERR_PARAM, f"VSI {vsi} is not this VF's ({VSI_ID})")

    def _resources(self, payload: bytes) -> bytes:
        asked = vc.CAPS.unpack(payload)[0] if payload else vc.CAP_L2
        self.caps = asked & vc.CAPS_IMPLEMENTED
        vf = self.vf
        header = vc.VF_RESOURCE.pack(
            1, vf.queue_pairs, vf.vectors, r.MAX_FRAME_SIZE, self.caps, 52, 64
        )
        vsi = vc.VSI_RESOURCE.pack(VSI_ID, vf.queue_pairs, vc.VSI_TYPE_SRIOV, 0, self.port.mac)
        return header + vsi

    def _config_queues(self, payload: bytes) -> None:
        vsi, count, _ = vc.VSI_QUEUE_CONFIG.unpack_from(payload)
        self._check_vsi(vsi)
        if count > self.vf.queue_pairs:
            raise _Refused(
                vc.STATUS_ERR_PARAM, f"{count} queue pairs, the VF has {self.vf.queue_pairs}"
            )
        configs = []
        for index in range(count):
            at = vc.VSI_QUEUE_CONFIG.size + index * vc.QUEUE_PAIR.size
            pair = vc.QueuePairInfo._make(vc.QUEUE_PAIR.unpack_from(payload, at))
            self._check_vsi(pair.tx_vsi)
            self._check_vsi(pair.rx_vsi)
            queue = pair.tx_queue
            if queue != pair.rx_queue or not 0 <= queue < self.vf.queue_pairs:
                raise _Refused(
                    vc.STATUS_ERR_PARAM, f"queue pair {queue}/{pair.rx_queue} does not exist"
                )
            if pair.headwb_enabled or pair.splithdr_enabled or pair.hdr_size or pair.rxdid:
                raise _Refused(
                    vc.STATUS_ERR_PARAM,
                    f"queue {queue}: head write-back, header split and flexible RX "
                    "descriptors are not implemented",
                )
            rings = (pair.tx_ring, pair.tx_ring_len, pair.rx_ring, pair.rx_ring_len)
            configs.append((queue, (*rings, pair.databuffer_size, pair.max_pkt_size)))
        try:
            for queue, config in configs:
                self.vf.check_queue(queue, *config)
        except ValueError as exc:
            raise _Refused(vc.STATUS_ERR_PARAM, str(exc)) from exc
        for queue, config in configs:
            self.vf.configure_queue(queue, *config)

    def _config_irq_map(self, payload: bytes) -> None:
        (count,) = vc.IRQ_MAP.unpack_from(payload)
        maps = []
        for index in range(count):
            vsi, vector, rx_map, tx_map, _, _ = vc.VECTOR_MAP.unpack_from(
                payload, vc.IRQ_MAP.size + index * vc.VECTOR_MAP.size
            )
            self._check_vsi(vsi)
            if vector >= self.vf.vectors:
                raise _Refused(
                    vc.STATUS_ERR_PARAM, f"vector {vector} (the VF has {self.vf.vectors})"
                )
            if (rx_map | tx_map) >> self.vf.queue_pairs:
                raise _Refused(
                    vc.STATUS_ERR_PARAM,
                    f"vector {vector} maps queues {rx_map | tx_map:#x} the VF does not have",
                )
            if vector == r.ADMIN_VECTOR and rx_map | tx_map:
                raise _Refused(vc.STATUS_ERR_PARAM, "queues mapped onto the admin vector 0")
            maps.append((vector, rx_map, tx_map))
        for vector, rx_map, tx_map in maps:
            self.vf.map_vector(vector, rx_map, tx_map)

    def _filters(self, payload: bytes, *, add: bool) -> None:
        vsi, count = vc.ETHER_LIST.unpack_from(payload)
        self._check_vsi(vsi)
        addresses = [
            vc.ETHER_ADDR.unpack_from(payload, vc.ETHER_LIST.size + i * vc.ETHER_ADDR.size)[0]
            for i in range(count)
        ]
        for address in addresses:
            if address == bytes(6) or address == _BROADCAST:
                raise _Refused(
                    vc.STATUS_ERR_PARAM, f"address {address.hex(':')} cannot be a filter"
                )
        port = self.port
        if add and len({*port.unicast, *port.multicast, *addresses}) > MAX_FILTERS:
            raise _Refused(vc.STATUS_ERR_PARAM, f"more than {MAX_FILTERS} MAC filters")
        for address in addresses:
            table = port.multicast if address[0] & 1 else port.unicast
            if add and address not in table:
                table.append(address)
            elif not add and address in table:
                table.remove(address)
        self.vf.apply_filters(port)
