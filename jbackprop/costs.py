"""Costs ``C_x`` of one example and their output error ``δ^L`` (lecture, section 2; eqs 6-7).

Like the activations, each cost is a small frozen object: ``fn(z, y, f)`` is the cost of
one example (or of each row of a batch) given the output pre-activations ``z = z^L``, the
target ``y`` and the output activation ``f``; ``delta(z, y, f)`` is ``δ^L = ∂C_x/∂z^L``
(eq 5 at ``l = L``).

Every value is computed from ``z^L``, never from ``a^L``: log-sigmoid and log-softmax
replace ``ln a`` and ``ln(1 - a)``, so no ``ln 0`` occurs and saturated outputs give finite
costs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
from jax import Array

from jbackprop.activations import Activation

__all__ = ["Cost", "cross_entropy", "get", "log_likelihood", "names", "quadratic"]


@dataclass(frozen=True)
class Cost:
    """A per-example cost with its ``δ^L``; ``check(f)`` refuses meaningless pairings."""

    name: str
    fn: Callable[[Array, Array, Activation], Array] = field(compare=False, repr=False)
    delta: Callable[[Array, Array, Activation], Array] = field(compare=False, repr=False)
    check: Callable[[Activation], None] = field(compare=False, repr=False)

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


# --- cross-entropy: C_x = -Σ_i [y_i ln a_i + (1 - y_i) ln(1 - a_i)] -------------------


def _log_a_and_log_1ma(z: Array, f: Activation) -> tuple[Array, Array]:
    """``ln a`` and ``ln(1 - a)`` straight from ``z``, for sigmoid or softmax outputs."""
    if f.name == "sigmoid":
        return jax.nn.log_sigmoid(z), jax.nn.log_sigmoid(-z)
    # softmax: 1 - a_i is the probability of every other class, Σ_{j≠i} e^{z_j} / Σ_j e^{z_j}.
    n = z.shape[-1]
    others = jnp.where(jnp.eye(n, dtype=bool), -jnp.inf, z[..., None, :])
    lse = jax.nn.logsumexp(z, axis=-1, keepdims=True)
    return z - lse, jax.nn.logsumexp(others, axis=-1) - lse


def _cross_entropy_fn(z: Array, y: Array, f: Activation) -> Array:
    log_a, log_1ma = _log_a_and_log_1ma(z, f)
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
    log_p, log_1mp = _log_a_and_log_1ma(z, f)
    n = z.shape[-1]
    off_diagonal = ~jnp.eye(n, dtype=bool)
    # ratio[..., k, i] = p_k p_i / (1 - p_i) for i ≠ k, each ≤ p_i.
    log_ratio = log_p[..., :, None] + (log_p - log_1mp)[..., None, :]
    ratio = jnp.exp(jnp.where(off_diagonal, log_ratio, -jnp.inf))
    p = jnp.exp(log_p)
    total_y = jnp.sum(y, axis=-1, keepdims=True)
    return p * (total_y + 1.0 - y) - y - jnp.sum(ratio * (1.0 - y)[..., None, :], axis=-1)


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


def _softmax_output(f: Activation) -> None:
    if f.name != "softmax":
        raise ValueError(
            f"cost 'log_likelihood' needs a 'softmax' output layer; got output {f.spec!r}"
        )


quadratic = Cost("quadratic", _quadratic_fn, _quadratic_delta, _any_output)
cross_entropy = Cost(
    "cross_entropy", _cross_entropy_fn, _cross_entropy_delta, _outputs_in_unit_interval
)
log_likelihood = Cost("log_likelihood", _log_likelihood_fn, _log_likelihood_delta, _softmax_output)

_BY_NAME = {c.name: c for c in (quadratic, cross_entropy, log_likelihood)}


def names() -> tuple[str, ...]:
    """The cost names :func:`get` accepts."""
    return tuple(_BY_NAME)


def get(name: str | Cost) -> Cost:
    """Look a cost up by name."""
    if isinstance(name, Cost):
        return name
    if name not in _BY_NAME:
        raise ValueError(f"unknown cost {name!r}; expected one of {', '.join(names())}")
    return _BY_NAME[name]
