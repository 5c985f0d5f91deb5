"""Round trips over the vfio-user socket: against their floor, through ``VfioUserClient``, and
against libvfio-user's C server.

Run: ``python benchmarks/bench_socket.py [--peer PATH]`` (or through ``run.py``). The server is
``vfio-mediate serve`` in a process of its own, as a VMM would meet it. The floor is a bare
blocking Python UNIX-socket ping-pong of a config read's sizes. Each measure is taken in short
slices, alternating between the targets, over many rounds; a figure is the median over rounds.
With ``--peer PATH`` (libvfio-user's ``samples/gpio-pci-idio-16``, built by hand) the same raw
client drives both servers and ``ours_over_c`` is the median of per-round speed ratios. All of
it runs on one CPU (``--spread``: wherever the scheduler puts it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import raw_client
from raw_client import CONFIG_REGION, RawClient, region_info, region_read, region_write

from vfio_mediate.server import VfioUserClient
from vfio_mediate.uapi import RegionIndex

ECHO_SERVER = """
import socket, sys
listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
listener.bind(sys.argv[1]); listener.listen(1)
conn, _ = listener.accept()
request, reply = int(sys.argv[2]), b"r" * int(sys.argv[3])
while True:
    got = b""
    while len(got) < request:
        chunk = conn.recv(request - len(got))
        if not chunk:
            sys.exit(0)
        got += chunk
    conn.sendall(reply)
"""

LOAD_WORKER = """
import hashlib, os, sys
os.sched_setaffinity(0, {int(sys.argv[1])})
if sys.argv[2] == "hash":  # memory traffic: a 16 MiB buffer hashed over and over
    data = os.urandom(16 << 20)
    while True:
        hashlib.sha256(data).digest()
while True:  # the interpreter alone
    pass
"""

STARTUP_TIMEOUT = 30.0
SLICE = 1000
"""Round trips per slice: short (some 10-30 ms), so that every target sees the same load."""
_INTERRUPT_LINE = 0x3C
_LINE_VALUE = b"\x0b\0\0\0"  # interrupt line 11 (pin, min_gnt, max_lat are read-only)
_C_BAR = 2  # gpio-pci-idio-16's one BAR (256 bytes)
PEER_TARGET_MEASURES = ("config_read_4", "config_write_4", "bar_read_256", "region_info")

# name: (our request, the C server's request or None)
MEASURES: dict[str, tuple[bytes, bytes | None]] = {
    "config_read_4": (region_read(CONFIG_REGION, 0, 4),) * 2,
    "config_write_4": (region_write(CONFIG_REGION, _INTERRUPT_LINE, _LINE_VALUE),) * 2,
    "bar_read_256": (region_read(RegionIndex.BAR0, 0x1000, 256), region_read(_C_BAR, 0, 256)),
    "bar_read_4096": (region_read(RegionIndex.BAR0, 0x1000, 4096), None),
    # BAR3 (the MSI-X table) is not mediated: the engine's cost without the i40e model's
    "msix_bar_read_256": (region_read(RegionIndex.BAR3, 0, 256), region_read(_C_BAR, 0, 256)),
    "region_info": (region_info(CONFIG_REGION),) * 2,
}


def wait_for_serve(process: subprocess.Popen[str]) -> None:
    """Read ``vfio-mediate serve``'s output up to "Ctrl-C stops", printed once it listens."""
    assert process.stdout is not None
    watchdog = threading.Timer(STARTUP_TIMEOUT, process.kill)
    watchdog.start()
    try:
        for line in process.stdout:
            if line.startswith("Ctrl-C stops"):
                return
    finally:
        watchdog.cancel()
    raise SystemExit(f"vfio-mediate serve did not start (exit status {process.wait()})")


def serve_command() -> str:
    """The ``vfio-mediate`` command next to this Python."""
    return shutil.which("vfio-mediate") or str(Path(sys.executable).parent / "vfio-mediate")


def timed_slice(call: Callable[[], object], number: int) -> float:
    """Microseconds per call over ``number`` calls."""
    start = time.perf_counter()
    for _ in range(number):
        call()
    return (time.perf_counter() - start) / number * 1e6


def raw_call(client: RawClient, request: bytes) -> Callable[[], object]:
    call = client.call_bytes
    return lambda: call(request)


def client_calls(client: VfioUserClient) -> dict[str, Callable[[], object]]:
    """The measures through ``VfioUserClient``."""
    return {
        "config_read_4": lambda: client.read(CONFIG_REGION, 0, 4),
        "config_write_4": lambda: client.write(CONFIG_REGION, _INTERRUPT_LINE, _LINE_VALUE),
        "bar_read_256": lambda: client.read(RegionIndex.BAR0, 0x1000, 256),
        "bar_read_4096": lambda: client.read(RegionIndex.BAR0, 0x1000, 4096),
        "msix_bar_read_256": lambda: client.read(RegionIndex.BAR3, 0, 256),
        "region_info": lambda: client.region_info(CONFIG_REGION),
    }


