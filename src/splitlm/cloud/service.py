"""The gRPC service: one bidirectional stream per generation session, KV per session.

The server is `grpc.aio` on one event-loop thread: a stream costs no thread, so no number of
silent or idle streams can starve new sessions or the health check. Every session's steps run
on the tail's one batching thread (`cloud.batcher`). Every error a client can cause maps to
one status code in `status_for`, ends only its own stream, and frees the session.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError

from splitlm.cloud.tail import TailRunner, TailSession
from splitlm.errors import CodecError, ConfigError, MoveError, PlanError, ResourceExhausted, SplitLMError
from splitlm.proto import splitlm_pb2 as pb
from splitlm.proto import splitlm_pb2_grpc as pb_grpc
from splitlm.sampling import SamplingParams

log = logging.getLogger(__name__)

if hasattr(asyncio, "timeout"):  # 3.11+: a timer on the running task, no task per read as wait_for makes
    _timeout = asyncio.timeout
else:  # pragma: no cover - Python 3.10
    import contextlib

    @contextlib.asynccontextmanager
    async def _timeout(seconds: float):
        task = asyncio.current_task()
        timed_out = False

        def expire() -> None:
            nonlocal timed_out
            timed_out = True
            task.cancel()

        handle = asyncio.get_running_loop().call_later(seconds, expire)
        try:
            yield
        except asyncio.CancelledError:
            if timed_out:
                raise asyncio.TimeoutError from None
            raise
        finally:
            handle.cancel()

ECHO_CHARS = 80
"""A client's string is echoed into errors and logs up to this many characters."""
MOVE_MESSAGE_BYTES = 3 << 20
"""Largest SplitMoved message the server sends (a gRPC client takes 4 MiB by default)."""
READ_AHEAD_BYTES = 8 << 20
"""Bytes of a stream's messages the server reads ahead of the session's compute (at least one message). Past that
it stops reading, and gRPC's flow control holds the client back."""


def _silent(timeout: float, waiting_for: str) -> RequestError:
    return RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, f"no {waiting_for} within {timeout:.3g} s")


def _undecodable(exc: DecodeError) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"undecodable DeviceMessage: {_clip(str(exc))}")


async def _read(context: grpc.aio.ServicerContext, timeout: float, waiting_for: str) -> pb.DeviceMessage | None:
    """The next message, None at the end of the stream; DEADLINE_EXCEEDED after `timeout` s of silence."""
    try:
        async with _timeout(timeout):
            msg = await context.read()
    except asyncio.TimeoutError:
        raise _silent(timeout, waiting_for) from None
    except DecodeError as exc:
        raise _undecodable(exc) from None
    return None if msg is grpc.aio.EOF else msg


