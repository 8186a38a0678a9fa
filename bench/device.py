"""Device speed: decode and 512-token prefill tokens/s of SmolLM2 through our onnxruntime head
(device-only plans: fp32, int8, int4), next to llama.cpp on the same GGUF with the same threads.

    .venv/bin/python bench/device.py [--threads N] [--reps 3] [--json bench/results/device.json]

llama.cpp runs through llama-cpp-python, a bench-only optional dependency; without it the
column is skipped. Exports are cached under $SPLITLM_CACHE/bench-exports.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from splitlm import evaluate
from splitlm.model.checkpoint import cache_root
from splitlm.model.registry import KNOWN_MODELS, resolve_model
from splitlm.partition.plan import Plan
from splitlm.quantize.config import CodecConfig, WeightQuant

PRECISIONS = {"fp32": WeightQuant(16), "int8": WeightQuant(8, 32), "int4": WeightQuant(4, 32)}
"""Device weights; the int4 groups of 32 match the GGUF's Q4_1 blocks."""


def export_cached(ckpt, plan: Plan) -> Path:
    from splitlm.export import EXPORT_FORMAT, export_artifacts

    root = cache_root() / "bench-exports" / f"{plan.hash}-f{EXPORT_FORMAT}"
    if not (root / "device" / "manifest.json").is_file():
        shutil.rmtree(root, ignore_errors=True)
        print(f"exporting {plan.device_weights.bits}-bit device-only head ...", file=sys.stderr, flush=True)
        export_artifacts(ckpt, plan, root, progress=False)
    return root / "device"


def with_accuracy_level(device_dir: Path, level: int) -> Path:
    """A copy of the head whose MatMulNBits nodes use another accuracy_level (4 = int8 compute)."""
    import onnx

    out = device_dir.parent / f"device-acc{level}"
    if not (out / "head.onnx").is_file():
        shutil.copytree(device_dir, out, dirs_exist_ok=True)
        model = onnx.load(str(device_dir / "head.onnx"))
        for node in model.graph.node:
            if node.op_type == "MatMulNBits":
                for attr in node.attribute:
                    if attr.name == "accuracy_level":
                        attr.i = level
        onnx.save(model, str(out / "head.onnx"), save_as_external_data=True, location="head.onnx.data")
    return out


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


def time_ours(device_dir: Path, threads: int, optimization: str, *args) -> tuple[float, float]:
    from splitlm.device.runtime import DeviceHead, HeadSession

    head = DeviceHead(HeadSession(device_dir, threads=threads, optimization=optimization))
    last = {}

    def feed(ids):
        last["logits"] = head.step(ids)[-1]

    return measure(head.reset, feed, lambda: int(np.argmax(last["logits"])), *args)


def perplexity_ours(device_dir: Path, threads: int, wins: list[list[int]]) -> float:
    """Perplexity of the device-only ONNX head itself on `wins` (one 512-token prefill each)."""
    from splitlm.device.runtime import DeviceHead, HeadSession

    head = DeviceHead(HeadSession(device_dir, threads=threads))
    nll, count = 0.0, 0
    for win in wins:
        head.reset()
        logits = head.step(win)[:-1].astype(np.float64)
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        nll -= float(logp[np.arange(len(win) - 1), win[1:]].sum())
        count += len(win) - 1
    return float(np.exp(nll / count))


def time_llama_cpp(gguf: Path, threads: int, *args) -> tuple[float, float] | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=str(gguf), n_threads=threads, n_threads_batch=threads, n_ctx=1024, n_batch=512, verbose=False)
    return measure(llm.reset, llm.eval, lambda: int(np.argmax(llm.scores[llm.n_tokens - 1])), *args)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--json", default="bench/results/device.json")
    ap.add_argument("--ppl-windows", type=int, default=4, help="windows for the perplexity column (0 = skip)")
    args = ap.parse_args()
    ckpt = resolve_model("smollm2-135m")
    tok = ckpt.tokenizer()
    prompt = evaluate.windows(tok, evaluate.protocol_text(), 1)[0]  # 512 tokens
    decode_prompt = prompt[:64]
    ppl_wins = evaluate.windows(tok, evaluate.protocol_text(), args.ppl_windows) if args.ppl_windows else []
    L = ckpt.spec.num_layers
    rows = []
    for name, wq in PRECISIONS.items():
        # quantized plans hold the LM head at 8 bits, as llama.cpp's file holds its tied output at Q8_0
        plan = Plan(ckpt.model_id, ckpt.weights_hash, L, device_weights=wq, lm_head_bits=16 if wq.bits == 16 else 8,
                    codec=CodecConfig("fp16"), prefill_chunk=512, max_seq_len=2048)
        device_dir = export_cached(ckpt, plan)
        variants = [(f"ours {name}", device_dir, "all")]
        if wq.bits != 16:
            variants.append((f"ours {name}, MatMulNBits fp32 compute", with_accuracy_level(device_dir, 0), "all"))
        if name == "int4":
            variants.append((f"ours {name}, basic graph optimization", device_dir, "basic"))
        for label, folder, opt in variants:
            p, d = time_ours(folder, args.threads, opt, prompt, decode_prompt, args.decode_tokens, args.reps)
            ppl = perplexity_ours(folder, args.threads, ppl_wins) if ppl_wins and opt == "all" else None
            rows.append({"engine": label, "prefill_tok_s": p, "decode_tok_s": d, "perplexity": ppl})
            print(f"{label:<48}{p:>12.1f}{d:>12.1f}  ppl {ppl}", file=sys.stderr, flush=True)
    ref = time_llama_cpp(KNOWN_MODELS["smollm2-135m"].locate(), args.threads, prompt, decode_prompt, args.decode_tokens, args.reps)
    if ref is not None:
        rows.append({"engine": "llama.cpp Q4_1 (same GGUF)", "prefill_tok_s": ref[0], "decode_tok_s": ref[1], "perplexity": None})
    base = rows[-1] if ref is not None else None
    print(f"\nSmolLM2-135M device-only, {args.threads} threads, prefill 512 tokens, decode {args.decode_tokens} tokens "
          f"after a 64-token prompt, median of {args.reps}")
    print(f"{'engine':<48}{'prefill tok/s':>14}{'decode tok/s':>14}{'decode vs llama.cpp':>21}{'ppl':>9}")
    for r in rows:
        ratio = f"{r['decode_tok_s'] / base['decode_tok_s']:.2f}x" if base else "-"
        ppl = f"{r['perplexity']:.3f}" if r.get("perplexity") else "-"
        print(f"{r['engine']:<48}{r['prefill_tok_s']:>14.1f}{r['decode_tok_s']:>14.1f}{ratio:>21}{ppl:>9}")
    if ref is None:
        print("(llama-cpp-python is not installed: `pip install llama-cpp-python` adds the llama.cpp row)")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"threads": args.threads, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
