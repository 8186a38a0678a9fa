"""KV cache quantization: per token and head, asymmetric, fp16 scale and minimum."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from splitlm.errors import ConfigError
from splitlm.model.llama import DenseKV, KVStorage


@dataclass
class QuantizedKV:
    codes: torch.Tensor
    """uint8 (B, H, T, D)."""
    scale: torch.Tensor
    """float16 (B, H, T, 1)."""
    minimum: torch.Tensor
    """float16 (B, H, T, 1)."""
    bits: int

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.codes.to(torch.float32) * self.scale.float() + self.minimum.float()).to(dtype)

    def nbytes_packed(self) -> int:
        return (self.codes.numel() * self.bits + 7) // 8 + 4 * self.scale.numel()

    def __getitem__(self, index) -> "QuantizedKV":
        return QuantizedKV(self.codes[index], self.scale[index], self.minimum[index], self.bits)


def concat_kv(a: QuantizedKV, b: QuantizedKV) -> QuantizedKV:
    """Append b's positions after a's (along T)."""
    return QuantizedKV(torch.cat((a.codes, b.codes), 2), torch.cat((a.scale, b.scale), 2),
                       torch.cat((a.minimum, b.minimum), 2), a.bits)


def quantize_kv(x: torch.Tensor, bits: int) -> QuantizedKV:
    """x (B, H, T, D) -> codes with one scale/min per (B, H, T)."""
    if bits not in (8, 4):
        raise ConfigError(f"KV bits {bits} cannot be quantized; use 8 or 4 (16 keeps the cache unquantized)")
    maxq = 2 ** bits - 1
    x = x.float()
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    m16 = lo.half()
    m16 = torch.where(m16.float() > lo, torch.nextafter(m16, torch.full_like(m16, float("-inf"))), m16)
    s = (hi - m16.float()) / maxq
    s16 = s.half()
    s16 = torch.where(s16.float() < s, torch.nextafter(s16, torch.full_like(s16, float("inf"))), s16)
    safe = torch.where(s16.float() > 0, s16.float(), torch.ones_like(s))
    codes = torch.clamp(torch.round((x - m16.float()) / safe), 0, maxq).to(torch.uint8)
    return QuantizedKV(codes, s16, m16, bits)


@dataclass(frozen=True)
class QuantizedKVStorage:
    """A KVCache storage (model.llama.KVStorage) that keeps `bits`-bit codes."""

    bits: int

    def __post_init__(self) -> None:
        if self.bits not in (8, 4):
            raise ConfigError(f"KV bits {self.bits} cannot be quantized; use 8 or 4 (16 keeps the cache unquantized)")

    def store(self, x: torch.Tensor) -> QuantizedKV:
        return quantize_kv(x, self.bits)

    def load(self, entry: QuantizedKV) -> torch.Tensor:
        return entry.dequantize()

    def concat(self, old: QuantizedKV, new: QuantizedKV) -> QuantizedKV:
        return concat_kv(old, new)

    def nbytes(self, entry: QuantizedKV) -> int:
        return entry.nbytes_packed()


def kv_storage(bits: int) -> KVStorage:
    """The KVCache storage for a plan's `kv_bits`: dense at 16, quantized at 8 or 4."""
    return DenseKV() if bits == 16 else QuantizedKVStorage(bits)
