"""Abrupt client disconnects and session deadlines (issue 13), on a real server on port 0.

A client that goes away mid-prefill (a 100-row frame, cut into chunks of 8 by the server) or
mid-decode, by cancelling its call or closing its channel, frees its session, its KV bytes and
its KV reservation; 200 of them leave the process's RSS bounded. A session's idle and total
deadlines end it with DEADLINE_EXCEEDED, whether it is waiting on the client or stepping.

Where a disconnect must land mid-step, a gate holds the tail's batcher thread right after the
step's first forward until the server has seen the client go, so the timing is deterministic.
"""

from __future__ import annotations

import gc
import logging
import queue
import threading
import time

import grpc
import numpy as np
import pytest

from splitlm.proto import splitlm_pb2 as pb
from splitlm.quantize import codec
from tests.test_service import TABQ
from tests.test_service_faults import open_msg, wait_for

GENERATE = "/splitlm.v1.SplitInference/Generate"
PREFILL_ROWS = 100
"""Rows of a mid-prefill frame: 13 chunks of the tiny plan's prefill_chunk (8)."""
RSS_GROWTH_LIMIT = 50 << 20


def frame(d: int, rows: int, seed: int = 0) -> bytes:
    return codec.encode(np.random.default_rng(seed).standard_normal((rows, d)).astype(np.float32), TABQ)


def act(frame_bytes: bytes, start: int = 0, want_token: bool = True) -> pb.DeviceMessage:
    return pb.DeviceMessage(activations=pb.Activations(start_position=start, frame=frame_bytes, want_token=want_token))


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


class Stream:
    """One Generate call whose requests are fed one by one (the stream stays open until `end`)."""

    def __init__(self, channel: grpc.Channel, timeout: float = 30.0) -> None:
        rpc = channel.stream_stream(GENERATE, request_serializer=pb.DeviceMessage.SerializeToString,
                                    response_deserializer=pb.CloudMessage.FromString)
        self.requests: queue.Queue = queue.Queue()
        self.call = rpc(iter(self.requests.get, None), timeout=timeout)

    def send(self, msg: pb.DeviceMessage) -> None:
        self.requests.put(msg)

    def receive(self) -> pb.CloudMessage:
        return next(self.call)

    def end(self) -> None:
        """Let the request iterator finish (after a cancel, it would otherwise hold a thread)."""
        self.requests.put(None)


class Gate:
    """Holds the batcher thread right after a forward of the armed kind ('prefill': more than one
    position; 'decode': one) until `release`."""

    def __init__(self, stage) -> None:
        self.stage, self.original = stage, stage.forward
        self.armed: str | None = None
        self.reached, self.go = threading.Event(), threading.Event()
        stage.forward = self.forward

    def forward(self, x, **kw):
        out = self.original(x, **kw)
        if self.armed == ("decode" if x.shape[1] == 1 else "prefill"):
            self.armed = None
            self.reached.set()
            self.go.wait(20)
        return out

    def arm(self, kind: str) -> None:
        self.reached.clear()
        self.go.clear()
        self.armed = kind

    def release(self) -> None:
        self.armed = None
        self.go.set()

    def remove(self) -> None:
        self.release()
        self.stage.forward = self.original


def disconnect(stream: Stream, channel: grpc.Channel, how: str) -> None:
    if how == "cancel":
        stream.call.cancel()
    else:
        channel.close()
    stream.end()


class Disconnects:
    """Sessions that go away abruptly at chosen moments, against one server."""

    def __init__(self, address: str, service, plan, d: int) -> None:
        self.address, self.service, self.plan = address, service, plan
        self.gate = Gate(service.runner.stage)
        self.shared = grpc.insecure_channel(address)
        self.long, self.prompt, self.step = frame(d, PREFILL_ROWS, 1), frame(d, 5, 2), frame(d, 1, 3)
        self.cut_mid_step = 0
        """Disconnects the server saw while the batcher was held inside the step."""

    def _open(self, how: str) -> tuple[Stream, grpc.Channel]:
        channel = self.shared if how == "cancel" else grpc.insecure_channel(self.address)
        stream = Stream(channel)
        stream.send(open_msg(self.plan, max_tokens=64))
        assert stream.receive().HasField("opened")
        return stream, channel

    def _cut_while_held(self, stream: Stream, channel: grpc.Channel, how: str) -> None:
        assert self.gate.reached.wait(20), "the step never reached the tail"
        disconnect(stream, channel, how)
        try:  # the server must notice while its batcher is still inside the step
            assert wait_for(lambda: not self.service.sessions), "a disconnected session was not freed"
            self.cut_mid_step += 1
        finally:
            self.gate.release()

    def mid_prefill(self, how: str) -> None:
        stream, channel = self._open(how)
        self.gate.arm("prefill")
        stream.send(act(self.long))
        self._cut_while_held(stream, channel, how)

    def mid_decode(self, how: str) -> None:
        stream, channel = self._open(how)
        stream.send(act(self.prompt))
        assert stream.receive().token.position == 5
        self.gate.arm("decode")
        stream.send(act(self.step, 5))
        self._cut_while_held(stream, channel, how)

    def right_after_sending(self, how: str, long: bool) -> None:
        """Wherever it lands: parsing, queued, in a chunk, answering."""
        stream, channel = self._open(how)
        stream.send(act(self.long if long else self.prompt))
        disconnect(stream, channel, how)

    def between_steps(self, how: str) -> None:
        stream, channel = self._open(how)
        stream.send(act(self.prompt))
        stream.receive()
        stream.send(act(self.step, 5))
        stream.receive()
        disconnect(stream, channel, how)

    def settle(self) -> None:
        """Every session gone and every KV byte back."""
        assert wait_for(lambda: not self.service.sessions and self.service.pending_streams == 0), self.service.sessions
        assert wait_for(lambda: self.service.kv_bytes() == 0), f"{self.service.kv_bytes()} KV bytes still held"

    def close(self) -> None:
        self.gate.remove()
        self.shared.close()


