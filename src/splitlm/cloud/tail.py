"""The tail of an exported plan: decode activation frames, run layers [ℓ, L), sample.

Each session owns its KV cache and its random stream.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from splitlm.artifacts import read_folder
from splitlm.errors import CodecError, ModelLoadError
from splitlm.model import names
from splitlm.model.llama import KVCache, Transformer
from splitlm.quantize import codec
from splitlm.quantize.apply import load_stage
from splitlm.sampling import Sampler, SamplingParams

log = logging.getLogger(__name__)

TAIL_FILE = names.TAIL_FILE


class TailRunner:
    """The tail stage of DIR/cloud, shared by all sessions."""

    def __init__(self, cloud_dir: str | Path, dtype: torch.dtype = torch.float32) -> None:
        self.dir, self.plan, self.spec = read_folder(cloud_dir, TAIL_FILE)
        self.stage: Transformer = load_stage(self.spec, self.dir / TAIL_FILE, dtype)
        if self.stage.start != self.plan.split_layer:
            raise ModelLoadError(f"{self.dir}: tail starts at layer {self.stage.start}, the plan splits at {self.plan.split_layer}")
        self.batcher = None

    def enable_batching(self, max_batch: int = 64) -> None:
        """Run all sessions' steps through one continuous-batching thread (the service does this)."""
        if self.batcher is None:
            from splitlm.cloud.batcher import Batcher

            self.batcher = Batcher(self.stage, max_batch)

    def new_session(self, sampling: SamplingParams = SamplingParams()) -> "TailSession":
        return TailSession(self, sampling)


class TailSession:
    """One generation on the cloud: its KV cache of layers [ℓ, L) and its sampler."""

    def __init__(self, runner: TailRunner, sampling: SamplingParams) -> None:
        self.runner = runner
        self.cache = KVCache()
        self.sampler = Sampler(sampling)

    @torch.inference_mode()
    def logits(self, frame: bytes) -> torch.Tensor:
        """Decode one frame (T positions) and run the tail -> logits (T, V)."""
        h = codec.decode(frame, "torch", max_rows=self.runner.plan.max_seq_len)
        d = self.runner.spec.hidden_size
        if h.shape[1] != d:
            raise CodecError(f"frame hidden size {h.shape[1]} does not match the model's {d}")
        h = h.to(torch.float32)
        if self.runner.batcher is not None:
            return self.runner.batcher.run(self.cache, h)
        return self.runner.stage(h[None], cache=self.cache)[0]

    def next_token(self, frame: bytes) -> int:
        return self.sampler(self.logits(frame)[-1].float().numpy())
