"""Device speed: decode and 512-token prefill tokens/s of SmolLM2 through our onnxruntime head
(device-only plans: fp32, int8, int4), next to llama.cpp on the same GGUF and onnxruntime-genai's
builds of the same weights, all with the same threads; and each engine's peak RSS holding a
2,048-position context (a fresh subprocess per engine).

    .venv/bin/python bench/device.py [--threads N] [--reps 3] [--json bench/results/device.json]

Peers are bench-only optional dependencies; without them their rows are skipped with a message:
    .venv/bin/pip install llama-cpp-python                              # llama.cpp row
      (where a native build crashes, as on our CI machines, build it portable first:
       CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF
       -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" .venv/bin/pip install llama-cpp-python)
    .venv/bin/pip install onnxruntime-genai onnx_ir onnxscript          # onnxruntime-genai rows
Exports are cached under $SPLITLM_CACHE/bench-exports, genai builds under $SPLITLM_CACHE/bench-peers
(see bench/genai_peer.py).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from device_engines import RSS_CONTEXT, open_engine, peak_rss_mib

from splitlm import evaluate
from splitlm.model.checkpoint import cache_root
from splitlm.model.registry import KNOWN_MODELS, resolve_model
from splitlm.partition.plan import Plan
from splitlm.quantize.apply import preferred_method
from splitlm.quantize.config import CodecConfig, WeightQuant

KV_SHORT = 256
"""Positions of the short context whose peak RSS is subtracted in the KV table."""
PRECISIONS = {"fp32": 16, "int8": 8, "int4": 4}
"""Device weight bits: each with the method `splitlm export` picks by default (the GGUF's own Q4_1 blocks at
4 bits, RTN in groups of 32 at 8), and the 4-bit RTN re-quantization as a variant row."""


def export_cached(ckpt, plan: Plan) -> Path:
    from splitlm.export import EXPORT_FORMAT, export_artifacts

    root = cache_root() / "bench-exports" / f"{plan.hash}-f{EXPORT_FORMAT}"
    if not (root / "device" / "manifest.json").is_file():
        shutil.rmtree(root, ignore_errors=True)
        print(f"exporting {plan.device_weights.bits}-bit device-only head ...", file=sys.stderr, flush=True)
        export_artifacts(ckpt, plan, root, progress=False)
    return root / "device"


def _rewritten(device_dir: Path, name: str, edit) -> Path:
    """A copy of the head in `device_dir`'s sibling `name` whose graph `edit(model)` changed in place, with its
    manifest updated to the rewritten files (kept for the next run while its files match the manifest)."""
    import onnx

    from splitlm.artifacts import MANIFEST_FILE, check_manifest
    from splitlm.errors import ModelLoadError
    from splitlm.model.checkpoint import sha256_file

    out = device_dir.parent / name
    try:
        check_manifest(out)
        return out
    except ModelLoadError:
        shutil.rmtree(out, ignore_errors=True)
    # onnx.save appends to an existing external-data file: leave the head's files out of the copy
    shutil.copytree(device_dir, out, ignore=shutil.ignore_patterns("head.onnx*", MANIFEST_FILE))
    model = onnx.load(str(device_dir / "head.onnx"))
    edit(model)
    onnx.save(model, str(out / "head.onnx"), save_as_external_data=True, location="head.onnx.data")
    manifest = json.loads((device_dir / MANIFEST_FILE).read_text())
    for file in ("head.onnx", "head.onnx.data"):
        manifest["files"][file] = {"size": (out / file).stat().st_size, "sha256": sha256_file(out / file)}
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    return out


def with_accuracy_level(device_dir: Path, level: int) -> Path:
    """A copy of the head whose MatMulNBits nodes use another accuracy_level (4 = int8 compute)."""

    def edit(model) -> None:
        for node in model.graph.node:
            if node.op_type == "MatMulNBits":
                for attr in node.attribute:
                    if attr.name == "accuracy_level":
                        attr.i = level

    return _rewritten(device_dir, f"device-acc{level}", edit)


def without_block_mins(device_dir: Path) -> Path:
    """A copy of a "source" head with the Q4_1 block-min terms taken out (each `add_mins` node's output replaced by its
    matmul's, the nodes only it fed dropped): NOT the model any more, only the speed its exact form would have without
    the extra nodes that carry the mins (ReduceSum, MatMul, Add per linear)."""

    def edit(model) -> None:
        graph = model.graph
        renamed = {n.output[0]: n.input[0] for n in graph.node if n.name.endswith("/add_mins")}
        nodes = [n for n in graph.node if not n.name.endswith("/add_mins")]
        for node in nodes:
            for j, name in enumerate(node.input):
                node.input[j] = renamed.get(name, name)
        for o in graph.output:
            o.name = renamed.get(o.name, o.name)
        used, alive = {o.name for o in graph.output}, []
        for node in reversed(nodes):  # drop what no output needs any more
            if any(o in used for o in node.output):
                alive.append(node)
                used.update(node.input)
        del graph.node[:]
        graph.node.extend(reversed(alive))
        inits = [i for i in graph.initializer if i.name in used]
        del graph.initializer[:]
        graph.initializer.extend(inits)

    return _rewritten(device_dir, "device-no-mins", edit)


def measure(reset, feed, greedy_next, prompt: list[int], decode_prompt: list[int], decode_n: int,
            reps: int) -> tuple[float, float]:
    """Median prefill and decode tokens/s of an engine given as three callables:
    reset() clears the sequence, feed(ids) runs ids, greedy_next() is the argmax of the last logits."""
    reset()
    feed(prompt[:16])  # warm up
    prefill, decode = [], []
    for _ in range(reps):
        reset()
        t0 = time.perf_counter()
        feed(prompt)
        prefill.append(len(prompt) / (time.perf_counter() - t0))
        reset()
        feed(decode_prompt)
        t0 = time.perf_counter()
        for _ in range(decode_n):
            feed([greedy_next()])
        decode.append(decode_n / (time.perf_counter() - t0))
    return statistics.median(prefill), statistics.median(decode)


def time_engine(engine, *args) -> tuple[float, float]:
    return measure(engine.reset, engine.feed, engine.greedy_next, *args)


def perplexity(engine, wins: list[list[int]]) -> float:
    """Perplexity of an engine with all_logits(ids) -> (T, V) on `wins` (one 512-token prefill each)."""
    nll, count = 0.0, 0
    for win in wins:
        logits = engine.all_logits(win)[:-1].astype(np.float64)
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        nll -= float(logp[np.arange(len(win) - 1), win[1:]].sum())
        count += len(win) - 1
    return float(np.exp(nll / count))


@dataclass(frozen=True)
class Row:
    """One engine to time."""

    label: str
    kind: str
    """An engine kind of device_engines.KINDS."""
    path: Path
    """What the engine opens: a device head folder, a GGUF or a genai build."""
    optimization: str = "all"
    """onnxruntime graph optimization (ours only)."""
    headline: bool = True
    """Whether it gets the perplexity and peak-RSS columns; variants of the same weights do not."""
    kv_bits: int | None = None
    """Our KV cache width, for the KV-bytes table (rows of our default int4 head only)."""


def engines(ckpt) -> tuple[list[Row], list[str]]:
    """The rows to time, and why any peer is missing."""
    rows = []
    for name, bits in PRECISIONS.items():
        method = preferred_method(ckpt, bits)
        wq = WeightQuant(bits, 32, method) if bits != 16 else WeightQuant(16)
        # quantized plans hold the LM head at 8 bits, as llama.cpp's file holds its tied output at Q8_0
        plan = Plan(ckpt.model_id, ckpt.weights_hash, ckpt.spec.num_layers, device_weights=wq,
                    lm_head_bits=16 if bits == 16 else 8, codec=CodecConfig("fp16"), prefill_chunk=512,
                    max_seq_len=RSS_CONTEXT)
        device_dir = export_cached(ckpt, plan)
        label = f"ours {name}" + (f" ({method})" if bits != 16 else "")
        rows.append(Row(label, "ours", device_dir, kv_bits=16 if name == "int4" else None))
        if bits != 16:
            rows.append(Row(f"{label}, MatMulNBits fp32 compute", "ours", with_accuracy_level(device_dir, 0),
                            headline=False))
        if name == "int4":  # what the 8-bit LM head costs against genai's 4-bit one
            rows.append(Row(f"{label}, LM head 4-bit", "ours", export_cached(ckpt, plan.replace(lm_head_bits=4)), headline=False))
        if name == "int4" and method == "source":  # what carrying the Q4_1 mins exactly costs (not a valid model)
            rows.append(Row(f"{label}, mins dropped (speed only)", "ours", without_block_mins(device_dir), headline=False))
        if name == "int4" and method != "rtn":
            rtn = export_cached(ckpt, plan.replace(device_weights=WeightQuant(4, 32)))
            rows.append(Row("ours int4 (rtn, re-quantized)", "ours", rtn, headline=True))
        if name == "int4":
            for kv in (8, 4):
                rows.append(Row(f"{label}, kv {kv}", "ours", export_cached(ckpt, plan.replace(kv_bits=kv)), kv_bits=kv))
    notes = []
    gguf = KNOWN_MODELS["smollm2-135m"].locate()
    if importlib.util.find_spec("llama_cpp") is None:
        notes.append("llama.cpp: llama-cpp-python is not installed (`pip install llama-cpp-python` adds the row)")
    else:
        rows.append(Row("llama.cpp Q4_1 (same GGUF)", "llama.cpp", gguf))
    import genai_peer

    why = genai_peer.missing()
    if why:
        notes.append(f"onnxruntime-genai: {why}")
    for label in genai_peer.BUILDS if not why else ():
        try:
            rows.append(Row(f"onnxruntime-genai {label}", "genai", genai_peer.build(gguf, label)))
        except RuntimeError as e:
            notes.append(f"onnxruntime-genai {label}: {e}")
    return rows, notes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--json", default="bench/results/device.json")
    ap.add_argument("--ppl-windows", type=int, default=4, help="windows for the perplexity column (0 = skip)")
    ap.add_argument("--no-rss", action="store_true", help="skip the peak-RSS column")
    args = ap.parse_args()
    ckpt = resolve_model("smollm2-135m")
    tok = ckpt.tokenizer()
    prompt = evaluate.windows(tok, evaluate.protocol_text(), 1)[0]  # 512 tokens
    decode_prompt = prompt[:64]
    ppl_wins = evaluate.windows(tok, evaluate.protocol_text(), args.ppl_windows) if args.ppl_windows else []
    rss_ids = sum(evaluate.windows(tok, evaluate.protocol_text(), RSS_CONTEXT // 512), [])
    specs, notes = engines(ckpt)
    rows = []
    for row in specs:
        engine = open_engine(row.kind, row.path, args.threads, row.optimization)
        p, d = time_engine(engine, prompt, decode_prompt, args.decode_tokens, args.reps)
        ppl = perplexity(engine, ppl_wins) if ppl_wins and row.headline and hasattr(engine, "all_logits") else None
        del engine
        rss = peak_rss_mib(row.kind, row.path, args.threads, rss_ids) if row.headline and not args.no_rss else None
        short = grown = None
        if row.kv_bits is not None and not args.no_rss:
            # the same head holding KV_SHORT positions, and grown from there to RSS_CONTEXT one token a step:
            # the difference is the cache (a prefill's attention scratch at the full length would count too)
            short = peak_rss_mib(row.kind, row.path, args.threads, rss_ids[:KV_SHORT])
            grown = peak_rss_mib(row.kind, row.path, args.threads, rss_ids, prefill=KV_SHORT)
        rows.append({"engine": row.label, "prefill_tok_s": p, "decode_tok_s": d, "perplexity": ppl, "peak_rss_mib": rss,
                     "kv_bits": row.kv_bits, "peak_rss_short_mib": short, "peak_rss_grown_mib": grown})
        print(f"{row.label:<48}{p:>12.1f}{d:>12.1f}  ppl {ppl}  rss {rss}", file=sys.stderr, flush=True)
    # ratios against onnxruntime-genai's int4 build when it ran (the acceptance peer), else llama.cpp,
    # else our int4 head
    base = next((r for r in rows if r["engine"] == "onnxruntime-genai int4"), None) or \
        next((r for r in rows if r["engine"].startswith("llama.cpp")), None) or \
        next(r for r in rows if r["engine"].startswith("ours int4"))
    print(f"\nSmolLM2-135M device-only, {args.threads} threads, prefill 512 tokens, decode {args.decode_tokens} tokens "
          f"after a 64-token prompt, median of {args.reps}; peak RSS of a fresh process holding {RSS_CONTEXT} positions; "
          f"ratios against {base['engine']}")
    print(f"{'engine':<48}{'prefill tok/s':>14}{'ratio':>7}{'decode tok/s':>14}{'ratio':>7}{'ppl':>9}{'RSS MiB':>9}")
    for r in rows:
        r["prefill_ratio"] = r["prefill_tok_s"] / base["prefill_tok_s"]
        r["decode_ratio"] = r["decode_tok_s"] / base["decode_tok_s"]
        ppl = f"{r['perplexity']:.3f}" if r["perplexity"] else "-"
        rss = f"{r['peak_rss_mib']:.0f}" if r["peak_rss_mib"] else "-"
        print(f"{r['engine']:<48}{r['prefill_tok_s']:>14.1f}{r['prefill_ratio']:>6.2f}x{r['decode_tok_s']:>14.1f}"
              f"{r['decode_ratio']:>6.2f}x{ppl:>9}{rss:>9}")
    kv_rows = [r for r in rows if r["kv_bits"] is not None and r["peak_rss_short_mib"] and r["peak_rss_grown_mib"]]
    if kv_rows:
        layers = ckpt.spec.num_layers
        print(f"\nKV cache by peak RSS: (RSS grown by decode steps from {KV_SHORT} to {RSS_CONTEXT} positions - RSS at {KV_SHORT}) "
              f"/ ({RSS_CONTEXT - KV_SHORT} positions x {layers} layers)")
        print(f"{'kv bits':>8}{'bytes/position/layer':>22}{'of kv 16':>10}{'cache alone':>13}")
        ref = None
        for r in sorted(kv_rows, key=lambda r: -r["kv_bits"]):
            per = (r["peak_rss_grown_mib"] - r["peak_rss_short_mib"]) * 2**20 / ((RSS_CONTEXT - KV_SHORT) * layers)
            r["kv_bytes_per_position_layer"] = per
            ref = per if r["kv_bits"] == 16 else ref
            share = f"{per / ref:.0%}" if ref else "-"
            print(f"{r['kv_bits']:>8}{per:>22.0f}{share:>10}{ckpt.spec.kv_bytes_per_token(1, 32 if r['kv_bits'] == 16 else r['kv_bits']):>13.0f}")
    for note in notes:
        print(f"({note})")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"threads": args.threads, "rss_context": RSS_CONTEXT, "ratios_against": base["engine"], "rows": rows,
                                           "skipped": notes}, indent=2))


if __name__ == "__main__":
    main()
