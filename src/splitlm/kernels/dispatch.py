"""Which implementation the cloud tail runs, chosen once when the tail is built.

'auto': the Triton kernels on CUDA, the torch references elsewhere. 'triton' forces the
kernels (on the CPU only under TRITON_INTERPRET=1, the interpreter the tests use);
'reference' forces the references.
"""

from __future__ import annotations

import torch
from torch import nn

from splitlm.errors import ConfigError
from splitlm.kernels import wq_matmul
from splitlm.model.modules import swap_module
from splitlm.quantize.weights import QuantLinear

IMPLS = ("auto", "triton", "reference")


def choose(impl: str, device: torch.device | str) -> str:
    """'triton' or 'reference' for `impl` on `device`; ConfigError when the kernels cannot run there."""
    if impl not in IMPLS:
        raise ConfigError(f"kernel implementation {impl!r} not in {IMPLS}")
    device = torch.device(device)
    have_triton = wq_matmul.triton is not None
    if impl == "auto":
        return "triton" if device.type == "cuda" and have_triton else "reference"
    if impl == "triton":
        wq_matmul.check_triton_device(device)
    return impl


class KernelLinear(nn.Module):
    """A QuantLinear whose matmul runs on the packed codes (no dequantized copy of the weight is kept)."""

    def __init__(self, ql: QuantLinear, impl: str) -> None:
        super().__init__()
        w = wq_matmul.pack_weight(ql.quantized)
        self.register_buffer("qweight", w.qweight)
        self.register_buffer("scales", w.scales)
        self.register_buffer("zeros", w.zeros)
        self.bias = ql.bias
        self.bits, self.group, self.in_features = w.bits, w.group, w.in_features
        self.out_features = w.qweight.shape[0]
        self.impl = impl
        self._fn = wq_matmul.wq_matmul_triton if impl == "triton" else wq_matmul.wq_matmul_reference

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = wq_matmul.PackedWeight(self.qweight, self.scales, self.zeros, self.bits, self.group, self.in_features)
        y = self._fn(x.reshape(-1, self.in_features), w, self.bias)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group={self.group}, impl={self.impl}"


def apply_kernels(module: nn.Module, impl: str) -> int:
    """Swap every 4/8-bit QuantLinear in `module` for a KernelLinear running `impl`; returns how many.
    A QuantLinear with block mins (a source format's) keeps its reference matmul."""
    targets = [(name, m) for name, m in module.named_modules()
               if name and isinstance(m, QuantLinear) and m.bits in wq_matmul.KERNEL_BITS and m.mins is None]
    for name, child in targets:
        swap_module(module, name, KernelLinear(child, impl))
    return len(targets)

