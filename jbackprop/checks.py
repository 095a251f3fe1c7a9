"""Argument checks run in Python before anything is traced.

Shapes are checked always (they are known even under ``jax.jit``); values (label range,
finiteness, ``n > 0``) only when the array is concrete. Each failure is a ``ValueError``
that names the argument, what it got and what was expected, instead of a shape error from
deep inside XLA.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from jbackprop.model import Model, Params

__all__ = ["check_key", "check_n", "check_params", "inputs", "targets"]


def is_concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


def check_params(params: Any, model: Model) -> None:
    """``params`` must hold one ``{"w", "b"}`` dict per layer with the model's shapes."""
    if not isinstance(params, list | tuple):
        raise ValueError(
            f"params must be a tuple or list with one {{'w', 'b'}} dict per layer, "
            f"got {type(params).__name__}"
        )
    if len(params) != model.num_layers:
        raise ValueError(
            f"params has {len(params)} layers but the model with sizes {model.sizes} has "
            f"{model.num_layers}; were these params made for another model?"
        )
    for l, (layer, n_in, n_out) in enumerate(
        zip(params, model.sizes[:-1], model.sizes[1:], strict=True), start=1
    ):
        if not isinstance(layer, dict) or set(layer) != {"w", "b"}:
            raise ValueError(f"params[{l - 1}] (layer {l}) must be a dict with keys 'w' and 'b'")
        for name, want in (("w", (n_out, n_in)), ("b", (n_out,))):
            got = tuple(np.shape(layer[name]))
            if got != want:
                raise ValueError(
                    f"params[{l - 1}]['{name}'] (layer {l}) has shape {got}, but the model "
                    f"with sizes {model.sizes} expects {want}"
                )


def _dtype(params: Params):
    return jnp.result_type(params[0]["w"])


def inputs(x: Any, model: Model, params: Params, *, batched: bool | None, name: str = "x") -> Array:
    """``x`` as an array of the params' dtype, shape ``(n_0,)`` or ``(m, n_0)``."""
    x = _as_array(x, name)
    ndims = {True: (2,), False: (1,), None: (1, 2)}[batched]
    want = {1: f"({model.sizes[0]},)", 2: f"(m, {model.sizes[0]})"}
    if x.ndim not in ndims or x.shape[-1] != model.sizes[0]:
        expected = " or ".join(want[d] for d in ndims)
        raise ValueError(
            f"{name} has shape {tuple(x.shape)}, expected {expected}: the model's input "
            f"width is sizes[0] = {model.sizes[0]}"
        )
    if batched and x.shape[0] == 0:
        raise ValueError(f"{name} is empty: a minibatch needs at least one example")
    return x.astype(_dtype(params))


def targets(y: Any, model: Model, params: Params, batch: tuple[int, ...], name: str = "y") -> Array:
    """Target vectors ``batch + (n_L,)``; integer class labels of shape ``batch`` become one-hot."""
    y = _as_array(y, name)
    n_out = model.sizes[-1]
    if jnp.issubdtype(y.dtype, jnp.integer) and y.shape == batch:
        if is_concrete(y) and y.size:
            # NumPy, not jnp: under a user's jax.jit a jnp reduction of a concrete
            # (closed-over) array would be staged out and could not be read here.
            labels = np.asarray(y)
            lo, hi = int(labels.min()), int(labels.max())
            if lo < 0 or hi >= n_out:
                raise ValueError(
                    f"{name} holds class labels in [{lo}, {hi}], but the model has {n_out} "
                    f"outputs, so labels must lie in [0, {n_out - 1}]"
                )
        return jax.nn.one_hot(y, n_out, dtype=_dtype(params))
    if y.shape != (*batch, n_out):
        raise ValueError(
            f"{name} has shape {tuple(y.shape)}, expected target vectors {(*batch, n_out)} "
            f"or integer class labels {batch}"
        )
    return y.astype(_dtype(params))


def _as_array(x: Any, name: str) -> Array:
    if isinstance(x, jax.Array):
        return x
    try:
        return jnp.asarray(x)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be an array, got {type(x).__name__}: {err}") from None


def check_n(n: Any, model: Model) -> None:
    """``n``, the training-set size of eqs 12-15, is needed whenever L1 or L2 is on."""
    if n is None:
        if model.l1 or model.l2:
            raise ValueError(
                f"n (the training-set size of eqs 12-13) is required because the model has "
                f"l2={model.l2}, l1={model.l1}"
            )
        return
    if is_concrete(n) and not float(n) > 0:
        raise ValueError(f"n must be a positive training-set size, got {n}")


def check_key(key: Any, model: Model) -> None:
    """A model with dropout needs a PRNG key for its masks."""
    if key is None and model.dropout and model.num_layers > 1:
        raise ValueError(
            f"key is required: the model has dropout={model.dropout}, and the key draws "
            "the dropout masks"
        )
