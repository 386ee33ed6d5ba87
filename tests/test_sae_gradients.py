"""Hand-written SAE gradients against finite differences (float64), and the pseudo-gradients
of the straight-through cases against their definitions."""

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparsecode.sae import ARCHITECTURES, K_ARCHITECTURES, SparseAutoencoder, _fista_betas, loss_and_grad

try:
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover
    threadpool_limits = None


@pytest.fixture(autouse=True)
def _one_blas_thread():
    # tiny products: BLAS threads only contend on a shared machine
    if threadpool_limits is None:
        yield
    else:
        with threadpool_limits(1):
            yield


def _model(arch, d_in, d_sae, seed, **kw):
    rng = np.random.default_rng(seed)
    k = min(3, d_sae) if arch in K_ARCHITECTURES else None
    sae = SparseAutoencoder.initialize(d_in, d_sae, arch, k=k, seed=seed, dtype="float64", l1_coefficient=0.3, **kw)
    for key in sae.params:  # move away from the symmetric initialisation
        sae.params[key] = sae.params[key] + 0.3 * rng.standard_normal(sae.params[key].shape)
    if arch == "jumprelu":
        sae.params["log_threshold"] = np.log(rng.uniform(0.05, 0.4, d_sae))
    if arch == "relu_april":  # free decoder norms: make them unequal
        sae.params["W_dec"] = sae.params["W_dec"] * rng.uniform(0.5, 2.0, (d_sae, 1))
    return sae


def _directional_fd_check(sae, X, kwargs, skip=(), h=1e-6, seed=0):
    """<grad, v> against the central difference of the loss along a random v, per parameter."""
    rng = np.random.default_rng(seed)
    _, G, _ = loss_and_grad(sae, X, **kwargs)
    assert set(G) == set(sae.params)
    for key in sae.params:
        if key in skip:
            continue
        V = rng.standard_normal(sae.params[key].shape)
        p0 = sae.params[key]
        sae.params[key] = p0 + h * V
        Lp = loss_and_grad(sae, X, need_grad=False, **kwargs)[0]
        sae.params[key] = p0 - h * V
        Lm = loss_and_grad(sae, X, need_grad=False, **kwargs)[0]
        sae.params[key] = p0
        fd = (Lp - Lm) / (2 * h)
        an = float(np.sum(G[key] * V))
        assert an == pytest.approx(fd, rel=2e-5, abs=2e-6), (key, an, fd)


shapes = st.tuples(st.integers(2, 6), st.integers(2, 6), st.integers(3, 9), st.integers(0, 10_000))


@pytest.mark.parametrize("sparse_kernels", [False, True], ids=["dense", "sparse"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=shapes)
def test_gradient_matches_finite_differences(arch, shape, sparse_kernels, monkeypatch):
    """Both code paths of the NumPy backend: dense products, and the sparse kernels (CSR
    products on the active entries) that normally engage below 8% density."""
    import sparsecode.sae as sae_mod

    monkeypatch.setattr(sae_mod, "_SPARSE_DENSITY", 1.01 if sparse_kernels else -1.0)
    monkeypatch.setattr(sae_mod, "_KS_DENSE_FRACTION", 2.0 if sparse_kernels else -1.0)
    n, d_in, d_sae, seed = shape
    rng = np.random.default_rng(seed + 1)
    X = rng.standard_normal((n, d_in))
    sae = _model(arch, d_in, d_sae, seed)
    dead = rng.random(d_sae) < 0.5
    kwargs = dict(aux_coefficient=0.5, dead_mask=dead, k_aux=2, afa_coefficient=0.7,
                  aux_target=X - sae.forward(X))  # AuxK's target as the constant it is in training
    # the JumpReLU threshold has a zero derivative almost everywhere: it is trained through
    # pseudo-derivatives, checked against their definition below
    _directional_fd_check(sae, X, kwargs, skip=("log_threshold",), seed=seed)


@pytest.mark.parametrize("sparse_kernels", [False, True], ids=["dense", "sparse"])
@pytest.mark.parametrize("fista", [False, True])
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=shapes, steps=st.integers(1, 4))
def test_lista_gradient_any_depth(fista, shape, steps, sparse_kernels, monkeypatch):
    """Both layouts of the backward pass (the sampled products on each step's ReLU pattern),
    ISTA and FISTA (where a step's gradient reaches two earlier steps)."""
    import sparsecode.sae as sae_mod

    monkeypatch.setattr(sae_mod, "_SPARSE_DENSITY", 1.01 if sparse_kernels else -1.0)
    n, d_in, d_sae, seed = shape
    X = np.random.default_rng(seed + 2).standard_normal((n, d_in))
    sae = _model("lista", d_in, d_sae, seed, lista_steps=steps, lista_fista=fista)
    _directional_fd_check(sae, X, {}, seed=seed)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=shapes, apply=st.booleans())
