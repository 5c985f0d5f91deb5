"""``MediatedDevice``: one device, its winning mediator and its per-region handler table."""

from __future__ import annotations

import errno
import functools
import logging
import struct
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any, final

from ._backend import DeviceBackend, RegionMapping, Trigger
from ._dirty import DirtyLog
from ._dma import DmaSpace
from ._errors import AccessError, ContractViolation, DeviceStateError, MigrationError
from ._migration import SAVING_ARCS, migration_path
from ._registry import MediatorRegistry, PluginRecord
from ._rules import Rule
from .uapi import (
    PAGE_SIZE,
    PCI_NUM_REGIONS,
    DeviceInfo,
    IrqInfo,
    MigrationFlag,
    MigrationState,
    RegionFlag,
    RegionInfo,
)

__all__ = ["MediatedDevice", "MediatorDevice", "MigrationStream"]

logger = logging.getLogger(__name__)

Reader = Callable[[int, int], bytes]
Writer = Callable[[int, bytes], int]


@final
class MediatorDevice:
    """What a mediator's ``mediator_open`` receives: the device's identity and its own
    (default) handlers, which a mediator calls to pass an access through."""

    __slots__ = (
        "_backend",
        "class_code",
        "device_id",
        "dma",
        "mmap",
        "model",
        "name",
        "read",
        "revision",
        "subsystem_id",
        "subsystem_vendor_id",
        "vendor_id",
        "write",
    )

    def __init__(self, backend: DeviceBackend) -> None:
        identity = backend.identity
        self.name: str = backend.name
        self.vendor_id = identity.vendor_id
        self.device_id = identity.device_id
        self.subsystem_vendor_id = identity.subsystem_vendor_id
        self.subsystem_id = identity.subsystem_id
        self.class_code = identity.class_code
        self.revision = identity.revision
        self.read: Callable[[int, int, int], bytes] = backend.read
        self.write: Callable[[int, int, bytes], int] = backend.write
        self.mmap: Callable[[int, int, int], RegionMapping] = backend.mmap
        self.dma: DmaSpace | None = backend.dma
        self.model: Any = backend.model
        self._backend = backend

    def region_info(self, index: int) -> dict[str, Any]:
        """The device's own info of region ``index``, as plain data."""
        return self._backend.region_info(index).to_plain()

    def __repr__(self) -> str:
        return f"<MediatorDevice {self.name} {self.vendor_id:04x}:{self.device_id:04x}>"


class MigrationStream:
    """The migration data of one save or load: framed chunks ``[u64 length][data]``.

    Each saving arc appends one chunk; loading hands the mediator the last complete chunk, so
    a destination that also received pre-copy data restores the final state.
    """

    HEADER = struct.Struct("<Q")

    def __init__(self) -> None:
        self.data = bytearray()
        self.position = 0

    def append_chunk(self, chunk: bytes) -> None:
        """Add one saved chunk."""
        self.data += self.HEADER.pack(len(chunk)) + chunk

    def read(self, size: int) -> bytes:
        """Up to ``size`` bytes not yet read; ``b""`` at the end of what is saved so far."""
        piece = bytes(self.data[self.position : self.position + size])
        self.position += len(piece)
        return piece

    @property
    def pending(self) -> int:
        """Bytes saved but not yet read."""
        return len(self.data) - self.position

    def last_chunk(self) -> bytes:
        """The last complete chunk written; ``EINVAL`` when the stream is not whole chunks."""
        position, last = 0, None
        while position < len(self.data):
            if position + self.HEADER.size > len(self.data):
                break
            (length,) = self.HEADER.unpack_from(self.data, position)
            start = position + self.HEADER.size
            if start + length > len(self.data):
                break
            last, position = bytes(self.data[start : start + length]), start + length
        if last is None or position != len(self.data):
            raise MigrationError(errno.EINVAL, "migration data is truncated or not framed")
        return last


