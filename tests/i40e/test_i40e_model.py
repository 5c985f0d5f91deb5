"""The i40e-vf device model: identity, loopback DMA, interrupts, reset, faults, mapped pages."""

from __future__ import annotations

import pytest
from i40e_mediator import registers as r
from i40e_mediator.guest import packet_bytes
from i40e_mediator.model import QueueConfig
from i40e_support import Vf, WriteRecorder

from vfio_mediate._pci import Config
from vfio_mediate.uapi import PAGE_SIZE, MigrationState, RegionFlag, RegionIndex


def config(vf: Vf, offset: int, size: int) -> int:
    return int.from_bytes(vf.device.read(RegionIndex.CONFIG, offset, size), "little")


def test_identity_bars_and_msix(vf: Vf) -> None:
    assert config(vf, Config.VENDOR_ID, 2) == 0x8086
    assert config(vf, Config.DEVICE_ID, 2) == 0x154C
    assert config(vf, Config.CLASS_CODE, 3) == 0x020000
    for bar, size in ((0, 0x10000), (3, 0x4000)):
        assert config(vf, Config.BAR0 + 4 * bar, 4) & 0x6 == Config.BAR_MEM64
        info = vf.device.region_info(bar)
        assert info.size == size and info.flags & RegionFlag.MMAP
    control = config(vf, Config.MSIX_CAP + Config.MSIX_CONTROL, 2)
    assert (control & 0x7FF) + 1 == r.MSIX_VECTORS == r.NUM_QUEUE_PAIRS + 1
    assert vf.reg(r.EMU_QUEUE_PAIRS) == r.NUM_QUEUE_PAIRS >= 4


def test_the_model_traps_only_pages_whose_accesses_act(vf: Vf) -> None:
    own = vf.backend.region_info(r.BAR0)
    mapped = {page for a in own.mmap_areas() for page in range(a.offset, a.end, PAGE_SIZE)}
    trapped = set(range(0, r.BAR0_SIZE, PAGE_SIZE)) - mapped
    # TX tails, queue interrupt control, vector 0 control, VFGEN_RSTAT, queue-context window
    assert trapped == {0x0000, 0x3000, 0x5000, 0x8000, 0xE000}
    assert r.RX_TAIL_PAGE in mapped  # read from memory when a packet arrives


def test_tx_tail_write_loops_a_packet_into_rx_with_write_backs_and_msix(vf: Vf) -> None:
    guest = vf.guest()
    vf.count_interrupts()  # instead of the guest's own handlers
    pair = guest.pairs[2]
    rx_slot, rx_buffer = pair.rx_next_to_clean, pair.rx_slot_buffer[pair.rx_next_to_clean]
    tx_slot = pair.tx_next_to_use
    assert guest.send(2, 300)

    assert vf.mem(rx_buffer, 300) == packet_bytes(2, 0, 300)
    qword1 = vf.mem_u64(pair.rx_ring + rx_slot * r.RX_DESC.size + r.RX_QWORD1_OFFSET)
    assert qword1 & r.RX_DD and qword1 & r.RX_EOF
    assert (qword1 >> r.RX_LEN_SHIFT) & r.RX_LEN_MASK == 300
    tx_qword1 = vf.mem_u64(pair.tx_ring + tx_slot * r.TX_DESC.size + r.TX_QWORD1_OFFSET)
    assert tx_qword1 & r.TX_DTYPE_MASK == r.TX_DTYPE_DESC_DONE
    assert vf.interrupts == [pair.vector] == [3]
    assert guest.clean(2) == 1
    assert guest.stats()["received"] == 1
    _, state = vf.model.queue_view(2)
    assert (state.tx_packets, state.rx_packets, state.rx_bytes) == (1, 1, 300)


