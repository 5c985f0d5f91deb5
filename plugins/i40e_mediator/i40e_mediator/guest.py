"""A small virtchnl driver for the VF: what a guest's iavf does, in the same order.

``Guest`` drives a VF only through region accesses (config space, BAR0) and guest memory, like
a driver in a VM. It brings the VF up as iavf does: VFGEN_RSTAT, both admin queues (registers
in iavf's order, 32 entries, 4 KiB ARQ buffers), VERSION, GET_VF_RESOURCES, the misc
interrupt, CONFIG_IRQ_MAP, ADD_ETH_ADDR, RX buffers posted, CONFIG_VSI_QUEUES,
ENABLE_QUEUES and the link-up event. Requests go one at a time over the admin send queue; the
replies and events come back on the admin receive queue. ``reset`` is iavf's VF reset
(RESET_VF, wait for ARQLEN.ENABLE to drop and VFGEN_RSTAT to read VFACTIVE, bring-up again).

Traffic goes through the switch to a ``LinkPartner``, a port of the same switch that sends
every frame back to its sender: each packet the guest sends on any queue pair carries a
sequence number and a pattern and comes back on RX queue 0, checked byte for byte and in
order. Every slice of guest time also asks for GET_STATS (the admin queue stays busy).

The guest's own CPU writes to its memory are known to it: ``take_cpu_dirty`` returns the pages
it wrote since the last call. That is the memory-dirty source a live migration combines with the
device's dirty bitmap (a VMM gets the same from KVM's dirty log). Writes are recorded *after*
they land, so a page copied after its write was recorded holds the write.

``workload`` is the entry point of ``vfio_mediate.workloads`` (named after the device model).
"""

from __future__ import annotations

import copy
import functools
import random
import struct
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, Self, final

from . import registers as r
from . import virtchnl as vc
from .ports import attach_port
from .switch import SWITCH, Switch

__all__ = ["Guest", "GuestError", "GuestMemory", "LinkPartner", "workload"]

CONFIG_REGION = 7  # VFIO_PCI_CONFIG_REGION_INDEX
MSIX_IRQ_INDEX = 2  # VFIO_PCI_MSIX_IRQ_INDEX
PCI_COMMAND = 0x04
PCI_COMMAND_MEMORY = 1 << 1
PCI_COMMAND_MASTER = 1 << 2

