"""`measure_profile`: the profile's phases in order, with a progress bar and a report after each
(on_phase), so that what finished is kept when a later phase fails (write_partial)."""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np
from tqdm import tqdm

from splitlm.model.checkpoint import Checkpoint
from splitlm.partition.profile import LinkProfile, Profile
from splitlm.profiler import calibration, cloud, device, memory
from splitlm.profiler.calibration import probe_rtt_ms
from splitlm.profiler.config import ProfileConfig, prepare
from splitlm.profiler.quality import cached_quality

T = TypeVar("T")


class _Report:
    """The profile's progress bar, and on_phase(name, values) after each phase."""

    def __init__(self, total: int, progress: bool, on_phase: Callable[[str, dict], None] | None):
        self.bar = tqdm(total=total, desc="profile", disable=not progress, leave=False)
        self.on_phase = on_phase

    def done(self, name: str, result: T = None, *, step: bool = True, **values) -> T:
        """Hand on_phase what phase `name` measured (`result`'s fields, or `values`) and, for a `step`,
        advance the bar; returns `result`."""
        if result is not None:
            values = {f.name: getattr(result, f.name) for f in dataclasses.fields(result)}
        if self.on_phase is not None:
            self.on_phase(name, values)
        if step:
            self.bar.set_postfix_str(name)
            self.bar.update()
        return result


def measure_profile(ckpt: Checkpoint, link: LinkProfile, config: ProfileConfig = ProfileConfig(), *, progress: bool = True,
                    on_phase: Callable[[str, dict], None] | None = None) -> Profile:
    """Measure everything the partitioner prices (see the package docstring). on_phase(name, values) is
    called as each phase ends with what it measured, so that a caller can keep those values when a
    later phase fails or is interrupted (write_partial)."""
    c = config
    report = _Report(5 + 2 * len(c.bits) + len([kb for kb in c.kv_bits if kb != 16]) + len(c.lm_head_bits), progress, on_phase)
    with tempfile.TemporaryDirectory() as tmp:
        bench = prepare(ckpt, c, Path(tmp))
        base = report.done("embedding-only head", device.measure_embedding_head(bench))
        # the 16-bit cache (first) is the reference the others are priced against, not a step of the bar
        kv = {kb: report.done(f"KV {kb}-bit", device.measure_kv_head(bench, base, kb), step=kb != 16)
              for kb in sorted(set(c.kv_bits) | {16}, reverse=True)}
        weights = {b: report.done(f"device W{b}", device.measure_device_weights(bench, base, kv[16], b)) for b in c.bits}
        embed = device.measure_embed_graph(bench)
        lm_heads = {hb: report.done(f"device LM head {hb}-bit", device.measure_lm_head(bench, embed, hb)) for hb in c.lm_head_bits}
        cloud_weights = {b: report.done(f"cloud W{b}", cloud.measure_cloud_weights(bench, b)) for b in c.bits}
        cloud_head = cloud.measure_cloud_head(bench)
        codecs = cloud.measure_codecs(bench)
        report.done("codec", cloud_head_ms=cloud_head, codecs=codecs)
        overhead = report.done("service overhead", calibration.measure_service_overhead(
            bench, base, kv[16], device.device_side(bench, base, kv, weights, lm_heads),
            cloud.cloud_side(bench, cloud_weights, cloud_head), fp16=codecs[0]))
        mem = report.done("memory", memory.measure_memory(bench, base, kv, weights, list(overhead.calibrations)))
    if c.server:
        link = LinkProfile(link.bandwidth_mbps, probe_rtt_ms(c.server))
        report.done("link", step=False, link=link)
    quality = cached_quality(ckpt, bench.windows[-c.quality_windows:], c.bits, c.kv_bits, progress)
    report.done("quality", quality=quality)
    report.bar.close()
    return Profile(ckpt.model_id, ckpt.weights_hash, bench.layers, bench.spec.hidden_size, overhead.device, overhead.cloud,
                   memory.memory_profile(bench, base, lm_heads, mem), link, codecs, quality, bench.spec.max_position)


def _jsonable(value):
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    return str(value)


def write_partial(path: str | Path, ckpt: Checkpoint, phases: dict[str, dict], error: BaseException) -> None:
    """Write the phases `measure_profile` finished before `error` stopped it, with what each measured
    (as handed to on_phase), as JSON to `path`: not a Profile, the raw measurements."""
    doc = {"partial": True, "model_id": ckpt.model_id, "weights_hash": ckpt.weights_hash,
           "stopped_by": f"{type(error).__name__}: {error}".strip(), "phases": phases}
    Path(path).write_text(json.dumps(doc, indent=2, default=_jsonable) + "\n")
