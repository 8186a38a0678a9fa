"""Transform coding with a calibrated basis and ANS (quantize/ans.py): the error budget is met row by row,
frames join without re-encoding, and every corrupt frame is a CodecError."""

from __future__ import annotations

import numpy as np
import pytest

from splitlm.errors import CodecError
from splitlm.quantize import ans, codec


def activations(n: int, d: int = 64, seed: int = 0) -> np.ndarray:
    """Correlated rows with a few constant massive channels, like a transformer's hidden states."""
    mix = np.random.default_rng(0).standard_normal((d, d)) * np.exp(-np.arange(d) / 16.0)[:, None]  # one decaying spectrum
    x = np.random.default_rng(seed).standard_normal((n, d)) @ mix
    x[:, 3] += 40.0
    x[:, 17] -= 25.0
    return x.astype(np.float32)


@pytest.fixture(scope="module")
def basis():
    return ans.Basis.fit(5, activations(2000))


@pytest.mark.parametrize("eps", [0.005, 0.035, 0.1])
def test_every_row_meets_its_budget_and_the_frame_is_small(basis, eps):
    x = activations(64, seed=1)
    frame = ans.encode(x, basis, eps)
    lay = codec.parse_frame(frame, kind="ans", dim=64)
    xh = ans.decode(frame, lay.ans, basis)
    c = x.astype(np.float64) - basis.mean
    err = ((x.astype(np.float64) - xh) ** 2).sum(1)
    assert (err <= eps * (c ** 2).sum(1) * (1 + 1e-4)).all()
    assert len(frame) < 64 * 64 * 2 / 2  # under half of fp16 even at the tightest budget
    assert (lay.ans.steps < ans.RAW16).all()


@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_the_float32_search_measures_the_error_the_decoder_makes(alpha):
    """The encoder's search (`_grid`, float32, its own formulas) gives the error and gains of `_code` (float64, the
    decoder's reconstruction) at every step it tries, weighted basis or not; a row codes the same alone as in a
    frame of any size."""
    b = ans.Basis.fit(5, activations(2000), alpha=alpha)
    x = activations(32, seed=7)
    y = np.stack([row @ b.vectors for row in x - b.mean])
    k = np.arange(len(y)) % 24 + ans.STEP_BIAS - 40  # coarse to fine steps
    _, gains, err = ans._grid(y, b, k, 0.2)
    q, gains64, yh, _ = ans._code(y.astype(np.float64), b, k, 0.2)
    err64 = np.square(y.astype(np.float64) - yh).sum(1)
    assert np.allclose(err, err64, rtol=1e-4, atol=0)  # within the search's margin (ans.MARGIN, 1e-3)
    assert (np.abs(gains.astype(int) - gains64) <= 1).all() and (gains == gains64).mean() > 0.95  # ties may round apart
    frame = ans.encode(x, b, 0.02)
    rows = codec.parse_frame(frame).ans
    for i in range(len(x)):
        alone = codec.parse_frame(ans.encode(x[i:i + 1], b, 0.02)).ans
        assert (alone.steps[0], bytes(alone.gains[0])) == (rows.steps[i], bytes(rows.gains[i]))


def test_a_tighter_budget_costs_more_bytes(basis):
    x = activations(64, seed=2)
    sizes = [len(ans.encode(x, basis, eps)) for eps in (0.1, 0.035, 0.01, 0.001)]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1] / 2


def test_rows_the_coder_cannot_carry_go_raw(basis):
    x = activations(4, seed=3)
    x[1] *= 1e4  # far outside the calibrated scale: still coded (the band gains follow the row)
    frame = ans.encode(x, basis, 0.0)  # no error allowed: every row exact, raw fp32 (fp16 misses)
    lay = codec.parse_frame(frame).ans
    assert (lay.steps == ans.RAW32).all()
    assert np.array_equal(ans.decode(frame, lay, basis), x)
    y = x[[0, 2, 3]].astype(np.float16).astype(np.float32)  # exactly representable in fp16: raw fp16 meets eps 0
    lay = codec.parse_frame(f := ans.encode(y, basis, 0.0)).ans
    assert (lay.steps == ans.RAW16).all() and np.array_equal(ans.decode(f, lay, basis), y)


def test_non_finite_activations_are_refused(basis):
    x = activations(2, seed=6)
    x[1, 5] = np.nan
    with pytest.raises(CodecError, match="NaN or Inf"):
        ans.encode(x, basis, 0.035)


