"""Autodiff references, written independently of the library, and measures of agreement.

The cost is the sigmoid network's cross-entropy written from the logits with log-sigmoid,
plus the L2 term; ``jax.grad`` differentiates it, ``jax.vmap(jax.grad)`` gives stored
per-example gradients and ``vmap(jacrev)`` the stored Jacobians of the GGN. The epoch
follows ``jbackprop.training``'s scheme (documented there, not imported): ``k_perm, k =
split(key)``, a permutation from ``k_perm``, a ``lax.scan`` over the full minibatches and the
remainder as one last, smaller minibatch; with ``optax.sgd`` as the update.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from typing import Any

import jax
import jax.numpy as jnp
import optax

from scripts.bench.harness import EpochFn
from scripts.bench.setting import DP_CLIP, DP_NOISE, LMBDA

AD = "jax.grad of the cost"

# (params, Xb, Yb, step key or None, n) -> the minibatch gradient with the L2 term
GradFn = Callable[[Any, jax.Array, jax.Array, Any, Any], Any]


# --- the cost and its derivatives ---------------------------------------------------------


def logits(params, x):
    """The sigmoid network's output pre-activations ``z^L`` for ``x`` of shape (..., n_0)."""
    a = x
    for layer in params[:-1]:
        a = jax.nn.sigmoid(a @ layer["w"].T + layer["b"])
    return a @ params[-1]["w"].T + params[-1]["b"]


def example_cost(params, x, y):
    """Cross-entropy of sigmoid outputs, from the logits with log-sigmoid."""
    z = logits(params, x)
    return -jnp.sum(y * jax.nn.log_sigmoid(z) + (1.0 - y) * jax.nn.log_sigmoid(-z), axis=-1)


def cost(params, X, Y, n, lmbda=LMBDA):
    l2 = sum(jnp.sum(layer["w"] ** 2) for layer in params)
    return jnp.mean(example_cost(params, X, Y)) + lmbda / (2.0 * n) * l2


grad = jax.grad(cost)
per_example = jax.vmap(jax.grad(example_cost), in_axes=(None, 0, 0))


def l2_grads(grads, params, n, lmbda=LMBDA):
    """Add the L2 term's gradient ``(lmbda/n) w`` to the weights (biases are not decayed)."""
    return tuple(
        {"w": g["w"] + (lmbda / n) * p["w"], "b": g["b"]}
        for g, p in zip(grads, params, strict=True)
    )


# --- reductions of stored per-example gradients -----------------------------------------


def sum0(g):
    """``Σ_i g_i`` over the leading (example) axis as a matrix-vector product ``1ᵀ G``.

    XLA:CPU runs ``jnp.sum(g, axis=0)`` on a stored ``(m, n_l, n_{l-1})`` array some 30-50x
    slower than this product, so the stored baselines use it to stay competitive."""
    m = g.shape[0]
    return (jnp.ones((m,), g.dtype) @ g.reshape(m, -1)).reshape(g.shape[1:])


def tree_mean0(tree):
    return jax.tree.map(lambda g: jnp.mean(g, axis=0), tree)


def stored_mean(G):
    """Materialise the per-example gradients (no fusion into a dot), then average them."""
    G = jax.lax.optimization_barrier(G)
    m = jax.tree.leaves(G)[0].shape[0]
    return jax.tree.map(lambda g: sum0(g) / m, G)


def reduce_stats(G, params, n):
    """jb.grad_stats' (grad, norms, sum of squares, variance) from stored gradients ``G``."""
    m = jax.tree.leaves(G)[0].shape[0]
    mean = jax.tree.map(lambda g: sum0(g) / m, G)
    sq = sum(jnp.sum(g.reshape(m, -1) ** 2, axis=1) for g in jax.tree.leaves(G))
    sum_sq = jax.tree.map(lambda g: sum0(g * g), G)
    var = jax.tree.map(lambda s, g: jnp.maximum(s / m - g**2, 0.0), sum_sq, mean)
    return l2_grads(mean, params, n), jnp.sqrt(sq), sum_sq, var


def stats(params, X, Y, n):
    """The statistics from stored ``vmap(grad)`` per-example gradients."""
    return reduce_stats(per_example(params, X, Y), params, n)


def sum_c(c, g):
    """``Σ_i c_i g_i`` over the leading axis as the product ``cᵀ G``."""
    m = g.shape[0]
    return (c @ g.reshape(m, -1)).reshape(g.shape[1:])


