"""Tests for jbackprop.network (and the regularisers it applies): eqs 3, 8-10 and 13 by hand,
initialisation, minibatch averaging and dropout.

The hand-computed networks, written out once:

``net111``: 1 -> 1 -> 1, sigmoid everywhere, x = 2, w¹ = 0.5, b¹ = -1, w² = -1, b² = 0.5:
    z¹ = 0.5·2 - 1 = 0,  a¹ = σ(0) = 0.5,  σ'(z¹) = 0.25
    z² = -1·0.5 + 0.5 = 0,  a² = 0.5,  σ'(z²) = 0.25

``net221``: 2 -> 2 -> 1, relu hidden, identity output, quadratic cost,
    W¹ = [[0.5, -1], [1, 0.5]], b¹ = (0.5, -1), W² = [[2, -1]], b² = 0.5.
    x = (1, 2), y = 1:
        z¹ = (0.5 - 2 + 0.5, 1 + 1 - 1) = (-1, 1),  a¹ = (0, 1),  f'(z¹) = (0, 1)
        z² = 0 - 1 + 0.5 = -0.5 = a²,  C = ½(-0.5 - 1)² = 1.125
    x' = (0, 0), y' = 1:
        z¹ = b¹ = (0.5, -1),  a¹ = (0.5, 0),  f'(z¹) = (1, 0)
        z² = 2·0.5 + 0.5 = 1.5 = a²,  C = ½(1.5 - 1)² = 0.125
"""

from __future__ import annotations

from functools import partial

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbackprop as jb
from jbackprop import regularizers

TOL = {"rtol": 1e-6, "atol": 1e-7}


def net111(cost: str):
    model = jb.Model((1, 1, 1), hidden="sigmoid", output="sigmoid", cost=cost)
    params = (
        {"w": jnp.array([[0.5]]), "b": jnp.array([-1.0])},
        {"w": jnp.array([[-1.0]]), "b": jnp.array([0.5])},
    )
    return model, params


def net221(**regularisers):
    model = jb.Model((2, 2, 1), hidden="relu", output="identity", cost="quadratic", **regularisers)
    params = (
        {"w": jnp.array([[0.5, -1.0], [1.0, 0.5]]), "b": jnp.array([0.5, -1.0])},
        {"w": jnp.array([[2.0, -1.0]]), "b": jnp.array([0.5])},
    )
    return model, params


X2 = jnp.array([[1.0, 2.0], [0.0, 0.0]])  # x and x' of net221
Y2 = jnp.array([[1.0], [1.0]])

# ∂C_x/∂p of net221 for x = (1, 2):
#   eq 6:  δ² = (a² - y)·1 = -1.5
#   eq 8:  δ¹ = (W²ᵀ δ²) ⊙ f'(z¹) = (2·-1.5, -1·-1.5) ⊙ (0, 1) = (0, 1.5)
#   eq 9:  ∂b¹ = (0, 1.5),  ∂b² = -1.5
#   eq 10: ∂W¹ = δ¹ xᵀ = [[0, 0], [1.5, 3]],  ∂W² = δ² a¹ᵀ = [[0, -1.5]]
GRAD_X = (
    {"w": [[0.0, 0.0], [1.5, 3.0]], "b": [0.0, 1.5]},
    {"w": [[0.0, -1.5]], "b": [-1.5]},
)
# and for x' = (0, 0):
#   δ² = 1.5 - 1 = 0.5,  δ¹ = (2·0.5, -1·0.5) ⊙ (1, 0) = (1, 0)
#   ∂b¹ = (1, 0),  ∂b² = 0.5,  ∂W¹ = δ¹ x'ᵀ = 0,  ∂W² = δ² a¹ᵀ = [[0.25, 0]]
GRAD_X_PRIME = (
    {"w": [[0.0, 0.0], [0.0, 0.0]], "b": [1.0, 0.0]},
    {"w": [[0.25, 0.0]], "b": [0.5]},
)
# The minibatch mean of the two (eqs 9-10 averaged):
GRAD_MEAN = (
    {"w": [[0.0, 0.0], [0.75, 1.5]], "b": [0.5, 0.75]},
    {"w": [[0.125, -0.75]], "b": [-0.5]},
)


def as_arrays(tree):
    return jax.tree.map(
        lambda v: jnp.asarray(v, jnp.float32), tree, is_leaf=lambda v: isinstance(v, list)
    )


# ---------------------------------------------------------------- eq 3: forward


def test_forward_by_hand_single_and_batch():
    model, params = net221()
    # a² = -0.5 for x = (1, 2) and 1.5 for x' = (0, 0), computed above.
    np.testing.assert_allclose(jb.forward(params, X2, model), [[-0.5], [1.5]], **TOL)
    np.testing.assert_allclose(jb.forward(params, X2[0], model), [-0.5], **TOL)


