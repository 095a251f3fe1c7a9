"""Per-example gradient statistics and the diagonal Gauss-Newton from one backward pass.

A dense layer's per-example gradient is the outer product ``∂C_i/∂w^l = δ^l_i (a^{l-1}_i)ᵀ``
(eq 10) and ``∂C_i/∂b^l = δ^l_i`` (eq 9). Many quantities of the per-example gradients are
therefore functions of the ``(m, n_l)`` arrays ``δ^l`` and ``a^{l-1}`` that the minibatch
backward pass already holds, and never need the ``(m, n_l, n_{l-1})`` stack of per-example
gradients:

* squared norm: ``‖δ aᵀ‖² = ‖δ‖² ‖a‖²`` (a rank-one matrix), plus ``‖δ‖²`` for the bias;
* elementwise second moment: ``Σ_i (δ_i a_iᵀ)² = (δ²)ᵀ (a²)``, one matrix product of the
  elementwise squares, just as the mean gradient ``δᵀ a / m`` is one matrix product.

:func:`grad_stats` uses them, so its memory is ``O(m Σ_l n_l)`` whatever the number of
parameters; :func:`noise_scale` builds on it. Both check their arguments exactly as
:func:`jbackprop.grad` does and draw the same dropout masks for the same ``key`` (example
``i`` uses ``jax.random.split(key, m)[i]``). The curvature counterpart,
:func:`jbackprop.diag_ggn`, lives in :mod:`jbackprop.curvature`.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from jbackprop import checks
from jbackprop.model import Model, Params
from jbackprop.network import add_penalty_grads, batch_deltas, mean_grads, squared_norms

__all__ = ["GradStats", "NoiseScale", "grad_stats", "noise_scale"]


class GradStats(NamedTuple):
    """What :func:`grad_stats` returns (a pytree, so it can leave a ``jax.jit``).

    Every array is in the params' dtype; "like ``params``" means one
    ``{"w": (n_l, n_{l-1}), "b": (n_l,)}`` dict per layer, in a tuple, or a list when the
    params were given as a list.

    Attributes:
      grad: the minibatch gradient, exactly :func:`jbackprop.grad` (regulariser included).
      norms: ``(m,)``, the L2 norm of each example's unregularised gradient ``g_i``, over
        every layer's ``w`` and ``b``.
      sum_grad_squared: like ``params``: ``Σ_i g_i²`` elementwise over the minibatch.
      variance: like ``params``: ``mean_i g_i² - (mean_i g_i)²`` elementwise, the (biased,
        divide-by-``m``) variance of the unregularised per-example gradients.
    """

    grad: Params
    norms: Array
    sum_grad_squared: Params
    variance: Params


# --- gradient statistics --------------------------------------------------------------


@jax.jit
def _grad_stats(params, X, Y, model, n, key):
    m = X.shape[0]
    acts, deltas = batch_deltas(params, X, Y, model, key)
    mean = mean_grads(acts, deltas)  # eqs 9-10: mean_i g_i, unregularised
    grads = add_penalty_grads(mean, params, model, n)
    sq_norms = squared_norms(acts, deltas)
    # Σ_i (δ_i a_iᵀ)² is one product of the elementwise squares.
    sum_sq = tuple(
        {"w": (d**2).T @ (a**2), "b": jnp.sum(d**2, axis=0)}
        for a, d in zip(acts[:-1], deltas, strict=True)
    )
    # mean g² - (mean g)² can round to a tiny negative number; a variance is >= 0.
    variance = jax.tree.map(lambda s, g: jnp.maximum(s / m - g**2, 0.0), sum_sq, mean)
    return GradStats(grads, jnp.sqrt(sq_norms), sum_sq, variance)


def grad_stats(
    params: Params, X: Array, Y: Array, model: Model, n: int | None = None, key: Array | None = None
) -> GradStats:
    """The minibatch gradient and statistics of the per-example gradients, in one pass.

    One forward pass (eq 3) and one backward pass (eqs 6-8) over the minibatch give every
    ``δ^l`` and ``a^{l-1}``; the per-example gradient of example ``i`` is
    ``g_i = {w^l: δ^l_i (a^{l-1}_i)ᵀ, b^l: δ^l_i}`` (eqs 9-10), and from the identities

    * ``‖δ_i a_iᵀ‖_F² = ‖δ_i‖² ‖a_i‖²`` (so ``‖g_i‖² = Σ_l ‖δ^l_i‖² (‖a^{l-1}_i‖² + 1)``),
    * ``Σ_i (δ_i a_iᵀ)² = (δ²)ᵀ (a²)`` (elementwise squares, one matrix product per layer),

    :class:`GradStats` is computed without forming any ``g_i``: memory is ``O(m Σ_l n_l)``,
    independent of the parameter count.

    ``grad`` is exactly :func:`jbackprop.grad` with the same arguments, L1/L2 terms
    included (eqs 11-13). ``norms``, ``sum_grad_squared`` and ``variance`` describe the
    *unregularised* per-example gradients ``g_i = ∂C_{x_i}/∂p`` (the regulariser is the
    same for every example, so it only shifts the mean); ``variance`` is
    ``mean_i g_i² - (mean_i g_i)²``, clipped at 0 against rounding.

    With dropout, example ``i`` uses the masks of ``jax.random.split(key, m)[i]``, the same
    as :func:`jbackprop.grad` and :func:`jbackprop.per_example_grads`. Arguments are checked
    as :func:`jbackprop.grad` checks them.

    Args:
      params: one ``{"w": (n_l, n_{l-1}), "b": (n_l,)}`` dict per layer, tuple or list.
      X: inputs ``(m, n_0)``.
      Y: integer class labels ``(m,)`` or target vectors ``(m, n_L)``.
      model: the :class:`~jbackprop.Model`.
      n: the training-set size of eqs 12-15; required when ``l1`` or ``l2`` is on (it
        enters ``grad`` only).
      key: PRNG key drawing the dropout masks; required when ``model.has_dropout``.

    Returns:
      A :class:`GradStats`: ``grad``, ``sum_grad_squared`` and ``variance`` like
      ``params``, ``norms`` of shape ``(m,)``, all in the params' dtype.

    Raises:
      ValueError: a shape, a label, ``n`` or ``key`` is wrong or missing.
    """
    given, (params, X, Y) = params, checks.batch(params, X, Y, model, n, key)
    return checks.like(given, _grad_stats(params, X, Y, model, n, key))


# --- gradient noise scale -------------------------------------------------------------


class NoiseScale(NamedTuple):
    """What :func:`noise_scale` returns; plain Python floats.

    Attributes:
      b_simple: ``tr(Σ) / |G|²``, the simple noise scale of McCandlish et al. (2018);
        ``inf`` when the estimate of ``|G|²`` is not positive.
      trace: ``tr(Σ)``, the summed variance of the per-example gradients (unbiased).
      grad_sq_norm: ``|G|²``, the squared norm of the true gradient (unbiased estimate).
      median_norm: the median L2 norm of the examples' unregularised gradients.
    """

    b_simple: float
    trace: float
    grad_sq_norm: float
    median_norm: float


def noise_scale(
    params: Params,
    X: Array,
    Y: Array,
    model: Model,
    n: int | None = None,
    chunk_size: int = 100,
) -> NoiseScale:
    """The gradient noise scale ``B_simple = tr(Σ) / |G|²`` estimated on ``(X, Y)``.

    ``Σ`` is the covariance of the per-example gradients and ``G`` the gradient of the
    whole objective (regulariser included: it shifts every ``g_i`` alike, so it changes
    ``G`` but not ``Σ``). From ``M`` examples, ``tr(Σ)`` is estimated by the unbiased
    sample variance and ``|G|²`` by ``|mean g|² - tr(Σ)/M``, which removes the noise that a
    finite sample adds to ``|mean g|²``. ``B_simple`` is roughly the minibatch size beyond
    which larger minibatches stop reducing the number of steps much. Examples are processed
    ``chunk_size`` at a time with :func:`grad_stats`, so memory stays small. Dropout is off.

    It runs eagerly (the result is Python floats), so it cannot be called inside
    ``jax.jit``.

    Args:
      params: one ``{"w": (n_l, n_{l-1}), "b": (n_l,)}`` dict per layer, tuple or list.
      X: ``M >= 2`` inputs ``(M, n_0)``, e.g. a fixed sample of the training set.
      Y: integer class labels ``(M,)`` or target vectors ``(M, n_L)``.
      model: the :class:`~jbackprop.Model`; its ``l2`` and ``l1`` enter ``G``, its dropout
        rate is ignored.
      n: the training-set size of eqs 12-15; required when ``l1`` or ``l2`` is on.
      chunk_size: examples per :func:`grad_stats` call; a last, smaller chunk is one
        more shape to compile.

    Returns:
      A :class:`NoiseScale` of Python floats: ``b_simple``, ``trace``, ``grad_sq_norm``,
      ``median_norm``.

    Raises:
      ValueError: fewer than 2 examples, a missing ``n``, a bad ``chunk_size``, or a
        shape or label that does not fit the model.
    """
    checks.check_model(model)
    checks.check_n(n, model)
    chunk_size = checks.positive_int("chunk_size", chunk_size)
    plain = dataclasses.replace(model, l2=0.0, l1=0.0, dropout=0.0)
    total = int(np.shape(X)[0])
    if total < 2:
        raise ValueError(f"noise_scale needs at least 2 examples, got {total}")
    starts = range(0, total, chunk_size)
    parts = [
        grad_stats(params, X[i : i + chunk_size], Y[i : i + chunk_size], plain) for i in starts
    ]
    sizes = [min(chunk_size, total - i) for i in starts]
    sum_g = jax.tree.map(
        lambda *g: sum(m * x for m, x in zip(sizes, g, strict=True)), *[p.grad for p in parts]
    )
    sum_sq = jax.tree.map(lambda *x: sum(x), *[p.sum_grad_squared for p in parts])
    mean = jax.tree.map(lambda t: t / total, sum_g)
    variance = sum(
        float(jnp.sum(sq / total - g**2))
        for sq, g in zip(jax.tree.leaves(sum_sq), jax.tree.leaves(mean), strict=True)
    )
    trace = variance * total / (total - 1)
    G = add_penalty_grads(tuple(mean), tuple(params), model, n)
    g2 = sum(float(jnp.sum(g**2)) for g in jax.tree.leaves(G)) - trace / total
    median = float(np.median(np.concatenate([np.asarray(p.norms) for p in parts])))
    return NoiseScale(trace / g2 if g2 > 0 else float("inf"), trace, g2, median)
