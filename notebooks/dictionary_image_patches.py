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
# # Dictionary learning on image patches
#
# The classical setting of Olshausen & Field: learn an overcomplete dictionary of `8 x 8`
# patches of a natural image, `min_{D, A} mean 0.5 ||x - a @ D||^2 + alpha ||a||_1` with unit
# atoms, by alternating FISTA coding and block-coordinate dictionary updates
# (`sparsecode.learn_dictionary`). The atoms come out as localised, oriented edges — Gabor-like
# filters — and the dictionary reconstructs held-out patches much better than a random one
# with the same sparsity.
#
# `SPARSECODE_NOTEBOOK_QUICK=1` runs a small version.

# %%
import os

import matplotlib.pyplot as plt
import numpy as np
from sklearn.datasets import load_sample_image
from sklearn.feature_extraction.image import extract_patches_2d

from sparsecode import fista
from sparsecode.dictionary import learn_dictionary
from sparsecode.metrics import coherence, fvu, l0

QUICK = os.environ.get("SPARSECODE_NOTEBOOK_QUICK") == "1"
n_patches, n_test, n_atoms, n_iter = (600, 200, 64, 3) if QUICK else (10000, 1000, 144, 20)

image = load_sample_image("china.jpg").mean(axis=2) / 255.0  # grey levels in [0, 1]
patches = extract_patches_2d(image, (8, 8), max_patches=n_patches + n_test, random_state=0)
P = patches.reshape(len(patches), -1)
P = P - P.mean(axis=1, keepdims=True)  # remove each patch's DC component
P = P / (P.std() + 1e-12)
train, test = P[:n_patches], P[n_patches:]
print(f"{train.shape[0]} training and {test.shape[0]} test patches of dimension {P.shape[1]}")

# %%
alpha = 0.15 * np.linalg.norm(train, axis=1).mean()
res = learn_dictionary(train, n_atoms, method="fista", update="bcd", alpha=alpha, n_iter=n_iter, seed=0,
                       solver_options={"max_iter": 100 if QUICK else 300, "tol": 1e-4})
D = np.asarray(res.dictionary)
print(f"{res.n_batches} rounds, stop: {res.stop_reason}; objective per round:",
      np.round(res.history["objective"], 4))
assert np.all(np.diff(res.history["objective"]) <= 1e-6 * res.history["objective"][0]), \
    "batch dictionary learning with BCD never increases the objective"

# %% [markdown]
# Held-out patches: FVU of the learned dictionary against a random unit-norm dictionary of the
# same size, at the same `alpha`.

# %%
rng = np.random.default_rng(0)
R = rng.standard_normal(D.shape)
R /= np.linalg.norm(R, axis=1, keepdims=True)
out = {}
for name, Dm in (("learned", D), ("random", R)):
    A = fista(test, Dm, alpha, tol=1e-4, max_iter=300, restart="gradient").codes
    out[name] = (fvu(test, A @ Dm), l0(A))
    print(f"{name:<8} FVU {out[name][0]:.3f}  L0 {out[name][1]:.1f}  coherence {coherence(Dm)['max']:.2f}")
assert out["learned"][0] < out["random"][0]

# %%
side = int(np.ceil(np.sqrt(n_atoms)))
fig, axes = plt.subplots(side, side, figsize=(7, 7))
for ax, atom in zip(axes.ravel(), list(D) + [None] * (side * side - n_atoms)):
    ax.axis("off")
    if atom is not None:
        ax.imshow(atom.reshape(8, 8), cmap="gray", interpolation="nearest")
fig.suptitle("learned atoms (8 x 8)")
plt.show()
