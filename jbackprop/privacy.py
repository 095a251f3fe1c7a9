"""Differentially private gradients (DP-SGD, Abadi et al. 2016) without per-example gradients,
and the privacy they buy, ``(ε, δ)``.

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

Per-layer clipping (McMahan et al. 2018, *Learning Differentially Private Recurrent
Language Models*, section 3) bounds each layer's gradient ``(∂C/∂w^l, ∂C/∂b^l)`` of each
example by its own ``C_l``, with the factor ``c_il = min(1, C_l / ‖g^l_i‖)`` read off the
same identity, one term of the sum above. An example's whole clipped gradient then has
norm at most ``C = sqrt(Σ_l C_l²)``, the sensitivity the noise is scaled to.

The aggregation follows ``optax.contrib.differentially_private_aggregate``: the clipping
rule, noise of standard deviation ``clip * noise_multiplier`` added to the *sum*, then the
division by the minibatch size. With the noise off, :func:`clipped_grad` returns what that
transformation's first update returns when fed :func:`jbackprop.per_example_grads`. The
noise has the same distribution but is drawn by :func:`jbackprop.noise.normal` (Box–Muller
on half as many threefry hashes), not ``jax.random.normal``: drawing it is most of a
private step's cost beyond the gradient's, and this draw costs about half as much.

**Accounting.** :func:`epsilon` gives the ``ε`` of ``T`` adaptive compositions of the
*Poisson-subsampled Gaussian mechanism*: every example of the ``n`` enters a step's sample
``S`` independently with probability ``q``, and the step releases
``Σ_{i∈S} clip(g_i) + N(0, σ²C² I)``; neighbouring data sets differ by adding or removing
one example. This is the mechanism :func:`jbackprop.fit` runs with ``sampling="poisson"``
and ``gradient=DPGradient(...)`` (it then divides by the *expected* minibatch size ``q n``,
a public constant, which costs no privacy). The shuffled minibatches of the default
``sampling="shuffle"`` are a different mechanism, for which these numbers are not a proven
guarantee. The accountants are Google's ``dp-accounting``: Rényi DP of the subsampled
Gaussian (Mironov, Talwar and Zhang 2019) converted to ``(ε, δ)`` by Canonne, Kamath and
Steinke's bound (2020, Prop. 12), or privacy-loss distributions (Koskela et al. 2020;
Doroshenko et al. 2022), which are tighter and slower.

**Private inputs.** :func:`dp_pca` projects the inputs on the top principal directions of
a noisy second-moment matrix (Abadi et al. 2016, section 4): every row is scaled to norm at
most 1, so adding or removing one example moves ``Σ_i x_i x_iᵀ`` by ``x xᵀ``, of Frobenius
norm ``‖x‖² <= 1``, and Gaussian noise of standard deviation ``S`` per entry makes the
release a Gaussian mechanism of noise multiplier ``S``. ``epsilon(..., pca_noise=S)``
composes it with the DP-SGD steps (dp-accounting's ``ComposedDpEvent``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from jbackprop import checks
from jbackprop.model import Model, Params
from jbackprop.network import add_penalty_grads, batch_deltas, squared_norms
from jbackprop.noise import normal

__all__ = [
    "ACCOUNTANTS",
    "DPGradient",
    "calibrate_noise",
    "clipped_grad",
    "dp_pca",
    "epsilon",
    "per_example_norms",
    "poisson_schedule",
]

ACCOUNTANTS = ("rdp", "pld")


# --- the equations --------------------------------------------------------------------


def clip_factors(sq_norms: Array, clip: Array) -> Array:
    """``c_i = min(1, C / ‖g_i‖)``, written so that a zero gradient gets ``c_i = 1``."""
    return clip / jnp.maximum(jnp.sqrt(sq_norms), clip)


def layer_clip_factors(acts, deltas, clip) -> list[Array]:
    """One ``(m,)`` vector of factors per layer: the same ``c_i`` for every layer when
    ``clip`` is one bound ``C``, and ``c_il = min(1, C_l / ‖g^l_i‖)`` when it is a tuple of
    one bound per layer."""
    if not isinstance(clip, tuple):
        return [clip_factors(squared_norms(acts, deltas), clip)] * len(deltas)
    # squared_norms over a single layer's (a^{l-1}, δ^l) is that layer's term ‖g^l_i‖².
    return [
        clip_factors(squared_norms((a, None), (d,)), c)
        for a, d, c in zip(acts[:-1], deltas, clip, strict=True)
    ]


def sensitivity(clip) -> Array:
    """``C``, or ``sqrt(Σ_l C_l²)`` per layer: the largest norm of one example's clipped
    gradient, which the noise's standard deviation is measured in."""
    if not isinstance(clip, tuple):
        return clip
    return jnp.sqrt(sum(c * c for c in clip))


