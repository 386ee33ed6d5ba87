"""Dictionary learning: recovery of a known dictionary, the mathematics of each update, the
batch objective's monotonicity, streaming sources, dead atoms, checkpoint/resume with a real
kill, budgets, bad input, and the scikit-learn estimators."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from sparsecode.datasets import atom_recovery, make_sparse_signals
from sparsecode.dictionary import (
    DictionaryLearning,
    SparseEncoder,
    _bcd,
    _initial_dictionary,
    _ksvd,
    _ksvd_numpy,
    _load_checkpoint,
    _mod,
    learn_dictionary,
    learn_dictionary_online,
)

xps = pytest.importorskip("array_api_strict")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Single-threaded BLAS and Numba for this module: on a shared, oversubscribed machine
    multi-threaded kernels on these small batches wait for CPU slices (10x slower); results
    are the same either way."""
    from threadpoolctl import threadpool_limits

    try:
        import numba

        old = numba.get_num_threads()
        numba.set_num_threads(1)
    except ImportError:  # pragma: no cover
        numba, old = None, None
    with threadpool_limits(limits=1):
        yield
    if numba is not None:
        numba.set_num_threads(old)


@pytest.fixture(scope="module")
def big_problem():
    """The issue's problem: 64 features, 128 atoms, 5 non-zeros, 20000 signals, noise 0.01."""
    return make_sparse_signals(20000, 64, 128, 5, noise=0.01, seed=0)


@pytest.fixture(scope="module")
def small_problem():
    return make_sparse_signals(4000, 32, 40, 3, noise=0.01, seed=1)


# --------------------------------------------------------------------------- recovery
# (update, method, batch_size, epochs): every update rule with OMP coding, BCD and MOD with
# the default Lasso coding (FISTA), BCD with MP and IHT. K-SVD uses only the batch's signals,
# hence bigger batches; K-SVD with Lasso codes is tested on the smaller problem below (on this
# one its atoms stop at |cos| ~ 0.99: the rank-1 fit on the users of an atom sees the
# shrinkage of the other atoms' codes).
RECOVERY_CASES = [
    ("bcd", "omp", 512, 2),
    ("mod", "omp", 512, 2),
    ("ksvd", "omp", 1024, 2),
    ("bcd", "fista", 512, 2),
    ("mod", "fista", 512, 2),
    ("bcd", "mp", 512, 3),
]


