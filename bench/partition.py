"""Predicted vs measured device memory for plans the partitioner chooses (latency and TTFT on
emulated links are still to come: see bench/e2e.py for the link harness).

    .venv/bin/python bench/partition.py --profile profile.json [--json bench/results/partition.json]

For each budget: partition -> export -> a fresh device process runs the head to the plan's
max_seq_len (prefill chunk, then decode) -> its peak RSS against the predicted device memory.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from splitlm.model.registry import resolve_model
from splitlm.partition.profile import Profile
from splitlm.partition.profiler import measure_peak_rss
from splitlm.partition.search import Budgets, describe, search, to_plan

MiB = 2**20
BUDGETS = [(260 * MiB, 200.0, 512), (320 * MiB, 200.0, 1024), (600 * MiB, 100.0, 1024)]


def main() -> None:
    from splitlm.device.export import export_artifacts

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", required=True)
    ap.add_argument("--json", default="bench/results/partition.json")
    args = ap.parse_args()
    profile = Profile.load(args.profile)
    ckpt = resolve_model(profile.model_id)
    rows = []
    print(f"{'budget':<22}{'plan':<58}{'predicted MiB':>14}{'measured MiB':>14}{'error':>8}")
    for memory, latency, seq in BUDGETS:
        budgets = Budgets(memory, latency, max_seq_len=seq)
        result = search(profile, budgets)
        if result.chosen is None:
            print(f"{memory / MiB:.0f} MiB / {latency:.0f} ms: {result.message}")
            continue
        plan = to_plan(result.chosen, profile, budgets)
        with tempfile.TemporaryDirectory() as tmp:
            exported = export_artifacts(ckpt, plan, Path(tmp), progress=False)
            measured = measure_peak_rss(exported.device_dir, plan.max_seq_len)
        predicted = plan.predictions.device_memory_bytes
        err = measured / predicted - 1
        label = f"{memory / MiB:.0f} MiB / {latency:.0f} ms"
        print(f"{label:<22}{describe(result.chosen, profile.num_layers):<58}{predicted / MiB:>14.1f}{measured / MiB:>14.1f}{err:>+7.1%}")
        rows.append({"budget_bytes": memory, "token_latency_ms": latency, "plan": plan.to_dict(),
                     "predicted_bytes": predicted, "measured_peak_bytes": measured, "relative_error": err})
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"rows": rows}, indent=2))


if __name__ == "__main__":
    main()
