"""The backend shim: namespaces, devices, dtype policy, validation messages, kernel dispatch."""

import numpy as np
import pytest

import array_api_strict as xs

from sparsecode import backend as B
from sparsecode.backend import (
    array_namespace,
    asarray_like,
    available_backends,
    backend_name,
    check_array,
    check_dictionary_problem,
    check_scalar,
    cupy_available,
    get_kernel,
    register_kernel,
    to_numpy,
)

from conftest import asxp, assert_in_namespace, npx


# --------------------------------------------------------------------------- namespaces
def test_array_namespace_same_library(xp):
    a, b = asxp(xp, np.ones((2, 3))), asxp(xp, np.zeros(3))
    ns = array_namespace(a, None, b)
    assert backend_name(ns) == xp.__name__
    # the namespace it returns computes in that library
    assert_in_namespace(ns.sum(a, axis=0), xp)


def test_array_namespace_mixed_libraries_names_the_arguments():
    with pytest.raises(TypeError, match=r"D comes from array_api_strict but X from .*numpy"):
        array_namespace(np.ones(3), xs.ones(3), names=("X", "D"))
    with pytest.raises(TypeError, match=r"argument 1 comes from"):
        array_namespace(xs.ones(3), np.ones(3))


def test_array_namespace_mixed_devices_names_the_arguments():
    a = xs.ones(3)
    b = xs.ones(3, device=xs.Device("device1"))
    with pytest.raises(ValueError, match=r"D is on device .*device1.* but X on .*CPU_DEVICE"):
        array_namespace(a, b, names=("X", "D"))


def test_array_namespace_refuses_non_arrays_and_nothing():
    with pytest.raises(TypeError, match="at least one array"):
        array_namespace(None, None)
    with pytest.raises(TypeError, match="alpha is not a supported array"):
        array_namespace(np.ones(2), "abc", names=("X", "alpha"))


def test_backend_name():
    assert backend_name(np) == "numpy"
    assert backend_name(array_namespace(np.ones(1))) == "numpy"
    assert backend_name(xs) == "array_api_strict"


def test_available_backends():
    got = available_backends()
    assert got[0] == "numpy"
    assert "array_api_strict" in got
    assert ("cupy" in got) == cupy_available()
    assert len(set(got)) == len(got)


# --------------------------------------------------------------------------- conversion
def test_to_numpy_round_trip(xp):
    a = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    out = to_numpy(asxp(xp, a))
    assert isinstance(out, np.ndarray)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, a)


def test_to_numpy_plain_values():
    a = np.ones(2)
    assert to_numpy(a) is a
    assert to_numpy(None) is None
    np.testing.assert_array_equal(to_numpy([1.0, 2.0]), [1.0, 2.0])
    assert to_numpy(2.5).shape == () and float(to_numpy(2.5)) == 2.5
    np.testing.assert_array_equal(to_numpy(np.float32(3)), np.float32(3))


def test_to_numpy_torch():
    torch = pytest.importorskip("torch")
    t = torch.arange(6, dtype=torch.float64, requires_grad=True).reshape(2, 3) * 1.0
    out = to_numpy(t)
    assert isinstance(out, np.ndarray) and out.dtype == np.float64
    np.testing.assert_array_equal(out, np.arange(6.0).reshape(2, 3))


def test_asarray_like_follows_namespace_dtype_and_device(xp, float_dtype):
    like = asxp(xp, np.zeros(3), float_dtype)
    out = asarray_like(np.array([1.0, 2.0]), like)
    assert_in_namespace(out, xp)
    assert out.dtype == like.dtype
    np.testing.assert_array_equal(npx(out), [1.0, 2.0])
    # an explicit dtype wins
    out64 = asarray_like([1, 2], like, dtype=xp.float64)
    assert out64.dtype == xp.float64
    # and the device is the one of `like` (array-api-strict has several fake devices)
    dev = xs.Device("device1")
    like = xs.zeros(2, device=dev)
    assert asarray_like(np.ones(2), like).device == dev


# --------------------------------------------------------------------------- check_array
def test_check_array_accepts_and_returns(xp, float_dtype):
    a = asxp(xp, np.ones((2, 3)), float_dtype)
    out = check_array(a, "X")
    assert out is a
    lst = check_array([[1.0, 2.0]], "X")
    assert isinstance(lst, np.ndarray) and lst.shape == (1, 2)


