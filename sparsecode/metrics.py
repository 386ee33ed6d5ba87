"""Metrics for sparse codes, dictionaries and sparse autoencoders, on any array backend.

Notation: ``X`` is (n_samples, n_features), codes ``A`` are (n_samples, n_atoms), the
dictionary (or SAE decoder ``W_dec``) ``D`` is (n_atoms, n_features), one atom per row, and a
reconstruction is ``X_hat = A @ D`` (plus ``b_dec`` for an SAE).

Reconstruction
    :func:`fvu` - fraction of variance unexplained,
    ``sum_ij (X_ij - Xhat_ij)^2 / sum_ij (X_ij - mean_i X_ij)^2`` with the variance taken
    about the per-feature mean over samples (not about zero: activations of language
    models have a large mean, and measuring against ``sum X^2`` flatters every model).
    :class:`FVUAccumulator` computes the same number over a stream of batches, in float64.
Sparsity
    :func:`l0` - mean number of active latents per sample, ``mean_n #{j : |A_nj| > t}``.
    :func:`firing_frequency` - per atom, ``p_j = #{n : |A_nj| > t} / n_samples``.
    :func:`dead_fraction` - ``#{j : p_j <= p_dead} / n_atoms`` (dead: never fires).
    :func:`dense_fraction` - ``#{j : p_j > p_dense} / n_atoms`` (dense: fires on > 10%).
    :func:`feature_density` - histogram of ``log10 p_j`` over the atoms that fire.
    :class:`SparsityAccumulator` computes all of them over a stream of code batches.
Dictionaries
    :func:`cosine_matrix` - ``C_ij = <a_i, b_j> / (||a_i|| ||b_j||)``.
    :func:`max_cosines` / :func:`mmcs` - per atom of ``D_a``, the best |cosine| with any atom
    of ``D_b``; MMCS is its mean (mean max cosine similarity, Sharkey et al. 2022).
    :func:`hungarian_match` - one-to-one matching maximising ``sum |C_ij|`` (Hungarian
    algorithm, ``scipy.optimize.linear_sum_assignment``), for dictionaries of any two sizes.
    :func:`feature_splitting` - for two sizes, which small-dictionary atom each
    large-dictionary atom is closest to, and how many children each small atom has.
    :func:`coherence` - ``max`` and ``mean`` over ``i != j`` of ``|C_ij|`` for ``C`` the
    cosine matrix of ``D`` with itself.
    :func:`afa_ratio` - the AFA check of quasi-orthogonality: per sample
    ``||A_n * r||_2 / ||x_n - b||_2`` with ``r_j = ||d_j||`` the atom norms. If the atoms
    were orthogonal and ``x_n - b = A_n @ D`` exactly, the ratio would be exactly 1; a
    quasi-orthogonal dictionary gives values close to 1.

An all-zero atom (a dead dictionary element) has cosine 0 with every atom.
Scalars come back as Python floats, per-atom or per-sample arrays in the input's namespace.
"""

from __future__ import annotations

import math

import numpy as np

from .backend import array_namespace, check_array, check_scalar, to_numpy

__all__ = [
    "fvu",
    "FVUAccumulator",
    "l0",
    "firing_frequency",
    "dead_fraction",
    "dense_fraction",
    "feature_density",
    "SparsityAccumulator",
    "cosine_matrix",
    "max_cosines",
    "mmcs",
    "hungarian_match",
    "feature_splitting",
    "coherence",
    "afa_ratio",
]


# --------------------------------------------------------------------------- helpers
def _pair(X, Y, nx, ny, *, ndim=2):
    xp = array_namespace(X, Y, names=(nx, ny))
    X = check_array(X, nx, ndim=ndim, xp=xp)
    Y = check_array(Y, ny, ndim=ndim, xp=xp)
    if tuple(X.shape) != tuple(Y.shape):
        raise ValueError(f"{nx} has shape {tuple(X.shape)} but {ny} has shape {tuple(Y.shape)}; they must match")
    return xp, X, Y


