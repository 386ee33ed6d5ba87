"""Array backend shim: namespaces, validation at the door, dtype policy, kernel dispatch.

Every solver starts with ``xp = array_namespace(X, D)`` and never calls NumPy directly.
This module is the one place that knows which concrete libraries exist.

Dtype policy
------------
float32 and float64 are kept exactly as given; nothing is upcast. Integer, boolean,
complex and half-precision arrays are refused with a ``TypeError`` that names the
argument and says how to convert (``X.astype(float)``), because silently choosing a
precision for the user hides a 2x cost (or a precision loss) in their pipeline.
Python lists and tuples are accepted and become NumPy arrays (like scikit-learn).
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

import numpy as np
import array_api_compat

__all__ = [
    "array_namespace",
    "backend_name",
    "available_backends",
    "to_numpy",
    "asarray_like",
    "check_array",
    "check_dictionary_problem",
    "check_scalar",
    "register_kernel",
    "get_kernel",
    "FLOAT_DTYPES",
]

FLOAT_DTYPES = ("float32", "float64")


# --------------------------------------------------------------------------- namespaces
def _as_array(x: Any, name: str):
    """Lists/tuples become NumPy arrays; anything without an array namespace is refused."""
    if isinstance(x, (list, tuple)):
        return np.asarray(x)
    if array_api_compat.is_array_api_obj(x):
        return x
    raise TypeError(
        f"{name} must be an array (NumPy, CuPy, array-api-strict or another array-API "
        f"library), got {type(x).__name__}"
    )


def array_namespace(*arrays, names: tuple[str, ...] | None = None):
    """The common array-API namespace of ``arrays`` (``None`` entries are skipped).

    Raises ``TypeError`` naming the arguments when they come from different libraries,
    and ``ValueError`` when they live on different devices.
    """
    if names is None:
        names = tuple(f"argument {i}" for i in range(len(arrays)))
    pairs = [(n, a) for n, a in zip(names, arrays) if a is not None]
    if not pairs:
        raise TypeError("array_namespace needs at least one array")
    spaces = []
    for n, a in pairs:
        try:
            spaces.append((n, array_api_compat.array_namespace(a)))
        except TypeError as exc:
            raise TypeError(f"{n} is not a supported array: {exc}") from None
    first_name, first_xp = spaces[0]
    for n, xp in spaces[1:]:
        if xp is not first_xp:
            raise TypeError(
                f"{n} comes from {_pretty(xp)} but {first_name} from {_pretty(first_xp)}: "
                "all arrays of one call must share an array library; convert one of them"
            )
    first_dev = array_api_compat.device(pairs[0][1])
    for n, a in pairs[1:]:
        dev = array_api_compat.device(a)
        if dev != first_dev:
            raise ValueError(
                f"{n} is on device {dev!r} but {first_name} on {first_dev!r}: "
                "move them to the same device"
            )
    return first_xp


def _pretty(xp) -> str:
    return getattr(xp, "__name__", repr(xp))


def backend_name(xp) -> str:
    """Short name of a namespace: 'numpy', 'cupy', 'array_api_strict', 'torch', ..."""
    if array_api_compat.is_numpy_namespace(xp):
        return "numpy"
    if array_api_compat.is_cupy_namespace(xp):
        return "cupy"
    if array_api_compat.is_torch_namespace(xp):
        return "torch"
    name = getattr(xp, "__name__", "unknown")
    return name.split(".")[0]


def available_backends() -> list[str]:
    """Backends usable here: NumPy always; array-api-strict and CuPy (with a GPU) if installed."""
    out = ["numpy"]
    try:
        importlib.import_module("array_api_strict")
        out.append("array_api_strict")
    except ImportError:
        pass
    if cupy_available():
        out.append("cupy")
    return out


def cupy_available() -> bool:
    """True when CuPy imports and sees at least one CUDA device."""
    try:
        cp = importlib.import_module("cupy")
        return cp.cuda.runtime.getDeviceCount() > 0
    except Exception:  # ImportError, CUDARuntimeError, missing driver ...
        return False


def to_numpy(x) -> np.ndarray:
    """Copy (or view) any supported array as a NumPy array, for plotting and files."""
    if x is None:
        return None
    if isinstance(x, np.ndarray):
        return x
    if isinstance(x, (int, float, bool, np.generic, list, tuple)):
        return np.asarray(x)
    if array_api_compat.is_cupy_array(x):
        return x.get()
    if array_api_compat.is_torch_array(x):
        return x.detach().cpu().numpy()
    try:
        return np.from_dlpack(x)
    except Exception:
        return np.asarray(x)


def asarray_like(a, like, dtype=None):
    """Move a NumPy array (or scalar) into the namespace and device of ``like``."""
    xp = array_api_compat.array_namespace(like)
    dev = array_api_compat.device(like)
    if dtype is None:
        dtype = like.dtype
    if array_api_compat.is_numpy_namespace(xp):
        return np.asarray(a, dtype=dtype)
    return xp.asarray(a, dtype=dtype, device=dev)


# --------------------------------------------------------------------------- validation
_DTYPE_NAMES = (
    "float64", "float32", "float16", "complex64", "complex128", "bool",
    "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
)


def _dtype_name(xp, dtype) -> str:
    """Plain name of ``dtype`` ('int64', not 'array_api_strict.int64')."""
    for n in _DTYPE_NAMES:
        if hasattr(xp, n) and dtype == getattr(xp, n):
            return n
    return str(dtype).rsplit(".", 1)[-1]


def check_array(
    x,
    name: str,
    *,
    ndim: int | tuple[int, ...] = 2,
    xp=None,
    allow_empty: bool = False,
    finite: bool = True,
    dtype_like=None,
):
    """Validate one floating array; return it (lists become NumPy arrays).

    Checks: it is an array of the expected ``ndim``; float32 or float64 (see the module
    docstring for the policy); non-empty; finite; same dtype as ``dtype_like`` if given.
    """
    x = _as_array(x, name)
    if xp is None:
        xp = array_api_compat.array_namespace(x)
    ndims = (ndim,) if isinstance(ndim, int) else tuple(ndim)
    if x.ndim not in ndims:
        want = " or ".join(f"{d}-D" for d in ndims)
        raise ValueError(f"{name} must be {want}, got an array of shape {tuple(x.shape)}")
    dname = _dtype_name(xp, x.dtype)
    if dname not in FLOAT_DTYPES:
        if dname in ("float16",):
            hint = "convert it with .astype(float32)"
        else:
            hint = "convert it explicitly, e.g. X.astype(float64) or X.astype(float32)"
        raise TypeError(f"{name} must be float32 or float64, got dtype {dname}; {hint}")
    if not allow_empty and any(int(s) == 0 for s in x.shape):
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")
    if dtype_like is not None and x.dtype != dtype_like.dtype:
        raise TypeError(
            f"{name} has dtype {dname} but the problem is "
            f"{_dtype_name(xp, dtype_like.dtype)}: convert one of them so both match"
        )
    if finite and not bool(xp.all(xp.isfinite(x))):
        raise ValueError(f"{name} contains NaN or Inf; sparse coding needs finite values")
    return x


def check_scalar(value, name: str, *, low=None, low_inclusive=True, integer=False, allow_none=False):
    """Validate a Python scalar (a number, not an array)."""
    if value is None:
        if allow_none:
            return None
        raise TypeError(f"{name} must be given, got None")
    if (
        getattr(value, "ndim", None) == 0
        and hasattr(value, "dtype")
        and not isinstance(value, np.generic)
        and any(s in str(value.dtype) for s in ("int", "float"))
    ):
        value = value.item() if hasattr(value, "item") else float(value)  # 0-D array: the array API's scalar
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a {'whole ' if integer else ''}number, got {type(value).__name__}")
    if integer and not float(value).is_integer():
        raise TypeError(f"{name} must be a whole number, got {value!r}")
    if not np.isfinite(float(value)):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if low is not None:
        if (low_inclusive and value < low) or (not low_inclusive and value <= low):
            op = ">=" if low_inclusive else ">"
            raise ValueError(f"{name} must be {op} {low}, got {value!r}")
    return int(value) if integer else float(value)


def check_dictionary_problem(X, D, *, X_name: str = "X", D_name: str = "D"):
    """Validate a sparse-coding problem ``X ~ A @ D``.

    Returns ``(xp, X2, D, single)``: the namespace, ``X`` as 2-D ``(n_samples, n_features)``,
    the dictionary ``(n_atoms, n_features)``, and whether ``X`` was one 1-D signal.
    """
    X = _as_array(X, X_name)
    D = _as_array(D, D_name)
    xp = array_namespace(X, D, names=(X_name, D_name))
    X = check_array(X, X_name, ndim=(1, 2), xp=xp)
    D = check_array(D, D_name, ndim=2, xp=xp, dtype_like=None)
    if X.dtype != D.dtype:
        raise TypeError(
            f"{X_name} has dtype {_dtype_name(xp, X.dtype)} but {D_name} has "
            f"{_dtype_name(xp, D.dtype)}: convert one so both match (nothing is upcast silently)"
        )
    single = X.ndim == 1
    if single:
        X = xp.reshape(X, (1, X.shape[0]))
    if X.shape[1] != D.shape[1]:
        raise ValueError(
            f"{X_name} has {X.shape[1]} features but {D_name} has {D.shape[1]} "
            f"(expected {D_name} of shape (n_atoms, {X.shape[1]}), atoms as rows)"
        )
    return xp, X, D, single


# --------------------------------------------------------------------------- dispatch
_KERNELS: dict[tuple[str, str], Callable] = {}


def register_kernel(name: str, backend: str):
    """Decorator: register ``fn`` as the ``backend``-specific kernel for operation ``name``.

    A kernel stands beside a portable implementation; ``get_kernel`` returns it only for
    its backend, and callers fall back to the portable code otherwise.
    """

    def deco(fn):
        _KERNELS[(name, backend)] = fn
        return fn

    return deco


def get_kernel(name: str, xp) -> Callable | None:
    """The kernel registered for ``name`` on ``xp``'s backend, or ``None``."""
    return _KERNELS.get((name, backend_name(xp)))
