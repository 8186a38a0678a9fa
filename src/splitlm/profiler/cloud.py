"""The cloud phases: tail stages per weight precision and the final norm + LM head, timed in torch;
and the activation codec's points, encoded and decoded on real activations."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
import torch

from splitlm.model.spec import ModelSpec
from splitlm.partition.profile import CloudProfile, CodecPoint, SideProfile
from splitlm.profiler.calibration import calibrate_cloud
from splitlm.profiler.config import Bench
from splitlm.profiler.kit import CODEC_POINTS, MEASURED_ROWS, Kit, codec_basis
from splitlm.profiler.quality import cached_quality
from splitlm.profiler.report import Report
from splitlm.profiler.timing import line, median_ms
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


def time_cloud_stage(stage: torch.nn.Module, spec: ModelSpec, contexts: Sequence[int], sizes: Sequence[int],
                     reps: int) -> tuple[list[float], dict[int, float]]:
    """Decode ms at each context, prefill ms for each chunk size, of one torch stage on random hidden states."""
    from splitlm.model.llama import KVCache

    decode = []
    with torch.inference_mode():
        for ctx in contexts:
            cache = KVCache()
            stage(torch.randn(1, ctx, spec.hidden_size), cache=cache)
            x = torch.randn(1, 1, spec.hidden_size)

            def step():
                stage(x, cache=cache, last_only=True)
                cache.crop(ctx)
            decode.append(median_ms(step, reps))
        inputs = {t: torch.randn(1, t, spec.hidden_size) for t in sizes}
        prefill = {t: median_ms(lambda: stage(inputs[t], last_only=True), reps) for t in sizes}
    return decode, prefill


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


def _codec_point(name: str, cfg: CodecConfig, acts: np.ndarray, chunk: int, reps: int) -> CodecPoint:
    """One codec point on the kit's activations (N, hidden): a decode step's frame size (one position, header
    included) and encode/decode ms, and per position of a prefill chunk."""
    basis = codec_basis(acts, cfg)
    h = acts[:MEASURED_ROWS]
    one = codec_mod.encode(h[:1], cfg, "numpy", basis)
    enc = median_ms(lambda: codec_mod.encode(h[:1], cfg, "numpy", basis), reps)
    dec = median_ms(lambda: codec_mod.decode(one, "torch", bases=basis), reps)
    rows = h[:chunk]
    rows_frame = codec_mod.encode(rows, cfg, "numpy", basis)
    size = np.mean([len(codec_mod.encode(h[i:i + 1], cfg, "numpy", basis)) for i in range(64)])
    enc_chunk = median_ms(lambda: codec_mod.encode(rows, cfg, "numpy", basis), max(1, reps // 2)) / len(rows)
    dec_chunk = median_ms(lambda: codec_mod.decode(rows_frame, "torch", bases=basis), max(1, reps // 2)) / len(rows)
    return CodecPoint(name, float(size), enc, dec, cfg.kind, cfg.error_budget, enc_chunk, dec_chunk, cfg.coder if cfg.kind == "tabq" else "none")


def measure_codecs(kit: Kit) -> tuple[CodecPoint, ...]:
    """Each of CODEC_POINTS on the kit's real activations at the middle layer (the first, fp16, is the reference)."""
    h = kit.activations
    return tuple(_codec_point(name, cfg, h, kit.prefill, kit.reps) for name, cfg in CODEC_POINTS.items())


def cloud_side(bench: Bench, weights: dict[int, CloudWeights], head_ms: float) -> SideProfile:
    """The cloud's costs as the layers timed alone give them (the service-overhead phase scales them)."""
    return SideProfile(bench.config.contexts, {b: w.decode_ms for b, w in weights.items()},
                       {b: w.prefill_ms_per_token for b, w in weights.items()}, head_ms={16: head_ms},
                       prefill_fixed_ms={b: w.prefill_fixed_ms for b, w in weights.items()})


def measure_cloud(bench: Bench, kit: Kit, report: Report) -> CloudProfile:
    """The cloud's half of a profile: its layers timed, fitted to real split sessions over loopback
    against the kit's calibration exports; the codec points; the quality table (cached)."""
    c = bench.config
    weights = {b: report.run(f"cloud W{b}", lambda: measure_cloud_weights(bench, b)) for b in c.bits}
    head = measure_cloud_head(bench)
    codecs = report.run("codec", lambda: measure_codecs(kit))
    side = report.run("cloud calibration", lambda: calibrate_cloud(bench, kit, cloud_side(bench, weights, head), codecs[0]))
    quality = report.run("quality", lambda: cached_quality(bench.ckpt, bench.windows[-c.quality_windows:], c.bits, c.kv_bits,
                                                           report.progress))
    spec = bench.spec
    return CloudProfile(kit.id, bench.ckpt.model_id, bench.ckpt.weights_hash, spec.num_layers, spec.hidden_size, side, codecs,
                        quality, spec.max_position)


def cloud_steps(bench: Bench) -> int:
    """The progress bar's steps of measure_cloud."""
    return 3 + len(bench.config.bits)
