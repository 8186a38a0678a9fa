"""The device runtime: the exported head in onnxruntime, the numpy codec, the generate loop.

Imports numpy, onnxruntime and tokenizers only — no torch, no triton.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol

import numpy as np

from splitlm.artifacts import read_folder, read_manifest
from splitlm.errors import ConfigError, ModelLoadError
from splitlm.generation import GenerationResult, generate_tokens
from splitlm.model import names
from splitlm.quantize import codec, kv_codec
from splitlm.sampling import Sampler, SamplingParams

log = logging.getLogger(__name__)

HEAD_FILE = names.HEAD_FILE
_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8}


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


def bare_feed(session) -> dict[str, np.ndarray]:
    """Inputs for one call of a head graph without layers (embedding, and norm + LM head where it has
    them), in either graph form: one token at position 0."""
    feed = {names.INPUT_IDS: np.array([[5]], np.int64), names.POSITION_IDS: np.array([[0]], np.int64),
            names.LOGIT_ROWS: np.array([0], np.int64)}
    inputs = [i.name for i in session.get_inputs()]
    unknown = [n for n in inputs if n not in feed]
    if unknown:
        raise ConfigError(f"a bare graph takes no {unknown[0]!r}: it has layers")
    return {n: feed[n] for n in inputs}


class Segment:
    """One graph of the head: layers [start, stop), its onnxruntime session and its input names."""

    def __init__(self, path: Path, start: int, stop: int, options) -> None:
        import onnxruntime as ort

        self.path, self.start, self.stop = path, start, stop
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types, all of them load failures here
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelLoadError(f"onnxruntime cannot load {path} ({reason}); check the export with --verify "
                                 "or export again") from None
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        missing = [n for i in range(start, stop) for n in (names.past_key(i), names.past_value(i)) if n not in self.inputs]
        if missing:
            raise ModelLoadError(f"{path} lacks inputs {missing[:3]}: it is not the graph of layers [{start}, {stop})")

    @property
    def layers(self) -> range:
        return range(self.start, self.stop)


class HeadSession:
    """The head of DIR/device in onnxruntime: one graph per segment, and the plan beside them.

    Two graph forms load: "gqa" (export/graph.py: GroupQueryAttention over K/V buffers of a fixed
    length, bound as past and present at once; the head may be cut into segments) and "traced" (the
    torch-traced fallback for models GroupQueryAttention cannot run: past in, past + new out, with
    position_ids; one segment)."""

    def __init__(self, device_dir: str | Path, threads: int | None = None, optimization: str = "all",
                 spin: bool | None = None, verify: bool = False) -> None:
        """spin: let onnxruntime's threads busy-wait between calls. Default: only for device-only plans;
        a split plan waits on the network after each step, and spinning threads would burn the
        device's cores (and a co-located cloud's) for nothing. verify: check the sha256 of every
        file of the folder's manifest (their sizes are always checked)."""
        self.dir, self.plan, self.spec = read_folder(device_dir, HEAD_FILE, verify=verify)
        if spin is None:
            spin = self.plan.split_layer == self.spec.num_layers
        options = session_options(threads or os.cpu_count(), optimization, spin)
        bounds = read_manifest(self.dir).get("segments") or [[0, self.plan.split_layer]]
        try:
            bounds = [(int(a), int(b)) for a, b in bounds]
        except (TypeError, ValueError):
            raise ModelLoadError(f"{self.dir}: the manifest's segments {bounds!r} are not [start, stop] pairs; export again") from None
        edges = [bounds[0][0]] + [b for _, b in bounds]
        if edges[0] != 0 or edges[-1] != self.plan.split_layer or any(a[1] != b[0] for a, b in zip(bounds, bounds[1:])) \
                or any(a >= b for a, b in zip(edges[1:], edges[2:])):
            raise ModelLoadError(f"{self.dir}: segments {bounds} do not cut the head's layers [0, {self.plan.split_layer})")
        self.segments = [Segment(self.dir / names.segment_file(k), a, b, options) for k, (a, b) in enumerate(bounds)]
        first = self.segments[0]
        self.session = first.session
        self.input_names = list(first.inputs)
        self.output_names = self.segments[-1].output_names
        self.layers = range(self.plan.split_layer)
        self.device_only = self.plan.split_layer == self.spec.num_layers
        self.kind = "traced" if names.POSITION_IDS in first.inputs else "gqa"
        if self.kind == "traced" and self.plan.kv_bits != 16:
            raise ModelLoadError(f"{first.path} is a traced graph with a float KV cache, the plan asks kv_bits {self.plan.kv_bits}; "
                                 "export again")
        self.kv_scales: dict[str, np.ndarray] = {}
        """A quantized cache's per-channel scales, "k.{i}" / "v.{i}" (Hkv, D), for K/V moved in from the cloud."""
        if self.plan.kv_bits != 16 and (self.dir / names.KV_SCALES_FILE).exists():
            with np.load(self.dir / names.KV_SCALES_FILE, allow_pickle=False) as scales:
                self.kv_scales = {k: scales[k] for k in scales.files}
        self.bases: dict = {}
        """The entropy 'ans' codec's calibrated basis at each split the head may stop at."""
        if codec.frame_kind(self.plan.codec) == "ans" and self.plan.split_layer != self.spec.num_layers:
            from splitlm.quantize import ans

            self.bases = ans.load_split_bases(self.dir, self.plan.splits())
        self.kv_energies = kv_codec.energies_for(self.dir, self.plan, self.spec.num_kv_heads, self.spec.head_dim)
        """The query energies the K/V codec steps moved keys by, per movable layer ({} unless moves are coded)."""
        if self.plan.split_moves:
            missing = [c for c in self.plan.move_cuts if c not in self.cuts]
            if self.kind != "gqa" or missing:
                raise ModelLoadError(f"{self.dir}: the plan moves the split to layers {self.plan.move_cuts}, and the head is not cut "
                                     f"at {missing or self.plan.move_cuts}; export again")
            if self.plan.kv_bits != 16 and len(self.kv_scales) != 2 * self.plan.split_layer:
                raise ModelLoadError(f"{self.dir}: the plan moves the split of a quantized KV cache, and {names.KV_SCALES_FILE} "
                                     "does not hold every layer's scales; export again")
        self.warmed = False
        """Whether a head has run once: onnxruntime's first run of a session prepares its kernels (prepacking,
        thread pools) and takes ~35x a short step; DeviceHead does it at creation, not in the first request."""
        self.rows_alike: bool | None = None
        """Whether calls of two rows or more give each row the same numbers however the rows are grouped (DeviceHead
        checks it on its first head; None before)."""
        if self.kind == "gqa" and self.layers:
            capacity = min(int(seg.inputs[names.past_key(seg.start)].shape[2]) for seg in self.segments if seg.layers)
            if capacity < self.plan.max_seq_len:
                raise ModelLoadError(f"{first.path} holds {capacity} positions of K/V, the plan allows {self.plan.max_seq_len}")

    @property
    def cuts(self) -> list[int]:
        """Layers where one segment ends and the next begins: the prefixes the head can run."""
        return [seg.stop for seg in self.segments]

    def empty_past(self, batch: int = 1) -> list[np.ndarray]:
        """The traced graph's past before the first step."""
        shape = (batch, self.spec.num_kv_heads, 0, self.spec.head_dim)
        return [np.zeros(shape, np.float32) for _ in range(2 * len(self.layers))]

    def run_raw(self, ids: np.ndarray, positions: np.ndarray, past: list[np.ndarray]) -> list[np.ndarray]:
        """One call of the traced graph: (B, T) ids and positions, past K/V -> [out, present K/V ...]."""
        if self.kind != "traced":
            raise ConfigError("run_raw drives the traced graph; a GroupQueryAttention head runs through DeviceHead")
        feed = {names.INPUT_IDS: ids.astype(np.int64), names.POSITION_IDS: positions.astype(np.int64)}
        for j, i in enumerate(self.layers):
            feed[names.past_key(i)], feed[names.past_value(i)] = past[2 * j], past[2 * j + 1]
        feed = {k: v for k, v in feed.items() if k in self.input_names}
        return self.session.run(None, feed)


