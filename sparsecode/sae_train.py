"""Training sparse autoencoders: Adam on the array API, data stream, schedules, checkpoints.

:func:`train_sae` trains any encoder of :mod:`sparsecode.sae` on an
:class:`~sparsecode.store.ActivationStore` (streamed) or an in-memory array, with hand-written
gradients (:func:`sparsecode.sae.loss_and_grad`) and this recipe:

* Adam (Kingma & Ba) with bias correction; global gradient-norm clipping (``grad_clip``);
* learning rate: linear warm-up over ``lr_warmup_steps``, constant, then linear decay to 0
  over the last ``lr_decay_fraction`` of the steps;
* penalty ``lam`` (L1/L0 family) ramped linearly from 0 over ``penalty_warmup_steps``;
* decoder rows at unit norm where the variant calls for it (see ``UNIT_NORM_ARCHITECTURES``):
  the gradient component along each row is removed before the step and rows renormalised
  after it; ``relu_april`` leaves the norms free (they enter its penalty);
* ``b_dec`` initialised at the geometric median (Weiszfeld) or the mean of a data sample;
  ``W_enc = W_dec.T``;
* dead latents: tokens since each latent last fired; a latent is dead after ``dead_tokens``;
  the TopK family adds AuxK on them (``aux_coefficient``, ``k_aux``);
* BatchTopK keeps an exponential moving average of the smallest kept activation as its
  inference threshold;
* a tqdm bar with FVU, L0 and dead fraction; checkpoints every ``checkpoint_every`` steps
  (parameters, Adam moments and step, dead counters, threshold, data position, log), written
  atomically, and exact resume: a resumed run gives bit-identical weights to an uninterrupted
  one on the same machine.

Determinism: there is no random state besides the seed. The initial decoder is drawn from
``seed``; epoch ``e`` visits the rows in the order drawn from ``(seed, e)``; so the state at
step ``t`` is a function of the seed and the data, and a checkpoint only needs the data
position (epoch, batches consumed in it). Runs repeat bit for bit with the same number of
threads; MP-SAE's NumPy backward sums its decoder gradient in one accumulator per thread, so
with another thread count its weights differ by rounding.

Non-finite input: a batch containing NaN or Inf is never trained on. With ``on_nan="skip"``
(default) it is skipped, counted in ``log["n_skipped_batches"]`` and a ``RuntimeWarning`` is
issued; with ``on_nan="raise"`` a ``ValueError`` names the step and batch. A loss or gradient
that becomes non-finite on finite data (divergence) raises ``FloatingPointError``.
An :class:`~sparsecode.store.ActivationStore` opened with ``check_finite=True`` (its default)
already refuses non-finite rows when it reads them (``ValueError``); open it with
``check_finite=False`` to have such batches skipped here instead.
"""

from __future__ import annotations

import json
import math
import os
import warnings

import numpy as np

from .backend import array_namespace, asarray_like, check_scalar, get_kernel, register_kernel, to_numpy

__all__ = ["train_sae", "training_step", "Adam", "geometric_median", "configure_parser", "run_cli"]

_DEFAULT_LR = 4e-4
_DEFAULT_PENALTY = {"relu": 5.0, "relu_april": 5.0, "jumprelu": 0.5, "lista": 5.0}


# =========================================================================== Adam
class Adam:
    """Adam with bias correction, on dicts of arrays of any array-API namespace.

    ``m <- b1 m + (1 - b1) g``; ``v <- b2 v + (1 - b2) g^2``;
    ``p <- p - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)``.
    """

    def __init__(self, params, *, betas=(0.9, 0.999), eps=1e-8):
        b1, b2 = betas
        self.b1 = check_scalar(b1, "beta1", low=0)
        self.b2 = check_scalar(b2, "beta2", low=0)
        if self.b1 >= 1 or self.b2 >= 1:
            raise ValueError(f"Adam betas must be in [0, 1), got {betas!r}")
        self.eps = check_scalar(eps, "eps", low=0, low_inclusive=False)
        xp = array_namespace(*params.values())
        self.m = {k: xp.zeros_like(v) for k, v in params.items()}
        self.v = {k: xp.zeros_like(v) for k, v in params.items()}
        self.t = 0

    def step(self, params, grads, lr):
        """Update ``params`` in place (the dict's entries are replaced); returns it."""
        self.t += 1
        c1 = 1.0 - self.b1 ** self.t
        c2 = 1.0 - self.b2 ** self.t
        xp = array_namespace(*params.values())
        kern = get_kernel("adam_update", xp)
        for k, g in grads.items():
            if g is None:
                continue
            if kern is not None:
                new = kern(params[k], g, self.m[k], self.v[k], self.b1, self.b2, lr / c1, c2, self.eps)
                if new is not None:  # the kernel updated m and v in place
                    params[k] = new
                    continue
            self.m[k] = self.b1 * self.m[k] + (1.0 - self.b1) * g
            self.v[k] = self.b2 * self.v[k] + (1.0 - self.b2) * (g * g)
            params[k] = params[k] - (lr / c1) * self.m[k] / (xp.sqrt(self.v[k] / c2) + self.eps)
        return params


