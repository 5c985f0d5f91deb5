"""The ``i40e`` mediator: dirty page tracking and migration v2 for the X710 VF (8086:154c).

Trapped pages
-------------
BAR0's region info leaves out, for as long as the mediator has the VF (a VMM asks for region
info once, when it attaches, so a trap that must hold while logging runs has to be there from
the start; the RFC's mediator did the same):

- the RX tail page 0x2000 and the admin-receive tail page 0x7000, where software hands the
  device buffers that the device will write;
- the admin queue pages 0x6000 and 0x8000, where software (re)configures the admin rings and
  posts the virtchnl requests that (re)configure the queue rings the device writes (the device
  model traps these itself too).

Every other page stays as mappable as the device makes it. While no logging runs, a trapped
access costs one call that returns ``None`` (the core passes it on).

State region
------------
Region 9 (type ``0x80000000 | 0x8086``, subtype ``STATE_REGION_SUBTYPE``) is a read-only view
of the VF's state as the migration stream would carry it (``state``), zero-padded: the RFC's
region-based approach, for inspection. A read at offset 0 takes a fresh snapshot; reads at
other offsets continue the last one, so a reader that starts at 0 sees one consistent stream.

Migration
---------
STOP_COPY, P2P and PRE_COPY. The device stops all DMA and interrupts in the stopped and P2P
states (it cannot tell P2P DMA from other DMA: its DMA space may map another device's BAR) and
latches register writes meanwhile; PRE_COPY saves the state while the device runs, STOP_COPY
once it is stopped. The stream is ``state``'s versioned format.

Why no page the device writes while logging is missed
-----------------------------------------------------
The device writes exactly: RX buffers and RX descriptors when it takes posted RX descriptors
(admin-receive buffers and descriptors alike), TX descriptors when it completes packets, and
admin-transmit descriptors when it completes commands.

For every receive ring the mediator keeps the descriptors posted to the device, oldest first
(``_PostedRing``): at logging start it reads the ones already posted, and on each trapped tail
write it reads the new ones through DMA *before* the device sees the tail. The device takes
descriptors in order, so the ones it still owns are the newest ``(tail - head) mod length`` of
the list and every older one has been written. Each report (and each trapped configuration
write) pops the older ones and marks their buffers and descriptor slots. A buffer the device
writes at time ``t`` is therefore marked in the first report whose hook runs after ``t`` (or
before ``t`` and after it was posted), also when it was posted before logging started. Frames
from other VFs on the switch arrive on any thread at any time: they only move a head.

A ring whose context changed (RESET_VF, CONFIG_VSI_QUEUES, a re-initialised admin queue, a
restored state, a fault that stopped it) has all its remembered descriptors marked and is
read afresh from its head. iavf configures a queue (CONFIG_VSI_QUEUES) and starts it
(ENABLE_QUEUES) in two requests, so the mediator reads the new ring in the write that
configures it, before any frame can land there; a driver that does both in one write and
gets a frame in before the write returns leaves the mediator descriptors it never saw: it
then marks every logged page (correct, not exact). A restored context is read before the
device runs again.

A TX ring is marked whole when it completed packets since the last settle (the PF's count of
the VF's transmitted packets moved; a completion writes descriptors back), when its context
changed (old and new ring) and when it faulted. The admin-transmit ring is marked whole when ATQH
moved (or the ring changed) since the mediator last looked, at every report and around every
configuration write; the admin-receive ring is a
receive ring like the others (the device writes the PF's replies and events into its posted
buffers within the ATQT, ARQT and resuming writes).

Trapped writes, settling and reports are serialized by the handle's lock, so a receive tail
never moves while the mediator looks; TX tail writes from other vCPUs only make the device take
descriptors the mediator already knows. The guest must not rewrite a descriptor it has posted
(the hardware forbids it); one that does can only spoil the copy of its own memory.
"""

from __future__ import annotations

import errno
import logging
import threading
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import pluggy