def _zeros_mapped(shape: list[int], dtype) -> np.ndarray:
    """Zeros in an anonymous mapping of their own: pages become resident only as they are written, and the
    memory goes back to the system when the array is dropped (a released segment's K/V), which malloc does
    not promise for a block from its heap."""
    import mmap

    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return np.frombuffer(mmap.mmap(-1, max(size, 1)), dtype, count=int(np.prod(shape))).reshape(shape)


class _BoundSegment:
    """A segment's K/V buffers (zeros in mappings of their own: pages become resident only as positions
    are written, and go back to the system when the segment is released), bound once as both its
    graph's past and present."""

    def __init__(self, seg: Segment) -> None:
        import onnxruntime as ort

        self.seg = seg
        self.io = seg.session.io_binding()
        self.buffers = []
        for i in seg.layers:
            for past, present in ((names.past_key(i), names.present_key(i)), (names.past_value(i), names.present_value(i))):
                info = seg.inputs[past]
                buf = _zeros_mapped([int(d) for d in info.shape], _NUMPY_TYPES[info.type])
                value = ort.OrtValue.ortvalue_from_numpy(buf)
                self.io.bind_ortvalue_input(past, value)
                self.io.bind_ortvalue_output(present, value)
                self.buffers.append(buf)

    def run(self, x: np.ndarray, length: int, rows: np.ndarray | None, width: int) -> np.ndarray:
        """x: ids (1, T) int64 for the first segment, else hidden states (1, T, d) -> this segment's output."""
        import onnxruntime as ort

        io, seg, t = self.io, self.seg, x.shape[1]
        io.bind_cpu_input(names.INPUT_IDS if seg.start == 0 else names.HIDDEN_IN, x)
        if seg.layers:
            io.bind_cpu_input(names.SEQLENS_K, np.array([length + t - 1], np.int32))
            io.bind_cpu_input(names.TOTAL_SEQUENCE_LENGTH, np.array(length + t, np.int32))
        if rows is not None:
            io.bind_cpu_input(names.LOGIT_ROWS, rows)
            t = len(rows)
        out = np.empty((1, t, width), np.float32)
        io.bind_ortvalue_output(seg.output_names[0], ort.OrtValue.ortvalue_from_numpy(out))
        seg.session.run_with_iobinding(io)
        return out


