"""The network: initialisation, the forward pass (eqs 1-3) and backpropagation (eqs 5-10).

Every equation is written once, on arrays whose last axis is the layer's units, so the
same lines serve one example (``x: (n_0,)``) and a minibatch (``x: (m, n_0)``): eq 3,
``z = w a + b``, is applied to every row ``a`` of the minibatch. The minibatch gradient
never stores per-example gradients: the mean of the outer products ``δ_i a_iᵀ`` (eq 10) is
one matrix product ``δᵀ a / m``.

There is one forward pass, :func:`feedforward`, and one backward pass,
``backward(params, zs, delta_L, model, masks)`` (eq 8 from a given ``δ^L``); the public
functions here and the quantities of :mod:`jbackprop.privacy`, :mod:`jbackprop.stats`,
:mod:`jbackprop.curvature` and :mod:`jbackprop.attribution` all reuse them.

Conventions of the public functions (and of those built on them):

* ``params``: a tuple (or list) with one ``{"w": (n_l, n_{l-1}), "b": (n_l,)}`` dict per
  layer ``l = 1..L``. Its dtype (that of ``params[0]["w"]``) is the dtype of the
  computation: inputs and targets are cast to it. Gradients come back with the structure
  of ``params``, as lists where ``params`` is a list, as ``jax.grad`` gives them.
* ``X: (m, n_0)``, a minibatch of inputs; ``Y``, its integer class labels ``(m,)``
  (one-hot encoded inside) or target vectors ``(m, n_L)``.
* ``n``: the training-set size of eqs 12-15, not the minibatch size; required when
  ``model.l2`` or ``model.l1`` is on.
* ``key``: the PRNG key drawing the dropout masks; required when ``model.has_dropout``,
  ignored otherwise. Example ``i`` of a minibatch uses ``jax.random.split(key, m)[i]``,
  so every function draws the same masks from the same key.

Public functions check their arguments in Python and then call jitted kernels; a bad
argument is a ``ValueError`` naming it. The :class:`~jbackprop.Model` enters them as a
pytree: its architecture (sizes, activations, cost, ``has_dropout``) picks the compiled
program, while ``l2``, ``l1`` and the dropout rate are traced values, so changing them does
not recompile. The kernels are fast when called eagerly and cost nothing extra inside a
user's own ``jax.jit``, where the model can be an ordinary (traced) argument.
"""

from __future__ import annotations

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
# Unchecked building blocks for the quantities built on one backward pass (privacy, stats,
# curvature, attribution) and for training: feedforward, backward, batch_deltas,
# mean_grads, squared_norms, add_penalty_grads, objective, minibatch_grad.

SCHEMES = ("normal", "scaled")


