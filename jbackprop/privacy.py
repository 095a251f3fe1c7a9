"""Differentially private gradients (DP-SGD, Abadi et al. 2016) without per-example gradients.

DP-SGD clips every example's whole gradient to L2 norm at most ``C``, sums the clipped
gradients, adds Gaussian noise ``N(0, (σC)²)`` to every coordinate and divides by the
minibatch size ``m``. Done naively that needs all ``m`` per-example gradients in memory.
Hand-written backprop needs only their norms: for a dense layer the gradient of example
``i`` is the outer product ``δ_i a_iᵀ`` (eq 10), whose Frobenius norm is ``‖δ_i‖ ‖a_i‖``,
and the bias gradient is ``δ_i`` (eq 9), so

    ‖g_i‖² = Σ_l ‖δ^l_i‖² (‖a^{l-1}_i‖² + 1).

With ``c_i = min(1, C / ‖g_i‖)`` the sum of the clipped gradients is again one matrix
product per layer, over rescaled deltas: ``Σ_i c_i δ_i a_iᵀ = (c ⊙ δ)ᵀ a``. The cost is one
forward and one backward pass of the minibatch, as for :func:`jbackprop.grad`.

The aggregation follows ``optax.contrib.differentially_private_aggregate``: the clipping
rule, noise of standard deviation ``clip * noise_multiplier`` added to the *sum*, then the
division by the minibatch size. Its noise is drawn the same way too, so for the same key
:func:`clipped_grad` returns what that transformation's first update returns when fed
:func:`jbackprop.per_example_grads`.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax import Array

from jbackprop import checks
from jbackprop.model import Model, Params
from jbackprop.network import add_penalty_grads, batch_deltas, squared_norms

__all__ = ["DPGradient", "clipped_grad", "per_example_norms"]


# --- the equations --------------------------------------------------------------------


def clip_factors(sq_norms: Array, clip: Array) -> Array:
    """``c_i = min(1, C / ‖g_i‖)``, written so that a zero gradient gets ``c_i = 1``."""
    return clip / jnp.maximum(jnp.sqrt(sq_norms), clip)


def clipped_sums(acts, deltas, c: Array) -> Params:
    """``Σ_i c_i δ_i a_iᵀ = (c ⊙ δ)ᵀ a`` and ``Σ_i c_i δ_i = cᵀ δ``, layer by layer."""
    return tuple(
        {"w": (c[:, None] * d).T @ a, "b": c @ d} for a, d in zip(acts[:-1], deltas, strict=True)
    )


def add_noise(sums: Params, std: Array, noise_key: Array) -> Params:
    """Add ``N(0, std²)`` to every coordinate, one subkey per leaf as optax draws them."""
    leaves, treedef = jax.tree.flatten(sums)
    # optax splits its key into a carried-over key and one subkey per leaf.
    subkeys = jax.random.split(noise_key, len(leaves) + 1)[1:]
    noisy = [
        g + std * jax.random.normal(k, g.shape, g.dtype)
        for g, k in zip(leaves, subkeys, strict=True)
    ]
    return jax.tree.unflatten(treedef, noisy)


# --- jitted kernels (validated arguments only) ----------------------------------------


@jax.jit
def _per_example_norms(params, X, Y, model, key):
    acts, deltas = batch_deltas(params, X, Y, model, key)
    return jnp.sqrt(squared_norms(acts, deltas))


@jax.jit
def _clipped_grad(params, X, Y, model, n, key, clip, noise_multiplier, noise_key):
    m = X.shape[0]
    clip = jnp.asarray(clip, X.dtype)
    acts, deltas = batch_deltas(params, X, Y, model, key)
    c = clip_factors(squared_norms(acts, deltas), clip)
    sums = clipped_sums(acts, deltas, c)
    if noise_key is not None:
        sums = add_noise(sums, clip * jnp.asarray(noise_multiplier, X.dtype), noise_key)
    grads = jax.tree.map(lambda s: s / m, sums)
    return add_penalty_grads(grads, params, model, n)


# --- public API -----------------------------------------------------------------------


def per_example_norms(
    params: Params, X: Array, Y: Array, model: Model, key: Array | None = None
) -> Array:
    """``‖∂C_{x_i}/∂p‖`` for every example, shape ``(m,)``, over all layers' ``w`` and ``b``.

    These are the norms of :func:`jbackprop.per_example_grads` (unregularised, with the
    same dropout masks for the same ``key``), computed from ``‖δ‖`` and ``‖a‖`` without
    forming any per-example gradient.
    """
    params, X, Y = checks.batch(params, X, Y, model, None, key, regularised=False)
    return _per_example_norms(params, X, Y, model, key)


def clipped_grad(
    params: Params,
    X: Array,
    Y: Array,
    model: Model,
    n: int | None = None,
    key: Array | None = None,
    *,
    clip: float,
    noise_multiplier: float,
    noise_key: Array | None = None,
) -> Params:
    """The DP-SGD minibatch gradient: clip each example, sum, add noise, divide by ``m``.

    Every example's whole unregularised gradient (all layers, ``w`` and ``b``) is scaled
    to L2 norm at most ``clip``; the scaled gradients are summed; Gaussian noise of
    standard deviation ``noise_multiplier * clip`` is added to every coordinate of the sum;
    and the result is divided by the minibatch size ``m``. This is
    ``optax.contrib.differentially_private_aggregate(clip, noise_multiplier, noise_key)``
    applied to :func:`jbackprop.per_example_grads`, with the same noise for the same key,
    but no per-example gradient is stored.

    The regulariser's gradient (L2/L1, eq 13, which needs ``n``) is added *after* the
    private aggregation, unclipped and unnoised: it depends on the parameters only, not
    on any example, so it costs no privacy.

    Args:
      params, X, Y, model, n: as for :func:`jbackprop.grad`.
      key: draws the dropout masks, the same ones :func:`jbackprop.grad` and
        :func:`jbackprop.per_example_grads` use for that key.
      clip: the clipping norm ``C > 0``.
      noise_multiplier: ``σ >= 0``, the noise's standard deviation in units of ``clip``.
        ``0`` gives the clipped mean with no noise (and no privacy guarantee).
      noise_key: PRNG key for the noise; required unless ``noise_multiplier`` is ``0``.
        Use a fresh key every step.
    """
    given, (params, X, Y) = params, checks.batch(params, X, Y, model, n, key)
    clip = checks.scalar("clip", clip, positive=True)
    noise_multiplier = checks.scalar("noise_multiplier", noise_multiplier, positive=False)
    if checks.is_concrete(noise_multiplier) and noise_multiplier == 0:
        noise_key = None  # nothing to draw
    elif noise_key is None:
        raise ValueError(
            f"noise_key is required: noise_multiplier={noise_multiplier} adds Gaussian noise, "
            "and noise_key draws it"
        )
    return checks.like(
        given, _clipped_grad(params, X, Y, model, n, key, clip, noise_multiplier, noise_key)
    )


@dataclass(frozen=True)
class DPGradient:
    """DP-SGD as the per-step gradient of :func:`jbackprop.fit` (its ``gradient=``).

    Each step's key is split into the dropout key and the noise key, so every step draws
    fresh noise. Frozen and hashable, so the compiled epoch is reused for equal settings.
    """

    clip: float
    noise_multiplier: float = 0.0

    def __post_init__(self) -> None:
        checks.scalar("clip", self.clip, positive=True)
        checks.scalar("noise_multiplier", self.noise_multiplier, positive=False)

    def __call__(self, params, X, Y, model: Model, n, key) -> Params:
        drop_key, noise_key = jax.random.split(key)
        return _clipped_grad(
            params,
            X,
            Y,
            model,
            n,
            drop_key if model.has_dropout else None,
            self.clip,
            self.noise_multiplier,
            noise_key if self.noise_multiplier else None,
        )
