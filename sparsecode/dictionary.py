"""Dictionary learning by alternating minimisation: batch and online (streamed), three updates.

Problem (Lasso coding, ``method="fista"`` or ``"ista"``)::

    min_{D, A}  mean_i  0.5 * ||x_i - a_i @ D||_2^2 + alpha * ||a_i||_1     s.t. ||d_j||_2 = 1

and with a greedy coding step (``"omp"``, ``"mp"``, ``"iht"``) the same reconstruction error
subject to ``||a_i||_0 <= n_nonzero``. Shapes: ``X`` (n_samples, n_features), the dictionary
``D`` (n_atoms, n_features) with atoms as rows, codes ``A`` (n_samples, n_atoms), ``X ~ A @ D``.

Each round (one batch, or the whole data set in the batch version):

1. **coding**: the library's solver for ``method`` (``sparsecode.encode.get_solver``) on the
   current dictionary, warm-started from the previous codes of the same samples where the
   solver allows it (FISTA/ISTA, whenever the samples are known: :func:`learn_dictionary`);
2. **dictionary update** (``update``):

   * ``"bcd"`` -- block coordinate descent on the statistics ``S = sum a^T a`` (n_atoms,
     n_atoms) and ``B = sum a^T x`` (n_atoms, n_features) (Mairal, Bach, Ponce & Sapiro 2010):
     ``d_j <- d_j + (B_j - S_j @ D) / S_jj``, projected on the unit ball. In the online
     version the statistics are accumulated with a forgetting factor
     ``beta_t = (1 - 1/(t + t0)) ** forgetting`` (``t`` counts batches), in the batch version
     they are recomputed from the current codes of all samples;
   * ``"mod"`` -- method of optimal directions (Engan et al. 1999): the least-squares
     dictionary ``D = S^{-1} B`` (a tiny ridge keeps it defined), the online version being
     recursive least squares on the same forgotten statistics;
   * ``"ksvd"`` -- K-SVD (Aharon, Elad & Bruckstein 2006): for each atom, the best rank-1
     approximation ``g d^T`` of the residual of the signals that use it, with the atom removed;
     the atom becomes ``d`` and those signals' codes ``g``. ``ksvd_svd="exact"`` takes the
     leading singular pair, ``"power"`` one power iteration from the current codes (the
     approximate K-SVD of Rubinstein, Zibulevsky & Elad 2008; no SVD, much cheaper). K-SVD
     works on the signals of the current batch: in the online version the batch must hold
     enough signals for every atom to be used several times.
3. atoms renormalised to unit norm (in the batch version the codes are rescaled so that
   ``A @ D`` is unchanged);
4. **dead atoms**: an atom unused for ``dead_after`` consecutive samples is re-initialised
   from the residual of the worst reconstructed signal of the batch, and its statistics are
   reset; counts go to ``history["resampled"]`` and ``n_resampled``.

With ``update="bcd"`` and a Lasso solver the batch version decreases the objective at every
round: the coding step is warm-started and keeps, per sample, the better of the old and new
codes; each BCD step minimises exactly over one atom in the unit ball; and renormalising an
atom of norm <= 1 while scaling its codes up keeps ``A @ D`` and does not raise the penalty.
(Re-initialising a dead atom is harmless, its codes are zero; replacing a *used* near-duplicate
atom, see ``duplicate_threshold``, may raise the objective once: pass
``duplicate_threshold=None`` for the strict guarantee.)

Duplicates: an atom whose ``|cos|`` with another exceeds ``duplicate_threshold`` (default
0.95) is re-initialised like a dead atom (the less used of the pair). Online learning falls
into such local minima (two atoms sharing one true direction while another direction is
missing); replacing one of them from a badly reconstructed signal gets it out.

Long runs: a tqdm bar (objective, L0, dead atoms), checkpoints every ``checkpoint_every``
batches written atomically (temporary file, then ``os.replace``) with the dictionary, the
statistics, the RNG state and the stream position, resumed automatically when the file
exists; stops on ``tol``, ``max_time`` (seconds) or ``max_samples``.
"""

from __future__ import annotations

import io
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

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

__all__ = [
    "learn_dictionary",
    "learn_dictionary_online",
    "DictionaryLearningResult",
    "DictionaryLearning",
    "SparseEncoder",
    "UPDATES",
    "METHODS",
]

UPDATES = ("bcd", "mod", "ksvd")
METHODS = ("fista", "ista", "omp", "mp", "iht")
_LASSO = ("fista", "ista")
_CHECKPOINT_VERSION = 1


# --------------------------------------------------------------------------- result
@dataclass
class DictionaryLearningResult:
    """What a dictionary-learning run returns.

    Attributes
    ----------
    dictionary : array (n_atoms, n_features), unit-norm atoms as rows, in the data's namespace
    history : dict of NumPy arrays, one entry per batch (per round in the batch version):
        ``batch``, ``epoch``, ``n_samples`` (seen so far), ``time`` (seconds since the start,
        summed over resumed sessions), ``objective`` (mean per-sample objective of the coding
        step on that batch: Lasso ``0.5||r||^2 + alpha||a||_1``, or ``||r||^2`` for pursuits),
        ``rel_error`` (``sum ||r||^2 / sum ||x||^2``), ``l0`` (mean non-zeros per sample),
        ``dead`` (atoms unused for ``dead_after`` samples), ``resampled`` (atoms re-initialised),
        ``change`` (``||D_new - D_old||_F / ||D_old||_F``).
    n_batches, n_samples_seen : int
    n_epochs : float, passes over the data (fractional when stopped mid-epoch)
    n_resampled : int, dead atoms re-initialised in total
    stop_reason : "n_iter", "tol", "max_time", "max_samples", "max_batches", "exhausted"
        (a one-pass stream ended) or "callback"
    converged : bool, whether ``tol`` was met
    alpha, n_nonzero : the coding parameters used (``alpha`` resolved when it was None)
    codes : array (n_samples, n_atoms) or None, the last codes of every sample (batch version)
    state : dict, the learner's state (statistics, counters) for continuing a run
    """

    dictionary: Any
    history: dict
    n_batches: int
    n_epochs: float
    n_samples_seen: int
    n_resampled: int
    stop_reason: str
    converged: bool
    method: str
    update: str
    alpha: float | None = None
    n_nonzero: int | None = None
    codes: Any = None
    state: dict = field(default_factory=dict, repr=False)

    @property
    def components_(self):
        return self.dictionary


_HISTORY_KEYS = ("batch", "epoch", "n_samples", "time", "objective", "rel_error", "l0", "dead",
                 "resampled", "change")


# --------------------------------------------------------------------------- validation
def _check_choice(value, name, choices):
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def _check_bool(value, name):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def _make_config(n_atoms, *, method, update, alpha, n_nonzero, positive, batch_size, forgetting,
                 forgetting_offset, dead_after, ksvd_svd, bcd_sweeps, tol, seed, solver_options,
                 init, duplicate_threshold=None):
    n_atoms = check_scalar(n_atoms, "n_atoms", low=1, integer=True)
    method = _check_choice(method, "method", METHODS)
    update = _check_choice(update, "update", UPDATES)
    if alpha is not None:
        if not (isinstance(alpha, (int, float, np.integer, np.floating)) and not isinstance(alpha, bool)):
            raise TypeError(f"alpha must be a number >= 0 or None, got {type(alpha).__name__}")
        alpha = check_scalar(alpha, "alpha", low=0.0)
    if n_nonzero is not None:
        n_nonzero = check_scalar(n_nonzero, "n_nonzero", low=1, integer=True)
    positive = _check_bool(positive, "positive")
    if batch_size is not None:
        batch_size = check_scalar(batch_size, "batch_size", low=1, integer=True)
    forgetting = check_scalar(forgetting, "forgetting", low=0.0)
    forgetting_offset = check_scalar(forgetting_offset, "forgetting_offset", low=0.0)
    if dead_after is not None:
        dead_after = check_scalar(dead_after, "dead_after", low=1, integer=True)
    ksvd_svd = _check_choice(ksvd_svd, "ksvd_svd", ("exact", "power"))
    if bcd_sweeps is not None:
        bcd_sweeps = check_scalar(bcd_sweeps, "bcd_sweeps", low=1, integer=True)
    tol = check_scalar(tol, "tol", low=0.0, allow_none=True)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if solver_options is None:
        solver_options = {}
    if not isinstance(solver_options, dict):
        raise TypeError(f"solver_options must be a dict, got {type(solver_options).__name__}")
    if isinstance(init, str):
        _check_choice(init, "init", ("signals", "gaussian"))
    if duplicate_threshold is not None:
        duplicate_threshold = check_scalar(duplicate_threshold, "duplicate_threshold", low=0.0, low_inclusive=False)
        if duplicate_threshold >= 1.0:
            raise ValueError(f"duplicate_threshold must be in (0, 1) or None, got {duplicate_threshold!r}")
    return {
        "duplicate_threshold": duplicate_threshold,
        "n_atoms": n_atoms, "method": method, "update": update, "alpha": alpha,
        "n_nonzero": n_nonzero, "positive": positive, "batch_size": batch_size,
        "forgetting": forgetting, "forgetting_offset": forgetting_offset,
        "dead_after": dead_after, "ksvd_svd": ksvd_svd, "bcd_sweeps": bcd_sweeps, "tol": tol,
        "seed": int(seed), "solver_options": dict(solver_options),
        "init": init if isinstance(init, str) else "array",
    }


