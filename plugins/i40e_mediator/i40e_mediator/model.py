"""A software model of the X710 VF (8086:154c) that does real DMA.

The core's emulated PCI function does config space, BAR memory and MSI-X from ``spec()``; the
``I40eVf`` object returned by ``create()`` is the VF's behaviour (see ``registers`` for the map):

- **Queues.** Software gives queue pair ``q`` its rings through the queue-context window (a
  documented BAR0 page of this model) and so through plain region writes, which a VMM or a
  vfio-user client can make. The window calls ``configure_queue``/``map_queue_vector``/
  ``set_queue_enabled``, the methods a virtchnl CONFIG_VSI_QUEUES / CONFIG_IRQ_MAP /
  ENABLE_QUEUES handler will call too.
- **Data path.** A TX tail write makes the device read the TX descriptors and buffers from
  ``[head, tail)`` and loop each packet into the next posted RX buffers of the same pair: it
  writes the data, the RX write-back descriptors (DD, EOF, length) and the TX completion (DTYPE
  DESC_DONE into each RS descriptor), then raises the pair's MSI-X vector.
- **Interrupts.** Per vector, INTENA in VFINT_DYN_CTLN1/DYN_CTL01 arms it; a cause fires an armed
  vector and disarms it (auto-mask), or is held pending until software arms it again.
- **Reset.** VFGEN_RSTAT reads VFACTIVE (2) when operational. A function reset (VFIO reset) or a
  VF reset through ``EMU_RTRIG`` forgets every queue, interrupt and register; RSTAT then reads
  INPROGRESS (0) while a VF reset is held, COMPLETED (1) once, then VFACTIVE again.
- **Mapped and trapped pages.** A page is trapped exactly when it holds a register whose access
  must act at once (derived from the handler tables): the TX tail page (a tail write starts the
  DMA in the same call: deterministic, and the device work is in Python anyway, so polling a
  mapped doorbell would only add latency and a thread), the interrupt control pages, the
  VFGEN_RSTAT page and the queue-context window. Everything else is mapped, including the RX
  tail page: the device reads an RX tail from BAR memory only when it has a packet to deliver,
  the way a device polls a doorbell. (The mediator traps that page for dirty tracking.)
- **Migration.** ``quiesce``/``resume`` stop and restart all DMA and interrupts (tail writes
  are latched meanwhile); ``snapshot``/``restore`` save and load a ``state.VfState``.

Like the real VF it cannot say which pages it wrote; only the DMA space can record that.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol, final

from . import registers as r
from .state import QueueState, VfState

__all__ = ["MODEL_NAME", "I40eVf", "QueueConfig", "create", "spec"]

logger = logging.getLogger(__name__)

MODEL_NAME = "i40e-vf"

_ZERO_CHUNK = bytes(64)


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
    """The ``vfio_mediate.devices`` factory: the spec and the VF's behaviour."""
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


class QueueConfig(NamedTuple):
    """A queue pair's context: ring IOVAs and lengths (descriptors) and the RX buffer size."""

    tx_base: int
    tx_len: int
    rx_base: int
    rx_len: int
    rx_buf_size: int


class _MalformedTx(Exception):
    """A TX descriptor the hardware would flag (malicious driver detection)."""


class _Queue:
    """The live state of one queue pair."""

    __slots__ = (
        "enabled",
        "error",
        "generation",
        "index",
        "rx_base",
        "rx_buf_size",
        "rx_bytes",
        "rx_discards",
        "rx_head",
        "rx_len",
        "rx_packets",
        "tx_base",
        "tx_bytes",
        "tx_head",
        "tx_len",
        "tx_packets",
        "vector",
    )

    def __init__(self, index: int, vector: int, generation: int) -> None:
        self.index = index
        self.vector = vector
        self.generation = generation
        self.load(QueueState(vector=vector))

    def load(self, state: QueueState) -> None:
        """Take every field of ``state`` (tails are registers, not kept here)."""
        self.tx_base, self.tx_len, self.tx_head = state.tx_base, state.tx_len, state.tx_head
        self.rx_base, self.rx_len, self.rx_head = state.rx_base, state.rx_len, state.rx_head
        self.rx_buf_size, self.vector = state.rx_buf_size, state.vector
        self.enabled, self.error = state.enabled, state.error
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
            rx_head=self.rx_head,
            rx_tail=rx_tail,
            vector=self.vector,
            enabled=self.enabled,
            error=self.error,
            tx_packets=self.tx_packets,
            tx_bytes=self.tx_bytes,
            rx_packets=self.rx_packets,
            rx_bytes=self.rx_bytes,
            rx_discards=self.rx_discards,
        )


