"""The K/V codec for moves (quantize/kv_codec.py, LayerKV encoding 1): its error, its size, its refusals,
and a move that carries coded K/V over gRPC equal to the same move in process (and after a failover)."""

from __future__ import annotations

import numpy as np
import pytest

from splitlm.errors import CodecError, PlanError
from splitlm.quantize import kv_codec, kv_wire
from splitlm.quantize.config import MoveCodec


def _kv(seed=0, heads=3, T=200, D=64):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(heads, T, D)) * rng.uniform(0.1, 5.0, size=(heads, 1, D)) + rng.normal(size=(heads, 1, D))
    x[:, 0] *= 40  # an attention sink
    return x.astype(np.float32)


def test_value_steps_give_each_channel_its_relative_error_and_the_sink_goes_raw():
    x = _kv()
    for eps in (0.002, 0.01):
        y = kv_codec.decode(kv_codec.encode(x, kv_codec.relative_steps(x, eps, 1), 1), *x.shape)
        err = ((x - y)[:, 1:] ** 2).mean(1) / x[:, 1:].var(1)
        assert 0.6 * eps < err.mean() < 1.4 * eps and err.max() < 2 * eps
        assert np.array_equal(y[:, 0], x[:, 0])


def test_key_steps_follow_the_query_energy():
    x = _kv(1)
    energy = np.ones((3, 64))
    energy[:, :32] = 100.0  # queries read the first half 100x harder: its steps are 10x finer
    y = kv_codec.decode(kv_codec.encode(x, kv_codec.logit_steps(energy, 0.1)), *x.shape)
    err = ((x - y) ** 2).mean(1)  # (H, D)
    # each channel adds about τ²/D·... to the logit: energy × squared error ≈ τ² (uniform rounding: Δ²/12)
    assert np.allclose((energy * err).mean(), 0.1 ** 2, rtol=0.3)
    assert err[:, :32].mean() < err[:, 32:].mean() / 50


def test_coded_chunks_are_smaller_than_8bit_codes_and_assemble_in_order():
    x = _kv(2, T=600)
    items = list(kv_wire.coded_chunks(5, x, x * 0.5, kv_codec.relative_steps(x, 0.01, 1), 0.01))
    assert [(c.start_position, c.positions) for c in items] == [(0, 200), (200, 200), (400, 200)]
    assembler = kv_wire.Assembler(range(5, 6), 600, 3, 64)
    for item in items:
        assembler.add(item)
    k, v = assembler.result()[5]
    assert k.shape == v.shape == x.shape
    assert assembler.bytes < 0.5 * 2 * x.size  # 8-bit codes: a byte per element


@pytest.mark.parametrize("change, message", [
    (dict(bits=8), "carries bits 8 or scales"),
    (dict(key_scales=b"\0" * 8), "carries bits 0 or scales"),
    (dict(encoding=3), r"encoding 3 not in \(0, 1, 2\)"),
    (dict(encoding=2), r"this side takes K/V, not hidden states"),
    (dict(keys=b"XYZ" + b"\0" * 40), "not a K/V codec payload"),
    (dict(positions=5), r"payload of shape \(3, 10, 64\) where the chunk needs \(3, 5, 64\)"),
])
def test_a_bad_coded_chunk_is_a_codec_error_naming_it(change, message):
    x = _kv(3, T=10)
    item = next(kv_wire.coded_chunks(2, x, x, np.full(192, 0.05), 0.01))
    for field, value in change.items():
        setattr(item, field, value)
    with pytest.raises(CodecError, match=message):
        kv_wire.Assembler(range(2, 3), 10, 3, 64).add(item)


def test_coded_and_exact_chunks_do_not_mix_in_a_layer():
    x = _kv(4, T=20)
    coded = next(kv_wire.coded_chunks(0, x[:, :10], x[:, :10], np.full(192, 0.05), 0.01))
    exact = next(kv_wire.chunks(0, x[:, 10:], x[:, 10:], 32))
    exact.start_position = 10
    assembler = kv_wire.Assembler(range(0, 1), 20, 3, 64)
    assembler.add(coded)
    with pytest.raises(CodecError, match="a chunk of encoding 0 after coded chunks"):
        assembler.add(exact)


