"""Weight-only group-quantized matmul: y = x · Ŵᵀ (+ bias) with Ŵ = s · (q − z) per group.

The quantizer's layout (`quantize.weights`): a (N, K) weight cut along K into groups of
`group` columns, each with an fp16 scale and a uint8 zero point per output row. The kernels
read the codes packed: 8-bit codes as they are (N, K) uint8; 4-bit codes two per byte along K,
even column in the low nibble (N, ceil(K/2)) — `pack_weight` does this once when the tail is
built. Two kernels: a decode-shaped one for a few rows (memory-bound: each program streams a
BLOCK_N × K strip of codes over all of K; there is no split-K) and a prefill-shaped GEMM on
tensor cores (tl.dot). `wq_matmul_reference` is the torch
reference (dequantize, then matmul in fp32) with the same signature.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from splitlm.errors import ConfigError
from splitlm.quantize import bitpack, codec
from splitlm.quantize.weights import QuantizedTensor

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None

KERNEL_BITS = (4, 8)
DECODE_MAX_ROWS = 8
"""Rows up to which the decode-shaped kernel runs; more go to the GEMM."""


@dataclass
class PackedWeight:
    """A quantized Linear weight in the kernels' layout (all tensors on one device)."""

    qweight: torch.Tensor
    """uint8 (N, K) for 8 bits, (N, ceil(K/2)) for 4 bits."""
    scales: torch.Tensor
    """float16 (N, G)."""
    zeros: torch.Tensor
    """uint8 (N, G)."""
    bits: int
    group: int
    in_features: int

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    def to(self, device) -> "PackedWeight":
        return PackedWeight(self.qweight.to(device), self.scales.to(device), self.zeros.to(device), self.bits,
                            self.group, self.in_features)


def pack_weight(q: QuantizedTensor) -> PackedWeight:
    """The quantizer's codes (one per byte) -> the kernels' layout."""
    if q.bits not in KERNEL_BITS:
        raise ConfigError(f"the matmul kernels take {KERNEL_BITS}-bit weights, not {q.bits}")
    codes = bitpack.pack(q.codes, 4, codec.get_ops("torch")) if q.bits == 4 else q.codes
    return PackedWeight(codes.contiguous(), q.scales.contiguous(), q.zeros.contiguous(), q.bits, q.group_size,
                        q.codes.shape[1])


def unpack_codes(w: PackedWeight) -> torch.Tensor:
    """(N, K) uint8 codes back from the packed layout."""
    if w.bits == 8:
        return w.qweight
    return bitpack.unpack(w.qweight, w.in_features, 4, codec.get_ops("torch"))


def check_triton_device(device: torch.device | str) -> None:
    """ConfigError unless Triton kernels can run on `device`: CUDA, or anything under the
    interpreter (TRITON_INTERPRET=1, read when the kernels are defined)."""
    if triton is None:
        raise ConfigError("the Triton kernels need triton installed (pip install triton)")
    device = torch.device(device)
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError(f"Triton kernels on {device.type} run only under TRITON_INTERPRET=1 (set before start)")