def weighted_sums(acts, deltas, factors) -> Params:
    """Eqs 9-10 summed over the minibatch with a weight per example and layer:
    ``Σ_i c_il δ^l_i (a^{l-1}_i)ᵀ = (c_l ⊙ δ^l)ᵀ a^{l-1}`` and ``c_lᵀ δ^l``."""
    return tuple(
        {"w": (c[:, None] * d).T @ a, "b": c @ d}
        for a, d, c in zip(acts[:-1], deltas, factors, strict=True)
    )


def add_noise(sums: Params, std: Array, noise_key: Array) -> Params:
    """Add ``N(0, std²)`` to every coordinate: leaf ``l`` draws :func:`jbackprop.noise.normal`
    stream ``l`` of ``noise_key``."""
    leaves, treedef = jax.tree.flatten(sums)
    noisy = [g + std * normal(noise_key, g.shape, g.dtype, stream=l) for l, g in enumerate(leaves)]
    return jax.tree.unflatten(treedef, noisy)


def private_sum(params: Params, X, Y, model: Model, key, clip, weights=None) -> Params:
    """``Σ_i w_i clip(g_i)`` from one forward and one backward pass (traceable, unchecked).

    ``weights`` ``(m,)`` multiply the clip factors, so an example of weight 0 (padding of a
    fixed-size block) adds exactly nothing, and with weights in ``[0, 1]`` no example's
    contribution exceeds :func:`sensitivity`.
    """
    acts, deltas = batch_deltas(params, X, Y, model, key)
    factors = layer_clip_factors(acts, deltas, clip)
    if weights is not None:
        factors = [f * weights for f in factors]
    return weighted_sums(acts, deltas, factors)


def noisy_mean(sums: Params, params: Params, model: Model, n, std, noise_key, denominator):
    """The Gaussian mechanism on a clipped sum: add ``N(0, std²)`` (when ``noise_key`` is
    given), divide by ``denominator``, then add the regulariser's gradient (eq 13)."""
    if noise_key is not None:
        sums = add_noise(sums, std, noise_key)
    grads = jax.tree.map(lambda s: s / denominator, sums)
    return add_penalty_grads(grads, params, model, n)


def _as_dtype(clip, dtype):
    return jax.tree.map(lambda c: jnp.asarray(c, dtype), clip)


# --- jitted kernels (validated arguments only) ----------------------------------------


@jax.jit
def _per_example_norms(params, X, Y, model, key):
    acts, deltas = batch_deltas(params, X, Y, model, key)
    return jnp.sqrt(squared_norms(acts, deltas))


@jax.jit
def _clipped_grad(
    params, X, Y, model, n, key, clip, noise_multiplier, noise_key, weights=None, denominator=None
):
    clip = _as_dtype(clip, X.dtype)
    sums = private_sum(params, X, Y, model, key, clip, weights)
    std = sensitivity(clip) * jnp.asarray(noise_multiplier, X.dtype)
    m = X.shape[0] if denominator is None else denominator
    return noisy_mean(sums, params, model, n, std, noise_key, m)


# --- argument checks ------------------------------------------------------------------


