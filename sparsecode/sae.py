"""Sparse autoencoders on the array API: the amortized version of the sparse-coding solvers.

Shapes and names follow SAELens: ``W_enc (d_in, d_sae)``, ``b_enc (d_sae,)``,
``W_dec (d_sae, d_in)`` (rows are atoms: the decoder *is* a dictionary), ``b_dec (d_in,)``::

    xc    = x - b_dec                      (centred input; plain x if not apply_b_dec_to_input)
    z     = xc @ W_enc + b_enc             (pre-activation, (n, d_sae))
    f     = sigma(z)                       (sparse code, (n, d_sae))
    x_hat = f @ W_dec + b_dec

Encoders (``architecture``) and the training loss of each, per batch of ``n`` rows, with
``MSE = (1/n) sum_i ||x_i - x_hat_i||^2`` (squared error summed over features, mean over rows):

==============  ================================================================  ==========================
architecture    sigma                                                             loss
==============  ================================================================  ==========================
``relu``        ``relu(z)`` (Towards Monosemanticity; unit-norm decoder rows)     MSE + lam * mean ||f||_1
``relu_april``  ``relu(z)``; decoder norms free (Anthropic, April 2024)           MSE + lam * mean sum_j f_j ||d_j||
``topk``        ``relu`` of the k largest ``z`` per row (Gao et al. 2024)         MSE + AuxK
``batchtopk``   the ``k * n`` largest ``relu(z)`` over the batch (Bussmann et     MSE + AuxK
                al. 2024); inference uses the running threshold ``theta``
``jumprelu``    ``z * H(z - theta_j)``, ``theta = exp(log_threshold)`` learned    MSE + lam * mean ||f||_0
                (Rajamanoharan et al. 2024), straight-through pseudo-derivatives
``abstopk``     the k largest ``|z|`` per row, sign kept (bidirectional)          MSE + AuxK
``topafa``      ``relu(z)`` keeping per row the smallest number of largest         MSE + AuxK + AFA
                ``(f_j ||d_j||)`` whose norm best matches ``||xc||`` (Lee et al. 2025)
``mpsae``       ``k`` unrolled matching-pursuit steps over the decoder rows         MSE
                (or until ``||r||^2 <= mp_tol``), no encoder weights
``lista``       ``T`` unrolled ISTA (or FISTA) steps with learned ``W_enc``,       MSE + lam * mean ||f||_1
                ``b_enc``: ``z_t = relu(y + (xc - y @ W_dec) @ W_enc + b_enc)``
==============  ================================================================  ==========================

Every gradient is written by hand (:func:`loss_and_grad`) and checked against finite
differences in the tests. The JumpReLU threshold is trained through the pseudo-derivatives
of the paper, with a rectangle kernel ``K(u) = 1{|u| < 1/2}`` of bandwidth ``eps``::

    d f_ij / d theta_j        := -(theta_j / eps) K((z_ij - theta_j) / eps)
    d H(z_ij - theta_j)/d theta_j := -(1 / eps) K((z_ij - theta_j) / eps)

(and zero derivative of ``H`` with respect to ``z``), chained to ``log_threshold``.
AuxK (Gao et al.): with ``e = x - x_hat`` held fixed and ``e_hat`` the decoding of the
``k_aux`` largest pre-activations among dead latents,
``aux = coef * sum ||e - e_hat||^2 / sum ||e - mean(e)||^2``.
AFA loss (top-AFA): ``coef * mean_i (||f_i * nu|| - ||xc_i||)^2`` with ``nu_j = ||d_j||``.

The SAE objective relates to the Lasso of :mod:`sparsecode.lasso` by
``||r||^2 + lam ||f||_1 = 2 (0.5 ||r||^2 + (lam / 2) ||f||_1)``, so the L1 family is compared
with FISTA at ``alpha = lam / 2`` by :func:`amortization_gap`.
"""

from __future__ import annotations

import json
import math
import os
import threading

import numpy as np

from .backend import (
    array_namespace,
    asarray_like,
    backend_name,
    check_array,
    check_scalar,
    get_kernel,
    register_kernel,
    to_numpy,
)
from .metrics import fvu  # the one definition of FVU

__all__ = [
    "SparseAutoencoder",
    "ARCHITECTURES",
    "loss_and_grad",
    "amortization_gap",
    "train_sae",
    "fvu",
]

ARCHITECTURES = ("relu", "relu_april", "topk", "batchtopk", "jumprelu", "abstopk", "topafa", "mpsae", "lista")
#: encoders that need ``k``
K_ARCHITECTURES = ("topk", "batchtopk", "abstopk", "mpsae")
#: encoders trained with the AuxK loss on dead latents
AUXK_ARCHITECTURES = ("topk", "batchtopk", "abstopk", "topafa")
#: encoders with a penalty coefficient ``lam``
PENALTY_ARCHITECTURES = ("relu", "relu_april", "jumprelu", "lista")
#: encoders whose decoder rows are kept at unit norm during training
UNIT_NORM_ARCHITECTURES = ("relu", "topk", "batchtopk", "jumprelu", "abstopk", "topafa", "mpsae", "lista")
#: encoders whose codes are non-negative
POSITIVE_ARCHITECTURES = ("relu", "relu_april", "topk", "batchtopk", "jumprelu", "topafa", "lista")

_ALIASES = {"standard": "relu", "relu_l1": "relu", "april": "relu_april", "top_afa": "topafa",
            "mp": "mpsae", "mp_sae": "mpsae", "abs_topk": "abstopk", "batch_topk": "batchtopk"}

# SAELens' name for each of ours (None: SAELens has no equivalent, our name is written).
_SAELENS_ARCH = {"relu": "standard", "relu_april": "standard", "topk": "topk", "batchtopk": "jumprelu",
                 "jumprelu": "jumprelu"}
SAELENS_VERSION = "6.0.0"
SPARSECODE_SAE_FORMAT = 1


def canonical_architecture(name: str) -> str:
    """Our name for an architecture (accepts SAELens' ``standard`` and a few spellings)."""
    if not isinstance(name, str):
        raise TypeError(f"architecture must be a string, got {type(name).__name__}")
    key = name.lower()
    key = _ALIASES.get(key, key)
    if key not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {name!r}")
    return key


# =========================================================================== sparse-aware kernels
# Products with a sparse code matrix. The portable versions are dense products (fast on GPUs,
# correct everywhere); the NumPy kernels switch to scipy.sparse when few entries are non-zero,
# which is what makes a TopK training step cost about one dense product on the CPU.
_SPARSE_DENSITY = 0.08
# MP-SAE keeps its correlations up to date through the decoder's Gram matrix (d_sae^2
# entries, with an int16 copy on NumPy) only up to this size: d_sae 32768 in float32. Past it
# every pursuit step recomputes them from the residual (k products per batch instead).
MP_GRAM_MAX_BYTES = 4 * 2**30


def _codes_matmul(F, W, xp):
    """``F @ W`` for codes ``F (n, m)`` (mostly zeros) and ``W (m, d)``."""
    kern = get_kernel("sae_codes_matmul", xp)
    return kern(F, W) if kern is not None else F @ W


def _codes_tmatmul(F, G, xp):
    """``F.T @ G`` for codes ``F (n, m)`` (mostly zeros) and ``G (n, d)``: shape (m, d)."""
    kern = get_kernel("sae_codes_tmatmul", xp)
    return kern(F, G) if kern is not None else F.T @ G


def _scatter_rows(idx, R, m, xp):
    """``out[idx[i]] += R[i]`` for ``idx (N,)`` ints in ``[0, m)`` and ``R (N, d)``: shape (m, d)."""
    kern = get_kernel("sae_scatter_rows", xp)
    if kern is not None:
        return kern(idx, R, m)
    out = xp.zeros((m, R.shape[1]), dtype=R.dtype, device=_device(R))
    step = 4096
    ar = xp.arange(m, device=_device(R))
    N = idx.shape[0]
    for s in range(0, N, step):
        e = min(s + step, N)
        oh = xp.astype(ar[None, :] == idx[s:e, None], R.dtype)
        out = out + oh.T @ R[s:e, :]
    return out


def _is_sparse_np(F):
    return np.count_nonzero(F) <= _SPARSE_DENSITY * F.size


@register_kernel("sae_codes_matmul", "numpy")
def _codes_matmul_np(F, W):
    if not _is_sparse_np(F):
        return F @ W
    lay = _PatternLayout(F != 0)
    return lay.decode(lay.gather(F), W)


@register_kernel("sae_codes_tmatmul", "numpy")
def _codes_tmatmul_np(F, G):
    if not _is_sparse_np(F):
        return F.T @ G
    lay = _PatternLayout(F != 0)
    return lay.tmatmul(lay.gather(F), G)


@register_kernel("sae_scatter_rows", "numpy")
def _scatter_rows_np(idx, R, m):
    import scipy.sparse as sp

    N = idx.shape[0]
    S = sp.csr_matrix((np.ones(N, dtype=R.dtype), (np.asarray(idx), np.arange(N))), shape=(m, N))
    return np.asarray(S @ R)


def _top_k_mask(score, k, xp):
    """Boolean mask of the ``k`` largest entries of each row of ``score``."""
    m = score.shape[1]
    if k >= m:
        return xp.ones(score.shape, dtype=xp.bool, device=_device(score))
    if k <= 0:
        return xp.zeros(score.shape, dtype=xp.bool, device=_device(score))
    kern = get_kernel("top_k_mask", xp)  # the NumPy argpartition kernel of sparsecode.prox
    if kern is not None:
        return kern(score, k)
    order = xp.argsort(-score, axis=1, stable=True)
    ranks = xp.argsort(order, axis=1, stable=True)
    return ranks < k


def _batch_top_k_mask(a, K, xp):
    """Mask of the ``K`` largest entries of the whole array ``a`` (ties to the lowest flat index)."""
    kern = get_kernel("sae_batch_top_k_mask", xp)
    if kern is not None:
        out = kern(a, K)
        if out is not None:
            return out
    flat = xp.reshape(a, (1, a.shape[0] * a.shape[1]))
    return xp.reshape(_top_k_mask(flat, K, xp), a.shape)


@register_kernel("sae_batch_top_k_mask", "numpy")
def _batch_top_k_mask_np(a, K):
    """One partition finds the K-th largest value; when the entries tied with it all fit (the
    usual case) the mask is ``a >= kth``, else ``None`` (the tie-breaking portable code)."""
    N = a.size
    if K >= N or K <= 0 or np.isnan(a).any():
        return None
    kth = np.partition(a.reshape(-1), N - K)[N - K]
    mask = a >= kth
    return mask if np.count_nonzero(mask) == K else None


# ---------------------------------------------------------------- k-sparse codes (idx, vals)
# Fixed-k encoders (TopK, AbsTopK, and AuxK's k_aux) keep their codes as ``idx (n, k)`` ints and
# ``vals (n, k)``: every product then costs O(n k d) instead of O(n d_sae d). Portable versions
# gather rows (``take`` + batched matmul) or build the dense matrix; the NumPy kernels wrap the
# pairs in a CSR matrix without scanning anything dense.
def _topk_indices(score, k, xp):
    """Column indices of the ``k`` largest entries of each row (any order), shape (n, k)."""
    kern = get_kernel("sae_topk_indices", xp)
    if kern is not None:
        return kern(score, k)
    return xp.argsort(-score, axis=1, stable=True)[:, :k]


def _ks_dense(idx, vals, m, xp):
    """The dense (n, m) matrix of k-sparse codes."""
    kern = get_kernel("sae_ks_dense", xp)
    if kern is not None:
        return kern(idx, vals, m)
    ar = xp.arange(m, device=_device(vals))
    out = xp.zeros((vals.shape[0], m), dtype=vals.dtype, device=_device(vals))
    for c in range(idx.shape[1]):
        out = out + xp.where(ar[None, :] == idx[:, c:c + 1], vals[:, c:c + 1], _zero(vals, xp))
    return out


def _ks_decode(idx, vals, W, xp):
    """``S @ W`` for the k-sparse ``S`` given by (idx, vals): shape (n, d)."""
    kern = get_kernel("sae_ks_decode", xp)
    if kern is not None:
        return kern(idx, vals, W)
    n, k = idx.shape
    Wg = xp.reshape(xp.take(W, xp.reshape(idx, (n * k,)), axis=0), (n, k, W.shape[1]))
    return (vals[:, None, :] @ Wg)[:, 0, :]


def _ks_sample(idx, G, W, xp):
    """``(G @ W.T)`` at the entries (i, idx[i, c]) only: shape (n, k)."""
    kern = get_kernel("sae_ks_sample", xp)
    if kern is not None:
        return kern(idx, G, W)
    n, k = idx.shape
    Wg = xp.reshape(xp.take(W, xp.reshape(idx, (n * k,)), axis=0), (n, k, W.shape[1]))
    return (Wg @ G[:, :, None])[:, :, 0]


