"""Every metric against a case computed by hand, on NumPy and array-api-strict."""

import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from sparsecode import metrics as M
from sparsecode.backend import to_numpy

from conftest import asxp


def conv(a, xp, dtype=np.float64):
    """NumPy data as an array of the namespace under test (the shared ``xp`` fixture:
    NumPy, array-api-strict, and CuPy where a GPU is present)."""
    return asxp(xp, np.asarray(a, dtype=dtype))


# --------------------------------------------------------------------------- FVU
def test_fvu_hand_case(xp):
    # X columns: [1, 3] (mean 2, var-sum 2) and [0, 4] (mean 2, var-sum 8): total 10.
    X = conv([[1.0, 0.0], [3.0, 4.0]], xp)
    H = conv([[1.0, 1.0], [2.0, 4.0]], xp)  # residuals 0, -1, 1, 0 -> SSE 2
    assert M.fvu(X, H) == pytest.approx(2.0 / 10.0)
    # predicting the mean gives exactly 1
    Hm = conv([[2.0, 2.0], [2.0, 2.0]], xp)
    assert M.fvu(X, Hm) == pytest.approx(1.0)
    assert M.fvu(X, X) == 0.0


def test_fvu_is_about_the_mean_not_zero():
    # A large offset must not shrink FVU (SAELens once divided by sum X^2).
    rng = np.random.default_rng(0)
    X = rng.standard_normal((200, 5))
    H = X + 0.1 * rng.standard_normal(X.shape)
    assert M.fvu(X + 1000.0, H + 1000.0) == pytest.approx(M.fvu(X, H), rel=1e-9)


def test_fvu_accumulator_matches_one_shot_float32(xp):
    rng = np.random.default_rng(1)
    X = (rng.standard_normal((301, 7)) * 0.01 + 500.0).astype(np.float32)
    H = (X + rng.standard_normal(X.shape).astype(np.float32) * 0.005).astype(np.float32)
    Xd, Hd = X.astype(np.float64), H.astype(np.float64)
    expected = ((Xd - Hd) ** 2).sum() / ((Xd - Xd.mean(0)) ** 2).sum()
    acc = M.FVUAccumulator()
    cuts = [0, 1, 50, 170, 301]
    for a, b in zip(cuts[:-1], cuts[1:]):
        acc.update(conv(X[a:b], xp, np.float32), conv(H[a:b], xp, np.float32))
    assert acc.n == 301
    assert acc.value == pytest.approx(expected, rel=1e-9)
    assert acc.mse == pytest.approx(((Xd - Hd) ** 2).sum() / 301, rel=1e-9)


def test_fvu_validation():
    X = np.ones((3, 2))
    with pytest.raises(ValueError, match="X_hat"):
        M.fvu(X, np.ones((3, 3)))
    with pytest.raises(ValueError, match="NaN"):
        M.fvu(X, np.array([[np.nan, 1], [1, 1], [1, 1]]))
    with pytest.raises(TypeError, match="X"):
        M.fvu(np.ones((3, 2), dtype=int), X)
    with pytest.raises(ValueError, match="empty"):
        M.fvu(np.ones((0, 2)), np.ones((0, 2)))
    assert math.isnan(M.FVUAccumulator().value)
    # constant data: exact reconstruction 0, anything else inf
    assert M.fvu(X, X) == 0.0
    assert M.fvu(X, 2 * X) == math.inf
    acc = M.FVUAccumulator().update(X, X)
    with pytest.raises(ValueError, match="features"):
        acc.update(np.ones((2, 3)), np.ones((2, 3)))


# --------------------------------------------------------------------------- sparsity
CODES = [
    [0.0, 2.0, 0.0, 0.0],
    [0.0, -1.0, 0.5, 0.0],
    [0.0, 3.0, 0.0, 0.0],
    [0.0, 1.0, 0.0, 0.0],
]


