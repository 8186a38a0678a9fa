"""The activation codec: round trips within budget, numpy == torch bit for bit, malformed frames rejected."""

import importlib.util
import struct
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from splitlm.errors import CodecError
from splitlm.quantize import codec
from splitlm.quantize.config import CODEC_BITS, CodecConfig
from tests.tolerances import TOL


def rows_strategy(outliers: bool):
    @st.composite
    def build(draw):
        T = draw(st.integers(1, 9))
        d = draw(st.integers(1, 300))
        seed = draw(st.integers(0, 2**31))
        scale = draw(st.sampled_from([1e-6, 1e-3, 1.0, 30.0]))  # 1e-6: fp16's subnormal range
        rng = np.random.default_rng(seed)
        x = (rng.standard_normal((T, d)) * scale).astype(np.float32)
        if outliers and d > 4:
            chans = rng.choice(d, size=min(3, d // 4), replace=False)
            x[:, chans] *= draw(st.sampled_from([20.0, 200.0]))
        if draw(st.booleans()):
            x[0] = 0.0  # an all-zero row
        return x
    return build()


configs = st.builds(
    CodecConfig, kind=st.just("tabq"), entropy=st.just("none"), ts_rule=st.sampled_from(["none", "std"]),
    ts_threshold=st.sampled_from([3.0, 6.0]),
    error_budget=st.sampled_from([1e-4, 1e-3, 1e-2, 5e-2]),
    bit_widths=st.sets(st.sampled_from(CODEC_BITS), min_size=1).map(lambda s: tuple(sorted(s))),
    group_size=st.sampled_from([0, 16, 64]), rotate_block=st.sampled_from([0, 8, 64]),
    clip_ratios=st.sampled_from([(1.0,), (1.0, 0.8, 0.6)]))


def rel_err(x, y):
    den = (x.astype(np.float64) ** 2).sum(1)
    return ((x.astype(np.float64) - y) ** 2).sum(1) / np.where(den > 0, den, 1)


SUBNORMAL_ROW = np.array([[2e-6, -7.4e-7]], np.float32)
"""Issue 13's flake: in fp16 (subnormal there) this row's relative error is 2.9e-4, above ε = 1e-4."""

# Every input a property test ever failed on (flakes included), replayed first on every run.
FLAKE_EXAMPLES = [
    dict(x=SUBNORMAL_ROW, cfg=CodecConfig("tabq", entropy="none", error_budget=1e-4)),
    dict(x=SUBNORMAL_ROW, cfg=CodecConfig("tabq", entropy="none", ts_rule="none", error_budget=1e-4, bit_widths=(2,), rotate_block=0,
                                          clip_ratios=(1.0,))),
]


def flake_examples(test):
    """`test` with an @example for each of FLAKE_EXAMPLES."""
    for kwargs in FLAKE_EXAMPLES:
        test = example(**kwargs)(test)
    return test


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(x=st.one_of(rows_strategy(False), rows_strategy(True)), cfg=configs)
@flake_examples
def test_round_trip_error_within_budget(x, cfg):
    frame = codec.encode(x, cfg)
    y = codec.decode(frame)
    assert y.shape == x.shape and y.dtype == np.float32
    assert (rel_err(x, y) <= cfg.error_budget * (1 + TOL["codec_budget_rel"]) + TOL["codec_budget_abs"]).all()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(x=st.one_of(rows_strategy(False), rows_strategy(True)), cfg=configs)
@flake_examples
def test_numpy_and_torch_are_bit_identical(x, cfg):
    frame_np = codec.encode(x, cfg, "numpy")
    frame_t = codec.encode(x, cfg, "torch")
    assert frame_np == frame_t
    a = codec.decode(frame_np, "numpy")
    b = codec.decode(frame_np, "torch").numpy()
    assert np.array_equal(a.view(np.uint32), b.view(np.uint32))


@pytest.mark.parametrize("kind", ["fp32", "fp16"])
def test_raw_kinds(kind):
    x = np.random.default_rng(0).standard_normal((5, 33)).astype(np.float32)
    y = codec.decode(codec.encode(x, CodecConfig(kind)))
    expected = x if kind == "fp32" else x.astype(np.float16).astype(np.float32)
    assert np.array_equal(y, expected)


def test_outliers_are_sent_exactly_and_shrink_frames():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((32, 576)).astype(np.float32)
    x[:, [3, 400]] = 500.0 + rng.standard_normal((32, 2)).astype(np.float32)
    with_ts = codec.encode(x, CodecConfig("tabq", entropy="none", ts_rule="std", error_budget=1e-2))
    without = codec.encode(x, CodecConfig("tabq", entropy="none", ts_rule="none", error_budget=1e-2))
    y = codec.decode(with_ts)
    assert np.array_equal(y[:, [3, 400]], x[:, [3, 400]].astype(np.float16).astype(np.float32))
    assert codec.frame_stats(with_ts).outliers_per_token >= 2
    assert len(with_ts) < len(without)


def test_channels_rule():
    x = np.random.default_rng(2).standard_normal((4, 64)).astype(np.float32)
    frame = codec.encode(x, CodecConfig("tabq", entropy="none", ts_rule="channels", ts_channels=(1, 7)))
    assert codec.frame_stats(frame).outliers_per_token == 2
    with pytest.raises(CodecError, match="outlier channel 70 is outside"):
        codec.encode(x, CodecConfig("tabq", entropy="none", ts_rule="channels", ts_channels=(70,)))


def test_subnormal_row_meets_the_budget():
    """Issue 13: the raw fp16 fallback missed ε on this row (2.9e-4 > 1e-4); it goes as raw fp32 now."""
    cfg = CodecConfig("tabq", entropy="none", error_budget=1e-4)
    assert rel_err(SUBNORMAL_ROW, SUBNORMAL_ROW.astype(np.float16).astype(np.float32))[0] > 2.8e-4
    frame = codec.encode(SUBNORMAL_ROW, cfg)
    assert rel_err(SUBNORMAL_ROW, codec.decode(frame))[0] <= 1e-4
    assert codec.parse_frame(frame).bits.tolist() == [codec.RAW32_ROW]
    assert np.array_equal(codec.decode(frame), SUBNORMAL_ROW)
    assert np.array_equal(codec.decode(frame, "torch").numpy(), SUBNORMAL_ROW)
    assert codec.encode(SUBNORMAL_ROW, cfg, "torch") == frame


@pytest.mark.parametrize("budget, width", [(1e-6, codec.RAW_ROW), (1e-12, codec.RAW32_ROW)])
def test_raw_rows_meet_the_budget_and_carry_no_outliers(budget, width):
    """fp16 rows where fp16 meets ε, fp32 rows where it does not; neither lists its outliers apart."""
    x = np.random.default_rng(8).standard_normal((3, 100)).astype(np.float32)
    x[:, [4, 50]] *= 200.0  # outliers by the std rule
    frame = codec.encode(x, CodecConfig("tabq", entropy="none", ts_rule="std", bit_widths=(2,), error_budget=budget))
    lay = codec.parse_frame(frame)
    assert (lay.bits == width).all() and not lay.n_out.any() and len(frame) == lay.payload_offset + 3 * 100 * width // 8
    expected = x.astype(np.float16).astype(np.float32) if width == codec.RAW_ROW else x
    assert np.array_equal(codec.decode(frame), expected)
    assert (rel_err(x, codec.decode(frame)) <= budget).all()


def test_rows_fall_back_to_raw_one_by_one():
    """A row whose scale overflows fp16 goes raw alone; before, every row of its frame did."""
    x = np.stack([np.full(64, 60000.0), np.random.default_rng(9).standard_normal(64)]).astype(np.float32)
    cfg = CodecConfig("tabq", entropy="none", ts_rule="none", bit_widths=(2,), error_budget=1.0, rotate_block=64, clip_ratios=(1.0,))
    frame = codec.encode(x, cfg)  # row 0 rotates to (480000, 0, ...): its 2-bit scale is 160000, inf in fp16
    assert codec.parse_frame(frame).bits.tolist() == [codec.RAW_ROW, 2]
    assert frame == codec.encode(x, cfg, "torch")
    assert (rel_err(x, codec.decode(frame)) <= 1.0).all()


def with_outlier(frame: bytes, channel: int, value: float) -> bytes:
    """A one-row tabq frame with one outlier (channel, fp16 value) listed on its row."""
    lay = codec.parse_frame(frame)
    assert lay.rows == 1 and not lay.n_out.any()
    head = bytearray(frame[:lay.payload_offset])
    struct.pack_into("<H", head, codec.HEADER.size + 1, 1)
    return bytes(head) + struct.pack("<He", channel, value) + frame[lay.payload_offset:]


def test_outliers_on_raw_rows():
    """Rejected on a raw fp32 row; applied on a raw fp16 row (encoders before raw fp32 rows listed them)."""
    with pytest.raises(CodecError, match="raw fp32 row 0 lists 1 outliers, must list 0"):
        codec.parse_frame(with_outlier(codec.encode(SUBNORMAL_ROW, CodecConfig("tabq", entropy="none", error_budget=1e-4)), 0, 0.0))
    x = np.array([[1.0, 2.5, -3.0]], np.float32)
    raw16 = codec.encode(x, CodecConfig("tabq", entropy="none", bit_widths=(2,), error_budget=1e-9, ts_rule="none"))
    assert codec.parse_frame(raw16).bits.tolist() == [codec.RAW_ROW]
    legacy = with_outlier(raw16, 1, 2.5)
    assert np.array_equal(codec.decode(legacy), x)
    assert np.array_equal(codec.decode(legacy, "torch").numpy(), x)


@pytest.mark.parametrize("width", [codec.RAW_ROW, codec.RAW32_ROW])
def test_raw_row_with_nan_rejected_by_the_parser(width):
    x = np.array([[1.0, 2.5], [3.0, -4.0]], np.float32)
    x[1] *= 1e-6 if width == codec.RAW32_ROW else 1.0
    budget = 1e-12 if width == codec.RAW32_ROW else 1e-9
    frame = bytearray(codec.encode(x, CodecConfig("tabq", entropy="none", bit_widths=(2,), error_budget=budget)))
    lay = codec.parse_frame(bytes(frame))
    assert lay.bits[1] == width
    struct.pack_into("<e" if width == codec.RAW_ROW else "<f", frame, int(lay.row_offsets[1]) + width // 8, float("nan"))
    with pytest.raises(CodecError, match="non-finite .* in raw row 1"):
        codec.parse_frame(bytes(frame))


def test_budget_beyond_reach_falls_back_to_raw_rows():
    x = np.random.default_rng(3).standard_normal((3, 100)).astype(np.float32)
    frame = codec.encode(x, CodecConfig("tabq", entropy="none", bit_widths=(2,), error_budget=1e-6))
    lay = codec.parse_frame(frame)
    assert (lay.bits == codec.RAW_ROW).all()
    assert (rel_err(x, codec.decode(frame)) <= 1e-6).all()


def test_adaptive_bits_follow_difficulty():
    rng = np.random.default_rng(4)
    easy = np.tile(np.linspace(-1, 1, 4).astype(np.float32), 64)  # 4 levels: 2 bits suffice
    hard = rng.standard_normal(256).astype(np.float32)
    cfg = CodecConfig("tabq", entropy="none", ts_rule="none", error_budget=1e-4, rotate_block=0, clip_ratios=(1.0,))
    lay = codec.parse_frame(codec.encode(np.stack([easy, hard]), cfg))
    assert lay.bits[0] < lay.bits[1]


@pytest.mark.parametrize("bad, message", [
    (np.array([[1.0, np.nan]], np.float32), "NaN or Inf"),
    (np.array([[1.0, 1e6]], np.float32), "fp16 range"),
    (np.zeros((2, 3, 4), np.float32), "shape"),
    (np.zeros((0, 4), np.float32), "shape"),
])
def test_encoder_rejects_bad_input(bad, message):
    with pytest.raises(CodecError, match=message):
        codec.encode(bad, CodecConfig("tabq", entropy="none"))


@pytest.fixture
def good_frame():
    x = np.random.default_rng(5).standard_normal((6, 64)).astype(np.float32)
    x[:, 4] = 90
    return codec.encode(x, CodecConfig("tabq", entropy="none", error_budget=1e-2))


def test_malformed_frames_rejected(good_frame):
    lay = codec.parse_frame(good_frame)
    T, d = lay.rows, lay.dim
    H = codec.HEADER.size
    cases = {
        "shorter than": good_frame[:10],
        "magic": b"XX" + good_frame[2:],
        "version 9": good_frame[:2] + bytes([9]) + good_frame[3:],
        "kind 7": good_frame[:3] + bytes([7]) + good_frame[4:],
        "must be": good_frame[:-1],
        "must be ": good_frame + b"\0",
        "bit width 7": good_frame[:H] + bytes([7]) + good_frame[H + 1:],
        "truncated": good_frame[:20],
        "invalid": codec.HEADER.pack(codec.MAGIC, codec.FRAME_VERSION, 2, 0, 0, 0, 0, d),
        "rotation block": good_frame[:6] + bytes([7]) + good_frame[7:],
        "reserved header byte is 3, must be 0": good_frame[:7] + bytes([3]) + good_frame[8:],
    }
    nan = bytearray(good_frame)
    struct.pack_into("<e", nan, H + 3 * T, float("nan"))  # first scale
    cases["non-finite"] = bytes(nan)
    n_out = bytearray(good_frame)
    struct.pack_into("<H", n_out, H + T + 2, d + 1)  # row 1
    cases[f"row 1 claims {d + 1} outliers in {d} channels"] = bytes(n_out)
    for message, frame in cases.items():
        with pytest.raises(CodecError, match=message.strip()):
            codec.decode(frame)


def test_outlier_index_out_of_range(good_frame):
    lay = codec.parse_frame(good_frame)
    T, G = lay.rows, lay.groups
    N = int(lay.n_out.sum())
    assert N > 0
    buf = bytearray(good_frame)
    struct.pack_into("<H", buf, codec.HEADER.size + 3 * T + 4 * T * G, 999)
    with pytest.raises(CodecError, match="outside"):
        codec.decode(bytes(buf))


def test_raw_frame_with_nan_rejected():
    frame = bytearray(codec.encode(np.ones((2, 3), np.float32), CodecConfig("fp16")))
    struct.pack_into("<e", frame, codec.HEADER.size, float("inf"))
    with pytest.raises(CodecError, match="non-finite"):
        codec.decode(bytes(frame))


def test_row_limit():
    frame = codec.encode(np.ones((5, 3), np.float32), CodecConfig("fp16"))
    with pytest.raises(CodecError, match="limit is 4"):
        codec.decode(frame, max_rows=4)


def test_rotation_lowers_error_on_heavy_tailed_rows():
    x = np.random.default_rng(6).laplace(size=(64, 256)).astype(np.float32)
    plain = CodecConfig("tabq", entropy="none", ts_rule="none", bit_widths=(3,), error_budget=1, rotate_block=0, clip_ratios=(1.0,))
    rotated = CodecConfig("tabq", entropy="none", ts_rule="none", bit_widths=(3,), error_budget=1, rotate_block=64, clip_ratios=(1.0,))
    e_plain = rel_err(x, codec.decode(codec.encode(x, plain))).mean()
    e_rot = rel_err(x, codec.decode(codec.encode(x, rotated))).mean()
    assert e_rot < 0.7 * e_plain


def test_clip_search_never_worse_than_minmax():
    x = np.random.default_rng(7).standard_normal((32, 128)).astype(np.float32)
    base = dict(kind="tabq", entropy="none", ts_rule="none", bit_widths=(2,), error_budget=1, rotate_block=0)
    e1 = rel_err(x, codec.decode(codec.encode(x, CodecConfig(**base, clip_ratios=(1.0,)))))
    e2 = rel_err(x, codec.decode(codec.encode(x, CodecConfig(**base, clip_ratios=(1.0, 0.8, 0.6)))))
    assert (e2 <= e1 + TOL["codec_error_abs"]).all() and e2.mean() < e1.mean()


def load_fuzz_harness():
    """bench/fuzz_frames.py as a module (it imports atheris only when run as the fuzzer)."""
    spec = importlib.util.spec_from_file_location("fuzz_frames", Path(__file__).parents[1] / "bench" / "fuzz_frames.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


INTERESTING = (0, 1, 2, 7, 8, 15, 16, 31, 32, 33, 64, 127, 128, 255, 0x7C, 0xFC, 0x7E)  # incl. fp16 Inf/NaN high bytes


def mutate(frame: bytes, rng: np.random.Generator) -> bytes:
    """1 to 3 random edits of `frame`, most of them in its header and side information."""
    buf = bytearray(frame)
    for _ in range(int(rng.integers(1, 4))):
        where = int(rng.integers(0, min(len(buf), 64) if rng.random() < 0.7 else len(buf))) if buf else 0
        op = int(rng.integers(0, 6))
        if op == 0 and buf:
            buf[where] ^= 1 << int(rng.integers(0, 8))
        elif op == 1 and buf:
            buf[where] = INTERESTING[int(rng.integers(0, len(INTERESTING)))]
        elif op == 2 and where + 2 <= len(buf):
            struct.pack_into("<H", buf, where, int(rng.choice([0, 1, 16, 32, 255, 256, 0x7BFF, 0xFFFF])))
        elif op == 3:
            del buf[where:where + int(rng.integers(1, 9))]
        elif op == 4:
            buf[where:where] = rng.integers(0, 256, int(rng.integers(1, 9)), dtype=np.uint8).tobytes()
        elif buf:
            start = int(rng.integers(0, len(buf)))
            buf[where:where + 4] = buf[start:start + 4]
    return bytes(buf)


def test_mutated_frames_decode_or_raise_codec_error():
    """Seeded, bounded fuzzing in the suite: 2,000 mutated frames; bench/fuzz_frames.py is the unbounded,
    coverage-guided version. Each decodes (finite, the header's shape, equal in every decoder) or every
    decoder raises CodecError."""
    harness = load_fuzz_harness()
    check = harness.FrameChecker()
    seeds = harness.seed_frames()
    for frame in seeds:
        assert check(frame)
    rng = np.random.default_rng(13)
    start = time.perf_counter()
    for i in range(2000):
        check(mutate(seeds[i % len(seeds)], rng))
    assert check.decoded > 100 and sum(check.rejected.values()) > 1000, check.summary(time.perf_counter() - start)
    assert len(check.rejected) >= 10  # many different checks fired, not one early one


# -- issue 14.4: frames decoded as one batch, parsed once ----------------------------------------------
def _mixed_frames() -> list[bytes]:
    """Frames of several shapes: tabq at one (dim, group, rotation) with outliers and raw rows,
    another group, no rotation, another dim, and fp16 / fp32."""
    rng = np.random.default_rng(14)

    def x(rows, d=96):
        a = rng.standard_normal((rows, d)).astype(np.float32)
        a[:, 5] *= 80.0  # outliers by the std rule
        return a

    tabq = CodecConfig("tabq", entropy="none", error_budget=0.01)
    frames = [codec.encode(x(r), tabq) for r in (1, 7, 1, 3)]
    frames.append(codec.encode(x(2), CodecConfig("tabq", entropy="none", error_budget=1e-12)))  # raw fp32 rows
    frames.append(codec.encode(x(2), CodecConfig("tabq", entropy="none", error_budget=1e-6, bit_widths=(2,))))  # raw fp16 rows
    frames.append(codec.encode(x(4), CodecConfig("tabq", entropy="none", error_budget=0.01, group_size=32)))
    frames.append(codec.encode(x(3), CodecConfig("tabq", entropy="none", error_budget=0.01, rotate_block=0)))
    frames.append(codec.encode(x(2, 40), tabq))
    frames += [codec.encode(x(2), CodecConfig("fp16")), codec.encode(x(1), CodecConfig("fp32"))]
    return frames


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_decode_many_is_decode_of_each_bit_for_bit(backend, monkeypatch):
    frames = _mixed_frames()
    layouts = [codec.parse_frame(f) for f in frames]
    assert len({(lay.dim, lay.group, lay.rotate) for lay in layouts if lay.kind == "tabq"}) == 4
    alone = [codec.decode(f, backend, lay) for f, lay in zip(frames, layouts)]
    parsed, batches = [], []
    real, rows = codec.parse_frame, codec._decode_rows
    monkeypatch.setattr(codec, "parse_frame", lambda *a, **kw: (parsed.append(1), real(*a, **kw))[1])
    monkeypatch.setattr(codec, "_decode_rows", lambda *a: (batches.append(len(a[2])), rows(*a))[1])
    together = codec.decode_many(frames, backend, layouts)
    assert not parsed  # the layouts given are not parsed again
    assert sorted(batches) == [2, 3, 4, 16]  # one batch of rows per tabq shape: 1+7+1+3+2+2 rows together
    assert len(together) == len(frames)
    for a, b in zip(alone, together):
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == b.dtype == np.float32 and a.shape == b.shape and np.array_equal(a, b)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(together, codec.decode_many(frames, backend)))
    assert len(parsed) == len(frames)  # without layouts: each frame parsed once


def test_decode_many_refuses_layouts_that_do_not_match_the_frames():
    frames = _mixed_frames()[:3]
    with pytest.raises(CodecError, match="3 frames come with 2 layouts"):
        codec.decode_many(frames, "numpy", [codec.parse_frame(f) for f in frames[:2]])


def test_parse_frame_refuses_the_wrong_hidden_size_or_kind_from_the_header():
    frame = codec.encode(np.ones((2, 64), np.float32), CodecConfig("tabq", entropy="none"))
    truncated = frame[: codec.HEADER.size + 3]
    with pytest.raises(CodecError, match="truncated"):
        codec.parse_frame(truncated)
    with pytest.raises(CodecError, match="frame hidden size 64 does not match the model's 96"):
        codec.parse_frame(truncated, dim=96)  # refused before the side information is read
    with pytest.raises(CodecError, match="frame kind 'tabq' is not the plan's codec 'fp16'"):
        codec.parse_frame(truncated, kind="fp16")
    assert codec.parse_frame(frame, 2, "tabq", 64).rows == 2


@settings(deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 5, 6, 8]), lead=st.integers(1, 3), n=st.integers(1, 70), seed=st.integers(0, 2**16))
def test_bitpack_round_trips_identically_on_numpy_and_torch(bits, lead, n, seed):
    """One layout for every packer: LSB-first bits along the last axis, the same bytes from both backends."""
    import torch

    from splitlm.quantize import bitpack
    from splitlm.quantize.codec_torch import TorchOps

    codes = np.random.default_rng(seed).integers(0, 2**bits, (lead, n)).astype(np.uint8)
    packed = bitpack.pack(codes, bits)
    assert packed.shape == (lead, bitpack.packed_width(n, bits)) and packed.dtype == np.uint8
    stream = np.unpackbits(packed, axis=-1, bitorder="little")[:, : n * bits].reshape(lead, n, bits)
    assert (stream @ (1 << np.arange(bits)) == codes).all()  # code j is stream bits [j·b, (j+1)·b), LSB first
    assert (bitpack.unpack(packed, n, bits) == codes).all()
    on_torch = bitpack.pack(torch.from_numpy(codes), bits, TorchOps())
    assert (on_torch.numpy() == packed).all()
    assert (bitpack.unpack(on_torch, n, bits, TorchOps()).numpy() == codes).all()


@pytest.mark.parametrize("kind", ["fp32", "fp16", "tabq"])
def test_concatenated_frames_decode_to_the_concatenated_rows(kind):
    """Replay sends a session's frames as a few large ones: byte-level concatenation, no re-encoding."""
    from splitlm.quantize import codec
    from splitlm.quantize.config import CodecConfig

    rng = np.random.default_rng(3)
    cfg = CodecConfig(kind, error_budget=0.02, entropy="none") if kind == "tabq" else CodecConfig(kind)
    parts = [rng.standard_normal((t, 64)).astype(np.float32) * rng.uniform(0.1, 30) for t in (5, 1, 1, 9)]
    parts[1][0, 7] = 400.0  # an outlier
    frames = [codec.encode(x, cfg) for x in parts]
    merged = codec.concat_frames(frames)
    assert codec.parse_frame(merged).rows == 16
    np.testing.assert_array_equal(codec.decode(merged), np.concatenate([codec.decode(f) for f in frames]))
    other = codec.encode(parts[0], CodecConfig("fp16" if kind != "fp16" else "fp32"))
    with pytest.raises(CodecError, match="does not match frame 0"):
        codec.concat_frames([frames[0], other])
