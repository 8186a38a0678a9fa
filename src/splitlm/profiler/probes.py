"""Fresh device processes (`python -m splitlm.device.probe`), each measuring one thing as the
device install would: peak memory of a run, the time of a first call."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def child_env() -> dict[str, str]:
    """This environment, with the splitlm this process runs first on PYTHONPATH when it is a source
    tree (not an installed package): a child process runs the same code as its parent."""
    src = Path(__file__).resolve().parents[2]  # .../src of this splitlm (splitlm/profiler/probes.py)
    env = dict(os.environ)
    if src.name not in ("site-packages", "dist-packages"):
        env["PYTHONPATH"] = os.pathsep.join([str(src)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def run_probe(what: str, command: str, *args: str) -> dict:
    """Run `python -m splitlm.device.probe COMMAND ARGS` in a fresh process and return its JSON result
    (a failure is a RuntimeError named by `what`, with the tail of the probe's stderr)."""
    out = subprocess.run([sys.executable, "-m", "splitlm.device.probe", command, *args], capture_output=True, text=True,
                         env=child_env())
    if out.returncode != 0:
        raise RuntimeError(f"{what} probe failed: {out.stderr.strip()[-800:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def runtime_baseline_bytes(device_dir: Path) -> float:
    """Peak RSS of a device process with the runtime imported and the tokenizer loaded, no model."""
    return float(run_probe("memory", "baseline", str(device_dir))["peak_rss_bytes"])


def measure_peak_rss(device_dir: Path, positions: int, threads: int | None = None, text: list[int] | None = None,
                     prompt: int | None = None) -> float:
    """Peak RSS (bytes) of a fresh device process that runs the head to `positions` (a prompt of `prompt`
    positions, default one prefill chunk, then decode), fed `text` token ids (cycled) or, without text, a
    synthetic pattern."""
    args = [str(device_dir), "--positions", str(positions), "--threads", str(threads or 0)]
    if prompt is not None:
        args += ["--prompt", str(prompt)]
    if text is None:
        return float(run_probe("memory", "run-head", *args)["peak_rss_bytes"])
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as f:
        f.write(" ".join(map(str, text)))
        f.flush()
        return float(run_probe("memory", "run-head", *args, "--text", f.name)["peak_rss_bytes"])


def graph_peak_rss(graph: Path) -> float:
    """Peak RSS (bytes) of a fresh process that makes one call of a bare graph (input_ids, position_ids)."""
    return float(run_probe("memory", "run-graph", str(graph))["peak_rss_bytes"])


def first_call_ms(device_dir: Path, prompt: list[int], threads: int | None = None, runs: int = 3) -> float:
    """Median over fresh processes of the device's first call on `prompt` (process and session
    start-up costs included: what a new `splitlm generate` pays in its TTFT)."""
    args = [str(device_dir), "--threads", str(threads or 0), "--prompt", ",".join(map(str, prompt))]
    return statistics.median(float(run_probe("first-call", "first-call", *args)["first_call_ms"]) for _ in range(runs))
