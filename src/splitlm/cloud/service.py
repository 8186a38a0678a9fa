"""The gRPC service: one bidirectional stream per generation session, KV per session.

This first version runs each session's steps on its own stream thread (no cross-session
batching yet). Every error a client can cause maps to one status code in `status_for`,
ends only its own stream, and frees the session.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from concurrent import futures
from dataclasses import dataclass
from typing import Iterator

import grpc

from splitlm.cloud.tail import TailRunner, TailSession
from splitlm.errors import CodecError, ConfigError, PlanError, SplitLMError
from splitlm.proto import splitlm_pb2 as pb
from splitlm.proto import splitlm_pb2_grpc as pb_grpc
from splitlm.quantize.codec import parse_frame
from splitlm.sampling import SamplingParams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerConfig:
    """Limits and options of `splitlm serve`."""

    max_sessions: int = 64
    """Concurrent sessions; one more is answered RESOURCE_EXHAUSTED."""
    max_frame_bytes: int = 8 << 20
    """Largest activation frame accepted (INVALID_ARGUMENT above)."""
    max_tokens: int = 4096
    """Tokens one session may generate."""
    max_kv_bytes: int = 8 << 30
    """KV cache bytes all sessions together may hold; a step that would pass it is RESOURCE_EXHAUSTED."""
    auth_token: str | None = None
    """When set, every stream must carry `authorization: Bearer <token>` (else UNAUTHENTICATED)."""
    workers: int = 32
    """Stream threads; bounds concurrent streams together with max_sessions."""
    idle_timeout_s: float = 120.0
    """A session that sends nothing for this long is cancelled and freed."""
    total_timeout_s: float = 3600.0
    """A session older than this is ended with DEADLINE_EXCEEDED at its next message."""

    def __post_init__(self) -> None:
        for name in ("max_sessions", "max_frame_bytes", "max_tokens", "max_kv_bytes", "workers", "idle_timeout_s",
                     "total_timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"server {name} must be > 0, got {getattr(self, name)}")


class RequestError(Exception):
    """A client error with the status code it maps to."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The one place that maps exceptions to gRPC status codes."""
    if isinstance(exc, RequestError):
        return exc.code, str(exc)
    if isinstance(exc, PlanError):
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
    if isinstance(exc, (CodecError, ConfigError)):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, SplitLMError):
        return grpc.StatusCode.INTERNAL, str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}"