def _f64(x, xp):
    return x if x.dtype == xp.float64 else xp.astype(x, xp.float64)


def _codes(A, name="codes"):
    xp = array_namespace(A, names=(name,))
    A = check_array(A, name, ndim=2, xp=xp)
    return xp, A


def _threshold(threshold):
    return check_scalar(threshold, "threshold", low=0.0)


# --------------------------------------------------------------------------- reconstruction
def fvu(X, X_hat) -> float:
    """Fraction of variance unexplained, with the variance taken about the mean.

    ``FVU = sum_ij (X_ij - Xhat_ij)^2 / sum_ij (X_ij - mu_j)^2``, ``mu_j = mean_i X_ij``.

    0 is a perfect reconstruction; 1 is what predicting the mean activation achieves.
    Sums are accumulated in float64 whatever the input dtype.

    Parameters
    ----------
    X, X_hat : arrays (n_samples, n_features) of the same namespace and shape.
    """
    acc = FVUAccumulator()
    acc.update(X, X_hat)
    return acc.value


class FVUAccumulator:
    """Fraction of variance unexplained over a stream of batches, in float64.

    Keeps, per feature, the running count, mean and sum of squared deviations (Chan et al.'s
    pairwise update, stable when the mean is large against the spread) and the running
    sum of squared residuals, so that after any sequence of ``update`` calls ``value`` equals
    :func:`fvu` of the concatenated batches.

    Example
    -------
    >>> acc = FVUAccumulator()
    >>> for X in batches: acc.update(X, model(X))   # doctest: +SKIP
    >>> acc.value                                    # doctest: +SKIP
    """

    def __init__(self):
        self.n = 0
        self._mean = None  # float64 (n_features,), in the namespace of the first batch
        self._m2 = None
        self._sse = 0.0
        self._xp = None

    def update(self, X, X_hat) -> "FVUAccumulator":
        """Add a batch: ``X`` and its reconstruction ``X_hat``, both (n, n_features)."""
        xp, X, X_hat = _pair(X, X_hat, "X", "X_hat")
        if self._xp is not None and xp is not self._xp:
            raise TypeError("all batches of one FVUAccumulator must come from the same array library")
        if self._mean is not None and X.shape[1] != self._mean.shape[0]:
            raise ValueError(f"X has {X.shape[1]} features but earlier batches had {self._mean.shape[0]}")
        X64, H64 = _f64(X, xp), _f64(X_hat, xp)
        nb = X.shape[0]
        self._sse += float(xp.sum((X64 - H64) ** 2))
        mean_b = xp.mean(X64, axis=0)
        m2_b = xp.sum((X64 - mean_b) ** 2, axis=0)
        if self._mean is None:
            self._xp, self.n, self._mean, self._m2 = xp, nb, mean_b, m2_b
            return self
        n = self.n + nb
        delta = mean_b - self._mean
        self._mean = self._mean + delta * (nb / n)
        self._m2 = self._m2 + m2_b + delta**2 * (self.n * nb / n)
        self.n = n
        return self

    @property
    def total_variance(self) -> float:
        """``sum_ij (X_ij - mu_j)^2`` so far."""
        if self._m2 is None:
            return 0.0
        return float(self._xp.sum(self._m2))

    @property
    def sse(self) -> float:
        """Sum of squared residuals ``sum_ij (X_ij - Xhat_ij)^2`` so far."""
        return self._sse

    @property
    def mse(self) -> float:
        """Mean squared residual per sample, ``sse / n``."""
        return self._sse / self.n if self.n else float("nan")

    @property
    def value(self) -> float:
        """FVU so far (NaN before any data; ``inf`` if the data have zero variance and the
        reconstruction is not exact; 0 if both are zero)."""
        if self.n == 0:
            return float("nan")
        tv = self.total_variance
        if tv == 0.0:
            return 0.0 if self._sse == 0.0 else float("inf")
        return self._sse / tv


