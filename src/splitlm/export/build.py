"""`splitlm export`: the device head as ONNX and the cloud tail as safetensors (needs torch).

DIR/device/  head.onnx, tokenizer.json, chat_template.jinja (when the model has one), plan.json, spec.json, manifest.json
DIR/cloud/   tail.safetensors, plan.json, spec.json, tokenizer.json, manifest.json

The head graph is written node by node from the reference stage onto onnxruntime's LLM
contrib ops (export/graph.py: GroupQueryAttention, MatMulNBits over the very codes, scales
and zero points of the stage, fused norms). A model that GroupQueryAttention cannot run
(dynamic NTK rotary, head_dim not a multiple of 16) gets the head stage traced by torch.onnx
(dynamo) instead, with past in and present = past + new out.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from splitlm.device.runtime import HEAD_FILE
from splitlm.errors import ExportError, ParityError
from splitlm.model import names
from splitlm.model.chat import save_template
from splitlm.model.checkpoint import Checkpoint
from splitlm.model.llama import Transformer
from splitlm.model.modules import swap_module
from splitlm.partition.plan import Plan
from splitlm.quantize import kv_codec
from splitlm.quantize.ans import save_bases
from splitlm.quantize.apply import LINEARS, save_stage
from splitlm.quantize.config import ACCURACY_LEVEL, ACCURACY_LEVELS
from splitlm.quantize.kv import save_kv_scales
from splitlm.quantize.weights import QuantLinear
from splitlm.stages import build_stages, codec_bases, move_energies

log = logging.getLogger(__name__)

TAIL_FILE = names.TAIL_FILE
EXPORT_FORMAT = 6
"""Bumped whenever the exported graph changes shape (ops, names): caches of exports key on it."""
PARITY_TOL = {"fp32": 1e-4, "quantized": 1e-3, "int8-compute": 5e-2}
"""Largest max|onnx − torch| / max|torch| per output tensor."""


class OrtLinear(nn.Module):
    """A QuantLinear in MatMulNBits form: exports as one com.microsoft::MatMulNBits node."""

    def __init__(self, q: QuantLinear, accuracy_level: int = ACCURACY_LEVEL) -> None:
        super().__init__()
        from splitlm.export.nbits import to_nbits

        w = to_nbits(q.codes.numpy(), q.scales.numpy(), q.zeros.numpy(), q.bits, q.group_size)
        self.register_buffer("b", torch.from_numpy(w.B))
        self.register_buffer("scales", torch.from_numpy(w.scales))
        self.register_buffer("zero_points", torch.from_numpy(w.zero_points))
        self.attrs = (w.K, w.N, w.bits, w.block_size, accuracy_level)
        self.bias = q.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.splitlm.matmul_nbits(x, self.b, self.scales, self.zero_points, *self.attrs)
        return y + self.bias if self.bias is not None else y


class OrtRMSNorm(nn.Module):
    """An RMSNorm that exports as one SimplifiedLayerNormalization node."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.weight, self.eps = norm.weight, float(norm.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.splitlm.rms_norm(x, self.weight, self.eps)


class HeadGraph(nn.Module):
    """The head stage with explicit KV: (input_ids, position_ids, *past) -> (out, *present)."""

    def __init__(self, stage: Transformer) -> None:
        super().__init__()
        self.stage = stage

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, *past: torch.Tensor):
        mask = None
        if past:  # built from shapes, never None: the graph serves every length, one position included
            p, t = past[0].shape[2], input_ids.shape[1]
            mask = torch.arange(p + t)[None, :] <= torch.arange(t)[:, None] + p  # (T, P+T)
        out, presents = self.stage.forward_explicit(input_ids, position_ids, list(past), mask)
        return (out, *presents)


def io_names(stage: Transformer) -> tuple[list[str], list[str]]:
    """Graph input and output names, from model.names."""
    inputs = [names.INPUT_IDS, names.POSITION_IDS]
    outputs = [names.LOGITS if stage.finalizes else names.HIDDEN_STATES]
    for i in stage.owned_layers:
        inputs += [names.past_key(i), names.past_value(i)]
        outputs += [names.present_key(i), names.present_value(i)]
    return inputs, outputs


def _ort_form(stage: Transformer, accuracy_level: int) -> Transformer:
    """Swap QuantLinears (block Linears and the LM head) for OrtLinears and RMSNorms for
    OrtRMSNorms, in place: each becomes one onnxruntime kernel instead of a chain of small ops."""
    for i in stage.owned_layers:
        block = stage.model.layers[i]
        for name in LINEARS:
            mod = block.get_submodule(name)
            if isinstance(mod, QuantLinear):
                swap_module(block, name, OrtLinear(mod, accuracy_level))
        block.input_layernorm = OrtRMSNorm(block.input_layernorm)
        block.post_attention_layernorm = OrtRMSNorm(block.post_attention_layernorm)
    if stage.finalizes:
        stage.model.norm = OrtRMSNorm(stage.model.norm)
        if isinstance(stage.lm_head, QuantLinear):
            stage.lm_head = OrtLinear(stage.lm_head, accuracy_level)
    return stage


