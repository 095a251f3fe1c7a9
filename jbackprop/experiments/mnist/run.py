"""One training run: a checkpoint after every epoch, ``--resume``, and clean stops.

After every epoch the run folder receives an atomic checkpoint (parameters, optimizer
state, key, history), so ``--resume DIR`` continues an interrupted run and ends with
exactly the parameters an uninterrupted run would have. SIGINT or SIGTERM lets the
current epoch finish and write its checkpoint, then stops with a message saying how to
resume; a second signal stops at once (every write is atomic, so nothing is torn).

With several processes (``jax.distributed``) every process trains; only process 0 prints
and writes files.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax
from safetensors.numpy import save as safetensors_bytes

import jbackprop as jb
from jbackprop.experiments import plots
from jbackprop.experiments.mnist import accounting, report
from jbackprop.experiments.mnist.config import (
    UserError,
    config_of,
    load_data,
    model_of,
    optimizer_of,
    prepare_folder,
    project,
    projection,
    run_folder,
)
from jbackprop.io import atomic_write, load_checkpoint, save_checkpoint

CHECKPOINT = "checkpoint.safetensors"
PARAMS = "params.safetensors"
PCA = "pca.safetensors"
LEARNING_CURVES = "learning_curves.png"
GRAD_STATS = "grad_stats.png"
# --track-stats measures on a fixed random sample of this many training examples.
STATS_SAMPLE = 1000


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived; raised after the current checkpoint is written."""


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train, checkpoint every epoch, evaluate on the test set once; return the metrics.

    Returns the contents of ``metrics.json`` on process 0, an empty dict on the others.
    """
    started = time.perf_counter()
    out = run_folder(args)
    if args.resume is not None and not (out / CHECKPOINT).is_file():
        raise UserError(f"--resume {out}: there is no {CHECKPOINT} in that folder")
    main_process = jax.process_index() == 0  # the only one that prints and writes
    if main_process:
        prepare_folder(out)
        report.run_folder(out)
    model = model_of(vars(args))
    train, validation, test = load_data(args, verbose=main_process)
    P = projection(args, train[0])
    train, validation, test = project((train, validation, test), P)
    optimizer = optimizer_of(args, len(train[0]))
    plan = accounting.plan(args, len(train[0]))
    if plan is not None and main_process:
        report.privacy_plan(plan, args.epochs)
    cfg = config_of(args)
    init_key, train_key = jax.random.split(jax.random.key(args.seed))
    params = jb.init_params(init_key, model, scheme=args.init)
    resume = None
    if args.resume is not None:
        resume, train_key = _resume_state(args, out, model, optimizer, params)
        if main_process:
            report.resuming(out, resume.epoch)

    flag: dict[str, Any] = {}  # the signal handler records the signal's name here
    progress = report.Progress(
        args.epochs,
        args.progress and main_process,
        1 if resume is None else resume.epoch + 1,
        privacy=None if plan is None or plan.unclaimed else plan.epsilon,
    )
    stats = _previous_stats(out, resume)
    measure = _stats_tracker(model, train, args.seed) if args.track_stats else None
    written: list[Path] = []

    def on_epoch(state: jb.TrainState) -> None:
        if not main_process:
            if flag.get("signal"):
                raise Interrupted(state.epoch)
            return
        if measure is not None:
            stats.append({"epoch": state.epoch} | measure(state.params))
            report.grad_stats(stats[-1])
        written.append(save_checkpoint(out / CHECKPOINT, state, model, train_key, cfg))
        report.write_metrics(
            out,
            cfg,
            state.history,
            state.best_epoch,
            None,
            time.perf_counter() - started,
            _extra(stats if measure else None, plan, state.epoch),
        )
        if flag.get("signal"):
            raise Interrupted(state.epoch)

    restore = _install_signal_handlers(flag)
    try:
        params, history = jb.fit(
            params,
            model,
            train,
            optimizer,
            epochs=args.epochs,
            batch_size=args.batch_size,
            key=train_key,
            validation=validation,
            patience=args.patience,
            resume=resume,
            on_epoch=on_epoch,
            log=progress if main_process else None,
            gradient=_dp_gradient(plan),
            progress=progress.step if progress.enabled and jax.process_count() == 1 else None,
            sampling=accounting.sampling_of(args),
        )
    except Interrupted as stop:
        progress.clear()
        raise UserError(
            f"interrupted by {flag['signal']} after epoch {stop.args[0]}; the checkpoint is "
            f"{out / CHECKPOINT}. Resume with the same flags plus --resume {out}"
        ) from None
    except jb.TrainingDiverged as err:
        progress.clear()
        last = out / CHECKPOINT
        kept = f" The last finite checkpoint is {last}." if last.exists() else ""
        raise UserError(f"{err}{kept}") from None
    finally:
        restore()
    progress.clear()

    if not main_process:
        return {}
    validated = [r for r in history if "val_accuracy" in r]
    best = max(validated, key=lambda r: r["val_accuracy"]) if validated else history[-1]
    best_epoch = best["epoch"]
    test_accuracy = jb.accuracy(params, *test, model)
    epochs_done = history[-1]["epoch"]
    title = report.title(vars(args)) + report.privacy_title(plan, epochs_done)
    final = [
        report.write_metrics(
            out,
            cfg,
            history,
            best_epoch,
            test_accuracy,
            time.perf_counter() - started,
            _extra(stats if args.track_stats else None, plan, epochs_done),
        ),
        plots.plot_learning_curves(out / LEARNING_CURVES, history, title),
        jb.save_params(out / PARAMS, params, model),
    ]
    if P is not None:
        final.append(save_projection(out / PCA, P, plan))
    if args.track_stats:
        final.append(plots.plot_grad_stats(out / GRAD_STATS, stats, title))
    report.test_result(
        test_accuracy,
        best_epoch if args.patience else history[-1]["epoch"],
        best_epoch if validated else None,
    )
    if plan is not None:
        report.privacy_result(plan, epochs_done)
    report.outputs(out, [*final, *written])
    return json.loads((out / report.METRICS).read_text())


def _resume_state(
    args: argparse.Namespace,
    out: Path,
    model: jb.Model,
    optimizer: optax.GradientTransformation,
    params: jb.Params,
) -> tuple[jb.TrainState, jax.Array]:
    """The checkpoint's training state and key, after checking it is this run's."""
    path = out / CHECKPOINT
    if not path.exists():
        raise UserError(f"--resume {out}: there is no {CHECKPOINT} in that folder")
    try:
        state, saved_model, key, saved_cfg = load_checkpoint(path, optimizer.init(params))
    except ValueError as err:
        raise UserError(f"--resume {out}: {err}") from None
    cfg = config_of(args)
    if saved_cfg != cfg or saved_model != model:
        diff = sorted(k for k in set(cfg) | set(saved_cfg) if cfg.get(k) != saved_cfg.get(k))
        raise UserError(
            f"--resume {out}: that run used another configuration (differs in "
            f"{', '.join('--' + k.replace('_', '-') for k in diff) or 'the model'}). "
            "Resume with the same flags, or start a new run with --out."
        )
    return state, key


def _install_signal_handlers(flag: dict[str, Any]) -> Callable[[], None]:
    """Turn the first SIGINT/SIGTERM into a request to stop after this epoch.

    Returns a function that puts the previous handlers back.
    """

    def handler(signum, frame):
        if flag.get("signal"):
            raise KeyboardInterrupt  # a second signal: stop at once (writes stay atomic)
        flag["signal"] = signal.Signals(signum).name
        print(
            f"\n{flag['signal']} received: finishing the current epoch and its checkpoint...",
            file=sys.stderr,
            flush=True,
        )

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}

    def restore() -> None:
        for s, h in previous.items():
            signal.signal(s, h)

    return restore


def _stats_tracker(
    model: jb.Model, train: tuple[np.ndarray, np.ndarray], seed: int
) -> Callable[[jb.Params], dict[str, float]]:
    """Per-epoch gradient statistics on a fixed sample of training examples."""
    X, y = train
    ids = np.random.default_rng(seed).choice(len(X), min(STATS_SAMPLE, len(X)), replace=False)
    Xs, ys = X[np.sort(ids)], y[np.sort(ids)]

    def measure(params) -> dict[str, float]:
        s = jb.noise_scale(params, Xs, ys, model, n=len(X))
        return {"median_grad_norm": s.median_norm, "noise_scale": s.b_simple}

    return measure


def _extra(
    stats: list[dict[str, float]] | None, plan: accounting.Plan | None, epochs: int
) -> dict[str, Any] | None:
    """The entries of ``metrics.json`` beyond the history: gradient statistics and the
    privacy block, each when the run has them."""
    extra: dict[str, Any] = {}
    if stats is not None:
        extra["grad_stats"] = report.rounded(stats)
    if plan is not None:
        extra["privacy"] = report.rounded(plan.block(epochs))
    return extra or None


def save_projection(path: Path, P: np.ndarray, plan: accounting.Plan | None) -> Path:
    """The ``--pca`` projection, ``(784, K)`` under the name ``projection``: a raw image
    ``x`` enters the saved model as ``x @ projection``."""
    noise = "0" if plan is None or plan.pca_noise is None else repr(plan.pca_noise)
    metadata = {"format": "jbackprop.pca/1", "noise": noise}
    atomic_write(path, safetensors_bytes({"projection": P}, metadata=metadata))
    return path


def _previous_stats(out: Path, resume: jb.TrainState | None) -> list[dict[str, float]]:
    """On resumption, the statistics already recorded for the finished epochs.

    They are read back from ``metrics.json``, rounded; they are only reported and
    plotted, never fed back into training.
    """
    if resume is None or not (out / report.METRICS).exists():
        return []
    try:
        old = json.loads((out / report.METRICS).read_text()).get("grad_stats") or []
    except (OSError, ValueError):
        return []
    return [r for r in old if r["epoch"] <= resume.epoch]


def _dp_gradient(plan: accounting.Plan | None):
    """The DP-SGD gradient of the plan (clipping bounds and σ); None for the plain one."""
    if plan is None:
        return None
    return jb.privacy.DPGradient(clip=plan.clip, noise_multiplier=plan.noise_multiplier)
