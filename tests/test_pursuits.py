"""Tests of the greedy pursuits (MP, OMP, non-negative OMP) and IHT.

The references are mathematical: scikit-learn's ``orthogonal_mp_gram`` for OMP, the exact
recovery theorem under a coherence condition (Tropp 2004), the optimality (KKT) conditions of
least squares / non-negative least squares on the selected support, the monotonicity of MP.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from scipy.linalg import hadamard
from scipy.optimize import nnls
from sklearn.linear_model import orthogonal_mp_gram

from sparsecode.backend import get_kernel, to_numpy
from sparsecode.encode import sparse_encode
from sparsecode.pursuits import iht, matching_pursuit, omp

HAS_NUMBA = get_kernel("omp", np) is not None and get_kernel("mp", np) is not None
KERNELS = ["portable"] + (["numba"] if HAS_NUMBA else [])


# --------------------------------------------------------------------------- problems
def random_problem(seed, n=40, f=32, k=64, s=4, noise=0.0, unit=True, dtype=np.float64):
    """X = A @ D (+ noise) with s-sparse Gaussian rows of A; atoms as rows of D."""
    rng = np.random.default_rng(seed)
    D = rng.standard_normal((k, f))
    if unit:
        D /= np.linalg.norm(D, axis=1, keepdims=True)
    A = np.zeros((n, k))
    for i in range(n):
        A[i, rng.choice(k, s, replace=False)] = rng.choice([-1, 1], s) * rng.uniform(0.5, 2.0, s)
    X = A @ D + noise * rng.standard_normal((n, f))
    return X.astype(dtype), D.astype(dtype), A


def union_of_bases(f, seed):
    """Identity and a Hadamard basis, both rotated by one random orthogonal matrix: 2f unit
    atoms with mutual coherence exactly 1/sqrt(f)."""
    rng = np.random.default_rng(seed)
    H = hadamard(f) / np.sqrt(f)
    Q, _ = np.linalg.qr(rng.standard_normal((f, f)))
    D = np.vstack([np.eye(f), H]) @ Q
    return D[rng.permutation(2 * f)]


def coherence(D):
    Dn = D / np.linalg.norm(D, axis=1, keepdims=True)
    G = np.abs(Dn @ Dn.T)
    np.fill_diagonal(G, 0)
    return G.max()


def residual2(X, D, A):
    R = X - A @ D
    return np.sum(R * R, axis=1)


def sklearn_omp(X, D, s=None, tol=None):
    Dn = D / np.linalg.norm(D, axis=1, keepdims=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        coef = orthogonal_mp_gram(Dn @ Dn.T, Dn @ X.T, n_nonzero_coefs=s, tol=tol,
                                  norms_squared=np.sum(X * X, axis=1))
    return coef.T / np.linalg.norm(D, axis=1)


# --------------------------------------------------------------------------- OMP vs sklearn
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_omp_matches_sklearn(kernel, seed):
    X, D, _ = random_problem(seed, n=60, f=48, k=100, s=6, noise=0.05, unit=(seed != 2))
    ref = sklearn_omp(X, D, s=6)
    res = omp(X, D, n_nonzero=6, kernel=kernel)
    assert res.info["kernel"] == kernel
    np.testing.assert_array_equal(res.codes != 0, ref != 0)
    np.testing.assert_allclose(res.codes, ref, atol=1e-10, rtol=0)
    np.testing.assert_allclose(res.objective, residual2(X, D, res.codes), rtol=1e-10, atol=1e-12)
    assert np.all(res.n_iter == 6)


@pytest.mark.parametrize("kernel", KERNELS)
def test_omp_tol_matches_sklearn(kernel):
    X, D, _ = random_problem(3, n=50, f=40, k=80, s=8, noise=0.02)
    tol = 0.05 * float(np.median(np.sum(X * X, axis=1)))
    ref = sklearn_omp(X, D, tol=tol)
    res = omp(X, D, tol=tol, kernel=kernel)
    np.testing.assert_array_equal(res.codes != 0, ref != 0)
    np.testing.assert_allclose(res.codes, ref, atol=1e-10, rtol=0)
    assert np.all(res.objective <= tol) and np.all(res.converged)
    # one atom fewer would not have met tol: greedy stops at the first step that does
    fewer = omp(X, D, n_nonzero=1, kernel=kernel)
    used = np.count_nonzero(res.codes, axis=1)
    for i in np.nonzero(used == 1)[0][:3]:
        assert fewer.objective[i] <= tol


# --------------------------------------------------------------------------- exact recovery
@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    f=st.sampled_from([16, 64]),
    data=st.data(),
)
def test_omp_exact_recovery_under_coherence(seed, f, data):
    D = union_of_bases(f, seed)
    mu = coherence(D)
    bound = (1 + 1 / mu) / 2
    s = data.draw(st.integers(1, int(np.ceil(bound)) - 1), label="s")
    assert s < bound
    rng = np.random.default_rng(seed + 1)
    n, k = 12, D.shape[0]
    A = np.zeros((n, k))
    for i in range(n):
        A[i, rng.choice(k, s, replace=False)] = rng.choice([-1, 1], s) * rng.uniform(0.1, 3.0, s)
    X = A @ D
    for kernel in KERNELS:
        res = omp(X, D, n_nonzero=s, kernel=kernel)
        np.testing.assert_array_equal(res.codes != 0, A != 0)
        np.testing.assert_allclose(res.codes, A, atol=1e-9)


def test_omp_exact_recovery_random_dictionary():
    """Random Gaussian dictionary: check the coherence condition, then recovery."""
    rng = np.random.default_rng(7)
    f, k = 256, 300
    D = rng.standard_normal((k, f))
    mu = coherence(D)
    s = int(np.ceil((1 + 1 / mu) / 2)) - 1
    assert s >= 1 and s < (1 + 1 / mu) / 2
    X, _, A = random_problem(8, n=30, f=f, k=k, s=s)
    X = A @ D
    for kernel in KERNELS:
        res = omp(X, D, n_nonzero=s, kernel=kernel)
        np.testing.assert_array_equal(res.codes != 0, A != 0)
        np.testing.assert_allclose(res.codes, A, atol=1e-9)


# --------------------------------------------------------------------------- portable vs Numba
@pytest.mark.skipif(not HAS_NUMBA, reason="Numba not installed")
@pytest.mark.parametrize("case", ["plain", "tol", "awkward"])
def test_portable_and_numba_agree(case):
    X, D, _ = random_problem(11, n=80, f=30, k=70, s=5, noise=0.1, unit=False)
    kw = {"n_nonzero": 12}
    if case == "tol":
        kw = {"tol": 0.1}
    if case == "awkward":
        D[3] = 0.0  # zero atom
        D[10] = D[20]  # duplicated atom (a scaled copy would tie up to rounding: either may win)
        X[5] = 0.0  # zero signal
        kw = {"n_nonzero": 40}  # more than n_features
    a = omp(X, D, kernel="portable", **kw)
    b = omp(X, D, kernel="numba", **kw)
    np.testing.assert_array_equal(a.codes != 0, b.codes != 0)
    np.testing.assert_allclose(a.codes, b.codes, rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(a.n_iter, b.n_iter)
    np.testing.assert_array_equal(a.info["support"], b.info["support"])


@pytest.mark.skipif(not HAS_NUMBA, reason="Numba not installed")
@pytest.mark.parametrize("kw", [{"n_nonzero": 25}, {"tol": 0.05, "max_steps": 400}, {"n_nonzero": 30, "positive": True}])
def test_mp_portable_and_numba_agree(kw):
    X, D, _ = random_problem(26, n=60, f=24, k=50, s=5, noise=0.1, unit=False)
    D[2] = 0.0
    X[3] = 0.0
    a = matching_pursuit(X, D, kernel="portable", **kw)
    b = matching_pursuit(X, D, kernel="numba", **kw)
    assert a.info["kernel"] == "portable" and b.info["kernel"] == "numba"
    np.testing.assert_allclose(a.codes, b.codes, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(a.objective, b.objective, rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(a.n_iter, b.n_iter)
    np.testing.assert_array_equal(a.converged, b.converged)


# --------------------------------------------------------------------------- awkward inputs
@pytest.mark.parametrize("kernel", KERNELS)
def test_omp_awkward_cases(kernel):
    X, D, _ = random_problem(4, n=20, f=12, k=30, s=3, noise=0.1)
    D[7] = 0.0
    D[8] = D[9]  # exact duplicate
    X[0] = 0.0
    res = omp(X, D, n_nonzero=100, kernel=kernel)  # > n_atoms and > n_features
    C = res.codes
    assert np.all(np.isfinite(C)) and np.all(np.isfinite(res.objective))
    assert np.all(C[:, 7] == 0), "a zero atom was selected"
    assert not np.any((C[:, 8] != 0) & (C[:, 9] != 0)), "both copies of a duplicate used"
    assert np.all(C[0] == 0) and res.objective[0] == 0
    # with n_features linearly independent atoms the residual is zero
    assert np.all(np.count_nonzero(C, axis=1) <= 12)
    assert np.all(res.objective <= 1e-20 * np.max(np.sum(X * X, axis=1)))


def test_unnormalised_atoms_report_codes_for_given_dictionary():
    X, D, _ = random_problem(5, n=30, f=20, k=40, s=3, noise=0.05)
    scale = np.random.default_rng(0).uniform(0.1, 10, D.shape[0])
    Ds = D * scale[:, None]
    for fn, kw in [(omp, {"n_nonzero": 3}), (matching_pursuit, {"n_nonzero": 5}), (iht, {"n_nonzero": 3})]:
        unit = fn(X, D, **kw).codes
        scaled = fn(X, Ds, **kw).codes
        np.testing.assert_allclose(scaled * scale, unit, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(scaled @ Ds, unit @ D, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("fn", [matching_pursuit, omp, iht])
def test_zero_signals_and_single_signal(fn):
    X, D, _ = random_problem(6, n=5, f=16, k=24, s=2)
    X[2] = 0
    res = fn(X, D, n_nonzero=3)
    assert np.all(np.isfinite(res.codes)) and np.all(res.codes[2] == 0)
    one = fn(X[1], D, n_nonzero=3)
    assert one.codes.shape == (24,)
    np.testing.assert_allclose(one.codes, res.codes[1], rtol=1e-12, atol=1e-14)
    # all-zero dictionary: nothing to select, no NaN
    Z = fn(X, np.zeros_like(D), n_nonzero=3)
    assert np.all(Z.codes == 0) and np.all(np.isfinite(Z.objective))


# --------------------------------------------------------------------------- non-negative OMP
@pytest.mark.parametrize("kernel", KERNELS)
def test_nonneg_omp_kkt_and_nnls(kernel):
    rng = np.random.default_rng(12)
    n, f, k = 40, 30, 60
    D = rng.standard_normal((k, f)) * rng.uniform(0.5, 2, (k, 1))
    X = np.abs(rng.standard_normal((n, 4))) @ D[:4] + 0.3 * rng.standard_normal((n, f))
    res = omp(X, D, n_nonzero=8, positive=True, kernel=kernel)
    assert res.info["kernel"] == kernel
    C = res.codes
    assert np.all(C >= 0)
    Dn = D / np.linalg.norm(D, axis=1, keepdims=True)
    sup = res.info["support"]
    for i in range(n):
        S = sup[i][sup[i] >= 0]
        assert len(S) == res.n_iter[i] and len(set(S.tolist())) == len(S)
        g = C[i, S] * np.linalg.norm(D[S], axis=1)  # coefficients on the normalised atoms
        grad = (Dn[S] @ Dn[S].T) @ g - Dn[S] @ X[i]  # gradient of 0.5||x - g Dn_S||^2
        on = g > 0
        np.testing.assert_allclose(grad[on], 0, atol=1e-9)
        assert np.all(grad[~on] >= -1e-9)
        # the same optimum as scipy's NNLS on the support
        ref, _ = nnls(Dn[S].T, X[i])
        np.testing.assert_allclose(g, ref, atol=1e-8)
        # only atoms of the support are used
        assert np.all(C[i, np.setdiff1d(np.arange(k), S)] == 0)
        # it stopped early only when no atom correlates positively with the residual
        if res.n_iter[i] < 8:
            r = X[i] - C[i] @ D
            assert np.max(Dn @ r) <= 1e-9 * np.linalg.norm(X[i])


def test_nonneg_omp_equals_omp_when_unconstrained_solution_is_positive():
    rng = np.random.default_rng(13)
    D = union_of_bases(64, 3)
    A = np.zeros((10, 128))
    for i in range(10):
        A[i, rng.choice(128, 3, replace=False)] = rng.uniform(0.5, 2, 3)
    X = A @ D
    pos = omp(X, D, n_nonzero=3, positive=True)
    np.testing.assert_allclose(pos.codes, A, atol=1e-10)


@pytest.mark.skipif(not HAS_NUMBA, reason="Numba not installed")
@pytest.mark.parametrize("kw", [{"n_nonzero": 10}, {"n_nonzero": 60}, {"tol": 5.0}])
def test_nonneg_omp_portable_and_numba_agree(kw):
    rng = np.random.default_rng(28)
    X = rng.standard_normal((150, 40))
    D = rng.standard_normal((90, 40))
    D[5] = 0.0
    X[7] = 0.0
    a = omp(X, D, positive=True, kernel="portable", **kw)
    b = omp(X, D, positive=True, kernel="numba", **kw)
    np.testing.assert_array_equal(a.info["support"], b.info["support"])
    np.testing.assert_array_equal(a.n_iter, b.n_iter)
    np.testing.assert_allclose(a.codes, b.codes, rtol=1e-9, atol=1e-11)
    assert np.all(b.codes >= 0)


# --------------------------------------------------------------------------- MP
@pytest.mark.parametrize("kernel", KERNELS)
def test_mp_residual_never_increases_and_positive(kernel):
    X, D, _ = random_problem(14, n=25, f=20, k=50, s=5, noise=0.1, unit=False)
    prev = np.sum(X * X, axis=1)
    for t in range(1, 25):
        res = matching_pursuit(X, D, n_nonzero=t, kernel=kernel)
        r2 = residual2(X, D, res.codes)
        np.testing.assert_allclose(res.objective, r2, rtol=1e-10, atol=1e-12)
        assert np.all(r2 <= prev * (1 + 1e-12) + 1e-14)
        prev = r2
    pos = matching_pursuit(X, D, n_nonzero=30, positive=True, kernel=kernel)
    assert np.all(pos.codes >= 0)
    assert np.all(residual2(X, D, pos.codes) <= np.sum(X * X, axis=1) + 1e-12)


def test_mp_tol_and_repeated_atoms():
    X, D, _ = random_problem(15, n=20, f=16, k=20, s=4)
    res = matching_pursuit(X, D, tol=1e-3, max_steps=5000)
    assert np.all(res.converged) and np.all(res.objective <= 1e-3)
    assert np.any(res.n_iter > np.count_nonzero(res.codes, axis=1)), "MP never re-picked an atom"


@pytest.mark.parametrize("seed", [0, 1])
def test_mp_error_not_below_omp(seed):
    """After n_nonzero steps MP's error is never below OMP's where that is a theorem: for one
    or two steps (MP and OMP pick the same atoms, OMP then projects) and whenever OMP recovers
    the exact support of a noiseless signal (OMP's error is zero). Beyond two steps on
    arbitrary signals MP and OMP can pick different atoms and no ordering is guaranteed."""
    X, D, _ = random_problem(seed, n=50, f=30, k=60, s=6, noise=0.3)
    for t in (1, 2):
        mp = matching_pursuit(X, D, n_nonzero=t).objective
        om = omp(X, D, n_nonzero=t).objective
        assert np.all(mp >= om * (1 - 1e-12) - 1e-14)
    D = union_of_bases(64, seed)
    rng = np.random.default_rng(seed)
    A = np.zeros((30, 128))
    for i in range(30):
        A[i, rng.choice(128, 4, replace=False)] = rng.standard_normal(4)
    X = A @ D
    mp = matching_pursuit(X, D, n_nonzero=4).objective
    om = omp(X, D, n_nonzero=4).objective
    assert np.all(om <= 1e-20)
    assert np.all(mp >= om - 1e-20)
    assert np.mean(mp > 1e-12) > 0.5  # MP has not converged on most of them


# --------------------------------------------------------------------------- IHT
@pytest.mark.parametrize("positive", [False, True])
def test_iht_sparsity_monotone_and_least_squares_on_support(positive):
    rng = np.random.default_rng(16)
    n, f, k, s = 30, 64, 128, 3
    D = rng.standard_normal((k, f))
    A = np.zeros((n, k))
    for i in range(n):
        A[i, rng.choice(k, s, replace=False)] = rng.uniform(0.5, 2, s) * (1 if positive else rng.choice([-1, 1], s))
    X = A @ D + 0.01 * rng.standard_normal((n, f))
    res = iht(X, D, n_nonzero=s, positive=positive, tol=1e-14, max_iter=2000)
    C = res.codes
    assert np.all(np.count_nonzero(C, axis=1) <= s)
    if positive:
        assert np.all(C >= 0)
    assert np.all(res.objective <= np.sum(X * X, axis=1))
    np.testing.assert_allclose(res.objective, residual2(X, D, C), rtol=1e-9)
    # a fixed point of a <- H(a + mu * g) keeps g = 0 on its support: least squares there
    Dn = D / np.linalg.norm(D, axis=1, keepdims=True)
    corr = (X - C @ D) @ Dn.T
    on = C != 0
    assert np.max(np.abs(corr[on])) <= 1e-6 * np.max(np.abs(X @ Dn.T))
    # and the easy problem is recovered exactly (support), as OMP does
    assert np.mean(np.all(on == (A != 0), axis=1)) >= 0.9


def test_iht_warm_start_never_increases_objective():
    X, D, A = random_problem(27, n=40, f=32, k=64, s=4, noise=0.05, unit=False)
    start = omp(X, D, n_nonzero=4)
    res = iht(X, D, n_nonzero=4, init=start.codes, max_iter=20)
    assert np.all(res.objective <= start.objective * (1 + 1e-12) + 1e-15)
    assert np.all(np.count_nonzero(res.codes, axis=1) <= 4)
    with pytest.raises(ValueError, match="init"):
        iht(X, D, n_nonzero=4, init=start.codes[:3])


def test_iht_fixed_step_is_monotone():
    X, D, _ = random_problem(17, n=20, f=32, k=64, s=3, noise=0.05)
    prev = np.sum(X * X, axis=1)
    for it in (1, 2, 5, 10, 30):
        r = iht(X, D, n_nonzero=3, step="lipschitz", max_iter=it, tol=0.0).objective
        assert np.all(r <= prev * (1 + 1e-12))
        prev = r


# --------------------------------------------------------------------------- dtypes, backends
@pytest.mark.parametrize("name", ["mp", "mp-portable", "omp-portable", "omp-numba", "omp-positive",
                                  "omp-positive-portable", "iht"])
def test_float32_stays_float32(name):
    X, D, _ = random_problem(18, n=30, f=24, k=48, s=3, noise=0.01)
    X32, D32 = X.astype(np.float32), D.astype(np.float32)
    if name == "omp-numba" and not HAS_NUMBA:
        pytest.skip("Numba not installed")
    fn, kw = {
        "mp": (matching_pursuit, {"n_nonzero": 3}),
        "mp-portable": (matching_pursuit, {"n_nonzero": 3, "kernel": "portable"}),
        "omp-portable": (omp, {"n_nonzero": 3, "kernel": "portable"}),
        "omp-numba": (omp, {"n_nonzero": 3, "kernel": "numba"}),
        "omp-positive": (omp, {"n_nonzero": 3, "positive": True}),
        "omp-positive-portable": (omp, {"n_nonzero": 3, "positive": True, "kernel": "portable"}),
        "iht": (iht, {"n_nonzero": 3}),
    }[name]
    r32, r64 = fn(X32, D32, **kw), fn(X, D, **kw)
    assert r32.codes.dtype == np.float32 and r32.objective.dtype == np.float32
    np.testing.assert_allclose(r32.codes, r64.codes, atol=2e-4)


def _strict():
    return pytest.importorskip("array_api_strict")


@pytest.mark.parametrize("name", ["mp", "omp", "omp-positive", "iht"])
def test_array_api_strict_matches_numpy(name):
    xps = _strict()
    X, D, _ = random_problem(19, n=12, f=16, k=32, s=3, noise=0.05, unit=False)
    D[4] = 0.0
    fn, kw = {
        "mp": (matching_pursuit, {"n_nonzero": 5, "tol": 1e-4}),
        "omp": (omp, {"n_nonzero": 4}),
        "omp-positive": (omp, {"n_nonzero": 4, "positive": True}),
        "iht": (iht, {"n_nonzero": 3}),
    }[name]
    ref = fn(X, D, **kw)
    res = fn(xps.asarray(X), xps.asarray(D), **kw)
    assert res.codes.__array_namespace__() is xps
    np.testing.assert_allclose(to_numpy(res.codes), ref.codes, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(to_numpy(res.objective), ref.objective, rtol=1e-9, atol=1e-12)
    X32 = xps.asarray(X.astype(np.float32))
    D32 = xps.asarray(D.astype(np.float32))
    assert fn(X32, D32, **kw).codes.dtype == xps.float32


@pytest.mark.gpu
def test_cupy_matches_numpy():
    from sparsecode.backend import cupy_available

    if not cupy_available():
        pytest.skip("CuPy with a CUDA device not available")
    import cupy as cp

    X, D, _ = random_problem(20, n=50, f=32, k=64, s=4, noise=0.05)
    for fn, kw in [(omp, {"n_nonzero": 4}), (omp, {"n_nonzero": 4, "positive": True}),
                   (matching_pursuit, {"n_nonzero": 6}), (iht, {"n_nonzero": 4})]:
        ref = fn(X, D, **kw)
        res = fn(cp.asarray(X), cp.asarray(D), **kw)
        np.testing.assert_allclose(cp.asnumpy(res.codes), ref.codes, rtol=1e-8, atol=1e-10)


# --------------------------------------------------------------------------- API
@pytest.mark.parametrize("method,fn", [("mp", matching_pursuit), ("omp", omp), ("iht", iht)])
def test_sparse_encode_dispatch(method, fn):
    X, D, _ = random_problem(21, n=10, f=16, k=32, s=2)
    np.testing.assert_array_equal(sparse_encode(X, D, method=method, n_nonzero=2), fn(X, D, n_nonzero=2).codes)


def test_gram_argument():
    X, D, _ = random_problem(22, n=10, f=16, k=32, s=2, unit=False)
    G = D @ D.T
    for fn in (omp, matching_pursuit):
        np.testing.assert_allclose(fn(X, D, n_nonzero=3, gram=G).codes, fn(X, D, n_nonzero=3).codes, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="gram"):
        omp(X, D, n_nonzero=2, gram=G[:5])


@pytest.mark.parametrize("fn", [matching_pursuit, omp, iht])
def test_bad_inputs(fn):
    X, D, _ = random_problem(23, n=5, f=8, k=12, s=2)
    with pytest.raises(ValueError, match="features"):
        fn(X, D[:, :5], n_nonzero=2)
    with pytest.raises(ValueError, match="D must be 2-D"):
        fn(X, D[0], n_nonzero=2)
    Xn = X.copy()
    Xn[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        fn(Xn, D, n_nonzero=2)
    with pytest.raises(TypeError, match="float32 or float64"):
        fn(X.astype(int), D.astype(int), n_nonzero=2)
    with pytest.raises(TypeError, match="dtype"):
        fn(X.astype(np.float32), D, n_nonzero=2)
    with pytest.raises(ValueError, match="empty"):
        fn(X[:0], D, n_nonzero=2)
    with pytest.raises(ValueError, match="n_nonzero"):
        fn(X, D, n_nonzero=0)
    with pytest.raises(TypeError, match="n_nonzero"):
        fn(X, D, n_nonzero=2.5)
    with pytest.raises(TypeError, match="positive"):
        fn(X, D, n_nonzero=2, positive="yes")
    xps = pytest.importorskip("array_api_strict")
    with pytest.raises(TypeError, match="share an array library"):
        fn(X, xps.asarray(D), n_nonzero=2)


def test_bad_options():
    X, D, _ = random_problem(24, n=5, f=8, k=12, s=2)
    with pytest.raises(ValueError, match="tol"):
        omp(X, D, tol=-1.0)
    with pytest.raises(ValueError, match="tol"):
        matching_pursuit(X, D, tol=-1.0)
    with pytest.raises(ValueError, match="kernel"):
        omp(X, D, n_nonzero=2, kernel="cuda")
    with pytest.raises(ValueError, match="kernel"):
        matching_pursuit(X, D, n_nonzero=2, kernel="cuda")
    with pytest.raises(ValueError, match="batch_size"):
        omp(X, D, n_nonzero=2, batch_size=0)
    xps = pytest.importorskip("array_api_strict")
    with pytest.raises(ValueError, match="kernel='numba'"):
        omp(xps.asarray(X), xps.asarray(D), n_nonzero=2, kernel="numba")
    with pytest.raises(ValueError, match="step"):
        iht(X, D, n_nonzero=2, step=-1.0)
    with pytest.raises(ValueError, match="step"):
        iht(X, D, n_nonzero=2, step="big")
    with pytest.raises(TypeError, match="n_nonzero"):
        iht(X, D, n_nonzero=None)


def test_omp_batch_size_does_not_change_result():
    X, D, _ = random_problem(25, n=37, f=20, k=40, s=4, noise=0.05)
    a = omp(X, D, n_nonzero=5, kernel="portable", batch_size=5)
    b = omp(X, D, n_nonzero=5, kernel="portable")
    np.testing.assert_allclose(a.codes, b.codes, rtol=1e-12, atol=1e-14)
    c = omp(X, D, n_nonzero=5, positive=True, batch_size=6)
    d = omp(X, D, n_nonzero=5, positive=True)
    np.testing.assert_allclose(c.codes, d.codes, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- benchmark smoke run
@pytest.mark.slow
def test_benchmark_quick_runs(tmp_path):
    """The benchmark script runs end to end on its --quick problems (no timing assertions)."""
    import os
    import runpy

    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "pursuits.py")
    mod = runpy.run_path(path, run_name="pursuits_benchmark")
    rows = mod["main"](["--quick", "--out", str(tmp_path)])
    methods = {r["method"] for r in rows}
    assert {"omp (numba kernel)", "omp (portable array API)", "matching pursuit (portable)",
            "iht (normalised step)", "sklearn orthogonal_mp_gram"} <= methods
    assert all(0.0 <= r["recovery"] <= 1.0 and r["seconds"] > 0 for r in rows)
    assert (tmp_path / "pursuits_recovery.png").stat().st_size > 0
