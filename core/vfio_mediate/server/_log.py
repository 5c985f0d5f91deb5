"""The server's loggers, named once: every server module logs through them and the command
line sets their levels by these names."""

from __future__ import annotations

import logging

__all__ = ["LOGGER_NAME", "SESSIONS_LOGGER_NAME", "logger", "sessions_logger"]

LOGGER_NAME = "vfio_mediate.server"
"""The server's logger: connections, protocol violations, and (at INFO) each refused request."""
SESSIONS_LOGGER_NAME = f"{LOGGER_NAME}.sessions"
"""A child logger with one INFO line per session, which ``vfio-mediate serve`` shows by
default while the rest of the server's INFO lines wait for ``-v``."""

logger = logging.getLogger(LOGGER_NAME)
sessions_logger = logging.getLogger(SESSIONS_LOGGER_NAME)
