"""Greedy pursuits and hard thresholding: matching pursuit, orthogonal matching pursuit, IHT.

Problem, per sample ``x`` (a row of ``X``), with ``D`` of shape (n_atoms, n_features), atoms
as rows::

    min_a ||x - a @ D||_2^2   subject to  ||a||_0 <= n_nonzero        (and a >= 0 if positive)

or, with ``tol``, stop as soon as ``||x - a @ D||_2^2 <= tol`` (an absolute squared norm, per
sample, as in scikit-learn's ``orthogonal_mp``). The ``objective`` of the returned
:class:`~sparsecode.result.SparseCodingResult` is this per-sample squared residual, computed
from the codes at the end; ``gap`` is ``None`` (greedy methods carry no certificate).

Atoms need not have unit norm: every method works internally on the normalised atoms
``d_j / ||d_j||`` (so selection is by correlation, the usual convention) and reports codes for
the dictionary *as given* (``a_j = a'_j / ||d_j||``). All-zero atoms are never selected.

All three methods are batched: a whole block of samples steps together with array-API
operations (NumPy, array-api-strict, CuPy), so no Python loop runs over samples. On NumPy, MP
and OMP (also non-negative) are served by Numba kernels (parallel over
samples) that run the same algorithms one sample at a time, registered with
``sparsecode.backend.register_kernel`` and chosen because ``benchmarks/pursuits.py`` shows them
faster (about 5-10x on the benchmark problems); ``kernel="portable"`` forces the array-API
code, which stays tested on every backend. IHT is portable only (its cost is one dense matrix
product per iteration, already BLAS).

Batch-OMP (Rubinstein, Zibulevsky & Elad 2008), in the form used here
-----------------------------------------------------------------------
With ``G = Dn @ Dn.T`` and ``alpha0 = Dn @ x`` computed once, keep per sample the support
``S``, the Cholesky factor ``L`` of ``G[S, S]`` (lower triangular) and the matrix
``U = G[:, S] @ L^-T`` (n_atoms x |S|). Then

* ``U[S, :] = L``, so the new row of ``L`` for atom ``j`` is ``w = U[j, :]`` (no triangular
  solve) and its diagonal ``d = sqrt(G[j, j] - ||w||^2)``;
* with ``z = L^-1 alpha0[S]`` (grown by one entry per step), the residual correlations are
  ``alpha = alpha0 - U @ z``; the new column ``u = (G[:, j] - U @ w) / d`` and the new entry
  ``z_t = alpha[j] / d`` update them by ``alpha -= z_t * u``;
* the squared residual is ``||x||^2 - alpha0[S] . gamma = ||x||^2 - ||z||^2`` (because
  ``gamma = (L L^T)^-1 alpha0[S]``), so it decreases by ``z_t^2`` per step; no residual vector
  is ever formed;
* the least-squares coefficients ``gamma = L^-T z`` are needed only once, at the end (one back
  substitution).

Cost per sample: ``O(n_atoms * t)`` at step ``t``, i.e. ``O(n_atoms * k^2 / 2)`` for ``k``
steps, plus the shared ``G`` (``n_atoms^2 * n_features``) and ``alpha0`` (one matrix product).
A sample stops early when its largest remaining correlation is at rounding level or the chosen
atom is linearly dependent on the support (``d^2`` at rounding level): its residual is then
orthogonal to every atom, or to every atom not yet spanned, and no atom can reduce it.

Non-negative OMP (``positive=True``)
------------------------------------
Each step adds the atom with the largest *positive* correlation with the residual (none: the
sample stops), then refits the coefficients on the support by non-negative least squares
(Lawson-Hanson active set, batched over samples, warm-started from the previous step's
solution). Atoms whose coefficient the refit sets to zero stay in the support (they count as a
step) but are no longer used; the refit satisfies the KKT conditions of the NNLS problem on the
support: ``gamma >= 0``, ``(G_SS gamma - alpha0_S)_i = 0`` where ``gamma_i > 0`` and ``>= 0``
where ``gamma_i = 0``. A Numba kernel runs the same steps per sample on NumPy.
"""

from __future__ import annotations

import time

import numpy as np

from .backend import (
    array_namespace,
    check_array,
    check_dictionary_problem,
    check_scalar,
    get_kernel,
    register_kernel,
)
from .result import SparseCodingResult

__all__ = ["matching_pursuit", "omp", "iht"]

#: bytes of per-block working memory the batched OMP aims for (U or G[S, :] per sample), on
#: the CPU and on an accelerator (see ``_memory_budget``)
CPU_MEMORY_BUDGET = 64 * 2**20
DEVICE_MEMORY_BUDGET = 1024 * 2**20


# --------------------------------------------------------------------------- shared helpers
def _device(x):
    import array_api_compat

    return array_api_compat.device(x)


def _check_bool(value, name):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def _check_sparsity(n_nonzero, tol, n_features):
    """Validate ``n_nonzero`` (int >= 1 or None) and ``tol`` (float >= 0 or None)."""
    n_nonzero = check_scalar(n_nonzero, "n_nonzero", low=1, integer=True, allow_none=True)
    tol = check_scalar(tol, "tol", low=0, allow_none=True)
    if n_nonzero is None and tol is None:
        # scikit-learn's default for orthogonal_mp: 10% of the number of features
        n_nonzero = max(1, int(0.1 * n_features))
    return n_nonzero, tol


def _prepare(X, D, gram, xp, *, need_gram=True, timings=None):
    """Normalised atoms, their norms, the Gram matrix of ``Dn`` and ``alpha0 = X @ Dn.T``.

    ``gram`` (optional) is ``D @ D.T`` for the dictionary *as given*; it is rescaled here.
    ``timings`` (a dict), when given, receives the seconds spent on each part.
    """
    k = D.shape[0]
    t0 = time.perf_counter()
    norms = xp.linalg.vector_norm(D, axis=1)
    usable = norms > 0
    safe = xp.where(usable, norms, xp.ones_like(norms))
    Dn = D / xp.reshape(safe, (k, 1))
    t1 = time.perf_counter()
    G = None
    if gram is not None:
        array_namespace(D, gram, names=("D", "gram"))
        gram = check_array(gram, "gram", ndim=2, xp=xp, dtype_like=D)
        if tuple(gram.shape) != (k, k):
            raise ValueError(f"gram must have shape ({k}, {k}) (D @ D.T), got {tuple(gram.shape)}")
        G = gram / (xp.reshape(safe, (k, 1)) * xp.reshape(safe, (1, k)))
    elif need_gram:
        G = Dn @ Dn.T
    t2 = time.perf_counter()
    alpha0 = X @ Dn.T
    t3 = time.perf_counter()
    if timings is not None:
        timings.update(normalise=t1 - t0, gram=t2 - t1, correlations=t3 - t2)
    return Dn, norms, safe, usable, G, alpha0


def _eps(xp, dtype) -> float:
    return float(xp.finfo(dtype).eps)


def _gather_rows(A, idx, xp):
    """``out[i, q] = A[i, idx[i, q]]`` for ``A`` (n, m) and integer ``idx`` (n, q)."""
    n, m = A.shape
    off = xp.reshape(xp.arange(n, dtype=idx.dtype, device=_device(A)) * m, (n, 1))
    flat = xp.reshape(idx + off, (-1,))
    return xp.reshape(xp.take(xp.reshape(A, (-1,)), flat), tuple(idx.shape))


