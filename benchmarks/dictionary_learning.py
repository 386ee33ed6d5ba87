"""Dictionary learning benchmark: recovery of a known dictionary against time, and atoms
learned from natural image patches.

Problem (the issue's): 20000 signals, 64 features, 128 unit-norm random atoms, 5 non-zeros
per signal (magnitudes 1..2, random signs), Gaussian noise 0.01. For every update rule (BCD,
MOD, K-SVD) and coding step (FISTA, OMP) of ``learn_dictionary_online``, and for scikit-learn's
``MiniBatchDictionaryLearning`` and SPAMS' ``trainDL`` (when ``import spams`` works), the
recovery (MMCS: mean over true atoms of the best |cos| with a learned atom; fraction of true
atoms with |cos| > 0.99) is traced against the learner's own time (evaluation excluded).

Outputs: a table on stdout, ``dictionary_learning_mmcs.png`` (MMCS against seconds),
``dictionary_learning_patches.png`` (atoms learned from 8x8 patches of scikit-learn's sample
images: the Olshausen & Field experiment; they should look like oriented edges) and
``dictionary_learning.json`` in ``--out`` (default ``results/``).

``--quick`` runs a small version (seconds) for smoke tests.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sparsecode.datasets import atom_recovery, make_sparse_signals  # noqa: E402
from sparsecode.dictionary import learn_dictionary_online  # noqa: E402


def trace_ours(X, D_true, n_atoms, *, update, method, n_nonzero, batch_size, max_epochs, max_time, seed=0):
    """Run ``learn_dictionary_online`` and record (time, mmcs, fraction) after every batch.

    Time is the learner's own (``history['time']``): the evaluation in the callback is not
    counted. Stops once every atom is recovered (after two more batches) or at the budgets.
    """
    trace = []
    done_at = [None]

    def cb(t, D, row):
        r = atom_recovery(D_true, D)
        trace.append((row["time"], r["mmcs"], r["fraction"]))
        if r["fraction"] >= 1.0 and done_at[0] is None:
            done_at[0] = t
        return done_at[0] is not None and t >= done_at[0] + 2

    res = learn_dictionary_online(X, n_atoms, update=update, method=method, n_nonzero=n_nonzero,
                                  batch_size=batch_size, n_epochs=max_epochs, max_time=max_time,
                                  seed=seed, callback=cb)
    return np.asarray(trace), res


def trace_sklearn(X, D_true, n_atoms, *, alpha, batch_size, epochs, max_time, seed=0):
    """scikit-learn's MiniBatchDictionaryLearning driven by partial_fit (one batch per call,
    its documented online step), timed without the evaluation."""
    from sklearn.decomposition import MiniBatchDictionaryLearning

    est = MiniBatchDictionaryLearning(n_components=n_atoms, alpha=alpha, batch_size=batch_size,
                                      random_state=seed)
    rng = np.random.default_rng(seed)
    trace, elapsed = [], 0.0
    n = X.shape[0]
    for epoch in range(epochs):
        perm = rng.permutation(n)
        for i in range(0, n - batch_size + 1, batch_size):
            t0 = time.perf_counter()
            est.partial_fit(X[perm[i:i + batch_size]])
            elapsed += time.perf_counter() - t0
            if (i // batch_size) % 5 == 0:
                r = atom_recovery(D_true, est.components_)
                trace.append((elapsed, r["mmcs"], r["fraction"]))
            if elapsed > max_time:
                break
        if elapsed > max_time:
            break
    r = atom_recovery(D_true, est.components_)
    trace.append((elapsed, r["mmcs"], r["fraction"]))
    return np.asarray(trace)


SPAMS_THREADS = -1  # all cores unless --threads is given


def trace_spams(X, D_true, n_atoms, *, alpha, batch_size, iters, seed=0):
    """SPAMS trainDL (online BCD with LARS coding, Mairal et al.), one fresh run per budget of
    ``iters`` mini-batches (SPAMS cannot be stopped and resumed cheaply from Python)."""
    import spams

    Xf = np.asfortranarray(X.T)
    trace = []
    for it in iters:
        np.random.seed(seed)
        t0 = time.perf_counter()
        D = spams.trainDL(Xf, K=n_atoms, lambda1=alpha, iter=it, batchsize=batch_size, mode=2,
                          verbose=False, numThreads=SPAMS_THREADS)
        el = time.perf_counter() - t0
        r = atom_recovery(D_true, np.asarray(D).T)
        trace.append((el, r["mmcs"], r["fraction"]))
    return np.asarray(trace)


def first_time(trace, level):
    hit = np.flatnonzero(trace[:, 2] >= level)
    return float(trace[hit[0], 0]) if hit.size else float("nan")


def patches_experiment(out, quick, seed=0):
    """Atoms learned from 8x8 patches of scikit-learn's sample images (grey, patch mean removed)."""
    from sklearn.datasets import load_sample_images
    from sklearn.feature_extraction.image import extract_patches_2d

    rng = np.random.default_rng(seed)
    per_image = 2000 if quick else 25000
    patches = []
    for img in load_sample_images().images:
        grey = img.astype(np.float64).mean(axis=2) / 255.0
        p = extract_patches_2d(grey, (8, 8), max_patches=per_image, random_state=int(rng.integers(1 << 30)))
        patches.append(p.reshape(p.shape[0], -1))
    P = np.concatenate(patches)
    P = P - P.mean(axis=1, keepdims=True)  # remove the DC component of each patch
    P = P[np.linalg.norm(P, axis=1) > 1e-3]  # flat patches carry no structure
    P = P / P.std()
    n_atoms = 64 if quick else 144
    # a sparser code than the default alpha (1.2/sqrt(64) * mean norm) gives cleaner edges
    alpha = 0.5 * float(np.mean(np.linalg.norm(P, axis=1)))
    t0 = time.perf_counter()
    res = learn_dictionary_online(P, n_atoms, method="fista", update="bcd", alpha=alpha, batch_size=512,
                                  n_epochs=1 if quick else 3, seed=seed)
    el = time.perf_counter() - t0
    D = res.dictionary
    side = int(np.ceil(np.sqrt(n_atoms)))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(side, side, figsize=(side * 0.6, side * 0.6))
    for j, ax in enumerate(axes.ravel()):
        ax.axis("off")
        if j < n_atoms:
            a = D[j].reshape(8, 8)
            m = np.abs(a).max()
            ax.imshow(a, cmap="gray", vmin=-m, vmax=m, interpolation="nearest")
    fig.suptitle(f"{n_atoms} atoms from {P.shape[0]} 8x8 patches (online BCD + FISTA, alpha {alpha:.2f}, {el:.1f} s)",
                 fontsize=8)
    fig.tight_layout()
    path = os.path.join(out, "dictionary_learning_patches.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return {"n_patches": int(P.shape[0]), "n_atoms": n_atoms, "seconds": el, "alpha": alpha, "l0": float(res.history["l0"][-1]),
            "rel_error": float(res.history["rel_error"][-1]), "png": path}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small problem, seconds")
    ap.add_argument("--out", default="results", help="folder for the PNGs and JSON")
    ap.add_argument("--no-sklearn", action="store_true")
    ap.add_argument("--no-spams", action="store_true")
    ap.add_argument("--threads", type=int, default=None,
                    help="limit BLAS/OpenMP/Numba threads of every learner (SPAMS included); default: "
                         "leave them as they are. On a shared, oversubscribed machine --threads 1 "
                         "avoids the multi-threaded kernels waiting for CPU slices")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    global SPAMS_THREADS
    if args.threads is not None:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=args.threads)
        try:
            import numba

            numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
        except ImportError:
            pass
        SPAMS_THREADS = args.threads

    if args.quick:
        n, f, k, s = 3000, 20, 30, 3
        max_epochs, max_time, sk_epochs = 2, 5.0, 1
    else:
        n, f, k, s = 20000, 64, 128, 5
        max_epochs, max_time, sk_epochs = 6, 40.0, 10
    X, D_true, _ = make_sparse_signals(n, f, k, s, noise=0.01, seed=0)
    alpha = 1.2 / np.sqrt(f) * float(np.mean(np.linalg.norm(X, axis=1)))  # our default alpha
    # warm-up (Numba compilation is not part of the timings)
    Xw, _, _ = make_sparse_signals(600, f, k, s, seed=1)
    for method in ("fista", "omp"):
        for update in ("bcd", "ksvd"):
            learn_dictionary_online(Xw, k, method=method, update=update, n_nonzero=s, batch_size=300, max_batches=2)

    traces, rows = {}, []
    for update in ("bcd", "mod", "ksvd"):
        for method in ("fista", "omp"):
            bs = 1024 if update == "ksvd" else 512
            if args.quick:
                bs = 250 if update == "ksvd" else 150
            tr, res = trace_ours(X, D_true, k, update=update, method=method, n_nonzero=s, batch_size=bs,
                                 max_epochs=max_epochs, max_time=max_time)
            name = f"sparsecode {update}+{method} (batch {bs})"
            traces[name] = tr
            rows.append((name, first_time(tr, 0.95), first_time(tr, 1.0), tr[-1, 1], tr[-1, 2], tr[-1, 0]))
    if not args.no_sklearn:
        tr = trace_sklearn(X, D_true, k, alpha=alpha, batch_size=256, epochs=sk_epochs,
                           max_time=60.0 if not args.quick else 3.0)
        name = "sklearn MiniBatchDictionaryLearning (batch 256)"
        traces[name] = tr
        rows.append((name, first_time(tr, 0.95), first_time(tr, 1.0), tr[-1, 1], tr[-1, 2], tr[-1, 0]))
    if not args.no_spams:
        try:
            import spams  # noqa: F401

            iters = [10, 20] if args.quick else [20, 40, 80, 160, 320, 640, 1280]
            tr = trace_spams(X, D_true, k, alpha=alpha, batch_size=512, iters=iters)
            name = "SPAMS trainDL (batch 512)"
            traces[name] = tr
            rows.append((name, first_time(tr, 0.95), first_time(tr, 1.0), tr[-1, 1], tr[-1, 2], tr[-1, 0]))
        except ImportError:
            print("SPAMS not installed (pip install spams-bin): skipped")

    print(f"\nproblem: {n} signals, {f} features, {k} atoms, {s} non-zeros, noise 0.01; alpha={alpha:.3f}; "
          f"threads={'default' if args.threads is None else args.threads}")
    print(f"{'learner':<52}{'t(95%) s':>10}{'t(100%) s':>11}{'MMCS':>8}{'recovered':>11}{'time s':>9}")
    for name, t95, t100, mm, fr, tt in rows:
        print(f"{name:<52}{t95:>10.2f}{t100:>11.2f}{mm:>8.4f}{fr:>10.1%}{tt:>9.2f}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, tr in traces.items():
        style = "-" if name.startswith("sparsecode") else "--"
        ax.plot(np.maximum(tr[:, 0], 1e-3), tr[:, 1], style, marker="." if len(tr) < 12 else None, label=name)
    ax.set_xscale("log")
    ax.set_xlabel("seconds (learner time, evaluation excluded)")
    ax.set_ylabel("MMCS (mean best |cos| with a true atom)")
    ax.set_ylim(0.5, 1.005)
    ax.axhline(0.99, color="grey", lw=0.5)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(f"dictionary recovery: {n} x {f}, {k} atoms, {s}-sparse, noise 0.01")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "dictionary_learning_mmcs.png"), dpi=120)
    plt.close(fig)

    patches = patches_experiment(args.out, args.quick)
    print(f"\npatches: {patches['n_atoms']} atoms from {patches['n_patches']} 8x8 patches in "
          f"{patches['seconds']:.1f} s (L0 {patches['l0']:.1f}, relative error {patches['rel_error']:.3f}) "
          f"-> {patches['png']}")
    with open(os.path.join(args.out, "dictionary_learning.json"), "w") as fh:
        json.dump({"rows": [dict(zip(("learner", "t95", "t100", "mmcs", "fraction", "time"), r)) for r in rows],
                   "traces": {kk: v.tolist() for kk, v in traces.items()}, "patches": patches}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
