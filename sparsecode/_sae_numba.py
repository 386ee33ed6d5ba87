"""Numba kernels for SAE training on the NumPy backend.

They stand beside the portable code of :mod:`sparsecode.sae` and :mod:`sparsecode.sae_train`
(registered through :func:`sparsecode.backend.register_kernel`, used on NumPy only) and
compute the same quantities:

* products with a sparse code matrix ``S (n, m)`` given by its pattern in CSR form
  (``indptr (n + 1,)``, ``cols (nnz,)``) and values ``vals (nnz,)``:
  ``csr_decode`` (``S @ W``), ``csr_sample`` (``(G @ W.T)`` at the pattern's entries) and
  ``csc_tmatmul`` (``S.T @ G``, through the transposed pattern of ``csr_transpose``).
  Rows (columns for ``S.T @ G``) are independent and run in parallel; each output is a
  sum in a fixed order, so results do not depend on the number of threads.
* ``topk_rows``: the column indices of the ``k`` largest entries of each row, ties to the
  lowest index (the order of the portable stable ``argsort``), by one pass with a size-``k``
  heap (O(m log k) per row, no copy of the row).
* ``adam_update``: one fused pass of Adam over a parameter, its gradient and both moments,
  with the portable code's operations in its order and precision (bit-identical results).
* matching pursuit (MP-SAE): ``mp_gram_q`` (the k pursuit steps per row through an int16
  Gram matrix, each selection certified against the exact correlations),
  ``quantize_lower`` and ``mirror_lower`` (that Gram from BLAS syrk's triangle), ``mp_backward`` (the
  backward loop per row, residuals recovered from the final one, rows for ``W_dec`` added
  into one accumulator per chunk of rows) and ``sum_chunks``, ``ks_dense_sum`` (dense codes
  from possibly repeated (index, value) pairs) and ``ks_code_nonzero`` (which of those
  pairs are the codes' nonzero entries, without forming them).
* top-AFA: ``afa_select`` (each row's crossing of ``||xc||``, sorting only a prefix of the
  ranking found by value buckets) and ``afa_fill`` (the CSR pattern of the kept entries).

Plain loops compiled in the input's precision; only the dot products of ``csr_sample`` and
the pursuit's float64 dot products are reassociated (``fastmath`` reassoc), so that they
vectorise like a BLAS dot.
"""

import numba as nb
import numpy as np

_FLAGS = dict(cache=True, nogil=True)


# --------------------------------------------------------------------------- sparse products
@nb.njit(parallel=True, **_FLAGS)
def csr_decode(indptr, cols, vals, W, out):
    """``out[i] = sum_p vals[p] * W[cols[p]]`` over row ``i``'s entries: ``S @ W``."""
    n = out.shape[0]
    d = W.shape[1]
    for i in nb.prange(n):
        o = out[i]
        for q in range(d):
            o[q] = 0.0
        for p in range(indptr[i], indptr[i + 1]):
            v = vals[p]
            w = W[cols[p]]
            for q in range(d):
                o[q] += v * w[q]
    return out


@nb.njit(parallel=True, fastmath={"reassoc"}, **_FLAGS)
def csr_sample(indptr, cols, G, W, out):
    """``out[p] = G[i] . W[cols[p]]`` for every entry ``p`` of row ``i``: ``G @ W.T`` sampled."""
    n = G.shape[0]
    d = G.shape[1]
    for i in nb.prange(n):
        g = G[i]
        for p in range(indptr[i], indptr[i + 1]):
            w = W[cols[p]]
            acc = g[0] * 0.0
            for q in range(d):
                acc += g[q] * w[q]
            out[p] = acc
    return out


@nb.njit(**_FLAGS)
def csr_transpose(indptr, cols, m):
    """The pattern by columns: ``colptr (m + 1,)``, and for each entry in column order its
    position ``perm`` in the CSR arrays and its row ``rows`` (rows ascending in a column)."""
    n = indptr.shape[0] - 1
    nnz = cols.shape[0]
    colptr = np.zeros(m + 1, dtype=np.int64)
    for p in range(nnz):
        colptr[cols[p] + 1] += 1
    for j in range(m):
        colptr[j + 1] += colptr[j]
    fill = colptr[:m].copy()
    perm = np.empty(nnz, dtype=np.int64)
    rows = np.empty(nnz, dtype=np.int64)
    for i in range(n):
        for p in range(indptr[i], indptr[i + 1]):
            j = cols[p]
            q = fill[j]
            perm[q] = p
            rows[q] = i
            fill[j] = q + 1
    return colptr, perm, rows


