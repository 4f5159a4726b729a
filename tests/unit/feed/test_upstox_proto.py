"""The Upstox feed's generated protobuf code: it is its .proto files', on the runtime pinned.

MarketDataFeedV3.proto (Upstox's schema) and upstox_wire.proto (FeedResponse
with its feeds map read as the repeated entries it is on the wire) sit beside
their generated modules in tickguard/feed/; scripts/gen-upstox-proto.sh
writes the modules. These tests hold the committed code to the committed
.proto files, the generated code to pyproject's protobuf floor, and
upstox_wire.proto to FeedResponse's wire format.
"""

import re
import tomllib
from pathlib import Path

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.internal import api_implementation
from hypothesis import given
from hypothesis import strategies as st

from tickguard.feed import MarketDataFeedV3_pb2 as v3
from tickguard.feed import upstox_wire_pb2 as wire

FEED = Path(v3.__file__).parent
ROOT = FEED.parents[2]
MODULES = {"MarketDataFeedV3.proto": v3, "upstox_wire.proto": wire}

_SCALARS = {
    FieldDescriptor.TYPE_DOUBLE: "double",
    FieldDescriptor.TYPE_INT64: "int64",
    FieldDescriptor.TYPE_STRING: "string",
    FieldDescriptor.TYPE_BYTES: "bytes",
}


def _blocks(text: str, keyword: str) -> dict[str, str]:
    """`keyword NAME { ... }` blocks at the top level of a .proto: name -> body."""
    found = {}
    for match in re.finditer(rf"^{keyword}\s+(\w+)\s*\{{", text, re.MULTILINE):
        depth, at = 1, match.end()
        while depth:
            depth += {"{": 1, "}": -1}.get(text[at], 0)
            at += 1
        found[match.group(1)] = text[match.end() : at - 1]
    return found


def proto_schema(text: str) -> tuple[dict[str, set[tuple[str, int, str]]], dict[str, set]]:
    """Each message's (field, number, type as written) and each enum's (value, number)."""
    text = re.sub(r"//[^\n]*", "", text)
    field = re.compile(
        r"(repeated\s+)?(map<\s*\w+\s*,\s*[\w.]+\s*>|[\w.]+)\s+(\w+)\s*=\s*(\d+)\s*;"
    )
    messages = {
        name: {
            (m.group(3), int(m.group(4)), ("repeated " if m.group(1) else "") + m.group(2))
            for m in field.finditer(body)
        }
        for name, body in _blocks(text, "message").items()
    }
    value = re.compile(r"(\w+)\s*=\s*(\d+)\s*;")
    enums = {
        name: {(m.group(1), int(m.group(2))) for m in value.finditer(body)}
        for name, body in _blocks(text, "enum").items()
    }
    return messages, enums


def _type(field: FieldDescriptor) -> str:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        key, value = (field.message_type.fields_by_name[n] for n in ("key", "value"))
        return f"map<{_type(key)}, {_type(value)}>"
    if field.message_type is not None:
        name = field.message_type.name
    elif field.enum_type is not None:
        name = field.enum_type.name
    else:
        name = _SCALARS[field.type]
    return ("repeated " if field.is_repeated else "") + name


def descriptor_schema(message: Descriptor) -> set[tuple[str, int, str]]:
    return {(f.name, f.number, _type(f)) for f in message.fields}


def _written(spelled: str) -> str:
    """A type as the .proto spells it, package prefixes dropped and map spacing fixed."""
    spelled = re.sub(r"\b[\w.]+\.(\w+)", r"\1", spelled)
    return re.sub(r"map<\s*(\w+)\s*,\s*(\w+)\s*>", r"map<\1, \2>", spelled)


