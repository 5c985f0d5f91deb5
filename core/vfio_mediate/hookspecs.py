"""The hook contract between vfio-mediate and mediator plugins.

A mediator is a module or object with some of these hooks implemented, marked with
``pluggy.HookimplMarker("vfio_mediate")`` (a plugin makes its own marker and never imports
``vfio_mediate``), and registered under the entry-point group ``vfio_mediate.mediators``.

Everything that crosses the boundary is plain data (ints, bytes, lists, dicts) or an object the
core hands in; the annotations name their types (``Device``, ``DirtyPageLog``, ``DmaAccess``,
``RegionInfoData``, and ``DeviceModel`` for a device model), which a plugin may import for its
type checker under ``typing.TYPE_CHECKING`` and so still import nothing at run time. The numbers
are the Linux VFIO uAPI's (``vfio_mediate.uapi`` lists them): region indexes (BAR0-5 = 0-5, ROM 6,
CONFIG 7, VGA 8, device-specific >= 9), region flags (READ 1, WRITE 2, MMAP 4), migration states
and flags.

Every rule has an id (``vfio_mediate.Rule``), stated below where it applies, that
``ContractViolation.rule`` and the conformance suite name. Two hold for every plugin: its hooks
are hooks of this contract, each with (a subset of) the arguments named here, implemented once
and not as a wrapper, and it implements ``mediator_open`` (``hook-signature``); it never imports
``vfio_mediate`` at run time, at import or in a hook (``no-core-import``). A hook that raises
anything but an ``OSError`` with an errno breaks the rule of its own clause below
(``vfio_mediate._rules.HOOK_RULES``); an ``OSError`` with an errno is a refusal, and the errno
goes to the client (``access-errors``).

Lifecycle of a device:

1. At the device's first open the registry calls ``mediator_open`` on each mediator in order:
   priority first (``tryfirst=True`` on the ``mediator_open`` implementation, then none, then
   ``trylast=True``), then entry-point name. The first result that is not ``None`` wins
   (``0``, ``False`` and ``b""`` are results). A mediator that raises is reported and skipped.
2. From then on only the winner is called for that device, through the handle it returned.
   ``mediator_regions`` decides which regions go through ``mediator_rw``/``mediator_mmap``;
   accesses to the others reach the device without any plugin call.
3. At the last close ``mediator_release`` runs exactly once. While a device it claimed is open
   a mediator cannot be unregistered.

Threads: the hooks of one device are called one at a time (the device's lock), except two.
``mediator_rw`` runs for every access a client makes, takes no lock, and may run from several
threads at once and while any other hook of the same device runs (never across
``mediator_release``); ``mediator_irq`` runs on an interrupt relay thread. Hooks of
different devices run at the same time in different threads: per-device state lives in the
handle, and whatever handles share needs a lock. Thread-safe, to call from any thread (a device
model's too): ``log.mark``, the device's ``read``/``write``/``mmap``/``region_info`` and
``dma.read``/``dma.write``.
"""

from __future__ import annotations

from typing import Any

import pluggy

from ._hook_types import Device, DirtyPageLog, DmaAccess, RegionInfoData
from ._model import DeviceModel

__all__ = [
    "PROJECT_NAME",
    "Device",
    "DeviceModel",
    "DirtyPageLog",
    "DmaAccess",
    "RegionInfoData",
    "hookimpl",
    "hookspec",
]

PROJECT_NAME = "vfio_mediate"
hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec(firstresult=True)
def mediator_open(device: Device) -> Any:
    """Claim ``device`` with a handle, or decline it with ``None``.

    ``device`` (``Device``) describes the device and offers its default handlers. It has
    ``name`` (str), ``vendor_id``, ``device_id``, ``subsystem_vendor_id``, ``subsystem_id``,
    ``class_code`` (24 bits: class, subclass, prog-if) and ``revision`` (ints), and:

    - ``region_info(index) -> dict``: the device's own region info (``RegionInfoData``);
    - ``read(index, offset, count) -> bytes`` and ``write(index, offset, data) -> int``: the
      device's own access handlers, to pass all or part of an access through;
    - ``mmap(index, offset, length) -> (fd, file_offset)``: the device's own mapping;
    - ``dma``: the device's DMA (``DmaAccess``: ``read(iova, length) -> bytes`` and
      ``write(iova, data)``, nothing else), or ``None``;
    - ``model``: the behaviour object of an emulated device model (``DeviceModel``), or
      ``None``.

    Rules: return ``None`` to decline, never another falsy value (``0``, ``False`` and ``b""``
    claim the device) and never an exception; anything else is the opaque handle that every
    later hook receives (``open-result``). Claim the devices you target, and only those
    (``open-targets``); keep all per-device state in the handle, none in module globals
    (``isolation``); never print (``quiet``). An exception is reported with the plugin's name
    and the search goes on.
    """


