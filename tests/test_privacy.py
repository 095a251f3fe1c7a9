"""DP-SGD gradients: jb.clipped_grad against optax's aggregate over jb.per_example_grads."""

from __future__ import annotations

import itertools
import re
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jbackprop as jb
from jbackprop.noise import normal
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_noise_is_the_documented_draw(x64):
    """The noise is σC/m times jbackprop.noise.normal of the noise key, stream l for leaf
    l, added to optax's noise-free aggregate (to float32 rounding: the draw is float32, and
    compiled it may differ from the eager one in the last bit)."""
    model = MODELS["relu-softmax-3-dropout-l2-l1"]
    params, X, Y, key, n = _problem(model, jnp.float64, seed=7)
    nk, m = jax.random.key(42), X.shape[0]
    got = jb.clipped_grad(params, X, Y, model, n, key, clip=0.7, noise_multiplier=1.3, noise_key=nk)
    clean, _ = _reference(params, X, Y, model, n, key, 0.7)
    leaves, treedef = jax.tree.flatten(clean)
    want = jax.tree.unflatten(
        treedef,
        [g + 1.3 * 0.7 / m * normal(nk, g.shape, g.dtype, stream=l) for l, g in enumerate(leaves)],
    )
    _assert_trees_close(got, want, rtol=1e-6, atol=1e-8)


def _flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(l)) for l in jax.tree.leaves(tree)])


@pytest.mark.slow
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


# --- per-layer clipping -----------------------------------------------------------------


def _layer_norms(pe) -> np.ndarray:
    """(m, L): the norm of each example's (w, b) gradient of each layer, from stored ones."""
    return np.stack(
        [
            np.sqrt(
                np.sum(np.asarray(l["w"]) ** 2, axis=(1, 2)) + np.sum(np.asarray(l["b"]) ** 2, 1)
            )
            for l in pe
        ],
        axis=1,
    )


@pytest.mark.parametrize("name", list(MODELS))
def test_per_layer_clipping_matches_stored_per_example_grads(x64, name):
    model = MODELS[name]
    params, X, Y, key, n = _problem(model, jnp.float64, seed=19)
    pe = jb.per_example_grads(params, X, Y, model, key=key)
    norms = _layer_norms(pe)
    bounds = tuple(float(b) for b in 0.7 * norms.max(axis=0))  # the largest are clipped
    with np.errstate(divide="ignore"):
        factors = np.minimum(1.0, np.asarray(bounds) / norms)  # (m, L); a zero gradient: 1
    assert 0 < (factors < 1).sum() < factors.size
    want = []
    for l, layer in enumerate(pe):
        c = factors[:, l]
        w = np.einsum("i,ijk->jk", c, np.asarray(layer["w"])) / M
        want.append({"w": w, "b": c @ np.asarray(layer["b"]) / M})
    want = _add_penalty(tuple(jax.tree.map(jnp.asarray, want)), params, model, n)

    got = jb.clipped_grad(params, X, Y, model, n, key, clip=bounds, noise_multiplier=0.0)
    _assert_trees_close(got, want, rtol=1e-11, atol=1e-13)
    # a list or an array of bounds is the same request
    again = jb.clipped_grad(
        params, X, Y, model, n, key, clip=np.asarray(bounds), noise_multiplier=0
    )
    _assert_trees_close(again, got, rtol=0, atol=0)


@pytest.mark.slow
def test_per_layer_noise_is_scaled_to_the_norm_of_the_bounds(x64):
    """σ sqrt(Σ C_l²): the same draws as whole-gradient clipping at C = sqrt(Σ C_l²). The
    bounds are large enough to clip nothing, so the clipped sums agree too."""
    model = MODELS["relu-softmax-3-dropout-l2-l1"]
    params, X, Y, key, n = _problem(model, jnp.float64, seed=23)
    bounds = (30.0, 40.0, 120.0)  # sqrt(900 + 1600 + 14400) = 130
    assert np.asarray(jb.per_example_norms(params, X, Y, model, key)).max() < 30
    kw = {"noise_multiplier": 0.7, "noise_key": jax.random.key(5)}
    per_layer = jb.clipped_grad(params, X, Y, model, n, key, clip=bounds, **kw)
    whole = jb.clipped_grad(params, X, Y, model, n, key, clip=130.0, **kw)
    _assert_trees_close(per_layer, whole, rtol=1e-12, atol=1e-12)
    plain = jb.grad(params, X, Y, model, n, key)
    noise = _flat(per_layer) - _flat(plain)
    assert abs(noise.std() / (0.7 * 130.0 / M) - 1) < 0.25  # 83 coordinates


