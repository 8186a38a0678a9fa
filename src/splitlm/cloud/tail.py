"""The tail of an exported plan: decode activation frames, run layers [ℓ, L), sample.

Each session owns its KV cache and its random stream.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from splitlm.artifacts import read_folder
from splitlm.cloud.batcher import TorchThread
from splitlm.errors import CodecError, ConfigError, ModelLoadError
from splitlm.kernels import dispatch
from splitlm.model import names
from splitlm.model.llama import KVCache, Transformer
from splitlm.quantize import codec
from splitlm.quantize.apply import load_stage
from splitlm.sampling import Sampler, SamplingParams

log = logging.getLogger(__name__)

TAIL_FILE = names.TAIL_FILE


class TailRunner:
    """The tail stage of DIR/cloud, shared by all sessions."""

    def __init__(self, cloud_dir: str | Path, dtype: torch.dtype = torch.float32, device: str = "auto",
                 kernels: str = "auto", warm_up: bool = True) -> None:
        """device: 'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:N'. kernels: 'auto' (Triton on
        CUDA, torch references elsewhere), 'triton' or 'reference' (kernels.dispatch). warm_up: run
        a throwaway prompt and step now, so that the first session does not pay for lazy
        initialisation (oneDNN primitives, CUDA context, Triton compiles: ~0.5 s for SmolLM2 on CPU)."""
        self.dir, self.plan, self.spec = read_folder(cloud_dir, TAIL_FILE)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            self.device = torch.device(device)
        except RuntimeError as exc:
            raise ConfigError(f"device {device!r}: {exc}") from None
        self.kernels = dispatch.choose(kernels, self.device)
        # every torch op of the tail runs on this one thread (the batcher's): a second thread's
        # OpenMP pool makes GNU OpenMP stop spinning when threads outnumber cores (~40 % slower)
        self._worker = TorchThread("splitlm-tail")
        self.stage: Transformer = self._worker.submit(self._build, dtype).result()
        log.info("tail [%d, %d) on %s, kernels %s (%d quantized Linears on kernels)", self.stage.start,
                 self.spec.num_layers, self.device, self.kernels, self.kernel_linears)
        self.batcher = None
        if warm_up:
            self.warm_up()

    def warm_up(self, prompt: int = 16) -> None:
        """A throwaway session: one `prompt`-position frame, then one decode step."""
        rng = np.random.default_rng(0)
        session = self.new_session()
        for rows in (max(1, min(prompt, self.plan.max_seq_len - 1)), 1):
            x = rng.standard_normal((rows, self.spec.hidden_size), dtype=np.float32)
            session.next_token(codec.encode(x, self.plan.codec))

    def _build(self, dtype: torch.dtype) -> Transformer:
        stage = load_stage(self.spec, self.dir / TAIL_FILE, dtype)
        if stage.start != self.plan.split_layer:
            raise ModelLoadError(f"{self.dir}: tail starts at layer {stage.start}, the plan splits at {self.plan.split_layer}")
        self.kernel_linears = dispatch.apply_kernels(stage, "triton") if self.kernels == "triton" else 0
        return stage.to(self.device)

    def enable_batching(self, max_batch: int = 64) -> None:
        """Run all sessions' steps through one continuous-batching thread (the service does this)."""
        if self.batcher is None:
            from splitlm.cloud.batcher import Batcher

            self.batcher = Batcher(self.stage, max_batch, self._worker)

    def new_session(self, sampling: SamplingParams = SamplingParams()) -> "TailSession":
        return TailSession(self, sampling)


class TailSession:
    """One generation on the cloud: its KV cache of layers [ℓ, L) and its sampler."""

    def __init__(self, runner: TailRunner, sampling: SamplingParams) -> None:
        self.runner = runner
        self.cache = KVCache()
        self.sampler = Sampler(sampling)

    @torch.inference_mode()
    def logits(self, frame: bytes, last_only: bool = False) -> torch.Tensor:
        """Decode one frame (T positions) and run the tail -> logits (T, V), or (1, V) with last_only
        (the LM head then runs on the last position only: a prompt's other logits are never sampled)."""
        def hidden() -> torch.Tensor:
            h = dispatch.decode_frame(frame, self.runner.kernels, self.runner.device, self.runner.plan.max_seq_len)
            d = self.runner.spec.hidden_size
            if h.shape[1] != d:
                raise CodecError(f"frame hidden size {h.shape[1]} does not match the model's {d}")
            return h.to(torch.float32)

        if self.runner.batcher is not None:
            return self.runner.batcher.run(self.cache, hidden, last_only)
        return self.runner._worker.submit(self._run, hidden, last_only).result()

    @torch.inference_mode()
    def _run(self, hidden, last_only: bool) -> torch.Tensor:
        return self.runner.stage(hidden()[None], cache=self.cache, last_only=last_only)[0]

    def next_token(self, frame: bytes) -> int:
        return self.sampler(self.logits(frame, last_only=True)[-1].float().cpu().numpy())
