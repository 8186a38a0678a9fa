"""The gRPC service on a real server (port 0) and a real channel."""

import threading

import numpy as np
import pytest

from splitlm.errors import RemoteError
from splitlm.quantize import codec
from splitlm.quantize.config import CodecConfig
from splitlm.sampling import SamplingParams
from tests.tolerances import TOL


@pytest.fixture()
def server(artifacts):
    from splitlm.cloud.service import ServerConfig, start_server
    from splitlm.cloud.tail import TailRunner

    _, result = artifacts
    srv, port, service = start_server(TailRunner(result.cloud_dir), "127.0.0.1:0",
                                      ServerConfig(max_sessions=4, max_frame_bytes=4096, auth_token="s3cret"))
    yield f"127.0.0.1:{port}", service
    srv.stop(grace=None)


def open_session(address, plan, token="s3cret", sampling=SamplingParams(), max_tokens=64):
    from splitlm.device.client import RemoteSession, connect

    return RemoteSession(connect(address), plan.hash, plan.model_id, sampling, max_tokens, token)


def generate_remote(address, artifacts, prompt, n, **kw):
    from splitlm.device.runtime import HeadSession, generate_split

    plan, result = artifacts
    with open_session(address, plan, **kw) as remote:
        return generate_split(HeadSession(result.device_dir), remote.send, prompt, n)


def test_grpc_generation_equals_in_process_split(tiny_ckpt, artifacts, server):
    from splitlm.local import LocalSplit

    plan, _ = artifacts
    prompt = tiny_ckpt.tokenizer().encode("over the wire and back again").ids
    got = generate_remote(server[0], artifacts, prompt, 20)
    assert got.token_ids == LocalSplit(tiny_ckpt, plan=plan).generate(prompt, 20).token_ids
    assert not server[1].sessions  # freed


def test_eight_concurrent_sessions_get_what_each_gets_alone(tiny_ckpt, artifacts):
    from splitlm.cloud.service import ServerConfig, start_server
    from splitlm.cloud.tail import TailRunner

    _, result = artifacts
    srv, port, service = start_server(TailRunner(result.cloud_dir), "127.0.0.1:0", ServerConfig(max_sessions=8))
    address = f"127.0.0.1:{port}"
    try:
        prompts = [tiny_ckpt.tokenizer().encode(f"prompt number {i} " * (i % 3 + 1)).ids for i in range(8)]
        alone = [generate_remote(address, artifacts, p, 16, token=None).token_ids for p in prompts]
        before = service.runner.batcher.batched_steps
        results = [None] * 8
        start = threading.Barrier(8)

        def run(i):
            start.wait()
            results[i] = generate_remote(address, artifacts, prompts[i], 16, token=None).token_ids

        threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert results == alone
        assert service.runner.batcher.batched_steps > before  # decode steps really shared forwards
    finally:
        srv.stop(grace=None)


def test_batched_decode_equals_one_by_one(tiny_ckpt, artifacts):
    import torch

    from splitlm.cloud.tail import TailRunner

    runner = TailRunner(artifacts[1].cloud_dir)
    d = tiny_ckpt.spec.hidden_size
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randn(n, d, generator=g).to(runner.device) for n in (3, 9, 5, 1)]  # CUDA where there is one
    steps = torch.randn(len(prompts), 1, d, generator=g).to(runner.device)
    alone, batcher, caches, futures = _alone_and_batched(runner.stage, prompts, steps)
    assert batcher.batches == 1 and batcher.batched_steps == len(prompts)
    for (a, _), f in zip(alone, futures):
        assert torch.allclose(a[-1], f.result()[-1], atol=TOL["fp32_batched"], rtol=TOL["fp32_batched"])
    assert [c.length for c in caches] == [p.shape[0] + 1 for p in prompts]


def _alone_and_batched(stage, prompts, steps):
    """Each session's prompt then step run alone: ([(its step's logits, its cache)]); and the same prompts run on a
    Batcher with all the steps in one turn: (batcher, the caches, the steps' futures)."""
    import torch

    from splitlm.cloud.batcher import Batcher
    from splitlm.model.llama import KVCache

    alone = []
    with torch.inference_mode():
        for p, x in zip(prompts, steps):
            cache = KVCache()
            stage(p[None], cache=cache)
            alone.append((stage(x[None], cache=cache)[0], cache))
    batcher = Batcher(stage)
    caches = [KVCache() for _ in prompts]
    for c, p in zip(caches, prompts):
        batcher.run(c, p)
    futures = in_one_turn(batcher, list(zip(caches, steps)))
    batcher.close()
    return alone, batcher, caches, futures


