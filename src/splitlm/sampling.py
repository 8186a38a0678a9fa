"""Token sampling on numpy logits: greedy, temperature, top-k, top-p, seeded.

numpy only, so the device (device-only plans) and the cloud draw identical tokens
from identical logits and seeds. A seeded draw depends on the seed and the position of
the token drawn, not on how many draws came before: a session rebuilt by replay on another
server (DESIGN.md §7) draws what the lost one would have drawn.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from splitlm.errors import ConfigError


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen."""

    temperature: float = 0.0
    """0 = greedy; otherwise logits are divided by it before softmax."""
    top_k: int = 0
    """Keep only the k most likely tokens (0 = all)."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability reaches p (1 = all)."""
    seed: int | None = None
    """Seed of the draws (each keyed by the token's position); None draws from the OS."""

    def __post_init__(self) -> None:
        if not (self.temperature >= 0 and np.isfinite(self.temperature)):
            raise ConfigError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Sampler:
    """Draws one token per call from a logits vector; owns the random stream of one session."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def uniform(self, position: int | None) -> float:
        """The draw for the token at `position`: a function of (seed, position) when seeded and the
        position is known, else the next draw of the session's stream."""
        if self.params.seed is None or position is None:
            return float(self.rng.random())
        return float(np.random.default_rng((self.params.seed, position)).random())

    def __call__(self, logits: np.ndarray, position: int | None = None) -> int:
        """logits (V,) -> token id. `position`: where the drawn token goes (the length of the sequence
        before it), which keys a seeded draw."""
        p = self.params
        if p.greedy:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / p.temperature
        order = np.argsort(-z, kind="stable")
        if p.top_k:
            order = order[: p.top_k]
        z = z[order]
        probs = np.exp(z - z[0])
        probs /= probs.sum()
        if p.top_p < 1:
            keep = int(np.searchsorted(np.cumsum(probs), p.top_p) + 1)
            probs = probs[:keep] / probs[:keep].sum()
            order = order[:keep]
        idx = int(np.searchsorted(np.cumsum(probs), self.uniform(position) * probs.sum(), side="right"))
        return int(order[min(idx, len(order) - 1)])


def top_logprobs(logits: np.ndarray, token: int, k: int) -> tuple[float, tuple[tuple[int, float], ...]]:
    """log p(token) and the k most likely (id, log p), best first, under softmax(logits) (V,)."""
    z = logits.astype(np.float64)
    z = z - z.max()
    logp = z - np.log(np.exp(z).sum())
    k = min(k, len(logp))
    best = np.argpartition(-logp, k - 1)[:k]
    best = best[np.lexsort((best, -logp[best]))]
    return float(logp[token]), tuple((int(i), float(logp[i])) for i in best)
