"""Tensor names at the device/cloud boundary, defined once (torch-free).

Export, the onnxruntime runner and the protocol all use these.
"""

from __future__ import annotations

INPUT_IDS = "input_ids"
"""Token ids (B, T) int64 entering the head."""
POSITION_IDS = "position_ids"
"""Absolute positions (B, T) int64 of the new tokens."""
HIDDEN_STATES = "hidden_states"
"""Residual stream h_ℓ (B, T, d) at the split: what crosses the link."""
LOGITS = "logits"
"""Next-token logits (B, T, V), produced where the final norm and LM head live."""
HIDDEN_IN = "hidden_states_in"
"""Residual stream (B, T, d) entering a later segment of the device head (the output of the one before)."""
SEQLENS_K = "seqlens_k"
"""(1,) int32: the sequence length after the step, minus one (GroupQueryAttention's convention)."""
TOTAL_SEQUENCE_LENGTH = "total_sequence_length"
"""() int32: the sequence length after the step."""
LOGIT_ROWS = "logit_rows"
"""(R,) int64: which of a step's T positions a device-only head computes logits for."""


def past_key(layer: int) -> str:
    """Cached keys of `layer` entering a stage: (B, Hkv, P, D)."""
    return f"past_key.{layer}"


def past_value(layer: int) -> str:
    """Cached values of `layer` entering a stage: (B, Hkv, P, D)."""
    return f"past_value.{layer}"


def present_key(layer: int) -> str:
    """Keys of `layer` after the step (past + new): (B, Hkv, P+T, D)."""
    return f"present_key.{layer}"


def present_value(layer: int) -> str:
    """Values of `layer` after the step (past + new): (B, Hkv, P+T, D)."""
    return f"present_value.{layer}"


# Files of an exported plan (DIR/device and DIR/cloud).
HEAD_FILE = "head.onnx"
"""The head graph, in DIR/device: its first segment when the head is cut in several."""


def segment_file(index: int) -> str:
    """The graph of the head's segment `index` (0 is HEAD_FILE)."""
    return HEAD_FILE if index == 0 else f"head.{index}.onnx"

TAIL_FILE = "tail.safetensors"
"""The (quantized) tail stage, in DIR/cloud."""
KV_SCALES_FILE = "kv_scales.npz"
"""Beside a head with a quantized KV cache: each layer's per-channel scales, "k.{i}" and "v.{i}", (Hkv, D) float32."""
KV_CODEC_FILE = "kv_codec.npz"
"""Beside both halves of a plan that moves K/V with the codec: each movable layer's query energies "q.{i}", (Hkv, D)
float32, that the K/V codec steps keys by (quantize.kv.query_energies)."""
CODEC_BASIS_FILE = "codec_basis.npz"
"""The entropy 'ans' codec's calibrated bases, one per split a session may run at (quantize.ans.save_bases)."""
