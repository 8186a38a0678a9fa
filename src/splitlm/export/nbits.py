"""Our group-quantized weights in onnxruntime's MatMulNBits layout (numpy only).

MatMulNBits computes Y = A · Wᵀ with W (N, K) stored as B uint8 (N, k_blocks, blob),
codes packed low bits first, per-block scales (N·k_blocks) and packed zero points.
3-bit codes travel in the 4-bit container (identical values, 4 bits of storage).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from splitlm.quantize import bitpack

CONTAINER_BITS = {8: 8, 4: 4, 3: 4, 2: 2}
"""Our bit width -> MatMulNBits `bits`."""


@dataclass(frozen=True)
class NBitsWeight:
    """The inputs and attributes of one MatMulNBits node."""

    B: np.ndarray
    """uint8 (N, k_blocks, block_size·bits/8)."""
    scales: np.ndarray
    """float32 (N·k_blocks,)."""
    zero_points: np.ndarray | None
    """uint8 (N·ceil(k_blocks·bits/8),); None: MatMulNBits' default, 2^(bits−1)."""
    K: int
    N: int
    bits: int
    block_size: int


def to_nbits(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray, bits: int, group_size: int) -> NBitsWeight:
    """codes (N, K) uint8, scales (N, G) fp16, zeros (N, G) uint8 -> MatMulNBits tensors.

    One group per row (a group size that need not be a power of two) becomes one block
    of the next power of two; the padding holds the zero point and meets no input.
    """
    N, K = codes.shape
    container = CONTAINER_BITS[bits]
    G = scales.shape[1]
    if G == 1 and group_size >= K:
        block = max(16, 1 << (K - 1).bit_length())
    elif group_size >= 16 and group_size & (group_size - 1) == 0:
        block = group_size
    else:
        raise ValueError(f"group size {group_size} is neither a power of two >= 16 nor one group per row")
    k_blocks = -(-K // block)
    if k_blocks != G:
        raise ValueError(f"{G} groups do not match {k_blocks} blocks of {block} over K={K}")
    full = np.empty((N, k_blocks * block), np.uint8)
    full[:, :K] = codes
    full[:, K:] = zeros[:, -1:]
    B = bitpack.pack(full.reshape(N, k_blocks, block), container)
    per = 8 // container
    zp = np.zeros((N, -(-k_blocks // per) * per), np.uint8)
    zp[:, :k_blocks] = zeros
    return NBitsWeight(B, scales.astype(np.float32).reshape(-1), bitpack.pack(zp, container).reshape(-1),
                       K, N, container, block)


def dequantize_nbits(w: NBitsWeight) -> np.ndarray:
    """W (N, K) float32 exactly as MatMulNBits reconstructs it."""
    k_blocks = w.B.shape[1]
    q = bitpack.unpack(w.B, w.block_size, w.bits).reshape(w.N, k_blocks * w.block_size)[:, : w.K].astype(np.float32)
    if w.zero_points is None:
        z = np.full((w.N, k_blocks), 1 << (w.bits - 1), np.float32)
    else:
        z = bitpack.unpack(w.zero_points.reshape(w.N, -1), k_blocks, w.bits).astype(np.float32)
    cols = np.arange(w.K) // w.block_size
    return (q - z[:, cols]) * w.scales.reshape(w.N, k_blocks)[:, cols]
