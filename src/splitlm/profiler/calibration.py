"""What per-layer costs miss (runtime calls and buffers on a fresh device session, gRPC, the
service's own work): real split sessions at two depths against a real `splitlm serve` over
loopback, device time and waiting time measured apart, less the modelled costs and the loopback
RTT; a device-only export stepped as `generate` steps it. Also the link's RTT probe."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import numpy as np

from splitlm.device.client import probe_rtt_ms
from splitlm.partition.profile import CodecPoint, SideProfile
from splitlm.profiler.config import SHORT_PREFILL, Bench
from splitlm.profiler.device import EmbeddingHead, KVHead
from splitlm.profiler.probes import child_env, first_call_ms
from splitlm.profiler.timing import fit, line, scaled, time_device_head
from splitlm.quantize.config import DEFAULT_GROUP, WeightQuant

log = logging.getLogger(__name__)

CALIBRATION_TOKENS = 24
"""Tokens generated in each calibration session."""


@contextlib.contextmanager
def serving(root: Path, start_timeout_s: float = 300.0) -> Iterator[str]:
    """A `splitlm serve` of the export in `root` on a free loopback port, for the duration of the
    block: yields its address once it listens (it says so by writing its --port-file)."""
    with tempfile.TemporaryDirectory() as tmp:
        port_file, log_file = Path(tmp) / "port", Path(tmp) / "serve.log"
        with open(log_file, "w") as err:
            proc = subprocess.Popen([sys.executable, "-m", "splitlm.cli", "serve", "--artifacts", str(root), "--port", "0",
                                     "--port-file", str(port_file)], stdout=subprocess.DEVNULL, stderr=err, env=child_env())
        try:
            deadline = time.monotonic() + start_timeout_s
            while not port_file.exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    raise RuntimeError(f"the calibration server did not start: {log_file.read_text()[-500:]}")
                time.sleep(0.02)
            yield f"127.0.0.1:{int(port_file.read_text())}"
        finally:
            proc.terminate()
            proc.wait(10)


@dataclasses.dataclass(frozen=True)
class Calibration:
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


def loopback_calibration(root: Path, prompt: list[int], tokens: int, threads: int | None, runs: int = 3) -> Calibration:
    """Real split generations against a `splitlm serve` of `root` over loopback, each from a fresh
    device session as a new `splitlm generate` process would be: what the per-layer costs miss
    (runtime calls, buffers, gRPC, the service's own work) shows up as the difference."""
    from splitlm.device.client import RemoteSession, connect
    from splitlm.device.runtime import DeviceHead, HeadSession
    from splitlm.sampling import SamplingParams

    with serving(root) as address:
        rtt = probe_rtt_ms(address)
        channel = connect(address)
        pre, pre_wait, dev, wait = [], [], [], []
        for run in range(runs + 1):  # run 0 warms the server up
            head = DeviceHead(HeadSession(root / "device", threads=threads))
            with RemoteSession(channel, head.plan.hash, head.plan.model_id, SamplingParams(), tokens) as rs:
                t0 = time.perf_counter()
                frame = head.encode(head.step(prompt))
                t1 = time.perf_counter()
                tok = rs.next_token(frame, len(prompt))
                t2 = time.perf_counter()
                if run:
                    pre.append((t1 - t0) * 1e3)
                    pre_wait.append((t2 - t1) * 1e3)
                for _ in range(tokens - 1):
                    t0 = time.perf_counter()
                    frame = head.encode(head.step([tok]))
                    t1 = time.perf_counter()
                    tok = rs.next_token(frame, 1)
                    if run:
                        dev.append((t1 - t0) * 1e3)
                        wait.append((time.perf_counter() - t1) * 1e3)
        channel.close()
    med = statistics.median
    return Calibration(med(pre), med(pre_wait), med(dev), med(wait), rtt)


@dataclasses.dataclass(frozen=True)
class ServiceOverhead:
    """Both sides' costs with what split sessions add (fixed costs per step and per prompt, and the
    scale of the layers timed alone), and the calibrations they were fitted to."""

    device: SideProfile
    cloud: SideProfile
    calibrations: dict[int, Calibration]
    """By device depth: the deep one first (the probe heads' depth), then a shallow cloud (2 layers) where the model allows."""


def calibration_cloud_bits(bench: Bench) -> int:
    """The cloud precision of the calibration exports: 16-bit where it is profiled."""
    return 16 if 16 in bench.config.bits else max(bench.config.bits)


def calibration_depths(bench: Bench) -> list[int]:
    """The device depths of the calibration sessions: the probe heads' (less one where that leaves the
    cloud nothing) and, where it differs, all but two layers."""
    L, k = bench.layers, min(bench.n, bench.layers - 1)
    return [k] + ([L - 2] if L - 2 > k else [])


def calibration_root(bench: Bench, depth: int) -> Path:
    """Where the calibration export of `depth` device layers is (the KV phase's 16-bit head where it is the same plan)."""
    return bench.tmp / "kv16" if depth == bench.n and calibration_cloud_bits(bench) == 16 else bench.tmp / f"calibration{depth}"


def _export_calibration(bench: Bench, depth: int) -> Path:
    """The split export of `depth` device layers (W8, 16-bit KV) and the rest in the cloud."""
    from splitlm.export import export_artifacts

    root = calibration_root(bench, depth)
    if root != bench.tmp / "kv16":
        cloud = WeightQuant(calibration_cloud_bits(bench), DEFAULT_GROUP)
        export_artifacts(bench.ckpt, bench.probe_plan(depth, 8, cloud_weights=cloud), root, progress=False)
    return root


def measure_service_overhead(bench: Bench, base: EmbeddingHead, kv16: KVHead, device: SideProfile, cloud: SideProfile,
                             fp16: CodecPoint) -> ServiceOverhead:
    """Real split sessions over loopback against a real server at calibration_depths; both sides'
    costs fitted to them. The cloud is calibrated at two depths, which separates its fixed cost per
    step from how its per-layer cost in the service compares with the layers timed alone."""
    prompt = bench.text[:SHORT_PREFILL * 2]
    cals = {d: loopback_calibration(_export_calibration(bench, d), prompt, CALIBRATION_TOKENS, bench.config.threads)
            for d in calibration_depths(bench)}
    ctx = len(prompt) + CALIBRATION_TOKENS // 2
    device = fit_device(bench, base, kv16, device, fp16, cals, prompt, ctx)
    cloud = fit_cloud(bench, cloud, fp16, cals, len(prompt), ctx)
    return ServiceOverhead(device, cloud, cals)


def fit_device(bench: Bench, base: EmbeddingHead, kv16: KVHead, device: SideProfile, fp16: CodecPoint,
               cals: dict[int, Calibration], prompt: list[int], ctx: int) -> SideProfile:
    """The device model (the 8-bit, 16-bit-KV head of Bench.n layers as timed alone) fitted to the
    split sessions: fixed costs and scales of a step and of a fresh process's prompt; and the scale
    of a device-only export's step (spinning threads, LM head in the graph)."""
    c, n, T = bench.config, bench.n, len(prompt)
    per_layer = float(np.interp(ctx, c.contexts, [(d - b) / n for d, b in zip(kv16.decode_ms, base.decode_ms)]))
    embed_at = float(np.interp(ctx, c.contexts, base.decode_ms))
    w8_fixed, w8_slope = line(*(x for t in bench.sizes for x in (t, (kv16.prefill_ms[t] - base.prefill_ms[t]) / n)))
    w8_prompt = w8_fixed + T * w8_slope  # one layer's prefill of the prompt
    # the device's step in split sessions at both depths = fixed (gRPC, idle threads waking) +
    # scale x the layers as timed alone (a deep head's layers cost more than a 4-layer head's)
    step_fit = fit([(d * per_layer, cal.device_step - embed_at - fp16.encode_ms) for d, cal in cals.items()])
    # the device's prompt: a fresh process's first call at both depths (per-layer prefill of a
    # deep head in a new process differs from a 4-layer head timed warm)
    pre_fit = fit([(d * w8_prompt, first_call_ms(calibration_root(bench, d) / "device", prompt, c.threads) - device.embed_ms
                    - T * fp16.prefill_encode) for d in cals])
    spinning, alone_scale = _device_alone_scale(bench, device, ctx, embed_at, bench.layers * per_layer * step_fit[1])
    log.info("device at %s layers: prompt in a fresh process %s ms -> fixed %.1f ms + %.2f x layers; split-session "
             "step %s ms -> fixed %.2f ms + %.2f x layers; device-only step (spinning threads, LM head) %.2f ms (x%.2f)",
             list(cals), [round(cal.device_prefill, 1) for cal in cals.values()], *pre_fit,
             [round(cal.device_step, 2) for cal in cals.values()], *step_fit, spinning, alone_scale)
    return dataclasses.replace(scaled(device, decode=step_fit[1], prefill=pre_fit[1]), prefill_overhead_ms=pre_fit[0],
                               step_overhead_ms=step_fit[0], alone_decode_scale=alone_scale)


def _device_alone_scale(bench: Bench, device: SideProfile, ctx: int, embed_at: float, modelled: float) -> tuple[float, float]:
    """(ms, scale): a device-only export (8-bit, LM head in the graph) stepped at `ctx` with spinning
    threads, as `generate` steps it, against the `modelled` layers' step."""
    from splitlm.export import export_artifacts

    hb = 8 if 8 in device.head_ms else max(device.head_ms)
    alone = export_artifacts(bench.ckpt, bench.probe_plan(bench.layers, 8, lm_head_bits=hb), bench.tmp / "alone", progress=False)
    spinning = time_device_head(alone.device_dir, (ctx,), (), bench.text, bench.config.threads, bench.config.reps)[0][0]
    return spinning, max(0.5, min(1.5, (spinning - embed_at - device.head_ms[hb]) / max(1e-9, modelled)))


def fit_cloud(bench: Bench, cloud: SideProfile, fp16: CodecPoint, cals: dict[int, Calibration], T: int, ctx: int) -> SideProfile:
    """The cloud model fitted to the split sessions: waited time less the RTT = fixed + scale x (the
    cloud layers timed alone) + head, for a step and for the prompt."""
    L, cb, head = bench.layers, calibration_cloud_bits(bench), cloud.head_ms[16]
    step_fixed, step_scale = fit([((L - d) * cloud.decode(cb, ctx), cal.step_wait - cal.rtt - fp16.decode_ms - head)
                                  for d, cal in cals.items()])
    pre_fixed, pre_scale = fit([((L - d) * cloud.prefill(cb, T), cal.prefill_wait - cal.rtt - T * fp16.prefill_decode - head)
                                for d, cal in cals.items()])
    log.info("cloud at %s layers (loopback RTT %.2f ms): step %s ms -> fixed %.2f ms + %.2f x layers, prefill %s ms "
             "-> fixed %.1f ms + %.2f x layers", [L - d for d in cals], next(iter(cals.values())).rtt,
             [round(cal.step_wait - cal.rtt, 2) for cal in cals.values()], step_fixed, step_scale,
             [round(cal.prefill_wait - cal.rtt, 1) for cal in cals.values()], pre_fixed, pre_scale)
    return dataclasses.replace(scaled(cloud, decode=step_scale, prefill=pre_scale), step_overhead_ms=step_fixed,
                               prefill_overhead_ms=pre_fixed)
