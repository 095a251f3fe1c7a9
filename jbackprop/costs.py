"""Costs ``C_x`` of one example and their output error ``δ^L`` (lecture, section 2; eqs 6-7).

Like the activations, each cost is a small frozen object: ``fn(z, y, f)`` is the cost of
one example (or of each row of a batch) given the output pre-activations ``z = z^L``, the
target ``y`` and the output activation ``f``; ``delta(z, y, f)`` is ``δ^L = ∂C_x/∂z^L``
(eq 5 at ``l = L``).

Each cost also gives its output curvature for the generalised Gauss-Newton matrix:
``curvature(z, y, f)`` returns columns ``u_c`` and weights ``h_c`` with
``Σ_c h_c u_c u_cᵀ = J_fᵀ H J_f`` seen from ``z^L`` (``H`` the Hessian of the cost in the
output where it is convex), and ``sample_delta(z, y, f, key)`` one random ``δ^L`` whose
outer product has that expectation (for the Monte-Carlo estimate).

Every value is computed from ``z^L``, never from ``a^L``: log-sigmoid and log-softmax
replace ``ln a`` and ``ln(1 - a)``, so no ``ln 0`` occurs and saturated outputs give finite
costs.

The costs: :data:`quadratic` ``½‖a^L - y‖²`` (the ½ makes eq 6 exact; any output),
:data:`cross_entropy` ``-Σ_i [y_i ln a_i + (1 - y_i) ln(1 - a_i)]`` (sigmoid or softmax
output) and :data:`log_likelihood` ``-ln a^L_y`` (softmax output).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
from jax import Array

from jbackprop.activations import Activation

__all__ = [
    "Cost",
    "cross_entropy",
    "get",
    "log_a_and_log_1ma",
    "log_likelihood",
    "names",
    "quadratic",
]


@dataclass(frozen=True)
class Cost:
    """A per-example cost with its ``δ^L`` and output curvature; ``check(f)`` refuses
    meaningless pairings.

    Every function takes ``z = z^L`` of shape ``(..., n_L)``, targets ``y`` of the same
    shape (one-hot rows for class labels) and the output activation ``f``, and works row
    by row over the leading axes. Use the module's instances rather than building one.

    Attributes:
      name: ``"quadratic"``, ``"cross_entropy"`` or ``"log_likelihood"``.
      fn: ``fn(z, y, f)``, the cost ``C_x`` of each row, shape ``(...)``.
      delta: ``delta(z, y, f)``, ``δ^L = ∂C_x/∂z^L`` (eqs 6-7), shape ``(..., n_L)``.
      check: ``check(f)`` returns None, or raises ``ValueError`` when the cost makes no
        sense with output ``f``.
      curvature: ``curvature(z, y, f)`` returns ``(cols, h)``: ``cols`` of shape
        ``(..., n_L, n_L)`` whose row ``c`` is ``u_c``, and weights ``h`` of shape
        ``(..., n_L)``, with ``Σ_c h_c u_c u_cᵀ = J_fᵀ H J_f`` (see the module docstring).
      sample_delta: ``sample_delta(z, y, f, key)`` returns ``(δ, weight)``: one random
        ``δ^L`` per row, ``(..., n_L)``, and a weight ``(..., 1)`` or None (meaning 1),
        with ``E[weight δ δᵀ] = J_fᵀ H J_f``.
    """

    name: str
    fn: Callable[[Array, Array, Activation], Array] = field(compare=False, repr=False)
    delta: Callable[[Array, Array, Activation], Array] = field(compare=False, repr=False)
    check: Callable[[Activation], None] = field(compare=False, repr=False)
    curvature: Callable[[Array, Array, Activation], tuple[Array, Array]] = field(
        compare=False, repr=False
    )
    sample_delta: Callable[[Array, Array, Activation, Array], tuple[Array, Array | None]] = field(
        compare=False, repr=False
    )

    def __repr__(self) -> str:
        return f"Cost({self.name!r})"


# --- quadratic: C_x = ½‖a - y‖² (the ½ makes eq 6 exact) -----------------------------


def _quadratic_fn(z: Array, y: Array, f: Activation) -> Array:
    return 0.5 * jnp.sum((f(z) - y) ** 2, axis=-1)


def _quadratic_delta(z: Array, y: Array, f: Activation) -> Array:
    """Eq 6: ``δ^L = (a^L - y) ⊙ f'(z^L)`` (a Jacobian product for softmax)."""
    return f.backward(z, f(z) - y)


def _any_output(f: Activation) -> None:
    return None


