"""Property tests of the framework-agnostic delta rules (advgraph._delta).

Every test runs over backend (numpy, torch, tensorflow) x dtype (float16, bfloat16,
float32, float64) where it makes sense. Results are read back as numpy float64 and
compared there against float64 references built from the gradient *as stored* in the
test dtype (so the rounding of the input is never blamed on the library).

Tolerances. The output of a half-precision call is rounded to that dtype, so the norm
of an l2 delta can be off by one unit roundoff of the dtype whatever the library does:
2**-11 (~4.9e-4) for float16, 2**-8 (~3.9e-3) for bfloat16. The float16 tolerance is
1e-3; the bfloat16 one is 2**-8 (1e-3 is below bfloat16's own rounding error: e.g.
[3, 4] -> [0.6016, 0.8008] has norm 1.0016 although it is the correctly rounded
result). float32 and float64 use 1e-6.

Subnormal inputs are avoided: TensorFlow flushes float32/bfloat16 subnormals to zero on
CPU, so an all-subnormal gradient gives delta = 0 there (and a finite one in numpy and
torch). That is TensorFlow's arithmetic, not advgraph's.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import (
    BACKENDS,
    DTYPES,
    HALF_DTYPES,
    TINY,
    UNIT_ROUNDOFF,
    assert_same_kind,
    raw_bytes,
    require_backend,
    skip_unsupported,
    to_backend,
    to_numpy,
    to_numpy64,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import advgraph
from advgraph import compute_delta, fgm_delta, project, random_init

SETTINGS = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# For tests whose norm / per_sample is drawn by hypothesis rather than parametrised.
SETTINGS_WIDE = settings(SETTINGS, max_examples=32)

BACKEND_DTYPE = [pytest.param(b, d, id=f"{b}-{d}") for b in BACKENDS for d in DTYPES]


def test_hypothesis_draws_the_same_examples_on_every_run():
    """The suite's settings (conftest's "advgraph" profile) are derandomized: a failure
    found once, in CI or here, comes back on the next run."""
    import os

    if os.environ.get("HYPOTHESIS_PROFILE", "advgraph") != "advgraph":
        pytest.skip(f"HYPOTHESIS_PROFILE={os.environ['HYPOTHESIS_PROFILE']} asks for random draws")
    assert SETTINGS.derandomize and SETTINGS_WIDE.derandomize and SETTINGS.database is None

    def draws():
        seen = []

        @SETTINGS
        @given(st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=5))
        def record(xs):
            seen.append(xs)

        record()
        return seen

    first = draws()
    assert len(first) > 5 and first == draws()
NORM_PER_SAMPLE = [
    pytest.param(n, p, id=f"{n}-{'per_sample' if p else 'global'}")
    for n in ("l2", "linf")
    for p in (False, True)
]

# Relative tolerance on ||delta|| (see the module docstring).
NORM_TOL = {"float16": 1e-3, "bfloat16": 2.0**-8, "float32": 1e-6, "float64": 1e-6}
# Elementwise relative tolerance against the float64 reference: one rounding to the
# dtype plus float32 arithmetic for half precision.
ELEM_RTOL = {
    "float16": 2.0**-11 + 1e-6,
    "bfloat16": 2.0**-8 + 1e-6,
    "float32": 1e-6,
    "float64": 1e-12,
}
# Elementwise absolute slack, for entries that are subnormal (or flushed to zero).
ELEM_ATOL = {"float16": 2.0**-24, "bfloat16": 4 * TINY["bfloat16"], "float32": 4 * TINY["float32"],
             "float64": 4 * TINY["float64"]}
# Largest magnitude of generated gradient entries (far from overflow in the dtype).
LIMIT = {"float16": 1e4, "bfloat16": 1e30, "float32": 1e30, "float64": 1e100}
MANTISSA_BITS = {"float16": 11, "bfloat16": 8, "float32": 24, "float64": 53}

norm_and_per_sample = st.tuples(st.sampled_from(["l2", "linf"]), st.booleans())
epsilons = st.floats(min_value=1e-2, max_value=1e2, allow_nan=False, allow_infinity=False)


# ---------------------------------------------------------------------------
# strategies and reference helpers
# ---------------------------------------------------------------------------


@st.composite
def grads(draw, dtype, min_dims=0, max_dims=3, max_side=5):
    """float64 arrays whose entries are 0 or normal numbers of ``dtype``, |x| <= LIMIT."""
    shape = draw(hnp.array_shapes(min_dims=min_dims, max_dims=max_dims, min_side=1,
                                  max_side=max_side))
    lim = LIMIT[dtype]
    x = draw(hnp.arrays(np.float64, shape, elements=st.floats(
        -lim, lim, allow_nan=False, allow_infinity=False, allow_subnormal=False)))
    x = np.array(x, dtype=np.float64)  # writable copy
    x[np.abs(x) < TINY[dtype]] = 0.0
    return x


@st.composite
def poisoned_grads(draw, dtype):
    """(grad, row_mask): grads with NaN/inf put in the rows of axis 0 where mask is True."""
    g = draw(grads(dtype, min_dims=1))
    batch = g.shape[0]
    mask = np.array(draw(st.lists(st.booleans(), min_size=batch, max_size=batch)), dtype=bool)
    rows = g.reshape(batch, -1).copy()
    for i in np.flatnonzero(mask):
        j = draw(st.integers(0, rows.shape[1] - 1))
        rows[i, j] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    return rows.reshape(g.shape), mask


def rows_of(x: np.ndarray, per_sample: bool) -> np.ndarray:
    """View ``x`` as (balls, entries): one row per sample, or one row for everything."""
    if per_sample:
        return x.reshape(x.shape[0], -1)
    return x.reshape(1, -1)


def safe_norm(x: np.ndarray, axis: int | None = None) -> np.ndarray:
    """l2 norm in float64 without underflow or overflow of the squares."""
    peak = np.max(np.abs(x), axis=axis, keepdims=True)
    peak = np.where(peak > 0, peak, 1.0)
    out = np.sqrt(np.sum((x / peak) ** 2, axis=axis, keepdims=True)) * peak
    return out.reshape(()) if axis is None else np.squeeze(out, axis=axis)


def norms(x: np.ndarray, per_sample: bool) -> np.ndarray:
    return safe_norm(rows_of(x, per_sample), axis=1)


def round_to_bits(x: float, bits: int) -> float:
    """Round a normal float64 to ``bits`` significant bits, ties to even."""
    m, e = math.frexp(x)
    return math.ldexp(round(m * 2.0**bits), e - bits)


def epsilon_in_dtype(epsilon: float, dtype: str) -> set[float]:
    """The values ``epsilon`` may take in ``dtype``: rounded once, or through float32.

    Half-precision results are computed in float32 and then cast, so epsilon can be
    rounded twice (float64 -> float32 -> half); in rare ties that differs from one
    rounding by one ulp of the half dtype. Both are accepted.
    """
    bits = MANTISSA_BITS[dtype]
    return {round_to_bits(epsilon, bits), round_to_bits(round_to_bits(epsilon, 24), bits)}


def check_l2_delta(d: np.ndarray, gq: np.ndarray, epsilon: float, dtype: str,
                   per_sample: bool) -> None:
    """d (float64) is the l2 FGM delta of gq (float64 values of the stored gradient)."""
    assert np.all(np.isfinite(d)), d
    tol = NORM_TOL[dtype]
    for rg, rd in zip(rows_of(gq, per_sample), rows_of(d, per_sample)):
        if not rg.any():
            assert not rd.any(), rd
            continue
        g_norm = safe_norm(rg)
        d_norm = safe_norm(rd)
        assert abs(d_norm - epsilon) <= tol * epsilon, (d_norm, epsilon)
        cosine = float((rd / d_norm) @ (rg / g_norm))
        assert cosine >= 1.0 - tol, cosine
        reference = epsilon * (rg / g_norm)
        np.testing.assert_allclose(rd, reference, rtol=ELEM_RTOL[dtype],
                                   atol=ELEM_ATOL[dtype] * max(1.0, epsilon))


def check_flags(result, expected_nonfinite: np.ndarray, expected_zero: np.ndarray) -> None:
    nonfinite = to_numpy(result.nonfinite)
    zero = to_numpy(result.zero)
    assert nonfinite.dtype == np.bool_ and zero.dtype == np.bool_
    assert nonfinite.shape == expected_nonfinite.shape, (nonfinite.shape, expected_nonfinite.shape)
    assert zero.shape == expected_zero.shape, (zero.shape, expected_zero.shape)
    np.testing.assert_array_equal(nonfinite, expected_nonfinite)
    np.testing.assert_array_equal(zero, expected_zero)


# ---------------------------------------------------------------------------
# fgm_delta / compute_delta, l2
# ---------------------------------------------------------------------------


def test_doc_example_three_four():
    np.testing.assert_allclose(fgm_delta(np.array([3.0, 4.0]), 1.0), [0.6, 0.8], rtol=1e-15)
    np.testing.assert_allclose(fgm_delta(np.array([3.0, 4.0]), 2.0, norm="linf"), [2.0, 2.0])


@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPE)
@SETTINGS
@given(data=st.data())
def test_l2_global_norm_direction_and_kind(backend, dtype, data):
    skip_unsupported(backend, dtype)
    g64 = data.draw(grads(dtype))
    epsilon = data.draw(epsilons)
    g = to_backend(g64, backend, dtype)
    gq = to_numpy64(g)

    result = compute_delta(g, epsilon)
    delta = fgm_delta(g, epsilon)

    assert_same_kind(delta, g)
    assert_same_kind(result.delta, g)
    np.testing.assert_array_equal(to_numpy64(delta), to_numpy64(result.delta))
    check_l2_delta(to_numpy64(delta), gq, epsilon, dtype, per_sample=False)
    check_flags(result, np.array(False), np.array(not gq.any()))


@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPE)
@SETTINGS
@given(data=st.data())
def test_l2_per_sample_rows_have_norm_epsilon(backend, dtype, data):
    skip_unsupported(backend, dtype)
    g64 = data.draw(grads(dtype, min_dims=1))
    # Zero some rows on purpose: they must give zero rows and the zero flag.
    batch = g64.shape[0]
    zero_rows = np.array(data.draw(st.lists(st.booleans(), min_size=batch, max_size=batch)))
    g64[zero_rows] = 0.0
    epsilon = data.draw(epsilons)
    g = to_backend(g64, backend, dtype)
    gq = to_numpy64(g)

    result = compute_delta(g, epsilon, per_sample=True)

    assert_same_kind(result.delta, g)
    d = to_numpy64(result.delta)
    check_l2_delta(d, gq, epsilon, dtype, per_sample=True)
    row_is_zero = ~rows_of(gq, True).any(axis=1)
    assert row_is_zero[zero_rows].all()
    check_flags(result, np.zeros(batch, dtype=bool), row_is_zero)


@pytest.mark.parametrize("backend", BACKENDS)
def test_l2_per_sample_on_1d_array_treats_each_entry_as_a_row(backend):
    require_backend(backend)
    g = to_backend(np.array([3.0, -4.0, 0.0, 1e-3]), backend, "float32")
    result = compute_delta(g, 2.0, per_sample=True)
    np.testing.assert_array_equal(to_numpy64(result.delta), [2.0, -2.0, 0.0, 2.0])
    check_flags(result, np.zeros(4, dtype=bool), np.array([False, False, True, False]))


# ---------------------------------------------------------------------------
# linf
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPE)
@SETTINGS
@given(data=st.data())
def test_linf_is_epsilon_times_sign(backend, dtype, data):
    skip_unsupported(backend, dtype)
    per_sample = data.draw(st.booleans(), label="per_sample")
    g64 = data.draw(grads(dtype, min_dims=1 if per_sample else 0))
    epsilon = data.draw(epsilons)
    g = to_backend(g64, backend, dtype)
    gq = to_numpy64(g)

    result = compute_delta(g, epsilon, norm="linf", per_sample=per_sample)

    assert_same_kind(result.delta, g)
    d = to_numpy64(result.delta)
    nonzero = d[d != 0]
    if nonzero.size:
        # one value of epsilon in the dtype, used everywhere
        magnitude = float(np.abs(nonzero[0]))
        assert magnitude in epsilon_in_dtype(epsilon, dtype), (magnitude, epsilon)
        expected = magnitude * np.sign(gq)
    else:
        expected = np.zeros_like(gq)
    np.testing.assert_array_equal(d, expected)  # exact
    assert np.all(np.abs(d) <= epsilon * (1 + UNIT_ROUNDOFF[dtype]))
    zero = ~rows_of(gq, per_sample).any(axis=1)
    flag_shape = (gq.shape[0],) if per_sample else ()
    check_flags(result, np.zeros(flag_shape, dtype=bool), zero.reshape(flag_shape))


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_linf_epsilon_is_rounded_to_a_neighbour_of_epsilon(backend, dtype):
    # An epsilon that is not representable in the dtype comes back as one of its two
    # neighbours in the dtype (the rounded value), not as something further away.
    skip_unsupported(backend, dtype)
    epsilon = 0.1
    g = to_backend(np.array([1.0, -2.0, 0.0]), backend, dtype)
    d = to_numpy64(fgm_delta(g, epsilon, norm="linf"))
    assert d[0] in epsilon_in_dtype(epsilon, dtype)
    np.testing.assert_array_equal(d, [d[0], -d[0], 0.0])


# ---------------------------------------------------------------------------
# zero, NaN and inf gradients
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPE)
@pytest.mark.parametrize("norm, per_sample", NORM_PER_SAMPLE)
@pytest.mark.parametrize("shape", [(), (1,), (3,), (2, 3), (2, 3, 4)], ids=str)
def test_zero_gradient_gives_zero_delta(backend, dtype, norm, per_sample, shape):
    skip_unsupported(backend, dtype)
    if per_sample and shape == ():
        shape = (1,)  # per_sample needs ndim >= 1 (0-d: see test_core_errors)
    g = to_backend(np.zeros(shape), backend, dtype)

    result = compute_delta(g, 0.5, norm=norm, per_sample=per_sample)

    assert_same_kind(result.delta, g)
    d = to_numpy64(result.delta)
    assert not np.isnan(d).any()
    np.testing.assert_array_equal(d, np.zeros(shape))
    flag_shape = (shape[0],) if per_sample else ()
    check_flags(result, np.zeros(flag_shape, dtype=bool), np.ones(flag_shape, dtype=bool))


# The core masks NaN/inf entries before any arithmetic, so numpy must not warn about
# `inf * 0` or overflowing squares on non-finite rows: such a warning fails the test.
NONFINITE_NUMPY_WARNINGS = [
    pytest.mark.filterwarnings("error:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("error:overflow encountered:RuntimeWarning"),
]


@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPE)
@NONFINITE_NUMPY_WARNINGS[0]
@NONFINITE_NUMPY_WARNINGS[1]
@SETTINGS_WIDE
@given(data=st.data())
def test_nonfinite_gradient_gives_zero_delta_and_flag(backend, dtype, data):
    skip_unsupported(backend, dtype)
    norm, per_sample = data.draw(norm_and_per_sample, label="norm, per_sample")
    g64, bad_rows = data.draw(poisoned_grads(dtype))
    epsilon = data.draw(epsilons)
    g = to_backend(g64, backend, dtype)
    gq = to_numpy64(g)

    result = compute_delta(g, epsilon, norm=norm, per_sample=per_sample)

    assert_same_kind(result.delta, g)
    d = to_numpy64(result.delta)
    assert np.all(np.isfinite(d)), d
    g_rows = rows_of(gq, per_sample)
    d_rows = rows_of(d, per_sample)
    bad = ~np.isfinite(g_rows).all(axis=1)
    np.testing.assert_array_equal(bad, bad_rows if per_sample else [bad_rows.any()])
    assert not d_rows[bad].any()
    zero = ~bad & ~g_rows.any(axis=1)
    if per_sample:
        check_flags(result, bad, zero)
    else:
        check_flags(result, np.array(bad[0]), np.array(zero[0]))
    # The finite rows still get their ordinary delta.
    good = ~bad
    if good.any():
        if norm == "l2":
            check_l2_delta(d_rows[good], g_rows[good], epsilon, dtype, per_sample=True)
        else:
            nz = d_rows[good][d_rows[good] != 0]
            if nz.size:
                assert float(np.abs(nz[0])) in epsilon_in_dtype(epsilon, dtype)
                np.testing.assert_array_equal(d_rows[good], np.abs(nz[0]) * np.sign(g_rows[good]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@NONFINITE_NUMPY_WARNINGS[0]
@NONFINITE_NUMPY_WARNINGS[1]
def test_single_nonfinite_entry_zeroes_everything_globally(backend, bad):
    require_backend(backend)
    g64 = np.arange(1.0, 13.0).reshape(3, 4)
    g64[1, 2] = bad
    g = to_backend(g64, backend, "float32")

    glob = compute_delta(g, 1.0)
    rows = compute_delta(g, 1.0, per_sample=True)

    np.testing.assert_array_equal(to_numpy64(glob.delta), np.zeros((3, 4)))
    assert bool(to_numpy(glob.nonfinite)) is True
    d = to_numpy64(rows.delta)
    np.testing.assert_array_equal(d[1], np.zeros(4))
    np.testing.assert_allclose(safe_norm(d[[0, 2]], axis=1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(to_numpy(rows.nonfinite), [False, True, False])


# ---------------------------------------------------------------------------
# extreme magnitudes: norms must not overflow or underflow
# ---------------------------------------------------------------------------


def _big_gradient(magnitude: float, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    signs = rng.choice([-1.0, 1.0], size=shape)
    return signs * magnitude * rng.uniform(0.5, 1.0, size=shape)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_sample", [False, True], ids=["global", "per_sample"])
def test_large_float16_gradients_give_finite_delta(backend, per_sample):
    # sum(g**2) ~ 1e11 overflows float16 (max 65504); the norm must accumulate wider.
    skip_unsupported(backend, "float16")
    g64 = _big_gradient(2e4, (4, 250))
    g = to_backend(g64, backend, "float16")
    epsilon = 0.7

    result = compute_delta(g, epsilon, per_sample=per_sample)

    d = to_numpy64(result.delta)
    assert np.all(np.isfinite(d))
    np.testing.assert_allclose(norms(d, per_sample), epsilon, rtol=1e-3)
    check_l2_delta(d, to_numpy64(g), epsilon, "float16", per_sample)
    assert not to_numpy(result.nonfinite).any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("magnitude", [1e30, 3e38, 1e-30, 1e-36], ids=str)
@pytest.mark.parametrize("per_sample", [False, True], ids=["global", "per_sample"])
def test_extreme_float32_range_gradients_give_norm_epsilon(backend, dtype, magnitude, per_sample):
    # 1e30**2 overflows float32 and 1e-30**2 underflows it: the implementation
    # scales by max|g| before squaring, so both still give ||delta|| = epsilon.
    skip_unsupported(backend, dtype)
    g64 = _big_gradient(magnitude, (4, 250))
    g = to_backend(g64, backend, dtype)
    gq = to_numpy64(g)
    assert np.all(np.isfinite(gq)) and np.all(gq != 0)
    epsilon = 1.3

    result = compute_delta(g, epsilon, per_sample=per_sample)

    d = to_numpy64(result.delta)
    assert np.all(np.isfinite(d))
    np.testing.assert_allclose(norms(d, per_sample), epsilon, rtol=NORM_TOL[dtype])
    check_l2_delta(d, gq, epsilon, dtype, per_sample)
    assert not to_numpy(result.nonfinite).any() and not to_numpy(result.zero).any()


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@NONFINITE_NUMPY_WARNINGS[0]
@NONFINITE_NUMPY_WARNINGS[1]
def test_rows_beside_a_nonfinite_row_keep_their_delta_bit_for_bit(backend):
    """Eager numpy and torch take two passes (the plain norm, then the product) when
    every row's norm is in range, the masked path otherwise; the masked path gives
    the in-range rows the same formula. So one poisoned row leaves every other row's
    delta exactly as without it (and compiled torch, TensorFlow and JAX, which always
    take the masked path, compute what eager code does)."""
    require_backend(backend)
    rng = np.random.default_rng(0)
    g64 = rng.standard_normal((6, 33)) * np.array([1e-3, 1.0, 7.0, 1e3, 0.1, 3.0])[:, None]
    alone = to_numpy(compute_delta(to_backend(g64, backend, "float32"), 0.7, per_sample=True).delta)
    g32 = g64.astype(np.float32)  # the two-pass formula, written by hand
    if backend == "torch":
        import torch

        t = torch.from_numpy(g32)
        by_hand = (t * (0.7 / torch.linalg.vector_norm(t, dim=1, keepdim=True))).numpy()
    else:
        by_hand = g32 * (0.7 / np.sqrt((g32 * g32).sum(axis=1, keepdims=True)))
    assert np.array_equal(alone, by_hand)
    poisoned = g64.copy()
    poisoned[2, 5] = np.nan
    result = compute_delta(to_backend(poisoned, backend, "float32"), 0.7, per_sample=True)
    got = to_numpy(result.delta)
    keep = [0, 1, 3, 4, 5]
    assert np.array_equal(got[keep], alone[keep])
    assert not got[2].any() and to_numpy(result.nonfinite).tolist() == [False, False, True, False, False, False]
    # The check can fail: the scaled formula (g / max|g| normalised) differs from
    # the two-pass one in the last bits of these rows.
    scaled = g32 / np.abs(g32).max(axis=1, keepdims=True)
    other = scaled * (np.float32(0.7) / np.sqrt((scaled * scaled).sum(axis=1, keepdims=True)))
    assert not np.array_equal(other[keep], alone[keep])
    np.testing.assert_allclose(other[keep], alone[keep], rtol=1e-6)


@pytest.mark.parametrize("per_sample", [False, True], ids=["global", "per_sample"])
def test_numpy_never_computes_an_overflowing_value(per_sample):
    """The module's promise: masking keeps every operation finite, so numpy neither
    warns nor raises under np.seterr: compute_delta also for rows outside the two-pass
    range (next to an in-range row, so both formulas are computed), and project()."""
    g = np.full((3, 5), 3e38, dtype=np.float32)
    g[1] = 1.0
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        d = compute_delta(g, 1.3, per_sample=per_sample).delta
    assert np.isfinite(d).all()
    np.testing.assert_allclose(norms(d.astype(np.float64), per_sample), 1.3, rtol=1e-6)
    # project(): a row of tiny (subnormal) entries next to one outside the ball; the
    # scaling factor of the inside row must not be computed (it would overflow).
    p = np.full((3, 5), 2.0, dtype=np.float32)
    p[1] = 1e-44
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        out = project(p, 1.3, per_sample=per_sample)
    assert np.isfinite(out).all()
    if per_sample:
        assert np.array_equal(out[1], p[1])  # inside the ball: unchanged


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_huge_gradient(backend):
    require_backend(backend)
    g = to_backend(_big_gradient(1e300, (3, 7)), backend, "float64")
    d = to_numpy64(fgm_delta(g, 2.0))
    np.testing.assert_allclose(safe_norm(d), 2.0, rtol=1e-12)


# ---------------------------------------------------------------------------
# agreement between backends
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("norm, per_sample", NORM_PER_SAMPLE)
@SETTINGS
@given(data=st.data())
def test_backends_agree_on_float32(norm, per_sample, data):
    for name in BACKENDS:
        require_backend(name)
    g64 = data.draw(grads("float32", min_dims=1 if per_sample else 0))
    if g64.ndim and data.draw(st.booleans()):
        g64[0] = 0.0  # a zero row too, now and then
    epsilon = data.draw(epsilons)

    results = {
        name: compute_delta(to_backend(g64, name, "float32"), epsilon, norm=norm,
                            per_sample=per_sample)
        for name in BACKENDS
    }

    ref = results["numpy"]
    ref_delta = to_numpy64(ref.delta)
    for name in ("torch", "tensorflow"):
        np.testing.assert_allclose(to_numpy64(results[name].delta), ref_delta, rtol=1e-6,
                                   atol=4 * TINY["float32"] * max(1.0, epsilon), err_msg=name)
        np.testing.assert_array_equal(to_numpy(results[name].nonfinite), to_numpy(ref.nonfinite))
        np.testing.assert_array_equal(to_numpy(results[name].zero), to_numpy(ref.zero))


# ---------------------------------------------------------------------------
# project
# ---------------------------------------------------------------------------


def _ball_slack(dtype: str) -> float:
    """Relative slack on the ball's radius: the final rounding to the dtype."""
    return max(1e-6, 2 * UNIT_ROUNDOFF[dtype])


