"""Split execution in one process: the head stage and the tail stage of one model.

This is the reference for every distributed path: the gRPC path must produce
exactly what `LocalSplit.generate` produces.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from splitlm.errors import ConfigError
from splitlm.model.checkpoint import Checkpoint
from splitlm.model.llama import KVCache, Transformer
from splitlm.model.load import build_stage
from splitlm.sampling import Sampler, SamplingParams


@dataclass
class GenerationResult:
    """What one generation produced and how long it took."""

    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    ttft_s: float
    decode_s: float
    stop_reason: str
    """'eos', 'max_tokens' or 'max_seq_len'."""
    hidden_bytes: int = 0
    """Bytes of split activations passed from head to tail."""
    extra: dict = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        n = len(self.token_ids) - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else float("nan")


class LocalSplit:
    """Head (embed + layers [0, ℓ)) and tail (layers [ℓ, L) + norm + LM head) in one process."""

    def __init__(self, ckpt: Checkpoint, split: int, *, prefill_chunk: int = 128, max_seq_len: int | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        L = ckpt.spec.num_layers
        if not isinstance(split, int) or not 0 <= split <= L:
            raise ConfigError(f"split layer {split!r} is outside [0, {L}] for {ckpt.model_id}")
        if prefill_chunk < 1:
            raise ConfigError(f"prefill chunk must be >= 1, got {prefill_chunk}")
        self.ckpt, self.spec, self.split = ckpt, ckpt.spec, split
        self.prefill_chunk = prefill_chunk
        self.max_seq_len = max_seq_len or ckpt.spec.max_position
        self.head: Transformer = build_stage(ckpt, 0, split, embed=True, final=split == L, dtype=dtype)
        self.tail: Transformer | None = build_stage(ckpt, split, L, embed=False, final=True, dtype=dtype) if split < L else None
        self.link: Callable[[torch.Tensor], torch.Tensor] = lambda h: h
        """What happens to h_ℓ between head and tail (identity here; the codec later)."""

    def new_caches(self) -> tuple[KVCache, KVCache]:
        return KVCache(), KVCache()

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, caches: tuple[KVCache, KVCache] | None = None) -> torch.Tensor:
        """ids (B, T) -> logits (B, T, V), through head, link and tail, in prefill chunks."""
        head_cache, tail_cache = caches if caches is not None else (None, None)
        if head_cache is None and ids.shape[1] > self.prefill_chunk:
            head_cache, tail_cache = self.new_caches()
        outs = []
        for start in range(0, ids.shape[1], self.prefill_chunk):
            chunk = ids[:, start:start + self.prefill_chunk]
            h = self.head(chunk, cache=head_cache)
            if self.tail is not None:
                h = self.tail(self.link(h), cache=tail_cache)
            outs.append(h)
        return torch.cat(outs, dim=1)  # (B, T, V)

    def generate(self, prompt_ids: list[int], max_tokens: int, sampling: SamplingParams = SamplingParams(),
                 on_token: Callable[[int], None] | None = None) -> GenerationResult:
        """Prefill the prompt in chunks, then decode one token at a time."""
        if not prompt_ids:
            raise ConfigError("the prompt is empty")
        if max_tokens < 1:
            raise ConfigError(f"max tokens must be >= 1, got {max_tokens}")
        if len(prompt_ids) >= self.max_seq_len:
            raise ConfigError(f"prompt of {len(prompt_ids)} tokens does not fit max sequence length {self.max_seq_len}")
        sampler = Sampler(sampling)
        caches = self.new_caches()
        eos = set(self.spec.eos_token_ids)
        t0 = time.perf_counter()
        logits = self.forward(torch.tensor([prompt_ids]), caches)[0, -1]
        out: list[int] = []
        ttft = decode_start = 0.0
        stop = "max_tokens"
        while True:
            token = sampler(logits.float().numpy())
            out.append(token)
            if len(out) == 1:
                ttft = time.perf_counter() - t0
                decode_start = time.perf_counter()
            if on_token is not None:
                on_token(token)
            if token in eos:
                stop = "eos"
                break
            if len(out) >= max_tokens:
                break
            if len(prompt_ids) + len(out) >= self.max_seq_len:
                stop = "max_seq_len"
                break
            logits = self.forward(torch.tensor([[token]]), caches)[0, -1]
        decode_s = time.perf_counter() - decode_start
        tok = self.ckpt.tokenizer()
        return GenerationResult(prompt_ids, out, tok.decode(out), ttft, decode_s, stop)
