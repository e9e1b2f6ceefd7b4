"""Knocks: what a knock list may hold, an ICMP echo request the kernel would accept, and real
knocks on loopback (a SYN to a listening port is answered, so the kernel counts the connection)."""
from __future__ import annotations

import socket
import struct

import pytest

from emulator.knock import echo_request, knock, parse_knocks


def _folded_sum(data: bytes) -> int:
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


@pytest.mark.parametrize("ident,sequence", [(0, 0), (1234, 5), (0xFFFF, 0xFFFF), (0x8001, 7)])
def test_echo_requests_carry_a_valid_internet_checksum(ident, sequence):
    packet = echo_request(ident, sequence)
    assert packet[:2] == b"\x08\x00" and struct.unpack("!HH", packet[4:]) == (ident, sequence)
    assert _folded_sum(packet) == 0xFFFF  # what a receiver checks


def test_knock_lists():
    assert parse_knocks([["198.18.1.10", "tcp", 80], ["198.18.1.10", "icmp", None]]) == [
        ("198.18.1.10", "tcp", 80), ("198.18.1.10", "icmp", None)]
    for bad in (["a", "icmp", 0], ["a", "tcp", None], ["a", "sctp", 1], ["a", "udp", 70000], "x"):
        with pytest.raises(ValueError):
            parse_knocks([bad])


def test_tcp_and_udp_knocks_on_loopback():
    with socket.socket() as listening, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        udp.bind(("127.0.0.1", 0))
        udp.settimeout(5)
        sent, errors = knock([("127.0.0.1", "tcp", listening.getsockname()[1]),
                              ("127.0.0.1", "udp", udp.getsockname()[1])])
        assert (sent, errors) == (2, [])
        assert udp.recv(16) == b"\0"