def _check_batch(Xb, n_features, dtype, xp, where):
    """A batch must be a finite float 2-D array of the stream's width and dtype."""
    name = f"batch {where}"
    Xb = check_array(Xb, name, ndim=2)
    if n_features is not None and Xb.shape[1] != n_features:
        raise ValueError(
            f"{name} has {Xb.shape[1]} features but earlier batches had {n_features}: "
            "every batch of a stream must have the same width (n_features)"
        )
    if dtype is not None and Xb.dtype != dtype:
        raise TypeError(f"{name} has dtype {Xb.dtype} but earlier batches had {dtype}")
    return Xb


# --------------------------------------------------------------------------- learner
class _Learner:
    """The state of one dictionary-learning run and the step that advances it.

    State: the dictionary ``D``, the statistics ``S`` (n_atoms, n_atoms) and ``B``
    (n_atoms, n_features), the per-atom count of samples since last use, counters, the
    random generator (host NumPy), and optionally the codes of every sample (batch version).
    """

    def __init__(self, cfg, xp, dtype, n_features, D, *, n_samples_total=None):
        self.cfg = cfg
        self.xp = xp
        self.dtype = dtype
        self.n_features = n_features
        self.D = D
        k = cfg["n_atoms"]
        self.S = xp.zeros((k, k), dtype=dtype, device=_device(D))
        self.B = xp.zeros((k, n_features), dtype=dtype, device=_device(D))
        self.since_used = np.zeros(k, dtype=np.int64)
        self.t = 0
        self.seen = 0
        self.epoch = 0
        self.pos = 0  # batches consumed in the current epoch
        self.n_resampled = 0
        self.elapsed = 0.0
        self.rng = np.random.default_rng([cfg["seed"], 7])
        self.history = {key: [] for key in _HISTORY_KEYS}
        self.codes = None  # (n_samples_total, n_atoms) cache for warm starts
        if n_samples_total is not None:
            self.codes = xp.zeros((n_samples_total, k), dtype=dtype, device=_device(D))
        self.power_vec = None
        self.alpha = cfg["alpha"]
        self.n_nonzero = cfg["n_nonzero"]
        self.converged = False
        self.stop_reason = None
        self.prev_objective = None

    # ------------------------------------------------------------------ coding
    def resolve_coding_parameters(self, Xb):
        """Defaults from the first batch: ``alpha = 1.2 / sqrt(n_features) * mean ||x||``
        (Mairal et al.'s ``1.2 / sqrt(m)`` for unit-norm signals, rescaled to the data), and
        ``n_nonzero = max(1, n_features // 10)``."""
        xp = self.xp
        if self.cfg["method"] in _LASSO and self.alpha is None:
            mean_norm = float(xp.mean(xp.linalg.vector_norm(Xb, axis=1)))
            self.alpha = float(1.2 / np.sqrt(self.n_features) * mean_norm)
        if self.cfg["method"] not in _LASSO and self.n_nonzero is None:
            self.n_nonzero = max(1, self.n_features // 10)

    def lipschitz(self):
        """``||D||_2^2`` by power iteration on ``D.T @ D`` or ``D @ D.T``, warm-started from
        the previous leading vector, with a 2% margin (the Rayleigh quotient is a lower bound)."""
        xp = self.xp
        D = self.D
        k, f = D.shape
        M = D.T @ D if f <= k else D @ D.T
        n = M.shape[0]
        v = self.power_vec
        if v is None or v.shape[0] != n:
            v = asarray_like(self.rng.standard_normal(n), D)
        lam = 0.0
        for _ in range(100):
            w = M @ v
            nrm = float(xp.linalg.vector_norm(w))
            if nrm == 0.0:
                return 1.0
            new = float(xp.sum(v * w)) / float(xp.sum(v * v))
            v = w / nrm
            if abs(new - lam) <= 1e-6 * abs(new):
                lam = new
                break
            lam = new
        self.power_vec = v
        return max(lam * 1.02, 1e-12)

    def code(self, Xb, init):
        from .encode import get_solver

        cfg = self.cfg
        solver = get_solver(cfg["method"])
        opts = dict(cfg["solver_options"])
        if cfg["method"] in _LASSO:
            opts.setdefault("max_iter", 50)
            opts.setdefault("tol", 1e-3)
            opts.setdefault("lipschitz", self.lipschitz())
            if init is not None:
                opts["init"] = init
            res = solver(Xb, self.D, self.alpha, positive=cfg["positive"], **opts)
        elif cfg["method"] == "iht":
            res = solver(Xb, self.D, self.n_nonzero, positive=cfg["positive"], **opts)
        else:
            res = solver(Xb, self.D, n_nonzero=self.n_nonzero, positive=cfg["positive"], **opts)
        return res.codes

    def objective(self, Xb, Ab, R=None):
        """Per-sample objective of the coding method and the residual."""
        xp = self.xp
        if R is None:
            R = Xb - Ab @ self.D
        r2 = xp.sum(R * R, axis=1)
        if self.cfg["method"] in _LASSO:
            return 0.5 * r2 + self.alpha * xp.sum(xp.abs(Ab), axis=1), R
        return r2, R

    # ------------------------------------------------------------------ one round
    def step(self, Xb, idx=None, *, full_batch=False):
        """Code one batch, update the dictionary, renormalise, handle dead atoms.

        ``idx`` (NumPy int array) are the batch's sample indices into the code cache, when
        known; ``full_batch`` means the batch is the whole data set (statistics replaced).
        """
        xp = self.xp
        cfg = self.cfg
        t0 = time.perf_counter()
        n_b = Xb.shape[0]
        self.resolve_coding_parameters(Xb)
        D_old = self.D

        init = None
        idx_x = None
        if self.codes is not None and idx is not None:
            idx_x = asarray_like(np.asarray(idx, dtype=np.int64), self.codes, dtype=xp.int64)
            init = self.codes if full_batch else xp.take(self.codes, idx_x, axis=0)
        use_init = init is not None and cfg["method"] in _LASSO and bool(xp.any(init != 0))
        Ab = self.code(Xb, init if use_init else None)
        obj, R = self.objective(Xb, Ab)
        if use_init:
            # keep, per sample, the better of the warm start and the new codes (monotone)
            obj0, R0 = self.objective(Xb, init)
            worse = obj > obj0
            if bool(xp.any(worse)):
                Ab = xp.where(worse[:, None], init, Ab)
                R = xp.where(worse[:, None], R0, R)
                obj = xp.where(worse, obj0, obj)
        mean_obj = float(xp.mean(obj))
        x2 = float(xp.sum(Xb * Xb))
        rel_err = float(xp.sum(R * R)) / x2 if x2 > 0 else 0.0
        used = xp.any(Ab != 0, axis=0)
        l0 = float(xp.mean(xp.sum(xp.astype(Ab != 0, xp.float64 if _has_f64(xp) else xp.float32), axis=1)))

        # ----- dictionary update
        self.t += 1
        upd = cfg["update"]
        if upd in ("bcd", "mod"):
            if full_batch:
                self.S = Ab.T @ Ab
                self.B = Ab.T @ Xb
            else:
                beta = (1.0 - 1.0 / (self.t + cfg["forgetting_offset"])) ** cfg["forgetting"]
                self.S = beta * self.S + Ab.T @ Ab
                self.B = beta * self.B + Ab.T @ Xb
            if upd == "bcd":
                sweeps = cfg["bcd_sweeps"] or (10 if full_batch else 1)
                D = _bcd(self.D, self.S, self.B, sweeps, xp)
            else:
                D = _mod(self.D, self.S, self.B, xp)
        else:
            D, Ab = _ksvd(self.D, Xb, Ab, R, exact=cfg["ksvd_svd"] == "exact", xp=xp)
        # ----- renormalise (codes rescaled so that A @ D is unchanged)
        norms = xp.linalg.vector_norm(D, axis=1)
        ok = norms > 1e-10 * max(1.0, float(xp.max(norms)))
        safe = xp.where(ok, norms, xp.ones_like(norms))
        D = D / safe[:, None]
        Ab = Ab * safe[None, :]
        # ----- dead atoms
        used_np = to_numpy(used).astype(bool) & to_numpy(ok).astype(bool)
        self.since_used += n_b
        self.since_used[used_np] = 0
        dead_after = cfg["dead_after"]
        if dead_after is None:
            dead_after = n_b if full_batch else max(10 * cfg["n_atoms"], n_b)
        dead_np = (self.since_used >= dead_after) | ~to_numpy(ok).astype(bool)
        n_dead = int(dead_np.sum())
        to_reset = dead_np.copy()
        every = 1 if cfg["n_atoms"] <= 1024 else cfg["n_atoms"] // 256
        if cfg["duplicate_threshold"] is not None and (full_batch or self.t % every == 0):
            usage = to_numpy(xp.sum(xp.astype(Ab != 0, xp.int64), axis=0))
            to_reset |= _duplicates(D, usage, cfg["duplicate_threshold"], to_reset, xp)
        n_reset = int(to_reset.sum())
        if n_reset:
            D, Ab = self._resample(D, Ab, R, to_reset)
        self.D = D
        if self.codes is not None and idx_x is not None:
            if full_batch:
                self.codes = Ab
            else:
                self.codes = _scatter_rows(self.codes, idx_x, Ab, xp)
        # ----- book-keeping
        change = float(xp.linalg.vector_norm(xp.reshape(D - D_old, (-1,)))) / float(
            xp.linalg.vector_norm(xp.reshape(D_old, (-1,))))
        self.seen += n_b
        self.pos += 1
        self.elapsed += time.perf_counter() - t0
        row = {"batch": self.t, "epoch": self.epoch, "n_samples": self.seen, "time": self.elapsed,
               "objective": mean_obj, "rel_error": rel_err, "l0": l0, "dead": n_dead,
               "resampled": n_reset, "change": change}
        for key in _HISTORY_KEYS:
            self.history[key].append(row[key])
        return row

    def _resample(self, D, Ab, R, dead_np):
        """Dead atoms become the (normalised) residuals of the worst reconstructed signals."""
        xp = self.xp
        k = D.shape[0]
        dead_idx = np.flatnonzero(dead_np)
        m = dead_idx.shape[0]
        rn = to_numpy(xp.linalg.vector_norm(R, axis=1)).astype(np.float64)
        order = np.argsort(-rn, kind="stable")[:m]
        R_np = to_numpy(R)
        D_np = np.array(to_numpy(D), copy=True)
        for j, i in zip(dead_idx, np.concatenate([order, -np.ones(m - order.shape[0], dtype=np.int64)])):
            v = R_np[i].astype(np.float64) if i >= 0 else np.zeros(D_np.shape[1])
            nv = np.linalg.norm(v)
            if not np.isfinite(nv) or nv <= 1e-12:
                v = self.rng.standard_normal(D_np.shape[1])
                nv = np.linalg.norm(v)
            D_np[j] = v / nv
        D = asarray_like(D_np, D)
        keep = asarray_like((~dead_np).astype(np.float64), D)
        Ab = Ab * keep[None, :]
        self.S = self.S * keep[:, None] * keep[None, :]
        self.B = self.B * keep[:, None]
        self.since_used[dead_np] = 0
        self.n_resampled += int(m)
        return D, Ab

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self):
        arrays = {"D": to_numpy(self.D), "S": to_numpy(self.S), "B": to_numpy(self.B),
                  "since_used": self.since_used}
        if self.codes is not None:
            arrays["codes"] = to_numpy(self.codes)
        if self.power_vec is not None:
            arrays["power_vec"] = to_numpy(self.power_vec)
        for key in _HISTORY_KEYS:
            arrays["history_" + key] = np.asarray(self.history[key], dtype=np.float64)
        meta = {"version": _CHECKPOINT_VERSION, "config": self.cfg, "t": self.t, "seen": self.seen,
                "epoch": self.epoch, "pos": self.pos, "n_resampled": self.n_resampled,
                "elapsed": self.elapsed, "rng": self.rng.bit_generator.state, "alpha": self.alpha,
                "n_nonzero": self.n_nonzero, "converged": self.converged,
                "stop_reason": self.stop_reason, "prev_objective": self.prev_objective,
                "n_features": self.n_features}
        return arrays, meta

    def load_state_dict(self, arrays, meta):
        like = self.D
        self.D = asarray_like(arrays["D"], like)
        self.S = asarray_like(arrays["S"], like)
        self.B = asarray_like(arrays["B"], like)
        self.since_used = np.asarray(arrays["since_used"], dtype=np.int64).copy()
        if "codes" in arrays and self.codes is not None:
            self.codes = asarray_like(arrays["codes"], like)
        self.power_vec = asarray_like(arrays["power_vec"], like) if "power_vec" in arrays else None
        for key in _HISTORY_KEYS:
            self.history[key] = list(np.asarray(arrays["history_" + key]).tolist())
        for key in ("t", "seen", "epoch", "pos", "n_resampled", "elapsed", "alpha", "n_nonzero",
                    "converged", "stop_reason", "prev_objective"):
            setattr(self, key, meta[key])
        self.rng.bit_generator.state = meta["rng"]


