"""The cloud phases: tail stages per weight precision and the final norm + LM head, timed in torch;
and the activation codec's points, encoded and decoded on real activations."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from splitlm.partition.plan import Plan
from splitlm.partition.profile import CodecPoint, SideProfile
from splitlm.profiler.config import CODEC_POINTS, Bench
from splitlm.profiler.timing import line, median_ms, time_cloud_stage
from splitlm.quantize import codec as codec_mod
from splitlm.quantize.config import DEFAULT_GROUP, CodecConfig, WeightQuant


@dataclasses.dataclass(frozen=True)
class CloudWeights:
    """Per-layer costs of the cloud's layers at one weight precision."""

    decode_ms: tuple[float, ...]
    """A layer's decode step at each context."""
    prefill_fixed_ms: float
    """A layer's fixed cost per prefill call."""
    prefill_ms_per_token: float
    """A layer's prefill cost per token."""


def cloud_probe_layers(bench: Bench) -> int:
    """Layers of the timed cloud stages: twice the device's probe by default, as a 4-layer stage
    times ~20 % faster per layer than 8 or 15 (SmolLM2, CPU)."""
    c = bench.config
    return min(bench.layers, c.cloud_probe_layers or 2 * c.probe_layers)


def measure_cloud_weights(bench: Bench, bits: int) -> CloudWeights:
    """A tail stage of cloud_probe_layers layers at `bits` weights, timed, per layer."""
    from splitlm.model.load import build_stage
    from splitlm.quantize.apply import quantize_stage

    c, L, m = bench.config, bench.layers, cloud_probe_layers(bench)
    stage = quantize_stage(build_stage(bench.ckpt, L - m, L, embed=False, final=False), WeightQuant(bits, DEFAULT_GROUP),
                           progress=False)
    dec, pre = time_cloud_stage(stage, bench.spec, c.contexts, bench.sizes, c.reps)
    short, chunk = bench.sizes
    fixed, per_token = line(short, pre[short] / m, chunk, pre[chunk] / m)
    return CloudWeights(tuple(d / m for d in dec), fixed, per_token)


def measure_cloud_head(bench: Bench) -> float:
    """ms of the cloud's final norm + 16-bit LM head on one position."""
    from splitlm.model.load import build_stage
    from splitlm.quantize.apply import quantize_lm_head

    L = bench.layers
    with torch.inference_mode():
        final = quantize_lm_head(build_stage(bench.ckpt, L, L, embed=False, final=True), 16)
        x = torch.randn(1, 1, bench.spec.hidden_size)
        return median_ms(lambda: final(x), bench.config.reps)


def _codec_point(name: str, cfg: CodecConfig, h: np.ndarray, chunk: int, reps: int) -> CodecPoint:
    """One codec point on activations `h` (T, hidden): a position's frame size and encode/decode ms,
    and per position of a prefill chunk."""
    frames = [codec_mod.encode(h[i:i + 1], cfg) for i in range(64)]
    enc = median_ms(lambda: codec_mod.encode(h[:1], cfg), reps)
    dec = median_ms(lambda: codec_mod.decode(frames[0], "torch"), reps)
    rows = h[:chunk]
    rows_frame = codec_mod.encode(rows, cfg)
    enc_chunk = median_ms(lambda: codec_mod.encode(rows, cfg), max(1, reps // 2)) / len(rows)
    dec_chunk = median_ms(lambda: codec_mod.decode(rows_frame, "torch"), max(1, reps // 2)) / len(rows)
    return CodecPoint(name, float(np.mean([len(f) for f in frames])), enc, dec, cfg.kind, cfg.error_budget, enc_chunk, dec_chunk)


def measure_codecs(bench: Bench) -> tuple[CodecPoint, ...]:
    """Each of CODEC_POINTS on real activations at the middle layer (the first, fp16, is the reference)."""
    from splitlm.stages import build_stages

    ckpt, L = bench.ckpt, bench.layers
    mid, _ = build_stages(ckpt, Plan(ckpt.model_id, ckpt.weights_hash, L // 2), tail=False)
    with torch.inference_mode():
        h = mid(torch.tensor([bench.text[:256]]))[0].numpy()  # (T, hidden)
    return tuple(_codec_point(name, cfg, h, bench.config.prefill, bench.config.reps) for name, cfg in CODEC_POINTS.items())


def cloud_side(bench: Bench, weights: dict[int, CloudWeights], head_ms: float) -> SideProfile:
    """The cloud's costs as the layers timed alone give them (the service-overhead phase scales them)."""
    return SideProfile(bench.config.contexts, {b: w.decode_ms for b, w in weights.items()},
                       {b: w.prefill_ms_per_token for b, w in weights.items()}, head_ms={16: head_ms},
                       prefill_fixed_ms={b: w.prefill_fixed_ms for b, w in weights.items()})