@pytest.mark.parametrize("update, method, batch_size, epochs", RECOVERY_CASES)
def test_recovers_known_dictionary_numpy(big_problem, update, method, batch_size, epochs):
    X, D_true, _ = big_problem
    res = learn_dictionary_online(
        X, 128, update=update, method=method, n_nonzero=5, batch_size=batch_size,
        n_epochs=epochs, seed=0,
    )
    D = res.dictionary
    assert isinstance(D, np.ndarray) and D.shape == (128, 64) and D.dtype == np.float64
    np.testing.assert_allclose(np.linalg.norm(D, axis=1), 1.0, rtol=1e-10)
    rec = atom_recovery(D_true, D, threshold=0.99)
    assert rec["fraction"] >= 0.95, (update, method, rec["mmcs"], rec["fraction"])
    assert res.n_batches == len(res.history["objective"]) == epochs * -(-20000 // batch_size)


@pytest.mark.parametrize("update, method", [("ksvd", "fista"), ("bcd", "iht"), ("mod", "iht")])
def test_recovers_smaller_problem_numpy(small_problem, update, method):
    X, D_true, _ = small_problem
    res = learn_dictionary_online(X, 40, update=update, method=method, n_nonzero=3, batch_size=500,
                                  n_epochs=4, seed=0)
    rec = atom_recovery(D_true, res.dictionary)
    assert rec["fraction"] >= 0.95, (update, method, rec["mmcs"], rec["fraction"])


@pytest.mark.parametrize("update", ["bcd", "mod", "ksvd"])
def test_recovers_known_dictionary_array_api_strict(small_problem, update):
    X, D_true, _ = small_problem
    Xs = xps.asarray(X)
    res = learn_dictionary_online(Xs, 40, update=update, method="fista", batch_size=400,
                                  n_epochs=6, seed=0)
    assert isinstance(res.dictionary, type(Xs)) and res.dictionary.dtype == xps.float64
    rec = atom_recovery(D_true, res.dictionary)
    assert rec["fraction"] >= 0.95, (update, rec["mmcs"], rec["fraction"])


def test_numpy_and_strict_take_the_same_steps(small_problem):
    """The portable code (array-api-strict) and NumPy (with its kernels) agree step by step."""
    X, _, _ = small_problem
    for update in ("bcd", "mod", "ksvd"):
        kw = dict(update=update, method="omp", n_nonzero=3, batch_size=500, max_batches=3, seed=2)
        a = learn_dictionary_online(X, 40, **kw).dictionary
        b = learn_dictionary_online(xps.asarray(X), 40, **kw).dictionary
        np.testing.assert_allclose(np.asarray(b), a, atol=1e-8, err_msg=update)


@pytest.mark.gpu
def test_cupy_backend(small_problem):
    from sparsecode.backend import cupy_available

    if not cupy_available():
        pytest.skip("needs CuPy and a CUDA device")
    import cupy as cp

    X, D_true, _ = small_problem
    for update in ("bcd", "mod", "ksvd"):
        res = learn_dictionary_online(cp.asarray(X), 40, update=update, method="fista", batch_size=400,
                                      n_epochs=6, seed=0)
        assert isinstance(res.dictionary, cp.ndarray)
        assert atom_recovery(D_true, res.dictionary)["fraction"] >= 0.95
    res = learn_dictionary(cp.asarray(X[:1000]), 40, n_iter=3)
    assert isinstance(res.codes, cp.ndarray)


def test_float32_stays_float32(small_problem):
    X, D_true, _ = small_problem
    X32 = X.astype(np.float32)
    res = learn_dictionary_online(X32, 40, batch_size=400, n_epochs=3, method="omp", n_nonzero=3)
    assert res.dictionary.dtype == np.float32
    assert atom_recovery(D_true, res.dictionary)["fraction"] >= 0.9
    res_b = learn_dictionary(X32[:500], 40, n_iter=2)
    assert res_b.dictionary.dtype == np.float32 and res_b.codes.dtype == np.float32


# --------------------------------------------------------------------------- batch version
def test_batch_bcd_objective_decreases_every_round(small_problem):
    X, D_true, _ = small_problem
    X = X[:1500]
    res = learn_dictionary(X, 40, update="bcd", method="fista", alpha=0.1, n_iter=15, tol=None, seed=0,
                           duplicate_threshold=None)
    obj = res.history["objective"]
    assert len(obj) == 15
    assert np.all(np.diff(obj) <= 1e-10 * obj[:-1]), np.diff(obj)
    assert obj[-1] < 0.8 * obj[0]
    # the reported objective is the Lasso objective of the returned codes, per sample
    # (codes of the last round, rescaled to the final atoms: reconstruction unchanged)
    from sparsecode.lasso import lasso_objective

    final = np.mean(lasso_objective(X, res.dictionary, res.codes, 0.1))
    assert final <= obj[-1] * (1 + 1e-9)


@pytest.mark.parametrize("update", ["mod", "ksvd"])
def test_batch_mod_ksvd_reduce_the_error(small_problem, update):
    X, D_true, _ = small_problem
    res = learn_dictionary(X[:2000], 40, update=update, method="omp", n_nonzero=3, n_iter=12, seed=0)
    err = res.history["rel_error"]
    assert err[-1] < 0.2 * err[0]
    assert atom_recovery(D_true, res.dictionary)["mmcs"] > 0.95


def test_batch_with_minibatches_warm_starts(small_problem):
    X, D_true, _ = small_problem
    res = learn_dictionary(X, 40, batch_size=400, n_iter=6, seed=0)
    assert res.codes.shape == (4000, 40)
    assert atom_recovery(D_true, res.dictionary)["fraction"] >= 0.95
    # the cached codes (the warm starts) are those of the last epoch, rescaled to the final
    # atoms: their Lasso objective is close to that of fresh, converged codes
    from sparsecode.lasso import fista, lasso_objective

    fresh = fista(X, res.dictionary, res.alpha, tol=1e-6, max_iter=2000)
    cached = np.mean(lasso_objective(X, res.dictionary, res.codes, res.alpha))
    assert np.mean(fresh.objective) <= cached <= 1.05 * np.mean(fresh.objective)


def test_minibatch_warm_start_cache_portable(small_problem):
    """The code cache (scatter of a batch's codes into all samples' codes) is the same with the
    portable scatter (array-api-strict) as with NumPy's indexed assignment."""
    from sparsecode.dictionary import _scatter_rows

    M = np.zeros((7, 3))
    rows = np.arange(9.0).reshape(3, 3) + 1
    idx = np.array([5, 0, 3])
    expect = M.copy()
    expect[idx] = rows
    np.testing.assert_array_equal(_scatter_rows(M.copy(), idx, rows, np), expect)
    got = _scatter_rows(xps.asarray(M), xps.asarray(idx), xps.asarray(rows), xps)
    np.testing.assert_array_equal(np.asarray(got), expect)
    X, _, _ = small_problem
    kw = dict(batch_size=250, n_iter=2, alpha=0.3, seed=0)
    a = learn_dictionary(X[:1000], 40, **kw)
    b = learn_dictionary(xps.asarray(X[:1000]), 40, **kw)
    np.testing.assert_allclose(np.asarray(b.codes), a.codes, atol=1e-6)
    np.testing.assert_allclose(np.asarray(b.dictionary), a.dictionary, atol=1e-6)


def test_tol_stops_the_batch_version(small_problem):
    X, _, _ = small_problem
    res = learn_dictionary(X[:800], 40, method="omp", n_nonzero=3, n_iter=200, tol=1e-3)
    assert res.stop_reason == "tol" and res.converged and res.n_batches < 200


# --------------------------------------------------------------------------- update maths
def _stats(seed=0, n=200, k=12, f=10):
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((n, k)) * (rng.random((n, k)) < 0.3)
    X = rng.standard_normal((n, f))
    D = rng.standard_normal((k, f))
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    return X, A, D


def test_bcd_reaches_the_kkt_point_of_the_surrogate():
    """min 0.5 tr(D^T S D) - tr(D^T B) over ||d_j|| <= 1: the gradient G = S D - B satisfies
    G_j = 0 for interior atoms and G_j = -lambda_j d_j (lambda_j >= 0) on the sphere."""
    X, A, D = _stats()
    S, B = A.T @ A, A.T @ X
    for xp in (np, xps):
        Dn = np.asarray(_bcd(xp.asarray(D), xp.asarray(S), xp.asarray(B), 2000, xp))
        G = S @ Dn - B
        norms = np.linalg.norm(Dn, axis=1)
        assert np.all(norms <= 1 + 1e-12)
        for j in range(Dn.shape[0]):
            if norms[j] < 1 - 1e-9:
                np.testing.assert_allclose(G[j], 0, atol=1e-6)
            else:
                lam = -G[j] @ Dn[j]
                assert lam >= -1e-8
                np.testing.assert_allclose(G[j], -lam * Dn[j], atol=1e-6)


def test_mod_is_least_squares():
    X, A, D = _stats(1)
    S, B = A.T @ A, A.T @ X
    ls = np.linalg.lstsq(A, X, rcond=None)[0]
    for xp in (np, xps):
        np.testing.assert_allclose(np.asarray(_mod(xp.asarray(D), xp.asarray(S), xp.asarray(B), xp)), ls, atol=1e-8)


@pytest.mark.parametrize("exact", [True, False])
def test_ksvd_rank_one_updates(exact):
    X, A, D = _stats(2)
    R = X - A @ D
    Dn, An = _ksvd_numpy(D, A, R, exact)
    # support kept, unit atoms, error not increased
    np.testing.assert_array_equal(An != 0, A != 0)
    np.testing.assert_allclose(np.linalg.norm(Dn, axis=1), 1.0, atol=1e-12)
    assert np.linalg.norm(X - An @ Dn) <= np.linalg.norm(R) + 1e-12
    # atom 0 (updated first) is the best rank-1 fit of its users' residual
    users = A[:, 0] != 0
    E = (R + np.outer(A[:, 0], D[0]))[users]
    if exact:
        u, s, vt = np.linalg.svd(E, full_matrices=False)
        assert abs(abs(Dn[0] @ vt[0]) - 1) < 1e-10
        np.testing.assert_allclose(np.linalg.norm(E - np.outer(An[users, 0], Dn[0])),
                                   np.sqrt(np.sum(s[1:] ** 2)), rtol=1e-10)
    else:  # one power iteration from the current codes
        v = E.T @ A[users, 0]
        np.testing.assert_allclose(Dn[0], v / np.linalg.norm(v), atol=1e-12)
        np.testing.assert_allclose(An[users, 0], E @ Dn[0], atol=1e-12)
    # the portable code gives the same sweep
    Dp, Ap = _ksvd(xps.asarray(D), xps.asarray(X), xps.asarray(A), xps.asarray(R), exact=exact, xp=xps)
    np.testing.assert_allclose(np.asarray(Dp), Dn, atol=1e-10)
    np.testing.assert_allclose(np.asarray(Ap), An, atol=1e-10)


# --------------------------------------------------------------------------- init, dead atoms
def test_init_options(small_problem):
    X, D_true, _ = small_problem
    rng = np.random.default_rng(0)
    D = _initial_dictionary("signals", 40, X[:100], rng, np)
    Xn = X[:100] / np.linalg.norm(X[:100], axis=1, keepdims=True)
    assert np.all(np.max(np.abs(D @ Xn.T), axis=1) > 1 - 1e-12)  # each atom is a signal
    G = _initial_dictionary("gaussian", 40, X[:100], rng, np)
    np.testing.assert_allclose(np.linalg.norm(G, axis=1), 1.0)
    more = _initial_dictionary("signals", 40, X[:10], rng, np)  # fewer signals than atoms
    np.testing.assert_allclose(np.linalg.norm(more, axis=1), 1.0)
    # starting from the truth keeps it
    res = learn_dictionary_online(X, 40, init=D_true, method="omp", n_nonzero=3, max_batches=3, batch_size=500)
    assert atom_recovery(D_true, res.dictionary)["mmcs"] > 0.999
    with pytest.raises(ValueError, match="init"):
        learn_dictionary(X, 40, init=D_true[:5])
    with pytest.raises(ValueError, match="init"):
        learn_dictionary(X, 40, init="zeros")


def test_dead_atoms_are_resampled_into_the_data():
    """Signals live in an 8-dim subspace; atoms started outside it are never used, are
    re-initialised from residuals, and end inside the subspace."""
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.standard_normal((16, 16)))[0]
    inside, outside = basis[:, :8].T, basis[:, 8:].T
    codes = rng.standard_normal((3000, 8)) * (rng.random((3000, 8)) < 0.4)
    X = codes @ inside
    init = np.vstack([inside[:4], outside[:4]])
    res = learn_dictionary_online(X, 8, init=init, method="omp", n_nonzero=3, batch_size=100,
                                  n_epochs=1, dead_after=300, duplicate_threshold=None)
    assert res.n_resampled >= 4
    assert res.history["resampled"].sum() == res.n_resampled
    dead = res.history["dead"]  # unused for 300 samples = 3 batches of 100
    assert dead[:2].sum() == 0 and dead[2] >= 4 and dead[-10:].sum() == 0
    D = res.dictionary
    np.testing.assert_allclose(np.linalg.norm(D @ inside.T, axis=1), 1.0, atol=1e-6)


