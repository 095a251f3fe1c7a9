"""The network's configuration: a frozen :class:`Model`, static architecture plus traced
hyperparameters.

A ``Model`` says what the network is (layer sizes, activations, cost, whether dropout is on)
and how it is regularised (``l2``, ``l1``, the dropout rate). The parameters are a separate
pytree, a tuple with one ``{"w": (n_l, n_{l-1}), "b": (n_l,)}`` dict per layer, so every
function of the library is pure.

A ``Model`` is also a pytree whose leaves are ``l2``, ``l1`` and ``dropout``: passed to a
jitted function they are traced values, so changing λ does not recompile, and a batch of
models with stacked hyperparameters can be ``jax.vmap``-ed over. The architecture (the
pytree's static part: sizes, activations, cost and :attr:`Model.has_dropout`) decides the
compiled program. It is hashable too, so it can still be a static argument of a user's own
``jax.jit``.

Where the split matters:

* A new ``l2``, ``l1`` or dropout rate (``dataclasses.replace(model, l2=1.0)``) reuses every
  compiled program; new sizes, activations or cost compile new ones. So does switching
  dropout on or off: a rate of 0 and a rate above 0 are different architectures.
* A ``Model`` is validated when it is built; models rebuilt from their leaves inside
  ``jax.jit`` or ``jax.vmap`` are not (their leaves may be tracers or stacked arrays).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any

import jax
from jax import Array

from jbackprop import activations, costs
from jbackprop.activations import Activation
from jbackprop.costs import Cost

__all__ = ["Model", "Params", "architecture"]

Params = tuple[dict[str, Array], ...]
"""One ``{"w": (n_l, n_{l-1}), "b": (n_l,)}`` dict per layer ``l = 1..L``, all of one
floating dtype; a list of such dicts is accepted too, and results then come back as lists."""


def _nonnegative(name: str, value: Any, below_one: bool = False) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"Model: {name} must be a number, got {value!r}") from None
    upper = "< 1" if below_one else "finite"
    if not (math.isfinite(value) and value >= 0 and (not below_one or value < 1)):
        raise ValueError(f"Model: {name} must be >= 0 and {upper}, got {value}")
    return value


@dataclass(frozen=True)
class Model:
    """A fully-connected network ``sizes[0] -> ... -> sizes[-1]``.

    Args:
      sizes: units per layer, ``(n_0, n_1, ..., n_L)``; ``n_0`` is the input width.
      hidden: activation of layers ``1..L-1``: a name from ``jbackprop.activations.names()``
        or an :class:`~jbackprop.activations.Activation`, e.g. ``leaky_relu(0.2)``.
      output: activation of layer ``L``; also ``"softmax"`` and ``"identity"``.
      cost: ``"quadratic"``, ``"cross_entropy"`` (needs outputs in (0, 1)) or
        ``"log_likelihood"`` (needs a softmax output).
      l2: ``λ`` of the L2 term ``λ/(2n) Σ w²`` (eq 12).
      l1: ``λ`` of the L1 term ``λ/n Σ |w|``.
      dropout: probability of switching a hidden unit off during training, in ``[0, 1)``.

    Activation and cost names are resolved to their objects when the model is built, so
    ``model.hidden`` is an :class:`~jbackprop.activations.Activation`. ``sizes``, the
    activations, the cost and :attr:`has_dropout` are the static architecture; ``l2``,
    ``l1`` and ``dropout`` are the pytree's leaves (see the module docstring), traced inside
    ``jax.jit``, so changing them does not recompile. Stacking models for ``jax.vmap``
    needs equal architectures: give every model a dropout rate above zero, or none.

    Raises:
      ValueError: a size is not a positive integer or there are fewer than two; an
        activation or cost is unknown; softmax is asked for the hidden layers or for fewer
        than 2 outputs; the cost does not fit the output (``log_likelihood`` needs softmax,
        ``cross_entropy`` sigmoid or softmax); ``l2``, ``l1`` or ``dropout`` is out of range.
    """

    sizes: tuple[int, ...]
    hidden: str | Activation = "sigmoid"
    output: str | Activation = "sigmoid"
    cost: str | Cost = "cross_entropy"
    l2: float = 0.0
    l1: float = 0.0
    dropout: float = 0.0

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "sizes", _check_sizes(self.sizes))
        hidden = activations.get(self.hidden)
        if not hidden.elementwise:
            raise ValueError(
                f"Model: hidden activation {hidden.spec!r} is not elementwise; softmax is "
                "allowed only as the output activation"
            )
        output = activations.get(self.output)
        cost = costs.get(self.cost)
        cost.check(output)
        if output.name == "softmax" and self.sizes[-1] < 2:
            raise ValueError(
                f"Model: a softmax output needs at least 2 units, got sizes {self.sizes}"
            )
        set_(self, "hidden", hidden)
        set_(self, "output", output)
        set_(self, "cost", cost)
        set_(self, "l2", _nonnegative("l2", self.l2))
        set_(self, "l1", _nonnegative("l1", self.l1))
        set_(self, "dropout", _nonnegative("dropout", self.dropout, below_one=True))
        set_(self, "_has_dropout", self.dropout > 0 and len(self.sizes) > 2)

    @property
    def has_dropout(self) -> bool:
        """Whether hidden units are dropped in training: static, unlike the rate itself.

        For a model as built, True when ``dropout > 0`` and the network has a hidden layer
        (:func:`architecture` can switch it on for a rate of 0); functions then need a
        ``key`` for the masks."""
        return self._has_dropout

    @property
    def widths(self) -> tuple[int, ...]:
        """``(n_1, ..., n_{L-1})``, the hidden layers' widths (where dropout acts)."""
        return self.sizes[1:-1]

    @property
    def num_layers(self) -> int:
        """``L``, the number of weight layers."""
        return len(self.sizes) - 1

    def activation(self, l: int) -> Activation:
        """The activation of layer ``l`` (1-based, as in the lecture).

        Args:
          l: the layer, ``1..L``.

        Returns:
          :attr:`output` for ``l = L``, :attr:`hidden` otherwise.
        """
        return self.output if l == self.num_layers else self.hidden

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description that :meth:`from_dict` turns back into this model.

        Returns:
          ``{"sizes": [...], "hidden": spec, "output": spec, "cost": name, "l2": ...,
          "l1": ..., "dropout": ...}``, activations as their spec strings (e.g.
          ``"leaky_relu(0.2)"``); the leaves are Python floats for a model built in Python.
        """
        return {
            "sizes": list(self.sizes),
            "hidden": self.hidden.spec,
            "output": self.output.spec,
            "cost": self.cost.name,
            "l2": self.l2,
            "l1": self.l1,
            "dropout": self.dropout,
        }

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> Model:
        """Inverse of :meth:`to_dict`.

        Args:
          config: a dict with the keys of :meth:`to_dict`; ``"sizes"`` is required, the
            others default as in ``Model``.

        Returns:
          The validated ``Model``.

        Raises:
          ValueError: an unknown key, or a configuration ``Model`` refuses.
        """
        known = {"sizes", "hidden", "output", "cost", "l2", "l1", "dropout"}
        unknown = set(config) - known
        if unknown:
            raise ValueError(f"Model: unknown configuration keys {sorted(unknown)}")
        if "sizes" not in config:
            raise ValueError("Model: the configuration has no 'sizes'")
        return cls(**{**config, "sizes": tuple(config["sizes"])})


def _flatten(model: Model):
    static = (model.sizes, model.hidden, model.output, model.cost, model.has_dropout)
    return (model.l2, model.l1, model.dropout), static


def _unflatten(static, leaves) -> Model:
    # No validation: the leaves may be tracers or stacked arrays inside jit and vmap.
    model = object.__new__(Model)
    names = ("sizes", "hidden", "output", "cost", "_has_dropout")
    for name, value in zip(names, static, strict=True):
        object.__setattr__(model, name, value)
    for name, value in zip(("l2", "l1", "dropout"), leaves, strict=True):
        object.__setattr__(model, name, value)
    return model


jax.tree_util.register_pytree_node(Model, _flatten, _unflatten)


def architecture(model: Model, dropout: bool | None = None) -> Model:
    """``model`` with the given static dropout switch, keeping its hyperparameter leaves.

    Lets models whose rates differ, some of them zero, share one architecture (and one
    compiled program) by switching dropout on for all of them: a rate of 0 then keeps
    every unit.

    Args:
      model: the model; its leaves may be traced or stacked.
      dropout: ``True`` or ``False`` sets :attr:`Model.has_dropout` (it stays ``False``
        for a network without a hidden layer); ``None`` keeps the model's.

    Returns:
      A ``Model`` with the same sizes, activations, cost and leaves, not validated again.
    """
    leaves, (sizes, hidden, output, cost, has) = _flatten(model)
    has = has if dropout is None else bool(dropout) and len(sizes) > 2
    return _unflatten((sizes, hidden, output, cost, has), leaves)


def _check_sizes(sizes: Any) -> tuple[int, ...]:
    try:
        sizes = tuple(sizes)
    except TypeError:
        raise ValueError(
            f"Model: sizes must be a sequence of layer widths, got {sizes!r}"
        ) from None
    if len(sizes) < 2:
        raise ValueError(
            f"Model: sizes needs at least two entries (inputs and outputs), got {sizes}"
        )
    if any(isinstance(s, bool) or not hasattr(s, "__index__") or s <= 0 for s in sizes):
        raise ValueError(f"Model: every size must be a positive integer, got sizes {sizes}")
    return tuple(operator.index(s) for s in sizes)