@hookspec
def mediator_targets() -> Any:
    """Return the devices this mediator is meant to claim: a list of device model names
    (entry points of ``vfio_mediate.devices``, e.g. ``"i40e-vf"``) or device specs as plain
    dicts (the fields of a TOML device spec) (``open-targets``).

    Not used to choose a winner (``mediator_open`` decides); the conformance suite opens these
    devices and checks that each is claimed (``open-targets``), and offers look-alikes that must
    be declined. A fallback that may claim any device (like the null mediator) declares itself
    with ``trylast=True`` on ``mediator_open``, returns a few examples here, and is offered no
    device to decline.
    """


@hookspec
def mediator_release(handle: Any) -> None:
    """Release ``handle`` at the device's last close; called exactly once per claimed handle.

    Never called for a device the mediator declined; it must complete (``release-once``). The
    device may be opened again later, which calls ``mediator_open`` anew: the device then looks
    and works as it did, the same accesses allowed and refused (``reopen``).
    """


@hookspec
def mediator_regions(handle: Any) -> Any:
    """Return the region indexes whose accesses this mediator handles (an iterable of ints,
    each a region the device has) (``regions-result``).

    Asked once, at open. ``mediator_rw`` and ``mediator_mmap`` are called only for these
    regions; the others reach the device directly, at no plugin cost. A mediator that implements
    ``mediator_rw`` or ``mediator_mmap`` but not this hook mediates every region. Indexes of its
    own device-specific regions are always included.
    """


@hookspec
def mediator_get_region_info(handle: Any, info: RegionInfoData) -> Any:
    """Return a changed region info, or ``None`` to keep the device's.

    ``info`` is a fresh dict (``RegionInfoData``; change it freely) with ``index``, ``flags``
    (READ 1 | WRITE 2 | MMAP 4), ``size``, ``offset`` (file offset), ``sparse_mmap`` (``None`` or
    a list of ``[offset, size]`` areas that may be mapped), ``type`` (``None`` or
    ``[type, subtype]``) and ``msix_mappable`` (bool). Called for every region the device has
    (CONFIG, BARs, ROM, VGA), at open and whenever a client asks (the vfio-user server answers
    asks with nothing between them that could change the answer, i.e. only reads and info
    requests, from the last one).

    Rules (``region-info-valid``): keep ``index``, ``size`` and ``offset``; areas page-aligned,
    inside the region and not overlapping; no flag the device does not have; only take mapped
    areas away (trap more), never map what the device traps.
    """


@hookspec
def mediator_device_regions(handle: Any) -> Any:
    """Return the device-specific regions this mediator adds: a list of region info dicts.

    Each has an ``index`` >= 9 (unique), a ``size``, ``flags`` and a ``type`` ``[type, subtype]``
    (e.g. ``[0x80000000 | vendor_id, subtype]``) (``device-regions-valid``). All their accesses
    go to ``mediator_rw`` and ``mediator_mmap``; ``mediator_rw`` must not return ``None`` for
    them, since no device stands behind them.
    """


@hookspec
def mediator_rw(
    handle: Any, index: int, offset: int, count: int, data: bytes | None, is_write: bool
) -> Any:
    """Handle an access to a mediated region, or return ``None`` to pass it to the device.

    A read has ``data is None`` and returns exactly ``count`` bytes; a write has ``data`` of
    ``count`` bytes and returns ``count``; on a device whose regions are memory, no byte outside
    the access changes (``rw-result``). The core has checked that the access lies inside the
    region; any offset and size (1, 2, 4, 8, unaligned too) may come. Refuse an access by raising
    ``OSError`` with an errno (e.g. ``errno.EINVAL``); any other exception breaks
    ``access-errors``. To act on the access and still let it reach the device call
    ``device.read``/``device.write`` from the ``device`` given at open. This is the per-access
    path: do the least work you can. It may run concurrently (see Threads above).
    """


