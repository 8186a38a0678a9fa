"""The Profile: what the partitioner knows about a device, a cloud, a link and a model (torch-free).

Written by `splitlm profile` (measured) or by hand/tests (synthetic); versioned JSON.
Latencies are per layer so any split can be priced; context-dependent ones are tabulated at
a few context lengths and interpolated linearly.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, get_type_hints

import numpy as np

from splitlm.errors import ConfigError
from splitlm.partition.fields import MissingField, convert, from_fields

PROFILE_VERSION = 1


def _interp(contexts: tuple[int, ...], values: tuple[float, ...], at: float) -> float:
    return float(np.interp(at, contexts, values))


@dataclass(frozen=True)
class SideProfile:
    """Per-layer costs of one side (device or cloud), keyed by weight bits."""

    contexts: tuple[int, ...]
    """Context lengths at which decode latency was measured, ascending."""
    decode_ms: Mapping[int, tuple[float, ...]]
    """bits -> per-layer latency of one decode step at each context (ms)."""
    prefill_ms_per_token: Mapping[int, float]
    """bits -> per-layer prefill cost per prompt token (ms)."""
    embed_ms: float = 0.0
    """Embedding lookup per step (device side)."""
    head_ms: Mapping[int, float] = field(default_factory=dict)
    """LM-head bits -> final norm + LM head per token (ms)."""
    step_overhead_ms: float = 0.0
    """Fixed cost per decode step (runtime call, sampling; on the cloud: the service's own work)."""
    prefill_fixed_ms: Mapping[int, float] = field(default_factory=dict)
    """bits -> per-layer cost of one prefill call on top of its per-token cost (ms)."""
    prefill_overhead_ms: float = 0.0
    """Fixed cost of the first (prefill) step beyond the per-layer costs (ms)."""
    kv_decode_ms: Mapping[int, tuple[float, ...]] = field(default_factory=dict)
    """KV bits -> per-layer cost of a quantized KV cache on one decode step, at each context, over
    a 16-bit cache (ms; device side: quantizing the new position, dequantizing the past)."""
    kv_prefill_ms_per_token: Mapping[int, float] = field(default_factory=dict)
    """KV bits -> per-layer cost of a quantized KV cache per prefill position (ms)."""
    alone_decode_scale: float = 1.0
    """Device-only plans: their runtime's threads spin between steps (nothing to wait on), so a
    layer's decode costs this times the split session's (from a device-only export stepped as
    `generate` steps it)."""

    def decode(self, bits: int, context: float) -> float:
        return _interp(self.contexts, self.decode_ms[bits], context)

    def kv_decode(self, kv_bits: int, context: float) -> float:
        """Per-layer extra decode cost of a `kv_bits` cache (0 for 16 bits or when not measured)."""
        values = self.kv_decode_ms.get(kv_bits)
        return _interp(self.contexts, values, context) if values else 0.0

    def kv_prefill(self, kv_bits: int, tokens: int) -> float:
        """Per-layer extra cost of a `kv_bits` cache on a prefill call over `tokens` positions."""
        return tokens * self.kv_prefill_ms_per_token.get(kv_bits, 0.0)

    def prefill(self, bits: int, tokens: int) -> float:
        """Per-layer cost of one prefill call over `tokens` positions (ms)."""
        return self.prefill_fixed_ms.get(bits, 0.0) + tokens * self.prefill_ms_per_token[bits]

    @property
    def bits(self) -> tuple[int, ...]:
        return tuple(sorted(self.decode_ms))


@dataclass(frozen=True)
class CodecPoint:
    """One activation-codec setting as measured."""

    name: str
    """e.g. 'fp16' or 'tabq eps=0.03'."""
    bytes_per_token: float
    """Upstream bytes per position, everything counted."""
    encode_ms: float
    """Device time to encode one position."""
    decode_ms: float
    """Cloud time to decode one position."""
    kind: str = "tabq"
    error_budget: float = 0.0
    prefill_encode_ms_per_token: float | None = None
    """Device time per position when a whole prefill chunk is encoded at once (None: encode_ms)."""
    prefill_decode_ms_per_token: float | None = None
    """Cloud time per position for a whole prefill chunk (None: decode_ms)."""
    entropy: str = "none"
    """tabq: how its rows travel (CodecConfig.entropy): fixed-width codes, or "ans"."""

    @property
    def prefill_encode(self) -> float:
        return self.encode_ms if self.prefill_encode_ms_per_token is None else self.prefill_encode_ms_per_token

    @property
    def prefill_decode(self) -> float:
        return self.decode_ms if self.prefill_decode_ms_per_token is None else self.prefill_decode_ms_per_token


@dataclass(frozen=True)
class QualityTable:
    """Perplexity model: log-perplexity = base + Σ measured deltas (nats per token)."""

    base_ppl: float
    """Perplexity of the unquantized model."""
    device_delta: Mapping[int, Mapping[int, float]] = field(default_factory=dict)
    """device bits -> {split ℓ -> Δ log ppl when layers [0, ℓ) use those bits}; interpolated over ℓ."""
    cloud_delta: Mapping[int, Mapping[int, float]] = field(default_factory=dict)
    """cloud bits -> {split ℓ -> Δ log ppl when layers [ℓ, L) use those bits}."""
    kv_delta: Mapping[int, float] = field(default_factory=dict)
    """device KV bits -> Δ log ppl (at the profiled split)."""
    codec_delta: Mapping[str, float] = field(default_factory=dict)
    """codec point name -> Δ log ppl."""
    device_methods: Mapping[int, str] = field(default_factory=dict)
    """device bits -> the weight method device_delta was measured with ("source": the checkpoint's own
    blocks); "rtn" where absent. Plans built from the table use the same method."""

    @classmethod
    def from_dict(cls, q: Mapping[str, Any]) -> "QualityTable":
        """The table from its JSON object (integer keys from their strings)."""
        return from_fields(cls, q)

    @staticmethod
    def _over_split(table: Mapping[int, float], split: int) -> float:
        keys = sorted(table)
        return float(np.interp(split, keys, [table[k] for k in keys]))

    def perplexity(self, split: int, num_layers: int, device_bits: int, cloud_bits: int, kv_bits: int, codec: str) -> float:
        nll = float(np.log(self.base_ppl))
        if device_bits != 16 and split > 0:
            nll += self._over_split(self.device_delta[device_bits], split)
        if cloud_bits != 16 and split < num_layers:
            nll += self._over_split(self.cloud_delta[cloud_bits], split)
        if kv_bits != 16 and split > 0:
            nll += self.kv_delta.get(kv_bits, 0.0)
        if split < num_layers:
            nll += self.codec_delta.get(codec, 0.0)
        return float(np.exp(nll))


@dataclass(frozen=True)
class LinkProfile:
    bandwidth_mbps: float
    """Usable bandwidth, megabits per second (both directions)."""
    rtt_ms: float
    """Round-trip time, milliseconds."""

    def transfer_ms(self, nbytes: float) -> float:
        return nbytes * 8 / (self.bandwidth_mbps * 1e3)


@dataclass(frozen=True)
class MemoryProfile:
    """Bytes the device holds."""

    layer_bytes: Mapping[int, float]
    """weight bits -> bytes of one decoder layer's weights."""
    embed_bytes: float
    """Resident bytes of the embedding-only head after one prefill chunk (the table is mapped, not read)."""
    lm_head_bytes: Mapping[int, float]
    """LM-head bits -> bytes (device-only plans)."""
    kv_bytes_per_token_layer: Mapping[int, float]
    """KV bits -> bytes per position per layer."""
    runtime_bytes: float = 0.0
    """Fixed cost of the runtime (onnxruntime, tokenizer, buffers)."""
    activation_bytes_per_token: float = 0.0
    """Transient activation memory per prefill position."""
    embed_bytes_per_token: float = 0.0
    """Growth of the embedding-only head's resident memory per position (mapped embedding rows it touches)."""
    head_bytes: float | None = None
    """Fixed bytes of a head with layers, beside the runtime: the intercept of the line through heads
    of two depths (None: measured at one depth only, the embedding-only head is the intercept). It
    can be below `embed_bytes`: a small head's peak overlaps the process's start-up peak."""
    head_bytes_per_token: float = 0.0
    """Growth per position of a head with layers that is not per layer (with `head_bytes`)."""
    embed_table_bytes: Mapping[int, float] = field(default_factory=dict)
    """Device weight bits -> bytes of the embedding table as that head maps it (float32 at 16 bits, 8-bit blocks
    otherwise): the embedding's growth with positions (mapped pages the rows touch bring in, with the kernel's
    readahead) stops there. Empty in older profiles: no cap."""

    def device_bytes(self, split: int, bits: int, kv_bits: int, seq: int, kv_layers: int | None = None) -> float:
        """Peak resident bytes of a device process running `split` layers at `bits` to `seq` positions
        (runtime included; activation and LM head not). kv_layers: layers whose K/V the device holds, when
        fewer than `split` (its split moved shallower: it keeps the weights, the cloud took the K/V)."""
        embed_only = self.embed_bytes + min(self.embed_bytes_per_token * seq, self.embed_table_bytes.get(bits if split else 16, math.inf))
        kv_layers = split if kv_layers is None else kv_layers
        layers = split * self.layer_bytes.get(bits, 0.0) + kv_layers * self.kv_bytes_per_token_layer[kv_bits] * seq
        if split and self.head_bytes is not None:
            body = max(embed_only, self.head_bytes + self.head_bytes_per_token * seq + layers)
        else:
            body = embed_only + layers
        return self.runtime_bytes + body


@dataclass(frozen=True)
class Profile:
    model_id: str
    weights_hash: str
    num_layers: int
    hidden_size: int
    device: SideProfile
    cloud: SideProfile
    memory: MemoryProfile
    link: LinkProfile
    codecs: tuple[CodecPoint, ...]
    quality: QualityTable
    max_position: int | None = None
    """Positions the model was trained for: no plan goes past them (None in profiles written before it was recorded)."""

    def __post_init__(self) -> None:
        if not self.codecs:
            raise ConfigError("a profile needs at least one codec point (e.g. fp16)")
        for side in (self.device, self.cloud):
            for name, table in (("decode_ms", side.decode_ms), ("kv_decode_ms", side.kv_decode_ms)):
                for bits, values in table.items():
                    if len(values) != len(side.contexts):
                        raise ConfigError(f"{name}[{bits}] has {len(values)} values for {len(side.contexts)} contexts")

    # -- (de)serialization ---------------------------------------------
    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["version"] = PROFILE_VERSION
        return json.dumps(data, indent=2, sort_keys=True)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "Profile":
        """A Profile from its JSON object; ConfigError naming the missing or malformed field."""
        if not isinstance(raw, Mapping):
            raise ConfigError(f"a profile is a JSON object, got {type(raw).__name__}")
        data = dict(raw)
        if _is_plan(data):
            raise ConfigError(f"this is a plan, not a profile; {_MAKE_PROFILE}")
        if data.pop("version", None) != PROFILE_VERSION:
            raise ConfigError(f"profile version {raw.get('version')!r} is not supported (expected {PROFILE_VERSION})")
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in data]
        if missing:
            raise ConfigError(f"profile has no field {missing[0]!r}")
        hints = get_type_hints(cls)
        values = {}
        for name, value in data.items():
            try:
                values[name] = convert(hints[name], value) if name in hints else value
            except MissingField as exc:
                raise ConfigError(f"profile field {name!r} has no {exc.args[0]!r}") from None
            except (TypeError, ValueError, AttributeError) as exc:
                raise ConfigError(f"profile field {name!r} is malformed ({exc})") from None
        try:
            return cls(**values)
        except TypeError as exc:
            raise ConfigError(f"profile has an unknown field ({exc})") from None

    @classmethod
    def load(cls, path: str | Path) -> "Profile":
        """The profile in the JSON file `path`; ConfigError naming the file and what is wrong with it."""
        from splitlm.partition.plan import read_json_object

        raw = read_json_object(path, "profile", ConfigError)
        if _is_plan(raw):
            raise ConfigError(f"{path} is a plan, not a profile; {_MAKE_PROFILE}")
        try:
            return cls.from_dict(raw)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None