def test_duplicate_atoms_are_replaced(small_problem):
    X, D_true, _ = small_problem
    init = np.vstack([D_true[:39], D_true[:1]])  # atom 0 twice, atom 39 missing
    res = learn_dictionary_online(X, 40, init=init, method="omp", n_nonzero=3, batch_size=500,
                                  n_epochs=2, duplicate_threshold=0.95)
    assert res.n_resampled >= 1
    assert atom_recovery(D_true, res.dictionary)["fraction"] == 1.0


# --------------------------------------------------------------------------- sources
def test_memmap_path_iterables_and_store(tmp_path, small_problem):
    X, D_true, _ = small_problem
    path = tmp_path / "x.npy"
    np.save(path, X)
    kw = dict(method="omp", n_nonzero=3, batch_size=400, n_epochs=3, seed=0)
    ref = learn_dictionary_online(X, 40, **kw).dictionary
    mm = learn_dictionary_online(np.load(path, mmap_mode="r"), 40, **kw).dictionary
    by_path = learn_dictionary_online(str(path), 40, **kw).dictionary
    np.testing.assert_array_equal(mm, ref)
    np.testing.assert_array_equal(by_path, ref)
    assert atom_recovery(D_true, ref)["fraction"] >= 0.95
    # a list is re-iterable (3 epochs), a generator is one pass
    chunks = [X[i:i + 400] for i in range(0, 4000, 400)]
    res_list = learn_dictionary_online(chunks, 40, method="omp", n_nonzero=3, n_epochs=3)
    assert res_list.n_batches == 30 and res_list.stop_reason == "n_iter"
    res_gen = learn_dictionary_online((c for c in chunks), 40, method="omp", n_nonzero=3, n_epochs=3)
    assert res_gen.n_batches == 10 and res_gen.stop_reason == "exhausted"
    res_call = learn_dictionary_online(lambda: iter(chunks), 40, method="omp", n_nonzero=3, n_epochs=2)
    assert res_call.n_batches == 20