# ---------------------------------------------------------------- eqs 6-10 by hand


@pytest.mark.parametrize(
    ("cost", "want"),
    [
        # eq 6 (quadratic): δ² = (a² - y) σ'(z²) = (0.5 - 1)·0.25 = -0.125
        #   eq 8: δ¹ = w² δ² σ'(z¹) = -1·-0.125·0.25 = 0.03125
        #   eq 9: ∂b¹ = 0.03125, ∂b² = -0.125; eq 10: ∂w¹ = x δ¹ = 0.0625, ∂w² = a¹ δ² = -0.0625
        ("quadratic", ((0.0625, 0.03125), (-0.0625, -0.125))),
        # eq 7 (cross-entropy, sigmoid): δ² = a² - y = -0.5
        #   eq 8: δ¹ = -1·-0.5·0.25 = 0.125
        #   eq 9: ∂b¹ = 0.125, ∂b² = -0.5; eq 10: ∂w¹ = 2·0.125 = 0.25, ∂w² = 0.5·-0.5 = -0.25
        ("cross_entropy", ((0.25, 0.125), (-0.25, -0.5))),
    ],
)
def test_eqs_6_to_10_net111_by_hand(cost, want):
    model, params = net111(cost)
    g = jb.backprop(params, jnp.array([2.0]), jnp.array([1.0]), model)
    for layer, (w, b) in zip(g, want, strict=True):
        np.testing.assert_allclose(layer["w"], [[w]], **TOL)
        np.testing.assert_allclose(layer["b"], [b], **TOL)


def test_eqs_8_to_10_net221_by_hand():
    """Eq 8's f'(z) mask and eq 10's orientation (∂W = δ aᵀ, not a δᵀ)."""
    model, params = net221()
    chex.assert_trees_all_close(jb.backprop(params, X2[0], Y2[0], model), as_arrays(GRAD_X), **TOL)
    chex.assert_trees_all_close(
        jb.backprop(params, X2[1], Y2[1], model), as_arrays(GRAD_X_PRIME), **TOL
    )


def test_minibatch_grad_is_the_mean_by_hand():
    model, params = net221()
    chex.assert_trees_all_close(jb.grad(params, X2, Y2, model), as_arrays(GRAD_MEAN), **TOL)
    # C = mean(1.125, 0.125) = 0.625
    np.testing.assert_allclose(jb.cost(params, X2, Y2, model), 0.625, **TOL)
    per_example = jb.per_example_grads(params, X2, Y2, model)
    chex.assert_trees_all_close(
        per_example,
        jax.tree.map(lambda a, b: jnp.stack([a, b]), as_arrays(GRAD_X), as_arrays(GRAD_X_PRIME)),
        **TOL,
    )


# l2 = λ = 3, n = 10 (not the minibatch size 2): ∂C/∂W = ∂C_0/∂W + (λ/n) W = ... + 0.3 W.
#   ∂W¹ = [[0, 0], [0.75, 1.5]] + 0.3·[[0.5, -1], [1, 0.5]] = [[0.15, -0.3], [1.05, 1.65]]
#   ∂W² = [[0.125, -0.75]] + 0.3·[[2, -1]] = [[0.725, -1.05]]
#   biases unchanged: (0.5, 0.75) and -0.5.
# C = C_0 + λ/(2n) Σ w² = 0.625 + 0.15·(0.25 + 1 + 1 + 0.25 + 4 + 1) = 0.625 + 1.125 = 1.75
L2_BY_HAND = (
    {"l2": 3.0},
    ({"w": [[0.15, -0.3], [1.05, 1.65]], "b": [0.5, 0.75]}, {"w": [[0.725, -1.05]], "b": [-0.5]}),
    1.75,
)
# l1 = λ = 2, n = 10: + (λ/n) sign(W) = + 0.2 sign(W)
#   ∂W¹ = [[0 + 0.2, 0 - 0.2], [0.75 + 0.2, 1.5 + 0.2]],  ∂W² = [[0.125 + 0.2, -0.75 - 0.2]]
# C = 0.625 + 0.2·(0.5 + 1 + 1 + 0.5 + 2 + 1) = 0.625 + 1.2 = 1.825
L1_BY_HAND = (
    {"l1": 2.0},
    ({"w": [[0.2, -0.2], [0.95, 1.7]], "b": [0.5, 0.75]}, {"w": [[0.325, -0.95]], "b": [-0.5]}),
    1.825,
)


