"""Rate adaptation of prompt frames (device/uplink.py) on a slow emulated uplink, against a fixed codec error.

    sudo .venv/bin/python bench/uplink.py [--mbit 0.25] [--reps 3] [--json bench/results/uplink.json]

SmolLM2 split 10 (W8 head and tail, the default codec: ans at ε 0.03), a 1,024-token prompt, on a link of
--mbit Mbit/s with 50 ms RTT (network namespaces, tbf and the delay relay of bench/e2e.py). One device client
(`splitlm.api.Device`, whose uplink meter outlives its sessions) sends the prompt twice, in two sessions: the first
measures the link, the second starts from that measure. Rows: the plan with its ε fixed (prefill_max_error 0.03);
the ceiling at the default 0.05; the same with the link's bandwidth in the plan (`Predictions.link_mbps`, as the
partitioner writes it from its link profile), which the first prompt starts from; and the ceiling at 0.1 with it.
Reports TTFT, bytes up, the ε of the prompt's frames and the rate the meter measured, medians of --reps clients
per row, the rows alternating (each first in turn). On this machine the cloud's prefill of the prompt shares two
cores with the device's and takes about 3 s, so the link is the slower side below about 0.5 Mbit/s; the default
is 0.25. The quality each ε costs is bench/wire.py's table (ε 0.05 on every frame: +1.5 % perplexity on the protocol text). Needs root.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import e2e  # noqa: E402  (the namespace/link harness)

ROWS = {"fixed ε 0.03": (0.03, False), "adaptive, ceiling 0.05 (default)": (0.05, False),
        "same, plan knows the link": (0.05, True), "ceiling 0.1, plan knows the link": (0.1, True)}
"""plan: (prefill_max_error, whether the plan carries the link's bandwidth as the partitioner's profile gives it)."""
ONE_WAY_MS = 25.0


def device(root: str, server: str, prompt_file: str, out: str) -> None:
    """Inside the device namespace: one client, the prompt twice."""
    from splitlm.api import Device

    prompt = Path(prompt_file).read_text()
    dev = Device(root, server)
    turns = []
    for _ in range(2):
        r = dev.generate(prompt, 4)
        up = r.extra.get("uplink") or {}
        turns.append({"ttft_s": r.ttft_s, "bytes_up": r.extra["bytes_up"], "prefill_errors": up.get("prefill_errors", []),
                      "bytes_per_s": up.get("bytes_per_s"), "link_bound_samples": up.get("link_bound_samples", 0)})
    Path(out).write_text(json.dumps(turns))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mbit", type=float, default=0.25)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", default="bench/results/uplink.json")
    ap.add_argument("--device", nargs=4, metavar=("ROOT", "SERVER", "PROMPT_FILE", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.device:
        return device(*args.device)

    from splitlm import corpus
    from splitlm.artifacts import check_manifest
    from splitlm.demo import cached_export
    from splitlm.errors import ModelLoadError
    from splitlm.export import export_artifacts
    from splitlm.model.checkpoint import cache_root
    from splitlm.model.registry import resolve_model
    from splitlm.partition.plan import Plan, Predictions
    from splitlm.quantize.config import CodecConfig, WeightQuant

    ckpt = resolve_model("smollm2-135m")
    tok = ckpt.tokenizer()
    prompt = tok.decode(corpus.windows(tok, corpus.protocol_text(), 3)[2] * 2)  # 1,024 tokens of protocol text
    base = Plan(ckpt.model_id, ckpt.weights_hash, 10, device_weights=WeightQuant(8, 32), cloud_weights=WeightQuant(8, 32),
                max_seq_len=2048, prefill_chunk=128, codec=CodecConfig("tabq"))
    exports = {}
    for name, (ceiling, knows) in ROWS.items():
        plan = base.replace(prefill_max_error=ceiling)
        if not knows:
            exports[name] = cached_export(ckpt, plan)
            continue
        # predictions are not hashed: a plan that knows the link gets its own folder
        plan = plan.replace(predictions=Predictions(link_mbps=args.mbit))
        root = cache_root() / "exports" / f"uplink-{plan.hash}-{args.mbit:g}mbit"
        try:
            check_manifest(root / "device")
            check_manifest(root / "cloud")
        except ModelLoadError:
            export_artifacts(ckpt, plan, root)
        exports[name] = root
    if not e2e.make_namespaces():
        print("skipped: no network namespaces (needs root, ip and tc)")
        return
    runs: dict[str, list[list[dict]]] = {name: [] for name in ROWS}
    with e2e.emulated_link(ONE_WAY_MS, args.mbit) as (how, target), tempfile.TemporaryDirectory() as tmp:
        prompt_file = Path(tmp, "prompt.txt")
        prompt_file.write_text(prompt)
        names = list(exports)
        for rep in range(args.reps):
            for name in names[rep % len(names):] + names[:rep % len(names)]:  # each row first in turn
                root = exports[name]
                server = e2e.serve(root, e2e.CLOUD_NS, e2e.CLOUD_IP)
                try:
                    out = Path(tmp, "out.json")
                    proc = subprocess.run(e2e.in_ns(e2e.DEV_NS, sys.executable, __file__, "--device", str(root), target,
                                                    str(prompt_file), str(out)), capture_output=True, text=True, timeout=600)
                    if proc.returncode != 0:
                        raise RuntimeError(f"the device failed: {proc.stderr.strip()[-800:]}")
                    runs[name].append(json.loads(out.read_text()))
                finally:
                    server.terminate()
                    server.wait(10)
                t = runs[name][-1]
                print(f"  rep {rep} {name:<34} TTFT {t[0]['ttft_s'] * 1e3:6.0f} / {t[1]['ttft_s'] * 1e3:6.0f} ms, "
                      f"{t[0]['bytes_up']} / {t[1]['bytes_up']} B up", file=sys.stderr, flush=True)
    rows = []
    for name, reps in runs.items():
        for turn in (0, 1):
            ts = [r[turn] for r in reps]
            errs = [e for t in ts for e in t["prefill_errors"]]
            rates = [t["bytes_per_s"] for t in ts if t["bytes_per_s"]]
            rows.append({"plan": name, "turn": turn + 1, "ttft_ms": statistics.median(t["ttft_s"] for t in ts) * 1e3,
                         "bytes_up": statistics.median(t["bytes_up"] for t in ts),
                         "error_min": min(errs) if errs else None, "error_max": max(errs) if errs else None,
                         "measured_mbit": statistics.median(rates) * 8e-6 if rates else None})
    fixed = {r["turn"]: r["ttft_ms"] for r in rows if r["plan"] == "fixed ε 0.03"}
    for r in rows:
        r["ttft_vs_fixed"] = r["ttft_ms"] / fixed[r["turn"]]
    print(f"SmolLM2 split 10, 1,024-token prompt, {args.mbit:g} Mbit/s, {2 * ONE_WAY_MS:.0f} ms RTT (shaping: {how}); "
          f"one client, two sessions; median of {args.reps}")
    print(f"{'plan':<34}{'turn':>5}{'TTFT ms':>9}{'vs fixed':>9}{'bytes up':>10}{'prompt ε':>14}{'measured':>10}")
    for r in rows:
        eps = f"{r['error_min']:.3g}-{r['error_max']:.3g}" if r["error_min"] is not None else "-"
        rate = f"{r['measured_mbit']:.2f}" if r["measured_mbit"] else "-"
        print(f"{r['plan']:<34}{r['turn']:>5}{r['ttft_ms']:>9.0f}{r['ttft_vs_fixed']:>8.2f}x{r['bytes_up']:>10.0f}{eps:>14}{rate:>10}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"link": f"{args.mbit:g} Mbit/s, {2 * ONE_WAY_MS:.0f} ms RTT", "shaping": how,
                                           "prompt_tokens": 1024, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