def test_activation_store_source(small_problem):
    store_mod = pytest.importorskip("sparsecode.store")
    X, D_true, _ = small_problem
    store = store_mod.ActivationStore(X.astype(np.float32))
    res = learn_dictionary_online(store, 40, method="omp", n_nonzero=3, batch_size=400, n_epochs=3)
    assert res.dictionary.dtype == np.float32
    assert res.n_batches == 30
    assert atom_recovery(D_true, res.dictionary)["fraction"] >= 0.9


def test_xp_conversion_of_numpy_stream(small_problem):
    X, _, _ = small_problem
    res = learn_dictionary_online(X, 40, method="omp", n_nonzero=3, batch_size=500, max_batches=2, xp=xps)
    assert isinstance(res.dictionary, type(xps.asarray(X)))


# --------------------------------------------------------------------------- budgets, progress
def test_budgets(small_problem):
    X, _, _ = small_problem
    kw = dict(method="omp", n_nonzero=3, batch_size=100, n_epochs=None)
    assert learn_dictionary_online(X, 40, max_batches=7, **kw).n_batches == 7
    r = learn_dictionary_online(X, 40, max_samples=1000, **kw)
    assert r.stop_reason == "max_samples" and r.n_samples_seen == 1000
    t0 = time.perf_counter()
    r = learn_dictionary_online(X, 40, max_time=0.3, **kw)
    assert r.stop_reason == "max_time" and time.perf_counter() - t0 < 30
    r = learn_dictionary_online(X, 40, tol=1e-2, **kw)
    assert r.stop_reason == "tol" and r.converged and r.history["change"][-1] < 1e-2
    r = learn_dictionary_online(X, 40, callback=lambda t, D, row: t == 4, **kw)
    assert r.stop_reason == "callback" and r.n_batches == 4


