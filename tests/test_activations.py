"""Tests for jbackprop.activations: f, f' (lecture section 1), lookup, equality, softmax."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jbackprop import activations as A

# Points away from 0, where relu and leaky_relu are differentiable.
POINTS = jnp.array([-7.5, -3.0, -1.0, -0.25, -1e-3, 1e-3, 0.3, 1.0, 2.5, 8.0])

ELEMENTWISE = [A.sigmoid, A.tanh, A.relu, A.softplus, A.identity, A.leaky_relu(), A.leaky_relu(0.2)]


@pytest.mark.parametrize("act", ELEMENTWISE, ids=lambda a: a.spec)
def test_prime_matches_autodiff_of_fn(act):
    autodiff = jax.vmap(jax.grad(act.fn))(POINTS)
    np.testing.assert_allclose(act.prime(POINTS), autodiff, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("act", ELEMENTWISE, ids=lambda a: a.spec)
def test_backward_is_g_times_prime(act):
    g = jnp.linspace(-2.0, 2.0, POINTS.size)
    np.testing.assert_allclose(act.backward(POINTS, g), g * act.prime(POINTS), rtol=1e-6)


def test_values_from_the_table():
    z = jnp.array([-2.0, 0.0, 3.0])
    np.testing.assert_allclose(A.sigmoid(z), 1 / (1 + np.exp([2.0, 0.0, -3.0])), rtol=1e-6)
    np.testing.assert_allclose(A.relu(z), [0.0, 0.0, 3.0])
    np.testing.assert_allclose(A.leaky_relu(0.2)(z), [-0.4, 0.0, 3.0], rtol=1e-6)
    np.testing.assert_allclose(A.softplus(z), np.log1p(np.exp([-2.0, 0.0, 3.0])), rtol=1e-6)
    # 1 - tanh² doubles tanh's rounding error (a few float32 ulps of 0.96 on GPU).
    np.testing.assert_allclose(A.tanh.prime(z), 1 - np.tanh([-2.0, 0.0, 3.0]) ** 2, atol=5e-7)
    np.testing.assert_allclose(A.identity(z), z)


def test_relu_prime_at_zero_is_zero_like_autodiff():
    """Documented choice: relu'(0) = 0, the subgradient jax.nn.relu's autodiff uses too."""
    assert float(A.relu.prime(jnp.array(0.0))) == 0.0
    assert float(jax.grad(A.relu.fn)(0.0)) == 0.0


def test_leaky_relu_prime_at_zero_is_the_slope():
    assert float(A.leaky_relu(0.2).prime(jnp.array(0.0))) == pytest.approx(0.2)


def test_softplus_does_not_overflow():
    assert float(A.softplus(jnp.float32(1000.0))) == pytest.approx(1000.0)
    assert float(A.softplus(jnp.float32(-1000.0))) == 0.0
    assert float(A.softplus.prime(jnp.float32(1000.0))) == 1.0


def test_sigmoid_exact_in_both_tails():
    z = jnp.array([-1000.0, 1000.0], jnp.float32)
    np.testing.assert_array_equal(A.sigmoid(z), [0.0, 1.0])
    primes = A.sigmoid.prime(z)
    assert np.all(np.isfinite(primes))
    np.testing.assert_array_equal(primes, [0.0, 0.0])
    # Far tails keep full relative precision: sigma(-30) ~ e^-30, and the derivative there
    # is not lost to 1 - sigma(30) rounding to 0 in float32.
    z = jnp.array([-30.0, 30.0], jnp.float32)
    np.testing.assert_allclose(A.sigmoid(z)[0], np.exp(-30.0), rtol=1e-5)
    np.testing.assert_allclose(A.sigmoid.prime(z), [np.exp(-30.0)] * 2, rtol=1e-5)


def test_get_parses_leaky_relu_spec():
    assert A.get("leaky_relu(0.2)") == A.leaky_relu(0.2)
    assert A.get(" leaky_relu( 0.2 ) ") == A.leaky_relu(0.2)
    assert A.get("leaky_relu") == A.leaky_relu(0.01)
    assert A.get("leaky_relu(0.2)") != A.leaky_relu(0.3)
    assert A.get(A.leaky_relu(0.2).spec) == A.leaky_relu(0.2)
    got = A.get("leaky_relu(0.2)")
    np.testing.assert_allclose(got(jnp.array([-1.0, 2.0])), [-0.2, 2.0], rtol=1e-6)


def test_equality_and_hash_ignore_function_identity():
    a, b = A.leaky_relu(0.2), A.leaky_relu(0.2)
    assert a.fn is not b.fn
    assert a == b and hash(a) == hash(b)
    assert len({a, b, A.leaky_relu(0.3), A.relu}) == 3
    assert A.get("sigmoid") is A.sigmoid and A.sigmoid != A.tanh


def test_names_and_lookup():
    assert set(A.names()) == {
        "sigmoid",
        "tanh",
        "relu",
        "softplus",
        "identity",
        "softmax",
        "leaky_relu",
    }
    for name in A.names():
        assert A.get(name).name == name


@pytest.mark.parametrize("spec", ["swish", "Sigmoid", "leaky_relu(x)", ""])
def test_get_unknown_name(spec):
    with pytest.raises(ValueError, match="activation"):
        A.get(spec)


@pytest.mark.parametrize("slope", [-0.1, 1.5])
def test_leaky_relu_slope_range(slope):
    with pytest.raises(ValueError, match=r"slope must be in \[0, 1\]"):
        A.leaky_relu(slope)
    with pytest.raises(ValueError, match=r"bad activation 'leaky_relu\("):
        A.get(f"leaky_relu({slope})")


def test_get_refuses_non_string():
    with pytest.raises(ValueError, match="must be a name or"):
        A.get(3)


def test_softmax_is_not_elementwise_and_backward_is_a_vjp():
    assert not A.softmax.elementwise and A.softmax.prime is None
    assert A.sigmoid.elementwise
    z = jnp.array([[0.5, -1.0, 2.0], [3.0, 0.0, -2.0]])
    g = jnp.array([[1.0, -2.0, 0.5], [0.0, 1.0, 3.0]])
    _, vjp = jax.vjp(A.softmax.fn, z)
    np.testing.assert_allclose(A.softmax.backward(z, g), vjp(g)[0], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(jnp.sum(A.softmax(z), axis=-1), [1.0, 1.0], rtol=1e-6)


def test_repr_and_spec():
    assert A.leaky_relu(0.2).spec == "leaky_relu(0.2)"
    assert repr(A.relu) == "Activation('relu')"
