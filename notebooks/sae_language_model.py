# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Sparse autoencoders on language-model activations
#
# 1. extract the residual stream of SmolLM2-135M (block 12) over the default corpus (the
#    docstrings of the Python standard library), dropping each window's first position (the
#    attention-sink outlier);
# 2. train a TopK SAE and a ReLU (L1) SAE on the normalised activations;
# 3. measure them on held-out tokens — FVU, L0, dead latents — and the **amortization gap**: how
#    much better a proper solver (OMP for TopK, FISTA for the L1 SAE) does with the SAE's own
#    decoder than the SAE's one-shot encoder;
# 4. write the feature browser and look at a few features.
#
# Without the model packages it uses toy superposition data. `SPARSECODE_NOTEBOOK_QUICK=1`
# runs a small version.

# %%
import os
import tempfile
from pathlib import Path

import numpy as np

from sparsecode.demo import model_status
from sparsecode.metrics import dead_fraction, fvu, l0
from sparsecode.sae import amortization_gap, train_sae
from sparsecode.store import ActivationStore

QUICK = os.environ.get("SPARSECODE_NOTEBOOK_QUICK") == "1"
n_tokens = 512 if QUICK else 8192
work = Path(os.environ.get("SPARSECODE_NOTEBOOK_DIR") or tempfile.mkdtemp(prefix="sae-notebook-"))

status = model_status()
if status is None:
    from sparsecode.extract import default_corpus, extract_activations

    texts = default_corpus()[: 200 if QUICK else None]
    path = extract_activations("smollm2", 12, texts, work / "acts", max_tokens=n_tokens, context_length=64,
                               batch_size=16, skip_bos=True, progress=False)
    source = path
else:
    print(status, "- using toy superposition data")
    from sparsecode.toy import make_superposition

    source = make_superposition(n_tokens, 256, 64, sparsity=0.97, seed=0, dtype=np.float32).X
store = ActivationStore(source, normalize=True, holdout_fraction=0.1, seed=0)
raw = ActivationStore(source, normalize=False, holdout_fraction=0.1, seed=0)
X_hold = np.concatenate(list(raw.iter_batches(4096, shuffle=False, split="holdout")))
print(store, f"held out: {X_hold.shape[0]} rows")

# %% [markdown]
# Train both SAEs on the train split. A trained SAE takes raw activations: the store's
# normalisation constant is kept as its `input_scale`.

# %%
d_sae = 256 if QUICK else 2304
epochs = 3 if QUICK else 8
saes = {}
saes["TopK (k=32)"], _ = train_sae(store, d_sae, "topk", k=32, n_tokens=epochs * store.n_train,
                                   batch_size=256 if QUICK else 1024, seed=0)
saes["ReLU + L1"], _ = train_sae(store, d_sae, "relu", n_tokens=epochs * store.n_train,
                                 batch_size=256 if QUICK else 1024, seed=0)
for name, sae in saes.items():
    F = np.asarray(sae.encode(X_hold))
    print(f"{name:<12} FVU {fvu(X_hold, np.asarray(sae.decode(F))):.3f}  L0 {l0(F):6.1f}  "
          f"dead {dead_fraction(F):.1%}")

# %% [markdown]
# The amortization gap: the encoder is one matrix product and a nonlinearity; the solver
# optimises the codes for the same decoder. The gap in objective is what the encoder leaves on
# the table (it is non-negative up to the solver's tolerance).

# %%
n_gap = min(128 if QUICK else 512, X_hold.shape[0])
for name, sae in saes.items():
    g = amortization_gap(sae, X_hold[:n_gap], max_iter=300 if QUICK else 2000)
    print(f"{name:<12} {g['method'].upper():<5} SAE objective {g['sae_objective']:.4g}, solver "
          f"{g['solver_objective']:.4g} (relative gap {g['relative_gap']:.3f}); FVU {g['sae_fvu']:.3f} -> "
          f"{g['solver_fvu']:.3f}")
    assert g["objective_gap"] >= -1e-3 * abs(g["sae_objective"])

# %% [markdown]
# The feature browser: open `index.html` from disk. Each feature has its top-activating
# contexts (activating token highlighted), examples across activation quantiles, the logit lens
# (tokens the decoder direction promotes and suppresses through the unembedding), and its
# nearest neighbours by decoder cosine.

# %%
from sparsecode.features import collect_feature_stats, feature_contexts
from sparsecode.report import build_report

sae = saes["TopK (k=32)"]
index = build_report(sae, raw, work / "browser", max_features=8 if QUICK else 50,
                     tsne_max_atoms=150 if QUICK else 1000)
print("feature browser:", index.resolve().as_uri())
stats = collect_feature_stats(raw, sae.encode, n_top=3)
for j in np.argsort(-stats.counts)[5:8]:
    ctx = feature_contexts(raw, stats.top_rows[j][:1])[0]
    if ctx is not None:
        toks = ctx["tokens"]
        h = ctx["highlight"]
        print(f"feature {j}: ...{''.join(toks[:h])}[[{toks[h]}]]{''.join(toks[h + 1:])}...")