def test_the_generated_modules_are_their_proto_files() -> None:
    """Every message, field (name, number, type) and enum value of each committed .proto is in
    its committed generated module, and nothing else: regenerate after editing a .proto."""
    for proto, module in MODULES.items():
        messages, enums = proto_schema((FEED / proto).read_text(encoding="utf-8"))
        assert module.DESCRIPTOR.name == f"tickguard/feed/{proto}"
        generated = module.DESCRIPTOR.message_types_by_name
        assert set(generated) == set(messages), proto
        for name, fields in messages.items():
            written = {(f, n, _written(t)) for f, n, t in fields}
            assert descriptor_schema(generated[name]) == written, f"{proto}: {name}"
        generated_enums = module.DESCRIPTOR.enum_types_by_name
        assert set(generated_enums) == set(enums), proto
        for name, values in enums.items():
            assert {(v.name, v.number) for v in generated_enums[name].values} == values


def test_the_schema_is_upstoxs() -> None:
    """Spot checks of MarketDataFeedV3.proto against Upstox's published field numbers."""
    messages, enums = proto_schema((FEED / "MarketDataFeedV3.proto").read_text(encoding="utf-8"))
    assert v3.DESCRIPTOR.package == "com.upstox.marketdatafeederv3udapi.rpc.proto"
    assert messages["LTPC"] == {
        ("ltp", 1, "double"),
        ("ltt", 2, "int64"),
        ("ltq", 3, "int64"),
        ("cp", 4, "double"),
    }
    assert messages["FeedResponse"] == {
        ("type", 1, "Type"),
        ("feeds", 2, "map<string, Feed>"),
        ("currentTs", 3, "int64"),
        ("marketInfo", 4, "MarketInfo"),
    }
    assert enums["Type"] == {("initial_feed", 0), ("live_feed", 1), ("market_info", 2)}


def _version(text: str) -> tuple[int, int, int]:
    major, minor, patch = (int(part) for part in text.split("."))
    return major, minor, patch


def test_the_generated_code_runs_on_every_runtime_the_project_allows() -> None:
    """The runtime refuses code generated by a newer protobuf than itself: the code's version
    is at most pyproject's floor (protobuf>=X.Y), so every allowed runtime loads it."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    (floor,) = [d for d in project["project"]["dependencies"] if d.startswith("protobuf")]
    match = re.match(r"protobuf>=(\d+)\.(\d+)(?:\.(\d+))?\b", floor)
    assert match is not None, floor
    floor_version = (int(match[1]), int(match[2]), int(match[3] or 0))
    for module in MODULES.values():
        source = Path(module.__file__).read_text(encoding="utf-8")
        (stamp,) = re.findall(r"^# Protobuf Python Version: ([\d.]+)$", source, re.MULTILINE)
        assert _version(stamp) <= floor_version, f"{module.__name__}: {stamp} > {floor}"


def test_the_runtime_is_upb() -> None:
    """The pinned runtime decodes in C (upb), the reason the decoder uses it."""
    assert api_implementation.Type() == "upb"


_FEEDS = st.dictionaries(
    st.text(max_size=12),
    st.builds(
        lambda ltp, ltt, mode: v3.Feed(ltpc=v3.LTPC(ltp=ltp, ltt=ltt), requestMode=mode),
        st.floats(allow_nan=False),
        st.integers(-(1 << 63), (1 << 63) - 1),
        st.sampled_from([v3.ltpc, v3.full_d5]),
    ),
    max_size=8,
)


@given(_FEEDS, st.sampled_from([v3.initial_feed, v3.live_feed, v3.market_info]))
def test_feed_entries_read_a_feed_response_entry_for_entry(feeds: dict, kind: int) -> None:
    """What the runtime writes for FeedResponse parses as FeedEntries and FeedFrame with
    the same type and the same entries, and FeedEntries' bytes parse back as that map."""
    response = v3.FeedResponse(type=kind, feeds=feeds, currentTs=1767765256123)
    data = response.SerializeToString()
    entries = wire.FeedEntries.FromString(data)
    assert entries.type == kind
    assert {e.key: e.value for e in entries.feeds} == feeds
    assert len(entries.feeds) == len(feeds)
    frame = wire.FeedFrame.FromString(data)
    assert [wire.FeedEntry.FromString(raw) for raw in frame.feeds] == list(entries.feeds)
    again = v3.FeedResponse.FromString(entries.SerializeToString())
    assert again.type == kind
    assert dict(again.feeds) == feeds
