"""Stream activation rows from disk (or memory) in shuffled batches, with bounded memory.

:class:`ActivationStore` opens

- an extraction folder written by :func:`sparsecode.extract.extract_activations` (or by
  :func:`save_activations`): ``manifest.json`` plus ``acts-*.npy`` shards with token ids,
  document and position indices beside them;
- ``.npy``, ``.npz`` and ``.safetensors`` files (one path or a list), each holding a
  ``(n, d_in)`` array (or ``(n_seq, context, d_in)``, flattened to rows);
- an SAELens activation cache: a Hugging Face ``datasets`` folder saved with
  ``save_to_disk`` (``state.json`` + ``data-*.arrow``), whose hook column is an
  ``Array2D(context_size, d_in)`` with a ``token_ids`` column beside it (needs ``pyarrow``);
- one in-memory array ``(n, d_in)``.

Nothing is copied where the format allows it: ``.npy`` shards and files, uncompressed
``.npz`` members, ``.safetensors`` tensors and Arrow files are memory-mapped, and only the
rows of the current shuffle buffer are ever read into memory.

Shuffling. Rows are grouped into contiguous *blocks* (``block_rows`` rows, fewer for small
stores so that there are at least 64 blocks). An epoch visits the blocks of a split in a
seeded random order; ``buffer_rows`` rows' worth of blocks are read into a buffer, the
buffer's rows are permuted, and full batches are emitted; the few rows left over (fewer than a
batch) move on to the next buffer. Every row of the split is yielded exactly once per epoch.
Peak memory is about ``(buffer_rows + 2 * batch_size) * d_in * 4`` bytes (the buffer, the
batch being gathered and the leftover rows), whatever the size of the store: 75 MB for the
defaults (32768 rows per buffer, blocks of 1024 rows) at ``d_in = 576``. With
``shuffle=False`` rows come in order. Each batch is a new array.

Held-out split. ``holdout_fraction`` of the blocks (chosen with ``seed``) form the
``"holdout"`` split, the rest ``"train"``; whole blocks are held out so that neighbouring
tokens of one text do not leak across the split.

Normalisation. ``normalize=True`` scales every row by ``norm_scale = sqrt(d_in / E||x||^2)``
(mean over all rows), so that the mean squared norm of the scaled rows is ``d_in``: the
convention of SAELens' ``normalize_activations="expected_average_only_in"`` (SAELens
estimates the constant as ``sqrt(d_in) / E||x||`` from a sample of batches; we compute the
squared-norm version exactly, from the per-shard sums in the manifest when there is one).
Pass a float to apply a known constant (for example the training store's to a test store).
Divide a model's reconstructions by ``norm_scale`` to get back to the original units.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import struct
import warnings
import zipfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

__all__ = ["ActivationStore", "save_activations", "open_array_file"]

_FLOAT_NAMES = {"float16", "float32", "float64", "bfloat16"}
_ACTS_KEYS = ("acts", "activations", "x", "X", "arr_0")
_META_KEYS = {"tokens": ("tokens", "token_ids"), "docs": ("docs", "doc"), "pos": ("pos", "positions")}


# --------------------------------------------------------------------------- segments
class _BF16:
    """A read-only (n, d) view of bfloat16 data stored as uint16; slices come back float32."""

    def __init__(self, raw: np.ndarray):
        self.raw = raw
        self.shape = raw.shape
        self.ndim = raw.ndim
        self.dtype_name = "bfloat16"

    def __getitem__(self, idx):
        r = np.asarray(self.raw[idx], dtype=np.uint32)
        return (r << 16).view(np.float32)


class _Segment:
    """A contiguous run of store rows: activations plus optional token bookkeeping."""

    def __init__(self, acts, name: str, *, tokens=None, docs=None, pos=None,
                 context: int | None = None, doc_offset: int = 0):
        self.acts = acts
        self.name = name
        self.n = int(acts.shape[0])
        self.d = int(acts.shape[1])
        self.tokens, self.docs, self.pos = tokens, docs, pos
        self.context = context  # rows come in windows of this length (3-D inputs, SAELens)
        self.doc_offset = doc_offset
        for kind, arr in (("tokens", tokens), ("docs", docs), ("pos", pos)):
            if arr is not None and tuple(arr.shape) != (self.n,):
                raise ValueError(
                    f"{name}: {kind} has shape {tuple(arr.shape)} but the activations have "
                    f"{self.n} rows; expected ({self.n},)"
                )

    @property
    def dtype_name(self) -> str:
        return getattr(self.acts, "dtype_name", None) or np.dtype(self.acts.dtype).name

    def meta(self, kind: str, a: int, b: int):
        arr = getattr(self, kind)
        if arr is not None:
            return np.asarray(arr[a:b], dtype=np.int64)
        if self.context is not None and kind in ("docs", "pos"):
            r = np.arange(a, b, dtype=np.int64)
            return r // self.context + self.doc_offset if kind == "docs" else r % self.context
        return None


def _check_float_dtype(dtype_name: str, where: str) -> None:
    if dtype_name not in _FLOAT_NAMES:
        raise TypeError(
            f"{where} holds {dtype_name} values; activations must be float16, bfloat16, "
            "float32 or float64"
        )


def _as_rows(arr, where: str):
    """(n, d) stays; (n_seq, ctx, d) becomes (n_seq*ctx, d) without copying; returns (arr, ctx)."""
    if arr.ndim == 2:
        ctx = None
    elif arr.ndim == 3:
        ctx = int(arr.shape[1])
        if isinstance(arr, _BF16):
            arr = _BF16(arr.raw.reshape(-1, arr.shape[2]))
        else:
            arr = arr.reshape(-1, arr.shape[2])
    else:
        raise ValueError(
            f"{where} must be 2-D (n_rows, d_in) or 3-D (n_seq, context, d_in), got shape "
            f"{tuple(arr.shape)}"
        )
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{where} is empty (shape {tuple(arr.shape)})")
    return arr, ctx


# --------------------------------------------------------------------------- file readers
def _npy_memmap_at(path: str, offset: int):
    """Memory-map the .npy image that starts at byte ``offset`` of ``path``."""
    with open(path, "rb") as f:
        f.seek(offset)
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        data_at = f.tell()
    if dtype.hasobject:
        raise TypeError(f"{path}: object arrays are not activations")
    if int(np.prod(shape)) == 0:
        return np.zeros(shape, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=data_at, shape=tuple(shape),
                     order="F" if fortran else "C")


def _read_npy(path: str):
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        raise ValueError(f"{path} is not a readable .npy file: {exc}") from None


def _read_npz(path: str) -> dict[str, Any]:
    """Members of an .npz: memory-mapped when stored uncompressed, loaded otherwise."""
    out: dict[str, Any] = {}
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise ValueError(f"{path} is not a readable .npz file: {exc}") from None
    with zf:
        for info in zf.infolist():
            if not info.filename.endswith(".npy"):
                continue
            key = info.filename[:-4]
            if info.compress_type == zipfile.ZIP_STORED:
                with open(path, "rb") as f:
                    f.seek(info.header_offset)
                    head = f.read(30)
                if head[:4] != b"PK\x03\x04":
                    raise ValueError(f"{path}: corrupt zip member {info.filename}")
                n_name, n_extra = struct.unpack("<HH", head[26:30])
                out[key] = _npy_memmap_at(path, info.header_offset + 30 + n_name + n_extra)
            else:
                warnings.warn(
                    f"{path}: member {key!r} is compressed and is loaded into memory; save with "
                    "np.savez (not savez_compressed) to let it be memory-mapped",
                    stacklevel=4,
                )
                with zf.open(info) as f:
                    out[key] = np.lib.format.read_array(f, allow_pickle=False)
    return out


_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": "bf16",
              "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
              "BOOL": np.bool_}


def _read_safetensors(path: str) -> dict[str, Any]:
    """Tensors of a .safetensors file, memory-mapped (header: 8-byte length + JSON)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{path} is not a .safetensors file (too short)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise ValueError(f"{path} is not a .safetensors file (bad header length)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path} is not a .safetensors file: {exc}") from None
    out: dict[str, Any] = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        dt = _ST_DTYPES.get(info.get("dtype"))
        if dt is None:
            continue
        shape = tuple(int(s) for s in info["shape"])
        begin, end = (int(v) for v in info["data_offsets"])
        if 8 + n + end > size:
            raise ValueError(f"{path}: tensor {key!r} runs past the end of the file")
        if int(np.prod(shape)) == 0:
            out[key] = np.zeros(shape, dtype=np.uint16 if dt == "bf16" else dt)
            continue
        if dt == "bf16":
            out[key] = _BF16(np.memmap(path, dtype=np.uint16, mode="r", offset=8 + n + begin, shape=shape))
        else:
            out[key] = np.memmap(path, dtype=dt, mode="r", offset=8 + n + begin, shape=shape)
    return out


