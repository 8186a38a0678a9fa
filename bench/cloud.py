"""Cloud throughput under concurrent sessions and per-step protocol overhead, on loopback.

The default SmolLM2 plan's tail is served by `splitlm serve`'s code in this process; each
session streams pre-encoded frames of real hidden states (a 64-position prompt, then one
position per step), so the figures are the cloud's alone — no device compute competes.

    .venv/bin/python bench/cloud.py [--sessions 1 4 16] [--steps 32] [--json bench/results/cloud.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path

import torch

from splitlm import evaluate
from splitlm.demo import cached_export, default_plan
from splitlm.model.registry import resolve_model
from splitlm.quantize import codec


def frames_for(ckpt, plan, prompt_len: int, steps: int, sessions: int, rows: int = 1) -> list[tuple[bytes, list[bytes]]]:
    """Per session: one prefill frame and `steps` frames of real activations at the split, of `rows` consecutive
    positions each (one: decode steps), step i starting at prompt_len + i; coded as the plan's codec codes them
    (an ans codec in the split layer's calibrated basis)."""
    from splitlm.local import LocalSplit

    split = LocalSplit(ckpt, plan=plan)
    basis = split.bases.get(plan.split_layer)
    wins = evaluate.windows(ckpt.tokenizer(), evaluate.protocol_text(), 1)[0]
    out = []
    with torch.inference_mode():
        for s in range(sessions):
            ids = wins[(s * 7) % 128:(s * 7) % 128 + prompt_len + steps + rows - 1]
            h = split.head(torch.tensor([ids]))[0].numpy()
            out.append((codec.encode(h[:prompt_len], plan.codec, "numpy", basis),
                        [codec.encode(h[i:i + rows], plan.codec, "numpy", basis) for i in range(prompt_len, prompt_len + steps)]))
    return out


def run_sessions(address: str, plan, frames, prompt_rows: int, token=None) -> tuple[float, list[float], list[float]]:
    """Run every session concurrently (prefill frames of `prompt_rows` positions, then one-position
    frames); aggregate decode tokens/s, per-step client times and server times."""
    from splitlm.device.client import RemoteSession, connect
    from splitlm.sampling import SamplingParams

    channel = connect(address)
    step_times: list[float] = []
    server_times: list[float] = []
    lock = threading.Lock()
    barrier = threading.Barrier(len(frames))
    spans = []

    def one(prefill, decodes):
        with RemoteSession(channel, plan.hash, plan.model_id, SamplingParams(), len(decodes) + 1, token) as remote:
            remote.next_token(prefill, prompt_rows)
            barrier.wait()
            t0 = time.perf_counter()
            mine, theirs = [], []
            for f in decodes:
                s = time.perf_counter()
                remote.next_token(f, 1)
                mine.append(time.perf_counter() - s)
                theirs.append(remote.last_compute_us / 1e6)
            t1 = time.perf_counter()
        with lock:
            step_times.extend(mine)
            server_times.extend(theirs)
            spans.append((t0, t1))

    threads = [threading.Thread(target=one, args=fr) for fr in frames]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = max(t1 for _, t1 in spans) - min(t0 for t0, _ in spans)
    return sum(len(d) for _, d in frames) / wall, step_times, server_times


def echo_step_times(frames: list[bytes], work=None) -> tuple[list[float], list[float]]:
    """Per-step round trips of a bare grpcio bidi echo (bytes in, the same bytes out, no protobuf), with
    the same client pattern as RemoteSession (a queue-fed request iterator, one response per step).
    `work`: run before each reply (the "busy echo"), timed on the server; returns (steps, work times)."""
    import queue
    from concurrent import futures

    import grpc

    worked: list[float] = []

    def echo(request_iterator, context):
        for item in request_iterator:
            if work is not None:
                t0 = time.perf_counter()
                work()
                worked.append(time.perf_counter() - t0)
            yield item

    handler = grpc.method_handlers_generic_handler("bench.Echo", {"Echo": grpc.stream_stream_rpc_method_handler(echo)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        call = grpc.insecure_channel(f"127.0.0.1:{port}").stream_stream("/bench.Echo/Echo")
        requests: queue.Queue = queue.Queue()
        responses = call(iter(requests.get, None))
        times = []
        for frame in frames:
            t0 = time.perf_counter()
            requests.put(frame)
            next(responses)
            times.append(time.perf_counter() - t0)
        requests.put(None)
        return times, worked
    finally:
        server.stop(grace=None)


def tail_step(stage, d: int, past: int = 64):
    """One decode step of the real tail on a cache of `past` positions, taken back after each call:
    the compute a busy echo does between receiving and replying."""
    from splitlm.model.llama import KVCache

    rng = torch.Generator().manual_seed(0)
    cache = KVCache()
    with torch.inference_mode():
        stage(torch.randn(1, past, d, generator=rng), cache=cache)
    x = torch.randn(1, 1, d, generator=rng)

    def step() -> None:
        with torch.inference_mode():
            stage(x, cache=cache, last_only=True)
        cache.crop(past)
    return step


class NoTail(torch.nn.Module):
    """Stands in for the tail stage: zero logits, the cache only counts positions. Serving with it
    leaves the protocol path alone: client, gRPC, service, frame checks and decode, the batcher hop."""

    def __init__(self, stage) -> None:
        super().__init__()
        self.vocab, self.spec, self.start, self.stop = stage.spec.vocab_size, stage.spec, stage.start, stage.stop

    def forward(self, x, positions=None, cache=None, mask=None, last_only=False, start=None):
        if cache is not None:
            cache.length += x.shape[1]
        return torch.zeros(x.shape[0], 1 if last_only else x.shape[1], self.vocab)


def main() -> None:
    from splitlm.cloud.service import ServerConfig, start_server
    from splitlm.cloud.tail import TailRunner

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--json", default="bench/results/cloud.json")
    args = ap.parse_args()
    ckpt = resolve_model("smollm2-135m")
    plan = default_plan(ckpt)
    root = cached_export(ckpt, plan)
    frames = frames_for(ckpt, plan, args.prompt, args.steps, max(args.sessions))
    server, port, service = start_server(TailRunner(root / "cloud"), "127.0.0.1:0", ServerConfig(max_sessions=max(args.sessions)))
    rows = []
    try:
        address = f"127.0.0.1:{port}"
        run_sessions(address, plan, frames[:1], args.prompt)  # warm up
        for n in args.sessions:
            before = (service.runner.batcher.batches, service.runner.batcher.batched_steps)
            tps, steps, server_t = run_sessions(address, plan, frames[:n], args.prompt)
            batches = service.runner.batcher.batches - before[0]
            batched = service.runner.batcher.batched_steps - before[1]
            overhead = [c - s for c, s in zip(steps, server_t)]
            rows.append({"sessions": n, "tokens_per_s": tps, "median_step_ms": 1e3 * statistics.median(steps),
                         "median_server_ms": 1e3 * statistics.median(server_t),
                         "median_overhead_ms": 1e3 * statistics.median(overhead),
                         "mean_batch": batched / batches if batches else 1.0})
        tail = service.runner.batcher.stage
        service.runner.batcher.stage = NoTail(tail)  # the batcher is idle between runs
        _, steps, server_t = run_sessions(address, plan, frames[:1], args.prompt)
        no_tail = {"median_step_ms": 1e3 * statistics.median(steps), "median_server_ms": 1e3 * statistics.median(server_t),
                   "median_overhead_ms": 1e3 * statistics.median([c - s for c, s in zip(steps, server_t)])}
    finally:
        server.stop(grace=None)
    decode_frames = [f for _, steps in frames[:1] for f in steps]
    echo_step_times(decode_frames)  # warm up
    echo, _ = echo_step_times(decode_frames * 4)
    echo_ms = 1e3 * statistics.median(echo)
    busy, worked = echo_step_times(decode_frames, tail_step(tail, ckpt.spec.hidden_size, args.prompt))
    busy_ms = 1e3 * statistics.median([b - w for b, w in zip(busy, worked)])
    base = rows[0]["tokens_per_s"]
    print(f"cloud tail of plan {plan.hash} (SmolLM2 layers [{plan.split_layer}, {ckpt.spec.num_layers}), W{plan.cloud_weights.bits}), "
          f"loopback gRPC, {args.steps} decode steps per session after a {args.prompt}-position prefill")
    print(f"{'sessions':>9}{'tokens/s':>11}{'vs 1':>7}{'mean batch':>12}{'step ms':>10}{'server ms':>11}{'protocol ms':>13}")
    for r in rows:
        print(f"{r['sessions']:>9}{r['tokens_per_s']:>11.1f}{r['tokens_per_s'] / base:>6.1f}x{r['mean_batch']:>12.1f}"
              f"{r['median_step_ms']:>10.2f}{r['median_server_ms']:>11.2f}{r['median_overhead_ms']:>13.2f}")
    print("protocol ms = client step time - server time for that step (frame parse/decode, tail, sampling), median;\n"
          "at 1 session it is the per-step cost of gRPC + protobuf + queueing on loopback.")
    ours = rows[0]["median_overhead_ms"]
    print(f"bare grpcio bidi echo of the same decode frames, same client pattern, same run: {echo_ms:.3f} ms/step; "
          f"our protocol at 1 session: {ours:.3f} ms = {ours / echo_ms:.2f}x the echo")
    print(f"the same session with the tail replaced by a no-op (warm caches, no compute): step {no_tail['median_step_ms']:.3f} ms, "
          f"server {no_tail['median_server_ms']:.3f} ms, protocol {no_tail['median_overhead_ms']:.3f} ms = "
          f"{no_tail['median_overhead_ms'] / echo_ms:.2f}x the echo")
    print(f"busy echo (the same echo running one real tail step before each reply, step - that compute): {busy_ms:.3f} ms; "
          f"our protocol = {ours / busy_ms:.2f}x the busy echo")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"plan": plan.hash, "rows": rows, "echo_median_step_ms": echo_ms,
                                           "protocol_vs_echo": ours / echo_ms, "no_tail": no_tail,
                                           "no_tail_protocol_vs_echo": no_tail["median_overhead_ms"] / echo_ms,
                                           "busy_echo_overhead_ms": busy_ms, "protocol_vs_busy_echo": ours / busy_ms}, indent=2))


if __name__ == "__main__":
    main()