from . import registers as r
from .model import MODEL_NAME, I40eVf
from .state import decode, encode

__all__ = ["TRAPPED_PAGES", "I40eHandle", "hookimpl"]

hookimpl = pluggy.HookimplMarker("vfio_mediate")
logger = logging.getLogger(__name__)

# The VFIO uAPI numbers this mediator uses (the stable contract, as in Linux's vfio.h).
REGION_FLAG_MMAP = 1 << 2
MIGRATION_STOP_COPY = 1 << 0
MIGRATION_P2P = 1 << 1
MIGRATION_PRE_COPY = 1 << 2
STATE_STOP = 1
STATE_RUNNING = 2
STATE_STOP_COPY = 3
STATE_RESUMING = 4
STATE_RUNNING_P2P = 5
STATE_PRE_COPY = 6
STATE_PRE_COPY_P2P = 7
_QUIESCED = frozenset(
    {STATE_STOP, STATE_STOP_COPY, STATE_RESUMING, STATE_RUNNING_P2P, STATE_PRE_COPY_P2P}
)
_RUNNING = frozenset({STATE_RUNNING, STATE_PRE_COPY})
_PRE_COPY = frozenset({STATE_PRE_COPY, STATE_PRE_COPY_P2P})

TRAPPED_PAGES = frozenset({r.RX_TAIL_PAGE, r.ARQ_TAIL_PAGE, r.VF_ARQBAH, r.VF_ARQLEN})
"""BAR0 pages the mediator takes out of the mapped set (by page offset)."""
_CONFIG_PAGES = TRAPPED_PAGES - {r.RX_TAIL_PAGE}
_ARQ = "arq"

REGION_FLAG_READ = 1 << 0
PCI_VENDOR_TYPE = 1 << 31
STATE_REGION = 9  # the first device-specific region index (VFIO_PCI_NUM_REGIONS)
STATE_REGION_SUBTYPE = 1
STATE_REGION_SIZE = 0x40000  # room for a stream with every BAR0 register set

Entry = tuple[int, int, int, int]
"""A posted descriptor: (descriptor iova, descriptor size, buffer iova, buffer size)."""


class _Ring(NamedTuple):
    """One receive ring as the device sees it now, and the TX ring paired with it."""

    generation: object  # changes whenever the ring's context does
    base: int
    length: int  # 0: no usable ring
    head: int
    tail: int
    desc_size: int
    buffer: Callable[[bytes, int], tuple[int, int]]  # (descriptors, at) -> (iova, size)
    broken: bool  # stopped by a fault: what it took may not show in its head
    tx_ring: tuple[int, int]  # (iova, bytes) of the paired TX ring, (0, 0) if none
    tx_done: int  # packets the paired TX ring completed (each writes descriptors back)

    def owned(self) -> int:
        """How many posted descriptors the device has not taken yet."""
        if not self.length or self.tail >= self.length:
            return 0
        return (self.tail - self.head) % self.length


@dataclass
class _PostedRing:
    """The descriptors posted on one receive ring and not yet accounted, oldest first."""

    generation: object = None
    entries: deque[Entry] = field(default_factory=deque)
    tx_ring: tuple[int, int] = (0, 0)
    tx_done: int = 0


