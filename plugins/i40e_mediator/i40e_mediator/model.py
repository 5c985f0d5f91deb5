"""A software model of the X710 VF (8086:154c) that does real DMA and speaks virtchnl.

The core's emulated PCI function does config space, BAR memory and MSI-X from ``spec()``; the
``I40eVf`` object returned by ``create()`` is the VF's behaviour (see ``registers`` for the map):

- **Admin queue and PF.** The VF asks its PF for everything over virtchnl through the admin
  queue (``adminq.AdminQueue``); the model plays the PF (``pf.PfResponder``), as iavf expects.
  A request is served within the ATQT write that posts it, and its reply is in the ARQ when
  the write returns.
- **Switch port.** The VF is a port of the serving process's switch (``switch.SWITCH``): its
  default MAC is the port's, its receive filters are what ADD_ETH_ADDR / DEL_ETH_ADDR /
  CONFIG_PROMISCUOUS_MODE said, the frames it transmits go to ``port.transmit`` and frames for
  it arrive through ``deliver``.
- **TX.** A TX tail write (on a started queue) makes the device walk the descriptors from its
  head to the tail: context descriptors (TSO, MSS) and data descriptors up to EOP, the buffers
  gathered, checksums inserted and TSO segmented (``offload.tx_offload``), each frame padded
  to 60 bytes and transmitted; every RS descriptor gets DTYPE DESC_DONE written back, then the
  queue's TX vector is signalled. A malformed descriptor stops the queue (as the X710's
  malicious driver detection does), counted in ``tx_errors`` and logged; an offload request
  that does not fit its frame drops only that packet, counted and logged.
- **RX.** A delivered frame goes to RX queue 0 (RSS is not modelled): into the posted buffers
  from the device's head (32-byte legacy descriptors, ``databuffer_size`` bytes each, at most
  five), the data first, then each descriptor's write-back (DD, EOF on the last, length), then
  the queue's RX vector is signalled. No buffer, a stopped queue, or a frame above
  ``max_pkt_size`` counts ``rx_discards``. The RX tail is read from BAR memory (mapped: the
  device looks when it has a frame).
- **Interrupts.** Per vector, INTENA in VFINT_DYN_CTLN1/DYN_CTL01 arms it; a cause fires an armed
  vector and disarms it (auto-mask), or is held pending until software arms it again. Vector 0
  carries the admin queue: a message on the ARQ sets VFINT_ICR01's ADMINQ cause (cleared when
  read) and signals vector 0 if VFINT_ICR0_ENA1 enables that cause.
- **Reset.** VFGEN_RSTAT reads VFACTIVE (2) when operational. RESET_VF and a function reset
  (VFIO reset) stop every queue and forget contexts, vector maps, every BAR0 register
  (the admin queue's among them: ARQLEN.ENABLE reads 0, which is how iavf sees the reset),
  waiting admin messages and every filter but the default MAC; RSTAT then reads COMPLETED (1)
  once, then VFACTIVE. A function reset also forgets the negotiated virtchnl version.
  CONFIG_VSI_QUEUES forgets the queue's TX tail: a tail written before the ring was
  configured (iavf writes one between RESET_VF and CONFIG_VSI_QUEUES) is never served.
- **Mapped and trapped pages.** A page is trapped exactly when it holds a register whose access
  must act at once (derived from the handler tables): the TX tail page, the interrupt control
  pages, the admin queue pages (ATQT/ARQT/ATQLEN/ARQLEN) and the VFGEN_RSTAT page.
- **Migration.** ``quiesce``/``resume`` stop and restart all DMA and interrupts (tail writes
  are latched meanwhile, frames for the VF dropped uncounted); ``snapshot``/``restore`` save
  and load a ``state.VfState``: registers, queues, vectors, MSI-X, admin queue messages, the
  virtchnl negotiation, the switch-port filters and the statistics.

Like the real VF it cannot say which pages it wrote; only the DMA space can record that.
"""

from __future__ import annotations

import bisect
import functools
import logging
import threading
import weakref
from collections.abc import Callable
from typing import Any, Protocol, final

from . import registers as r
from .adminq import AdminQueue, Message
from .offload import tx_offload
from .pf import PfResponder, PortState
from .ports import attach_port
from .state import QueueState, VfState
from .switch import SWITCH, Switch

__all__ = ["MODEL_NAME", "I40eVf", "create", "spec"]

logger = logging.getLogger(__name__)

MODEL_NAME = "i40e-vf"

_ZERO_CHUNK = bytes(64)
_bisect_left = bisect.bisect_left
_MIN_FRAME = 60  # Ethernet's minimum without FCS
_BROADCAST = b"\xff" * 6

# virtchnl_eth_stats, in order.
RX_BYTES, RX_UNICAST, RX_MULTICAST, RX_BROADCAST, RX_DISCARDS, RX_UNKNOWN_PROTOCOL = range(6)
TX_BYTES, TX_UNICAST, TX_MULTICAST, TX_BROADCAST, TX_DISCARDS, TX_ERRORS = range(6, 12)
STATS_COUNT = 12