def test_steps_of_several_rows_share_the_batched_forward(tiny_ckpt, artifacts):
    """Speculative steps (a few rows, all logits) of sessions of different lengths run in one padded forward, the
    one-row decode steps of the same turn in another; each session's logits and K/V are those of its step run alone."""
    import torch

    from splitlm.cloud.tail import TailRunner

    runner = TailRunner(artifacts[1].cloud_dir)
    d = tiny_ckpt.spec.hidden_size
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randn(n, d, generator=g).to(runner.device) for n in (3, 9, 5, 2, 7)]
    steps = [torch.randn(n, d, generator=g).to(runner.device) for n in (1, 4, 6, 1, 2)]
    results, batcher, caches, futures = _alone_and_batched(runner.stage, prompts, steps)
    alone = [a for a, _ in results]
    kv = [cache.read(runner.stage.start) for _, cache in results]
    assert batcher.batches == 2 and batcher.batched_steps == len(steps)  # the two decode steps, the three speculative ones
    for a, f, c, (k, v) in zip(alone, futures, caches, kv):
        got = f.result()
        assert got.shape == a.shape
        assert torch.allclose(a, got, atol=TOL["fp32_batched"], rtol=TOL["fp32_batched"])
        ck, cv = c.read(runner.stage.start)
        assert ck.shape == k.shape and torch.allclose(ck, k, atol=TOL["fp32_batched"], rtol=TOL["fp32_batched"])
    assert [c.length for c in caches] == [p.shape[0] + x.shape[0] for p, x in zip(prompts, steps)]


TABQ = CodecConfig("tabq", entropy="none", error_budget=0.01)  # the artifacts' plan codec


def _bad_frames(d):
    good = codec.encode(np.ones((1, d), np.float32), TABQ)
    nan = bytearray(good)
    scales = codec.HEADER.size + 3  # after one row's bit width (u8) and outlier count (u16)
    nan[scales:scales + 2] = np.float16(np.nan).tobytes()
    reserved = bytearray(good)
    reserved[7] = 1
    return {
        "garbage": (b"definitely not a frame", "INVALID_ARGUMENT", "magic"),
        "wrong hidden size": (codec.encode(np.ones((1, d + 3), np.float32), TABQ), "INVALID_ARGUMENT", "hidden size"),
        "wrong kind": (codec.encode(np.ones((1, d), np.float32), CodecConfig("fp32")), "INVALID_ARGUMENT", "plan's codec"),
        "nan": (bytes(nan), "INVALID_ARGUMENT", "non-finite"),
        "too large": (codec.encode(np.ones((40, d), np.float32), CodecConfig("fp32")), "INVALID_ARGUMENT", "exceeds the limit"),
    }


@pytest.mark.parametrize("case", ["garbage", "wrong hidden size", "wrong kind", "nan", "too large"])
def test_bad_frames_fail_only_their_session(tiny_ckpt, artifacts, server, case):
    plan, _ = artifacts
    frame, code, message = _bad_frames(tiny_ckpt.spec.hidden_size)[case]
    prompt = tiny_ckpt.tokenizer().encode("a healthy neighbour").ids
    healthy = open_session(server[0], plan)
    from splitlm.device.runtime import HeadSession, generate_split

    bad = open_session(server[0], plan)
    with pytest.raises(RemoteError, match=message) as info:
        bad.send(frame, rows=1)
    assert info.value.code == code
    out = generate_split(HeadSession(artifacts[1].device_dir), healthy.send, prompt, 8)
    assert len(out.token_ids) == 8
    healthy.close()


@pytest.mark.parametrize("kw, code", [
    (dict(token=None), "UNAUTHENTICATED"),
    (dict(token="wrong"), "UNAUTHENTICATED"),
])
def test_auth(artifacts, server, kw, code):
    plan, _ = artifacts
    with pytest.raises(RemoteError) as info:
        open_session(server[0], plan, **kw)
    assert info.value.code == code


def test_plan_hash_mismatch_is_failed_precondition(artifacts, server):
    plan, _ = artifacts
    with pytest.raises(RemoteError, match="does not match") as info:
        open_session(server[0], plan.replace(kv_bits=8))
    assert info.value.code == "FAILED_PRECONDITION"


