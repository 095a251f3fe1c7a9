"""One epoch of minibatch stochastic gradient descent over a shuffle (lecture, section 4).

The optimizer step (eq 4 for ``optax.sgd``) and the progress report written here are
shared by both epochs of the package: this shuffled one and the Poisson-sampled one of
:mod:`jbackprop.training.poisson`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax import Array

from jbackprop.model import Model, Params
from jbackprop.network import minibatch_grad

__all__ = ["apply_update", "report_progress", "run_epoch"]


def apply_update(
    optimizer: optax.GradientTransformation, g: Params, params: Params, opt_state: Any
) -> tuple[Params, Any]:
    """One optimizer step: eq 4 for ``optax.sgd``.

    Args:
      optimizer: an ``optax.GradientTransformation``.
      g: the step's gradient, shaped like ``params``.
      params: the parameters before the step.
      opt_state: the optimizer's state before the step.

    Returns:
      ``(params, opt_state)`` after the step.
    """
    updates, opt_state = optimizer.update(g, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def report_progress(progress: Callable[[int, int], None] | None, i: Array, steps: int) -> None:
    """Call ``progress(i, steps)`` from inside the compiled loop, about 50 times an epoch.

    Args:
      progress: the callback, or ``None`` for no report.
      i: the traced number of the step about to run.
      steps: the steps of the epoch.
    """
    if progress is not None:
        report = lambda: jax.debug.callback(progress, i, steps)  # noqa: E731
        jax.lax.cond(i % max(1, steps // 50) == 0, report, lambda: None)


def run_epoch(
    params: Params,
    opt_state: Any,
    model: Model,
    X: Array,
    Y: Array,
    perm: Array,
    drop_key: Array,
    n: Any,
    *,
    optimizer: optax.GradientTransformation,
    batch_size: int,
    gradient: Callable | None = None,
    shard: Callable[[Array], Array] = lambda x: x,
    progress: Callable[[int, int], None] | None = None,
):
    """One pass over the training set in the order ``perm``: eq 4 (or the optimizer's rule)
    for each minibatch of ``batch_size`` examples, the remainder as a last, smaller one.

    Traceable and unchecked: :func:`jbackprop.fit` jits it for one model,
    :func:`jbackprop.fit_many` vmaps it over many, and a custom training loop may do either.

    Args:
      params: one ``{"w": (n_l, n_{l-1}), "b": (n_l,)}`` dict per layer (a tuple).
      opt_state: the optimizer's state for ``params``.
      model: the network; ``l2``, ``l1`` and the dropout rate may be traced.
      X: inputs ``(N, n_0)``.
      Y: target vectors ``(N, n_L)`` (one-hot for classes).
      perm: ``(N,)`` the order in which the examples are visited (a permutation).
      drop_key: split into one key per step: the dropout masks, or whatever ``gradient``
        draws.
      n: training-set size of eqs 12-15.
      optimizer: an ``optax.GradientTransformation``; ``optax.sgd(eta)`` is eq 4.
      batch_size: the minibatch size ``m``.
      gradient: replaces :func:`jbackprop.grad` in each step (see :func:`jbackprop.fit`).
      shard: applied to every minibatch (a sharding constraint when training on a mesh).
      progress: called with ``(step, steps)`` about 50 times per epoch, from inside the
        compiled loop.

    Returns:
      ``(params, opt_state)`` after the epoch.
    """

    def step(carry, ids, key):
        params, opt_state = carry
        Xb, Yb = shard(X[ids]), shard(Y[ids])
        if gradient is None:
            g = minibatch_grad(params, Xb, Yb, model, n, key if model.has_dropout else None)
        else:
            g = gradient(params, Xb, Yb, model, n, key)
        return apply_update(optimizer, g, params, opt_state)

    steps, rem = divmod(X.shape[0], batch_size)
    step_keys = jax.random.split(drop_key, steps + 1)

    def body(carry, xs):
        i, ids, k = xs
        report_progress(progress, i, steps)
        return step(carry, ids, k), None

    full = perm[: steps * batch_size].reshape(steps, batch_size)
    carry, _ = jax.lax.scan(body, (params, opt_state), (jnp.arange(steps), full, step_keys[:steps]))
    if rem:
        carry = step(carry, perm[steps * batch_size :], step_keys[steps])
    return carry
