"""Search: every split point × device bits × cloud bits × KV bits × codec point, each at the
longest sequence that fits the device memory, moving the split shallower during a session where
its KV would pass the budget (Plan.split_moves); keep what meets the budgets, return the Pareto
set (perplexity, per-token latency, bytes per token) and the chosen plan, and explain when
nothing fits or when device-only / cloud-only beats every split. torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from splitlm.errors import ConfigError
from splitlm.partition.profile import CodecPoint, MemoryProfile, Profile

Objective = Literal["quality", "latency"]
OBJECTIVES: tuple[str, ...] = get_args(Objective)
"""What the chosen plan may optimize: the best perplexity or the fastest token."""
SEQ_LADDER = (256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
SPECULATIVE_ROW_COST = 0.1
"""A head call's cost per row beyond the first, as a share of a one-row step (SmolLM2's default head: 5 rows in about
9.5 ms against 6.7 ms for one)."""


@dataclass(frozen=True)
class Budgets:
    """What the user asks of a plan."""

    device_memory_bytes: float
    """Peak device memory allowed."""
    token_latency_ms: float
    """Per-token decode latency allowed (device + link + cloud), at the planned max sequence length."""
    ttft_ms: float | None = None
    """Time to first token allowed for a prompt of `prompt_tokens`."""
    max_seq_len: int | None = None
    """Sequence length the plan must support; None = the longest that fits."""
    min_seq_len: int = 256
    """Shortest sequence worth planning for."""
    prompt_tokens: int = 128
    """Prompt length TTFT is predicted for."""
    prefill_chunk: int = 128
    """Positions per prefill step (transient activation memory)."""
    objective: Objective = "quality"
    """What the chosen plan optimizes among the feasible ones."""
    quality_tolerance: float = 0.005
    """With the quality objective: perplexities within this fraction of the best feasible one count
    as equal (a quality model from a few calibration windows resolves no finer: an 8-bit layer or
    KV cache measures a few 0.0001 either side of full precision), and the fastest of them wins."""
    lm_head_bits: int = 8
    """LM-head precision of device-only plans."""
    tokens_per_round_trip: float | None = None
    """Speculation (DESIGN.md §11): the tokens a split plan's decode round trip is expected to give (measured by
    `generate --speculate --json`); the link's and the cloud's share of a token's latency is divided by it, and the
    plan sessions speculate. None: no speculation."""

    def __post_init__(self) -> None:
        if self.tokens_per_round_trip is not None and not self.tokens_per_round_trip >= 1:
            raise ConfigError(f"tokens per round trip must be >= 1, got {self.tokens_per_round_trip}")
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"objective {self.objective!r} not in {OBJECTIVES}")
        if not self.device_memory_bytes > 0 or not self.token_latency_ms > 0:
            raise ConfigError("device memory and token latency budgets must be > 0")
        if not 0 <= self.quality_tolerance < 1:
            raise ConfigError(f"quality tolerance {self.quality_tolerance!r} is a fraction in [0, 1)")


@dataclass(frozen=True)
class Candidate:
    split: int
    device_bits: int
    cloud_bits: int
    kv_bits: int
    codec: CodecPoint
    max_seq_len: int
    memory_bytes: float
    token_latency_ms: float
    ttft_ms: float
    bytes_per_token: float
    perplexity: float
    moves: tuple[tuple[int, int], ...] = ()
    """Plan.split_moves: (length, layer) at which the session moves its split shallower."""


@dataclass
class SearchResult:
    chosen: Candidate | None
    pareto: list[Candidate]
    feasible: int
    """How many candidates met every budget."""
    evaluated: int
    message: str
    """One paragraph for the user: what was chosen and why, or which constraint binds."""
    notes: list[str] = field(default_factory=list)
    candidates: list[Candidate] = field(default_factory=list)
    """Every feasible configuration (at its longest fitting sequence)."""
    plan: Any = None
    """The chosen Plan, when the caller made it (`splitlm.partition` does; `to_plan` makes it)."""


def _chunks(tokens: int, chunk: int) -> list[int]:
    return [min(chunk, tokens - s) for s in range(0, tokens, chunk)]


def price(p: Profile, split: int, dev_bits: int, cloud_bits: int, kv_bits: int, codec: CodecPoint, seq: int,
          b: Budgets) -> Candidate:
    """Predicted memory, latency, TTFT, bytes and perplexity of one configuration.

    Decode step: device (overhead + embedding + ℓ layers at the context with their KV cache's
    quantization + encode) + link (RTT + transfer) + cloud (overhead + frame decode + L − ℓ layers
    + final norm and LM head); with speculation, the head's call (a row more per extra token), link and cloud
    divided by the tokens per round trip.
    TTFT: the device runs the prompt in prefill chunks, sends one
    frame, the cloud runs it in one call.
    """
    L = p.num_layers
    dev, cloud, mem, link = p.device, p.cloud, p.memory, p.link
    device_only = split == L
    memory = mem.device_bytes(split, dev_bits, kv_bits, seq) + mem.activation_bytes_per_token * b.prefill_chunk
    if device_only:
        memory += mem.lm_head_bytes[b.lm_head_bits]
    # a device-only step never waits on the network: the split session's overheads (gRPC, idle
    # runtime threads waking) are not paid
    device_ms = (0.0 if device_only else dev.step_overhead_ms) + dev.embed_ms
    chunks = _chunks(b.prompt_tokens, b.prefill_chunk)
    ttft = dev.prefill_overhead_ms + len(chunks) * dev.embed_ms
    if split:
        device_ms += split * ((dev.alone_decode_scale if device_only else 1.0) * dev.decode(dev_bits, seq)
                              + dev.kv_decode(kv_bits, seq))
        ttft += sum(split * (dev.prefill(dev_bits, t) + dev.kv_prefill(kv_bits, t)) for t in chunks)
    if device_only:
        device_ms += dev.head_ms[b.lm_head_bits]
        token_ms, bytes_up = device_ms, 0.0
        ttft += dev.head_ms[b.lm_head_bits]
    else:
        device_ms += codec.encode_ms
        bytes_up = codec.bytes_per_token
        link_ms = link.rtt_ms + link.transfer_ms(bytes_up + 16)
        cloud_ms = (cloud.step_overhead_ms + codec.decode_ms + (L - split) * cloud.decode(cloud_bits, seq)
                    + cloud.head_ms.get(16, 0.0))
        # speculation: a round trip's tokens run through the head in one call (DeviceHead.step_each), whose extra rows
        # cost SPECULATIVE_ROW_COST of the step each, and are encoded row by row; the round trip and the cloud's step
        # serve them all
        per_trip = b.tokens_per_round_trip or 1.0
        call_ms = (device_ms - codec.encode_ms) * (1.0 + SPECULATIVE_ROW_COST * (per_trip - 1.0))
        token_ms = codec.encode_ms + (call_ms + link_ms + cloud_ms) / per_trip
        ttft += (b.prompt_tokens * codec.prefill_encode + link.rtt_ms + link.transfer_ms(b.prompt_tokens * bytes_up)
                 + cloud.prefill_overhead_ms + b.prompt_tokens * codec.prefill_decode
                 + (L - split) * cloud.prefill(cloud_bits, b.prompt_tokens) + cloud.head_ms.get(16, 0.0))
    ppl = p.quality.perplexity(split, L, dev_bits, cloud_bits, kv_bits, codec.name)
    return Candidate(split, dev_bits, cloud_bits, kv_bits, codec, seq, memory, token_ms, ttft, bytes_up, ppl)


def plan_move(mem: MemoryProfile, split: int, dev_bits: int, kv_bits: int, seq: int, budget: float, chunk: int,
              min_length: int = 1) -> tuple[int, int] | None:
    """(length, layer): one shallower move that lets a session of `split` reach `seq` positions within
    `budget` device bytes (activations excluded), or None. The move goes to the deepest layer ℓ' whose
    K/V fits to `seq` beside the head's weights (the device keeps them), at the longest length where
    the K/V at `split` and one encoded copy of the layers sent still fit, less one prefill chunk (a
    move waits for the end of the step that reaches its length); not before `min_length`."""
    if split < 2:
        return None
    kv = mem.kv_bytes_per_token_layer[kv_bits]
    target = next((t for t in range(split - 1, 0, -1) if mem.device_bytes(split, dev_bits, kv_bits, seq, t) <= budget), None)
    if target is None:
        return None
    lo, hi = 0, seq
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if mem.device_bytes(split, dev_bits, kv_bits, mid) + (split - target) * kv * mid <= budget:
            lo = mid
        else:
            hi = mid - 1
    at = lo - chunk
    return (at, target) if at >= max(min_length, 1) else None


def move_peak(mem: MemoryProfile, split: int, dev_bits: int, kv_bits: int, seq: int, move: tuple[int, int], chunk: int) -> float:
    """Predicted peak device bytes of a session of `split` to `seq` positions that makes `move` (activations excluded)."""
    (at, target), kv = move, mem.kv_bytes_per_token_layer[kv_bits]
    return max(mem.device_bytes(split, dev_bits, kv_bits, at + chunk) + (split - target) * kv * (at + chunk),
               mem.device_bytes(split, dev_bits, kv_bits, seq, target))


def price_moving(p: Profile, split: int, dev_bits: int, cloud_bits: int, kv_bits: int, codec: CodecPoint, seq: int,
                 b: Budgets) -> Candidate | None:
    """A session of `split` that reaches `seq` positions by moving its split shallower once (`plan_move`),
    when its KV would pass the device memory budget: None when no move fits. The session's latency and
    perplexity are the worse of the two splits'."""
    if split >= p.num_layers:
        return None
    act = p.memory.activation_bytes_per_token * b.prefill_chunk
    move = plan_move(p.memory, split, dev_bits, kv_bits, seq, b.device_memory_bytes - act, b.prefill_chunk, b.prompt_tokens)
    if move is None:
        return None
    at, target = move
    before, after = price(p, split, dev_bits, cloud_bits, kv_bits, codec, at, b), price(p, target, dev_bits, cloud_bits, kv_bits, codec, seq, b)
    memory = move_peak(p.memory, split, dev_bits, kv_bits, seq, move, b.prefill_chunk) + act
    return Candidate(split, dev_bits, cloud_bits, kv_bits, codec, seq, memory, max(before.token_latency_ms, after.token_latency_ms),
                     before.ttft_ms, max(before.bytes_per_token, after.bytes_per_token), max(before.perplexity, after.perplexity),
                     (move,))


