"""Moving the split during a session (DESIGN.md §6) on SmolLM2, under a device memory budget.

The device process runs a head of `--split` layers with a float32 KV cache (kv_bits 16) to 2,048
positions. The budget holds the head's resident memory (measured: a short run's peak RSS) plus
the K/V of its layers for `--fits` positions only, so the unmoved session cannot reach 2,048 within
it. The partitioner's memory model (`partition.search.plan_move`) plans one shallower move; the
session generates to 2,048 by moving, and its measured peak RSS (VmHWM of the device process) is
checked against the budget. The table gives each run's peak, the move's bytes and time (and per
layer per 1k positions), tokens/s before and after the move against the unmoved run over the
same positions, and a failover after the move: the serving replica SIGKILLed, recovery time
(kill -> next token) and the bytes replayed (frames and the spilled move's KV).

    .venv/bin/python bench/mobility.py [--split 24] [--fits 1280] [--positions 2048] [--json bench/results/mobility.json]

Each run is a device process of its own (its RSS is its own); the replicas are `splitlm serve`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from splitlm.demo import cached_export
from splitlm.model.registry import resolve_model
from splitlm.partition.plan import Plan
from splitlm.quantize.config import CodecConfig, WeightQuant

PROMPT = "Moving the split point of a model during a session frees the device's memory as the context grows. "


def device_worker(args) -> None:
    """One device session to args.positions positions, EOS ignored; prints a JSON line."""
    from splitlm.device.client import ReplayingSession, connect
    from splitlm.device.runtime import DeviceHead, HeadSession, move_split
    from splitlm.sampling import SamplingParams

    session = HeadSession(Path(args.root) / "device", threads=1)
    plan = session.plan
    head = DeviceHead(session)
    prompt = [int(t) for t in args.prompt.split(",")]
    moves = list(plan.split_moves)
    if args.no_moves:
        moves = []
    times, move_rows, marks, trace = [], [], {}, []
    logs = args.logs.split(",") if args.logs else []
    pids = [int(p) for p in args.pids.split(",")] if args.pids else []
    with connect(args.address) as channel, ReplayingSession(channel, plan.hash, plan.model_id, SamplingParams(),
                                                            args.positions) as remote:
        def step(ids):
            token = None
            for hidden, last in head.chunks(ids):
                token = remote.send(head.encode(hidden), hidden.shape[0], last)
                while moves and head.length >= moves[0][0]:
                    move = move_split(head, remote, moves.pop(0)[1])
                    move_rows.append({"position": move.position, "old": move.old, "new": move.new, "bytes": move.bytes,
                                      "seconds": move.seconds})
            return token

        t0 = time.perf_counter()
        token = step(prompt)
        ttft = time.perf_counter() - t0
        tokens = [token]
        while head.length < args.positions - 1:
            if args.kill_at and head.length == args.kill_at:
                serving = [pid for pid, log in zip(pids, logs) if f"session={remote.remote.info.session_id}" in Path(log).read_text()]
                os.kill(serving[0], signal.SIGKILL)
                marks["killed"] = time.perf_counter()
            t = time.perf_counter()
            token = step([token])
            times.append((head.length, time.perf_counter() - t))
            if "killed" in marks and "next" not in marks:
                marks["next"] = time.perf_counter()
            tokens.append(token)
            if head.length % 64 == 0:
                trace.append((head.length, _rss()))
    hwm = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM"))
    at = np.array([p for p, _ in times])
    dt = np.array([s for _, s in times])
    split_at = move_rows[0]["position"] if move_rows else args.split_at

    def rate(mask):
        return float(mask.sum() / dt[mask].sum()) if mask.any() else None

    replay = remote.replays[0] if remote.replays else None
    print(json.dumps({"peak_rss_bytes": hwm * 1024, "positions": head.length, "tokens": tokens, "ttft_s": ttft,
                      "moves": move_rows, "tok_s_before": rate(at <= split_at), "tok_s_after": rate(at > split_at),
                      "recovery_ms": (marks["next"] - marks["killed"]) * 1e3 if "next" in marks else None,
                      "replay_bytes": replay.bytes if replay else 0, "replay_frames": replay.frames if replay else 0,
                      "rss_trace": trace}))


def _rss() -> int:
    return next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmRSS")) * 1024


class Replica:
    def __init__(self, root: Path, log: Path) -> None:
        port_file = Path(tempfile.mkdtemp()) / "port"
        self.log = log
        self.proc = subprocess.Popen([sys.executable, "-m", "splitlm.cli", "-v", "serve", "--artifacts", str(root), "--port", "0",
                                      "--port-file", str(port_file)], stdout=subprocess.DEVNULL, stderr=log.open("a"),
                                     env=dict(os.environ, OMP_NUM_THREADS="1"))
        deadline = time.monotonic() + 180
        while not port_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"serve did not start: {log.read_text()[-2000:]}")
            time.sleep(0.1)
        self.address = f"127.0.0.1:{int(port_file.read_text())}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


def run_device(root: Path, replicas: list[Replica], prompt: list[int], positions: int, kill_at: int = 0, split_at: int = 0,
               moves: bool = True) -> dict:
    cmd = [sys.executable, __file__, "--device-worker", "--root", str(root), "--address", ",".join(r.address for r in replicas),
           "--prompt", ",".join(map(str, prompt)), "--positions", str(positions), "--kill-at", str(kill_at),
           "--split-at", str(split_at), "--pids", ",".join(str(r.proc.pid) for r in replicas),
           "--logs", ",".join(str(r.log) for r in replicas)] + ([] if moves else ["--no-moves"])
    out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=1800)
    if out.returncode != 0:
        raise SystemExit(f"device run failed: {out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", type=int, default=24, help="the device's layers at the start (default 24 of 30)")
    ap.add_argument("--fits", type=int, default=1280, help="positions of K/V at --split that the budget holds (default 1280)")
    ap.add_argument("--positions", type=int, default=2048)
    ap.add_argument("--kill-at", type=int, default=1536, help="in the failover run, kill the serving replica at this position")
    ap.add_argument("--json", default="bench/results/mobility.json")
    for name in ("--root", "--address", "--prompt", "--pids", "--logs"):
        ap.add_argument(name, help=argparse.SUPPRESS)
    ap.add_argument("--split-at", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--device-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--no-moves", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.device_worker:
        return device_worker(args)

    from splitlm.partition.profile import MemoryProfile
    from splitlm.partition.search import move_peak, plan_move

    ckpt = resolve_model("smollm2-135m")
    spec = ckpt.spec
    still = Plan(ckpt.model_id, ckpt.weights_hash, args.split, device_weights=WeightQuant(8, 32), cloud_weights=WeightQuant(8, 32),
                 codec=CodecConfig("tabq", entropy="none", error_budget=0.02), max_seq_len=args.positions, prefill_chunk=128)
    prompt = ckpt.tokenizer().encode(PROMPT * 3).ids
    work = Path(tempfile.mkdtemp())
    kv = 2 * spec.num_kv_heads * spec.head_dim * 4  # float32 K and V per position per layer
    # the memory model, as the profiler fits it: resident bytes grow by the K/V of each layer held per
    # position, plus what else grows per position (measured: a calibration run's RSS against its length)
    root_still = cached_export(ckpt, still)
    replicas = [Replica(root_still, work / "still.log")]
    try:
        calibration = run_device(root_still, replicas, prompt, 768, moves=False)
    finally:
        for r in replicas:
            r.stop()
    trace = np.array(calibration["rss_trace"], float)
    slope = float(np.polyfit(trace[:, 0], trace[:, 1], 1)[0])
    other = max(0.0, slope - args.split * kv)
    mem = MemoryProfile(layer_bytes={8: 0.0}, embed_bytes=0.0, embed_bytes_per_token=other, lm_head_bytes={},
                        kv_bytes_per_token_layer={16: kv})
    growth = mem.device_bytes(args.split, 8, 16, args.fits)  # what the budget holds beyond the head's fixed bytes
    move = plan_move(mem, args.split, 8, 16, args.positions, growth, still.prefill_chunk, len(prompt))
    if move is None:
        raise SystemExit(f"no move fits a budget of {growth / 2**20:.1f} MiB of growth")
    moving = still.replace(split_moves=(move,))
    root_moving = cached_export(ckpt, moving)
    replicas = [Replica(root_moving, work / f"moving{i}.log") for i in range(2)]
    try:  # the unmoved run: the same export (its head cut at the move's layer), its plan's move not made
        unmoved = run_device(root_moving, replicas[:1], prompt, args.positions, split_at=move[0], moves=False)
        moved = run_device(root_moving, replicas[:1], prompt, args.positions)
        failover = run_device(root_moving, replicas, prompt, args.positions, kill_at=args.kill_at)
    finally:
        for r in replicas:
            r.stop()
    # the head's fixed bytes on this export: the unmoved run's resident memory less the modelled growth
    base = float(np.median([rss - mem.device_bytes(args.split, 8, 16, p) for p, rss in unmoved["rss_trace"]]))
    budget = base + growth
    predicted = base + move_peak(mem, args.split, 8, 16, args.positions, move, still.prefill_chunk)

    mib = 2**20
    (m,) = moved["moves"]
    layers = m["old"] - m["new"]
    per_layer_1k = m["bytes"] / layers / (m["position"] / 1000)
    agree = next((i for i, (a, b) in enumerate(zip(unmoved["tokens"], moved["tokens"])) if a != b), len(moved["tokens"]))
    print(f"SmolLM2-135M, device W8 layers [0, {args.split}) with a float32 KV cache, cloud W8, tabq ε 0.02, 1 device "
          f"thread, loopback; {len(prompt)}-token prompt, generation to {args.positions} positions (EOS ignored)")
    print(f"budget {budget / mib:.1f} MiB = head fixed {base / mib:.1f} MiB + K/V of {args.split} layers for {args.fits} positions "
          f"(and {other / 1024:.2f} KiB/position of other growth); the plan moves {args.split} -> {move[1]} at {move[0]} "
          f"(predicted peak {predicted / mib:.1f} MiB)")
    print(f"{'run':<34}{'positions':>10}{'peak RSS MiB':>14}{'within budget':>15}{'tok/s before':>14}{'tok/s after':>13}")
    for name, r in (("unmoved", unmoved), ("moving", moved), ("moving, replica killed", failover)):
        print(f"{name:<34}{r['positions']:>10}{r['peak_rss_bytes'] / mib:>14.1f}{str(r['peak_rss_bytes'] <= budget):>15}"
              f"{r['tok_s_before'] or 0:>14.1f}{r['tok_s_after'] or 0:>13.1f}")
    print(f"move {m['old']} -> {m['new']} at {m['position']}: {m['bytes'] / mib:.2f} MiB in {m['seconds'] * 1e3:.0f} ms "
          f"({per_layer_1k / 1024:.0f} KiB per layer per 1k positions, float32)")
    print(f"failover at {args.kill_at}: recovery {failover['recovery_ms']:.0f} ms (kill -> next token), replayed "
          f"{failover['replay_bytes'] / mib:.2f} MiB ({failover['replay_frames']} frames and moves)")
    print(f"greedy tokens equal to the unmoved run's: the first {agree} of {len(moved['tokens'])} (after the move the cloud "
          f"runs layers [{move[1]}, {args.split}) at its own weights); failover output equal to the moving run's: "
          f"{failover['tokens'] == moved['tokens']}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({
        "split": args.split, "positions": args.positions, "prompt_tokens": len(prompt), "budget_bytes": budget, "base_bytes": base,
        "other_growth_bytes_per_position": other, "fits": args.fits,
        "move": list(move), "predicted_peak_bytes": predicted, "per_layer_per_1k_bytes": per_layer_1k,
        "tokens_equal_to_unmoved": agree, "failover_identical": failover["tokens"] == moved["tokens"],
        "runs": {k: {x: y for x, y in v.items() if x not in ("tokens", "rss_trace")} | {"rss_trace_mib": [
            [p, round(r / mib, 1)] for p, r in v["rss_trace"][::4]]} for k, v in
                 (("unmoved", unmoved), ("moving", moved), ("failover", failover))}}, indent=2))
    if moved["peak_rss_bytes"] > budget or moved["positions"] < args.positions - 1:
        raise SystemExit("the moving session did not stay within the budget to the end")
    if failover["tokens"] != moved["tokens"]:
        raise SystemExit("output after a failover differs from the unbroken moving run")


if __name__ == "__main__":
    main()
