"""Migration v2 of the VF: the state stream, the arcs, and a live migration under traffic."""

from __future__ import annotations

import errno
import io
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from i40e_mediator import registers as r
from i40e_mediator import state
from i40e_mediator import virtchnl as vc
from i40e_mediator.model import I40eVf
from i40e_support import GUEST_IOVA, Vf, WriteRecorder

from vfio_mediate import LiveMigration, MigrationError, MigrationProgress
from vfio_mediate._device_migration import MigrationStream
from vfio_mediate._entry_points import find_workload
from vfio_mediate.cli import main
from vfio_mediate.cli.cmd_migrate_demo import Progress
from vfio_mediate.uapi import MigrationFlag, MigrationState

S = MigrationState


def saved_state(vf: Vf) -> bytes:
    """Save ``vf``'s state through STOP_COPY and go back to RUNNING."""
    vf.device.set_migration_state(S.STOP_COPY)
    stream = MigrationStream()
    while chunk := vf.device.read_migration_data(4096):
        stream.data += chunk
    vf.device.set_migration_state(S.RUNNING)
    return stream.last_chunk()


def load(vf: Vf, data: bytes) -> None:
    """Load ``data`` into ``vf`` (RESUMING -> STOP)."""
    vf.device.set_migration_state(S.RESUMING)
    stream = MigrationStream()
    stream.append_chunk(data)
    vf.device.write_migration_data(bytes(stream.data))
    vf.device.set_migration_state(S.STOP)


def test_migration_flags(vf: Vf) -> None:
    assert vf.device.migration_flags == (
        MigrationFlag.STOP_COPY | MigrationFlag.P2P | MigrationFlag.PRE_COPY
    )


@pytest.mark.parametrize(
    ("start", "target"),
    [
        (S.STOP_COPY, S.PRE_COPY),
        (S.STOP_COPY, S.PRE_COPY_P2P),
        (S.RUNNING, S.ERROR),
        (S.PRE_COPY, S.ERROR),
        (S.RESUMING, 99),
    ],
)
def test_illegal_arcs_are_refused_with_the_state_unchanged(
    vf: Vf, start: MigrationState, target: int
) -> None:
    vf.guest().run()
    vf.device.set_migration_state(start)
    before = vf.model.snapshot()
    with pytest.raises(MigrationError) as caught:
        vf.device.set_migration_state(target)
    assert caught.value.errno == errno.EINVAL
    assert vf.device.migration_state is start
    assert vf.model.snapshot() == before


def test_no_dma_and_no_interrupt_while_stopped(vf: Vf, recorder: WriteRecorder) -> None:
    guest = vf.guest()
    vf.count_interrupts()
    recorder.take()
    for stopped in (S.STOP, S.STOP_COPY, S.PRE_COPY_P2P):
        vf.device.set_migration_state(stopped)
        guest.send(0, 64)
        guest.rearm(0)
        assert not recorder.take() and not vf.interrupts
        assert vf.model.queue_view(0)[1].tx_head == 0
        vf.device.set_migration_state(S.RUNNING_P2P)
    vf.device.set_migration_state(S.RUNNING)
    assert recorder.take() and vf.interrupts == [1]
    assert guest.clean(0) == 3 and guest.stats()["corrupt"] == 0


def test_saving_arcs_give_the_state_and_loading_restores_it(
    make_vf: Callable[..., Vf],
) -> None:
    source, destination = make_vf("source"), make_vf("destination")
    guest = source.guest()
    for _ in range(5):
        guest.run()
    source.device.set_migration_state(S.PRE_COPY)
    precopy = source.device.read_migration_data(1 << 20)
    assert precopy and source.model.running  # pre-copy: the device still runs
    data = saved_state(source)
    decoded = state.decode(data)
    assert decoded == source.model.snapshot()
    assert [q.tx_packets for q in decoded.queues] == [
        q.tx_packets for q in (source.model.queue_view(i)[1] for i in range(4))
    ]
    load(destination, data)
    assert destination.model.snapshot() == decoded
    assert not destination.model.running  # restored, not yet resumed


def _refused(vf: Vf, data: bytes) -> str:
    with pytest.raises(MigrationError) as caught:
        load(vf, data)
    assert caught.value.errno == errno.EINVAL
    assert vf.device.migration_state is S.ERROR
    vf.device.reset()
    assert vf.device.migration_state is S.RUNNING
    return str(caught.value)


def test_a_stream_of_another_model_or_version_is_refused(vf: Vf) -> None:
    good = saved_state(vf)
    model = good.replace(b"i40e-vf", b"ice-vf!", 1)
    assert "from device model 'ice-vf!', this device is 'i40e-vf'" in _refused(vf, model)
    for old in (1, 3):  # the stream of the model before virtchnl, and a newer one
        version = good[:8] + old.to_bytes(2, "little") + good[10:]
        assert f"format version {old} is not supported (this mediator reads version 2)" in (
            _refused(vf, version)
        )
    assert "not an i40e VF state stream" in _refused(vf, b"MLX5STAT" + good[8:])
    assert "corrupted" in _refused(vf, good[:-1] + bytes([good[-1] ^ 1]))
    assert "truncated" in _refused(vf, good[:12])
    assert "body has" in _refused(vf, good[:-4])
    other_shape = state.encode(I40eVf(queue_pairs=8, vectors=9).snapshot())
    assert "8 queue pairs" in _refused(vf, other_shape)
    load(vf, good)  # the device still takes a good stream
    vf.device.set_migration_state(S.RUNNING)


