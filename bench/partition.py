"""Predicted against measured, for plans the partitioner chooses under three budgets.

    .venv/bin/splitlm profile --out profile.json
    sudo .venv/bin/python bench/partition.py --profile profile.json [--json bench/results/partition.json]

For each budget: partition -> export -> (1) a fresh device process runs the head to the plan's
max_seq_len on real text: its peak RSS against the predicted device memory; (2) `splitlm generate`
in one network namespace against `splitlm serve` in another, over the emulated links of
bench/e2e.py: median per-token latency and TTFT against the prediction for that link, that
prompt length and that context. The link is measured the way a user would measure theirs:
`splitlm profile --link-only PROFILE --server ADDR --bandwidth MBIT` from the device's namespace
against the running server probes the RTT through the emulated link (its nominal RTT is printed
beside it). Without root it says so and skips (2). (3) Memory of prompt-heavy and decode-heavy runs at
1,024 and 2,048 positions, for heads at four splits and device-only (bench/memory.py's sweep; --no-sweep
skips it). Target: memory within 15 %.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import e2e  # noqa: E402  (the namespace/link harness)

from splitlm import evaluate  # noqa: E402
from splitlm.model.registry import resolve_model  # noqa: E402
from splitlm.partition.profile import LinkProfile, Profile  # noqa: E402
from splitlm.partition.search import Budgets, describe, price, search, to_plan  # noqa: E402
from splitlm.profiler import measure_peak_rss  # noqa: E402

MiB = 2**20
# (device memory, token latency, max_seq_len): four devices whose memory puts the split at
# different depths, and a roomy one where device-only wins
BUDGETS = [(140 * MiB, 150.0, 512), (180 * MiB, 150.0, 512), (250 * MiB, 150.0, 1024), (340 * MiB, 150.0, 1024),
           (430 * MiB, 150.0, 1024)]


def predicted_for_run(profile: Profile, cand, link: LinkProfile, prompt_tokens: int, context: float, chunk: int):
    """Re-price a chosen configuration for what the run did: its link, its prompt, its mean context."""
    p = dataclasses.replace(profile, link=link)
    b = Budgets(1e18, 1e9, prompt_tokens=prompt_tokens, prefill_chunk=chunk)
    return price(p, cand.split, cand.device_bits, cand.cloud_bits, cand.kv_bits, cand.codec, int(context), b)


def probe_link(profile_path: str, address: str, mbit: float) -> LinkProfile:
    """`splitlm profile --link-only` in the device's namespace, against the server at `address`."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [e2e.SPLITLM, "profile", "--link-only", profile_path, "--server", address, "--bandwidth", str(mbit),
               "--out", out.name]
        proc = subprocess.run(e2e.in_ns(e2e.DEV_NS, *cmd), capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"link probe failed: {proc.stderr.strip()[-500:]}")
        return Profile.load(out.name).link


