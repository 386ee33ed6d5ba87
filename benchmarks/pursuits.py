"""Batched OMP (Numba kernel and portable code), MP and IHT against scikit-learn and SPAMS.

Problems (noiseless signals that are exact ``n_nonzero``-sparse combinations of a random
unit-norm Gaussian dictionary, magnitudes uniform in [1, 2] with random signs, from
``sparsecode.datasets.make_sparse_signals``):

  * "small": 2000 signals, 256 features, 1024 atoms, 16 nonzeros (the issue's anchor problem);
  * "llm":   4096 signals, 768 features, 8192 atoms, 32 nonzeros (an LLM residual stream with
    an 8192-feature dictionary).

For each method: wall seconds, CPU seconds (all threads; a steadier number on a shared
machine) and the support-recovery rate (fraction of signals whose ``n_nonzero`` largest
coefficients sit exactly on the true support). Every timed OMP includes its Gram matrix and
its correlations ``X @ D.T``, as scikit-learn's and SPAMS' timings do. Slow methods run on a
subset of the signals on the big problem and their time is scaled to all signals (marked
``*``). Then a time breakdown of our OMP (normalisation, Gram build, correlations, the pursuit
steps -- selection, progressive Cholesky and correlation updates -- and assembling the codes),
with the flop counts that explain it, and a PNG of recovery rate against sparsity for OMP, MP
and IHT (``results/pursuits_recovery.png``) plus one of the time breakdown.

SPAMS (``pip install spams-bin``, the ``bench`` extra) is timed when it imports.

Usage: python benchmarks/pursuits.py [--quick] [--out results] [--skip-llm]
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import numpy as np

from sparsecode.datasets import make_sparse_signals
from sparsecode.pursuits import iht, matching_pursuit, omp


def timed(fn, repeats=1):
    """Best wall time over ``repeats`` runs, the CPU time of that run, and its output."""
    best = None
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        w, c = time.perf_counter() - w0, time.process_time() - c0
        if best is None or w < best[0]:
            best = (w, c, out)
    return best


def recovery_rate(codes, A_true, s):
    """Fraction of rows whose ``s`` largest |codes| are exactly the true support."""
    codes = np.asarray(codes)
    top = np.argpartition(-np.abs(codes), s - 1, axis=1)[:, :s]
    pred = np.zeros(codes.shape, dtype=bool)
    np.put_along_axis(pred, top, True, axis=1)
    pred &= codes != 0
    return float(np.mean(np.all(pred == (A_true != 0), axis=1)))


def spams_module():
    try:
        import spams  # noqa: F401

        return spams
    except Exception:
        return None


def sklearn_omp(X, D, s):
    from sklearn.linear_model import orthogonal_mp_gram

    G = D @ D.T
    Xy = D @ X.T
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return orthogonal_mp_gram(G, Xy, n_nonzero_coefs=s).T


def spams_omp(spams, X, D, s):
    Xf = np.asfortranarray(X.T)
    Df = np.asfortranarray(D.T)
    return spams.omp(Xf, Df, L=s, numThreads=-1).toarray().T


def run_problem(name, n, f, k, s, *, subset, sk_subset, iht_iter, repeats, seed=0):
    X, D, A = make_sparse_signals(n, f, k, s, noise=0.0, seed=seed)
    rows = []

    def add(method, wall, cpu, codes, A_ref, n_run, note=""):
        scale = n / n_run
        rows.append({
            "problem": name, "method": method, "seconds": wall * scale, "cpu_seconds": cpu * scale,
            "recovery": recovery_rate(codes, A_ref, s), "signals_timed": n_run, "note": note,
        })

    # References first: after a parallel Numba region, OpenMP worker threads may keep
    # spinning for a while and slow the BLAS threads of whatever runs next.
    ms = min(n, sk_subset)
    w, c, codes = timed(lambda: sklearn_omp(X[:ms], D, s), 1)
    add("sklearn orthogonal_mp_gram", w, c, codes, A[:ms], ms, "incl. Gram")
    spams = spams_module()
    if spams is not None:
        spams_omp(spams, X[:4], D, s)
        w, c, codes = timed(lambda: spams_omp(spams, X, D, s), repeats)
        add("spams omp", w, c, codes, A, n, "incl. Gram, all threads")

    # compile (or load from cache) the Numba kernel outside the timings
    w0 = time.perf_counter()
    omp(X[:4], D, s, kernel="numba")
    compile_s = time.perf_counter() - w0

    w, c, res = timed(lambda: omp(X, D, s, kernel="numba"), repeats)
    add("omp (numba kernel)", w, c, res.codes, A, n)
    breakdown = dict(res.info["timings"])
    G = D @ D.T
    w, c, _ = timed(lambda: omp(X, D, s, kernel="numba", gram=G), repeats)
    rows.append({"problem": name, "method": "omp (numba, Gram given)", "seconds": w, "cpu_seconds": c,
                 "recovery": rows[-1]["recovery"], "signals_timed": n, "note": "Gram precomputed, not timed"})
    del G

    m = min(n, subset)
    w, c, res = timed(lambda: omp(X[:m], D, s, kernel="portable"), 1)
    add("omp (portable array API)", w, c, res.codes, A[:m], m)
    w, c, res = timed(lambda: matching_pursuit(X, D, s, kernel="numba"), repeats)
    add("matching pursuit (numba)", w, c, res.codes, A, n, f"{s} steps")
    w, c, res = timed(lambda: matching_pursuit(X[:m], D, s, kernel="portable"), 1)
    add("matching pursuit (portable)", w, c, res.codes, A[:m], m, f"{s} steps")
    mi = min(n, subset)
    w, c, res = timed(lambda: iht(X[:mi], D, s, max_iter=iht_iter), 1)
    add("iht (normalised step)", w, c, res.codes, A[:mi], mi, f"<= {iht_iter} iterations")
    for r in rows:
        if r["signals_timed"] < n:
            r["note"] = (r["note"] + "; " if r["note"] else "") + f"*timed on {r['signals_timed']}, scaled to {n}"
    flops = {
        "gram (k^2 f)": k * k * f,
        "correlations (n k f)": n * k * f,
        "pursuit (n k s^2/2)": n * k * s * s / 2,
    }
    return rows, breakdown, compile_s, flops


def recovery_curve(f, k, sparsities, n, iht_iter, seed=1):
    out = {"omp": [], "mp": [], "iht": []}
    for s in sparsities:
        X, D, A = make_sparse_signals(n, f, k, s, noise=0.0, seed=seed + s)
        out["omp"].append(recovery_rate(omp(X, D, s).codes, A, s))
        out["mp"].append(recovery_rate(matching_pursuit(X, D, s).codes, A, s))
        out["iht"].append(recovery_rate(iht(X, D, s, max_iter=iht_iter).codes, A, s))
    return out


def print_table(rows):
    head = f"{'problem':8s} {'method':30s} {'seconds':>9s} {'cpu s':>8s} {'recovery':>9s}  note"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['problem']:8s} {r['method']:30s} {r['seconds']:9.3f} {r['cpu_seconds']:8.3f} "
              f"{100 * r['recovery']:8.1f}%  {r['note']}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small problems, for a smoke run")
    p.add_argument("--out", default="results", help="folder for the PNGs")
    p.add_argument("--skip-llm", action="store_true", help="only the small problem")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.quick:
        problems = [("small", 100, 32, 96, 4), ("llm", 64, 48, 192, 6)]
        opts = dict(subset=100, sk_subset=20, iht_iter=20, repeats=1)
        sparsities, curve_n, curve_fk = [2, 4, 8], 30, (32, 96)
    else:
        problems = [("small", 2000, 256, 1024, 16), ("llm", 4096, 768, 8192, 32)]
        opts = dict(subset=2000, sk_subset=2000, iht_iter=100, repeats=3)
        sparsities, curve_n, curve_fk = [4, 8, 16, 24, 32, 40, 48, 64], 200, (256, 1024)
    if args.skip_llm:
        problems = problems[:1]
    import numba

    print(f"numba threads: {numba.get_num_threads()}, SPAMS: {'yes' if spams_module() else 'not installed'}")
    all_rows, breakdowns = [], {}
    for name, n, f, k, s in problems:
        o = dict(opts)
        if name == "llm" and not args.quick:
            o.update(subset=256, sk_subset=8, iht_iter=30, repeats=1)
        print(f"\n== {name}: {n} signals, {f} features, {k} atoms, {s} nonzeros")
        rows, bd, compile_s, flops = run_problem(name, n, f, k, s, **o)
        print_table(rows)
        ref = {r["method"]: r["seconds"] for r in rows}
        ours = ref["omp (numba kernel)"]
        sk = ref.get("sklearn orthogonal_mp_gram")
        sp = ref.get("spams omp")
        print(f"omp (numba) speed-up: {sk / ours:.1f}x over scikit-learn"
              + (f", {sp / ours:.2f}x of SPAMS' speed" if sp else ""))
        print(f"time breakdown of omp (numba), seconds: "
              + ", ".join(f"{key} {val:.3f}" for key, val in bd.items())
              + f"  (kernel compile/load once: {compile_s:.2f} s)")
        print("flops: " + ", ".join(f"{key} {val / 1e9:.2f} G" for key, val in flops.items()))
        all_rows += rows
        breakdowns[name] = bd

    print(f"\n== recovery rate against sparsity ({curve_fk[0]} features, {curve_fk[1]} atoms, {curve_n} signals)")
    curve = recovery_curve(curve_fk[0], curve_fk[1], sparsities, curve_n, opts["iht_iter"])
    print("s     " + "  ".join(f"{s:5d}" for s in sparsities))
    for key, vals in curve.items():
        print(f"{key:5s} " + "  ".join(f"{100 * v:5.1f}" for v in vals))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for key, label in (("omp", "OMP"), ("mp", "matching pursuit"), ("iht", "IHT (normalised)")):
        ax.plot(sparsities, [100 * v for v in curve[key]], "o-", label=label)
    ax.set_xlabel("nonzeros per signal")
    ax.set_ylabel("exact support recovery (% of signals)")
    ax.set_title(f"{curve_fk[0]} features, {curve_fk[1]} Gaussian atoms, noiseless")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = os.path.join(args.out, "pursuits_recovery.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"saved {path}")

    fig, ax = plt.subplots(figsize=(6, 3))
    parts = ["normalise", "gram", "correlations", "pursuit", "assemble"]
    names = list(breakdowns)
    left = np.zeros(len(names))
    for part in parts:
        vals = np.array([breakdowns[nm].get(part, 0.0) for nm in names])
        ax.barh(names, vals, left=left, label=part)
        left += vals
    ax.set_xlabel("seconds (omp, Numba kernel)")
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    path = os.path.join(args.out, "pursuits_breakdown.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"saved {path}")
    return all_rows


if __name__ == "__main__":
    main()
