"""Continuous batching of the tail: one thread runs the model for every session.

Each turn takes every pending decode step (one position per session) as one batched
forward — sessions of different lengths share it through right-padded K/V and a mask —,
the pending speculative steps (a few positions per session, all their logits) as another, their
rows right-padded too, and one prefill chunk of at most `chunk` positions, so a long prompt,
however the client framed it, interleaves with other sessions' decoding and its memory is
bounded per chunk.

The activation frames that arrive in one turn are decoded together, by one call of the
batcher's frame decoder (`FrameDecoder`); a frame that fails to decode fails its own session only.

The batcher thread also keeps the KV byte count of every cache it runs, so the budget
is checked without walking other sessions' caches from other threads.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch

from splitlm.errors import ResourceExhausted
from splitlm.model.llama import StepCache, Transformer
from splitlm.quantize.codec import FrameLayout

log = logging.getLogger(__name__)


class Cache(StepCache, Protocol):
    """What the batcher needs of a session's cache (a KVCache): what a stage forward reads and
    writes (several caches seen as one batch are a Cache too), and the bytes it holds."""

    def nbytes(self) -> int: ...


@dataclass(frozen=True)
class Frame:
    """An activation frame as the service parsed and checked it: decoded on the batcher thread,
    together with the other frames of its turn."""

    data: bytes
    layout: FrameLayout


FrameDecoder = Callable[[list[Frame]], list[torch.Tensor]]
"""Frames -> their (T_i, d) float32 hidden states, in one batched call."""


@dataclass
class _Work:
    cache: Cache
    hidden: torch.Tensor | Frame | Callable[[], torch.Tensor]
    """(T, d) positions to run for this session: given, as a frame the batcher decodes, or made by a
    function on the batcher thread."""
    last_only: bool = False
    """Only the last position's logits are wanted."""
    finish: Callable[[torch.Tensor], Any] | None = None
    """Runs on the batcher thread on the logits; its result is the future's (None: the logits are)."""
    rows: int | None = None
    """T, when known before `hidden` is made (a frame's layout): the KV budget is checked before any decoding."""
    start: int | None = None
    """The first layer to run (a session whose split moved); None: the stage's first."""
    future: Future = field(default_factory=Future)
    done_rows: int = 0
    """Positions of `hidden` already run (a prefill runs in chunks)."""
    outputs: list = field(default_factory=list)
    reserved: int = 0
    """KV bytes reserved for the positions not yet run."""


@dataclass
class _Release:
    cache: Cache


@dataclass
class _Call:
    """A function to run on the batcher thread between turns, on a session's cache (a split move)."""

    cache: Cache
    fn: Callable[[], Any]
    grows: int = 0
    """KV bytes fn will add to the cache at most: checked against the budget before it runs."""
    future: Future = field(default_factory=Future)


def _resolve(future: Future, result: Any = None, exc: BaseException | None = None) -> None:
    """Complete a future that its waiter may have cancelled meanwhile."""
    try:
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass


class TorchThread:
    """One daemon thread that runs submitted calls in order: the tail's only torch thread."""

    def __init__(self, name: str) -> None:
        self._calls: queue.Queue = queue.Queue()
        threading.Thread(target=self._loop, name=name, daemon=True).start()

    def submit(self, fn: Callable, *args) -> Future:
        future: Future = Future()
        self._calls.put((future, fn, args))
        return future

    def _loop(self) -> None:
        while True:
            future, fn, args = self._calls.get()
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                future.set_exception(exc)


VERIFY_ROWS = 16
"""The most rows a speculative step (a verified step's k + 1; draft.DraftLength caps k at 8 by default) may have to share
a batched forward with other sessions' speculative steps; a longer one runs alone in its turn."""