def one_token(address: str, plan, frame_bytes: bytes) -> int:
    """Open, send one frame, return its token (the server still serves, and serves the same)."""
    channel = grpc.insecure_channel(address)
    try:
        stream = Stream(channel)
        stream.send(open_msg(plan))
        stream.receive()
        stream.send(act(frame_bytes))
        token = stream.receive().token  # grpc.RpcError when the server ends the stream instead
        stream.end()
        for _ in stream.call:
            pass
        return token.id
    finally:
        channel.close()


# -- disconnects ------------------------------------------------------------------------------------------
def test_200_abrupt_disconnects_free_every_session_and_rss_stays_bounded(tiny_ckpt, artifacts, serve, caplog):
    caplog.set_level(logging.INFO, logger="splitlm")
    address, service = serve()
    plan, _ = artifacts
    d = tiny_ckpt.spec.hidden_size
    probe = frame(d, 7, 9)
    expected = one_token(address, plan, probe)
    cuts = Disconnects(address, service, plan, d)
    hows = ("cancel", "close")
    schedule = ([("mid_prefill", i) for i in range(80)] + [("mid_decode", i) for i in range(60)]
                + [("right_after_sending", i) for i in range(30)] + [("between_steps", i) for i in range(30)])
    try:
        for i in range(20):  # warm up: the allocator's and gRPC's first-use growth is not a leak
            cuts.mid_prefill(hows[i % 2])
            cuts.mid_decode(hows[i % 2])
        cuts.settle()
        gc.collect()
        before = rss_bytes()
        cuts.cut_mid_step = 0
        for kind, i in schedule:
            how = hows[i % 2]
            if kind == "right_after_sending":
                cuts.right_after_sending(how, long=i % 4 < 2)
            else:
                getattr(cuts, kind)(how)
        cuts.settle()
        assert cuts.cut_mid_step == 140  # every gated disconnect landed inside its step
        gc.collect()
        growth = rss_bytes() - before
    finally:
        cuts.close()
    assert growth < RSS_GROWTH_LIMIT, f"RSS grew by {growth / 2**20:.1f} MiB over 200 disconnects"
    assert one_token(address, plan, probe) == expected  # still serving, and the same
    cuts.settle()
    loud = [r.getMessage()[:300] for r in caplog.records
            if r.name.startswith("splitlm") and (r.levelno >= logging.WARNING or r.exc_info)]
    assert not loud, f"disconnects logged as problems: {loud[:5]}"


def _prefill_status(address: str, plan, frame_bytes: bytes) -> str:
    """Open and send one long frame: 'OK' when its token comes, else the status code's name and details."""
    try:
        one_token(address, plan, frame_bytes)
    except grpc.RpcError as exc:
        return f"{exc.code().name}: {exc.details()}"
    return "OK"


@pytest.mark.parametrize("how", ["cancel", "close"])
def test_a_disconnect_mid_prefill_gives_back_its_kv_reservation(tiny_ckpt, artifacts, serve, how):
    """A prefill reserves KV for all its rows before it runs. A session that goes away mid-prefill
    must give back the reservation of the rows that never ran, or the budget shrinks for good."""
    from splitlm.cloud.tail import TailRunner

    plan, result = artifacts
    d = tiny_ckpt.spec.hidden_size
    stage = TailRunner(result.cloud_dir, warm_up=False).batcher
    per_position = stage.kv_bytes_per_layer_position * len(stage.stage.owned_layers)
    address, service = serve(max_kv_bytes=int(per_position * 1.5 * PREFILL_ROWS))  # room for one long prompt
    long = frame(d, PREFILL_ROWS, 5)
    assert _prefill_status(address, plan, long) == "OK"
    cuts = Disconnects(address, service, plan, d)
    try:
        cuts.mid_prefill(how)
        cuts.settle()
    finally:
        cuts.close()
    assert _prefill_status(address, plan, long) == "OK"  # the empty server has its whole budget again
    cuts.settle()


