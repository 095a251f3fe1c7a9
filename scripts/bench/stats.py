"""stats: jb.grad_stats and jb.diag_ggn per jitted call, on random minibatches.

Against jb.grad, against the same statistics reduced from stored ``vmap(grad)`` and
``jb.per_example_grads`` gradients, the GGN diagonal from stored ``vmap(jacrev)``, and,
when installed, BackPACK's BatchL2Grad + SumGradSquared + Variance on the same network.
Every statistic is checked against its references before anything is timed.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

import jbackprop as jb
from scripts.bench import reference
from scripts.bench.context import Context
from scripts.bench.harness import interleaved_calls, median
from scripts.bench.setting import BATCH_SIZES, N_TRAIN
from scripts.bench.torch_runners import BACKPACK_MISSING, BackpackStats, has_backpack

STORED = "vmap(jax.grad) stored -> stats"
JACREV = "vmap(jacrev) stored -> diag GGN"


def functions(ctx: Context) -> tuple[dict[str, Callable], BackpackStats | None]:
    s, n, model = ctx.setting, ctx.setting.n, ctx.setting.model
    fns: dict[str, Callable] = {
        "jb.grad": jax.jit(lambda p, X, Y: jb.grad(p, X, Y, model, n)),
        "jb.grad_stats": jax.jit(lambda p, X, Y: jb.grad_stats(p, X, Y, model, n)),
        STORED: jax.jit(lambda p, X, Y: reference.stats(p, X, Y, n)),
        "jb.per_example_grads stored -> stats": jax.jit(
            lambda p, X, Y: reference.reduce_stats(jb.per_example_grads(p, X, Y, model), p, n)
        ),
        "jb.diag_ggn": jax.jit(lambda p, X, Y: jb.diag_ggn(p, X, Y, model)),
        JACREV: jax.jit(lambda p, X, Y: reference.diag_ggn(p, X)),
    }
    if not has_backpack():
        ctx.report.note(BACKPACK_MISSING)
        return fns, None
    bp = BackpackStats(s.params, ctx.args.backpack_threads)
    plain = BackpackStats(s.params, ctx.args.backpack_threads, plain=True)
    plain.tensors = bp.tensors
    fns[bp.label], fns[plain.label] = bp, plain
    ctx.report.note(
        "BackPACK 1.7.1's DiagGGNExact supports BCEWithLogitsLoss only for a single output "
        "unit, so it has no diag_ggn row for this 10-output network (see the ggn section)"
    )
    return fns, bp


def agreement(ctx: Context, fns: dict, bs: int, X, Y, bp: BackpackStats | None) -> None:
    p, err = ctx.setting.params, reference.max_rel_err
    ref = fns[STORED](p, X, Y)
    got = fns["jb.grad_stats"](p, X, Y)
    agree = {"grad_stats.grad vs jb.grad": err(got[0], fns["jb.grad"](p, X, Y))}
    for i, what in enumerate(("grad", "norms", "sum_grad_squared", "variance")):
        agree[f"grad_stats.{what} vs vmap(grad)"] = err(got[i], ref[i])
    if bp is not None:
        bp(p, X, Y)
        for i, what in enumerate(("norms", "sum_grad_squared", "variance"), start=1):
            agree[f"grad_stats.{what} vs BackPACK"] = err(got[i], bp.results()[i - 1])
    agree["diag_ggn vs vmap(jacrev)"] = err(fns["jb.diag_ggn"](p, X, Y), fns[JACREV](p, X, Y))
    ctx.report.info.setdefault("stats_agreement_max_rel_err", {})[str(bs)] = agree
    worst = max(agree.values())
    print(f"  m={bs}: agreement with the references, worst max rel err {worst:.2e}", flush=True)
    if worst > 1e-3:
        ctx.report.note(f"stats at minibatch {bs} disagree with the references: {agree}")


def run(ctx: Context) -> None:
    print("\n== stats: time per call on random minibatches (jitted) ==", flush=True)
    s, report = ctx.setting, ctx.report
    fns, bp = functions(ctx)
    rng = np.random.default_rng(0)
    for bs in BATCH_SIZES:
        batches = []
        for _ in range(8):
            ids = jnp.asarray(rng.choice(N_TRAIN, bs, replace=False))
            batches.append(jax.block_until_ready((s.X[ids], s.Y[ids])))
            if bp is not None:
                bp.register(*batches[-1])
        agreement(ctx, fns, bs, *batches[0], bp)
        samples = interleaved_calls(fns, batches, s.params, ctx.args.stats_rounds)
        t_grad = median(samples["jb.grad"])
        for name, ts in samples.items():
            t = median(ts)
            report.add(
                {
                    "section": "stats",
                    "approach": name,
                    "minibatch": bs,
                    "us_per_call": 1e6 * t,
                    "examples_per_s": bs / t,
                    "ratio_to_jb_grad": t / t_grad,
                    "calls": len(ts),
                }
            )
            print(
                f"  {name:<42} m={bs:<5} {1e6 * t:10.1f} us/call  "
                f"{t / t_grad:7.2f}x jb.grad  ({len(ts)} calls)",
                flush=True,
            )
        for fast, slow in (("jb.grad_stats", STORED), ("jb.diag_ggn", JACREV)):
            r = report.row("stats", fast, bs)
            r["speedup_vs_stored"] = report.row("stats", slow, bs)["us_per_call"] / r["us_per_call"]
    gs = report.row("stats", "jb.grad_stats", 128)
    report.check(
        "grad_stats <= 1.5x jb.grad at minibatch 128 (time ratio)",
        gs["ratio_to_jb_grad"],
        "<=",
        1.5,
    )
    report.check(
        "grad_stats >= 5x faster than stored vmap(grad) statistics at minibatch 128",
        gs["speedup_vs_stored"],
        ">=",
        5.0,
    )