class DeviceHead:
    """The head of one generation session: owns its KV cache between steps.

    A "gqa" graph writes each step's K/V in place into buffers of max_seq_len positions that
    are bound once as both past and present: nothing is copied or concatenated per step, and
    rolling back is a length change. With kv_bits 8 or 4 the buffers hold the graph's int8 or
    packed 4-bit codes. A head cut into segments runs them one after the other, each with its
    own buffers; `release(layer)` drops the segments from `layer` on, so that the head outputs
    the hidden states at that layer (a shallower split) and their K/V memory is returned.
    A "traced" graph (float KV only) returns present = past + new.
    """

    def __init__(self, session: HeadSession) -> None:
        self.session = session
        self.plan = session.plan
        self.bound: list[_BoundSegment] | None = None
        self.stop = session.plan.split_layer
        """The layer the head's output is taken at: the split, or a shallower cut after release()."""
        self.reset()
        if not session.warmed:  # one position through every graph, then forgotten: the first request is not slow
            self.step([session.spec.bos_token_id or 0], last_only=True)
            self.reset()
            session.warmed = True
        if session.rows_alike is None and session.kind == "gqa" and not self.device_only:
            session.rows_alike = self._rows_are_alike()
            if not session.rows_alike:
                log.warning("this onnxruntime gives a row of %s other numbers in calls of other sizes: speculative steps "
                            "run their rows one at a time", session.dir)

    def _rows_are_alike(self) -> bool:
        """Whether three rows in one call equal them in a call of one (run as two) and one of two, bit for bit."""
        if self.plan.max_seq_len < 4:  # no room to tell
            return False
        ids = [int(i) % self.session.spec.vocab_size for i in (5, 6, 7)]
        together = self.step(ids)
        self.reset()
        apart = np.concatenate([self.step(ids[:1]), self.step(ids[1:])])
        self.reset()
        return bool(np.array_equal(together, apart))

    def reset(self) -> None:
        self.length = 0
        self.ids: list[int] = []
        """The token at each position so far (a one-row step in the buffer's last position runs the one before again)."""
        self.kept: dict[int, np.ndarray] = {}
        """MoveCodec "recompute": the hidden states (max_seq_len, d) float32 at each cut of the head below its split, as
        computed (rows [0, length) written): a shallower move sends those at its new split instead of K/V."""
        if self.session.kind == "gqa":
            self.past = []
            if self.bound is None:
                self.bound = [_BoundSegment(seg) for seg in self.session.segments]
            if self.plan.move_codec.coder == "recompute":
                spec = self.session.spec
                self.kept = {c: _zeros_mapped([self.plan.max_seq_len, spec.hidden_size], np.float32)
                             for c in self.session.cuts if c < self.stop}
            return
        self.past = self.session.empty_past(1)

    @property
    def rows_alike(self) -> bool:
        """Whether a one-row call runs as two, so that a position's outputs do not depend on how many rows its call
        had (`step_each`): a GroupQueryAttention head that is not device-only, on an onnxruntime where calls of two rows
        or more agree (checked at the session's first head: `HeadSession.rows_alike`)."""
        return self.session.kind == "gqa" and not self.device_only and self.session.rows_alike is not False

    @property
    def device_only(self) -> bool:
        """Whether the head ends in logits (all layers, not released)."""
        return self.session.device_only and self.stop == self.session.plan.split_layer

    @property
    def buffers(self) -> list[np.ndarray]:
        """The K/V buffers of the layers in use, keys and values alternating per layer."""
        return [b for bound in self.bound or [] for b in bound.buffers]

    def release(self, layer: int) -> None:
        """Run only layers [0, layer) from now on: drop the segments after `layer` (a cut of the head) and
        their K/V buffers. ConfigError for a layer that is not a cut."""
        cuts = [c for c in self.session.cuts if c <= self.stop] if self.session.kind == "gqa" else [self.stop]
        if layer not in cuts:
            raise ConfigError(f"the head can stop at layers {cuts}, not {layer}")
        self.bound = [b for b in self.bound if b.seg.stop <= layer]
        self.stop = layer
        # the cut it stops at stays (its rows go on being written: a move back deeper and shallower again needs them);
        # cuts past it are not run from 0 again
        self.kept = {c: rows for c, rows in self.kept.items() if c <= layer}

    def kv_chunks(self, layers: range, max_bytes: int = 1 << 20) -> Iterator:
        """The K/V of `layers` (in use) for every position so far, as kv_wire LayerKV chunks: with the plan's move
        codec "ans", K/V codec payloads of the cache's values; with "exact", float32 values for a float cache, the
        cache's own codes and scales for a quantized one; with "recompute", no K/V but the hidden states entering
        layers.start (or, at a cut the head ran only after a move back, as "exact")."""
        from splitlm.quantize import kv_wire

        bits = 32 if self.plan.kv_bits == 16 else self.plan.kv_bits
        move = self.plan.move_codec
        if move.coder == "recompute" and layers.start in self.kept:
            yield from kv_wire.hidden_chunks(layers.start, self.kept[layers.start][:self.length], max_bytes)
            return
        by_layer = {}
        for bound in self.bound or []:
            for j, i in enumerate(bound.seg.layers):
                by_layer[i] = (bound.buffers[2 * j], bound.buffers[2 * j + 1])
        for i in layers:
            if i not in by_layer:
                raise ConfigError(f"the head does not hold the K/V of layer {i} (it runs layers [0, {self.stop}))")
            k, v = (b[0, :, :self.length] for b in by_layer[i])
            scales = (self._scales(i, "k"), self._scales(i, "v")) if bits != 32 else (None, None)
            if move.coder == "ans" and bits != 32:
                k, v = kv_wire.dequantize(k, bits, scales[0]), kv_wire.dequantize(v, bits, scales[1])
            if move.coder == "ans" or bits == 32:
                yield from kv_wire.move_chunks(i, k, v, move, self.session.kv_energies, max_bytes)
            else:
                yield from kv_wire.chunks(i, k, v, bits, *scales, max_bytes=max_bytes)

    def _scales(self, layer: int, which: str) -> np.ndarray:
        try:
            return self.session.kv_scales[f"{which}.{layer}"]
        except KeyError:
            raise ConfigError(f"{self.session.dir} has no KV scales for layer {layer} ({names.KV_SCALES_FILE}); export again") from None

    def check_move(self, layer: int) -> None:
        """ConfigError unless the head can move its split to `layer`: a cut it runs to (shallower), or one it
        released and holds the weights of (deeper), with the KV scales a quantized cache needs to take
        K/V back."""
        if self.session.kind != "gqa":
            raise ConfigError("a traced head graph cannot move its split (it is one segment); export with the GroupQueryAttention graph")
        if layer < self.stop:
            if layer not in self.session.cuts:
                raise ConfigError(f"the head can stop at layers {[c for c in self.session.cuts if c <= self.stop]}, not {layer}")
        elif layer > self.stop:
            if layer not in self.session.cuts:
                raise ConfigError(f"the head can go back to layers {[c for c in self.session.cuts if c > self.stop]}, not {layer}")
            if self.plan.kv_bits != 16:
                for i in range(self.stop, layer):
                    self._scales(i, "k"), self._scales(i, "v")
        else:
            raise ConfigError(f"the split is at {layer} already")

    def restore(self, layer: int, kv: dict[int, tuple[np.ndarray, np.ndarray]]) -> None:
        """Run layers [0, layer) again after a release (a move back deeper): the segments up to `layer` get
        K/V buffers again, filled with `kv` (float32 keys and values (Hkv, length, D) of every layer in
        [stop, layer), the cloud's), quantized with the cache's scales when the cache holds codes."""
        from splitlm.quantize import kv_wire

        if self.session.kind != "gqa" or layer not in self.session.cuts or layer <= self.stop:
            raise ConfigError(f"the head can go back to layers {[c for c in self.session.cuts if c > self.stop]}, not {layer}")
        missing = [i for i in range(self.stop, layer) if i not in kv]
        if missing:
            raise ConfigError(f"moving the split to {layer} needs the K/V of layers {missing}")
        added = [_BoundSegment(seg) for seg in self.session.segments if self.stop <= seg.start and seg.stop <= layer]
        for bound in added:
            for j, i in enumerate(bound.seg.layers):
                for buf, x, which in ((bound.buffers[2 * j], kv[i][0], "k"), (bound.buffers[2 * j + 1], kv[i][1], "v")):
                    if x.shape != (self.session.spec.num_kv_heads, self.length, self.session.spec.head_dim):
                        raise ConfigError(f"K/V of layer {i} has shape {x.shape}, expected "
                                          f"({self.session.spec.num_kv_heads}, {self.length}, {self.session.spec.head_dim})")
                    bits = self.plan.kv_bits
                    buf[0, :, :self.length] = x if bits == 16 else kv_wire.quantize(x, self._scales(i, which), bits)
        self.bound = self.bound + added
        self.stop = layer

    def step_each(self, ids: list[int]) -> np.ndarray:
        """Run new token ids -> outputs (T, d or V), each row as a one-token step computes it. onnxruntime's MatMulNBits
        at accuracy level 4 (int8 compute) computes a call of one row in another way than one of several (SmolLM2's
        head at split 15: rows 0.8 apart of 95), while calls of two rows or more give every row the same numbers however
        they are grouped (bit for bit, with onnxruntime 1.32 on x86-64: 6 rows at once, 2 then 4, or one at a time each
        padded to two). A head whose rows are alike (`rows_alike`: it pads a one-row call to two) runs them in one
        call, the price of about one step (SmolLM2's default head: 5 rows in about 9.5 ms, against 6.7 ms for one row
        and 33 ms for five one-row calls); another runs them one at a time."""
        if self.rows_alike:
            return self.step(ids)
        return np.concatenate([self.step([i]) for i in ids], axis=0)

    def step(self, ids: list[int], last_only: bool = False) -> np.ndarray:
        """Run new token ids through the head in prefill chunks -> outputs (T, d or V); with
        last_only, a device-only head computes the logits of the last position only (1, V)."""
        outs = [out for out, _ in self.chunks(ids, last_only)]
        return outs[-1] if last_only and self.device_only else np.concatenate(outs, axis=0)

    def chunks(self, ids: list[int], last_only: bool = False) -> Iterator[tuple[np.ndarray, bool]]:
        """Run new token ids through the head one prefill chunk at a time: yields each chunk's
        outputs (T_i, d or V) as soon as they are computed, and whether it is the last."""
        if self.length + len(ids) > self.plan.max_seq_len:
            raise ConfigError(f"sequence would reach {self.length + len(ids)} tokens, the plan allows {self.plan.max_seq_len}: "
                              "shorten the prompt or --max-tokens, or re-partition with a larger --max-seq-len and export again")
        chunk = self.plan.prefill_chunk
        for start in range(0, len(ids), chunk):
            part = np.asarray([ids[start:start + chunk]], dtype=np.int64)
            run = self._run_bound if self.session.kind == "gqa" else self._run_traced
            out = run(part, last_only)
            self.length += part.shape[1]
            self.ids += part[0].tolist()
            yield out, start + chunk >= len(ids)

    def _run_bound(self, part: np.ndarray, last_only: bool) -> np.ndarray:
        if part.shape[1] == 1 and self.rows_alike:  # one row runs as one of two (`rows_alike`, `step_each`)
            if self.length + 2 <= self.plan.max_seq_len:  # the token again after it, whose K/V the next step overwrites
                return self._run_at(np.repeat(part, 2, axis=1), self.length, False)[:1]
            if self.length:  # the buffer's last position: the token before it again (the same numbers), then it
                return self._run_at(np.array([[self.ids[self.length - 1], part[0, 0]]], np.int64), self.length - 1, False)[1:]
        return self._run_at(part, self.length, last_only)

    def _run_at(self, part: np.ndarray, start: int, last_only: bool) -> np.ndarray:
        t, spec = part.shape[1], self.session.spec
        x = part
        for bound in self.bound:
            ends = self.device_only and bound is self.bound[-1]
            rows = np.arange(t - 1 if last_only else 0, t, dtype=np.int64) if ends else None
            x = bound.run(x, start, rows, spec.vocab_size if ends else spec.hidden_size)
            kept = self.kept.get(bound.seg.stop)
            if kept is not None:
                kept[start:start + t] = x[0]
        return x[0]

    def _run_traced(self, part: np.ndarray, last_only: bool) -> np.ndarray:
        positions = np.arange(self.length, self.length + part.shape[1], dtype=np.int64)[None]
        result = self.session.run_raw(part, positions, self.past)
        self.past = result[1:]
        return result[0][0][-1:] if last_only and self.device_only else result[0][0]

    def rewind(self, length: int) -> None:
        """Forget every position from `length` on (a rejected draft, a replay): with preallocated
        buffers only the length changes; the next step overwrites what lies beyond it."""
        if not 0 <= length <= self.length:
            raise ConfigError(f"cannot rewind to {length}: the head holds {self.length} positions")
        if self.session.kind == "traced":
            self.past = [p[:, :, :length] for p in self.past]
        self.length = length
        del self.ids[length:]

    def presents(self) -> list[np.ndarray]:
        """K/V of every position so far, keys and values alternating per layer in use, each (1, Hkv, length, D)
        (a quantized cache's codes: (1, Hkv, length, D) int8, or D/2 bytes of packed 4-bit codes)."""
        if self.session.kind == "gqa":
            return [b[:, :, :self.length] for b in self.buffers]
        return list(self.past)

    def encode(self, hidden: np.ndarray, error_budget: float | None = None) -> bytes:
        """The activation frame for hidden states (T, d) at the head's current split, by the plan's codec (numpy), at
        the codec's error budget ε or `error_budget` (rate adaptation: device/uplink.py)."""
        cfg = self.plan.codec if error_budget is None else dataclasses.replace(self.plan.codec, error_budget=error_budget)
        return codec.encode(hidden, cfg, "numpy", self.session.bases.get(self.stop))

    def kv_bytes(self) -> int:
        """Bytes the KV cache holds between steps (the written positions of the buffers in use)."""
        if self.session.kind == "gqa":
            return sum(b[:, :, :self.length].nbytes for b in self.buffers)
        return sum(p.nbytes for p in self.past)


