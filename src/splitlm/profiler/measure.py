"""`splitlm profile`: measure a Profile on this machine (needs torch for export and the cloud side).

Everything the partitioner prices is measured on the components that run it:

* device latency: heads of `probe_layers` layers exported per weight precision and timed in the
  onnxruntime runtime (decode at several contexts, prefill at two chunk sizes); per-layer cost is
  the difference to an embedding-only head, divided by the layer count. The device LM head
  (device-only plans) is its own exported graph, timed the same way.
* device memory: peak RSS of fresh device processes (the runtime alone; the embedding-only head;
  each precision's head; each KV width at two sequence lengths; heads of two depths at two
  lengths, through which memory is fitted) driven with real text, so what onnxruntime maps,
  prepacks and allocates is counted as it happens.
* device KV: the same head with each KV width, timed: what quantizing the cache adds per layer
  at each context and per prefill position.
* cloud latency: tail stages of `cloud_probe_layers` (default twice `probe_layers`) timed in torch.
* what per-layer costs miss (runtime calls and buffers on a fresh device session, gRPC, the
  service's own work): real split sessions at two depths against a real `splitlm serve` over
  loopback, device time and waiting time measured apart, less the modelled costs and the loopback
  RTT; a device-only export stepped as `generate` steps it.
* codec: each point encoded/decoded on real activations at the middle layer.
* link: the given bandwidth; the RTT given, or probed against a running server (also alone:
  `splitlm profile --link-only`).
* quality: perplexity on calibration windows for each precision at a few split points, each KV
  width and codec point (cached: it does not depend on the machine).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from splitlm import evaluate
from splitlm.errors import ConfigError
from splitlm.model.checkpoint import Checkpoint, cache_root
from splitlm.partition.plan import Plan
from splitlm.partition.profile import (
    CodecPoint,
    LinkProfile,
    MemoryProfile,
    Profile,
    QualityTable,
    SideProfile,
)
from splitlm.quantize import codec as codec_mod
from splitlm.quantize.config import CodecConfig, WeightQuant

log = logging.getLogger(__name__)

CODEC_POINTS: dict[str, CodecConfig] = {
    "fp16": CodecConfig("fp16"),
    "tabq eps=0.02": CodecConfig("tabq", error_budget=0.02),
    "tabq eps=0.035": CodecConfig("tabq", error_budget=0.035),
    "tabq eps=0.05": CodecConfig("tabq", error_budget=0.05),
}
SHORT_PREFILL = 16
"""The small prefill call that, with the plan's chunk, gives each layer's fixed and per-token prefill cost."""


def _median_ms(fn, reps: int) -> float:
    fn()  # warm-up: first calls allocate
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _line(x1: float, y1: float, x2: float, y2: float) -> tuple[float, float]:
    """(intercept, slope) through two points, both clamped at 0 (timing noise)."""
    slope = max(0.0, (y2 - y1) / (x2 - x1))
    return max(0.0, y1 - slope * x1), slope


def _fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(fixed, scale) with y = fixed + scale * x through one or two (x, y) points: the scale is
    kept within [0.5, 2] (two noisy points close together would swing it) and fixed at >= 0."""
    if len(points) < 2 or abs(points[0][0] - points[1][0]) < 1e-9:
        (x, y), scale = points[0], 1.0
    else:
        (x1, y1), (x2, y2) = points[:2]
        scale = min(2.0, max(0.5, (y2 - y1) / (x2 - x1)))
        x, y = points[0]
    return max(0.0, y - scale * x), scale


def _memory_fit(n: int, d: int, lo: int, hi: int, shallow: list[float], deep: list[float], runtime: float) -> dict:
    """Peak RSS of heads of n and d layers at lo and hi positions -> M(l, s) = runtime + fixed +
    per_token * s + l * (layer + kv * s): the bilinear surface through the four points."""
    slope_lo, slope_hi = (deep[0] - shallow[0]) / (d - n), (deep[1] - shallow[1]) / (d - n)
    kv = (slope_hi - slope_lo) / (hi - lo)
    at_lo, at_hi = shallow[0] - n * slope_lo, shallow[1] - n * slope_hi
    per_token = (at_hi - at_lo) / (hi - lo)
    return {"layer": slope_lo - kv * lo, "kv": kv, "per_token": per_token, "fixed": at_lo - per_token * lo - runtime}


