"""The device's half of a profile (torch-free: the device install runs it): the kit's probe heads timed in
the onnxruntime runtime and measured (peak RSS) in fresh device processes, the device LM head, the
device's step as a split session makes it, its memory surface, the codec's encoder, and the link.

Per-layer cost is the difference to an embedding-only head, divided by the probe heads' layers.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np

from splitlm.partition.profile import DeviceProfile, LinkProfile, MemoryProfile, SideProfile
from splitlm.profiler.kit import CODEC_POINTS, SHORT_PREFILL, Kit, codec_basis
from splitlm.profiler.probes import first_call_ms, graph_peak_rss, measure_peak_rss, runtime_baseline_bytes
from splitlm.profiler.report import Report
from splitlm.profiler.timing import fit, line, median_ms, scaled, time_device_head, time_graph

log = logging.getLogger(__name__)

CALIBRATION_TOKENS = 24
"""Steps of each calibration session."""
STEP_WAIT_MS = 10.0
"""How long a calibration session's device waits between steps, as it waits for the cloud's token: its
threads go idle, and waking them is part of what a split session's step costs."""


@dataclasses.dataclass(frozen=True)
class EmbeddingHead:
    """The embedding-only head (split 0): the floor every device head is measured against."""

    runtime_bytes: float
    """Peak RSS of a device process with the runtime and tokenizer and no model (at most the head's)."""
    peak_rss: tuple[float, float]
    """Peak RSS of the head run to each of `positions`."""
    positions: tuple[int, int]
    """The two sequence lengths memory is measured at (Kit.lo, Kit.hi)."""
    decode_ms: list[float]
    """A decode step at each of the kit's contexts."""
    prefill_ms: dict[int, float]
    """A prefill call of each of Kit.sizes tokens."""


@dataclasses.dataclass(frozen=True)
class KVHead:
    """A head of Kit.n layers at 8-bit weights with one KV width."""

    peak_rss: list[float]
    """Peak RSS at Kit.lo and Kit.hi positions."""
    kv_bytes_per_token_layer: float
    """What the cache adds per position per layer (the embedding-only head's growth taken out)."""
    decode_ms: list[float]
    """A decode step at each context (the whole head)."""
    prefill_ms: dict[int, float]
    """A prefill call of each of Kit.sizes tokens (the whole head)."""


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
    """Peak RSS of the head of Kit.n layers at Kit.lo positions."""
    layer_bytes: float
    """A layer's weights and buffers (its cache at Kit.lo positions taken out)."""


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


@dataclasses.dataclass(frozen=True)
class DeviceCalibration:
    """The device as a split session runs it, at one calibration depth (medians, ms)."""

    first_call: float
    """A fresh process's first call on the calibration prompt (prompt in, frame out)."""
    step: float
    """A decode step (token in, frame out) after waiting STEP_WAIT_MS for the cloud."""


@dataclasses.dataclass(frozen=True)
class MemoryFit:
    """Per-layer memory of the device's layers, from two depths where the model has them."""

    layer_bytes: dict[int, float]
    """A layer's weights and buffers, per weight precision."""
    kv_bytes_per_token_layer: dict[int, float]
    """A layer's cache per position, per KV width."""
    fit: dict[str, float] | None
    """fit_memory's surface (None where there is no second depth: the per-head numbers are kept)."""


def measure_embedding_head(kit: Kit) -> EmbeddingHead:
    """The embedding-only head's memory (and the bare runtime's) and timings."""
    base = kit.head("base")
    runtime_bytes = runtime_baseline_bytes(base)
    lo = measure_peak_rss(base, kit.lo, kit.threads, kit.text)
    hi = measure_peak_rss(base, kit.hi, kit.threads, kit.text)
    runtime_bytes = min(runtime_bytes, lo)  # the embedding is mapped, barely touched: keep noise out of it
    decode, prefill = time_device_head(base, kit.contexts, kit.sizes, kit.text, kit.threads, kit.reps)
    return EmbeddingHead(runtime_bytes, (lo, hi), (kit.lo, kit.hi), decode, prefill)