AQ_ENTRIES = 32  # IAVF_AQ_LEN
AQ_BUF_SIZE = 4096  # IAVF_MAX_AQ_BUF_SIZE
IAVF_CAPS = 0x1ABD8CF9  # what a 6.12 iavf asks for in GET_VF_RESOURCES
TX_BUF_SIZE = 2048  # a 9728-byte frame takes 5 TX descriptors, within the device's 8
MAX_PACKET = r.MAX_FRAME_SIZE
ETHERTYPE = 0x88B5  # IEEE local experimental
ETHER_HEADER = struct.Struct("!6s6sH")
HEADER = struct.Struct("<4sIHHI")  # magic, sequence number, queue, reserved, length
MAGIC = b"I40G"
MIN_PACKET = 60  # Ethernet's minimum frame without FCS: shorter ones arrive padded
_PATTERN = bytes(range(251)) * (r.MAX_FRAME_SIZE // 251 + 2)


class GuestError(Exception):
    """The VF did not behave as iavf needs (no reply, a refused request, no reset)."""


def packet_bytes(
    destination: bytes, source: bytes, queue: int, sequence: int, length: int
) -> bytes:
    """The frame the guest sends as number ``sequence`` on ``queue``: Ethernet header,
    our header and pattern, ``length`` bytes in all."""
    start = sequence % 251
    body = _PATTERN[start : start + length - ETHER_HEADER.size - HEADER.size]
    return (
        ETHER_HEADER.pack(destination, source, ETHERTYPE)
        + HEADER.pack(MAGIC, sequence, queue, 0, length)
        + body
    )


class Device(Protocol):
    """The guest's view of the VF: region accesses (a ``MediatedDevice`` is one)."""

    def read(self, index: int, offset: int, count: int) -> bytes:
        """Read a region."""

    def write(self, index: int, offset: int, data: bytes) -> int:
        """Write a region."""


@final
class LinkPartner:
    """The far end of the VF's link: a port of ``switch`` that sends every unicast frame
    addressed to it back to its sender (destination and source swapped). With
    ``any_address`` it answers for every unicast MAC no other port has (promiscuous), so a
    guest in another process reaches it whatever partner MAC it knows."""

    def __init__(self, switch: Switch = SWITCH, *, any_address: bool = False) -> None:
        ref = weakref.ref(self)

        def deliver(frame: bytes) -> None:
            partner = ref()
            if partner is not None:
                partner.reflect(frame)

        self.port = attach_port(switch, self, deliver)
        self.mac = self.port.mac
        self.any_address = any_address
        self.reflected = 0
        if any_address:
            self.port.set_filters((), (), promiscuous=True, all_multicast=False)

    def reflect(self, frame: bytes) -> None:
        """Send ``frame`` back if it is for this port (any unicast one, with ``any_address``)."""
        if frame[0] & 1 if self.any_address else frame[:6] != self.mac:
            return
        self.reflected += 1
        self.port.transmit(frame[6:12] + frame[:6] + frame[12:])


class GuestMemory:
    """Guest RAM as its CPU sees it: ``memory`` at ``iova``, with every write recorded."""

    def __init__(self, memory: memoryview, iova: int, next_free: int = 0) -> None:
        self.memory = memory.cast("B") if memory.format != "B" else memory
        self.iova = iova
        self.size = len(self.memory)
        self.next_free = next_free
        self.dirty: set[int] = set()

    def allocate(self, size: int, align: int) -> int:
        """A block of ``size`` bytes aligned to ``align``: its IOVA (``MemoryError`` when full)."""
        start = -(-self.next_free // align) * align
        if start + size > self.size:
            raise MemoryError(f"guest memory of {self.size:#x} bytes is full")
        self.next_free = start + size
        return self.iova + start

    def write(self, iova: int, data: bytes) -> None:
        """A CPU write; its pages are recorded after it lands."""
        at = iova - self.iova
        self.memory[at : at + len(data)] = data
        self.dirty.update(range(at // r.PAGE_SIZE, (at + len(data) - 1) // r.PAGE_SIZE + 1))

    def read(self, iova: int, length: int) -> bytes:
        """A CPU read."""
        at = iova - self.iova
        return bytes(self.memory[at : at + length])

    def read_u64(self, iova: int) -> int:
        """A CPU read of a little-endian 64-bit word."""
        at = iova - self.iova
        return int.from_bytes(self.memory[at : at + 8], "little")

    def take_dirty(self) -> list[tuple[int, int]]:
        """The ``(iova, length)`` of each page written since the last call."""
        pages, self.dirty = self.dirty, set()
        return [(self.iova + page * r.PAGE_SIZE, r.PAGE_SIZE) for page in sorted(pages)]


@dataclass
class _TxPacket:
    sequence: int
    last_slot: int
    descriptors: int
    buffers: list[int]


@dataclass
class _QueuePair:
    """The driver's side of one queue pair."""

    index: int
    vector: int
    ring_len: int
    buf_size: int
    tx_ring: int = 0
    rx_ring: int = 0
    tx_next_to_use: int = 0
    tx_next_to_clean: int = 0
    rx_next_to_use: int = 0
    rx_next_to_clean: int = 0
    ring_sets: deque[tuple[int, int]] = field(default_factory=deque)
    rx_slot_buffer: list[int] = field(default_factory=list)
    rx_free: deque[int] = field(default_factory=deque)
    tx_free: deque[int] = field(default_factory=deque)
    in_flight: deque[_TxPacket] = field(default_factory=deque)
    expected: deque[tuple[int, int]] = field(default_factory=deque)  # sent, not yet back
    partial: list[bytes] = field(default_factory=list)

    @property
    def rx_posted(self) -> int:
        """RX descriptors handed to the device and not yet cleaned."""
        return (self.rx_next_to_use - self.rx_next_to_clean) % self.ring_len

    @property
    def tx_free_descriptors(self) -> int:
        """TX descriptors the driver may fill (one always stays empty)."""
        return self.ring_len - 1 - (self.tx_next_to_use - self.tx_next_to_clean) % self.ring_len


@dataclass
class _AdminQueues:
    """The driver's side of the admin queues."""

    atq: int = 0
    arq: int = 0
    atq_buffers: list[int] = field(default_factory=list)
    arq_buffers: list[int] = field(default_factory=list)
    atq_next_to_use: int = 0
    atq_next_to_clean: int = 0
    arq_next_to_clean: int = 0
    outstanding: int = vc.OP_UNKNOWN  # the request waiting for its reply
    reply: tuple[int, int, bytes] | None = None  # (opcode, status, payload) of the last reply


class Guest:
    """The guest driver of one VF (see the module docstring)."""

    def __init__(
        self,
        device: Device,
        memory: memoryview,
        iova: int,
        *,
        queues: int = r.NUM_QUEUE_PAIRS,
        ring_len: int = 32,
        buf_size: int = 2048,
        seed: int = 0,
        packets_per_slice: int = 8,
        cpu_pages_per_slice: int = 0,
        partner: LinkPartner | None = None,
    ) -> None:
        self.device = device
        self.memory = GuestMemory(memory, iova)
        self.rng = random.Random(seed)
        self.packets_per_slice = packets_per_slice
        self.cpu_pages_per_slice = cpu_pages_per_slice
        self.partner = partner or LinkPartner()
        self.queue_count = queues
        self.pairs = [
            _QueuePair(q, 1 + q % (r.MSIX_VECTORS - 1), ring_len, buf_size) for q in range(queues)
        ]
        self.aq = _AdminQueues()
        self.mac = bytes(6)
        self.vsi_id = 0
        self.vectors = 0
        self.link_up = False
        self.stats_reply: tuple[int, ...] = ()
        self.counters = {
            "sent": 0,
            "received": 0,
            "dropped": 0,
            "corrupt": 0,
            "interrupts": 0,
            "no_room": 0,
            "admin_replies": 0,
            "events": 0,
        }
        self.application: tuple[int, int] = (0, 0)

    # -- bring-up ----------------------------------------------------------------------

    def start(self) -> None:
        """Bring the VF up as iavf does (see the module docstring) and start every pair."""
        aq = self.aq
        aq.atq = self.memory.allocate(AQ_ENTRIES * r.AQ_DESC_SIZE, r.PAGE_SIZE)
        aq.arq = self.memory.allocate(AQ_ENTRIES * r.AQ_DESC_SIZE, r.PAGE_SIZE)
        aq.atq_buffers = [self.memory.allocate(AQ_BUF_SIZE, r.PAGE_SIZE) for _ in range(AQ_ENTRIES)]
        aq.arq_buffers = [self.memory.allocate(AQ_BUF_SIZE, r.PAGE_SIZE) for _ in range(AQ_ENTRIES)]
        for pair in self.pairs:
            pair.rx_free.extend(
                self.memory.allocate(pair.buf_size, pair.buf_size) for _ in range(2 * pair.ring_len)
            )
            pair.tx_free.extend(
                self.memory.allocate(TX_BUF_SIZE, TX_BUF_SIZE) for _ in range(pair.ring_len)
            )
        self._connect_interrupts()
        if self.cpu_pages_per_slice:
            start = self.memory.allocate(r.PAGE_SIZE, r.PAGE_SIZE)
            self.application = (start, self.memory.iova + self.memory.size - start)
        self.restart()

    def restart(self) -> None:
        """Bring the VF up (again, after a reset) with the memory the guest already has."""
        self._enable_device()
        if self._reg(r.VFGEN_RSTAT) & r.VFR_STATE_MASK not in (r.VFR_COMPLETED, r.VFR_VFACTIVE):
            raise GuestError("the device is still in reset (VFGEN_RSTAT)")
        self.init_admin_queue()
        status, reply = self.request(
            vc.OP_VERSION, vc.VERSION.pack(vc.VERSION_MAJOR, vc.VERSION_MINOR)
        )
        if status or vc.VERSION.unpack(reply) != (vc.VERSION_MAJOR, vc.VERSION_MINOR):
            raise GuestError(f"VERSION answered {status} {reply.hex()}")
        self._configure_vf()

    def _configure_vf(self) -> None:
        """GET_VF_RESOURCES, misc interrupt, vectors, filter, rings, start: what iavf does after
        VERSION at probe and after a VF reset."""
        self._reclaim_all()
        status, reply = self.request(vc.OP_GET_VF_RESOURCES, vc.CAPS.pack(IAVF_CAPS))
        if status:
            raise GuestError(f"GET_VF_RESOURCES refused ({status})")
        vsis, pairs, self.vectors, _, _, _, _ = vc.VF_RESOURCE.unpack_from(reply)
        vsi, _, vsi_type, _, self.mac = vc.VSI_RESOURCE.unpack_from(reply, vc.VF_RESOURCE.size)
        if (
            not vsis
            or vsi_type != vc.VSI_TYPE_SRIOV
            or pairs < self.queue_count
            or self.vectors < 2
        ):
            raise GuestError(f"no usable LAN VSI: {reply.hex()}")
        self.vsi_id = vsi
        self.link_up = False
        self._write(r.VFINT_DYN_CTL01, r.DYN_CTL_INTENA | r.DYN_CTL_ITR_NONE)
        self._write(r.VFINT_ICR0_ENA1, r.ICR0_ADMINQ)
        for pair in self.pairs:
            pair.vector = 1 + pair.index % (self.vectors - 1)
        vectors = sorted({pair.vector for pair in self.pairs})
        maps = [
            vc.VECTOR_MAP.pack(vsi, vector, bits, bits, 0, 1)
            for vector in vectors
            for bits in [sum(1 << p.index for p in self.pairs if p.vector == vector)]
        ] + [vc.VECTOR_MAP.pack(vsi, r.ADMIN_VECTOR, 0, 0, 0, 0)]
        self.expect_ok(vc.OP_CONFIG_IRQ_MAP, vc.padded_list(vc.IRQ_MAP.pack(len(maps)), maps))
        self.expect_ok(vc.OP_ADD_ETH_ADDR, self.address_list([self.mac]))
        for pair in self.pairs:
            self._new_rings(pair)
            self.post_rx(pair.index)  # iavf posts RX buffers before CONFIG_VSI_QUEUES
        self.expect_ok(vc.OP_CONFIG_VSI_QUEUES, self.queue_config(self.pairs))
        self.expect_ok(vc.OP_ENABLE_QUEUES, self.queue_select(self.pairs))
        if not self.link_up:
            raise GuestError("no link-up event after ENABLE_QUEUES")
        for pair in self.pairs:
            self.rearm(pair.index)

    def reset(self, *, stale_tx_tail: int | None = None) -> None:
        """A VF reset as iavf does it (an MTU change): RESET_VF, wait until the device shows
        the reset and is active again, bring everything up again. ``stale_tx_tail`` is
        written to every TX tail between RESET_VF and CONFIG_VSI_QUEUES, as iavf 6.12 does."""
        self._write(r.VFINT_DYN_CTL01, 0)
        self.shutdown_admin_queue()
        self.init_admin_queue()
        self._post(vc.OP_RESET_VF, b"")
        self.aq.outstanding = vc.OP_UNKNOWN  # no reply comes
        for _ in range(500):
            if not self._reg(r.VF_ARQLEN) & r.AQ_ENABLE:
                break
        else:
            raise GuestError("never saw the reset (ARQLEN.ENABLE stays set)")
        for _ in range(2000):
            if self._reg(r.VFGEN_RSTAT) & r.VFR_STATE_MASK == r.VFR_VFACTIVE:
                break
        else:
            raise GuestError("reset never finished (VFGEN_RSTAT)")
        if stale_tx_tail is not None:
            for pair in self.pairs:
                self._write(r.qtx_tail(pair.index), stale_tx_tail)
        self.shutdown_admin_queue()
        self.init_admin_queue()
        self._configure_vf()

    def _enable_device(self) -> None:
        command = int.from_bytes(self.device.read(CONFIG_REGION, PCI_COMMAND, 2), "little")
        command |= PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER
        self.device.write(CONFIG_REGION, PCI_COMMAND, command.to_bytes(2, "little"))

    def _connect_interrupts(self) -> None:
        connect: Callable[..., Any] | None = getattr(self.device, "set_irq_triggers", None)
        if connect is not None:
            connect(
                MSIX_IRQ_INDEX,
                0,
                [functools.partial(self._interrupt, v) for v in range(r.MSIX_VECTORS)],
            )

    def _interrupt(self, vector: int) -> None:
        self.counters["interrupts"] += 1

    # -- the admin queue ---------------------------------------------------------------

    def init_admin_queue(self) -> None:
        """iavf_init_adminq: the registers in its order, ARQ descriptors posted."""
        aq = self.aq
        for slot, buffer in enumerate(aq.arq_buffers):
            self._arm_arq(slot, buffer)
        self.memory.write(aq.atq, bytes(AQ_ENTRIES * r.AQ_DESC_SIZE))
        for offset, value in (
            (r.VF_ATQH, 0),
            (r.VF_ATQT, 0),
            (r.VF_ATQLEN, AQ_ENTRIES | r.AQ_ENABLE),
            (r.VF_ATQBAL, aq.atq & 0xFFFF_FFFF),
            (r.VF_ATQBAH, aq.atq >> 32),
            (r.VF_ARQH, 0),
            (r.VF_ARQT, 0),
            (r.VF_ARQLEN, AQ_ENTRIES | r.AQ_ENABLE),
            (r.VF_ARQBAL, aq.arq & 0xFFFF_FFFF),
            (r.VF_ARQBAH, aq.arq >> 32),
            (r.VF_ARQT, AQ_ENTRIES - 1),
        ):
            self._write(offset, value)
        if (
            self._reg(r.VF_ATQBAL) != aq.atq & 0xFFFF_FFFF
            or self._reg(r.VF_ARQBAL) != aq.arq & 0xFFFF_FFFF
        ):
            raise GuestError("the admin queue base registers do not read back")
        aq.atq_next_to_use = aq.atq_next_to_clean = aq.arq_next_to_clean = 0
        aq.outstanding, aq.reply = vc.OP_UNKNOWN, None

    def shutdown_admin_queue(self) -> None:
        """iavf_shutdown_adminq: queue shutdown (0x0003, synchronous), then every register 0."""
        aq = self.aq
        if self._reg(r.VF_ATQLEN) & r.AQ_ENABLE:
            slot = aq.atq_next_to_use
            self.memory.write(
                aq.atq + slot * r.AQ_DESC_SIZE,
                r.AQ_DESC.pack(r.AQ_FLAG_SI, r.AQC_QUEUE_SHUTDOWN, 0, 0, 0, 0, 1, 0, 0, 0),
            )
            aq.atq_next_to_use = (slot + 1) % AQ_ENTRIES
            self._write(r.VF_ATQT, aq.atq_next_to_use)
            flags, _, _, retval, *_ = r.AQ_DESC.unpack(
                self.memory.read(aq.atq + slot * r.AQ_DESC_SIZE, r.AQ_DESC_SIZE)
            )
            if self._reg(r.VF_ATQH) != aq.atq_next_to_use or not flags & r.AQ_FLAG_DD or retval:
                raise GuestError("the queue shutdown command did not complete")
        for offset in (r.VF_ATQH, r.VF_ATQT, r.VF_ATQLEN, r.VF_ATQBAL, r.VF_ATQBAH):
            self._write(offset, 0)
        for offset in (r.VF_ARQH, r.VF_ARQT, r.VF_ARQLEN, r.VF_ARQBAL, r.VF_ARQBAH):
            self._write(offset, 0)

    def _arm_arq(self, slot: int, buffer: int) -> None:
        self.memory.write(
            self.aq.arq + slot * r.AQ_DESC_SIZE,
            r.AQ_DESC.pack(
                r.AQ_FLAG_BUF | r.AQ_FLAG_LB,
                0,
                AQ_BUF_SIZE,
                0,
                0,
                0,
                0,
                0,
                buffer >> 32,
                buffer & 0xFFFF_FFFF,
            ),
        )

    def _post(self, opcode: int, payload: bytes) -> None:
        """iavf_aq_send_msg_to_pf: one descriptor, its buffer, the ATQT write."""
        aq = self.aq
        slot = aq.atq_next_to_use
        buffer = aq.atq_buffers[slot]
        flags = r.AQ_FLAG_SI
        if payload:
            flags |= r.AQ_FLAG_BUF | r.AQ_FLAG_RD | (r.AQ_FLAG_LB if len(payload) > 512 else 0)
            self.memory.write(buffer, payload)
        self.memory.write(
            aq.atq + slot * r.AQ_DESC_SIZE,
            r.AQ_DESC.pack(
                flags,
                r.AQC_SEND_MSG_TO_PF,
                len(payload),
                0,
                opcode,
                0,
                0,
                0,
                buffer >> 32,
                buffer & 0xFFFF_FFFF,
            ),
        )
        aq.atq_next_to_use = (slot + 1) % AQ_ENTRIES
        aq.outstanding, aq.reply = opcode, None
        self._write(r.VF_ATQT, aq.atq_next_to_use)

    def poll_admin(self) -> None:
        """Reclaim completed send descriptors and take every message on the receive queue."""
        aq = self.aq
        head = self._reg(r.VF_ATQH)
        while aq.atq_next_to_clean != head:
            self.memory.write(aq.atq + aq.atq_next_to_clean * r.AQ_DESC_SIZE, bytes(r.AQ_DESC_SIZE))
            aq.atq_next_to_clean = (aq.atq_next_to_clean + 1) % AQ_ENTRIES
        head = self._reg(r.VF_ARQH) & r.AQ_HEAD_MASK
        while aq.arq_next_to_clean != head:
            slot = aq.arq_next_to_clean
            flags, _, datalen, _, opcode, status, *_ = r.AQ_DESC.unpack(
                self.memory.read(aq.arq + slot * r.AQ_DESC_SIZE, r.AQ_DESC_SIZE)
            )
            payload = self.memory.read(aq.arq_buffers[slot], min(datalen, AQ_BUF_SIZE))
            self._arm_arq(slot, aq.arq_buffers[slot])
            aq.arq_next_to_clean = (slot + 1) % AQ_ENTRIES
            self._write(r.VF_ARQT, slot)
            if flags & r.AQ_FLAG_ERR or not opcode:
                raise GuestError(f"admin receive element {slot} flagged an error ({flags:#x})")
            signed = status - (1 << 32) if status & 1 << 31 else status
            if opcode == vc.OP_EVENT:
                self.counters["events"] += 1
                event, _, link, _ = vc.EVENT.unpack_from(payload)
                if event == vc.EVENT_LINK_CHANGE:
                    self.link_up = bool(link)
                continue
            if opcode != aq.outstanding:
                raise GuestError(f"expected a reply to {aq.outstanding}, received {opcode}")
            self.counters["admin_replies"] += 1
            aq.outstanding, aq.reply = vc.OP_UNKNOWN, (opcode, signed, payload)
            if opcode == vc.OP_GET_STATS and not signed:
                self.stats_reply = vc.ETH_STATS.unpack(payload)
        posted = (aq.arq_next_to_clean - 1) % AQ_ENTRIES
        if self._reg(r.VF_ARQT) != posted:  # every cleaned buffer goes back to the device
            self._write(r.VF_ARQT, posted)

    def request(self, opcode: int, payload: bytes = b"") -> tuple[int, bytes]:
        """Send one request and take its reply: (virtchnl status, payload). ``GuestError`` when
        the device does not complete or answer it at once (iavf would time out)."""
        self.poll_admin()
        if self.aq.outstanding:
            raise GuestError(f"virtchnl opcode {self.aq.outstanding} is still unanswered")
        self._post(opcode, payload)
        if self._reg(r.VF_ATQH) != self.aq.atq_next_to_use:
            raise GuestError("admin queue command never completed")
        self.poll_admin()
        if self.aq.reply is None:
            raise GuestError(f"no reply to virtchnl opcode {opcode}")
        _, status, reply = self.aq.reply
        return status, reply

    def expect_ok(self, opcode: int, payload: bytes = b"") -> bytes:
        """``request`` that must succeed."""
        status, reply = self.request(opcode, payload)
        if status:
            raise GuestError(f"virtchnl opcode {opcode} refused with status {status}")
        return reply

    # -- messages --------------------------------------------------------------------------

    def address_list(self, addresses: list[bytes]) -> bytes:
        """A virtchnl_ether_addr_list of ``addresses`` (with iavf's trailing element)."""
        return vc.padded_list(
            vc.ETHER_LIST.pack(self.vsi_id, len(addresses)),
            [vc.ETHER_ADDR.pack(address, 0) for address in addresses],
        )

    def queue_config(self, pairs: list[_QueuePair]) -> bytes:
        """A virtchnl_vsi_queue_config_info for ``pairs`` with their current rings (with
        iavf's trailing element)."""
        return vc.padded_list(
            vc.VSI_QUEUE_CONFIG.pack(self.vsi_id, len(pairs), 0),
            [self._queue_pair(p) for p in pairs],
        )

    def _queue_pair(self, p: _QueuePair) -> bytes:
        tx = (self.vsi_id, p.index, p.ring_len, 0, p.tx_ring, 0)
        rx = (self.vsi_id, p.index, p.ring_len, 0, 0, p.buf_size, MAX_PACKET, 0, 0, 0, 0)
        return vc.QUEUE_PAIR.pack(*tx, *rx, p.rx_ring, 0, 0)

    def queue_select(self, pairs: list[_QueuePair]) -> bytes:
        """A virtchnl_queue_select of ``pairs`` (RX and TX)."""
        bits = sum(1 << p.index for p in pairs)
        return vc.QUEUE_SELECT.pack(self.vsi_id, 0, bits, bits)

    # -- queue pairs ------------------------------------------------------------------------

    def _new_rings(self, pair: _QueuePair) -> None:
        """Give ``pair`` its other set of rings, empty."""
        if len(pair.ring_sets) < 2:
            pair.ring_sets.append(
                (
                    self.memory.allocate(pair.ring_len * r.TX_DESC.size, r.PAGE_SIZE),
                    self.memory.allocate(pair.ring_len * r.RX_DESC.size, r.PAGE_SIZE),
                )
            )
        pair.ring_sets.rotate(1)
        pair.tx_ring, pair.rx_ring = pair.ring_sets[0]
        pair.rx_slot_buffer = [0] * pair.ring_len
        pair.tx_next_to_use = pair.tx_next_to_clean = 0
        pair.rx_next_to_use = pair.rx_next_to_clean = 0
        self._write(r.qrx_tail(pair.index), 0)

    def _reclaim(self, pair: _QueuePair) -> None:
        """Take back what ``pair`` held (posted buffers, packets in flight)."""
        for packet in pair.in_flight:
            pair.tx_free.extend(packet.buffers)
        pair.in_flight.clear()
        pair.partial.clear()
        pair.rx_free.extend(
            pair.rx_slot_buffer[(pair.rx_next_to_clean + i) % pair.ring_len]
            for i in range(pair.rx_posted)
        )
        pair.rx_next_to_use = pair.rx_next_to_clean = 0

    def _reclaim_all(self) -> None:
        for pair in self.pairs:
            self._reclaim(pair)
            self.counters["dropped"] += len(pair.expected)
            pair.expected.clear()

    def configure(self, queue: int, *, early: bool = False) -> None:
        """Give queue pair ``queue`` its other set of rings: DISABLE_QUEUES, RX buffers posted,
        CONFIG_VSI_QUEUES, ENABLE_QUEUES. ``early`` also sends a packet between CONFIG and
        ENABLE, so the device serves it as the queue starts. Packets still expected back are
        counted as dropped."""
        pair = self.pairs[queue]
        self.poll_admin()
        self.clean(0)
        self.expect_ok(vc.OP_DISABLE_QUEUES, self.queue_select([pair]))
        self._reclaim(pair)
        dropped = [pair.expected] if queue else [p.expected for p in self.pairs]
        for expected in dropped:  # what queue 0 held is lost, and TX in flight on this pair
            self.counters["dropped"] += len(expected)
            expected.clear()
        self._new_rings(pair)
        self.post_rx(queue)
        self.expect_ok(vc.OP_CONFIG_VSI_QUEUES, self.queue_config([pair]))
        if early:
            self.send(queue, 64)
        self.expect_ok(vc.OP_ENABLE_QUEUES, self.queue_select([pair]))

    def stop(self, queue: int) -> None:
        """DISABLE_QUEUES for ``queue``."""
        self.expect_ok(vc.OP_DISABLE_QUEUES, self.queue_select([self.pairs[queue]]))

    # -- data path -----------------------------------------------------------------------

    def post_rx(self, queue: int, count: int | None = None) -> int:
        """Post up to ``count`` (default: as many as fit) free RX buffers; one tail write."""
        pair = self.pairs[queue]
        room = min(pair.ring_len - 1 - pair.rx_posted, len(pair.rx_free))
        count = room if count is None else min(count, room)
        for _ in range(count):
            slot = pair.rx_next_to_use
            buffer = pair.rx_free.popleft()
            pair.rx_slot_buffer[slot] = buffer
            self.memory.write(pair.rx_ring + slot * r.RX_DESC.size, r.RX_DESC.pack(buffer, 0, 0, 0))
            pair.rx_next_to_use = (slot + 1) % pair.ring_len
        if count:
            self._write(r.qrx_tail(queue), pair.rx_next_to_use)
        return count

    def send(self, queue: int, length: int) -> bool:
        """Send one frame of ``length`` bytes (at least the headers) on ``queue`` to the link
        partner, expected back; ``False`` when the TX ring or buffers are full."""
        length = min(max(length, MIN_PACKET), MAX_PACKET)
        sequence = self.counters["sent"]
        frame = packet_bytes(self.partner.mac, self.mac, queue, sequence, length)
        if not self.transmit(queue, frame):
            return False
        self.pairs[queue].expected.append((sequence, length))
        self.counters["sent"] += 1
        return True

    def transmit(self, queue: int, frame: bytes, *, offload: int = 0, tso_mss: int = 0) -> bool:
        """Put ``frame`` on ``queue``'s TX ring in 2 KiB pieces, as iavf does: ``offload`` is
        ORed into every data descriptor's qword1 (IIPT, L4T, header lengths) and a nonzero
        ``tso_mss`` adds a TSO context descriptor; one tail write. ``False`` when full."""
        pair = self.pairs[queue]
        pieces = -(-len(frame) // TX_BUF_SIZE)
        needed = pieces + (1 if tso_mss else 0)
        if needed > pair.tx_free_descriptors or pieces > len(pair.tx_free):
            self.counters["no_room"] += 1
            return False
        buffers = [pair.tx_free.popleft() for _ in range(pieces)]
        slot = pair.tx_next_to_use
        if tso_mss:
            header = (
                (offload >> r.TX_OFFSET_SHIFT & r.TX_MACLEN_MASK) * 2
                + (offload >> r.TX_IPLEN_SHIFT & r.TX_IPLEN_MASK) * 4
                + (offload >> r.TX_L4LEN_SHIFT & r.TX_L4LEN_MASK) * 4
            )
            context = (
                r.TX_DTYPE_CONTEXT
                | r.TX_CTX_CMD_TSO << r.TX_CMD_SHIFT
                | (len(frame) - header) << r.TX_CTX_TSO_LEN_SHIFT
                | tso_mss << r.TX_CTX_MSS_SHIFT
            )
            self.memory.write(pair.tx_ring + slot * r.TX_DESC.size, r.TX_DESC.pack(0, context))
            slot = (slot + 1) % pair.ring_len
        for piece, buffer in enumerate(buffers):
            data = frame[piece * TX_BUF_SIZE : (piece + 1) * TX_BUF_SIZE]
            self.memory.write(buffer, data)
            cmd = r.TX_CMD_EOP | r.TX_CMD_RS if piece == pieces - 1 else 0
            self.memory.write(
                pair.tx_ring + slot * r.TX_DESC.size,
                r.TX_DESC.pack(buffer, r.tx_data_qword1(len(data), cmd) | offload),
            )
            last, slot = slot, (slot + 1) % pair.ring_len
        pair.tx_next_to_use = slot
        pair.in_flight.append(_TxPacket(self.counters["sent"], last, needed, buffers))
        self._write(r.qtx_tail(queue), pair.tx_next_to_use)
        return True

    def clean(self, queue: int) -> int:
        """Reclaim completed TX packets and take received RX frames, each checked against
        what was sent; returns frames taken."""
        frames = self.take_frames(queue)
        for frame in frames:
            self._check(frame)
        return len(frames)

    def take_frames(self, queue: int) -> list[bytes]:
        """Reclaim completed TX packets and take the frames received on ``queue`` as they are."""
        pair = self.pairs[queue]
        while pair.in_flight:
            packet = pair.in_flight[0]
            qword1 = self.memory.read_u64(
                pair.tx_ring + packet.last_slot * r.TX_DESC.size + r.TX_QWORD1_OFFSET
            )
            if qword1 & r.TX_DTYPE_MASK != r.TX_DTYPE_DESC_DONE:
                break
            pair.in_flight.popleft()
            pair.tx_free.extend(packet.buffers)
            pair.tx_next_to_clean = (packet.last_slot + 1) % pair.ring_len
        frames = []
        while pair.rx_posted:
            slot = pair.rx_next_to_clean
            qword1 = self.memory.read_u64(pair.rx_ring + slot * r.RX_DESC.size + 8)
            if not qword1 & r.RX_DD:
                break
            length = (qword1 >> r.RX_LEN_SHIFT) & r.RX_LEN_MASK
            buffer = pair.rx_slot_buffer[slot]
            pair.partial.append(self.memory.read(buffer, length))
            pair.rx_free.append(buffer)
            pair.rx_next_to_clean = (slot + 1) % pair.ring_len
            if qword1 & r.RX_EOF:
                frames.append(b"".join(pair.partial))
                pair.partial.clear()
        return frames

    def _check(self, frame: bytes) -> None:
        """Match a received frame with the oldest one sent on its TX queue (frames of one
        queue arrive in order, queues served at once may interleave); older ones were
        dropped."""
        if len(frame) < MIN_PACKET:
            self.counters["corrupt"] += 1
            return
        magic, sequence, queue, _, length = HEADER.unpack_from(frame, ETHER_HEADER.size)
        if magic != MAGIC or queue >= len(self.pairs):
            self.counters["corrupt"] += 1
            return
        expected = self.pairs[queue].expected
        while expected and expected[0][0] < sequence:
            expected.popleft()
            self.counters["dropped"] += 1
        if (
            not expected
            or expected[0] != (sequence, length)
            or frame != packet_bytes(self.mac, self.partner.mac, queue, sequence, length)
        ):
            self.counters["corrupt"] += 1
            return
        expected.popleft()
        self.counters["received"] += 1

    def rearm(self, queue: int) -> None:
        """Arm queue pair ``queue``'s interrupt again (INTENA), as iavf does after polling."""
        vector = self.pairs[queue].vector
        self._write(r.vfint_dyn_ctln(vector - 1), r.DYN_CTL_INTENA | r.DYN_CTL_ITR_NONE)

    def _write(self, offset: int, value: int) -> None:
        self.device.write(r.BAR0, offset, value.to_bytes(4, "little"))

    def _reg(self, offset: int) -> int:
        return int.from_bytes(self.device.read(r.BAR0, offset, 4), "little")

    # -- the workload interface ----------------------------------------------------------

    def run(self) -> int:
        """One slice of guest time: take admin messages and ask for GET_STATS, send a few
        packets on random pairs, clean, refill, re-arm; with ``cpu_pages_per_slice``, also
        write that many random application pages."""
        self.poll_admin()
        if not self.aq.outstanding:
            self._post(vc.OP_GET_STATS, vc.QUEUE_SELECT.pack(self.vsi_id, 0, 0, 0))
        sent = 0
        for _ in range(self.packets_per_slice):
            queue = self.rng.randrange(len(self.pairs))
            length = self.rng.choice((64, 128, 512, 1500, 1500, 4000, 9000))
            sent += self.send(queue, length)
        for pair in self.pairs:
            self.clean(pair.index)
            self.post_rx(pair.index)
            self.rearm(pair.index)
        self.poll_admin()
        self._write(r.VFINT_DYN_CTL01, r.DYN_CTL_INTENA | r.DYN_CTL_ITR_NONE)
        start, size = self.application
        for _ in range(self.cpu_pages_per_slice if size else 0):
            page = start + self.rng.randrange(size // r.PAGE_SIZE) * r.PAGE_SIZE
            self.memory.write(page, self.rng.randbytes(64))
        return sent

    def take_cpu_dirty(self) -> list[tuple[int, int]]:
        """The pages the guest CPU wrote since the last call, as ``(iova, length)``."""
        return self.memory.take_dirty()

    def move_to(self, device: Device, memory: memoryview) -> Self:
        """This guest continuing on ``device`` with ``memory`` (after a migration): the same
        driver state, as the VM's RAM and CPUs carry it. This object must not run again."""
        moved = copy.copy(self)
        moved.device = device
        moved.memory = GuestMemory(memory, self.memory.iova, self.memory.next_free)
        moved.pairs = copy.deepcopy(self.pairs)
        moved.aq = copy.deepcopy(self.aq)
        moved.counters = dict(self.counters)
        moved.rng = random.Random(self.rng.random())
        moved._connect_interrupts()
        return moved

    def stats(self) -> dict[str, int]:
        """Packets sent, received (checked), dropped, corrupt; interrupts; sends refused;
        admin replies and events taken."""
        return dict(self.counters)


def workload(device: Device, memory: memoryview, iova: int, *, seed: int = 0) -> Guest:
    """The ``vfio_mediate.workloads`` entry point for ``i40e-vf``: a guest that keeps four
    queue pairs busy with traffic through the switch and back, asks for statistics every slice
    and also writes some application memory."""
    return Guest(device, memory, iova, seed=seed, cpu_pages_per_slice=4)


def far_end() -> LinkPartner:
    """The guest's link partner where the VF is served by another process (``workload``'s
    ``far_end``): it answers for any unicast MAC, so for the partner MAC the guest knows."""
    return LinkPartner(any_address=True)


workload.far_end = far_end  # type: ignore[attr-defined]
