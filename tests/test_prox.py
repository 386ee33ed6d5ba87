"""Proximal operators: defining optimality conditions, Moreau's identity, (firm)
non-expansiveness, per-atom thresholds, top-k with ties; on every backend."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

import array_api_strict as xs

from sparsecode.prox import (
    hard_threshold,
    nonneg_soft_threshold,
    project_linf_ball,
    project_nonneg,
    soft_threshold,
    top_k,
)

from conftest import asxp, assert_in_namespace, npx

PROPS = settings(max_examples=25, deadline=None)

shapes = st.tuples(st.integers(1, 4), st.integers(1, 9))
dtypes = st.sampled_from(["float32", "float64"])


@st.composite
def batch_and_threshold(draw, per_atom=None):
    """(x, threshold, dtype): x (n, m) floats; threshold a scalar or (m,) array (>= 0)."""
    dtype = draw(dtypes)
    n, m = draw(shapes)
    elems = st.floats(-100, 100, allow_nan=False, allow_subnormal=False, width=32)
    x = draw(hnp.arrays(np.float64, (n, m), elements=elems)).astype(dtype)
    if per_atom is None:
        per_atom = draw(st.booleans())
    tel = st.floats(0, 50, allow_nan=False, allow_subnormal=False, width=32)
    if per_atom:
        t = draw(hnp.arrays(np.float64, (m,), elements=tel)).astype(dtype)
    else:
        t = draw(tel)
    return x, t, dtype


def _eps(dtype):
    return float(np.finfo(dtype).eps)


def _t_xp(xp, t):
    return t if np.isscalar(t) else asxp(xp, t)


def _t_np(t, x):
    return np.broadcast_to(np.asarray(t, dtype=np.float64), x.shape)


# --------------------------------------------------------------------------- soft threshold
@PROPS
@given(batch_and_threshold())
def test_soft_threshold_is_the_prox_of_l1(xp, data):
    """p = prox_{t|.|}(x)  <=>  x - p in t * d|p|: x - p = t sign(p) where p != 0, |x| <= t where p == 0."""
    x, t, dtype = data
    p_x = soft_threshold(asxp(xp, x), _t_xp(xp, t))
    assert_in_namespace(p_x, xp)
    assert p_x.dtype == getattr(xp, dtype)
    p, x64, t64 = npx(p_x).astype(np.float64), x.astype(np.float64), _t_np(t, x)
    tol = 4 * _eps(dtype) * np.maximum(np.abs(x64), t64) + 1e-300
    nz = p != 0
    assert np.all(np.sign(p[nz]) == np.sign(x64[nz]))
    assert np.all(np.abs((x64 - p)[nz] - t64[nz] * np.sign(p[nz])) <= tol[nz])
    assert np.all(np.abs(x64[~nz]) <= t64[~nz] + tol[~nz])


@PROPS
@given(batch_and_threshold())
def test_moreau_identity(xp, data):
    """x = prox_{t|.|_1}(x) + proj_{|z|_inf <= t}(x) (the conjugate of t|.|_1 is that ball's indicator)."""
    x, t, dtype = data
    xx = asxp(xp, x)
    s, q = soft_threshold(xx, _t_xp(xp, t)), project_linf_ball(xx, _t_xp(xp, t))
    assert q.dtype == s.dtype == getattr(xp, dtype)
    s, q = npx(s).astype(np.float64), npx(q).astype(np.float64)
    t64 = _t_np(t, x)
    assert np.all(np.abs(q) <= t64)
    np.testing.assert_allclose(s + q, x, rtol=0, atol=4 * _eps(dtype) * max(np.abs(x).max(), 1.0))


@PROPS
@given(batch_and_threshold(), st.integers(0, 2**32 - 1))
def test_prox_operators_are_firmly_nonexpansive(xp, data, seed):
    """||p(x) - p(y)||^2 <= <p(x) - p(y), x - y> for every prox of a convex function
    (which implies non-expansiveness ||p(x) - p(y)|| <= ||x - y||)."""
    x, t, dtype = data
    y = (x + np.random.default_rng(seed).standard_normal(x.shape) * 10).astype(dtype)
    tol = 16 * _eps(dtype) * (np.sum(x.astype(float) ** 2) + np.sum(y.astype(float) ** 2) + 1.0)
    for op in (soft_threshold, nonneg_soft_threshold, project_linf_ball):
        px = npx(op(asxp(xp, x), _t_xp(xp, t))).astype(np.float64)
        py = npx(op(asxp(xp, y), _t_xp(xp, t))).astype(np.float64)
        d = px - py
        dx = x.astype(np.float64) - y.astype(np.float64)
        assert np.sum(d * d) <= np.sum(d * dx) + tol, op.__name__
        assert np.linalg.norm(d) <= np.linalg.norm(dx) * (1 + 4 * _eps(dtype)) + np.sqrt(tol)
    px, py = npx(project_nonneg(asxp(xp, x))), npx(project_nonneg(asxp(xp, y)))
    assert np.linalg.norm(px - py) <= np.linalg.norm(x - y) * (1 + 4 * _eps(dtype))


# --------------------------------------------------------------------------- non-negative, hard
@PROPS
@given(batch_and_threshold())
def test_nonneg_soft_threshold(xp, data):
    """prox of t*z + indicator(z >= 0): max(x - t, 0); Moreau partner: projection on {z <= t}."""
    x, t, dtype = data
    xx, tt = asxp(xp, x), _t_xp(xp, t)
    p_x = nonneg_soft_threshold(xx, tt)
    assert p_x.dtype == getattr(xp, dtype)
    p, x64, t64 = npx(p_x).astype(np.float64), x.astype(np.float64), _t_np(t, x)
    tol = 4 * _eps(dtype) * np.maximum(np.abs(x64), t64)
    assert np.all(p >= 0)
    pos = p > 0
    assert np.all(np.abs(x64[pos] - p[pos] - t64[pos]) <= tol[pos])  # x - p = t on the support
    assert np.all(x64[~pos] <= t64[~pos] + tol[~pos])  # x - 0 in t - normal cone of R+
    np.testing.assert_allclose(p + np.minimum(x64, t64), x64, rtol=0, atol=4 * _eps(dtype) * max(np.abs(x).max(), 1))
    # it is the soft threshold of the projection onto the orthant
    np.testing.assert_array_equal(npx(soft_threshold(project_nonneg(xx), tt)), npx(p_x))


@PROPS
@given(batch_and_threshold())
def test_hard_threshold_is_the_prox_of_l0(xp, data):
    """Entrywise argmin of 0.5 (z - x)^2 + t^2/2 [z != 0]: x where |x| > t, else 0."""
    x, t, dtype = data
    h = hard_threshold(asxp(xp, x), _t_xp(xp, t))
    assert h.dtype == getattr(xp, dtype)
    h = npx(h)
    t_ = np.broadcast_to(np.asarray(t, dtype=dtype), x.shape)
    keep = np.abs(x) > t_
    np.testing.assert_array_equal(h[keep], x[keep])
    assert np.all(h[~keep] == 0)
    x64, t64 = x.astype(np.float64), t_.astype(np.float64)
    cost = 0.5 * (h - x64) ** 2 + 0.5 * t64**2 * (h != 0)
    best = np.minimum(0.5 * x64**2, 0.5 * t64**2)
    assert np.all(cost <= best * (1 + 8 * _eps(dtype)) + 1e-30)


def test_thresholds_at_the_boundary_are_exact(xp):
    x = asxp(xp, np.array([[-2.0, -1.0, 0.0, 1.0, 2.0]]))
    np.testing.assert_array_equal(npx(soft_threshold(x, 1.0)), [[-1, 0, 0, 0, 1]])
    np.testing.assert_array_equal(npx(nonneg_soft_threshold(x, 1.0)), [[0, 0, 0, 0, 1]])
    np.testing.assert_array_equal(npx(hard_threshold(x, 1.0)), [[-2, 0, 0, 0, 2]])
    np.testing.assert_array_equal(npx(project_linf_ball(x, 1.0)), [[-1, -1, 0, 1, 1]])
    np.testing.assert_array_equal(npx(soft_threshold(x, 0)), npx(x))  # t = 0 is the identity


@pytest.mark.parametrize("op", [soft_threshold, nonneg_soft_threshold, hard_threshold, project_linf_ball])
def test_per_atom_thresholds_act_column_by_column(xp, op, float_dtype):
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((5, 4)) * 2).astype(float_dtype)
    t = np.array([0.0, 0.5, 1.0, 3.0])
    expected = np.stack([npx(op(asxp(xp, x[:, j]), float(t[j]))) for j in range(4)], axis=1)
    for tt in (asxp(xp, t), asxp(xp, t.astype(float_dtype)), list(t)):
        out = op(asxp(xp, x), tt)
        assert out.dtype == getattr(xp, float_dtype)  # a float64 threshold does not upcast
        np.testing.assert_array_equal(npx(out), expected)