@pytest.mark.slow
def test_dp_gradient_per_layer_and_its_arguments(x64):
    model = MODELS["sigmoid-2"]
    params, X, Y, _, _ = _problem(model, jnp.float64, seed=29)
    dp = jb.privacy.DPGradient(clip=[0.05, 0.1], noise_multiplier=0.5)
    assert dp.clip == (0.05, 0.1) and hash(dp) == hash(jb.privacy.DPGradient((0.05, 0.1), 0.5))
    k = jax.random.key(7)
    noise_key = jax.random.split(k)[1]
    want = jb.clipped_grad(
        params, X, Y, model, clip=(0.05, 0.1), noise_multiplier=0.5, noise_key=noise_key
    )
    _assert_trees_close(dp(params, X, Y, model, None, k), want, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="2 bounds"):
        jb.privacy.DPGradient(clip=(1.0, 1.0, 1.0))(params, X, Y, model, None, k)
    with pytest.raises(ValueError, match="2 bounds"):
        jb.clipped_grad(params, X, Y, model, clip=(1.0,), noise_multiplier=0.0)
    with pytest.raises(ValueError, match=r"clip\[1\]"):
        jb.privacy.DPGradient(clip=(1.0, 0.0))
    with pytest.raises(ValueError, match="key is required"):
        dp(params, X, Y, model, None, None)


# --- weights: padding that contributes nothing -----------------------------------------


def test_zero_weight_rows_contribute_nothing_not_even_to_clipping(x64):
    model = jb.Model(sizes=(4, 6, 5, 3), hidden="relu", output="softmax", cost="log_likelihood")
    params, X, Y, _, _ = _problem(model, jnp.float64, seed=31)
    keep = np.array([True, False, True, True, False, True])
    # padding rows with huge gradients: were they clipped with the rest, the sum would move
    Xpad = np.asarray(X).copy()
    Xpad[~keep] *= 1e3
    kw = {"clip": (0.2, 0.3, 0.5), "noise_multiplier": 0.0}
    got = jb.clipped_grad(params, Xpad, Y, model, weights=keep, denominator=10.0, **kw)
    sub = jb.clipped_grad(params, X[keep], Y[keep], model, **kw)  # divided by 4
    want = jax.tree.map(lambda s: s * keep.sum() / 10.0, sub)
    _assert_trees_close(got, want, rtol=1e-11, atol=1e-13)
    with pytest.raises(ValueError, match="weights"):
        jb.clipped_grad(params, X, Y, model, weights=np.ones(5), **kw)
    with pytest.raises(ValueError, match="weights"):
        jb.clipped_grad(params, X, Y, model, weights=2 * np.ones(M), **kw)
    with pytest.raises(ValueError, match="denominator"):
        jb.clipped_grad(params, X, Y, model, denominator=0.0, **kw)


# --- DPGradient called directly --------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("m", [3, M])  # m = n_L flipped the gradient's sign; m != n_L raised
def test_dp_gradient_with_integer_labels_equals_one_hot(x64, m):
    model = MODELS["sigmoid-2"]  # 3 outputs
    params, X, _, _, _ = _problem(model, jnp.float64, seed=37, m=m)
    Y = jnp.asarray(np.random.default_rng(37).integers(0, 3, size=m))
    dp = jb.privacy.DPGradient(clip=0.5, noise_multiplier=1.0)
    k = jax.random.key(11)
    got = dp(params, X, Y, model, None, k)
    want = dp(params, X, jax.nn.one_hot(Y, 3, dtype=jnp.float64), model, None, k)
    _assert_trees_close(got, want, rtol=0, atol=0)
    ref = jb.clipped_grad(
        params, X, Y, model, clip=0.5, noise_multiplier=1.0, noise_key=jax.random.split(k)[1]
    )
    _assert_trees_close(got, ref, rtol=1e-12, atol=1e-14)
    # and it checks its arguments like every public function
    with pytest.raises(ValueError, match="labels"):
        dp(params, X, Y + 3, model, None, k)
    with pytest.raises(ValueError, match="X has shape"):
        dp(params, X[:, :2], Y, model, None, k)


# --- accounting ---------------------------------------------------------------------------

