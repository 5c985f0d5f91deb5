"""Dirty page tracking: no page the device writes while logging is missed.

The ground truth is the DMA space's record of every device write (``DmaSpace.watch``); the
device model itself cannot tell which pages it wrote, so the mediator's bitmap is all a
migration has.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from i40e_mediator import registers as r
from i40e_mediator import virtchnl as vc
from i40e_mediator.guest import Guest
from i40e_support import GUEST_IOVA, MEMORY_SIZE, Vf, WriteRecorder, report

from vfio_mediate import MediatedDevice, MediatorRegistry, create_device
from vfio_mediate._dirty import bitmap_pages
from vfio_mediate.uapi import PAGE_SIZE, MigrationState

WHOLE = [(GUEST_IOVA, MEMORY_SIZE)]


def test_buffers_posted_before_logging_are_reported_when_filled(
    vf: Vf, recorder: WriteRecorder
) -> None:
    guest = vf.guest()
    vf.device.dma_logging_start(PAGE_SIZE, WHOLE)
    assert not report(vf)  # nothing written yet: posted buffers are not dirty by themselves
    recorder.take()
    for q in range(r.NUM_QUEUE_PAIRS):
        guest.send(q, 1500)
    written, reported = recorder.take(), report(vf)
    assert written and written <= reported
    for pair in guest.pairs:  # the TX completions are among them
        assert pair.tx_ring // PAGE_SIZE in reported


def test_several_rounds_of_traffic_report_exactly_what_was_written(
    vf: Vf, recorder: WriteRecorder
) -> None:
    guest = vf.guest(buf_size=PAGE_SIZE)  # one buffer per page: nothing shares a page
    vf.device.dma_logging_start(PAGE_SIZE, WHOLE)
    recorder.take()
    for _ in range(6):
        for _ in range(3):
            guest.run()
        written, reported = recorder.take(), report(vf)
        assert written == reported
    assert guest.stats()["corrupt"] == 0


def test_reconfigured_rings_are_reported_old_and_new(vf: Vf, recorder: WriteRecorder) -> None:
    guest = vf.guest()
    vf.device.dma_logging_start(PAGE_SIZE, WHOLE)
    recorder.take()
    guest.send(0, 64)
    old_tx_ring = guest.pairs[0].tx_ring
    guest.configure(0)  # new rings; the old ones were written in this round
    guest.send(0, 64)
    written, reported = recorder.take(), report(vf)
    assert written <= reported
    assert {old_tx_ring // PAGE_SIZE, guest.pairs[0].tx_ring // PAGE_SIZE} <= reported


def test_buffers_posted_before_a_queue_starts_are_reported(vf: Vf, recorder: WriteRecorder) -> None:
    """RX buffers posted before CONFIG_VSI_QUEUES and a TX packet posted between it and
    ENABLE_QUEUES: the device serves both inside the ATQT write that starts the pair."""
    guest = vf.guest(buf_size=PAGE_SIZE)
    vf.device.dma_logging_start(PAGE_SIZE, WHOLE)
    recorder.take()
    guest.configure(0, early=True)
    written, reported = recorder.take(), report(vf)
    assert written and written <= reported
    assert guest.clean(0) == 1 and guest.stats()["corrupt"] == 0


def test_a_reset_while_logging_loses_nothing(vf: Vf, recorder: WriteRecorder) -> None:
    guest = vf.guest()
    vf.device.dma_logging_start(PAGE_SIZE, WHOLE)
    recorder.take()
    guest.run()
    vf.device.reset()
    guest.restart()
    guest.run()
    written, reported = recorder.take(), report(vf)
    assert written <= reported


def test_admin_receive_buffers_are_reported_as_the_device_takes_them(vf: Vf) -> None:
    """The admin-receive tail is trapped like the RX tails. The model has no admin queue
    engine yet: advancing VF_ARQH stands for the device taking posted buffers."""
    ring, buffers = GUEST_IOVA + 0x10000, [GUEST_IOVA + 0x20000 + i * PAGE_SIZE for i in range(4)]
    for slot, buffer in enumerate(buffers):
        descriptor = r.AQ_DESC.pack(0x1200, 0, PAGE_SIZE, 0, 0, 0, 0, 0, buffer >> 32, buffer)
        at = ring - GUEST_IOVA + slot * r.AQ_DESC_SIZE
        vf.memory[at : at + r.AQ_DESC_SIZE] = descriptor
    vf.set_reg(r.VF_ARQBAL, ring & 0xFFFF_FFFF)
    vf.set_reg(r.VF_ARQBAH, ring >> 32)
    vf.set_reg(r.VF_ARQLEN, 32 | r.AQ_ENABLE)
    vf.set_reg(r.VF_ARQT, 1)  # one posted before logging
    vf.device.dma_logging_start(PAGE_SIZE, WHOLE)
    vf.set_reg(r.VF_ARQT, 4)  # three more through the trap
    assert not report(vf)
    vf.set_reg(r.VF_ARQH, 2)
    pages = {buffer // PAGE_SIZE for buffer in buffers}
    assert report(vf) == {ring // PAGE_SIZE} | set(sorted(pages)[:2])
    vf.set_reg(r.VF_ARQH, 4)
    assert report(vf) == {ring // PAGE_SIZE} | set(sorted(pages)[2:])


def test_only_the_logged_ranges_are_reported(vf: Vf, recorder: WriteRecorder) -> None:
    guest = vf.guest()
    half = MEMORY_SIZE // 2
    vf.device.dma_logging_start(PAGE_SIZE, [(GUEST_IOVA, half)])
    recorder.take()
    for q in range(r.NUM_QUEUE_PAIRS):
        guest.send(q, 3000)
    bitmap = vf.device.dma_logging_report(GUEST_IOVA, half, PAGE_SIZE)
    in_range = {page for page in recorder.take() if page < (GUEST_IOVA + half) // PAGE_SIZE}
    assert in_range and in_range <= {
        GUEST_IOVA // PAGE_SIZE + page for page in bitmap_pages(bitmap)
    }


# -- the property: random traffic, random logging windows ----------------------------------

KINDS = ["send"] * 6 + ["run"] * 3 + ["clean"] * 3 + ["post"] * 3 + ["start"] * 3
KINDS += ["report"] * 3 + ["stop", "rearm", "reconfigure", "early", "pause", "resume", "reset"]
KINDS += ["vf-reset", "hold-arq"]
ACTIONS = st.tuples(
    st.sampled_from(KINDS),
    st.integers(0, r.NUM_QUEUE_PAIRS - 1),
    st.one_of(st.integers(1, 200), st.integers(1, r.MAX_FRAME_SIZE)),
    st.integers(0, 20),
)
EXAMPLES = 300
TOTALS: Counter[str] = Counter()


@contextlib.contextmanager
def fresh_vf(registry: MediatorRegistry) -> Iterator[Vf]:
    backend = create_device("i40e-vf", name="prop")
    memory = memoryview(bytearray(2 * MEMORY_SIZE))
    backend.dma.map_memory(GUEST_IOVA, memory)
    try:
        with MediatedDevice(backend, registry) as device:
            yield Vf(backend, device, memory)
    finally:
        backend.close()


def test_no_page_written_while_logging_is_missed(registry: MediatorRegistry) -> None:
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(
        actions=st.lists(ACTIONS, min_size=10, max_size=100),
        ring_len=st.sampled_from([8, 16, 32]),
        buf_size=st.sampled_from([512, 1536, 2048, 4096]),
        split_ranges=st.booleans(),
    )
    def check(
        actions: list[tuple[str, int, int, int]], ring_len: int, buf_size: int, split_ranges: bool
    ) -> None:
        with fresh_vf(registry) as vf:
            run_actions(vf, actions, ring_len, buf_size, split_ranges)

    TOTALS.clear()
    check()
    written = TOTALS["written"] + TOTALS["written-changed"]
    reported = TOTALS["reported"] + TOTALS["reported-changed"]
    print(
        f"\ndirty logging, {EXAMPLES} random runs: {written} pages written while logging, "
        f"{reported} reported, none missed; over-report ratio {reported / written:.3f} "
        f"({TOTALS['reported'] / TOTALS['written']:.3f} in reports without a queue "
        f"reconfiguration or reset, {TOTALS['reported-changed'] / TOTALS['written-changed']:.3f}"
        " in reports with one)"
    )
    assert TOTALS["written"] and TOTALS["written-changed"] and not TOTALS["missed"]


def run_actions(
    vf: Vf, actions: list[tuple[str, int, int, int]], ring_len: int, buf_size: int, split: bool
) -> None:
    size = len(vf.memory)
    ranges = (
        [(GUEST_IOVA, size // 4), (GUEST_IOVA + size // 2, size // 2)]
        if split
        else [(GUEST_IOVA, size)]
    )
    logged = {
        page
        for iova, length in ranges
        for page in range(iova // PAGE_SIZE, (iova + length) // PAGE_SIZE)
    }
    guest = Guest(vf.device, vf.memory, GUEST_IOVA, ring_len=ring_len, buf_size=buf_size)
    guest.start()
    recorder = WriteRecorder()
    recorder.recording = False
    stop_watching = vf.backend.dma.watch(recorder)

    changed = False  # whether a queue context changed since the last report

    def paused() -> bool:
        return vf.device.migration_state is not MigrationState.RUNNING

    def check_report() -> None:
        nonlocal changed
        reported: set[int] = set()
        for iova, length in ranges:
            reported |= report(vf, iova, length)
        written = recorder.take() & logged
        missed = written - reported
        suffix = "-changed" if changed else ""
        TOTALS.update({"written" + suffix: len(written), "reported" + suffix: len(reported)})
        TOTALS["missed"] += len(missed)
        changed = False
        assert not missed, f"pages written but not reported: {sorted(missed)[:8]}"

    for kind, queue, length, count in actions:
        if kind == "send":
            guest.send(queue, length)
        elif kind == "clean":
            guest.clean(queue)
        elif kind == "post":
            guest.post_rx(queue, count)
        elif kind == "run":
            guest.run()
        elif kind == "rearm":
            guest.rearm(queue)
        elif kind in ("reconfigure", "early", "vf-reset") and paused():
            continue  # the driver waits for its reply: the device answers when it runs
        elif kind in ("reconfigure", "early"):
            guest.configure(queue, early=kind == "early")
            changed = True
        elif kind == "vf-reset":
            guest.reset(stale_tx_tail=count)
            changed = True
        elif kind == "hold-arq" and not paused():
            # no ARQ buffer for a while: the reply waits in the device until the next poll
            guest.poll_admin()
            vf.set_reg(r.VF_ARQT, vf.reg(r.VF_ARQH))
            if not guest.aq.outstanding:
                guest._post(vc.OP_GET_STATS, vc.QUEUE_SELECT.pack(guest.vsi_id, 0, 0, 0))
        elif kind == "start" and not vf.device.dma_logging:
            vf.device.dma_logging_start(PAGE_SIZE, ranges)
            recorder.take()
            recorder.recording = True
            changed = False
        elif kind in ("report", "stop") and vf.device.dma_logging:
            check_report()
            if kind == "stop":
                vf.device.dma_logging_stop()
                recorder.recording = False
        elif kind == "pause" and vf.device.migration_state is MigrationState.RUNNING:
            vf.device.set_migration_state(MigrationState.RUNNING_P2P)
        elif kind == "resume":
            vf.device.set_migration_state(MigrationState.RUNNING)
        elif kind == "reset":
            vf.device.reset()
            guest.restart()
            changed = True
    if vf.device.dma_logging:
        check_report()
        vf.device.dma_logging_stop()
    stop_watching()
    assert guest.stats()["corrupt"] == 0