_MAKE_PROFILE = "make a profile with `splitlm profile` (or pass the plan to generate/export/eval --plan)"


def _is_plan(data: Mapping[str, Any]) -> bool:
    return "split_layer" in data and "memory" not in data


# -- a profile in two halves, measured on two machines ---------------------------------------------
PART_VERSION = 1


@dataclass(frozen=True)
class DeviceProfile:
    """The device's half of a profile: what `splitlm profile --device KIT` measured on the device with
    the device install alone (its layers, memory, codec encoder and link)."""

    kit: str
    """The calibration kit's id (Kit.id): the cloud half must come from the same kit."""
    model_id: str
    weights_hash: str
    device: SideProfile
    memory: MemoryProfile
    encode_ms: Mapping[str, tuple[float, float]]
    """Codec point name -> (ms to encode one decode row, ms per position of a prefill chunk) on the device."""
    link: LinkProfile

    kind = "device-profile"


@dataclass(frozen=True)
class CloudProfile:
    """The cloud's half: what `splitlm profile --kit KIT` measured where the cloud runs (its layers and
    the service's own costs, each codec point's size and decoder, the quality table)."""

    kit: str
    model_id: str
    weights_hash: str
    num_layers: int
    hidden_size: int
    cloud: SideProfile
    codecs: tuple[CodecPoint, ...]
    quality: QualityTable
    max_position: int | None = None

    kind = "cloud-profile"


