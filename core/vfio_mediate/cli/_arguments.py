"""Argument types that several subcommands share: refused values become one usage line."""

from __future__ import annotations

import argparse
import os

__all__ = ["count", "memory_mib", "positive"]


def _integer(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def positive(text: str) -> int:
    """An integer >= 1 (a size, an amount of memory)."""
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def count(text: str) -> int:
    """An integer >= 0 (how many times, how many pages)."""
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {value}")
    return value


def memory_mib(text: str) -> int:
    """Mebibytes of memory to allocate: >= 1 and no more than the machine has."""
    value = positive(text)
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") >> 20
    if value > total:
        raise argparse.ArgumentTypeError(f"{value} MiB is more than this machine's {total} MiB")
    return value
