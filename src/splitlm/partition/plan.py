"""The Plan: where to cut and how to quantize each side (versioned JSON with a hash, torch-free)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from splitlm.errors import PlanError
from splitlm.partition.fields import MissingField, from_fields
from splitlm.quantize.config import KV_BITS, LM_HEAD_BITS, CodecConfig, MoveCodec, WeightQuant

PLAN_VERSION = 1
PREFILL_MAX_ERROR = 0.05
"""Plan.prefill_max_error's default."""
ADDED_FIELDS = ("move_codec", "speculate", "prefill_max_error")
"""Plan fields added within PLAN_VERSION: hashed only when set to something else than their default."""


@dataclass(frozen=True)
class Predictions:
    """What the partitioner predicted for this plan (None where not predicted)."""

    device_memory_bytes: float | None = None
    """Peak device memory at max_seq_len."""
    token_latency_ms: float | None = None
    """Per-token decode latency: device + link + cloud."""
    ttft_ms: float | None = None
    """Time to first token for a prompt of `prompt_tokens`."""
    prompt_tokens: int | None = None
    """Prompt length the TTFT was predicted for."""
    bytes_per_token: float | None = None
    """Bytes on the wire per decoded token, upstream."""
    quality: float | None = None
    """Predicted perplexity on the evaluation protocol (splitlm.evaluate: pydoc_data.topics, 512-token windows)."""
    link_mbps: float | None = None
    """The link bandwidth the plan was made for (the profile's), Mbit/s: the device's uplink measure starts from it
    (device/uplink.py)."""


