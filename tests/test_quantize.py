"""Weight and KV quantization: real codes, half-step error, GPTQ beats RTN, per-segment precision."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from splitlm.errors import ConfigError
from splitlm.local import LocalSplit
from splitlm.partition.plan import Plan
from splitlm.quantize.apply import LINEARS, quantize_stage
from splitlm.quantize.config import CodecConfig, WeightQuant
from splitlm.quantize.gptq import HessianAccumulator, gptq_quantize
from splitlm.quantize.weights import QuantLinear, rtn_quantize
from tests.tolerances import TOL


def half_step_ok(w, q):
    deq = q.dequantize()
    cols = torch.arange(w.shape[1]) // q.group_size
    step = q.scales.float()[:, cols]
    return bool(((w - deq).abs() <= step / 2 * (1 + TOL["half_step_rel"]) + TOL["weight_half_step_abs"]).all())


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from([8, 4, 3, 2]), group=st.sampled_from([32, 64, 128, -1]), symmetric=st.booleans(),
       rows=st.integers(1, 17), cols=st.integers(1, 300), seed=st.integers(0, 1000), scale=st.sampled_from([1e-3, 0.05, 3.0]))
def test_rtn_error_within_half_step(bits, group, symmetric, rows, cols, seed, scale):
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * scale
    q = rtn_quantize(w, bits, group, symmetric)
    assert q.codes.dtype == torch.uint8 and int(q.codes.max()) < 2 ** bits
    assert q.scales.dtype == torch.float16 and q.scales.shape == (rows, -(-cols // q.group_size))
    assert half_step_ok(w, q)


def test_rtn_rejects_unsupported_bits():
    with pytest.raises(ConfigError, match="weight bits 5"):
        rtn_quantize(torch.randn(4, 4), 5, 32)


def test_gptq_beats_rtn_on_correlated_inputs():
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(96, 96, generator=g)
    x = torch.randn(2048, 96, generator=g) @ mix  # correlated features, as in real activations
    w = torch.randn(48, 96, generator=g)
    acc = HessianAccumulator(96)
    acc.add(x)
    for bits in (4, 3):
        rtn = rtn_quantize(w, bits, 32)
        gq = gptq_quantize(w, acc.H, bits, 32)
        assert half_step_ok(gq.dequantize(), gq)  # same layout, valid codes
        err = lambda q: float(((x @ (w - q.dequantize()).T) ** 2).mean())  # noqa: E731
        assert err(gq) < 0.8 * err(rtn)


def test_quant_linear_is_the_dequantized_function():
    lin = torch.nn.Linear(40, 24, bias=True)
    q = rtn_quantize(lin.weight.data, 4, 32)
    ql = QuantLinear(q, lin.bias)
    x = torch.randn(3, 40)
    assert torch.equal(ql(x), torch.nn.functional.linear(x, q.dequantize(), lin.bias))


@pytest.mark.parametrize("bits", [8, 4])
def test_static_kv_quantization_is_per_channel_and_within_half_step(bits):
    from splitlm.quantize.kv import StaticKVQuant

    x = torch.randn(1, 3, 17, 16) * torch.linspace(0.1, 4, 16)  # channels of very different ranges
    scale = x.abs().amax(dim=(0, 2)).reshape(-1) / (2 ** (bits - 1) - 1)
    k, v = StaticKVQuant(bits, scale, scale * 2)(x, x)
    s = scale.view(1, 3, 1, 16)
    assert bool(((x - k).abs() <= s / 2 * (1 + TOL["half_step_rel"])).all())
    levels = {len(torch.unique(k[0, h, :, c] / s[0, h, 0, c])) for h in range(3) for c in range(16)}
    assert max(levels) <= 2 ** bits
    assert torch.equal(torch.round(v / (2 * s)), (v / (2 * s)).round())  # v on its own grid
    with pytest.raises(ConfigError, match="KV bits 2"):
        StaticKVQuant(2, scale, scale)


def test_precision_changes_at_exactly_one_point(tiny_ckpt):
    plan = Plan(tiny_ckpt.model_id, tiny_ckpt.weights_hash, 2, device_weights=WeightQuant(3, 32),
                cloud_weights=WeightQuant(8, 64, symmetric=True), codec=CodecConfig("fp32"))
    runner = LocalSplit(tiny_ckpt, plan=plan)
    for i in range(4):
        stage = runner.head if i < 2 else runner.tail
        for name in LINEARS:
            mod = stage.model.layers[i].get_submodule(name)
            assert isinstance(mod, QuantLinear)
            assert (mod.bits, mod.group_size) == ((3, 32) if i < 2 else (8, 64))


def test_quantized_plan_changes_logits_a_little(tiny_ckpt):
    ids = torch.randint(3, 250, (1, 30), generator=torch.Generator().manual_seed(3))
    exact = LocalSplit(tiny_ckpt, 2).forward(ids)
    err = {}
    for bits in (8, 4, 2):
        plan = Plan(tiny_ckpt.model_id, tiny_ckpt.weights_hash, 2, device_weights=WeightQuant(bits, 32),
                    cloud_weights=WeightQuant(bits, 32), codec=CodecConfig("fp32"))
        err[bits] = float((LocalSplit(tiny_ckpt, plan=plan).forward(ids) - exact).abs().mean())
    assert 0 < err[8] < err[4] < err[2]


def test_gptq_stage_uses_calibration_and_cache(tiny_ckpt, tmp_path):
    from splitlm.model.load import build_stage

    calib = [torch.randint(3, 250, (1, 64), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    wq = WeightQuant(4, 32, "gptq")
    with pytest.raises(ConfigError, match="needs calibration"):
        quantize_stage(build_stage(tiny_ckpt, 0, 2, final=False), wq, None)
    a = quantize_stage(build_stage(tiny_ckpt, 0, 2, final=False), wq, calib, tmp_path, "t", progress=False)
    assert len(list(tmp_path.glob("gptq-*.safetensors"))) == 1
    b = quantize_stage(build_stage(tiny_ckpt, 0, 2, final=False), wq, calib, tmp_path, "t", progress=False)
    for name in LINEARS:
        qa, qb = a.model.layers[1].get_submodule(name), b.model.layers[1].get_submodule(name)
        assert torch.equal(qa.codes, qb.codes) and torch.equal(qa.scales, qb.scales)


def test_quantized_kv_cache_decoding_stays_close(tiny_ckpt):
    ids = torch.randint(3, 250, (1, 40), generator=torch.Generator().manual_seed(4))
    ref = LocalSplit(tiny_ckpt, 4).forward(ids)
    errs = {}
    for bits in (8, 4):
        plan = Plan(tiny_ckpt.model_id, tiny_ckpt.weights_hash, 4, kv_bits=bits, codec=CodecConfig("fp32"))
        runner = LocalSplit(tiny_ckpt, plan=plan)
        caches = runner.new_caches()
        parts = [runner.forward(ids[:, :8], caches)] + [runner.forward(ids[:, t:t + 1], caches) for t in range(8, 40)]
        got = torch.cat(parts, 1)
        errs[bits] = float((got - ref).norm() / ref.norm())
        kvq = runner.head.model.layers[0].self_attn.kv_quant
        assert kvq.bits == bits and kvq.k_scale.shape == (tiny_ckpt.spec.num_kv_heads * tiny_ckpt.spec.head_dim,)
    assert 0 < errs[8] < TOL["kv_decode_rel_8"] and errs[8] < errs[4] < TOL["kv_decode_rel_4"]


def test_codec_on_the_link_counts_bytes(tiny_ckpt):
    ids = torch.randint(3, 250, (1, 20), generator=torch.Generator().manual_seed(5))
    plan = Plan(tiny_ckpt.model_id, tiny_ckpt.weights_hash, 2, codec=CodecConfig("tabq", entropy="none", error_budget=0.01))
    runner = LocalSplit(tiny_ckpt, plan=plan)
    runner.forward(ids)
    d = tiny_ckpt.spec.hidden_size
    assert runner.meter.tokens == 20 and 0 < runner.meter.bytes_per_token < 2 * d
