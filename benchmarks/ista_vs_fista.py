"""ISTA vs FISTA (with and without restart) vs scikit-learn on the same Lasso.

Two built-in problems (256 features, 1024 unit-norm atoms, 2000 signals):
  * "well-conditioned": Gaussian atoms, signals = 20-sparse combinations + noise,
    alpha chosen so that about 5% of the codes are non-zero;
  * "ill-conditioned": coherent atoms (128 clusters of 8 atoms, |cos| ~ 0.9 inside a cluster).

Suboptimality is ``(F - F*) / F*`` with ``F`` the objective averaged over samples and ``F*``
the best objective any solver reached (benchopt's convention). Prints, for each solver,
iterations and seconds to reach 1e-3, 1e-6 and 1e-9, the fitted log-log slope of the
suboptimality curve, the time per iteration against the dense matrix products its gradient
form needs, and a certified run (stopping on the duality gap). Saves PNGs of suboptimality
against iterations and time.

"FISTA working sets" is ``fista(working_set=True)``: FISTA on each sample's working set (its
support and the atoms nearest to violating), the full gap certified between rounds. Its
history has one point per round; its iterations are inner iterations of the slowest sample,
and its ms/it is the wall time per such (batched) iteration, compared like the others with
the dense full-dictionary product.

Usage: python benchmarks/ista_vs_fista.py [--quick] [--out results] [--dtype float64|float32|both]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from sparsecode import fista, ista, lasso_objective, lipschitz_constant
from sparsecode.lasso import alpha_max

THRESHOLDS = (1e-3, 1e-6, 1e-9)


def make_problem(kind: str, n_samples=2000, n_features=256, n_atoms=1024, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    if kind == "well":
        D = rng.standard_normal((n_atoms, n_features))
    else:  # coherent: clusters of nearly parallel atoms
        n_clusters = n_atoms // 8
        centres = rng.standard_normal((n_clusters, n_features))
        D = np.repeat(centres, 8, axis=0) + 0.35 * rng.standard_normal((n_atoms, n_features))
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    A = np.zeros((n_samples, n_atoms))
    for i in range(n_samples):
        S = rng.choice(n_atoms, 20, replace=False)
        A[i, S] = rng.standard_normal(20)
    X = A @ D + 0.1 * rng.standard_normal((n_samples, n_features))
    return X.astype(dtype), D.astype(dtype)


def choose_alpha(X, D, target=0.05):
    """Bisection on alpha / alpha_max so that about ``target`` of the codes are non-zero."""
    Xs = X[:200]
    amax = alpha_max(Xs, D)
    lo, hi = 0.0, 1.0
    for _ in range(12):
        mid = 0.5 * (lo + hi)
        codes = fista(Xs, D, mid * amax, tol=1e-5, max_iter=500, restart="gradient").codes
        dens = np.mean(codes != 0)
        lo, hi = (mid, hi) if dens > target else (lo, mid)
    return 0.5 * (lo + hi) * amax


def time_products(X, D, gram: bool, repeats=5):
    """Seconds of the dense products one gradient evaluation needs."""
    A = np.zeros((X.shape[0], D.shape[0]), dtype=X.dtype) + np.asarray(0.01, dtype=X.dtype)
    G = D @ D.T
    fn = (lambda: A @ G) if gram else (lambda: (A @ D - X) @ D.T)
    fn()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t) / repeats


def first_reach(values, xs, thr):
    hit = np.nonzero(values <= thr)[0]
    return xs[hit[0]] if hit.size else np.nan


def loglog_slope(it, sub, lo=1e-5, hi=1e-1):
    m = (sub > lo) & (sub < hi) & (it > 1)
    if m.sum() < 5:
        return np.nan
    return float(np.polyfit(np.log(it[m]), np.log(sub[m]), 1)[0])


def run_sklearn(X, D, alpha, positive=False):
    """(label, seconds, objective) for lasso_cd at several tolerances and lasso_lars."""
    from sklearn.decomposition import sparse_encode

    out = []
    for tol in (1e-2, 1e-4, 1e-6, 1e-8):
        # lasso_cd's tolerance is passed through max_iter/alpha only; vary it via Lasso directly
        from sklearn.linear_model import Lasso

        t = time.perf_counter()
        model = Lasso(alpha=alpha / X.shape[1], fit_intercept=False, tol=tol, max_iter=100000,
                      positive=positive, precompute=D @ D.T)
        # sparse_encode fits one multi-target Lasso on D.T; same objective up to 1/n_features
        model.fit(D.T, X.T)
        codes = model.coef_
        out.append((f"sklearn lasso_cd tol={tol:g}", time.perf_counter() - t, codes))
    t = time.perf_counter()
    codes = sparse_encode(X, D, algorithm="lasso_lars", alpha=alpha, positive=positive)
    out.append(("sklearn lasso_lars", time.perf_counter() - t, codes))
    t = time.perf_counter()
    codes = sparse_encode(X, D, algorithm="lasso_cd", alpha=alpha, positive=positive, max_iter=100000)
    out.append(("sklearn sparse_encode lasso_cd (default tol)", time.perf_counter() - t, codes))
    try:
        import spams  # noqa: F401

        Xf = np.asfortranarray(X.T.astype(np.float64))
        Df = np.asfortranarray(D.T.astype(np.float64))
        t = time.perf_counter()
        codes = spams.lasso(Xf, D=Df, lambda1=alpha, lambda2=0.0, mode=2, pos=positive, numThreads=-1)
        out.append(("SPAMS lasso (LARS)", time.perf_counter() - t, np.asarray(codes.todense()).T))
    except ImportError:
        pass
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small problem, for smoke tests")
    p.add_argument("--out", default="results")
    p.add_argument("--dtype", default="both", choices=["float64", "float32", "both"])
    p.add_argument("--max-iter", type=int, default=None)
    p.add_argument("--no-sklearn", action="store_true")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = dict(n_samples=200, n_features=64, n_atoms=256) if args.quick else {}
    # ISTA needs many iterations to show its O(1/k); the FISTA variants reach 1e-9 well before
    # their cap on the well-conditioned problem, and the cap shows where they stand otherwise
    max_iter = args.max_iter or (300 if args.quick else 400)
    ista_iter = 2 * max_iter
    dtypes = ["float64", "float32"] if args.dtype == "both" else [args.dtype]
    rows = []
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    for pi, kind in enumerate(("well", "ill")):
        X64, D64 = make_problem(kind, **size)
        alpha = choose_alpha(X64, D64)
        L = lipschitz_constant(D64)
        print(f"\n== {kind}-conditioned problem: X {X64.shape}, D {D64.shape}, alpha = {alpha:.4g}"
              f" ({alpha / alpha_max(X64, D64):.3f} alpha_max), L = {L:.3f}")
        # high-accuracy reference from a long restarted FISTA run
        # 1e-13 relative gap is about the float64 floor of the certificate; it stops there
        ref = fista(X64, D64, alpha, tol=1e-13, max_iter=20 * max_iter, restart="gradient")
        curves = {}
        for dt in (dtypes if kind == "well" else ["float64"]):
            X, D = X64.astype(dt), D64.astype(dt)
            # load the working-set kernels once (Numba's cache load and thread start-up, ~0.3 s,
            # are paid by a process's first call; the other variants were warmed by `ref`)
            fista(X, D, alpha, tol=1e-2, restart="gradient", working_set=True)
            solvers = [
                ("ISTA", lambda: ista(X, D, alpha, tol=0.0, max_iter=ista_iter, history=True)),
                ("FISTA", lambda: fista(X, D, alpha, tol=0.0, max_iter=max_iter, history=True)),
                ("FISTA restart=gradient", lambda: fista(X, D, alpha, tol=0.0, max_iter=max_iter, history=True, restart="gradient")),
                ("FISTA restart=function", lambda: fista(X, D, alpha, tol=0.0, max_iter=max_iter, history=True, restart="function")),
                # history per round (a full certification each); tol 1e-13 runs it to the float64 floor
                ("FISTA working sets restart=gradient", lambda: fista(
                    X, D, alpha, tol=1e-13 if dt == "float64" else 1e-7, max_iter=20 * max_iter, history=True,
                    restart="gradient", working_set=True)),
            ]
            for name, fn in solvers:
                res = fn()
                curves[(dt, name)] = res.history
        F_best = min(float(np.mean(ref.objective)), *(float(np.min(h.objective)) for h in curves.values()))
        sk = [] if args.no_sklearn else run_sklearn(X64, D64, alpha)
        for label, sec, codes in sk:
            F_best = min(F_best, float(np.mean(lasso_objective(X64, D64, np.ascontiguousarray(codes), alpha))))
        gram_form = None
        for (dt, name), h in curves.items():
            sub = np.maximum((h.objective - F_best) / F_best, 1e-17)
            it = h.iteration.astype(float)
            # working sets: one record per round; seconds per (batched) inner iteration
            per_it = h.time[-1] / (h.iteration[-1] if "working" in name else len(h))
            X, D = X64.astype(dt), D64.astype(dt)
            gram_form = D.shape[0] <= 2 * D.shape[1]
            prod = time_products(X, D, gram_form)
            rows.append(dict(problem=kind, dtype=dt, solver=name,
                             **{f"it@{t:g}": first_reach(sub, h.iteration, t) for t in THRESHOLDS},
                             **{f"s@{t:g}": first_reach(sub, h.time, t) for t in THRESHOLDS},
                             slope=loglog_slope(it, sub), per_iter=per_it, prod_ratio=per_it / prod))
            ls = "-" if dt == "float64" else ":"
            axes[pi, 0].loglog(it, sub, ls, label=f"{name} ({dt})")
            axes[pi, 1].loglog(np.maximum(h.time, 1e-4), sub, ls, label=f"{name} ({dt})")
        for label, sec, codes in sk:
            F = float(np.mean(lasso_objective(X64, D64, np.ascontiguousarray(codes), alpha)))
            sub = max((F - F_best) / F_best, 1e-17)
            rows.append(dict(problem=kind, dtype="float64", solver=label,
                             **{f"it@{t:g}": np.nan for t in THRESHOLDS},
                             **{f"s@{t:g}": (sec if sub <= t else np.nan) for t in THRESHOLDS},
                             slope=np.nan, per_iter=np.nan, prod_ratio=np.nan, final=sub))
            axes[pi, 1].loglog([sec], [sub], "k*" if "lars" in label.lower() else "ko")
            axes[pi, 1].annotate(label.replace("sklearn ", ""), (sec, sub), fontsize=7)
        # certified runs: what a user who wants the answer gets (stopping on the duality gap)
        for dt in (dtypes if kind == "well" else ["float64"]):
            X, D = X64.astype(dt), D64.astype(dt)
            # float32 iterates cannot certify much below a 1e-6 relative gap (~16 eps): ask 1e-5
            ctol = 1e-6 if dt == "float64" else 1e-5
            for name, kw in ((f"FISTA restart=gradient, tol={ctol:g}", dict(restart="gradient")),
                             (f"FISTA, tol={ctol:g}", {}),
                             (f"FISTA working sets, tol={ctol:g}", dict(restart="gradient", working_set=True)),
                             ("FISTA working sets, tol=1e-3", dict(restart="gradient", working_set=True))):
                kw = dict(kw)
                if name.endswith("tol=1e-3"):  # a loose certificate; the achieved suboptimality is printed
                    kw["tol"] = 1e-3
                sec = np.inf
                for _ in range(3 if kw.get("working_set") else 1):  # best of 3 where it is cheap
                    t = time.perf_counter()
                    res = fista(X, D, alpha, **{"tol": ctol, "max_iter": 5000, **kw})
                    sec = min(sec, time.perf_counter() - t)
                F = float(np.mean(lasso_objective(X64, D64, np.asarray(res.codes, dtype=np.float64), alpha)))
                rows.append(dict(problem=kind, dtype=dt, solver="certified " + name,
                                 **{f"it@{t_:g}": np.nan for t_ in THRESHOLDS},
                                 **{f"s@{t_:g}": np.nan for t_ in THRESHOLDS},
                                 slope=np.nan, per_iter=np.nan, prod_ratio=np.nan,
                                 final=(F - F_best) / F_best, wall=sec,
                                 conv=f"{int(np.sum(res.converged))}/{len(res.converged)}",
                                 iters=int(np.max(res.n_iter))))
        k = np.arange(1, ista_iter + 1, dtype=float)
        for ax, title in ((axes[pi, 0], "iterations"), (axes[pi, 1], "seconds")):
            ax.set_title(f"{kind}-conditioned: suboptimality vs {title}")
            ax.set_xlabel(title)
            ax.set_ylabel("(F - F*) / F*")
            ax.set_ylim(1e-16, 10)
            ax.grid(True, which="major", alpha=0.3)
        axes[pi, 0].loglog(k, 1.0 / k, "k--", lw=0.8, label="1/k")
        axes[pi, 0].loglog(k, 1.0 / k**2, "k-.", lw=0.8, label="1/k^2")
        axes[pi, 0].legend(fontsize=7)
        axes[pi, 1].legend(fontsize=7)
        print_table([r for r in rows if r["problem"] == kind])  # as soon as a problem is done
    fig.tight_layout()
    png = os.path.join(args.out, "ista_vs_fista.png")
    fig.savefig(png, dpi=110)
    print(f"\nplot written to {png}")
    return rows


def print_table(rows):
    hdr = (f"{'problem':7} {'dtype':7} {'solver':44} {'it@1e-3':>8} {'it@1e-6':>8} {'it@1e-9':>8} "
           f"{'s@1e-3':>8} {'s@1e-6':>8} {'s@1e-9':>8} {'slope':>6} {'ms/it':>7} {'it/prod':>7}")
    print("\n" + hdr)
    print("-" * len(hdr))
    for r in rows:
        def f(v, fmt):
            return format(v, fmt) if v is not None and np.isfinite(v) else "-"
        line = (f"{r['problem']:7} {r['dtype']:7} {r['solver'][:44]:44} {f(r['it@0.001'], '8.0f')} "
                f"{f(r['it@1e-06'], '8.0f')} {f(r['it@1e-09'], '8.0f')} {f(r['s@0.001'], '8.3f')} "
                f"{f(r['s@1e-06'], '8.3f')} {f(r['s@1e-09'], '8.3f')} {f(r['slope'], '6.2f')} "
                f"{f(r['per_iter'] * 1e3 if np.isfinite(r['per_iter']) else np.nan, '7.1f')} {f(r['prod_ratio'], '7.2f')}")
        if "final" in r:
            line += f"  final subopt {r['final']:.1e}"
        if "wall" in r:
            line += f" in {r['wall']:.3f} s, {r['iters']} it, converged {r['conv']}"
        print(line)


if __name__ == "__main__":
    main()
