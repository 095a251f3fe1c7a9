"""Many models at once: ``K`` networks trained in one compiled program with ``jax.vmap``.

The lecture tunes hyperparameters on the validation set. Small networks leave most of a
machine idle, so instead of ``K`` runs one after another, :func:`fit_many` stacks ``K``
parameter sets, optimizer states and keys along a leading axis and vmaps the whole epoch
over them. The models share the architecture, activations and cost (the static parts of a
:class:`~jbackprop.Model`); they may differ in seed (initialisation, shuffles, dropout
masks), learning rate ``eta``, L2 ``lmbda`` and dropout rate, which enter as traced
numbers. Each model gets its own shuffle of the training set.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from functools import lru_cache

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import Array

from jbackprop import checks
from jbackprop.model import Model, Params
from jbackprop.network import backward, feedforward, init_params, mean_grads
from jbackprop.regularizers import l1_grad, l1_penalty
from jbackprop.training import _check_fit_args, _check_optimizer, _prepare

__all__ = ["fit_many"]


def _masks(key: Array, model: Model, rate: Array, m: int, dtype):
    """Inverted-dropout masks with a traced rate (``rate = 0`` keeps every unit)."""
    keep = 1.0 - rate

    def example(k):
        keys = jax.random.split(k, len(model.sizes) - 2)
        return [
            jax.random.bernoulli(kk, keep, (size,)).astype(dtype) / keep
            for kk, size in zip(keys, model.sizes[1:-1], strict=True)
        ]

    return jax.vmap(example)(jax.random.split(key, m))


def _grads(params, X, Y, model: Model, hyper, n, key):
    """Eqs 8-13 with this model's traced ``lmbda`` and dropout rate."""
    masks = None
    if model.dropout and model.num_layers > 1:
        masks = _masks(key, model, hyper["dropout"], X.shape[0], X.dtype)
    zs, acts = feedforward(params, X, model, masks)
    grads = mean_grads(acts, backward(params, zs, Y, model, masks))
    out = []
    for g, p in zip(grads, params, strict=True):
        w = g["w"] + (hyper["lmbda"] / n) * p["w"]
        if model.l1:
            w = w + l1_grad(p["w"], model.l1, n)
        out.append({"w": w, "b": g["b"]})
    return tuple(out)


def _evaluate(params, X, Y, labels, model: Model, hyper, n):
    zs, _ = feedforward(params, X, model)
    c = jnp.mean(model.cost.fn(zs[-1], Y, model.output))
    c = c + hyper["lmbda"] / (2.0 * n) * sum(jnp.sum(p["w"] ** 2) for p in params)
    if model.l1:
        c = c + l1_penalty(params, model.l1, n)
    return c, jnp.mean(jnp.argmax(zs[-1], axis=-1) == labels)


