"""The array operations the activation codec needs, for numpy and for torch.

The codec is written once against `Ops`; the numpy backend runs on the device
(no torch), the torch backend on the cloud. Every operation is elementwise IEEE
arithmetic or an exact reduction (min, max, integer sums), so the two backends
produce bit-identical frames and reconstructions. Only the float64 sums of
squares used for decisions may differ in their last bits.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class NumpyOps:
    name = "numpy"
    f16, f32, f64, u8, i64, bool = np.float16, np.float32, np.float64, np.uint8, np.int64, np.bool_

    @staticmethod
    def asarray(x: Any, dtype) -> np.ndarray:
        return np.ascontiguousarray(np.asarray(x, dtype=dtype))

    @staticmethod
    def cast(x: np.ndarray, dtype) -> np.ndarray:
        return x.astype(dtype)

    @staticmethod
    def tobytes(x: np.ndarray) -> bytes:
        return np.ascontiguousarray(x).tobytes()

    @staticmethod
    def numpy(x: np.ndarray) -> np.ndarray:
        return x

    @staticmethod
    def zeros(shape, dtype) -> np.ndarray:
        return np.zeros(shape, dtype=dtype)

    @staticmethod
    def full(shape, value, dtype) -> np.ndarray:
        return np.full(shape, value, dtype=dtype)

    @staticmethod
    def arange(n: int, dtype) -> np.ndarray:
        return np.arange(n, dtype=dtype)

    @staticmethod
    def where(c, a, b):
        return np.where(c, a, b)

    @staticmethod
    def amin(x, axis: int):
        return x.min(axis=axis)

    @staticmethod
    def amax(x, axis: int):
        return x.max(axis=axis)

    @staticmethod
    def sum(x, axis: int):
        return x.sum(axis=axis)

    @staticmethod
    def rint(x):
        return np.rint(x)

    @staticmethod
    def clip(x, lo, hi):
        return np.clip(x, lo, hi)

    @staticmethod
    def isfinite_all(x) -> bool:
        return bool(np.isfinite(x).all())

    @staticmethod
    def isfinite_rows(x) -> np.ndarray:
        """(T, ...) -> bool (T,): whether every entry of each row is finite."""
        return np.isfinite(x).reshape(x.shape[0], -1).all(axis=1)

    @staticmethod
    def nextafter_up(x):
        return np.nextafter(x, np.array(np.inf, dtype=x.dtype))

    @staticmethod
    def concat(parts, axis: int = 0):
        return np.concatenate(parts, axis=axis)

    @staticmethod
    def nextafter_down(x):
        return np.nextafter(x, np.array(-np.inf, dtype=x.dtype))

    @staticmethod
    def stack(parts, axis: int):
        return np.stack(parts, axis=axis)

    @staticmethod
    def argmin(x, axis: int):
        return np.argmin(x, axis=axis)

    @staticmethod
    def take(x, idx, axis: int):
        return np.take_along_axis(x, idx, axis=axis)


class TorchOps:
    name = "torch"

    def __init__(self) -> None:
        import torch

        self.t = torch
        self.f16, self.f32, self.f64, self.u8, self.i64 = torch.float16, torch.float32, torch.float64, torch.uint8, torch.int64
        self.bool = torch.bool

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
