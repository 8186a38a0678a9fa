from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DeviceMessage(_message.Message):
    __slots__ = ("open", "activations", "move_split", "cancel")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    ACTIVATIONS_FIELD_NUMBER: _ClassVar[int]
    MOVE_SPLIT_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    open: Open
    activations: Activations
    move_split: MoveSplit
    cancel: Cancel
    def __init__(self, open: _Optional[_Union[Open, _Mapping]] = ..., activations: _Optional[_Union[Activations, _Mapping]] = ..., move_split: _Optional[_Union[MoveSplit, _Mapping]] = ..., cancel: _Optional[_Union[Cancel, _Mapping]] = ...) -> None: ...

class Open(_message.Message):
    __slots__ = ("plan_hash", "model_id", "sampling", "max_tokens", "resume_session", "uplink_receipts")
    PLAN_HASH_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    RESUME_SESSION_FIELD_NUMBER: _ClassVar[int]
    UPLINK_RECEIPTS_FIELD_NUMBER: _ClassVar[int]
    plan_hash: str
    model_id: str
    sampling: Sampling
    max_tokens: int
    resume_session: str
    uplink_receipts: bool
    def __init__(self, plan_hash: _Optional[str] = ..., model_id: _Optional[str] = ..., sampling: _Optional[_Union[Sampling, _Mapping]] = ..., max_tokens: _Optional[int] = ..., resume_session: _Optional[str] = ..., uplink_receipts: _Optional[bool] = ...) -> None: ...

class Sampling(_message.Message):
    __slots__ = ("temperature", "top_k", "top_p", "seed", "has_seed", "logprobs")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    HAS_SEED_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_k: int
    top_p: float
    seed: int
    has_seed: bool
    logprobs: int
    def __init__(self, temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., has_seed: _Optional[bool] = ..., logprobs: _Optional[int] = ...) -> None: ...

class Activations(_message.Message):
    __slots__ = ("start_position", "frame", "want_token", "draft_ids", "keep_rows")
    START_POSITION_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    WANT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    DRAFT_IDS_FIELD_NUMBER: _ClassVar[int]
    KEEP_ROWS_FIELD_NUMBER: _ClassVar[int]
    start_position: int
    frame: bytes
    want_token: bool
    draft_ids: _containers.RepeatedScalarFieldContainer[int]
    keep_rows: int
    def __init__(self, start_position: _Optional[int] = ..., frame: _Optional[bytes] = ..., want_token: _Optional[bool] = ..., draft_ids: _Optional[_Iterable[int]] = ..., keep_rows: _Optional[int] = ...) -> None: ...

class MoveSplit(_message.Message):
    __slots__ = ("new_split", "layers", "more")
    NEW_SPLIT_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    new_split: int
    layers: _containers.RepeatedCompositeFieldContainer[LayerKV]
    more: bool
    def __init__(self, new_split: _Optional[int] = ..., layers: _Optional[_Iterable[_Union[LayerKV, _Mapping]]] = ..., more: _Optional[bool] = ...) -> None: ...

class LayerKV(_message.Message):
    __slots__ = ("layer", "bits", "keys", "values", "start_position", "positions", "key_scales", "value_scales", "encoding")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    BITS_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    START_POSITION_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    KEY_SCALES_FIELD_NUMBER: _ClassVar[int]
    VALUE_SCALES_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    layer: int
    bits: int
    keys: bytes
    values: bytes
    start_position: int
    positions: int
    key_scales: bytes
    value_scales: bytes
    encoding: int
    def __init__(self, layer: _Optional[int] = ..., bits: _Optional[int] = ..., keys: _Optional[bytes] = ..., values: _Optional[bytes] = ..., start_position: _Optional[int] = ..., positions: _Optional[int] = ..., key_scales: _Optional[bytes] = ..., value_scales: _Optional[bytes] = ..., encoding: _Optional[int] = ...) -> None: ...

class Cancel(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class CloudMessage(_message.Message):
    __slots__ = ("opened", "token", "split_moved", "error", "received")
    OPENED_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    SPLIT_MOVED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_FIELD_NUMBER: _ClassVar[int]
    opened: Opened
    token: Token
    split_moved: SplitMoved
    error: Error
    received: Received
    def __init__(self, opened: _Optional[_Union[Opened, _Mapping]] = ..., token: _Optional[_Union[Token, _Mapping]] = ..., split_moved: _Optional[_Union[SplitMoved, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., received: _Optional[_Union[Received, _Mapping]] = ...) -> None: ...

class Received(_message.Message):
    __slots__ = ("start_position", "bytes", "server_us")
    START_POSITION_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    SERVER_US_FIELD_NUMBER: _ClassVar[int]
    start_position: int
    bytes: int
    server_us: int
    def __init__(self, start_position: _Optional[int] = ..., bytes: _Optional[int] = ..., server_us: _Optional[int] = ...) -> None: ...

class Opened(_message.Message):
    __slots__ = ("session_id", "max_seq_len", "max_frame_bytes", "max_tokens")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    MAX_FRAME_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    max_seq_len: int
    max_frame_bytes: int
    max_tokens: int
    def __init__(self, session_id: _Optional[str] = ..., max_seq_len: _Optional[int] = ..., max_frame_bytes: _Optional[int] = ..., max_tokens: _Optional[int] = ...) -> None: ...

class Token(_message.Message):
    __slots__ = ("position", "id", "logprob", "top", "compute_us", "accepted", "kept")
    POSITION_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_US_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    KEPT_FIELD_NUMBER: _ClassVar[int]
    position: int
    id: int
    logprob: float
    top: _containers.RepeatedCompositeFieldContainer[TopLogprob]
    compute_us: int
    accepted: int
    kept: _containers.RepeatedCompositeFieldContainer[DraftLogprobs]
    def __init__(self, position: _Optional[int] = ..., id: _Optional[int] = ..., logprob: _Optional[float] = ..., top: _Optional[_Iterable[_Union[TopLogprob, _Mapping]]] = ..., compute_us: _Optional[int] = ..., accepted: _Optional[int] = ..., kept: _Optional[_Iterable[_Union[DraftLogprobs, _Mapping]]] = ...) -> None: ...

class DraftLogprobs(_message.Message):
    __slots__ = ("logprob", "top")
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    logprob: float
    top: _containers.RepeatedCompositeFieldContainer[TopLogprob]
    def __init__(self, logprob: _Optional[float] = ..., top: _Optional[_Iterable[_Union[TopLogprob, _Mapping]]] = ...) -> None: ...

class TopLogprob(_message.Message):
    __slots__ = ("id", "logprob")
    ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    id: int
    logprob: float
    def __init__(self, id: _Optional[int] = ..., logprob: _Optional[float] = ...) -> None: ...

class SplitMoved(_message.Message):
    __slots__ = ("split", "layers", "more")
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    split: int
    layers: _containers.RepeatedCompositeFieldContainer[LayerKV]
    more: bool
    def __init__(self, split: _Optional[int] = ..., layers: _Optional[_Iterable[_Union[LayerKV, _Mapping]]] = ..., more: _Optional[bool] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...
