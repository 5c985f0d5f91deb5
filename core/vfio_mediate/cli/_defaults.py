"""Defaults that several subcommands share (not a ``cmd_`` module, so not a subcommand)."""

from __future__ import annotations

__all__ = ["DEFAULT_DEVICE_HELP"]

DEFAULT_DEVICE_HELP = "default: the first installed device model, by name"
"""What ``--help`` says of a missing ``--device`` (``default_device_model`` picks it)."""