# TF-Privacy's RDP orders, for the classic conversion its tutorials report.
TF_ORDERS = np.array([1 + x / 10 for x in range(1, 100)] + list(range(12, 64)))


def _log_moment(q: float, sigma: float, alpha: float) -> float:
    """``log A_α``, ``A_α = E_{z~N(0,σ²)}[((1-q) + q exp((2z-1)/(2σ²)))^α]``: the Rényi
    moment of the Poisson-subsampled Gaussian (Mironov, Talwar and Zhang 2019, section 3),
    by quadrature in the log domain: an oracle independent of dp-accounting."""
    from scipy.integrate import simpson

    z = np.linspace(-12 * sigma, alpha + 12 * sigma, 8001)
    s2 = sigma * sigma
    log_f = -z * z / (2 * s2) + alpha * np.logaddexp(
        np.log1p(-q), np.log(q) + (2 * z - 1) / (2 * s2)
    )
    top = log_f.max()
    return top + np.log(simpson(np.exp(log_f - top), x=z) / (sigma * np.sqrt(2 * np.pi)))


def _rdp_epsilons(sigma, q, steps, delta) -> tuple[float, float]:
    """(classic, improved) ε from the oracle's RDP curve: Mironov 2017 Prop. 3, and
    Canonne, Kamath and Steinke 2020 Prop. 12."""
    a = TF_ORDERS
    rdp = np.array([steps * _log_moment(q, sigma, x) / (x - 1) for x in a])
    classic = np.min(rdp + np.log(1 / delta) / (a - 1))
    improved = np.min(rdp + np.log1p(-1 / a) - np.log(delta * a) / (a - 1))
    return float(classic), float(improved)


@pytest.mark.parametrize(
    ("sigma", "epochs", "tf_privacy"),
    [(1.12, 60, 2.92), (0.6, 30, 9.74), (1.2, 10, 1.20)],  # TF-Privacy's MNIST table
)
def test_rdp_epsilon_against_tf_privacy_figures(sigma, epochs, tf_privacy):
    q, steps = 256 / 60000, int(np.ceil(epochs * 60000 / 256))  # as TF-Privacy counts
    classic, improved = _rdp_epsilons(sigma, q, steps, 1e-5)
    assert abs(classic - tf_privacy) < 0.02  # the oracle reproduces the published figure
    got = jb.privacy.epsilon(sigma, q, steps, 1e-5)
    assert got == pytest.approx(improved, rel=5e-3)  # dp-accounting's tighter conversion
    assert got < classic


def test_abadi_mnist_setting_pinned():
    """σ=1.1, q=256/60000, 60 epochs, δ=1e-5 (Abadi et al.; TF-Privacy's tutorial):
    ε = 3.01 by the classic conversion, 2.60 by dp-accounting's RDP, 2.38 by PLD."""
    q, steps = 256 / 60000, 14063
    assert jb.privacy.epsilon(1.1, q, steps, 1e-5) == pytest.approx(2.597, abs=2e-3)
    assert _rdp_epsilons(1.1, q, steps, 1e-5)[0] == pytest.approx(3.008, abs=2e-3)
    assert jb.privacy.epsilon(1.1, q, steps, 1e-5, "pld") == pytest.approx(2.382, abs=5e-3)


def _gaussian_delta(eps: float, mu: float) -> float:
    """δ(ε) of the Gaussian mechanism with sensitivity/std ``mu`` (Balle and Wang 2018)."""
    from scipy.stats import norm

    return norm.cdf(mu / 2 - eps / mu) - np.exp(eps) * norm.cdf(-mu / 2 - eps / mu)


def _subsampled_delta(eps: float, sigma: float, q: float) -> float:
    """δ(ε) of ONE Poisson-subsampled Gaussian step, exactly: the hockey-stick divergence
    between ``(1-q) N(0,σ²) + q N(1,σ²)`` and ``N(0,σ²)``, in both directions, whose
    privacy-loss sets are half-lines."""
    from scipy.stats import norm

    s2, e = sigma * sigma, np.exp(eps)
    z = s2 * np.log((e - (1 - q)) / q) + 0.5  # remove: the loss exceeds ε for x > z
    remove = (1 - q) * norm.sf(z / sigma) + q * norm.sf((z - 1) / sigma) - e * norm.sf(z / sigma)
    r = (1 / e - (1 - q)) / q
    if r <= 0:
        return float(remove)
    z = s2 * np.log(r) + 0.5  # add: the loss exceeds ε for x < z
    add = norm.cdf(z / sigma) - e * ((1 - q) * norm.cdf(z / sigma) + q * norm.cdf((z - 1) / sigma))
    return float(max(remove, add))


