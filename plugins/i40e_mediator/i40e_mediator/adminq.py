"""The VF's admin queue engine: the send queue (ATQ) the VF posts commands on and the receive
queue (ARQ) the PF's messages arrive on, driven through the ten VF_ATQ*/VF_ARQ* registers.

- **ATQ.** A tail write makes the engine read each descriptor from the head to the tail by DMA
  (and its buffer, when BUF is set), hand virtchnl messages (opcode 0x0801) to the PF,
  complete queue shutdown (0x0003) and refuse other opcodes (retval ENOTTY, ERR set), then
  write the descriptor back with DD|CMP and move ATQH past it - all within the write, so the
  head iavf polls has moved when the write returns.
- **ARQ.** A message for the VF is held in a FIFO and written into the posted buffer at ARQH
  (descriptor: DD|CMP, opcode 0x0802, datalen = message length, cookie_high = virtchnl opcode,
  cookie_low = status), ARQH moves, VFINT_ICR01 gets the ADMINQ cause and, if that cause is
  enabled, MSI-X vector 0 is signalled. With no buffer posted (ARQH == ARQT) messages wait for
  the next ARQT write; if ``PENDING_MAX`` wait already, the new one is dropped, ARQLEN's OVFL
  bit is set and a warning logged.
- **Registers.** Base addresses are read when a queue is used, never latched at the LEN
  write (iavf writes LEN before BAL/BAH). Clearing a LEN's ENABLE bit shuts that queue down:
  for the ARQ, waiting messages are dropped (a stale reply in a re-initialised queue would
  answer the wrong request). A descriptor the engine cannot DMA sets the LEN's CRIT bit.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import NamedTuple, Protocol, final

from . import registers as r

__all__ = ["PENDING_MAX", "AdminQueue", "AqHost", "Message"]

logger = logging.getLogger(__name__)

PENDING_MAX = 64
"""PF-to-VF messages held while the VF posts no ARQ buffer."""


class Message(NamedTuple):
    """A PF-to-VF virtchnl message."""

    opcode: int
    status: int
    payload: bytes


class AqHost(Protocol):
    """What the engine needs of the device: registers, DMA and the PF behind the queue."""

    name: str
    """The device's name in log lines."""

    def get(self, offset: int) -> int:
        """A BAR0 register."""

    def put(self, offset: int, value: int) -> None:
        """Set a BAR0 register."""

    def dma_read(self, iova: int, length: int) -> bytes:
        """Read guest memory (``OSError`` where nothing is mapped)."""

    def dma_write(self, iova: int, data: bytes) -> None:
        """Write guest memory (``OSError`` where nothing is mapped)."""

    def can_dma(self) -> bool:
        """Whether the device may do DMA now."""

    def virtchnl_request(self, opcode: int, payload: bytes) -> bool:
        """Handle a VF request (replies go to ``AdminQueue.send``); ``True`` when a VF reset
        must follow the request's completion."""

    def reset_vf(self) -> None:
        """Reset the VF (clears the admin queue registers among everything else)."""

    def admin_event(self) -> None:
        """An ARQ message was written: raise the ADMINQ cause."""


