"""Minibatch stochastic gradient descent (lecture, sections 2 and 4).

One epoch is one compiled program: a fresh shuffle of the training set from the PRNG key,
then a ``jax.lax.scan`` over the minibatches, each step feeding :func:`jbackprop.grad` to an
Optax optimizer. With ``optax.sgd(eta)`` a step is eq 4, and with L2 on it is eqs 15-16. A
remainder that does not fill a minibatch is used as one smaller, last minibatch, so every
example is visited every epoch.

The key of epoch ``e`` is ``fold_in(key, e)``: an epoch's shuffle and dropout masks depend on
nothing but the key and the epoch number, which is what makes an interrupted run resume
bit-identically.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache, partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import Array
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jbackprop import checks
from jbackprop.model import Model, Params
from jbackprop.network import _grad, feedforward, like
from jbackprop.regularizers import penalty

__all__ = ["TrainState", "TrainingDiverged", "accuracy", "evaluate", "fit"]


class TrainingDiverged(FloatingPointError):
    """The cost or a parameter became NaN or infinite during an epoch."""

    def __init__(self, epoch: int, what: str):
        self.epoch = epoch
        super().__init__(
            f"training diverged in epoch {epoch}: the {what} became NaN or infinite. "
            "The learning rate eta is probably too large for this network; try a smaller one "
            "(e.g. a tenth of it)."
        )


@dataclass(frozen=True)
class TrainState:
    """Everything needed to continue training after ``epoch`` epochs.

    ``best_params`` are the parameters of the epoch with the best validation accuracy so
    far (the current ones when there is no validation set).
    """

    params: Params
    opt_state: Any
    epoch: int
    history: tuple[dict[str, float], ...] = ()
    best_params: Params | None = None
    best_epoch: int = 0


@dataclass(frozen=True)
class _Data:
    X: Array
    Y: Array
    labels: Array
    n: int = field(default=0)


# --- evaluation -----------------------------------------------------------------------


@partial(jax.jit, static_argnames="model")
def _evaluate(params, X, Y, labels, model, n):
    zs, _ = feedforward(params, X, model)
    c = jnp.mean(model.cost.fn(zs[-1], Y, model.output)) + penalty(params, model, n)
    acc = jnp.mean(jnp.argmax(zs[-1], axis=-1) == labels)
    finite = jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(params)]))
    return c, acc, finite


def evaluate(params: Params, X: Array, Y: Array, model: Model, n: int | None = None):
    """``(cost, accuracy)`` on a data set, without dropout; the cost includes the
    regulariser term with training-set size ``n`` (as minimised by :func:`fit`)."""
    data = _prepare(params, model, (X, Y), "data")
    checks.check_n(n, model)
    c, acc, _ = _evaluate(tuple(params), data.X, data.Y, data.labels, model, n)
    return float(c), float(acc)


@partial(jax.jit, static_argnames="model")
def _accuracy(params, X, labels, model):
    zs, _ = feedforward(params, X, model)
    return jnp.mean(jnp.argmax(zs[-1], axis=-1) == labels)


def accuracy(params: Params, X: Array, labels: Array, model: Model) -> float:
    """Fraction of examples whose largest output ``argmax_i a^L_i`` is the label.

    ``labels`` are integer classes ``(m,)`` or one-hot targets ``(m, n_L)``.
    """
    data = _prepare(params, model, (X, labels), "data")
    return float(_accuracy(tuple(params), data.X, data.labels, model))


# --- one epoch ------------------------------------------------------------------------


def _batch_constraint(mesh: Mesh | None, size: int):
    """Shard a minibatch over the mesh's batch axis when it divides evenly."""
    if mesh is None or size % mesh.size:
        return lambda x: x
    sharding = NamedSharding(mesh, PartitionSpec("batch"))
    return lambda x: jax.lax.with_sharding_constraint(x, sharding)


