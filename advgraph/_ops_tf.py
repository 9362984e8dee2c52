"""TensorFlow's :class:`~advgraph._ops.Ops`: a small shim over ``tf`` (array-api-compat
has no TensorFlow support) that uses only graph-safe ops, so the core runs inside
``tf.function`` and XLA. Nothing here imports TensorFlow: ``ops_for`` builds it only
for a TensorFlow tensor, when ``tensorflow`` is already imported.
"""

from __future__ import annotations

import sys
from typing import Any, Sequence

from advgraph._ops import Array, Ops

__all__: list[str] = []


class _TensorFlowOps(Ops):
    """TensorFlow tensors and variables; graph-safe (tf.function, XLA)."""

    name = "tensorflow"

    def __init__(self) -> None:
        self.tf = sys.modules["tensorflow"]

    def is_floating(self, x: Array) -> bool:
        return bool(x.dtype.is_floating)

    def widen(self, x: Array) -> Array:
        tf = self.tf
        if x.dtype in (tf.float16, tf.bfloat16):
            return tf.cast(x, tf.float32)
        return x

    def cast(self, x: Array, dtype: Any) -> Array:
        if x.dtype == dtype:
            return x
        return self.tf.cast(x, dtype)

    def abs(self, x: Array) -> Array:
        return self.tf.abs(x)

    def sqrt(self, x: Array) -> Array:
        return self.tf.sqrt(x)

    def sign(self, x: Array) -> Array:
        return self.tf.sign(x)

    def isfinite(self, x: Array) -> Array:
        return self.tf.math.is_finite(x)

    def where(self, cond: Array, a: Array, b: Array) -> Array:
        tf = self.tf
        ref = a if hasattr(a, "dtype") else b
        a = tf.convert_to_tensor(a, dtype=ref.dtype)
        b = tf.convert_to_tensor(b, dtype=ref.dtype)
        return tf.where(cond, a, b)

    def clip(self, x: Array, low: float, high: float) -> Array:
        return self.tf.clip_by_value(x, low, high)

    def clip_to(self, x: Array, bound: Array) -> Array:
        return self.tf.clip_by_value(x, -bound, bound)

    def zeros_like(self, x: Array) -> Array:
        return self.tf.zeros_like(x)

    def logical_and(self, a: Array, b: Array) -> Array:
        return self.tf.logical_and(a, b)

    def logical_not(self, a: Array) -> Array:
        return self.tf.logical_not(a)

    def exp(self, x: Array) -> Array:
        return self.tf.exp(x)

    def log(self, x: Array) -> Array:
        return self.tf.math.log(x)

    def stop_gradient(self, x: Array) -> Array:
        return self.tf.stop_gradient(x)

    def sum(self, x: Array, axes: Sequence[int]) -> Array:
        return self.tf.reduce_sum(x, axis=list(axes), keepdims=True)

    def amax(self, x: Array, axes: Sequence[int]) -> Array:
        return self.tf.reduce_max(x, axis=list(axes), keepdims=True)

    def reshape(self, x: Array, shape: Sequence[int]) -> Array:
        return self.tf.reshape(x, list(shape))

    def finfo(self, x: Array) -> Any:
        import numpy as np

        return np.finfo(x.dtype.as_numpy_dtype)

    def uniform_like(self, x: Array, low: float, high: float, rng: Any = None) -> Array:
        tf = self.tf
        dtype = self.widen(x).dtype
        if rng is not None:
            return rng.uniform(tf.shape(x), minval=low, maxval=high, dtype=dtype)
        return tf.random.uniform(tf.shape(x), minval=low, maxval=high, dtype=dtype)

    def normal_like(self, x: Array, rng: Any = None) -> Array:
        tf = self.tf
        dtype = self.widen(x).dtype
        if rng is not None:
            return rng.normal(tf.shape(x), dtype=dtype)
        return tf.random.normal(tf.shape(x), dtype=dtype)