@final
class AdminQueue:
    """The admin queue of one VF (see the module docstring)."""

    def __init__(self, host: AqHost) -> None:
        self.host = host
        self.pending: deque[Message] = deque()

    # -- register writes --------------------------------------------------------------

    def write_atq_tail(self, value: int) -> None:
        """ATQT: serve the send queue up to the new tail."""
        self.host.put(r.VF_ATQT, value & r.AQ_HEAD_MASK)
        if self.host.can_dma():
            self.process_send_queue()

    def write_arq_tail(self, value: int) -> None:
        """ARQT: more buffers posted; deliver waiting messages."""
        self.host.put(r.VF_ARQT, value & r.AQ_HEAD_MASK)
        self.deliver()

    def write_atq_len(self, value: int) -> None:
        """ATQLEN."""
        self.host.put(r.VF_ATQLEN, value)

    def write_arq_len(self, value: int) -> None:
        """ARQLEN: clearing ENABLE shuts the receive queue down and drops waiting messages."""
        self.host.put(r.VF_ARQLEN, value)
        if not value & r.AQ_ENABLE:
            self.pending.clear()

    def clear(self) -> None:
        """Forget waiting messages (the registers are the device's to clear)."""
        self.pending.clear()

    # -- the send queue ---------------------------------------------------------------

    def process_send_queue(self) -> None:
        """Complete every descriptor from ATQH to ATQT."""
        host = self.host
        control = host.get(r.VF_ATQLEN)
        length = control & r.AQ_LEN_MASK
        if not control & r.AQ_ENABLE or not length:
            return
        base = host.get(r.VF_ATQBAL) | host.get(r.VF_ATQBAH) << 32
        head, tail = host.get(r.VF_ATQH) & r.AQ_HEAD_MASK, host.get(r.VF_ATQT) & r.AQ_HEAD_MASK
        if head >= length or tail >= length:
            logger.warning(
                "admin send queue head %d / tail %d outside its %d entries", head, tail, length
            )
            host.put(r.VF_ATQLEN, control | r.AQ_CRIT)
            return
        while head != tail:
            at = base + head * r.AQ_DESC_SIZE
            try:
                descriptor = r.AQ_DESC.unpack(host.dma_read(at, r.AQ_DESC_SIZE))
            except OSError as exc:
                self._critical(r.VF_ATQLEN, f"admin send descriptor {head} at {at:#x}: {exc}")
                return
            flags, opcode, datalen, _, cookie_high, _, param0, param1, high, low = descriptor
            retval, reset = self._command(flags, opcode, datalen, cookie_high, high << 32 | low)
            flags |= r.AQ_FLAG_DD | r.AQ_FLAG_CMP
            flags = flags | r.AQ_FLAG_ERR if retval else flags & ~r.AQ_FLAG_ERR
            done = r.AQ_DESC.pack(
                flags, opcode, datalen, retval, cookie_high, 0, param0, param1, high, low
            )
            try:
                host.dma_write(at, done)
            except OSError as exc:
                self._critical(r.VF_ATQLEN, f"admin send descriptor {head} write-back: {exc}")
                return
            head = (head + 1) % length
            host.put(r.VF_ATQH, head)
            if reset:
                host.reset_vf()
                return
        self.deliver()

    def _command(
        self, flags: int, opcode: int, datalen: int, cookie_high: int, buffer: int
    ) -> tuple[int, bool]:
        """Run one command: its AQ return code and whether a VF reset follows."""
        if opcode == r.AQC_QUEUE_SHUTDOWN:
            return r.AQ_RC_OK, False
        if opcode != r.AQC_SEND_MSG_TO_PF:
            if logger.isEnabledFor(logging.INFO):
                logger.info("%s: admin queue opcode %#06x refused (ENOTTY)", self.host.name, opcode)
            return r.AQ_RC_ENOTTY, False
        payload = b""
        if flags & r.AQ_FLAG_BUF and datalen:
            if datalen > r.AQ_BUF_MAX:
                logger.info(
                    "%s: admin queue buffer of %d bytes refused (EINVAL)", self.host.name, datalen
                )
                return r.AQ_RC_EINVAL, False
            try:
                payload = self.host.dma_read(buffer, datalen)
            except OSError as exc:
                logger.info(
                    "%s: admin queue buffer at %#x unreadable (%s): EINVAL",
                    self.host.name,
                    buffer,
                    exc,
                )
                return r.AQ_RC_EINVAL, False
        return r.AQ_RC_OK, self.host.virtchnl_request(cookie_high, payload)

    # -- the receive queue ------------------------------------------------------------

    def send(self, opcode: int, status: int, payload: bytes = b"") -> None:
        """Queue a message for the VF and deliver what the posted buffers take."""
        if len(self.pending) >= PENDING_MAX:
            self.host.put(r.VF_ARQLEN, self.host.get(r.VF_ARQLEN) | r.AQ_OVFL)
            logger.warning(
                "%s: admin receive queue overflow: %d messages wait for buffers, virtchnl "
                "opcode %d dropped (ARQLEN.OVFL set)",
                self.host.name,
                len(self.pending),
                opcode,
            )
            return
        self.pending.append(Message(opcode, status, payload))
        self.deliver()

    def deliver(self) -> None:
        """Write waiting messages into the posted ARQ buffers."""
        host = self.host
        if not self.pending or not host.can_dma():
            return
        control = host.get(r.VF_ARQLEN)
        length = control & r.AQ_LEN_MASK
        if not control & r.AQ_ENABLE or not length:
            return
        base = host.get(r.VF_ARQBAL) | host.get(r.VF_ARQBAH) << 32
        head, tail = host.get(r.VF_ARQH) & r.AQ_HEAD_MASK, host.get(r.VF_ARQT) & r.AQ_HEAD_MASK
        if head >= length or tail >= length:
            return
        written = False
        while self.pending and head != tail:
            at = base + head * r.AQ_DESC_SIZE
            message = self.pending[0]
            try:
                posted = r.AQ_DESC.unpack(host.dma_read(at, r.AQ_DESC_SIZE))
                flags, _, size, _, _, _, _, _, high, low = posted
                flags = (flags & (r.AQ_FLAG_BUF | r.AQ_FLAG_LB)) | r.AQ_FLAG_DD | r.AQ_FLAG_CMP
                retval = r.AQ_RC_OK
                payload = message.payload
                if len(payload) > size or (payload and not flags & r.AQ_FLAG_BUF):
                    logger.warning(
                        "%s: virtchnl opcode %d reply of %d bytes does not fit the %d-byte ARQ "
                        "buffer: sent empty with ERR",
                        host.name,
                        message.opcode,
                        len(payload),
                        size,
                    )
                    flags, retval, payload = flags | r.AQ_FLAG_ERR, r.AQ_RC_EINVAL, b""
                if payload:
                    host.dma_write(high << 32 | low, payload)  # the data first
                host.dma_write(
                    at,
                    r.AQ_DESC.pack(
                        flags,
                        r.AQC_SEND_MSG_TO_VF,
                        len(payload),
                        retval,
                        message.opcode,
                        message.status & 0xFFFF_FFFF,
                        0,
                        0,
                        high,
                        low,
                    ),
                )
            except OSError as exc:
                self._critical(r.VF_ARQLEN, f"admin receive descriptor {head} at {at:#x}: {exc}")
                break
            self.pending.popleft()
            head = (head + 1) % length
            host.put(r.VF_ARQH, head)
            written = True
        if written:
            host.admin_event()

    def _critical(self, register: int, what: str) -> None:
        logger.warning(
            "%s: admin queue DMA fault (%s): %s CRIT set",
            self.host.name,
            what,
            "ATQLEN" if register == r.VF_ATQLEN else "ARQLEN",
        )
        self.host.put(register, self.host.get(register) | r.AQ_CRIT)
