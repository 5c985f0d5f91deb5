"""The X710 VF's facts: PCI identity, BAR0 registers and bits, DMA descriptor layouts.

The one place for them: the device model, the mediator and the guest driver all import these.
Offsets and bits follow Linux's ``iavf_register.h``, ``iavf_type.h`` and ``iavf_adminq_cmd.h``;
everything is little endian. The VF has no register to configure its queues: software asks
the PF over virtchnl through the admin queue (``virtchnl``).
"""

from __future__ import annotations

import struct

# -- PCI identity and BARs ------------------------------------------------------------------

VENDOR_ID = 0x8086
DEVICE_ID = 0x154C  # XL710/X710 VF
CLASS_ETHERNET = 0x020000
REVISION = 0x02
BAR0 = 0
BAR0_SIZE = 0x10000
MSIX_BAR = 3
BAR3_SIZE = 0x4000
MSIX_TABLE_OFFSET = 0x0000
MSIX_PBA_OFFSET = 0x2000
MSIX_ENTRY_SIZE = 16
NUM_QUEUE_PAIRS = 4
MSIX_VECTORS = NUM_QUEUE_PAIRS + 1  # vector 0: admin queue / misc; 1..N: queue pairs
ADMIN_VECTOR = 0
MAX_QUEUES = 16  # the register map has tails for 16 queues

PAGE_SIZE = 0x1000
REGISTER_SIZE = 4

# -- BAR0 register map ------------------------------------------------------------------------

TAIL_MASK = 0x1FFF


def qtx_tail(queue: int) -> int:
    """QTX_TAIL1(q): TX queue tail."""
    return 0x0000 + 4 * queue


def qrx_tail(queue: int) -> int:
    """QRX_TAIL1(q): RX queue tail."""
    return 0x2000 + 4 * queue


def vfint_itrn(itr: int, vector: int) -> int:
    """VFINT_ITRN1(i, n): ITR interval of queue vector ``n + 1`` (stored, not acted on)."""
    return 0x2800 + 64 * itr + 4 * vector


def vfint_dyn_ctln(vector: int) -> int:
    """VFINT_DYN_CTLN1(n): interrupt control of queue vector ``n + 1``."""
    return 0x3800 + 4 * vector


VFINT_ICR01 = 0x4800
VFINT_ICR0_ENA1 = 0x5000
VFINT_STAT_CTL01 = 0x5400
VFINT_DYN_CTL01 = 0x5C00  # interrupt control of vector 0


def vfint_itr01(itr: int) -> int:
    """VFINT_ITR01(i): ITR interval of vector 0."""
    return 0x4C00 + 4 * itr


VF_ARQBAH = 0x6000
VF_ATQH = 0x6400
VF_ATQLEN = 0x6800
VF_ARQBAL = 0x6C00
VF_ARQT = 0x7000
VF_ARQH = 0x7400
VF_ATQBAH = 0x7800
VF_ATQBAL = 0x7C00
VF_ARQLEN = 0x8000
VF_ATQT = 0x8400
VFGEN_RSTAT = 0x8800


def vfqf_hena(index: int) -> int:
    """VFQF_HENA(i): RSS hash enable (stored)."""
    return 0xC400 + 4 * index


def vfqf_hkey(index: int) -> int:
    """VFQF_HKEY(i): RSS key (stored)."""
    return 0xCC00 + 4 * index


def vfqf_hlut(index: int) -> int:
    """VFQF_HLUT(i): RSS lookup table (stored)."""
    return 0xD000 + 4 * index


# The two pages where software hands the device buffers it will write (the RFC's traps).
RX_TAIL_PAGE = 0x2000
ARQ_TAIL_PAGE = 0x7000

# -- register bits ------------------------------------------------------------------------

DYN_CTL_INTENA = 1 << 0
DYN_CTL_CLEARPBA = 1 << 1
DYN_CTL_SWINT_TRIG = 1 << 2
DYN_CTL_ITR_INDX_SHIFT = 3
DYN_CTL_ITR_NONE = 3 << DYN_CTL_ITR_INDX_SHIFT  # "no ITR update", what iavf writes
DYN_CTL_ACTIONS = DYN_CTL_CLEARPBA | DYN_CTL_SWINT_TRIG  # self-clearing: never read back

ICR0_ADMINQ = 1 << 30  # VFINT_ICR01 / VFINT_ICR0_ENA1: an admin receive queue event

VFR_STATE_MASK = 0x3
VFR_INPROGRESS = 0
VFR_COMPLETED = 1
VFR_VFACTIVE = 2

AQ_LEN_MASK = 0x3FF
AQ_VFE = 1 << 28
AQ_OVFL = 1 << 29  # ARQLEN: a message was dropped for want of a posted buffer
AQ_CRIT = 1 << 30  # ATQLEN/ARQLEN: a critical error (a descriptor the device could not DMA)
AQ_ENABLE = 1 << 31
AQ_HEAD_MASK = 0x3FF