def _feasible(c: Candidate, b: Budgets) -> bool:
    return (c.memory_bytes <= b.device_memory_bytes and c.token_latency_ms <= b.token_latency_ms
            and (b.ttft_ms is None or c.ttft_ms <= b.ttft_ms))


def _violation(c: Candidate, b: Budgets) -> tuple[float, str]:
    ratios = {"device memory": c.memory_bytes / b.device_memory_bytes,
              "token latency": c.token_latency_ms / b.token_latency_ms}
    if b.ttft_ms is not None:
        ratios["TTFT"] = c.ttft_ms / b.ttft_ms
    worst = max(ratios, key=ratios.get)
    return ratios[worst], worst


def _pareto(cands: list[Candidate]) -> list[Candidate]:
    key = lambda c: (c.perplexity, c.token_latency_ms, c.bytes_per_token)  # noqa: E731
    out: list[Candidate] = []
    for c in sorted(cands, key=key):
        if not any(o.perplexity <= c.perplexity and o.token_latency_ms <= c.token_latency_ms
                   and o.bytes_per_token <= c.bytes_per_token for o in out):
            out.append(c)
    return out


def describe(c: Candidate, L: int) -> str:
    where = "device-only" if c.split == L else ("cloud-only" if c.split == 0 else f"split at {c.split}/{L}")
    parts = [where]
    if c.split > 0:
        parts.append(f"device W{c.device_bits}" + (f" KV{c.kv_bits}" if c.kv_bits != 16 else ""))
    if c.split < L:
        parts += [f"cloud W{c.cloud_bits}", f"codec {c.codec.name}"]
    moves = "".join(f", moves to {layer} at {at}" for at, layer in c.moves)
    return ", ".join(parts) + f", max_seq_len {c.max_seq_len}" + moves


