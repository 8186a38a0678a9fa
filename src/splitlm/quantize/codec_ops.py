"""The array operations the activation codec needs, for numpy (here) and for torch
(codec_torch, imported only when the torch backend is asked for).

The codec is written once against these operations; the numpy backend runs on the
device (no torch), the torch backend on the cloud. Every operation is elementwise IEEE
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
