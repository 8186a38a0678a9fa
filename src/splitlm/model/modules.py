"""Swapping a submodule of the reference model: the one way quantization, export and kernels
replace a layer's parts (a Linear by a QuantLinear, a QuantLinear by an ONNX or Triton form)."""

from __future__ import annotations

from torch import nn


def swap_module(root: nn.Module, dotted: str, new: nn.Module) -> nn.Module:
    """Put `new` where the submodule named `dotted` (e.g. "self_attn.q_proj") of `root` was; return the old one."""
    parent, _, name = dotted.rpartition(".")
    owner = root.get_submodule(parent)
    old = owner.get_submodule(name)
    setattr(owner, name, new)
    return old