def _quadratic_curvature(z: Array, y: Array, f: Activation) -> tuple[Array, Array]:
    """Split at ``a^L`` with ``H = I``: the columns are those of ``J_fᵀ``, weights 1."""
    eye = jnp.eye(z.shape[-1], dtype=z.dtype)
    cols = f.backward(z[..., None, :], eye)
    return cols, jnp.ones(cols.shape[:-1], z.dtype)


def _quadratic_sample(z: Array, y: Array, f: Activation, key: Array):
    """``ŷ ~ N(a^L, I)``, the model's predictive distribution, then eq 6."""
    return _quadratic_delta(z, f(z) + jax.random.normal(key, z.shape, z.dtype), f), None


# --- cross-entropy: C_x = -Σ_i [y_i ln a_i + (1 - y_i) ln(1 - a_i)] -------------------


def log_a_and_log_1ma(z: Array, f: Activation) -> tuple[Array, Array]:
    """``ln a`` and ``ln(1 - a)`` straight from ``z``, for sigmoid or softmax outputs.

    Args:
      z: output pre-activations ``z^L``, ``(..., n_L)``.
      f: the output activation, ``sigmoid`` or ``softmax`` (any other is read as softmax).

    Returns:
      ``(ln a, ln(1 - a))``, each the shape and dtype of ``z``, with no ``ln 0`` taken.
    """
    if f.name == "sigmoid":
        return jax.nn.log_sigmoid(z), jax.nn.log_sigmoid(-z)
    # softmax: 1 - a_i is the probability of every other class, Σ_{j≠i} e^{z_j} / Σ_j e^{z_j}.
    n = z.shape[-1]
    others = jnp.where(jnp.eye(n, dtype=bool), -jnp.inf, z[..., None, :])
    lse = jax.nn.logsumexp(z, axis=-1, keepdims=True)
    return z - lse, jax.nn.logsumexp(others, axis=-1) - lse


def _cross_entropy_fn(z: Array, y: Array, f: Activation) -> Array:
    log_a, log_1ma = log_a_and_log_1ma(z, f)
    return -jnp.sum(y * log_a + (1.0 - y) * log_1ma, axis=-1)


def _cross_entropy_delta(z: Array, y: Array, f: Activation) -> Array:
    """Eq 7 for a sigmoid output: ``δ^L = a^L - y``.

    For a softmax output the general ``δ^L = Jᵀ ∇_a C`` simplifies to
    ``δ_k = p_k (Σ_i y_i + 1 - y_k) - y_k - p_k Σ_{i≠k} (1 - y_i) p_i / (1 - p_i)``,
    whose every term is bounded (``p_k ≤ 1 - p_i`` for ``i ≠ k``), so it is evaluated in
    log space and never overflows.
    """
    if f.name == "sigmoid":
        return jax.nn.sigmoid(z) - y
    log_p, log_1mp = log_a_and_log_1ma(z, f)
    n = z.shape[-1]
    off_diagonal = ~jnp.eye(n, dtype=bool)
    # ratio[..., k, i] = p_k p_i / (1 - p_i) for i ≠ k, each ≤ p_i.
    log_ratio = log_p[..., :, None] + (log_p - log_1mp)[..., None, :]
    ratio = jnp.exp(jnp.where(off_diagonal, log_ratio, -jnp.inf))
    p = jnp.exp(log_p)
    total_y = jnp.sum(y, axis=-1, keepdims=True)
    return p * (total_y + 1.0 - y) - y - jnp.sum(ratio * (1.0 - y)[..., None, :], axis=-1)


def _cross_entropy_curvature(z: Array, y: Array, f: Activation) -> tuple[Array, Array]:
    """Sigmoid: split at ``z^L``, ``H = diag(a(1 - a))``. Softmax: split at ``a^L`` (the
    Hessian in ``z`` is not PSD), ``H_a = diag(y/p² + (1-y)/(1-p)²)``; column ``c`` of
    ``J_fᵀ`` is ``p_c (1 - p_c) r_c`` with ``r_c = (e_c - p)/(1 - p_c)`` (entries in
    ``[-1, 1]``), so ``h_c = y_c (1 - p_c)² + (1 - y_c) p_c²`` weighs ``r_c``."""
    eye = jnp.eye(z.shape[-1], dtype=z.dtype)
    if f.name == "sigmoid":
        h = jax.nn.sigmoid(z) * jax.nn.sigmoid(-z)
        return jnp.broadcast_to(eye, (*z.shape, z.shape[-1])), h
    log_p, log_1mp = log_a_and_log_1ma(z, f)
    off = -jnp.exp(log_p[..., None, :] - log_1mp[..., :, None])  # -p_j / (1 - p_c)
    cols = jnp.where(eye.astype(bool), 1.0, off)
    h = y * jnp.exp(2.0 * log_1mp) + (1.0 - y) * jnp.exp(2.0 * log_p)
    return cols, h