def test_progress_bar(small_problem, capsys):
    X, _, _ = small_problem
    learn_dictionary_online(X, 40, method="omp", n_nonzero=3, batch_size=1000, progress=True)
    err = capsys.readouterr().err
    assert "dictionary (bcd)" in err and "dead" in err


# --------------------------------------------------------------------------- checkpoints
_SCRIPT = """
import sys, time
import numpy as np
from sparsecode.datasets import make_sparse_signals
from sparsecode.dictionary import learn_dictionary_online
X, _, _ = make_sparse_signals(3000, 16, 24, 3, noise=0.01, seed=5)
slow = float(sys.argv[2])
res = learn_dictionary_online(X, 24, method=sys.argv[3], n_nonzero=3, batch_size=100, n_epochs=2, seed=3,
                              checkpoint=sys.argv[1], checkpoint_every=2,
                              callback=lambda t, D, row: time.sleep(slow) and False)
np.save(sys.argv[1] + ".final.npy", res.dictionary)
"""


@pytest.mark.parametrize("method", ["fista"])
def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path, method):
    script = tmp_path / "learn.py"
    script.write_text(textwrap.dedent(_SCRIPT))
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
    ckpt = tmp_path / "run.ckpt"
    proc = subprocess.Popen([sys.executable, str(script), str(ckpt), "0.05", method], env=env)
    try:
        deadline = time.time() + 120
        while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert ckpt.exists(), "no checkpoint appeared"
        time.sleep(0.3)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    _, meta = _load_checkpoint(ckpt)
    t_killed = meta["t"]
    assert 2 <= t_killed < 60, "the run was not interrupted mid-way"
    assert not (tmp_path / "run.ckpt.final.npy").exists()
    # resume in a fresh process to the end
    subprocess.run([sys.executable, str(script), str(ckpt), "0", method], env=env, check=True, timeout=300)
    resumed = np.load(str(ckpt) + ".final.npy")
    # uninterrupted run, in a fresh process too
    ckpt2 = tmp_path / "clean.ckpt"
    subprocess.run([sys.executable, str(script), str(ckpt2), "0", method], env=env, check=True, timeout=300)
    clean = np.load(str(ckpt2) + ".final.npy")
    np.testing.assert_allclose(resumed, clean, atol=1e-10)
    arrays, meta = _load_checkpoint(ckpt)
    assert meta["t"] == 60 and len(arrays["history_objective"]) == 60
    assert meta["stop_reason"] == "n_iter"