# -- deadlines -----------------------------------------------------------------------------------------
def _run(address: str, requests, timeout: float = 30.0) -> tuple[list, str, str, float]:
    """One stream fed by `requests` (an iterator that may pause); (responses, status, details, seconds)."""
    channel = grpc.insecure_channel(address)
    rpc = channel.stream_stream(GENERATE, request_serializer=pb.DeviceMessage.SerializeToString,
                                response_deserializer=pb.CloudMessage.FromString)
    got: list = []
    t0 = time.monotonic()
    try:
        for msg in rpc(requests, timeout=timeout):
            got.append(msg)
    except grpc.RpcError as exc:
        return got, exc.code().name, exc.details() or "", time.monotonic() - t0
    finally:
        channel.close()
    return got, "OK", "", time.monotonic() - t0


def _tokens(responses) -> int:
    return sum(r.HasField("token") for r in responses)


def test_idle_deadline_ends_a_session_that_stops_sending(tiny_ckpt, artifacts, serve):
    address, service = serve(idle_timeout_s=0.5)
    plan, _ = artifacts
    hold = threading.Event()

    def requests():
        yield open_msg(plan)
        yield act(frame(tiny_ckpt.spec.hidden_size, 5))
        hold.wait(30)  # a client that has its token and goes silent

    got, code, details, _ = _run(address, requests())
    hold.set()
    assert code == "DEADLINE_EXCEEDED" and "no message within 0.5 s" in details, (code, details)
    assert _tokens(got) == 1
    assert wait_for(lambda: not service.sessions and service.kv_bytes() == 0)


def test_total_deadline_ends_an_idle_session_before_its_idle_deadline(tiny_ckpt, artifacts, serve):
    address, service = serve(idle_timeout_s=60, total_timeout_s=1.0)
    plan, _ = artifacts
    hold = threading.Event()

    def requests():
        yield open_msg(plan)
        yield act(frame(tiny_ckpt.spec.hidden_size, 5))
        hold.wait(30)

    got, code, details, seconds = _run(address, requests())
    hold.set()
    assert code == "DEADLINE_EXCEEDED" and "total deadline" in details, (code, details)
    assert seconds < 30  # the 60 s idle deadline did not decide it (the call's own is 30 s)
    assert _tokens(got) == 1
    assert wait_for(lambda: not service.sessions and service.kv_bytes() == 0)


def test_total_deadline_ends_a_busy_session_at_its_next_step(tiny_ckpt, artifacts, serve):
    """Steps sent back to back, each taking 0.3 s of server compute: never idle, ended at 1 s."""
    address, service = serve(idle_timeout_s=60, total_timeout_s=1.0)
    plan, _ = artifacts
    d = tiny_ckpt.spec.hidden_size
    stage = service.runner.stage
    original = stage.forward
    stage.forward = lambda x, **kw: (time.sleep(0.3), original(x, **kw))[1]
    steps = [act(frame(d, 5))] + [act(frame(d, 1, i), 4 + i) for i in range(1, 30)]
    try:
        got, code, details, _ = _run(address, iter([open_msg(plan, max_tokens=64)] + steps))
    finally:
        stage.forward = original
    assert code == "DEADLINE_EXCEEDED" and "total deadline" in details, (code, details)
    assert 1 <= _tokens(got) < len(steps)  # 30 steps take 9 s: it was cut off
    assert wait_for(lambda: not service.sessions and service.kv_bytes() == 0)


def test_total_deadline_ends_a_paced_session(tiny_ckpt, artifacts, serve):
    """A client that steps every 0.2 s (never idle for its 5 s) is still ended at its 1 s total."""
    address, service = serve(idle_timeout_s=5, total_timeout_s=1.0)
    plan, _ = artifacts
    d = tiny_ckpt.spec.hidden_size
    stop = threading.Event()

    def requests():
        yield open_msg(plan, max_tokens=64)
        yield act(frame(d, 5))
        for i in range(1, 50):  # 10 s of steps
            if stop.wait(0.2):
                return
            yield act(frame(d, 1, i), 4 + i)

    got, code, details, _ = _run(address, requests())
    stop.set()
    assert code == "DEADLINE_EXCEEDED" and "total deadline" in details, (code, details)
    assert 1 <= _tokens(got) < 50
    assert wait_for(lambda: not service.sessions and service.kv_bytes() == 0)
