"""``RegionTable``: a device's regions as its mediator presents them, and their handlers."""

from __future__ import annotations

import errno
import functools
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple, final

from ._backend import DeviceBackend
from ._errors import AccessError
from ._pages import pages_of
from ._rules import Rule
from ._winner import WinningMediator
from .uapi import PCI_NUM_REGIONS, RegionFlag, RegionInfo, SparseMmapArea

__all__ = ["Reader", "RegionEntry", "RegionTable", "Writer", "out_of_range"]

Reader = Callable[[int, int], bytes]
"""``read(offset, count)`` of one region."""
Writer = Callable[[int, bytes], int]
"""``write(offset, data)`` of one region."""


class RegionEntry(NamedTuple):
    """What an access of one region needs: its size and its two handlers, each of which
    refuses an access outside the region (``EINVAL``) before anything else."""

    size: int
    read: Reader
    write: Writer


@final
class RegionTable:
    """Every region's info, asked of the winner once at open (and again on request), and the
    handler of each region's accesses resolved from it.

    A region the winner does not mediate is served by the backend's own handler (no plugin
    call); a mediated one by one direct call of ``mediator_rw``, whose result is checked. What
    a region's flags forbid is refused. ``entries`` is replaced whole, never changed in place,
    so an access that looks it up needs no lock.
    """

    def __init__(self, name: str, backend: DeviceBackend, winner: WinningMediator | None) -> None:
        self.name = name
        self.backend = backend
        self.winner = winner
        infos = {
            index: self.ask_region_info(index) for index in range(backend.device_info().num_regions)
        }
        for info in self._ask_device_regions():
            infos[info.index] = info
        self.infos = infos
        self.mediated = frozenset(self._ask_mediated(infos) if winner is not None else ())
        self.entries: dict[int, RegionEntry] = {
            index: self._entry(info) for index, info in infos.items()
        }

    def refresh(self, index: int) -> RegionInfo:
        """Ask the winner for region ``index``'s info again; the handlers follow its flags."""
        known = self.infos.get(index)
        if known is None:
            raise AccessError(errno.EINVAL, f"{self.name} has no region {index}")
        if index >= PCI_NUM_REGIONS:
            return known
        info = self.ask_region_info(index)
        if info.flags != known.flags:  # the flags decide which accesses are refused
            self.entries = {**self.entries, index: self._entry(info)}
        self.infos[index] = info
        return info

    # -- asking the winner -------------------------------------------------------------------

    def _call(self, hook: str, *args: Any) -> Any:
        return None if self.winner is None else self.winner.call(hook, *args)

    def _violation(self, rule: Rule, message: str) -> Exception:
        assert self.winner is not None  # only a winner's answers are checked
        return self.winner.violation(rule, message)

    def ask_region_info(self, index: int) -> RegionInfo:
        """Region ``index``'s info: the backend's, or the winner's narrower version of it."""
        own = self.backend.region_info(index)
        answer = self._call("mediator_get_region_info", own.to_plain())
        if answer is None:
            return own
        flags = answer.get("flags") if isinstance(answer, dict) else None
        known = int(RegionFlag.READ | RegionFlag.WRITE | RegionFlag.MMAP)
        if isinstance(flags, int) and not flags & ~known and flags & ~int(own.flags):
            # Before validating the rest: an added flag is the fault, whatever else it breaks.
            raise self._violation(
                Rule.REGION_INFO_VALID,
                f"region {index}: flags {RegionFlag(flags & ~int(own.flags))!r} the device lacks",
            )
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
        extra = _mapped_pages(info.mmap_areas()) - _mapped_pages(own.mmap_areas())
        if extra:
            raise self._violation(
                Rule.REGION_INFO_VALID,
                f"region {index}: maps page(s) {sorted(extra)[:4]} that the device traps",
            )

    def _ask_device_regions(self) -> list[RegionInfo]:
        answer = self._call("mediator_device_regions")
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
        assert self.winner is not None
        own = {index for index in infos if index >= PCI_NUM_REGIONS}
        if not self.winner.implements("mediator_rw") and not self.winner.implements(
            "mediator_mmap"
        ):
            return own
        if not self.winner.implements("mediator_regions"):
            return set(infos)
        answer = self._call("mediator_regions")
        try:
            chosen = {int(index) for index in answer}
        except (TypeError, ValueError) as exc:
            raise self._violation(
                Rule.REGIONS_RESULT,
                f"mediator_regions returned {answer!r:.60}, not region indexes: {exc}",
            ) from exc
        unknown = chosen - set(infos)
        if unknown:
            raise self._violation(
                Rule.REGIONS_RESULT,
                f"mediator_regions names region(s) {sorted(unknown)} the device does not have",
            )
        return chosen | own

    # -- the handlers ------------------------------------------------------------------------

    def _entry(self, info: RegionInfo) -> RegionEntry:
        index, size = info.index, info.size
        read, write = self._handlers(index, size)
        if not info.flags & RegionFlag.READ:
            read = self._refuse(index, size, "read")
        if not info.flags & RegionFlag.WRITE:
            write = self._refuse(index, size, "write")
        return RegionEntry(size, read, write)

    def _handlers(self, index: int, size: int) -> tuple[Reader, Writer]:
        """The region's two handlers, the bounds check folded into each (one call per access
        on the unmediated path, two on the mediated one)."""
        backend_read, backend_write = self.backend.read, self.backend.write
        own_region = index >= PCI_NUM_REGIONS
        shorter = getattr(self.backend, "region_handlers", None)  # a backend's own path
        handlers: tuple[Reader, Writer] | None = None
        if shorter is not None and not own_region:
            handlers = shorter(index, size)
        winner = self.winner
        rw = winner.hook("mediator_rw") if winner is not None and index in self.mediated else None
        if winner is None or rw is None:
            if own_region:
                refuse = self._refuse(index, size, "access: no device stands behind it")
                return refuse, refuse
            if handlers is not None:
                return handlers

            def backend_only_read(offset: int, count: int) -> bytes:
                if offset < 0 or count <= 0 or offset + count > size:
                    raise out_of_range(index, offset, count, size)
                return backend_read(index, offset, count)

            def backend_only_write(offset: int, data: bytes) -> int:
                if offset < 0 or not data or offset + len(data) > size:
                    raise out_of_range(index, offset, len(data), size)
                return backend_write(index, offset, data)

            return backend_only_read, backend_only_write
        handle, violation = winner.handle, winner.violation
        if handlers is not None:  # what the mediator passes through (bounds checked again)
            passed_read, passed_write = handlers
        else:
            passed_read = functools.partial(backend_read, index)
            passed_write = functools.partial(backend_write, index)

        def failure(exc: Exception, offset: int, count: int) -> Exception:
            where = f" for region {index} at {offset:#x}+{count:#x}"
            if isinstance(exc, OSError):
                return winner.without_errno(exc, where)
            return violation(Rule.ACCESS_ERRORS, f"mediator_rw raised {exc!r}{where}")

        def read(offset: int, count: int) -> bytes:
            if offset < 0 or count <= 0 or offset + count > size:
                raise out_of_range(index, offset, count, size)
            try:
                result = rw(handle, index, offset, count, None, False)
            except Exception as exc:
                if isinstance(exc, OSError) and exc.errno:
                    raise
                raise failure(exc, offset, count) from exc
            if result is None:
                if own_region:
                    raise violation(Rule.RW_RESULT, f"read of own region {index} passed through")
                return passed_read(offset, count)
            if not isinstance(result, bytes | bytearray | memoryview) or len(result) != count:
                raise violation(
                    Rule.RW_RESULT,
                    f"a read of region {index} at {offset:#x}+{count:#x} returned {result!r:.60}",
                )
            return bytes(result)

        def write(offset: int, data: bytes) -> int:
            if offset < 0 or not data or offset + len(data) > size:
                raise out_of_range(index, offset, len(data), size)
            try:
                result = rw(handle, index, offset, len(data), data, True)
            except Exception as exc:
                if isinstance(exc, OSError) and exc.errno:
                    raise
                raise failure(exc, offset, len(data)) from exc
            if result is None:
                if own_region:
                    raise violation(Rule.RW_RESULT, f"write of own region {index} passed through")
                return passed_write(offset, data)
            if result != len(data):
                raise violation(
                    Rule.RW_RESULT,
                    f"a write of region {index} at {offset:#x}+{len(data):#x} returned "
                    f"{result!r:.60}, not {len(data)}",
                )
            return len(data)

        return read, write

    def _refuse(self, index: int, size: int, what: str) -> Callable[[int, Any], Any]:
        name = self.name

        def refuse(offset: int, arg: Any) -> Any:
            count = arg if isinstance(arg, int) else len(arg)
            if offset < 0 or count <= 0 or offset + count > size:
                raise out_of_range(index, offset, count, size)
            raise AccessError(errno.EINVAL, f"{name}: region {index} does not allow {what}")

        return refuse


def out_of_range(index: int, offset: int, count: int, size: int) -> AccessError:
    """The refusal of an access ``offset+count`` that region ``index`` of ``size`` bytes does
    not hold."""
    return AccessError(
        errno.EINVAL,
        f"access {offset:#x}+{count:#x} is outside region {index} (size {size:#x})",
    )


def _mapped_pages(areas: Iterable[SparseMmapArea]) -> set[int]:
    pages: set[int] = set()
    for area in areas:
        pages.update(pages_of(area.offset, area.size))
    return pages