def test_frames_join_without_re_encoding(basis):
    x = activations(40, seed=4)
    parts = [ans.encode(x[a:b], basis, 0.035) for a, b in ((0, 7), (7, 8), (8, 40))]
    joined = codec.concat_frames(parts)
    whole = ans.decode(joined, codec.parse_frame(joined).ans, basis)
    each = np.concatenate([ans.decode(p, codec.parse_frame(p).ans, basis) for p in parts])
    assert np.allclose(whole, each, rtol=1e-6, atol=1e-6)  # the same symbols; the basis product rounds by batch


@pytest.mark.parametrize("eps", [0.005, 0.035, 0.1])
def test_a_row_codes_the_same_alone_and_in_a_frame_of_several(basis, eps):
    """A decode step's one-row frame (the encoder's own path for it) and a speculative or prefill frame of several
    rows give a row the same step, gains and reconstruction: the cloud computes the same token either way. One
    row goes raw in both."""
    x = activations(24, seed=6)
    x[5, 9] = 3e9
    whole = ans.encode(x, basis, eps)
    lay = codec.parse_frame(whole).ans
    rows = ans.decode(whole, lay, basis)
    for i in range(len(x)):
        alone = ans.encode(x[i:i + 1], basis, eps)
        one = codec.parse_frame(alone).ans
        assert one.steps[0] == lay.steps[i] and (one.gains[0] == lay.gains[i]).all(), i
        np.testing.assert_allclose(ans.decode(alone, one, basis)[0], rows[i], rtol=1e-6, atol=1e-6 * np.abs(rows[i]).max())
    assert lay.steps[5] >= ans.RAW16


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_frames_of_one_layer_decode_as_one_batch(basis, backend):
    xs = [activations(t, seed=10 + t) for t in (1, 1, 3, 1, 7)]
    xs[2][1, 5] = 1e7  # a raw row (beyond fp16) inside the batch
    frames = [ans.encode(x, basis, 0.03) for x in xs]
    lays = [codec.parse_frame(f) for f in frames]
    assert lays[2].ans.steps[1] == ans.RAW32
    batched = codec.decode_many(frames, backend, lays, bases={5: basis})
    for frame, lay, got in zip(frames, lays, batched):
        alone = codec.decode(frame, backend, lay, bases={5: basis})
        assert np.asarray(got).shape == np.asarray(alone).shape
        assert np.allclose(np.asarray(got), np.asarray(alone), rtol=1e-6, atol=1e-6)
    # a frame the batch cannot decode is a CodecError naming it (the batcher then decodes the frames one by one)
    bad = ans.encode(xs[3], ans.Basis.fit(5, activations(500, seed=3)), 0.03)
    lays[3] = codec.parse_frame(bad)
    with pytest.raises(CodecError, match="frame 3 of the batch: the frame was coded with basis 5/"):
        codec.decode_many([*frames[:3], bad, frames[4]], backend, lays, bases={5: basis})


def test_a_frame_of_another_basis_or_read_alone_is_refused(basis):
    frame = ans.encode(activations(3, seed=5), basis, 0.035)
    other = ans.Basis.fit(5, activations(500, seed=9))
    with pytest.raises(CodecError, match="coded with basis 5/.* this side holds 5/"):
        ans.decode(frame, codec.parse_frame(frame).ans, other)
    with pytest.raises(CodecError, match="decodes against its calibrated basis"):
        codec.decode(frame)


def test_a_frame_whose_header_names_another_dim_than_its_basis_is_refused(basis):
    """Found by bench/fuzz_frames.py: a frame of dim 64 relabelled 60 (the same bands, so it parses) reshaped its
    symbols into the wrong width and raised ValueError."""
    frame = bytearray(ans.encode(activations(4, seed=6), basis, 0.035))
    fields = list(codec.HEADER.unpack_from(frame, 0))
    fields[-1] = 60
    codec.HEADER.pack_into(frame, 0, *fields)
    with pytest.raises(CodecError, match="rows of dim 60, its basis 5/.* codes dim 64"):
        codec.decode(bytes(frame), bases=basis)


def test_the_basis_round_trips_through_its_file(basis, tmp_path):
    basis.save(tmp_path / ans.BASIS_FILE)
    again = ans.Basis.load(tmp_path / ans.BASIS_FILE)
    assert again.digest == basis.digest and again.layer == 5
    (tmp_path / "bad.npz").write_bytes(b"not a basis")
    with pytest.raises(CodecError, match="cannot read the codec basis"):
        ans.Basis.load(tmp_path / "bad.npz")


