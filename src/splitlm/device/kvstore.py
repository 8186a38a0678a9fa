"""Quantized KV storage for the device runtime (numpy): the same per-token, per-head
asymmetric scheme as `splitlm.quantize.kv`, bit for bit, with 4-bit codes packed two per byte (quantize.bitpack).
"""

from __future__ import annotations

import numpy as np

from splitlm.errors import ConfigError
from splitlm.quantize import bitpack


def quantize_rows(x: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x (..., D) float32 -> codes uint8 (..., D), scale fp16 (..., 1), min fp16 (..., 1)."""
    if bits not in (8, 4):
        raise ConfigError(f"KV bits {bits} cannot be quantized; use 8 or 4")
    maxq = np.float32(2 ** bits - 1)
    x = x.astype(np.float32, copy=False)
    lo, hi = x.min(-1, keepdims=True), x.max(-1, keepdims=True)
    m16 = lo.astype(np.float16)
    m16 = np.where(m16.astype(np.float32) > lo, np.nextafter(m16, np.float16(-np.inf)), m16)
    s = (hi - m16.astype(np.float32)) / maxq
    s16 = s.astype(np.float16)
    s16 = np.where(s16.astype(np.float32) < s, np.nextafter(s16, np.float16(np.inf)), s16)
    safe = np.where(s16.astype(np.float32) > 0, s16.astype(np.float32), np.float32(1))
    codes = np.clip(np.rint((x - m16.astype(np.float32)) / safe), 0, maxq).astype(np.uint8)
    return codes, s16, m16


class QuantizedKVStore:
    """Keys or values of one layer, (B, H, T, D), stored as codes; grows along T."""

    def __init__(self, bits: int, batch: int, heads: int, head_dim: int) -> None:
        if bits == 4 and head_dim % 2:
            raise ConfigError(f"4-bit KV needs an even head_dim, got {head_dim}")
        self.bits, self.head_dim = bits, head_dim
        width = head_dim // 2 if bits == 4 else head_dim
        self.codes = np.zeros((batch, heads, 0, width), np.uint8)
        self.scale = np.zeros((batch, heads, 0, 1), np.float16)
        self.minimum = np.zeros((batch, heads, 0, 1), np.float16)

    @property
    def length(self) -> int:
        return self.codes.shape[2]

    def append(self, x: np.ndarray) -> None:
        """Add positions x (B, H, T, D) float32."""
        codes, s, m = quantize_rows(x, self.bits)
        if self.bits == 4:
            codes = bitpack.pack(codes, 4)
        self.codes = np.concatenate((self.codes, codes), 2)
        self.scale = np.concatenate((self.scale, s), 2)
        self.minimum = np.concatenate((self.minimum, m), 2)

    def dequantize(self) -> np.ndarray:
        codes = self.codes
        if self.bits == 4:
            codes = bitpack.unpack(codes, self.head_dim, 4)
        return codes.astype(np.float32) * self.scale.astype(np.float32) + self.minimum.astype(np.float32)

    def nbytes(self) -> int:
        return self.codes.nbytes + self.scale.nbytes + self.minimum.nbytes
