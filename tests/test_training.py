"""Tests for jbackprop.fit: learning, the exact update rule, shuffles, remainders,
reproducibility, early stopping, divergence, argument checks, compilation and sharding."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jbackprop as jb

# One optimizer for the tests that share a model and minibatch size, and so one compiled
# epoch (fit's cache matches optimizers by what they compute, not by identity).
SGD = optax.sgd(0.5)
MODEL = jb.Model(sizes=(2, 8, 2))
# The float64 tests share one model and one training-set size, so they share compilations.
M64 = jb.Model(sizes=(2, 4, 2), l2=0.3)
N64 = 8


@pytest.fixture
def float64():
    """Run the test with 64-bit floats, so that two ways of computing a step agree to 1e-12."""
    with jax.enable_x64(True):
        yield


def blobs(n: int, seed: int = 0, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Two Gaussian blobs in 2-D, centred at (-1.5, -1.5) and (1.5, 1.5); integer labels."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n).astype(np.int32)
    centres = np.where(y[:, None] == 1, 1.5, -1.5)
    X = centres + rng.normal(size=(n, 2))
    return X.astype(dtype), y


def leaves(params) -> list[np.ndarray]:
    return [np.asarray(leaf) for leaf in jax.tree.leaves(params)]


def assert_trees_equal(a, b) -> None:
    for u, v in zip(leaves(a), leaves(b), strict=True):
        np.testing.assert_array_equal(u, v)


def tree_max_diff(a, b) -> float:
    return max(float(np.max(np.abs(u - v))) for u, v in zip(leaves(a), leaves(b), strict=True))


def without_seconds(history) -> list[dict]:
    return [{k: v for k, v in rec.items() if k != "seconds"} for rec in history]


def epoch_perm(key, epoch: int, n: int) -> np.ndarray:
    """The shuffle of ``epoch`` as fit draws it: epoch key ``fold_in(key, epoch)``, whose
    first half of ``split`` permutes the examples (the second draws dropout masks)."""
    k_perm, _ = jax.random.split(jax.random.fold_in(key, epoch))
    return np.asarray(jax.random.permutation(k_perm, n))


def manual_sgd(params, model, X, y, eta, perms, batch_size, n, keep_remainder=True):
    """Plain SGD written out: for each permutation, one step per minibatch of it."""
    for perm in perms:
        stop = len(perm) if keep_remainder else len(perm) - len(perm) % batch_size
        for start in range(0, stop, batch_size):
            ids = perm[start : start + batch_size]
            g = jb.grad(params, X[ids], y[ids], model, n=n)
            params = jax.tree.map(lambda p, d: p - eta * d, params, g)
    return params


# --- learning ---------------------------------------------------------------------------


TRAIN = blobs(200, seed=0)
VALID = blobs(100, seed=1)


@pytest.mark.slow
def test_learns_two_blobs():
    X, y = TRAIN
    X_test, y_test = blobs(200, seed=2)
    params = jb.init_params(jax.random.key(0), MODEL)
    start_cost, start_accuracy = jb.evaluate(params, X, y, MODEL)
    assert start_accuracy < 0.7  # a random network does not already separate them
    params, history = jb.fit(params, MODEL, (X, y), SGD, 15, 10, jax.random.key(1))
    assert [r["epoch"] for r in history] == list(range(1, 16))
    assert history[-1]["train_accuracy"] > 0.95
    assert jb.accuracy(params, X_test, y_test, MODEL) > 0.95
    assert history[-1]["train_cost"] < 0.1 * start_cost
    assert history[-1]["train_cost"] < history[0]["train_cost"]


# --- the update rule --------------------------------------------------------------------


@pytest.mark.slow
def test_full_batch_epoch_is_one_eq15_step(float64):
    n, eta, model = N64, 0.7, M64
    lmbda = model.l2
    plain = jb.Model(sizes=model.sizes)  # the same network without the L2 term
    X, y = blobs(n, seed=3, dtype=np.float64)
    params = jb.init_params(jax.random.key(0), model, dtype=jnp.float64)
    assert params[0]["w"].dtype == jnp.float64

    new, history = jb.fit(params, model, (X, y), optax.sgd(eta), 1, n, jax.random.key(5))

    g0 = jb.grad(params, X, y, plain)  # dC0/dp, unregularised
    decay = 1 - eta * lmbda / n
    for layer, grad, got in zip(params, g0, new, strict=True):
        np.testing.assert_allclose(
            got["w"], decay * layer["w"] - eta * grad["w"], rtol=1e-12, atol=1e-12
        )
        np.testing.assert_allclose(got["b"], layer["b"] - eta * grad["b"], rtol=1e-12, atol=1e-12)
    assert len(history) == 1


@pytest.mark.slow
def test_remainder_minibatch_is_used(float64):
    n, batch, eta, model = N64, 3, 0.9, M64
    X, y = blobs(n, seed=4, dtype=np.float64)
    params = jb.init_params(jax.random.key(2), model, dtype=jnp.float64)
    key = jax.random.key(11)

    got, _ = jb.fit(params, model, (X, y), optax.sgd(eta), 1, batch, key)

    perm = epoch_perm(key, 1, n)
    assert sorted(perm.tolist()) == list(range(n))
    want = manual_sgd(params, model, X, y, eta, [perm], batch, n)
    assert tree_max_diff(got, want) < 1e-12
    # Dropping the last two examples (8 = 2 * 3 + 2) would give something else.
    dropped = manual_sgd(params, model, X, y, eta, [perm], batch, n, keep_remainder=False)
    assert tree_max_diff(got, dropped) > 1e-4


def test_shuffle_follows_the_key_and_changes_every_epoch(float64):
    n, eta, model = N64, 0.8, M64
    X, y = blobs(n, seed=5, dtype=np.float64)
    params = jb.init_params(jax.random.key(3), model, dtype=jnp.float64)
    opt = optax.sgd(eta)
    key_a, key_b = jax.random.key(20), jax.random.key(21)

    # With batch size 1 the result of an epoch depends on the order of the examples.
    one_a, _ = jb.fit(params, model, (X, y), opt, 1, 1, key_a)
    one_a2, _ = jb.fit(params, model, (X, y), opt, 1, 1, key_a)
    one_b, _ = jb.fit(params, model, (X, y), opt, 1, 1, key_b)
    assert_trees_equal(one_a, one_a2)
    assert tree_max_diff(one_a, one_b) > 1e-6
    np.testing.assert_allclose(
        leaves(one_a)[0],
        leaves(manual_sgd(params, model, X, y, eta, [epoch_perm(key_a, 1, n)], 1, n))[0],
        atol=1e-12,
    )

    # Epoch 2 draws a new order: two epochs of fit are the epoch-1 order followed by the
    # epoch-2 order, not the epoch-1 order twice.
    perm1, perm2 = epoch_perm(key_a, 1, n), epoch_perm(key_a, 2, n)
    assert not np.array_equal(perm1, perm2)
    two, _ = jb.fit(params, model, (X, y), opt, 2, 1, key_a)
    want = manual_sgd(params, model, X, y, eta, [perm1, perm2], 1, n)
    same_order_twice = manual_sgd(params, model, X, y, eta, [perm1, perm1], 1, n)
    assert tree_max_diff(two, want) < 1e-12
    assert tree_max_diff(two, same_order_twice) > 1e-6


@pytest.mark.slow
def test_same_seed_gives_bit_identical_params_with_dropout():
    model = jb.Model(sizes=(2, 16, 2), dropout=0.3)
    X, y = blobs(60, seed=6)
    params = jb.init_params(jax.random.key(4), model)
    runs = [
        jb.fit(params, model, (X, y), SGD, 2, 10, jax.random.key(seed))[0] for seed in (8, 8, 9)
    ]
    assert_trees_equal(runs[0], runs[1])
    assert tree_max_diff(runs[0], runs[2]) > 1e-6


def test_resume_from_an_epoch_state_is_bit_identical():
    X, y = TRAIN
    params = jb.init_params(jax.random.key(5), MODEL)
    states: list[jb.TrainState] = []
    full, history = jb.fit(
        params, MODEL, (X, y), SGD, 3, 10, jax.random.key(6), on_epoch=states.append
    )
    assert [s.epoch for s in states] == [1, 2, 3]
    assert_trees_equal(states[-1].params, full)

    resumed, history2 = jb.fit(
        params, MODEL, (X, y), SGD, 3, 10, jax.random.key(6), resume=states[0]
    )
    assert_trees_equal(resumed, full)
    assert without_seconds(history2) == without_seconds(history)


# --- validation and early stopping ------------------------------------------------------


def test_validation_records_and_log():
    (X, y), (Xv, yv) = TRAIN, VALID
    params = jb.init_params(jax.random.key(7), MODEL)
    logged = []
    _, history = jb.fit(
        params, MODEL, (X, y), SGD, 2, 10, jax.random.key(8), (Xv, yv), log=logged.append
    )
    assert logged == history
    for rec in history:
        assert set(rec) == {
            "epoch",
            "train_cost",
            "train_accuracy",
            "val_cost",
            "val_accuracy",
            "seconds",
        }
        assert 0 <= rec["val_accuracy"] <= 1 and np.isfinite(rec["val_cost"])
    final, _ = jb.fit(params, MODEL, (X, y), SGD, 2, 10, jax.random.key(8))
    assert history[-1]["val_accuracy"] == pytest.approx(jb.accuracy(final, Xv, yv, MODEL))
    _, no_val = jb.fit(params, MODEL, (X, y), SGD, 1, 10, jax.random.key(8))
    assert "val_accuracy" not in no_val[0] and "val_cost" not in no_val[0]


def test_early_stopping_returns_the_best_epoch():
    (X, y), (Xv, yv) = TRAIN, VALID
    # Near-zero weights: epoch 1 still guesses one class, so the best epoch comes later.
    params = jax.tree.map(lambda p: 0.01 * p, jb.init_params(jax.random.key(9), MODEL))
    states: list[jb.TrainState] = []
    epochs, patience = 60, 3
    fit = partial(jb.fit, params, MODEL, (X, y), SGD, epochs, 10, jax.random.key(10), (Xv, yv))
    best, history = fit(patience=patience, on_epoch=states.append)
    accs = [r["val_accuracy"] for r in history]
    best_epoch = 1 + accs.index(max(accs))  # the first epoch reaching the best accuracy
    assert best_epoch > 1 and accs[0] < max(accs)
    assert len(history) < epochs, "no early stop"
    assert history[-1]["epoch"] == best_epoch + patience
    assert states[-1].best_epoch == best_epoch
    assert_trees_equal(best, states[best_epoch - 1].params)
    assert tree_max_diff(best, states[-1].params) > 0  # not simply the last epoch
    assert jb.accuracy(best, Xv, yv, MODEL) == pytest.approx(max(accs))

    # Resuming a run that stopped early (same patience) trains no further epoch.
    again, history2 = fit(patience=patience, resume=states[-1])
    assert without_seconds(history2) == without_seconds(history)
    assert_trees_equal(again, best)


# --- failures ---------------------------------------------------------------------------


def test_huge_eta_raises_training_diverged():
    model = jb.Model(sizes=(2, 4, 2), output="identity", cost="quadratic")
    X, y = blobs(20, seed=12)
    params = jb.init_params(jax.random.key(0), model)
    seen = []
    with pytest.raises(jb.TrainingDiverged) as info:
        jb.fit(params, model, (X, y), optax.sgd(1e6), 5, 5, jax.random.key(0), log=seen.append)
    err = info.value
    assert isinstance(err, FloatingPointError)
    assert err.epoch == 1 and seen == []
    message = str(err)
    assert "epoch 1" in message
    assert "eta" in message and "smaller" in message


def _bad_args(n=20):
    X, y = blobs(n, seed=13)
    Xv, yv = blobs(10, seed=14)
    nan_X = X.copy()
    nan_X[3, 1] = np.nan
    other = jb.init_params(jax.random.key(0), jb.Model(sizes=(2, 3, 3, 2)))
    return [
        ("batch_size=0", {"batch_size": 0}, "batch_size"),
        ("batch_size>n", {"batch_size": n + 1}, rf"batch_size .*training-set size {n}"),
        ("batch_size float", {"batch_size": 2.5}, "batch_size"),
        ("epochs<0", {"epochs": -1}, "epochs"),
        ("label too big", {"train": (X, np.where(y == 1, 2, 0))}, r"train Y .*labels.*\[0, 1\]"),
        ("label negative", {"train": (X, y - 1)}, r"train Y .*labels"),
        ("NaN in X", {"train": (nan_X, y)}, "train X contains NaN"),
        ("X width", {"train": (np.zeros((n, 3), np.float32), y)}, r"train X has shape \(20, 3\)"),
        ("Y length", {"train": (X, y[:-1])}, "train Y has shape"),
        ("train not a pair", {"train": X}, "train must be a pair"),
        ("patience, no validation", {"patience": 2}, "patience needs a validation set"),
        ("patience 0", {"patience": 0, "validation": (Xv, yv)}, "patience must be a positive"),
        ("validation width", {"validation": (np.zeros((4, 5)), yv[:4])}, "validation X"),
        ("key None", {"key": None}, "key is required"),
        ("key string", {"key": "abc"}, "key must be a JAX PRNG key"),
        ("key shape", {"key": np.zeros(3, np.uint32)}, "key must be a JAX PRNG key"),
        ("optimizer", {"optimizer": "sgd"}, "optimizer must be an optax"),
        ("params of another model", {"params": other}, "params has 3 layers"),
        ("n=0", {"n": 0}, "n must be a positive"),
        ("devices empty", {"devices": []}, "devices is empty"),
    ]


def test_evaluate_needs_n_with_regularisation():
    X, y = blobs(10, seed=13)
    model = jb.Model(sizes=(2, 8, 2), l2=0.1)
    params = jb.init_params(jax.random.key(0), model)
    with pytest.raises(ValueError, match=r"n .* is required"):
        jb.evaluate(params, X, y, model)
    c, _ = jb.evaluate(params, X, y, model, n=10)
    assert np.isfinite(c)


@pytest.mark.parametrize(
    ("change", "match"),
    [pytest.param(c, m, id=i) for i, c, m in _bad_args()],
)
def test_bad_arguments_raise_value_error_naming_them(change, match):
    X, y = blobs(20, seed=13)
    args = {
        "params": jb.init_params(jax.random.key(0), MODEL),
        "model": MODEL,
        "train": (X, y),
        "optimizer": SGD,
        "epochs": 1,
        "batch_size": 5,
        "key": jax.random.key(0),
    }
    args |= change
    with pytest.raises(ValueError, match=match):
        jb.fit(**args)


# --- compilation ------------------------------------------------------------------------


@pytest.mark.slow
def test_an_epoch_compiles_once_per_shape():
    traced: list[tuple[int, ...]] = []

    def counting_grad(params, X, Y, model, n, key):
        traced.append(tuple(X.shape))  # runs only while fit's epoch is being traced
        return jb.grad(params, X, Y, model, n)

    after_epoch: list[int] = []

    def log(_):
        after_epoch.append(len(traced))

    params = jb.init_params(jax.random.key(0), MODEL)
    X, y = blobs(40, seed=15)
    opt = optax.sgd(0.3)
    jb.fit(params, MODEL, (X, y), opt, 3, 10, jax.random.key(1), log=log, gradient=counting_grad)
    assert after_epoch == [1, 1, 1], traced  # traced for epoch 1, reused for epochs 2 and 3
    assert traced == [(10, 2)]

    # A new training-set size is a new shape (scan body plus a remainder of 5): one more
    # compilation, reused across its epochs; the first shape is still cached.
    X2, y2 = blobs(45, seed=16)
    jb.fit(params, MODEL, (X2, y2), opt, 3, 10, jax.random.key(1), log=log, gradient=counting_grad)
    assert traced == [(10, 2), (10, 2), (5, 2)]
    jb.fit(params, MODEL, (X, y), opt, 3, 10, jax.random.key(2), gradient=counting_grad)
    assert len(traced) == 3


# --- sharding ---------------------------------------------------------------------------

SHARDING_SCRIPT = textwrap.dedent(
    """
    import jax, numpy as np, optax
    import jbackprop as jb

    assert jax.device_count() == 4, jax.devices()
    model = jb.Model(sizes=(5, 16, 3), l2=1.0)
    rng = np.random.default_rng(0)
    X = rng.normal(size=(42, 5)).astype(np.float32)  # 5 minibatches of 8 and a remainder of 2
    y = rng.integers(0, 3, 42).astype(np.int32)
    params = jb.init_params(jax.random.key(0), model)
    opt = optax.sgd(0.5)
    single, h1 = jb.fit(params, model, (X, y), opt, 2, 8, jax.random.key(1))
    sharded, h4 = jb.fit(params, model, (X, y), opt, 2, 8, jax.random.key(1), devices="all")
    diff = max(
        float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
        for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(sharded))
    )
    moved = max(
        float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
        for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(params))
    )
    try:
        jb.fit(params, model, (X, y), opt, 1, 6, jax.random.key(1), devices="all")
        divisible = "no error"
    except ValueError as err:
        divisible = str(err)
    print("DIFF", diff)
    print("MOVED", moved)
    print("COST", h1[-1]["train_cost"], h4[-1]["train_cost"])
    print("DIVISIBLE", divisible)
    print("DEVICES", len(sharded[0]["w"].sharding.device_set))
    """
)


@pytest.mark.slow
def test_sharding_over_four_devices_matches_one_device(tmp_path):
    script = tmp_path / "sharded.py"
    script.write_text(SHARDING_SCRIPT)
    env = os.environ | {
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
    }
    proc = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, proc.stderr
    out = dict(line.split(" ", 1) for line in proc.stdout.splitlines())
    assert float(out["MOVED"]) > 1e-3  # training did something
    assert float(out["DIFF"]) < 1e-5
    c1, c4 = map(float, out["COST"].split())
    assert c1 == pytest.approx(c4, rel=1e-5)
    assert "batch_size 6 must be divisible by the 4 devices" in out["DIVISIBLE"]
    assert out["DEVICES"] == "4"  # the parameters came back replicated on all four
