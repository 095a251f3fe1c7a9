"""fit(..., sampling="poisson"): the sample each step draws, the steps per epoch, and
gradients that equal an explicit computation on the drawn examples (padding adds nothing)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jbackprop as jb
from jbackprop import training

MODEL = jb.Model(sizes=(3, 5, 2), hidden="tanh", output="softmax", cost="log_likelihood", l2=0.4)
N, B, ETA = 13, 5, 0.3  # q = 5/13, round(13/5) = 3 steps per epoch


@pytest.fixture
def problem():
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        X = rng.normal(size=(N, 3))
        y = rng.integers(0, 2, N)
        params = jb.init_params(jax.random.key(1), MODEL, dtype=jnp.float64)
        yield params, X, y


def _samples(key, epoch: int) -> list[np.ndarray]:
    """The examples each step of ``epoch`` draws, as fit draws them: the epoch key
    ``fold_in(key, epoch)`` is split into one key per step, whose first third samples."""
    _, steps = jb.privacy.poisson_schedule(N, B)
    step_keys = jax.random.split(jax.random.fold_in(key, epoch), steps)
    return [np.asarray(training.poisson_sample(jax.random.split(k, 3)[0], N, B)) for k in step_keys]


def _finish_keys(key, epoch: int) -> list:
    _, steps = jb.privacy.poisson_schedule(N, B)
    step_keys = jax.random.split(jax.random.fold_in(key, epoch), steps)
    return [jax.random.split(k, 3)[2] for k in step_keys]


def _manual(params, X, y, key, epochs, grad_of_sample):
    """Plain SGD over the drawn samples, one step per sample."""
    for epoch in range(1, epochs + 1):
        for drawn, k in zip(_samples(key, epoch), _finish_keys(key, epoch), strict=True):
            assert drawn.any()  # these keys draw no empty sample, which jb.grad would refuse
            g = grad_of_sample(params, X[drawn], y[drawn], k)
            params = jax.tree.map(lambda p, d: p - ETA * d, params, g)
    return params


def _assert_close(a, b, tol=1e-12):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=tol, atol=tol)


@pytest.mark.slow
def test_non_private_steps_are_grad_on_the_drawn_examples(problem):
    params, X, y = problem
    key = jax.random.key(3)
    got, _ = jb.fit(params, MODEL, (X, y), optax.sgd(ETA), 2, B, key, sampling="poisson")
    want = _manual(params, X, y, key, 2, lambda p, Xs, ys, _: jb.grad(p, Xs, ys, MODEL, n=N))
    _assert_close(got, want)
    sizes = [s.sum() for e in (1, 2) for s in _samples(key, e)]
    assert len(set(sizes)) > 1  # the minibatch size varies from step to step


@pytest.mark.slow
@pytest.mark.parametrize("capacity", [None, 2])  # 2: a step's sample fills several blocks
def test_private_steps_divide_the_noisy_clipped_sum_by_the_expected_size(problem, capacity):
    params, X, y = problem
    key, dp = jax.random.key(4), jb.privacy.DPGradient(clip=(0.3, 0.2), noise_multiplier=0.8)

    def private(p, Xs, ys, k):
        return jb.clipped_grad(
            p, Xs, ys, MODEL, N, clip=(0.3, 0.2), noise_multiplier=0.8, noise_key=k,
            denominator=B,
        )  # fmt: skip

    want = _manual(params, X, y, key, 1, private)
    Y = jax.nn.one_hot(y, 2, dtype=jnp.float64)
    opt = optax.sgd(ETA)
    got, _ = jax.jit(
        lambda p, s, k: training.run_poisson_epoch(
            p,
            s,
            MODEL,
            jnp.asarray(X),
            Y,
            k,
            N,
            optimizer=opt,
            batch_size=B,
            gradient=dp,
            capacity=capacity,
        )
    )(params, opt.init(params), jax.random.fold_in(key, 1))
    _assert_close(got, want)


@pytest.mark.slow
def test_padding_rows_add_nothing_even_when_huge(problem):
    """Rows past a step's sample repeat example 0 with weight 0: when example 0 is never
    drawn, making its gradient enormous must change nothing, clipping included."""
    params, X, y = problem
    key = next(
        k
        for k in (jax.random.key(s) for s in range(100))
        if not any(drawn[0] for drawn in _samples(k, 1))
    )
    dp = jb.privacy.DPGradient(clip=0.5, noise_multiplier=1.0)
    Xbig = X.copy()
    Xbig[0] = [1e6, -1e6, 1e6]
    kw = {"key": key, "gradient": dp, "sampling": "poisson"}
    got, _ = jb.fit(params, MODEL, (Xbig, y), optax.sgd(ETA), 1, B, n=N, **kw)
    want, _ = jb.fit(params, MODEL, (X, y), optax.sgd(ETA), 1, B, n=N, **kw)
    for u, v in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def test_inclusion_rate_is_q_and_never_above():
    n, b = 200_000, 777
    q = b / n
    drawn = np.asarray(training.poisson_sample(jax.random.key(0), n, b))
    se = np.sqrt(q * (1 - q) / n)
    assert abs(drawn.mean() - q) < 4 * se
    again = np.asarray(training.poisson_sample(jax.random.key(1), n, b))
    assert abs((drawn & again).mean() - q * q) < 4 * np.sqrt(q * q / n)  # independent steps
    assert training.poisson_sample(jax.random.key(0), 10, 10).all()  # q = 1
    threshold = (b << 32) // n
    assert threshold / 2**32 <= q < (threshold + 1) / 2**32


def _binomial_pmf(n: int, q: float) -> np.ndarray:
    """``P(K = k)`` for ``K ~ Binomial(n, q)``, ``k = 0..n``, from log-gamma (no scipy)."""
    k = np.arange(n + 1)
    log_choose = math.lgamma(n + 1) - np.array(
        [math.lgamma(i + 1) + math.lgamma(n - i + 1) for i in k]
    )
    return np.exp(log_choose + k * math.log(q) + (n - k) * math.log1p(-q))


def _chi2_critical(df: int, z: float = 3.090) -> float:
    """The chi-square quantile of ``df`` degrees of freedom at the normal quantile ``z``
    (3.090: significance 0.001), by Wilson and Hilferty's cube-root approximation."""
    c = 2 / (9 * df)
    return df * (1 - c + z * math.sqrt(c)) ** 3


