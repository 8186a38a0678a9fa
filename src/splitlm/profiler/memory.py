"""Device memory: the surface M(l, s) fitted through heads of two depths at two lengths, and the
MemoryProfile drawn from every phase's peak RSS."""

from __future__ import annotations

import dataclasses

from splitlm.partition.profile import MemoryProfile
from splitlm.profiler.calibration import calibration_root
from splitlm.profiler.config import Bench
from splitlm.profiler.device import DeviceWeights, EmbeddingHead, KVHead, LMHead
from splitlm.profiler.probes import measure_peak_rss


def fit_memory(n: int, d: int, lo: int, hi: int, shallow: list[float], deep: list[float], runtime: float) -> dict[str, float]:
    """Peak RSS of heads of n and d layers at lo and hi positions -> M(l, s) = runtime + fixed +
    per_token * s + l * (layer + kv * s): the bilinear surface through the four points."""
    slope_lo, slope_hi = (deep[0] - shallow[0]) / (d - n), (deep[1] - shallow[1]) / (d - n)
    kv = (slope_hi - slope_lo) / (hi - lo)
    at_lo, at_hi = shallow[0] - n * slope_lo, shallow[1] - n * slope_hi
    per_token = (at_hi - at_lo) / (hi - lo)
    return {"layer": slope_lo - kv * lo, "kv": kv, "per_token": per_token, "fixed": at_lo - per_token * lo - runtime}


@dataclasses.dataclass(frozen=True)
class MemoryFit:
    """Per-layer memory of the device's layers, from two depths where the model has them."""

    layer_bytes: dict[int, float]
    """A layer's weights and buffers, per weight precision."""
    kv_bytes_per_token_layer: dict[int, float]
    """A layer's cache per position, per KV width."""
    fit: dict[str, float] | None
    """fit_memory's surface (None where there is no second depth: the per-head numbers are kept)."""


def measure_memory(bench: Bench, base: EmbeddingHead, kv_heads: dict[int, KVHead], weights: dict[int, DeviceWeights],
                   depths: list[int]) -> MemoryFit:
    """Memory from two depths: a small head's peak overlaps the process's start-up peak and hides
    part of its layers; the deep calibration head (8-bit, 16-bit KV, at depths[1]) gives the slope.
    Other precisions and KV widths: their difference from the 8-bit, 16-bit-KV head, per layer."""
    n, lo, hi = bench.n, bench.lo, bench.hi
    layer_bytes = {b: w.layer_bytes for b, w in weights.items()}
    kv_mem = {kb: h.kv_bytes_per_token_layer for kb, h in kv_heads.items()}
    if len(depths) < 2 or depths[1] <= n:
        return MemoryFit(layer_bytes, kv_mem, None)
    ref = kv_heads[16].peak_rss
    deep = [measure_peak_rss(calibration_root(bench, depths[1]) / "device", t, bench.config.threads, bench.text) for t in (lo, hi)]
    head_fit = fit_memory(n, depths[1], lo, hi, ref, deep, base.runtime_bytes)
    layer_bytes = {b: max(0.0, head_fit["layer"] + (w.peak_rss - ref[0]) / n) for b, w in weights.items()}
    kv_mem = {kb: max(0.0, head_fit["kv"] + (h.peak_rss[1] - h.peak_rss[0] - ref[1] + ref[0]) / (n * (hi - lo)))
              for kb, h in kv_heads.items()}
    return MemoryFit(layer_bytes, kv_mem, head_fit)


def memory_profile(bench: Bench, base: EmbeddingHead, lm_heads: dict[int, LMHead], mem: MemoryFit) -> MemoryProfile:
    """The device's memory model: the runtime, the embedding-only head above it, the layers, caches and LM heads."""
    runtime, (base_lo, base_hi) = base.runtime_bytes, base.peak_rss
    return MemoryProfile(mem.layer_bytes, base_lo - runtime, {hb: h.lm_head_bytes for hb, h in lm_heads.items()},
                         mem.kv_bytes_per_token_layer, runtime,
                         embed_bytes_per_token=max(0.0, (base_hi - base_lo) / (bench.hi - bench.lo)),
                         head_bytes=mem.fit["fixed"] if mem.fit else None,
                         head_bytes_per_token=mem.fit["per_token"] if mem.fit else 0.0,
                         embed_table_bytes=embed_table_bytes(bench.spec, mem.layer_bytes))


def embed_table_bytes(spec, bits) -> dict[int, float]:
    """Bytes of the embedding table a head of each weight width maps: float32 at 16 bits; a quantized head's
    8-bit blocks of 32 with a float32 scale each (quantize_embedding, or the GGUF's Q8_0)."""
    cells = spec.vocab_size * spec.hidden_size
    return {b: float(cells * 4 if b == 16 else cells * (1 + 4 / 32)) for b in bits}
