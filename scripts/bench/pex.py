"""pex: training from stored per-example gradients, averaged per minibatch.

"Stored" materialises the per-example gradients behind ``jax.lax.optimization_barrier`` and
averages them as ``1ᵀG/m``; "fused" is ``jnp.mean`` of ``jb.per_example_grads`` inside the
same jit, which XLA may turn into one product, so nothing is stored. Every route runs in the
reference epoch, alternated with the ``jax.grad`` epoch. The target is the stored row of the
original performance table, as a ratio to that table's autodiff row.
"""

from __future__ import annotations

from collections.abc import Callable

import jbackprop as jb
from scripts.bench import reference
from scripts.bench.context import Context
from scripts.bench.harness import alternate, sgd_runner
from scripts.bench.reference import AD, l2_grads
from scripts.bench.setting import BATCH_SIZES, FLOP, N_TRAIN

# examples/s at minibatch 10/128/1000 in the original table, measured on this machine
TABLE_AUTODIFF = {10: 132e3, 128: 316e3, 1000: 377e3}
TABLE_STORED = {10: 99e3, 128: 72e3, 1000: 41e3}
STORED = "jb.per_example_grads stored (chunk_size={})"


def routes(model: jb.Model, bs: int, chunks: list[int]) -> dict[str, Callable]:
    """The minibatch gradients from per-example gradients, as ``GradFn``s."""
    out: dict[str, Callable] = {}
    for cs in [None] + [c for c in chunks if c < bs]:
        out[STORED.format(cs)] = lambda p, X, Y, k, n, cs=cs: l2_grads(
            reference.stored_mean(jb.per_example_grads(p, X, Y, model, chunk_size=cs)), p, n
        )
    out["jb.per_example_grads, jnp.mean (fused)"] = lambda p, X, Y, k, n: l2_grads(
        reference.tree_mean0(jb.per_example_grads(p, X, Y, model)), p, n
    )
    out["vmap(jax.grad) stored"] = lambda p, X, Y, k, n: l2_grads(
        reference.stored_mean(reference.per_example(p, X, Y)), p, n
    )
    return out


def run(ctx: Context) -> None:
    print("\n== pex: training from stored per-example gradients ==", flush=True)
    s, report = ctx.setting, ctx.report
    for bs in BATCH_SIZES:
        epochs = {
            name: reference.make_epoch(reference.grad_step(g, s.optimizer), bs)
            for name, g in routes(s.model, bs, ctx.args.chunks).items()
        }
        epochs[AD] = reference.ad_epoch(s.optimizer, bs)
        runners = {
            name: sgd_runner(reference.on_data(e, s.X, s.Y, s.n), s.params, s.optimizer)
            for name, e in epochs.items()
        }
        samples = alternate(runners, ctx.args.epochs, s.key)
        report.epoch_rows("pex", bs, samples, N_TRAIN, FLOP, AD)
        report.print_rows("pex", bs)
    for bs in BATCH_SIZES:
        rows = [report.row("pex", STORED.format(cs), bs) for cs in [None, *ctx.args.chunks]]
        best = max((r for r in rows if r), key=lambda r: r["examples_per_s"])
        target = TABLE_STORED[bs] / TABLE_AUTODIFF[bs]
        report.check(
            f"per_example_grads stored >= the table's stored row at minibatch {bs} "
            "(ratio to autodiff)",
            best["ratio_to_autodiff"],
            ">=",
            target,
            f"{best['approach']}: {best['examples_per_s'] / 1e3:.0f}k ex/s here; table "
            f"{TABLE_STORED[bs] / 1e3:.0f}k = {target:.3f} x autodiff's "
            f"{TABLE_AUTODIFF[bs] / 1e3:.0f}k",
        )
