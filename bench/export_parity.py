"""Export parity on a real model: ONNX head vs torch head for ℓ ∈ {1, L/2, L} × {fp32, int8, int4}.

    .venv/bin/python bench/export_parity.py [--model smollm2-135m] [--json bench/results/export_parity.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from splitlm.export import check_parity, export_artifacts
from splitlm.model.registry import resolve_model
from splitlm.partition.plan import Plan
from splitlm.quantize.config import CodecConfig, WeightQuant

PRECISIONS = {"fp32": WeightQuant(16), "int8": WeightQuant(8, 32), "int4": WeightQuant(4, 32)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--accuracy-level", type=int, default=0, help="MatMulNBits accuracy_level of the exports (0 = exact)")
    ap.add_argument("--json", default="bench/results/export_parity.json")
    args = ap.parse_args()
    ckpt = resolve_model(args.model)
    L = ckpt.spec.num_layers
    rows = []
    print(f"{'split':>6}{'device':>8}{'export s':>10}{'head MiB':>10}{'worst rel. error':>18}  tensor")
    for split in (1, L // 2, L):
        for name, wq in PRECISIONS.items():
            plan = Plan(ckpt.model_id, ckpt.weights_hash, split, device_weights=wq, cloud_weights=WeightQuant(8, 32),
                        codec=CodecConfig("fp16"))
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                result = export_artifacts(ckpt, plan, Path(tmp), progress=False, accuracy_level=args.accuracy_level)
                seconds = time.perf_counter() - t0
                worst = check_parity(ckpt, plan, result.device_dir, prompts=args.prompts)
            tensor, err = max(worst.items(), key=lambda kv: kv[1])
            rows.append({"split": split, "device": name, "export_s": seconds, "head_bytes": result.head_bytes,
                         "worst_rel_error": err, "worst_tensor": tensor})
            print(f"{split:>6}{name:>8}{seconds:>10.1f}{result.head_bytes / 2**20:>10.1f}{err:>18.2e}  {tensor}", flush=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"model": ckpt.model_id, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
