"""Private training that states its ε: the experiment's DP flags, its accounting, the
private PCA and the learning-rate schedule.

Flag checks, the privacy plan and the schedule run in this process, on no data. The runs
that train use a slice of real MNIST (``slow``): one finished private run with a private
PCA, the same run interrupted and resumed (which must state the same ε and end with the
same parameters), a run on shuffled minibatches, which claims no ε, and a sweep on
projected inputs. Only the runs a signal stops, and the reference they are compared with,
are subprocesses; the others call ``main`` in this process, which saves a start-up each.
"""

from __future__ import annotations

import argparse
import json
import re
import signal

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from mnist_runs import finished_run, flag_error, signal_after
from safetensors.numpy import load_file

import jbackprop as jb
from jbackprop import data
from jbackprop.experiments import mnist
from jbackprop.experiments.mnist import accounting, cli, config, report


def parse(*argv: str) -> argparse.Namespace:
    return cli.parse_args([*argv, "--out", "/nonexistent/never-created"])


# --- flags: one-line errors, exit status 2 -----------------------------------------------

PCA_NET = ["--pca", "20", "--sizes", "20", "30", "10"]

# Every flag of DP-SGD is refused without --dp-clip, and the refusal names it.
NEEDS_CLIP = [
    ("--dp-noise", "1.1"), ("--dp-epsilon", "1"), ("--dp-delta", "1e-6"),
    ("--dp-accountant", "pld"), ("--dp-sampling", "poisson"), ("--dp-pca-noise", "4"),
]  # fmt: skip

PARSE_ERRORS = {
    **{f"{flag} without clip": ([flag, v], f"{flag} needs --dp-clip") for flag, v in NEEDS_CLIP},
    "epsilon and noise": (
        ["--dp-clip", "1", "--dp-epsilon", "2", "--dp-noise", "1"],
        "--dp-epsilon and --dp-noise are mutually exclusive",
    ),
    "epsilon and zero noise": (
        ["--dp-clip", "1", "--dp-epsilon", "2", "--dp-noise", "0"],
        "--dp-epsilon and --dp-noise are mutually exclusive",
    ),
    "bounds per layer": (
        ["--dp-clip", "1,1,1"],
        "--dp-clip gives 3 bounds, but the network has 2 layers: give one bound, or 2",
    ),
    "bad bound": (["--dp-clip", "1,x"], "argument --dp-clip: expected one bound or comma"),
    "zero bound": (["--dp-clip", "0"], "argument --dp-clip: expected one bound or comma"),
    "epsilon with shuffle": (
        ["--dp-clip", "1", "--dp-epsilon", "1", "--dp-sampling", "shuffle"],
        "--dp-epsilon needs Poisson sampling",
    ),
    "delta of 1": (["--dp-clip", "1", "--dp-delta", "1"], "argument --dp-delta: expected"),
    "unknown accountant": (
        ["--dp-clip", "1", "--dp-accountant", "prv"],
        "argument --dp-accountant: invalid choice: 'prv'",
    ),
    "pca noise without pca": (
        ["--dp-clip", "1", "--dp-pca-noise", "4"],
        "--dp-pca-noise needs --pca K",
    ),
    "private training on a public pca": (
        [*PCA_NET, "--dp-clip", "1"],
        "--pca with --dp-clip needs --dp-pca-noise S",
    ),
    "pca noise without training noise": (
        [*PCA_NET, "--dp-pca-noise", "4"],
        "--dp-pca-noise needs --dp-clip",
    ),
    "input width is the pca's": (["--pca", "20"], "--sizes must start with 20 (the --pca"),
    "pca wider than an image": (
        ["--pca", "800", "--sizes", "800", "10"],
        "--pca 800 exceeds the 784 pixels",
    ),
    "half a schedule": (["--eta-end", "0.05"], "--eta-end and --eta-decay-epochs go together"),
    "the other half": (["--eta-decay-epochs", "3"], "--eta-end and --eta-decay-epochs go"),
    "patience without validation": (
        ["--no-validation", "--patience", "3"],
        "--patience and --sweep need a validation set: drop --no-validation",
    ),
    "sweep without validation": (
        ["--no-validation", "--sweep", "eta=0.1,1"],
        "--patience and --sweep need a validation set",
    ),
    "schedule in a sweep": (
        ["--sweep", "eta=0.1,1", "--eta-end", "0.05", "--eta-decay-epochs", "3"],
        "--sweep cannot be combined with",
    ),
}


