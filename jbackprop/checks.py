"""The library's internal helpers: argument checks run in Python before anything is traced,
and the few small functions several modules share.

Shapes are checked always (they are known even under ``jax.jit``); values (label range,
finiteness, ``n > 0``, hyperparameters) only when they are concrete. Each failure is a
``ValueError`` that names the argument, what it got and what was expected, instead of a
shape error from deep inside XLA. Integer labels that are traced cannot be range-checked,
so an out-of-range one becomes a row of NaN instead of a silent zero gradient. This is the
one module whose names other modules of the library may import freely; it is not part of
the public API.
"""

from __future__ import annotations

import math
import operator
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from jbackprop.model import Model, Params

__all__ = [
    "Data",
    "batch",
    "check_key",
    "check_n",
    "check_params",
    "inputs",
    "like",
    "pair",
    "positive_int",
    "prepare",
    "read_params",
    "scalar",
    "set_params_reader",
    "targets",
]


def is_concrete(x: Any) -> bool:
    """Whether ``x`` has a value now (is not a tracer), so its value can be checked."""
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
        one_hot = jax.nn.one_hot(y, n_out, dtype=_dtype(params))
        if is_concrete(y):
            return one_hot
        # Traced labels cannot be range-checked here; one_hot would turn a bad label into
        # a zero row and a plausible-looking zero gradient. NaN makes the mistake loud.
        bad = (y < 0) | (y >= n_out)
        return jnp.where(bad[..., None], jnp.nan, one_hot)
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
        regularised = [v for v in (model.l2, model.l1) if not is_concrete(v) or float(v)]
        if regularised:
            raise ValueError(
                f"n (the training-set size of eqs 12-13) is required because the model has "
                f"l2={model.l2}, l1={model.l1}"
            )
        return
    if is_concrete(n):
        try:
            value = float(n)
        except (TypeError, ValueError):
            raise ValueError(f"n must be a positive training-set size, got {n!r}") from None
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"n must be a positive training-set size, got {n} (finite, > 0)")


def check_key(key: Any, model: Model) -> None:
    """A model with dropout needs a PRNG key for its masks."""
    if key is None and model.has_dropout:
        raise ValueError(
            f"key is required: the model has dropout={model.dropout}, and the key draws "
            "the dropout masks"
        )


def positive_int(name: str, value: Any, *, allow_none: bool = False, low: int = 1) -> int | None:
    """``value`` as an ``int >= low`` (NumPy integers welcome, ``bool`` refused)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not hasattr(value, "__index__") or value < low:
        what = "a positive integer" if low == 1 else f"an integer >= {low}"
        raise ValueError(f"{name} must be {what}{' or None' if allow_none else ''}, got {value!r}")
    return operator.index(value)


def scalar(name: str, value: Any, *, positive: bool) -> Any:
    """Check a scalar hyperparameter; traced values pass unchecked (as ``n`` does)."""
    if not is_concrete(value):
        if jnp.ndim(value) != 0:
            raise ValueError(f"{name} must be a scalar, got shape {jnp.shape(value)}")
        return value
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    ok = v > 0 if positive else v >= 0
    if not (ok and math.isfinite(v)):
        bound = "> 0" if positive else ">= 0"
        raise ValueError(f"{name} must be finite and {bound}, got {value!r}")
    return v


def batch(params, X, Y, model: Model, n, key, regularised: bool = True):
    """Check a minibatch call's arguments; return ``params`` (a tuple), ``X`` and ``Y``."""
    check_model(model)
    check_params(params, model)
    X, Y = pair(X, Y, model, params)
    if regularised:
        check_n(n, model)
    check_key(key, model)
    return tuple(params), X, Y


def pair(X: Any, Y: Any, model: Model, params: Params, x_name: str = "X", y_name: str = "Y"):
    """A minibatch ``X: (m, n_0)`` and its targets ``(m, n_L)`` (labels ``(m,)`` one-hot
    encoded), in the params' dtype."""
    X = inputs(X, model, params, batched=True, name=x_name)
    return X, targets(Y, model, params, (X.shape[0],), name=y_name)


def check_model(model: Any, where: str = "") -> None:
    """``model`` must be a :class:`~jbackprop.Model` (not, say, its sizes)."""
    if not isinstance(model, Model):
        prefix = f"{where}: " if where else ""
        raise ValueError(f"{prefix}model must be a jbackprop.Model, got {type(model).__name__}")


class Data(NamedTuple):
    """A checked data set: inputs ``(n, n_0)``, targets ``(n, n_L)``, labels ``(n,)``."""

    X: Array
    Y: Array
    labels: Array
    n: int


def prepare(params, model: Model, data: Any, name: str, allow_nonfinite: bool = True) -> Data:
    """Check an ``(X, Y)`` pair against ``model``; integer labels become one-hot targets."""
    try:
        X, Y = data
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (X, Y), got {type(data).__name__}") from None
    check_model(model)
    check_params(params, model)
    X, Y = pair(X, Y, model, params, f"{name} X", f"{name} Y")
    if not allow_nonfinite and not bool(jnp.all(jnp.isfinite(X))):
        raise ValueError(
            f"{name} X contains NaN or infinite values; clean the data or pass allow_nonfinite=True"
        )
    return Data(X, Y, jnp.argmax(Y, axis=-1), X.shape[0])


def like(params: Any, tree: Any) -> Any:
    """``tree`` with its per-layer tuples as lists when the caller's ``params`` is a list,
    so gradients have exactly the structure of the parameters (as ``jax.grad`` gives)."""
    if not isinstance(params, list) or not isinstance(tree, tuple):
        return tree
    if hasattr(tree, "_fields"):  # a NamedTuple of results
        return type(tree)(*(like(params, t) for t in tree))
    if tree and all(isinstance(t, dict) for t in tree):
        return list(tree)
    return tuple(like(params, t) for t in tree)


# --- parameter files --------------------------------------------------------------------

# Parameter files belong to jbackprop.io, which sits above the quantities; a quantity that
# takes their paths (attribution's checkpoints) may not import it, so io hands its reader
# down here when it is imported (as ``import jbackprop`` always does).
_params_reader: list[Callable[[str | os.PathLike, Model], Params]] = []


def set_params_reader(reader: Callable[[str | os.PathLike, Model], Params]) -> None:
    """Make ``reader(path, model) -> params`` the one :func:`read_params` calls."""
    _params_reader[:] = [reader]


def read_params(path: str | os.PathLike, model: Model, name: str) -> Params:
    """The parameters in the file at ``path`` (written by :func:`jbackprop.save_params`),
    checked to be ``model``'s; a ``ValueError`` names the argument ``name``."""
    if not _params_reader:
        raise RuntimeError("parameter files are read by jbackprop.io; import jbackprop first")
    try:
        return _params_reader[0](path, model)
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from None
