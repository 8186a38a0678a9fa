"""What probing the service found (issue 13), each kept fixed: a real server on port 0, real streams."""

import logging
import threading
import time

import grpc
import numpy as np
import pytest
import torch

from splitlm.errors import ConfigError
from splitlm.proto import splitlm_pb2 as pb
from splitlm.proto import splitlm_pb2_grpc as pb_grpc
from splitlm.quantize import codec
from tests.test_service import TABQ, generate_remote, in_one_turn, open_session
from tests.tolerances import TOL


def raw_call(address, messages, timeout=20.0):
    """Send `messages` on one Generate stream (then half-close); (responses, status code name, details)."""
    stub = pb_grpc.SplitInferenceStub(grpc.insecure_channel(address))
    got = []
    try:
        for msg in stub.Generate(iter(messages), timeout=timeout):
            got.append(msg)
    except grpc.RpcError as exc:
        return got, exc.code().name, exc.details()
    return got, "OK", ""


def wait_for(condition, timeout=10.0) -> bool:
    """Poll `condition` until true or `timeout` s (the server frees a stream just after its status leaves)."""
    deadline = time.time() + timeout
    while not condition() and time.time() < deadline:
        time.sleep(0.02)
    return condition()


def open_msg(plan, **kw):
    sampling = kw.pop("sampling", pb.Sampling())
    fields = dict(plan_hash=plan.hash, model_id=plan.model_id, max_tokens=8, sampling=sampling)
    fields.update(kw)
    return pb.DeviceMessage(open=pb.Open(**fields))


def frame_msg(x, start=0, want_token=True):
    return pb.DeviceMessage(activations=pb.Activations(start_position=start, frame=codec.encode(x, TABQ), want_token=want_token))


def hidden(tiny_ckpt, rows, seed=0):
    return np.random.default_rng(seed).standard_normal((rows, tiny_ckpt.spec.hidden_size)).astype(np.float32)


# -- the batcher: a failed forward leaves every cache as it was (defect 2) ----------------------------
def test_failed_forward_takes_its_kv_back(tiny_ckpt, artifacts):
    from splitlm.cloud.tail import TailRunner
    from splitlm.model.llama import KVCache

    stage = TailRunner(artifacts[1].cloud_dir, warm_up=False).stage
    cache = KVCache()
    x = torch.from_numpy(hidden(tiny_ckpt, 5))[None]
    with torch.inference_mode():
        stage(x, cache=cache)
        before = {i: (k.clone(), v.clone()) for i, (k, v) in cache.layers.items()}
        nbytes = cache.nbytes()
        last = stage.model.layers[stage.stop - 1]
        original = last.forward
        last.forward = lambda *a: (_ for _ in ()).throw(RuntimeError("injected"))
        with pytest.raises(RuntimeError, match="injected"):
            stage(x[:, :1], cache=cache)
        last.forward = original
    assert cache.length == 5 and cache.nbytes() == nbytes
    for i, (k, v) in cache.layers.items():
        assert torch.equal(k, before[i][0]) and torch.equal(v, before[i][1])


def test_batched_decode_fallback_does_not_corrupt_caches(tiny_ckpt, artifacts):
    from splitlm.cloud.batcher import Batcher
    from splitlm.cloud.tail import TailRunner
    from splitlm.model.llama import KVCache

    stage = TailRunner(artifacts[1].cloud_dir, warm_up=False).stage
    prompts = [torch.from_numpy(hidden(tiny_ckpt, n, seed=n)) for n in (3, 6, 4)]
    steps = torch.from_numpy(hidden(tiny_ckpt, 3, seed=9))[:, None]  # (3, 1, d)
    alone = []
    with torch.inference_mode():
        for p, x in zip(prompts, steps):
            cache = KVCache()
            stage(p[None], cache=cache)
            alone.append(stage(x[None], cache=cache)[0, -1])
    last = stage.model.layers[stage.stop - 1]
    original = last.forward

    def fails_in_a_batch(x, *args):  # the last layer fails when batched: earlier layers already appended
        if x.shape[0] > 1:
            raise RuntimeError("injected batch failure")
        return original(x, *args)

    batcher = Batcher(stage)
    caches = [KVCache() for _ in prompts]
    for c, p in zip(caches, prompts):
        batcher.run(c, p)
    last.forward = fails_in_a_batch
    try:
        futures = in_one_turn(batcher, list(zip(caches, steps)))  # batched forward fails, then one by one
        results = [f.result(timeout=30) for f in futures]
    finally:
        last.forward = original
        batcher.close()
    assert batcher.batches == 0
    for a, r, c, p in zip(alone, results, caches, prompts):
        assert torch.allclose(a, r[-1], atol=TOL["fp32_batched"], rtol=TOL["fp32_batched"])
        assert c.length == p.shape[0] + 1
        assert all(k.shape[2] == c.length for k, _ in c.layers.values())


