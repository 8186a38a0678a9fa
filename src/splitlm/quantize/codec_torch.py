"""The activation codec's array operations on torch tensors (the cloud's backend).

Same operations, same IEEE results as codec_ops.NumpyOps: see there.
"""

from __future__ import annotations

import numpy as np
import torch


class TorchOps:
    name = "torch"

    def __init__(self) -> None:
        self.t = torch
        self.f16, self.f32, self.f64, self.u8, self.i64 = torch.float16, torch.float32, torch.float64, torch.uint8, torch.int64
        self.bool = torch.bool
        self._basis_key, self._basis = None, None

    def rotate_back(self, y: np.ndarray, basis) -> np.ndarray:
        """An ans frame's μ + U y (quantize/ans.py) in torch, on the thread that runs the tail: numpy's BLAS threads
        beside torch's would fight them for the cores (a 128-row frame took ~150 ms in the service, 18 ms alone)."""
        key = id(basis)
        if self._basis_key != key:  # the basis's matrices as tensors, kept for the next frame of the same basis
            self._basis = (torch.from_numpy(np.ascontiguousarray(basis.vectors.T, np.float64)), torch.from_numpy(basis.mean))
            self._basis_key = key
        vt, mean = self._basis
        return ((torch.from_numpy(np.ascontiguousarray(y, np.float64)) @ vt).float() + mean).numpy()

    def asarray(self, x, dtype):
        if isinstance(x, np.ndarray):
            x = np.ascontiguousarray(x)
            x = self.t.from_numpy(x if x.flags.writeable else x.copy())
        return self.t.as_tensor(x).to(dtype).contiguous()

    def cast(self, x, dtype):
        return x.to(dtype)

    def tobytes(self, x) -> bytes:
        return x.contiguous().cpu().numpy().tobytes()

    def numpy(self, x) -> np.ndarray:
        return x.cpu().numpy()

    def zeros(self, shape, dtype):
        return self.t.zeros(shape, dtype=dtype)

    def full(self, shape, value, dtype):
        return self.t.full(shape, value, dtype=dtype)

    def arange(self, n: int, dtype):
        return self.t.arange(n, dtype=dtype)

    def where(self, c, a, b):
        return self.t.where(c, a, b)

    def amin(self, x, axis: int):
        return x.amin(dim=axis)

    def amax(self, x, axis: int):
        return x.amax(dim=axis)

    def sum(self, x, axis: int):
        return x.sum(dim=axis)

    def rint(self, x):
        return self.t.round(x)

    def clip(self, x, lo, hi):
        return self.t.clamp(x, lo, hi)

    def isfinite_all(self, x) -> bool:
        return bool(self.t.isfinite(x).all())

    def isfinite_rows(self, x):
        """(T, ...) -> bool (T,): whether every entry of each row is finite."""
        return self.t.isfinite(x).reshape(x.shape[0], -1).all(dim=1)

    def nextafter_up(self, x):
        return self.t.nextafter(x, self.t.full_like(x, float("inf")))

    def concat(self, parts, axis: int = 0):
        return self.t.cat(parts, dim=axis)

    def nextafter_down(self, x):
        return self.t.nextafter(x, self.t.full_like(x, float("-inf")))

    def stack(self, parts, axis: int):
        return self.t.stack(parts, dim=axis)

    def argmin(self, x, axis: int):
        return self.t.argmin(x, dim=axis)

    def take(self, x, idx, axis: int):
        return self.t.take_along_dim(x, idx, dim=axis)
