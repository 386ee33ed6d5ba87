"""Tests of ActivationStore and the importers (no PyTorch needed)."""

from __future__ import annotations

import json
import struct
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from sparsecode.store import ActivationStore, open_array_file, save_activations


def rows_of(n, d, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal((n, d)).astype(dtype)


def files_store(tmp_path, sizes, d=8, seed=0):
    """Several .npy files of different lengths; returns (paths, the concatenated rows)."""
    parts, paths = [], []
    for i, n in enumerate(sizes):
        x = rows_of(n, d, seed + i)
        p = tmp_path / f"part{i}.npy"
        np.save(p, x)
        parts.append(x)
        paths.append(p)
    return paths, np.concatenate(parts)


# --------------------------------------------------------------------------- epochs
@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 90), min_size=1, max_size=4),
    batch=st.integers(1, 40),
    buffer_rows=st.integers(1, 64),
    block_rows=st.integers(1, 16),
    holdout=st.sampled_from([0.0, 0.1, 0.3]),
    shuffle=st.booleans(),
    drop_last=st.booleans(),
    seed=st.integers(0, 3),
)
def test_every_row_exactly_once_per_epoch(tmp_path_factory, sizes, batch, buffer_rows, block_rows,
                                          holdout, shuffle, drop_last, seed):
    paths, X = files_store(tmp_path_factory.mktemp("e"), sizes)
    if holdout and len(X) < 2:
        holdout = 0.0
    store = ActivationStore([str(p) for p in paths], holdout_fraction=holdout, buffer_rows=buffer_rows,
                            block_rows=block_rows, seed=seed)
    assert len(store) == len(X) and store.d_in == 8
    seen = {}
    for split in ("train", "holdout") if store.n_holdout else ("train",):
        idx = []
        for rows, xb in store.iter_batches(batch, shuffle=shuffle, seed=seed + 7, split=split,
                                           return_indices=True, drop_last=drop_last):
            assert xb.dtype == np.float32 and xb.shape == (len(rows), 8)
            assert len(rows) == batch or not drop_last
            np.testing.assert_array_equal(xb, X[rows])  # each row is the row it says it is
            idx.append(rows)
        idx = np.concatenate(idx) if idx else np.zeros(0, int)
        assert len(np.unique(idx)) == len(idx)  # never twice
        n_split = store.split_size(split)
        if drop_last:
            assert len(idx) == n_split - n_split % batch
        else:
            assert np.array_equal(np.sort(idx), store.split_rows(split))  # every row once
            if not shuffle:
                assert np.array_equal(idx, store.split_rows(split))  # in order
        seen[split] = set(store.split_rows(split).tolist())
    if store.n_holdout:
        assert not seen["train"] & seen["holdout"]
        assert len(seen["train"]) + len(seen["holdout"]) == len(X)