# -- the KV count (defect 3) -----------------------------------------------------------------------
def test_kv_bytes_are_counted_on_the_batcher_and_freed(tiny_ckpt, artifacts, serve):
    address, service = serve()
    plan, _ = artifacts
    a, b = open_session(address, plan, token=None), open_session(address, plan, token=None)
    a.next_token(codec.encode(hidden(tiny_ckpt, 7), TABQ), 7)
    b.next_token(codec.encode(hidden(tiny_ckpt, 3), TABQ), 3)
    per_position = tiny_ckpt.spec.kv_bytes_per_token(tiny_ckpt.spec.num_layers - plan.split_layer, 32)
    assert service.kv_bytes() == 10 * per_position
    assert service.kv_bytes() == sum(s.tail.cache.nbytes() for s in service.sessions.values())
    a.close()
    b.close()
    assert wait_for(lambda: service.kv_bytes() == 0)


# -- a port in use (defect 4) -----------------------------------------------------------------------
def test_second_server_on_a_port_in_use_fails(artifacts, serve):
    from splitlm.cloud.service import start_server
    from splitlm.cloud.tail import TailRunner

    address, _ = serve()
    with pytest.raises(ConfigError, match="in use"):
        start_server(TailRunner(artifacts[1].cloud_dir, warm_up=False), address)


@pytest.mark.parametrize("address", ["127.0.0.1:99999", "localhost", "127.0.0.1:-1"])
def test_bad_address_is_refused(artifacts, address):
    from splitlm.cloud.service import start_server
    from splitlm.cloud.tail import TailRunner

    with pytest.raises(ConfigError, match="HOST:PORT"):
        start_server(TailRunner(artifacts[1].cloud_dir, warm_up=False), address)


# -- long frames are cut into prefill chunks (defect 7) ----------------------------------------------
def test_a_long_frame_runs_in_chunks_and_decodes_interleave(tiny_ckpt, artifacts):
    from splitlm.cloud.batcher import Batcher
    from splitlm.cloud.tail import TailRunner
    from splitlm.model.llama import KVCache

    stage = TailRunner(artifacts[1].cloud_dir, warm_up=False).stage
    calls = []
    original = stage.forward
    stage.forward = lambda x, **kw: (calls.append(tuple(x.shape[:2])), original(x, **kw))[1]
    batcher = Batcher(stage, chunk=8)
    try:
        busy, long = KVCache(), KVCache()
        batcher.run(busy, torch.from_numpy(hidden(tiny_ckpt, 4)))
        gate = threading.Event()
        blocker = batcher.submit(KVCache(), lambda: (gate.wait(10), torch.from_numpy(hidden(tiny_ckpt, 1)))[1])
        prefill = batcher.submit(long, torch.from_numpy(hidden(tiny_ckpt, 100, seed=1)), last_only=True)
        done_rows_when_decoded = []
        decode = batcher.submit(busy, torch.from_numpy(hidden(tiny_ckpt, 1, seed=2)), last_only=True,
                                finish=lambda logits: done_rows_when_decoded.append(long.length))
        gate.set()
        blocker.result(10), decode.result(10)
        chunked = prefill.result(30)
    finally:
        stage.forward = original
        batcher.close()
    assert done_rows_when_decoded == [0]  # the decode did not wait for the 100-row prefill
    assert max(t for _, t in calls) <= 8 and long.length == 100
    with torch.inference_mode():  # chunked prefill = one forward of the whole frame
        whole = stage(torch.from_numpy(hidden(tiny_ckpt, 100, seed=1))[None], cache=KVCache(), last_only=True)[0]
    assert torch.allclose(chunked, whole, atol=TOL["fp32_batched"], rtol=TOL["fp32_batched"])