def test_too_many_sessions_is_resource_exhausted(artifacts, server):
    plan, _ = artifacts
    held = [open_session(server[0], plan) for _ in range(4)]
    with pytest.raises(RemoteError, match="limit of 4 sessions") as info:
        open_session(server[0], plan)
    assert info.value.code == "RESOURCE_EXHAUSTED"
    for s in held:
        s.close()
    open_session(server[0], plan).close()  # capacity is back


def test_out_of_order_position_is_invalid_argument(tiny_ckpt, artifacts, server):
    plan, _ = artifacts
    session = open_session(server[0], plan)
    session.position = 5
    frame = codec.encode(np.ones((1, tiny_ckpt.spec.hidden_size), np.float32), TABQ)
    with pytest.raises(RemoteError, match="starts at position 5") as info:
        session.next_token(frame, 1)
    assert info.value.code == "INVALID_ARGUMENT"


def test_health_service_reports_serving(server):
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(server[0]))
    for name in ("", "splitlm.v1.SplitInference"):
        assert stub.Check(health_pb2.HealthCheckRequest(service=name)).status == health_pb2.HealthCheckResponse.SERVING


def test_idle_session_is_freed(artifacts):
    import time

    from splitlm.cloud.service import ServerConfig, start_server
    from splitlm.cloud.tail import TailRunner

    plan, result = artifacts
    srv, port, service = start_server(TailRunner(result.cloud_dir), "127.0.0.1:0", ServerConfig(idle_timeout_s=0.5))
    try:
        session = open_session(f"127.0.0.1:{port}", plan, token=None)
        assert len(service.sessions) == 1
        deadline = time.time() + 10
        while service.sessions and time.time() < deadline:
            time.sleep(0.1)
        assert not service.sessions
        with pytest.raises(RemoteError):
            session.next_token(codec.encode(np.ones((1, 64), np.float32), TABQ), 1)
    finally:
        srv.stop(grace=None)


def test_unknown_or_live_session_cannot_be_resumed(artifacts, server):
    from splitlm.device.client import RemoteSession, connect

    plan, _ = artifacts
    with pytest.raises(RemoteError, match="unknown or expired session") as info:
        RemoteSession(connect(server[0]), plan.hash, plan.model_id, SamplingParams(), 8, "s3cret", resume_session="nope")
    assert info.value.code == "NOT_FOUND"
    live = open_session(server[0], plan)
    with pytest.raises(RemoteError, match="attached to another stream") as info:
        RemoteSession(connect(server[0]), plan.hash, plan.model_id, SamplingParams(), 8, "s3cret",
                      resume_session=live.info.session_id)
    assert info.value.code == "FAILED_PRECONDITION"
    live.close()


def test_cancel_frees_the_session(artifacts, server):
    import time

    plan, _ = artifacts
    session = open_session(server[0], plan)
    assert len(server[1].sessions) == 1
    session.close("user pressed ctrl-c")
    deadline = time.time() + 5
    while server[1].sessions and time.time() < deadline:
        time.sleep(0.05)
    assert not server[1].sessions


def test_tls_with_token(tiny_ckpt, artifacts, tmp_path):
    import subprocess

    from splitlm.cloud.service import ServerConfig, start_server, tls_credentials
    from splitlm.cloud.tail import TailRunner
    from splitlm.device.client import RemoteSession, connect
    from splitlm.device.runtime import HeadSession, generate_split

    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    plan, result = artifacts
    srv, port, _ = start_server(TailRunner(result.cloud_dir), "127.0.0.1:0", ServerConfig(auth_token="t"),
                                tls_credentials(cert.read_bytes(), key.read_bytes()))
    try:
        channel = connect(f"localhost:{port}", cert.read_bytes())
        with RemoteSession(channel, plan.hash, plan.model_id, SamplingParams(), 8, "t") as remote:
            prompt = tiny_ckpt.tokenizer().encode("secure").ids
            out = generate_split(HeadSession(result.device_dir), remote.send, prompt, 5)
        assert len(out.token_ids) == 5
        with pytest.raises(RemoteError):  # a plaintext client cannot talk to the TLS port
            RemoteSession(connect(f"localhost:{port}"), plan.hash, plan.model_id, SamplingParams(), 8, "t")
    finally:
        srv.stop(grace=None)


