"""Shared fixtures and helpers for the sparsecode test suite.

``xp``
    The array namespace a test runs on, parametrised over NumPy, array-api-strict (which
    refuses any NumPy-only call) and CuPy (only where CuPy sees a CUDA device; skipped
    cleanly otherwise, and marked ``gpu``). Session-scoped, so it can be combined with
    hypothesis' ``@given`` without health-check noise.

Helpers (import them with ``from conftest import ...``; pytest puts ``tests/`` on the path):

``asxp(xp, a, dtype=None)``       NumPy data (or a list) as an array of namespace ``xp``.
``npx(a)``                        any supported array back to NumPy (``sparsecode.to_numpy``).
``dtype_of(xp, "float32")``       the dtype object of that name in ``xp``.
``make_problem(xp, ...)``         a random sparse-coding problem ``(X, D)`` in ``xp``.
``assert_in_namespace(a, xp)``    the array ``a`` belongs to the namespace ``xp``.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest

import array_api_compat

from sparsecode.backend import cupy_available, to_numpy

try:  # array-api-strict is a test dependency, but keep collection alive without it
    import array_api_strict  # noqa: F401

    _HAVE_STRICT = True
except ImportError:  # pragma: no cover
    _HAVE_STRICT = False

_HAVE_CUPY = cupy_available()

BACKENDS = [
    pytest.param("numpy", id="numpy"),
    pytest.param(
        "array_api_strict",
        id="strict",
        marks=pytest.mark.skipif(not _HAVE_STRICT, reason="array-api-strict is not installed"),
    ),
    pytest.param(
        "cupy",
        id="cupy",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not _HAVE_CUPY, reason="CuPy with a CUDA device is not available"),
        ],
    ),
]


@pytest.fixture(scope="session", params=BACKENDS)
def xp(request):
    """The array namespace under test: ``numpy``, ``array_api_strict`` or ``cupy``."""
    return importlib.import_module(request.param)


@pytest.fixture(scope="session", params=["float32", "float64"])
def float_dtype(request):
    """A floating dtype name, for tests that run in both precisions."""
    return request.param


def dtype_of(xp, name: str):
    """The dtype called ``name`` ("float32", "float64", "int64", "bool") in namespace ``xp``."""
    return getattr(xp, name)


def asxp(xp, a, dtype=None):
    """NumPy data as an ``xp`` array (``dtype`` a name like "float32" or None to keep it)."""
    a = np.asarray(a)
    if dtype is not None:
        a = a.astype(dtype)
    return xp.asarray(a)


def npx(a) -> np.ndarray:
    """Any supported array (or scalar) as NumPy, for assertions."""
    return np.asarray(to_numpy(a))


def is_namespace(a, xp) -> bool:
    """True when ``a`` is an array of namespace ``xp`` (NumPy arrays for ``numpy``)."""
    name = xp.__name__
    if name == "numpy":
        return isinstance(a, np.ndarray)
    if name == "cupy":
        return array_api_compat.is_cupy_array(a)
    if name == "array_api_strict":
        return type(a).__module__.startswith("array_api_strict")
    return array_api_compat.array_namespace(a) is xp


def assert_in_namespace(a, xp):
    assert is_namespace(a, xp), f"expected an array of {xp.__name__}, got {type(a)!r}"


def make_problem(
    xp,
    n_samples: int = 6,
    n_features: int = 10,
    n_atoms: int = 15,
    *,
    dtype: str = "float64",
    seed: int = 0,
    normalize: bool = True,
    as_numpy: bool = False,
):
    """A random problem ``X ~ A @ D``: Gaussian atoms (unit-norm rows if ``normalize``) and
    signals that are sparse combinations of them plus a little noise.

    Returns ``(X, D)`` of shapes ``(n_samples, n_features)`` and ``(n_atoms, n_features)``,
    in namespace ``xp`` with the given dtype (NumPy arrays if ``as_numpy``).
    """
    rng = np.random.default_rng(seed)
    D = rng.standard_normal((n_atoms, n_features))
    if normalize:
        D /= np.linalg.norm(D, axis=1, keepdims=True)
    A = rng.standard_normal((n_samples, n_atoms))
    A *= rng.random((n_samples, n_atoms)) < max(2.0 / n_atoms, 0.3)
    X = A @ D + 0.1 * rng.standard_normal((n_samples, n_features))
    X, D = X.astype(dtype), D.astype(dtype)
    if as_numpy:
        return X, D
    return asxp(xp, X), asxp(xp, D)
