"""The i40e-vf device model: identity, data path through the switch, interrupts, reset,
faults, mapped pages."""

from __future__ import annotations

import functools
import logging
import struct
from collections import Counter
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from i40e_mediator import registers as r
from i40e_mediator import virtchnl as vc
from i40e_mediator.guest import TX_BUF_SIZE, Guest, packet_bytes
from i40e_mediator.offload import internet_checksum
from i40e_mediator.switch import SWITCH
from i40e_support import GUEST_IOVA, MEMORY_SIZE, Vf, WriteRecorder

from vfio_mediate import MediatedDevice, MediatorRegistry, create_device
from vfio_mediate._pci import PciConfig
from vfio_mediate.uapi import PAGE_SIZE, MigrationState, RegionFlag, RegionIndex


def config(vf: Vf, offset: int, size: int) -> int:
    return int.from_bytes(vf.device.read(RegionIndex.CONFIG, offset, size), "little")


def stats(guest: Guest) -> dict[str, int]:
    reply = guest.expect_ok(vc.OP_GET_STATS, vc.QUEUE_SELECT.pack(guest.vsi_id, 0, 0, 0))
    names = [
        *("rx_bytes", "rx_unicast", "rx_multicast", "rx_broadcast", "rx_discards"),
        *("rx_unknown_protocol", "tx_bytes", "tx_unicast", "tx_multicast", "tx_broadcast"),
        *("tx_discards", "tx_errors"),
    ]
    return dict(zip(names, vc.ETH_STATS.unpack(reply), strict=True))


def test_identity_bars_and_msix(vf: Vf) -> None:
    assert config(vf, PciConfig.VENDOR_ID, 2) == 0x8086
    assert config(vf, PciConfig.DEVICE_ID, 2) == 0x154C
    assert config(vf, PciConfig.CLASS_CODE, 3) == 0x020000
    for bar, size in ((0, 0x10000), (3, 0x4000)):
        assert config(vf, PciConfig.BAR0 + 4 * bar, 4) & 0x6 == PciConfig.BAR_MEM64
        info = vf.device.region_info(bar)
        assert info.size == size and info.flags & RegionFlag.MMAP
    control = config(vf, PciConfig.MSIX_CAP + PciConfig.MSIX_CONTROL, 2)
    assert (control & 0x7FF) + 1 == r.MSIX_VECTORS == r.NUM_QUEUE_PAIRS + 1


def test_the_model_traps_only_pages_whose_accesses_act(vf: Vf) -> None:
    own = vf.backend.region_info(r.BAR0)
    mapped = {page for a in own.mmap_areas() for page in range(a.offset, a.end, PAGE_SIZE)}
    trapped = set(range(0, r.BAR0_SIZE, PAGE_SIZE)) - mapped
    # TX tails, queue interrupt control, ICR0, vector 0 control, the admin queue, VFGEN_RSTAT
    assert trapped == {0x0000, 0x3000, 0x4000, 0x5000, 0x6000, 0x7000, 0x8000}
    assert r.RX_TAIL_PAGE in mapped  # read from memory when a frame arrives


def test_the_virtchnl_bring_up_as_iavf_does_it(make_vf: Callable[..., Vf]) -> None:
    vf, other = make_vf("a"), make_vf("b")
    vf.count_interrupts()
    guest = Guest(vf.device, vf.memory, vf.iova)
    guest._connect_interrupts = lambda: None  # type: ignore[method-assign]
    guest.start()
    # the admin queue registers read back what iavf wrote; the heads are the device's
    assert vf.reg(r.VF_ATQLEN) == vf.reg(r.VF_ARQLEN) == 32 | r.AQ_ENABLE
    assert vf.reg(r.VF_ATQBAL) == guest.aq.atq and vf.reg(r.VF_ARQBAL) == guest.aq.arq
    assert vf.reg(r.VF_ATQH) == guest.aq.atq_next_to_use == 6  # VERSION .. ENABLE_QUEUES
    assert vf.reg(r.VF_ARQH) == 7  # six replies and the link-up event
    assert vf.reg(r.VFGEN_RSTAT) == r.VFR_VFACTIVE
    # an ARQ element as the device leaves it: DD|CMP, 0x0802, the message's length, the
    # virtchnl opcode and status in the cookies, the posted buffer holding the message
    slot = guest.aq.arq_next_to_clean
    guest._post(vc.OP_VERSION, vc.VERSION.pack(1, 1))
    flags, opcode, datalen, retval, high, low, _, _, addr_high, addr_low = r.AQ_DESC.unpack(
        vf.mem(guest.aq.arq + slot * r.AQ_DESC_SIZE, r.AQ_DESC_SIZE)
    )
    assert flags == r.AQ_FLAG_DD | r.AQ_FLAG_CMP | r.AQ_FLAG_BUF | r.AQ_FLAG_LB
    assert (opcode, datalen, retval, high, low) == (r.AQC_SEND_MSG_TO_VF, 8, 0, 1, 0)
    assert vf.mem(addr_high << 32 | addr_low, 8) == vc.VERSION.pack(1, 1)
    done = r.AQ_DESC.unpack(vf.mem(guest.aq.atq + 6 * r.AQ_DESC_SIZE, r.AQ_DESC_SIZE))
    assert done[0] == r.AQ_FLAG_SI | r.AQ_FLAG_BUF | r.AQ_FLAG_RD | r.AQ_FLAG_DD | r.AQ_FLAG_CMP
    assert done[3] == 0  # AQ retval
    guest.poll_admin()
    assert guest.link_up and guest.counters["events"] == 1
    status, reply = guest.request(vc.OP_GET_VF_RESOURCES, vc.CAPS.pack(0x1ABD8CF9))
    vsis, pairs, vectors, max_mtu, caps, key, lut = vc.VF_RESOURCE.unpack_from(reply)
    vsi, vsi_pairs, vsi_type, _, mac = vc.VSI_RESOURCE.unpack_from(reply, vc.VF_RESOURCE.size)
    assert vsi == guest.vsi_id
    assert status == 0 and len(reply) == 36
    assert (vsis, pairs, vectors, caps, vsi_pairs, vsi_type) == (1, 4, 5, vc.CAP_L2, 4, 6)
    assert max_mtu == r.MAX_FRAME_SIZE and (key, lut) == (52, 64)
    assert mac == vf.model.port.mac and mac[0] & 0x3 == 0x2  # locally administered unicast
    assert mac != other.model.port.mac
    assert SWITCH.default_mac(vf.model.port.number) == mac
    # the ATQ descriptors were completed (DD|CMP, retval 0) and the misc vector fired
    assert r.ADMIN_VECTOR in vf.interrupts
    assert vf.reg(r.VFINT_ICR01) & r.ICR0_ADMINQ and vf.reg(r.VFINT_ICR01) == 0  # read clears
    assert guest.expect_ok(vc.OP_VERSION, vc.VERSION.pack(1, 1)) == vc.VERSION.pack(1, 1)