# -- idle means waiting on the client (defect 8) -----------------------------------------------------
def test_server_compute_does_not_count_as_idle(tiny_ckpt, artifacts, serve):
    address, service = serve(idle_timeout_s=0.5)
    stage = service.runner.stage
    original = stage.forward
    stage.forward = lambda x, **kw: (time.sleep(1.2), original(x, **kw))[1]  # every step takes 1.2 s
    try:
        plan, _ = artifacts
        session = open_session(address, plan, token=None)
        assert isinstance(session.next_token(codec.encode(hidden(tiny_ckpt, 3), TABQ), 3), int)
    finally:
        stage.forward = original
    session.close()


def test_idle_session_is_ended_with_deadline_exceeded(artifacts, serve):
    address, service = serve(idle_timeout_s=0.5)
    plan, _ = artifacts
    stub = pb_grpc.SplitInferenceStub(grpc.insecure_channel(address))
    hold = threading.Event()

    def requests():
        yield open_msg(plan)
        hold.wait(20)

    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(requests(), timeout=20))
    hold.set()
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "within 0.5 s" in info.value.details()
    assert wait_for(lambda: not service.sessions)


# -- thread exhaustion (defect 9) --------------------------------------------------------------------
def test_silent_streams_starve_neither_sessions_nor_health(tiny_ckpt, artifacts, serve):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    address, service = serve(max_sessions=4, max_pending_streams=41, open_timeout_s=60)
    plan, _ = artifacts
    stub = pb_grpc.SplitInferenceStub(grpc.insecure_channel(address))
    hold = threading.Event()

    def silent():
        hold.wait(60)
        return
        yield

    calls = [stub.Generate(silent(), timeout=60) for _ in range(40)]  # 32 stream threads used to be all there was
    idle = [open_session(address, plan, token=None) for _ in range(3)]
    try:
        assert wait_for(lambda: service.pending_streams == 40)
        health = health_pb2_grpc.HealthStub(grpc.insecure_channel(address))
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
        prompt = tiny_ckpt.tokenizer().encode("still served").ids  # the 4th session, beside 40 silent streams
        assert len(generate_remote(address, artifacts, prompt, 4, token=None).token_ids) == 4
        idle.append(open_session(address, plan, token=None))
        _, code, details = raw_call(address, [open_msg(plan)], timeout=5)  # a 5th session: refused at once
        assert code == "RESOURCE_EXHAUSTED" and "limit of 4 sessions" in details
        calls.append(stub.Generate(silent(), timeout=60))
        assert wait_for(lambda: service.pending_streams == 41)
        _, code, details = raw_call(address, [open_msg(plan)], timeout=5)  # a 42nd stream waiting to open
        assert code == "RESOURCE_EXHAUSTED" and "streams waiting to open" in details
    finally:
        hold.set()
        for c in calls:
            c.cancel()
        for s in idle:
            s.close()
    assert wait_for(lambda: service.pending_streams == 0 and not service.sessions)


def test_a_stream_that_never_opens_is_ended(artifacts, serve):
    address, service = serve(open_timeout_s=0.3)
    stub = pb_grpc.SplitInferenceStub(grpc.insecure_channel(address))
    hold = threading.Event()

    def silent():
        hold.wait(20)
        return
        yield

    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(silent(), timeout=20))
    hold.set()
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "Open" in info.value.details()
    assert wait_for(lambda: service.pending_streams == 0)


