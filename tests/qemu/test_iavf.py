"""Two Linux guests, each with its own ``iavf`` driver bound to an X710 VF of ONE
``vfio-mediate serve --device i40e-vf --device i40e-vf``, talk through the emulated switch.

Both guests boot once for the module; the checks run in order in those boots: iavf binds and
reports link up, ping both ways, a multicast ping, 1 MiB over TCP/IPv4 and TCP/IPv6 (TX
checksum offload and TSO) checked by hash on both sides, UDP datagrams with valid checksums
(the device inserts them), promiscuous mode on and off, an MTU change (a VF reset in iavf)
then ping again, a driver that never complained, and a server log without a traceback or
warning.

Seen from these guests (Debian 6.12): iavf sends CONFIG_VSI_QUEUES, CONFIG_IRQ_MAP and
ADD_ETH_ADDR/DEL_ETH_ADDR one list element longer than their count says (the size of the old
one-element-array structs plus count elements: 136 bytes for one queue pair, 38 for two
vectors, 20 for one address); a PF that wants exactly header + count elements refuses them
all with ERR_PARAM and the link never comes up.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import pytest

from .iavf_guests import Guest, Server, guest_initramfs

ADDRESSES = ("10.15.0.1", "10.15.0.2")
ADDRESSES6 = ("fd15::1", "fd15::2")
NOWHERE = ("10.15.0.99", "02:aa:bb:cc:dd:ee")  # an address whose MAC no VF has
STATS_PERIOD = 2.5  # iavf asks for the device's counters every 2 s
PORT = 5015
LINK_TIMEOUT = 90.0  # iavf's init is a watchdog state machine; slow under TCG


@dataclass
class Pair:
    """The server, the two guests, and how far the checks got (later checks need the link
    the first one brings up: they fail at once without it rather than time out again)."""

    server: Server
    guests: tuple[Guest, Guest]
    interfaces: dict[str, str] = field(default_factory=dict)  # guest name -> iavf interface
    linked: bool = False

    def up(self) -> None:
        """Fail unless the first check brought the link up in both guests."""
        if not self.linked:
            pytest.fail("the VFs never linked up (see test_iavf_binds_and_reports_link_up_in_both)")


@pytest.fixture(scope="module")
def pair(
    qemu_root: Any, provisioner: ModuleType, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pair]:
    """One server with two VFs and a guest on each, booted with iavf loaded."""
    initramfs = guest_initramfs(provisioner, qemu_root)
    shared = provisioner.shared_dir(qemu_root)
    sockets = [shared / f"iavf-{n}-{time.monotonic_ns()}.sock" for n in range(2)]
    server = Server(sockets, tmp_path_factory.mktemp("iavf") / "server.log")
    guests: list[Guest] = []
    try:
        for n, path in enumerate(sockets):
            guests.append(
                Guest(
                    provisioner,
                    qemu_root,
                    f"vm{n}",
                    initramfs,
                    f"{provisioner.SHARED_DIR_IN_ROOT}/{path.name}",
                    context=server.log_tail,
                )
            )
        for guest in guests:
            guest.wait_ready()
        yield Pair(server, (guests[0], guests[1]))
    finally:
        for guest in guests:
            guest.stop()
        server.stop()
        for path in sockets:
            path.unlink(missing_ok=True)


def find_interface(guest: Guest) -> str:
    """The guest's iavf interface (the one whose driver is iavf), once iavf registered it."""
    return guest.wait_until(
        "for n in /sys/class/net/*; do "
        '[ "$(basename $(readlink $n/device/driver) 2>/dev/null)" = iavf ] && basename $n; '
        "done | grep .",
        timeout=LINK_TIMEOUT,
    ).strip()


def test_iavf_binds_and_reports_link_up_in_both(pair: Pair) -> None:
    for guest, address in zip(pair.guests, ADDRESSES, strict=True):
        name = pair.interfaces[guest.name] = find_interface(guest)
        guest.run(f"ip addr add {address}/24 dev {name} && ip link set {name} up")
    for guest in pair.guests:
        name = pair.interfaces[guest.name]
        guest.wait_until(f"grep -qx 1 /sys/class/net/{name}/carrier", timeout=LINK_TIMEOUT)
        log = guest.run("dmesg")
        assert "NIC Link is Up" in log, log
        assert "using random" not in log, log  # iavf took the VF's default MAC
    # each VF's MAC is its switch port's default, numbered in --device order
    macs = [
        guest.run(f"cat /sys/class/net/{pair.interfaces[guest.name]}/address").strip()
        for guest in pair.guests
    ]
    assert macs == ["02:76:66:00:00:00", "02:76:66:00:00:01"], macs
    pair.linked = True


