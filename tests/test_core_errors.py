"""Bad input to the core functions raises ValueError/TypeError with a clear message.

Every message says what was expected and ends with ``Received: name=value``.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from conftest import BACKENDS, require_backend, to_backend

from advgraph import compute_delta, fgm_delta, project, random_init

FUNCTIONS = [
    pytest.param(fgm_delta, "grad", id="fgm_delta"),
    pytest.param(compute_delta, "grad", id="compute_delta"),
    pytest.param(project, "delta", id="project"),
    pytest.param(random_init, "like", id="random_init"),
]


def _good():
    return np.array([[3.0, 4.0], [1.0, 0.0]], dtype=np.float32)


@pytest.mark.parametrize("fn, arg", FUNCTIONS)
@pytest.mark.parametrize(
    "epsilon, error",
    [
        (0, ValueError),
        (0.0, ValueError),
        (-0.0, ValueError),
        (-1.0, ValueError),
        (-1e-30, ValueError),
        (math.nan, ValueError),
        (math.inf, ValueError),
        (-math.inf, ValueError),
        (np.float64(math.nan), ValueError),
        ("1.0", TypeError),
        (True, TypeError),
        (False, TypeError),
        (None, TypeError),
        ([1.0], TypeError),
        (1 + 0j, TypeError),
    ],
    ids=repr,
)
def test_bad_epsilon(fn, arg, epsilon, error):
    with pytest.raises(error, match="Received:") as info:
        fn(_good(), epsilon)
    message = str(info.value)
    assert "`epsilon`" in message and f"epsilon={epsilon!r}" in message, message


@pytest.mark.parametrize("fn, arg", FUNCTIONS)
@pytest.mark.parametrize("epsilon", [1, 0.5, np.float32(0.25), np.float64(0.25), 1e-30, 1e30])
def test_good_epsilon_types_are_accepted(fn, arg, epsilon):
    """Accepted radii, numpy scalars included: a float64 scalar must not promote a
    float32 result (it becomes a Python float first)."""
    out = fn(_good(), epsilon)
    out = getattr(out, "delta", out)
    assert out.shape == (2, 2) and out.dtype == np.float32


@pytest.mark.parametrize("fn, arg", FUNCTIONS)
@pytest.mark.parametrize(
    "norm, error",
    [("l1", ValueError), ("L2", ValueError), ("inf", ValueError), ("", ValueError),
     (2, TypeError), (math.inf, TypeError), (None, TypeError)],
    ids=repr,
)
def test_unknown_norm(fn, arg, norm, error):
    with pytest.raises(error, match="Received:") as info:
        fn(_good(), 1.0, norm=norm)
    message = str(info.value)
    assert f"norm={norm!r}" in message and "'l2'" in message and "'linf'" in message, message


@pytest.mark.parametrize("fn, arg", FUNCTIONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_per_sample_needs_a_batch_axis(fn, arg, backend):
    require_backend(backend)
    scalar = to_backend(np.array(2.0), backend, "float32")
    with pytest.raises(ValueError, match=re.escape("Received: shape=()")) as info:
        fn(scalar, 1.0, per_sample=True)
    assert "per_sample" in str(info.value)
    # the same scalar is fine without per_sample
    out = fn(scalar, 1.0)
    assert tuple(getattr(out, "delta", out).shape) == ()


@pytest.mark.parametrize("fn, arg", FUNCTIONS)
@pytest.mark.parametrize("per_sample", [1, 0, None, "yes"], ids=repr)
def test_per_sample_must_be_a_bool(fn, arg, per_sample):
    with pytest.raises(TypeError, match="Received: per_sample="):
        fn(_good(), 1.0, per_sample=per_sample)


@pytest.mark.parametrize("fn, arg", FUNCTIONS)
@pytest.mark.parametrize(
    "grad",
    [[3.0, 4.0], None, "abc", 3, 3.0, (1.0, 2.0), {"a": 1.0}, object()],
    ids=lambda g: type(g).__name__,
)
def test_non_array_input(fn, arg, grad):
    with pytest.raises(TypeError, match="Received:") as info:
        fn(grad, 1.0)
    message = str(info.value)
    assert f"{arg}={type(grad).__name__!r}" in message, message


def _integer_arrays():
    yield pytest.param(lambda: np.array([1, 2], dtype=np.int64), id="numpy-int64")
    yield pytest.param(lambda: np.array([1, 2], dtype=np.int32), id="numpy-int32")
    yield pytest.param(lambda: np.array([1, 2], dtype=np.uint8), id="numpy-uint8")
    yield pytest.param(lambda: np.array([True, False]), id="numpy-bool")
    yield pytest.param(lambda: np.array([1 + 1j, 2]), id="numpy-complex128")
    yield pytest.param(
        lambda: require_backend("torch").tensor([1, 2], dtype=require_backend("torch").int64),
        id="torch-int64",
    )
    yield pytest.param(
        lambda: require_backend("torch").tensor([True, False]), id="torch-bool"
    )
    yield pytest.param(
        lambda: require_backend("tensorflow").constant([1, 2], dtype="int32"),
        id="tensorflow-int32",
    )
    yield pytest.param(
        lambda: require_backend("tensorflow").constant([1, 2], dtype="int64"),
        id="tensorflow-int64",
    )


@pytest.mark.parametrize("fn, arg", FUNCTIONS)
@pytest.mark.parametrize("make", list(_integer_arrays()))
def test_non_floating_dtype(fn, arg, make):
    with pytest.raises(TypeError, match="floating-point") as info:
        fn(make(), 1.0)
    message = str(info.value)
    assert f"`{arg}`" in message and "Received: dtype=" in message, message



def test_check_choice_accepts_exactly_the_listed_strings_from_any_iterable():
    """check_choice: a listed string back as is, whatever iterable lists the choices
    (a tuple takes a short path);
    a non-string is a TypeError and an unlisted string a ValueError, both naming the
    choices and the value received."""
    from advgraph._errors import check_choice

    class Name(str):
        pass

    for choices in (("l2", "linf"), ["l2", "linf"], {"l2", "linf"}, (c for c in ("l2", "linf"))):
        assert check_choice("norm", "linf", choices) == "linf"
    assert check_choice("norm", Name("l2"), ("l2", "linf")) == "l2"
    for value in ("l", "2", "inf", "L2", ""):
        with pytest.raises(ValueError, match="Received: norm=") as info:
            check_choice("norm", value, ("l2", "linf"))
        assert "'l2', 'linf'" in str(info.value)
    for value in (2, None, b"l2", ["l2"]):
        with pytest.raises(TypeError, match="Received: norm="):
            check_choice("norm", value, ("l2", "linf"))