def init_params(
    key: Array, model: Model, scheme: str = "scaled", dtype: Any = jnp.float32
) -> Params:
    """Random parameters for ``model``; the same key gives the same parameters.

    ``scheme="scaled"`` (the default) draws weights from ``N(0, 1/n_{l-1})`` so that ``z``
    starts with unit variance and sigmoid units do not saturate; ``"normal"`` draws them
    from ``N(0, 1)``, the book's chapter-1 choice. Biases are ``N(0, 1)`` in both schemes,
    as in the book (the lecture allows any start for biases).

    Args:
      key: a PRNG key (``jax.random.key(0)`` or a raw ``jax.random.PRNGKey(0)``); layer
        ``l`` draws from ``jax.random.split(key, L)[l - 1]``.
      model: the :class:`~jbackprop.Model`; only its ``sizes`` matter.
      scheme: ``"scaled"`` or ``"normal"``, as above.
      dtype: the floating dtype of every leaf (``jnp.float32`` by default).

    Returns:
      A tuple with one ``{"w": (n_l, n_{l-1}), "b": (n_l,)}`` dict per layer ``l = 1..L``,
      every leaf of ``dtype``.

    Raises:
      ValueError: ``scheme`` is unknown, or ``model`` is not a ``Model``.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"init_params: unknown scheme {scheme!r}; expected one of {SCHEMES}")
    checks.check_model(model, "init_params")
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
    Unchecked: the public functions have validated the arguments and cast ``x``.

    Args:
      params: one ``{"w": (n_l, n_{l-1}), "b": (n_l,)}`` dict per layer.
      x: ``(n_0,)`` or ``(m, n_0)``.
      model: gives each layer's activation.
      masks: ``[(..., n_l) for l = 1..L-1]`` from :func:`batch_masks`, or None.

    Returns:
      ``(zs, acts)``: ``zs = [z^1, ..., z^L]`` and ``acts = [a^0, ..., a^L]``, each of shape
      ``(..., n_l)`` with the leading axes of ``x``.
    """
    zs, acts = [], [x]
    for l, layer in enumerate(params, start=1):
        # z = w a + b on the columns aᵀ, as eq 3 writes it: w stays the left operand, so
        # XLA never copies a transposed w (which costs a pass over w¹ per step when many
        # models are vmapped).
        z = (layer["w"] @ acts[-1].T).T + layer["b"]
        a = model.activation(l)(z)
        if masks is not None and l < model.num_layers:
            a = a * masks[l - 1]
        zs.append(z)
        acts.append(a)
    return zs, acts


def backward(params: Params, zs, delta_L: Array, model: Model, masks=None) -> list[Array]:
    """Eq 8 from a given ``δ^L``: ``δ^l = ((w^{l+1})ᵀ δ^{l+1}) ⊙ f'(z^l)``, back to ``l = 1``.

    ``δ^L`` is usually the cost's (eqs 6-7, see :func:`output_delta`); other quantities
    start from another one (a column of the output Hessian's root for the Gauss-Newton, a
    unit vector for the neural tangent kernel). Arrays may carry extra axes before the unit
    axis, as long as ``zs`` and ``masks`` broadcast against ``δ^L``.

    Args:
      params: one ``{"w": (n_l, n_{l-1}), "b": (n_l,)}`` dict per layer (a tuple).
      zs: ``[z^1, ..., z^L]`` from :func:`feedforward`, ``z^l`` of shape ``(..., n_l)``.
      delta_L: the starting ``δ^L``, ``(..., n_L)``.
      model: gives the hidden activation's ``f'``.
      masks: the dropout masks the forward pass used, ``[(..., n_l) for l = 1..L-1]``, or
        None; eq 8 must use the same ones.

    Returns:
      ``[δ^1, ..., δ^L]``, ``δ^l`` of shape ``(..., n_l)``.
    """
    deltas = [delta_L]
    for l in range(model.num_layers - 1, 0, -1):
        g = deltas[0] @ params[l]["w"]  # (w^{l+1})ᵀ δ^{l+1}, row by row
        if masks is not None:
            g = g * masks[l - 1]
        deltas.insert(0, model.hidden.backward(zs[l - 1], g))
    return deltas


def output_delta(zs, y: Array, model: Model) -> Array:
    """``δ^L`` by eq 6 or 7: the cost's ``delta`` at ``z^L``."""
    return model.cost.delta(zs[-1], y, model.output)


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


def _size(n):
    # n is needed only when l2 or l1 is on (checked before tracing); 1 keeps 0/n finite.
    return 1.0 if n is None else n


def add_penalty_grads(grads: Params, params: Params, model: Model, n) -> Params:
    """Eq 13 (and its L1 analogue): add the regulariser's gradient to each ``∂C_0/∂w``."""
    return tuple(
        {"w": g["w"] + penalty_grad(p["w"], model.l2, model.l1, _size(n)), "b": g["b"]}
        for g, p in zip(grads, params, strict=True)
    )


