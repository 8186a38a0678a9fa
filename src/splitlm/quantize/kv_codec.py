"""A lossy codec for K/V moved across the split (DESIGN.md §6): per-channel uniform steps and ANS (numpy).

One payload codes one tensor, the keys or the values of one layer for a group of consecutive positions
(Hkv, T, D). Each of its Hkv·D channels is

1. centred on its median over the group (sent as float32);
2. quantized by rounding with its own uniform step Δ (the nearest power of 2^(1/8) to the caller's target,
   its index sent as a byte). The targets say what error matters:
   * keys (`logit_steps`): an error e on a key moves an attention logit by q·e/√D, so a channel read by
     queries of energy E[q²] gets Δ = τ·√(12 / E[q²]) and adds about τ²/D to the logit's error variance.
     The query energies are calibrated at export (quantize.kv). Against one relative error for every
     channel this saves 0.3 to 1.8 bits per key element at the same logit error (SmolLM2, by layer);
   * values (`relative_steps`): each channel's squared error is about ε·σ², σ its spread over the group;
3. entropy coded with ANS (`constriction`) under a quantized Gaussian per channel whose scale is the
   RMS of the channel's symbols (a byte per channel). On SmolLM2's K/V this costs 0.4 bits per element
   less than one histogram for the whole group, and 0.07 less than a Laplace model.

The first position of a session (the attention sink: every later query reads it) goes raw (float32), as
does any position whose symbols would leave [-QMAX, QMAX]; with it coded, a move cost 2.2 % perplexity
instead of 0.5 % (ε 0.005 on every channel). Coding across positions (the difference to the previous
position, closed loop) costs 0.1 to 0.6 bits more on values and saves under 0.1 on keys; a per-head PCA basis
saved about 0.4 bits fitted on the positions it coded, and a query-whitened PCA fitted on other positions did
worse than per-channel steps at the same logit error: neither is used.

Payload (little endian):

    header (16 bytes)   magic "KVA" | version 1 | heads u16 | positions u32 | dim u16 | raw positions n u32
    means  f32[C]       each channel's median (C = heads·dim, channel h·dim + d)
    steps  u8[C]        Δ index k: Δ = 2^(k/8 − 24)
    scales u8[C]        model index j: the Gaussian's scale is max(2^((j − 128)/8), 0.2) steps
    raw    u32[n]       the raw positions, ascending
    words  u32[...]     the ANS stream of the other positions' symbols, position-major
    values f32[n·C]     the raw positions' values

Every field is checked before anything is decoded (CodecError naming it); a corrupt stream decodes to
symbols that fail a check after it (a stream not used up exactly, values not finite), never a crash.
"""

from __future__ import annotations

import struct

import numpy as np

from splitlm.errors import CodecError, ModelLoadError

MAGIC = b"KVA"
VERSION = 1
HEADER = struct.Struct("<3sBHIHI")
QMAX = 1 << 12
"""Symbols are coded in [-QMAX, QMAX]: a position whose symbols would leave that range goes raw."""
STEP_BIAS = 24 * 8
SCALE_BIAS = 128
MIN_SCALE = 0.2
"""Gaussian scales (in steps) are kept above this: the model must give every symbol a probability."""

_STEPS = np.exp2((np.arange(256, dtype=np.float64) - STEP_BIAS) / 8.0)
_SCALES = np.maximum(np.exp2((np.arange(256, dtype=np.float64) - SCALE_BIAS) / 8.0), MIN_SCALE)


def _model():
    import constriction

    return constriction.stream.model.QuantizedGaussian(-QMAX, QMAX)


def relative_steps(x: np.ndarray, error: float, skip: int = 0) -> np.ndarray:
    """Target steps (C,) for K or V (Hkv, T, D) that give each channel a squared error of about ε·σ² (σ over the
    positions after the first `skip`)."""
    y = np.asarray(x, np.float64).transpose(1, 0, 2).reshape(x.shape[1], -1)
    y = y[skip:] if skip < len(y) else y
    return np.sqrt(12.0 * error) * y.std(0)


