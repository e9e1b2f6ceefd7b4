"""Byte-level reading shared by the hand-written binary codecs (``ajp``, ``jmx``, ``jgroups``).
No protocol logic here: what a field means, and what running out of bytes means, stay in the
protocol's own module."""

from __future__ import annotations

import struct


class ByteReader:
    """A cursor over one message's bytes. Running out raises what ``short`` returns: a
    malformed message to one protocol, a message still arriving on a TCP stream to another."""

    def __init__(self, data: bytes) -> None:
        self.data = bytes(data)
        self.pos = 0

    def short(self, count: int) -> Exception:
        """The exception for ``count`` bytes wanted at ``self.pos`` that the data does not hold."""
        raise NotImplementedError

    def take(self, count: int) -> bytes:
        if count < 0 or self.pos + count > len(self.data):
            raise self.short(count)
        chunk = self.data[self.pos:self.pos + count]
        self.pos += count
        return chunk

    def unpack(self, fmt: str):
        """The next value(s) of a ``struct`` format (its first character names the byte order);
        one value on its own, several as a tuple."""
        values = struct.unpack(fmt, self.take(struct.calcsize(fmt)))
        return values[0] if len(values) == 1 else values


__all__ = ['ByteReader']