def main() -> None:
    from splitlm.demo import cached_export

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", required=True)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", default="bench/results/partition.json")
    ap.add_argument("--no-sweep", action="store_true", help="skip the prompt-/decode-heavy memory runs at 1k and 2k positions")
    args = ap.parse_args()
    profile = Profile.load(args.profile)
    ckpt = resolve_model(profile.model_id)
    L = profile.num_layers
    text = [t for w in evaluate.calibration_windows(ckpt.tokenizer(), 4) for t in w]
    chosen = []
    for memory, latency, seq in BUDGETS:
        budgets = Budgets(memory, latency, max_seq_len=seq)
        t0 = time.perf_counter()
        result = search(profile, budgets)
        seconds = time.perf_counter() - t0
        label = f"{memory / MiB:.0f} MiB / {latency:.0f} ms / {seq}"
        if result.chosen is None:
            print(f"{label}: {result.message}")
            continue
        print(f"{label}: {result.message} [search {seconds:.2f} s]", file=sys.stderr)
        chosen.append((label, budgets, result.chosen, to_plan(result.chosen, profile, budgets), seconds))
    rows = []
    print("\nmemory: peak RSS of a device process run to max_seq_len on real text")
    print(f"{'budget':<24}{'plan':<62}{'predicted MiB':>14}{'measured MiB':>14}{'error':>8}")
    exports = {}
    for label, budgets, cand, plan, seconds in chosen:
        exports[label] = root = cached_export(ckpt, plan)
        measured = measure_peak_rss(root / "device", plan.max_seq_len, text=text)
        predicted = plan.predictions.device_memory_bytes
        err = measured / predicted - 1
        print(f"{label:<24}{describe(cand, L):<62}{predicted / MiB:>14.1f}{measured / MiB:>14.1f}{err:>+8.1%}")
        rows.append({"budget": label, "plan": plan.to_dict(), "search_s": seconds, "predicted_bytes": predicted,
                     "measured_peak_bytes": measured, "memory_error": err, "latency": []})
    sweep = []
    if not args.no_sweep:  # prompt-heavy and decode-heavy runs at 1k and 2k positions: bench/memory.py's heads
        import memory

        print("\nmemory at 1,024 and 2,048 positions, prompt-heavy (a prompt of N - 32, then decode) and decode-heavy "
              "(one chunk, then decode to N): peak RSS of a fresh device process against the prediction")
        sweep = memory.sweep(profile)
        print(f"worst |measured / predicted - 1|: {max(abs(r['error']) for r in sweep):.1%} (target 15 %)")
    netns = e2e.make_namespaces()
    if not netns:
        print("\nlatency: needs root for network namespaces (ip netns, tc): skipped")
    else:
        relay = None
        try:
            for link_name, one_way, mbit in e2e.LINKS:
                if relay:
                    relay.terminate()
                    relay = None
                how = e2e.shape(one_way, mbit)
                if how == "tbf+relay":
                    relay = e2e.start_relay(one_way)
                for (label, budgets, cand, plan, _), row in zip(chosen, rows):
                    root = exports[label]
                    server = None
                    if plan.split_layer < L:
                        server = e2e.serve(root, e2e.CLOUD_NS, e2e.CLOUD_IP)
                    try:
                        address = ("127.0.0.1:50552" if relay else f"{e2e.CLOUD_IP}:50551") if server else None
                        link = probe_link(args.profile, address, mbit) if server else LinkProfile(float(mbit), 2 * one_way)
                        runs = [e2e.run_generate(root, args.tokens, address, e2e.DEV_NS) for _ in range(args.reps)]
                    finally:
                        if server:
                            server.terminate()
                            server.wait(10)
                    prompt = runs[0]["prompt_tokens"]
                    n = statistics.median(len(r["tokens"]) for r in runs)
                    pred = predicted_for_run(profile, cand, link, prompt, prompt + n / 2, plan.prefill_chunk)
                    token_ms = statistics.median(1e3 / r["tokens_per_s"] for r in runs)
                    ttft_ms = statistics.median(r["ttft_s"] * 1e3 for r in runs)
                    row["latency"].append({"link": link_name, "shaping": how, "prompt_tokens": prompt,
                                           "nominal_rtt_ms": 2 * one_way, "probed_rtt_ms": link.rtt_ms,
                                           "predicted_token_ms": pred.token_latency_ms, "measured_token_ms": token_ms,
                                           "predicted_ttft_ms": pred.ttft_ms, "measured_ttft_ms": ttft_ms,
                                           "runs_token_ms": [1e3 / r["tokens_per_s"] for r in runs],
                                           "runs_ttft_ms": [r["ttft_s"] * 1e3 for r in runs]})
                    print(f"  {link_name:<22}{label:<24}RTT {link.rtt_ms:5.1f} ms, token {pred.token_latency_ms:6.1f} / {token_ms:6.1f} ms, "
                          f"TTFT {pred.ttft_ms:6.0f} / {ttft_ms:6.0f} ms", file=sys.stderr, flush=True)
        finally:
            if relay:
                relay.terminate()
            e2e.teardown()
        print(f"\nlatency on emulated links (shaping: {how}); predicted for each run's link, prompt and context; "
              f"median of {args.reps} runs of {args.tokens} tokens")
        print(f"{'link':<24}{'budget':<24}{'split':>6}{'RTT ms':>8}{'pred ms/tok':>12}{'meas ms/tok':>12}{'error':>8}"
              f"{'pred TTFT':>10}{'meas TTFT':>10}{'error':>8}")
        for row in rows:
            for r in row["latency"]:
                print(f"{r['link']:<24}{row['budget']:<24}{row['plan']['split_layer']:>6}{r['probed_rtt_ms']:>8.1f}"
                      f"{r['predicted_token_ms']:>12.1f}"
                      f"{r['measured_token_ms']:>12.1f}{r['measured_token_ms'] / r['predicted_token_ms'] - 1:>+8.1%}"
                      f"{r['predicted_ttft_ms']:>10.0f}{r['measured_ttft_ms']:>10.0f}"
                      f"{r['measured_ttft_ms'] / r['predicted_ttft_ms'] - 1:>+8.1%}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"profile": args.profile, "rows": rows, "memory_sweep": sweep}, indent=2))


if __name__ == "__main__":
    main()