class _Stream:
    """A session's stream once it is open. When the device asked for receipts (Open.uplink_receipts), a task reads
    its messages as they arrive, ahead of the session's compute (up to READ_AHEAD_BYTES), and answers each prefill
    frame with a Received at the time it is read: the device measures its uplink from those times, and they would
    follow the cloud's compute, not the link, if frames were read only when the session is ready for them. Without
    receipts the session reads each message when it is ready for it (gRPC's flow control holds the rest back).
    Writes go one at a time (the reader's receipts and the session's answers)."""

    def __init__(self, context: grpc.aio.ServicerContext, receipts: bool) -> None:
        self.context = context
        self.receipts = receipts
        self._queue: asyncio.Queue = asyncio.Queue()
        self._held = 0
        self._room = asyncio.Event()
        self._lock = asyncio.Lock()
        self._task = asyncio.get_running_loop().create_task(self._run()) if receipts else None

    async def write(self, msg: pb.CloudMessage) -> None:
        async with self._lock:
            await self.context.write(msg)

    async def _run(self) -> None:
        try:
            while True:
                while self._held >= READ_AHEAD_BYTES:
                    self._room.clear()
                    await self._room.wait()
                try:
                    msg = await self.context.read()
                except DecodeError as exc:
                    self._queue.put_nowait(_undecodable(exc))
                    return
                if msg is grpc.aio.EOF:
                    self._queue.put_nowait(None)
                    return
                if msg.WhichOneof("kind") == "activations" and not msg.activations.want_token:
                    await self.write(pb.CloudMessage(received=pb.Received(
                        start_position=msg.activations.start_position, bytes=len(msg.activations.frame),
                        server_us=time.monotonic_ns() // 1000)))
                size = msg.ByteSize()
                self._held += size
                self._queue.put_nowait((msg, size))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the stream broke: the session meets it at its next read
            self._queue.put_nowait(exc)

    async def read(self, timeout: float, waiting_for: str) -> pb.DeviceMessage | None:
        """The next message, None at the end of the stream; DEADLINE_EXCEEDED after `timeout` s of silence, and
        what broke the stream, in order, when it broke."""
        if self._task is None:
            return await _read(self.context, timeout, waiting_for)
        try:
            async with _timeout(timeout):
                item = await self._queue.get()
        except asyncio.TimeoutError:
            raise _silent(timeout, waiting_for) from None
        if item is None or isinstance(item, Exception):
            self._queue.put_nowait(item)  # every later read meets it too
            if item is None:
                return None
            raise item
        msg, size = item
        self._held -= size
        self._room.set()
        return msg

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()


@dataclass(frozen=True)
class ServerConfig:
    """Limits and options of `splitlm serve`."""

    max_sessions: int = 64
    """Concurrent sessions; one more is answered RESOURCE_EXHAUSTED."""
    max_pending_streams: int = 256
    """Streams that have not sent Open yet (each costs a few KiB and no thread); one more is answered
    RESOURCE_EXHAUSTED. Such a stream is ended after open_timeout_s."""
    open_timeout_s: float = 10.0
    """A stream must send its Open within this (else DEADLINE_EXCEEDED)."""
    max_frame_bytes: int = 8 << 20
    """Largest activation frame accepted (INVALID_ARGUMENT above)."""
    max_tokens: int = 4096
    """Tokens one session may generate; a session asking for more is given this many."""
    max_logprobs: int = 20
    """Most top log-probabilities a session may ask for per token."""
    max_kv_bytes: int = 8 << 30
    """KV cache bytes all sessions together may hold; a step that would pass it is RESOURCE_EXHAUSTED."""
    auth_token: str | None = None
    """When set, every stream must carry `authorization: Bearer <token>` (else UNAUTHENTICATED)."""
    idle_timeout_s: float = 120.0
    """A session the server has waited on this long for its next message is ended (DEADLINE_EXCEEDED).
    Time the server spends computing for it, or for others, does not count."""
    total_timeout_s: float = 3600.0
    """A session older than this is ended with DEADLINE_EXCEEDED."""
    keepalive_s: float = 30.0
    """The server pings a silent connection this often to find dead clients."""

    def __post_init__(self) -> None:
        for name in ("max_sessions", "max_pending_streams", "open_timeout_s", "max_frame_bytes", "max_tokens",
                     "max_logprobs", "max_kv_bytes", "idle_timeout_s", "total_timeout_s", "keepalive_s"):
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
    if isinstance(exc, MoveError):
        return grpc.StatusCode.OUT_OF_RANGE, str(exc)
    if isinstance(exc, (CodecError, ConfigError)):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, ResourceExhausted):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, SplitLMError):
        return grpc.StatusCode.INTERNAL, str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}"


def _clip(text: str) -> str:
    """A client's string, bounded for echoing."""
    return text if len(text) <= ECHO_CHARS else f"{text[:ECHO_CHARS]}... ({len(text)} chars)"


@dataclass
class _Session:
    tail: TailSession
    max_tokens: int
    position: int = 0
    """Positions the session has sent so far."""
    produced: int = 0
    """Tokens answered so far."""
    first_token_at: float | None = None
    """When the first token was answered (time.monotonic), for the close log's TTFT."""


