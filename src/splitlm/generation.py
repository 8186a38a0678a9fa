"""The generate loop shared by every path (in-process, device-only, device + cloud). torch-free."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

from splitlm.errors import ConfigError


@dataclass
class GenerationResult:
    """What one generation produced and how long it took."""

    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    ttft_s: float
    decode_s: float
    stop_reason: str
    """'eos', 'max_tokens', 'max_seq_len', or 'stop' (the caller's on_token asked to stop)."""
    link_bytes: int = 0
    """Bytes of encoded activations sent from head to tail."""
    extra: dict = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        n = len(self.token_ids) - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else float("nan")


def _next_rung(n: int) -> int:
    """The power of two at or above n (how plans size max_seq_len)."""
    return 1 << max(0, (n - 1).bit_length())


def generate_tokens(advance: Callable[[list[int]], "int | list[int]"], prompt_ids: list[int], max_tokens: int,
                    eos_ids: Iterable[int], max_seq_len: int, decode: Callable[[list[int]], str],
                    on_token: Callable[[int], "bool | None"] | None = None) -> GenerationResult:
    """Feed the prompt, then each sampled token, to `advance` (which returns the next token id, or several: a
    speculative step's accepted drafts and the token after them; the last is fed back next).
    on_token(id) sees each token as it comes; returning True ends the generation there (a stop string)."""
    if not prompt_ids:
        raise ConfigError("the prompt is empty")
    if max_tokens < 1:
        raise ConfigError(f"max tokens must be >= 1, got {max_tokens}")
    if len(prompt_ids) >= max_seq_len:
        raise ConfigError(f"prompt of {len(prompt_ids)} tokens does not fit max sequence length {max_seq_len}: shorten "
                          f"the prompt, or re-partition with --max-seq-len {_next_rung(len(prompt_ids) + max_tokens)} "
                          "(within the model's trained length) and export again")
    eos = set(eos_ids)
    t0 = time.perf_counter()
    tokens = advance(list(prompt_ids))
    ttft = time.perf_counter() - t0
    t1 = time.perf_counter()
    out: list[int] = []
    stop = None
    while stop is None:
        for token in tokens if isinstance(tokens, list) else [tokens]:
            out.append(token)
            if on_token is not None and on_token(token):
                stop = "stop"
            elif token in eos:
                stop = "eos"
            elif len(out) >= max_tokens:
                stop = "max_tokens"
            elif len(prompt_ids) + len(out) >= max_seq_len:
                stop = "max_seq_len"
            if stop is not None:
                break
        else:
            tokens = advance([out[-1]])
    return GenerationResult(list(prompt_ids), out, decode(out), ttft, time.perf_counter() - t1, stop)
