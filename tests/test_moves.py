"""Moving the split during a session (DESIGN.md §6): KV streamed up for a shallower split, down for a deeper one.

At exact settings (16-bit weights and KV, fp32 codec) a generation that moves shallower and back
deeper equals the unmoved one token for token, in process and over gRPC, and after a failover
that replays the moves. A bad move is refused with its own status code and the session goes on.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from splitlm.errors import CodecError
from splitlm.proto import splitlm_pb2 as pb
from splitlm.quantize import kv_wire
from splitlm.sampling import SamplingParams

MOVES = ((20, 1), (45, 3), (60, 2))
"""Shallower at 20 positions (3 -> 1), back deeper at 45 (1 -> 3), shallower again at 60 (3 -> 2)."""
SEEDED = SamplingParams(temperature=1.0, seed=99)


def _export(ckpt, tmp_path_factory, name, **changes):
    from splitlm.export import export_artifacts
    from splitlm.partition.plan import Plan
    from splitlm.quantize.config import CodecConfig, MoveCodec

    plan = Plan(ckpt.model_id, ckpt.weights_hash, 3, codec=CodecConfig("fp32"), prefill_chunk=8, max_seq_len=128,
                move_codec=MoveCodec("exact")).replace(**changes)
    return plan, export_artifacts(ckpt, plan, tmp_path_factory.mktemp(name), progress=False)


@pytest.fixture(scope="module")
def exports(tiny_ckpt, tmp_path_factory):
    """{"still": the exact plan, "moving": the same with MOVES (K/V moved exactly), "kv8": moving with an 8-bit device cache}."""
    return {"still": _export(tiny_ckpt, tmp_path_factory, "still"),
            "moving": _export(tiny_ckpt, tmp_path_factory, "moving", split_moves=MOVES),
            "kv8": _export(tiny_ckpt, tmp_path_factory, "kv8", split_moves=MOVES, kv_bits=8)}


def _prompt(ckpt):
    return ckpt.tokenizer().encode("the split moves while the session runs, ").ids


def _in_process(export, prompt, n, sampling):
    from splitlm.cloud.tail import TailRunner
    from splitlm.device.runtime import HeadSession, generate_split

    _, result = export
    tail = TailRunner(result.cloud_dir).new_session(sampling)
    return generate_split(HeadSession(result.device_dir), tail, prompt, n)


@pytest.mark.parametrize("sampling", [SamplingParams(), SEEDED], ids=["greedy", "seeded"])
def test_moving_shallower_and_back_equals_the_unmoved_output(exports, tiny_ckpt, sampling):
    prompt = _prompt(tiny_ckpt)
    still = _in_process(exports["still"], prompt, 40, sampling)
    moving = _in_process(exports["moving"], prompt, 40, sampling)
    assert moving.token_ids == still.token_ids
    moves = moving.extra["moves"]
    assert [(m["old"], m["new"]) for m in moves] == [(3, 1), (1, 3), (3, 2)]
    # the prompt's prefill chunks of 8 pass 20 at 24: a move waits for the end of the step that reaches its length
    assert [m["position"] for m in moves] == [24, 45, 60]
    spec = tiny_ckpt.spec
    exact = 2 * 24 * spec.num_kv_heads * spec.head_dim * 2 * 4  # float32 K and V of 2 layers x 24 positions
    assert exact <= moves[0]["bytes"] < 1.1 * exact


def test_a_released_head_frees_its_kv_and_a_restored_one_runs_on(exports, tiny_ckpt):
    from splitlm.cloud.tail import TailRunner
    from splitlm.device.runtime import DeviceHead, HeadSession, move_split

    plan, result = exports["moving"]
    head = DeviceHead(HeadSession(result.device_dir))
    tail = TailRunner(result.cloud_dir).new_session()
    assert head.session.cuts == [1, 2, 3]
    tail.send(head.encode(head.step(_prompt(tiny_ckpt))), None)
    full = head.kv_bytes()
    move = move_split(head, tail, 1)
    assert (head.stop, tail.split) == (1, 1) and head.kv_bytes() == full // 3 and move.bytes > full * 2 // 3
    assert sorted(tail.cache.layers) == [1, 2, 3]
    move_split(head, tail, 3)
    assert (head.stop, tail.split) == (3, 3) and head.kv_bytes() == full and sorted(tail.cache.layers) == [3]


def _remote_run(address, export, prompt, n, sampling, logprobs=0, kill=None):
    """A split generation over gRPC through a ReplayingSession: (tokens, top logprobs per token, replays, moves).
    kill(session_id) runs once the session has moved twice (the serving replica dies then)."""
    from splitlm.device.client import FailoverConfig, ReplayingSession, connect
    from splitlm.device.runtime import HeadSession, generate_split

    plan, result = export
    tops = []
    with connect(address) as channel, ReplayingSession(channel, plan.hash, plan.model_id, sampling, n, logprobs=logprobs,
                                                       failover=FailoverConfig(deadline_s=20)) as remote:
        class Link:
            moved = 0

            def send(self, frame, rows, want_token):
                token = remote.send(frame, rows, want_token)
                if want_token:
                    tops.append({t.id: t.logprob for t in remote.last_token.top})
                return token

            def move_split(self, new_split, layers):
                answer = remote.move_split(new_split, layers)
                self.moved += 1
                if kill is not None and self.moved == 2:
                    kill(remote.remote.info.session_id)
                return answer

        out = generate_split(HeadSession(result.device_dir), Link(), prompt, n)
    return out.token_ids, tops, remote.replays, out.extra["moves"]


def _serve(export):
    from splitlm.cloud.service import start_server
    from splitlm.cloud.tail import TailRunner

    server, port, service = start_server(TailRunner(export[1].cloud_dir))
    return server, f"127.0.0.1:{port}", service


def test_moves_over_grpc_and_a_failover_after_them_replays_the_moves(exports, tiny_ckpt):
    prompt = _prompt(tiny_ckpt)
    reference = _in_process(exports["still"], prompt, 40, SEEDED).token_ids
    servers = [_serve(exports["moving"]) for _ in range(2)]
    try:
        tokens, _, replays, moves = _remote_run(servers[0][1], exports["moving"], prompt, 40, SEEDED)
        assert tokens == reference and len(moves) == 3 and not replays
        assert servers[0][2].moves == 3

        def kill(session_id):
            serving = [s for s in servers if session_id in s[2].sessions]
            assert len(serving) == 1
            serving[0][0].stop(grace=None)

        tokens, _, replays, moves = _remote_run(",".join(s[1] for s in servers), exports["moving"], prompt, 40, SEEDED, kill=kill)
        assert tokens == reference and len(moves) == 3
        assert len(replays) == 1 and replays[0].bytes > moves[0]["bytes"]  # the frames and the spilled move's KV
    finally:
        for server, _, _ in servers:
            server.stop(grace=None)


def test_a_quantized_kv_move_keeps_tokens_and_logits_close(exports, tiny_ckpt):
    """An 8-bit device cache moves its codes and scales: the cloud attends to the dequantized past of the
    moved layers where the device attended to the same values, and computes new K/V unrounded."""
    from splitlm.cloud.tail import TailRunner
    from splitlm.device.runtime import DeviceHead, HeadSession, move_split

    plan, result = exports["kv8"]
    session = HeadSession(result.device_dir)
    assert session.kv_scales and result.device_dir.joinpath("kv_scales.npz").exists()
    runner = TailRunner(result.cloud_dir)
    prompt = _prompt(tiny_ckpt)

    def run(moves):
        head, tail = DeviceHead(session), runner.new_session()
        logits = [tail.logits(head.encode(head.step(prompt)), last_only=True)[0].numpy()]
        for step in range(32):
            if step in moves:
                move_split(head, tail, moves[step])
            token = int(np.argmax(logits[-1]))
            logits.append(tail.logits(head.encode(head.step([token])), last_only=True)[0].numpy())
        return np.stack(logits)

    still, moved = run({}), run({4: 1, 12: 3, 20: 2})
    assert (still.argmax(-1) == moved.argmax(-1)).all()
    err = np.abs(moved - still).max() / np.abs(still).max()
    assert err < 0.05, f"logits moved {err:.3g} (relative to max |logit|), tolerance 0.05"


# -- bad moves --------------------------------------------------------------------------------------------
@pytest.fixture()
def moving_server(exports):
    server, address, service = _serve(exports["moving"])
    yield address, service
    server.stop(grace=None)


def _open(address, export):
    from splitlm.device.client import RemoteSession, connect
    from splitlm.device.runtime import DeviceHead, HeadSession

    plan, result = export
    channel = connect(address)
    return channel, RemoteSession(channel, plan.hash, plan.model_id, SamplingParams(), 64), DeviceHead(HeadSession(result.device_dir))


def _bad_moves(head):
    """(name, new_split, layers, status) of moves the server must refuse, leaving the session as it was."""
    good = list(head.kv_chunks(range(1, 3)))
    short = pb.LayerKV()
    short.CopyFrom(good[0])
    short.keys = short.keys[:-4]
    late = pb.LayerKV()
    late.CopyFrom(good[0])
    late.start_position = 1
    scaled = pb.LayerKV()
    scaled.CopyFrom(good[0])
    scaled.bits, scaled.key_scales = 8, b"\0" * 8
    return [("layer not held", 0, [], "OUT_OF_RANGE"),
            ("not a plan split", 4, [], "OUT_OF_RANGE"),
            ("to the split it is at", 3, [], "OUT_OF_RANGE"),
            ("KV of the wrong size", 1, [short] + good[1:], "INVALID_ARGUMENT"),
            ("KV out of order", 1, [late] + good[1:], "INVALID_ARGUMENT"),
            ("a layer missing", 1, good[:1], "INVALID_ARGUMENT"),
            ("a layer outside the move", 2, good, "INVALID_ARGUMENT"),
            ("codes with bad scales", 1, [scaled] + good[1:], "INVALID_ARGUMENT")]


def test_a_bad_move_gets_its_own_code_and_the_session_goes_on(exports, moving_server, tiny_ckpt):
    from splitlm.device.client import MoveRefused

    address, service = moving_server
    prompt = _prompt(tiny_ckpt)
    channel, remote, head = _open(address, exports["moving"])
    with channel, remote:
        token = remote.send(head.encode(head.step(prompt)), len(prompt))
        codes = {}
        for name, new_split, layers, code in _bad_moves(head):
            with pytest.raises(MoveRefused) as info:
                remote.move_split(new_split, layers)
            codes[name] = info.value.code
            assert info.value.code == code, (name, str(info.value))
        tokens = [token]
        for _ in range(6):  # the session is where it was: same split, same KV, same position
            tokens.append(remote.send(head.encode(head.step([tokens[-1]])), 1))
    assert service.moves == 0 and not service.sessions
    reference = _in_process(exports["still"], prompt, 7, SamplingParams()).token_ids
    assert tokens == reference


def test_a_deeper_move_carrying_kv_and_an_unfinished_move_are_refused(exports, moving_server, tiny_ckpt):
    from splitlm.device.client import MoveRefused
    from splitlm.errors import RemoteError

    address, _ = moving_server
    prompt = _prompt(tiny_ckpt)
    channel, remote, head = _open(address, exports["moving"])
    with channel:
        remote.send(head.encode(head.step(prompt)), len(prompt))
        remote.move_split(1, list(head.kv_chunks(range(1, 3))))
        head.release(1)
        with pytest.raises(MoveRefused, match="INVALID_ARGUMENT: a move deeper .* carries no KV"):
            remote.move_split(3, list(head.kv_chunks(range(0, 1))))
        # a move that announces more messages and then sends a frame breaks the protocol: the stream ends
        remote._requests.put(pb.DeviceMessage(move_split=pb.MoveSplit(new_split=3, more=True)))
        with pytest.raises(RemoteError, match="INVALID_ARGUMENT: a split move to 3 announced more messages, got activations"):
            remote.send(head.encode(head.step([5])), 1)


def test_resume_of_an_unknown_session_and_a_foreign_plan_get_their_own_codes(exports, moving_server):
    from splitlm.device.client import RemoteSession, connect
    from splitlm.errors import RemoteError

    address, _ = moving_server
    plan = exports["moving"][0]
    with connect(address) as channel:
        with pytest.raises(RemoteError) as info:
            RemoteSession(channel, plan.hash, plan.model_id, SamplingParams(), 4, resume_session="f" * 32)
        assert info.value.code == "NOT_FOUND"
        with pytest.raises(RemoteError) as info:
            RemoteSession(channel, exports["still"][0].hash, plan.model_id, SamplingParams(), 4)
        assert info.value.code == "FAILED_PRECONDITION"


# -- the wire encodings -----------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [32, 16, 8, 4])
def test_kv_chunks_round_trip_in_every_encoding(bits):
    rng = np.random.default_rng(bits)
    heads, positions, dim = 2, 37, 6
    k, v = rng.standard_normal((2, heads, positions, dim)).astype(np.float32)
    scales = np.full((heads, dim), 0.05, np.float32)
    data = (k, v) if bits > 8 else (kv_wire.quantize(k, scales, bits), kv_wire.quantize(v, scales, bits))
    chunks = list(kv_wire.chunks(5, *data, bits, scales, scales, max_bytes=200))
    assert len(chunks) > 1 and [c.start_position for c in chunks] == sorted(c.start_position for c in chunks)
    assembler = kv_wire.Assembler(range(5, 6), positions, heads, dim)
    for c in chunks:
        assembler.add(c)
    got_k, got_v = assembler.result()[5]
    q = 2 ** (bits - 1) - 1 if bits <= 8 else None
    want_k = k if q is None else np.clip(np.rint(k / 0.05), -q - 1, q) * np.float32(0.05)
    np.testing.assert_allclose(got_k, want_k, rtol=1e-3 if bits == 16 else 1e-6, atol=1e-3 if bits == 16 else 1e-7)
    assert got_v.shape == (heads, positions, dim)


def test_four_bit_codes_are_onnxruntimes_layout():
    """Offset by 8, the even element in the low nibble (what GroupQueryAttention's 4-bit cache holds)."""
    codes = np.array([[[-8, 7, 0, -1]]], np.float32)
    packed = kv_wire.quantize(codes, np.ones((1, 4), np.float32), 4)
    assert packed.tolist() == [[[0 | (15 << 4), 8 | (7 << 4)]]]
    np.testing.assert_array_equal(kv_wire.dequantize(packed, 4, np.ones((1, 4), np.float32)), codes)


def test_the_assembler_refuses_what_does_not_fit_the_move():
    k = np.zeros((2, 4, 6), np.float32)
    with pytest.raises(CodecError, match="bits 12 not in"):
        kv_wire.Assembler(range(0, 1), 4, 2, 6).add(pb.LayerKV(layer=0, bits=12))
    with pytest.raises(CodecError, match="lacks KV of layer 1"):
        a = kv_wire.Assembler(range(0, 2), 4, 2, 6)
        for c in kv_wire.chunks(0, k, k, 32):
            a.add(c)
        a.result()
    with pytest.raises(CodecError, match="values that are not finite"):
        a = kv_wire.Assembler(range(0, 1), 4, 2, 6)
        for c in kv_wire.chunks(0, k, np.full_like(k, np.nan), 32):
            a.add(c)
        a.result()
    with pytest.raises(CodecError, match="positions up to 5, the session holds 4"):
        kv_wire.Assembler(range(0, 1), 4, 2, 6).add(next(kv_wire.chunks(0, np.zeros((2, 5, 6)), np.zeros((2, 5, 6)), 32)))


def test_a_move_past_the_kv_budget_is_refused_before_it_installs_anything(exports, tiny_ckpt):
    from splitlm.cloud.service import ServerConfig, start_server
    from splitlm.cloud.tail import TailRunner
    from splitlm.device.client import MoveRefused

    runner = TailRunner(exports["moving"][1].cloud_dir)
    per_layer = runner.batcher.kv_bytes_per_layer_position
    prompt = _prompt(tiny_ckpt)
    # room for the session's own layer to 100 positions, not for two more layers of its prompt
    server, port, service = start_server(runner, "127.0.0.1:0", ServerConfig(max_kv_bytes=int(per_layer * 100)))
    try:
        channel, remote, head = _open(f"127.0.0.1:{port}", exports["moving"])
        with channel, remote:
            tokens = [remote.send(head.encode(head.step(prompt)), len(prompt))]
            with pytest.raises(MoveRefused) as info:
                remote.move_split(1, head.kv_chunks(range(1, 3)))
            assert info.value.code == "RESOURCE_EXHAUSTED"
            for _ in range(6):
                tokens.append(remote.send(head.encode(head.step([tokens[-1]])), 1))
        assert service.moves == 0
    finally:
        server.stop(grace=None)
    deadline = time.monotonic() + 10
    while runner.batcher.kv_bytes and time.monotonic() < deadline:  # the release is counted on the batcher thread
        time.sleep(0.01)
    assert runner.batcher.kv_bytes == 0  # every byte the session held was given back: none was counted twice
    assert tokens == _in_process(exports["still"], prompt, 7, SamplingParams()).token_ids


def test_the_device_refuses_a_move_it_cannot_make_before_the_cloud_moves(exports, tiny_ckpt):
    from splitlm.cloud.tail import TailRunner
    from splitlm.device.runtime import DeviceHead, HeadSession, move_split
    from splitlm.errors import ConfigError

    _, result = exports["moving"]
    head, tail = DeviceHead(HeadSession(result.device_dir)), TailRunner(result.cloud_dir).new_session()
    tail.send(head.encode(head.step(_prompt(tiny_ckpt))), None)
    for layer, message in ((0, "can stop at layers"), (3, "already"), (4, "go back to")):
        with pytest.raises(ConfigError, match=message):
            move_split(head, tail, layer)
    assert tail.split == 3 and sorted(tail.cache.layers) == [3]


@pytest.mark.parametrize("name", ["moving", "kv8"])
def test_the_in_process_split_makes_the_same_moves(exports, tiny_ckpt, name):
    """LocalSplit (the torch reference of every path) runs the plan's moves at the same steps as the device,
    handing the same K/V across: its output equals the ONNX head's with the exported tail."""
    from splitlm.local import LocalSplit

    plan, _ = exports[name]
    prompt = _prompt(tiny_ckpt)
    local = LocalSplit(tiny_ckpt, plan=plan)
    caches = local.new_caches()
    local.forward(__import__("torch").tensor([prompt]), caches)
    assert caches.split == 1 and sorted(caches.tail.layers) == [1, 2, 3] and sorted(caches.head.layers) == [0]
    assert local.generate(prompt, 40, SEEDED).token_ids == _in_process(exports[name], prompt, 40, SEEDED).token_ids


def test_recompute_moves_send_hidden_states_and_equal_the_unmoved_output(exports, tiny_ckpt, tmp_path_factory):
    """MoveCodec "recompute": a shallower move sends the hidden states entering the new split, the cloud recomputes
    the K/V from them; a deeper one brings float32 K/V back. In process, over gRPC, after a failover that replays
    the moves, and in the torch reference, the output is the unmoved one."""
    from splitlm.local import LocalSplit
    from splitlm.quantize.config import MoveCodec

    plan, result = rec = _export(tiny_ckpt, tmp_path_factory, "recompute", split_moves=MOVES, move_codec=MoveCodec("recompute"))
    prompt = _prompt(tiny_ckpt)
    still = _in_process(exports["still"], prompt, 40, SEEDED).token_ids
    local = _in_process(rec, prompt, 40, SEEDED)
    assert local.token_ids == still
    spec = tiny_ckpt.spec
    moves = [(m["old"], m["new"], m["position"], m["bytes"]) for m in local.extra["moves"]]
    assert [m[:3] for m in moves] == [(3, 1, 24), (1, 3, 45), (3, 2, 60)]
    per_layer = 2 * spec.num_kv_heads * spec.head_dim * 4  # float32 K and V of a layer, per position
    hidden = 24 * spec.hidden_size * 4  # float32 rows entering layer 1: half the K/V of layers 1 and 2
    assert hidden <= moves[0][3] < 1.1 * hidden < 2 * 24 * per_layer
    assert 2 * 45 * per_layer <= moves[1][3] < 1.1 * 2 * 45 * per_layer  # deeper: float32 K/V of layers 1 and 2
    # to 2, which the head did not run while its split was 1: float32 K/V of layer 2 (as "exact")
    assert 60 * per_layer <= moves[2][3] < 1.1 * 60 * per_layer
    assert LocalSplit(tiny_ckpt, plan=plan).generate(prompt, 40, SEEDED).token_ids == still
    servers = [_serve(rec) for _ in range(2)]
    try:
        tokens, _, replays, got = _remote_run(servers[0][1], rec, prompt, 40, SEEDED)
        assert tokens == still and [m["bytes"] for m in got] == [m[3] for m in moves] and not replays

        def kill(session_id):
            [s for s in servers if session_id in s[2].sessions][0][0].stop(grace=None)

        tokens, _, replays, _ = _remote_run(",".join(s[1] for s in servers), rec, prompt, 40, SEEDED, kill=kill)
        assert tokens == still and len(replays) == 1
    finally:
        for server, _, _ in servers:
            server.stop(grace=None)


def test_a_recompute_head_keeps_the_rows_of_the_cuts_it_runs(tiny_ckpt, tmp_path_factory):
    from splitlm.cloud.tail import TailRunner
    from splitlm.device.runtime import DeviceHead, HeadSession, move_split
    from splitlm.quantize import kv_wire
    from splitlm.quantize.config import MoveCodec

    _, result = _export(tiny_ckpt, tmp_path_factory, "recompute-head", split_moves=MOVES, move_codec=MoveCodec("recompute"))
    head = DeviceHead(HeadSession(result.device_dir))
    tail = TailRunner(result.cloud_dir).new_session()
    assert sorted(head.kept) == [1, 2]  # the cuts below the split
    out = head.step(_prompt(tiny_ckpt))
    assert [c.encoding for c in head.kv_chunks(range(1, 3))] == [kv_wire.HIDDEN]
    rows = np.concatenate([np.frombuffer(c.keys, "<f4") for c in head.kv_chunks(range(2, 3))]).reshape(head.length, -1)
    assert np.array_equal(rows, head.kept[2][:head.length]) and not np.array_equal(rows, out)
    tail.send(head.encode(out), None)
    move_split(head, tail, 1)
    assert sorted(head.kept) == [1] and sorted(tail.cache.layers) == [1, 2, 3]
    move_split(head, tail, 3)  # back deeper: the head runs layers 1 and 2 again, without rows of the past at 2
    assert sorted(head.kept) == [1]
    assert {c.encoding for c in head.kv_chunks(range(2, 3))} == {0} and [c.encoding for c in head.kv_chunks(range(1, 3))] == [2]


def _hidden_chunk(layer=1, start=0, positions=4, d=8, **changes):
    rows = np.random.default_rng(start).standard_normal((positions, d)).astype(np.float32)
    item = next(kv_wire.hidden_chunks(layer, rows))
    item.start_position = start
    for name, value in changes.items():
        setattr(item, name, value)
    return item


@pytest.mark.parametrize("items, hidden_size, message", [
    ([_hidden_chunk()], None, "this side takes K/V, not hidden states"),
    ([_hidden_chunk(layer=2)], 8, "the move's new split is 1, the hidden states must enter it"),
    ([_hidden_chunk(bits=16)], 8, "carries float32 rows in keys \\(bits 32\\), no values and no scales"),
    ([_hidden_chunk(values=b"x")], 8, "no values and no scales"),
    ([_hidden_chunk(d=6)], 8, "96 bytes for 4 positions, expected 128"),
    ([_hidden_chunk(keys=np.full((4, 8), np.nan, np.float32).tobytes())], 8, "values that are not finite"),
    ([_hidden_chunk(), _hidden_chunk(start=5)], 8, "chunk starts at position 5, expected 4"),
    ([_hidden_chunk(), _hidden_chunk(start=4, positions=5)], 8, "positions up to 9, the session holds 8"),
    ([next(kv_wire.chunks(1, np.zeros((2, 8, 4), np.float32), np.zeros((2, 8, 4), np.float32), 32)), _hidden_chunk()], 8,
     "in a move that carries K/V"),
    ([_hidden_chunk(), next(kv_wire.chunks(1, np.zeros((2, 8, 4), np.float32), np.zeros((2, 8, 4), np.float32), 32))], 8,
     "KV of layer 1 in a move that carries hidden states"),
])
def test_bad_hidden_state_chunks_are_codec_errors(items, hidden_size, message):
    assembler = kv_wire.Assembler(range(1, 3), 8, 2, 4, hidden_size=hidden_size)
    with pytest.raises(CodecError, match=message):
        for item in items:
            assembler.add(item)


def test_hidden_state_chunks_assemble_and_a_short_move_is_refused():
    rows = np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32)
    assembler = kv_wire.Assembler(range(1, 3), 8, 2, 4, hidden_size=8)
    for item in kv_wire.hidden_chunks(1, rows, max_bytes=100):  # three positions a chunk
        assembler.add(item)
    assert np.array_equal(assembler.hidden(), rows)
    with pytest.raises(CodecError, match="carried hidden states at layer 1, not K/V"):
        assembler.result()
    short = kv_wire.Assembler(range(1, 3), 9, 2, 4, hidden_size=8)
    for item in kv_wire.hidden_chunks(1, rows):
        short.add(item)
    with pytest.raises(CodecError, match="lacks hidden states at layer 1 \\(positions 8 of 9\\)"):
        short.hidden()
