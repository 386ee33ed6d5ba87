"""Numba kernels for the Lasso in Gram form (NumPy backend).

``prox_grad_gram``: ``Z = prox(Y - (Y @ G - C) / L, alpha / L)`` row by row, exploiting the
sparsity of ``Y``: the product ``Y @ G`` costs ``nnz(y) * n_atoms`` per row instead of
``n_atoms**2``. Optionally also returns, per row, ``(y - z) . (z - a)`` (the gradient-restart
test of O'Donoghue & Candes) while ``y`` and ``z`` are in cache.

``sparse_times_gram``: ``A @ G`` with the same row-sparse loop, for the duality gap.

Rows are processed in parallel (prange). The portable code in ``lasso.py`` computes the same
quantities with dense products; these kernels are registered beside it, used on NumPy only.
Products are accumulated in float64 (float32 Gram-form cancellation costs ~1e-6 otherwise).
"""

import types

import numba as nb
import numpy as np


def _twins(fn):
    """(parallel, serial) compilations of ``fn``.

    Numba's on-disk cache files an entry under the function's name, line and signature but
    not under ``parallel``: two compilations of one function load each other's machine code,
    and the "parallel" one can end up running the serial code. The serial twin is therefore
    a copy of the function under another name, cached apart.
    """
    serial = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_serial", fn.__defaults__,
                                fn.__closure__)
    serial.__qualname__ = fn.__qualname__ + "_serial"
    return nb.njit(parallel=True, cache=True)(fn), nb.njit(cache=True)(serial)


def _row_times_gram(Y, G, i):
    """``Y[i] @ G`` in float64, touching only the rows of ``G`` where ``Y[i]`` is non-zero."""
    k = Y.shape[1]
    q = np.zeros(G.shape[1], dtype=np.float64)
    for j in range(k):
        y = Y[i, j]
        if y != 0.0:
            g = G[j]
            for m in range(G.shape[1]):
                q[m] += y * g[m]
    return q


def _shrink(v, t, positive):
    """Soft threshold of one value, ``sign(v) max(|v| - t, 0)`` (``max(v - t, 0)`` when positive)."""
    if v > t:
        return v - t
    if v < -t and not positive:
        return v + t
    return 0.0


def _prox_grad_row(Y, G, C, L, thr, positive, Z, A_prev, i, want_dot):
    """Row ``i`` of ``Z = prox(Y - (Y @ G - C) / L)``; returns ``(y - z) . (z - a)`` if asked."""
    k = Y.shape[1]
    q = row_times_gram(Y, G, i)
    acc = 0.0
    for m in range(k):
        # both divided by L: at y = 0 and alpha = max|c| the code is exactly zero
        Z[i, m] = shrink(Y[i, m] - (q[m] - C[i, m]) / L, thr[m] / L, positive)
        if want_dot:
            zz = Z[i, m]  # the stored (possibly float32) value
            acc += (Y[i, m] - zz) * (zz - A_prev[i, m])
    return acc


def _prox_grad_gram(Y, G, C, L, thr, positive, Z, A_prev, dots, want_dots):
    n = Y.shape[0]
    for i in nb.prange(n):
        acc = prox_grad_row(Y, G, C, L, thr, positive, Z, A_prev, i, want_dots)
        if want_dots:
            dots[i] = acc
    return Z


def _fista_step_gram(Y, G, C, L, thr, positive, A_prev, t, gradient_restart, Z, Y_next, restarted):
    """One whole FISTA step per row, the momentum fused in while the row is in cache:
    ``z = prox(y - (y G - c) / L)``; with ``gradient_restart`` the momentum resets where
    ``(y - z) . (z - a) > 0`` (O'Donoghue & Candes); then ``t' = (1 + sqrt(1 + 4 t^2)) / 2``
    and ``y' = z + (t - 1) / t' * (z - a)``. ``t`` is updated in place."""
    n, k = Y.shape
    for i in nb.prange(n):
        dot = prox_grad_row(Y, G, C, L, thr, positive, Z, A_prev, i, gradient_restart)
        ti = float(t[i])
        restarted[i] = gradient_restart and dot > 0.0
        if restarted[i]:
            ti = 1.0
        t_next = (1.0 + np.sqrt(1.0 + 4.0 * ti * ti)) / 2.0
        beta = (ti - 1.0) / t_next
        for m in range(k):
            z = Z[i, m]
            Y_next[i, m] = z + beta * (z - A_prev[i, m])
        t[i] = t_next