class I40eHandle:
    """Per-VF state of the mediator: the device view and, while logging runs, the log and
    the posted descriptors of every receive ring."""

    def __init__(self, device: Any) -> None:
        self.name: str = device.name
        model = device.model
        self.model: I40eVf | None = model if isinstance(model, I40eVf) else None
        self.dma: Any = device.dma
        self.write: Callable[[int, int, bytes], int] = device.write
        self.read: Callable[[int, int, int], bytes] = device.read
        self.queue_pairs = self.model.queue_pairs if self.model is not None else 0
        self.rx_tails = range(r.qrx_tail(0), r.qrx_tail(self.queue_pairs))
        self.lock = threading.Lock()
        self.log: Any = None
        self.rings: dict[object, _PostedRing] = {}
        self.atq_seen: tuple[int, int, bool, int] | None = None
        self.state_view = b""

    def __repr__(self) -> str:
        return f"<I40eHandle {self.name} logging={self.log is not None}>"

    def require_model(self) -> I40eVf:
        """The VF model, which saves, restores and shows queue contexts (the PF's view)."""
        if self.model is None:
            raise OSError(errno.ENOTTY, f"{self.name}: no i40e-vf model behind this device")
        return self.model

    def read_state_region(self, offset: int, count: int) -> bytes:
        """A read of the state region: a fresh snapshot at offset 0, else the last one."""
        if offset == 0:
            self.state_view = encode(self.require_model().snapshot())
        return self.state_view[offset : offset + count].ljust(count, b"\0")

    # -- ring views ----------------------------------------------------------------------

    def rx_ring(self, queue: int) -> _Ring:
        """Queue pair ``queue``'s RX ring (and its TX ring), from the PF's view."""
        generation, state = self.require_model().queue_view(queue)
        size = state.rx_buf_size

        def buffer(descriptors: bytes, at: int) -> tuple[int, int]:
            return int.from_bytes(descriptors[at : at + 8], "little"), size

        configured = state.configured
        return _Ring(
            generation,
            state.rx_base,
            state.rx_len if configured else 0,
            state.rx_head,
            state.rx_tail & r.TAIL_MASK,
            r.RX_DESC.size,
            buffer,
            state.error,
            (state.tx_base, state.tx_len * r.TX_DESC.size) if configured else (0, 0),
            state.tx_packets,
        )

    def _register(self, offset: int) -> int:
        return int.from_bytes(self.read(r.BAR0, offset, 4), "little")

    def _admin_ring(self, low: int, high: int, length: int) -> tuple[int, int, bool]:
        value = self._register(length)
        base = self._register(low) | self._register(high) << 32
        return base, value & r.AQ_LEN_MASK, bool(value & r.AQ_ENABLE)

    def arq_ring(self) -> _Ring:
        """The admin-receive queue, from its registers."""
        base, length, enabled = self._admin_ring(r.VF_ARQBAL, r.VF_ARQBAH, r.VF_ARQLEN)
        return _Ring(
            (base, length, enabled),
            base,
            length if enabled else 0,
            self._register(r.VF_ARQH) & r.AQ_HEAD_MASK,
            self._register(r.VF_ARQT) & r.AQ_HEAD_MASK,
            r.AQ_DESC_SIZE,
            _aq_buffer,
            False,
            (0, 0),
            0,
        )

    def ring(self, key: object) -> _Ring:
        """The receive ring ``key``: a queue pair index or ``"arq"``."""
        return self.rx_ring(key) if isinstance(key, int) else self.arq_ring()

    @property
    def keys(self) -> list[object]:
        """Every receive ring."""
        return [*range(self.queue_pairs), _ARQ]

    # -- the posted-descriptor lists (lock held, logging on) ------------------------------

    def _read_posted(self, ring: _Ring, start: int, count: int) -> list[Entry]:
        """The entries of ``count`` posted descriptors from slot ``start``."""
        if not count:
            return []
        size = ring.desc_size
        first = min(count, ring.length - start)
        try:
            data = self.dma.read(ring.base + start * size, first * size)
            if count > first:
                data += self.dma.read(ring.base, (count - first) * size)
        except OSError as exc:
            # The device could only use them once memory is mapped there: report everything.
            logger.warning("%s: posted descriptors unreadable (%s), logging all pages", self, exc)
            self._mark_all()
            return []
        entries = []
        for i in range(count):
            buffer, length = ring.buffer(data, i * size)
            entries.append((ring.base + (start + i) % ring.length * size, size, buffer, length))
        return entries

    def _mark(self, entries: Iterable[Entry]) -> None:
        mark = self.log.mark
        for descriptor, size, buffer, length in entries:
            mark(buffer, length)
            mark(descriptor, size)

    def settle(self, key: object, ring: _Ring, *, unseen: bool = False) -> None:
        """Mark what the device took from ``key`` since the last settle; start over when
        the ring's context changed. With ``unseen``, a changed ring whose head already moved
        took descriptors the mediator never read: every logged page is marked."""
        posted = self.rings.setdefault(key, _PostedRing())
        changed = posted.generation != ring.generation or ring.broken
        if changed or posted.tx_done != ring.tx_done or posted.tx_ring != ring.tx_ring:
            self.log.mark(*posted.tx_ring)  # it completed packets: descriptors written back
            if changed:
                self.log.mark(*ring.tx_ring)  # the new one may have been written already
        posted.tx_ring, posted.tx_done = ring.tx_ring, ring.tx_done
        entries = posted.entries
        owned = ring.owned()
        if changed or owned > len(entries):
            self._mark(entries)
            entries.clear()
            posted.generation = ring.generation
            if ring.broken:
                return
            if unseen and changed and ring.head:
                logger.warning(
                    "%s: ring %s was used before it was read: logging all pages", self, key
                )
                self._mark_all()
            entries.extend(self._read_posted(ring, ring.head, owned))
            return
        self._mark([entries.popleft() for _ in range(len(entries) - owned)])

    def _mark_all(self) -> None:
        for iova, length in self.log.ranges:
            self.log.mark(iova, length)

    def settle_all(self, *, unseen: bool = False) -> dict[object, _Ring]:
        """Settle every receive ring; returns the views used."""
        rings = {key: self.ring(key) for key in self.keys}
        for key, ring in rings.items():
            self.settle(key, ring, unseen=unseen)
        return rings

    def mark_admin_transmit_ring(self) -> None:
        """Mark the admin-transmit ring when the device completed commands on it since the
        last look (ATQH moved: a completion writes its descriptor back first) or it changed.
        One write or resume completes at most ``length - 1`` commands and every trapped write
        looks before and after, so the head cannot come round to where it was unseen."""
        base, length, enabled = self._admin_ring(r.VF_ATQBAL, r.VF_ATQBAH, r.VF_ATQLEN)
        now = (base, length, enabled, self._register(r.VF_ATQH) & r.AQ_HEAD_MASK)
        seen, self.atq_seen = self.atq_seen, now
        if now == seen:
            return
        if seen is not None and seen[2]:
            self.log.mark(seen[0], seen[1] * r.AQ_DESC_SIZE)
        if enabled:
            self.log.mark(base, length * r.AQ_DESC_SIZE)

    def start_logging(self, log: Any) -> None:
        """Remember what is posted now; nothing is marked until the device takes it."""
        self.log = log
        self.rings = {}
        base, length, enabled = self._admin_ring(r.VF_ATQBAL, r.VF_ATQBAH, r.VF_ATQLEN)
        self.atq_seen = (base, length, enabled, self._register(r.VF_ATQH) & r.AQ_HEAD_MASK)
        for key in self.keys:
            ring = self.ring(key)
            posted = _PostedRing(ring.generation, tx_ring=ring.tx_ring, tx_done=ring.tx_done)
            if not ring.broken:
                posted.entries.extend(self._read_posted(ring, ring.head, ring.owned()))
            self.rings[key] = posted

    def report(self) -> None:
        """Mark everything written since the last report (the report hook)."""
        self.settle_all()
        self.mark_admin_transmit_ring()

    def forget(self) -> None:
        """The device is about to forget its rings: mark everything remembered."""
        self.mark_admin_transmit_ring()
        self.atq_seen = None
        for posted in self.rings.values():
            self.log.mark(*posted.tx_ring)
            self._mark(posted.entries)
            posted.entries.clear()
            posted.generation = None

    # -- trapped writes ------------------------------------------------------------------

    def trapped_write(self, offset: int, data: bytes) -> int | None:
        """A BAR0 write while logging runs; ``None`` passes it on untouched."""
        if len(data) == 4 and not offset & 3:
            if offset in self.rx_tails:
                return self.post((offset - self.rx_tails.start) >> 2, offset, data)
            if offset == r.VF_ARQT:
                return self.post(_ARQ, offset, data)
        touches_tails = offset < self.rx_tails.stop and self.rx_tails.start < offset + len(data)
        if touches_tails or offset & ~(r.PAGE_SIZE - 1) in _CONFIG_PAGES:
            return self.reconfigure(offset, data)
        return None

    def post(self, key: object, offset: int, data: bytes) -> int:
        """A receive tail write: remember the newly posted descriptors, then let the device
        see the tail."""
        ring = self.ring(key)
        mask = r.TAIL_MASK if isinstance(key, int) else r.AQ_HEAD_MASK
        new_tail, length = int.from_bytes(data, "little") & mask, ring.length
        posted = self.rings.setdefault(key, _PostedRing())
        if (
            posted.generation == ring.generation
            and not ring.broken
            and length
            and ring.tail < length
            and new_tail < length
            and (new_tail - ring.head) % length >= (ring.tail - ring.head) % length
        ):
            posted.entries.extend(
                self._read_posted(ring, ring.tail, (new_tail - ring.tail) % length)
            )
            return self.write(r.BAR0, offset, data)
        # Not a plain post (no context yet, a tail moved back or out of the ring): start over.
        written = self.write(r.BAR0, offset, data)
        posted.generation = None
        self.settle(key, self.ring(key))
        return written

    def reconfigure(self, offset: int, data: bytes) -> int:
        """A write that may change rings: account for everything before and after it."""
        before = self.settle_all()
        self.mark_admin_transmit_ring()
        written = self.write(r.BAR0, offset, data)
        for key, ring in before.items():
            if self.ring(key).tail != ring.tail:
                self.rings[key].generation = None  # posted outside ``post``: read afresh
        self.settle_all(unseen=True)
        self.mark_admin_transmit_ring()
        return written