def objective(params: Params, z_L: Array, Y: Array, model: Model, n) -> Array:
    """Eq 11: the mean cost ``C_0`` of a minibatch from its ``z^L``, plus the regulariser."""
    c0 = jnp.mean(model.cost.fn(z_L, Y, model.output))
    return c0 + penalty(params, model.l2, model.l1, _size(n))


def batch_masks(key, model: Model, m: int | None, dtype):
    """The dropout masks of ``m`` examples (one when ``m`` is None), or None without dropout."""
    if key is None or not model.has_dropout:
        return None
    return dropout_masks(key, model.widths, model.dropout, m, dtype)


def batch_deltas(params: Params, X: Array, Y: Array, model: Model, key):
    """One forward and one backward pass of a minibatch with its dropout masks:
    every ``a^{l-1}`` and ``δ^l`` that eqs 9-10 (and the statistics built on them) need."""
    masks = batch_masks(key, model, X.shape[0], X.dtype)
    zs, acts = feedforward(params, X, model, masks)
    return acts, backward(params, zs, output_delta(zs, Y, model), model, masks)


def minibatch_grad(params: Params, X: Array, Y: Array, model: Model, n, key) -> Params:
    """Eqs 9-13 for a checked minibatch: the mean gradient plus the regulariser's."""
    return add_penalty_grads(mean_grads(*batch_deltas(params, X, Y, model, key)), params, model, n)


# --- jitted kernels (validated arguments only) ----------------------------------------


@jax.jit
def _forward(params, x, model):
    return feedforward(params, x, model)[1][-1]


@jax.jit
def _backprop(params, x, y, model, key):
    masks = batch_masks(key, model, None, x.dtype)
    zs, acts = feedforward(params, x, model, masks)
    return example_grads(acts, backward(params, zs, output_delta(zs, y, model), model, masks))


@partial(jax.jit, static_argnames="chunk_size")
def _per_example_grads(params, X, Y, model, key, chunk_size):
    keys = jax.random.split(key, X.shape[0]) if key is not None else None

    def one(args):
        x, y, k = args
        return _backprop(params, x, y, model, k)

    if chunk_size is None or chunk_size >= X.shape[0]:
        return jax.vmap(one)((X, Y, keys))
    # lax.map vmaps `one` over chunks, so peak memory is one chunk's intermediates.
    return jax.lax.map(one, (X, Y, keys), batch_size=chunk_size)


_grad = jax.jit(minibatch_grad)


@jax.jit
def _cost(params, X, Y, model, n, key):
    zs, _ = feedforward(params, X, model, batch_masks(key, model, X.shape[0], X.dtype))
    return objective(params, zs[-1], Y, model, n)


@jax.jit
def _value_and_grad(params, X, Y, model, n, key):
    masks = batch_masks(key, model, X.shape[0], X.dtype)
    zs, acts = feedforward(params, X, model, masks)
    grads = mean_grads(acts, backward(params, zs, output_delta(zs, Y, model), model, masks))
    return objective(params, zs[-1], Y, model, n), add_penalty_grads(grads, params, model, n)


# --- public API -----------------------------------------------------------------------


def forward(params: Params, x: Array, model: Model) -> Array:
    """The output ``a^L`` for input ``x`` of shape ``(n_0,)`` or ``(m, n_0)`` (eq 3).

    This is inference: dropout is off (inverted dropout needs no rescaling here).

    Args:
      params: one ``{"w": (n_l, n_{l-1}), "b": (n_l,)}`` dict per layer, tuple or list.
      x: one input ``(n_0,)`` or a batch ``(m, n_0)``; cast to the params' dtype.
      model: the :class:`~jbackprop.Model`; its ``l2``, ``l1`` and dropout rate play no part.

    Returns:
      ``a^L`` of shape ``(n_L,)`` or ``(m, n_L)``, following ``x``, in the params' dtype.
      With a softmax output the rows are class probabilities; the best guess is the
      ``argmax`` over the last axis.

    Raises:
      ValueError: ``params`` or ``x`` does not fit the model's sizes.
    """
    checks.check_model(model)
    checks.check_params(params, model)
    x = checks.inputs(x, model, params, batched=None)
    return _forward(tuple(params), x, model)


