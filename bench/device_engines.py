"""The engines bench/device.py times, behind one interface (reset(), feed(ids), greedy_next()),
and their peak RSS holding a long context, measured in a fresh process that imports only the
engine it runs (no torch):

    python bench/device_engines.py KIND PATH --threads N < ids.json   # prints {"peak_rss_mib": ...}
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

KINDS = ("ours", "llama.cpp", "genai")
RSS_CONTEXT = 2048
"""Positions held when the peak RSS is taken."""


def open_engine(kind: str, path: Path, threads: int, optimization: str = "all", n_ctx: int = 1024):
    """An engine with reset(), feed(ids) and greedy_next(): "ours" (a device head folder),
    "llama.cpp" (a GGUF) or "genai" (an onnxruntime-genai build)."""
    if kind == "ours":
        from splitlm.device.runtime import DeviceHead, HeadSession

        return OursEngine(DeviceHead(HeadSession(path, threads=threads, optimization=optimization)))
    if kind == "llama.cpp":
        from llama_cpp import Llama

        return LlamaEngine(Llama(model_path=str(path), n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx,
                                 n_batch=512, verbose=False))
    if kind == "genai":
        from genai_peer import GenaiEngine

        return GenaiEngine(path, threads, max_length=max(n_ctx, 2048))
    raise ValueError(f"unknown engine kind {kind!r}: use one of {KINDS}")


class OursEngine:
    """Our device-only head (DeviceHead); feed returns after the last position's logits."""

    def __init__(self, head) -> None:
        self.head, self.last = head, None
        self.reset = head.reset

    def feed(self, ids: list[int]) -> None:
        self.last = self.head.step(ids, last_only=True)[-1]

    def greedy_next(self) -> int:
        return int(np.argmax(self.last))

    def all_logits(self, ids: list[int]) -> np.ndarray:
        """Logits (T, V) of every position of `ids` from an empty sequence."""
        self.head.reset()
        return self.head.step(ids)


class LlamaEngine:
    """llama-cpp-python's Llama.eval over the GGUF."""

    def __init__(self, llm) -> None:
        self.llm = llm
        self.reset, self.feed = llm.reset, llm.eval

    def greedy_next(self) -> int:
        return int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))


def peak_rss_mib(kind: str, path: Path, threads: int, ids: list[int], prefill: int | None = None) -> float | None:
    """Peak RSS (MiB) of a fresh process that opens one engine and feeds it `ids` (RSS_CONTEXT
    positions) in 512-token chunks, or the first `prefill` of them so and the rest one token a step
    (no prefill scratch at the full length: what the KV table measures); None when the worker fails."""
    cmd = [sys.executable, __file__, kind, str(path), "--threads", str(threads)]
    if prefill is not None:
        cmd += ["--prefill", str(prefill)]
    done = subprocess.run(cmd, input=json.dumps(ids), capture_output=True, text=True)
    if done.returncode != 0:
        print(f"peak RSS of {kind} {path} failed: {done.stderr.strip()[-500:]}", file=sys.stderr, flush=True)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_mib"]


def rss_worker() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", choices=KINDS)
    ap.add_argument("path", type=Path)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--prefill", type=int, default=None, help="positions fed in chunks; the rest one by one")
    args = ap.parse_args()
    ids = json.loads(sys.stdin.read())
    engine = open_engine(args.kind, args.path, args.threads, n_ctx=len(ids))
    chunked = len(ids) if args.prefill is None else args.prefill
    for start in range(0, chunked, 512):
        engine.feed(ids[start:min(start + 512, chunked)])
    for tok in ids[chunked:]:
        engine.feed([tok])
    print(json.dumps({"peak_rss_mib": peak_rss_self_mib()}))


def peak_rss_self_mib() -> float:
    """This process's peak RSS since its exec (VmHWM). Not getrusage's ru_maxrss: after a vfork'd
    exec that carries over the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (peak RSS is read on Linux only)")


if __name__ == "__main__":
    rss_worker()
