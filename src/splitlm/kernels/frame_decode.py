"""Activation frame decode (DESIGN.md §4 frames) for a batch of frames at once.

Frames are parsed and validated on the host (`codec.parse_frame`); their rows are then
concatenated and one kernel launch per batch unpacks each row's variable-width codes,
dequantizes them with the row's per-group fp16 scale/min, applies the inverse blockwise
Walsh-Hadamard rotation and scatters the threshold-split outliers. Raw rows are read as
fp16 (width 16) or fp32 (width 32). `decode_rows_reference` is the torch reference with the
same signature.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from splitlm.errors import CodecError
from splitlm.kernels.wq_matmul import check_triton_device
from splitlm.quantize import codec

try:  # the kernel needs triton; the reference does not
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None

KERNEL_MAX_ROTATE = 256
"""Largest rotation block the kernel takes (it holds a block x block sign tile); larger ones,
which frames may name (up to 2^15), are decoded by the reference."""


@dataclass
class FrameBatch:
    """The rows of several frames, laid out for one launch (tensors on one device)."""

    payload: torch.Tensor
    """uint8: every frame's code bytes back to back, plus one pad byte (a code may straddle two bytes)."""
    row_offsets: torch.Tensor
    """int64 (R,): where each row's codes start in payload."""
    bits: torch.Tensor
    """int32 (R,): each row's code width (2..8), or 16 / 32 for a raw fp16 / fp32 row."""
    scales: torch.Tensor
    """float16 (R, G)."""
    mins: torch.Tensor
    """float16 (R, G)."""
    out_start: torch.Tensor
    """int64 (R,): each row's first outlier in out_idx / out_val."""
    n_out: torch.Tensor
    """int32 (R,): outliers of each row."""
    out_idx: torch.Tensor
    """int32 (N,): outlier channels."""
    out_val: torch.Tensor
    """float16 (N,): outlier values."""
    dim: int
    group: int
    """Channels per scale group."""
    rotate: int
    """Walsh-Hadamard block (0 = none)."""
    rows: list[int]
    """Rows of each frame, in order."""