def _has_f64(xp):
    return hasattr(xp, "float64")


def _device(x):
    import array_api_compat

    return array_api_compat.device(x)


def _scatter_rows(M, idx, rows, xp):
    """``M[idx] = rows`` without integer-array assignment (not in the array API): NumPy
    assigns in place; other namespaces rebuild ``M`` with a one-hot selection."""
    if backend_name(xp) in ("numpy", "cupy", "torch"):
        M[idx, ...] = rows
        return M
    n = M.shape[0]
    # place row r of `rows` at idx[r]: sort idx and use searchsorted to map every row of M
    order = xp.argsort(idx)
    sidx = xp.take(idx, order)
    j = xp.searchsorted(sidx, xp.arange(n, dtype=sidx.dtype))
    j = xp.minimum(j, xp.full_like(j, sidx.shape[0] - 1))
    hit = xp.take(sidx, j) == xp.arange(n, dtype=sidx.dtype)
    src = xp.take(order, j)
    gathered = xp.take(rows, src, axis=0)
    return xp.where(hit[:, None], gathered, M)


def _duplicates(D, usage, threshold, already, xp, block=1024):
    """Atoms that nearly duplicate another (``|cos| > threshold``, unit atoms): of each such
    pair the one used less in the batch is marked (unless its partner is already being reset).

    ``D @ D.T`` is formed in row blocks of ``block`` atoms on the device; only the rows of
    candidate atoms come back to the host (memory O(block * n_atoms))."""
    k = D.shape[0]
    partners = {}
    for start in range(0, k, block):
        stop = min(start + block, k)
        C = xp.abs(D[start:stop, :] @ D.T)
        # zero the diagonal of this block: entries (i, start + i)
        eye = xp.astype(xp.arange(stop - start)[:, None] + start == xp.arange(k)[None, :], C.dtype)
        C = C * (1 - eye)
        hit = to_numpy(xp.max(C, axis=1) > threshold).astype(bool)
        if hit.any():
            C_np = to_numpy(C)
            for i in np.flatnonzero(hit):
                partners[start + int(i)] = np.flatnonzero(C_np[i] > threshold)
    marked = np.zeros(k, dtype=bool)
    # visit the least used first: each gives way to a partner that stays
    for j in sorted(partners, key=lambda j: (usage[j], -j)):
        if already[j] or marked[j]:
            continue
        p = partners[j]
        if np.any(~(already[p] | marked[p])):
            marked[j] = True
    return marked


