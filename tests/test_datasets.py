"""Synthetic ground truth: the generator's promises and the recovery metric."""

import numpy as np
import pytest

from sparsecode.datasets import atom_recovery, make_sparse_signals, random_dictionary


def test_shapes_support_and_model():
    X, D, A = make_sparse_signals(500, 16, 32, 3, noise=0.0, seed=1)
    assert X.shape == (500, 16) and D.shape == (32, 16) and A.shape == (500, 32)
    assert X.dtype == D.dtype == A.dtype == np.float64
    np.testing.assert_allclose(np.linalg.norm(D, axis=1), 1.0, rtol=1e-12)
    np.testing.assert_array_equal(np.count_nonzero(A, axis=1), 3)
    np.testing.assert_allclose(X, A @ D, atol=1e-12)
    mags = np.abs(A[A != 0])
    assert mags.min() >= 1.0 and mags.max() <= 2.0
    assert (A < 0).any() and (A > 0).any()
    # supports are spread over all atoms (uniform: each atom used ~ 500*3/32 ~ 47 times)
    usage = np.count_nonzero(A, axis=0)
    assert usage.min() > 15


def test_noise_level_and_determinism():
    X, D, A = make_sparse_signals(4000, 20, 30, 2, noise=0.05, seed=3)
    resid = X - A @ D
    assert abs(resid.std() - 0.05) < 0.002
    X2, D2, A2 = make_sparse_signals(4000, 20, 30, 2, noise=0.05, seed=3)
    np.testing.assert_array_equal(X, X2)
    X3, _, _ = make_sparse_signals(4000, 20, 30, 2, noise=0.05, seed=4)
    assert not np.allclose(X, X3)


def test_float32_positive():
    X, D, A = make_sparse_signals(100, 8, 10, 2, positive=True, positive_dictionary=True, dtype=np.float32)
    assert X.dtype == D.dtype == A.dtype == np.float32
    assert (A >= 0).all() and (D >= 0).all() and (X > -0.1).all()


@pytest.mark.parametrize("c", [0.0, 0.3, 0.7])
def test_coherence_is_mean_pairwise_cosine(c):
    D = random_dictionary(200, 64, coherence=c, seed=0)
    np.testing.assert_allclose(np.linalg.norm(D, axis=1), 1.0, rtol=1e-12)
    G = D @ D.T
    off = G[~np.eye(200, dtype=bool)]
    assert abs(off.mean() - c) < 0.02


def test_recovery_metric_invariances():
    _, D, _ = make_sparse_signals(10, 16, 24, 2, seed=0)
    rng = np.random.default_rng(12345)
    perm = rng.permutation(24)
    signs = rng.choice([-1.0, 1.0], size=(24, 1))
    scaled = 3.0 * signs * D[perm]
    r = atom_recovery(D, scaled)
    assert r["mmcs"] == pytest.approx(1.0) and r["fraction"] == 1.0 and r["n_recovered"] == 24
    np.testing.assert_array_equal(perm[r["best_match"]], np.arange(24))
    # replacing 6 atoms by an orthogonal direction: exactly those drop out
    half = D.copy()
    e = rng.standard_normal(16)
    half[:6] = e
    r2 = atom_recovery(D, half)
    assert r2["fraction"] == pytest.approx(18 / 24)
    # the metric's values are true cosines
    expect = np.maximum(np.abs(D[:6] @ e) / np.linalg.norm(e), np.abs(D[:6] @ D[6:].T).max(axis=1))
    np.testing.assert_allclose(r2["best_cos"][:6], expect, atol=1e-12)


def test_recovery_with_array_api_strict():
    xps = pytest.importorskip("array_api_strict")
    _, D, _ = make_sparse_signals(10, 8, 12, 2, seed=0)
    r = atom_recovery(xps.asarray(D), xps.asarray(-D))
    assert r["fraction"] == 1.0


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(n_samples=0), ValueError, "n_samples"),
        (dict(n_atoms=0), ValueError, "n_atoms"),
        (dict(n_nonzero=40), ValueError, "n_nonzero"),
        (dict(noise=-1.0), ValueError, "noise"),
        (dict(noise=float("nan")), ValueError, "noise"),
        (dict(coherence=1.0), ValueError, "coherence"),
        (dict(amplitude=(2.0, 1.0)), ValueError, "amplitude"),
        (dict(dtype=np.int64), TypeError, "dtype"),
        (dict(n_features=2.5), TypeError, "n_features"),
    ],
)
def test_generator_bad_input(kwargs, exc, match):
    args = dict(n_samples=10, n_features=8, n_atoms=12, n_nonzero=2)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        make_sparse_signals(**args)


def test_recovery_bad_input():
    D = np.eye(4)
    with pytest.raises(ValueError, match="features"):
        atom_recovery(D, np.eye(5))
    with pytest.raises(ValueError, match="D_learned"):
        atom_recovery(D, np.full((4, 4), np.nan))
    with pytest.raises(ValueError, match="threshold"):
        atom_recovery(D, D, threshold=1.5)
    with pytest.raises(TypeError, match="D_true"):
        atom_recovery(np.eye(4, dtype=int), D)
