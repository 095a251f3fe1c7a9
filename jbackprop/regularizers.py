"""Regularisers (lecture, section 5): L2 (eqs 11-13), L1, and dropout masks.

L2 and L1 act on weights only, never on biases (eq 16). ``n`` is the size of the training
set, not of the minibatch (eqs 12-15). Dropout is "inverted": a kept unit is scaled by
``1/(1 - p)`` during training, so inference needs no rescaling; the lecture's advice to
multiply the weights by ``p`` at test time is equivalent only with the keep probability
``1 - p`` in its place.

These are plain functions of arrays and numbers (no :class:`~jbackprop.Model`); ``λ``,
``n`` and the dropout rate may be traced values, so new values do not recompile.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import Array

__all__ = [
    "dropout_masks",
    "l1_grad",
    "l1_penalty",
    "l2_grad",
    "l2_penalty",
    "penalty",
    "penalty_grad",
]

Params = Sequence[dict[str, Array]]


def l2_penalty(params: Params, lmbda: float, n: float) -> Array:
    """Eqs 11-12: ``λ/(2n) Σ_{l,j,k} (w^l_{jk})²``.

    Args:
      params: one ``{"w": (n_l, n_{l-1}), "b": (n_l,)}`` dict per layer; biases are ignored.
      lmbda: ``λ``, the L2 strength.
      n: the training-set size.

    Returns:
      A scalar array in the weights' dtype.
    """
    return lmbda / (2.0 * n) * sum(jnp.sum(layer["w"] ** 2) for layer in params)


def l2_grad(w: Array, lmbda: float, n: float) -> Array:
    """Eq 13's extra term: ``(λ/n) w``.

    Args:
      w: one weight matrix ``(n_l, n_{l-1})`` (any shape works).
      lmbda: ``λ``, the L2 strength.
      n: the training-set size.

    Returns:
      ``(λ/n) w``, the shape and dtype of ``w``.
    """
    return (lmbda / n) * w


def l1_penalty(params: Params, lmbda: float, n: float) -> Array:
    """``λ/n Σ |w^l_{jk}|``, the L1 term of eq 11.

    Args:
      params, lmbda, n: as for :func:`l2_penalty`, with ``λ`` the L1 strength.

    Returns:
      A scalar array in the weights' dtype.
    """
    return lmbda / n * sum(jnp.sum(jnp.abs(layer["w"])) for layer in params)


def l1_grad(w: Array, lmbda: float, n: float) -> Array:
    """``(λ/n) sign(w)``, taking ``sign(0) = 0`` so a zero weight stays at zero.

    Args:
      w, lmbda, n: as for :func:`l2_grad`, with ``λ`` the L1 strength.

    Returns:
      ``(λ/n) sign(w)``, the shape and dtype of ``w``.
    """
    return (lmbda / n) * jnp.sign(w)


def penalty(params: Params, l2: Array | float, l1: Array | float, n: Array | float) -> Array:
    """The whole regulariser term of eq 11: L2 (eq 12) plus L1, ``λ`` possibly traced.

    Args:
      params: one ``{"w": (n_l, n_{l-1}), "b": (n_l,)}`` dict per layer.
      l2: the L2 strength (a model's ``l2``).
      l1: the L1 strength (a model's ``l1``).
      n: the training-set size.

    Returns:
      ``l2/(2n) Σ w² + l1/n Σ |w|``, a scalar array.
    """
    return l2_penalty(params, l2, n) + l1_penalty(params, l1, n)


def penalty_grad(w: Array, l2: Array | float, l1: Array | float, n: Array | float) -> Array:
    """Gradient of :func:`penalty` with respect to one weight matrix (eq 13 plus L1).

    Args:
      w: one weight matrix ``(n_l, n_{l-1})``.
      l2: the L2 strength.
      l1: the L1 strength.
      n: the training-set size.

    Returns:
      ``(l2/n) w + (l1/n) sign(w)``, the shape of ``w``.
    """
    return l2_grad(w, l2, n) + l1_grad(w, l1, n)


def dropout_masks(
    key: Array, widths: Sequence[int], rate: Array | float, m: int | None, dtype=jnp.float32
) -> list[Array]:
    """One inverted-dropout mask per hidden layer, entries ``0`` or ``1/(1 - rate)``.

    ``widths`` are the hidden layers' sizes ``(n_1, ..., n_{L-1})``; ``rate`` may be traced
    (a rate of 0 keeps every unit). ``m=None`` gives the masks of one example (each of
    shape ``(n_l,)``); otherwise example ``i`` of a minibatch gets the masks of key
    ``split(key, m)[i]``, shape ``(m, n_l)``, so the masks of :func:`jbackprop.grad` and
    :func:`jbackprop.per_example_grads` are identical for the same key.

    Args:
      key: the PRNG key the masks are drawn from.
      widths: the hidden layers' sizes ``(n_1, ..., n_{L-1})``.
      rate: the probability ``p`` of switching a unit off, in ``[0, 1)``.
      m: the minibatch size, or None for one example.
      dtype: the masks' dtype (the params' dtype, so they multiply ``a^l`` exactly).

    Returns:
      A list with one mask per hidden layer, ``(n_l,)`` or ``(m, n_l)``, of ``dtype``;
      unit ``j`` is kept (``1/(1 - p)``) with probability ``1 - p``.
    """
    keep = jnp.asarray(1.0 - rate, dtype)

    def example(k: Array) -> list[Array]:
        keys = jax.random.split(k, len(widths))
        return [
            jax.random.bernoulli(kk, keep, (size,)).astype(dtype) / keep
            for kk, size in zip(keys, widths, strict=True)
        ]

    if m is None:
        return example(key)
    return jax.vmap(example)(jax.random.split(key, m))
