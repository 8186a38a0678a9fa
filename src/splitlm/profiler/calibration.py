"""What the cloud's per-layer costs miss (gRPC, the service's own work): real split sessions at two
depths against a real `splitlm serve` over loopback, the waiting time less the modelled costs and the
loopback RTT. (The device's side of the calibration is the device's: profiler.device.)"""

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

from splitlm.device.client import probe_rtt_ms
from splitlm.partition.profile import CodecPoint, SideProfile
from splitlm.profiler.config import Bench, calibration_cloud_bits, calibration_root
from splitlm.profiler.device import CALIBRATION_TOKENS, calibration_prompt
from splitlm.profiler.kit import Kit
from splitlm.profiler.probes import child_env
from splitlm.profiler.timing import fit, scaled

log = logging.getLogger(__name__)


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


def calibrate_cloud(bench: Bench, kit: Kit, cloud: SideProfile, fp16: CodecPoint) -> SideProfile:
    """Real split sessions over loopback against a real server of each calibration export; the cloud's
    costs fitted to them. The cloud is calibrated at two depths, which separates its fixed cost per
    step from how its per-layer cost in the service compares with the layers timed alone."""
    prompt = calibration_prompt(kit)
    cals = {d: loopback_calibration(calibration_root(bench, d), prompt, CALIBRATION_TOKENS, bench.config.threads)
            for d in kit.depths}
    return fit_cloud(bench, cloud, fp16, cals, len(prompt), len(prompt) + CALIBRATION_TOKENS // 2)


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
