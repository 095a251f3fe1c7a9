"""full: wall time of the whole chapter-3 run, ``python -m jbackprop.experiments.mnist``.

30 epochs of 784-100-10 at minibatch 10, eta 0.5, lmbda 5, from process start to exit
(interpreter start-up, data loading, compiling, training, per-epoch evaluation and the
outputs). The target is under 30 s. ``--quick`` runs 2 epochs to check that the command
works and skips the target.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from scripts.bench.context import Context
from scripts.bench.setting import ETA, LMBDA, SIZES

MODULE = "jbackprop.experiments.mnist"


def command(out: Path, epochs: int, data_dir: str | None) -> list[str]:
    """The experiment's command line, with only the flags its ``--help`` lists."""
    help_text = subprocess.run(
        [sys.executable, "-m", MODULE, "--help"], capture_output=True, text=True
    ).stdout
    wanted = [
        ("--epochs", [str(epochs)]),
        ("--sizes", [str(s) for s in SIZES]),
        ("--batch-size", ["10"]),
        ("--eta", [str(ETA)]),
        ("--lmbda", [str(LMBDA)]),
        ("--out", [str(out)]),
        ("--no-progress", []),
    ]
    if data_dir:
        wanted.append(("--data-dir", [data_dir]))
    cmd = [sys.executable, "-m", MODULE]
    for flag, values in wanted:
        if flag in help_text:
            cmd += [flag, *values]
    return cmd


def run(ctx: Context) -> None:
    epochs = ctx.args.full_epochs
    print(f"\n== full: python -m {MODULE}, {epochs} epochs ==", flush=True)
    report = ctx.report
    if importlib.util.find_spec(MODULE) is None:
        report.note(f"{MODULE} not present; the full section is skipped")
        return
    with tempfile.TemporaryDirectory() as tmp:
        cmd = command(Path(tmp) / "run", epochs, ctx.args.data_dir)
        shown = " ".join(["python", *cmd[1:]])
        print(f"  $ {shown}", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-5:]
    for line in tail:
        print(f"    {line}", flush=True)
    report.add(
        {
            "section": "full",
            "approach": f"experiments.mnist, {epochs} epochs",
            "minibatch": 10,
            "wall_seconds": wall,
            "returncode": proc.returncode,
            "command": shown,
            "output_tail": tail,
        }
    )
    print(f"  wall time {wall:.1f} s", flush=True)
    if proc.returncode != 0:
        report.note(f"{MODULE} exited with {proc.returncode}")
    if epochs == 30:
        report.check("chapter-3 experiment, 30 epochs, wall time (s)", wall, "<", 30.0)
    else:
        report.note(f"{epochs} epochs, not 30: the 30 s target is not checked")