@lru_cache(maxsize=64)
def _epoch_fn(
    model: Model,
    optimizer,
    batch_size: int,
    mesh: Mesh | None,
    gradient=None,
    impl=None,
    progress=None,
):
    """A jitted epoch for this model, optimizer and minibatch size (cached: compiled once).

    The epoch key arrives as raw key data (``impl`` names its PRNG) so that it can be
    placed on a mesh spanning several processes like any other array. ``progress``, if
    given, is called from inside the compiled scan about 50 times per epoch.
    """

    def step(params, opt_state, X, Y, ids, key, n):
        shard = _batch_constraint(mesh, ids.shape[0])
        Xb, Yb = shard(X[ids]), shard(Y[ids])
        if gradient is None:
            g = _grad(params, Xb, Yb, model, n, key if model.dropout else None)
        else:
            g = gradient(params, Xb, Yb, model, n, key)
        updates, opt_state = optimizer.update(g, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    def epoch(params, opt_state, X, Y, key_data, n):
        key = key_data if impl is None else jax.random.wrap_key_data(key_data, impl=impl)
        k_perm, k_drop = jax.random.split(key)
        size = X.shape[0]
        steps, rem = divmod(size, batch_size)
        perm = jax.random.permutation(k_perm, size)
        step_keys = jax.random.split(k_drop, steps + 1)

        def body(carry, xs):
            i, ids, k = xs
            if progress is not None:
                report = lambda: jax.debug.callback(progress, i, steps)  # noqa: E731
                jax.lax.cond(i % max(1, steps // 50) == 0, report, lambda: None)
            return step(*carry, X, Y, ids, k, n), None

        full = perm[: steps * batch_size].reshape(steps, batch_size)
        xs = (jnp.arange(steps), full, step_keys[:steps])
        (params, opt_state), _ = jax.lax.scan(body, (params, opt_state), xs)
        if rem:
            tail = perm[steps * batch_size :]
            params, opt_state = step(params, opt_state, X, Y, tail, step_keys[steps], n)
        return params, opt_state

    if mesh is None:
        return jax.jit(epoch)
    return jax.jit(epoch, out_shardings=NamedSharding(mesh, PartitionSpec()))


# --- fit ------------------------------------------------------------------------------


def _prepare(params, model: Model, data, name: str, allow_nonfinite: bool = True) -> _Data:
    try:
        X, Y = data
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (X, Y), got {type(data).__name__}") from None
    checks.check_params(params, model)
    X = checks.inputs(X, model, params, batched=True, name=f"{name} X")
    Y = checks.targets(Y, model, params, (X.shape[0],), name=f"{name} Y")
    if not allow_nonfinite and not bool(jnp.all(jnp.isfinite(X))):
        raise ValueError(
            f"{name} X contains NaN or infinite values; clean the data or pass allow_nonfinite=True"
        )
    return _Data(X, Y, jnp.argmax(Y, axis=-1), X.shape[0])


def _resolve_mesh(devices) -> Mesh | None:
    if devices is None and jax.process_count() > 1:
        devices = "all"  # jax.distributed is initialised: train over every process
    if devices is None:
        return None
    if isinstance(devices, Mesh):
        return devices
    devs = jax.devices() if devices == "all" else list(devices)
    if not devs:
        raise ValueError("devices is empty: give None, 'all', a list of devices or a Mesh")
    return Mesh(np.array(devs), ("batch",))


def _check_fit_args(data: _Data, epochs, batch_size, patience, mesh) -> None:
    if isinstance(epochs, bool) or not hasattr(epochs, "__index__") or epochs < 0:
        raise ValueError(f"epochs must be a non-negative integer, got {epochs!r}")
    if (
        isinstance(batch_size, bool)
        or not hasattr(batch_size, "__index__")
        or not 1 <= batch_size <= data.n
    ):
        raise ValueError(
            f"batch_size must be an integer between 1 and the training-set size {data.n}, "
            f"got {batch_size!r}"
        )
    if patience is not None and (
        isinstance(patience, bool) or not hasattr(patience, "__index__") or patience < 1
    ):
        raise ValueError(f"patience must be a positive integer or None, got {patience!r}")
    if mesh is not None and batch_size % mesh.size:
        raise ValueError(
            f"batch_size {batch_size} must be divisible by the {mesh.size} devices it is "
            "sharded over"
        )


def _check_optimizer(optimizer) -> None:
    if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
        raise ValueError(
            f"optimizer must be an optax.GradientTransformation (e.g. optax.sgd(0.5)), "
            f"got {optimizer!r}"
        )


def _record(epoch, train: _Data, val: _Data | None, params, model, n, seconds_from):
    c, acc, finite = _local(_evaluate(params, train.X, train.Y, train.labels, model, n))
    if not bool(finite):
        raise TrainingDiverged(epoch, "parameters")
    if not math.isfinite(float(c)):
        raise TrainingDiverged(epoch, "training cost")
    rec = {"epoch": epoch, "train_cost": float(c), "train_accuracy": float(acc)}
    if val is not None:
        vc, vacc, _ = _local(_evaluate(params, val.X, val.Y, val.labels, model, n))
        rec |= {"val_cost": float(vc), "val_accuracy": float(vacc)}
    rec["seconds"] = time.perf_counter() - seconds_from
    return rec


def fit(
    params: Params,
    model: Model,
    train: tuple[Array, Array],
    optimizer: optax.GradientTransformation,
    epochs: int,
    batch_size: int,
    key: Array,
    validation: tuple[Array, Array] | None = None,
    *,
    patience: int | None = None,
    n: int | None = None,
    devices: Any = None,
    resume: TrainState | None = None,
    on_epoch: Callable[[TrainState], None] | None = None,
    log: Callable[[dict[str, float]], None] | None = None,
    allow_nonfinite: bool = False,
    gradient: Callable | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[Params, list[dict[str, float]]]:
    """Train by minibatch SGD; return the final (or best) params and a per-epoch history.

    Args:
      params, model: the starting parameters and the network they belong to.
      train: ``(X, Y)``, inputs ``(n, n_0)`` and targets ``(n, n_L)`` or labels ``(n,)``.
      optimizer: any ``optax.GradientTransformation``; ``optax.sgd(eta)`` is eq 4.
      epochs: total epochs, counting those already done in ``resume``.
      batch_size: minibatch size ``m``.
      key: PRNG key for the shuffles and dropout masks of every epoch.
      validation: optional ``(X, Y)`` evaluated after every epoch.
      patience: stop when validation accuracy has not improved for this many epochs and
        return the best epoch's parameters.
      n: training-set size in eqs 12-15; defaults to ``len(X)``.
      devices: ``None`` (default device), ``"all"``, a list of devices or a ``Mesh`` with
        axis ``"batch"``: every minibatch is sharded over them, parameters replicated.
      resume: a :class:`TrainState` to continue from (as given to ``on_epoch``).
      on_epoch: called with a :class:`TrainState` after every epoch (e.g. to checkpoint).
      log: called with each epoch's history record.
      allow_nonfinite: skip the check that ``X`` holds no NaN or infinity.
      gradient: replaces :func:`jbackprop.grad` in each step; a hashable callable
        ``(params, X, Y, model, n, key) -> grads`` traced inside the compiled epoch, given
        a fresh key per step (e.g. :class:`jbackprop.privacy.DPGradient`).

    Each history record holds ``epoch``, ``train_cost``, ``train_accuracy``, ``val_cost``
    and ``val_accuracy`` (with validation) and ``seconds``. Raises
    :class:`TrainingDiverged` when the cost or the parameters stop being finite.
    """
    given = params
    _check_optimizer(optimizer)
    tr = _prepare(params, model, train, "train", allow_nonfinite)
    val = None if validation is None else _prepare(params, model, validation, "validation")
    mesh = _resolve_mesh(devices)
    _check_fit_args(tr, epochs, batch_size, patience, mesh)
    epochs, batch_size = int(epochs), int(batch_size)
    if patience is not None and val is None:
        raise ValueError("patience needs a validation set to watch")
    n = tr.n if n is None else n
    checks.check_n(n, model)
    if not math.isfinite(float(n)):
        raise ValueError(f"n must be finite, got {n}")
    key = _as_key(key)
    state = resume or TrainState(tuple(params), optimizer.init(tuple(params)), 0)
    impl = jax.random.key_impl(key) if _typed_key(key) else None
    run = _epoch_fn(model, optimizer, batch_size, mesh, gradient, impl, progress)
    # With a mesh, data and state are replicated on every device (of every process); each
    # step's minibatch is then sharded over the batch axis inside the compiled epoch.
    tr_eval, val = _place_data(tr, mesh, shard=True), _place_data(val, mesh, shard=True)
    tr = _place_data(tr, mesh, shard=False)
    params, opt_state = _replicate((state.params, state.opt_state), mesh)
    history, best, best_epoch = list(state.history), state.best_params, state.best_epoch
    if patience is not None and best is not None and state.epoch - best_epoch >= patience:
        epochs = state.epoch  # the resumed run had already stopped early
    for epoch in range(state.epoch + 1, epochs + 1):
        start = time.perf_counter()
        epoch_key = _replicate(_key_data(_epoch_key(key, epoch)), mesh)
        params, opt_state = run(params, opt_state, tr.X, tr.Y, epoch_key, n)
        rec = _record(epoch, tr_eval, val, params, model, n, start)
        history.append(rec)
        if val is None or best is None or rec["val_accuracy"] > _best_accuracy(history, best_epoch):
            best, best_epoch = _local(params), epoch
        state = TrainState(
            _local(params), _local(opt_state), epoch, tuple(history), best, best_epoch
        )
        if log is not None:
            log(rec)
        if on_epoch is not None:
            on_epoch(state)
        if patience is not None and epoch - best_epoch >= patience:
            break
    final = best if (patience is not None and best is not None) else _local(params)
    return like(given, final), history


def _typed_key(key: Array) -> bool:
    return jnp.issubdtype(key.dtype, jax.dtypes.prng_key)


def _key_data(key: Array) -> Array:
    return jax.random.key_data(key) if _typed_key(key) else key


def _on_mesh(x, mesh: Mesh, spec: PartitionSpec):
    """A global array laid out by ``spec`` on ``mesh``, built from this process's full copy
    (every process holds the same values; each fills the shards on its own devices)."""
    host = np.asarray(_local(x))
    return jax.make_array_from_callback(host.shape, NamedSharding(mesh, spec), host.__getitem__)


def _replicate(tree, mesh: Mesh | None):
    """Place ``tree`` on every device of ``mesh``, across processes if it spans several."""
    if mesh is None or tree is None:
        return tree
    return jax.tree.map(lambda x: _on_mesh(x, mesh, PartitionSpec()), tree)


def _place_data(data: _Data | None, mesh: Mesh | None, shard: bool) -> _Data | None:
    """Training data replicated (each step gathers its rows from a global shuffle);
    evaluation data split over the batch axis when it divides evenly, so every device
    evaluates only its part."""
    if data is None or mesh is None:
        return data
    spec = PartitionSpec("batch") if shard and data.n % mesh.size == 0 else PartitionSpec()
    arrays = (data.X, data.Y, data.labels)
    return _Data(*(_on_mesh(x, mesh, spec) for x in arrays), data.n)


def _local(tree):
    """This process's copy of replicated arrays, usable outside the mesh (saving, eval)."""

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return x.addressable_data(0)
        return x

    return jax.tree.map(one, tree)


def _best_accuracy(history, best_epoch: int) -> float:
    return next(r["val_accuracy"] for r in history if r["epoch"] == best_epoch)


def _epoch_key(key: Array, epoch: int) -> Array:
    return jax.random.fold_in(key, epoch)


def _as_key(key: Any) -> Array:
    if key is None:
        raise ValueError("key is required: it draws the shuffle of every epoch")
    try:
        jax.random.fold_in(key, 0)
    except (TypeError, ValueError) as err:
        raise ValueError(f"key must be a JAX PRNG key, e.g. jax.random.key(0): {err}") from None
    return key
