"""Protobuf wire encoding by hand, for one case: a message holding a large sub-message (a batch
of 1,000 observations, 1.5 MB) that is already at hand.

Setting the field (``Request(batch=batch)``) copies the whole batch into the new message before
it is serialised again; composing the bytes instead serialises the batch once. The result is
the very bytes ``SerializeToString`` gives (fields in number order), which the tests check.
"""

from __future__ import annotations

from google.protobuf.message import Message

_LENGTH_DELIMITED = 2


def varint(value: int) -> bytes:
    """``value`` (>= 0) as a base-128 varint."""
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (a sub-message, bytes or a string) numbered ``number``."""
    return b"".join((varint(number << 3 | _LENGTH_DELIMITED), varint(len(payload)), payload))


def with_message(before: Message, number: int, sub: Message, after: Message | None = None) -> bytes:
    """The bytes of a message whose fields are those set in ``before`` (numbered below
    ``number``), the sub-message ``sub`` as field ``number``, then those set in ``after``
    (numbered above it)."""
    parts = [before.SerializeToString(), field(number, sub.SerializeToString())]
    if after is not None:
        parts.append(after.SerializeToString())
    return b"".join(parts)