def search(p: Profile, b: Budgets) -> SearchResult:
    L = p.num_layers
    dev_bits = [x for x in p.device.bits if x in p.memory.layer_bytes]
    cloud_bits = list(p.cloud.bits)
    kv_bits = sorted(p.memory.kv_bytes_per_token_layer)
    cap = p.max_position
    if b.max_seq_len and cap and b.max_seq_len > cap:
        raise ConfigError(f"max_seq_len {b.max_seq_len} is past the {cap} positions {p.model_id} was trained for; "
                          f"ask for at most {cap}")
    seqs = [b.max_seq_len] if b.max_seq_len else [s for s in SEQ_LADDER if s >= b.min_seq_len and (not cap or s <= cap)]
    if not seqs:  # no rung of the ladder between the minimum and what the model was trained for
        if cap < b.min_seq_len:
            raise ConfigError(f"min_seq_len {b.min_seq_len} is past the {cap} positions {p.model_id} was trained for")
        seqs = [cap]
    cands: list[Candidate] = []
    evaluated = 0
    for split in range(L + 1):
        for db in (dev_bits if split else [16]):
            for cb in (cloud_bits if split < L else [16]):
                for kb in (kv_bits if split else [16]):
                    for codec in (p.codecs if split < L else (CodecPoint("-", 0.0, 0.0, 0.0, "none"),)):
                        best = None
                        for seq in seqs:  # memory grows with seq: keep the longest that fits, else the shortest
                            c = price(p, split, db, cb, kb, codec, seq, b)
                            evaluated += 1
                            if c.memory_bytes > b.device_memory_bytes:  # past the KV budget: longer by moving the split
                                c = price_moving(p, split, db, cb, kb, codec, seq, b) or c
                            if best is None or c.memory_bytes <= b.device_memory_bytes:
                                best = c
                            if c.memory_bytes > b.device_memory_bytes:
                                break
                        cands.append(best)
    feasible = [c for c in cands if _feasible(c, b)]
    if not feasible:
        nearest = min(cands, key=lambda c: _violation(c, b)[0])
        ratio, binding = _violation(nearest, b)
        needs = {"device memory": f"{nearest.memory_bytes / 2**20:.1f} MiB of device memory",
                 "token latency": f"a token latency budget of {nearest.token_latency_ms:.1f} ms",
                 "TTFT": f"a TTFT budget of {nearest.ttft_ms:.0f} ms"}[binding]
        msg = (f"no plan fits: {binding} binds. The nearest plan ({describe(nearest, L)}) needs {needs} "
               f"({ratio:.2f}x the budget).")
        return SearchResult(None, [], 0, evaluated, msg)
    if b.objective == "quality":
        best = min(c.perplexity for c in feasible) * (1 + b.quality_tolerance)
        chosen = min((c for c in feasible if c.perplexity <= best),
                     key=lambda c: (c.token_latency_ms, c.perplexity, c.bytes_per_token))
    else:
        chosen = min(feasible, key=lambda c: (c.token_latency_ms, c.perplexity, c.bytes_per_token))
    notes = []
    splits = [c for c in feasible if 0 < c.split < L]
    objective = (lambda c: (c.perplexity, c.token_latency_ms)) if b.objective == "quality" else (
        lambda c: (c.token_latency_ms, c.perplexity))
    best_split = min(splits, key=objective) if splits else None
    if chosen.split == L:
        notes.append("device-only beats every split" + ("" if best_split else " (no split fits)"))
    elif chosen.split == 0:
        notes.append("cloud-only beats every split" + ("" if best_split else " (no split fits)"))
    msg = (f"chose {describe(chosen, L)}: predicted {chosen.memory_bytes / 2**20:.1f} MiB, "
           f"{chosen.token_latency_ms:.1f} ms/token, TTFT {chosen.ttft_ms:.0f} ms, {chosen.bytes_per_token:.0f} B/token, "
           f"perplexity {chosen.perplexity:.3f} ({len(feasible)} of {len(cands)} configurations fit)")
    if notes:
        msg += "; " + "; ".join(notes)
    return SearchResult(chosen, _pareto(feasible), len(feasible), evaluated, msg, notes, feasible)