@pytest.mark.parametrize(("argv", "message"), PARSE_ERRORS.values(), ids=PARSE_ERRORS.keys())
def test_bad_privacy_flags_are_one_line_errors(argv, message, capsys):
    err = flag_error([*argv, "--out", "/nonexistent/never-created"], capsys)
    assert message in err, err


def test_help_documents_the_privacy_flags(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit):
        mnist.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "comma-separated, no spaces" in text  # the per-layer syntax of --dp-clip
    for default in ("(default: rdp)", "(default: 1e-05)", "(default: poisson)"):
        assert default in text
    assert "no ε is claimed" in text


# --- the configuration a checkpoint stores ------------------------------------------------


def test_runs_without_the_new_flags_keep_their_old_configuration():
    old_keys = {
        "dataset", "sizes", "hidden", "output", "cost", "init", "eta", "lmbda", "l1",
        "dropout", "batch_size", "optimizer", "seed", "train_size", "sweep", "dp_clip",
        "dp_noise", "track_stats",
    }  # fmt: skip
    assert set(config.config_of(parse())) == old_keys
    cfg = config.config_of(parse("--dp-clip", "1", "--dp-noise", "0.5", "--dp-sampling", "shuffle"))
    assert set(cfg) == old_keys and cfg["dp_clip"] == 1.0 and cfg["dp_noise"] == 0.5


def test_the_configuration_records_what_changes_the_result():
    cfg = config.config_of(parse("--dp-clip", "1", "--dp-noise", "0.5"))
    assert cfg["dp_sampling"] == "poisson"  # Poisson by default for DP-SGD
    args = parse(
        *PCA_NET, "--dp-clip", "4,4", "--dp-epsilon", "2", "--dp-pca-noise", "7",
        "--epochs", "12", "--dp-delta", "1e-6", "--eta-end", "0.1", "--eta-decay-epochs", "3",
    )  # fmt: skip
    cfg = config.config_of(args)
    assert cfg["dp_clip"] == [4.0, 4.0] and cfg["dp_noise"] is None
    assert cfg["dp_epsilon"] == 2.0 and cfg["dp_delta"] == 1e-6
    assert cfg["epochs"] == 12  # σ is calibrated for the epochs: a resume must keep them
    assert (cfg["pca"], cfg["dp_pca_noise"], cfg["eta_end"], cfg["eta_decay_epochs"]) == (
        20, 7.0, 0.1, 3,
    )  # fmt: skip
    assert json.loads(json.dumps(cfg)) == cfg  # what the checkpoint stores reads back equal


# --- the privacy plan ----------------------------------------------------------------------


def test_a_calibrated_plan_spends_its_epsilon_over_its_epochs():
    args = parse(*PCA_NET, "--dp-clip", "4,4", "--dp-epsilon", "2", "--dp-pca-noise", "7")
    args.epochs, args.batch_size = 20, 600
    plan = accounting.plan(args, 50_000)
    assert (plan.sample_rate, plan.steps_per_epoch, plan.sampling) == (0.012, 83, "poisson")
    assert plan.clip == (4.0, 4.0) and plan.pca == 20 and plan.pca_noise == 7.0
    eps = [plan.epsilon(e) for e in range(1, 21)]
    assert eps == sorted(eps) and 1.9 < eps[-1] <= 2.0
    assert eps[-1] == jb.privacy.epsilon(plan.noise_multiplier, 0.012, 20 * 83, 1e-5, pca_noise=7.0)
    block = plan.block(20)
    assert block["epsilon"] == eps and block["claimed"] and block["why_not"] is None
    assert block["steps"] == 1660 and block["clip"] == [4.0, 4.0]
    assert block["target_epsilon"] == 2.0 and block["accountant"] == "rdp"
    assert json.loads(json.dumps(block)) == block


