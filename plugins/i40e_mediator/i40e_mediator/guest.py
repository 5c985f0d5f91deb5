"""A minimal guest driver for the VF: what a guest's iavf would do with the data path.

``Guest`` drives a VF only through region accesses (config space, BAR0) and guest memory, like
a driver in a VM: it enables bus mastering, gives each queue pair its rings through the
queue-context window, posts RX buffers by writing descriptors and the RX tail, sends packets by
writing TX buffers, descriptors and the TX tail, and cleans both rings. Every packet carries a
sequence number and a pattern, so each one received is checked byte for byte and in order.

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
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, Self

from . import registers as r

__all__ = ["Guest", "GuestMemory", "workload"]

CONFIG_REGION = 7  # VFIO_PCI_CONFIG_REGION_INDEX
MSIX_IRQ_INDEX = 2  # VFIO_PCI_MSIX_IRQ_INDEX
PCI_COMMAND = 0x04
PCI_COMMAND_MEMORY = 1 << 1
PCI_COMMAND_MASTER = 1 << 2

TX_BUF_SIZE = 2048  # a 9728-byte frame takes 5 TX descriptors, within the device's 8
HEADER = struct.Struct("<4sIHHI")  # magic, sequence number, queue, reserved, length
MAGIC = b"I40G"
_PATTERN = bytes(range(251)) * (r.MAX_FRAME_SIZE // 251 + 2)


def packet_bytes(queue: int, sequence: int, length: int) -> bytes:
    """The packet the guest sends as number ``sequence`` on ``queue``: header and pattern."""
    start = sequence % 251
    body = _PATTERN[start : start + length - HEADER.size]
    return HEADER.pack(MAGIC, sequence, queue, 0, length) + body


class Device(Protocol):
    """The guest's view of the VF: region accesses (a ``MediatedDevice`` is one)."""

    def read(self, index: int, offset: int, count: int) -> bytes:
        """Read a region."""

    def write(self, index: int, offset: int, data: bytes) -> int:
        """Write a region."""


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
    expected: deque[tuple[int, int]] = field(default_factory=deque)
    partial: list[bytes] = field(default_factory=list)

    @property
    def rx_posted(self) -> int:
        """RX descriptors handed to the device and not yet cleaned."""
        return (self.rx_next_to_use - self.rx_next_to_clean) % self.ring_len

    @property
    def tx_free_descriptors(self) -> int:
        """TX descriptors the driver may fill (one always stays empty)."""
        return self.ring_len - 1 - (self.tx_next_to_use - self.tx_next_to_clean) % self.ring_len


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
    ) -> None:
        self.device = device
        self.memory = GuestMemory(memory, iova)
        self.rng = random.Random(seed)
        self.packets_per_slice = packets_per_slice
        self.cpu_pages_per_slice = cpu_pages_per_slice
        self.pairs = [
            _QueuePair(q, 1 + q % (r.MSIX_VECTORS - 1), ring_len, buf_size) for q in range(queues)
        ]
        self.counters = {
            "sent": 0,
            "received": 0,
            "dropped": 0,
            "corrupt": 0,
            "interrupts": 0,
            "no_room": 0,
        }
        self.application: tuple[int, int] = (0, 0)

    # -- bring-up ----------------------------------------------------------------------

    def start(self) -> None:
        """Bring the VF up: bus mastering, interrupts, every queue pair's rings, RX buffers."""
        self._enable_device()
        self._connect_interrupts()
        for pair in self.pairs:
            self.rearm(pair.index)
            pair.rx_free.extend(
                self.memory.allocate(pair.buf_size, pair.buf_size) for _ in range(2 * pair.ring_len)
            )
            pair.tx_free.extend(
                self.memory.allocate(TX_BUF_SIZE, TX_BUF_SIZE) for _ in range(pair.ring_len)
            )
            self.configure(pair.index)
        if self.cpu_pages_per_slice:
            start = self.memory.allocate(r.PAGE_SIZE, r.PAGE_SIZE)
            self.application = (start, self.memory.iova + self.memory.size - start)

    def restart(self) -> None:
        """Bring the VF up again after a reset, with the buffers the guest already has."""
        self._enable_device()
        for pair in self.pairs:
            self.rearm(pair.index)
            self.configure(pair.index)

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

    def configure(self, queue: int, *, early: bool = False) -> None:
        """Give queue pair ``queue`` its other set of rings and start it with all RX buffers
        posted; ``early`` posts them and sends a packet before starting the pair (as iavf posts
        RX buffers before CONFIG_VSI_QUEUES), so the device serves both as it starts.

        What the pair held (posted buffers, packets in flight) is reclaimed; packets still
        expected are counted as dropped.
        """
        pair = self.pairs[queue]
        self._write(r.qctx(queue, r.QCTX_CTL), 0)
        self._write(r.qtx_tail(queue), 0)
        self._write(r.qrx_tail(queue), 0)
        for packet in pair.in_flight:
            pair.tx_free.extend(packet.buffers)
        pair.in_flight.clear()
        self.counters["dropped"] += len(pair.expected)
        pair.expected.clear()
        pair.partial.clear()
        pair.rx_free.extend(
            pair.rx_slot_buffer[(pair.rx_next_to_clean + i) % pair.ring_len]
            for i in range(pair.rx_posted)
        )
        if len(pair.ring_sets) < 2:
            pair.ring_sets.append(
                (
                    self.memory.allocate(pair.ring_len * r.TX_DESC.size, r.PAGE_SIZE),
                    self.memory.allocate(pair.ring_len * r.RX_DESC.size, r.PAGE_SIZE),
                )
            )
        pair.ring_sets.rotate(1)  # a new context uses the other set of rings
        pair.tx_ring, pair.rx_ring = pair.ring_sets[0]
        pair.rx_slot_buffer = [0] * pair.ring_len
        pair.tx_next_to_use = pair.tx_next_to_clean = 0
        pair.rx_next_to_use = pair.rx_next_to_clean = 0
        for field_offset, value in (
            (r.QCTX_TX_BASE_LO, pair.tx_ring & 0xFFFF_FFFF),
            (r.QCTX_TX_BASE_HI, pair.tx_ring >> 32),
            (r.QCTX_TX_LEN, pair.ring_len),
            (r.QCTX_RX_BASE_LO, pair.rx_ring & 0xFFFF_FFFF),
            (r.QCTX_RX_BASE_HI, pair.rx_ring >> 32),
            (r.QCTX_RX_LEN, pair.ring_len),
            (r.QCTX_RX_BUF_SIZE, pair.buf_size),
            (r.QCTX_VECTOR, pair.vector),
        ):
            self._write(r.qctx(queue, field_offset), value)
        if early:
            self.post_rx(queue)
            self.send(queue, 64)
        self._write(r.qctx(queue, r.QCTX_CTL), r.QCTX_CTL_ENABLE)
        self.post_rx(queue)

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
        """Send one packet of ``length`` bytes (at least a header) on ``queue``; ``False`` when
        the TX ring or buffers are full."""
        pair = self.pairs[queue]
        length = max(length, HEADER.size)
        pieces = -(-length // TX_BUF_SIZE)
        if pieces > pair.tx_free_descriptors or pieces > len(pair.tx_free):
            self.counters["no_room"] += 1
            return False
        sequence = self.counters["sent"]
        packet = packet_bytes(queue, sequence, length)
        buffers = [pair.tx_free.popleft() for _ in range(pieces)]
        slot = pair.tx_next_to_use
        for piece, buffer in enumerate(buffers):
            data = packet[piece * TX_BUF_SIZE : (piece + 1) * TX_BUF_SIZE]
            self.memory.write(buffer, data)
            cmd = r.TX_CMD_EOP | r.TX_CMD_RS if piece == pieces - 1 else 0
            slot = (pair.tx_next_to_use + piece) % pair.ring_len
            self.memory.write(
                pair.tx_ring + slot * r.TX_DESC.size,
                r.TX_DESC.pack(buffer, r.tx_data_qword1(len(data), cmd)),
            )
        pair.tx_next_to_use = (slot + 1) % pair.ring_len
        pair.in_flight.append(_TxPacket(sequence, slot, pieces, buffers))
        pair.expected.append((sequence, length))
        self.counters["sent"] += 1
        self._write(r.qtx_tail(queue), pair.tx_next_to_use)
        return True

    def clean(self, queue: int) -> int:
        """Reclaim completed TX packets and take received RX packets; returns packets taken."""
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
        taken = 0
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
                self._check(pair, b"".join(pair.partial))
                pair.partial.clear()
                taken += 1
        return taken

    def _check(self, pair: _QueuePair, packet: bytes) -> None:
        """Match a received packet with the oldest one sent on the pair; older ones dropped."""
        if len(packet) < HEADER.size:
            self.counters["corrupt"] += 1
            return
        magic, sequence, queue, _, length = HEADER.unpack_from(packet)
        while pair.expected and pair.expected[0][0] < sequence:
            pair.expected.popleft()
            self.counters["dropped"] += 1
        if (
            magic != MAGIC
            or queue != pair.index
            or not pair.expected
            or pair.expected[0] != (sequence, length)
            or packet != packet_bytes(queue, sequence, length)
        ):
            self.counters["corrupt"] += 1
            return
        pair.expected.popleft()
        self.counters["received"] += 1

    def rearm(self, queue: int) -> None:
        """Arm queue pair ``queue``'s interrupt again (INTENA), as iavf does after polling."""
        vector = self.pairs[queue].vector
        self._write(r.vfint_dyn_ctln(vector - 1), r.DYN_CTL_INTENA | r.DYN_CTL_ITR_NONE)

    def _write(self, offset: int, value: int) -> None:
        self.device.write(r.BAR0, offset, value.to_bytes(4, "little"))

    # -- the workload interface ----------------------------------------------------------

    def run(self) -> int:
        """One slice of guest time: send a few packets on random pairs, clean, refill, re-arm;
        with ``cpu_pages_per_slice``, also write that many random application pages."""
        sent = 0
        for _ in range(self.packets_per_slice):
            queue = self.rng.randrange(len(self.pairs))
            length = self.rng.choice((64, 128, 512, 1500, 1500, 4000, 9000))
            sent += self.send(queue, length)
        for pair in self.pairs:
            self.clean(pair.index)
            self.post_rx(pair.index)
            self.rearm(pair.index)
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
        moved.counters = dict(self.counters)
        moved.rng = random.Random(self.rng.random())
        moved._connect_interrupts()
        return moved

    def stats(self) -> dict[str, int]:
        """Packets sent, received (checked), dropped, corrupt; interrupts; sends refused."""
        return dict(self.counters)


def workload(device: Device, memory: memoryview, iova: int, *, seed: int = 0) -> Guest:
    """The ``vfio_mediate.workloads`` entry point for ``i40e-vf``: a guest that keeps four
    queue pairs busy with looping traffic and also writes some application memory."""
    return Guest(device, memory, iova, seed=seed, cpu_pages_per_slice=4)
