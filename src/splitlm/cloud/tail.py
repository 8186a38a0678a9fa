"""The tail of an exported plan: decode activation frames, run layers [ℓ, L), sample.

Each session owns its KV cache and its random stream.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from splitlm.artifacts import read_folder
from splitlm.cloud.batcher import Batcher, TorchThread
from splitlm.errors import CodecError, ConfigError, ModelLoadError
from splitlm.model import names
from splitlm.model.llama import KVCache, Transformer
from splitlm.quantize import codec
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


def decode_frame(frame: bytes, impl: str, device: torch.device, max_rows: int | None,
                 layout: codec.FrameLayout | None) -> torch.Tensor:
    """One frame -> (T, d) float32 on `device`, by the codec's torch decoder or the Triton one."""
    if impl == "reference":
        return codec.decode(frame, "torch", layout, max_rows).to(device)
    from splitlm.kernels import dispatch

    return dispatch.decode_frame(frame, impl, device, max_rows, layout)


class TailRunner:
    """The tail stage of DIR/cloud, shared by all sessions."""

    def __init__(self, cloud_dir: str | Path, dtype: torch.dtype = torch.float32, device: str = "auto",
                 kernels: str = "auto", warm_up: bool = True, verify: bool = False) -> None:
        """device: 'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:N'. kernels: 'auto' (Triton on
        CUDA, torch references elsewhere), 'triton' or 'reference' (kernels.dispatch). warm_up: run
        a throwaway prompt and step now, so that the first session does not pay for lazy
        initialisation (oneDNN primitives, CUDA context, Triton compiles: ~0.5 s for SmolLM2 on CPU). verify:
        check the sha256 of the folder's files against its manifest (their sizes are always checked)."""
        self.dir, self.plan, self.spec = read_folder(cloud_dir, TAIL_FILE, verify=verify)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            self.device = torch.device(device)
        except RuntimeError as exc:
            raise ConfigError(f"device {device!r}: {exc}") from None
        self.kernels = kernel_impl(kernels, self.device)
        # every torch op of the tail runs on this one thread (the batcher's): a second thread's
        # OpenMP pool makes GNU OpenMP stop spinning when threads outnumber cores (~40 % slower)
        self._worker = TorchThread("splitlm-tail")
        self.stage: Transformer = self._worker.submit(self._build, dtype).result()
        log.info("tail [%d, %d) on %s, kernels %s (%d quantized Linears on kernels)", self.stage.start,
                 self.spec.num_layers, self.device, self.kernels, self.kernel_linears)
        self.batcher = Batcher(self.stage, worker=self._worker, chunk=self.plan.prefill_chunk)
        """Runs every session's steps from now on (it occupies the torch thread)."""
        if warm_up:
            self.warm_up()

    def warm_up(self, prompt: int = 16) -> None:
        """A throwaway session: one `prompt`-position frame, then one decode step."""
        rng = np.random.default_rng(0)
        session = self.new_session()
        for rows in (max(1, min(prompt, self.plan.max_seq_len - 1)), 1):
            x = rng.standard_normal((rows, self.spec.hidden_size), dtype=np.float32)
            session.next_token(codec.encode(x, self.plan.codec))
        session.close()

    def _build(self, dtype: torch.dtype) -> Transformer:
        stage = load_stage(self.spec, self.dir / TAIL_FILE, dtype)
        if stage.start != self.plan.split_layer:
            raise ModelLoadError(f"{self.dir}: tail starts at layer {stage.start}, the plan splits at {self.plan.split_layer}")
        self.kernel_linears = 0
        if self.kernels == "triton":
            from splitlm.kernels import dispatch

            self.kernel_linears = dispatch.apply_kernels(stage, "triton")
        return stage.to(self.device)

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


class TailSession:
    """One generation on the cloud: its KV cache of layers [ℓ, L), its sampler, what it returns."""

    def __init__(self, runner: TailRunner, sampling: SamplingParams, logprobs: int = 0) -> None:
        self.runner = runner
        self.cache = KVCache()
        self.sampler = Sampler(sampling)
        self.logprobs = logprobs
        """Top log-probabilities returned with each token (0 = none)."""

    def _hidden(self, frame: bytes, layout: codec.FrameLayout | None = None):
        def hidden() -> torch.Tensor:
            h = decode_frame(frame, self.runner.kernels, self.runner.device, self.runner.plan.max_seq_len, layout)
            d = self.runner.spec.hidden_size
            if h.shape[1] != d:
                raise CodecError(f"frame hidden size {h.shape[1]} does not match the model's {d}")
            return h.to(torch.float32)
        return hidden

    def submit(self, frame: bytes, want_token: bool = True, layout: codec.FrameLayout | None = None) -> Future:
        """Decode one frame (T positions) and run the tail on the batcher: a future of the TokenChoice
        for the next position (None without want_token). `layout` (the frame as the caller parsed
        it) is not parsed again, and lets the KV budget be checked before the frame is decoded."""
        choose = self._choose if want_token else (lambda logits: None)
        return self.runner.batcher.submit(self.cache, self._hidden(frame, layout), True, choose,
                                          layout.rows if layout else None)

    def _choose(self, logits: torch.Tensor) -> TokenChoice:
        """On the batcher thread: sample the last position's logits (1, V)."""
        row = logits[-1].float().cpu().numpy()
        token = self.sampler(row)
        if not self.logprobs:
            return TokenChoice(token)
        logprob, top = top_logprobs(row, token, self.logprobs)
        return TokenChoice(token, logprob, top)

    def logits(self, frame: bytes, last_only: bool = False) -> torch.Tensor:
        """Decode one frame (T positions) and run the tail -> logits (T, V), or (1, V) with last_only
        (the LM head then runs on the last position only: a prompt's other logits are never sampled)."""
        return self.runner.batcher.submit(self.cache, self._hidden(frame), last_only).result()

    def next_token(self, frame: bytes) -> int:
        return self.submit(frame).result().id

    def close(self) -> None:
        """Free the cache (the batcher stops counting it and drops work still queued for it)."""
        self.runner.batcher.release(self.cache)