def test_a_large_frame_spans_buffers_with_eof_on_the_last(vf: Vf) -> None:
    guest = vf.guest()
    pair = guest.pairs[0]
    first = pair.rx_next_to_clean
    assert guest.send(0, 9000)
    lengths, flags = [], []
    for i in range(5):
        qword1 = vf.mem_u64(pair.rx_ring + (first + i) * r.RX_DESC.size + r.RX_QWORD1_OFFSET)
        lengths.append((qword1 >> r.RX_LEN_SHIFT) & r.RX_LEN_MASK)
        flags.append(qword1 & (r.RX_DD | r.RX_EOF))
    assert lengths == [2048, 2048, 2048, 2048, 808]
    assert flags == [r.RX_DD] * 4 + [r.RX_DD | r.RX_EOF]
    assert guest.clean(0) == 1 and guest.stats()["corrupt"] == 0


def test_no_posted_buffer_drops_the_packet_but_completes_tx(vf: Vf) -> None:
    guest = vf.guest()
    guest.configure(1)
    pair = guest.pairs[1]
    posted = pair.rx_posted
    for _ in range(posted + 2):
        guest.send(1, 64)
        guest.clean(1)  # take what arrived, never post again
    _, state = vf.model.queue_view(1)
    assert state.rx_packets == posted and state.rx_discards == 2
    assert state.tx_packets == posted + 2 and not pair.in_flight
    guest.post_rx(1)
    guest.send(1, 64)
    guest.clean(1)
    stats = guest.stats()
    assert stats["received"] == posted + 1 and stats["dropped"] == 2 and stats["corrupt"] == 0


def test_interrupts_auto_mask_and_fire_when_armed_again(vf: Vf) -> None:
    guest = vf.guest()
    vf.count_interrupts()  # instead of the guest's own handlers
    guest.send(0, 64)
    guest.send(0, 64)  # vector 1 fired for the first and is masked now: the second is held
    assert vf.interrupts == [1]
    guest.rearm(0)
    assert vf.interrupts == [1, 1]
    vf.set_reg(r.vfint_dyn_ctln(0), r.DYN_CTL_INTENA | r.DYN_CTL_SWINT_TRIG)
    assert vf.interrupts == [1, 1, 1]
    assert vf.reg(r.vfint_dyn_ctln(0)) == r.DYN_CTL_INTENA  # action bits do not read back


def test_dma_fault_stops_only_that_queue_pair(vf: Vf) -> None:
    guest = vf.guest()
    pair = guest.pairs[0]
    slot = pair.tx_next_to_use
    vf.memory[pair.tx_ring - vf.iova + slot * 16 : pair.tx_ring - vf.iova + slot * 16 + 16] = (
        r.TX_DESC.pack(0xDEAD_0000, r.tx_data_qword1(64, r.TX_CMD_EOP | r.TX_CMD_RS))
    )
    vf.set_reg(r.qtx_tail(0), slot + 1)
    assert vf.reg(r.qctx(0, r.QCTX_CTL)) == r.QCTX_CTL_ERROR
    assert guest.send(1, 64) and guest.clean(1) == 1


def test_malformed_tx_descriptor_stops_the_queue(vf: Vf) -> None:
    guest = vf.guest()
    pair = guest.pairs[3]
    at = pair.tx_ring - vf.iova
    vf.memory[at : at + 16] = r.TX_DESC.pack(0, 0xF)
    vf.set_reg(r.qtx_tail(3), 1)
    assert vf.reg(r.qctx(3, r.QCTX_CTL)) == r.QCTX_CTL_ERROR


def test_a_context_the_device_cannot_take_is_refused(vf: Vf) -> None:
    vf.set_reg(r.qctx(0, r.QCTX_TX_BASE_LO), 0x1040)  # not 128-byte aligned
    vf.set_reg(r.qctx(0, r.QCTX_TX_LEN), 32)
    vf.set_reg(r.qctx(0, r.QCTX_RX_LEN), 32)
    vf.set_reg(r.qctx(0, r.QCTX_RX_BUF_SIZE), 2048)
    vf.set_reg(r.qctx(0, r.QCTX_CTL), r.QCTX_CTL_ENABLE)
    assert vf.reg(r.qctx(0, r.QCTX_CTL)) == r.QCTX_CTL_ERROR
    with pytest.raises(ValueError, match="RX buffer size 100"):
        vf.model.configure_queue(0, QueueConfig(0x1000, 32, 0x2000, 32, 100))
    with pytest.raises(ValueError, match="ring length 12"):
        vf.model.configure_queue(0, QueueConfig(0x1000, 12, 0x2000, 32, 2048))


