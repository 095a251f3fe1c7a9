"""Bring your own MLP: convert Flax, Equinox and Haiku multilayer perceptrons, and back.

A researcher with a trained (or freshly initialised) MLP in another library converts it
once, uses every jbackprop function on it (per-example norms, private gradients, gradient
statistics, ``jb.fit``), and writes the result back into the original structure::

    params, model = jb.interop.from_flax(variables["params"], hidden="relu",
                                         cost="log_likelihood")
    params, _ = jb.fit(params, model, (X, Y), optax.sgd(0.1), epochs=5, batch_size=32,
                       key=key, gradient=jb.privacy.DPGradient(clip=1.0, noise_multiplier=1.0))
    variables = {"params": jb.interop.to_flax(params, like=variables["params"])}

What each library stores, and what is converted:

============  =================================================  ===============================
library       structure                                          weight layout
============  =================================================  ===============================
Flax linen    ``variables["params"]``: nested dicts of           ``kernel`` ``(n_in, n_out)``,
              ``{"kernel", "bias"}`` (``Dense_0``, ``Dense_1``)   ``bias`` ``(n_out,)``
Flax nnx      an ``nnx.Module`` of ``nnx.Linear`` layers (also     as linen
              in ``nnx.List`` / ``nnx.Sequential``), or its
              ``nnx.State``
Haiku         ``{"mlp/~/linear_0": {"w", "b"}, ...}``             ``w`` ``(n_in, n_out)``
Equinox       an ``eqx.nn.MLP`` (also with ``scan=True``)          ``weight`` ``(n_out, n_in)``
============  =================================================  ===============================

jbackprop stores ``w`` as ``(n_out, n_in)``, so Flax and Haiku kernels are transposed
(exactly: a transpose moves bits, it does not round them). ``from_*`` followed by ``to_*``
gives back the user's structure bit for bit, with its dtypes.

**Layer order (Flax, Haiku).** A dict of parameters does not record the order in which its
layers are applied, and its key order is lost as soon as the dict passes through
``jax.tree.map`` (which sorts keys, putting ``Dense_10`` before ``Dense_2``). So layers are
ordered by the integer that ends their name, path component by path component:
``Dense_0 < Dense_1 < ... < Dense_10``; Haiku's ``linear < linear_1 < linear_2`` (a name
without a number counts as 0) and ``mlp/~/linear_0 < mlp/~/linear_1``; ``nnx.List`` and
``nnx.Sequential`` index their layers ``0, 1, ...``. Where two layers differ by more than
that number (``hidden`` and ``out``, or ``encoder/Dense_0`` and ``head``), the names say
nothing about the order, and the converter refuses rather than guess: pass
``layers=[...]``, every layer's name (path components joined by ``/``) in forward order.

**Activations.** Flax and Haiku parameters record none: ``hidden`` names the activation
the module applies between its layers. ``eqx.nn.MLP`` records its ``activation`` and
``final_activation``; they are recognised by their values (at a fixed set of points from
-30 to 30), so ``jax.nn.relu``, ``lambda x: jnp.maximum(x, 0)`` and
``functools.partial(jax.nn.leaky_relu, negative_slope=0.2)`` are all understood.

**Outputs and logits.** Most models return the last layer's ``z`` (logits) and leave the
output nonlinearity to the loss. ``output=None`` (the default) reads that convention off
the cost: ``"log_likelihood"`` gets a softmax output (the same objective as
``optax.softmax_cross_entropy`` on the logits), ``"cross_entropy"`` a sigmoid output
(``optax.sigmoid_binary_cross_entropy``), ``"quadratic"`` the identity. Then
``jb.forward`` returns ``softmax(logits)`` (resp. ``sigmoid``) where the module returns the
logits, and ``jb.grad`` equals ``jax.grad`` of the module's loss. An Equinox MLP whose
``final_activation`` is already a sigmoid keeps it.

**Refused**, with a ``ValueError`` that names the layer: a kernel that is not a matrix
(convolutions, ``DenseGeneral``), a layer without a bias, any other parameter (a norm
layer's ``scale``, an embedding), parameters that are not floating-point or not all of one
dtype, layers whose widths do not chain, names that do not fix the order, an activation
jbackprop does not have (``gelu``, ``silu``, learnable activations), and an Equinox MLP
with ``in_size`` or ``out_size`` ``"scalar"``.

Flax, Haiku and Equinox are optional (``pip install 'jbackprop[interop]'``) and never
imported by ``import jbackprop``. Flax and Haiku parameters are plain dicts, which need
neither library; Equinox is imported when its converters are called.
"""