def _scaled(side: SideProfile, decode: float = 1.0, prefill: float = 1.0) -> SideProfile:
    """`side` with its per-layer decode and prefill costs multiplied by the given factors."""
    return dataclasses.replace(
        side, decode_ms={b: tuple(v * decode for v in vals) for b, vals in side.decode_ms.items()},
        prefill_ms_per_token={b: v * prefill for b, v in side.prefill_ms_per_token.items()},
        prefill_fixed_ms={b: v * prefill for b, v in side.prefill_fixed_ms.items()})


def _time_device_head(device_dir: Path, contexts, sizes, text: list[int], threads: int | None, reps: int,
                      spin: bool | None = None):
    """Decode ms at each context, prefill ms for each chunk size, of one exported head (spin: as
    HeadSession's; by default as the head's plan runs it)."""
    from splitlm.device.runtime import DeviceHead, HeadSession

    head = DeviceHead(HeadSession(device_dir, threads=threads, spin=spin))
    decode = []
    for ctx in contexts:
        head.reset()
        head.step(text[:ctx])
        decode.append(_median_ms(lambda: head.step([text[ctx]]), reps))  # the context grows by `reps`: negligible
    prefill = {}
    for t in sizes:
        prefill[t] = _median_ms(lambda: (head.reset(), head.step(text[:t])), reps)
    return decode, prefill


def _time_cloud(stage, spec, contexts, sizes, reps: int):
    from splitlm.model.llama import KVCache

    decode = []
    with torch.inference_mode():
        for ctx in contexts:
            cache = KVCache()
            stage(torch.randn(1, ctx, spec.hidden_size), cache=cache)
            x = torch.randn(1, 1, spec.hidden_size)

            def step():
                stage(x, cache=cache, last_only=True)
                cache.crop(ctx)
            decode.append(_median_ms(step, reps))
        inputs = {t: torch.randn(1, t, spec.hidden_size) for t in sizes}
        prefill = {t: _median_ms(lambda: stage(inputs[t], last_only=True), reps) for t in sizes}
    return decode, prefill


# Peak RSS of this process image: VmHWM (ru_maxrss would carry the parent's peak across fork + exec).
_PEAK = "print(1024 * int(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:'))))\n"
_BASELINE = (
    "import sys\n"
    "from splitlm.device.runtime import load_tokenizer\n"
    "import onnxruntime\n"
    "load_tokenizer(sys.argv[1])\n" + _PEAK
)
_RUN_HEAD = (
    "import sys, numpy as np\n"
    "from splitlm.device.runtime import DeviceHead, HeadSession, load_tokenizer\n"
    "load_tokenizer(sys.argv[1])\n"
    "h = DeviceHead(HeadSession(sys.argv[1], threads=int(sys.argv[3]) or None))\n"
    "text = [int(t) for t in open(sys.argv[4]).read().split()] if sys.argv[4] != '-' else None\n"
    "n = int(sys.argv[2]); first = min(n - 1, h.plan.prefill_chunk)\n"
    "ids = text if text is not None else list(np.arange(n) % 200 + 3)\n"
    "h.step(list(ids[:first]))\n"
    "while h.length < n: h.step([int(ids[h.length % len(ids)])])\n" + _PEAK
)
_FIRST_CALL = (  # a fresh device process: ms of its first call (a prompt), as `splitlm generate` makes it
    "import sys, time\n"
    "from splitlm.device.runtime import DeviceHead, HeadSession\n"
    "h = DeviceHead(HeadSession(sys.argv[1], threads=int(sys.argv[2]) or None))\n"
    "ids = [int(t) for t in sys.argv[3].split(',')]\n"
    "t0 = time.perf_counter(); h.encode(h.step(ids)); print((time.perf_counter() - t0) * 1e3)\n"
)


def first_call_ms(device_dir: Path, prompt: list[int], threads: int | None = None, runs: int = 3) -> float:
    """Median over fresh processes of the device's first call on `prompt` (process and session
    start-up costs included: what a new `splitlm generate` pays in its TTFT)."""
    times = []
    for _ in range(runs):
        out = subprocess.run([sys.executable, "-c", _FIRST_CALL, str(device_dir), str(threads or 0),
                              ",".join(map(str, prompt))], capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"first-call probe failed: {out.stderr.strip()[-800:]}")
        times.append(float(out.stdout.split()[-1]))
    return statistics.median(times)


