"""Region reads over the vfio-user socket against their floors.

Run: ``python benchmarks/bench_socket.py``. The server is ``vfio-mediate serve`` in a process of
its own, as a VMM would meet it. Floors (DESIGN.md, "Performance model"): a bare Python
UNIX-socket ping-pong of the same message sizes for small accesses, and a memory copy for a
large one. Mapped areas never touch the socket; the last line shows that path too.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

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

# The same echo on an asyncio loop's reader callback, the way the server waits for requests.
ASYNCIO_ECHO_SERVER = """
import asyncio, socket, sys
async def main():
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(sys.argv[1]); listener.listen(1); listener.setblocking(False)
    loop = asyncio.get_running_loop()
    conn, _ = await loop.sock_accept(listener)
    conn.setblocking(False)
    done, reply = loop.create_future(), b"r" * int(sys.argv[3])
    def readable():
        if not conn.recv(65536):
            loop.remove_reader(conn.fileno()); done.set_result(None)
        else:
            conn.send(reply)
    loop.add_reader(conn.fileno(), readable)
    await done
asyncio.run(main())
"""


def best(call: Callable[[], object], number: int) -> float:
    """Best of five runs, nanoseconds per call."""
    results = []
    for _ in range(5):
        start = time.perf_counter_ns()
        for _ in range(number):
            call()
        results.append((time.perf_counter_ns() - start) / number)
    return min(results)


STARTUP_TIMEOUT = 30.0


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


def connect_when_listening(path: Path, process: subprocess.Popen[bytes]) -> socket.socket:
    """Connect to an echo server, retrying until it listens: it binds (the file appears)
    before it listens."""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while True:
        pinger = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            pinger.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            pinger.close()
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the echo server at {path} did not start") from None
            time.sleep(0.02)
        else:
            return pinger


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", "--number", type=int, default=5000)
    number = parser.parse_args().number
    command = shutil.which("vfio-mediate") or str(Path(sys.executable).parent / "vfio-mediate")
    with tempfile.TemporaryDirectory() as directory:
        vf = Path(directory) / "vf.sock"
        echo = Path(directory) / "echo.sock"
        aecho = Path(directory) / "aecho.sock"
        server = subprocess.Popen(
            [command, "serve", "--socket", str(vf)], stdout=subprocess.PIPE, text=True
        )
        # a REGION_READ of 4 bytes: 16 + 16 byte request, 16 + 16 + 4 byte reply
        floor = subprocess.Popen([sys.executable, "-c", ECHO_SERVER, str(echo), "32", "36"])
        afloor = subprocess.Popen(
            [sys.executable, "-c", ASYNCIO_ECHO_SERVER, str(aecho), "32", "36"]
        )
        try:
            wait_for_serve(server)
            pingers = [connect_when_listening(echo, floor), connect_when_listening(aecho, afloor)]
            request = b"q" * 32

            def ping(pinger: socket.socket) -> None:
                pinger.sendall(request)
                got = 0
                while got < 36:
                    got += len(pinger.recv(36 - got))

            with VfioUserClient.connect(vf) as client:
                bare = best(lambda: ping(pingers[0]), number)
                bare_asyncio = best(lambda: ping(pingers[1]), number)
                read4 = best(lambda: client.read(RegionIndex.CONFIG, 0, 4), number)
                size = 0x1000
                bulk = best(lambda: client.read(RegionIndex.BAR0, 0x1000, size), number // 5)
                source = bytes(size)
                copy = best(lambda: bytearray(source), number)
                info = client.region_info(RegionIndex.BAR0)
                area = info.mmap_areas()[0]
                mapped = client.map_area(RegionIndex.BAR0, area.offset, area.size)
                mapped_read = best(lambda: mapped[0:4], number)
                mapped.close()
            for pinger in pingers:
                pinger.close()
        finally:
            for process in (server, floor, afloor):
                process.terminate()
                process.wait()
    print(f"bare UNIX-socket ping-pong, 32 B -> 36 B (floor)   {bare / 1000:8.1f} us")
    print(f"the same echo on an asyncio reader callback        {bare_asyncio / 1000:8.1f} us")
    print(
        f"REGION_READ 4 bytes of config space               {read4 / 1000:8.1f} us"
        f"  ({read4 / bare:.2f}x floor, {read4 / bare_asyncio:.2f}x asyncio floor)"
    )
    print(f"REGION_READ 4 KiB of BAR0                          {bulk / 1000:8.1f} us")
    print(f"memory copy of 4 KiB (floor for bulk)             {copy / 1000:8.1f} us")
    print(f"read of a mapped BAR0 area (no socket)            {mapped_read / 1000:8.3f} us")


if __name__ == "__main__":
    main()