IMPLEMENTED = {1, 2, 3, 6, 7, 8, 9, 10, 11, 14, 15}
IGNORED = {vc.OP_UNKNOWN, vc.OP_EVENT}


def test_every_other_opcode_is_not_supported(vf: Vf, caplog: pytest.LogCaptureFixture) -> None:
    guest = vf.guest()
    refused = [op for op in range(130) if op not in IMPLEMENTED | IGNORED]
    refused += [0x7FFF_FFFF, 0xFFFF_FFFF]
    with caplog.at_level(logging.INFO):
        for opcode in refused:
            guest._post(opcode, b"\x01\x00\x00\x00")
            guest.aq.outstanding = opcode
            guest.poll_admin()
            assert guest.aq.reply == (opcode, vc.STATUS_ERR_NOT_SUPPORTED, b""), opcode
    assert sum("not supported" in m for m in caplog.messages) == len(refused)
    for opcode in IGNORED:  # completed, but no reply: it would confuse iavf
        guest._post(opcode, b"")
        assert vf.reg(r.VF_ATQH) == guest.aq.atq_next_to_use
        assert vf.reg(r.VF_ARQH) == guest.aq.arq_next_to_clean
    guest.aq.outstanding = vc.OP_UNKNOWN
    assert guest.run() and guest.clean(0) >= 0 and guest.stats()["corrupt"] == 0


BAD_LENGTHS = [
    (vc.OP_VERSION, b"\x01\x00\x00\x00"),
    (vc.OP_RESET_VF, b"\x00"),
    (vc.OP_GET_VF_RESOURCES, b"\x01\x00"),
    (vc.OP_CONFIG_VSI_QUEUES, vc.VSI_QUEUE_CONFIG.pack(3, 1, 0)),  # announces a pair, has none
    (vc.OP_CONFIG_VSI_QUEUES, vc.VSI_QUEUE_CONFIG.pack(3, 0, 0)),
    (vc.OP_CONFIG_IRQ_MAP, vc.IRQ_MAP.pack(2) + bytes(12)),
    (vc.OP_CONFIG_IRQ_MAP, b"\x00"),
    (vc.OP_ENABLE_QUEUES, bytes(8)),
    (vc.OP_DISABLE_QUEUES, bytes(16)),
    (vc.OP_ADD_ETH_ADDR, vc.ETHER_LIST.pack(3, 2) + bytes(8)),
    (vc.OP_DEL_ETH_ADDR, vc.ETHER_LIST.pack(3, 0)),
    (vc.OP_ADD_ETH_ADDR, vc.ETHER_LIST.pack(3, 1) + bytes(24)),  # two elements too many
    (vc.OP_CONFIG_PROMISCUOUS_MODE, bytes(2)),
    (vc.OP_GET_STATS, b""),
]


