"""The device phases: heads exported per weight precision and KV width, timed in the onnxruntime
runtime and measured (peak RSS) in fresh device processes; the device LM head.

Per-layer cost is the difference to an embedding-only head, divided by the probe heads' layers.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from splitlm.model.checkpoint import Checkpoint
from splitlm.partition.profile import SideProfile
from splitlm.profiler.config import Bench
from splitlm.profiler.probes import graph_peak_rss, measure_peak_rss, runtime_baseline_bytes
from splitlm.profiler.timing import line, time_device_head, time_graph


@dataclasses.dataclass(frozen=True)
class EmbeddingHead:
    """The embedding-only head (split 0): the floor every device head is measured against."""

    runtime_bytes: float
    """Peak RSS of a device process with the runtime and tokenizer and no model (at most the head's)."""
    peak_rss: tuple[float, float]
    """Peak RSS of the head run to each of `positions`."""
    positions: tuple[int, int]
    """The two sequence lengths memory is measured at (Bench.lo, Bench.hi)."""
    decode_ms: list[float]
    """A decode step at each of the config's contexts."""
    prefill_ms: dict[int, float]
    """A prefill call of each of Bench.sizes tokens."""


@dataclasses.dataclass(frozen=True)
class KVHead:
    """A head of Bench.n layers at 8-bit weights with one KV width."""

    peak_rss: list[float]
    """Peak RSS at Bench.lo and Bench.hi positions."""
    kv_bytes_per_token_layer: float
    """What the cache adds per position per layer (the embedding-only head's growth taken out)."""
    decode_ms: list[float]
    """A decode step at each context (the whole head)."""
    prefill_ms: dict[int, float]
    """A prefill call of each of Bench.sizes tokens (the whole head)."""


@dataclasses.dataclass(frozen=True)
class DeviceWeights:
    """Per-layer costs of the device's layers at one weight precision."""

    decode_ms: tuple[float, ...]
    """A layer's decode step at each context."""
    prefill_fixed_ms: float
    """A layer's fixed cost per prefill call."""
    prefill_ms_per_token: float
    """A layer's prefill cost per token."""
    peak_rss: float
    """Peak RSS of the head of Bench.n layers at Bench.lo positions."""
    layer_bytes: float
    """A layer's weights and buffers (its cache at Bench.lo positions taken out)."""


@dataclasses.dataclass(frozen=True)
class EmbedGraph:
    """The embedding-only graph run bare: what the LM head graphs are measured against."""

    ms: float
    peak_rss: float


@dataclasses.dataclass(frozen=True)
class LMHead:
    """The device LM head (device-only plans) at one precision: embedding + norm + LM head + sampling,
    less the embedding."""

    head_ms: float
    lm_head_bytes: float
    embed_ms: float
    """The embedding graph's call, taken out of head_ms."""


def measure_embedding_head(bench: Bench) -> EmbeddingHead:
    """Export the embedding-only head; its memory (and the bare runtime's) and timings."""
    from splitlm.export import export_artifacts

    c = bench.config
    base = export_artifacts(bench.ckpt, bench.base_plan, bench.tmp / "base", progress=False)
    runtime_bytes = runtime_baseline_bytes(base.device_dir)
    lo = measure_peak_rss(base.device_dir, bench.lo, c.threads, bench.text)
    hi = measure_peak_rss(base.device_dir, bench.hi, c.threads, bench.text)
    runtime_bytes = min(runtime_bytes, lo)  # the embedding is mapped, barely touched: keep noise out of it
    decode, prefill = time_device_head(base.device_dir, c.contexts, bench.sizes, bench.text, c.threads, c.reps)
    return EmbeddingHead(runtime_bytes, (lo, hi), (bench.lo, bench.hi), decode, prefill)


def measure_kv_head(bench: Bench, base: EmbeddingHead, kv_bits: int) -> KVHead:
    """A head at 8-bit weights with `kv_bits` KV: peak RSS at two lengths, and its timings (what a
    quantized cache adds to each step over a 16-bit one comes from these: kv_costs)."""
    from splitlm.export import export_artifacts

    c, n = bench.config, bench.n
    res = export_artifacts(bench.ckpt, bench.probe_plan(n, 8, kv_bits=kv_bits), bench.tmp / f"kv{kv_bits}", progress=False)
    rss = [measure_peak_rss(res.device_dir, t, c.threads, bench.text) for t in (bench.lo, bench.hi)]
    per_token = max(0.0, (rss[1] - rss[0] - (base.peak_rss[1] - base.peak_rss[0])) / (n * (bench.hi - bench.lo)))
    decode, prefill = time_device_head(res.device_dir, c.contexts, bench.sizes, bench.text, c.threads, c.reps)
    return KVHead(rss, per_token, decode, prefill)


def kv_costs(bench: Bench, heads: dict[int, KVHead]) -> tuple[dict[int, tuple[float, ...]], dict[int, float]]:
    """(per-layer decode ms at each context, per-layer prefill ms per token) that each KV width
    below 16 adds over the 16-bit cache."""
    n, chunk, ref = bench.n, bench.config.prefill, heads[16]
    quantized = {kb: h for kb, h in heads.items() if kb != 16}
    decode = {kb: tuple(max(0.0, (d - d16) / n) for d, d16 in zip(h.decode_ms, ref.decode_ms)) for kb, h in quantized.items()}
    prefill = {kb: max(0.0, (h.prefill_ms[chunk] - ref.prefill_ms[chunk]) / (n * chunk)) for kb, h in quantized.items()}
    return decode, prefill


def measure_device_weights(bench: Bench, base: EmbeddingHead, kv16: KVHead, bits: int) -> DeviceWeights:
    """A head of Bench.n layers at `bits` weights, less the embedding-only head, per layer (the
    8-bit head with a 16-bit cache is `kv16`'s: its memory is not measured again)."""
    from splitlm.export import export_artifacts

    c, n = bench.config, bench.n
    res = export_artifacts(bench.ckpt, bench.probe_plan(n, bits), bench.tmp / f"w{bits}", progress=False)
    dec, pre = time_device_head(res.device_dir, c.contexts, bench.sizes, bench.text, c.threads, c.reps)
    decode = tuple(max(0.0, (d - d0) / n) for d, d0 in zip(dec, base.decode_ms))
    (t1, p1), (t2, p2) = [(t, (pre[t] - base.prefill_ms[t]) / n) for t in bench.sizes]
    fixed, per_token = line(t1, p1, t2, p2)
    rss = kv16.peak_rss[0] if bits == 8 else measure_peak_rss(res.device_dir, bench.lo, c.threads, bench.text)
    layer_bytes = max(0.0, (rss - base.peak_rss[0]) / n - kv16.kv_bytes_per_token_layer * bench.lo)
    return DeviceWeights(decode, fixed, per_token, rss, layer_bytes)


def measure_embed_graph(bench: Bench) -> EmbedGraph:
    """The embedding-only head's graph (from measure_embedding_head's export) timed and measured bare."""
    graph = bench.tmp / "base" / "device" / "head.onnx"
    return EmbedGraph(time_graph(graph, bench.config.threads, bench.config.reps, sample=False), graph_peak_rss(graph))


def _export_lm_head(ckpt: Checkpoint, bits: int, path: Path) -> None:
    """An ONNX graph of embedding + final norm + LM head at `bits` (no layers)."""
    from splitlm.export import export_head
    from splitlm.model.load import build_stage
    from splitlm.quantize.apply import quantize_lm_head

    export_head(quantize_lm_head(build_stage(ckpt, 0, 0, embed=True, final=True), bits), path.parent, 1)


def measure_lm_head(bench: Bench, embed: EmbedGraph, bits: int) -> LMHead:
    """The device LM head at `bits`, exported alone with the embedding, less the embedding graph."""
    path = bench.tmp / f"lm{bits}" / "head.onnx"
    path.parent.mkdir()
    _export_lm_head(bench.ckpt, bits, path)
    head_ms = max(0.0, time_graph(path, bench.config.threads, bench.config.reps, sample=True) - embed.ms)
    return LMHead(head_ms, max(0.0, graph_peak_rss(path) - embed.peak_rss), embed.ms)


def device_side(bench: Bench, base: EmbeddingHead, kv_heads: dict[int, KVHead], weights: dict[int, DeviceWeights],
                lm_heads: dict[int, LMHead]) -> SideProfile:
    """The device's costs as the layers timed alone give them (the service-overhead phase scales them)."""
    kv_decode, kv_prefill = kv_costs(bench, kv_heads)
    return SideProfile(bench.config.contexts, {b: w.decode_ms for b, w in weights.items()},
                       {b: w.prefill_ms_per_token for b, w in weights.items()}, embed_ms=min(base.decode_ms),
                       head_ms={hb: h.head_ms for hb, h in lm_heads.items()},
                       prefill_fixed_ms={b: w.prefill_fixed_ms for b, w in weights.items()},
                       kv_decode_ms=kv_decode, kv_prefill_ms_per_token=kv_prefill)
