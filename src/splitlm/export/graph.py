"""The device head as onnxruntime's LLM graph, written node by node from the reference stage.

One node per fused kernel, as onnxruntime's own LLM runtime builds its models:
    embedding      Gather, or GatherBlockQuantized over 8/4-bit rows
    norms          SimplifiedLayerNormalization (layer 0), then SkipSimplifiedLayerNormalization,
                   which also carries the residual sum
    q, k, v        one MatMulNBits over the row-concatenated weights (packed QKV)
    attention      GroupQueryAttention, rotary fused, past and present in one preallocated buffer
                   of plan.max_seq_len positions that the runtime binds as both (written in place);
                   with kv_bits 8 or 4 the buffer holds int8 / packed 4-bit codes with static
                   per-channel scales (quantize.kv), never a float copy of the past
    o, gate, up,   MatMulNBits at accuracy level 4 (int8 compute), SiLU as Sigmoid·Mul
    down
    LM head        (a device-only head) on the rows that `logit_rows` names only

Weights are the stage's own: a QuantLinear's codes, scales and integer zero points as they are,
and a block-min term (GGUF Q4_1 `d·q + m`) as an exact correction, Σ_block(x) · mᵀ.
Graph inputs: input_ids (1, T) int64, seqlens_k (1,) int32 = length after the step − 1,
total_sequence_length () int32 = length after the step, the KV buffers, and logit_rows (R,)
int64 on a finalizing head. The parity check against the torch stage stays in build.py.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from splitlm.errors import ExportError
from splitlm.export.nbits import NBitsWeight, to_nbits
from splitlm.model import names
from splitlm.model.llama import Transformer
from splitlm.model.rope import inv_frequencies
from splitlm.model.spec import ModelSpec
from splitlm.quantize.weights import QuantEmbedding, QuantLinear

OPSETS = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
IR_VERSION = 10
GRAPH_KIND = "gqa"
"""The manifest's name for this graph (the traced fallback is "traced")."""


def gqa_unsupported(spec: ModelSpec) -> str | None:
    """Why GroupQueryAttention cannot run `spec` (None when it can)."""
    if spec.rope_scaling.kind == "dynamic":
        return "dynamic NTK rotary grows its base with the length; the fused rotary cache is fixed"
    if spec.head_dim % 16:
        return f"head_dim {spec.head_dim} is not a multiple of 16 (fused rotary needs it)"
    if spec.num_heads % spec.num_kv_heads:
        return f"{spec.num_heads} heads do not share {spec.num_kv_heads} KV heads evenly"
    return None


@dataclass
class _Linear:
    """One linear map in graph form: MatMulNBits tensors, or a dense (N, K) matrix."""

    nbits: NBitsWeight | None
    dense: np.ndarray | None
    mins: np.ndarray | None
    """(N, k_blocks) float32: the block-min term, or None."""
    bias: np.ndarray | None

    @property
    def out_features(self) -> int:
        return self.nbits.N if self.nbits is not None else self.dense.shape[0]


def _linear(mod: nn.Module) -> _Linear:
    bias = None if mod.bias is None else mod.bias.detach().float().numpy()
    if isinstance(mod, QuantLinear):
        q = mod.quantized
        w = to_nbits(q.codes.numpy(), q.scales.numpy(), q.zeros.numpy(), q.bits, q.group_size)
        mins = None if q.mins is None else q.mins.float().numpy()
        if mins is not None and w.K % w.block_size:
            raise ExportError(f"block mins need K ({w.K}) to be a multiple of the block ({w.block_size})")
        if mins is not None and not q.zeros.any():
            # d·q + m = d·(q − mid) + (m + mid·d): centred codes under the default zero point (no zero-point
            # input, MatMulNBits' fastest path), whose int8-compute error is that of centred weights; the
            # midpoint moves into the block-sum term, exactly (fp16 d and m add exactly in fp32)
            mid = 1 << (w.bits - 1)
            mins = mins + mid * q.scales.float().numpy()
            w = dataclasses.replace(w, zero_points=None)
        return _Linear(w, None, mins, bias)
    return _Linear(None, mod.weight.detach().float().numpy(), None, bias)