@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPE)
@SETTINGS_WIDE
@given(data=st.data())
def test_project_lands_in_ball_and_is_idempotent(backend, dtype, data):
    skip_unsupported(backend, dtype)
    norm, per_sample = data.draw(norm_and_per_sample, label="norm, per_sample")
    d64 = data.draw(grads(dtype, min_dims=1 if per_sample else 0))
    epsilon = data.draw(epsilons)
    d = to_backend(d64, backend, dtype)
    dq = to_numpy64(d)

    out = project(d, epsilon, norm=norm, per_sample=per_sample)

    assert_same_kind(out, d)
    p = to_numpy64(out)
    assert np.all(np.isfinite(p))
    slack = _ball_slack(dtype)
    if norm == "l2":
        assert np.all(norms(p, per_sample) <= epsilon * (1 + slack))
        # rows outside the ball are scaled onto the sphere, rows inside are kept
        for rd, rp in zip(rows_of(dq, per_sample), rows_of(p, per_sample)):
            length = safe_norm(rd)
            if length > epsilon * (1 + slack):
                np.testing.assert_allclose(rp, rd * (epsilon / length), rtol=ELEM_RTOL[dtype],
                                           atol=ELEM_ATOL[dtype] * max(1.0, epsilon))
            elif length <= epsilon * (1 - slack):
                np.testing.assert_array_equal(rp, rd)
    else:
        assert np.all(np.abs(p) <= epsilon * (1 + UNIT_ROUNDOFF[dtype]))
        inside = np.abs(dq) <= epsilon
        np.testing.assert_array_equal(p[inside], dq[inside])
        clipped = np.abs(p[~inside])
        if clipped.size:
            assert float(clipped[0]) in epsilon_in_dtype(epsilon, dtype)
            np.testing.assert_array_equal(p[~inside], clipped[0] * np.sign(dq[~inside]))

    again = to_numpy64(project(out, epsilon, norm=norm, per_sample=per_sample))
    rtol = 1e-6 if dtype in ("float32", "float64") else 2 * UNIT_ROUNDOFF[dtype]
    np.testing.assert_allclose(again, p, rtol=rtol, atol=ELEM_ATOL[dtype] * max(1.0, epsilon))