# --------------------------------------------------------------------------- updates
def _bcd(D, S, B, sweeps, xp):
    """Block coordinate descent on ``0.5 tr(D^T S D) - tr(D^T B)`` over atoms in the unit ball.

    For atom ``j``: ``u = d_j + (B_j - S_j @ D) / S_jj``, ``d_j = u / max(||u||, 1)``, the exact
    minimiser over ``d_j`` with the other atoms fixed. Atoms with ``S_jj == 0`` (unused) stay.
    """
    D = xp.asarray(D, copy=True)
    k = D.shape[0]
    diag = to_numpy(xp.linalg.diagonal(S)) if hasattr(xp, "linalg") and hasattr(xp.linalg, "diagonal") \
        else to_numpy(xp.diagonal(S))
    tiny = 1e-12 * max(1.0, float(np.max(np.abs(diag))))
    active = [j for j in range(k) if diag[j] > tiny]
    for _ in range(sweeps):
        max_step = 0.0
        for j in active:
            s_j = S[j, :]
            u = D[j, :] + (B[j, :] - s_j @ D) / float(diag[j])
            nrm = float(xp.linalg.vector_norm(u))
            new = u / max(nrm, 1.0)
            step = float(xp.max(xp.abs(new - D[j, :])))
            max_step = max(max_step, step)
            D[j, :] = new
        if max_step < 1e-7:
            break
    return D


def _mod(D, S, B, xp):
    """Least-squares dictionary ``argmin_D ||X - A D||^2 = S^{-1} B`` (tiny ridge); atoms whose
    statistics are empty keep their old value."""
    k = S.shape[0]
    diag = xp.linalg.diagonal(S)
    scale = float(xp.max(diag)) if k else 0.0
    if scale <= 0:
        return D
    eye = xp.eye(k, dtype=S.dtype, device=_device(S))
    ridge = 1e-10 * scale
    D_new = xp.linalg.solve(S + ridge * eye, B)
    unused = diag <= 1e-12 * scale
    return xp.where(unused[:, None], D, D_new)


def _ksvd(D, X, A, R, *, exact, xp):
    """One K-SVD sweep on a batch: per atom, the rank-1 fit of the residual of its users.

    ``R = X - A @ D`` on entry; with ``E = R + a_j d_j^T`` restricted to the users of atom
    ``j`` (rows with ``a_j != 0``), the atom becomes ``d`` and the users' codes ``g`` where
    ``g d^T`` is the best rank-1 approximation of ``E`` (exact: leading singular pair; power:
    ``d = E^T a_j / ||E^T a_j||``, ``g = E d``). Then ``R`` is updated on the users.
    The portable code uses dense masked operations (no scatter): rows that do not use atom
    ``j`` have ``a_j = 0`` and contribute nothing to ``E^T a_j``; NumPy has a gather/scatter
    kernel that touches only the users' rows.
    """
    kern = get_kernel("ksvd_sweep", xp)
    if kern is not None:
        return kern(D, A, R, exact)
    D = xp.asarray(D, copy=True)
    A = xp.asarray(A, copy=True)
    k = D.shape[0]
    for j in range(k):
        a = A[:, j]
        users = a != 0
        n_users = int(xp.sum(xp.astype(users, xp.int64)))
        if n_users == 0:
            continue
        d_old = D[j, :]
        # E = R + a d_old^T on the users;  E^T a = R^T a + (a.a) d_old
        if exact:
            uidx = xp.nonzero(users)[0]
            E = xp.take(R, uidx, axis=0) + xp.take(a, uidx)[:, None] * d_old[None, :]
            _, s, vt = xp.linalg.svd(E, full_matrices=False)
            d = vt[0, :]
            if float(xp.sum(d * d_old)) < 0:  # keep the sign close to the old atom
                d = -d
        else:
            v = R.T @ a + float(xp.sum(a * a)) * d_old
            nv = float(xp.linalg.vector_norm(v))
            if nv == 0.0:
                continue
            d = v / nv
        # g = E d on the users, 0 elsewhere
        g = xp.where(users, R @ d + a * float(xp.sum(d_old * d)), xp.zeros_like(a))
        R = R + a[:, None] * d_old[None, :] - g[:, None] * d[None, :]
        A[:, j] = g
        D[j, :] = d
    return D, A


@register_kernel("ksvd_sweep", "numpy")
def _ksvd_numpy(D, A, R, exact):
    """NumPy K-SVD sweep (same algorithm as the portable code) on the users' rows only."""
    D = np.array(D, copy=True)
    A = np.array(A, copy=True)
    R = np.array(R, copy=True)
    for j in range(D.shape[0]):
        uidx = np.flatnonzero(A[:, j])
        if uidx.shape[0] == 0:
            continue
        a_u = A[uidx, j]
        d_old = D[j]
        E = R[uidx] + np.outer(a_u, d_old)
        if exact:
            _, _, vt = np.linalg.svd(E, full_matrices=False)
            d = vt[0]
            if d @ d_old < 0:
                d = -d
        else:
            v = E.T @ a_u
            nv = np.linalg.norm(v)
            if nv == 0.0:
                continue
            d = v / nv
        g = E @ d
        R[uidx] = E - np.outer(g, d)
        A[uidx, j] = g
        D[j] = d
    return D, A


# --------------------------------------------------------------------------- init
def _initial_dictionary(init, n_atoms, first_batch, rng, xp):
    """``"signals"``: distinct random rows of the first batch (Gaussian where there are fewer
    rows than atoms or a row is zero); ``"gaussian"``; or a given (n_atoms, n_features) array."""
    n, f = first_batch.shape
    if not isinstance(init, str):
        Dg = check_array(init, "init", ndim=2)
        if tuple(Dg.shape) != (n_atoms, f):
            raise ValueError(f"init must have shape ({n_atoms}, {f}) (n_atoms, n_features), got {tuple(Dg.shape)}")
        D_np = to_numpy(Dg).astype(np.float64)
    elif init == "gaussian":
        D_np = rng.standard_normal((n_atoms, f))
    else:
        m = min(n, n_atoms)
        rows = np.sort(rng.choice(n, size=m, replace=False))
        D_np = np.empty((n_atoms, f))
        D_np[:m] = to_numpy(xp.take(first_batch, asarray_like(rows, first_batch, dtype=xp.int64), axis=0))
        if m < n_atoms:
            D_np[m:] = rng.standard_normal((n_atoms - m, f))
    norms = np.linalg.norm(D_np, axis=1)
    zero = norms <= 1e-12
    if zero.any():
        D_np[zero] = rng.standard_normal((int(zero.sum()), f))
        norms = np.linalg.norm(D_np, axis=1)
    D_np = D_np / norms[:, None]
    return asarray_like(D_np, first_batch)


# --------------------------------------------------------------------------- checkpoints
def _save_checkpoint(path, learner):
    """Write the learner's state to ``path`` atomically (temp file in the same folder, fsync,
    ``os.replace``): a reader or a resumed run never sees a half-written file."""
    arrays, meta = learner.state_dict()
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    buf = io.BytesIO()
    np.savez(buf, __meta__=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8), **arrays)
    with open(tmp, "wb") as fh:
        fh.write(buf.getvalue())
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _load_checkpoint(path):
    with np.load(os.fspath(path), allow_pickle=False) as z:
        meta = json.loads(bytes(z["__meta__"]).decode())
        arrays = {key: z[key] for key in z.files if key != "__meta__"}
    if meta.get("version") != _CHECKPOINT_VERSION:
        raise ValueError(f"checkpoint {path} has version {meta.get('version')}, expected {_CHECKPOINT_VERSION}")
    return arrays, meta


_RESUME_KEYS = ("duplicate_threshold", "n_atoms", "method", "update", "alpha", "n_nonzero", "positive", "batch_size",
                "forgetting", "forgetting_offset", "dead_after", "ksvd_svd", "bcd_sweeps", "seed",
                "init")


def _check_resumable(meta, cfg, n_features, path):
    old = meta["config"]
    diff = [key for key in _RESUME_KEYS if old.get(key) != cfg.get(key)]
    if meta.get("n_features") != n_features:
        diff.append("n_features")
    if diff:
        raise ValueError(
            f"checkpoint {path} was written by a run with different settings ({', '.join(diff)}); "
            "use the same settings to resume, another checkpoint path, or resume=False"
        )


