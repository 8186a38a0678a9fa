"""The cloud kernels against their torch baselines, on CUDA only.

    .venv/bin/python bench/kernels.py [--json bench/results/kernels.json]

For each kernel and shape: the GPU time of the Triton kernel and of the torch baseline
(dequantize the weight to fp16, then matmul — what a tail without kernels does per call), from
CUDA-graph replays; the speed-up; the kernel's achieved memory bandwidth (bytes it must read and
write / GPU time) as a fraction of a device-to-device copy measured in the same run; and the time
of one eager call, the host's launch cost included. Without CUDA it says so and exits.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from splitlm.kernels.frame_decode import (
    batch_frames,
    decode_rows_reference,
    decode_rows_triton,
)
from splitlm.kernels.wq_matmul import pack_weight, wq_matmul_triton
from splitlm.quantize import codec
from splitlm.quantize.config import CodecConfig
from splitlm.quantize.weights import rtn_quantize

# (name, M, N, K): LLM-sized matrices (7B-class attention/MLP projections) and SmolLM2's
SHAPES = [("decode 4096x4096", 1, 4096, 4096), ("decode 11008x4096", 1, 11008, 4096), ("decode 4096x11008", 1, 4096, 11008),
          ("decode x4 4096x4096", 4, 4096, 4096), ("decode x16 4096x4096", 16, 4096, 4096), ("decode SmolLM2 1536x576", 1, 1536, 576),
          ("prefill 512x4096x4096", 512, 4096, 4096), ("prefill 512x11008x4096", 512, 11008, 4096)]


def timed(fn, reps: int = 50) -> float:
    """Median milliseconds of one eager call of fn() with CUDA events: the GPU's time plus what
    the host's launch adds when the GPU waits on it (what an un-captured tail pays per call)."""
    import statistics

    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def graph_timed(fn, calls: int = 20, reps: int = 20) -> float:
    """Median milliseconds of fn() on the GPU alone: `calls` calls captured in one CUDA graph,
    replayed `reps` times (no host launch cost between them)."""
    import statistics

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Bytes/s of a 1 GiB device-to-device copy (read + write)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = timed(lambda: dst.copy_(src), 20)
    return 2 * src.numel() / (ms / 1e3)


def row(kernel: str, bits, t_k: float, t_b: float, c_k: float, c_b: float, moved: int, bw: float) -> dict:
    """Print one line of the table; its JSON row (times in ms)."""
    gbs = moved / (t_k / 1e3)
    print(f"{kernel:<34}{bits or '-':>5}{t_k * 1e3:>11.1f}{t_b * 1e3:>10.1f}{t_b / t_k:>9.2f}x{gbs / 1e9:>8.0f}"
          f"{gbs / bw:>9.0%}{c_k * 1e3:>9.1f}{c_b * 1e3:>11.1f}", flush=True)
    return {"kernel": kernel, "bits": bits, "triton_ms": t_k, "torch_ms": t_b, "triton_call_ms": c_k, "torch_call_ms": c_b,
            "speedup": t_b / t_k, "bytes": moved, "fraction_of_copy": gbs / bw}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default="bench/results/kernels.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench/kernels.py needs CUDA: no GPU here, nothing measured")
        sys.exit(0)
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: device-to-device copy {bw / 1e9:.0f} GB/s")
    print("GPU time per call (CUDA graph replay); 'call' = one eager call, host launch included")
    print(f"{'kernel':<34}{'bits':>5}{'triton µs':>11}{'torch µs':>10}{'speed-up':>10}{'GB/s':>8}{'of copy':>9}"
          f"{'call µs':>9}{'torch call':>11}")
    rows = []
    for name, M, N, K in SHAPES:
        for bits in (4, 8):
            q = rtn_quantize(torch.randn(N, K), bits, 128)
            w = pack_weight(q).to("cuda")
            x = torch.randn(M, K, device="cuda", dtype=torch.float16)
            codes, scales, zeros = q.codes.cuda(), q.scales.cuda(), q.zeros.cuda()
            cols = torch.arange(K, device="cuda") // 128

            def baseline():
                wd = ((codes.to(torch.float16) - zeros[:, cols].to(torch.float16)) * scales[:, cols])
                return x @ wd.t()

            t_k, t_b = graph_timed(lambda: wq_matmul_triton(x, w)), graph_timed(baseline)
            c_k, c_b = timed(lambda: wq_matmul_triton(x, w)), timed(baseline)
            moved = w.qweight.numel() + w.scales.numel() * 2 + w.zeros.numel() + x.numel() * 2 + M * N * 2
            rows.append(row(f"wq_matmul {name}", bits, t_k, t_b, c_k, c_b, moved, bw))
    for rows_n, d in ((1, 4096), (64, 4096), (512, 4096)):
        x = torch.randn(rows_n, d).numpy()
        frame = codec.encode(x, CodecConfig("tabq", entropy="none", error_budget=0.035))
        batch = batch_frames([frame], "cuda")
        t_k, c_k = graph_timed(lambda: decode_rows_triton(batch)), timed(lambda: decode_rows_triton(batch))
        t_b = c_b = timed(lambda: decode_rows_reference(batch))  # the reference syncs with the host: eager only
        moved = batch.payload.numel() + batch.scales.numel() * 4 + batch.out_val.numel() * 6 + rows_n * d * 4
        rows.append(row(f"frame_decode {rows_n}x{d}", None, t_k, t_b, c_k, c_b, moved, bw))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "copy_bytes_per_s": bw, "rows": rows},
                                          indent=2))


if __name__ == "__main__":
    main()
