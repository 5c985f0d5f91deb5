"""Serve mediated devices to a VMM over vfio-user (QEMU's ``-device vfio-user-pci``).

``VfioUserServer`` serves each ``MediatedDevice`` on a UNIX socket of its own: it accepts on an
asyncio loop (``BackgroundServer`` runs one on a thread for blocking code) and runs each
session on a thread of its own (``_engine``: reading, framing, dispatching; one module per
command group: ``_negotiation``, ``_regions``, ``_dma_maps``, ``_irqs``, ``_features``; the
device as ``_served.ServedDevice`` sees it). ``VfioUserClient`` speaks the protocol from Python.
``_codec`` holds the wire format, once. The server logs under ``LOGGER_NAME``, one line per
session under ``SESSIONS_LOGGER_NAME``.
"""

from ._client import Message, VfioUserClient
from ._codec import (
    HEADER,
    Command,
    DmaLayout,
    HeaderFlag,
    ProtocolError,
    VfioUserCapabilities,
    pack_message,
)
from ._config import ServerConfig
from ._log import LOGGER_NAME, SESSIONS_LOGGER_NAME
from ._server import BackgroundServer, DeviceEndpoint, VfioUserServer, check_socket_directory

__all__ = [
    "HEADER",
    "LOGGER_NAME",
    "SESSIONS_LOGGER_NAME",
    "BackgroundServer",
    "Command",
    "DeviceEndpoint",
    "DmaLayout",
    "HeaderFlag",
    "Message",
    "ProtocolError",
    "ServerConfig",
    "VfioUserCapabilities",
    "VfioUserClient",
    "VfioUserServer",
    "check_socket_directory",
    "pack_message",
]
