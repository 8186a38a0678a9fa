"""The device's side of the gRPC stream (torch-free): open a session, send frames, get tokens.

The device never waits on the cloud without a deadline, so that a dead link or a frozen server
is noticed within seconds and the device can fail over (DESIGN.md §7):

* every wait is bounded: for `Opened`, and for the `Token` answering a frame
  (`LinkConfig.step_deadline_s`: a fixed part plus a part per row sent, for long prefills);
  a wait that passes its deadline cancels the call and raises `LinkError` (DEADLINE_EXCEEDED);
* HTTP/2 keepalive pings run while a session is open, so a peer that stops answering ends
  the link (`LinkError`, UNAVAILABLE) even while the device is busy between steps.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import ipaddress
import logging
import math
import os
import queue
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NoReturn

import grpc
import numpy as np

from splitlm.device.uplink import UplinkMeter
from splitlm.errors import ConfigError, RemoteError, TransportError
from splitlm.proto import splitlm_pb2 as pb
from splitlm.proto import splitlm_pb2_grpc as pb_grpc
from splitlm.quantize import kv_wire
from splitlm.sampling import SamplingParams

log = logging.getLogger(__name__)

_CLOSE = object()
_UINT32_MAX = 2**32 - 1
_UINT64_MAX = 2**64 - 1
_F32_TINY, _F32_MAX = float(np.finfo(np.float32).tiny), float(np.finfo(np.float32).max)  # the proto's floats
_STATUS_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


@dataclass(frozen=True)
class LinkConfig:
    """How long the device waits on the cloud, and how it checks that the link is alive."""

    open_timeout_s: float = 10.0
    """Wait for `Opened` once the stream starts (connect, TLS, admission; no model work), and for
    the server to end the stream after `close()`."""
    step_timeout_s: float = 15.0
    """Wait for the token answering a frame: the whole budget of a decode step."""
    per_row_timeout_s: float = 0.02
    """Added per row (position) sent since the last token, for prefill: a 2,048-row prompt waits
    15 + 41 s. A frozen server is noticed sooner by keepalive, whatever the frame's size."""
    keepalive_s: float = 5.0
    """HTTP/2 ping interval while a session is open (no pings on a channel without sessions). The
    server must accept a ping this often: `grpc.http2.min_ping_interval_without_data_ms` at most
    half of it, or it answers GOAWAY "too_many_pings"."""
    keepalive_timeout_s: float = 10.0
    """A ping unanswered this long ends the link (UNAVAILABLE): a frozen server or dead link is noticed
    within keepalive_s + keepalive_timeout_s, also between steps. Raise it on slow links where a
    large prefill frame queues ahead of the ping for longer."""

    def __post_init__(self) -> None:
        for name in ("open_timeout_s", "step_timeout_s", "keepalive_s", "keepalive_timeout_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ConfigError(f"{name} must be a finite number of seconds > 0, got {value!r}")
        if not (isinstance(self.per_row_timeout_s, (int, float)) and math.isfinite(self.per_row_timeout_s)
                and self.per_row_timeout_s >= 0):
            raise ConfigError(f"per_row_timeout_s must be a finite number of seconds >= 0, got {self.per_row_timeout_s!r}")
        if self.keepalive_s < 0.001 or self.keepalive_timeout_s < 0.001:
            raise ConfigError("keepalive_s and keepalive_timeout_s must be at least 1 ms (gRPC counts milliseconds)")

    def step_deadline_s(self, rows: int) -> float:
        """The wait for the token answering `rows` positions sent since the previous token."""
        return self.step_timeout_s + self.per_row_timeout_s * rows

    def channel_options(self) -> list[tuple[str, int]]:
        """gRPC channel arguments for the keepalive above."""
        return [("grpc.keepalive_time_ms", round(self.keepalive_s * 1000)),
                ("grpc.keepalive_timeout_ms", round(self.keepalive_timeout_s * 1000)),
                # any ping (a flow-control BDP ping too, which a keepalive ping joins instead of sending its own)
                # fails the link when unanswered this long; gRPC's default is 1 minute
                ("grpc.http2.ping_timeout_ms", round(self.keepalive_timeout_s * 1000)),
                ("grpc.keepalive_permit_without_calls", 0),  # only sessions need watching; the server need not allow more
                ("grpc.http2.max_pings_without_data", 0)]  # keep pinging while the device sends nothing (busy or idle)


class LinkError(TransportError, RemoteError):
    """The link to the cloud failed, or the device gave up waiting. `code` is the gRPC status name:
    UNAVAILABLE (unreachable, link lost, keepalive unanswered), DEADLINE_EXCEEDED (no answer within
    a step's deadline) or CANCELLED (the device cancelled the session). A TransportError, and a
    RemoteError too so that callers handling gRPC statuses by `code` see it."""

    def __init__(self, message: str, code: str) -> None:
        RemoteError.__init__(self, message, code)


class MoveRefused(RemoteError):
    """The server refused a split move (`code`: OUT_OF_RANGE, INVALID_ARGUMENT, RESOURCE_EXHAUSTED); the
    session goes on at its old split."""


class CloudChannel(grpc.Channel):
    """A grpc.Channel to one cloud address that remembers the address and its LinkConfig."""

    def __init__(self, channel: grpc.Channel, address: str, link: LinkConfig) -> None:
        self._channel = channel
        self.address = address
        self.link = link

    def subscribe(self, callback, try_to_connect=False):
        return self._channel.subscribe(callback, try_to_connect)

    def unsubscribe(self, callback):
        return self._channel.unsubscribe(callback)

    def unary_unary(self, method, *args, **kwargs):
        return self._channel.unary_unary(method, *args, **kwargs)

    def unary_stream(self, method, *args, **kwargs):
        return self._channel.unary_stream(method, *args, **kwargs)

    def stream_unary(self, method, *args, **kwargs):
        return self._channel.stream_unary(method, *args, **kwargs)

    def stream_stream(self, method, *args, **kwargs):
        return self._channel.stream_stream(method, *args, **kwargs)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "CloudChannel":
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False


class RemoteSession:
    """One generation session on the cloud. Every wait has a deadline (`LinkConfig`); `cancel()`
    ends the session from any thread."""

    def __init__(self, channel: grpc.Channel, plan_hash: str, model_id: str, sampling: SamplingParams,
                 max_tokens: int, token: str | None = None, resume_session: str = "",
                 link: LinkConfig | None = None, logprobs: int = 0, uplink: UplinkMeter | None = None) -> None:
        """`link` defaults to the one `connect` gave the channel (else LinkConfig()). `logprobs`: the
        cloud returns this many top log-probabilities with each token (`last_token`; a verified step's kept drafts have
        theirs in its `kept`). `uplink`: the session asks the cloud for a receipt of each prefill frame
        (Open.uplink_receipts) and hands them to this meter as they arrive."""
        if isinstance(logprobs, bool) or not isinstance(logprobs, int) or not 0 <= logprobs <= _UINT32_MAX:
            raise ConfigError(f"logprobs must be an integer >= 0, got {logprobs!r}")
        wire_sampling = _sampling_message(sampling)
        wire_sampling.logprobs = logprobs
        opening = pb.DeviceMessage(open=pb.Open(plan_hash=plan_hash, model_id=model_id, sampling=wire_sampling,
                                                max_tokens=_check_max_tokens(max_tokens), resume_session=resume_session,
                                                uplink_receipts=uplink is not None))
        self.uplink = uplink
        if uplink is not None:
            uplink.new_stream()
        metadata = [("authorization", f"Bearer {_check_token(token)}")] if token else None
        self.address = getattr(channel, "address", None) or "the server"
        self.link = link or getattr(channel, "link", None) or LinkConfig()
        self.position = 0
        self.bytes_up = 0
        self.bytes_down = 0
        """Protobuf bytes received (messages, without gRPC framing)."""
        self.last_compute_us = 0
        """Server time reported for the last step."""
        self.last_token: pb.Token | None = None
        """The last Token message: its id, and its logprob and top alternatives when asked for."""
        self.info: pb.Opened | None = None
        """The server's `Opened` (session id, limits)."""
        self._pending_rows = 0  # rows sent since the last token
        self._lock = threading.Lock()
        self._ended = False
        self._error: Exception | None = None
        self._cancel_reason: str | None = None
        self._requests: queue.Queue = queue.Queue()
        self._taken = threading.Condition()
        self._requests.put(opening)
        self._responses = pb_grpc.SplitInferenceStub(channel).Generate(self._request_iter(), metadata=metadata)
        # when the call ends for any reason, release grpc's thread that reads our requests
        self._responses.add_done_callback(lambda _: self._requests.put(_CLOSE))
        self._inbox: queue.Queue = queue.Queue()
        self._reader = threading.Thread(target=self._read_responses, name="splitlm-responses", daemon=True)
        self._reader.start()
        opened = self._receive("answer to Open", self.link.open_timeout_s, "the open deadline")
        if opened.WhichOneof("kind") != "opened":
            self._fail(RemoteError(f"{self.address} answered Open with {opened.WhichOneof('kind')}, not Opened"))
        self.info = opened.opened

    @property
    def ended(self) -> bool:
        """True once the stream is over: closed, cancelled, failed, or its link lost (keepalive)."""
        return self._ended or self._responses.done()

    def _request_iter(self) -> Iterator[pb.DeviceMessage]:
        while True:
            item = self._requests.get()
            if item is _CLOSE:
                return
            yield item
            with self._taken:  # gRPC asks for the next message once it has written this one
                self._taken.notify_all()

    def _wait_for_room(self, ahead: int, timeout: float) -> None:
        """Block until at most `ahead` messages wait to be written (a move's KV is not queued whole). LinkError
        (DEADLINE_EXCEEDED) after `timeout` s, TransportError when the stream ended meanwhile."""
        deadline = time.monotonic() + timeout
        with self._taken:
            while self._requests.qsize() > ahead and not self.ended:
                if time.monotonic() > deadline:
                    self._fail(LinkError(f"{self.address} took no message of a split move within {timeout:.1f} s; the server "
                                         "is frozen or overloaded, or the link is down", "DEADLINE_EXCEEDED"))
                self._taken.wait(0.1)
        if self._error is not None:
            raise self._error
        if self.ended:
            self._fail(TransportError(f"the stream with {self.address} ended during a split move"))

    def _read_responses(self) -> None:
        """The reader thread: every message the cloud sends, as it arrives, into the inbox that `_receive` takes
        from; receipts of prefill frames go to the uplink meter at once (they tell when frames arrived). The end of
        the stream, or what broke it, comes last."""
        try:
            for msg in self._responses:
                self.bytes_down += msg.ByteSize()
                if msg.WhichOneof("kind") == "received":
                    if self.uplink is not None:
                        try:
                            self.uplink.received(msg.received.start_position, msg.received.bytes, msg.received.server_us)
                        except Exception:  # noqa: BLE001 - a measure that fails must not end the session
                            log.exception("event=uplink_meter_error address=%s", self.address)
                            self.uplink = None
                    continue
                self._inbox.put(msg)
            self._inbox.put(_CLOSE)
        except BaseException as exc:  # noqa: BLE001 - an RpcError, or anything else: the waiting step meets it
            self._inbox.put(exc)

    def _receive(self, what: str, timeout: float, deadline_name: str, refusal: bool = False) -> pb.CloudMessage:
        """The next message from the cloud, within `timeout` seconds (else the call is cancelled and LinkError).
        An Error message ends the session, or with `refusal` (a split move's answer) raises MoveRefused and leaves
        the session open."""
        if self._error is not None:
            raise self._error
        try:
            msg = self._inbox.get(timeout=timeout)
        except queue.Empty:
            self._fail(self._deadline_error(what, timeout, deadline_name))
        if isinstance(msg, BaseException):
            self._inbox.put(msg)  # later waits meet it too
            self._fail(self._error_for(msg, what) if isinstance(msg, grpc.RpcError) else
                       TransportError(f"reading the stream from {self.address} failed while the device waited for the "
                                      f"{what}: {type(msg).__name__}: {msg}"))
        if msg is _CLOSE:
            self._inbox.put(msg)
            self._fail(TransportError(f"{self.address} ended the stream while the device waited for the {what}"))
        if msg.WhichOneof("kind") == "error":
            code = _STATUS_NAMES.get(msg.error.code, str(msg.error.code))
            if refusal:
                raise MoveRefused(f"{code}: {msg.error.message}", code)
            self._fail(RemoteError(f"{code}: {msg.error.message}", code))
        return msg

    def _deadline_error(self, what: str, timeout: float, deadline_name: str) -> LinkError:
        return LinkError(f"no {what} from {self.address} within {timeout:.1f} s ({deadline_name}); the server is "
                         "frozen or overloaded, or the link is down", "DEADLINE_EXCEEDED")

    def _error_for(self, exc: grpc.RpcError, what: str) -> Exception:
        code, details = exc.code(), exc.details() or ""
        if self._cancel_reason is not None:
            return LinkError(f"session cancelled on the device: {self._cancel_reason}", "CANCELLED")
        if code == grpc.StatusCode.UNAVAILABLE:
            k, lower = self.link, details.lower()
            if "too many pings" in lower or "too_many_pings" in lower:
                hint = (f" (the server refuses keepalive pings every {k.keepalive_s:g} s; it must allow them with "
                        "grpc.http2.min_ping_interval_without_data_ms)")
            elif "keepalive" in lower or "ping timeout" in lower:
                hint = f" (a keepalive ping was not answered within {k.keepalive_timeout_s:g} s)"
            else:
                hint = ""
            lost = f"lost the link to {self.address}" if self.info is not None else f"cannot reach {self.address}"
            return LinkError(f"{lost} while waiting for the {what}: {details}{hint}", "UNAVAILABLE")
        return RemoteError(f"{code.name}: {details}", code.name)

    def _fail(self, error: Exception) -> NoReturn:
        self._error = error
        self._end()
        raise error from None

    def _end(self) -> None:
        """Free everything the session holds: the call, the deadline thread, grpc's request thread."""
        with self._lock:
            if self._ended:
                return
            self._ended = True
        self._requests.put(_CLOSE)
        self._responses.cancel()  # a no-op when the call has already finished
        if threading.current_thread() is not self._reader:
            self._reader.join(5)

    def send(self, frame: bytes, rows: int, want_token: bool = True) -> int | None:
        """Send a frame of the next positions; with want_token, wait for the cloud's next token.
        `rows`: the positions the caller encoded into the frame (the device does not parse its own
        frames; the server checks the count)."""
        token = self._send(frame, rows, want_token)
        return None if token is None else token.id

    def verify(self, frame: bytes, rows: int, drafts: list[int]) -> tuple[int, int]:
        """Speculation (DESIGN.md §11): send a frame of the last token's row and one per draft (`rows` = drafts + 1)
        with the drafts; the cloud keeps those it agrees with. (drafts accepted, the token after them)."""
        if rows != len(drafts) + 1:
            raise ConfigError(f"a verified frame holds one row more than its drafts: {rows} rows for {len(drafts)} drafts")
        token = self._send(frame, rows, True, list(drafts))
        return token.accepted, token.id

    def replay_verified(self, frame: bytes, rows: int, keep: int) -> None:
        """Re-send a verified frame of `rows` positions whose first `keep` the cloud kept (a replay)."""
        self._send(frame, rows, False, keep=keep)

    def _send(self, frame: bytes, rows: int, want_token: bool, drafts: list[int] | None = None, keep: int = 0) -> "pb.Token | None":
        if self._error is not None:
            raise self._error
        if self._ended:
            if self._cancel_reason is not None:
                raise LinkError(f"session cancelled on the device: {self._cancel_reason}", "CANCELLED")
            raise TransportError(f"the session with {self.address} is closed")
        if isinstance(rows, bool) or not isinstance(rows, (int, np.integer)) or rows < 1:
            raise ConfigError(f"rows must be the positions in the frame (an integer >= 1), got {rows!r}")
        rows = int(rows)
        msg = pb.DeviceMessage(activations=pb.Activations(start_position=self.position, frame=frame, want_token=want_token,
                                                          draft_ids=drafts or (), keep_rows=keep))
        self._requests.put(msg)
        start = self.position
        self.position += keep or rows
        self._pending_rows += rows
        self.bytes_up += msg.ByteSize()
        if not want_token:
            return None
        n, link = self._pending_rows, self.link
        deadline = f"the step deadline for {n} row{'' if n == 1 else 's'}: {link.step_timeout_s:g} s + {link.per_row_timeout_s:g} s per row"
        token = self._receive("token", link.step_deadline_s(n), deadline).token
        self._pending_rows = 0
        self.last_token = token
        self.last_compute_us = token.compute_us
        if drafts:
            if token.accepted > len(drafts):
                self._fail(RemoteError(f"{self.address} accepted {token.accepted} of {len(drafts)} drafts"))
            self.position = start + 1 + token.accepted
        return token

    def next_token(self, frame: bytes, rows: int) -> int:
        """Send a frame of `rows` positions and wait for the cloud's token for the position after them."""
        return self.send(frame, rows)

    def move_split(self, new_split: int, layers: Iterable[pb.LayerKV]) -> list[pb.LayerKV]:
        """Move the session's split (DESIGN.md §6): shallower with `layers` (the KV of [new_split, split) for
        every position so far, kv_wire chunks, consumed as they are sent: the device never holds an
        encoded copy of all of them), in messages of at most the server's frame limit; deeper with none,
        the cloud's KV of [split, new_split) returned. MoveRefused when the server refuses the move: the
        session then goes on at its old split."""
        if self._error is not None:
            raise self._error
        if self._ended:
            raise TransportError(f"the session with {self.address} is closed")
        pending, sent, put = None, 0, False
        try:
            for batch in kv_wire.batches(layers, self.move_message_bytes):  # one message behind: the last goes without `more`
                if pending is not None:
                    put = True
                    self._put_move(new_split, pending, True)
                pending = batch
                sent += sum(item.positions for item in batch)
        except BaseException as exc:
            if put and not self._ended:  # the stream is mid-move: nothing else can follow on it
                self._fail(TransportError(f"the device failed during a split move ({type(exc).__name__}: {exc}); session ended"))
            raise
        self._put_move(new_split, pending or [], False)
        got: list[pb.LayerKV] = []
        while True:
            answer = self._receive("answer to the split move", self.link.step_deadline_s(max(sent, self.position)),
                                   "the step deadline of a move", refusal=True)
            if answer.WhichOneof("kind") != "split_moved" or answer.split_moved.split != new_split:
                self._fail(RemoteError(f"{self.address} answered a move to {new_split} with "
                                       f"{answer.WhichOneof('kind')} {str(answer)[:80]!r}"))
            got.extend(answer.split_moved.layers)
            if not answer.split_moved.more:
                return got

    @property
    def move_message_bytes(self) -> int:
        """The largest message a move's K/V goes in (MOVE_MESSAGE_BYTES, or the server's frame limit when lower)."""
        limit = self.info.max_frame_bytes if self.info is not None and self.info.max_frame_bytes else MOVE_MESSAGE_BYTES
        return max(1024, min(MOVE_MESSAGE_BYTES, limit - 1024))

    def _put_move(self, new_split: int, batch: list[pb.LayerKV], more: bool) -> None:
        self._wait_for_room(1, self.link.step_timeout_s)
        msg = pb.DeviceMessage(move_split=pb.MoveSplit(new_split=new_split, layers=batch, more=more))
        self.bytes_up += msg.ByteSize()
        self._requests.put(msg)

    def cancel(self, reason: str = "cancelled") -> None:
        """End the session now, from any thread: a step waiting on the cloud raises LinkError (CANCELLED)."""
        with self._lock:
            if self._ended:
                return
            self._cancel_reason = reason
        self._requests.put(pb.DeviceMessage(cancel=pb.Cancel(reason=reason)))
        self._end()

    def close(self, reason: str = "done") -> None:
        """Tell the cloud the session is over and wait (at most `open_timeout_s`) for it to end the stream."""
        if self._ended:
            return
        self._requests.put(pb.DeviceMessage(cancel=pb.Cancel(reason=reason)))
        self._requests.put(_CLOSE)
        deadline = time.monotonic() + self.link.open_timeout_s
        try:
            while True:  # until the cloud ends the stream
                msg = self._inbox.get(timeout=max(0.0, deadline - time.monotonic()))
                if msg is _CLOSE or isinstance(msg, BaseException):
                    break
        except queue.Empty:
            log.info("event=close_timeout address=%s timeout_s=%.1f", self.address, self.link.open_timeout_s)
        finally:
            self._end()

    def __enter__(self) -> "RemoteSession":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # the device failed or was interrupted: do not wait on the cloud
            self.cancel(f"device side ended the session: {exc_type.__name__}")


MOVE_MESSAGE_BYTES = 1 << 20
"""Largest MoveSplit message the device sends; one waits to be written at most, so a move's KV is never
held encoded in full (the server's frame limit when lower)."""
REPLAY_FRAME_BYTES = 1 << 20
"""Largest frame a replay merges the history into (the server's own limit when lower)."""
RETRYABLE = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "ABORTED", "INTERNAL", "UNKNOWN"})
"""Status codes after which a session is rebuilt by replay: the server or the link failed, not the request."""


