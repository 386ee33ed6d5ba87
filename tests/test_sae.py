"""Sparse autoencoders: recovery of a known dictionary, determinism, exact resume, NaN
handling, the SAELens/sparsify layouts, the amortization gap, input validation, backends."""

import json
import os
import warnings

import numpy as np
import pytest

from sparsecode.datasets import atom_recovery, make_sparse_signals
from sparsecode.sae import (
    ARCHITECTURES,
    K_ARCHITECTURES,
    SparseAutoencoder,
    amortization_gap,
    loss_and_grad,
    train_sae,
)

try:
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover
    threadpool_limits = None


@pytest.fixture(autouse=True)
def _one_blas_thread():
    if threadpool_limits is None:
        yield
    else:
        with threadpool_limits(1):
            yield


@pytest.fixture(scope="module")
def signals():
    X, D, A = make_sparse_signals(6000, 24, 40, 3, noise=0.01, positive=True, seed=0, dtype=np.float32)
    return X, D, A


def _k(arch):
    return 3 if arch in K_ARCHITECTURES else None


# --------------------------------------------------------------------------- recovery
@pytest.mark.parametrize("arch,kw", [("topk", {"k": 3}), ("relu", {"l1_coefficient": 0.1})])
def test_recovers_the_true_dictionary(signals, arch, kw):
    X, D, _ = signals
    sae, log = train_sae(X, 80, arch, n_steps=1200, batch_size=256, lr=3e-3, seed=0, **kw)
    rec = atom_recovery(D, sae.W_dec, threshold=0.9)
    assert rec["fraction"] >= 0.9, rec["fraction"]
    assert log["fvu"][-1] < 0.1
    if arch == "topk":
        assert log["l0"][-1] <= 3.0


# --------------------------------------------------------------------------- determinism / resume
def test_training_is_deterministic_given_the_seed(signals):
    X = signals[0][:2048]
    a, la = train_sae(X, 48, "topk", k=3, n_steps=30, batch_size=128, lr=3e-3, seed=5)
    b, lb = train_sae(X, 48, "topk", k=3, n_steps=30, batch_size=128, lr=3e-3, seed=5)
    c, _ = train_sae(X, 48, "topk", k=3, n_steps=30, batch_size=128, lr=3e-3, seed=6)
    for key in a.params:
        np.testing.assert_array_equal(a.params[key], b.params[key])
    assert la["loss"] == lb["loss"]
    assert not np.array_equal(a.W_dec, c.W_dec)


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "jumprelu", "relu_april"])
def test_resume_gives_the_uninterrupted_weights(signals, tmp_path, arch):
    # 2000 rows / 256 = 7 batches per epoch: 24 steps cross epoch boundaries, with dead latents
    X = signals[0][:2000]
    kw = dict(k=3, n_steps=24, batch_size=256, lr=3e-3, seed=1, dead_tokens=512, lr_decay_fraction=0.5,
              penalty_warmup_steps=6)
    full, log_full = train_sae(X, 48, arch, **kw)

    stops = []

    def stop_at_10(step, sae, log):
        if step == 10:
            stops.append(step)
            return True
        return False

    ck = str(tmp_path / "ck")
    part, log_part = train_sae(X, 48, arch, checkpoint=ck, checkpoint_every=4, callback=stop_at_10, **kw)
    assert stops == [10] and log_part["stopped_early"] and log_part["steps_done"] == 10
    resumed, log_res = train_sae(X, 48, arch, checkpoint=ck, checkpoint_every=4, **kw)
    assert log_res["resumed_from"] == 10 and log_res["steps_done"] == 24
    for key in full.params:
        np.testing.assert_array_equal(resumed.params[key], full.params[key])
    assert resumed.batch_threshold == full.batch_threshold
    assert log_res["loss"] == log_full["loss"]
    assert os.path.isfile(os.path.join(ck, "final", "cfg.json"))


def test_resume_refuses_other_settings(signals, tmp_path):
    X = signals[0][:1024]
    ck = str(tmp_path / "ck")
    train_sae(X, 32, "topk", k=3, n_steps=4, batch_size=128, checkpoint=ck, checkpoint_every=2)
    with pytest.raises(ValueError, match="other settings"):
        train_sae(X, 32, "topk", k=4, n_steps=4, batch_size=128, checkpoint=ck, checkpoint_every=2)


