"""The protobuf wire-format reader and writer: round trips, every wire type, strict framing."""

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tickguard.feed import protobuf as pb


def test_varint_round_trips_at_the_edges() -> None:
    """Varints of 0, 1, 127, 128, 300 and 2**64-1 encode as protobuf does and read back."""
    known = {0: b"\x00", 1: b"\x01", 127: b"\x7f", 128: b"\x80\x01", 300: b"\xac\x02"}
    for value, wire in known.items():
        assert pb.encode_varint(value) == wire
        assert pb.read_varint(wire, 0) == (value, len(wire))
    top = pb.encode_varint(pb.UINT64_MAX)
    assert len(top) == 10
    assert pb.read_varint(top, 0) == (pb.UINT64_MAX, 10)


def test_negative_ints_are_64_bit_twos_complement() -> None:
    """An int64 of -1 is written in 10 bytes and read back as -1 through `int64`."""
    wire = pb.varint_field(2, -1)
    (field,) = pb.parse(wire)
    assert len(wire) == 11
    assert isinstance(field.value, int)
    assert pb.int64(field.value) == -1
    assert pb.int64(5) == 5


def test_every_wire_type_is_read_back() -> None:
    """VARINT, I64, LEN and I32 fields come back in wire order with their numbers and values."""
    message = b"".join(
        [
            pb.varint_field(1, 150),
            pb.double_field(2, 2500.5),
            pb.string_field(3, "NSE_EQ|INE002A01018"),
            pb.fixed32_field(4, struct.pack("<f", 1.5)),
            pb.fixed64_field(5, struct.pack("<q", -7)),
            pb.bytes_field(536870911, b""),
        ]
    )
    fields = pb.parse(message)
    assert [(f.number, f.wire_type) for f in fields] == [
        (1, pb.VARINT),
        (2, pb.I64),
        (3, pb.LEN),
        (4, pb.I32),
        (5, pb.I64),
        (536870911, pb.LEN),
    ]
    assert fields[0].value == 150
    assert isinstance(fields[1].value, bytes)
    assert pb.double(fields[1].value) == 2500.5
    assert isinstance(fields[2].value, bytes)
    assert pb.utf8(fields[2].value) == "NSE_EQ|INE002A01018"
    assert fields[3].value == struct.pack("<f", 1.5)
    assert fields[5].value == b""


def test_the_canonical_example_bytes() -> None:
    """The protobuf docs' example `08 96 01` is field 1, varint 150."""
    assert pb.parse(bytes.fromhex("089601")) == [pb.Field(1, pb.VARINT, 150)]
    assert pb.varint_field(1, 150) == bytes.fromhex("089601")


def test_nested_messages_parse_from_their_bytes() -> None:
    """A LEN field holding a message parses into that message's fields."""
    inner = pb.double_field(1, 99.25) + pb.varint_field(2, 1767765256123)
    (outer,) = pb.parse(pb.bytes_field(7, inner))
    assert isinstance(outer.value, bytes)
    assert pb.parse(outer.value) == pb.parse(inner)


def test_empty_input_is_an_empty_message() -> None:
    """No bytes is a valid message without fields."""
    assert pb.parse(b"") == []


@pytest.mark.parametrize(
    ("wire", "why"),
    [
        (b"\x08", "truncated varint"),  # key, then nothing
        (b"\x08\x80", "truncated varint"),  # a varint whose continuation never ends
        (b"\x09\x00\x00\x00", "truncated fixed-size value"),  # I64 with 3 bytes
        (b"\x0d\x00", "truncated fixed-size value"),  # I32 with 1 byte
        (b"\x12\x05abc", "past the end"),  # LEN 5 with 3 bytes
        (b"\x12\xff\xff\xff\xff\x0f", "past the end"),  # a 4 GiB length
        (b"\x12" + b"\xff" * 9 + b"\x01", "past the end"),  # a 2**64-1 length
        (b"\x08" + b"\xff" * 10 + b"\x01", "longer than 10 bytes"),
        (b"\x08" + b"\xff" * 9 + b"\x7f", "over 64 bits"),
        (b"\x00\x01", "field number 0"),
        (b"\x0b", "wire type 3"),  # start group
        (b"\x0c", "wire type 4"),  # end group
        (b"\x0e", "wire type 6"),
        (b"\x0f", "wire type 7"),
        (pb.encode_varint(((1 << 29) << 3) | 0) + b"\x00", "field number"),
    ],
)
def test_malformed_input_raises_malformed_message(wire: bytes, why: str) -> None:
    """Truncated values, lengths past the end, overlong varints and bad keys are refused."""
    with pytest.raises(pb.MalformedMessage, match=why):
        pb.parse(wire)


def test_a_huge_length_is_refused_without_allocating() -> None:
    """A length prefix of 2**63 on a tiny input fails at once instead of reading or allocating."""
    with pytest.raises(pb.MalformedMessage, match="past the end"):
        pb.parse(b"\x12" + pb.encode_varint(1 << 63))


def test_non_utf8_strings_are_malformed() -> None:
    """A string field holding invalid UTF-8 raises MalformedMessage, not UnicodeDecodeError."""
    with pytest.raises(pb.MalformedMessage, match="UTF-8"):
        pb.utf8(b"\xff\xfe")


def test_the_writer_refuses_values_it_cannot_encode() -> None:
    """Over-64-bit varints, field number 0 and wrong fixed sizes are programming errors."""
    with pytest.raises(ValueError, match="64 bits"):
        pb.encode_varint(1 << 64)
    with pytest.raises(ValueError, match="field number"):
        pb.varint_field(0, 1)
    with pytest.raises(ValueError, match="8 bytes"):
        pb.fixed64_field(1, b"\x00")
    with pytest.raises(ValueError, match="4 bytes"):
        pb.fixed32_field(1, b"\x00")


_FIELDS = st.one_of(
    st.builds(
        pb.varint_field, st.integers(1, pb.MAX_FIELD_NUMBER), st.integers(-(1 << 63), (1 << 64) - 1)
    ),
    st.builds(pb.double_field, st.integers(1, 1000), st.floats(allow_nan=False)),
    st.builds(pb.bytes_field, st.integers(1, 1000), st.binary(max_size=50)),
    st.builds(pb.fixed32_field, st.integers(1, 1000), st.binary(min_size=4, max_size=4)),
)


@given(st.lists(_FIELDS, max_size=20))
def test_any_written_message_reads_back_field_for_field(fields: list[bytes]) -> None:
    """Whatever the writer produces parses into one field per write, in order."""
    parsed = pb.parse(b"".join(fields))
    assert len(parsed) == len(fields)
    for written, field in zip(fields, parsed, strict=True):
        assert pb.parse(written) == [field]


@given(st.binary(max_size=200))
def test_arbitrary_bytes_parse_or_raise_malformed_message(data: bytes) -> None:
    """On any input the reader returns fields or raises MalformedMessage, nothing else."""
    try:
        fields = pb.parse(data)
    except pb.MalformedMessage:
        return
    for field in fields:
        assert 1 <= field.number <= pb.MAX_FIELD_NUMBER
        if field.wire_type == pb.VARINT:
            assert isinstance(field.value, int)
            assert 0 <= field.value <= pb.UINT64_MAX
        else:
            assert isinstance(field.value, bytes)
