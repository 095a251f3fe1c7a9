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

import numpy as np
import optax

import jbackprop as jb
from jbackprop import data
from jbackprop.experiments.mnist import report

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
    cfg = {k: v for k, v in vars(args).items() if k not in NOT_CONFIG}
    cfg["sweep"] = {k: list(v) for k, v in (args.sweep or [])} or None
    return cfg


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


def load_data(args: argparse.Namespace, verbose: bool) -> tuple[Split, Split, Split]:
    """Training, validation and test sets; ``verbose`` says where they come from.

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
    if args.train_size is not None:
        if args.train_size > len(X):
            raise UserError(f"--train-size {args.train_size} exceeds the {len(X)} training images")
        X, y = X[: args.train_size], y[: args.train_size]
    if args.batch_size > len(X):
        raise UserError(f"--batch-size {args.batch_size} exceeds the training-set size {len(X)}")
    return (X, y), ds.validation, ds.test