def _sparse_times_gram(A, G, Q):
    n, k = A.shape
    for i in nb.prange(n):
        q = row_times_gram(A, G, i)
        for m in range(k):
            Q[i, m] = q[m]
    return Q


shrink = nb.njit(cache=True, inline="always")(_shrink)
row_times_gram = nb.njit(cache=True)(_row_times_gram)
prox_grad_row = nb.njit(cache=True)(_prox_grad_row)
# The same loops compiled twice: waking the thread pool costs more than the whole step on
# small problems (measured ~20 us serial vs ms parallel under load), so callers pick by size.
prox_grad_gram, prox_grad_gram_serial = _twins(_prox_grad_gram)
fista_step_gram, fista_step_gram_serial = _twins(_fista_step_gram)
sparse_times_gram, sparse_times_gram_serial = _twins(_sparse_times_gram)


# --------------------------------------------------------------------------- working sets
def _gram_axpy(GW, z, out, m):
    """``out = GW @ z`` for symmetric ``GW`` (m, m), touching only the rows where z != 0."""
    for a in range(m):
        out[a] = 0.0
    for b in range(m):
        zb = z[b]
        if zb != 0.0:
            g = GW[b]
            for a in range(m):
                out[a] += zb * g[a]


def _subproblem_gap(z, gz, c, w, x2, m, positive):
    """(primal, gap) of the Lasso restricted to the working set, from Gram quantities:
    ``D_W r = c - G_W z``, ``||r||^2 = ||x||^2 - 2 z.c + z.G_W z``."""
    zc = 0.0
    zgz = 0.0
    l1 = 0.0
    s = 1.0
    for a in range(m):
        zc += z[a] * c[a]
        zgz += z[a] * gz[a]
        l1 += w[a] * abs(z[a])
        corr = c[a] - gz[a]
        cc = corr if positive else abs(corr)
        if cc > 0.0 and w[a] < s * cc:
            s = w[a] / cc
    r2 = max(x2 - 2.0 * zc + zgz, 0.0)
    primal = 0.5 * r2 + l1
    dual = s * (x2 - zc) - 0.5 * s * s * r2
    return primal, max(primal - dual, 0.0)


