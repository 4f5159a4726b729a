"""A minimal protobuf wire-format reader and writer (no protobuf package).

The reader splits one message into `Field(number, wire_type, value)` in wire
order, and knows nothing of schemas: the caller picks the fields it wants and
ignores the rest, as protobuf does with unknown fields. It is strict about
framing (a truncated varint or length, a length past the end, a group or an
undefined wire type, field number 0) and raises `MalformedMessage`, a
ValueError the feed protocol turns into a counted bad frame.

Values: VARINT gives the unsigned 64-bit integer; I64, LEN and I32 give their
raw bytes. `double`, `int64` and `utf8` interpret them. Merge semantics of a
repeated singular field are the caller's: scalars take the last occurrence,
and a sub-message's occurrences concatenated parse as their merge.

The writer builds messages field by field (the tests' fake servers use it).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

VARINT: Final = 0
I64: Final = 1
LEN: Final = 2
I32: Final = 5

MAX_FIELD_NUMBER: Final = (1 << 29) - 1
MAX_VARINT_BYTES: Final = 10
UINT64_MAX: Final = (1 << 64) - 1

_DOUBLE = struct.Struct("<d")
_FIXED_SIZE: Final = {I64: 8, I32: 4}


class MalformedMessage(ValueError):
    """The bytes are not a well-formed protobuf message."""

    def __init__(self, offset: int, why: str) -> None:
        super().__init__(offset, why)
        self.offset = offset
        self.why = why

    def __str__(self) -> str:
        return f"malformed protobuf at byte {self.offset}: {self.why}"


@dataclass(frozen=True, slots=True)
class Field:
    number: int
    wire_type: int
    value: int | bytes  # int for VARINT, the raw bytes otherwise


# -- reading -----------------------------------------------------------------


def read_varint(data: bytes, offset: int) -> tuple[int, int]:
    """(value, next offset) of the varint at `offset`; at most 10 bytes, at most 64 bits."""
    value = 0
    for i in range(MAX_VARINT_BYTES):
        if offset + i >= len(data):
            raise MalformedMessage(offset, "truncated varint")
        byte = data[offset + i]
        value |= (byte & 0x7F) << (7 * i)
        if byte < 0x80:
            if value > UINT64_MAX:
                raise MalformedMessage(offset, "varint over 64 bits")
            return value, offset + i + 1
    raise MalformedMessage(offset, "varint longer than 10 bytes")


def parse(data: bytes) -> list[Field]:
    """Every field of one message, in wire order; raises MalformedMessage."""
    fields: list[Field] = []
    offset = 0
    end = len(data)
    while offset < end:
        start = offset
        key, offset = read_varint(data, offset)
        number, wire_type = key >> 3, key & 0x7
        if number == 0 or number > MAX_FIELD_NUMBER:
            raise MalformedMessage(start, f"field number {number}")
        value: int | bytes
        if wire_type == VARINT:
            value, offset = read_varint(data, offset)
        elif wire_type == LEN:
            length, offset = read_varint(data, offset)
            if length > end - offset:
                raise MalformedMessage(start, f"length {length} past the end")
            value = data[offset : offset + length]
            offset += length
        elif wire_type in _FIXED_SIZE:
            size = _FIXED_SIZE[wire_type]
            if size > end - offset:
                raise MalformedMessage(start, "truncated fixed-size value")
            value = data[offset : offset + size]
            offset += size
        else:  # 3 and 4 are proto2 groups, 6 and 7 undefined
            raise MalformedMessage(start, f"wire type {wire_type}")
        fields.append(Field(number, wire_type, value))
    return fields


def double(value: bytes) -> float:
    """An I64 field's bytes as a double."""
    result: float = _DOUBLE.unpack(value)[0]
    return result


def int64(value: int) -> int:
    """A VARINT's unsigned value as a two's-complement int64."""
    return value - (1 << 64) if value >= 1 << 63 else value


def utf8(value: bytes) -> str:
    """A string field's bytes; raises MalformedMessage if they are not UTF-8."""
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedMessage(exc.start, "a string that is not UTF-8") from None


# -- writing -----------------------------------------------------------------


def encode_varint(value: int) -> bytes:
    """A varint; negative values are written as their 64-bit two's complement."""
    if value < 0:
        value += 1 << 64
    if not 0 <= value <= UINT64_MAX:
        raise ValueError(f"{value} does not fit in 64 bits")
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def key(number: int, wire_type: int) -> bytes:
    if not 1 <= number <= MAX_FIELD_NUMBER:
        raise ValueError(f"field number {number}")
    return encode_varint(number << 3 | wire_type)


def varint_field(number: int, value: int) -> bytes:
    return key(number, VARINT) + encode_varint(value)


def double_field(number: int, value: float) -> bytes:
    return key(number, I64) + _DOUBLE.pack(value)


def fixed64_field(number: int, value: bytes) -> bytes:
    if len(value) != 8:
        raise ValueError("an I64 value is 8 bytes")
    return key(number, I64) + value


def fixed32_field(number: int, value: bytes) -> bytes:
    if len(value) != 4:
        raise ValueError("an I32 value is 4 bytes")
    return key(number, I32) + value


def bytes_field(number: int, value: bytes) -> bytes:
    """A LEN field: bytes, a string's UTF-8, or an encoded sub-message."""
    return key(number, LEN) + encode_varint(len(value)) + value


def string_field(number: int, value: str) -> bytes:
    return bytes_field(number, value.encode("utf-8"))