@dataclass(frozen=True)
class Plan:
    """Everything export, serve and generate need to agree on."""

    model_id: str
    """Name of the model in the cache."""
    weights_hash: str
    """Checkpoint.weights_hash of that model."""
    split_layer: int
    """ℓ: the device runs layers [0, ℓ), the cloud [ℓ, L)."""
    device_weights: WeightQuant = field(default_factory=WeightQuant)
    """Precision of the device head."""
    cloud_weights: WeightQuant = field(default_factory=WeightQuant)
    """Precision of the cloud tail."""
    kv_bits: int = 16
    """Device KV cache precision: one of KV_BITS."""
    lm_head_bits: int = 16
    """Precision of the LM head on whichever side holds it: one of LM_HEAD_BITS."""
    codec: CodecConfig = field(default_factory=CodecConfig)
    """Activation codec at the split."""
    max_seq_len: int = 2048
    """Longest sequence (prompt + generated) a session may reach."""
    prefill_chunk: int = 128
    """Prompt positions per prefill step."""
    split_moves: tuple[tuple[int, int], ...] = ()
    """(sequence length, layer) pairs: when a session reaches the length, the device moves the split to the layer
    (DESIGN.md §6), shallower to free the device's KV memory, or back deeper (the device keeps the weights of
    [0, split_layer)). The cloud holds the weights from the shallowest of them (`cloud_start`)."""
    move_codec: MoveCodec = field(default_factory=MoveCodec)
    """How the K/V of a move travel (lossy "ans" by default; "exact" keeps the output of an exact plan unchanged)."""
    speculate: bool = False
    """Sessions draft tokens on the device and the cloud verifies them, several tokens per round trip with the same
    output (DESIGN.md §11; `generate` speculates when this is set or --speculate is given)."""
    prefill_max_error: float = PREFILL_MAX_ERROR
    """Rate adaptation (device/uplink.py): the codec error ε up to which the device raises its prompt's frames while
    its uplink carries bytes more slowly than the head makes them. The codec's ε is the default; decode rows always
    keep it. A ceiling at the codec's ε turns adaptation off; the raw fp16/fp32 codecs have no ε to raise. 0.05 cost
    SmolLM2 +1.5 % perplexity at split 10 where every frame had it (+0.5 % at the default 0.03; bench/wire.py)."""
    predictions: Predictions = field(default_factory=Predictions)
    """The partitioner's predictions (not part of the hash)."""

    def __post_init__(self) -> None:
        if not isinstance(self.split_layer, int) or self.split_layer < 0:
            raise PlanError(f"split_layer must be a non-negative integer, got {self.split_layer!r}")
        if not isinstance(self.speculate, bool):
            raise PlanError(f"speculate must be true or false, got {self.speculate!r}")
        if self.lm_head_bits not in LM_HEAD_BITS:
            raise PlanError(f"lm_head_bits {self.lm_head_bits!r} not in {LM_HEAD_BITS}")
        if self.kv_bits not in KV_BITS:
            raise PlanError(f"kv_bits {self.kv_bits!r} not in {KV_BITS}")
        if self.max_seq_len < 1:
            raise PlanError(f"max_seq_len must be >= 1, got {self.max_seq_len}")
        if self.prefill_chunk < 1:
            raise PlanError(f"prefill_chunk must be >= 1, got {self.prefill_chunk}")
        ceiling = self.prefill_max_error
        if isinstance(ceiling, bool) or not isinstance(ceiling, (int, float)) or not 0 < ceiling <= 1:
            raise PlanError(f"prefill_max_error must be a codec error in (0, 1], got {ceiling!r}")
        if ceiling != PREFILL_MAX_ERROR:
            if self.codec.kind != "tabq":
                raise PlanError(f"prefill_max_error raises the codec's error ε on a slow uplink, and codec {self.codec.kind!r} "
                                "sends raw values: leave it at its default, or pick the tabq codec")
            if ceiling < self.codec.error_budget:
                raise PlanError(f"prefill_max_error {ceiling} is below the codec's error budget {self.codec.error_budget}: "
                                "set it to the budget to send every frame at the codec's ε")
        last_len, last_layer = 0, self.split_layer
        for move in self.split_moves:
            if not (isinstance(move, (tuple, list)) and len(move) == 2 and all(isinstance(v, int) for v in move)):
                raise PlanError(f"split move {move!r} is not a [sequence length, layer] pair of integers")
            at_len, layer = move
            if not last_len < at_len <= self.max_seq_len:
                raise PlanError(f"split move at length {at_len} must be after {last_len} and within max_seq_len {self.max_seq_len}")
            if not 1 <= layer <= self.split_layer:
                raise PlanError(f"split move to layer {layer} must be within [1, {self.split_layer}] (the device holds layers "
                                f"[0, {self.split_layer}) and keeps at least one)")
            if layer == last_layer:
                raise PlanError(f"split move at length {at_len} to layer {layer}: the split is already there")
            last_len, last_layer = at_len, layer

    @property
    def prefill_error_ceiling(self) -> float | None:
        """The ε the device may raise prompt frames to (`prefill_max_error`, never below the codec's own); None for a
        raw codec."""
        return max(self.prefill_max_error, self.codec.error_budget) if self.codec.kind == "tabq" else None

    @property
    def cloud_start(self) -> int:
        """The shallowest layer the cloud runs during a session: it holds the weights of [cloud_start, L)."""
        return min([self.split_layer] + [layer for _, layer in self.split_moves])

    @property
    def move_cuts(self) -> list[int]:
        """Layers inside the head a session may move its split to: the head is cut into segments there."""
        return sorted({layer for _, layer in self.split_moves if layer < self.split_layer})

    def splits(self) -> list[int]:
        """Every split a session of this plan may run at: split_layer and the moves' layers."""
        return sorted({self.split_layer, *self.move_cuts})

    def check_model(self, num_layers: int, weights_hash: str | None = None) -> None:
        """Raise PlanError if this plan cannot run on a model with `num_layers` layers / these weights."""
        if not 0 <= self.split_layer <= num_layers:
            raise PlanError(f"split layer {self.split_layer} is outside [0, {num_layers}] for {self.model_id}")
        if self.speculate and self.split_layer == num_layers:
            raise PlanError(f"a device-only plan (split {num_layers}) cannot speculate: it has no round trips to hide")
        if self.split_moves and self.split_layer == num_layers:
            raise PlanError(f"a device-only plan (split {num_layers}) cannot move its split: it has no cloud; "
                            "partition with a split below the last layer")
        if weights_hash is not None and weights_hash != self.weights_hash:
            raise PlanError(f"plan was made for weights {self.weights_hash}, the model has {weights_hash}")

    def replace(self, **changes: Any) -> "Plan":
        return dataclasses.replace(self, **changes)

    # -- (de)serialization ---------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["version"] = PLAN_VERSION
        data["hash"] = self.hash
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @property
    def hash(self) -> str:
        """sha256 (16 hex digits) of everything but the predictions: device and cloud must agree on it. Fields added
        after a version (ADDED_FIELDS) count only when they differ from their default, so that the plans and exports
        made before them keep their hash."""
        data = dataclasses.asdict(self)
        data.pop("predictions")
        for f in dataclasses.fields(self):
            if f.name in ADDED_FIELDS and getattr(self, f.name) == (f.default if f.default_factory is dataclasses.MISSING
                                                                    else f.default_factory()):
                data.pop(f.name)
        canon = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(f"v{PLAN_VERSION}:{canon}".encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "Plan":
        data = dict(raw)
        if _is_profile(data):
            raise PlanError(f"this is a profile, not a plan; {_MAKE_PLAN}")
        version = data.pop("version", None)
        if version != PLAN_VERSION:
            raise PlanError(f"plan version {version!r} is not supported (expected {PLAN_VERSION})")
        claimed = data.pop("hash", None)
        try:
            plan = from_fields(cls, data)
        except PlanError:
            raise
        except MissingField as exc:
            raise PlanError(f"plan has a missing, unknown or malformed field: no {exc.args[0]!r}") from None
        except (TypeError, ValueError, AttributeError) as exc:
            raise PlanError(f"plan has a missing, unknown or malformed field: {exc}") from None
        if claimed is not None and claimed != plan.hash:
            raise PlanError(f"plan hash {claimed} does not match its contents ({plan.hash}); was it edited by hand? remove the hash field to accept the edit")
        return plan

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PlanError(f"plan is not valid JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise PlanError("plan JSON must be an object")
        return cls.from_dict(raw)

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        """The plan in the JSON file `path`; PlanError naming the file and what is wrong with it."""
        raw = read_json_object(path, "plan", PlanError)
        if _is_profile(raw):
            raise PlanError(f"{path} is a profile, not a plan; {_MAKE_PLAN}")
        try:
            return cls.from_dict(raw)
        except PlanError as exc:
            raise PlanError(f"{path}: {exc}") from None


def read_json_object(path: str | Path, what: str, error: type[Exception]) -> dict[str, Any]:
    """The JSON object in file `path`; `error` naming the file when it cannot be read or is not one."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"cannot read {what} {path}: {exc}") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{path} is not a {what}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise error(f"{path} is not a {what}: its JSON is a {type(raw).__name__}, not an object")
    return raw


_MAKE_PLAN = "make a plan from it with `splitlm partition --profile`"


def _is_profile(data: Mapping[str, Any]) -> bool:
    return "split_layer" not in data and {"memory", "quality", "device", "cloud"} <= data.keys()

