"""fit_many: K models in one vmapped program, each equal to its own fit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jbackprop as jb


@pytest.fixture(scope="module")
def problem():
    X = jax.random.normal(jax.random.key(0), (90, 5))
    y = jnp.argmax(X[:, :3], axis=1)
    return np.asarray(X), np.asarray(y)


def _model_k(params, k):
    return jax.tree.map(lambda x: x[k], params)


@pytest.mark.slow
def test_each_model_equals_its_own_fit(problem):
    X, y = problem
    model = jb.Model((5, 7, 3), output="softmax", cost="log_likelihood", l2=0.5, dropout=0.2)
    keys = jax.random.split(jax.random.key(3), 2)
    etas, lmbdas, dropouts = [0.1, 0.5], [0.0, 2.0], [0.4, 0.2]
    stacked, histories = jb.fit_many(
        keys,
        model,
        (X, y),
        2,
        16,
        eta=etas,
        lmbda=lmbdas,
        dropout=dropouts,
        validation=(X, y),
        shared_shuffle=False,
    )
    assert jax.tree.leaves(stacked)[0].shape[0] == 2
    # fit with inject_hyperparams(sgd), as documented: the learning rate lives in the
    # optimizer's state, so both fits run one compiled epoch, each from its own rate's state.
    sgd = optax.inject_hyperparams(optax.sgd)
    for k in range(2):
        one = jb.Model(
            (5, 7, 3), output="softmax", cost="log_likelihood", l2=lmbdas[k], dropout=dropouts[k]
        )
        init_key, train_key = jax.random.split(keys[k])
        params = jb.init_params(init_key, one)
        start = jb.TrainState(params, sgd(learning_rate=etas[k]).init(params), 0)
        params, history = jb.fit(
            params, one, (X, y), sgd(learning_rate=0.1), 2, 16, train_key, (X, y), resume=start
        )
        chex_close = jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
            _model_k(stacked, k),
            params,
        )
        del chex_close
        assert histories[k][-1]["epoch"] == history[-1]["epoch"] == 2
        assert histories[k][-1]["val_accuracy"] == pytest.approx(history[-1]["val_accuracy"])
        assert histories[k][-1]["train_cost"] == pytest.approx(history[-1]["train_cost"], 1e-5)


@pytest.mark.slow
def test_models_differ_by_seed_and_share_one_value(problem):
    X, y = problem
    model = jb.Model((5, 4, 3))
    params, _ = jb.fit_many(
        jax.random.split(jax.random.key(0), 2), model, (X, y), 1, 10, eta=0.5, optimizer=optax.adam
    )
    a, b = _model_k(params, 0), _model_k(params, 1)
    assert not np.allclose(a[0]["w"], b[0]["w"])


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"eta": [0.1, 0.2, 0.3]}, "eta must be a number or 2"),
        ({"eta": 0.0}, "eta values must be > 0"),
        ({"eta": 0.1, "dropout": [0.1, 1.0]}, "dropout values must be >= 0.0 and < 1.0"),
        ({"eta": 0.1, "lmbda": -1.0}, "lmbda values must be >= 0.0"),
        ({"eta": 0.1, "n": 0}, "n must be a positive training-set size, got 0"),
    ],
)
def test_bad_hyperparameters_are_refused(problem, kwargs, message):
    X, y = problem
    with pytest.raises(ValueError, match=message):
        jb.fit_many(
            jax.random.split(jax.random.key(0), 2), jb.Model((5, 4, 3)), (X, y), 1, 10, **kwargs
        )


@pytest.mark.slow
def test_private_gradient_plugs_into_fit(problem):
    X, y = problem
    model = jb.Model((5, 4, 3))
    params = jb.init_params(jax.random.key(0), model)
    clipped = jb.privacy.DPGradient(clip=1e6, noise_multiplier=0.0)
    a, _ = jb.fit(params, model, (X, y), optax.sgd(0.5), 2, 10, jax.random.key(1), gradient=clipped)
    b, _ = jb.fit(params, model, (X, y), optax.sgd(0.5), 2, 10, jax.random.key(1))
    # A clip no example reaches and no noise: exactly plain SGD.
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6), a, b)
    noisy = jb.privacy.DPGradient(clip=0.1, noise_multiplier=1.0)
    c, _ = jb.fit(params, model, (X, y), optax.sgd(0.5), 2, 10, jax.random.key(1), gradient=noisy)
    assert not np.allclose(c[0]["w"], b[0]["w"])
    with pytest.raises(ValueError, match="clip"):
        jb.privacy.DPGradient(clip=0.0)
