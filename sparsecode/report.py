"""``sparsecode report``: a static HTML feature browser for a dictionary or an SAE on a store.

The folder written opens from disk in any browser, with no server, no JavaScript and no
external CSS or fonts::

    out_dir/
      index.html            summary: metrics (FVU, L0, dead/dense, coherence, AFA ...),
                            the feature-density histogram, a 2-D t-SNE map of the decoder
                            rows (inline SVG, each paged feature a link), a table of features
      density.png           log10 firing-frequency histogram (matplotlib)
      features/f00012.html  one page per browsed feature: activation histogram (inline SVG),
                            top-activating contexts with the activating token highlighted,
                            examples from evenly spaced activation quantiles, logit lens
                            (promoted and suppressed tokens), nearest features by decoder cosine
      report.json           the summary metrics, machine-readable

Everything is computed in one streaming pass over the store
(:func:`sparsecode.features.collect_feature_stats`).
"""

from __future__ import annotations

import html
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from .backend import check_scalar, to_numpy
from .features import (
    collect_feature_stats,
    feature_contexts,
    load_unembedding,
    logit_lens as _logit_lens,
    make_codec,
    token_strings,
)

__all__ = ["build_report", "configure_parser", "run_cli"]

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:1.5em auto;max-width:1100px;
 padding:0 1em;color:#222;background:#fff}