@hookspec
def mediator_mmap(handle: Any, index: int, offset: int, length: int) -> Any:
    """Map an area of a mediated region: ``None`` lets the device map it, otherwise return
    ``(fd, file_offset)``, the file and offset a client maps ``length`` bytes from.

    Called only for areas inside the region's mmap-able areas; the mapping shows, and is,
    the region's memory (``mmap-result``). Refuse with ``OSError`` and an errno
    (``access-errors``).
    """


@hookspec
def mediator_reset(handle: Any) -> None:
    """The device is being reset (``VFIO_DEVICE_RESET``); called before the device resets.

    Forget per-reset state (e.g. trapped register shadows); the handle stays claimed. Refuse
    with ``OSError`` and an errno (``access-errors``).
    """


@hookspec
def mediator_irq_observe(handle: Any, index: int) -> Any:
    """Return the vectors of IRQ index ``index`` (INTX 0, MSI 1, MSIX 2, ...) whose interrupts
    this mediator must see (an iterable of ints), or ``None`` for none.

    Asked whenever a client routes vectors of ``index``, whatever the device's backend. A vector
    not returned goes straight from the device to the client's eventfd (for a device bound to
    vfio-pci the kernel signals it and no Python runs); an observed one is relayed: each
    interrupt calls ``mediator_irq`` first, then reaches the client. Refuse with ``OSError`` and
    an errno; any other exception, or a result that is not vector numbers, breaks
    ``access-errors``.
    """


@hookspec
def mediator_irq(handle: Any, index: int, vector: int) -> Any:
    """An observed vector fired (see ``mediator_irq_observe``). Return ``False`` to swallow the
    interrupt (the client does not see it); anything else forwards it. Keep it short: it runs
    on the device's interrupt relay thread (whatever the backend), once per interrupt, never
    inside the device's lock, concurrently with the device's other hooks. An exception is
    logged and the interrupt forwarded (``access-errors``).
    """


@hookspec
def mediator_migration_flags(handle: Any) -> Any:
    """Return the migration v2 flags this mediator supports for the device (STOP_COPY 1 |
    P2P 2 | PRE_COPY 4), or ``None`` if it does not migrate the device.

    STOP_COPY must be set when migration is supported. The core owns the state machine: it
    refuses illegal transitions and turns a requested one into single arcs (``migration``).
    """


@hookspec
def mediator_set_state(handle: Any, current: int, new: int) -> Any:
    """Carry out one migration v2 arc from ``current`` to ``new`` (ints of ``MigrationState``).

    Only arcs of the Linux arc table arrive here, one step at a time. For an arc that opens a
    saving stream (to PRE_COPY or STOP_COPY) return the device state as ``bytes``, which the
    client then reads; for any other arc return ``None``. Raise ``OSError`` if the step fails:
    the device then enters ERROR; any other exception breaks ``migration``.
    """


@hookspec
def mediator_load_state(handle: Any, data: bytes) -> None:
    """Restore the device from ``data``, everything the client wrote while RESUMING.

    Called on the arc RESUMING -> STOP. Restore everything the source showed through the
    mediator (its own regions, its register shadows). Refuse a stream no device saved, or one
    from another device model or version, by raising ``OSError(errno.EINVAL, reason)``: the
    device then enters ERROR (``migration``).
    """


@hookspec
def mediator_dma_logging_start(handle: Any, log: DirtyPageLog) -> None:
    """Start logging the pages the device writes by DMA into ``log``.

    ``log`` (``DirtyPageLog``) is handed in by the core: it has ``page_size``, ``ranges`` (a list
    of ``(iova, length)``) and ``mark(iova, length)``, which records a write (outside the ranges
    it is ignored; thread-safe). Mark every page the device may write from now until
    ``mediator_dma_logging_stop``: none may be missed, over-reporting is allowed; the mediator
    knows what it makes the device write, nothing records it for it (``dirty-logging``). Raise
    ``OSError`` to refuse.
    """


@hookspec
def mediator_dma_logging_report(handle: Any, log: DirtyPageLog, iova: int, length: int) -> None:
    """Called just before the core reads and clears ``log`` for ``[iova, iova + length)``.

    Mark here what must be reported but is not marked on the way (e.g. pages a device may write
    at any moment, such as descriptor rings of enabled queues) (``dirty-logging``).
    """


@hookspec
def mediator_dma_logging_stop(handle: Any) -> None:
    """Stop dirty logging; ``log`` is not used after this (``dirty-logging``)."""
