"""Triton kernels against their torch references (under TRITON_INTERPRET=1 without CUDA),
on irregular sizes; the cloud tail on the kernels gives the reference's greedy tokens."""

from __future__ import annotations

import os
import struct

import numpy as np
import pytest
import torch

from splitlm.errors import CodecError, ConfigError
from splitlm.kernels import dispatch
from splitlm.kernels.frame_decode import (
    batch_frames,
    decode_frames,
    decode_rows_reference,
    decode_rows_triton,
)
from splitlm.kernels.wq_matmul import (
    PackedWeight,
    pack_weight,
    unpack_codes,
    wq_matmul_reference,
    wq_matmul_triton,
)
from splitlm.quantize import codec
from splitlm.quantize.config import CodecConfig
from splitlm.quantize.weights import rtn_quantize
from tests.test_codec import with_outlier
from tests.tolerances import TOL

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-30))


def activations(rows: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, d)).astype(np.float32)
    x[:, rng.choice(d, 3, replace=False)] *= 40  # outlier channels for the threshold split
    x[rows // 2] *= 0.01  # a quiet row
    return x


@pytest.mark.parametrize("d,cfg", [
    (96, CodecConfig("tabq", entropy="none", error_budget=0.02)),  # rotation block 32 (largest power of two dividing 96, <= 64)
    (130, CodecConfig("tabq", entropy="none", error_budget=0.05, group_size=32)),  # no rotation possible (130 = 2·65), 5 groups
    (64, CodecConfig("tabq", entropy="none", error_budget=0.0005, rotate_block=1)),  # unrotated, tight budget: 8-bit and raw rows
])
def test_frame_decode_matches_reference_and_codec(d, cfg):
    frames = [codec.encode(activations(t, d, seed), cfg) for seed, t in enumerate((1, 7, 3))]
    batch = batch_frames(frames, DEVICE)
    ref = decode_rows_reference(batch)
    # the reference is the codec's own decoder, exactly
    want = torch.cat([codec.decode(f, "torch") for f in frames]).to(DEVICE)
    assert torch.equal(ref, want)
    got = decode_rows_triton(batch)
    assert rel_err(got, ref) <= TOL["kernel_frame_decode"]
    assert set(batch.bits.tolist()) - {16} or cfg.error_budget < 0.001  # coded rows were exercised
    parts = decode_frames(frames, DEVICE, "triton")
    assert [p.shape[0] for p in parts] == [1, 7, 3]


def test_frame_decode_mixes_widths_and_raw_rows():
    cfg = CodecConfig("tabq", entropy="none", error_budget=0.01)
    x = activations(9, 128, 5)
    x[2] = 0.0  # an all-zero row
    frame = codec.encode(x, cfg)
    bits = codec.parse_frame(frame).bits
    assert len(set(bits.tolist())) >= 2
    got = decode_frames([frame], DEVICE, "triton")[0]
    assert rel_err(got, codec.decode(frame, "torch").to(DEVICE)) <= TOL["kernel_frame_decode"]


@pytest.mark.parametrize("rotate", [0, 32])
def test_frame_decode_raw_fp16_and_fp32_rows(rotate):
    """Rows in fp16's subnormal range go as raw fp32 (exact), rows fp16 suits as raw fp16, the rest coded;
    the kernel and the reference decode all three like the codec."""
    x = activations(6, 96, 11)
    x[1] *= 1e-6
    x[4] *= 1e-7
    frames = [codec.encode(x, CodecConfig("tabq", entropy="none", error_budget=budget, bit_widths=(2, 8), rotate_block=rotate))
              for budget in (1e-4, 1e-6)]
    bits = np.concatenate([codec.parse_frame(f).bits for f in frames])
    assert {codec.RAW_ROW, codec.RAW32_ROW} <= set(bits.tolist()) and (bits <= 8).any()
    batch = batch_frames(frames, DEVICE)
    want = torch.cat([codec.decode(f, "torch") for f in frames]).to(DEVICE)
    assert torch.equal(decode_rows_reference(batch), want)
    got = decode_rows_triton(batch)
    assert rel_err(got, want) <= TOL["kernel_frame_decode"]
    raw = torch.from_numpy(bits >= codec.RAW_ROW).to(DEVICE)
    assert torch.equal(got[raw], want[raw])  # raw rows are copied, bit for bit
    raw32 = torch.from_numpy(bits == codec.RAW32_ROW)
    assert torch.equal(want.cpu()[raw32], torch.from_numpy(np.concatenate([x, x]))[raw32])  # and raw fp32 rows are exact


def test_frame_decode_outliers_on_raw_fp16_rows_and_nan_raw_rows():
    """Outliers that older encoders listed on raw fp16 rows are applied; a NaN in a raw row is refused."""
    x = np.array([[1.0, 2.5, -3.0]], np.float32)
    raw16 = codec.encode(x, CodecConfig("tabq", entropy="none", bit_widths=(2,), error_budget=1e-9, ts_rule="none"))
    legacy = with_outlier(raw16, 1, 2.5)
    for impl in ("reference", "triton"):
        assert torch.equal(decode_frames([legacy], DEVICE, impl)[0].cpu(), torch.from_numpy(x))
    raw32 = bytearray(codec.encode(x * 1e-6, CodecConfig("tabq", entropy="none", bit_widths=(2,), error_budget=1e-12)))
    assert codec.parse_frame(bytes(raw32)).bits.tolist() == [codec.RAW32_ROW]
    struct.pack_into("<f", raw32, len(raw32) - 4, float("inf"))
    with pytest.raises(CodecError, match="non-finite .* in raw row 0"):
        decode_frames([bytes(raw32)], DEVICE, "reference")


def test_frame_decode_large_rotation_blocks_use_the_reference():
    """A frame may name a rotation block up to 2^15; the kernel's block x block tile would not fit."""
    frame = codec.encode(activations(2, 512, 3), CodecConfig("tabq", entropy="none", error_budget=0.01, rotate_block=512))
    batch = batch_frames([frame], DEVICE)
    assert batch.rotate == 512
    with pytest.raises(CodecError, match="rotation block 512 exceeds the frame kernel's 256"):
        decode_rows_triton(batch)
    assert torch.equal(decode_frames([frame], DEVICE, "triton")[0].cpu(), codec.decode(frame, "torch"))


def test_frame_decode_batch_errors():
    a = codec.encode(activations(2, 64, 0), CodecConfig("tabq", entropy="none"))
    b = codec.encode(activations(2, 96, 0), CodecConfig("tabq", entropy="none"))
    with pytest.raises(CodecError, match="frame 1 has"):
        batch_frames([a, b])
    with pytest.raises(CodecError, match="magic"):
        decode_frames([b"XX" + a[2:]], DEVICE, "triton")
    with pytest.raises(CodecError, match="no frames"):
        batch_frames([])
    fp16 = codec.encode(activations(2, 64, 0), CodecConfig("fp16"))
    mixed = decode_frames([fp16, a], DEVICE, "triton")  # fp16 frames pass through without the kernel
    assert torch.equal(mixed[0].cpu(), codec.decode(fp16, "torch"))
    if not INTERPRETED:  # CPU tensors to a compiled kernel: a clear error, not the driver's
        with pytest.raises(ConfigError, match="TRITON_INTERPRET"):
            decode_frames([a], "cpu", "triton")


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_frames_of_several_shapes_decode_in_one_call_without_reparsing(impl, monkeypatch):
    """Issue 14.4: the frames of a batcher turn may differ in group and rotation; one call decodes
    them (a launch per shape), from the layouts given, each exactly as the codec decodes it alone."""
    frames = [codec.encode(activations(t, 96, seed), cfg) for seed, (t, cfg) in enumerate([
        (1, CodecConfig("tabq", entropy="none", error_budget=0.02)), (4, CodecConfig("tabq", entropy="none", error_budget=0.02)),
        (3, CodecConfig("tabq", entropy="none", error_budget=0.05, group_size=32)), (1, CodecConfig("tabq", entropy="none", rotate_block=1)),
        (2, CodecConfig("fp16"))])]
    layouts = [codec.parse_frame(f) for f in frames]
    parsed = []
    real = codec.parse_frame
    monkeypatch.setattr(codec, "parse_frame", lambda *a, **kw: (parsed.append(1), real(*a, **kw))[1])
    parts = decode_frames(frames, DEVICE, impl, layouts=layouts)
    assert not parsed
    for f, lay, part in zip(frames, layouts, parts):
        want = codec.decode(f, "torch", lay).to(DEVICE)
        if impl == "reference":
            assert torch.equal(part, want)
        else:
            assert part.shape == want.shape and rel_err(part, want) <= TOL["kernel_frame_decode"]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("n,k", [(67, 157), (33, 256)])
def test_wq_matmul_matches_reference(bits, group, n, k):
    g = torch.Generator().manual_seed(bits * 1000 + group + n)
    q = rtn_quantize(torch.randn(n, k, generator=g), bits, group)
    w = pack_weight(q).to(DEVICE)
    assert torch.equal(unpack_codes(w).cpu(), q.codes)
    bias = torch.randn(n, generator=g).to(DEVICE)
    for m in (1, 5, 12, 19):  # decode-shaped (1, 5), GEMM with 16-row blocks (12) and 64-row ones (19)
        x = torch.randn(m, k, generator=g).to(DEVICE)
        ref = wq_matmul_reference(x, w, bias)
        # the reference is the quantizer's own dequantization
        assert torch.allclose(ref, x @ q.dequantize().to(DEVICE).t() + bias, rtol=TOL["wq_reference_vs_dequantized"], atol=TOL["wq_reference_vs_dequantized"])
        got = wq_matmul_triton(x, w, bias)
        assert got.shape == (m, n) and got.dtype == x.dtype
        assert rel_err(got, ref) <= TOL["kernel_wq_matmul_float32"], (m, rel_err(got, ref))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_wq_matmul_half_inputs(dtype):
    g = torch.Generator().manual_seed(3)
    w = pack_weight(rtn_quantize(torch.randn(48, 96, generator=g), 4, 32)).to(DEVICE)
    # the CPU interpreter's tl.dot on bfloat16 returns garbage (its numpy has no bfloat16): the
    # bf16 GEMM is checked on CUDA only
    interpreted = DEVICE == "cpu"
    for m in ((3,) if dtype == torch.bfloat16 and interpreted else (3, 17)):
        x = torch.randn(m, 96, generator=g).to(DEVICE, dtype)
        got, ref = wq_matmul_triton(x, w), wq_matmul_reference(x, w)
        assert got.dtype == dtype
        assert rel_err(got, ref) <= TOL[f"kernel_wq_matmul_{str(dtype).split('.')[1]}"]


def test_wq_matmul_checks_its_inputs():
    w = pack_weight(rtn_quantize(torch.randn(8, 64), 4, 32)).to(DEVICE)
    with pytest.raises(ConfigError, match="features"):
        wq_matmul_triton(torch.randn(2, 63, device=DEVICE), w)
    with pytest.raises(ConfigError, match="dtype"):
        wq_matmul_reference(torch.ones(2, 64, dtype=torch.int32, device=DEVICE), w)
    bad = PackedWeight(w.qweight, w.scales.float(), w.zeros, 4, 32, 64)
    with pytest.raises(ConfigError, match="scales must be float16"):
        wq_matmul_triton(torch.randn(2, 64, device=DEVICE), bad)
    with pytest.raises(ConfigError, match="take"):
        pack_weight(rtn_quantize(torch.randn(8, 64), 3, 32))


def test_dispatch_choice():
    assert dispatch.choose("auto", "cpu") == "reference"
    assert dispatch.choose("reference", "cpu") == "reference"
    if INTERPRETED:
        assert dispatch.choose("triton", "cpu") == "triton"
    else:
        with pytest.raises(ConfigError, match="TRITON_INTERPRET"):
            dispatch.choose("triton", "cpu")
        with pytest.raises(ConfigError, match="TRITON_INTERPRET"):
            wq_matmul_triton(torch.randn(1, 64), pack_weight(rtn_quantize(torch.randn(8, 64), 4, 32)))
    if DEVICE == "cuda":
        assert dispatch.choose("auto", "cuda") == "triton"
    with pytest.raises(ConfigError, match="not in"):
        dispatch.choose("fast", "cpu")


def test_tail_on_kernels_gives_the_reference_tokens(tiny_ckpt, tmp_path):
    """The cloud tail built on the Triton path (interpreter here) samples the reference's greedy tokens."""
    from splitlm.cloud.tail import TailRunner
    from splitlm.device.runtime import HeadSession, generate_split
    from splitlm.export import export_artifacts
    from splitlm.partition.plan import Plan
    from splitlm.quantize.config import WeightQuant

    L = tiny_ckpt.spec.num_layers
    plan = Plan(tiny_ckpt.model_id, tiny_ckpt.weights_hash, 1, device_weights=WeightQuant(8, 32),
                cloud_weights=WeightQuant(4, 32), lm_head_bits=8, codec=CodecConfig("tabq", entropy="none", error_budget=0.03),
                max_seq_len=64)
    result = export_artifacts(tiny_ckpt, plan, tmp_path / "a", progress=False)
    session = HeadSession(result.device_dir)
    prompt = [3, 17, 9, 40, 2, 11, 5]
    tokens = {}
    for impl in ("reference", "triton"):
        runner = TailRunner(result.cloud_dir, kernels=impl)
        assert runner.kernels == impl
        assert runner.kernel_linears == (7 * (L - 1) + 1 if impl == "triton" else 0)
        tokens[impl] = generate_split(session, runner.new_session().send, prompt, 12).token_ids
    assert tokens["triton"] == tokens["reference"]