# --------------------------------------------------------------------------- sparsity
def l0(codes, *, threshold: float = 0.0) -> float:
    """Mean number of active latents per sample: ``mean_n #{j : |A_nj| > threshold}``."""
    xp, A = _codes(codes)
    t = _threshold(threshold)
    return float(xp.mean(xp.sum(xp.astype(xp.abs(A) > t, xp.float64), axis=1)))


def firing_frequency(codes, *, threshold: float = 0.0):
    """Per atom, the fraction of samples where it is active: ``p_j = mean_n [|A_nj| > t]``.

    Returns a float64 array (n_atoms,) in the namespace of ``codes``.
    """
    xp, A = _codes(codes)
    t = _threshold(threshold)
    return xp.mean(xp.astype(xp.abs(A) > t, xp.float64), axis=0)


def _frac_from_freq(freq, op, p, xp):
    freq = xp.asarray(freq) if not hasattr(freq, "shape") else freq
    hit = freq <= p if op == "le" else freq > p
    return float(xp.mean(xp.astype(hit, xp.float64)))


def dead_fraction(codes, *, threshold: float = 0.0, max_frequency: float = 0.0) -> float:
    """Fraction of atoms that are dead: ``#{j : p_j <= max_frequency} / n_atoms``.

    With the default ``max_frequency=0`` an atom is dead when it never fires on these samples.
    """
    xp, A = _codes(codes)
    p = check_scalar(max_frequency, "max_frequency", low=0.0)
    return _frac_from_freq(firing_frequency(A, threshold=threshold), "le", p, xp)


def dense_fraction(codes, *, threshold: float = 0.0, min_frequency: float = 0.1) -> float:
    """Fraction of atoms that are dense: ``#{j : p_j > min_frequency} / n_atoms``
    (by default, atoms active on more than 10% of samples)."""
    xp, A = _codes(codes)
    p = check_scalar(min_frequency, "min_frequency", low=0.0)
    return _frac_from_freq(firing_frequency(A, threshold=threshold), "gt", p, xp)


def _density_hist(freq_np: np.ndarray, bins, log_range):
    alive = freq_np > 0
    logf = np.full(freq_np.shape, -np.inf)
    logf[alive] = np.log10(freq_np[alive])
    if log_range is None:
        lo = math.floor(float(logf[alive].min())) if alive.any() else -6.0
        log_range = (min(lo, -1.0), 0.0)
    counts, edges = np.histogram(logf[alive], bins=bins, range=log_range)
    return {
        "log10_frequency": logf,
        "counts": counts,
        "edges": edges,
        "n_dead": int((~alive).sum()),
        "n_atoms": int(freq_np.shape[0]),
    }


def feature_density(codes, *, threshold: float = 0.0, bins: int = 50, log_range=None) -> dict:
    """Histogram of ``log10 p_j`` (firing frequency per atom) over the atoms that fire.

    Returns a dict (NumPy): ``log10_frequency`` (n_atoms,) with ``-inf`` for dead atoms,
    ``counts`` (bins,), ``edges`` (bins + 1,), ``n_dead``, ``n_atoms``. ``log_range``
    defaults to ``(floor(min log10 p), 0)``.
    """
    bins = check_scalar(bins, "bins", low=1, integer=True)
    return _density_hist(to_numpy(firing_frequency(codes, threshold=threshold)), bins, log_range)


