"""Exposure knocks: the first packet of a connection to many (address, transport, port), nothing more.

An exposure verdict rests on the firewall's own record (emulator.witness), not on an answer,
so a knock only has to put one SYN or one datagram on the wire: a non-blocking connect() sends
the SYN at once, and the socket is closed right after (the kernel answers any SYN-ACK with a
RST). Written with plain sockets because it is no exchange at all: ~20 us a knock, where a
Twisted connection costs ~100 us, and an audit knocks tens of thousands of times.
"""
from __future__ import annotations

import errno
import random
import socket
import struct
from collections.abc import Iterable

Knock = tuple[str, str, int | None]  # (IPv4 address, 'tcp' | 'udp', port) or (address, 'icmp', None)
# Knocks carry DSCP CS1 so the firewall's record counts them instead of listing each (emulator.witness).
KNOCK_DSCP = "cs1"
KNOCK_TOS = 8 << 2
_PENDING = (0, errno.EINPROGRESS, errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH)


def parse_knocks(items) -> list[Knock]:
    knocks = []
    for item in items:
        if isinstance(item, list) and len(item) == 3 and item[1] == "icmp" and item[2] is None:
            knocks.append((str(item[0]), "icmp", None))
            continue
        if (not isinstance(item, list) or len(item) != 3 or item[1] not in ("tcp", "udp")
                or not isinstance(item[2], int) or not 0 < item[2] < 65536):
            raise ValueError(f"a knock is [address, 'tcp'|'udp', port] or [address, 'icmp', null], got {item!r}")
        knocks.append((str(item[0]), item[1], item[2]))
    return knocks


def echo_request(ident: int, sequence: int) -> bytes:
    """An ICMP echo request; written by hand, as nothing in the standard library builds one."""
    header = struct.pack("!BBHHH", 8, 0, 0, ident & 0xFFFF, sequence & 0xFFFF)
    total = sum(struct.unpack("!4H", header))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return struct.pack("!BBHHH", 8, 0, ~total & 0xFFFF, ident & 0xFFFF, sequence & 0xFFFF)


def knock(targets: Iterable[Knock]) -> tuple[int, list[str]]:
    """Send one first packet to each target; (number sent, errors) -- errors are lab faults."""
    sent, errors = 0, []
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
    udp.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, KNOCK_TOS)
    icmp = None  # opened on first use: raw sockets need CAP_NET_RAW, which exposure knocks never need
    # a fresh echo identifier: a ping conntrack still holds from earlier would make this one "established"
    ident = random.getrandbits(16)
    try:
        for address, transport, port in targets:
            try:
                if transport == "icmp":
                    # unmarked: the witness lists pings one by one (they are few), it never counts them
                    icmp = icmp or socket.socket(socket.AF_INET, socket.SOCK_RAW | socket.SOCK_NONBLOCK,
                                                 socket.IPPROTO_ICMP)
                    icmp.sendto(echo_request(ident, sent), (address, 0))
                elif transport == "udp":
                    udp.sendto(b"\0", (address, port))
                else:
                    with socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK) as tcp:
                        tcp.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, KNOCK_TOS)
                        code = tcp.connect_ex((address, port))
                        if code not in _PENDING:
                            raise OSError(code, errno.errorcode.get(code, str(code)))
                sent += 1
            except OSError as exc:
                errors.append(f"{address} {transport}/{port}: {exc.strerror or exc}")
    finally:
        udp.close()
        if icmp is not None:
            icmp.close()
    return sent, errors