def test_kv_memory_budget_is_resource_exhausted(tiny_ckpt, artifacts):
    from splitlm.cloud.service import ServerConfig, start_server
    from splitlm.cloud.tail import TailRunner

    plan, result = artifacts
    per_position = tiny_ckpt.spec.kv_bytes_per_token(2, 32)
    srv, port, _ = start_server(TailRunner(result.cloud_dir), "127.0.0.1:0", ServerConfig(max_kv_bytes=int(per_position * 10)))
    try:
        session = open_session(f"127.0.0.1:{port}", plan, token=None)
        frame = codec.encode(np.ones((8, tiny_ckpt.spec.hidden_size), np.float32), TABQ)
        session.next_token(frame, 8)
        with pytest.raises(RemoteError, match="budget") as info:
            session.next_token(frame, 8)
        assert info.value.code == "RESOURCE_EXHAUSTED"
    finally:
        srv.stop(grace=None)


def in_one_turn(batcher, steps):
    """Submit (cache, hidden) steps so that the batcher's loop takes them all in one turn: its thread
    is held by a gate (a throwaway step whose hidden states wait for it) until all are queued."""
    import torch

    from splitlm.model.llama import KVCache

    gate = threading.Event()
    d = batcher.stage.spec.hidden_size
    blocker = batcher.submit(KVCache(), lambda: (gate.wait(10), torch.zeros(1, d))[1])
    futures = [batcher.submit(cache, hidden) for cache, hidden in steps]
    gate.set()
    blocker.result(timeout=30)
    return futures


def test_a_turn_waits_briefly_for_the_other_sessions_steps(tiny_ckpt, artifacts):
    """Clients answer their tokens a little apart: a turn holding one session's step waits (up to
    gather_s) for the steps of the other sessions that have run, so they batch instead of
    alternating between batches of 1 and of the rest."""
    import time

    import torch

    from splitlm.cloud.batcher import Batcher
    from splitlm.cloud.tail import TailRunner
    from splitlm.model.llama import KVCache

    stage = TailRunner(artifacts[1].cloud_dir, warm_up=False).stage
    d = tiny_ckpt.spec.hidden_size
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((4, 1, d), dtype=np.float32))
    batcher = Batcher(stage, gather_s=2.0)
    caches = [KVCache() for _ in range(3)]
    for c in caches:
        batcher.run(c, torch.ones(2, d))
    t0 = time.monotonic()
    futures = [batcher.submit(caches[0], x[0])]
    for c, xi in zip(caches[1:], x[1:]):
        time.sleep(0.05)  # the others arrive 50 and 100 ms later
        futures.append(batcher.submit(c, xi))
    for f in futures:
        f.result(timeout=30)
    assert batcher.batches == 1 and batcher.batched_steps == 3  # one batch of three
    assert time.monotonic() - t0 < 1.5  # it stopped waiting once every session had sent
    # a session alone does not wait: nobody else has run
    lone = Batcher(stage, gather_s=2.0)
    c = KVCache()
    lone.run(c, torch.ones(2, d))
    t1 = time.monotonic()
    lone.run(c, x[3])
    assert time.monotonic() - t1 < 1.5
    # a session that sent nothing costs the others gather_s at most, and a released one nothing
    batcher.release(caches[2])
    t2 = time.monotonic()
    batcher.run(caches[0], x[3])  # caches[1] is active but silent
    waited = time.monotonic() - t2
    batcher.close()
    lone.close()
    assert 2.0 <= waited < 4.0


def test_a_long_prompt_streams_chunk_by_chunk_and_gets_what_one_frame_gets(tiny_ckpt, artifacts, server):
    """Each prefill chunk's frame goes out as the head computes it (want_token false until the
    last), so the cloud prefills one chunk while the device computes the next."""
    from splitlm.device.runtime import HeadSession, generate_split

    plan, result = artifacts
    prompt = tiny_ckpt.tokenizer().encode("a prompt of several prefill chunks, " * 2).ids[:2 * plan.prefill_chunk + 5]
    assert len(prompt) == 2 * plan.prefill_chunk + 5
    sends = []
    with open_session(server[0], plan) as remote:
        def send(frame, rows, want_token):
            sends.append((rows, want_token))
            return remote.send(frame, rows, want_token)

        streamed = generate_split(HeadSession(result.device_dir), send, prompt, 6)
    with open_session(server[0], plan) as remote:
        whole = generate_split(HeadSession(result.device_dir), remote.send, prompt, 6, stream_prefill=False)
    c = plan.prefill_chunk
    assert sends[:4] == [(c, False), (c, False), (5, True), (1, True)]
    assert streamed.token_ids == whole.token_ids and len(streamed.token_ids) == 6
