"""Many models at once: ``K`` networks trained in one compiled program with ``jax.vmap``.

The lecture tunes hyperparameters on the validation set. Small networks leave most of a
machine idle, so instead of ``K`` runs one after another, :func:`fit_many` stacks ``K``
parameter sets, optimizer states, keys and :class:`~jbackprop.Model` hyperparameters along a
leading axis and vmaps :func:`jbackprop.training.run_epoch`, the very epoch :func:`jbackprop.fit`
runs, over them. The models share the architecture (sizes, activations, cost); they may
differ in seed (initialisation, shuffles, dropout masks), learning rate ``eta`` (carried in
the optimizer state by ``optax.inject_hyperparams``), ``lmbda`` (L2), ``l1`` and dropout
rate, which are traced values of the stacked ``Model``.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import Array

from jbackprop import checks
from jbackprop.model import Model, Params, architecture
from jbackprop.network import init_params
from jbackprop.training.compiled import cached
from jbackprop.training.epoch import run_epoch
from jbackprop.training.loop import check_fit_args, check_optimizer
from jbackprop.training.metrics import evaluation

__all__ = ["fit_many"]

_COMPILED: OrderedDict[Any, tuple[Callable, Callable]] = OrderedDict()


def _compiled(optimizer: optax.GradientTransformation, batch_size: int, shared_shuffle: bool):
    """The vmapped epoch and evaluation for these settings, built once (the last 16 kept)."""
    one_epoch = partial(run_epoch, optimizer=optimizer, batch_size=batch_size)

    def epoch(params, opt_state, models, X, Y, keys, n):
        perm_keys, drop_keys = jax.vmap(jax.random.split, out_axes=1)(keys)
        if shared_shuffle:
            # One minibatch for all models: their first-layer products (x Wᵀ and δᵀ x)
            # become single, K times wider matrix products.
            perm, axis = jax.random.permutation(perm_keys[0], X.shape[0]), None
        else:
            perm, axis = jax.vmap(lambda k: jax.random.permutation(k, X.shape[0]))(perm_keys), 0
        many = jax.vmap(one_epoch, in_axes=(0, 0, 0, None, None, axis, 0, None))
        return many(params, opt_state, models, X, Y, perm, drop_keys, n)

    def build() -> tuple[Callable, Callable]:
        evaluate = jax.vmap(evaluation, in_axes=(0, None, None, None, 0, None))
        return jax.jit(epoch), jax.jit(evaluate)

    return cached(_COMPILED, (optimizer, batch_size, shared_shuffle), build, size=16)


def _per_model(name: str, value, k: int, default: float, low: float, high: float | None):
    values = np.asarray(default if value is None else value, float)
    if values.shape not in ((), (k,)) or not np.all(np.isfinite(values)):
        raise ValueError(f"{name} must be a number or {k} finite numbers, got {value!r}")
    values = np.broadcast_to(values, (k,))
    if np.any(values < low) or (high is not None and np.any(values >= high)):
        upper = f" and < {high}" if high is not None else ""
        raise ValueError(f"{name} values must be >= {low}{upper}, got {values.tolist()}")
    return values


def fit_many(
    keys: Array,
    model: Model,
    train: tuple[Array, Array],
    epochs: int,
    batch_size: int,
    *,
    eta: float | Sequence[float],
    lmbda: float | Sequence[float] | None = None,
    l1: float | Sequence[float] | None = None,
    dropout: float | Sequence[float] | None = None,
    optimizer: Callable[..., optax.GradientTransformation] = optax.sgd,
    validation: tuple[Array, Array] | None = None,
    scheme: str = "scaled",
    n: int | None = None,
    shared_shuffle: bool = True,
) -> tuple[Params, list[list[dict[str, float]]]]:
    """Train ``K = len(keys)`` models of one architecture at once; return stacked params.

    Each model's training is exactly :func:`jbackprop.fit` with
    ``optax.inject_hyperparams(optimizer)(learning_rate=eta[k])``, the model's
    hyperparameters and key ``split(keys[k])[1]`` (with ``shared_shuffle=False``; with the
    shared shuffle, model 0's), because both run the same epoch function. ``eta``,
    ``lmbda``, ``l1`` and ``dropout`` are traced, so another grid of values reuses the
    compiled epoch; the architecture is static. Dropout is switched on for all models when
    any of them has a rate above 0 (a rate of 0 then keeps every unit).

    Args:
      keys: ``K`` PRNG keys (e.g. ``jax.random.split(key, K)``); model ``k`` is initialised
        from ``split(keys[k])[0]``; the other half drives its shuffles and dropout masks.
      model: the shared architecture; its ``l2``, ``l1`` and ``dropout`` are the defaults
        for ``lmbda``, ``l1`` and ``dropout``.
      train: ``(X, Y)``, inputs ``(n, n_0)`` and labels ``(n,)`` or targets ``(n, n_L)``.
      epochs, batch_size: as for :func:`jbackprop.fit`.
      eta, lmbda, l1, dropout: one value for all models or one per model (``lmbda`` is the
        L2 strength, the model's ``l2``).
      optimizer: an Optax constructor taking ``learning_rate`` (``optax.sgd``,
        ``optax.adam``, ``functools.partial(optax.sgd, momentum=0.9)``, ...).
      validation: optional ``(X, Y)`` evaluated every epoch for every model.
      scheme: the initialisation, as for :func:`jbackprop.init_params`; the parameters
        are ``float32``.
      n: the training-set size of eqs 12-15; defaults to the number of training examples.
      shared_shuffle: all models see the same minibatches (the shuffle of model 0's key),
        which lets XLA merge their first-layer products and is much faster on CPUs;
        ``False`` gives every model its own shuffle, so that model ``k`` equals
        :func:`jbackprop.fit` with its own key.

    Returns:
      ``(params, histories)``. ``params`` is a tuple with one ``{"w": (K, n_l, n_{l-1}),
      "b": (K, n_l)}`` dict per layer, ``float32``: every leaf has a leading axis ``K``
      (``jax.tree.map(lambda x: x[k], params)`` is model ``k``). ``histories[k]`` is model
      ``k``'s list of per-epoch records, as :func:`jbackprop.fit` returns them
      (``epoch``, ``train_cost``, ``train_accuracy``, ``val_cost`` and ``val_accuracy``
      with validation, and ``seconds``, the epoch's time for all ``K`` models together).

    Raises:
      ValueError: ``keys`` is empty; a hyperparameter has neither one nor ``K`` values or
        is out of range (``eta > 0``, ``0 <= dropout < 1``); the data or ``epochs``,
        ``batch_size`` or ``n`` are invalid, as :func:`jbackprop.fit` checks them.
    """
    keys = jnp.asarray(keys)
    k = keys.shape[0] if keys.ndim else 0
    if k < 1:
        raise ValueError(f"keys must hold one PRNG key per model, got shape {keys.shape}")
    check_optimizer(optimizer(learning_rate=0.1))
    hyper = {
        "eta": _per_model("eta", eta, k, 0.0, 0.0, None),
        "lmbda": _per_model("lmbda", lmbda, k, model.l2, 0.0, None),
        "l1": _per_model("l1", l1, k, model.l1, 0.0, None),
        "dropout": _per_model("dropout", dropout, k, model.dropout, 0.0, 1.0),
    }
    if np.any(hyper["eta"] <= 0):
        raise ValueError(f"eta values must be > 0, got {hyper['eta'].tolist()}")
    # Dropout is on (static) when any model uses it; a rate of 0 then keeps every unit.
    shared = architecture(model, dropout=bool(hyper["dropout"].any()))
    init_keys, train_keys = jax.vmap(jax.random.split, out_axes=1)(keys)
    # jb.init_params once per model, stacked: its compiled draws serve every K and every
    # other call of these shapes (a vmap would compile batched draws for each K).
    params = jax.tree.map(
        lambda *leaves: jnp.stack(leaves), *(init_params(kk, shared, scheme) for kk in init_keys)
    )
    first = jax.tree.map(lambda x: x[0], params)
    tr = checks.prepare(first, shared, train, "train")
    val = None if validation is None else checks.prepare(first, shared, validation, "validation")
    epochs, batch_size = check_fit_args(tr, epochs, batch_size)
    n = tr.n if n is None else n
    checks.check_n(n, model)
    dtype = tr.X.dtype
    models = jax.tree.unflatten(
        jax.tree.structure(shared),
        [jnp.asarray(hyper[name], dtype) for name in ("lmbda", "l1", "dropout")],
    )
    # The learning rate lives in the optimizer state, so one optimizer serves every model.
    injected = optax.inject_hyperparams(optimizer)
    opt_state = jax.vmap(lambda p, lr: injected(learning_rate=lr).init(p))(
        params, jnp.asarray(hyper["eta"], dtype)
    )
    epoch_fn, evaluate = _compiled(injected(learning_rate=0.1), batch_size, bool(shared_shuffle))
    histories: list[list[dict[str, float]]] = [[] for _ in range(k)]
    for e in range(1, epochs + 1):
        start = time.perf_counter()
        epoch_keys = jax.vmap(lambda kk, e=e: jax.random.fold_in(kk, e))(train_keys)
        params, opt_state = epoch_fn(params, opt_state, models, tr.X, tr.Y, epoch_keys, n)
        c, acc, _ = evaluate(params, tr.X, tr.Y, tr.labels, models, n)
        recs = [{"epoch": e, "train_cost": c, "train_accuracy": acc}]
        if val is not None:
            vc, vacc, _ = evaluate(params, val.X, val.Y, val.labels, models, n)
            recs.append({"val_cost": vc, "val_accuracy": vacc})
        recs = jax.device_get(recs)
        seconds = time.perf_counter() - start
        for i in range(k):
            rec = {name: _item(v, i) for r in recs for name, v in r.items()}
            histories[i].append(rec | {"seconds": seconds})
    return params, histories


def _item(value, i: int):
    return value if isinstance(value, int) else float(value[i])