# -- the header is checked before anything is decoded (defect 10) ------------------------------------
def count_calls(monkeypatch, owner, name, calls):
    """Replace owner.name by a wrapper that appends the calling thread's name to `calls`."""
    real = getattr(owner, name)
    monkeypatch.setattr(owner, name, lambda *a, **kw: (calls.append(threading.current_thread().name), real(*a, **kw))[1])


def test_a_frame_of_the_wrong_width_is_never_decoded(tiny_ckpt, artifacts, serve, monkeypatch):
    from splitlm.cloud import tail

    address, _ = serve()
    decoded = []
    count_calls(monkeypatch, tail, "decode_frames", decoded)
    plan, _ = artifacts
    wide = np.random.default_rng(0).standard_normal((16, 65535)).astype(np.float32)
    _, code, details = raw_call(address, [open_msg(plan), frame_msg(wide)])
    assert code == "INVALID_ARGUMENT" and "hidden size 65535" in details
    # issue 14.4: the hidden size is read from the header, before the rest of the frame is
    truncated = codec.encode(wide[:1, :96], TABQ)[: codec.HEADER.size + 5]
    act = pb.DeviceMessage(activations=pb.Activations(start_position=0, frame=truncated, want_token=True))
    _, code, details = raw_call(address, [open_msg(plan), act])
    assert code == "INVALID_ARGUMENT" and f"hidden size 96 does not match the model's {tiny_ckpt.spec.hidden_size}" in details
    assert not decoded


def test_a_local_session_refuses_the_wrong_width_before_decoding(tiny_ckpt, artifacts, monkeypatch):
    from splitlm.cloud import tail
    from splitlm.errors import CodecError

    runner = tail.TailRunner(artifacts[1].cloud_dir, warm_up=False)
    decoded = []
    count_calls(monkeypatch, tail, "decode_frames", decoded)
    session = runner.new_session()
    d = tiny_ckpt.spec.hidden_size
    with pytest.raises(CodecError, match=f"frame hidden size {d + 32} does not match the model's {d}"):
        session.next_token(codec.encode(np.ones((2, d + 32), np.float32), TABQ))
    with pytest.raises(CodecError, match="frame holds 2 rows, the caller sent it as 3"):
        session.next_token(codec.encode(hidden(tiny_ckpt, 2), TABQ), 3)
    assert not decoded
    assert isinstance(session.next_token(codec.encode(hidden(tiny_ckpt, 2), TABQ), 2), int)
    assert decoded == ["splitlm-tail"]  # decoded once, on the tail's torch thread
    session.close()
    runner.batcher.close()


# -- issue 14.4: each activation frame is parsed once ---------------------------------------------
def test_each_frame_is_parsed_once_by_the_server_and_never_by_the_device(tiny_ckpt, artifacts, serve, monkeypatch):
    from splitlm.cloud import service as service_module
    from splitlm.device import client
    from splitlm.device.runtime import HeadSession, generate_split

    address, _ = serve()
    plan, result = artifacts
    parsed, sent = [], []
    count_calls(monkeypatch, codec, "parse_frame", parsed)
    for module in (client, service_module):
        if hasattr(module, "parse_frame"):  # a name imported from the codec is counted where it is used
            count_calls(monkeypatch, module, "parse_frame", parsed)
    prompt = tiny_ckpt.tokenizer().encode("parsed once, decoded once").ids
    with open_session(address, plan, token=None) as remote:
        def send(frame: bytes, rows: int, want_token: bool) -> int | None:
            sent.append(rows)
            return remote.send(frame, rows, want_token)

        out = generate_split(HeadSession(result.device_dir), send, prompt, 6)
    assert len(out.token_ids) == 6 and sum(sent) == len(prompt) + 5  # the prompt (in chunks), then 5 steps
    assert parsed == ["splitlm-grpc"] * len(sent)  # once per frame, by the service: none by the device or the decoder