def test_corrupt_frames_are_codec_errors(basis):
    """Seeded corruption (bytes flipped, frames cut short or padded) of real frames: every failure is a
    CodecError; a frame that still decodes decodes to finite values of the right shape."""
    rng = np.random.default_rng(0)
    frames = [ans.encode(activations(n, seed=10 + n), basis, eps) for n, eps in ((1, 0.035), (5, 0.01), (16, 0.1))]
    errors = 0
    for i in range(600):
        buf = bytearray(frames[i % len(frames)])
        how = i % 3
        if how == 0:
            for _ in range(int(rng.integers(1, 4))):
                buf[int(rng.integers(0, len(buf)))] ^= int(rng.integers(1, 256))
        elif how == 1:
            del buf[int(rng.integers(0, len(buf))):]
        else:
            buf += bytes(rng.integers(0, 256, int(rng.integers(1, 9)), dtype=np.uint8))
        try:
            lay = codec.parse_frame(bytes(buf), kind="ans", dim=64)
            x = ans.decode(bytes(buf), lay.ans, basis)
        except CodecError:
            errors += 1
            continue
        assert x.shape == (lay.rows, 64) and np.isfinite(x).all()
    assert errors > 300  # most corruptions are caught (a flipped bit inside a stream can decode to other symbols)


def test_the_codec_config_refuses_tabq_fields_that_ans_does_not_use():
    from splitlm.errors import PlanError
    from splitlm.quantize.config import CodecConfig

    assert codec.frame_kind(CodecConfig("tabq")) == "ans"  # tabq's default
    assert codec.frame_kind(CodecConfig("tabq", entropy="none")) == "tabq"
    with pytest.raises(PlanError, match="entropy applies to tabq rows; kind 'fp16'"):
        CodecConfig("fp16", entropy="none")
    with pytest.raises(PlanError, match="group_size, rotate_block do not apply to entropy 'ans'"):
        CodecConfig("tabq", entropy="ans", group_size=32, rotate_block=16)
    with pytest.raises(PlanError, match="deadzone applies to entropy 'ans' only"):
        CodecConfig("tabq", entropy="none", deadzone=0.1)
    with pytest.raises(PlanError, match="entropy 'zstd' not in"):
        CodecConfig("tabq", entropy="zstd")


def test_codec_encode_and_decode_take_the_basis_by_layer(basis):
    from splitlm.quantize.config import CodecConfig

    cfg = CodecConfig("tabq", entropy="ans", error_budget=0.035)
    x = activations(6, seed=7)
    with pytest.raises(CodecError, match="calibrated basis, and none was given"):
        codec.encode(x, cfg)
    frame = codec.encode(x, cfg, "numpy", basis)
    assert np.array_equal(codec.decode(frame, bases={5: basis}), codec.decode(frame, bases=basis))
    torch_x = codec.decode_many([frame, frame], "torch", bases={5: basis})  # the basis product in torch: float rounding
    assert all(np.allclose(t.numpy(), codec.decode(frame, bases=basis), rtol=1e-6, atol=1e-6) for t in torch_x)
    with pytest.raises(CodecError, match="coded at split layer 5, and this side holds codec bases for \\[3\\] only"):
        codec.decode(frame, bases={3: basis})


def test_in_process_split_codes_in_the_heads_own_basis(tiny_ckpt):
    """LocalSplit fits a basis per split on the head's outputs for calibration text; entropy 'ans' then sends far
    fewer bytes than fixed-width tabq (perplexity on SmolLM2: tests/test_smollm2.py)."""
    import torch

    from splitlm import corpus, evaluate
    from splitlm.local import LocalSplit, exact_plan
    from splitlm.quantize.config import CodecConfig

    wins = corpus.windows(tiny_ckpt.tokenizer(), corpus.protocol_text(), 2, 128)
    out = {}
    for entropy in ("none", "ans"):
        plan = exact_plan(tiny_ckpt, 2).replace(codec=CodecConfig("tabq", error_budget=0.035, entropy=entropy))
        runner = LocalSplit(tiny_ckpt, plan=plan)
        assert set(runner.bases) == ({2} if entropy == "ans" else set())
        out[entropy] = (evaluate.perplexity(runner.forward, wins, False).perplexity, runner.meter.bytes_per_token)
    assert out["ans"][1] < 0.8 * out["none"][1]
    assert torch.isfinite(torch.tensor(out["ans"][0]))


@pytest.fixture(scope="module")
def ans_export(tiny_ckpt, tmp_path_factory):
    """The tiny model split at 3, moving to 1 at 24 positions and back to 3 at 45, with the ans codec."""
    from splitlm.export import export_artifacts
    from splitlm.partition.plan import Plan
    from splitlm.quantize.config import CodecConfig

    plan = Plan(tiny_ckpt.model_id, tiny_ckpt.weights_hash, 3, codec=CodecConfig("tabq", error_budget=0.02, entropy="ans"),
                max_seq_len=96, prefill_chunk=8, split_moves=((24, 1), (45, 3)))
    return plan, export_artifacts(tiny_ckpt, plan, tmp_path_factory.mktemp("ans-export"), progress=False)


