"""The MNIST experiment's command line: help, sweeps, what a run prints, writes and plots.

Most checks call the package's pieces or :func:`main` in this process (cheap); the runs
that train use a slice of real MNIST, one epoch or two, and are shared between tests.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import pkgutil
import re
import shlex
import tomllib
from pathlib import Path

import numpy as np
import pytest
from mnist_runs import flag_error
from PIL import Image
from safetensors import safe_open

import jbackprop as jb
from jbackprop import data
from jbackprop.experiments import mnist, plots
from jbackprop.experiments.mnist import cli, config, report, sweep

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--train-size", "500", "--sizes", "784", "16", "10", "--no-progress"]


def help_text(monkeypatch, capsys) -> str:
    monkeypatch.setenv("COLUMNS", "100")  # argparse wraps to the terminal's width
    with pytest.raises(SystemExit) as info:
        mnist.main(["--help"])
    assert info.value.code == 0
    return capsys.readouterr().out


def help_entry(text: str, flag: str) -> str:
    """The help of one flag: its line and the indented lines that continue it."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(rf"  {flag}\b", line))
    entry = [lines[start]]
    for line in lines[start + 1 :]:
        if not line.startswith(" " * 6):  # the next flag, or a group's heading
            break
        entry.append(line)
    return " ".join(" ".join(entry).split())


def png_title(raw: bytes) -> str:
    return Image.open(io.BytesIO(raw)).text["Title"]


def every_float(value):
    """All floats in nested dicts and lists."""
    if isinstance(value, float):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from every_float(v)
    elif isinstance(value, list):
        for v in value:
            yield from every_float(v)


def at_most_6_digits(x: float) -> bool:
    return float(f"{x:.6g}") == x


# --- help -----------------------------------------------------------------------------

DEFAULTS = {
    "--dataset": "mnist",
    "--sizes": "784 100 10",
    "--hidden": "sigmoid",
    "--output": "sigmoid",
    "--cost": "cross_entropy",
    "--init": "scaled",
    "--eta": "0.5",
    "--lmbda": "5.0",
    "--l1": "0.0",
    "--dropout": "0.0",
    "--batch-size": "10",
    "--epochs": "30",
    "--optimizer": "sgd",
    "--seed": "0",
    "--dp-noise": "0.0",
    "--timeout": "120",
}


def test_help_shows_every_default_and_choice(monkeypatch, capsys):
    text = help_text(monkeypatch, capsys)
    for flag, default in DEFAULTS.items():
        assert f"(default: {default})" in help_entry(text, flag), flag
    choices = {
        "--dataset": "{mnist,fashion-mnist}",
        "--cost": "{quadratic,cross_entropy,log_likelihood}",
        "--init": "{normal,scaled}",
        "--optimizer": "{sgd,momentum,adam}",
    }
    for flag, shown in choices.items():
        assert help_entry(text, flag).startswith(f"{flag} {shown}")
    for name in ("sigmoid", "relu", "softmax", "leaky_relu(SLOPE)"):
        assert name in help_entry(text, "--hidden")


def test_help_explains_sweep_and_lmbda_and_gives_examples(monkeypatch, capsys):
    text = help_text(monkeypatch, capsys)
    assert "NAME is one of eta, lmbda, l1, dropout, seed" in help_entry(text, "--sweep")
    assert "grid" in help_entry(text, "--sweep")
    lmbda = help_entry(text, "--lmbda")
    assert "L2" in lmbda and "the book's spelling" in lmbda and "l2" in lmbda
    epilog = text[text.index("\nexamples:\n") :]
    examples = re.findall(r"^  python -m jbackprop\.experiments\.mnist (.+)$", epilog, re.M)
    assert len(examples) >= 2
    assert "--sweep eta=0.1,0.5,1.0 --sweep lmbda=1,5" in examples
    for example in examples:  # every example is a valid command line
        cli.parse_args(example.split())
    assert "--lmbda is spelled as in Nielsen's book" in epilog


def test_console_script_is_the_same_main():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert pkgutil.resolve_name(scripts["jbackprop-mnist"]) is mnist.main


