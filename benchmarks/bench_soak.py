"""Soak and fault: one ``vfio-mediate serve`` process with two VFs; a hostile client on the
first while a bystander reads the second, and what the server held before and after.

Run: ``python benchmarks/bench_soak.py`` (or through ``run.py``). The hostile client sends a
soak of requests, many short sessions, fuzzed messages over every command (a new session
whenever the server closes one), replies it never reads and DMA it never answers. The report
gives the counts, the server's fds and RSS before and after, and the bystander's worst and
median read latency meanwhile.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import statistics
import struct
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import raw_client
from bench_socket import serve_command, wait_for_serve

from vfio_mediate.server import Command, VfioUserClient, pack_message
from vfio_mediate.uapi import RegionIndex

SOAK_REQUESTS = 20_000
SESSIONS = 300
FUZZED = 20_000
_SEED = 17


def server_holds(pid: int) -> tuple[int, int]:
    """The server's open fds and resident set (KiB)."""
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return fds, int(line.split()[1])
    return fds, 0


def fuzzed_message(chooser: random.Random) -> bytes:
    """A message of a random command with a random, plausibly sized payload."""
    command = chooser.choice([*list(Command), chooser.randrange(1 << 16)])
    payload = chooser.randbytes(chooser.choice([0, 4, 8, 16, 24, 32, 40, 64, 200]))
    flags = chooser.choice([0, 0, 0, 0x10, 1, 0x20, 2])
    message = pack_message(chooser.randrange(1 << 16), int(command), payload, flags)
    if chooser.random() < 0.02:  # a lying size
        message = message[:4] + struct.pack("<I", chooser.randrange(1 << 32)) + message[8:]
    return message


def hostile(path: Path) -> dict[str, int]:
    """Everything the hostile client does; the counts it did."""
    chooser = random.Random(_SEED)
    with VfioUserClient.connect(path) as client:
        for _ in range(SOAK_REQUESTS):
            client.read(RegionIndex.CONFIG, 0, 4)
    for _ in range(SESSIONS):
        VfioUserClient.connect(path).close()
    fuzz_sessions = 0
    sock: socket.socket | None = None
    for _ in range(FUZZED):
        if sock is None:
            sock = raw_client.connect(path)
            sock.setblocking(False)
            fuzz_sessions += 1
        try:
            sock.send(fuzzed_message(chooser))
            with contextlib.suppress(BlockingIOError):
                while sock.recv(1 << 16):
                    pass
        except OSError:
            sock.close()
            sock = None
    if sock is not None:
        sock.close()
    # Replies never read: region infos that bring the BAR's fd, until the server stops reading.
    deaf = raw_client.connect(path)
    deaf.settimeout(1)
    info = struct.pack("<IIIIQQ", 4096, 0, RegionIndex.BAR0, 0, 0, 0)
    burst = pack_message(1, Command.DEVICE_GET_REGION_INFO, info) * 20_000
    with contextlib.suppress(OSError):
        deaf.sendall(burst)
    deaf.close()
    return {
        "requests": SOAK_REQUESTS,
        "sessions": SESSIONS + fuzz_sessions + 2,
        "fuzzed_messages": FUZZED,
        "unread_replies": 20_000,
    }


def measurements() -> dict[str, Any]:
    """Counts, the server's fds and RSS before and after, the bystander's latencies."""
    with tempfile.TemporaryDirectory() as directory:
        attacked, other = Path(directory) / "a.sock", Path(directory) / "b.sock"
        devices = ("--device", "i40e-vf", "--device", "i40e-vf")
        server = subprocess.Popen(
            [serve_command(), "serve", *devices, "--socket", str(attacked), "--socket", str(other)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        try:
            wait_for_serve(server)
            bystander = VfioUserClient.connect(other)
            bystander.read(RegionIndex.CONFIG, 0, 4)
            fds_before, rss_before = server_holds(server.pid)
            latencies: list[float] = []
            done = threading.Event()

            def watch() -> None:
                while not done.is_set():
                    started = time.perf_counter()
                    bystander.read(RegionIndex.CONFIG, 0, 4)
                    latencies.append(time.perf_counter() - started)
                    time.sleep(0.001)

            watcher = threading.Thread(target=watch)
            watcher.start()
            try:
                counts = hostile(attacked)
            finally:
                done.set()
                watcher.join()
            time.sleep(0.5)  # the last sessions end
            fds_after, rss_after = server_holds(server.pid)
            bystander.close()
            alive = server.poll() is None
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait()
    return {
        **counts,
        "server_alive": alive,
        "fds_before": fds_before,
        "fds_after": fds_after,
        "rss_kib_before": rss_before,
        "rss_kib_after": rss_after,
        "bystander_reads": len(latencies),
        "bystander_median_ms": statistics.median(latencies) * 1e3,
        "bystander_worst_ms": max(latencies) * 1e3,
    }


if __name__ == "__main__":
    print(json.dumps(measurements(), indent=1))