_RUN_GRAPH = (  # a bare graph with input_ids/position_ids only (the device LM-head probe)
    "import sys, numpy as np, onnxruntime as ort\n"
    "s = ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])\n"
    "s.run(None, {'input_ids': np.array([[5]], np.int64), 'position_ids': np.array([[0]], np.int64)})\n" + _PEAK
)


def _peak(code: str, *args: str) -> float:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"memory probe failed: {out.stderr.strip()[-800:]}")
    return float(out.stdout.strip().splitlines()[-1])


def runtime_baseline_bytes(device_dir: Path) -> float:
    """Peak RSS of a device process with the runtime imported and the tokenizer loaded, no model."""
    return _peak(_BASELINE, str(device_dir))


def measure_peak_rss(device_dir: Path, positions: int, threads: int | None = None, text: list[int] | None = None) -> float:
    """Peak RSS (bytes) of a fresh device process that runs the head to `positions` (one prefill
    chunk, then decode), fed `text` token ids (cycled) or, without text, a synthetic pattern."""
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as f:
        if text is not None:
            f.write(" ".join(map(str, text)))
            f.flush()
        return _peak(_RUN_HEAD, str(device_dir), str(positions), str(threads or 0), f.name if text is not None else "-")


def probe_rtt_ms(address: str, count: int = 20) -> float:
    """Median round trip of the gRPC health check against a running `splitlm serve` (ms)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    channel = grpc.insecure_channel(address)
    stub = health_pb2_grpc.HealthStub(channel)
    try:
        stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
        times = []
        for _ in range(count):
            t0 = time.perf_counter()
            stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
            times.append((time.perf_counter() - t0) * 1e3)
    except grpc.RpcError as exc:
        raise ConfigError(f"cannot probe the link to {address}: {exc.code().name}: {exc.details()}") from None
    finally:
        channel.close()
    return statistics.median(times)


def _serve(cloud_root: Path) -> tuple[subprocess.Popen, str]:
    exe = Path(sys.executable).with_name("splitlm")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "splitlm.cli"]
    proc = subprocess.Popen(cmd + ["serve", "--artifacts", str(cloud_root), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    line = proc.stdout.readline()
    if "serving" not in line:
        proc.kill()
        raise RuntimeError(f"the calibration server did not start: {line}{proc.stdout.read()[-500:]}")
    return proc, "127.0.0.1:" + line.strip().rsplit(":", 1)[1]


@dataclasses.dataclass(frozen=True)
class _Calibration:
    """Medians over real split sessions over loopback (ms)."""

    device_prefill: float
    """The device's first call of a fresh session (prompt in, frame out)."""
    prefill_wait: float
    """From sending the prompt's frame to the first token."""
    device_step: float
    """One decode step on the device (token in, frame out)."""
    step_wait: float
    """From sending a step's frame to its token."""
    rtt: float
    """The loopback link's own round trip (gRPC health check)."""


def _loopback_calibration(root: Path, prompt: list[int], tokens: int, threads: int | None, runs: int = 3) -> _Calibration:
    """Real split generations against a `splitlm serve` of `root` over loopback, each from a fresh
    device session as a new `splitlm generate` process would be: what the per-layer costs miss
    (runtime calls, buffers, gRPC, the service's own work) shows up as the difference."""
    from splitlm.device.client import RemoteSession, connect
    from splitlm.device.runtime import DeviceHead, HeadSession
    from splitlm.sampling import SamplingParams

    proc, address = _serve(root)
    try:
        rtt = probe_rtt_ms(address)
        channel = connect(address)
        pre, pre_wait, dev, wait = [], [], [], []
        for run in range(runs + 1):  # run 0 warms the server up
            head = DeviceHead(HeadSession(root / "device", threads=threads))
            with RemoteSession(channel, head.plan.hash, head.plan.model_id, SamplingParams(), tokens) as rs:
                t0 = time.perf_counter()
                frame = head.encode(head.step(prompt))
                t1 = time.perf_counter()
                tok = rs.next_token(frame)
                t2 = time.perf_counter()
                if run:
                    pre.append((t1 - t0) * 1e3)
                    pre_wait.append((t2 - t1) * 1e3)
                for _ in range(tokens - 1):
                    t0 = time.perf_counter()
                    frame = head.encode(head.step([tok]))
                    t1 = time.perf_counter()
                    tok = rs.next_token(frame)
                    if run:
                        dev.append((t1 - t0) * 1e3)
                        wait.append((time.perf_counter() - t1) * 1e3)
        channel.close()
        med = statistics.median
        return _Calibration(med(pre), med(pre_wait), med(dev), med(wait), rtt)
    finally:
        proc.terminate()
        proc.wait(10)


