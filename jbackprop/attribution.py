"""Gradient inner products, the empirical neural tangent kernel and data attribution from
one backward pass.

A dense layer's gradient for example ``i`` is the outer product ``δ^l_i (a^{l-1}_i)ᵀ``
(eq 10) and its bias gradient is ``δ^l_i`` (eq 9). The Frobenius inner product of two outer
products factorises, ``⟨δ aᵀ, δ' a'ᵀ⟩ = (δ·δ')(a·a')``, so the inner product of two
examples' whole gradients is

    ⟨g_i, g'_j⟩ = Σ_l (δ^l_i · δ'^l_j)(a^{l-1}_i · a'^{l-1}_j + 1),

and over two sets, with ``Δ_l`` and ``A_l`` the matrices whose rows are ``δ^l_i`` and
``a^{l-1}_i``, the whole matrix of inner products is ``Σ_l (Δ_l Δ'_lᵀ) ⊙ (A_l A'_lᵀ + 1)``.
It needs one forward and one backward pass per set and a few matrix products of size
``(m, m')`` per layer; no per-example gradient (a vector of every parameter) is ever formed.

Every quantity here is that identity applied to ``δ``'s from the one backward pass
(:func:`jbackprop.network.backward`, eq 8) started from a different ``δ^L``:

* :func:`grad_gram`: the cost's ``δ^L`` (eqs 6-7), giving the gradients of ``C_x``;
* :func:`empirical_ntk`: the unit vectors ``e_k``, giving the Jacobian rows ``∂z^L_k/∂p``;
* :func:`trak`: the ``δ^L`` of TRAK's margin ``ln(p/(1-p))``;
* :func:`tracin`: :func:`grad_gram` summed over checkpoints.

The features (every ``a^{l-1}`` and ``δ^l``) are computed once for all rows, and the
result in square blocks of ``chunk_size`` rows of each set, so the memory beyond the result
and the features is that of one block's products; a set paired with itself computes only
the blocks on and above the diagonal, and mirrors them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from jbackprop import checks
from jbackprop.model import Model, Params
from jbackprop.network import backward, batch_deltas, feedforward, squared_norms

__all__ = ["empirical_ntk", "grad_gram", "tracin", "trak"]


# --- the identity, block by block --------------------------------------------------------

# Edge of the square blocks the result is computed in when no chunk_size is given. A
# block's products (two per layer, BLOCK² numbers each, 1 MiB in float32) then stay in a
# server CPU's last-level cache, while its first-layer product A_0 A'_0ᵀ (BLOCK × n_0 ×
# BLOCK) is still large enough for the matrix-multiply kernels to run at full speed. On
# the 784-128-64-10 network of the benchmark, 384 to 640 were alike and 1024 was slower.
BLOCK = 512


# The product of two blocks' deltas, as an einsum: ``Δ Δ'ᵀ`` for the gradients of a scalar
# cost; for the NTK, whose deltas carry an axis of ``n_L`` (one row per output unit), every
# pair of output units, or their trace.
GRADIENT, NTK, NTK_TRACE = "an,bn->ab", "ajn,bkn->abjk", "ajn,bjn->ab"


def kernel_block(feats1, feats2, inputs: Array | None = None, *, spec: str = GRADIENT) -> Array:
    """``Σ_l (Δ_l Δ'_lᵀ) ⊙ (A_l A'_lᵀ + 1)`` (eqs 9-10) for a block of rows of each set:
    the inner products ``⟨g_i, g'_j⟩`` of every pair, shape ``(b1, b2)``.

    ``feats1 = (acts, deltas)`` holds ``a^{l-1}: (b1, n_{l-1})`` and ``δ^l: (b1, n_l)``,
    ``feats2`` the same for ``b2`` rows. ``spec`` is the einsum of the deltas' product:
    with :data:`NTK`, ``δ^l`` is ``(b, n_L, n_l)`` (row ``k`` backpropagated from
    ``δ^L = e_k``, the gradient of ``z^L_k``) and the block is ``(b1, b2, n_L, n_L)``; with
    :data:`NTK_TRACE`, its trace over the output pair, ``(b1, b2)``. ``inputs``, if given,
    is the first layer's ``A_0 A'_0ᵀ + 1`` (``a^0 = x``), computed once for several models
    that share the inputs.

    The layers' terms are one expression, so XLA fuses the elementwise products and the sum
    into one pass over the block once the matrix products are done.
    """
    (acts1, deltas1), (acts2, deltas2) = feats1, feats2
    total = 0.0
    for l, (a1, d1, a2, d2) in enumerate(
        zip(acts1[:-1], deltas1, acts2[:-1], deltas2, strict=True)
    ):
        outer = inputs if l == 0 and inputs is not None else a1 @ a2.T + 1.0
        deltas = jnp.einsum(spec, d1, d2)
        total = total + deltas * outer.reshape(outer.shape + (1,) * (deltas.ndim - 2))
    return total


def block_edge(m: int, chunk: int | None) -> int:
    """The edge of the blocks that split ``m`` rows: at most ``chunk`` (``BLOCK`` if None),
    and as even as possible, so that the last block overlaps the one before by only a few
    rows."""
    count = -(-m // min(m, chunk or BLOCK))
    return -(-m // count)


def blockwise(pair, feats1, feats2, chunk: int | None, inputs=None, mirror=None) -> Array:
    """``pair`` of every block of rows of ``feats1`` with every block of ``feats2``, put
    together into the ``(m1, m2, ...)`` matrix.

    The features (every ``a`` and ``δ``) are computed once for all rows; only the products
    are split. One ``lax.scan`` runs over the blocks, all of the same shape, so that one
    compiled block serves them all: the last block starts early enough to end at the last
    row (``block_edge`` keeps that overlap small). ``inputs`` (``(m1, m2)``, optional) is
    sliced to each block and handed to ``pair``. With ``mirror`` (the second set is the
    first), only the blocks on and above the diagonal are computed and ``mirror(block)`` is
    written at the transposed place: half the products.

    Memory beyond the result and the features is one block's intermediates.
    """
    m1, m2 = feats1[0][0].shape[0], feats2[0][0].shape[0]
    b1, b2 = block_edge(m1, chunk), block_edge(m2, chunk)
    n1, n2 = -(-m1 // b1), -(-m2 // b2)
    if n1 == n2 == 1:
        return pair(feats1, feats2, inputs)

    def rows(feats, start, size):
        return jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, start, size), feats)

    def step(out, ij):
        s1, s2 = jnp.minimum(ij[0] * b1, m1 - b1), jnp.minimum(ij[1] * b2, m2 - b2)
        cut = None if inputs is None else jax.lax.dynamic_slice(inputs, (s1, s2), (b1, b2))
        block = pair(rows(feats1, s1, b1), rows(feats2, s2, b2), cut)
        rest = (jnp.zeros_like(s1),) * (block.ndim - 2)  # an NTK block's output pair
        out = jax.lax.dynamic_update_slice(out, block, (s1, s2, *rest))
        if mirror is not None:
            out = jax.lax.dynamic_update_slice(out, mirror(block), (s2, s1, *rest))
        return out, None

    block = jax.eval_shape(
        lambda f1, f2, cut: pair(rows(f1, 0, b1), rows(f2, 0, b2), cut),
        feats1,
        feats2,
        None if inputs is None else inputs[:b1, :b2],
    )
    pairs = [(i, j) for i in range(n1) for j in range(i if mirror else 0, n2)]
    start = jnp.zeros((m1, m2, *block.shape[2:]), block.dtype)
    return jax.lax.scan(step, start, jnp.asarray(pairs, jnp.int32))[0]


def transpose_pair(block: Array) -> Array:
    """A symmetric kernel's block at the transposed place: rows and columns swapped, and
    the output pair too when the block has one (``Θ(x', x)_{kj} = Θ(x, x')_{jk}``)."""
    return jnp.transpose(block, (1, 0, 3, 2)) if block.ndim == 4 else block.T


def unit_deltas(params: Params, zs, model: Model):
    """Eq 8 from ``δ^L = e_k`` for every output unit ``k``: each ``δ^l`` gains an axis of
    ``n_L`` before its units, ``(..., n_L, n_l)``: the rows of ``∂z^L/∂z^l``."""
    n_out = model.sizes[-1]
    eye = jnp.eye(n_out, dtype=zs[-1].dtype)
    delta_L = jnp.broadcast_to(eye, (*zs[-1].shape[:-1], n_out, n_out))
    return backward(params, [z[..., None, :] for z in zs], delta_L, model)


# --- TRAK's margin ------------------------------------------------------------------------


def correct_class(Y: Array, model: Model) -> Array:
    """The one-hot correct class of each target: ``argmax`` of a softmax target, or the
    label ``y ≥ ½`` of a single sigmoid unit."""
    if model.output.name == "softmax":
        return jax.nn.one_hot(jnp.argmax(Y, axis=-1), Y.shape[-1], dtype=Y.dtype)
    return (Y >= 0.5).astype(Y.dtype)


def margin_delta(z: Array, y: Array, model: Model) -> Array:
    """``δ^L = ∂f/∂z^L`` for TRAK's margin ``f = ln(p/(1-p))`` of the correct class ``y``.

    Softmax: ``f = z_y - ln Σ_{j≠y} e^{z_j}``, so ``δ^L = e_y - q`` with ``q`` the softmax
    over the other classes (``q_y = 0``). One sigmoid unit: ``p = σ(±z)``, so ``f = ±z`` and
    ``δ^L = 2y - 1``.
    """
    if model.output.name == "softmax":
        return y - jax.nn.softmax(jnp.where(y > 0, -jnp.inf, z), axis=-1)
    return jnp.broadcast_to(2.0 * y - 1.0, z.shape)


def one_minus_p(z: Array, y: Array, model: Model) -> Array:
    """``1 - p``, the probability of a wrong answer (TRAK's ``Q``), from ``z^L`` without
    rounding ``p`` to 1: ``Σ_{j≠y} e^{z_j} / Σ_j e^{z_j}`` or ``σ(∓z)``."""
    if model.output.name == "softmax":
        others = jax.nn.logsumexp(jnp.where(y > 0, -jnp.inf, z), axis=-1)
        return jnp.exp(others - jax.nn.logsumexp(z, axis=-1))
    return jax.nn.sigmoid(-(2.0 * y[..., 0] - 1.0) * z[..., 0])


def margin_features(params: Params, X: Array, y: Array, model: Model):
    """``a^{l-1}`` and ``δ^l`` of the margin (eq 8 from :func:`margin_delta`), and ``1 - p``."""
    zs, acts = feedforward(params, X, model)
    deltas = backward(params, zs, margin_delta(zs[-1], y, model), model)
    return acts, deltas, one_minus_p(zs[-1], y, model)


# --- jitted kernels (validated arguments only) --------------------------------------------


@partial(jax.jit, static_argnames=("chunk", "normalize"))
def _grad_gram(params, X1, Y1, X2, Y2, model, chunk, normalize):
    feats1 = batch_deltas(params, X1, Y1, model, None)
    feats2 = feats1 if X2 is None else batch_deltas(params, X2, Y2, model, None)
    mirror = transpose_pair if X2 is None else None
    K = blockwise(kernel_block, feats1, feats2, chunk, mirror=mirror)
    if not normalize:
        return K
    norm1 = jnp.sqrt(squared_norms(*feats1))
    norm2 = norm1 if X2 is None else jnp.sqrt(squared_norms(*feats2))
    # A zero gradient has no direction; its cosine with anything is reported as 0.
    denom = norm1[:, None] * norm2[None, :]
    return jnp.where(denom > 0, K / jnp.where(denom > 0, denom, 1.0), 0.0)


def _unit_features(params, X, model):
    zs, acts = feedforward(params, X, model)
    return acts, unit_deltas(params, zs, model)


@partial(jax.jit, static_argnames=("chunk", "trace"))
def _empirical_ntk(params, X1, X2, model, chunk, trace):
    feats1 = _unit_features(params, X1, model)
    feats2 = feats1 if X2 is None else _unit_features(params, X2, model)
    mirror = transpose_pair if X2 is None else None
    block = partial(kernel_block, spec=NTK_TRACE if trace else NTK)
    return blockwise(block, feats1, feats2, chunk, mirror=mirror)


@partial(jax.jit, static_argnames="chunk")
def _tracin(stacked, etas, X_train, Y_train, X_test, Y_test, model, chunk):
    # a^0 = x for every checkpoint: the first layer's input products are computed once.
    inputs = X_test @ X_train.T + 1.0

    def one(total, checkpoint):
        params, eta = checkpoint
        train = batch_deltas(params, X_train, Y_train, model, None)
        test = batch_deltas(params, X_test, Y_test, model, None)
        gram = blockwise(kernel_block, test, train, chunk, inputs)
        return total + eta * gram, None

    start = jnp.zeros((X_test.shape[0], X_train.shape[0]), X_train.dtype)
    return jax.lax.scan(one, start, (stacked, etas))[0]


@partial(jax.jit, static_argnames="chunk")
def _trak(stacked, X_train, Y_train, X_test, Y_test, model, damping, chunk):
    y_train, y_test = correct_class(Y_train, model), correct_class(Y_test, model)
    m = X_train.shape[0]
    # a^0 = x for every model: the first layer's input products are computed once.
    inputs_train, inputs_test = X_train @ X_train.T + 1.0, X_test @ X_train.T + 1.0

    def one(totals, params):
        *train, q = margin_features(params, X_train, y_train, model)
        test = margin_features(params, X_test, y_test, model)[:2]
        K = blockwise(kernel_block, train, train, chunk, inputs_train, transpose_pair)  # ΦΦᵀ
        k = blockwise(kernel_block, test, train, chunk, inputs_test)  # (Φ φ(z))ᵀ
        # K + λI is symmetric positive definite for λ > 0; λ is relative to mean ‖φ_i‖².
        # λ goes onto the diagonal in place: no second (m, m) matrix.
        lam = damping * jnp.trace(K) / m
        factor = jax.scipy.linalg.cho_factor(K.at[jnp.diag_indices(m)].add(lam))
        scores = jax.scipy.linalg.cho_solve(factor, k.T).T  # k(z)ᵀ (K + λI)⁻¹
        return (totals[0] + scores, totals[1] + q), None

    start = (jnp.zeros((X_test.shape[0], m), X_train.dtype), jnp.zeros((m,), X_train.dtype))
    (scores, q), _ = jax.lax.scan(one, start, stacked)
    count = jax.tree.leaves(stacked)[0].shape[0]
    return (scores / count) * (q / count)[None, :]


# --- argument checks ----------------------------------------------------------------------


def _first(params: Params, model: Model):
    checks.check_model(model)
    checks.check_params(params, model)
    return tuple(params)


def _chunk(chunk_size) -> int | None:
    return checks.positive_int("chunk_size", chunk_size, allow_none=True)


def _is_params(obj: Any) -> bool:
    return isinstance(obj, list | tuple) and len(obj) > 0 and all(isinstance(l, dict) for l in obj)


def _stack(models: Any, model: Model, name: str) -> Params:
    """A list of params, of paths to params files, or params stacked along a leading axis
    (as :func:`jbackprop.fit_many` returns them), as one stacked tuple of layer dicts."""
    checks.check_model(model)
    if isinstance(models, str | os.PathLike):
        models = [models]
    if _is_params(models) and np.ndim(models[0].get("w")) == 3:
        count = np.shape(models[0]["w"])[0]
        shapes = [
            {k: jax.ShapeDtypeStruct(np.shape(v)[1:], jnp.result_type(v)) for k, v in l.items()}
            for l in models
        ]
        try:
            checks.check_params(shapes, model)
        except ValueError as err:
            raise ValueError(f"{name} (stacked, one model per leading index): {err}") from None
        if any(np.shape(v)[0] != count for l in models for v in l.values()):
            raise ValueError(f"{name}: every stacked leaf needs the same leading axis {count}")
        return tuple(models)
    if _is_params(models):
        models = [models]
    if not isinstance(models, Sequence) or isinstance(models, dict) or not len(models):
        raise ValueError(
            f"{name} must be a non-empty list of params (or of paths to params files), or "
            f"params stacked along a leading axis; got {type(models).__name__}"
        )
    loaded = []
    for i, item in enumerate(models):
        if isinstance(item, str | os.PathLike):
            item = checks.read_params(item, model, f"{name}[{i}]")
        try:
            checks.check_params(item, model)
        except ValueError as err:
            raise ValueError(f"{name}[{i}]: {err}") from None
        loaded.append(tuple(item))
    dtypes = {jnp.result_type(p[0]["w"]) for p in loaded}
    if len(dtypes) > 1:
        raise ValueError(f"{name}: the models mix dtypes {sorted(map(str, dtypes))}")
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *loaded)


def _etas(etas: Any, count: int, dtype) -> Array:
    if etas is None:
        return jnp.ones((count,), dtype)
    if not checks.is_concrete(etas):
        if jnp.shape(etas) not in ((), (count,)):
            raise ValueError(
                f"etas must be a number or {count} numbers, got shape {jnp.shape(etas)}"
            )
        return jnp.broadcast_to(jnp.asarray(etas, dtype), (count,))
    try:
        values = np.asarray(etas, float)
    except (TypeError, ValueError):
        raise ValueError(f"etas must be numbers, got {etas!r}") from None
    if values.shape not in ((), (count,)) or not np.all(np.isfinite(values)):
        raise ValueError(
            f"etas must be one finite number or {count} (one per checkpoint), got {etas!r}"
        )
    return jnp.broadcast_to(jnp.asarray(values, dtype), (count,))


# --- public API ---------------------------------------------------------------------------


def grad_gram(
    params: Params, X1: Array, Y1: Array, model: Model,
    X2: Array | None = None, Y2: Array | None = None,
    *, normalize: bool = False, chunk_size: int | None = None,
) -> Array:  # fmt: skip
    """Inner products of per-example gradients, ``K_ij = ⟨∇_p C_{x_i}, ∇_p C_{x'_j}⟩``.

    The gradients are those of :func:`jbackprop.per_example_grads`: of the unregularised
    cost ``C_x`` of each example, over every layer's ``w`` and ``b``, with dropout off (as at
    inference). By eqs 9-10, ``K = Σ_l (Δ_l Δ'_lᵀ) ⊙ (A_l A'_lᵀ + 1)``, computed from one
    forward and one backward pass of each set; no per-example gradient is formed.

    Args:
      params, model: the network.
      X1, Y1: the first set, inputs ``(m1, n_0)`` and labels ``(m1,)`` or targets
        ``(m1, n_L)``.
      X2, Y2: the second set, ``(m2, n_0)`` and ``(m2,)`` or ``(m2, n_L)``; both ``None``
        (the default) pairs the first set with itself.
      normalize: return cosine similarities ``K_ij / (‖g_i‖ ‖g'_j‖)`` (0 where a gradient
        is zero).
      chunk_size: the edge of the square blocks the result is computed in (``None``:
        512). Beyond the result and both sets' ``a`` and ``δ`` (``O(m Σ_l n_l)``), memory
        is a few ``(chunk_size, chunk_size)`` matrices per layer.

    Returns:
      ``(m1, m2)`` in the params' dtype.
    """
    params = _first(params, model)
    X1, Y1 = checks.pair(X1, Y1, model, params, "X1", "Y1")
    if (X2 is None) != (Y2 is None):
        raise ValueError("X2 and Y2 must be given together (or both left out)")
    if X2 is not None:
        X2, Y2 = checks.pair(X2, Y2, model, params, "X2", "Y2")
    chunk = _chunk(chunk_size)
    return _grad_gram(params, X1, Y1, X2, Y2, model, chunk, bool(normalize))


def empirical_ntk(
    params: Params, X1: Array, model: Model,
    X2: Array | None = None, trace: bool = False, *, chunk_size: int | None = None,
) -> Array:  # fmt: skip
    """The empirical neural tangent kernel ``Θ(x, x') = J(x) J(x')ᵀ`` of the output
    pre-activations ``z^L``, ``J = ∂z^L/∂p`` over every layer's ``w`` and ``b``.

    This is ``neural_tangents.empirical_ntk_fn(f, trace_axes=())`` for ``f`` the map from
    inputs to ``z^L`` (dropout off). Row ``k`` of ``J(x)`` is the gradient of ``z^L_k``: the
    backward pass (eq 8, :func:`jbackprop.network.backward`) started from ``δ^L = e_k``,
    whose weight part is ``δ^l_k (a^{l-1})ᵀ`` (eq 10). All ``n_L`` unit vectors go through
    one backward pass, and ``Θ_jk = Σ_l (δ^l_j · δ'^l_k)(a^{l-1} · a'^{l-1} + 1)``.

    Args:
      params, model: the network.
      X1: inputs ``(m1, n_0)``.
      X2: inputs ``(m2, n_0)``; ``None`` pairs ``X1`` with itself.
      trace: return the trace over the output pair, ``Σ_k Θ_kk``.
      chunk_size: the edge of the blocks the result is computed in (``None``:
        ``512 // n_L`` rows of each set, ``512`` with ``trace``). Beyond the result,
        memory is a few blocks of ``(chunk_size, chunk_size, n_L, n_L)``.

    Returns:
      ``(m1, m2, n_L, n_L)``, entry ``[i, j, k, k']`` = ``∂z^L_k(x_i)/∂p · ∂z^L_k'(x'_j)/∂p``;
      with ``trace=True``, ``(m1, m2)``.
    """
    params = _first(params, model)
    X1 = checks.inputs(X1, model, params, batched=True, name="X1")
    if X2 is not None:
        X2 = checks.inputs(X2, model, params, batched=True, name="X2")
    chunk = _chunk(chunk_size)
    if chunk is None and not trace:
        # The deltas' product of a (b, b, n_L, n_L) block is a (b n_L, b n_L) matrix: the
        # size of a gradient Gram block of BLOCK rows when b = BLOCK / n_L.
        chunk = max(1, BLOCK // model.sizes[-1])
    return _empirical_ntk(params, X1, X2, model, chunk, bool(trace))


def tracin(
    checkpoints: Any, X_train: Array, Y_train: Array, X_test: Array, Y_test: Array,
    model: Model, etas: Any = None, *, chunk_size: int | None = None,
) -> Array:  # fmt: skip
    """TracInCP (Pruthi et al., NeurIPS 2020): the checkpoint form of their TracIn,
    ``TracInCP(z, z') = Σ_k η_k ⟨∇C(θ_k; z), ∇C(θ_k; z')⟩`` over saved checkpoints ``θ_k``.

    A positive score says that a gradient step on the training example ``z`` lowers the
    cost of the test example ``z'`` (they pull the parameters the same way). Each term is
    :func:`grad_gram` at that checkpoint; the costs are the model's unregularised ``C_x``
    with dropout off.

    Departures from the paper: the per-example loss is the model's cost; any list of
    parameter sets works as checkpoints (e.g. independently trained models, as dattri's
    benchmark uses them), with ``etas`` the step sizes in effect at each.

    Args:
      checkpoints: a list of params, a list of paths to params files
        (:func:`jbackprop.save_params`), or params stacked along a leading axis (as
        :func:`jbackprop.fit_many` returns them).
      X_train, Y_train: ``(m_train, n_0)`` and labels ``(m_train,)`` or targets.
      X_test, Y_test: ``(m_test, n_0)`` and labels ``(m_test,)`` or targets.
      model: the network of every checkpoint.
      etas: ``η_k``: ``None`` (all 1), one number, or one per checkpoint.
      chunk_size: the edge of the blocks the ``(m_test, m_train)`` products are computed
        in (``None``: 512).

    Returns:
      ``(m_test, m_train)``: the influence of each training example on each test example.
    """
    stacked = _stack(checkpoints, model, "checkpoints")
    count = np.shape(stacked[0]["w"])[0]
    # Only the dtype of the stacked params is read here.
    X_train, Y_train = checks.pair(X_train, Y_train, model, stacked, "X_train", "Y_train")
    X_test, Y_test = checks.pair(X_test, Y_test, model, stacked, "X_test", "Y_test")
    etas = _etas(etas, count, X_train.dtype)
    chunk = _chunk(chunk_size)
    return _tracin(stacked, etas, X_train, Y_train, X_test, Y_test, model, chunk)


def trak(
    params_list: Any, X_train: Array, Y_train: Array, X_test: Array, Y_test: Array,
    model: Model, damping: float = 1.0, *, chunk_size: int | None = None,
) -> Array:  # fmt: skip
    """TRAK (Park et al., ICML 2023) computed exactly, through the kernel, without random
    projection.

    TRAK linearises each trained model around its parameters, so that example ``z``
    becomes the feature vector ``φ(z) = ∇_p f(z)`` of the model output
    ``f = ln(p/(1-p))`` (the margin of the correct class, the paper's model output for
    multi-class classifiers), and attributes with the one-step Newton influence of
    logistic regression on those features (Section 3): ``τ(z) = φ(z)ᵀ (ΦᵀΦ)⁻¹ Φᵀ Q`` with
    ``Φ`` the training features and ``Q = diag(1 - p_i)``. Over an ensemble of ``M``
    models it averages the two factors separately (Algorithm 1 in Appendix D.2, "as
    implemented"):

        τ(z) = ((1/M) Σ_k φ_k(z)ᵀ (Φ_kᵀ Φ_k + λ_k I)⁻¹ Φ_kᵀ) · ((1/M) Σ_k Q_k).

    Here ``φ`` has every parameter as a coordinate and is never formed: the push-through
    identity ``(ΦᵀΦ + λI)⁻¹Φᵀ = Φᵀ(ΦΦᵀ + λI)⁻¹`` turns each model's term into
    ``k(z)ᵀ (K + λI)⁻¹`` with the ``(m_train, m_train)`` kernel ``K = ΦΦᵀ`` and
    ``k(z) = Φ φ(z)``, both inner products of gradients, computed as in :func:`grad_gram`
    from the backward pass started at the margin's ``δ^L`` (``e_y - q``, ``q`` the softmax
    over the other classes).

    Departures from the paper, all deliberate:

    * no random projection ``P``: ``Φ`` is exact (the paper projects to ``k`` dimensions,
      which both approximates the kernel and, for ``k < m_train``, regularises it);
    * ``λ_k I`` is added (``ΦᵀΦ`` is singular when there are more parameters than
      examples); ``λ_k = damping · tr(K_k)/m_train`` is relative to the mean ``‖φ_i‖²``, so
      ``damping`` does not depend on the scale of the gradients;
    * no soft-thresholding of the scores (the paper's optional sparsification step), and
      no leverage-score correction (dropped in the paper's Algorithm 1 as well);
    * dropout is off, as at inference.

    Args:
      params_list: the ensemble, as for ``checkpoints`` of :func:`tracin`: a list of
        params, of paths to params files, or params stacked along a leading axis (TRAK
        trains each on a random half of the training set).
      X_train, Y_train: ``(m_train, n_0)`` and labels ``(m_train,)`` or targets.
      X_test, Y_test: ``(m_test, n_0)`` and labels ``(m_test,)`` or targets.
      model: a classifier with a softmax output (any cost) or a single sigmoid unit
        (targets ``(m, 1)`` in {0, 1}); the correct class is the target's argmax.
      damping: ``λ`` relative to the mean diagonal of ``K``; must be > 0. On dattri's
        MNIST-10 + MLP benchmark, 1 was the best of 0.03-3 for 1, 5 and 10 models
        (it stands in for the regularisation that the projection gives).
      chunk_size: the edge of the blocks ``K`` and ``k`` are computed in (``None``: 512).
        Memory is ``K``, its factor and ``k`` (``O(m_train²)``) and one block's products.

    Returns:
      ``(m_test, m_train)``: positive where the training example raises the test
      example's margin.
    """
    stacked = _stack(params_list, model, "params_list")
    single_sigmoid = model.output.name == "sigmoid" and model.sizes[-1] == 1
    if model.output.name != "softmax" and not single_sigmoid:
        raise ValueError(
            f"trak needs a classifier: model must have a softmax output or one sigmoid "
            f"unit, got output {model.output.spec!r} with {model.sizes[-1]} units"
        )
    # Only the dtype of the stacked params is read here.
    X_train, Y_train = checks.pair(X_train, Y_train, model, stacked, "X_train", "Y_train")
    X_test, Y_test = checks.pair(X_test, Y_test, model, stacked, "X_test", "Y_test")
    damping = checks.scalar("damping", damping, positive=True)
    chunk = _chunk(chunk_size)
    return _trak(stacked, X_train, Y_train, X_test, Y_test, model, damping, chunk)
