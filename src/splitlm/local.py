"""Split execution in one process: the head stage and the tail stage of one model.

This is the reference for every distributed path: the gRPC path must produce
exactly what `LocalSplit.generate` produces. A Plan sets the device and cloud
weight precision, the device KV precision and the activation codec on the link.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from splitlm.errors import ConfigError
from splitlm.model.checkpoint import Checkpoint
from splitlm.model.llama import KVCache, Transformer
from splitlm.model.load import build_stage
from splitlm.partition.plan import CodecConfig, Plan
from splitlm.quantize import codec
from splitlm.quantize.apply import quantize_stage
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
    link_bytes: int = 0
    """Bytes of encoded activations sent from head to tail."""
    extra: dict = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        n = len(self.token_ids) - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else float("nan")


@dataclass
class LinkMeter:
    """Counts what crosses the split."""

    bytes: int = 0
    tokens: int = 0

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / self.tokens if self.tokens else float("nan")


def exact_plan(ckpt: Checkpoint, split: int, **kw) -> Plan:
    """A plan with no quantization and an fp32 link: the split computes exactly the unsplit model."""
    return Plan(ckpt.model_id, ckpt.weights_hash, split, codec=CodecConfig("fp32"), **kw)


class LocalSplit:
    """Head (embed + layers [0, ℓ)) and tail (layers [ℓ, L) + norm + LM head) in one process."""

    def __init__(self, ckpt: Checkpoint, split: int | None = None, *, plan: Plan | None = None,
                 prefill_chunk: int = 128, max_seq_len: int | None = None, dtype: torch.dtype = torch.float32,
                 calib_ids: list[list[int]] | None = None, progress: bool = False) -> None:
        L = ckpt.spec.num_layers
        if plan is None:
            if split is None:
                raise ConfigError("give a split layer or a plan")
            if not isinstance(split, int) or not 0 <= split <= L:
                raise ConfigError(f"split layer {split!r} is outside [0, {L}] for {ckpt.model_id}")
            if prefill_chunk < 1:
                raise ConfigError(f"prefill chunk must be >= 1, got {prefill_chunk}")
            plan = exact_plan(ckpt, split, prefill_chunk=prefill_chunk, max_seq_len=max_seq_len or ckpt.spec.max_position)
        plan.check_model(L)
        self.ckpt, self.spec, self.plan = ckpt, ckpt.spec, plan
        self.split = plan.split_layer
        self.prefill_chunk = plan.prefill_chunk
        self.max_seq_len = plan.max_seq_len
        self.meter = LinkMeter()
        cache_dir = Path(ckpt.path) / "quant"
        calib = [torch.tensor([w]) for w in calib_ids] if calib_ids else None
        self.head: Transformer = quantize_stage(
            build_stage(ckpt, 0, self.split, embed=True, final=self.split == L, dtype=dtype),
            plan.device_weights, calib, cache_dir, ckpt.weights_hash, progress)
        self.tail: Transformer | None = None
        if self.split < L:
            tail_calib = None
            if calib is not None and plan.cloud_weights.method != "rtn" and plan.cloud_weights.bits != 16:
                with torch.inference_mode():
                    tail_calib = [self.head(c) for c in calib]
            self.tail = quantize_stage(build_stage(ckpt, self.split, L, embed=False, final=True, dtype=dtype),
                                       plan.cloud_weights, tail_calib, cache_dir, ckpt.weights_hash, progress)

    def link(self, h: torch.Tensor) -> torch.Tensor:
        """Encode h_ℓ (B, T, d) into frames and decode them, as the wire would; counts bytes."""
        out = []
        for row in h:
            frame = codec.encode(row, self.plan.codec, "torch")
            self.meter.bytes += len(frame)
            self.meter.tokens += row.shape[0]
            out.append(codec.decode(frame, "torch"))
        return torch.stack(out).to(h.dtype)  # (B, T, d)

    def new_caches(self) -> tuple[KVCache, KVCache]:
        return KVCache(bits=self.plan.kv_bits), KVCache()

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
        bytes_before = self.meter.bytes
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
        return GenerationResult(prompt_ids, out, tok.decode(out), ttft, decode_s, stop, self.meter.bytes - bytes_before)