def _pack(parts: list[_Linear]) -> list[_Linear]:
    """Row-concatenate linears that share their input into one, where their forms allow."""
    if len(parts) == 1:
        return parts
    first = parts[0]
    if all(p.dense is not None for p in parts):
        bias = _cat_bias(parts)
        return [_Linear(None, np.concatenate([p.dense for p in parts]), None, bias)]
    same = all(p.nbits is not None and (p.nbits.bits, p.nbits.block_size, p.nbits.K) ==
               (first.nbits.bits, first.nbits.block_size, first.nbits.K) for p in parts)
    if not same or len({p.mins is None for p in parts}) != 1 or len({p.nbits.zero_points is None for p in parts}) != 1:
        return parts
    ws = [p.nbits for p in parts]
    kb = first.nbits.B.shape[1]
    zps = None if first.nbits.zero_points is None else np.concatenate([x.zero_points.reshape(x.N, -1) for x in ws]).reshape(-1)
    w = NBitsWeight(np.concatenate([x.B for x in ws]), np.concatenate([x.scales.reshape(x.N, kb) for x in ws]).reshape(-1), zps,
                    first.nbits.K, sum(x.N for x in ws), first.nbits.bits, first.nbits.block_size)
    mins = None if first.mins is None else np.concatenate([p.mins for p in parts])
    return [_Linear(w, None, mins, _cat_bias(parts))]


def _cat_bias(parts: list[_Linear]) -> np.ndarray | None:
    if all(p.bias is None for p in parts):
        return None
    return np.concatenate([p.bias if p.bias is not None else np.zeros(p.out_features, np.float32) for p in parts])