def to_plan(c: Candidate, p: Profile, b: Budgets):
    """The Plan for a candidate, with its predictions."""
    from splitlm.partition.plan import Plan, Predictions
    from splitlm.quantize.config import DEFAULT_GROUP, CodecConfig, WeightQuant

    if c.codec.kind == "tabq":
        codec = CodecConfig("tabq", error_budget=c.codec.error_budget, entropy=c.codec.entropy)  # the point as measured
    else:
        codec = CodecConfig(c.codec.kind if c.codec.kind in ("fp16", "fp32") else "fp16")
    return Plan(p.model_id, p.weights_hash, c.split,
                device_weights=WeightQuant(c.device_bits, DEFAULT_GROUP, p.quality.device_methods.get(c.device_bits, "rtn")),
                cloud_weights=WeightQuant(c.cloud_bits, DEFAULT_GROUP),
                kv_bits=c.kv_bits, lm_head_bits=b.lm_head_bits if c.split == p.num_layers else 16, codec=codec,
                max_seq_len=c.max_seq_len, prefill_chunk=b.prefill_chunk, split_moves=c.moves,
                speculate=b.tokens_per_round_trip is not None and c.split < p.num_layers,
                predictions=Predictions(c.memory_bytes, c.token_latency_ms, c.ttft_ms, b.prompt_tokens, c.bytes_per_token,
                                            c.perplexity, p.link.bandwidth_mbps))
