"""The result object every solver returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["SparseCodingResult", "ConvergenceHistory"]


@dataclass
class ConvergenceHistory:
    """Per-iteration record for convergence plots (NumPy arrays, one entry per iteration).

    ``objective`` is the objective averaged over all samples; ``gap`` the mean absolute
    duality gap (NaN for solvers without one); ``relative_gap`` the largest per-sample
    relative gap; ``time`` the seconds elapsed in the solver itself, *excluding* the time
    spent computing these records (so timings are those of a run without history).
    """

    iteration: np.ndarray
    objective: np.ndarray
    gap: np.ndarray
    relative_gap: np.ndarray
    time: np.ndarray

    def __len__(self) -> int:
        return len(self.iteration)


@dataclass
class SparseCodingResult:
    """Codes and what users ask for next.

    Attributes
    ----------
    codes : array (n_samples, n_atoms), or (n_atoms,) for a single 1-D signal
        In the namespace and on the device of the input.
    n_iter : array of int (n_samples,)
        Iterations (or pursuit steps) each sample ran.
    converged : array of bool (n_samples,)
        Whether each sample met its stopping criterion (gap below ``tol`` for the Lasso
        solvers; residual below ``tol`` or ``n_nonzero`` atoms for the pursuits).
    objective : array (n_samples,)
        Final objective of each sample (the method's own objective, see its docstring).
    gap : array (n_samples,) or None
        Final absolute duality gap per sample (Lasso solvers), ``None`` where undefined.
    relative_gap : array (n_samples,) or None
        ``gap / objective`` per sample: what ``tol`` is compared against.
    history : ConvergenceHistory or None
        Filled when the solver was called with ``history=True``.
    method : str
        Name of the solver.
    lipschitz : float or None
        The Lipschitz constant (step ``1/L``) used by gradient methods.
    info : dict
        Anything solver-specific (e.g. the gradient form chosen, restarts counted).
    """

    codes: Any
    n_iter: Any
    converged: Any
    objective: Any
    gap: Any = None
    relative_gap: Any = None
    history: ConvergenceHistory | None = None
    method: str = ""
    lipschitz: float | None = None
    info: dict = field(default_factory=dict)

    @property
    def all_converged(self) -> bool:
        return bool(np.all(_np(self.converged)))


def _np(x):
    from .backend import to_numpy

    return to_numpy(x)
