# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Recovering sparse supports: MP, OMP, IHT and the Lasso
#
# Signals `x = a @ D + noise` are built from `k` atoms of a known random dictionary. Greedy
# pursuits solve `min ||x - a @ D||^2` subject to `||a||_0 <= k`; the Lasso relaxes the
# constraint into an `l1` penalty. As `k` grows relative to the dimension, exact recovery of
# the support breaks down — earlier for the cheaper methods. The mutual coherence
# `mu = max |<d_i, d_j>|` gives a sufficient condition for OMP, `k < (1 + 1/mu) / 2`.
#
# `SPARSECODE_NOTEBOOK_QUICK=1` runs a small version.

# %%
import os

import matplotlib.pyplot as plt
import numpy as np

from sparsecode.datasets import make_sparse_signals
from sparsecode.lasso import fista, alpha_max
from sparsecode.metrics import coherence
from sparsecode.pursuits import iht, matching_pursuit, omp

QUICK = os.environ.get("SPARSECODE_NOTEBOOK_QUICK") == "1"
n_samples, n_features, n_atoms = (30, 32, 64) if QUICK else (200, 64, 128)
ks = [1, 3, 8] if QUICK else [1, 2, 4, 6, 8, 12, 16, 20, 24]


def support_recovery(A_true, A_hat, k):
    """Fraction of samples whose k largest |codes| are exactly the true support."""
    ok = 0
    for a, b in zip(A_true, A_hat):
        top = np.argsort(-np.abs(b))[:k]
        ok += set(np.flatnonzero(a)) == set(top[np.abs(b[top]) > 0])
    return ok / len(A_true)


# %%
results = {m: [] for m in ("MP", "OMP", "IHT", "Lasso (FISTA)")}
for k in ks:
    X, D, A = make_sparse_signals(n_samples, n_features, n_atoms, n_nonzero=k, noise=0.001, seed=k)
    results["MP"].append(support_recovery(A, matching_pursuit(X, D, n_nonzero=k).codes, k))
    results["OMP"].append(support_recovery(A, omp(X, D, n_nonzero=k).codes, k))
    results["IHT"].append(support_recovery(A, iht(X, D, k).codes, k))
    lasso = fista(X, D, 0.02 * alpha_max(X, D), tol=1e-8, max_iter=3000, restart="gradient")
    results["Lasso (FISTA)"].append(support_recovery(A, lasso.codes, k))
    print(f"k={k:>2}: " + "  ".join(f"{m} {v[-1]:.2f}" for m, v in results.items()))

mu = coherence(D)["max"]
print(f"mutual coherence {mu:.3f}: OMP is guaranteed for k < {(1 + 1 / mu) / 2:.2f}")

# %% [markdown]
# OMP re-fits all chosen coefficients by least squares at every step, so it never picks an
# atom twice and recovers more supports than MP at every sparsity level.

# %%
assert results["OMP"][0] == 1.0, "one atom is always recovered by OMP at this noise level"
assert all(o >= m - 0.1 for o, m in zip(results["OMP"], results["MP"]))

fig, ax = plt.subplots(figsize=(6, 4))
for m, v in results.items():
    ax.plot(ks, v, marker="o", label=m)
ax.set(xlabel="non-zeros per signal k", ylabel="exact support recovered",
       title=f"{n_features} dimensions, {n_atoms} atoms")
ax.grid(alpha=0.3)
ax.legend()
plt.show()
