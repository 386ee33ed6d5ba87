"""The NumPy (Numba) kernels of SAE training against the portable code they stand beside."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparsecode.backend as backend
from sparsecode import _sae_numba as K
from sparsecode import sae as sae_mod
from sparsecode.sae_train import Adam, _project_rows, _renormalise, _sumsq

SETTINGS = dict(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _portable(name, monkeypatch):
    """Drop the NumPy kernel ``name`` so that the portable code runs on NumPy."""
    monkeypatch.delitem(backend._KERNELS, (name, "numpy"))


# --------------------------------------------------------------------------- top-k per row
@settings(**SETTINGS)
@given(n=st.integers(1, 6), m=st.integers(1, 80), k=st.integers(1, 80), levels=st.integers(2, 50),
       seed=st.integers(0, 10_000), dt=st.sampled_from(["float32", "float64"]))
def test_topk_rows_matches_stable_argsort_with_ties(n, m, k, levels, seed, dt):
    k = min(k, m)
    rng = np.random.default_rng(seed)
    score = rng.integers(0, levels, (n, m)).astype(dt)  # many ties
    score[rng.random((n, m)) < 0.1] = -np.inf
    out = K.topk_rows(score, k, np.empty((n, k), dtype=np.int64))
    ref = np.argsort(-score, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(out, ref)  # same set, same order (best first, ties by index)


def test_topk_indices_kernel_agrees_with_portable(monkeypatch):
    rng = np.random.default_rng(0)
    score = rng.standard_normal((50, 400)).astype(np.float32)
    got = sae_mod._topk_indices(score, 7, np)  # 16 k <= m: the heap kernel
    _portable("sae_topk_indices", monkeypatch)
    ref = sae_mod._topk_indices(score, 7, np)
    np.testing.assert_array_equal(np.sort(got, axis=1), np.sort(ref, axis=1))


# --------------------------------------------------------------------------- sparse products
@settings(**SETTINGS)
@given(n=st.integers(1, 9), m=st.integers(1, 40), d=st.integers(1, 12), density=st.floats(0.0, 1.0),
       seed=st.integers(0, 10_000), dt=st.sampled_from(["float32", "float64"]))
def test_pattern_products_match_dense(n, m, d, density, seed, dt):
    rng = np.random.default_rng(seed)
    mask = rng.random((n, m)) < density  # empty rows and columns included
    F = np.where(mask, rng.standard_normal((n, m)), 0).astype(dt)
    W = rng.standard_normal((m, d)).astype(dt)
    G = rng.standard_normal((n, d)).astype(dt)
    lay = sae_mod._PatternLayout(mask)
    V = lay.gather(F)
    tol = dict(rtol=1e-5, atol=1e-5) if dt == "float32" else dict(rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(lay.decode(V, W), F @ W, **tol)
    np.testing.assert_allclose(lay.tmatmul(V, G), F.T @ G, **tol)
    out = lay.rtmatmul(V, G)
    assert out.flags.c_contiguous and out.shape == (d, m)
    np.testing.assert_allclose(out, G.T @ F, **tol)
    np.testing.assert_allclose(lay.sample(G, W), (G @ W.T)[mask], **tol)


@pytest.mark.parametrize("dense_fraction", [-1.0, 2.0], ids=["blas", "numba"])
@settings(**SETTINGS)
@given(n=st.integers(1, 9), m=st.integers(1, 40), d=st.integers(1, 12), k=st.integers(1, 40),
       seed=st.integers(0, 10_000))
def test_k_sparse_kernels_match_portable(dense_fraction, n, m, d, k, seed):
    k = min(k, m)
    rng = np.random.default_rng(seed)
    idx = np.argsort(rng.random((n, m)), axis=1)[:, :k]
    vals = rng.standard_normal((n, k))
    W = rng.standard_normal((m, d))
    G = rng.standard_normal((n, d))
    mp = pytest.MonkeyPatch()
    mp.setattr(sae_mod, "_KS_DENSE_FRACTION", dense_fraction)
    try:
        got = [sae_mod._ks_decode(idx, vals, W, np), sae_mod._ks_sample(idx, G, W, np),
               sae_mod._ks_tmatmul(idx, vals, G, m, np), sae_mod._ks_rtmatmul(idx, vals, G, m, np),
               sae_mod._ks_colsum(idx, vals, m, np)]
        for name in ("sae_ks_decode", "sae_ks_sample", "sae_ks_tmatmul", "sae_ks_rtmatmul", "sae_ks_colsum",
                     "sae_ks_dense"):
            mp.delitem(backend._KERNELS, (name, "numpy"))
        ref = [sae_mod._ks_decode(idx, vals, W, np), sae_mod._ks_sample(idx, G, W, np),
               sae_mod._ks_tmatmul(idx, vals, G, m, np), sae_mod._ks_rtmatmul(idx, vals, G, m, np),
               sae_mod._ks_colsum(idx, vals, m, np)]
    finally:
        mp.undo()
    for a, b in zip(got, ref):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_add_rows_kernel_matches_portable(monkeypatch):
    rng = np.random.default_rng(0)
    A = rng.standard_normal((9, 4))
    mask = rng.random(9) < 0.5
    R = rng.standard_normal((int(mask.sum()), 4))
    got = sae_mod._add_rows(A.copy(), mask, R, np)
    _portable("sae_add_rows", monkeypatch)
    np.testing.assert_array_equal(sae_mod._add_rows(A.copy(), mask, R, np), got)
    got_1d = sae_mod._add_rows(A[:, 0].copy(), mask, R[:, 0], np)
    np.testing.assert_array_equal(got_1d, A[:, 0] + _scatter(mask, R[:, 0]))


def _scatter(mask, r):
    out = np.zeros(mask.shape[0])
    out[mask] = r
    return out


@pytest.mark.parametrize("ties", [False, True])
def test_batch_top_k_mask_matches_portable(ties, monkeypatch):
    rng = np.random.default_rng(1)
    a = np.maximum(rng.standard_normal((20, 30)), 0)
    if ties:
        a = np.round(a, 1)
    got = sae_mod._batch_top_k_mask(a, 50, np)
    _portable("sae_batch_top_k_mask", monkeypatch)
    np.testing.assert_array_equal(got, sae_mod._batch_top_k_mask(a, 50, np))
    assert int(got.sum()) == 50


# --------------------------------------------------------------------------- matching pursuit
@pytest.mark.parametrize("mp_tol", [None, 2.0])
@pytest.mark.parametrize("dt", ["float32", "float64"])
def test_mp_pursuit_kernel_matches_portable_loop(mp_tol, dt, monkeypatch):
    sae = sae_mod.SparseAutoencoder.initialize(16, 40, "mpsae", k=6, seed=0, dtype=dt, mp_tol=mp_tol)
    X = np.random.default_rng(1).standard_normal((30, 16)).astype(dt)  # k * n > d_sae: Gram branch
    codes, r, steps = sae_mod._mp_forward(sae, X, np, record=True)
    _portable("sae_mp_pursuit", monkeypatch)
    codes0, r0, steps0 = sae_mod._mp_forward(sae, X, np, record=True)
    tol = dict(rtol=1e-5, atol=1e-5) if dt == "float32" else dict(rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(codes, codes0, **tol)
    np.testing.assert_allclose(r, r0, **tol)
    for (j, c, a, rt), (j0, c0, a0, rt0) in zip(steps, steps0):
        np.testing.assert_array_equal(j, j0)
        np.testing.assert_allclose(c, c0, **tol)
        assert rt is None and rt0 is not None  # the kernel's backward recovers the residuals
        assert (a is None) == (a0 is None) and (a is None or np.array_equal(a, a0))


def _exact_mp(X, W, k):
    """Matching pursuit in float64 with correlations recomputed from the residual each step:
    atoms, coefficients and, per step, the gap between the two largest |correlations|."""
    R = X.astype(np.float64)
    W = W.astype(np.float64)
    rows = np.arange(len(X))
    js, cs, gaps = [], [], []
    for _ in range(k):
        C = R @ W.T
        a = np.abs(C)
        j = np.argmax(a, axis=1)
        top2 = np.sort(a, axis=1)[:, -2:] if W.shape[0] > 1 else np.concatenate([a, a * 0], 1)
        gaps.append(top2[:, 1] - top2[:, 0])
        c = C[rows, j]
        R -= c[:, None] * W[j]
        js.append(j)
        cs.append(c)
    return np.stack(js, 1), np.stack(cs, 1), np.stack(gaps, 1)


def _pursuit(X, W, k, tol=None):
    n_checked = np.zeros(len(X), dtype=np.int64)
    out = sae_mod._mp_pursuit_np(X @ W.T, X, W, k, tol, n_checked=n_checked)
    assert out is not None
    return out + (n_checked,)


def _assert_exact_mp_atoms(js, cs, X, W, k, dt, min_full=0.5):
    """The kernel's atoms equal exact matching pursuit's in every row up to the first step
    where the exact top two are closer than the float residual's rounding (there either is
    right; the paths may part), and its coefficients equal the exact ones to rounding."""
    js0, cs0, gaps = _exact_mp(X, W, k)
    scale = np.linalg.norm(X.astype(np.float64), axis=1)[:, None]
    resolvable = gaps > (1e-5 if dt == "float32" else 1e-12) * scale
    upto = np.where(resolvable.all(1), k, np.argmin(resolvable, axis=1))
    rtol = 1e-4 if dt == "float32" else 1e-10
    for i in range(len(X)):
        t = upto[i]
        np.testing.assert_array_equal(js[i, :t], js0[i, :t])
        np.testing.assert_allclose(cs[i, :t], cs0[i, :t], rtol=rtol, atol=rtol * scale[i, 0])
    assert np.mean(upto == k) >= min_full  # the share of rows compared over all k steps
    return upto


@settings(**SETTINGS)
@given(n=st.integers(1, 40), d=st.integers(2, 40), m=st.integers(2, 160), k=st.integers(1, 12),
       seed=st.integers(0, 10_000), dt=st.sampled_from(["float32", "float64"]))
def test_mp_pursuit_kernel_is_exact_matching_pursuit(n, d, m, k, seed, dt):
    # atoms selected through the int16 Gram are those of exact MP (the selection is
    # certified against exact correlations), whatever the shapes and precision
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((m, d))
    W = (W / np.linalg.norm(W, axis=1, keepdims=True)).astype(dt)
    X = rng.standard_normal((n, d)).astype(dt)
    js, cs, _, r, _ = _pursuit(X, W, k)
    _assert_exact_mp_atoms(js, cs, X, W, k, dt, min_full=0.0)  # tiny d: residuals vanish, ties
    codes = np.zeros((n, m))
    np.add.at(codes, (np.repeat(np.arange(n), k), js.ravel()), cs.ravel().astype(np.float64))
    np.testing.assert_allclose(r, X - codes @ W, atol=1e-4 if dt == "float32" else 1e-10)


@pytest.mark.parametrize("dt", ["float32", "float64"])
def test_mp_pursuit_kernel_resolves_near_duplicate_atoms(dt):
    # pairs of atoms closer than the int16 Gram can tell apart: the approximate correlations
    # of a pair differ by less than their error, so the kernel must check both exactly
    # (an error bound too small would pick by the rounded values and miss exact MP's atom)
    rng = np.random.default_rng(7)
    d, half = 48, 192
    B = rng.standard_normal((half, d))
    B /= np.linalg.norm(B, axis=1, keepdims=True)
    P = B + 1e-4 * rng.standard_normal((half, d))
    W = np.concatenate([B, P / np.linalg.norm(P, axis=1, keepdims=True)]).astype(dt)
    X = rng.standard_normal((128, d)).astype(dt)
    js, cs, _, _, checked = _pursuit(X, W, 16)
    assert checked.sum() > 0.5 * X.shape[0] * 16  # most steps had two candidates
    upto = _assert_exact_mp_atoms(js, cs, X, W, 16, dt, min_full=0.0)
    assert upto.mean() > 4  # pairs 1e-4 apart: the exact top two are often closer than 1e-5 |x|
    assert np.mean(js == _exact_mp(X, W, 16)[0]) > 0.95


def test_mp_without_gram_past_memory_cap_same_atoms(monkeypatch):
    # a Gram matrix too large for MP_GRAM_MAX_BYTES: correlations recomputed each step, and
    # the same atoms and coefficients as through the (certified) Gram kernel
    sae = sae_mod.SparseAutoencoder.initialize(24, 300, "mpsae", k=10, seed=0, dtype="float64")
    X = np.random.default_rng(4).standard_normal((200, 24))
    (idx, vals), r, _ = sae_mod._mp_forward(sae, X, np, dense=False)
    calls = []
    monkeypatch.setattr(sae_mod, "MP_GRAM_MAX_BYTES", 300 * 300 * 8 - 1)
    monkeypatch.setitem(backend._KERNELS, ("sae_mp_pursuit", "numpy"), lambda *a, **kw: calls.append(1))
    (idx0, vals0), r0, _ = sae_mod._mp_forward(sae, X, np, dense=False)
    assert not calls  # the Gram kernel was not asked
    np.testing.assert_array_equal(idx, idx0)
    np.testing.assert_allclose(vals, vals0, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(r, r0, rtol=1e-12, atol=1e-12)


def test_mp_pursuit_kernel_same_atoms_float32_at_size(monkeypatch):
    # many steps over many atoms in float32, against the portable float32 loop: equal atoms
    # wherever the exact top two are apart, coefficients equal to rounding
    sae = sae_mod.SparseAutoencoder.initialize(96, 768, "mpsae", k=24, seed=0, dtype="float32")
    X = np.random.default_rng(2).standard_normal((64, 96)).astype("float32")
    js, cs, _, r, checked = _pursuit(X, sae.W_dec, 24)
    _assert_exact_mp_atoms(js, cs, X, sae.W_dec, 24, "float32")
    _, r0, steps0 = sae_mod._mp_forward(sae, X, np, record=True)  # the kernel, through the model
    np.testing.assert_array_equal(r, r0)
    _portable("sae_mp_pursuit", monkeypatch)
    _, r1, steps1 = sae_mod._mp_forward(sae, X, np, record=True)
    js1 = np.stack([s[0] for s in steps1], 1)
    assert np.mean(np.all(js1 == js, axis=1)) > 0.9
    same = np.all(js1 == js, axis=1)
    np.testing.assert_allclose(r1[same], r[same], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dt", ["float32", "float64"])
@pytest.mark.parametrize("m", [5, 64, 200])
def test_quantized_gram_within_its_bound(dt, m):
    rng = np.random.default_rng(3)
    W = (rng.standard_normal((m, 24)) * rng.uniform(0.2, 2.0, (m, 1))).astype(dt)  # rows of any norm
    sae_mod._quantized_gram(rng.standard_normal((m, 24)).astype(dt) * 5)  # the kept buffers, filled before
    Gq, gstep, geps, wmax = sae_mod._quantized_gram(W)
    assert Gq.dtype == np.int16 and Gq.shape == (m, m) and Gq.flags.c_contiguous
    np.testing.assert_array_equal(Gq, Gq.T)  # exactly symmetric (mirrored)
    exact = W.astype(np.float64) @ W.T.astype(np.float64)
    assert np.sqrt(np.max(np.diag(exact))) <= wmax <= np.sqrt(np.max(np.diag(exact))) * (1 + 1e-4)
    err = np.abs(Gq * gstep - exact)
    assert err.max() <= geps
    assert geps < 1e-4 * np.max(np.diag(exact))  # ~half a step of 1 / 32767
    assert np.abs(Gq).max() >= 32700  # the largest entry uses the whole range


def test_quantized_gram_refuses_non_finite_or_zero_decoder(monkeypatch):
    W = np.random.default_rng(0).standard_normal((70, 8)).astype(np.float32)
    Wn = W.copy()
    Wn[3, 2] = np.nan
    assert sae_mod._quantized_gram(Wn) is None
    assert sae_mod._quantized_gram(np.zeros_like(W)) is None
    X = np.random.default_rng(1).standard_normal((40, 8)).astype(np.float32)
    assert sae_mod._mp_pursuit_np(X @ Wn.T, X, Wn, 3, None) is None  # the portable loop then runs


@pytest.mark.parametrize("dt", ["float32", "float64"])
@pytest.mark.parametrize("buckets,cap", [(False, 256), (True, 256), (True, 3)])
def test_afa_layout_kernel_matches_portable_mask(dt, buckets, cap):
    rng = np.random.default_rng(5)
    n, m, d = 40, 300, 12
    z = np.round(rng.standard_normal((n, m)) * 4).astype(dt) / 4  # many ties
    z[3] = -1.0  # a row without positive entries
    nu = rng.uniform(0.5, 1.5, m).astype(dt)
    nu[:50] = 1.0
    xc = rng.standard_normal((n, d)).astype(dt) * rng.uniform(0.1, 6.0, (n, 1)).astype(dt)  # crossings near and far
    out = sae_mod._afa_layout_np(z, nu, xc, buckets=buckets, cap=cap)  # cap 3: rows scanned again
    mask = np.logical_and(sae_mod._afa_mask(np.maximum(z, 0), nu, xc, np), z > 0)
    if out is None:  # too dense for a pattern: the caller falls back to the mask
        assert np.count_nonzero(mask) > sae_mod._SPARSE_DENSITY * mask.size
        return
    lay, zv = out
    ref = sae_mod._PatternLayout(mask)
    np.testing.assert_array_equal(lay.indptr, ref.indptr)
    np.testing.assert_array_equal(lay.cols, ref.cols)
    np.testing.assert_array_equal(zv, z[mask])


@pytest.mark.parametrize("dt", ["float32", "float64"])
def test_topafa_loss_and_grad_kernel_matches_portable(dt, monkeypatch):
    sae = sae_mod.SparseAutoencoder.initialize(24, 400, "topafa", k=8, seed=1, dtype=dt)
    X = np.random.default_rng(2).standard_normal((50, 24)).astype(dt) * 0.3
    dead = np.zeros(400, bool)
    dead[:40] = True
    kw = dict(aux_coefficient=1 / 32, dead_mask=dead, afa_coefficient=1 / 32)
    loss, G, st = sae_mod.loss_and_grad(sae, X, **kw)
    for name in ("sae_afa_layout", "sae_afa_mask", "sae_layout"):
        _portable(name, monkeypatch)
    loss0, G0, st0 = sae_mod.loss_and_grad(sae, X, **kw)
    tol = dict(rtol=2e-4, atol=1e-6) if dt == "float32" else dict(rtol=1e-10, atol=1e-12)
    assert st["l0"] == st0["l0"]
    np.testing.assert_allclose(loss, loss0, **tol)
    for key in G0:
        np.testing.assert_allclose(G[key], G0[key], **tol)


def test_ks_dense_sum_kernel_adds_repeats(monkeypatch):
    rng = np.random.default_rng(4)
    idx = rng.integers(0, 9, (20, 12))  # many repeats per row
    vals = rng.standard_normal((20, 12)).astype(np.float32)
    got = sae_mod._ks_dense_sum(idx, vals, 9, np)
    ref = np.zeros((20, 9), np.float32)
    np.add.at(ref, (np.repeat(np.arange(20), 12), idx.reshape(-1)), vals.reshape(-1))
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mp_tol", [None, 2.0])
@pytest.mark.parametrize("dt", ["float32", "float64"])
def test_mp_backward_kernel_matches_portable_loop(mp_tol, dt, monkeypatch):
    sae = sae_mod.SparseAutoencoder.initialize(16, 40, "mpsae", k=6, seed=0, dtype=dt, mp_tol=mp_tol)
    X = np.random.default_rng(1).standard_normal((30, 16)).astype(dt)  # Gram branch, repeated atoms
    loss, G, _ = sae_mod.loss_and_grad(sae, X)
    _portable("sae_mp_backward", monkeypatch)
    loss0, G0, _ = sae_mod.loss_and_grad(sae, X)
    tol = dict(rtol=1e-4, atol=1e-5) if dt == "float32" else dict(rtol=1e-12, atol=1e-12)
    assert loss == loss0
    for key in G0:
        np.testing.assert_allclose(G[key], G0[key], **tol)


@pytest.mark.parametrize("dt", ["float32", "float64"])
def test_mp_backward_chunks_change_only_rounding(dt):
    # the decoder gradient is summed in one accumulator per chunk of rows: any number of
    # chunks gives the same gradient up to rounding, and the same g_r exactly
    rng = np.random.default_rng(5)
    n, m, d, k = 37, 50, 12, 7
    W = rng.standard_normal((m, d)).astype(dt)
    W /= np.linalg.norm(W, axis=1, keepdims=True)
    js = rng.integers(0, m, (n, k))
    js[:, 3] = js[:, 1]  # repeated atoms in a row
    cs = rng.standard_normal((n, k)).astype(dt)
    act = rng.random((n, k)) < 0.8
    r = rng.standard_normal((n, d)).astype(dt)
    outs = []
    for nchunk in (1, 3, n):
        acc = np.zeros((nchunk, m, d), dtype=dt)
        g_r = np.empty_like(r)
        K.mp_backward(W, js, cs, act, True, r, np.dtype(dt).type(0.5), g_r, acc)
        outs.append((K.sum_chunks(acc, np.empty((m, d), dtype=dt)), g_r))
    tol = dict(rtol=1e-5, atol=1e-5) if dt == "float32" else dict(rtol=1e-12, atol=1e-12)
    for G, g_r in outs[1:]:
        np.testing.assert_allclose(G, outs[0][0], **tol)
        np.testing.assert_array_equal(g_r, outs[0][1])


@given(n=st.integers(1, 12), m=st.integers(1, 9), k=st.integers(1, 6), seed=st.integers(0, 10_000))
@settings(**SETTINGS)
def test_ks_code_stats_matches_dense_codes(n, m, k, seed):
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, m, (n, k))
    vals = rng.choice(np.array([0.0, 1.0, -1.0, 0.5], dtype=np.float32), (n, k))  # repeats cancel too
    count, fired = sae_mod._ks_code_stats(idx, vals, m, np)
    dense = np.zeros((n, m), dtype=np.float32)
    for i in range(n):
        for t in range(k):
            dense[i, idx[i, t]] += vals[i, t]
    assert count == int(np.count_nonzero(dense))
    np.testing.assert_array_equal(fired, (dense != 0).any(axis=0))


# --------------------------------------------------------------------------- optimiser and rows
@pytest.mark.parametrize("dt", [np.float32, np.float64])
def test_fused_adam_is_bit_identical_to_portable(dt, monkeypatch):
    rng = np.random.default_rng(0)
    shapes = {"W": (70, 90), "b": (90,), "tiny": (3,)}
    P1 = {k: rng.standard_normal(s).astype(dt) for k, s in shapes.items()}
    P2 = {k: v.copy() for k, v in P1.items()}
    grads = [{k: rng.standard_normal(s).astype(dt) for k, s in shapes.items()} for _ in range(4)]
    o1 = Adam(P1)
    for i, G in enumerate(grads):
        o1.step(P1, G, 1e-3 * (i + 1))
    _portable("adam_update", monkeypatch)
    o2 = Adam(P2)
    for i, G in enumerate(grads):
        o2.step(P2, G, 1e-3 * (i + 1))
    for k in shapes:
        np.testing.assert_array_equal(P1[k], P2[k])
        np.testing.assert_array_equal(o1.m[k], o2.m[k])
        np.testing.assert_array_equal(o1.v[k], o2.v[k])


def test_fused_adam_does_not_modify_the_callers_parameter():
    P = {"W": np.ones((80, 80))}
    before = P["W"]
    Adam(P).step(P, {"W": np.ones((80, 80))}, 0.1)
    assert np.all(before == 1.0) and not np.all(P["W"] == 1.0)


@pytest.mark.parametrize("dt", [np.float32, np.float64])
def test_row_kernels_match_portable(dt, monkeypatch):
    rng = np.random.default_rng(0)
    W = rng.standard_normal((100, 64)).astype(dt)
    W[3] = 0.0  # a zero row stays zero (norm floored)
    Wn = W / np.maximum(np.linalg.norm(W, axis=1, keepdims=True), 1e-12)
    G = rng.standard_normal((100, 64)).astype(dt)
    tol = dict(rtol=1e-5, atol=1e-6) if dt == np.float32 else dict(rtol=1e-12, atol=1e-13)
    got = _project_rows(G.copy(), Wn, np)

    class M:
        params = {"W_dec": W}

    _renormalise(M, np)
    got_n = M.params["W_dec"]
    s = _sumsq(G, np)
    for name in ("sae_project_rows", "sae_normalise_rows", "sae_sumsq"):
        _portable(name, monkeypatch)
    np.testing.assert_allclose(got, _project_rows(G.copy(), Wn, np), **tol)
    M.params = {"W_dec": W}
    _renormalise(M, np)
    np.testing.assert_allclose(got_n, M.params["W_dec"], **tol)
    assert s == pytest.approx(_sumsq(G, np), rel=1e-5)


# --------------------------------------------------------------------------- whole gradients
@pytest.mark.parametrize("arch,kw", [("lista", {}), ("lista", {"lista_fista": True, "lista_steps": 4})])
def test_lista_gradient_pattern_layout_matches_portable(arch, kw, monkeypatch):
    """LISTA's backward on the patterns of each step's ReLU (NumPy kernels) against the
    portable dense-layout code, at a trained SAE's sparsity."""
    rng = np.random.default_rng(1)
    X = rng.standard_normal((40, 16))
    sae = sae_mod.SparseAutoencoder.initialize(16, 96, arch, seed=0, dtype="float64", l1_coefficient=0.3, **kw)
    z = (X - sae.b_dec) @ sae.W_enc + sae.b_enc
    sae.params["b_enc"] = sae.params["b_enc"] - np.quantile(z, 0.96)  # a few percent of the latents fire
    loss, G, st_ = sae_mod.loss_and_grad(sae, X)
    assert 0 < st_["l0"] < 0.08 * 96
    _portable("sae_layout", monkeypatch)
    loss_p, G_p, _ = sae_mod.loss_and_grad(sae, X)
    assert loss == pytest.approx(loss_p, rel=1e-12)
    for key in G:
        np.testing.assert_allclose(G[key], G_p[key], rtol=1e-10, atol=1e-12, err_msg=key)


