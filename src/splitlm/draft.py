"""Drafting for speculation across the split (DESIGN.md §11), on the device at no cloud cost. torch-free.

`PromptLookup` drafts from the session's own history: the tokens that followed the latest earlier
occurrence of its last n tokens (n from `max_ngram`, 4, down to 1), the prompt-lookup decoding that pays on
text that repeats its input (a summary, an edit, code). On bench/e2e.py's five prompts, n up to 4 rather
than 3 changed only the poem's (1.91 -> 2.42 tokens per round trip); up to 6, nothing more. `DraftLength` picks how many tokens to draft
from the recent acceptance: a poor draft shrinks to one token, so it costs little more than a plain step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from splitlm.errors import ConfigError


class PromptLookup:
    """Drafts by n-gram lookup in the history (prompt and generated tokens), indexed as it grows."""

    def __init__(self, max_ngram: int = 4, min_ngram: int = 1) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ConfigError(f"n-gram lengths must satisfy 1 <= min <= max, got {min_ngram}, {max_ngram}")
        self.ngrams = range(max_ngram, min_ngram - 1, -1)
        self._index: dict[tuple[int, ...], int] = {}
        """n-gram -> the start of its latest occurrence that a token follows."""
        self._indexed = 0
        """History positions whose n-grams ending there are indexed."""

    def propose(self, history: list[int], k: int, min_match: int = 1) -> list[int]:
        """Up to k tokens to follow `history` (which only ever grows between calls), or [] when its last `min_match`
        tokens (or more) occurred nowhere before."""
        if k < 1:
            return []
        # index every n-gram that a token follows: those ending before the last position
        for end in range(self._indexed, len(history) - 1):
            for n in self.ngrams:
                if end + 1 >= n:
                    self._index[tuple(history[end + 1 - n:end + 1])] = end + 1 - n
        self._indexed = max(self._indexed, len(history) - 1)
        for n in self.ngrams:
            if len(history) < n or n < min_match:
                continue
            start = self._index.get(tuple(history[-n:]))
            if start is not None:
                return list(history[start + n:start + n + k])
        return []


@dataclass
class DraftLength:
    """How many tokens to draft next: grows by one after a step that kept every draft, falls to one past the kept
    ones after a step that did not. After three steps in a row that kept none, a draft needs a match of two tokens
    or more (`min_match`) until one is kept: each rejected token cost the device a head step for nothing, and on
    open chat a one-token match is a poor guess (bench/e2e.py --speculate's health-tips prompt: 1 of 26 drafts
    kept, 0.92x; with this rule 1 of 8). Asking a longer match after every miss cost the other prompts more
    (the poem: 2.42 -> 1.66 tokens per round trip; with this rule 2.33)."""

    k: int = 4
    max_k: int = 8
    kept: list[int] = field(default_factory=list)
    drafted: list[int] = field(default_factory=list)
    misses: int = 0
    """Steps in a row that kept no draft."""

    def __post_init__(self) -> None:
        if not 1 <= self.k <= self.max_k:
            raise ConfigError(f"draft length must satisfy 1 <= k <= max_k, got {self.k}, {self.max_k}")

    def update(self, drafted: int, accepted: int) -> None:
        self.drafted.append(drafted)
        self.kept.append(accepted)
        self.k = min(self.k + 1, self.max_k) if accepted == drafted else max(1, accepted + 1)
        self.misses = 0 if accepted else self.misses + 1

    @property
    def min_match(self) -> int:
        """The shortest history match worth drafting from now."""
        return 1 if self.misses < 3 else 2