def dp_stored(G, key, clip=DP_CLIP, noise=DP_NOISE):
    """DP aggregation of stored per-example gradients written with fast reductions: norms
    over each example's row, ``Σ_i c_i g_i`` as ``cᵀ G``, noise, division by ``m``."""
    G = jax.lax.optimization_barrier(G)
    leaves, treedef = jax.tree.flatten(G)
    m = leaves[0].shape[0]
    norms = jnp.sqrt(sum(jnp.sum(g.reshape(m, -1) ** 2, axis=1) for g in leaves))
    c = clip / jnp.maximum(norms, clip)
    keys = jax.random.split(key, len(leaves))
    out = [
        (sum_c(c, g) + clip * noise * jax.random.normal(k, g.shape[1:])) / m
        for g, k in zip(leaves, keys, strict=True)
    ]
    return jax.tree.unflatten(treedef, out)


def diag_ggn(params, X, chunk: int = 100):
    """Diagonal GGN of sigmoid + cross-entropy, ``mean_i Σ_c h_ic (∂z_c/∂θ)²`` with
    ``h = σ(z)(1 - σ(z))``, from stored per-example Jacobians (``vmap(jacrev)``), in chunks."""
    m = X.shape[0]
    c = max(d for d in range(1, min(chunk, m) + 1) if m % d == 0)
    jac = jax.vmap(jax.jacrev(logits), in_axes=(None, 0))

    def part(xs):
        J = jac(params, xs)  # leaves (c, n_L, *shape)
        z = logits(params, xs)
        h = jax.nn.sigmoid(z) * jax.nn.sigmoid(-z)
        return jax.tree.map(lambda j: jnp.einsum("ic,ic...->...", h, j**2), J)

    parts = jax.lax.map(part, X.reshape(m // c, c, -1))
    return jax.tree.map(lambda s: jnp.sum(s, axis=0) / m, parts)


# --- epochs ----------------------------------------------------------------------------


def grad_step(grad_fn: GradFn, optimizer: optax.GradientTransformation) -> Callable:
    """One update ``(params, opt_state, Xb, Yb, key, n) -> (params, opt_state)``."""

    def step(params, opt_state, Xb, Yb, key, n):
        g = grad_fn(params, Xb, Yb, key, n)
        updates, opt_state = optimizer.update(g, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return step


def make_epoch(step: Callable, batch_size: int, step_keys: bool = False) -> Callable:
    """A jitted epoch ``(params, state, X, Y, key, n) -> (params, state)`` in the library's
    shuffle and minibatch scheme; ``step`` gets a per-step key split from the second half of
    the epoch key when ``step_keys``, else ``None``."""

    @jax.jit
    def epoch(params, state, X, Y, key, n):
        k_perm, k_steps = jax.random.split(key)
        size = X.shape[0]
        steps, rem = divmod(size, batch_size)
        perm = jax.random.permutation(k_perm, size)
        keys = jax.random.split(k_steps, steps + 1) if step_keys else None

        def body(carry, xs):
            ids, k = xs
            return step(*carry, X[ids], Y[ids], k, n), None

        full = perm[: steps * batch_size].reshape(steps, batch_size)
        ks = None if keys is None else keys[:steps]
        (params, state), _ = jax.lax.scan(body, (params, state), (full, ks))
        if rem:
            ids = perm[steps * batch_size :]
            k = None if keys is None else keys[steps]
            params, state = step(params, state, X[ids], Y[ids], k, n)
        return params, state

    return epoch


def on_data(epoch: Callable, X: jax.Array, Y: jax.Array, n: int) -> EpochFn:
    """A jitted ``make_epoch`` epoch as the harness calls it: ``(params, state, e, key)``."""

    def run(params, state, e, key):
        return epoch(params, state, X, Y, key, n)

    return run


@lru_cache(maxsize=32)
def ad_epoch(optimizer: optax.GradientTransformation, batch_size: int) -> Callable:
    """The ``jax.grad`` epoch: the reference every training section compares with."""
    return make_epoch(grad_step(lambda p, X, Y, k, n: grad(p, X, Y, n), optimizer), batch_size)


# --- agreement ----------------------------------------------------------------------------


def max_rel_err(a, b) -> float:
    """``max |a - b| / max |b|`` over every leaf of two pytrees."""
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    num = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(la, lb, strict=True))
    den = max(float(jnp.max(jnp.abs(y))) for y in lb)
    return num / den if den else num


def max_abs_diff(a, b) -> float:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(la, lb, strict=True))


def identical(a, b) -> bool:
    return all(
        bool(jnp.array_equal(x, y))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )
