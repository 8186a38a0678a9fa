"""Transform coding of the split's activations: a calibrated basis, one uniform step per row, ANS (numpy).

The hidden states at a split layer are far from white: a few directions carry most of the energy (for
SmolLM2 at layer 10 the arithmetic-to-geometric mean ratio of the covariance's eigenvalues is worth
1.36 bits per element), and a few channels carry a large constant (massive activations). A basis
calibrated on text at that layer (`Basis.fit`: the mean and the covariance's eigenvectors) takes both
out. Each row is then

1. centred and rotated: y = Uᵀ (x − μ);
2. quantized with one uniform step Δ (a power of 2^(1/8), its index sent as a byte), the largest whose
   error meets the row's budget: ‖x − x̂‖² ≤ ε times the row's inlier energy (‖x − μ‖² without its
   outlier channels; the same error in either basis: U is orthonormal), searched for all rows at once
   (`_search`). Magnitudes round toward zero unless their fraction passes ½ + a dead zone (0.2 by default),
   and the decoder shrinks each symbol toward zero by the Laplace model's centroid offset: this costs the
   model far less perplexity than plain rounding at the same ε (SmolLM2, split 10, ε 0.035: +0.13 %
   against +1.6 %).
3. entropy coded with ANS (`constriction`) under a quantized Laplace model per component whose scale is
   the component's calibrated standard deviation times a per-row gain of its band of components (one
   byte per band, so that a row unlike the calibration text is still modelled well).

A row whose codes would leave the coder's symbol range goes raw (fp16 when that meets ε, else fp32).
The decoder reads the side information, decodes the symbols, and returns x̂ = μ + U ŷ.

Frame (little endian; the codec frame header of `codec.HEADER`, kind "ans"):

    header (14 bytes)  magic | version | kind 3 | group 0 | rotation 0 | reserved 0 | rows T | dim d
    basis  (8 bytes)   the basis's id (u32: its split layer) and the first 4 bytes of its sha256
    segments S u16, then per segment its rows u32 and its ANS words u32 (a frame joined from S frames
                       keeps their streams: `concat`)
    steps  u8[T]       Δ index k (Δ = 2^(k/8 − 24)) of each coded row; 254 = raw fp16 row, 255 = raw fp32 row
    gains  u8[T·B]     band gains j (g = 2^((j − 128)/8)) of each row (0 on raw rows)
    words  u32[...]    the segments' ANS streams, in order
    raw    the raw rows' values, in row order (fp16 or fp32)

Every field is checked before anything is decoded (CodecError naming it); a corrupt stream decodes to
symbols that fail the checks after it (a stream not used up exactly, values out of range), never a crash.
"""

from __future__ import annotations

import functools
import hashlib
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from splitlm.errors import CodecError
from splitlm.model import names

QMAX = 1 << 15
"""Symbols are coded in [-QMAX, QMAX]: a row whose codes leave that range goes raw."""
RAW16, RAW32 = 254, 255
"""Step indices that mark a raw fp16 and a raw fp32 row."""
STEP_BIAS = 24 * 8
MIN_SCALE = 1e-3
"""Laplace scales (in steps) are kept above this: the model must give every symbol a probability."""
BASIS = struct.Struct("<I4s")
SEGMENT = struct.Struct("<II")
BASIS_FILE = names.CODEC_BASIS_FILE


_STEPS = np.exp2((np.arange(256, dtype=np.float64) - STEP_BIAS) / 8.0)
_GAINS = np.exp2((np.arange(256, dtype=np.float64) - 128.0) / 8.0)
_STEPS32, _GAINS32 = _STEPS.astype(np.float32), _GAINS.astype(np.float32)
"""The same in float32, for the encoder's search (`_grid`)."""
_GAIN_EDGES = np.exp2((np.arange(1, 256, dtype=np.float64) - 128.5) / 4.0).astype(np.float32)
"""Mean squares where the band gain index steps up: index j = rint(8·log2 rms) + 128, clipped to [0, 255]."""


def step(k: np.ndarray) -> np.ndarray:
    """Δ of step index k (float64)."""
    return _STEPS[np.asarray(k, np.int64)]


def _bands(d: int) -> np.ndarray:
    """Band edges over the components in order of variance: 0, 4, 16, 64, 256, ..., d."""
    edges = [0]
    while edges[-1] < d:
        edges.append(min(d, max(4, edges[-1] * 4)))
    return np.array(edges, np.int64)