def backprop(params: Params, x: Array, y: Array, model: Model, key: Array | None = None) -> Params:
    """``∂C_x/∂p`` for ONE example by eqs 5-10, unregularised.

    A forward pass keeping every ``z^l`` (eq 3), ``δ^L`` by eq 6 or 7, ``δ^l`` backwards by
    eq 8, then ``∂C_x/∂b^l = δ^l`` (eq 9) and ``∂C_x/∂w^l = δ^l (a^{l-1})ᵀ`` (eq 10). There
    is no L1/L2 term: the regulariser belongs to the whole cost (see :func:`grad`).

    Args:
      params: one ``{"w": (n_l, n_{l-1}), "b": (n_l,)}`` dict per layer, tuple or list.
      x: one input, ``(n_0,)``.
      y: its target vector ``(n_L,)`` or its integer class label (shape ``()``).
      model: the :class:`~jbackprop.Model`.
      key: PRNG key drawing this example's dropout masks; the forward pass and eq 8 use
        the same masks. Required when ``model.has_dropout``, ignored otherwise. With
        ``key=jax.random.split(k, m)[i]`` the result is example ``i`` of
        ``per_example_grads(..., key=k)``.

    Returns:
      ``∂C_x/∂p`` with the structure of ``params`` (a tuple of
      ``{"w": (n_l, n_{l-1}), "b": (n_l,)}`` dicts, a list when ``params`` is a list), in
      the params' dtype.

    Raises:
      ValueError: a shape, a label or ``key`` does not fit the model.
    """
    checks.check_model(model)
    checks.check_params(params, model)
    x = checks.inputs(x, model, params, batched=False)
    y = checks.targets(y, model, params, (), name="y")
    checks.check_key(key, model)
    return checks.like(params, _backprop(tuple(params), x, y, model, key))


def per_example_grads(
    params: Params, X: Array, Y: Array, model: Model,
    key: Array | None = None, chunk_size: int | None = None,
) -> Params:  # fmt: skip
    """``jax.vmap`` of :func:`backprop`: each leaf gains a leading axis of size ``m``.

    The gradients are unregularised (eqs 5-10 per example), so there is no ``n``. To
    reduce stored per-example gradients over the examples, prefer
    ``jnp.ones(m) @ g.reshape(m, -1)`` to ``g.sum(0)``: XLA's CPU reductions over a leading
    axis are far slower than the product.

    Args:
      params: one ``{"w": (n_l, n_{l-1}), "b": (n_l,)}`` dict per layer, tuple or list.
      X: inputs ``(m, n_0)``.
      Y: integer class labels ``(m,)`` or target vectors ``(m, n_L)``.
      model: the :class:`~jbackprop.Model`.
      key: PRNG key drawing the dropout masks: example ``i`` uses
        ``jax.random.split(key, m)[i]``, the same masks :func:`grad` and :func:`cost` use.
        Required when ``model.has_dropout``, ignored otherwise.
      chunk_size: bounds the memory of the intermediates: examples are processed that
        many at a time (the result itself still holds ``m`` gradients). It trades time for
        memory (about 1.3-2x slower on a CPU); pick a divisor of ``m``, since a remainder
        costs a second pass. None (the default) processes all ``m`` at once.

    Returns:
      The structure of ``params`` (a list when ``params`` is a list) with leaves
      ``{"w": (m, n_l, n_{l-1}), "b": (m, n_l)}``, in the params' dtype; row ``i`` is
      ``∂C_{x_i}/∂p``.

    Raises:
      ValueError: a shape, a label, ``key`` or ``chunk_size`` is wrong.
    """
    given, (params, X, Y) = params, checks.batch(params, X, Y, model, None, key, regularised=False)
    chunk = checks.positive_int("chunk_size", chunk_size, allow_none=True)
    return checks.like(given, _per_example_grads(params, X, Y, model, key, chunk))