# --------------------------------------------------------------------------- NaN
class _ListStore:
    """A minimal store: yields the given batches in order every epoch (for exact comparisons)."""

    def __init__(self, batches):
        self.batches = batches
        clean = [b for b in batches if np.all(np.isfinite(b))]
        self.sample = np.concatenate(clean)
        self.n_rows = sum(b.shape[0] for b in batches)
        self.d_in = batches[0].shape[1]
        self.norm_scale = 1.0

    def iter_batches(self, batch_size, **_):
        if batch_size != self.batches[0].shape[0]:  # the b_dec initialisation sample
            yield self.sample
            return
        yield from self.batches


def test_nan_batch_is_detected_and_not_trained_on(signals):
    X = signals[0][:1024].copy()
    X[300, 2] = np.nan  # lands in exactly one batch of each epoch
    with pytest.raises(ValueError, match="NaN"):
        train_sae(X, 32, "topk", k=3, n_steps=6, batch_size=128, seed=0, on_nan="raise")
    with pytest.warns(RuntimeWarning, match="skipped"):
        sae, log = train_sae(X, 32, "topk", k=3, n_steps=6, batch_size=128, seed=0, on_nan="skip")
    assert log["n_skipped_batches"] == 1 and log["steps_done"] == 6
    assert all(np.all(np.isfinite(v)) for v in sae.params.values())
    assert np.all(np.isfinite(log["loss"]))

    # not trained on: exactly the weights of a run that never saw the poisoned batch
    B = [signals[0][i * 128:(i + 1) * 128] for i in range(5)]
    bad = B[2].copy()
    bad[7, 0] = np.inf
    with pytest.warns(RuntimeWarning):
        a, la = train_sae(_ListStore(B[:2] + [bad] + B[2:]), 32, "relu", n_steps=5, batch_size=128, seed=0)
    b, lb = train_sae(_ListStore(B), 32, "relu", n_steps=5, batch_size=128, seed=0)
    assert la["n_skipped_batches"] == 1 and lb["n_skipped_batches"] == 0
    for key in a.params:
        np.testing.assert_array_equal(a.params[key], b.params[key])


