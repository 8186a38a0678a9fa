"""The one reference torch module for the Llama family.

A `Transformer` owns a contiguous layer range [start, stop) of a model and,
optionally, the embedding (start == 0 on the head) and the final norm + LM head.
The full model, the device head, the cloud tail, the exported ONNX graph and the
quality evaluation are all this class with different ranges; layers a stage does
not own are placeholders and their weights are never loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from splitlm.model.rope import Rotary, apply_rotary
from splitlm.model.spec import ModelSpec


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax attention with grouped K/V heads, without materializing repeated K/V.

    q (B, H, T, D); k, v (B, Hkv, S, D); mask (T, S) or (B, 1, T, S) boolean (True = attend) or None.
    """
    b, h, t, d = q.shape
    hkv = k.shape[1]
    qg = q.reshape(b, hkv, h // hkv, t, d)  # (B, Hkv, rep, T, D)
    scores = (qg @ k.unsqueeze(2).transpose(-1, -2)) * (d ** -0.5)  # (B, Hkv, rep, T, S)
    if mask is not None:
        if mask.dim() == 4:
            mask = mask.unsqueeze(1)  # (B, 1, 1, T, S)
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return (probs @ v.unsqueeze(2)).reshape(b, h, t, d)  # (B, H, T, D)


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        h, kv, d, hd = spec.num_heads, spec.num_kv_heads, spec.hidden_size, spec.head_dim
        self.q_proj = nn.Linear(d, h * hd, bias=spec.qkv_bias)
        self.k_proj = nn.Linear(d, kv * hd, bias=spec.qkv_bias)
        self.v_proj = nn.Linear(d, kv * hd, bias=spec.qkv_bias)
        self.o_proj = nn.Linear(h * hd, d, bias=spec.o_bias)
        self.kv_quant: nn.Module | None = None
        """(k, v) -> (k̂, v̂) of the new positions, after rotary and before attention: what a quantized
        KV cache holds (the device's), set by the quantize package; None keeps them exact."""

    def queries(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The queries of x (B, T, d) after rotary: (B, H, T, D)."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.spec.num_heads, self.spec.head_dim).transpose(1, 2)
        return apply_rotary(q, cos, sin)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        past: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Returns the output and the keys/values of the T new positions (B, Hkv, T, D)."""
        s = self.spec
        b, t, _ = x.shape
        q = self.queries(x, cos, sin)
        k = self.k_proj(x).view(b, t, s.num_kv_heads, s.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(b, t, s.num_kv_heads, s.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        k = apply_rotary(k, cos, sin)
        if self.kv_quant is not None:
            k, v = self.kv_quant(k, v)
        k_all, v_all = k, v
        if past is not None:
            k_all = torch.cat((past[0], k), dim=2)  # (B, Hkv, P+T, D)
            v_all = torch.cat((past[1], v), dim=2)
        out = grouped_attention(q, k_all, v_all, mask)  # (B, H, T, D)
        out = out.transpose(1, 2).reshape(b, t, s.num_heads * s.head_dim)  # (B, T, H*D)
        return self.o_proj(out), (k, v)


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        d, i, bias = spec.hidden_size, spec.intermediate_size, spec.mlp_bias
        self.gate_proj = nn.Linear(d, i, bias=bias)
        self.up_proj = nn.Linear(d, i, bias=bias)
        self.down_proj = nn.Linear(i, d, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.self_attn = Attention(spec)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.mlp = MLP(spec)

    def forward(self, x, cos, sin, past, mask):
        h, present = self.self_attn(self.input_layernorm(x), cos, sin, past, mask)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), present


class MissingLayer(nn.Module):
    """Placeholder for a layer another stage owns; calling it is a bug."""

    def forward(self, *args, **kwargs):  # pragma: no cover - invariant
        raise RuntimeError("this layer belongs to another stage")


class StepCache(Protocol):
    """What a stage forward reads and writes: a KVCache, or a view of several as one batch."""

    length: int
    """Positions committed so far."""

    def read(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Layer `layer`'s keys and values (B, Hkv, length, D), or None before the first step."""

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Add the keys/values (B, Hkv, T, D) of T new positions."""

    def crop(self, length: int) -> None:
        """Forget every position at or after `length`."""


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@dataclass
class KVCache:
    """Keys and values of the layers one stage owns, for one batch of sequences, as computed.

    A quantized cache is modelled in the attention itself (Attention.kv_quant), so that the
    positions of a step attend to their own keys exactly as the cache will hold them, as
    onnxruntime's quantized cache does.
    """

    layers: dict = field(default_factory=dict)
    """layer index -> (keys, values), each (B, Hkv, length, D)."""
    length: int = 0
    """Positions committed so far: a forward that fails leaves it, and the layers, as they were."""
    _bytes: int = field(default=0, repr=False)

    def read(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        return self.layers.get(layer)

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Add the keys/values (B, Hkv, T, D) of T new positions."""
        old = self.layers.get(layer)
        self.layers[layer] = (k, v) if old is None else (torch.cat((old[0], k), 2), torch.cat((old[1], v), 2))
        self._bytes += _nbytes(k) + _nbytes(v)

    def crop(self, length: int) -> None:
        """Forget every position at or after `length`."""
        self.layers = {i: (k[:, :, :length], v[:, :, :length]) for i, (k, v) in self.layers.items()}
        self.length = min(self.length, length)
        self._bytes = sum(_nbytes(t) for kv in self.layers.values() for t in kv)

    def nbytes(self) -> int:
        """Bytes held (kept up to date on every append: O(1))."""
        return self._bytes

    def install(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Take over layer `layer`'s keys and values (B, Hkv, length, D), computed elsewhere (a moved split)."""
        if layer in self.layers:
            raise ValueError(f"the cache already holds layer {layer}")
        if k.shape != v.shape or k.dim() != 4 or k.shape[2] != self.length:
            raise ValueError(f"keys {tuple(k.shape)} and values {tuple(v.shape)} of layer {layer} are not (B, Hkv, {self.length}, D)")
        self.layers[layer] = (k, v)
        self._bytes += _nbytes(k) + _nbytes(v)

    def remove(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Give up layer `layer`'s keys and values (they move elsewhere)."""
        k, v = self.layers.pop(layer)
        self._bytes -= _nbytes(k) + _nbytes(v)
        return k, v


def causal_mask(past: int, new: int, device: torch.device | None = None) -> torch.Tensor | None:
    """Boolean (new, past+new) mask: query i sees keys j <= past + i. None when new == 1."""
    if new == 1:
        return None
    q = torch.arange(new, device=device)[:, None] + past
    k = torch.arange(past + new, device=device)[None, :]
    return k <= q


class _Inner(nn.Module):
    """Holds the parameters under Hugging Face's `model.` prefix."""

    def __init__(self, spec: ModelSpec, start: int, stop: int, embed: bool, final: bool) -> None:
        super().__init__()
        if embed:
            self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(
            Block(spec) if start <= i < stop else MissingLayer() for i in range(spec.num_layers)
        )
        if final:
            self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)


def _no_past(layer: int) -> None:
    return None


RotaryTables = tuple[torch.Tensor, torch.Tensor]
"""(cos, sin) of the positions of a step."""


class Transformer(nn.Module):
    """Layers [start, stop) of a Llama-family model, plus embedding and/or final norm + LM head."""

    def __init__(self, spec: ModelSpec, start: int = 0, stop: int | None = None, *, embed: bool | None = None, final: bool | None = None) -> None:
        super().__init__()
        stop = spec.num_layers if stop is None else stop
        if not 0 <= start <= stop <= spec.num_layers:
            raise ValueError(f"layer range [{start}, {stop}) is outside [0, {spec.num_layers}]")
        self.spec, self.start, self.stop = spec, start, stop
        self.embeds = start == 0 if embed is None else embed
        self.finalizes = stop == spec.num_layers if final is None else final
        self.model = _Inner(spec, start, stop, self.embeds, self.finalizes)
        if self.finalizes:
            self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
            if self.embeds and spec.tie_word_embeddings:
                self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary = Rotary(spec)

    @property
    def owned_layers(self) -> range:
        return range(self.start, self.stop)

    def prepare(self, inputs: torch.Tensor, positions: torch.Tensor | None = None, past: int = 0,
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, RotaryTables | None, torch.Tensor | None]:
        """What every layer of a step needs: x (B, T, d), the rotary tables of `positions`
        (default: T positions after `past`; None when the stage owns no layer) and the mask
        (default: causal after `past`, None for one position)."""
        x = self.model.embed_tokens(inputs) if self.embeds else inputs
        if not self.owned_layers:
            return x, None, mask
        b, t = x.shape[:2]
        if positions is None:
            positions = torch.arange(past, past + t, device=x.device).expand(b, t)
        if mask is None:
            mask = causal_mask(past, t, x.device)
        return x, self.rotary(positions), mask

    def run_layers(self, x: torch.Tensor, rotary: RotaryTables | None, mask: torch.Tensor | None,
                   past: Callable[[int], tuple[torch.Tensor, torch.Tensor] | None],
                   layers: range | None = None) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """The owned blocks over x (`layers`: a sub-range of them, default all); `past(i)`: layer i's
        earlier keys/values or None. Returns the output and each run layer's keys/values of the new
        positions (B, Hkv, T, D)."""
        new = []
        for i in self.owned_layers if layers is None else layers:
            x, kv = self.model.layers[i](x, *rotary, past(i), mask)
            new.append(kv)
        return x, new

    def finish(self, x: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """Final norm + LM head on a finalizing stage (logits), the hidden states otherwise."""
        if not self.finalizes:
            return x
        return self.lm_head(self.model.norm(x[:, -1:] if last_only else x))

    def layer_range(self, start: int | None = None, stop: int | None = None) -> range:
        """Owned layers [start, stop) (default: all of them); ValueError outside the owned range."""
        start = self.start if start is None else start
        stop = self.stop if stop is None else stop
        if not self.start <= start <= stop <= self.stop:
            raise ValueError(f"layers [{start}, {stop}) are not within this stage's [{self.start}, {self.stop})")
        return range(start, stop)

    def forward(self, inputs: torch.Tensor, positions: torch.Tensor | None = None, cache: StepCache | None = None,
                mask: torch.Tensor | None = None, last_only: bool = False, start: int | None = None,
                stop: int | None = None) -> torch.Tensor:
        """Run the owned part on T new positions.

        inputs: token ids (B, T) when this stage embeds, else hidden states (B, T, d).
        positions: (B, T) absolute positions; default continues after the cache.
        cache: gets the new keys/values, only once every layer has run; None runs without one.
        mask: optional (B, 1, T, P+T) boolean mask; default is causal.
        last_only: a finalizing stage computes logits for the last position only (B, 1, V).
        start, stop: run only owned layers [start, stop) (a session whose split moved, or a prefix of
        a head); the inputs are then the hidden states at `start` (the embedding runs only from 0).
        Returns logits (B, T, V) if this stage finalizes and the run reaches its last layer, else
        hidden states (B, T, d).
        """
        layers = self.layer_range(start, stop)
        past = cache.length if cache is not None else 0
        if layers.start != self.start and self.embeds:
            raise ValueError("a stage that embeds runs from its first layer")
        x, rotary, mask = self.prepare(inputs, positions, past, mask)
        x, new = self.run_layers(x, rotary, mask, cache.read if cache is not None else _no_past, layers)
        if cache is not None:
            try:
                for i, (k, v) in zip(layers, new):
                    cache.append(i, k, v)
            except BaseException:
                cache.crop(past)  # a partial commit is taken back
                raise
            cache.length = past + x.shape[1]
        return self.finish(x, last_only) if layers.stop == self.stop else x

    @torch.inference_mode()
    def recompute_kv(self, hidden: torch.Tensor, layers: range, chunk: int) -> KVCache:
        """The keys and values of owned `layers` for positions [0, T), computed from the hidden states (1, T, d) that
        entered layers.start, `chunk` positions at a time (a "recompute" split move): a cache that holds them."""
        fresh = KVCache()
        for start in range(0, hidden.shape[1], max(1, chunk)):
            self(hidden[:, start:start + chunk], cache=fresh, start=layers.start, stop=layers.stop)
        if not hidden.shape[1]:  # no positions yet
            for i in layers:
                fresh.install(i, *(hidden.new_zeros(1, self.spec.num_kv_heads, 0, self.spec.head_dim) for _ in range(2)))
        return fresh

    def forward_explicit(self, inputs: torch.Tensor, positions: torch.Tensor, past: list[torch.Tensor],
                         mask: torch.Tensor | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The same step in past-in/present-out form (what the exported graph computes): `past` holds
        keys and values per owned layer, alternating, each (B, Hkv, P, D). Returns the output and
        the presents, keys and values alternating, each (B, Hkv, P+T, D)."""
        x, rotary, mask = self.prepare(inputs, positions, 0, mask)
        x, new = self.run_layers(x, rotary, mask, lambda i: (past[2 * (i - self.start)], past[2 * (i - self.start) + 1]))
        presents = []
        for j, (k, v) in enumerate(new):
            presents += [torch.cat((past[2 * j], k), 2), torch.cat((past[2 * j + 1], v), 2)]  # (B, Hkv, P+T, D)
        return self.finish(x), presents

    def state_dict_names(self) -> list[str]:
        """Checkpoint tensor names this stage needs (tied LM head maps to the embedding)."""
        return list(self.state_dict().keys())