def _retryable(exc: Exception) -> bool:
    """A failure of the server or the link (a stream the server ended early or cancelled too), not of the request."""
    if isinstance(exc, LinkError) and exc.code == "CANCELLED":  # the device's own cancel
        return False
    if isinstance(exc, RemoteError):
        return exc.code in RETRYABLE or exc.code == "CANCELLED"
    return type(exc) is TransportError


@dataclass(frozen=True)
class FailoverConfig:
    """How a ReplayingSession rebuilds its session after the link or the server fails."""

    deadline_s: float = 60.0
    """Give up (LinkError naming the replicas) when no replica took the replay this long after the failure."""
    backoff_s: float = 0.1
    """First wait between attempts; doubled after each failed one."""
    backoff_max_s: float = 3.0

    def __post_init__(self) -> None:
        for name in ("deadline_s", "backoff_s", "backoff_max_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ConfigError(f"{name} must be a finite number of seconds > 0, got {value!r}")


@dataclass(frozen=True)
class _Verified:
    """A verified frame in a ReplayingSession's history (speculation): `rows` positions sent, the first `keep`
    kept by the cloud. A replay re-sends it alone, with keep_rows."""

    frame: bytes
    rows: int
    keep: int


@dataclass(frozen=True)
class _SpilledMove:
    """A split move in a ReplayingSession's history: its LayerKV chunks, each serialized after its 4-byte
    length, in `size` bytes from `offset` of the spill file (none for a deeper move)."""

    new_split: int
    offset: int
    size: int


@dataclass
class Replay:
    """One rebuild of a session: why, how long from the failure to the replayed state, what it re-sent."""

    reason: str
    seconds: float
    frames: int
    bytes: int
    attempts: int


class ReplayingSession:
    """A RemoteSession that survives the loss of its server or link (DESIGN.md §7).

    The device keeps every frame it sent (a few hundred bytes per position), and the KV of every split
    move it made, spilled to a temporary file (the memory a move frees stays free). When a step fails
    with a RETRYABLE status, it opens a new session on the same channel (round_robin hands it a
    live replica, or the same one once it is back), with backoff, re-sends the frames without
    asking for tokens (merged into frames of up to a megabyte, byte for byte), and repeats the step. The cloud's tail KV is rebuilt from the very same
    hidden states, and a seeded draw depends on the token's position only, so the output equals
    an unbroken run's. Other errors (a refused request) pass through unchanged.
    """

    def __init__(self, channel: grpc.Channel, plan_hash: str, model_id: str, sampling: SamplingParams,
                 max_tokens: int, token: str | None = None, link: LinkConfig | None = None,
                 failover: FailoverConfig = FailoverConfig(), logprobs: int = 0,
                 uplink: UplinkMeter | bool = False) -> None:
        """`uplink`: measure the uplink from the cloud's receipts of prefill frames, for rate adaptation
        (device/uplink.py; `adapts(plan)` says whether a plan has any): True, with a new UplinkMeter, or with this one
        (a client's, so that a prompt starts from what the last measured). Every session of a rebuild shares it."""
        self._open_args = (channel, plan_hash, model_id, sampling)
        self.uplink = uplink if isinstance(uplink, UplinkMeter) else UplinkMeter() if uplink else None
        self._kwargs = dict(token=token, link=link, logprobs=logprobs, uplink=self.uplink)
        self.max_tokens = _check_max_tokens(max_tokens)
        self.failover = failover
        self.history: list[tuple[bytes, int] | _SpilledMove | _Verified] = []
        """Frames sent (frame, rows), verified frames and split moves made, in order: what a replay re-sends."""
        self._spill = None  # a temporary file holding the moves' KV
        self.tokens = 0
        self.replays: list[Replay] = []
        self.address = getattr(channel, "address", None) or "the server"
        self.remote = RemoteSession(*self._open_args, self.max_tokens, **self._kwargs)
        self._spent_up = self._spent_down = 0

    @property
    def bytes_up(self) -> int:
        return self._spent_up + self.remote.bytes_up

    @property
    def bytes_down(self) -> int:
        return self._spent_down + self.remote.bytes_down

    @property
    def last_token(self) -> pb.Token | None:
        return self.remote.last_token

    def _step(self, call: Callable[[], Any]) -> Any:
        """call() on the current remote session; when the link or the server fails, the session is rebuilt by replay
        and the call repeated. Other errors pass through."""
        failed_at = None
        while True:
            try:
                return call()
            except (RemoteError, TransportError) as exc:
                if not _retryable(exc):
                    raise
                failed_at = failed_at or time.monotonic()
                self._rebuild(exc, failed_at)

    def send(self, frame: bytes, rows: int, want_token: bool = True) -> int | None:
        """RemoteSession.send, rebuilt by replay when the link or the server fails."""
        answer = self._step(lambda: self.remote.send(frame, rows, want_token))
        self.history.append((frame, int(rows)))
        if want_token:
            self.tokens += 1
        return answer

    def next_token(self, frame: bytes, rows: int) -> int:
        return self.send(frame, rows)

    def verify(self, frame: bytes, rows: int, drafts: list[int]) -> tuple[int, int]:
        """RemoteSession.verify, kept for a replay with the rows the cloud kept."""
        accepted, token = self._step(lambda: self.remote.verify(frame, rows, drafts))
        self.history.append(_Verified(frame, int(rows), 1 + accepted))
        self.tokens += 1 + accepted
        return accepted, token

    @property
    def move_message_bytes(self) -> int:
        return self.remote.move_message_bytes

    def move_split(self, new_split: int, layers: Iterable[pb.LayerKV]) -> list[pb.LayerKV]:
        """RemoteSession.move_split, kept for a replay: its KV goes to the spill file as it is sent (the memory a
        move frees stays free). A move that fails with the link or the server is finished into the spill,
        the session is rebuilt by replay, and the move is sent again from the spill. MoveRefused passes through."""
        move = _SpilledMove(new_split, self._spill_end(), 0)
        spilled = [0]

        def tee() -> Iterator[pb.LayerKV]:
            for item in layers:
                self._spill_write(item)
                spilled[0] += 1
                yield item

        source: Iterable[pb.LayerKV] = tee()
        failed_at = None
        while True:
            try:
                answer = self.remote.move_split(new_split, source)
                break
            except MoveRefused:
                raise
            except (RemoteError, TransportError) as exc:
                if not _retryable(exc):
                    raise
                for _ in source:  # the rest of the move into the spill, then the session is rebuilt and the move resent
                    pass
                failed_at = failed_at or time.monotonic()
                self._rebuild(exc, failed_at)
                move = dataclasses.replace(move, size=self._spill_end() - move.offset)
                source = self._unspill(move)
        self.history.append(dataclasses.replace(move, size=self._spill_end() - move.offset))
        return answer

    def _spill_end(self) -> int:
        return 0 if self._spill is None else self._spill.seek(0, os.SEEK_END)

    def _spill_write(self, item: pb.LayerKV) -> None:
        if self._spill is None:
            import tempfile

            self._spill = tempfile.TemporaryFile(prefix="splitlm-moves-")
        data = item.SerializeToString()
        self._spill.seek(0, os.SEEK_END)
        self._spill.write(len(data).to_bytes(4, "little") + data)

    def _unspill(self, move: "_SpilledMove") -> Iterator[pb.LayerKV]:
        """The move's LayerKV chunks, read back one at a time."""
        offset, end = move.offset, move.offset + move.size
        while offset < end:
            self._spill.seek(offset)
            n = int.from_bytes(self._spill.read(4), "little")
            item = pb.LayerKV.FromString(self._spill.read(n))
            offset += 4 + n
            yield item

    def _rebuild(self, cause: Exception, failed_at: float) -> None:
        cfg, wait, attempts = self.failover, self.failover.backoff_s, 0
        log.warning("session with %s failed (%s); replaying %d frames", self.address, cause, len(self.history))
        self._spent_up += self.remote.bytes_up
        self._spent_down += self.remote.bytes_down
        self.remote.cancel("replaced by a replay")
        while True:
            attempts += 1
            remote = None
            try:
                remote = RemoteSession(*self._open_args, max(1, self.max_tokens - self.tokens), **self._kwargs)
                sent = 0
                for item in self._merged(remote.info.max_frame_bytes):
                    if isinstance(item, _SpilledMove):
                        remote.move_split(item.new_split, self._unspill(item))
                        sent += item.size
                    elif isinstance(item, _Verified):
                        remote.replay_verified(item.frame, item.rows, item.keep)
                        sent += len(item.frame)
                    else:
                        remote.send(*item, want_token=False)
                        sent += len(item[0])
                self.remote = remote
                self.replays.append(Replay(str(cause), time.monotonic() - failed_at, len(self.history), sent, attempts))
                return
            except (RemoteError, TransportError) as exc:
                if remote is not None:  # a half-replayed session is of no use: free it on its replica
                    remote.cancel("the replay failed")
                if not _retryable(exc):
                    raise
                cause = exc
            if time.monotonic() - failed_at + wait > cfg.deadline_s:
                raise LinkError(f"no replica of {self.address} took the session back within {cfg.deadline_s:g} s "
                                f"({attempts} attempts; last: {cause})", "UNAVAILABLE")
            time.sleep(wait)
            wait = min(wait * 2, cfg.backoff_max_s)

    def _merged(self, max_bytes: int) -> Iterator["tuple[bytes, int] | _SpilledMove | _Verified"]:
        """The history as few frames as the server's frame limit allows (rows byte for byte, codec.concat_frames),
        with its moves and verified frames in place: the new replica prefills them in chunks instead of one step
        per decoded token."""
        from splitlm.quantize import codec

        limit = min(max_bytes or REPLAY_FRAME_BYTES, REPLAY_FRAME_BYTES)
        batch: list[bytes] = []
        size = rows = 0
        for entry in self.history:
            alone = isinstance(entry, (_SpilledMove, _Verified))
            if alone or (batch and size + len(entry[0]) > limit):
                if batch:
                    yield (batch[0] if len(batch) == 1 else codec.concat_frames(batch)), rows
                batch, size, rows = [], 0, 0
                if alone:
                    yield entry
                    continue
            frame, n = entry
            batch.append(frame)
            size += len(frame)
            rows += n
        if batch:
            yield (batch[0] if len(batch) == 1 else codec.concat_frames(batch)), rows

    def cancel(self, reason: str = "cancelled") -> None:
        self.remote.cancel(reason)
        self._drop_spill()

    def close(self, reason: str = "done") -> None:
        self.remote.close(reason)
        self._drop_spill()

    def _drop_spill(self) -> None:
        if self._spill is not None:
            self._spill.close()
            self._spill = None

    def __enter__(self) -> "ReplayingSession":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.cancel(f"device error: {exc_type.__name__}")


def _check_max_tokens(max_tokens) -> int:
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, (int, np.integer)) or not 1 <= max_tokens <= _UINT32_MAX:
        raise ConfigError(f"max_tokens must be an integer in [1, {_UINT32_MAX}], got {max_tokens!r}")
    return int(max_tokens)