@pytest.mark.parametrize("op", [soft_threshold, nonneg_soft_threshold, hard_threshold, project_linf_ball])
def test_zero_dimensional_threshold_is_a_scalar(xp, op):
    x = asxp(xp, np.array([[-3.0, -1.0, 0.5, 2.0]]))
    t = xp.max(asxp(xp, np.array([0.5, 1.5])))  # a 0-D array, as array-API reductions return
    np.testing.assert_array_equal(npx(op(x, t)), npx(op(x, 1.5)))
    with pytest.raises(ValueError, match=r"(threshold|radius) must be a finite number >= 0"):
        op(x, asxp(xp, np.array(-1.0)))


@pytest.mark.parametrize("op", [soft_threshold, nonneg_soft_threshold, hard_threshold])
def test_threshold_errors_name_the_argument(xp, op):
    x = asxp(xp, np.ones((2, 3)))
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"threshold must be a finite number >= 0"):
            op(x, bad)
    with pytest.raises(ValueError, match=r"threshold must be a number or have shape \(3,\)"):
        op(x, asxp(xp, np.ones(2)))
    with pytest.raises(ValueError, match=r"threshold must be finite and >= 0 everywhere"):
        op(x, asxp(xp, np.array([1.0, -1.0, 0.0])))
    with pytest.raises(ValueError, match=r"threshold must be finite and >= 0 everywhere"):
        op(x, [1.0, np.nan, 0.0])
    with pytest.raises(TypeError, match=r"threshold must be a number or a 1-D array"):
        op(x, [[1.0, 1.0, 1.0]])
    other = xs if xp.__name__ != "array_api_strict" else np
    with pytest.raises(TypeError, match=r"threshold comes from"):
        op(x, other.ones(3))
    with pytest.raises(ValueError, match=r"radius"):
        project_linf_ball(x, -1.0)


