"""Synthetic ground truth for sparse coding and dictionary learning.

:func:`make_sparse_signals` draws signals ``X = A_true @ D_true + noise`` from a known random
unit-norm dictionary (atoms as rows) and known sparse codes; :func:`atom_recovery` measures
how well a learned dictionary recovers the true atoms (up to sign and order, which dictionary
learning cannot identify).

Shapes: ``X`` (n_samples, n_features), ``D_true`` (n_atoms, n_features), ``A_true``
(n_samples, n_atoms), all NumPy.
"""

from __future__ import annotations

import numpy as np

from .backend import check_array, check_scalar, to_numpy

__all__ = ["make_sparse_signals", "atom_recovery", "random_dictionary"]


def _check_dtype(dtype):
    dt = np.dtype(dtype)
    if dt not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise TypeError(f"dtype must be float32 or float64, got {dt}")
    return dt


def random_dictionary(n_atoms, n_features, *, coherence=None, positive=False, seed=0, dtype=np.float64):
    """A random dictionary of ``n_atoms`` unit-norm atoms (rows), shape (n_atoms, n_features).

    Without ``coherence`` the atoms are independent Gaussian directions. With
    ``coherence = c`` in [0, 1) every atom is ``sqrt(c) * u + sqrt(1 - c) * g_i`` where ``u`` is
    one shared unit direction and the ``g_i`` are random unit vectors orthogonal to ``u``:
    atoms stay exactly unit norm and the cosine between two atoms is
    ``c + (1 - c) * cos(g_i, g_j)``, so ``c`` is the mean pairwise cosine (the expected
    Gram off-diagonal); larger ``c`` makes the atoms harder to tell apart.
    ``positive=True`` draws non-negative atoms (absolute values of the Gaussian directions,
    then normalised; ``u`` is then the all-ones direction).
    """
    n_atoms = check_scalar(n_atoms, "n_atoms", low=1, integer=True)
    n_features = check_scalar(n_features, "n_features", low=1, integer=True)
    dt = _check_dtype(dtype)
    if coherence is not None:
        coherence = check_scalar(coherence, "coherence", low=0.0)
        if coherence >= 1.0:
            raise ValueError(f"coherence must be in [0, 1), got {coherence!r}")
        if n_features < 2:
            raise ValueError("coherence needs n_features >= 2 (a shared direction plus a free part)")
    if not isinstance(positive, (bool, np.bool_)):
        raise TypeError(f"positive must be True or False, got {positive!r}")
    rng = np.random.default_rng(seed)
    G = rng.standard_normal((n_atoms, n_features))
    if positive:
        G = np.abs(G)
    if coherence is not None and coherence > 0:
        if positive:
            u = np.ones(n_features) / np.sqrt(n_features)
        else:
            u = rng.standard_normal(n_features)
            u /= np.linalg.norm(u)
        G = G - np.outer(G @ u, u)
        norms = np.linalg.norm(G, axis=1, keepdims=True)
        G = G / np.where(norms > 0, norms, 1.0)
        D = np.sqrt(coherence) * u[None, :] + np.sqrt(1.0 - coherence) * G
        if positive:
            D = np.abs(D)  # orthogonal parts may dip below zero; keep the atoms non-negative
    else:
        D = G
    D = D / np.linalg.norm(D, axis=1, keepdims=True)
    return D.astype(dt)


