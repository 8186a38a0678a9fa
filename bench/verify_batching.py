"""The cloud's speculative steps batched or not, on loopback (issue: speculation across the split).

The default SmolLM2 plan's tail is served in this process; each session streams pre-encoded frames of real
hidden states: a 64-position prompt, then verified steps of k + 1 rows (the last token's and k drafts', drafts the
model does not choose, so each step keeps none and gives one token), all sessions at once. Each session count runs
with the batcher putting the sessions' verified steps into one padded forward per turn (as it serves) and with one
forward per verified step (as it did before), alternating, in the same run; then one-row decode steps for scale.

    .venv/bin/python bench/verify_batching.py [--sessions 1 4 8] [--steps 24] [--drafts 3] [--reps 3]
                                              [--json bench/results/verify_batching.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path

from cloud import frames_for

from splitlm.demo import cached_export, default_plan
from splitlm.model.registry import resolve_model


def run(address: str, plan, frames, prompt_len: int, drafts: list[int]) -> float:
    """Every session at once: the prefill, then its steps (verified with `drafts`, or decode steps when none).
    Tokens per second over all sessions."""
    from splitlm.device.client import RemoteSession, connect
    from splitlm.sampling import SamplingParams

    channel = connect(address)
    barrier = threading.Barrier(len(frames))
    spans, made, errors = [], [], []

    def one(prefill, steps):
        try:
            with RemoteSession(channel, plan.hash, plan.model_id, SamplingParams(), len(steps) + 1 + len(drafts)) as remote:
                remote.next_token(prefill, prompt_len)
                barrier.wait()
                t0 = time.perf_counter()
                for f in steps:
                    if drafts:
                        accepted, _ = remote.verify(f, len(drafts) + 1, drafts)
                        if accepted:
                            raise RuntimeError(f"the model chose a draft token ({drafts[0]}): the frames no longer match")
                    else:
                        remote.next_token(f, 1)
                spans.append((t0, time.perf_counter()))
                made.append(len(steps))
        except Exception as exc:  # noqa: BLE001 - reported after the threads end
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=one, args=fr) for fr in frames]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    channel.close()
    if errors:
        raise errors[0]
    return sum(made) / (max(b for _, b in spans) - min(a for a, _ in spans))


def main() -> None:
    from splitlm.cloud import batcher as batcher_module
    from splitlm.cloud.service import ServerConfig, start_server
    from splitlm.cloud.tail import TailRunner

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--drafts", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", default="bench/results/verify_batching.json")
    args = ap.parse_args()
    ckpt = resolve_model("smollm2-135m")
    plan = default_plan(ckpt)
    root = cached_export(ckpt, plan)
    k = args.drafts
    verify_frames = frames_for(ckpt, plan, args.prompt, args.steps, max(args.sessions), rows=k + 1)
    decode_frames = frames_for(ckpt, plan, args.prompt, args.steps, max(args.sessions))
    drafts = [ckpt.spec.vocab_size - 1] * k
    server, port, service = start_server(TailRunner(root / "cloud"), "127.0.0.1:0", ServerConfig(max_sessions=max(args.sessions)))
    address = f"127.0.0.1:{port}"
    batched_rows = batcher_module.VERIFY_ROWS
    rows = []
    try:
        run(address, plan, verify_frames[:1], args.prompt, drafts)  # warm up
        for n in args.sessions:
            got = {"batched": [], "one forward each": []}
            for _ in range(args.reps):
                for mode in got:
                    batcher_module.VERIFY_ROWS = batched_rows if mode == "batched" else 1  # 1: verified steps run alone
                    got[mode].append(run(address, plan, verify_frames[:n], args.prompt, drafts))
            batcher_module.VERIFY_ROWS = batched_rows
            decode = statistics.median(run(address, plan, decode_frames[:n], args.prompt, []) for _ in range(args.reps))
            row = {"sessions": n, "verified_tokens_per_s": statistics.median(got["batched"]),
                   "verified_unbatched_tokens_per_s": statistics.median(got["one forward each"]),
                   "ratio": statistics.median(a / b for a, b in zip(got["batched"], got["one forward each"])),
                   "decode_tokens_per_s": decode}
            rows.append(row)
            print(f"  {n} sessions: {row['verified_tokens_per_s']:.1f} vs {row['verified_unbatched_tokens_per_s']:.1f} tok/s",
                  flush=True)
    finally:
        batcher_module.VERIFY_ROWS = batched_rows
        server.stop(grace=None)
    print(f"\ncloud tail of plan {plan.hash} (SmolLM2 layers [{plan.split_layer}, {ckpt.spec.num_layers}), W{plan.cloud_weights.bits}), "
          f"loopback gRPC; {args.steps} verified steps of {k} drafts (none kept) per session after a {args.prompt}-position "
          f"prefill; median of {args.reps}, batched and unbatched alternating")
    print(f"{'sessions':>9}{'batched tok/s':>15}{'one fwd each':>14}{'ratio':>8}{'decode tok/s':>14}")
    for r in rows:
        print(f"{r['sessions']:>9}{r['verified_tokens_per_s']:>15.1f}{r['verified_unbatched_tokens_per_s']:>14.1f}"
              f"{r['ratio']:>7.2f}x{r['decode_tokens_per_s']:>14.1f}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"plan": plan.hash, "drafts": k, "steps": args.steps, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
