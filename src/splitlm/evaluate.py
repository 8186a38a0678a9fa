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
from pathlib import Path
from typing import Callable

import torch
from tokenizers import Tokenizer
from tqdm import tqdm

from splitlm.errors import ConfigError

WINDOW = 512


def protocol_text() -> str:
    """The evaluation corpus of DESIGN.md §10."""
    from pydoc_data import topics

    return "\n\n".join(topics.topics[key] for key in sorted(topics.topics))


def read_text(path: str | Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path} as UTF-8 text: {exc}") from None


def windows(tokenizer: Tokenizer, text: str, count: int, size: int = WINDOW, skip: int = 0) -> list[list[int]]:
    """Windows `skip` .. `skip+count` of `size` tokens; ConfigError when the text is too short."""
    if count < 1 or size < 2:
        raise ConfigError(f"need at least 1 window of at least 2 tokens, got {count} of {size}")
    ids = tokenizer.encode(text).ids
    available = len(ids) // size
    if available < skip + count:
        raise ConfigError(f"the text has {len(ids)} tokens: {available} windows of {size}, {skip + count} asked for")
    return [ids[(skip + i) * size:(skip + i + 1) * size] for i in range(count)]


CALIBRATION_WINDOWS = 16


def calibration_windows(tokenizer: Tokenizer, count: int = CALIBRATION_WINDOWS, size: int = WINDOW,
                        text: str | None = None) -> list[list[int]]:
    """The last `count` windows of the protocol corpus: disjoint from the first evaluation windows."""
    ids = tokenizer.encode(text if text is not None else protocol_text()).ids
    available = len(ids) // size
    if available < count:
        raise ConfigError(f"the calibration text has {available} windows of {size} tokens, {count} asked for")
    first = available - count
    return [ids[(first + i) * size:(first + i + 1) * size] for i in range(count)]


def eval_windows_limit(tokenizer: Tokenizer, calib_count: int = CALIBRATION_WINDOWS, size: int = WINDOW) -> int:
    """How many leading windows can be evaluated without touching the calibration windows."""
    return len(tokenizer.encode(protocol_text()).ids) // size - calib_count


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
