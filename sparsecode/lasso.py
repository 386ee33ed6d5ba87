"""ISTA and FISTA for the Lasso, batched over samples, with certified stopping.

Problem, per sample ``x`` (a row of ``X``)::

    min_a  0.5 * ||x - a @ D||_2^2 + sum_j alpha_j * |a_j|        (a >= 0 if positive)

with ``D`` of shape (n_atoms, n_features), atoms as rows; ``alpha`` a scalar (the same
quantity as scikit-learn's ``sparse_encode(alpha=...)`` for ``lasso_cd``) or one weight per
atom. The reported objective is this per-sample value; means are taken over samples.

Certificate: for a residual ``r = x - a @ D`` the dual point ``theta = s * r`` with the
largest ``s <= 1`` such that ``|d_j . theta| <= alpha_j`` (only ``d_j . theta <= alpha_j``
when positive) is feasible for the dual ``max_theta 0.5||x||^2 - 0.5||x - theta||^2``, so

    gap = P(a) - (0.5||x||^2 - 0.5||x - theta||^2) >= P(a) - P(a*) >= 0.

A sample has converged when ``gap <= tol * P(a)`` (relative gap). With ``alpha = 0`` the dual
feasible set is ``{theta : D theta = 0}`` and the certificate is only as good as that.

Step size ``1/L``, ``L = ||D||_2^2``, by power iteration (:func:`lipschitz_constant`) unless
given, or found by backtracking. Gradient of the smooth part, in two equivalent forms::

    Gram:      A @ G - X @ D.T,   G = D @ D.T        cost per iteration  n * k^2
    explicit:  (A @ D - X) @ D.T                      cost per iteration  2 * n * k * f

``gradient="auto"`` picks the cheaper one (Gram when ``n_atoms <= 2 * n_features``).

Samples that converge are removed from the working batch at each check, so a batch of easy
and hard signals costs what the hard ones need.

``fista(working_set=True)`` restricts each sample to a working set of atoms (celer's strategy,
Massias, Gramfort & Salmon 2018, here with FISTA as the inner solver): its support and the atoms
whose dual constraint is nearest to violated, ``max(32, 2 nnz)`` in all. FISTA runs on the set's
own Gram matrix ``G_W`` (an iteration costs ``|W| nnz`` per sample, and ``G_W`` is better
conditioned than ``G``); between rounds the whole problem's gap certifies and the sets are
chosen again. Nothing is lost by the restriction: a sample stops only on the full gap.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

from .backend import (
    array_namespace,
    asarray_like,
    check_array,
    check_dictionary_problem,
    check_scalar,
    get_kernel,
    register_kernel,
    to_numpy,
)
from .result import ConvergenceHistory, SparseCodingResult

__all__ = ["ista", "fista", "lasso_objective", "duality_gap", "lipschitz_constant", "alpha_max"]


# --------------------------------------------------------------------------- Lipschitz
def lipschitz_constant(D, *, n_iter: int = 1000, tol: float = 1e-10, seed: int = 0, safety: float = 1.0):
    """``||D||_2^2``, the largest eigenvalue of ``D @ D.T``, by power iteration.

    Iterates on the smaller of ``D @ D.T`` (n_atoms) and ``D.T @ D`` (n_features), from a
    seeded Gaussian start (deterministic), until the Rayleigh quotient changes by less than
    ``tol`` relatively. The quotient approaches the eigenvalue from below; ``safety`` (>= 1)
    multiplies the estimate so that a step ``1/L`` stays safe. Returns a Python float
    (0.0 for an all-zero dictionary).
    """
    xp = array_namespace(D, names=("D",))
    D = check_array(D, "D", ndim=2, xp=xp)
    n_iter = check_scalar(n_iter, "n_iter", low=1, integer=True)
    tol = check_scalar(tol, "tol", low=0)
    safety = check_scalar(safety, "safety", low=1.0)
    k, f = D.shape
    work64 = D if D.dtype == xp.float64 else xp.astype(D, xp.float64)
    M = work64 @ work64.T if k <= f else work64.T @ work64
    rng = np.random.default_rng(seed)
    v = asarray_like(rng.standard_normal(M.shape[0]), work64)
    v = v / xp.linalg.vector_norm(v)
    lam = 0.0
    for _ in range(n_iter):
        w = M @ v
        new = float(xp.sum(v * w))
        nrm = float(xp.linalg.vector_norm(w))
        if nrm == 0.0:
            return 0.0
        v = w / nrm
        if abs(new - lam) <= tol * abs(new):
            lam = new
            break
        lam = new
    return float(lam) * safety


def alpha_max(X, D, positive: bool = False) -> float:
    """Smallest ``alpha`` for which all codes are zero: ``max |X @ D.T|`` (``max X @ D.T`` if positive)."""
    xp, X2, D, _ = check_dictionary_problem(X, D)
    C = _correlations(X2, D, xp)
    return max(float(xp.max(C)), 0.0) if positive else float(xp.max(xp.abs(C)))


def _correlations(X, D, xp):
    """``X @ D.T`` as the solvers form it: in float64 and rounded once for float32 problems,
    so that the codes at ``alpha = alpha_max(X, D)`` are exactly zero."""
    if X.dtype == xp.float32:
        return xp.astype(xp.astype(X, xp.float64) @ xp.astype(D, xp.float64).T, xp.float32)
    return X @ D.T


# --------------------------------------------------------------------------- objective & gap
def _alpha_array(alpha, D, xp, name="alpha"):
    """Validated penalty: a float, or a (1, n_atoms) array in D's namespace."""
    n_atoms = D.shape[0]
    if hasattr(alpha, "__array_namespace__") and getattr(alpha, "ndim", None) == 0:
        alpha = float(to_numpy(alpha))  # array-API reductions return 0-D arrays
    if isinstance(alpha, np.ndarray) and alpha.ndim == 0:
        alpha = float(alpha)
    if isinstance(alpha, (int, float, np.integer, np.floating)) and not isinstance(alpha, bool):
        a = float(alpha)
        if not np.isfinite(a) or a < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {alpha!r}")
        return a
    if hasattr(alpha, "__array_namespace__") and not isinstance(alpha, np.ndarray):
        # NumPy arrays are plain data like lists; other libraries must match the problem's
        array_namespace(D, alpha, names=("D", name))
    a_np = to_numpy(alpha) if hasattr(alpha, "__array_namespace__") else np.asarray(alpha)
    if a_np.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be a number or an array of numbers, got dtype {a_np.dtype}")
    if a_np.ndim != 1 or a_np.shape[0] != n_atoms:
        raise ValueError(f"{name} must be a number or have shape ({n_atoms},) (one per atom), got {a_np.shape}")
    if not np.all(np.isfinite(a_np)) or np.any(a_np < 0):
        raise ValueError(f"{name} must be finite and >= 0 everywhere")
    return xp.reshape(asarray_like(a_np, D), (1, n_atoms))