@pytest.mark.parametrize(
    "bad, kwargs, exc, pattern",
    [
        (np.ones(3), {}, ValueError, r"X must be 2-D, got an array of shape \(3,\)"),
        (np.ones((1, 2, 3)), {"ndim": (1, 2)}, ValueError, r"X must be 1-D or 2-D"),
        (np.ones((2, 2), dtype=np.int64), {}, TypeError, r"X must be float32 or float64, got dtype int64.*convert"),
        (np.ones((2, 2), dtype=bool), {}, TypeError, r"X must be float32 or float64, got dtype bool"),
        (np.ones((2, 2), dtype=np.complex128), {}, TypeError, r"X must be float32 or float64, got dtype complex128"),
        (np.ones((2, 2), dtype=np.uint8), {}, TypeError, r"X must be float32 or float64, got dtype uint8"),
        (np.ones((0, 3)), {}, ValueError, r"X must not be empty"),
        (np.ones((3, 0)), {}, ValueError, r"X must not be empty"),
        (np.array([[1.0, np.nan]]), {}, ValueError, r"X contains NaN or Inf"),
        (np.array([[1.0, -np.inf]]), {}, ValueError, r"X contains NaN or Inf"),
        ("abc", {}, TypeError, r"X must be an array"),
        (3.0, {}, TypeError, r"X must be an array"),
    ],
)
def test_check_array_errors_name_the_argument(xp, bad, kwargs, exc, pattern):
    if isinstance(bad, np.ndarray):
        bad = xp.asarray(bad)
    with pytest.raises(exc, match=pattern):
        check_array(bad, "X", **kwargs)


def test_check_array_refuses_half_precision_with_a_hint():
    # float16 exists in NumPy (and CuPy) but not in the array-API standard
    with pytest.raises(TypeError, match=r"D must be float32 or float64, got dtype float16; convert it with"):
        check_array(np.ones((2, 2), dtype=np.float16), "D")


def test_check_array_options(xp):
    empty = asxp(xp, np.ones((0, 3)))
    assert check_array(empty, "X", allow_empty=True).shape == (0, 3)
    nan = asxp(xp, np.array([[np.nan, 1.0]]))
    assert check_array(nan, "X", finite=False) is nan
    a32 = asxp(xp, np.ones((2, 2)), "float32")
    a64 = asxp(xp, np.ones((2, 2)), "float64")
    with pytest.raises(TypeError, match="init has dtype float32 but the problem is float64"):
        check_array(a32, "init", dtype_like=a64)


# --------------------------------------------------------------------------- check_scalar
def test_check_scalar_values():
    assert check_scalar(3, "n", integer=True) == 3 and isinstance(check_scalar(3.0, "n", integer=True), int)
    assert check_scalar(np.int64(4), "n", integer=True) == 4
    assert check_scalar(0.5, "tol", low=0) == 0.5 and isinstance(check_scalar(1, "tol"), float)
    assert check_scalar(np.float32(2.0), "x") == 2.0
    assert check_scalar(None, "x", allow_none=True) is None
    assert check_scalar(0, "tol", low=0) == 0.0


def test_check_scalar_accepts_zero_dimensional_arrays(xp):
    """A 0-D array is the array API's scalar (``xp.max(...)`` returns one)."""
    assert check_scalar(xp.max(asxp(xp, np.array([0.25, 0.5]))), "tol", low=0) == 0.5
    assert check_scalar(asxp(xp, np.array(7)), "max_iter", integer=True) == 7
    with pytest.raises(ValueError, match=r"tol must be >= 0"):
        check_scalar(asxp(xp, np.array(-1.0)), "tol", low=0)
    with pytest.raises(TypeError, match=r"tol must be a number"):
        check_scalar(asxp(xp, np.array(True)), "tol")