def _fista_subproblems(G, C, x2, A, W, sizes, thr, positive, budget, target, restart,
                       check_every, L_fixed, L_state, n_iter, gaps):
    """FISTA on each row's working-set Lasso ``min_z 0.5 z.G_W z - c_W.z + sum w|z|``.

    Row ``i`` works on the atoms ``W[i, :sizes[i]]`` (which must contain the support of
    ``A[i]``), starting from ``A[i]``, for at most ``budget[i]`` iterations or until its
    restricted duality gap is below ``target[i]``; ``A[i]`` is overwritten on those atoms.
    ``restart``: 0 none, 1 function (objective rise), 2 gradient (O'Donoghue & Candes).
    The step is ``1/L``: ``L_fixed`` when given (> 0), else found by backtracking from
    ``max(max_a G_aa, L_state[i])`` (the previous round's value): a step whose quadratic model
    fails to majorise (checked exactly and for free from the ``G_W`` products already formed)
    is rejected and ``L`` grown by 1.5. ``L_state[i]`` receives the final ``L``.

    Rows are dealt to chunks round-robin (balancing easy and hard rows), and each chunk
    allocates its scratch once: a (|W|, |W|) matrix per row would be an mmap and page faults.
    """
    n = A.shape[0]
    mmax = 0
    for i in range(n):
        mmax = max(mmax, sizes[i])
    n_chunks = min(n, 64)
    for ch in nb.prange(n_chunks):
        GW = np.empty((mmax, mmax), dtype=np.float64)
        c = np.empty(mmax, dtype=np.float64)
        w = np.empty(mmax, dtype=np.float64)
        z = np.empty(mmax, dtype=np.float64)
        gz = np.empty(mmax, dtype=np.float64)
        y = np.empty(mmax, dtype=np.float64)
        gy = np.empty(mmax, dtype=np.float64)
        zn = np.empty(mmax, dtype=np.float64)
        gzn = np.empty(mmax, dtype=np.float64)
        for i in range(ch, n, n_chunks):
            m = sizes[i]
            idx = np.sort(W[i, :m])  # ascending: the gather below walks each row of G forward
            for a_ in range(m):
                ja = idx[a_]
                for b in range(a_, m):  # G_W is symmetric: read half of it
                    v = G[ja, idx[b]]
                    GW[a_, b] = v
                    GW[b, a_] = v
                c[a_] = C[i, ja]
                w[a_] = thr[ja]
                z[a_] = A[i, ja]
            L = L_fixed
            if L <= 0.0:  # backtracking from below: max_a G_aa <= ||G_W||_2
                L = L_state[i]
                for a_ in range(m):
                    L = max(L, GW[a_, a_])
                if L <= 0.0:
                    L = 1.0
            it, gap, L = fista_on_set(GW, c, w, z, gz, y, gy, zn, gzn, m, x2[i], L, positive, budget[i],
                                      target[i], restart, check_every)
            for a_ in range(m):
                A[i, idx[a_]] = z[a_]
            n_iter[i] = it
            gaps[i] = gap
            L_state[i] = L


def _fista_on_set(GW, c, w, z, gz, y, gy, zn, gzn, m, x2, L, positive, budget, target, restart, check_every):
    """The FISTA iterations of one row of ``_fista_subproblems`` on its gathered set; ``z``
    (in/out) holds the codes. Returns (iterations, last restricted gap, final L)."""
    gram_axpy(GW, z, gz, m)
    for a in range(m):
        y[a] = z[a]
        gy[a] = gz[a]
    t = 1.0
    f_prev = 0.0
    if restart == 1:
        f_prev, _ = subproblem_gap(z, gz, c, w, x2, m, positive)
    it = 0
    gap = np.inf
    fresh = True
    while it < budget:
        it += 1
        for a in range(m):
            zn[a] = shrink(y[a] - (gy[a] - c[a]) / L, w[a] / L, positive)
        gram_axpy(GW, zn, gzn, m)
        # majorisation: (zn - y).G(zn - y) <= L ||zn - y||^2
        dGd = 0.0
        dd = 0.0
        mom = 0.0
        for a in range(m):
            d = zn[a] - y[a]
            dGd += d * (gzn[a] - gy[a])
            dd += d * d
            mom += (y[a] - zn[a]) * (zn[a] - z[a])
        if dGd > L * dd * (1.0 + 1e-12):
            L *= 1.5
            for a in range(m):
                y[a] = z[a]
                gy[a] = gz[a]
            t = 1.0
            continue
        reset = False
        if restart == 2:
            reset = mom > 0.0
        elif restart == 1:
            f_new, _ = subproblem_gap(zn, gzn, c, w, x2, m, positive)
            if f_new > f_prev + 1e-15 * (abs(f_prev) + x2) and not fresh:
                # reject: restart the momentum from z
                for a in range(m):
                    y[a] = z[a]
                    gy[a] = gz[a]
                t = 1.0
                fresh = True
                continue
            f_prev = f_new
        fresh = False
        if reset:
            t = 1.0
        t_next = 0.5 * (1.0 + np.sqrt(1.0 + 4.0 * t * t))
        beta = (t - 1.0) / t_next
        for a in range(m):
            y[a] = zn[a] + beta * (zn[a] - z[a])
            gy[a] = gzn[a] + beta * (gzn[a] - gz[a])
            z[a] = zn[a]
            gz[a] = gzn[a]
        t = t_next
        if it % check_every == 0 or it == budget:
            _, gap = subproblem_gap(z, gz, c, w, x2, m, positive)
            if gap <= target:
                break
    return it, gap, L