@final
class MediatedDevice:
    """A device whose accesses go first to the mediator that claimed it at open.

    ``open``/``close`` are use-counted: the first open asks the registry for a mediator (first
    match), the last close releases it. In between, ``read``/``write``/``mmap`` of a region go
    through a handler resolved at open: the backend's own for regions the mediator does not
    mediate (no plugin call), one direct call of the mediator's ``mediator_rw`` for the others.
    A device nobody claims is plain passthrough.

    Threads: open, close, region info, reset, migration and dirty logging are serialized by a
    lock; region accesses take no lock (they are the hot path), so a caller must not let an
    access run across the last ``close`` (the handle is released there).
    """

    def __init__(
        self,
        backend: DeviceBackend,
        registry: MediatorRegistry | None = None,
        *,
        name: str | None = None,
    ) -> None:
        self.backend = backend
        self.registry = registry if registry is not None else MediatorRegistry()
        self.name = name or backend.name
        self._lock = threading.RLock()
        self._opens = 0
        self._record: PluginRecord | None = None
        self._handle: Any = None
        self._hooks: dict[str, Any] = {}
        self._table: dict[int, tuple[int, Reader, Writer]] = {}
        self._infos: dict[int, RegionInfo] = {}
        self._mediated: frozenset[int] = frozenset()
        self._state = MigrationState.RUNNING
        self._stream: MigrationStream | None = None
        self._log: DirtyLog | None = None

    def __repr__(self) -> str:
        winner = self._record.name if self._record else None
        return f"<MediatedDevice {self.name} open={self._opens} mediator={winner}>"

    # -- lifetime ----------------------------------------------------------------------

    def open(self) -> None:
        """Open the device; the first open runs the first-match search and builds the table."""
        with self._lock:
            if self._opens == 0:
                self._attach()
            self._opens += 1

    def close(self) -> None:
        """Close once; the last close releases the mediator exactly once."""
        with self._lock:
            if self._opens == 0:
                raise DeviceStateError(f"{self.name} is not open")
            self._opens -= 1
            if self._opens == 0:
                self._detach()

    def __enter__(self) -> MediatedDevice:
        self.open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def is_open(self) -> bool:
        """Whether the device has been opened more often than closed."""
        return self._opens > 0

    @property
    def mediator(self) -> PluginRecord | None:
        """The winning mediator, or ``None`` (plain passthrough or not open)."""
        return self._record

    @property
    def handle(self) -> Any:
        """The winning mediator's handle (for inspection; opaque to everyone else)."""
        return self._handle

    def _attach(self) -> None:
        view = MediatorDevice(self.backend)
        claim = self.registry.claim(view, self)
        if claim is not None:
            self._record, self._handle = claim
            self._hooks = {
                name: self.registry.hook(claim.record, name)
                for name in self.registry.hookspec_names()
            }
            logger.info("%s claimed by mediator %s", self.name, claim.record.describe())
        try:
            self._build_table()
        except BaseException:
            self._detach()
            raise
        self._state = MigrationState.RUNNING

    def _detach(self) -> None:
        record, handle = self._record, self._handle
        self._table = {}
        self._infos = {}
        self._stream = None
        if self._log is not None:
            self._call_quietly("mediator_dma_logging_stop")
            self._log = None
        self._record, self._handle, self._hooks = None, None, {}
        if record is not None:
            self.registry.release_use(record, self)
            release = self.registry.hook(record, "mediator_release")
            if release is not None:
                try:
                    release(handle)
                except Exception:
                    logger.exception("mediator %s raised in mediator_release", record.describe())

    def _call_quietly(self, hook: str, *args: Any) -> None:
        function = self._hooks.get(hook)
        if function is not None:
            try:
                function(self._handle, *args)
            except Exception:
                assert self._record is not None
                logger.exception("mediator %s raised in %s", self._record.describe(), hook)

    def _without_errno(self, exc: OSError) -> ContractViolation:
        return self._violation(Rule.ACCESS_ERRORS, f"raised {exc!r} without an errno")

    def _rw_failure(self, exc: Exception) -> ContractViolation:
        """What an exception other than an ``OSError`` with an errno from ``mediator_rw`` is."""
        if isinstance(exc, OSError):
            return self._without_errno(exc)
        return self._violation(Rule.ACCESS_ERRORS, f"mediator_rw raised {exc!r}")

    def _violation(self, rule: Rule, message: str) -> ContractViolation:
        assert self._record is not None
        return ContractViolation(self._record.describe(), rule.value, message)

    # -- the region table --------------------------------------------------------------

    def _build_table(self) -> None:
        backend_regions = self.backend.device_info().num_regions
        infos = {index: self._ask_region_info(index) for index in range(backend_regions)}
        for info in self._ask_device_regions():
            infos[info.index] = info
        mediated: set[int] = set()
        if self._record is not None:
            mediated = self._ask_mediated(infos)
        self._infos = infos
        self._mediated = frozenset(mediated)
        self._table = {
            index: (info.size, *self._allowed(info, *self._handlers(index, index in mediated)))
            for index, info in infos.items()
        }

    def _ask_region_info(self, index: int) -> RegionInfo:
        own = self.backend.region_info(index)
        answer = self._call_strict(
            "mediator_get_region_info", own.to_plain(), rule=Rule.REGION_INFO_VALID
        )
        if answer is None:
            return own
        try:
            info = RegionInfo.from_plain(answer)
        except ValueError as exc:
            raise self._violation(
                Rule.REGION_INFO_VALID, f"invalid info for region {index}: {exc}"
            ) from exc
        self._check_narrower(own, info)
        return info

    def _check_narrower(self, own: RegionInfo, info: RegionInfo) -> None:
        index = own.index
        for field in ("index", "size", "offset"):
            if getattr(info, field) != getattr(own, field):
                raise self._violation(
                    Rule.REGION_INFO_VALID,
                    f"region {index}: {field} changed from {getattr(own, field)!r} "
                    f"to {getattr(info, field)!r}",
                )
        extra_flags = int(info.flags) & ~int(own.flags)
        if extra_flags:
            raise self._violation(
                Rule.REGION_INFO_VALID,
                f"region {index}: flags {RegionFlag(extra_flags)!r} the device lacks",
            )
        if info.msix_mappable and not own.msix_mappable:
            raise self._violation(
                Rule.REGION_INFO_VALID, f"region {index}: MSIX_MAPPABLE that the device lacks"
            )
        own_pages = _pages(own.mmap_areas())
        extra = _pages(info.mmap_areas()) - own_pages
        if extra:
            raise self._violation(
                Rule.REGION_INFO_VALID,
                f"region {index}: maps page(s) {sorted(extra)[:4]} that the device traps",
            )

    def _ask_device_regions(self) -> list[RegionInfo]:
        answer = self._call_strict("mediator_device_regions", rule=Rule.DEVICE_REGIONS_VALID)
        try:
            infos = [RegionInfo.from_plain(item) for item in answer or ()]
        except (TypeError, ValueError) as exc:
            raise self._violation(Rule.DEVICE_REGIONS_VALID, str(exc)) from exc
        seen: set[int] = set()
        for info in infos:
            if info.index < PCI_NUM_REGIONS or info.index in seen:
                raise self._violation(
                    Rule.DEVICE_REGIONS_VALID, f"region index {info.index} is not a new index >= 9"
                )
            seen.add(info.index)
        return infos

    def _ask_mediated(self, infos: dict[int, RegionInfo]) -> set[int]:
        own = {index for index in infos if index >= PCI_NUM_REGIONS}
        if self._hooks.get("mediator_rw") is None and self._hooks.get("mediator_mmap") is None:
            return own
        if self._hooks.get("mediator_regions") is None:
            return set(infos)
        answer = self._call_strict("mediator_regions", rule=Rule.HOOK_SIGNATURE)
        try:
            chosen = {int(index) for index in answer}
        except (TypeError, ValueError) as exc:
            raise self._violation(
                Rule.HOOK_SIGNATURE, f"mediator_regions must return region indexes: {exc}"
            ) from exc
        unknown = chosen - set(infos)
        if unknown:
            raise self._violation(
                Rule.HOOK_SIGNATURE, f"mediator_regions names no region {unknown}"
            )
        return chosen | own

    def _handlers(self, index: int, mediated: bool) -> tuple[Reader, Writer]:
        backend_read, backend_write = self.backend.read, self.backend.write
        own_region = index >= PCI_NUM_REGIONS
        rw = self._hooks.get("mediator_rw") if mediated else None
        if rw is None:
            if own_region:
                refuse = self._refuse(index, "access: no device stands behind it")
                return refuse, refuse
            return functools.partial(backend_read, index), functools.partial(backend_write, index)
        handle = self._handle
        violation, failure = self._violation, self._rw_failure

        def read(offset: int, count: int) -> bytes:
            try:
                result = rw(handle, index, offset, count, None, False)
            except Exception as exc:
                if isinstance(exc, OSError) and exc.errno:
                    raise
                raise failure(exc) from exc
            if result is None:
                if own_region:
                    raise violation(Rule.RW_RESULT, f"read of own region {index} passed through")
                return backend_read(index, offset, count)
            if not isinstance(result, bytes | bytearray | memoryview) or len(result) != count:
                raise violation(Rule.RW_RESULT, f"read of {count} bytes returned {result!r:.60}")
            return bytes(result)

        def write(offset: int, data: bytes) -> int:
            try:
                result = rw(handle, index, offset, len(data), data, True)
            except Exception as exc:
                if isinstance(exc, OSError) and exc.errno:
                    raise
                raise failure(exc) from exc
            if result is None:
                if own_region:
                    raise violation(Rule.RW_RESULT, f"write of own region {index} passed through")
                return backend_write(index, offset, data)
            if result != len(data):
                raise violation(Rule.RW_RESULT, f"write of {len(data)} bytes returned {result!r}")
            return len(data)

        return read, write

    def _allowed(self, info: RegionInfo, read: Reader, write: Writer) -> tuple[Reader, Writer]:
        """The handlers, with a refusal in place of what the region's flags forbid."""
        if not info.flags & RegionFlag.READ:
            read = self._refuse(info.index, "read")
        if not info.flags & RegionFlag.WRITE:
            write = self._refuse(info.index, "write")
        return read, write

    def _refuse(self, index: int, what: str) -> Callable[..., Any]:
        def refuse(*_: Any) -> Any:
            raise AccessError(errno.EINVAL, f"{self.name}: region {index} does not allow {what}")

        return refuse

    # -- region access -----------------------------------------------------------------

    def device_info(self) -> DeviceInfo:
        """The device's info; ``num_regions`` counts the mediator's own regions too."""
        own = self.backend.device_info()
        regions = max([own.num_regions - 1, *self._infos]) + 1
        return own.model_copy(update={"num_regions": regions})

    def region_info(self, index: int) -> RegionInfo:
        """Region ``index``'s info, as the mediator presents it now (asked anew each time)."""
        with self._lock:
            self._require_open()
            known = self._infos.get(index)
            if known is None:
                raise AccessError(errno.EINVAL, f"{self.name} has no region {index}")
            if index >= PCI_NUM_REGIONS:
                return known
            info = self._ask_region_info(index)
            if info.flags != known.flags:  # the flags decide which accesses are refused
                handlers = self._handlers(index, index in self._mediated)
                self._table = {**self._table, index: (info.size, *self._allowed(info, *handlers))}
            self._infos[index] = info
            return info

    @property
    def regions(self) -> tuple[RegionInfo, ...]:
        """Every region's info, as of the last time it was asked."""
        return tuple(info for _, info in sorted(self._infos.items()))

    @property
    def mediated_regions(self) -> frozenset[int]:
        """The region indexes whose accesses go to the mediator."""
        return self._mediated

    def _require_open(self) -> None:
        if not self._opens:
            raise AccessError(errno.ENODEV, f"{self.name} is not open")

    def read(self, index: int, offset: int, count: int) -> bytes:
        """Read ``count`` bytes of region ``index`` at ``offset``."""
        entry = self._table.get(index)
        if entry is None:
            raise self._no_region(index)
        size, reader, _ = entry
        if offset < 0 or count <= 0 or offset + count > size:
            raise _out_of_range(index, offset, count, size)
        return reader(offset, count)

    def write(self, index: int, offset: int, data: bytes) -> int:
        """Write ``data`` to region ``index`` at ``offset``; returns the bytes written."""
        entry = self._table.get(index)
        if entry is None:
            raise self._no_region(index)
        size, _, writer = entry
        if offset < 0 or not data or offset + len(data) > size:
            raise _out_of_range(index, offset, len(data), size)
        return writer(offset, data)

    def _no_region(self, index: int) -> AccessError:
        if not self._opens:
            return AccessError(errno.ENODEV, f"{self.name} is not open")
        return AccessError(errno.EINVAL, f"{self.name} has no region {index}")

    def mmap(self, index: int, offset: int, length: int) -> RegionMapping:
        """Where to map ``length`` bytes of region ``index`` at ``offset``, which must lie in
        one of the region's mmap-able areas."""
        with self._lock:
            self._require_open()
            info = self._infos.get(index)
            if info is None:
                raise AccessError(errno.EINVAL, f"{self.name} has no region {index}")
            if length <= 0 or not any(
                area.offset <= offset and offset + length <= area.end for area in info.mmap_areas()
            ):
                raise AccessError(
                    errno.EINVAL,
                    f"{self.name}: region {index} {offset:#x}+{length:#x} is not mmap-able",
                )
            if index in self._mediated:
                answer = self._call_strict("mediator_mmap", index, offset, length)
                if answer is not None:
                    if not (
                        isinstance(answer, tuple)
                        and len(answer) == 2
                        and all(isinstance(v, int) and v >= 0 for v in answer)
                    ):
                        raise self._violation(
                            Rule.MMAP_RESULT, f"mediator_mmap returned {answer!r}, not (fd, offset)"
                        )
                    return RegionMapping(*answer)
            if index >= PCI_NUM_REGIONS:
                raise AccessError(errno.EINVAL, f"{self.name}: region {index} cannot be mapped")
            return self.backend.mmap(index, offset, length)

    # -- interrupts and reset ----------------------------------------------------------

    def irq_info(self, index: int) -> IrqInfo:
        """The info of IRQ index ``index``."""
        if not 0 <= index < self.backend.device_info().num_irqs:
            raise AccessError(errno.EINVAL, f"{self.name} has no IRQ index {index}")
        return self.backend.irq_info(index)

    def set_irq_triggers(self, index: int, start: int, triggers: Sequence[Trigger | None]) -> None:
        """Set (or with ``None`` unset) the triggers of vectors ``start`` onward."""
        self.backend.set_irq_triggers(index, start, triggers)

    def fire_irqs(self, index: int, start: int, count: int) -> None:
        """Raise vectors ``start`` to ``start + count - 1`` of IRQ index ``index``."""
        self.backend.fire_irqs(index, start, count)

    def reset(self) -> None:
        """Reset the device; the mediator hears of it first. Leaves migration ERROR."""
        with self._lock:
            self._require_open()
            self._call_strict("mediator_reset")
            self.backend.reset()
            self._state = MigrationState.RUNNING
            self._stream = None

    def _call_strict(self, hook: str, *args: Any, rule: Rule = Rule.ACCESS_ERRORS) -> Any:
        """Call the winner's ``hook`` (``None`` if it has none): an ``OSError`` with an errno
        passes, anything else it raises becomes a ``ContractViolation`` of ``rule``."""
        function = self._hooks.get(hook)
        if function is None:
            return None
        try:
            return function(self._handle, *args)
        except OSError as exc:
            if not exc.errno:
                raise self._without_errno(exc) from exc
            raise
        except Exception as exc:
            raise self._violation(rule, f"{hook} raised {exc!r}") from exc

    @property
    def dma(self) -> DmaSpace | None:
        """The device's DMA address space."""
        return self.backend.dma

    # -- migration v2 ------------------------------------------------------------------

    @property
    def migration_flags(self) -> int:
        """The migration v2 flags the mediator offers for this device (0: no migration)."""
        with self._lock:
            self._require_open()
            flags = self._call_strict("mediator_migration_flags")
            if flags is None:
                return 0
            if (
                not isinstance(flags, int)
                or flags & ~int(sum(MigrationFlag))
                or not (flags & MigrationFlag.STOP_COPY)
            ):
                raise self._violation(Rule.MIGRATION, f"migration flags {flags!r} are not valid")
            return flags

    @property
    def migration_state(self) -> MigrationState:
        """The current migration v2 state (RUNNING after open and after reset)."""
        return self._state

    def set_migration_state(self, target: int) -> MigrationState:
        """Go to ``target`` through single arcs; returns the new state.

        An illegal transition raises ``MigrationError(EINVAL)`` with the state unchanged; a step
        the mediator fails puts the device in ERROR and raises ``MigrationError``.
        """
        with self._lock:
            flags = self.migration_flags
            if not flags:
                raise MigrationError(errno.ENOTTY, f"{self.name} does not support migration")
            try:
                target_state = MigrationState(target)
            except ValueError:
                raise MigrationError(errno.EINVAL, f"no migration state {target}") from None
            for step in migration_path(self._state, target_state, flags):
                self._step(step)
            return self._state

    def _step(self, step: MigrationState) -> None:
        current = self._state
        try:
            if current is MigrationState.RESUMING:
                assert self._stream is not None
                self._call_strict("mediator_load_state", self._stream.last_chunk())
            result = self._call_strict("mediator_set_state", int(current), int(step))
        except OSError as exc:
            self._state, self._stream = MigrationState.ERROR, None
            raise MigrationError(
                exc.errno or errno.EIO,
                f"{self.name}: migration {current.name} -> {step.name} failed: {exc}",
            ) from exc
        except ContractViolation:
            self._state, self._stream = MigrationState.ERROR, None
            raise
        if (current, step) in SAVING_ARCS:
            if not isinstance(result, bytes | bytearray):
                self._state, self._stream = MigrationState.ERROR, None
                raise self._violation(
                    Rule.MIGRATION, f"arc {current.name} -> {step.name} returned no state bytes"
                )
            if self._stream is None or current is MigrationState.STOP:
                self._stream = MigrationStream()
            self._stream.append_chunk(bytes(result))
        elif step is MigrationState.RESUMING:
            self._stream = MigrationStream()
        elif step not in (MigrationState.PRE_COPY, MigrationState.PRE_COPY_P2P):
            self._stream = None
        self._state = step

    def read_migration_data(self, size: int) -> bytes:
        """Read saved state (in PRE_COPY, PRE_COPY_P2P or STOP_COPY); ``b""`` at the end."""
        with self._lock:
            if self._stream is None or self._state is MigrationState.RESUMING:
                raise MigrationError(
                    errno.EINVAL, f"{self.name} is not saving ({self._state.name})"
                )
            return self._stream.read(size)

    def write_migration_data(self, data: bytes) -> int:
        """Write state to load (in RESUMING)."""
        with self._lock:
            if self._state is not MigrationState.RESUMING or self._stream is None:
                raise MigrationError(
                    errno.EINVAL, f"{self.name} is not resuming ({self._state.name})"
                )
            self._stream.data += data
            return len(data)

    @property
    def migration_pending(self) -> int:
        """Saved bytes not yet read (``VFIO_DEVICE_FEATURE_MIG_DATA_SIZE``)."""
        stream = self._stream
        return stream.pending if stream is not None else 0

    # -- DMA dirty logging -------------------------------------------------------------

    def dma_logging_start(self, page_size: int, ranges: Iterable[tuple[int, int]]) -> int:
        """Start logging DMA writes of ``ranges`` at ``page_size`` granularity (returned)."""
        with self._lock:
            self._require_open()
            if self._hooks.get("mediator_dma_logging_start") is None:
                raise AccessError(errno.ENOTTY, f"{self.name} cannot log dirty pages")
            if self._log is not None:
                raise AccessError(errno.EBUSY, f"{self.name} is already logging dirty pages")
            log = DirtyLog(page_size, ranges)
            self._call_strict("mediator_dma_logging_start", log)
            self._log = log
            return log.page_size

    def dma_logging_report(self, iova: int, length: int, page_size: int) -> bytes:
        """Read and clear the dirty bitmap of ``[iova, iova + length)``."""
        with self._lock:
            log = self._log
            if log is None:
                raise AccessError(errno.EINVAL, f"{self.name} is not logging dirty pages")
            self._call_strict("mediator_dma_logging_report", log, iova, length)
            return log.report(iova, length, page_size)

    def dma_logging_stop(self) -> None:
        """Stop logging."""
        with self._lock:
            if self._log is None:
                raise AccessError(errno.EINVAL, f"{self.name} is not logging dirty pages")
            self._log = None
            self._call_strict("mediator_dma_logging_stop")

    @property
    def dma_logging_supported(self) -> bool:
        """Whether the winning mediator can log dirty pages (``mediator_dma_logging_start``)."""
        return self._hooks.get("mediator_dma_logging_start") is not None

    @property
    def dma_logging(self) -> bool:
        """Whether dirty logging runs."""
        return self._log is not None


def _pages(areas: Iterable[Any]) -> set[int]:
    pages: set[int] = set()
    for area in areas:
        pages.update(range(area.offset // PAGE_SIZE, area.end // PAGE_SIZE))
    return pages


def _out_of_range(index: int, offset: int, count: int, size: int) -> AccessError:
    return AccessError(
        errno.EINVAL,
        f"access {offset:#x}+{count:#x} is outside region {index} (size {size:#x})",
    )