def make_sparse_signals(
    n_samples,
    n_features,
    n_atoms,
    n_nonzero,
    *,
    noise=0.01,
    coherence=None,
    positive=False,
    positive_dictionary=False,
    amplitude=(1.0, 2.0),
    seed=0,
    dtype=np.float64,
):
    """Signals that are sparse combinations of a known random dictionary, plus noise.

    ``X = A_true @ D_true + noise * E`` with ``E`` standard Gaussian (so ``noise`` is the
    standard deviation per entry). Each row of ``A_true`` has exactly ``n_nonzero`` non-zeros
    at uniformly random atoms, with magnitudes uniform in ``amplitude`` (bounded away from
    zero so every used atom matters) and random signs, or all positive when ``positive``.

    Parameters
    ----------
    n_samples, n_features, n_atoms : int >= 1
    n_nonzero : int, 1 <= n_nonzero <= n_atoms
    noise : float >= 0, noise standard deviation per entry
    coherence : None or float in [0, 1), mean pairwise cosine of the atoms
        (see :func:`random_dictionary`)
    positive : non-negative codes
    positive_dictionary : non-negative atoms
    amplitude : (low, high) with 0 <= low <= high, range of the code magnitudes
    seed : int, everything is deterministic given the seed
    dtype : float32 or float64 (of all three outputs)

    Returns
    -------
    X : ndarray (n_samples, n_features)
    D_true : ndarray (n_atoms, n_features), unit-norm rows
    A_true : ndarray (n_samples, n_atoms), ``n_nonzero`` non-zeros per row
    """
    n_samples = check_scalar(n_samples, "n_samples", low=1, integer=True)
    n_features = check_scalar(n_features, "n_features", low=1, integer=True)
    n_atoms = check_scalar(n_atoms, "n_atoms", low=1, integer=True)
    n_nonzero = check_scalar(n_nonzero, "n_nonzero", low=1, integer=True)
    if n_nonzero > n_atoms:
        raise ValueError(f"n_nonzero must be <= n_atoms ({n_atoms}), got {n_nonzero}")
    noise = check_scalar(noise, "noise", low=0.0)
    if not isinstance(positive, (bool, np.bool_)):
        raise TypeError(f"positive must be True or False, got {positive!r}")
    try:
        lo, hi = (float(v) for v in amplitude)
    except (TypeError, ValueError):
        raise TypeError(f"amplitude must be a pair (low, high) of numbers, got {amplitude!r}") from None
    if not (np.isfinite(lo) and np.isfinite(hi) and 0 <= lo <= hi):
        raise ValueError(f"amplitude must satisfy 0 <= low <= high (finite), got {amplitude!r}")
    dt = _check_dtype(dtype)
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")

    D = random_dictionary(n_atoms, n_features, coherence=coherence, positive=positive_dictionary,
                          seed=seed, dtype=np.float64)
    rng = np.random.default_rng([int(seed), 1])
    # support: n_nonzero distinct atoms per sample (argpartition of uniforms = random subset)
    if n_nonzero == n_atoms:
        support = np.broadcast_to(np.arange(n_atoms), (n_samples, n_atoms))
    else:
        support = np.argpartition(rng.random((n_samples, n_atoms)), n_nonzero - 1, axis=1)[:, :n_nonzero]
    values = rng.uniform(lo, hi, size=(n_samples, n_nonzero))
    if not positive:
        values *= rng.choice(np.array([-1.0, 1.0]), size=(n_samples, n_nonzero))
    A = np.zeros((n_samples, n_atoms))
    np.put_along_axis(A, support, values, axis=1)
    X = A @ D
    if noise > 0:
        X = X + noise * rng.standard_normal(X.shape)
    return X.astype(dt), D.astype(dt), A.astype(dt)


def atom_recovery(D_true, D_learned, threshold=0.99):
    """How well ``D_learned`` recovers the atoms of ``D_true`` (up to sign and order).

    For each true atom, the largest absolute cosine with any learned atom (``best_cos``);
    ``mmcs`` is their mean (mean max cosine similarity) and ``fraction`` the share of true
    atoms with ``best_cos > threshold``. Atoms need not be unit norm (cosines are normalised;
    an all-zero atom has cosine 0 with everything).

    Parameters
    ----------
    D_true : array (n_true, n_features), any array library
    D_learned : array (n_learned, n_features)
    threshold : float in [0, 1]

    Returns
    -------
    dict with ``mmcs`` (float), ``fraction`` (float), ``n_recovered`` (int), ``best_cos``
    (ndarray (n_true,)) and ``best_match`` (ndarray (n_true,), index of the closest learned atom).
    """
    Dt = check_array(to_numpy(D_true) if not isinstance(D_true, (list, tuple)) else np.asarray(D_true, dtype=float),
                     "D_true", ndim=2)
    Dl = check_array(to_numpy(D_learned) if not isinstance(D_learned, (list, tuple)) else np.asarray(D_learned, dtype=float),
                     "D_learned", ndim=2)
    if Dt.shape[1] != Dl.shape[1]:
        raise ValueError(
            f"D_true has {Dt.shape[1]} features but D_learned has {Dl.shape[1]}: both must be (n_atoms, n_features)"
        )
    threshold = check_scalar(threshold, "threshold", low=0.0)
    if threshold > 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold!r}")
    from .metrics import max_cosines  # the one implementation of cosine matching

    best, best_match = max_cosines(np.asarray(Dt, dtype=np.float64), np.asarray(Dl, dtype=np.float64))
    best = np.minimum(to_numpy(best), 1.0)  # an all-zero atom gives 0, as documented
    best_match = to_numpy(best_match)
    n_rec = int(np.sum(best > threshold))
    return {
        "mmcs": float(np.mean(best)),
        "fraction": n_rec / best.shape[0],
        "n_recovered": n_rec,
        "best_cos": best,
        "best_match": best_match,
    }