def test_resume_in_process_batch_version_and_settings_check(tmp_path, small_problem):
    X, _, _ = small_problem
    X = X[:1000]
    kw = dict(update="bcd", alpha=0.1, tol=None, seed=0)
    full = learn_dictionary(X, 40, n_iter=6, **kw)
    ck = tmp_path / "b.ckpt"
    part = learn_dictionary(X, 40, n_iter=3, checkpoint=ck, **kw)
    assert part.n_batches == 3
    rest = learn_dictionary(X, 40, n_iter=6, checkpoint=ck, **kw)  # continues rounds 4..6
    assert rest.n_batches == 6
    np.testing.assert_allclose(rest.dictionary, full.dictionary, atol=1e-10)
    np.testing.assert_allclose(rest.history["objective"], full.history["objective"], rtol=1e-10)
    with pytest.raises(ValueError, match="different settings"):
        learn_dictionary(X, 40, n_iter=6, checkpoint=ck, update="mod", alpha=0.1)
    fresh = learn_dictionary(X, 40, n_iter=2, checkpoint=ck, resume=False, **kw)
    assert fresh.n_batches == 2
    # no temporary files are left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.ckpt"]


# --------------------------------------------------------------------------- bad input
def test_bad_input(small_problem):
    X, _, _ = small_problem
    with pytest.raises(ValueError, match="n_atoms"):
        learn_dictionary(X, 0)
    with pytest.raises(ValueError, match="n_atoms"):
        learn_dictionary_online(X, -3)
    bad = X.copy()
    bad[5, 3] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        learn_dictionary(bad, 10)
    with pytest.raises(ValueError, match="NaN or Inf"):
        learn_dictionary_online([X[:100], bad[:100]], 10)
    with pytest.raises(ValueError, match="same width"):
        learn_dictionary_online([X[:100], X[:100, :10]], 10)
    with pytest.raises(TypeError, match="float32 or float64"):
        learn_dictionary(X.astype(int), 10)
    with pytest.raises(TypeError, match="dtype"):
        learn_dictionary_online([X[:100], X[:100].astype(np.float32)], 10)
    with pytest.raises(ValueError, match="method"):
        learn_dictionary(X, 10, method="lars")
    with pytest.raises(ValueError, match="update"):
        learn_dictionary(X, 10, update="svd")
    with pytest.raises(ValueError, match="alpha"):
        learn_dictionary(X, 10, alpha=-1.0)
    with pytest.raises(ValueError, match="empty"):
        learn_dictionary_online([], 10)
    with pytest.raises(ValueError, match="empty"):
        learn_dictionary(X[:0], 10)
    with pytest.raises(ValueError, match="2-D"):
        learn_dictionary_online(X[0], 10)
    with pytest.raises(ValueError, match="batch_size"):
        learn_dictionary_online(X, 10, batch_size=0)
    with pytest.raises(TypeError, match="batches"):
        learn_dictionary_online(42, 10)
    with pytest.raises(ValueError, match="duplicate_threshold"):
        learn_dictionary(X, 10, duplicate_threshold=1.5)
    with pytest.raises(TypeError, match="X"):
        learn_dictionary("not an array", 10)