# Limits of a queue context (the X710's: 128-byte ring alignment, buffers in 128-byte units).
RING_ALIGN = 128
RING_LEN_MIN = 8
RING_LEN_DEFAULT = 512  # what iavf configures
RING_LEN_MAX = 4096
RING_LEN_MULTIPLE = 8
RX_BUF_UNIT = 128
RX_BUF_MAX = 16256
RX_PKT_MIN = 64
RX_PKT_MAX = 16 * 1024 - 1

# -- DMA descriptors ------------------------------------------------------------------------

TX_DESC = struct.Struct("<QQ")  # buffer_addr, cmd_type_offset_bsz
TX_DTYPE_MASK = 0xF
TX_DTYPE_DATA = 0x0
TX_DTYPE_CONTEXT = 0x1
TX_DTYPE_DESC_DONE = 0xF
TX_CMD_SHIFT = 4
TX_CMD_EOP = 0x001
TX_CMD_RS = 0x002
TX_CMD_ICRC = 0x004
TX_CMD_IIPT_SHIFT = 5  # IIPT in CMD: 1 IPv6, 2 IPv4, 3 IPv4 with IP checksum insertion
TX_CMD_IIPT_MASK = 0x3
TX_CMD_L4T_SHIFT = 8  # L4T in CMD: 1 TCP, 2 SCTP, 3 UDP (insert the L4 checksum)
TX_CMD_L4T_MASK = 0x3
TX_IIPT_IPV4_CSUM = 3
TX_OFFSET_SHIFT = 16
TX_MACLEN_MASK = 0x7F  # 2-byte words, bits 16-22
TX_IPLEN_SHIFT = 23
TX_IPLEN_MASK = 0x7F  # 4-byte words, bits 23-29
TX_L4LEN_SHIFT = 30
TX_L4LEN_MASK = 0xF  # 4-byte words, bits 30-33
TX_CTX_CMD_TSO = 0x01  # context descriptor CMD (bits 4-19)
TX_CTX_TSO_LEN_SHIFT = 30
TX_CTX_TSO_LEN_MASK = 0x3FFFF
TX_CTX_MSS_SHIFT = 50
TX_CTX_MSS_MASK = 0x3FFF
TX_BUF_SIZE_SHIFT = 34
TX_BUF_SIZE_MASK = 0x3FFF
TX_QWORD1_OFFSET = 8
TX_MAX_FRAGMENTS = 8  # data descriptors per packet (without TSO)
TX_MAX_TSO_FRAGMENTS = 64  # data descriptors of one TSO packet (iavf needs more than 8)
TX_DESC_DONE = (TX_DTYPE_DESC_DONE).to_bytes(8, "little")  # the completion write-back


def tx_data_qword1(size: int, cmd: int) -> int:
    """``cmd_type_offset_bsz`` of a data descriptor of ``size`` bytes with command ``cmd``."""
    return (
        TX_DTYPE_DATA
        | ((cmd | TX_CMD_ICRC) << TX_CMD_SHIFT)
        | ((size & TX_BUF_SIZE_MASK) << TX_BUF_SIZE_SHIFT)
    )


RX_DESC = struct.Struct("<QQQQ")  # read: pkt_addr, hdr_addr, 0, 0; write-back: qword0..3
RX_QWORD1_OFFSET = 8
RX_DD = 1 << 0
RX_EOF = 1 << 1
RX_LEN_SHIFT = 38
RX_LEN_MASK = 0x3FFF
RX_MAX_CHAIN = 5  # buffers one frame may span
MAX_FRAME_SIZE = 9728


def rx_writeback_qword1(length: int, last: bool) -> int:
    """``status_error_len`` the device writes back for a buffer holding ``length`` bytes."""
    return RX_DD | (RX_EOF if last else 0) | ((length & RX_LEN_MASK) << RX_LEN_SHIFT)


AQ_DESC = struct.Struct("<HHHHIIIIII")  # flags, opcode, datalen, retval, cookies, params, addr
AQ_DESC_SIZE = AQ_DESC.size
AQ_DATALEN_OFFSET = 4
AQ_ADDR_HIGH_OFFSET = 24
AQ_ADDR_LOW_OFFSET = 28
AQ_BUF_MAX = 4096  # the largest admin queue buffer (iavf posts 4096-byte ARQ buffers)

AQ_FLAG_DD = 0x0001
AQ_FLAG_CMP = 0x0002
AQ_FLAG_ERR = 0x0004
AQ_FLAG_LB = 0x0200
AQ_FLAG_RD = 0x0400
AQ_FLAG_BUF = 0x1000
AQ_FLAG_SI = 0x2000

AQC_QUEUE_SHUTDOWN = 0x0003
AQC_SEND_MSG_TO_PF = 0x0801
AQC_SEND_MSG_TO_VF = 0x0802

# Admin queue return codes (``retval``; enum i40e_admin_queue_err).
AQ_RC_OK = 0
AQ_RC_EINVAL = 14
AQ_RC_ENOTTY = 15
