"""Quantize the weights of a stage in place: each block Linear becomes a QuantLinear.

Precision is per stage, so the device head and the cloud tail of one model can
differ (one-point split compression). Embedding and final norm stay in the compute
dtype; the LM head stays there too unless the plan's lm_head_bits quantizes it
(`quantize_lm_head`, RTN in groups of LM_HEAD_GROUP).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm import tqdm

from splitlm.errors import ConfigError
from splitlm.model.checkpoint import SOURCE_FILE, Checkpoint
from splitlm.model.llama import Transformer
from splitlm.model.modules import swap_module
from splitlm.quantize.config import EMBED_BITS, LM_HEAD_GROUP, SOURCE_GROUP, WeightQuant
from splitlm.quantize.gptq import HessianAccumulator, gptq_quantize
from splitlm.quantize.weights import QuantEmbedding, QuantizedTensor, QuantLinear, rtn_quantize

log = logging.getLogger(__name__)

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")

Quantizer = Callable[[torch.Tensor, WeightQuant, "torch.Tensor | None"], QuantizedTensor]
IMPLEMENTATIONS: dict[str, Quantizer] = {
    "rtn": lambda w, wq, H: rtn_quantize(w, wq.bits, wq.group_size, wq.symmetric),
    "gptq": lambda w, wq, H: gptq_quantize(w, H, wq.bits, wq.group_size, wq.symmetric),
}


def source_blocks(ckpt: Checkpoint, names: list[str]) -> dict[str, QuantizedTensor]:
    """The checkpoint's source blocks of those weights (Hugging Face names) that it has."""
    if not ckpt.has_source_blocks:
        return {}
    from safetensors import safe_open

    out = {}
    with safe_open(str(ckpt.path / SOURCE_FILE), framework="pt") as f:
        meta, keys = f.metadata() or {}, set(f.keys())
        for name in names:
            if name in meta:
                bits, group, _ = meta[name].split(",")
                mins = f.get_tensor(name + ".mins") if name + ".mins" in keys else None
                out[name] = QuantizedTensor(f.get_tensor(name + ".codes"), f.get_tensor(name + ".scales"),
                                            f.get_tensor(name + ".zeros"), int(bits), int(group), mins)
    return out


def source_formats(ckpt: Checkpoint) -> dict[str, str]:
    """Hugging Face weight name -> the source format of its blocks (e.g. "Q4_1"); empty without any."""
    if not ckpt.has_source_blocks:
        return {}
    from safetensors import safe_open

    with safe_open(str(ckpt.path / SOURCE_FILE), framework="numpy") as f:
        meta = f.metadata() or {}
    return {k: v.split(",")[2] for k, v in meta.items()}


def _tied_name(stage: Transformer, name: str) -> str:
    return "model.embed_tokens.weight" if name == "lm_head.weight" and stage.spec.tie_word_embeddings else name


def block_weight_names(ckpt: Checkpoint, start: int, stop: int) -> list[str]:
    return [f"model.layers.{i}.{lin}.weight" for i in range(start, stop) for lin in LINEARS]


def source_method_fits(ckpt: Checkpoint, bits: int, layers: range | None = None) -> str | None:
    """Why the "source" method cannot give `layers`' Linears at `bits` (None when it can)."""
    layers = range(ckpt.spec.num_layers) if layers is None else layers
    names = block_weight_names(ckpt, layers.start, layers.stop)
    kinds = source_formats(ckpt)
    if not kinds:
        return f"{ckpt.model_id} has no source blocks (only a GGUF's Q4_0 / Q4_1 / Q8_0 tensors are carried)"
    missing = [n for n in names if n not in kinds]
    if missing:
        return f"the source holds {missing[0]} in a format we do not carry"
    wrong = {kinds[n] for n in names if _SOURCE_BITS.get(kinds[n]) != bits}
    if wrong:
        return f"the source holds these weights as {', '.join(sorted(wrong))}, not at {bits} bits"
    return None


_SOURCE_BITS = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8}


def preferred_method(ckpt: Checkpoint, bits: int) -> str:
    """"source" where the checkpoint holds every block Linear at `bits` in blocks we carry (the source's
    own quality, no re-quantization), else "rtn"."""
    return "source" if bits != 16 and source_method_fits(ckpt, bits) is None else "rtn"


def apply_source(stage: Transformer, ckpt: Checkpoint, wq: WeightQuant) -> Transformer:
    """Every block Linear of `stage` becomes a QuantLinear over the checkpoint's own blocks; ConfigError
    naming the first weight the source does not hold at wq.bits."""
    why = source_method_fits(ckpt, wq.bits, stage.owned_layers)
    if why:
        raise ConfigError(f"weight method 'source' for layers [{stage.start}, {stage.stop}): {why}; use rtn or gptq")
    blocks = source_blocks(ckpt, block_weight_names(ckpt, stage.start, stage.stop))
    for i in stage.owned_layers:
        block = stage.model.layers[i]
        for name in LINEARS:
            q = blocks[f"model.layers.{i}.{name}.weight"]
            assert q.group_size == SOURCE_GROUP
            swap_module(block, name, QuantLinear(q, block.get_submodule(name).bias))
    return stage


