"""VERSION negotiation over a real socket: reply shape, size, subset rule, refusals."""

from __future__ import annotations

import errno
import json
import os
import time
from collections.abc import Callable

import pytest
from server_testlib import open_fds

from vfio_mediate import AccessError, MediatedDevice
from vfio_mediate.server import (
    HEADER,
    Command,
    DeviceEndpoint,
    HeaderFlag,
    ProtocolError,
    VfioUserClient,
    pack_message,
)
from vfio_mediate.uapi import PAGE_SIZE

# The capabilities QEMU's vfio-user-pci sends (values of QEMU 10.1 to 11.1).
QEMU_CAPABILITIES = {
    "max_msg_fds": 16,
    "max_data_xfer_size": 1048576,
    "pgsizes": 4096,
    "max_dma_maps": 65535,
    "write_multiple": True,
    "migration": {"pgsize": 4096, "max_bitmap_size": 268435456},
}


def version_payload(
    capabilities: dict[str, object] | None,
    major: int = 0,
    separators: tuple[str, str] = (", ", ": "),
) -> bytes:
    document = {"capabilities": capabilities}
    text = b"" if capabilities is None else json.dumps(document, separators=separators).encode()
    return major.to_bytes(2, "little") + bytes(2) + (text + b"\0" if text else b"")


def raw_version(
    endpoint: DeviceEndpoint, payload: bytes
) -> tuple[VfioUserClient, int, int, int, bytes]:
    client = VfioUserClient.connect(endpoint.path, negotiate=False)
    client.send_raw(pack_message(7, Command.VERSION, payload))
    message = client.receive()
    return client, message.flags, message.error, message.msg_id, message.payload


def parse_reply(payload: bytes) -> tuple[int, int, dict[str, object] | None]:
    major = int.from_bytes(payload[:2], "little")
    minor = int.from_bytes(payload[2:4], "little")
    if len(payload) == 4:
        return major, minor, None
    assert payload[-1] == 0, "the reply JSON is NUL-terminated"
    return major, minor, json.loads(payload[4:-1])


def test_qemu_request_gets_a_version_zero_reply_no_longer_than_it(
    test_endpoint: DeviceEndpoint,
) -> None:
    request = version_payload(QEMU_CAPABILITIES)
    client, flags, _, msg_id, payload = raw_version(test_endpoint, request)
    with client:
        assert flags == HeaderFlag.REPLY and msg_id == 7
        assert len(payload) <= len(request)
        major, minor, document = parse_reply(payload)
        assert (major, minor) == (0, 0)
        assert document is not None
        caps = document["capabilities"]
        assert isinstance(caps, dict)
        assert caps["max_msg_fds"] == 16
        assert caps["max_data_xfer_size"] == 1 << 20
        assert caps["write_multiple"] is True
        # The test device migrates: the dirty page size and bitmap limit come back.
        assert caps["migration"] == {"pgsize": 4096, "max_bitmap_size": 1 << 20}
        assert set(caps) <= set(QEMU_CAPABILITIES)


def test_reply_names_only_what_the_client_proposed(test_endpoint: DeviceEndpoint) -> None:
    request = version_payload({"max_msg_fds": 4, "max_data_xfer_size": 65536})
    client, _, _, _, payload = raw_version(test_endpoint, request)
    with client:
        _, _, document = parse_reply(payload)
        assert document == {"capabilities": {"max_msg_fds": 16, "max_data_xfer_size": 1 << 20}}


def test_short_request_drops_optional_keys_to_fit(test_endpoint: DeviceEndpoint) -> None:
    # Our values are longer than the client's: the full answer would not fit.
    proposal = {"max_msg_fds": 1, "max_data_xfer_size": 1, "write_multiple": False}
    request = version_payload(proposal, separators=(",", ":"))
    client, _, _, _, payload = raw_version(test_endpoint, request)
    with client:
        assert len(payload) <= len(request)
        _, _, document = parse_reply(payload)
        assert document == {"capabilities": {"max_msg_fds": 16, "max_data_xfer_size": 1 << 20}}