# --------------------------------------------------------------------------- top-k
def _top_k_reference(x, k, by, positive):
    """Keep the k best entries per row, ties to the lowest index (stable sort)."""
    x2 = np.atleast_2d(x)
    score = x2 if by == "value" else np.abs(x2)
    k = min(k, x2.shape[1])
    order = np.argsort(-score, axis=1, kind="stable")[:, :k]
    mask = np.zeros(x2.shape, bool)
    np.put_along_axis(mask, order, True, axis=1)
    out = np.where(mask, x2, 0)
    if positive:
        out = np.maximum(out, 0)
    return out.reshape(x.shape)


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 4),
    st.integers(1, 12),
    st.integers(0, 14),
    st.sampled_from(["value", "magnitude"]),
    st.booleans(),
    dtypes,
    st.integers(0, 2**32 - 1),
    st.booleans(),
)
def test_top_k_matches_stable_sort_reference_with_ties(xp, n, m, k, by, positive, dtype, seed, small_ints):
    rng = np.random.default_rng(seed)
    # small integers make ties (and +-equal magnitudes) frequent
    x = rng.integers(-3, 4, (n, m)) if small_ints else rng.standard_normal((n, m))
    x = x.astype(dtype)
    out = top_k(asxp(xp, x), k, by=by, positive=positive)
    assert_in_namespace(out, xp)
    assert out.dtype == getattr(xp, dtype) and tuple(out.shape) == (n, m)
    out = npx(out)
    np.testing.assert_array_equal(out, _top_k_reference(x, k, by, positive))
    assert np.all(np.count_nonzero(out, axis=1) <= k)
    # every nonzero that is kept scores at least as high as every nonzero that is dropped
    score = x if by == "value" else np.abs(x)
    for i in range(n):
        kept, dropped = out[i] != 0, (out[i] == 0) & (x[i] != 0)
        if kept.any() and dropped.any() and not positive:
            assert score[i][kept].min() >= score[i][dropped].max()