def _check_token(token) -> str:
    if not isinstance(token, str) or not all("!" <= ch <= "~" for ch in token):
        raise ConfigError("the bearer token must be printable ASCII without spaces or control characters")
    return token


def _sampling_message(s: SamplingParams) -> pb.Sampling:
    """The wire form of `s`, refusing what the proto cannot carry as given (float32, uint32, uint64)."""
    t, p, k, seed = s.temperature, s.top_p, s.top_k, s.seed
    if not (isinstance(t, (int, float, np.floating)) and not isinstance(t, bool) and math.isfinite(t)
            and (t == 0 or _F32_TINY <= t <= _F32_MAX)):
        raise ConfigError(f"temperature must be 0 (greedy) or in [{_F32_TINY:.3g}, {_F32_MAX:.3g}] "
                          f"(it travels as float32), got {t!r}")
    if not (isinstance(p, (int, float, np.floating)) and not isinstance(p, bool) and _F32_TINY <= p <= 1):
        raise ConfigError(f"top_p must be in [{_F32_TINY:.3g}, 1] (it travels as float32; 0 would read as 1), got {p!r}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k <= _UINT32_MAX:
        raise ConfigError(f"top_k must be an integer in [0, {_UINT32_MAX}], got {k!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed <= _UINT64_MAX):
        raise ConfigError(f"seed must be None or an integer in [0, 2**64 - 1], got {seed!r}")
    return pb.Sampling(temperature=float(t), top_k=int(k), top_p=float(p), seed=int(seed or 0), has_seed=seed is not None)


_HOST_NAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?")
_ADDRESS_HELP = "HOST:PORT, e.g. 127.0.0.1:50051, cloud.example.com:443 or [::1]:50051"


def check_address(address: str) -> str:
    """`address` if it is HOST:PORT (a host name, an IPv4 address or a bracketed IPv6 one; port 1-65535)."""
    if not isinstance(address, str):
        raise ConfigError(f"server address must be {_ADDRESS_HELP}, got {address!r}")
    host, sep, port = address.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"server address {address!r} is not {_ADDRESS_HELP}")
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ConfigError(f"server address {address!r}: {host} is not an IPv6 address ({_ADDRESS_HELP})") from None
    elif not _HOST_NAME.fullmatch(host):
        raise ConfigError(f"server address {address!r}: {host!r} is not a host name or IP address "
                          f"(IPv6 goes in brackets; {_ADDRESS_HELP})")
    if not port.isascii() or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(f"server address {address!r}: port {port!r} is not a number in 1..65535")
    return address


_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----(.*?)-----END \1-----", re.S)


def read_root_certificates(source: bytes | str | os.PathLike) -> bytes:
    """PEM root certificates: `source` is their bytes, or the path of a file holding them.
    Refuses (ConfigError) anything that is not one or more PEM certificates."""
    if isinstance(source, (bytes, bytearray)):
        data, name = bytes(source), "the given TLS root certificate data"
    else:
        name = f"TLS root certificate file {str(source)!r}"
        try:
            data = Path(source).read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read {name}: {exc.strerror or exc}") from None
    blocks = _PEM_BLOCK.findall(data)
    certificates = [body for label, body in blocks if label == b"CERTIFICATE"]
    if not certificates:
        others = sorted({label.decode() for label, _ in blocks})
        held = f"it holds {', '.join(others)}" if others else "no '-----BEGIN CERTIFICATE-----' block found"
        raise ConfigError(f"{name} is not a PEM certificate ({held})")
    for i, body in enumerate(certificates):
        try:
            der = base64.b64decode(b"".join(body.split()), validate=True)
        except (binascii.Error, ValueError):
            raise ConfigError(f"{name} is not a PEM certificate (certificate {i + 1} is not valid base64)") from None
        if not _is_der_sequence(der):
            raise ConfigError(f"{name} is not a PEM certificate (certificate {i + 1} does not hold a DER certificate)")
    return data


def _is_der_sequence(der: bytes) -> bool:
    """True when `der` is exactly one DER SEQUENCE (the outer shape of an X.509 certificate)."""
    if len(der) < 2 or der[0] != 0x30:
        return False
    if der[1] < 0x80:
        return 2 + der[1] == len(der)
    n = der[1] & 0x7F
    return 0 < n <= 4 and len(der) > 2 + n and 2 + n + int.from_bytes(der[2:2 + n], "big") == len(der)


def grpc_target(addresses: list[str]) -> str:
    """The gRPC target for one or several HOST:PORT addresses: one stays as it is (a DNS name with
    several records is spread by round_robin too); several become one static list ("ipv4:a:p,b:p"),
    host names resolved now. ConfigError for a name that does not resolve, or IPv4 mixed with IPv6."""
    if len(addresses) == 1:
        return addresses[0]
    import socket

    v4, v6 = [], []
    for address in addresses:
        host, _, port = address.rpartition(":")
        if host.startswith("["):
            v6.append(f"{host}:{port}")
            continue
        try:
            ipaddress.IPv4Address(host)
            v4.append(address)
            continue
        except ValueError:
            pass
        try:
            infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
        except OSError as exc:
            raise ConfigError(f"server address {address!r}: {host!r} does not resolve ({exc})") from None
        for family, *_, sockaddr in infos:
            (v4 if family == socket.AF_INET else v6).append(f"{sockaddr[0]}:{port}" if family == socket.AF_INET
                                                           else f"[{sockaddr[0]}]:{port}")
    if v4 and v6:
        raise ConfigError(f"servers {addresses}: IPv4 and IPv6 addresses in one list; give one family")
    unique = list(dict.fromkeys(v4 or v6))
    return ("ipv4:" if v4 else "ipv6:") + ",".join(unique)


def connect(address: str, root_certificates: bytes | str | os.PathLike | None = None,
            link: LinkConfig = LinkConfig()) -> CloudChannel:
    """A channel to `address`: HOST:PORT, or several separated by commas (replicas of one plan), with
    keepalive. New sessions are spread over the replicas by gRPC's own round_robin balancing; a
    replica that goes down is left out until it is back. TLS when root certificates (PEM bytes, or
    the path of a PEM file) are given. RemoteSessions on it use `link`'s deadlines."""
    if not isinstance(address, str):
        raise ConfigError(f"server address must be {_ADDRESS_HELP}, got {address!r}")
    addresses = [check_address(a.strip()) for a in address.split(",")]
    options = link.channel_options() + [("grpc.lb_policy_name", "round_robin")]
    target = grpc_target(addresses)
    if root_certificates is not None:
        host = addresses[0].rpartition(":")[0]
        if len(addresses) > 1 and not host.startswith("["):  # the certificate names the host, not the resolved IPs
            options.append(("grpc.ssl_target_name_override", host))
        credentials = grpc.ssl_channel_credentials(read_root_certificates(root_certificates))
        channel = grpc.secure_channel(target, credentials, options=options)
    else:
        channel = grpc.insecure_channel(target, options=options)
    return CloudChannel(channel, ",".join(addresses), link)


def probe_rtt_ms(address: str, count: int = 20) -> float:
    """Median round trip (ms) of the standard gRPC health check against a running `splitlm serve`: the link's RTT
    as `splitlm profile --server` measures it (torch-free: it runs on the device)."""
    import statistics

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    channel = grpc.insecure_channel(check_address(address))
    stub = health_pb2_grpc.HealthStub(channel)
    try:
        stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
        times = []
        for _ in range(count):
            t0 = time.perf_counter()
            stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
            times.append((time.perf_counter() - t0) * 1e3)
    except grpc.RpcError as exc:
        raise ConfigError(f"cannot probe the link to {address}: {exc.code().name}: {exc.details()}") from None
    finally:
        channel.close()
    return statistics.median(times)