def measure_kv_head(kit: Kit, base: EmbeddingHead, kv_bits: int) -> KVHead:
    """The 8-bit head with `kv_bits` KV: peak RSS at two lengths, and its timings (what a quantized cache
    adds to each step over a 16-bit one comes from these: kv_costs)."""
    head, n = kit.head(f"kv{kv_bits}"), kit.n
    rss = [measure_peak_rss(head, t, kit.threads, kit.text) for t in (kit.lo, kit.hi)]
    per_token = max(0.0, (rss[1] - rss[0] - (base.peak_rss[1] - base.peak_rss[0])) / (n * (kit.hi - kit.lo)))
    decode, prefill = time_device_head(head, kit.contexts, kit.sizes, kit.text, kit.threads, kit.reps)
    return KVHead(rss, per_token, decode, prefill)


def kv_costs(kit: Kit, heads: dict[int, KVHead]) -> tuple[dict[int, tuple[float, ...]], dict[int, float]]:
    """(per-layer decode ms at each context, per-layer prefill ms per token) that each KV width
    below 16 adds over the 16-bit cache."""
    n, chunk, ref = kit.n, kit.prefill, heads[16]
    quantized = {kb: h for kb, h in heads.items() if kb != 16}
    decode = {kb: tuple(max(0.0, (d - d16) / n) for d, d16 in zip(h.decode_ms, ref.decode_ms)) for kb, h in quantized.items()}
    prefill = {kb: max(0.0, (h.prefill_ms[chunk] - ref.prefill_ms[chunk]) / (n * chunk)) for kb, h in quantized.items()}
    return decode, prefill


def measure_device_weights(kit: Kit, base: EmbeddingHead, kv16: KVHead, bits: int) -> DeviceWeights:
    """The head of Kit.n layers at `bits` weights, less the embedding-only head, per layer (the 8-bit
    head with a 16-bit cache is `kv16`'s: its memory is not measured again)."""
    head, n = kit.weights_head(bits), kit.n
    dec, pre = time_device_head(head, kit.contexts, kit.sizes, kit.text, kit.threads, kit.reps)
    decode = tuple(max(0.0, (d - d0) / n) for d, d0 in zip(dec, base.decode_ms))
    (t1, p1), (t2, p2) = [(t, (pre[t] - base.prefill_ms[t]) / n) for t in kit.sizes]
    fixed, per_token = line(t1, p1, t2, p2)
    rss = kv16.peak_rss[0] if bits == 8 else measure_peak_rss(head, kit.lo, kit.threads, kit.text)
    layer_bytes = max(0.0, (rss - base.peak_rss[0]) / n - kv16.kv_bytes_per_token_layer * kit.lo)
    return DeviceWeights(decode, fixed, per_token, rss, layer_bytes)


def measure_embed_graph(kit: Kit) -> EmbedGraph:
    """The embedding-only head's graph timed and measured bare."""
    graph = kit.head("base") / "head.onnx"
    return EmbedGraph(time_graph(graph, kit.threads, kit.reps, sample=False), graph_peak_rss(graph))


def measure_lm_head(kit: Kit, embed: EmbedGraph, bits: int) -> LMHead:
    """The device LM head at `bits`, a graph of its own with the embedding, less the embedding graph."""
    path = kit.lm_graph(bits)
    head_ms = max(0.0, time_graph(path, kit.threads, kit.reps, sample=True) - embed.ms)
    return LMHead(head_ms, max(0.0, graph_peak_rss(path) - embed.peak_rss), embed.ms)