# --------------------------------------------------------------------------- estimators
def test_dictionary_learning_estimator(small_problem):
    from sparsecode.lasso import fista

    X, D_true, _ = small_problem
    est = DictionaryLearning(n_atoms=40, batch_size=400, n_iter=6, random_state=0)
    codes = est.fit_transform(X)
    assert est.components_.shape == (40, 32) and codes.shape == (4000, 40)
    assert atom_recovery(D_true, est.components_)["fraction"] >= 0.95
    # transform is the Lasso solution on components_ (certified by the duality gap)
    ref = fista(X[:50], est.components_, est.alpha_, tol=1e-6, max_iter=1000)
    assert ref.all_converged
    np.testing.assert_allclose(codes[:50], ref.codes, atol=1e-4)
    np.testing.assert_allclose(est.inverse_transform(codes), codes @ est.components_)
    params = est.get_params()
    assert params["n_atoms"] == 40 and params["update"] == "bcd"
    est.set_params(update="mod")
    assert est.update == "mod"


def test_dictionary_learning_partial_fit(small_problem):
    X, D_true, _ = small_problem
    est = DictionaryLearning(n_atoms=40, method="omp", n_nonzero=3, random_state=0)
    fractions = []
    for epoch in range(3):
        for i in range(0, 4000, 400):
            est.partial_fit(X[i:i + 400])
        fractions.append(atom_recovery(D_true, est.components_)["fraction"])
    assert est.n_iter_ == 30 and fractions[-1] >= 0.95
    # partial_fit after fit continues from the fitted dictionary
    est2 = DictionaryLearning(n_atoms=40, method="omp", n_nonzero=3, n_iter=2, random_state=0).fit(X[:1000])
    before = est2.components_.copy()
    est2.partial_fit(X[1000:1400])
    assert est2.n_iter_ == 3 and not np.allclose(before, est2.components_)


def test_sparse_encoder_agrees_with_scikit_learn(small_problem):
    from sklearn.decomposition import SparseCoder

    X, D_true, _ = small_problem
    X = X[:200]
    ours = SparseEncoder(D_true, alpha=0.05, transform_tol=1e-9, transform_max_iter=5000).fit(X)
    sk = SparseCoder(D_true, transform_algorithm="lasso_cd", transform_alpha=0.05, transform_max_iter=5000)
    np.testing.assert_allclose(ours.transform(X), sk.transform(X), atol=1e-4)
    ours_omp = SparseEncoder(D_true, method="omp", n_nonzero=3)
    sk_omp = SparseCoder(D_true, transform_algorithm="omp", transform_n_nonzero_coefs=3)
    np.testing.assert_allclose(ours_omp.transform(X), sk_omp.transform(X), atol=1e-8)
    A = ours.transform(X)
    np.testing.assert_allclose(ours.inverse_transform(A), A @ D_true)
    with pytest.raises(ValueError, match="features"):
        ours.fit(X[:, :5])


