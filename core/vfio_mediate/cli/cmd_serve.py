"""``vfio-mediate serve``: serve mediated devices to a VMM over vfio-user sockets."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import tempfile
from pathlib import Path
from typing import Any

from .._backend import DeviceBackend
from .._device import MediatedDevice
from .._device_factory import create_device
from .._entry_points import default_device_model
from .._registry import MediatorRegistry
from ..server import SESSIONS_LOGGER_NAME, DeviceEndpoint, VfioUserServer, check_socket_directory
from ._defaults import DEFAULT_DEVICE_HELP


def register(subparsers: Any) -> None:
    """Add the ``serve`` subcommand."""
    parser = subparsers.add_parser(
        "serve",
        help="serve mediated devices to a VMM over vfio-user",
        description=(
            "Serve each device on a UNIX socket of its own (mode 0600) until Ctrl-C or SIGTERM, "
            "and print the QEMU options that attach them. The n-th --socket goes with the n-th "
            "--device; devices without one get a socket named after the device in "
            "$XDG_RUNTIME_DIR/vfio-mediate (or a private directory in the temporary directory). "
            "A device name already taken (a SPEC given again) gets -1, -2... added. Logs one "
            "line per session; 'vfio-mediate -v serve' also logs each refused request and why, "
            "-vv adds debugging detail. Refuses to start while an installed mediator failed to "
            "load (VFIO_MEDIATE_DISABLE=NAME leaves it out)."
        ),
    )
    parser.add_argument(
        "--device",
        action="append",
        metavar="SPEC",
        help=(
            "a device model name, a TOML spec file or the PCI address of a device bound to "
            f"vfio-pci (0000:01:10.0), repeatable ({DEFAULT_DEVICE_HELP})"
        ),
    )
    parser.add_argument(
        "--socket",
        action="append",
        default=[],
        metavar="PATH",
        help="the socket of the device given at the same position, repeatable",
    )
    parser.add_argument(
        "--allow-uid",
        action="append",
        type=int,
        default=[],
        metavar="UID",
        help="also accept clients of this user id (default: only this process's user)",
    )
    parser.set_defaults(func=run)


def default_socket_directory() -> Path:
    """``$XDG_RUNTIME_DIR/vfio-mediate``, else ``vfio-mediate-<uid>`` in the temporary
    directory; created with mode 0700 and checked to be the user's own."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) / "vfio-mediate" if runtime else None
    directory = base or Path(tempfile.gettempdir()) / f"vfio-mediate-{os.geteuid()}"
    directory.mkdir(mode=0o700, exist_ok=True)
    check_socket_directory(directory)
    return directory


def qemu_options(endpoint: DeviceEndpoint) -> str:
    """The ``-device`` option that attaches ``endpoint`` to QEMU."""
    device = {"driver": "vfio-user-pci", "socket": {"type": "unix", "path": str(endpoint.path)}}
    return f"-device '{json.dumps(device, separators=(',', ':'))}'"


def _numbered(name: str, taken: set[str]) -> str:
    """``name-1``, ``name-2``...: the first not in ``taken``."""
    number = 1
    while f"{name}-{number}" in taken:
        number += 1
    return f"{name}-{number}"


def _create_devices(specs: list[str], backends: list[DeviceBackend]) -> None:
    """Create a device per SPEC into ``backends``, each with a name of its own: a device whose
    name is taken (its SPEC given again, or another SPEC of that name) is numbered."""
    own_names: dict[str, str] = {}
    taken: set[str] = set()
    for spec in specs:
        own = own_names.get(spec)
        if own is not None:
            backend = create_device(spec, name=_numbered(own, taken))
        else:
            backend = create_device(spec)
            own_names[spec] = backend.name
            if backend.name in taken:
                backend.close()
                backend = create_device(spec, name=_numbered(own_names[spec], taken))
        backends.append(backend)
        taken.add(backend.name)


def _socket_paths(names: list[str], sockets: list[str]) -> list[Path]:
    """The n-th ``--socket``, else ``<device name>.sock`` in the default directory."""
    paths = [Path(path) for path in sockets]
    if len(paths) < len(names):
        directory = default_socket_directory()
        for name in names[len(paths) :]:
            if "/" in name:
                raise SystemExit(f"vfio-mediate serve: device {name!r} needs a --socket")
            paths.append(directory / f"{name}.sock")
    return paths


def run(args: argparse.Namespace) -> int:
    """Serve until interrupted; exit status 0 after a clean shutdown."""
    specs: list[str] = args.device or [default_device_model()]
    if len(args.socket) > len(specs):
        raise SystemExit("vfio-mediate serve: more --socket than --device options")
    if args.verbose == 0:
        # One line per session at the default verbosity; refused requests wait for -v.
        logging.getLogger(SESSIONS_LOGGER_NAME).setLevel(logging.INFO)
    registry = MediatorRegistry.from_entry_points()
    registry.require_loaded()  # never serve a broken mediator's devices unmediated
    backends: list[DeviceBackend] = []
    try:
        _create_devices(specs, backends)
        paths = _socket_paths([backend.name for backend in backends], args.socket)
        devices = [MediatedDevice(backend, registry) for backend in backends]
        uids = [os.geteuid(), *args.allow_uid]
        asyncio.run(_serve(devices, paths, uids))
    finally:
        for backend in backends:
            backend.close()
    return 0


async def _serve(devices: list[MediatedDevice], paths: list[Path], uids: list[int]) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with VfioUserServer(allow_uids=uids) as server:
        endpoints = [
            await server.add(device, path) for device, path in zip(devices, paths, strict=True)
        ]
        for endpoint in endpoints:
            backend = endpoint.device.backend
            identity = f"{backend.identity.vendor_id:04x}:{backend.identity.device_id:04x}"
            print(f"serving {endpoint.name} ({identity}) on {endpoint.path}")
        print("attach to QEMU with guest memory that the server can map (shared memfd):")
        print("  -object memory-backend-memfd,id=mem0,size=<guest RAM>,share=on")
        print("  -machine memory-backend=mem0")
        for endpoint in endpoints:
            print(f"  {qemu_options(endpoint)}")
        print("Ctrl-C stops", flush=True)
        await stop.wait()