@final
class I40eVf:
    """The behaviour of one emulated X710 VF (see the module docstring)."""

    def __init__(self, queue_pairs: int = r.NUM_QUEUE_PAIRS, vectors: int = r.MSIX_VECTORS) -> None:
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
        self._reset_held = False
        self._rstat = r.VFR_VFACTIVE
        self._tails = frozenset(
            offset for q in range(queue_pairs) for offset in (r.qtx_tail(q), r.qrx_tail(q))
        )
        writers: dict[int, Callable[[int], None]] = {r.EMU_RTRIG: self._write_rtrig}
        readers: dict[int, Callable[[], int]] = {
            r.VFGEN_RSTAT: self._read_rstat,
            r.EMU_RTRIG: self._read_rtrig,
            r.EMU_QUEUE_PAIRS: lambda: self.queue_pairs,
        }
        for q in range(queue_pairs):
            writers[r.qtx_tail(q)] = functools.partial(self._write_tx_tail, q)
            writers[r.qctx(q, r.QCTX_CTL)] = functools.partial(self._write_queue_ctl, q)
            readers[r.qctx(q, r.QCTX_CTL)] = functools.partial(self._read_queue_ctl, q)
        writers[r.VFINT_DYN_CTL01] = functools.partial(
            self._write_dyn_ctl, r.ADMIN_VECTOR, r.VFINT_DYN_CTL01
        )
        for n in range(vectors - 1):
            writers[r.vfint_dyn_ctln(n)] = functools.partial(
                self._write_dyn_ctl, n + 1, r.vfint_dyn_ctln(n)
            )
        self._writers = writers
        self._readers = readers
        self.trapped_pages = frozenset(
            offset & ~(r.PAGE_SIZE - 1) for offset in (*writers, *readers)
        )

    def default_vector(self, queue: int) -> int:
        """The vector a queue pair uses unless told otherwise (iavf's spread)."""
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
        if not any(at in self._readers for at in range(start, end, 4)):
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
        if not any(at in self._writers for at in range(start, end, 4)):
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
        """Function reset (the core has cleared BAR memory): forget everything, report
        COMPLETED once through VFGEN_RSTAT, then VFACTIVE, and run."""
        with self._lock:
            self._reset_held = False
            self._forget_all()
            self._rstat = r.VFR_COMPLETED
            self._running = True

    # -- queue configuration (the window today, virtchnl later) ---------------------------

    def configure_queue(self, queue: int, config: QueueConfig) -> None:
        """Latch queue pair ``queue``'s context; the pair stops and both heads go to 0.

        ``ValueError`` names what the context breaks (what virtchnl answers ERR_PARAM to).
        """
        if not 0 <= queue < self.queue_pairs:
            raise ValueError(f"queue pair {queue} does not exist ({self.queue_pairs} pairs)")
        for name, base, length in (
            ("TX", config.tx_base, config.tx_len),
            ("RX", config.rx_base, config.rx_len),
        ):
            if base % r.RING_ALIGN:
                raise ValueError(f"{name} ring {base:#x} is not {r.RING_ALIGN}-byte aligned")
            if not r.RING_LEN_MIN <= length <= r.RING_LEN_MAX or length % r.RING_LEN_MULTIPLE:
                raise ValueError(
                    f"{name} ring length {length} is not a multiple of {r.RING_LEN_MULTIPLE} "
                    f"in {r.RING_LEN_MIN}..{r.RING_LEN_MAX}"
                )
        size = config.rx_buf_size
        if size % r.RX_BUF_UNIT or not r.RX_BUF_UNIT <= size <= r.RX_BUF_MAX:
            raise ValueError(
                f"RX buffer size {size} is not a multiple of {r.RX_BUF_UNIT} up to {r.RX_BUF_MAX}"
            )
        with self._lock:
            state = self._queues[queue]
            state.tx_base, state.tx_len, state.tx_head = config.tx_base, config.tx_len, 0
            state.rx_base, state.rx_len, state.rx_head = config.rx_base, config.rx_len, 0
            state.rx_buf_size = size
            state.enabled = state.error = False
            state.generation += 1

    def map_queue_vector(self, queue: int, vector: int) -> None:
        """Signal queue pair ``queue`` on MSI-X ``vector`` (a queue vector, not 0)."""
        if not 1 <= vector < self.vectors:
            raise ValueError(f"vector {vector} is not a queue vector (1..{self.vectors - 1})")
        with self._lock:
            self._queues[queue].vector = vector

    def set_queue_enabled(self, queue: int, enabled: bool) -> None:
        """Start or stop queue pair ``queue``; a started pair serves latched tails at once."""
        with self._lock:
            state = self._queues[queue]
            if enabled and not (state.tx_len and state.rx_len):
                raise ValueError(f"queue pair {queue} has no context to start")
            state.enabled = enabled
            if enabled and self._can_dma():
                self._process_tx(state)

    # -- migration and the PF's view --------------------------------------------------------

    def quiesce(self) -> None:
        """Stop all DMA and interrupts; register writes are latched until ``resume``."""
        with self._lock:
            self._running = False

    def resume(self) -> None:
        """Run again: serve every tail that moved meanwhile, deliver held interrupts."""
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
                self._get(r.qtx_tail(queue)), self._get(r.qrx_tail(queue))
            )

    def snapshot(self) -> VfState:
        """The VF's whole state."""
        with self._lock:
            regs, found = self._regs, []
            for chunk in range(0, r.BAR0_SIZE, len(_ZERO_CHUNK)):
                if regs[chunk : chunk + len(_ZERO_CHUNK)] == _ZERO_CHUNK:
                    continue
                for at in range(chunk, chunk + len(_ZERO_CHUNK), 4):
                    value = self._get(at)
                    if value and at not in self._tails:
                        found.append((at, value))
            table_size = self.vectors * r.MSIX_ENTRY_SIZE
            return VfState(
                queue_pairs=self.queue_pairs,
                vectors=self.vectors,
                reset_held=self._reset_held,
                rstat=self._rstat,
                registers=tuple(found),
                queues=tuple(
                    q.state(self._get(r.qtx_tail(q.index)), self._get(r.qrx_tail(q.index)))
                    for q in self._queues
                ),
                armed=tuple(self._armed),
                pending=tuple(self._pending),
                msix_table=bytes(self._msix[r.MSIX_TABLE_OFFSET : table_size]),
                msix_pba=bytes(self._msix[r.MSIX_PBA_OFFSET : r.MSIX_PBA_OFFSET + self._pba_size]),
            )

    def restore(self, state: VfState) -> None:
        """Load ``state`` (taken from a VF of the same shape); ``ValueError`` if it does not fit.

        Nothing is served until ``resume``: a restored device is quiesced.
        """
        self._check_fits(state)
        with self._lock:
            self._running = False
            self._regs[:] = bytes(r.BAR0_SIZE)
            for offset, value in state.registers:
                self._put(offset, value)
            for queue, saved in zip(self._queues, state.queues, strict=True):
                queue.load(saved)
                queue.generation += 1
                self._put(r.qtx_tail(queue.index), saved.tx_tail)
                self._put(r.qrx_tail(queue.index), saved.rx_tail)
            self._armed[:] = state.armed
            self._pending[:] = state.pending
            table = r.MSIX_TABLE_OFFSET
            self._msix[table : table + len(state.msix_table)] = state.msix_table
            self._msix[r.MSIX_PBA_OFFSET : r.MSIX_PBA_OFFSET + len(state.msix_pba)] = state.msix_pba
            self._reset_held = state.reset_held
            self._rstat = state.rstat

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
        for offset, _ in state.registers:
            if offset % 4 or not 0 <= offset < r.BAR0_SIZE or offset in self._tails:
                raise ValueError(f"register offset {offset:#x} is not a register of BAR0")
        for index, queue in enumerate(state.queues):
            positions = (
                (queue.tx_head, queue.tx_len),
                (queue.rx_head, queue.rx_len),
            )
            if any(length and head >= length for head, length in positions) or not (
                1 <= queue.vector < self.vectors
            ):
                raise ValueError(f"queue pair {index}'s saved positions or vector are invalid")

    @property
    def _pba_size(self) -> int:
        return 8 * -(-self.vectors // 64)

    # -- register handlers (called with the lock held) --------------------------------------

    def _get(self, offset: int) -> int:
        return int.from_bytes(self._regs[offset : offset + 4], "little")

    def _put(self, offset: int, value: int) -> None:
        self._regs[offset : offset + 4] = value.to_bytes(4, "little")

    def _can_dma(self) -> bool:
        bus = self._bus
        return self._running and not self._reset_held and bus is not None and bus.bus_master

    def _write_tx_tail(self, queue: int, value: int) -> None:
        self._put(r.qtx_tail(queue), value & r.TAIL_MASK)
        if self._can_dma():
            self._process_tx(self._queues[queue])

    def _read_queue_ctl(self, queue: int) -> int:
        state = self._queues[queue]
        return (r.QCTX_CTL_ENABLE if state.enabled else 0) | (
            r.QCTX_CTL_ERROR if state.error else 0
        )

    def _write_queue_ctl(self, queue: int, value: int) -> None:
        if not value & r.QCTX_CTL_ENABLE:
            self.set_queue_enabled(queue, False)
            return
        base = r.qctx(queue, 0)

        def wide(low: int) -> int:
            return self._get(base + low) | self._get(base + low + 4) << 32

        config = QueueConfig(
            tx_base=wide(r.QCTX_TX_BASE_LO),
            tx_len=self._get(base + r.QCTX_TX_LEN),
            rx_base=wide(r.QCTX_RX_BASE_LO),
            rx_len=self._get(base + r.QCTX_RX_LEN),
            rx_buf_size=self._get(base + r.QCTX_RX_BUF_SIZE),
        )
        try:
            self.configure_queue(queue, config)
            self.map_queue_vector(
                queue, self._get(base + r.QCTX_VECTOR) or self.default_vector(queue)
            )
            self.set_queue_enabled(queue, True)
        except ValueError as exc:
            logger.warning("queue pair %d context refused: %s", queue, exc)
            state = self._queues[queue]
            state.enabled, state.error = False, True

    def _write_dyn_ctl(self, vector: int, offset: int, value: int) -> None:
        self._put(offset, value & ~r.DYN_CTL_ACTIONS)
        if value & r.DYN_CTL_CLEARPBA:
            self._pending[vector] = False
        if value & r.DYN_CTL_SWINT_TRIG:
            self._pending[vector] = True
        self._armed[vector] = bool(value & r.DYN_CTL_INTENA)
        if self._armed[vector] and self._pending[vector]:
            self._fire(vector)

    def _read_rstat(self) -> int:
        if self._reset_held:
            return r.VFR_INPROGRESS
        shown = self._rstat
        self._rstat = r.VFR_VFACTIVE
        return shown

    def _read_rtrig(self) -> int:
        return r.RTRIG_VFSWR if self._reset_held else 0

    def _write_rtrig(self, value: int) -> None:
        hold = bool(value & r.RTRIG_VFSWR)
        if hold and not self._reset_held:
            self._reset_held = True
            self._forget_all()
        elif not hold and self._reset_held:
            self._reset_held = False
            self._regs[:] = bytes(r.BAR0_SIZE)
            self._rstat = r.VFR_COMPLETED

    def _forget_all(self) -> None:
        self._queues = [
            _Queue(q.index, self.default_vector(q.index), q.generation + 1) for q in self._queues
        ]
        self._armed = [False] * self.vectors
        self._pending = [False] * self.vectors
        self._regs[:] = bytes(r.BAR0_SIZE)

    # -- interrupts ----------------------------------------------------------------------

    def _signal(self, vector: int) -> None:
        self._pending[vector] = True
        if self._armed[vector]:
            self._fire(vector)

    def _fire(self, vector: int) -> None:
        if not self._running or self._reset_held or self._bus is None:
            return  # held pending until the device runs again
        self._armed[vector] = self._pending[vector] = False
        self._bus.raise_msix(vector)

    def _catch_up(self) -> None:
        if not self._can_dma():
            return
        for queue in self._queues:
            if queue.enabled and self._get(r.qtx_tail(queue.index)) != queue.tx_head:
                self._process_tx(queue)
        for vector in range(self.vectors):
            if self._armed[vector] and self._pending[vector]:
                self._fire(vector)

    # -- the data path -------------------------------------------------------------------

    def _process_tx(self, queue: _Queue) -> None:
        """Serve queue pair ``queue``'s TX ring from head to tail, looping packets to its RX."""
        tail = self._get(r.qtx_tail(queue.index))
        length = queue.tx_len
        if not queue.enabled or tail >= length or tail == queue.tx_head:
            return
        assert self._bus is not None
        dma = self._bus.dma
        head = queue.tx_head
        count = (tail - head) % length
        sent = 0
        try:
            ring = self._read_ring(queue.tx_base, length, r.TX_DESC.size, head, count)
            taken = 0
            while taken < count:
                fragments, completions, used = self._gather(
                    ring, head + taken, taken, count, length
                )
                if not used:
                    break  # the packet's last descriptor is not posted yet
                packet = b"".join(dma.read(addr, size) for addr, size in fragments if size)
                self._receive(queue, packet)
                for slot in completions:
                    dma.write(
                        queue.tx_base + slot * r.TX_DESC.size + r.TX_QWORD1_OFFSET, r.TX_DESC_DONE
                    )
                taken += used
                queue.tx_head = (head + taken) % length
                queue.tx_packets += 1
                queue.tx_bytes += len(packet)
                sent += 1
        except (OSError, _MalformedTx) as exc:
            self._fault(queue, exc)
        if sent:
            self._signal(queue.vector)

    @staticmethod
    def _gather(
        ring: bytes, first_slot: int, taken: int, count: int, length: int
    ) -> tuple[list[tuple[int, int]], list[int], int]:
        """One packet's fragments, its RS slots and the descriptors it uses (0: incomplete)."""
        fragments: list[tuple[int, int]] = []
        completions: list[int] = []
        for used in range(1, count - taken + 1):
            slot = (first_slot + used - 1) % length
            addr, qword1 = r.TX_DESC.unpack_from(ring, (taken + used - 1) * r.TX_DESC.size)
            dtype = qword1 & r.TX_DTYPE_MASK
            if dtype == r.TX_DTYPE_CONTEXT:
                continue
            if dtype != r.TX_DTYPE_DATA:
                raise _MalformedTx(f"TX descriptor {slot} has type {dtype:#x}")
            cmd = qword1 >> r.TX_CMD_SHIFT
            fragments.append((addr, (qword1 >> r.TX_BUF_SIZE_SHIFT) & r.TX_BUF_SIZE_MASK))
            if len(fragments) > r.TX_MAX_FRAGMENTS:
                raise _MalformedTx(f"a packet spans more than {r.TX_MAX_FRAGMENTS} descriptors")
            if cmd & r.TX_CMD_RS:
                completions.append(slot)
            if cmd & r.TX_CMD_EOP:
                return fragments, completions, used
        return [], [], 0

    def _receive(self, queue: _Queue, packet: bytes) -> None:
        """Write ``packet`` into the next posted RX buffers of ``queue``, or drop it."""
        tail = self._get(r.qrx_tail(queue.index)) & r.TAIL_MASK
        length, size, head = queue.rx_len, queue.rx_buf_size, queue.rx_head
        posted = (tail - head) % length if tail < length else 0
        needed = -(-len(packet) // size)
        if (
            not packet
            or len(packet) > r.MAX_FRAME_SIZE
            or not needed <= min(posted, r.RX_MAX_CHAIN)
        ):
            queue.rx_discards += 1
            return
        assert self._bus is not None
        dma = self._bus.dma
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

    def _read_ring(self, base: int, length: int, size: int, start: int, count: int) -> bytes:
        assert self._bus is not None
        first = min(count, length - start)
        data = self._bus.dma.read(base + start * size, first * size)
        if count > first:
            data += self._bus.dma.read(base, (count - first) * size)
        return bytes(data)

    def _fault(self, queue: _Queue, exc: Exception) -> None:
        """Stop a queue pair the way hardware does on a DMA fault or a malformed descriptor."""
        logger.warning("queue pair %d stopped: %s", queue.index, exc)
        queue.enabled = False
        queue.error = True