def test_top_k_ties_go_to_the_lowest_index(xp):
    x = asxp(xp, np.array([[1.0, 3.0, 3.0, 1.0, 3.0, 1.0], [-2.0, 2.0, 1.0, -2.0, 0.0, 2.0]]))
    np.testing.assert_array_equal(npx(top_k(x, 2)), [[0, 3, 3, 0, 0, 0], [0, 2, 0, 0, 0, 2]])
    np.testing.assert_array_equal(npx(top_k(x, 4)), [[1, 3, 3, 0, 3, 0], [0, 2, 1, 0, 0, 2]])
    np.testing.assert_array_equal(npx(top_k(x, 2, by="magnitude")), [[0, 3, 3, 0, 0, 0], [-2, 2, 0, 0, 0, 0]])
    np.testing.assert_array_equal(
        npx(top_k(x, 2, by="magnitude", positive=True)), [[0, 3, 3, 0, 0, 0], [0, 2, 0, 0, 0, 0]]
    )
    # a row of 40 equal values keeps its first k (NumPy's partition alone would not)
    ones = asxp(xp, np.ones((3, 40)))
    np.testing.assert_array_equal(np.nonzero(npx(top_k(ones, 5)))[1], np.tile(np.arange(5), 3))


def test_top_k_numpy_kernel_agrees_with_portable_code_on_nan():
    x = np.array([[np.nan, 1.0, np.nan, -1.0, 2.0]])
    for k in range(6):
        np.testing.assert_array_equal(
            np.isnan(top_k(x, k)), np.isnan(npx(top_k(xs.asarray(x), k))), err_msg=f"k={k}"
        )
        np.testing.assert_array_equal(np.nan_to_num(top_k(x, k)), np.nan_to_num(npx(top_k(xs.asarray(x), k))))


def test_top_k_edge_cases(xp):
    x = asxp(xp, np.array([0.5, -3.0, 2.0]))
    out = top_k(x, 1)
    assert tuple(out.shape) == (3,)  # 1-D in, 1-D out
    np.testing.assert_array_equal(npx(out), [0, 0, 2.0])
    np.testing.assert_array_equal(npx(top_k(x, 1, by="magnitude")), [0, -3.0, 0])
    np.testing.assert_array_equal(npx(top_k(x, 0)), [0, 0, 0])
    np.testing.assert_array_equal(npx(top_k(x, 3)), [0.5, -3.0, 2.0])
    np.testing.assert_array_equal(npx(top_k(x, 99)), [0.5, -3.0, 2.0])
    np.testing.assert_array_equal(npx(top_k(x, 99, positive=True)), [0.5, 0, 2.0])


def test_top_k_errors_name_the_argument(xp):
    x = asxp(xp, np.ones((2, 3)))
    for bad in (-1, 1.5, True, "2", None):
        with pytest.raises(ValueError, match=r"k must be an integer >= 0"):
            top_k(x, bad)
    with pytest.raises(ValueError, match=r"by must be 'value' or 'magnitude'"):
        top_k(x, 1, by="abs")
    with pytest.raises(ValueError, match=r"x must be 1-D or 2-D"):
        top_k(asxp(xp, np.ones((1, 2, 3))), 1)
    with pytest.raises(TypeError, match=r"x must be float32 or float64"):
        top_k(asxp(xp, np.ones((2, 3), dtype=np.int64)), 1)