def test_divergence_raises_floating_point_error(signals):
    X = signals[0][:512] * 1e30
    with pytest.raises((FloatingPointError, ValueError)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            train_sae(X, 16, "relu", n_steps=3, batch_size=128, lr=1e30, grad_clip=None, b_dec_init="zeros")


# --------------------------------------------------------------------------- every encoder trains
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_encoder_reduces_the_loss(signals, arch):
    X = signals[0][:3072]
    kw = {"l1_coefficient": 0.05} if arch in ("relu", "relu_april", "lista") else {}
    if arch == "jumprelu":
        kw = {"l1_coefficient": 0.01, "bandwidth": 0.05, "initial_threshold": 0.1}
    sae, log = train_sae(X, 48, arch, k=3, n_steps=60, batch_size=256, lr=5e-3, seed=0, **kw)
    assert log["fvu"][-1] < 0.6 * log["fvu"][0], (log["fvu"][0], log["fvu"][-1])
    F = sae.encode(X[:100])
    assert F.shape == (100, 48) and F.dtype == np.float32
    if arch in ("topk", "abstopk"):
        assert np.all(np.count_nonzero(F, axis=1) <= 3)
    if arch == "batchtopk":
        assert sae.batch_threshold is not None and sae.batch_threshold > 0
    if arch in ("relu", "relu_april", "topk", "batchtopk", "jumprelu", "topafa", "lista"):
        assert np.all(F >= 0)


def test_dead_latents_get_auxk_gradient():
    """A latent that never fires gets no gradient from the MSE, but AuxK revives it."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((64, 8))
    sae = SparseAutoencoder.initialize(8, 16, "topk", k=2, seed=0, dtype="float64")
    sae.params["b_enc"][5] = -100.0  # latent 5 can never be in the top k
    _, G0, _ = loss_and_grad(sae, X)
    assert np.all(G0["W_enc"][:, 5] == 0) and np.all(G0["W_dec"][5] == 0)
    dead = np.zeros(16, bool)
    dead[5] = True
    sae.params["b_enc"][5] = 0.0
    sae.params["W_enc"][:, 5] = -sae.params["W_enc"][:, 5]  # still unlikely in the top k ...
    _, G1, st = loss_and_grad(sae, X, aux_coefficient=1.0, dead_mask=dead, k_aux=1)
    assert st["aux_loss"] > 0
    assert np.any(G1["W_dec"][5] != 0)


# --------------------------------------------------------------------------- files
def _reference_encode_saelens(folder, X):
    """SAELens' inference formulas, written from its documented behaviour, on the saved files."""
    from safetensors.numpy import load_file

    cfg = json.load(open(os.path.join(folder, "cfg.json")))
    T = load_file(os.path.join(folder, "sae_weights.safetensors"))
    xc = X - T["b_dec"] if cfg["apply_b_dec_to_input"] else X
    z = xc @ T["W_enc"] + T["b_enc"]
    arch = cfg["architecture"]
    if arch == "standard":
        return np.maximum(z, 0)
    if arch == "jumprelu":
        return np.where(z > T["threshold"], z, 0) * (z > 0)
    if arch == "topk":
        k = cfg["k"]
        idx = np.argsort(-z, axis=1)[:, :k]
        out = np.zeros_like(z)
        np.put_along_axis(out, idx, np.maximum(np.take_along_axis(z, idx, 1), 0), axis=1)
        return out
    raise AssertionError(arch)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_save_load_round_trip(signals, tmp_path, arch):
    X = signals[0][:1024]
    kw = {"initial_threshold": 0.05} if arch == "jumprelu" else {}
    sae, _ = train_sae(X, 32, arch, k=3, n_steps=8, batch_size=128, lr=3e-3, seed=0, **kw)
    folder = str(tmp_path / arch)
    sae.save(folder)
    cfg = json.load(open(os.path.join(folder, "cfg.json")))
    for key in ("d_in", "d_sae", "dtype", "architecture", "apply_b_dec_to_input", "normalize_activations", "metadata"):
        assert key in cfg
    assert cfg["d_in"] == 24 and cfg["d_sae"] == 32 and cfg["dtype"] == "float32"
    major = int(cfg["metadata"]["sae_lens_version"].split(".")[0])
    assert major >= 6
    back = SparseAutoencoder.load(folder)
    assert back.architecture == arch and back.k == sae.k
    for key in sae.params:
        np.testing.assert_array_equal(back.params[key], sae.params[key])
    np.testing.assert_array_equal(back.encode(X[:50]), sae.encode(X[:50]))
    if cfg["architecture"] in ("standard", "topk", "jumprelu"):
        # what SAELens computes from these files is what we compute
        np.testing.assert_allclose(_reference_encode_saelens(folder, X[:50]), sae.encode(X[:50]), rtol=1e-5, atol=1e-6)
    if arch in ("jumprelu", "batchtopk"):
        from safetensors.numpy import load_file

        assert "threshold" in load_file(os.path.join(folder, "sae_weights.safetensors"))


def test_input_scale_is_folded_on_save(signals, tmp_path):
    X = signals[0][:256]
    for arch in ("topk", "relu", "jumprelu", "lista", "mpsae"):
        sae = SparseAutoencoder.initialize(24, 32, arch, k=3, seed=0, l1_coefficient=0.1, input_scale=2.5)
        sae.params["b_dec"] = sae.params["b_dec"] + 0.1
        sae.save(str(tmp_path / arch))
        back = SparseAutoencoder.load(str(tmp_path / arch))
        np.testing.assert_allclose(back.forward(X), sae.forward(X), rtol=2e-4, atol=2e-4)
        if arch != "mpsae":
            assert back.input_scale == 1.0


def test_load_sparsify_layout(tmp_path):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    d_in, d_sae, k = 12, 30, 4
    enc = rng.standard_normal((d_sae, d_in)).astype(np.float32)
    bias = rng.standard_normal(d_sae).astype(np.float32)
    W_dec = rng.standard_normal((d_sae, d_in)).astype(np.float32)
    b_dec = rng.standard_normal(d_in).astype(np.float32)
    folder = tmp_path / "layers.3"
    folder.mkdir()
    save_file({"encoder.weight": enc, "encoder.bias": bias, "W_dec": W_dec, "b_dec": b_dec},
              str(folder / "sae.safetensors"))
    json.dump({"expansion_factor": 2, "normalize_decoder": True, "num_latents": d_sae, "k": k, "d_in": d_in},
              open(folder / "cfg.json", "w"))
    sae = SparseAutoencoder.load(str(folder))
    assert sae.architecture == "topk" and sae.k == k and sae.W_enc.shape == (d_in, d_sae)
    X = rng.standard_normal((20, d_in)).astype(np.float32)
    # sparsify: relu(encoder(x - b_dec)), top k, decode top_acts @ W_dec[top_idx] + b_dec
    pre = np.maximum((X - b_dec) @ enc.T + bias, 0)
    idx = np.argsort(-pre, axis=1)[:, :k]
    acts = np.take_along_axis(pre, idx, 1)
    recon = np.einsum("nk,nkd->nd", acts, W_dec[idx]) + b_dec
    np.testing.assert_allclose(sae.forward(X), recon, rtol=1e-4, atol=1e-4)


def test_round_trip_through_sae_lens(signals, tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    import torch

    X = signals[0][:64]
    sae = SparseAutoencoder.initialize(24, 32, "topk", k=3, seed=0)
    sae.save(str(tmp_path / "m"))
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "m"), device="cpu")
    F = theirs.encode(torch.from_numpy(X)).detach().numpy()
    np.testing.assert_allclose(F, sae.encode(X), rtol=1e-5, atol=1e-5)
    theirs.save_model(str(tmp_path / "back"))
    back = SparseAutoencoder.load(str(tmp_path / "back"))
    np.testing.assert_allclose(back.encode(X), sae.encode(X), rtol=1e-5, atol=1e-5)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        SparseAutoencoder.load(str(tmp_path))
    (tmp_path / "cfg.json").write_text(json.dumps({"d_in": 3, "d_sae": 4, "architecture": "gated"}))
    with pytest.raises(FileNotFoundError):
        SparseAutoencoder.load(str(tmp_path))
    with pytest.raises(TypeError):
        SparseAutoencoder.load(3)


