"""From the parsed flags to what a run needs: the model, the optimizer, the data, a folder.

Shared by the single run (:mod:`.run`) and the sweep (:mod:`.sweep`).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax

import jbackprop as jb
from jbackprop import data
from jbackprop.experiments.mnist import report
from jbackprop.experiments.mnist.accounting import sampling_of, steps_per_epoch

# Optax constructors by --optimizer name; each takes the learning rate η.
OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "sgd": optax.sgd,
    "momentum": partial(optax.sgd, momentum=0.9),
    "adam": optax.adam,
}

# Flags that may differ between a run and its resumption without changing its result.
NOT_CONFIG = frozenset(
    {"out", "resume", "debug", "epochs", "progress", "data_dir", "patience"}
    | {"coordinator", "num_processes", "process_id", "timeout"}
)

# Flags added after run folders were first written: recorded only when given (None is
# their default), so the configuration of an older run, and of a new run that does not
# use them, keeps exactly its old keys and older folders stay resumable.
OPTIONAL = frozenset(
    {"dp_epsilon", "dp_delta", "dp_accountant", "pca", "dp_pca_noise"}
    | {"eta_end", "eta_decay_epochs", "no_validation"}
)

# The PCA's noise is drawn from fold_in(key(seed), PCA_STREAM): a stream of its own, so
# the initialisation and training keys stay those of runs without --pca.
PCA_STREAM = 0x9CA

Split = tuple[np.ndarray, np.ndarray]


class UserError(Exception):
    """A problem the user can fix; reported as one paragraph, without a traceback."""


def model_of(flags: Mapping[str, Any]) -> jb.Model:
    """The :class:`jbackprop.Model` the flags describe (``--lmbda`` is its ``l2``)."""
    return jb.Model(
        sizes=tuple(flags["sizes"]),
        hidden=flags["hidden"],
        output=flags["output"],
        cost=flags["cost"],
        l2=flags["lmbda"],
        l1=flags["l1"],
        dropout=flags["dropout"],
    )


def config_of(args: argparse.Namespace) -> dict[str, Any]:
    """The flags that define a run's result, JSON-ready.

    A checkpoint stores this dict and ``--resume`` compares it, so its keys and values
    must stay as they are for old run folders to remain resumable.
    """
    cfg = {
        k: v
        for k, v in vars(args).items()
        if k not in NOT_CONFIG and not (k in OPTIONAL and v is None)
    }
    cfg["sweep"] = {k: list(v) for k, v in (args.sweep or [])} or None
    # Private runs used to train on shuffled minibatches; they now draw Poisson lots by
    # default, which is recorded (and an older private folder then refuses to resume
    # under the new default, rather than continue with another mechanism).
    del cfg["dp_sampling"]
    if args.dp_clip is not None and sampling_of(args) == "poisson":
        cfg["dp_sampling"] = "poisson"
    if args.dp_epsilon is not None:
        cfg["epochs"] = args.epochs  # the noise is calibrated for this many epochs
    return cfg


def optimizer_of(args: argparse.Namespace, n: int) -> optax.GradientTransformation:
    """The ``--optimizer`` with step ``--eta``, or with a schedule falling linearly (step by
    step) to ``--eta-end`` over ``--eta-decay-epochs`` epochs, then constant.

    Args:
      args: the parsed flags.
      n: the training-set size, which sets the steps per epoch.

    Returns:
      The optax transformation; a schedule counts steps in its state, so a checkpoint
      resumes it where it stopped.
    """
    if args.eta_end is None:
        return OPTIMIZERS[args.optimizer](args.eta)
    steps = steps_per_epoch(sampling_of(args), n, args.batch_size)
    schedule = optax.linear_schedule(args.eta, args.eta_end, args.eta_decay_epochs * steps)
    return OPTIMIZERS[args.optimizer](schedule)


def projection(args: argparse.Namespace, train_X: np.ndarray) -> np.ndarray | None:
    """The ``--pca`` projection ``(784, K)`` computed from the training images, private
    with ``--dp-pca-noise`` (:func:`jbackprop.privacy.dp_pca`); None without ``--pca``.

    Args:
      args: the parsed flags.
      train_X: the training images ``(n, 784)``, the only ones the projection sees.

    Returns:
      The projection, float32, or None.
    """
    if args.pca is None:
        return None
    noise = args.dp_pca_noise or 0.0
    key = jax.random.fold_in(jax.random.key(args.seed), PCA_STREAM) if noise else None
    return np.asarray(jb.privacy.dp_pca(train_X, args.pca, noise, key))


def project(
    splits: tuple[Split, Split | None, Split], P: np.ndarray | None
) -> tuple[Split, Split | None, Split]:
    """Every split's images times ``P`` (``(m, 784) @ (784, K)``); unchanged for None, and
    a missing split (no validation) stays missing."""
    if P is None:
        return splits
    return tuple(None if s is None else (s[0] @ P, s[1]) for s in splits)  # type: ignore[return-value]


def run_folder(args: argparse.Namespace) -> Path:
    """``--resume DIR``, else ``--out DIR``, else a new time-stamped folder under runs/."""
    if args.resume is not None:
        return args.resume
    if args.out is not None:
        return args.out
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{args.dataset}-{stamp}"


def prepare_folder(out: Path) -> None:
    """Create ``out`` and check that it is writable, before any time is spent training."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise UserError(
            f"cannot write to the output folder {out}: {err.strerror or err}. "
            "Choose another folder with --out."
        ) from None


def load_data(args: argparse.Namespace, verbose: bool) -> tuple[Split, Split | None, Split]:
    """Training, validation and test sets; ``verbose`` says where they come from. With
    ``--no-validation`` the validation images join the training set (all 60,000, in the
    file's order) and the validation set is None.

    The data set is looked up first without downloading, so the user learns which folder
    is used, or that it is about to be downloaded (and where), before any progress bar.
    """
    folder = data.find(args.dataset, args.data_dir)
    if verbose:
        if folder is not None:
            report.data_found(args.dataset, folder)
        else:
            cache = data.cache_dir(args.dataset)
            report.data_downloading(args.dataset, cache, data.candidate_dirs(args.dataset))
    ds = data.load(args.dataset, data_dir=folder, progress=args.progress)
    X, y = ds.train
    validation = ds.validation
    if getattr(args, "no_validation", None):
        X, y = np.concatenate([X, validation[0]]), np.concatenate([y, validation[1]])
        validation = None
    if args.train_size is not None:
        if args.train_size > len(X):
            raise UserError(f"--train-size {args.train_size} exceeds the {len(X)} training images")
        X, y = X[: args.train_size], y[: args.train_size]
    if args.batch_size > len(X):
        raise UserError(f"--batch-size {args.batch_size} exceeds the training-set size {len(X)}")
    return (X, y), validation, ds.test
