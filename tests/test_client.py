"""The device's gRPC client: deadlines, keepalive, cancellation and argument checks.

The frozen-server tests run a real `splitlm serve` in a subprocess and stop it with SIGSTOP, as a
hung machine would; the other deadline tests use an in-process server that never answers.
Margins are wide: a deadline must fire no earlier than its value and well within 15 s.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest

from splitlm.device.client import LinkConfig, LinkError, RemoteSession, check_address, connect
from splitlm.errors import ConfigError, RemoteError, TransportError
from splitlm.proto import splitlm_pb2 as pb
from splitlm.sampling import SamplingParams

QUIET = dict(keepalive_s=600, keepalive_timeout_s=600)
"""Keepalive that never fires within a test: the step deadline alone is under test."""
posix_only = pytest.mark.skipif(not hasattr(signal, "SIGSTOP") or not Path("/proc/self/stat").exists(),
                                reason="freezes a process with SIGSTOP and watches /proc")


@pytest.fixture(scope="module")
def artifacts(artifacts):
    """The shared tiny export (conftest), with its root folder for `splitlm serve --artifacts`."""
    plan, result = artifacts
    return plan, result.device_dir.parent, result


# ---------------------------------------------------------------- helpers

@contextmanager
def serve_process(root: Path, log: Path):
    """`splitlm serve` of an export in a subprocess; yields (process, address). Always resumed and killed."""
    proc = subprocess.Popen([sys.executable, "-m", "splitlm.cli", "serve", "--artifacts", str(root), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=log.open("w"), text=True)
    watchdog = threading.Timer(180, proc.kill)  # a server that never says it is serving must not hang the suite
    watchdog.start()
    try:
        line = proc.stdout.readline()
        watchdog.cancel()
        ports = re.findall(r":(\d+)\b", line)
        assert "serving" in line and ports, f"the server did not start: {line!r} {log.read_text()[-2000:]}"
        yield proc, f"127.0.0.1:{ports[-1]}"
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
        proc.wait(30)
        proc.stdout.close()


def freeze(proc: subprocess.Popen) -> None:
    """SIGSTOP the process and wait until the kernel reports it stopped."""
    os.kill(proc.pid, signal.SIGSTOP)
    stat = Path(f"/proc/{proc.pid}/stat")
    deadline = time.monotonic() + 30
    while stat.read_text().rsplit(")", 1)[1].split()[0] not in "Tt":
        assert time.monotonic() < deadline, "the server did not stop"
        time.sleep(0.01)


def new_threads(before: set[threading.Thread], timeout: float = 10.0) -> list[str]:
    """Threads started since `before` that are still alive after `timeout` (a server's pool workers aside):
    a finished session must leave none behind (its deadline thread, grpc's request and event threads)."""
    deadline = time.monotonic() + timeout
    while True:
        extra = [t.name for t in threading.enumerate()
                 if t not in before and t.is_alive() and not t.name.startswith("ThreadPoolExecutor")]
        if not extra or time.monotonic() > deadline:
            return extra
        time.sleep(0.05)


class Silent:
    """A SplitInference server that answers Open (unless `open_too`) and then never answers again.
    `cancelled` is set when the client's call ends on the server's side."""

    def __init__(self, open_too: bool = False) -> None:
        self.open_too = open_too
        self.cancelled = threading.Event()
        self.messages: list[str] = []
        self.release = threading.Event()  # set at teardown so handler threads end

    def _read(self, request_iterator) -> None:
        try:
            for msg in request_iterator:
                self.messages.append(msg.WhichOneof("kind"))
        except grpc.RpcError:  # the call was cancelled
            pass

    def generate(self, request_iterator, context):
        context.add_callback(self.cancelled.set)
        next(request_iterator)
        if not self.open_too:
            yield pb.CloudMessage(opened=pb.Opened(session_id="s", max_seq_len=128, max_frame_bytes=1 << 20, max_tokens=8))
        threading.Thread(target=self._read, args=(request_iterator,), daemon=True).start()
        while context.is_active() and not self.release.wait(0.05):
            pass


@contextmanager
def silent_server(open_too: bool = False):
    silent = Silent(open_too)
    handler = grpc.method_handlers_generic_handler("splitlm.v1.SplitInference", {
        "Generate": grpc.stream_stream_rpc_method_handler(
            silent.generate, request_deserializer=pb.DeviceMessage.FromString,
            response_serializer=pb.CloudMessage.SerializeToString)})
    server = grpc.server(futures.ThreadPoolExecutor(4))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield silent, f"127.0.0.1:{port}"
    finally:
        silent.release.set()
        server.stop(None)


def open_silent(address: str, **link) -> RemoteSession:
    return RemoteSession(connect(address, link=LinkConfig(**{**QUIET, **link})), "plan", "model", SamplingParams(), 8)


# ---------------------------------------------------------------- a frozen `splitlm serve`

@posix_only
def test_a_server_frozen_mid_generation_fails_the_step_at_its_deadline(artifacts, tiny_ckpt, tmp_path):
    before = set(threading.enumerate())
    from splitlm.device.runtime import HeadSession, generate_split

    plan, root, result = artifacts
    link = LinkConfig(step_timeout_s=3, per_row_timeout_s=0.01, **QUIET)
    prompt = tiny_ckpt.tokenizer().encode("frozen in the middle").ids
    with serve_process(root, tmp_path / "serve.log") as (proc, address):
        remote = RemoteSession(connect(address, link=link), plan.hash, plan.model_id, SamplingParams(), 32)
        steps, waited = [], []

        def send(frame: bytes, rows: int, want_token: bool) -> int | None:
            if not want_token:  # a prompt chunk streamed ahead of the last
                return remote.send(frame, rows, want_token)
            steps.append(len(steps))
            if len(steps) == 4:
                freeze(proc)
            t0 = time.monotonic()
            try:
                return remote.send(frame, rows, want_token)
            finally:
                waited.append(time.monotonic() - t0)

        with pytest.raises(LinkError, match=r"no token from .* within 3\.0 s \(the step deadline") as info:
            generate_split(HeadSession(result.device_dir), send, prompt, 20)
        assert len(steps) == 4  # three tokens came before the freeze
        assert info.value.code == "DEADLINE_EXCEEDED" and address in str(info.value)
        assert isinstance(info.value, TransportError) and isinstance(info.value, RemoteError)
        assert 3.0 <= waited[-1] < 15
        assert remote.ended
        with pytest.raises(LinkError, match="step deadline"):  # the session stays failed, at once
            remote.next_token(b"", 1)
        remote.close()

        # a new session on the frozen server: the wait for Opened has its deadline too
        t0 = time.monotonic()
        with pytest.raises(LinkError, match=r"no answer to Open from .* \(the open deadline\)") as info:
            RemoteSession(connect(address, link=LinkConfig(open_timeout_s=2, **QUIET)), plan.hash, plan.model_id,
                          SamplingParams(), 8)
        assert info.value.code == "DEADLINE_EXCEEDED" and 2.0 <= time.monotonic() - t0 < 15
    assert not new_threads(before)


@posix_only
def test_keepalive_notices_a_frozen_server_while_the_device_is_between_steps(artifacts, tiny_ckpt, tmp_path):
    before = set(threading.enumerate())
    from splitlm.device.runtime import DeviceHead, HeadSession

    plan, root, result = artifacts
    link = LinkConfig(step_timeout_s=600, keepalive_s=1, keepalive_timeout_s=2)  # only keepalive can notice
    head = DeviceHead(HeadSession(result.device_dir))
    with serve_process(root, tmp_path / "serve.log") as (proc, address):
        remote = RemoteSession(connect(address, link=link), plan.hash, plan.model_id, SamplingParams(), 32)
        ids = tiny_ckpt.tokenizer().encode("idle").ids
        token = remote.next_token(head.encode(head.step(ids)), len(ids))
        frame = head.encode(head.step([token]))
        freeze(proc)
        t0 = time.monotonic()
        while not remote.ended and time.monotonic() - t0 < 60:  # the device sends nothing meanwhile
            time.sleep(0.05)
        noticed = time.monotonic() - t0
        assert remote.ended and noticed < 15, f"keepalive did not notice the frozen server in {noticed:.1f} s"
        t1 = time.monotonic()
        with pytest.raises(LinkError, match=r"lost the link to .*keepalive ping was not answered within 2 s") as info:
            remote.next_token(frame, 1)
        assert info.value.code == "UNAVAILABLE" and address in str(info.value)
        assert time.monotonic() - t1 < 5  # known already: no wait for the step deadline
        remote.close()
    assert not new_threads(before)


def test_an_idle_session_outlives_its_keepalive_pings(artifacts, tiny_ckpt):
    """The server must accept the client's pings on a quiet stream: without a permissive ping policy
    (grpc.http2.min_ping_interval_without_data_ms) gRPC answers the fourth one with GOAWAY too_many_pings."""
    from splitlm.cloud.service import ServerConfig, start_server
    from splitlm.cloud.tail import TailRunner
    from splitlm.device.runtime import DeviceHead, HeadSession

    plan, _, result = artifacts
    head = DeviceHead(HeadSession(result.device_dir))
    srv, port, _ = start_server(TailRunner(result.cloud_dir), "127.0.0.1:0", ServerConfig())
    before = set(threading.enumerate())  # the server's own threads stay
    try:
        link = LinkConfig(keepalive_s=1.5, keepalive_timeout_s=10)
        with RemoteSession(connect(f"127.0.0.1:{port}", link=link), plan.hash, plan.model_id, SamplingParams(), 8) as remote:
            ids = tiny_ckpt.tokenizer().encode("quiet").ids
            token = remote.next_token(head.encode(head.step(ids)), len(ids))
            time.sleep(8)  # five pings with nothing else on the stream
            assert not remote.ended
            remote.next_token(head.encode(head.step([token])), 1)
        assert not new_threads(before)
    finally:
        srv.stop(None)


# ---------------------------------------------------------------- a server that never answers

def test_the_step_deadline_grows_with_the_rows_sent_and_cancels_the_call():
    before = set(threading.enumerate())
    with silent_server() as (silent, address):
        remote = open_silent(address, step_timeout_s=1, per_row_timeout_s=0.02)
        for bad in (0, True, 2.0):  # the rows the caller encoded: a count, never read from the frame
            with pytest.raises(ConfigError, match=f"rows must be the positions in the frame .* got {bad!r}"):
                remote.send(b"frame", want_token=False, rows=bad)
        assert remote.position == 0
        remote.send(b"frame", want_token=False, rows=30)
        t0 = time.monotonic()
        with pytest.raises(LinkError, match=r"within 2\.0 s \(the step deadline for 50 rows: 1 s \+ 0\.02 s per row\)"):
            remote.send(b"frame", rows=20)
        assert 2.0 <= time.monotonic() - t0 < 15
        assert silent.cancelled.wait(10)  # the call really ended, on the server too
        remote.close()
    assert not new_threads(before)


def test_the_wait_for_opened_has_a_deadline():
    before = set(threading.enumerate())
    with silent_server(open_too=True) as (silent, address):
        t0 = time.monotonic()
        with pytest.raises(LinkError, match=rf"no answer to Open from {address} within 1\.5 s \(the open deadline\)") as info:
            open_silent(address, open_timeout_s=1.5)
        assert info.value.code == "DEADLINE_EXCEEDED" and 1.5 <= time.monotonic() - t0 < 15
        assert silent.cancelled.wait(10)
    assert not new_threads(before)


def test_cancel_from_another_thread_ends_a_waiting_step():
    before = set(threading.enumerate())
    with silent_server() as (silent, address):
        remote = open_silent(address, step_timeout_s=600)
        outcome = []

        def step():
            try:
                remote.send(b"frame", rows=1)
            except Exception as exc:  # noqa: BLE001 - the test inspects it
                outcome.append(exc)

        waiter = threading.Thread(target=step)
        waiter.start()
        remote.cancel("user pressed stop")
        waiter.join(15)
        assert not waiter.is_alive()
        assert isinstance(outcome[0], LinkError) and outcome[0].code == "CANCELLED"
        assert "user pressed stop" in str(outcome[0])
        assert silent.cancelled.wait(10)
        with pytest.raises(LinkError, match="cancelled"):
            remote.send(b"frame", rows=1)
    assert not new_threads(before)


def test_close_does_not_wait_forever_for_a_server_that_never_ends_the_stream():
    before = set(threading.enumerate())
    with silent_server() as (silent, address):
        remote = open_silent(address, open_timeout_s=3)
        t0 = time.monotonic()
        remote.close("bye")
        assert time.monotonic() - t0 < 15 and remote.ended
        assert silent.cancelled.wait(10)
        assert "cancel" in silent.messages  # the server was told why before the call was cut
    assert not new_threads(before)


def test_an_exception_inside_the_session_block_cancels_without_waiting():
    before = set(threading.enumerate())
    with silent_server() as (silent, address):
        t0 = time.monotonic()
        with pytest.raises(KeyError):
            with open_silent(address, open_timeout_s=30):
                raise KeyError("device failure")
        assert time.monotonic() - t0 < 15
        assert silent.cancelled.wait(10)
    assert not new_threads(before)


def test_a_refused_connection_is_unavailable_and_names_the_address():
    with silent_server() as (_, address):
        pass  # the port is free again
    with pytest.raises(LinkError, match=rf"cannot reach {address}") as info:
        open_silent(address)
    assert info.value.code == "UNAVAILABLE"


# ---------------------------------------------------------------- arguments

@pytest.mark.parametrize("max_tokens", [-3, 0, 2**32, 1.5, True, "8"])
def test_max_tokens_out_of_range_is_a_config_error(max_tokens):
    with pytest.raises(ConfigError, match=r"max_tokens must be an integer in \[1, 4294967295\]"):
        RemoteSession(connect("127.0.0.1:9"), "plan", "model", SamplingParams(), max_tokens)


@pytest.mark.parametrize("sampling, message", [
    (SamplingParams(temperature=1e300), "temperature must be 0 .* float32"),
    (SamplingParams(temperature=1e-50), "temperature must be 0 .* float32"),
    (SamplingParams(top_p=1e-50), "top_p must be in .* 0 would read as 1"),
    (SamplingParams(top_k=2**32), r"top_k must be an integer in \[0, 4294967295\]"),
    (SamplingParams(top_k=2.0), "top_k must be an integer"),
    (SamplingParams(seed=-1), "seed must be None or an integer"),
    (SamplingParams(seed=2**64), "seed must be None or an integer"),
])
def test_sampling_values_the_proto_cannot_carry_are_config_errors(sampling, message):
    with pytest.raises(ConfigError, match=message):
        RemoteSession(connect("127.0.0.1:9"), "plan", "model", sampling, 8)


@pytest.mark.parametrize("token", ["two words", "line\nbreak", "caf\u00e9"])
def test_a_token_that_cannot_be_a_header_is_a_config_error(token):
    with pytest.raises(ConfigError, match="bearer token must be printable ASCII"):
        RemoteSession(connect("127.0.0.1:9"), "plan", "model", SamplingParams(), 8, token)


@pytest.mark.parametrize("field, value", [("step_timeout_s", 0), ("open_timeout_s", -1), ("keepalive_s", float("inf")),
                                          ("keepalive_timeout_s", float("nan")), ("per_row_timeout_s", -0.1)])
def test_link_config_refuses_bad_durations(field, value):
    with pytest.raises(ConfigError, match=field):
        LinkConfig(**{field: value})


def test_link_config_keepalive_options():
    options = dict(LinkConfig(keepalive_s=5, keepalive_timeout_s=10).channel_options())
    assert options["grpc.keepalive_time_ms"] == 5000 and options["grpc.keepalive_timeout_ms"] == 10000
    assert options["grpc.http2.ping_timeout_ms"] == 10000 and options["grpc.http2.max_pings_without_data"] == 0
    assert LinkConfig(step_timeout_s=15, per_row_timeout_s=0.02).step_deadline_s(2048) == pytest.approx(15 + 40.96)


@pytest.mark.parametrize("address, message", [
    ("localhost", "is not HOST:PORT"), (":50051", "is not HOST:PORT"), ("localhost:", "port '' is not a number"),
    ("localhost:99999", "port '99999' is not a number in 1..65535"), ("localhost:0", "port '0'"),
    ("localhost:http", "port 'http'"), ("::1:50051", "IPv6 goes in brackets"), ("[fe80::zz]:1", "not an IPv6 address"),
    ("two words:1", "not a host name"), ("dns:///cloud:443", "not a host name"),
])
def test_an_address_that_is_not_host_port_is_a_config_error(address, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        connect(address)


@pytest.mark.parametrize("address", ["127.0.0.1:50051", "[::1]:50051", "cloud-1.example.com:443", "localhost:1"])
def test_host_port_addresses_are_accepted(address):
    assert check_address(address) == address
    connect(address).close()


def test_a_tls_ca_file_that_is_not_pem_says_so(tmp_path):
    cases = {"garbage.pem": (b"\x00\x01 not a certificate", "no '-----BEGIN CERTIFICATE-----' block"),
             "key.pem": (b"-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----\n", "it holds PRIVATE KEY"),
             "b64.pem": (b"-----BEGIN CERTIFICATE-----\n%%%%\n-----END CERTIFICATE-----\n", "not valid base64"),
             "der.pem": (b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "does not hold a DER certificate")}
    for name, (data, why) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(ConfigError, match=rf"TLS root certificate file .*{name}' is not a PEM certificate \(.*{why}"):
            connect("localhost:50051", path)
        with pytest.raises(ConfigError, match=r"TLS root certificate data is not a PEM certificate"):
            connect("localhost:50051", data)
    with pytest.raises(ConfigError, match="cannot read TLS root certificate file .*missing.pem"):
        connect("localhost:50051", tmp_path / "missing.pem")


def test_a_real_pem_certificate_is_accepted(tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost"], check=True, capture_output=True)
    connect("localhost:50051", cert).close()
    connect("localhost:50051", cert.read_bytes()).close()
    connect("localhost:50051", str(cert)).close()