@register_kernel("adam_update", "numpy")
def _adam_update_np(p, g, m, v, b1, b2, step, c2, eps):
    """The portable update above in one fused pass (Numba), bit for bit: the same operations
    in the same order and precision, the Python scalars cast to the arrays' dtype as NumPy
    does. Updates ``m`` and ``v`` in place and returns the new parameter (a new array, as the
    portable code makes). ``None`` (portable code) for anything but matching contiguous
    float arrays of one dtype."""
    dt = p.dtype
    if not (dt in (np.float32, np.float64) and g.dtype == dt and m.dtype == dt and v.dtype == dt
            and p.shape == g.shape == m.shape == v.shape and p.size >= 4096
            and all(a.flags.c_contiguous for a in (p, g, m, v)) and m.flags.writeable and v.flags.writeable):
        return None
    from ._sae_numba import adam_update

    c = dt.type
    out = np.empty_like(p)
    adam_update(p.reshape(-1), g.reshape(-1), m.reshape(-1), v.reshape(-1), c(b1), c(1.0 - b1), c(b2), c(1.0 - b2),
                c(step), c(c2), c(eps), out.reshape(-1))
    return out


# =========================================================================== helpers
def geometric_median(X, *, n_iter=100, tol=1e-7):
    """Geometric median of the rows of ``X (n, d)`` by Weiszfeld's iteration, from the mean.

    Minimises ``sum_i ||x_i - y||``: ``y <- sum_i w_i x_i / sum_i w_i`` with
    ``w_i = 1 / max(||x_i - y||, tiny)``, until ``y`` moves by less than ``tol * (1 + ||y||)``.
    """
    xp = array_namespace(X)
    y = xp.mean(X, axis=0)
    tiny = 1e-12
    for _ in range(n_iter):
        d = xp.sqrt(xp.sum((X - y) ** 2, axis=1))
        w = 1.0 / xp.maximum(d, xp.full_like(d, tiny))
        y_new = xp.sum(w[:, None] * X, axis=0) / xp.sum(w)
        moved = float(xp.sqrt(xp.sum((y_new - y) ** 2)))
        y = y_new
        if moved <= tol * (1.0 + float(xp.sqrt(xp.sum(y * y)))):
            break
    return y


class _ArraySource:
    """An in-memory array as a batch source (what the activation store does for files)."""

    def __init__(self, X):
        self.X = X
        self.n_rows = int(X.shape[0])
        self.d_in = int(X.shape[1])
        self.norm_scale = 1.0

    def iter_batches(self, batch_size, *, shuffle=True, seed=0, drop_last=True, **_):
        xp = array_namespace(self.X)
        n = self.n_rows
        order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
        stop = n - (n % batch_size) if drop_last else n
        for s in range(0, stop, batch_size):
            idx = order[s:s + batch_size]
            if shuffle:
                yield xp.take(self.X, asarray_like(idx, self.X, dtype=_int_dtype(xp)), axis=0)
            else:
                yield self.X[s:s + batch_size, ...]


def _int_dtype(xp):
    return xp.int64


def _source(data):
    """(source, xp) for an ActivationStore-like object or an array."""
    if hasattr(data, "iter_batches"):
        return data, None
    if isinstance(data, (list, tuple)):
        data = np.asarray(data)
    import array_api_compat

    if not array_api_compat.is_array_api_obj(data):
        raise TypeError(f"data must be an ActivationStore or an array (n_rows, d_in), got {type(data).__name__}")
    if data.ndim != 2:
        raise ValueError(f"data must be 2-D (n_rows, d_in), got shape {tuple(data.shape)}")
    if any(int(s) == 0 for s in data.shape):
        raise ValueError(f"data must not be empty, got shape {tuple(data.shape)}")
    xp = array_namespace(data)
    if data.dtype not in (xp.float32, xp.float64):
        raise TypeError(f"data must be float32 or float64, got dtype {data.dtype}; convert it explicitly")
    return _ArraySource(data), xp


