"""The device runtime: the exported head in onnxruntime, the numpy codec, the generate loop.

Imports numpy, onnxruntime and tokenizers only — no torch, no triton.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from splitlm.artifacts import read_folder
from splitlm.errors import ConfigError, ModelLoadError
from splitlm.generation import GenerationResult, generate_tokens
from splitlm.model import names
from splitlm.quantize import codec
from splitlm.sampling import Sampler, SamplingParams

log = logging.getLogger(__name__)

HEAD_FILE = names.HEAD_FILE


def session_options(threads: int | None, optimization: str, spin: bool = True):
    import onnxruntime as ort

    levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    if optimization not in levels:
        raise ConfigError(f"graph optimization {optimization!r} not in {sorted(levels)}")
    so = ort.SessionOptions()
    so.graph_optimization_level = levels[optimization]
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if not spin:  # when another compute engine shares the cores (demo, tests), do not busy-wait
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


class HeadSession:
    """One onnxruntime session over DIR/device/head.onnx and the plan beside it."""

    def __init__(self, device_dir: str | Path, threads: int | None = None, optimization: str = "all",
                 spin: bool | None = None, verify: bool = False) -> None:
        """spin: let onnxruntime's threads busy-wait between calls. Default: only for device-only plans;
        a split plan waits on the network after each step, and spinning threads would burn the
        device's cores (and a co-located cloud's) for nothing. verify: check the sha256 of every
        file of the folder's manifest (their sizes are always checked)."""
        import onnxruntime as ort

        self.dir, self.plan, self.spec = read_folder(device_dir, HEAD_FILE, verify=verify)
        if spin is None:
            spin = self.plan.split_layer == self.spec.num_layers
        head = self.dir / HEAD_FILE
        options = session_options(threads or os.cpu_count(), optimization, spin)
        try:
            self.session = ort.InferenceSession(str(head), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types, all of them load failures here
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelLoadError(f"onnxruntime cannot load {head} ({reason}); check the export with --verify "
                                 "or export again") from None
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.layers = range(self.plan.split_layer)
        expected = [names.past_key(i) for i in self.layers]
        missing = [n for n in expected if n not in self.input_names]
        if missing:
            raise ModelLoadError(f"{head} lacks inputs {missing[:3]}: it does not match plan split {self.plan.split_layer}")
        self.device_only = self.plan.split_layer == self.spec.num_layers

    def empty_past(self, batch: int = 1) -> list[np.ndarray]:
        shape = (batch, self.spec.num_kv_heads, 0, self.spec.head_dim)
        return [np.zeros(shape, np.float32) for _ in range(2 * len(self.layers))]

    def run_raw(self, ids: np.ndarray, positions: np.ndarray, past: list[np.ndarray]) -> list[np.ndarray]:
        """One graph call: (B, T) ids and positions, past K/V -> [out, present K/V ...]."""
        feed = {names.INPUT_IDS: ids.astype(np.int64), names.POSITION_IDS: positions.astype(np.int64)}
        for j, i in enumerate(self.layers):
            feed[names.past_key(i)], feed[names.past_value(i)] = past[2 * j], past[2 * j + 1]
        feed = {k: v for k, v in feed.items() if k in self.input_names}
        return self.session.run(None, feed)


class DeviceHead:
    """The head of one generation session: owns its KV cache between steps.

    With kv_bits 16 the graph's present K/V become the next past as they are (no copies of
    ours); with 8 or 4 the new positions are quantized into a QuantizedKVStore after each
    step and dequantized only for the next graph call.
    """

    def __init__(self, session: HeadSession) -> None:
        self.session = session
        self.plan = session.plan
        self.reset()

    def reset(self) -> None:
        self.length = 0
        self.past = self.session.empty_past(1)
        self.stores = None
        if self.plan.kv_bits != 16:
            from splitlm.device.kvstore import QuantizedKVStore

            spec = self.session.spec
            self.stores = [QuantizedKVStore(self.plan.kv_bits, 1, spec.num_kv_heads, spec.head_dim) for _ in self.past]

    def step(self, ids: list[int]) -> np.ndarray:
        """Run new token ids through the head in prefill chunks -> outputs (T, d or V)."""
        return np.concatenate([out for out, _ in self.chunks(ids)], axis=0)

    def chunks(self, ids: list[int]) -> Iterator[tuple[np.ndarray, bool]]:
        """Run new token ids through the head one prefill chunk at a time: yields each chunk's
        outputs (T_i, d or V) as soon as they are computed, and whether it is the last."""
        if self.length + len(ids) > self.plan.max_seq_len:
            raise ConfigError(f"sequence would reach {self.length + len(ids)} tokens, the plan allows {self.plan.max_seq_len}")
        chunk = self.plan.prefill_chunk
        for start in range(0, len(ids), chunk):
            part = np.asarray([ids[start:start + chunk]], dtype=np.int64)
            positions = np.arange(self.length, self.length + part.shape[1], dtype=np.int64)[None]
            past = self.past if self.stores is None else [s.dequantize() for s in self.stores]
            result = self.session.run_raw(part, positions, past)
            if self.stores is None:
                self.past = result[1:]
            else:
                for store, present in zip(self.stores, result[1:]):
                    store.append(present[:, :, self.length:])
            self.length += part.shape[1]
            yield result[0][0], start + chunk >= len(ids)

    def encode(self, hidden: np.ndarray) -> bytes:
        """The activation frame for hidden states (T, d), by the plan's codec (numpy)."""
        return codec.encode(hidden, self.plan.codec, "numpy")

    def kv_bytes(self) -> int:
        """Bytes the KV cache holds between steps."""
        if self.stores is not None:
            return sum(s.nbytes() for s in self.stores)
        return sum(p.nbytes for p in self.past)


def load_tokenizer(device_dir: str | Path):
    """The tokenizer of an exported folder; ModelLoadError naming the file when it is missing or unreadable."""
    from splitlm.model.tokenizer import load_tokenizer_file

    return load_tokenizer_file(Path(device_dir) / "tokenizer.json")


def generate_device_only(session: HeadSession, prompt_ids: list[int], max_tokens: int,
                         sampling: SamplingParams = SamplingParams(), on_token: Callable[[int], None] | None = None,
                         tokenizer=None) -> GenerationResult:
    """Generation entirely on the device (a plan with split = L)."""
    if not session.device_only:
        raise ConfigError(f"plan split {session.plan.split_layer} < {session.spec.num_layers}: this head needs a cloud")
    head = DeviceHead(session)
    sampler = Sampler(sampling)
    tok = tokenizer or load_tokenizer(session.dir)
    return generate_tokens(lambda ids: sampler(head.step(ids)[-1]), prompt_ids, max_tokens, session.spec.eos_token_ids,
                           session.plan.max_seq_len, tok.decode, on_token)


Send = Callable[[bytes, int, bool], "int | None"]
"""send(frame, rows, want_token): `RemoteSession.send` or `TailSession.send`; with want_token, the
cloud's token for the position after the frame's rows."""


def generate_split(session: HeadSession, send: Send, prompt_ids: list[int], max_tokens: int,
                   on_token: Callable[[int], None] | None = None, tokenizer=None, stream_prefill: bool = True) -> GenerationResult:
    """Generation with a cloud: each step's hidden states go out as frames through `send`. With
    stream_prefill, a prompt's frames go out chunk by chunk as the head computes them (the cloud's
    prefill of one chunk overlaps the head's next); without, the whole prompt goes as one frame."""
    head = DeviceHead(session)
    sent = [0]

    def advance(ids: list[int]) -> int:
        for hidden, last in head.chunks(ids) if stream_prefill else [(head.step(ids), True)]:
            frame = head.encode(hidden)
            sent[0] += len(frame)
            token = send(frame, hidden.shape[0], last)
        return token

    tok = tokenizer or load_tokenizer(session.dir)
    result = generate_tokens(advance, prompt_ids, max_tokens, session.spec.eos_token_ids, session.plan.max_seq_len,
                             tok.decode, on_token)
    result.link_bytes = sent[0]
    return result
