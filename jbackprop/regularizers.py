"""Regularisers (lecture, section 5): L2 (eqs 11-13), L1, and dropout masks.

L2 and L1 act on weights only, never on biases (eq 16). ``n`` is the size of the training
set, not of the minibatch (eqs 12-15). Dropout is "inverted": a kept unit is scaled by
``1/(1 - p)`` during training, so inference needs no rescaling; the lecture's advice to
multiply the weights by ``p`` at test time is equivalent only with the keep probability
``1 - p`` in its place.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import Array

from jbackprop.model import Model, Params

__all__ = [
    "dropout_masks",
    "l1_grad",
    "l1_penalty",
    "l2_grad",
    "l2_penalty",
    "penalty",
    "penalty_grad",
]


def l2_penalty(params: Params, lmbda: float, n: float) -> Array:
    """Eqs 11-12: ``λ/(2n) Σ_{l,j,k} (w^l_{jk})²``."""
    return lmbda / (2.0 * n) * sum(jnp.sum(layer["w"] ** 2) for layer in params)


def l2_grad(w: Array, lmbda: float, n: float) -> Array:
    """Eq 13's extra term: ``(λ/n) w``."""
    return (lmbda / n) * w


def l1_penalty(params: Params, lmbda: float, n: float) -> Array:
    """``λ/n Σ |w^l_{jk}|``."""
    return lmbda / n * sum(jnp.sum(jnp.abs(layer["w"])) for layer in params)


def l1_grad(w: Array, lmbda: float, n: float) -> Array:
    """``(λ/n) sign(w)``, taking ``sign(0) = 0`` so a zero weight stays at zero."""
    return (lmbda / n) * jnp.sign(w)


def penalty(params: Params, model: Model, n: float | None) -> Array:
    """The model's whole regulariser term ``λ R(P)`` of eq 11 (L2 plus L1)."""
    total = jnp.zeros((), params[0]["w"].dtype)
    if model.l2:
        total = total + l2_penalty(params, model.l2, n)
    if model.l1:
        total = total + l1_penalty(params, model.l1, n)
    return total


def penalty_grad(w: Array, model: Model, n: float | None) -> Array | None:
    """Gradient of :func:`penalty` with respect to one weight matrix (``None`` if zero)."""
    g = None
    if model.l2:
        g = l2_grad(w, model.l2, n)
    if model.l1:
        g1 = l1_grad(w, model.l1, n)
        g = g1 if g is None else g + g1
    return g


def _example_masks(key: Array, model: Model, dtype) -> list[Array]:
    keep = 1.0 - model.dropout
    keys = jax.random.split(key, len(model.sizes) - 2)
    return [
        jax.random.bernoulli(k, keep, (size,)).astype(dtype) / keep
        for k, size in zip(keys, model.sizes[1:-1], strict=True)
    ]


def dropout_masks(key: Array | None, model: Model, m: int | None, dtype=jnp.float32):
    """One inverted-dropout mask per hidden layer, entries ``0`` or ``1/(1-p)``.

    ``m=None`` gives the masks of one example (each of shape ``(n_l,)``); otherwise every
    example ``i`` of a minibatch gets the masks of key ``split(key, m)[i]``, shape
    ``(m, n_l)``. That makes the masks of :func:`jbackprop.grad` and
    :func:`jbackprop.per_example_grads` identical for the same key. Returns ``None`` when
    the model has no dropout or no hidden layer.
    """
    if not model.dropout or len(model.sizes) < 3:
        return None
    if m is None:
        return _example_masks(key, model, dtype)
    keys = jax.random.split(key, m)
    return jax.vmap(lambda k: _example_masks(k, model, dtype))(keys)