def test_the_batcher_decodes_a_turns_frames_in_one_call(tiny_ckpt, artifacts, monkeypatch):
    from splitlm.cloud import tail
    from splitlm.cloud.batcher import Frame
    from splitlm.model.llama import KVCache

    runner = tail.TailRunner(artifacts[1].cloud_dir, warm_up=False)
    sessions = [runner.new_session() for _ in range(4)]
    for i, s in enumerate(sessions):
        s.next_token(codec.encode(hidden(tiny_ckpt, 3 + i, seed=i), TABQ), 3 + i)
    frames = [codec.encode(hidden(tiny_ckpt, 1, seed=10 + i), TABQ) for i in range(4)]
    calls = []
    real = tail.decode_frames
    monkeypatch.setattr(tail, "decode_frames", lambda fs, *a: (calls.append((fs, real(fs, *a))), calls[-1][1])[1])
    started, gate = threading.Event(), threading.Event()
    blocker = runner.batcher.submit(KVCache(), lambda: (started.set(), gate.wait(10),
                                                        torch.from_numpy(hidden(tiny_ckpt, 1)))[-1])
    assert started.wait(10)  # the batcher thread is busy: the four frames arrive in one turn
    futures = [s.submit(f) for s, f in zip(sessions, frames)]
    gate.set()
    blocker.result(10)
    tokens = [f.result(10).id for f in futures]
    assert len(calls) == 1 and [f.data for f in calls[0][0]] == frames
    for frame, together in zip(frames, calls[0][1]):  # bit-identical to decoding each frame alone
        alone = real([Frame(frame, runner.parse(frame))], runner.kernels, runner.device)[0]
        assert together.dtype == alone.dtype == torch.float32 and torch.equal(together, alone)
    assert all(isinstance(t, int) for t in tokens)
    for s in sessions:
        s.close()
    runner.batcher.close()


def test_a_frame_that_fails_to_decode_fails_only_its_session(tiny_ckpt, artifacts, monkeypatch):
    from splitlm.cloud import tail
    from splitlm.errors import CodecError
    from splitlm.model.llama import KVCache

    runner = tail.TailRunner(artifacts[1].cloud_dir, warm_up=False)
    sessions = [runner.new_session() for _ in range(3)]
    frames = [codec.encode(hidden(tiny_ckpt, 2, seed=i), TABQ) for i in range(3)]
    real = tail.decode_frames

    def poisoned(fs, *a):
        if any(f.data == frames[1] for f in fs):
            raise CodecError("injected decode failure")
        return real(fs, *a)

    monkeypatch.setattr(tail, "decode_frames", poisoned)
    started, gate = threading.Event(), threading.Event()
    blocker = runner.batcher.submit(KVCache(), lambda: (started.set(), gate.wait(10),
                                                        torch.from_numpy(hidden(tiny_ckpt, 1)))[-1])
    assert started.wait(10)
    before = runner.batcher.frame_decodes
    futures = [s.submit(f) for s, f in zip(sessions, frames)]
    gate.set()
    blocker.result(10)
    assert isinstance(futures[0].result(10).id, int) and isinstance(futures[2].result(10).id, int)
    with pytest.raises(CodecError, match="injected decode failure"):
        futures[1].result(10)
    assert runner.batcher.frame_decodes - before == 4  # the three together, then each alone
    assert [s.cache.length for s in sessions] == [2, 0, 2]
    assert runner.batcher.reserved == 0
    for s in sessions:
        s.close()
    runner.batcher.close()