def export_head_onnx(stage: Transformer, path: Path, accuracy_level: int = ACCURACY_LEVEL) -> None:
    """Trace the head stage (already quantized) into an ONNX file with dynamic batch, length and past."""
    from torch.export import Dim

    from splitlm.export.onnx_ops import translation_table

    spec = stage.spec
    graph = HeadGraph(_ort_form(stage, accuracy_level)).eval()
    in_names, out_names = io_names(stage)
    b, t, p = 1, 3, 2
    args = [torch.zeros(b, t, dtype=torch.long), torch.arange(p, p + t)[None]]
    args += [torch.zeros(b, spec.num_kv_heads, p, spec.head_dim) for _ in range(2 * len(stage.owned_layers))]
    batch, length, past = Dim("batch"), Dim("length"), Dim("past")
    dynamic = ({0: batch, 1: length}, {0: batch, 1: length}, tuple({0: batch, 2: past} for _ in args[2:]))
    if len(args) == 2:
        dynamic = dynamic[:2]
    quiet = logging.getLogger("torch.onnx._internal.exporter._registration")
    old_level = quiet.level
    quiet.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(graph, tuple(args), dynamic_shapes=dynamic, input_names=in_names,
                                        output_names=out_names, dynamo=True, optimize=True, verbose=False,
                                        custom_translation_table=translation_table())
        except Exception as exc:  # noqa: BLE001 - the exporter raises many types
            raise ExportError(f"ONNX export of layers [0, {stage.stop}) failed: {exc}") from exc
        finally:
            quiet.setLevel(old_level)
    # weights in head.onnx.data beside the graph: onnxruntime maps them instead of holding the
    # protobuf and a copy of every initializer at once (which doubled the load-time peak)
    program.save(str(path), external_data=True)