def test_console_script_names_itself_in_messages(monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["/usr/bin/jbackprop-mnist"])
    with pytest.raises(SystemExit) as info:
        mnist.main(["--eta", "0"])
    assert info.value.code == 2
    assert capsys.readouterr().err.startswith("jbackprop-mnist: error: argument --eta")


# --- sweep flags ----------------------------------------------------------------------


def test_sweep_types_cover_exactly_the_swept_hyperparameters():
    assert set(cli.SWEEP_TYPES) == set(sweep.HYPERPARAMETERS)
    assert sweep.HYPERPARAMETERS == ("eta", "lmbda", "l1", "dropout", "seed")


def test_several_sweeps_form_a_grid_of_every_name():
    sweeps = ["l1=0,0.5", "dropout=0,0.2", "seed=1,2", "lmbda=1,5"]
    args = cli.parse_args(["--eta", "3", *(f for s in sweeps for f in ("--sweep", s))])
    grid = sweep.grid(args)
    assert len(grid) == 16
    assert grid[0] == {"eta": 3.0, "lmbda": 1.0, "l1": 0.0, "dropout": 0.0, "seed": 1}
    assert grid[1] == grid[0] | {"lmbda": 5.0}  # the last --sweep varies fastest
    assert grid[-1] == {"eta": 3.0, "lmbda": 5.0, "l1": 0.5, "dropout": 0.2, "seed": 2}
    assert len({tuple(g.values()) for g in grid}) == 16
    assert all(isinstance(g["seed"], int) for g in grid)


SWEEP_ERRORS = {
    "unknown name": (["--sweep", "momentum=0.9"], "NAME one of eta, lmbda, l1, dropout, seed"),
    "no values": (["--sweep", "eta="], "expected NAME=V1,V2,..."),
    "fractional seed": (["--sweep", "seed=1,1.5"], "--sweep seed: expected an integer"),
    "negative l1": (["--sweep", "l1=0,-1"], "--sweep l1: expected a number >= 0"),
    "dropout 1": (["--sweep", "dropout=0.5,1"], "--sweep dropout: expected a number >= 0 and < 1"),
    "a name twice": (
        ["--sweep", "eta=0.1", "--sweep", "eta=0.5"],
        "--sweep eta is given twice; list all its values in one flag",
    ),
}


@pytest.mark.parametrize(("argv", "message"), SWEEP_ERRORS.values(), ids=SWEEP_ERRORS.keys())
def test_bad_sweeps_are_one_line_errors(argv, message, capsys):
    err = flag_error(argv, capsys)
    assert message in err, err


# --- pieces of the report -------------------------------------------------------------

ONE_EPOCH = [
    {
        "epoch": 1,
        "train_cost": 0.5,
        "train_accuracy": 0.9,
        "val_cost": 0.6,
        "val_accuracy": 0.88,
        "seconds": 1.0,
    }
]


def test_a_one_epoch_plot_marks_its_points():
    curves = plots.learning_curves_figure(ONE_EPOCH, "one epoch")
    stats = plots.grad_stats_figure(
        [{"epoch": 1, "median_grad_norm": 0.4, "noise_scale": 150.0}], "one epoch"
    )
    lines = [line for fig in (curves, stats) for ax in fig.axes for line in ax.get_lines()]
    assert len(lines) == 6
    for line in lines:
        assert line.get_marker() not in (None, "", " ", "None"), line.get_label()
        assert line.get_markersize() > 0
    raw = plots.png_bytes(curves)
    assert png_title(raw) == "one epoch" and Image.open(io.BytesIO(raw)).size[0] > 0


def test_rounded_keeps_six_significant_digits():
    assert report.rounded(0.9529999494552612) == 0.953
    assert report.rounded(2.694728374481201) == 2.69473
    nested = {"epoch": 3, "a": [1.0000001, {"b": 123456789.0}], "s": "x", "n": None}
    once = report.rounded(nested)
    assert once == {"epoch": 3, "a": [1.0, {"b": 123457000.0}], "s": "x", "n": None}
    assert report.rounded(once) == once and isinstance(once["epoch"], int)