class SplitInferenceService(pb_grpc.SplitInferenceServicer):
    def __init__(self, runner: TailRunner, config: ServerConfig = ServerConfig()) -> None:
        self.runner, self.config = runner, config
        self._lock = threading.Lock()
        self.sessions: dict[str, TailSession] = {}

    # -- helpers ------------------------------------------------------
    def _check_auth(self, context: grpc.ServicerContext) -> None:
        if self.config.auth_token is None:
            return
        meta = dict(context.invocation_metadata())
        if meta.get("authorization") != f"Bearer {self.config.auth_token}":
            raise RequestError(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

    def _open(self, msg: pb.DeviceMessage) -> tuple[str, TailSession, int]:
        if msg.WhichOneof("kind") != "open":
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"the first message must be Open, got {msg.WhichOneof('kind')}")
        op = msg.open
        if op.plan_hash != self.runner.plan.hash:
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"plan hash {op.plan_hash!r} does not match the server's {self.runner.plan.hash}")
        if op.resume_session:
            with self._lock:
                live = op.resume_session in self.sessions
            if not live:
                raise RequestError(grpc.StatusCode.NOT_FOUND, f"unknown or expired session {op.resume_session!r}")
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"session {op.resume_session!r} is attached to another stream")
        s = op.sampling
        sampling = SamplingParams(s.temperature, s.top_k, s.top_p if s.top_p > 0 else 1.0, s.seed if s.has_seed else None)
        with self._lock:
            if len(self.sessions) >= self.config.max_sessions:
                raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"server is at its limit of {self.config.max_sessions} sessions")
            sid = uuid.uuid4().hex
            self.sessions[sid] = self.runner.new_session(sampling)
        max_tokens = min(op.max_tokens or self.config.max_tokens, self.config.max_tokens)
        return sid, self.sessions[sid], max_tokens

    def _activations(self, session: TailSession, act: pb.Activations) -> pb.CloudMessage | None:
        if len(act.frame) > self.config.max_frame_bytes:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"frame of {len(act.frame)} bytes exceeds the limit of {self.config.max_frame_bytes}")
        if act.start_position != session.cache.length:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"frame starts at position {act.start_position}, the session is at {session.cache.length}")
        t0 = time.perf_counter()
        rows = parse_frame(act.frame).rows
        if session.cache.length + rows > self.runner.plan.max_seq_len:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"sequence would reach {session.cache.length + rows} positions, the limit is {self.runner.plan.max_seq_len}")
        self._check_kv_budget(rows)
        logits = session.logits(act.frame, last_only=True)
        if not act.want_token:
            return None
        token = session.sampler(logits[-1].float().cpu().numpy())
        micros = int((time.perf_counter() - t0) * 1e6)
        return pb.CloudMessage(token=pb.Token(position=session.cache.length, id=token, compute_us=micros))

    def kv_bytes(self) -> int:
        """KV cache bytes held by all sessions now."""
        with self._lock:
            sessions = list(self.sessions.values())
        return sum(s.cache.nbytes() for s in sessions)

    def _check_kv_budget(self, rows: int) -> None:
        spec = self.runner.spec
        layers = spec.num_layers - self.runner.plan.split_layer
        extra = rows * spec.kv_bytes_per_token(layers, 32)
        held = self.kv_bytes()
        if held + extra > self.config.max_kv_bytes:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"KV cache would grow to {held + extra:.0f} bytes, the server's budget is {self.config.max_kv_bytes}")

    # -- the RPC ------------------------------------------------------
    def Generate(self, request_iterator: Iterator[pb.DeviceMessage], context: grpc.ServicerContext):
        sid = None
        t0 = time.perf_counter()
        watchdog = _IdleWatchdog(self.config.idle_timeout_s, context)
        try:
            self._check_auth(context)
            first = next(request_iterator, None)
            if first is None:
                return
            sid, session, max_tokens = self._open(first)
            log.info("event=session_open session=%s plan=%s peer=%s", sid, self.runner.plan.hash, context.peer())
            yield pb.CloudMessage(opened=pb.Opened(session_id=sid, max_seq_len=self.runner.plan.max_seq_len,
                                                   max_frame_bytes=self.config.max_frame_bytes, max_tokens=max_tokens))
            produced = 0
            for msg in request_iterator:
                watchdog.reset()
                if time.perf_counter() - t0 > self.config.total_timeout_s:
                    raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                       f"session passed its total deadline of {self.config.total_timeout_s:.0f} s")
                kind = msg.WhichOneof("kind")
                if kind == "cancel":
                    log.info("event=session_cancel session=%s reason=%r", sid, msg.cancel.reason)
                    return
                if kind != "activations":
                    raise RequestError(grpc.StatusCode.UNIMPLEMENTED if kind == "move_split" else grpc.StatusCode.INVALID_ARGUMENT,
                                       f"message {kind!r} is not supported here")
                out = self._activations(session, msg.activations)
                if out is not None:
                    produced += 1
                    if produced > max_tokens:
                        raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"session reached its {max_tokens} tokens")
                    yield out
        except Exception as exc:  # noqa: BLE001 - every failure becomes this stream's status, nothing else's
            code, message = status_for(exc)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("event=session_error session=%s code=%s", sid, code.name)
            else:
                log.info("event=session_error session=%s code=%s message=%r", sid, code.name, message)
            context.abort(code, message)
        finally:
            watchdog.stop()
            if sid is not None:
                with self._lock:
                    self.sessions.pop(sid, None)
                log.info("event=session_close session=%s seconds=%.2f", sid, time.perf_counter() - t0)


class _IdleWatchdog:
    """Cancels a stream that stays silent for `timeout` seconds (the handler's finally frees it)."""

    def __init__(self, timeout: float, context: grpc.ServicerContext) -> None:
        self.timeout, self.context = timeout, context
        self._timer: threading.Timer | None = None
        self.reset()

    def reset(self) -> None:
        self.stop()
        self._timer = threading.Timer(self.timeout, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def _expire(self) -> None:
        log.info("event=session_idle_cancel timeout_s=%.0f", self.timeout)
        self.context.cancel()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


def tls_credentials(cert_chain: bytes, private_key: bytes) -> grpc.ServerCredentials:
    """Server TLS credentials from PEM bytes."""
    return grpc.ssl_server_credentials([(private_key, cert_chain)])


def start_server(runner: TailRunner, address: str = "127.0.0.1:0", config: ServerConfig = ServerConfig(),
                 credentials: grpc.ServerCredentials | None = None) -> tuple[grpc.Server, int, SplitInferenceService]:
    """Start serving; returns the server, the bound port and the servicer."""
    runner.enable_batching(config.max_sessions)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=config.workers),
                         options=[("grpc.max_receive_message_length", config.max_frame_bytes + (1 << 16))])
    service = SplitInferenceService(runner, config)
    pb_grpc.add_SplitInferenceServicer_to_server(service, server)
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", "splitlm.v1.SplitInference"):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if port == 0:
        raise ConfigError(f"cannot bind {address}")
    server.start()
    return server, port, service