def test_sparsity_hand_case(xp):
    A = conv(CODES, xp)
    # nonzeros per row 1, 2, 1, 1 -> 5/4
    assert M.l0(A) == pytest.approx(1.25)
    assert M.l0(A, threshold=1.0) == pytest.approx(0.5)  # |2|, |3| only
    np.testing.assert_allclose(to_numpy(M.firing_frequency(A)), [0, 1, 0.25, 0])
    assert M.dead_fraction(A) == pytest.approx(0.5)
    assert M.dead_fraction(A, max_frequency=0.25) == pytest.approx(0.75)
    assert M.dense_fraction(A) == pytest.approx(0.5)  # atoms 1 (p=1) and 2 (p=.25) > .1
    assert M.dense_fraction(A, min_frequency=0.5) == pytest.approx(0.25)
    d = M.feature_density(A, bins=4, log_range=(-2.0, 0.0))
    assert d["n_dead"] == 2 and d["n_atoms"] == 4
    np.testing.assert_allclose(d["log10_frequency"][[1, 2]], [0.0, math.log10(0.25)])
    assert np.isneginf(d["log10_frequency"][[0, 3]]).all()
    # edges -2, -1.5, -1, -0.5, 0: log10(.25) = -0.602 in bin 2, 0 in the last bin
    np.testing.assert_array_equal(d["counts"], [0, 0, 1, 1])


def test_sparsity_accumulator_matches(xp):
    rng = np.random.default_rng(2)
    A = rng.standard_normal((97, 11)) * (rng.random((97, 11)) < 0.2)
    A[:, 3] = 0.0
    A[:, 4] = 1.0
    acc = M.SparsityAccumulator()
    for a, b in [(0, 10), (10, 11), (11, 97)]:
        acc.update(conv(A[a:b], xp))
    Aa = conv(A, xp)
    assert acc.n == 97
    assert acc.l0 == pytest.approx(M.l0(Aa))
    np.testing.assert_allclose(to_numpy(acc.frequency), to_numpy(M.firing_frequency(Aa)))
    assert acc.dead_fraction() == pytest.approx(M.dead_fraction(Aa)) == pytest.approx(1 / 11)
    assert acc.dense_fraction() == pytest.approx(M.dense_fraction(Aa))
    np.testing.assert_array_equal(acc.density(bins=7)["counts"], M.feature_density(Aa, bins=7)["counts"])


def test_sparsity_validation():
    with pytest.raises(ValueError, match="codes"):
        M.l0(np.ones(3))
    with pytest.raises(ValueError, match="threshold"):
        M.l0(np.ones((2, 3)), threshold=-1)
    with pytest.raises(ValueError, match="max_frequency"):
        M.dead_fraction(np.ones((2, 3)), max_frequency=-0.1)
    with pytest.raises(TypeError, match="codes"):
        M.l0(np.ones((2, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="update"):
        M.SparsityAccumulator().frequency
    acc = M.SparsityAccumulator().update(np.ones((2, 3)))
    with pytest.raises(ValueError, match="atoms"):
        acc.update(np.ones((2, 4)))


# --------------------------------------------------------------------------- dictionaries
S = 1 / math.sqrt(2)


def test_cosines_and_mmcs_hand_case(xp):
    Da = conv([[1.0, 0.0], [0.0, 2.0]], xp)
    Db = conv([[1.0, 1.0], [0.0, -3.0], [-5.0, 0.0]], xp)
    C = to_numpy(M.cosine_matrix(Da, Db))
    np.testing.assert_allclose(C, [[S, 0, -1], [S, -1, 0]], atol=1e-12)
    best, idx = M.max_cosines(Da, Db)
    np.testing.assert_allclose(to_numpy(best), [1, 1])
    np.testing.assert_array_equal(to_numpy(idx), [2, 1])
    assert M.mmcs(Da, Db) == pytest.approx(1.0)
    # signed: atom 0 best is (1,1) with S, atom 1 also (1,1) with S
    assert M.mmcs(Da, Db, absolute=False) == pytest.approx(S)
    # the other direction: (1,1) -> S, (0,-3) -> 1, (-5,0) -> 1
    assert M.mmcs(Db, Da) == pytest.approx((S + 2) / 3)


def test_max_cosines_blocks_agree():
    rng = np.random.default_rng(3)
    Da, Db = rng.standard_normal((37, 6)), rng.standard_normal((23, 6))
    b1, i1 = M.max_cosines(Da, Db, block=5)
    C = np.abs(M.cosine_matrix(Da, Db))
    np.testing.assert_allclose(b1, C.max(1))
    np.testing.assert_array_equal(i1, C.argmax(1))


def test_hungarian_hand_case():
    # greedy max-cos would send both rows of Da to column 0; the matching must not.
    Da = np.array([[1.0, 0.0], [0.8, 0.6]])
    Db = np.array([[1.0, 0.0], [0.0, 1.0]])
    m = M.hungarian_match(Da, Db)
    np.testing.assert_array_equal(m["rows"], [0, 1])
    np.testing.assert_array_equal(m["cols"], [0, 1])
    np.testing.assert_allclose(m["cosines"], [1.0, 0.6])
    assert m["mean_cosine"] == pytest.approx(0.8)
    assert M.mmcs(Da, Db) == pytest.approx(0.9)  # greedy: 1 and 0.8


def test_hungarian_permutation_recovered():
    rng = np.random.default_rng(5)
    D = rng.standard_normal((8, 5))
    perm = rng.permutation(8)
    sign = rng.choice([-1.0, 1.0], size=8)
    Dp = sign[:, None] * D[perm]  # row i of Dp is atom perm[i] of D
    m = M.hungarian_match(D, Dp)
    # atom perm[i] of D must be matched with row i of Dp
    match = dict(zip(m["rows"], m["cols"]))
    for i in range(8):
        assert match[perm[i]] == i
    np.testing.assert_allclose(m["cosines"], 1.0)
    np.testing.assert_allclose(m["signs"][np.argsort(m["cols"])], sign)


def test_hungarian_different_sizes():
    Da = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    Db = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.1], [1.0, 0.0, 0.0]])
    m = M.hungarian_match(Da, Db)
    assert len(m["rows"]) == 2
    assert dict(zip(m["rows"], m["cols"])) == {0: 2, 1: 1}
    np.testing.assert_array_equal(m["unmatched_b"], [0])
    assert m["unmatched_a"].size == 0