def test_shuffle_mixes_shards_and_is_reproducible(tmp_path):
    paths, X = files_store(tmp_path, [400, 400, 400, 400])
    store = ActivationStore(paths, buffer_rows=512, block_rows=32)
    first = [r for r, _ in store.iter_batches(128, seed=1, return_indices=True)]
    again = [r for r, _ in store.iter_batches(128, seed=1, return_indices=True)]
    other = [r for r, _ in store.iter_batches(128, seed=2, return_indices=True)]
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not np.array_equal(np.concatenate(first), np.concatenate(other))
    assert len(np.unique(first[0] // 400)) >= 3  # one batch draws from several files


def test_memory_stays_bounded_by_the_buffer(tmp_path):
    d, n_files, n_each = 64, 8, 10000  # 20 MB of rows on disk, 0.25 MB buffer
    paths, _ = files_store(tmp_path, [n_each] * n_files, d=d)
    store = ActivationStore(paths, buffer_rows=1024, block_rows=128)
    store_bytes = n_files * n_each * d * 4
    tracemalloc.start()
    try:
        n = 0
        for xb in store.iter_batches(256, seed=0):
            n += len(xb)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert n == n_files * n_each
    bound = (1024 + 2 * 256) * d * 4  # buffer, batch being gathered, leftover rows
    assert peak < 1.5 * bound < store_bytes / 20, (peak, bound, store_bytes)


# --------------------------------------------------------------------------- normalisation
def test_normalisation_gives_mean_squared_norm_d_in(tmp_path):
    X = rows_of(3000, 16) * 7.5 + 1.0
    plain = ActivationStore(X, normalize=True, buffer_rows=500)
    expect = np.sqrt(16 / np.mean(np.sum(X.astype(np.float64) ** 2, axis=1)))
    assert np.isclose(plain.norm_scale, expect, rtol=1e-6)
    Y = np.concatenate(list(plain.iter_batches(256, seed=3)))
    assert np.isclose(np.mean(np.sum(Y.astype(np.float64) ** 2, axis=1)), 16, rtol=1e-5)
    # an extraction folder takes the constant from the manifest's per-shard sums: same value
    folder = save_activations(X, tmp_path / "f", shard_size=700)
    assert np.isclose(ActivationStore(folder, normalize=True).norm_scale, expect, rtol=1e-6)
    assert np.isclose(json.loads((Path(folder) / "manifest.json").read_text())["norm_scale"], expect)
    # a given constant is applied as is
    s = ActivationStore(X, normalize=0.5)
    np.testing.assert_allclose(s.read(0, 5), X[:5] * 0.5, rtol=1e-6)
    assert ActivationStore(X).norm_scale == 1.0


# --------------------------------------------------------------------------- importers
def test_npy_npz_safetensors_and_arrays(tmp_path):
    X = rows_of(50, 6)
    np.save(tmp_path / "a.npy", X)
    np.savez(tmp_path / "b.npz", acts=X, tokens=np.arange(50))
    np.savez_compressed(tmp_path / "c.npz", X)
    from safetensors.numpy import save_file

    save_file({"acts": X, "other": np.ones(3, np.float32)}, str(tmp_path / "d.safetensors"))
    save_file({"h": X.astype(np.float16)}, str(tmp_path / "e.safetensors"))
    for src in ("a.npy", "b.npz", "d.safetensors"):
        s = ActivationStore(tmp_path / src)
        assert isinstance(s._segments[0].acts, np.memmap), src  # not copied into memory
        np.testing.assert_array_equal(s.to_numpy(), X)
    b = ActivationStore(tmp_path / "b.npz")  # token ids picked up beside the acts
    np.testing.assert_array_equal(b._segments[0].tokens, np.arange(50))
    with pytest.warns(UserWarning, match="compressed"):
        np.testing.assert_array_equal(ActivationStore(tmp_path / "c.npz").to_numpy(), X)
    e = ActivationStore(tmp_path / "e.safetensors")
    assert e.dtype == "float16"
    np.testing.assert_array_equal(e.to_numpy(), X.astype(np.float16).astype(np.float32))
    both = ActivationStore([tmp_path / "a.npy", tmp_path / "d.safetensors"], key=None)
    np.testing.assert_array_equal(both.to_numpy(), np.concatenate([X, X]))
    np.testing.assert_array_equal(ActivationStore(X.astype(np.float64)).to_numpy(), X)
    three = ActivationStore(X.reshape(5, 10, 6))  # (n_seq, context, d) -> rows
    assert three.n_rows == 50 and three._segments[0].meta("pos", 12, 13)[0] == 2


def test_bfloat16_safetensors(tmp_path):
    X = rows_of(20, 4)
    bits = (X.view(np.uint32) >> 16).astype(np.uint16)  # bfloat16 = top half of float32
    header = json.dumps({"acts": {"dtype": "BF16", "shape": [20, 4], "data_offsets": [0, bits.nbytes]}}).encode()
    with open(tmp_path / "bf.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header + bits.tobytes())
    s = ActivationStore(tmp_path / "bf.safetensors")
    assert s.dtype == "bfloat16"
    expect = (bits.astype(np.uint32) << 16).view(np.float32)
    np.testing.assert_array_equal(s.to_numpy(), expect)
    assert np.max(np.abs(expect - X)) <= np.max(np.abs(X)) * 2.0 ** -7


def test_saelens_datasets_cache(tmp_path):
    datasets = pytest.importorskip("datasets")
    pytest.importorskip("pyarrow")
    n_seq, ctx, d = 7, 5, 3
    acts = rows_of(n_seq * ctx, d).reshape(n_seq, ctx, d)
    toks = np.arange(n_seq * ctx, dtype=np.int32).reshape(n_seq, ctx) + 100
    feats = datasets.Features({
        "blocks.2.hook_resid_post": datasets.Array2D(shape=(ctx, d), dtype="float32"),
        "token_ids": datasets.Sequence(datasets.Value("int32"), length=ctx),
    })
    ds = datasets.Dataset.from_dict({"blocks.2.hook_resid_post": acts, "token_ids": toks}, features=feats)
    ds.save_to_disk(str(tmp_path / "cache"), num_shards=2)  # SAELens' CacheActivationsRunner layout
    s = ActivationStore(tmp_path / "cache")
    assert (s.n_rows, s.d_in, s.source_kind) == (n_seq * ctx, d, "datasets")
    np.testing.assert_array_equal(s.to_numpy(), acts.reshape(-1, d))
    assert s.row_tokens(12) == (2, 2, 112)  # sequence 2, position 2
    c = s.context(12, before=4, after=9)
    assert c["token_ids"] == list(range(110, 115)) and c["index_of_row"] == 2  # stays in its sequence
    got = np.concatenate([b for b in s.iter_batches(4, seed=0)])
    assert got.shape == (35, 3)
    # without `datasets` imported, pyarrow sees the plain storage type: same rows
    import subprocess
    import sys

    code = ("import sys, numpy as np; from sparsecode.store import ActivationStore; "
            f"s = ActivationStore({str(tmp_path / 'cache')!r}); assert 'datasets' not in sys.modules; "
            "np.save(sys.argv[1], s.to_numpy())")
    root = str(Path(__file__).resolve().parents[1])
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "plain.npy")], check=True,
                   env={**__import__("os").environ, "PYTHONPATH": root})
    np.testing.assert_array_equal(np.load(tmp_path / "plain.npy"), acts.reshape(-1, d))


