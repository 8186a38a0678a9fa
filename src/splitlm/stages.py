"""A plan made into torch stages: the device head and the cloud tail, quantized as the plan says.

Export, the in-process split, evaluation and the profiler all build their stages here,
so that each runs exactly the weights the others run.
"""

from __future__ import annotations

from pathlib import Path

import torch

from splitlm import corpus
from splitlm.model.checkpoint import Checkpoint
from splitlm.model.llama import Transformer
from splitlm.model.load import build_stage
from splitlm.partition.plan import Plan
from splitlm.quantize.apply import apply_source, quantize_embedding, quantize_lm_head, quantize_stage
from splitlm.quantize.config import WEIGHT_METHODS
from splitlm.quantize.kv import KV_CALIBRATION_WINDOWS, quantize_kv_cache


def build_stages(ckpt: Checkpoint, plan: Plan, calib_ids: list[list[int]] | None = None, *, tail: bool = True,
                 dtype: torch.dtype = torch.float32, progress: bool = False) -> tuple[Transformer, Transformer | None]:
    """(head, tail) of `plan` on `ckpt`: embed + layers [0, ℓ) (+ norm and LM head when ℓ = L) with the
    device weights (a quantized head quantizes its embedding too; with kv_bits 8 or 4 its attention
    rounds keys and values as the device's cache holds them, scales from calibration text), and layers
    [plan.cloud_start, L) + norm + LM head
    with the cloud weights (None when ℓ = L, or when `tail` is False). `calib_ids`: calibration windows for methods that read them (GPTQ);
    the tail calibrates on the head's outputs for those windows. Quantized weights are cached
    under the checkpoint's folder."""
    L = ckpt.spec.num_layers
    plan.check_model(L)
    split = plan.split_layer
    cache_dir = Path(ckpt.path) / "quant"
    calib = [torch.tensor([w]) for w in calib_ids] if calib_ids else None
    source = ckpt if plan.device_weights.method == "source" else None

    def weights(stage, wq, data):
        if wq.method == "source" and wq.bits != 16:
            return apply_source(stage, ckpt, wq)
        return quantize_stage(stage, wq, data, cache_dir, ckpt.weights_hash, progress)

    head = build_stage(ckpt, 0, split, embed=True, final=split == L, dtype=dtype)
    head = quantize_embedding(quantize_lm_head(weights(head, plan.device_weights, calib), plan.lm_head_bits, source),
                              plan.device_weights, source)
    if plan.kv_bits != 16:
        head = quantize_kv_cache(head, plan.kv_bits, _windows(ckpt, KV_CALIBRATION_WINDOWS))
    if split == L or not tail:
        return head, None
    start = plan.cloud_start  # a plan whose split moves shallower has the cloud hold those layers too
    tail_calib = None
    if calib is not None and WEIGHT_METHODS[plan.cloud_weights.method].needs_calibration and plan.cloud_weights.bits != 16:
        with torch.inference_mode():
            tail_calib = [head(c, stop=start) for c in calib]
    tail_source = ckpt if plan.cloud_weights.method == "source" else None
    return head, quantize_lm_head(weights(build_stage(ckpt, start, L, embed=False, final=True, dtype=dtype),
                                          plan.cloud_weights, tail_calib), plan.lm_head_bits, tail_source)


CODEC_CALIBRATION_WINDOWS = 4
"""Calibration windows the entropy 'ans' codec's bases are fitted on (4 x 512 rows for SmolLM2)."""


def codec_bases(ckpt: Checkpoint, plan: Plan, head: Transformer) -> dict:
    """The calibrated bases (quantize.ans.Basis) that an entropy 'ans' codec codes in: one per split a session
    of `plan` may run at, fitted on `head`'s own outputs at that layer for the last calibration windows. {} for
    other codecs and device-only plans (no frames)."""
    import numpy as np

    from splitlm.quantize import ans, codec

    if codec.frame_kind(plan.codec) != "ans" or plan.split_layer == ckpt.spec.num_layers:
        return {}
    windows = _windows(ckpt, CODEC_CALIBRATION_WINDOWS)
    bases = {}
    with torch.inference_mode():
        for layer in plan.splits():
            h = np.concatenate([head(torch.tensor([w]), stop=layer)[0].float().numpy() for w in windows])
            bases[layer] = ans.Basis.fit(layer, h)
    return bases


def move_energies(ckpt: Checkpoint, plan: Plan, head: Transformer) -> dict:
    """The query energies (quantize.kv.query_energies) that the K/V codec steps keys by, for every layer a move of
    `plan` may carry, [cloud_start, split_layer), through `head` on the KV calibration windows. {} when the plan
    moves nothing or moves K/V exactly."""
    from splitlm.quantize.kv import query_energies

    if not plan.split_moves or plan.move_codec.coder != "ans":
        return {}
    return query_energies(head, range(plan.cloud_start, plan.split_layer), _windows(ckpt, KV_CALIBRATION_WINDOWS))


def _windows(ckpt: Checkpoint, count: int) -> list[list[int]]:
    """`count` calibration windows of the protocol text, each as long as the model allows up to corpus.WINDOW."""
    return corpus.calibration_windows(ckpt.tokenizer(), count, min(corpus.WINDOW, ckpt.spec.max_position))