def test_check_estimator_dictionary_learning():
    from sklearn.utils.estimator_checks import check_estimator

    # every check applies and passes (array-API input is skipped unless SCIPY_ARRAY_API=1)
    results = check_estimator(DictionaryLearning(n_iter=3, random_state=0), on_fail=None)
    bad = [(r["check_name"], repr(r["exception"])) for r in results if r["status"] == "failed"]
    assert not bad, bad


# A SparseEncoder's dictionary fixes n_features, but these checks fit data of their own width
# (1, 2, 4, 5 or 10 features): with the 3-feature dictionary of the instance they fail at fit
# with "X has k features but the dictionary has 3". scikit-learn's own suite builds SparseCoder
# per check with a dictionary of the right width; we do the same below and run each of them.
_SPARSE_ENCODER_WIDTH = {
    "check_estimators_overwrite_params": 2,
    "check_estimators_fit_returns_self": 2,
    "check_readonly_memmap_input": 2,
    "check_n_features_in_after_fitting": 4,
    "check_positive_only_tag_during_fit": 4,
    "check_estimators_dtypes": 5,
    "check_dtype_object": 10,
    "check_transformers_unfitted_stateless": 5,
    "check_fit2d_1sample": 10,
    "check_fit2d_1feature": 1,
    "check_fit_idempotent": 2,
    "check_fit_check_is_fitted": 2,
    "check_n_features_in": 2,
}


def test_check_estimator_sparse_encoder():
    import sklearn.utils.estimator_checks as ec

    rng = np.random.default_rng(0)
    expected = {name: f"the check fits data with {w} features; the instance's dictionary has 3 "
                f"(run separately with a width-{w} dictionary)" for name, w in _SPARSE_ENCODER_WIDTH.items()}
    results = ec.check_estimator(SparseEncoder(rng.normal(size=(5, 3))), on_fail=None,
                                 expected_failed_checks=expected)
    bad = [(r["check_name"], repr(r["exception"])) for r in results if r["status"] == "failed"]
    assert not bad, bad
    for name, width in _SPARSE_ENCODER_WIDTH.items():
        getattr(ec, name)("SparseEncoder", SparseEncoder(rng.normal(size=(5, width))))


# --------------------------------------------------------------------------- benchmark
def test_benchmark_quick_runs(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), MPLBACKEND="Agg",
               OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "dictionary_learning.py"), "--quick",
                          "--out", str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "MMCS" in out.stdout
    assert (tmp_path / "dictionary_learning_mmcs.png").exists()
    assert (tmp_path / "dictionary_learning_patches.png").exists()


# --------------------------------------------------------------------------- command line
def test_cli_learn(tmp_path, small_problem):
    import json

    from sparsecode.cli import main

    X, D_true, _ = small_problem
    np.save(tmp_path / "acts.npy", X)
    rc = main(["learn", str(tmp_path / "acts.npy"), "--atoms", "40", "--out", str(tmp_path / "dict.npy"),
               "--method", "omp", "--n-nonzero", "3", "--batch-size", "400", "--epochs", "3", "--no-progress",
               "--checkpoint", str(tmp_path / "ck.npz")])
    assert rc == 0
    D = np.load(tmp_path / "dict.npy")
    assert D.shape == (40, 32)
    assert atom_recovery(D_true, D)["fraction"] >= 0.95
    summary = json.loads((tmp_path / "dict.json").read_text())
    assert summary["n_batches"] == 30 and summary["stop_reason"] == "n_iter"
