"""Quality of plans on SmolLM2: perplexity (DESIGN.md §10 protocol) and bytes per token on the wire.

Rows: fp32; uniform RTN W8/W4/W3 of the whole model; GPTQ W4/W3; one-point-split plans
(device W4 or W3 / cloud W8) at two split points; device KV 8/4 bits; and the activation
codec at several error budgets against baseline codecs (fp16, per-token int8, per-token
int4 without threshold splitting).

    .venv/bin/python bench/quality.py [--windows 8] [--json bench/results/quality.json] [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from splitlm import evaluate
from splitlm.model.registry import resolve_model
from splitlm.partition.plan import Plan
from splitlm.quantize.config import CodecConfig, WeightQuant

EXACT = CodecConfig("fp32")
PLAIN = dict(rotate_block=0, clip_ratios=(1.0,))


def rows(L: int, quick: bool) -> list[tuple[str, str, dict]]:
    """(section, name, plan fields)."""
    half = L // 2
    w = WeightQuant
    out = [("weights", "fp32", dict(split=half, codec=EXACT))]
    for bits in (8, 4, 3):
        out.append(("weights", f"RTN W{bits} g128 (whole model)", dict(split=half, device_weights=w(bits, 128), cloud_weights=w(bits, 128), codec=EXACT)))
    for bits in (4, 3):
        gptq = w(bits, 128, "gptq")
        out.append(("weights", f"GPTQ W{bits} g128 (whole model)", dict(split=half, device_weights=gptq, cloud_weights=gptq, codec=EXACT)))
    for split in (L // 3, 2 * L // 3):
        for dev in (4, 3):
            out.append(("one-point split", f"split {split}: device GPTQ W{dev} / cloud RTN W8",
                        dict(split=split, device_weights=w(dev, 128, "gptq"), cloud_weights=w(8, 128), codec=EXACT)))
    for kv in (8, 4):
        out.append(("kv cache", f"device KV {kv}-bit (split {half})", dict(split=half, kv_bits=kv, codec=EXACT)))
    s = L // 3
    fixed = dict(entropy="none", ts_rule="none", error_budget=1, **PLAIN)  # one fixed width per token, no TS
    out += [
        ("codec", f"split {s}: fp32 link", dict(split=s, codec=EXACT)),
        ("codec", f"split {s}: fp16", dict(split=s, codec=CodecConfig("fp16"))),
        ("codec", f"split {s}: per-token int8", dict(split=s, codec=CodecConfig("tabq", bit_widths=(8,), **fixed))),
        ("codec", f"split {s}: per-token int4 (no TS)", dict(split=s, codec=CodecConfig("tabq", bit_widths=(4,), **fixed))),
        ("codec", f"split {s}: per-token int4 + TS", dict(split=s, codec=CodecConfig("tabq", entropy="none", bit_widths=(4,), error_budget=1, **PLAIN))),
        ("codec", f"split {s}: TS+TAB-Q, no rotation, eps 0.01", dict(split=s, codec=CodecConfig("tabq", entropy="none", error_budget=0.01, **PLAIN))),
    ]
    for eps in ((0.01, 0.03, 0.035, 0.05) if quick else (0.005, 0.01, 0.02, 0.03, 0.035, 0.04, 0.05, 0.1)):
        out.append(("codec", f"split {s}: TS+TAB-Q eps {eps}", dict(split=s, codec=CodecConfig("tabq", entropy="none", error_budget=eps))))
    out.append(("codec", f"split {s}: TS+TAB-Q forced 3-bit", dict(split=s, codec=CodecConfig("tabq", entropy="none", bit_widths=(3,), error_budget=1))))
    for eps in ((0.03, 0.05) if quick else (0.01, 0.02, 0.03, 0.035, 0.05)):  # the default coder: transform + ANS
        out.append(("codec", f"split {s}: ans eps {eps}", dict(split=s, codec=CodecConfig("tabq", error_budget=eps))))
    if quick:
        out = [r for r in out if "GPTQ" not in r[1]]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--calib-windows", type=int, default=16)
    ap.add_argument("--json", default="bench/results/quality.json")
    ap.add_argument("--quick", action="store_true", help="fewer codec points, no GPTQ")
    args = ap.parse_args()
    ckpt = resolve_model(args.model)
    tok = ckpt.tokenizer()
    wins = evaluate.windows(tok, evaluate.protocol_text(), args.windows)
    calib = evaluate.calibration_windows(tok, args.calib_windows)
    results = []
    fp16_bytes = 2 * ckpt.spec.hidden_size
    header = f"{'section':<16}{'plan':<52}{'ppl':>9}{'Δppl':>8}{'B/token':>9}{'vs fp16':>8}"
    print(f"model {ckpt.model_id}, {args.windows} windows x 512 tokens of pydoc_data.topics, calibration: last {args.calib_windows} windows")
    print(header)
    print("-" * len(header))
    baseline: dict[int, float] = {}
    for section, name, fields in rows(ckpt.spec.num_layers, args.quick):
        split = fields.pop("split")
        plan = Plan(ckpt.model_id, ckpt.weights_hash, split, prefill_chunk=128, max_seq_len=ckpt.spec.max_position, **fields)
        t0 = time.perf_counter()
        q = evaluate.evaluate_plan(ckpt, plan, wins, calib, progress=False)
        if plan.codec.kind == "fp32" and plan.device_weights.bits == 16 and plan.cloud_weights.bits == 16 and plan.kv_bits == 16:
            baseline[split] = q.perplexity
        ref = baseline.get(split, baseline.get(ckpt.spec.num_layers // 2))
        delta = 100 * (q.perplexity / ref - 1) if ref else float("nan")
        coded = plan.codec.kind != "fp32" and q.bytes_per_token
        bpt = f"{q.bytes_per_token:.1f}" if coded else "-"
        ratio = f"{fp16_bytes / q.bytes_per_token:.2f}x" if coded else "-"
        print(f"{section:<16}{name:<52}{q.perplexity:>9.4f}{delta:>+7.2f}%{bpt:>9}{ratio:>8}", flush=True)
        results.append({"section": section, "name": name, "perplexity": q.perplexity, "delta_pct": delta,
                        "bytes_per_token": q.bytes_per_token, "fp16_bytes_per_token": fp16_bytes,
                        "seconds": time.perf_counter() - t0, "plan": plan.to_dict()})
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"model": ckpt.model_id, "windows": args.windows, "rows": results}, indent=2))
    print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