class _Graph:
    """Nodes and initializers under construction, with unique names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._names: set[str] = set()

    def const(self, name: str, array: np.ndarray) -> str:
        assert name not in self._names, name
        self._names.add(name)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def op(self, op_type: str, inputs: list[str], name: str, outputs: int | list[str] = 1, domain: str = "", **attrs) -> list[str]:
        outs = [f"{name}/out{i}" for i in range(outputs)] if isinstance(outputs, int) else outputs
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=name, domain=domain, **attrs))
        return outs

    def linear(self, x: str, parts: list[_Linear], name: str, accuracy_level: int, block_sums: dict[int, str],
               split: bool = True) -> list[str]:
        """y_i = x · W_iᵀ (+ b_i) for each part, packed where possible: output names in order
        (with split False, one output: the parts side by side along the last axis)."""
        packed = _pack(parts)
        ys = [self._one(x, lin, f"{name}{j or ''}", accuracy_level, block_sums) for j, lin in enumerate(packed)]
        if len(packed) == 1 and not split:
            return ys
        if len(packed) == len(parts):
            return ys if split else self.op("Concat", ys, f"{name}/Concat", axis=-1)
        splits = self.const(f"{name}/splits", np.array([p.out_features for p in parts], np.int64))
        return self.op("Split", [ys[0], splits], f"{name}/Split", outputs=len(parts), axis=-1)

    def _one(self, x: str, lin: _Linear, name: str, accuracy_level: int, block_sums: dict[int, str]) -> str:
        if lin.dense is not None:
            y = self.op("MatMul", [x, self.const(f"{name}.weight_t", lin.dense.T)], f"{name}/MatMul")[0]
        else:
            w = lin.nbits
            zp = [] if w.zero_points is None else [self.const(f"{name}.zero_points", w.zero_points)]
            y = self.op("MatMulNBits", [x, self.const(f"{name}.B", w.B), self.const(f"{name}.scales", w.scales), *zp],
                        f"{name}/MatMulNBits",
                        domain="com.microsoft", K=w.K, N=w.N, bits=w.bits, block_size=w.block_size,
                        accuracy_level=accuracy_level)[0]
            if lin.mins is not None:  # Σ over each block of x, times the block's min: exact and cheap
                key = w.block_size
                if key not in block_sums:
                    shape = self.const(f"{name}/block_shape", np.array([0, 0, -1, w.block_size], np.int64))
                    blocks = self.op("Reshape", [x, shape], f"{name}/blocks")[0]
                    axes = self.const(f"{name}/block_axes", np.array([-1], np.int64))
                    block_sums[key] = self.op("ReduceSum", [blocks, axes], f"{name}/block_sums", keepdims=0)[0]
                corr = self.op("MatMul", [block_sums[key], self.const(f"{name}.mins_t", lin.mins.T.astype(np.float32))],
                               f"{name}/mins")[0]
                y = self.op("Add", [y, corr], f"{name}/add_mins")[0]
        if lin.bias is not None:
            y = self.op("Add", [y, self.const(f"{name}.bias", lin.bias)], f"{name}/bias")[0]
        return y


def rotary_caches(spec: ModelSpec, length: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin (length, head_dim/2) float32 for GroupQueryAttention's fused rotary: the same
    frequencies and attention factor as the torch Rotary."""
    inv_freq, factor = inv_frequencies(spec)
    freqs = torch.arange(length, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return ((freqs.cos() * factor).numpy().astype(np.float32), (freqs.sin() * factor).numpy().astype(np.float32))


def _embedding(g: _Graph, emb: nn.Module) -> str:
    if isinstance(emb, QuantEmbedding):
        q = emb.quantized
        w = to_nbits(q.codes.numpy(), q.scales.numpy(), q.zeros.numpy(), q.bits, q.group_size)
        if q.mins is not None or w.K % w.block_size:
            raise ExportError("a quantized embedding with block mins or a partial block has no GatherBlockQuantized form")
        data = g.const("embed_tokens.data", w.B.reshape(w.N, -1))
        scales = g.const("embed_tokens.scales", w.scales.reshape(w.N, -1))
        zp = g.const("embed_tokens.zero_points", w.zero_points.reshape(w.N, -1))
        return g.op("GatherBlockQuantized", [data, names.INPUT_IDS, scales, zp], "embed_tokens/GatherBlockQuantized",
                    domain="com.microsoft", bits=w.bits, block_size=w.block_size, gather_axis=0, quantize_axis=1)[0]
    table = g.const("embed_tokens.weight", emb.weight.detach().float().numpy())
    return g.op("Gather", [table, names.INPUT_IDS], "embed_tokens/Gather")[0]


def build_head_graph(stage: Transformer, max_len: int, accuracy_level: int, start: int = 0,
                     stop: int | None = None) -> onnx.ModelProto:
    """Layers [start, stop) of the head stage (embedding + layers [0, ℓ), + norm and LM head when ℓ = L)
    as an ONNX model whose K/V buffers hold `max_len` positions: one segment of the head. The first
    segment embeds input_ids; a later one takes the hidden states before `start` (names.HIDDEN_IN).
    The segment that ends the stage ends as the stage does (hidden states, or logits)."""
    spec = stage.spec
    why = gqa_unsupported(spec)
    if why:
        raise ExportError(f"GroupQueryAttention graph: {why}")
    if not stage.embeds or stage.start != 0:
        raise ExportError("the device head starts at the embedding")
    stop = stage.stop if stop is None else stop
    if not 0 <= start <= stop <= stage.stop or (start == stop and start > 0):
        raise ExportError(f"segment [{start}, {stop}) is not a part of the head's layers [0, {stage.stop})")
    g = _Graph()
    f32, i64, i32 = TensorProto.FLOAT, TensorProto.INT64, TensorProto.INT32
    kv_bits = _kv_bits(stage)
    cache_type = {16: f32, 8: TensorProto.INT8, 4: TensorProto.UINT8}[kv_bits]
    kv_shape = [1, spec.num_kv_heads, max_len, spec.head_dim if kv_bits != 4 else spec.head_dim // 2]
    if start == 0:
        inputs = [helper.make_tensor_value_info(names.INPUT_IDS, i64, [1, "T"])]
        x = _embedding(g, stage.model.embed_tokens)
    else:
        inputs = [helper.make_tensor_value_info(names.HIDDEN_IN, f32, [1, "T", spec.hidden_size])]
        x = names.HIDDEN_IN
    outputs = []
    layers = list(range(start, stop))
    if layers:
        inputs += [helper.make_tensor_value_info(names.SEQLENS_K, i32, [1]),
                   helper.make_tensor_value_info(names.TOTAL_SEQUENCE_LENGTH, i32, [])]
        cos, sin = rotary_caches(spec, max_len)
        cos, sin = g.const("cos_cache", cos), g.const("sin_cache", sin)
    residual, pending = x, None
    for i in layers:
        block, p = stage.model.layers[i], f"layers.{i}"
        sums: dict[int, str] = {}
        normed, residual = _norm(g, residual, pending, block.input_layernorm, f"{p}.input_layernorm")
        attn = block.self_attn
        qkv = g.linear(normed, [_linear(attn.q_proj), _linear(attn.k_proj), _linear(attn.v_proj)], f"{p}.qkv_proj",
                       accuracy_level, sums, split=False)
        pk, pv, ok, ov = names.past_key(i), names.past_value(i), names.present_key(i), names.present_value(i)
        inputs += [helper.make_tensor_value_info(pk, cache_type, kv_shape), helper.make_tensor_value_info(pv, cache_type, kv_shape)]
        outputs += [helper.make_tensor_value_info(ok, cache_type, kv_shape), helper.make_tensor_value_info(ov, cache_type, kv_shape)]
        gqa_in = [qkv[0], "", "", pk, pv, names.SEQLENS_K, names.TOTAL_SEQUENCE_LENGTH, cos, sin]
        quant = {}
        if kv_bits != 16:  # the cache holds codes: one static scale per channel, K after rotary
            kvq = attn.kv_quant
            gqa_in += ["", "", "", g.const(f"{p}.k_scale", kvq.k_scale.numpy()), g.const(f"{p}.v_scale", kvq.v_scale.numpy())]
            quant = dict(kv_cache_bit_width=kv_bits, k_quant_type="PER_CHANNEL", v_quant_type="PER_CHANNEL")
        out = g.op("GroupQueryAttention", gqa_in, f"{p}/GroupQueryAttention", outputs=[f"{p}/attn", ok, ov], domain="com.microsoft",
                   num_heads=spec.num_heads, kv_num_heads=spec.num_kv_heads, do_rotary=1, rotary_interleaved=0,
                   scale=float(spec.head_dim ** -0.5), **quant)[0]
        sums = {}
        pending = g.linear(out, [_linear(attn.o_proj)], f"{p}.o_proj", accuracy_level, sums)[0]
        normed, residual = _norm(g, residual, pending, block.post_attention_layernorm, f"{p}.post_attention_layernorm")
        sums = {}
        mlp = block.mlp
        # gate and up as two nodes: packed with a Split they measured no faster on decode, slower on prefill
        gate = g.linear(normed, [_linear(mlp.gate_proj)], f"{p}.gate_proj", accuracy_level, sums)[0]
        up = g.linear(normed, [_linear(mlp.up_proj)], f"{p}.up_proj", accuracy_level, sums)[0]
        sig = g.op("Sigmoid", [gate], f"{p}/mlp/Sigmoid")[0]
        act = g.op("Mul", [g.op("Mul", [gate, sig], f"{p}/mlp/silu")[0], up], f"{p}/mlp/act")[0]
        sums = {}
        pending = g.linear(act, [_linear(mlp.down_proj)], f"{p}.down_proj", accuracy_level, sums)[0]
    if stage.finalizes and stop == stage.stop:
        if pending is None:
            normed = g.op("SimplifiedLayerNormalization", [residual, g.const("norm.weight", _w(stage.model.norm))],
                          "norm", axis=-1, epsilon=float(stage.model.norm.eps), stash_type=1)[0]
        else:
            normed = g.op("SkipSimplifiedLayerNormalization", [residual, pending, g.const("norm.weight", _w(stage.model.norm))],
                          "norm", domain="com.microsoft", epsilon=float(stage.model.norm.eps))[0]
        inputs.append(helper.make_tensor_value_info(names.LOGIT_ROWS, i64, ["R"]))
        rows = g.op("Gather", [normed, names.LOGIT_ROWS], "logit_rows/Gather", axis=1)[0]
        g.linear(rows, [_linear(stage.lm_head)], "lm_head", accuracy_level, {})
        g.nodes[-1].output[0] = names.LOGITS
        result = helper.make_tensor_value_info(names.LOGITS, f32, [1, "R", spec.vocab_size])
    else:
        if pending is None:
            g.op("Identity", [residual], "hidden", outputs=[names.HIDDEN_STATES])
        else:
            g.op("Add", [residual, pending], "hidden", outputs=[names.HIDDEN_STATES])
        result = helper.make_tensor_value_info(names.HIDDEN_STATES, f32, [1, "T", spec.hidden_size])
    graph = helper.make_graph(g.nodes, "splitlm_head", inputs, [result] + outputs, g.inits)
    model = helper.make_model(graph, opset_imports=OPSETS, producer_name="splitlm")
    model.ir_version = IR_VERSION
    return model


def _kv_bits(stage: Transformer) -> int:
    """The KV cache width the stage's attention models: 16, or the bits of its StaticKVQuant (all layers alike)."""
    widths = {getattr(stage.model.layers[i].self_attn.kv_quant, "bits", 16) for i in stage.owned_layers}
    if len(widths) > 1:
        raise ExportError(f"layers of one head quantize their KV cache at different widths {sorted(widths)}")
    bits = widths.pop() if widths else 16
    if bits == 4 and stage.spec.head_dim % 2:
        raise ExportError(f"a 4-bit KV cache packs two values per byte: head_dim {stage.spec.head_dim} is odd")
    return bits


def _w(norm: nn.Module) -> np.ndarray:
    return norm.weight.detach().float().numpy()


def _norm(g: _Graph, residual: str, pending: str | None, norm: nn.Module, name: str) -> tuple[str, str]:
    """RMSNorm(residual + pending): (normed, the new residual)."""
    weight = g.const(f"{name}.weight", _w(norm))
    if pending is None:
        return g.op("SimplifiedLayerNormalization", [residual, weight], name, axis=-1, epsilon=float(norm.eps), stash_type=1)[0], residual
    normed, _, _, summed = g.op("SkipSimplifiedLayerNormalization", [residual, pending, weight], name,
                                outputs=[f"{name}/out0", "", "", f"{name}/residual"], domain="com.microsoft", epsilon=float(norm.eps))
    return normed, summed