def _export_lm_head(ckpt: Checkpoint, bits: int, path: Path) -> None:
    """An ONNX graph of embedding + final norm + LM head at `bits` (no layers)."""
    from splitlm.export import export_head_onnx
    from splitlm.model.load import build_stage
    from splitlm.quantize.apply import quantize_lm_head

    export_head_onnx(quantize_lm_head(build_stage(ckpt, 0, 0, embed=True, final=True), bits), path)


def _time_graph(path: Path, threads: int | None, reps: int, sample: bool) -> float:
    import onnxruntime as ort

    from splitlm.device.runtime import session_options
    from splitlm.sampling import Sampler, SamplingParams

    s = ort.InferenceSession(str(path), session_options(threads or os.cpu_count(), "all"), providers=["CPUExecutionProvider"])
    feed = {"input_ids": np.array([[5]], np.int64), "position_ids": np.array([[7]], np.int64)}
    sampler = Sampler(SamplingParams())
    if sample:
        return _median_ms(lambda: sampler(s.run(None, feed)[0][0, -1]), reps)
    return _median_ms(lambda: s.run(None, feed), reps)


def measure_profile(ckpt: Checkpoint, link: LinkProfile, *, bits: tuple[int, ...] = (16, 8, 4), kv_bits=(16, 8, 4),
                    contexts: tuple[int, ...] = (128, 512, 1024), probe_layers: int = 4, prefill: int = 128,
                    cloud_probe_layers: int | None = None,
                    memory_positions: int = 1024, quality_windows: int = 2, threads: int | None = None, reps: int = 7,
                    server: str | None = None, lm_head_bits: tuple[int, ...] = (16, 8), progress: bool = True,
                    on_phase: Callable[[str, dict], None] | None = None) -> Profile:
    """Measure everything the partitioner prices (see the module docstring). on_phase(name, values) is
    called as each phase ends with what it measured, so that a caller can keep those values when a
    later phase fails or is interrupted (write_partial)."""
    from splitlm.export import export_artifacts
    from splitlm.model.load import build_stage
    from splitlm.quantize.apply import quantize_lm_head, quantize_stage
    from splitlm.stages import build_stages

    spec, L = ckpt.spec, ckpt.spec.num_layers
    n = min(probe_layers, L)
    tok = ckpt.tokenizer()
    calib = evaluate.calibration_windows(tok, max(2, quality_windows, -(-(max(contexts) + 2 * reps + 16) // evaluate.WINDOW)))
    text = [t for w in calib for t in w]
    sizes = (SHORT_PREFILL, prefill)
    lo, hi = prefill + 1, max(memory_positions, prefill + 2)
    kv_extra = [kb for kb in kv_bits if kb != 16]
    bar = tqdm(total=5 + 2 * len(bits) + len(kv_extra) + len(lm_head_bits), desc="profile",
               disable=not progress, leave=False)

    def record(what: str, **values) -> None:
        if on_phase is not None:
            on_phase(what, values)

    def done(what: str, **values) -> None:
        record(what, **values)
        bar.set_postfix_str(what)
        bar.update()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base_plan = Plan(ckpt.model_id, ckpt.weights_hash, 0, codec=CodecConfig("fp16"),
                         max_seq_len=max(hi, max(contexts) + 2 * reps + 16) + 8, prefill_chunk=prefill)
        base = export_artifacts(ckpt, base_plan, tmp / "base", progress=False)
        runtime_bytes = runtime_baseline_bytes(base.device_dir)
        base_lo = measure_peak_rss(base.device_dir, lo, threads, text)
        base_hi = measure_peak_rss(base.device_dir, hi, threads, text)
        runtime_bytes = min(runtime_bytes, base_lo)  # the embedding is mapped, barely touched: keep noise out of it
        base_decode, base_pre = _time_device_head(base.device_dir, contexts, sizes, text, threads, reps)
        done("embedding-only head", runtime_bytes=runtime_bytes, peak_rss=(base_lo, base_hi), positions=(lo, hi),
             decode_ms=base_decode, prefill_ms=base_pre)
        # KV: heads at 8-bit weights with each KV width, peak RSS at two lengths
        # KV: heads at 8-bit weights with each KV width: peak RSS at two lengths, and the time a
        # quantized cache adds to each step over a 16-bit one
        kv_mem, kv_time, kv_rss = {}, {}, {}
        for kb in sorted(set(kv_bits) | {16}, reverse=True):
            res = export_artifacts(ckpt, base_plan.replace(split_layer=n, device_weights=WeightQuant(8, 32), kv_bits=kb),
                                   tmp / f"kv{kb}", progress=False)
            kv_rss[kb] = [measure_peak_rss(res.device_dir, t, threads, text) for t in (lo, hi)]
            kv_mem[kb] = max(0.0, (kv_rss[kb][1] - kv_rss[kb][0] - (base_hi - base_lo)) / (n * (hi - lo)))
            kv_time[kb] = _time_device_head(res.device_dir, contexts, sizes, text, threads, reps)
            phase = done if kb != 16 else record  # the 16-bit cache is the reference, not a step of the bar
            phase(f"KV {kb}-bit", peak_rss=kv_rss[kb], kv_bytes_per_token_layer=kv_mem[kb], decode_ms=kv_time[kb][0],
                  prefill_ms=kv_time[kb][1])
        (dec16, pre16) = kv_time.pop(16)
        kv_decode = {kb: tuple(max(0.0, (d - d16) / n) for d, d16 in zip(dec, dec16)) for kb, (dec, _) in kv_time.items()}
        kv_prefill = {kb: max(0.0, (pre[prefill] - pre16[prefill]) / (n * prefill)) for kb, (_, pre) in kv_time.items()}
        dev_decode, dev_pre, dev_fixed, layer_bytes, layer_rss = {}, {}, {}, {}, {}
        for b in bits:
            plan = base_plan.replace(split_layer=n, device_weights=WeightQuant(b, 32))
            res = export_artifacts(ckpt, plan, tmp / f"w{b}", progress=False)
            dec, pre = _time_device_head(res.device_dir, contexts, sizes, text, threads, reps)
            dev_decode[b] = tuple(max(0.0, (d - d0) / n) for d, d0 in zip(dec, base_decode))
            (t1, p1), (t2, p2) = [(t, (pre[t] - base_pre[t]) / n) for t in sizes]
            dev_fixed[b], dev_pre[b] = _line(t1, p1, t2, p2)
            layer_rss[b] = kv_rss[16][0] if b == 8 else measure_peak_rss(res.device_dir, lo, threads, text)
            layer_bytes[b] = max(0.0, (layer_rss[b] - base_lo) / n - kv_mem[16] * lo)
            done(f"device W{b}", decode_ms=dev_decode[b], prefill_fixed_ms=dev_fixed[b], prefill_ms_per_token=dev_pre[b],
                 peak_rss=layer_rss[b], layer_bytes=layer_bytes[b])
        # the device LM head (device-only plans): embedding + norm + LM head + sampling, less the embedding step
        embed_graph = tmp / "base" / "device" / "head.onnx"
        embed_ms = _time_graph(embed_graph, threads, reps, sample=False)
        embed_peak = _peak(_RUN_GRAPH, str(embed_graph))
        head_ms, lm_head_mem = {}, {}
        for hb in lm_head_bits:
            path = tmp / f"lm{hb}" / "head.onnx"
            path.parent.mkdir()
            _export_lm_head(ckpt, hb, path)
            head_ms[hb] = max(0.0, _time_graph(path, threads, reps, sample=True) - embed_ms)
            lm_head_mem[hb] = max(0.0, _peak(_RUN_GRAPH, str(path)) - embed_peak)
            done(f"device LM head {hb}-bit", head_ms=head_ms[hb], lm_head_bytes=lm_head_mem[hb], embed_ms=embed_ms)
        # cloud: tail stages of m layers per precision, and the final norm + LM head. Twice the
        # device's probe: a 4-layer stage times ~20 % faster per layer than 8 or 15 (SmolLM2, CPU)
        m = min(L, cloud_probe_layers or 2 * probe_layers)
        cloud_decode, cloud_pre, cloud_fixed = {}, {}, {}
        for b in bits:
            stage = quantize_stage(build_stage(ckpt, L - m, L, embed=False, final=False), WeightQuant(b, 32), progress=False)
            dec, pre = _time_cloud(stage, spec, contexts, sizes, reps)
            cloud_decode[b] = tuple(d / m for d in dec)
            cloud_fixed[b], cloud_pre[b] = _line(sizes[0], pre[sizes[0]] / m, sizes[1], pre[sizes[1]] / m)
            done(f"cloud W{b}", decode_ms=cloud_decode[b], prefill_fixed_ms=cloud_fixed[b], prefill_ms_per_token=cloud_pre[b])
        with torch.inference_mode():
            final = quantize_lm_head(build_stage(ckpt, L, L, embed=False, final=True), 16)
            x = torch.randn(1, 1, spec.hidden_size)
            cloud_head = _median_ms(lambda: final(x), reps)
        # codec points on real activations at the middle layer
        mid, _ = build_stages(ckpt, Plan(ckpt.model_id, ckpt.weights_hash, L // 2), tail=False)
        with torch.inference_mode():
            h = mid(torch.tensor([text[:256]]))[0].numpy()
        codecs = []
        for name, cfg in CODEC_POINTS.items():
            frames = [codec_mod.encode(h[i:i + 1], cfg) for i in range(64)]
            enc = _median_ms(lambda: codec_mod.encode(h[:1], cfg), reps)
            dec = _median_ms(lambda: codec_mod.decode(frames[0], "torch"), reps)
            chunk = h[:prefill]
            chunk_frame = codec_mod.encode(chunk, cfg)
            enc_chunk = _median_ms(lambda: codec_mod.encode(chunk, cfg), max(1, reps // 2)) / len(chunk)
            dec_chunk = _median_ms(lambda: codec_mod.decode(chunk_frame, "torch"), max(1, reps // 2)) / len(chunk)
            codecs.append(CodecPoint(name, float(np.mean([len(f) for f in frames])), enc, dec, cfg.kind, cfg.error_budget,
                                     enc_chunk, dec_chunk))
        done("codec", cloud_head_ms=cloud_head, codecs=codecs)
        device = SideProfile(contexts, dev_decode, dev_pre, embed_ms=min(base_decode), head_ms=head_ms,
                             prefill_fixed_ms=dev_fixed, kv_decode_ms=kv_decode, kv_prefill_ms_per_token=kv_prefill)
        cloud = SideProfile(contexts, cloud_decode, cloud_pre, head_ms={16: cloud_head}, prefill_fixed_ms=cloud_fixed)
        # what the per-layer costs miss, on both sides: real split sessions over loopback against a
        # real server, k device layers (W8, 16-bit KV) and the rest in the cloud. The cloud is
        # calibrated at two depths (deep: L - k layers; shallow: 2), which separates its fixed cost
        # per step from how its per-layer cost in the service compares with the layers timed alone.
        prompt = text[:SHORT_PREFILL * 2]
        tokens = 24
        cb = 16 if 16 in bits else max(bits)
        k = min(n, L - 1)  # the calibration needs a cloud part
        depths = [k] + ([L - 2] if L - 2 > k else [])
        cals, roots = [], []
        for d in depths:
            root = tmp / "kv16"
            if d != n or cb != 16:
                root = tmp / f"calibration{d}"
                export_artifacts(ckpt, base_plan.replace(split_layer=d, device_weights=WeightQuant(8, 32),
                                                         cloud_weights=WeightQuant(cb, 32)), root, progress=False)
            roots.append(root)
            cals.append(_loopback_calibration(root, prompt, tokens, threads))
        cal = cals[0]
        fp16 = codecs[0]
        T, ctx = len(prompt), len(prompt) + tokens // 2
        # the device model: the 8-bit, 16-bit-KV head of n layers as timed alone, one layer's step at ctx
        per_layer = float(np.interp(ctx, contexts, [(d - b) / n for d, b in zip(dec16, base_decode)]))
        embed_at = float(np.interp(ctx, contexts, base_decode))
        w8_fixed, w8_slope = _line(*(x for t in sizes for x in (t, (pre16[t] - base_pre[t]) / n)))
        w8_prompt = w8_fixed + T * w8_slope  # one layer's prefill of the prompt
        # the device's step in split sessions at both depths = fixed (gRPC, idle threads waking) +
        # scale x the layers as timed alone (a deep head's layers cost more than a 4-layer head's)
        step_fit_dev = _fit([(d * per_layer, c.device_step - embed_at - fp16.encode_ms) for d, c in zip(depths, cals)])
        # the device's prompt: a fresh process's first call at both depths (per-layer prefill of a
        # deep head in a new process differs from a 4-layer head timed warm)
        pre_fit = _fit([(d * w8_prompt, first_call_ms(root / "device", prompt, threads) - device.embed_ms
                         - T * fp16.prefill_encode) for d, root in zip(depths, roots)])
        # device-only plans run with spinning threads (nothing to wait on) and their LM head in the
        # graph: a device-only export stepped as `generate` steps it, against the (scaled) model
        hb = 8 if 8 in head_ms else max(head_ms)
        alone = export_artifacts(ckpt, base_plan.replace(split_layer=L, device_weights=WeightQuant(8, 32), lm_head_bits=hb),
                                 tmp / "alone", progress=False)
        spinning = _time_device_head(alone.device_dir, (ctx,), (), text, threads, reps)[0][0]
        modelled = L * per_layer * step_fit_dev[1]
        alone_scale = max(0.5, min(1.5, (spinning - embed_at - head_ms[hb]) / max(1e-9, modelled)))
        device = dataclasses.replace(_scaled(device, decode=step_fit_dev[1], prefill=pre_fit[1]),
                                     prefill_overhead_ms=pre_fit[0], step_overhead_ms=step_fit_dev[0],
                                     alone_decode_scale=alone_scale)
        # the cloud: waited time less the RTT = fixed + scale * (the cloud layers timed alone) + head
        step_fixed, step_scale = _fit([((L - d) * cloud.decode(cb, ctx), c.step_wait - c.rtt - fp16.decode_ms - cloud_head)
                                       for d, c in zip(depths, cals)])
        pre_fixed, pre_scale = _fit([((L - d) * cloud.prefill(cb, T), c.prefill_wait - c.rtt - T * fp16.prefill_decode
                                      - cloud_head) for d, c in zip(depths, cals)])
        cloud = dataclasses.replace(_scaled(cloud, decode=step_scale, prefill=pre_scale), step_overhead_ms=step_fixed,
                                    prefill_overhead_ms=pre_fixed)
        log.info("device at %s layers: prompt in a fresh process %s ms -> fixed %.1f ms + %.2f x layers; split-session "
                 "step %s ms -> fixed %.2f ms + %.2f x layers; device-only step (spinning threads, LM head) %.2f ms (x%.2f)",
                 depths, [round(c.device_prefill, 1) for c in cals], *pre_fit, [round(c.device_step, 2) for c in cals],
                 *step_fit_dev, spinning, alone_scale)
        log.info("cloud at %s layers (loopback RTT %.2f ms): step %s ms -> fixed %.2f ms + %.2f x layers, prefill %s ms "
                 "-> fixed %.1f ms + %.2f x layers", [L - d for d in depths], cal.rtt,
                 [round(c.step_wait - c.rtt, 2) for c in cals], step_fixed, step_scale,
                 [round(c.prefill_wait - c.rtt, 1) for c in cals], pre_fixed, pre_scale)
        done("service overhead", device=device, cloud=cloud, calibrations=dict(zip(depths, cals)))
        # memory from two depths: a small head's peak overlaps the process's start-up peak and
        # hides part of its layers; the deep calibration head (8-bit, 16-bit KV) gives the slope
        head_fit = None
        if len(depths) == 2 and depths[1] > n:
            deep = [measure_peak_rss(roots[1] / "device", t, threads, text) for t in (lo, hi)]
            head_fit = _memory_fit(n, depths[1], lo, hi, kv_rss[16], deep, runtime_bytes)
            # other precisions: their difference from the 8-bit head at n layers, per layer
            layer_bytes = {b: max(0.0, head_fit["layer"] + (r - kv_rss[16][0]) / n) for b, r in layer_rss.items()}
            kv_mem = {kb: max(0.0, head_fit["kv"] + (r[1] - r[0] - kv_rss[16][1] + kv_rss[16][0]) / (n * (hi - lo)))
                      for kb, r in kv_rss.items()}
        done("memory", layer_bytes=layer_bytes, kv_bytes_per_token_layer=kv_mem, fit=head_fit)
    if server:
        link = LinkProfile(link.bandwidth_mbps, probe_rtt_ms(server))
        record("link", link=link)
    quality = cached_quality(ckpt, calib[-quality_windows:], bits, kv_bits, progress)
    done("quality", quality=quality)
    bar.close()
    memory = MemoryProfile(layer_bytes, base_lo - runtime_bytes, lm_head_mem, kv_mem, runtime_bytes,
                           embed_bytes_per_token=max(0.0, (base_hi - base_lo) / (hi - lo)),
                           head_bytes=head_fit["fixed"] if head_fit else None,
                           head_bytes_per_token=head_fit["per_token"] if head_fit else 0.0)
    return Profile(ckpt.model_id, ckpt.weights_hash, L, spec.hidden_size, device, cloud, memory, link, tuple(codecs), quality)


def _jsonable(value):
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    return str(value)


def write_partial(path: str | Path, ckpt: Checkpoint, phases: dict[str, dict], error: BaseException) -> None:
    """Write the phases `measure_profile` finished before `error` stopped it, with what each measured
    (as handed to on_phase), as JSON to `path`: not a Profile, the raw measurements."""
    doc = {"partial": True, "model_id": ckpt.model_id, "weights_hash": ckpt.weights_hash,
           "stopped_by": f"{type(error).__name__}: {error}".strip(), "phases": phases}
    Path(path).write_text(json.dumps(doc, indent=2, default=_jsonable) + "\n")


QUALITY_CACHE_VERSION = 1


def quality_cache_path(ckpt: Checkpoint, wins: list[list[int]], bits, kv_bits) -> Path:
    """Where the quality table of these weights, windows, precisions and codec points is cached
    (it does not depend on the machine: a second profile, on any device, reuses it)."""
    key = json.dumps([QUALITY_CACHE_VERSION, ckpt.weights_hash, sorted(bits), sorted(kv_bits), wins,
                      {name: dataclasses.asdict(cfg) for name, cfg in CODEC_POINTS.items()}], sort_keys=True)
    return cache_root() / "quality" / f"{ckpt.model_id}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def cached_quality(ckpt: Checkpoint, wins: list[list[int]], bits, kv_bits, progress: bool) -> QualityTable:
    """measure_quality, read from the cache when it was measured before (a corrupt entry is measured again)."""
    path = quality_cache_path(ckpt, wins, bits, kv_bits)
    if path.exists():
        try:
            return QualityTable.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("quality cache %s is unreadable (%s): measuring again", path, exc)
    table = measure_quality(ckpt, wins, bits, kv_bits, progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(dataclasses.asdict(table)))
    tmp.replace(path)
    return table


def measure_quality(ckpt: Checkpoint, wins: list[list[int]], bits, kv_bits, progress: bool) -> QualityTable:
    """Δ log-perplexity of each precision over split ranges, each KV width and codec point."""
    from splitlm.local import LocalSplit

    L = ckpt.spec.num_layers
    splits = sorted({0, L // 4, L // 2, 3 * L // 4, L})

    def nll(plan: Plan) -> float:
        return evaluate.perplexity(LocalSplit(ckpt, plan=plan).forward, wins, progress=False).nll

    exact = Plan(ckpt.model_id, ckpt.weights_hash, L // 2, codec=CodecConfig("fp32"), prefill_chunk=128)
    base = nll(exact)
    device, cloud = {}, {}
    for b in tqdm([b for b in bits if b != 16], desc="quality", disable=not progress, leave=False):
        device[b] = {s: (nll(exact.replace(split_layer=s, device_weights=WeightQuant(b, 32))) - base) if s else 0.0
                     for s in splits}
        cloud[b] = {s: (nll(exact.replace(split_layer=s, cloud_weights=WeightQuant(b, 32))) - base) if s < L else 0.0
                    for s in splits}
    kv = {kb: nll(exact.replace(kv_bits=kb)) - base for kb in kv_bits if kb != 16}
    codecs = {name: nll(exact.replace(codec=cfg)) - base for name, cfg in CODEC_POINTS.items()}
    return QualityTable(float(np.exp(base)), device, cloud, kv, codecs)
