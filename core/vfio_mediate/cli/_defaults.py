"""Defaults that several subcommands share (not a ``cmd_`` module, so not a subcommand)."""

from __future__ import annotations

__all__ = ["DEFAULT_DEVICE"]

DEFAULT_DEVICE = "i40e-vf"
"""The device model a subcommand uses when no ``--device`` is given."""
