"""The emulated switch: forwarding by destination MAC and filter, flooding, promiscuous and
all-multicast modes, default MACs, and delivery from many threads without loss or deadlock."""

from __future__ import annotations

import sys
import threading
import time

import pytest
from i40e_mediator.switch import Switch, SwitchPort

BROADCAST = b"\xff" * 6
GROUP = bytes.fromhex("01005e000001")
OTHER_GROUP = bytes.fromhex("333300000001")


def frame(destination: bytes, source: bytes, body: bytes = b"payload") -> bytes:
    return destination + source + b"\x08\x00" + body


class Inbox:
    """A port's received frames."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []

    def __call__(self, data: bytes) -> None:
        self.frames.append(data)


def ports(switch: Switch, count: int) -> tuple[list[SwitchPort], list[Inbox]]:
    inboxes = [Inbox() for _ in range(count)]
    return [switch.attach(inbox) for inbox in inboxes], inboxes


def test_default_macs_are_distinct_deterministic_locally_administered_unicast() -> None:
    switch = Switch()
    macs = [switch.default_mac(n) for n in range(1000)]
    assert len(set(macs)) == 1000
    assert macs == [Switch().default_mac(n) for n in range(1000)]
    for mac in macs:
        assert len(mac) == 6
        assert mac[0] & 0x02 and not mac[0] & 0x01
    attached, _ = ports(switch, 3)
    assert [p.number for p in attached] == [0, 1, 2]
    assert [p.mac for p in attached] == macs[:3]
    with pytest.raises(ValueError, match="port number"):
        switch.default_mac(-1)


def test_detached_number_is_reused_and_its_port_gets_nothing() -> None:
    switch = Switch()
    (a, b, c), (_, inbox_b, _) = ports(switch, 3)
    b.detach()
    b.detach()  # idempotent
    a.transmit(frame(BROADCAST, a.mac))
    assert inbox_b.frames == []
    assert switch.ports == (a, c)
    again = switch.attach(Inbox())
    assert (again.number, again.mac) == (1, switch.default_mac(1))
    b.transmit(frame(a.mac, b.mac))  # a detached port sends nothing either
    assert switch.ports == (a, again, c)


def test_unicast_goes_only_to_the_port_that_filters_on_it() -> None:
    switch = Switch()
    (a, b, c), (inbox_a, inbox_b, inbox_c) = ports(switch, 3)
    sent = frame(b.mac, a.mac)
    a.transmit(sent)
    assert inbox_b.frames == [sent]
    assert inbox_a.frames == inbox_c.frames == []
    # a MAC nobody filters on goes nowhere (no uplink to flood to)
    a.transmit(frame(bytes.fromhex("02aabbccddee"), a.mac))
    assert inbox_b.frames == [sent] and inbox_c.frames == []
    # replacing the filter: c takes a new address, b gives up its default one
    new = bytes.fromhex("020000abcdef")
    c.set_filters([c.mac, new], [], promiscuous=False, all_multicast=False)
    b.set_filters([], [], promiscuous=False, all_multicast=False)
    a.transmit(frame(new, a.mac))
    a.transmit(frame(b.mac, a.mac))
    assert inbox_c.frames == [frame(new, a.mac)]
    assert inbox_b.frames == [sent]


def test_never_delivered_back_to_the_sender() -> None:
    switch = Switch()
    (a, b), (inbox_a, inbox_b) = ports(switch, 2)
    a.set_filters([a.mac], [GROUP], promiscuous=True, all_multicast=True)
    for destination in (a.mac, BROADCAST, GROUP, b.mac):
        a.transmit(frame(destination, a.mac))
    assert inbox_a.frames == []
    assert [f[:6] for f in inbox_b.frames] == [BROADCAST, b.mac]


def test_broadcast_floods_every_other_port_whatever_the_filters() -> None:
    switch = Switch()
    (_, b, c), (inbox_a, inbox_b, inbox_c) = ports(switch, 3)
    c.set_filters([], [], promiscuous=False, all_multicast=False)
    sent = frame(BROADCAST, b.mac)
    b.transmit(sent)
    assert inbox_a.frames == inbox_c.frames == [sent]
    assert inbox_b.frames == []


def test_multicast_honours_filters_and_all_multicast() -> None:
    switch = Switch()
    (a, b, c, _), (_, inbox_b, inbox_c, inbox_d) = ports(switch, 4)
    b.set_filters([b.mac], [GROUP], promiscuous=False, all_multicast=False)
    c.set_filters([c.mac], [], promiscuous=False, all_multicast=True)
    a.transmit(frame(GROUP, a.mac))
    a.transmit(frame(OTHER_GROUP, a.mac))
    assert [f[:6] for f in inbox_b.frames] == [GROUP]
    assert [f[:6] for f in inbox_c.frames] == [GROUP, OTHER_GROUP]
    assert inbox_d.frames == []


def test_promiscuous_port_takes_every_frame() -> None:
    switch = Switch()
    (a, b, c), (_, inbox_b, inbox_c) = ports(switch, 3)
    c.set_filters([c.mac], [], promiscuous=True, all_multicast=False)
    unknown = bytes.fromhex("02aabbccddee")
    for destination in (b.mac, unknown, GROUP, BROADCAST, c.mac):
        a.transmit(frame(destination, a.mac))
    assert [f[:6] for f in inbox_c.frames] == [b.mac, unknown, GROUP, BROADCAST, c.mac]
    assert [f[:6] for f in inbox_b.frames] == [b.mac, BROADCAST]
    # promiscuous off again: back to the filter
    c.set_filters([c.mac], [], promiscuous=False, all_multicast=False)
    a.transmit(frame(unknown, a.mac))
    assert len(inbox_c.frames) == 5


def test_bad_filters_are_refused_and_leave_the_filter_in_force() -> None:
    switch = Switch()
    (a, b), (_, inbox_b) = ports(switch, 2)
    before = b.filters
    with pytest.raises(ValueError, match="not a unicast address"):
        b.set_filters([GROUP], [], promiscuous=False, all_multicast=False)
    with pytest.raises(ValueError, match="not a multicast address"):
        b.set_filters([], [b.mac], promiscuous=False, all_multicast=False)
    with pytest.raises(ValueError, match="6 bytes, not 5"):
        b.set_filters([b.mac[:5]], [], promiscuous=False, all_multicast=False)
    assert b.filters == before == (frozenset({b.mac}), frozenset(), False, False)
    a.transmit(frame(b.mac, a.mac))
    a.transmit(b.mac + a.mac)  # shorter than an Ethernet header: dropped
    assert inbox_b.frames == [frame(b.mac, a.mac)]


def test_a_failing_port_costs_the_others_nothing(caplog: pytest.LogCaptureFixture) -> None:
    switch = Switch()

    def broken(data: bytes) -> None:
        raise OSError("RX ring unmapped")

    a = switch.attach(Inbox())
    bad = switch.attach(broken)
    inbox = Inbox()
    switch.attach(inbox)
    a.transmit(frame(BROADCAST, a.mac))
    assert len(inbox.frames) == 1
    assert bad.delivery_errors == 1
    assert "switch port 1 could not take a frame: RX ring unmapped" in caplog.text


def test_devices_locked_while_transmitting_to_each_other_do_not_deadlock() -> None:
    """Two devices that each hold their own lock while transmitting and take it to receive
    (what a VF model does) exchange frames from two threads: all arrive, in order per sender,
    without deadlock."""
    switch = Switch()
    count = 5000
    start = threading.Barrier(2)

    class Device:
        def __init__(self) -> None:
            self.lock = threading.RLock()
            self.received: list[bytes] = []
            self.port = switch.attach(self.receive)

        def receive(self, data: bytes) -> None:
            with self.lock:
                self.received.append(data)

        def send_many(self, destination: bytes) -> None:
            start.wait()
            for n in range(count):
                with self.lock:
                    self.port.transmit(frame(destination, self.port.mac, n.to_bytes(4, "big")))

    one, two = Device(), Device()
    threads = [
        threading.Thread(target=one.send_many, args=(two.port.mac,), daemon=True),
        threading.Thread(target=two.send_many, args=(one.port.mac,), daemon=True),
    ]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often, inside the device locks too
    try:
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 30
        for thread in threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
    finally:
        sys.setswitchinterval(interval)
    assert not any(thread.is_alive() for thread in threads), "deadlocked"
    for device in (one, two):
        numbers = [int.from_bytes(f[14:], "big") for f in device.received]
        assert numbers == list(range(count))
