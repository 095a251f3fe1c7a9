"""The command line: flags in, exit status out (0 done, 1 an error the user can act on,
2 a mistaken flag)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from jbackprop.data import DataError
from jbackprop.experiments import argtypes
from jbackprop.experiments.attribution.protocol import Setup, quick
from jbackprop.experiments.attribution.run import DAMPINGS, run

PROG = "python -m jbackprop.experiments.attribution"

DESCRIPTION = """\
dattri's MNIST-10 + MLP data-attribution benchmark with jbackprop: a 784-128-64-10 ReLU
network, 5,000 training and 500 test images, ground truth from retraining on 100 random
half-size subsets; LDS of Grad-Dot, Grad-Cos, TracIn and exact TRAK with 1, 5 and 10 models.
"""


_POSITIVE = argtypes.number(0, low_open=True)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION)
    p.add_argument("--out", type=Path, default=Path("runs/attribution"), help="run folder")
    p.add_argument("--data-dir", help="folder with MNIST's IDX files (default: $JBACKPROP_DATA)")
    p.add_argument("--quick", action="store_true", help="a small smoke run (seconds, not minutes)")
    d = Setup()
    p.add_argument("--subsets", type=argtypes.positive_int, default=d.subsets, help="LDS subsets")
    p.add_argument(
        "--runs-per-subset",
        type=argtypes.positive_int,
        default=d.runs_per_subset,
        help="models retrained on each subset, their costs averaged (dattri's default: 1)",
    )
    p.add_argument(
        "--models", type=argtypes.positive_int, default=d.models, help="models per ensemble"
    )
    p.add_argument("--epochs", type=argtypes.positive_int, default=d.epochs)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument(
        "--damping",
        type=_POSITIVE,
        action="append",
        help=f"TRAK dampings to try on the tuning images (default: {DAMPINGS})",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    setup = Setup(seed=args.seed)
    if args.quick:
        setup = quick(setup)
    else:
        setup = replace(
            setup,
            subsets=args.subsets,
            runs_per_subset=args.runs_per_subset,
            models=args.models,
            epochs=args.epochs,
        )
    dampings = (
        tuple(args.damping) if args.damping else (DAMPINGS[1:4:2] if args.quick else DAMPINGS)
    )
    try:
        run(setup, args.out, args.data_dir, dampings)
    except (DataError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0