@dataclass(frozen=True)
class Basis:
    """A split layer's calibrated transform: mean, orthonormal basis (columns by descending variance) and
    the components' standard deviations."""

    layer: int
    mean: np.ndarray
    """(d,) float32."""
    vectors: np.ndarray
    """(d, d) float32, orthonormal columns."""
    std: np.ndarray
    """(d,) float32: each component's standard deviation on the calibration text."""
    weights: np.ndarray
    """(d,) float32: each component's step is Δ times its weight, (std / RMS std)^alpha: alpha 0 spends the
    error where it costs the fewest bits (the low-variance directions, which the next layers need more
    than their variance says), 1 gives every component the same relative error."""

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    @functools.cached_property
    def bands(self) -> np.ndarray:
        return _bands(self.dim)

    @functools.cached_property
    def _derived(self) -> tuple[np.ndarray, ...]:
        """(weights, 1 / std, Laplace scale per unit step and gain: std / weight / √2, band of each component,
        band starts, band sizes), float64, computed once."""
        w = self.weights.astype(np.float64)
        std = self.std.astype(np.float64)
        edges = self.bands
        return (w, 1.0 / np.maximum(std, 1e-30), std / w / np.sqrt(2.0), np.repeat(np.arange(len(edges) - 1), np.diff(edges)),
                edges[:-1], np.diff(edges).astype(np.float64))

    @functools.cached_property
    def _derived32(self) -> tuple[np.ndarray, ...]:
        """For the encoder's search, float32: (weights, weight / std, 1 / the Laplace scale per unit step and gain,
        band sizes)."""
        w, inv_std, unit, _, _, sizes = self._derived
        return (w.astype(np.float32), (w * inv_std).astype(np.float32), (1.0 / unit).astype(np.float32),
                sizes.astype(np.float32))

    @functools.cached_property
    def _band_sizes(self) -> np.ndarray:
        return np.diff(self.bands)

    @functools.cached_property
    def _vectors_t64(self) -> np.ndarray:
        """Uᵀ as float64, for the decoder's μ + U y (made once, not per frame)."""
        return np.ascontiguousarray(self.vectors.T, np.float64)

    @functools.cached_property
    def _unweighted(self) -> bool:
        """Whether every component has weight 1 (alpha 0, the default): a row's steps are then one number."""
        return bool((self.weights == 1).all())

    @functools.cached_property
    def digest(self) -> bytes:
        """The first 4 bytes of the sha256 of the basis: a frame names the basis it was coded with."""
        h = hashlib.sha256()
        for a in (self.mean, self.vectors, self.std, self.weights):
            h.update(np.ascontiguousarray(a, "<f4").tobytes())
        return h.digest()[:4]

    @classmethod
    def fit(cls, layer: int, h: np.ndarray, alpha: float = 0.0) -> "Basis":
        """The basis of activations `h` (N, d) at split layer `layer` (N of a few thousand rows is plenty). alpha:
        see `weights` (0, one step for every component, measured best: SmolLM2 split 10 at ε 0.02, +1.1 %
        perplexity at 196 B/token against +2.2 % at 205 with 0.5)."""
        h = np.asarray(h, np.float64)
        if h.ndim != 2 or h.shape[0] < 2:
            raise CodecError(f"a codec basis needs (rows >= 2, dim) activations, got shape {h.shape}")
        mean = h.mean(0)
        c = h - mean
        w, v = np.linalg.eigh(c.T @ c / len(c))
        order = np.argsort(w)[::-1]
        std = np.sqrt(np.maximum(w[order], 0.0))
        weights = np.maximum(std / np.sqrt((std ** 2).mean()), 1e-3) ** alpha
        return cls(layer, mean.astype(np.float32), np.ascontiguousarray(v[:, order], np.float32), std.astype(np.float32),
                   weights.astype(np.float32))

    def save(self, path: str | Path) -> None:
        np.savez(path, layer=np.int64(self.layer), mean=self.mean, vectors=self.vectors, std=self.std, weights=self.weights)

    @classmethod
    def load(cls, path: str | Path) -> "Basis":
        try:
            with np.load(path) as f:
                basis = cls(int(f["layer"]), f["mean"].astype(np.float32), f["vectors"].astype(np.float32),
                            f["std"].astype(np.float32), f["weights"].astype(np.float32))
        except (OSError, KeyError, ValueError) as exc:
            raise CodecError(f"cannot read the codec basis {path}: {exc}") from None
        return basis.checked(path)

    def checked(self, path: str | Path) -> "Basis":
        """This basis, when its shapes agree and its values are finite (and weights positive); else CodecError
        naming the file it was read from."""
        d = self.dim
        if (self.vectors.shape != (d, d) or self.std.shape != (d,) or self.weights.shape != (d,) or (self.weights <= 0).any()
                or not all(np.isfinite(a).all() for a in (self.mean, self.vectors, self.std, self.weights))):
            raise CodecError(f"the codec basis of layer {self.layer} in {path} is malformed (shapes {self.mean.shape}, "
                             f"{self.vectors.shape}, {self.std.shape}, {self.weights.shape}, or non-finite values)")
        return self