def test_gradient_without_b_dec_on_input(shape, apply):
    n, d_in, d_sae, seed = shape
    X = np.random.default_rng(seed + 3).standard_normal((n, d_in))
    for arch in ("relu_april", "topafa", "topk"):
        sae = _model(arch, d_in, d_sae, seed)
        sae.apply_b_dec_to_input = apply
        _directional_fd_check(sae, X, {"afa_coefficient": 0.4}, seed=seed)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=shapes, eps=st.floats(0.05, 1.0), lam=st.floats(0.0, 2.0))
def test_jumprelu_pseudo_gradient_matches_definition(shape, eps, lam):
    """g_log_theta_j = theta_j * sum_i [ g_f_ij * (-(theta_j/eps) K(u_ij)) - (lam/n) (1/eps) K(u_ij) ]
    with u = (z - theta)/eps, K the rectangle 1{|u| < 1/2} and g_f = dL_rec/df = (2/n) (x_hat - x) . d_j."""
    n, d_in, d_sae, seed = shape
    rng = np.random.default_rng(seed + 4)
    X = rng.standard_normal((n, d_in))
    sae = _model("jumprelu", d_in, d_sae, seed, bandwidth=eps)
    z = (X - sae.b_dec) @ sae.W_enc + sae.b_enc
    # put every threshold inside the kernel window of one of its pre-activations
    theta = np.abs(z[rng.integers(0, n, d_sae), np.arange(d_sae)]) + rng.uniform(-0.4, 0.4, d_sae) * eps
    theta = np.maximum(theta, 1e-3)
    sae.params["log_threshold"] = np.log(theta)
    _, G, _ = loss_and_grad(sae, X, penalty=lam)
    W_dec = sae.W_dec
    expected = np.zeros(d_sae)
    for j in range(d_sae):
        total = 0.0
        for i in range(n):
            f_i = np.where(z[i] > theta, z[i], 0.0)
            x_hat = f_i @ W_dec + sae.b_dec
            g_f = 2.0 / n * float((x_hat - X[i]) @ W_dec[j])
            K = 1.0 if abs((z[i, j] - theta[j]) / eps) < 0.5 else 0.0
            total += g_f * (-(theta[j] / eps) * K) - lam / n * K / eps
        expected[j] = theta[j] * total
    np.testing.assert_allclose(G["log_threshold"], expected, rtol=1e-9, atol=1e-12)
    # and the other gradients are the exact ones
    _directional_fd_check(sae, X, {"penalty": lam}, skip=("log_threshold",), seed=seed)