def device_side(kit: Kit, base: EmbeddingHead, kv_heads: dict[int, KVHead], weights: dict[int, DeviceWeights],
                lm_heads: dict[int, LMHead]) -> SideProfile:
    """The device's costs as the layers timed alone give them (fit_device scales them)."""
    kv_decode, kv_prefill = kv_costs(kit, kv_heads)
    return SideProfile(kit.contexts, {b: w.decode_ms for b, w in weights.items()},
                       {b: w.prefill_ms_per_token for b, w in weights.items()}, embed_ms=min(base.decode_ms),
                       head_ms={hb: h.head_ms for hb, h in lm_heads.items()},
                       prefill_fixed_ms={b: w.prefill_fixed_ms for b, w in weights.items()},
                       kv_decode_ms=kv_decode, kv_prefill_ms_per_token=kv_prefill)


def calibration_prompt(kit: Kit) -> list[int]:
    return kit.text[:SHORT_PREFILL * 2]


def split_step_ms(kit: Kit, depth: int, runs: int = 3) -> float:
    """Median decode step of the calibration head of `depth` layers as a split session makes it: token
    in, frame out (fp16), after waiting STEP_WAIT_MS for the cloud's token."""
    from splitlm.device.runtime import DeviceHead, HeadSession

    prompt, text = calibration_prompt(kit), kit.text
    head = DeviceHead(HeadSession(kit.calibration_head(depth), threads=kit.threads))
    steps = []
    for run in range(runs + 1):  # run 0 warms up
        head.reset()
        head.encode(head.step(prompt))
        for i in range(CALIBRATION_TOKENS - 1):
            time.sleep(STEP_WAIT_MS / 1e3)
            t0 = time.perf_counter()
            head.encode(head.step([text[len(prompt) + i]]))
            if run:
                steps.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(steps)


def calibrate_device(kit: Kit) -> dict[int, DeviceCalibration]:
    """The device's first call (fresh processes) and split-session step at each calibration depth."""
    prompt = calibration_prompt(kit)
    return {d: DeviceCalibration(first_call_ms(kit.calibration_head(d), prompt, kit.threads), split_step_ms(kit, d))
            for d in kit.depths}


def fit_device(kit: Kit, base: EmbeddingHead, kv16: KVHead, device: SideProfile, fp16_encode: tuple[float, float],
               cals: dict[int, DeviceCalibration]) -> SideProfile:
    """The device model (the 8-bit, 16-bit-KV head of Kit.n layers as timed alone) fitted to the
    calibration heads: fixed costs and scales of a split session's step and of a fresh process's
    prompt; and the scale of a device-only head's step (spinning threads, LM head in the graph)."""
    n, T = kit.n, len(calibration_prompt(kit))
    ctx = T + CALIBRATION_TOKENS // 2
    per_layer = float(np.interp(ctx, kit.contexts, [(d - b) / n for d, b in zip(kv16.decode_ms, base.decode_ms)]))
    embed_at = float(np.interp(ctx, kit.contexts, base.decode_ms))
    w8_fixed, w8_slope = line(*(x for t in kit.sizes for x in (t, (kv16.prefill_ms[t] - base.prefill_ms[t]) / n)))
    w8_prompt = w8_fixed + T * w8_slope  # one layer's prefill of the prompt
    # the device's step at both depths = fixed (idle threads waking, the runtime's call) + scale x the
    # layers as timed alone (a deep head's layers cost more than a 4-layer head's)
    step_fit = fit([(d * per_layer, cal.step - embed_at - fp16_encode[0]) for d, cal in cals.items()])
    # the device's prompt: a fresh process's first call at both depths (per-layer prefill of a deep
    # head in a new process differs from a 4-layer head timed warm)
    pre_fit = fit([(d * w8_prompt, cal.first_call - device.embed_ms - T * fp16_encode[1]) for d, cal in cals.items()])
    spinning, alone_scale = _device_alone_scale(kit, device, ctx, embed_at, kit.num_layers * per_layer * step_fit[1])
    log.info("device at %s layers: prompt in a fresh process %s ms -> fixed %.1f ms + %.2f x layers; split-session "
             "step %s ms -> fixed %.2f ms + %.2f x layers; device-only step (spinning threads, LM head) %.2f ms (x%.2f)",
             list(cals), [round(cal.first_call, 1) for cal in cals.values()], *pre_fit,
             [round(cal.step, 2) for cal in cals.values()], *step_fit, spinning, alone_scale)
    return dataclasses.replace(scaled(device, decode=step_fit[1], prefill=pre_fit[1]), prefill_overhead_ms=pre_fit[0],
                               step_overhead_ms=step_fit[0], alone_decode_scale=alone_scale)


