"""Perplexity on a fixed protocol (the one README.md describes).

Corpus: the topic texts of Python's own `pydoc_data.topics`, in sorted key order,
joined by blank lines. Tokenized with the model's tokenizer (no BOS added), cut
into non-overlapping windows of 512 tokens; the first N windows are scored, each
on its own, and the perplexity is exp of the mean next-token NLL over all
predicted tokens (511 per window).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from tqdm import tqdm

from splitlm.corpus import (  # noqa: F401 - the protocol's corpus, read here
    CALIBRATION_WINDOWS,
    WINDOW,
    calibration_windows,
    eval_windows_limit,
    protocol_text,
    read_text,
    windows,
)


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    nll: float
    """Mean next-token negative log-likelihood (nats)."""
    tokens: int
    """Predicted tokens."""
    windows: int


@torch.inference_mode()
def perplexity(forward: Callable[[torch.Tensor], torch.Tensor], wins: list[list[int]], progress: bool = True) -> PerplexityResult:
    """Score windows with `forward(ids (1, T)) -> logits (1, T, V)`."""
    total, count = 0.0, 0
    for win in tqdm(wins, desc="perplexity", unit="window", disable=not progress, leave=False):
        ids = torch.tensor([win])
        logits = forward(ids)[0, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum")
        total += float(nll)
        count += len(win) - 1
    mean = total / count
    return PerplexityResult(math.exp(mean), mean, count, len(wins))


@dataclass(frozen=True)
class PlanQuality:
    """Perplexity of a plan and what its link cost."""

    perplexity: float
    nll: float
    tokens: int
    windows: int
    bytes_per_token: float
    """Measured upstream bytes per token (all side information and headers counted)."""
    fp16_bytes_per_token: int
    """2·d, the uncompressed fp16 reference."""


def evaluate_plan(ckpt, plan, wins: list[list[int]], calib: list[list[int]] | None = None,
                  progress: bool = True) -> PlanQuality:
    """Perplexity of `plan` on `wins`, with its weights, KV cache and link codec applied."""
    from splitlm.local import LocalSplit

    runner = LocalSplit(ckpt, plan=plan, calib_ids=calib, progress=progress)
    res = perplexity(runner.forward, wins, progress)
    d = ckpt.spec.hidden_size
    bpt = runner.meter.bytes_per_token if runner.tail is not None else 0.0
    return PlanQuality(res.perplexity, res.nll, res.tokens, res.windows, bpt, 2 * d)
