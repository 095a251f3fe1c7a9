"""The experiment's sweep, DP-SGD, gradient statistics and the local multi-process launcher."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# End-to-end runs in subprocesses: the full suite runs them, the quick tier does not.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--sizes", "784", "16", "10", "--no-progress"]


def _run(cmd: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    env = os.environ | {"JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    return proc


def _experiment(data: Path, out: Path, *flags: str) -> subprocess.CompletedProcess:
    """Two epochs of the small network on the first 500 images of ``data``, into ``out``."""
    run = [*SMALL, "--train-size", "500", "--epochs", "2", "--data-dir", str(data), "--out"]
    return _run([sys.executable, "-m", "jbackprop.experiments.mnist", *run, str(out), *flags])


def test_sweep_picks_the_winner_by_validation(tmp_path, mnist_dir):
    out = tmp_path / "sweep"
    proc = _experiment(mnist_dir, out, "--sweep", "eta=0.05,1.0", "--sweep", "seed=0,1")
    metrics = json.loads((out / "metrics.json").read_text())
    sweep = metrics["sweep"]
    assert len(sweep) == 4 and {r["eta"] for r in sweep} == {0.05, 1.0}
    best = max(sweep, key=lambda r: r["best_val_accuracy"])
    assert metrics["winner"] == {k: best[k] for k in ("eta", "lmbda", "l1", "dropout", "seed")}
    assert len(metrics["epochs"]) == 2 and 0 < metrics["test_accuracy"] <= 1
    assert "test accuracy of the winner" in proc.stdout
    assert (out / "params.safetensors").exists() and (out / "learning_curves.png").exists()


def test_private_training_with_statistics(tmp_path, mnist_dir):
    out = tmp_path / "dp"
    private = ["--batch-size", "50", "--eta", "1.0", "--dp-clip", "1.0", "--dp-noise", "0.5"]
    _experiment(mnist_dir, out, *private, "--track-stats")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["dp_clip"] == 1.0 and metrics["config"]["dp_noise"] == 0.5
    stats = metrics["grad_stats"]
    assert [r["epoch"] for r in stats] == [1, 2]
    assert all(r["median_grad_norm"] > 0 and r["noise_scale"] > 0 for r in stats)
    assert (out / "grad_stats.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_launcher_runs_two_local_processes(tmp_path, mnist_dir):
    out = tmp_path / "two"
    proc = _run(
        [
            sys.executable,
            str(ROOT / "scripts" / "launch_local.py"),
            "2",
            "--",
            *SMALL,
            "--data-dir",
            str(mnist_dir),
            "--train-size",
            "400",
            "--epochs",
            "1",
            "--out",
            str(out),
        ]
    )
    assert proc.stdout.count("test accuracy") == 1  # only process 0 reports
    assert json.loads((out / "metrics.json").read_text())["epochs"][0]["epoch"] == 1
