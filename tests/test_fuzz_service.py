"""Fuzzing the service (issue 13): one real server on port 0, a healthy session generating beside it.

Random and mutated activation frames, and protobuf-level message sequences (out of order,
repeated, oversized, undecodable), each on a stream of its own. Every call must be answered
(a message or a status) within a generous deadline, with a status of the right class (a
client's mistake is never INTERNAL or UNKNOWN); afterwards the server still answers health,
holds no session and no KV, and the healthy session's greedy tokens equal the same generation
run alone before the fuzzing. Seeded and of fixed size: the same inputs every run. A failure
names its case (e.g. "mutated[137] base 2: rows 11 -> 129"); `frame_cases(np.random.default_rng(SEED),
plan, d)` rebuilds the exact inputs, in the same order.
"""

from __future__ import annotations

import logging
import queue
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import grpc
import numpy as np
import pytest

from splitlm.errors import CodecError
from splitlm.proto import splitlm_pb2 as pb
from splitlm.quantize import codec
from splitlm.quantize.config import CodecConfig
from tests.test_service import TABQ
from tests.test_service_faults import open_msg, wait_for

SEED = 20240613
N_RANDOM_FRAMES = 60
N_MUTATED_FRAMES = 300
N_GARBAGE_MESSAGES = 40
DEADLINE_S = 30.0
"""Every fuzz call must be answered within this (the server answers in milliseconds)."""
HEALTHY_TOKENS = 24
GENERATE = "/splitlm.v1.SplitInference/Generate"
CLIENT_ERRORS = {"INVALID_ARGUMENT", "FAILED_PRECONDITION", "RESOURCE_EXHAUSTED", "UNIMPLEMENTED", "NOT_FOUND",
                 "OUT_OF_RANGE", "DEADLINE_EXCEEDED", "UNAUTHENTICATED"}
"""Status codes a client's mistake may get; never INTERNAL or UNKNOWN."""
H = codec.HEADER.size


# -- calls -------------------------------------------------------------------------------------------
@dataclass
class Case:
    """One stream's worth of input and what may come back."""

    name: str
    messages: list
    """DeviceMessages, or bytes sent as they are (identity serializer) when `raw`."""
    expect: set[str]
    """Allowed final status codes (names)."""
    check: Callable[[list], str | None] | None = None
    """Checks the responses; returns what is wrong, or None."""
    raw: bool = False
    method: str = GENERATE


@dataclass
class Outcome:
    responses: list
    code: str
    details: str
    seconds: float


def run_case(channel: grpc.Channel, case: Case) -> Outcome:
    """Send the case's messages on one stream, then half-close; collect answers and the status."""
    rpc = channel.stream_stream(case.method, request_serializer=None if case.raw else pb.DeviceMessage.SerializeToString,
                                response_deserializer=pb.CloudMessage.FromString)
    got: list = []
    t0 = time.monotonic()
    try:
        for msg in rpc(iter(case.messages), timeout=DEADLINE_S):
            got.append(msg)
    except grpc.RpcError as exc:
        return Outcome(got, exc.code().name, exc.details() or "", time.monotonic() - t0)
    return Outcome(got, "OK", "", time.monotonic() - t0)


def judge(case: Case, out: Outcome) -> str | None:
    """What is wrong with this outcome, or None."""
    if out.code == "DEADLINE_EXCEEDED" and out.seconds >= DEADLINE_S * 0.9:
        return f"no answer within {DEADLINE_S} s (a hang)"
    if out.code not in case.expect:
        return f"status {out.code} ({out.details[:200]!r}), expected one of {sorted(case.expect)}"
    if out.code != "OK" and out.code not in CLIENT_ERRORS:
        return f"status {out.code} is not a client error"
    if len(out.details) > 1000:
        return f"status details of {len(out.details)} chars: the echo is not bounded"
    if case.check is not None:
        return case.check(out.responses)
    return None


def kinds(responses) -> list[str]:
    return [r.WhichOneof("kind") for r in responses]


def answers(*expected: str, positions: tuple[int, ...] | None = None):
    """A check: the responses are these kinds in order (and the tokens at these positions)."""
    def check(responses):
        if kinds(responses) != list(expected):
            return f"responses {kinds(responses)}, expected {list(expected)}"
        if positions is not None and [r.token.position for r in responses if r.HasField("token")] != list(positions):
            return f"token positions {[r.token.position for r in responses if r.HasField('token')]}, expected {positions}"
        return None
    return check