def test_the_state_stream_format() -> None:
    vf = I40eVf()
    data = state.encode(vf.snapshot())
    assert data[:8] == state.MAGIC == b"I40EVFST"
    assert int.from_bytes(data[8:10], "little") == state.FORMAT_VERSION == 2
    assert data[10] == 7 and data[11:18] == b"i40e-vf"
    body_length = int.from_bytes(data[18:22], "little")
    assert len(data) == 26 + body_length
    fresh = state.decode(data)
    assert fresh == vf.snapshot() and fresh.mac == vf.port.mac
    assert fresh.api_minor is None and fresh.admin_messages == () and fresh.stats == (0,) * 12


def test_the_stream_carries_admin_virtchnl_and_port_state(make_vf: Callable[..., Vf]) -> None:
    source, destination = make_vf("source"), make_vf("destination")
    guest = source.guest()
    guest.expect_ok(vc.OP_ADD_ETH_ADDR, guest.address_list([b"\x01\x00\x5e\x00\x00\x07"]))
    guest.expect_ok(vc.OP_CONFIG_PROMISCUOUS_MODE, vc.PROMISC.pack(guest.vsi_id, 2))
    guest.run()
    source.set_reg(r.VF_ARQT, source.reg(r.VF_ARQH))  # no ARQ buffer: a reply waits
    guest._post(vc.OP_GET_STATS, vc.QUEUE_SELECT.pack(guest.vsi_id, 0, 0, 0))
    saved = state.decode(saved_state(source))
    assert len(saved.admin_messages) == 1 and saved.admin_messages[0][0] == vc.OP_GET_STATS
    assert saved.api_minor == 1 and saved.caps == vc.CAP_L2 and saved.all_multicast
    assert saved.mac == guest.mac and b"\x01\x00\x5e\x00\x00\x07" in saved.multicast
    assert saved.stats[6] > 0  # tx_bytes
    load(destination, saved_state(source))
    destination.device.set_migration_state(S.RUNNING)
    assert destination.model.port.filters == source.model.port.filters
    assert destination.model.snapshot().mac == guest.mac != destination.model.port.mac
    moved = guest.move_to(destination.device, destination.memory)
    destination.memory[:] = source.memory
    moved._enable_device()  # the VMM's part: config space as the source's
    destination.set_reg(r.VF_ARQT, (destination.reg(r.VF_ARQH) - 1) % 32)  # buffers again
    moved.poll_admin()
    assert moved.aq.reply is not None and moved.aq.reply[0] == vc.OP_GET_STATS


def test_live_migration_under_traffic(make_vf: Callable[..., Vf]) -> None:
    source, destination = make_vf("source", fill=True), make_vf("destination")
    guest = find_workload("i40e-vf")(source.device, source.memory, GUEST_IOVA, seed=7)
    guest.start()
    for _ in range(10):
        guest.run()
    events: list[MigrationProgress] = []
    report = LiveMigration(
        source.device,
        destination.device,
        source.memory,
        destination.memory,
        GUEST_IOVA,
        guest,
        stop_pages=32,
    ).run(events.append)

    assert report.memory_equal and report.state_equal and report.ok
    assert bytes(source.memory) == bytes(destination.memory)
    assert destination.model.snapshot() == source.model.snapshot()
    assert destination.device.migration_state is S.RUNNING
    assert source.device.migration_state is S.STOP
    phases = [done.phase for done in report.rounds]
    assert phases[0] == "full" and phases[-1] == "stop-copy" and "pre-copy" in phases
    assert report.rounds[0].pages == len(source.memory) // 4096
    # the device's bitmap found pages the guest CPU did not write
    assert any(done.pages > done.cpu_pages for done in report.rounds[1:])
    assert report.downtime < 1.0 and report.state_bytes > 0
    assert events[-1].phase == "done"

    before = guest.stats()
    moved = guest.move_to(destination.device, destination.memory)
    for _ in range(10):
        moved.run()
    after = moved.stats()
    assert after["received"] > before["received"]
    assert after["corrupt"] == after["dropped"] == 0
    assert after["interrupts"] > before["interrupts"]
    assert destination.model.queue_view(0)[1].tx_packets > source.model.queue_view(0)[1].tx_packets


def test_migrate_demo_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["migrate-demo", "--json", "--memory", "2", "--slices", "5"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["ok"] and result["memory_equal"] and result["state_equal"]
    assert result["traffic_continues"] and result["traffic_after"]["corrupt"] == 0
    assert result["rounds"][0]["phase"] == "full" and result["rounds"][-1]["phase"] == "stop-copy"
    assert result["downtime"] > 0


def test_migrate_demo_command_prints_plain_lines_off_a_terminal() -> None:
    command = Path(sys.executable).parent / "vfio-mediate"
    done = subprocess.run(
        [str(command), "migrate-demo", "--memory", "2", "--slices", "5"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stdout
    assert "round  0 full      512 pages copied" in done.stdout
    assert "verdict: OK" in done.stdout


def test_progress_redraws_one_line_per_round_on_a_terminal() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    screen = Terminal()
    show = Progress(screen)
    for copied in (64, 128):
        show(MigrationProgress("pre-copy", 1, copied, 128))
    show(MigrationProgress("done", 1, 1, 1))
    lines = screen.getvalue().split("\n")
    assert lines[0].startswith("\rround  1 pre-copy  [###############...............]")
    assert lines[0].endswith(f"\rround  1 pre-copy  [{'#' * 30}]    128/128    pages")


def test_an_unknown_device_has_no_workload() -> None:
    with pytest.raises(Exception, match="no guest workload for device model 'null-example'"):
        find_workload("null-example")
    assert r.DEVICE_ID == 0x154C
