"""Minibatch stochastic gradient descent (lecture, sections 2 and 4).

One epoch is one compiled program: a fresh shuffle of the training set from the PRNG key,
then a ``jax.lax.scan`` over the minibatches, each step feeding :func:`jbackprop.grad` to an
Optax optimizer. With ``optax.sgd(eta)`` a step is eq 4, and with L2 on it is eqs 15-16. A
remainder that does not fill a minibatch is used as one smaller, last minibatch, so every
example is visited every epoch.

With ``sampling="poisson"`` an epoch is instead ``round(n / m)`` steps, each over a Poisson
sample: every example enters independently with probability ``q = m / n``, as the privacy
accountants of :mod:`jbackprop.privacy` assume (:func:`run_poisson_epoch`).

The key of epoch ``e`` is ``fold_in(key, e)``: an epoch's shuffle (or samples) and dropout
masks depend on nothing but the key and the epoch number, which is what makes an interrupted
run resume bit-identically.

The epoch is written once, in :func:`run_epoch`; :func:`fit` compiles it for one model and
:func:`jbackprop.fit_many` vmaps it over many. The compiled program depends on the model's
architecture, the optimizer's definition and the minibatch size only: the regularisation
strengths and dropout rate of the :class:`~jbackprop.Model` are traced, and optimizers are
matched by what they compute (their functions and hyperparameters), not by object identity,
so ``fit(..., optax.sgd(0.5), ...)`` called again with a fresh ``optax.sgd(0.5)`` or another
``l2`` reuses the compiled epoch.
"""

from __future__ import annotations

import functools
import inspect
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import Array
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jbackprop import checks
from jbackprop.checks import Data, like, prepare
from jbackprop.model import Model, Params
from jbackprop.network import (
    add_penalty_grads,
    batch_deltas,
    feedforward,
    minibatch_grad,
    objective,
)
from jbackprop.privacy import poisson_schedule, weighted_sums
from jbackprop.state import TrainState

__all__ = [
    "TrainState",
    "TrainingDiverged",
    "accuracy",
    "evaluate",
    "fit",
    "run_epoch",
    "run_poisson_epoch",
    "train_epoch",
]

SAMPLINGS = ("shuffle", "poisson")


class TrainingDiverged(FloatingPointError):
    """The cost or a parameter became NaN or infinite during an epoch.

    Args:
      epoch: the epoch (1-based) after which the non-finite value was seen; kept as the
        ``epoch`` attribute so a caller can point at the last good checkpoint.
      what: what stopped being finite (``"parameters"`` or ``"training cost"``).
    """

    def __init__(self, epoch: int, what: str):
        self.epoch = epoch
        super().__init__(
            f"training diverged in epoch {epoch}: the {what} became NaN or infinite. "
            "The learning rate eta is probably too large for this network; try a smaller one "
            "(e.g. a tenth of it)."
        )


# --- evaluation -----------------------------------------------------------------------


def evaluation(params, X, Y, labels, model, n):
    """``(cost, accuracy, finite)`` of a checked data set, dropout off (traceable)."""
    zs, _ = feedforward(params, X, model)
    c = objective(params, zs[-1], Y, model, n)
    acc = jnp.mean(jnp.argmax(zs[-1], axis=-1) == labels)
    finite = jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(params)]))
    return c, acc, finite


_evaluate = jax.jit(evaluation)


def evaluate(
    params: Params, X: Array, Y: Array, model: Model, n: int | None = None
) -> tuple[float, float]:
    """The cost and accuracy on a data set, without dropout (as at inference).

    Args:
      params: one ``{"w": (n_l, n_{l-1}), "b": (n_l,)}`` dict per layer.
      X: inputs ``(m, n_0)``.
      Y: integer labels ``(m,)`` or targets ``(m, n_L)``.
      model: the network the params belong to.
      n: the training-set size of eqs 12-15; required when ``l2`` or ``l1`` is on.

    Returns:
      ``(cost, accuracy)`` as Python floats: the mean cost plus the regulariser term
      (eq 11, what :func:`fit` minimises) and the fraction of rows whose largest output
      is the target's class.
    """
    data = prepare(params, model, (X, Y), "data")
    checks.check_n(n, model)
    c, acc, _ = _evaluate(tuple(params), data.X, data.Y, data.labels, model, n)
    return float(c), float(acc)


