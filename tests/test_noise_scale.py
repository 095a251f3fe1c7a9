"""noise_scale: B_simple from one backward pass per chunk, against stored per-example grads."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbackprop as jb


@pytest.mark.slow
def test_noise_scale_matches_stored_per_example_gradients():
    with jax.enable_x64(True):
        model = jb.Model((5, 6, 3), hidden="tanh", output="softmax", cost="log_likelihood", l2=0.7)
        params = jb.init_params(jax.random.key(0), model, dtype=jnp.float64)
        X = jax.random.normal(jax.random.key(1), (23, 5), jnp.float64)
        y = jax.random.randint(jax.random.key(2), (23,), 0, 3)
        s = jb.noise_scale(params, X, y, model, n=2, chunk_size=10)  # uneven last chunk

        G = jb.per_example_grads(params, X, y, model)
        flat = jnp.concatenate([g.reshape(23, -1) for g in jax.tree.leaves(G)], axis=1)
        trace = float(jnp.sum(jnp.var(flat, axis=0, ddof=1)))
        full = jb.grad(params, X, y, model, n=2)  # the regulariser shifts G, not Σ
        g2 = sum(float(jnp.sum(g**2)) for g in jax.tree.leaves(full)) - trace / 23
        assert s.trace == pytest.approx(trace, rel=1e-10)
        assert s.grad_sq_norm == pytest.approx(g2, rel=1e-10)
        assert g2 > 0 and s.b_simple == pytest.approx(trace / g2, rel=1e-10)
        norms = np.linalg.norm(np.asarray(flat), axis=1)
        assert s.median_norm == pytest.approx(float(np.median(norms)), rel=1e-10)


def test_noise_scale_needs_two_examples_and_n():
    model = jb.Model((2, 2), l2=1.0)
    params = jb.init_params(jax.random.key(0), model)
    with pytest.raises(ValueError, match="at least 2 examples"):
        jb.noise_scale(params, np.ones((1, 2)), np.array([0]), model, n=5)
    with pytest.raises(ValueError, match=r"n \(the training-set size"):
        jb.noise_scale(params, np.ones((3, 2)), np.array([0, 1, 0]), model)


def test_noise_scale_chunk_size_must_be_positive():
    model = jb.Model((2, 2))
    params = jb.init_params(jax.random.key(0), model)
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        jb.noise_scale(params, np.ones((3, 2)), np.array([0, 1, 0]), model, chunk_size=0)
