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
# # ISTA vs FISTA: convergence of the Lasso solvers
#
# Per sample, the Lasso objective is `0.5 * ||x - a @ D||^2 + alpha * ||a||_1`, with the
# dictionary `D` of shape `(n_atoms, n_features)` (atoms as rows). ISTA is proximal gradient
# descent with step `1/L`, `L = ||D||_2^2`; FISTA adds Nesterov momentum, which improves the
# worst-case rate from `O(1/k)` to `O(1/k^2)`; restarting the momentum when it points uphill
# (`restart="gradient"`, O'Donoghue & Candès) recovers linear convergence when the problem is
# locally strongly convex. Every solver certifies its answer with a duality gap.
#
# Set `SPARSECODE_NOTEBOOK_QUICK=1` for a small, fast run (what the test suite does).

# %%
import os
import time

import matplotlib.pyplot as plt
import numpy as np

from sparsecode import fista, ista
from sparsecode.datasets import make_sparse_signals
from sparsecode.lasso import alpha_max, duality_gap

QUICK = os.environ.get("SPARSECODE_NOTEBOOK_QUICK") == "1"
n_samples, n_features, n_atoms = (32, 32, 64) if QUICK else (500, 64, 256)
max_iter = 100 if QUICK else 2000

X, D, A_true = make_sparse_signals(n_samples, n_features, n_atoms, n_nonzero=5, noise=0.01, seed=0)
alpha = 0.05 * alpha_max(X, D)
print(f"X {X.shape}, D {D.shape}, alpha = {alpha:.4g}")

# %% [markdown]
# Run the three solvers to a tight tolerance, recording the objective and the duality gap at
# every iteration (`history=True`; the recorded time excludes the bookkeeping).

# %%
runs = {}
for name, solver, extra in [("ISTA", ista, {}), ("FISTA", fista, {}),
                            ("FISTA + gradient restart", fista, {"restart": "gradient"})]:
    t0 = time.perf_counter()
    runs[name] = solver(X, D, alpha, max_iter=max_iter, tol=1e-12, history=True, check_every=1, **extra)
    r = runs[name]
    print(f"{name:<26} {int(r.n_iter.max()):>5} iterations, converged {r.converged.mean():.0%}, "
          f"mean objective {r.objective.mean():.8g}, {time.perf_counter() - t0:.2f} s")

# %% [markdown]
# The certificate: at the solution the duality gap is (numerically) zero, and the gap of any
# point bounds its distance to the optimum in objective.

# %%
best = min(r.objective.mean() for r in runs.values())
for name, r in runs.items():
    gap = duality_gap(X, D, r.codes, alpha)
    assert np.all(gap >= -1e-9), "a duality gap is never negative"
    print(f"{name:<26} max gap {gap.max():.2e}")
assert runs["FISTA"].history.objective[-1] <= runs["ISTA"].history.objective[-1] + 1e-9

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 4))
for name, r in runs.items():
    h = r.history
    axes[0].semilogy(h.iteration, np.maximum(h.objective - best, 1e-16), label=name)
    axes[1].semilogy(h.iteration, np.maximum(h.gap, 1e-16), label=name)
axes[0].set(xlabel="iteration", ylabel="objective - best", title="suboptimality")
axes[1].set(xlabel="iteration", ylabel="mean duality gap", title="certificate")
for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# Against scikit-learn: the same problem solved by coordinate descent
# (`sklearn.decomposition.sparse_encode(..., algorithm="lasso_cd")` minimises
# `0.5 ||x - a D||^2 + alpha ||a||_1` too, with the same `alpha`).

# %%
from sklearn.decomposition import sparse_encode as sk_sparse_encode

A_sk = sk_sparse_encode(X, D, algorithm="lasso_cd", alpha=alpha, max_iter=5000)
ours = fista(X, D, alpha, tol=1e-10, max_iter=20000, restart="gradient").codes
obj = lambda A: np.mean(0.5 * ((X - A @ D) ** 2).sum(1) + alpha * np.abs(A).sum(1))  # noqa: E731
print(f"objective: sparsecode {obj(ours):.10g}, scikit-learn {obj(A_sk):.10g}")
assert obj(ours) <= obj(A_sk) + 1e-6