# --------------------------------------------------------------------------- amortization gap
def test_amortization_gap_l1_family(signals):
    X = signals[0][:3000]
    sae, _ = train_sae(X, 64, "relu", n_steps=150, batch_size=256, lr=3e-3, seed=0, l1_coefficient=0.1)
    Xe = X[:300].astype(np.float64)
    sae64 = SparseAutoencoder(*(sae.params[k].astype(np.float64) for k in ("W_enc", "b_enc", "W_dec", "b_dec")),
                              architecture="relu", l1_coefficient=0.1)
    gap = amortization_gap(sae64, Xe, tol=1e-9, max_iter=5000)
    assert gap["method"] == "fista" and gap["alpha"] == pytest.approx(0.05)
    # FISTA solves the SAE's own objective on its decoder: it can only do better, and its
    # certificate says it is within 1e-9 of the optimum
    assert gap["objective_gap"] >= -1e-9 * gap["solver_objective"]
    assert gap["solver_max_relative_gap"] <= 1e-9
    assert gap["objective_gap"] > 0
    # the SAE's objective as reported is its own codes' Lasso objective
    from sparsecode.lasso import lasso_objective

    xc = Xe - sae64.b_dec
    ref = float(np.mean(lasso_objective(xc, sae64.W_dec, sae64.encode(Xe), 0.05)))
    assert gap["sae_objective"] == pytest.approx(ref, rel=1e-9)


