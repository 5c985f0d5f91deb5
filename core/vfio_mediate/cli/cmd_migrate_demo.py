"""``vfio-mediate migrate-demo``: a live migration you can watch.

A source device runs under a guest workload that keeps sending looping traffic; its memory is
pre-copied in rounds driven by the device's dirty bitmap plus the pages the guest CPU wrote,
then the device stops, the last pages and the device state go to a destination device with its
own memory, and the destination resumes. The guest then continues on the destination. The
workload is the device model's own, found in the ``vfio_mediate.workloads`` entry points.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, TextIO

from .._device import MediatedDevice
from .._devices import create_device
from .._dma import anonymous_memory
from .._migrate import LiveMigration, MigrationProgress, MigrationReport, find_workload
from .._pci import EmulatedPciDevice
from .._registry import MediatorRegistry
from ._arguments import count, memory_mib
from ._defaults import DEFAULT_DEVICE

GUEST_IOVA = 0x1_0000_0000
BAR_WIDTH = 30


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
        default=DEFAULT_DEVICE,
        metavar="MODEL",
        help=f"a device model with a guest workload (default: {DEFAULT_DEVICE})",
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
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Build both sides, migrate, continue on the destination, report."""
    factory = find_workload(args.device)
    registry = MediatorRegistry.from_entry_points()
    registry.require_loaded()
    size = args.memory << 20
    backends: list[EmulatedPciDevice] = []
    try:
        sides = []
        for role in ("source", "destination"):
            backend = create_device(args.device, name=f"{args.device}-{role}")
            backends.append(backend)
            fd, memory = anonymous_memory(size, f"guest-{role}")
            os.close(fd)  # the mapping keeps the memory
            backend.dma.map_memory(GUEST_IOVA, memory)
            device = MediatedDevice(backend, registry)
            device.open()
            sides.append((device, memoryview(memory)))
        (source, source_memory), (destination, destination_memory) = sides
        source_memory[:] = os.urandom(size)  # the guest's RAM has content to carry over
        guest = factory(source, source_memory, GUEST_IOVA, seed=args.seed)
        guest.start()
        for _ in range(args.slices):
            guest.run()
        before = guest.stats()
        display = None if args.json else Progress(sys.stdout)
        if display is not None:
            winner = source.mediator
            print(
                f"migrating {args.device} under traffic: {args.memory} MiB of guest memory, "
                f"mediator {winner.name if winner else 'none'}"
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
        for device, _ in sides:
            device.close()
    finally:
        for backend in backends:
            backend.close()
    continues = after["received"] > before["received"] and not after.get("corrupt", 0)
    result = {
        "device": args.device,
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
