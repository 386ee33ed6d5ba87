"""Proximal operators and projections, row-wise on batches of codes.

Thresholds are a scalar or one value per atom (shape ``(n_atoms,)``, broadcast along the
last axis), so a weighted penalty ``sum_j t_j |a_j|`` uses the same operators.
All functions work on any array-API namespace and keep the input's dtype.
"""

from __future__ import annotations

import numpy as np

from .backend import array_namespace, check_array, get_kernel, register_kernel, to_numpy

__all__ = [
    "soft_threshold",
    "nonneg_soft_threshold",
    "hard_threshold",
    "top_k",
    "project_nonneg",
    "project_linf_ball",
]


def _threshold(threshold, x, xp, name="threshold"):
    """Scalar or per-atom threshold, validated (finite, >= 0) and broadcastable to ``x``."""
    if getattr(threshold, "ndim", None) == 0 and not isinstance(threshold, (np.bool_, bool)):
        # a 0-D array is the array API's scalar (e.g. ``0.1 * xp.max(xp.abs(C))``)
        if hasattr(threshold, "__array_namespace__"):
            array_namespace(x, threshold, names=("x", name))
        if "bool" in str(threshold.dtype) or "complex" in str(threshold.dtype):
            raise TypeError(f"{name} must be a real number, got dtype {threshold.dtype}")
        threshold = float(threshold)
    if isinstance(threshold, (int, float, np.integer, np.floating)) and not isinstance(threshold, bool):
        t = float(threshold)
        if not np.isfinite(t) or t < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {threshold!r}")
        return t
    try:
        t = threshold if hasattr(threshold, "__array_namespace__") else None
    except Exception:
        t = None
    if t is None:
        t_np = np.asarray(threshold)
        if t_np.ndim != 1:
            raise TypeError(f"{name} must be a number or a 1-D array with one value per atom")
        from .backend import asarray_like

        t = asarray_like(t_np.astype(np.float64), x)
    else:
        array_namespace(x, t, names=("x", name))
        if t.dtype != x.dtype:
            t = xp.astype(t, x.dtype)
    if t.ndim != 1 or t.shape[0] != x.shape[-1]:
        raise ValueError(
            f"{name} must be a number or have shape ({x.shape[-1]},) (one per atom), got {tuple(t.shape)}"
        )
    t_host = to_numpy(t)
    if not np.all(np.isfinite(t_host)) or np.any(t_host < 0):
        raise ValueError(f"{name} must be finite and >= 0 everywhere")
    return t


def soft_threshold(x, threshold):
    """``sign(x) * max(|x| - t, 0)``: the proximal operator of ``t * ||.||_1``."""
    xp = array_namespace(x)
    t = _threshold(threshold, x, xp)
    return xp.sign(x) * xp.maximum(xp.abs(x) - t, xp.zeros_like(x))


def nonneg_soft_threshold(x, threshold):
    """``max(x - t, 0)``: the proximal operator of ``t * ||.||_1 + indicator(x >= 0)``."""
    xp = array_namespace(x)
    t = _threshold(threshold, x, xp)
    return xp.maximum(x - t, xp.zeros_like(x))


def hard_threshold(x, threshold):
    """``x * (|x| > t)``: keeps entries whose magnitude exceeds ``t``.

    The proximal operator of ``t**2 / 2 * ||.||_0`` is hard thresholding at ``t``.
    """
    xp = array_namespace(x)
    t = _threshold(threshold, x, xp)
    return xp.where(xp.abs(x) > t, x, xp.zeros_like(x))


def project_nonneg(x):
    """Projection onto the non-negative orthant."""
    xp = array_namespace(x)
    return xp.maximum(x, xp.zeros_like(x))


def project_linf_ball(x, radius):
    """Projection onto ``{z : |z_j| <= r_j}`` (the conjugate of the prox of ``r*||.||_1``).

    Moreau's identity: ``x == soft_threshold(x, r) + project_linf_ball(x, r)``.
    """
    xp = array_namespace(x)
    r = _threshold(radius, x, xp, name="radius")
    return xp.clip(x, -r, r) if isinstance(r, float) else xp.minimum(xp.maximum(x, -r), r)


def top_k(x, k: int, *, by: str = "value", positive: bool = False):
    """Keep the ``k`` largest entries of each row, zero the rest (projection onto k-sparse sets).

    Parameters
    ----------
    x : array (n_samples, n_atoms) or (n_atoms,)
    k : int, 0 <= k; values above ``n_atoms`` keep everything.
    by : "value" keeps the k largest values; "magnitude" the k largest ``|x|`` with their sign.
    positive : bool
        Also zero the negative entries that were kept (TopK followed by ReLU).

    Ties are broken by position (lowest index first), so exactly ``min(k, n_atoms)`` entries
    are candidates in every row.
    """
    xp = array_namespace(x)
    x = check_array(x, "x", ndim=(1, 2), xp=xp, finite=False)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
        raise ValueError(f"k must be an integer >= 0, got {k!r}")
    if by not in ("value", "magnitude"):
        raise ValueError(f"by must be 'value' or 'magnitude', got {by!r}")
    single = x.ndim == 1
    x2 = xp.reshape(x, (1, x.shape[0])) if single else x
    n_atoms = x2.shape[1]
    k = int(min(k, n_atoms))
    if k == 0:
        out = xp.zeros_like(x2)
    elif k == n_atoms:
        out = x2
    else:
        kern = get_kernel("top_k_mask", xp)
        score = x2 if by == "value" else xp.abs(x2)
        mask = kern(score, k) if kern is not None else _top_k_mask(score, k, xp)
        out = xp.where(mask, x2, xp.zeros_like(x2))
    if positive:
        out = xp.maximum(out, xp.zeros_like(out))
    return xp.reshape(out, (n_atoms,)) if single else out


def _top_k_mask(score, k, xp):
    """Boolean mask of the k largest scores per row, portable (double argsort gives ranks)."""
    order = xp.argsort(-score, axis=1, stable=True)
    ranks = xp.argsort(order, axis=1, stable=True)
    return ranks < k


@register_kernel("top_k_mask", "numpy")
def _top_k_mask_numpy(score, k):
    """Same mask as :func:`_top_k_mask` (ties to the lowest index, NaN ranked last), in O(n).

    A partition finds each row's k-th best score; entries strictly better are kept, and of
    the entries tied with it the first ones by position fill the remaining places
    (``argpartition`` alone picks among ties arbitrarily).
    """
    neg = np.negative(score)
    kth = np.partition(neg, k - 1, axis=1)[:, k - 1 : k]
    nan_kth = np.isnan(kth)  # fewer than k non-NaN scores: all of them, then NaNs by position
    better = np.where(nan_kth, ~np.isnan(neg), neg < kth)
    tie = np.where(nan_kth, np.isnan(neg), neg == kth)
    need = k - np.count_nonzero(better, axis=1)[:, None]
    return better | (tie & (np.cumsum(tie, axis=1) <= need))
