"""Numba kernel for the proximal-gradient step of the Lasso in Gram form (NumPy backend).

``Z = prox(Y - (Y @ G - C) / L, alpha / L)`` row by row, exploiting the sparsity of ``Y``:
the product ``Y @ G`` costs ``nnz(y) * n_atoms`` per row instead of ``n_atoms**2``. Rows are
processed in parallel (prange). The portable code in ``lasso.py`` computes the same thing
with dense products; this kernel is registered beside it and used only on NumPy arrays.
"""

import numba as nb
import numpy as np


@nb.njit(parallel=True, fastmath=False, cache=True)
def prox_grad_gram(Y, G, C, L, thr, positive, Z):
    n, k = Y.shape
    for i in nb.prange(n):
        q = np.zeros(k, dtype=np.float64)  # float64 accumulation: float32 Gram-form cancellation
        for j in range(k):
            y = Y[i, j]
            if y != 0.0:
                g = G[j]
                for m in range(k):
                    q[m] += y * g[m]
        for m in range(k):
            # both divided by L: at y = 0 and alpha = max|c| the code is exactly zero
            v = Y[i, m] - (q[m] - C[i, m]) / L
            t = thr[m] / L
            if positive:
                Z[i, m] = v - t if v > t else 0.0
            elif v > t:
                Z[i, m] = v - t
            elif v < -t:
                Z[i, m] = v + t
            else:
                Z[i, m] = 0.0
    return Z