def _ks_tmatmul(idx, vals, G, m, xp):
    """``S.T @ G`` for the k-sparse ``S`` (n, m) and ``G (n, d)``: shape (m, d)."""
    kern = get_kernel("sae_ks_tmatmul", xp)
    if kern is not None:
        return kern(idx, vals, G, m)
    return _ks_dense(idx, vals, m, xp).T @ G


def _ks_colsum(idx, vals, m, xp):
    """Column sums of the k-sparse ``S``: shape (m,)."""
    kern = get_kernel("sae_ks_colsum", xp)
    if kern is not None:
        return kern(idx, vals, m)
    return xp.sum(_ks_dense(idx, vals, m, xp), axis=0)


def _ks_rtmatmul(idx, vals, G, m, xp):
    """``G.T @ S`` for ``G (n, d)`` and the k-sparse ``S`` (n, m): shape (d, m), the layout of
    ``W_enc`` (its gradient is ``xc.T @ g_z``)."""
    kern = get_kernel("sae_ks_rtmatmul", xp)
    if kern is not None:
        return kern(idx, vals, G, m)
    return G.T @ _ks_dense(idx, vals, m, xp)


# NumPy kernels. A k-sparse matrix whose rows fill more than this fraction of its columns is
# multiplied densely (BLAS beats the gather loops there, e.g. AuxK within the dead latents);
# below it the Numba loops of _sae_numba touch only the k entries per row.
_KS_DENSE_FRACTION = 0.1


def _nb():
    from . import _sae_numba

    return _sae_numba


def _ks_is_dense(k, m):
    return k > _KS_DENSE_FRACTION * m


def _ks_pattern(idx):
    n, k = idx.shape
    return np.arange(0, n * k + 1, k, dtype=np.int64), np.ascontiguousarray(idx, dtype=np.int64).reshape(-1)


@register_kernel("sae_topk_indices", "numpy")
def _topk_indices_np(score, k):
    n, m = score.shape
    if k >= m:
        return np.broadcast_to(np.arange(m), score.shape).copy()
    if 16 * k <= m:  # a size-k heap per row: one pass, ties to the lowest index
        return _nb().topk_rows(np.ascontiguousarray(score), k, np.empty((n, k), dtype=np.int64))
    return np.argpartition(-score, k - 1, axis=1)[:, :k]


@register_kernel("sae_ks_sample", "numpy")
def _ks_sample_np(idx, G, W):
    n, k = idx.shape
    if _ks_is_dense(k, W.shape[0]):
        return np.take_along_axis(G @ W.T, idx, axis=1)
    indptr, cols = _ks_pattern(idx)
    out = _nb().csr_sample(indptr, cols, np.ascontiguousarray(G), np.ascontiguousarray(W),
                           np.empty(n * k, dtype=G.dtype))
    return out.reshape(n, k)


@register_kernel("sae_ks_dense", "numpy")
def _ks_dense_np(idx, vals, m):
    out = np.zeros((vals.shape[0], m), dtype=vals.dtype)
    np.put_along_axis(out, idx, vals, axis=1)  # indices of one row are distinct
    return out


@register_kernel("sae_ks_decode", "numpy")
def _ks_decode_np(idx, vals, W):
    n, k = idx.shape
    if _ks_is_dense(k, W.shape[0]):
        return _ks_dense_np(idx, vals, W.shape[0]) @ W
    indptr, cols = _ks_pattern(idx)
    return _nb().csr_decode(indptr, cols, np.ascontiguousarray(vals).reshape(-1), np.ascontiguousarray(W),
                            np.empty((n, W.shape[1]), dtype=W.dtype))


def _ks_transposed(idx, vals, G, m, rt):
    n, k = idx.shape
    nb_ = _nb()
    indptr, cols = _ks_pattern(idx)
    colptr, perm, rows = nb_.csr_transpose(indptr, cols, m)
    v = np.ascontiguousarray(vals).reshape(-1)
    G = np.ascontiguousarray(G)
    if rt:
        return nb_.csc_rtmatmul(colptr, perm, rows, v, G, np.empty((G.shape[1], m), dtype=G.dtype))
    return nb_.csc_tmatmul(colptr, perm, rows, v, G, np.empty((m, G.shape[1]), dtype=G.dtype))


@register_kernel("sae_ks_tmatmul", "numpy")
def _ks_tmatmul_np(idx, vals, G, m):
    if _ks_is_dense(idx.shape[1], m):
        # the transposed codes made contiguous: BLAS is erratic on a transposed operand here
        return np.ascontiguousarray(_ks_dense_np(idx, vals, m).T) @ G
    return _ks_transposed(idx, vals, G, m, rt=False)


@register_kernel("sae_ks_rtmatmul", "numpy")
def _ks_rtmatmul_np(idx, vals, G, m):
    if _ks_is_dense(idx.shape[1], m):
        return G.T @ _ks_dense_np(idx, vals, m)
    return _ks_transposed(idx, vals, G, m, rt=True)


@register_kernel("sae_ks_colsum", "numpy")
def _ks_colsum_np(idx, vals, m):
    return np.bincount(idx.reshape(-1), weights=vals.reshape(-1), minlength=m).astype(vals.dtype)


def _add_rows(A, mask, R, xp):
    """``A`` with the rows of ``R`` added, in order, to the rows of ``A`` where ``mask`` (bool
    (m,)) is true; ``A`` is the caller's own temporary (the NumPy kernel adds in place)."""
    kern = get_kernel("sae_add_rows", xp)
    if kern is not None:
        return kern(A, mask, R)
    # row t of R goes to the t-th true row of A; the others take a zero row
    pos = xp.cumulative_sum(xp.astype(mask, xp.int64)) - 1
    pos = xp.where(mask, pos, xp.full_like(pos, R.shape[0]))
    Rz = xp.concat([R, xp.zeros((1,) + tuple(R.shape[1:]), dtype=R.dtype, device=_device(R))], axis=0)
    return A + xp.take(Rz, pos, axis=0)


@register_kernel("sae_add_rows", "numpy")
def _add_rows_np(A, mask, R):
    A[mask] += R
    return A


def _add_scaled_rows(G, s, W, xp):
    """``G + s[:, None] * W``; ``G`` is the caller's temporary (NumPy: one pass, in place)."""
    kern = get_kernel("sae_add_scaled_rows", xp)
    out = kern(G, s, W) if kern is not None else None
    return out if out is not None else G + s[:, None] * W


@register_kernel("sae_add_scaled_rows", "numpy")
def _add_scaled_rows_np(G, s, W):
    if not (G.dtype == W.dtype == s.dtype and G.dtype in (np.float32, np.float64) and G.shape == W.shape
            and G.flags.c_contiguous and G.flags.writeable and W.flags.c_contiguous):
        return None
    return _nb().add_scaled_rows(G, s, W)


# ---------------------------------------------------------------- layouts of codes
class _DenseLayout:
    """Codes as dense ``(n, m)`` arrays, zero outside ``mask``: the portable layout.

    Both layouts offer the same operations on "entry arrays" ``V`` (here dense, in
    :class:`_PatternLayout` the values at the pattern's entries): ``gather`` (restrict a dense
    array to the entries), ``col``/``row`` (broadcast a per-latent / per-row vector to the
    entries), ``colsum``/``rowsum``, ``decode`` (``V @ W``), ``tmatmul`` (``V.T @ G``) and
    ``sample`` (``G @ W.T`` at the entries); ``restrict`` (zero an entry array off the
    pattern: a no-op on a pattern's values) and ``scatter`` (an entry array as a dense array).
    """

    def __init__(self, mask, xp):
        self.mask, self.xp = mask, xp

    def gather(self, Z):
        return self.xp.where(self.mask, Z, _zero(Z, self.xp))

    def gather_bool(self, B):
        return self.xp.logical_and(self.mask, B)

    def restrict(self, V):
        return self.xp.where(self.mask, V, _zero(V, self.xp))

    def restrict_add(self, V, a):
        """``restrict(V + a)`` for a scalar ``a``."""
        return self.restrict(V + a)

    def scatter(self, V):
        return V

    def col(self, v):
        return v[None, :]

    def row(self, v):
        return v[:, None]

    def colsum(self, V):
        return self.xp.sum(V, axis=0)

    def rowsum(self, V):
        return self.xp.sum(V, axis=1)

    def decode(self, V, W):
        return V @ W

    def tmatmul(self, V, G):
        return V.T @ G

    def rtmatmul(self, V, G):
        return G.T @ V

    def sample(self, G, W):
        return self.xp.where(self.mask, G @ W.T, _zero(G, self.xp))


class _PatternLayout:
    """Codes as values at the entries of one sparsity pattern (NumPy; Numba CSR products)."""

    def __init__(self, mask):
        nb_ = _nb()
        self.n, self.m = mask.shape
        mask = np.ascontiguousarray(mask)
        counts = nb_.mask_to_csr_counts(mask, np.empty(self.n, dtype=np.int64))
        self.indptr = np.zeros(self.n + 1, dtype=np.int64)
        np.cumsum(counts, out=self.indptr[1:])
        self.cols = nb_.mask_to_csr_fill(mask, self.indptr, np.empty(int(self.indptr[-1]), dtype=np.int64))
        self.rows = np.repeat(np.arange(self.n, dtype=np.int64), counts)  # row-major: CSR order
        self._csc = None

    def gather(self, Z):
        return Z[self.rows, self.cols]

    gather_bool = gather

    def restrict(self, V):
        return V

    def restrict_add(self, V, a):
        return V + a

    def scatter(self, V):
        out = np.zeros((self.n, self.m), dtype=V.dtype)
        out[self.rows, self.cols] = V
        return out

    def col(self, v):
        return v[self.cols]

    def row(self, v):
        return v[self.rows]

    def colsum(self, V):
        return np.bincount(self.cols, weights=V, minlength=self.m).astype(V.dtype, copy=False)

    def rowsum(self, V):
        return np.bincount(self.rows, weights=V, minlength=self.n).astype(V.dtype, copy=False)

    def decode(self, V, W):
        return _nb().csr_decode(self.indptr, self.cols, np.ascontiguousarray(V), np.ascontiguousarray(W),
                                np.empty((self.n, W.shape[1]), dtype=W.dtype))

    def _transposed(self):
        if self._csc is None:
            self._csc = _nb().csr_transpose(self.indptr, self.cols, self.m)
        return self._csc

    def tmatmul(self, V, G):
        G = np.ascontiguousarray(G)
        return _nb().csc_tmatmul(*self._transposed(), np.ascontiguousarray(V), G,
                                 np.empty((self.m, G.shape[1]), dtype=G.dtype))

    def rtmatmul(self, V, G):
        G = np.ascontiguousarray(G)
        return _nb().csc_rtmatmul(*self._transposed(), np.ascontiguousarray(V), G,
                                  np.empty((G.shape[1], self.m), dtype=G.dtype))

    def sample(self, G, W):
        return _nb().csr_sample(self.indptr, self.cols, np.ascontiguousarray(G), np.ascontiguousarray(W),
                                np.empty(self.cols.shape[0], dtype=G.dtype))


def _layout(mask, xp):
    kern = get_kernel("sae_layout", xp)
    lay = kern(mask) if kern is not None else None
    return lay if lay is not None else _DenseLayout(mask, xp)


@register_kernel("sae_layout", "numpy")
def _layout_np(mask):
    if np.count_nonzero(mask) > _SPARSE_DENSITY * mask.size:
        return _DenseLayoutNumPy(mask)
    return _PatternLayout(mask)


class _DenseLayoutNumPy(_DenseLayout):
    """:class:`_DenseLayout` on NumPy with its masking passes as one parallel Numba pass each
    (``np.where`` with a broadcast zero runs single-threaded at ~3 ns per entry: 15 ms for a
    (1024, 4608) float32 array, three of them per LISTA step at initialisation)."""

    def __init__(self, mask):
        super().__init__(np.ascontiguousarray(mask), np)

    def _ok(self, Z):
        return (isinstance(Z, np.ndarray) and Z.shape == self.mask.shape and Z.dtype in (np.float32, np.float64)
                and Z.flags.c_contiguous)

    def gather(self, Z):
        if not self._ok(Z):
            return super().gather(Z)
        return _nb().masked(self.mask, Z, Z.dtype.type(0), False, np.empty_like(Z))

    def restrict(self, V):
        return self.gather(V)

    def restrict_add(self, V, a):
        """``restrict(V + a)`` in one pass (``a`` a scalar)."""
        if not self._ok(V):
            return super().restrict_add(V, a)
        return _nb().masked(self.mask, V, V.dtype.type(a), True, np.empty_like(V))

    def sample(self, G, W):
        P = G @ W.T
        if not self._ok(P):
            return super().sample(G, W)
        # a fresh output: in place, Numba's alias check takes the scalar loop (8x slower)
        return _nb().masked(self.mask, P, P.dtype.type(0), False, np.empty_like(P))


