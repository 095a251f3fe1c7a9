"""End-to-end tests of ``python -m jbackprop.experiments.mnist`` on a slice of real MNIST.

Every run that trains is a subprocess, as a user would start it. Each costs a JAX start-up
and a compilation, so the runs are few and each is checked for several things: one finished
run is the reference for the outputs and for resumption; one run is interrupted with SIGINT,
resumed, killed with SIGKILL, and resumed to the end, which must give exactly the
reference's parameters. Command-line mistakes that argparse catches, and the failures found
before training (missing or corrupt data, unwritable folders, checkpoints of other runs), are
checked by calling ``main`` in this process, which needs no start-up of its own.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
from mnist_runs import cli, finished_run, flag_error, main_in_process, signal_after

import jbackprop as jb
from jbackprop import data

# End-to-end runs in subprocesses: the full suite runs them, the quick tier does not.
pytestmark = pytest.mark.slow

# About 0.1-0.3 s per epoch after compiling (3000 minibatches of 2), so that a signal sent
# after epoch 2 lands while later epochs are still running.
EPOCHS = 8
RUN = ["--train-size", "6000", "--batch-size", "2", "--epochs", str(EPOCHS)]
RUN += ["--sizes", "784", "30", "10", "--no-progress"]
HISTORY_FIELDS = {"epoch", "train_cost", "train_accuracy", "val_cost", "val_accuracy", "seconds"}


def assert_clean_failure(proc_or_rc, stderr: str | None = None) -> str:
    """A non-zero exit with one ``error:`` message and no traceback; returns stderr."""
    if isinstance(proc_or_rc, subprocess.CompletedProcess):
        rc, stderr = proc_or_rc.returncode, proc_or_rc.stderr
    else:
        rc = proc_or_rc
    assert rc != 0, stderr
    assert "Traceback" not in stderr, stderr
    assert "error:" in stderr, stderr
    return stderr


def load_run_params(folder: Path):
    return jb.load_params(folder / "params.safetensors")


def assert_same_params(a, b) -> None:
    for u, v in zip(a, b, strict=True):
        for name in ("w", "b"):
            assert np.array_equal(np.asarray(u[name]), np.asarray(v[name])), name


def without_seconds(history) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in history]


def png_chunks(raw: bytes) -> list[bytes]:
    """Chunk types of a PNG, checking the signature and every chunk's CRC."""
    assert raw[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    pos, kinds, idat = 8, [], b""
    while pos < len(raw):
        (length,) = struct.unpack(">I", raw[pos : pos + 4])
        kind = raw[pos + 4 : pos + 8]
        body = raw[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", raw[pos + 8 + length : pos + 12 + length])
        assert zlib.crc32(kind + body) == crc, f"bad CRC in {kind!r}"
        if kind == b"IDAT":
            idat += body
        kinds.append(kind)
        pos += 12 + length
    zlib.decompress(idat)  # the image data inflates
    return kinds


# --- one finished run -------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(mnist_dir, tmp_path_factory):
    """A run that was never interrupted: ``(folder, CompletedProcess)``."""
    return finished_run(tmp_path_factory, "reference", *RUN, "--data-dir", mnist_dir)


def test_finished_run_writes_its_outputs(reference, mnist_dir):
    folder, proc = reference
    assert "Traceback" not in proc.stderr
    epoch_lines = re.findall(r"^epoch +(\d+)/(\d+) ", proc.stdout, re.M)
    assert epoch_lines == [(str(e), str(EPOCHS)) for e in range(1, EPOCHS + 1)]
    printed = re.search(r"^test accuracy (\d+\.\d\d)%", proc.stdout, re.M)
    assert printed, proc.stdout

    metrics = json.loads((folder / "metrics.json").read_text())
    assert {"config", "epochs", "best_epoch", "test_accuracy", "seconds"} <= set(metrics)
    assert metrics["config"]["train_size"] == 6000 and metrics["config"]["sizes"] == [784, 30, 10]
    assert [r["epoch"] for r in metrics["epochs"]] == list(range(1, EPOCHS + 1))
    for rec in metrics["epochs"]:
        assert set(rec) == HISTORY_FIELDS
    val = [r["val_accuracy"] for r in metrics["epochs"]]
    assert metrics["best_epoch"] == 1 + val.index(max(val))
    assert metrics["seconds"] > 0
    assert 0.8 < metrics["test_accuracy"] <= 1.0
    assert printed.group(1) == f"{100 * metrics['test_accuracy']:.2f}"

    kinds = png_chunks((folder / "learning_curves.png").read_bytes())
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND" and b"IDAT" in kinds

    params, model = load_run_params(folder)
    assert model.sizes == (784, 30, 10)
    X = data.read_images(mnist_dir / data.TEST_IMAGES).reshape(-1, 784) / np.float32(255)
    y = data.read_labels(mnist_dir / data.TEST_LABELS).astype(np.int32)
    assert jb.accuracy(params, X, y, model) == pytest.approx(metrics["test_accuracy"], abs=1e-6)
    assert sorted(p.name for p in folder.iterdir()) == [
        "checkpoint.safetensors",
        "learning_curves.png",
        "metrics.json",
        "params.safetensors",
    ]


def test_interrupted_killed_and_resumed_run_is_bit_identical(reference, mnist_dir, tmp_path):
    ref_folder, _ = reference
    folder = tmp_path / "run"
    args = [*RUN, "--data-dir", mnist_dir]

    # SIGINT after epoch 2: the run finishes its epoch, saves it, and says how to resume.
    rc, out, err, _ = signal_after([*args, "--out", folder], r"^epoch +2/", signal.SIGINT, tmp_path)
    assert_clean_failure(rc, err)
    assert "SIGINT received: finishing the current epoch and its checkpoint" in err
    stop = re.search(
        r"error: interrupted by SIGINT after epoch (\d+); the checkpoint is (\S+)\. "
        r"Resume with the same flags plus --resume (\S+)",
        err,
    )
    assert stop, err
    stopped_at = int(stop.group(1))
    assert 2 <= stopped_at < EPOCHS
    assert Path(stop.group(2)) == folder / "checkpoint.safetensors"
    assert Path(stop.group(3)) == folder
    assert "test accuracy" not in out
    partial = json.loads((folder / "metrics.json").read_text())
    assert len(partial["epochs"]) == stopped_at and partial["test_accuracy"] is None
    assert not (folder / "params.safetensors").exists()

    # Resume, and SIGKILL the resumed run after its first epoch: no chance to clean up.
    rc, out, err, _ = signal_after(
        [*args, "--resume", folder], r"^epoch +\d+/", signal.SIGKILL, tmp_path
    )
    assert rc == -signal.SIGKILL, (out, err)
    assert f"resuming {folder} after epoch {stopped_at}" in out
    assert not re.search(rf"^epoch +{stopped_at}/", out, re.M)  # no epoch is done twice

    # Resume to the end: exactly the uninterrupted run's parameters and history.
    proc = cli(*args, "--resume", folder, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    resumed = re.search(rf"^resuming {re.escape(str(folder))} after epoch (\d+)", proc.stdout, re.M)
    assert resumed, proc.stdout
    killed_after = int(resumed.group(1))
    assert stopped_at <= killed_after < EPOCHS  # the kill came before training ended
    epochs_run = [int(e) for e in re.findall(r"^epoch +(\d+)/", proc.stdout, re.M)]
    assert epochs_run == list(range(killed_after + 1, EPOCHS + 1))
    assert_same_params(load_run_params(folder)[0], load_run_params(ref_folder)[0])
    got = json.loads((folder / "metrics.json").read_text())
    want = json.loads((ref_folder / "metrics.json").read_text())
    assert without_seconds(got["epochs"]) == without_seconds(want["epochs"])
    assert got["test_accuracy"] == want["test_accuracy"]
    assert got["best_epoch"] == want["best_epoch"] and got["config"] == want["config"]


def test_divergence_names_the_epoch_and_suggests_a_smaller_eta(mnist_dir, tmp_path):
    proc = cli(
        "--train-size", "1000", "--epochs", "2", "--sizes", "784", "30", "10", "--eta", "1e6",
        "--no-progress", "--data-dir", mnist_dir, "--out", tmp_path / "run",
        cwd=tmp_path,
    )  # fmt: skip
    err = assert_clean_failure(proc)
    assert "error: training diverged in epoch 1:" in err
    assert "eta is probably too large" in err and "try a smaller one" in err
    assert not (tmp_path / "run" / "params.safetensors").exists()
    assert "test accuracy" not in proc.stdout


# --- command-line mistakes caught while parsing (in this process) ------------------------

PARSE_ERRORS = {
    "negative eta": (["--eta", "-1"], "argument --eta: expected a number > 0, got -1"),
    "dropout 1": (["--dropout", "1"], "argument --dropout: expected a number >= 0 and < 1"),
    "zero layer": (["--sizes", "784", "0", "10"], "argument --sizes: expected a positive integer"),
    "cost needs softmax": (
        ["--cost", "log_likelihood"],
        "cost 'log_likelihood' needs a 'softmax' output layer; got output 'sigmoid'",
    ),
    "unknown optimizer": (["--optimizer", "foo"], "argument --optimizer: invalid choice: 'foo'"),
    "input width": (["--sizes", "100", "10"], "--sizes must start with 784"),
    "zero batch": (["--batch-size", "0"], "argument --batch-size: expected a positive integer"),
}


@pytest.mark.parametrize(("argv", "message"), PARSE_ERRORS.values(), ids=PARSE_ERRORS.keys())
def test_bad_flag_values_are_one_line_errors(argv, message, capsys):
    assert message in flag_error([*argv, "--out", "/nonexistent/never-created"], capsys)


def test_a_bad_flag_from_the_shell(tmp_path):
    proc = cli("--eta", "-1", cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert "argument --eta: expected a number > 0, got -1 (see --help)" in proc.stderr
    assert "Traceback" not in proc.stderr and list(tmp_path.iterdir()) == []


# --- failures after parsing (subprocesses, run together) --------------------------------


def _runtime_cases(mnist_dir: Path, ref_folder: Path, root: Path):
    """``{id: (argv, expected message regex, debug)}``, with the files each case needs."""
    small = ["--train-size", "1000", "--epochs", "1", "--sizes", "784", "30", "10"]
    small += ["--no-progress"]
    corrupt = root / "corrupt-data"
    corrupt.mkdir()
    for name in data.FILES:
        shutil.copy(mnist_dir / name, corrupt / name)
    images = corrupt / data.TRAIN_IMAGES
    images.write_bytes(images.read_bytes()[: images.stat().st_size // 2])
    (root / "a-file").write_text("not a folder")
    other = root / "other-config"
    other.mkdir()
    shutil.copy(ref_folder / "checkpoint.safetensors", other)
    broken = root / "broken-checkpoint"
    broken.mkdir()
    (broken / "checkpoint.safetensors").write_bytes(b"\x10\x00\x00\x00")
    empty = root / "empty"
    empty.mkdir()

    def out(name: str) -> list:
        return ["--out", root / "outs" / name]  # one each: every failure leaves it empty

    return {
        "batch larger than train set": (
            [*small, "--batch-size", "2000", "--data-dir", mnist_dir, *out("batch")],
            r"error: --batch-size 2000 exceeds the training-set size 1000",
            False,
        ),
        "missing data dir": (
            [*small, "--data-dir", root / "no-such-dir", *out("missing")],
            r"error: data folder \S*no-such-dir does not hold the mnist files \(missing: "
            r"train-images-idx3-ubyte.gz",
            False,
        ),
        "missing data dir, --debug": (
            [*small, "--data-dir", root / "no-such-dir", *out("debug"), "--debug"],
            r"error: data folder \S*no-such-dir does not hold the mnist files",
            True,
        ),
        "truncated data file": (
            [*small, "--data-dir", corrupt, *out("truncated")],
            r"error: \S*corrupt-data/train-images-idx3-ubyte.gz is not a complete gzip file "
            r".*truncated or corrupt",
            False,
        ),
        "unwritable --out": (
            [*small, "--data-dir", mnist_dir, "--out", root / "a-file" / "run"],
            r"error: cannot write to the output folder \S*a-file/run: Not a directory\. "
            r"Choose another folder with --out",
            False,
        ),
        "resume another configuration": (
            [*RUN, "--eta", "0.1", "--data-dir", mnist_dir, "--resume", other],
            r"error: --resume \S*other-config: that run used another configuration "
            r"\(differs in --eta\)\. Resume with the same flags, or start a new run with --out",
            False,
        ),
        "resume without checkpoint": (
            [*RUN, "--data-dir", mnist_dir, "--resume", empty],
            r"error: --resume \S*empty: there is no checkpoint.safetensors in that folder",
            False,
        ),
        "resume a missing folder": (
            [*RUN, "--data-dir", mnist_dir, "--resume", root / "never-made"],
            r"error: --resume \S*never-made: there is no checkpoint.safetensors",
            False,
        ),
        "resume a corrupt checkpoint": (
            [*RUN, "--data-dir", mnist_dir, "--resume", broken],
            r"error: --resume \S*broken-checkpoint: \S+ is not a valid checkpoint file "
            r"\(corrupt or truncated",
            False,
        ),
    }


@pytest.fixture(scope="module")
def runtime_failures(mnist_dir, reference, tmp_path_factory):
    root = tmp_path_factory.mktemp("failures")
    cases = _runtime_cases(mnist_dir, reference[0], root)
    return root, {name: (case, main_in_process(*case[0])) for name, case in cases.items()}


RUNTIME_IDS = [
    "batch larger than train set",
    "missing data dir",
    "missing data dir, --debug",
    "truncated data file",
    "unwritable --out",
    "resume another configuration",
    "resume without checkpoint",
    "resume a missing folder",
    "resume a corrupt checkpoint",
]


@pytest.mark.parametrize("case", RUNTIME_IDS)
def test_runtime_failures_are_clear(runtime_failures, case):
    _, results = runtime_failures
    (_, pattern, debug), proc = results[case]
    assert proc.returncode == 1, proc.stderr
    assert re.search(pattern, proc.stderr), proc.stderr
    if debug:
        assert "Traceback (most recent call last)" in proc.stderr
        assert "DataError" in proc.stderr
    else:
        assert "Traceback" not in proc.stderr
        assert proc.stderr.count("error:") == 1
    assert "test accuracy" not in proc.stdout


def test_failed_runs_leave_no_outputs(runtime_failures):
    root, _ = runtime_failures
    assert not (root / "never-made").exists()  # a mistyped --resume creates nothing
    assert sorted(p.name for p in (root / "other-config").iterdir()) == ["checkpoint.safetensors"]
    assert list((root / "empty").iterdir()) == []
    for folder in (root / "outs").iterdir():
        assert list(folder.iterdir()) == [], folder  # created and probed, nothing written