def quantize_lm_head(stage: Transformer, bits: int, ckpt: Checkpoint | None = None) -> Transformer:
    """Replace the stage's LM head (if it has one) by a QuantLinear at `bits` (16 = keep): the source's
    own blocks when `ckpt` holds them at `bits`, else RTN in groups of LM_HEAD_GROUP."""
    if bits != 16 and stage.finalizes and not isinstance(stage.lm_head, QuantLinear):
        name = _tied_name(stage, "lm_head.weight")
        q = source_blocks(ckpt, [name]).get(name) if ckpt is not None else None
        if q is None or q.bits != bits:
            q = rtn_quantize(stage.lm_head.weight.data, bits, LM_HEAD_GROUP)
        stage.lm_head = QuantLinear(q, None)
    return stage


def quantize_embedding(stage: Transformer, wq: WeightQuant, ckpt: Checkpoint | None = None) -> Transformer:
    """A stage that embeds and whose blocks are quantized gets its embedding table quantized too: the
    source's own blocks with the "source" method (when it holds them without block mins), else RTN at
    EMBED_BITS in groups of LM_HEAD_GROUP. At fp32 the table outweighs every quantized block of a small
    model. A tied LM head keeps its own weight (quantize it first)."""
    if wq.bits == 16 or not stage.embeds or isinstance(stage.model.embed_tokens, QuantEmbedding):
        return stage
    name = "model.embed_tokens.weight"
    q = source_blocks(ckpt, [name]).get(name) if ckpt is not None and wq.method == "source" else None
    if q is None or q.mins is not None:
        q = rtn_quantize(stage.model.embed_tokens.weight.data, EMBED_BITS, LM_HEAD_GROUP)
    stage.model.embed_tokens = QuantEmbedding(q)
    return stage


def quantize_stage(stage: Transformer, wq: WeightQuant, calib_inputs: list[torch.Tensor] | None = None,
                   cache_dir: Path | None = None, cache_tag: str = "", progress: bool = True) -> Transformer:
    """Replace the Linears of `stage`'s blocks by QuantLinears at `wq`.

    calib_inputs: what the stage consumes (token ids (1, T) if it embeds, else
    hidden states (1, T, d)), needed by calibrated methods.
    cache_dir/cache_tag: where to keep results of calibrated methods, keyed by
    the tag (identify the weights), the layer range, `wq` and the calibration data.
    """
    if wq.bits == 16 or not stage.owned_layers:
        return stage
    impl = IMPLEMENTATIONS.get(wq.method)
    if impl is None:
        raise ConfigError(f"weight method {wq.method!r} has no implementation; use one of {sorted(IMPLEMENTATIONS)}")
    if wq.method == "rtn":
        for i in stage.owned_layers:
            block = stage.model.layers[i]
            for name in LINEARS:
                lin = block.get_submodule(name)
                swap_module(block, name, QuantLinear(impl(lin.weight.data, wq, None), lin.bias))
        return stage
    if not calib_inputs:
        raise ConfigError(f"weight method {wq.method!r} needs calibration text")
    cached = _load_cached(stage, wq, calib_inputs, cache_dir, cache_tag)
    if cached is not None:
        return cached
    _calibrated(stage, wq, impl, calib_inputs, progress)
    _save_cached(stage, wq, calib_inputs, cache_dir, cache_tag)
    return stage


@torch.inference_mode()
def _calibrated(stage: Transformer, wq: WeightQuant, impl: Quantizer, calib: list[torch.Tensor], progress: bool) -> None:
    """Sequential layer-wise calibration: each block sees the outputs of the already quantized ones."""
    steps = [stage.prepare(c if stage.embeds else c.float()) for c in calib]
    xs = [x for x, _, _ in steps]
    tables = [rotary for _, rotary, _ in steps]
    masks = [mask for _, _, mask in steps]
    for i in tqdm(list(stage.owned_layers), desc=f"{wq.method} W{wq.bits}", unit="layer", disable=not progress, leave=False):
        block = stage.model.layers[i]
        accs = {name: HessianAccumulator(block.get_submodule(name).in_features) for name in LINEARS}
        hooks = [block.get_submodule(name).register_forward_hook(lambda m, inp, out, a=accs[name]: a.add(inp[0]))
                 for name in LINEARS]
        try:
            for x, (cos, sin), mask in zip(xs, tables, masks):
                block(x, cos, sin, None, mask)
        finally:
            for h in hooks:
                h.remove()
        for name in LINEARS:
            lin = block.get_submodule(name)
            swap_module(block, name, QuantLinear(impl(lin.weight.data, wq, accs[name].H), lin.bias))
        xs = [block(x, cos, sin, None, mask)[0] for x, (cos, sin), mask in zip(xs, tables, masks)]