def _check_clip(clip: Any, num_layers: int | None = None) -> Any:
    """One bound ``C > 0``, or a tuple of one bound per layer (traced values pass)."""
    if isinstance(clip, list | tuple) or jnp.ndim(clip) == 1:
        bounds = tuple(checks.scalar(f"clip[{l}]", c, positive=True) for l, c in enumerate(clip))
        if not bounds or (num_layers is not None and len(bounds) != num_layers):
            want = "one bound per layer" if num_layers is None else f"{num_layers} bounds"
            raise ValueError(
                f"clip must be one bound or {want} (per-layer clipping), got {len(bounds)}"
            )
        return bounds
    return checks.scalar("clip", clip, positive=True)


def _check_weights(weights: Any, m: int, dtype) -> Array | None:
    if weights is None:
        return None
    weights = jnp.asarray(weights)
    if weights.shape != (m,):
        raise ValueError(f"weights has shape {weights.shape}, expected one per example ({m},)")
    if checks.is_concrete(weights):
        host = np.asarray(weights, dtype=float)
        if not np.all((host >= 0) & (host <= 1)):
            raise ValueError("weights must lie in [0, 1] (0 leaves an example out)")
    return weights.astype(dtype)


def _number(name: str, value: Any, *, low: float, high: float, low_ok: bool, high_ok: bool):
    """A concrete real in the interval from ``low`` to ``high`` (ends as the flags say)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    above = v >= low if low_ok else v > low
    below = v <= high if high_ok else v < high
    if isinstance(value, bool) or math.isnan(v) or not (above and below):
        interval = f"{'[' if low_ok else '('}{low}, {high}{']' if high_ok else ')'}"
        raise ValueError(f"{name} must lie in {interval}, got {value!r}")
    return v


def _check_accounting(sample_rate, steps, delta, accountant) -> tuple[float, int, float, str]:
    q = _number("sample_rate", sample_rate, low=0, high=1, low_ok=False, high_ok=True)
    steps = checks.positive_int("steps", steps)
    delta = _number("delta", delta, low=0, high=1, low_ok=False, high_ok=False)
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
    return q, steps, delta, accountant


# --- public API -----------------------------------------------------------------------


def per_example_norms(
    params: Params, X: Array, Y: Array, model: Model, key: Array | None = None
) -> Array:
    """``‖∂C_{x_i}/∂p‖`` for every example, over all layers' ``w`` and ``b``.

    These are the norms of :func:`jbackprop.per_example_grads` (unregularised, with the
    same dropout masks for the same ``key``), computed from ``‖δ‖`` and ``‖a‖`` without
    forming any per-example gradient.

    Args:
      params: one ``{"w": (n_l, n_{l-1}), "b": (n_l,)}`` dict per layer.
      X: inputs ``(m, n_0)``.
      Y: targets ``(m, n_L)`` or integer labels ``(m,)``.
      model: the network.
      key: draws the dropout masks; required when the model has dropout.

    Returns:
      The norms, shape ``(m,)``.
    """
    params, X, Y = checks.batch(params, X, Y, model, None, key, regularised=False)
    return _per_example_norms(params, X, Y, model, key)


def clipped_grad(
    params: Params, X: Array, Y: Array, model: Model,
    n: int | None = None, key: Array | None = None,
    *, clip: float | Sequence[float], noise_multiplier: float, noise_key: Array | None = None,
    weights: Array | None = None, denominator: float | None = None,
) -> Params:  # fmt: skip
    """The DP-SGD minibatch gradient: clip each example, sum, add noise, divide by ``m``.

    Every example's whole unregularised gradient (all layers, ``w`` and ``b``) is scaled
    to L2 norm at most ``clip``; the scaled gradients are summed; Gaussian noise of
    standard deviation ``noise_multiplier * clip`` is added to every coordinate of the sum;
    and the result is divided by the minibatch size ``m``. This is
    ``optax.contrib.differentially_private_aggregate(clip, noise_multiplier, noise_key)``
    applied to :func:`jbackprop.per_example_grads`, but no per-example gradient is stored;
    the noise, ``noise_multiplier * clip`` times :func:`jbackprop.noise.normal` of
    ``noise_key`` (stream ``l`` for leaf ``l``), has that transformation's distribution,
    not its draws.

    With ``clip=(C_1, ..., C_L)`` each layer's ``(w, b)`` gradient of each example is
    clipped to its own bound instead, still without per-example gradients, and the noise's
    standard deviation is ``noise_multiplier * sqrt(Σ_l C_l²)``, the norm bound of a whole
    clipped example; :func:`epsilon` applies unchanged.

    The regulariser's gradient (L2/L1, eq 13, which needs ``n``) is added *after* the
    private aggregation, unclipped and unnoised: it depends on the parameters only, not
    on any example, so it costs no privacy.

    Args:
      params, X, Y, model, n: as for :func:`jbackprop.grad`; ``X`` is ``(m, n_0)``, ``Y``
        targets ``(m, n_L)`` or integer labels ``(m,)``.
      key: draws the dropout masks, the same ones :func:`jbackprop.grad` and
        :func:`jbackprop.per_example_grads` use for that key.
      clip: the clipping norm ``C > 0``, or one norm per layer ``(C_1, ..., C_L)``.
      noise_multiplier: ``σ >= 0``, the noise's standard deviation in units of the clipped
        norm bound. ``0`` gives the clipped mean with no noise (and no privacy guarantee).
      noise_key: PRNG key for the noise; required unless ``noise_multiplier`` is ``0``.
        Use a fresh key every step.
      weights: optional ``(m,)`` weights in ``[0, 1]`` multiplying the clipped gradients;
        an example of weight 0 contributes nothing at all (padding of a fixed-size block).
      denominator: what the noisy sum is divided by; ``m`` by default. Under Poisson
        sampling it is the expected minibatch size ``q n`` (see :func:`epsilon`).

    Returns:
      A gradient with the structure of ``params``: ``{"w": (n_l, n_{l-1}), "b": (n_l,)}``
      per layer.
    """
    given, (params, X, Y) = params, checks.batch(params, X, Y, model, n, key)
    clip = _check_clip(clip, model.num_layers)
    noise_multiplier = checks.scalar("noise_multiplier", noise_multiplier, positive=False)
    weights = _check_weights(weights, X.shape[0], X.dtype)
    if denominator is not None:
        denominator = checks.scalar("denominator", denominator, positive=True)
    if checks.is_concrete(noise_multiplier) and noise_multiplier == 0:
        noise_key = None  # nothing to draw
    elif noise_key is None:
        raise ValueError(
            f"noise_key is required: noise_multiplier={noise_multiplier} adds Gaussian noise, "
            "and noise_key draws it"
        )
    return checks.like(
        given,
        _clipped_grad(
            params, X, Y, model, n, key, clip, noise_multiplier, noise_key, weights, denominator
        ),
    )


@dataclass(frozen=True)
class DPGradient:
    """DP-SGD as the per-step gradient of :func:`jbackprop.fit` (its ``gradient=``).

    Args:
      clip: the clipping norm ``C > 0``, or a tuple ``(C_1, ..., C_L)`` for per-layer
        clipping (a list is stored as a tuple, so the object stays hashable).
      noise_multiplier: ``σ >= 0``, as for :func:`clipped_grad`.

    Called as ``gradient(params, X, Y, model, n, key)`` on a minibatch (integer labels or
    targets, checked like :func:`clipped_grad`), it returns :func:`clipped_grad` of it:
    each step's key is split into the dropout key and the noise key, so every step draws
    fresh noise. With ``fit(..., sampling="poisson")`` the epoch instead calls
    :meth:`masked_sum` on the fixed-size blocks of a step's sample and :meth:`finish` once
    per step, which is the mechanism :func:`epsilon` accounts for. Frozen and hashable, so
    the compiled epoch is reused for equal settings.
    """

    clip: float | tuple[float, ...]
    noise_multiplier: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "clip", _check_clip(self.clip))
        checks.scalar("noise_multiplier", self.noise_multiplier, positive=False)

    def __call__(self, params: Params, X: Array, Y: Array, model: Model, n, key) -> Params:
        """The private gradient of the minibatch ``(X, Y)``: ``(m, n_0)`` inputs, targets
        ``(m, n_L)`` or labels ``(m,)``; works eagerly and traced inside ``fit``."""
        given, (params, X, Y) = params, checks.batch(params, X, Y, model, n, key)
        if key is None:
            raise ValueError("key is required: DPGradient draws the noise (and dropout) from it")
        clip = _check_clip(self.clip, model.num_layers)
        drop_key, noise_key = jax.random.split(key)
        grads = _clipped_grad(
            params,
            X,
            Y,
            model,
            n,
            drop_key if model.has_dropout else None,
            clip,
            self.noise_multiplier,
            noise_key if self.noise_multiplier else None,
        )
        return checks.like(given, grads)

    def masked_sum(self, params: Params, X, Y, model: Model, key, weights) -> Params:
        """``Σ_i w_i clip(g_i)`` over one block of a Poisson-sampled step (traceable and
        unchecked), from one forward and one backward pass.

        Args:
          params: one ``{"w": (n_l, n_{l-1}), "b": (n_l,)}`` dict per layer.
          X: the block's inputs ``(m, n_0)``.
          Y: its target vectors ``(m, n_L)``.
          model: the network.
          key: draws the block's dropout masks (unused without dropout).
          weights: ``(m,)``, 1 for the sampled examples and 0 for the padding, which
            therefore adds nothing, not even through the clipping.

        Returns:
          The weighted sum of the clipped gradients, structured like ``params``.
        """
        clip = _as_dtype(_check_clip(self.clip, model.num_layers), X.dtype)
        return private_sum(params, X, Y, model, key if model.has_dropout else None, clip, weights)

    def finish(self, sums: Params, params: Params, model: Model, n, count, expected, key) -> Params:
        """One Poisson-sampled step's gradient from its clipped sum (traceable): add
        ``N(0, (σC)²)`` to every coordinate, divide by the expected minibatch size, add
        the regulariser's gradient.

        Args:
          sums: :meth:`masked_sum` added up over the step's blocks.
          params: the parameters, for the regulariser's gradient (eq 13).
          model: the network.
          n: training-set size of eqs 12-15.
          count: the number of examples drawn; unused, since dividing by it would make
            the result depend on the data set beyond the clipped sum.
          expected: the expected minibatch size ``q n``, public.
          key: draws the step's noise.

        Returns:
          The step's private gradient, structured like ``params``.
        """
        dtype = jax.tree.leaves(sums)[0].dtype
        clip = _as_dtype(_check_clip(self.clip, model.num_layers), dtype)
        std = sensitivity(clip) * jnp.asarray(self.noise_multiplier, dtype)
        noise_key = key if self.noise_multiplier else None
        return noisy_mean(sums, params, model, n, std, noise_key, expected)


# --- private inputs -------------------------------------------------------------------


def scaled_rows(X: Array) -> Array:
    """Every row ``x`` divided by ``max(1, ‖x‖)``: norm at most 1, shorter rows unchanged."""
    return X / jnp.maximum(jnp.linalg.norm(X, axis=1, keepdims=True), 1.0)


@jax.jit
def _noisy_second_moment(X: Array, noise: Array, key: Array | None) -> Array:
    rows = scaled_rows(X)
    second = jnp.matmul(rows.T, rows, precision=jax.lax.Precision.HIGHEST)  # Σ_i x_i x_iᵀ
    if key is None:
        return second
    # Noise on every entry of the full matrix is the Gaussian mechanism; averaging it with
    # its transpose is post-processing, and keeps the matrix symmetric for eigh.
    e = noise * jax.random.normal(key, second.shape, second.dtype)
    return second + (e + e.T) / 2


def top_eigenvectors(A: np.ndarray, k: int) -> np.ndarray:
    """The eigenvectors of the ``k`` largest eigenvalues of a symmetric ``A``, as columns,
    each column's largest entry made positive (an eigenvector's sign is arbitrary, and
    this way the result does not depend on the eigensolver's choice)."""
    # NumPy's LAPACK in float64: several times faster than jnp.linalg.eigh on a CPU here,
    # and the eigenvectors of close eigenvalues come out accurately.
    _, vectors = np.linalg.eigh(np.asarray(A, np.float64))  # eigenvalues ascending
    top = vectors[:, ::-1][:, :k]
    peak = top[np.argmax(np.abs(top), axis=0), np.arange(k)]
    return top * np.where(peak < 0, -1.0, 1.0)


