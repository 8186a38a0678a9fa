"""What a profile measures (`ProfileConfig`) and what every phase shares (`Bench`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from splitlm import evaluate
from splitlm.errors import ConfigError
from splitlm.model.checkpoint import Checkpoint
from splitlm.model.spec import ModelSpec
from splitlm.partition.plan import Plan
from splitlm.quantize.config import DEFAULT_GROUP, KV_BITS, LM_HEAD_BITS, WEIGHT_BITS, CodecConfig, WeightQuant

CODEC_POINTS: dict[str, CodecConfig] = {
    "fp16": CodecConfig("fp16"),
    "tabq eps=0.02": CodecConfig("tabq", error_budget=0.02),
    "tabq eps=0.035": CodecConfig("tabq", error_budget=0.035),
    "tabq eps=0.05": CodecConfig("tabq", error_budget=0.05),
}
SHORT_PREFILL = 16
"""The small prefill call that, with the plan's chunk, gives each layer's fixed and per-token prefill cost."""


@dataclasses.dataclass(frozen=True)
class ProfileConfig:
    """What `measure_profile` measures, and how hard."""

    bits: tuple[int, ...] = (16, 8, 4)
    """Weight precisions timed on both sides (and priced in the quality table)."""
    kv_bits: tuple[int, ...] = (16, 8, 4)
    """Device KV cache precisions (16 is always measured: the reference the others are priced against)."""
    contexts: tuple[int, ...] = (128, 512, 1024)
    """Contexts at which a decode step is timed."""
    probe_layers: int = 4
    """Layers of the device heads that are timed (per-layer cost: the difference to an embedding-only head)."""
    prefill: int = 128
    """The plan's prefill chunk: the longer of the two prefill calls timed (the shorter is SHORT_PREFILL)."""
    cloud_probe_layers: int | None = None
    """Layers of the cloud stages that are timed (default twice probe_layers)."""
    memory_positions: int = 1024
    """The longer of the two sequence lengths at which device memory is measured."""
    quality_windows: int = 2
    """Calibration windows the quality table is measured on."""
    threads: int | None = None
    """onnxruntime threads (None: all cores)."""
    reps: int = 7
    """Timing repetitions (the median is kept)."""
    server: str | None = None
    """HOST:PORT of a running `splitlm serve`: the link's RTT is probed against it (else the given link's is kept)."""
    lm_head_bits: tuple[int, ...] = (16, 8)
    """Device LM head precisions (device-only plans)."""

    def __post_init__(self) -> None:
        for name, values, allowed in (("bits", self.bits, WEIGHT_BITS), ("kv_bits", self.kv_bits, KV_BITS),
                                      ("lm_head_bits", self.lm_head_bits, LM_HEAD_BITS)):
            if not values or not set(values) <= set(allowed):
                raise ConfigError(f"ProfileConfig.{name} {values!r}: give one or more of {allowed}")
        if not self.contexts or min(self.contexts) < 1:
            raise ConfigError(f"ProfileConfig.contexts {self.contexts!r}: give one or more positive contexts")
        if self.prefill <= SHORT_PREFILL:
            raise ConfigError(f"ProfileConfig.prefill {self.prefill}: must be > {SHORT_PREFILL} (the short prefill timed beside it)")
        for name in ("probe_layers", "cloud_probe_layers", "memory_positions", "quality_windows", "threads", "reps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"ProfileConfig.{name} must be >= 1, got {value}")


@dataclasses.dataclass(frozen=True)
class Bench:
    """What every phase of one profile shares: the model, the config, calibration text, a scratch
    directory and the plan that every probe head is exported from."""

    ckpt: Checkpoint
    config: ProfileConfig
    tmp: Path
    """Scratch directory for exports (removed when the profile is done)."""
    windows: list[list[int]]
    """Calibration windows (the quality table uses the last `quality_windows`)."""
    text: list[int]
    """The windows' token ids, concatenated: what the probes are driven with."""
    n: int
    """Layers of the device probe heads: probe_layers, at most the model's."""
    lo: int
    """The shorter sequence length at which memory is measured (just past one prefill chunk)."""
    hi: int
    """The longer one."""
    base_plan: Plan
    """Split at 0, fp16 codec, long enough for every probe: the probe heads are this plan, replaced."""

    @property
    def spec(self) -> ModelSpec:
        return self.ckpt.spec

    @property
    def layers(self) -> int:
        return self.ckpt.spec.num_layers

    @property
    def sizes(self) -> tuple[int, int]:
        """The two prefill calls timed: SHORT_PREFILL and the plan's chunk."""
        return (SHORT_PREFILL, self.config.prefill)

    def probe_plan(self, split: int, bits: int, **changes) -> Plan:
        """The base plan split at `split` with device weights at `bits` (cloud weights and the rest in `changes`)."""
        from splitlm.quantize.apply import preferred_method

        method = preferred_method(self.ckpt, bits)
        return self.base_plan.replace(split_layer=split, device_weights=WeightQuant(bits, DEFAULT_GROUP, method), **changes)


def prepare(ckpt: Checkpoint, config: ProfileConfig, tmp: Path) -> Bench:
    """The calibration text, probe sizes and base plan of a profile of `ckpt`."""
    c = config
    tok = ckpt.tokenizer()
    windows = evaluate.calibration_windows(tok, max(2, c.quality_windows, -(-(max(c.contexts) + 2 * c.reps + 16) // evaluate.WINDOW)))
    lo, hi = c.prefill + 1, max(c.memory_positions, c.prefill + 2)
    base_plan = Plan(ckpt.model_id, ckpt.weights_hash, 0, codec=CodecConfig("fp16"),
                     max_seq_len=max(hi, max(c.contexts) + 2 * c.reps + 16) + 8, prefill_chunk=c.prefill)
    return Bench(ckpt, config, tmp, windows, [t for w in windows for t in w], min(c.probe_layers, ckpt.spec.num_layers),
                 lo, hi, base_plan)