def _l1(A, alpha, xp):
    return xp.sum(xp.abs(A) * alpha, axis=1) if not isinstance(alpha, float) else alpha * xp.sum(xp.abs(A), axis=1)


def _primal_dual(X, D, A, alpha, positive, xp, R=None):
    """Per-sample primal objective and absolute duality gap (see module docstring).

    Computed in float64 whatever the input dtype: in float32 the difference primal - dual
    cancels to about 1e-6 relative, which would hide convergence below that. Results are
    returned in the input dtype.
    """
    out_dtype = X.dtype
    if X.dtype != xp.float64:
        X, D, A = (xp.astype(M, xp.float64) for M in (X, D, A))
        if not isinstance(alpha, float):
            alpha = xp.astype(alpha, xp.float64)
        R = None
    primal, gap = _primal_dual64(X, D, A, alpha, positive, xp, R)
    if out_dtype != xp.float64:
        primal, gap = xp.astype(primal, out_dtype), xp.astype(gap, out_dtype)
    return primal, gap


def _dual_scale(C, alpha, positive, xp):
    """Per sample, the largest ``s`` in [0, 1] with ``s * |c_j| <= alpha_j`` (``s * c_j`` when
    positive) for the correlations ``C = D r``: ``theta = s r`` is then dual feasible.
    Entries with a non-positive constrained correlation do not constrain."""
    C_con = C if positive else xp.abs(C)
    pos = C_con > 0
    safe = xp.where(pos, C_con, xp.ones_like(C_con))
    ratio = xp.where(pos, alpha / safe, xp.full_like(C_con, float("inf")))
    return xp.minimum(xp.min(ratio, axis=1), xp.ones_like(ratio[:, 0]))


def _primal_dual64(X, D, A, alpha, positive, xp, R=None):
    if R is None:
        R = X - A @ D  # residual
    C = R @ D.T  # correlations D r, (n, k)
    half_r2 = 0.5 * xp.sum(R * R, axis=1)
    primal = half_r2 + _l1(A, alpha, xp)
    s = _dual_scale(C, alpha, positive, xp)
    # dual(theta) with theta = s r:  0.5||x||^2 - 0.5||x - s r||^2
    diff = X - s[:, None] * R
    dual = 0.5 * xp.sum(X * X, axis=1) - 0.5 * xp.sum(diff * diff, axis=1)
    gap = primal - dual
    gap = xp.maximum(gap, xp.zeros_like(gap))  # rounding can make a zero gap slightly negative
    return primal, gap


def lasso_objective(X, D, A, alpha, positive: bool = False):
    """Per-sample Lasso objective ``0.5||x - a @ D||^2 + alpha * ||a||_1``, shape (n_samples,).

    Returns ``inf`` for samples whose codes violate ``a >= 0`` when ``positive``.
    """
    xp, X2, D, single = check_dictionary_problem(X, D)
    A2 = _check_codes(A, X2, D, xp, "A")
    alpha = _alpha_array(alpha, D, xp)
    R = X2 - A2 @ D
    obj = 0.5 * xp.sum(R * R, axis=1) + _l1(A2, alpha, xp)
    if positive:
        bad = xp.any(A2 < 0, axis=1)
        obj = xp.where(bad, xp.full_like(obj, float("inf")), obj)
    return obj[0] if single else obj


def duality_gap(X, D, A, alpha, positive: bool = False, relative: bool = False):
    """Per-sample duality gap of codes ``A`` (absolute, or divided by the objective).

    An upper bound on ``P(a) - P(a*)``, certified without knowing ``a*``.
    """
    xp, X2, D, single = check_dictionary_problem(X, D)
    A2 = _check_codes(A, X2, D, xp, "A")
    alpha = _alpha_array(alpha, D, xp)
    primal, gap = _primal_dual(X2, D, A2, alpha, positive, xp)
    if relative:
        gap = _relative(gap, primal, xp)
    return gap[0] if single else gap


def _relative(gap, primal, xp):
    tiny = float(np.finfo(np.float32).tiny) if primal.dtype == xp.float32 else float(np.finfo(np.float64).tiny)
    return gap / xp.maximum(primal, xp.full_like(primal, tiny))


def _check_codes(A, X2, D, xp, name):
    if A is None:
        return None
    if isinstance(A, (list, tuple)):
        A = asarray_like(np.asarray(A, dtype=np.float64 if X2.dtype == xp.float64 else np.float32), X2)
    if not hasattr(A, "__array_namespace__"):
        raise TypeError(f"{name} must be an array of shape ({X2.shape[0]}, {D.shape[0]})")
    array_namespace(X2, A, names=("X", name))
    A = check_array(A, name, ndim=(1, 2), xp=xp, dtype_like=X2)
    if A.ndim == 1:
        A = xp.reshape(A, (1, A.shape[0]))
    if A.shape != (X2.shape[0], D.shape[0]):
        raise ValueError(f"{name} must have shape ({X2.shape[0]}, {D.shape[0]}), got {tuple(A.shape)}")
    return A


# --------------------------------------------------------------------------- solvers
def ista(X, D, alpha, **options) -> SparseCodingResult:
    """ISTA (proximal gradient) for the Lasso; see :func:`fista` for every option.

    Converges as O(1/k) in objective. ``restart`` does not apply.
    """
    if "restart" in options and options["restart"] is not None:
        raise ValueError("restart applies to FISTA only; ISTA has no momentum to restart")
    options.pop("restart", None)
    return _proximal_gradient(X, D, alpha, accelerated=False, restart=None, **options)