gram_axpy = nb.njit(cache=True)(_gram_axpy)
subproblem_gap = nb.njit(cache=True)(_subproblem_gap)
fista_on_set = nb.njit(cache=True)(_fista_on_set)
fista_subproblems, fista_subproblems_serial = _twins(_fista_subproblems)


def _heap_push_smallest(hv, hi, size, v, j):
    """Keep the ``len(hv)`` smallest values seen in the max-heap ``hv`` (indices in ``hi``),
    of which ``size`` slots are filled; returns the new fill."""
    cap = hv.shape[0]
    if size < cap:
        p = size
        size += 1
    elif v < hv[0]:
        p = 0  # replace the root and sift it down
        while True:
            c = 2 * p + 1
            if c >= cap:
                break
            if c + 1 < cap and hv[c + 1] > hv[c]:
                c += 1
            if hv[c] <= v:
                break
            hv[p] = hv[c]
            hi[p] = hi[c]
            p = c
        hv[p] = v
        hi[p] = j
        return size
    else:
        return size
    while p > 0:  # sift the new leaf up
        q = (p - 1) // 2
        if hv[q] >= v:
            break
        hv[p] = hv[q]
        hi[p] = hi[q]
        p = q
    hv[p] = v
    hi[p] = j
    return size


def _certify_select(A, G, C, x2, thr, inv_norm, positive, m0, primal, gap, W, sizes):
    """Per row: the full duality gap of ``A[i]`` from Gram quantities (``D r = c - a G``,
    ``||r||^2 = ||x||^2 - 2 a.c + a.G a``, as ``lasso._primal_dual_gram``) and the next working
    set: the support of ``A[i]``, then the atoms whose dual constraint is nearest to violated,
    ``(alpha_j - s |d_j . r|) / ||d_j||`` smallest (celer's ranking), ``max(m0, 2 nnz)`` atoms
    in all (at most ``n_atoms``). ``W[i, :sizes[i]]`` receives the set, in no order."""
    n, k = A.shape
    for i in nb.prange(n):
        q = row_times_gram(A, G, i)
        ac = 0.0
        aq = 0.0
        l1 = 0.0
        nnz = 0
        s = 1.0
        for j in range(k):
            a = A[i, j]
            corr = C[i, j] - q[j]
            q[j] = corr if positive else abs(corr)  # q now holds the constrained correlation
            if a != 0.0:
                ac += a * C[i, j]
                aq += a * (C[i, j] - corr)
                l1 += thr[j] * abs(a)
                nnz += 1
            if q[j] > 0.0 and thr[j] < s * q[j]:
                s = thr[j] / q[j]
        r2 = max(x2[i] - 2.0 * ac + aq, 0.0)
        p_i = 0.5 * r2 + l1
        primal[i] = p_i
        gap[i] = max(p_i - (s * (x2[i] - ac) - 0.5 * s * s * r2), 0.0)

        size = min(k, max(m0, 2 * nnz))
        sizes[i] = size
        pos = 0
        for j in range(k):
            if A[i, j] != 0.0:
                W[i, pos] = j
                pos += 1
        need = size - nnz
        if need <= 0:
            continue
        hv = np.empty(need, dtype=np.float64)
        hi = np.empty(need, dtype=np.int64)
        fill = 0
        for j in range(k):
            if A[i, j] == 0.0:
                v = (thr[j] - s * q[j]) * inv_norm[j] if inv_norm[j] > 0.0 else np.inf
                if fill < need or v < hv[0]:  # the common case, no call (calls cost ~20 ns)
                    fill = heap_push_smallest(hv, hi, fill, v, j)
        for b in range(fill):
            W[i, pos + b] = hi[b]


heap_push_smallest = nb.njit(cache=True)(_heap_push_smallest)
certify_select, certify_select_serial = _twins(_certify_select)
