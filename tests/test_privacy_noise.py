"""jbackprop.noise.normal: a standard Gaussian, independent across coordinates, streams and
keys, deterministic in its key. Fixed keys, so every statistic below is one fixed number;
the bounds are several standard errors wide (chance of a false alarm for a fresh key
below 1e-4 each)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jbackprop import noise

N = 1 << 20  # draws per sample: standard errors 1e-3 (mean), 1.4e-3 (variance)

# compiled once per shape and dtype: the eager draw dispatches each of its ops separately
draw = jax.jit(noise.normal, static_argnums=(1, 2), static_argnames="stream")


@pytest.fixture(scope="module")
def z() -> np.ndarray:
    return np.asarray(draw(jax.random.key(0), (N,)), np.float64)


def _normal_cdf(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def test_moments(z):
    assert abs(z.mean()) < 5e-3
    assert abs(z.var() - 1) < 7e-3
    assert abs(np.mean(z**3)) < 0.02  # skewness 0, s.e. sqrt(15/N)
    assert abs(np.mean(z**4) - 3) < 0.05  # kurtosis 3, s.e. sqrt(96/N)


def test_kolmogorov_smirnov_against_n01(z):
    s = np.sort(z)
    cdf = _normal_cdf(s)
    i = np.arange(1, N + 1)
    d = max(np.max(i / N - cdf), np.max(cdf - (i - 1) / N))
    assert d * math.sqrt(N) < 1.95  # the 0.1% critical value of the KS statistic


def test_tails_match_the_gaussian_and_stop_at_the_documented_radius(z):
    for t in (2.0, 3.0, 4.0):
        p = 2 * (1 - _normal_cdf(np.array([t]))[0])
        want, se = N * p, math.sqrt(N * p)
        assert abs(np.sum(np.abs(z) > t) - want) < 5 * se
    assert np.abs(z).max() < math.sqrt(66 * math.log(2)) + 1e-4  # sqrt(-2 ln 2⁻³³)


def test_coordinates_are_independent(z):
    """Neighbours, the two members of a pair (entries j and N/2 + j) and their squares
    are uncorrelated: correlations within 5 standard errors (1/sqrt(N/2))."""
    bound = 5 / math.sqrt(N / 2)
    first, second = z[: N // 2], z[N // 2 :]
    for a, b in ((z[:-1], z[1:]), (first, second), (first**2, second**2), (first[:-1], first[1:])):
        assert abs(np.corrcoef(a, b)[0, 1]) < bound


def test_streams_and_keys_are_independent():
    k = jax.random.key(1)
    draws = [
        draw(k, (1 << 16,), stream=0),
        draw(k, (1 << 16,), stream=1),
        draw(jax.random.key(2), (1 << 16,)),
    ]
    draws = [np.asarray(d, np.float64) for d in draws]
    bound = 5 / math.sqrt(1 << 16)
    for a, b in ((0, 1), (0, 2), (1, 2)):
        assert abs(np.corrcoef(draws[a], draws[b])[0, 1]) < bound
        assert abs(np.corrcoef(draws[a] ** 2, draws[b] ** 2)[0, 1]) < bound


def test_successive_steps_draw_independent_noise():
    """As DPGradient keys its steps: fold_in(key, step), split, the second half."""
    step = jax.jit(lambda s: noise.normal(jax.random.split(jax.random.fold_in(key, s))[1], (4096,)))
    key = jax.random.key(3)
    steps = [np.asarray(step(s)) for s in range(64)]
    c = np.corrcoef(np.stack(steps))
    off = c[~np.eye(64, dtype=bool)]
    assert np.max(np.abs(off)) < 5.5 / math.sqrt(4096)
    assert abs(off.mean()) < 5 / math.sqrt(4096 * off.size / 2)


def test_deterministic_shaped_and_cast():
    k = jax.random.key(4)
    a = draw(k, (7, 3))
    assert a.shape == (7, 3) and a.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(a), np.asarray(draw(k, (7, 3))))
    # a raw uint32[2] key is the same threefry key
    np.testing.assert_array_equal(np.asarray(a), np.asarray(draw(jax.random.key_data(k), (7, 3))))
    # an odd size is the first entries of the next even size's draw
    np.testing.assert_array_equal(np.asarray(a).ravel(), np.asarray(draw(k, (22,)))[:21])
    with jax.enable_x64(True):
        b = draw(k, (7, 3), jnp.float64)
        assert b.dtype == jnp.float64
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a, np.float64))
    assert draw(k, (0,)).shape == (0,)
    rbg = jax.random.key(4, impl="rbg")  # other key implementations draw their own bits
    assert np.all(np.isfinite(np.asarray(draw(rbg, (6,)))))


def test_the_hash_is_jax_threefry_bit_for_bit():
    """``noise.threefry2x32`` (written out and kept apart on CPUs) is JAX's own hash."""
    from jax.extend.random import threefry2x32_p

    rng = np.random.default_rng(0)
    k0, k1 = (jnp.uint32(w) for w in rng.integers(0, 2**32, 2, dtype=np.uint64))
    words = rng.integers(0, 2**32, (2, 3, 5), dtype=np.uint64)
    x0, x1 = jnp.asarray(words[0], jnp.uint32), jnp.asarray(words[1], jnp.uint32)
    want = threefry2x32_p.bind(k0, k1, x0, x1)
    for got in (noise.threefry2x32(k0, k1, x0, x1), jax.jit(noise.threefry2x32)(k0, k1, x0, x1)):
        for g, w in zip(got, want, strict=True):
            assert g.dtype == jnp.uint32 and g.shape == (3, 5)
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    # vmapped over keys (the conditional then runs as a select of its two equal branches)
    keys = jnp.asarray(rng.integers(0, 2**32, (4, 2), dtype=np.uint64), jnp.uint32)
    hash_rows = jax.vmap(lambda k, f: f(k[0], k[1], x0, x1), in_axes=(0, None))
    for g, w in zip(
        hash_rows(keys, noise.threefry2x32),
        hash_rows(keys, lambda *a: tuple(threefry2x32_p.bind(*a))),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    # the key (0, 0) and the counters 0 and 2^32 - 1, which a wrong rotation or
    # key-schedule step would get wrong
    edge = jnp.asarray([0, 2**32 - 1], jnp.uint32)
    zero = jnp.uint32(0)
    for g, w in zip(
        noise.threefry2x32(zero, zero, edge, edge[::-1]),
        threefry2x32_p.bind(zero, zero, edge, edge[::-1]),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