def _device(x):
    import array_api_compat

    return array_api_compat.device(x)


def _zero(x, xp):
    return xp.zeros((1,), dtype=x.dtype, device=_device(x))


def _relu(x, xp):
    return xp.maximum(x, _zero(x, xp))


def _row_norms(W, xp):
    return xp.sqrt(xp.sum(W * W, axis=1))




def _auxk_loss(E_hat, E, aux_coefficient, xp):
    """AuxK loss ``c * ||E_hat - E||^2 / sum ||E - mean(E)||^2`` (the residual ``E`` held fixed).

    Returns ``(loss, E_hat - E, denominator)``: the last two give its gradient in ``E_hat``.
    """
    den = float(xp.sum((E - xp.mean(E, axis=0)) ** 2))
    den = den if den > 0 else 1.0
    D_aux = E_hat - E
    return float(aux_coefficient) * float(xp.sum(D_aux * D_aux)) / den, D_aux, den


def _auxk_forward(z, dead_mask, ka, signed, W_dec, E, aux_coefficient, xp):
    """AuxK on the dead latents: the ``ka`` largest pre-activations (by magnitude when
    ``signed``) among them per row, decoded, against the fixed residual ``E``.

    Works on the dead columns only (``z`` and ``W_dec`` restricted to them): the selection
    and the products cost ``n_dead``, not ``d_sae``. Returns ``(loss, cache)``.
    """
    dead_idx = xp.nonzero(dead_mask)[0]
    n_dead = int(dead_idx.shape[0])
    z_d = xp.take(z, dead_idx, axis=1)
    ka = min(int(ka), n_dead)
    kern = get_kernel("sae_auxk_dense", xp)
    if kern is not None and _ks_is_dense(ka, n_dead):
        out = kern(z_d, dead_idx, ka, signed, W_dec, E, aux_coefficient)
        if out is not None:
            return out
    idx = _topk_indices(xp.abs(z_d) if signed else z_d, ka, xp)
    v_pre = xp.take_along_axis(z_d, idx, axis=1)
    vals = v_pre if signed else _relu(v_pre, xp)
    W_d = xp.take(W_dec, dead_idx, axis=0)
    E_hat = _ks_decode(idx, vals, W_d, xp)
    aux, D_aux, den = _auxk_loss(E_hat, E, aux_coefficient, xp)
    return aux, (idx, v_pre, vals, W_d, D_aux, den, n_dead)


def _auxk_backward(cache, dead_mask, xc, aux_coefficient, signed, g_Wdec, g_Wenc, g_benc, xp):
    """Add AuxK's gradient to those of ``W_dec`` (m, d), ``W_enc`` (d, m) and ``b_enc``."""
    if isinstance(cache, _AuxKDense):
        return cache.backward(dead_mask, xc, aux_coefficient, g_Wdec, g_Wenc, g_benc)
    idx, v_pre, vals, W_d, D_aux, den, n_dead = cache
    g_eh = (2.0 * float(aux_coefficient) / den) * D_aux
    g_v = _ks_sample(idx, g_eh, W_d, xp)
    if not signed:
        g_v = xp.where(v_pre > 0, g_v, _zero(g_v, xp))
    g_Wdec = _add_rows(g_Wdec, dead_mask, _ks_tmatmul(idx, vals, g_eh, n_dead, xp), xp)
    g_Wenc = _add_rows(g_Wenc.T, dead_mask, _ks_rtmatmul(idx, g_v, xc, n_dead, xp).T, xp).T
    g_benc = _add_rows(g_benc, dead_mask, _ks_colsum(idx, g_v, n_dead, xp), xp)
    return g_Wdec, g_Wenc, g_benc


class _AuxKDense:
    """AuxK with the codes of the dead latents as one dense ``(n, n_dead)`` matrix (NumPy, when
    ``k_aux`` is a large share of the dead latents): the same loss and gradient as the
    ``(idx, vals)`` path, by BLAS products, without building the dense codes three times."""

    def __init__(self, F, M, W_d, D_aux, den):
        self.F, self.M, self.W_d, self.D_aux, self.den = F, M, W_d, D_aux, den

    def backward(self, dead_mask, xc, aux_coefficient, g_Wdec, g_Wenc, g_benc):
        g_eh = (2.0 * float(aux_coefficient) / self.den) * self.D_aux
        g_F = g_eh @ self.W_d.T
        g_F *= self.M  # the kept entries (and, unsigned, where the ReLU passes)
        g_Wdec = _add_rows_np(g_Wdec, dead_mask, np.ascontiguousarray(self.F.T) @ g_eh)
        g_Wenc = _add_rows_np(g_Wenc.T, dead_mask, np.ascontiguousarray(g_F.T) @ xc).T
        g_benc = _add_rows_np(g_benc, dead_mask, np.sum(g_F, axis=0))
        return g_Wdec, g_Wenc, g_benc


@register_kernel("sae_auxk_dense", "numpy")
def _auxk_dense_np(z_d, dead_idx, ka, signed, W_dec, E, aux_coefficient):
    idx = _topk_indices(np.abs(z_d) if signed else z_d, ka, np)
    M = np.zeros(z_d.shape, dtype=z_d.dtype)
    np.put_along_axis(M, idx, 1.0, axis=1)
    F = z_d * M if signed else np.maximum(z_d, 0) * M  # -0.0 never arises: M is 0 or 1
    if not signed:
        M = (F > 0).astype(z_d.dtype)  # the gradient passes where the kept value is positive
    W_d = np.take(W_dec, dead_idx, axis=0)
    E_hat = F @ W_d
    aux, D_aux, den = _auxk_loss(E_hat, E, aux_coefficient, np)
    return aux, _AuxKDense(F, M, W_d, D_aux, den)


# =========================================================================== the model
class SparseAutoencoder:
    """A sparse autoencoder: parameters, the encoder rule, and inference.

    Parameters are arrays of one namespace and dtype: ``W_enc (d_in, d_sae)``, ``b_enc
    (d_sae,)``, ``W_dec (d_sae, d_in)`` (atoms as rows), ``b_dec (d_in,)`` and, for
    ``jumprelu``, ``log_threshold (d_sae,)``. Build one with :meth:`initialize`, train it
    with :func:`train_sae`, read one with :meth:`load`.

    Attributes besides the parameters: ``architecture``, ``k`` (TopK family and MP-SAE),
    ``l1_coefficient`` (the penalty ``lam`` of the L1/L0 family, used by
    :func:`amortization_gap`), ``bandwidth`` (JumpReLU), ``batch_threshold`` (BatchTopK's
    inference threshold), ``lista_steps``/``lista_fista``, ``mp_tol``, ``input_scale`` (inputs
    are multiplied by it before encoding and outputs divided by it after decoding; 1.0 unless
    trained on normalised activations), ``apply_b_dec_to_input`` and ``metadata`` (a dict).
    """

    def __init__(self, W_enc, b_enc, W_dec, b_dec, *, architecture="topk", k=None, log_threshold=None,
                 l1_coefficient=None, bandwidth=0.001, batch_threshold=None, lista_steps=3,
                 lista_fista=False, mp_tol=None, input_scale=1.0, apply_b_dec_to_input=True,
                 metadata=None):
        self.architecture = canonical_architecture(architecture)
        xp = array_namespace(W_enc, b_enc, W_dec, b_dec, names=("W_enc", "b_enc", "W_dec", "b_dec"))
        W_dec = check_array(W_dec, "W_dec", ndim=2, xp=xp)
        d_sae, d_in = W_dec.shape
        W_enc = check_array(W_enc, "W_enc", ndim=2, xp=xp, dtype_like=W_dec)
        b_enc = check_array(b_enc, "b_enc", ndim=1, xp=xp, dtype_like=W_dec)
        b_dec = check_array(b_dec, "b_dec", ndim=1, xp=xp, dtype_like=W_dec)
        if tuple(W_enc.shape) != (d_in, d_sae):
            raise ValueError(f"W_enc must have shape (d_in, d_sae) = ({d_in}, {d_sae}), got {tuple(W_enc.shape)}")
        if b_enc.shape[0] != d_sae:
            raise ValueError(f"b_enc must have shape ({d_sae},), got {tuple(b_enc.shape)}")
        if b_dec.shape[0] != d_in:
            raise ValueError(f"b_dec must have shape ({d_in},), got {tuple(b_dec.shape)}")
        self.params = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
        if self.architecture == "jumprelu":
            if log_threshold is None:
                log_threshold = xp.full((d_sae,), math.log(0.001), dtype=W_dec.dtype, device=_device(W_dec))
            log_threshold = check_array(log_threshold, "log_threshold", ndim=1, xp=xp, dtype_like=W_dec)
            if log_threshold.shape[0] != d_sae:
                raise ValueError(f"log_threshold must have shape ({d_sae},), got {tuple(log_threshold.shape)}")
            self.params["log_threshold"] = log_threshold
        if self.architecture in K_ARCHITECTURES:
            if k is None:
                raise ValueError(f"architecture {self.architecture!r} needs k (active latents per row)")
        if k is not None:
            k = check_scalar(k, "k", low=1, integer=True)
            if self.architecture in K_ARCHITECTURES and k > d_sae:
                raise ValueError(f"k must be <= d_sae ({d_sae}), got {k}")
        self.k = k
        self.l1_coefficient = None if l1_coefficient is None else check_scalar(l1_coefficient, "l1_coefficient", low=0)
        self.bandwidth = check_scalar(bandwidth, "bandwidth", low=0, low_inclusive=False)
        self.batch_threshold = None if batch_threshold is None else float(batch_threshold)
        self.lista_steps = check_scalar(lista_steps, "lista_steps", low=1, integer=True)
        self.lista_fista = bool(lista_fista)
        self.mp_tol = None if mp_tol is None else check_scalar(mp_tol, "mp_tol", low=0)
        self.input_scale = check_scalar(input_scale, "input_scale", low=0, low_inclusive=False)
        self.apply_b_dec_to_input = bool(apply_b_dec_to_input)
        self.metadata = dict(metadata or {})

    # ------------------------------------------------------------------ construction
    @classmethod
    def initialize(cls, d_in, d_sae, architecture="topk", *, k=None, seed=0, dtype="float32", like=None,
                   b_dec=None, decoder_norm=None, l1_coefficient=None, initial_threshold=0.001, **options):
        """A freshly initialised SAE.

        Decoder rows are random directions (seeded Gaussian) of norm ``decoder_norm`` (1.0, or
        0.1 for ``relu_april`` as in Anthropic's April 2024 recipe); ``W_enc = W_dec.T`` (for
        LISTA ``W_dec.T / L`` with ``L = ||W_dec||_2^2``, the ISTA step); ``b_enc = 0`` (LISTA:
        ``-lam / (2 L)``, the ISTA threshold); ``b_dec`` as given or zero; JumpReLU thresholds
        at ``initial_threshold``. ``like`` is an array whose namespace and device the
        parameters take (NumPy by default).
        """
        arch = canonical_architecture(architecture)
        d_in = check_scalar(d_in, "d_in", low=1, integer=True)
        d_sae = check_scalar(d_sae, "d_sae", low=1, integer=True)
        dt = np.dtype(dtype) if not hasattr(dtype, "kind") else dtype
        if str(np.dtype(dt)) not in ("float32", "float64"):
            raise TypeError(f"dtype must be float32 or float64, got {dtype!r}")
        rng = np.random.default_rng(seed)
        W = rng.standard_normal((d_sae, d_in))
        W /= np.linalg.norm(W, axis=1, keepdims=True)
        if decoder_norm is None:
            decoder_norm = 0.1 if arch == "relu_april" else 1.0
        W *= check_scalar(decoder_norm, "decoder_norm", low=0, low_inclusive=False)
        W_enc = W.T.copy()
        b_enc = np.zeros(d_sae)
        lam = l1_coefficient
        if arch == "lista":
            L = float(np.linalg.norm(W, 2) ** 2)
            W_enc = W.T / L
            if lam is not None:
                b_enc = np.full(d_sae, -lam / (2 * L))
        bd = np.zeros(d_in) if b_dec is None else np.asarray(to_numpy(b_dec), dtype=np.float64)
        if bd.shape != (d_in,):
            raise ValueError(f"b_dec must have shape ({d_in},), got {bd.shape}")
        ref = np.zeros(1, dtype=np.dtype(dt)) if like is None else like
        conv = lambda a: asarray_like(a, ref, dtype=ref.dtype if like is None else _dtype_of(like, dt))  # noqa: E731
        log_thr = None
        if arch == "jumprelu":
            t0 = check_scalar(initial_threshold, "initial_threshold", low=0, low_inclusive=False)
            log_thr = conv(np.full(d_sae, math.log(t0)))
        return cls(conv(W_enc), conv(b_enc), conv(W), conv(bd), architecture=arch, k=k,
                   log_threshold=log_thr, l1_coefficient=lam, **options)

    # ------------------------------------------------------------------ attributes
    W_enc = property(lambda self: self.params["W_enc"])
    b_enc = property(lambda self: self.params["b_enc"])
    W_dec = property(lambda self: self.params["W_dec"])
    b_dec = property(lambda self: self.params["b_dec"])

    @property
    def d_in(self) -> int:
        return int(self.params["W_dec"].shape[1])

    @property
    def d_sae(self) -> int:
        return int(self.params["W_dec"].shape[0])

    @property
    def xp(self):
        return array_namespace(self.params["W_dec"])

    @property
    def dtype(self):
        return self.params["W_dec"].dtype

    @property
    def threshold(self):
        """Per-latent inference threshold (JumpReLU, and BatchTopK's global one), else None."""
        xp = self.xp
        if self.architecture == "jumprelu":
            return xp.exp(self.params["log_threshold"])
        if self.architecture == "batchtopk" and self.batch_threshold is not None:
            return xp.full((self.d_sae,), self.batch_threshold, dtype=self.dtype, device=_device(self.W_dec))
        return None

    def __repr__(self):
        extra = f", k={self.k}" if self.k is not None else ""
        return (f"SparseAutoencoder(architecture={self.architecture!r}, d_in={self.d_in}, d_sae={self.d_sae}{extra}, "
                f"backend={backend_name(self.xp)}, dtype={_dtype_name(self.dtype)})")

    def copy(self):
        """A deep copy (parameters copied)."""
        xp = self.xp
        new = SparseAutoencoder.__new__(SparseAutoencoder)
        new.__dict__.update({k: v for k, v in self.__dict__.items() if k != "params"})
        new.params = {k: xp.asarray(v, copy=True) for k, v in self.params.items()}
        new.metadata = dict(self.metadata)
        return new

    # ------------------------------------------------------------------ inference
    def _check_input(self, X, name="X"):
        xp = self.xp
        array_namespace(X, self.W_dec, names=(name, "the SAE's parameters"))
        X = check_array(X, name, ndim=(1, 2), xp=xp)
        if X.dtype != self.dtype:
            raise TypeError(f"{name} has dtype {_dtype_name(X.dtype)} but the SAE is {_dtype_name(self.dtype)}: "
                            "convert one of them (nothing is cast silently)")
        single = X.ndim == 1
        if single:
            X = xp.reshape(X, (1, X.shape[0]))
        if X.shape[1] != self.d_in:
            raise ValueError(f"{name} has {X.shape[1]} features but the SAE has d_in={self.d_in}")
        return X, single

    def _centre(self, X):
        xs = X * self.input_scale if self.input_scale != 1.0 else X
        return xs - self.b_dec if self.apply_b_dec_to_input else xs

    def encode(self, X):
        """Codes ``f = sigma((x - b_dec) @ W_enc + b_enc)``, shape (n, d_sae) (or (d_sae,) for 1-D)."""
        X, single = self._check_input(X)
        F = _encode_inference(self, self._centre(X))
        return F[0, :] if single else F

    def decode(self, F):
        """Reconstruction ``f @ W_dec + b_dec``, shape (n, d_in) (or (d_in,) for 1-D codes)."""
        xp = self.xp
        array_namespace(F, self.W_dec, names=("F", "the SAE's parameters"))
        F = check_array(F, "F", ndim=(1, 2), xp=xp, dtype_like=self.W_dec)
        single = F.ndim == 1
        if single:
            F = xp.reshape(F, (1, F.shape[0]))
        if F.shape[1] != self.d_sae:
            raise ValueError(f"F has {F.shape[1]} latents but the SAE has d_sae={self.d_sae}")
        Xh = _codes_matmul(F, self.W_dec, xp) + self.b_dec
        if self.input_scale != 1.0:
            Xh = Xh / self.input_scale
        return Xh[0, :] if single else Xh

    def forward(self, X):
        """``decode(encode(X))``."""
        X2, single = self._check_input(X)
        Xh = self.decode(_encode_inference(self, self._centre(X2)))
        return Xh[0, :] if single else Xh

    __call__ = forward

    # ------------------------------------------------------------------ files
    def save(self, folder):
        """Write ``cfg.json`` and ``sae_weights.safetensors`` in SAELens' layout (see module doc)."""
        return save_sae(self, folder)

    @classmethod
    def load(cls, folder, *, like=None):
        """Read an SAE saved by :meth:`save`, by SAELens (>= 6), or by sparsify (``sae.safetensors``)."""
        return load_sae(folder, like=like)


