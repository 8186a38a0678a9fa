"""Where a speculative step's time goes, in process, on the default SmolLM2 plan (no network): the device head's
call for a step of k + 1 rows (the last token's and k drafts'), run as the head runs it (one call) and with a call
per row (as it ran before, when a one-row call computed other numbers than a row of several), the rows' encode, and the
cloud tail's verify of them (drafts it does not choose, so it keeps none), against a one-row decode step. Medians
of --reps, each after the same 64-position prompt.

    .venv/bin/python bench/spec_step.py [--rows 1 2 3 5] [--reps 12] [--json bench/results/spec_step.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from splitlm import corpus
from splitlm.demo import cached_export, default_plan
from splitlm.model.registry import resolve_model

DRAFT = 7
"""The token every draft is: one the model does not choose after the prompt."""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 3, 5])
    ap.add_argument("--reps", type=int, default=12)
    ap.add_argument("--json", default="bench/results/spec_step.json")
    args = ap.parse_args()

    from splitlm.cloud.tail import TailRunner
    from splitlm.device.runtime import DeviceHead, HeadSession
    from splitlm.sampling import SamplingParams

    ckpt = resolve_model("smollm2-135m")
    plan = default_plan(ckpt)
    root = cached_export(ckpt, plan)
    head, runner = DeviceHead(HeadSession(root / "device")), TailRunner(root / "cloud")
    prompt = corpus.windows(ckpt.tokenizer(), corpus.protocol_text(), 1)[0][:64]
    rows_out = []
    for rows in args.rows:
        times: dict[str, list[float]] = {"head_ms": [], "head_call_per_row_ms": [], "encode_ms": [], "cloud_ms": []}
        for _ in range(args.reps):
            head.reset()
            tail = runner.new_session(SamplingParams())
            first = tail.send(head.encode(head.step(prompt)), len(prompt), True)
            ids = [first] + [DRAFT] * (rows - 1)
            t0 = time.perf_counter()
            for i in ids:  # as the head ran a step before
                head.step([i])
            t1 = time.perf_counter()
            head.rewind(len(prompt))
            hidden = head.step_each(ids)
            t2 = time.perf_counter()
            frame = head.encode(hidden)
            t3 = time.perf_counter()
            if rows == 1:
                tail.send(frame, 1, True)
            else:
                tail.verify(frame, rows, ids[1:])
            t4 = time.perf_counter()
            for key, span in zip(("head_call_per_row_ms", "head_ms", "encode_ms", "cloud_ms"), (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                times[key].append(span * 1e3)
        rows_out.append({"rows": rows, **{k: statistics.median(v) for k, v in times.items()}})
    print(f"SmolLM2 default plan (split {plan.split_layer}), in process, 64-position prompt, median of {args.reps}; "
          f"rows alike (one call per step): {head.rows_alike}")
    print(f"{'rows':>5}{'head call':>11}{'call per row':>14}{'encode':>9}{'cloud verify':>14}{'total':>9}")
    for r in rows_out:
        total = r["head_ms"] + r["encode_ms"] + r["cloud_ms"]
        print(f"{r['rows']:>5}{r['head_ms']:>9.2f}ms{r['head_call_per_row_ms']:>12.2f}ms{r['encode_ms']:>7.2f}ms"
              f"{r['cloud_ms']:>12.2f}ms{total:>7.1f}ms")
    first, last = rows_out[0], rows_out[-1]
    if last["rows"] > first["rows"]:
        n = last["rows"] - first["rows"]
        print(f"per extra row ({first['rows']} to {last['rows']} rows): head {(last['head_ms'] - first['head_ms']) / n:.2f} ms, "
              f"encode {(last['encode_ms'] - first['encode_ms']) / n:.2f} ms, cloud {(last['cloud_ms'] - first['cloud_ms']) / n:.2f} ms")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"plan_split": plan.split_layer, "rows_alike": head.rows_alike, "rows": rows_out}, indent=2))


if __name__ == "__main__":
    main()