def dp_pca(X: Array, k: int, noise: float = 0.0, key: Array | None = None) -> Array:
    """The top ``k`` principal directions of ``X``, differentially private when ``noise > 0``.

    Abadi et al. 2016 (sections 4 and 5.2) project MNIST on 60 such directions before
    private training. Every row is scaled to L2 norm at most 1 (:func:`scaled_rows`), the
    second-moment matrix ``A = Σ_i x_i x_iᵀ`` is formed (not centred: a mean would be a
    second release), Gaussian noise ``E`` of standard deviation ``noise`` is added to every
    entry and the result symmetrised, ``A + (E + Eᵀ)/2``; the projection is its top ``k``
    eigenvectors. Adding or removing one example changes ``A`` by ``x xᵀ``, of Frobenius
    norm ``‖x‖² <= 1``, so the release is the Gaussian mechanism with sensitivity 1 and
    noise multiplier ``noise``: :func:`epsilon` with ``pca_noise=noise`` composes it with
    the training steps that follow. Everything downstream of ``A + (E + Eᵀ)/2`` (the
    eigenvectors, the projected inputs, the model) is post-processing. ``A`` is computed on
    the host CPU on every backend, so a seed gives the same projection in every process.

    Args:
      X: the private training inputs ``(n, n_0)``; only their scaled copies enter ``A``.
      k: the number of directions, ``1 <= k <= n_0``.
      noise: ``S >= 0``, the noise's standard deviation on each entry; ``0`` gives the
        non-private projection of the same scaled rows (no ``key`` needed).
      key: PRNG key drawing the noise; required when ``noise > 0``.

    Returns:
      The projection ``P``, shape ``(n_0, k)``, orthonormal columns in order of falling
      (noisy) eigenvalue, each column's largest entry positive. Inputs project as
      ``X @ P``, shape ``(m, k)``, unscaled: the scaling serves the sensitivity only.
    """
    X = jnp.asarray(X)
    if X.ndim != 2 or X.shape[0] == 0:
        raise ValueError(f"X must be a non-empty (n, n_0) array, got shape {tuple(X.shape)}")
    if not jnp.issubdtype(X.dtype, jnp.floating):
        X = X.astype(jnp.float32)
    if checks.is_concrete(X) and not bool(jnp.all(jnp.isfinite(X))):
        raise ValueError("X contains NaN or infinite values")
    k = checks.positive_int("k", k)
    if k > X.shape[1]:
        raise ValueError(f"k must be at most the input width n_0 = {X.shape[1]}, got {k}")
    noise = _number("noise", noise, low=0, high=math.inf, low_ok=True, high_ok=False)
    if noise == 0:
        key = None  # nothing to draw
    elif key is None:
        raise ValueError(f"key is required: noise={noise} adds Gaussian noise, and key draws it")
    # On the host CPU whatever the default device: a GPU picks its matrix-product algorithm
    # per process, and the projection must be the same bits when a run resumes.
    cpu = jax.devices("cpu")[0]
    A = _noisy_second_moment(*jax.device_put((X, jnp.asarray(noise, X.dtype), key), cpu))
    return jnp.asarray(top_eigenvectors(np.asarray(A), k), X.dtype)