@nb.njit(parallel=True, **_FLAGS)
def csc_tmatmul(colptr, perm, rows, vals, G, out):
    """``out[j] = sum over column j's entries of vals[p] * G[row]``: ``S.T @ G``."""
    m = out.shape[0]
    d = G.shape[1]
    for j in nb.prange(m):
        o = out[j]
        for q in range(d):
            o[q] = 0.0
        for t in range(colptr[j], colptr[j + 1]):
            v = vals[perm[t]]
            g = G[rows[t]]
            for q in range(d):
                o[q] += v * g[q]
    return out


@nb.njit(parallel=True, **_FLAGS)
def csc_rtmatmul(colptr, perm, rows, vals, G, out):
    """``G.T @ S`` written directly in its (d, m) layout: blocks of 16 columns of ``S`` are
    formed as ``(16, d)`` rows (the sums of ``csc_tmatmul``) and stored transposed."""
    d = out.shape[0]
    m = out.shape[1]
    B = 16
    for b in nb.prange((m + B - 1) // B):
        j0 = b * B
        j1 = min(j0 + B, m)
        buf = np.zeros((B, d), dtype=out.dtype)
        for j in range(j0, j1):
            o = buf[j - j0]
            for t in range(colptr[j], colptr[j + 1]):
                v = vals[perm[t]]
                g = G[rows[t]]
                for q in range(d):
                    o[q] += v * g[q]
        for q in range(d):
            for j in range(j0, j1):
                out[q, j] = buf[j - j0, q]
    return out


@nb.njit(parallel=True, **_FLAGS)
def mask_to_csr_counts(mask, counts):
    n, m = mask.shape
    for i in nb.prange(n):
        c = 0
        for j in range(m):
            if mask[i, j]:
                c += 1
        counts[i] = c
    return counts


@nb.njit(parallel=True, **_FLAGS)
def mask_to_csr_fill(mask, indptr, cols):
    n, m = mask.shape
    for i in nb.prange(n):
        p = indptr[i]
        for j in range(m):
            if mask[i, j]:
                cols[p] = j
                p += 1
    return cols


# --------------------------------------------------------------------------- top-k per row
@nb.njit(inline="always")
def _worse(a, ia, b, ib):
    """Entry (a, ia) ranks after (b, ib): smaller value, or equal value and higher index.
    NaN ranks after everything (as in the portable ``argsort(-score)``)."""
    if a != a:
        return not (b != b) or ia > ib
    if b != b:
        return False
    return a < b or (a == b and ia > ib)


@nb.njit(inline="always")
def _sift_down(hv, hi, k, s):
    # min-heap on the ranking: the root is the worst kept entry
    while True:
        c = 2 * s + 1
        if c >= k:
            break
        if c + 1 < k and _worse(hv[c + 1], hi[c + 1], hv[c], hi[c]):
            c += 1
        if _worse(hv[c], hi[c], hv[s], hi[s]):
            tv = hv[s]
            ti = hi[s]
            hv[s] = hv[c]
            hi[s] = hi[c]
            hv[c] = tv
            hi[c] = ti
            s = c
        else:
            break


@nb.njit(parallel=True, **_FLAGS)
def topk_rows(score, k, out):
    """``out[i]``: the columns of the ``k`` best entries of row ``i``, best first."""
    n, m = score.shape
    for i in nb.prange(n):
        hv = np.empty(k, dtype=score.dtype)
        hi = np.empty(k, dtype=np.int64)
        row = score[i]
        for j in range(k):
            hv[j] = row[j]
            hi[j] = j
        for s in range(k // 2 - 1, -1, -1):
            _sift_down(hv, hi, k, s)
        thr = hv[0]
        for j in range(k, m):
            x = row[j]
            # a later entry enters only if strictly larger (ties go to the lower index);
            # NaN never enters, and replaces nothing but a NaN root
            if x > thr or (thr != thr and x == x):
                hv[0] = x
                hi[0] = j
                _sift_down(hv, hi, k, 0)
                thr = hv[0]
        # heap sort: pop the worst to the end
        for e in range(k - 1, 0, -1):
            tv = hv[0]
            ti = hi[0]
            hv[0] = hv[e]
            hi[0] = hi[e]
            hv[e] = tv
            hi[e] = ti
            _sift_down(hv, hi, e, 0)
        for j in range(k):
            out[i, j] = hi[j]
    return out


# --------------------------------------------------------------------------- Adam
@nb.njit(parallel=True, **_FLAGS)
def adam_update(p, g, m, v, b1, one_m_b1, b2, one_m_b2, step, c2, eps, p_out):
    """One Adam step over flat arrays: ``m``, ``v`` in place, the new parameter in ``p_out``.

    The portable expression, operation by operation in the arrays' precision (the scalars
    come already cast to it): ``m = b1 m + (1-b1) g``; ``v = b2 v + (1-b2) (g g)``;
    ``p - (step m) / (sqrt(v / c2) + eps)`` with ``step = lr / c1``.
    """
    for t in nb.prange(p.shape[0]):
        gt = g[t]
        mt = b1 * m[t] + one_m_b1 * gt
        vt = b2 * v[t] + one_m_b2 * (gt * gt)
        m[t] = mt
        v[t] = vt
        p_out[t] = p[t] - (step * mt) / (np.sqrt(vt / c2) + eps)
    return p_out


# --------------------------------------------------------------------------- decoder rows
@nb.njit(parallel=True, fastmath={"reassoc"}, **_FLAGS)
def project_rows(G, W):
    """In place: ``G[j] -= (G[j] . W[j]) W[j]`` (the gradient component along each row)."""
    m, d = G.shape
    for j in nb.prange(m):
        g = G[j]
        w = W[j]
        acc = g[0] * 0.0
        for q in range(d):
            acc += g[q] * w[q]
        for q in range(d):
            g[q] -= acc * w[q]
    return G


@nb.njit(parallel=True, fastmath={"reassoc"}, **_FLAGS)
def normalise_rows(W, floor, out):
    """``out[j] = W[j] / max(||W[j]||, floor)``."""
    m, d = W.shape
    for j in nb.prange(m):
        w = W[j]
        acc = w[0] * 0.0
        for q in range(d):
            acc += w[q] * w[q]
        nrm = np.sqrt(acc)
        if nrm < floor:
            nrm = floor
        o = out[j]
        for q in range(d):
            o[q] = w[q] / nrm
    return out


# --------------------------------------------------------------------------- matching pursuit
_QMAX = 32767  # Gram entries as int16 multiples of gmax / _QMAX
_BLOCK = 64  # block maxima of |C| kept per 64 entries: the argmax is found in one block


@nb.njit(parallel=True, **_FLAGS)
def quantize_lower(A, scale, out):
    """``out[i, j] = round(A[i, j] * scale)`` as int16, clipped to +-32767, for ``j <= i``
    (the triangle BLAS syrk writes; :func:`mirror_lower` fills the rest). Rows in parallel;
    rounding in integers so that the loop packs (10x a float clip)."""
    m = A.shape[0]
    half = A.dtype.type(0.5)
    for i in nb.prange(m):
        a = A[i]
        o = out[i]
        for j in range(i + 1):
            v = np.int64(np.floor(a[j] * scale + half))
            o[j] = np.int16(min(max(v, -_QMAX), _QMAX))
    return out


@nb.njit(parallel=True, **_FLAGS)
def mirror_lower(A):
    """In place: ``A[i, j] = A[j, i]`` for ``j > i`` (a symmetric matrix from its lower
    triangle, as BLAS syrk leaves it), by 64 x 64 tiles, tile rows in parallel."""
    m = A.shape[0]
    B = 64
    nb_ = (m + B - 1) // B
    for bi in nb.prange(nb_):
        i0 = bi * B
        i1 = min(i0 + B, m)
        for bj in range(bi, nb_):
            j0 = bj * B
            j1 = min(j0 + B, m)
            for i in range(i0, i1):
                for j in range(max(j0, i + 1), j1):
                    A[i, j] = A[j, i]
    return A


@nb.njit(fastmath={"reassoc", "contract"}, **_FLAGS)
def _dot64(a, b):
    # <a, b> accumulated in float64 (reassociated so that it vectorises): the exact
    # correlation the pursuit's certificate compares against
    s = 0.0
    for q in range(a.shape[0]):
        s += np.float64(a[q]) * np.float64(b[q])
    return s


@nb.njit(fastmath={"nnan", "ninf", "nsz", "contract"}, **_FLAGS)
def _sub_scaled(C, Q, s):
    # C -= s * Q (Q the int16 Gram row: converted in the packed loop)
    for j in range(C.shape[0]):
        C[j] = C[j] - s * Q[j]


@nb.njit(**_FLAGS)
def _block_abs_max(Cbits, mask, bm_bits):
    """The maximum of ``|C|`` over each block of ``_BLOCK`` entries, through the bits of
    ``C`` (``Cbits``, the same memory as integers) with the sign bit cleared by ``mask``:
    non-negative floats are ordered as their bits, and an integer maximum is a packed
    reduction where LLVM leaves a float one scalar (5x the time of the update itself).
    Written as bits into ``bm_bits``, read back as floats by the caller (NaN above inf)."""
    m = Cbits.shape[0]
    nfull = m // _BLOCK
    for b in range(nfull):  # fixed trip count: LLVM packs the loop
        a = Cbits[0] & 0
        for j in range(b * _BLOCK, (b + 1) * _BLOCK):
            a = max(a, Cbits[j] & mask)
        bm_bits[b] = a
    if nfull < bm_bits.shape[0]:
        a = Cbits[0] & 0
        for j in range(nfull * _BLOCK, m):
            a = max(a, Cbits[j] & mask)
        bm_bits[nfull] = a


@nb.njit(**_FLAGS)
def _select(C, bm, lo, r, W):
    """The atom of largest exact ``|<r, W[j]>|`` among the candidates ``|C[j]| >= lo``
    (first on ties), that correlation, and whether more than one candidate was checked.
    Blocks whose maximum ``bm`` is below ``lo`` are skipped."""
    m = C.shape[0]
    first = -1
    cnt = 0
    for b in range(bm.shape[0]):
        if bm[b] >= lo:
            for j in range(b * _BLOCK, min(m, (b + 1) * _BLOCK)):
                if abs(C[j]) >= lo:
                    cnt += 1
                    if first < 0:
                        first = j
    if cnt <= 1:  # 0 only for non-finite values: atom 0 (the inputs are checked finite)
        best = max(first, 0)
        return best, _dot64(r, W[best]), False
    best = first
    c = _dot64(r, W[first])
    for b in range(bm.shape[0]):
        if bm[b] >= lo:
            for j in range(max(b * _BLOCK, first + 1), min(m, (b + 1) * _BLOCK)):
                if abs(C[j]) >= lo:
                    e = _dot64(r, W[j])
                    if abs(e) > abs(c):
                        best = j
                        c = e
    return best, c, True


@nb.njit(parallel=True, **_FLAGS)
def mp_gram_q(C0, C0bits, mask, xc, W, Gq, gstep, geps, wmax, u, k, tol, use_tol, js, cs, act, r_out, BM,
              BMbits, n_checked):
    """``k`` matching-pursuit steps per row, the correlations ``C`` kept up to date through
    the quantized Gram matrix (``Gq * gstep`` approximates ``W @ W.T`` within ``geps`` per
    entry; ``wmax`` bounds the row norms of ``W``) and every selection certified against
    the exact correlations.

    Per row, ``err`` bounds ``|C[j] - <r, W[j]>|`` for every ``j``: the rounding of
    ``C0 = xc @ W.T`` at first (~``d u ||x|| max ||w||``, ``u`` the unit roundoff), then
    per step the Gram entries' error times ``|c|`` and the rounding of the updates, all
    with a factor 2 to spare. The atom with the largest exact ``|<r, W[j]>|`` is among the
    candidates ``|C[j]| >= max |C| - 2 err``; the pursuit takes the best of those by their
    exact correlation (most steps have one candidate: no search) and that correlation as
    the coefficient. So the atoms are those of exact matching pursuit on the float
    residual (first index on exact ties), whatever the Gram's precision, and the
    coefficients ``<r, W[j]>`` to the input's rounding; the Gram rows are read as int16,
    half the memory traffic of float32.

    Step ``t``: ``j`` as above, ``c = <r, W[j]>`` (0 once ``||r||^2 <= tol`` when
    ``use_tol``), ``r -= c W[j]``, ``C -= c Gq[j] gstep``. Writes ``js``, ``cs``, ``act``
    (n, k), the final residual in ``r_out`` and, per row, the number of steps that checked
    more than one candidate in ``n_checked``. ``C0`` (viewed as integers in ``C0bits``) is
    overwritten; ``BM`` (n, blocks) is scratch for the block maxima, ``BMbits`` its bits."""
    n, m = C0.shape
    d = xc.shape[1]
    gmax = wmax * wmax
    for i in nb.prange(n):
        C = C0[i]  # updated in place (the caller's scratch)
        r = xc[i].copy()
        bm = BM[i]
        _block_abs_max(C0bits[i], mask, BMbits[i])
        r2 = _dot64(r, r)
        err = 2.0 * (d + 2) * u * np.sqrt(r2) * wmax
        checked = 0
        for t in range(k):
            bv = bm[0]
            for b in range(1, bm.shape[0]):
                bv = max(bv, bm[b])
            best, c64, many = _select(C, bm, bv - 2.0 * err, r, W)
            checked += many
            active = True
            if use_tol:
                active = r2 > tol
                if not active:
                    c64 = 0.0
            js[i, t] = best
            cs[i, t] = c64
            act[i, t] = active
            c = cs[i, t]  # in the input's precision
            w = W[best]
            for q in range(d):
                r[q] = r[q] - c * w[q]
            r2 = _dot64(r, r)
            if t + 1 < k:
                _sub_scaled(C, Gq[best], c * gstep)
                _block_abs_max(C0bits[i], mask, BMbits[i])
                ac = abs(c64)
                # the Gram entries' error, rounding of c gstep Q and of the update (|C| <= bv
                # + err before, + |c| gmax after), the residual's rounding
                err += 2.0 * (ac * (geps + 2.0 * u * gmax) + u * (2.0 * (bv + err) + ac * gmax)
                              + u * (np.sqrt(r2) + ac * wmax) * wmax)
        n_checked[i] = checked
        for q in range(d):
            r_out[i, q] = r[q]


# --------------------------------------------------------------------------- threshold encoders, dense codes
@nb.njit(parallel=True, **_FLAGS)
def threshold_forward(z, thr, half_bw, f, cnt, fsum, band):
    """One pass over the pre-activations of ReLU / JumpReLU at a dense layout:
    ``f = z * (z > thr)`` (``thr`` per column), and per block of rows ``b`` the column
    counts of active entries ``cnt[b]``, their column sums ``fsum[b]`` (in float64) and the
    column counts of the JumpReLU band ``|z - thr| < half_bw`` in ``band[b]`` (when
    ``half_bw > 0``). The caller adds the blocks up (fixed order: thread-count independent)."""
    n, m = z.shape
    nblk = cnt.shape[0]
    per = (n + nblk - 1) // nblk
    for b in nb.prange(nblk):
        c = cnt[b]
        s = fsum[b]
        bd = band[b]
        for i in range(b * per, min(n, (b + 1) * per)):
            zi = z[i]
            fi = f[i]
            for j in range(m):
                x = zi[j]
                t = thr[j]
                if x > t:
                    fi[j] = x
                    c[j] += 1
                    s[j] += x
                else:
                    fi[j] = 0.0
                if half_bw > 0.0 and abs(x - t) < half_bw:
                    bd[j] += 1
    return f


@nb.njit(parallel=True, **_FLAGS)
def threshold_backward(g, z, thr, add, half_bw, gsum, gband):
    """In place: ``g = (g + add) * (z > thr)`` (``add`` per column: the penalty's derivative),
    with per block of rows the column sums of the result in ``gsum[b]`` and, when
    ``half_bw > 0``, of the incoming ``g`` over the band ``|z - thr| < half_bw`` in
    ``gband[b]`` (float64 sums)."""
    n, m = z.shape
    nblk = gsum.shape[0]
    per = (n + nblk - 1) // nblk
    for b in nb.prange(nblk):
        s = gsum[b]
        sb = gband[b]
        for i in range(b * per, min(n, (b + 1) * per)):
            zi = z[i]
            gi = g[i]
            for j in range(m):
                x = zi[j]
                t = thr[j]
                v = gi[j]
                if half_bw > 0.0 and abs(x - t) < half_bw:
                    sb[j] += v
                if x > t:
                    v = v + add[j]
                    gi[j] = v
                    s[j] += v
                else:
                    gi[j] = 0.0
    return g


# --------------------------------------------------------------------------- matching pursuit, more
@nb.njit(parallel=True, **_FLAGS)
def mp_backward(W, js, cs, act, use_tol, r, scale, g_r_out, acc):
    """The backward pass of :func:`mp_gram_q`, per row and in reverse step order, as the
    portable loop of ``sae.loss_and_grad`` (MP-SAE): ``g_r = scale * r``; step ``t``:
    ``g_c = -g_r . W[j]`` (0 where inactive), the row ``-c g_r + g_c r_t`` added to
    ``W_dec[j]``'s gradient, ``g_r += g_c W[j]``. The residual before step ``t`` is recovered
    from the one after it, ``r_t = r_{t+1} + c W[j]`` (nothing recorded in the forward pass:
    at batch 4096 that was 300 MB written and read twice). Rows are dealt to
    ``acc.shape[0]`` contiguous chunks, each adding into its own zeroed ``acc[b]`` (m, d);
    the caller sums them (so the gradient's rounding depends on the number of chunks). The
    final ``g_r`` goes to ``g_r_out``."""
    n, k = js.shape
    d = W.shape[1]
    nchunk = acc.shape[0]
    per = (n + nchunk - 1) // nchunk
    for b in nb.prange(nchunk):
        A = acc[b]
        rt = np.empty(d, dtype=r.dtype)
        for i in range(b * per, min(n, (b + 1) * per)):
            g = g_r_out[i]
            for q in range(d):
                g[q] = scale * r[i, q]
                rt[q] = r[i, q]
            for t in range(k - 1, -1, -1):
                j = js[i, t]
                w = W[j]
                c = cs[i, t]
                s = g[0] * 0.0
                for q in range(d):
                    s += g[q] * w[q]
                gc = -s
                if use_tol and not act[i, t]:
                    gc = gc * 0.0
                a = A[j]
                for q in range(d):
                    v = rt[q] + c * w[q]  # r_t from r_{t+1}
                    rt[q] = v
                    a[q] += -c * g[q] + gc * v
                for q in range(d):
                    g[q] = g[q] + gc * w[q]
    return g_r_out


@nb.njit(parallel=True, **_FLAGS)
def sum_chunks(acc, out):
    """``out = acc.sum(axis=0)`` for (nchunk, m, d) ``acc``, rows in parallel, chunks in order."""
    nchunk, m, d = acc.shape
    for j in nb.prange(m):
        o = out[j]
        for q in range(d):
            o[q] = acc[0, j, q]
        for b in range(1, nchunk):
            a = acc[b, j]
            for q in range(d):
                o[q] += a[q]
    return out


@nb.njit(parallel=True, **_FLAGS)
def ks_code_nonzero(idx, vals, keep):
    """For codes given as possibly repeated (index, value) pairs per row (summed in ``t``
    order, as :func:`ks_dense_sum`): ``keep[i, t]`` is True where ``t`` is the first pair of
    its latent in row ``i`` and the latent's summed value is nonzero, so that the codes'
    nonzero entries are the kept pairs, without forming the (n, m) codes."""
    n, k = idx.shape
    for i in nb.prange(n):
        for t in range(k):
            j = idx[i, t]
            first = True
            for u in range(t):
                if idx[i, u] == j:
                    first = False
                    break
            v = vals[i, t]
            if first:
                for u in range(t + 1, k):
                    if idx[i, u] == j:
                        v += vals[i, u]
            keep[i, t] = first and v != 0
    return keep


@nb.njit(parallel=True, **_FLAGS)
def ks_dense_sum(idx, vals, out):
    """``out[i, idx[i, t]] += vals[i, t]`` over ``t`` in order, on a zeroed row (indices of a
    row may repeat: summed, as ``np.add.at``)."""
    n, m = out.shape
    k = idx.shape[1]
    for i in nb.prange(n):
        o = out[i]
        for j in range(m):
            o[j] = 0.0
        for t in range(k):
            o[idx[i, t]] += vals[i, t]
    return out


# --------------------------------------------------------------------------- dense layout passes
@nb.njit(parallel=True, **_FLAGS)
def masked(mask, Z, add, use_add, out):
    """``out = where(mask, Z + add, 0)`` (``where(mask, Z, 0)`` without ``use_add``: signed
    zeros kept) over (n, m) arrays, rows in parallel; ``out`` may be ``Z`` (in place).
    ``np.where`` makes this one single-threaded pass with a broadcast zero."""
    n, m = Z.shape
    zero = np.zeros(1, dtype=out.dtype)[0]
    for i in nb.prange(n):
        mk = mask[i]
        z = Z[i]
        o = out[i]
        if use_add:
            for j in range(m):
                o[j] = (z[j] + add) if mk[j] else zero
        else:
            for j in range(m):
                o[j] = z[j] if mk[j] else zero
    return out


# --------------------------------------------------------------------------- top-AFA selection
@nb.njit(inline="always")
def _afa_score(x, nuj):
    # the portable (relu(z) * nu) ** 2 in the input's precision
    v = x * nuj
    return v * v


@nb.njit(parallel=True, **_FLAGS)
def afa_select(z, nu, B, use_buckets, shift, scratch, scratch_bits, thr_v, thr_j, counts, sel):
    """top-AFA's crossing per row, from ``z`` directly: among the positive entries, scores
    ``s_j = (z_j nu_j)^2`` ranked best first (ties to the lowest index), ``k*`` the first
    minimiser of ``| sqrt(cumsum of s) - B_i |`` (sums in the input's precision, in rank
    order, as ``np.cumsum``). Writes ``k*`` (0 for a row without positive entries) and the
    ``k*``-th entry ``(thr_v, thr_j)``: the row keeps the entries ranked no worse.

    Candidates: the scores are bucketed by their top bits (``bits >> shift``: exponent and
    two mantissa bits, monotone in the value), bucket sums taken from the top until they
    exceed ``B_i^2``, one bucket more kept; those entries are a prefix of the ranking, and
    only they are sorted (stable). The cumulative norm is non-decreasing, so once it exceeds
    ``B_i`` within the prefix the first minimiser lies there; otherwise (or without
    ``use_buckets``) all positive entries are sorted. ``scratch`` (64, m) in the input's
    precision and ``scratch_bits`` the same memory viewed as integers of that width; other
    scratch allocated once per block of rows. Rows keeping at most ``sel.shape[1]`` entries
    also get their kept columns, ascending, in ``sel[i, :k*]``."""
    n, m = z.shape
    nblk = min(n, scratch.shape[0])
    per = (n + nblk - 1) // nblk
    for b in nb.prange(nblk):
        sv = scratch[b]
        sview = scratch_bits[b]
        si = np.empty(m, dtype=np.int64)
        bk = np.empty(m, dtype=np.int64)
        cv = np.empty(m, dtype=z.dtype)
        ci = np.empty(m, dtype=np.int64)
        bsum = np.zeros(8192, dtype=np.float64)
        for i in range(b * per, min(n, (b + 1) * per)):
            row = z[i]
            c = 0
            for j in range(m):  # branch-free compaction of the positive entries
                x = row[j]
                sv[c] = _afa_score(x, nu[j])
                si[c] = j
                c += x > 0
            if c == 0:
                counts[i] = 0
                thr_v[i] = 0.0
                thr_j[i] = -1
                continue
            Bi = B[i]
            nc = c
            if use_buckets:
                bmin = 1 << 30
                bmax = -1
                for t in range(c):
                    q = np.int64(sview[t]) >> shift
                    bk[t] = q
                    if q < bmin:
                        bmin = q
                    if q > bmax:
                        bmax = q
                for q in range(bmin, bmax + 1):
                    bsum[q] = 0.0
                for t in range(c):
                    bsum[bk[t]] += sv[t]
                target = float(Bi) * float(Bi)
                acc64 = 0.0
                cut = bmin
                for q in range(bmax, bmin - 1, -1):
                    acc64 += bsum[q]
                    if acc64 > target:
                        cut = max(q - 1, bmin)  # one bucket of margin for the rounding of the sums
                        break
                if cut > bmin:
                    nc = 0
                    for t in range(c):
                        if bk[t] >= cut:
                            cv[nc] = sv[t]
                            ci[nc] = si[t]
                            nc += 1
            if nc == c:
                for t in range(c):
                    cv[t] = sv[t]
                    ci[t] = si[t]
            while True:
                keys = np.empty(nc, dtype=z.dtype)
                for t in range(nc):
                    keys[t] = -cv[t]
                order = np.argsort(keys, kind="mergesort")  # stable: ties keep the index order
                acc = cv[0] * 0.0
                best_t = 0
                best_d = 0.0
                for t in range(nc):
                    acc = acc + cv[order[t]]
                    dd = abs(np.sqrt(acc) - Bi)
                    if t == 0 or dd < best_d:
                        best_d = dd
                        best_t = t
                if nc < c and np.sqrt(acc) <= Bi:  # the crossing may lie beyond: all entries
                    for t in range(c):
                        cv[t] = sv[t]
                        ci[t] = si[t]
                    nc = c
                    continue
                counts[i] = best_t + 1
                thr_v[i] = cv[order[best_t]]
                thr_j[i] = ci[order[best_t]]
                if best_t < sel.shape[1]:
                    kept = np.sort(ci[order[: best_t + 1]])
                    for t in range(best_t + 1):
                        sel[i, t] = kept[t]
                break
    return counts


@nb.njit(parallel=True, **_FLAGS)
def afa_fill(z, nu, thr_v, thr_j, sel, indptr, cols, vals):
    """The CSR pattern of :func:`afa_select`'s choice, columns ascending, with the kept
    pre-activations in ``vals`` (copied from ``sel`` where it holds the row)."""
    n, m = z.shape
    cap = sel.shape[1]
    for i in nb.prange(n):
        p = indptr[i]
        if indptr[i + 1] == p:
            continue
        if indptr[i + 1] - p <= cap:
            for t in range(indptr[i + 1] - p):
                j = sel[i, t]
                cols[p + t] = j
                vals[p + t] = z[i, j]
            continue
        tv = thr_v[i]
        tj = thr_j[i]
        row = z[i]
        if tv == tv and tv > 0:  # kept: score above tv, or equal and index up to tj
            for j in range(m):
                x = row[j]
                s = _afa_score(x, nu[j])
                if (x > 0) & (s >= tv):  # rare: one predictable branch per entry
                    if s > tv or j <= tj:
                        cols[p] = j
                        vals[p] = x
                        p += 1
        else:
            for j in range(m):
                x = row[j]
                if x > 0:
                    s = _afa_score(x, nu[j])
                    if not _worse(s, j, tv, tj):
                        cols[p] = j
                        vals[p] = x
                        p += 1
    return cols


@nb.njit(parallel=True, **_FLAGS)
def add_scaled_rows(G, s, W):
    """In place: ``G[j] += s[j] * W[j]`` (the same product and sum as ``G + s[:, None] * W``)."""
    m, d = G.shape
    for j in nb.prange(m):
        g = G[j]
        w = W[j]
        sj = s[j]
        for q in range(d):
            g[q] = g[q] + sj * w[q]
    return G
