"""DP-SGD gradients: jb.clipped_grad against optax's aggregate over jb.per_example_grads."""

from __future__ import annotations

import itertools
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jbackprop as jb
from jbackprop.regularizers import penalty_grad

M = 6  # minibatch size

MODELS = {
    "sigmoid-2": jb.Model(sizes=(4, 5, 3)),
    "relu-softmax-3-dropout-l2-l1": jb.Model(
        sizes=(4, 6, 5, 3),
        hidden="relu",
        output="softmax",
        cost="log_likelihood",
        l2=0.5,
        l1=0.1,
        dropout=0.3,
    ),
    "tanh-identity-1": jb.Model(sizes=(3, 2), hidden="tanh", output="identity", cost="quadratic"),
}


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def _problem(model: jb.Model, dtype, seed: int = 0, m: int = M):
    """Params (scaled init), inputs and targets drawn with NumPy: no compiles for the data."""
    rng = np.random.default_rng(seed)
    sizes = model.sizes
    params = tuple(
        {
            "w": jnp.asarray((rng.normal(size=(n_out, n_in)) / np.sqrt(n_in)).astype(dtype)),
            "b": jnp.asarray(rng.normal(size=n_out).astype(dtype)),
        }
        for n_in, n_out in itertools.pairwise(sizes)
    )
    X = jnp.asarray(rng.normal(size=(m, sizes[0])).astype(dtype))
    if model.output.name == "softmax":
        Y = jnp.asarray(rng.integers(0, sizes[-1], size=m))
    else:
        Y = jnp.asarray(rng.uniform(size=(m, sizes[-1])).astype(dtype))
    key = jax.random.key(seed + 1) if model.dropout else None
    n = 100 if (model.l1 or model.l2) else None
    return params, X, Y, key, n


@jax.jit
def _optax_aggregate(params, per_example, clip, sigma, key):
    tx = optax.contrib.differentially_private_aggregate(
        l2_norm_clip=clip, noise_multiplier=sigma, key=key
    )
    updates, _ = tx.update(per_example, tx.init(params))
    return updates


def _reference(params, X, Y, model, n, key, clip, sigma=0.0, noise_key=None):
    """optax's aggregate of jb.per_example_grads, then the regulariser's gradient."""
    pe = jb.per_example_grads(params, X, Y, model, key=key)
    noise_key = jax.random.key(0) if noise_key is None else noise_key
    return _add_penalty(_optax_aggregate(params, pe, clip, sigma, noise_key), params, model, n), pe


@partial(jax.jit, static_argnames="model")
def _add_penalty(agg, params, model, n):
    out = []
    for g, p in zip(agg, params, strict=True):
        extra = penalty_grad(p["w"], model.l2, model.l1, 1.0 if n is None else n)
        out.append({"w": g["w"] + extra, "b": g["b"]})
    return tuple(out)


def _pe_norms(pe) -> np.ndarray:
    return np.sqrt(
        sum(np.sum(np.asarray(l) ** 2, axis=tuple(range(1, l.ndim))) for l in jax.tree.leaves(pe))
    )


def _assert_trees_close(a, b, rtol, atol):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.shape == y.shape and x.dtype == y.dtype
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


# --- noise off: the clipped mean -----------------------------------------------------


@pytest.mark.parametrize("regime", ["some", "all", "none"])
@pytest.mark.parametrize("name", list(MODELS))
def test_matches_optax_aggregate_without_noise(x64, name, regime):
    model = MODELS[name]
    params, X, Y, key, n = _problem(model, jnp.float64)
    norms = np.asarray(jb.per_example_norms(params, X, Y, model, key=key))
    clip = {"some": float(np.median(norms)), "all": 1e-3 * norms.min(), "none": 1e3 * norms.max()}
    clip = clip[regime]

    got = jb.clipped_grad(params, X, Y, model, n, key, clip=clip, noise_multiplier=0.0)
    want, pe = _reference(params, X, Y, model, n, key, clip)
    _assert_trees_close(got, want, rtol=1e-11, atol=1e-13)

    # the norms from ‖δ‖·‖a‖ are those of the stored per-example gradients
    np.testing.assert_allclose(norms, _pe_norms(pe), rtol=1e-12)
    clipped = norms > clip
    if regime == "all":
        assert clipped.all()
    elif regime == "none":
        assert not clipped.any()
        # nothing clipped: the plain minibatch gradient
        _assert_trees_close(got, jb.grad(params, X, Y, model, n, key), rtol=1e-11, atol=1e-13)
    else:
        assert 0 < clipped.sum() < M


def test_matches_optax_aggregate_float32():
    model = MODELS["relu-softmax-3-dropout-l2-l1"]
    params, X, Y, key, n = _problem(model, jnp.float32, seed=3)
    norms = np.asarray(jb.per_example_norms(params, X, Y, model, key=key))
    assert norms.dtype == np.float32 and norms.shape == (M,)
    clip = float(np.median(norms))
    got = jb.clipped_grad(params, X, Y, model, n, key, clip=clip, noise_multiplier=0.0)
    want, pe = _reference(params, X, Y, model, n, key, clip)
    _assert_trees_close(got, want, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(norms, _pe_norms(pe), rtol=1e-5)


def test_clipped_mean_norm_is_at_most_clip(x64):
    model = MODELS["sigmoid-2"]
    params, X, Y, key, n = _problem(model, jnp.float64, seed=5)
    clip = 1e-4
    g = jb.clipped_grad(params, X, Y, model, n, key, clip=clip, noise_multiplier=0.0)
    total = np.linalg.norm(_flat(g))
    assert total <= clip * (1 + 1e-12)


# --- noise on -------------------------------------------------------------------------


def test_noise_matches_optax_draw_for_draw(x64):
    model = MODELS["relu-softmax-3-dropout-l2-l1"]
    params, X, Y, key, n = _problem(model, jnp.float64, seed=7)
    nk = jax.random.key(42)
    got = jb.clipped_grad(params, X, Y, model, n, key, clip=0.7, noise_multiplier=1.3, noise_key=nk)
    want, _ = _reference(params, X, Y, model, n, key, 0.7, sigma=1.3, noise_key=nk)
    _assert_trees_close(got, want, rtol=1e-11, atol=1e-13)


def _flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(l)) for l in jax.tree.leaves(tree)])