@pytest.mark.parametrize(("sigma", "q", "steps"), [(1.0, 1.0, 10), (0.8, 0.1, 1), (1.1, 0.01, 1)])
def test_pld_epsilon_is_exact_where_the_answer_is_known(sigma, q, steps):
    """q = 1: T Gaussians compose to one with σ/√T; T = 1: one subsampled step."""
    from scipy.optimize import brentq

    if q == 1:
        exact = brentq(lambda e: _gaussian_delta(e, np.sqrt(steps) / sigma) - 1e-5, 0, 100)
    else:
        exact = brentq(lambda e: _subsampled_delta(e, sigma, q) - 1e-5, 1e-9, 50)
    got = jb.privacy.epsilon(sigma, q, steps, 1e-5, accountant="pld")
    assert got == pytest.approx(exact, rel=1e-4)
    assert jb.privacy.epsilon(sigma, q, steps, 1e-5, accountant="rdp") >= got


def test_epsilon_is_monotone():
    eps = partial(jb.privacy.epsilon, delta=1e-5)
    base = {"noise_multiplier": 1.0, "sample_rate": 0.01, "steps": 1000}
    sigmas = [eps(**{**base, "noise_multiplier": s}) for s in (0.7, 1.0, 1.5, 3.0)]
    rates = [eps(**{**base, "sample_rate": q}) for q in (0.001, 0.01, 0.1, 1.0)]
    steps = [eps(**{**base, "steps": t}) for t in (1, 100, 1000, 10000)]
    assert sigmas == sorted(sigmas, reverse=True) and len(set(sigmas)) == 4
    assert rates == sorted(rates) and len(set(rates)) == 4
    assert steps == sorted(steps) and len(set(steps)) == 4
    deltas = [jb.privacy.epsilon(1.0, 0.01, 1000, d) for d in (1e-7, 1e-5, 1e-3)]
    assert deltas == sorted(deltas, reverse=True)
    assert jb.privacy.epsilon(0.0, 0.01, 10, 1e-5) == np.inf
    assert isinstance(jb.privacy.epsilon(1.0, 0.01, 10, 1e-5), float)


@pytest.mark.slow
@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_calibrate_noise_inverts_epsilon(accountant):
    # PLD is slow for subsampled steps; q = 1 (plain Gaussians) keeps this test quick
    q, steps, delta = (0.02, 500, 1e-5) if accountant == "rdp" else (1.0, 5, 1e-5)
    for target in (1.0, 4.0) if accountant == "rdp" else (2.0,):
        sigma = jb.privacy.calibrate_noise(target, q, steps, delta, accountant)
        assert jb.privacy.epsilon(sigma, q, steps, delta, accountant) <= target
        assert jb.privacy.epsilon(sigma / 1.01, q, steps, delta, accountant) > target
    # and back: the σ of a known ε is found again, to 1%
    eps = jb.privacy.epsilon(1.3, q, steps, delta, accountant)
    assert jb.privacy.calibrate_noise(eps, q, steps, delta, accountant) == pytest.approx(
        1.3, rel=0.01
    )


def test_calibration_does_not_log_the_accountants_warnings_about_its_probes(caplog):
    # The search passes σ = 0.5 here, where dp-accounting's RDP accountant cannot evaluate
    # its smallest orders and logs a warning for each; the caller asked about none of them.
    import logging

    before = logging.getLogger("absl").level
    with caplog.at_level(logging.WARNING):
        sigma = jb.privacy.calibrate_noise(4.0, 50 / 3000, 360, 1e-5)
    assert not [r for r in caplog.records if r.name == "absl"], caplog.text
    assert logging.getLogger("absl").level == before  # restored
    assert jb.privacy.epsilon(sigma, 50 / 3000, 360, 1e-5) <= 4.0


