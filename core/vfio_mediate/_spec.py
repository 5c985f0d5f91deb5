"""Device specs: what a software PCI function looks like, as data (TOML or a model factory)."""

from __future__ import annotations

import codecs
import tomllib
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ._errors import DeviceSpecError

__all__ = ["BarSpec", "DeviceSpec", "MsixSpec", "load_spec"]

_U16 = Field(ge=0, le=0xFFFF)
MSIX_ENTRY_SIZE = 16
"""Bytes of one MSI-X table entry: address low, address high, data, vector control."""


class BarSpec(BaseModel):
    """One BAR: ``index`` 0-5, ``size`` (a power of two), ``kind`` and ``prefetchable``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    index: int = Field(ge=0, le=5)
    size: int = Field(gt=0, le=1 << 40)
    kind: Literal["mem32", "mem64", "io"] = "mem32"
    prefetchable: bool = False

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.size & (self.size - 1):
            raise ValueError(f"BAR{self.index} size {self.size:#x} is not a power of two")
        if self.kind == "io" and (self.size < 4 or self.size > 256 or self.prefetchable):
            raise ValueError(f"I/O BAR{self.index} must be 4-256 bytes and not prefetchable")
        if self.kind != "io" and self.size < 16:
            raise ValueError(f"memory BAR{self.index} must be at least 16 bytes")
        if self.kind == "mem32" and self.size > 1 << 31:
            raise ValueError(f"32-bit BAR{self.index} cannot be {self.size:#x} bytes")
        if self.kind == "mem64" and self.index == 5:
            raise ValueError("a 64-bit BAR needs the next BAR for its high half: not BAR5")
        return self


class MsixSpec(BaseModel):
    """The MSI-X capability: ``vectors`` and where the table and the PBA live."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    vectors: int = Field(ge=1, le=2048)
    table_bar: int = Field(ge=0, le=5)
    table_offset: int = Field(default=0, ge=0)
    pba_bar: int = Field(ge=0, le=5)
    pba_offset: int = Field(ge=0)

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.table_offset % 8 or self.pba_offset % 8:
            raise ValueError("MSI-X table and PBA offsets must be 8-byte aligned")
        return self

    @property
    def table_size(self) -> int:
        """Bytes of the vector table (16 per vector)."""
        return MSIX_ENTRY_SIZE * self.vectors

    @property
    def pba_size(self) -> int:
        """Bytes of the pending bit array (whole 64-bit words)."""
        return 8 * -(-self.vectors // 64)


class DeviceSpec(BaseModel):
    """A PCI function: identity, BARs and optional MSI-X; every PCIe function has config space
    of 4 KiB with a PCI Express capability."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(default="device", min_length=1)
    vendor_id: int = _U16
    device_id: int = _U16
    class_code: int = Field(ge=0, le=0xFFFFFF)
    subsystem_vendor_id: int = Field(default=0, ge=0, le=0xFFFF)
    subsystem_id: int = Field(default=0, ge=0, le=0xFFFF)
    revision: int = Field(default=0, ge=0, le=0xFF)
    interrupt_pin: int = Field(default=0, ge=0, le=4)
    bars: tuple[BarSpec, ...] = ()
    msix: MsixSpec | None = None

    @model_validator(mode="after")
    def _check(self) -> Self:
        taken: dict[int, str] = {}
        for bar in self.bars:
            halves = [bar.index, bar.index + 1] if bar.kind == "mem64" else [bar.index]
            for index in halves:
                if index in taken:
                    raise ValueError(f"BAR{index} is used twice ({taken[index]} and {bar.kind})")
                taken[index] = f"BAR{bar.index} {bar.kind}"
        if self.msix is not None:
            bars = {bar.index: bar for bar in self.bars}
            places = [
                ("table", self.msix.table_bar, self.msix.table_offset, self.msix.table_size),
                ("PBA", self.msix.pba_bar, self.msix.pba_offset, self.msix.pba_size),
            ]
            for what, index, offset, size in places:
                holder = bars.get(index)
                if holder is None or holder.kind == "io":
                    raise ValueError(f"MSI-X {what} BAR{index} is not a memory BAR of the device")
                if offset + size > holder.size:
                    raise ValueError(f"MSI-X {what} does not fit in BAR{index}")
            (_, tb, to, ts), (_, pb, po, ps) = places
            if tb == pb and to < po + ps and po < to + ts:
                raise ValueError("MSI-X table and PBA overlap")
        return self

    def bar(self, index: int) -> BarSpec | None:
        """The BAR with this index, or ``None``."""
        return next((bar for bar in self.bars if bar.index == index), None)

    @classmethod
    def from_plain(cls, data: Any, *, source: str) -> DeviceSpec:
        """Validate plain data into a spec; errors name ``source``."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise DeviceSpecError(f"{source}: invalid device spec: {_first_error(exc)}") from exc


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error["loc"])
    return f"{where}: {error['msg']}" if where else str(error["msg"])


def _not_utf8(raw: bytes, error: UnicodeDecodeError) -> str:
    """Why a spec file is not the UTF-8 that TOML must be, naming a common culprit."""
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "not UTF-8 but UTF-16 (TOML files are UTF-8)"
    return f"not UTF-8 (TOML files are UTF-8): byte {raw[error.start]:#04x} at offset {error.start}"


def load_spec(path: str | Path) -> DeviceSpec:
    """Load a device spec from a TOML file."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DeviceSpecError(f"{path}: cannot read device spec: {exc.strerror}") from exc
    try:
        text = raw.decode("utf-8-sig")  # an editor's byte order mark is no reason to refuse
    except UnicodeDecodeError as exc:
        raise DeviceSpecError(f"{path}: {_not_utf8(raw, exc)}; save it as UTF-8") from exc
    if "\x00" in text:
        raise DeviceSpecError(
            f"{path}: not UTF-8 text (NUL bytes: UTF-16 without a byte order mark?); "
            "save it as UTF-8"
        )
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise DeviceSpecError(f"{path}: not valid TOML: {exc}") from exc
    data.setdefault("name", path.stem)
    return DeviceSpec.from_plain(data, source=str(path))
