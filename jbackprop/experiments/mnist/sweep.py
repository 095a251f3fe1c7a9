"""``--sweep``: many configurations trained at once, the winner chosen on validation data.

Each ``--sweep NAME=V1,V2,...`` gives one hyperparameter several values; several flags
form a grid (every combination), and every other hyperparameter keeps its flag's value.
All models share the architecture and train in one compiled program
(:func:`jbackprop.fit_many`). The winner is the model with the best validation accuracy
at any epoch; only its final parameters ever see the test set, as the lecture insists.

A seed sweep gives each model its own PRNG key, ``jax.random.key(seed)``: its own
initialisation and dropout masks. The models share one shuffle of the training set,
so that their first-layer products merge into wider, faster ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from typing import Any

import jax
import jax.numpy as jnp

import jbackprop as jb
from jbackprop.experiments import plots
from jbackprop.experiments.mnist import report
from jbackprop.experiments.mnist.config import (
    OPTIMIZERS,
    config_of,
    load_data,
    model_of,
    prepare_folder,
    project,
    projection,
    run_folder,
)
from jbackprop.experiments.mnist.run import LEARNING_CURVES, PARAMS, PCA, save_projection

# The flags --sweep can vary, in the order a configuration lists them.
HYPERPARAMETERS = ("eta", "lmbda", "l1", "dropout", "seed")


def grid(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every combination of the swept values, the other flags at their given values.

    The first ``--sweep`` varies slowest: ``eta=a,b --sweep lmbda=x,y`` gives
    ``(a, x), (a, y), (b, x), (b, y)``.
    """
    configurations = [{name: getattr(args, name) for name in HYPERPARAMETERS}]
    for name, values in args.sweep:
        configurations = [c | {name: v} for c in configurations for v in values]
    return configurations


def run_sweep(args: argparse.Namespace) -> dict[str, Any]:
    """Train every configuration at once, pick the best by validation accuracy, and touch
    the test set only for the winner; return the metrics written."""
    started = time.perf_counter()
    out = run_folder(args)
    prepare_folder(out)
    report.run_folder(out)
    configurations = grid(args)
    # Dropout and L1 are switched on in the shared architecture when any model uses them;
    # each model's own rate enters the compiled program as a number.
    model = model_of(
        vars(args)
        | {
            "dropout": max(c["dropout"] for c in configurations),
            "l1": max(c["l1"] for c in configurations),
        }
    )
    train, validation, test = load_data(args, verbose=True)
    P = projection(args, train[0])
    train, validation, test = project((train, validation, test), P)
    report.sweep_start(len(configurations))
    params, histories = jb.fit_many(
        jnp.stack([jax.random.key(int(c["seed"])) for c in configurations]),
        model,
        train,
        args.epochs,
        args.batch_size,
        eta=[c["eta"] for c in configurations],
        lmbda=[c["lmbda"] for c in configurations],
        l1=[c["l1"] for c in configurations],
        dropout=[c["dropout"] for c in configurations],
        optimizer=OPTIMIZERS[args.optimizer],
        validation=validation,
        scheme=args.init,
    )

    results = []
    for c, history in zip(configurations, histories, strict=True):
        best = max(history, key=lambda r: r["val_accuracy"])
        results.append(c | {"best_val_accuracy": best["val_accuracy"], "best_epoch": best["epoch"]})
        report.sweep_result(c, best["val_accuracy"], best["epoch"])
    win = max(range(len(configurations)), key=lambda i: results[i]["best_val_accuracy"])
    winner = configurations[win]
    winner_params = jax.tree.map(lambda x: x[win], params)
    winner_model = dataclasses.replace(
        model, l2=winner["lmbda"], l1=winner["l1"], dropout=winner["dropout"]
    )
    test_accuracy = jb.accuracy(winner_params, *test, winner_model)
    history = histories[win]
    title = report.title(vars(args) | winner) + f" (best of {len(configurations)})"
    written = [
        report.write_metrics(
            out,
            config_of(args),
            history,
            results[win]["best_epoch"],
            test_accuracy,
            time.perf_counter() - started,
            {
                "sweep": [
                    r | {"best_val_accuracy": report.rounded(r["best_val_accuracy"])}
                    for r in results
                ],
                "winner": winner,
            },
        ),
        plots.plot_learning_curves(out / LEARNING_CURVES, history, title),
        jb.save_params(out / PARAMS, winner_params, winner_model),
    ]
    if P is not None:
        written.append(save_projection(out / PCA, P, None))
    report.sweep_winner(winner, test_accuracy)
    report.outputs(out, written)
    return json.loads((out / report.METRICS).read_text())
