"""``sparse_encode``: one entry point to every solver, returning the codes alone."""

from __future__ import annotations

__all__ = ["sparse_encode", "SOLVERS"]

#: method name -> (module, function). Pursuits live in their own module.
SOLVERS = {
    "ista": ("sparsecode.lasso", "ista"),
    "fista": ("sparsecode.lasso", "fista"),
    "mp": ("sparsecode.pursuits", "matching_pursuit"),
    "omp": ("sparsecode.pursuits", "omp"),
    "iht": ("sparsecode.pursuits", "iht"),
}


def get_solver(method: str):
    """The solver function for a method name ("ista", "fista", "mp", "omp", "iht")."""
    from importlib import import_module

    if not isinstance(method, str) or method not in SOLVERS:
        raise ValueError(f"method must be one of {sorted(SOLVERS)}, got {method!r}")
    module, name = SOLVERS[method]
    return getattr(import_module(module), name)


def sparse_encode(X, D, method: str = "fista", **options):
    """Sparse codes of ``X`` (n_samples, n_features) on dictionary ``D`` (n_atoms, n_features).

    Like scikit-learn's ``sparse_encode`` but with rows of ``D`` as atoms and the library's
    solvers: ``method`` is "fista" (default), "ista", "mp", "omp" or "iht"; ``options`` go
    to the solver (``alpha`` for the Lasso solvers, ``n_nonzero``/``tol`` for the pursuits).
    Returns the codes, shape (n_samples, n_atoms) (or (n_atoms,) for one 1-D signal), in the
    namespace of the input. Call the solver itself for the full result object.
    """
    return get_solver(method)(X, D, **options).codes