def _data_args(**overrides) -> argparse.Namespace:
    flags = {"dataset": "mnist", "data_dir": None, "progress": False, "train_size": None}
    return argparse.Namespace(**(flags | {"batch_size": 10} | overrides))


def test_a_download_is_announced_before_it_starts(monkeypatch, capsys, tmp_path):
    events = []
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "find", lambda dataset, data_dir: None)

    def fake_load(dataset, data_dir, progress):
        events.append(("load", capsys.readouterr().out))
        split = (np.zeros((20, 784), np.float32), np.zeros(20, np.int32))
        return data.Splits(split, split, split, tmp_path / "cache" / "jbackprop" / dataset)

    monkeypatch.setattr(data, "load", fake_load)
    config.load_data(_data_args(), verbose=True)
    ((_, printed),) = events
    cache = tmp_path / "cache" / "jbackprop" / "mnist"
    assert printed.startswith("data: mnist is not on disk (looked in ")
    assert printed.rstrip().endswith(f"downloading it into {cache}")


# --- a finished run -------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_epoch_run(mnist_dir, tmp_path_factory):
    """One epoch with --track-stats, data found through $JBACKPROP_DATA: (folder, stdout)."""
    folder = tmp_path_factory.mktemp("one-epoch") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JBACKPROP_DATA", str(mnist_dir.parent))
        out = io.StringIO()
        mp.setattr("sys.stdout", out)
        code = mnist.main([*SMALL, "--epochs", "1", "--track-stats", "--out", str(folder)])
    assert code == 0, out.getvalue()
    return folder, out.getvalue()


@pytest.mark.slow
def test_a_run_says_where_its_data_and_folder_are_before_training(one_epoch_run, mnist_dir):
    folder, stdout = one_epoch_run
    before = stdout[: stdout.index("epoch   1/1")].splitlines()
    assert f"run folder: {folder}" in before
    assert f"data: mnist from {mnist_dir}" in before


@pytest.mark.slow
def test_the_closing_line_lists_every_file_written(one_epoch_run):
    folder, stdout = one_epoch_run
    last = stdout.rstrip().splitlines()[-1]
    assert last.startswith(f"outputs in {folder}/: ")
    listed = last.split(": ", 1)[1].split(", ")
    assert sorted(listed) == sorted(p.name for p in folder.iterdir())
    assert set(listed) == {
        "metrics.json",
        "learning_curves.png",
        "params.safetensors",
        "grad_stats.png",
        "checkpoint.safetensors",
    }


@pytest.mark.slow
def test_metrics_are_rounded_while_the_checkpoint_keeps_exact_values(one_epoch_run):
    folder, _ = one_epoch_run
    metrics = json.loads((folder / "metrics.json").read_text())
    measured = [metrics["epochs"], metrics["grad_stats"], metrics["test_accuracy"]]
    floats = [*every_float(measured), metrics["seconds"]]
    assert floats and all(at_most_6_digits(x) for x in floats), floats

    with safe_open(folder / "checkpoint.safetensors", "np") as f:
        exact = json.loads(f.metadata()["history"])
    assert [r["epoch"] for r in exact] == [r["epoch"] for r in metrics["epochs"]] == [1]
    fields = [k for k in exact[0] if k not in ("epoch", "seconds")]
    values = [exact[0][k] for k in fields]
    assert all(float(np.float32(v)) == v for v in values)  # the float32 numbers, unrounded
    assert not all(at_most_6_digits(v) for v in values)  # so that rounding had work to do
    for k in fields:
        assert metrics["epochs"][0][k] == report.rounded(exact[0][k])


@pytest.mark.slow
def test_a_one_epoch_run_plots_titled_pictures(one_epoch_run):
    folder, _ = one_epoch_run
    for name in ("learning_curves.png", "grad_stats.png"):
        title = png_title((folder / name).read_bytes())
        assert title == "mnist 784-16-10 sigmoid/sigmoid cross_entropy, η=0.5, λ=5.0, minibatch 10"


# --- sweeps ---------------------------------------------------------------------------


def _sweep(folder: Path, mnist_dir: Path, *flags: str) -> tuple[dict, str]:
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("sys.stdout", out)
        argv = [*SMALL, "--epochs", "2", "--data-dir", str(mnist_dir), "--out", str(folder)]
        code = mnist.main([*argv, *flags])
    assert code == 0, out.getvalue()
    return json.loads((folder / "metrics.json").read_text()), out.getvalue()