def _pooled(expected: np.ndarray, observed: np.ndarray, least: float = 10.0):
    """Adjacent cells merged until each expects at least ``least`` counts (the last
    cell absorbs what is left), as the chi-square approximation asks."""
    e_bins, o_bins, e, o = [], [], 0.0, 0
    for ek, ok in zip(expected, observed, strict=True):
        e, o = e + ek, o + ok
        if e >= least:
            e_bins.append(e)
            o_bins.append(o)
            e, o = 0.0, 0
    e_bins[-1] += e
    o_bins[-1] += o
    return np.array(e_bins), np.array(o_bins)


def test_sample_sizes_are_binomial_and_every_example_is_drawn_at_rate_q():
    """2,000 steps over n = 3,000 at batch size 150: the sizes against Binomial(n, q) by a
    chi-square test over pooled cells, and each example's count of inclusions against
    Binomial(steps, q) by the dispersion (chi-square) statistic, both at significance
    0.001 (fixed key, so one fixed outcome)."""
    n, b, steps = 3000, 150, 2000
    q = ((b << 32) // n) / 2**32  # the sampler's exact rate, q to 2⁻³²
    keys = jax.random.split(jax.random.key(11), steps)
    masks = np.asarray(jax.jit(jax.vmap(lambda k: training.poisson_sample(k, n, b)))(keys))
    sizes = masks.sum(axis=1)

    expected, observed = _pooled(steps * _binomial_pmf(n, q), np.bincount(sizes, minlength=n + 1))
    assert observed.sum() == steps and len(expected) > 15
    chi2 = np.sum((observed - expected) ** 2 / expected)
    assert chi2 < _chi2_critical(len(expected) - 1)
    assert abs(sizes.mean() - n * q) < 4 * math.sqrt(n * q * (1 - q) / steps)

    counts = masks.sum(axis=0)  # per example: Binomial(steps, q)
    rate_se = math.sqrt(q * (1 - q) / steps)
    assert abs(counts.mean() / steps - q) < 4 * rate_se / math.sqrt(n)
    assert np.max(np.abs(counts / steps - q)) < 5.5 * rate_se  # no example favoured
    dispersion = np.sum((counts - steps * q) ** 2) / (steps * q * (1 - q))
    assert dispersion < _chi2_critical(n)


@pytest.mark.slow
@pytest.mark.parametrize(("n", "b", "steps"), [(10, 3, 3), (10, 4, 3), (10, 10, 1), (9, 2, 5)])
def test_steps_per_epoch_is_n_over_batch_size_rounded(n, b, steps):
    X = np.zeros((n, 3), np.float32)
    Y = np.zeros((n, 2), np.float32)
    params = jb.init_params(jax.random.key(0), jb.Model(sizes=(3, 2)))
    opt = optax.adam(0.1)
    _, state = training.train_epoch(
        params, opt.init(params), jb.Model(sizes=(3, 2)), X, Y, jax.random.key(1),
        optimizer=opt, batch_size=b, sampling="poisson",
    )  # fmt: skip
    assert int(state[0].count) == steps == jb.privacy.poisson_schedule(n, b)[1]


def test_capacity_covers_three_standard_deviations():
    assert training.poisson_capacity(50_000, 256) == 304  # 256 + 3 * 15.96, rounded up
    assert training.poisson_capacity(50_000, 256, multiple=8) == 304
    assert training.poisson_capacity(50_000, 250, multiple=8) == 304
    assert training.poisson_capacity(10, 10) == 10


@pytest.mark.slow
def test_resume_is_bit_identical_and_arguments_are_checked(problem):
    params, X, y = problem
    kw = {"key": jax.random.key(5), "sampling": "poisson"}
    opt = optax.adam(0.05)
    dp = jb.privacy.DPGradient(clip=1.0, noise_multiplier=1.0)
    states = []
    full, _ = jb.fit(params, MODEL, (X, y), opt, 2, B, gradient=dp, on_epoch=states.append, **kw)
    resumed, history = jb.fit(params, MODEL, (X, y), opt, 2, B, gradient=dp, resume=states[0], **kw)
    for u, v in zip(jax.tree.leaves(full), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    assert [r["epoch"] for r in history] == [1, 2]
    with pytest.raises(ValueError, match="sampling"):
        jb.fit(params, MODEL, (X, y), opt, 1, B, key=jax.random.key(0), sampling="uniform")
    with pytest.raises(ValueError, match="masked_sum"):
        jb.fit(params, MODEL, (X, y), opt, 1, B, key=jax.random.key(0), sampling="poisson",
               gradient=lambda p, X, Y, model, n, key: jb.grad(p, X, Y, model, n))  # fmt: skip


def test_a_steps_rows_are_its_drawn_examples_in_order_block_by_block():
    """The epoch finds the rows of rank ``j cap ... (j + 1) cap - 1`` of a sample from
    32-example words; over several words, densities and sizes not a multiple of 32 they
    are ``np.nonzero`` of the sample, and ``n - 1`` (weight-0 padding) past its end."""
    from jbackprop.training.poisson import _rank_index, _ranked_rows

    rng = np.random.default_rng(0)
    for n, rate in ((1, 1.0), (31, 0.5), (100, 0.03), (1000, 0.3), (4099, 0.999)):
        drawn = rng.random(n) < rate
        words, ends = _rank_index(jnp.asarray(drawn))
        count = int(ends[-1])
        assert count == drawn.sum()
        ranks = jnp.arange(count + 40)
        rows = np.asarray(_ranked_rows(words, ends, ranks, n))
        np.testing.assert_array_equal(rows[:count], np.nonzero(drawn)[0])
        assert np.all(rows[count:] == n - 1)