def alone_lm_head_bits(lm_head_bits: tuple[int, ...]) -> int:
    """The LM head of the kit's device-only head: 8-bit where it is profiled."""
    return 8 if 8 in lm_head_bits else max(lm_head_bits)


def _device_alone_scale(kit: Kit, device: SideProfile, ctx: int, embed_at: float, modelled: float) -> tuple[float, float]:
    """(ms, scale): the kit's device-only head (8-bit, LM head in the graph) stepped at `ctx` with
    spinning threads, as `generate` steps it, against the `modelled` layers' step."""
    hb = alone_lm_head_bits(kit.lm_head_bits)
    spinning = time_device_head(kit.head("alone"), (ctx,), (), kit.text, kit.threads, kit.reps)[0][0]
    return spinning, max(0.5, min(1.5, (spinning - embed_at - device.head_ms[hb]) / max(1e-9, modelled)))


def fit_memory(n: int, d: int, lo: int, hi: int, shallow: list[float], deep: list[float], runtime: float) -> dict[str, float]:
    """Peak RSS of heads of n and d layers at lo and hi positions -> M(l, s) = runtime + fixed +
    per_token * s + l * (layer + kv * s): the bilinear surface through the four points."""
    slope_lo, slope_hi = (deep[0] - shallow[0]) / (d - n), (deep[1] - shallow[1]) / (d - n)
    kv = (slope_hi - slope_lo) / (hi - lo)
    at_lo, at_hi = shallow[0] - n * slope_lo, shallow[1] - n * slope_hi
    per_token = (at_hi - at_lo) / (hi - lo)
    return {"layer": slope_lo - kv * lo, "kv": kv, "per_token": per_token, "fixed": at_lo - per_token * lo - runtime}


def measure_memory(kit: Kit, base: EmbeddingHead, kv_heads: dict[int, KVHead], weights: dict[int, DeviceWeights]) -> MemoryFit:
    """Memory from two depths: a small head's peak overlaps the process's start-up peak and hides
    part of its layers; the deep calibration head (8-bit, 16-bit KV) gives the slope. Other
    precisions and KV widths: their difference from the 8-bit, 16-bit-KV head, per layer."""
    n, lo, hi, depths = kit.n, kit.lo, kit.hi, kit.depths
    layer_bytes = {b: w.layer_bytes for b, w in weights.items()}
    kv_mem = {kb: h.kv_bytes_per_token_layer for kb, h in kv_heads.items()}
    if len(depths) < 2 or depths[1] <= n:
        return MemoryFit(layer_bytes, kv_mem, None)
    ref = kv_heads[16].peak_rss
    deep = [measure_peak_rss(kit.calibration_head(depths[1]), t, kit.threads, kit.text) for t in (lo, hi)]
    head_fit = fit_memory(n, depths[1], lo, hi, ref, deep, base.runtime_bytes)
    layer_bytes = {b: max(0.0, head_fit["layer"] + (w.peak_rss - ref[0]) / n) for b, w in weights.items()}
    kv_mem = {kb: max(0.0, head_fit["kv"] + (h.peak_rss[1] - h.peak_rss[0] - ref[1] + ref[0]) / (n * (hi - lo)))
              for kb, h in kv_heads.items()}
    return MemoryFit(layer_bytes, kv_mem, head_fit)


