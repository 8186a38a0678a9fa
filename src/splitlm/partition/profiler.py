"""`splitlm profile`: measure a Profile on this machine (needs torch for export and the cloud side).

Device: heads of `probe_layers` layers are exported per weight precision and timed in the
onnxruntime runtime (decode at several contexts, prefill per token); per-layer cost is the
difference to an embedding-only head, divided by the layer count. Cloud: tail stages of the
same size timed in torch. Memory: exported sizes (device) and analytic KV sizes. Codec: each
point encoded/decoded on real activations at the middle layer. Quality: perplexity on
calibration windows for each precision at a few split points, each KV width and codec point.
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from splitlm import evaluate
from splitlm.model.checkpoint import Checkpoint
from splitlm.partition.plan import CodecConfig, Plan, WeightQuant
from splitlm.partition.profile import CodecPoint, LinkProfile, MemoryProfile, Profile, QualityTable, SideProfile
from splitlm.quantize import codec as codec_mod

log = logging.getLogger(__name__)

CODEC_POINTS: dict[str, CodecConfig] = {
    "fp16": CodecConfig("fp16"),
    "tabq eps=0.02": CodecConfig("tabq", error_budget=0.02),
    "tabq eps=0.035": CodecConfig("tabq", error_budget=0.035),
    "tabq eps=0.05": CodecConfig("tabq", error_budget=0.05),
}


def _median_ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _time_device_head(device_dir: Path, contexts: tuple[int, ...], prefill: int, threads: int | None, reps: int):
    from splitlm.device.runtime import DeviceHead, HeadSession

    head = DeviceHead(HeadSession(device_dir, threads=threads))
    decode = []
    for ctx in contexts:
        head.reset()
        head.step(list(np.arange(ctx) % 200 + 3))
        decode.append(_median_ms(lambda: head.step([7]), reps))  # the context grows by `reps` positions: negligible
    head.reset()
    pre = _median_ms(lambda: (head.reset(), head.step(list(np.arange(prefill) % 200 + 3))), max(1, reps // 2)) / prefill
    return decode, pre


def _time_cloud(stage, spec, contexts: tuple[int, ...], prefill: int, reps: int):
    from splitlm.model.llama import KVCache

    decode = []
    with torch.inference_mode():
        for ctx in contexts:
            cache = KVCache()
            stage(torch.randn(1, ctx, spec.hidden_size), cache=cache)
            x = torch.randn(1, 1, spec.hidden_size)

            def step():
                stage(x, cache=cache)
                cache.crop(ctx)
            decode.append(_median_ms(step, reps))
        h = torch.randn(1, prefill, spec.hidden_size)
        pre = _median_ms(lambda: stage(h), max(1, reps // 2)) / prefill
    return decode, pre


# Peak RSS of this process image: VmHWM (ru_maxrss would carry the parent's peak across fork + exec).
_PEAK = "print(1024 * int(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:'))))\n"
_BASELINE = (
    "import sys\n"
    "from splitlm.device.runtime import load_tokenizer\n"
    "import onnxruntime\n"
    "load_tokenizer(sys.argv[1])\n" + _PEAK
)


def runtime_baseline_bytes(device_dir: Path) -> float:
    """Peak RSS of a device process with the runtime imported and the tokenizer loaded, no model."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _BASELINE, str(device_dir)], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def measure_peak_rss(device_dir: Path, positions: int, threads: int | None = None) -> float:
    """Peak RSS (bytes) of a device process that runs the head to `positions` (prefill chunks, then decode)."""
    import subprocess
    import sys

    code = (
        "import sys, numpy as np\n"
        "from splitlm.device.runtime import DeviceHead, HeadSession, load_tokenizer\n"
        "load_tokenizer(sys.argv[1])\n"
        "h = DeviceHead(HeadSession(sys.argv[1], threads=int(sys.argv[3]) or None))\n"
        "n = int(sys.argv[2]); first = min(n - 1, h.plan.prefill_chunk)\n"
        "h.step(list(np.arange(first) % 200 + 3))\n"
        "while h.length < n: h.step([5])\n" + _PEAK
    )
    out = subprocess.run([sys.executable, "-c", code, str(device_dir), str(positions), str(threads or 0)],
                         capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def measure_profile(ckpt: Checkpoint, link: LinkProfile, *, bits: tuple[int, ...] = (16, 8, 4), kv_bits=(16, 8, 4),
                    contexts: tuple[int, ...] = (128, 1024), probe_layers: int = 2, prefill: int = 128,
                    quality_windows: int = 2, threads: int | None = None, reps: int = 5, progress: bool = True) -> Profile:
    from splitlm.device.export import export_artifacts
    from splitlm.local import LocalSplit
    from splitlm.model.load import build_stage
    from splitlm.quantize.apply import quantize_lm_head, quantize_stage

    spec, L = ckpt.spec, ckpt.spec.num_layers
    n = min(probe_layers, L)
    steps = tqdm(total=2 * len(bits) + 3, desc="profile", disable=not progress, leave=False)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base_plan = Plan(ckpt.model_id, ckpt.weights_hash, 0, codec=CodecConfig("fp16"), max_seq_len=max(contexts) + prefill + 8,
                         prefill_chunk=prefill)
        base = export_artifacts(ckpt, base_plan, tmp / "base", progress=False)
        runtime_bytes = runtime_baseline_bytes(base.device_dir)
        base_decode, base_pre = _time_device_head(base.device_dir, contexts, prefill, threads, reps)
        steps.update()
        dev_decode, dev_pre, layer_bytes = {}, {}, {}
        for b in bits:
            plan = base_plan.replace(split_layer=n, device_weights=WeightQuant(b, 32))
            res = export_artifacts(ckpt, plan, tmp / f"w{b}", progress=False)
            dec, pre = _time_device_head(res.device_dir, contexts, prefill, threads, reps)
            dev_decode[b] = tuple(max(0.0, (d - d0) / n) for d, d0 in zip(dec, base_decode))
            dev_pre[b] = max(0.0, (pre - base_pre) / n)
            layer_bytes[b] = max(0.0, (res.head_bytes - base.head_bytes) / n)
            steps.update()
    device = SideProfile(contexts, dev_decode, dev_pre, embed_ms=min(base_decode), head_ms={}, step_overhead_ms=0.0)
    cloud_decode, cloud_pre = {}, {}
    for b in bits:
        stage = quantize_stage(build_stage(ckpt, L - n, L, embed=False, final=False), WeightQuant(b, 32), progress=False)
        dec, pre = _time_cloud(stage, spec, contexts, prefill, reps)
        cloud_decode[b], cloud_pre[b] = tuple(d / n for d in dec), pre / n
        steps.update()
    head_ms = {}
    with torch.inference_mode():
        for hb in (16, 8):
            final = quantize_lm_head(build_stage(ckpt, L, L, embed=False, final=True), hb)
            x = torch.randn(1, 1, spec.hidden_size)
            head_ms[hb] = _median_ms(lambda: final(x), reps)
    cloud = SideProfile(contexts, cloud_decode, cloud_pre, head_ms={16: head_ms[16]})
    # the device's LM head (device-only plans) is timed with torch for now: an estimate of the onnxruntime cost
    device = SideProfile(contexts, dev_decode, dev_pre, embed_ms=device.embed_ms, head_ms=head_ms)
    steps.update()
    # codec points on real activations at the middle layer
    tok = ckpt.tokenizer()
    calib = evaluate.calibration_windows(tok, max(1, quality_windows))
    mid = LocalSplit(ckpt, L // 2)
    with torch.inference_mode():
        h = mid.head(torch.tensor([calib[0][:256]]))[0].numpy()
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
    steps.update()
    quality = measure_quality(ckpt, calib, bits, kv_bits, progress)
    steps.close()
    kv = {kb: spec.kv_bytes_per_token(1, kb) + (0 if kb == 16 else 2 * spec.num_kv_heads * 4) for kb in kv_bits}
    lm_head = {16: spec.vocab_size * spec.hidden_size * 4.0, 8: spec.vocab_size * spec.hidden_size * (1 + 2.5 / 32)}
    memory = MemoryProfile(layer_bytes, float(base.head_bytes), lm_head, kv, runtime_bytes)
    return Profile(ckpt.model_id, ckpt.weights_hash, L, spec.hidden_size, device, cloud, memory, link, tuple(codecs), quality)


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