@pytest.mark.parametrize(("penalty", "want", "cost"), [L2_BY_HAND, L1_BY_HAND], ids=["l2", "l1"])
def test_eqs_11_to_13_penalties_by_hand(penalty, want, cost):
    model, params = net221(**penalty)
    chex.assert_trees_all_close(jb.grad(params, X2, Y2, model, n=10), as_arrays(want), **TOL)
    np.testing.assert_allclose(jb.cost(params, X2, Y2, model, n=10), cost, **TOL)
    c, g = jb.value_and_grad(params, X2, Y2, model, n=10)
    np.testing.assert_allclose(c, cost, **TOL)
    chex.assert_trees_all_close(g, as_arrays(want), **TOL)


def test_l1_gradient_at_zero_is_zero():
    """Documented choice: sign(0) = 0, so L1 leaves an exactly-zero weight at zero."""
    w = jnp.array([[0.0, -2.0, 3.0]])
    np.testing.assert_allclose(regularizers.l1_grad(w, 2.0, 10), [[0.0, -0.2, 0.2]], **TOL)
    np.testing.assert_allclose(regularizers.l2_grad(w, 2.0, 10), [[0.0, -0.4, 0.6]], **TOL)


def test_integer_labels_equal_one_hot():
    model = jb.Model((3, 4), output="softmax", cost="log_likelihood")
    params = numpy_params(model)
    X = jnp.asarray(np.random.default_rng(1).normal(size=(5, 3)), jnp.float32)
    labels = jnp.array([0, 3, 1, 1, 2])
    chex.assert_trees_all_close(
        jb.grad(params, X, labels, model), jb.grad(params, X, jax.nn.one_hot(labels, 4), model)
    )
    chex.assert_trees_all_close(
        jb.backprop(params, X[1], 3, model), jb.backprop(params, X[1], jnp.eye(4)[3], model)
    )


# ---------------------------------------------------------------- init_params


def test_init_params_deterministic_shapes_and_dtype(x64):
    model = jb.Model((3, 5, 2))
    a = jb.init_params(jax.random.key(7), model)
    b = jb.init_params(jax.random.key(7), model)
    c = jb.init_params(jax.random.key(8), model)
    chex.assert_trees_all_equal(a, b)
    assert not np.allclose(a[0]["w"], c[0]["w"])
    assert [(p["w"].shape, p["b"].shape) for p in a] == [((5, 3), (5,)), ((2, 5), (2,))]
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(a))
    d = jb.init_params(jax.random.key(7), model, dtype=jnp.float64)
    assert all(leaf.dtype == jnp.float64 for leaf in jax.tree.leaves(d))


def test_init_params_scheme_scales():
    model = jb.Model((400, 300))
    normal = jb.init_params(jax.random.key(0), model, scheme="normal")[0]["w"]
    scaled = jb.init_params(jax.random.key(0), model, scheme="scaled")[0]["w"]
    # 120 000 draws: the sample std is within ~0.3 % of the true one.
    assert float(jnp.std(normal)) == pytest.approx(1.0, rel=0.02)
    assert float(jnp.std(scaled)) == pytest.approx(1.0 / np.sqrt(400), rel=0.02)
    assert abs(float(jnp.mean(scaled))) < 0.005  # its standard error is ~1.4e-4


# ---------------------------------------------------------------- dropout

DROPOUT = jb.Model(
    (3, 4, 3, 2), hidden="tanh", output="softmax", cost="log_likelihood", dropout=0.5
)


def numpy_params(model: jb.Model, seed: int = 0):
    rng = np.random.default_rng(seed)
    return tuple(
        {
            "w": jnp.asarray(rng.normal(size=(o, i)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=o)),
        }
        for i, o in zip(model.sizes[:-1], model.sizes[1:], strict=True)
    )


# One compilation per (model, m) instead of one per primitive of an eager call.
@partial(jax.jit, static_argnames=("model", "m"))
def dropout_masks(key, model, m):
    if not model.has_dropout:
        return None
    return regularizers.dropout_masks(key, model.widths, model.dropout, m)


@partial(jax.jit, static_argnames="model")
def dropout_outputs(params, X, Y, model, key):
    """Every public function with the same dropout key, in one compilation."""
    keys = jax.random.split(key, X.shape[0])
    return {
        "grad": jb.grad(params, X, Y, model, key=key),
        "autodiff": jax.grad(jb.cost)(params, X, Y, model, key=key),
        "cost": jb.cost(params, X, Y, model, key=key),
        "value_and_grad": jb.value_and_grad(params, X, Y, model, key=key),
        "per_example": jb.per_example_grads(params, X, Y, model, key=key),
        # Example i of a minibatch uses key split(key, m)[i], for backprop as for grad.
        "backprop": [
            jb.backprop(params, X[i], Y[i], model, key=keys[i]) for i in range(X.shape[0])
        ],
    }


@pytest.fixture(scope="module")
def dropout_case():
    params = numpy_params(DROPOUT)
    X = jnp.asarray(np.random.default_rng(1).normal(size=(4, 3)), jnp.float32)
    Y = jnp.array([0, 1, 1, 0])
    return params, X, Y


