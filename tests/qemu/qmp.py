"""A small QMP client: QEMU's JSON machine protocol over a UNIX socket."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any


class QmpError(Exception):
    """QEMU answered a command with an error."""


class Qmp:
    """Connects (retrying until QEMU listens), negotiates, then runs commands; events are kept."""

    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self.sock.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.sock.settimeout(timeout)
        self.reader = self.sock.makefile("rb")
        self.events: list[dict[str, Any]] = []
        greeting = self._receive()
        assert "QMP" in greeting, greeting
        self.command("qmp_capabilities")

    def _receive(self) -> dict[str, Any]:
        line = self.reader.readline()
        if not line:
            raise ConnectionError("QEMU closed the QMP socket")
        message: dict[str, Any] = json.loads(line)
        return message

    def command(self, name: str, **arguments: Any) -> Any:
        """Run ``name`` and return its ``return`` value."""
        request: dict[str, Any] = {"execute": name}
        if arguments:
            request["arguments"] = arguments
        self.sock.sendall(json.dumps(request).encode() + b"\n")
        while True:
            message = self._receive()
            if "event" in message:
                self.events.append(message)
                continue
            if "error" in message:
                raise QmpError(f"{name}: {message['error']}")
            return message.get("return")

    def close(self) -> None:
        """Close the connection."""
        self.reader.close()
        self.sock.close()


def find_pci_device(qmp: Qmp, vendor: int, device: int) -> dict[str, Any] | None:
    """The ``query-pci`` entry of the device with these ids, on any bus."""
    for bus in qmp.command("query-pci"):
        for entry in bus["devices"]:
            ids = entry["id"]
            if (ids["vendor"], ids["device"]) == (vendor, device):
                found: dict[str, Any] = entry
                return found
    return None