def test_vfgen_rstat_after_a_function_reset(vf: Vf) -> None:
    guest = vf.guest()
    assert vf.reg(r.VFGEN_RSTAT) == r.VFR_VFACTIVE
    vf.device.reset()
    assert vf.reg(r.VFGEN_RSTAT) & r.VFR_STATE_MASK == r.VFR_COMPLETED
    assert vf.reg(r.VFGEN_RSTAT) == r.VFR_VFACTIVE
    assert vf.reg(r.qctx(0, r.QCTX_CTL)) == 0  # the queues are forgotten
    assert vf.model.queue_view(0)[1].tx_len == 0
    guest.restart()
    assert guest.send(0, 64) and guest.clean(0) == 1


def test_vfgen_rstat_through_a_held_vf_reset(vf: Vf, recorder: WriteRecorder) -> None:
    guest = vf.guest()
    vf.set_reg(r.EMU_RTRIG, r.RTRIG_VFSWR)
    recorder.take()
    assert vf.reg(r.VFGEN_RSTAT) == r.VFR_INPROGRESS
    assert vf.reg(r.VFGEN_RSTAT) == r.VFR_INPROGRESS
    vf.set_reg(r.qtx_tail(0), 5)  # no queue, no DMA while held
    assert vf.reg(r.EMU_RTRIG) == r.RTRIG_VFSWR
    assert not recorder.take()
    vf.set_reg(r.EMU_RTRIG, 0)
    assert vf.reg(r.qtx_tail(0)) == 0  # registers were reset
    assert [vf.reg(r.VFGEN_RSTAT) for _ in range(3)] == [1, 2, 2]
    # a two-byte read of the register acts the same
    vf.set_reg(r.EMU_RTRIG, 1)
    vf.set_reg(r.EMU_RTRIG, 0)
    assert vf.device.read(r.BAR0, r.VFGEN_RSTAT, 2) == b"\x01\x00"
    guest.restart()
    assert guest.send(0, 64) and guest.clean(0) == 1


def test_unaligned_and_wide_register_accesses(vf: Vf) -> None:
    guest = vf.guest()
    for q in (0, 1):
        pair = guest.pairs[q]
        at = pair.tx_ring - vf.iova
        vf.memory[at : at + 16] = r.TX_DESC.pack(
            pair.tx_free[0], r.tx_data_qword1(64, r.TX_CMD_EOP | r.TX_CMD_RS)
        )
    vf.device.write(r.BAR0, r.qtx_tail(0), (1 | 1 << 32).to_bytes(8, "little"))  # both tails
    assert [vf.model.queue_view(q)[1].tx_head for q in (0, 1)] == [1, 1]
    assert vf.device.read(r.BAR0, r.qtx_tail(0), 8) == (1 | 1 << 32).to_bytes(8, "little")


def test_no_dma_without_bus_mastering_or_while_quiesced(vf: Vf, recorder: WriteRecorder) -> None:
    guest = vf.guest()
    recorder.take()
    vf.device.write(RegionIndex.CONFIG, Config.COMMAND, b"\x02\x00")
    guest.send(0, 64)
    assert vf.model.queue_view(0)[1].tx_head == 0
    vf.device.write(RegionIndex.CONFIG, Config.COMMAND, b"\x06\x00")
    vf.device.set_migration_state(MigrationState.RUNNING_P2P)
    guest.send(0, 64)
    guest.rearm(0)
    assert vf.model.queue_view(0)[1].tx_head == 0
    assert not recorder.take()
    vf.device.set_migration_state(MigrationState.RUNNING)  # latched tails are served now
    assert vf.model.queue_view(0)[1].tx_head == 2
    assert guest.clean(0) == 2 and guest.stats()["corrupt"] == 0
