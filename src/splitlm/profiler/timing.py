"""Timing one thing (a device head, a bare graph) and the fits drawn through the timings (torch-free)."""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from pathlib import Path
from typing import Callable, Sequence

from splitlm.partition.profile import SideProfile


def median_ms(fn: Callable[[], object], reps: int) -> float:
    """Median ms of `reps` calls of fn, after one warm-up call (first calls allocate)."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def line(x1: float, y1: float, x2: float, y2: float) -> tuple[float, float]:
    """(intercept, slope) through two points, both clamped at 0 (timing noise)."""
    slope = max(0.0, (y2 - y1) / (x2 - x1))
    return max(0.0, y1 - slope * x1), slope


def fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(fixed, scale) with y = fixed + scale * x through one or two (x, y) points: the scale is
    kept within [0.5, 2] (two noisy points close together would swing it) and fixed at >= 0."""
    if len(points) < 2 or abs(points[0][0] - points[1][0]) < 1e-9:
        (x, y), scale = points[0], 1.0
    else:
        (x1, y1), (x2, y2) = points[:2]
        scale = min(2.0, max(0.5, (y2 - y1) / (x2 - x1)))
        x, y = points[0]
    return max(0.0, y - scale * x), scale


def scaled(side: SideProfile, decode: float = 1.0, prefill: float = 1.0) -> SideProfile:
    """`side` with its per-layer decode and prefill costs multiplied by the given factors."""
    return dataclasses.replace(
        side, decode_ms={b: tuple(v * decode for v in vals) for b, vals in side.decode_ms.items()},
        prefill_ms_per_token={b: v * prefill for b, v in side.prefill_ms_per_token.items()},
        prefill_fixed_ms={b: v * prefill for b, v in side.prefill_fixed_ms.items()})


def time_device_head(device_dir: Path, contexts: Sequence[int], sizes: Sequence[int], text: list[int], threads: int | None,
                     reps: int, spin: bool | None = None) -> tuple[list[float], dict[int, float]]:
    """Decode ms at each context, prefill ms for each chunk size, of one exported head (spin: as
    HeadSession's; by default as the head's plan runs it)."""
    from splitlm.device.runtime import DeviceHead, HeadSession

    head = DeviceHead(HeadSession(device_dir, threads=threads, spin=spin))
    decode = []
    for ctx in contexts:
        head.reset()
        head.step(text[:ctx])
        decode.append(median_ms(lambda: head.step([text[ctx]]), reps))  # the context grows by `reps`: negligible
    prefill = {}
    for t in sizes:
        prefill[t] = median_ms(lambda: (head.reset(), head.step(text[:t])), reps)
    return decode, prefill


def time_graph(path: Path, threads: int | None, reps: int, sample: bool) -> float:
    """Median ms of one call of a bare graph (no layers: input_ids, and position_ids or logit_rows where it
    has them), and of sampling its logits when `sample`."""
    import onnxruntime as ort

    from splitlm.device.runtime import bare_feed, session_options
    from splitlm.sampling import Sampler, SamplingParams

    s = ort.InferenceSession(str(path), session_options(threads or os.cpu_count(), "all"), providers=["CPUExecutionProvider"])
    feed = bare_feed(s)
    sampler = Sampler(SamplingParams())
    if sample:
        return median_ms(lambda: sampler(s.run(None, feed)[0][0, -1]), reps)
    return median_ms(lambda: s.run(None, feed), reps)