def _store_batches(src, batch_size, seed, epoch, skip, xp):
    """Batches of epoch ``epoch`` after skipping ``skip`` of them."""
    kwargs = dict(shuffle=True, seed=[int(seed), int(epoch)] if isinstance(src, _ArraySource) else
                  int(seed) * 1_000_003 + int(epoch), drop_last=True)
    if not isinstance(src, _ArraySource):
        kwargs["split"] = "train"
        if xp is not None:
            kwargs["xp"] = xp
    it = src.iter_batches(batch_size, **kwargs)
    for i, B in enumerate(it):
        if i < skip:
            continue
        yield B


def _lr_at(step, n_steps, lr, warmup, decay_fraction):
    f = 1.0
    if warmup and step < warmup:
        f = (step + 1) / warmup
    n_decay = int(round(decay_fraction * n_steps))
    if n_decay and step >= n_steps - n_decay:
        f = min(f, (n_steps - step) / n_decay)
    return lr * f


# =========================================================================== checkpoints
def _save_checkpoint(folder, sae, opt, state, log):
    """Atomically write the full training state to ``folder/checkpoint``."""
    os.makedirs(folder, exist_ok=True)
    arrays = {}
    for k, v in sae.params.items():
        arrays["param." + k] = to_numpy(v)
        arrays["adam_m." + k] = to_numpy(opt.m[k])
        arrays["adam_v." + k] = to_numpy(opt.v[k])
    arrays["since_fired"] = to_numpy(state["since_fired"])
    tmp = os.path.join(folder, "checkpoint.npz.tmp.npz")
    np.savez(tmp, **arrays)
    meta = {
        "step": state["step"], "epoch": state["epoch"], "batch_in_epoch": state["batch_in_epoch"],
        "adam_t": opt.t, "batch_threshold": sae.batch_threshold, "tokens": state["tokens"],
        "n_skipped": state["n_skipped"], "config": state["config"], "log": log,
    }
    tmpj = os.path.join(folder, "checkpoint.json.tmp")
    with open(tmpj, "w") as fh:
        json.dump(meta, fh)
    # arrays first, then the json that points at them: a reader never sees a half checkpoint
    os.replace(tmp, os.path.join(folder, "checkpoint.npz"))
    os.replace(tmpj, os.path.join(folder, "checkpoint.json"))


def _load_checkpoint(folder):
    jpath = os.path.join(folder, "checkpoint.json")
    if not os.path.isfile(jpath):
        return None
    with open(jpath) as fh:
        meta = json.load(fh)
    with np.load(os.path.join(folder, "checkpoint.npz")) as z:
        arrays = {k: z[k] for k in z.files}
    return meta, arrays