def fista(
    X,
    D,
    alpha,
    *,
    positive: bool = False,
    max_iter: int = 1000,
    tol: float = 1e-6,
    init=None,
    lipschitz: float | None = None,
    gradient: str = "auto",
    restart: str | None = None,
    backtracking: bool = False,
    history: bool = False,
    callback: Callable | None = None,
    check_every: int = 10,
    progress: bool = False,
    working_set: bool = False,
) -> SparseCodingResult:
    """FISTA (Beck & Teboulle 2009) for the Lasso of this module, batched over samples.

    Parameters
    ----------
    X : array (n_samples, n_features) or (n_features,)
    D : array (n_atoms, n_features), atoms as rows (need not be unit norm)
    alpha : float >= 0, or array (n_atoms,) of per-atom weights
    positive : constrain codes to be >= 0
    max_iter : iterations at most
    tol : relative duality gap at which a sample stops, checked every ``check_every`` iterations
    init : array (n_samples, n_atoms), warm start (projected onto ``a >= 0`` when positive)
    lipschitz : ``L`` for the step ``1/L``; computed by power iteration when None
    gradient : "gram", "explicit" or "auto" (cheaper by flop count)
    restart : None, "function" (monotone: a step that raises a sample's objective is
        rejected and its momentum reset, so the objective never increases) or "gradient"
        (O'Donoghue & Candes 2015: reset when the momentum points against the gradient step)
    backtracking : with ``lipschitz=None``, find ``L`` per sample by backtracking (start at
        ``max_j ||d_j||^2``, doubling) instead of power iteration
    history : record per-iteration objective, gap and time (see ``ConvergenceHistory``)
    callback : called as ``callback(iteration, codes)`` after each iteration with the codes
        of the samples still running; returning True stops the solver
    check_every : iterations between duality-gap checks (each costs about one gradient)
    progress : show a tqdm bar
    working_set : solve each sample on a growing working set of atoms (its support and the
        atoms nearest to violating their dual constraint), as celer does for coordinate
        descent (Massias, Gramfort & Salmon 2018): FISTA runs on the small Gram matrix of the
        set, the full duality gap is checked between rounds, and the set grows until the
        gap of the whole problem is below ``tol``. Each iteration then costs ``|W|^2``
        instead of ``n_atoms^2`` per sample. Uses the Gram form (``gradient`` must be "auto"
        or "gram") and no backtracking; ``history`` and ``callback`` are per round, and
        ``check_every`` is the inner gap-check interval. ``n_iter`` counts inner iterations.

    Returns
    -------
    SparseCodingResult
        ``objective`` and ``gap`` are per sample; ``converged`` when ``gap <= tol * objective``.
    """
    if working_set:
        return _fista_working_set(
            X, D, alpha, positive=positive, max_iter=max_iter, tol=tol, init=init, lipschitz=lipschitz,
            gradient=gradient, restart=restart, backtracking=backtracking, history=history,
            callback=callback, check_every=check_every, progress=progress,
        )
    return _proximal_gradient(
        X, D, alpha, accelerated=True, positive=positive, max_iter=max_iter, tol=tol, init=init,
        lipschitz=lipschitz, gradient=gradient, restart=restart, backtracking=backtracking,
        history=history, callback=callback, check_every=check_every, progress=progress,
    )


def _check_solver_args(X, D, alpha, positive, max_iter, tol, check_every, gradient, restart, callback):
    """Validation shared by the solvers of this module (at the door, naming the argument)."""
    xp, X, D, single = check_dictionary_problem(X, D)
    alpha = _alpha_array(alpha, D, xp)
    max_iter = check_scalar(max_iter, "max_iter", low=1, integer=True)
    tol = check_scalar(tol, "tol", low=0)
    check_every = check_scalar(check_every, "check_every", low=1, integer=True)
    if not isinstance(positive, (bool, np.bool_)):
        raise TypeError(f"positive must be True or False, got {positive!r}")
    if gradient not in ("auto", "gram", "explicit"):
        raise ValueError(f"gradient must be 'auto', 'gram' or 'explicit', got {gradient!r}")
    if restart not in (None, "function", "gradient"):
        raise ValueError(f"restart must be None, 'function' or 'gradient', got {restart!r}")
    if callback is not None and not callable(callback):
        raise TypeError("callback must be callable")
    return xp, X, D, single, alpha, max_iter, tol, check_every


def _proximal_gradient(
    X, D, alpha, *, accelerated, positive=False, max_iter=1000, tol=1e-6, init=None,
    lipschitz=None, gradient="auto", restart=None, backtracking=False, history=False,
    callback=None, check_every=10, progress=False,
):
    method = "fista" if accelerated else "ista"
    xp, X, D, single, alpha, max_iter, tol, check_every = _check_solver_args(
        X, D, alpha, positive, max_iter, tol, check_every, gradient, restart, callback)
    n, f = X.shape
    k = D.shape[0]
    dtype = X.dtype

    if lipschitz is not None:
        L = check_scalar(lipschitz, "lipschitz", low=0, low_inclusive=False)
        backtracking = False
    elif backtracking:
        L = float(xp.max(xp.sum(D * D, axis=1)))  # max_j ||d_j||^2 <= ||D||_2^2
    else:
        # a 1e-6 margin covers the power iteration's approach from below
        L = lipschitz_constant(D, safety=1.0 + 1e-6)
    if L == 0.0:  # all-zero dictionary: the gradient is zero, any step works
        L = 1.0

    if init is None:
        A = xp.zeros((n, k), dtype=dtype, device=_device(X))
    else:
        A = _check_codes(init, X, D, xp, "init")
        if positive:
            A = xp.maximum(A, xp.zeros_like(A))

    # A sparse Gram kernel (Numba, NumPy backend) makes Y @ G cost nnz(Y) * k instead of n * k^2,
    # which beats the explicit form whenever the iterates are sparse; without it the choice
    # is by dense flop count.
    kernel = get_kernel("lasso_prox_grad_gram", xp) if not backtracking else None
    gram_bytes = k * k * (4 if dtype == xp.float32 else 8)
    if gradient == "auto":
        use_gram = (kernel is not None and gram_bytes <= _GRAM_MAX_BYTES) or k <= 2 * f
    else:
        use_gram = gradient == "gram"
    if not use_gram:
        kernel = None
    # Built once in float64 and rounded: in float32 the accumulated error of these products
    # (~sqrt(n_features) * eps) moves the Gram-form fixed point by ~1e-6 relative.
    XDt = _correlations(X, D, xp)  # needed by the Gram form; cheap relative to the iterations
    G = G_cert = None
    if use_gram:
        if dtype == xp.float32:
            G_cert = xp.astype(D, xp.float64) @ xp.astype(D, xp.float64).T
            G = xp.astype(G_cert, dtype)
        else:
            G = G_cert = D @ D.T
    thr_vec = None
    if kernel is not None:
        thr_vec = asarray_like(np.broadcast_to(to_numpy(alpha), (1, k))[0], X)
    dense_iterates = False  # switch to BLAS when the iterates are too dense for the kernel
    step_kernel = None  # FISTA without the function restart: one fused kernel per step
    if kernel is not None and accelerated and restart != "function":
        step_kernel = get_kernel("lasso_fista_step_gram", xp)
    gap_kernel = get_kernel("lasso_sparse_times_gram", xp) if kernel is not None else None
    if gap_kernel is not None and G_cert is not None and G_cert.dtype != G.dtype and k * k * 8 > _GRAM_MAX_BYTES // 2:
        gap_kernel = None  # a second, float64 Gram matrix would not fit: certify explicitly
    x2a = xp.sum(xp.astype(X, xp.float64) ** 2, axis=1) if gap_kernel is not None else None
    x2_all = x2a

    def certify(X_, XDt_, x2_, A_):
        """Per-sample (primal, gap) in the problem dtype, by the cheapest exact route."""
        if gap_kernel is not None and not dense_iterates:
            # float64 Gram for the certificate: the float32 one is ~1e-7 off per entry,
            # which would blur the gap at 1e-6
            p, g = _primal_dual_gram(XDt_, gap_kernel(A_, G_cert), A_, x2_, alpha, positive, xp)
            if dtype != xp.float64:
                p, g = xp.astype(p, dtype), xp.astype(g, dtype)
            return p, g
        return _primal_dual(X_, D, A_, alpha, positive, xp)
    # step and threshold both divided by L in the problem dtype: at alpha = alpha_max the
    # largest correlation then sits exactly on the threshold and its code is exactly zero
    L_arr = xp.asarray(L, dtype=dtype, device=_device(X))
    thr_step = (xp.asarray(alpha, dtype=dtype, device=_device(X)) if isinstance(alpha, float) else alpha) / L_arr

    def grad(Y, XDt_, X_):
        if use_gram:
            return Y @ G - XDt_
        g = (Y @ D - X_) @ D.T
        # at an all-zero row the gradient is -x D^T, already formed (in float64, rounded): using
        # it keeps codes exactly zero at alpha = alpha_max, where float32 BLAS would differ by an ulp
        zero_row = xp.logical_not(xp.any(Y != 0, axis=1))[:, None]
        return xp.where(zero_row, -XDt_, g)

    def prox(Z, thr):
        if positive:
            return xp.maximum(Z - thr, xp.zeros_like(Z))
        return xp.sign(Z) * xp.maximum(xp.abs(Z) - thr, xp.zeros_like(Z))

    def smooth(Y, X_):
        R = X_ - Y @ D
        return 0.5 * xp.sum(R * R, axis=1)

    def objective(Y, X_):
        return smooth(Y, X_) + _l1(Y, alpha, xp)

    # Working (active) state; finished samples are moved out at each gap check.
    idx = xp.arange(n, device=_device(X))
    Xa, XDta, Aa = X, XDt, A
    Ya = A
    t = xp.ones((n,), dtype=dtype, device=_device(X))
    La = xp.full((n, 1), L, dtype=dtype, device=_device(X))  # per-sample L (backtracking)
    iters = xp.zeros((n,), dtype=xp.int64, device=_device(X))
    obj_prev = objective(Aa, Xa) if restart == "function" else None
    if restart == "function":
        rnd_eps = 16 * float(np.finfo(np.float32 if dtype == xp.float32 else np.float64).eps)
        half_x2 = 0.5 * xp.sum(Xa * Xa, axis=1)
        fresh = xp.zeros((n,), dtype=xp.bool, device=_device(X))
    done_idx, done_A, done_it, done_L = [], [], [], []
    n_restarts = 0

    hist = {"iteration": [], "objective": [], "gap": [], "relative_gap": [], "time": []} if history else None
    elapsed = 0.0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=max_iter, desc=method, unit="it")

    it = 0
    for it in range(1, max_iter + 1):
        t0 = time.perf_counter()
        dots = None
        fused = step_kernel is not None and not dense_iterates
        if fused:  # the whole FISTA step, momentum included, in one pass over each row
            Znew, Ya, t, n_bad = step_kernel(Ya, G, XDta, L, thr_vec, positive, Aa, t, restart == "gradient")
            n_restarts += n_bad
        elif kernel is not None and not dense_iterates:
            if accelerated and restart == "gradient":
                Znew, dots = kernel(Ya, G, XDta, L, thr_vec, positive, A_prev=Aa)
            else:
                Znew = kernel(Ya, G, XDta, L, thr_vec, positive)
        else:
            G_y = grad(Ya, XDta, Xa)
            if backtracking:
                Znew, La = _backtrack(Ya, G_y, Xa, La, prox, smooth, alpha, xp)
            else:
                Znew = prox(Ya - G_y / L_arr, thr_step)
        iters = iters + 1

        if accelerated and not fused:
            if restart == "function":
                obj_new = objective(Znew, Xa)
                # A rise within rounding (the objective is evaluated to ~eps * (F + ||x||^2/2))
                # is not a rise; and the step right after a rejection starts from y == a, a plain
                # proximal-gradient step, monotone in exact arithmetic, so it is always taken.
                # Otherwise rounding noise at the flat bottom freezes the iterate.
                slack = rnd_eps * (xp.abs(obj_prev) + half_x2)
                worse = xp.logical_and(obj_new > obj_prev + slack, xp.logical_not(fresh))
                fresh = worse
                n_restarts += int(xp.sum(xp.astype(worse, xp.int64)))
                # reject the step for samples whose objective rose; their momentum restarts
                Znew = xp.where(worse[:, None], Aa, Znew)
                obj_prev = xp.where(worse, obj_prev, obj_new)
                t = xp.where(worse, xp.ones_like(t), t)
            elif restart == "gradient":
                # restart when the (generalised) gradient step Ya -> Znew opposes the momentum
                bad = (dots if dots is not None else xp.sum((Ya - Znew) * (Znew - Aa), axis=1)) > 0
                n_restarts += int(xp.sum(xp.astype(bad, xp.int64)))
                t = xp.where(bad, xp.ones_like(t), t)
            t_next = (1.0 + xp.sqrt(1.0 + 4.0 * t * t)) / 2.0
            beta = ((t - 1.0) / t_next)[:, None]
            Ya = Znew + beta * (Znew - Aa)
            t = t_next
        elif not accelerated:
            Ya = Znew
        Aa = Znew
        elapsed += time.perf_counter() - t0

        if history:
            _record(hist, it, elapsed, lambda A_: certify(X, XDt, x2_all, A_), xp, done_idx, done_A, idx, Aa)

        stop_user = False
        if callback is not None:
            stop_user = bool(callback(it, Aa))

        if it % check_every == 0 or it == max_iter or stop_user:
            t0 = time.perf_counter()
            primal, gap = certify(Xa, XDta, x2a, Aa)
            conv = _relative(gap, primal, xp) <= tol
            if kernel is not None:
                dense_iterates = _density(Ya, xp) > _SPARSE_KERNEL_MAX_DENSITY
            n_conv = int(xp.sum(xp.astype(conv, xp.int64)))
            if n_conv:
                sel = xp.nonzero(conv)[0]
                keep = xp.nonzero(xp.logical_not(conv))[0]
                done_idx.append(xp.take(idx, sel))
                done_A.append(xp.take(Aa, sel, axis=0))
                done_it.append(xp.take(iters, sel))
                done_L.append(xp.take(La, sel, axis=0))
                idx = xp.take(idx, keep)
                Aa, Ya, Xa, XDta = (xp.take(M, keep, axis=0) for M in (Aa, Ya, Xa, XDta))
                t, iters, La = xp.take(t, keep), xp.take(iters, keep), xp.take(La, keep, axis=0)
                if x2a is not None:
                    x2a = xp.take(x2a, keep)
                if obj_prev is not None:
                    obj_prev, half_x2, fresh = (xp.take(v, keep) for v in (obj_prev, half_x2, fresh))
            elapsed += time.perf_counter() - t0
            if bar is not None:
                bar.set_postfix(active=int(idx.shape[0]), max_rel_gap=float(xp.max(_relative(gap, primal, xp))))
            if idx.shape[0] == 0:
                break
        if bar is not None:
            bar.update(1)
        if stop_user:
            break
    if bar is not None:
        bar.close()

    # reassemble in the original sample order
    all_idx = xp.concat(done_idx + [idx]) if done_idx else idx
    codes = xp.concat(done_A + [Aa], axis=0) if done_A else Aa
    n_it = xp.concat(done_it + [iters]) if done_it else iters
    order = xp.argsort(all_idx)
    codes = xp.take(codes, order, axis=0)
    n_it = xp.take(n_it, order)
    L_ps = xp.take(xp.concat(done_L + [La], axis=0) if done_L else La, order, axis=0)[:, 0]
    primal, gap = _primal_dual(X, D, codes, alpha, positive, xp)
    rel = _relative(gap, primal, xp)
    converged = rel <= tol

    hist_obj = None
    if history:
        hist_obj = ConvergenceHistory(**{key: np.asarray(v) for key, v in hist.items()})
    if single:  # one 1-D signal: 1-D codes and 0-D per-sample statistics
        # (v[0, ...] keeps a 0-D array where NumPy's v[0] would give a NumPy scalar)
        codes = codes[0, :]
        n_it, converged, primal, gap, rel = (v[0, ...] for v in (n_it, converged, primal, gap, rel))
        if backtracking:
            L_ps = L_ps[0, ...]
    return SparseCodingResult(
        codes=codes,
        n_iter=n_it,
        converged=converged,
        objective=primal,
        gap=gap,
        relative_gap=rel,
        history=hist_obj,
        method=method,
        lipschitz=None if backtracking else L,
        info={"gradient": "gram" if use_gram else "explicit", "restarts": n_restarts, "iterations": it,
              "restart": restart, "backtracking": backtracking,
              **({"lipschitz_per_sample": L_ps} if backtracking else {})},
    )