from __future__ import annotations

import importlib
import itertools
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jbackprop import activations, costs
from jbackprop.activations import Activation
from jbackprop.costs import Cost
from jbackprop.model import Model, Params

__all__ = ["from_equinox", "from_flax", "from_haiku", "to_equinox", "to_flax", "to_haiku"]

_EXTRA = "pip install 'jbackprop[interop]'"

# The output activation a cost implies when the module returns logits (output=None).
_LINK = {"log_likelihood": "softmax", "cross_entropy": "sigmoid", "quadratic": "identity"}

Path = tuple[Any, ...]
LayerNames = Sequence[str | Sequence[Any]]


class _Layer(NamedTuple):
    """One dense layer as the other library stores it: where, and its two arrays."""

    name: str
    path: Path
    weight: Any
    bias: Any


class _Keys(NamedTuple):
    """How a library names a dense layer's arrays, and what it calls the bias switch."""

    library: str
    weight: str
    bias: str
    bias_flag: str


_FLAX = _Keys("Flax", "kernel", "bias", "use_bias=True")
_HAIKU = _Keys("Haiku", "w", "b", "with_bias=True")


def _require(module: str, caller: str) -> Any:
    """Import an optional library when a converter first needs it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"jbackprop.interop.{caller} needs {module}, which is not installed; "
            f"install the optional libraries with: {_EXTRA}"
        ) from err


# --- from parameter dicts -------------------------------------------------------------


def _name(path: Path) -> str:
    return "/".join(str(part) for part in path) or "<top level>"


def _find_layers(tree: Any, keys: _Keys) -> list[_Layer]:
    """Every dict holding ``keys.weight``, in the tree's own order; anything else refused."""
    found: list[_Layer] = []

    def walk(node: Any, path: Path) -> None:
        if not isinstance(node, Mapping):
            raise ValueError(
                f"{_name(path)!r} is not part of a dense layer: a {keys.library} dense "
                f"layer is a dict with {keys.weight!r} and {keys.bias!r}, and only a stack "
                "of dense layers can be converted"
            )
        if keys.weight in node:
            found.append(_layer(node, path, keys))
            return
        for key, child in node.items():
            walk(child, (*path, key))

    walk(tree, ())
    if not found:
        raise ValueError(
            f"found no {keys.library} dense layer (a dict with {keys.weight!r} and "
            f"{keys.bias!r}) in the parameters"
        )
    return found


def _layer(node: Mapping, path: Path, keys: _Keys) -> _Layer:
    name = _name(path)
    extra = sorted(str(k) for k in node if k not in (keys.weight, keys.bias))
    if extra:
        raise ValueError(
            f"layer {name!r} holds {extra} besides {keys.weight!r} and {keys.bias!r}; only "
            "plain dense layers can be converted"
        )
    if keys.bias not in node:
        raise ValueError(
            f"layer {name!r} has no bias ({keys.bias!r}); every jbackprop layer adds one, so "
            f"build it with {keys.bias_flag}"
        )
    weight, bias = node[keys.weight], node[keys.bias]
    for what, x in ((keys.weight, weight), (keys.bias, bias)):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise ValueError(f"layer {name!r}: {what!r} must be an array, got {type(x).__name__}")
    if len(weight.shape) != 2:
        raise ValueError(
            f"layer {name!r}: {keys.weight!r} has shape {tuple(weight.shape)}, but only a "
            "dense kernel of shape (n_in, n_out) can be converted (a convolution or "
            "DenseGeneral kernel has more axes)"
        )
    if tuple(bias.shape) != (weight.shape[1],):
        raise ValueError(
            f"layer {name!r}: {keys.bias!r} has shape {tuple(bias.shape)}, expected "
            f"({weight.shape[1]},) for a kernel of shape {tuple(weight.shape)}"
        )
    return _Layer(name, path, weight, bias)


