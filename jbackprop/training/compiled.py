"""One compiled program per epoch setting, and the cache that keeps them.

The compiled epoch depends on the model's architecture, the optimizer's definition and the
minibatch size only: the regularisation strengths and dropout rate of the
:class:`~jbackprop.Model` are traced, and optimizers are matched by what they compute
(their functions and hyperparameters, :func:`fingerprint`), not by object identity, so
``fit(..., optax.sgd(0.5), ...)`` called again with a fresh ``optax.sgd(0.5)`` or another
``l2`` reuses the compiled epoch. :func:`cached` is the one cache of the package;
:func:`jbackprop.fit_many` keeps its vmapped programs in one too.
"""

from __future__ import annotations

import functools
import inspect
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import Array
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jbackprop.model import Model, Params
from jbackprop.training.devices import batch_constraint
from jbackprop.training.epoch import run_epoch
from jbackprop.training.poisson import poisson_capacity, run_poisson_epoch

__all__ = [
    "SAMPLINGS",
    "cached",
    "check_sampling",
    "compiled_epoch",
    "fingerprint",
    "prng_impl",
    "raw_key",
    "train_epoch",
]

SAMPLINGS = ("shuffle", "poisson")


class _Opaque(Exception):
    """A value whose behaviour cannot be read off by :func:`fingerprint`."""


class _Identity:
    """Hashes and compares by identity, and keeps its object alive while cached."""

    def __init__(self, obj: Any):
        self.obj = obj

    def __hash__(self) -> int:
        return id(self.obj)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Identity) and other.obj is self.obj


def fingerprint(obj: Any, _depth: int = 0) -> Any:
    """A hashable description of what ``obj`` computes, for caching compiled programs.

    Functions are described by their code, defaults and closed-over values (recursively),
    so two ``optax.sgd(0.5)`` built separately get equal fingerprints, while
    ``optax.sgd(0.1)`` differs. Small arrays count by value; lists and sets, which may
    change after the program is compiled, by identity. Raises :class:`_Opaque` for anything
    else that is not hashable (or is a tracer).
    """
    if _depth > 40:
        raise _Opaque
    fp = functools.partial(fingerprint, _depth=_depth + 1)
    if obj is None or isinstance(obj, bool | int | float | complex | str | bytes):
        return (type(obj).__name__, obj)
    if isinstance(obj, tuple):
        return (type(obj).__name__, tuple(fp(x) for x in obj))
    if isinstance(obj, list | set | bytearray):
        return ("identity", _Identity(obj))
    if isinstance(obj, dict):
        return ("dict", tuple((fp(k), fp(v)) for k, v in obj.items()))
    if isinstance(obj, functools.partial):
        return ("partial", fp(obj.func), fp(obj.args), fp(obj.keywords))
    if inspect.isfunction(obj):
        cells = tuple(fp(c.cell_contents) for c in obj.__closure__ or ())
        return ("fn", obj.__code__, fp(obj.__defaults__), fp(obj.__kwdefaults__), cells)
    if isinstance(obj, np.ndarray | np.generic | jax.Array):
        if isinstance(obj, jax.core.Tracer) or np.size(obj) > 4096:
            raise _Opaque
        host = np.asarray(obj)
        return ("array", str(host.dtype), host.shape, host.tobytes())
    try:
        hash(obj)
    except TypeError:
        raise _Opaque from None
    return ("object", obj)


def _fingerprint_or_identity(obj: Any) -> Any:
    try:
        return fingerprint(obj)
    except _Opaque:
        return ("identity", _Identity(obj))


def cached(cache: OrderedDict, settings: tuple, build: Callable[[], Any], size: int) -> Any:
    """``cache``'s entry for ``settings``, built by ``build()`` the first time.

    Each setting is matched by :func:`fingerprint` (by identity when it cannot be
    fingerprinted), so equal optimizers built separately share an entry; the ``size`` most
    recently used entries are kept.

    Args:
      cache: the cache, oldest entry first.
      settings: what the entry depends on.
      build: makes the entry (compiles a program, say).
      size: the number of entries kept.

    Returns:
      The entry.
    """
    key = tuple(_fingerprint_or_identity(setting) for setting in settings)
    if key not in cache:
        cache[key] = build()
        if len(cache) > size:
            cache.popitem(last=False)
    cache.move_to_end(key)
    return cache[key]


def check_sampling(sampling: str, gradient: Any) -> None:
    """``sampling`` is known, and a Poisson-sampled step can build ``gradient``.

    Args:
      sampling: ``"shuffle"`` or ``"poisson"``.
      gradient: ``None``, or what replaces :func:`jbackprop.grad` in each step.
    """
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
    blockwise = all(hasattr(gradient, name) for name in ("masked_sum", "finish"))
    if sampling == "poisson" and gradient is not None and not blockwise:
        raise ValueError(
            "sampling='poisson' needs gradient=None or a jbackprop.privacy.DPGradient (an "
            "object with masked_sum and finish methods), because a step's sample arrives in "
            f"fixed-size blocks; got {gradient!r}"
        )


