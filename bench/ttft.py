"""Time to first token of a split session with a long prompt: the prompt's frames streamed chunk by
chunk as the device head computes them (the cloud prefills one chunk while the head computes the
next), against the whole prompt sent as one frame; each with the device head as the
GroupQueryAttention graph and as the torch-traced graph of the first runtime (the same weights),
alternating in the same run.

The cloud is a `splitlm serve` process on loopback; the device head runs in this process. On one
machine the two compete for its cores, which two machines would not: by default each gets one
thread (--device-threads, --cloud-threads), as a device and a server of their own would.

    .venv/bin/python bench/ttft.py [--prompt 512] [--runs 7] [--json bench/results/ttft.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from splitlm.demo import cached_export, default_plan
from splitlm.model.checkpoint import cache_root
from splitlm.model.registry import resolve_model


def traced_export(ckpt, plan) -> Path:
    """The same plan with the traced head graph, cached beside the demo's exports."""
    from splitlm.artifacts import check_manifest
    from splitlm.errors import ModelLoadError
    from splitlm.export import EXPORT_FORMAT, export_artifacts

    root = cache_root() / "exports" / f"{plan.hash}-f{EXPORT_FORMAT}-traced"
    try:
        check_manifest(root / "device")
    except ModelLoadError:
        export_artifacts(ckpt, plan, root, graph="traced")
    return root


def serve(root: Path, threads: int) -> tuple[subprocess.Popen, str]:
    """A `splitlm serve` process of the export's cloud part, and its address once it listens."""
    port_file = Path(tempfile.mkdtemp()) / "port"
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    proc = subprocess.Popen([sys.executable, "-m", "splitlm.cli", "serve", "--artifacts", str(root), "--port", "0",
                             "--port-file", str(port_file)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"serve did not start: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.1)
    return proc, f"127.0.0.1:{port_file.read_text().strip()}"


def main() -> None:
    from splitlm.device.client import RemoteSession, connect
    from splitlm.device.runtime import HeadSession, generate_split
    from splitlm.sampling import SamplingParams

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", type=int, default=512, help="prompt tokens")
    ap.add_argument("--runs", type=int, default=7, help="runs of each way (alternating)")
    ap.add_argument("--device-threads", type=int, default=1)
    ap.add_argument("--cloud-threads", type=int, default=1)
    ap.add_argument("--json", default="bench/results/ttft.json")
    args = ap.parse_args()
    ckpt = resolve_model("smollm2-135m")
    plan = default_plan(ckpt)
    root = cached_export(ckpt, plan)
    text = " ".join(f"item {i} of a long list that the model reads before it answers" for i in range(args.prompt))
    prompt = ckpt.tokenizer().encode(text).ids[: args.prompt]
    heads = {"gqa": HeadSession(root / "device", threads=args.device_threads),
             "traced": HeadSession(traced_export(ckpt, plan) / "device", threads=args.device_threads)}
    proc, address = serve(root, args.cloud_threads)
    channel = connect(address)
    ways = [(f"{graph}, {name}", graph, stream) for graph in heads for name, stream in (("one frame", False), ("streamed", True))]
    ttft: dict[str, list[float]] = {way: [] for way, _, _ in ways}
    try:
        for run in range(args.runs + 1):  # run 0 warms every way up
            for way, graph, stream in ways:
                with RemoteSession(channel, plan.hash, plan.model_id, SamplingParams(), 2) as remote:
                    result = generate_split(heads[graph], remote.send, prompt, 1, stream_prefill=stream)
                if run:
                    ttft[way].append(result.ttft_s * 1e3)
    finally:
        channel.close()
        proc.terminate()
        proc.wait(timeout=30)
    med = {name: statistics.median(v) for name, v in ttft.items()}
    ratio = med["gqa, streamed"] / med["gqa, one frame"]
    vs_traced = med["gqa, streamed"] / med["traced, streamed"]
    vs_first = med["gqa, streamed"] / med["traced, one frame"]
    print(f"TTFT, {len(prompt)}-token prompt, plan {plan.hash} (split {plan.split_layer}/{ckpt.spec.num_layers}, "
          f"prefill chunks of {plan.prefill_chunk}), device {args.device_threads} thread(s), cloud {args.cloud_threads}, "
          f"loopback, {args.runs} runs each, alternating")
    print(f"{'head graph, prefill':<24}{'median ms':>11}{'min ms':>9}{'max ms':>9}")
    for name, v in ttft.items():
        print(f"{name:<24}{med[name]:>11.1f}{min(v):>9.1f}{max(v):>9.1f}")
    print(f"gqa: streamed / one frame {ratio:.2f}x; gqa streamed / traced streamed {vs_traced:.2f}x; "
          f"gqa streamed / traced one frame (the first runtime) {vs_first:.2f}x")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"plan": plan.hash, "prompt_tokens": len(prompt), "prefill_chunk": plan.prefill_chunk,
                                           "device_threads": args.device_threads, "cloud_threads": args.cloud_threads,
                                           "ttft_ms": ttft, "median_ms": med, "streamed_vs_one_frame": ratio,
                                           "gqa_streamed_vs_traced_streamed": vs_traced,
                                           "gqa_streamed_vs_traced_one_frame": vs_first}, indent=2))


if __name__ == "__main__":
    main()
