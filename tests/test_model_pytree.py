"""The Model as a pytree: traced hyperparameters, a static architecture, compile once."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jbackprop as jb
from jbackprop import training

MODEL = jb.Model((3, 5, 2), l2=1.0, dropout=0.2)


def data(m: int = 12, seed: int = 0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(m, 3)).astype(np.float32)
    return X, (X[:, 0] > 0).astype(np.int32)


def test_leaves_are_the_hyperparameters_and_the_architecture_is_static():
    leaves, treedef = jax.tree.flatten(MODEL)
    assert leaves == [1.0, 0.0, 0.2]
    other = jb.Model((3, 5, 2), l2=7.0, l1=0.5, dropout=0.4)
    assert jax.tree.structure(other) == treedef
    assert jax.tree.structure(jb.Model((3, 5, 2))) != treedef  # dropout off: another program
    assert jax.tree.structure(jb.Model((3, 6, 2), dropout=0.2)) != treedef
    rebuilt = jax.tree.unflatten(treedef, leaves)
    assert rebuilt == MODEL and hash(rebuilt) == hash(MODEL)


def test_changing_lambda_or_the_rate_does_not_retrace():
    traces = []

    @jax.jit
    def g(params, X, y, model, key):
        traces.append(1)
        return jb.grad(params, X, y, model, n=100, key=key)

    params = jb.init_params(jax.random.key(0), MODEL)
    X, y = data()
    key = jax.random.key(1)
    first = g(params, X, y, MODEL, key)
    second = g(params, X, y, jb.Model((3, 5, 2), l2=3.0, l1=0.1, dropout=0.5), key)
    assert len(traces) == 1
    assert not np.allclose(first[0]["w"], second[0]["w"])
    # The traced result equals the eager one with those hyperparameters.
    eager = jb.grad(params, X, y, jb.Model((3, 5, 2), l2=3.0, l1=0.1, dropout=0.5), 100, key)
    chex.assert_trees_all_close(second, eager, rtol=1e-6)


def test_vmap_over_a_batch_of_models():
    models = [jb.Model((3, 5, 2), l2=l2, l1=l1) for l2, l1 in ((0.0, 0.0), (2.0, 0.0), (0.0, 3.0))]
    stacked = jax.tree.map(lambda *v: jnp.asarray(v), *models)
    params = jb.init_params(jax.random.key(0), models[0])
    X, y = data()
    batched = jax.vmap(lambda m: jb.grad(params, X, y, m, n=10))(stacked)
    for i, model in enumerate(models):
        one = jax.tree.map(lambda leaf, i=i: leaf[i], batched)
        chex.assert_trees_all_close(one, jb.grad(params, X, y, model, n=10), rtol=1e-6)


@pytest.mark.slow
def test_fit_compiles_its_epoch_once_for_equal_settings():
    traced: list[int] = []
    X, y = data(20)

    def counting_grad(params, X, Y, model, n, key):
        traced.append(1)  # runs only while an epoch is being traced
        return jb.grad(params, X, Y, model, n, key=key)

    params = jb.init_params(jax.random.key(0), MODEL)
    for l2 in (1.0, 5.0, 0.5):  # a fresh optimizer object and another λ on every call
        model = jb.Model((3, 5, 2), l2=l2, dropout=0.2)
        jb.fit(
            params, model, (X, y), optax.sgd(0.5), 2, 5, jax.random.key(1), gradient=counting_grad
        )
    assert len(traced) == 1
    jb.fit(params, MODEL, (X, y), optax.sgd(0.1), 1, 5, jax.random.key(1), gradient=counting_grad)
    assert len(traced) == 2  # another learning rate is another program


def test_fingerprint_matches_optimizers_by_what_they_compute():
    fp = training.fingerprint
    assert fp(optax.sgd(0.5)) == fp(optax.sgd(0.5))
    assert fp(optax.sgd(0.5)) != fp(optax.sgd(0.1))
    assert fp(optax.adam(1e-3)) == fp(optax.adam(1e-3))
    assert fp(optax.adam(1e-3)) != fp(optax.sgd(1e-3))
    chained = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1, momentum=0.9))
    assert fp(chained) == fp(
        optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1, momentum=0.9))
    )
    assert fp(optax.sgd(optax.linear_schedule(0.1, 0.0, 10))) != fp(
        optax.sgd(optax.linear_schedule(0.1, 0.0, 20))
    )


def test_traced_labels_out_of_range_give_nan_not_a_quiet_zero():
    model = jb.Model((3, 5, 2))
    params = jb.init_params(jax.random.key(0), model)
    X, _ = data(4)
    bad = jnp.array([0, 1, 2, 1])  # 2 is not a class of a 2-output model
    with pytest.raises(ValueError, match="labels must lie in"):
        jb.grad(params, X, bad, model)
    g = jax.jit(lambda y: jb.grad(params, X, y, model))(bad)
    assert all(np.isnan(np.asarray(leaf)).any() for leaf in jax.tree.leaves(g))
    good = jax.jit(lambda y: jb.grad(params, X, y, model))(jnp.array([0, 1, 1, 1]))
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(good))


def test_bfloat16_params_round_trip(tmp_path):
    model = jb.Model((3, 4, 2))
    params = jb.init_params(jax.random.key(0), model, dtype=jnp.bfloat16)
    path = jb.save_params(tmp_path / "p.safetensors", params, model)
    loaded, again = jb.load_params(path)
    assert again == model
    chex.assert_trees_all_equal(loaded, params)
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(loaded))