def _dtype_name(dtype) -> str:
    s = str(dtype)
    for n in ("float64", "float32", "float16"):
        if n in s:
            return n
    return s


def _dtype_of(like, default):
    return like.dtype


# =========================================================================== encoders (forward)
def _fista_betas(T):
    """Momentum ``beta_t`` used to form ``y_t`` (t = 1..T-1) in LISTA-FISTA."""
    t = 1.0
    out = [0.0]
    for _ in range(1, T):
        t_next = (1.0 + math.sqrt(1.0 + 4.0 * t * t)) / 2.0
        out.append((t - 1.0) / t_next)
        t = t_next
    return out


def _afa_mask(a, nu, xc, xp):
    """top-AFA selection: per row keep the ``k_i`` largest ``a_j nu_j`` with ``k_i`` minimising
    ``| sqrt(sum of the k largest (a_j nu_j)^2) - ||xc|| |`` (the first minimiser)."""
    kern = get_kernel("sae_afa_mask", xp)
    if kern is not None:
        return kern(a, nu, xc)
    s = (a * nu) ** 2
    order = xp.argsort(-s, axis=1, stable=True)
    ranks = xp.argsort(order, axis=1, stable=True)
    s_sorted = xp.take_along_axis(s, order, axis=1)
    cum = xp.sqrt(xp.cumulative_sum(s_sorted, axis=1))
    B = xp.sqrt(xp.sum(xc * xc, axis=1))
    kstar = xp.argmin(xp.abs(cum - B[:, None]), axis=1) + 1
    return ranks < kstar[:, None]


@register_kernel("sae_afa_mask", "numpy")
def _afa_mask_np(a, nu, xc, K=128):
    """top-AFA selection sorting only the K largest entries per row; exact: the cumulative
    norm is non-decreasing, so once it exceeds ``||xc||`` within the top K the first minimiser
    lies there. Rows whose crossing lies further out are redone with 4x the K (Numba heap;
    on SmolLM2 activations top-AFA keeps ~100 latents per row at initialisation: K = 128
    settles most rows in one heap pass)."""
    s = (a * nu) ** 2
    n, m = s.shape
    B = np.sqrt(np.sum(xc * xc, axis=1))
    mask = np.zeros((n, m), dtype=bool)
    rows = None  # all rows at first
    Kc = min(K, m)
    while True:
        s_r = s if rows is None else np.ascontiguousarray(s[rows])
        B_r = B if rows is None else B[rows]
        if 16 * Kc <= m:  # the Kc best per row, best first, ties to the lowest index (Numba heap)
            idx = _nb().topk_rows(np.ascontiguousarray(s_r), Kc, np.empty((s_r.shape[0], Kc), dtype=np.int64))
        else:
            idx = np.argsort(-s_r, axis=1, kind="stable")[:, :Kc]
        cum = np.sqrt(np.cumsum(np.take_along_axis(s_r, idx, axis=1), axis=1))
        kstar = np.argmin(np.abs(cum - B_r[:, None]), axis=1) + 1
        keep = np.zeros(s_r.shape, dtype=bool)
        np.put_along_axis(keep, idx, np.arange(Kc)[None, :] < kstar[:, None], axis=1)
        if rows is None:
            mask = keep
        else:
            mask[rows] = keep
        far = cum[:, -1] <= B_r
        if Kc >= m or not np.any(far):
            return mask
        rows = np.nonzero(far)[0] if rows is None else rows[far]
        Kc = min(4 * Kc, m)


@register_kernel("sae_afa_layout", "numpy")
def _afa_layout_np(z, nu, xc, buckets=True, cap=256):
    """top-AFA's selection (``_afa_mask`` and ``z > 0``) straight from ``z`` into a pattern
    layout, with the kept pre-activations: one Numba pass finds each row's crossing (sorting
    only a prefix of the ranking found by value buckets; everything for the rows that need
    it, or all rows without ``buckets``), one more writes the CSR pattern. Skips
    the (n, d_sae) score, mask and relu arrays and the mask-to-CSR passes. ``None`` (the
    caller builds the mask) when the selection is not sparse."""
    if z.dtype not in (np.float32, np.float64) or z.ndim != 2:
        return None
    n, m = z.shape
    z = np.ascontiguousarray(z)
    nu = np.ascontiguousarray(nu, dtype=z.dtype)
    B = np.sqrt(np.sum(xc * xc, axis=1))
    nb_ = _nb()
    counts = np.empty(n, dtype=np.int64)
    thr_v = np.empty(n, dtype=z.dtype)
    thr_j = np.empty(n, dtype=np.int64)
    # buckets of the scores by their top bits: exponent and two mantissa bits
    shift = 21 if z.dtype == np.float32 else 50
    scratch = np.empty((64, m), dtype=z.dtype)
    bits = scratch.view(np.int32 if z.dtype == np.float32 else np.int64)
    sel = np.empty((n, cap), dtype=np.int64)  # the kept columns of rows keeping at most cap
    nb_.afa_select(z, nu, B, bool(buckets), shift, scratch, bits, thr_v, thr_j, counts, sel)
    nnz = int(counts.sum())
    if nnz > _SPARSE_DENSITY * z.size:
        return None
    lay = _PatternLayout.__new__(_PatternLayout)
    lay.n, lay.m = n, m
    lay.indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts, out=lay.indptr[1:])
    lay.cols = np.empty(nnz, dtype=np.int64)
    zv = np.empty(nnz, dtype=z.dtype)
    nb_.afa_fill(z, nu, thr_v, thr_j, sel, lay.indptr, lay.cols, zv)
    lay.rows = np.repeat(np.arange(n, dtype=np.int64), counts)
    lay._csc = None
    return lay, zv