class SparsityAccumulator:
    """L0, firing frequencies, dead/dense fractions and the density histogram over a stream.

    ``update(codes)`` adds a batch (n, n_atoms); counts are kept as float64 in the batch's
    namespace. After any sequence of updates the properties equal the corresponding
    function applied to the concatenated codes.
    """

    def __init__(self, threshold: float = 0.0):
        self.threshold = _threshold(threshold)
        self.n = 0
        self.counts = None  # per-atom number of samples where active
        self._l0_sum = 0.0
        self._xp = None

    def update(self, codes) -> "SparsityAccumulator":
        xp, A = _codes(codes)
        if self._xp is not None and xp is not self._xp:
            raise TypeError("all batches of one SparsityAccumulator must come from the same array library")
        active = xp.astype(xp.abs(A) > self.threshold, xp.float64)
        c = xp.sum(active, axis=0)
        if self.counts is not None and c.shape[0] != self.counts.shape[0]:
            raise ValueError(f"codes have {c.shape[0]} atoms but earlier batches had {self.counts.shape[0]}")
        self.counts = c if self.counts is None else self.counts + c
        self._l0_sum += float(xp.sum(active))
        self.n += A.shape[0]
        self._xp = xp
        return self

    @property
    def l0(self) -> float:
        return self._l0_sum / self.n if self.n else float("nan")

    @property
    def frequency(self):
        """Per-atom firing frequency ``p_j`` (float64 array in the batches' namespace)."""
        if self.counts is None:
            raise ValueError("no codes seen yet: call update() first")
        return self.counts / self.n

    def dead_fraction(self, max_frequency: float = 0.0) -> float:
        p = check_scalar(max_frequency, "max_frequency", low=0.0)
        return _frac_from_freq(self.frequency, "le", p, self._xp)

    def dense_fraction(self, min_frequency: float = 0.1) -> float:
        p = check_scalar(min_frequency, "min_frequency", low=0.0)
        return _frac_from_freq(self.frequency, "gt", p, self._xp)

    def density(self, bins: int = 50, log_range=None) -> dict:
        """As :func:`feature_density`."""
        bins = check_scalar(bins, "bins", low=1, integer=True)
        return _density_hist(to_numpy(self.frequency), bins, log_range)


# --------------------------------------------------------------------------- dictionaries
def _unit_rows(D, xp, name):
    """Rows scaled to unit norm; an all-zero row stays zero (cosine 0 with everything)."""
    nrm = xp.linalg.vector_norm(D, axis=1, keepdims=True)
    return D / xp.where(nrm > 0, nrm, xp.ones_like(nrm))


def _two_dicts(D_a, D_b, na="D_a", nb="D_b"):
    xp = array_namespace(D_a, D_b, names=(na, nb))
    D_a = check_array(D_a, na, ndim=2, xp=xp)
    D_b = check_array(D_b, nb, ndim=2, xp=xp)
    if D_a.shape[1] != D_b.shape[1]:
        raise ValueError(
            f"{na} has atoms of {D_a.shape[1]} features but {nb} of {D_b.shape[1]}; atoms are rows "
            "and must live in the same space"
        )
    if D_a.dtype != D_b.dtype:
        D_a, D_b = _f64(D_a, xp), _f64(D_b, xp)
    return xp, D_a, D_b


def cosine_matrix(D_a, D_b=None):
    """``C_ij = <a_i, b_j> / (||a_i|| ||b_j||)``, shape (n_atoms_a, n_atoms_b) (``D_b = D_a`` if omitted)."""
    if D_b is None:
        xp = array_namespace(D_a, names=("D_a",))
        D_a = check_array(D_a, "D_a", ndim=2, xp=xp)
        U = _unit_rows(D_a, xp, "D_a")
        return U @ U.T
    xp, D_a, D_b = _two_dicts(D_a, D_b)
    return _unit_rows(D_a, xp, "D_a") @ _unit_rows(D_b, xp, "D_b").T