# -- endings are not errors; echoes are bounded (defect 11) -------------------------------------------
def test_normal_endings_are_not_logged_as_errors(tiny_ckpt, artifacts, serve, caplog):
    address, _ = serve(idle_timeout_s=0.3)
    plan, _ = artifacts
    caplog.set_level(logging.INFO, logger="splitlm")
    open_session(address, plan, token=None).close("user pressed ctrl-c")  # cancel
    stub = pb_grpc.SplitInferenceStub(grpc.insecure_channel(address))
    call = stub.Generate(iter([open_msg(plan)] + [frame_msg(hidden(tiny_ckpt, 2))]), timeout=20)
    next(call)
    call.cancel()  # the client goes away
    raw_call(address, [open_msg(plan)])  # half-close
    hold = threading.Event()

    def idle():
        yield open_msg(plan)
        hold.wait(20)

    with pytest.raises(grpc.RpcError):
        list(stub.Generate(idle(), timeout=20))  # idle timeout
    hold.set()
    time.sleep(0.3)
    bad = [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("splitlm")]
    assert not bad, [r.getMessage() for r in bad]
    assert not any(r.exc_info for r in caplog.records if r.name.startswith("splitlm"))


def test_a_huge_client_string_is_echoed_bounded(artifacts, serve, caplog):
    address, _ = serve()
    plan, _ = artifacts
    caplog.set_level(logging.INFO, logger="splitlm")
    _, code, details = raw_call(address, [open_msg(plan, plan_hash="x" * (1 << 20))])
    assert code == "FAILED_PRECONDITION" and "does not match" in details and len(details) < 300
    assert all(len(r.getMessage()) < 1000 for r in caplog.records)


# -- sampling values are refused, not replaced (defect 13) -------------------------------------------
@pytest.mark.parametrize("open_kw, message", [
    (dict(sampling=pb.Sampling(top_p=float("nan"))), "top_p"),
    (dict(sampling=pb.Sampling(top_p=-0.5)), "top_p"),
    (dict(sampling=pb.Sampling(top_p=1.5)), "top_p"),
    (dict(sampling=pb.Sampling(temperature=float("nan"))), "temperature"),
    (dict(sampling=pb.Sampling(temperature=-1.0)), "temperature"),
    (dict(sampling=pb.Sampling(logprobs=1000)), "logprobs"),
    (dict(max_tokens=0), "max_tokens"),
])
def test_bad_sampling_is_invalid_argument(artifacts, serve, open_kw, message):
    address, service = serve()
    plan, _ = artifacts
    _, code, details = raw_call(address, [open_msg(plan, **open_kw)])
    assert code == "INVALID_ARGUMENT" and message in details
    assert wait_for(lambda: not service.sessions)


def test_logprobs_come_with_each_token(tiny_ckpt, artifacts, serve):
    from splitlm.cloud.tail import TailRunner

    address, _ = serve()
    plan, result = artifacts
    x = hidden(tiny_ckpt, 5)
    got, code, _ = raw_call(address, [open_msg(plan, sampling=pb.Sampling(logprobs=4)), frame_msg(x)])
    assert code == "OK"
    token = got[1].token
    logits = TailRunner(result.cloud_dir, warm_up=False).new_session().logits(codec.encode(x, TABQ), last_only=True)[-1]
    logp = torch.log_softmax(logits.double(), -1)
    best = torch.topk(logp, 4)
    assert token.id == int(best.indices[0])
    assert [t.id for t in token.top] == best.indices.tolist()
    assert np.allclose([t.logprob for t in token.top], best.values.numpy(), atol=TOL["wire_logprob_abs"])
    assert token.logprob == pytest.approx(token.top[0].logprob)
    got, _, _ = raw_call(address, [open_msg(plan), frame_msg(x)])
    assert not got[1].token.top and got[1].token.logprob == 0  # none unless asked for


def test_the_client_asks_for_logprobs(tiny_ckpt, artifacts, serve):
    address, _ = serve()
    plan, _ = artifacts
    session = open_session(address, plan, token=None)
    from splitlm.device.client import RemoteSession, connect
    from splitlm.sampling import SamplingParams

    frame = codec.encode(hidden(tiny_ckpt, 3), TABQ)
    plain = session.next_token(frame, 3)
    session.close()
    with RemoteSession(connect(address), plan.hash, plan.model_id, SamplingParams(), 4, logprobs=2) as remote:
        assert remote.next_token(frame, 3) == plain
        assert [t.id for t in remote.last_token.top][0] == plain and len(remote.last_token.top) == 2
        assert remote.last_token.logprob <= 0
