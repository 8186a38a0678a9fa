"""The one bit-packing layout: small unsigned codes along the last axis, as an LSB-first bit
stream, zero-padded to a whole byte.

Code j occupies stream bits [j·b, (j+1)·b); bit i of byte k is stream bit 8k + i. When b
divides 8 this is "code 0 in the low bits": two 4-bit codes per byte with the even one in
the low nibble. The activation codec (2–8 bits), onnxruntime's MatMulNBits weights and
zero points, the Triton kernels' 4-bit weights and the device's 4-bit KV store all use it.
Works on numpy arrays and torch tensors alike through the codec's ops (codec_ops.NumpyOps,
codec_torch.TorchOps); numpy is the default, so the device needs no torch.
"""

from __future__ import annotations

from typing import Any

from splitlm.quantize.codec_ops import NumpyOps

NUMPY = NumpyOps()


def packed_width(n: int, bits: int) -> int:
    """Bytes holding n codes of `bits` bits."""
    return (n * bits + 7) // 8


def pack(codes: Any, bits: int, ops: Any = NUMPY) -> Any:
    """codes (..., n) integers < 2^bits -> (..., packed_width(n, bits)) uint8."""
    n = codes.shape[-1]
    lead = tuple(codes.shape[:-1])
    if 8 % bits == 0:  # whole codes per byte: shift and or, in uint8
        per = 8 // bits
        codes = ops.cast(codes, ops.u8)
        if n % per:
            codes = ops.concat([codes, ops.zeros((*lead, per - n % per), ops.u8)], -1)
        codes = codes.reshape(*lead, -(-n // per), per)
        packed = codes[..., 0]
        for i in range(1, per):
            packed = packed | (codes[..., i] << (i * bits))
        return packed
    width = packed_width(n, bits)
    stream = ((ops.cast(codes, ops.i64)[..., None] >> ops.arange(bits, ops.i64)) & 1).reshape(*lead, n * bits)
    if width * 8 > n * bits:
        stream = ops.concat([stream, ops.zeros((*lead, width * 8 - n * bits), ops.i64)], -1)
    return ops.cast(ops.sum(stream.reshape(*lead, width, 8) << ops.arange(8, ops.i64), -1), ops.u8)


def unpack(packed: Any, n: int, bits: int, ops: Any = NUMPY) -> Any:
    """(..., nbytes) uint8 -> codes (..., n) uint8."""
    lead = tuple(packed.shape[:-1])
    if 8 % bits == 0:
        per, mask = 8 // bits, (1 << bits) - 1
        parts = [(packed >> (i * bits)) & mask for i in range(per)]
        return ops.stack(parts, -1).reshape(*lead, packed.shape[-1] * per)[..., :n]
    stream = (ops.cast(packed, ops.i64)[..., None] >> ops.arange(8, ops.i64)) & 1  # (..., nbytes, 8)
    stream = stream.reshape(*lead, packed.shape[-1] * 8)[..., : n * bits].reshape(*lead, n, bits)
    return ops.cast(ops.sum(stream << ops.arange(bits, ops.i64), -1), ops.u8)
