"""The K/V codec for moves: bytes, quality and exactness after a move, speed (SmolLM2).

    .venv/bin/python bench/kv_wire.py [--json bench/results/kv_wire.json] [--windows 8]

A plan at split 24 moves to 6 (18 layers change sides), at exact settings otherwise (fp32 weights and link),
so that everything measured is the move's K/V:

1. Size: bytes per position per layer of the moved K/V (keys and values, every byte counted) for 512
   positions of the protocol text, for float32 (the "exact" move of a float cache), float16, 8-bit and 4-bit
   codes with per-channel scales (what the device's quantized caches send), the K/V codec ("ans") at
   several points (τ keys, ε values; the plan's MoveCodec), and "recompute" (the float32 hidden states
   entering layer 6, from which the cloud recomputes the K/V: their bytes over the 18 layers, and the
   cloud's time to recompute them here).
2. Perplexity after a move: windows of 512 tokens, moved at 256; perplexity of the last 256 tokens against
   the exact move on the same windows.
3. Greedy output after a move: five chat prompts, the move at the end of the prompt, then 64 greedy tokens;
   the first token where the output leaves the unmoved run's (64 = all equal). The 8-bit and 4-bit rows round
   the moved K/V to per-channel absmax codes over the moved positions (the best an 8/4-bit cache could send).
4. Speed: encode and decode per position per layer (median of 5).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from splitlm import corpus
from splitlm.local import LocalSplit, exact_plan
from splitlm.model.registry import resolve_model
from splitlm.quantize import kv_wire
from splitlm.quantize.config import MoveCodec

SPLIT, TO = 24, 6
POINTS = {
    "ans τ 0.05 ε 0.002": MoveCodec("ans", 0.05, 0.002),
    "ans τ 0.1 ε 0.005": MoveCodec("ans", 0.1, 0.005),
    "ans τ 0.15 ε 0.01": MoveCodec("ans", 0.15, 0.01),
    "ans τ 0.2 ε 0.02": MoveCodec("ans", 0.2, 0.02),
}
DEFAULT = MoveCodec()
PROMPTS = ["Explain why the sky is blue.", "Write a short poem about the sea.", "What are three tips for staying healthy?",
           "Summarize the plot of Romeo and Juliet.", "How do I sort a list in Python?"]


class RoundedMoves(LocalSplit):
    """A LocalSplit whose moves round K/V to b-bit per-channel absmax codes over the moved positions (exact otherwise)."""

    bits = 8

    def _move(self, caches, layer):
        q = 2 ** (self.bits - 1) - 1
        for i in range(layer, caches.split):
            k, v = caches.head.layers[i]
            caches.head.layers[i] = tuple(torch.round(t / (s := t.abs().amax(2, keepdim=True).clamp_min(1e-30) / q)) * s for t in (k, v))
        super()._move(caches, layer)


def _runner(ckpt, point, **plan_kw):
    if isinstance(point, int):
        cls = type(f"Rounded{point}", (RoundedMoves,), {"bits": point})
        return cls(ckpt, plan=exact_plan(ckpt, SPLIT, move_codec=MoveCodec("exact"), **plan_kw))
    return LocalSplit(ckpt, plan=exact_plan(ckpt, SPLIT, move_codec=point, **plan_kw))


def sizes(ckpt, runner) -> list[dict]:
    tok = ckpt.tokenizer()
    ids = corpus.windows(tok, corpus.protocol_text(), 1, skip=8)[0]
    caches = runner.new_caches()
    with torch.inference_mode():
        runner.head(torch.tensor([ids]), cache=caches.head, stop=SPLIT)
    kv = {i: tuple(t[0].float().numpy() for t in caches.head.read(i)) for i in range(TO, SPLIT)}
    T, n = len(ids), SPLIT - TO

    def per(total: float) -> float:
        return total / (T * n)

    spec = ckpt.spec
    rows = [{"encoding": "float32 (exact)", "bytes_per_position_layer": 2 * spec.num_kv_heads * spec.head_dim * 4},
            {"encoding": "float16", "bytes_per_position_layer": 2 * spec.num_kv_heads * spec.head_dim * 2}]
    for bits in (8, 4):
        total = 0
        for i, (k, v) in kv.items():
            ks, vs = (np.maximum(np.abs(t).max(1), 1e-30) / (2 ** (bits - 1) - 1) for t in (k, v))
            total += sum(c.ByteSize() for c in kv_wire.chunks(i, kv_wire.quantize(k, ks, bits), kv_wire.quantize(v, vs, bits), bits, ks, vs))
        rows.append({"encoding": f"{bits}-bit codes + scales", "bytes_per_position_layer": per(total)})
    for name, point in POINTS.items():
        total, enc = 0, 0.0
        for i, (k, v) in kv.items():
            t0 = time.perf_counter()
            items = list(kv_wire.move_chunks(i, k, v, point, runner.kv_energies))
            enc += time.perf_counter() - t0
            total += sum(c.ByteSize() for c in items)
        rows.append({"encoding": name + (" (default)" if point == DEFAULT else ""), "bytes_per_position_layer": per(total),
                     "encode_us_per_position_layer": 1e6 * enc / (T * n)})
    # "recompute": the hidden states entering layer TO instead of K/V; the cloud runs layers [TO, SPLIT) over them
    with torch.inference_mode():
        hidden = runner.head(torch.tensor([ids]), stop=TO)
    items = list(kv_wire.hidden_chunks(TO, hidden[0].numpy()))
    t0 = time.perf_counter()
    runner.tail.recompute_kv(hidden, range(TO, SPLIT), 128)
    rows.append({"encoding": "recompute (hidden states, float32)", "bytes_per_position_layer": per(sum(c.ByteSize() for c in items)),
                 "recompute_ms": 1e3 * (time.perf_counter() - t0)})
    items = [c for i, (k, v) in kv.items() for c in kv_wire.move_chunks(i, k, v, DEFAULT, runner.kv_energies)]
    times = []
    for _ in range(5):
        assembler = kv_wire.Assembler(range(TO, SPLIT), T, spec.num_kv_heads, spec.head_dim)
        t0 = time.perf_counter()
        for c in items:
            assembler.add(c)
        assembler.result()
        times.append(time.perf_counter() - t0)
    default = next(r for r in rows if r["encoding"].endswith("(default)"))
    default["decode_us_per_position_layer"] = 1e6 * sorted(times)[2] / (T * n)
    b8 = next(r for r in rows if r["encoding"].startswith("8-bit"))["bytes_per_position_layer"]
    b4 = next(r for r in rows if r["encoding"].startswith("4-bit"))["bytes_per_position_layer"]
    for r in rows:
        r["vs_8bit"], r["vs_4bit"] = b8 / r["bytes_per_position_layer"], b4 / r["bytes_per_position_layer"]
    return rows


def perplexity(ckpt, windows: int) -> list[dict]:
    wins = corpus.windows(ckpt.tokenizer(), corpus.protocol_text(), windows)
    rows, base = [], None
    for name, point in {"exact": MoveCodec("exact"), "8-bit codes": 8, "4-bit codes": 4, "recompute": MoveCodec("recompute"),
                        **POINTS}.items():
        runner = _runner(ckpt, point, prefill_chunk=256, max_seq_len=512, split_moves=((256, TO),))
        nll = n = 0
        with torch.inference_mode():
            for w in wins:
                ids = torch.tensor([w])
                lp = torch.log_softmax(runner.forward(ids, runner.new_caches())[0, 255:-1].double(), -1)
                nll -= lp[torch.arange(256), ids[0, 256:]].sum().item()
                n += 256
        ppl = math.exp(nll / n)
        base = base or ppl
        rows.append({"move": name, "perplexity": ppl, "delta_pct": 100 * (ppl / base - 1)})
        print(f"  {name:22s} ppl {ppl:.4f} ({rows[-1]['delta_pct']:+.3f} %)", file=sys.stderr, flush=True)
    return rows


def greedy(ckpt) -> list[dict]:
    tok = ckpt.tokenizer()
    prompts = [tok.encode(f"<|im_start|>user\n{p}<|im_end|>\n<|im_start|>assistant\n").ids for p in PROMPTS]

    def run(point, moves=True):
        return [_runner(ckpt, point, prefill_chunk=256, max_seq_len=512, split_moves=((len(ids), TO),) if moves else ())
                .generate(ids, 64).token_ids for ids in prompts]

    ref = run(MoveCodec("exact"), moves=False)
    rows = []
    for name, point in {"exact": MoveCodec("exact"), "8-bit codes": 8, "4-bit codes": 4, "recompute": MoveCodec("recompute"),
                        **POINTS}.items():
        got = run(point)
        first = [next((j for j, (a, b) in enumerate(zip(r, g)) if a != b), min(len(r), len(g))) for r, g in zip(ref, got)]
        rows.append({"move": name, "first_divergence": first, "prompts_equal_64": sum(f >= 64 for f in first)})
        print(f"  {name:22s} first divergence {first}", file=sys.stderr, flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--json", default="bench/results/kv_wire.json")
    args = ap.parse_args()
    ckpt = resolve_model("smollm2-135m", progress=False)
    runner = LocalSplit(ckpt, plan=exact_plan(ckpt, SPLIT, split_moves=((1, TO),)))
    print("sizes ...", file=sys.stderr)
    size_rows = sizes(ckpt, runner)
    print(f"{'encoding':32s} {'B/pos/layer':>12s} {'vs 8-bit':>9s} {'vs 4-bit':>9s} {'enc µs':>8s} {'dec µs':>8s}")
    for r in size_rows:
        print(f"{r['encoding']:32s} {r['bytes_per_position_layer']:12.1f} {r['vs_8bit']:8.2f}x {r['vs_4bit']:8.2f}x "
              f"{r.get('encode_us_per_position_layer', float('nan')):8.1f} {r.get('decode_us_per_position_layer', float('nan')):8.1f}"
              + (f"  (recompute of 18 layers x 512 positions: {r['recompute_ms']:.0f} ms)" if "recompute_ms" in r else ""))
    print("perplexity after a move ...", file=sys.stderr)
    ppl_rows = perplexity(ckpt, args.windows)
    print("greedy output after a move ...", file=sys.stderr)
    greedy_rows = greedy(ckpt)
    print(f"\n{'move':24s} {'ppl':>8s} {'Δ':>8s}  first divergence (of 64) per prompt")
    for p, g in zip(ppl_rows, greedy_rows):
        print(f"{p['move']:24s} {p['perplexity']:8.4f} {p['delta_pct']:+7.3f}%  {g['first_divergence']}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"split": SPLIT, "to": TO, "sizes": size_rows, "perplexity": ppl_rows,
                                           "greedy": greedy_rows}, indent=2) + "\n")
    print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