# --------------------------------------------------------------------------- tokens and contexts
def test_row_tokens_context_and_decode(tmp_path):
    # two documents: doc 0 in windows of 4 positions (0..3, 0..2), doc 1 with the first position skipped
    docs = np.array([0, 0, 0, 0, 0, 0, 0, 1, 1, 1])
    pos = np.array([0, 1, 2, 3, 0, 1, 2, 1, 2, 3])
    toks = np.arange(10) + 50
    X = rows_of(10, 3)
    folder = save_activations(X, tmp_path / "t", tokens=toks, docs=docs, pos=pos, shard_size=3)
    s = ActivationStore(folder)
    assert s.has_tokens and len(s.manifest["shards"]) == 4
    assert s.row_tokens(5) == (0, 1, 55)
    c = s.context(5, before=8, after=8)
    assert c == {"token_ids": [54, 55, 56], "index_of_row": 1, "doc": 0, "pos": 1, "rows": [4, 5, 6]}
    assert s.context(2, before=1, after=0)["token_ids"] == [51, 52]
    assert s.context(8)["rows"] == [7, 8, 9]
    assert s.decode([3, 4]) == ["<3>", "<4>"]  # no tokenizer recorded
    np.testing.assert_array_equal(s.take(np.array([9, 0, 4])), X[[9, 0, 4]])
    np.testing.assert_array_equal(s.read(2, 8), X[2:8])
    with pytest.raises(ValueError, match="no token ids"):
        ActivationStore(X).row_tokens(0)
    with pytest.raises(IndexError):
        s.row_tokens(10)
    # a store copied into a new folder keeps its rows and token bookkeeping
    copy = ActivationStore(save_activations(s, tmp_path / "copy"))
    np.testing.assert_array_equal(copy.to_numpy(), X)
    assert copy.context(5) == c


def test_array_api_output_namespace():
    xp = pytest.importorskip("array_api_strict")
    s = ActivationStore(rows_of(30, 4))
    batches = list(s.iter_batches(8, xp=xp))
    assert all(type(b).__module__.startswith("array_api_strict") for b in batches)
    assert sum(b.shape[0] for b in batches) == 30
    assert all(b.dtype == xp.float32 for b in batches)


@pytest.mark.gpu
def test_cupy_batches():
    from sparsecode.backend import cupy_available

    if not cupy_available():
        pytest.skip("CuPy with a CUDA device is not available")
    import cupy as cp

    X = rows_of(100, 5)
    got = cp.concatenate([b for _, b in sorted(
        ((int(r[0]), b) for r, b in ActivationStore(X).iter_batches(10, shuffle=False, xp=cp,
                                                                    return_indices=True)),
        key=lambda t: t[0])])
    np.testing.assert_array_equal(cp.asnumpy(got), X)


