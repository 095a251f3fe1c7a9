"""Curvature from one backward pass: the diagonal of the generalised Gauss-Newton matrix.

The per-example gradient of a dense layer is ``δ_i a_iᵀ`` (eq 10), so the elementwise
square sum ``Σ_i (δ_i a_iᵀ)² = (δ²)ᵀ (a²)`` is one matrix product per layer.
:func:`diag_ggn` applies it to ``δ``'s of a different kind: it runs the same backward pass
(eq 8, :func:`jbackprop.network.backward`) from the columns of a square root of the output
Hessian, which each cost supplies (``Cost.curvature``), instead of from ``δ^L``, as
BackPACK's ``DiagGGNExact`` and ``DiagGGNMC`` do.

**Exact** (``mc_samples=None``): write ``J_fᵀ H J_f = Σ_c h_c u_c u_cᵀ`` with ``n_L``
columns ``u_c`` in ``z^L``-space (``J_f`` is the identity for the ``z^L`` splits), e.g.
``u_c = e_c - p``, ``h_c = p_c`` for softmax with log-likelihood, since
``S = diag(√p) - p √pᵀ`` has ``S Sᵀ = diag(p) - p pᵀ``. Each column is backpropagated as a
``δ^L`` by eq 8 (all columns at once, as BackPACK's ``DiagGGNExact`` does), giving
``δ^l_c``; then by eqs 9-10 and ``Σ_i (δ_i a_iᵀ)² = (δ²)ᵀ (a²)``,
``diag_w^l = (1/m) (Σ_c h_c (δ^l_c)²)ᵀ (a^{l-1})²`` and
``diag_b^l = (1/m) Σ_i Σ_c h_c (δ^l_{ic})²``: one matrix product per layer. Weighting the
squares by ``h_c`` instead of scaling by ``√h_c`` avoids square roots and keeps ``G`` exact
even for targets that make ``H`` indefinite. Memory is ``O(m n_L Σ_l n_l)``.

**Monte-Carlo** (``mc_samples=S``, ``mc_key`` required): ``S`` backward passes, each from
one sampled ``δ^L`` per example with ``E[δ^L δ^Lᵀ] = J_fᵀ H J_f``: targets ``ŷ`` drawn from
the model's predictive distribution (sigmoid: Bernoulli per unit; softmax with
log-likelihood: categorical; quadratic: ``ŷ ~ N(a^L, I)``) and ``δ^L = cost.delta(z, ŷ)``
(eqs 6-7), as in BackPACK's ``DiagGGNMC``. For softmax with cross-entropy, whose ``H``
depends on the true targets, ``δ^L = Σ_c ε_c √h_c u_c`` with Rademacher ``ε`` (this needs
``h_c >= 0``, i.e. targets in ``[0, 1]``). The squares are averaged over the samples, so
the estimate is unbiased and converges to the exact diagonal; memory is ``O(m Σ_l n_l)``
whatever ``S``. Sample ``s`` uses ``jax.random.fold_in(mc_key, s)``, so a larger ``S``
reuses a smaller one's samples, and ``S`` is traced, so changing it does not recompile.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import Array

from jbackprop import checks
from jbackprop.model import Model, Params
from jbackprop.network import backward, batch_masks, feedforward

__all__ = ["diag_ggn"]


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


@jax.jit
def _diag_ggn_exact(params, X, Y, model, key):
    masks = batch_masks(key, model, X.shape[0], X.dtype)
    zs, acts = feedforward(params, X, model, masks)
    cols, h = model.cost.curvature(zs[-1], Y, model.output)
    zs_c = [z[:, None, :] for z in zs]
    masks_c = None if masks is None else [mk[:, None, :] for mk in masks]
    deltas = backward(params, zs_c, cols, model, masks_c)
    weighted = [jnp.sum(h[..., None] * d**2, axis=1) for d in deltas]
    return _diag_from_squares(acts, weighted)


@jax.jit
def _diag_ggn_mc(params, X, Y, model, key, mc_samples, mc_key):
    masks = batch_masks(key, model, X.shape[0], X.dtype)
    zs, acts = feedforward(params, X, model, masks)

    def one_sample(s, total):
        k = jax.random.fold_in(mc_key, s)
        delta_L, weight = model.cost.sample_delta(zs[-1], Y, model.output, k)
        deltas = backward(params, zs, delta_L, model, masks)
        squares = [d**2 if weight is None else weight * d**2 for d in deltas]
        return [t + sq for t, sq in zip(total, squares, strict=True)]

    # The sample count is traced, not static: another count does not recompile.
    total = jax.lax.fori_loop(0, mc_samples, one_sample, [jnp.zeros_like(z) for z in zs])
    return _diag_from_squares(acts, [t / mc_samples for t in total])


def diag_ggn(
    params: Params, X: Array, Y: Array, model: Model,
    key: Array | None = None, mc_samples: int | None = None, mc_key: Array | None = None,
) -> Params:  # fmt: skip
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

    Two modes, each one forward pass and then eq 8's backward pass from other ``δ^L``'s
    than the cost's (the module docstring derives them):

    * exact (``mc_samples=None``), as BackPACK's ``DiagGGNExact``: the ``n_L`` columns of a
      square root of the output Hessian are backpropagated at once; memory
      ``O(m n_L Σ_l n_l)``;
    * Monte-Carlo (``mc_samples=S``), as BackPACK's ``DiagGGNMC``: ``S`` backward passes,
      each from one sampled ``δ^L`` per example; memory ``O(m Σ_l n_l)`` whatever ``S``.
      The estimate is unbiased and converges to the exact diagonal.

    The diagonal is of the *unregularised* cost (the mean of ``C_{x_i}``); an L2 term would
    add the constant ``l2/n`` to every weight entry and is left to the caller. With dropout,
    ``key`` draws the same per-example masks as :func:`jbackprop.grad`, and ``G`` is that of
    the network with those masks fixed. Arguments are checked as :func:`jbackprop.grad`
    checks them (``n`` is not needed).

    Args:
      params: one ``{"w": (n_l, n_{l-1}), "b": (n_l,)}`` dict per layer, tuple or list.
      X: inputs ``(m, n_0)``.
      Y: integer class labels ``(m,)`` or target vectors ``(m, n_L)``.
      model: the :class:`~jbackprop.Model`; its ``l2`` and ``l1`` play no part.
      key: PRNG key drawing the dropout masks (example ``i`` uses
        ``jax.random.split(key, m)[i]``); required when ``model.has_dropout``.
      mc_samples: None for the exact diagonal, or the number ``S >= 1`` of Monte-Carlo
        samples. ``S`` is traced, so changing it does not recompile.
      mc_key: PRNG key of the Monte-Carlo samples, required with ``mc_samples``: sample
        ``s`` uses ``jax.random.fold_in(mc_key, s)``, so a larger ``S`` reuses a smaller
        one's samples.

    Returns:
      The diagonal with the structure of ``params`` (a tuple of
      ``{"w": (n_l, n_{l-1}), "b": (n_l,)}`` dicts, a list when ``params`` is a list), in
      the params' dtype: entry ``[l - 1]["w"][j, k]`` is ``G``'s diagonal entry for
      ``w^l_{jk}``.

    Raises:
      ValueError: a shape, a label or ``key`` is wrong; ``mc_key`` without ``mc_samples``
        or ``mc_samples`` without ``mc_key``; ``mc_samples`` not a positive integer.
    """
    given = params
    params, X, Y = checks.batch(params, X, Y, model, None, key, regularised=False)
    if mc_samples is None:
        if mc_key is not None:
            raise ValueError("diag_ggn: mc_key is given but mc_samples is None (exact mode)")
        return checks.like(given, _diag_ggn_exact(params, X, Y, model, key))
    samples = checks.positive_int("diag_ggn: mc_samples", mc_samples)
    if mc_key is None:
        raise ValueError("diag_ggn: mc_key is required when mc_samples is given")
    return checks.like(given, _diag_ggn_mc(params, X, Y, model, key, samples, mc_key))
