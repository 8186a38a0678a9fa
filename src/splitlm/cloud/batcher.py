"""Continuous batching of the tail: one thread runs the model for every session.

Each turn takes every pending decode step (one position per session) as one batched
forward — sessions of different lengths share it through right-padded K/V and a mask —
and at most one prefill chunk, so long prompts interleave with other sessions' decoding.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import torch

from splitlm.model.llama import KVCache, Transformer

log = logging.getLogger(__name__)


@dataclass
class _Work:
    cache: KVCache
    hidden: torch.Tensor
    """(T, d) positions to run for this session."""
    last_only: bool = False
    """Only the last position's logits are wanted."""
    future: Future = field(default_factory=Future)


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


class _BatchedCaches:
    """The K/V of several sessions seen as one batch: right-padded to the longest on read,
    each session's new K/V appended back to its own cache."""

    def __init__(self, caches: list[KVCache]) -> None:
        self.caches = caches
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
        for b, c in enumerate(self.caches):
            c.append(layer, k[b:b + 1], v[b:b + 1])


class Batcher:
    """Owns the tail stage; `run(cache, hidden)` returns logits (T, V) for that session's positions."""

    def __init__(self, stage: Transformer, max_batch: int = 64, worker: TorchThread | None = None) -> None:
        """worker: the torch thread the loop then occupies (the thread that built the stage, so one
        OpenMP pool serves every torch op); None starts a thread of its own."""
        self.stage, self.max_batch = stage, max_batch
        self._inbox: queue.Queue[_Work | None] = queue.Queue()
        self._done: Future | None = None
        self._thread = None if worker else threading.Thread(target=self._loop, name="splitlm-batcher", daemon=True)
        self.batches = 0
        """Batched decode forwards run so far (for tests and metrics)."""
        self.batched_steps = 0
        """Decode steps served by those forwards."""
        if self._thread is not None:
            self._thread.start()
        else:
            self._done = worker.submit(self._loop)

    def run(self, cache: KVCache, hidden: torch.Tensor | Callable[[], torch.Tensor], last_only: bool = False) -> torch.Tensor:
        """Run (T, d) hidden states through the stage for this cache. `hidden` may be a function that
        makes them (the frame decode): it then runs on the batcher's thread, so every torch op of
        the service runs on one thread (two threads' OpenMP pools spinning on few cores cost ~40%)."""
        work = _Work(cache, hidden, last_only)
        self._inbox.put(work)
        return work.future.result()

    def close(self) -> None:
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join(timeout=5)
        elif self._done is not None:
            self._done.result(timeout=5)

    def _loop(self) -> None:
        prefills: deque[_Work] = deque()
        decodes: list[_Work] = []
        while True:
            block = not prefills and not decodes
            try:
                while True:
                    item = self._inbox.get(block=block)
                    block = False
                    if item is None:
                        return
                    if callable(item.hidden):
                        try:
                            with torch.inference_mode():
                                item.hidden = item.hidden()
                        except Exception as exc:  # noqa: BLE001 - the session's stream reports it
                            item.future.set_exception(exc)
                            continue
                    (decodes if item.hidden.shape[0] == 1 and item.cache.length > 0 else prefills).append(item)
            except queue.Empty:
                pass
            if decodes:
                batch, decodes = decodes[: self.max_batch], decodes[self.max_batch:]
                self._decode(batch)
            if prefills:
                self._single(prefills.popleft())

    @torch.inference_mode()
    def _single(self, work: _Work) -> None:
        try:
            work.future.set_result(self.stage(work.hidden[None], cache=work.cache, last_only=work.last_only)[0])
        except Exception as exc:  # noqa: BLE001 - the session's stream reports it
            work.future.set_exception(exc)

    @torch.inference_mode()
    def _decode(self, batch: list[_Work]) -> None:
        if len(batch) == 1:
            return self._single(batch[0])
        try:
            caches = [w.cache for w in batch]
            view = _BatchedCaches(caches)
            dev = batch[0].hidden.device
            lengths = torch.tensor([c.length for c in caches], device=dev)
            s = view.length
            mask = torch.zeros(len(batch), 1, 1, s + 1, dtype=torch.bool, device=dev)  # (B, 1, T=1, S+1)
            mask[:, 0, 0, :s] = torch.arange(s, device=dev)[None, :] < lengths[:, None]
            mask[:, 0, 0, s] = True
            x = torch.stack([w.hidden for w in batch])  # (B, 1, d)
            logits = self.stage(x, positions=lengths[:, None], cache=view, mask=mask)  # (B, 1, V)
            for c in caches:
                c.length += 1
            self.batches += 1
            self.batched_steps += len(batch)
        except Exception:  # noqa: BLE001 - fall back to one by one, each session gets its own error
            log.exception("batched decode failed; running its %d steps one by one", len(batch))
            for w in batch:
                self._single(w)
            return
        for b, w in enumerate(batch):
            w.future.set_result(logits[b])
