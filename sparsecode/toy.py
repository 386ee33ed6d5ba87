"""Toy model of superposition data (Elhage et al. 2022), with ground truth.

``n_features`` sparse, non-negative features are embedded in ``n_dims < n_features``
dimensions along unit directions (the rows of ``dictionary``), so that every method can be
scored against the truth::

    F_ni = m_ni * b_ni,   b_ni ~ Bernoulli(p_i),   m_ni ~ Uniform(0, 1)
    X    = F @ dictionary  (+ optional Gaussian noise),   dictionary (n_features, n_dims)

Feature ``i`` fires with probability ``p_i``: a constant ``1 - sparsity`` (Elhage's ``S``),
or a power-law profile ``p_i ∝ (i + 1)^(-probability_decay)`` rescaled to the same mean. Its
importance ``I_i = importance_decay^i`` weights the reconstruction loss
``sum_i I_i (F_ni - Fhat_ni)^2`` in Elhage's setting (see :func:`importance_weighted_loss`);
the importance does not change the data, only how errors are counted.

:func:`score` compares a learned dictionary (and, optionally, its codes) with the truth.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .backend import check_array, check_scalar, to_numpy

__all__ = ["ToyData", "make_superposition", "importance_weighted_loss", "score"]


@dataclass
class ToyData:
    """Superposition data and the ground truth behind it (NumPy arrays).

    X : (n_samples, n_dims) signals; features : (n_samples, n_features) true activations;
    dictionary : (n_features, n_dims) unit-norm true directions (``X = features @ dictionary``
    before noise); importance : (n_features,); probability : (n_features,) firing rates.
    """

    X: np.ndarray
    features: np.ndarray
    dictionary: np.ndarray
    importance: np.ndarray
    probability: np.ndarray

    @property
    def n_features(self) -> int:
        return int(self.dictionary.shape[0])

    @property
    def n_dims(self) -> int:
        return int(self.dictionary.shape[1])


def make_superposition(
    n_samples: int = 10_000,
    n_features: int = 64,
    n_dims: int = 16,
    *,
    sparsity: float = 0.95,
    probability_decay: float = 0.0,
    importance_decay: float = 1.0,
    noise: float = 0.0,
    seed: int = 0,
    dtype=np.float64,
) -> ToyData:
    """Sample sparse features and embed them in fewer dimensions (see the module docstring).

    Parameters
    ----------
    n_samples, n_features, n_dims : sizes (all >= 1); superposition when n_features > n_dims.
    sparsity : S in [0, 1): each feature is zero with probability S on average.
    probability_decay : >= 0; 0 gives every feature the rate ``1 - S``, larger values a
        power-law profile (a few frequent features, many rare ones) with the same mean rate,
        clipped to at most 1.
    importance_decay : in (0, 1]: ``I_i = importance_decay ** i``.
    noise : standard deviation of Gaussian noise added to ``X``.
    seed : random seed (an int >= 0); dtype : float32 or float64.

    Every sample has at least one active feature is *not* guaranteed (as in Elhage et al.).
    """
    n_samples = check_scalar(n_samples, "n_samples", low=1, integer=True)
    n_features = check_scalar(n_features, "n_features", low=1, integer=True)
    n_dims = check_scalar(n_dims, "n_dims", low=1, integer=True)
    sparsity = check_scalar(sparsity, "sparsity", low=0.0)
    if sparsity >= 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
    probability_decay = check_scalar(probability_decay, "probability_decay", low=0.0)
    importance_decay = check_scalar(importance_decay, "importance_decay", low=0.0, low_inclusive=False)
    if importance_decay > 1.0:
        raise ValueError(f"importance_decay must be in (0, 1], got {importance_decay!r}")
    noise = check_scalar(noise, "noise", low=0.0)
    seed = check_scalar(seed, "seed", low=0, integer=True)
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise TypeError(f"dtype must be float32 or float64, got {dtype}")

    # a stream of its own, so that the true directions never coincide with another
    # component's random initialisation drawn from the same integer seed
    rng = np.random.default_rng([int(seed), 0x70E5])
    w = (np.arange(n_features) + 1.0) ** (-probability_decay)
    probability = np.minimum((1.0 - sparsity) * w / w.mean(), 1.0)
    importance = importance_decay ** np.arange(n_features, dtype=np.float64)
    D = rng.standard_normal((n_features, n_dims))
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    active = rng.random((n_samples, n_features)) < probability
    F = rng.random((n_samples, n_features)) * active
    X = F @ D
    if noise > 0:
        X = X + noise * rng.standard_normal(X.shape)
    return ToyData(
        X=X.astype(dtype),
        features=F.astype(dtype),
        dictionary=D.astype(dtype),
        importance=importance,
        probability=probability,
    )


def importance_weighted_loss(features, features_hat, importance) -> float:
    """Elhage et al.'s loss: ``mean_n sum_i I_i (F_ni - Fhat_ni)^2``."""
    F = check_array(to_numpy(features), "features", ndim=2)
    H = check_array(to_numpy(features_hat), "features_hat", ndim=2)
    imp = check_array(np.asarray(to_numpy(importance), dtype=np.float64), "importance", ndim=1)
    if F.shape != H.shape:
        raise ValueError(f"features has shape {F.shape} but features_hat {H.shape}")
    if imp.shape[0] != F.shape[1]:
        raise ValueError(f"importance must have shape ({F.shape[1]},), got {imp.shape}")
    if np.any(imp < 0):
        raise ValueError("importance must be >= 0")
    return float(np.mean(np.sum(imp * (F.astype(np.float64) - H) ** 2, axis=1)))