def max_cosines(D_a, D_b, *, absolute: bool = True, block: int = 4096):
    """For each atom ``a_i`` of ``D_a``: ``max_j |cos(a_i, b_j)|`` and the ``j`` attaining it.

    Atoms are compared up to sign by default (a dictionary atom and its negative are the
    same feature with the code's sign flipped); ``absolute=False`` uses signed cosines.
    Computed in row blocks so that ``n_atoms_a x n_atoms_b`` need not fit in memory.
    Returns ``(best, index)``, arrays (n_atoms_a,) in the input's namespace.
    """
    xp, D_a, D_b = _two_dicts(D_a, D_b)
    block = check_scalar(block, "block", low=1, integer=True)
    Ua, Ub = _unit_rows(D_a, xp, "D_a"), _unit_rows(D_b, xp, "D_b")
    bests, idxs = [], []
    for s in range(0, Ua.shape[0], block):
        C = Ua[s : min(s + block, Ua.shape[0]), :] @ Ub.T
        if absolute:
            C = xp.abs(C)
        idxs.append(xp.argmax(C, axis=1))
        bests.append(xp.max(C, axis=1))
    return xp.concat(bests), xp.concat(idxs)


def mmcs(D_a, D_b, *, absolute: bool = True) -> float:
    """Mean max cosine similarity: ``(1/n_a) sum_i max_j |cos(a_i, b_j)|``.

    Not symmetric: each atom of ``D_a`` looks for its best partner in ``D_b`` (put the
    reference, e.g. ground-truth, dictionary first).
    """
    best, _ = max_cosines(D_a, D_b, absolute=absolute)
    xp = array_namespace(best)
    return float(xp.mean(best))


def hungarian_match(D_a, D_b, *, absolute: bool = True) -> dict:
    """One-to-one matching of atoms maximising the total |cosine| (Hungarian algorithm).

    Solves ``max_P sum_{(i,j) in P} |C_ij|`` over matchings ``P`` that pair each atom of the
    smaller dictionary with a distinct atom of the larger (``min(n_a, n_b)`` pairs), with
    ``scipy.optimize.linear_sum_assignment``. Unlike :func:`mmcs`, two atoms of ``D_a`` cannot
    both claim the same atom of ``D_b``, so it measures universality across seeds honestly.

    Returns a dict (NumPy): ``rows`` and ``cols`` (matched indices into ``D_a`` and ``D_b``),
    ``cosines`` (|C| of each pair, or signed with ``absolute=False``), ``signs`` (sign of each
    pair's cosine), ``mean_cosine``, and ``unmatched_a``/``unmatched_b`` (indices left over).
    """
    from scipy.optimize import linear_sum_assignment

    C = to_numpy(cosine_matrix(D_a, D_b)).astype(np.float64)
    score = np.abs(C) if absolute else C
    rows, cols = linear_sum_assignment(score, maximize=True)
    cos = score[rows, cols]
    return {
        "rows": rows,
        "cols": cols,
        "cosines": cos,
        "signs": np.sign(C[rows, cols]),
        "mean_cosine": float(cos.mean()),
        "unmatched_a": np.setdiff1d(np.arange(C.shape[0]), rows),
        "unmatched_b": np.setdiff1d(np.arange(C.shape[1]), cols),
    }


def feature_splitting(D_small, D_large, *, absolute: bool = True) -> dict:
    """Across dictionary sizes: which small-dictionary atom each large-dictionary atom is
    closest to (``parent_j = argmax_i |cos(large_j, small_i)|``).

    Returns a dict (NumPy): ``parent`` (n_large,), ``cosine`` (n_large,) to that parent,
    ``n_children`` (n_small,) how many large atoms chose each small atom (a feature that
    split has several children, one that vanished has none), and ``mmcs`` of the large
    dictionary against the small one.
    """
    best, idx = max_cosines(D_large, D_small, absolute=absolute)
    best, idx = to_numpy(best), to_numpy(idx).astype(np.int64)
    n_small = int(D_small.shape[0])
    return {
        "parent": idx,
        "cosine": best,
        "n_children": np.bincount(idx, minlength=n_small),
        "mmcs": float(best.mean()),
    }