def test_an_export_carries_the_bases_and_a_moving_session_codes_in_each(ans_export, tiny_ckpt):
    """Both sides load the bases of every split the plan allows; the device codes each frame at its current split
    and the cloud decodes it there: over gRPC the tokens equal the in-process run's, moves included."""
    from splitlm.cloud.service import ServerConfig, start_server
    from splitlm.cloud.tail import TailRunner
    from splitlm.device.client import RemoteSession, connect
    from splitlm.device.runtime import HeadSession, generate_split
    from splitlm.sampling import SamplingParams

    plan, result = ans_export
    for folder in (result.device_dir, result.cloud_dir):
        assert set(ans.load_bases(folder / ans.BASIS_FILE)) == {1, 3}
    prompt = tiny_ckpt.tokenizer().encode("the split moves and the basis follows it " * 2).ids
    here = generate_split(HeadSession(result.device_dir), TailRunner(result.cloud_dir).new_session(), prompt, 40)
    assert [m["new"] for m in here.extra["moves"]] == [1, 3]
    srv, port, _ = start_server(TailRunner(result.cloud_dir), "127.0.0.1:0", ServerConfig(max_sessions=2))
    try:
        with RemoteSession(connect(f"127.0.0.1:{port}"), plan.hash, plan.model_id, SamplingParams(), 40) as remote:
            there = generate_split(HeadSession(result.device_dir), remote, prompt, 40)
    finally:
        srv.stop(grace=None)
    assert there.token_ids == here.token_ids


def test_a_frame_at_another_split_or_without_its_basis_is_refused(ans_export):
    import shutil

    from splitlm.cloud.tail import TailRunner
    from splitlm.device.runtime import HeadSession
    from splitlm.errors import ModelLoadError

    plan, result = ans_export
    tail = TailRunner(result.cloud_dir).new_session()
    at_one = ans.encode(activations(2, d=result_dim(result)), ans.load_bases(result.cloud_dir / ans.BASIS_FILE)[1], 0.02)
    with pytest.raises(CodecError, match="coded at split layer 1, and this session runs from layer 3"):
        tail.send(at_one, 2)
    broken = result.device_dir.parent.parent / "no-basis"
    shutil.copytree(result.device_dir, broken / "device")
    (broken / "device" / ans.BASIS_FILE).unlink()
    with pytest.raises(ModelLoadError, match="codec_basis.npz is missing"):
        HeadSession(broken / "device")


def result_dim(result) -> int:
    import json

    return json.loads((result.cloud_dir / "spec.json").read_text())["hidden_size"]


def test_bad_ans_frames_over_grpc_fail_only_their_session(ans_export, tiny_ckpt):
    """Over the service: an ans frame of another basis, one cut short and one coded at another split each end only
    their own session, with INVALID_ARGUMENT naming what is wrong; a healthy session beside them runs on."""
    from splitlm.cloud.service import ServerConfig, start_server
    from splitlm.cloud.tail import TailRunner
    from splitlm.device.client import RemoteSession, connect
    from splitlm.device.runtime import HeadSession, generate_split
    from splitlm.errors import RemoteError
    from splitlm.sampling import SamplingParams

    plan, result = ans_export
    d = result_dim(result)
    bases = ans.load_bases(result.cloud_dir / ans.BASIS_FILE)
    x = activations(1, d=d, seed=3)
    good = ans.encode(x, bases[3], 0.02)
    bad = {"another basis": (ans.encode(x, ans.Basis.fit(3, activations(300, d=d, seed=4)), 0.02), "coded with basis 3/"),
           "cut short": (good[:-3], "must be"),
           "another split": (ans.encode(x, bases[1], 0.02), "coded at split layer 1, and this session runs from layer 3")}
    srv, port, _ = start_server(TailRunner(result.cloud_dir), "127.0.0.1:0", ServerConfig(max_sessions=4))
    channel = connect(f"127.0.0.1:{port}")
    try:
        healthy = RemoteSession(channel, plan.hash, plan.model_id, SamplingParams(), 8)
        for name, (frame, message) in bad.items():
            session = RemoteSession(channel, plan.hash, plan.model_id, SamplingParams(), 8)
            with pytest.raises(RemoteError, match=message) as info:
                session.send(frame, 1)
            assert info.value.code == "INVALID_ARGUMENT", name
        prompt = tiny_ckpt.tokenizer().encode("a healthy neighbour").ids
        assert len(generate_split(HeadSession(result.device_dir), healthy, prompt, 8).token_ids) == 8
        healthy.close()
    finally:
        channel.close()
        srv.stop(grace=None)
