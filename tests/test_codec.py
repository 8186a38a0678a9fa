"""The activation codec: round trips within budget, numpy == torch bit for bit, malformed frames rejected."""

import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from splitlm.errors import CodecError
from splitlm.partition.plan import CODEC_BITS, CodecConfig
from splitlm.quantize import codec


def rows_strategy(outliers: bool):
    @st.composite
    def build(draw):
        T = draw(st.integers(1, 9))
        d = draw(st.integers(1, 300))
        seed = draw(st.integers(0, 2**31))
        scale = draw(st.sampled_from([1e-3, 1.0, 30.0]))
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
    CodecConfig, kind=st.just("tabq"), ts_rule=st.sampled_from(["none", "std"]), ts_threshold=st.sampled_from([3.0, 6.0]),
    error_budget=st.sampled_from([1e-4, 1e-3, 1e-2, 5e-2]),
    bit_widths=st.sets(st.sampled_from(CODEC_BITS), min_size=1).map(lambda s: tuple(sorted(s))),
    group_size=st.sampled_from([0, 16, 64]), rotate_block=st.sampled_from([0, 8, 64]),
    clip_ratios=st.sampled_from([(1.0,), (1.0, 0.8, 0.6)]))


def rel_err(x, y):
    den = (x.astype(np.float64) ** 2).sum(1)
    return ((x.astype(np.float64) - y) ** 2).sum(1) / np.where(den > 0, den, 1)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(x=st.one_of(rows_strategy(False), rows_strategy(True)), cfg=configs)
def test_round_trip_error_within_budget(x, cfg):
    frame = codec.encode(x, cfg)
    y = codec.decode(frame)
    assert y.shape == x.shape and y.dtype == np.float32
    assert (rel_err(x, y) <= cfg.error_budget * (1 + 1e-4) + 1e-9).all()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(x=st.one_of(rows_strategy(False), rows_strategy(True)), cfg=configs)
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
    with_ts = codec.encode(x, CodecConfig("tabq", ts_rule="std", error_budget=1e-2))
    without = codec.encode(x, CodecConfig("tabq", ts_rule="none", error_budget=1e-2))
    y = codec.decode(with_ts)
    assert np.array_equal(y[:, [3, 400]], x[:, [3, 400]].astype(np.float16).astype(np.float32))
    assert codec.frame_stats(with_ts).outliers_per_token >= 2
    assert len(with_ts) < len(without)


def test_channels_rule():
    x = np.random.default_rng(2).standard_normal((4, 64)).astype(np.float32)
    frame = codec.encode(x, CodecConfig("tabq", ts_rule="channels", ts_channels=(1, 7)))
    assert codec.frame_stats(frame).outliers_per_token == 2
    with pytest.raises(CodecError, match="outlier channel 70 is outside"):
        codec.encode(x, CodecConfig("tabq", ts_rule="channels", ts_channels=(70,)))


def test_budget_beyond_reach_falls_back_to_raw_rows():
    x = np.random.default_rng(3).standard_normal((3, 100)).astype(np.float32)
    frame = codec.encode(x, CodecConfig("tabq", bit_widths=(2,), error_budget=1e-6))
    lay = codec.parse_frame(frame)
    assert (lay.bits == codec.RAW_ROW).all()
    assert (rel_err(x, codec.decode(frame)) <= 1e-6).all()


def test_adaptive_bits_follow_difficulty():
    rng = np.random.default_rng(4)
    easy = np.tile(np.linspace(-1, 1, 4).astype(np.float32), 64)  # 4 levels: 2 bits suffice
    hard = rng.standard_normal(256).astype(np.float32)
    cfg = CodecConfig("tabq", ts_rule="none", error_budget=1e-4, rotate_block=0, clip_ratios=(1.0,))
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
        codec.encode(bad, CodecConfig("tabq"))


@pytest.fixture
def good_frame():
    x = np.random.default_rng(5).standard_normal((6, 64)).astype(np.float32)
    x[:, 4] = 90
    return codec.encode(x, CodecConfig("tabq", error_budget=1e-2))


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
        "invalid": codec.HEADER.pack(codec.MAGIC, 1, 2, 0, 0, 0, 0, d),
        "rotation block": good_frame[:6] + bytes([7]) + good_frame[7:],
    }
    nan = bytearray(good_frame)
    struct.pack_into("<e", nan, H + 3 * T, float("nan"))  # first scale
    cases["non-finite"] = bytes(nan)
    n_out = bytearray(good_frame)
    struct.pack_into("<H", n_out, H + T, d + 1)
    cases["claims"] = bytes(n_out)
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
    plain = CodecConfig("tabq", ts_rule="none", bit_widths=(3,), error_budget=1, rotate_block=0, clip_ratios=(1.0,))
    rotated = CodecConfig("tabq", ts_rule="none", bit_widths=(3,), error_budget=1, rotate_block=64, clip_ratios=(1.0,))
    e_plain = rel_err(x, codec.decode(codec.encode(x, plain))).mean()
    e_rot = rel_err(x, codec.decode(codec.encode(x, rotated))).mean()
    assert e_rot < 0.7 * e_plain


def test_clip_search_never_worse_than_minmax():
    x = np.random.default_rng(7).standard_normal((32, 128)).astype(np.float32)
    base = dict(kind="tabq", ts_rule="none", bit_widths=(2,), error_budget=1, rotate_block=0)
    e1 = rel_err(x, codec.decode(codec.encode(x, CodecConfig(**base, clip_ratios=(1.0,)))))
    e2 = rel_err(x, codec.decode(codec.encode(x, CodecConfig(**base, clip_ratios=(1.0, 0.8, 0.6)))))
    assert (e2 <= e1 + 1e-7).all() and e2.mean() < e1.mean()