def coherence(D, *, block: int = 4096) -> dict:
    """Decoder coherence: ``max`` and ``mean`` over ``i != j`` of ``|cos(d_i, d_j)|``.

    The mutual coherence (``max``) bounds when sparse recovery is guaranteed
    (``||a||_0 < (1 + 1/mu) / 2`` for OMP and basis pursuit); the ``mean`` says how crowded
    the dictionary is on average. Computed in row blocks. Returns ``{"max": float,
    "mean": float}``; a single atom has no pairs and gives zeros.
    """
    xp = array_namespace(D, names=("D",))
    D = check_array(D, "D", ndim=2, xp=xp)
    block = check_scalar(block, "block", low=1, integer=True)
    k = D.shape[0]
    if k < 2:
        return {"max": 0.0, "mean": 0.0}
    U = _unit_rows(_f64(D, xp), xp, "D")
    total, mx = 0.0, 0.0
    for s in range(0, k, block):
        C = xp.abs(U[s : min(s + block, k), :] @ U.T)
        nb = C.shape[0]
        rows = xp.arange(nb)
        # zero the diagonal entries (i, s + i) of this block
        diag = xp.reshape(rows + s, (nb, 1)) == xp.reshape(xp.arange(k), (1, k))
        C = xp.where(diag, xp.zeros_like(C), C)
        total += float(xp.sum(C))
        mx = max(mx, float(xp.max(C)))
    return {"max": mx, "mean": total / (k * (k - 1))}


def afa_ratio(X, codes, D, *, bias=None):
    """AFA quasi-orthogonality check, per sample: ``||A_n * r||_2 / ||x_n - b||_2``.

    ``r_j = ||d_j||_2`` are the atom (decoder-row) norms and ``b`` the decoder bias
    (``b_dec`` for an SAE; zero by default). If the atoms were orthogonal and
    ``x_n - b = A_n @ D`` exactly, ``||A_n @ D||^2 = sum_j A_nj^2 ||d_j||^2`` and the ratio
    would be 1; for a quasi-orthogonal dictionary it stays near 1, and its spread over
    samples measures how far the features interfere (Lee et al. 2025, "approximate feature
    activation"). Samples with ``x_n = b`` give NaN.

    Parameters
    ----------
    X : (n_samples, n_features); codes : (n_samples, n_atoms); D : (n_atoms, n_features);
    bias : (n_features,) or None.

    Returns the ratio, float64 array (n_samples,) in the input's namespace.
    """
    xp = array_namespace(X, codes, D, bias, names=("X", "codes", "D", "bias"))
    X = check_array(X, "X", ndim=2, xp=xp)
    A = check_array(codes, "codes", ndim=2, xp=xp)
    D = check_array(D, "D", ndim=2, xp=xp)
    if A.shape[0] != X.shape[0]:
        raise ValueError(f"codes has {A.shape[0]} samples but X has {X.shape[0]}")
    if A.shape[1] != D.shape[0]:
        raise ValueError(f"codes has {A.shape[1]} atoms but D has {D.shape[0]} (atoms are rows of D)")
    if D.shape[1] != X.shape[1]:
        raise ValueError(f"D has {D.shape[1]} features but X has {X.shape[1]}")
    X64 = _f64(X, xp)
    if bias is not None:
        bias = check_array(bias, "bias", ndim=1, xp=xp)
        if bias.shape[0] != X.shape[1]:
            raise ValueError(f"bias must have shape ({X.shape[1]},), got {tuple(bias.shape)}")
        X64 = X64 - _f64(bias, xp)
    r = xp.linalg.vector_norm(_f64(D, xp), axis=1)
    num = xp.linalg.vector_norm(_f64(A, xp) * r, axis=1)
    den = xp.linalg.vector_norm(X64, axis=1)
    nan = xp.full(num.shape, float("nan"), dtype=xp.float64)
    safe = xp.where(den > 0, den, xp.ones_like(den))
    return xp.where(den > 0, num / safe, nan)