def test_poisson_schedule():
    assert jb.privacy.poisson_schedule(60000, 256, 60) == (256 / 60000, 60 * 234)
    assert jb.privacy.poisson_schedule(10, 4) == (0.4, 3)  # 2.5 steps round up
    assert jb.privacy.poisson_schedule(10, 3, 2) == (0.3, 6)
    with pytest.raises(ValueError, match="batch_size"):
        jb.privacy.poisson_schedule(10, 11)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sample_rate": 0.0}, "sample_rate"),
        ({"sample_rate": 1.5}, "sample_rate"),
        ({"sample_rate": float("nan")}, "sample_rate"),
        ({"sample_rate": "all"}, "sample_rate"),
        ({"steps": 0}, "steps"),
        ({"steps": 10.0}, "steps"),
        ({"steps": True}, "steps"),
        ({"delta": 0.0}, "delta"),
        ({"delta": 1.0}, "delta"),
        ({"accountant": "prv"}, "accountant"),
        ({"noise_multiplier": -1.0}, "noise_multiplier"),
        ({"noise_multiplier": float("inf")}, "noise_multiplier"),
        ({"target_epsilon": 0.0}, "target_epsilon"),
        ({"target_epsilon": -1.0}, "target_epsilon"),
    ],
)
def test_accounting_arguments_are_checked(kwargs, match):
    args = {"sample_rate": 0.01, "steps": 100, "delta": 1e-5, "accountant": "rdp", **kwargs}
    target = args.pop("target_epsilon", None)
    sigma = args.pop("noise_multiplier", None)
    if sigma is None:  # the schedule's checks are shared by both functions
        with pytest.raises(ValueError, match=match):
            jb.privacy.calibrate_noise(1.0 if target is None else target, **args)
    if target is None:
        with pytest.raises(ValueError, match=match):
            jb.privacy.epsilon(1.0 if sigma is None else sigma, **args)


@pytest.mark.slow
def test_readme_private_training_example_runs():
    readme = Path(__file__).resolve().parents[1] / "README.md"
    found = re.search(r"<!-- privacy-example -->\s*```python\n(.*?)```", readme.read_text(), re.S)
    assert found, "README has no block marked <!-- privacy-example -->"
    namespace: dict = {}
    exec(compile(found[1], str(readme), "exec"), namespace)
    assert namespace["q"] == 0.05 and namespace["steps"] == 100
    assert namespace["eps_pld"] <= namespace["eps"] <= 2.0
    assert len(namespace["history"]) == 5


# --- private PCA and its accounting -------------------------------------------------------


def _scaled_top(X: np.ndarray, k: int) -> np.ndarray:
    """The reference: top-k eigenvectors of Σ x xᵀ over rows scaled to norm <= 1, in float64."""
    rows = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1.0)
    _, vecs = np.linalg.eigh(rows.T @ rows)
    return vecs[:, ::-1][:, :k]


def _pca_data(n: int = 400, d: int = 12, seed: int = 0) -> np.ndarray:
    """Rows with a clear spectrum (distinct variances per axis), some longer than 1."""
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, d)) * np.linspace(2.0, 0.1, d)).astype(np.float32)


def test_dp_pca_without_noise_is_the_top_eigenvectors_of_the_scaled_rows():
    X = _pca_data()
    P = np.asarray(jb.privacy.dp_pca(X, 4))
    assert P.shape == (12, 4) and P.dtype == np.float32
    np.testing.assert_allclose(P.T @ P, np.eye(4), atol=1e-5)
    ref = _scaled_top(X.astype(np.float64), 4)
    np.testing.assert_allclose(np.abs(P.T @ ref), np.eye(4), atol=1e-4)  # same directions
    peaks = P[np.argmax(np.abs(P), axis=0), np.arange(4)]
    assert np.all(peaks > 0)  # the sign convention


def test_dp_pca_scales_long_rows_and_keeps_short_ones():
    X = _pca_data()
    long = X / np.linalg.norm(X, axis=1, keepdims=True) * 1.5  # every row longer than 1
    np.testing.assert_allclose(
        jb.privacy.dp_pca(long, 3), jb.privacy.dp_pca(7 * long, 3), atol=1e-5
    )
    short = X / np.linalg.norm(X, axis=1, keepdims=True).max() / 2  # every row shorter than 1
    np.testing.assert_allclose(
        np.abs(np.asarray(jb.privacy.dp_pca(short, 3)).T @ _scaled_top(short.astype(float), 3)),
        np.eye(3),
        atol=1e-4,
    )
    assert np.allclose(jb.privacy.scaled_rows(jnp.asarray(short)), short)