# --------------------------------------------------------------------------- errors
def test_bad_inputs_get_clear_errors(tmp_path):
    X = rows_of(40, 6)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ActivationStore(tmp_path / "missing")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        ActivationStore(tmp_path / "empty_dir")
    folder = Path(save_activations(X, tmp_path / "ok", shard_size=16))
    manifest = (folder / "manifest.json").read_text()
    (folder / "manifest.json").write_text(manifest[: len(manifest) // 2])
    with pytest.raises(ValueError, match="corrupt"):
        ActivationStore(folder)
    (folder / "manifest.json").write_text(json.dumps({"shards": []}))
    with pytest.raises(ValueError, match="missing keys"):
        ActivationStore(folder)
    (folder / "manifest.json").write_text(manifest)
    np.save(folder / "acts-00001.npy", rows_of(16, 5))  # a shard of the wrong width
    with pytest.raises(ValueError, match="d_in=6"):
        ActivationStore(folder)
    (folder / "acts-00001.npy").unlink()
    with pytest.raises(FileNotFoundError, match="acts-00001.npy"):
        ActivationStore(folder)
    np.save(tmp_path / "w1.npy", X)
    np.save(tmp_path / "w2.npy", rows_of(10, 7))
    with pytest.raises(ValueError, match="w2.npy has 7 columns"):
        ActivationStore([tmp_path / "w1.npy", tmp_path / "w2.npy"])
    np.save(tmp_path / "int.npy", np.arange(12).reshape(3, 4))
    with pytest.raises(TypeError, match="float"):
        ActivationStore(tmp_path / "int.npy")
    with pytest.raises(TypeError, match="float"):
        ActivationStore(np.arange(12).reshape(3, 4))
    bad = X.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        ActivationStore(bad)
    np.save(tmp_path / "nan.npy", bad)
    with pytest.raises(ValueError, match="row 3"):
        list(ActivationStore(tmp_path / "nan.npy").iter_batches(8))
    with pytest.raises(ValueError, match="empty"):
        ActivationStore(np.zeros((0, 4), np.float32))
    with pytest.raises(ValueError, match="2-D"):
        ActivationStore(np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="unknown file type"):
        ActivationStore(tmp_path / "empty_dir" / ".." / "ok" / "manifest.json")
    np.savez(tmp_path / "two.npz", a=X, b=X)
    with pytest.raises(ValueError, match="key="):
        ActivationStore(tmp_path / "two.npz")
    np.testing.assert_array_equal(ActivationStore(tmp_path / "two.npz", key="b").to_numpy(), X)
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}xxxxxx")
    with pytest.raises(ValueError, match="safetensors"):
        ActivationStore(tmp_path / "junk.safetensors")
    s = ActivationStore(X)
    with pytest.raises(ValueError, match="holdout_fraction"):
        s.iter_batches(4, split="holdout")
    with pytest.raises(ValueError, match="split"):
        s.iter_batches(4, split="test")
    with pytest.raises(ValueError, match="batch_size"):
        s.iter_batches(0)
    with pytest.raises(TypeError, match="batch_size"):
        s.iter_batches(2.5)
    with pytest.raises(ValueError, match="holdout_fraction"):
        ActivationStore(X, holdout_fraction=1.0)
    with pytest.raises(ValueError, match="normalize"):
        ActivationStore(X, normalize=-1.0)
    with pytest.raises(TypeError, match="source"):
        ActivationStore({"a": 1})
    with pytest.raises(ValueError, match="already holds"):
        save_activations(X, tmp_path / "ok")


def test_open_array_file_reports_members(tmp_path):
    np.savez(tmp_path / "m.npz", activations=rows_of(5, 2), docs=np.zeros(5, np.int32))
    out = open_array_file(tmp_path / "m.npz")
    assert set(out) == {"acts", "docs"} and out["acts"].shape == (5, 2)
    with pytest.raises(KeyError, match="holds"):
        open_array_file(tmp_path / "m.npz", key="nope")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        open_array_file(tmp_path / "m.npz")  # stored members are mapped without a warning


def test_benchmark_script_runs_quick(tmp_path):
    """Keeps benchmarks/extraction.py from rotting (store part only; no timing assertions)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "extraction.py"
    spec = importlib.util.spec_from_file_location("bench_extraction", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = mod.bench_store(n_rows=3000, d=16, shard_size=1000, batch_size=256, repeats=1)
    assert [r["reader"] for r in rows][:3] == ["np.load (whole shards)", "np.load mmap, batches in order",
                                               "store, in order"]
    assert all(r["rows_per_s"] > 0 for r in rows)