def _cache_file(stage: Transformer, wq: WeightQuant, calib: list[torch.Tensor], cache_dir: Path | None, tag: str) -> Path | None:
    if cache_dir is None:
        return None
    h = hashlib.sha256(json.dumps([tag, stage.start, stage.stop, stage.embeds, wq.bits, wq.group_size, wq.method,
                                   wq.symmetric]).encode())
    for c in calib:
        h.update(c.detach().cpu().contiguous().numpy().tobytes())
    return Path(cache_dir) / f"{wq.method}-w{wq.bits}g{wq.group_size}-{h.hexdigest()[:16]}.safetensors"


def _load_cached(stage, wq, calib, cache_dir, tag) -> Transformer | None:
    path = _cache_file(stage, wq, calib, cache_dir, tag)
    if path is None or not path.is_file():
        return None
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
        for i in stage.owned_layers:
            block = stage.model.layers[i]
            for name in LINEARS:
                p = f"{i}.{name}."
                q = QuantizedTensor(tensors[p + "codes"], tensors[p + "scales"], tensors[p + "zeros"], wq.bits,
                                    int(tensors[p + "group"].item()))
                swap_module(block, name, QuantLinear(q, block.get_submodule(name).bias))
    except Exception as exc:  # noqa: BLE001 - any damage means recompute
        log.warning("ignoring unreadable quantization cache %s (%s)", path, exc)
        return None
    return stage


def _save_cached(stage, wq, calib, cache_dir, tag) -> None:
    path = _cache_file(stage, wq, calib, cache_dir, tag)
    if path is None:
        return
    from safetensors.torch import save_file

    tensors = {}
    for i in stage.owned_layers:
        for name in LINEARS:
            q = stage.model.layers[i].get_submodule(name).quantized
            p = f"{i}.{name}."
            tensors.update({p + "codes": q.codes, p + "scales": q.scales, p + "zeros": q.zeros,
                            p + "group": torch.tensor(q.group_size)})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp))
    tmp.rename(path)


def _quantizable(stage: Transformer) -> list[tuple[str, nn.Module]]:
    """(dotted name, module) of every Linear a plan may quantize in this stage."""
    mods = [(f"model.layers.{i}.{lin}", stage.model.layers[i].get_submodule(lin)) for i in stage.owned_layers for lin in LINEARS]
    if stage.finalizes:
        mods.append(("lm_head", stage.lm_head))
    return mods


def save_stage(stage: Transformer, path: Path) -> None:
    """Write a (possibly quantized) stage: codes/scales/zeros (and mins) for QuantLinears, floats for the rest."""
    from safetensors.torch import save_file

    tensors, meta = {}, {}
    for name, tensor in stage.state_dict().items():
        tensors[name] = tensor.detach().contiguous().clone()
    for key, mod in _quantizable(stage):
        if isinstance(mod, QuantLinear):
            meta[key] = f"{mod.bits},{mod.group_size}"
    meta["splitlm.stage"] = json.dumps({"start": stage.start, "stop": stage.stop, "embed": stage.embeds, "final": stage.finalizes})
    save_file(tensors, str(path), metadata=meta)


def load_stage(spec, path: Path, dtype: torch.dtype = torch.float32) -> Transformer:
    """Inverse of save_stage; `dtype`: the float parameters' type (quantized weights dequantize to their input's)."""
    from safetensors import safe_open

    from splitlm.errors import ModelLoadError

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            info = json.loads(meta["splitlm.stage"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type
        raise ModelLoadError(f"{path} is not a saved stage: {exc}") from None
    stage = Transformer(spec, info["start"], info["stop"], embed=info["embed"], final=info["final"])
    for key, _ in _quantizable(stage):
        if key in meta:
            bits, group = (int(v) for v in meta[key].split(","))
            q = QuantizedTensor(tensors.pop(key + ".codes"), tensors.pop(key + ".scales"), tensors.pop(key + ".zeros"), bits, group,
                                tensors.pop(key + ".mins", None))
            bias = tensors.pop(key + ".bias", None)
            swap_module(stage, key, QuantLinear(q, bias))
            if bias is not None:
                tensors[key + ".bias"] = bias
    missing, unexpected = stage.load_state_dict(tensors, strict=False)
    if [m for m in missing if not m.endswith((".codes", ".scales", ".zeros"))] or unexpected:
        raise ModelLoadError(f"{path}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if stage.embeds and stage.finalizes and spec.tie_word_embeddings and not isinstance(stage.lm_head, QuantLinear):
        stage.lm_head.weight = stage.model.embed_tokens.weight
    for p in stage.parameters():  # (load_state_dict keeps a parameter's dtype: cast after it, from the saved values)
        p.data = p.data.to(dtype)
    return stage.eval()