def _aq_buffer(descriptors: bytes, at: int) -> tuple[int, int]:
    """The buffer of an admin queue descriptor: (addr_high:addr_low, datalen)."""
    high, low = (
        int.from_bytes(descriptors[at + field : at + field + 4], "little")
        for field in (r.AQ_ADDR_HIGH_OFFSET, r.AQ_ADDR_LOW_OFFSET)
    )
    offset = at + r.AQ_DATALEN_OFFSET
    return high << 32 | low, int.from_bytes(descriptors[offset : offset + 2], "little")


# -- hooks ------------------------------------------------------------------------------------


@hookimpl
def mediator_targets() -> list[str]:
    """The X710 VF model."""
    return [MODEL_NAME]


@hookimpl
def mediator_open(device: Any) -> I40eHandle | None:
    """Claim an Intel X710 VF (8086:154c); decline every other device."""
    if device.vendor_id != r.VENDOR_ID or device.device_id != r.DEVICE_ID:
        return None
    logger.debug("i40e mediator claims %s", device.name)
    return I40eHandle(device)


@hookimpl
def mediator_release(handle: I40eHandle) -> None:
    """Drop any logging state."""
    handle.log = None
    handle.rings = {}


@hookimpl
def mediator_regions(handle: I40eHandle) -> list[int]:
    """Only BAR0's accesses come to the mediator."""
    return [r.BAR0]