@lru_cache(maxsize=16)
def _compiled(model: Model, optimizer_factory, batch_size: int, shared_shuffle: bool):
    def one_model(params, opt_state, hyper, X, Y, perm, drop_key, n):
        optimizer = optax.inject_hyperparams(optimizer_factory)(learning_rate=hyper["eta"])
        steps, rem = divmod(X.shape[0], batch_size)
        step_keys = jax.random.split(drop_key, steps + 1)

        def step(carry, xs):
            params, opt_state = carry
            ids, k = xs
            g = _grads(params, X[ids], Y[ids], model, hyper, n, k)
            updates, opt_state = optimizer.update(g, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), None

        full = perm[: steps * batch_size].reshape(steps, batch_size)
        carry, _ = jax.lax.scan(step, (params, opt_state), (full, step_keys[:steps]))
        if rem:
            carry, _ = step(carry, (perm[steps * batch_size :], step_keys[steps]))
        return carry

    def epoch(params, opt_state, hyper, X, Y, keys, n):
        perm_keys, drop_keys = jax.vmap(jax.random.split, out_axes=1)(keys)
        if shared_shuffle:
            # One minibatch for all models: XLA then fuses their first-layer products
            # (x Wᵀ and δᵀ x) into single, K times wider matrix products.
            perm, axis = jax.random.permutation(perm_keys[0], X.shape[0]), None
        else:
            perm, axis = jax.vmap(lambda k: jax.random.permutation(k, X.shape[0]))(perm_keys), 0
        many = jax.vmap(one_model, in_axes=(0, 0, 0, None, None, axis, 0, None))
        return many(params, opt_state, hyper, X, Y, perm, drop_keys, n)

    def init(params, hyper):
        optimizer = optax.inject_hyperparams(optimizer_factory)(learning_rate=hyper["eta"])
        return optimizer.init(params)

    return (
        jax.jit(jax.vmap(init)),
        jax.jit(epoch),
        jax.jit(
            jax.vmap(_evaluate, in_axes=(0, None, None, None, None, 0, None)),
            static_argnums=4,
        ),
    )


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
    dropout: float | Sequence[float] | None = None,
    optimizer: Callable[..., optax.GradientTransformation] = optax.sgd,
    validation: tuple[Array, Array] | None = None,
    scheme: str = "scaled",
    n: int | None = None,
    shared_shuffle: bool = True,
) -> tuple[Params, list[list[dict[str, float]]]]:
    """Train ``K = len(keys)`` models of one architecture at once; return stacked params.

    Args:
      keys: ``K`` PRNG keys (e.g. ``jax.random.split(key, K)``); model ``k`` is initialised
        from ``split(keys[k])[0]``; the other half drives its shuffles and dropout masks.
      model: the shared architecture; its ``l2`` and ``dropout`` are the defaults for
        ``lmbda`` and ``dropout``; its ``l1`` applies to all.
      eta, lmbda, dropout: one value for all models or one per model.
      optimizer: an Optax constructor taking ``learning_rate`` (``optax.sgd``,
        ``optax.adam``, ``functools.partial(optax.sgd, momentum=0.9)``, ...).
      validation: optional ``(X, Y)`` evaluated every epoch for every model.
      shared_shuffle: all models see the same minibatches (the shuffle of model 0's key),
        which lets XLA merge their first-layer products and is much faster on CPUs;
        ``False`` gives every model its own shuffle, so that model ``k`` equals
        :func:`jbackprop.fit` with its own key.

    Returns ``(params, histories)``: every leaf of ``params`` has a leading axis ``K``
    (``jax.tree.map(lambda x: x[k], params)`` is model ``k``), and ``histories[k]`` is
    model ``k``'s per-epoch records, as :func:`jbackprop.fit` returns them.
    """
    keys = jnp.asarray(keys)
    k = keys.shape[0] if keys.ndim else 0
    if k < 1:
        raise ValueError(f"keys must hold one PRNG key per model, got shape {keys.shape}")
    _check_optimizer(optimizer(learning_rate=0.1))
    hyper = {
        "eta": _per_model("eta", eta, k, 0.0, 0.0, None),
        "lmbda": _per_model("lmbda", lmbda, k, model.l2, 0.0, None),
        "dropout": _per_model("dropout", dropout, k, model.dropout, 0.0, 1.0),
    }
    if np.any(hyper["eta"] <= 0):
        raise ValueError(f"eta values must be > 0, got {hyper['eta'].tolist()}")
    # The static model has dropout on when any model uses it; rates enter traced.
    static = dataclasses.replace(model, l2=0.0, dropout=0.5 if hyper["dropout"].any() else 0.0)
    init_keys, train_keys = jax.vmap(jax.random.split, out_axes=1)(keys)
    params = jax.vmap(lambda kk: init_params(kk, static, scheme))(init_keys)
    first = jax.tree.map(lambda x: x[0], params)
    tr = _prepare(first, static, train, "train")
    val = None if validation is None else _prepare(first, static, validation, "validation")
    _check_fit_args(tr, epochs, batch_size, None, None)
    n = tr.n if n is None else n
    checks.check_n(n, model)
    dtype = tr.X.dtype
    hyper = {name: jnp.asarray(v, dtype) for name, v in hyper.items()}
    init, epoch_fn, evaluate = _compiled(static, optimizer, batch_size, bool(shared_shuffle))
    opt_state = init(params, hyper)
    histories: list[list[dict[str, float]]] = [[] for _ in range(k)]
    for e in range(1, epochs + 1):
        start = time.perf_counter()
        epoch_keys = jax.vmap(lambda kk, e=e: jax.random.fold_in(kk, e))(train_keys)
        params, opt_state = epoch_fn(params, opt_state, hyper, tr.X, tr.Y, epoch_keys, n)
        c, acc = evaluate(params, tr.X, tr.Y, tr.labels, static, hyper, n)
        recs = [{"epoch": e, "train_cost": c, "train_accuracy": acc}]
        if val is not None:
            vc, vacc = evaluate(params, val.X, val.Y, val.labels, static, hyper, n)
            recs.append({"val_cost": vc, "val_accuracy": vacc})
        recs = jax.device_get(recs)
        seconds = time.perf_counter() - start
        for i in range(k):
            rec = {name: _item(v, i) for r in recs for name, v in r.items()}
            histories[i].append(rec | {"seconds": seconds})
    return params, histories


def _item(value, i: int):
    return value if isinstance(value, int) else float(value[i])
