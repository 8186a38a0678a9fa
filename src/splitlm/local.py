"""Split execution in one process: the head stage and the tail stage of one model.

This is the reference for every distributed path: the gRPC path must produce
exactly what `LocalSplit.generate` produces. A Plan sets the device and cloud
weight precision, the device KV precision and the activation codec on the link.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import torch

from splitlm.errors import ConfigError
from splitlm.generation import GenerationResult, generate_tokens
from splitlm.model.checkpoint import Checkpoint
from splitlm.model.llama import KVCache
from splitlm.partition.plan import Plan
from splitlm.quantize import codec, kv_wire
from splitlm.quantize.config import CodecConfig
from splitlm.sampling import Sampler, SamplingParams
from splitlm.stages import build_stages, codec_bases, move_energies


@dataclass
class LinkMeter:
    """Counts what crosses the split."""

    bytes: int = 0
    tokens: int = 0

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / self.tokens if self.tokens else float("nan")


@dataclass
class SplitCaches:
    """One sequence's state in a LocalSplit: the K/V of the head's layers and of the tail's, the split in
    force, and the plan's moves still to make."""

    head: KVCache
    tail: KVCache
    split: int
    moves: list
    kept: dict = field(default_factory=dict)
    """MoveCodec "recompute": cut -> the head's hidden states entering it, one (1, T, d) tensor per forward."""


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
        self.head, self.tail = build_stages(ckpt, plan, calib_ids, dtype=dtype, progress=progress)
        self.bases = codec_bases(ckpt, plan, self.head)
        """The entropy 'ans' codec's calibrated basis at each split the plan may run at ({} for other codecs)."""
        self.kv_energies = move_energies(ckpt, plan, self.head)
        """The query energies the K/V codec steps moved keys by ({} unless the plan's moves are coded)."""

    def link(self, h: torch.Tensor, split: int | None = None) -> torch.Tensor:
        """Encode h_ℓ (B, T, d) at split `split` (default the plan's) into frames and decode them, as the wire
        would; counts bytes."""
        basis = self.bases.get(self.split if split is None else split)
        out = []
        for row in h:
            frame = codec.encode(row, self.plan.codec, "torch", basis)
            self.meter.bytes += len(frame)
            self.meter.tokens += row.shape[0]
            out.append(codec.decode(frame, "torch", bases=basis))
        return torch.stack(out).to(h.dtype)  # (B, T, d)

    def new_caches(self) -> "SplitCaches":
        return SplitCaches(KVCache(), KVCache(), self.split, list(self.plan.split_moves))

    def _move(self, caches: "SplitCaches", layer: int) -> None:
        """Move the split: the K/V of the layers between the old and the new split change sides, as the wire moves them
        (the head's cache holds what the device's holds: a quantized cache's values, already rounded), through the
        K/V codec under the plan's move codec "ans"."""
        src, dst = (caches.head, caches.tail) if layer < caches.split else (caches.tail, caches.head)
        layers = range(layer, caches.split) if layer < caches.split else range(caches.split, layer)
        held = src.read(layers.start)
        if held is not None and held[0].shape[0] != 1 and self.plan.move_codec.coder != "exact":
            raise ConfigError(f"a {self.plan.move_codec.coder!r} move codes one sequence: these caches hold {held[0].shape[0]}")
        rows = sum(t.shape[1] for t in caches.kept.get(layer, ()))
        if self.plan.move_codec.coder == "recompute" and layer < caches.split and rows == src.length:
            # (a cut the head did not run since the session began has no complete rows: its K/V go as "exact")
            kept = torch.cat(caches.kept[layer], 1)[0].float() if rows else torch.zeros(0, self.spec.hidden_size)
            assembler = kv_wire.Assembler(layers, src.length, self.spec.num_kv_heads, self.spec.head_dim,
                                          hidden_size=self.spec.hidden_size)
            for item in kv_wire.hidden_chunks(layer, kept.numpy()):
                assembler.add(item)
            dtype = src.read(layers.start)[0].dtype
            fresh = self.tail.recompute_kv(torch.from_numpy(assembler.hidden())[None].to(dtype), layers, self.prefill_chunk)
            for i in layers:
                src.remove(i)
                dst.install(i, *fresh.remove(i))
        elif self.plan.move_codec.coder == "ans":
            assembler = kv_wire.Assembler(layers, src.length, self.spec.num_kv_heads, self.spec.head_dim)
            for i in layers:
                k, v = (t[0].float().numpy() for t in src.read(i))
                for item in kv_wire.move_chunks(i, k, v, self.plan.move_codec, self.kv_energies):
                    assembler.add(item)
            for i, (k, v) in assembler.result().items():
                dtype = src.read(i)[0].dtype
                src.remove(i)
                dst.install(i, *(torch.from_numpy(t)[None].to(dtype) for t in (k, v)))
        else:
            for i in layers:
                dst.install(i, *src.remove(i))
        caches.split = layer

    def _keeping(self, caches: "SplitCaches | None", split: int):
        """Under MoveCodec "recompute", while the head runs: keep its hidden states entering each layer a move may go
        back to (the device keeps them as it computes them, DeviceHead.kept)."""
        if caches is None or self.plan.move_codec.coder != "recompute":
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        for cut in self.plan.splits():
            if cut <= split:  # (the split itself too: after a move shallower to it, its rows go on as DeviceHead's do)
                module = self.head.model.embed_tokens if cut == 0 else self.head.model.layers[cut - 1]

                def keep(_module, _inputs, out, cut=cut):
                    caches.kept.setdefault(cut, []).append((out[0] if isinstance(out, tuple) else out).detach())

                stack.callback(module.register_forward_hook(keep).remove)
        return stack

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, caches: "SplitCaches | None" = None,
                on_prefill: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """ids (B, T) -> logits (B, T, V), through head, link and tail, in prefill chunks. With caches, the
        plan's split moves run when the sequence reaches their lengths, at the end of a chunk (as the device
        makes them); a call of one chunk without caches runs at the plan's split."""
        if caches is None and ids.shape[1] > self.prefill_chunk:
            caches = self.new_caches()
        outs = []
        for start in range(0, ids.shape[1], self.prefill_chunk):
            chunk = ids[:, start:start + self.prefill_chunk]
            split = self.split if caches is None else caches.split
            with self._keeping(caches, split):
                h = self.head(chunk, cache=caches and caches.head, stop=split)
            if self.tail is not None:
                h = self.tail(self.link(h, split), cache=caches and caches.tail, start=split)
            outs.append(h)
            if on_prefill is not None and ids.shape[1] > 1:
                on_prefill(start + chunk.shape[1], ids.shape[1])
            while caches is not None and caches.moves and caches.head.length >= caches.moves[0][0]:
                self._move(caches, caches.moves.pop(0)[1])
        return torch.cat(outs, dim=1)  # (B, T, V)

    def generate(self, prompt_ids: list[int], max_tokens: int, sampling: SamplingParams = SamplingParams(),
                 on_token: Callable[[int], None] | None = None, on_prefill: Callable[[int, int], None] | None = None) -> GenerationResult:
        """Prefill the prompt in chunks (on_prefill(done, total) after each), then decode one token at a time."""
        sampler = Sampler(sampling)
        caches = self.new_caches()
        bytes_before = self.meter.bytes

        def advance(ids: list[int]) -> int:
            logits = self.forward(torch.tensor([ids]), caches, on_prefill)[0, -1].float().numpy()
            return sampler(logits, caches.head.length if self.head.owned_layers else caches.tail.length)

        result = generate_tokens(advance, prompt_ids, max_tokens, self.spec.eos_token_ids, self.max_seq_len,
                                 self.ckpt.tokenizer().decode, on_token)
        result.link_bytes = self.meter.bytes - bytes_before
        return result