def test_a_plan_with_the_pca_spends_more_than_one_without():
    with_pca = parse(*PCA_NET, "--dp-clip", "1", "--dp-noise", "1.1", "--dp-pca-noise", "4")
    without = parse("--dp-clip", "1", "--dp-noise", "1.1", "--dp-accountant", "pld")
    plain = accounting.plan(without, 50_000)
    assert plain.accountant == "pld" and plain.pca is None
    base = accounting.plan(parse("--dp-clip", "1", "--dp-noise", "1.1"), 50_000)
    assert accounting.plan(with_pca, 50_000).epsilon(3) > base.epsilon(3)
    rdp = accounting.plan(parse("--dp-clip", "1", "--dp-noise", "1.1"), 50_000)
    assert plain.epsilon(3) < rdp.epsilon(3)  # PLD is the tighter accountant


def test_no_epsilon_is_claimed_for_shuffled_minibatches_or_no_noise():
    shuffled = accounting.plan(
        parse("--dp-clip", "1", "--dp-noise", "1", "--dp-sampling", "shuffle"), 1000
    )
    assert shuffled.steps_per_epoch == 100 and "shuffled minibatches" in shuffled.unclaimed
    assert shuffled.epsilon(5) is None
    block = shuffled.block(5)
    assert not block["claimed"] and block["epsilon"] is None and block["sampling"] == "shuffle"
    silent = accounting.plan(parse("--dp-clip", "1"), 1000)
    assert silent.noise_multiplier == 0 and "no noise" in silent.unclaimed
    assert accounting.plan(parse(), 1000) is None


def test_an_epsilon_the_pca_alone_exceeds_is_refused():
    args = parse(*PCA_NET, "--dp-clip", "1", "--dp-epsilon", "0.2", "--dp-pca-noise", "4")
    with pytest.raises(ValueError, match=r"--dp-epsilon 0.2: .*private projection alone"):
        accounting.plan(args, 50_000)


def test_epoch_lines_show_the_epsilon_spent(capsys):
    progress = report.Progress(2, False, privacy=lambda epoch: 0.25 * epoch)
    progress({"epoch": 1, "train_cost": 1.0, "train_accuracy": 0.5, "seconds": 0.1})
    progress({"epoch": 2, "train_cost": 1.0, "train_accuracy": 0.5, "seconds": 0.1})
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("s  ε 0.25") and lines[1].endswith("s  ε 0.5")


# --- the learning-rate schedule and the projection -----------------------------------------


def _step_sizes(optimizer: optax.GradientTransformation, steps: int) -> list[float]:
    """The step each update takes on a gradient of 1."""
    params = jnp.zeros(())
    state = optimizer.init(params)
    sizes = []
    for _ in range(steps):
        updates, state = optimizer.update(jnp.ones(()), state, params)
        sizes.append(-float(updates))
    return sizes


@pytest.mark.parametrize(("flags", "per_epoch"), [([], 10), (["--dp-clip", "1"], 10)])
def test_the_learning_rate_falls_linearly_then_stays(flags, per_epoch):
    args = parse("--eta", "0.1", "--eta-end", "0.05", "--eta-decay-epochs", "2", *flags)
    args.batch_size = 10
    sizes = _step_sizes(config.optimizer_of(args, 95), 3 * per_epoch)
    assert sizes[0] == pytest.approx(0.1)
    assert sizes[per_epoch] == pytest.approx(0.075)  # half-way after one of two epochs
    assert sizes[2 * per_epoch :] == pytest.approx([0.05] * per_epoch)
    assert _step_sizes(config.optimizer_of(parse("--eta", "0.1"), 95), 3) == pytest.approx(
        [0.1] * 3
    )


@pytest.mark.slow
def test_the_projection_is_private_with_noise_and_drawn_from_the_seed():
    X = np.random.default_rng(0).random((300, 784), dtype=np.float32)
    public = config.projection(parse(*PCA_NET), X)
    assert public.shape == (784, 20)
    np.testing.assert_array_equal(public, np.asarray(jb.privacy.dp_pca(X, 20)))
    private = parse(*PCA_NET, "--dp-clip", "1", "--dp-pca-noise", "4")
    P = config.projection(private, X)
    assert np.array_equal(P, config.projection(private, X)) and not np.allclose(P, public)
    private.seed = 1
    assert not np.allclose(P, config.projection(private, X))
    y = np.arange(300) % 10
    (train, _, _) = config.project(((X, y), (X, y), (X, y)), P)
    np.testing.assert_allclose(train[0], X @ P, rtol=1e-6)
    assert train[1] is y
    assert config.project(((X, y),) * 3, None)[0][0] is X
    assert config.projection(parse(), X) is None