def save_bases(bases: dict[int, Basis], path: str | Path) -> None:
    """The bases of every split layer in one .npz (keys LAYER.mean, LAYER.vectors, LAYER.std, LAYER.weights)."""
    np.savez(path, **{f"{layer}.{name}": getattr(b, name) for layer, b in bases.items()
                      for name in ("mean", "vectors", "std", "weights")})


def load_bases(path: str | Path) -> dict[int, Basis]:
    """The bases save_bases wrote; CodecError naming the file when it is missing or malformed."""
    try:
        with np.load(path) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError) as exc:
        raise CodecError(f"cannot read the codec bases {path}: {exc}") from None
    bases = {}
    try:
        for layer in sorted({int(k.split(".")[0]) for k in arrays}):
            bases[layer] = Basis(layer, *(arrays[f"{layer}.{n}"].astype(np.float32) for n in ("mean", "vectors", "std", "weights")))
    except (KeyError, ValueError) as exc:
        raise CodecError(f"the codec bases {path} are malformed ({exc})") from None
    return {layer: b.checked(path) for layer, b in bases.items()}


def load_split_bases(folder: str | Path, splits: list[int]) -> dict[int, Basis]:
    """The bases an export folder carries for a plan whose sessions may run at `splits`; ModelLoadError saying to
    export again when the file is missing, malformed or lacks a split."""
    from splitlm.errors import ModelLoadError

    path = Path(folder) / BASIS_FILE
    if not path.exists():
        raise ModelLoadError(f"{folder}: the plan's codec codes in calibrated bases, and {BASIS_FILE} is missing; export again")
    try:
        bases = load_bases(path)
    except CodecError as exc:
        raise ModelLoadError(f"{folder}: {exc}; export again") from None
    missing = [layer for layer in splits if layer not in bases]
    if missing:
        raise ModelLoadError(f"{path} has no basis for split(s) {missing}; export again")
    return bases


def _model():
    import constriction

    return constriction.stream.model.QuantizedLaplace(-QMAX, QMAX)