# --------------------------------------------------------------------------- working sets
_WS_MIN_SIZE = 32  # first working-set size; it then grows as 2 * nnz (celer's rule)
_WS_INNER_RATIO = 1e-3  # a round solves its set until the set's gap is this fraction of the full gap
_WS_BLOCK_ELEMENTS = 1 << 24  # portable path: samples per block so that the stacked G_W stay this small


def _fista_working_set(X, D, alpha, *, positive, max_iter, tol, init, lipschitz, gradient, restart,
                       backtracking, history, callback, check_every, progress):
    """FISTA on growing per-sample working sets; see ``fista(working_set=True)``.

    A round: certify every running sample on the whole problem (duality gap from Gram
    quantities) and choose its next set (support first, then the atoms nearest to violating);
    then run FISTA on each sample's set until the set's own gap falls below
    ``max(tol * P / 2, 1e-3 * full gap)``. Work is carried out in float64 (the sets are small
    and the certificates need it); codes come back in the input dtype.
    """
    xp, X, D, single, alpha, max_iter, tol, check_every = _check_solver_args(
        X, D, alpha, positive, max_iter, tol, check_every, gradient, restart, callback)
    if backtracking:
        raise ValueError("backtracking does not apply with working_set=True: each set's step comes "
                         "from its own small Gram matrix")
    if gradient == "explicit":
        raise ValueError("working_set=True works in the Gram form; gradient must be 'auto' or 'gram'")
    L_fixed = 0.0  # 0: each set estimates its own (smaller) constant
    if lipschitz is not None:  # ||D||^2 bounds every set's ||G_W||
        L_fixed = check_scalar(lipschitz, "lipschitz", low=0, low_inclusive=False)
    n, k = X.shape[0], D.shape[0]
    dtype, dev, f64 = X.dtype, _device(X), xp.float64
    X64 = X if dtype == f64 else xp.astype(X, f64)
    D64 = D if dtype == f64 else xp.astype(D, f64)
    C = X64 @ D64.T
    G = D64 @ D64.T
    x2 = xp.sum(X64 * X64, axis=1)
    if isinstance(alpha, float):
        thr = xp.full((k,), alpha, dtype=f64, device=dev)
    else:
        thr = xp.reshape(xp.astype(alpha, f64), (k,))
    norms = xp.sqrt(xp.sum(D64 * D64, axis=1))
    inv_norm = xp.where(norms > 0, 1.0 / xp.where(norms > 0, norms, xp.ones_like(norms)), xp.zeros_like(norms))
    if init is None:
        A = xp.zeros((n, k), dtype=f64, device=dev)
    else:
        A = xp.astype(_check_codes(init, X, D, xp, "init"), f64)
        if positive:
            A = xp.maximum(A, xp.zeros_like(A))
    restart_code = {None: 0, "function": 1, "gradient": 2}[restart]
    select = get_kernel("lasso_ws_certify_select", xp) or _ws_certify_select_portable
    solve = get_kernel("lasso_ws_subproblems", xp) or _ws_subproblems_portable

    idx = xp.arange(n, device=dev)
    Ca, x2a, Aa = C, x2, A
    iters = xp.zeros((n,), dtype=xp.int64, device=dev)
    Ls = xp.zeros((n,), dtype=f64, device=dev)  # each sample's step constant, carried across rounds
    done_idx, done_A, done_it, done_p, done_g = [], [], [], [], []
    hist = {"iteration": [], "objective": [], "gap": [], "relative_gap": [], "time": []} if history else None
    elapsed, rounds, stop_user, largest_set = 0.0, 0, False, 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(desc="fista (working sets)", unit="round")
    while True:
        t0 = time.perf_counter()
        primal, gap, W, sizes = select(Aa, G, Ca, x2a, thr, inv_norm, positive, _WS_MIN_SIZE, xp)
        finish = xp.logical_or(_relative(gap, primal, xp) <= tol, iters >= max_iter)
        if stop_user:
            finish = xp.ones_like(finish)
        if bool(xp.any(finish)):
            sel, keep = xp.nonzero(finish)[0], xp.nonzero(xp.logical_not(finish))[0]
            for lst, M in ((done_idx, idx), (done_A, Aa), (done_it, iters), (done_p, primal), (done_g, gap)):
                lst.append(xp.take(M, sel, axis=0))
            idx, Aa, Ca, x2a, iters, Ls, primal, gap, W, sizes = (
                xp.take(M, keep, axis=0) for M in (idx, Aa, Ca, x2a, iters, Ls, primal, gap, W, sizes))
        elapsed += time.perf_counter() - t0
        if history:
            p_all = xp.concat(done_p + [primal])
            g_all = xp.concat(done_g + [gap])
            hist["iteration"].append(int(xp.max(xp.concat(done_it + [iters]))))
            hist["objective"].append(float(xp.mean(p_all)))
            hist["gap"].append(float(xp.mean(g_all)))
            hist["relative_gap"].append(float(xp.max(_relative(g_all, p_all, xp))))
            hist["time"].append(elapsed)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(active=int(idx.shape[0]))
        if idx.shape[0] == 0:
            break
        t0 = time.perf_counter()
        target = xp.maximum(0.5 * tol * primal, _WS_INNER_RATIO * gap)
        largest_set = max(largest_set, int(W.shape[1]))
        Aa, n_it, Ls = solve(G, Ca, x2a, Aa, W, sizes, thr, positive, max_iter - iters, target,
                             restart_code, check_every, L_fixed, Ls, xp)
        iters = iters + n_it
        rounds += 1
        elapsed += time.perf_counter() - t0
        if callback is not None:
            stop_user = bool(callback(rounds, Aa if dtype == f64 else xp.astype(Aa, dtype)))
    if bar is not None:
        bar.close()

    order = xp.argsort(xp.concat(done_idx))
    codes = xp.take(xp.concat(done_A, axis=0), order, axis=0)
    n_it = xp.take(xp.concat(done_it), order)
    if dtype != f64:
        codes = xp.astype(codes, dtype)
    # The rounds certify from Gram quantities, whose ||r||^2 = ||x||^2 - 2 a.c + a.G a cancels
    # when the fit is nearly exact; what is returned is certified from the residual itself.
    primal, gap = _primal_dual(X, D, codes, alpha, positive, xp)
    rel = _relative(gap, primal, xp)
    converged = rel <= tol
    hist_obj = ConvergenceHistory(**{key: np.asarray(v) for key, v in hist.items()}) if history else None
    if single:
        codes = codes[0, :]
        n_it, converged, primal, gap, rel = (v[0, ...] for v in (n_it, converged, primal, gap, rel))
    return SparseCodingResult(
        codes=codes, n_iter=n_it, converged=converged, objective=primal, gap=gap, relative_gap=rel,
        history=hist_obj, method="fista", lipschitz=L_fixed or None,
        info={"gradient": "gram", "working_set": True, "rounds": rounds, "largest_set": largest_set,
              "restart": restart, "backtracking": False},
    )