def save_part(part: DeviceProfile | CloudProfile, path: str | Path) -> None:
    data = {"kind": part.kind, "version": PART_VERSION, **dataclasses.asdict(part)}
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def load_part(path: str | Path, raw: Mapping[str, Any]) -> DeviceProfile | CloudProfile:
    cls = {c.kind: c for c in (DeviceProfile, CloudProfile)}[raw["kind"]]
    data = dict(raw)
    data.pop("kind")
    if data.pop("version", None) != PART_VERSION:
        raise ConfigError(f"{path}: {cls.kind} version {raw.get('version')!r} is not supported (expected {PART_VERSION})")
    try:
        return from_fields(cls, data)
    except MissingField as exc:
        raise ConfigError(f"{path}: {cls.kind} has no field {exc.args[0]!r}") from None
    except (TypeError, ValueError, AttributeError) as exc:
        raise ConfigError(f"{path}: {cls.kind} is malformed ({exc})") from None


def merge(device: DeviceProfile, cloud: CloudProfile) -> Profile:
    """One Profile from a device half and a cloud half of the same kit: the codec points' sizes and
    decoders from the cloud, their encoders from the device."""
    if (device.model_id, device.weights_hash) != (cloud.model_id, cloud.weights_hash):
        raise ConfigError(f"the device profile is of {device.model_id} ({device.weights_hash[:12]}), the cloud profile "
                          f"of {cloud.model_id} ({cloud.weights_hash[:12]}): profile one model on both sides")
    if device.kit != cloud.kit:
        raise ConfigError(f"the device profile was measured on kit {device.kit}, the cloud profile wrote kit {cloud.kit}: "
                          "run `splitlm profile --device` on the kit that the cloud profile wrote")
    missing = [c.name for c in cloud.codecs if c.name not in device.encode_ms]
    if missing:
        raise ConfigError(f"the device profile has no encoder timing of codec point {missing[0]!r}")
    codecs = tuple(dataclasses.replace(c, encode_ms=device.encode_ms[c.name][0],
                                       prefill_encode_ms_per_token=device.encode_ms[c.name][1]) for c in cloud.codecs)
    return Profile(cloud.model_id, cloud.weights_hash, cloud.num_layers, cloud.hidden_size, device.device, cloud.cloud,
                   device.memory, device.link, codecs, cloud.quality, cloud.max_position)


def load_profiles(paths: list[str | Path]) -> Profile:
    """A Profile from one profile file, or from a device profile and a cloud profile (in either order),
    merged; ConfigError saying what is missing."""
    from splitlm.partition.plan import read_json_object

    raws = [(p, read_json_object(p, "profile", ConfigError)) for p in paths]
    parts = [(p, raw) for p, raw in raws if raw.get("kind") in (DeviceProfile.kind, CloudProfile.kind)]
    if not parts:
        if len(paths) != 1:
            raise ConfigError(f"give one profile, or a device profile and a cloud profile to merge; got {len(paths)} profiles")
        return Profile.load(paths[0])
    kinds = sorted(raw["kind"] for _, raw in parts)
    if len(raws) != 2 or kinds != ["cloud-profile", "device-profile"]:
        have = ", ".join(f"{p} ({raw.get('kind', 'profile')})" for p, raw in raws)
        raise ConfigError(f"a split profile is a device profile (`splitlm profile --device KIT`) and a cloud profile "
                          f"(`splitlm profile --kit KIT`) given together; got {have}")
    halves = {raw["kind"]: load_part(p, raw) for p, raw in parts}
    return merge(halves["device-profile"], halves["cloud-profile"])