@hookimpl
def mediator_device_regions(handle: I40eHandle) -> list[dict[str, Any]]:
    """The read-only state region, when the VF model is there to show its state."""
    if handle.model is None:
        return []
    return [
        {
            "index": STATE_REGION,
            "flags": REGION_FLAG_READ,
            "size": STATE_REGION_SIZE,
            "type": [PCI_VENDOR_TYPE | r.VENDOR_ID, STATE_REGION_SUBTYPE],
        }
    ]


@hookimpl
def mediator_get_region_info(handle: I40eHandle, info: dict[str, Any]) -> dict[str, Any] | None:
    """BAR0 with a sparse mmap that leaves out ``TRAPPED_PAGES``; other regions unchanged."""
    if info["index"] != r.BAR0 or not info["flags"] & REGION_FLAG_MMAP:
        return None
    areas: list[list[int]] = []
    for offset, size in info["sparse_mmap"] or [[0, info["size"]]]:
        for page in range(offset, offset + size, r.PAGE_SIZE):
            if page in TRAPPED_PAGES:
                continue
            if areas and areas[-1][0] + areas[-1][1] == page:
                areas[-1][1] += r.PAGE_SIZE
            else:
                areas.append([page, r.PAGE_SIZE])
    if areas:
        info["sparse_mmap"] = areas
    else:
        info["flags"] &= ~REGION_FLAG_MMAP
        info["sparse_mmap"] = None
    return info