def _ws_certify_select_portable(A, G, C, x2, thr, inv_norm, positive, m0, xp):
    """Full-problem (primal, gap) per row from Gram quantities and the next working sets ``W``
    (n, max size), the first ``sizes[i]`` entries of row ``i`` being its set (support first,
    then by score)."""
    k = A.shape[1]
    alpha = xp.reshape(thr, (1, k))
    primal, gap, corr, s = _primal_dual_gram(C, A @ G, A, x2, alpha, positive, xp, correlations=True)
    cc = corr if positive else xp.abs(corr)
    inv = xp.reshape(inv_norm, (1, k))
    score = xp.where(inv > 0, (alpha - xp.reshape(s, (-1, 1)) * cc) * inv, xp.full_like(cc, float("inf")))
    nz = A != 0
    score = xp.where(nz, xp.full_like(score, -float("inf")), score)
    nnz = xp.sum(xp.astype(nz, xp.int64), axis=1)
    sizes = xp.minimum(xp.maximum(2 * nnz, xp.full_like(nnz, m0)), xp.full_like(nnz, k))
    m = int(xp.max(sizes)) if sizes.shape[0] else 0
    W = xp.argsort(score, axis=1)[:, :m]
    return primal, gap, W, sizes


def _ws_subproblems_portable(G, C, x2, A, W, sizes, thr, positive, budget, target, restart, check_every,
                             L_fixed, L_state, xp):
    """The portable twin of ``_lasso_numba.fista_subproblems``: the same iteration, batched
    over samples with the sets padded to one size (padding masked out), in blocks of samples."""
    n, m = W.shape
    step = max(1, _WS_BLOCK_ELEMENTS // max(m * m, 1))
    parts = []
    for lo in range(0, n, step):
        sl = slice(lo, min(lo + step, n))
        parts.append(_ws_block(G, C[sl, ...], x2[sl], A[sl, ...], W[sl, ...], sizes[sl], thr, positive,
                               budget[sl], target[sl], restart, check_every, L_fixed, L_state[sl], xp))
    return tuple(xp.concat([p[j] for p in parts], axis=0) for j in range(3))


def _ws_block(G, C, x2, A, W, sizes, thr, positive, budget, target, restart, check_every, L_fixed, L_state, xp):
    from .pursuits import _gather_rows, _scatter_codes

    b, m = W.shape
    k = G.shape[0]
    dev = _device(A)
    valid = xp.reshape(xp.arange(m, device=dev), (1, m)) < xp.reshape(sizes, (b, 1))
    vf = xp.astype(valid, G.dtype)
    Wc = xp.where(valid, W, xp.zeros_like(W))
    pairs = xp.reshape(xp.reshape(Wc, (b, m, 1)) * k + xp.reshape(Wc, (b, 1, m)), (-1,))
    GW = xp.reshape(xp.take(xp.reshape(G, (-1,)), pairs), (b, m, m))
    GW = GW * xp.reshape(vf, (b, m, 1)) * xp.reshape(vf, (b, 1, m))
    c = _gather_rows(C, Wc, xp) * vf
    w = xp.reshape(xp.take(thr, xp.reshape(Wc, (-1,))), (b, m))
    z = _gather_rows(A, Wc, xp) * vf

    def mv(v):
        return xp.matmul(GW, xp.reshape(v, (b, m, 1)))[:, :, 0]

    def restricted(zz, gzz):
        """(primal, gap) of each set's problem, from its Gram quantities (``c``, ``G_W z``)."""
        return _primal_dual_gram(c, gzz, zz, x2, w, positive, xp)

    col = lambda v: xp.reshape(v, (b, 1))  # noqa: E731
    if L_fixed > 0:
        L = xp.full((b,), L_fixed, dtype=G.dtype, device=dev)
    else:  # backtracking from max_a G_aa (a lower bound of ||G_W||_2) or the last round's L
        L = xp.maximum(xp.max(xp.reshape(GW, (b, m * m))[:, ::m + 1], axis=1), L_state)
        L = xp.where(L > 0, L, xp.ones_like(L))
    gz = mv(z)
    y, gy = z, gz
    t = xp.ones((b,), dtype=G.dtype, device=dev)
    it = xp.zeros((b,), dtype=budget.dtype, device=dev)
    running = budget > 0
    if restart == 1:  # the step after a rejection is never rejected (see the Numba twin)
        fresh = xp.ones((b,), dtype=xp.bool, device=dev)
        f_prev = restricted(z, gz)[0]
    while bool(xp.any(running)):
        it = it + xp.astype(running, it.dtype)
        vstep = y - (gy - c) / col(L)
        tt = w / col(L)
        zn = xp.maximum(vstep - tt, xp.zeros_like(vstep))
        if not positive:
            zn = zn + xp.minimum(vstep + tt, xp.zeros_like(vstep))
        zn = zn * vf
        gzn = mv(zn)
        d = zn - y
        bad = xp.sum(d * (gzn - gy), axis=1) > L * xp.sum(d * d, axis=1) * (1.0 + 1e-12)
        reject = bad
        if restart == 1:
            f_new = restricted(zn, gzn)[0]
            rise = (f_new > f_prev + 1e-15 * (xp.abs(f_prev) + x2)) & ~fresh & ~bad
            reject = bad | rise
            f_prev = xp.where(running & ~reject, f_new, f_prev)
            fresh = xp.where(running & ~bad, rise, fresh)
        reset = xp.sum((y - zn) * (zn - z), axis=1) > 0 if restart == 2 else xp.zeros_like(bad)
        L = xp.where(running & bad, 1.5 * L, L)
        accept = running & ~reject
        back = running & reject  # momentum restarts from z
        t_acc = xp.where(reset, xp.ones_like(t), t)
        t_next = (1.0 + xp.sqrt(1.0 + 4.0 * t_acc * t_acc)) / 2.0
        beta = col((t_acc - 1.0) / t_next)
        y = xp.where(col(accept), zn + beta * (zn - z), xp.where(col(back), z, y))
        gy = xp.where(col(accept), gzn + beta * (gzn - gz), xp.where(col(back), gz, gy))
        z = xp.where(col(accept), zn, z)
        gz = xp.where(col(accept), gzn, gz)
        t = xp.where(accept, t_next, xp.where(back, xp.ones_like(t), t))
        check = accept & ((it % check_every == 0) | (it == budget))
        if bool(xp.any(check)):
            met = restricted(z, gz)[1] <= target
            running = running & ~(check & met)
        running = running & (it < budget)
    return _scatter_codes(Wc, z, k, xp, dev), it, L


@register_kernel("lasso_ws_certify_select", "numpy")
def _ws_certify_select_numpy(A, G, C, x2, thr, inv_norm, positive, m0, xp=None):
    """Numba twin of ``_ws_certify_select_portable`` (its sparse ``A @ G`` reads nnz rows of
    ``G`` per sample)."""
    from ._lasso_numba import certify_select, certify_select_serial

    n, k = A.shape
    fn = certify_select_serial if A.size * 64 < _PARALLEL_MIN_WORK else certify_select
    primal, gap = np.empty(n), np.empty(n)
    # the largest set the kernel can choose, so that W is (n, |W|max), not (n, n_atoms)
    m = min(k, max(int(m0), 2 * int(np.count_nonzero(A, axis=1).max()))) if n else 0
    W = np.empty((n, m), dtype=np.int64)
    sizes = np.empty(n, dtype=np.int64)
    fn(np.ascontiguousarray(A), G, np.ascontiguousarray(C), x2, thr, inv_norm, bool(positive), int(m0),
       primal, gap, W, sizes)
    return primal, gap, W, sizes


@register_kernel("lasso_ws_subproblems", "numpy")
def _ws_subproblems_numpy(G, C, x2, A, W, sizes, thr, positive, budget, target, restart, check_every,
                          L_fixed, L_state, xp=None):
    from ._lasso_numba import fista_subproblems, fista_subproblems_serial

    n, m = W.shape
    fn = fista_subproblems if n * m * m * 8 >= _PARALLEL_MIN_WORK else fista_subproblems_serial
    A = np.array(A, dtype=np.float64, order="C")  # a copy: the kernel writes the sets' codes into it
    n_it = np.zeros(n, dtype=np.int64)
    gaps = np.empty(n)
    L_state = np.array(L_state, dtype=np.float64)  # a copy, returned updated
    fn(G, np.ascontiguousarray(C), x2, A, np.ascontiguousarray(W), np.ascontiguousarray(sizes, dtype=np.int64),
       thr, bool(positive), np.ascontiguousarray(budget, dtype=np.int64), np.ascontiguousarray(target),
       int(restart), int(check_every), float(L_fixed), L_state, n_it, gaps)
    return A, n_it, L_state


_GRAM_MAX_BYTES = 1 << 30  # above this the Gram matrix costs more memory than it saves
_PARALLEL_MIN_WORK = 1 << 22  # n * k^2 below which the serial kernel wins (thread wake-up)
_SPARSE_KERNEL_MAX_DENSITY = 0.3  # measured: above ~30% non-zeros dense BLAS wins


def _density(Y, xp):
    return float(xp.mean(xp.astype(Y != 0, Y.dtype))) if Y.shape[0] else 0.0


@register_kernel("lasso_prox_grad_gram", "numpy")
def _prox_grad_gram_numpy(Y, G, C, L, thr, positive, A_prev=None):
    """Kernel step; with ``A_prev`` also returns the per-row restart test ``(y-z).(z-a)``."""
    from ._lasso_numba import prox_grad_gram, prox_grad_gram_serial

    if Y.size * Y.shape[1] < _PARALLEL_MIN_WORK:
        prox_grad_gram = prox_grad_gram_serial
    Y = np.ascontiguousarray(Y)
    C = np.ascontiguousarray(C)
    Z = np.empty_like(Y)
    want = A_prev is not None
    dots = np.empty(Y.shape[0], dtype=np.float64)
    Ap = np.ascontiguousarray(A_prev) if want else Y
    prox_grad_gram(Y, G, C, float(Y.dtype.type(L)), np.ascontiguousarray(thr, dtype=Y.dtype), bool(positive),
                   Z, Ap, dots, want)
    return (Z, dots) if want else Z


@register_kernel("lasso_fista_step_gram", "numpy")
def _fista_step_gram_numpy(Y, G, C, L, thr, positive, A_prev, t, gradient_restart):
    """(Z, Y_next, t_next, number of restarts) of one FISTA step; see ``_lasso_numba``."""
    from ._lasso_numba import fista_step_gram, fista_step_gram_serial

    fn = fista_step_gram_serial if Y.size * Y.shape[1] < _PARALLEL_MIN_WORK else fista_step_gram
    Y, C = np.ascontiguousarray(Y), np.ascontiguousarray(C)
    Z, Y_next = np.empty_like(Y), np.empty_like(Y)
    t = np.array(t, copy=True)
    restarted = np.zeros(Y.shape[0], dtype=np.bool_)
    fn(Y, G, C, float(Y.dtype.type(L)), np.ascontiguousarray(thr, dtype=Y.dtype), bool(positive),
       np.ascontiguousarray(A_prev), t, bool(gradient_restart), Z, Y_next, restarted)
    return Z, Y_next, t, int(restarted.sum())


@register_kernel("lasso_sparse_times_gram", "numpy")
def _sparse_times_gram_numpy(A, G):
    from ._lasso_numba import sparse_times_gram, sparse_times_gram_serial

    if A.size * A.shape[1] < _PARALLEL_MIN_WORK:
        sparse_times_gram = sparse_times_gram_serial
    A = np.ascontiguousarray(A)
    return sparse_times_gram(A, G, np.empty(A.shape, dtype=np.float64))


def _primal_dual_gram(XDt, Q, A, x2, alpha, positive, xp, correlations=False):
    """Primal and gap from Gram quantities (float64): ``D r = c - A G``,
    ``||r||^2 = ||x||^2 - 2 a.c + a.(A G)``, ``x.r = ||x||^2 - a.c``; no residual formed.
    With ``correlations`` also ``D r`` per row and the dual scale."""
    if XDt.dtype != xp.float64:
        XDt, A = xp.astype(XDt, xp.float64), xp.astype(A, xp.float64)
        if not isinstance(alpha, float):
            alpha = xp.astype(alpha, xp.float64)
    ac = xp.sum(A * XDt, axis=1)
    r2 = xp.maximum(x2 - 2.0 * ac + xp.sum(A * Q, axis=1), xp.zeros_like(x2))
    C = XDt - Q
    primal = 0.5 * r2 + _l1(A, alpha, xp)
    s = _dual_scale(C, alpha, positive, xp)
    dual = s * (x2 - ac) - 0.5 * s * s * r2
    gap = xp.maximum(primal - dual, xp.zeros_like(primal))
    return (primal, gap, C, s) if correlations else (primal, gap)


def _backtrack(Y, G_y, X_, La, prox, smooth, alpha, xp, eta=2.0, max_tries=60):
    """Beck-Teboulle backtracking, per sample: grow L until the quadratic model majorises."""
    f_y = smooth(Y, X_)
    for _ in range(max_tries):
        Z = prox(Y - G_y / La, alpha / La)
        dZ = Z - Y
        model = f_y + xp.sum(G_y * dZ, axis=1) + 0.5 * La[:, 0] * xp.sum(dZ * dZ, axis=1)
        # small relative slack absorbs rounding when the model is tight
        bad = smooth(Z, X_) > model + 1e-12 * xp.abs(model)
        if not bool(xp.any(bad)):
            return Z, La
        La = xp.where(bad[:, None], La * eta, La)
    return Z, La


def _record(hist, it, elapsed, certify, xp, done_idx, done_A, idx, Aa):
    """Append the objective/gap of *all* samples (finished ones at their final codes)."""
    parts_A = done_A + [Aa]
    parts_i = done_idx + [idx]
    codes = xp.concat(parts_A, axis=0) if len(parts_A) > 1 else Aa
    order = xp.argsort(xp.concat(parts_i)) if len(parts_i) > 1 else None
    if order is not None:
        codes = xp.take(codes, order, axis=0)
    primal, gap = certify(codes)
    hist["iteration"].append(it)
    hist["objective"].append(float(xp.mean(primal)))
    hist["gap"].append(float(xp.mean(gap)))
    hist["relative_gap"].append(float(xp.max(_relative(gap, primal, xp))))
    hist["time"].append(elapsed)


def _device(x):
    import array_api_compat

    return array_api_compat.device(x)
