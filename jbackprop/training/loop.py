"""The training loop: :func:`fit`, epoch after epoch, with validation, early stopping,
checkpoint callbacks and resumption, on one device or a mesh of many.

The key of epoch ``e`` is ``fold_in(key, e)``: an epoch's shuffle (or samples) and dropout
masks depend on nothing but the key and the epoch number, which is what makes an
interrupted run resume bit-identically.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
import optax
from jax import Array
from jax.sharding import Mesh

from jbackprop import checks
from jbackprop.checks import Data, like, prepare
from jbackprop.model import Model, Params
from jbackprop.state import TrainState
from jbackprop.training.compiled import check_sampling, compiled_epoch, prng_impl, raw_key
from jbackprop.training.devices import local, place_data, replicate, resolve_mesh
from jbackprop.training.metrics import epoch_record

__all__ = ["check_fit_args", "check_optimizer", "fit"]


def check_fit_args(
    data: Data, epochs: Any, batch_size: Any, patience: Any = None, mesh: Mesh | None = None
) -> tuple[int, int]:
    """Check the loop's integers, as :func:`fit` and :func:`jbackprop.fit_many` take them.

    Args:
      data: the checked training set.
      epochs, batch_size, patience: as given to :func:`fit`.
      mesh: the training mesh, whose devices ``batch_size`` must be divisible by.

    Returns:
      ``(epochs, batch_size)`` as ints.
    """
    epochs = checks.positive_int("epochs", epochs, low=0)
    if (
        isinstance(batch_size, bool)
        or not hasattr(batch_size, "__index__")
        or not 1 <= batch_size <= data.n
    ):
        raise ValueError(
            f"batch_size must be an integer between 1 and the training-set size {data.n}, "
            f"got {batch_size!r}"
        )
    checks.positive_int("patience", patience, allow_none=True)
    if mesh is not None and batch_size % mesh.size:
        raise ValueError(
            f"batch_size {batch_size} must be divisible by the {mesh.size} devices it is "
            "sharded over"
        )
    return epochs, int(batch_size)


def check_optimizer(optimizer: Any) -> None:
    """Check that ``optimizer`` is an Optax ``GradientTransformation``.

    Args:
      optimizer: what was given as the optimizer.
    """
    if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
        raise ValueError(
            f"optimizer must be an optax.GradientTransformation (e.g. optax.sgd(0.5)), "
            f"got {optimizer!r}"
        )


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
    sampling: str = "shuffle",
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
      progress: called with ``(step, steps)`` about 50 times per epoch from inside the
        compiled epoch (the experiment's progress bar).
      sampling: ``"shuffle"`` (default): every epoch a fresh shuffle cut into minibatches
        of ``batch_size``. ``"poisson"``: every epoch ``round(n / batch_size)`` steps, each
        over a sample that holds every example independently with probability
        ``q = batch_size / n`` (see :func:`run_poisson_epoch`); the step's gradient is the
        mean over the examples drawn, or with ``gradient=DPGradient(...)`` the noisy
        clipped sum divided by ``batch_size``, the mechanism whose ``ε``
        :func:`jbackprop.privacy.epsilon` gives for
        ``jbackprop.privacy.poisson_schedule(n, batch_size, epochs)``. Here ``n`` is
        ``len(X)``, which may differ from the ``n`` of eqs 12-15 when that is given.

    Returns:
      ``(params, history)``: the final parameters (the best epoch's with ``patience``), in
      the container ``params`` came in, and one record per epoch holding ``epoch``,
      ``train_cost``, ``train_accuracy``, ``val_cost`` and ``val_accuracy`` (with
      validation) and ``seconds``.

    Raises:
      TrainingDiverged: when the cost or the parameters stop being finite.
      ValueError: for arguments that do not fit the model or each other.
    """
    given = params
    check_optimizer(optimizer)
    check_sampling(sampling, gradient)
    tr = prepare(params, model, train, "train", allow_nonfinite)
    val = None if validation is None else prepare(params, model, validation, "validation")
    mesh = resolve_mesh(devices)
    epochs, batch_size = check_fit_args(tr, epochs, batch_size, patience, mesh)
    if patience is not None and val is None:
        raise ValueError("patience needs a validation set to watch")
    n = tr.n if n is None else n
    checks.check_n(n, model)
    key = _as_key(key)
    state = resume or TrainState(tuple(params), optimizer.init(tuple(params)), 0)
    run = compiled_epoch(optimizer, batch_size, mesh, gradient, prng_impl(key), progress, sampling)
    # With a mesh, data and state are replicated on every device (of every process); each
    # step's minibatch is then sharded over the batch axis inside the compiled epoch.
    tr_eval, val = place_data(tr, mesh, shard=True), place_data(val, mesh, shard=True)
    tr = place_data(tr, mesh, shard=False)
    params, opt_state = replicate((state.params, state.opt_state), mesh)
    history, best, best_epoch = list(state.history), state.best_params, state.best_epoch
    if patience is not None and best is not None and state.epoch - best_epoch >= patience:
        epochs = state.epoch  # the resumed run had already stopped early
    for epoch in range(state.epoch + 1, epochs + 1):
        start = time.perf_counter()
        epoch_key = replicate(raw_key(_epoch_key(key, epoch)), mesh)
        params, opt_state = run(params, opt_state, model, tr.X, tr.Y, epoch_key, n)
        rec = epoch_record(epoch, tr_eval, val, params, model, n, start)
        history.append(rec)
        if val is None or best is None or rec["val_accuracy"] > _best_accuracy(history, best_epoch):
            best, best_epoch = local(params), epoch
        state = TrainState(local(params), local(opt_state), epoch, tuple(history), best, best_epoch)
        if log is not None:
            log(rec)
        if on_epoch is not None:
            on_epoch(state)
        if patience is not None and epoch - best_epoch >= patience:
            break
    final = best if (patience is not None and best is not None) else local(params)
    return like(given, final), history


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