def batch_frames(frames: list[bytes], device: torch.device | str = "cpu", max_rows: int | None = None,
                 layouts: list[codec.FrameLayout] | None = None) -> FrameBatch:
    """Parse and validate tabq frames (one model: same dim, group and rotation) into one FrameBatch.
    `layouts`: the frames already parsed (parse_frame), so that no frame is parsed twice."""
    if not frames:
        raise CodecError("no frames to decode")
    layouts = layouts if layouts is not None else [codec.parse_frame(f, max_rows) for f in frames]
    first = layouts[0]
    for i, lay in enumerate(layouts):
        if lay.kind != "tabq":
            raise CodecError(f"frame {i} is {lay.kind}, the batched decoder takes tabq frames")
        if (lay.dim, lay.group, lay.rotate) != (first.dim, first.group, first.rotate):
            raise CodecError(f"frame {i} has (dim, group, rotation) {(lay.dim, lay.group, lay.rotate)}, "
                             f"frame 0 has {(first.dim, first.group, first.rotate)}")
    payloads, offsets, base = [], [], 0
    for buf, lay in zip(frames, layouts):
        start, end = lay.payload_offset, int(lay.row_offsets[-1])
        payloads.append(np.frombuffer(buf, np.uint8, end - start, start))
        offsets.append(lay.row_offsets[:-1].astype(np.int64) - start + base)
        base += end - start
    payloads.append(np.zeros(1, np.uint8))
    n_out = np.concatenate([lay.n_out.astype(np.int64) for lay in layouts])
    out_start = np.concatenate(([0], np.cumsum(n_out)[:-1])).astype(np.int64)

    def put(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(device=device, dtype=dtype)

    return FrameBatch(
        put(np.concatenate(payloads), torch.uint8), put(np.concatenate(offsets), torch.int64),
        put(np.concatenate([lay.bits for lay in layouts]).astype(np.int32), torch.int32),
        put(np.concatenate([lay.scales for lay in layouts]).astype(np.float16), torch.float16),
        put(np.concatenate([lay.mins for lay in layouts]).astype(np.float16), torch.float16),
        put(out_start, torch.int64), put(n_out.astype(np.int32), torch.int32),
        put(np.concatenate([lay.out_idx for lay in layouts]).astype(np.int32), torch.int32),
        put(np.concatenate([lay.out_val for lay in layouts]).astype(np.float16), torch.float16),
        first.dim, first.group or first.dim, first.rotate, [lay.rows for lay in layouts])


def decode_rows_reference(b: FrameBatch) -> torch.Tensor:
    """torch reference: (R, d) float32, exactly `codec.decode` of each frame, rows concatenated."""
    R, d = b.bits.shape[0], b.dim
    c = torch.arange(d, device=b.payload.device)
    bits = b.bits.to(torch.int64)[:, None]  # (R, 1): a row's width is its bits per value, raw rows too
    raw16, raw32 = bits == codec.RAW_ROW, bits == codec.RAW32_ROW
    bitpos = c[None, :] * bits  # (R, d)
    byte = b.row_offsets[:, None] + bitpos // 8
    word = b.payload[byte].to(torch.int64) | (b.payload[byte + 1].to(torch.int64) << 8)
    q = (word >> (bitpos % 8)) & ((1 << torch.where(raw16 | raw32, 8, bits)) - 1)
    g = c // b.group
    y = q.to(torch.float32) * b.scales.to(torch.float32)[:, g] + b.mins.to(torch.float32)[:, g]
    if b.rotate:
        y = codec._hadamard(y, b.rotate, codec.get_ops("torch"))
    high = torch.where(raw32, byte + 2, 0)  # only raw fp32 rows have a high half-word
    word32 = word | (b.payload[high].to(torch.int64) << 16) | (b.payload[high + 1].to(torch.int64) << 24)
    fp32 = torch.where(word32 >= 1 << 31, word32 - (1 << 32), word32).to(torch.int32).view(torch.float32)
    fp16 = word.to(torch.int16).view(torch.float16).to(torch.float32)
    out = torch.where(raw16, fp16, torch.where(raw32, fp32, y))
    rows = torch.repeat_interleave(torch.arange(R, device=out.device), b.n_out.to(torch.int64))
    out[rows, b.out_idx.to(torch.int64)] = b.out_val.to(torch.float32)
    return out


if triton is not None:

    @triton.jit
    def _decode_rows_kernel(
        payload_ptr,  # uint8: code bytes of all rows (+1 pad byte)
        row_off_ptr,  # int64 (R,): byte offset of each row's codes
        bits_ptr,  # int32 (R,): code width of each row, 16 / 32 = raw fp16 / fp32 row
        scales_ptr,  # float16 (R, G): per-group scale
        mins_ptr,  # float16 (R, G): per-group minimum
        out_start_ptr,  # int64 (R,): first outlier of each row
        n_out_ptr,  # int32 (R,): outliers of each row
        out_idx_ptr,  # int32 (N,): outlier channels
        out_val_ptr,  # float16 (N,): outlier values
        y_ptr,  # float32 (R, D): output
        D,  # hidden size
        G,  # groups per row
        GROUP,  # channels per group
        inv_sqrt,  # float32 1/sqrt(BLOCK): the orthonormal Hadamard scale
        BLOCK: tl.constexpr,  # channels per program (= the rotation block when ROTATE)
        LOG2_BLOCK: tl.constexpr,  # log2(BLOCK)
        ROTATE: tl.constexpr,  # apply the inverse blockwise Walsh-Hadamard transform
        OUT_CHUNK: tl.constexpr,  # outliers examined per iteration
    ):
        row = tl.program_id(0)
        blk = tl.program_id(1)
        c = blk * BLOCK + tl.arange(0, BLOCK)
        live = c < D
        b = tl.load(bits_ptr + row)  # bits per value, raw rows too
        off = tl.load(row_off_ptr + row)
        bitpos = c.to(tl.int64) * b
        byte = off + bitpos // 8
        lo = tl.load(payload_ptr + byte, mask=live, other=0).to(tl.int32)
        hi = tl.load(payload_ptr + byte + 1, mask=live, other=0).to(tl.int32)
        word = lo | (hi << 8)
        if b == 32:
            b2 = tl.load(payload_ptr + byte + 2, mask=live, other=0).to(tl.int32)
            b3 = tl.load(payload_ptr + byte + 3, mask=live, other=0).to(tl.int32)
            val = (word | (b2 << 16) | (b3 << 24)).to(tl.float32, bitcast=True)
        elif b == 16:
            val = word.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        else:
            q = (word >> (bitpos % 8).to(tl.int32)) & ((1 << b) - 1)
            g = c // GROUP
            s = tl.load(scales_ptr + row * G + g, mask=live, other=0.0).to(tl.float32)
            m = tl.load(mins_ptr + row * G + g, mask=live, other=0.0).to(tl.float32)
            val = q.to(tl.float32) * s + m
            if ROTATE:
                # x_j = Σ_i y_i (-1)^popcount(i & j) / sqrt(BLOCK), Sylvester order like the butterflies
                i = tl.arange(0, BLOCK)
                ij = i[:, None] & i[None, :]
                parity = tl.zeros((BLOCK, BLOCK), dtype=tl.int32)
                for k in tl.static_range(LOG2_BLOCK):
                    parity = parity ^ ((ij >> k) & 1)
                sign = (1 - 2 * parity).to(tl.float32)
                val = tl.sum(val[:, None] * sign, axis=0) * inv_sqrt
        tl.store(y_ptr + row * D + c, val, mask=live)
        tl.debug_barrier()
        first = tl.load(out_start_ptr + row)
        n = tl.load(n_out_ptr + row)
        for o in range(0, n, OUT_CHUNK):
            j = o + tl.arange(0, OUT_CHUNK)
            jm = j < n
            idx = tl.load(out_idx_ptr + first + j, mask=jm, other=0)
            v = tl.load(out_val_ptr + first + j, mask=jm, other=0.0).to(tl.float32)
            mine = jm & (idx >= blk * BLOCK) & (idx < blk * BLOCK + BLOCK)
            tl.store(y_ptr + row * D + idx, v, mask=mine)


def decode_rows_triton(b: FrameBatch) -> torch.Tensor:
    """The Triton kernel: (R, d) float32, within rounding of `decode_rows_reference`."""
    if triton is None:
        raise CodecError("the Triton frame decoder needs triton installed")
    R, d = b.bits.shape[0], b.dim
    tensors = (b.payload, b.row_offsets, b.bits, b.scales, b.mins, b.out_start, b.n_out, b.out_idx, b.out_val)
    if len({t.device for t in tensors}) != 1:
        raise CodecError("frame batch tensors are on different devices")
    if not all(t.is_contiguous() for t in tensors):
        raise CodecError("frame batch tensors must be contiguous")
    check_triton_device(b.payload.device)
    if b.rotate > KERNEL_MAX_ROTATE:
        raise CodecError(f"rotation block {b.rotate} exceeds the frame kernel's {KERNEL_MAX_ROTATE}: "
                         "decode it with decode_rows_reference")
    y = torch.empty((R, d), dtype=torch.float32, device=b.payload.device)
    if R == 0:
        return y
    block = b.rotate if b.rotate else min(1024, triton.next_power_of_2(d))
    grid = (R, triton.cdiv(d, block))
    _decode_rows_kernel[grid](*tensors, y, d, b.scales.shape[1], b.group, float(np.float32(1.0 / np.sqrt(block))),
                              BLOCK=block, LOG2_BLOCK=block.bit_length() - 1, ROTATE=bool(b.rotate), OUT_CHUNK=32)
    return y


def decode_frames(frames: list[bytes], device: torch.device | str = "cpu", impl: str = "reference",
                  max_rows: int | None = None, layouts: list[codec.FrameLayout] | None = None) -> list[torch.Tensor]:
    """Decode frames to (T_i, d) float32 tensors on `device`: the tabq frames of one shape (dim,
    group, rotation) in one batched launch, fp16/fp32 frames by reinterpreting their bytes.
    impl: 'triton' or 'reference' (which 'triton' falls back to for rotation blocks above
    KERNEL_MAX_ROTATE). `layouts`: the frames already parsed, so that none is parsed again."""
    if impl not in ("triton", "reference"):
        raise CodecError(f"frame decode impl {impl!r} is not one of ('triton', 'reference')")
    lays = layouts if layouts is not None else [codec.parse_frame(f, max_rows) for f in frames]
    if len(lays) != len(frames):
        raise CodecError(f"{len(frames)} frames come with {len(lays)} layouts")
    out: list[torch.Tensor | None] = [None] * len(frames)
    shapes: dict[tuple[int, int, int], list[int]] = {}
    for i, lay in enumerate(lays):
        if lay.kind == "tabq":
            shapes.setdefault((lay.dim, lay.group, lay.rotate), []).append(i)
        else:
            out[i] = codec.decode(frames[i], "torch", lay).to(device)
    for idx in shapes.values():
        batch = batch_frames([frames[i] for i in idx], device, max_rows, [lays[i] for i in idx])
        kernel = impl == "triton" and batch.rotate <= KERNEL_MAX_ROTATE
        y = (decode_rows_triton if kernel else decode_rows_reference)(batch)
        for i, part in zip(idx, torch.split(y, batch.rows)):
            out[i] = part
    return out
