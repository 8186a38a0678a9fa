"""What quantization can be asked for, torch-free: the weight methods, the allowed
values, and the configs a Plan composes (`WeightQuant`, `CodecConfig`).

Every list of allowed values is derived from one `Literal`, so a help text, a
plan check and a test read the same source.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, get_args

from splitlm.errors import PlanError

WeightBits = Literal[16, 8, 4, 3, 2]
WEIGHT_BITS: tuple[int, ...] = get_args(WeightBits)
"""Weight precisions a segment may use; 16 means unquantized."""
GroupSize = Literal[32, 64, 128, -1]
GROUP_SIZES: tuple[int, ...] = get_args(GroupSize)
"""Quantization group sizes along the input dimension; -1 means one group per output channel."""
DEFAULT_GROUP = 32
"""The group size the partitioner and the demo quantize with: the smallest, the most accurate."""
KvBits = Literal[16, 8, 4]
KV_BITS: tuple[int, ...] = get_args(KvBits)
"""Device KV cache precisions."""
LmHeadBits = Literal[16, 8, 4]
LM_HEAD_BITS: tuple[int, ...] = get_args(LmHeadBits)
"""LM head precisions (16 = as loaded; 8 and 4 are RTN in groups of LM_HEAD_GROUP)."""
LM_HEAD_GROUP = 32
"""Group size of a quantized LM head."""
EMBED_BITS = 8
"""A quantized head's embedding table: RTN at this width in groups of LM_HEAD_GROUP (or the source's own blocks)."""
AccuracyLevel = Literal[0, 1, 2, 3, 4]
ACCURACY_LEVELS: tuple[int, ...] = get_args(AccuracyLevel)
"""onnxruntime MatMulNBits accuracy_level values (the compute type of a quantized matmul: 0 = as the input, 4 = int8)."""
ACCURACY_LEVEL = 4
"""The MatMulNBits accuracy_level exports use. 4 quantizes activations to int8 inside the matmul: onnxruntime's
fast CPU path (8x faster int4 decode than level 0 on SmolLM2, bench/device.py). 0 computes in fp32
and matches the torch head to 1e-6."""
CodecKind = Literal["fp32", "fp16", "tabq"]
CODEC_KINDS: tuple[str, ...] = get_args(CodecKind)
TsRule = Literal["none", "std", "channels"]
TS_RULES: tuple[str, ...] = get_args(TsRule)
CodecBits = Literal[2, 3, 4, 5, 6, 8]
CODEC_BITS: tuple[int, ...] = get_args(CodecBits)


@dataclass(frozen=True)
class MethodInfo:
    name: str
    """What a Plan's `method` field holds."""
    description: str
    """One line for help texts."""
    needs_calibration: bool
    """Whether the method reads calibration text."""


WEIGHT_METHODS: dict[str, MethodInfo] = {
    m.name: m for m in (
        MethodInfo("rtn", "group-wise round-to-nearest", needs_calibration=False),
        MethodInfo("gptq", "GPTQ: Hessian-aware error feedback from calibration text", needs_calibration=True),
        MethodInfo("source", "the source file's own blocks (GGUF Q4_0, Q4_1, Q8_0), carried exactly", needs_calibration=False),
    )
}
"""The weight quantization methods; `quantize.apply.IMPLEMENTATIONS` holds one function per key
that quantizes a matrix, and `quantize.apply.apply_source` carries the source's blocks."""
SOURCE_GROUP = 32
"""The block length of the source formats we carry: a "source" WeightQuant has this group size."""