@pytest.mark.parametrize(
    "value, kwargs, exc, pattern",
    [
        (None, {}, TypeError, r"tol must be given"),
        (True, {}, TypeError, r"tol must be a number, got bool"),
        ("1e-3", {}, TypeError, r"tol must be a number, got str"),
        (np.ones(1), {}, TypeError, r"tol must be a number"),
        (2.5, {"integer": True}, TypeError, r"tol must be a whole number"),
        (float("nan"), {}, ValueError, r"tol must be finite"),
        (float("inf"), {}, ValueError, r"tol must be finite"),
        (-1e-3, {"low": 0}, ValueError, r"tol must be >= 0, got -0.001"),
        (0, {"low": 0, "low_inclusive": False}, ValueError, r"tol must be > 0"),
    ],
)
def test_check_scalar_errors_name_the_argument(value, kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        check_scalar(value, "tol", **kwargs)


# --------------------------------------------------------------------------- check_dictionary_problem
def test_check_dictionary_problem_shapes(xp):
    X = asxp(xp, np.ones((3, 4)))
    D = asxp(xp, np.ones((5, 4)))
    ns, X2, D2, single = check_dictionary_problem(X, D)
    assert backend_name(ns) == xp.__name__ and not single
    assert tuple(X2.shape) == (3, 4) and D2 is D
    ns, x2, _, single = check_dictionary_problem(asxp(xp, np.ones(4)), D)
    assert single and tuple(x2.shape) == (1, 4)
    # lists are accepted like scikit-learn does
    _, X3, _, _ = check_dictionary_problem([[1.0, 2.0]], [[1.0, 0.0], [0.0, 1.0]])
    assert isinstance(X3, np.ndarray)


def test_check_dictionary_problem_errors(xp):
    X = asxp(xp, np.ones((3, 4)))
    D = asxp(xp, np.ones((5, 4)))
    with pytest.raises(ValueError, match=r"X has 4 features but D has 3 .*atoms as rows"):
        check_dictionary_problem(X, asxp(xp, np.ones((4, 3))))
    with pytest.raises(ValueError, match=r"D must be 2-D"):
        check_dictionary_problem(X, asxp(xp, np.ones(4)))
    with pytest.raises(ValueError, match=r"X must be 1-D or 2-D"):
        check_dictionary_problem(asxp(xp, np.ones((1, 3, 4))), D)
    with pytest.raises(TypeError, match=r"X has dtype float32 but D has float64"):
        check_dictionary_problem(asxp(xp, np.ones((3, 4)), "float32"), D)
    with pytest.raises(TypeError, match=r"D must be float32 or float64"):
        check_dictionary_problem(X, asxp(xp, np.ones((5, 4), dtype=np.int32)))
    with pytest.raises(TypeError, match=r"Xs comes from|Ds comes from"):
        other = xs if xp.__name__ != "array_api_strict" else np
        check_dictionary_problem(X, other.ones((5, 4)), X_name="Xs", D_name="Ds")


# --------------------------------------------------------------------------- dispatch
def test_register_and_get_kernel(monkeypatch):
    monkeypatch.setattr(B, "_KERNELS", dict(B._KERNELS))  # do not leak the test kernel

    @register_kernel("test_double", "numpy")
    def double(a):
        return 2 * a

    assert double(np.ones(1))[0] == 2.0  # the decorator returns the function unchanged
    assert get_kernel("test_double", np) is double
    assert get_kernel("test_double", array_namespace(np.ones(1))) is double  # compat namespace too
    assert get_kernel("test_double", xs) is None  # other backends fall back to portable code
    assert get_kernel("no_such_kernel", np) is None


def test_prox_registers_a_numpy_top_k_kernel():
    assert get_kernel("top_k_mask", np) is not None
    assert get_kernel("top_k_mask", xs) is None


# ----------------------------------------------------------------------------- thread pools
def _env_after_import(env_extra, code="import sparsecode"):
    import json
    import os
    import subprocess
    import sys

    from sparsecode import THREAD_DEFAULTS

    env = {k: v for k, v in os.environ.items() if k not in THREAD_DEFAULTS and k != "SPARSECODE_THREAD_DEFAULTS"}
    env.update(env_extra)
    probe = f"import json, os\n{code}\nprint(json.dumps({{k: os.environ.get(k) for k in {list(THREAD_DEFAULTS)!r}}}))"
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_sets_the_thread_pool_defaults_and_keeps_the_users():
    from sparsecode import THREAD_DEFAULTS

    assert _env_after_import({}) == THREAD_DEFAULTS
    # a value the user chose stays; the other default is still set
    got = _env_after_import({"OMP_WAIT_POLICY": "ACTIVE"})
    assert got == {"OPENBLAS_THREAD_TIMEOUT": THREAD_DEFAULTS["OPENBLAS_THREAD_TIMEOUT"], "OMP_WAIT_POLICY": "ACTIVE"}
    # the opt-out leaves the environment alone
    assert _env_after_import({"SPARSECODE_THREAD_DEFAULTS": "0"}) == {k: None for k in THREAD_DEFAULTS}


def test_torch_is_imported_without_the_passive_wait_default():
    pytest.importorskip("torch")
    code = ("import sparsecode\nfrom sparsecode.extract import _import_torch\n"
            "os.environ['SEEN'] = str(os.environ.get('OMP_WAIT_POLICY'))\n"
            "import builtins\n"
            "real = builtins.__import__\n"
            "def spy(name, *a, **k):\n"
            "    if name == 'torch': os.environ['SEEN'] = str(os.environ.get('OMP_WAIT_POLICY'))\n"
            "    return real(name, *a, **k)\n"
            "builtins.__import__ = spy\n"
            "_import_torch()\n"
            "builtins.__import__ = real\n"
            "print('SEEN', os.environ['SEEN'])")
    import os
    import subprocess
    import sys

    from sparsecode import THREAD_DEFAULTS

    env = {k: v for k, v in os.environ.items() if k not in THREAD_DEFAULTS and k != "SPARSECODE_THREAD_DEFAULTS"}
    probe = f"import os\n{code}\nprint('AFTER', os.environ.get('OMP_WAIT_POLICY'))"
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True).stdout
    # unset while torch loads (its OpenMP reads it then), restored afterwards for Numba
    assert "SEEN None" in out and "AFTER PASSIVE" in out
    # a value the user set is theirs: torch sees it too
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True).stdout
    assert "SEEN PASSIVE" in out and "AFTER PASSIVE" in out