# --- end to end: runs on a slice of real MNIST ---------------------------------------------

EPOCHS = 6
PRIVATE = [
    "--train-size", "3000", "--batch-size", "50", "--epochs", str(EPOCHS), "--pca", "20",
    "--sizes", "20", "32", "10", "--hidden", "relu", "--output", "softmax",
    "--cost", "log_likelihood", "--lmbda", "0", "--eta", "0.2", "--eta-end", "0.1",
    "--eta-decay-epochs", "2", "--dp-clip", "2,2", "--dp-epsilon", "4", "--dp-pca-noise", "4",
    "--no-progress",
]  # fmt: skip
EPOCH_LINE = re.compile(r"^epoch +(\d+)/\d+ .* s  ε (\S+)$", re.M)


@pytest.fixture(scope="module")
def private_run(mnist_dir, tmp_path_factory):
    """A private run with a private PCA, never interrupted: ``(folder, CompletedProcess)``."""
    return finished_run(tmp_path_factory, "private", *PRIVATE, "--data-dir", mnist_dir)


@pytest.mark.slow
def test_a_private_run_states_its_epsilon_every_epoch(private_run, mnist_dir):
    folder, proc = private_run
    assert "Traceback" not in proc.stderr
    assert re.search(r"^DP-SGD: clip 2,2, σ = \S+ \(calibrated: ε = 4 after 6 epochs\), "
                     r"Poisson-sampled lots \(q = 0.01667\), 60 steps per epoch; private PCA "
                     r"to 20 dimensions, noise 4$", proc.stdout, re.M), proc.stdout  # fmt: skip
    printed = EPOCH_LINE.findall(proc.stdout)
    assert [int(e) for e, _ in printed] == list(range(1, EPOCHS + 1))

    metrics = json.loads((folder / "metrics.json").read_text())
    privacy = metrics["privacy"]
    assert privacy["claimed"] and privacy["sampling"] == "poisson"
    assert privacy["steps"] == EPOCHS * 60 and privacy["sample_rate"] == pytest.approx(
        50 / 3000, rel=1e-5
    )
    assert (privacy["pca"], privacy["pca_noise"], privacy["clip"]) == (20, 4.0, [2.0, 2.0])
    eps = privacy["epsilon"]
    assert len(eps) == EPOCHS and eps == sorted(eps) and 3.8 < eps[-1] <= 4.0
    assert [s for _, s in printed] == [f"{e:.3g}" for e in eps]
    sigma = privacy["noise_multiplier"]
    assert eps[-1] == pytest.approx(
        jb.privacy.epsilon(sigma, 50 / 3000, EPOCHS * 60, 1e-5, pca_noise=4.0), rel=1e-4
    )
    assert f"privacy: (ε, δ) = ({eps[-1]:.3g}, 1e-05) by the RDP accountant" in proc.stdout

    # The saved model takes projected inputs: raw test images times the saved projection.
    P = load_file(folder / "pca.safetensors")["projection"]
    params, model = jb.load_params(folder / "params.safetensors")
    assert P.shape == (784, 20) and model.sizes == (20, 32, 10)
    X = data.read_images(mnist_dir / data.TEST_IMAGES).reshape(-1, 784) / np.float32(255)
    y = data.read_labels(mnist_dir / data.TEST_LABELS).astype(np.int32)
    accuracy = jb.accuracy(params, X @ P, y, model)
    assert accuracy == pytest.approx(metrics["test_accuracy"], abs=1e-6) and accuracy > 0.5