@jax.jit
def _accuracy(params, X, labels, model):
    zs, _ = feedforward(params, X, model)
    return jnp.mean(jnp.argmax(zs[-1], axis=-1) == labels)


def accuracy(params: Params, X: Array, labels: Array, model: Model) -> float:
    """Fraction of examples whose largest output ``argmax_i a^L_i`` is the label.

    Args:
      params: one ``{"w": (n_l, n_{l-1}), "b": (n_l,)}`` dict per layer.
      X: inputs ``(m, n_0)``.
      labels: integer classes ``(m,)`` or one-hot targets ``(m, n_L)``.
      model: the network the params belong to.

    Returns:
      The accuracy, a Python float in ``[0, 1]``.
    """
    data = prepare(params, model, (X, labels), "data")
    return float(_accuracy(tuple(params), data.X, data.labels, model))


# --- one epoch ------------------------------------------------------------------------


def _batch_constraint(mesh: Mesh | None, size: int):
    """Shard a minibatch over the mesh's batch axis when it divides evenly."""
    if mesh is None or size % mesh.size:
        return lambda x: x
    sharding = NamedSharding(mesh, PartitionSpec("batch"))
    return lambda x: jax.lax.with_sharding_constraint(x, sharding)


def _apply(optimizer: optax.GradientTransformation, g: Params, params: Params, opt_state):
    """One optimizer step: eq 4 for ``optax.sgd``."""
    updates, opt_state = optimizer.update(g, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def _report(progress: Callable[[int, int], None] | None, i: Array, steps: int) -> None:
    """Call ``progress(i, steps)`` from inside the compiled loop, about 50 times an epoch."""
    if progress is not None:
        report = lambda: jax.debug.callback(progress, i, steps)  # noqa: E731
        jax.lax.cond(i % max(1, steps // 50) == 0, report, lambda: None)


def run_epoch(
    params: Params,
    opt_state: Any,
    model: Model,
    X: Array,
    Y: Array,
    perm: Array,
    drop_key: Array,
    n: Any,
    *,
    optimizer: optax.GradientTransformation,
    batch_size: int,
    gradient: Callable | None = None,
    shard: Callable[[Array], Array] = lambda x: x,
    progress: Callable[[int, int], None] | None = None,
):
    """One pass over the training set in the order ``perm``: eq 4 (or the optimizer's rule)
    for each minibatch of ``batch_size`` examples, the remainder as a last, smaller one.

    Traceable and unchecked: :func:`fit` jits it for one model, :func:`jbackprop.fit_many`
    vmaps it over many, and a custom training loop may do either.

    Args:
      params: one ``{"w": (n_l, n_{l-1}), "b": (n_l,)}`` dict per layer (a tuple).
      opt_state: the optimizer's state for ``params``.
      model: the network; ``l2``, ``l1`` and the dropout rate may be traced.
      X: inputs ``(N, n_0)``.
      Y: target vectors ``(N, n_L)`` (one-hot for classes).
      perm: ``(N,)`` the order in which the examples are visited (a permutation).
      drop_key: split into one key per step: the dropout masks, or whatever ``gradient``
        draws.
      n: training-set size of eqs 12-15.
      optimizer: an ``optax.GradientTransformation``; ``optax.sgd(eta)`` is eq 4.
      batch_size: the minibatch size ``m``.
      gradient: replaces :func:`jbackprop.grad` in each step (see :func:`fit`).
      shard: applied to every minibatch (a sharding constraint when training on a mesh).
      progress: called with ``(step, steps)`` about 50 times per epoch, from inside the
        compiled loop.

    Returns:
      ``(params, opt_state)`` after the epoch.
    """

    def step(carry, ids, key):
        params, opt_state = carry
        Xb, Yb = shard(X[ids]), shard(Y[ids])
        if gradient is None:
            g = minibatch_grad(params, Xb, Yb, model, n, key if model.has_dropout else None)
        else:
            g = gradient(params, Xb, Yb, model, n, key)
        return _apply(optimizer, g, params, opt_state)

    steps, rem = divmod(X.shape[0], batch_size)
    step_keys = jax.random.split(drop_key, steps + 1)

    def body(carry, xs):
        i, ids, k = xs
        _report(progress, i, steps)
        return step(carry, ids, k), None

    full = perm[: steps * batch_size].reshape(steps, batch_size)
    carry, _ = jax.lax.scan(body, (params, opt_state), (jnp.arange(steps), full, step_keys[:steps]))
    if rem:
        carry = step(carry, perm[steps * batch_size :], step_keys[steps])
    return carry


# --- one epoch of Poisson-sampled steps ------------------------------------------------


@dataclass(frozen=True)
class MaskedMean:
    """The non-private gradient of a Poisson-sampled step: :func:`jbackprop.grad` of the
    examples drawn, built block by block (the protocol :class:`~jbackprop.privacy.DPGradient`
    also follows)."""

    def masked_sum(self, params: Params, X, Y, model: Model, key, weights) -> Params:
        """``Σ_i w_i g_i`` over one block (eqs 9-10); padding has weight 0."""
        acts, deltas = batch_deltas(params, X, Y, model, key if model.has_dropout else None)
        return weighted_sums(acts, deltas, [weights] * len(deltas))

    def finish(self, sums: Params, params: Params, model: Model, n, count, expected, key):
        """The mean over the ``count`` examples drawn (a zero data term when none was),
        plus the regulariser's gradient (eq 13)."""
        size = jnp.maximum(count, 1).astype(jax.tree.leaves(sums)[0].dtype)
        return add_penalty_grads(jax.tree.map(lambda s: s / size, sums), params, model, n)


def poisson_capacity(n: int, batch_size: int, multiple: int = 1) -> int:
    """Rows of one block of a Poisson-sampled step.

    The expected size ``μ = q n = batch_size`` plus three standard deviations
    ``sqrt(μ (1 - q))``, at most ``n``, rounded up to a multiple of ``multiple`` (the
    devices a block is sharded over). It sets the cost of a step, never its sample: a
    step that draws more examples processes them in further blocks, which happens in about
    one step in 700 (the normal tail beyond 3σ).
    """
    q = batch_size / n
    cap = min(n, math.ceil(batch_size + 3 * math.sqrt(batch_size * (1 - q))))
    return -(-cap // multiple) * multiple


def poisson_sample(key: Array, n: int, batch_size: int) -> Array:
    """``(n,)`` booleans: each example is in the step's sample independently, with
    probability ``floor(q 2³²) / 2³²`` for ``q = batch_size / n``, i.e. ``q`` to 2⁻³² and
    never above it (32 random bits per example against an integer threshold)."""
    if batch_size >= n:
        return jnp.ones((n,), bool)
    threshold = (batch_size << 32) // n  # floor(q 2^32), exact in integers
    return jax.random.bits(key, (n,), jnp.uint32) < jnp.uint32(threshold)


def run_poisson_epoch(
    params: Params,
    opt_state: Any,
    model: Model,
    X: Array,
    Y: Array,
    key: Array,
    n: Any,
    *,
    optimizer: optax.GradientTransformation,
    batch_size: int,
    gradient: Any = None,
    capacity: int | None = None,
    shard: Callable[[Array], Array] = lambda x: x,
    progress: Callable[[int, int], None] | None = None,
):
    """``round(N / batch_size)`` steps of Poisson-sampled minibatches (``N = len(X)``).

    Each step includes every training example independently with probability
    ``q = batch_size / N`` (:func:`poisson_sample`), the sampling the privacy accountants
    assume (Abadi et al. 2016; :func:`jbackprop.privacy.epsilon`). Shapes stay fixed: the
    drawn examples are gathered into blocks of ``capacity`` rows (default
    :func:`poisson_capacity`), the rows past the sample are padding of weight 0, and a
    ``lax.while_loop`` runs as many blocks as the sample needs, so no drawn example is ever
    dropped and no padding contributes, whatever the sample's size. The gradient is the sum
    of ``gradient.masked_sum`` over the blocks, turned into the step's gradient by
    ``gradient.finish`` once: for ``gradient=None`` (:class:`MaskedMean`) the mean over the
    drawn examples, for :class:`~jbackprop.privacy.DPGradient` the clipped sum plus one
    noise draw, divided by the expected size ``q N = batch_size``.

    Traceable, unchecked. :func:`fit` jits this for ``sampling="poisson"``.

    Args:
      params: one ``{"w": (n_l, n_{l-1}), "b": (n_l,)}`` dict per layer.
      opt_state: the optimizer's state.
      model: the network; its ``l2``, ``l1`` and ``dropout`` may be traced.
      X: inputs ``(N, n_0)``, an array.
      Y: target vectors ``(N, n_L)``.
      key: split into one key per step, and each step's into the sample's, the dropout
        masks' (folded with the block number) and the noise's.
      n: training-set size of eqs 12-15.
      optimizer: an ``optax.GradientTransformation``.
      batch_size: the expected minibatch size ``q N``.
      gradient: ``None`` or an object with ``masked_sum`` and ``finish`` methods, such as
        :class:`~jbackprop.privacy.DPGradient`.
      capacity: rows per block; :func:`poisson_capacity` by default.
      shard: applied to every block's arrays (a sharding constraint).
      progress: called with ``(step, steps)`` about 50 times per epoch.

    Returns:
      ``(params, opt_state)`` after the epoch.
    """
    N = X.shape[0]
    grad_fn = MaskedMean() if gradient is None else gradient
    cap = poisson_capacity(N, batch_size) if capacity is None else capacity
    _, steps = poisson_schedule(N, batch_size)
    blocks = -(-N // cap)  # every example drawn still fits, so no slice is ever clamped

    def step(carry, key):
        params, opt_state = carry
        k_sample, k_drop, k_finish = jax.random.split(key, 3)
        drawn = poisson_sample(k_sample, N, batch_size)
        count = jnp.sum(drawn, dtype=jnp.int32)
        ids = jnp.nonzero(drawn, size=blocks * cap, fill_value=0)[0]

        def block(state):
            j, sums = state
            rows = jax.lax.dynamic_slice(ids, (j * cap,), (cap,))
            weights = (j * cap + jnp.arange(cap) < count).astype(X.dtype)
            part = grad_fn.masked_sum(
                params, shard(X[rows]), shard(Y[rows]), model,
                jax.random.fold_in(k_drop, j), shard(weights),
            )  # fmt: skip
            return j + 1, jax.tree.map(jnp.add, sums, part)

        zeros = jax.tree.map(jnp.zeros_like, params)
        _, sums = jax.lax.while_loop(lambda s: s[0] * cap < count, block, (0, zeros))
        g = grad_fn.finish(sums, params, model, n, count, batch_size, k_finish)
        return _apply(optimizer, g, params, opt_state)

    def body(carry, xs):
        i, k = xs
        _report(progress, i, steps)
        return step(carry, k), None

    step_keys = jax.random.split(key, steps)
    carry, _ = jax.lax.scan(body, (params, opt_state), (jnp.arange(steps), step_keys))
    return carry


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


_EPOCHS: OrderedDict[Any, Callable] = OrderedDict()


def _compiled_epoch(
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

    The epoch key arrives as raw key data (``impl`` names its PRNG) so that it can be
    placed on a mesh spanning several processes like any other array.
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
                shard=_batch_constraint(mesh, cap), progress=progress,
            )  # fmt: skip
        k_perm, k_drop = jax.random.split(key)
        perm = jax.random.permutation(k_perm, X.shape[0])
        return run_epoch(
            params, opt_state, model, X, Y, perm, k_drop, n,
            optimizer=optimizer, batch_size=batch_size, gradient=gradient,
            shard=_batch_constraint(mesh, batch_size), progress=progress,
        )  # fmt: skip

    settings = (optimizer, batch_size, mesh, gradient, impl, progress, sampling)
    return cached(_EPOCHS, settings, build, size=64)


def cached(cache: OrderedDict, settings: tuple, build: Callable[[], Any], size: int) -> Any:
    """``cache``'s entry for ``settings``, built by ``build()`` the first time.

    Each setting is matched by :func:`fingerprint` (by identity when it cannot be
    fingerprinted), so equal optimizers built separately share an entry; the ``size`` most
    recently used entries are kept.
    """
    key = tuple(_fingerprint_or_identity(setting) for setting in settings)
    if key not in cache:
        cache[key] = build()
        if len(cache) > size:
            cache.popitem(last=False)
    cache.move_to_end(key)
    return cache[key]


def train_epoch(
    params: Params,
    opt_state: Any,
    model: Model,
    X: Array,
    Y: Array,
    key: Array,
    n: Any = None,
    *,
    optimizer: optax.GradientTransformation,
    batch_size: int,
    gradient: Callable | None = None,
    sampling: str = "shuffle",
) -> tuple[Params, Any]:
    """One compiled epoch of :func:`fit`: shuffle with ``key``, then every minibatch
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
    impl = jax.random.key_impl(key) if _typed_key(key) else None
    check_sampling(sampling, gradient)
    run = _compiled_epoch(optimizer, int(batch_size), None, gradient, impl, None, sampling)
    n = X.shape[0] if n is None else n
    return run(tuple(params), opt_state, model, X, Y, _key_data(key), n)


# --- fit ------------------------------------------------------------------------------


def _resolve_mesh(devices) -> Mesh | None:
    if devices is None and jax.process_count() > 1:
        devices = "all"  # jax.distributed is initialised: train over every process
    if devices is None:
        return None
    if isinstance(devices, Mesh):
        return devices
    devs = jax.devices() if devices == "all" else list(devices)
    if not devs:
        raise ValueError("devices is empty: give None, 'all', a list of devices or a Mesh")
    return Mesh(np.array(devs), ("batch",))


def check_fit_args(data: Data, epochs, batch_size, patience=None, mesh=None) -> tuple[int, int]:
    """Check the loop's integers; return ``(epochs, batch_size)`` as ints."""
    epochs = checks.positive_int("epochs", epochs, low=0)
    if (
        isinstance(batch_size, bool)
        or not hasattr(batch_size, "__index__")
        or not 1 <= batch_size <= data.n
    ):
        raise ValueError(
            f"batch_size must be an integer between 1 and the training-set size {data.n}, "
            f"got {batch_size!r}"
        )
    checks.positive_int("patience", patience, allow_none=True)
    if mesh is not None and batch_size % mesh.size:
        raise ValueError(
            f"batch_size {batch_size} must be divisible by the {mesh.size} devices it is "
            "sharded over"
        )
    return epochs, int(batch_size)


def check_sampling(sampling: str, gradient: Any) -> None:
    """``sampling`` is known, and a Poisson-sampled step can build ``gradient``."""
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
    blockwise = all(hasattr(gradient, name) for name in ("masked_sum", "finish"))
    if sampling == "poisson" and gradient is not None and not blockwise:
        raise ValueError(
            "sampling='poisson' needs gradient=None or a jbackprop.privacy.DPGradient (an "
            "object with masked_sum and finish methods), because a step's sample arrives in "
            f"fixed-size blocks; got {gradient!r}"
        )


def check_optimizer(optimizer) -> None:
    if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
        raise ValueError(
            f"optimizer must be an optax.GradientTransformation (e.g. optax.sgd(0.5)), "
            f"got {optimizer!r}"
        )


def _record(epoch, train: Data, val: Data | None, params, model, n, seconds_from):
    c, acc, finite = _local(_evaluate(params, train.X, train.Y, train.labels, model, n))
    if not bool(finite):
        raise TrainingDiverged(epoch, "parameters")
    if not math.isfinite(float(c)):
        raise TrainingDiverged(epoch, "training cost")
    rec = {"epoch": epoch, "train_cost": float(c), "train_accuracy": float(acc)}
    if val is not None:
        vc, vacc, _ = _local(_evaluate(params, val.X, val.Y, val.labels, model, n))
        rec |= {"val_cost": float(vc), "val_accuracy": float(vacc)}
    rec["seconds"] = time.perf_counter() - seconds_from
    return rec


def fit(
    params: Params,
    model: Model,
    train: tuple[Array, Array],
    optimizer: optax.GradientTransformation,
    epochs: int,
    batch_size: int,
    key: Array,
    validation: tuple[Array, Array] | None = None,
    *,
    patience: int | None = None,
    n: int | None = None,
    devices: Any = None,
    resume: TrainState | None = None,
    on_epoch: Callable[[TrainState], None] | None = None,
    log: Callable[[dict[str, float]], None] | None = None,
    allow_nonfinite: bool = False,
    gradient: Callable | None = None,
    progress: Callable[[int, int], None] | None = None,
    sampling: str = "shuffle",
) -> tuple[Params, list[dict[str, float]]]:
    """Train by minibatch SGD; return the final (or best) params and a per-epoch history.

    Args:
      params, model: the starting parameters and the network they belong to.
      train: ``(X, Y)``, inputs ``(n, n_0)`` and targets ``(n, n_L)`` or labels ``(n,)``.
      optimizer: any ``optax.GradientTransformation``; ``optax.sgd(eta)`` is eq 4.
      epochs: total epochs, counting those already done in ``resume``.
      batch_size: minibatch size ``m``.
      key: PRNG key for the shuffles and dropout masks of every epoch.
      validation: optional ``(X, Y)`` evaluated after every epoch.
      patience: stop when validation accuracy has not improved for this many epochs and
        return the best epoch's parameters.
      n: training-set size in eqs 12-15; defaults to ``len(X)``.
      devices: ``None`` (default device), ``"all"``, a list of devices or a ``Mesh`` with
        axis ``"batch"``: every minibatch is sharded over them, parameters replicated.
      resume: a :class:`TrainState` to continue from (as given to ``on_epoch``).
      on_epoch: called with a :class:`TrainState` after every epoch (e.g. to checkpoint).
      log: called with each epoch's history record.
      allow_nonfinite: skip the check that ``X`` holds no NaN or infinity.
      gradient: replaces :func:`jbackprop.grad` in each step; a hashable callable
        ``(params, X, Y, model, n, key) -> grads`` traced inside the compiled epoch, given
        a fresh key per step (e.g. :class:`jbackprop.privacy.DPGradient`).
      progress: called with ``(step, steps)`` about 50 times per epoch from inside the
        compiled epoch (the experiment's progress bar).
      sampling: ``"shuffle"`` (default): every epoch a fresh shuffle cut into minibatches
        of ``batch_size``. ``"poisson"``: every epoch ``round(n / batch_size)`` steps, each
        over a sample that holds every example independently with probability
        ``q = batch_size / n`` (see :func:`run_poisson_epoch`); the step's gradient is the
        mean over the examples drawn, or with ``gradient=DPGradient(...)`` the noisy
        clipped sum divided by ``batch_size``, the mechanism whose ``ε``
        :func:`jbackprop.privacy.epsilon` gives for
        ``jbackprop.privacy.poisson_schedule(n, batch_size, epochs)``. Here ``n`` is
        ``len(X)``, which may differ from the ``n`` of eqs 12-15 when that is given.

    Returns:
      ``(params, history)``: the final parameters (the best epoch's with ``patience``), in
      the container ``params`` came in, and one record per epoch holding ``epoch``,
      ``train_cost``, ``train_accuracy``, ``val_cost`` and ``val_accuracy`` (with
      validation) and ``seconds``.

    Raises:
      TrainingDiverged: when the cost or the parameters stop being finite.
      ValueError: for arguments that do not fit the model or each other.
    """
    given = params
    check_optimizer(optimizer)
    check_sampling(sampling, gradient)
    tr = prepare(params, model, train, "train", allow_nonfinite)
    val = None if validation is None else prepare(params, model, validation, "validation")
    mesh = _resolve_mesh(devices)
    epochs, batch_size = check_fit_args(tr, epochs, batch_size, patience, mesh)
    if patience is not None and val is None:
        raise ValueError("patience needs a validation set to watch")
    n = tr.n if n is None else n
    checks.check_n(n, model)
    key = _as_key(key)
    state = resume or TrainState(tuple(params), optimizer.init(tuple(params)), 0)
    impl = jax.random.key_impl(key) if _typed_key(key) else None
    run = _compiled_epoch(optimizer, batch_size, mesh, gradient, impl, progress, sampling)
    # With a mesh, data and state are replicated on every device (of every process); each
    # step's minibatch is then sharded over the batch axis inside the compiled epoch.
    tr_eval, val = _place_data(tr, mesh, shard=True), _place_data(val, mesh, shard=True)
    tr = _place_data(tr, mesh, shard=False)
    params, opt_state = _replicate((state.params, state.opt_state), mesh)
    history, best, best_epoch = list(state.history), state.best_params, state.best_epoch
    if patience is not None and best is not None and state.epoch - best_epoch >= patience:
        epochs = state.epoch  # the resumed run had already stopped early
    for epoch in range(state.epoch + 1, epochs + 1):
        start = time.perf_counter()
        epoch_key = _replicate(_key_data(_epoch_key(key, epoch)), mesh)
        params, opt_state = run(params, opt_state, model, tr.X, tr.Y, epoch_key, n)
        rec = _record(epoch, tr_eval, val, params, model, n, start)
        history.append(rec)
        if val is None or best is None or rec["val_accuracy"] > _best_accuracy(history, best_epoch):
            best, best_epoch = _local(params), epoch
        state = TrainState(
            _local(params), _local(opt_state), epoch, tuple(history), best, best_epoch
        )
        if log is not None:
            log(rec)
        if on_epoch is not None:
            on_epoch(state)
        if patience is not None and epoch - best_epoch >= patience:
            break
    final = best if (patience is not None and best is not None) else _local(params)
    return like(given, final), history


def _typed_key(key: Array) -> bool:
    return jnp.issubdtype(key.dtype, jax.dtypes.prng_key)


def _key_data(key: Array) -> Array:
    return jax.random.key_data(key) if _typed_key(key) else key


def _on_mesh(x, mesh: Mesh, spec: PartitionSpec):
    """A global array laid out by ``spec`` on ``mesh``, built from this process's full copy
    (every process holds the same values; each fills the shards on its own devices)."""
    host = np.asarray(_local(x))
    return jax.make_array_from_callback(host.shape, NamedSharding(mesh, spec), host.__getitem__)


def _replicate(tree, mesh: Mesh | None):
    """Place ``tree`` on every device of ``mesh``, across processes if it spans several."""
    if mesh is None or tree is None:
        return tree
    return jax.tree.map(lambda x: _on_mesh(x, mesh, PartitionSpec()), tree)


def _place_data(data: Data | None, mesh: Mesh | None, shard: bool) -> Data | None:
    """Training data replicated (each step gathers its rows from a global shuffle);
    evaluation data split over the batch axis when it divides evenly, so every device
    evaluates only its part."""
    if data is None or mesh is None:
        return data
    spec = PartitionSpec("batch") if shard and data.n % mesh.size == 0 else PartitionSpec()
    arrays = (data.X, data.Y, data.labels)
    return Data(*(_on_mesh(x, mesh, spec) for x in arrays), data.n)


def _local(tree):
    """This process's copy of replicated arrays, usable outside the mesh (saving, eval)."""

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return x.addressable_data(0)
        return x

    return jax.tree.map(one, tree)


def _best_accuracy(history, best_epoch: int) -> float:
    return next(r["val_accuracy"] for r in history if r["epoch"] == best_epoch)


def _epoch_key(key: Array, epoch: int) -> Array:
    return jax.random.fold_in(key, epoch)


def _as_key(key: Any) -> Array:
    if key is None:
        raise ValueError("key is required: it draws the shuffle of every epoch")
    try:
        jax.random.fold_in(key, 0)
    except (TypeError, ValueError) as err:
        raise ValueError(f"key must be a JAX PRNG key, e.g. jax.random.key(0): {err}") from None
    return key