@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPE)
@SETTINGS_WIDE
@given(data=st.data())
def test_project_keeps_points_inside_the_ball(backend, dtype, data):
    skip_unsupported(backend, dtype)
    norm, per_sample = data.draw(norm_and_per_sample, label="norm, per_sample")
    d64 = data.draw(grads(dtype, min_dims=1 if per_sample else 0))
    epsilon = data.draw(epsilons)
    fraction = data.draw(st.floats(0.0, 0.99))
    # Scale into the ball with a 1% margin (more than any dtype's rounding).
    if norm == "l2":
        scale = safe_norm(rows_of(d64, per_sample), axis=1)
        scale = np.where(scale > 0, scale, 1.0)
        if per_sample:
            scale = scale.reshape((-1,) + (1,) * (d64.ndim - 1))
        else:
            scale = scale[0]
    else:
        scale = np.max(np.abs(d64)) if d64.any() else 1.0
    d64 = np.array(d64 / scale * (epsilon * fraction), dtype=np.float64)
    d64[np.abs(d64) < TINY[dtype]] = 0.0  # no subnormals (TensorFlow flushes them)
    d = to_backend(d64, backend, dtype)

    out = project(d, epsilon, norm=norm, per_sample=per_sample)

    assert_same_kind(out, d)
    if norm == "linf":
        np.testing.assert_array_equal(to_numpy64(out), to_numpy64(d))  # bitwise in the dtype
        assert raw_bytes(out) == raw_bytes(d)
    else:
        np.testing.assert_allclose(to_numpy64(out), to_numpy64(d), rtol=1e-7, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_project_zeroes_nonfinite_rows(backend):
    require_backend(backend)
    d64 = np.array([[3.0, 4.0], [math.nan, 1.0], [0.1, 0.0]])
    d = to_backend(d64, backend, "float32")
    out = to_numpy64(project(d, 1.0, per_sample=True))
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, 0.0], [0.1, 0.0]], rtol=1e-6)
    out = to_numpy64(project(d, 1.0, norm="linf"))
    np.testing.assert_array_equal(out, np.zeros((3, 2)))


