"""Facts the server and its command line keep in one place, imported by every user: the
logger names, the page size; and no default device of their own. A second spelling would drift."""

from __future__ import annotations

import re
from pathlib import Path

import vfio_mediate.cli
import vfio_mediate.server
from vfio_mediate.cli import build_parser
from vfio_mediate.server import LOGGER_NAME, SESSIONS_LOGGER_NAME, VfioUserCapabilities
from vfio_mediate.uapi import PAGE_SIZE

SERVER = Path(vfio_mediate.server.__file__).parent
CLI = Path(vfio_mediate.cli.__file__).parent


def sources_matching(pattern: str) -> list[str]:
    """The server and command-line modules whose source matches ``pattern``."""
    found = re.compile(pattern)
    paths = sorted([*SERVER.glob("*.py"), *CLI.glob("*.py")])
    return [f"{path.parent.name}/{path.name}" for path in paths if found.search(path.read_text())]


def test_the_server_logger_names_are_spelled_once() -> None:
    assert SESSIONS_LOGGER_NAME.startswith(f"{LOGGER_NAME}.")
    assert sources_matching(r"[\"']vfio_mediate\.server") == ["server/_log.py"]


def test_the_page_size_is_the_uapi_one() -> None:
    assert sources_matching(r"PAGE_SIZE = ") == []
    assert VfioUserCapabilities().pgsizes == PAGE_SIZE


def test_no_subcommand_names_a_device_model() -> None:
    """Without ``--device`` a subcommand asks ``default_device_model``: no vendor's model is
    spelled in the server or the command line."""
    assert sources_matching(r"i40e") == []
    parser = build_parser()
    for command in ("serve", "probe", "migrate-demo"):
        assert not parser.parse_args([command]).device
