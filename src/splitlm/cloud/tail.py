"""The tail of an exported plan: decode activation frames, run layers [ℓ, L), sample.

Each session owns its KV cache and its random stream. A frame is parsed once (`TailRunner.parse`,
by the service or by `TailSession.submit`) and its layout travels with it to the decoder.
"""

from __future__ import annotations

import dataclasses
import logging
import types
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from splitlm.artifacts import read_folder
from splitlm.cloud.batcher import Batcher, Frame, TorchThread
from splitlm.errors import CodecError, ConfigError, ModelLoadError, MoveError, ResourceExhausted
from splitlm.model import names
from splitlm.model.llama import KVCache, Transformer
from splitlm.proto import splitlm_pb2 as pb
from splitlm.quantize import codec, kv_codec, kv_wire
from splitlm.quantize.apply import load_stage
from splitlm.sampling import Sampler, SamplingParams, top_logprobs

log = logging.getLogger(__name__)

TAIL_FILE = names.TAIL_FILE


def kernel_impl(impl: str, device: torch.device) -> str:
    """'triton' or 'reference' for `impl` on `device`. The kernels (and Triton) are imported only
    when they may run: on CUDA, or when 'triton' is asked for (the interpreter on a CPU)."""
    if impl == "reference" or (impl == "auto" and device.type != "cuda"):
        return "reference"
    from splitlm.kernels import dispatch

    return dispatch.choose(impl, device)  # also refuses an unknown name


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""The tail's compute types by name (`splitlm serve --dtype`)."""


def check_dtype(dtype: "torch.dtype | str", device: torch.device) -> torch.dtype:
    """`dtype` (a name of DTYPES or a torch dtype) for a tail on `device`, or ConfigError: float16 runs on CUDA only
    (a CPU has no fast float16 matmul; bfloat16 is its half type: twice float32's speed on CPUs with AVX512-BF16 or
    AMX)."""
    chosen = DTYPES.get(dtype) if isinstance(dtype, str) else dtype
    if chosen not in DTYPES.values():
        raise ConfigError(f"dtype {dtype!r}: the tail computes in one of {', '.join(DTYPES)}")
    if chosen == torch.float16 and device.type != "cuda":
        raise ConfigError(f"dtype float16 runs on CUDA only, and this tail runs on {device}: use bfloat16 or float32")
    if chosen == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"dtype bfloat16: {torch.cuda.get_device_name(device)} has no bfloat16 support; use float16 or float32")
    if chosen == torch.bfloat16 and device.type == "cpu" and not _cpu_has_bf16():
        log.warning("dtype bfloat16 on a CPU without AVX512-BF16 or AMX: its matmuls may run slower than float32's")
    return chosen


def _cpu_has_bf16() -> bool:
    """Whether this CPU has bfloat16 dot-product instructions (AVX512-BF16, AMX; Linux's /proc/cpuinfo flags). Where
    the flags cannot be read, True (no warning)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True
    return "avx512_bf16" in flags or "amx_bf16" in flags


ROW_FLOOR_MAX = 2
"""The most rows a lone row's matmuls are padded to. bfloat16 on a CPU (oneDNN) rounds a one-row matmul
otherwise than one of 2 or more rows, which agree (`bench/tail_rows.py`): two rows cost a decode step little.
float32 (MKL) rounds calls of 1, of 2 to 3 and of 4 or more rows three ways, and four rows would cost a lone row's
decode step much more (same bench): its floor stays at 1."""

ROWS_TRIED = (1, 2, 3, 4)
"""`row_floor` runs a matmul's rows in calls of these many rows, and against one call of all of them."""

VALUES_TRIED = 40_000
"""Output values each matmul kind is compared on (a rounding difference shows on a few values in ten thousand)."""


def _linears(stage: torch.nn.Module) -> list[torch.nn.Module]:
    """The matmul modules of a stage (nn.Linear, QuantLinear, KernelLinear: leaves with in_ and out_features)."""
    return [m for m in stage.modules() if hasattr(m, "in_features") and hasattr(m, "out_features") and not any(m.children())]