def grad(
    params: Params, X: Array, Y: Array, model: Model, n: int | None = None, key: Array | None = None
) -> Params:
    """The minibatch gradient: mean of the per-example gradients plus the regulariser's.

    Equals ``mean(per_example_grads(...)) + (l2/n) w + (l1/n) sign(w)`` (eqs 9-13), computed
    as matrix products (``δᵀ a / m`` for eq 10); biases get no regulariser term (eq 16).
    Fed to ``optax.sgd(eta)`` it gives eq 4's step, which with L2 on is eqs 14-16.

    Args:
      params: one ``{"w": (n_l, n_{l-1}), "b": (n_l,)}`` dict per layer, tuple or list.
      X: inputs ``(m, n_0)``.
      Y: integer class labels ``(m,)`` or target vectors ``(m, n_L)``.
      model: the :class:`~jbackprop.Model`; its ``l2`` and ``l1`` may be traced.
      n: the training-set size of eqs 12-15 (not ``m``); required when ``l1`` or ``l2``
        is on, ignored otherwise.
      key: PRNG key drawing the dropout masks (example ``i`` uses
        ``jax.random.split(key, m)[i]``); required when ``model.has_dropout``.

    Returns:
      ``∂C/∂p`` with the structure of ``params`` (a tuple of
      ``{"w": (n_l, n_{l-1}), "b": (n_l,)}`` dicts, a list when ``params`` is a list), in
      the params' dtype.

    Raises:
      ValueError: a shape, a label, ``n`` or ``key`` is wrong or missing.
    """
    given, (params, X, Y) = params, checks.batch(params, X, Y, model, n, key)
    return checks.like(given, _grad(params, X, Y, model, n, key))


def cost(
    params: Params, X: Array, Y: Array, model: Model, n: int | None = None, key: Array | None = None
) -> Array:
    """The objective :func:`grad` differentiates: ``mean C_x + l2/(2n) Σ w² + l1/n Σ |w|``.

    Eq 11 with the L2 term of eq 12 and the L1 term, over the minibatch. With the same
    ``key`` it applies the same dropout masks as :func:`grad`, so ``jax.grad(cost)`` and
    :func:`grad` agree.

    Args:
      params: one ``{"w": (n_l, n_{l-1}), "b": (n_l,)}`` dict per layer, tuple or list.
      X: inputs ``(m, n_0)``.
      Y: integer class labels ``(m,)`` or target vectors ``(m, n_L)``.
      model: the :class:`~jbackprop.Model`.
      n: the training-set size of eqs 12-15; required when ``l1`` or ``l2`` is on.
      key: PRNG key drawing the dropout masks; required when ``model.has_dropout``.

    Returns:
      The cost, a scalar array (shape ``()``) in the params' dtype.

    Raises:
      ValueError: a shape, a label, ``n`` or ``key`` is wrong or missing.
    """
    params, X, Y = checks.batch(params, X, Y, model, n, key)
    return _cost(params, X, Y, model, n, key)


def value_and_grad(
    params: Params, X: Array, Y: Array, model: Model, n: int | None = None, key: Array | None = None
) -> tuple[Array, Params]:
    """:func:`cost` and :func:`grad` from one forward pass.

    Args:
      params, X, Y, model, n, key: as for :func:`cost`.

    Returns:
      ``(cost, grad)``: the scalar cost (shape ``()``) and the gradient with the structure
      of ``params``, both in the params' dtype, exactly what :func:`cost` and :func:`grad`
      return for the same arguments.

    Raises:
      ValueError: a shape, a label, ``n`` or ``key`` is wrong or missing.
    """
    given, (params, X, Y) = params, checks.batch(params, X, Y, model, n, key)
    return checks.like(given, _value_and_grad(params, X, Y, model, n, key))
