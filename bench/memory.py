"""Predicted against measured device memory, prompt-heavy and decode-heavy, at 1k and 2k positions.

    .venv/bin/splitlm profile --out profile.json
    .venv/bin/python bench/memory.py --profile profile.json [--json bench/results/memory.json]

For SmolLM2 heads at several splits (W8, a float KV cache and an 8-bit one, and device-only with its
8-bit LM head), each exported with max_seq_len 2,048: a fresh device process runs the head on real
text to N positions, either as one prompt of N - 32 positions (prefilled in the plan's chunks) and
32 decode steps, or as one prefill chunk and decode to N. Its peak RSS (VmHWM) is set against the
partitioner's prediction for that plan at N (`partition.search.price`: the memory model the
profile fitted). Target: within 15 %.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from splitlm import evaluate
from splitlm.demo import cached_export
from splitlm.model.registry import resolve_model
from splitlm.partition.profile import Profile
from splitlm.partition.search import Budgets, describe, price, to_plan
from splitlm.profiler import measure_peak_rss

MiB = 2**20
HEADS = [(8, 8, 16), (15, 8, 16), (24, 8, 16), (24, 8, 8), (30, 8, 16)]
"""(split, device bits, KV bits)."""
LENGTHS = (1024, 2048)
DECODE = 32
"""Decode steps after the prompt of a prompt-heavy run."""


def sweep(profile: Profile, threads: int | None = None) -> list[dict]:
    """Each of HEADS run to each of LENGTHS, prompt-heavy and decode-heavy: predicted and measured peak RSS
    (printed as a table while it runs; also what bench/partition.py runs)."""
    ckpt = resolve_model(profile.model_id)
    text = ckpt.tokenizer().encode(evaluate.protocol_text()[:60000]).ids
    budgets = Budgets(1e18, 1e9, max_seq_len=max(LENGTHS), prefill_chunk=128)
    codec = profile.codecs[-1]
    rows = []
    print(f"{'plan':<48}{'N':>6}  {'run':<13}{'pred MiB':>10}{'meas MiB':>10}{'error':>9}")
    for split, bits, kv in HEADS:
        cand = price(profile, split, bits, 16, kv, codec, max(LENGTHS), budgets)
        plan = to_plan(cand, profile, budgets)
        device_dir = cached_export(ckpt, plan, progress=False) / "device"
        for n in LENGTHS:
            predicted = price(profile, split, bits, 16, kv, codec, n, budgets).memory_bytes
            for way, prompt in (("prompt-heavy", n - DECODE), ("decode-heavy", None)):
                measured = measure_peak_rss(device_dir, n, threads, text, prompt)
                rows.append({"plan": describe(cand, profile.num_layers).rsplit(", max_seq_len", 1)[0], "split": split,
                             "kv_bits": kv, "positions": n, "run": way, "predicted_bytes": predicted,
                             "measured_bytes": measured, "error": measured / predicted - 1})
                r = rows[-1]
                print(f"{r['plan']:<48}{n:>6}  {way:<13}{predicted / MiB:>10.1f}{measured / MiB:>10.1f}{r['error']:>+9.1%}",
                      flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", required=True)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default="bench/results/memory.json")
    args = ap.parse_args()
    rows = sweep(Profile.load(args.profile), args.threads)
    worst = max(abs(r["error"]) for r in rows)
    print(f"worst |measured / predicted - 1|: {worst:.1%} (target 15 %)")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"profile": args.profile, "rows": rows, "worst_error": worst}, indent=2))
    if worst > 0.15:
        sys.exit(1)


if __name__ == "__main__":
    main()