def ping(source: Guest, destination: str) -> None:
    source.wait_until(f"ping -c 1 -W 2 {destination}", timeout=30)
    output = source.run(f"ping -c 5 -i 0.2 -W 2 {destination}")
    assert " 0% packet loss" in output, output


def test_ping_both_ways(pair: Pair) -> None:
    pair.up()
    first, second = pair.guests
    ping(first, ADDRESSES[1])
    ping(second, ADDRESSES[0])


def test_multicast_reaches_the_other_guest(pair: Pair) -> None:
    """A ping to all-hosts (224.0.0.1) reaches the other guest through the multicast filter
    its iavf set (01:00:5e:00:00:01). (Broadcast flooding carried every ARP request so far.)"""
    pair.up()
    sender, receiver = pair.guests
    name = pair.interfaces[sender.name]
    receiver.run("echo 0 > /proc/sys/net/ipv4/icmp_echo_ignore_broadcasts")
    sender.run(f"ip route add 224.0.0.0/4 dev {name}")
    output = sender.run("ping -c 3 -W 2 224.0.0.1", check=False)
    # the sender may answer its own multicast ping: only the other guest's reply counts
    assert f"from {ADDRESSES[1]}" in output, output


def sha256(guest: Guest, path: str) -> str:
    return guest.run(f"sha256sum {path}").split()[0]


def transfer(pair: Pair, destination: str) -> float:
    """Send 1 MiB of random bytes from the first guest to the second over TCP, check that it
    arrived whole (sha256 on both sides); the seconds it took."""
    sender, receiver = pair.guests
    sender.run("dd if=/dev/urandom of=/tmp/blob bs=1024 count=1024 2>/dev/null")
    sent = sha256(sender, "/tmp/blob")
    # busybox nc stops at the end of its stdin: give the listener one that stays open (the
    # subshell's stderr is quiet: its "Terminated" for the sleep would land in a later output)
    receiver.run(f"rm -f /tmp/got; (sleep 300 | nc -l -p {PORT} > /tmp/got) 2>/dev/null &")
    receiver.wait_until(f"netstat -ltn | grep -q ':{PORT} '", timeout=10)
    started = time.monotonic()
    sender.run(f"nc -w 5 {destination} {PORT} < /tmp/blob", timeout=120)
    receiver.wait_until("! pidof nc", timeout=60)  # it ends when the sender's side closes
    elapsed = time.monotonic() - started
    receiver.run("kill $(pidof sleep)")
    assert receiver.run("wc -c < /tmp/got").strip() == str(1 << 20)
    assert sha256(receiver, "/tmp/got") == sent
    return elapsed


def test_tcp_transfer_of_1_mib_arrives_intact(pair: Pair) -> None:
    pair.up()
    elapsed = transfer(pair, ADDRESSES[1])
    print(f"1 MiB over TCP/IPv4 between the guests in {elapsed:.2f} s")


def test_tcp_transfer_over_ipv6_arrives_intact(pair: Pair) -> None:
    """The same over IPv6: TCP checksums over the IPv6 pseudo-header, TSO of IPv6 frames."""
    pair.up()
    for guest, address in zip(pair.guests, ADDRESSES6, strict=True):
        guest.run(f"ip addr add {address}/64 dev {pair.interfaces[guest.name]}")
    pair.guests[0].wait_until(f"ping -c 1 -W 2 {ADDRESSES6[1]}", timeout=30)  # after DAD
    elapsed = transfer(pair, ADDRESSES6[1])
    print(f"1 MiB over TCP/IPv6 between the guests in {elapsed:.2f} s")


def udp_counters(guest: Guest) -> dict[str, int]:
    """The guest's UDP MIB counters (/proc/net/snmp)."""
    lines = [line.split()[1:] for line in guest.run("grep '^Udp:' /proc/net/snmp").splitlines()]
    return dict(zip(lines[0], map(int, lines[1]), strict=True))