# --- accounting -----------------------------------------------------------------------


def poisson_schedule(n: int, batch_size: int, epochs: int = 1) -> tuple[float, int]:
    """``(sample_rate, steps)`` of ``jbackprop.fit(..., sampling="poisson")``.

    Args:
      n: training-set size.
      batch_size: the expected minibatch size ``q n``.
      epochs: number of epochs.

    Returns:
      ``q = batch_size / n`` and ``epochs * round(n / batch_size)`` (halves round up),
      the arguments :func:`epsilon` needs for that run.
    """
    n = checks.positive_int("n", n)
    batch_size = checks.positive_int("batch_size", batch_size)
    epochs = checks.positive_int("epochs", epochs)
    if batch_size > n:
        raise ValueError(f"batch_size must be at most n={n}, got {batch_size}")
    return batch_size / n, epochs * ((2 * n + batch_size) // (2 * batch_size))


@functools.lru_cache(maxsize=512)
def _epsilon(
    sigma: float, q: float, steps: int, delta: float, accountant: str, pca_noise: float | None
) -> float:
    # dp_accounting takes about a second to import: only when something is accounted.
    import dp_accounting

    step = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
    event = dp_accounting.SelfComposedDpEvent(step, steps)
    if pca_noise is not None:
        # The projection is released once, before training: one more Gaussian mechanism.
        event = dp_accounting.ComposedDpEvent([dp_accounting.GaussianDpEvent(pca_noise), event])
    return _account(event, delta, accountant)


@functools.lru_cache(maxsize=64)
def _pca_epsilon(pca_noise: float, delta: float, accountant: str) -> float:
    """``ε`` of the private projection alone: no noise on the steps can go below it."""
    import dp_accounting

    return _account(dp_accounting.GaussianDpEvent(pca_noise), delta, accountant)


def _account(event, delta: float, accountant: str) -> float:
    import dp_accounting

    if accountant == "rdp":
        acc = dp_accounting.rdp.RdpAccountant()
    else:
        acc = dp_accounting.pld.PLDAccountant()
    acc.compose(event)
    return float(acc.get_epsilon(delta))


def _check_pca_noise(pca_noise: Any) -> float | None:
    if pca_noise is None:
        return None
    return _number("pca_noise", pca_noise, low=0, high=math.inf, low_ok=True, high_ok=False)


def epsilon(
    noise_multiplier: float, sample_rate: float, steps: int, delta: float,
    accountant: str = "rdp", *, pca_noise: float | None = None,
) -> float:  # fmt: skip
    """``ε`` of ``steps`` compositions of the Poisson-subsampled Gaussian mechanism.

    The mechanism (Abadi et al. 2016, Alg. 1): each step samples every example
    independently with probability ``q = sample_rate`` and releases the sum of the sampled
    examples' clipped gradients plus ``N(0, σ²C²)`` per coordinate, ``C`` the clipped
    norm bound (per-layer bounds: ``sqrt(Σ_l C_l²)``); neighbouring data sets differ by
    one added or removed example; the steps compose adaptively. The training it covers is
    ``jbackprop.fit(..., sampling="poisson", gradient=DPGradient(clip, σ))``, with
    ``(sample_rate, steps)`` from :func:`poisson_schedule`.

    Args:
      noise_multiplier: ``σ >= 0``; ``0`` gives ``ε = inf``.
      sample_rate: ``q``, with ``0 < q <= 1``.
      steps: ``T >= 1``, the number of noisy gradients released.
      delta: ``0 < δ < 1``; customarily below ``1/n``.
      accountant: ``"rdp"``, Rényi DP of the subsampled Gaussian (Mironov, Talwar and
        Zhang 2019) at dp-accounting's orders, converted by Canonne, Kamath and Steinke
        (2020, Prop. 12); or ``"pld"``, dp-accounting's privacy-loss-distribution
        accountant (Doroshenko et al. 2022), tighter (typically 10-20% smaller ``ε``) and
        slower (about a second, more for small ``σ``). Both are upper bounds.
      pca_noise: the ``noise`` of a :func:`dp_pca` projection computed from the same
        training set before training, whose release (a Gaussian mechanism of noise
        multiplier ``pca_noise``, sensitivity 1) is composed with the steps; ``None``
        (default) when the inputs were not projected, ``0`` (a non-private projection)
        gives ``ε = inf``.

    Returns:
      ``ε``, a float: the run is ``(ε, δ)``-differentially private.
    """
    q, steps, delta, accountant = _check_accounting(sample_rate, steps, delta, accountant)
    sigma = _number(
        "noise_multiplier", noise_multiplier, low=0, high=math.inf, low_ok=True, high_ok=False
    )
    pca_noise = _check_pca_noise(pca_noise)
    if sigma == 0 or pca_noise == 0:
        return math.inf
    return _epsilon(sigma, q, steps, delta, accountant, pca_noise)


def calibrate_noise(
    target_epsilon: float, sample_rate: float, steps: int, delta: float,
    accountant: str = "rdp", *, pca_noise: float | None = None,
) -> float:  # fmt: skip
    """The smallest noise multiplier ``σ`` whose :func:`epsilon` is at most ``target_epsilon``.

    Bisection on ``log σ``, using that ``ε`` falls as ``σ`` grows: the returned ``σ`` has
    ``epsilon(σ, ...) <= target_epsilon``, and ``σ / 1.01`` does not (to 1% in ``σ``).

    Args:
      target_epsilon: the ``ε > 0`` to reach.
      sample_rate, steps, delta, accountant: as for :func:`epsilon`.
      pca_noise: as for :func:`epsilon`: the ``ε`` reached then includes a
        :func:`dp_pca` projection's, and the steps get what is left of the budget.

    Returns:
      ``σ``, a float.

    Raises:
      ValueError: an argument is out of range, or ``target_epsilon`` cannot be reached
        (the projection alone spends it, or ``pca_noise`` is 0).
    """
    q, steps, delta, accountant = _check_accounting(sample_rate, steps, delta, accountant)
    target = _number(
        "target_epsilon", target_epsilon, low=0, high=math.inf, low_ok=False, high_ok=False
    )
    pca_noise = _check_pca_noise(pca_noise)
    if pca_noise is not None:
        spent = math.inf if pca_noise == 0 else _pca_epsilon(pca_noise, delta, accountant)
        if spent >= target:
            raise ValueError(
                f"target_epsilon={target} is out of reach: the private projection alone "
                f"(pca_noise={pca_noise}) spends ε = {spent:.3g}; raise pca_noise or the target"
            )
    with _quiet_probes():
        return _calibrate(target, q, steps, delta, accountant, pca_noise)


@contextlib.contextmanager
def _quiet_probes():
    """dp-accounting's warnings off while calibration probes σ values nobody asked about:
    at small σ its RDP accountant logs each order it cannot evaluate, and drops it."""
    log = logging.getLogger("absl")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _calibrate(target: float, q: float, steps: int, delta: float, accountant: str, pca_noise):
    # The RDP accountant is fast and its ε is never below the PLD's: its σ brackets from
    # above, and the slow PLD accountant is then only asked about nearby σ.
    rdp = functools.partial(
        _epsilon, q=q, steps=steps, delta=delta, accountant="rdp", pca_noise=pca_noise
    )
    rdp_floor = 0.0 if pca_noise is None else _pca_epsilon(pca_noise, delta, "rdp")
    hi = _upper_bracket(lambda s: rdp(s), target, 1.0) if rdp_floor < target else 1.0
    eps = functools.partial(
        _epsilon, q=q, steps=steps, delta=delta, accountant=accountant, pca_noise=pca_noise
    )
    hi = _upper_bracket(lambda s: eps(s), target, hi)
    lo = hi / 2
    while eps(lo) <= target:
        if lo < 1e-3:  # such targets are reached by (almost) no noise
            return lo
        hi, lo = lo, lo / 2
    while hi / lo > 1.01:
        mid = math.sqrt(lo * hi)
        if eps(mid) <= target:
            hi = mid
        else:
            lo = mid
    return hi


def _upper_bracket(eps, target: float, sigma: float) -> float:
    """A ``σ >= sigma`` with ``eps(σ) <= target``, doubling ``sigma`` until it is one."""
    while eps(sigma) > target:
        sigma *= 2
        if sigma > 2.0**30:
            raise ValueError(
                f"target_epsilon={target} is out of reach: even noise_multiplier=2**30 exceeds it"
            )
    return sigma
