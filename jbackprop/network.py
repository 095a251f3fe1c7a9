"""The network: initialisation, the forward pass (eqs 1-3) and backpropagation (eqs 5-10).

Every equation is written once, on arrays whose last axis is the layer's units, so the
same lines serve one example (``x: (n_0,)``) and a minibatch (``x: (m, n_0)``): ``z = a wᵀ + b``
is eq 3 applied to every row. The minibatch gradient never stores per-example gradients:
the mean of the outer products ``δ_i a_iᵀ`` (eq 10) is one matrix product ``δᵀ a / m``.

Public functions check their arguments in Python and then call jitted kernels with the
:class:`~jbackprop.Model` as a static argument, so they are fast when called eagerly and
cost nothing extra inside a user's own ``jax.jit``.
"""

from __future__ import annotations

import operator
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax import Array

from jbackprop import checks
from jbackprop.model import Model, Params
from jbackprop.regularizers import dropout_masks, penalty, penalty_grad

__all__ = [
    "backprop",
    "cost",
    "forward",
    "grad",
    "init_params",
    "per_example_grads",
    "value_and_grad",
]

SCHEMES = ("normal", "scaled")


def init_params(
    key: Array, model: Model, scheme: str = "scaled", dtype: Any = jnp.float32
) -> Params:
    """Random parameters for ``model``; the same key gives the same parameters.

    ``scheme="scaled"`` (the default) draws weights from ``N(0, 1/n_{l-1})`` so that ``z``
    starts with unit variance and sigmoid units do not saturate; ``"normal"`` draws them
    from ``N(0, 1)``, the book's chapter-1 choice. Biases are ``N(0, 1)`` in both schemes,
    as in the book (the lecture allows any start for biases).
    """
    if scheme not in SCHEMES:
        raise ValueError(f"init_params: unknown scheme {scheme!r}; expected one of {SCHEMES}")
    if not isinstance(model, Model):
        raise ValueError(
            f"init_params: model must be a jbackprop.Model, got {type(model).__name__}"
        )
    params = []
    keys = jax.random.split(key, model.num_layers)
    for k, n_in, n_out in zip(keys, model.sizes[:-1], model.sizes[1:], strict=True):
        kw, kb = jax.random.split(k)
        scale = 1.0 / jnp.sqrt(n_in) if scheme == "scaled" else 1.0
        w = scale * jax.random.normal(kw, (n_out, n_in), dtype)
        b = jax.random.normal(kb, (n_out,), dtype)
        params.append({"w": w.astype(dtype), "b": b})
    return tuple(params)


# --- the equations --------------------------------------------------------------------


def feedforward(params: Params, x: Array, model: Model, masks=None):
    """Eq 3 layer by layer, keeping every ``z^l`` and ``a^l`` (``a^0 = x``) for backprop.

    With dropout, hidden activations are multiplied by their inverted-dropout masks.
    """
    zs, acts = [], [x]
    for l, layer in enumerate(params, start=1):
        z = acts[-1] @ layer["w"].T + layer["b"]
        a = model.activation(l)(z)
        if masks is not None and l < model.num_layers:
            a = a * masks[l - 1]
        zs.append(z)
        acts.append(a)
    return zs, acts


def backward(params: Params, zs, y: Array, model: Model, masks=None) -> list[Array]:
    """``δ^L`` by eq 6 or 7 (the cost's ``delta``), then ``δ^l`` backwards by eq 8."""
    deltas = [model.cost.delta(zs[-1], y, model.output)]
    for l in range(model.num_layers - 1, 0, -1):
        g = deltas[0] @ params[l]["w"]  # (w^{l+1})ᵀ δ^{l+1}, row by row
        if masks is not None:
            g = g * masks[l - 1]
        deltas.insert(0, model.hidden.backward(zs[l - 1], g))
    return deltas


def example_grads(acts, deltas) -> Params:
    """Eqs 9-10 for one example: ``∂C/∂b^l = δ^l``, ``∂C/∂w^l = δ^l (a^{l-1})ᵀ``."""
    return tuple({"w": jnp.outer(d, a), "b": d} for a, d in zip(acts[:-1], deltas, strict=True))