def refused(code: str, *before: str, after: tuple[str, ...] = ()):
    """A check: the responses are `before`, one Error message with status `code`, then `after`."""
    def check(responses):
        want = [*before, "error", *after]
        if kinds(responses) != want:
            return f"responses {kinds(responses)}, expected {want}"
        got = responses[len(before)].error.code
        if got != getattr(grpc.StatusCode, code).value[0]:
            return f"error code {got}, expected {code}"
        return None
    return check


# -- frames --------------------------------------------------------------------------------------------
def act(frame: bytes, start: int = 0, want_token: bool = True) -> pb.DeviceMessage:
    return pb.DeviceMessage(activations=pb.Activations(start_position=start, frame=frame, want_token=want_token))


def base_frames(rng: np.random.Generator, d: int) -> list[bytes]:
    """Valid frames of every shape the mutations need: single rows, outliers, groups, raw fp16/fp32 rows."""
    def spiky(rows):
        x = rng.standard_normal((rows, d)).astype(np.float32)
        x[:, rng.integers(0, d, 3)] *= 40  # threshold splitting takes these out as outliers
        return x

    tiny = rng.standard_normal((3, d)).astype(np.float32) * np.float32(1e-7)  # rows below fp16's reach go raw fp32
    mixed = np.concatenate([spiky(6), tiny, rng.standard_normal((2, d)).astype(np.float32)])
    return [codec.encode(rng.standard_normal((1, d)).astype(np.float32), TABQ),
            codec.encode(spiky(5), TABQ),
            codec.encode(mixed, TABQ),
            codec.encode(spiky(4), CodecConfig("tabq", entropy="none", error_budget=0.01, group_size=16)),
            codec.encode(spiky(3), CodecConfig("tabq", entropy="none", error_budget=1e-7)),  # raw rows with outliers listed
            codec.encode(spiky(2), CodecConfig("tabq", entropy="none", error_budget=0.01, rotate_block=0)),
            codec.encode(spiky(1), TABQ),  # single rows, for decode steps: outliers, and a raw row
            codec.encode(tiny[:1], TABQ)]


SINGLE_ROW_BASES = (0, 6, 7)


def raw32_frame(values: np.ndarray) -> bytes:
    """A tabq frame of raw fp32 rows holding any finite values, which no encoder would send (|x| > 65504)."""
    T, d = values.shape
    header = codec.HEADER.pack(codec.MAGIC, codec.FRAME_VERSION, codec.KINDS["tabq"], 0, 0, 0, T, d)
    return header + bytes([codec.RAW32_ROW]) * T + b"\0" * (2 * T + 4 * T) + values.astype("<f4").tobytes()


def frame_verdict(frame: bytes, max_rows: int, d: int, position: int = 0) -> str:
    """What the server must answer a frame at `position`: the codec's own checks plus the plan's."""
    try:
        lay = codec.parse_frame(frame, max_rows=max_rows)
    except CodecError:
        return "INVALID_ARGUMENT"
    if lay.kind != "tabq" or lay.dim != d:
        return "INVALID_ARGUMENT"
    return "RESOURCE_EXHAUSTED" if position + lay.rows > max_rows else "OK"


def _sections(frame: bytes) -> dict[str, tuple[int, int]]:
    """Byte ranges of a valid tabq frame's parts."""
    lay = codec.parse_frame(frame)
    T, G, N = lay.rows, lay.groups, len(lay.out_idx)
    s = {"bits": H, "n_out": H + T, "scales": H + 3 * T, "mins": H + 3 * T + 2 * T * G,
         "out_idx": H + 3 * T + 4 * T * G, "out_val": H + 3 * T + 4 * T * G + 2 * N, "codes": lay.payload_offset}
    ends = {"bits": s["n_out"], "n_out": s["scales"], "scales": s["mins"], "mins": s["out_idx"],
            "out_idx": s["out_val"], "out_val": s["codes"], "codes": len(frame)}
    return {k: (s[k], ends[k]) for k in s}


SPECIAL_F16 = [np.float16(v) for v in (np.nan, np.inf, -np.inf, 65504, -65504, 0, 6e-8, 1)]
SPECIAL_F32 = [np.float32(v) for v in (np.nan, np.inf, 3e38, -3e38, 1e-45)]