def load_tokenizer(device_dir: str | Path):
    """The tokenizer of an exported folder; ModelLoadError naming the file when it is missing or unreadable."""
    from splitlm.model.tokenizer import load_tokenizer_file

    return load_tokenizer_file(Path(device_dir) / "tokenizer.json")


Progress = Callable[[int, int], None]
"""on_prefill(positions done, positions of the prompt): called after each prefill chunk of a prompt."""


def generate_device_only(session: HeadSession, prompt_ids: list[int], max_tokens: int,
                         sampling: SamplingParams = SamplingParams(), on_token: Callable[[int], None] | None = None,
                         tokenizer=None, on_prefill: Progress | None = None) -> GenerationResult:
    """Generation entirely on the device (a plan with split = L)."""
    if not session.device_only:
        raise ConfigError(f"plan split {session.plan.split_layer} < {session.spec.num_layers}: this head needs a cloud")
    head = DeviceHead(session)
    sampler = Sampler(sampling)
    tok = tokenizer or load_tokenizer(session.dir)

    def advance(ids: list[int]) -> int:
        start = head.length
        for out, _ in head.chunks(ids, last_only=True):
            if on_prefill is not None and len(ids) > 1:
                on_prefill(head.length - start, len(ids))
        return sampler(out[-1], head.length)

    return generate_tokens(advance, prompt_ids, max_tokens, session.spec.eos_token_ids, session.plan.max_seq_len, tok.decode, on_token)