def test_jumprelu_pseudo_gradient_lowers_threshold_when_reconstruction_needs_it():
    """One latent aligned with the data, threshold just above the activations: the L2 term's
    pseudo-gradient must push the threshold down (negative g_theta), the L0 term up."""
    d = 3
    W = np.eye(d)
    X = np.array([[1.0, 0, 0], [1.02, 0, 0]])
    sae = SparseAutoencoder(W.copy(), np.zeros(d), W.copy(), np.zeros(d), architecture="jumprelu",
                            log_threshold=np.log(np.array([1.03, 5.0, 5.0])), bandwidth=0.1)
    _, G0, _ = loss_and_grad(sae, X, penalty=0.0)
    # latent 0 is off (z = 1.0, 1.02 < theta = 1.03) so x is under-reconstructed: g_f < 0 and
    # -(theta/eps) K g_f > 0, i.e. d loss / d theta > 0 and gradient descent lowers theta
    assert G0["log_threshold"][0] > 0
    # the L0 term adds -(lam / (n eps)) K < 0: it pushes the threshold up
    _, G1, _ = loss_and_grad(sae, X, penalty=10.0)
    assert G1["log_threshold"][0] < G0["log_threshold"][0]
    # latents far from their threshold get no pseudo-gradient
    assert G0["log_threshold"][1] == 0.0 and G0["log_threshold"][2] == 0.0


def test_lista_at_initialisation_is_ista_and_fista():
    """LISTA initialised from the dictionary runs exactly T steps of (F)ISTA on the
    non-negative Lasso 0.5||xc - a D||^2 + (lam/2)||a||_1 with step 1/L."""
    from sparsecode.lasso import fista, ista

    rng = np.random.default_rng(0)
    d_in, d_sae, n, lam = 8, 20, 7, 0.4
    X = rng.standard_normal((n, d_in))
    for use_fista in (False, True):
        for T in (1, 2, 5):
            sae = SparseAutoencoder.initialize(d_in, d_sae, "lista", seed=3, dtype="float64", l1_coefficient=lam,
                                               lista_steps=T, lista_fista=use_fista)
            L = float(np.linalg.norm(sae.W_dec, 2) ** 2)
            solver = fista if use_fista else ista
            res = solver(X, sae.W_dec, lam / 2, positive=True, max_iter=T, tol=0.0, lipschitz=L, check_every=1000)
            np.testing.assert_allclose(sae.encode(X), res.codes, rtol=1e-9, atol=1e-12)


def test_fista_betas_follow_the_t_sequence():
    b = _fista_betas(5)
    t = [1.0]
    for _ in range(5):
        t.append((1 + math.sqrt(1 + 4 * t[-1] ** 2)) / 2)
    assert b[0] == 0.0 and b[1] == 0.0
    for i in range(2, 5):
        assert b[i] == pytest.approx((t[i - 1] - 1) / t[i])


def test_mp_sae_encoder_is_matching_pursuit():
    """The unrolled pursuit (training path) equals the library's matching pursuit on unit atoms."""
    pursuits = pytest.importorskip("sparsecode.pursuits")
    from sparsecode.sae import _mp_forward

    rng = np.random.default_rng(1)
    sae = SparseAutoencoder.initialize(10, 30, "mpsae", k=4, seed=2, dtype="float64")
    X = rng.standard_normal((25, 10))
    codes, r, _ = _mp_forward(sae, X - sae.b_dec, np)
    ref = pursuits.matching_pursuit(X - sae.b_dec, sae.W_dec, n_nonzero=4).codes
    np.testing.assert_allclose(codes, ref, atol=1e-10)
    np.testing.assert_allclose(r, X - sae.b_dec - codes @ sae.W_dec, atol=1e-10)
    np.testing.assert_allclose(sae.encode(X), ref, atol=1e-10)


def test_unit_norm_projection_removes_parallel_component():
    """After training steps of a unit-norm variant, rows are unit norm; relu_april's are free."""
    from sparsecode.sae import train_sae

    X = np.random.default_rng(0).standard_normal((512, 6))
    sae, _ = train_sae(X, 12, "topk", k=2, n_steps=20, batch_size=64, lr=1e-2, seed=0)
    np.testing.assert_allclose(np.linalg.norm(sae.W_dec, axis=1), 1.0, rtol=1e-5)
    sae2, _ = train_sae(X, 12, "relu_april", n_steps=20, batch_size=64, lr=1e-2, seed=0, l1_coefficient=0.1)
    norms = np.linalg.norm(sae2.W_dec, axis=1)
    assert np.ptp(norms) > 1e-3  # norms moved away from their common initial value 0.1