def score(toy: ToyData, dictionary, codes=None, *, threshold: float = 0.9) -> dict:
    """How well a learned ``dictionary`` (n_atoms, n_dims) recovers the true features.

    Returns a dict: ``mmcs`` (mean over true features of the best |cosine| with a learned
    atom), ``fraction`` (share of true features with best |cosine| > ``threshold``),
    ``hungarian`` (mean |cosine| of the one-to-one matching), and, when ``codes``
    (n_samples, n_atoms) for ``toy.X`` are given, ``code_correlation``: the mean over true
    features of the Pearson correlation between the true activation and the code of the
    atom matched to it (features or codes that never vary count as 0).
    """
    from .metrics import hungarian_match, max_cosines

    if not isinstance(toy, ToyData):
        raise TypeError(f"toy must be a ToyData, got {type(toy).__name__}")
    Dl = check_array(to_numpy(dictionary), "dictionary", ndim=2)
    if Dl.shape[1] != toy.n_dims:
        raise ValueError(f"dictionary has {Dl.shape[1]} features but the toy data have {toy.n_dims} dimensions")
    threshold = check_scalar(threshold, "threshold", low=0.0)
    Dt = toy.dictionary.astype(Dl.dtype)
    best, _ = max_cosines(Dt, Dl)
    best = to_numpy(best)
    match = hungarian_match(Dt, Dl)
    out = {
        "mmcs": float(best.mean()),
        "fraction": float((best > threshold).mean()),
        "hungarian": match["mean_cosine"],
    }
    if codes is not None:
        A = check_array(to_numpy(codes), "codes", ndim=2)
        if A.shape != (toy.X.shape[0], Dl.shape[0]):
            raise ValueError(f"codes must have shape {(toy.X.shape[0], Dl.shape[0])}, got {A.shape}")
        corr = np.zeros(toy.n_features)
        for i, j, s in zip(match["rows"], match["cols"], match["signs"]):
            f, a = toy.features[:, i].astype(np.float64), s * A[:, j].astype(np.float64)
            if f.std() > 0 and a.std() > 0:
                corr[i] = np.corrcoef(f, a)[0, 1]
        out["code_correlation"] = float(corr.mean())
    return out
