"""The VF served by ``vfio-mediate -v serve``: the virtchnl driver over a real vfio-user socket,
its refused requests answered and logged one line each, no traceback."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from i40e_mediator import registers as r
from i40e_mediator import virtchnl as vc
from i40e_mediator.guest import Guest

from vfio_mediate.server import VfioUserClient

IOVA = 0x1_0000_0000
MEMORY = 4 << 20


def test_the_virtchnl_driver_over_vfio_user_and_the_refusals_at_v() -> None:
    directory = Path(tempfile.mkdtemp(prefix="vmi-"))  # a short socket path
    path = directory / "vf.sock"
    command = Path(sys.executable).parent / "vfio-mediate"
    process = subprocess.Popen(
        [str(command), "-v", "serve", "--device", "i40e-vf", "--socket", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    watchdog = threading.Timer(30, process.kill)
    watchdog.start()
    try:
        assert process.stdout is not None
        while not process.stdout.readline().startswith("Ctrl-C stops"):
            assert process.poll() is None, process.communicate()
        watchdog.cancel()
        with VfioUserClient.connect(path) as client:
            memory = client.dma_map_memfd(IOVA, MEMORY)
            guest = Guest(client, memoryview(memory), IOVA)
            guest.start()
            assert guest.link_up and client.read(r.BAR0, r.VFGEN_RSTAT, 4) == b"\2\0\0\0"
            outside = bytearray(guest.queue_config(guest.pairs[:1]))
            outside[8 + 8 : 8 + 16] = (0x80).to_bytes(8, "little")  # a TX ring nowhere
            assert guest.request(vc.OP_CONFIG_VSI_QUEUES, bytes(outside)) == (-5, b"")
            assert guest.request(44, b"") == (vc.STATUS_ERR_NOT_SUPPORTED, b"")
            assert guest.request(vc.OP_VERSION, b"\1") == (vc.STATUS_ERR_PARAM, b"")
            guest.reset()  # an MTU change in iavf
            assert guest.link_up and guest.counters["events"] == 2
    finally:
        watchdog.cancel()
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=15)
        shutil.rmtree(directory, ignore_errors=True)
    assert process.returncode == 0, stderr
    refused = [line for line in stderr.splitlines() if "virtchnl opcode" in line]
    assert len(refused) == 3, stderr
    assert (
        "opcode 6 refused (status -5): queue 0: TX ring at 0x80 is outside DMA memory"
        in (refused[0])
    )
    assert "opcode 44 refused (status -64)" in refused[1]
    assert "opcode 1 refused (status -5): a message of 1 bytes" in refused[2]
    assert "Traceback" not in stderr and "WARNING" not in stderr
