"""Model load times: first load (GGUF -> cache conversion) and later loads (cache -> torch module).

    .venv/bin/python bench/load.py [--model smollm2-135m] [--repeats 3] [--json bench/results/load.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from splitlm.model.load import build_stage
from splitlm.model.registry import resolve_model


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default="bench/results/load.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as root:
        root = Path(root)
        ckpt, first = timed(lambda: resolve_model(args.model, root=root, progress=False))
        _, first_build = timed(lambda: build_stage(ckpt))
        later = []
        for _ in range(args.repeats):
            _, t = timed(lambda: build_stage(resolve_model(args.model, root=root, progress=False)))
            later.append(t)
    rows = [("first load: convert into cache", first), ("first load: build module", first_build),
            (f"later load (median of {args.repeats}): verify cache + build module", statistics.median(later))]
    print(f"{'model ' + args.model:<60}{'seconds':>10}")
    for name, t in rows:
        print(f"{name:<60}{t:>10.2f}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"model": args.model, "convert_s": first, "first_build_s": first_build,
                                           "later_load_s": later, "later_load_median_s": statistics.median(later)}, indent=2))


if __name__ == "__main__":
    main()
