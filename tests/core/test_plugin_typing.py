"""The shipped plugins declare their types (PEP 561), so a vendor's code type-checks against
them as against the core."""

from __future__ import annotations

from importlib import metadata

import pytest


@pytest.mark.parametrize("distribution", ["i40e-mediator", "null-mediator"])
def test_each_installed_distribution_ships_py_typed(distribution: str) -> None:
    files = metadata.files(distribution) or []
    assert any(file.name == "py.typed" for file in files), f"{distribution} lacks py.typed"