# ---------------------------------------------------------------------------
# random_init
# ---------------------------------------------------------------------------


def _rng_for(backend: str, seed: int):
    module = require_backend(backend)
    if backend == "numpy":
        return seed
    if backend == "torch":
        return module.Generator().manual_seed(seed)
    return module.random.Generator.from_seed(seed)


@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPE)
@pytest.mark.parametrize("norm, per_sample", NORM_PER_SAMPLE)
@pytest.mark.parametrize("seeded", [True, False], ids=["seeded", "unseeded"])
def test_random_init_inside_ball(backend, dtype, norm, per_sample, seeded):
    skip_unsupported(backend, dtype)
    like = to_backend(np.zeros((16, 3, 5)), backend, dtype)
    epsilon = 0.3
    rng = _rng_for(backend, 1) if seeded else None

    out = random_init(like, epsilon, norm=norm, per_sample=per_sample, rng=rng)

    assert_same_kind(out, like)
    r = to_numpy64(out)
    assert np.all(np.isfinite(r))
    assert r.any()
    slack = _ball_slack(dtype)
    if norm == "l2":
        assert np.all(norms(r, per_sample) <= epsilon * (1 + slack))
    else:
        assert np.all(np.abs(r) <= epsilon * (1 + slack))
        # uniform in [-eps, eps]: both signs, and not all at the boundary
        assert (r > 0).any() and (r < 0).any()
        assert (np.abs(r) < 0.9 * epsilon).any()