def _mp_forward(sae, xc, xp, record=False, dense=True):
    """Unrolled matching pursuit of ``xc`` over the rows of ``W_dec`` (assumed unit norm).

    Step ``t``: ``c = r @ W_dec.T``, ``j = argmax |c|`` (``argmax c`` for positive codes),
    coefficient ``c_j`` (clipped at 0 when positive; 0 once ``||r||^2 <= mp_tol``),
    ``r <- r - c_j d_j``. Returns codes (n, d_sae) (with ``dense=False`` the pair ``(idx,
    vals)`` of (n, k) atoms and coefficients instead, indices possibly repeated), final
    residual and, if ``record``, the per-step ``(j, c, active, r_before)`` needed by the
    backward pass (``r_before`` is None where the NumPy kernel ran: its backward recovers it).

    On NumPy the Gram branch runs :func:`_mp_pursuit_np`: correlations updated through an
    int16 Gram matrix, each selection certified against the exact correlations, so the atoms
    are exact MP's (the float loop below can differ at near-ties below its rounding) and the
    coefficients ``<r, d_j>`` equal ``c_j`` to rounding.
    """
    W = sae.W_dec
    n, m = xc.shape[0], W.shape[0]
    r = xc
    steps = []
    js, cs = [], []
    positive = False  # MP-SAE codes are signed (bidirectional atoms), as in classical MP
    # correlations c = r @ W.T: recomputed each step, or updated through the Gram matrix
    # (C <- C - c_j G[j]) when that is cheaper (k * n > d_sae) and fits in memory
    # (MP_GRAM_MAX_BYTES); same atoms either way.
    use_gram = int(sae.k) * n > m and m * m * (xp.finfo(W.dtype).bits // 8) <= MP_GRAM_MAX_BYTES
    C = r @ W.T
    kern = get_kernel("sae_mp_pursuit", xp) if use_gram else None
    out = kern(C, xc, W, int(sae.k), sae.mp_tol) if kern is not None else None
    if out is not None:  # the loop below, fused per row, selections certified (NumPy: Numba)
        idx, vals, acts, r = out
        if record:
            steps = _MPSteps((idx[:, t], vals[:, t], None if acts is None else acts[:, t], None)
                             for t in range(int(sae.k)))
            steps.raw = (idx, vals, acts)  # for the fused backward pass
        return (_ks_dense_sum(idx, vals, m, xp) if dense else (idx, vals)), r, steps
    Gm = W @ W.T if use_gram else None
    for t in range(int(sae.k)):
        if t > 0 and not use_gram:
            C = r @ W.T
        j = xp.argmax(C if positive else xp.abs(C), axis=1)
        c_pre = xp.take_along_axis(C, j[:, None], axis=1)[:, 0]
        if sae.mp_tol is not None:
            active = xp.sum(r * r, axis=1) > sae.mp_tol
            c = xp.where(active, c_pre, xp.zeros_like(c_pre))
        else:
            active = None
            c = c_pre
        d = xp.take(W, j, axis=0)
        if record:
            steps.append((j, c, active, r))
        r = r - c[:, None] * d
        js.append(j)
        cs.append(c)
        if use_gram and t + 1 < int(sae.k):
            C = C - c[:, None] * xp.take(Gm, j, axis=0)
    idx, vals = xp.stack(js, axis=1), xp.stack(cs, axis=1)
    return (_ks_dense_sum(idx, vals, m, xp) if dense else (idx, vals)), r, steps


class _MPSteps(list):
    """The recorded pursuit steps, with the kernel's arrays they view in ``raw``."""

    raw = None


def _mp_backward(steps, r, W, d_sae, n, xp):
    """``(g_W_dec, g_r)`` of MP-SAE's loss ``||r||^2 / n`` through the recorded steps."""
    kern = get_kernel("sae_mp_backward", xp)
    if kern is not None and getattr(steps, "raw", None) is not None:
        return kern(steps.raw, r, W, d_sae, n)
    g_r = (2.0 / n) * r
    idx_all, rows_all = [], []
    r_next = r
    for j, c, active, r_t in reversed(steps):
        d = xp.take(W, j, axis=0)
        if r_t is None:  # not recorded (the NumPy pursuit kernel): recovered from the next one
            r_t = r_next + c[:, None] * d
        r_next = r_t
        g_c = -xp.sum(g_r * d, axis=1)
        if active is not None:
            g_c = xp.where(active, g_c, xp.zeros_like(g_c))
        idx_all.append(j)
        rows_all.append(-c[:, None] * g_r + g_c[:, None] * r_t)
        g_r = g_r + g_c[:, None] * d
    return _scatter_rows(xp.concat(idx_all), xp.concat(rows_all, axis=0), d_sae, xp), g_r


@register_kernel("sae_mp_backward", "numpy")
def _mp_backward_np(raw, r, W, d_sae, n):
    """The backward loop fused per row (Numba), the residuals recovered from the final one,
    each chunk of rows adding its ``W_dec`` rows into its own accumulator."""
    import numba

    idx, vals, acts = raw
    use_tol = acts is not None
    g_r = np.empty_like(r)
    nchunk = max(1, min(numba.get_num_threads(), n))
    acc = np.zeros((nchunk, d_sae, W.shape[1]), dtype=r.dtype)
    _nb().mp_backward(np.ascontiguousarray(W), idx, vals, acts if use_tol else np.empty((1, 1), dtype=np.bool_),
                      use_tol, np.ascontiguousarray(r), r.dtype.type(2.0 / n), g_r, acc)
    if nchunk == 1:
        return acc[0], g_r
    return _nb().sum_chunks(acc, np.empty((d_sae, W.shape[1]), dtype=r.dtype)), g_r


def _ks_code_stats(idx, vals, m, xp):
    """``(nonzeros, fired)`` of the codes given as (idx, vals) pairs (indices may repeat in a
    row: summed): the total count of nonzero entries and the (m,) mask of latents nonzero
    in some row, without forming the (n, m) codes where a kernel can."""
    kern = get_kernel("sae_ks_code_stats", xp)
    if kern is not None:
        return kern(idx, vals, m)
    return _nonzero_stats(_ks_dense_sum(idx, vals, m, xp), xp)


@register_kernel("sae_ks_code_stats", "numpy")
def _ks_code_stats_np(idx, vals, m):
    idx = np.ascontiguousarray(idx, dtype=np.int64)
    keep = _nb().ks_code_nonzero(idx, np.ascontiguousarray(vals), np.empty(idx.shape, dtype=np.bool_))
    fired = np.zeros(m, dtype=bool)
    fired[idx[keep]] = True
    return int(np.count_nonzero(keep)), fired


def _nonzero_stats(f, xp):
    """``(number of nonzero entries, (m,) mask of the latents nonzero in some row)`` of codes ``f``."""
    nz = f != 0
    return int(xp.sum(xp.astype(nz, xp.int64))), xp.any(nz, axis=0)


def _ks_dense_sum(idx, vals, m, xp):
    """Dense (n, m) codes from (idx, vals) pairs whose indices may repeat in a row (summed)."""
    kern = get_kernel("sae_ks_dense_sum", xp)
    if kern is not None:
        return kern(idx, vals, m)
    return _ks_dense(idx, vals, m, xp)  # the portable version adds every pair


@register_kernel("sae_mp_pursuit", "numpy")
def _mp_pursuit_np(C, xc, W, k, tol, n_checked=None):
    """The pursuit fused per row (Numba) through the int16-quantized Gram matrix, each
    selection certified against the exact correlations (:func:`_sae_numba.mp_gram_q`): the
    atoms of exact matching pursuit, coefficients ``<r, d_j>``. ``C`` (the correlations
    ``xc @ W.T``, a scratch the caller does not keep) is updated in place. None (the
    portable loop runs) for other dtypes or a non-finite or zero decoder."""
    if W.dtype not in (np.float32, np.float64) or xc.dtype != W.dtype or C.dtype != W.dtype:
        return None
    W = np.ascontiguousarray(W)
    quant = _quantized_gram(W)
    if quant is None:
        return None
    Gq, gstep, geps, wmax = quant
    n, d = xc.shape
    js = np.empty((n, k), dtype=np.int64)
    cs = np.empty((n, k), dtype=xc.dtype)
    act = np.empty((n, k), dtype=np.bool_)
    r = np.empty_like(xc)
    if n_checked is None:
        n_checked = np.empty(n, dtype=np.int64)
    use_tol = tol is not None
    u = float(np.finfo(W.dtype).eps) / 2
    C = np.ascontiguousarray(C)
    bits, mask = (np.int32, np.int32(0x7FFFFFFF)) if W.dtype == np.float32 else (np.int64, np.int64(2**63 - 1))
    BM = np.empty((n, -(-W.shape[0] // _nb()._BLOCK)), dtype=W.dtype)
    _nb().mp_gram_q(C, C.view(bits), mask, np.ascontiguousarray(xc), W, Gq, W.dtype.type(gstep), geps, wmax, u, k,
                    float(tol) if use_tol else 0.0, use_tol, js, cs, act, r, BM, BM.view(bits), n_checked)
    return js, cs, (act if use_tol else None), r


def _quantized_gram(W):
    """``(Gq, gstep, geps, wmax)``: the Gram matrix ``W @ W.T`` as int16 ``Gq`` (m, m) with
    ``|Gq * gstep - <w_i, w_j>| <= geps`` for every entry, and a bound ``wmax`` on the row
    norms; None if ``W`` has non-finite or only zero rows. BLAS syrk computes one triangle
    (half the multiply-adds of the product) into a buffer kept between calls (allocating
    85 MB afresh each step cost ~7 ms in page faults at d_sae 4608); Numba passes quantize
    and mirror it. The step is ``max ||w_i||^2 / 32767`` (Cauchy-Schwarz: no entry is
    larger), so ``geps`` is half a step plus the product's rounding: ~1.5e-5 for unit rows.
    ``Gq`` is the thread's buffer too: valid until the next call."""
    m, d = W.shape
    u = float(np.finfo(W.dtype).eps) / 2
    prod_rel = 2.0 * (d + 2) * u  # |fl(<w_i, w_j>) - <w_i, w_j>| <= ~d u ||w_i|| ||w_j||, x2
    if m >= 64:
        from scipy.linalg import blas

        syrk = blas.ssyrk if W.dtype == np.float32 else blas.dsyrk
        # W.T is (d, m) in Fortran order (no copy); syrk(trans=1) gives W @ W.T, upper
        # triangle, Fortran order, i.e. the lower triangle of its C-order transpose
        buf = _thread_buffer("gram", (m, m), W.dtype, "F")
        A = syrk(1.0, W.T, trans=1, lower=0, beta=0.0, c=buf, overwrite_c=1).T
    else:
        A = W @ W.T
    # the largest squared row norm, from the diagonal, bounded above for its rounding
    gmax = float(np.max(np.diagonal(A))) * (1.0 + prod_rel)
    if not np.isfinite(gmax) or gmax <= 0.0:
        return None
    prod_err = prod_rel * gmax
    scale = _nb()._QMAX / (gmax + prod_err)  # so that no computed entry needs clipping
    Gq = _thread_buffer("gram_q", (m, m), np.int16, "C")
    _nb().mirror_lower(_nb().quantize_lower(A, W.dtype.type(scale), Gq))
    gstep = 1.0 / scale
    geps = gstep * (0.5 + 2 * _nb()._QMAX * u) + prod_err  # rounding to the step, of A * scale, A's own
    return Gq, gstep, geps, math.sqrt(gmax)


_BUFFERS = threading.local()


def _thread_buffer(name, shape, dtype, order):
    """A scratch array of this thread kept between calls (replaced when the shape or dtype
    changes; :func:`release_buffers` drops them)."""
    bufs = _BUFFERS.__dict__.setdefault("arrays", {})
    a = bufs.get(name)
    if a is None or a.shape != shape or a.dtype != np.dtype(dtype) or not a.flags[order + "_CONTIGUOUS"]:
        bufs[name] = None  # free the old one first
        a = bufs[name] = np.empty(shape, dtype=dtype, order=order)
    return a


def release_buffers():
    """Drop this thread's scratch arrays (MP-SAE's Gram matrices: 6 m^2 bytes for d_sae m);
    :func:`train_sae` calls it when training ends."""
    _BUFFERS.__dict__.pop("arrays", None)


@register_kernel("sae_ks_dense_sum", "numpy")
def _ks_dense_sum_np(idx, vals, m):
    out = np.empty((vals.shape[0], m), dtype=vals.dtype)  # zeroed row by row in the kernel (Numba)
    return _nb().ks_dense_sum(np.ascontiguousarray(idx, dtype=np.int64), np.ascontiguousarray(vals), out)


def _lista_forward(sae, xc, xp, record=False):
    """``T`` unrolled (F)ISTA steps; returns the final codes and the per-step cache."""
    W_enc, b_enc, W_dec = sae.W_enc, sae.b_enc, sae.W_dec
    T = sae.lista_steps
    betas = _fista_betas(T) if sae.lista_fista else [0.0] * T
    zs = []  # outputs z_0 .. z_{T-1}
    cache = []
    for t in range(T):
        if t == 0:
            y = None
            e = xc
            u = xc @ W_enc + b_enc
        else:
            z1 = zs[t - 1]
            z0 = zs[t - 2] if t >= 2 else None
            y = z1 if betas[t] == 0.0 or z0 is None else z1 + betas[t] * (z1 - z0)
            if betas[t] != 0.0 and z0 is None:
                y = z1 + betas[t] * z1
            e = xc - _codes_matmul(y, W_dec, xp)
            u = e @ W_enc  # then + y + b_enc in place: (n, d_sae) passes without new arrays
            u += y
            u += b_enc
        z = _relu(u, xp)
        zs.append(z)
        if record:
            cache.append((y, e, u))
    return zs[-1], zs, cache, betas


def _encode_inference(sae, xc):
    """Inference codes from the centred input (no batch-dependent rule)."""
    xp = sae.xp
    arch = sae.architecture
    if arch == "mpsae":
        codes = _mp_inference(sae, xc, xp)
        return codes
    if arch == "lista":
        return _lista_forward(sae, xc, xp)[0]
    z = xc @ sae.W_enc + sae.b_enc
    if arch in ("relu", "relu_april"):
        return _relu(z, xp)
    if arch == "topk":
        return xp.where(_top_k_mask(z, sae.k, xp), _relu(z, xp), _zero(z, xp))
    if arch == "abstopk":
        return xp.where(_top_k_mask(xp.abs(z), sae.k, xp), z, _zero(z, xp))
    if arch == "jumprelu":
        thr = xp.exp(sae.params["log_threshold"])
        return xp.where(z > thr, z, _zero(z, xp))
    if arch == "batchtopk":
        if sae.batch_threshold is None:
            # untrained: fall back to per-row TopK (what BatchTopK approximates)
            return xp.where(_top_k_mask(z, sae.k, xp), _relu(z, xp), _zero(z, xp))
        thr = max(sae.batch_threshold, 0.0)
        return xp.where(z > thr, z, _zero(z, xp))
    if arch == "topafa":
        a = _relu(z, xp)
        return xp.where(_afa_mask(a, _row_norms(sae.W_dec, xp), xc, xp), a, _zero(a, xp))
    raise AssertionError(arch)


def _mp_inference(sae, xc, xp):
    """MP-SAE inference through the library's matching pursuit when it is available."""
    try:
        from .pursuits import matching_pursuit
    except ImportError:
        return _mp_forward(sae, xc, xp)[0]
    kwargs = {"n_nonzero": int(sae.k)}
    if sae.mp_tol is not None:
        kwargs["tol"] = sae.mp_tol
    try:
        return matching_pursuit(xc, sae.W_dec, **kwargs).codes
    except Exception:  # pragma: no cover - interface drift: keep the model usable
        return _mp_forward(sae, xc, xp)[0]


# =========================================================================== loss and gradient
def loss_and_grad(sae, X, *, penalty=None, aux_coefficient=0.0, dead_mask=None, k_aux=None,
                  afa_coefficient=0.0, aux_target=None, need_grad=True):
    """Training loss of ``sae`` on the batch ``X (n, d_in)`` and its gradient, by hand.

    ``penalty`` is ``lam`` of the L1/L0 family (defaults to ``sae.l1_coefficient``);
    ``aux_coefficient``, ``dead_mask`` (bool (d_sae,)) and ``k_aux`` drive AuxK for the TopK
    family; ``afa_coefficient`` weights the AFA loss of ``topafa``. The input is used as
    given (``input_scale`` is the caller's business). AuxK's target ``e = x - x_hat`` is a
    stop-gradient (no gradient flows through it, as in Gao et al.); ``aux_target`` (n, d_in)
    replaces it by a given constant, which makes the AuxK term an ordinary differentiable
    function of the parameters (used to check its gradient by finite differences).

    Returns ``(loss, grads, stats)``: ``loss`` a float; ``grads`` a dict with the same keys
    as ``sae.params`` (``None`` when ``need_grad`` is False); ``stats`` a dict with ``mse``,
    ``penalty_loss``, ``aux_loss``, ``afa_loss``, ``l0`` (mean active latents per row),
    ``sse`` and ``sst`` (sums for the FVU), ``fired`` (bool (d_sae,): latents active in the
    batch) and, for ``batchtopk``, ``min_kept`` (smallest kept activation).
    """
    xp = sae.xp
    arch = sae.architecture
    P = sae.params
    W_enc, b_enc, W_dec, b_dec = P["W_enc"], P["b_enc"], P["W_dec"], P["b_dec"]
    n = X.shape[0]
    dt = X.dtype
    lam = sae.l1_coefficient if penalty is None else float(penalty)
    if arch in PENALTY_ARCHITECTURES and lam is None:
        lam = 0.0
    zero = _zero(X, xp)
    xc = X - b_dec if sae.apply_b_dec_to_input else X
    stats = {"penalty_loss": 0.0, "aux_loss": 0.0, "afa_loss": 0.0}
    G = {key: None for key in P}
    g_xc_direct = None  # gradient reaching xc other than through z = xc @ W_enc
    g_Wdec_extra = None  # gradient on W_dec besides f.T @ g_xhat: g_Wdec_extra[j] * W_dec[j]

    # ------------------------------------------------------------- MP-SAE: its own path
    if arch == "mpsae":
        (idx, vals), r, steps = _mp_forward(sae, xc, xp, record=need_grad, dense=False)
        sse = float(xp.sum(r * r))
        loss = sse / n
        stats.update(_common_stats(None, X, sse, xp, nonzeros=_ks_code_stats(idx, vals, sae.d_sae, xp)))
        if not need_grad:
            return loss, None, stats
        G["W_dec"], g_r = _mp_backward(steps, r, W_dec, sae.d_sae, n, xp)
        G["W_enc"] = xp.zeros_like(W_enc)
        G["b_enc"] = xp.zeros_like(b_enc)
        G["b_dec"] = -xp.sum(g_r, axis=0) if sae.apply_b_dec_to_input else xp.zeros_like(b_dec)
        return loss, G, stats

    # ------------------------------------------------------------- LISTA: its own path
    if arch == "lista":
        f, zs, cache, betas = _lista_forward(sae, xc, xp, record=need_grad)
        Xh = _codes_matmul(f, W_dec, xp) + b_dec
        R = Xh - X
        sse = float(xp.sum(R * R))
        pen = lam * float(xp.sum(f)) / n
        stats["penalty_loss"] = pen
        stats.update(_common_stats(f, X, sse, xp))
        loss = sse / n + pen
        if not need_grad:
            return loss, None, stats
        g_xh = (2.0 / n) * R
        g_Wdec = _codes_tmatmul(f, g_xh, xp)
        g_bdec = xp.sum(g_xh, axis=0)
        T = len(zs)
        # Each step's gradient is needed only where its ReLU passes (u_t > 0): g_z[t] enters
        # nothing but g_u = g_z[t] * (u_t > 0). So the back-products into the codes are sampled
        # products on those patterns (entries elsewhere are left zero: never read), and the
        # products with g_u run on its pattern (sparse once the SAE is sparse).
        lays = [_layout(c[2] > 0, xp) for c in cache]
        W_encT = W_enc.T
        g_z = [None] * T
        lay = lays[T - 1]
        g_uv = lay.restrict_add(lay.sample(g_xh, W_dec), lam / n)
        g_Wenc = xp.zeros_like(W_enc)
        g_benc = xp.zeros_like(b_enc)
        g_xc = xp.zeros_like(xc)
        for t in range(T - 1, -1, -1):
            y, e, u = cache[t]
            lay = lays[t]
            if t < T - 1:
                if g_z[t] is None:
                    continue
                g_uv = lay.gather(g_z[t])
            g_benc = g_benc + lay.colsum(g_uv)
            g_Wenc = g_Wenc + lay.rtmatmul(g_uv, e)
            g_e = lay.decode(g_uv, W_encT)
            g_xc = g_xc + g_e
            if t > 0:
                beta = betas[t]
                two = beta != 0.0 and t >= 2  # FISTA: g_y also reaches z_{t-2}
                lay_y = lays[t - 1] if not two else _layout(
                    xp.logical_or(cache[t - 1][2] > 0, cache[t - 2][2] > 0), xp)
                if isinstance(lay_y, _DenseLayout):  # dense: no masking passes (never read)
                    g_y = lay.scatter(g_uv) - g_e @ W_dec.T
                else:  # g_u - g_e @ W_dec.T where it is read
                    g_y = lay_y.scatter(lay_y.gather(lay.scatter(g_uv)) - lay_y.sample(g_e, W_dec))
                g_Wdec = g_Wdec - _codes_tmatmul(y, g_e, xp)
                add1 = (1.0 + beta) * g_y if beta != 0.0 else g_y
                g_z[t - 1] = add1 if g_z[t - 1] is None else g_z[t - 1] + add1
                if two:
                    add0 = -beta * g_y
                    g_z[t - 2] = add0 if g_z[t - 2] is None else g_z[t - 2] + add0
        G.update(W_enc=g_Wenc, b_enc=g_benc, W_dec=g_Wdec,
                 b_dec=g_bdec - xp.sum(g_xc, axis=0) if sae.apply_b_dec_to_input else g_bdec)
        return loss, G, stats

    # ------------------------------------------------------------- fixed-k encoders (k-sparse path)
    if arch in ("topk", "abstopk"):
        return _loss_and_grad_ksparse(sae, X, xc, aux_coefficient, dead_mask, k_aux, aux_target, need_grad,
                                      stats, xp)

    # ------------------------------------------------------------- one-layer encoders
    # Codes live in a "layout" (see _DenseLayout): dense (n, d_sae) arrays in portable code, or
    # only the entries of one sparsity pattern (NumPy kernel, when few latents are active).
    # Every formula below is elementwise over those entries, so it reads the same either way.
    z = xc @ W_enc + b_enc
    if arch in ("relu", "relu_april", "jumprelu"):
        kern = get_kernel("sae_threshold_dense", xp)
        out = kern(sae, X, xc, z, lam, need_grad, stats) if kern is not None else None
        if out is not None:
            return out
    nu = None
    theta = None
    if arch == "relu" or arch == "relu_april":
        active = z > 0
    elif arch == "batchtopk":
        a = _relu(z, xp)
        active = xp.logical_and(_batch_top_k_mask(a, min(sae.k * n, n * sae.d_sae), xp), z > 0)
    elif arch == "jumprelu":
        theta = xp.exp(P["log_threshold"])
        active = z > theta
    elif arch == "topafa":
        nu = _row_norms(W_dec, xp)
        kern = get_kernel("sae_afa_layout", xp)
        afa_lay = kern(z, nu, xc) if kern is not None else None
        if afa_lay is None:
            active = xp.logical_and(_afa_mask(_relu(z, xp), nu, xc, xp), z > 0)
    else:  # pragma: no cover
        raise AssertionError(arch)
    band = None
    if arch == "topafa" and afa_lay is not None:  # the selection built the pattern (NumPy kernel)
        lay, zv = afa_lay
        actv = xp.ones(zv.shape, dtype=xp.bool)
        fv = zv
    else:
        if arch == "jumprelu" and need_grad:
            band = xp.abs(z - theta) < sae.bandwidth / 2
            lay = _layout(xp.logical_or(active, band), xp)
        else:
            lay = _layout(active, xp)
        zv = lay.gather(z)
        actv = lay.gather_bool(active)
        fv = xp.where(actv, zv, _zero(zv, xp))
    Xh = lay.decode(fv, W_dec) + b_dec
    R = Xh - X
    sse = float(xp.sum(R * R))
    loss = sse / n
    nzv = fv != 0
    stats.update(mse=sse / n, sse=sse, sst=float(xp.sum((X - xp.mean(X, axis=0)) ** 2)),
                 l0=float(xp.sum(xp.astype(nzv, xp.int64))) / n, fired=lay.colsum(xp.astype(nzv, dt)) > 0)
    if arch == "batchtopk":
        n_act = int(xp.sum(xp.astype(actv, xp.int64)))
        stats["min_kept"] = float(xp.min(xp.where(actv, zv, xp.full_like(zv, float("inf"))))) if n_act else 0.0

    # penalties (value; their gradients are added below)
    if arch == "relu":
        pen = lam * float(xp.sum(fv)) / n
    elif arch == "relu_april":
        nu = _row_norms(W_dec, xp)
        pen = lam * float(xp.sum(lay.colsum(fv) * nu)) / n
    elif arch == "jumprelu":
        pen = lam * float(xp.sum(xp.astype(actv, dt))) / n
    else:
        pen = 0.0
    stats["penalty_loss"] = pen
    loss += pen

    afa = None
    if arch == "topafa" and afa_coefficient:
        A_norm = xp.sqrt(lay.rowsum((fv * lay.col(nu)) ** 2))
        B_norm = xp.sqrt(xp.sum(xc * xc, axis=1))
        diff = A_norm - B_norm
        afa = float(afa_coefficient) * float(xp.sum(diff * diff)) / n
        stats["afa_loss"] = afa
        loss += afa

    aux = None
    use_aux = (arch in AUXK_ARCHITECTURES and aux_coefficient and dead_mask is not None
               and bool(xp.any(dead_mask)))
    if use_aux:
        ka = k_aux if k_aux is not None else max(sae.d_in // 2, 1)
        E = -R if aux_target is None else aux_target  # x - x_hat, held fixed
        aux, aux_cache = _auxk_forward(z, dead_mask, ka, False, W_dec, E, aux_coefficient, xp)
        stats["aux_loss"] = aux
        loss += aux

    if not need_grad:
        return loss, None, stats

    g_xh = (2.0 / n) * R
    g_Wdec = lay.tmatmul(fv, g_xh)
    g_bdec = xp.sum(g_xh, axis=0)
    g_fv = lay.sample(g_xh, W_dec)  # d MSE / d f at the layout's entries
    zero_v = _zero(g_fv, xp)
    if arch == "jumprelu":
        eps = sae.bandwidth
        kern = xp.astype(lay.gather_bool(band), dt)
        g_zv = xp.where(actv, g_fv, zero_v)
        # pseudo-derivatives: d f / d theta = -(theta/eps) K, d H / d theta = -(1/eps) K
        g_theta = -(theta / eps) * lay.colsum(g_fv * kern) - (lam / (n * eps)) * lay.colsum(kern)
        G["log_threshold"] = g_theta * theta
    else:
        if arch == "relu":
            g_fv = g_fv + lam / n
        elif arch == "relu_april":
            g_fv = g_fv + (lam / n) * lay.col(nu)
            g_nu = (lam / n) * lay.colsum(fv)
            g_Wdec_extra = g_nu / xp.where(nu > 0, nu, xp.ones_like(nu))
        if afa is not None:
            safeA = xp.where(A_norm > 0, A_norm, xp.ones_like(A_norm))
            safeB = xp.where(B_norm > 0, B_norm, xp.ones_like(B_norm))
            coef = (2.0 * float(afa_coefficient) / n) * diff
            coefA = xp.where(A_norm > 0, coef / safeA, xp.zeros_like(coef))
            g_fv = g_fv + lay.row(coefA) * fv * lay.col(nu * nu)
            g_nu = lay.colsum(lay.row(coefA) * fv * fv) * nu
            extra = g_nu / xp.where(nu > 0, nu, xp.ones_like(nu))
            g_Wdec_extra = extra if g_Wdec_extra is None else g_Wdec_extra + extra
            coefB = xp.where(B_norm > 0, -coef / safeB, xp.zeros_like(coef))
            g_xc_direct = coefB[:, None] * xc
        g_zv = xp.where(actv, g_fv, zero_v)
    g_Wenc = lay.rtmatmul(g_zv, xc)
    g_benc = lay.colsum(g_zv)
    if aux is not None:
        g_Wdec, g_Wenc, g_benc = _auxk_backward(aux_cache, dead_mask, xc, aux_coefficient, False, g_Wdec, g_Wenc,
                                                g_benc, xp)
    if g_Wdec_extra is not None:  # d nu_j / d W_dec[j] = W_dec[j] / nu_j
        g_Wdec = _add_scaled_rows(g_Wdec, g_Wdec_extra, W_dec, xp)
    G["W_enc"] = g_Wenc
    G["b_enc"] = g_benc
    G["W_dec"] = g_Wdec
    if sae.apply_b_dec_to_input:
        g_bdec = g_bdec - g_benc @ W_enc.T  # = - sum_i (g_z_i @ W_enc.T), summed before the product
        if g_xc_direct is not None:
            g_bdec = g_bdec - xp.sum(g_xc_direct, axis=0)
    G["b_dec"] = g_bdec
    return loss, G, stats


@register_kernel("sae_threshold_dense", "numpy")
def _threshold_dense_np(sae, X, xc, z, lam, need_grad, stats):
    """ReLU, ReLU (April) and JumpReLU with dense codes: the one-layer path of
    :func:`loss_and_grad` with its ~20 elementwise passes over ``(n, d_sae)`` (masks, gathers,
    counts, column sums) fused into one Numba pass forward and one backward. ``None`` (the
    caller goes on with the layouts) when the codes look sparse: the first rows are checked,
    and the pattern kernels take over below twice ``_SPARSE_DENSITY``."""
    P = sae.params
    W_enc, W_dec, b_dec = P["W_enc"], P["W_dec"], P["b_dec"]
    arch = sae.architecture
    n, m = z.shape
    dt = z.dtype
    jump = arch == "jumprelu"
    thr = np.exp(P["log_threshold"]) if jump else np.zeros(m, dtype=dt)
    half_bw = dt.type(sae.bandwidth / 2) if (jump and need_grad) else dt.type(0.0)
    head = z[: min(n, 64)]
    dense = head > thr
    if half_bw > 0:
        dense |= np.abs(head - thr) < half_bw
    if np.count_nonzero(dense) <= 2 * _SPARSE_DENSITY * dense.size:
        return None
    nb_ = _nb()
    nblk = max(1, min(n, 32))
    cnt = np.zeros((nblk, m), dtype=np.int64)
    fsum = np.zeros((nblk, m), dtype=np.float64)
    band = np.zeros((nblk, m), dtype=np.int64)
    f = nb_.threshold_forward(np.ascontiguousarray(z), thr, half_bw, np.empty_like(z), cnt, fsum, band)
    cnt = cnt.sum(axis=0)
    fcol = fsum.sum(axis=0)
    Xh = f @ W_dec + b_dec
    R = Xh - X
    sse = float(np.sum(R * R))
    n_act = int(cnt.sum())
    stats.update(mse=sse / n, sse=sse, sst=float(np.sum((X - np.mean(X, axis=0)) ** 2)), l0=n_act / n,
                 fired=cnt > 0)
    nu = None
    if arch == "relu":
        pen = lam * float(fcol.sum()) / n
    elif arch == "relu_april":
        nu = _row_norms(W_dec, np)
        pen = lam * float(np.sum(fcol.astype(dt) * nu)) / n
    else:
        pen = lam * n_act / n
    stats["penalty_loss"] = pen
    loss = sse / n + pen
    if not need_grad:
        return loss, None, stats
    G = {key: None for key in P}
    g_xh = (2.0 / n) * R
    g_Wdec = f.T @ g_xh
    g_bdec = np.sum(g_xh, axis=0)
    g = g_xh @ W_dec.T  # d MSE / d f, overwritten by d loss / d z
    if arch == "relu":
        add = np.full(m, lam / n, dtype=dt)
    elif arch == "relu_april":
        add = ((lam / n) * nu).astype(dt, copy=False)
        g_nu = ((lam / n) * fcol).astype(dt)
        g_Wdec = g_Wdec + (g_nu / np.where(nu > 0, nu, 1))[:, None] * W_dec
    else:
        add = np.zeros(m, dtype=dt)
    gsum = np.zeros((nblk, m), dtype=np.float64)
    gband = np.zeros((nblk, m), dtype=np.float64)
    g = nb_.threshold_backward(g, z, thr, add, half_bw, gsum, gband)
    g_benc = gsum.sum(axis=0).astype(dt)
    if jump:
        eps = sae.bandwidth
        g_theta = (-(thr / eps) * gband.sum(axis=0).astype(dt)
                   - (lam / (n * eps)) * band.sum(axis=0).astype(dt))
        G["log_threshold"] = (g_theta * thr).astype(dt, copy=False)
    G["W_enc"] = xc.T @ g
    G["b_enc"] = g_benc
    G["W_dec"] = g_Wdec
    if sae.apply_b_dec_to_input:
        g_bdec = g_bdec - g_benc @ W_enc.T
    G["b_dec"] = g_bdec
    return loss, G, stats


def _loss_and_grad_ksparse(sae, X, xc, aux_coefficient, dead_mask, k_aux, aux_target, need_grad, stats, xp):
    """TopK / AbsTopK loss (MSE + AuxK) and gradient with codes kept as (idx, vals) pairs."""
    P = sae.params
    W_enc, b_enc, W_dec, b_dec = P["W_enc"], P["b_enc"], P["W_dec"], P["b_dec"]
    n, m = X.shape[0], sae.d_sae
    signed = sae.architecture == "abstopk"
    z = xc @ W_enc + b_enc
    k = min(int(sae.k), m)
    idx = _topk_indices(xp.abs(z) if signed else z, k, xp)
    v_pre = xp.take_along_axis(z, idx, axis=1)
    vals = v_pre if signed else _relu(v_pre, xp)
    Xh = _ks_decode(idx, vals, W_dec, xp) + b_dec
    R = Xh - X
    sse = float(xp.sum(R * R))
    loss = sse / n
    nz = vals != 0
    sst = float(xp.sum((X - xp.mean(X, axis=0)) ** 2))
    fired = _ks_colsum(idx, xp.astype(nz, X.dtype), m, xp) > 0
    stats.update(mse=sse / n, sse=sse, sst=sst, l0=float(xp.sum(xp.astype(nz, xp.int64))) / n, fired=fired)

    aux = None
    if aux_coefficient and dead_mask is not None and bool(xp.any(dead_mask)):
        ka = k_aux if k_aux is not None else max(sae.d_in // 2, 1)
        E = -R if aux_target is None else aux_target  # x - x_hat, held fixed
        aux, aux_cache = _auxk_forward(z, dead_mask, ka, signed, W_dec, E, aux_coefficient, xp)
        stats["aux_loss"] = aux
        loss += aux
    if not need_grad:
        return loss, None, stats

    g_xh = (2.0 / n) * R
    g_Wdec = _ks_tmatmul(idx, vals, g_xh, m, xp)
    g_v = _ks_sample(idx, g_xh, W_dec, xp)
    if not signed:
        g_v = xp.where(v_pre > 0, g_v, _zero(g_v, xp))
    g_Wenc = _ks_rtmatmul(idx, g_v, xc, m, xp)
    g_benc = _ks_colsum(idx, g_v, m, xp)
    if aux is not None:
        g_Wdec, g_Wenc, g_benc = _auxk_backward(aux_cache, dead_mask, xc, aux_coefficient, signed, g_Wdec, g_Wenc,
                                                g_benc, xp)
    g_bdec = xp.sum(g_xh, axis=0)
    if sae.apply_b_dec_to_input:
        g_bdec = g_bdec - g_benc @ W_enc.T
    G = {"W_enc": g_Wenc, "b_enc": g_benc, "W_dec": g_Wdec, "b_dec": g_bdec}
    return loss, G, stats


def _common_stats(f, X, sse, xp, nonzeros=None):
    """Loss statistics; ``nonzeros``: ``(count, fired)`` of the codes when the caller has them
    without ``f`` (MP-SAE's (index, value) pairs)."""
    n = X.shape[0]
    if nonzeros is None:
        nonzeros = _nonzero_stats(f, xp)
    sst = float(xp.sum((X - xp.mean(X, axis=0)) ** 2))
    return {
        "mse": sse / n,
        "sse": sse,
        "sst": sst,
        "l0": float(nonzeros[0]) / n,
        "fired": nonzeros[1],
    }


# =========================================================================== save / load
def save_sae(sae, folder):
    """Write ``sae`` to ``folder`` in SAELens' layout; returns the folder path.

    ``cfg.json`` holds SAELens' keys (``d_in``, ``d_sae``, ``dtype``, ``device``,
    ``architecture``, ``apply_b_dec_to_input``, ``normalize_activations``,
    ``reshape_activations``, ``k`` for TopK, and ``metadata`` with ``sae_lens_version``
    >= 6.0.0) plus a ``sparsecode`` block that restores our exact architecture and options.
    ``sae_weights.safetensors`` holds ``W_enc``, ``W_dec``, ``b_enc``, ``b_dec`` and, for
    JumpReLU and BatchTopK (saved as SAELens' ``jumprelu``), ``threshold``.

    ``input_scale`` is folded into the weights (``W_enc * s``, ``W_dec / s``, ``b_dec / s``),
    which is exact for every encoder except MP-SAE (whose pursuit assumes unit-norm rows):
    there the scale is kept in the ``sparsecode`` block.
    """
    from safetensors.numpy import save_file

    os.makedirs(folder, exist_ok=True)
    s = sae.input_scale
    fold = s != 1.0 and sae.architecture != "mpsae"
    W_enc = to_numpy(sae.W_enc)
    W_dec = to_numpy(sae.W_dec)
    b_dec = to_numpy(sae.b_dec)
    if fold:
        W_enc, W_dec, b_dec = W_enc * s, W_dec / s, b_dec / s
    tensors = {"W_enc": W_enc, "W_dec": W_dec, "b_enc": to_numpy(sae.b_enc), "b_dec": b_dec}
    thr = sae.threshold
    if thr is not None:
        tensors["threshold"] = to_numpy(thr)
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    arch = sae.architecture
    cfg = {
        "architecture": _SAELENS_ARCH.get(arch) or arch,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": _dtype_name(sae.dtype),
        "device": "cpu",
        "apply_b_dec_to_input": sae.apply_b_dec_to_input,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": SAELENS_VERSION,
            "sae_lens_training_version": SAELENS_VERSION,
            **{key: sae.metadata.get(key) for key in ("model_name", "hook_name", "hook_layer", "context_size",
                                                         "dataset_path", "prepend_bos") if key in sae.metadata},
        },
        "sparsecode": {
            "format": SPARSECODE_SAE_FORMAT,
            "architecture": arch,
            "k": sae.k,
            "l1_coefficient": sae.l1_coefficient,
            "bandwidth": sae.bandwidth,
            "batch_threshold": sae.batch_threshold,
            "lista_steps": sae.lista_steps,
            "lista_fista": sae.lista_fista,
            "mp_tol": sae.mp_tol,
            "input_scale": 1.0 if fold else s,
            "extra_metadata": _jsonable(sae.metadata),
        },
    }
    if arch == "topk" or arch == "batchtopk":
        cfg["k"] = sae.k
    tmp_w = os.path.join(folder, "sae_weights.safetensors.tmp")
    save_file(tensors, tmp_w)
    os.replace(tmp_w, os.path.join(folder, "sae_weights.safetensors"))
    tmp_c = os.path.join(folder, "cfg.json.tmp")
    with open(tmp_c, "w") as fh:
        json.dump(cfg, fh, indent=2)
    os.replace(tmp_c, os.path.join(folder, "cfg.json"))
    return folder


def _jsonable(d):
    out = {}
    for k, v in d.items():
        try:
            json.dumps(v)
            out[k] = v
        except TypeError:
            out[k] = str(v)
    return out


def load_sae(folder, *, like=None):
    """Read an SAE from ``folder``: our/SAELens layout (``cfg.json`` + ``sae_weights.safetensors``)
    or sparsify's (``cfg.json`` + ``sae.safetensors`` with ``encoder.weight (d_sae, d_in)``,
    ``encoder.bias``, ``W_dec``, ``b_dec``, and ``k`` in the config)."""
    from safetensors.numpy import load_file

    if not isinstance(folder, (str, os.PathLike)):
        raise TypeError(f"folder must be a path, got {type(folder).__name__}")
    folder = os.fspath(folder)
    cfg_path = os.path.join(folder, "cfg.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"no cfg.json in {folder!r}: not a saved SAE")
    with open(cfg_path) as fh:
        cfg = json.load(fh)
    ref = like
    conv = (lambda a: a) if ref is None else (lambda a: asarray_like(a, ref, dtype=ref.dtype))
    if os.path.isfile(os.path.join(folder, "sae.safetensors")):
        return _load_sparsify(folder, cfg, conv)
    wpath = os.path.join(folder, "sae_weights.safetensors")
    if not os.path.isfile(wpath):
        raise FileNotFoundError(f"no sae_weights.safetensors (SAELens) or sae.safetensors (sparsify) in {folder!r}")
    T = load_file(wpath)
    for key in ("W_enc", "W_dec", "b_enc", "b_dec"):
        if key not in T:
            raise ValueError(f"{wpath} has no tensor {key!r}: not an SAE in SAELens' layout")
    sc = cfg.get("sparsecode") or {}
    if sc:
        arch = sc["architecture"]
    else:
        a = cfg.get("architecture", "standard")
        if a not in ("standard", "topk", "jumprelu", "batchtopk"):
            raise ValueError(f"SAELens architecture {a!r} is not supported (standard, topk, jumprelu, batchtopk)")
        arch = {"standard": "relu"}.get(a, a)
    d_in, d_sae = int(cfg["d_in"]), int(cfg["d_sae"])
    if tuple(T["W_dec"].shape) != (d_sae, d_in):
        raise ValueError(f"W_dec has shape {T['W_dec'].shape} but cfg.json says (d_sae, d_in) = ({d_sae}, {d_in})")
    log_thr = None
    batch_thr = sc.get("batch_threshold")
    if arch == "jumprelu":
        if "threshold" not in T:
            raise ValueError("a JumpReLU SAE needs a 'threshold' tensor")
        log_thr = conv(np.log(np.maximum(T["threshold"], np.finfo(T["threshold"].dtype).tiny)))
    if arch == "batchtopk" and batch_thr is None and "threshold" in T:
        batch_thr = float(np.mean(T["threshold"]))
    k = sc.get("k", cfg.get("k"))
    meta = dict(sc.get("extra_metadata") or {})
    for key, v in (cfg.get("metadata") or cfg.get("meta") or {}).items():
        meta.setdefault(key, v)
    return SparseAutoencoder(
        conv(T["W_enc"]), conv(T["b_enc"]), conv(T["W_dec"]), conv(T["b_dec"]), architecture=arch,
        k=None if k is None else int(k), log_threshold=log_thr, l1_coefficient=sc.get("l1_coefficient"),
        bandwidth=sc.get("bandwidth", 0.001), batch_threshold=batch_thr, lista_steps=sc.get("lista_steps", 3),
        lista_fista=sc.get("lista_fista", False), mp_tol=sc.get("mp_tol"), input_scale=sc.get("input_scale", 1.0),
        apply_b_dec_to_input=cfg.get("apply_b_dec_to_input", True), metadata=meta,
    )


def _load_sparsify(folder, cfg, conv):
    from safetensors.numpy import load_file

    T = load_file(os.path.join(folder, "sae.safetensors"))
    for key in ("encoder.weight", "encoder.bias", "W_dec", "b_dec"):
        if key not in T:
            raise ValueError(f"sparsify checkpoint in {folder!r} has no tensor {key!r}")
    if "k" not in cfg:
        raise ValueError(f"sparsify cfg.json in {folder!r} has no 'k'")
    enc = T["encoder.weight"]
    d_sae, d_in = enc.shape
    if tuple(T["W_dec"].shape) != (d_sae, d_in):
        raise ValueError(f"W_dec has shape {T['W_dec'].shape}, expected ({d_sae}, {d_in}) from encoder.weight")
    return SparseAutoencoder(conv(np.ascontiguousarray(enc.T)), conv(T["encoder.bias"]), conv(T["W_dec"]),
                             conv(T["b_dec"]), architecture="topk", k=int(cfg["k"]),
                             metadata={"source": "sparsify", **{k: v for k, v in cfg.items() if k != "k"}})


# =========================================================================== amortization gap
def amortization_gap(sae, X, *, method=None, alpha=None, n_nonzero=None, max_iter=2000, tol=1e-6,
                     warm_start=True):
    """How far the SAE's amortized codes are from a proper solve on its own decoder.

    The dictionary is ``W_dec`` and the signals the centred inputs ``xc = x * input_scale -
    b_dec`` (the SAE decodes ``f @ W_dec + b_dec``). For the L1 family (``relu``,
    ``relu_april``, ``lista``) the problem is the SAE's own objective, the non-negative Lasso
    ``0.5 ||xc - a @ W_dec||^2 + alpha . |a|`` with ``alpha = lam / 2`` (per latent
    ``lam ||d_j|| / 2`` for ``relu_april``), solved by FISTA (``method="fista"``). For the
    others the problem is ``min ||xc - a @ W_dec||^2`` with ``||a||_0 <= k`` (``k`` the SAE's, or
    the rounded mean L0 of its codes for JumpReLU, BatchTopK and top-AFA), solved by OMP
    (``method="omp"``, default) or IHT (``"iht"``), non-negative when the SAE's codes are.
    OMP is greedy and can end above the encoder (a negative gap: the L0 problem is NP-hard
    and OMP only a heuristic for it); IHT with ``warm_start`` starts from the SAE's own codes
    (their ``n_nonzero`` largest entries) and never increases the objective from there, so
    for TopK (exactly ``k`` codes) its gap is >= 0.

    Returns a dict: ``method``, ``alpha`` or ``n_nonzero``, ``sae_fvu``, ``solver_fvu``,
    ``sae_l0``, ``solver_l0``, ``sae_objective`` and ``solver_objective`` (means over rows of
    the per-row objective above), ``objective_gap`` (their difference; >= 0 up to the solver's
    tolerance) and ``relative_gap`` (gap / SAE objective), and ``solver_result``.
    """
    if not isinstance(sae, SparseAutoencoder):
        raise TypeError(f"sae must be a SparseAutoencoder, got {type(sae).__name__}")
    X2, _ = sae._check_input(X)
    xp = sae.xp
    xc = X2 * sae.input_scale - sae.b_dec
    W = sae.W_dec
    F = _encode_inference(sae, sae._centre(X2))
    arch = sae.architecture
    l1_family = arch in ("relu", "relu_april", "lista")
    if method is None:
        method = "fista" if l1_family else "omp"
    if method not in ("fista", "omp", "iht"):
        raise ValueError(f"method must be 'fista', 'omp' or 'iht', got {method!r}")
    sst = float(xp.sum((xc - xp.mean(xc, axis=0)) ** 2))
    positive = arch in POSITIVE_ARCHITECTURES
    out = {"method": method, "architecture": arch}
    R_sae = xc - _codes_matmul(F, W, xp)
    l0_sae = float(xp.sum(xp.astype(F != 0, xp.int64))) / X2.shape[0]
    if method == "fista":
        from .lasso import fista

        if alpha is None:
            if sae.l1_coefficient is None:
                raise ValueError("alpha not given and the SAE has no l1_coefficient: pass alpha")
            alpha = sae.l1_coefficient / 2.0
            if arch == "relu_april":
                alpha = alpha * _row_norms(W, xp)
        res = fista(xc, W, alpha, positive=positive, max_iter=max_iter, tol=tol, restart="gradient")
        A = res.codes
        a_vec = alpha if isinstance(alpha, float) else alpha[None, :]
        obj_sae = 0.5 * xp.sum(R_sae * R_sae, axis=1) + xp.sum(xp.abs(F) * a_vec, axis=1)
        R_sol = xc - A @ W
        obj_sol = 0.5 * xp.sum(R_sol * R_sol, axis=1) + xp.sum(xp.abs(A) * a_vec, axis=1)
        out["alpha"] = alpha if isinstance(alpha, float) else to_numpy(alpha)
        out["solver_max_relative_gap"] = float(xp.max(res.relative_gap))
    else:
        from . import pursuits

        if n_nonzero is None:
            n_nonzero = sae.k if arch in ("topk", "abstopk", "mpsae") else max(1, int(round(l0_sae)))
        n_nonzero = check_scalar(n_nonzero, "n_nonzero", low=1, integer=True)
        if method == "omp":
            res = pursuits.omp(xc, W, n_nonzero=n_nonzero, positive=positive)
        else:
            res = pursuits.iht(xc, W, n_nonzero, positive=positive, init=F if warm_start else None,
                               max_iter=max_iter, tol=tol)
        A = res.codes
        R_sol = xc - A @ W
        obj_sae = xp.sum(R_sae * R_sae, axis=1)
        obj_sol = xp.sum(R_sol * R_sol, axis=1)
        out["n_nonzero"] = n_nonzero
    s_obj, o_obj = float(xp.mean(obj_sae)), float(xp.mean(obj_sol))
    out.update(
        sae_fvu=float(xp.sum(R_sae * R_sae)) / sst if sst > 0 else float("nan"),
        solver_fvu=float(xp.sum(R_sol * R_sol)) / sst if sst > 0 else float("nan"),
        sae_l0=l0_sae,
        solver_l0=float(xp.sum(xp.astype(A != 0, xp.int64))) / X2.shape[0],
        sae_objective=s_obj,
        solver_objective=o_obj,
        objective_gap=s_obj - o_obj,
        relative_gap=(s_obj - o_obj) / s_obj if s_obj > 0 else 0.0,
        solver_result=res,
    )
    return out


# =========================================================================== `sparsecode encode`
def configure_parser(parser):
    """Options of ``sparsecode encode``."""
    parser.add_argument("store", help="activation store: an extraction folder or a .npy/.npz/.safetensors file")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--sae", help="folder of a saved SAE (ours, SAELens or sparsify)")
    src.add_argument("--dictionary", help=".npy file of a dictionary (n_atoms, d_in) for a solver")
    parser.add_argument("--method", default="fista", choices=["fista", "ista", "mp", "omp", "iht"],
                        help="solver used with --dictionary (default fista)")
    parser.add_argument("--alpha", type=float, default=None, help="Lasso penalty for fista/ista")
    parser.add_argument("--k", type=int, default=None, help="non-zeros per row for mp/omp/iht")
    parser.add_argument("--out", required=True, help="output .npz (sparse CSR codes, scipy.sparse.save_npz)")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--max-rows", type=int, default=None, help="encode at most this many rows")
    parser.add_argument("--split", default="all", choices=["all", "train", "holdout"])


def run_cli(args) -> int:
    """``sparsecode encode``: codes of every row of a store, written as a sparse matrix."""
    import scipy.sparse as sp

    from .store import ActivationStore

    store = ActivationStore(args.store if os.path.isdir(args.store) else [args.store])
    if args.sae:
        sae = load_sae(args.sae)
        dtype = np.dtype(_dtype_name(sae.dtype))

        def enc(B):
            return to_numpy(sae.encode(np.asarray(B, dtype=dtype))), to_numpy(sae.forward(np.asarray(B, dtype=dtype)))
    else:
        from .encode import get_solver

        D = np.load(args.dictionary)
        opts = {}
        if args.method in ("fista", "ista"):
            if args.alpha is None:
                print("sparsecode encode: --alpha is needed with --method fista/ista", flush=True)
                return 2
            opts["alpha"] = args.alpha
        else:
            if args.k is None:
                print("sparsecode encode: --k is needed with --method mp/omp/iht", flush=True)
                return 2
            opts["n_nonzero"] = args.k
        solver = get_solver(args.method)

        def enc(B):
            B = np.asarray(B, dtype=D.dtype)
            A = to_numpy(solver(B, D, **opts).codes)
            return A, A @ D
    parts, sse, n_rows, l0 = [], 0.0, 0, 0
    sum_x, sum_x2 = 0.0, 0.0
    for B in store.iter_batches(args.batch_size, shuffle=False, split=args.split):
        B = to_numpy(B)
        if args.max_rows is not None and n_rows >= args.max_rows:
            break
        if args.max_rows is not None:
            B = B[: args.max_rows - n_rows]
        A, Xh = enc(B)
        sse += float(np.sum((B - Xh) ** 2))
        sum_x = sum_x + B.sum(axis=0, dtype=np.float64)
        sum_x2 += float(np.sum(B.astype(np.float64) ** 2))
        parts.append(sp.csr_matrix(A))
        l0 += int(np.count_nonzero(A))
        n_rows += B.shape[0]
    if not parts:
        print("sparsecode encode: the store yielded no rows", flush=True)
        return 1
    codes = sp.vstack(parts).tocsr()
    sp.save_npz(args.out, codes)
    sst = sum_x2 - float(np.sum(np.asarray(sum_x) ** 2)) / n_rows
    print(f"encoded {n_rows} rows -> {args.out}: L0 {l0 / n_rows:.2f}, FVU {sse / sst if sst > 0 else float('nan'):.4f}")
    return 0


# train_sae lives in sae_train (optimiser, data stream, checkpoints); re-exported here.
from .sae_train import train_sae  # noqa: E402
