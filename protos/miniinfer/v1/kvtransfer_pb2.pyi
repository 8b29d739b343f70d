from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class KVHeader(_message.Message):
    __slots__ = ("request_id", "ticket_id", "num_tokens", "num_layers", "dtype", "page_size", "num_kv_heads", "head_dim", "layout_version", "scale_dtype", "num_bytes", "checksum", "first_token", "cluster_token", "sender_id")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TICKET_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_VERSION_FIELD_NUMBER: _ClassVar[int]
    SCALE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    NUM_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    SENDER_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    ticket_id: str
    num_tokens: int
    num_layers: int
    dtype: str
    page_size: int
    num_kv_heads: int
    head_dim: int
    layout_version: int
    scale_dtype: str
    num_bytes: int
    checksum: int
    first_token: int
    cluster_token: str
    sender_id: str
    def __init__(self, request_id: _Optional[str] = ..., ticket_id: _Optional[str] = ..., num_tokens: _Optional[int] = ..., num_layers: _Optional[int] = ..., dtype: _Optional[str] = ..., page_size: _Optional[int] = ..., num_kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., layout_version: _Optional[int] = ..., scale_dtype: _Optional[str] = ..., num_bytes: _Optional[int] = ..., checksum: _Optional[int] = ..., first_token: _Optional[int] = ..., cluster_token: _Optional[str] = ..., sender_id: _Optional[str] = ...) -> None: ...

class KVChunk(_message.Message):
    __slots__ = ("header", "seq", "offset", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: KVHeader
    seq: int
    offset: int
    data: bytes
    def __init__(self, header: _Optional[_Union[KVHeader, _Mapping]] = ..., seq: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class TicketRef(_message.Message):
    __slots__ = ("ticket_id", "request_id", "cluster_token", "reason")
    TICKET_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ticket_id: str
    request_id: str
    cluster_token: str
    reason: str
    def __init__(self, ticket_id: _Optional[str] = ..., request_id: _Optional[str] = ..., cluster_token: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class PushAck(_message.Message):
    __slots__ = ("ok", "error", "bytes_received")
    OK_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    error: str
    bytes_received: int
    def __init__(self, ok: _Optional[bool] = ..., error: _Optional[str] = ..., bytes_received: _Optional[int] = ...) -> None: ...