def test_dp_pca_noise_is_drawn_from_the_key():
    X = _pca_data(n=2000)
    key = jax.random.key(3)
    a = np.asarray(jb.privacy.dp_pca(X, 3, 2.0, key))
    assert np.array_equal(a, np.asarray(jb.privacy.dp_pca(X, 3, 2.0, key)))
    b = np.asarray(jb.privacy.dp_pca(X, 3, 2.0, jax.random.key(4)))
    assert not np.array_equal(a, b)
    clean = np.asarray(jb.privacy.dp_pca(X, 3))
    assert not np.array_equal(a, clean)
    # The top directions carry eigenvalues in the hundreds against noise of norm ~10: the
    # private subspace is close to the clean one.
    assert np.linalg.svd(a.T @ clean, compute_uv=False).min() > 0.95
    np.testing.assert_allclose(a.T @ a, np.eye(3), atol=1e-5)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((np.ones((5, 4)), 0), "k must be a positive integer"),
        ((np.ones((5, 4)), 5), "k must be at most the input width n_0 = 4"),
        ((np.ones((5, 4)), 2, 1.0), "key is required"),
        ((np.ones((5, 4)), 2, -1.0, jax.random.key(0)), "noise must lie in"),
        ((np.ones(4), 2), "X must be a non-empty"),
        ((np.full((5, 4), np.nan), 2), "NaN"),
    ],
)
def test_dp_pca_arguments_are_checked(args, match):
    with pytest.raises(ValueError, match=match):
        jb.privacy.dp_pca(*args)


def test_epsilon_composes_the_pca_release_with_the_steps():
    import dp_accounting

    q, steps, delta = 0.01, 2000, 1e-5
    for accountant in ("rdp", "pld"):
        acc = (
            dp_accounting.rdp.RdpAccountant()
            if accountant == "rdp"
            else dp_accounting.pld.PLDAccountant()
        )
        step = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(4.0))
        acc.compose(dp_accounting.GaussianDpEvent(7.0))
        acc.compose(dp_accounting.SelfComposedDpEvent(step, steps))
        got = jb.privacy.epsilon(4.0, q, steps, delta, accountant, pca_noise=7.0)
        assert got == pytest.approx(acc.get_epsilon(delta), rel=1e-6)
        assert got > jb.privacy.epsilon(4.0, q, steps, delta, accountant)
    assert jb.privacy.epsilon(4.0, q, steps, delta, pca_noise=0.0) == np.inf
    assert jb.privacy.epsilon(4.0, q, steps, delta, pca_noise=None) == jb.privacy.epsilon(
        4.0, q, steps, delta
    )
    with pytest.raises(ValueError, match="pca_noise"):
        jb.privacy.epsilon(4.0, q, steps, delta, pca_noise=-1.0)


def test_pld_epsilon_with_pca_is_exact_for_unsampled_steps():
    """q = 1: the PCA's Gaussian (σ_p) and T Gaussians (σ) compose to one Gaussian of
    ``μ = sqrt(1/σ_p² + T/σ²)``, whose ε is known exactly."""
    from scipy.optimize import brentq

    sigma, pca, steps = 3.0, 2.0, 4
    mu = np.sqrt(1 / pca**2 + steps / sigma**2)
    exact = brentq(lambda e: _gaussian_delta(e, mu) - 1e-5, 0, 100)
    got = jb.privacy.epsilon(sigma, 1.0, steps, 1e-5, "pld", pca_noise=pca)
    assert got == pytest.approx(exact, rel=1e-4)


def test_calibrate_noise_leaves_the_steps_what_the_pca_does_not_spend():
    q, steps, delta = 0.012, 4000, 1e-5
    sigma = jb.privacy.calibrate_noise(2.0, q, steps, delta, pca_noise=7.0)
    assert jb.privacy.epsilon(sigma, q, steps, delta, pca_noise=7.0) <= 2.0
    assert jb.privacy.epsilon(sigma / 1.01, q, steps, delta, pca_noise=7.0) > 2.0
    assert sigma > jb.privacy.calibrate_noise(2.0, q, steps, delta)  # less budget, more noise
    with pytest.raises(ValueError, match=r"out of reach: the private projection alone"):
        jb.privacy.calibrate_noise(0.5, q, steps, delta, pca_noise=4.0)
    with pytest.raises(ValueError, match=r"out of reach"):
        jb.privacy.calibrate_noise(2.0, q, steps, delta, pca_noise=0.0)
