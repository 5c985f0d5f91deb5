"""``vfio-mediate migrate-demo``: a live migration you can watch.

A source device runs under a guest workload that keeps sending looping traffic; its memory is
pre-copied in rounds driven by the device's dirty bitmap plus the pages the guest CPU wrote,
then the device stops, the last pages and the device state go to a destination device with its
own memory, and the destination resumes. The guest then continues on the destination. The
workload is the device model's own, found in the ``vfio_mediate.workloads`` entry points.

``--transport in-process`` (the default) builds both devices in this process.
``--transport vfio-user`` serves each device from a ``vfio-mediate serve`` process of its own
and acts as their VMM: the guest memory of each side is a memfd mapped into its server, the
guest's traffic goes as region writes, and migration and dirty logging over the sockets.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, TextIO

from .._device import MediatedDevice
from .._device_factory import create_device
from .._dma import anonymous_memory
from .._entry_points import default_device_model, find_workload
from .._errors import DeviceSpecError, VfioMediateError
from .._live_migration import LiveMigration, MigratableDevice, MigrationProgress, MigrationReport
from .._registry import MediatorRegistry
from ..server import VfioUserClient
from ._arguments import count, memory_mib

GUEST_IOVA = 0x1_0000_0000
BAR_WIDTH = 30
TRANSPORTS = ("in-process", "vfio-user")
SERVER_START_SECONDS = 60.0
"""How long a ``serve`` process may take to listen (imports on a loaded machine are slow)."""
# A serve process for the model in argv[1]: the workload's far end (``Workload``) made there
# first and kept for the process's life, then ``vfio-mediate serve`` with the rest of argv.
_SERVE = (
    "import sys\n"
    "from vfio_mediate._entry_points import find_workload\n"
    "from vfio_mediate.cli import main\n"
    "far_end = getattr(find_workload(sys.argv[1]), 'far_end', None)\n"
    "kept = far_end() if far_end is not None else None\n"
    "sys.exit(main(sys.argv[2:]))\n"
)

Side = tuple[MigratableDevice, memoryview]


def register(subparsers: Any) -> None:
    """Add the ``migrate-demo`` subcommand."""
    parser = subparsers.add_parser(
        "migrate-demo",
        help="live-migrate a device under traffic and check the result",
        description="Migrate a device model and its guest memory to a second device while a "
        "guest keeps it busy, with dirty page tracking; report rounds, pages, downtime and a "
        "verdict (exit status 1 if the verdict is not OK).",
    )
    parser.add_argument(
        "--device",
        metavar="MODEL",
        help="a device model with a guest workload (default: the first installed one, by name)",
    )
    parser.add_argument("--memory", type=memory_mib, default=16, metavar="MIB", help="guest memory")
    parser.add_argument("--rounds", type=count, default=8, help="most pre-copy rounds")
    parser.add_argument(
        "--stop-pages", type=count, default=64, metavar="N", help="stop when a round copies <= N"
    )
    parser.add_argument(
        "--slices", type=count, default=20, metavar="N", help="guest slices before and after"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the guest's traffic")
    parser.add_argument(
        "--transport",
        choices=TRANSPORTS,
        default="in-process",
        help="in-process: both devices in this process (default); vfio-user: each served by "
        "a 'vfio-mediate serve' process of its own, this command acting as their VMM",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Build both sides, migrate, continue on the destination, report."""
    model = args.device or default_device_model(with_workload=True)
    factory = find_workload(model)
    size = args.memory << 20
    with ExitStack() as stack:
        if args.transport == "vfio-user":
            directory = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            sides = [_served_side(stack, model, role, directory, size) for role in _ROLES]
            served_by = "over vfio-user, each device in a vfio-mediate serve process of its own"
        else:
            registry = MediatorRegistry.from_entry_points()
            registry.require_loaded()
            local = [_local_side(stack, model, role, registry, size) for role in _ROLES]
            winner = local[0][0].mediator
            served_by = f"mediator {winner.name if winner else 'none'}"
            sides = [(device, memory) for device, memory in local]
        (source, source_memory), (destination, destination_memory) = sides
        source_memory[:] = os.urandom(size)  # the guest's RAM has content to carry over
        guest = factory(source, source_memory, GUEST_IOVA, seed=args.seed)
        guest.start()
        for _ in range(args.slices):
            guest.run()
        before = guest.stats()
        display = None if args.json else Progress(sys.stdout)
        if display is not None:
            print(
                f"migrating {model} under traffic: {args.memory} MiB of guest memory, {served_by}"
            )
        report = LiveMigration(
            source,
            destination,
            source_memory,
            destination_memory,
            GUEST_IOVA,
            guest,
            max_rounds=args.rounds,
            stop_pages=args.stop_pages,
        ).run(display)
        moved = guest.move_to(destination, destination_memory)
        for _ in range(args.slices):
            moved.run()
        after = moved.stats()
    continues = after["received"] > before["received"] and not after.get("corrupt", 0)
    result = {
        "device": model,
        "transport": args.transport,
        "memory_bytes": size,
        **report.as_dict(),
        "traffic_before": before,
        "traffic_after": after,
        "traffic_continues": continues,
    }
    result["ok"] = report.ok and continues
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_report(report, before, after, continues)
    return 0 if result["ok"] else 1


