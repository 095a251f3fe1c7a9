"""scaling: training throughput as the network grows wider and deeper.

Widths 100, 1000 and 4096; 1 to 4 hidden layers of that width; 784 inputs and 10 outputs;
sigmoid units with the cross-entropy cost and L2 (lmbda 5, n = 50,000), the chapter-3
setting; plain SGD with eta 0.5 at minibatch 128. Every cell times jb.fit's epoch, the
``jax.grad`` reference epoch and PyTorch on the CPU (with the first ``--torch-threads``
setting, when importable) alternately, on a prefix of the MNIST training images sized so
that one epoch takes about ``--scaling-seconds`` at an assumed 50 GFLOP/s: between 2
minibatches (the widest, deepest nets) and all 50,000 images (the smallest). Reported:
examples/s per approach and the ratios of jbackprop's to the others'. A PyTorch epoch is
cut after ``4 * --scaling-seconds`` (at least 1 s, at most ``--torch-max-s``) and its time
scaled to the whole epoch, so that a slowed thread pool cannot hold up the section.
"""

from __future__ import annotations

import jax

import jbackprop as jb
from scripts.bench import library, reference
from scripts.bench.context import Context
from scripts.bench.harness import Runner, alternate, sgd_runner
from scripts.bench.reference import AD
from scripts.bench.setting import N_TRAIN, flop_per_example, sigmoid_model
from scripts.bench.torch_runners import TORCH_MISSING, TorchEpoch, has_torch, torch_label

WIDTHS = (100, 1000, 4096)
DEPTHS = (1, 2, 3, 4)
BS = 128
ASSUMED_FLOP_PER_S = 50e9
JB = "jb.fit epoch"


def cell_sizes(width: int, depth: int) -> tuple[int, ...]:
    return (784, *([width] * depth), 10)


def steps_for(sizes: tuple[int, ...], seconds: float) -> int:
    """Minibatches per epoch: about ``seconds`` of work, at least 2, at most 50,000 images."""
    per_step = flop_per_example(sizes) * BS
    return int(min(N_TRAIN // BS, max(2, round(seconds * ASSUMED_FLOP_PER_S / per_step))))


def cell(ctx: Context, width: int, depth: int, threads: int | None) -> None:
    s, args = ctx.setting, ctx.args
    sizes = cell_sizes(width, depth)
    model = sigmoid_model(sizes)
    params = jb.init_params(jax.random.key(0), model)
    steps = steps_for(sizes, args.scaling_seconds)
    X, Y = s.X[: steps * BS], s.Y[: steps * BS]
    runners: dict[str, Runner] = {
        JB: sgd_runner(
            library.epoch_fn(model, s.optimizer, BS, X, Y, N_TRAIN), params, s.optimizer
        ),
        AD: sgd_runner(
            reference.on_data(reference.ad_epoch(s.optimizer, BS), X, Y, N_TRAIN),
            params,
            s.optimizer,
        ),
    }
    if threads is not None:
        cut = min(args.torch_max_s, max(1.0, 4 * args.scaling_seconds))
        runners[torch_label(threads)] = TorchEpoch(params, X, Y, N_TRAIN, BS, threads, cut)
    samples = alternate(runners, args.scaling_epochs, s.key)
    shape = {"width": width, "depth": depth, "sizes": sizes, "steps": steps}
    ctx.report.epoch_rows(
        "scaling",
        BS,
        samples,
        steps * BS,
        flop_per_example(sizes),
        AD,
        {name: shape for name in runners},
    )


def table(ctx: Context, torch_name: str | None) -> list[str]:
    """The section's results as a markdown table: examples/s per cell and approach."""
    head = "| width | hidden layers | examples/epoch | jb.fit epoch | jax.grad epoch |"
    rule = "| ---: | ---: | ---: | ---: | ---: |"
    if torch_name:
        head += f" {torch_name} | jb / jax.grad | jb / PyTorch |"
        rule += " ---: | ---: | ---: |"
    else:
        head += " jb / jax.grad |"
        rule += " ---: |"
    lines = [head, rule]
    rows = [r for r in ctx.report.rows if r["section"] == "scaling"]
    for width in WIDTHS:
        for depth in DEPTHS:
            cell_rows = {
                r["approach"]: r for r in rows if (r["width"], r["depth"]) == (width, depth)
            }
            if JB not in cell_rows:
                continue
            jb_r, ad_r = cell_rows[JB], cell_rows[AD]
            eps = [jb_r["examples_per_s"], ad_r["examples_per_s"]]
            ratios = [eps[0] / eps[1]]
            if torch_name:
                eps.append(cell_rows[torch_name]["examples_per_s"])
                ratios.append(eps[0] / eps[2])
            line = f"| {width} | {depth} | {jb_r['steps'] * BS:,} | "
            line += " | ".join(f"{e:,.0f}" for e in eps)
            line += " | " + " | ".join(f"{x:.2f}" for x in ratios) + " |"
            lines.append(line)
    return lines


def run(ctx: Context) -> None:
    print("\n== scaling: examples/s at minibatch 128 as width and depth grow ==", flush=True)
    report = ctx.report
    threads = ctx.args.torch_threads[0] if has_torch() and ctx.args.torch_threads else None
    if not has_torch():
        report.note(TORCH_MISSING)
    for width in ctx.args.scaling_widths:
        for depth in DEPTHS:
            cell(ctx, width, depth, threads)
            for r in report.rows:
                if r["section"] == "scaling" and (r["width"], r["depth"]) == (width, depth):
                    print(
                        f"  {width:>5} x {depth}: {r['approach']:<22} "
                        f"{r['examples_per_s']:>11,.0f} ex/s  {r['gflop_per_s']:6.1f} GFLOP/s  "
                        f"({r['steps']} steps, {r['ms_per_epoch']:.0f} ms/epoch)",
                        flush=True,
                    )
    lines = table(ctx, torch_label(threads) if threads else None)
    report.info["scaling_table"] = lines
    print("\n".join(["", *lines]), flush=True)
