"""The activation codec of DESIGN.md §4: threshold splitting (TS) + token-wise adaptive bits (TAB-Q).

One algorithm, two backends (`codec_ops`): numpy on the device, torch on the cloud;
frames and reconstructions are bit-identical between them.

Frame layout (little endian), version 1:

    header (14 bytes)  magic "SL" | version u8 | kind u8 (0 fp32, 1 fp16, 2 tabq) | group u16 |
                       log2 rotation block u8 (0 = none) | reserved u8 (must be 0) | rows T u32 | dim d u16
    fp32/fp16: T·d raw values.
    tabq:
      bits     u8[T]      width of each row: 2..6 or 8 = coded; 16 = raw fp16 row; 32 = raw fp32 row
      n_out    u16[T]     outliers taken out of each row (0 on raw rows)
      scales   f16[T·G]   per row and channel group (G = ceil(d / group), group 0 = whole row; 0 on raw rows)
      mins     f16[T·G]   ŷ = code · scale + min, then x̂ = H ŷ (blockwise Walsh-Hadamard, if rotated)
      out_idx  u16[N]     outlier channels, ascending within a row, rows in order (N = Σ n_out)
      out_val  f16[N]     outlier values
      codes    per row, d codes of `bits` bits packed LSB first, padded to a byte; raw rows: d fp16 or d fp32

Each row meets the error budget ε: the encoder picks the smallest coded width that does, else
raw fp16 when fp16 itself does (not so for rows in fp16's subnormal range), else raw fp32 (exact).
Raw rows carry no outliers: the decoder rejects outliers on a raw fp32 row, and applies those that
encoders before raw fp32 rows listed on raw fp16 rows (they equal the row's own fp16 values).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from splitlm.errors import CodecError
from splitlm.quantize import bitpack
from splitlm.quantize.codec_ops import NumpyOps
from splitlm.quantize.config import CodecConfig

HEADER = struct.Struct("<2sBBHBBIH")
MAGIC = b"SL"
FRAME_VERSION = 1
KINDS = {"fp32": 0, "fp16": 1, "tabq": 2, "ans": 3}
"""Frame kinds (ans: transform coding with a calibrated basis and ANS, quantize/ans.py)."""
KIND_NAMES = {v: k for k, v in KINDS.items()}
RAW_ROW = 16
"""Row width of a raw fp16 row."""
RAW32_ROW = 32
"""Row width of a raw fp32 row: exact, for rows whose fp16 form misses the budget."""
ROW_BITS = (2, 3, 4, 5, 6, 8, RAW_ROW, RAW32_ROW)
MAX_DIM = 65535

_ops_cache: dict[str, Any] = {"numpy": NumpyOps()}


def get_ops(backend: str):
    """'numpy' or 'torch'."""
    if backend not in _ops_cache:
        if backend != "torch":
            raise CodecError(f"codec backend {backend!r} is not one of ('numpy', 'torch')")
        from splitlm.quantize.codec_torch import TorchOps  # the one way torch enters the codec

        _ops_cache["torch"] = TorchOps()
    return _ops_cache[backend]


_VALID_WIDTH = np.zeros(256, bool)
_VALID_WIDTH[list(ROW_BITS)] = True


def _row_bytes(bits: np.ndarray, d: int) -> np.ndarray:
    """Payload bytes of rows of these widths: d codes packed to a byte (raw rows: 2·d or 4·d)."""
    return (d * bits.astype(np.int64) + 7) // 8


@dataclass(frozen=True)
class FrameLayout:
    """A parsed and validated frame's side information (numpy arrays)."""

    kind: str
    rows: int
    dim: int
    group: int
    groups: int
    rotate: int
    """Walsh-Hadamard block size (0 = no rotation)."""
    bits: np.ndarray
    n_out: np.ndarray
    scales: np.ndarray
    mins: np.ndarray
    out_idx: np.ndarray
    out_val: np.ndarray
    payload_offset: int
    row_offsets: np.ndarray
    """Start of each row's codes in the frame, plus the end: (T+1,)."""
    ans: Any = None
    """An ans frame's own layout (quantize.ans.Layout)."""