def mutate(rng: np.random.Generator, base: bytes) -> tuple[str, bytes]:
    """One mutation of a valid frame, named so that a failure says what was sent."""
    f = bytearray(base)
    sec = _sections(base)
    lay = codec.parse_frame(base)
    op = rng.choice(["bitflip", "side_bitflip", "truncate", "extend", "rows", "dim", "kind", "group", "rotation",
                     "reserved", "version", "magic", "bits", "n_out", "out_idx", "scale", "out_val", "raw_value",
                     "codes"])
    if op in ("bitflip", "side_bitflip"):
        lo, hi = (0, len(f)) if op == "bitflip" else (0, sec["codes"][0])
        flips = [int(i) for i in rng.integers(lo * 8, hi * 8, int(rng.integers(1, 9)))]
        for i in flips:
            f[i // 8] ^= 1 << (i % 8)
        return f"{op} bits {flips}", bytes(f)
    if op == "truncate":
        n = int(rng.integers(0, len(f)))
        return f"truncate to {n}", bytes(f[:n])
    if op == "extend":
        extra = rng.bytes(int(rng.integers(1, 17)))
        return f"extend by {extra.hex()}", bytes(f) + extra
    if op == "rows":
        v = int(rng.choice([0, 1, lay.rows - 1, lay.rows + 1, 2 * lay.rows, 128, 129, 2**32 - 1, int(rng.integers(0, 2**32))]))
        struct.pack_into("<I", f, 8, v % 2**32)
        return f"rows {lay.rows} -> {v % 2**32}", bytes(f)
    if op == "dim":
        v = int(rng.choice([0, 1, 32, 63, 65, 128, 4096, 65535]))
        struct.pack_into("<H", f, 12, v)
        return f"dim -> {v}", bytes(f)
    if op == "kind":
        v = int(rng.choice([0, 1, 3, 255]))
        f[3] = v
        return f"kind -> {v}", bytes(f)
    if op == "group":
        v = int(rng.choice([0, 1, 7, 16, 32, 63, 64, 65, 65535]))
        struct.pack_into("<H", f, 4, v)
        return f"group {lay.group} -> {v}", bytes(f)
    if op == "rotation":
        v = int(rng.choice([0, 1, 2, 5, 6, 7, 15, 16, 255]))
        f[6] = v
        return f"rotation log2 -> {v}", bytes(f)
    if op == "reserved":
        v = int(rng.integers(1, 256))
        f[7] = v
        return f"reserved -> {v}", bytes(f)
    if op == "version":
        v = int(rng.choice([0, 2, 255]))
        f[2] = v
        return f"version -> {v}", bytes(f)
    if op == "magic":
        f[int(rng.integers(0, 2))] ^= 0xFF
        return "magic flipped", bytes(f)
    row = int(rng.integers(0, lay.rows))
    if op == "bits":
        v = int(rng.choice([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 16, 32, 64, 255]))
        f[sec["bits"][0] + row] = v
        return f"row {row} width {int(lay.bits[row])} -> {v}", bytes(f)
    if op == "n_out":
        old = int(lay.n_out[row])
        v = int(rng.choice([0, old + 1, max(old - 1, 0), 64, 65, 65535]))
        struct.pack_into("<H", f, sec["n_out"][0] + 2 * row, v)
        return f"row {row} outliers {old} -> {v}", bytes(f)
    if op == "out_idx" and len(lay.out_idx):
        i = int(rng.integers(0, len(lay.out_idx)))
        v = int(rng.choice([0, 63, 64, 65535, int(lay.out_idx[i - 1]) if i else 0, int(lay.out_idx[i]) + 1]))
        struct.pack_into("<H", f, sec["out_idx"][0] + 2 * i, v)
        return f"outlier {i} channel {int(lay.out_idx[i])} -> {v}", bytes(f)
    if op == "scale":
        part = str(rng.choice(["scales", "mins"]))
        i = int(rng.integers(0, lay.rows * lay.groups))
        v = SPECIAL_F16[int(rng.integers(0, len(SPECIAL_F16)))]
        f[sec[part][0] + 2 * i: sec[part][0] + 2 * i + 2] = v.tobytes()
        return f"{part}[{i}] -> {v}", bytes(f)
    if op == "out_val" and len(lay.out_val):
        i = int(rng.integers(0, len(lay.out_val)))
        v = SPECIAL_F16[int(rng.integers(0, len(SPECIAL_F16)))]
        f[sec["out_val"][0] + 2 * i: sec["out_val"][0] + 2 * i + 2] = v.tobytes()
        return f"outlier value {i} -> {v}", bytes(f)
    raw = [r for r in range(lay.rows) if lay.bits[r] in (codec.RAW_ROW, codec.RAW32_ROW)]
    if op == "raw_value" and raw:
        r = raw[int(rng.integers(0, len(raw)))]
        wide = lay.bits[r] == codec.RAW32_ROW
        values = SPECIAL_F32 if wide else SPECIAL_F16
        v = values[int(rng.integers(0, len(values)))]
        at = int(lay.row_offsets[r]) + int(rng.integers(0, lay.dim)) * (4 if wide else 2)
        f[at:at + v.nbytes] = v.tobytes()
        return f"raw row {r} value -> {v}", bytes(f)
    lo, hi = sec["codes"]
    n = int(rng.integers(1, 9))
    at = int(rng.integers(lo, hi - n + 1))
    f[at:at + n] = rng.bytes(n)
    return f"codes [{at}:{at + n}] randomized", bytes(f)


def random_frame(rng: np.random.Generator, d: int) -> tuple[str, bytes]:
    """Random bytes; half of them behind a plausible tabq header, so that they reach the side information."""
    n = int(rng.choice([0, 1, 13, 14, 15, int(rng.integers(16, 4096))]))
    body = rng.bytes(n)
    if rng.random() < 0.5:
        rows = int(rng.integers(1, 9))
        header = codec.HEADER.pack(codec.MAGIC, codec.FRAME_VERSION, codec.KINDS["tabq"], 0, 6, 0, rows, d)
        return f"tabq header (rows {rows}) + {n} random bytes", header + body
    return f"{n} random bytes", body


def frame_cases(rng: np.random.Generator, plan, d: int) -> list[Case]:
    """Frames on a fresh session (a prefill), and every third mutated one as a decode step after a valid
    3-row prompt: single-row steps run in batched forwards beside the healthy session's."""
    bases = base_frames(rng, d)
    prompt = codec.encode(rng.standard_normal((3, d)).astype(np.float32), TABQ)
    cases = []

    def case(name, frame, as_step=False):
        position = 3 if as_step else 0
        verdict = frame_verdict(frame, plan.max_seq_len, d, position)
        before = ("opened", "token") if as_step else ("opened",)
        if verdict == "OK":
            check = answers(*before, "token", positions=(3,) * as_step + (position + codec.parse_frame(frame).rows,))
        else:
            check = answers(*before)
        messages = [open_msg(plan)] + ([act(prompt), act(frame, 3)] if as_step else [act(frame)])
        cases.append(Case(f"{name}{' as a decode step' if as_step else ''} (frame {frame[:48].hex()}"
                          f"{'...' if len(frame) > 48 else ''}, {len(frame)} bytes)", messages, {verdict}, check))

    for i in range(N_RANDOM_FRAMES):
        name, frame = random_frame(rng, d)
        case(f"random[{i}] {name}", frame)
    for i in range(N_MUTATED_FRAMES):
        as_step = i % 3 == 2
        b = int(rng.choice(SINGLE_ROW_BASES)) if as_step else int(rng.integers(0, len(bases)))
        name, frame = mutate(rng, bases[b])
        case(f"mutated[{i}] base {b}: {name}", frame, as_step)
    for value in (65504.0, 1e30, 3e38, -3e38):  # finite, far outside what an encoder sends
        case(f"raw fp32 row of {value:g}", raw32_frame(np.full((1, d), value, np.float32)), as_step=True)
        case(f"raw fp32 rows of {value:g}", raw32_frame(np.full((4, d), value, np.float32)))
    return cases


# -- message sequences -------------------------------------------------------------------------------
def sequence_cases(plan, d: int, healthy_ids: Callable[[], list[str]]) -> list[Case]:
    def frame(rows, seed=0):
        return codec.encode(np.random.default_rng(seed).standard_normal((rows, d)).astype(np.float32), TABQ)

    op = open_msg(plan)
    f1, f3 = frame(1), frame(3)
    huge = "x" * (1 << 20)
    bad = {"INVALID_ARGUMENT"}
    cases = [
        Case("activations before open", [act(f1)], bad),
        Case("cancel before open", [pb.DeviceMessage(cancel=pb.Cancel(reason="bye"))], bad),
        Case("move_split before open", [pb.DeviceMessage(move_split=pb.MoveSplit(new_split=1))], bad),
        Case("empty message before open", [pb.DeviceMessage()], bad),
        Case("empty message after open", [op, pb.DeviceMessage()], bad, answers("opened")),
        Case("nothing at all", [], {"OK"}, answers()),
        Case("open then half-close", [op], {"OK"}, answers("opened")),
        Case("two opens", [op, op], bad, answers("opened")),
        Case("open, frame, open", [op, act(f1), op], bad, answers("opened", "token")),
        # the plan has no split moves: a move is refused in the stream (OUT_OF_RANGE) and the session goes on
        Case("move_split", [op, pb.DeviceMessage(move_split=pb.MoveSplit(new_split=1))], {"OK"},
             refused("OUT_OF_RANGE", "opened")),
        Case("move_split with layers, then a frame", [op, act(f3), pb.DeviceMessage(move_split=pb.MoveSplit(
            new_split=1, layers=[pb.LayerKV(layer=1, bits=16, keys=b"\0" * 64, values=b"\1" * 64)])), act(f1, 3)],
            {"OK"}, refused("OUT_OF_RANGE", "opened", "token", after=("token",))),
        Case("move_split deeper than the tail", [op, pb.DeviceMessage(move_split=pb.MoveSplit(new_split=9))], {"OK"},
             refused("OUT_OF_RANGE", "opened")),
        Case("move_split announcing more, then a frame", [op, pb.DeviceMessage(move_split=pb.MoveSplit(new_split=1, more=True)),
                                                          act(f1)], bad, answers("opened")),
        Case("move_split in parts, refused once", [op, pb.DeviceMessage(move_split=pb.MoveSplit(new_split=1, more=True)),
                                                   pb.DeviceMessage(move_split=pb.MoveSplit(new_split=1)), act(f1)],
             {"OK"}, refused("OUT_OF_RANGE", "opened", after=("token",))),
        Case("cancel then more", [op, pb.DeviceMessage(cancel=pb.Cancel(reason="stop")), act(f1), act(f1, 1), op],
             {"OK"}, answers("opened")),
        Case("frame, cancel, frame", [op, act(f3), pb.DeviceMessage(cancel=pb.Cancel()), act(f1, 3)], {"OK"},
             answers("opened", "token")),
        Case("start 1 at position 0", [op, act(f1, start=1)], bad, answers("opened")),
        Case("start at 2^32-1", [op, act(f1, start=2**32 - 1)], bad, answers("opened")),
        Case("start 2 after 3 rows", [op, act(f3), act(f1, start=2)], bad, answers("opened", "token")),
        Case("start repeated", [op, act(f1), act(f1, start=0)], bad, answers("opened", "token")),
        Case("want_token false then true", [op, act(f3, want_token=False), act(f1, start=3)], {"OK"},
             answers("opened", "token", positions=(4,))),
        Case("want_token false only", [op, act(f3, want_token=False), act(f3, start=3, want_token=False)], {"OK"},
             answers("opened")),
        Case("empty frame", [op, act(b"")], bad, answers("opened")),
        Case("empty frame, want_token false", [op, act(b"", want_token=False)], bad, answers("opened")),
        Case("activations with no fields", [op, pb.DeviceMessage(activations=pb.Activations())], bad, answers("opened")),
        Case("fp32 frame on a tabq plan", [op, act(codec.encode(np.ones((1, d), np.float32), CodecConfig("fp32")))], bad),
        Case("fp16 frame on a tabq plan", [op, act(codec.encode(np.ones((1, d), np.float32), CodecConfig("fp16")))], bad),
        Case("wrong hidden size", [op, act(codec.encode(np.ones((2, d * 2), np.float32), TABQ))], bad),
        Case("max_tokens exceeded", [open_msg(plan, max_tokens=2), act(f3), act(f1, 3), act(f1, 4)],
             {"RESOURCE_EXHAUSTED"}, answers("opened", "token", "token", positions=(3, 4))),
        Case("max_tokens exceeded, then a prefill without token is still refused later",
             [open_msg(plan, max_tokens=1), act(f1), act(f1, 1, want_token=False), act(f1, 2)],
             {"RESOURCE_EXHAUSTED"}, answers("opened", "token")),
        Case("max_tokens 2^32-1 is lowered", [open_msg(plan, max_tokens=2**32 - 1)], {"OK"},
             lambda r: None if r and r[0].opened.max_tokens == 4096 else f"opened {r[:1]}"),
        Case("max_tokens 0", [open_msg(plan, max_tokens=0)], bad),
        Case("a frame past max_seq_len", [op, act(frame(plan.max_seq_len + 1))], bad, answers("opened")),
        Case("positions past max_seq_len", [op, act(frame(plan.max_seq_len - 8), want_token=False),
                                            act(frame(9), plan.max_seq_len - 8)],
             {"RESOURCE_EXHAUSTED"}, answers("opened")),
        Case("exactly max_seq_len", [open_msg(plan, max_tokens=2), act(frame(plan.max_seq_len - 1)),
                                     act(f1, plan.max_seq_len - 1)], {"OK"}, answers("opened", "token", "token")),
        Case("twenty steps", [open_msg(plan, max_tokens=32)] + [act(f1 if i else f3, 0 if i == 0 else i + 2)
                                                               for i in range(20)],
             {"OK"}, answers("opened", *["token"] * 20, positions=tuple(range(3, 23)))),
        Case("wrong plan hash", [open_msg(plan, plan_hash="0" * 16)], {"FAILED_PRECONDITION"}),
        Case("empty plan hash", [open_msg(plan, plan_hash="")], {"FAILED_PRECONDITION"}),
        Case("wrong model id", [open_msg(plan, model_id="someone-else")], {"FAILED_PRECONDITION"}),
        Case("1 MiB plan hash", [open_msg(plan, plan_hash=huge)], {"FAILED_PRECONDITION"}),
        Case("1 MiB model id", [open_msg(plan, model_id=huge)], {"FAILED_PRECONDITION"}),
        Case("1 MiB resume_session", [open_msg(plan, resume_session=huge)], {"NOT_FOUND"}),
        Case("1 MiB cancel reason", [op, pb.DeviceMessage(cancel=pb.Cancel(reason=huge))], {"OK"}, answers("opened")),
        Case("9 MiB plan hash (over the message limit)", [open_msg(plan, plan_hash="y" * (9 << 20))],
             {"RESOURCE_EXHAUSTED"}),
        Case("frame over max_frame_bytes", [op, act(b"SL" + b"\0" * ((8 << 20) + 100))], bad, answers("opened")),
        Case("frame over the message limit", [op, act(b"\0" * (9 << 20))], {"RESOURCE_EXHAUSTED"}, answers("opened")),
        Case("unknown session", [open_msg(plan, resume_session="no-such-session")], {"NOT_FOUND"}),
        Case("non-ASCII strings", [open_msg(plan, plan_hash="ü\u202e\x00" * 100)], {"FAILED_PRECONDITION"}),
        Case("top_k 2^32-1, seed 2^64-1, tiny temperature",
             [open_msg(plan, sampling=pb.Sampling(temperature=1e-45, top_k=2**32 - 1, seed=2**64 - 1, has_seed=True)),
              act(f3)], {"OK"}, answers("opened", "token")),
        Case("huge temperature, tiny top_p", [open_msg(plan, sampling=pb.Sampling(temperature=3e38, top_p=1e-45)),
                                              act(f3)], {"OK"}, answers("opened", "token")),
        Case("logprobs at the limit", [open_msg(plan, sampling=pb.Sampling(logprobs=20)), act(f3)], {"OK"},
             lambda r: None if len(r) == 2 and len(r[1].token.top) == 20 else f"responses {r}"),
    ]
    for name, s in [("temperature NaN", pb.Sampling(temperature=float("nan"))),
                    ("temperature -1", pb.Sampling(temperature=-1.0)),
                    ("temperature inf", pb.Sampling(temperature=float("inf"))),
                    ("top_p NaN", pb.Sampling(top_p=float("nan"))), ("top_p -0.5", pb.Sampling(top_p=-0.5)),
                    ("top_p 1.5", pb.Sampling(top_p=1.5)), ("top_p inf", pb.Sampling(top_p=float("inf"))),
                    ("logprobs 2^32-1", pb.Sampling(logprobs=2**32 - 1))]:
        cases.append(Case(f"sampling {name}", [open_msg(plan, sampling=s), act(f1)], bad))
    # a live session's id cannot be taken over (or it has just ended: unknown)
    ids = healthy_ids()
    cases.append(Case("resume the healthy session", [open_msg(plan, resume_session=ids[-1] if ids else "none")],
                      {"FAILED_PRECONDITION", "NOT_FOUND"}))
    return cases


def garbage_cases(rng: np.random.Generator, plan) -> list[Case]:
    """Undecodable or unknown protobuf, sent as raw bytes on the Generate method (and one unknown method)."""
    op = open_msg(plan).SerializeToString()
    bad = {"INVALID_ARGUMENT"}
    crafted = {
        "truncated length": b"\x0a\xff\x01",
        "truncated varint": b"\x0a\x80",
        "invalid UTF-8 in plan_hash": b"\x0a\x03\x0a\x01\xff",
        "wrong wire type for open": b"\x0d\x00\x00\x00\x00",
        "group wire type": b"\x0b\x0c",
        "end-group without start": b"\x0c",
        "field number 0": b"\x02\x00",
        "unknown fields only": b"\xf8\x07\x01\x82\x08\x03abc",
        "oneof set twice (open, then activations)": op + act(b"").SerializeToString(),
        "varint of 11 bytes": b"\x20" + b"\xff" * 10 + b"\x01",
    }
    cases = [Case(f"first message: {k} ({v[:32].hex()})", [v], bad, raw=True) for k, v in crafted.items()]
    cases += [Case(f"after open: {k} ({v[:32].hex()})", [op, v], bad, answers("opened"), raw=True)
              for k, v in crafted.items() if k not in ("unknown fields only",)]
    cases.append(Case("open with unknown fields", [op + b"\xf8\x07\x01"], {"OK"}, answers("opened"), raw=True))
    for i in range(N_GARBAGE_MESSAGES):
        blob = rng.bytes(int(rng.integers(1, 64)))
        first = rng.random() < 0.5
        cases.append(Case(f"garbage[{i}] {'first' if first else 'after open'} ({blob.hex()})",
                          [blob] if first else [op, blob], CLIENT_ERRORS | ({"OK"} if not first else set()), raw=True))
    cases.append(Case("unknown method", [op], {"UNIMPLEMENTED"}, raw=True, method="/splitlm.v1.SplitInference/Nope"))
    cases.append(Case("unknown service", [op], {"UNIMPLEMENTED"}, raw=True, method="/nope.v1.Nope/Generate"))
    return cases


# -- the healthy session -----------------------------------------------------------------------------
class RawSession:
    """A generation session on raw stubs: a token for each frame that asks for one."""

    def __init__(self, channel: grpc.Channel, plan, max_tokens: int) -> None:
        rpc = channel.stream_stream(GENERATE, request_serializer=pb.DeviceMessage.SerializeToString,
                                    response_deserializer=pb.CloudMessage.FromString)
        self.requests: queue.Queue = queue.Queue()
        self.requests.put(open_msg(plan, max_tokens=max_tokens))
        self.call = rpc(iter(self.requests.get, None), timeout=120)
        self.session_id = next(self.call).opened.session_id
        self.position = 0

    def send(self, frame: bytes, rows: int, want_token: bool = True) -> int | None:
        self.requests.put(act(frame, self.position, want_token))
        self.position += rows
        return next(self.call).token.id if want_token else None

    def close(self) -> None:
        self.requests.put(None)
        for _ in self.call:
            pass


def generate(channel, artifacts, prompt, session_ids=None) -> list[int]:
    from splitlm.device.runtime import HeadSession, generate_split

    plan, result = artifacts
    session = RawSession(channel, plan, HEALTHY_TOKENS)
    if session_ids is not None:
        session_ids.append(session.session_id)
    try:
        return generate_split(HeadSession(result.device_dir, threads=1), session.send, prompt,
                              HEALTHY_TOKENS).token_ids
    finally:
        session.close()


# -- the arena: one server, the healthy session's reference, fuzzing beside it ---------------------------
@dataclass
class Arena:
    address: str
    service: object
    channel: grpc.Channel
    healthy_channel: grpc.Channel
    artifacts: tuple
    prompt: list[int]
    alone: list[int]
    """The healthy generation run alone, before any fuzzing."""
    session_ids: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def arena(tiny_ckpt, artifacts):
    from splitlm.cloud.service import ServerConfig, start_server
    from splitlm.cloud.tail import TailRunner

    srv, port, service = start_server(TailRunner(artifacts[1].cloud_dir), "127.0.0.1:0", ServerConfig(max_sessions=16))
    address = f"127.0.0.1:{port}"
    channel, healthy_channel = grpc.insecure_channel(address), grpc.insecure_channel(address)
    try:
        prompt = tiny_ckpt.tokenizer().encode("a healthy neighbour keeps on talking").ids
        alone = generate(healthy_channel, artifacts, prompt)
        assert len(alone) == HEALTHY_TOKENS
        yield Arena(address, service, channel, healthy_channel, artifacts, prompt, alone)
    finally:
        channel.close()
        healthy_channel.close()
        srv.stop(grace=None)


def fuzz(arena: Arena, make_cases: Callable[[], list[Case]], caplog) -> dict[str, int]:
    """Run the cases one by one while the healthy session generates again and again beside them; then
    check every outcome, the healthy tokens, and that the server is healthy and holds nothing.
    Returns how many cases ended with each status code."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    caplog.set_level(logging.INFO, logger="splitlm")
    stop, runs, errors = threading.Event(), [], []
    started = len(arena.session_ids)

    def healthy():
        try:
            while not stop.is_set():
                runs.append(generate(arena.healthy_channel, arena.artifacts, arena.prompt, arena.session_ids))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(repr(exc))

    beside = threading.Thread(target=healthy, daemon=True)
    beside.start()
    failures, codes = [], {}
    try:
        assert wait_for(lambda: len(arena.session_ids) > started, 30), "the healthy session did not start"
        cases = make_cases()
        for case in cases:
            out = run_case(arena.channel, case)
            codes[out.code] = codes.get(out.code, 0) + 1
            wrong = judge(case, out)
            if wrong:
                failures.append(f"{case.name}: {wrong}")
    finally:
        stop.set()
        beside.join(120)
    assert not beside.is_alive(), "the healthy session hung"
    assert not failures, f"{len(failures)} of {len(cases)} cases failed:\n" + "\n".join(failures)
    assert not errors, errors
    assert runs and all(r == arena.alone for r in runs), f"healthy runs differ from the run alone {arena.alone}: {runs}"
    health = health_pb2_grpc.HealthStub(arena.channel)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING
    service = arena.service
    assert wait_for(lambda: not service.sessions and service.pending_streams == 0), service.sessions
    assert wait_for(lambda: service.kv_bytes() == 0), service.kv_bytes()
    loud = [r.getMessage()[:300] for r in caplog.records
            if r.name.startswith("splitlm") and (r.levelno >= logging.ERROR or r.exc_info)]
    assert not loud, f"client errors logged as server errors: {loud}"
    return codes


# -- the tests -----------------------------------------------------------------------------------------
def test_fuzzed_frames(tiny_ckpt, arena, caplog):
    """Random byte strings and mutated valid frames, each after a valid Open: the codec's verdict, exactly."""
    plan = arena.artifacts[0]
    codes = fuzz(arena, lambda: frame_cases(np.random.default_rng(SEED), plan, tiny_ckpt.spec.hidden_size), caplog)
    assert codes.get("OK", 0) > 30 and codes.get("INVALID_ARGUMENT", 0) > 100, codes  # both paths were exercised


def test_fuzzed_message_sequences(tiny_ckpt, arena, caplog):
    """Out-of-order, repeated, oversized and out-of-range messages: the right status, the right answers."""
    plan = arena.artifacts[0]
    fuzz(arena, lambda: sequence_cases(plan, tiny_ckpt.spec.hidden_size, lambda: list(arena.session_ids)), caplog)


def test_undecodable_protobuf_is_a_client_error(arena, caplog):
    """Bytes that are not a DeviceMessage (sent with an identity serializer), first or after Open."""
    fuzz(arena, lambda: garbage_cases(np.random.default_rng(SEED + 1), arena.artifacts[0]), caplog)


def test_base_frames_cover_what_the_mutations_target(tiny_ckpt):
    """The valid frames the mutations start from hold outliers, groups, rotation and raw fp16/fp32 rows."""
    lays = [codec.parse_frame(f) for f in base_frames(np.random.default_rng(SEED), tiny_ckpt.spec.hidden_size)]
    widths = set().union(*(set(lay.bits.tolist()) for lay in lays))
    assert {codec.RAW_ROW, codec.RAW32_ROW} <= widths and widths - {codec.RAW_ROW, codec.RAW32_ROW}
    assert any(len(lay.out_idx) for lay in lays) and any(lay.group for lay in lays)
    assert any(lay.rotate for lay in lays) and any(not lay.rotate for lay in lays)
    steps = [lays[b] for b in SINGLE_ROW_BASES]
    assert all(lay.rows == 1 for lay in steps)
    assert any(len(lay.out_idx) for lay in steps) and any(lay.bits[0] in (codec.RAW_ROW, codec.RAW32_ROW) for lay in steps)
