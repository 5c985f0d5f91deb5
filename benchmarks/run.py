"""Every benchmark of the project in one run, and the speed targets checked against them.

Run: ``python benchmarks/run.py [--json] [--peer PATH] [--rounds N] [--load N] [--spread]``.
Sections:
the per-access path (``bench_rw``), the socket path against its floors with a minimal raw
client and with ``VfioUserClient`` (``bench_socket``), a mapped access, a dirty report and
STOP_COPY throughput (``bench_migration``), a soak under hostile clients (``bench_soak``), and
with ``--vfio-device ADDRESS`` a device bound to vfio-pci (``bench_vfio``). With ``--peer PATH``
(a built libvfio-user ``samples/gpio-pci-idio-16``) the same raw client drives both servers in
alternating short slices over many rounds and the median of the per-round ratios ours/C is given
per measure, with its quartiles; client and servers share one CPU unless ``--spread``. The
socket path is measured twice: on the machine as it is, then loaded with ``--load N`` (default
2) busy processes on the other CPUs (``socket_loaded``; ``--load 0`` leaves it out).
``--json`` prints one JSON object instead of the text report.

Targets, on both: ours/C >= 0.9 on config read 4 B, config write 4 B, BAR read 256 B and region
info; ``VfioUserClient`` within 1.2x of the raw client.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

import bench_migration
import bench_rw
import bench_soak
import bench_socket
import bench_vfio

PEER_TARGET = 0.9
CLIENT_TARGET = 1.2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--peer", type=Path, metavar="PATH", help="libvfio-user gpio-pci-idio-16")
    parser.add_argument("--rounds", type=int, default=15, help="rounds of alternating slices")
    parser.add_argument("--skip-soak", action="store_true", help="leave out the soak")
    parser.add_argument(
        "--spread",
        action="store_true",
        help="socket path: let the scheduler place client and servers (default: one CPU)",
    )
    parser.add_argument(
        "--load",
        type=int,
        default=2,
        metavar="N",
        help="socket path: measure again with N busy processes on the other CPUs (0: not)",
    )
    parser.add_argument(
        "--vfio-device", metavar="ADDRESS", help="also measure a device bound to vfio-pci"
    )
    args = parser.parse_args()
    if args.peer is not None and not args.peer.is_file():
        raise SystemExit(f"run.py: --peer {args.peer}: no such file")
    if args.load < 0:
        raise SystemExit("run.py: --load takes N >= 0")
    cpu = None if args.spread else bench_socket.one_cpu()
    report: dict[str, Any] = {
        "per_access_ns": bench_rw.measurements(100_000),
        "socket": bench_socket.measurements(args.rounds, args.peer, cpu),
    }
    if args.load:
        with bench_socket.busy_load(args.load, bench_socket.load_cpus(cpu)) as placed:
            loaded = bench_socket.measurements(args.rounds, args.peer, cpu)
        report["socket_loaded"] = {**loaded, "load_cpus": placed}
    report["migration"] = bench_migration.measurements()
    if not args.skip_soak:
        report["soak"] = bench_soak.measurements()
    if args.vfio_device is not None:
        report["vfio_pci_ns"] = bench_vfio.run(args.vfio_device, 20_000)
    report["targets"] = targets(report["socket"])
    if "socket_loaded" in report:
        report["targets_loaded"] = targets(report["socket_loaded"])
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print_report(report)


def targets(socket_report: dict[str, Any]) -> dict[str, Any]:
    """Each target with its measured value and whether it is met."""
    checks: dict[str, Any] = {}
    for name, ratio in socket_report.get("ours_over_c", {}).items():
        if name in bench_socket.PEER_TARGET_MEASURES:
            checks[f"ours/C {name}"] = {
                "median": ratio["median"],
                "target": f">= {PEER_TARGET}",
                "met": ratio["median"] >= PEER_TARGET,
            }
    for name, ratio in socket_report["client_over_raw"].items():
        checks[f"VfioUserClient/raw {name}"] = {
            "median": ratio,
            "target": f"<= {CLIENT_TARGET}",
            "met": ratio <= CLIENT_TARGET,
        }
    return checks


def print_report(report: dict[str, Any]) -> None:
    print("per-access path, 4-byte read (ns):")
    for name, value in report["per_access_ns"].items():
        print(f"  {name:<40} {value:10.0f}")
    for key, title in (("socket", "quiet"), ("socket_loaded", "loaded")):
        if key not in report:
            continue
        socket_report = report[key]
        print(f"socket path, {title} (us per round trip, median of rounds):")
        if "load_cpus" in socket_report:
            print(f"  (busy processes on CPUs {socket_report['load_cpus']})")
        for name, value in socket_report["us"].items():
            print(f"  {name:<40} {value:10.2f}")
        for name, ratio in socket_report.get("ours_over_c", {}).items():
            low, high = ratio["quartiles"]
            rounds = ", ".join(f"{r:.2f}" for r in ratio["rounds"])
            print(
                f"  ours/C {name:<33} {ratio['median']:10.2f}  (quartiles {low:.2f}-{high:.2f};"
                f" rounds: {rounds})"
            )
    print("migration:")
    for name, value in report["migration"].items():
        print(f"  {name:<40} {value}")
    for name, value in report.get("soak", {}).items():
        print(f"  soak {name:<35} {value}")
    for name, value in report.get("vfio_pci_ns", {}).items():
        print(f"  vfio-pci {name:<31} {value}")
    for key, title in (("targets", "quiet"), ("targets_loaded", "loaded")):
        print(f"targets, {title}:")
        for name, check in report.get(key, {}).items():
            verdict = "met" if check["met"] else "NOT met"
            print(f"  {name:<40} {check['median']:6.2f} {check['target']:>7}  {verdict}")


if __name__ == "__main__":
    main()