def _scales(basis: Basis, gains: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """Laplace scales in steps (n, d) of rows with band gains (n, B) and steps (n,): std·g/Δ/√2."""
    _, _, unit, band_of, _, _ = basis._derived
    per = _GAINS[gains][:, band_of]  # (n, d)
    return np.maximum(unit * per / step(steps)[:, None], MIN_SCALE)


def _inlier_energy(c: np.ndarray, k: float = 4.0) -> np.ndarray:
    """Each row's energy without its outlier channels (|c| above k times the row's RMS): the budget's
    reference. A row with massive values (an attention sink) is then coded as finely as its other channels
    need, not as loosely as its largest values would allow."""
    c2 = np.square(c, dtype=np.float64)
    return np.where(c2 <= k * k * c2.mean(1, keepdims=True), c2, 0.0).sum(1)  # (the same sums as sum(where=), faster)


def _reconstruct(q: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """The centroid of each symbol's bin under its Laplace model (scale b in steps), in steps: |q| − δ toward
    zero with δ = ½ − b + 1/(e^(1/b) − 1), which lowers the error of a coarse component well below Δ²/12."""
    delta = 0.5 - scales + 1.0 / np.expm1(np.minimum(1.0 / scales, 700.0))  # e^700 is finite; δ is 0.5 there
    return q - np.sign(q) * np.clip(delta, 0.0, 0.5)  # q integral: sign(q)·(|q| − δ), and 0 for q = 0


def _code(y: np.ndarray, basis: Basis, k: np.ndarray, deadzone: float):
    """Rows y (n, d) in the basis at step indices k (n,): (symbols, band gains, reconstruction of y, Laplace scales
    of the symbols). Magnitudes round toward zero unless their fraction passes ½ + deadzone (a dead-zone quantizer)."""
    w, inv_std, _, _, starts, sizes = basis._derived
    s = step(k)[:, None] if basis._unweighted else step(k)[:, None] * w
    v = y / s
    q = np.sign(v) * np.floor(np.abs(v) + (0.5 - deadzone))
    rms = np.sqrt(np.add.reduceat(np.square(q * inv_std * s), starts, axis=1) / sizes)
    gains = np.clip(np.rint(8.0 * np.log2(np.maximum(rms, 1e-30))) + 128.0, 0, 255).astype(np.uint8)
    scales = _scales(basis, gains, k)
    return q, gains, _reconstruct(q, scales) * s, scales


def _meets(y: np.ndarray, basis: Basis, k: np.ndarray, budget: np.ndarray, deadzone: float) -> np.ndarray:
    """Whether each row of y (n, d) coded at step index k (n,) meets its budget (n,)."""
    yh = _code(y, basis, k, deadzone)[2]
    return ((y - yh) ** 2).sum(1) <= budget


REFINE = 3
"""Step indices at and below the plain-reconstruction search's answer that are tried with the full reconstruction."""


def _plain_error(y: np.ndarray, w: np.ndarray, k: np.ndarray, deadzone: float) -> np.ndarray:
    """Each row's error coded at step index k with the dead-zone quantizer and plain (mid-bin) reconstruction."""
    s = step(k)[:, None] * w
    v = y / s
    return np.square(y - np.sign(v) * np.floor(np.abs(v) + 0.5 - deadzone) * s).sum(1)


def _plain_bisect(y: np.ndarray, w: np.ndarray, budget: np.ndarray, deadzone: float) -> np.ndarray:
    return _largest(len(y), lambda k: _plain_error(y, w, k, deadzone) <= budget)


def _largest(T: int, meets) -> np.ndarray:
    """For T rows, the largest step index k with meets(k) true, by bisection over every index (meets(k) (T,) bool
    for indices k (T,); the error grows with the step nearly monotonically)."""
    lo, hi = np.zeros(T, np.int64), np.full(T, RAW16 - 1, np.int64)
    while (lo < hi).any():
        mid = (lo + hi + 1) // 2
        good = meets(mid)
        lo, hi = np.where(good, mid, lo), np.where(good, hi, mid - 1)
    return lo


FULL_GRID = np.arange(-4, 0)
"""Step indices around the estimate √(12·budget/d) that every row tries first with the full reconstruction, in
one array: on SmolLM2's layer 10 (protocol text and GPL-3, 2,048 rows, ε 0.01 to 0.05) the answer was 4 to 2
below it in 97 to 99.8 % of rows (the grid must also see the index above the answer fail); the others take the
two-step search."""


MARGIN = 1.0 - 1e-3
"""The search's float32 error must meet this fraction of a row's budget, so that the decoder's float64
reconstruction meets the whole budget (the two errors differed by at most 3e-5 of their size on tests/test_ans.py's
rows; the margin moved 0.02 % of SmolLM2's bytes)."""


def _grid(y: np.ndarray, basis: Basis, k: np.ndarray, deadzone: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows y (n, d) float32 coded at step indices k (n,), in float32 and without signs, for the search: (symbol
    magnitudes (n, d), band gains (n, B) uint8, squared error of the centroid reconstruction (n,)). `_code`'s
    quantizer, gains and reconstruction in fewer numpy calls (a decode row's search is their overhead): a symbol of
    magnitude a > 0 stands for (a − δ)·s, so a component's error is ((|y|/s − a + δ)·s)², and y² where a = 0; the
    band gain is the nearest index to 4·log2 of its mean square (`_GAIN_EDGES`)."""
    w, w_inv_std, inv_unit, sizes = basis._derived32
    delta_k = _STEPS32[k][:, None]
    v = np.abs(y) / (delta_k if basis._unweighted else delta_k * w)
    a = np.floor(v + np.float32(0.5 - deadzone))
    band_ms = np.add.reduceat(np.square(a * w_inv_std), basis._derived[4], axis=1) * (np.square(delta_k) / sizes)
    gains = np.searchsorted(_GAIN_EDGES, band_ms).astype(np.uint8)
    u = np.minimum(inv_unit * np.repeat(delta_k / _GAINS32[gains], basis._band_sizes, axis=1), np.float32(1.0 / MIN_SCALE))
    shrink = 0.5 - 1.0 / u + 1.0 / np.expm1(np.minimum(u, np.float32(80.0)))  # u = 1/b, b the Laplace scale; e^80 is finite
    shrink = np.minimum(np.maximum(shrink, 0.0), 0.5)  # as the decoder clips it (float32 rounding at large b)
    r = v - a + shrink * (a > 0)
    if not basis._unweighted:
        r *= w
    return a, gains, np.einsum("ij,ij->i", r, r) * np.square(delta_k[:, 0])


def _search(y: np.ndarray, basis: Basis, budget: np.ndarray, deadzone: float):
    """The largest step index that meets each row's budget with the centroid reconstruction, and the row coded
    there: (k, symbols (float64), band gains, squared error). y (T, d) float32.

    Every row codes FULL_GRID's indices around the estimate at once, in float32 (`_grid`; about half the time of
    float64 on a decode row). Rows whose answer is off that grid search in float64 with the plain reconstruction
    first (bisection, a few cheap operations per try), which lands at the answer or just above it (measured on 128
    rows of SmolLM2's layer 10: 40 at it, 84 one above, 4 two above), so the REFINE indices at and below it are coded
    at once with the full reconstruction; rows where none of those meet are bisected with the full reconstruction.
    Each step is row by row, so that a row is coded the same in a frame of any size (a speculative step's rows
    equal one-token steps')."""
    T, d = y.shape
    G = len(FULL_GRID)
    est = np.floor(4.0 * np.log2(np.maximum(12.0 * budget / d, 1e-300))).astype(np.int64) + STEP_BIAS
    if T == 1:  # a decode row, the hot case: the same search with its bookkeeping on Python scalars
        cands = np.minimum(np.maximum(est[0] + FULL_GRID, 0), RAW16 - 1)  # (np.clip costs 10x more on 4 values)
        a, gains, err = _grid(y, basis, cands, deadzone)
        met = (err <= budget[:1] * MARGIN).tolist()  # float64, as the frame path compares (numpy 1.x casts scalars)
        if met[0] and not met[-1]:
            i = G - 1 - met[::-1].index(True)
            return cands[i:i + 1], np.copysign(a[i:i + 1], y).astype(np.float64), gains[i:i + 1], err[i:i + 1].astype(np.float64)
        sub = _search_long(y.astype(np.float64), basis, budget, deadzone)
        return sub[0], sub[1], sub[2], sub[5]
    cands = np.minimum(np.maximum(est[:, None] + FULL_GRID[None], 0), RAW16 - 1).ravel()
    ys = np.repeat(y, G, 0)
    a, gains, err = _grid(ys, basis, cands, deadzone)
    met = (err <= np.repeat(budget * MARGIN, G)).reshape(T, G)
    pick = np.arange(T) * G + G - 1 - np.argmax(met[:, ::-1], 1)
    k, q, gains, err = cands[pick], np.copysign(a[pick], ys[pick]).astype(np.float64), gains[pick], err[pick].astype(np.float64)
    off = ~met[:, 0] | met[:, -1]  # the grid's lowest index misses the budget, or its highest still meets it
    if off.any():
        sub = _search_long(y[off].astype(np.float64), basis, budget[off], deadzone)
        k[off], q[off], gains[off], err[off] = sub[0], sub[1], sub[2], sub[5]
    return k, q, gains, err


def _pick(y, basis, budget, deadzone, cands: np.ndarray, G: int):
    """Rows y (T, d) coded at G candidate indices each (cands (T·G,), ascending per row): (the largest index that
    meets each row's budget, its (symbols, gains, reconstruction, scales, squared error), which candidates met
    (T, G))."""
    T = len(y)
    ys = np.repeat(y, G, 0)
    coded = _code(ys, basis, cands, deadzone)
    err = np.square(ys - coded[2]).sum(1)
    met = (err <= np.repeat(budget, G)).reshape(T, G)
    pick = np.arange(T) * G + G - 1 - np.argmax(met[:, ::-1], 1)
    return cands[pick], [a[pick] for a in (*coded, err)], met


def _search_long(y: np.ndarray, basis: Basis, budget: np.ndarray, deadzone: float):
    """`_search` by the plain search, then REFINE indices with the full reconstruction, then bisection."""
    lo = _plain_bisect(y, basis._derived[0], budget, deadzone)
    cands = np.maximum(lo[:, None] - np.arange(REFINE)[None, ::-1], 0).ravel()  # lo - 2, lo - 1, lo per row
    k, coded, met = _pick(y, basis, budget, deadzone, cands, REFINE)
    lost = ~met.any(1)
    if lost.any():
        k[lost] = _bisect(y[lost], basis, budget[lost], deadzone)
        redone = _code(y[lost], basis, k[lost], deadzone)
        for a, b in zip(coded, (*redone, np.square(y[lost] - redone[2]).sum(1))):
            a[lost] = b
    return (k, *coded)


def _bisect(y: np.ndarray, basis: Basis, budget: np.ndarray, deadzone: float) -> np.ndarray:
    lo = _largest(len(y), lambda k: _meets(y, basis, k, budget, deadzone))
    while not (met := _meets(y, basis, lo, budget, deadzone) | (lo == 0)).all():  # not monotonic here: step down
        lo = np.where(met, lo, lo - 1)
    return lo


def encode(x: np.ndarray, basis: Basis, error_budget: float, deadzone: float = 0.2, checked: bool = False) -> bytes:
    """Rows x (T, d) -> one frame (module docstring). `checked`: x is finite float32 already (codec.encode checks)."""
    from splitlm.quantize import codec

    x = np.asarray(x, np.float32)
    if x.ndim != 2 or x.shape[0] < 1:
        raise CodecError(f"activations must be (rows >= 1, dim), got shape {x.shape}")
    T, d = x.shape
    if d != basis.dim:
        raise CodecError(f"activations of dim {d} do not match the codec basis's {basis.dim}")
    if not checked and not np.isfinite(x).all():
        raise CodecError("activations contain NaN or Inf")
    c = x - basis.mean
    # row by row: a matrix product sums in another order than a vector one, and a row must code the same in any frame
    y = (c[0] @ basis.vectors)[None] if T == 1 else np.stack([row @ basis.vectors for row in c])  # (T, d) float32
    budget = error_budget * _inlier_energy(c)

    lo, q, gains, err = _search(y, basis, budget, deadzone)
    steps, raw_bytes = lo.astype(np.uint8), b""
    if T == 1 and float(np.abs(q).max()) <= QMAX and float(err[0]) <= float(budget[0]):
        scales, means = _scales(basis, gains, lo).ravel(), _zeros(d)  # a decode row that codes: the hot case
    else:  # rows the coder cannot carry go raw: fp16 where that meets their budget, else fp32
        raw = (np.abs(q).max(1) > QMAX) | (err > budget)
        if raw.any():
            with np.errstate(over="ignore", invalid="ignore"):  # beyond fp16's range: raw fp32
                x16 = x[raw].astype(np.float16).astype(np.float64)
                fits16 = ((x[raw] - x16) ** 2).sum(1) <= budget[raw]
            steps[raw] = np.where(fits16, RAW16, RAW32)
            gains[raw] = 0
            raw_bytes = b"".join(x[i].astype("<f2" if s == RAW16 else "<f4").tobytes() for i, s in enumerate(steps) if s >= RAW16)
        sel = np.nonzero(~raw)[0]
        q, scales = q[sel], _scales(basis, gains[sel], lo[sel]).ravel()
        means = np.zeros_like(scales)
    words = np.zeros(0, np.uint32)
    if len(scales):
        import constriction

        coder = constriction.stream.stack.AnsCoder()
        coder.encode_reverse(q.astype(np.int32).ravel(), _model(), means, scales)  # scales float64, as the decoder's
        words = coder.get_compressed()
    return b"".join([codec._header("ans", 0, T, d), BASIS.pack(basis.layer, basis.digest), struct.pack("<H", 1),
                     SEGMENT.pack(T, len(words)), steps.tobytes(), gains.tobytes(), words.astype("<u4", copy=False).tobytes(),
                     raw_bytes])


@functools.lru_cache(maxsize=4)
def _zeros(n: int) -> np.ndarray:
    """The Laplace models' means of a decode row: zeros (read only, shared)."""
    z = np.zeros(n)
    z.flags.writeable = False
    return z


@dataclass(frozen=True)
class Layout:
    """A parsed and checked frame."""

    rows: int
    dim: int
    layer: int
    digest: bytes
    segments: tuple[tuple[int, int], ...]
    """(rows, words) of each ANS stream."""
    steps: np.ndarray
    gains: np.ndarray
    words_offset: int
    raw_offset: int


def parse(buf: bytes, T: int, d: int, offset: int) -> Layout:
    """Check an ans frame's structure past its codec header (rows T, dim d, read by codec.parse_frame)."""
    def need(n: int, what: str) -> None:
        if len(buf) < n:
            raise CodecError(f"ans frame of shape ({T}, {d}) is truncated inside its {what}")

    need(offset + BASIS.size + 2, "basis id")
    layer, digest = BASIS.unpack_from(buf, offset)
    (S,) = struct.unpack_from("<H", buf, offset + BASIS.size)
    off = offset + BASIS.size + 2
    if S < 1 or S > T:
        raise CodecError(f"ans frame of {T} rows has {S} segments (between 1 and the rows)")
    need(off + SEGMENT.size * S, "segment table")
    segs = tuple(SEGMENT.unpack_from(buf, off + SEGMENT.size * i) for i in range(S))
    off += SEGMENT.size * S
    if sum(r for r, _ in segs) != T or any(r < 1 for r, _ in segs):
        raise CodecError(f"ans frame segments hold {[r for r, _ in segs]} rows, not {T} in all")
    B = len(_bands(d)) - 1
    need(off + T + T * B, "steps and gains")
    steps = np.frombuffer(buf, np.uint8, T, off)
    gains = np.frombuffer(buf, np.uint8, T * B, off + T).reshape(T, B)
    off += T + T * B
    words = sum(w for _, w in segs)
    raw_bytes = int(((steps == RAW16) * 2 * d + (steps == RAW32) * 4 * d).sum())
    if len(buf) != off + 4 * words + raw_bytes:
        raise CodecError(f"ans frame of shape ({T}, {d}) with {words} stream words and {raw_bytes} raw bytes must be "
                         f"{off + 4 * words + raw_bytes} bytes, got {len(buf)}")
    return Layout(T, d, layer, digest, segs, steps, gains, off, off + 4 * words)


def _rotate_back(y: np.ndarray, basis: Basis) -> np.ndarray:
    """x̂ = μ + U y for coefficients y (T, d): float32 (T, d)."""
    return (y @ basis._vectors_t64 + basis.mean).astype(np.float32)


def decode(buf: bytes, lay: Layout, basis: Basis, rotate=None) -> np.ndarray:
    """x̂ (T, d) float32 of a parsed frame, against the basis it names (CodecError for any other). `rotate(y, basis)`:
    the product μ + U y, by another library than numpy where one runs beside (the cloud's torch: numpy's BLAS
    threads would fight torch's for the cores)."""
    return decode_batch([buf], [lay], basis, rotate)[0]


def decode_batch(bufs: list[bytes], lays: list[Layout], basis: Basis, rotate=None) -> list[np.ndarray]:
    """`decode` of several frames of one basis: each frame's ANS streams on their own, then the reconstruction and
    μ + U y of all their rows at once (one product with U for the batch: on the cloud, one frame of one row spent
    most of its decode reading U). A row decoded in a batch equals the row decoded alone to float64 rounding (the
    product's summation order may differ with the batch's size). CodecError names the frame at fault."""
    wheres = [f"frame {i} of the batch: " if len(lays) > 1 else "" for i in range(len(lays))]  # what errors name
    for where, lay in zip(wheres, lays):
        if (lay.layer, lay.digest) != (basis.layer, basis.digest):
            raise CodecError(f"{where}the frame was coded with basis {lay.layer}/{lay.digest.hex()}, this side holds "
                             f"{basis.layer}/{basis.digest.hex()}: the two sides do not run the same plan")
        if lay.dim != basis.dim:
            raise CodecError(f"{where}the frame holds rows of dim {lay.dim}, its basis {basis.layer}/{basis.digest.hex()} "
                             f"codes dim {basis.dim}")
    d = basis.dim
    q = np.concatenate([_symbols(buf, lay, basis, where) for buf, lay, where in zip(bufs, lays, wheres)])
    steps, gains = np.concatenate([lay.steps for lay in lays]), np.concatenate([lay.gains for lay in lays])
    coded = steps < RAW16
    y = np.zeros((len(steps), d))
    if coded.any():
        y[coded] = _reconstruct(q[coded], _scales(basis, gains[coded], steps[coded])) * (
            step(steps[coded])[:, None] * basis.weights.astype(np.float64))
    x = (rotate or _rotate_back)(y, basis)
    out, row = [], 0
    for buf, lay, where in zip(bufs, lays, wheres):
        xi = x[row:row + lay.rows]
        off = lay.raw_offset
        for r in np.nonzero(lay.steps >= RAW16)[0]:
            dtype, width = ("<f2", 2) if lay.steps[r] == RAW16 else ("<f4", 4)
            xi[r] = np.frombuffer(buf, dtype, d, off)
            off += width * d
        if not np.isfinite(xi).all():
            raise CodecError(f"{where}ans frame decodes to non-finite values: corrupt")
        out.append(xi)
        row += lay.rows
    return out


def _symbols(buf: bytes, lay: Layout, basis: Basis, where: str) -> np.ndarray:
    """The symbols (T, d) float64 of a parsed frame's ANS streams (0 on raw rows); `where` starts its errors."""
    import constriction

    T, d = lay.rows, lay.dim
    raw = lay.steps >= RAW16
    q = np.zeros((T, d), np.float64)
    words = np.frombuffer(buf, "<u4", sum(w for _, w in lay.segments), lay.words_offset)
    row, word = 0, 0
    for rows, n in lay.segments:
        seg = slice(row, row + rows)
        sel = np.nonzero(~raw[seg])[0] + row
        stream = words[word:word + n]
        if len(sel):
            scales = _scales(basis, lay.gains[sel], lay.steps[sel]).ravel()
            try:
                coder = constriction.stream.stack.AnsCoder(np.ascontiguousarray(stream, np.uint32))
                symbols = coder.decode(_model(), np.zeros_like(scales), scales)
            except (ValueError, AssertionError, RuntimeError) as exc:  # a corrupt stream
                raise CodecError(f"{where}ans stream of rows [{row}, {row + rows}) is corrupt: {exc}") from None
            if not coder.is_empty():
                raise CodecError(f"{where}ans stream of rows [{row}, {row + rows}) has data left after its {len(sel)} rows: corrupt")
            q[sel] = symbols.reshape(len(sel), d)
        elif n:
            raise CodecError(f"{where}ans segment of rows [{row}, {row + rows}) is all raw but carries {n} stream words")
        row, word = row + rows, word + n
    return q


def concat(bufs: list[bytes], lays: list[Layout]) -> bytes:
    """One frame of the rows of `bufs` (one basis), each stream kept as a segment: nothing re-encoded."""
    from splitlm.quantize import codec

    first = lays[0]
    for i, lay in enumerate(lays[1:], 1):
        if (lay.layer, lay.digest, lay.dim) != (first.layer, first.digest, first.dim):
            raise CodecError(f"ans frame {i} (basis {lay.layer}/{lay.digest.hex()}) does not match frame 0 "
                             f"(basis {first.layer}/{first.digest.hex()})")
    segs = [s for lay in lays for s in lay.segments]
    if len(segs) > 0xFFFF:
        raise CodecError(f"{len(segs)} segments do not fit one frame")
    T = sum(lay.rows for lay in lays)
    parts = [codec._header("ans", 0, T, first.dim), BASIS.pack(first.layer, first.digest), struct.pack("<H", len(segs))]
    parts += [SEGMENT.pack(*s) for s in segs]
    parts += [lay.steps.tobytes() for lay in lays] + [lay.gains.tobytes() for lay in lays]
    parts += [b[lay.words_offset:lay.raw_offset] for b, lay in zip(bufs, lays)]
    parts += [b[lay.raw_offset:] for b, lay in zip(bufs, lays)]
    return b"".join(parts)
