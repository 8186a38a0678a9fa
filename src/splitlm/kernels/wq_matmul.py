"""Weight-only group-quantized matmul: y = x · Ŵᵀ (+ bias) with Ŵ = s · (q − z) per group.

The quantizer's layout (`quantize.weights`): a (N, K) weight cut along K into groups of
`group` columns, each with an fp16 scale and a uint8 zero point per output row. The kernels
read the codes packed: 8-bit codes as they are (N, K) uint8; 4-bit codes two per byte along K,
even column in the low nibble (N, ceil(K/2)) — `pack_weight` does this once when the tail is
built. Two kernels: a decode-shaped one for a few rows (memory-bound: each program streams a
BLOCK_N × K strip of codes, split along K across programs when N alone gives too few of
them) and a prefill-shaped GEMM on tensor cores (tl.dot). `wq_matmul_reference` is the torch
reference (dequantize, then matmul in fp32) with the same signature.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from splitlm.errors import ConfigError
from splitlm.quantize.weights import QuantizedTensor

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None

KERNEL_BITS = (4, 8)
DECODE_MAX_ROWS = 16
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
    codes = q.codes.contiguous()
    if q.bits == 4:
        if codes.shape[1] % 2:
            codes = F.pad(codes, (0, 1))
        codes = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return PackedWeight(codes.contiguous(), q.scales.contiguous(), q.zeros.contiguous(), q.bits, q.group_size,
                        q.codes.shape[1])


def unpack_codes(w: PackedWeight) -> torch.Tensor:
    """(N, K) uint8 codes back from the packed layout."""
    if w.bits == 8:
        return w.qweight
    lo, hi = w.qweight & 0xF, w.qweight >> 4
    return torch.stack((lo, hi), 2).reshape(w.qweight.shape[0], -1)[:, : w.in_features]


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
        part_ptr,  # float32 (SPLIT_K, M, N) partial sums
        M, N, K,  # sizes
        G,  # groups per row
        GROUP,  # columns per group
        stride_xm,  # x row stride
        stride_wn,  # qweight row stride
        K_PER_SPLIT,  # columns each program along K covers (a multiple of BLOCK_K)
        BITS: tl.constexpr,  # 4 or 8
        BLOCK_M: tl.constexpr,  # >= M, a power of two
        BLOCK_N: tl.constexpr,  # output features per program
        BLOCK_K: tl.constexpr,  # columns per step
    ):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        m = tl.arange(0, BLOCK_M)
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        k_lo = pid_k * K_PER_SPLIT
        for k0 in range(k_lo, tl.minimum(k_lo + K_PER_SPLIT, K), BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + m[:, None] * stride_xm + k[None, :], mask=(m[:, None] < M) & (k[None, :] < K),
                        other=0.0).to(tl.float32)  # (BLOCK_M, BLOCK_K)
            live = (n[:, None] < N) & (k[None, :] < K)
            w = _load_dequant(w_ptr, s_ptr, z_ptr, n[:, None], k[None, :], live, stride_wn, G, GROUP, BITS)
            acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
        out = part_ptr + pid_k * M * N + m[:, None] * N + n[None, :]
        tl.store(out, acc, mask=(m[:, None] < M) & (n[None, :] < N))

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


def _decode_config(M: int, N: int, K: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, split_k): enough programs to fill the GPU, K split only when N alone gives too few."""
    block_n, block_k = (64, 128) if M <= 2 else (32, 64)
    programs = triton.cdiv(N, block_n)
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    split = 1
    while programs * split < 2 * sms and K // (block_k * split * 2) >= 2:
        split *= 2
    return block_n, block_k, split


def wq_matmul_triton(x: torch.Tensor, w: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The Triton kernels: decode-shaped for up to DECODE_MAX_ROWS rows, GEMM beyond."""
    if triton is None:
        raise ConfigError("the Triton matmul needs triton installed")
    _check(x, w, bias)
    x = x.contiguous()
    M, K = x.shape
    N, G = w.out_features, w.scales.shape[1]
    if M == 0:
        return torch.empty((0, N), dtype=x.dtype, device=x.device)
    if M <= DECODE_MAX_ROWS:
        block_n, block_k, split = _decode_config(M, N, K, x.device)
        per_split = triton.cdiv(triton.cdiv(K, split), block_k) * block_k
        part = torch.empty((split, M, N), dtype=torch.float32, device=x.device)
        _wq_decode_kernel[(triton.cdiv(N, block_n), split)](
            x, w.qweight, w.scales, w.zeros, part, M, N, K, G, w.group, x.stride(0), w.qweight.stride(0), per_split,
            BITS=w.bits, BLOCK_M=triton.next_power_of_2(M), BLOCK_N=block_n, BLOCK_K=block_k)
        y = part.sum(0) if split > 1 else part[0]
        if bias is not None:
            y = y + bias.to(torch.float32)
        return y.to(x.dtype)
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    block_m, block_n, block_k = 64, 64, 32
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    _wq_gemm_kernel[grid](x, w.qweight, w.scales, w.zeros, bias if bias is not None else y, y, M, N, K, G, w.group,
                          x.stride(0), w.qweight.stride(0), y.stride(0), BITS=w.bits, HAS_BIAS=bias is not None,
                          IEEE=x.dtype == torch.float32, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return y