def _gather_one(A, j, xp):
    """``A[i, j[i]]`` for ``A`` (n, m) and ``j`` (n,)."""
    return _gather_rows(A, xp.reshape(j, (-1, 1)), xp)[:, 0]


def _one_hot(j, k, xp, device):
    """Boolean (n, k) with ``True`` at ``[i, j[i]]``."""
    return xp.reshape(xp.arange(k, dtype=j.dtype, device=device), (1, k)) == xp.reshape(j, (-1, 1))


def _residual_from_support(X, Dn, S, coef, xp):
    """``X - sum_t coef[:, t] * Dn[S[:, t]]`` without forming the dense code matrix."""
    if S.shape[1] == 0:
        return X
    return X - _combine(Dn, S, coef, xp)


def _scatter_codes(S, coef, k, xp, device):
    """Dense (n, k) codes from support indices ``S`` (n, T) and coefficients ``coef`` (n, T).

    Entries of one row must index distinct atoms, except padding entries whose ``coef`` is 0.
    """
    kern = get_kernel("pursuit_scatter", xp)
    if kern is not None:
        return kern(S, coef, k)
    n = S.shape[0]
    codes = xp.zeros((n, k), dtype=coef.dtype, device=device)
    for t in range(S.shape[1]):
        codes = codes + xp.astype(_one_hot(S[:, t], k, xp, device), coef.dtype) * xp.reshape(coef[:, t], (n, 1))
    return codes


@register_kernel("pursuit_scatter", "numpy")
def _scatter_codes_numpy(S, coef, k):
    n, T = S.shape
    codes = np.zeros((n, k), dtype=coef.dtype)
    rows, cols = np.nonzero(coef)
    codes[rows, S[rows, cols]] = coef[rows, cols]
    return codes


def _memory_budget(xp) -> int:
    """Per-block working memory of the batched code: small on the CPU (the state is swept
    once per step, so it should stay near the caches), large on accelerators (fewer, larger
    kernels)."""
    from .backend import backend_name

    return CPU_MEMORY_BUDGET if backend_name(xp) in ("numpy", "array_api_strict") else DEVICE_MEMORY_BUDGET