class Link(Protocol):
    """The cloud as generate_split sees it: `RemoteSession`, `ReplayingSession` or, in process, `TailSession`."""

    def send(self, frame: bytes, rows: int, want_token: bool = True) -> int | None:
        """Send a frame of `rows` positions; with want_token, the cloud's token for the position after them."""

    def move_split(self, new_split: int, layers: Iterable) -> list:
        """Move the session's split (kv_wire LayerKV chunks up for a shallower move, down for a deeper one)."""


@dataclass
class Move:
    """One split move of a session: where, what it carried and what it cost."""

    position: int
    """Positions the session held when it moved."""
    old: int
    new: int
    bytes: int
    """KV bytes sent (shallower) or received (deeper)."""
    seconds: float
    """From the start of encoding to the device running at the new split."""


def move_split(head: DeviceHead, link: Link, layer: int, max_bytes: int = 1 << 20) -> Move:
    """Move a session's split to `layer`: shallower, the head's K/V of [layer, stop) go to the cloud and the
    head releases those layers; deeper, the cloud's K/V of [stop, layer) come down into the head."""
    from splitlm.quantize import kv_wire

    t0, old = time.perf_counter(), head.stop
    head.check_move(layer)  # before the cloud changes anything
    max_bytes = min(max_bytes, getattr(link, "move_message_bytes", max_bytes))
    if layer < old:
        sent = [0]

        def counted():  # encoded a chunk at a time as the link sends them: no copy of the whole KV at once
            for item in head.kv_chunks(range(layer, old), max_bytes):
                sent[0] += item.ByteSize()
                yield item

        link.move_split(layer, counted())
        head.release(layer)
        size = sent[0]
    else:
        spec = head.session.spec
        items = link.move_split(layer, [])
        assembler = kv_wire.Assembler(range(old, layer), head.length, spec.num_kv_heads, spec.head_dim)
        for item in items:
            assembler.add(item)
        size = assembler.bytes
        del items  # the chunks' bytes are the assembler's now
        head.restore(layer, assembler.result())
    return Move(head.length, old, layer, size, time.perf_counter() - t0)