@torch.inference_mode()
def row_floor(stage: torch.nn.Module, dtype: torch.dtype) -> int:
    """The fewest rows, up to ROW_FLOOR_MAX, from which every matmul of `stage` gives each row the same numbers in
    calls of ROWS_TRIED rows (those at or above it) as in one call of all of them: 12 to 96 rows of random input,
    enough for VALUES_TRIED outputs, one module per kind and shape (a kernel is chosen by shape and dtype); 1 when
    none does. Calls of more rows (batches, prefill chunks) are not tried."""
    kinds = {}
    for m in _linears(stage):
        kinds.setdefault((type(m), m.in_features, m.out_features, getattr(m, "bits", None)), m)
    device, gen = next(stage.parameters()).device, torch.Generator().manual_seed(0)
    agree = {n: True for n in ROWS_TRIED}
    for m in kinds.values():
        rows = min(96, 12 * -(-VALUES_TRIED // (12 * m.out_features)))  # a multiple of 12: whole calls of 1 to 4 rows
        x = torch.randn(rows, m.in_features, generator=gen).to(device, dtype)
        whole = m(x)
        for n in ROWS_TRIED:
            agree[n] = agree[n] and torch.equal(torch.cat([m(x[i:i + n]) for i in range(0, rows, n)]), whole)
    for floor in range(1, ROW_FLOOR_MAX + 1):
        if all(agree[n] for n in ROWS_TRIED if n >= floor):
            return floor
    return 1


FASTER_ROWS = {2: 4, 3: 4}
"""float32 on a CPU with MKL: a matmul of 2 or 3 rows costs about 2 or 3 times one of a row, and one of 4 rows
less than one of 3 (`bench/tail_rows.py`; SmolLM2's LM head: 21 and 32 ms against 16 ms), so such calls (a
speculative step's 2 or 3 rows, a batch of 2 or 3 decode steps) run padded to 4 rows."""


def row_padding(stage: torch.nn.Module, dtype: torch.dtype) -> dict[int, int]:
    """Rows n -> the rows a call of n runs padded to, for the matmuls of `stage`: below `row_floor`, the floor (so that
    a row rounds alike alone and among others); in float32 on a CPU with MKL, FASTER_ROWS (speed)."""
    floor = row_floor(stage, dtype)
    pad = {n: floor for n in range(1, floor)}
    if dtype == torch.float32 and next(stage.parameters()).device.type == "cpu" and torch.backends.mkl.is_available():
        pad.update({n: rows for n, rows in FASTER_ROWS.items() if n >= floor})
    return pad


def _padded_forward(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A matmul module's forward with a call of n rows run as `self.pad_rows[n]` rows (n when absent): zero rows added,
    their outputs dropped (bound to the module by `_pad_rows`, so that a deep copy binds to the copy)."""
    n = x.numel() // x.shape[-1]
    rows = self.pad_rows.get(n, n)
    if rows <= n:
        return type(self).forward(self, x)
    flat = x.reshape(n, x.shape[-1])
    out = type(self).forward(self, torch.cat([flat, flat.new_zeros(rows - n, x.shape[-1])]))
    return out[:n].reshape(*x.shape[:-1], out.shape[-1])


def _pad_rows(module: torch.nn.Module, pad: dict[int, int]) -> None:
    """Run `module` (a matmul) with calls of n rows padded to pad[n] rows (`_padded_forward`)."""
    module.pad_rows = dict(pad)
    module.forward = types.MethodType(_padded_forward, module)


@torch.inference_mode()
def rows_alike(stage: Transformer, dtype: torch.dtype) -> bool:
    """Whether `stage` gives 8 new positions the same logits bit for bit in one call as in calls of 1, 1, 2 and 4
    rows (after the same 4 positions; random hidden states): one session's decode and speculative steps. Batched
    steps of several sessions (masked, right-padded) and long contexts are not tried."""
    device = next(stage.parameters()).device
    x = torch.randn(1, 12, stage.spec.hidden_size, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    together, apart = KVCache(), KVCache()
    stage(x[:, :4], cache=together, last_only=True)
    stage(x[:, :4], cache=apart, last_only=True)
    whole = stage(x[:, 4:], cache=together)
    return torch.equal(whole, torch.cat([stage(x[:, a:b], cache=apart) for a, b in ((4, 5), (5, 6), (6, 8), (8, 12))], 1))


def decode_frames(frames: list[Frame], impl: str, device: torch.device, bases: dict | None = None) -> list[torch.Tensor]:
    """Parsed frames -> their (T_i, d) float32 hidden states on `device`, decoded as one batch: by
    the codec's torch decoder ('reference') or the Triton one ('triton'); ans frames against `bases`
    (by their layer), on the CPU (the ANS coder). Nothing is parsed again."""
    data, layouts = [f.data for f in frames], [f.layout for f in frames]
    if impl == "reference" or any(lay.kind == "ans" for lay in layouts):
        return [x.to(device) for x in codec.decode_many(data, "torch", layouts, bases=bases)]
    from splitlm.kernels import frame_decode

    return frame_decode.decode_frames(data, device, impl, layouts=layouts)


class TailRunner:
    """The tail stage of DIR/cloud, shared by all sessions."""

    def __init__(self, cloud_dir: str | Path, dtype: "torch.dtype | str" = torch.float32, device: str = "auto",
                 kernels: str = "auto", warm_up: bool = True, verify: bool = False) -> None:
        """dtype: what the tail computes in (`check_dtype`; float32 by default, the reference numbers).
        device: 'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:N'. kernels: 'auto' (Triton on
        CUDA, torch references elsewhere), 'triton' or 'reference' (kernels.dispatch). warm_up: run
        a throwaway prompt and step now, so that the first session does not pay for lazy
        initialisation (oneDNN primitives, CUDA context, Triton compiles: ~0.5 s for SmolLM2 on CPU). verify:
        check the sha256 of the folder's files against its manifest (their sizes are always checked)."""
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            self.device = torch.device(device)
        except RuntimeError as exc:
            raise ConfigError(f"device {device!r}: {exc}") from None
        self.dtype = check_dtype(dtype, self.device)
        """What the tail computes in: its float parameters, the decoded frames, its K/V (weights dequantize to it)."""
        self.dir, self.plan, self.spec = read_folder(cloud_dir, TAIL_FILE, verify=verify)
        self.kernels = kernel_impl(kernels, self.device)
        self.bases = {}
        """The entropy 'ans' codec's calibrated basis at each split the plan allows ({} for other codecs)."""
        if codec.frame_kind(self.plan.codec) == "ans":
            from splitlm.quantize import ans

            self.bases = ans.load_split_bases(self.dir, self.plan.splits())
        self.kv_energies = kv_codec.energies_for(self.dir, self.plan, self.spec.num_kv_heads, self.spec.head_dim)
        """The query energies the K/V codec steps keys by, per movable layer ({} unless moves are coded)."""
        # every torch op of the tail runs on this one thread (the batcher's): a second thread's
        # OpenMP pool makes GNU OpenMP stop spinning when threads outnumber cores (~40 % slower)
        self._worker = TorchThread("splitlm-tail")
        self.stage: Transformer = self._worker.submit(self._build, self.dtype).result()
        log.info("tail [%d, %d) on %s in %s, kernels %s (%d quantized Linears on kernels)", self.stage.start,
                 self.spec.num_layers, self.device, str(self.dtype).removeprefix("torch."), self.kernels, self.kernel_linears)
        self.batcher = Batcher(self.stage, worker=self._worker, chunk=self.plan.prefill_chunk, decode=self._decode)
        """Runs every session's steps from now on (it occupies the torch thread)."""
        if warm_up:
            self.warm_up()

    def warm_up(self, prompt: int = 16) -> None:
        """A throwaway session: one `prompt`-position frame, then one decode step."""
        rng = np.random.default_rng(0)
        session = self.new_session()
        for rows in (max(1, min(prompt, self.plan.max_seq_len - 1)), 1):
            x = rng.standard_normal((rows, self.spec.hidden_size), dtype=np.float32)
            session.next_token(codec.encode(x, self.plan.codec, "numpy", self.bases.get(self.plan.split_layer)), rows)
        session.close()

    def parse(self, frame: bytes) -> codec.FrameLayout:
        """The frame's layout, checked against this tail: the plan's codec and the model's hidden size
        (from the header, before the rest is read), at most max_seq_len rows. CodecError otherwise."""
        return codec.parse_frame(frame, self.plan.max_seq_len, codec.frame_kind(self.plan.codec), self.spec.hidden_size)

    def _decode(self, frames: list[Frame]) -> list[torch.Tensor]:
        """The batcher's frame decoder (on its thread), in the tail's dtype."""
        return [x.to(self.dtype) for x in decode_frames(frames, self.kernels, self.device, self.bases)]

    def _build(self, dtype: torch.dtype) -> Transformer:
        stage = load_stage(self.spec, self.dir / TAIL_FILE, dtype)
        if stage.start != self.plan.cloud_start:
            raise ModelLoadError(f"{self.dir}: tail starts at layer {stage.start}, the plan's cloud runs from {self.plan.cloud_start}")
        self.kernel_linears = 0
        if self.kernels == "triton":
            from splitlm.kernels import dispatch

            self.kernel_linears = dispatch.apply_kernels(stage, "triton")
        stage = stage.to(self.device)
        self.row_padding = row_padding(stage, dtype)
        """Rows n -> the rows the tail's matmuls run a call of n as (`row_padding`)."""
        if self.row_padding:
            for m in _linears(stage):
                _pad_rows(m, self.row_padding)
        self.rows_alike = rows_alike(stage, dtype)
        """Whether the tail gives a row the same logits, bit for bit, alone as in a call of several rows: then a
        speculative step's tokens are those of decoding one at a time, by construction."""
        padded = ", ".join(f"{n} as {rows}" for n, rows in self.row_padding.items()) or "none"
        if self.rows_alike:
            log.info("tail rows: a row's logits are the same alone and among others (rows padded: %s)", padded)
        else:
            log.info("tail rows: a row alone rounds otherwise than among others (%s here; rows padded: %s): speculative output "
                     "can part from one-at-a-time decoding where two tokens tie within that rounding",
                     str(dtype).removeprefix("torch."), padded)
        return stage

    def limit(self, max_batch: int, kv_budget: int | None) -> None:
        """Sessions batched together at most, and KV bytes all sessions together may hold."""
        self.batcher.max_batch, self.batcher.kv_budget = max_batch, kv_budget

    def new_session(self, sampling: SamplingParams = SamplingParams(), logprobs: int = 0) -> "TailSession":
        return TailSession(self, sampling, logprobs)


@dataclass(frozen=True)
class TokenChoice:
    """The token the cloud picked for the next position, and its log-probabilities when asked for."""

    id: int
    logprob: float | None = None
    """log p(id) under the model's distribution (before temperature, top-k and top-p)."""
    top: tuple[tuple[int, float], ...] = ()
    """The most likely (id, logprob) pairs, best first."""
    accepted: int = 0
    """Speculation (`TailSession.submit_verify`): the drafts kept before `id`."""
    kept: tuple["TokenChoice", ...] = ()
    """Speculation with logprobs: the kept drafts' own choices (their logprob and top), in order."""


class TailSession:
    """One generation on the cloud: its KV cache of layers [split, L), its sampler, what it returns."""

    def __init__(self, runner: TailRunner, sampling: SamplingParams, logprobs: int = 0) -> None:
        self.runner = runner
        self.split = runner.plan.split_layer
        """The first layer this session runs: the plan's split, until a move (`move`)."""
        self.cache = KVCache()
        self.sampler = Sampler(sampling)
        self.position = 0
        """Positions submitted so far: where the token a frame asks for goes (it keys a seeded draw)."""
        self.logprobs = logprobs
        """Top log-probabilities returned with each token (0 = none)."""

    def _frame(self, frame: bytes, layout: codec.FrameLayout | None) -> Frame:
        lay = layout if layout is not None else self.runner.parse(frame)
        if lay.ans is not None and lay.ans.layer != self.split:
            raise CodecError(f"the frame was coded at split layer {lay.ans.layer}, and this session runs from layer {self.split}")
        return Frame(frame, lay)

    def submit(self, frame: bytes, want_token: bool = True, layout: codec.FrameLayout | None = None) -> Future:
        """Decode one frame (T positions) and run the tail on the batcher: a future of the TokenChoice
        for the next position (None without want_token). `layout`: the frame as `TailRunner.parse`
        gave it (it is not parsed again); None parses it here. Either way the KV budget is checked
        before the frame is decoded."""
        hidden = self._frame(frame, layout)
        self.position += hidden.layout.rows
        position = self.position
        choose = (lambda logits: self._choose(logits, position)) if want_token else (lambda logits: None)
        return self.runner.batcher.submit(self.cache, hidden, True, choose, start=self.split)

    def _choose(self, logits: torch.Tensor, position: int) -> TokenChoice:
        """On the batcher thread: sample the last position's logits (1, V) for the token at `position`."""
        row = logits[-1].float().cpu().numpy()
        token = self.sampler(row, position)
        if not self.logprobs:
            return TokenChoice(token)
        logprob, top = top_logprobs(row, token, self.logprobs)
        return TokenChoice(token, logprob, top)

    def submit_verify(self, frame: bytes, drafts: list[int], layout: codec.FrameLayout | None = None) -> Future:
        """Speculation (DESIGN.md §11): `frame` holds k + 1 rows, the last accepted token's and those of the k tokens
        the device drafted (`drafts`). The tail runs them in one step and draws its own token for each position in
        turn, as decoding one at a time would (the same sampler, the same position keys); the drafts up to the
        first it does not draw are kept. A future of the TokenChoice after them, with `accepted` set; the KV of
        the rejected drafts is dropped (on the batcher thread, counted against the budget). With a draft that
        is a single token, drawing p and keeping the draft when the draw equals it is speculative sampling's
        rule (keep with probability p(draft), else draw from p without the draft): the output's distribution,
        and a seeded draw's every token, are those of decoding one token at a time."""
        hidden = self._frame(frame, layout)
        k = len(drafts)
        if hidden.layout.rows != k + 1:
            raise CodecError(f"a verify frame holds the last token's row and one per draft: {k + 1} rows for {k} drafts, "
                             f"got {hidden.layout.rows}")
        start = self.position
        self.position += k + 1

        def choose(logits: torch.Tensor) -> TokenChoice:
            kept = []
            for i in range(k + 1):
                choice = self._choose(logits[i:i + 1], start + i + 1)
                if i == k or choice.id != drafts[i]:
                    return dataclasses.replace(choice, accepted=i, kept=tuple(kept) if self.logprobs else ())
                kept.append(choice)
            raise AssertionError("unreachable")

        return self._then_crop(self.runner.batcher.submit(self.cache, hidden, False, choose, start=self.split),
                               lambda choice: start + 1 + choice.accepted)

    def replay_verified(self, frame: bytes, keep: int, layout: codec.FrameLayout | None = None) -> Future:
        """A replay of a verified frame: run its rows, keep the KV of the first `keep` (a future of None)."""
        hidden = self._frame(frame, layout)
        if not 1 <= keep <= hidden.layout.rows:
            raise CodecError(f"keep_rows {keep} is not within the frame's 1 to {hidden.layout.rows} rows")
        start = self.position
        self.position += hidden.layout.rows
        return self._then_crop(self.runner.batcher.submit(self.cache, hidden, True, lambda _: None, start=self.split),
                               lambda _: start + keep)

    def _then_crop(self, step: Future, length: Callable[[Any], int]) -> Future:
        """A future of `step`'s result once the cache is cropped to length(result) positions (on the batcher thread,
        between turns, so that the budget counts what the crop frees); the session's position follows."""
        out: Future = Future()

        def cropped(done: Future, result: Any) -> None:
            if done.exception() is not None:
                out.set_exception(done.exception())
            else:
                out.set_result(result)

        def ran(done: Future) -> None:
            if done.exception() is not None:
                out.set_exception(done.exception())
                return
            result = done.result()
            keep = length(result)
            self.position = keep
            self.runner.batcher.call(self.cache, lambda: self.cache.crop(keep)).add_done_callback(lambda d: cropped(d, result))

        step.add_done_callback(ran)
        return out

    def verify(self, frame: bytes, rows: int, drafts: list[int]) -> tuple[int, int]:
        """`RemoteSession.verify` in process: (drafts accepted, the token after them)."""
        if rows != len(drafts) + 1:
            raise CodecError(f"a verify frame of {rows} rows for {len(drafts)} drafts: it holds one row more than drafts")
        choice = self.submit_verify(frame, list(drafts)).result()
        return choice.accepted, choice.id

    def logits(self, frame: bytes, last_only: bool = False) -> torch.Tensor:
        """Decode one frame (T positions) and run the tail -> logits (T, V), or (1, V) with last_only
        (the LM head then runs on the last position only: a prompt's other logits are never sampled)."""
        hidden = self._frame(frame, None)
        self.position += hidden.layout.rows
        return self.runner.batcher.submit(self.cache, hidden, last_only, start=self.split).result().float()

    def next_token(self, frame: bytes, rows: int | None = None) -> int:
        """The token for the position after `frame`'s. `rows`: the positions the caller put in the
        frame (as `RemoteSession.next_token` takes them); a frame that holds another count is refused."""
        return self.send(frame, rows, True)

    def send(self, frame: bytes, rows: int | None, want_token: bool = True) -> int | None:
        """`RemoteSession.send` in process: run the frame of `rows` positions (None: as many as it
        holds); with want_token, the token for the position after them. Each frame runs before
        the next is taken."""
        layout = self.runner.parse(frame)
        if rows is not None and rows != layout.rows:
            raise CodecError(f"frame holds {layout.rows} rows, the caller sent it as {rows}")
        choice = self.submit(frame, want_token, layout).result()
        return choice.id if want_token else None

    def check_move(self, new_split: int) -> range:
        """The layers whose K/V a move to `new_split` hands over: [new_split, split) for a shallower move (the
        device sends them), [split, new_split) for a deeper one (the cloud does). MoveError (OUT_OF_RANGE)
        for a split the plan does not allow or the cloud does not hold."""
        allowed = self.runner.plan.splits()
        if new_split == self.split or new_split not in allowed:
            raise MoveError(f"cannot move the split from {self.split} to {new_split}: the plan allows {allowed}"
                            + (f" (the server holds layers [{self.runner.stage.start}, {self.runner.spec.num_layers}))"
                               if new_split < self.runner.stage.start else ""))
        return range(new_split, self.split) if new_split < self.split else range(self.split, new_split)

    def move(self, new_split: int, kv: "kv_wire.Assembler | None" = None, message_bytes: int = 1 << 20) -> Future:
        """Move this session's split, on the batcher thread between steps. Shallower: `kv` holds the chunks of
        layers [new_split, split) (checked as they arrived); they are assembled and installed into the
        cache, their bytes checked against the KV budget first. Under MoveCodec "recompute" it holds the hidden
        states entering new_split instead, and the tail computes those layers' K/V from them, in prefill chunks
        but in one call: the other sessions' steps wait for it (0.6 s for 18 layers x 512 positions of SmolLM2 on
        a 2-core CPU). Deeper: a future of the K/V of layers
        [split, new_split) as batches of float32 LayerKV chunks of at most `message_bytes`, which leave the
        cache. Refusals: MoveError (a split not allowed), CodecError (bad K/V), ResourceExhausted (the
        budget, or memory); the session is unchanged then."""
        layers = self.check_move(new_split)
        cache, runner = self.cache, self.runner
        dtype = runner.dtype

        def shallower() -> None:
            done = []
            try:
                hidden = kv.hidden()  # a "recompute" move's rows; CodecError for anything missing
                if hidden is not None:
                    fresh = runner.stage.recompute_kv(torch.from_numpy(np.ascontiguousarray(hidden))[None].to(runner.device, dtype),
                                                      layers, runner.plan.prefill_chunk)

                    def take(i: int) -> tuple[torch.Tensor, torch.Tensor]:
                        return fresh.remove(i)
                else:
                    arrays = kv.result()  # float32 (Hkv, T, D) per layer; CodecError for anything missing or not finite

                    def take(i: int) -> tuple[torch.Tensor, torch.Tensor]:
                        return tuple(torch.from_numpy(np.ascontiguousarray(a))[None].to(runner.device, dtype) for a in arrays.pop(i))
                for i in layers:
                    cache.install(i, *take(i))
                    done.append(i)
            except BaseException as exc:
                for i in done:
                    cache.remove(i)
                if isinstance(exc, ValueError) and not isinstance(exc, CodecError):
                    raise CodecError(str(exc)) from None
                if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
                    raise ResourceExhausted(f"no memory for the K/V of layers {list(layers)}: {exc}") from None
                raise
            self.split = new_split

        def deeper() -> list[list[pb.LayerKV]]:
            missing = [i for i in layers if cache.read(i) is None and cache.length]
            if missing:
                raise MoveError(f"the session holds no K/V of layers {missing}")
            items = [c for i in layers if cache.read(i) is not None
                     for c in kv_wire.move_chunks(i, *(t[0].float().cpu().numpy() for t in cache.read(i)), runner.plan.move_codec,
                                                  runner.kv_energies, message_bytes)]
            for i in layers:
                if cache.read(i) is not None:
                    cache.remove(i)
            self.split = new_split
            return list(kv_wire.batches(items, message_bytes))

        if new_split < self.split:
            if kv is None:
                raise CodecError(f"a move shallower (to {new_split}) needs the K/V of layers {list(layers)}")
            spec = runner.spec
            grows = len(layers) * cache.length * spec.kv_bytes_per_token(1, 8 * dtype.itemsize)
            return runner.batcher.call(cache, shallower, int(grows))
        return runner.batcher.call(cache, deeper)

    def assembler(self, layers: range, max_bytes: int | None = None) -> kv_wire.Assembler:
        """What checks the chunks of a shallower move of `layers` to this session: K/V, or under the plan's move codec
        "recompute" the hidden states entering layers.start."""
        spec, plan = self.runner.spec, self.runner.plan
        return kv_wire.Assembler(layers, self.cache.length, spec.num_kv_heads, spec.head_dim, max_bytes=max_bytes,
                                 hidden_size=spec.hidden_size if plan.move_codec.coder == "recompute" else None)

    def move_split(self, new_split: int, layers: Iterable[pb.LayerKV]) -> list[pb.LayerKV]:
        """`RemoteSession.move_split` in process: the same chunks, checked by the same Assembler."""
        assembler = None
        if new_split < self.split:
            assembler = self.assembler(self.check_move(new_split))
            for item in layers:
                assembler.add(item)
        elif any(True for _ in layers):
            raise CodecError(f"a move deeper (to {new_split}) carries no KV: the cloud sends it")
        moved = self.move(new_split, assembler).result()
        return [c for batch in moved or [] for c in batch]

    def close(self) -> None:
        """Free the cache (the batcher stops counting it and drops work still queued for it)."""
        self.runner.batcher.release(self.cache)