# =========================================================================== training
def train_sae(data, d_sae, architecture="topk", k=32, *, n_tokens=None, n_steps=None, batch_size=4096,
              lr=None, l1_coefficient=None, penalty_warmup_steps=None, lr_warmup_steps=0,
              lr_decay_fraction=0.2, betas=(0.9, 0.999), adam_eps=1e-8, grad_clip=1.0,
              aux_coefficient=1.0 / 32, k_aux=None, dead_tokens=None, afa_coefficient=1.0 / 32,
              bandwidth=0.001, initial_threshold=None, lista_steps=3, lista_fista=False, mp_tol=None,
              b_dec_init="geometric_median", init_samples=4096, threshold_momentum=0.99, seed=0,
              xp=None, dtype=None, checkpoint=None, checkpoint_every=None, resume=True, progress=False,
              on_nan="skip", callback=None, log_every=1, metadata=None):
    """Train a sparse autoencoder; returns ``(sae, log)``.

    Parameters
    ----------
    data : ActivationStore (anything with ``iter_batches``) or array (n_rows, d_in)
        Arrays are kept in their namespace (NumPy, CuPy, ...); stores yield batches in ``xp``
        (NumPy by default). Training uses the store's ``train`` split.
    d_sae : int, number of latents
    architecture : one of :data:`sparsecode.sae.ARCHITECTURES`
    k : active latents per row (TopK family; matching-pursuit steps for ``mpsae``)
    n_tokens, n_steps : training length (one of them; ``n_steps = n_tokens // batch_size``);
        default one pass over the data
    batch_size : rows per step (capped at the number of rows)
    lr : Adam learning rate (default 4e-4)
    l1_coefficient : penalty ``lam`` (L1 for ``relu``/``relu_april``/``lista``, L0 for
        ``jumprelu``); defaults assume inputs with ``E||x||^2 ~ d_in``
    penalty_warmup_steps : linear ramp of ``lam`` (default 5% of the steps)
    lr_warmup_steps, lr_decay_fraction : learning-rate schedule (see module docstring)
    grad_clip : clip the global gradient norm to this (None: no clipping)
    aux_coefficient, k_aux, dead_tokens : AuxK weight, latents it uses (default d_in // 2),
        tokens without firing after which a latent is dead (default
        ``min(10_000_000, max(total_tokens // 10, 10 * batch_size))``)
    afa_coefficient : weight of the AFA loss (``topafa``)
    bandwidth, initial_threshold : JumpReLU kernel width and starting threshold
    lista_steps, lista_fista : LISTA unrolled steps and momentum
    mp_tol : MP-SAE residual threshold (stop a row once ``||r||^2 <= mp_tol``)
    b_dec_init : "geometric_median", "mean" or "zeros", from ``init_samples`` rows
    threshold_momentum : EMA factor of BatchTopK's threshold
    seed : everything random (initial decoder, data order) derives from it
    xp, dtype : namespace for store batches; dtype of the model (default: the data's)
    checkpoint : folder for checkpoints; with ``resume`` an existing checkpoint there is
        continued (its configuration must match) and the final model is saved there too
    checkpoint_every : steps between checkpoints
    progress : tqdm bar with FVU, L0 and dead fraction
    on_nan : "skip" or "raise" for batches with NaN/Inf (see module docstring)
    callback : called as ``callback(step, sae, log)`` after each step; returning True stops
        training (a checkpoint is written first when ``checkpoint`` is set)
    log_every : record the log every this many steps

    Returns
    -------
    sae : SparseAutoencoder
    log : dict of lists ``step``, ``loss``, ``mse``, ``fvu``, ``l0``, ``dead_fraction``, ``lr``,
        ``penalty``, ``aux_loss``, plus ``n_skipped_batches``, ``tokens``, ``steps_done``,
        ``stopped_early``, ``resumed_from``.
    """
    from . import sae as sae_mod

    arch = sae_mod.canonical_architecture(architecture)
    src, data_xp = _source(data)
    if xp is None:
        xp = data_xp
    d_in = int(src.d_in)
    n_rows = int(getattr(src, "n_train", None) or getattr(src, "n_rows", 0) or len(src))
    d_sae = check_scalar(d_sae, "d_sae", low=1, integer=True)
    batch_size = check_scalar(batch_size, "batch_size", low=1, integer=True)
    batch_size = min(batch_size, n_rows)
    if arch in sae_mod.K_ARCHITECTURES:
        k = check_scalar(k, "k", low=1, integer=True)
        if k > d_sae:
            raise ValueError(f"k must be <= d_sae ({d_sae}), got {k}")
    if n_steps is None:
        n_steps = (n_tokens // batch_size) if n_tokens is not None else max(n_rows // batch_size, 1)
    n_steps = check_scalar(n_steps, "n_steps", low=1, integer=True)
    lr = _DEFAULT_LR if lr is None else check_scalar(lr, "lr", low=0, low_inclusive=False)
    lam = None
    if arch in sae_mod.PENALTY_ARCHITECTURES:
        lam = _DEFAULT_PENALTY[arch] if l1_coefficient is None else check_scalar(l1_coefficient, "l1_coefficient", low=0)
    if penalty_warmup_steps is None:
        penalty_warmup_steps = int(0.05 * n_steps)
    penalty_warmup_steps = check_scalar(penalty_warmup_steps, "penalty_warmup_steps", low=0, integer=True)
    lr_warmup_steps = check_scalar(lr_warmup_steps, "lr_warmup_steps", low=0, integer=True)
    lr_decay_fraction = check_scalar(lr_decay_fraction, "lr_decay_fraction", low=0)
    if lr_decay_fraction > 1:
        raise ValueError(f"lr_decay_fraction must be in [0, 1], got {lr_decay_fraction}")
    if grad_clip is not None:
        grad_clip = check_scalar(grad_clip, "grad_clip", low=0, low_inclusive=False)
    aux_coefficient = check_scalar(aux_coefficient, "aux_coefficient", low=0)
    afa_coefficient = check_scalar(afa_coefficient, "afa_coefficient", low=0)
    if dead_tokens is None:
        dead_tokens = min(10_000_000, max((n_steps * batch_size) // 10, 10 * batch_size))
    dead_tokens = check_scalar(dead_tokens, "dead_tokens", low=1, integer=True)
    if on_nan not in ("skip", "raise"):
        raise ValueError(f"on_nan must be 'skip' or 'raise', got {on_nan!r}")
    if b_dec_init not in ("geometric_median", "mean", "zeros"):
        raise ValueError(f"b_dec_init must be 'geometric_median', 'mean' or 'zeros', got {b_dec_init!r}")
    if checkpoint_every is not None:
        checkpoint_every = check_scalar(checkpoint_every, "checkpoint_every", low=1, integer=True)
    if callback is not None and not callable(callback):
        raise TypeError("callback must be callable")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")

    # a first batch tells the namespace and dtype of what the store yields
    first = next(iter(_store_batches(src, min(batch_size, n_rows), seed, 0, 0, xp)))
    bxp = array_namespace(first)
    if dtype is None:
        dtype = first.dtype
    dt_name = "float64" if dtype == bxp.float64 else "float32"
    norm_scale = float(getattr(src, "norm_scale", 1.0) or 1.0)
    config = {"architecture": arch, "d_in": d_in, "d_sae": d_sae, "k": k if arch in sae_mod.K_ARCHITECTURES else None,
              "n_steps": n_steps, "batch_size": batch_size, "lr": lr, "l1_coefficient": lam, "seed": int(seed),
              "dtype": dt_name, "lista_steps": lista_steps, "lista_fista": bool(lista_fista)}

    # ---------------------------------------------------------------- init or resume
    resumed = None
    ck = _load_checkpoint(checkpoint) if (checkpoint is not None and resume) else None
    opts = dict(bandwidth=bandwidth, lista_steps=lista_steps, lista_fista=lista_fista, mp_tol=mp_tol,
                metadata=metadata)
    if ck is not None:
        meta, arrays = ck
        if meta["config"] != config:
            diff = {key: (meta["config"].get(key), config.get(key)) for key in config
                    if meta["config"].get(key) != config.get(key)}
            raise ValueError(f"checkpoint in {checkpoint!r} was made with other settings {diff}; "
                             "use another folder or resume=False")
        conv = lambda a: asarray_like(a, first, dtype=first.dtype if dtype is None else dtype)  # noqa: E731
        P = {key[6:]: conv(v) for key, v in arrays.items() if key.startswith("param.")}
        model = sae_mod.SparseAutoencoder(P["W_enc"], P["b_enc"], P["W_dec"], P["b_dec"], architecture=arch,
                                          k=config["k"], log_threshold=P.get("log_threshold"), l1_coefficient=lam,
                                          batch_threshold=meta["batch_threshold"], **opts)
        opt = Adam(model.params, betas=betas, eps=adam_eps)
        opt.m = {key[7:]: conv(v) for key, v in arrays.items() if key.startswith("adam_m.")}
        opt.v = {key[7:]: conv(v) for key, v in arrays.items() if key.startswith("adam_v.")}
        opt.t = int(meta["adam_t"])
        state = {"step": meta["step"], "epoch": meta["epoch"], "batch_in_epoch": meta["batch_in_epoch"],
                 "tokens": meta["tokens"], "n_skipped": meta["n_skipped"],
                 "since_fired": asarray_like(arrays["since_fired"], first, dtype=bxp.int64)}
        log = meta["log"]
        resumed = state["step"]
    else:
        sample = _init_sample(src, init_samples, seed, xp, bxp)
        if dtype != sample.dtype:
            sample = bxp.astype(sample, dtype)
        if b_dec_init == "geometric_median":
            b0 = geometric_median(sample)
        elif b_dec_init == "mean":
            b0 = bxp.mean(sample, axis=0)
        else:
            b0 = bxp.zeros((d_in,), dtype=dtype)
        init_thr = initial_threshold if initial_threshold is not None else 0.001
        model = sae_mod.SparseAutoencoder.initialize(
            d_in, d_sae, arch, k=config["k"], seed=seed, like=bxp.zeros((1,), dtype=dtype),
            b_dec=to_numpy(b0), l1_coefficient=lam, initial_threshold=init_thr, **opts)
        opt = Adam(model.params, betas=betas, eps=adam_eps)
        state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "tokens": 0, "n_skipped": 0,
                 "since_fired": bxp.zeros((d_sae,), dtype=bxp.int64)}
        log = {key: [] for key in ("step", "loss", "mse", "fvu", "l0", "dead_fraction", "lr", "penalty", "aux_loss")}
    state["config"] = config
    model.input_scale = 1.0  # trained in the store's units; the scale is set at the end

    unit_norm = arch in sae_mod.UNIT_NORM_ARCHITECTURES
    if unit_norm and ck is None:
        _renormalise(model, bxp)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_steps, initial=state["step"], desc=f"train {arch}", unit="step")
    stopped = False
    fvu_ema = None
    try:
        while state["step"] < n_steps and not stopped:
            batches = _store_batches(src, batch_size, seed, state["epoch"], state["batch_in_epoch"], xp)
            got_any = False
            for B in batches:
                got_any = True
                state["batch_in_epoch"] += 1
                if B.dtype != dtype:
                    B = bxp.astype(B, dtype)
                if not bool(bxp.all(bxp.isfinite(B))):
                    msg = (f"batch {state['batch_in_epoch'] - 1} of epoch {state['epoch']} (before step "
                           f"{state['step']}) contains NaN or Inf")
                    if on_nan == "raise":
                        raise ValueError(msg + "; it was not trained on")
                    state["n_skipped"] += 1
                    warnings.warn(msg + "; skipped (not trained on)", RuntimeWarning, stacklevel=2)
                    continue
                step = state["step"]
                pen = lam
                if lam is not None and penalty_warmup_steps and step < penalty_warmup_steps:
                    pen = lam * (step + 1) / penalty_warmup_steps
                dead = state["since_fired"] >= dead_tokens
                cur_lr = _lr_at(step, n_steps, lr, lr_warmup_steps, lr_decay_fraction)
                loss, st = training_step(
                    model, opt, B, cur_lr, penalty=pen, dead_mask=dead, aux_coefficient=aux_coefficient,
                    k_aux=k_aux, afa_coefficient=afa_coefficient if arch == "topafa" else 0.0, grad_clip=grad_clip,
                    step=step)
                n = B.shape[0]
                state["since_fired"] = bxp.where(st["fired"], bxp.zeros_like(state["since_fired"]),
                                                 state["since_fired"] + n)
                if arch == "batchtopk" and "min_kept" in st:
                    mk = st["min_kept"]
                    model.batch_threshold = mk if model.batch_threshold is None else (
                        threshold_momentum * model.batch_threshold + (1 - threshold_momentum) * mk)
                state["tokens"] += n
                state["step"] += 1
                fvu_b = st["sse"] / st["sst"] if st["sst"] > 0 else float("nan")
                dead_frac = float(bxp.mean(bxp.astype(state["since_fired"] >= dead_tokens, dtype)))
                if state["step"] % log_every == 0 or state["step"] == n_steps:
                    for key, v in (("step", state["step"]), ("loss", loss), ("mse", st["mse"]), ("fvu", fvu_b),
                                   ("l0", st["l0"]), ("dead_fraction", dead_frac), ("lr", cur_lr),
                                   ("penalty", 0.0 if pen is None else pen), ("aux_loss", st["aux_loss"])):
                        log[key].append(v)
                if bar is not None:
                    fvu_ema = fvu_b if fvu_ema is None else 0.9 * fvu_ema + 0.1 * fvu_b
                    bar.update(1)
                    bar.set_postfix(fvu=f"{fvu_ema:.3f}", l0=f"{st['l0']:.1f}", dead=f"{dead_frac:.2f}")
                stop_user = bool(callback(state["step"], model, log)) if callback is not None else False
                done = state["step"] >= n_steps
                if checkpoint is not None and checkpoint_every and (
                        state["step"] % checkpoint_every == 0 or stop_user):
                    _save_checkpoint(checkpoint, model, opt, state, log)
                if stop_user:
                    stopped = True
                if stop_user or done:
                    break
            else:
                state["epoch"] += 1
                state["batch_in_epoch"] = 0
                if not got_any:
                    raise ValueError("the data yielded no batch: fewer rows than batch_size?")
    finally:
        if bar is not None:
            bar.close()
        sae_mod.release_buffers()  # MP-SAE's Gram scratch: not kept past training
    if state["n_skipped"]:
        warnings.warn(f"{state['n_skipped']} batch(es) with NaN/Inf were skipped", RuntimeWarning, stacklevel=2)
    model.input_scale = norm_scale
    model.metadata.setdefault("trained_tokens", state["tokens"])
    out_log = dict(log)
    out_log.update(n_skipped_batches=state["n_skipped"], tokens=state["tokens"], steps_done=state["step"],
                   stopped_early=stopped, resumed_from=resumed, dead_tokens=dead_tokens)
    if checkpoint is not None and not stopped:
        if checkpoint_every:
            model.input_scale = 1.0
            _save_checkpoint(checkpoint, model, opt, state, log)
            model.input_scale = norm_scale
        model.save(os.path.join(checkpoint, "final"))
    return model, out_log


def training_step(model, opt, B, lr, *, penalty=None, dead_mask=None, aux_coefficient=0.0, k_aux=None,
                  afa_coefficient=0.0, grad_clip=None, step=None):
    """One optimisation step of ``model`` on the batch ``B``: loss and hand-written gradient,
    the decoder-gradient projection (unit-norm variants), global-norm clipping, Adam, and
    the decoder renormalisation. Returns ``(loss, stats)``; raises ``FloatingPointError`` when
    the loss or gradient is not finite (nothing is updated then). This is the whole step of
    :func:`train_sae` (and what ``benchmarks/sae.py`` times)."""
    from . import sae as sae_mod

    xp = array_namespace(B)
    unit_norm = model.architecture in sae_mod.UNIT_NORM_ARCHITECTURES
    loss, G, st = sae_mod.loss_and_grad(model, B, penalty=penalty, aux_coefficient=aux_coefficient,
                                        dead_mask=dead_mask, k_aux=k_aux, afa_coefficient=afa_coefficient)
    if unit_norm:
        G["W_dec"] = _project_rows(G["W_dec"], model.params["W_dec"], xp)
    gnorm = math.sqrt(sum(_sumsq(g, xp) for g in G.values() if g is not None))
    if not (math.isfinite(loss) and math.isfinite(gnorm)):
        raise FloatingPointError(
            f"the loss or gradient became non-finite at step {step} on finite data "
            f"(loss={loss}, grad norm={gnorm}): lower lr or the penalty")
    if grad_clip is not None and gnorm > grad_clip:
        scale = grad_clip / gnorm
        G = {key: (g * scale if g is not None else None) for key, g in G.items()}
    opt.step(model.params, G, lr)
    if unit_norm:
        _renormalise(model, xp)
    return loss, st


def _project_rows(G, W, xp):
    """``G`` without its component along each row of ``W`` (unit rows): the tangent step."""
    kern = get_kernel("sae_project_rows", xp)
    if kern is not None:
        out = kern(G, W)
        if out is not None:
            return out
    return G - xp.sum(G * W, axis=1)[:, None] * W


def _sumsq(g, xp):
    kern = get_kernel("sae_sumsq", xp)
    if kern is not None:
        return kern(g)
    return float(xp.sum(g * g))


def _renormalise(model, xp):
    W = model.params["W_dec"]
    kern = get_kernel("sae_normalise_rows", xp)
    out = kern(W, 1e-12) if kern is not None else None
    if out is None:
        nrm = xp.sqrt(xp.sum(W * W, axis=1))
        out = W / xp.maximum(nrm, xp.full_like(nrm, 1e-12))[:, None]
    model.params["W_dec"] = out


def _rows_kernel_ok(*arrays):
    a0 = arrays[0]
    return (a0.ndim == 2 and a0.dtype in (np.float32, np.float64) and a0.size >= 4096
            and all(a.dtype == a0.dtype and a.shape == a0.shape and a.flags.c_contiguous for a in arrays))


@register_kernel("sae_project_rows", "numpy")
def _project_rows_np(G, W):
    # in place on G (the gradient is loss_and_grad's own temporary); one pass per row
    if not (_rows_kernel_ok(G, W) and G.flags.writeable):
        return None
    from ._sae_numba import project_rows

    return project_rows(G, W)


@register_kernel("sae_normalise_rows", "numpy")
def _normalise_rows_np(W, floor):
    if not _rows_kernel_ok(W):
        return None
    from ._sae_numba import normalise_rows

    return normalise_rows(W, W.dtype.type(floor), np.empty_like(W))


@register_kernel("sae_sumsq", "numpy")
def _sumsq_np(g):
    g = np.ascontiguousarray(g).reshape(-1)
    return float(np.dot(g, g))


def _init_sample(src, n, seed, xp, bxp):
    """Up to ``n`` finite rows drawn from the data (for the ``b_dec`` initialisation)."""
    n = max(1, min(int(n), int(getattr(src, "n_rows", n))))
    parts, got = [], 0
    kwargs = dict(shuffle=True, seed=[int(seed), 10**6] if isinstance(src, _ArraySource) else int(seed) + 7919,
                  drop_last=False)
    if not isinstance(src, _ArraySource):
        kwargs["split"] = "train"
        if xp is not None:
            kwargs["xp"] = xp
    for B in src.iter_batches(n, **kwargs):
        ok = bxp.all(bxp.isfinite(B), axis=1)
        B = B[ok, ...] if not bool(bxp.all(ok)) else B
        parts.append(B)
        got += B.shape[0]
        if got >= n:
            break
    if not got:
        raise ValueError("no finite rows in the data to initialise b_dec")
    S = bxp.concat(parts, axis=0) if len(parts) > 1 else parts[0]
    return S[:n, ...]


# =========================================================================== `sparsecode train`
def configure_parser(parser):
    """Options of ``sparsecode train``."""
    from .sae import ARCHITECTURES

    parser.add_argument("store", help="activation store: an extraction folder or a .npy/.npz/.safetensors file")
    parser.add_argument("--out", required=True, help="folder for the trained SAE (SAELens layout) and checkpoints")
    parser.add_argument("--architecture", default="topk", choices=list(ARCHITECTURES))
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--d-sae", type=int, default=None, help="number of latents")
    size.add_argument("--expansion", type=int, default=8, help="d_sae = expansion * d_in (default 8)")
    parser.add_argument("--k", type=int, default=32, help="active latents per row (TopK family, MP-SAE steps)")
    parser.add_argument("--l1", type=float, default=None, help="penalty coefficient (relu, relu_april, jumprelu, lista)")
    parser.add_argument("--n-tokens", type=int, default=None, help="training tokens (default: one pass)")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--normalize", action="store_true", help="scale activations to E||x||^2 = d_in")
    parser.add_argument("--checkpoint-every", type=int, default=500)
    parser.add_argument("--lista-steps", type=int, default=3)
    parser.add_argument("--no-progress", action="store_true")


def run_cli(args) -> int:
    """``sparsecode train``: train an SAE on a store and save it in SAELens' layout."""
    from .store import ActivationStore

    source = args.store if os.path.isdir(args.store) else [args.store]
    store = ActivationStore(source, normalize=bool(args.normalize), seed=args.seed)
    d_sae = args.d_sae if args.d_sae is not None else args.expansion * int(store.d_in)
    meta = {}
    man = getattr(store, "manifest", None) or {}
    for key_from, key_to in (("model", "model_name"), ("layer", "hook_name"), ("context_length", "context_size")):
        if key_from in man:
            meta[key_to] = man[key_from]
    sae, log = train_sae(store, d_sae, args.architecture, k=args.k, n_tokens=args.n_tokens,
                         batch_size=args.batch_size, lr=args.lr, l1_coefficient=args.l1, seed=args.seed,
                         checkpoint=args.out, checkpoint_every=args.checkpoint_every,
                         lista_steps=args.lista_steps, progress=not args.no_progress, metadata=meta)
    sae.save(args.out)
    fv = log["fvu"][-1] if log["fvu"] else float("nan")
    l0 = log["l0"][-1] if log["l0"] else float("nan")
    print(f"trained {args.architecture} SAE d_in={sae.d_in} d_sae={sae.d_sae} on {log['tokens']} tokens: "
          f"last-batch FVU {fv:.4f}, L0 {l0:.1f}; saved to {args.out}")
    return 0