def rounds_of(calls: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """Per call, the time of one slice in each round; the calls alternate within a round (in
    an order that turns every round, so that none always follows the same one)."""
    names = list(calls)
    times: dict[str, list[float]] = {name: [] for name in names}
    for number in range(rounds):
        turned = names[number % len(names) :] + names[: number % len(names)]
        for name in turned:
            times[name].append(timed_slice(calls[name], SLICE))
    return times


def start_peer(peer: Path, path: Path) -> subprocess.Popen[bytes]:
    """libvfio-user's sample server on ``path``."""
    return subprocess.Popen(
        [str(peer), str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def one_cpu() -> int:
    """The CPU the measurements run on: the last one this process may use."""
    return max(os.sched_getaffinity(0))


def load_cpus(cpu: int | None) -> list[int]:
    """Where the load of a loaded measurement runs: every CPU but the measured one (the
    measured one itself when there is no other)."""
    allowed = sorted(os.sched_getaffinity(0))
    others = [other for other in allowed if other != cpu]
    return others or allowed


@contextlib.contextmanager
def busy_load(workers: int, cpus: list[int]) -> Iterator[list[int]]:
    """``workers`` busy processes spread over ``cpus`` (the interpreter spinning, and SHA-256
    over 16 MiB, in turn) while the block runs; yields the CPU of each."""
    placed = [cpus[number % len(cpus)] for number in range(workers)]
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", LOAD_WORKER, str(where), "hash" if number % 2 else "spin"]
        )
        for number, where in enumerate(placed)
    ]
    try:
        time.sleep(0.5)  # every worker running before the first slice
        yield placed
    finally:
        for process in processes:
            process.kill()
            process.wait()


def measurements(rounds: int, peer: Path | None, cpu: int | None = None) -> dict[str, Any]:
    """Microseconds per round trip (median of rounds) of every measure and target, the
    VfioUserClient/raw ratios, and with ``peer`` the median of per-round ours/C speed ratios
    (with the spread of the rounds). With ``cpu``, the clients and every server run on that
    CPU alone: a round trip is then two direct switches, not two wake-ups across CPUs whose
    cost depends on where the scheduler put each process (whole rounds of both servers
    otherwise come out several times slower or faster)."""
    allowed = os.sched_getaffinity(0)
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})  # the servers started below inherit it
    try:
        report = _measurements(rounds, peer)
    finally:
        os.sched_setaffinity(0, allowed)
    report["cpu"] = cpu
    return report


def _measurements(rounds: int, peer: Path | None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as directory:
        ours_path = Path(directory) / "vf.sock"
        client_path = Path(directory) / "vf-client.sock"
        echo_path = Path(directory) / "echo.sock"
        c_path = Path(directory) / "c.sock"
        # one device for the raw client, one for VfioUserClient (a client per device)
        devices = ("--device", "i40e-vf", "--device", "i40e-vf")
        sockets = ("--socket", str(ours_path), "--socket", str(client_path))
        server = subprocess.Popen(
            [serve_command(), "serve", *devices, *sockets],
            stdout=subprocess.PIPE,
            text=True,
        )
        # a REGION_READ of 4 bytes: 16 + 16 byte request, 16 + 16 + 4 byte reply
        echo = subprocess.Popen([sys.executable, "-c", ECHO_SERVER, str(echo_path), "32", "36"])
        peer_process = start_peer(peer, c_path) if peer is not None else None
        try:
            wait_for_serve(server)
            c = c_path if peer is not None else None
            return _measure(ours_path, client_path, echo_path, c, rounds)
        finally:
            for process in (server, echo, peer_process):
                if process is not None:
                    process.send_signal(signal.SIGTERM)
                    process.wait()


def _measure(
    ours_path: Path, client_path: Path, echo_path: Path, c_path: Path | None, rounds: int
) -> dict[str, Any]:
    ours = RawClient(raw_client.connect(ours_path))
    calls: dict[str, Callable[[], object]] = {
        f"raw {name}": raw_call(ours, request) for name, (request, _) in MEASURES.items()
    }
    echo = raw_client.connect_plain(echo_path)
    ping = b"q" * 32

    def ping_pong() -> None:
        echo.sendall(ping)
        got = 0
        while got < 36:
            got += len(echo.recv(36 - got))

    calls["floor ping-pong 32 B -> 36 B"] = ping_pong
    client = VfioUserClient.connect(client_path)
    for name, call in client_calls(client).items():
        calls[f"VfioUserClient {name}"] = call
    if c_path is not None:
        c = RawClient(raw_client.connect(c_path))
        for name, (_, request) in MEASURES.items():
            if request is not None:
                calls[f"C {name}"] = raw_call(c, request)
    for call in calls.values():  # warm up every path once
        timed_slice(call, 50)
    times = rounds_of(calls, rounds)
    mapped_us = _mapped_read(client)
    client.close()
    echo.close()
    report: dict[str, Any] = {
        "us": {name: statistics.median(values) for name, values in times.items()},
        "client_over_raw": {
            name: statistics.median(
                c / r
                for c, r in zip(times[f"VfioUserClient {name}"], times[f"raw {name}"], strict=True)
            )
            for name in MEASURES
        },
        "mapped_read_4_us": mapped_us,
    }
    report["us"]["mapped read 4 B (no socket)"] = mapped_us
    if c_path is not None:
        report["ours_over_c"] = {}
        for name in MEASURES:
            if f"C {name}" in times:
                ratios = [
                    c / o for c, o in zip(times[f"C {name}"], times[f"raw {name}"], strict=True)
                ]
                quartiles = statistics.quantiles(ratios, n=4)
                report["ours_over_c"][name] = {
                    "median": statistics.median(ratios),
                    "quartiles": [quartiles[0], quartiles[2]],
                    "rounds": ratios,
                }
    return report


def _mapped_read(client: VfioUserClient) -> float:
    info = client.region_info(RegionIndex.BAR0)
    area = info.mmap_areas()[0]
    mapped = client.map_area(RegionIndex.BAR0, area.offset, area.size)
    try:
        return min(timed_slice(lambda: mapped[0:4], 20_000) for _ in range(5))
    finally:
        mapped.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--peer", type=Path, metavar="PATH")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument(
        "--spread", action="store_true", help="let the scheduler place the processes"
    )
    args = parser.parse_args()
    cpu = None if args.spread else one_cpu()
    print(json.dumps(measurements(args.rounds, args.peer, cpu), indent=1))


if __name__ == "__main__":
    main()