@pytest.mark.parametrize("norm, per_sample", NORM_PER_SAMPLE)
def test_random_init_numpy_seed_is_reproducible(norm, per_sample):
    like = np.zeros((4, 6))
    a = random_init(like, 1.0, norm=norm, per_sample=per_sample, rng=123)
    b = random_init(like, 1.0, norm=norm, per_sample=per_sample, rng=123)
    c = random_init(like, 1.0, norm=norm, per_sample=per_sample,
                    rng=np.random.default_rng(123))
    other = random_init(like, 1.0, norm=norm, per_sample=per_sample, rng=124)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    assert not np.array_equal(a, other)


def test_random_init_numpy_radius_is_independent_of_direction():
    # Regression: an integer seed used to seed a fresh Generator for each draw, so the
    # radius u replayed the bits of the first normal draw (corr ~0.1 here).
    radius, first = [], []
    for seed in range(4000):
        r = random_init(np.zeros(2), 1.0, rng=seed)
        length = safe_norm(r)
        radius.append(length)
        first.append(abs(r[0]) / length)
    assert abs(np.corrcoef(radius, first)[0, 1]) < 0.06


@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_random_init_framework_generator_is_reproducible(backend, norm):
    like = to_backend(np.zeros((4, 6)), backend, "float32")
    a = to_numpy64(random_init(like, 1.0, norm=norm, rng=_rng_for(backend, 5)))
    b = to_numpy64(random_init(like, 1.0, norm=norm, rng=_rng_for(backend, 5)))
    c = to_numpy64(random_init(like, 1.0, norm=norm, rng=_rng_for(backend, 6)))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_sample", [False, True], ids=["global", "per_sample"])
