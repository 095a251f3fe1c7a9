"""Regularisers (lecture, section 5): L2 (eqs 11-13), L1, and dropout masks.

L2 and L1 act on weights only, never on biases (eq 16). ``n`` is the size of the training
set, not of the minibatch (eqs 12-15). Dropout is "inverted": a kept unit is scaled by
``1/(1 - p)`` during training, so inference needs no rescaling; the lecture's advice to
multiply the weights by ``p`` at test time is equivalent only with the keep probability
``1 - p`` in its place.
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


def penalty(params: Params, l2: Array | float, l1: Array | float, n: Array | float) -> Array:
    """The whole regulariser term of eq 11: L2 (eq 12) plus L1, ``λ`` possibly traced."""
    return l2_penalty(params, l2, n) + l1_penalty(params, l1, n)


def penalty_grad(w: Array, l2: Array | float, l1: Array | float, n: Array | float) -> Array:
    """Gradient of :func:`penalty` with respect to one weight matrix (eq 13 plus L1)."""
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
