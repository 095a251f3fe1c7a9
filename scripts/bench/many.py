"""many: 8 models in one jb.fit_many call against one jb.fit, at minibatch 10 and 128.

The goal: training 8 models together costs at most 3x one model at minibatch 10 and 5x at
minibatch 128. Both calls train the chapter-3 setting for ``--many-epochs`` epochs on the
50,000 images (with their per-epoch evaluation of the training set, no validation); the
wall time of the whole call is measured warm, alternately, median of ``--many-rounds``.
``jb.fit_many`` with one model is timed too, to separate the batching's cost from the
vmapped program's fixed overhead.
"""

from __future__ import annotations

from collections.abc import Callable

import jax

import jbackprop as jb
from scripts.bench.context import Context
from scripts.bench.harness import alternate, clock_cpu, median
from scripts.bench.setting import ETA, LMBDA

TARGETS = {10: 3.0, 128: 5.0}
ONE = "jb.fit, 1 model"
MANY = "jb.fit_many, {} model(s)"


def fit_many(ctx: Context, models: int, bs: int, epochs: int) -> Callable[[], object]:
    s = ctx.setting
    keys = jax.random.split(jax.random.key(1), models)

    def call():
        return jb.fit_many(keys, s.model, (s.X, s.Y), epochs, bs, eta=ETA, lmbda=LMBDA, n=s.n)

    return call


def run(ctx: Context) -> None:
    print("\n== many: jb.fit_many, 8 models against one jb.fit ==", flush=True)
    s, report, epochs = ctx.setting, ctx.report, ctx.args.many_epochs
    for bs, target in TARGETS.items():
        calls = {
            ONE: lambda bs=bs: jb.fit(
                s.params, s.model, (s.X, s.Y), s.optimizer, epochs, bs, s.key, n=s.n
            ),
            MANY.format(1): fit_many(ctx, 1, bs, epochs),
            MANY.format(8): fit_many(ctx, 8, bs, epochs),
        }
        try:
            jax.block_until_ready(calls[MANY.format(1)]())
        except (TypeError, ValueError) as err:  # an API this script does not know yet
            report.note(f"jb.fit_many could not be called: {type(err).__name__}: {err}")
            return
        runners = {name: lambda e, k, f=f: clock_cpu(f)[1:] for name, f in calls.items()}
        samples = alternate(runners, ctx.args.many_rounds, s.key)
        for name, x in samples.items():
            t = median(x.wall)
            models = 8 if name == MANY.format(8) else 1
            report.add(
                {
                    "section": "many",
                    "approach": name,
                    "minibatch": bs,
                    "epochs": epochs,
                    "wall_seconds": t,
                    "cpu_seconds": median(x.cpu),
                    "model_epochs_per_s": models * epochs / t,
                    "samples": x.wall,
                }
            )
            print(f"  {name:<24} m={bs:<5} {t:8.2f} s for {epochs} epochs (median)", flush=True)
        t = {name: median(x.wall) for name, x in samples.items()}
        report.check(
            f"fit_many with 8 models <= {target:g}x the wall time of one jb.fit at minibatch {bs}",
            t[MANY.format(8)] / t[ONE],
            "<=",
            target,
            f"fit_many with 1 model: {t[MANY.format(1)] / t[ONE]:.2f}x",
        )
