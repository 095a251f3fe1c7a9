"""jbackprop's own training epoch, as the harness calls it.

``jbackprop.training.train_epoch`` is the compiled epoch that ``jb.fit`` runs for its epoch
``e`` with the key ``fold_in(key, e)``: the same shuffle, steps and update, without fit's
argument checks and per-epoch evaluation. The train section checks that the timed epochs
reproduce ``jb.fit``'s parameters bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import optax

import jbackprop as jb
from jbackprop.training import train_epoch
from scripts.bench.harness import EpochFn

DESCRIPTION = (
    "jbackprop.training.train_epoch(params, opt_state, model, X, Y, fold_in(key, e), n, "
    "optimizer=..., batch_size=...): the compiled epoch jb.fit runs for its epoch e"
)


def epoch_fn(
    model: jb.Model,
    optimizer: optax.GradientTransformation,
    batch_size: int,
    X: jax.Array,
    Y: jax.Array,
    n: int,
    gradient: Callable | None = None,
    sampling: str = "shuffle",
) -> EpochFn:
    """Epoch ``e`` of ``jb.fit(params, model, (X, Y), optimizer, ..., batch_size, key,
    sampling=sampling)``, called as ``(params, opt_state, e, fold_in(key, e))``."""

    def run(params, opt_state, e, epoch_key):
        return train_epoch(
            params,
            opt_state,
            model,
            X,
            Y,
            epoch_key,
            n,
            optimizer=optimizer,
            batch_size=batch_size,
            gradient=gradient,
            sampling=sampling,
        )

    return run
