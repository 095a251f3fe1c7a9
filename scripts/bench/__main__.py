"""The command line: ``python -m scripts.bench [--quick] [--full] [--only a,b] ...``.

Runs the chosen sections in order, prints their rows and PASS/FAIL lines, writes
everything to ``--json`` and ends with the count of targets met. See the package docstring
(``scripts/bench/__init__.py``) for what each section measures.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from scripts.bench import (
    ablate,
    attribution,
    dp,
    full,
    ggn,
    many,
    multiproc,
    opacus,
    pex,
    scaling,
    stats,
    train,
)
from scripts.bench.context import Context
from scripts.bench.harness import machine
from scripts.bench.setting import FLOP, default_data_dir

SECTIONS: dict[str, Callable[[Context], None]] = {
    "train": train.run,
    "ablate": ablate.run,
    "pex": pex.run,
    "dp": dp.run,
    "stats": stats.run,
    "ggn": ggn.run,
    "many": many.run,
    "multiproc": multiproc.run,
    "scaling": scaling.run,
    "attribution": attribution.run,
    "opacus": opacus.run,
    "full": full.run,
}


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m scripts.bench",
        description="Throughput of jbackprop's hand-written backprop against autodiff and "
        "PyTorch, on MNIST.",
    )
    default = ",".join(s for s in SECTIONS if s != "full")
    ap.add_argument("--only", default=default, help=f"sections, from {','.join(SECTIONS)}")
    ap.add_argument("--full", action="store_true", help="also time the 30-epoch experiment")
    ap.add_argument("--quick", action="store_true", help="fewer epochs, calls and cells")
    ap.add_argument("--epochs", type=int, default=5, help="timed epochs after one warm-up")
    ap.add_argument("--json", default="runs/bench.json", help="where to write the results")
    ap.add_argument("--data-dir", default=default_data_dir(), help="folder with MNIST")
    ap.add_argument("--chunks", type=ints, default=[128, 250], help="chunk sizes for pex")
    ap.add_argument(
        "--torch-threads", type=ints, default=[2, 1], help="PyTorch thread counts ('' for none)"
    )
    ap.add_argument("--torch-max-s", type=float, default=20.0, help="cut a PyTorch epoch")
    ap.add_argument("--stats-rounds", type=int, default=7)
    ap.add_argument("--backpack-threads", type=int, default=1, help="torch threads for BackPACK")
    ap.add_argument("--many-epochs", type=int, default=2)
    ap.add_argument("--many-rounds", type=int, default=3)
    ap.add_argument("--processes", type=ints, default=[1, 2, 4], help="multiproc counts")
    ap.add_argument("--multiproc-batch", type=int, default=1000)
    ap.add_argument("--scaling-widths", type=ints, default=list(scaling.WIDTHS))
    ap.add_argument(
        "--attr-examples", type=int, default=2000, help="examples in the grad_gram comparison"
    )
    ap.add_argument("--scaling-epochs", type=int, default=3, help="timed epochs per cell")
    ap.add_argument(
        "--scaling-seconds", type=float, default=0.5, help="aimed seconds per scaling epoch"
    )
    ap.add_argument("--full-epochs", type=int, default=30)
    args = ap.parse_args(argv)
    if args.quick:
        args.epochs = min(args.epochs, 2)
        args.stats_rounds = min(args.stats_rounds, 3)
        args.many_epochs, args.many_rounds = 1, 1
        args.processes = [p for p in args.processes if p <= 2]
        args.scaling_epochs = min(args.scaling_epochs, 2)
        args.scaling_seconds = min(args.scaling_seconds, 0.25)
        args.full_epochs = min(args.full_epochs, 2)
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        ap.error(f"unknown sections {unknown}; choose from {','.join(SECTIONS)}")
    if args.full and "full" not in sections:
        sections.append("full")
    args.sections = sections
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ctx = Context(args)
    meta = machine() | {"epochs_timed": args.epochs, "flop_per_example": FLOP}
    print(
        f"{meta['cpu']}, {meta['cores']} cores, jax {meta['jax']} ({meta['backend']}), "
        f"torch {meta['torch'] or 'not installed'}; load average {meta['loadavg']}",
        flush=True,
    )
    print(f"{FLOP / 1e6:.4f} MFLOP per example forward and backward (784-100-10)", flush=True)
    for name in args.sections:
        SECTIONS[name](ctx)
    path = ctx.report.write(args.json, meta)
    print(f"\nwrote {path}", flush=True)
    checks = ctx.report.checks
    print(f"{sum(c['pass'] for c in checks)} of {len(checks)} targets met", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