@pytest.mark.slow
def test_dropout_same_key_same_masks_everywhere(dropout_case):
    params, X, Y = dropout_case
    out = dropout_outputs(params, X, Y, DROPOUT, jax.random.key(42))
    again = dropout_outputs(params, X, Y, DROPOUT, jax.random.key(42))
    chex.assert_trees_all_equal(out, again)
    # The cost with the same key applies the same masks, so its autodiff is jb.grad.
    chex.assert_trees_all_close(out["grad"], out["autodiff"], rtol=1e-5, atol=1e-7)
    mean = jax.tree.map(lambda p: jnp.mean(p, axis=0), out["per_example"])
    chex.assert_trees_all_close(mean, out["grad"], rtol=1e-5, atol=1e-7)
    for i, one in enumerate(out["backprop"]):
        row = jax.tree.map(lambda p, i=i: p[i], out["per_example"])
        chex.assert_trees_all_close(one, row, rtol=1e-5, atol=1e-7)
    c, g = out["value_and_grad"]
    np.testing.assert_allclose(c, out["cost"], rtol=1e-6)
    chex.assert_trees_all_close(g, out["grad"], rtol=1e-6)


def test_dropout_different_keys_differ(dropout_case, max_abs_diff):
    params, X, Y = dropout_case
    one = dropout_outputs(params, X, Y, DROPOUT, jax.random.key(1))
    two = dropout_outputs(params, X, Y, DROPOUT, jax.random.key(2))
    assert max_abs_diff(one["grad"], two["grad"]) > 1e-3
    assert max_abs_diff(one["per_example"], two["per_example"]) > 1e-3
    assert abs(float(one["cost"]) - float(two["cost"])) > 1e-4


def numpy_forward(params, X, masks=None):
    """Eq 3 with tanh hidden layers and a softmax output, in float64 numpy."""
    a = np.asarray(X, np.float64)
    p = [jax.tree.map(lambda v: np.asarray(v, np.float64), layer) for layer in params]
    for l, layer in enumerate(p[:-1]):
        a = np.tanh(a @ layer["w"].T + layer["b"])
        if masks is not None:
            a = a * np.asarray(masks[l])
    return a @ p[-1]["w"].T + p[-1]["b"]


def test_dropout_cost_uses_inverted_masks(dropout_case):
    """The cost with dropout equals a numpy forward pass with masks scaled by 1/(1-p)."""
    params, X, Y = dropout_case
    key = jax.random.key(3)
    masks = dropout_masks(key, DROPOUT, X.shape[0])
    assert [m.shape for m in masks] == [(4, 4), (4, 3)]
    for m in masks:
        assert set(np.unique(np.asarray(m))) <= {0.0, 2.0}  # kept units scaled by 1/(1-0.5)
    z = numpy_forward(params, X, masks)
    log_softmax = z - np.log(np.sum(np.exp(z), axis=1, keepdims=True))
    want = -np.mean(log_softmax[np.arange(4), np.asarray(Y)])
    got = dropout_outputs(params, X, Y, DROPOUT, key)["cost"]
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_dropout_mask_rate_and_single_example_masks():
    model = jb.Model((1, 1000, 1), dropout=0.3)
    masks = dropout_masks(jax.random.key(0), model, 20)
    kept = float(np.mean(np.asarray(masks[0]) > 0))
    assert kept == pytest.approx(0.7, abs=0.01)
    single = dropout_masks(jax.random.key(0), model, None)
    assert single[0].shape == (1000,)
    assert dropout_masks(jax.random.key(0), jb.Model((2, 3)), 5) is None


def test_forward_ignores_dropout(dropout_case):
    """Inference: no masks and no rescaling (inverted dropout scaled during training)."""
    params, X, _ = dropout_case
    z = numpy_forward(params, X)
    want = np.exp(z) / np.sum(np.exp(z), axis=1, keepdims=True)
    np.testing.assert_allclose(jb.forward(params, X, DROPOUT), want, rtol=1e-5)


@pytest.mark.slow
def test_gradients_keep_the_params_container():
    """Params given as a list get list gradients, exactly the structure jax.grad returns."""
    model = jb.Model((3, 4, 2), l2=0.5)
    params = list(jb.init_params(jax.random.key(0), model))
    X, y = np.ones((5, 3), np.float32), np.array([0, 1, 0, 1, 1])
    chex.assert_trees_all_close(
        jb.grad(params, X, y, model, n=10),
        jax.grad(jb.cost)(params, X, y, model, n=10),
        atol=1e-6,
    )
    assert isinstance(jb.value_and_grad(params, X, y, model, n=10)[1], list)
    assert isinstance(jb.per_example_grads(params, X, y, model), list)
    assert isinstance(jb.grad(tuple(params), X, y, model, n=10), tuple)