@hookimpl
def mediator_rw(
    handle: I40eHandle, index: int, offset: int, count: int, data: bytes | None, is_write: bool
) -> bytes | int | None:
    """The state region's reads; BAR0: while logging runs, account for the writes that post
    buffers or change rings, and pass everything else on untouched (``None``)."""
    if index == STATE_REGION:
        if is_write:
            raise OSError(errno.EINVAL, f"{handle.name}: the state region is read-only")
        return handle.read_state_region(offset, count)
    if handle.log is None or not is_write:
        return None
    assert data is not None
    with handle.lock:
        return handle.trapped_write(offset, data)


@hookimpl
def mediator_reset(handle: I40eHandle) -> None:
    """The VF is about to forget its rings: account for everything it may have written."""
    if handle.log is not None:
        with handle.lock:
            handle.forget()


@hookimpl
def mediator_migration_flags(handle: I40eHandle) -> int | None:
    """STOP_COPY, P2P and PRE_COPY, when the VF model is there to save and restore."""
    if handle.model is None:
        return None
    return MIGRATION_STOP_COPY | MIGRATION_P2P | MIGRATION_PRE_COPY


@hookimpl
def mediator_set_state(handle: I40eHandle, current: int, new: int) -> bytes | None:
    """One arc: quiesce on the way to a stopped or P2P state, run again on the way to a
    running one, and return the state bytes on the arcs that open a saving stream."""
    model = handle.require_model()
    if new in _QUIESCED:
        model.quiesce()
    elif handle.log is not None:
        with handle.lock:  # a restored context is read before the device serves it
            handle.settle_all()
    saving = new == STATE_STOP_COPY or (
        new in _PRE_COPY and current in (STATE_RUNNING, STATE_RUNNING_P2P)
    )
    saved = encode(model.snapshot()) if saving else None
    if new in _RUNNING:
        model.resume()
        if handle.log is not None:
            with handle.lock:  # requests latched while stopped were served just now
                handle.settle_all(unseen=True)
                handle.mark_admin_transmit_ring()
    return saved


@hookimpl
def mediator_load_state(handle: I40eHandle, data: bytes) -> None:
    """Restore the VF from a version-1 stream of the same model and shape."""
    state = decode(data)
    try:
        handle.require_model().restore(state)
    except ValueError as exc:
        raise OSError(errno.EINVAL, f"{handle.name}: cannot restore this state: {exc}") from exc


@hookimpl
def mediator_dma_logging_start(handle: I40eHandle, log: Any) -> None:
    """Start tracking: remember the descriptors posted now."""
    handle.require_model()
    if handle.dma is None:
        raise OSError(errno.ENOTTY, f"{handle.name}: the device has no DMA space")
    with handle.lock:
        handle.start_logging(log)


@hookimpl
def mediator_dma_logging_report(handle: I40eHandle, log: Any, iova: int, length: int) -> None:
    """Mark what the device took and the write-back rings, before the core reads the log."""
    with handle.lock:
        handle.report()


@hookimpl
def mediator_dma_logging_stop(handle: I40eHandle) -> None:
    """Stop tracking."""
    with handle.lock:
        handle.log = None
        handle.rings = {}
