"""The device's quantized KV cache: symmetric, one static scale per KV channel (head × dim), as
onnxruntime's GroupQueryAttention keeps it (kv_cache_bit_width 8 or 4, PER_CHANNEL): codes
clip(rint(x / s), −2^(b−1), 2^(b−1) − 1), K after rotary. The scales come from the absolute maxima
of each channel over calibration text, through the head's own weights.

In torch the cache is modelled in the attention (Attention.kv_quant): new keys and values are
rounded to what the cache will hold before anything attends to them, as in the graph.
"""

from __future__ import annotations

import torch
from torch import nn

from splitlm.errors import ConfigError
from splitlm.model.llama import Transformer

KV_CALIBRATION_WINDOWS = 2
"""Calibration windows (of corpus.WINDOW tokens) the KV scales are measured on."""
KV_HEADROOM = {8: 1.5, 4: 1.0}
"""Range above the calibration maxima that a scale covers, per width, so that text unlike the calibration's
does not clip. On SmolLM2 (2 windows, int4 weights): kv 8 at 1.0 / 2.0 gave perplexity +0.0 / +0.1 %; kv 4 at
1.0 gave +9.7 %, and less range (0.7, 0.5) only worse (+20 %, +97 %)."""


def qmax(bits: int) -> int:
    if bits not in (8, 4):
        raise ConfigError(f"KV bits {bits} cannot be quantized; use 8 or 4 (16 keeps the cache unquantized)")
    return 2 ** (bits - 1) - 1


class StaticKVQuant(nn.Module):
    """Fake quantization of one layer's new keys and values (B, Hkv, T, D) with per-channel scales."""

    def __init__(self, bits: int, k_scale: torch.Tensor, v_scale: torch.Tensor) -> None:
        super().__init__()
        self.bits = bits
        self.q = qmax(bits)
        self.register_buffer("k_scale", k_scale.float())
        self.register_buffer("v_scale", v_scale.float())
        """(Hkv·D,) float32 each."""

    def _fake(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        s = scale.view(1, x.shape[1], 1, x.shape[3])
        return torch.clamp(torch.round(x.float() / s), -self.q - 1, self.q).mul(s).to(x.dtype)

    def forward(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._fake(k, self.k_scale), self._fake(v, self.v_scale)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, per channel"


@torch.inference_mode()
def quantize_kv_cache(stage: Transformer, bits: int, calib_ids: list[list[int]]) -> Transformer:
    """Give every owned layer of `stage` (a stage that embeds) a StaticKVQuant at `bits`, with scales
    from the per-channel absolute maxima of its keys and values over `calib_ids`."""
    if bits == 16 or not stage.owned_layers:
        return stage
    if not calib_ids:
        raise ConfigError("a quantized KV cache needs calibration text for its scales")
    q = qmax(bits)
    amax: dict[int, list[torch.Tensor]] = {}
    hooks = []
    for i in stage.owned_layers:
        attn = stage.model.layers[i].self_attn

        def hook(_mod, _args, out, i=i):
            k, v = out[1]
            ka, va = (t.abs().amax(dim=(0, 2)).reshape(-1) for t in (k, v))  # (Hkv·D,)
            old = amax.get(i)
            amax[i] = [ka, va] if old is None else [torch.maximum(old[0], ka), torch.maximum(old[1], va)]

        hooks.append(attn.register_forward_hook(hook))
    try:
        for ids in calib_ids:
            stage(torch.tensor([ids]))
    finally:
        for h in hooks:
            h.remove()
    tiny = torch.finfo(torch.float32).tiny
    for i in stage.owned_layers:
        k, v = amax[i]
        room = KV_HEADROOM[bits] / q
        stage.model.layers[i].self_attn.kv_quant = StaticKVQuant(bits, (k * room).clamp_min(tiny), (v * room).clamp_min(tiny))
    return stage


def save_kv_scales(stage: Transformer, path) -> None:
    """Write the StaticKVQuant scales of `stage`'s layers to `path` (names.KV_SCALES_FILE's layout, numpy npz)."""
    import numpy as np

    spec, arrays = stage.spec, {}
    for i in stage.owned_layers:
        kvq = stage.model.layers[i].self_attn.kv_quant
        if kvq is None:
            raise ConfigError(f"layer {i} has no quantized KV cache: no scales to save")
        for name, scale in (("k", kvq.k_scale), ("v", kvq.v_scale)):
            arrays[f"{name}.{i}"] = scale.detach().float().numpy().reshape(spec.num_kv_heads, spec.head_dim)
    with open(path, "wb") as f:
        np.savez(f, **arrays)


@torch.inference_mode()
def query_energies(stage: Transformer, layers: range, calib_ids: list[list[int]]) -> dict:
    """Each layer's query energy per key channel, E[q²] after rotary over `calib_ids` and over the query heads
    that read the key head: {layer: (Hkv, D) float32}. The K/V codec steps keys by it (kv_codec.logit_steps)."""
    import numpy as np

    s = stage.spec
    sums: dict[int, torch.Tensor] = {}
    count = [0]
    hooks = []
    for i in layers:
        attn = stage.model.layers[i].self_attn

        def hook(mod, args, _out, i=i):
            q = mod.queries(*args[:3])  # (B, H, T, D)
            b, _, t, _ = q.shape
            e = q.float().square().sum(dim=(0, 2)).view(s.num_kv_heads, -1, s.head_dim).mean(1)  # (Hkv, D)
            sums[i] = e if i not in sums else sums[i] + e
            if i == layers.start:
                count[0] += b * t

        hooks.append(attn.register_forward_hook(hook))
    try:
        for ids in calib_ids:
            stage(torch.tensor([ids]), stop=layers.stop)
    finally:
        for h in hooks:
            h.remove()
    return {i: (sums[i] / count[0]).numpy().astype(np.float32) for i in layers}