# --------------------------------------------------------------------------- sources
class _ArraySource:
    """Mini-batches of an in-memory or memory-mapped 2-D array, reshuffled every epoch with a
    permutation that depends only on (seed, epoch), so that a resumed run sees the same order."""

    def __init__(self, X, batch_size, seed, shuffle=True):
        self.X = X
        self.n = X.shape[0]
        self.batch_size = min(batch_size, self.n)
        self.seed = seed
        self.shuffle = shuffle
        self.restartable = True
        self.is_numpy = isinstance(X, np.ndarray)

    def batches(self, epoch, start):
        n, bs = self.n, self.batch_size
        perm = np.random.default_rng([self.seed, 11, epoch]).permutation(n) if self.shuffle else np.arange(n)
        n_batches = -(-n // bs)
        for b in range(start, n_batches):
            idx = np.sort(perm[b * bs:(b + 1) * bs])  # sorted: sequential reads on a memmap
            if self.is_numpy:
                Xb = np.asarray(self.X[idx])
            else:
                xp = array_namespace(self.X)
                Xb = xp.take(self.X, asarray_like(idx, self.X, dtype=xp.int64), axis=0)
            yield idx, Xb

    def n_batches(self):
        return -(-self.n // self.batch_size)

    def peek(self):
        return next(iter(self.batches(0, 0)))[1]


class _StoreSource:
    """Batches from an object with ``iter_batches(batch_size, shuffle=, seed=)`` (the
    ActivationStore), one call per epoch with seed ``(seed, epoch)``."""

    def __init__(self, store, batch_size, seed):
        self.store = store
        self.batch_size = batch_size
        self.seed = seed
        self.restartable = True

    def batches(self, epoch, start):
        it = self.store.iter_batches(self.batch_size, shuffle=True, seed=int(self.seed) * 100003 + epoch)
        for b, Xb in enumerate(it):
            if b < start:
                continue
            yield None, Xb

    def peek(self):
        return next(iter(self.batches(0, 0)), (None, None))[1]

    def n_batches(self):
        n = getattr(self.store, "n_rows", None) or (len(self.store) if hasattr(self.store, "__len__") else None)
        return None if n is None else -(-int(n) // self.batch_size)


class _IterableSource:
    """Any iterable of arrays. Re-iterable ones (lists, or a callable returning a fresh
    iterator) give several epochs; a one-shot iterator gives one pass. On resume the batches
    already consumed are read and skipped."""

    def __init__(self, batches):
        self.obj = batches
        if callable(batches):
            self.restartable = True
        else:
            self.restartable = iter(batches) is not batches
        self._used = False
        self._peeked = None

    def batches(self, epoch, start):
        if callable(self.obj):
            it = iter(self.obj())
        elif self.restartable:
            it = iter(self.obj)
        else:
            if self._used:
                return
            self._used = True
            it = self._one_shot()
        for b, Xb in enumerate(it):
            if b < start:
                continue
            yield None, Xb

    def _one_shot(self):
        if self._peeked is not None:
            yield self._peeked
            self._peeked = None
        yield from self.obj

    def peek(self):
        if callable(self.obj):
            return next(iter(self.obj()), None)
        if self.restartable:
            return next(iter(self.obj), None)
        if self._peeked is None:
            self._peeked = next(iter(self.obj), None)
        return self._peeked

    def n_batches(self):
        return len(self.obj) if hasattr(self.obj, "__len__") and not callable(self.obj) else None


def _make_source(batches, batch_size, seed):
    if isinstance(batches, (str, os.PathLike)):
        p = os.fspath(batches)
        if not p.endswith(".npy"):
            raise ValueError(f"batches given as a path must be a .npy file, got {p!r}")
        batches = np.load(p, mmap_mode="r")
    if hasattr(batches, "iter_batches"):
        return _StoreSource(batches, batch_size, seed)
    if isinstance(batches, np.ndarray) or (hasattr(batches, "__array_namespace__") and getattr(batches, "ndim", 0) == 2):
        if batches.ndim != 2:
            raise ValueError(f"batches as an array must be 2-D (n_samples, n_features), got shape {tuple(batches.shape)}")
        return _ArraySource(batches, batch_size, seed)
    if callable(batches) or hasattr(batches, "__iter__"):
        return _IterableSource(batches)
    raise TypeError(
        "batches must be a 2-D array (or memory-mapped .npy / its path), an ActivationStore "
        f"(anything with iter_batches), an iterable of arrays or a callable returning one; got {type(batches).__name__}"
    )


# --------------------------------------------------------------------------- driver
def _run(source, cfg, *, n_epochs, max_batches, max_time, max_samples, init, checkpoint,
         checkpoint_every, resume, progress, callback, xp_target, full_batch, n_samples_total):
    """Shared loop of the batch and online versions."""
    start_wall = time.perf_counter()
    resumed = None
    if checkpoint is not None and resume and os.path.exists(os.fspath(checkpoint)):
        resumed = _load_checkpoint(checkpoint)

    def convert(Xb):
        if xp_target is None:
            return Xb
        if isinstance(Xb, (list, tuple)):
            Xb = np.asarray(Xb)
        if hasattr(Xb, "__array_namespace__") and array_namespace(Xb) is not xp_target:
            Xb = xp_target.asarray(to_numpy(Xb))
        return Xb

    first = source.peek()
    if first is None:
        raise ValueError("the stream of batches is empty: nothing to learn from")
    first = _check_batch(convert(first), None, None, None, "1")
    xp = array_namespace(first)
    D0 = _initial_dictionary(init, cfg["n_atoms"], first, np.random.default_rng([cfg["seed"], 3]), xp)
    learner = _Learner(cfg, xp, first.dtype, first.shape[1], D0, n_samples_total=n_samples_total)
    del first
    if resumed is not None:
        arrays, meta = resumed
        _check_resumable(meta, cfg, learner.n_features, checkpoint)
        learner.load_state_dict(arrays, meta)
        if learner.stop_reason in ("n_iter", "max_batches", "max_samples", "max_time"):
            learner.stop_reason = None  # a budget ended that run: this call's budgets decide
    n_features, dtype = learner.n_features, learner.dtype

    total = None
    if n_epochs is not None and source.n_batches() is not None:
        total = n_epochs * source.n_batches()
    if max_batches is not None:
        total = max_batches if total is None else min(total, max_batches)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=learner.t, desc=f"dictionary ({cfg['update']})", unit="batch")

    def budget_spent():
        if n_epochs is not None and learner.epoch >= n_epochs:
            return "n_iter"
        if max_batches is not None and learner.t >= max_batches:
            return "max_batches"
        if max_samples is not None and learner.seen >= max_samples:
            return "max_samples"
        if max_time is not None and time.perf_counter() - start_wall >= max_time:
            return "max_time"
        return None

    try:
        while learner.stop_reason is None:
            reason = budget_spent()
            if reason is not None:
                learner.stop_reason = reason
                break
            got_any = False
            fresh_epoch = learner.pos == 0
            for idx, Xb in source.batches(learner.epoch, learner.pos):
                got_any = True
                where = str(learner.t + 1)
                Xb = _check_batch(convert(Xb), n_features, dtype, None, where)
                row = learner.step(Xb, idx, full_batch=full_batch)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(obj=f"{row['objective']:.4g}", l0=f"{row['l0']:.2f}", dead=row["dead"])
                if cfg["tol"] is not None:
                    if full_batch:
                        prev = learner.prev_objective
                        if prev is not None and prev - row["objective"] <= cfg["tol"] * abs(prev):
                            learner.converged, learner.stop_reason = True, "tol"
                    elif row["change"] < cfg["tol"] and learner.t > 1:
                        learner.converged, learner.stop_reason = True, "tol"
                learner.prev_objective = row["objective"]
                if learner.stop_reason is None:
                    reason = budget_spent() if n_epochs is None or learner.epoch < n_epochs else None
                    if reason is not None:
                        learner.stop_reason = reason
                    elif callback is not None and callback(learner.t, learner.D, row):
                        learner.stop_reason = "callback"
                if checkpoint is not None and (learner.t % checkpoint_every == 0 or learner.stop_reason):
                    _save_checkpoint(checkpoint, learner)
                if learner.stop_reason is not None:
                    break
            if learner.stop_reason is not None:
                break
            # end of an epoch
            learner.epoch, learner.pos = learner.epoch + 1, 0
            if (not got_any and fresh_epoch) or not source.restartable:
                learner.stop_reason = "exhausted"
    finally:
        if bar is not None:
            bar.close()
    if checkpoint is not None:  # the final state (epoch counters, stop reason) is always kept
        _save_checkpoint(checkpoint, learner)
    return learner


def _result(learner, n_batches_per_epoch):
    lr = learner
    hist = {key: np.asarray(v, dtype=np.int64 if key in ("batch", "epoch", "n_samples", "dead", "resampled") else np.float64)
            for key, v in lr.history.items()}
    n_ep = float(lr.epoch) + (lr.pos / n_batches_per_epoch if n_batches_per_epoch else 0.0)
    state = {"S": lr.S, "B": lr.B, "since_used": lr.since_used.copy(), "t": lr.t}
    return DictionaryLearningResult(
        dictionary=lr.D, history=hist, n_batches=lr.t, n_epochs=n_ep, n_samples_seen=lr.seen,
        n_resampled=lr.n_resampled, stop_reason=lr.stop_reason or "n_iter", converged=lr.converged,
        method=lr.cfg["method"], update=lr.cfg["update"], alpha=lr.alpha, n_nonzero=lr.n_nonzero,
        codes=lr.codes, state=state,
    )


# --------------------------------------------------------------------------- public API
def learn_dictionary(
    X,
    n_atoms,
    *,
    method: str = "fista",
    update: str = "bcd",
    alpha: float | None = None,
    n_nonzero: int | None = None,
    n_iter: int = 30,
    batch_size: int | None = None,
    init="signals",
    positive: bool = False,
    tol: float | None = 1e-6,
    dead_after: int | None = None,
    ksvd_svd: str = "exact",
    bcd_sweeps: int | None = None,
    forgetting: float = 6.0,
    forgetting_offset: float = 10.0,
    duplicate_threshold: float | None = 0.95,
    max_time: float | None = None,
    max_samples: int | None = None,
    checkpoint=None,
    checkpoint_every: int = 1,
    resume: bool = True,
    progress: bool = False,
    seed: int = 0,
    solver_options: dict | None = None,
    callback: Callable | None = None,
) -> DictionaryLearningResult:
    """Learn a dictionary of ``n_atoms`` unit-norm atoms from the signals ``X`` held in memory.

    Objective and algorithm: see the module docstring. With ``batch_size=None`` (default)
    every round codes all of ``X`` (warm-started from the previous round's codes for the
    Lasso solvers) and updates the dictionary from all codes: ``n_iter`` rounds at most,
    stopping early when the mean objective decreases by less than ``tol`` relatively. With
    a ``batch_size`` the rounds are mini-batches of a reshuffled ``X`` (``n_iter`` epochs),
    still warm-started from each sample's codes of the previous epoch, with statistics
    accumulated as in the online version; ``tol`` is then on the relative dictionary change.

    Parameters
    ----------
    X : array (n_samples, n_features), float32 or float64, any array-API namespace
    n_atoms : int >= 1
    method : coding step, "fista" (default), "ista", "omp", "mp" or "iht"
    update : "bcd" (default), "mod" or "ksvd"
    alpha : Lasso penalty (FISTA/ISTA); None: ``1.2 / sqrt(n_features) * mean ||x||``
    n_nonzero : non-zeros per code (OMP/MP/IHT); None: ``max(1, n_features // 10)``
    n_iter : rounds (batch) or epochs (with ``batch_size``)
    batch_size : None for the batch algorithm, else mini-batch size
    init : "signals" (random rows of ``X``), "gaussian", or an array (n_atoms, n_features)
    positive : non-negative codes
    tol : stopping tolerance (see above); None never stops early
    dead_after : samples without use after which an atom is re-initialised; None: one round
        in the batch version, ``max(10 * n_atoms, batch_size)`` with mini-batches
    duplicate_threshold : float in (0, 1) or None; of two atoms with ``|cos|`` above it the
        less used is re-initialised (None: never). Checked every batch up to 1024 atoms,
        every ``n_atoms // 256`` batches above (the check costs ``n_atoms**2 * n_features``)
    ksvd_svd : "exact" (leading singular pair) or "power" (one power iteration)
    bcd_sweeps : BCD passes over the atoms per round; None: 10 (batch, stops when the atoms
        stop moving) or 1 (mini-batches)
    forgetting, forgetting_offset : ``beta_t = (1 - 1/(t + offset)) ** forgetting`` for the
        accumulated statistics of the mini-batch version (0 keeps everything)
    max_time : seconds; max_samples : samples processed (counting repeats); budgets
    checkpoint : path of a checkpoint file (.npz content), written every ``checkpoint_every``
        rounds and at the end; an existing file is resumed from when ``resume``
    progress : tqdm bar
    seed : int; every random choice (init, shuffling, resampling) derives from it
    solver_options : extra keyword arguments for the solver (e.g. ``{"max_iter": 50}``)
    callback : ``callback(t, D, row) -> bool`` after every round; True stops

    Returns
    -------
    DictionaryLearningResult
        ``dictionary`` (n_atoms, n_features) in ``X``'s namespace, ``codes`` (n_samples,
        n_atoms) of the last round (rescaled to the final unit-norm atoms), ``history``.
    """
    xp = array_namespace(X, names=("X",))
    X = check_array(X, "X", ndim=2, xp=xp)
    cfg = _make_config(n_atoms, method=method, update=update, alpha=alpha, n_nonzero=n_nonzero,
                       positive=positive, batch_size=batch_size, forgetting=forgetting,
                       forgetting_offset=forgetting_offset, dead_after=dead_after, ksvd_svd=ksvd_svd,
                       bcd_sweeps=bcd_sweeps, tol=tol, seed=seed, solver_options=solver_options, init=init,
                       duplicate_threshold=duplicate_threshold)
    n_iter = check_scalar(n_iter, "n_iter", low=1, integer=True)
    checkpoint_every = check_scalar(checkpoint_every, "checkpoint_every", low=1, integer=True)
    _check_budgets(max_time, max_samples)
    _check_bool(progress, "progress")
    _check_bool(resume, "resume")
    if callback is not None and not callable(callback):
        raise TypeError("callback must be callable")
    n = X.shape[0]
    full = batch_size is None or batch_size >= n
    source = _ArraySource(X, n if full else batch_size, seed, shuffle=not full)
    learner = _run(source, cfg, n_epochs=n_iter, max_batches=None, max_time=max_time,
                   max_samples=max_samples, init=init, checkpoint=checkpoint,
                   checkpoint_every=checkpoint_every, resume=resume, progress=progress,
                   callback=callback, xp_target=None, full_batch=full, n_samples_total=n)
    return _result(learner, source.n_batches())


def learn_dictionary_online(
    batches,
    n_atoms,
    *,
    method: str = "fista",
    update: str = "bcd",
    alpha: float | None = None,
    n_nonzero: int | None = None,
    batch_size: int = 256,
    n_epochs: int | None = 1,
    max_batches: int | None = None,
    init="signals",
    positive: bool = False,
    tol: float | None = None,
    dead_after: int | None = None,
    ksvd_svd: str = "exact",
    bcd_sweeps: int | None = None,
    forgetting: float = 6.0,
    forgetting_offset: float = 10.0,
    duplicate_threshold: float | None = 0.95,
    max_time: float | None = None,
    max_samples: int | None = None,
    checkpoint=None,
    checkpoint_every: int = 100,
    resume: bool = True,
    progress: bool = False,
    seed: int = 0,
    solver_options: dict | None = None,
    callback: Callable | None = None,
    xp=None,
) -> DictionaryLearningResult:
    """Online (mini-batch) dictionary learning on a stream larger than memory.

    Each mini-batch is coded on the current dictionary, its statistics are added to the
    forgotten running sums (``"bcd"``, ``"mod"``) or the batch itself is used (``"ksvd"``),
    and the atoms are updated and renormalised (Mairal et al. 2010 for ``"bcd"``; see the
    module docstring). Memory is O(n_atoms * (n_atoms + n_features)) plus one batch.

    Parameters
    ----------
    batches : the data, one of
        * a 2-D array (NumPy, a ``np.memmap``/``np.load(..., mmap_mode="r")``, or another
          array-API array) or the path of a ``.npy`` file (memory-mapped): cut into shuffled
          mini-batches of ``batch_size``, a new order every epoch;
        * an object with ``iter_batches(batch_size, shuffle=..., seed=...)`` (the
          ``ActivationStore``);
        * an iterable of 2-D arrays (a list gives several epochs, a one-shot iterator one
          pass) or a callable returning a fresh iterable per epoch.
        Every batch must be a finite float array with the same width and dtype.
    n_atoms : int >= 1
    batch_size : mini-batch size for arrays and stores (iterables bring their own)
    n_epochs : passes over the data (None: until another budget or the stream ends)
    max_batches : stop after this many batches (counting resumed ones)
    tol : stop when ``||D_new - D_old||_F / ||D_old||_F < tol`` after a batch (None: never)
    xp : namespace to compute in (batches are converted to it, e.g. ``cupy``); default:
        the namespace of the batches
    Other parameters as in :func:`learn_dictionary` (``dead_after`` None means
    ``max(10 * n_atoms, batch_size)`` samples; ``checkpoint_every`` counts batches).

    Resuming: with an existing ``checkpoint`` the run continues from the stored dictionary,
    statistics, RNG state and stream position; arrays and stores replay the same shuffled
    order and skip the batches already consumed, other iterables are read and the consumed
    batches skipped (they must deliver the same stream again).

    Returns
    -------
    DictionaryLearningResult (``codes`` is None)
    """
    cfg = _make_config(n_atoms, method=method, update=update, alpha=alpha, n_nonzero=n_nonzero,
                       positive=positive, batch_size=batch_size, forgetting=forgetting,
                       forgetting_offset=forgetting_offset, dead_after=dead_after, ksvd_svd=ksvd_svd,
                       bcd_sweeps=bcd_sweeps, tol=tol, seed=seed, solver_options=solver_options, init=init,
                       duplicate_threshold=duplicate_threshold)
    if n_epochs is not None:
        n_epochs = check_scalar(n_epochs, "n_epochs", low=1, integer=True)
    if max_batches is not None:
        max_batches = check_scalar(max_batches, "max_batches", low=1, integer=True)
    checkpoint_every = check_scalar(checkpoint_every, "checkpoint_every", low=1, integer=True)
    _check_budgets(max_time, max_samples)
    _check_bool(progress, "progress")
    _check_bool(resume, "resume")
    if callback is not None and not callable(callback):
        raise TypeError("callback must be callable")
    if isinstance(batches, np.ndarray) or hasattr(batches, "__array_namespace__"):
        if batches.ndim != 2:
            raise ValueError(f"batches as an array must be 2-D (n_samples, n_features), got shape {tuple(batches.shape)}")
        if any(int(s) == 0 for s in batches.shape):
            raise ValueError(f"batches must not be empty, got shape {tuple(batches.shape)}")
    source = _make_source(batches, cfg["batch_size"], seed)
    learner = _run(source, cfg, n_epochs=n_epochs, max_batches=max_batches, max_time=max_time,
                   max_samples=max_samples, init=init, checkpoint=checkpoint,
                   checkpoint_every=checkpoint_every, resume=resume, progress=progress,
                   callback=callback, xp_target=xp, full_batch=False, n_samples_total=None)
    learner.codes = None
    return _result(learner, source.n_batches())


def _check_budgets(max_time, max_samples):
    if max_time is not None:
        check_scalar(max_time, "max_time", low=0.0, low_inclusive=False)
    if max_samples is not None:
        check_scalar(max_samples, "max_samples", low=1, integer=True)


# --------------------------------------------------------------------------- estimators
def _sklearn_base():
    from sklearn.base import BaseEstimator, TransformerMixin

    return BaseEstimator, TransformerMixin


_BaseEstimator, _TransformerMixin = _sklearn_base()


def _seed_from(random_state):
    """An int seed from scikit-learn's ``random_state`` (None: a fresh random seed)."""
    if isinstance(random_state, (int, np.integer)) and not isinstance(random_state, bool):
        return int(random_state)
    from sklearn.utils import check_random_state

    return int(check_random_state(random_state).randint(np.iinfo(np.int32).max))


def _encode_numpy(X, D, method, alpha, n_nonzero, positive, max_iter, tol):
    """Codes of NumPy ``X`` on ``D`` with the library's solver (estimators' transform)."""
    from .encode import get_solver

    solver = get_solver(method)
    if method in _LASSO:
        return solver(X, D, alpha, positive=positive, max_iter=max_iter, tol=tol).codes
    if method == "iht":
        return solver(X, D, n_nonzero, positive=positive).codes
    return solver(X, D, n_nonzero=n_nonzero, positive=positive).codes


class DictionaryLearning(_TransformerMixin, _BaseEstimator):
    """Dictionary learning as a scikit-learn transformer (NumPy in, NumPy out).

    ``fit`` runs :func:`learn_dictionary` (batch rounds, or mini-batches with ``batch_size``);
    ``partial_fit`` runs one online step (:func:`learn_dictionary_online`'s update) on the
    given batch, continuing from ``fit`` or earlier ``partial_fit`` calls; ``transform`` codes
    signals on ``components_`` with the same solver (to convergence: ``transform_max_iter``,
    ``transform_tol``); ``inverse_transform(A) = A @ components_``.

    Objective, per sample: ``0.5 ||x - a @ D||^2 + alpha ||a||_1`` (FISTA/ISTA) or the squared
    residual with ``||a||_0 <= n_nonzero`` (OMP/MP/IHT), atoms ``D`` (rows of ``components_``,
    shape (n_atoms, n_features)) of unit norm.

    Parameters mirror :func:`learn_dictionary`; ``n_atoms=None`` uses ``n_features`` atoms;
    ``random_state`` (int, RandomState or None) seeds every random choice.

    Attributes
    ----------
    components_ : ndarray (n_atoms, n_features)
    n_iter_ : batches (rounds) run in total
    alpha_, n_nonzero_ : the coding parameters used
    history_ : dict of per-round arrays (see ``DictionaryLearningResult.history``)
    n_resampled_ : dead or duplicate atoms re-initialised
    n_features_in_, feature_names_in_ : as in scikit-learn
    """

    def __init__(self, n_atoms=None, *, method="fista", update="bcd", alpha=None, n_nonzero=None,
                 n_iter=30, batch_size=None, init="signals", positive=False, tol=1e-6,
                 dead_after=None, ksvd_svd="exact", forgetting=6.0, duplicate_threshold=0.95,
                 max_time=None, solver_options=None, transform_max_iter=1000, transform_tol=1e-6,
                 progress=False, random_state=None):
        self.n_atoms = n_atoms
        self.method = method
        self.update = update
        self.alpha = alpha
        self.n_nonzero = n_nonzero
        self.n_iter = n_iter
        self.batch_size = batch_size
        self.init = init
        self.positive = positive
        self.tol = tol
        self.dead_after = dead_after
        self.ksvd_svd = ksvd_svd
        self.forgetting = forgetting
        self.duplicate_threshold = duplicate_threshold
        self.max_time = max_time
        self.solver_options = solver_options
        self.transform_max_iter = transform_max_iter
        self.transform_tol = transform_tol
        self.progress = progress
        self.random_state = random_state

    def _validate(self, X, reset):
        from sklearn.utils.validation import validate_data

        return validate_data(self, X, dtype=[np.float64, np.float32], reset=reset)

    def _n_atoms(self, n_features):
        return n_features if self.n_atoms is None else self.n_atoms

    def fit(self, X, y=None):
        """Learn ``components_`` from ``X`` (n_samples, n_features). Returns self."""
        X = self._validate(X, reset=True)
        self._seed = _seed_from(self.random_state)
        res = learn_dictionary(
            X, self._n_atoms(X.shape[1]), method=self.method, update=self.update, alpha=self.alpha,
            n_nonzero=self.n_nonzero, n_iter=self.n_iter, batch_size=self.batch_size, init=self.init,
            positive=self.positive, tol=self.tol, dead_after=self.dead_after, ksvd_svd=self.ksvd_svd,
            forgetting=self.forgetting, duplicate_threshold=self.duplicate_threshold,
            max_time=self.max_time, progress=self.progress, seed=self._seed,
            solver_options=self.solver_options,
        )
        self._set_from(res)
        self._learner = None
        return self

    def _set_from(self, res):
        self.components_ = res.dictionary
        self.n_iter_ = res.n_batches
        self.alpha_ = res.alpha
        self.n_nonzero_ = res.n_nonzero
        self.history_ = res.history
        self.n_resampled_ = res.n_resampled
        self._state = res.state

    def partial_fit(self, X, y=None):
        """One online update of the dictionary with the mini-batch ``X``. Returns self."""
        first = not hasattr(self, "components_")
        X = self._validate(X, reset=first)
        if first:
            self._seed = _seed_from(self.random_state)
        learner = getattr(self, "_learner", None)
        if learner is None:
            cfg = _make_config(
                self._n_atoms(X.shape[1]), method=self.method, update=self.update, alpha=self.alpha,
                n_nonzero=self.n_nonzero, positive=self.positive, batch_size=X.shape[0],
                forgetting=self.forgetting, forgetting_offset=10.0, dead_after=self.dead_after,
                ksvd_svd=self.ksvd_svd, bcd_sweeps=None, tol=None, seed=self._seed,
                solver_options=self.solver_options, init=self.init,
                duplicate_threshold=self.duplicate_threshold)
            if first:
                D = _initial_dictionary(self.init, cfg["n_atoms"], X, np.random.default_rng([self._seed, 3]), np)
            else:
                D = np.asarray(self.components_, dtype=X.dtype)
            learner = _Learner(cfg, np, X.dtype, X.shape[1], D)
            if not first:
                learner.alpha, learner.n_nonzero = self.alpha_, self.n_nonzero_
                st = getattr(self, "_state", None) or {}
                if "S" in st:
                    learner.S = np.asarray(st["S"], dtype=X.dtype)
                    learner.B = np.asarray(st["B"], dtype=X.dtype)
                    learner.since_used = np.asarray(st["since_used"]).copy()
                    learner.t = int(st["t"])
            self._learner = learner
        if X.dtype != learner.dtype:
            X = X.astype(learner.dtype)
        learner.step(X)
        learner.pos = 0
        self.components_ = learner.D
        self.n_iter_ = learner.t
        self.alpha_, self.n_nonzero_ = learner.alpha, learner.n_nonzero
        self.history_ = {k: np.asarray(v) for k, v in learner.history.items()}
        self.n_resampled_ = learner.n_resampled
        return self

    def transform(self, X):
        """Sparse codes (n_samples, n_atoms) of ``X`` on ``components_``."""
        from sklearn.utils.validation import check_is_fitted

        check_is_fitted(self, "components_")
        X = self._validate(X, reset=False)
        D = self.components_.astype(X.dtype, copy=False)
        return _encode_numpy(X, D, self.method, self.alpha_, self.n_nonzero_, self.positive,
                             self.transform_max_iter, self.transform_tol)

    def inverse_transform(self, X):
        """Signals ``X @ components_`` from codes ``X`` (n_samples, n_atoms)."""
        from sklearn.utils.validation import check_array as sk_check_array, check_is_fitted

        check_is_fitted(self, "components_")
        A = sk_check_array(X, dtype=[np.float64, np.float32])
        if A.shape[1] != self.components_.shape[0]:
            raise ValueError(f"codes must have {self.components_.shape[0]} columns (n_atoms), got {A.shape[1]}")
        return A @ self.components_.astype(A.dtype, copy=False)

    @property
    def _n_features_out(self):
        return self.components_.shape[0]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        return tags


class SparseEncoder(_TransformerMixin, _BaseEstimator):
    """Sparse coding on a fixed dictionary as a scikit-learn transformer (like
    ``sklearn.decomposition.SparseCoder``, with this library's solvers).

    ``transform(X)`` returns codes ``A`` (n_samples, n_atoms) with ``X ~ A @ dictionary``:
    the Lasso ``0.5 ||x - a @ D||^2 + alpha ||a||_1`` by FISTA/ISTA, or ``||a||_0 <= n_nonzero``
    by OMP/MP/IHT. ``fit`` and ``partial_fit`` only validate (nothing is learned);
    ``inverse_transform(A) = A @ dictionary``.

    Parameters
    ----------
    dictionary : array (n_atoms, n_features), atoms as rows (need not be unit norm)
    method : "fista" (default), "ista", "omp", "mp" or "iht"
    alpha : Lasso penalty (FISTA/ISTA)
    n_nonzero : non-zeros per code (OMP/MP/IHT); None: ``max(1, n_features // 10)``
    positive : non-negative codes
    transform_max_iter, transform_tol : of the Lasso solvers
    """

    def __init__(self, dictionary, *, method="fista", alpha=1.0, n_nonzero=None, positive=False,
                 transform_max_iter=1000, transform_tol=1e-6):
        self.dictionary = dictionary
        self.method = method
        self.alpha = alpha
        self.n_nonzero = n_nonzero
        self.positive = positive
        self.transform_max_iter = transform_max_iter
        self.transform_tol = transform_tol

    def _check_params(self):
        _check_choice(self.method, "method", METHODS)
        D = check_array(np.asarray(self.dictionary) if isinstance(self.dictionary, (list, tuple)) else self.dictionary,
                        "dictionary", ndim=2)
        if self.method in _LASSO:
            check_scalar(self.alpha, "alpha", low=0.0)
        elif self.n_nonzero is not None:
            check_scalar(self.n_nonzero, "n_nonzero", low=1, integer=True)
        _check_bool(self.positive, "positive")
        return to_numpy(D)

    def fit(self, X, y=None):
        """Validate the parameters and ``X`` (nothing is learned). Returns self."""
        from sklearn.utils.validation import validate_data

        D = self._check_params()
        X = validate_data(self, X, dtype=[np.float64, np.float32], reset=True)
        if X.shape[1] != D.shape[1]:
            raise ValueError(
                f"X has {X.shape[1]} features but the dictionary has {D.shape[1]}: the dictionary "
                "must have shape (n_atoms, n_features)"
            )
        return self

    def partial_fit(self, X, y=None):
        """Same as :meth:`fit` (the dictionary is fixed); later calls check the width. Returns self."""
        if not hasattr(self, "n_features_in_"):
            return self.fit(X, y)
        from sklearn.utils.validation import validate_data

        self._check_params()
        validate_data(self, X, dtype=[np.float64, np.float32], reset=False)
        return self

    @property
    def n_components_(self):
        return np.asarray(self.dictionary).shape[0]

    @property
    def components_(self):
        return self._check_params()

    def transform(self, X, y=None):
        """Codes (n_samples, n_atoms) of ``X`` (n_samples, n_features); dtype follows ``X``."""
        from sklearn.utils.validation import validate_data

        D = self._check_params()
        X = validate_data(self, X, dtype=[np.float64, np.float32], reset=False)
        if X.shape[1] != D.shape[1]:
            raise ValueError(f"X has {X.shape[1]} features, but the dictionary has {D.shape[1]} (n_atoms, n_features)")
        n_nonzero = self.n_nonzero if self.n_nonzero is not None else max(1, X.shape[1] // 10)
        return _encode_numpy(X, D.astype(X.dtype, copy=False), self.method, self.alpha, n_nonzero,
                             self.positive, self.transform_max_iter, self.transform_tol)

    def inverse_transform(self, X):
        """Signals ``X @ dictionary`` from codes ``X`` (n_samples, n_atoms)."""
        from sklearn.utils.validation import check_array as sk_check_array

        D = self._check_params()
        A = sk_check_array(X, dtype=[np.float64, np.float32])
        if A.shape[1] != D.shape[0]:
            raise ValueError(f"codes must have {D.shape[0]} columns (n_atoms), got {A.shape[1]}")
        return A @ D.astype(A.dtype, copy=False)

    @property
    def _n_features_out(self):
        return np.asarray(self.dictionary).shape[0]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.requires_fit = False
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        return tags


# --------------------------------------------------------------------------- command line
def configure_parser(parser):
    """``sparsecode learn``: fit a dictionary on exported activations (a store folder or .npy)."""
    parser.add_argument("source", help="an extraction folder (ActivationStore) or a .npy file (memory-mapped)")
    parser.add_argument("--atoms", type=int, required=True, help="number of atoms")
    parser.add_argument("--out", required=True, help="output .npy for the dictionary (n_atoms, n_features)")
    parser.add_argument("--method", default="fista", choices=METHODS)
    parser.add_argument("--update", default="bcd", choices=UPDATES)
    parser.add_argument("--alpha", type=float, default=None)
    parser.add_argument("--n-nonzero", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--max-time", type=float, default=None, help="seconds")
    parser.add_argument("--checkpoint", default=None, help="checkpoint file (resumed when it exists)")
    parser.add_argument("--checkpoint-every", type=int, default=100, help="batches")
    parser.add_argument("--normalize", action="store_true", help="let the store normalise activations")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")


def run_cli(args) -> int:
    src = args.source
    if os.path.isdir(src):
        from .store import ActivationStore

        data = ActivationStore(src, normalize=args.normalize)
    else:
        data = src
    res = learn_dictionary_online(
        data, args.atoms, method=args.method, update=args.update, alpha=args.alpha,
        n_nonzero=args.n_nonzero, batch_size=args.batch_size, n_epochs=args.epochs,
        max_time=args.max_time, checkpoint=args.checkpoint, checkpoint_every=args.checkpoint_every,
        progress=not args.no_progress, seed=args.seed,
    )
    out = args.out if args.out.endswith(".npy") else args.out + ".npy"
    folder = os.path.dirname(os.path.abspath(out))
    os.makedirs(folder, exist_ok=True)
    np.save(out, to_numpy(res.dictionary))
    h = res.history
    summary = {"dictionary": out, "n_atoms": args.atoms, "method": res.method, "update": res.update,
               "alpha": res.alpha, "n_nonzero": res.n_nonzero, "n_batches": res.n_batches,
               "n_samples_seen": res.n_samples_seen, "n_resampled": res.n_resampled,
               "stop_reason": res.stop_reason, "final_rel_error": float(h["rel_error"][-1]),
               "final_l0": float(h["l0"][-1])}
    with open(out[:-4] + ".json", "w") as fh:
        json.dump(summary, fh, indent=1)
    print(json.dumps(summary, indent=1))
    return 0