def logit_steps(query_energy: np.ndarray, error: float) -> np.ndarray:
    """Target steps (C,) for keys, from each key channel's query energy E[q²] (Hkv, D) over the heads that read it:
    each channel then adds about error² / D to the variance of a attention logit (q·k/√D)."""
    w = np.asarray(query_energy, np.float64).ravel()
    return error * np.sqrt(12.0 / np.maximum(w, 1e-12))


def encode(x: np.ndarray, steps: np.ndarray, raw_rows: int = 0) -> bytes:
    """K or V (Hkv, T, D) -> one payload (module docstring), each channel quantized with about `steps` (C,), the
    first `raw_rows` positions raw."""
    x = np.asarray(x, np.float32)
    if x.ndim != 3 or 0 in x.shape:
        raise CodecError(f"K/V to code must be (heads, positions, dim), none empty, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise CodecError("K/V to code contain NaN or Inf")
    H, T, D = x.shape
    C = H * D
    steps = np.asarray(steps, np.float64)
    if steps.shape != (C,) or not (steps >= 0).all():
        raise CodecError(f"the K/V codec needs {C} target steps >= 0, got shape {steps.shape}")
    y = x.transpose(1, 0, 2).reshape(T, C).astype(np.float64)  # (T, C), channel h·D + d
    with np.errstate(divide="ignore"):
        k = np.rint(8.0 * np.log2(steps) + STEP_BIAS)
    k = np.clip(np.nan_to_num(k, nan=0.0, neginf=0.0), 0, 255).astype(np.uint8)
    mean = np.median(y[raw_rows:] if raw_rows < T else y, 0).astype(np.float32)
    q = np.rint((y - mean) / _STEPS[k])
    raw = np.abs(q).max(1) > QMAX  # positions far outside the rest go raw
    raw[:raw_rows] = True
    coded = q[~raw]
    j = np.clip(np.rint(8.0 * np.log2(np.maximum(np.sqrt(np.square(coded).mean(0)) if len(coded) else 0.0, 1e-30))) + SCALE_BIAS,
                0, 255).astype(np.uint8)
    words = np.zeros(0, np.uint32)
    if len(coded):
        import constriction

        coder = constriction.stream.stack.AnsCoder()
        scales = np.broadcast_to(_SCALES[j], coded.shape).ravel()
        coder.encode_reverse(coded.astype(np.int32).ravel(), _model(), np.zeros_like(scales), scales)
        words = coder.get_compressed()
    rows = np.nonzero(raw)[0].astype("<u4")
    return b"".join([HEADER.pack(MAGIC, VERSION, H, T, D, len(rows)), mean.astype("<f4").tobytes(), k.tobytes(), j.tobytes(),
                     rows.tobytes(), words.astype("<u4").tobytes(), x.transpose(1, 0, 2).reshape(T, C)[raw].astype("<f4").tobytes()])


def decode(buf: bytes, heads: int, positions: int, dim: int) -> np.ndarray:
    """A payload -> float32 (heads, positions, dim): CodecError when it is not a payload of that shape."""
    def need(n: int, what: str) -> None:
        if len(buf) < n:
            raise CodecError(f"K/V payload of shape ({heads}, {positions}, {dim}) is truncated inside its {what}")

    need(HEADER.size, "header")
    magic, version, H, T, D, n_raw = HEADER.unpack_from(buf, 0)
    if magic != MAGIC:
        raise CodecError(f"K/V payload starts with {magic!r}, not {MAGIC!r}: not a K/V codec payload")
    if version != VERSION:
        raise CodecError(f"K/V payload version {version} is not supported (expected {VERSION})")
    if (H, T, D) != (heads, positions, dim):
        raise CodecError(f"K/V payload of shape ({H}, {T}, {D}) where the chunk needs ({heads}, {positions}, {dim})")
    if n_raw > T:
        raise CodecError(f"K/V payload of {T} positions names {n_raw} raw ones")
    C = H * D
    off = HEADER.size
    need(off + 6 * C + 4 * n_raw, "means, steps, scales and raw positions")
    with np.errstate(invalid="ignore"):  # a signalling NaN, refused below
        mean = np.frombuffer(buf, "<f4", C, off).astype(np.float64)
    k = np.frombuffer(buf, np.uint8, C, off + 4 * C)
    j = np.frombuffer(buf, np.uint8, C, off + 5 * C)
    rows = np.frombuffer(buf, "<u4", n_raw, off + 6 * C)
    off += 6 * C + 4 * n_raw
    if not np.isfinite(mean).all():
        raise CodecError("K/V payload's channel means are not all finite: corrupt")
    if n_raw and ((rows >= T).any() or (np.diff(rows.astype(np.int64)) <= 0).any()):
        raise CodecError(f"K/V payload's raw positions are not ascending within [0, {T})")
    raw = np.zeros(T, bool)
    raw[rows] = True
    coded = T - n_raw
    words_bytes = len(buf) - off - 4 * C * n_raw
    if words_bytes < 0 or words_bytes % 4 or (coded and not words_bytes) or (not coded and words_bytes):
        raise CodecError(f"K/V payload of shape ({H}, {T}, {D}) with {n_raw} raw positions has {len(buf) - off} bytes "
                         "after its model: not one ANS stream for the others and the raw values")
    y = np.empty((T, C), np.float64)
    if coded:
        import constriction

        words = np.frombuffer(buf, "<u4", words_bytes // 4, off)
        try:
            coder = constriction.stream.stack.AnsCoder(np.ascontiguousarray(words, np.uint32))
            scales = np.broadcast_to(_SCALES[j], (coded, C)).ravel()
            symbols = coder.decode(_model(), np.zeros_like(scales), scales)
        except (ValueError, AssertionError, RuntimeError) as exc:
            raise CodecError(f"K/V payload's ANS stream is corrupt: {exc}") from None
        if not coder.is_empty():
            raise CodecError("K/V payload's ANS stream has data left after its symbols: corrupt")
        y[~raw] = mean + symbols.reshape(coded, C).astype(np.float64) * _STEPS[k]
    if n_raw:
        with np.errstate(invalid="ignore"):  # a signalling NaN, refused below
            y[raw] = np.frombuffer(buf, "<f4", n_raw * C, off + words_bytes).reshape(n_raw, C)
    with np.errstate(over="ignore", invalid="ignore"):
        out = y.reshape(T, H, D).transpose(1, 0, 2).astype(np.float32)
    if not np.isfinite(out).all():
        raise CodecError("K/V payload decodes to values that are not finite: corrupt")
    return np.ascontiguousarray(out)


def save_energies(energies: dict[int, np.ndarray], path) -> None:
    """Write {layer: query energies (Hkv, D)} to `path` (names.KV_CODEC_FILE's layout, numpy npz)."""
    with open(path, "wb") as f:
        np.savez(f, **{f"q.{i}": np.asarray(e, np.float32) for i, e in energies.items()})


def load_energies(path, layers: range, kv_heads: int, head_dim: int) -> dict[int, np.ndarray]:
    """{layer: query energies} of `layers` from `path`; ModelLoadError naming what is missing or malformed."""
    try:
        with np.load(path, allow_pickle=False) as z:
            got = {int(name[2:]): z[name] for name in z.files if name.startswith("q.") and name[2:].isdigit()}
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read the K/V codec's query energies {path}: {exc}; export again") from None
    missing = [i for i in layers if i not in got]
    if missing:
        raise ModelLoadError(f"{path} has no query energies for layer(s) {missing}; export again")
    for i in layers:
        if got[i].shape != (kv_heads, head_dim) or not (np.isfinite(got[i]) & (got[i] >= 0)).all():
            raise ModelLoadError(f"{path}: the query energies of layer {i} are not ({kv_heads}, {head_dim}) finite values >= 0")
    return {i: got[i].astype(np.float64) for i in layers}


def energies_for(folder, plan, kv_heads: int, head_dim: int) -> dict[int, np.ndarray]:
    """The query energies a side of `plan` codes moved keys by, from its exported `folder`: {} when the plan moves
    nothing or moves K/V exactly."""
    from pathlib import Path

    from splitlm.model import names

    if not plan.split_moves or plan.move_codec.coder != "ans":
        return {}
    return load_energies(Path(folder) / names.KV_CODEC_FILE, range(plan.cloud_start, plan.split_layer), kv_heads, head_dim)