def test_mutated_payloads_decode_or_raise_codec_error():
    """Seeded, bounded fuzzing of the K/V decoder: 1,500 mutated payloads (bench/fuzz_frames.py --kv is the unbounded,
    coverage-guided version). Each decodes to finite values of the chunk's shape, or raises CodecError."""
    from tests.test_codec import load_fuzz_harness, mutate

    harness = load_fuzz_harness()
    check = harness.KVChecker()
    seeds = harness.seed_payloads()
    for payload in seeds:
        assert check(payload)
    rng = np.random.default_rng(17)
    for i in range(1500):
        check(mutate(seeds[i % len(seeds)], rng))
    assert check.decoded > 100 and sum(check.rejected.values()) > 500, check.summary(1.0)
    assert len(check.rejected) >= 6, check.summary(1.0)


def test_the_move_codec_fields_are_checked():
    with pytest.raises(PlanError, match="move codec 'zip' not in"):
        MoveCodec("zip")
    with pytest.raises(PlanError, match="apply to coder 'ans' only"):
        MoveCodec("exact", key_error=0.3)
    with pytest.raises(PlanError, match="value_error must be in"):
        MoveCodec(value_error=0)


MOVES = ((20, 1), (45, 3), (60, 2))


@pytest.fixture(scope="module")
def coded_export(tiny_ckpt, tmp_path_factory):
    from splitlm.export import export_artifacts
    from splitlm.partition.plan import Plan
    from splitlm.quantize.config import CodecConfig

    plan = Plan(tiny_ckpt.model_id, tiny_ckpt.weights_hash, 3, codec=CodecConfig("fp32"), prefill_chunk=8, max_seq_len=128,
                split_moves=MOVES)
    assert plan.move_codec.coder == "ans"
    return plan, export_artifacts(tiny_ckpt, plan, tmp_path_factory.mktemp("coded"), progress=False)


def test_coded_moves_over_grpc_and_after_a_failover_equal_the_in_process_run(coded_export, tiny_ckpt):
    from splitlm.local import LocalSplit
    from tests.test_moves import SEEDED, _in_process, _prompt, _remote_run, _serve

    plan, result = coded_export
    assert (result.device_dir / "kv_codec.npz").exists() and (result.cloud_dir / "kv_codec.npz").exists()
    prompt = _prompt(tiny_ckpt)
    local = _in_process(coded_export, prompt, 40, SEEDED)
    moves = local.extra["moves"]
    assert [(m["old"], m["new"]) for m in moves] == [(3, 1), (1, 3), (3, 2)]
    exact = 2 * 24 * tiny_ckpt.spec.num_kv_heads * tiny_ckpt.spec.head_dim * 2 * 4  # float32 K/V, 2 layers x 24 positions
    assert moves[0]["bytes"] < exact / 2.5
    # the torch reference codes the same K/V the same way: its output after the moves stays close to the device's
    reference = LocalSplit(tiny_ckpt, plan=plan).generate(prompt, 40, SEEDED).token_ids
    assert reference[:20] == local.token_ids[:20]
    servers = [_serve(coded_export) for _ in range(2)]
    try:
        tokens, _, replays, got = _remote_run(servers[0][1], coded_export, prompt, 40, SEEDED)
        assert tokens == local.token_ids and [m["bytes"] for m in got] == [m["bytes"] for m in moves]

        def kill(session_id):
            [s for s in servers if session_id in s[2].sessions][0][0].stop(grace=None)

        tokens, _, replays, _ = _remote_run(",".join(s[1] for s in servers), coded_export, prompt, 40, SEEDED, kill=kill)
        assert tokens == local.token_ids and len(replays) == 1
    finally:
        for server, _, _ in servers:
            server.stop(grace=None)
