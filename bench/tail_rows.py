"""The tail's rows: how its matmuls round a row by the rows in the call, what running lone rows padded costs, and a
bfloat16 tail's numbers against float32's. SmolLM2, the default plan's cloud part, on the CPU, one torch thread.

    .venv/bin/python bench/tail_rows.py [--json bench/results/tail_rows.json]

1. For each matmul shape of the tail and each dtype: the call sizes (1 to 48 rows) that give 48 rows of random
   input the same numbers, as groups ("1 | 2 3 | 4 6 ..." means three roundings).
2. A step of the tail (1 to 4 positions after 100: a decode step, speculative steps), its matmuls unpadded, and
   as the TailRunner runs them (`row_padding`), float32 and bfloat16, median of 25.
3. `row_padding` and `rows_alike` as the TailRunner finds them for each dtype.
4. bfloat16 against float32 on the same frames (4 windows of the protocol text through the exported head):
   the logits' relative L2, how often the two pick the same token, and perplexity.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from splitlm import corpus
from splitlm.cloud.tail import TAIL_FILE, TailRunner, _linears
from splitlm.demo import cached_export, default_plan
from splitlm.device.runtime import DeviceHead, HeadSession
from splitlm.model.llama import KVCache
from splitlm.model.registry import resolve_model
from splitlm.quantize.apply import load_stage

DTYPES = ("float32", "bfloat16")
SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 48)
"""Call sizes tried: each divides ROWS, so every call of a size has that many rows."""
ROWS = 48


@torch.inference_mode()
def groups(module: torch.nn.Module, dtype: torch.dtype) -> str:
    """The call sizes of SIZES that round ROWS rows alike, as groups 'a | b c | ...' (the module's own forward, unpadded)."""
    x = torch.randn(ROWS, module.in_features, generator=torch.Generator().manual_seed(0)).to(dtype)
    outs = {n: torch.cat([type(module).forward(module, x[i:i + n]) for i in range(0, ROWS, n)]) for n in SIZES}
    found: list[list[int]] = []
    for n in SIZES:
        for g in found:
            if torch.equal(outs[g[0]], outs[n]):
                g.append(n)
                break
        else:
            found.append([n])
    return " | ".join(" ".join(map(str, g)) for g in found)


@torch.inference_mode()
def step_ms(stage, rows: int, dtype: torch.dtype, reps: int = 25) -> float:
    x = torch.randn(1, 100 + rows, stage.spec.hidden_size, generator=torch.Generator().manual_seed(1)).to(dtype)
    cache = KVCache()
    stage(x[:, :100], cache=cache, last_only=True)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        stage(x[:, 100:], cache=cache)
        times.append(time.perf_counter() - t)
        cache.crop(100)
    return statistics.median(times) * 1e3


@torch.inference_mode()
def compare(ckpt, root: Path, runners: dict[str, TailRunner], windows: int) -> dict:
    """bfloat16 against float32 logits on the same frames of `windows` protocol windows."""
    session = HeadSession(root / "device")
    rel, agree, nll = [], [], {name: [] for name in runners}
    for w in corpus.windows(ckpt.tokenizer(), corpus.protocol_text(), windows):
        head = DeviceHead(session)
        frames = [head.encode(h) for h, _ in head.chunks(w)]
        logits = {}
        for name, runner in runners.items():
            s = runner.new_session()
            logits[name] = torch.cat([s.logits(f) for f in frames])
            s.close()
            nll[name].append(float(torch.nn.functional.cross_entropy(logits[name][:-1], torch.tensor(w[1:]))))
        a, b = logits["float32"], logits["bfloat16"]
        rel.append(float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(a)))
        agree.append(float((a.argmax(-1) == b.argmax(-1)).float().mean()))
    return {"windows": windows, "logits_rel_l2": rel, "same_token": agree,
            "perplexity": {name: float(np.exp(np.mean(v))) for name, v in nll.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=4, help="protocol windows for the bfloat16 comparison")
    ap.add_argument("--json", default="bench/results/tail_rows.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    ckpt = resolve_model("smollm2-135m")
    plan = default_plan(ckpt)
    root = cached_export(ckpt, plan)
    out: dict = {"plan": plan.hash, "groups": [], "step_ms": [], "runner": {}}
    for name in DTYPES:
        dtype = getattr(torch, name)
        stage = load_stage(ckpt.spec, root / "cloud" / TAIL_FILE, dtype)  # unpadded
        kinds = {}
        for m in _linears(stage):
            kinds.setdefault((m.in_features, m.out_features), m)
        for (k, n), m in kinds.items():
            out["groups"].append({"dtype": name, "in": k, "out": n, "groups": groups(m, dtype)})
        runner = TailRunner(root / "cloud", dtype=name, device="cpu", warm_up=False)
        out["runner"][name] = {"row_padding": runner.row_padding, "rows_alike": runner.rows_alike}
        for rows in (1, 2, 3, 4):
            out["step_ms"].append({"dtype": name, "rows": rows, "unpadded_ms": step_ms(stage, rows, dtype),
                                   "runner_ms": step_ms(runner.stage, rows, dtype), "runs_as": runner.row_padding.get(rows, rows)})
    runners = {name: TailRunner(root / "cloud", dtype=name, device="cpu", warm_up=False) for name in DTYPES}
    out["bfloat16_vs_float32"] = compare(ckpt, root, runners, args.windows)

    print(f"SmolLM2 tail [{plan.cloud_start}, {ckpt.spec.num_layers}) on the CPU, one torch thread")
    print(f"\n{'dtype':<10}{'matmul':<14}rows rounded alike (of calls of {', '.join(map(str, SIZES))})")
    for r in out["groups"]:
        print(f"{r['dtype']:<10}{r['in']:>5} -> {r['out']:<6}  {r['groups']}")
    print(f"\n{'dtype':<10}{'step rows':>10}{'unpadded ms':>13}{'runner ms':>11}{'runs as':>9}")
    for r in out["step_ms"]:
        print(f"{r['dtype']:<10}{r['rows']:>10}{r['unpadded_ms']:>13.1f}{r['runner_ms']:>11.1f}{r['runs_as']:>9}")
    print()
    for name, r in out["runner"].items():
        padded = ", ".join(f"{n} as {m}" for n, m in r["row_padding"].items()) or "none"
        print(f"{name}: rows padded {padded}; rows_alike {r['rows_alike']}")
    c = out["bfloat16_vs_float32"]
    print(f"\nbfloat16 vs float32, {c['windows']} protocol windows: logits relative L2 "
          f"{min(c['logits_rel_l2']):.4f} to {max(c['logits_rel_l2']):.4f}; same token at {100 * min(c['same_token']):.1f} to "
          f"{100 * max(c['same_token']):.1f} % of positions; perplexity {c['perplexity']['float32']:.3f} (float32) against "
          f"{c['perplexity']['bfloat16']:.3f} (bfloat16)")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
