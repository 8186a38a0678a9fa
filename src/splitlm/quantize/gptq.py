"""GPTQ (Frantar et al., 2022): column-by-column quantization that spreads each
column's rounding error over the not-yet-quantized columns using the inverse
Hessian of the layer's calibration inputs. Produces the same QuantizedTensor
layout as round-to-nearest, so export and kernels do not care which made it.
"""

from __future__ import annotations

import torch

from splitlm.quantize.weights import QuantizedTensor, effective_group, group_params, quantize_with


class HessianAccumulator:
    """Running H = 2/n · Σ xᵀx over the inputs a Linear sees."""

    def __init__(self, in_features: int) -> None:
        self.H = torch.zeros(in_features, in_features, dtype=torch.float64)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).double()  # (N, in)
        total = self.n + x.shape[0]
        self.H *= self.n / total
        self.H += (2.0 / total) * (x.T @ x)
        self.n = total


def gptq_quantize(w: torch.Tensor, H: torch.Tensor, bits: int, group_size: int, symmetric: bool = False,
                  damp: float = 0.01, block: int = 128) -> QuantizedTensor:
    """Quantize w (out, in) given the input Hessian H (in, in)."""
    out_f, in_f = w.shape
    g = effective_group(group_size, in_f)
    if g < in_f and block % g:
        block = g * max(1, block // g)
    W = w.detach().double().clone()
    H = H.double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * torch.diag(H).mean() * torch.eye(in_f, dtype=H.dtype)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    codes = torch.zeros(out_f, in_f, dtype=torch.uint8)
    n_groups = -(-in_f // g)
    scales = torch.zeros(out_f, n_groups, dtype=torch.float16)
    zeros = torch.zeros(out_f, n_groups, dtype=torch.uint8)
    for i1 in range(0, in_f, block):
        i2 = min(i1 + block, in_f)
        W1 = W[:, i1:i2].clone()
        Err = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % g == 0:
                # group statistics from the weights as updated so far
                grp = torch.cat((W1[:, i:], W[:, i2:]), dim=1)[:, :g]
                s16, z = group_params(grp, bits, symmetric)
                scales[:, col // g], zeros[:, col // g] = s16, z.to(torch.uint8)
            s16, z = scales[:, col // g], zeros[:, col // g].double()
            wcol = W1[:, i]
            q = quantize_with(wcol[:, None], s16, z, bits)[:, 0]
            codes[:, col] = q.to(torch.uint8)
            deq = (q - z) * s16.double()
            err = (wcol - deq) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err[:, i] = err
        W[:, i2:] -= Err @ Hinv[i1:i2, i2:]
    return QuantizedTensor(codes, scales, zeros, bits, g)
