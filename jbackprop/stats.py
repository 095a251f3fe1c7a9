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
parameters. :func:`diag_ggn` uses the second identity on ``δ``'s of a different kind: it
backpropagates (eq 8) the columns of a square root of the output Hessian instead of
``δ^L``, as BackPACK's ``DiagGGNExact`` and ``DiagGGNMC`` do.

Both check their arguments exactly as :func:`jbackprop.grad` does and draw the same dropout
masks for the same ``key`` (example ``i`` uses ``jax.random.split(key, m)[i]``).
"""

from __future__ import annotations

import dataclasses
import operator
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from jbackprop import checks
from jbackprop.costs import _log_a_and_log_1ma
from jbackprop.model import Model, Params
from jbackprop.network import (
    _batch,
    add_penalty_grads,
    batch_deltas,
    batch_masks,
    feedforward,
    like,
    mean_grads,
    squared_norms,
)

__all__ = ["GradStats", "NoiseScale", "diag_ggn", "grad_stats", "noise_scale"]


class GradStats(NamedTuple):
    """What :func:`grad_stats` returns (a pytree, so it can leave a ``jax.jit``).

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


@partial(jax.jit, static_argnames="model")
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
    params: Params,
    X: Array,
    Y: Array,
    model: Model,
    n: int | None = None,
    key: Array | None = None,
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
    """
    given, (params, X, Y) = params, _batch(params, X, Y, model, n, key)
    return like(given, _grad_stats(params, X, Y, model, n, key))


# --- diagonal of the generalised Gauss-Newton matrix ----------------------------------


def _eq8(params, zs, delta_L, model, masks):
    """Eq 8 from a given ``δ^L``; arrays may carry extra axes before the unit axis."""
    deltas = [delta_L]
    for l in range(model.num_layers - 1, 0, -1):
        g = deltas[0] @ params[l]["w"]
        if masks is not None:
            g = g * masks[l - 1]
        deltas.insert(0, model.hidden.backward(zs[l - 1], g))
    return deltas


def _diag_from_squares(acts, weighted_sq):
    """``mean_i`` of the per-example diagonals from ``D^l = Σ_c h_ic (δ^l_ic)²``, ``(m, n_l)``.

    ``diag_w = (D^l)ᵀ (a^{l-1})² / m`` and ``diag_b = Σ_i D^l_i / m``: the column axis has
    already been summed, since ``a^{l-1}_i`` is the same for every column.
    """
    m = acts[0].shape[0]
    return tuple(
        {"w": d.T @ (a**2) / m, "b": jnp.sum(d, axis=0) / m}
        for a, d in zip(acts[:-1], weighted_sq, strict=True)
    )


def _output_columns(z, y, model):
    """Columns ``u_c`` (``(m, C, n_L)``) and weights ``h`` (``(m, C)``) with ``Σ_c h_c u_c u_cᵀ``
    equal to the output curvature ``J_fᵀ H J_f`` seen from ``z^L`` (see :func:`diag_ggn`)."""
    f, cost = model.output, model.cost.name
    n_out = z.shape[-1]
    eye = jnp.eye(n_out, dtype=z.dtype)
    if cost == "quadratic":  # split at a^L, H = I: columns of J_fᵀ
        cols = f.backward(z[..., None, :], eye)
        return cols, jnp.ones(cols.shape[:-1], z.dtype)
    if cost == "cross_entropy" and f.name == "sigmoid":  # split at z^L, H = diag(a(1-a))
        h = jax.nn.sigmoid(z) * jax.nn.sigmoid(-z)
        return jnp.broadcast_to(eye, (*z.shape, n_out)), h
    if cost == "log_likelihood":  # split at z^L, H = (Σy)(diag p - p pᵀ)
        p = jax.nn.softmax(z, axis=-1)
        cols = eye - p[..., None, :]  # u_c = e_c - p
        return cols, jnp.sum(y, axis=-1, keepdims=True) * p
    # cross_entropy with softmax: split at a^L, H_a = diag(y/p² + (1-y)/(1-p)²).
    # Column c of J_fᵀ is p_c (e_c - p) = p_c (1 - p_c) r_c with r_c = (e_c - p)/(1 - p_c),
    # whose entries lie in [-1, 1]; then h_c p_c² (1-p_c)² = y_c (1-p_c)² + (1-y_c) p_c².
    log_p, log_1mp = _log_a_and_log_1ma(z, f)
    off = -jnp.exp(log_p[..., None, :] - log_1mp[..., :, None])  # -p_j / (1 - p_c)
    cols = jnp.where(eye.astype(bool), 1.0, off)
    h = y * jnp.exp(2.0 * log_1mp) + (1.0 - y) * jnp.exp(2.0 * log_p)
    return cols, h


@partial(jax.jit, static_argnames="model")
def _diag_ggn_exact(params, X, Y, model, key):
    masks = batch_masks(key, model, X.shape[0], X.dtype)
    zs, acts = feedforward(params, X, model, masks)
    cols, h = _output_columns(zs[-1], Y, model)
    zs_c = [z[:, None, :] for z in zs]
    masks_c = None if masks is None else [mk[:, None, :] for mk in masks]
    deltas = _eq8(params, zs_c, cols, model, masks_c)
    weighted = [jnp.sum(h[..., None] * d**2, axis=1) for d in deltas]
    return _diag_from_squares(acts, weighted)


def _sampled_delta(z, y, model, key):
    """One ``δ^L`` per example whose outer product has expectation ``J_fᵀ H J_f`` (in ``z``)."""
    f, cost = model.output, model.cost.name
    if cost == "cross_entropy" and f.name == "softmax":
        # Rademacher ε: E[εεᵀ] = I, so Σ_c ε_c √h_c (column c) has the right second moment.
        cols, h = _output_columns(z, y, model)
        eps = jax.random.rademacher(key, h.shape, dtype=z.dtype)
        return jnp.einsum("...c,...cn->...n", eps * jnp.sqrt(jnp.maximum(h, 0.0)), cols), None
    if cost == "quadratic":  # y ~ N(a, I)
        y_s = f(z) + jax.random.normal(key, z.shape, z.dtype)
    elif f.name == "sigmoid":  # cross-entropy: y_j ~ Bernoulli(a_j), unit by unit
        y_s = jax.random.bernoulli(key, jax.nn.sigmoid(z)).astype(z.dtype)
    else:  # log-likelihood: y ~ Categorical(p)
        y_s = jax.nn.one_hot(jax.random.categorical(key, z, axis=-1), z.shape[-1], dtype=z.dtype)
    weight = jnp.sum(y, axis=-1, keepdims=True) if cost == "log_likelihood" else None
    return model.cost.delta(z, y_s, f), weight


@partial(jax.jit, static_argnames="model")
def _diag_ggn_mc(params, X, Y, model, key, mc_samples, mc_key):
    masks = batch_masks(key, model, X.shape[0], X.dtype)
    zs, acts = feedforward(params, X, model, masks)

    def one_sample(s, total):
        delta_L, weight = _sampled_delta(zs[-1], Y, model, jax.random.fold_in(mc_key, s))
        deltas = _eq8(params, zs, delta_L, model, masks)
        squares = [d**2 if weight is None else weight * d**2 for d in deltas]
        return [t + sq for t, sq in zip(total, squares, strict=True)]

    # The sample count is traced, not static: another count does not recompile.
    total = jax.lax.fori_loop(0, mc_samples, one_sample, [jnp.zeros_like(z) for z in zs])
    return _diag_from_squares(acts, [t / mc_samples for t in total])


_GGN_COSTS = ("quadratic", "cross_entropy", "log_likelihood")


def diag_ggn(
    params: Params,
    X: Array,
    Y: Array,
    model: Model,
    key: Array | None = None,
    mc_samples: int | None = None,
    mc_key: Array | None = None,
) -> Params:
    """Diagonal of the generalised Gauss-Newton matrix of the minibatch cost, like ``params``.

    ``G = mean_i J_iᵀ H_i J_i``, where the cost ``C_{x_i}`` is split as ``ℓ(o_i)`` with
    ``o_i`` a network output in which ``ℓ`` is convex, ``J_i = ∂o_i/∂p`` and
    ``H_i = ∇²ℓ(o_i)`` is positive semi-definite. The split used for each pairing:

    * ``cross_entropy`` + sigmoid: ``o = z^L``, ``H = diag(a(1-a))`` (independent of ``y``);
    * ``log_likelihood`` + softmax: ``o = z^L``, ``H = (Σ_j y_j)(diag(p) - p pᵀ)``
      (``diag(p) - p pᵀ`` for one-hot or probability targets);
    * ``quadratic`` with any output ``f``: ``o = a^L``, ``H = I``, so ``G = J_aᵀ J_a`` with
      ``J_a = J_f J_z`` (the Gauss-Newton matrix proper for an identity output);
    * ``cross_entropy`` + softmax: ``o = a^L``, ``H = diag(y/a² + (1-y)/(1-a)²)``, PSD for
      targets in ``[0, 1]``. The Hessian in ``z^L`` is *not* PSD here (e.g. ``-ln(1 - p_1)``
      is not convex in ``z`` for three or more classes), so this cost is split at ``a^L``.

    Exact (``mc_samples=None``): write ``J_fᵀ H J_f = Σ_c h_c u_c u_cᵀ`` with ``n_L`` columns
    ``u_c`` in ``z^L``-space (``J_f`` is the identity for the ``z^L`` splits), e.g.
    ``u_c = e_c - p``, ``h_c = p_c`` for softmax with log-likelihood, since
    ``S = diag(√p) - p √pᵀ`` has ``S Sᵀ = diag(p) - p pᵀ``. Each column is backpropagated as
    a ``δ^L`` by eq 8 (all columns at once, as BackPACK's ``DiagGGNExact`` does), giving
    ``δ^l_c``; then by eqs 9-10 and ``Σ_i (δ_i a_iᵀ)² = (δ²)ᵀ (a²)``,
    ``diag_w^l = (1/m) (Σ_c h_c (δ^l_c)²)ᵀ (a^{l-1})²`` and
    ``diag_b^l = (1/m) Σ_i Σ_c h_c (δ^l_{ic})²``: one matrix product per layer. Weighting
    the squares by ``h_c`` instead of scaling by ``√h_c`` avoids square roots and keeps
    ``G`` exact even for targets that make ``H`` indefinite. Memory is ``O(m n_L Σ_l n_l)``.

    Monte-Carlo (``mc_samples=S``, ``mc_key`` required): ``S`` backward passes, each from one
    sampled ``δ^L`` per example with ``E[δ^L δ^Lᵀ] = J_fᵀ H J_f``: targets ``ŷ`` drawn from the
    model's predictive distribution (sigmoid: Bernoulli per unit; softmax with
    log-likelihood: categorical; quadratic: ``ŷ ~ N(a^L, I)``) and ``δ^L = cost.delta(z, ŷ)``
    (eqs 6-7), as in BackPACK's ``DiagGGNMC``. For softmax with cross-entropy, whose ``H``
    depends on the true targets, ``δ^L = Σ_c ε_c √h_c u_c`` with Rademacher ``ε`` (this needs
    ``h_c >= 0``, i.e. targets in ``[0, 1]``). The squares are averaged over the samples, so
    the estimate is unbiased and converges to the exact diagonal; memory is
    ``O(m Σ_l n_l)`` whatever ``S``. Sample ``s`` uses ``jax.random.fold_in(mc_key, s)``, so a
    larger ``S`` reuses a smaller one's samples, and ``S`` is traced, so changing it does
    not recompile.

    The diagonal is of the *unregularised* cost (the mean of ``C_{x_i}``); an L2 term would
    add the constant ``l2/n`` to every weight entry and is left to the caller. With dropout,
    ``key`` draws the same per-example masks as :func:`jbackprop.grad`, and ``G`` is that of
    the network with those masks fixed. Arguments are checked as :func:`jbackprop.grad`
    checks them (``n`` is not needed).
    """
    given, (params, X, Y) = params, _batch(params, X, Y, model, None, key, regularised=False)
    if model.cost.name not in _GGN_COSTS:
        raise ValueError(
            f"diag_ggn: cost {model.cost.name!r} is not supported; expected one of {_GGN_COSTS}"
        )
    if mc_samples is None:
        if mc_key is not None:
            raise ValueError("diag_ggn: mc_key is given but mc_samples is None (exact mode)")
        return like(given, _diag_ggn_exact(params, X, Y, model, key))
    if isinstance(mc_samples, bool) or not hasattr(mc_samples, "__index__") or mc_samples < 1:
        raise ValueError(f"diag_ggn: mc_samples must be a positive integer, got {mc_samples!r}")
    if mc_key is None:
        raise ValueError("diag_ggn: mc_key is required when mc_samples is given")
    samples = operator.index(mc_samples)
    return like(given, _diag_ggn_mc(params, X, Y, model, key, samples, mc_key))


# --- gradient noise scale -------------------------------------------------------------


class NoiseScale(NamedTuple):
    """What :func:`noise_scale` returns; plain Python floats.

    Attributes:
      b_simple: ``tr(Σ) / |G|²``, the simple noise scale of McCandlish et al. (2018).
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
    """
    checks.check_n(n, model)
    if isinstance(chunk_size, bool) or not hasattr(chunk_size, "__index__") or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
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
