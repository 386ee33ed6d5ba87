"""sparsecode: classical sparse coding and sparse autoencoders on the Python array API.

Shapes everywhere: ``X`` is ``(n_samples, n_features)``, the dictionary ``D`` is
``(n_atoms, n_features)`` (one atom per row), codes ``A`` are ``(n_samples, n_atoms)``,
``X ~ A @ D``.
"""

import os as _os
from importlib import import_module as _import_module

# Thread pools. OpenBLAS's workers busy-wait for ~2^28 cycles after each product, and
# Numba's OpenMP workers spin after each parallel kernel; the solvers and the SAE steps
# alternate the two, so on a small machine the idle pool takes the cores of the busy one
# (an SAE TopK step on 2 cores: 108 -> 80 ms; MP-SAE 300 -> 233 ms; the products alone
# unchanged). Each runtime reads its variable once, when it loads: OpenBLAS when NumPy/SciPy
# are first imported (so import sparsecode first, or export the variable yourself), OpenMP
# when Numba starts its first parallel kernel. Values already set are kept;
# SPARSECODE_THREAD_DEFAULTS=0 leaves both alone.
THREAD_DEFAULTS = {"OPENBLAS_THREAD_TIMEOUT": "1", "OMP_WAIT_POLICY": "PASSIVE"}
_THREAD_DEFAULTS_SET = ()
if _os.environ.get("SPARSECODE_THREAD_DEFAULTS", "1") != "0":
    _THREAD_DEFAULTS_SET = tuple(k for k in THREAD_DEFAULTS if k not in _os.environ)
    for _k in _THREAD_DEFAULTS_SET:
        _os.environ[_k] = THREAD_DEFAULTS[_k]

from .backend import available_backends, to_numpy
from .prox import hard_threshold, nonneg_soft_threshold, soft_threshold, top_k
from .result import ConvergenceHistory, SparseCodingResult
from .lasso import duality_gap, fista, ista, lasso_objective, lipschitz_constant
from .encode import sparse_encode

__version__ = "0.1.0"

# Modules with heavier or optional imports load on first use.
_LAZY = {
    "matching_pursuit": "sparsecode.pursuits",
    "omp": "sparsecode.pursuits",
    "iht": "sparsecode.pursuits",
    "learn_dictionary": "sparsecode.dictionary",
    "learn_dictionary_online": "sparsecode.dictionary",
    "DictionaryLearning": "sparsecode.dictionary",
    "SparseEncoder": "sparsecode.dictionary",
    "DictionaryLearningResult": "sparsecode.dictionary",
    "make_sparse_signals": "sparsecode.datasets",
    "atom_recovery": "sparsecode.datasets",
    "ActivationStore": "sparsecode.store",
    "fvu": "sparsecode.metrics",
    "FVUAccumulator": "sparsecode.metrics",
    "l0": "sparsecode.metrics",
    "dead_fraction": "sparsecode.metrics",
    "mmcs": "sparsecode.metrics",
    "hungarian_match": "sparsecode.metrics",
    "coherence": "sparsecode.metrics",
    "afa_ratio": "sparsecode.metrics",
    "build_report": "sparsecode.report",
    "make_superposition": "sparsecode.toy",
    "save_activations": "sparsecode.store",
    "extract_activations": "sparsecode.extract",
    "default_corpus": "sparsecode.extract",
    "SparseAutoencoder": "sparsecode.sae",
    "amortization_gap": "sparsecode.sae",
    "train_sae": "sparsecode.sae_train",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(_import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sparsecode' has no attribute {name!r}")


__all__ = [
    "available_backends",
    "to_numpy",
    "soft_threshold",
    "nonneg_soft_threshold",
    "hard_threshold",
    "top_k",
    "ConvergenceHistory",
    "SparseCodingResult",
    "ista",
    "fista",
    "lasso_objective",
    "duality_gap",
    "lipschitz_constant",
    "sparse_encode",
    *_LAZY,
]