@dataclass(frozen=True)
class WeightQuant:
    """Weight quantization of one side of the split."""

    bits: int = 16
    """Bits per weight: one of WEIGHT_BITS (16 = unquantized)."""
    group_size: int = 128
    """Weights per scale along the input dimension: one of GROUP_SIZES (-1 = per channel)."""
    method: str = "rtn"
    """Quantization method: a key of WEIGHT_METHODS."""
    symmetric: bool = False
    """Symmetric (scale only) instead of asymmetric (scale + zero point)."""

    def __post_init__(self) -> None:
        if self.bits not in WEIGHT_BITS:
            raise PlanError(f"weight bits {self.bits!r} not in {WEIGHT_BITS}")
        if self.group_size not in GROUP_SIZES:
            raise PlanError(f"weight group size {self.group_size!r} not in {GROUP_SIZES}")
        if self.method not in WEIGHT_METHODS:
            raise PlanError(f"weight method {self.method!r} not in {sorted(WEIGHT_METHODS)}")
        if self.method == "source" and (self.group_size != SOURCE_GROUP or self.symmetric):
            raise PlanError(f"weight method 'source' carries the source's blocks of {SOURCE_GROUP} as they are: "
                            f"group_size must be {SOURCE_GROUP} and symmetric false (got {self.group_size}, {self.symmetric})")


ENTROPY_CODERS = ("none", "ans")
"""How tabq rows travel: fixed-width codes, or transform-coded with ANS (CodecConfig.entropy)."""


@dataclass(frozen=True)
class CodecConfig:
    """Activation codec at the split (DESIGN.md §4)."""

    kind: CodecKind = "fp16"
    """fp32/fp16: raw rows; tabq: threshold splitting + token-wise adaptive bits."""
    ts_rule: TsRule = "std"
    """Outlier rule: none, |x| > threshold·std of the row, or a calibrated channel set."""
    ts_threshold: float = 4.0
    """k of the std rule."""
    ts_channels: tuple[int, ...] = ()
    """Channels always sent exactly under the 'channels' rule."""
    error_budget: float = 0.03
    """ε: per row, ‖x − x̂‖² (all channels) must stay under ε·‖x_inliers‖², which bounds ‖x − x̂‖²/‖x‖² by ε."""
    bit_widths: tuple[int, ...] = CODEC_BITS
    """Bit widths TAB-Q may pick from, ascending."""
    group_size: int = 0
    """Channels per scale/zero point; 0 = one per row."""
    rotate_block: int = 64
    """Walsh-Hadamard rotation of the inliers in blocks of this many channels (power of two; 0 = off)."""
    clip_ratios: tuple[float, ...] = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55)
    """Range shrink factors tried per row and group; the one with the least error is kept."""
    entropy: str | None = None
    """tabq only. "ans" (tabq's default, None): transform coding (quantize/ans.py) — rows centred and rotated into
    the split layer's calibrated basis (shipped with the export), one uniform step per row that meets ε, ANS under
    per-component Laplace models; the TS/TAB-Q fields above do not apply to it and must keep their defaults.
    "none": rows of fixed-width codes as above (TS + TAB-Q)."""
    deadzone: float = 0.2
    """entropy "ans": magnitudes round toward zero unless their fraction passes ½ + this (0 = plain rounding)."""

    def __post_init__(self) -> None:
        if self.rotate_block < 0 or (self.rotate_block & (self.rotate_block - 1)):
            raise PlanError(f"codec rotate_block must be 0 or a power of two, got {self.rotate_block}")
        if not self.clip_ratios or any(not 0 < c <= 1 for c in self.clip_ratios):
            raise PlanError(f"codec clip ratios {self.clip_ratios!r} must be non-empty and in (0, 1]")
        if self.kind not in CODEC_KINDS:
            raise PlanError(f"codec kind {self.kind!r} not in {CODEC_KINDS}")
        if self.ts_rule not in TS_RULES:
            raise PlanError(f"threshold-splitting rule {self.ts_rule!r} not in {TS_RULES}")
        if not self.ts_threshold > 0:
            raise PlanError(f"ts_threshold must be > 0, got {self.ts_threshold}")
        if not self.error_budget > 0:
            raise PlanError(f"codec error budget must be > 0, got {self.error_budget}")
        if not self.bit_widths or any(b not in CODEC_BITS for b in self.bit_widths):
            raise PlanError(f"codec bit widths {self.bit_widths!r} must be a non-empty subset of {CODEC_BITS}")
        if tuple(sorted(set(self.bit_widths))) != tuple(self.bit_widths):
            raise PlanError(f"codec bit widths {self.bit_widths!r} must be ascending and distinct")
        if self.group_size < 0:
            raise PlanError(f"codec group size must be >= 0, got {self.group_size}")
        if self.entropy is not None and self.entropy not in ENTROPY_CODERS:
            raise PlanError(f"codec entropy {self.entropy!r} not in {ENTROPY_CODERS}")
        if not 0.0 <= self.deadzone < 0.5:
            raise PlanError(f"codec deadzone must be in [0, 0.5), got {self.deadzone}")
        if self.kind != "tabq" and self.entropy is not None:
            raise PlanError(f"codec entropy applies to tabq rows; kind {self.kind!r} sends raw values")
        if self.coder == "ans":
            changed = [f.name for f in dataclasses.fields(self) if f.name in ("ts_rule", "ts_threshold", "ts_channels",
                       "bit_widths", "group_size", "rotate_block", "clip_ratios") and getattr(self, f.name) != f.default]
            if changed:
                raise PlanError(f"codec field(s) {', '.join(changed)} do not apply to entropy 'ans' (it codes rows in "
                                "the split layer's calibrated basis): leave them at their defaults")
        elif self.deadzone != 0.2:
            raise PlanError("codec deadzone applies to entropy 'ans' only")

    @property
    def coder(self) -> str:
        """How the rows travel: "ans" (tabq's default), "none" (fixed-width tabq codes), or the raw kind's name."""
        if self.kind != "tabq":
            return self.kind
        return self.entropy or "ans"