class _SendOnly:
    """A bare send function as a Link: it cannot move the split."""

    def __init__(self, send: Callable[[bytes, int, bool], "int | None"]) -> None:
        self.send = send

    def move_split(self, new_split: int, layers: list) -> list:
        raise ConfigError("the plan moves its split, and this link is a send function that cannot: pass the session "
                          "(RemoteSession, ReplayingSession or TailSession)")


def generate_split(session: HeadSession, link: "Link | Callable[[bytes, int, bool], int | None]", prompt_ids: list[int], max_tokens: int,
                   on_token: Callable[[int], None] | None = None, tokenizer=None, stream_prefill: bool = True,
                   on_move: Callable[[Move], None] | None = None, on_prefill: Progress | None = None,
                   speculate: bool = False, drafter=None) -> GenerationResult:
    """Generation with a cloud: each step's hidden states go out as frames through `link` (a session, or
    just its send function when the plan does not move its split). With
    stream_prefill, a prompt's frames go out chunk by chunk as the head computes them (the cloud's
    prefill of one chunk overlaps the head's next); without, the whole prompt goes as one frame.
    The plan's split_moves run when the session reaches their lengths (between prefill chunks or
    decode steps); each is passed to `on_move` and listed in the result's extra["moves"].

    With `speculate` (DESIGN.md §11), each decode step drafts tokens on the device (`drafter`, by default
    draft.PromptLookup over the session's history, as many as draft.DraftLength says), runs the last token and
    the drafts through the head (`DeviceHead.step_each`: one call where the head's rows are alike), and sends their rows in one frame for the cloud to verify
    (`link.verify`): the drafts the cloud's own choices agree with are kept, with its token after them, and
    the head forgets the rest (a length change). The output is the one of decoding a token at a time. The
    result's extra["round_trips"] counts decode steps and extra["tokens_per_round_trip"] the tokens each gave."""
    from splitlm.device.uplink import PrefillBudget
    from splitlm.draft import DraftLength, PromptLookup

    if not hasattr(link, "send"):
        link = _SendOnly(link)
    if speculate and not hasattr(link, "verify"):
        raise ConfigError("speculation needs a session that verifies drafts (RemoteSession, ReplayingSession or "
                          "TailSession), not a send function")
    head = DeviceHead(session)
    sent = [0]
    ceiling = session.plan.prefill_error_ceiling
    budget = None if ceiling is None else PrefillBudget(session.plan.codec.error_budget, ceiling, getattr(link, "uplink", None))
    if budget is not None and budget.meter is not None and session.plan.predictions.link_mbps:
        budget.meter.assume(session.plan.predictions.link_mbps * 1e6 / 8)  # the plan's link profile, until measured
    moves = list(session.plan.split_moves)
    done: list[Move] = []
    history: list[int] = []
    drafter = drafter or PromptLookup()
    lengths = DraftLength()
    rounds = [0]

    def moved() -> None:
        while moves and head.length >= moves[0][0]:
            move = move_split(head, link, moves.pop(0)[1])
            done.append(move)
            if on_move is not None:
                on_move(move)

    def advance(ids: list[int]) -> "int | list[int]":
        start = head.length
        history.extend(ids)
        if start:
            rounds[0] += 1
        if speculate and start:
            room = min(lengths.k, max_tokens - (len(history) - len(prompt_ids)) - 1, session.plan.max_seq_len - start - 2)
            draft = drafter.propose(history, room, lengths.min_match) if room > 0 else []
            if draft:
                frame = head.encode(head.step_each([ids[-1], *draft]))
                sent[0] += len(frame)
                accepted, token = link.verify(frame, len(draft) + 1, draft)
                head.rewind(start + 1 + accepted)
                lengths.update(len(draft), accepted)
                history.extend(draft[:accepted])
                moved()
                return [*draft[:accepted], token]
        for hidden, last in head.chunks(ids) if stream_prefill else [(head.step(ids), True)]:
            at, rows = head.length - hidden.shape[0], hidden.shape[0]
            error = budget.next() if budget is not None and rows > 1 else None
            frame = head.encode(hidden, error)
            sent[0] += len(frame)
            if error is not None and not last:  # before the send: its receipt may come back before send returns
                budget.sent(at, rows, len(frame), error)
            token = link.send(frame, rows, last)
            if on_prefill is not None and len(ids) > 1:
                on_prefill(head.length - start, len(ids))
            moved()
        return token

    tok = tokenizer or load_tokenizer(session.dir)
    result = generate_tokens(advance, prompt_ids, max_tokens, session.spec.eos_token_ids, session.plan.max_seq_len,
                             tok.decode, on_token)
    result.link_bytes = sent[0]
    result.extra["moves"] = [dataclasses.asdict(m) for m in done]
    result.extra["round_trips"] = rounds[0]
    result.extra["tokens_per_round_trip"] = (len(result.token_ids) - 1) / rounds[0] if rounds[0] else None
    if speculate:
        result.extra["drafted"], result.extra["accepted"] = sum(lengths.drafted), sum(lengths.kept)
    if budget is not None and budget.meter is not None:
        meter = budget.meter
        result.extra["uplink"] = {"bytes_per_s": meter.rate, "link_bound_samples": meter.link_bound,
                                  "device_bound_samples": meter.device_bound, "prefill_errors": budget.used}
    return result
