"""Tests for jbackprop.io: parameter files, checkpoints and atomic writes."""

from __future__ import annotations

import errno
import json
import os
import pickle
import stat
import struct

import jax
import numpy as np
import optax
import pytest
from safetensors.numpy import save

import jbackprop as jb
from jbackprop import io

MODEL = jb.Model(sizes=(3, 5, 4), hidden="relu", output="softmax", cost="log_likelihood", l2=0.1)
ADAM = optax.adam(0.05)


def data(n: int = 24, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 3)).astype(np.float32), rng.integers(0, 4, n).astype(np.int32)


def assert_trees_equal(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert np.asarray(u).dtype == np.asarray(v).dtype
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


@pytest.fixture(scope="module")
def params():
    return jb.init_params(jax.random.key(0), MODEL)


@pytest.fixture(scope="module")
def states(params):
    """The TrainStates of three epochs of Adam with validation."""
    got: list[jb.TrainState] = []
    jb.fit(params, MODEL, data(), ADAM, 3, 5, jax.random.key(1), data(12, 1), on_epoch=got.append)
    return got


# --- parameter files ------------------------------------------------------------------


def test_params_round_trip_is_exact(tmp_path, params):
    path = jb.save_params(tmp_path / "p.safetensors", params, MODEL)
    loaded, model = jb.load_params(path)
    assert model == MODEL
    assert_trees_equal(loaded, params)
    again, model2 = jb.load_params(path, MODEL)
    assert model2 is MODEL
    assert_trees_equal(again, params)
    X, _ = data()
    np.testing.assert_array_equal(jb.forward(loaded, X, model), jb.forward(params, X, MODEL))


def test_params_file_is_safetensors_not_pickle(tmp_path, params):
    path = jb.save_params(tmp_path / "p.safetensors", params, MODEL)
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    assert 0 < header_len < len(raw)
    header = json.loads(raw[8 : 8 + header_len])  # a JSON header, then raw tensor bytes
    assert header["__metadata__"]["format"] == "jbackprop.params/1"
    assert json.loads(header["__metadata__"]["model"]) == MODEL.to_dict()
    assert header["layer1.w"] == {
        "dtype": "F32",
        "shape": [5, 3],
        "data_offsets": header["layer1.w"]["data_offsets"],
    }
    assert set(header) == {"__metadata__", "layer1.w", "layer1.b", "layer2.w", "layer2.b"}
    assert raw[:1] != b"\x80" and not raw.startswith(b"PK")  # neither pickle nor a zip
    with pytest.raises(pickle.UnpicklingError):
        pickle.loads(raw)


def test_params_file_permissions_follow_the_umask(tmp_path, params):
    old = os.umask(0o022)
    try:
        path = jb.save_params(tmp_path / "p.safetensors", params, MODEL)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


@pytest.mark.parametrize(
    ("other", "expected"),
    [
        (jb.Model(sizes=(3, 6, 4), hidden="relu", output="softmax", cost="log_likelihood"), "6"),
        (jb.Model(sizes=(3, 5, 4), hidden="tanh", output="softmax", cost="log_likelihood"), "tanh"),
        (jb.Model(sizes=(3, 5, 4)), "sigmoid"),
    ],
    ids=["sizes", "activation", "output-and-cost"],
)
def test_load_with_another_model_names_both(tmp_path, params, other, expected):
    path = jb.save_params(tmp_path / "p.safetensors", params, MODEL)
    with pytest.raises(ValueError, match="not of the requested") as info:
        jb.load_params(path, other)
    message = str(info.value)
    assert str(path) in message
    assert "'sizes': [3, 5, 4]" in message  # the saved model
    assert expected in message  # what the requested model has instead


def test_load_ignores_training_only_settings(tmp_path, params):
    """l2 and dropout do not change what the parameters mean."""
    path = jb.save_params(tmp_path / "p.safetensors", params, MODEL)
    other = jb.Model(sizes=(3, 5, 4), hidden="relu", output="softmax", cost="log_likelihood")
    loaded, model = jb.load_params(path, other)
    assert model is other
    assert_trees_equal(loaded, params)


def test_save_rejects_params_of_another_model(tmp_path, params):
    with pytest.raises(ValueError, match="layer 1"):
        jb.save_params(tmp_path / "p.safetensors", params, jb.Model(sizes=(4, 5, 4)))
    assert list(tmp_path.iterdir()) == []


CORRUPTIONS = {
    "empty": lambda raw: b"",
    "4 bytes": lambda raw: raw[:4],
    "header cut": lambda raw: raw[:40],
    "half": lambda raw: raw[: len(raw) // 2],
    "last byte missing": lambda raw: raw[:-1],
    "huge header length": lambda raw: struct.pack("<Q", 1 << 40) + raw[8:],
    "garbage header": lambda raw: raw[:8] + b"\x00\xff" * 20 + raw[48:],
    "random bytes": lambda raw: np.random.default_rng(0).bytes(len(raw)),
}


@pytest.mark.parametrize("corrupt", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_corrupt_or_truncated_file_is_a_value_error(tmp_path, params, corrupt):
    path = jb.save_params(tmp_path / "p.safetensors", params, MODEL)
    path.write_bytes(corrupt(path.read_bytes()))
    with pytest.raises(ValueError, match=r"not a valid parameter file \(corrupt or truncated"):
        jb.load_params(path)


def test_missing_file_or_folder_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        jb.load_params(tmp_path / "nothing.safetensors")
    with pytest.raises(ValueError, match="cannot read parameter file"):
        jb.load_params(tmp_path)


def test_foreign_safetensors_files_are_rejected(tmp_path, params, states):
    plain = tmp_path / "plain.safetensors"
    plain.write_bytes(save({"layer1.w": np.zeros((5, 3), np.float32)}))
    with pytest.raises(ValueError, match="not a jbackprop file"):
        jb.load_params(plain)
    ckpt = io.save_checkpoint(tmp_path / "c.safetensors", states[0], MODEL, jax.random.key(1), {})
    with pytest.raises(ValueError, match=r"jbackprop\.params/1"):
        jb.load_params(ckpt)
    params_file = jb.save_params(tmp_path / "p.safetensors", params, MODEL)
    with pytest.raises(ValueError, match=r"jbackprop\.checkpoint/1"):
        io.load_checkpoint(params_file, ADAM.init(params))


# --- checkpoints ----------------------------------------------------------------------


def test_checkpoint_round_trip_with_adam_state_and_key(tmp_path, params, states):
    state = states[1]
    key = jax.random.key(1)
    config = {"eta": 0.05, "sizes": [3, 5, 4], "note": "λ"}
    path = io.save_checkpoint(tmp_path / "c.safetensors", state, MODEL, key, config)

    loaded, model, key2, config2 = io.load_checkpoint(path, ADAM.init(params))
    assert model == MODEL and config2 == config
    assert (loaded.epoch, loaded.best_epoch) == (state.epoch, state.best_epoch)
    assert loaded.history == state.history
    assert_trees_equal(loaded.params, state.params)
    assert_trees_equal(loaded.best_params, state.best_params)
    assert_trees_equal(loaded.opt_state, state.opt_state)  # Adam's count, mu and nu
    assert int(loaded.opt_state[0].count) == 2 * 5  # 24 examples in minibatches of 5
    assert jax.dtypes.issubdtype(key2.dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(jax.random.key_data(key2), jax.random.key_data(key))

    # Continuing from the file ends exactly where the uninterrupted run ended.
    resumed, history = jb.fit(params, MODEL, data(), ADAM, 3, 5, key2, data(12, 1), resume=loaded)
    assert_trees_equal(resumed, states[2].params)
    assert [r["epoch"] for r in history] == [1, 2, 3]


def test_checkpoint_with_a_raw_uint32_key(tmp_path, states, params):
    key = jax.random.PRNGKey(7)
    path = io.save_checkpoint(tmp_path / "c.safetensors", states[0], MODEL, key, {})
    _, _, key2, _ = io.load_checkpoint(path, ADAM.init(params))
    assert key2.dtype == np.uint32
    np.testing.assert_array_equal(key2, key)


@pytest.mark.parametrize(
    "optimizer",
    [optax.sgd(0.1), optax.sgd(0.1, momentum=0.9), optax.adagrad(0.1)],
    ids=["sgd", "momentum", "adagrad"],
)
def test_checkpoint_with_another_optimizer_is_refused(tmp_path, states, params, optimizer):
    path = io.save_checkpoint(tmp_path / "c.safetensors", states[0], MODEL, jax.random.key(1), {})
    with pytest.raises(ValueError, match="optimizer state does not match this optimizer"):
        io.load_checkpoint(path, optimizer.init(params))


class _HalfWriter:
    """A file whose write stores half of the bytes and then fails, as a full disk does."""

    def __init__(self, f):
        self.f = f

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def write(self, data):
        self.f.write(data[: len(data) // 2])
        self.f.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self.f, name)


def _fail(exc):
    def raiser(*args, **kwargs):
        raise exc

    return raiser


@pytest.mark.parametrize("where", ["write", "fsync", "replace", "interrupt"])
def test_failed_checkpoint_write_keeps_the_previous_one(
    tmp_path, monkeypatch, states, params, where
):
    path = tmp_path / "checkpoint.safetensors"
    key = jax.random.key(1)
    io.save_checkpoint(path, states[0], MODEL, key, {"run": 1})
    before = path.read_bytes()

    if where == "write":
        real_fdopen = os.fdopen
        monkeypatch.setattr(os, "fdopen", lambda fd, mode: _HalfWriter(real_fdopen(fd, mode)))
        expected = OSError
    elif where == "fsync":
        monkeypatch.setattr(os, "fsync", _fail(OSError(errno.EIO, "Input/output error")))
        expected = OSError
    elif where == "replace":
        monkeypatch.setattr(os, "replace", _fail(OSError(errno.EXDEV, "Invalid link")))
        expected = OSError
    else:
        monkeypatch.setattr(os, "fsync", _fail(KeyboardInterrupt()))
        expected = KeyboardInterrupt
    with pytest.raises(expected):
        io.save_checkpoint(path, states[1], MODEL, key, {"run": 1})
    monkeypatch.undo()

    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.safetensors"]
    assert path.read_bytes() == before
    loaded, _, _, config = io.load_checkpoint(path, ADAM.init(params))
    assert loaded.epoch == 1 and config == {"run": 1}
    assert_trees_equal(loaded.params, states[0].params)


def test_atomic_write_replaces_and_leaves_nothing_else(tmp_path):
    path = tmp_path / "f.json"
    io.atomic_write(path, b"one")
    io.atomic_write(path, b"two")
    assert path.read_bytes() == b"two"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]
    with pytest.raises(FileNotFoundError):
        io.atomic_write(tmp_path / "missing" / "f.json", b"x")
