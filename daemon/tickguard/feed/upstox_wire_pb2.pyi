# ruff: noqa
from tickguard.feed import MarketDataFeedV3_pb2 as _MarketDataFeedV3_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FeedEntries(_message.Message):
    __slots__ = ("type", "feeds", "currentTs", "marketInfo")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    FEEDS_FIELD_NUMBER: _ClassVar[int]
    CURRENTTS_FIELD_NUMBER: _ClassVar[int]
    MARKETINFO_FIELD_NUMBER: _ClassVar[int]
    type: _MarketDataFeedV3_pb2.Type
    feeds: _containers.RepeatedCompositeFieldContainer[FeedEntry]
    currentTs: int
    marketInfo: bytes
    def __init__(self, type: _Optional[_Union[_MarketDataFeedV3_pb2.Type, str]] = ..., feeds: _Optional[_Iterable[_Union[FeedEntry, _Mapping]]] = ..., currentTs: _Optional[int] = ..., marketInfo: _Optional[bytes] = ...) -> None: ...

class FeedEntry(_message.Message):
    __slots__ = ("key", "value")
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    key: str
    value: _MarketDataFeedV3_pb2.Feed
    def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_MarketDataFeedV3_pb2.Feed, _Mapping]] = ...) -> None: ...

class FeedFrame(_message.Message):
    __slots__ = ("type", "feeds")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    FEEDS_FIELD_NUMBER: _ClassVar[int]
    type: _MarketDataFeedV3_pb2.Type
    feeds: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, type: _Optional[_Union[_MarketDataFeedV3_pb2.Type, str]] = ..., feeds: _Optional[_Iterable[bytes]] = ...) -> None: ...