class SplitInferenceService(pb_grpc.SplitInferenceServicer):
    """The Generate stream. Its state is touched on the event loop's thread only."""

    def __init__(self, runner: TailRunner, config: ServerConfig = ServerConfig()) -> None:
        self.runner, self.config = runner, config
        self.sessions: dict[str, _Session] = {}
        self.pending_streams = 0
        """Streams that have not sent Open yet."""
        self.draining = False
        """Set by Server.drain: Open is refused and live sessions end with UNAVAILABLE at their next message,
        so that their devices replay them on another replica."""
        self.drained = 0
        """Sessions ended by the drain."""
        self.moves = 0
        """Split moves served."""

    def kv_bytes(self) -> int:
        """KV cache bytes held by all sessions now (counted on the batcher thread)."""
        return self.runner.batcher.kv_bytes

    # -- one message at a time ----------------------------------------
    def _check_auth(self, context: grpc.aio.ServicerContext) -> None:
        if self.config.auth_token is None:
            return
        meta = dict(context.invocation_metadata() or ())
        if meta.get("authorization") != f"Bearer {self.config.auth_token}":
            raise RequestError(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

    def _sampling(self, s: pb.Sampling) -> SamplingParams:
        if s.logprobs > self.config.max_logprobs:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"logprobs {s.logprobs} exceeds the server's limit of {self.config.max_logprobs}")
        # proto3 cannot tell an unset top_p from 0: 0 is read as 1 (off), as the .proto says
        return SamplingParams(s.temperature, s.top_k, 1.0 if s.top_p == 0 else s.top_p, s.seed if s.has_seed else None)

    def _open(self, msg: pb.DeviceMessage) -> tuple[str, _Session]:
        if msg.WhichOneof("kind") != "open":
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"the first message must be Open, got {msg.WhichOneof('kind')}")
        op, plan = msg.open, self.runner.plan
        if op.plan_hash != plan.hash:
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"plan hash {_clip(op.plan_hash)!r} does not match the server's {plan.hash}")
        if op.model_id and op.model_id != plan.model_id:
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"model {_clip(op.model_id)!r} does not match the server's {plan.model_id!r}")
        if op.resume_session:
            if op.resume_session not in self.sessions:
                raise RequestError(grpc.StatusCode.NOT_FOUND, f"unknown or expired session {_clip(op.resume_session)!r}")
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"session {_clip(op.resume_session)!r} is attached to another stream")
        if self.draining:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, "server is draining: open the session on another replica")
        if op.max_tokens < 1:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "max_tokens must be >= 1, got 0")
        sampling = self._sampling(op.sampling)
        if len(self.sessions) >= self.config.max_sessions:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"server is at its limit of {self.config.max_sessions} sessions")
        sid = uuid.uuid4().hex
        self.sessions[sid] = _Session(self.runner.new_session(sampling, op.sampling.logprobs),
                                      min(op.max_tokens, self.config.max_tokens))
        return sid, self.sessions[sid]

    async def _activations(self, session: _Session, act: pb.Activations) -> pb.CloudMessage | None:
        t0 = time.perf_counter()  # the step's server time: frame checks and parse, decode, tail, sampling
        plan = self.runner.plan
        if len(act.frame) > self.config.max_frame_bytes:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"frame of {len(act.frame)} bytes exceeds the limit of {self.config.max_frame_bytes}")
        if act.start_position != session.position:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"frame starts at position {act.start_position}, the session is at {session.position}")
        if act.want_token and session.produced >= session.max_tokens:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"session reached its {session.max_tokens} tokens")
        # parsed once, against the plan and the model, before anything is decoded; the layout goes down with it
        layout = self.runner.parse(act.frame)
        if session.position + layout.rows > plan.max_seq_len:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"sequence would reach {session.position + layout.rows} "
                                                                  f"positions, the limit is {plan.max_seq_len}")
        drafts = list(act.draft_ids)
        if drafts or act.keep_rows:
            if drafts and (act.keep_rows or not act.want_token):
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "a frame with draft_ids is verified: it wants its token "
                                                                     "and keeps what the cloud accepts (no keep_rows)")
            if act.keep_rows and act.want_token:
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "keep_rows replays a verified frame: it wants no token")
            rows = len(drafts) + 1 if drafts else act.keep_rows
            if (layout.rows != rows) if drafts else (act.keep_rows > layout.rows):
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                                   f"frame of {layout.rows} rows with {len(drafts)} draft_ids (a verified frame holds one row "
                                   "more than its drafts)" if drafts else
                                   f"keep_rows {act.keep_rows} passes the frame's {layout.rows} rows")
            if drafts and session.produced + len(drafts) + 1 > session.max_tokens:
                raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{len(drafts)} drafts would pass the session's "
                                                                       f"{session.max_tokens} tokens ({session.produced} made)")
            future = (session.tail.submit_verify(act.frame, drafts, layout) if drafts
                      else session.tail.replay_verified(act.frame, act.keep_rows, layout))
        else:
            future = session.tail.submit(act.frame, act.want_token, layout)
        start = session.position
        choice = await asyncio.wrap_future(future)
        session.position = start + (layout.rows if not (drafts or act.keep_rows) else
                                    act.keep_rows or 1 + choice.accepted)
        if choice is None:
            return None
        session.produced += 1 + choice.accepted
        if session.first_token_at is None:
            session.first_token_at = time.monotonic()
        token = pb.Token(position=session.position, id=choice.id, compute_us=int((time.perf_counter() - t0) * 1e6),
                         accepted=choice.accepted)
        if choice.logprob is not None:
            token.logprob = choice.logprob
            token.top.extend(pb.TopLogprob(id=i, logprob=lp) for i, lp in choice.top)
            token.kept.extend(pb.DraftLogprobs(logprob=c.logprob, top=[pb.TopLogprob(id=i, logprob=lp) for i, lp in c.top])
                              for c in choice.kept)
        return pb.CloudMessage(token=token)

    async def _move(self, sid: str, session: _Session, first: pb.MoveSplit, stream: _Stream,
                    left: float) -> pb.CloudMessage:
        """Serve one split move (all its messages): SplitMoved, or an Error message for a move refused, after
        which the session goes on at its old split, untouched. A message that is not part of the move, or
        a move larger than any move of this session could be, breaks the protocol and ends the stream.
        `left`: seconds to the session's total deadline."""
        t0, tail, spec = time.perf_counter(), session.tail, self.runner.spec
        old, new = tail.split, first.new_split
        # no move of this session carries more: every layer the cloud may take (or the hidden states), float32, every
        # position, and headers
        cap = (max(spec.num_layers * 2 * spec.num_kv_heads * spec.head_dim, spec.hidden_size) * 4 * session.position + (1 << 20))
        error: Exception | None = None
        assembler = None
        try:
            layers = tail.check_move(new)
            if new > old and (first.layers or first.more):
                raise CodecError(f"a move deeper (to {new}) carries no KV: the cloud sends it")
            assembler = tail.assembler(layers, max_bytes=cap)
        except (MoveError, CodecError) as exc:
            error = exc
        msg, received, deadline = first, first.ByteSize(), time.monotonic() + left
        while True:  # read the whole move, even once it is refused, so that its later messages are not taken for another
            if received > cap:
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"a split move of more than {cap} bytes: no move of "
                                                                     f"{session.position} positions carries that much")
            if error is None and new < old:
                try:
                    for item in msg.layers:
                        assembler.add(item)
                except CodecError as exc:
                    error = exc
            if not msg.more:
                break
            if self.draining:
                raise RequestError(grpc.StatusCode.UNAVAILABLE, "server is draining: replay the session on another replica")
            wait = min(self.config.idle_timeout_s, deadline - time.monotonic())
            if wait <= 0:
                raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                   f"session passed its total deadline of {self.config.total_timeout_s:.3g} s")
            nxt = await stream.read(wait, "rest of the split move")
            if nxt is None or nxt.WhichOneof("kind") != "move_split" or nxt.move_split.new_split != new:
                got = "the end of the stream" if nxt is None else (nxt.WhichOneof("kind") if nxt.WhichOneof("kind") != "move_split"
                                                                   else f"a move to {nxt.move_split.new_split}")
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"a split move to {new} announced more messages, got {got}")
            msg = nxt.move_split
            received += msg.ByteSize()
        reply = pb.SplitMoved(split=new)
        if error is None:
            try:
                if new < old:  # assembled and installed on the batcher thread, the budget checked first
                    await asyncio.wrap_future(tail.move(new, assembler))
                else:
                    batches = await asyncio.wrap_future(tail.move(new, message_bytes=MOVE_MESSAGE_BYTES)) or [[]]
                    for batch in batches[:-1]:
                        await stream.write(pb.CloudMessage(split_moved=pb.SplitMoved(split=new, layers=batch, more=True)))
                    reply = pb.SplitMoved(split=new, layers=batches[-1])
                    received = sum(item.ByteSize() for batch in batches for item in batch)
            except (MoveError, CodecError, ResourceExhausted) as exc:
                error = exc
        if error is not None:
            code, message = status_for(error)
            log.info("event=split_move_refused session=%s from=%d to=%d code=%s message=%r", sid, old, new, code.name, message)
            return pb.CloudMessage(error=pb.Error(code=code.value[0], message=message))
        self.moves += 1
        log.info("event=split_move session=%s from=%d to=%d positions=%d kv_bytes=%d ms=%.1f", sid, old, new, session.position,
                 received, (time.perf_counter() - t0) * 1e3)
        return pb.CloudMessage(split_moved=reply)

    # -- the RPC ------------------------------------------------------
    async def Generate(self, request_iterator, context: grpc.aio.ServicerContext) -> None:
        sid, session, stream = None, None, None
        t0 = time.monotonic()
        pending = False
        try:
            self._check_auth(context)
            if self.pending_streams >= self.config.max_pending_streams:
                raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                   f"server is at its limit of {self.config.max_pending_streams} streams waiting to open")
            self.pending_streams += 1
            pending = True
            first = await _read(context, self.config.open_timeout_s, "Open message")
            self.pending_streams -= 1
            pending = False
            if first is None:
                return
            sid, session = self._open(first)
            log.info("event=session_open session=%s plan=%s peer=%s", sid, self.runner.plan.hash, context.peer())
            await context.write(pb.CloudMessage(opened=pb.Opened(
                session_id=sid, max_seq_len=self.runner.plan.max_seq_len, max_frame_bytes=self.config.max_frame_bytes,
                max_tokens=session.max_tokens)))
            stream = _Stream(context, first.open.uplink_receipts)
            while True:
                if self.draining:  # the session moves: the device replays it on another replica (DESIGN.md §7)
                    self.drained += 1
                    raise RequestError(grpc.StatusCode.UNAVAILABLE, "server is draining: replay the session on another replica")
                left = self.config.total_timeout_s - (time.monotonic() - t0)
                if left <= 0:
                    raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                       f"session passed its total deadline of {self.config.total_timeout_s:.3g} s")
                idle = self.config.idle_timeout_s
                msg = await stream.read(min(idle, left), "message" if idle <= left else "message before the "
                                       "session's total deadline")
                if msg is None:
                    log.info("event=session_end session=%s reason=client_closed", sid)
                    return
                kind = msg.WhichOneof("kind")
                if kind == "cancel":
                    log.info("event=session_cancel session=%s reason=%r", sid, _clip(msg.cancel.reason))
                    return
                if kind == "move_split":
                    await stream.write(await self._move(sid, session, msg.move_split, stream,
                                                         self.config.total_timeout_s - (time.monotonic() - t0)))
                    continue
                if kind != "activations":
                    raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"message {kind!r} is not valid after Open")
                out = await self._activations(session, msg.activations)
                if out is not None:
                    await stream.write(out)
        except asyncio.CancelledError:
            log.info("event=session_end session=%s reason=client_gone", sid)
            raise
        except Exception as exc:  # noqa: BLE001 - every failure becomes this stream's status, nothing else's
            if context.cancelled() or context.done():  # the client went away while we wrote to it
                log.info("event=session_end session=%s reason=client_gone during=%s", sid, type(exc).__name__)
                return
            code, message = status_for(exc)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("event=session_error session=%s code=%s", sid, code.name)
            else:
                log.info("event=session_error session=%s code=%s message=%r", sid, code.name, message)
            if stream is not None:
                stream.close()  # no receipt written while the stream is aborted
            await context.abort(code, message)
        finally:
            if stream is not None:
                stream.close()
            if pending:
                self.pending_streams -= 1
            if sid is not None:
                self.sessions.pop(sid, None)
                session.tail.close()
                now = time.monotonic()
                ttft = f"{(session.first_token_at - t0) * 1e3:.0f}" if session.first_token_at is not None else "-"
                rate = session.produced / (now - session.first_token_at) if session.first_token_at is not None and \
                    now > session.first_token_at and session.produced > 1 else 0.0
                log.info("event=session_close session=%s seconds=%.2f positions=%d tokens=%d ttft_ms=%s tokens_per_s=%.1f",
                         sid, now - t0, session.position, session.produced, ttft, rate)


