"""Tests for jbackprop.costs: per-example costs and the output error δ^L (eqs 6-7).

Hand-computed cases write the numbers out; the remaining tests compare ``delta`` with
autodiff of ``fn`` and check that saturated outputs (|z| ~ 1000) stay finite.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbackprop as jb
from jbackprop import activations as A
from jbackprop import costs as C

LN3 = math.log(3.0)


# ---------------------------------------------------------------- eq 6 by hand


def test_eq6_quadratic_sigmoid_by_hand():
    # z = 0: a = σ(0) = 0.5, σ'(0) = 0.25; y = 1.
    # δ = (a - y) σ'(z) = (0.5 - 1) * 0.25 = -0.125;  C = ½ (0.5 - 1)² = 0.125.
    z, y = jnp.array([0.0]), jnp.array([1.0])
    np.testing.assert_allclose(C.quadratic.delta(z, y, A.sigmoid), [-0.125], rtol=1e-6)
    np.testing.assert_allclose(C.quadratic.fn(z, y, A.sigmoid), 0.125, rtol=1e-6)


def test_eq6_quadratic_identity_by_hand():
    # a = z = (2, -1), y = (0.5, 0.5), f' = 1:  δ = a - y = (1.5, -1.5);
    # C = ½ (1.5² + 1.5²) = 2.25 (the ½ of the contract, not the lecture's form).
    z, y = jnp.array([2.0, -1.0]), jnp.array([0.5, 0.5])
    np.testing.assert_allclose(C.quadratic.delta(z, y, A.identity), [1.5, -1.5], rtol=1e-6)
    np.testing.assert_allclose(C.quadratic.fn(z, y, A.identity), 2.25, rtol=1e-6)


def test_eq6_quadratic_tanh_by_hand():
    # z = ln 3: tanh z = (9 - 1)/(9 + 1) = 0.8, f' = 1 - 0.64 = 0.36; y = 0.
    # δ = (0.8 - 0) * 0.36 = 0.288;  C = ½ 0.8² = 0.32.
    z, y = jnp.array([LN3]), jnp.array([0.0])
    np.testing.assert_allclose(C.quadratic.delta(z, y, A.tanh), [0.288], rtol=1e-5)
    np.testing.assert_allclose(C.quadratic.fn(z, y, A.tanh), 0.32, rtol=1e-5)


# ---------------------------------------------------------------- eq 7 by hand


def test_eq7_cross_entropy_sigmoid_by_hand():
    # z = ln 3: a = 3/4. Hard target y = 1: δ = a - y = -0.25, C = -ln 0.75 = 0.2876821.
    z = jnp.array([LN3])
    np.testing.assert_allclose(
        C.cross_entropy.delta(z, jnp.array([1.0]), A.sigmoid), [-0.25], rtol=1e-6
    )
    np.testing.assert_allclose(
        C.cross_entropy.fn(z, jnp.array([1.0]), A.sigmoid), 0.2876821, rtol=1e-6
    )
    # Soft target y = 0.25: δ = 0.75 - 0.25 = 0.5;
    # C = -(0.25 ln 0.75 + 0.75 ln 0.25) = 0.0719205 + 1.0397208 = 1.1116413.
    np.testing.assert_allclose(
        C.cross_entropy.delta(z, jnp.array([0.25]), A.sigmoid), [0.5], rtol=1e-6
    )
    np.testing.assert_allclose(
        C.cross_entropy.fn(z, jnp.array([0.25]), A.sigmoid), 1.1116413, rtol=1e-6
    )


def test_eq7_log_likelihood_softmax_by_hand():
    # z = (0, ln 3): p = (1/4, 3/4). y = class 0: δ = p - y = (-0.75, 0.75);
    # C = -ln p_0 = ln 4 = 1.3862944.
    z, y = jnp.array([0.0, LN3]), jnp.array([1.0, 0.0])
    np.testing.assert_allclose(
        C.log_likelihood.delta(z, y, A.softmax), [-0.75, 0.75], rtol=1e-6, atol=1e-7
    )
    np.testing.assert_allclose(C.log_likelihood.fn(z, y, A.softmax), 1.3862944, rtol=1e-6)


def test_cross_entropy_softmax_by_hand():
    # Two classes, z = (0, ln 3), p = (1/4, 3/4), y = class 0:
    # C = -[ln p_0 + ln(1 - p_1)] = -2 ln(1/4) = 2.7725887; with two classes C = -2 ln p_0,
    # so δ = 2 (p - y) = (-1.5, 1.5): not eq 7, which holds for sigmoid outputs only.
    z, y = jnp.array([0.0, LN3]), jnp.array([1.0, 0.0])
    np.testing.assert_allclose(C.cross_entropy.fn(z, y, A.softmax), 2.7725887, rtol=1e-6)
    np.testing.assert_allclose(
        C.cross_entropy.delta(z, y, A.softmax), [-1.5, 1.5], rtol=1e-6, atol=1e-6
    )


# ---------------------------------------------------------------- δ^L against autodiff

PAIRINGS = [
    (C.quadratic, A.identity),
    (C.quadratic, A.sigmoid),
    (C.quadratic, A.tanh),
    (C.quadratic, A.relu),
    (C.quadratic, A.softmax),
    (C.cross_entropy, A.sigmoid),
    (C.cross_entropy, A.softmax),
    (C.log_likelihood, A.softmax),
]


@pytest.mark.parametrize(("cost", "f"), PAIRINGS, ids=lambda v: v.name)
def test_delta_is_gradient_of_cost(cost, f, x64):
    rng = np.random.default_rng(0)
    z = jnp.asarray(rng.normal(scale=3.0, size=(4, 5)))
    z = z.at[0].set(jnp.array([30.0, -20.0, 0.5, 12.0, -35.0]))  # far from the origin
    if cost.name == "quadratic":
        y = jnp.asarray(rng.normal(size=(4, 5)))
    else:
        y = jnp.asarray(rng.uniform(size=(4, 5)))  # soft targets, rows not summing to 1

    @jax.jit
    def delta_autodiff_and_costs(z, y):
        autodiff = jax.grad(lambda z: jnp.sum(cost.fn(z, y, f)))(z)
        return cost.delta(z, y, f), autodiff, cost.fn(z, y, f)

    delta, autodiff, per_row = delta_autodiff_and_costs(z, y)
    np.testing.assert_allclose(delta, autodiff, rtol=1e-10, atol=1e-12)
    assert per_row.shape == (4,) and np.all(np.isfinite(per_row))


# ---------------------------------------------------------------- saturated outputs

# One-layer networks 1 -> 2 with w = (1000, -1000)ᵀ, b = 0 and x = 1, so z^L = (1000, -1000).
# For each pairing: (output, cost) -> {label: (C, δ^L)}, by hand:
#   label 1 (the saturated wrong class), y = (0, 1):
#     sigmoid/CE:  a = (1, 0); C = -ln(1 - a_0) - ln a_1 = 1000 + 1000; δ = a - y = (1, -1)
#     softmax/CE:  p = (1, e^-2000); C = -ln(1 - p_0) - ln p_1 = -2 ln p_1 = 4000; δ = 2(p - y)
#     softmax/LL:  C = -ln p_1 = 2000; δ = p - y = (1, -1)
#     identity/Q:  C = ½(1000² + 1001²) = 1001000.5; δ = a - y = (1000, -1001)
#     sigmoid/Q:   C = ½(1 + 1) = 1; δ = (a - y) σ'(±1000) = 0
#     tanh/Q:      a = (1, -1); C = ½(1 + 4) = 2.5; δ = (a - y)(1 - a²) = 0
#     softmax/Q:   C = ½(1 + 1) = 1; δ = p ⊙ (g - p·g) with g = (1, -1), p·g = 1: δ = 0
#   label 0 (the saturated right class), y = (1, 0): every cost 0 and δ = 0, except
#     identity/Q:  C = ½(999² + 1000²) = 999000.5; δ = (999, -1000)
#     tanh/Q:      C = ½(0 + 1) = 0.5; δ = 0
SATURATED = {
    ("sigmoid", "cross_entropy"): {1: (2000.0, [1.0, -1.0]), 0: (0.0, [0.0, 0.0])},
    ("softmax", "cross_entropy"): {1: (4000.0, [2.0, -2.0]), 0: (0.0, [0.0, 0.0])},
    ("softmax", "log_likelihood"): {1: (2000.0, [1.0, -1.0]), 0: (0.0, [0.0, 0.0])},
    ("identity", "quadratic"): {1: (1001000.5, [1000.0, -1001.0]), 0: (999000.5, [999.0, -1000.0])},
    ("sigmoid", "quadratic"): {1: (1.0, [0.0, 0.0]), 0: (0.0, [0.0, 0.0])},
    ("tanh", "quadratic"): {1: (2.5, [0.0, 0.0]), 0: (0.5, [0.0, 0.0])},
    ("softmax", "quadratic"): {1: (1.0, [0.0, 0.0]), 0: (0.0, [0.0, 0.0])},
}


@partial(jax.jit, static_argnames="model")
def _cost_and_grad(params, X, Y, model):
    return jb.cost(params, X, Y, model), jb.grad(params, X, Y, model)


@pytest.mark.parametrize(("output", "cost"), list(SATURATED), ids="-".join)
def test_saturated_outputs_finite_float32(output, cost):
    model = jb.Model((1, 2), output=output, cost=cost)
    params = ({"w": jnp.array([[1000.0], [-1000.0]]), "b": jnp.zeros(2)},)
    X = jnp.ones((1, 1), jnp.float32)
    for label, (want_cost, want_delta) in SATURATED[(output, cost)].items():
        c, g = _cost_and_grad(params, X, jnp.array([label]), model)
        assert c.dtype == jnp.float32 and g[0]["w"].dtype == jnp.float32
        assert np.isfinite(c) and all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(g))
        np.testing.assert_allclose(c, want_cost, rtol=1e-6, atol=1e-6)
        # eq 9: ∂C/∂b = δ; eq 10 with a^0 = x = 1: ∂C/∂w = δ.
        np.testing.assert_allclose(g[0]["b"], want_delta, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(g[0]["w"][:, 0], want_delta, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- lookup and pairings


def test_get_and_names():
    assert C.names() == ("quadratic", "cross_entropy", "log_likelihood")
    for name in C.names():
        assert C.get(name).name == name
    assert C.get(C.quadratic) is C.quadratic
    assert C.quadratic == C.get("quadratic") and hash(C.quadratic) == hash(C.get("quadratic"))
    assert repr(C.log_likelihood) == "Cost('log_likelihood')"


@pytest.mark.parametrize("name", ["mse", "CrossEntropy", "nll"])
def test_get_unknown_cost(name):
    with pytest.raises(ValueError, match=f"unknown cost '{name}'"):
        C.get(name)


@pytest.mark.parametrize("f", [A.identity, A.relu, A.tanh, A.softplus, A.leaky_relu(0.2)])
def test_cross_entropy_refuses_outputs_outside_unit_interval(f):
    with pytest.raises(ValueError, match="cross_entropy' needs outputs in"):
        C.cross_entropy.check(f)


@pytest.mark.parametrize("f", [A.sigmoid, A.identity, A.tanh])
def test_log_likelihood_refuses_non_softmax(f):
    with pytest.raises(ValueError, match="log_likelihood' needs a 'softmax' output"):
        C.log_likelihood.check(f)


def test_valid_pairings_pass_check():
    for cost, f in PAIRINGS:
        cost.check(f)
