"""The torch side of onnxruntime's MatMulNBits: a custom op whose eager kernel is the
reference semantics, and its translation into a `com.microsoft::MatMulNBits` node for
the dynamo ONNX exporter. Imported by export only (needs torch and onnxscript).
"""

from __future__ import annotations

import onnx
import torch
from onnx.defs import OpSchema


@torch.library.custom_op("splitlm::matmul_nbits", mutates_args=())
def matmul_nbits(x: torch.Tensor, b: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor,
                 K: int, N: int, bits: int, block_size: int, accuracy_level: int) -> torch.Tensor:
    """Y = x · Wᵀ with W dequantized from MatMulNBits tensors (reference semantics)."""
    k_blocks = b.shape[1]
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.uint8) * bits
    mask = (1 << bits) - 1
    q = ((b.unsqueeze(-1) >> shifts) & mask).reshape(N, k_blocks * block_size)[:, :K].to(x.dtype)
    z = ((zero_points.reshape(N, -1).unsqueeze(-1) >> shifts) & mask).reshape(N, -1)[:, :k_blocks].to(x.dtype)
    cols = torch.arange(K) // block_size
    w = (q - z[:, cols]) * scales.reshape(N, k_blocks)[:, cols].to(x.dtype)
    return x @ w.T


@matmul_nbits.register_fake
def _matmul_nbits_fake(x, b, scales, zero_points, K, N, bits, block_size, accuracy_level):
    return x.new_empty((*x.shape[:-1], N))


@torch.library.custom_op("splitlm::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last axis, computed in fp32 (onnxruntime's SimplifiedLayerNormalization)."""
    xf = x.float()
    return (weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps))).to(x.dtype)


@rms_norm.register_fake
def _rms_norm_fake(x, weight, eps):
    return torch.empty_like(x)


def _rms_norm_schema() -> OpSchema:
    FP = OpSchema.FormalParameter
    return OpSchema(
        "SimplifiedLayerNormalization", "", 1,
        inputs=[FP("X", "T"), FP("scale", "T")], outputs=[FP("Y", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "")],
        attributes=[OpSchema.Attribute("axis", onnx.helper.make_attribute("axis", -1), ""),
                    OpSchema.Attribute("epsilon", OpSchema.AttrType.FLOAT, ""),
                    OpSchema.Attribute("stash_type", onnx.helper.make_attribute("stash_type", 1), "")],
    )


def _matmul_nbits_schema() -> OpSchema:
    FP = OpSchema.FormalParameter
    optional = OpSchema.FormalParameterOption.Optional
    return OpSchema(
        "MatMulNBits", "com.microsoft", 1,
        inputs=[FP("A", "T1"), FP("B", "T2"), FP("scales", "T1"), FP("zero_points", "T3", param_option=optional)],
        outputs=[FP("Y", "T1")],
        type_constraints=[("T1", ["tensor(float)", "tensor(float16)"], ""), ("T2", ["tensor(uint8)"], ""),
                          ("T3", ["tensor(uint8)", "tensor(float)", "tensor(float16)"], "")],
        attributes=[OpSchema.Attribute(n, OpSchema.AttrType.INT, "") for n in ("K", "N", "bits", "block_size")]
        + [OpSchema.Attribute("accuracy_level", onnx.helper.make_attribute("accuracy_level", 0), "")],
    )


def _op(domain: str, name: str, make_schema):
    import onnxscript
    from onnxscript.values import Op

    try:
        schema = onnx.defs.get_schema(name, 1, domain)
    except onnx.defs.SchemaError:
        onnx.defs.register_schema(make_schema())
        schema = onnx.defs.get_schema(name, 1, domain)
    return Op(onnxscript.values.Opset(domain, 1), name, schema)


def translation_table() -> dict:
    """custom_translation_table for torch.onnx.export(dynamo=True): our ops -> onnxruntime contrib ops."""
    nbits = _op("com.microsoft", "MatMulNBits", _matmul_nbits_schema)
    simplified_ln = _op("", "SimplifiedLayerNormalization", _rms_norm_schema)

    def matmul_nbits_onnx(x, b, scales, zero_points, K: int, N: int, bits: int, block_size: int, accuracy_level: int):
        return nbits(x, b, scales, zero_points, K=K, N=N, bits=bits, block_size=block_size, accuracy_level=accuracy_level)

    def rms_norm_onnx(x, weight, eps: float):
        return simplified_ln(x, weight, axis=-1, epsilon=eps, stash_type=1)

    return {torch.ops.splitlm.matmul_nbits.default: matmul_nbits_onnx, torch.ops.splitlm.rms_norm.default: rms_norm_onnx}
