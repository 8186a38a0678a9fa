"""KV state on the wire, for moving the split during a session (DESIGN.md §6). numpy only.

A layer's keys and values (Hkv, T, D) travel as `LayerKV` chunks of consecutive positions. With
`LayerKV.encoding` 1 (a plan's MoveCodec "ans", the default) each chunk's keys and values are K/V codec
payloads (quantize/kv_codec.py: lossy, about 3.7 bits per element), `coded_chunks`. With encoding 0
(MoveCodec "exact") they are values in one of four encodings (`LayerKV.bits`):

* 32: float32 values (exact: what a device cache of kv_bits 16 holds, and the cloud's fp32 cache);
* 16: float16 values;
* 8: int8 codes, value = code × scale, one float32 scale per channel (head × dim);
* 4: two codes per byte, code + 8 in a nibble, the even element in the low nibble, scales as for 8.

8 and 4 are the device cache's own codes (onnxruntime's GroupQueryAttention quantized cache, whose
layout this is), sent as they lie in its buffers. `Assembler` checks what arrives against the
session (layers, positions, shapes, sizes) and gives float32 K/V, or a CodecError naming what is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

from splitlm.errors import CodecError
from splitlm.proto import splitlm_pb2 as pb
from splitlm.quantize import kv_codec

WIRE_BITS = (32, 16, 8, 4)
ENCODINGS = (0, 1, 2)
"""LayerKV.encoding: 0 values as `bits` says, 1 K/V codec payloads, 2 the hidden states entering the move's new split
(MoveCodec "recompute": the receiver recomputes the K/V from them)."""
CODED = 1
HIDDEN = 2
GROUP = 256
"""Most positions per coded chunk: each payload's channel statistics are the group's."""
_FLOAT = {32: np.dtype("<f4"), 16: np.dtype("<f2")}


def _row_bytes(bits: int, kv_heads: int, head_dim: int) -> int:
    """Bytes of keys (or values) per position."""
    return kv_heads * head_dim * bits // 8


def quantize(x: np.ndarray, scales: np.ndarray, bits: int) -> np.ndarray:
    """float (Hkv, T, D) -> the cache's codes with per-channel `scales` (Hkv, D): int8 (Hkv, T, D) for 8
    bits, uint8 (Hkv, T, D/2) packed for 4 (the rounding of quantize.kv.StaticKVQuant)."""
    q = 2 ** (bits - 1) - 1
    codes = np.clip(np.rint(x / scales[:, None, :]), -q - 1, q).astype(np.int8)
    if bits == 8:
        return codes
    if bits != 4:
        raise CodecError(f"KV bits {bits} are not codes; use 8 or 4")
    nib = (codes.astype(np.int16) + 8).astype(np.uint8)
    return nib[..., 0::2] | (nib[..., 1::2] << 4)


def dequantize(data: np.ndarray, bits: int, scales: np.ndarray | None = None) -> np.ndarray:
    """The inverse of the encodings above -> float32 (Hkv, T, D)."""
    if bits in _FLOAT:
        return data.astype(np.float32)
    if bits == 8:
        codes = data.view(np.int8).astype(np.float32)
    elif bits == 4:
        packed = data.view(np.uint8)
        codes = np.empty(packed.shape[:-1] + (2 * packed.shape[-1],), np.float32)
        codes[..., 0::2] = (packed & 15).astype(np.float32) - 8
        codes[..., 1::2] = (packed >> 4).astype(np.float32) - 8
    else:
        raise CodecError(f"KV bits {bits} not in {WIRE_BITS}")
    return codes * scales[:, None, :]


def chunks(layer: int, keys: np.ndarray, values: np.ndarray, bits: int, key_scales: np.ndarray | None = None,
           value_scales: np.ndarray | None = None, max_bytes: int = 1 << 20) -> Iterator[pb.LayerKV]:
    """One layer's K/V (Hkv, T, D) or the cache's codes (Hkv, T, D or D/2) as LayerKV chunks of
    consecutive positions, keys + values at most `max_bytes` per chunk (one position at least)."""
    if bits not in WIRE_BITS:
        raise CodecError(f"KV bits {bits} not in {WIRE_BITS}")
    if bits in _FLOAT:
        keys, values = keys.astype(_FLOAT[bits], copy=False), values.astype(_FLOAT[bits], copy=False)
    total = keys.shape[1]
    per_position = 2 * keys.shape[0] * keys.shape[2] * keys.dtype.itemsize
    step = max(1, max_bytes // max(per_position, 1))
    scales = {}
    if bits in (8, 4):
        scales = dict(key_scales=np.ascontiguousarray(key_scales, "<f4").tobytes(),
                      value_scales=np.ascontiguousarray(value_scales, "<f4").tobytes())
    for start in range(0, max(total, 1), step):
        stop = min(start + step, total)
        yield pb.LayerKV(layer=layer, bits=bits, start_position=start, positions=stop - start,
                         keys=np.ascontiguousarray(keys[:, start:stop]).tobytes(),
                         values=np.ascontiguousarray(values[:, start:stop]).tobytes(), **scales)


def coded_chunks(layer: int, keys: np.ndarray, values: np.ndarray, key_steps: np.ndarray, value_error: float,
                 group: int = GROUP) -> Iterator[pb.LayerKV]:
    """One layer's float K/V (Hkv, T, D) for positions [0, T) as LayerKV chunks of K/V codec payloads (encoding 1),
    groups of at most `group` positions of about equal size; keys at the target steps `key_steps` (Hkv·D,), values
    at relative error `value_error`. The session's first position (the attention sink) goes raw."""
    total = keys.shape[1]
    n = max(1, -(-total // group))
    bounds = np.linspace(0, total, n + 1).round().astype(int)
    for start, stop in zip(bounds[:-1], bounds[1:]):
        k, v = keys[:, start:stop], values[:, start:stop]
        raw = 1 if start == 0 else 0
        yield pb.LayerKV(layer=layer, encoding=CODED, start_position=int(start), positions=int(stop - start),
                         keys=kv_codec.encode(k, key_steps, raw),
                         values=kv_codec.encode(v, kv_codec.relative_steps(v, value_error, raw), raw))


def hidden_chunks(layer: int, hidden: np.ndarray, max_bytes: int = 1 << 20) -> Iterator[pb.LayerKV]:
    """The hidden states (T, d) entering `layer`, for positions [0, T), as LayerKV chunks of encoding 2 (float32 rows
    in `keys`) of at most `max_bytes` each: a "recompute" move's payload."""
    hidden = np.ascontiguousarray(hidden, "<f4")
    total = hidden.shape[0]
    step = max(1, max_bytes // max(hidden.shape[1] * 4, 1))
    for start in range(0, max(total, 1), step):
        stop = min(start + step, total)
        yield pb.LayerKV(layer=layer, bits=32, encoding=HIDDEN, start_position=start, positions=stop - start,
                         keys=hidden[start:stop].tobytes())


def move_chunks(layer: int, keys: np.ndarray, values: np.ndarray, move, energies: dict, max_bytes: int = 1 << 20) -> Iterator[pb.LayerKV]:
    """One layer's float K/V (Hkv, T, D) as a move sends them under the plan's MoveCodec `move`: K/V codec
    payloads ("ans", keys stepped by the layer's query energies in `energies`), or float32 values ("exact", and
    "recompute"'s deeper moves)."""
    if move.coder == "ans":
        return coded_chunks(layer, keys, values, kv_codec.logit_steps(energies[layer], move.key_error), move.value_error)
    return chunks(layer, keys, values, 32, max_bytes=max_bytes)


def batches(items: Iterable[pb.LayerKV], max_bytes: int) -> Iterator[list[pb.LayerKV]]:
    """Group chunks into messages of at most about `max_bytes` each (a chunk never splits)."""
    batch: list[pb.LayerKV] = []
    size = 0
    for item in items:
        n = item.ByteSize()
        if batch and size + n > max_bytes:
            yield batch
            batch, size = [], 0
        batch.append(item)
        size += n
    if batch:
        yield batch


@dataclass
class _Layer:
    bits: int
    encoding: int
    keys: list
    values: list
    """Chunks as sent (encoding 0) or decoded float32 (Hkv, positions, D) arrays (encoding 1)."""
    key_scales: bytes
    value_scales: bytes
    positions: int = 0


class Assembler:
    """Collects the chunks of one move: layers `layers`, each for positions [0, positions), of a model
    with `kv_heads` × `head_dim` K/V. CodecError (naming the layer and what is wrong) for a chunk
    of another layer, out of order, of the wrong size or encoding; nothing is kept from a move
    that failed."""

    def __init__(self, layers: range, positions: int, kv_heads: int, head_dim: int, max_bytes: int | None = None,
                 hidden_size: int | None = None) -> None:
        """hidden_size: the model's, when the move may carry hidden states instead (encoding 2, "recompute");
        None refuses them."""
        self.layers, self.positions, self.kv_heads, self.head_dim = layers, positions, kv_heads, head_dim
        self.max_bytes, self.hidden_size = max_bytes, hidden_size
        self._got: dict[int, _Layer] = {}
        self._hidden: _Layer | None = None
        self.bytes = 0

    def add(self, item: pb.LayerKV) -> None:
        i, bits = item.layer, item.bits
        if item.encoding == HIDDEN:
            return self._add_hidden(item)
        if i not in self.layers:
            raise CodecError(f"KV for layer {i}: the move carries layers [{self.layers.start}, {self.layers.stop})")
        if item.encoding not in ENCODINGS:
            raise CodecError(f"KV of layer {i}: encoding {item.encoding} not in {ENCODINGS}")
        if self._hidden is not None:
            raise CodecError(f"KV of layer {i} in a move that carries hidden states (encoding 2)")
        if item.encoding == CODED:
            return self._add_coded(item)
        if bits not in WIRE_BITS:
            raise CodecError(f"KV of layer {i}: bits {bits} not in {WIRE_BITS}")
        if bits == 4 and self.head_dim % 2:
            raise CodecError(f"KV of layer {i}: 4-bit codes pack two per byte, head_dim {self.head_dim} is odd")
        got = self._got.get(i)
        if got is None:
            scale_bytes = 4 * self.kv_heads * self.head_dim if bits in (8, 4) else 0
            for name in ("key_scales", "value_scales"):
                if len(getattr(item, name)) != scale_bytes:
                    raise CodecError(f"KV of layer {i}: {name} hold {len(getattr(item, name))} bytes, {bits} bits need "
                                     f"{scale_bytes} ({self.kv_heads}x{self.head_dim} float32)" if scale_bytes
                                     else f"KV of layer {i}: {name} given with {bits}-bit values")
            for name in ("key_scales", "value_scales"):
                scales = np.frombuffer(getattr(item, name), "<f4")
                if not (np.isfinite(scales).all() and (scales > 0).all()):
                    raise CodecError(f"KV of layer {i}: {name} are not all finite and > 0")
            got = self._got[i] = _Layer(bits, 0, [], [], item.key_scales, item.value_scales)
        elif got.encoding != 0:
            raise CodecError(f"KV of layer {i}: a chunk of encoding 0 after coded chunks")
        elif bits != got.bits:
            raise CodecError(f"KV of layer {i}: a chunk of {bits} bits after chunks of {got.bits}")
        elif item.key_scales != got.key_scales or item.value_scales != got.value_scales:
            raise CodecError(f"KV of layer {i}: a chunk with other scales than the layer's first")
        self._check_positions(item, got)
        need = item.positions * _row_bytes(bits, self.kv_heads, self.head_dim)
        for name in ("keys", "values"):
            if len(getattr(item, name)) != need:
                raise CodecError(f"KV of layer {i}: {name} of {len(getattr(item, name))} bytes for {item.positions} positions, "
                                 f"expected {need} ({self.kv_heads} heads x {self.head_dim} dims at {bits} bits)")
        self._count(item)
        got.keys.append(item.keys)
        got.values.append(item.values)
        got.positions += item.positions

    def _check_positions(self, item: pb.LayerKV, got: _Layer, what: str = "KV") -> None:
        where = f"{what} of layer {item.layer}"
        if item.positions == 0 and self.positions:
            raise CodecError(f"{where}: a chunk of 0 positions")
        if item.start_position != got.positions:
            raise CodecError(f"{where}: chunk starts at position {item.start_position}, expected {got.positions}")
        if got.positions + item.positions > self.positions:
            raise CodecError(f"{where}: positions up to {got.positions + item.positions}, the session holds {self.positions}")

    def _count(self, item: pb.LayerKV) -> None:
        self.bytes += item.ByteSize()
        if self.max_bytes is not None and self.bytes > self.max_bytes:
            raise CodecError(f"the move's KV passes {self.max_bytes} bytes, more than its layers and positions need")

    def _add_coded(self, item: pb.LayerKV) -> None:
        """A chunk of K/V codec payloads: decoded as it arrives (CodecError naming the layer for a bad payload)."""
        i = item.layer
        if item.bits or item.key_scales or item.value_scales:
            raise CodecError(f"KV of layer {i}: a coded chunk (encoding 1) carries bits {item.bits} or scales; it has neither")
        got = self._got.get(i)
        if got is None:
            got = self._got[i] = _Layer(0, CODED, [], [], b"", b"")
        elif got.encoding != CODED:
            raise CodecError(f"KV of layer {i}: a coded chunk after chunks of encoding 0")
        self._check_positions(item, got)
        self._count(item)
        pair = []
        for name in ("keys", "values"):
            try:
                pair.append(kv_codec.decode(getattr(item, name), self.kv_heads, item.positions, self.head_dim))
            except CodecError as exc:
                raise CodecError(f"KV of layer {i}, positions [{item.start_position}, {item.start_position + item.positions}), "
                                 f"{name}: {exc}") from None
        got.keys.append(pair[0])
        got.values.append(pair[1])
        got.positions += item.positions

    def _add_hidden(self, item: pb.LayerKV) -> None:
        """A chunk of the hidden states entering the new split (encoding 2): float32 rows, checked as they arrive."""
        where = f"hidden states at layer {item.layer}"
        if self.hidden_size is None:
            raise CodecError(f"{where}: this side takes K/V, not hidden states, for a move (encoding 2)")
        if item.layer != self.layers.start:
            raise CodecError(f"{where}: the move's new split is {self.layers.start}, the hidden states must enter it")
        if self._got:
            raise CodecError(f"{where} in a move that carries K/V")
        if item.bits != 32 or item.values or item.key_scales or item.value_scales:
            raise CodecError(f"{where}: a chunk of encoding 2 carries float32 rows in keys (bits 32), no values and no scales")
        got = self._hidden = self._hidden or _Layer(32, HIDDEN, [], [], b"", b"")
        self._check_positions(item, got, "hidden states")
        need = item.positions * self.hidden_size * 4
        if len(item.keys) != need:
            raise CodecError(f"{where}: {len(item.keys)} bytes for {item.positions} positions, expected {need} "
                             f"({self.hidden_size} float32 each)")
        rows = np.frombuffer(item.keys, "<f4").reshape(item.positions, self.hidden_size)
        if not np.isfinite(rows).all():
            raise CodecError(f"{where}, positions [{item.start_position}, {item.start_position + item.positions}): values that are not finite")
        self._count(item)
        got.keys.append(rows)
        got.positions += item.positions

    def hidden(self) -> np.ndarray | None:
        """The hidden states (positions, hidden) float32 a "recompute" move carried, None for a move of K/V;
        CodecError when positions are missing."""
        if self._hidden is None:
            return None
        if self._hidden.positions != self.positions:
            raise CodecError(f"the move lacks hidden states at layer {self.layers.start} "
                             f"(positions {self._hidden.positions} of {self.positions})")
        return np.concatenate(self._hidden.keys) if self._hidden.keys else np.zeros((0, self.hidden_size), np.float32)

    def result(self) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """layer -> float32 keys and values (Hkv, positions, D); CodecError when a layer or position is missing."""
        if self._hidden is not None:
            raise CodecError(f"the move carried hidden states at layer {self.layers.start}, not K/V: the receiver recomputes them")
        out = {}
        for i in self.layers:
            got = self._got.get(i)
            if got is None or got.positions != self.positions:
                have = 0 if got is None else got.positions
                raise CodecError(f"the move lacks KV of layer {i} (positions {have} of {self.positions})")
            if got.encoding == CODED:
                out[i] = tuple(np.concatenate(parts, axis=1) if parts else np.zeros((self.kv_heads, 0, self.head_dim), np.float32)
                               for parts in (got.keys, got.values))
                continue
            dtype = _FLOAT.get(got.bits, np.dtype(np.uint8))
            width = self.head_dim if got.bits != 4 else self.head_dim // 2
            pair = []
            for parts, scales in ((got.keys, got.key_scales), (got.values, got.value_scales)):
                # each chunk is (Hkv, its positions, width): joined along the positions
                data = np.concatenate([np.frombuffer(p, dtype).reshape(self.kv_heads, -1, width) for p in parts], axis=1) \
                    if parts else np.zeros((self.kv_heads, 0, width), dtype)
                s = np.frombuffer(scales, "<f4").reshape(self.kv_heads, self.head_dim) if scales else None
                pair.append(dequantize(data, got.bits, s))
                if not np.isfinite(pair[-1]).all():
                    raise CodecError(f"KV of layer {i}: values that are not finite")
            out[i] = (pair[0], pair[1])
        return out