def _number(part: Any) -> tuple[str, int]:
    """``"Dense_10" -> ("Dense", 10)``, ``"linear" -> ("linear", 0)``, ``3 -> ("", 3)``."""
    if isinstance(part, int):
        return "", part
    text = str(part)
    match = re.fullmatch(r"(.*?)_?(\d+)", text)
    return (match[1], int(match[2])) if match else (text, 0)


def _order(found: list[_Layer], layers: LayerNames | None, keys: _Keys) -> list[_Layer]:
    """The layers in forward order: ``layers=`` when given, else by their names' numbers."""
    if layers is not None:
        return _order_given(found, layers)
    if len(found) == 1:
        return found
    key = {layer.name: tuple(_number(part) for part in layer.path) for layer in found}
    ordered = sorted(found, key=lambda layer: key[layer.name])
    for a, b in itertools.combinations(ordered, 2):
        ka, kb = key[a.name], key[b.name]
        # Not strict: a path that is a prefix of another leaves first as None (refused).
        diffs = (i for i, (x, y) in enumerate(zip(ka, kb, strict=False)) if x != y)
        first = next(diffs, None)
        if first is None or ka[first][0] != kb[first][0]:
            raise ValueError(
                f"cannot tell the order of the {keys.library} layers {a.name!r} and "
                f"{b.name!r} from their names: layers are ordered by the number that ends "
                "each name (Dense_0, Dense_1, ..., Dense_10), path component by path "
                "component; pass layers=[...] with every layer's name in forward order, "
                f"from {sorted(layer.name for layer in found)}"
            )
    return ordered