@pytest.mark.parametrize("dt", ["float32", "float64"])
@pytest.mark.parametrize("arch", ["relu", "relu_april", "jumprelu"])
def test_fused_threshold_path_matches_portable(arch, dt, monkeypatch):
    """The fused dense pass of ReLU / ReLU (April) / JumpReLU against the portable layout code."""
    rng = np.random.default_rng(2)
    X = rng.standard_normal((70, 12)).astype(dt)
    sae = sae_mod.SparseAutoencoder.initialize(12, 48, arch, seed=0, dtype=dt, l1_coefficient=0.4,
                                               bandwidth=0.3)
    if arch == "jumprelu":
        sae.params["log_threshold"] = np.full(48, np.log(0.2), dtype=dt)
    monkeypatch.setattr(sae_mod, "_SPARSE_DENSITY", 0.0)  # dense codes: the fused pass runs
    loss, G, st_ = sae_mod.loss_and_grad(sae, X)
    _portable("sae_threshold_dense", monkeypatch)
    loss_p, G_p, st_p = sae_mod.loss_and_grad(sae, X)
    tol = dict(rtol=2e-5, atol=2e-6) if dt == "float32" else dict(rtol=1e-11, atol=1e-13)
    assert loss == pytest.approx(loss_p, rel=tol["rtol"])
    assert st_["l0"] == st_p["l0"]
    np.testing.assert_array_equal(st_["fired"], st_p["fired"])
    assert set(G) == set(G_p)
    for key in G:
        np.testing.assert_allclose(G[key], G_p[key], err_msg=key, **tol)
    for key in ("penalty_loss", "mse"):
        assert st_[key] == pytest.approx(st_p[key], rel=tol["rtol"])


