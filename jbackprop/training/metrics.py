"""The cost and accuracy of a data set, and the record of one training epoch.

:func:`evaluation` is written once, traceably: :func:`evaluate` jits it for one model,
:func:`jbackprop.fit` for its per-epoch record (:func:`epoch_record`) and
:func:`jbackprop.fit_many` vmaps it over many models.
"""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
from jax import Array

from jbackprop import checks
from jbackprop.checks import Data, prepare
from jbackprop.model import Model, Params
from jbackprop.network import feedforward, objective
from jbackprop.training.devices import local

__all__ = ["TrainingDiverged", "accuracy", "epoch_record", "evaluate", "evaluation"]


class TrainingDiverged(FloatingPointError):
    """The cost or a parameter became NaN or infinite during an epoch.

    Args:
      epoch: the epoch (1-based) after which the non-finite value was seen; kept as the
        ``epoch`` attribute so a caller can point at the last good checkpoint.
      what: what stopped being finite (``"parameters"`` or ``"training cost"``).
    """

    def __init__(self, epoch: int, what: str):
        self.epoch = epoch
        super().__init__(
            f"training diverged in epoch {epoch}: the {what} became NaN or infinite. "
            "The learning rate eta is probably too large for this network; try a smaller one "
            "(e.g. a tenth of it)."
        )


def evaluation(params, X, Y, labels, model, n):
    """``(cost, accuracy, finite)`` of a checked data set, dropout off (traceable)."""
    zs, _ = feedforward(params, X, model)
    c = objective(params, zs[-1], Y, model, n)
    acc = jnp.mean(jnp.argmax(zs[-1], axis=-1) == labels)
    finite = jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(params)]))
    return c, acc, finite


_evaluate = jax.jit(evaluation)


def evaluate(
    params: Params, X: Array, Y: Array, model: Model, n: int | None = None
) -> tuple[float, float]:
    """The cost and accuracy on a data set, without dropout (as at inference).

    Args:
      params: one ``{"w": (n_l, n_{l-1}), "b": (n_l,)}`` dict per layer.
      X: inputs ``(m, n_0)``.
      Y: integer labels ``(m,)`` or targets ``(m, n_L)``.
      model: the network the params belong to.
      n: the training-set size of eqs 12-15; required when ``l2`` or ``l1`` is on.

    Returns:
      ``(cost, accuracy)`` as Python floats: the mean cost plus the regulariser term
      (eq 11, what :func:`fit` minimises) and the fraction of rows whose largest output
      is the target's class.
    """
    data = prepare(params, model, (X, Y), "data")
    checks.check_n(n, model)
    c, acc, _ = _evaluate(tuple(params), data.X, data.Y, data.labels, model, n)
    return float(c), float(acc)


@jax.jit
def _accuracy(params, X, labels, model):
    zs, _ = feedforward(params, X, model)
    return jnp.mean(jnp.argmax(zs[-1], axis=-1) == labels)


def accuracy(params: Params, X: Array, labels: Array, model: Model) -> float:
    """Fraction of examples whose largest output ``argmax_i a^L_i`` is the label.

    Args:
      params: one ``{"w": (n_l, n_{l-1}), "b": (n_l,)}`` dict per layer.
      X: inputs ``(m, n_0)``.
      labels: integer classes ``(m,)`` or one-hot targets ``(m, n_L)``.
      model: the network the params belong to.

    Returns:
      The accuracy, a Python float in ``[0, 1]``.
    """
    data = prepare(params, model, (X, labels), "data")
    return float(_accuracy(tuple(params), data.X, data.labels, model))


def epoch_record(
    epoch: int, train: Data, val: Data | None, params: Params, model: Model, n, start: float
) -> dict[str, float]:
    """The history record of one epoch of :func:`jbackprop.fit`.

    Args:
      epoch: the epoch's number (1-based).
      train: the training set, as evaluation data (on the mesh, split over its devices).
      val: the validation set, or ``None``.
      params: the parameters after the epoch.
      model: the network.
      n: training-set size of eqs 12-15.
      start: ``time.perf_counter()`` when the epoch began.

    Returns:
      ``epoch``, ``train_cost``, ``train_accuracy``, with ``val`` ``val_cost`` and
      ``val_accuracy``, and ``seconds``.

    Raises:
      TrainingDiverged: when the parameters or the training cost are not finite.
    """
    c, acc, finite = local(_evaluate(params, train.X, train.Y, train.labels, model, n))
    if not bool(finite):
        raise TrainingDiverged(epoch, "parameters")
    if not math.isfinite(float(c)):
        raise TrainingDiverged(epoch, "training cost")
    rec = {"epoch": epoch, "train_cost": float(c), "train_accuracy": float(acc)}
    if val is not None:
        vc, vacc, _ = local(_evaluate(params, val.X, val.Y, val.labels, model, n))
        rec |= {"val_cost": float(vc), "val_accuracy": float(vacc)}
    rec["seconds"] = time.perf_counter() - start
    return rec
