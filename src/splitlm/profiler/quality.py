"""The quality phase: Δ log-perplexity on calibration windows per precision, KV width and codec
point, cached (it does not depend on the machine: a second profile, on any device, reuses it)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path

import numpy as np
from tqdm import tqdm

from splitlm import evaluate
from splitlm.model.checkpoint import Checkpoint, cache_root
from splitlm.partition.plan import Plan
from splitlm.partition.profile import QualityTable
from splitlm.profiler.kit import CODEC_POINTS
from splitlm.quantize.apply import preferred_method
from splitlm.quantize.config import DEFAULT_GROUP, CodecConfig, WeightQuant

log = logging.getLogger(__name__)

QUALITY_CACHE_VERSION = 2

def quality_cache_path(ckpt: Checkpoint, wins: list[list[int]], bits, kv_bits) -> Path:
    """Where the quality table of these weights, windows, precisions and codec points is cached
    (it does not depend on the machine: a second profile, on any device, reuses it)."""
    key = json.dumps([QUALITY_CACHE_VERSION, ckpt.weights_hash, sorted(bits), sorted(kv_bits), wins,
                      {name: dataclasses.asdict(cfg) for name, cfg in CODEC_POINTS.items()}], sort_keys=True)
    return cache_root() / "quality" / f"{ckpt.model_id}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def cached_quality(ckpt: Checkpoint, wins: list[list[int]], bits, kv_bits, progress: bool) -> QualityTable:
    """measure_quality, read from the cache when it was measured before (a corrupt entry is measured again)."""
    path = quality_cache_path(ckpt, wins, bits, kv_bits)
    if path.exists():
        try:
            return QualityTable.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("quality cache %s is unreadable (%s): measuring again", path, exc)
    table = measure_quality(ckpt, wins, bits, kv_bits, progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(dataclasses.asdict(table)))
    tmp.replace(path)
    return table


def measure_quality(ckpt: Checkpoint, wins: list[list[int]], bits, kv_bits, progress: bool) -> QualityTable:
    """Δ log-perplexity of each precision over split ranges, each KV width and codec point."""
    from splitlm.local import LocalSplit

    L = ckpt.spec.num_layers
    splits = sorted({0, L // 4, L // 2, 3 * L // 4, L})

    def nll(plan: Plan) -> float:
        return evaluate.perplexity(LocalSplit(ckpt, plan=plan).forward, wins, progress=False).nll

    exact = Plan(ckpt.model_id, ckpt.weights_hash, L // 2, codec=CodecConfig("fp32"), prefill_chunk=128)
    base = nll(exact)
    device, cloud, methods = {}, {}, {}
    for b in tqdm([b for b in bits if b != 16], desc="quality", disable=not progress, leave=False):
        methods[b] = preferred_method(ckpt, b)
        wq = WeightQuant(b, DEFAULT_GROUP, methods[b])
        device[b] = {s: (nll(exact.replace(split_layer=s, device_weights=wq)) - base) if s else 0.0 for s in splits}
        cloud[b] = {s: (nll(exact.replace(split_layer=s, cloud_weights=WeightQuant(b, DEFAULT_GROUP))) - base) if s < L else 0.0
                    for s in splits}
    kv = {kb: nll(exact.replace(kv_bits=kb)) - base for kb in kv_bits if kb != 16}
    codecs = {name: nll(exact.replace(codec=cfg)) - base for name, cfg in CODEC_POINTS.items()}
    return QualityTable(float(np.exp(base)), device, cloud, kv, codecs, methods)