def _order_given(found: list[_Layer], layers: LayerNames) -> list[_Layer]:
    if isinstance(layers, str) or not isinstance(layers, Sequence):
        raise ValueError(f"layers must be a list of layer names, got {layers!r}")
    by_name = {layer.name: layer for layer in found}
    names = [n if isinstance(n, str) else _name(tuple(n)) for n in layers]
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(f"layers names {unknown}, not among the dense layers {sorted(by_name)}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"layers names {repeated} more than once")
    missing = [n for n in by_name if n not in names]
    if missing:
        raise ValueError(
            f"layers leaves out {missing}; list every dense layer of the parameters, in "
            "forward order"
        )
    return [by_name[n] for n in names]


def _check_stack(
    ordered: list[_Layer], n_in: Callable[[_Layer], int], n_out: Callable[[_Layer], int]
) -> tuple[int, ...]:
    """The widths ``(n_0, ..., n_L)``; refuses layers that do not chain or mix dtypes."""
    first = ordered[0]
    dtype = np.dtype(first.weight.dtype)
    for layer in ordered:
        for x in (layer.weight, layer.bias):
            if not jnp.issubdtype(x.dtype, jnp.floating):
                raise ValueError(
                    f"layer {layer.name!r} holds {np.dtype(x.dtype)}, not floating-point numbers"
                )
            if np.dtype(x.dtype) != dtype:
                raise ValueError(
                    f"layer {layer.name!r} holds {np.dtype(x.dtype)} but layer {first.name!r} "
                    f"holds {dtype}; jbackprop computes every layer in one dtype, so cast the "
                    "parameters to one first"
                )
    for before, layer in itertools.pairwise(ordered):
        if n_in(layer) != n_out(before):
            raise ValueError(
                f"layers do not chain: {layer.name!r} takes {n_in(layer)} inputs but "
                f"{before.name!r}, the layer before it, gives {n_out(before)} (forward order: "
                f"{[x.name for x in ordered]})"
            )
    return (n_in(first), *(n_out(layer) for layer in ordered))


def _model(
    sizes: tuple[int, ...],
    hidden: str | Activation,
    output: str | Activation,
    cost: str | Cost,
    model_kwargs: dict[str, Any],
) -> Model:
    reserved = sorted({"sizes", "hidden", "output", "cost"} & set(model_kwargs))
    if reserved:
        raise ValueError(f"{reserved} are set by the converter and cannot be passed again")
    return Model(sizes=sizes, hidden=hidden, output=output, cost=cost, **model_kwargs)


def _output(output: str | Activation | None, cost: str | Cost) -> str | Activation:
    """``output``, or for ``None`` the output the cost implies for a logits model."""
    if output is not None:
        return output
    name = costs.get(cost).name
    if name not in _LINK:
        raise ValueError(f"output is required: cost {name!r} implies no output activation")
    return _LINK[name]


def _hidden(hidden: str | Activation | None, num_layers: int, keys: _Keys) -> str | Activation:
    if hidden is not None:
        return hidden
    if num_layers > 1:
        raise ValueError(
            f"hidden is required: {keys.library} parameters record no activations, so name "
            f"the one your module applies between its layers (one of {activations.names()})"
        )
    return "identity"  # a single layer has no hidden activation


def _from_dict(
    tree: Any,
    keys: _Keys,
    hidden: str | Activation | None,
    output: str | Activation | None,
    cost: str | Cost,
    layers: LayerNames | None,
    model_kwargs: dict[str, Any],
) -> tuple[Params, Model]:
    ordered = _order(_find_layers(tree, keys), layers, keys)
    sizes = _check_stack(ordered, lambda x: x.weight.shape[0], lambda x: x.weight.shape[1])
    params = tuple({"w": layer.weight.T, "b": layer.bias} for layer in ordered)
    model = _model(
        sizes, _hidden(hidden, len(ordered), keys), _output(output, cost), cost, model_kwargs
    )
    return params, model


# --- back into parameter dicts --------------------------------------------------------


def _check_params(params: Any, num_layers: int, what: str) -> tuple[dict[str, Any], ...]:
    if not isinstance(params, list | tuple) or not all(
        isinstance(p, Mapping) and set(p) == {"w", "b"} for p in params
    ):
        raise ValueError("params must be a tuple or list with one {'w', 'b'} dict per layer")
    if len(params) != num_layers:
        raise ValueError(f"params has {len(params)} layers but like holds {num_layers} {what}")
    return tuple(params)


def _cast(x: Any, like: Any) -> Any:
    """``x`` in ``like``'s dtype, so writing back keeps the user's dtypes."""
    return x if x.dtype == like.dtype else x.astype(like.dtype)


def _check_shapes(p: Mapping[str, Any], layer: _Layer, w_shape: tuple[int, ...], l: int) -> None:
    for what, got, want in (
        ("w", tuple(np.shape(p["w"])), w_shape),
        ("b", tuple(np.shape(p["b"])), tuple(layer.bias.shape)),
    ):
        if got != want:
            raise ValueError(
                f"params[{l}]['{what}'] has shape {got}, but layer {layer.name!r} of like "
                f"needs {want}"
            )


def _same_mapping(like: Mapping, items: dict[Any, Any]) -> Mapping:
    """``items`` in ``like``'s own mapping type (a ``FrozenDict`` stays frozen)."""
    if type(like) is dict:
        return items
    try:
        return type(like)(items)
    except TypeError:
        return items


def _rebuild(node: Mapping, new: dict[Path, dict[str, Any]], path: Path = ()) -> Mapping:
    """``node`` with the arrays of every layer in ``new`` replaced, keys in their order."""
    if path in new:
        return _same_mapping(node, {k: new[path][k] for k in node})
    return _same_mapping(node, {k: _rebuild(v, new, (*path, k)) for k, v in node.items()})


def _to_dict(params: Any, like: Any, keys: _Keys, layers: LayerNames | None) -> Mapping:
    ordered = _order(_find_layers(like, keys), layers, keys)
    params = _check_params(params, len(ordered), f"{keys.library} dense layers")
    new = {}
    for l, (p, layer) in enumerate(zip(params, ordered, strict=True)):
        _check_shapes(p, layer, tuple(layer.weight.shape[::-1]), l)
        new[layer.path] = {
            keys.weight: _cast(p["w"].T, layer.weight),
            keys.bias: _cast(p["b"], layer.bias),
        }
    return _rebuild(like, new)


# --- Flax -----------------------------------------------------------------------------


def _nnx() -> Any:
    # An nnx object can only exist once flax.nnx has been imported, so there is nothing to
    # detect (and nothing to import) before then.
    return sys.modules.get("flax.nnx")


def _flax_params(tree: Any) -> Any:
    """Linen dicts as they are; an nnx Module or State as the plain dict of its Params."""
    nnx = _nnx()
    if nnx is not None and isinstance(tree, nnx.Module):
        return nnx.to_pure_dict(nnx.state(tree, nnx.Param))
    if nnx is not None and isinstance(tree, nnx.State):
        return nnx.to_pure_dict(nnx.filter_state(tree, nnx.Param))
    return tree


def from_flax(
    params: Any, *, hidden: str | Activation | None = None, output: str | Activation | None = None,
    cost: str | Cost, layers: LayerNames | None = None, **model_kwargs: Any,
) -> tuple[Params, Model]:  # fmt: skip
    """Convert a stack of Flax dense layers to jbackprop parameters and a :class:`Model`.

    Args:
      params: Flax linen ``variables["params"]`` (a dict or ``FrozenDict``, nested as the
        modules are, each ``nn.Dense`` a ``{"kernel": (n_in, n_out), "bias": (n_out,)}``
        dict), or an ``nnx.Module`` built from ``nnx.Linear`` layers, or its
        ``nnx.State`` (its ``nnx.Param`` variables are converted; RNG state and other
        non-parameter variables are ignored).
      hidden: the activation the module applies between layers: a name from
        ``jbackprop.activations.names()`` or an ``Activation`` such as
        ``leaky_relu(0.2)``. Required for more than one layer, since Flax records none.
      output: the activation on the last layer's output; ``None`` when the module returns
        logits and its loss applies the nonlinearity (see the module docstring).
      cost: ``"quadratic"``, ``"cross_entropy"`` or ``"log_likelihood"``.
      layers: the layers' names in forward order (``"MLP_0/Dense_1"`` or a tuple path),
        needed only where the names' trailing numbers do not fix the order.
      **model_kwargs: passed on to :class:`Model` (``l2``, ``l1``, ``dropout``).

    Returns:
      ``(params, model)``: one ``{"w": (n_out, n_in), "b": (n_out,)}`` dict per layer in
      forward order, with the arrays' dtype, and the ``Model`` they belong to.

    Raises:
      ValueError: naming the layer, for anything a jbackprop MLP cannot hold (see the
        module docstring).
    """
    return _from_dict(_flax_params(params), _FLAX, hidden, output, cost, layers, model_kwargs)


def to_flax(params: Params, like: Any, *, layers: LayerNames | None = None) -> Any:
    """Write jbackprop parameters (or gradients) back into a Flax structure.

    Args:
      params: one ``{"w": (n_out, n_in), "b": (n_out,)}`` dict per layer, as
        :func:`from_flax` returns them (or as :func:`jbackprop.grad` returns gradients).
      like: the structure ``params`` came from: linen ``variables["params"]``, an
        ``nnx.State`` or an ``nnx.Module``. It is not modified.
      layers: the same ``layers`` given to :func:`from_flax`, if any.

    Returns:
      ``like``'s structure (same mapping types, key order and dtypes) holding ``params``:
      a linen dict, a new ``nnx.State`` or a new ``nnx.Module`` (sharing ``like``'s
      non-parameter state). ``to_flax(from_flax(p, ...)[0], like=p)`` equals ``p`` bit
      for bit. Traceable, so it can sit inside a jitted loss.
    """
    nnx = _nnx()
    if nnx is not None and isinstance(like, nnx.Module):
        graphdef, state, rest = nnx.split(like, nnx.Param, ...)
        return nnx.merge(graphdef, to_flax(params, state, layers=layers), rest)
    if nnx is not None and isinstance(like, nnx.State):
        pure = _to_dict(params, nnx.to_pure_dict(nnx.filter_state(like, nnx.Param)), _FLAX, layers)
        state = jax.tree.map(lambda x: x, like)  # a copy: replace_by_pure_dict works in place
        nnx.replace_by_pure_dict(state, pure)
        return state
    return _to_dict(params, like, _FLAX, layers)


# --- Haiku ----------------------------------------------------------------------------


def from_haiku(
    params: Mapping[str, Any],
    *, hidden: str | Activation | None = None, output: str | Activation | None = None,
    cost: str | Cost, layers: LayerNames | None = None, **model_kwargs: Any,
) -> tuple[Params, Model]:  # fmt: skip
    """Convert Haiku ``hk.Linear`` parameters (e.g. of ``hk.nets.MLP``) to jbackprop's.

    Args:
      params: what ``transformed.init`` returned: ``{"mlp/~/linear_0": {"w": (n_in,
        n_out), "b": (n_out,)}, ...}``.
      hidden, output, cost, layers, **model_kwargs: as for :func:`from_flax`; layer names
        are Haiku's module names (``"mlp/~/linear_1"``).

    Returns:
      ``(params, model)`` as for :func:`from_flax`.
    """
    return _from_dict(params, _HAIKU, hidden, output, cost, layers, model_kwargs)


def to_haiku(params: Params, like: Mapping[str, Any], *, layers: LayerNames | None = None):
    """Write jbackprop parameters (or gradients) back into Haiku's params dict.

    Args:
      params: one ``{"w": (n_out, n_in), "b": (n_out,)}`` dict per layer.
      like: the Haiku params ``params`` came from (not modified).
      layers: the same ``layers`` given to :func:`from_haiku`, if any.

    Returns:
      A dict shaped as ``like`` (module names, key order, dtypes) holding ``params``, ready
      for ``transformed.apply``.
    """
    return _to_dict(params, like, _HAIKU, layers)


# --- Equinox --------------------------------------------------------------------------

# Points where jbackprop's activations differ from every look-alike (relu6, hard_tanh,
# gelu, silu, elu...): both tails, the kink at 0 and the curved middle.
_PROBE = (-30.0, -6.5, -2.0, -1.0, -0.3, -1e-3, 0.0, 1e-3, 0.3, 1.0, 2.0, 6.5, 30.0)


def _eqx_layers(eqx: Any, mlp: Any, caller: str) -> list[_Layer]:
    """The MLP's ``Linear`` layers in order, a ``scan=True`` MLP's stacked ones unstacked."""
    if not isinstance(mlp, eqx.nn.MLP):
        raise ValueError(f"{caller} converts an equinox.nn.MLP, got {type(mlp).__name__}")
    for attr in ("in_size", "out_size"):
        if getattr(mlp, attr) == "scalar":
            raise ValueError(
                f"the MLP has {attr}='scalar'; jbackprop's inputs and outputs are vectors, "
                "so build it with an integer size (1) instead"
            )
    found = []
    for i, linear in enumerate(mlp.layers):
        stacked = linear.weight.ndim == 3  # the hidden layers of a scan=True MLP
        for j in range(linear.weight.shape[0]) if stacked else (None,):
            name = f"layers[{i}]" if j is None else f"layers[{i}][{j}]"
            if linear.bias is None:
                raise ValueError(
                    f"layer {name} of the MLP has no bias (use_bias=False or "
                    "use_final_bias=False); every jbackprop layer adds one"
                )
            pick = (lambda x: x) if j is None else (lambda x, j=j: x[j])
            found.append(_Layer(name, (i, j), pick(linear.weight), pick(linear.bias)))
    return found


def _recognise(eqx: Any, fn: Callable, what: str) -> Activation:
    """The jbackprop activation that ``fn``, applied per neuron as the MLP does, computes."""
    if jax.tree.leaves(eqx.filter(fn, eqx.is_array)):
        raise ValueError(f"{what} holds arrays (a learnable activation), which jbackprop lacks")
    choices = [a for a in activations.names() if a not in ("softmax", "leaky_relu")]
    with jax.ensure_compile_time_eval():  # evaluate now, even when called under jax.jit
        z = jnp.asarray(_PROBE, jnp.float32)
        try:
            got = np.asarray(jax.vmap(fn)(z))
        except Exception as err:
            raise ValueError(f"{what} ({fn!r}) cannot be evaluated on a scalar: {err}") from err
        candidates = [activations.get(a) for a in choices]
        slope = -float(got[_PROBE.index(-1.0)]) if got.shape == z.shape else -1.0
        if 0.0 <= slope <= 1.0:
            candidates.append(activations.leaky_relu(round(slope, 6)))
        for act in candidates:
            if got.shape == z.shape and np.allclose(got, act(z), rtol=1e-5, atol=1e-6):
                return act
    raise ValueError(
        f"{what} ({fn!r}) does not compute any activation jbackprop has "
        f"({', '.join(choices)}, leaky_relu(slope))"
    )


def from_equinox(
    mlp: Any,
    *,
    cost: str | Cost,
    output: str | Activation | None = None,
    **model_kwargs: Any,
) -> tuple[Params, Model]:
    """Convert an ``eqx.nn.MLP`` to jbackprop parameters and a :class:`Model`.

    The sizes come from the layers and the activations from the MLP's ``activation`` and
    ``final_activation``, recognised by their values.

    Args:
      mlp: an ``equinox.nn.MLP`` with biases and vector inputs and outputs; its
        ``weight`` already has jbackprop's ``(n_out, n_in)`` layout.
      cost: ``"quadratic"``, ``"cross_entropy"`` or ``"log_likelihood"``.
      output: the output activation, when the MLP's ``final_activation`` is the identity
        (it returns logits) and the loss applies another; ``None`` infers it from the
        cost (see the module docstring). Any other ``final_activation`` is kept, and an
        ``output`` that contradicts it is refused.
      **model_kwargs: passed on to :class:`Model` (``l2``, ``l1``, ``dropout``).

    Returns:
      ``(params, model)``: one ``{"w": (n_out, n_in), "b": (n_out,)}`` dict per layer with
      the MLP's dtype, and the ``Model`` they belong to.
    """
    eqx = _require("equinox", "from_equinox")
    found = _eqx_layers(eqx, mlp, "from_equinox")
    sizes = _check_stack(found, lambda x: x.weight.shape[1], lambda x: x.weight.shape[0])
    if len(found) == 1:
        # eqx.nn.MLP with depth=0 is a bare Linear: it applies neither activation.
        hidden, final = activations.identity, activations.identity
    else:
        hidden = _recognise(eqx, mlp.activation, "the MLP's activation")
        final = _recognise(eqx, mlp.final_activation, "the MLP's final_activation")
    if final.name != "identity":
        if output is not None and activations.get(output) != final:
            raise ValueError(
                f"output={activations.get(output).spec!r}, but the MLP's final_activation "
                f"computes {final.spec!r}"
            )
        output = final
    params = tuple({"w": layer.weight, "b": layer.bias} for layer in found)
    return params, _model(sizes, hidden, _output(output, cost), cost, model_kwargs)


def to_equinox(params: Params, like: Any) -> Any:
    """Write jbackprop parameters (or gradients) into a copy of an ``eqx.nn.MLP``.

    Args:
      params: one ``{"w": (n_out, n_in), "b": (n_out,)}`` dict per layer.
      like: the MLP ``params`` came from (not modified).

    Returns:
      A new MLP, ``like`` with its weights and biases replaced (in ``like``'s dtype;
      re-stacked for ``scan=True``). Traceable, so it can sit inside a jitted loss.
    """
    eqx = _require("equinox", "to_equinox")
    found = _eqx_layers(eqx, like, "to_equinox")
    params = _check_params(params, len(found), "Linear layers")
    for l, (p, layer) in enumerate(zip(params, found, strict=True)):
        _check_shapes(p, layer, tuple(layer.weight.shape), l)
    new = [
        (_cast(p["w"], layer.weight), _cast(p["b"], layer.bias))
        for p, layer in zip(params, found, strict=True)
    ]
    linears = []
    for i, linear in enumerate(like.layers):
        mine = [wb for wb, layer in zip(new, found, strict=True) if layer.path[0] == i]
        if linear.weight.ndim == 3:
            if not mine:  # a scan=True MLP of depth 1 stacks no hidden layer
                linears.append(linear)
                continue
            w, b = jnp.stack([w for w, _ in mine]), jnp.stack([b for _, b in mine])
        else:
            [(w, b)] = mine
        linears.append(eqx.tree_at(lambda x: (x.weight, x.bias), linear, (w, b)))
    return eqx.tree_at(lambda m: m.layers, like, tuple(linears))
