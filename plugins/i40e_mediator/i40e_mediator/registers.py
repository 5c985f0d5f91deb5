"""The X710 VF's facts: PCI identity, BAR0 registers and bits, DMA descriptor layouts.

The one place for them: the device model, the mediator and the guest driver all import these.
Offsets and bits follow Linux's ``iavf_register.h`` and ``iavf_type.h``; everything is little
endian. The queue-context window (``EMU_*``, ``QCTX_*``) is this model's own and documented here.

Queue-context window (BAR0 0xE000-0xEFFF; the real VF has no registers past 0xDC00)
----------------------------------------------------------------------------------
The real VF is told its rings by the PF through virtchnl ``CONFIG_VSI_QUEUES`` over the admin
queue. Until the model answers virtchnl, software programs queue pair ``q`` directly through a
64-byte block at ``EMU_BASE + 0x40 * q``:

======  =====================  ============================================================
offset  register               meaning
======  =====================  ============================================================
0x00    QCTX_TX_BASE_LO/HI     TX ring IOVA (two dwords), 128-byte aligned
0x08    QCTX_TX_LEN            TX ring length in 16-byte descriptors
0x10    QCTX_RX_BASE_LO/HI     RX ring IOVA (two dwords), 128-byte aligned
0x18    QCTX_RX_LEN            RX ring length in 32-byte descriptors
0x1C    QCTX_RX_BUF_SIZE       bytes per RX buffer (a multiple of 128)
0x20    QCTX_CTL               write ENABLE: latch the fields above, head = 0, start the pair;
                               write 0: stop the pair. Reads ENABLE and ERROR (bit 31: the last
                               context was refused, or a DMA fault / malformed TX stopped it)
0x24    QCTX_VECTOR            MSI-X vector of the pair (0: default ``1 + q % (vectors - 1)``)
======  =====================  ============================================================

``EMU_RTRIG`` bit 0 (VFSWR) holds the VF in reset while set, like the PF's VPGEN_VFRTRIG:
VFGEN_RSTAT reads INPROGRESS (0) while held, COMPLETED (1) once after release, then VFACTIVE
(2). ``EMU_QUEUE_PAIRS`` reads the number of queue pairs (what GET_VF_RESOURCES reports).
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

VFR_STATE_MASK = 0x3
VFR_INPROGRESS = 0
VFR_COMPLETED = 1
VFR_VFACTIVE = 2

AQ_LEN_MASK = 0x3FF
AQ_ENABLE = 1 << 31
AQ_HEAD_MASK = 0x3FF

# -- queue-context window (this model's, see the module docstring) ---------------------------

EMU_BASE = 0xE000
QCTX_STRIDE = 0x40
QCTX_TX_BASE_LO = 0x00
QCTX_TX_BASE_HI = 0x04
QCTX_TX_LEN = 0x08
QCTX_RX_BASE_LO = 0x10
QCTX_RX_BASE_HI = 0x14
QCTX_RX_LEN = 0x18
QCTX_RX_BUF_SIZE = 0x1C
QCTX_CTL = 0x20
QCTX_VECTOR = 0x24
QCTX_CTL_ENABLE = 1 << 0
QCTX_CTL_ERROR = 1 << 31
EMU_RTRIG = 0xE800
RTRIG_VFSWR = 1 << 0
EMU_QUEUE_PAIRS = 0xE804


def qctx(queue: int, field: int) -> int:
    """The BAR0 offset of ``field`` (a ``QCTX_*`` offset) of queue pair ``queue``'s context."""
    return EMU_BASE + QCTX_STRIDE * queue + field


# Limits of a queue context (the X710's: 128-byte ring alignment, buffers in 128-byte units).
RING_ALIGN = 128
RING_LEN_MIN = 8
RING_LEN_MAX = 4096
RING_LEN_MULTIPLE = 8
RX_BUF_UNIT = 128
RX_BUF_MAX = 16256

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
TX_BUF_SIZE_SHIFT = 34
TX_BUF_SIZE_MASK = 0x3FFF
TX_QWORD1_OFFSET = 8
TX_MAX_FRAGMENTS = 8  # data descriptors per packet (without TSO)
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