_ROLES = ("source", "destination")


def _local_side(
    stack: ExitStack, model: str, role: str, registry: MediatorRegistry, size: int
) -> tuple[MediatedDevice, memoryview]:
    """A device of this process, its guest memory mapped into its DMA space."""
    backend = create_device(model, name=f"{model}-{role}")
    stack.callback(backend.close)
    fd, memory = anonymous_memory(size, f"guest-{role}")
    os.close(fd)  # the mapping keeps the memory
    if backend.dma is None:
        raise DeviceSpecError(f"{model} does no DMA: it has no guest memory to migrate")
    backend.dma.map_memory(GUEST_IOVA, memory)
    device = MediatedDevice(backend, registry)
    device.open()
    stack.callback(device.close)
    return device, memoryview(memory)


def _served_side(stack: ExitStack, model: str, role: str, directory: Path, size: int) -> Side:
    """A device served by a ``vfio-mediate serve`` process of its own, and a client of it
    whose guest memory (a memfd) is DMA-mapped into the server."""
    path = directory / f"{role}.sock"
    errors = stack.enter_context((directory / f"{role}.log").open("w+"))
    command = [
        sys.executable,
        "-c",
        _SERVE,
        model,
        "serve",
        "--device",
        model,
        "--socket",
        str(path),
    ]
    process = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errors
    )
    stack.callback(_stop, process)
    client = _connect(process, path, errors, role)
    stack.callback(client.close)
    client.name = f"{model}-{role}"
    # The mapping lives as long as the views of it (the guest's and the migration's).
    memory = client.dma_map_memfd(GUEST_IOVA, size)
    return client, memoryview(memory)


def _connect(
    process: subprocess.Popen[bytes], path: Path, errors: TextIO, role: str
) -> VfioUserClient:
    """Connect to the server once it listens; a server that exits first is an error."""
    deadline = time.monotonic() + SERVER_START_SECONDS
    while True:
        if process.poll() is not None:
            errors.seek(0)
            lines = errors.read().strip().splitlines() or [f"exit status {process.returncode}"]
            raise VfioMediateError(f"the {role}'s vfio-mediate serve failed: {lines[-1]}")
        if path.exists():
            try:
                return VfioUserClient.connect(path)
            except ConnectionRefusedError:
                pass  # bound but not yet listening
        if time.monotonic() > deadline:
            raise VfioMediateError(
                f"the {role}'s vfio-mediate serve did not listen within {SERVER_START_SECONDS} s"
            )
        time.sleep(0.05)


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class Progress:
    """A progress line per round: redrawn in place on a terminal, one plain line otherwise."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.tty = stream.isatty()

    def __call__(self, event: MigrationProgress) -> None:
        """Show ``event``."""
        done = event.copied == event.total
        if event.phase in ("verify", "done"):
            if self.tty:
                self.stream.write("\r\033[K")
            return
        label = f"round {event.round:>2} {event.phase:<9}"
        if self.tty:
            filled = BAR_WIDTH * event.copied // event.total if event.total else BAR_WIDTH
            bar = "#" * filled + "." * (BAR_WIDTH - filled)
            self.stream.write(f"\r{label} [{bar}] {event.copied:>6}/{event.total:<6} pages")
            if done:
                self.stream.write("\n")
            self.stream.flush()
        elif done:
            print(f"{label} {event.total} pages copied", file=self.stream)


def print_report(
    report: MigrationReport, before: dict[str, int], after: dict[str, int], continues: bool
) -> None:
    """The rounds, the downtime and the verdict, as a table."""
    print(f"{'ROUND':>5}  {'PHASE':<9} {'DEVICE':>7} {'CPU':>6} {'COPIED':>7} {'MS':>8}")
    for done in report.rounds:
        device = "-" if done.phase == "full" else str(done.device_pages)
        cpu = "-" if done.phase == "full" else str(done.cpu_pages)
        print(
            f"{done.number:>5}  {done.phase:<9} {device:>7} {cpu:>6} {done.pages:>7} "
            f"{done.seconds * 1000:>8.2f}"
        )
    total = sum(done.pages for done in report.rounds)
    print(
        f"pages copied {total} ({total / report.memory_pages:.2f}x memory), "
        f"converged {'yes' if report.converged else 'no'}"
    )
    print(
        f"device state {report.state_bytes} bytes "
        f"(pre-copy {report.precopy_state_bytes}), downtime {report.downtime * 1000:.2f} ms"
    )
    received = after["received"] - before["received"]
    print(f"memory equal byte for byte: {_verdict(report.memory_equal)}")
    print(f"device state equal:         {_verdict(report.state_equal)}")
    print(
        f"traffic continues:          {_verdict(continues)} "
        f"({received} packets received on the destination, {after.get('corrupt', 0)} corrupt)"
    )
    print(f"verdict: {'OK' if report.ok and continues else 'FAILED'}")


def _verdict(ok: bool) -> str:
    return "yes" if ok else "NO"