def parse_frame(buf: bytes, max_rows: int | None = None, kind: str | None = None,
                dim: int | None = None) -> FrameLayout:
    """Check a frame's structure and read its side information; CodecError naming what is wrong.
    `kind` (the plan's codec) and `dim` (the model's hidden size), when given, are what the receiver
    expects: a frame of another kind or hidden size is refused from its header, before the rest is read."""
    if len(buf) < HEADER.size:
        raise CodecError(f"frame of {len(buf)} bytes is shorter than its {HEADER.size}-byte header")
    magic, version, kind_code, group, rot_log2, reserved, T, d = HEADER.unpack_from(buf, 0)
    if magic != MAGIC:
        raise CodecError(f"frame magic {magic!r} is not {MAGIC!r}: not an activation frame")
    if version != FRAME_VERSION:
        raise CodecError(f"frame version {version} is not supported (expected {FRAME_VERSION})")
    if reserved:
        raise CodecError(f"frame reserved header byte is {reserved}, must be 0")
    if kind_code not in KIND_NAMES:
        raise CodecError(f"frame kind {kind_code} is not one of {KINDS}")
    if kind is not None and KIND_NAMES[kind_code] != kind:
        raise CodecError(f"frame kind {KIND_NAMES[kind_code]!r} is not the plan's codec {kind!r}")
    if dim is not None and d != dim:
        raise CodecError(f"frame hidden size {d} does not match the model's {dim}")
    rotate = 1 << rot_log2 if rot_log2 else 0
    if rot_log2 > 15 or (rotate and d % rotate):
        raise CodecError(f"frame rotation block 2^{rot_log2} does not divide dim {d}")
    if T < 1 or not 1 <= d <= MAX_DIM:
        raise CodecError(f"frame shape ({T}, {d}) is invalid: need rows >= 1 and 1 <= dim <= {MAX_DIM}")
    if max_rows is not None and T > max_rows:
        raise CodecError(f"frame has {T} rows, the limit is {max_rows}")
    kind = KIND_NAMES[kind_code]
    off = HEADER.size
    if kind == "ans":
        from splitlm.quantize import ans

        if group or rot_log2:
            raise CodecError(f"ans frame header has group {group} and rotation {rot_log2}: both must be 0")
        empty = np.zeros(0)
        return FrameLayout(kind, T, d, 0, 0, 0, empty, empty, empty, empty, empty, empty, off, np.array([off]),
                           ans.parse(buf, T, d, off))
    if kind in ("fp32", "fp16"):
        width = 4 if kind == "fp32" else 2
        if len(buf) != off + T * d * width:
            raise CodecError(f"{kind} frame of shape ({T}, {d}) must be {off + T * d * width} bytes, got {len(buf)}")
        empty = np.zeros(0)
        return FrameLayout(kind, T, d, 0, 0, 0, empty, empty, empty, empty, empty, empty, off, np.array([off]))
    if group > d:
        raise CodecError(f"frame group size {group} exceeds dim {d}")
    G = -(-d // (group or d))
    side = T + 2 * T + 4 * T * G
    if len(buf) < off + side:
        raise CodecError(f"tabq frame of shape ({T}, {d}) is truncated inside its side information")
    bits = np.frombuffer(buf, np.uint8, T, off)
    n_out = np.frombuffer(buf, "<u2", T, off + T)
    bad = ~_VALID_WIDTH[bits]
    if bad.any():
        raise CodecError(f"row {int(np.argmax(bad))} has bit width {int(bits[bad][0])}, allowed {ROW_BITS}")
    if (n_out > d).any():
        row = int(np.argmax(n_out > d))
        raise CodecError(f"row {row} claims {int(n_out[row])} outliers in {d} channels")
    raw32_out = (bits == RAW32_ROW) & (n_out > 0)
    if raw32_out.any():
        row = int(np.argmax(raw32_out))
        raise CodecError(f"raw fp32 row {row} lists {int(n_out[row])} outliers, must list 0")
    scales = np.frombuffer(buf, "<f2", T * G, off + 3 * T).reshape(T, G)
    mins = np.frombuffer(buf, "<f2", T * G, off + 3 * T + 2 * T * G).reshape(T, G)
    N = int(n_out.astype(np.int64).sum())
    off += side
    row_sizes = _row_bytes(bits, d)
    expected = off + 4 * N + int(row_sizes.sum())
    if len(buf) != expected:
        raise CodecError(f"tabq frame of shape ({T}, {d}) with {N} outliers must be {expected} bytes, got {len(buf)}")
    out_idx = np.frombuffer(buf, "<u2", N, off)
    out_val = np.frombuffer(buf, "<f2", N, off + 2 * N)
    if N and (out_idx >= d).any():
        raise CodecError(f"outlier channel {int(out_idx.max())} is outside [0, {d})")
    if N > 1:
        starts = np.repeat(np.cumsum(n_out.astype(np.int64)) - n_out, n_out)
        pos = np.arange(N) - starts
        if ((np.diff(out_idx.astype(np.int64)) <= 0) & (pos[1:] > 0)).any():
            raise CodecError("outlier channels within a row must be strictly ascending")
    finite = np.isfinite(scales).all() and np.isfinite(mins).all() and (not N or np.isfinite(out_val).all())
    if not finite:
        raise CodecError("frame carries non-finite (NaN/Inf) scales, mins or outlier values")
    offsets = off + 4 * N + np.concatenate(([0], np.cumsum(row_sizes)))
    _check_raw_rows(buf, bits, offsets, d)
    return FrameLayout(kind, T, d, group, G, rotate, bits, n_out, scales, mins, out_idx, out_val, off + 4 * N, offsets)


def concat_frames(bufs: list[bytes]) -> bytes:
    """One frame holding the rows of `bufs` in order, byte for byte (no row is decoded or re-encoded):
    it decodes to the concatenation of their decodings. The frames must share kind, dim, group and
    rotation (one plan's frames do); CodecError otherwise."""
    if not bufs:
        raise CodecError("no frames to concatenate")
    lays = [parse_frame(b) for b in bufs]
    first = lays[0]
    for i, lay in enumerate(lays[1:], 1):
        if (lay.kind, lay.dim, lay.group, lay.rotate) != (first.kind, first.dim, first.group, first.rotate):
            raise CodecError(f"frame {i} ({lay.kind}, dim {lay.dim}, group {lay.group}, rotation {lay.rotate}) does not "
                             f"match frame 0 ({first.kind}, dim {first.dim}, group {first.group}, rotation {first.rotate})")
    T = sum(lay.rows for lay in lays)
    if T > 0xFFFFFFFF:
        raise CodecError(f"{T} rows do not fit one frame")
    if first.kind == "ans":
        from splitlm.quantize import ans

        return ans.concat(bufs, [lay.ans for lay in lays])
    header = _header(first.kind, first.group, T, first.dim, first.rotate)
    if first.kind in ("fp32", "fp16"):
        return header + b"".join(b[HEADER.size:] for b in bufs)
    parts = [header]
    for name, dtype in (("bits", np.uint8), ("n_out", "<u2"), ("scales", "<f2"), ("mins", "<f2"), ("out_idx", "<u2"),
                        ("out_val", "<f2")):
        parts += [np.ascontiguousarray(getattr(lay, name), dtype).tobytes() for lay in lays]
    parts += [b[lay.payload_offset:] for b, lay in zip(bufs, lays)]
    return b"".join(parts)


def _check_raw_rows(buf: bytes, bits: np.ndarray, offsets: np.ndarray, d: int) -> None:
    """CodecError naming the first raw row of a tabq frame that carries a NaN or Inf."""
    if int(bits.max()) < RAW_ROW:
        return
    data = np.frombuffer(buf, np.uint8)
    for width, dtype in ((RAW_ROW, "<f2"), (RAW32_ROW, "<f4")):
        sel = np.nonzero(bits == width)[0]
        if len(sel):
            raw = data[offsets[sel][:, None] + np.arange(width // 8 * d)].view(dtype)  # (n, d)
            bad = ~np.isfinite(raw).all(1)
            if bad.any():
                raise CodecError(f"frame carries non-finite (NaN/Inf) values in raw row {int(sel[np.argmax(bad)])}")


def _dequant(codes, scale16, min16, d: int, g: int, ops):
    """codes (n, d) -> x̂ (n, d) float32 with per-group fp16 scale/min (n, G)."""
    n, G = scale16.shape
    q = ops.cast(codes, ops.f32)
    if G * g > q.shape[1]:
        q = ops.concat([q, ops.zeros((n, G * g - q.shape[1]), ops.f32)], 1)
    q = q.reshape(n, G, g)
    return _dequant_groups(q, scale16, min16, ops).reshape(n, G * g)[:, :d]


def _header(kind: str, group: int, T: int, d: int, rotate: int = 0) -> bytes:
    return HEADER.pack(MAGIC, FRAME_VERSION, KINDS[kind], group, rotate.bit_length() - 1 if rotate else 0, 0, T, d)


def _rotation_block(d: int, requested: int) -> int:
    """Largest power of two <= requested that divides d (0 or 1 mean no rotation)."""
    block = requested
    while block > 1 and d % block:
        block //= 2
    return block if block > 1 else 0


def _hadamard(x, block: int, ops):
    """Orthonormal blockwise Walsh-Hadamard transform of rows x (T, d); its own inverse.

    Butterflies of elementwise adds, so numpy and torch agree bit for bit."""
    T, d = x.shape
    y = x.reshape(T * (d // block), block)
    h = 1
    while h < block:
        y = y.reshape(-1, block // (2 * h), 2, h)
        a, b = y[:, :, 0, :], y[:, :, 1, :]
        y = ops.stack([a + b, a - b], 2)
        h *= 2
    return y.reshape(T, d) * float(np.float32(1.0 / np.sqrt(block)))


def frame_kind(cfg: CodecConfig) -> str:
    """The kind of the frames a codec config writes (tabq with entropy 'ans' writes "ans" frames)."""
    return "ans" if cfg.coder == "ans" else cfg.kind


def encode(x: Any, cfg: CodecConfig, backend: str = "numpy", basis: Any = None) -> bytes:
    """Encode hidden states x (T, d) into one frame. `basis`: the split layer's calibrated basis
    (quantize.ans.Basis), which entropy 'ans' codes in."""
    ops = get_ops(backend)
    x = ops.asarray(x, ops.f32)
    if len(x.shape) != 2 or x.shape[0] < 1 or not 1 <= x.shape[1] <= MAX_DIM:
        raise CodecError(f"activations must be (rows >= 1, 1 <= dim <= {MAX_DIM}), got shape {tuple(x.shape)}")
    if not ops.isfinite_all(x):
        raise CodecError("activations contain NaN or Inf")
    if frame_kind(cfg) == "ans":
        from splitlm.quantize import ans

        if basis is None:
            raise CodecError("entropy 'ans' codes rows in the split layer's calibrated basis, and none was given "
                             "(an export carries it in codec_basis.npz)")
        return ans.encode(ops.numpy(x), basis, cfg.error_budget, cfg.deadzone, checked=True)
    T, d = x.shape
    if cfg.kind == "fp32":
        return _header("fp32", 0, T, d) + ops.tobytes(x)
    if float(ops.amax(ops.amax(abs(x), 1), 0)) > 65504.0:
        raise CodecError("activations exceed the fp16 range (|x| > 65504)")
    x16 = ops.cast(x, ops.f16)
    if cfg.kind == "fp16":
        return _header("fp16", 0, T, d) + ops.tobytes(x16)
    with np.errstate(over="ignore", invalid="ignore"):  # a row whose rotated range overflows fp16 goes raw
        return _encode_tabq(x, x16, cfg, ops)


def _outlier_mask(x, x64, cfg: CodecConfig, ops):
    T, d = x.shape
    if cfg.ts_rule == "std":
        mean = ops.sum(x64, 1) / d
        var = ops.sum((x64 - mean[:, None]) ** 2, 1) / d
        return x64 * x64 > (cfg.ts_threshold ** 2) * var[:, None]
    mask = np.zeros((T, d), dtype=bool)
    if cfg.ts_rule == "channels" and cfg.ts_channels:
        chans = np.asarray(cfg.ts_channels)
        if chans.max() >= d:
            raise CodecError(f"outlier channel {int(chans.max())} is outside the hidden size {d}")
        mask[:, chans] = True
    return ops.asarray(mask, ops.bool)


def _encode_tabq(x, x16, cfg: CodecConfig, ops) -> bytes:
    """Per row, the smallest coded width that meets ε, else raw fp16 if it meets ε, else raw fp32."""
    T, d = x.shape
    g = min(cfg.group_size or d, d)
    G = -(-d // g)
    pad = G * g - d
    rotate = _rotation_block(d, cfg.rotate_block)
    x64 = ops.cast(x, ops.f64)
    mask = _outlier_mask(x, x64, cfg, ops)
    x_in = ops.where(mask, 0.0, x)  # inliers; outliers travel apart
    y = _hadamard(x_in, rotate, ops) if rotate else x_in
    if pad:
        y = ops.concat([y, ops.zeros((T, pad), ops.f32)], 1)
    yg = y.reshape(T, G, g)
    y64 = ops.cast(yg, ops.f64)
    lo, hi = ops.amin(yg, 2), ops.amax(yg, 2)  # (T, G)
    x_out = ops.cast(x16, ops.f32)
    out_err = ops.sum(ops.where(mask, (x64 - ops.cast(x_out, ops.f64)) ** 2, 0.0), 1)
    den = ops.sum(ops.where(mask, 0.0, x64 * x64), 1)  # the budget is relative to the inlier energy
    chosen = ops.full((T,), RAW32_ROW, ops.i64)
    candidates = {}
    for b in cfg.bit_widths:
        trials = [_quantize_groups(yg, lo * c, hi * c, b, ops) for c in cfg.clip_ratios]
        errs = ops.stack([ops.sum((y64 - ops.cast(_dequant_groups(q, s16, m16, ops), ops.f64)) ** 2, 2)
                          for q, s16, m16 in trials], 0)  # (C, T, G)
        best = ops.argmin(errs, 0)  # (T, G)
        q = ops.take(ops.stack([t[0] for t in trials], 0), best[None, :, :, None], 0)[0]  # (T, G, g)
        s16 = ops.take(ops.stack([t[1] for t in trials], 0), best[None], 0)[0]
        m16 = ops.take(ops.stack([t[2] for t in trials], 0), best[None], 0)[0]
        err = ops.sum(ops.take(errs, best[None], 0)[0], 1) + out_err
        ok = (err <= cfg.error_budget * den) & ops.isfinite_rows(s16) & ops.isfinite_rows(m16)
        candidates[b] = (ops.cast(q.reshape(T, G * g)[:, :d], ops.i64), s16, m16)
        chosen = ops.where(ok & (chosen == RAW32_ROW), b, chosen)
    # a raw row carries no outliers, so its budget is relative to the whole row
    raw16_err = ops.sum((x64 - ops.cast(x_out, ops.f64)) ** 2, 1)
    raw16_ok = raw16_err <= cfg.error_budget * ops.sum(x64 * x64, 1)
    chosen = ops.where(raw16_ok & (chosen == RAW32_ROW), RAW_ROW, chosen)
    return _assemble(x, x16, mask, chosen, candidates, g, G, rotate, ops)


def _quantize_groups(yg, lo, hi, b: int, ops):
    """Asymmetric b-bit codes of yg (T, G, g) over [lo, hi] per group, with fp16 scale/min covering it."""
    maxq = float(2 ** b - 1)
    m16 = ops.cast(lo, ops.f16)
    m16 = ops.where(ops.cast(m16, ops.f32) > lo, ops.nextafter_down(m16), m16)  # round down: covers lo
    m32 = ops.cast(m16, ops.f32)
    s = (hi - m32) / maxq
    s16 = ops.cast(s, ops.f16)
    s16 = ops.where(ops.cast(s16, ops.f32) < s, ops.nextafter_up(s16), s16)  # round up: covers hi
    s32 = ops.cast(s16, ops.f32)
    safe = ops.where(s32 > 0, s32, 1.0)
    q = ops.clip(ops.rint((yg - m32[:, :, None]) / safe[:, :, None]), 0.0, maxq)
    return q, s16, m16


def _dequant_groups(q, s16, m16, ops):
    """codes (n, G, g) float32 -> values with per-group fp16 scale/min (n, G)."""
    return q * ops.cast(s16, ops.f32)[:, :, None] + ops.cast(m16, ops.f32)[:, :, None]


def _assemble(x, x16, mask, chosen, candidates, g: int, G: int, rotate: int, ops) -> bytes:
    """The tabq frame of rows x (T, d) at widths `chosen` (T,), coded rows from `candidates[width]`."""
    T, d = x16.shape
    bits = ops.numpy(chosen).astype(np.uint8)
    raw = (bits == RAW_ROW) | (bits == RAW32_ROW)
    mask_np = ops.numpy(mask) & ~raw[:, None]  # raw rows send every value in place
    x16_np = ops.numpy(x16)
    rows, cols = np.nonzero(mask_np)
    n_out = mask_np.sum(1).astype("<u2")
    scales = np.zeros((T, G), "<f2")
    mins = np.zeros((T, G), "<f2")
    row_sizes = _row_bytes(bits, d)
    offsets = np.concatenate(([0], np.cumsum(row_sizes)))
    payload = np.zeros(int(offsets[-1]), np.uint8)
    for b in np.unique(bits):
        sel = np.nonzero(bits == b)[0]
        if b == RAW_ROW:
            data = x16_np[sel].astype("<f2").view(np.uint8).reshape(len(sel), 2 * d)
        elif b == RAW32_ROW:
            data = ops.numpy(x)[sel].astype("<f4").view(np.uint8).reshape(len(sel), 4 * d)
        else:
            codes, s16, m16 = candidates[int(b)]
            data = ops.numpy(bitpack.pack(codes[ops.asarray(sel, ops.i64)], int(b), ops))
            scales[sel] = ops.numpy(s16)[sel]
            mins[sel] = ops.numpy(m16)[sel]
        payload[offsets[sel][:, None] + np.arange(data.shape[1])] = data
    parts = [_header("tabq", 0 if g == d else g, T, d, rotate), bits.tobytes(), n_out.tobytes(), scales.tobytes(),
             mins.tobytes(), cols.astype("<u2").tobytes(), x16_np[rows, cols].astype("<f2").tobytes(), payload.tobytes()]
    return b"".join(parts)


def _decode_ans(bufs: list[bytes], lays: list[FrameLayout], bases: Any, ops) -> list:
    """ans frames coded at one split layer, decoded as one batch against its basis: `bases` is one Basis or
    {layer: Basis}."""
    from splitlm.quantize import ans

    if bases is None:
        raise CodecError("an ans frame decodes against its calibrated basis (quantize.ans.decode), not alone")
    layer = lays[0].ans.layer
    basis = bases if isinstance(bases, ans.Basis) else bases.get(layer)
    if basis is None:
        raise CodecError(f"the frame was coded at split layer {layer}, and this side holds codec bases for "
                         f"{sorted(bases)} only")
    xs = ans.decode_batch(bufs, [lay.ans for lay in lays], basis, getattr(ops, "rotate_back", None))
    return [ops.asarray(x, ops.f32) for x in xs]


def decode(buf: bytes, backend: str = "numpy", layout: FrameLayout | None = None, max_rows: int | None = None,
           bases: Any = None):
    """Frame -> x̂ (T, d) float32, exactly the encoder's reconstruction. `layout`: the frame
    already parsed (`parse_frame`), so that it is not parsed again. `bases`: the calibrated basis (or
    {layer: basis}) that ans frames decode against."""
    ops = get_ops(backend)
    lay = layout or parse_frame(buf, max_rows)
    if lay.kind == "ans":
        return _decode_ans([buf], [lay], bases, ops)[0]
    if lay.kind != "tabq":
        return _decode_raw(buf, lay, ops)
    return _decode_rows(np.frombuffer(buf, np.uint8), lay.row_offsets[:-1], lay.bits, lay.scales, lay.mins,
                        lay.n_out, lay.out_idx, lay.out_val, lay.dim, lay.group or lay.dim, lay.rotate, ops)


def decode_many(bufs: list[bytes], backend: str = "numpy", layouts: list[FrameLayout] | None = None,
                max_rows: int | None = None, bases: Any = None) -> list:
    """Frames -> their x̂ (T_i, d_i) float32: the rows of all tabq frames of one shape (dim, group, rotation)
    are decoded together, as one batch, each bit-identical to `decode` of that frame; so are the ans frames
    of one split layer (`ans.decode_batch`: equal to `decode` to float64 rounding).
    `layouts`: the frames already parsed (`parse_frame`), so that none is parsed again."""
    ops = get_ops(backend)
    lays = layouts if layouts is not None else [parse_frame(buf, max_rows) for buf in bufs]
    if len(lays) != len(bufs):
        raise CodecError(f"{len(bufs)} frames come with {len(lays)} layouts")
    out: list = [None] * len(bufs)
    shapes: dict[tuple[int, int, int], list[int]] = {}
    layers: dict[int, list[int]] = {}
    for i, lay in enumerate(lays):
        if lay.kind == "tabq":
            shapes.setdefault((lay.dim, lay.group, lay.rotate), []).append(i)
        elif lay.kind == "ans":
            layers.setdefault(lay.ans.layer, []).append(i)
        else:
            out[i] = _decode_raw(bufs[i], lay, ops)
    for idx in layers.values():
        for i, x in zip(idx, _decode_ans([bufs[i] for i in idx], [lays[i] for i in idx], bases, ops)):
            out[i] = x
    for (d, group, rotate), idx in shapes.items():
        if len(idx) == 1:
            out[idx[0]] = decode(bufs[idx[0]], backend, lays[idx[0]])
            continue
        parts, starts, base = [], [], 0
        for i in idx:  # every frame's row payload back to back; row starts shifted to match
            lay = lays[i]
            size = int(lay.row_offsets[-1]) - lay.payload_offset
            parts.append(np.frombuffer(bufs[i], np.uint8, size, lay.payload_offset))
            starts.append(lay.row_offsets[:-1].astype(np.int64) - lay.payload_offset + base)
            base += size
        sel = [lays[i] for i in idx]
        x = _decode_rows(np.concatenate(parts), np.concatenate(starts), np.concatenate([s.bits for s in sel]),
                         np.concatenate([s.scales for s in sel]), np.concatenate([s.mins for s in sel]),
                         np.concatenate([s.n_out for s in sel]), np.concatenate([s.out_idx for s in sel]),
                         np.concatenate([s.out_val for s in sel]), d, group or d, rotate, ops)  # (ΣT_i, d)
        ends = np.cumsum([s.rows for s in sel])
        for i, stop, rows in zip(idx, ends, (s.rows for s in sel)):
            out[i] = x[int(stop) - rows:int(stop)]
    return out


def _decode_raw(buf: bytes, lay: FrameLayout, ops):
    """An fp32 or fp16 frame -> (T, d) float32."""
    T, d = lay.rows, lay.dim
    raw = np.frombuffer(buf, "<f4" if lay.kind == "fp32" else "<f2", T * d, lay.payload_offset).reshape(T, d)
    if not np.isfinite(raw).all():
        raise CodecError("frame carries non-finite (NaN/Inf) values")
    return ops.cast(ops.asarray(raw, ops.f16 if lay.kind == "fp16" else ops.f32), ops.f32)


def _decode_rows(data: np.ndarray, starts: np.ndarray, bits: np.ndarray, scales: np.ndarray, mins: np.ndarray,
                 n_out: np.ndarray, out_idx: np.ndarray, out_val: np.ndarray, d: int, g: int, rotate: int, ops):
    """Rows of tabq frames -> (R, d) float32. data: uint8 bytes holding the rows' codes, each row's
    starting at starts[r]; bits, n_out (R,), scales, mins (R, G); out_idx, out_val: outliers of the
    rows in order. Every step is row by row, so a row decodes the same in any batch."""
    out = ops.zeros((len(bits), d), ops.f32)
    for b in np.unique(bits):
        sel = np.nonzero(bits == b)[0]
        size = int(_row_bytes(np.array([b]), d)[0])
        rows_bytes = data[starts[sel][:, None] + np.arange(size)]
        sel_t = ops.asarray(sel, ops.i64)
        if b in (RAW_ROW, RAW32_ROW):  # parse_frame checked that they are finite
            raw = rows_bytes.view("<f2" if b == RAW_ROW else "<f4").reshape(len(sel), d)
            out[sel_t] = ops.cast(ops.asarray(raw, ops.f16 if b == RAW_ROW else ops.f32), ops.f32)
        else:
            codes = bitpack.unpack(ops.asarray(rows_bytes, ops.u8), d, int(b), ops)
            y = _dequant(codes, ops.asarray(scales[sel], ops.f16), ops.asarray(mins[sel], ops.f16), d, g, ops)
            out[sel_t] = _hadamard(y, rotate, ops) if rotate else y
    if len(out_idx):
        rows = np.repeat(np.arange(len(bits)), n_out.astype(np.int64))
        out[ops.asarray(rows, ops.i64), ops.asarray(out_idx.astype(np.int64), ops.i64)] = ops.cast(
            ops.asarray(out_val, ops.f16), ops.f32)
    return out


@dataclass(frozen=True)
class FrameStats:
    bytes: int
    rows: int
    bytes_per_token: float
    mean_bits: float
    """Average row width (raw rows count as 16 or 32)."""
    outliers_per_token: float


def frame_stats(buf: bytes) -> FrameStats:
    lay = parse_frame(buf)
    if lay.kind != "tabq":
        width = 32 if lay.kind == "fp32" else 16
        return FrameStats(len(buf), lay.rows, len(buf) / lay.rows, width, 0.0)
    return FrameStats(len(buf), lay.rows, len(buf) / lay.rows, float(lay.bits.mean()), float(lay.n_out.mean()))