def _check(x: torch.Tensor, w: PackedWeight, bias: torch.Tensor | None) -> None:
    if x.dim() != 2:
        raise ConfigError(f"x must be (rows, in_features), got shape {tuple(x.shape)}")
    if x.shape[1] != w.in_features:
        raise ConfigError(f"x has {x.shape[1]} features, the weight takes {w.in_features}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ConfigError(f"x dtype {x.dtype} is not float16, bfloat16 or float32")
    if w.bits not in KERNEL_BITS:
        raise ConfigError(f"weight bits {w.bits} not in {KERNEL_BITS}")
    width = w.in_features if w.bits == 8 else (w.in_features + 1) // 2
    groups = -(-w.in_features // w.group)
    if tuple(w.qweight.shape) != (w.out_features, width) or w.qweight.dtype != torch.uint8:
        raise ConfigError(f"qweight must be uint8 ({w.out_features}, {width}), got {w.qweight.dtype} {tuple(w.qweight.shape)}")
    if tuple(w.scales.shape) != (w.out_features, groups) or w.scales.dtype != torch.float16:
        raise ConfigError(f"scales must be float16 ({w.out_features}, {groups}), got {w.scales.dtype} {tuple(w.scales.shape)}")
    if tuple(w.zeros.shape) != (w.out_features, groups) or w.zeros.dtype != torch.uint8:
        raise ConfigError(f"zeros must be uint8 ({w.out_features}, {groups}), got {w.zeros.dtype} {tuple(w.zeros.shape)}")
    if w.bits == 4 and groups > 1 and w.group % 2:
        raise ConfigError(f"4-bit kernels need an even group size, not {w.group}")
    if bias is not None and tuple(bias.shape) != (w.out_features,):
        raise ConfigError(f"bias must be ({w.out_features},), got {tuple(bias.shape)}")
    devices = {t.device for t in (x, w.qweight, w.scales, w.zeros)} | ({bias.device} if bias is not None else set())
    if len(devices) != 1:
        raise ConfigError(f"x, weight and bias are on different devices: {sorted(map(str, devices))}")


def wq_matmul_reference(x: torch.Tensor, w: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """torch reference: dequantize Ŵ in fp32, y = x Ŵᵀ + bias in fp32, returned in x's dtype."""
    _check(x, w, bias)
    cols = torch.arange(w.in_features, device=x.device) // w.group
    wq = (unpack_codes(w).to(torch.float32) - w.zeros.to(torch.float32)[:, cols]) * w.scales.to(torch.float32)[:, cols]
    y = x.to(torch.float32) @ wq.t()
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype)


if triton is not None:

    @triton.jit
    def _load_dequant(w_ptr, s_ptr, z_ptr, n, k, live, stride_wn, G, GROUP, BITS: tl.constexpr):
        """Ŵ[n, k] in float32 for broadcastable index tensors n, k (masked by live)."""
        if BITS == 4:
            byte = tl.load(w_ptr + n * stride_wn + k // 2, mask=live, other=0)
            q = (byte >> ((k % 2) * 4).to(tl.uint8)) & 0xF
        else:
            q = tl.load(w_ptr + n * stride_wn + k, mask=live, other=0)
        g = k // GROUP
        s = tl.load(s_ptr + n * G + g, mask=live, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + n * G + g, mask=live, other=0).to(tl.float32)
        return (q.to(tl.float32) - z) * s

    @triton.jit
    def _wq_decode_kernel(
        x_ptr,  # (M, K) activations, any float dtype
        w_ptr,  # uint8 codes, packed per BITS
        s_ptr,  # float16 (N, G) scales
        z_ptr,  # uint8 (N, G) zero points
        b_ptr,  # (N,) bias (read only when HAS_BIAS)
        y_ptr,  # (M, N) output, x's dtype
        M, N, K,  # sizes
        G,  # groups per row
        GROUP,  # columns per group
        stride_xm,  # x row stride
        stride_wn,  # qweight row stride
        stride_ym,  # y row stride
        BITS: tl.constexpr,  # 4 or 8
        HAS_BIAS: tl.constexpr,  # add the bias
        WIDTH: tl.constexpr,  # code bytes of one sub-block per row (a power of two; its columns lie in one group)
        SUBS: tl.constexpr,  # sub-blocks per step (unrolled: their loads are in flight together)
        BLOCK_M: tl.constexpr,  # >= M, a power of two
        BLOCK_N: tl.constexpr,  # output features per program
    ):
        # Each program streams the codes of BLOCK_N output rows over all of K, in steps of SUBS
        # sub-blocks whose loads are in flight together. The scale and zero point are constant in a
        # sub-block: loaded once per row, dequantization is elementwise, products accumulate
        # elementwise, and the one reduction across lanes is at the end.
        pid = tl.program_id(0)
        m = tl.arange(0, BLOCK_M)
        n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        j = tl.arange(0, WIDTH)
        j2 = tl.arange(0, 2 * WIDTH)
        live_n = n < N
        live_m = m < M
        if BITS == 4:
            KB = (K + 1) // 2  # code bytes per row
        else:
            KB = K
        acc3 = tl.zeros((BLOCK_M, BLOCK_N, WIDTH), dtype=tl.float32)
        for b0 in range(0, KB, WIDTH * SUBS):
            for i in tl.static_range(SUBS):
                bs = tl.multiple_of(b0 + i * WIDTH, WIDTH)  # first code byte of the sub-block
                kb = bs + j
                code = tl.load(w_ptr + n[:, None] * stride_wn + kb[None, :], mask=live_n[:, None] & (kb[None, :] < KB),
                               other=0)
                if BITS == 4:
                    ks = bs * 2  # first column
                else:
                    ks = bs
                g = ks // GROUP
                live_g = live_n & (n * 0 + ks < K)
                s = tl.load(s_ptr + n * G + g, mask=live_g, other=0.0).to(tl.float32)[None, :, None]
                z = tl.load(z_ptr + n * G + g, mask=live_g, other=0).to(tl.float32)[None, :, None]
                if BITS == 4:  # column 2b in the low nibble, 2b + 1 in the high one
                    kx = ks + j2
                    x2 = tl.load(x_ptr + m[:, None] * stride_xm + kx[None, :], mask=live_m[:, None] & (kx[None, :] < K),
                                 other=0.0).to(tl.float32)
                    xe, xo = tl.split(tl.reshape(x2, (BLOCK_M, WIDTH, 2)))
                    xe = xe[:, None, :]
                    xo = xo[:, None, :]
                    lo = ((code & 0xF).to(tl.float32)[None, :, :] - z) * s
                    hi = ((code >> 4).to(tl.float32)[None, :, :] - z) * s
                    acc3 += xe * lo + xo * hi
                else:
                    xv = tl.load(x_ptr + m[:, None] * stride_xm + kb[None, :], mask=live_m[:, None] & (kb[None, :] < K),
                                 other=0.0).to(tl.float32)[:, None, :]
                    acc3 += xv * ((code.to(tl.float32)[None, :, :] - z) * s)
        acc = tl.sum(acc3, axis=2)
        if HAS_BIAS:
            acc += tl.load(b_ptr + n, mask=live_n, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + m[:, None] * stride_ym + n[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=(m[:, None] < M) & live_n[None, :])

    @triton.jit
    def _wq_gemm_kernel(
        x_ptr,  # (M, K) activations
        w_ptr,  # uint8 codes, packed per BITS
        s_ptr,  # float16 (N, G) scales
        z_ptr,  # uint8 (N, G) zero points
        b_ptr,  # (N,) bias (read only when HAS_BIAS)
        y_ptr,  # (M, N) output, x's dtype
        M, N, K,  # sizes
        G,  # groups per row
        GROUP,  # columns per group
        stride_xm,  # x row stride
        stride_wn,  # qweight row stride
        stride_ym,  # y row stride
        BITS: tl.constexpr,  # 4 or 8
        HAS_BIAS: tl.constexpr,  # add the bias
        IEEE: tl.constexpr,  # fp32 inputs: exact fp32 products instead of tf32
        BLOCK_M: tl.constexpr,  # rows per program
        BLOCK_N: tl.constexpr,  # output features per program
        BLOCK_K: tl.constexpr,  # columns per step
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + m[:, None] * stride_xm + k[None, :], mask=(m[:, None] < M) & (k[None, :] < K), other=0.0)
            live = (k[:, None] < K) & (n[None, :] < N)
            w = _load_dequant(w_ptr, s_ptr, z_ptr, n[None, :], k[:, None], live, stride_wn, G, GROUP, BITS)  # (BK, BN)
            if IEEE:
                acc += tl.dot(x, w, input_precision="ieee")
            else:
                acc += tl.dot(x, w.to(x.dtype))
        if HAS_BIAS:
            acc += tl.load(b_ptr + n, mask=n < N, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + m[:, None] * stride_ym + n[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=(m[:, None] < M) & (n[None, :] < N))


def _sub_block(group: int, groups: int) -> int:
    """Columns of the decode kernel's sub-block: a power of two (at most 128) that lies inside one
    group — the largest dividing the group, or 128 when the row is one group (per channel)."""
    if groups == 1:
        return 128
    return min(128, group & -group)  # group sizes are 32/64/128 or per channel; _check rejects odd 4-bit groups


def _decode_config(M: int, K: int, sub: int, bits: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_N, SUBS, num_warps), swept on an H100 over the shapes of bench/kernels.py (4096 to
    11008 wide): up to four rows, a single warp per program over 2 (4-bit, one or two rows) or
    4 output rows and 512 columns per step; more rows, 8 output rows and 4 warps."""
    cols = 512 if M <= 2 or bits == 4 else 256
    subs = max(1, min(cols // sub, triton.cdiv(K, sub)))
    if device.type != "cuda":  # the interpreter: its cost is per operation, so few large blocks
        return 64, subs, 4
    if M <= 4:
        return (2 if bits == 4 and M <= 2 else 4), subs, 1
    return 8, subs, 4


def wq_matmul_triton(x: torch.Tensor, w: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The Triton kernels: decode-shaped for up to DECODE_MAX_ROWS rows, GEMM beyond."""
    check_triton_device(x.device)
    _check(x, w, bias)
    x = x.contiguous()
    M, K = x.shape
    N, G = w.out_features, w.scales.shape[1]
    if M == 0:
        return torch.empty((0, N), dtype=x.dtype, device=x.device)
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M <= DECODE_MAX_ROWS:
        sub = _sub_block(w.group, G)
        block_n, subs, warps = _decode_config(M, K, sub, w.bits, x.device)
        _wq_decode_kernel[(triton.cdiv(N, block_n),)](
            x, w.qweight, w.scales, w.zeros, bias if bias is not None else y, y, M, N, K, G, w.group, x.stride(0),
            w.qweight.stride(0), y.stride(0), BITS=w.bits, HAS_BIAS=bias is not None,
            WIDTH=sub // 2 if w.bits == 4 else sub, SUBS=subs, BLOCK_M=triton.next_power_of_2(M), BLOCK_N=block_n,
            num_warps=warps)
        return y
    block_m, block_n, block_k = (16 if M <= 16 else 64), 64, 32
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    _wq_gemm_kernel[grid](x, w.qweight, w.scales, w.zeros, bias if bias is not None else y, y, M, N, K, G, w.group,
                          x.stride(0), w.qweight.stride(0), y.stride(0), BITS=w.bits, HAS_BIAS=bias is not None,
                          IEEE=x.dtype == torch.float32, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return y
