"""Numba kernels for the Lasso in Gram form (NumPy backend).

``prox_grad_gram``: ``Z = prox(Y - (Y @ G - C) / L, alpha / L)`` row by row, exploiting the
sparsity of ``Y``: the product ``Y @ G`` costs ``nnz(y) * n_atoms`` per row instead of
``n_atoms**2``. Optionally also returns, per row, ``(y - z) . (z - a)`` (the gradient-restart
test of O'Donoghue & Candes) while ``y`` and ``z`` are in cache.

``sparse_times_gram``: ``A @ G`` with the same row-sparse loop, for the duality gap.

Rows are processed in parallel (prange). The portable code in ``lasso.py`` computes the same
quantities with dense products; these kernels are registered beside it, used on NumPy only.
Products are accumulated in float64 (float32 Gram-form cancellation costs ~1e-6 otherwise).
"""

import numba as nb
import numpy as np


def _row_times_gram(Y, G, i):
    """``Y[i] @ G`` in float64, touching only the rows of ``G`` where ``Y[i]`` is non-zero."""
    k = Y.shape[1]
    q = np.zeros(G.shape[1], dtype=np.float64)
    for j in range(k):
        y = Y[i, j]
        if y != 0.0:
            g = G[j]
            for m in range(G.shape[1]):
                q[m] += y * g[m]
    return q


def _prox_grad_gram(Y, G, C, L, thr, positive, Z, A_prev, dots, want_dots):
    n, k = Y.shape
    for i in nb.prange(n):
        q = row_times_gram(Y, G, i)
        acc = 0.0
        for m in range(k):
            # both divided by L: at y = 0 and alpha = max|c| the code is exactly zero
            v = Y[i, m] - (q[m] - C[i, m]) / L
            t = thr[m] / L
            if positive:
                z = v - t if v > t else 0.0
            elif v > t:
                z = v - t
            elif v < -t:
                z = v + t
            else:
                z = 0.0
            Z[i, m] = z
            if want_dots:
                zz = Z[i, m]  # the stored (possibly float32) value
                acc += (Y[i, m] - zz) * (zz - A_prev[i, m])
        if want_dots:
            dots[i] = acc
    return Z


def _sparse_times_gram(A, G, Q):
    n, k = A.shape
    for i in nb.prange(n):
        q = row_times_gram(A, G, i)
        for m in range(k):
            Q[i, m] = q[m]
    return Q


row_times_gram = nb.njit(cache=True)(_row_times_gram)
# The same loops compiled twice: waking the thread pool costs more than the whole step on
# small problems (measured ~20 us serial vs ms parallel under load), so callers pick by size.
prox_grad_gram = nb.njit(parallel=True, cache=True)(_prox_grad_gram)
prox_grad_gram_serial = nb.njit(cache=True)(_prox_grad_gram)
sparse_times_gram = nb.njit(parallel=True, cache=True)(_sparse_times_gram)
sparse_times_gram_serial = nb.njit(cache=True)(_sparse_times_gram)