h1{font-size:1.5em;margin-bottom:.2em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.9em}td,th{padding:.2em .6em;border-bottom:1px solid #eee;text-align:left}
th{background:#f5f5f5}td.num{text-align:right;font-variant-numeric:tabular-nums}
.ctx{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.85em;white-space:pre-wrap;
 background:#fafafa;border:1px solid #eee;padding:.25em .4em;margin:.15em 0;line-height:1.5}
.ctx mark.act{background:#ffb347;color:#000;font-weight:bold;border-radius:2px;padding:0 1px}
.ctx .tok{border-right:1px dotted #ddd}
.val{display:inline-block;min-width:5.5em;color:#555;font-family:ui-monospace,monospace;font-size:.85em}
.muted{color:#777}.nav a{margin-right:1em}.grid{display:flex;flex-wrap:wrap;gap:2em}
.tokens td{font-family:ui-monospace,monospace;white-space:pre}
svg text{font-family:system-ui,sans-serif}
"""


# --------------------------------------------------------------------------- html helpers
def _esc(s) -> str:
    return html.escape(str(s), quote=True)


def _page(title: str, body: str) -> str:
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\"><title>{_esc(title)}</title>"
        f"<style>{CSS}</style></head><body>\n{body}\n</body></html>\n"
    )


def _fmt(x, digits=4) -> str:
    if x is None:
        return "–"
    if isinstance(x, (bool, np.bool_)):
        return str(bool(x))
    if isinstance(x, (int, np.integer)):
        return f"{int(x):,}"
    try:
        x = float(x)
    except (TypeError, ValueError):
        return _esc(x)
    if math.isnan(x):
        return "nan"
    if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e5):
        return f"{x:.{digits - 1}e}"
    return f"{x:.{digits}g}"


def _show_token(t: str) -> str:
    return _esc(t.replace("\n", "↵").replace("\t", "⇥"))


def _context_html(ctx, value=None, row=None) -> str:
    val = f"<span class=\"val\">{_fmt(value, 3)}</span>" if value is not None else ""
    if ctx is None:
        where = f"row {row}: " if row is not None else ""
        return f"<div class=\"ctx\">{val}<span class=\"muted\">({where}no token record)</span></div>"
    parts = []
    for i, t in enumerate(ctx["tokens"]):
        if i == ctx["highlight"]:
            parts.append(f"<mark class=\"act\" title=\"row {ctx['row']}\">{_show_token(t)}</mark>")
        else:
            parts.append(f"<span class=\"tok\">{_show_token(t)}</span>")
    return f"<div class=\"ctx\" data-row=\"{ctx['row']}\">{val}{''.join(parts)}</div>"


def _bar_svg(counts, edges, *, width=520, height=160, xlabel="activation", color="#4a7bd0") -> str:
    counts = np.asarray(counts, dtype=float)
    edges = np.asarray(edges, dtype=float)
    pad_l, pad_b, pad_t = 44, 30, 8
    w, h = width - pad_l - 8, height - pad_b - pad_t
    cmax = counts.max() if counts.size and counts.max() > 0 else 1.0
    n = counts.size
    bw = w / max(n, 1)
    bars = []
    for i, c in enumerate(counts):
        bh = h * c / cmax
        bars.append(
            f"<rect x=\"{pad_l + i * bw:.1f}\" y=\"{pad_t + h - bh:.1f}\" width=\"{max(bw - 1, 0.5):.1f}\" "
            f"height=\"{bh:.1f}\" fill=\"{color}\"><title>[{edges[i]:.3g}, {edges[i + 1]:.3g}): {c:.0f}</title></rect>"
        )
    axis = (
        f"<line x1=\"{pad_l}\" y1=\"{pad_t + h}\" x2=\"{pad_l + w}\" y2=\"{pad_t + h}\" stroke=\"#333\"/>"
        f"<text x=\"{pad_l}\" y=\"{height - 14}\" font-size=\"11\">{edges[0]:.3g}</text>"
        f"<text x=\"{pad_l + w}\" y=\"{height - 14}\" font-size=\"11\" text-anchor=\"end\">{edges[-1]:.3g}</text>"
        f"<text x=\"{pad_l + w / 2}\" y=\"{height - 2}\" font-size=\"11\" text-anchor=\"middle\">{_esc(xlabel)}</text>"
        f"<text x=\"{pad_l - 4}\" y=\"{pad_t + 10}\" font-size=\"11\" text-anchor=\"end\">{cmax:.3g}</text>"
        f"<text x=\"{pad_l - 4}\" y=\"{pad_t + h}\" font-size=\"11\" text-anchor=\"end\">0</text>"
    )
    return (f"<svg class=\"hist\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" "
            f"viewBox=\"0 0 {width} {height}\" role=\"img\">{''.join(bars)}{axis}</svg>")


def _colour(values, vmin, vmax):
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    span = (vmax - vmin) or 1.0
    out = []
    for v in values:
        if not np.isfinite(v):
            out.append("#bbbbbb")
            continue
        r, g, b, _ = cmap(float(np.clip((v - vmin) / span, 0, 1)))
        out.append(f"#{int(r * 255):02x}{int(g * 255):02x}{int(b * 255):02x}")
    return out


def _map_svg(coords, atoms, log_freq, paged, size=640) -> str:
    """Inline SVG scatter of the 2-D map; paged features are links to their pages."""
    xy = np.asarray(coords, dtype=float)
    lo, hi = xy.min(0), xy.max(0)
    span = np.where(hi - lo > 0, hi - lo, 1.0)
    p = 14
    pts = p + (xy - lo) / span * (size - 2 * p)
    finite = log_freq[np.isfinite(log_freq)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    cols = _colour(log_freq, vmin, vmax)
    items = []
    for (x, y), a, c, lf in zip(pts, atoms, cols, log_freq):
        tip = f"feature {a}: log10 frequency {lf:.2f}" if np.isfinite(lf) else f"feature {a}: dead"
        dot = (f"<circle cx=\"{x:.1f}\" cy=\"{size - y:.1f}\" r=\"{4 if a in paged else 2.5}\" fill=\"{c}\" "
               f"stroke=\"{'#000' if a in paged else 'none'}\" stroke-width=\"0.6\"><title>{_esc(tip)}</title></circle>")
        items.append(f"<a href=\"features/f{a:05d}.html\">{dot}</a>" if a in paged else dot)
    legend = (f"<text x=\"8\" y=\"{size - 4}\" font-size=\"11\" fill=\"#555\">colour: log10 firing frequency "
              f"({vmin:.2f} … {vmax:.2f}); grey: dead; outlined: has a page</text>")
    return (f"<svg id=\"tsne-map\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{size}\" height=\"{size + 10}\" "
            f"viewBox=\"0 0 {size} {size + 10}\" style=\"border:1px solid #ddd\">{''.join(items)}{legend}</svg>")


# --------------------------------------------------------------------------- computations
def _tsne(D, atoms, seed, max_iter=500):
    from sklearn.manifold import TSNE

    U = D[atoms].astype(np.float64)
    U /= np.maximum(np.linalg.norm(U, axis=1, keepdims=True), 1e-12)
    n = U.shape[0]
    if n < 5:
        return None
    if U.shape[1] > 50 and n > 50:
        from sklearn.decomposition import PCA

        U = PCA(n_components=50, random_state=seed).fit_transform(U)
    perplexity = float(min(30.0, (n - 1) / 3.0))
    # the exact gradient beats Barnes-Hut up to a few thousand points on a small machine
    method = "exact" if n <= 1500 else "barnes_hut"
    return TSNE(n_components=2, perplexity=perplexity, init="pca", method=method, max_iter=max_iter,
                random_state=seed).fit_transform(U)


def _nearest(D, paged, k=8):
    U = D.astype(np.float64)
    U = U / np.maximum(np.linalg.norm(U, axis=1, keepdims=True), 1e-12)
    out = {}
    k = min(k, D.shape[0] - 1)
    if k <= 0:
        return {j: [] for j in paged}
    for s in range(0, len(paged), 512):
        ids = np.asarray(paged[s : s + 512])
        C = U[ids] @ U.T
        C[np.arange(len(ids)), ids] = -np.inf
        idx = np.argpartition(-C, k - 1, axis=1)[:, :k]
        for r, j in enumerate(ids):
            o = idx[r][np.argsort(-C[r, idx[r]])]
            out[int(j)] = [(int(i), float(C[r, i])) for i in o]
    return out


def _density_png(density, path):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    e, c = density["edges"], density["counts"]
    ax.bar(e[:-1], c, width=np.diff(e), align="edge", color="#4a7bd0")
    ax.set_xlabel("log10 firing frequency")
    ax.set_ylabel("features")
    ax.set_title(f"feature density ({density['n_dead']} dead of {density['n_atoms']} not shown)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _resolve_lens(lens, store, d_in):
    """(W_U, g, vocab) or None, with a reason when None."""
    if lens is False or lens is None:
        return None, "not requested"
    if isinstance(lens, tuple):
        W, g, vocab = lens
        return (np.asarray(W, np.float32), None if g is None else np.asarray(g, np.float32), list(vocab)), ""
    manifest = getattr(store, "manifest", None) or {}
    model = str(manifest.get("model", ""))
    if "smollm2" not in model.lower():
        return None, f"no unembedding known for model {model or '(none: not an extraction)'}"
    try:
        W, g = load_unembedding()
        vocab = token_strings()
    except (FileNotFoundError, ImportError) as exc:
        return None, str(exc)
    if W.shape[1] != d_in:
        return None, f"the store's vectors have {d_in} dimensions but the unembedding {W.shape[1]}"
    return (W, g, vocab), ""


def _describe(model, encode_options) -> dict:
    if hasattr(model, "W_dec") and hasattr(model, "encode"):
        d = {"kind": "sparse autoencoder", "architecture": getattr(model, "architecture", "?")}
        if getattr(model, "k", None):
            d["k"] = model.k
        return d
    d = {"kind": "dictionary"}
    d.update({k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in (encode_options or {}).items()})
    return d


# --------------------------------------------------------------------------- main entry
def build_report(
    model,
    store,
    out_dir,
    *,
    method: str = "fista",
    encode_options: dict | None = None,
    max_features: int = 100,
    feature_ids=None,
    n_top: int = 20,
    n_samples: int = 200,
    n_intervals: int = 5,
    per_interval: int = 2,
    context_before: int = 12,
    context_after: int = 4,
    max_rows: int | None = None,
    batch_size: int = 1024,
    logit_lens="auto",
    tsne: bool = True,
    tsne_max_atoms: int = 1000,
    extra_metrics: dict | None = None,
    images=None,
    title: str | None = None,
    seed: int = 0,
    progress: bool = False,
) -> Path:
    """Write the feature browser for ``model`` on ``store`` into ``out_dir``; return index.html.

    Parameters
    ----------
    model : an SAE (``encode``/``decode``/``W_dec``), a dictionary-learning result or
        estimator, or a dictionary array (n_atoms, d_in); for a dictionary, codes are
        computed with ``sparse_encode(X, D, method, **encode_options)``.
    store : ActivationStore or array (n_rows, d_in).
    max_features : pages written (features chosen at random, seeded, among those that fire),
        unless ``feature_ids`` lists them.
    n_top, n_samples, n_intervals, per_interval : top contexts per page; uniform sample size
        behind the histogram and quantile examples; quantile intervals and examples per interval.
    tsne, tsne_max_atoms : draw the t-SNE map of the decoder rows, of at most this many atoms
        (every paged feature, plus a random sample of the others); t-SNE is the slowest part.
    logit_lens : "auto" (SmolLM2 stores: read its unembedding), False, or a tuple
        ``(W_U (vocab, d_in), g (d_in,) or None, vocab strings)``.
    extra_metrics : more numbers for the summary table (e.g. the amortization gap).
    images : list of ``(caption, png_path)`` copied into the folder and shown on the summary.
    """
    t0 = time.perf_counter()
    max_features = check_scalar(max_features, "max_features", low=0, integer=True)
    out = Path(out_dir)
    (out / "features").mkdir(parents=True, exist_ok=True)
    for old in (out / "features").glob("f*.html"):
        old.unlink()
    encode_options = dict(encode_options or {})
    encode, decode, D = make_codec(model, method=method, **encode_options)
    D = np.asarray(D, dtype=np.float64)
    d_in = int(getattr(store, "d_in", None) or store.shape[1])
    if D.shape[1] != d_in:
        raise ValueError(f"the model's atoms have {D.shape[1]} features but the store's rows have {d_in}")
    bias = to_numpy(getattr(model, "b_dec", None)) if hasattr(model, "W_dec") else None
    stats = collect_feature_stats(
        store, encode, decode, n_top=n_top, n_samples=n_samples, batch_size=batch_size,
        max_rows=max_rows, dictionary=D, bias=bias, input_scale=float(getattr(model, "input_scale", 1.0) or 1.0),
        seed=seed, progress=progress,
    )
    n_atoms = stats.n_atoms
    alive = np.flatnonzero(stats.counts > 0)
    if feature_ids is not None:
        paged = sorted({int(j) for j in feature_ids})
        bad = [j for j in paged if not 0 <= j < n_atoms]
        if bad:
            raise ValueError(f"feature_ids out of range [0, {n_atoms}): {bad[:5]}")
    else:
        rng = np.random.default_rng(seed)
        pick = rng.permutation(alive)[:max_features] if alive.size else np.array([], dtype=int)
        paged = sorted(int(j) for j in pick)
    paged_set = set(paged)

    # summary metrics
    from .metrics import coherence

    metrics = {k: v for k, v in stats.metrics.items() if k != "density"}
    metrics["n_atoms"] = n_atoms
    metrics["d_in"] = d_in
    coh = coherence(D)
    metrics["coherence_max"], metrics["coherence_mean"] = coh["max"], coh["mean"]
    if extra_metrics:
        metrics.update(extra_metrics)
    density = stats.metrics["density"]
    _density_png(density, out / "density.png")

    lens, lens_reason = _resolve_lens(logit_lens, store, d_in)
    lens_out = None
    if lens is not None and paged:
        W, g, vocab = lens
        lens_out = _logit_lens(D[paged], W, norm_scale=g, k=10)
        lens_vocab = vocab
    nearest = _nearest(D, paged)

    coords = atoms_map = None
    if tsne and n_atoms >= 5:
        rng = np.random.default_rng(seed + 1)
        others = np.setdiff1d(np.arange(n_atoms), paged)
        budget = max(tsne_max_atoms - len(paged), 0)
        atoms_map = np.sort(np.concatenate([np.asarray(paged, dtype=int),
                                            rng.permutation(others)[:budget]]))
        coords = _tsne(D, atoms_map, seed)

    # feature pages
    manifest = getattr(store, "manifest", None) or {}
    copied = []
    for cap, p in images or []:
        dst = out / Path(p).name
        if Path(p).resolve() != dst.resolve():
            shutil.copyfile(p, dst)
        copied.append((cap, dst.name))
    for pos, j in enumerate(paged):
        prev_j = paged[pos - 1] if pos > 0 else None
        next_j = paged[pos + 1] if pos + 1 < len(paged) else None
        body = [_nav(prev_j, next_j)]
        body.append(f"<h1 id=\"feature-title\">Feature {j}</h1>")
        freq = stats.frequency[j]
        body.append(
            "<p class=\"muted\">"
            f"fires on {stats.counts[j]:,} of {stats.n_rows:,} rows (frequency {_fmt(freq, 3)}), "
            f"mean activation when firing {_fmt(stats.mean_activation[j], 3)}, max {_fmt(stats.maxima[j], 3)}, "
            f"decoder norm {_fmt(np.linalg.norm(D[j]), 3)}</p>"
        )
        c, e = stats.histogram(j, bins=30)
        body.append("<h2>Activation histogram</h2>")
        body.append(f"<div id=\"histogram\">{_bar_svg(c, e)}</div>"
                    f"<p class=\"muted\">nonzero activations, estimated from a uniform sample of "
                    f"{int((stats.sample_rows[j] >= 0).sum())} firing rows</p>")
        rows = [int(x) for x in stats.top_rows[j] if x >= 0]
        ctxs = feature_contexts(store, rows, before=context_before, after=context_after)
        body.append("<h2>Top activations</h2><div id=\"top-contexts\">")
        body += [_context_html(cx, v, r) for cx, v, r in zip(ctxs, stats.top_values[j][: len(rows)], rows)]
        body.append("</div>")
        qex = stats.quantile_examples(j, n_intervals=n_intervals, per_interval=per_interval)
        qctx = feature_contexts(store, [q["row"] for q in qex], before=context_before, after=context_after)
        body.append("<h2>Examples across activation quantiles</h2><div id=\"quantiles\">")
        last = None
        for q, cx in zip(reversed(qex), reversed(qctx)):
            if q["interval"] != last:
                lo, hi = q["quantile"]
                body.append(f"<h3 class=\"muted\">quantile {lo:.0%}–{hi:.0%}</h3>")
                last = q["interval"]
            body.append(_context_html(cx, q["value"], q["row"]))
        body.append("</div>")
        body.append("<div class=\"grid\">")
        if lens_out is not None:
            body.append(_lens_html(lens_out, pos, lens_vocab))
        else:
            body.append(f"<div id=\"logit-lens\"><h2>Logit lens</h2><p class=\"muted\">unavailable: "
                        f"{_esc(lens_reason)}</p></div>")
        body.append("<div id=\"nearest\"><h2>Nearest features (decoder cosine)</h2><table><tr><th>feature</th>"
                    "<th>cosine</th></tr>")
        for i, cval in nearest.get(j, []):
            link = f"<a href=\"f{i:05d}.html\">{i}</a>" if i in paged_set else f"{i}"
            body.append(f"<tr><td>{link}</td><td class=\"num\">{cval:+.3f}</td></tr>")
        body.append("</table></div></div>")
        (out / "features" / f"f{j:05d}.html").write_text(_page(f"Feature {j}", "\n".join(body)), encoding="utf-8")

    # summary page
    body = [f"<h1>{_esc(title or 'sparsecode feature browser')}</h1>"]
    desc = _describe(model, dict(method=method, **encode_options) if not hasattr(model, "W_dec") else None)
    src = ", ".join(f"{k}: {manifest[k]}" for k in ("model", "layer", "n_tokens", "context_length") if k in manifest)
    body.append(f"<p class=\"muted\">{_esc(', '.join(f'{k}: {v}' for k, v in desc.items()))}; "
                f"{n_atoms:,} features of dimension {d_in}; {stats.n_rows:,} rows read"
                f"{'; store ' + _esc(src) if src else ''}</p>")
    body.append("<h2>Metrics</h2><table id=\"metrics\"><tr><th>metric</th><th>value</th></tr>")
    for k, v in metrics.items():
        body.append(f"<tr><td>{_esc(k)}</td><td class=\"num\">{_fmt(v)}</td></tr>")
    body.append("</table>")
    body.append("<h2>Feature density</h2><img id=\"density\" src=\"density.png\" width=\"600\" height=\"320\" "
                "alt=\"histogram of log10 firing frequency\">")
    for cap, name in copied:
        body.append(f"<h2>{_esc(cap)}</h2><img src=\"{_esc(name)}\" alt=\"{_esc(cap)}\" style=\"max-width:100%\">")
    if coords is not None:
        body.append("<h2>Map of the decoder rows (t-SNE)</h2>")
        body.append(_map_svg(coords, [int(a) for a in atoms_map], np.log10(np.where(
            stats.frequency[atoms_map] > 0, stats.frequency[atoms_map], np.nan)), paged_set))
    body.append(f"<h2>Features with a page ({len(paged)})</h2><table id=\"feature-table\"><tr><th>feature</th>"
                "<th>frequency</th><th>mean act.</th><th>max act.</th><th>top token</th></tr>")
    for j in paged:
        top = ""
        r0 = int(stats.top_rows[j][0])
        cx = feature_contexts(store, [r0], before=0, after=0)[0] if r0 >= 0 else None
        if cx is not None:
            top = _show_token(cx["tokens"][cx["highlight"]])
        body.append(f"<tr><td><a href=\"features/f{j:05d}.html\">{j}</a></td><td class=\"num\">{_fmt(stats.frequency[j], 3)}"
                    f"</td><td class=\"num\">{_fmt(stats.mean_activation[j], 3)}</td><td class=\"num\">"
                    f"{_fmt(stats.maxima[j], 3)}</td><td class=\"ctx\">{top}</td></tr>")
    body.append("</table>")
    body.append(f"<p class=\"muted\">written in {time.perf_counter() - t0:.1f} s by sparsecode</p>")
    (out / "index.html").write_text(_page(title or "sparsecode feature browser", "\n".join(body)), encoding="utf-8")
    (out / "report.json").write_text(json.dumps(
        {"metrics": _jsonable(metrics), "features": paged, "logit_lens": lens_out is not None,
         "density": {"edges": density["edges"].tolist(), "counts": density["counts"].tolist(),
                     "n_dead": density["n_dead"]}}, indent=2), encoding="utf-8")
    return out / "index.html"


def _jsonable(d):
    out = {}
    for k, v in d.items():
        if isinstance(v, (np.integer,)):
            v = int(v)
        elif isinstance(v, (np.floating,)):
            v = float(v)
        if isinstance(v, float) and not math.isfinite(v):
            v = None
        out[k] = v if isinstance(v, (int, float, str, bool, type(None))) else str(v)
    return out


def _nav(prev_j, next_j) -> str:
    parts = ["<div class=\"nav\"><a href=\"../index.html\">↑ summary</a>"]
    if prev_j is not None:
        parts.append(f"<a href=\"f{prev_j:05d}.html\">← feature {prev_j}</a>")
    if next_j is not None:
        parts.append(f"<a href=\"f{next_j:05d}.html\">feature {next_j} →</a>")
    return "".join(parts) + "</div>"


def _lens_html(lens, pos, vocab) -> str:
    def rows(ids, vals):
        return "".join(
            f"<tr><td>{_show_token(vocab[i]) if i < len(vocab) else i}</td><td class=\"num\">{v:+.3f}</td></tr>"
            for i, v in zip(ids, vals)
        )

    return (
        "<div id=\"logit-lens\"><h2>Logit lens</h2><div class=\"grid\">"
        f"<table class=\"tokens\"><tr><th>promoted</th><th>logit</th></tr>{rows(lens['top_ids'][pos], lens['top_logits'][pos])}</table>"
        f"<table class=\"tokens\"><tr><th>suppressed</th><th>logit</th></tr>{rows(lens['bottom_ids'][pos], lens['bottom_logits'][pos])}</table>"
        "</div></div>"
    )


# --------------------------------------------------------------------------- command line
def configure_parser(parser) -> None:
    parser.add_argument("store", help="an extraction folder (manifest.json), or a .npy/.npz/.safetensors file "
                        "of activations (memory-mapped)")
    g = parser.add_mutually_exclusive_group(required=True)
    g.add_argument("--sae", help="an SAE folder (cfg.json + sae_weights.safetensors)")
    g.add_argument("--dictionary", help="a .npy file (or .npz with a 'dictionary' array) of shape (n_atoms, d_in)")
    parser.add_argument("--out", default="sparsecode-report", help="folder to write (default: sparsecode-report)")
    parser.add_argument("--method", default="fista", help="solver for a dictionary's codes (fista, ista, omp, mp, iht)")
    parser.add_argument("--alpha", type=float, default=None, help="Lasso penalty for fista/ista")
    parser.add_argument("--n-nonzero", type=int, default=None, help="atoms per code for omp/mp/iht")
    parser.add_argument("--positive", action="store_true", help="non-negative codes")
    parser.add_argument("--normalize", action="store_true", help="scale the rows as the store's normalisation does: for a dictionary learned on "
                        "normalised rows (an SAE reads raw rows: it keeps the scale as input_scale)")
    parser.add_argument("--max-features", type=int, default=100, help="feature pages to write")
    parser.add_argument("--max-rows", type=int, default=None, help="rows of the store to read")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--no-tsne", action="store_true")
    parser.add_argument("--no-logit-lens", action="store_true")
    parser.add_argument("--seed", type=int, default=0)


def _load_dictionary(path):
    p = Path(path)
    if p.suffix == ".npz":
        with np.load(p) as z:
            key = "dictionary" if "dictionary" in z.files else z.files[0]
            return np.asarray(z[key])
    return np.asarray(np.load(p))


def run_cli(args) -> int:
    try:
        from .store import ActivationStore

        store = ActivationStore(args.store, normalize=args.normalize)
        options = {}
        if args.sae:
            from .sae import SparseAutoencoder

            model = SparseAutoencoder.load(args.sae)
        else:
            model = _load_dictionary(args.dictionary)
            if args.method in ("fista", "ista"):
                options["alpha"] = 0.1 if args.alpha is None else args.alpha
                options["positive"] = args.positive
            else:
                if args.n_nonzero is None:
                    raise ValueError(f"--n-nonzero is needed with --method {args.method}")
                options["n_nonzero"] = args.n_nonzero
                if args.positive:
                    options["positive"] = True
        index = build_report(
            model, store, args.out, method=args.method, encode_options=options,
            max_features=args.max_features, max_rows=args.max_rows, batch_size=args.batch_size,
            tsne=not args.no_tsne, logit_lens=False if args.no_logit_lens else "auto", seed=args.seed,
            progress=True,
        )
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"sparsecode report: error: {exc}", file=sys.stderr)
        return 2
    print(f"feature browser written: {index}")
    print(f"open it with: xdg-open {index}   (or file://{os.path.abspath(index)})")
    return 0
