"""Device measurements, each in a fresh process as the device install runs it (no torch).

`python -m splitlm.device.probe COMMAND ...` does one thing and prints one JSON line with what it
measured; the profiler (`splitlm.profiler`) starts one process per measurement, so that what
onnxruntime maps, prepacks and allocates is counted from a clean start:

* `baseline DEVICE_DIR`: peak RSS with the runtime imported and the tokenizer loaded, no model
* `run-head DEVICE_DIR --positions N [--threads T] [--text FILE]`: peak RSS of a head run to N positions
* `first-call DEVICE_DIR --prompt IDS [--threads T]`: ms of a fresh session's first call on a prompt
* `run-graph GRAPH`: peak RSS of one call of a bare graph (input_ids and position_ids only)

Each command imports only what it measures, inside its function, so that it is all that is counted.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path
from typing import Sequence


def peak_rss_bytes() -> int:
    """Peak RSS of this process image: VmHWM (ru_maxrss would carry the parent's peak across fork + exec)."""
    with open("/proc/self/status") as status:
        return 1024 * int(next(line.split()[1] for line in status if line.startswith("VmHWM:")))


def baseline(device_dir: str) -> dict:
    """The runtime imported and the tokenizer loaded, no model: {"peak_rss_bytes"}."""
    from splitlm.device.runtime import load_tokenizer

    # onnxruntime after the runtime's own imports (numpy first), as a device process has them: the
    # other order peaks ~1.5 MB higher
    importlib.import_module("onnxruntime")
    load_tokenizer(device_dir)
    return {"peak_rss_bytes": peak_rss_bytes()}


def run_head(device_dir: str, positions: int, threads: int | None, text_file: str | None, prompt: int | None = None) -> dict:
    """The head run to `positions` on the token ids in `text_file` (cycled) or, without one, a synthetic
    pattern: a prompt of `prompt` positions (default: one prefill chunk) prefilled in the plan's chunks,
    then decode: {"peak_rss_bytes"}."""
    import numpy as np

    from splitlm.device.runtime import DeviceHead, HeadSession, load_tokenizer

    load_tokenizer(device_dir)
    head = DeviceHead(HeadSession(device_dir, threads=threads))
    text = [int(t) for t in Path(text_file).read_text().split()] if text_file else None
    first = min(positions - 1, head.plan.prefill_chunk if prompt is None else prompt)
    ids = text if text is not None else list(np.arange(positions) % 200 + 3)
    ids = [int(ids[i % len(ids)]) for i in range(positions)]
    head.step(list(ids[:first]), last_only=True)  # as generation runs a prompt: a device-only head's logits for its last row
    while head.length < positions:
        head.step([int(ids[head.length % len(ids)])])
    return {"peak_rss_bytes": peak_rss_bytes()}


def first_call(device_dir: str, prompt: list[int], threads: int | None) -> dict:
    """A fresh session's first call on `prompt` (prompt in, frame out), as `splitlm generate` makes
    it: {"first_call_ms"}."""
    from splitlm.device.runtime import DeviceHead, HeadSession

    head = DeviceHead(HeadSession(device_dir, threads=threads))
    t0 = time.perf_counter()
    head.encode(head.step(prompt))
    return {"first_call_ms": (time.perf_counter() - t0) * 1e3}


def run_graph(graph: str) -> dict:
    """One call of a bare ONNX graph without layers (the device LM-head probe): {"peak_rss_bytes"}."""
    import onnxruntime as ort

    from splitlm.device.runtime import bare_feed

    session = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
    session.run(None, bare_feed(session))
    return {"peak_rss_bytes": peak_rss_bytes()}


def _token_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not comma-separated token ids") from None


def _threads(text: str) -> int | None:
    """--threads: 0 (the default) means all cores, as HeadSession's None."""
    return int(text) or None


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m splitlm.device.probe",
                                 description="One device measurement in this fresh process; prints one JSON line.")
    sub = ap.add_subparsers(dest="command", required=True)
    b = sub.add_parser("baseline", help="peak RSS with the runtime imported and the tokenizer loaded")
    b.add_argument("device_dir")
    b.set_defaults(measure=lambda a: baseline(a.device_dir))
    h = sub.add_parser("run-head", help="peak RSS of the head run to --positions")
    h.add_argument("device_dir")
    h.add_argument("--positions", type=int, required=True)
    h.add_argument("--threads", type=_threads, default=None, help="onnxruntime threads (default 0: all cores)")
    h.add_argument("--text", default=None, help="a file of whitespace-separated token ids (default: a synthetic pattern)")
    h.add_argument("--prompt", type=int, default=None, help="positions prefilled as one prompt (default: one prefill chunk)")
    h.set_defaults(measure=lambda a: run_head(a.device_dir, a.positions, a.threads, a.text, a.prompt))
    f = sub.add_parser("first-call", help="ms of a fresh session's first call on --prompt")
    f.add_argument("device_dir")
    f.add_argument("--prompt", type=_token_ids, required=True, help="comma-separated token ids")
    f.add_argument("--threads", type=_threads, default=None, help="onnxruntime threads (default 0: all cores)")
    f.set_defaults(measure=lambda a: first_call(a.device_dir, a.prompt, a.threads))
    g = sub.add_parser("run-graph", help="peak RSS of one call of a bare graph")
    g.add_argument("graph")
    g.set_defaults(measure=lambda a: run_graph(a.graph))
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    print(json.dumps(args.measure(args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
