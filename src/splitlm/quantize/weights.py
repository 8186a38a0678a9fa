"""Group-wise integer weight quantization: real codes + fp16 scales + integer zero points.

Layout (shared by export and kernels): a Linear weight W (out, in) is cut along
`in` into groups of `group_size` columns (the last group may be shorter; -1 in a
config means one group per row). Each group has an fp16 scale s and an integer
zero point z in [0, 2^bits); the reconstruction is Ŵ = s · (q − z), plus a per-group
min m where a source format stores one (GGUF Q4_1: Ŵ = d·q + m, carried with z = 0).
Symmetric quantization fixes z = 2^(bits−1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from splitlm.errors import ConfigError


@dataclass
class QuantizedTensor:
    """Integer codes of a (out, in) weight with per-group scales and zero points."""

    codes: torch.Tensor
    """uint8 (out, in), each in [0, 2^bits)."""
    scales: torch.Tensor
    """float16 (out, groups)."""
    zeros: torch.Tensor
    """uint8 (out, groups)."""
    bits: int
    group_size: int
    """Columns per group (the last group may be shorter)."""
    mins: torch.Tensor | None = None
    """float16 (out, groups) added to each group (a source format's block minimum), or None."""

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        out_f, in_f = self.codes.shape
        cols = torch.arange(in_f) // self.group_size
        s = self.scales.to(torch.float32)[:, cols]  # (out, in)
        z = self.zeros.to(torch.float32)[:, cols]
        w = (self.codes.to(torch.float32) - z) * s
        if self.mins is not None:
            w = w + self.mins.to(torch.float32)[:, cols]
        return w.to(dtype)

    def nbytes_packed(self) -> int:
        """Bytes when codes are bit-packed: what the weights cost on a device."""
        mins = 0 if self.mins is None else self.mins.numel() * 2
        return (self.codes.numel() * self.bits + 7) // 8 + self.scales.numel() * 2 + (self.zeros.numel() * self.bits + 7) // 8 + mins


def effective_group(group_size: int, in_features: int) -> int:
    return in_features if group_size == -1 else min(group_size, in_features)


def group_params(w: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (fp16, rounded up) and zero point for rows of one group w (out, g)."""
    maxq = 2 ** bits - 1
    w = w.float()
    if symmetric:
        amax = w.abs().amax(dim=1)
        scale = 2 * amax / maxq
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        lo = w.amin(dim=1).clamp(max=0)
        hi = w.amax(dim=1).clamp(min=0)
        scale = (hi - lo) / maxq
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    s16 = scale.half()
    s16 = torch.where(s16.float() < scale, torch.nextafter(s16, torch.full_like(s16, float("inf"))), s16)
    if not symmetric:
        zero = torch.clamp(torch.round(-lo / s16.float()), 0, maxq)
    return s16, zero


def quantize_with(w: torch.Tensor, scale16: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes of w (out, g) under given per-row scale and zero (out,)."""
    maxq = 2 ** bits - 1
    return torch.clamp(torch.round(w.float() / scale16.float()[:, None]) + zero[:, None], 0, maxq)


def rtn_quantize(w: torch.Tensor, bits: int, group_size: int, symmetric: bool = False) -> QuantizedTensor:
    """Round-to-nearest quantization of a (out, in) weight."""
    if bits not in (2, 3, 4, 8):
        raise ConfigError(f"weight bits {bits} cannot be quantized; use 8, 4, 3 or 2")
    out_f, in_f = w.shape
    g = effective_group(group_size, in_f)
    codes = torch.empty(out_f, in_f, dtype=torch.uint8)
    scales, zeros = [], []
    for start in range(0, in_f, g):
        block = w[:, start:start + g]
        s, z = group_params(block, bits, symmetric)
        codes[:, start:start + g] = quantize_with(block, s, z, bits).to(torch.uint8)
        scales.append(s)
        zeros.append(z)
    return QuantizedTensor(codes, torch.stack(scales, 1), torch.stack(zeros, 1).to(torch.uint8), bits, g)


class _HoldsQuantized(nn.Module):
    """A module whose matrix is a QuantizedTensor, kept as buffers (codes, scales, zeros, mins)."""

    def __init__(self, q: QuantizedTensor) -> None:
        super().__init__()
        self.bits, self.group_size = q.bits, q.group_size
        for name in ("codes", "scales", "zeros", "mins"):
            self.register_buffer(name, getattr(q, name))

    @property
    def quantized(self) -> QuantizedTensor:
        return QuantizedTensor(self.codes, self.scales, self.zeros, self.bits, self.group_size, self.mins)


class QuantLinear(_HoldsQuantized):
    """A Linear whose weight is a QuantizedTensor.

    forward is the reference: dequantize, then matmul (kernels replace it on GPU);
    the dequantized weight is cached, so evaluation runs at fp32 speed.
    """

    def __init__(self, q: QuantizedTensor, bias: torch.Tensor | None) -> None:
        super().__init__(q)
        self.out_features, self.in_features = q.shape
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        self._weight: torch.Tensor | None = None

    def weight_for(self, dtype: torch.dtype) -> torch.Tensor:
        if self._weight is None or self._weight.dtype != dtype:
            self._weight = self.quantized.dequantize(dtype)
        return self._weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_for(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group={self.group_size}"


class QuantEmbedding(_HoldsQuantized):
    """An embedding table held as a QuantizedTensor (vocab, hidden): rows are looked up, then dequantized."""

    def __init__(self, q: QuantizedTensor) -> None:
        super().__init__(q)
        self.num_embeddings, self.embedding_dim = q.shape

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        rows = QuantizedTensor(self.codes[flat], self.scales[flat], self.zeros[flat], self.bits, self.group_size,
                               None if self.mins is None else self.mins[flat])
        return rows.dequantize().reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"vocab={self.num_embeddings}, dim={self.embedding_dim}, bits={self.bits}, group={self.group_size}"