def test_noise_scale_matches_optax():
    """One draw on a 100x64 layer: per-coordinate noise std ≈ σC/m, as optax's."""
    model = jb.Model(sizes=(100, 64, 3))
    m, clip, sigma = 8, 0.5, 1.5
    params, X, Y, _, _ = _problem(model, jnp.float32, seed=11, m=m)
    kw = {"clip": clip}
    off = jb.clipped_grad(params, X, Y, model, noise_multiplier=0.0, **kw)
    on = jb.clipped_grad(
        params, X, Y, model, noise_multiplier=sigma, noise_key=jax.random.key(1), **kw
    )
    noise = _flat(on) - _flat(off)

    pe = jb.per_example_grads(params, X, Y, model)
    ref_on = _optax_aggregate(params, pe, clip, sigma, jax.random.key(2))
    ref_off = _optax_aggregate(params, pe, clip, 0.0, jax.random.key(2))
    ref_noise = _flat(ref_on) - _flat(ref_off)

    target = sigma * clip / m
    N = noise.size  # 6659 coordinates: the sample std is within ~0.9% (1 s.e.)
    assert N > 6000
    for z in (noise, ref_noise):
        assert abs(z.std() / target - 1) < 0.05
        assert abs(z.mean()) < 5 * target / np.sqrt(N)
    assert abs(noise.std() / ref_noise.std() - 1) < 0.07
    # noise off: our clipped mean is optax's
    np.testing.assert_allclose(_flat(off), _flat(ref_off), rtol=1e-4, atol=1e-7)


def test_noise_key_controls_the_draw():
    model = MODELS["sigmoid-2"]
    params, X, Y, _, _ = _problem(model, jnp.float32, seed=13)
    kw = {"clip": 1.0, "noise_multiplier": 1.0}
    a = _flat(jb.clipped_grad(params, X, Y, model, noise_key=jax.random.key(1), **kw))
    b = _flat(jb.clipped_grad(params, X, Y, model, noise_key=jax.random.key(1), **kw))
    c = _flat(jb.clipped_grad(params, X, Y, model, noise_key=jax.random.key(2), **kw))
    np.testing.assert_array_equal(a, b)
    assert np.all(a != c)
    # noise_multiplier=0 ignores the key: exactly the noiseless result
    z0 = jb.clipped_grad(params, X, Y, model, clip=1.0, noise_multiplier=0.0)
    z1 = jb.clipped_grad(
        params, X, Y, model, clip=1.0, noise_multiplier=0, noise_key=jax.random.key(1)
    )
    np.testing.assert_array_equal(_flat(z0), _flat(z1))


def test_works_under_jit_with_traced_hyperparameters():
    model = MODELS["sigmoid-2"]
    params, X, Y, _, _ = _problem(model, jnp.float32, seed=17)
    nk = jax.random.key(3)

    @jax.jit
    def step(params, clip, sigma):
        return jb.clipped_grad(params, X, Y, model, clip=clip, noise_multiplier=sigma, noise_key=nk)

    eager = jb.clipped_grad(params, X, Y, model, clip=0.3, noise_multiplier=0.8, noise_key=nk)
    np.testing.assert_allclose(_flat(step(params, 0.3, 0.8)), _flat(eager), rtol=1e-6, atol=1e-7)

    # a traced noise_multiplier might be nonzero, so the noise key is required
    with pytest.raises(ValueError, match="noise_key"):
        jax.jit(lambda s: jb.clipped_grad(params, X, Y, model, clip=1.0, noise_multiplier=s))(0.0)


# --- arguments ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"clip": 0.0}, "clip"),
        ({"clip": -1.0}, "clip"),
        ({"clip": float("nan")}, "clip"),
        ({"clip": float("inf")}, "clip"),
        ({"clip": "big"}, "clip"),
        ({"noise_multiplier": -0.5}, "noise_multiplier"),
        ({"noise_multiplier": float("nan")}, "noise_multiplier"),
        ({"noise_multiplier": 1.0, "noise_key": None}, "noise_key"),
    ],
)
def test_bad_arguments(kwargs, match):
    model = MODELS["sigmoid-2"]
    params, X, Y, _, _ = _problem(model, jnp.float32)
    args = {"clip": 1.0, "noise_multiplier": 0.0, **kwargs}
    with pytest.raises(ValueError, match=match):
        jb.clipped_grad(params, X, Y, model, **args)


def test_bad_batch_arguments():
    model = MODELS["relu-softmax-3-dropout-l2-l1"]
    params, X, Y, key, n = _problem(model, jnp.float32)
    kw = {"clip": 1.0, "noise_multiplier": 0.0}
    with pytest.raises(ValueError, match="n "):
        jb.clipped_grad(params, X, Y, model, None, key, **kw)
    with pytest.raises(ValueError, match="key is required"):
        jb.clipped_grad(params, X, Y, model, n, None, **kw)
    with pytest.raises(ValueError, match="X has shape"):
        jb.clipped_grad(params, X[:, :2], Y, model, n, key, **kw)
    with pytest.raises(ValueError, match="key is required"):
        jb.per_example_norms(params, X, Y, model)