class _BatchedCaches:
    """The K/V of several sessions seen as one batch: right-padded to the longest on read,
    each session's new K/V (its own `rows` of the step's, the others are padding) appended back to its own cache."""

    def __init__(self, caches: list[Cache], rows: list[int]) -> None:
        self.caches, self.rows = caches, rows
        self.length = max(c.length for c in caches)

    def read(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.length == 0:
            return None
        ks, vs = [], []
        for c in self.caches:
            k, v = c.read(layer)  # (1, Hkv, L_b, D)
            pad = self.length - k.shape[2]
            ks.append(torch.nn.functional.pad(k, (0, 0, 0, pad)))
            vs.append(torch.nn.functional.pad(v, (0, 0, 0, pad)))
        return torch.cat(ks), torch.cat(vs)  # (B, Hkv, S, D)

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        for b, (c, n) in enumerate(zip(self.caches, self.rows)):
            c.append(layer, k[b:b + 1, :, :n], v[b:b + 1, :, :n])

    def crop(self, length: int) -> None:
        """Take back a failed step: each cache returns to its own committed length."""
        for c in self.caches:
            c.crop(c.length)

    def nbytes(self) -> int:
        return sum(c.nbytes() for c in self.caches)


class Batcher:
    """Owns the tail stage; `submit(cache, hidden)` returns a future of that session's logits (T, V)."""

    def __init__(self, stage: Transformer, max_batch: int = 64, worker: TorchThread | None = None,
                 chunk: int = 256, kv_budget: int | None = None, decode: FrameDecoder | None = None,
                 gather_s: float = 0.002) -> None:
        """worker: the torch thread the loop then occupies (the thread that built the stage, so one
        OpenMP pool serves every torch op); None starts a thread of its own. chunk: positions per
        prefill turn. kv_budget: KV bytes all caches together may hold (None = unbounded). decode:
        decodes the frames submitted as `Frame`s (None: only tensors and functions are submitted).
        gather_s: how long a turn with a decode step ready waits for the next step of the other
        sessions that have run before (their clients answer a token within about a millisecond of
        each other); each arrival waits again, up to 10 gather_s in all. 0 runs whatever has arrived."""
        self.stage, self.max_batch, self.chunk, self.kv_budget = stage, max_batch, chunk, kv_budget
        self.gather_s = gather_s
        self._active: dict[int, Cache] = {}
        """The caches that have run and not been released: the sessions a turn may wait for."""
        self.decode = decode
        dtype = next((p.dtype for p in stage.parameters() if p.is_floating_point()), torch.float32)
        self.kv_bytes_per_layer_position = stage.spec.kv_bytes_per_token(1, 8 * dtype.itemsize)
        """Estimate used to reserve a frame's KV before it runs, per layer it runs (the exact bytes are counted after)."""
        self.kv_bytes = 0
        """KV bytes held by the caches this batcher ran and has not released (updated on its thread)."""
        self.reserved = 0
        """KV bytes set aside for work admitted but not yet run (updated on its thread)."""
        self._inbox: queue.Queue[_Work | _Release | None] = queue.Queue()
        self._done: Future | None = None
        self._thread = None if worker else threading.Thread(target=self._loop, name="splitlm-batcher", daemon=True)
        self.batches = 0
        """Batched forwards of decode or speculative steps run so far (for tests and metrics)."""
        self.batched_steps = 0
        """Steps served by those forwards."""
        self.frame_decodes = 0
        """Calls of `decode` so far (one per turn that brought frames, unless a frame failed)."""
        if self._thread is not None:
            self._thread.start()
        else:
            self._done = worker.submit(self._loop)

    def submit(self, cache: Cache, hidden: torch.Tensor | Frame | Callable[[], torch.Tensor], last_only: bool = False,
               finish: Callable[[torch.Tensor], Any] | None = None, rows: int | None = None, start: int | None = None) -> Future:
        """Run (T, d) hidden states through the stage for this cache. `hidden` may be a Frame, decoded
        with the other frames of its turn, or a function that makes them: either runs on the batcher's
        thread, so every torch op of the service runs on one thread (two threads' OpenMP pools
        spinning on few cores cost ~40%). The future holds `finish(logits)`, or the logits. A frame
        that would pass the KV budget fails with ResourceExhausted before it is decoded. start: the
        first layer to run (the session's split, when it moved deeper than the stage's first)."""
        if isinstance(hidden, Frame):
            if self.decode is None:
                raise ValueError("this batcher has no frame decoder: submit tensors")
            rows = hidden.layout.rows
        work = _Work(cache, hidden, last_only, finish, rows, start)
        self._inbox.put(work)
        return work.future

    def call(self, cache: Cache, fn: Callable[[], Any], grows: int = 0) -> Future:
        """Run fn() on the batcher thread, between turns (it may change `cache`: a split move installs or
        removes layers). `grows`: the KV bytes fn adds at most, refused with ResourceExhausted before fn
        runs when they would pass the budget; what the cache gains or loses is counted after. The
        caller submits no work for `cache` until the future is done (the service waits for each step)."""
        item = _Call(cache, fn, grows)
        self._inbox.put(item)
        return item.future

    def run(self, cache: Cache, hidden: torch.Tensor | Frame | Callable[[], torch.Tensor], last_only: bool = False) -> torch.Tensor:
        """`submit` and wait."""
        return self.submit(cache, hidden, last_only).result()

    def release(self, cache: Cache) -> None:
        """The session of `cache` ended: drop its pending work and stop counting its bytes."""
        self._inbox.put(_Release(cache))

    def close(self) -> None:
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join(timeout=5)
        elif self._done is not None:
            self._done.result(timeout=5)

    # -- the loop (batcher thread) -----------------------------------------
    def _loop(self) -> None:
        prefills: deque[_Work] = deque()
        decodes: list[_Work] = []
        while True:
            block = not prefills and not decodes
            arrived: list[_Work] = []
            deadline = first = None
            try:
                while True:
                    if block:
                        item = self._inbox.get()
                    else:
                        wait = 0.0 if deadline is None else deadline - time.monotonic()
                        item = self._inbox.get(timeout=wait) if wait > 0 else self._inbox.get_nowait()
                    block = False
                    if item is None:
                        return
                    if isinstance(item, _Call):
                        self._call(item)
                    elif isinstance(item, _Release):
                        for w in (*prefills, *decodes, *arrived):
                            if w.cache is item.cache:
                                self._unreserve(w)
                        prefills = deque(w for w in prefills if w.cache is not item.cache)
                        decodes = [w for w in decodes if w.cache is not item.cache]
                        arrived = [w for w in arrived if w.cache is not item.cache]
                        self.kv_bytes -= item.cache.nbytes()
                        self._active.pop(id(item.cache), None)
                    elif self._admit(item):
                        arrived.append(item)
                    if not self._awaited(prefills, decodes, arrived):
                        deadline = None
                    else:  # each arrival extends the wait by gather_s, up to 10 gather_s in all
                        now = time.monotonic()
                        first = now if deadline is None else first
                        deadline = min(first + 10 * self.gather_s, now + self.gather_s)
            except queue.Empty:
                pass
            for w in self._make_hidden(arrived):
                if w.cache.length > 0 and (w.hidden.shape[0] == 1 or (not w.last_only and w.hidden.shape[0] <= self.chunk)):
                    decodes.append(w)  # a decode step, or a speculative step's few rows (all logits wanted): this turn
                else:
                    prefills.append(w)
            if decodes:
                batch, decodes = decodes[: self.max_batch], decodes[self.max_batch:]
                for w in batch:
                    if w.future.cancelled():  # its waiter went away: give its KV reservation back
                        self._unreserve(w)
                self._decode([w for w in batch if not w.future.cancelled()])
            while prefills and prefills[0].future.cancelled():
                self._unreserve(prefills.popleft())
            if prefills and self._chunk(prefills[0]):
                prefills.popleft()

    @torch.inference_mode()
    def _call(self, item: _Call) -> None:
        if not item.future.set_running_or_notify_cancel():  # its waiter went away
            return
        if item.grows > 0 and self.kv_budget is not None and self.kv_bytes + self.reserved + item.grows > self.kv_budget:
            item.future.set_exception(ResourceExhausted(f"KV cache would grow to {self.kv_bytes + self.reserved + item.grows} bytes, "
                                                        f"the server's budget is {self.kv_budget}"))
            return
        before = item.cache.nbytes()
        try:
            result = item.fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            self.kv_bytes += item.cache.nbytes() - before  # fn takes back what it changed; count whatever it left
            item.future.set_exception(exc)
            return
        self.kv_bytes += item.cache.nbytes() - before
        if id(item.cache) in self._active or item.cache.nbytes():
            self._active[id(item.cache)] = item.cache
        item.future.set_result(result)

    def _awaited(self, prefills: deque[_Work], decodes: list[_Work], arrived: list[_Work]) -> bool:
        """Whether this turn should wait (up to gather_s) for more steps: a decode or speculative step is
        ready to batch and a session that has run before has sent nothing yet."""
        def batchable(w: _Work) -> bool:
            if w.cache.length == 0 or (w.rows is None and callable(w.hidden)):  # a prefill, or rows not known yet
                return False
            rows = w.rows if w.rows is not None else w.hidden.shape[0]
            return rows == 1 or (not w.last_only and rows <= VERIFY_ROWS)

        if self.gather_s <= 0 or not any(batchable(w) for w in (*decodes, *arrived)):
            return False
        pending = {id(w.cache) for w in (*prefills, *decodes, *arrived)}
        return any(key not in pending for key in self._active)

    def _admit(self, work: _Work) -> bool:
        """Reserve the work's KV when its rows are known; False (future failed) when it cannot run."""
        if work.future.cancelled():
            return False
        if work.rows is None and isinstance(work.hidden, torch.Tensor):
            work.rows = work.hidden.shape[0]
        try:
            if work.rows is not None:
                self._reserve(work, work.rows)
            return True
        except Exception as exc:  # noqa: BLE001 - the session's stream reports it
            _resolve(work.future, exc=exc)
            return False

    @torch.inference_mode()
    def _make_hidden(self, works: list[_Work]) -> list[_Work]:
        """Give every work of a turn its hidden states: its frames decoded together in one call, its
        functions run. Returns the works that can run; the others' futures hold their errors."""
        live = []
        for w in works:
            if w.future.cancelled():  # its waiter went away: give its KV reservation back
                self._unreserve(w)
            else:
                live.append(w)
        framed = [w for w in live if isinstance(w.hidden, Frame)]
        failed = set()
        for w, h in zip(framed, self._decode_frames(framed) if framed else ()):
            if isinstance(h, Exception):
                self._fail(w, h)
                failed.add(id(w))
            else:
                w.hidden = h
        ready = []
        for w in live:
            if id(w) in failed:
                continue
            try:
                if callable(w.hidden):
                    w.hidden = w.hidden()
                if w.rows is None:
                    self._reserve(w, w.hidden.shape[0])
                elif w.hidden.shape[0] != w.rows:
                    raise RuntimeError(f"work announced {w.rows} rows and made {w.hidden.shape[0]}")
                ready.append(w)
            except Exception as exc:  # noqa: BLE001 - the session's stream reports it
                self._fail(w, exc)
        return ready

    def _fail(self, work: _Work, exc: BaseException) -> None:
        self._unreserve(work)
        _resolve(work.future, exc=exc)

    def _decode_frames(self, works: list[_Work]) -> list[torch.Tensor | Exception]:
        """The hidden states of the works' frames, by one decoder call; when that call fails, each
        frame alone, so that a frame that does not decode is its own session's error only."""
        self.frame_decodes += 1
        try:
            return list(self.decode([w.hidden for w in works]))
        except Exception as exc:  # noqa: BLE001 - the session's stream reports it
            if len(works) == 1:
                return [exc]
            log.info("decoding %d frames together failed (%s); decoding them one by one", len(works), exc)
        out: list[torch.Tensor | Exception] = []
        for w in works:
            self.frame_decodes += 1
            try:
                out.append(self.decode([w.hidden])[0])
            except Exception as exc:  # noqa: BLE001 - the session's stream reports it
                out.append(exc)
        return out

    def _per_position(self, work: _Work) -> float:
        return self.kv_bytes_per_layer_position * (self.stage.stop - (self.stage.start if work.start is None else work.start))

    def _reserve(self, work: _Work, rows: int) -> None:
        need = int(rows * self._per_position(work))
        if self.kv_budget is not None and self.kv_bytes + self.reserved + need > self.kv_budget:
            raise ResourceExhausted(f"KV cache would grow to {self.kv_bytes + self.reserved + need} bytes, the server's "
                                    f"budget is {self.kv_budget}")
        work.reserved = need
        self.reserved += need

    def _unreserve(self, work: _Work) -> None:
        self.reserved -= work.reserved
        work.reserved = 0

    def _ran(self, work: _Work, rows: int, bytes_before: int) -> None:
        """Account for `rows` positions of `work` that ran."""
        share = work.reserved if work.done_rows + rows >= work.hidden.shape[0] else int(rows * self._per_position(work))
        self.reserved -= share
        work.reserved -= share
        work.done_rows += rows
        self.kv_bytes += work.cache.nbytes() - bytes_before
        self._active[id(work.cache)] = work.cache

    def _complete(self, work: _Work, logits: torch.Tensor) -> None:
        try:
            _resolve(work.future, work.finish(logits) if work.finish is not None else logits)
        except Exception as exc:  # noqa: BLE001 - the session's stream reports it
            _resolve(work.future, exc=exc)

    @torch.inference_mode()
    def _chunk(self, work: _Work) -> bool:
        """Run the next prefill chunk of `work`; True when the work is finished (done or failed)."""
        start = work.done_rows
        stop = min(start + self.chunk, work.hidden.shape[0])
        last = stop == work.hidden.shape[0]
        before = work.cache.nbytes()
        try:
            out = self.stage(work.hidden[None, start:stop], cache=work.cache, last_only=work.last_only,
                             start=work.start)[0]
        except Exception as exc:  # noqa: BLE001 - the session's stream reports it
            self._unreserve(work)
            _resolve(work.future, exc=exc)
            return True
        self._ran(work, stop - start, before)
        if not work.last_only:
            work.outputs.append(out)
        if not last:
            return False
        self._complete(work, out if work.last_only else torch.cat(work.outputs))
        return True

    def _decode(self, batch: list[_Work]) -> None:
        """One batched forward per start layer among `batch`'s decode steps, another for its speculative steps of up
        to VERIFY_ROWS rows (apart: a decode step padded to a verified step's rows would cost as much as it); a longer
        speculative step runs alone."""
        groups: dict[tuple[int | None, bool], list[_Work]] = {}
        for w in batch:
            rows = w.hidden.shape[0]
            if rows > VERIFY_ROWS:
                self._chunk(w)
            else:
                groups.setdefault((w.start, rows == 1), []).append(w)
        for group in groups.values():
            self._decode_group(group)

    @torch.inference_mode()
    def _decode_group(self, batch: list[_Work]) -> None:
        """One forward for the steps of several sessions: each session's rows (one for a decode step, k + 1 for a
        verified one) right-padded to the most, its K/V right-padded to the longest, a mask keeping each row to its
        own session's positions and the rows before it; the padding's K/V are not kept and its logits not read."""
        if len(batch) == 1:
            self._chunk(batch[0])
            return
        if not batch:
            return
        caches = [w.cache for w in batch]
        rows = [w.hidden.shape[0] for w in batch]
        before = [c.nbytes() for c in caches]
        try:
            view = _BatchedCaches(caches, rows)
            dev = batch[0].hidden.device
            lengths = torch.tensor([c.length for c in caches], device=dev)
            s, t = view.length, max(rows)
            mask = torch.zeros(len(batch), 1, t, s + t, dtype=torch.bool, device=dev)  # (B, 1, T, S+T)
            mask[:, 0, :, :s] = (torch.arange(s, device=dev)[None, :] < lengths[:, None])[:, None, :]
            mask[:, 0, :, s:] = torch.ones(t, t, dtype=torch.bool, device=dev).tril()
            x = torch.stack([torch.nn.functional.pad(w.hidden, (0, 0, 0, t - n)) for w, n in zip(batch, rows)])  # (B, T, d)
            # a padding row repeats its session's last position: no position beyond the real ones (dynamic rotary)
            last = torch.tensor(rows, device=dev)[:, None] - 1
            positions = lengths[:, None] + torch.minimum(torch.arange(t, device=dev)[None, :], last)
            logits = self.stage(x, positions=positions, cache=view, mask=mask, start=batch[0].start)  # (B, T, V)
        except Exception:  # noqa: BLE001 - the forward took its K/V back: run one by one, each gets its own error
            log.exception("batched decode failed; running its %d steps one by one", len(batch))
            for w in batch:
                self._chunk(w)
            return
        for c, n in zip(caches, rows):
            c.length += n
        self.batches += 1
        self.batched_steps += len(batch)
        for b, (w, n) in enumerate(zip(batch, rows)):
            self._ran(w, n, before[b])
            self._complete(w, logits[b, n - 1:n] if w.last_only else logits[b, :n])
