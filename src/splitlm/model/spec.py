"""ModelSpec: the one typed description of a Llama-family model (torch-free)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

from splitlm.errors import ConfigError

SPEC_VERSION = 1

RopeKind = Literal["default", "linear", "dynamic", "llama3", "yarn"]
ROPE_KINDS: tuple[str, ...] = ("default", "linear", "dynamic", "llama3", "yarn")

# Hugging Face `architectures` / GGUF `general.architecture` values we run.
ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
}


@dataclass(frozen=True)
class RopeScaling:
    """Rotary embedding frequency scaling, as in Hugging Face `rope_scaling`."""

    kind: RopeKind = "default"
    """Which scaling rule: one of ROPE_KINDS."""
    factor: float = 1.0
    """Context extension factor (linear, dynamic, llama3, yarn)."""
    original_max_position: int | None = None
    """Context length the base model was trained for (llama3, yarn, dynamic)."""
    low_freq_factor: float = 1.0
    """llama3: wavelengths above original_max_position / low_freq_factor are scaled fully."""
    high_freq_factor: float = 4.0
    """llama3: wavelengths below original_max_position / high_freq_factor are kept."""
    beta_fast: float = 32.0
    """yarn: rotations at which interpolation starts to ramp."""
    beta_slow: float = 1.0
    """yarn: rotations at which interpolation is complete."""
    attention_factor: float | None = None
    """yarn: multiplier of cos/sin; None means 0.1·ln(factor) + 1."""

    def __post_init__(self) -> None:
        if self.kind not in ROPE_KINDS:
            raise ConfigError(f"rope scaling kind {self.kind!r} is not supported; use one of {ROPE_KINDS}")
        if not self.factor > 0:
            raise ConfigError(f"rope scaling factor must be > 0, got {self.factor}")
        if self.kind in ("llama3", "yarn") and self.original_max_position is None:
            raise ConfigError(f"rope scaling {self.kind!r} needs original_max_position_embeddings")

    @classmethod
    def from_hf(cls, raw: Mapping[str, Any] | None) -> "RopeScaling":
        """Read a Hugging Face `rope_scaling` (or v5 `rope_parameters`) dict."""
        if not raw:
            return cls()
        kind = raw.get("rope_type", raw.get("type", "default"))
        if kind not in ROPE_KINDS:
            raise ConfigError(f"rope scaling type {kind!r} is not supported; use one of {ROPE_KINDS}")
        if kind == "default":
            return cls()
        orig = raw.get("original_max_position_embeddings")
        return cls(
            kind=kind,
            factor=float(raw.get("factor", 1.0)),
            original_max_position=int(orig) if orig is not None else None,
            low_freq_factor=float(raw.get("low_freq_factor", 1.0)),
            high_freq_factor=float(raw.get("high_freq_factor", 4.0)),
            beta_fast=float(raw.get("beta_fast", 32.0)),
            beta_slow=float(raw.get("beta_slow", 1.0)),
            attention_factor=(float(raw["attention_factor"]) if raw.get("attention_factor") is not None else None),
        )


@dataclass(frozen=True)
class ModelSpec:
    """Shape and hyper-parameters of a decoder-only Llama-family model."""

    architecture: str
    """Family name: 'llama', 'mistral' or 'qwen2'."""
    vocab_size: int
    """Rows of the embedding matrix."""
    hidden_size: int
    """Width d of the residual stream (the activations that cross the split)."""
    intermediate_size: int
    """Width of the SwiGLU MLP."""
    num_layers: int
    """Number of decoder blocks L."""
    num_heads: int
    """Query heads."""
    num_kv_heads: int
    """Key/value heads (GQA when fewer than num_heads)."""
    head_dim: int
    """Width of one head."""
    rms_norm_eps: float = 1e-5
    """Epsilon of every RMSNorm."""
    rope_theta: float = 10000.0
    """Rotary base."""
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    """Rotary frequency scaling."""
    max_position: int = 2048
    """Longest context the model was trained for."""
    tie_word_embeddings: bool = False
    """LM head shares the embedding matrix."""
    qkv_bias: bool = False
    """q/k/v projections carry a bias (Qwen2)."""
    o_bias: bool = False
    """The attention output projection carries a bias."""
    mlp_bias: bool = False
    """The MLP projections carry biases."""
    bos_token_id: int | None = None
    """Beginning-of-sequence token, if any."""
    eos_token_ids: tuple[int, ...] = ()
    """Tokens that end generation."""

    def __post_init__(self) -> None:
        if self.architecture not in set(ARCHITECTURES.values()):
            raise ConfigError(
                f"architecture {self.architecture!r} is not supported; use one of {sorted(set(ARCHITECTURES.values()))}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"model spec field {name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")

    # -- derived sizes -------------------------------------------------
    def kv_bytes_per_token(self, layers: int, bits: int = 16) -> float:
        """Bytes of K and V cache one position costs across `layers` layers at `bits`."""
        return 2 * layers * self.num_kv_heads * self.head_dim * bits / 8

    # -- (de)serialization ---------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict with a format version."""
        data = dataclasses.asdict(self)
        data["eos_token_ids"] = list(self.eos_token_ids)
        data["version"] = SPEC_VERSION
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelSpec":
        """Inverse of to_dict; rejects an unknown version or field."""
        data = dict(data)
        version = data.pop("version", None)
        if version != SPEC_VERSION:
            raise ConfigError(f"model spec version {version!r} is not supported (expected {SPEC_VERSION})")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown model spec fields {sorted(unknown)}")
        data["rope_scaling"] = RopeScaling(**data.get("rope_scaling", {}))
        data["eos_token_ids"] = tuple(data.get("eos_token_ids", ()))
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, indent=2)

    @classmethod
    def from_json(cls, text: str) -> "ModelSpec":
        return cls.from_dict(json.loads(text))

    @property
    def hash(self) -> str:
        """sha256 of the canonical JSON, first 16 hex digits."""
        canon = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canon.encode()).hexdigest()[:16]

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any]) -> "ModelSpec":
        """Read a Hugging Face `config.json` dict (Llama, Mistral, Qwen2)."""
        archs = config.get("architectures") or [config.get("model_type", "")]
        family = next((ARCHITECTURES[a] for a in archs if a in ARCHITECTURES), None)
        if family is None:
            family = ARCHITECTURES.get(config.get("model_type", ""))
        if family is None:
            raise ConfigError(
                f"model architecture {archs} is not supported; splitlm runs {sorted(ARCHITECTURES)}"
            )
        try:
            hidden = int(config["hidden_size"])
            heads = int(config["num_attention_heads"])
            rope_params = config.get("rope_parameters") or {}
            rope_raw = config.get("rope_scaling") or (rope_params if rope_params.get("rope_type", "default") != "default" else None)
            theta = config.get("rope_theta", rope_params.get("rope_theta", 10000.0))
            eos = config.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
            return cls(
                architecture=family,
                vocab_size=int(config["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(config["intermediate_size"]),
                num_layers=int(config["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(config.get("num_key_value_heads") or heads),
                head_dim=int(config.get("head_dim") or hidden // heads),
                rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
                rope_theta=float(theta),
                rope_scaling=RopeScaling.from_hf(rope_raw),
                max_position=int(config.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
                qkv_bias=bool(config.get("attention_bias", family == "qwen2")),
                o_bias=bool(config.get("attention_bias", False)) and family != "qwen2",
                mlp_bias=bool(config.get("mlp_bias", False)),
                bos_token_id=config.get("bos_token_id"),
                eos_token_ids=tuple(int(e) for e in eos_ids),
            )
        except KeyError as exc:
            raise ConfigError(f"config.json lacks the field {exc.args[0]!r}") from None
