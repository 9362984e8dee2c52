"""Shared test helpers: array backends, dtypes and conversions to and from numpy.

Other test files (the PyTorch and Keras adapter tests) add their own fixtures in
their own modules; keep this file generic.

torch is imported before tensorflow here, at module level, because importing them
the other way round in one process can crash. Both imports are optional.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import numpy as np
import pytest

# tests/reliability/ shares the model zoo of this folder (torch_models).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# The in-process Keras tests compute their references with TensorFlow (tf.GradientTape,
# tf.function, tf.Variable), so this process runs Keras on the TensorFlow backend
# whatever ~/.keras/keras.json selects; the other backends run in subprocesses
# (test_keras_backends.py sets KERAS_BACKEND for each). An explicit KERAS_BACKEND is
# kept: those tests then skip, saying why (test_keras_support.py).
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

try:  # torch first: see the module docstring.
    import torch
except ImportError:  # pragma: no cover - depends on the environment
    torch = None

try:
    import tensorflow as tf
except ImportError:  # pragma: no cover - depends on the environment
    tf = None

try:
    import ml_dtypes
except ImportError:  # pragma: no cover - depends on the environment
    ml_dtypes = None

# Hypothesis draws the same examples on every run and machine (derandomize: the seed
# comes from each test's name), so a failure in CI comes back locally. No example
# database either: a stored failing example would make runs differ. For a randomized
# search, run with HYPOTHESIS_PROFILE=explore.
try:
    from hypothesis import settings as hypothesis_settings
except ImportError:  # pragma: no cover - depends on the environment
    hypothesis_settings = None
else:
    hypothesis_settings.register_profile("advgraph", derandomize=True, database=None, print_blob=True)
    hypothesis_settings.register_profile("explore", derandomize=False, print_blob=True)
    hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "advgraph"))

BACKENDS = ("numpy", "torch", "tensorflow")
DTYPES = ("float16", "bfloat16", "float32", "float64")
HALF_DTYPES = ("float16", "bfloat16")

# Unit roundoff (half an ulp at 1.0) of each dtype: the relative error of one rounding.
UNIT_ROUNDOFF = {
    "float16": 2.0**-11,
    "bfloat16": 2.0**-8,
    "float32": 2.0**-24,
    "float64": 2.0**-53,
}

# Smallest positive normal number of each dtype.
TINY = {
    "float16": 2.0**-14,
    "bfloat16": 2.0**-126,
    "float32": 2.0**-126,
    "float64": 2.0**-1022,
}

# Largest finite number of each dtype.
MAX = {
    "float16": 65504.0,
    "bfloat16": 3.3895313892515355e38,
    "float32": 3.4028234663852886e38,
    "float64": 1.7976931348623157e308,
}


def require_backend(backend: str) -> Any:
    """Return the framework module for ``backend``, skipping the test if it is absent."""
    if backend == "numpy":
        return np
    if backend == "torch":
        return pytest.importorskip("torch")
    if backend == "tensorflow":
        return pytest.importorskip("tensorflow")
    raise ValueError(f"unknown backend {backend!r}")


def numpy_dtype(dtype: str) -> Any:
    """numpy dtype for a dtype name; bfloat16 comes from ml_dtypes (skip if absent)."""
    if dtype == "bfloat16":
        if ml_dtypes is None:
            pytest.skip("numpy bfloat16 needs the ml_dtypes package")
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(dtype)


def backend_dtype(backend: str, dtype: str) -> Any:
    """The ``dtype`` object of ``backend`` for a dtype name."""
    module = require_backend(backend)
    if backend == "numpy":
        return numpy_dtype(dtype)
    return getattr(module, dtype)


def to_backend(x: Any, backend: str, dtype: str, device: str | None = None) -> Any:
    """Convert a numpy (float64) array to ``backend`` in ``dtype``.

    float64 -> half conversions round once per library; tests always compare against
    the values read back with :func:`to_numpy64`, never against the float64 input.
    """
    module = require_backend(backend)
    x = np.asarray(x, dtype=np.float64)
    if backend == "numpy":
        return x.astype(numpy_dtype(dtype))
    if backend == "torch":
        out = module.from_numpy(x.copy()).to(getattr(module, dtype))
        return out.to(device) if device is not None else out
    # tensorflow: build in float64, cast in TF (no ml_dtypes needed for bfloat16).
    return module.cast(module.constant(x, dtype=module.float64), getattr(module, dtype))


def to_numpy64(x: Any) -> np.ndarray:
    """Convert an array of any backend (any float dtype) to a numpy float64 array."""
    if torch is not None and isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    if tf is not None and (tf.is_tensor(x) or isinstance(x, tf.Variable)):
        if x.dtype.is_floating:
            return tf.cast(x, tf.float64).numpy()
        return np.asarray(x.numpy())
    return np.asarray(x).astype(np.float64)


def to_numpy(x: Any) -> np.ndarray:
    """Convert an array of any backend to numpy, keeping non-float dtypes (e.g. bool)."""
    if torch is not None and isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    if tf is not None and (tf.is_tensor(x) or isinstance(x, tf.Variable)):
        return np.asarray(x.numpy())
    return np.asarray(x)


def raw_bytes(x: Any) -> bytes:
    """The bytes of an array's values (for bitwise comparisons; -0.0 != 0.0 here)."""
    if torch is not None and isinstance(x, torch.Tensor):
        x = x.detach().cpu().contiguous()
        if x.dtype.itemsize == 2:  # numpy has no torch.bfloat16: compare as int16
            x = x.view(torch.int16)
        return x.numpy().tobytes()
    return np.ascontiguousarray(to_numpy(x)).tobytes()


def backend_of(x: Any) -> str:
    """Name of the backend an array belongs to."""
    if isinstance(x, np.ndarray):
        return "numpy"
    if torch is not None and isinstance(x, torch.Tensor):
        return "torch"
    if tf is not None and (tf.is_tensor(x) or isinstance(x, tf.Variable)):
        return "tensorflow"
    return type(x).__module__


def dtype_name(x: Any) -> str:
    """Dtype of ``x`` as a plain name: 'float16', 'bfloat16', 'float32', ..."""
    if tf is not None and (tf.is_tensor(x) or isinstance(x, tf.Variable)):
        return x.dtype.name
    return str(x.dtype).rsplit(".", 1)[-1]


def assert_same_kind(out: Any, like: Any) -> None:
    """``out`` has the array type, shape, dtype (and torch device) of ``like``."""
    assert backend_of(out) == backend_of(like), (type(out), type(like))
    if backend_of(like) == "numpy":
        assert type(out) is type(like), (type(out), type(like))
    assert tuple(out.shape) == tuple(like.shape), (tuple(out.shape), tuple(like.shape))
    assert out.dtype == like.dtype, (out.dtype, like.dtype)
    if backend_of(like) == "torch":
        assert out.device == like.device, (out.device, like.device)


def skip_unsupported(backend: str, dtype: str) -> None:
    """Skip combinations that the test environment cannot build."""
    require_backend(backend)
    if backend == "numpy":
        numpy_dtype(dtype)


@pytest.fixture(params=BACKENDS, scope="session")
def backend(request: pytest.FixtureRequest) -> str:
    """Each array backend, skipped when its framework is not installed.

    Session-scoped so that hypothesis tests may use it (no function-scoped fixture).
    """
    require_backend(request.param)
    return request.param


@pytest.fixture(params=DTYPES, scope="session")
def dtype(request: pytest.FixtureRequest) -> str:
    """Each floating dtype name."""
    return request.param
