"""Names of the weight quantization methods (torch-free).

Plans validate against this table; each entry names the module that implements
it, imported only when weights are actually quantized. Adding a method adds an
entry here and a module, never an `if` in a caller.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MethodInfo:
    name: str
    """What a Plan's `method` field holds."""
    description: str
    """One line for help texts."""
    needs_calibration: bool
    """Whether the method reads calibration text."""


WEIGHT_METHODS: dict[str, MethodInfo] = {}


def register_method(info: MethodInfo) -> MethodInfo:
    WEIGHT_METHODS[info.name] = info
    return info


register_method(MethodInfo("rtn", "group-wise round-to-nearest", needs_calibration=False))
register_method(MethodInfo("gptq", "GPTQ: Hessian-aware error feedback from calibration text", needs_calibration=True))

WEIGHT_BITS: tuple[int, ...] = (16, 8, 4, 3, 2)
"""Weight precisions a segment may use; 16 means unquantized."""
GROUP_SIZES: tuple[int, ...] = (32, 64, 128, -1)
"""Quantization group sizes along the input dimension; -1 means one group per output channel."""
KV_BITS: tuple[int, ...] = (16, 8, 4)
"""Device KV cache precisions."""
