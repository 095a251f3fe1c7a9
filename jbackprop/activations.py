"""Activation functions f and their derivatives f' (lecture, section 1).

Each activation is a small frozen, hashable object holding ``fn`` (eq 3's ``f``) and
``prime`` (``f'``, used by eqs 6 and 8), so a :class:`jbackprop.Model` that carries one
stays a valid static argument to ``jax.jit``. Equality and hashing look only at the name
and the parameter, so ``leaky_relu(0.2) == leaky_relu(0.2)`` and jit does not retrace.

Softmax is the one activation that is not elementwise: its Jacobian is
``diag(p) - p pᵀ``, so it offers :meth:`Activation.backward` (a Jacobian-transpose
product) instead of an elementwise ``prime``. It is allowed only on the output layer.

The activations: :data:`sigmoid`, :data:`tanh`, :data:`relu` (``f'(0) = 0``),
:data:`softplus`, :data:`identity`, :data:`softmax` (over the last axis) and
:func:`leaky_relu` ``(slope)``. Each maps an array ``z`` of any shape whose last axis is
the layer's units to an array of the same shape and dtype. Sigmoid and softplus are
computed stably: a large ``|z|`` never overflows.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
from jax import Array

__all__ = [
    "Activation",
    "get",
    "identity",
    "leaky_relu",
    "names",
    "relu",
    "sigmoid",
    "softmax",
    "softplus",
    "tanh",
]


@dataclass(frozen=True)
class Activation:
    """An activation ``f`` with its derivative ``f'``.

    ``fn(z)`` is ``f``; ``prime(z)`` is ``f'`` evaluated elementwise (``None`` for
    softmax). ``backward(z, g)`` returns ``g ⊙ f'(z)``, the product eqs 6 and 8 need,
    which for softmax is ``Jᵀ g`` instead. Calling the activation, ``f(z)``, is ``fn(z)``.

    Use the module's instances and :func:`leaky_relu` rather than building one.

    Attributes:
      name: e.g. ``"sigmoid"``; with ``param``, what equality and hashing compare.
      param: the activation's parameter (``leaky_relu``'s slope), or None.
      fn: ``f``, array ``(..., n_l)`` to array of the same shape and dtype.
      prime: ``f'`` elementwise, same shape and dtype as ``z``; None for softmax.
    """

    name: str
    param: float | None = None
    fn: Callable[[Array], Array] = field(default=None, compare=False, repr=False)
    prime: Callable[[Array], Array] | None = field(default=None, compare=False, repr=False)

    @property
    def elementwise(self) -> bool:
        """Whether ``f`` acts unit by unit (every activation but softmax)."""
        return self.prime is not None

    @property
    def spec(self) -> str:
        """A string :func:`get` turns back into this activation, e.g. ``"leaky_relu(0.2)"``."""
        return self.name if self.param is None else f"{self.name}({self.param!r})"

    def __call__(self, z: Array) -> Array:
        return self.fn(z)

    def backward(self, z: Array, g: Array) -> Array:
        """``g ⊙ f'(z)`` (eqs 6, 8); for softmax ``(diag(p) - p pᵀ) g`` over the last axis.

        Args:
          z: pre-activations ``(..., n_l)``.
          g: the gradient with respect to ``a = f(z)``, broadcasting against ``z``.

        Returns:
          ``∂/∂z`` of the same quantity, the broadcast shape of ``z`` and ``g``.
        """
        if self.prime is not None:
            return g * self.prime(z)
        p = self.fn(z)
        return p * (g - jnp.sum(p * g, axis=-1, keepdims=True))

    def __repr__(self) -> str:
        return f"Activation({self.spec!r})"


def _sigmoid_prime(z: Array) -> Array:
    # σ(z)σ(-z) keeps full relative precision in both tails, where 1 - σ(z) would round to 0.
    return jax.nn.sigmoid(z) * jax.nn.sigmoid(-z)


def _tanh_prime(z: Array) -> Array:
    return 1.0 - jnp.tanh(z) ** 2


def _relu_prime(z: Array) -> Array:
    # f'(0) = 0: the subgradient jax.nn.relu also uses, so manual and autodiff agree at 0.
    return (z > 0).astype(z.dtype)


sigmoid = Activation("sigmoid", fn=jax.nn.sigmoid, prime=_sigmoid_prime)
tanh = Activation("tanh", fn=jnp.tanh, prime=_tanh_prime)
relu = Activation("relu", fn=jax.nn.relu, prime=_relu_prime)
# softplus = log(1 + e^z) computed as logaddexp(z, 0): no overflow for large z.
softplus = Activation("softplus", fn=jax.nn.softplus, prime=jax.nn.sigmoid)
identity = Activation("identity", fn=lambda z: z, prime=jnp.ones_like)
softmax = Activation("softmax", fn=lambda z: jax.nn.softmax(z, axis=-1))


def leaky_relu(slope: float = 0.01) -> Activation:
    """``max(z, slope·z)`` with ``0 <= slope <= 1``; ``f'(z) = 1`` for ``z > 0`` else ``slope``.

    Args:
      slope: the lecture's ``a``, the slope for ``z <= 0``.

    Returns:
      The :class:`Activation`, spec ``"leaky_relu(<slope>)"``; equal slopes give equal
      (and equally hashed) activations.

    Raises:
      ValueError: ``slope`` is outside ``[0, 1]``.
    """
    slope = float(slope)
    if not 0.0 <= slope <= 1.0:
        raise ValueError(f"leaky_relu slope must be in [0, 1], got {slope}")

    def fn(z: Array) -> Array:
        return jnp.where(z > 0, z, slope * z)

    def prime(z: Array) -> Array:
        return jnp.where(z > 0, 1.0, slope).astype(z.dtype)

    return Activation("leaky_relu", param=slope, fn=fn, prime=prime)


_BY_NAME = {a.name: a for a in (sigmoid, tanh, relu, softplus, identity, softmax, leaky_relu())}


def names() -> tuple[str, ...]:
    """The activation names :func:`get` accepts.

    Returns:
      A tuple of names; ``"leaky_relu"`` means slope 0.01, ``"leaky_relu(0.2)"`` another.
    """
    return tuple(_BY_NAME)


def get(spec: str | Activation) -> Activation:
    """Look an activation up by name (``"relu"``) or spec (``"leaky_relu(0.2)"``).

    Args:
      spec: a name from :func:`names`, a ``"leaky_relu(slope)"`` spec, or an
        :class:`Activation` (returned as it is).

    Returns:
      The :class:`Activation`.

    Raises:
      ValueError: an unknown name or a bad slope.
    """
    if isinstance(spec, Activation):
        return spec
    if not isinstance(spec, str):
        raise ValueError(
            f"activation must be a name or a jbackprop.activations.Activation, got {spec!r}"
        )
    match = re.fullmatch(r"\s*leaky_relu\s*\(\s*([^)]+?)\s*\)\s*", spec)
    if match:
        try:
            return leaky_relu(float(match.group(1)))
        except ValueError as err:
            raise ValueError(f"bad activation {spec!r}: {err}") from None
    if spec not in _BY_NAME:
        raise ValueError(f"unknown activation {spec!r}; expected one of {', '.join(names())}")
    return _BY_NAME[spec]