@settings(**SETTINGS)
@given(n=st.integers(1, 8), m=st.integers(1, 300), K=st.integers(1, 20), scale=st.floats(0.1, 30.0),
       ties=st.booleans(), seed=st.integers(0, 10_000))
def test_afa_mask_kernel_matches_portable(n, m, K, scale, ties, seed):
    """top-AFA's selection from the K best per row (redone with 4x the K for rows whose
    crossing lies further out) against the portable full sort; rows needing many latents and
    ties included."""
    rng = np.random.default_rng(seed)
    a = rng.random((n, m))
    if ties:
        a = np.round(a * 4) / 4
    a[rng.random((n, m)) < 0.3] = 0.0
    nu = rng.random(m) + 0.5
    xc = rng.standard_normal((n, 5)) * scale * rng.random((n, 1))
    got = sae_mod._afa_mask_np(a, nu, xc, K=K)
    kern = backend._KERNELS.pop(("sae_afa_mask", "numpy"))
    try:
        ref = sae_mod._afa_mask(a, nu, xc, np)
    finally:
        backend._KERNELS[("sae_afa_mask", "numpy")] = kern
    np.testing.assert_array_equal(got, ref)


# --------------------------------------------------------------------------- AuxK, dense dead codes
@pytest.mark.parametrize("arch", ["topk", "abstopk", "batchtopk", "topafa"])
@pytest.mark.parametrize("dt", ["float32", "float64"])
def test_auxk_dense_kernel_matches_portable(arch, dt, monkeypatch):
    sae = sae_mod.SparseAutoencoder.initialize(24, 200, arch, k=6, seed=3, dtype=dt)
    X = np.random.default_rng(4).standard_normal((40, 24)).astype(dt)
    dead = np.zeros(200, bool)
    dead[::3] = True  # 67 dead latents, k_aux 12 of them (dense case)
    kw = dict(aux_coefficient=0.5, dead_mask=dead, afa_coefficient=1 / 32 if arch == "topafa" else 0.0)
    loss, G, st = sae_mod.loss_and_grad(sae, X, **kw)
    _portable("sae_auxk_dense", monkeypatch)
    loss0, G0, st0 = sae_mod.loss_and_grad(sae, X, **kw)
    assert st["aux_loss"] > 0
    tol = dict(rtol=2e-4, atol=1e-6) if dt == "float32" else dict(rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(st["aux_loss"], st0["aux_loss"], **tol)
    np.testing.assert_allclose(loss, loss0, **tol)
    for key in G0:
        np.testing.assert_allclose(G[key], G0[key], **tol)


@pytest.mark.parametrize("dt", [np.float32, np.float64])
def test_add_scaled_rows_kernel_is_bit_identical(dt):
    rng = np.random.default_rng(9)
    G = rng.standard_normal((70, 90)).astype(dt)
    W = rng.standard_normal((70, 90)).astype(dt)
    s = rng.standard_normal(70).astype(dt)
    ref = G + s[:, None] * W
    np.testing.assert_array_equal(sae_mod._add_scaled_rows(G.copy(), s, W, np), ref)


@given(n=st.integers(1, 9), m=st.integers(1, 11), seed=st.integers(0, 10_000),
       dt=st.sampled_from(["float32", "float64"]), add=st.sampled_from([0.0, 0.25, -3.0]))
@settings(**SETTINGS)
def test_dense_layout_numpy_passes_equal_portable(n, m, seed, dt, add):
    rng = np.random.default_rng(seed)
    mask = rng.random((n, m)) < 0.6
    Z = rng.standard_normal((n, m)).astype(dt)
    Z.flat[rng.integers(0, n * m, 3)] = np.array([-0.0, np.inf, np.nan], dtype=dt)  # signs and specials kept
    G, W = rng.standard_normal((n, 5)).astype(dt), rng.standard_normal((m, 5)).astype(dt)
    fast, ref = sae_mod._DenseLayoutNumPy(mask), sae_mod._DenseLayout(mask, np)
    for got, want in [(fast.gather(Z), ref.gather(Z)), (fast.restrict(Z), ref.restrict(Z)),
                      (fast.restrict_add(Z, add), ref.restrict_add(Z, add)), (fast.sample(G, W), ref.sample(G, W))]:
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(np.signbit(got), np.signbit(want))
    # a non-contiguous input takes the portable path, same values
    np.testing.assert_array_equal(fast.gather(np.asfortranarray(Z)), ref.gather(Z))