def memory_profile(kit: Kit, base: EmbeddingHead, lm_heads: dict[int, LMHead], mem: MemoryFit) -> MemoryProfile:
    """The device's memory model: the runtime, the embedding-only head above it, the layers, caches and LM heads."""
    runtime, (base_lo, base_hi) = base.runtime_bytes, base.peak_rss
    cells = kit.vocab_size * kit.hidden_size
    # the embedding table as each head maps it: float32 at 16 bits; a quantized head's 8-bit blocks of 32
    # with a float32 scale each (quantize_embedding, or the GGUF's Q8_0)
    table = {b: float(cells * 4 if b == 16 else cells * (1 + 4 / 32)) for b in mem.layer_bytes}
    return MemoryProfile(mem.layer_bytes, base_lo - runtime, {hb: h.lm_head_bytes for hb, h in lm_heads.items()},
                         mem.kv_bytes_per_token_layer, runtime,
                         embed_bytes_per_token=max(0.0, (base_hi - base_lo) / (kit.hi - kit.lo)),
                         head_bytes=mem.fit["fixed"] if mem.fit else None,
                         head_bytes_per_token=mem.fit["per_token"] if mem.fit else 0.0, embed_table_bytes=table)


def measure_encoders(kit: Kit) -> dict[str, tuple[float, float]]:
    """Each codec point's encoder on the kit's activations: (ms per decode row, ms per position of a
    prefill chunk)."""
    from splitlm.quantize import codec

    acts = kit.activations
    rows = acts[:kit.prefill]
    out = {}
    for name, cfg in CODEC_POINTS.items():
        basis = codec_basis(acts, cfg)
        row = median_ms(lambda: codec.encode(acts[:1], cfg, "numpy", basis), kit.reps)
        chunk = median_ms(lambda: codec.encode(rows, cfg, "numpy", basis), max(1, kit.reps // 2)) / len(rows)
        out[name] = (row, chunk)
    return out


def measure_device(kit: Kit, link: LinkProfile, report: Report, server: str | None = None) -> DeviceProfile:
    """The device's half of a profile from `kit` (see the module docstring), with `link` (its RTT probed
    against `server` where one is given); `report` shows and keeps each phase."""
    base = report.run("embedding-only head", lambda: measure_embedding_head(kit))
    # the 16-bit cache (first) is the reference the others are priced against, not a step of the bar
    kv = {kb: report.run(f"KV {kb}-bit", lambda: measure_kv_head(kit, base, kb), step=kb != 16)
          for kb in sorted(set(kit.kv_bits) | {16}, reverse=True)}
    weights = {b: report.run(f"device W{b}", lambda: measure_device_weights(kit, base, kv[16], b)) for b in kit.bits}
    embed = measure_embed_graph(kit)
    lm_heads = {hb: report.run(f"device LM head {hb}-bit", lambda: measure_lm_head(kit, embed, hb)) for hb in kit.lm_head_bits}
    encoders = report.run("codec encoders", lambda: measure_encoders(kit), step=False)
    side = report.run("device calibration", lambda: fit_device(
        kit, base, kv[16], device_side(kit, base, kv, weights, lm_heads), encoders["fp16"], calibrate_device(kit)))
    mem = report.run("device memory", lambda: measure_memory(kit, base, kv, weights))
    if server:
        from splitlm.device.client import probe_rtt_ms

        link = LinkProfile(link.bandwidth_mbps, probe_rtt_ms(server))
    report.note("link", link=link)
    return DeviceProfile(kit.id, kit.model_id, kit.weights_hash, side, memory_profile(kit, base, lm_heads, mem), encoders, link)


def device_steps(kit: Kit) -> int:
    """The progress bar's steps of measure_device."""
    return 3 + len(kit.bits) + len([kb for kb in kit.kv_bits if kb != 16]) + len(kit.lm_head_bits)


def measure_device_half(kit_dir: Path, link: LinkProfile, *, threads: int | None = None, reps: int | None = None,
                        server: str | None = None, progress: bool = True,
                        on_phase: Callable[[str, dict], None] | None = None) -> DeviceProfile:
    """The device's half of a two-machine profile, from the kit in `kit_dir` (torch-free)."""
    kit = Kit.load(kit_dir, threads=threads, reps=reps)
    report = Report(device_steps(kit), progress, on_phase)
    half = measure_device(kit, link, report, server)
    report.close()
    return half
