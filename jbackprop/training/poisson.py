"""One epoch of Poisson-sampled steps: the sampling the privacy accountants assume.

Every step includes every training example independently with probability
``q = batch_size / N`` (Abadi et al. 2016; :func:`jbackprop.privacy.epsilon`), so a step's
sample has no fixed size. :func:`run_poisson_epoch` keeps the compiled shapes fixed by
gathering the drawn examples into blocks of :func:`poisson_capacity` rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax import Array

from jbackprop import noise
from jbackprop.model import Model, Params
from jbackprop.network import add_penalty_grads, batch_deltas
from jbackprop.privacy import poisson_schedule, weighted_sums
from jbackprop.training.epoch import apply_update, report_progress

__all__ = ["MaskedMean", "poisson_capacity", "poisson_sample", "run_poisson_epoch"]


@dataclass(frozen=True)
class MaskedMean:
    """The non-private gradient of a Poisson-sampled step: :func:`jbackprop.grad` of the
    examples drawn, built block by block (the protocol :class:`~jbackprop.privacy.DPGradient`
    also follows)."""

    def masked_sum(self, params: Params, X, Y, model: Model, key, weights) -> Params:
        """``Σ_i w_i g_i`` over one block (eqs 9-10); padding has weight 0.

        Args:
          params: one ``{"w": (n_l, n_{l-1}), "b": (n_l,)}`` dict per layer.
          X: the block's inputs ``(cap, n_0)``.
          Y: its target vectors ``(cap, n_L)``.
          model: the network.
          key: the block's dropout key (unused without dropout).
          weights: ``(cap,)``, 1 for a drawn example and 0 for padding.

        Returns:
          The weighted sum of the block's per-example gradients, shaped like ``params``.
        """
        acts, deltas = batch_deltas(params, X, Y, model, key if model.has_dropout else None)
        return weighted_sums(acts, deltas, [weights] * len(deltas))

    def finish(self, sums: Params, params: Params, model: Model, n, count, expected, key):
        """The mean over the ``count`` examples drawn (a zero data term when none was),
        plus the regulariser's gradient (eq 13).

        Args:
          sums: the step's sum of :meth:`masked_sum` over its blocks.
          params: the parameters the step starts from.
          model: the network.
          n: training-set size of eqs 12-15.
          count: the number of examples drawn.
          expected: the expected sample size (unused: the mean divides by ``count``).
          key: the step's spare key (unused: no noise is drawn).

        Returns:
          The step's gradient, shaped like ``params``.
        """
        size = jnp.maximum(count, 1).astype(jax.tree.leaves(sums)[0].dtype)
        return add_penalty_grads(jax.tree.map(lambda s: s / size, sums), params, model, n)


def poisson_capacity(n: int, batch_size: int, multiple: int = 1) -> int:
    """Rows of one block of a Poisson-sampled step.

    The expected size ``μ = q n = batch_size`` plus three standard deviations
    ``sqrt(μ (1 - q))``, at most ``n``, rounded up to a multiple of ``multiple`` (the
    devices a block is sharded over). It sets the cost of a step, never its sample: a
    step that draws more examples processes them in further blocks, which happens in about
    one step in 700 (the normal tail beyond 3σ).

    Args:
      n: the training-set size.
      batch_size: the expected sample size ``q n``.
      multiple: the block's rows are a multiple of this.

    Returns:
      The block's number of rows.
    """
    q = batch_size / n
    cap = min(n, math.ceil(batch_size + 3 * math.sqrt(batch_size * (1 - q))))
    return -(-cap // multiple) * multiple


def poisson_sample(key: Array, n: int, batch_size: int) -> Array:
    """``(n,)`` booleans: each example is in the step's sample independently, with
    probability ``floor(q 2³²) / 2³²`` for ``q = batch_size / n``, i.e. ``q`` to 2⁻³² and
    never above it (32 random bits per example, :func:`jbackprop.noise.bits`, against an
    integer threshold).

    Args:
      key: the step's sampling key.
      n: the training-set size.
      batch_size: the expected sample size ``q n``.

    Returns:
      The sample as a ``(n,)`` boolean mask.
    """
    if batch_size >= n:
        return jnp.ones((n,), bool)
    threshold = (batch_size << 32) // n  # floor(q 2^32), exact in integers
    return noise.bits(key, n) < jnp.uint32(threshold)


def _rank_index(drawn: Array) -> tuple[Array, Array]:
    """The sample as 32-example words and the running count of drawn examples by word.

    Bit ``b`` of word ``w`` is ``drawn[32 w + b]``; ``ends[w]`` counts the drawn examples
    in words ``0..w``, so ``ends[-1]`` is the sample's size. Work in ``n / 32`` words
    instead of a prefix sum over all ``n`` examples, which is what makes finding a
    step's rows cheap beside its gradient.
    """
    padded = jnp.pad(drawn, (0, -drawn.shape[0] % 32)).reshape(-1, 32).astype(jnp.uint32)
    words = jnp.sum(padded << jnp.arange(32, dtype=jnp.uint32), axis=1, dtype=jnp.uint32)
    ends = jnp.cumsum(jax.lax.population_count(words), dtype=jnp.int32)
    return words, ends


def _ranked_rows(words: Array, ends: Array, ranks: Array, n: int) -> Array:
    """The indices of the drawn examples of the given ranks (0 is the lowest index drawn),
    found from :func:`_rank_index` by a binary search over the words and then over the bits
    of one word; a rank past the sample gives ``n - 1`` (padding, of weight 0)."""
    w = jnp.minimum(jnp.searchsorted(ends, ranks, side="right"), ends.shape[0] - 1)
    x = words[w]
    t = ranks - (ends[w] - jax.lax.population_count(x).astype(jnp.int32))  # rank within x
    bit = jnp.zeros_like(ranks)
    for width in (16, 8, 4, 2, 1):  # which half of the remaining bits holds the t-th set bit
        low = jax.lax.population_count(x & jnp.uint32((1 << width) - 1)).astype(jnp.int32)
        high = t >= low
        t, x, bit = jnp.where(high, t - low, t), jnp.where(high, x >> width, x), bit + high * width
    return jnp.minimum(32 * w + bit, n - 1)


def run_poisson_epoch(
    params: Params,
    opt_state: Any,
    model: Model,
    X: Array,
    Y: Array,
    key: Array,
    n: Any,
    *,
    optimizer: optax.GradientTransformation,
    batch_size: int,
    gradient: Any = None,
    capacity: int | None = None,
    shard: Callable[[Array], Array] = lambda x: x,
    progress: Callable[[int, int], None] | None = None,
):
    """``round(N / batch_size)`` steps of Poisson-sampled minibatches (``N = len(X)``).

    Each step includes every training example independently with probability
    ``q = batch_size / N`` (:func:`poisson_sample`), the sampling the privacy accountants
    assume (Abadi et al. 2016; :func:`jbackprop.privacy.epsilon`). Shapes stay fixed: the
    drawn examples are gathered into blocks of ``capacity`` rows (default
    :func:`poisson_capacity`), the rows past the sample are padding of weight 0, and a
    ``lax.while_loop`` runs as many blocks as the sample needs, so no drawn example is ever
    dropped and no padding contributes, whatever the sample's size. The gradient is the sum
    of ``gradient.masked_sum`` over the blocks, turned into the step's gradient by
    ``gradient.finish`` once: for ``gradient=None`` (:class:`MaskedMean`) the mean over the
    drawn examples, for :class:`~jbackprop.privacy.DPGradient` the clipped sum plus one
    noise draw, divided by the expected size ``q N = batch_size``.

    Traceable, unchecked. :func:`jbackprop.fit` jits this for ``sampling="poisson"``.

    Args:
      params: one ``{"w": (n_l, n_{l-1}), "b": (n_l,)}`` dict per layer.
      opt_state: the optimizer's state.
      model: the network; its ``l2``, ``l1`` and ``dropout`` may be traced.
      X: inputs ``(N, n_0)``, an array.
      Y: target vectors ``(N, n_L)``.
      key: split into one key per step, and each step's into the sample's, the dropout
        masks' (folded with the block number) and the noise's.
      n: training-set size of eqs 12-15.
      optimizer: an ``optax.GradientTransformation``.
      batch_size: the expected minibatch size ``q N``.
      gradient: ``None`` or an object with ``masked_sum`` and ``finish`` methods, such as
        :class:`~jbackprop.privacy.DPGradient`.
      capacity: rows per block; :func:`poisson_capacity` by default.
      shard: applied to every block's arrays (a sharding constraint).
      progress: called with ``(step, steps)`` about 50 times per epoch.

    Returns:
      ``(params, opt_state)`` after the epoch.
    """
    N = X.shape[0]
    grad_fn = MaskedMean() if gradient is None else gradient
    cap = poisson_capacity(N, batch_size) if capacity is None else capacity
    _, steps = poisson_schedule(N, batch_size)

    def step(carry, key):
        params, opt_state = carry
        k_sample, k_drop, k_finish = jax.random.split(key, 3)
        words, ends = _rank_index(poisson_sample(k_sample, N, batch_size))
        count = ends[-1]

        def block(state):
            j, sums = state
            ranks = j * cap + jnp.arange(cap)
            rows = _ranked_rows(words, ends, ranks, N)
            weights = (ranks < count).astype(X.dtype)
            part = grad_fn.masked_sum(
                params, shard(X[rows]), shard(Y[rows]), model,
                jax.random.fold_in(k_drop, j), shard(weights),
            )  # fmt: skip
            return j + 1, jax.tree.map(jnp.add, sums, part)

        zeros = jax.tree.map(jnp.zeros_like, params)
        _, sums = jax.lax.while_loop(lambda s: s[0] * cap < count, block, (0, zeros))
        g = grad_fn.finish(sums, params, model, n, count, batch_size, k_finish)
        return apply_update(optimizer, g, params, opt_state)

    def body(carry, xs):
        i, k = xs
        report_progress(progress, i, steps)
        return step(carry, k), None

    step_keys = jax.random.split(key, steps)
    carry, _ = jax.lax.scan(body, (params, opt_state), (jnp.arange(steps), step_keys))
    return carry