def spec() -> dict[str, Any]:
    """The VF's PCI function as plain data: BAR0 registers, BAR3 MSI-X."""
    return {
        "vendor_id": r.VENDOR_ID,
        "device_id": r.DEVICE_ID,
        "class_code": r.CLASS_ETHERNET,
        "subsystem_vendor_id": r.VENDOR_ID,
        "subsystem_id": 0x0000,
        "revision": r.REVISION,
        "bars": [
            {"index": r.BAR0, "size": r.BAR0_SIZE, "kind": "mem64", "prefetchable": True},
            {"index": r.MSIX_BAR, "size": r.BAR3_SIZE, "kind": "mem64", "prefetchable": True},
        ],
        "msix": {
            "vectors": r.MSIX_VECTORS,
            "table_bar": r.MSIX_BAR,
            "table_offset": r.MSIX_TABLE_OFFSET,
            "pba_bar": r.MSIX_BAR,
            "pba_offset": r.MSIX_PBA_OFFSET,
        },
    }


def create() -> tuple[dict[str, Any], I40eVf]:
    """The ``vfio_mediate.devices`` factory: the spec and the VF's behaviour, a port of the
    process's switch."""
    return spec(), I40eVf()


class Bus(Protocol):
    """What the core hands the model at ``attach`` (its ``DeviceBus``)."""

    @property
    def dma(self) -> Any:
        """The DMA space: ``read(iova, length)``, ``write(iova, data)``."""

    @property
    def bus_master(self) -> bool:
        """Whether the command register allows DMA."""

    def bar(self, index: int) -> memoryview:
        """BAR memory."""

    def raise_msix(self, vector: int) -> None:
        """Raise an MSI-X vector."""


class _MalformedTx(Exception):
    """A TX descriptor the hardware would flag (malicious driver detection)."""


class _Queue:
    """The live state of one queue pair."""

    __slots__ = (
        "error",
        "generation",
        "index",
        "max_pkt",
        "rx_base",
        "rx_buf_size",
        "rx_bytes",
        "rx_discards",
        "rx_enabled",
        "rx_head",
        "rx_len",
        "rx_packets",
        "rx_vector",
        "tx_base",
        "tx_bytes",
        "tx_enabled",
        "tx_head",
        "tx_len",
        "tx_packets",
        "tx_vector",
    )

    def __init__(self, index: int, vector: int, generation: int) -> None:
        self.index = index
        self.generation = generation
        self.load(QueueState(rx_vector=vector, tx_vector=vector))

    def load(self, state: QueueState) -> None:
        """Take every field of ``state`` (tails are registers, not kept here)."""
        self.tx_base, self.tx_len, self.tx_head = state.tx_base, state.tx_len, state.tx_head
        self.rx_base, self.rx_len, self.rx_head = state.rx_base, state.rx_len, state.rx_head
        self.rx_buf_size, self.max_pkt = state.rx_buf_size, state.max_pkt_size
        self.rx_vector, self.tx_vector = state.rx_vector, state.tx_vector
        self.rx_enabled, self.tx_enabled, self.error = (
            state.rx_enabled,
            state.tx_enabled,
            state.error,
        )
        self.tx_packets, self.tx_bytes = state.tx_packets, state.tx_bytes
        self.rx_packets, self.rx_bytes = state.rx_packets, state.rx_bytes
        self.rx_discards = state.rx_discards

    def state(self, tx_tail: int, rx_tail: int) -> QueueState:
        """The queue as saved state."""
        return QueueState(
            tx_base=self.tx_base,
            tx_len=self.tx_len,
            tx_head=self.tx_head,
            tx_tail=tx_tail,
            rx_base=self.rx_base,
            rx_len=self.rx_len,
            rx_buf_size=self.rx_buf_size,
            max_pkt_size=self.max_pkt,
            rx_head=self.rx_head,
            rx_tail=rx_tail,
            rx_vector=self.rx_vector,
            tx_vector=self.tx_vector,
            rx_enabled=self.rx_enabled,
            tx_enabled=self.tx_enabled,
            error=self.error,
            tx_packets=self.tx_packets,
            tx_bytes=self.tx_bytes,
            rx_packets=self.rx_packets,
            rx_bytes=self.rx_bytes,
            rx_discards=self.rx_discards,
        )


def _any_within(offsets: tuple[int, ...], start: int, end: int) -> bool:
    """Whether the sorted ``offsets`` hold one in ``[start, end)``."""
    at = _bisect_left(offsets, start)
    return at < len(offsets) and offsets[at] < end


def _weak_deliver(vf: I40eVf) -> Callable[[bytes], None]:
    """A ``deliver`` for the switch that does not keep ``vf`` alive."""
    ref = weakref.ref(vf)

    def deliver(frame: bytes) -> None:
        target = ref()
        if target is not None:
            target.deliver(frame)

    return deliver