def test_amortization_gap_topk_family(signals):
    pytest.importorskip("sparsecode.pursuits")
    X = signals[0][:3000]
    sae, _ = train_sae(X, 64, "topk", k=3, n_steps=150, batch_size=256, lr=3e-3, seed=0)
    gap = amortization_gap(sae, X[:300])
    assert gap["method"] == "omp" and gap["n_nonzero"] == 3
    assert gap["solver_l0"] <= 3 and gap["sae_l0"] <= 3
    # OMP is greedy: it usually, not always, beats the encoder; both are feasible
    assert np.isfinite(gap["objective_gap"]) and 0 <= gap["solver_fvu"] < 1.5
    g2 = amortization_gap(sae, X[:300], method="iht")
    assert g2["method"] == "iht" and g2["solver_l0"] <= 3
    # warm-started from the SAE's exactly-k codes, IHT never ends above them
    assert g2["objective_gap"] >= -1e-6 * g2["sae_objective"]


# --------------------------------------------------------------------------- validation
def test_bad_inputs_are_refused(signals):
    X = signals[0][:512]
    sae = SparseAutoencoder.initialize(24, 32, "topk", k=3, seed=0)
    with pytest.raises(ValueError, match="features"):
        sae.encode(np.zeros((3, 5), np.float32))
    with pytest.raises(TypeError):
        sae.encode(np.zeros((3, 24), np.int64))
    with pytest.raises(TypeError, match="dtype"):
        sae.encode(np.zeros((3, 24), np.float64))
    with pytest.raises(ValueError, match="NaN"):
        sae.encode(np.full((3, 24), np.nan, np.float32))
    with pytest.raises(ValueError, match="architecture"):
        train_sae(X, 32, "gated")
    with pytest.raises(ValueError, match="k must be"):
        train_sae(X, 32, "topk", k=40)
    with pytest.raises(ValueError, match="lr"):
        train_sae(X, 32, "topk", k=3, lr=-1.0)
    with pytest.raises(ValueError, match="d_sae"):
        train_sae(X, 0, "topk", k=3)
    with pytest.raises(ValueError, match="on_nan"):
        train_sae(X, 32, "topk", k=3, on_nan="ignore")
    with pytest.raises(ValueError, match="2-D"):
        train_sae(X[0], 32, "topk", k=3)
    with pytest.raises(TypeError):
        train_sae(X.astype(np.int32), 32, "topk", k=3)
    with pytest.raises(ValueError, match="empty"):
        train_sae(X[:0], 32, "topk", k=3)
    with pytest.raises(ValueError, match="needs k"):
        SparseAutoencoder.initialize(24, 32, "mpsae")
    with pytest.raises(ValueError, match="W_enc"):
        SparseAutoencoder(np.zeros((3, 4)), np.zeros(4), np.zeros((5, 3)), np.zeros(3), architecture="relu")
    strict = pytest.importorskip("array_api_strict")
    with pytest.raises(TypeError):
        sae.encode(strict.asarray(X[:3]))


def test_single_row_and_decode_shapes():
    sae = SparseAutoencoder.initialize(6, 10, "relu", seed=0, dtype="float64")
    x = np.random.default_rng(0).standard_normal(6)
    f = sae.encode(x)
    assert f.shape == (10,)
    assert sae.decode(f).shape == (6,)
    np.testing.assert_allclose(sae.forward(x), f @ sae.W_dec + sae.b_dec)


