"""Soak: N sessions for M minutes against one server; throughput, errors and the server's RSS over time.

Each session loops: open, prefill a prompt, decode K tokens, close, again. The frames are
pre-encoded real activations at the split (as in bench/cloud.py), so the client costs little
CPU. The server is a `splitlm serve` subprocess (its RSS is the server's alone, read from
/proc/PID/status), or with --in-process the same server code in this process.

Reported per window (default 10 s): tokens/s, sessions completed, errors, median step time
and the server's RSS; then the RSS slope (least squares, MiB/min) over the whole run and over
its last half, and the errors by status code.

    .venv/bin/python bench/soak.py [--sessions 16] [--minutes 10] [--model smollm2-135m] [--json bench/results/soak.json]
    .venv/bin/python bench/soak.py --model tiny-random --sessions 2 --minutes 0.5     # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

GENERATE = "/splitlm.v1.SplitInference/Generate"
CALL_TIMEOUT_S = 300.0
"""Deadline of one whole session (open, prefill, K steps, close); passing it counts as an error."""
BACKOFF_S = 0.5
"""Pause after a failed session before the next one."""
NORMAL_EXITS = (0, 130, -signal.SIGINT)
"""How `splitlm serve` ends on the SIGINT that stops it."""


# -- the server ---------------------------------------------------------------------------------------------
class SubprocessServer:
    """`splitlm serve` in a child process; RSS from /proc/PID/status."""

    def __init__(self, root: Path, sessions: int) -> None:
        exe = Path(sys.executable).with_name("splitlm")
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "splitlm.cli"]
        cmd += ["serve", "--artifacts", str(root), "--port", "0", "--max-sessions", str(sessions)]
        self.log = tempfile.NamedTemporaryFile("w+", prefix="soak-server-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.pid = self.proc.pid
        line = self.proc.stdout.readline()  # "serving plan H (layers [a, b)) on HOST:PORT"
        if " on " not in line:
            self.proc.wait(10)
            raise SystemExit(f"the server did not start (exit {self.proc.returncode}); its log {self.log.name}:\n"
                             + Path(self.log.name).read_text()[-2000:])
        self.address = line.rsplit(" on ", 1)[1].strip()
        self.banner = line.strip()

    def rss_mib(self) -> float | None:
        return _rss_mib(self.pid, "VmRSS")

    def peak_mib(self) -> float | None:
        return _rss_mib(self.pid, "VmHWM")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> int | None:
        if self.alive():
            self.proc.send_signal(signal.SIGINT)  # serve stops with a 2 s grace
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


class InProcessServer:
    """The same server code in this process (its RSS then includes the client's)."""

    def __init__(self, root: Path, sessions: int) -> None:
        from splitlm.cloud.service import ServerConfig, start_server
        from splitlm.cloud.tail import TailRunner

        runner = TailRunner(root / "cloud")
        self.server, port, _ = start_server(runner, "127.0.0.1:0", ServerConfig(max_sessions=sessions))
        self.pid, self.address = os.getpid(), f"127.0.0.1:{port}"
        self.banner = f"in-process server of plan {runner.plan.hash} on {self.address}"

    def rss_mib(self) -> float | None:
        return _rss_mib(self.pid, "VmRSS")

    def peak_mib(self) -> float | None:
        return _rss_mib(self.pid, "VmHWM")

    def alive(self) -> bool:
        return True

    def stop(self) -> int | None:
        self.server.stop(grace=2)
        return None


def _rss_mib(pid: int, field_name: str) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


# -- the sessions ---------------------------------------------------------------------------------------------
@dataclass
class Stats:
    """Counters the session threads add to and the sampler takes per window (under `lock`)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    tokens: int = 0
    sessions: int = 0
    errors: Counter = field(default_factory=Counter)
    step_s: list = field(default_factory=list)

    def take(self) -> tuple[int, int, Counter, list]:
        with self.lock:
            out = (self.tokens, self.sessions, self.errors, self.step_s)
            self.tokens, self.sessions, self.errors, self.step_s = 0, 0, Counter(), []
        return out


def _message(**fields):
    from splitlm.proto import splitlm_pb2 as pb

    return pb.DeviceMessage(**fields)


def session_loop(channel: grpc.Channel, plan, prefill: bytes, decodes: list[bytes], stats: Stats,
                 stop: threading.Event) -> None:
    """Open, prefill, decode every frame, close; again until `stop`. Errors are counted by status code."""
    from splitlm.proto import splitlm_pb2 as pb
    from splitlm.quantize.codec import parse_frame

    rpc = channel.stream_stream(GENERATE, request_serializer=pb.DeviceMessage.SerializeToString,
                                response_deserializer=pb.CloudMessage.FromString)
    prompt_rows = parse_frame(prefill).rows
    while not stop.is_set():
        requests: queue.Queue = queue.Queue()
        call = rpc(iter(requests.get, None), timeout=CALL_TIMEOUT_S)
        try:
            requests.put(_message(open=pb.Open(plan_hash=plan.hash, model_id=plan.model_id, sampling=pb.Sampling(),
                                               max_tokens=len(decodes) + 1)))
            if not next(call).HasField("opened"):
                raise RuntimeError("the first answer is not Opened")
            position = 0
            for frame in [prefill] + decodes:
                if stop.is_set():
                    break
                t0 = time.perf_counter()
                requests.put(_message(activations=pb.Activations(start_position=position, frame=frame, want_token=True)))
                reply = next(call)
                took = time.perf_counter() - t0
                if not reply.HasField("token"):
                    raise RuntimeError(f"expected a Token, got {reply.WhichOneof('kind')}")
                position += prompt_rows if position == 0 else 1
                with stats.lock:
                    stats.tokens += 1
                    if position > prompt_rows:
                        stats.step_s.append(took)
            if stop.is_set():
                call.cancel()  # the run is over: a client cancel is a normal ending
                break
            requests.put(None)
            for _ in call:
                pass
            with stats.lock:
                stats.sessions += 1
        except grpc.RpcError as exc:
            if stop.is_set() and exc.code() == grpc.StatusCode.CANCELLED:
                break
            with stats.lock:
                stats.errors[exc.code().name] += 1
            stop.wait(BACKOFF_S)
        except (StopIteration, RuntimeError) as exc:
            with stats.lock:
                stats.errors[f"PROTOCOL ({exc or 'stream ended early'})"] += 1
            call.cancel()
            stop.wait(BACKOFF_S)
        finally:
            requests.put(None)


# -- the run ---------------------------------------------------------------------------------------------------
def slope_mib_per_min(samples: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, MiB) samples, in MiB per minute (None below 2 samples)."""
    if len(samples) < 2:
        return None
    t = np.array([s[0] for s in samples]) / 60
    y = np.array([s[1] for s in samples])
    return float(np.polyfit(t, y, 1)[0])


def soak(server, plan, frames, minutes: float, window_s: float) -> dict:
    """Run len(frames) session loops for `minutes`; sample every `window_s` seconds."""
    stats, stop = Stats(), threading.Event()
    channel = grpc.insecure_channel(server.address)
    threads = [threading.Thread(target=session_loop, args=(channel, plan, prefill, decodes, stats, stop), daemon=True)
               for prefill, decodes in frames]
    duration = minutes * 60
    rss = [(0.0, server.rss_mib())]
    windows = []
    t0 = time.monotonic()
    for t in threads:
        t.start()
    edge = 0.0
    while edge < duration - 1e-9:
        start, edge = edge, min(edge + window_s, duration)
        time.sleep(max(0.0, t0 + edge - time.monotonic()))
        tokens, sessions, errors, steps = stats.take()
        now = time.monotonic() - t0
        mib = server.rss_mib()
        rss.append((now, mib))
        windows.append({"start_s": start, "end_s": edge, "tokens": tokens, "tokens_per_s": tokens / (edge - start),
                        "sessions": sessions, "errors": dict(errors),
                        "median_step_ms": 1e3 * statistics.median(steps) if steps else None,
                        "rss_mib": mib, "server_alive": server.alive()})
        line = format_window(windows[-1])
        print(line, flush=True)
    stop.set()
    for t in threads:
        t.join(CALL_TIMEOUT_S)
    channel.close()
    _, late_sessions, late_errors, _ = stats.take()  # sessions cut by the end of the run (cancels are not errors)
    rss_ok = [(t, m) for t, m in rss if m is not None]
    half = [(t, m) for t, m in rss_ok if t >= duration / 2]
    errors = Counter()
    for w in windows:
        errors.update(w["errors"])
    errors.update(late_errors)
    return {"windows": windows, "rss_samples": [[round(t, 2), m] for t, m in rss],
            "rss_slope_mib_per_min": {"whole_run": slope_mib_per_min(rss_ok), "last_half": slope_mib_per_min(half)},
            "rss_peak_mib": server.peak_mib(), "errors": dict(errors),
            "totals": {"tokens": sum(w["tokens"] for w in windows), "sessions": sum(w["sessions"] for w in windows),
                       "tokens_per_s": sum(w["tokens"] for w in windows) / duration}}


HEADER = f"{'window':>13}{'tokens/s':>10}{'sessions':>10}{'errors':>8}{'step p50 ms':>13}{'RSS MiB':>10}"


def format_window(w: dict) -> str:
    span = f"{w['start_s']:.0f}-{w['end_s']:.0f} s"
    step = f"{w['median_step_ms']:.1f}" if w["median_step_ms"] is not None else "-"
    mib = f"{w['rss_mib']:.1f}" if w["rss_mib"] is not None else "gone"
    return (f"{span:>13}{w['tokens_per_s']:>10.1f}{w['sessions']:>10}{sum(w['errors'].values()):>8}{step:>13}{mib:>10}")


def _signed(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.2f}"


def main() -> None:
    from splitlm.demo import cached_export, default_plan
    from splitlm.model.registry import resolve_model

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from cloud import frames_for  # bench/cloud.py: pre-encoded frames of real activations

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", type=int, default=16, help="concurrent session loops")
    ap.add_argument("--minutes", type=float, default=10.0, help="length of the run")
    ap.add_argument("--model", default="smollm2-135m", help="model of the default plan (tiny-random for a smoke run)")
    ap.add_argument("--prompt", type=int, default=64, help="prompt positions per session")
    ap.add_argument("--tokens", type=int, default=32, help="decode steps per session after the prompt's token")
    ap.add_argument("--window", type=float, default=10.0, help="seconds per reported window and RSS sample")
    ap.add_argument("--in-process", action="store_true", help="run the server in this process, not `splitlm serve`")
    ap.add_argument("--json", default="bench/results/soak.json")
    args = ap.parse_args()
    if args.sessions < 1 or args.minutes <= 0 or args.window <= 0 or args.prompt < 1 or args.tokens < 0:
        ap.error("--sessions, --prompt must be >= 1, --tokens >= 0, --minutes and --window > 0")

    ckpt = resolve_model(args.model)
    plan = default_plan(ckpt)
    if args.prompt + args.tokens + 1 > plan.max_seq_len:
        ap.error(f"--prompt + --tokens must stay under the plan's max_seq_len {plan.max_seq_len}")
    root = cached_export(ckpt, plan)
    frames = frames_for(ckpt, plan, args.prompt, args.tokens, args.sessions)
    server = (InProcessServer if args.in_process else SubprocessServer)(root, args.sessions)
    where = "in-process" if args.in_process else f"`splitlm serve` subprocess, pid {server.pid}"
    print(f"soak: {args.sessions} sessions x {args.minutes:g} min, {args.model} plan {plan.hash} (cloud layers "
          f"[{plan.split_layer}, {ckpt.spec.num_layers})), {args.prompt}-position prompt + {args.tokens} decode steps per "
          f"session; server: {where} ({server.banner})", flush=True)
    print(HEADER, flush=True)
    try:
        report = soak(server, plan, frames, args.minutes, args.window)
    finally:
        exit_code = server.stop()
    slopes = report["rss_slope_mib_per_min"]
    totals = report["totals"]
    print(f"total: {totals['tokens']} tokens in {totals['sessions']} completed sessions, {totals['tokens_per_s']:.1f} tokens/s")
    print(f"server RSS: {report['rss_samples'][0][1]:.1f} -> {report['rss_samples'][-1][1] or float('nan'):.1f} MiB, "
          f"peak {report['rss_peak_mib'] or float('nan'):.1f} MiB; slope {_signed(slopes['whole_run'])} MiB/min over the "
          f"whole run, {_signed(slopes['last_half'])} MiB/min over the last half "
          f"({len(report['rss_samples'])} samples, every {args.window:g} s)")
    print("errors: " + (", ".join(f"{k} x{v}" for k, v in sorted(report["errors"].items())) or "none"))
    if not args.in_process:
        if exit_code in NORMAL_EXITS:
            Path(server.log.name).unlink(missing_ok=True)
        else:
            print(f"the server exited with {exit_code}; its log: {server.log.name}")
    report.update({"model": args.model, "plan": plan.hash, "sessions": args.sessions, "minutes": args.minutes,
                   "prompt": args.prompt, "decode_steps": args.tokens, "window_s": args.window,
                   "server": "in-process" if args.in_process else "subprocess", "server_exit": exit_code})
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
