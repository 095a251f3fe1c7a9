"""Tests for jbackprop.stats: gradient statistics and the diagonal GGN against autodiff.

The references are written here independently of the library (their own forward pass,
activations and costs) and differentiated with ``jax.grad`` / ``jax.jacrev`` /
``jax.hessian`` in float64; only the dropout masks come from
``jbackprop.regularizers.dropout_masks`` for one example with key ``split(key, m)[i]``,
which is the contract being tested.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.flatten_util import ravel_pytree

import jbackprop as jb
from jbackprop.regularizers import dropout_masks

M = 5  # minibatch size
N_TRAIN = 50  # the training-set size n for L1/L2

# --- independent reference network -----------------------------------------------------

ACT = {
    "sigmoid": lambda z: 1.0 / (1.0 + jnp.exp(-z)),
    "tanh": jnp.tanh,
    "relu": lambda z: jnp.maximum(z, 0.0),
    "softplus": lambda z: jnp.logaddexp(z, 0.0),
    "leaky_relu(0.2)": lambda z: jnp.where(z > 0, z, 0.2 * z),
    "identity": lambda z: z,
    "softmax": lambda z: jnp.exp(z - jax.scipy.special.logsumexp(z)),
}


def split_cost(output, cost):
    """``(use_z, ℓ)``: where the cost is split for the GGN, and the cost as a function there."""
    if cost == "cross_entropy" and output == "sigmoid":
        return (
            True,
            lambda z, y: -jnp.sum(y * jax.nn.log_sigmoid(z) + (1 - y) * jax.nn.log_sigmoid(-z)),
        )
    if cost == "log_likelihood":
        return True, lambda z, y: -jnp.sum(y * (z - jax.scipy.special.logsumexp(z)))
    if cost == "cross_entropy":  # softmax: in a
        return False, lambda a, y: -jnp.sum(y * jnp.log(a) + (1 - y) * jnp.log1p(-a))
    return False, lambda a, y: 0.5 * jnp.sum((a - y) ** 2)


def ref_output(params, x, masks, hidden, output, use_z):
    """One example's ``z^L`` (``use_z``) or ``a^L``, with this example's dropout masks."""
    a = x
    for l, layer in enumerate(params, start=1):
        z = layer["w"] @ a + layer["b"]
        if l < len(params):
            a = ACT[hidden](z)
            if masks is not None:
                a = a * masks[l - 1]
    return z if use_z else ACT[output](z)


@partial(jax.jit, static_argnames="model")
def reference(params, X, Y, key, model):
    """Everything the library computes, from autodiff over flattened parameters.

    Example ``i`` gets the dropout masks of ``dropout_masks(split(key, m)[i], model, None)``.
    """
    hidden, output, cost = model.hidden.spec, model.output.spec, model.cost.name
    use_z, ell = split_cost(output, cost)
    theta, unravel = ravel_pytree(params)
    m = X.shape[0]
    masks = None
    if key is not None and model.dropout and model.num_layers > 1:
        keys = jax.random.split(key, m)
        one = lambda k: dropout_masks(k, model.widths, model.dropout, None, X.dtype)  # noqa: E731
        masks = jax.vmap(one)(keys)

    def out(th, x, mk):
        return ref_output(unravel(th), x, mk, hidden, output, use_z)

    def per_example(x, y, mk):
        g = jax.grad(lambda th: ell(out(th, x, mk), y))(theta)
        J = jax.jacrev(out)(theta, x, mk)  # (n_L, P)
        H = jax.hessian(ell)(out(theta, x, mk), y)  # (n_L, n_L)
        return g, jnp.einsum("jp,jk,kp->p", J, H, J)

    g, ggn = jax.vmap(per_example)(X, Y, masks)  # (m, P) each
    return {
        "norms": jnp.linalg.norm(g, axis=1),
        "sum_grad_squared": jnp.sum(g**2, axis=0),
        "variance": jnp.var(g, axis=0),
        "mean": jnp.mean(g, axis=0),
        "diag_ggn": jnp.mean(ggn, axis=0),
    }


# --- configurations --------------------------------------------------------------------

# (hidden, output, cost, depth, dropout, l2, l1): every hidden activation, every
# output/cost pairing, depths 1-3, with and without dropout and regularisers.
CONFIGS = [
    ("tanh", "sigmoid", "cross_entropy", 3, 0.0, 0.3, 0.1),
    ("softplus", "softmax", "cross_entropy", 2, 0.3, 0.0, 0.0),
    ("relu", "softmax", "log_likelihood", 3, 0.5, 0.1, 0.0),
    ("sigmoid", "identity", "quadratic", 2, 0.0, 0.0, 0.2),
    ("leaky_relu(0.2)", "sigmoid", "quadratic", 3, 0.25, 0.0, 0.0),
    ("identity", "softmax", "quadratic", 2, 0.0, 0.0, 0.0),
    ("relu", "softmax", "cross_entropy", 1, 0.0, 0.0, 0.0),
]
MC_CONFIGS = CONFIGS[:3] + CONFIGS[5:6]  # Bernoulli, Rademacher, categorical, Gaussian
SIZES = {1: (3, 3), 2: (3, 4, 3), 3: (3, 4, 5, 3)}


def cfg_id(cfg):
    return "-".join(map(str, cfg[:5]))


def over_drawn_batches(test):
    """``test(cfg, seed)`` for every configuration, on three drawn seeds each (slow)."""
    test = given(seed=st.integers(0, 2**31 - 1))(test)
    test = settings(max_examples=3, deadline=None, derandomize=True, database=None)(test)
    return pytest.mark.slow(pytest.mark.parametrize("cfg", CONFIGS, ids=cfg_id)(test))


def random_params(model, rng, dtype=np.float64):
    """Like ``jb.init_params(..., scheme="scaled")`` but drawn by NumPy (nothing compiles)."""
    return tuple(
        {
            "w": jnp.asarray(rng.normal(size=(n_out, n_in)) / np.sqrt(n_in), dtype),
            "b": jnp.asarray(rng.normal(size=n_out), dtype),
        }
        for n_in, n_out in zip(model.sizes[:-1], model.sizes[1:], strict=True)
    )


def make_batch(cfg, seed):
    """float64 params, inputs and targets (NumPy-drawn, so nothing here compiles)."""
    hidden, output, cost, depth, dropout, l2, l1 = cfg
    model = jb.Model(SIZES[depth], hidden, output, cost, l2=l2, l1=l1, dropout=dropout)
    rng = np.random.default_rng(seed)
    params = random_params(model, rng)
    X = jnp.asarray(rng.normal(size=(M, model.sizes[0])))
    shape = (M, model.sizes[-1])
    # soft targets in [0, 1]; for log-likelihood their sums differ from 1
    Y = jnp.asarray(rng.normal(size=shape) if cost == "quadratic" else rng.uniform(size=shape))
    key = jax.random.key(seed) if dropout else None
    n = N_TRAIN if (l1 or l2) else None
    return model, params, X, Y, key, n


def flat(tree):
    return np.concatenate([np.ravel(np.asarray(leaf)) for leaf in jax.tree.leaves(tree)])


def rel_err(got, want):
    got, want = np.asarray(got), np.asarray(want)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


ERRORS: dict[str, float] = {}  # largest relative errors seen, printed by the last test


def record(name, err):
    ERRORS[name] = max(ERRORS.get(name, 0.0), err)
    return err


# --- grad_stats ------------------------------------------------------------------------


@over_drawn_batches
def test_grad_stats_match_autodiff_per_example_grads(cfg, seed):
    with jax.enable_x64(True):
        model, params, X, Y, key, n = make_batch(cfg, seed)
        s = jb.grad_stats(params, X, Y, model, n=n, key=key)
        # s.grad is jb.grad (regularisers included): bit for bit on CPU; on GPU, XLA fuses
        # the bias sums with the statistics' reductions and may add in another order.
        g = jb.grad(params, X, Y, model, n=n, key=key)
        exact = jax.default_backend() == "cpu"
        for got, want in zip(jax.tree.leaves(s.grad), jax.tree.leaves(g), strict=True):
            np.testing.assert_allclose(got, want, rtol=0 if exact else 1e-13, atol=0)

        ref = reference(params, X, Y, key, model)
        assert s.norms.shape == (M,)
        assert record("norms", rel_err(s.norms, ref["norms"])) < 1e-12
        sgs = flat(s.sum_grad_squared)
        assert record("sum_grad_squared", rel_err(sgs, ref["sum_grad_squared"])) < 1e-12
        var = flat(s.variance)
        assert record("variance", rel_err(var, ref["variance"])) < 1e-10
        np.testing.assert_allclose(var, ref["variance"], rtol=1e-8, atol=1e-14)
        assert jax.tree.structure(s.variance) == jax.tree.structure(params)
        if n is None:  # unregularised: grad is the mean of the per-example gradients
            np.testing.assert_allclose(flat(s.grad), ref["mean"], rtol=1e-10, atol=1e-14)


@pytest.mark.slow
def test_grad_stats_float32_grad_is_bitwise_jb_grad_and_jits():
    model = jb.Model((4, 6, 3), hidden="relu", output="softmax", cost="log_likelihood", l2=1.0)
    rng = np.random.default_rng(1)
    params = random_params(model, rng, np.float32)
    X = jnp.asarray(rng.normal(size=(7, 4)), jnp.float32)
    Y = jnp.arange(7) % 3  # integer labels
    s = jb.grad_stats(params, X, Y, model, n=100)
    g = jb.grad(params, X, Y, model, n=100)
    for got, want in zip(jax.tree.leaves(s.grad), jax.tree.leaves(g), strict=True):
        np.testing.assert_array_equal(got, want)
    assert isinstance(s, jb.GradStats) and s.norms.dtype == jnp.float32

    sj = jax.jit(lambda p, x, y: jb.grad_stats(p, x, y, model, n=100))(params, X, Y)
    assert isinstance(sj, jb.GradStats)
    for got, want in zip(jax.tree.leaves(sj), jax.tree.leaves(s), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    # variances are never negative, even where rounding would make them so
    assert all(bool(np.all(np.asarray(v) >= 0)) for v in jax.tree.leaves(s.variance))


def test_grad_stats_never_forms_per_example_gradients():
    """No intermediate as large as the (m, n_l, n_{l-1}) stack of per-example gradients."""
    m = 16
    model = jb.Model((40, 50, 10), hidden="tanh", dropout=0.5)
    params = tuple(
        {
            "w": jax.ShapeDtypeStruct((o, i), jnp.float32),
            "b": jax.ShapeDtypeStruct((o,), jnp.float32),
        }
        for i, o in ((40, 50), (50, 10))
    )
    X, Y = jax.ShapeDtypeStruct((m, 40), jnp.float32), jax.ShapeDtypeStruct((m, 10), jnp.float32)
    fn = partial(jb.stats._grad_stats.__wrapped__, model=model)
    jaxpr = jax.make_jaxpr(fn)(params, X, Y, n=None, key=jax.random.key(1))
    sizes = [
        v.aval.size for eqn in jaxpr.jaxpr.eqns for v in eqn.outvars if hasattr(v.aval, "size")
    ]
    assert max(sizes) <= 50 * 40 < m * 50 * 40


# --- diag_ggn --------------------------------------------------------------------------


@over_drawn_batches
def test_diag_ggn_matches_jacobian_hessian_reference(cfg, seed):
    with jax.enable_x64(True):
        model, params, X, Y, key, _ = make_batch(cfg, seed)
        got = jb.diag_ggn(params, X, Y, model, key=key)
        assert jax.tree.structure(got) == jax.tree.structure(params)
        for g, p in zip(jax.tree.leaves(got), jax.tree.leaves(params), strict=True):
            assert g.shape == p.shape and g.dtype == p.dtype
        want = reference(params, X, Y, key, model)["diag_ggn"]
        assert record("diag_ggn", rel_err(flat(got), want)) < 1e-12
        np.testing.assert_allclose(flat(got), want, rtol=1e-9, atol=1e-14)
        # with these targets every split has a PSD Hessian, so the diagonal is >= 0
        assert np.all(flat(got) >= -1e-15)


def test_softmax_cross_entropy_is_not_convex_in_z():
    """Why softmax + cross-entropy is split at a^L: its Hessian in z^L can have a negative
    eigenvalue, while the one in a^L is diag(y/a² + (1-y)/(1-a)²) ≥ 0."""
    with jax.enable_x64(True):

        @jax.jit
        def hessian_eigenvalues(z, y):
            def ce(z):
                a = jax.nn.softmax(z)
                return -jnp.sum(y * jnp.log(a) + (1 - y) * jnp.log1p(-a))

            return jnp.linalg.eigvalsh(jax.hessian(ce)(z))

        assert float(hessian_eigenvalues(jnp.array([2.0, 0.0, 0.0]), jnp.zeros(3))[0]) < -1e-3


@pytest.mark.slow
def test_diag_ggn_integer_labels_and_saturated_outputs():
    model = jb.Model((3, 4, 3), hidden="tanh", output="softmax", cost="cross_entropy")
    rng = np.random.default_rng(3)
    params = random_params(model, rng, np.float32)
    X = jnp.asarray(rng.normal(size=(6, 3)), jnp.float32)
    labels = jnp.array([0, 1, 2, 2, 1, 0])
    by_label = jb.diag_ggn(params, X, labels, model)
    by_vector = jb.diag_ggn(params, X, jax.nn.one_hot(labels, 3), model)
    np.testing.assert_array_equal(flat(by_label), flat(by_vector))
    # huge weights saturate the softmax and sigmoid outputs: everything stays finite
    big = jax.tree.map(lambda p: 200.0 * p, params)  # z^L of order 100
    sigmoid_model = jb.Model((3, 4, 3), hidden="tanh", output="sigmoid", cost="cross_entropy")
    results = [
        jb.diag_ggn(big, X, labels, model),
        jb.diag_ggn(big, X, labels, model, mc_samples=4, mc_key=jax.random.key(0)),
        jb.diag_ggn(big, X, labels, sigmoid_model),
        jb.grad_stats(big, X, labels, model).variance,
    ]
    for r in results:
        assert np.all(np.isfinite(flat(r)))


@pytest.mark.slow
@pytest.mark.parametrize("cfg", MC_CONFIGS, ids=cfg_id)
def test_diag_ggn_monte_carlo_converges_to_exact(cfg):
    """Fixed seeds; relative error (2-norm over all entries) below 0.1 with 2000 samples,
    and smaller than with 20 samples."""
    with jax.enable_x64(True):
        model, params, X, Y, key, _ = make_batch(cfg, seed=11)
        exact = flat(jb.diag_ggn(params, X, Y, model, key=key))
        mc_key = jax.random.key(5)
        errs = {}
        for s in (20, 2000):
            mc = jb.diag_ggn(params, X, Y, model, key=key, mc_samples=s, mc_key=mc_key)
            errs[s] = rel_err(flat(mc), exact)
        record(f"mc2000 {cfg[1]}+{cfg[2]}", errs[2000])
        assert errs[2000] < 0.1
        assert errs[2000] < errs[20]


# --- argument checks -------------------------------------------------------------------


def _error(fn, *args, **kwargs):
    with pytest.raises(ValueError) as info:
        fn(*args, **kwargs)
    return str(info.value)


def test_bad_arguments_give_the_same_errors_as_grad():
    model = jb.Model((3, 4, 2), dropout=0.5, l2=1.0)
    params = random_params(model, np.random.default_rng(0), np.float32)
    X, Y, key = jnp.ones((4, 3)), jnp.zeros((4, 2)), jax.random.key(1)
    cases = [
        ((params, jnp.ones((4, 5)), Y), {"n": 10, "key": key}),  # wrong input width
        ((params, X, jnp.zeros((4, 3))), {"n": 10, "key": key}),  # wrong target width
        ((params, X, jnp.array([0, 1, 2, 0])), {"n": 10, "key": key}),  # label out of range
        ((params, X, Y), {"n": 10}),  # dropout without key
        ((params[:1], X, Y), {"n": 10, "key": key}),  # params of another model
        ((params, jnp.ones((0, 3)), jnp.zeros((0, 2))), {"n": 10, "key": key}),  # empty
    ]
    for args, kwargs in cases:
        want = _error(jb.grad, *args, model, **kwargs)
        assert _error(jb.grad_stats, *args, model, **kwargs) == want
        assert _error(jb.diag_ggn, *args, model, key=kwargs.get("key")) == want
    # n is required when the model is regularised (grad_stats returns jb.grad)...
    assert _error(jb.grad_stats, params, X, Y, model, key=key) == _error(
        jb.grad, params, X, Y, model, key=key
    )
    # ...but not by diag_ggn, which is of the unregularised cost
    jb.diag_ggn(params, X, Y, model, key=key)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mc_samples": 0, "mc_key": jax.random.key(0)}, "positive integer"),
        ({"mc_samples": True, "mc_key": jax.random.key(0)}, "positive integer"),
        ({"mc_samples": 2.5, "mc_key": jax.random.key(0)}, "positive integer"),
        ({"mc_samples": 3}, "mc_key is required"),
        ({"mc_key": jax.random.key(0)}, "mc_samples is None"),
    ],
)
def test_diag_ggn_monte_carlo_arguments(kwargs, match):
    model = jb.Model((3, 2))
    params = random_params(model, np.random.default_rng(0), np.float32)
    with pytest.raises(ValueError, match=match):
        jb.diag_ggn(params, jnp.ones((2, 3)), jnp.zeros((2, 2)), model, **kwargs)


def test_zz_report_errors():
    """Prints the largest relative errors seen above (run with -s to see them)."""
    print("\nlargest relative errors:", {k: f"{v:.1e}" for k, v in sorted(ERRORS.items())})
