"""virtchnl, the VF-to-PF message protocol of Intel's Ethernet VFs: opcodes, status codes,
capability bits and message layouts (Linux ``include/linux/avf/virtchnl.h``, version 1.1).

A message travels in an admin queue buffer; its opcode rides in the descriptor's
``cookie_high`` and its status in ``cookie_low``. The device model answers as the PF
(``pf.PfResponder``), the guest driver asks as iavf does (``guest``): both use these layouts.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

__all__ = [
    "ETHER_ADDR",
    "ETH_STATS",
    "EVENT",
    "QUEUE_PAIR",
    "QUEUE_SELECT",
    "VECTOR_MAP",
    "VERSION",
    "VF_RESOURCE",
    "VSI_RESOURCE",
    "QueuePairInfo",
    "padded_list",
    "request_length_ok",
]

VERSION_MAJOR = 1
VERSION_MINOR = 1

# -- opcodes (enum virtchnl_ops) --------------------------------------------------------------
OP_UNKNOWN = 0
OP_VERSION = 1
OP_RESET_VF = 2
OP_GET_VF_RESOURCES = 3
OP_CONFIG_VSI_QUEUES = 6
OP_CONFIG_IRQ_MAP = 7
OP_ENABLE_QUEUES = 8
OP_DISABLE_QUEUES = 9
OP_ADD_ETH_ADDR = 10
OP_DEL_ETH_ADDR = 11
OP_CONFIG_PROMISCUOUS_MODE = 14
OP_GET_STATS = 15
OP_EVENT = 17

# -- status (enum virtchnl_status_code, in cookie_low) ----------------------------------------
STATUS_SUCCESS = 0
STATUS_ERR_PARAM = -5
STATUS_ERR_NOT_SUPPORTED = -64

# -- capabilities (vf_cap_flags) ---------------------------------------------------------------
CAP_L2 = 0x0000_0001
CAPS_IMPLEMENTED = CAP_L2
"""What the model grants of what a VF asks: plain L2 (no RSS, VLAN, WB_ON_ITR, ... offloads)."""

VSI_TYPE_SRIOV = 6

# -- events (virtchnl_pf_event) -----------------------------------------------------------------
EVENT_LINK_CHANGE = 1
LINK_SPEED_10GB = 0x8  # the legacy link speed enum (no ADV_LINK_SPEED)

PROMISC_UNICAST = 1 << 0
PROMISC_MULTICAST = 1 << 1


# -- layouts ------------------------------------------------------------------------------------
VERSION = struct.Struct("<II")  # major, minor
CAPS = struct.Struct("<I")
VF_RESOURCE = struct.Struct("<HHHHIII")  # num_vsis, queue pairs, max_vectors, max_mtu, caps, rss
VSI_RESOURCE = struct.Struct("<HHiH6s")  # vsi_id, queue pairs, vsi_type, qset_handle, mac
VSI_QUEUE_CONFIG = struct.Struct("<HHI")  # vsi_id, num_queue_pairs, pad
QUEUE_PAIR = struct.Struct("<HHHHQQHHIHHIIBBBBQiI")  # txq_info (24) + rxq_info (40)


class QueuePairInfo(NamedTuple):
    """A ``virtchnl_queue_pair_info``: ``virtchnl_txq_info`` then ``virtchnl_rxq_info``."""

    tx_vsi: int
    tx_queue: int
    tx_ring_len: int
    headwb_enabled: int
    tx_ring: int
    headwb_addr: int
    rx_vsi: int
    rx_queue: int
    rx_ring_len: int
    hdr_size: int
    splithdr_enabled: int
    databuffer_size: int
    max_pkt_size: int
    crc_disable: int
    rxdid: int
    flags: int
    pad: int
    rx_ring: int
    rx_split_pos: int
    pad2: int


IRQ_MAP = struct.Struct("<H")  # num_vectors
VECTOR_MAP = struct.Struct("<HHHHHH")  # vsi_id, vector_id, rxq_map, txq_map, rx/tx itr index
QUEUE_SELECT = struct.Struct("<HHII")  # vsi_id, pad, rx_queues, tx_queues
ETHER_LIST = struct.Struct("<HH")  # vsi_id, num_elements
ETHER_ADDR = struct.Struct("<6sBx")  # addr, type
PROMISC = struct.Struct("<HH")  # vsi_id, flags
ETH_STATS = struct.Struct("<12Q")
EVENT = struct.Struct("<iIB3xi")  # event, link_speed, link_status, severity


def padded_list(header: bytes, elements: list[bytes]) -> bytes:
    """A list message as iavf 6.12 builds it: the elements and one trailing zero element."""
    return header + b"".join(elements) + bytes(len(elements[0]))


def _list_ok(length: int, header: int, element: int, count: int) -> bool:
    """A list message holds ``count`` elements, or one more: iavf sizes its lists with
    ``struct_size`` over the old one-element-array structs, so 6.12 sends a trailing zero
    element (136 bytes for one queue pair); the PF's own validator computes the same."""
    return count > 0 and length in (header + count * element, header + (count + 1) * element)


def request_length_ok(opcode: int, message: bytes) -> bool | None:
    """Whether ``message`` has the length its opcode's layout needs (the PF's
    ``virtchnl_vc_validate_vf_msg``); ``None`` for an opcode the model does not implement."""
    length = len(message)
    if opcode == OP_VERSION:
        return length == VERSION.size
    if opcode == OP_RESET_VF:
        return length == 0
    if opcode == OP_GET_VF_RESOURCES:
        return length in (0, CAPS.size)
    if opcode == OP_CONFIG_VSI_QUEUES:
        if length < VSI_QUEUE_CONFIG.size:
            return False
        count = VSI_QUEUE_CONFIG.unpack_from(message)[1]
        return _list_ok(length, VSI_QUEUE_CONFIG.size, QUEUE_PAIR.size, count)
    if opcode == OP_CONFIG_IRQ_MAP:
        if length < IRQ_MAP.size:
            return False
        count = IRQ_MAP.unpack_from(message)[0]
        return _list_ok(length, IRQ_MAP.size, VECTOR_MAP.size, count)
    if opcode in (OP_ENABLE_QUEUES, OP_DISABLE_QUEUES, OP_GET_STATS):
        return length == QUEUE_SELECT.size
    if opcode in (OP_ADD_ETH_ADDR, OP_DEL_ETH_ADDR):
        if length < ETHER_LIST.size:
            return False
        count = ETHER_LIST.unpack_from(message)[1]
        return _list_ok(length, ETHER_LIST.size, ETHER_ADDR.size, count)
    if opcode == OP_CONFIG_PROMISCUOUS_MODE:
        return length == PROMISC.size
    return None