def open_array_file(path, key: str | None = None) -> dict[str, Any]:
    """Open one ``.npy`` / ``.npz`` / ``.safetensors`` file without loading it.

    Returns ``{"acts": array, "tokens"/"docs"/"pos": optional 1-D arrays}``: the activations are
    the single float array of the file, or the one named ``key`` (default names tried: acts,
    activations, x, X, arr_0); integer arrays named tokens/token_ids, docs, pos are picked up
    as token bookkeeping when their length matches.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"activation file {path!r} does not exist")
    suffix = Path(path).suffix.lower()
    if suffix == ".npy":
        arrays = {"acts": _read_npy(path)}
        key = "acts"
    elif suffix == ".npz":
        arrays = _read_npz(path)
    elif suffix == ".safetensors":
        arrays = _read_safetensors(path)
    else:
        raise ValueError(f"{path}: unknown file type {suffix!r}; use .npy, .npz or .safetensors")
    if not arrays:
        raise ValueError(f"{path} holds no arrays")

    def fname(a):
        return getattr(a, "dtype_name", None) or np.dtype(a.dtype).name

    if key is None:
        floats = [k for k, a in arrays.items() if fname(a) in _FLOAT_NAMES]
        named = [k for k in _ACTS_KEYS if k in arrays]
        if len(floats) == 1:
            key = floats[0]
        elif named:
            key = named[0]
        else:
            raise ValueError(
                f"{path} holds several arrays {sorted(arrays)}; say which one holds the "
                "activations with key=..."
            )
    if key not in arrays:
        raise KeyError(f"{path} has no array {key!r}; it holds {sorted(arrays)}")
    out = {"acts": arrays[key]}
    for kind, names in _META_KEYS.items():
        for nm in names:
            if nm in arrays and nm != key and arrays[nm].ndim == 1:
                out[kind] = arrays[nm]
                break
    return out


def _extension(field) -> tuple[str, tuple | None]:
    """(extension name, array shape) of a datasets ArrayND column, registered or not."""
    import pyarrow as pa

    t = field.type
    if isinstance(t, pa.ExtensionType):
        name = t.extension_name
        shape = getattr(t, "shape", None)
        if shape is None:
            try:
                shape = json.loads(t.__arrow_ext_serialize__())[0]
            except (ValueError, IndexError, TypeError):
                shape = None
    else:
        meta = field.metadata or {}
        name = meta.get(b"ARROW:extension:name", b"").decode()
        try:
            shape = json.loads(meta[b"ARROW:extension:metadata"])[0]
        except (KeyError, ValueError, IndexError, TypeError):
            shape = None
    return name, (tuple(int(v) for v in shape) if shape is not None else None)


def _open_saelens(folder: Path, column: str | None) -> tuple[list[_Segment], dict]:
    """Segments of a Hugging Face ``datasets`` folder as SAELens' CacheActivationsRunner writes it."""
    try:
        import pyarrow as pa
    except ImportError as exc:
        raise ImportError(
            "reading a Hugging Face datasets / SAELens cache needs pyarrow: pip install pyarrow"
        ) from exc
    files: list[Path] = []
    state = folder / "state.json"
    if state.is_file():
        try:
            st = json.loads(state.read_text(encoding="utf-8"))
            files = [folder / d["filename"] for d in st.get("_data_files", [])]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{state} is corrupt: {exc}") from None
    if not files:
        files = sorted(folder.glob("*.arrow"))
    if not files:
        raise FileNotFoundError(f"{folder} holds no .arrow files")
    segments: list[_Segment] = []
    keep: list = []
    info: dict[str, Any] = {"column": None, "context": None, "files": [f.name for f in files]}
    seq_offset = 0
    for path in files:
        if not path.is_file():
            raise FileNotFoundError(f"{path} (listed in state.json) does not exist")
        source = pa.memory_map(str(path), "r")
        try:
            table = pa.ipc.open_stream(source).read_all()
        except pa.ArrowInvalid:
            table = pa.ipc.open_file(source).read_all()
        keep.append((source, table))
        schema = table.schema
        if column is None:
            cands = [f.name for f in schema if "Array2D" in _extension(f)[0]]
            if len(cands) != 1:
                floats = [f.name for f in schema if f.name != "token_ids"]
                raise ValueError(
                    f"{folder}: cannot tell which column holds the activations "
                    f"(columns {schema.names}); pass key=... (one of {floats})"
                )
            column = cands[0]
        if column not in schema.names:
            raise KeyError(f"{path}: no column {column!r}; columns are {schema.names}")
        fld = schema.field(column)
        shape = _extension(fld)[1]
        for rb in table.to_batches():
            if rb.num_rows == 0:
                continue
            arr = rb.column(column)
            arr = arr.storage if isinstance(arr, pa.ExtensionArray) else arr
            n_seq = len(arr)
            if arr.null_count:
                raise ValueError(f"{path}: column {column!r} has missing rows")
            while pa.types.is_list(arr.type) or pa.types.is_fixed_size_list(arr.type) \
                    or pa.types.is_large_list(arr.type):
                arr = arr.flatten()
            values = arr.to_numpy(zero_copy_only=True)
            if shape is None:  # Sequence(Value, length=d): one token per row
                shape = (1, len(values) // n_seq)
            ctx, d = (int(shape[-2]) if len(shape) >= 2 else 1), int(shape[-1])
            if values.size != n_seq * ctx * d:
                raise ValueError(
                    f"{path}: column {column!r} holds {values.size} values for {n_seq} rows of "
                    f"shape {shape}"
                )
            _check_float_dtype(values.dtype.name, f"{path} column {column!r}")
            tokens = None
            if "token_ids" in rb.schema.names:
                tarr = rb.column("token_ids")
                while pa.types.is_list(tarr.type) or pa.types.is_fixed_size_list(tarr.type) \
                        or pa.types.is_large_list(tarr.type):
                    tarr = tarr.flatten()
                tokens = tarr.to_numpy(zero_copy_only=False)
                if tokens.size != n_seq * ctx:
                    tokens = None
            seg = _Segment(values.reshape(n_seq * ctx, d), f"{path.name}[{column}]",
                           tokens=tokens, context=ctx, doc_offset=seq_offset)
            seg._keep = keep[-1]  # the memory map must outlive the views
            segments.append(seg)
            seq_offset += n_seq
            info["column"], info["context"] = column, ctx
    if not segments:
        raise ValueError(f"{folder} holds no rows")
    return segments, info


# --------------------------------------------------------------------------- the store
class ActivationStore:
    """Rows of activations ``(n_rows, d_in)`` streamed in batches from disk or memory.

    Parameters
    ----------
    source : path, list of paths, or array
        An extraction folder (``manifest.json``), an SAELens / ``datasets`` cache folder, a
        ``.npy`` / ``.npz`` / ``.safetensors`` file or a list of them, or one array
        ``(n_rows, d_in)`` (or ``(n_seq, context, d_in)``). See the module docstring.
    normalize : bool or float
        ``True``: scale rows by ``norm_scale = sqrt(d_in / mean ||x||^2)`` (mean squared norm
        ``d_in`` afterwards); a float: scale by that constant; ``False``: ``norm_scale = 1``.
    holdout_fraction : float in [0, 1)
        Fraction of blocks held out as the ``"holdout"`` split.
    seed : int
        Chooses the held-out blocks.
    buffer_rows : int
        Rows read per shuffle buffer (memory bound, see the module docstring).
    block_rows : int
        Largest contiguous run of rows read at once (the unit of shuffling and of the split).
    key : str, optional
        Array name inside ``.npz`` / ``.safetensors`` files, or the column of a datasets cache.
    tokenizer : tokenizer, path or None
        Overrides the tokenizer recorded in the manifest for :meth:`decode`.
    tokens, docs, pos : 1-D int arrays, optional
        Token bookkeeping for an in-memory array source.
    check_finite : bool
        Refuse NaN/Inf rows when they are read (``ValueError`` naming the file and row).

    Attributes
    ----------
    n_rows, d_in, dtype (storage dtype name), manifest (dict or None), norm_scale (float),
    n_train, n_holdout, has_tokens, files (what was opened).
    """

    def __init__(self, source, *, normalize: bool | float = False, holdout_fraction: float = 0.0,
                 seed: int = 0, buffer_rows: int = 32768, block_rows: int = 1024,
                 key: str | None = None, tokenizer=None, tokens=None, docs=None, pos=None,
                 check_finite: bool = True):
        self.manifest: dict | None = None
        self.files: list[str] = []
        self._tokenizer_override = tokenizer
        self._tokenizer = None
        self._tokenizer_loaded = False
        self.check_finite = bool(check_finite)
        self.buffer_rows = _pos_int(buffer_rows, "buffer_rows")
        block_rows = _pos_int(block_rows, "block_rows")
        self.seed = _check_seed(seed)
        self.source_kind = None
        if any(v is not None for v in (tokens, docs, pos)) and not _is_array(source):
            raise ValueError("tokens=, docs=, pos= go with an in-memory array source only")
        self._segments = self._open(source, key, tokens, docs, pos)
        widths = {s.d for s in self._segments}
        if len(widths) > 1:
            first = self._segments[0]
            bad = next(s for s in self._segments if s.d != first.d)
            raise ValueError(
                f"{bad.name} has {bad.d} columns but {first.name} has {first.d}: every "
                "shard/file of one store must have the same width d_in"
            )
        self.d_in = self._segments[0].d
        if self.manifest is not None and int(self.manifest["d_in"]) != self.d_in:
            raise ValueError(
                f"shards have width {self.d_in} but manifest.json says d_in={self.manifest['d_in']}"
            )
        names = {s.dtype_name for s in self._segments}
        self.dtype = names.pop() if len(names) == 1 else str(np.result_type(*[
            np.float32 if n == "bfloat16" else np.dtype(n) for n in names]))
        sizes = np.array([s.n for s in self._segments], dtype=np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(sizes)])
        self.n_rows = int(self._offsets[-1])
        self.has_tokens = all(s.tokens is not None for s in self._segments)
        self._has_docs = all(s.meta("docs", 0, 0) is not None for s in self._segments)

        # blocks, split
        self.block_rows = int(min(block_rows, max(1, math.ceil(self.n_rows / 64))))
        self._n_blocks = math.ceil(self.n_rows / self.block_rows)
        frac = holdout_fraction
        if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0.0 <= frac < 1.0:
            raise ValueError(f"holdout_fraction must be a number in [0, 1), got {frac!r}")
        self.holdout_fraction = float(frac)
        self._holdout = np.zeros(self._n_blocks, dtype=bool)
        if frac > 0:
            if self._n_blocks < 2:
                raise ValueError(f"holdout_fraction={frac} needs at least 2 rows, the store has {self.n_rows}")
            n_hold = min(max(1, round(frac * self._n_blocks)), self._n_blocks - 1)
            rng = np.random.default_rng(self.seed)
            self._holdout[rng.choice(self._n_blocks, n_hold, replace=False)] = True
        lens = self._block_lengths()
        self.n_holdout = int(lens[self._holdout].sum())
        self.n_train = self.n_rows - self.n_holdout

        # normalisation
        if isinstance(normalize, bool):
            if normalize:
                self.norm_scale = self._compute_norm_scale()
            else:
                self.norm_scale = 1.0
        elif isinstance(normalize, (int, float)) and math.isfinite(normalize) and normalize > 0:
            self.norm_scale = float(normalize)
        else:
            raise ValueError(f"normalize must be True, False or a positive finite float, got {normalize!r}")
        self.normalize = self.norm_scale != 1.0 or normalize is True

    # ------------------------------------------------------------------ opening
    def _open(self, source, key, tokens, docs, pos) -> list[_Segment]:
        if _is_array(source):
            self.source_kind = "array"
            from .backend import to_numpy

            arr = to_numpy(source) if not isinstance(source, np.ndarray) else source
            if arr.dtype.kind not in "f":
                raise TypeError(
                    f"source array has dtype {arr.dtype}; activations must be float16, float32 or "
                    "float64 (convert with .astype(np.float32))"
                )
            arr, ctx = _as_rows(arr, "source array")
            if self.check_finite:  # in slices, so the check needs no array-sized temporary
                step = max(1, (1 << 22) // max(1, arr.shape[1]))
                for a in range(0, arr.shape[0], step):
                    if not np.isfinite(arr[a:a + step]).all():
                        raise ValueError("source array contains NaN or Inf")
            meta = {}
            for kind, v in (("tokens", tokens), ("docs", docs), ("pos", pos)):
                meta[kind] = None if v is None else np.asarray(v).reshape(-1)
                if meta[kind] is not None and meta[kind].dtype.kind not in "iu":
                    raise TypeError(f"{kind} must hold integers, got dtype {meta[kind].dtype}")
            return [_Segment(arr, "source array", context=ctx, **meta)]
        if isinstance(source, (str, os.PathLike)):
            p = Path(source).expanduser()
            if not p.exists():
                raise FileNotFoundError(f"activation source {str(p)!r} does not exist")
            if p.is_dir():
                if (p / "manifest.json").exists():
                    return self._open_extraction(p)
                if (p / "state.json").exists() or any(p.glob("*.arrow")):
                    self.source_kind = "datasets"
                    segs, info = _open_saelens(p, key)
                    self.files = [str(p / f) for f in info["files"]]
                    self.saelens_info = info
                    return segs
                raise FileNotFoundError(
                    f"{str(p)!r} holds neither manifest.json (an extraction folder) nor .arrow "
                    "files (a datasets / SAELens cache)"
                )
            source = [p]
        if isinstance(source, (list, tuple)):
            if not source:
                raise ValueError("source is an empty list of files")
            self.source_kind = "files"
            segs = []
            for item in source:
                if not isinstance(item, (str, os.PathLike)):
                    raise TypeError(f"source list items must be paths, got {type(item).__name__}")
                opened = open_array_file(item, key)
                acts = opened.pop("acts")
                _check_float_dtype(getattr(acts, "dtype_name", None) or np.dtype(acts.dtype).name, str(item))
                acts, ctx = _as_rows(acts, str(item))
                meta = {k: v for k, v in opened.items() if v.shape[0] == acts.shape[0]}
                segs.append(_Segment(acts, str(item), context=ctx, **meta))
                self.files.append(str(item))
            return segs
        raise TypeError(
            "source must be an extraction folder, a datasets/SAELens cache folder, a .npy/.npz/"
            f".safetensors path or a list of them, or an array; got {type(source).__name__}"
        )

    def _open_extraction(self, folder: Path) -> list[_Segment]:
        self.source_kind = "extraction"
        mpath = folder / "manifest.json"
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{mpath} is corrupt (not valid JSON: {exc})") from None
        if not isinstance(manifest, dict):
            raise ValueError(f"{mpath} is corrupt: expected a JSON object")
        missing = [k for k in ("d_in", "dtype", "shards") if k not in manifest]
        if missing:
            raise ValueError(f"{mpath} is corrupt: missing keys {missing}")
        shards = manifest["shards"]
        if not isinstance(shards, list) or not shards:
            raise ValueError(f"{mpath} lists no complete shards (extraction not started or corrupt)")
        self.manifest = manifest
        d_in = manifest["d_in"]
        segs = []
        for i, sh in enumerate(shards):
            if not isinstance(sh, dict) or "acts" not in sh or "n_rows" not in sh:
                raise ValueError(f"{mpath} is corrupt: shard entry {i} lacks 'acts' or 'n_rows'")
            apath = folder / sh["acts"]
            if not apath.is_file():
                raise FileNotFoundError(f"shard {apath} listed in the manifest does not exist")
            acts = _read_npy(str(apath))
            if acts.ndim != 2 or acts.shape[1] != d_in:
                raise ValueError(
                    f"shard {apath.name} has shape {tuple(acts.shape)} but the manifest says d_in={d_in}"
                )
            if acts.shape[0] != sh["n_rows"]:
                raise ValueError(
                    f"shard {apath.name} has {acts.shape[0]} rows but the manifest says {sh['n_rows']}"
                )
            if acts.dtype.name != manifest["dtype"]:
                raise ValueError(
                    f"shard {apath.name} holds {acts.dtype.name} but the manifest says {manifest['dtype']}"
                )
            meta = {}
            for kind in ("tokens", "docs", "pos"):
                if sh.get(kind):
                    mp = folder / sh[kind]
                    if not mp.is_file():
                        raise FileNotFoundError(f"shard file {mp} listed in the manifest does not exist")
                    meta[kind] = _read_npy(str(mp))
            segs.append(_Segment(acts, apath.name, **meta))
            self.files.append(str(apath))
        return segs

    # ------------------------------------------------------------------ basics
    def __len__(self) -> int:
        return self.n_rows

    def __repr__(self) -> str:
        return (f"ActivationStore({self.n_rows} rows x {self.d_in}, {self.dtype}, "
                f"{self.source_kind}, {len(self._segments)} segment(s), train {self.n_train}, "
                f"holdout {self.n_holdout}, norm_scale {self.norm_scale:.6g})")

    def _locate(self, row: int) -> tuple[int, int]:
        if isinstance(row, bool) or not isinstance(row, (int, np.integer)):
            raise TypeError(f"row must be an integer, got {type(row).__name__}")
        row = int(row)
        if row < 0:
            row += self.n_rows
        if not 0 <= row < self.n_rows:
            raise IndexError(f"row {row} is out of range for a store of {self.n_rows} rows")
        s = int(np.searchsorted(self._offsets, row, side="right") - 1)
        return s, row - int(self._offsets[s])

    def _raw(self, start: int, stop: int, dtype=np.float32, out=None) -> np.ndarray:
        """Rows [start, stop) as a new array (or into ``out``), across segments, unscaled."""
        if out is None:
            out = np.empty((stop - start, self.d_in), dtype=dtype)
        s = int(np.searchsorted(self._offsets, start, side="right") - 1)
        at = start
        while at < stop:
            seg = self._segments[s]
            a = at - int(self._offsets[s])
            b = min(seg.n, stop - int(self._offsets[s]))
            block = out[at - start: at - start + (b - a)]
            block[...] = seg.acts[a:b]
            # one cheap reduction; the exact element test only when the sum is not finite
            if self.check_finite and not math.isfinite(float(block.sum())):
                bad = np.argwhere(~np.isfinite(block))
                if len(bad):
                    raise ValueError(f"{seg.name} row {a + int(bad[0][0])} contains NaN or Inf")
            at += b - a
            s += 1
        return out

    def _meta_range(self, kind: str, start: int, stop: int):
        parts = []
        s = int(np.searchsorted(self._offsets, start, side="right") - 1)
        at = start
        while at < stop:
            seg = self._segments[s]
            a = at - int(self._offsets[s])
            b = min(seg.n, stop - int(self._offsets[s]))
            m = seg.meta(kind, a, b)
            if m is None:
                return None
            parts.append(m)
            at += b - a
            s += 1
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def read(self, start: int = 0, stop: int | None = None, *, dtype="float32") -> np.ndarray:
        """Rows ``[start, stop)`` (global row indices), scaled by ``norm_scale``, as a new array."""
        stop = self.n_rows if stop is None else stop
        if not (0 <= start <= stop <= self.n_rows):
            raise IndexError(f"rows [{start}, {stop}) out of range for {self.n_rows} rows")
        out = self._raw(start, stop, _out_dtype(dtype))
        if self.norm_scale != 1.0:
            out *= out.dtype.type(self.norm_scale)
        return out

    def take(self, rows, *, dtype="float32") -> np.ndarray:
        """Rows at the given global indices (any order), scaled by ``norm_scale``."""
        rows = np.asarray(rows)
        if rows.dtype.kind not in "iu" or rows.ndim != 1:
            raise TypeError("rows must be a 1-D array of integers")
        if rows.size and (rows.min() < 0 or rows.max() >= self.n_rows):
            raise IndexError(f"rows out of range for a store of {self.n_rows} rows")
        out = np.empty((rows.size, self.d_in), dtype=_out_dtype(dtype))
        order = np.argsort(rows, kind="stable")
        srt = rows[order]
        seg_of = np.searchsorted(self._offsets, srt, side="right") - 1
        for s in np.unique(seg_of):
            sel = np.nonzero(seg_of == s)[0]
            local = srt[sel] - self._offsets[s]
            out[order[sel]] = self._segments[s].acts[local]
        if self.check_finite and not np.isfinite(out).all():
            raise ValueError("the requested rows contain NaN or Inf")
        if self.norm_scale != 1.0:
            out *= out.dtype.type(self.norm_scale)
        return out

    def to_numpy(self, split: str = "all", *, dtype="float32") -> np.ndarray:
        """The whole split in memory (in row order), scaled: only for stores that fit."""
        blocks = self._split_blocks(split)
        return np.concatenate([self.read(a, b, dtype=dtype) for a, b in self._block_ranges(blocks)]) \
            if len(blocks) else np.zeros((0, self.d_in), dtype=_out_dtype(dtype))

    # ------------------------------------------------------------------ blocks & split
    def _block_lengths(self) -> np.ndarray:
        lens = np.full(self._n_blocks, self.block_rows, dtype=np.int64)
        lens[-1] = self.n_rows - self.block_rows * (self._n_blocks - 1)
        return lens

    def _split_blocks(self, split: str) -> np.ndarray:
        if split == "train":
            return np.nonzero(~self._holdout)[0]
        if split == "holdout":
            if self.n_holdout == 0:
                raise ValueError("this store has no held-out rows: open it with holdout_fraction > 0")
            return np.nonzero(self._holdout)[0]
        if split == "all":
            return np.arange(self._n_blocks)
        raise ValueError(f"split must be 'train', 'holdout' or 'all', got {split!r}")

    def _block_ranges(self, blocks) -> Iterator[tuple[int, int]]:
        for b in blocks:
            a = int(b) * self.block_rows
            yield a, min(a + self.block_rows, self.n_rows)

    def split_size(self, split: str = "train") -> int:
        """Number of rows in ``split``."""
        return {"train": self.n_train, "holdout": self.n_holdout, "all": self.n_rows}[
            _check_split(split)]

    def split_rows(self, split: str = "train") -> np.ndarray:
        """Global row indices of ``split``, sorted (memory: 8 bytes per row)."""
        blocks = self._split_blocks(split)
        return np.concatenate([np.arange(a, b) for a, b in self._block_ranges(blocks)]) \
            if len(blocks) else np.zeros(0, dtype=np.int64)

    # ------------------------------------------------------------------ streaming
    def iter_batches(self, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                     split: str = "train", xp=None, return_indices: bool = False,
                     drop_last: bool = False, dtype="float32"):
        """Yield batches ``(n, d_in)`` of one epoch over ``split``, each row exactly once.

        ``shuffle=True`` mixes rows across shards with the block/buffer scheme of the module
        docstring, reproducibly for a given ``seed`` (use a new seed per epoch);
        ``shuffle=False`` yields rows in store order. Batches are float32 (or ``dtype``),
        scaled by ``norm_scale``, NumPy arrays unless ``xp`` is an array namespace (or its
        name, e.g. ``"cupy"``), in which case they are created with ``xp.asarray``. The last
        batch may be shorter unless ``drop_last``. With ``return_indices=True`` yields
        ``(rows, batch)`` where ``rows`` (NumPy int64) are global store rows.
        """
        batch_size = _pos_int(batch_size, "batch_size")
        seed = _check_seed(seed)
        out_dtype = _out_dtype(dtype)
        blocks = self._split_blocks(_check_split(split))
        if xp is not None and isinstance(xp, str):
            xp = importlib.import_module(xp)
        return self._batches(blocks, batch_size, bool(shuffle), seed, xp, bool(return_indices),
                             bool(drop_last), out_dtype)

    def _batches(self, blocks, batch_size, shuffle, seed, xp, return_indices, drop_last, out_dtype):
        rng = np.random.default_rng(seed)
        if shuffle:
            blocks = rng.permutation(blocks)
        fill = max(self.buffer_rows, batch_size)
        scale = out_dtype.type(self.norm_scale)
        carry_x = np.zeros((0, self.d_in), dtype=out_dtype)
        carry_i = np.zeros(0, dtype=np.int64)

        def emit(x, i):
            if xp is not None:
                x = xp.asarray(x)
            return (i, x) if return_indices else x

        if not shuffle:  # in order: read straight into each batch (one copy, no buffer)
            x = np.empty((batch_size, self.d_in), dtype=out_dtype)
            i = np.empty(batch_size, dtype=np.int64)
            at = 0
            for a, b in self._block_ranges(blocks):
                while a < b:
                    take = min(b - a, batch_size - at)
                    self._raw(a, a + take, out=x[at:at + take])
                    i[at:at + take] = np.arange(a, a + take)
                    at += take
                    a += take
                    if at == batch_size:
                        if scale != 1:
                            x *= scale
                        yield emit(x, i)
                        x = np.empty((batch_size, self.d_in), dtype=out_dtype)
                        i = np.empty(batch_size, dtype=np.int64)
                        at = 0
            if at and not drop_last:
                if scale != 1:
                    x[:at] *= scale
                yield emit(x[:at], i[:at])
            return

        k = 0
        while k < len(blocks):
            ranges, got = [], len(carry_i)
            while k < len(blocks) and got < fill:
                a, b = next(self._block_ranges([blocks[k]]))
                ranges.append((a, b))
                got += b - a
                k += 1
            x = np.empty((got, self.d_in), dtype=out_dtype)  # the buffer, filled in place
            i = np.empty(got, dtype=np.int64)
            at = len(carry_i)
            x[:at], i[:at] = carry_x, carry_i
            del carry_x, carry_i
            for a, b in ranges:
                self._raw(a, b, out=x[at:at + b - a])
                i[at:at + b - a] = np.arange(a, b)
                at += b - a
            if scale != 1:  # carried rows were scaled with their own buffer
                x[len(i) - sum(b - a for a, b in ranges):] *= scale
            full = (len(i) // batch_size) * batch_size
            perm = rng.permutation(len(i))  # gather one batch at a time: no second buffer
            for a in range(0, full, batch_size):
                p = perm[a:a + batch_size]
                yield emit(x[p], i[p])
            carry_x, carry_i = x[perm[full:]], i[perm[full:]]
            del x, i
        if len(carry_i) and not drop_last:
            yield emit(carry_x, carry_i)

    def __iter__(self):
        return self.iter_batches(4096, shuffle=False, split="all")

    # ------------------------------------------------------------------ normalisation
    def _compute_norm_scale(self) -> float:
        if self.manifest is not None and all("sum_sq_norm" in s for s in self.manifest["shards"]):
            sq = float(sum(s["sum_sq_norm"] for s in self.manifest["shards"]))
        else:
            sq = 0.0
            for a in range(0, self.n_rows, self.buffer_rows):
                x = self._raw(a, min(a + self.buffer_rows, self.n_rows), np.float32)
                sq += float(np.einsum("ij,ij->", x, x, dtype=np.float64))
        if not sq > 0:
            raise ValueError("cannot normalise: every activation row is zero")
        return float(math.sqrt(self.d_in * self.n_rows / sq))

    # ------------------------------------------------------------------ tokens
    def _require_tokens(self):
        if not self.has_tokens or not self._has_docs:
            raise ValueError(
                "this store has no token ids / document indices (plain arrays carry none); "
                "open an extraction folder or pass tokens=, docs=, pos="
            )

    def row_tokens(self, row: int) -> tuple[int, int, int]:
        """``(doc, pos, token_id)`` of a global row: the document index (into the extraction's
        text list), the position inside its context window, and the token id."""
        self._require_tokens()
        s, local = self._locate(row)
        seg = self._segments[s]
        return (int(seg.meta("docs", local, local + 1)[0]), int(seg.meta("pos", local, local + 1)[0]),
                int(seg.tokens[local]))

    def context(self, row: int, before: int = 8, after: int = 4) -> dict:
        """The tokens around ``row`` in the same context window the model saw.

        Returns ``{"token_ids": [...], "index_of_row": i, "doc": d, "pos": p, "rows": [...]}``
        where ``token_ids[i]`` is the row's own token and ``rows`` the global rows of
        ``token_ids``; at most ``before`` tokens before and ``after`` after, never crossing
        into another window or document.
        """
        self._require_tokens()
        before = _nonneg_int(before, "before")
        after = _nonneg_int(after, "after")
        s, local = self._locate(row)
        row = int(self._offsets[s]) + local
        lo, hi = max(0, row - before), min(self.n_rows, row + after + 1)
        docs = self._meta_range("docs", lo, hi)
        pos = self._meta_range("pos", lo, hi)
        toks = self._meta_range("tokens", lo, hi)
        k = row - lo
        a = k
        while a > 0 and docs[a - 1] == docs[a] and pos[a - 1] == pos[a] - 1:
            a -= 1
        b = k
        while b + 1 < len(docs) and docs[b + 1] == docs[b] and pos[b + 1] == pos[b] + 1:
            b += 1
        return {"token_ids": [int(t) for t in toks[a:b + 1]], "index_of_row": k - a,
                "doc": int(docs[k]), "pos": int(pos[k]), "rows": list(range(lo + a, lo + b + 1))}

    @property
    def tokenizer(self):
        """The tokenizer recorded in the manifest (loaded on first use), or ``None``."""
        if not self._tokenizer_loaded:
            self._tokenizer_loaded = True
            tok = self._tokenizer_override
            if isinstance(tok, (str, os.PathLike)):
                from .extract import load_tokenizer

                tok = load_tokenizer(str(tok))
            elif tok is None and self.manifest is not None and self.manifest.get("tokenizer"):
                from .extract import load_tokenizer

                try:
                    tok = load_tokenizer(self.manifest["tokenizer"])
                except (ImportError, OSError, ValueError) as exc:
                    warnings.warn(f"cannot load the tokenizer recorded in the manifest: {exc}",
                                  stacklevel=2)
                    tok = None
            self._tokenizer = tok
        return self._tokenizer

    def decode(self, token_ids) -> list[str]:
        """Token ids -> one string per token (``tokenizer.decode([id])``); without a tokenizer
        each token shows as ``"<id>"``."""
        ids = [int(t) for t in np.asarray(token_ids, dtype=np.int64).reshape(-1)]
        tok = self.tokenizer
        if tok is None:
            return [f"<{i}>" for i in ids]
        return [tok.decode([i]) for i in ids]


# --------------------------------------------------------------------------- writing
def save_activations(X, out_dir, *, tokens=None, docs=None, pos=None, shard_size: int = 65536,
                     dtype: str | None = None, model: str | None = None, layer: str | None = None,
                     tokenizer: dict | None = None) -> str:
    """Write an array ``(n_rows, d_in)`` (or an :class:`ActivationStore`, in row order,
    unscaled) as an extraction folder that :class:`ActivationStore` opens: shards written to
    temporary names and renamed, the manifest last. ``tokens``/``docs``/``pos`` (1-D, length
    ``n_rows``) are written beside the shards when given; ``tokenizer`` is a
    ``{"path", "gguf_file"}`` record. Refuses a folder that already holds a manifest.
    """
    from . import __version__
    from .extract import FORMAT, FORMAT_VERSION, MANIFEST, write_manifest, write_shard

    out_dir = Path(out_dir)
    if (out_dir / MANIFEST).exists():
        raise ValueError(f"{str(out_dir)!r} already holds an extraction; choose another folder")
    shard_size = _pos_int(shard_size, "shard_size")
    if isinstance(X, ActivationStore):
        store = X
        n, d = store.n_rows, store.d_in
        src_dtype = store.dtype if store.dtype in ("float16", "float32", "float64") else "float32"

        def rows(a, b):
            return store._raw(a, b, np.float32 if src_dtype == "float32" else np.dtype(src_dtype))

        if store.has_tokens and store._has_docs and tokens is None:
            tokens = [store._meta_range("tokens", 0, n), store._meta_range("docs", 0, n),
                      store._meta_range("pos", 0, n)]
            tokens, docs, pos = tokens
    else:
        from .backend import to_numpy

        arr = to_numpy(X) if not isinstance(X, np.ndarray) else X
        if arr.ndim != 2:
            raise ValueError(f"X must be 2-D (n_rows, d_in), got shape {arr.shape}")
        if arr.dtype.kind != "f":
            raise TypeError(f"X must be floating point, got dtype {arr.dtype}")
        if arr.size == 0:
            raise ValueError("X must not be empty")
        if not np.all(np.isfinite(arr)):
            raise ValueError("X contains NaN or Inf")
        n, d = arr.shape
        src_dtype = arr.dtype.name

        def rows(a, b):
            return arr[a:b]

    dtype = dtype or src_dtype
    if dtype not in ("float16", "float32", "float64"):
        raise ValueError(f"dtype must be float16, float32 or float64, got {dtype!r}")
    for kind, v in (("tokens", tokens), ("docs", docs), ("pos", pos)):
        if v is not None and np.asarray(v).shape != (n,):
            raise ValueError(f"{kind} must have shape ({n},), got {np.asarray(v).shape}")
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = {"format": FORMAT, "version": FORMAT_VERSION, "model": model, "layer": layer,
                "d_in": int(d), "dtype": dtype, "tokenizer": tokenizer, "shard_size": shard_size,
                "complete": False, "shards": [], "sparsecode_version": __version__}
    for i, a in enumerate(range(0, n, shard_size)):
        b = min(a + shard_size, n)
        part = lambda v: None if v is None else np.asarray(v)[a:b]  # noqa: E731
        entry = write_shard(out_dir, i, np.asarray(rows(a, b), dtype=dtype), part(tokens),
                            part(docs), part(pos))
        manifest["shards"].append(entry)
    manifest["complete"] = True
    write_manifest(out_dir, manifest)
    return str(out_dir)


# --------------------------------------------------------------------------- helpers
def _is_array(x) -> bool:
    if isinstance(x, np.ndarray):
        return True
    try:
        import array_api_compat

        return array_api_compat.is_array_api_obj(x) and not isinstance(x, (str, bytes))
    except ImportError:  # pragma: no cover
        return False


def _pos_int(v, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{name} must be a positive integer, got {v!r}")
    if v < 1:
        raise ValueError(f"{name} must be >= 1, got {v}")
    return int(v)


def _nonneg_int(v, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{name} must be a non-negative integer, got {v!r}")
    if v < 0:
        raise ValueError(f"{name} must be >= 0, got {v}")
    return int(v)


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise TypeError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def _check_split(split) -> str:
    if split not in ("train", "holdout", "all"):
        raise ValueError(f"split must be 'train', 'holdout' or 'all', got {split!r}")
    return split


def _out_dtype(dtype) -> np.dtype:
    dt = np.dtype(dtype)
    if dt not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError(f"output dtype must be float32 or float64, got {dt}")
    return dt
