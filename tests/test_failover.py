"""Failover by replay (DESIGN.md §7): real `splitlm serve` replicas, the serving one SIGKILLed mid-generation.

The device keeps the frames it sent; when its server dies it opens a session on the replica that
answers (gRPC round_robin over both addresses) and replays them. Greedy and seeded output equal an
unbroken run's, token for token.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from splitlm.device.client import FailoverConfig, LinkError, RemoteSession, ReplayingSession, connect
from splitlm.sampling import SamplingParams

KILLS = 20
"""Generations, each with its serving replica killed at a random frame."""


class Replica:
    """`splitlm -v serve` of an export in a subprocess: its address, and its log (which names the sessions it opened)."""

    def __init__(self, root: Path, log: Path, port: int = 0) -> None:
        self.root, self.log = root, log
        self.start(port)

    def start(self, port: int = 0) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "splitlm.cli", "-v", "serve", "--artifacts", str(self.root),
                                      "--port", str(port)], stdout=subprocess.PIPE, stderr=self.log.open("a"), text=True)
        watchdog = threading.Timer(180, self.proc.kill)
        watchdog.start()
        line = self.proc.stdout.readline()
        watchdog.cancel()
        ports = re.findall(r":(\d+)\b", line)
        assert "serving" in line and ports, f"the server did not start: {line!r} {self.log.read_text()[-2000:]}"
        self.address = f"127.0.0.1:{ports[-1]}"

    def holds(self, session_id: str) -> bool:
        return f"session={session_id}" in self.log.read_text()

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)
        self.proc.stdout.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.kill()


@pytest.fixture()
def replicas(artifacts, tmp_path):
    root = artifacts[1].device_dir.parent
    pair = [Replica(root, tmp_path / f"replica{i}.log") for i in range(2)]
    yield pair
    for r in pair:
        r.stop()


def _generate(head, channel, plan, prompt, n, sampling, kill_at=None, replicas=()):
    """A split generation through a ReplayingSession; before frame `kill_at` the replica serving the session is SIGKILLed."""
    from splitlm.device.runtime import generate_split

    with ReplayingSession(channel, plan.hash, plan.model_id, sampling, n, failover=FailoverConfig(deadline_s=30)) as remote:
        sent = [0]

        def send(frame, rows, want_token):
            if sent[0] == kill_at:
                serving = [r for r in replicas if r.holds(remote.remote.info.session_id)]
                assert len(serving) == 1, "exactly one replica opened the session"
                serving[0].kill()
            sent[0] += 1
            return remote.send(frame, rows, want_token)

        result = generate_split(head, send, prompt, n)
    return result.token_ids, remote.replays, sent[0]


def test_killed_replica_is_replaced_by_replay_with_identical_output(artifacts, replicas, tiny_ckpt):
    from splitlm.device.runtime import HeadSession

    plan, result = artifacts
    head = HeadSession(result.device_dir)
    prompt = tiny_ckpt.tokenizer().encode("the replica dies and the device carries on ").ids
    n = 24
    ways = {"greedy": SamplingParams(), "seeded": SamplingParams(temperature=0.9, top_k=40, seed=1234)}
    reference = {}
    for name, sampling in ways.items():
        with connect(",".join(r.address for r in replicas)) as channel:
            reference[name], replays, frames = _generate(head, channel, plan, prompt, n, sampling)
        assert not replays and len(reference[name]) == n
    rng = np.random.default_rng(7)
    for i in range(KILLS):
        name = "greedy" if i % 2 == 0 else "seeded"
        kill_at = int(rng.integers(1, frames))
        with connect(",".join(r.address for r in replicas)) as channel:
            tokens, replays, _ = _generate(head, channel, plan, prompt, n, ways[name], kill_at, replicas)
        assert tokens == reference[name], f"kill {i} ({name}) before frame {kill_at}: output differs"
        # the failure shows at the next frame that waits for a token: prefill chunks sent after the kill are replayed too
        assert len(replays) == 1 and replays[0].frames >= kill_at and replays[0].bytes > 0, replays
        for r in replicas:  # bring the killed one back for the next generation
            if r.proc.poll() is not None:
                r.start()


def test_every_replica_down_is_a_clear_error_naming_them(artifacts, replicas, tiny_ckpt):
    from splitlm.device.runtime import HeadSession, generate_split

    plan, result = artifacts
    head = HeadSession(result.device_dir)
    addresses = ",".join(r.address for r in replicas)
    prompt = tiny_ckpt.tokenizer().encode("nobody answers").ids
    with connect(addresses) as channel:
        remote = ReplayingSession(channel, plan.hash, plan.model_id, SamplingParams(), 8,
                                  failover=FailoverConfig(deadline_s=1.5, backoff_s=0.1))
        generate_split(head, remote.send, prompt[:3], 1)
        for r in replicas:
            r.kill()
        with pytest.raises(LinkError, match=re.escape(f"no replica of {addresses} took the session back within 1.5 s")):
            generate_split(head, remote.send, prompt, 4)
        remote.cancel()


def test_sessions_spread_over_replicas_and_the_cli_takes_a_list(artifacts, replicas, capsys):
    from splitlm.cli import main

    plan, result = artifacts
    addresses = ",".join(r.address for r in replicas)
    with connect(addresses) as channel:  # gRPC's round_robin: consecutive sessions of a channel go to the replicas in turn
        sessions = [ReplayingSession(channel, plan.hash, plan.model_id, SamplingParams(), 4) for _ in range(6)]
        ids = [s.remote.info.session_id for s in sessions]
        for s in sessions:
            s.close()
    # (both from the second session on; the very first may come while one replica is still connecting)
    assert all(sum(r.holds(sid) for sid in ids) >= 2 for r in replicas)
    root = str(result.device_dir.parent)
    assert main(["generate", "--artifacts", root, "--server", addresses, "--prompt", "two servers", "--max-tokens", "4"]) == 0
    assert "[split" in capsys.readouterr().err
    assert main(["generate", "--artifacts", root, "--prompt", "x", "--failover-deadline", "5"]) == 2
    assert "--failover-deadline needs --server" in capsys.readouterr().err


def test_sigterm_drains_live_sessions_onto_the_other_replica(artifacts, tmp_path, tiny_ckpt):
    """SIGTERM to a replica serving 4 live sessions: it reports NOT_SERVING, and all 4 finish on the other
    replica by replay with the output of an unbroken run; then the drained replica exits."""
    import socket

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from splitlm.device.runtime import HeadSession, generate_split

    plan, result = artifacts
    root = result.device_dir.parent
    first = Replica(root, tmp_path / "a.log")
    with socket.socket() as s:  # the second replica's port, known before it listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    later = None
    try:
        head = HeadSession(result.device_dir)
        prompts = [tiny_ckpt.tokenizer().encode(f"session {i} reads a little text first").ids for i in range(4)]
        n = 20
        with connect(first.address) as channel:
            expect = [_generate(head, channel, plan, p, n, SamplingParams())[0] for p in prompts]
        with connect(f"{first.address},127.0.0.1:{port}") as channel:
            # the second replica is not up yet: round_robin opens all four sessions on the first
            sessions = [ReplayingSession(channel, plan.hash, plan.model_id, SamplingParams(), n) for _ in prompts]
            assert all(first.holds(s.remote.info.session_id) for s in sessions)
            later = Replica(root, tmp_path / "b.log", port)
            outputs, errors = [None] * 4, []
            halfway = threading.Barrier(5)

            def run(i):
                try:
                    count = [0]

                    def send(frame, rows, want_token):
                        if want_token:
                            count[0] += 1
                            if count[0] == n // 2:
                                halfway.wait(60)
                        return sessions[i].send(frame, rows, want_token)

                    outputs[i] = generate_split(HeadSession(result.device_dir), send, prompts[i], n).token_ids
                except Exception as exc:  # noqa: BLE001 - reported below
                    errors.append(exc)

            threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
            for t in threads:
                t.start()
            only_first = connect(first.address)
            idle = RemoteSession(only_first, plan.hash, plan.model_id, SamplingParams(), 4)  # keeps the drain waiting
            halfway.wait(60)  # every session is mid-generation
            first.proc.send_signal(signal.SIGTERM)
            for t in threads:
                t.join(120)
            with grpc.insecure_channel(first.address) as hc:
                status = health_pb2_grpc.HealthStub(hc).Check(health_pb2.HealthCheckRequest(), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(LinkError, match="draining"):
                RemoteSession(only_first, plan.hash, plan.model_id, SamplingParams(), 4)
            idle.close()
            only_first.close()
            assert not errors, errors
            assert outputs == expect
            assert all(len(s.replays) == 1 for s in sessions)
            assert all(later.holds(s.remote.info.session_id) for s in sessions)
            for s in sessions:
                s.close()
        assert first.proc.wait(60) == 0
        assert "drained: 4 session(s) moved, 0 left" in first.proc.stdout.read()
    finally:
        first.stop()
        if later is not None:
            later.stop()