MOVE_CODERS = ("ans", "exact", "recompute")
"""How K/V travel when a session moves its split (MoveCodec.coder)."""


@dataclass(frozen=True)
class MoveCodec:
    """How the K/V of the layers that change sides travel when a session moves its split (DESIGN.md §6)."""

    coder: str = "ans"
    """"ans" (the default): the K/V codec (quantize/kv_codec.py), per-channel steps and ANS, each payload one
    layer's keys or values for a group of positions. "exact": float32 values, or a quantized device cache's own
    codes, as they lie. "recompute": a shallower move sends no K/V but the hidden states entering the new split
    (float32, one row per position: the device keeps them as it computes them) and the cloud recomputes the K/V
    of the layers it takes by running them over those rows, so the moved K/V are what the cloud's own weights
    give for the same inputs; 4·hidden bytes per position whatever the layers moved (SmolLM2: 2,304, against
    1,536 per layer for float32 K/V and 387 for 8-bit codes), so it pays from two layers moved against float32 K/V.
    A deeper move, and a shallower one to a cut the head has not run since the session began (it moved back
    deeper past it), carry K/V as "exact" does (float32, or a quantized device cache's codes). The cloud
    recomputes between turns: other sessions wait for it. The device keeps the rows at every cut up to its split:
    4·hidden bytes per position per cut."""
    key_error: float = 0.05
    """ans: τ, each key channel adds about τ²/head_dim to the variance of an attention logit (steps from the
    query energies calibrated at export)."""
    value_error: float = 0.002
    """ans: ε, each value channel's squared error is about ε times its variance over the group.

    The defaults are the point whose moves changed no greedy token (SmolLM2, 64 tokens after a move of 18
    layers, 5 prompts; 8-bit codes changed 2 of them) at 5.1 bits per element: 1.57x smaller than 8-bit codes,
    6.2x smaller than float32, +0.02 % perplexity. τ 0.15 and ε 0.01 are 2.13x smaller than 8-bit codes at
    +0.18 %, but changed every prompt's greedy output within 37 tokens (bench/kv_wire.py)."""

    def __post_init__(self) -> None:
        if self.coder not in MOVE_CODERS:
            raise PlanError(f"move codec {self.coder!r} not in {MOVE_CODERS}")
        if not 0 < self.key_error < 10:
            raise PlanError(f"move codec key_error must be in (0, 10), got {self.key_error}")
        if not 0 < self.value_error < 1:
            raise PlanError(f"move codec value_error must be in (0, 1), got {self.value_error}")
        defaults = tuple(f.default for f in dataclasses.fields(self) if f.name in ("key_error", "value_error"))
        if self.coder != "ans" and (self.key_error, self.value_error) != defaults:
            raise PlanError("move codec key_error and value_error apply to coder 'ans' only")