def test_request_without_json_gets_a_bare_version(test_endpoint: DeviceEndpoint) -> None:
    client, flags, _, _, payload = raw_version(test_endpoint, version_payload(None))
    with client:
        assert flags == HeaderFlag.REPLY
        assert payload == bytes(4)
        assert client.read(7, 0, 2) == b"\xf4\x1a", "the session serves after a bare VERSION"


def test_migration_capability_only_for_a_device_that_migrates(
    i40e: MediatedDevice, serve: Callable[[MediatedDevice], DeviceEndpoint]
) -> None:
    client, _, _, _, payload = raw_version(serve(i40e), version_payload(QEMU_CAPABILITIES))
    with client:
        _, _, document = parse_reply(payload)
        assert document is not None
        caps = document["capabilities"]
        assert isinstance(caps, dict)
        assert "migration" not in caps


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (version_payload(QEMU_CAPABILITIES, major=1), errno.ENOTSUP),
        (bytes(4) + b'{"capabilities": [1]}\0', errno.EINVAL),
        (bytes(4) + b'{"capabilities": {"max_msg_fds": "many"}}\0', errno.EINVAL),
        (bytes(4) + b'{"capabilities": {}}', errno.EINVAL),  # no NUL
        (bytes(4) + b"\xff\xfe\0", errno.EINVAL),
        (b"\0", errno.EINVAL),
    ],
    ids=["major-1", "caps-not-object", "bad-number", "no-nul", "not-utf8", "short"],
)
def test_bad_version_is_refused_and_the_connection_closed(
    test_endpoint: DeviceEndpoint, payload: bytes, code: int
) -> None:
    client, flags, error, _, reply = raw_version(test_endpoint, payload)
    with client:
        assert flags == HeaderFlag.REPLY | HeaderFlag.ERROR
        assert error == code and reply == b""
        with pytest.raises(ProtocolError):
            client.receive()
    assert test_endpoint.wait_idle(2)


def test_command_before_version_is_refused_and_closes(test_endpoint: DeviceEndpoint) -> None:
    with VfioUserClient.connect(test_endpoint.path, negotiate=False) as client:
        with pytest.raises(AccessError) as refused:
            client.device_info()
        assert refused.value.errno == errno.EINVAL
        with pytest.raises(ProtocolError):
            client.receive()


def test_second_version_is_refused_but_the_session_goes_on(
    test_endpoint: DeviceEndpoint, connect: Callable[..., VfioUserClient]
) -> None:
    client = connect(test_endpoint)
    with pytest.raises(AccessError) as refused:
        client.negotiate()
    assert refused.value.errno == errno.EINVAL
    assert client.device_info().num_regions == 9


def test_header_layout_is_sixteen_bytes() -> None:
    assert HEADER.size == 16
    message = pack_message(0x1234, Command.REGION_READ, b"x" * 16, HeaderFlag.NO_REPLY)
    assert HEADER.unpack_from(message) == (0x1234, 9, 32, 0x10, 0)


def test_version_with_an_fd_is_refused_the_fd_closed_and_a_plain_one_goes_on(
    test_endpoint: DeviceEndpoint,
) -> None:
    with VfioUserClient.connect(test_endpoint.path, negotiate=False) as client:
        stray = os.eventfd(0, os.EFD_CLOEXEC)
        try:
            deadline = time.monotonic() + 2
            while test_endpoint.session is None and time.monotonic() < deadline:
                time.sleep(0.005)  # the server accepts (its socket fd opens) after connect
            before = open_fds()
            payload = version_payload(QEMU_CAPABILITIES)
            client.send_raw(pack_message(7, Command.VERSION, payload), (stray,))
            reply = client.receive()
            assert reply.is_error and reply.error == errno.EINVAL
            assert open_fds() == before, "the server closed its copy"
        finally:
            os.close(stray)
        client.negotiate()
        assert client.server_capabilities.pgsizes == PAGE_SIZE
        assert client.device_info().num_regions == 9