def test_feature_splitting_hand_case():
    small = np.array([[1.0, 0.0], [0.0, 1.0]])
    # three large atoms near e1 (it split), one near -e2
    large = np.array([[1.0, 0.1], [1.0, -0.1], [2.0, 0.0], [0.05, -1.0]])
    s = M.feature_splitting(small, large)
    np.testing.assert_array_equal(s["parent"], [0, 0, 0, 1])
    np.testing.assert_array_equal(s["n_children"], [3, 1])
    c = 1 / math.sqrt(1.01)
    c4 = 1 / math.sqrt(1.0025)
    np.testing.assert_allclose(s["cosine"], [c, c, 1.0, c4])
    assert s["mmcs"] == pytest.approx((2 * c + 1 + c4) / 4)


def test_coherence_hand_case(xp):
    D = conv([[1.0, 0.0], [S, S], [0.0, -2.0]], xp)
    # off-diagonal |cos|: (0,1)=S, (0,2)=0, (1,2)=S, each twice
    c = M.coherence(D, block=2)
    assert c["max"] == pytest.approx(S)
    assert c["mean"] == pytest.approx(2 * S / 3)
    assert M.coherence(conv([[1.0, 2.0]], xp)) == {"max": 0.0, "mean": 0.0}
    # an orthonormal basis has zero coherence
    assert M.coherence(np.eye(4))["max"] == 0.0


def test_dictionary_validation():
    with pytest.raises(ValueError, match="features"):
        M.mmcs(np.ones((2, 3)), np.ones((2, 4)))
    # an all-zero (dead) atom has cosine 0 with everything
    assert M.coherence(np.array([[1.0, 0.0], [0.0, 0.0]]))["max"] == 0.0
    np.testing.assert_allclose(M.max_cosines(np.array([[0.0, 0.0], [1.0, 1.0]]), np.eye(2))[0], [0.0, S])
    with pytest.raises(ValueError, match="D"):
        M.coherence(np.ones(3))
    with pytest.raises(ValueError, match="NaN"):
        M.mmcs(np.array([[np.inf, 1.0]]), np.ones((1, 2)))
    xps = pytest.importorskip("array_api_strict")
    with pytest.raises(TypeError, match="D_b"):
        M.mmcs(np.ones((2, 2)), xps.ones((2, 2), dtype=xps.float64))


def test_afa_ratio_hand_case(xp):
    D = conv([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]], xp)  # norms 2, 1, sqrt 2
    A = conv([[1.0, 0.0, 0.0], [0.0, 3.0, 0.0], [1.0, 0.0, 1.0], [0.0, 0.0, 0.0]], xp)
    X = conv([[2.0, 0.0], [0.0, 3.0], [3.0, 1.0], [0.0, 0.0]], xp)
    r = to_numpy(M.afa_ratio(X, A, D))
    # rows 0, 1: one atom, exact -> 1. row 2: sqrt(4 + 2) / sqrt(10). row 3: 0/0 -> NaN
    np.testing.assert_allclose(r[:3], [1.0, 1.0, math.sqrt(6 / 10)])
    assert math.isnan(r[3])
    # a bias is subtracted from X first
    b = conv([1.0, 1.0], xp)
    r = to_numpy(M.afa_ratio(X, A, D, bias=b))
    np.testing.assert_allclose(r[0], 2.0 / math.sqrt(1 + 1))