def mean_grads(acts, deltas) -> Params:
    """Eqs 9-10 averaged over a minibatch as matrix products: ``δᵀ a / m`` and ``1ᵀ δ / m``."""
    m = deltas[0].shape[0]
    ones = jnp.full((m,), 1.0 / m, deltas[0].dtype)
    return tuple({"w": d.T @ a / m, "b": ones @ d} for a, d in zip(acts[:-1], deltas, strict=True))


def squared_norms(acts, deltas) -> Array:
    """``‖g_i‖² = Σ_l ‖δ^l_i‖² (‖a^{l-1}_i‖² + 1)`` for every row ``i``: the squared norm of
    each example's gradient (eqs 9-10, ``‖δ aᵀ‖ = ‖δ‖ ‖a‖``) without forming it."""
    return sum(
        jnp.sum(d * d, axis=-1) * (jnp.sum(a * a, axis=-1) + 1.0)
        for a, d in zip(acts[:-1], deltas, strict=True)
    )


def add_penalty_grads(grads: Params, params: Params, model: Model, n) -> Params:
    """Eq 13 (and its L1 analogue): add the regulariser's gradient to each ``∂C_0/∂w``."""
    out = []
    for g, p in zip(grads, params, strict=True):
        extra = penalty_grad(p["w"], model, n)
        out.append(g if extra is None else {"w": g["w"] + extra, "b": g["b"]})
    return tuple(out)


def batch_masks(key, model: Model, m: int, dtype):
    return dropout_masks(key, model, m, dtype) if key is not None else None


def batch_deltas(params: Params, X: Array, Y: Array, model: Model, key):
    """One forward and one backward pass of a minibatch with its dropout masks:
    every ``a^{l-1}`` and ``δ^l`` that eqs 9-10 (and the statistics built on them) need."""
    masks = batch_masks(key, model, X.shape[0], X.dtype)
    zs, acts = feedforward(params, X, model, masks)
    return acts, backward(params, zs, Y, model, masks)


# --- jitted kernels (validated arguments only) ----------------------------------------


@partial(jax.jit, static_argnames="model")
def _forward(params, x, model):
    return feedforward(params, x, model)[1][-1]


@partial(jax.jit, static_argnames="model")
def _backprop(params, x, y, model, key):
    masks = dropout_masks(key, model, None, x.dtype) if key is not None else None
    zs, acts = feedforward(params, x, model, masks)
    return example_grads(acts, backward(params, zs, y, model, masks))


@partial(jax.jit, static_argnames=("model", "chunk_size"))
def _per_example_grads(params, X, Y, model, key, chunk_size):
    keys = jax.random.split(key, X.shape[0]) if key is not None else None

    def one(args):
        x, y, k = args
        return _backprop(params, x, y, model, k)

    if chunk_size is None or chunk_size >= X.shape[0]:
        return jax.vmap(one)((X, Y, keys))
    # lax.map vmaps `one` over chunks, so peak memory is one chunk's intermediates.
    return jax.lax.map(one, (X, Y, keys), batch_size=chunk_size)


@partial(jax.jit, static_argnames="model")
def _grad(params, X, Y, model, n, key):
    grads = mean_grads(*batch_deltas(params, X, Y, model, key))
    return add_penalty_grads(grads, params, model, n)


@partial(jax.jit, static_argnames="model")
def _cost(params, X, Y, model, n, key):
    masks = batch_masks(key, model, X.shape[0], X.dtype)
    zs, _ = feedforward(params, X, model, masks)
    return jnp.mean(model.cost.fn(zs[-1], Y, model.output)) + penalty(params, model, n)


@partial(jax.jit, static_argnames="model")
def _value_and_grad(params, X, Y, model, n, key):
    masks = batch_masks(key, model, X.shape[0], X.dtype)
    zs, acts = feedforward(params, X, model, masks)
    c = jnp.mean(model.cost.fn(zs[-1], Y, model.output)) + penalty(params, model, n)
    grads = mean_grads(acts, backward(params, zs, Y, model, masks))
    return c, add_penalty_grads(grads, params, model, n)


# --- public API -----------------------------------------------------------------------


def like(params, tree):
    """``tree`` with its per-layer tuples as lists when the caller's ``params`` is a list,
    so gradients have exactly the structure of the parameters (as ``jax.grad`` gives)."""
    if not isinstance(params, list) or not isinstance(tree, tuple):
        return tree
    if hasattr(tree, "_fields"):  # a NamedTuple of results
        return type(tree)(*(like(params, t) for t in tree))
    if tree and all(isinstance(t, dict) for t in tree):
        return list(tree)
    return tuple(like(params, t) for t in tree)


