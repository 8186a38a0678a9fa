"""`splitlm demo`: the whole product in one command, on loopback.

Default model and plan -> export (cached) -> the cloud service on a free loopback port ->
the device runtime streams activation frames to it -> text and a table of timings and bytes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from splitlm.artifacts import check_manifest
from splitlm.errors import ModelLoadError
from splitlm.model.checkpoint import Checkpoint, cache_root
from splitlm.partition.plan import Plan
from splitlm.quantize.config import CodecConfig, WeightQuant


def default_plan(ckpt: Checkpoint) -> Plan:
    """Half the layers on the device at 8 bits, the rest on the cloud at 8 bits, the tabq link (ε 0.02: transform coding + ANS)."""
    return Plan(ckpt.model_id, ckpt.weights_hash, ckpt.spec.num_layers // 2, device_weights=WeightQuant(8, 32),
                cloud_weights=WeightQuant(8, 32), codec=CodecConfig("tabq", error_budget=0.02),
                max_seq_len=min(2048, ckpt.spec.max_position), prefill_chunk=128)


def cached_export(ckpt: Checkpoint, plan: Plan, progress: bool = True) -> Path:
    """Export `plan` once into $SPLITLM_CACHE/exports/<plan hash>-f<format>; later calls reuse it
    (an incomplete or damaged one, whose files do not match their manifest's sizes, is exported again)."""
    from splitlm.export import EXPORT_FORMAT, export_artifacts

    def intact(folder: Path) -> bool:
        try:
            check_manifest(folder)
        except ModelLoadError:
            return False
        return True

    root = cache_root() / "exports" / f"{plan.hash}-f{EXPORT_FORMAT}"
    if not intact(root / "device") or (plan.split_layer < ckpt.spec.num_layers and not intact(root / "cloud")):
        export_artifacts(ckpt, plan, root, progress=progress)
    return root


@dataclass
class DemoReport:
    text: str
    rows: list[tuple[str, str]]


def run_demo(model: str, prompt: str, max_tokens: int, emit: Callable[[str], None]) -> DemoReport:
    from splitlm.cloud.service import ServerConfig, start_server
    from splitlm.cloud.tail import TailRunner
    from splitlm.device.client import RemoteSession, connect
    from splitlm.device.runtime import HeadSession, generate_split, load_tokenizer
    from splitlm.model.registry import resolve_model
    from splitlm.model.tokenizer import StreamingDecoder
    from splitlm.sampling import SamplingParams

    ckpt = resolve_model(model)
    plan = default_plan(ckpt)
    t0 = time.perf_counter()
    root = cached_export(ckpt, plan)
    prepare_s = time.perf_counter() - t0
    server, port, _ = start_server(TailRunner(root / "cloud"), "127.0.0.1:0", ServerConfig(max_sessions=4))
    try:
        head = HeadSession(root / "device", spin=False)  # the cloud's torch shares these cores
        tok = load_tokenizer(root / "device")
        L = ckpt.spec.num_layers
        emit(f"splitlm demo: {ckpt.model_id} split at layer {plan.split_layer}/{L}: device runs layers "
             f"[0, {plan.split_layer}) in onnxruntime, cloud serves [{plan.split_layer}, {L}) over gRPC on 127.0.0.1:{port}\n")
        emit(f"prompt: {prompt}\n\n")
        ids = tok.encode(f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n").ids
        stream = StreamingDecoder(tok)
        with RemoteSession(connect(f"127.0.0.1:{port}"), plan.hash, plan.model_id, SamplingParams(), max_tokens) as remote:
            result = generate_split(head, remote, ids, max_tokens, lambda t: emit(stream.push(t)), tok)
    finally:
        server.stop(grace=1)
    emit("\n\n")
    positions = len(ids) + len(result.token_ids) - 1
    d = ckpt.spec.hidden_size
    rows = [
        ("plan", f"{plan.hash}: device W{plan.device_weights.bits}, cloud W{plan.cloud_weights.bits}, "
                 f"codec {plan.codec.kind}" + (f" ({plan.codec.coder})" if plan.codec.kind == "tabq" else "") + f" ε={plan.codec.error_budget}"),
        ("export (cached)", f"{prepare_s:.1f} s"),
        ("prompt tokens", str(len(ids))),
        ("generated tokens", f"{len(result.token_ids)} ({result.stop_reason})"),
        ("time to first token", f"{result.ttft_s * 1e3:.0f} ms"),
        ("decode speed", f"{result.tokens_per_s:.1f} tokens/s"),
        ("bytes up per position", f"{result.link_bytes / positions:.0f} B (fp16 would be {2 * d} B)"),
        ("bytes up in total", f"{result.link_bytes} B"),
    ]
    width = max(len(k) for k, _ in rows) + 2
    for k, v in rows:
        emit(f"{k:<{width}}{v}\n")
    return DemoReport(result.text, rows)