def _cross_entropy_sample(z: Array, y: Array, f: Activation, key: Array):
    """Sigmoid: ``ŷ_j ~ Bernoulli(a_j)`` then eq 7. Softmax, whose ``H`` depends on the true
    targets: ``Σ_c ε_c √h_c u_c`` with Rademacher ``ε`` (needs targets in ``[0, 1]``)."""
    if f.name == "sigmoid":
        y_s = jax.random.bernoulli(key, jax.nn.sigmoid(z)).astype(z.dtype)
        return _cross_entropy_delta(z, y_s, f), None
    cols, h = _cross_entropy_curvature(z, y, f)
    eps = jax.random.rademacher(key, h.shape, dtype=z.dtype)
    return jnp.einsum("...c,...cn->...n", eps * jnp.sqrt(jnp.maximum(h, 0.0)), cols), None


def _outputs_in_unit_interval(f: Activation) -> None:
    if f.name not in ("sigmoid", "softmax"):
        raise ValueError(
            f"cost 'cross_entropy' needs outputs in (0, 1), i.e. a 'sigmoid' or 'softmax' "
            f"output layer; got output {f.spec!r}"
        )


# --- log-likelihood: C_x = -ln a^L_y with a softmax output ---------------------------


def _log_likelihood_fn(z: Array, y: Array, f: Activation) -> Array:
    return -jnp.sum(y * jax.nn.log_softmax(z, axis=-1), axis=-1)


def _log_likelihood_delta(z: Array, y: Array, f: Activation) -> Array:
    """Eq 7 for softmax: ``δ^L = a^L - y`` (``a^L Σ y - y`` for targets not summing to 1)."""
    return jax.nn.softmax(z, axis=-1) * jnp.sum(y, axis=-1, keepdims=True) - y


def _log_likelihood_curvature(z: Array, y: Array, f: Activation) -> tuple[Array, Array]:
    """Split at ``z^L``: ``H = (Σ y)(diag p - p pᵀ) = Σ_c (Σ y) p_c (e_c - p)(e_c - p)ᵀ``."""
    p = jax.nn.softmax(z, axis=-1)
    cols = jnp.eye(z.shape[-1], dtype=z.dtype) - p[..., None, :]
    return cols, jnp.sum(y, axis=-1, keepdims=True) * p


def _log_likelihood_sample(z: Array, y: Array, f: Activation, key: Array):
    """``ŷ ~ Categorical(p)`` then eq 7, weighted by ``Σ y`` for targets not summing to 1."""
    y_s = jax.nn.one_hot(jax.random.categorical(key, z, axis=-1), z.shape[-1], dtype=z.dtype)
    return _log_likelihood_delta(z, y_s, f), jnp.sum(y, axis=-1, keepdims=True)


def _softmax_output(f: Activation) -> None:
    if f.name != "softmax":
        raise ValueError(
            f"cost 'log_likelihood' needs a 'softmax' output layer; got output {f.spec!r}"
        )


quadratic = Cost(
    "quadratic",
    _quadratic_fn,
    _quadratic_delta,
    _any_output,
    _quadratic_curvature,
    _quadratic_sample,
)
cross_entropy = Cost(
    "cross_entropy",
    _cross_entropy_fn,
    _cross_entropy_delta,
    _outputs_in_unit_interval,
    _cross_entropy_curvature,
    _cross_entropy_sample,
)
log_likelihood = Cost(
    "log_likelihood",
    _log_likelihood_fn,
    _log_likelihood_delta,
    _softmax_output,
    _log_likelihood_curvature,
    _log_likelihood_sample,
)

_BY_NAME = {c.name: c for c in (quadratic, cross_entropy, log_likelihood)}


def names() -> tuple[str, ...]:
    """The cost names :func:`get` accepts.

    Returns:
      ``("quadratic", "cross_entropy", "log_likelihood")``.
    """
    return tuple(_BY_NAME)


def get(name: str | Cost) -> Cost:
    """Look a cost up by name.

    Args:
      name: a name from :func:`names`, or a :class:`Cost` (returned as it is).

    Returns:
      The :class:`Cost`.

    Raises:
      ValueError: an unknown name.
    """
    if isinstance(name, Cost):
        return name
    if name not in _BY_NAME:
        raise ValueError(f"unknown cost {name!r}; expected one of {', '.join(names())}")
    return _BY_NAME[name]