# --------------------------------------------------------------------------- backends
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_portable_code_matches_numpy_kernels(arch, monkeypatch):
    """array-api-strict runs the portable (dense) products; NumPy the sparse kernels (forced)."""
    import sparsecode.sae as sae_mod

    strict = pytest.importorskip("array_api_strict")
    monkeypatch.setattr(sae_mod, "_SPARSE_DENSITY", 1.01)
    monkeypatch.setattr(sae_mod, "_KS_DENSE_FRACTION", 2.0)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((40, 8))
    sae = SparseAutoencoder.initialize(8, 24, arch, k=3, seed=0, dtype="float64", l1_coefficient=0.2)
    sae.params["b_enc"] = sae.params["b_enc"] - 0.3  # sparse codes: the NumPy kernels go sparse
    dead = np.zeros(24, bool)
    dead[::3] = True
    L, G, _ = loss_and_grad(sae, X, aux_coefficient=0.3, dead_mask=dead, afa_coefficient=0.2)
    S = SparseAutoencoder(*(strict.asarray(sae.params[k]) for k in ("W_enc", "b_enc", "W_dec", "b_dec")),
                          architecture=arch, k=sae.k, l1_coefficient=0.2,
                          log_threshold=strict.asarray(sae.params["log_threshold"]) if arch == "jumprelu" else None)
    Ls, Gs, _ = loss_and_grad(S, strict.asarray(X), aux_coefficient=0.3, dead_mask=strict.asarray(dead),
                              afa_coefficient=0.2)
    assert Ls == pytest.approx(L, rel=1e-12)
    for key in G:
        np.testing.assert_allclose(np.asarray(Gs[key]), G[key], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(np.asarray(S.encode(strict.asarray(X))), sae.encode(X), atol=1e-12)


def test_trains_on_array_api_strict(signals):
    strict = pytest.importorskip("array_api_strict")
    X = signals[0][:512]
    a, _ = train_sae(X, 32, "topk", k=3, n_steps=5, batch_size=128, seed=0)
    b, _ = train_sae(strict.asarray(X), 32, "topk", k=3, n_steps=5, batch_size=128, seed=0)
    np.testing.assert_allclose(np.asarray(b.W_dec), a.W_dec, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- store + CLI
def test_train_from_activation_store_and_cli(signals, tmp_path):
    store_mod = pytest.importorskip("sparsecode.store")
    X = signals[0][:2048]
    path = str(tmp_path / "acts.npy")
    np.save(path, X)
    store = store_mod.ActivationStore([path], holdout_fraction=0.25, seed=0)
    sae, log = train_sae(store, 40, "topk", k=3, n_steps=20, batch_size=128, lr=3e-3, seed=0)
    assert log["steps_done"] == 20 and log["fvu"][-1] < log["fvu"][0]

    import argparse

    from sparsecode import sae as sae_module
    from sparsecode import sae_train

    def main(argv):  # the two subcommands, without importing every other subcommand's module
        cmd, rest = argv[0], argv[1:]
        mod = sae_train if cmd == "train" else sae_module
        parser = argparse.ArgumentParser()
        mod.configure_parser(parser)
        return mod.run_cli(parser.parse_args(rest))

    from sparsecode.cli import COMMANDS

    assert COMMANDS["train"][0] == "sparsecode.sae_train" and COMMANDS["encode"][0] == "sparsecode.sae"
    out = str(tmp_path / "sae")
    assert main(["train", path, "--out", out, "--d-sae", "40", "--k", "3", "--n-tokens", "2048",
                 "--batch-size", "256", "--no-progress", "--checkpoint-every", "4"]) == 0
    loaded = SparseAutoencoder.load(out)
    assert loaded.d_sae == 40 and loaded.architecture == "topk"
    codes = str(tmp_path / "codes.npz")
    assert main(["encode", path, "--sae", out, "--out", codes, "--max-rows", "500"]) == 0
    import scipy.sparse as sp

    C = sp.load_npz(codes)
    assert C.shape == (500, 40)
    np.testing.assert_allclose(C.toarray(), loaded.encode(X[:500]), rtol=1e-5, atol=1e-6)
    D = str(tmp_path / "D.npy")
    np.save(D, np.asarray(loaded.W_dec))
    assert main(["encode", path, "--dictionary", D, "--method", "omp", "--k", "3", "--out", codes,
                 "--max-rows", "100"]) == 0
    assert sp.load_npz(codes).shape == (100, 40)


@pytest.mark.slow
def test_benchmark_quick_runs(tmp_path):
    """benchmarks/sae.py --quick end to end (keeps the script from rotting; no timing asserted)."""
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "sae.py")
    spec = importlib.util.spec_from_file_location("bench_sae", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--quick", "--synthetic", "--out", str(tmp_path), "--time-steps", "1",
                     "--quality-steps", "8"]) == 0
    res = json.load(open(tmp_path / "sae_benchmark_quick.json"))
    assert {r["encoder"] for r in res["quality"]} == set(ARCHITECTURES)
    assert all(np.isfinite(r["fvu"]) and r["l0"] >= 0 for r in res["quality"])
    assert all(r["tokens_per_s"] > 0 for r in res["throughput"])
    assert os.path.getsize(tmp_path / "sae_frontier_quick.png") > 0