def tls_credentials(cert_chain: bytes, private_key: bytes) -> grpc.ServerCredentials:
    """Server TLS credentials from PEM bytes."""
    return grpc.ssl_server_credentials([(private_key, cert_chain)])


HEALTH_NAMES = ("", "splitlm.v1.SplitInference")
"""The services whose status the standard gRPC health service reports."""


class Server:
    """A running server: a grpc.aio server on an event loop of its own thread."""

    def __init__(self, runner: TailRunner, address: str, config: ServerConfig,
                 credentials: grpc.ServerCredentials | None) -> None:
        self.service = SplitInferenceService(runner, config)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="splitlm-grpc", daemon=True)
        self._thread.start()
        try:
            self._server, self.port = self._call(self._start(address, config, credentials))
        except BaseException:
            self._close_loop()
            raise

    def _call(self, coro, timeout: float | None = None):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _start(self, address: str, config: ServerConfig, credentials) -> tuple[grpc.aio.Server, int]:
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc

        server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", config.max_frame_bytes + (1 << 16)),
            ("grpc.so_reuseport", 0),  # a second server on a port in use must fail, not share it
            ("grpc.keepalive_time_ms", int(config.keepalive_s * 1000)),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 1_000),  # clients' keepalive (5 s) is welcome; floods are not
        ])
        pb_grpc.add_SplitInferenceServicer_to_server(self.service, server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        self._health = health_servicer
        for name in HEALTH_NAMES:
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        try:
            port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
        except RuntimeError:
            port = 0
        if port == 0:
            raise ConfigError(f"cannot serve on {address}: the port is in use or the address cannot be bound")
        await server.start()
        return server, port

    def drain(self, timeout_s: float = 30.0) -> int:
        """Graceful drain: report NOT_SERVING on health, refuse new sessions (UNAVAILABLE), and end each
        live session at its next message with UNAVAILABLE, which a device answers by replaying it on
        another replica. Returns once no session is left, or after `timeout_s`; the sessions left then."""
        from grpc_health.v1 import health_pb2

        async def not_serving():
            for name in HEALTH_NAMES:
                await self._health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

        self._call(not_serving())
        self.service.draining = True
        log.warning("event=drain sessions=%d", len(self.service.sessions))
        deadline = time.monotonic() + timeout_s
        while self.service.sessions and time.monotonic() < deadline:
            time.sleep(0.05)
        log.warning("event=drained moved=%d left=%d", self.service.drained, len(self.service.sessions))
        return len(self.service.sessions)

    def stop(self, grace: float | None = None) -> None:
        """Stop serving (after `grace` seconds for streams in flight; None ends them now)."""
        if self._loop.is_closed():
            return
        self._call(self._server.stop(grace))
        self._close_loop()

    def _close_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def wait_for_termination(self) -> None:
        """Block until the server stops (Ctrl-C interrupts)."""
        done = asyncio.run_coroutine_threadsafe(self._server.wait_for_termination(), self._loop)
        while not done.done():
            try:
                done.result(timeout=0.5)
            except TimeoutError:
                pass


def _check_address(address: str) -> None:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"address {address!r} is not HOST:PORT with a port in 0..65535")


def start_server(runner: TailRunner, address: str = "127.0.0.1:0", config: ServerConfig = ServerConfig(),
                 credentials: grpc.ServerCredentials | None = None) -> tuple[Server, int, SplitInferenceService]:
    """Start serving; returns the server, the bound port and the servicer."""
    _check_address(address)
    runner.limit(config.max_sessions, config.max_kv_bytes)
    server = Server(runner, address, config, credentials)
    return server, server.port, server.service
