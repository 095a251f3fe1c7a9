"""jbackprop gradients driving Optax optimisers: eqs 15-16 for SGD, and Adam lowering a cost."""

from __future__ import annotations

from functools import partial

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jbackprop as jb

TOL = {"rtol": 1e-6, "atol": 1e-7}


def numpy_params(model: jb.Model, seed: int = 0):
    rng = np.random.default_rng(seed)
    return tuple(
        {
            "w": jnp.asarray(rng.normal(size=(o, i)) / np.sqrt(i), jnp.float32),
            "b": jnp.asarray(rng.normal(size=o), jnp.float32),
        }
        for i, o in zip(model.sizes[:-1], model.sizes[1:], strict=True)
    )


def sgd_step(params, grads, eta):
    optimizer = optax.sgd(eta)
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    return optax.apply_updates(params, updates)


def test_sgd_step_is_weight_decay_by_hand():
    """Eqs 15 and 16 with numbers: η = 0.5, λ = 3, n = 10, so 1 - ηλ/n = 0.85.

    Network 2 -> 2 -> 1 (relu hidden, identity output, quadratic cost),
    W¹ = [[0.5, -1], [1, 0.5]], b¹ = (0.5, -1), W² = [[2, -1]], b² = 0.5, minibatch
    x = (1, 2), x' = (0, 0), both with y = 1. By eqs 6-10 (see test_network):
        ∂C_0/∂W¹ = [[0, 0], [0.75, 1.5]], ∂C_0/∂b¹ = (0.5, 0.75)
        ∂C_0/∂W² = [[0.125, -0.75]],      ∂C_0/∂b² = -0.5
    eq 15: W¹ := 0.85 W¹ - 0.5 ∂C_0/∂W¹ = [[0.425, -0.85], [0.85 - 0.375, 0.425 - 0.75]]
           W² := 0.85 W² - 0.5 ∂C_0/∂W² = [[1.7 - 0.0625, -0.85 + 0.375]]
    eq 16: b¹ := b¹ - 0.5 ∂C_0/∂b¹ = (0.25, -1.375);  b² := 0.5 + 0.25 = 0.75
    """
    model = jb.Model((2, 2, 1), hidden="relu", output="identity", cost="quadratic", l2=3.0)
    params = (
        {"w": jnp.array([[0.5, -1.0], [1.0, 0.5]]), "b": jnp.array([0.5, -1.0])},
        {"w": jnp.array([[2.0, -1.0]]), "b": jnp.array([0.5])},
    )
    X = jnp.array([[1.0, 2.0], [0.0, 0.0]])
    Y = jnp.array([[1.0], [1.0]])
    new = sgd_step(params, jb.grad(params, X, Y, model, n=10), eta=0.5)
    want = (
        {"w": jnp.array([[0.425, -0.85], [0.475, -0.325]]), "b": jnp.array([0.25, -1.375])},
        {"w": jnp.array([[1.6375, -0.475]]), "b": jnp.array([0.75])},
    )
    chex.assert_trees_all_close(new, want, **TOL)


@partial(jax.jit, static_argnames=("model", "eta"))
def sgd_against_eq15(params, X, Y, model, n, eta):
    unregularised = jb.Model(model.sizes, model.hidden, model.output, model.cost)
    g0 = jb.grad(params, X, Y, unregularised)
    new = sgd_step(params, jb.grad(params, X, Y, model, n=n), eta)
    decay = 1.0 - eta * model.l2 / n
    eq15_16 = tuple(
        {"w": decay * p["w"] - eta * g["w"], "b": p["b"] - eta * g["b"]}
        for p, g in zip(params, g0, strict=True)
    )
    return new, eq15_16


def test_sgd_step_is_weight_decay_random_network():
    model = jb.Model((3, 4, 2), hidden="tanh", output="sigmoid", cost="cross_entropy", l2=2.0)
    params = numpy_params(model)
    rng = np.random.default_rng(1)
    X = jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)
    Y = jnp.asarray(rng.uniform(size=(5, 2)), jnp.float32)
    new, eq15_16 = sgd_against_eq15(params, X, Y, model, 50, eta=0.3)
    chex.assert_trees_all_close(new, eq15_16, rtol=1e-6, atol=1e-6)
    # The step moved every parameter (eq 16 for biases: no decay, only the gradient).
    assert all(
        not np.allclose(a, b)
        for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(params), strict=True)
    )


@partial(jax.jit, static_argnames=("model", "steps"))
def adam_training(params, X, Y, model, n, steps):
    optimizer = optax.adam(0.05)

    def step(carry, _):
        params, state = carry
        cost, grads = jb.value_and_grad(params, X, Y, model, n=n)
        updates, state = optimizer.update(grads, state, params)
        return (optax.apply_updates(params, updates), state), cost

    (params, _), costs = jax.lax.scan(step, (params, optimizer.init(params)), None, steps)
    return params, costs, jb.cost(params, X, Y, model, n=n)


def test_adam_fed_by_grad_lowers_the_cost():
    model = jb.Model((4, 8, 3), hidden="relu", output="softmax", cost="log_likelihood", l2=0.1)
    params = numpy_params(model, seed=2)
    rng = np.random.default_rng(3)
    X = rng.normal(size=(32, 4))
    labels = np.argmax(X[:, :3] + 0.5 * X[:, 3:], axis=1)  # a learnable rule
    X = jnp.asarray(X, jnp.float32)
    _, costs, final = adam_training(params, X, jnp.asarray(labels), model, 32, steps=50)
    costs = np.asarray(costs)
    assert np.all(np.isfinite(costs))
    assert float(final) < 0.5 * float(costs[0])
    assert np.mean(costs[-10:]) < np.mean(costs[:10])