@pytest.mark.slow
def test_the_sweep_plot_is_titled_with_the_winner(mnist_dir, tmp_path):
    # Defaults outside the grid, so a title with the flags' values cannot pass.
    grid = ("--sweep", "eta=0.1,0.5,1.0", "--sweep", "lmbda=1,5")
    metrics, stdout = _sweep(tmp_path / "run", mnist_dir, "--eta", "3", "--lmbda", "0", *grid)
    winner = metrics["winner"]
    assert len(metrics["sweep"]) == 6 and winner["eta"] in (0.1, 0.5, 1.0)
    title = png_title((tmp_path / "run" / "learning_curves.png").read_bytes())
    assert f"η={winner['eta']}, λ={winner['lmbda']}," in title
    assert "η=3.0" not in title and "λ=0.0" not in title and title.endswith("(best of 6)")
    assert "winner: " + ", ".join(f"{k}={v}" for k, v in winner.items()) in stdout
    last = stdout.rstrip().splitlines()[-1]
    listed = last.split(": ", 1)[1].split(", ")
    assert sorted(listed) == sorted(p.name for p in (tmp_path / "run").iterdir())
    assert all(at_most_6_digits(r["best_val_accuracy"]) for r in metrics["sweep"])


@pytest.mark.slow
def test_l1_dropout_and_seed_sweeps_train_distinct_models(mnist_dir, tmp_path):
    grid = ("--sweep", "l1=0,2", "--sweep", "dropout=0,0.3", "--sweep", "seed=1,2")
    metrics, _ = _sweep(tmp_path / "run", mnist_dir, *grid)
    results = metrics["sweep"]
    assert len(results) == 8
    assert {(r["l1"], r["dropout"], r["seed"]) for r in results} == {
        (l1, p, s) for l1 in (0.0, 2.0) for p in (0.0, 0.3) for s in (1, 2)
    }
    # Each swept value changes what is learnt: no two models end alike.
    assert len({r["best_val_accuracy"] for r in results}) > 4
    assert metrics["config"]["sweep"] == {"l1": [0.0, 2.0], "dropout": [0.0, 0.3], "seed": [1, 2]}
    winner = metrics["winner"]
    assert set(winner) == set(sweep.HYPERPARAMETERS)
    _, model = jb.load_params(tmp_path / "run" / "params.safetensors")
    assert (model.l1, model.dropout, model.l2) == (winner["l1"], winner["dropout"], 5.0)
    assert math.isfinite(metrics["test_accuracy"])


# --- the experiments' README ------------------------------------------------------------


def readme_commands() -> list[list[str]]:
    """Every ``scripts/mnist`` command of experiments/README.md, as its flags.

    A table row "same + `FLAGS`" adds FLAGS to the last full command (less its --out).
    """
    text = (ROOT / "experiments" / "README.md").read_text()
    commands, base = [], []
    for full, added in re.findall(r"`scripts/mnist ([^`]*)`|same \+ `([^`]*)`", text):
        if full:
            argv = shlex.split(full)
            commands.append(argv)
            if "--out" in argv:
                i = argv.index("--out")
                base = argv[:i] + argv[i + 2 :]
        else:
            commands.append([*base, *shlex.split(added)])
    return commands


def test_the_experiments_readme_writes_where_its_figures_are():
    commands = readme_commands()
    assert len(commands) >= 10
    for argv in commands:
        args = cli.parse_args(argv)
        assert args.out is not None, argv
        folder = ROOT / args.out  # scripts/mnist runs from the project root
        assert args.out.parts[:2] == ("experiments", "runs") and folder.is_dir(), argv
        stored = json.loads((folder / "metrics.json").read_text())
        assert stored["config"] == config.config_of(args), argv  # the command made that run
        assert len(stored["epochs"]) == args.epochs
    readme = ROOT / "experiments" / "README.md"
    for target in re.findall(r"\]\((runs/[^)]+)\)", readme.read_text()):
        assert (readme.parent / target).is_file(), target