def test_random_init_l2_starts_differ(backend, per_sample):
    require_backend(backend)
    like = to_backend(np.zeros((3, 4)), backend, "float32")
    rng = np.random.default_rng(0) if backend == "numpy" else None
    draws = [to_numpy64(random_init(like, 1.0, per_sample=per_sample, rng=rng))
             for _ in range(3)]
    assert not np.array_equal(draws[0], draws[1])
    assert not np.array_equal(draws[1], draws[2])
    if per_sample:
        rows = draws[0]
        assert not np.array_equal(rows[0], rows[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_init_l2_is_uniform_in_the_ball(backend):
    # 4000 balls in 3 dimensions: P(||x|| <= r * eps) = r**3 for a uniform draw.
    require_backend(backend)
    epsilon = 2.0
    like = to_backend(np.zeros((4000, 3)), backend, "float32")
    r = to_numpy64(random_init(like, epsilon, per_sample=True, rng=_rng_for(backend, 7)))
    radius = safe_norm(r, axis=1) / epsilon
    assert np.all(radius <= 1 + 1e-6)
    for q in (0.5, 0.8, 0.95):
        assert abs(np.mean(radius <= q) - q**3) < 0.035, (q, np.mean(radius <= q))
    # no preferred direction
    assert np.all(np.abs(np.mean(r / epsilon, axis=0)) < 0.05)


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_init_linf_is_uniform_in_the_box(backend):
    require_backend(backend)
    like = to_backend(np.zeros((2000, 4)), backend, "float32")
    r = to_numpy64(random_init(like, 0.5, norm="linf", rng=_rng_for(backend, 3))) / 0.5
    assert np.all(np.abs(r) <= 1.0)
    for q in (0.25, 0.5, 0.9):
        assert abs(np.mean(np.abs(r) <= q) - q) < 0.03


# ---------------------------------------------------------------------------
# torch devices, TensorFlow variables and graphs
# ---------------------------------------------------------------------------


def test_torch_result_stays_on_device():
    torch = require_backend("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    g = to_backend(np.array([[3.0, 4.0], [0.0, 0.0]]), "torch", "float16", device="cuda")
    for out in (fgm_delta(g, 1.0), project(g, 1.0), random_init(g, 1.0),
                compute_delta(g, 1.0, per_sample=True).nonfinite):
        assert out.device == g.device
    np.testing.assert_allclose(to_numpy64(fgm_delta(g, 1.0))[0], [0.6, 0.8], rtol=1e-3)


def test_tf_variable_input():
    tf = require_backend("tensorflow")
    v = tf.Variable([[3.0, 4.0]], dtype=tf.float32)
    out = fgm_delta(v, 1.0)
    assert tf.is_tensor(out) and out.dtype == v.dtype and tuple(out.shape) == (1, 2)
    np.testing.assert_allclose(to_numpy64(out), [[0.6, 0.8]], rtol=1e-6)


@pytest.mark.parametrize(
    "dtype, jit",
    [pytest.param(d, False, id=f"graph-{d}") for d in DTYPES]
    # XLA compiles are slow (~1 s each on CPU): the two dtypes XLA users train in.
    + [pytest.param(d, True, id=f"xla-{d}") for d in ("float32", "bfloat16")],
)
def test_tf_function_matches_eager(dtype, jit):
    tf = require_backend("tensorflow")
    g64 = _big_gradient(3.0, (4, 3, 5), seed=11)
    g64[1] = 0.0
    g64[2, 1, 1] = math.nan
    g = to_backend(g64, "tensorflow", dtype)
    combos = [(n, p) for n in ("l2", "linf") for p in (False, True)]

    def fn(x):
        out = []
        for norm, per_sample in combos:
            res = compute_delta(x, 0.25, norm=norm, per_sample=per_sample)
            out.append((res.delta, res.nonfinite, res.zero,
                        project(x, 0.25, norm=norm, per_sample=per_sample)))
        return out

    eager = fn(g)
    # unknown batch size, as Keras traces train_step (regression: per_sample used to
    # reshape the flags to grad.shape[0], which is None there)
    spec = tf.TensorSpec([None, 3, 5], g.dtype)
    unknown = tf.function(fn, jit_compile=jit, input_signature=[spec])(g)
    # known shapes (XLA compiles for the concrete shape either way: skip it there)
    graph = unknown if jit else tf.function(fn)(g)

    for (norm, per_sample), e_out, g_out, u_out in zip(combos, eager, graph, unknown):
        for compiled in (g_out, u_out):
            for e, c in zip(e_out, compiled):
                msg = f"{norm} per_sample={per_sample}"
                assert c.dtype == e.dtype and tuple(c.shape) == tuple(e.shape), msg
                if e.dtype == tf.bool:
                    np.testing.assert_array_equal(c.numpy(), e.numpy(), err_msg=msg)
                else:
                    # XLA may fuse differently: allow one rounding of the dtype.
                    np.testing.assert_allclose(to_numpy64(c), to_numpy64(e), atol=0,
                                               rtol=max(1e-6, 2 * UNIT_ROUNDOFF[dtype]),
                                               err_msg=msg)
        delta, nonfinite, zero, _ = e_out
        if per_sample:
            np.testing.assert_array_equal(nonfinite.numpy(), [False, False, True, False])
            np.testing.assert_array_equal(zero.numpy(), [False, True, False, False])
            assert not to_numpy64(delta)[[1, 2]].any()
        else:
            assert bool(nonfinite.numpy()) is True and bool(zero.numpy()) is False
            assert not to_numpy64(delta).any()


@pytest.mark.parametrize("jit", [False, True], ids=["graph", "xla"])
@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_tf_random_init_in_tf_function(jit, norm):
    tf = require_backend("tensorflow")
    gen = tf.random.Generator.from_seed(0)
    like = tf.zeros([8, 6], tf.float32)
    fn = tf.function(lambda x: random_init(x, 0.5, norm=norm, per_sample=True, rng=gen),
                     jit_compile=jit)
    r = to_numpy64(fn(like))
    assert r.shape == (8, 6) and r.any()
    if norm == "l2":
        assert np.all(safe_norm(r, axis=1) <= 0.5 * (1 + 1e-6))
    else:
        assert np.all(np.abs(r) <= 0.5)


def test_public_names_are_the_core_functions():
    assert advgraph.fgm_delta is fgm_delta
    assert advgraph.compute_delta is compute_delta
    assert advgraph.project is project
    assert advgraph.random_init is random_init


@pytest.mark.parametrize("library", ["numpy", "torch"])
@pytest.mark.parametrize("shape, per_sample, flags", [
    ((5, 3), False, ()), ((5, 3), True, (5,)), ((1, 3), True, (1,)), ((4,), False, ()),
], ids=["global", "per_sample", "per_sample_batch_1", "vector"])
def test_two_pass_path_flags_are_false_arrays_of_the_gradients_library(library, shape, per_sample, flags, monkeypatch):
    """Every norm in range (the eager two-pass path; a single norm is compared as a
    Python number): no row is skipped, so both flags are all False, with the shape
    the docs give, as bool arrays of the gradient's own library; and delta is the
    two-pass formula, entry for entry (numpy float64 reference). The masked path
    (which starts with ``_finite_part``) must not run."""
    from advgraph import _delta

    masked = []
    finite_part = _delta._finite_part
    monkeypatch.setattr(_delta, "_finite_part", lambda *a: (masked.append(1), finite_part(*a))[1])
    g64 = np.random.default_rng(0).normal(size=shape)
    if library == "torch":
        torch = pytest.importorskip("torch")
        grad = torch.tensor(g64)
        array_type, as_numpy = torch.Tensor, lambda a: a.numpy()
    else:
        grad, array_type, as_numpy = g64, np.ndarray, np.asarray
    result = compute_delta(grad, 0.5, per_sample=per_sample)
    for flag in (result.nonfinite, result.zero):
        assert isinstance(flag, array_type)
        assert as_numpy(flag).dtype == np.bool_ and as_numpy(flag).shape == flags
        assert not as_numpy(flag).any()
    assert result.nonfinite is not result.zero  # two arrays: one changed leaves the other
    axes = tuple(range(1, len(shape))) if per_sample else tuple(range(len(shape)))
    expected = g64 * (0.5 / np.sqrt(np.sum(g64 * g64, axis=axes, keepdims=True)))
    np.testing.assert_allclose(as_numpy(result.delta), expected, rtol=1e-14, atol=0)
    assert masked == []


def test_falses_are_on_the_arrays_device():
    torch = pytest.importorskip("torch")
    from advgraph._ops import ops_for

    like = torch.empty(2, device="meta")
    flags = ops_for(like).falses(like, (3,))
    assert flags.device.type == "meta" and flags.dtype == torch.bool and flags.shape == (3,)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 0.0, 1e-22, 1e-30, 1e30, 1e19])
def test_one_norm_out_of_the_plain_range_takes_the_masked_path(bad, monkeypatch):
    """A global delta's single norm, compared as a Python number: NaN, inf, zero and
    norms beyond either end of the plain range (float32: below ~1.4e-11 or above
    ~9.2e18) are not in range: the masked path runs (spied on) and gives 0 and a
    flag, or the direction computed on scaled values. 1e-22 has a finite, nonzero
    plain norm whose squares lost precision to underflow (the two-pass formula is off
    by ~4e-3 there); 1e19 a finite plain norm above the upper end."""
    torch = pytest.importorskip("torch")
    from advgraph import _delta

    masked = []
    finite_part = _delta._finite_part
    monkeypatch.setattr(_delta, "_finite_part", lambda *a: (masked.append(1), finite_part(*a))[1])
    grad = torch.tensor([bad, bad / 2 if bad == bad else bad], dtype=torch.float32)
    result = compute_delta(grad, 1.0)
    assert masked == [1]
    if bad != bad or bad in (float("inf"),):
        assert bool(result.nonfinite) and torch.equal(result.delta, torch.zeros(2))
    elif bad == 0.0:
        assert bool(result.zero) and torch.equal(result.delta, torch.zeros(2))
    else:
        assert not bool(result.nonfinite) and not bool(result.zero)
        expected = np.array([2.0, 1.0]) / math.sqrt(5.0)
        np.testing.assert_allclose(result.delta.numpy(), expected, rtol=1e-6)


def _quotient_cases():
    """Denominators over the plain range's decades and just inside its ends, with
    radii a user would pick and arbitrary ones (seeded: the same cases every run)."""
    rng = np.random.default_rng(7)
    denominators = np.concatenate([
        10.0 ** rng.uniform(-10, 18, 3000) * rng.uniform(0.5, 2.0, 3000),
        [1.5e-11, 1.0, 3.0, 7.0, 1e18, 9e18, np.nextafter(1.0, 2.0)],
    ])
    radii = np.concatenate([[1.0, 0.5, 0.1, 1e-3, 3.7, 2.0, 1e6], 10.0 ** rng.uniform(-6, 6, 3000)])
    return denominators, radii


@pytest.mark.parametrize("library", ["numpy", "torch"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_scalar_quotient_is_the_array_quotient_bit_for_bit(library, dtype):
    """``Ops.scalar_quotient(n, d, like)``: the Python number the fast path multiplies
    by equals, bit for bit, ``n / array`` in the library itself (torch: reciprocal
    then product; numpy: a division), for a one-entry array of each dtype."""
    from advgraph._ops import ops_for

    if library == "torch":
        torch = pytest.importorskip("torch")
        make = lambda v: torch.tensor([[v]], dtype=getattr(torch, dtype))  # noqa: E731
        value = lambda a: a.item()  # noqa: E731
    else:
        make = lambda v: np.array([[v]], dtype=dtype)  # noqa: E731
        value = lambda a: float(a[0, 0])  # noqa: E731
    denominators, radii = _quotient_cases()
    mismatches = []
    for i, d in enumerate(denominators):
        array = make(d)
        ops = ops_for(array)
        n = float(radii[i % len(radii)])
        got = ops.scalar_quotient(n, ops.to_float(array), array)
        expected = value(n / array)
        if got is None or got != expected:
            mismatches.append((float(d), n, got, expected))
    assert mismatches == []


def test_scalar_quotient_declines_where_the_bits_are_not_known():
    """None (the caller divides arrays) for dtypes it does not emulate and for other
    libraries' Ops; past float32's range it gives the arrays' inf (or None)."""
    torch = pytest.importorskip("torch")
    from advgraph._ops import Ops, ops_for

    for dtype in (torch.float16, torch.bfloat16):
        like = torch.ones(1, dtype=dtype)
        assert ops_for(like).scalar_quotient(1.0, 1.0, like) is None
    assert Ops().scalar_quotient(1.0, 2.0, np.ones(1)) is None
    like = torch.ones(1, dtype=torch.float32)
    past = ops_for(like).scalar_quotient(1e30, 1e-15, like)
    expected = (1e30 / torch.tensor([1e-15])).item()
    assert math.isinf(expected) and (past is None or past == expected)


@pytest.mark.parametrize("library", ["numpy", "torch"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_global_delta_is_the_array_formula_bit_for_bit(library, dtype):
    """A global delta (one norm) multiplies by a Python number: the same bits as the
    array formula ``cast(wide * (epsilon / norm))``, written here with the library's
    own operations, for every float dtype (half precision widened to float32), over
    200 seeded gradients of different scales and radii (a naive ``epsilon / norm`` in
    double precision differs from the array quotient in about a third of them)."""
    rng = np.random.default_rng(3)
    if library == "numpy" and dtype == "bfloat16":
        pytest.skip("numpy has no bfloat16 without ml_dtypes")
    if library == "torch":
        torch = pytest.importorskip("torch")
    differ = []
    for case in range(200):
        g64 = rng.normal(size=(int(rng.integers(1, 40)), 5)) * 10.0 ** rng.uniform(-3, 2)
        epsilon = float(rng.choice([1.0, 0.5, 0.1])) if case % 2 else float(10.0 ** rng.uniform(-3, 1))
        if library == "torch":
            grad = torch.tensor(g64).to(getattr(torch, dtype))
            wide = grad.float() if dtype in ("float16", "bfloat16") else grad
            norm = torch.linalg.vector_norm(wide, dim=(0, 1), keepdim=True)
            expected = (wide * (epsilon / norm)).to(grad.dtype)
            got = compute_delta(grad, epsilon).delta
            same = torch.equal(got.view(torch.uint8), expected.view(torch.uint8))
        else:
            grad = g64.astype(dtype)
            wide = grad.astype(np.float32) if dtype == "float16" else grad
            norm = np.sqrt(np.sum(wide * wide, axis=(0, 1), keepdims=True))
            expected = (wide * (epsilon / norm)).astype(grad.dtype)
            got = compute_delta(grad, epsilon).delta
            same = got.dtype == expected.dtype and got.tobytes() == expected.tobytes()
        if not same:
            differ.append((case, epsilon))
    assert differ == []


def test_a_python_that_refuses_float32_overflow_divides_arrays_instead(monkeypatch):
    """Where ``struct`` raises OverflowError past float32's range (some Pythons do),
    ``scalar_quotient`` declines and ``compute_delta`` falls back to the array
    quotient; past the range either way the result has the array formula's bytes."""
    torch = pytest.importorskip("torch")
    from advgraph import _ops

    # A norm inside the plain range (~4e-10), so the two-pass path runs, whose
    # quotient 1e30 / 4e-10 is past float32's range.
    grad = torch.tensor([[1e-10, 2e-10], [3e-10, 1e-10]], dtype=torch.float32)
    expected = grad * (1e30 / torch.linalg.vector_norm(grad, dim=(0, 1), keepdim=True))
    assert torch.isinf(expected).any()
    as_is = compute_delta(grad, 1e30).delta
    assert torch.equal(as_is.view(torch.uint8), expected.view(torch.uint8))

    def refuses(value):
        raise OverflowError("float too large to pack with f format")

    monkeypatch.setattr(_ops, "_to_float32", refuses)
    like = torch.ones(1)
    assert _ops.ops_for(like).scalar_quotient(1.0, 2.0, like) is None
    fallback = compute_delta(grad, 1e30).delta
    assert torch.equal(fallback.view(torch.uint8), expected.view(torch.uint8))


def test_a_fast_path_result_says_nothing_was_skipped_and_a_changed_one_does_not():
    """``skipped_nothing`` is True for the eager two-pass path's result (whose flags
    are all False by construction) and False for the masked path's. A result rebuilt
    with ``_replace`` (a method marking a row itself) is a plain DeltaResult again,
    so its flags are read."""
    torch = pytest.importorskip("torch")
    from advgraph._delta import DeltaResult, skipped_nothing

    fast = compute_delta(torch.tensor([[3.0, 4.0]]), 1.0)
    assert skipped_nothing(fast) and isinstance(fast, DeltaResult)
    assert not skipped_nothing(compute_delta(torch.tensor([[0.0, 0.0]]), 1.0))
    assert not skipped_nothing(compute_delta(torch.tensor([[float("nan"), 1.0]]), 1.0))
    changed = fast._replace(zero=torch.tensor(True))
    assert type(changed) is DeltaResult and not skipped_nothing(changed)
    delta, nonfinite, zero = fast  # still a 3-tuple
    assert torch.equal(delta, fast.delta)


@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
def test_ops_for_known_arrays_is_the_namespace_lookup_and_still_refuses_non_arrays(monkeypatch):
    """ops_for's fast route (a torch tensor or numpy array whose library was resolved
    before) gives the Ops built on the namespace array-api-compat names for the array,
    without asking array-api-compat again; objects of the same modules that are not
    arrays it accepts (a dtype, a device, a Size, numpy scalars of Python types,
    np.matrix) are still refused with the TypeError, not handed torch's or numpy's Ops."""
    torch = pytest.importorskip("torch")
    import array_api_compat

    from advgraph import _ops

    monkeypatch.setattr(_ops, "_API_OPS", {})  # resolved afresh here, whatever ran before
    tensor, array = torch.zeros(1), np.zeros(1)
    torch_ops, numpy_ops = _ops.ops_for(tensor), _ops.ops_for(array)
    assert torch_ops.xp is array_api_compat.array_namespace(tensor) and torch_ops.name == "torch"
    assert numpy_ops.xp is array_api_compat.array_namespace(array) and numpy_ops.name == "numpy"

    def no_lookup(*arrays):
        raise AssertionError("the namespace was looked up again")

    monkeypatch.setattr(array_api_compat, "array_namespace", no_lookup)
    assert _ops.ops_for(torch.nn.Parameter(torch.zeros(2))) is torch_ops
    assert _ops.ops_for(torch.zeros(2, dtype=torch.float16)) is torch_ops
    assert _ops.ops_for(np.zeros((2, 2), np.float32)) is numpy_ops
    monkeypatch.undo()

    assert _ops.ops_for(np.ma.masked_array([1.0])).name == "numpy"  # a subclass: the namespace route
    refused = (
        torch.float32, torch.device("cpu"), torch.Size([2]), np.dtype("float32"), np.float64(1.0),
        np.asmatrix(np.ones((1, 1))), [1.0],
    )
    for not_an_array in refused:
        with pytest.raises(TypeError, match="Expected an array"):
            _ops.ops_for(not_an_array)


@pytest.mark.parametrize("library", ["numpy", "torch"])
def test_to_float_reads_any_one_entry_array(library):
    """Ops.to_float reads the value of a one-entry array of any shape (a keepdims
    norm is (1, 1, ...)), as the exact Python float."""
    value = np.float32(0.1)
    for shape in ((), (1,), (1, 1), (1, 1, 1)):
        array = np.full(shape, value)
        if library == "torch":
            torch = pytest.importorskip("torch")
            array = torch.from_numpy(np.ascontiguousarray(array))
        from advgraph._ops import ops_for

        got = ops_for(array).to_float(array)
        assert type(got) is float and got == float(value)