def prng_impl(key: Array) -> Any:
    """The PRNG implementation of a typed key (``jax.random.key``); ``None`` for raw key
    data (``jax.random.PRNGKey``).

    Args:
      key: a PRNG key.

    Returns:
      What :func:`compiled_epoch` takes as ``impl``.
    """
    return jax.random.key_impl(key) if _typed(key) else None


def raw_key(key: Array) -> Array:
    """The raw data of a PRNG key, which a compiled epoch takes like any other array.

    Args:
      key: a PRNG key, typed or raw.

    Returns:
      Its ``uint32`` key data.
    """
    return jax.random.key_data(key) if _typed(key) else key


def _typed(key: Array) -> bool:
    return jnp.issubdtype(key.dtype, jax.dtypes.prng_key)


_EPOCHS: OrderedDict[Any, Callable] = OrderedDict()


def compiled_epoch(
    optimizer: optax.GradientTransformation,
    batch_size: int,
    mesh: Mesh | None = None,
    gradient: Callable | None = None,
    impl: Any = None,
    progress: Callable | None = None,
    sampling: str = "shuffle",
) -> Callable:
    """The jitted epoch ``(params, opt_state, model, X, Y, key_data, n)`` for these
    settings, built once per distinct setting (the last 64 are kept).

    The epoch key arrives as raw key data (``impl`` names its PRNG, :func:`prng_impl`) so
    that it can be placed on a mesh spanning several processes like any other array.

    Args:
      optimizer, batch_size, gradient, progress, sampling: as for :func:`jbackprop.fit`.
      mesh: the training mesh, or ``None`` for one device.
      impl: the PRNG implementation of the epoch keys, or ``None`` for raw keys.

    Returns:
      The compiled epoch, returning ``(params, opt_state)``.
    """

    def build() -> Callable:
        out = NamedSharding(mesh, PartitionSpec()) if mesh is not None else None
        return jax.jit(epoch) if mesh is None else jax.jit(epoch, out_shardings=out)

    def epoch(params, opt_state, model, X, Y, key_data, n):
        key = key_data if impl is None else jax.random.wrap_key_data(key_data, impl=impl)
        if sampling == "poisson":
            cap = poisson_capacity(X.shape[0], batch_size, 1 if mesh is None else mesh.size)
            return run_poisson_epoch(
                params, opt_state, model, X, Y, key, n,
                optimizer=optimizer, batch_size=batch_size, gradient=gradient, capacity=cap,
                shard=batch_constraint(mesh, cap), progress=progress,
            )  # fmt: skip
        k_perm, k_drop = jax.random.split(key)
        perm = jax.random.permutation(k_perm, X.shape[0])
        return run_epoch(
            params, opt_state, model, X, Y, perm, k_drop, n,
            optimizer=optimizer, batch_size=batch_size, gradient=gradient,
            shard=batch_constraint(mesh, batch_size), progress=progress,
        )  # fmt: skip

    settings = (optimizer, batch_size, mesh, gradient, impl, progress, sampling)
    return cached(_EPOCHS, settings, build, size=64)


def train_epoch(
    params: Params, opt_state: Any, model: Model, X: Array, Y: Array, key: Array, n: Any = None,
    *, optimizer: optax.GradientTransformation, batch_size: int,
    gradient: Callable | None = None, sampling: str = "shuffle",
) -> tuple[Params, Any]:  # fmt: skip
    """One compiled epoch of :func:`jbackprop.fit`: shuffle with ``key``, then every minibatch
    (or, with ``sampling="poisson"``, ``round(n / batch_size)`` Poisson-sampled steps).

    Args:
      params: a tuple of ``{"w": (n_l, n_{l-1}), "b": (n_l,)}`` dicts.
      opt_state: ``optimizer.init(params)`` or the state a previous epoch returned.
      model: the network; its ``l2``, ``l1`` and ``dropout`` are traced.
      X: inputs ``(n, n_0)``, already an array of the params' dtype.
      Y: target vectors ``(n, n_L)`` (one-hot for classes).
      key: PRNG key of this epoch; :func:`fit` uses ``jax.random.fold_in(key, epoch)``.
      n: training-set size of eqs 12-15 (defaults to ``len(X)``).
      optimizer, batch_size, gradient, sampling: as for :func:`fit`.

    Returns:
      ``(params, opt_state)`` after the epoch, params as a tuple of dicts.

    Arguments are not checked beyond what tracing does; use :func:`fit` for a checked
    loop. Equal settings reuse one compiled program.
    """
    check_sampling(sampling, gradient)
    run = compiled_epoch(optimizer, int(batch_size), None, gradient, prng_impl(key), None, sampling)
    n = X.shape[0] if n is None else n
    return run(tuple(params), opt_state, model, X, Y, raw_key(key), n)