@pytest.mark.parametrize(("opcode", "payload"), BAD_LENGTHS)
def test_a_message_of_the_wrong_length_is_err_param(
    vf: Vf, opcode: int, payload: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    guest = vf.guest()
    with caplog.at_level(logging.INFO):
        assert guest.request(opcode, payload) == (vc.STATUS_ERR_PARAM, b"")
    assert f"opcode {opcode} refused" in caplog.text
    assert vf.reg(r.VF_ARQLEN) & r.AQ_ENABLE  # no reset happened
    assert guest.send(0, 100) and guest.clean(0) == 1


def queue_pair(guest: Guest, **fields: int) -> bytes:
    pair = guest.pairs[0]
    values = {
        "vsi": guest.vsi_id,
        "queue": 0,
        "tx_len": 32,
        "headwb": 0,
        "tx_ring": pair.tx_ring,
        "rx_len": 32,
        "buf": 2048,
        "max_pkt": 9728,
        "rxdid": 0,
        "rx_ring": pair.rx_ring,
    } | fields
    v = values
    body = vc.QUEUE_PAIR.pack(
        v["vsi"], v["queue"], v["tx_len"], v["headwb"], v["tx_ring"], 0,
        v["vsi"], v["queue"], v["rx_len"], 0, 0, v["buf"], v["max_pkt"], 0, v["rxdid"], 0, 0,
        v["rx_ring"], 0, 0,
    )  # fmt: skip
    return vc.VSI_QUEUE_CONFIG.pack(guest.vsi_id, 1, 0) + body


INVALID = {
    "ring outside DMA memory": lambda g: (vc.OP_CONFIG_VSI_QUEUES, queue_pair(g, rx_ring=0x80)),
    "ring not aligned": lambda g: (
        vc.OP_CONFIG_VSI_QUEUES,
        queue_pair(g, tx_ring=g.pairs[0].tx_ring + 64),
    ),
    "queue out of range": lambda g: (vc.OP_CONFIG_VSI_QUEUES, queue_pair(g, queue=4)),
    "wrong VSI": lambda g: (vc.OP_CONFIG_VSI_QUEUES, queue_pair(g, vsi=9)),
    "ring length": lambda g: (vc.OP_CONFIG_VSI_QUEUES, queue_pair(g, tx_len=5000)),
    "head write-back": lambda g: (vc.OP_CONFIG_VSI_QUEUES, queue_pair(g, headwb=1)),
    "flexible descriptors": lambda g: (vc.OP_CONFIG_VSI_QUEUES, queue_pair(g, rxdid=2)),
    "packet size": lambda g: (vc.OP_CONFIG_VSI_QUEUES, queue_pair(g, max_pkt=10)),
    "buffer size": lambda g: (vc.OP_CONFIG_VSI_QUEUES, queue_pair(g, buf=20000)),
    "vector out of range": lambda g: (
        vc.OP_CONFIG_IRQ_MAP,
        vc.IRQ_MAP.pack(1) + vc.VECTOR_MAP.pack(g.vsi_id, 9, 1, 1, 0, 0),
    ),
    "queue on the admin vector": lambda g: (
        vc.OP_CONFIG_IRQ_MAP,
        vc.IRQ_MAP.pack(1) + vc.VECTOR_MAP.pack(g.vsi_id, 0, 1, 0, 0, 0),
    ),
    "queue bitmap out of range": lambda g: (
        vc.OP_ENABLE_QUEUES,
        vc.QUEUE_SELECT.pack(g.vsi_id, 0, 1 << 4, 0),
    ),
    "multicast as default": lambda g: (
        vc.OP_ADD_ETH_ADDR,
        vc.ETHER_LIST.pack(g.vsi_id, 1) + vc.ETHER_ADDR.pack(b"\xff" * 6, 0),
    ),
    "stats of another VSI": lambda g: (vc.OP_GET_STATS, vc.QUEUE_SELECT.pack(7, 0, 0, 0)),
}


@pytest.mark.parametrize("what", INVALID)
def test_invalid_parameters_are_err_param_with_a_log_line(
    vf: Vf, what: str, caplog: pytest.LogCaptureFixture
) -> None:
    guest = vf.guest()
    opcode, payload = INVALID[what](guest)
    with caplog.at_level(logging.INFO, logger="i40e_mediator"):
        assert guest.request(opcode, payload) == (vc.STATUS_ERR_PARAM, b"")
    assert [m for m in caplog.messages if "refused (status -5)" in m]
    if what == "ring outside DMA memory":
        assert "RX ring at 0x80 is outside DMA memory" in caplog.text
    assert guest.send(0, 300) and guest.clean(0) == 1  # nothing else changed


def test_enabling_a_queue_without_context_is_refused(vf: Vf) -> None:
    guest = vf.guest()
    guest._post(vc.OP_RESET_VF, b"")
    guest.init_admin_queue()  # the version survives a VF reset: no VERSION needed
    select = guest.queue_select(guest.pairs)
    assert guest.request(vc.OP_ENABLE_QUEUES, select) == (vc.STATUS_ERR_PARAM, b"")
    assert not any(vf.model.queue_view(q)[1].rx_enabled for q in range(4))


def test_unknown_admin_commands_and_oversized_buffers(vf: Vf) -> None:
    guest = vf.guest()
    aq = guest.aq
    aq.reply = None
    for opcode, flags, datalen, retval in (
        (0x0B02, 0, 0, r.AQ_RC_ENOTTY),  # an RSS command iavf sends only with RSS_AQ
        (r.AQC_SEND_MSG_TO_PF, r.AQ_FLAG_BUF | r.AQ_FLAG_RD, 8192, r.AQ_RC_EINVAL),
        (r.AQC_QUEUE_SHUTDOWN, 0, 0, r.AQ_RC_OK),
    ):
        slot = aq.atq_next_to_use
        at = aq.atq + slot * r.AQ_DESC_SIZE
        guest.memory.write(at, r.AQ_DESC.pack(flags, opcode, datalen, 0, 15, 0, 0, 0, 0, 0))
        aq.atq_next_to_use = (slot + 1) % 32
        vf.set_reg(r.VF_ATQT, aq.atq_next_to_use)
        assert vf.reg(r.VF_ATQH) == aq.atq_next_to_use
        done_flags, _, _, done_retval, *_ = r.AQ_DESC.unpack(vf.mem(at, r.AQ_DESC_SIZE))
        assert done_flags & (r.AQ_FLAG_DD | r.AQ_FLAG_CMP) == r.AQ_FLAG_DD | r.AQ_FLAG_CMP
        assert done_retval == retval and bool(done_flags & r.AQ_FLAG_ERR) == bool(retval)
    guest.poll_admin()
    assert guest.aq.reply is None  # no virtchnl reply to any of them
    assert guest.expect_ok(vc.OP_VERSION, vc.VERSION.pack(1, 1))


def test_a_full_admin_receive_queue_holds_then_flags_overflow(
    vf: Vf, caplog: pytest.LogCaptureFixture
) -> None:
    guest = vf.guest()
    guest.poll_admin()
    vf.set_reg(r.VF_ARQT, vf.reg(r.VF_ARQH))  # the driver takes every buffer back
    for _ in range(64):  # 64 replies wait in the device
        guest._post(vc.OP_GET_STATS, vc.QUEUE_SELECT.pack(guest.vsi_id, 0, 0, 0))
    assert not vf.reg(r.VF_ARQLEN) & r.AQ_OVFL
    with caplog.at_level(logging.WARNING):
        guest._post(vc.OP_GET_STATS, vc.QUEUE_SELECT.pack(guest.vsi_id, 0, 0, 0))
    assert vf.reg(r.VF_ARQLEN) & r.AQ_OVFL and "overflow" in caplog.text
    # buffers posted again: the held replies arrive, in order
    head = vf.reg(r.VF_ARQH)
    vf.set_reg(r.VF_ARQT, (head - 1) % 32)
    assert vf.reg(r.VF_ARQH) == (head - 1) % 32
    vf.set_reg(r.VF_ARQLEN, 32 | r.AQ_ENABLE)  # the driver clears OVFL
    assert vf.reg(r.VF_ARQLEN) == 32 | r.AQ_ENABLE


def test_disabling_the_receive_queue_drops_waiting_replies(vf: Vf) -> None:
    guest = vf.guest()
    guest.poll_admin()
    vf.set_reg(r.VF_ARQT, vf.reg(r.VF_ARQH))
    guest._post(vc.OP_GET_STATS, vc.QUEUE_SELECT.pack(guest.vsi_id, 0, 0, 0))
    assert vf.model.aq.pending
    guest.shutdown_admin_queue()
    assert not vf.model.aq.pending
    guest.init_admin_queue()
    assert guest.request(vc.OP_VERSION, vc.VERSION.pack(1, 1)) == (0, vc.VERSION.pack(1, 1))


def test_reset_vf_clears_queues_filters_and_admin_registers(vf: Vf) -> None:
    guest = vf.guest()
    guest.expect_ok(vc.OP_ADD_ETH_ADDR, guest.address_list([b"\x33\x33\x00\x00\x00\x01"]))
    guest.expect_ok(vc.OP_CONFIG_PROMISCUOUS_MODE, vc.PROMISC.pack(guest.vsi_id, 3))
    assert vf.model.port.filters[2]
    guest._post(vc.OP_RESET_VF, b"")
    registers = (r.VF_ATQH, r.VF_ATQT, r.VF_ATQLEN, r.VF_ATQBAL, r.VF_ATQBAH)
    registers += (r.VF_ARQH, r.VF_ARQT, r.VF_ARQLEN, r.VF_ARQBAL, r.VF_ARQBAH)
    assert [vf.reg(at) for at in registers] == [0] * 10
    assert [vf.reg(r.VFGEN_RSTAT) for _ in range(3)] == [1, 2, 2]
    unicast, multicast, promiscuous, all_multicast = vf.model.port.filters
    assert unicast == {guest.mac} and not multicast and not promiscuous and not all_multicast
    assert not any(vf.model.queue_view(q)[1].configured for q in range(4))
    guest.init_admin_queue()
    guest._configure_vf()
    assert guest.send(3, 1500) and guest.clean(0) == 1 and guest.stats()["corrupt"] == 0


def test_a_stale_tx_tail_after_reset_vf_is_never_served(vf: Vf) -> None:
    guest = vf.guest()
    for _ in range(3):
        guest.run()
    guest.reset(stale_tx_tail=0x14)  # iavf 6.12 on an MTU change
    for q in range(4):
        _, state = vf.model.queue_view(q)
        assert (state.tx_head, state.tx_tail, state.error) == (0, 0, False)
    for _ in range(3):
        guest.run()
    counters = guest.stats()
    assert counters["received"] == counters["sent"] - counters["dropped"] > 0
    assert stats(guest)["tx_errors"] == 0 and counters["events"] == 2  # link up again


def test_function_reset_forgets_the_version_and_shows_rstat(vf: Vf) -> None:
    guest = vf.guest()
    vf.device.reset()
    assert vf.model.pf.api_minor is None
    assert [vf.reg(r.VFGEN_RSTAT) for _ in range(2)] == [r.VFR_COMPLETED, r.VFR_VFACTIVE]
    assert vf.reg(r.VF_ARQLEN) == 0
    guest.restart()
    assert guest.send(0, 64) and guest.clean(0) == 1


def test_a_frame_goes_through_the_switch_and_back(vf: Vf) -> None:
    guest = vf.guest()
    vf.count_interrupts()
    pair, rx = guest.pairs[2], guest.pairs[0]
    rx_slot, rx_buffer = rx.rx_next_to_clean, rx.rx_slot_buffer[rx.rx_next_to_clean]
    tx_slot = pair.tx_next_to_use
    reflected = guest.partner.reflected
    assert guest.send(2, 300)
    assert guest.partner.reflected == reflected + 1
    sent = packet_bytes(guest.mac, guest.partner.mac, 2, 0, 300)
    assert vf.mem(rx_buffer, 300) == sent
    qword1 = vf.mem_u64(rx.rx_ring + rx_slot * r.RX_DESC.size + r.RX_QWORD1_OFFSET)
    assert qword1 & r.RX_DD and qword1 & r.RX_EOF
    assert (qword1 >> r.RX_LEN_SHIFT) & r.RX_LEN_MASK == 300
    tx_qword1 = vf.mem_u64(pair.tx_ring + tx_slot * r.TX_DESC.size + r.TX_QWORD1_OFFSET)
    assert tx_qword1 & r.TX_DTYPE_MASK == r.TX_DTYPE_DESC_DONE
    assert vf.interrupts == [1, 3]  # RX queue 0's vector (during the TX), TX queue 2's
    assert guest.clean(0) == 1 and guest.stats()["received"] == 1
    counted = stats(guest)
    assert counted["tx_unicast"] == counted["rx_unicast"] == 1
    assert counted["tx_bytes"] == counted["rx_bytes"] == 300


def test_two_vfs_filters_multicast_and_promiscuous(make_vf: Callable[..., Vf]) -> None:
    a, b = make_vf("a"), make_vf("b")
    sender, receiver = a.guest(), b.guest()

    def frame(destination: bytes) -> bytes:
        return destination + sender.mac + b"\x88\xb5" + bytes(100)

    group, stranger = b"\x01\x00\x5e\x00\x00\x01", b"\x02\x00\x00\x00\x00\x99"
    for destination in (receiver.mac, group, stranger, b"\xff" * 6):
        assert sender.transmit(0, frame(destination))
    assert receiver.take_frames(0) == [frame(receiver.mac), frame(b"\xff" * 6)]
    receiver.expect_ok(vc.OP_ADD_ETH_ADDR, receiver.address_list([group]))
    receiver.expect_ok(vc.OP_CONFIG_PROMISCUOUS_MODE, vc.PROMISC.pack(receiver.vsi_id, 1))
    for destination in (group, stranger):
        assert sender.transmit(0, frame(destination))
    assert receiver.take_frames(0) == [frame(group), frame(stranger)]
    receiver.expect_ok(vc.OP_DEL_ETH_ADDR, receiver.address_list([group]))
    receiver.expect_ok(vc.OP_CONFIG_PROMISCUOUS_MODE, vc.PROMISC.pack(receiver.vsi_id, 0))
    assert sender.transmit(0, frame(group)) and sender.transmit(0, frame(stranger))
    assert receiver.take_frames(0) == []
    assert stats(receiver)["rx_multicast"] == 1 and stats(sender)["tx_multicast"] == 3


def ipv4_udp(guest: Guest, payload: bytes) -> bytes:
    udp = struct.pack("!HHHH", 1000, 2000, 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0, bytes(4), bytes(4))
    return guest.partner.mac + guest.mac + b"\x08\x00" + ip + udp


def offsets(maclen: int, iplen: int, l4len: int) -> int:
    return (
        (maclen // 2) << r.TX_OFFSET_SHIFT
        | (iplen // 4) << r.TX_IPLEN_SHIFT
        | (l4len // 4) << r.TX_L4LEN_SHIFT
    )


def test_checksums_are_inserted_and_tso_segments(vf: Vf) -> None:
    guest = vf.guest()
    frame = ipv4_udp(guest, b"hello world!")
    cmd = (r.TX_IIPT_IPV4_CSUM << r.TX_CMD_IIPT_SHIFT | 3 << r.TX_CMD_L4T_SHIFT) << r.TX_CMD_SHIFT
    assert guest.transmit(0, frame, offload=cmd | offsets(14, 20, 8))
    (back,) = guest.take_frames(0)
    assert internet_checksum(back[14:34]) == 0 and back[24:26] != b"\0\0"
    pseudo = back[26:34] + b"\0\x11" + back[38:40]
    assert internet_checksum(pseudo + back[34:]) == 0
    # TSO: 3000 bytes of TCP payload in MSS 1000
    payload = bytes(range(250)) * 12
    tcp = struct.pack("!HHIIBBHHH", 1, 2, 1000, 0, 5 << 4, 0x18, 65535, 0, 0)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 0, 7, 0, 64, 6, 0, bytes(4), bytes(4))
    big = guest.partner.mac + guest.mac + b"\x08\x00" + ip + tcp + payload
    cmd = (r.TX_IIPT_IPV4_CSUM << r.TX_CMD_IIPT_SHIFT | 1 << r.TX_CMD_L4T_SHIFT) << r.TX_CMD_SHIFT
    assert guest.transmit(1, big, offload=cmd | offsets(14, 20, 20), tso_mss=1000)
    segments = guest.take_frames(0)
    assert [len(s) for s in segments] == [1054] * 3
    assert b"".join(s[54:] for s in segments) == payload
    assert [struct.unpack_from("!I", s, 38)[0] for s in segments] == [1000, 2000, 3000]
    assert stats(guest)["tx_unicast"] == 4


def test_an_offload_request_that_does_not_fit_drops_only_that_packet(
    vf: Vf, caplog: pytest.LogCaptureFixture
) -> None:
    guest = vf.guest()
    frame = ipv4_udp(guest, b"x")
    cmd = (3 << r.TX_CMD_L4T_SHIFT) << r.TX_CMD_SHIFT
    with caplog.at_level(logging.WARNING):
        assert guest.transmit(0, frame, offload=cmd | offsets(14, 60, 8))  # IP header too long
    assert "dropped" in caplog.text and guest.take_frames(0) == []
    assert stats(guest)["tx_errors"] == 1
    assert guest.send(0, 64) and guest.clean(0) == 1


def test_a_large_frame_spans_buffers_with_eof_on_the_last(vf: Vf) -> None:
    guest = vf.guest()
    rx = guest.pairs[0]
    first = rx.rx_next_to_clean
    assert guest.send(1, 9000)  # 5 RX buffers of 2048
    flags = [
        vf.mem_u64(rx.rx_ring + (first + i) * r.RX_DESC.size + r.RX_QWORD1_OFFSET) for i in range(5)
    ]
    assert [f & r.RX_EOF for f in flags] == [0, 0, 0, 0, r.RX_EOF]
    assert [(f >> r.RX_LEN_SHIFT) & r.RX_LEN_MASK for f in flags] == [2048] * 4 + [808]
    assert guest.clean(0) == 1 and guest.stats()["received"] == 1


def test_frames_above_max_pkt_size_or_without_buffers_are_discarded(vf: Vf) -> None:
    guest = vf.guest()
    pair = guest.pairs[0]
    guest.expect_ok(vc.OP_DISABLE_QUEUES, guest.queue_select([pair]))
    guest._reclaim(pair)
    guest._new_rings(pair)
    guest.post_rx(0)
    guest.expect_ok(vc.OP_CONFIG_VSI_QUEUES, queue_pair(guest, max_pkt=1000))
    guest.expect_ok(vc.OP_ENABLE_QUEUES, guest.queue_select([pair]))
    assert guest.send(1, 1001) and guest.send(1, 1000)
    assert guest.clean(0) == 1 and guest.stats()["dropped"] == 1
    vf.set_reg(r.qrx_tail(0), pair.rx_next_to_clean)  # the device owns no buffer now
    assert guest.send(2, 64)
    assert guest.take_frames(0) == []
    counted = stats(guest)
    assert counted["rx_discards"] == 2 and counted["tx_unicast"] == 3


def test_interrupts_auto_mask_and_fire_when_armed_again(vf: Vf) -> None:
    guest = vf.guest()
    vf.count_interrupts()
    guest.send(1, 64)
    guest.send(1, 64)
    assert vf.interrupts == [1, 2]  # RX vector 1 and TX vector 2 fired once each: masked now
    guest.rearm(0)
    assert vf.interrupts == [1, 2, 1]  # the held cause fires when INTENA comes back


def test_dma_fault_stops_only_that_queue_pair(vf: Vf, caplog: pytest.LogCaptureFixture) -> None:
    guest = vf.guest()
    pair = guest.pairs[1]
    vf.memory[pair.tx_ring - vf.iova : pair.tx_ring - vf.iova + 16] = r.TX_DESC.pack(
        0x7_0000_0000, r.tx_data_qword1(64, r.TX_CMD_EOP | r.TX_CMD_RS)
    )
    with caplog.at_level(logging.WARNING):
        vf.set_reg(r.qtx_tail(1), 1)
    assert "queue pair 1 stopped" in caplog.text
    assert vf.model.queue_view(1)[1].error and not vf.model.queue_view(1)[1].tx_enabled
    assert guest.send(3, 64) and guest.clean(0) == 1


def test_a_malformed_tx_descriptor_is_counted_and_logged(
    vf: Vf, caplog: pytest.LogCaptureFixture
) -> None:
    guest = vf.guest()
    pair = guest.pairs[3]
    at = pair.tx_ring - vf.iova
    vf.memory[at : at + 16] = r.TX_DESC.pack(pair.tx_free[0], 0x5)  # DTYPE 5: no such type
    with caplog.at_level(logging.WARNING):
        vf.set_reg(r.qtx_tail(3), 1)
    assert "TX descriptor 0 has type 0x5" in caplog.text
    assert stats(guest)["tx_errors"] == 1
    assert vf.model.queue_view(3)[1].error
    assert guest.send(0, 64) and guest.clean(0) == 1  # the other pairs go on


def test_no_dma_without_bus_mastering_or_while_quiesced(vf: Vf, recorder: WriteRecorder) -> None:
    guest = vf.guest()
    recorder.take()
    vf.device.set_migration_state(MigrationState.STOP)
    guest.send(0, 64)
    guest._post(vc.OP_GET_STATS, vc.QUEUE_SELECT.pack(guest.vsi_id, 0, 0, 0))
    assert not recorder.take()
    vf.device.set_migration_state(MigrationState.RUNNING)  # latched tails served now
    assert recorder.take() and guest.clean(0) == 1
    guest.poll_admin()
    assert guest.aq.reply is not None and guest.aq.reply[0] == vc.OP_GET_STATS
    vf.device.write(RegionIndex.CONFIG, PciConfig.COMMAND, (0).to_bytes(2, "little"))
    guest.send(0, 64)
    assert not recorder.take()


def test_wide_reads_beside_a_computed_register_do_not_compute_it(vf: Vf) -> None:
    # After a reset VFGEN_RSTAT reads COMPLETED once: reads that end right before it or start
    # right after it must leave that reading to the driver.
    vf.guest()._post(vc.OP_RESET_VF, b"")
    assert vf.device.read(r.BAR0, r.VFGEN_RSTAT - 256, 256) == bytes(256)
    assert vf.device.read(r.BAR0, r.VFGEN_RSTAT + 4, 256) == bytes(256)
    assert [vf.reg(r.VFGEN_RSTAT) for _ in range(2)] == [r.VFR_COMPLETED, r.VFR_VFACTIVE]
    assert vf.device.read(r.BAR0, r.VFGEN_RSTAT - 256, 260)[256:] == (2).to_bytes(4, "little")


def test_unaligned_and_wide_register_accesses(vf: Vf) -> None:
    guest = vf.guest()
    vf.device.read(r.BAR0, r.VFGEN_RSTAT, 4)
    assert vf.device.read(r.BAR0, r.VFGEN_RSTAT - 2, 8)[2:6] == (2).to_bytes(4, "little")
    assert vf.device.read(r.BAR0, r.VFGEN_RSTAT + 1, 1) == b"\0"
    # a TX tail written as two bytes is still a doorbell
    pair = guest.pairs[0]
    length = 64
    packet = packet_bytes(guest.partner.mac, guest.mac, 0, guest.counters["sent"], length)
    buffer = pair.tx_free.popleft()
    guest.memory.write(buffer, packet)
    guest.memory.write(
        pair.tx_ring, r.TX_DESC.pack(buffer, r.tx_data_qword1(length, r.TX_CMD_EOP | r.TX_CMD_RS))
    )
    assert length <= TX_BUF_SIZE
    vf.device.write(r.BAR0, r.qtx_tail(0), (1).to_bytes(2, "little"))
    assert guest.take_frames(0) == [packet_bytes(guest.mac, guest.partner.mac, 0, 0, 64)]


def test_too_many_filters_are_refused(vf: Vf) -> None:
    guest = vf.guest()
    groups = [b"\x01\x00\x5e\x00\x01" + bytes([i]) for i in range(63)]
    guest.expect_ok(vc.OP_ADD_ETH_ADDR, guest.address_list(groups))  # 64 with the MAC
    extra = guest.address_list([b"\x01\x00\x5e\x00\x02\x00"])
    assert guest.request(vc.OP_ADD_ETH_ADDR, extra) == (vc.STATUS_ERR_PARAM, b"")
    assert len(vf.model.port.filters[1]) == 63


LENGTHS = {
    vc.OP_VERSION: [8],
    vc.OP_GET_VF_RESOURCES: [0, 4],
    vc.OP_CONFIG_VSI_QUEUES: [8 + 64, 8 + 128],
    vc.OP_CONFIG_IRQ_MAP: [2 + 12, 2 + 24, 2 + 36],
    vc.OP_ENABLE_QUEUES: [12],
    vc.OP_DISABLE_QUEUES: [12],
    vc.OP_ADD_ETH_ADDR: [4 + 8, 4 + 16],
    vc.OP_DEL_ETH_ADDR: [4 + 8, 4 + 16],
    vc.OP_CONFIG_PROMISCUOUS_MODE: [4],
    vc.OP_GET_STATS: [12],
}


ANSWERED: Counter[int] = Counter()


def test_random_requests_are_always_answered() -> None:
    ANSWERED.clear()
    _random_requests_are_answered()
    assert ANSWERED[vc.STATUS_SUCCESS] and ANSWERED[vc.STATUS_ERR_PARAM]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def _random_requests_are_answered(data: st.DataObject) -> None:
    """Requests of the right length but any content (the count fields kept consistent):
    every one gets exactly one reply of a known status and the device keeps working."""
    answered = ANSWERED
    backend = create_device("i40e-vf", name="fuzz")
    memory = memoryview(bytearray(MEMORY_SIZE))
    backend.dma.map_memory(GUEST_IOVA, memory)
    try:
        with MediatedDevice(backend, _registry()) as device:
            guest = Guest(device, memory, GUEST_IOVA)
            guest.start()
            for _ in range(data.draw(st.integers(1, 6))):
                opcode = data.draw(st.sampled_from(sorted(LENGTHS)))
                length = data.draw(st.sampled_from(LENGTHS[opcode]))
                payload = bytearray(data.draw(st.binary(min_size=length, max_size=length)))
                vsi = struct.pack("<H", guest.vsi_id)
                if opcode == vc.OP_CONFIG_VSI_QUEUES:
                    payload[0:4] = vsi + struct.pack("<H", (length - 8) // 64)
                    for at in range(8, length, 64):  # small queue ids and ring lengths
                        payload[at : at + 6] = vsi + bytes([payload[at + 2] & 3, 0, 0, 2])
                        payload[at + 24 : at + 28] = vsi + payload[at + 2 : at + 4]
                elif opcode == vc.OP_CONFIG_IRQ_MAP:
                    payload[0:2] = struct.pack("<H", (length - 2) // 12)
                    for at in range(2, length, 12):
                        payload[at : at + 2] = vsi
                        payload[at + 2] &= 7  # vector ids around the VF's 5
                elif opcode in (vc.OP_ADD_ETH_ADDR, vc.OP_DEL_ETH_ADDR):
                    payload[0:4] = vsi + struct.pack("<H", (length - 4) // 8)
                elif opcode in (vc.OP_ENABLE_QUEUES, vc.OP_DISABLE_QUEUES, vc.OP_GET_STATS):
                    payload[0:2] = vsi
                    payload[4:12] = bytes([payload[4] & 0x1F, 0, 0, 0, payload[8] & 0x1F, 0, 0, 0])
                elif opcode == vc.OP_CONFIG_PROMISCUOUS_MODE:
                    payload[0:2] = vsi
                status, _ = guest.request(opcode, bytes(payload))
                assert status in (vc.STATUS_SUCCESS, vc.STATUS_ERR_PARAM)
                answered[status] += 1
            guest.reset()
            assert guest.send(0, 100) and guest.clean(0) == 1
    finally:
        backend.close()


@functools.cache
def _registry() -> MediatorRegistry:
    return MediatorRegistry.from_entry_points()


def test_iavf_sized_rings(make_vf: Callable[..., Vf]) -> None:
    """512 descriptors per ring and 1536-byte buffers, what iavf configures."""
    vf = make_vf("big", size=8 << 20)
    guest = vf.guest(ring_len=r.RING_LEN_DEFAULT, buf_size=1536, queues=1)
    for sequence in range(700):  # wraps both rings
        assert guest.send(0, 60 + sequence * 13 % 1400)
        if sequence % 100 == 99:
            guest.clean(0)
            guest.post_rx(0)
    guest.clean(0)
    assert guest.stats()["received"] == 700 and guest.stats()["corrupt"] == 0
    _, state = vf.model.queue_view(0)
    assert (state.tx_len, state.rx_len, state.rx_buf_size) == (512, 512, 1536)
    assert state.tx_head == state.rx_head == 700 - 512


def test_an_admin_ring_outside_dma_memory_sets_crit(
    vf: Vf, caplog: pytest.LogCaptureFixture
) -> None:
    guest = vf.guest()
    vf.set_reg(r.VF_ATQBAL, 0x1000)  # nothing mapped there
    vf.set_reg(r.VF_ATQBAH, 0)
    with caplog.at_level(logging.WARNING):
        vf.set_reg(r.VF_ATQT, (vf.reg(r.VF_ATQH) + 1) % 32)
    assert vf.reg(r.VF_ATQLEN) & r.AQ_CRIT and "admin queue DMA fault" in caplog.text
    assert vf.model.name in caplog.text
    vf.set_reg(r.VF_ATQLEN, 0)  # iavf's recovery after its timeout: the AQ from scratch
    guest.shutdown_admin_queue()
    guest.init_admin_queue()
    assert guest.expect_ok(vc.OP_VERSION, vc.VERSION.pack(1, 1)) == vc.VERSION.pack(1, 1)


def test_computed_reads_name_every_register_the_model_computes() -> None:
    """``computed_reads`` is honest: every BAR0 read outside it is plain memory to the model
    (so the core may skip asking), every register in it is computed."""
    backend = create_device("i40e-vf")
    try:
        model = backend.model
        computed = {offset for offset, _ in model.computed_reads(r.BAR0)}
        assert computed and model.computed_reads(r.MSIX_BAR) == []
        for offset in range(0, r.BAR0_SIZE, r.REGISTER_SIZE):
            value = model.bar_read(r.BAR0, offset, r.REGISTER_SIZE)
            assert (value is not None) == (offset in computed), hex(offset)
    finally:
        backend.close()