def _blocks(n, per_sample_bytes, batch_size, budget):
    if batch_size is None:
        batch_size = max(1, int(budget // max(1, per_sample_bytes)))
    return [(lo, min(n, lo + batch_size)) for lo in range(0, n, batch_size)]


def _finish(codes_n, safe, X, Dn, R, n_steps, converged, single, method, xp, info, *, objective=None, scaled=False):
    """Codes for the dictionary as given, exact per-sample objective, result object.

    ``codes_n`` are codes on the normalised atoms unless ``scaled`` (then already for ``D``);
    ``objective`` is computed from the residual ``R`` unless given.
    """
    k = safe.shape[0]
    codes = codes_n if scaled else codes_n / xp.reshape(safe, (1, k))
    if objective is None:
        objective = xp.sum(R * R, axis=1)
    if single:
        codes = codes[0, :]
    return SparseCodingResult(
        codes=codes, n_iter=n_steps, converged=converged, objective=objective, gap=None,
        relative_gap=None, history=None, method=method, lipschitz=None, info=info,
    )


# --------------------------------------------------------------------------- matching pursuit
def matching_pursuit(
    X,
    D,
    n_nonzero: int | None = None,
    tol: float | None = None,
    positive: bool = False,
    *,
    gram=None,
    max_steps: int | None = None,
    kernel: str = "auto",
) -> SparseCodingResult:
    """Matching pursuit (Mallat & Zhang 1993), batched over samples.

    Each step picks, per sample, the atom with the largest absolute correlation with the
    residual (largest positive correlation when ``positive``), adds that correlation to its
    coefficient and removes its contribution from the residual: with unit atoms the squared
    residual drops by the squared correlation, so it never increases. An atom may be picked
    again. A sample stops after ``n_nonzero`` steps, when its squared residual is ``<= tol``,
    or when no atom correlates with the residual (no positive correlation, when ``positive``).

    Parameters
    ----------
    X : array (n_samples, n_features) or (n_features,)
    D : array (n_atoms, n_features), atoms as rows (normalised internally; zero atoms unused)
    n_nonzero : number of steps (MP may re-pick an atom, so codes can have fewer nonzeros).
        Default: 10% of n_features when ``tol`` is None too.
    tol : stop a sample once ``||x - a @ D||^2 <= tol``
    positive : only positive correlations are used, so codes are >= 0
    gram : optional precomputed ``D @ D.T`` (n_atoms, n_atoms) of the dictionary as given
    max_steps : cap on steps when only ``tol`` is given (default ``n_features``)
    kernel : "auto" (the Numba kernel on NumPy when available), "portable" or "numba"

    Returns
    -------
    SparseCodingResult
        ``codes`` (n_samples, n_atoms); ``n_iter`` steps taken per sample; ``objective``
        the squared residual per sample; ``converged`` True where ``tol`` was met (or, with
        no ``tol``, where all ``n_nonzero`` steps ran or the residual became orthogonal to
        every atom).
    """
    xp, X, D, single = check_dictionary_problem(X, D)
    n, f = X.shape
    k = D.shape[0]
    positive = _check_bool(positive, "positive")
    n_nonzero, tol = _check_sparsity(n_nonzero, tol, f)
    max_steps = check_scalar(max_steps, "max_steps", low=1, integer=True, allow_none=True)
    steps = n_nonzero if n_nonzero is not None else (max_steps if max_steps is not None else f)
    if kernel not in ("auto", "portable", "numba"):
        raise ValueError(f"kernel must be 'auto', 'portable' or 'numba', got {kernel!r}")
    dev = _device(X)
    Dn, norms, safe, usable, G, alpha = _prepare(X, D, gram, xp)
    eps = _eps(xp, X.dtype)
    xnorm = xp.linalg.vector_norm(X, axis=1)
    thr = 100.0 * eps * xnorm  # a correlation below this is rounding noise
    kern = get_kernel("mp", xp) if kernel != "portable" else None
    if kernel == "numba" and kern is None:
        raise ValueError("kernel='numba' needs NumPy arrays and Numba installed; use 'auto' or 'portable'")
    info = {"positive": positive, "steps": steps, "kernel": "numba" if kern is not None else "portable"}
    if kern is not None:
        codes_n, err, n_steps, exhausted = kern(X, Dn, G, alpha, thr, usable, steps, tol, positive)
        if tol is not None:
            converged = err <= tol
        else:
            converged = (n_steps == steps) | exhausted | (xnorm == 0)
        return _finish(codes_n, safe, X, Dn, None, n_steps, converged, single, "mp", xp, info, objective=err)
    neg = xp.full((n, k), -1.0, dtype=X.dtype, device=dev)
    blocked = xp.reshape(xp.logical_not(usable), (1, k))
    codes_n = xp.zeros((n, k), dtype=X.dtype, device=dev)
    R = X
    err = xp.sum(R * R, axis=1)
    active = xnorm > 0
    if tol is not None:
        active = active & (err > tol)
    n_steps = xp.zeros((n,), dtype=xp.int64, device=dev)
    exhausted = xp.zeros((n,), dtype=xp.bool, device=dev)  # nothing correlates any more
    for _ in range(steps):
        if not bool(xp.any(active)):
            break
        score = alpha if positive else xp.abs(alpha)
        score = xp.where(blocked, neg, score)
        j = xp.argmax(score, axis=1)
        best = _gather_one(score, j, xp)
        nothing = best <= thr
        exhausted = exhausted | (active & nothing)
        act = active & xp.logical_not(nothing)
        c = xp.where(act, _gather_one(alpha, j, xp), xp.zeros_like(best))
        c2 = xp.reshape(c, (n, 1))
        codes_n = codes_n + xp.astype(_one_hot(j, k, xp, dev), X.dtype) * c2
        alpha = alpha - c2 * xp.take(G, j, axis=0)
        R = R - c2 * xp.take(Dn, j, axis=0)
        err = xp.sum(R * R, axis=1)
        n_steps = n_steps + xp.astype(act, xp.int64)
        active = act
        if tol is not None:
            active = active & (err > tol)
    if tol is not None:
        converged = err <= tol
    else:
        converged = (n_steps == steps) | exhausted | (xnorm == 0)
    return _finish(codes_n, safe, X, Dn, R, n_steps, converged, single, "mp", xp, info)


# --------------------------------------------------------------------------- OMP
def omp(
    X,
    D,
    n_nonzero: int | None = None,
    tol: float | None = None,
    positive: bool = False,
    *,
    gram=None,
    kernel: str = "auto",
    batch_size: int | None = None,
    progress: bool = False,
) -> SparseCodingResult:
    """Orthogonal matching pursuit (batch-OMP with progressive Cholesky), batched over samples.

    Each step adds the atom most correlated with the residual (largest positive correlation
    when ``positive``) and refits all coefficients on the support by least squares (by
    non-negative least squares when ``positive``); see the module docstring for the algorithm.

    Parameters
    ----------
    X : array (n_samples, n_features) or (n_features,)
    D : array (n_atoms, n_features), atoms as rows (normalised internally; zero atoms unused)
    n_nonzero : at most this many atoms per sample (capped at ``min(n_atoms, n_features)``).
        Default: 10% of n_features when ``tol`` is None too (scikit-learn's default).
    tol : stop a sample once ``||x - a @ D||^2 <= tol`` (absolute, per sample)
    positive : non-negative OMP (codes >= 0, NNLS refit)
    gram : optional precomputed ``D @ D.T`` (n_atoms, n_atoms) of the dictionary as given;
        saves the ``n_atoms^2 * n_features`` Gram product on repeated calls
    kernel : "auto" (the Numba kernel on NumPy when available, else the portable code),
        "portable" or "numba"
    batch_size : samples per block of the portable code (default: blocks of about 64 MiB of
        state on the CPU, 1 GiB on an accelerator; ``n_atoms * n_nonzero`` numbers per sample)
    progress : tqdm bar over blocks

    Returns
    -------
    SparseCodingResult
        ``codes`` (n_samples, n_atoms); ``n_iter`` atoms selected per sample; ``objective`` the
        squared residual per sample; ``converged`` True where ``tol`` was met (or, with no
        ``tol``, always: the sample used ``n_nonzero`` atoms or no atom could reduce its
        residual); ``info["support"]`` the selected atoms in order (n_samples, n_steps), -1
        where unused; ``info["kernel"]`` the code path that ran; ``info["timings"]`` seconds
        spent normalising, building the Gram matrix, computing ``X @ Dn.T``, in the pursuit
        itself (selection, Cholesky and correlation updates) and assembling codes/residuals.
    """
    xp, X, D, single = check_dictionary_problem(X, D)
    n, f = X.shape
    k = D.shape[0]
    positive = _check_bool(positive, "positive")
    progress = _check_bool(progress, "progress")
    n_nonzero, tol = _check_sparsity(n_nonzero, tol, f)
    batch_size = check_scalar(batch_size, "batch_size", low=1, integer=True, allow_none=True)
    if kernel not in ("auto", "portable", "numba"):
        raise ValueError(f"kernel must be 'auto', 'portable' or 'numba', got {kernel!r}")
    dev = _device(X)
    timings = {}
    Dn, norms, safe, usable, G, alpha0 = _prepare(X, D, gram, xp, timings=timings)
    n_usable = int(xp.sum(xp.astype(usable, xp.int64)))
    cap = min(n_usable, f)
    s_max = cap if n_nonzero is None else min(n_nonzero, cap)
    eps = _eps(xp, X.dtype)
    xnorm2 = xp.sum(X * X, axis=1)
    thr = 100.0 * eps * xp.sqrt(xnorm2)

    kern = None
    if kernel != "portable":
        kern = get_kernel("omp_nonneg" if positive else "omp", xp)
    if kernel == "numba" and kern is None:
        raise ValueError(
            "kernel='numba' needs NumPy arrays and Numba installed; use kernel='auto' or 'portable'"
        )
    t0 = time.perf_counter()
    if s_max == 0:
        S = xp.full((n, 0), -1, dtype=xp.int64, device=dev)
        coef = xp.zeros((n, 0), dtype=X.dtype, device=dev)
        n_steps = xp.zeros((n,), dtype=xp.int64, device=dev)
        path = "none"
    elif kern is not None:
        S, coef, n_steps = kern(alpha0, G, xnorm2, thr, usable, s_max, tol, eps)
        path = "numba"
    else:
        per_sample = _itemsize(X.dtype, xp) * (s_max * (k + s_max + 4) + 3 * k)
        parts_S, parts_c, parts_n = [], [], []
        blocks = _blocks(n, per_sample, batch_size, _memory_budget(xp))
        it = blocks
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(blocks, desc="omp", unit="block")
        fn = _omp_block_nonneg if positive else _omp_block
        for lo, hi in it:
            s_, c_, n_ = fn(alpha0[lo:hi, :], G, xnorm2[lo:hi], thr[lo:hi], usable, s_max, tol, eps, xp)
            parts_S.append(s_), parts_c.append(c_), parts_n.append(n_)
        T = max(int(p.shape[1]) for p in parts_S)
        parts_S = [_pad(p, T, -1, xp) for p in parts_S]
        parts_c = [_pad(p, T, 0, xp) for p in parts_c]
        S = xp.concat(parts_S, axis=0) if len(parts_S) > 1 else parts_S[0]
        coef = xp.concat(parts_c, axis=0) if len(parts_c) > 1 else parts_c[0]
        n_steps = xp.concat(parts_n) if len(parts_n) > 1 else parts_n[0]
        path = "portable"
    timings["pursuit"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    valid = S >= 0
    S0 = xp.where(valid, S, xp.zeros_like(S))
    coef = xp.where(valid, coef, xp.zeros_like(coef))
    assemble = get_kernel("pursuit_assemble", xp)
    if assemble is not None:
        codes, err = assemble(X, Dn, S0, coef, safe)
    else:
        R = _residual_from_support(X, Dn, S0, coef, xp)
        codes = _scatter_codes(S0, coef, k, xp, dev) / xp.reshape(safe, (1, k))
        err = xp.sum(R * R, axis=1)
    timings["assemble"] = time.perf_counter() - t0
    converged = err <= tol if tol is not None else xp.ones((n,), dtype=xp.bool, device=dev)
    info = {"kernel": path, "positive": positive, "support": S, "max_steps": s_max, "timings": timings}
    return _finish(codes, safe, X, Dn, None, n_steps, converged, single, "omp", xp, info,
                   objective=err, scaled=True)


def _itemsize(dtype, xp) -> int:
    return 4 if dtype == xp.float32 else 8


def _pad(A, T, value, xp):
    """Pad (n, t) to (n, T) with ``value`` on the right."""
    n, t = A.shape
    if t == T:
        return A
    fill = xp.full((n, T - t), value, dtype=A.dtype, device=_device(A))
    return xp.concat([A, fill], axis=1)


def _omp_block(alpha0, G, xnorm2, thr, usable, s_max, tol, eps, xp):
    """Portable batch-OMP on one block of samples (all samples step together).

    Returns ``(S, coef, n_steps)``: support indices (n, T) with -1 where unused, the
    least-squares coefficients on the normalised atoms (n, T) and steps per sample.
    """
    n, k = alpha0.shape
    dt = alpha0.dtype
    dev = _device(alpha0)
    alpha = xp.asarray(alpha0, copy=True)
    U = xp.zeros((n, s_max, k), dtype=dt, device=dev)
    Lf = xp.zeros((n, s_max, s_max), dtype=dt, device=dev)
    z = xp.zeros((n, s_max), dtype=dt, device=dev)
    S = xp.full((n, s_max), -1, dtype=xp.int64, device=dev)
    gdiag = _diag(G, xp)
    blocked = xp.broadcast_to(xp.reshape(xp.logical_not(usable), (1, k)), (n, k))
    neg = xp.full((n, k), -1.0, dtype=dt, device=dev)
    err = xp.asarray(xnorm2, copy=True)
    active = xnorm2 > 0
    if tol is not None:
        active = active & (err > tol)
    n_steps = xp.zeros((n,), dtype=xp.int64, device=dev)
    d_floor = 10.0 * eps
    base = xp.reshape(xp.arange(n, dtype=xp.int64, device=dev) * (s_max * k), (n, 1))
    T = 0
    for t in range(s_max):
        if not bool(xp.any(active)):
            break
        T = t + 1
        score = xp.where(blocked, neg, xp.abs(alpha))
        j = xp.argmax(score, axis=1)
        best = _gather_one(score, j, xp)
        act = active & (best > thr)
        if t > 0:
            # w = U[i, :t, j_i]: the new row of the Cholesky factor, read off U
            idx = base + xp.reshape(xp.arange(t, dtype=xp.int64, device=dev) * k, (1, t)) + xp.reshape(j, (n, 1))
            w = xp.reshape(xp.take(xp.reshape(U, (-1,)), xp.reshape(idx, (-1,))), (n, t))
            d2 = xp.take(gdiag, j) - xp.sum(w * w, axis=1)
        else:
            w = None
            d2 = xp.take(gdiag, j)
        act = act & (d2 > d_floor)  # dependent on the support: nothing left to gain
        one = xp.ones_like(d2)
        d = xp.sqrt(xp.where(act, d2, one))
        zt = xp.where(act, _gather_one(alpha, j, xp) / d, xp.zeros_like(d))
        u = xp.take(G, j, axis=0)
        if t > 0:
            u = u - xp.reshape(xp.reshape(w, (n, 1, t)) @ U[:, :t, :], (n, k))
        u = xp.where(xp.reshape(act, (n, 1)), u / xp.reshape(d, (n, 1)), xp.zeros_like(u))
        alpha = alpha - xp.reshape(zt, (n, 1)) * u
        U[:, t, :] = u
        if t > 0:
            Lf[:, t, :t] = xp.where(xp.reshape(act, (n, 1)), w, xp.zeros_like(w))
        Lf[:, t, t] = d
        z[:, t] = zt
        S[:, t] = xp.where(act, j, xp.full_like(j, -1))
        blocked = blocked | (_one_hot(j, k, xp, dev) & xp.reshape(act, (n, 1)))
        err = err - zt * zt
        n_steps = n_steps + xp.astype(act, xp.int64)
        active = act
        if tol is not None:
            active = active & (err > tol)
    # gamma = L^-T z by back substitution (rows of unused steps are (0, .., 0, 1) with z = 0)
    gamma = xp.zeros((n, T), dtype=dt, device=dev)
    for i in range(T - 1, -1, -1):
        acc = z[:, i]
        if i + 1 < T:
            acc = acc - xp.sum(Lf[:, i + 1:T, i] * gamma[:, i + 1:T], axis=1)
        gamma[:, i] = acc / Lf[:, i, i]
    return S[:, :T], gamma, n_steps


def _diag(G, xp):
    k = G.shape[0]
    return xp.take(xp.reshape(G, (-1,)), xp.arange(k, dtype=xp.int64, device=_device(G)) * (k + 1))


def _omp_block_nonneg(alpha0, G, xnorm2, thr, usable, s_max, tol, eps, xp):
    """Portable non-negative OMP on one block: selection by largest positive correlation,
    batched Lawson-Hanson NNLS refit on the support, warm-started. Same returns as
    :func:`_omp_block`."""
    n, k = alpha0.shape
    dt = alpha0.dtype
    dev = _device(alpha0)
    alpha = alpha0
    Gs = xp.zeros((n, s_max, k), dtype=dt, device=dev)  # G[S, :]
    M = xp.zeros((n, s_max, s_max), dtype=dt, device=dev)  # G[S, S]
    b = xp.zeros((n, s_max), dtype=dt, device=dev)  # alpha0[S]
    gamma = xp.zeros((n, s_max), dtype=dt, device=dev)
    P = xp.zeros((n, s_max), dtype=xp.bool, device=dev)
    S = xp.full((n, s_max), -1, dtype=xp.int64, device=dev)
    blocked = xp.broadcast_to(xp.reshape(xp.logical_not(usable), (1, k)), (n, k))
    neg = xp.full((n, k), -1.0, dtype=dt, device=dev)
    err = xp.asarray(xnorm2, copy=True)
    active = xnorm2 > 0
    if tol is not None:
        active = active & (err > tol)
    n_steps = xp.zeros((n,), dtype=xp.int64, device=dev)
    T = 0
    for t in range(s_max):
        if not bool(xp.any(active)):
            break
        T = t + 1
        score = xp.where(blocked, neg, alpha)
        j = xp.argmax(score, axis=1)
        best = _gather_one(score, j, xp)
        act = active & (best > thr)
        if not bool(xp.any(act)):
            break
        actc = xp.reshape(act, (n, 1))
        g = xp.where(actc, xp.take(G, j, axis=0), xp.zeros((n, k), dtype=dt, device=dev))
        Gs[:, t, :] = g
        S[:, t] = xp.where(act, j, xp.full_like(j, -1))
        if t > 0:
            col = _gather_rows(g, xp.where(S[:, :t] >= 0, S[:, :t], xp.zeros_like(S[:, :t])), xp)
            col = xp.where(S[:, :t] >= 0, col, xp.zeros_like(col))
            M[:, t, :t] = col
            M[:, :t, t] = col
        M[:, t, t] = xp.where(act, xp.take(_diag(G, xp), j), xp.ones((n,), dtype=dt, device=dev))
        b[:, t] = xp.where(act, _gather_one(alpha0, j, xp), xp.zeros((n,), dtype=dt, device=dev))
        g_t, P_t = _batched_nnls(M[:, :T, :T], b[:, :T], gamma[:, :T], P[:, :T], act, thr, eps, xp)
        gamma[:, :T] = g_t
        P[:, :T] = P_t
        alpha = alpha0 - xp.reshape(xp.reshape(g_t, (n, 1, T)) @ Gs[:, :T, :], (n, k))
        blocked = blocked | (_one_hot(j, k, xp, dev) & actc)
        err = xnorm2 - xp.sum(g_t * b[:, :T], axis=1)
        n_steps = n_steps + xp.astype(act, xp.int64)
        active = act
        if tol is not None:
            active = active & (err > tol)
    return S[:, :T], gamma[:, :T], n_steps


def _batched_nnls(M, b, gamma, P, run, thr, eps, xp, max_iter=None):
    """Lawson-Hanson NNLS ``min_g 0.5 g.M g - b.g, g >= 0`` for a batch, warm-started.

    ``M`` (n, m, m) SPD, ``b`` (n, m); ``gamma`` (n, m) a feasible start whose positive
    entries are the passive set ``P``; only rows with ``run`` True are updated. Samples
    iterate together: each iteration solves the least-squares problem on every sample's
    passive set (one batched solve), then either steps back to stay feasible (dropping the
    entries that reach zero) or, when feasible, adds the entry with the largest positive
    negative-gradient, or stops when none exceeds ``thr`` (the KKT conditions hold).
    """
    n, m = b.shape
    dt = b.dtype
    dev = _device(b)
    if max_iter is None:
        max_iter = 3 * m + 10
    eye = xp.reshape(xp.eye(m, dtype=dt, device=dev), (1, m, m))
    ridge = 10.0 * eps
    inf = xp.full((n, m), float("inf"), dtype=dt, device=dev)
    ninf = xp.full((n, m), -float("inf"), dtype=dt, device=dev)
    zeros = xp.zeros((n, m), dtype=dt, device=dev)
    thr2 = xp.reshape(thr, (n, 1))
    todo = run
    for _ in range(max_iter):
        if not bool(xp.any(todo)):
            break
        Pf = xp.astype(P, dt)
        A = M * xp.reshape(Pf, (n, m, 1)) * xp.reshape(Pf, (n, 1, m)) + eye * xp.reshape(1.0 - Pf + ridge * Pf, (n, m, 1))
        s = xp.reshape(xp.linalg.solve(A, xp.reshape(b * Pf, (n, m, 1))), (n, m)) * Pf
        bad = P & (s <= 0)
        infeas = xp.any(bad, axis=1)
        # step back towards s, as far as feasibility allows
        denom = xp.where(bad, gamma - s, xp.ones_like(s))
        ratio = xp.where(bad, gamma / denom, inf)
        q = xp.argmin(ratio, axis=1)
        step = xp.reshape(_gather_one(ratio, q, xp), (n, 1))
        step = xp.where(xp.isfinite(step), step, xp.zeros_like(step))
        g_back = gamma + step * (s - gamma)
        P_back = P & (g_back > 0) & xp.logical_not(_one_hot(q, m, xp, dev))
        g_back = xp.where(P_back, g_back, zeros)
        # feasible: accept s, look for a violated KKT condition
        wneg = b - xp.reshape(M @ xp.reshape(s, (n, m, 1)), (n, m))
        cand = xp.where(P, ninf, wneg)
        jj = xp.argmax(cand, axis=1)
        cbest = xp.reshape(_gather_one(cand, jj, xp), (n, 1))[:, 0]
        feas = xp.logical_not(infeas)
        add = feas & (cbest > thr2[:, 0])
        upd_back = xp.reshape(todo & infeas, (n, 1))
        upd_feas = xp.reshape(todo & feas, (n, 1))
        gamma = xp.where(upd_back, g_back, xp.where(upd_feas, s, gamma))
        P = xp.where(upd_back, P_back, xp.where(xp.reshape(todo & add, (n, 1)), P | _one_hot(jj, m, xp, dev), P))
        todo = todo & xp.logical_not(feas & xp.logical_not(add))
    return xp.where(P, gamma, zeros), P


# --------------------------------------------------------------------------- Numba kernel
def _numba_available() -> bool:
    try:
        import numba  # noqa: F401
    except Exception:
        return False
    return True


if _numba_available():
    import numba

    def _n_blocks(n):
        """Blocks of samples for ``prange``: many per thread, so that a thread slowed by
        other work on the machine does not hold up the rest."""
        return max(1, min(n, 16 * numba.get_num_threads()))

    @numba.njit(cache=True, inline="always")
    def _next_atom(alpha, blocked, by_magnitude):
        """(value, index) of the largest ``|alpha_q|`` (``alpha_q`` if not ``by_magnitude``)
        over the atoms not blocked, first maximum kept; index -1 when none is above -1."""
        best = -1.0
        jb = -1
        for q in range(alpha.shape[0]):
            if not blocked[q]:
                v = abs(alpha[q]) if by_magnitude else alpha[q]
                if v > best:
                    best = v
                    jb = q
        return best, jb

    @numba.njit(parallel=True, cache=True, fastmath=False)
    def _omp_numba(alpha0, G, gdiag, xnorm2, thr, selectable, s_max, tol, d_floor, nblocks, S, coef, n_steps):
        n, k = alpha0.shape
        for blk in numba.prange(nblocks):
            lo = (blk * n) // nblocks
            hi = ((blk + 1) * n) // nblocks
            U = np.empty((s_max, k), dtype=alpha0.dtype)
            Lf = np.zeros((s_max, s_max), dtype=alpha0.dtype)
            z = np.empty(s_max, dtype=alpha0.dtype)
            w = np.empty(s_max, dtype=alpha0.dtype)
            alpha = np.empty(k, dtype=alpha0.dtype)
            blocked = np.empty(k, dtype=np.bool_)
            for i in range(lo, hi):
                for q in range(k):
                    alpha[q] = alpha0[i, q]
                    blocked[q] = not selectable[q]
                e = xnorm2[i]
                t = 0
                while t < s_max and e > tol and xnorm2[i] > 0:
                    best, jb = _next_atom(alpha, blocked, True)
                    if jb < 0 or best <= thr[i]:
                        break
                    d2 = gdiag[jb]
                    for l in range(t):
                        w[l] = U[l, jb]
                        d2 -= w[l] * w[l]
                    if d2 <= d_floor:
                        break
                    d = np.sqrt(d2)
                    zt = alpha[jb] / d
                    for q in range(k):
                        U[t, q] = G[jb, q]
                    for l in range(t):
                        wl = w[l]
                        for q in range(k):
                            U[t, q] -= wl * U[l, q]
                    inv = 1.0 / d
                    for q in range(k):
                        U[t, q] *= inv
                        alpha[q] -= zt * U[t, q]
                    for l in range(t):
                        Lf[t, l] = w[l]
                    Lf[t, t] = d
                    z[t] = zt
                    S[i, t] = jb
                    blocked[jb] = True
                    e -= zt * zt
                    t += 1
                for ii in range(t - 1, -1, -1):
                    acc = z[ii]
                    for l in range(ii + 1, t):
                        acc -= Lf[l, ii] * coef[i, l]
                    coef[i, ii] = acc / Lf[ii, ii]
                n_steps[i] = t

    @numba.njit(parallel=True, cache=True)
    def _assemble_numba(X, Dn, S, coef, safe, codes, obj):
        n, f = X.shape
        T = S.shape[1]
        for i in numba.prange(n):
            r = X[i].copy()
            for t in range(T):
                c = coef[i, t]
                if c != 0:
                    j = S[i, t]
                    codes[i, j] = c / safe[j]
                    dj = Dn[j]
                    for q in range(f):
                        r[q] -= c * dj[q]
            acc = 0.0
            for q in range(f):
                acc += r[q] * r[q]
            obj[i] = acc

    @register_kernel("pursuit_assemble", "numpy")
    def _assemble_numpy_kernel(X, Dn, S, coef, safe):
        """Dense codes for the dictionary as given and the exact squared residuals, from the
        support and the coefficients on the normalised atoms, in one parallel pass."""
        n = X.shape[0]
        codes = np.zeros((n, Dn.shape[0]), dtype=X.dtype)
        obj = np.empty(n, dtype=X.dtype)
        _assemble_numba(np.ascontiguousarray(X), np.ascontiguousarray(Dn), np.ascontiguousarray(S),
                        np.ascontiguousarray(coef), np.ascontiguousarray(safe), codes, obj)
        return codes, obj

    @numba.njit(parallel=True, cache=True)
    def _mp_numba(X, Dn, G, alpha0, thr, selectable, steps, tol, positive, nblocks, codes, err, n_steps, exhausted):
        n, f = X.shape
        k = G.shape[0]
        blocked = np.logical_not(selectable)
        for blk in numba.prange(nblocks):
            lo = (blk * n) // nblocks
            hi = ((blk + 1) * n) // nblocks
            alpha = np.empty(k, dtype=X.dtype)
            r = np.empty(f, dtype=X.dtype)
            for i in range(lo, hi):
                e = 0.0
                for q in range(f):
                    r[q] = X[i, q]
                    e += r[q] * r[q]
                for q in range(k):
                    alpha[q] = alpha0[i, q]
                t = 0
                while t < steps and e > tol and e > 0:
                    best, jb = _next_atom(alpha, blocked, not positive)
                    if jb < 0 or best <= thr[i]:
                        exhausted[i] = True
                        break
                    c = alpha[jb]
                    codes[i, jb] += c
                    gj = G[jb]
                    for q in range(k):
                        alpha[q] -= c * gj[q]
                    dj = Dn[jb]
                    e = 0.0
                    for q in range(f):
                        r[q] -= c * dj[q]
                        e += r[q] * r[q]
                    t += 1
                err[i] = e
                n_steps[i] = t

    @register_kernel("mp", "numpy")
    def _mp_numpy_kernel(X, Dn, G, alpha0, thr, usable, steps, tol, positive):
        """Numba matching pursuit: the portable algorithm one sample at a time, samples in
        parallel blocks. Returns codes on the normalised atoms, squared residuals, steps and
        whether each sample ran out of correlated atoms."""
        n = X.shape[0]
        k = G.shape[0]
        codes = np.zeros((n, k), dtype=X.dtype)
        err = np.empty(n, dtype=X.dtype)
        n_steps = np.zeros(n, dtype=np.int64)
        exhausted = np.zeros(n, dtype=np.bool_)
        tol_v = -np.inf if tol is None else float(tol)
        _mp_numba(np.ascontiguousarray(X), np.ascontiguousarray(Dn), np.ascontiguousarray(G),
                  np.ascontiguousarray(alpha0), np.ascontiguousarray(thr), np.ascontiguousarray(usable),
                  int(steps), tol_v, bool(positive), _n_blocks(n),
                  codes, err, n_steps, exhausted)
        return codes, err, n_steps, exhausted

    @numba.njit(cache=True)
    def _chol_refactor(M, pidx, npas, Lc, ridge):
        """Cholesky factor of ``M[pidx, pidx] + ridge * I`` into ``Lc`` (from scratch)."""
        for a in range(npas):
            for c in range(a + 1):
                acc = M[pidx[a], pidx[c]]
                if a == c:
                    acc += ridge
                for e in range(c):
                    acc -= Lc[a, e] * Lc[c, e]
                if a == c:
                    Lc[a, a] = np.sqrt(max(acc, ridge))
                else:
                    Lc[a, c] = acc / Lc[c, c]

    @numba.njit(cache=True)
    def _nnls_lh(M, b, gamma, P, m, thr, ridge, pidx, npas, Lc, y, s):
        """Lawson-Hanson NNLS on the leading m x m block, warm-started from (gamma, P); the
        per-sample counterpart of :func:`_batched_nnls` (same steps, same tie-breaking).
        The factor ``Lc`` of the passive block (indices ``pidx[:npas]``) is extended by one
        row when an index enters and refactored when indices leave. Returns ``npas``."""
        for _ in range(3 * m + 10):
            for l in range(m):
                s[l] = 0.0
            for a in range(npas):  # forward then back substitution
                acc = b[pidx[a]]
                for c in range(a):
                    acc -= Lc[a, c] * y[c]
                y[a] = acc / Lc[a, a]
            for a in range(npas - 1, -1, -1):
                acc = y[a]
                for c in range(a + 1, npas):
                    acc -= Lc[c, a] * s[pidx[c]]
                s[pidx[a]] = acc / Lc[a, a]
            q = -1
            best = np.inf
            for l in range(m):
                if P[l] and s[l] <= 0:
                    r = gamma[l] / (gamma[l] - s[l])
                    if r < best:
                        best = r
                        q = l
            if q >= 0:  # step back to stay feasible, drop the entries that reach zero
                for l in range(m):
                    if P[l]:
                        g = gamma[l] + best * (s[l] - gamma[l])
                        if g > 0 and l != q:
                            gamma[l] = g
                        else:
                            gamma[l] = 0.0
                            P[l] = False
                c = 0
                for a in range(npas):
                    if P[pidx[a]]:
                        pidx[c] = pidx[a]
                        c += 1
                npas = c
                _chol_refactor(M, pidx, npas, Lc, ridge)
                continue
            for l in range(m):
                gamma[l] = s[l]
            jj = -1
            wbest = -np.inf
            for l in range(m):
                if not P[l]:
                    w = b[l]
                    for c in range(m):
                        w -= M[l, c] * s[c]
                    if w > wbest:
                        wbest = w
                        jj = l
            if jj < 0 or wbest <= thr:
                break
            P[jj] = True
            d2 = M[jj, jj] + ridge
            for c in range(npas):
                acc = M[jj, pidx[c]]
                for e in range(c):
                    acc -= Lc[npas, e] * Lc[c, e]
                Lc[npas, c] = acc / Lc[c, c]
                d2 -= Lc[npas, c] * Lc[npas, c]
            Lc[npas, npas] = np.sqrt(max(d2, ridge))
            pidx[npas] = jj
            npas += 1
        return npas

    @numba.njit(parallel=True, cache=True)
    def _omp_nonneg_numba(alpha0, G, gdiag, xnorm2, thr, selectable, s_max, tol, ridge, nblocks, S, coef, n_steps):
        n, k = alpha0.shape
        for blk in numba.prange(nblocks):
            lo = (blk * n) // nblocks
            hi = ((blk + 1) * n) // nblocks
            M = np.zeros((s_max, s_max), dtype=alpha0.dtype)
            b = np.zeros(s_max, dtype=alpha0.dtype)
            gamma = np.zeros(s_max, dtype=alpha0.dtype)
            P = np.zeros(s_max, dtype=np.bool_)
            Si = np.zeros(s_max, dtype=np.int64)
            pidx = np.zeros(s_max, dtype=np.int64)
            Lc = np.zeros((s_max, s_max), dtype=alpha0.dtype)
            y = np.zeros(s_max, dtype=alpha0.dtype)
            sv = np.zeros(s_max, dtype=alpha0.dtype)
            alpha = np.empty(k, dtype=alpha0.dtype)
            blocked = np.empty(k, dtype=np.bool_)
            for i in range(lo, hi):
                for q in range(k):
                    alpha[q] = alpha0[i, q]
                    blocked[q] = not selectable[q]
                e = xnorm2[i]
                t = 0
                npas = 0
                while t < s_max and e > tol and xnorm2[i] > 0:
                    best, jb = _next_atom(alpha, blocked, False)
                    if jb < 0 or best <= thr[i]:
                        break
                    Si[t] = jb
                    blocked[jb] = True
                    for l in range(t):
                        M[t, l] = G[jb, Si[l]]
                        M[l, t] = M[t, l]
                    M[t, t] = gdiag[jb]
                    b[t] = alpha0[i, jb]
                    gamma[t] = 0.0
                    P[t] = False
                    t += 1
                    npas = _nnls_lh(M, b, gamma, P, t, thr[i], ridge, pidx, npas, Lc, y, sv)
                    for q in range(k):
                        alpha[q] = alpha0[i, q]
                    e = xnorm2[i]
                    for l in range(t):
                        g = gamma[l]
                        e -= g * b[l]
                        if g != 0:
                            row = G[Si[l]]
                            for q in range(k):
                                alpha[q] -= g * row[q]
                for l in range(t):
                    S[i, l] = Si[l]
                    coef[i, l] = gamma[l]
                n_steps[i] = t

    def _run_omp_kernel(kernel, alpha0, G, xnorm2, thr, usable, s_max, tol, eps):
        """Call a Numba OMP kernel on contiguous inputs; (S, coef, n_steps) cut to the longest support."""
        n, k = alpha0.shape
        G = np.ascontiguousarray(G)
        S = np.full((n, s_max), -1, dtype=np.int64)
        coef = np.zeros((n, s_max), dtype=alpha0.dtype)
        n_steps = np.zeros(n, dtype=np.int64)
        tol_v = -np.inf if tol is None else float(tol)
        kernel(np.ascontiguousarray(alpha0), G, np.ascontiguousarray(np.diagonal(G)), np.ascontiguousarray(xnorm2),
               np.ascontiguousarray(thr), np.ascontiguousarray(usable), int(s_max), tol_v,
               10.0 * eps, _n_blocks(n), S, coef, n_steps)
        T = int(n_steps.max()) if n else 0
        return S[:, :T], coef[:, :T], n_steps

    @register_kernel("omp_nonneg", "numpy")
    def _omp_nonneg_numpy_kernel(alpha0, G, xnorm2, thr, usable, s_max, tol, eps):
        """Numba non-negative OMP: the portable algorithm (positive selection, warm-started
        Lawson-Hanson refit) one sample at a time, samples in parallel blocks."""
        return _run_omp_kernel(_omp_nonneg_numba, alpha0, G, xnorm2, thr, usable, s_max, tol, eps)

    @register_kernel("omp", "numpy")
    def _omp_numpy_kernel(alpha0, G, xnorm2, thr, usable, s_max, tol, eps):
        """Numba batch-OMP: same algorithm as :func:`_omp_block`, one sample per loop turn,
        samples split into blocks run in parallel (``numba.prange``)."""
        return _run_omp_kernel(_omp_numba, alpha0, G, xnorm2, thr, usable, s_max, tol, eps)


# --------------------------------------------------------------------------- IHT
def _topk_idx(score, m, xp):
    """Indices (n, m) of the ``m`` largest entries of each row of ``score`` (any order)."""
    kern = get_kernel("pursuit_topk_idx", xp)
    if kern is not None:
        return kern(score, m)
    return xp.argsort(-score, axis=1, stable=True)[:, :m]


@register_kernel("pursuit_topk_idx", "numpy")
def _topk_idx_numpy(score, m):
    k = score.shape[1]
    if m >= k:
        return np.broadcast_to(np.arange(k), score.shape).copy()
    return np.argpartition(-score, m - 1, axis=1)[:, :m]


def _combine(Dn, S, coef, xp, block_elems=2**22):
    """``sum_t coef[:, t] * Dn[S[:, t]]``, shape (n, n_features): one gather and a batched
    vector-matrix product per block of rows (blocks of about ``block_elems`` gathered numbers)."""
    n, T = S.shape
    f = Dn.shape[1]
    rows = max(1, block_elems // max(1, T * f))
    parts = []
    for lo in range(0, n, rows):
        hi = min(n, lo + rows)
        G = xp.reshape(xp.take(Dn, xp.reshape(S[lo:hi, :], (-1,)), axis=0), (hi - lo, T, f))
        parts.append(xp.reshape(xp.reshape(coef[lo:hi, :], (hi - lo, 1, T)) @ G, (hi - lo, f)))
    return parts[0] if len(parts) == 1 else xp.concat(parts, axis=0)


def iht(
    X,
    D,
    n_nonzero: int,
    *,
    positive: bool = False,
    step: float | str | None = None,
    max_iter: int = 300,
    tol: float = 1e-6,
    init=None,
) -> SparseCodingResult:
    """Iterative hard thresholding: projected gradient onto ``n_nonzero``-sparse codes.

    Minimises ``||x - a @ Dn||^2`` over ``a`` with at most ``n_nonzero`` nonzeros (and
    ``a >= 0`` when ``positive``) by ``a <- H(a + mu * (x - a @ Dn) @ Dn.T)``, ``H`` keeping
    the ``n_nonzero`` largest entries in magnitude (largest values, then ``max(., 0)``, when
    ``positive``: the TopK activation). Batched over samples; the codes are kept as
    (index, value) pairs, so one iteration costs one dense product ``R @ Dn.T`` (the
    correlations, ``n * n_atoms * n_features``) plus ``O(n * n_nonzero * n_features)``.

    Parameters
    ----------
    X : array (n_samples, n_features) or (n_features,)
    D : array (n_atoms, n_features), atoms as rows (normalised internally)
    n_nonzero : sparsity ``k >= 1``
    positive : codes >= 0
    step : None (default): normalised IHT (Blumensath & Davies 2010) -- per sample
        ``mu = ||g_S||^2 / ||g_S @ Dn||^2`` with ``g`` the residual correlations and ``S`` the
        current support (at the start: the ``k`` largest correlations), halved until the
        squared residual does not increase, so the objective is monotone; "lipschitz": the
        classical fixed step ``1 / ||Dn||_2^2`` (monotone too); or a positive number (fixed
        step, no safeguard).
    max_iter : iterations at most
    tol : a sample stops when its squared residual decreases by less than ``tol`` relatively
    init : codes (n_samples, n_atoms) for the dictionary as given, to start from (its
        ``n_nonzero`` largest entries are kept)

    Returns
    -------
    SparseCodingResult
        ``objective`` the squared residual per sample; ``n_iter`` iterations per sample;
        ``converged`` where the relative decrease fell below ``tol``.
    """
    xp, X, D, single = check_dictionary_problem(X, D)
    n, f = X.shape
    k = D.shape[0]
    positive = _check_bool(positive, "positive")
    n_nonzero = check_scalar(n_nonzero, "n_nonzero", low=1, integer=True)
    max_iter = check_scalar(max_iter, "max_iter", low=1, integer=True)
    tol = check_scalar(tol, "tol", low=0)
    adaptive = step is None
    dev = _device(X)
    dt = X.dtype
    Dn, norms, safe, usable, _, alpha0 = _prepare(X, D, None, xp, need_gram=False)
    fixed = None
    if isinstance(step, str):
        if step != "lipschitz":
            raise ValueError(f"step must be None, 'lipschitz' or a positive number, got {step!r}")
        from .lasso import lipschitz_constant

        L = lipschitz_constant(Dn, safety=1.0 + 1e-6)
        fixed = 1.0 / L if L > 0 else 1.0
    elif step is not None:
        fixed = check_scalar(step, "step", low=0, low_inclusive=False)
    kk = min(n_nonzero, k)
    m = min(2 * kk, k)  # candidates outside the support: at most kk of the top 2kk are inside

    def score(V):
        return V if positive else xp.abs(V)

    # state: support indices S (n, kk), all distinct per row, and values V (normalised atoms)
    if init is None:
        S = _topk_idx(score(alpha0), kk, xp)
        V = xp.zeros((n, kk), dtype=dt, device=dev)
    else:
        from .lasso import _check_codes

        A0 = _check_codes(init, X, D, xp, "init") * xp.reshape(safe, (1, k))
        S = _topk_idx(score(A0), kk, xp)
        V = _gather_rows(A0, S, xp)
        if positive:
            V = xp.maximum(V, xp.zeros_like(V))
    R = X - _combine(Dn, S, V, xp)
    obj = xp.sum(R * R, axis=1)
    n_it = xp.zeros((n,), dtype=xp.int64, device=dev)
    idx = xp.arange(n, dtype=xp.int64, device=dev)
    done = []  # (indices, S, V, R, n_it, converged)
    Xa = X
    tiny = float(xp.finfo(dt).smallest_normal)
    ninf = -float("inf")
    for _ in range(max_iter):
        na = idx.shape[0]
        if na == 0:
            break
        C = R @ Dn.T  # residual correlations = minus half the gradient
        Cs = _gather_rows(C, S, xp)
        cand = _topk_idx(score(C), m, xp)  # the top of mu*C does not depend on mu > 0
        Cc = _gather_rows(C, cand, xp)
        inside = xp.any(xp.reshape(cand, (na, m, 1)) == xp.reshape(S, (na, 1, kk)), axis=2)
        all_idx = xp.concat([S, cand], axis=1)
        if fixed is not None:
            mu = xp.full((na,), fixed, dtype=dt, device=dev)
        else:
            CsD = _combine(Dn, S, Cs, xp)
            num = xp.sum(Cs * Cs, axis=1)
            den = xp.sum(CsD * CsD, axis=1)
            ok_den = den > tiny
            mu = xp.where(ok_den, num / xp.where(ok_den, den, xp.ones_like(den)), xp.ones_like(den))
        S_new, V_new, R_new, obj_new = S, V, R, obj
        pending = xp.ones((na,), dtype=xp.bool, device=dev)
        for _bt in range(1 if fixed is not None else 60):
            mu2 = xp.reshape(mu, (na, 1))
            vals = xp.concat([V + mu2 * Cs, xp.where(inside, xp.zeros_like(Cc), mu2 * Cc)], axis=1)
            sc = xp.concat([score(V + mu2 * Cs), xp.where(inside, xp.full_like(Cc, ninf), score(mu2 * Cc))], axis=1)
            pick = xp.argsort(-sc, axis=1, stable=True)[:, :kk]
            Sc = _gather_rows(all_idx, pick, xp)
            Vc = _gather_rows(vals, pick, xp)
            if positive:
                Vc = xp.maximum(Vc, xp.zeros_like(Vc))
            Rc = Xa - _combine(Dn, Sc, Vc, xp)
            oc = xp.sum(Rc * Rc, axis=1)
            ok = pending & ((oc <= obj) if fixed is None else pending)
            okc = xp.reshape(ok, (na, 1))
            S_new = xp.where(okc, Sc, S_new)
            V_new = xp.where(okc, Vc, V_new)
            R_new = xp.where(okc, Rc, R_new)
            obj_new = xp.where(ok, oc, obj_new)
            pending = pending & xp.logical_not(ok)
            if not bool(xp.any(pending)):
                break
            mu = mu * 0.5
        dec = obj - obj_new
        stop = dec <= tol * obj
        S, V, R, obj = S_new, V_new, R_new, obj_new
        n_it = n_it + 1
        if bool(xp.any(stop)):
            sel = xp.nonzero(stop)[0]
            keep = xp.nonzero(xp.logical_not(stop))[0]
            done.append((xp.take(idx, sel), xp.take(S, sel, axis=0), xp.take(V, sel, axis=0),
                         xp.take(R, sel, axis=0), xp.take(n_it, sel),
                         xp.ones((sel.shape[0],), dtype=xp.bool, device=dev)))
            idx = xp.take(idx, keep)
            S, V, R, obj, Xa, n_it = (xp.take(M_, keep, axis=0) for M_ in (S, V, R, obj, Xa, n_it))
    parts = done + [(idx, S, V, R, n_it, xp.zeros((idx.shape[0],), dtype=xp.bool, device=dev))]

    def cat(i, axis=0):
        items = [p[i] for p in parts]
        return xp.concat(items, axis=axis) if len(items) > 1 else items[0]

    order = xp.argsort(cat(0))
    S = xp.take(cat(1), order, axis=0)
    V = xp.take(cat(2), order, axis=0)
    R = xp.take(cat(3), order, axis=0)
    n_iter = xp.take(cat(4), order)
    conv = xp.take(cat(5), order)
    codes_n = _scatter_codes(S, V, k, xp, dev)
    return _finish(codes_n, safe, X, Dn, R, n_iter, conv, single, "iht", xp,
                   {"positive": positive, "step": "normalized" if adaptive else fixed})