@final
class I40eVf:
    """The behaviour of one emulated X710 VF (see the module docstring)."""

    def __init__(
        self,
        queue_pairs: int = r.NUM_QUEUE_PAIRS,
        vectors: int = r.MSIX_VECTORS,
        *,
        switch: Switch = SWITCH,
    ) -> None:
        if not 1 <= queue_pairs <= r.MAX_QUEUES or vectors < 2:
            raise ValueError(f"{queue_pairs} queue pairs / {vectors} vectors is not a VF")
        self.queue_pairs = queue_pairs
        self.vectors = vectors
        self._lock = threading.RLock()
        self._bus: Bus | None = None
        self._regs = memoryview(bytearray(r.BAR0_SIZE))
        self._msix = memoryview(bytearray(r.BAR3_SIZE))
        self._queues = [_Queue(q, self.default_vector(q), 0) for q in range(queue_pairs)]
        self._armed = [False] * vectors
        self._pending = [False] * vectors
        self._running = True
        self._rstat = r.VFR_VFACTIVE
        self.stats = [0] * STATS_COUNT
        self.port = attach_port(switch, self, _weak_deliver(self))
        self.name = f"i40e-vf port {self.port.number}"
        self.aq = AdminQueue(self)
        self.pf = PfResponder(self, self.port.mac)
        self._tails = frozenset(
            offset for q in range(queue_pairs) for offset in (r.qtx_tail(q), r.qrx_tail(q))
        )
        writers: dict[int, Callable[[int], None]] = {
            r.VF_ATQT: self.aq.write_atq_tail,
            r.VF_ARQT: self.aq.write_arq_tail,
            r.VF_ATQLEN: self.aq.write_atq_len,
            r.VF_ARQLEN: self.aq.write_arq_len,
        }
        readers: dict[int, Callable[[], int]] = {
            r.VFGEN_RSTAT: self._read_rstat,
            r.VFINT_ICR01: self._read_icr0,
        }
        for q in range(queue_pairs):
            writers[r.qtx_tail(q)] = functools.partial(self._write_tx_tail, q)
        writers[r.VFINT_DYN_CTL01] = functools.partial(
            self._write_dyn_ctl, r.ADMIN_VECTOR, r.VFINT_DYN_CTL01
        )
        for n in range(vectors - 1):
            writers[r.vfint_dyn_ctln(n)] = functools.partial(
                self._write_dyn_ctl, n + 1, r.vfint_dyn_ctln(n)
            )
        self._writers = writers
        self._readers = readers
        # Sorted, for the multi-register accesses' "any register here?" (a bisection, not a walk).
        self._writer_offsets = tuple(sorted(writers))
        self._reader_offsets = tuple(sorted(readers))
        self.trapped_pages = frozenset(
            offset & ~(r.PAGE_SIZE - 1) for offset in (*writers, *readers)
        )

    def default_vector(self, queue: int) -> int:
        """The vector a queue pair uses until CONFIG_IRQ_MAP says otherwise (iavf's spread)."""
        return 1 + queue % (self.vectors - 1)

    # -- the core's model interface ---------------------------------------------------------

    def attach(self, bus: Bus) -> None:
        """Take the bus: DMA space, BAR memory, MSI-X."""
        self._bus = bus
        self._regs = bus.bar(r.BAR0)
        self._msix = bus.bar(r.MSIX_BAR)

    def mmap_areas(self, bar: int) -> list[tuple[int, int]] | None:
        """BAR0: every page but the trapped ones; BAR3: the core's choice (MSI-X trapped)."""
        if bar != r.BAR0:
            return None
        areas: list[tuple[int, int]] = []
        for page in range(0, r.BAR0_SIZE, r.PAGE_SIZE):
            if page in self.trapped_pages:
                continue
            if areas and sum(areas[-1]) == page:
                areas[-1] = (areas[-1][0], areas[-1][1] + r.PAGE_SIZE)
            else:
                areas.append((page, r.PAGE_SIZE))
        return areas

    def computed_reads(self, bar: int) -> list[tuple[int, int]]:
        """The registers whose reads are computed (the rest of BAR0 reads its memory)."""
        if bar != r.BAR0:
            return []
        return [(offset, r.REGISTER_SIZE) for offset in self._reader_offsets]

    def bar_read(self, bar: int, offset: int, count: int) -> bytes | None:
        """A register read: computed for the registers that have a reader, else memory."""
        if bar != r.BAR0:
            return None
        if count == r.REGISTER_SIZE and not offset & 3:
            reader = self._readers.get(offset)
            if reader is None:
                return None
            with self._lock:
                return reader().to_bytes(4, "little")
        start, end = offset & ~3, (offset + count + 3) & ~3
        readers = self._reader_offsets
        at = _bisect_left(readers, start)  # the hot case, inlined: no register in the range
        if at == len(readers) or readers[at] >= end:
            return None
        with self._lock:
            merged = bytearray(self._regs[start:end])
            for at in range(start, end, 4):
                reader = self._readers.get(at)
                if reader is not None:
                    merged[at - start : at - start + 4] = reader().to_bytes(4, "little")
        return bytes(merged[offset - start : offset - start + count])

    def bar_write(self, bar: int, offset: int, data: bytes) -> bool:
        """A register write: acted on for the registers that have a writer (which store what
        reads back), else left to the core to store."""
        if bar != r.BAR0:
            return False
        if len(data) == r.REGISTER_SIZE and not offset & 3:
            writer = self._writers.get(offset)
            if writer is None:
                return False
            with self._lock:
                writer(int.from_bytes(data, "little"))
            return True
        start, end = offset & ~3, (offset + len(data) + 3) & ~3
        if not _any_within(self._writer_offsets, start, end):
            return False
        with self._lock:
            merged = bytearray(self._regs[start:end])
            merged[offset - start : offset - start + len(data)] = data
            for at in range(start, end, 4):
                value = merged[at - start : at - start + 4]
                writer = self._writers.get(at)
                if writer is None:
                    self._regs[at : at + 4] = value
                else:
                    writer(int.from_bytes(value, "little"))
        return True

    def reset(self) -> None:
        """Function reset (the core has cleared BAR memory): a VF reset that also forgets the
        negotiated virtchnl version; the device runs."""
        with self._lock:
            self.pf.forget_version()
            self.reset_vf()
            self._running = True

    # -- what the PF configures (called by ``pf.PfResponder``, lock held) ---------------------

    def check_queue(
        self,
        queue: int,
        tx_base: int,
        tx_len: int,
        rx_base: int,
        rx_len: int,
        buf_size: int,
        max_pkt: int,
    ) -> None:
        """``ValueError`` naming what a queue pair context breaks: ring alignment or length,
        buffer or packet size, a ring the device cannot reach by DMA."""
        for name, base, length, size in (
            ("TX", tx_base, tx_len, r.TX_DESC.size),
            ("RX", rx_base, rx_len, r.RX_DESC.size),
        ):
            if base % r.RING_ALIGN:
                raise ValueError(
                    f"queue {queue}: {name} ring {base:#x} is not {r.RING_ALIGN}-byte aligned"
                )
            if not r.RING_LEN_MIN <= length <= r.RING_LEN_MAX or length % r.RING_LEN_MULTIPLE:
                raise ValueError(
                    f"queue {queue}: {name} ring length {length} is not a multiple of "
                    f"{r.RING_LEN_MULTIPLE} in {r.RING_LEN_MIN}..{r.RING_LEN_MAX}"
                )
            try:
                self._dma().read(base, length * size)
            except OSError as exc:
                raise ValueError(
                    f"queue {queue}: {name} ring at {base:#x} is outside DMA memory ({exc})"
                ) from exc
        if not r.RX_BUF_UNIT <= buf_size <= r.RX_BUF_MAX:
            raise ValueError(
                f"queue {queue}: RX buffer size {buf_size} is outside "
                f"{r.RX_BUF_UNIT}..{r.RX_BUF_MAX}"
            )
        if not r.RX_PKT_MIN <= max_pkt <= r.RX_PKT_MAX:
            raise ValueError(
                f"queue {queue}: largest RX packet {max_pkt} is outside "
                f"{r.RX_PKT_MIN}..{r.RX_PKT_MAX}"
            )

    def configure_queue(
        self,
        queue: int,
        tx_base: int,
        tx_len: int,
        rx_base: int,
        rx_len: int,
        buf_size: int,
        max_pkt: int,
    ) -> None:
        """Latch queue pair ``queue``'s context (checked by ``check_queue``): the pair stops,
        both heads go to 0, the TX tail is forgotten (the RX tail stays: iavf posts buffers
        first)."""
        state = self._queues[queue]
        state.tx_base, state.tx_len, state.tx_head = tx_base, tx_len, 0
        state.rx_base, state.rx_len, state.rx_head = rx_base, rx_len, 0
        state.rx_buf_size = buf_size - buf_size % r.RX_BUF_UNIT  # the X710 counts 128-byte units
        state.max_pkt = max_pkt
        state.rx_enabled = state.tx_enabled = state.error = False
        state.generation += 1
        self.put(r.qtx_tail(queue), 0)

    def map_vector(self, vector: int, rx_queues: int, tx_queues: int) -> None:
        """Signal the queues of the ``rx_queues``/``tx_queues`` bitmaps on ``vector``."""
        for queue in self._queues:
            if rx_queues >> queue.index & 1:
                queue.rx_vector = vector
            if tx_queues >> queue.index & 1:
                queue.tx_vector = vector

    def set_queues_enabled(self, rx_queues: int, tx_queues: int, enabled: bool) -> None:
        """Start or stop the queues of two bitmaps; a started TX queue serves its tail at once.
        ``ValueError`` (nothing changed) for a queue that does not exist or, to start, has no
        context."""
        if (rx_queues | tx_queues) >> self.queue_pairs or not rx_queues | tx_queues:
            raise ValueError(
                f"queues rx {rx_queues:#x} / tx {tx_queues:#x}: the VF has {self.queue_pairs}"
            )
        chosen = [q for q in self._queues if (rx_queues | tx_queues) >> q.index & 1]
        if enabled:
            for queue in chosen:
                if not (queue.tx_len and queue.rx_len):
                    raise ValueError(f"queue pair {queue.index} has no context to start")
        for queue in chosen:
            if rx_queues >> queue.index & 1:
                queue.rx_enabled = enabled
            if tx_queues >> queue.index & 1:
                queue.tx_enabled = enabled
                if enabled and self.can_dma():
                    self._process_tx(queue)

    def apply_filters(self, port: PortState) -> None:
        """Hand the VF's receive filters to its switch port."""
        self.port.set_filters(
            port.unicast,
            port.multicast,
            promiscuous=port.promiscuous,
            all_multicast=port.all_multicast,
        )

    def reset_vf(self) -> None:
        """RESET_VF (after its descriptor is complete): in progress, everything forgotten, then
        COMPLETED; RSTAT reads VFACTIVE after that."""
        self._rstat = r.VFR_INPROGRESS
        self._queues = [
            _Queue(q.index, self.default_vector(q.index), q.generation + 1) for q in self._queues
        ]
        self._armed = [False] * self.vectors
        self._pending = [False] * self.vectors
        self._regs[:] = bytes(r.BAR0_SIZE)
        self.aq.clear()
        self.pf.reset()
        self._rstat = r.VFR_COMPLETED

    # -- the admin queue's host (``adminq.AqHost``, lock held) --------------------------------

    def get(self, offset: int) -> int:
        """A BAR0 register."""
        return int.from_bytes(self._regs[offset : offset + 4], "little")

    def put(self, offset: int, value: int) -> None:
        """Set a BAR0 register."""
        self._regs[offset : offset + 4] = value.to_bytes(4, "little")

    def dma_read(self, iova: int, length: int) -> bytes:
        """Read guest memory."""
        return bytes(self._dma().read(iova, length))

    def dma_write(self, iova: int, data: bytes) -> None:
        """Write guest memory."""
        self._dma().write(iova, data)

    def can_dma(self) -> bool:
        """Whether the device may do DMA now: running, bus master."""
        bus = self._bus
        return self._running and bus is not None and bus.bus_master

    def virtchnl_request(self, opcode: int, payload: bytes) -> bool:
        """A VF request from the admin send queue, for the PF."""
        return self.pf.request(opcode, payload)

    def admin_event(self) -> None:
        """An ARQ message was written: the ADMINQ cause, and vector 0 if it is enabled."""
        self.put(r.VFINT_ICR01, self.get(r.VFINT_ICR01) | r.ICR0_ADMINQ)
        if self.get(r.VFINT_ICR0_ENA1) & r.ICR0_ADMINQ:
            self._signal(r.ADMIN_VECTOR)

    def _dma(self) -> Any:
        if self._bus is None:
            raise OSError("the VF is not attached to a bus")
        return self._bus.dma

    # -- migration and the PF's view --------------------------------------------------------

    def quiesce(self) -> None:
        """Stop all DMA and interrupts; register writes are latched until ``resume``."""
        with self._lock:
            self._running = False

    def resume(self) -> None:
        """Run again: serve every tail that moved meanwhile, deliver held messages and
        interrupts."""
        with self._lock:
            self._running = True
            self._catch_up()

    @property
    def running(self) -> bool:
        """Whether the device may do DMA and raise interrupts (not quiesced)."""
        return self._running

    def queue_view(self, queue: int) -> tuple[int, QueueState]:
        """The PF's view of queue pair ``queue``: its context generation (changes whenever the
        context is latched, reset or restored) and its state, read atomically."""
        with self._lock:
            state = self._queues[queue]
            return state.generation, state.state(
                self.get(r.qtx_tail(queue)), self.get(r.qrx_tail(queue))
            )

    def snapshot(self) -> VfState:
        """The VF's whole state."""
        with self._lock:
            regs, found = self._regs, []
            for chunk in range(0, r.BAR0_SIZE, len(_ZERO_CHUNK)):
                if regs[chunk : chunk + len(_ZERO_CHUNK)] == _ZERO_CHUNK:
                    continue
                for at in range(chunk, chunk + len(_ZERO_CHUNK), 4):
                    value = self.get(at)
                    if value and at not in self._tails:
                        found.append((at, value))
            table_size = self.vectors * r.MSIX_ENTRY_SIZE
            port = self.pf.port
            return VfState(
                queue_pairs=self.queue_pairs,
                vectors=self.vectors,
                rstat=self._rstat,
                registers=tuple(found),
                queues=tuple(
                    q.state(self.get(r.qtx_tail(q.index)), self.get(r.qrx_tail(q.index)))
                    for q in self._queues
                ),
                armed=tuple(self._armed),
                pending=tuple(self._pending),
                msix_table=bytes(self._msix[r.MSIX_TABLE_OFFSET : table_size]),
                msix_pba=bytes(self._msix[r.MSIX_PBA_OFFSET : r.MSIX_PBA_OFFSET + self._pba_size]),
                admin_messages=tuple(self.aq.pending),
                api_minor=self.pf.api_minor,
                caps=self.pf.caps,
                mac=port.mac,
                unicast=tuple(port.unicast),
                multicast=tuple(port.multicast),
                promiscuous=port.promiscuous,
                all_multicast=port.all_multicast,
                stats=tuple(self.stats),
            )

    def restore(self, state: VfState) -> None:
        """Load ``state`` (taken from a VF of the same shape); ``ValueError`` if it does not fit.

        The VF takes the saved MAC and filters on its own switch port. Nothing is served until
        ``resume``: a restored device is quiesced.
        """
        self._check_fits(state)
        port = PortState(
            state.mac,
            list(state.unicast),
            list(state.multicast),
            state.promiscuous,
            state.all_multicast,
        )
        self.apply_filters(port)  # refuses addresses of the wrong kind before anything changes
        with self._lock:
            self._running = False
            self._regs[:] = bytes(r.BAR0_SIZE)
            for offset, value in state.registers:
                self.put(offset, value)
            for queue, saved in zip(self._queues, state.queues, strict=True):
                queue.load(saved)
                queue.generation += 1
                self.put(r.qtx_tail(queue.index), saved.tx_tail)
                self.put(r.qrx_tail(queue.index), saved.rx_tail)
            self._armed[:] = state.armed
            self._pending[:] = state.pending
            table = r.MSIX_TABLE_OFFSET
            self._msix[table : table + len(state.msix_table)] = state.msix_table
            self._msix[r.MSIX_PBA_OFFSET : r.MSIX_PBA_OFFSET + len(state.msix_pba)] = state.msix_pba
            self._rstat = state.rstat
            self.aq.pending.clear()
            self.aq.pending.extend(Message(*message) for message in state.admin_messages)
            self.pf.api_minor, self.pf.caps, self.pf.port = state.api_minor, state.caps, port
            self.stats[:] = state.stats

    def _check_fits(self, state: VfState) -> None:
        if state.queue_pairs != self.queue_pairs or state.vectors != self.vectors:
            raise ValueError(
                f"the state is of a VF with {state.queue_pairs} queue pairs and {state.vectors} "
                f"vectors, this VF has {self.queue_pairs} and {self.vectors}"
            )
        if (
            len(state.msix_table) != self.vectors * r.MSIX_ENTRY_SIZE
            or len(state.msix_pba) != self._pba_size
        ):
            raise ValueError("the state's MSI-X table or PBA does not fit this VF")
        if state.rstat not in (r.VFR_COMPLETED, r.VFR_VFACTIVE):
            raise ValueError(f"VFGEN_RSTAT state {state.rstat} cannot be restored")
        if len(state.stats) != STATS_COUNT or len(state.mac) != 6 or state.mac[0] & 1:
            raise ValueError("the state's statistics or MAC address are malformed")
        for offset, _ in state.registers:
            if offset % 4 or not 0 <= offset < r.BAR0_SIZE or offset in self._tails:
                raise ValueError(f"register offset {offset:#x} is not a register of BAR0")
        for index, queue in enumerate(state.queues):
            positions = (
                (queue.tx_head, queue.tx_len),
                (queue.rx_head, queue.rx_len),
            )
            vectors = (queue.rx_vector, queue.tx_vector)
            if any(length and head >= length for head, length in positions) or not all(
                1 <= vector < self.vectors for vector in vectors
            ):
                raise ValueError(f"queue pair {index}'s saved positions or vectors are invalid")

    @property
    def _pba_size(self) -> int:
        return 8 * -(-self.vectors // 64)

    # -- register handlers (called with the lock held) --------------------------------------

    def _write_tx_tail(self, queue: int, value: int) -> None:
        self.put(r.qtx_tail(queue), value & r.TAIL_MASK)
        if self.can_dma():
            self._process_tx(self._queues[queue])

    def _write_dyn_ctl(self, vector: int, offset: int, value: int) -> None:
        self.put(offset, value & ~r.DYN_CTL_ACTIONS)
        if value & r.DYN_CTL_CLEARPBA:
            self._pending[vector] = False
        if value & r.DYN_CTL_SWINT_TRIG:
            self._pending[vector] = True
        self._armed[vector] = bool(value & r.DYN_CTL_INTENA)
        if self._armed[vector] and self._pending[vector]:
            self._fire(vector)

    def _read_rstat(self) -> int:
        shown = self._rstat
        self._rstat = r.VFR_VFACTIVE
        return shown

    def _read_icr0(self) -> int:
        value = self.get(r.VFINT_ICR01)
        self.put(r.VFINT_ICR01, 0)
        return value

    # -- interrupts ----------------------------------------------------------------------

    def _signal(self, vector: int) -> None:
        self._pending[vector] = True
        if self._armed[vector]:
            self._fire(vector)

    def _fire(self, vector: int) -> None:
        if not self._running or self._bus is None:
            return  # held pending until the device runs again
        self._armed[vector] = self._pending[vector] = False
        self._bus.raise_msix(vector)

    def _catch_up(self) -> None:
        if not self.can_dma():
            return
        for queue in self._queues:
            if queue.tx_enabled and self.get(r.qtx_tail(queue.index)) != queue.tx_head:
                self._process_tx(queue)
        self.aq.process_send_queue()
        self.aq.deliver()
        for vector in range(self.vectors):
            if self._armed[vector] and self._pending[vector]:
                self._fire(vector)

    # -- the data path -------------------------------------------------------------------

    def _process_tx(self, queue: _Queue) -> None:
        """Serve queue pair ``queue``'s TX ring from head to tail onto the switch."""
        tail = self.get(r.qtx_tail(queue.index))
        length = queue.tx_len
        if not queue.tx_enabled or tail >= length or tail == queue.tx_head:
            return
        dma = self._dma()
        head = queue.tx_head
        count = (tail - head) % length
        sent = 0
        try:
            ring = self._read_ring(queue.tx_base, length, r.TX_DESC.size, head, count)
            taken = 0
            while taken < count:
                used, fragments, completions, offload = self._gather(
                    ring, head + taken, taken, count, length
                )
                if not used:
                    break  # the packet's last descriptor is not posted yet
                packet = b"".join([dma.read(addr, size) for addr, size in fragments if size])
                self._transmit(queue, packet, offload)
                for slot in completions:
                    dma.write(
                        queue.tx_base + slot * r.TX_DESC.size + r.TX_QWORD1_OFFSET, r.TX_DESC_DONE
                    )
                taken += used
                queue.tx_head = (head + taken) % length
                queue.tx_packets += 1
                queue.tx_bytes += len(packet)
                sent += 1
        except _MalformedTx as exc:
            self.stats[TX_ERRORS] += 1
            self._fault(queue, exc)
        except OSError as exc:
            self._fault(queue, exc)
        if sent:
            self._signal(queue.tx_vector)

    @staticmethod
    def _gather(
        ring: bytes, first_slot: int, taken: int, count: int, length: int
    ) -> tuple[int, list[tuple[int, int]], list[int], tuple[int, int, int]]:
        """One packet: the descriptors it uses (0: incomplete), its fragments, its RS slots,
        and its offload request (the first data descriptor's qword1, the context's TSO MSS
        or 0, the TSO length)."""
        fragments: list[tuple[int, int]] = []
        completions: list[int] = []
        first_qword1 = mss = tso_len = 0
        limit = r.TX_MAX_FRAGMENTS
        for used in range(1, count - taken + 1):
            slot = (first_slot + used - 1) % length
            addr, qword1 = r.TX_DESC.unpack_from(ring, (taken + used - 1) * r.TX_DESC.size)
            dtype = qword1 & r.TX_DTYPE_MASK
            cmd = qword1 >> r.TX_CMD_SHIFT
            if dtype == r.TX_DTYPE_CONTEXT:
                if fragments:
                    raise _MalformedTx(f"TX context descriptor {slot} inside a packet")
                if cmd & r.TX_CTX_CMD_TSO:
                    mss = (qword1 >> r.TX_CTX_MSS_SHIFT) & r.TX_CTX_MSS_MASK
                    tso_len = (qword1 >> r.TX_CTX_TSO_LEN_SHIFT) & r.TX_CTX_TSO_LEN_MASK
                    limit = r.TX_MAX_TSO_FRAGMENTS
                if cmd & r.TX_CMD_RS:
                    completions.append(slot)
                continue
            if dtype != r.TX_DTYPE_DATA:
                raise _MalformedTx(f"TX descriptor {slot} has type {dtype:#x}")
            if not fragments:
                first_qword1 = qword1
            fragments.append((addr, (qword1 >> r.TX_BUF_SIZE_SHIFT) & r.TX_BUF_SIZE_MASK))
            if len(fragments) > limit:
                raise _MalformedTx(f"a packet spans more than {limit} TX data descriptors")
            if cmd & r.TX_CMD_RS:
                completions.append(slot)
            if cmd & r.TX_CMD_EOP:
                return used, fragments, completions, (first_qword1, mss, tso_len)
        return 0, [], [], (0, 0, 0)

    def _transmit(self, queue: _Queue, packet: bytes, offload: tuple[int, int, int]) -> None:
        """Put one packet on the switch: offloads done, padded, counted."""
        qword1, mss, tso_len = offload
        cmd = qword1 >> r.TX_CMD_SHIFT
        l3_type = (cmd >> r.TX_CMD_IIPT_SHIFT) & r.TX_CMD_IIPT_MASK
        l4_type = (cmd >> r.TX_CMD_L4T_SHIFT) & r.TX_CMD_L4T_MASK
        frames = [packet]
        if mss or l4_type or l3_type == r.TX_IIPT_IPV4_CSUM:
            offsets = qword1 >> r.TX_OFFSET_SHIFT
            try:
                frames = tx_offload(
                    packet,
                    maclen=2 * (offsets & r.TX_MACLEN_MASK),
                    iplen=4 * ((qword1 >> r.TX_IPLEN_SHIFT) & r.TX_IPLEN_MASK),
                    l4len=4 * ((qword1 >> r.TX_L4LEN_SHIFT) & r.TX_L4LEN_MASK),
                    l3_type=l3_type,
                    l4_type=l4_type,
                    tso=bool(mss),
                    mss=mss,
                    checksum=True,
                )
            except ValueError as exc:
                self.stats[TX_ERRORS] += 1
                if logger.isEnabledFor(logging.WARNING):
                    logger.warning(
                        "%s: TX queue %d packet of %d bytes dropped (TSO length %d): %s",
                        self.name,
                        queue.index,
                        len(packet),
                        tso_len,
                        exc,
                    )
                return
        stats = self.stats
        for frame in frames:
            if len(frame) < _MIN_FRAME:
                frame = frame.ljust(_MIN_FRAME, b"\0")
            stats[TX_BYTES] += len(frame)
            if not frame[0] & 1:
                stats[TX_UNICAST] += 1
            elif frame[:6] == _BROADCAST:
                stats[TX_BROADCAST] += 1
            else:
                stats[TX_MULTICAST] += 1
            self.port.transmit(frame)

    def deliver(self, frame: bytes) -> None:
        """A frame from the switch (its filters accepted it) for RX queue 0."""
        with self._lock:
            if not self._running:
                return  # a stopped VF's state must not change: the switch drops the frame
            queue = self._queues[0]
            if not (queue.rx_enabled and self.can_dma()):
                queue.rx_discards += 1
                self.stats[RX_DISCARDS] += 1
                return
            try:
                received = self._receive(queue, frame)
            except OSError as exc:
                self._fault(queue, exc)
                return
            if not received:
                queue.rx_discards += 1
                self.stats[RX_DISCARDS] += 1
                return
            stats = self.stats
            stats[RX_BYTES] += len(frame)
            if not frame[0] & 1:
                stats[RX_UNICAST] += 1
            elif frame[:6] == _BROADCAST:
                stats[RX_BROADCAST] += 1
            else:
                stats[RX_MULTICAST] += 1
            self._signal(queue.rx_vector)

    def _receive(self, queue: _Queue, packet: bytes) -> bool:
        """Write ``packet`` into the next posted RX buffers of ``queue``; ``False`` when it
        does not fit (too long, not enough buffers posted)."""
        tail = self.get(r.qrx_tail(queue.index)) & r.TAIL_MASK
        length, size, head = queue.rx_len, queue.rx_buf_size, queue.rx_head
        posted = (tail - head) % length if tail < length else 0
        needed = -(-len(packet) // size)
        if not packet or len(packet) > queue.max_pkt or not needed <= min(posted, r.RX_MAX_CHAIN):
            return False
        dma = self._dma()
        ring = self._read_ring(queue.rx_base, length, r.RX_DESC.size, head, needed)
        for piece in range(needed):
            slot = (head + piece) % length
            buffer = int.from_bytes(
                ring[piece * r.RX_DESC.size : piece * r.RX_DESC.size + 8], "little"
            )
            data = packet[piece * size : (piece + 1) * size]
            dma.write(buffer, data)  # the data first, the descriptor last
            dma.write(
                queue.rx_base + slot * r.RX_DESC.size,
                r.RX_DESC.pack(0, r.rx_writeback_qword1(len(data), piece == needed - 1), 0, 0),
            )
            queue.rx_head = (slot + 1) % length
        queue.rx_packets += 1
        queue.rx_bytes += len(packet)
        return True

    def _read_ring(self, base: int, length: int, size: int, start: int, count: int) -> bytes:
        dma = self._dma()
        first = min(count, length - start)
        data = dma.read(base + start * size, first * size)
        if count > first:
            data += dma.read(base, (count - first) * size)
        return bytes(data)

    def _fault(self, queue: _Queue, exc: Exception) -> None:
        """Stop a queue pair the way hardware does on a DMA fault or a malformed descriptor."""
        logger.warning("%s: queue pair %d stopped: %s", self.name, queue.index, exc)
        queue.rx_enabled = queue.tx_enabled = False
        queue.error = True