def test_afa_ratio_orthogonal_is_one():
    Q, _ = np.linalg.qr(np.random.default_rng(6).standard_normal((6, 6)))
    D = Q * np.array([1, 2, 3, 4, 5, 6.0])[:, None]  # orthogonal rows, different norms
    A = np.random.default_rng(7).standard_normal((20, 6))
    np.testing.assert_allclose(M.afa_ratio(A @ D, A, D), 1.0)
    with pytest.raises(ValueError, match="atoms"):
        M.afa_ratio(A @ D, A[:, :5], D)
    with pytest.raises(ValueError, match="bias"):
        M.afa_ratio(A @ D, A, D, bias=np.ones(5))


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 40), st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_fvu_stream_equals_one_shot(n, n_batches, seed):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n + 1, 3)) * 3 + 7
    H = X + rng.standard_normal(X.shape)
    cuts = np.unique(np.concatenate([[0, n + 1], rng.integers(0, n + 1, n_batches)]))
    acc = M.FVUAccumulator()
    for a, b in zip(cuts[:-1], cuts[1:]):
        acc.update(X[a:b], H[a:b])
    assert acc.value == pytest.approx(M.fvu(X, H), rel=1e-10)


# --------------------------------------------------------------------------- toy superposition data
def test_toy_superposition_ground_truth():
    from sparsecode.toy import make_superposition, score

    toy = make_superposition(20000, 40, 10, sparsity=0.9, probability_decay=1.0, importance_decay=0.9, seed=1)
    assert toy.X.shape == (20000, 10) and toy.features.shape == (20000, 40)
    np.testing.assert_allclose(np.linalg.norm(toy.dictionary, axis=1), 1.0)
    np.testing.assert_allclose(toy.X, toy.features @ toy.dictionary)
    np.testing.assert_allclose(toy.importance, 0.9 ** np.arange(40))
    # power law with mean rate 1 - S, clipped at 1
    w = 1.0 / np.arange(1, 41)
    np.testing.assert_allclose(toy.probability, np.minimum(0.1 * w / w.mean(), 1.0))
    # empirical rates agree with the profile (binomial standard error, 5 sigma)
    emp = (toy.features > 0).mean(0)
    se = np.sqrt(toy.probability * (1 - toy.probability) / 20000)
    assert np.all(np.abs(emp - toy.probability) <= 5 * se + 1e-12)
    # magnitudes Uniform(0, 1): mean of active values 1/2
    assert toy.features[toy.features > 0].mean() == pytest.approx(0.5, abs=0.01)
    # the true dictionary and codes score perfectly, a permuted/sign-flipped copy too
    perm = np.random.default_rng(0).permutation(40)
    s = score(toy, -toy.dictionary[perm], -toy.features[:, perm])
    assert s["mmcs"] == pytest.approx(1.0) and s["fraction"] == 1.0
    assert s["hungarian"] == pytest.approx(1.0) and s["code_correlation"] == pytest.approx(1.0)
    # a random dictionary does not
    assert score(toy, np.random.default_rng(2).standard_normal((40, 10)))["fraction"] < 0.5


def test_toy_uniform_sparsity_and_validation():
    from sparsecode.toy import importance_weighted_loss, make_superposition

    toy = make_superposition(10, 5, 3, sparsity=0.5, dtype=np.float32, noise=0.1)
    assert toy.X.dtype == np.float32 and np.all(toy.probability == 0.5)
    with pytest.raises(ValueError, match="sparsity"):
        make_superposition(10, 5, 3, sparsity=1.0)
    with pytest.raises(ValueError, match="importance_decay"):
        make_superposition(10, 5, 3, importance_decay=0.0)
    with pytest.raises(TypeError, match="n_features"):
        make_superposition(10, 2.5, 3)
    # loss: importance [1, .5]; errors (1, 2) and (0, 2): (1 + 2) + (0 + 2) -> mean 2.5
    F = np.array([[1.0, 2.0], [0.0, 2.0]])
    assert importance_weighted_loss(F, np.zeros_like(F), np.array([1.0, 0.5])) == pytest.approx(2.5)
    with pytest.raises(ValueError, match="importance"):
        importance_weighted_loss(F, F, np.ones(3))