@pytest.mark.slow
def test_a_resumed_private_run_states_the_same_epsilon(private_run, mnist_dir, tmp_path, capsys):
    reference, ref_proc = private_run
    folder = tmp_path / "run"
    args = [*PRIVATE, "--data-dir", str(mnist_dir)]
    rc, _, err, _ = signal_after([*args, "--out", folder], r"^epoch +2/", signal.SIGINT, tmp_path)
    assert rc == 1 and "interrupted by SIGINT after epoch" in err, err
    stopped = len(json.loads((folder / "metrics.json").read_text())["epochs"])
    assert 2 <= stopped < EPOCHS

    # --epochs is part of a calibrated run's configuration: σ depends on it.
    assert mnist.main([*args, "--epochs", "9", "--resume", str(folder)]) == 1
    assert "differs in --epochs" in capsys.readouterr().err

    assert mnist.main([*args, "--resume", str(folder)]) == 0
    resumed = EPOCH_LINE.findall(capsys.readouterr().out)
    assert [int(e) for e, _ in resumed] == list(range(stopped + 1, EPOCHS + 1))
    assert resumed == EPOCH_LINE.findall(ref_proc.stdout)[stopped:]
    got = json.loads((folder / "metrics.json").read_text())
    want = json.loads((reference / "metrics.json").read_text())
    assert got["privacy"] == want["privacy"] and got["test_accuracy"] == want["test_accuracy"]
    a, _ = jb.load_params(folder / "params.safetensors")
    b, _ = jb.load_params(reference / "params.safetensors")
    assert all(np.array_equal(u[k], v[k]) for u, v in zip(a, b, strict=True) for k in "wb")
    assert np.array_equal(
        load_file(folder / "pca.safetensors")["projection"],
        load_file(reference / "pca.safetensors")["projection"],
    )


@pytest.mark.slow
def test_without_validation_all_60000_training_images_train(mnist_dir):
    flags = ["--data-dir", str(mnist_dir), "--no-progress"]
    train, validation, test = config.load_data(parse(*flags), verbose=False)
    assert validation is not None and len(train[0]) == 50_000
    both, none, _ = config.load_data(parse(*flags, "--no-validation"), verbose=False)
    assert none is None and len(both[0]) == 60_000
    np.testing.assert_array_equal(both[0][:50_000], train[0])
    np.testing.assert_array_equal(both[0][50_000:], validation[0])
    np.testing.assert_array_equal(both[1][50_000:], validation[1])
    assert config.config_of(parse("--no-validation"))["no_validation"] is True
    assert "no_validation" not in config.config_of(parse())
    assert config.project((both, none, test), np.eye(784, 20, dtype=np.float32))[1] is None


@pytest.mark.slow
def test_shuffled_minibatches_claim_no_epsilon(mnist_dir, tmp_path, capsys):
    assert mnist.main([
        "--train-size", "1000", "--batch-size", "50", "--epochs", "2", "--sizes", "784", "16",
        "10", "--dp-clip", "1", "--dp-noise", "1", "--dp-sampling", "shuffle", "--no-progress",
        "--data-dir", str(mnist_dir), "--out", str(tmp_path / "run"),
    ]) == 0  # fmt: skip
    stdout = capsys.readouterr().out
    assert "no ε is claimed for this run: shuffled minibatches" in stdout
    assert "privacy: no ε is claimed" in stdout and not EPOCH_LINE.search(stdout)
    assert len(re.findall(r"^epoch +\d+/2 ", stdout, re.M)) == 2
    privacy = json.loads((tmp_path / "run" / "metrics.json").read_text())["privacy"]
    assert privacy["claimed"] is False and privacy["epsilon"] is None
    assert privacy["sampling"] == "shuffle" and privacy["steps"] == 40


@pytest.mark.slow
def test_a_sweep_trains_on_the_projected_inputs(mnist_dir, tmp_path):
    assert mnist.main([
        "--train-size", "500", "--epochs", "1", "--pca", "20", "--sizes", "20", "16", "10",
        "--sweep", "eta=0.5,1", "--no-progress", "--data-dir", str(mnist_dir),
        "--out", str(tmp_path / "run"),
    ]) == 0  # fmt: skip
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    P = load_file(tmp_path / "run" / "pca.safetensors")["projection"]
    params, model = jb.load_params(tmp_path / "run" / "params.safetensors")
    X = data.read_images(mnist_dir / data.TEST_IMAGES).reshape(-1, 784) / np.float32(255)
    y = data.read_labels(mnist_dir / data.TEST_LABELS).astype(np.int32)
    assert model.sizes == (20, 16, 10) and metrics["config"]["pca"] == 20
    assert jb.accuracy(params, X @ P, y, model) == pytest.approx(metrics["test_accuracy"], abs=1e-6)