def _batch(params, X, Y, model, n, key, regularised=True):
    """Check a minibatch call's arguments; return ``params``, ``X`` and ``Y`` as arrays."""
    checks.check_params(params, model)
    X = checks.inputs(X, model, params, batched=True, name="X")
    Y = checks.targets(Y, model, params, (X.shape[0],), name="Y")
    if regularised:
        checks.check_n(n, model)
    checks.check_key(key, model)
    return tuple(params), X, Y


def forward(params: Params, x: Array, model: Model) -> Array:
    """The output ``a^L`` for input ``x`` of shape ``(n_0,)`` or ``(m, n_0)`` (eq 3).

    This is inference: dropout is off (inverted dropout needs no rescaling here).
    """
    checks.check_params(params, model)
    x = checks.inputs(x, model, params, batched=None)
    return _forward(tuple(params), x, model)


def backprop(params: Params, x: Array, y: Array, model: Model, key: Array | None = None) -> Params:
    """``∂C_x/∂p`` for ONE example by eqs 5-10, unregularised.

    ``x`` has shape ``(n_0,)``; ``y`` is a target vector ``(n_L,)`` or an integer label.
    ``key`` draws this example's dropout masks; the forward pass and eq 8 use the same
    masks.
    """
    checks.check_params(params, model)
    x = checks.inputs(x, model, params, batched=False)
    y = checks.targets(y, model, params, (), name="y")
    checks.check_key(key, model)
    return like(params, _backprop(tuple(params), x, y, model, key))


def per_example_grads(
    params: Params,
    X: Array,
    Y: Array,
    model: Model,
    key: Array | None = None,
    chunk_size: int | None = None,
) -> Params:
    """``jax.vmap`` of :func:`backprop`: each leaf gains a leading axis of size ``m``.

    Example ``i`` uses dropout key ``jax.random.split(key, m)[i]``, the same masks
    :func:`grad` and :func:`cost` use. ``chunk_size`` bounds the memory of the
    intermediates: examples are processed that many at a time (the result itself still
    holds ``m`` gradients). It trades time for memory (about 1.3-2x slower on a CPU); pick a
    divisor of ``m``, since a remainder costs a second pass. To reduce stored per-example
    gradients over the examples, prefer ``jnp.ones(m) @ g.reshape(m, -1)`` to
    ``g.sum(0)``: XLA's CPU reductions over a leading axis are far slower than the product.
    """
    given, (params, X, Y) = params, _batch(params, X, Y, model, None, key, regularised=False)
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not hasattr(chunk_size, "__index__") or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    chunk = None if chunk_size is None else operator.index(chunk_size)
    return like(given, _per_example_grads(params, X, Y, model, key, chunk))


def grad(
    params: Params, X: Array, Y: Array, model: Model, n: int | None = None, key: Array | None = None
) -> Params:
    """The minibatch gradient: mean of the per-example gradients plus the regulariser's.

    Equals ``mean(per_example_grads(...)) + (l2/n) w + (l1/n) sign(w)`` (eqs 9-13), computed
    as matrix products. ``n`` is the training-set size, required when ``l1`` or ``l2`` is on.
    """
    given, (params, X, Y) = params, _batch(params, X, Y, model, n, key)
    return like(given, _grad(params, X, Y, model, n, key))


def cost(
    params: Params, X: Array, Y: Array, model: Model, n: int | None = None, key: Array | None = None
) -> Array:
    """The objective :func:`grad` differentiates: ``mean C_x + l2/(2n) Σ w² + l1/n Σ |w|``.

    With the same ``key`` it applies the same dropout masks as :func:`grad`, so
    ``jax.grad(cost)`` and :func:`grad` agree.
    """
    params, X, Y = _batch(params, X, Y, model, n, key)
    return _cost(params, X, Y, model, n, key)


def value_and_grad(
    params: Params, X: Array, Y: Array, model: Model, n: int | None = None, key: Array | None = None
) -> tuple[Array, Params]:
    """:func:`cost` and :func:`grad` from one forward pass."""
    given, (params, X, Y) = params, _batch(params, X, Y, model, n, key)
    return like(given, _value_and_grad(params, X, Y, model, n, key))