def test_udp_datagrams_arrive_with_valid_checksums(pair: Pair) -> None:
    """DNS queries (UDP, checksum left to the device) to a guest without a DNS server: each
    arrives with a valid checksum (counted as NoPorts, answered port-unreachable), none fails
    the receiver's checksum check."""
    pair.up()
    sender, receiver = pair.guests
    before = udp_counters(receiver)
    sender.run(f"timeout 10 nslookup probe.test {ADDRESSES[1]}", timeout=30, check=False)
    after = udp_counters(receiver)
    assert after["InCsumErrors"] == before["InCsumErrors"], (before, after)
    assert after["NoPorts"] > before["NoPorts"], (before, after)


def received(guest: Guest, name: str) -> int:
    """Frames the guest's VF received (iavf shows the device's GET_STATS counters)."""
    return int(guest.run(f"cat /sys/class/net/{name}/statistics/rx_packets"))


def test_promiscuous_mode_takes_frames_for_other_macs(pair: Pair) -> None:
    """Frames to a MAC no VF has reach the second guest only while it is promiscuous
    (iavf's CONFIG_PROMISCUOUS_MODE, the switch's promiscuous ports)."""
    pair.up()
    sender, receiver = pair.guests
    name = pair.interfaces[receiver.name]
    count = 50
    sender.run(f"arp -s {NOWHERE[0]} {NOWHERE[1]}")
    for promiscuous in (True, False):
        receiver.run(f"ip link set {name} promisc {'on' if promiscuous else 'off'}")
        time.sleep(STATS_PERIOD)  # the mode reaches the device, the counters settle
        before = received(receiver, name)
        sender.run(f"ping -c {count} -i 0.01 -W 1 {NOWHERE[0]}", check=False)
        if promiscuous:
            receiver.wait_until(
                f"[ $(cat /sys/class/net/{name}/statistics/rx_packets) -ge {before + count} ]",
                timeout=5 * STATS_PERIOD,
            )
        else:
            time.sleep(2 * STATS_PERIOD)
            # a few frames of background traffic (neighbour discovery) may arrive meanwhile
            assert received(receiver, name) - before < count // 2


def test_mtu_change_resets_the_vf_and_traffic_resumes(pair: Pair) -> None:
    pair.up()
    first, second = pair.guests
    for guest in pair.guests:
        name = pair.interfaces[guest.name]
        lines = int(guest.run("dmesg | wc -l"))
        guest.run(f"ip link set {name} mtu 1400")
        # iavf resets the VF for a new MTU and reports the link up again once it is back
        guest.wait_until(
            f"dmesg | tail -n +{lines + 1} | grep -q 'NIC Link is Up'", timeout=LINK_TIMEOUT
        )
        guest.wait_until(f"grep -qx 1 /sys/class/net/{name}/carrier", timeout=LINK_TIMEOUT)
        assert guest.run(f"cat /sys/class/net/{name}/mtu").strip() == "1400"
    ping(first, ADDRESSES[1])
    ping(second, ADDRESSES[0])
    # a full-size frame of the new MTU crosses too (1400 - 28 bytes of IP and ICMP headers)
    output = first.run(f"ping -c 3 -s 1372 -W 2 {ADDRESSES[1]}")
    assert " 0% packet loss" in output, output


# What iavf prints when the device answers wrong, late or not at all.
DRIVER_COMPLAINTS = (
    "PF returned error",  # a request refused
    "Expected response",  # a reply to another request
    "Admin queue timeout",
    "Admin queue command never completed",
    "Never saw reset",
    "Reset never finished",
    "Hardware reset detected",  # ARQLEN's enable bit dropped without a reset asked for
    "timed out",  # the netdev TX watchdog
)


def test_iavf_never_complained(pair: Pair) -> None:
    for guest in pair.guests:
        log = guest.run("dmesg")
        complaints = [
            line for line in log.splitlines() if any(c in line for c in DRIVER_COMPLAINTS)
        ]
        assert not complaints, f"{guest.name}:\n" + "\n".join(complaints)


def test_server_log_has_no_traceback(pair: Pair) -> None:
    text = pair.server.log_text()
    assert "Traceback" not in text, text
    # nor a warning: a TX packet dropped (an offload the device refused), a queue stopped,
    # an admin queue error
    assert not [line for line in text.splitlines() if not line.startswith("INFO")], text
    assert pair.server.process.poll() is None, text