def _write_manifest(folder: Path, **extra) -> None:
    files = {}
    for f in sorted(folder.iterdir()):
        if f.is_file() and f.name != "manifest.json":
            files[f.name] = {"size": f.stat().st_size, "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}
    (folder / "manifest.json").write_text(json.dumps({"format": EXPORT_FORMAT, **extra, "files": files}, indent=2))


def export_head(stage: Transformer, folder: Path, max_len: int, accuracy_level: int = ACCURACY_LEVEL,
                cuts: Sequence[int] = (), graph: str = "auto") -> dict:
    """Write the head graph of `stage` (already quantized) into `folder`: HEAD_FILE, or one graph per
    segment (names.segment_file) when `cuts` (layers inside (0, ℓ)) cut it. graph: "auto" (GroupQueryAttention
    where it can run the model, else traced) or "traced" (the torch-traced graph of the first runtime, kept
    for comparison and for onnxruntime builds without the LLM operators). Returns what the manifest
    records: {"graph": "gqa" or "traced", "segments": [[start, stop], ...]}."""
    import onnx

    from splitlm.export.graph import GRAPH_KIND, build_head_graph, gqa_unsupported

    bounds = sorted(set(cuts))
    bad = [c for c in bounds if not 0 < c < stage.stop]
    if bad:
        raise ExportError(f"segment cuts {bad} are not inside the head's layers (0, {stage.stop})")
    if graph not in ("auto", "traced"):
        raise ExportError(f"head graph {graph!r} is neither 'auto' nor 'traced'")
    why = gqa_unsupported(stage.spec) if graph == "auto" else "asked for the traced graph"
    if why is not None and any(stage.model.layers[i].self_attn.kv_quant is not None for i in stage.owned_layers):
        raise ExportError(f"a quantized KV cache needs the GroupQueryAttention graph, which cannot run this model ({why}); "
                          "use kv_bits 16")
    if why is not None and bounds:
        raise ExportError(f"a head in segments needs the GroupQueryAttention graph, which cannot run this model ({why})")
    if why is not None:
        if graph == "auto":
            log.warning("exporting the traced head graph, slower than GroupQueryAttention's: %s", why)
        export_head_onnx(stage, folder / HEAD_FILE, accuracy_level)
        return {"graph": "traced", "segments": [[0, stage.stop]]}
    edges = [0, *bounds, stage.stop]
    segments = [[a, b] for a, b in zip(edges, edges[1:])]
    for k, (a, b) in enumerate(segments):
        path = folder / names.segment_file(k)
        # weights in <graph>.data beside the graph: onnxruntime maps them instead of holding the
        # protobuf and a copy of every initializer at once
        onnx.save_model(build_head_graph(stage, max_len, accuracy_level, a, b), str(path), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=path.name + ".data", size_threshold=1024)
    return {"graph": GRAPH_KIND, "segments": segments}


@dataclass(frozen=True)
class ExportResult:
    device_dir: Path
    cloud_dir: Path | None
    head_bytes: int
    tail_bytes: int
    seconds: float


def export_artifacts(ckpt: Checkpoint, plan: Plan, out: Path, calib_ids: list[list[int]] | None = None,
                     progress: bool = True, accuracy_level: int = ACCURACY_LEVEL, segment_cuts: Sequence[int] = (),
                     graph: str = "auto") -> ExportResult:
    """Write DIR/device (and DIR/cloud unless device-only) for `plan`. segment_cuts: layers at which the
    head is cut into segments, each a graph with its own K/V buffers that the device can run as a
    prefix of the head or release (the split points a session may move to). graph: see export_head."""
    t0 = time.perf_counter()
    if accuracy_level not in ACCURACY_LEVELS:
        raise ExportError(f"MatMulNBits accuracy_level {accuracy_level!r} not in {ACCURACY_LEVELS}")
    plan.check_model(ckpt.spec.num_layers, ckpt.weights_hash)
    head, tail = build_stages(ckpt, plan, calib_ids, progress=progress)
    out = Path(out)
    device, cloud = out / "device", out / "cloud"
    shutil.rmtree(device, ignore_errors=True)
    device.mkdir(parents=True)
    # the head is cut where the plan's split may move, so that a session can run a prefix of it
    described = export_head(head, device, plan.max_seq_len, accuracy_level, sorted({*segment_cuts, *plan.move_cuts}), graph)
    if plan.kv_bits != 16:  # the cache's scales, for the device to quantize K/V the cloud moves down (numpy)
        save_kv_scales(head, device / names.KV_SCALES_FILE)
    bases = codec_bases(ckpt, plan, head)  # the ans codec's basis per split, for both sides ({} otherwise)
    energies = move_energies(ckpt, plan, head)  # what the K/V codec steps keys by, for both sides ({} otherwise)
    for folder in [device] + ([cloud] if tail is not None else []):
        folder.mkdir(parents=True, exist_ok=True)
        if bases:
            save_bases(bases, folder / names.CODEC_BASIS_FILE)
        if energies:
            kv_codec.save_energies(energies, folder / names.KV_CODEC_FILE)
        plan.save(folder / "plan.json")
        (folder / "spec.json").write_text(ckpt.spec.to_json())
        shutil.copyfile(ckpt.path / "tokenizer.json", folder / "tokenizer.json")
    save_template(ckpt.chat_template(), device)
    tail_bytes = 0
    if tail is not None:
        save_stage(tail, cloud / TAIL_FILE)
        tail_bytes = (cloud / TAIL_FILE).stat().st_size
        _write_manifest(cloud)
    else:
        shutil.rmtree(cloud, ignore_errors=True)
    _write_manifest(device, **described)
    head_bytes = sum(f.stat().st_size for f in device.glob("head.*"))
    return ExportResult(device, cloud if tail is not None else None, head_bytes,
                        tail_bytes, time.perf_counter() - t0)


def check_parity(ckpt: Checkpoint, plan: Plan, device_dir: Path, calib_ids: list[list[int]] | None = None,
                 prompts: int = 3, seed: int = 0) -> dict[str, float]:
    """Run the ONNX head (through the device runtime) and the torch head (same quantization) on
    random prompts: prefill, then two single-token steps with the KV cache. Raises ParityError
    naming the first tensor beyond tolerance; returns the worst relative error per output name."""
    import onnx

    from splitlm.device.runtime import DeviceHead, HeadSession

    torch_head = HeadGraph(build_stages(ckpt, plan, calib_ids, tail=False)[0]).eval()
    session = HeadSession(device_dir)
    head = DeviceHead(session)
    levels = {a.i for n in onnx.load(str(Path(device_dir) / HEAD_FILE), load_external_data=False).graph.node
              if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "accuracy_level"}
    kind = "int8-compute" if levels - {0} else ("quantized" if levels else "fp32")
    tol = PARITY_TOL[kind]
    # a quantized cache holds codes: its effect shows in the output, which is compared
    kv_names = [] if plan.kv_bits != 16 else [n for i in session.layers for n in (names.present_key(i), names.present_value(i))]
    rng = np.random.default_rng(seed)
    worst: dict[str, float] = {}
    for _ in range(prompts):
        length = int(rng.integers(4, 40))
        ids = rng.integers(0, ckpt.spec.vocab_size, (1, length))
        steps = [ids, rng.integers(0, ckpt.spec.vocab_size, (1, 1)), rng.integers(0, ckpt.spec.vocab_size, (1, 1))]
        head.reset()
        past = [torch.from_numpy(p) for p in session.empty_past(1)]
        for step in steps:
            positions = torch.arange(head.length, head.length + step.shape[1])[None]
            out = head.step([int(t) for t in step[0]])[None]
            with torch.inference_mode():
                ref = torch_head(torch.from_numpy(step), positions, *past)
            past = list(ref[1:])
            pairs = [(session.output_names[0], out, ref[0])] + list(zip(kv_names, head.presents(), ref[1:]))
            for name, a, r in pairs:
                r = r.numpy()
                if a.shape != r.shape:
                    raise ParityError(f"{name}: ONNX shape {a.shape} != torch shape {r.shape}")
                err = float(np.abs(a - r).max() / max(float(np.abs(r).max()), 1e-6))
                worst[name] = max(worst.get(name, 0.0), err)
                if not err <= tol:
                    raise ParityError(f"{name}: ONNX differs from torch by {err:.2e} (relative to max |torch|), tolerance {tol:.0e}")
    return worst
