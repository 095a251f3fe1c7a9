"""train: epochs of jb.fit's epoch, of the jax.grad reference and of PyTorch, alternately.

At minibatch 10, 128 and 1000, with a jitted 2048x2048 float32 matmul timed after every
round as the machine's peak at that moment. After the timed epochs, ``jb.fit`` runs the
same epochs with the same key and its parameters must be bit-identical to the timed run's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import jbackprop as jb
from scripts.bench import library, reference
from scripts.bench.context import Context
from scripts.bench.harness import Runner, alternate, clock, median, sgd_runner
from scripts.bench.reference import AD
from scripts.bench.setting import BATCH_SIZES, FLOP, N_TRAIN
from scripts.bench.torch_runners import TORCH_MISSING, TorchEpoch, has_torch, torch_label

JB = "jb.fit epoch"


class MatmulPeak:
    """GFLOP/s of a jitted float32 2048x2048 matmul, sampled whenever asked."""

    def __init__(self):
        ka, kb = jax.random.split(jax.random.key(7))
        self.args = tuple(jax.random.normal(k, (2048, 2048), jnp.float32) for k in (ka, kb))
        self.fn = jax.jit(jnp.matmul)
        clock(self.fn, *self.args)
        self.samples: list[float] = []

    def sample(self, reps: int = 3) -> float:
        g = 2 * 2048**3 / median(clock(self.fn, *self.args)[1] for _ in range(reps)) / 1e9
        self.samples.append(g)
        return g


def run(ctx: Context) -> None:
    print("\n== train: epochs of jb.fit, jax.grad and PyTorch, alternately ==", flush=True)
    s, report, args = ctx.setting, ctx.report, ctx.args
    print(f"  jbackprop: {library.DESCRIPTION}", flush=True)
    report.info["jb_epoch"] = library.DESCRIPTION
    threads = args.torch_threads if has_torch() else []
    if not has_torch():
        report.note(TORCH_MISSING)
    X, Y = s.X[:128], s.Y[:128]
    err = reference.max_rel_err(
        jb.grad(s.params, X, Y, s.model, s.n), jax.jit(reference.grad)(s.params, X, Y, s.n)
    )
    print(f"  jb.grad vs jax.grad of the independent cost: max rel err {err:.2e}", flush=True)
    report.info["grad_agreement_max_rel_err"] = err
    peak = MatmulPeak()
    standalone = median(peak.sample(5) for _ in range(5))
    report.info["matmul_peak_standalone"] = standalone
    print(f"  float32 2048x2048 matmul: {standalone:.1f} GFLOP/s (median)", flush=True)

    for bs in BATCH_SIZES:
        runners: dict[str, Runner] = {
            JB: sgd_runner(
                library.epoch_fn(s.model, s.optimizer, bs, s.X, s.Y, s.n),
                s.params,
                s.optimizer,
            ),
            AD: sgd_runner(
                reference.on_data(reference.ad_epoch(s.optimizer, bs), s.X, s.Y, s.n),
                s.params,
                s.optimizer,
            ),
        }
        for th in threads:
            runners[torch_label(th)] = TorchEpoch(s.params, s.X, s.Y, s.n, bs, th, args.torch_max_s)
        first = len(peak.samples)
        samples = alternate(runners, args.epochs, s.key, between=peak.sample)
        peak_now = median(peak.samples[first + 1 :] or peak.samples[first:])
        extras = finals(ctx, runners, bs)
        report.epoch_rows("train", bs, samples, N_TRAIN, FLOP, AD, extras)
        row = report.row("train", JB, bs)
        row["matmul_peak_gflop_per_s"] = peak_now
        row["percent_of_matmul_peak"] = 100 * row["gflop_per_s"] / peak_now
        report.print_rows("train", bs)
        print(f"  (float32 matmul peak during these epochs: {peak_now:.1f} GFLOP/s)", flush=True)
    report.info["matmul_peak_gflop_per_s"] = median(peak.samples)
    checks(ctx, threads)


def finals(ctx: Context, runners: dict, bs: int) -> dict[str, dict]:
    """Per approach: its training accuracy and distance to the autodiff parameters after
    the run; for jbackprop, whether jb.fit with the same key gives identical parameters."""
    s, report, epochs = ctx.setting, ctx.report, ctx.args.epochs + 1
    fit_params, history = jb.fit(
        s.params, s.model, (s.X, s.Y), s.optimizer, epochs, bs, s.key, n=s.n
    )
    same = reference.identical(fit_params, runners[JB].params)
    if not same:
        report.note(f"minibatch {bs}: the timed epochs did NOT reproduce jb.fit's params")
    extras: dict[str, dict] = {
        JB: {"identical_to_fit": same, "fit_history_seconds": [h["seconds"] for h in history]}
    }
    ad_params = runners[AD].params
    for name, r in runners.items():
        extra = extras.setdefault(name, {})
        extra["train_accuracy"] = jb.accuracy(r.params, s.X, s.labels, s.model)
        if name != AD:
            extra["max_abs_diff_to_autodiff_params"] = reference.max_abs_diff(r.params, ad_params)
        if isinstance(r, TorchEpoch):
            extra["partial_epochs"] = r.partial
            if r.partial:
                report.note(
                    f"{name}, minibatch {bs}: {r.partial} epochs cut at "
                    f"{ctx.args.torch_max_s} s and scaled to the whole epoch"
                )
    return extras


def checks(ctx: Context, threads: list[int]) -> None:
    report = ctx.report
    for bs in BATCH_SIZES:
        report.check(
            f"jb.fit >= autodiff at minibatch {bs} (examples/s ratio)",
            report.row("train", JB, bs)["ratio_to_autodiff"],
            ">=",
            1.0,
        )
    if threads:
        jb10 = report.row("train", JB, 10)["examples_per_s"]
        best = max(
            (report.row("train", torch_label(th), 10) for th in threads),
            key=lambda r: r["examples_per_s"],
        )
        report.check(
            "jb.fit >= 4x PyTorch at minibatch 10 (the faster PyTorch setting)",
            jb10 / best["examples_per_s"],
            ">=",
            4.0,
            f"against {best['approach']}: {best['examples_per_s'] / 1e3:.1f}k ex/s",
        )
    r = report.row("train", JB, 1000)
    report.check(
        "jb.fit >= 65% of float32 matmul peak at minibatch 1000",
        r["percent_of_matmul_peak"] / 100,
        ">=",
        0.65,
        f"{r['gflop_per_s']:.1f} of {r['matmul_peak_gflop_per_s']:.1f} GFLOP/s",
    )
