"""Tests for jbackprop.attribution against stored autodiff gradients and Jacobians.

The references are written here independently of the library (their own forward pass,
activations and costs), differentiated with ``jax.grad`` / ``jax.jacrev`` per example in
float64, flattened and stored; every quantity is then an explicit matrix product of those
stored rows.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import jbackprop as jb
from jbackprop import attribution

# --- independent reference network -----------------------------------------------------

ACT = {
    "sigmoid": jax.nn.sigmoid,
    "tanh": jnp.tanh,
    "relu": lambda z: jnp.maximum(z, 0.0),
    "softplus": lambda z: jnp.logaddexp(z, 0.0),
    "leaky_relu(0.2)": lambda z: jnp.where(z > 0, z, 0.2 * z),
    "identity": lambda z: z,
    "softmax": lambda z: jax.nn.softmax(z),
}


def ref_z(params, x, hidden):
    """``z^L`` of one example."""
    a = x
    for l, layer in enumerate(params, start=1):
        z = layer["w"] @ a + layer["b"]
        if l < len(params):
            a = ACT[hidden](z)
    return z


def ref_cost(params, x, y, model):
    """``C_x`` of one example with target vector ``y``."""
    z = ref_z(params, x, model.hidden.spec)
    a = ACT[model.output.spec](z)
    if model.cost.name == "quadratic":
        return 0.5 * jnp.sum((a - y) ** 2)
    if model.cost.name == "log_likelihood":
        return -jnp.sum(y * jax.nn.log_softmax(z))
    return -jnp.sum(y * jnp.log(a) + (1 - y) * jnp.log1p(-a))


def flat_rows(fn, params, *batch):
    """Per-example ``fn(params, *example)`` differentiated and flattened: ``(m, P)``."""
    grads = jax.vmap(jax.grad(fn), (None,) + (0,) * len(batch))(params, *batch)
    return jax.vmap(lambda g: ravel_pytree(g)[0])(grads)


@partial(jax.jit, static_argnames="model")
def loss_rows(params, X, Y, model):
    return flat_rows(lambda p, x, y: ref_cost(p, x, y, model), params, X, Y)


@partial(jax.jit, static_argnames="model")
def jacobian_rows(params, X, model):
    """``(m, n_L, P)``: the Jacobian of ``z^L`` of every example, flattened."""

    def one(x):
        jac = jax.jacrev(lambda p: ref_z(p, x, model.hidden.spec))(params)
        return jax.vmap(lambda g: ravel_pytree(g)[0])(jac)

    return jax.vmap(one)(X)


CASES = [
    # (sizes, hidden, output, cost): depth 1 to 3, every cost, several activations.
    ((4, 3), "sigmoid", "sigmoid", "cross_entropy"),
    ((4, 5, 3), "tanh", "softmax", "log_likelihood"),
    ((4, 5, 3), "leaky_relu(0.2)", "softmax", "cross_entropy"),
    ((4, 6, 5, 2), "relu", "identity", "quadratic"),
    ((3, 4, 5, 2), "softplus", "tanh", "quadratic"),
]


def setup(case, dtype=np.float64, m1=7, m2=5, seed=0):
    """Model, params and two labelled sets, drawn with NumPy (no compilation per shape)."""
    sizes, hidden, output, cost = case
    model = jb.Model(sizes=sizes, hidden=hidden, output=output, cost=cost)
    rng = np.random.default_rng(seed)
    params = tuple(
        {
            "w": (rng.normal(size=(n_out, n_in)) / np.sqrt(n_in)).astype(dtype),
            "b": rng.normal(size=n_out).astype(dtype),
        }
        for n_in, n_out in itertools.pairwise(sizes)
    )
    X1 = rng.normal(size=(m1, sizes[0])).astype(dtype)
    X2 = rng.normal(size=(m2, sizes[0])).astype(dtype)
    n_out = sizes[-1]
    if output == "softmax":
        Y1, Y2 = rng.integers(0, n_out, m1), rng.integers(0, n_out, m2)
    else:
        Y1 = rng.uniform(size=(m1, n_out)).astype(dtype)
        Y2 = rng.uniform(size=(m2, n_out)).astype(dtype)
    return model, params, X1, Y1, X2, Y2


def targets(Y, model):
    return np.eye(model.sizes[-1])[Y] if Y.ndim == 1 else Y


def case_id(case):
    return f"{'-'.join(map(str, case[0]))}-{case[1]}-{case[2]}-{case[3]}"


# --- grad_gram ----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_grad_gram_matches_stored_autodiff(case, x64):
    model, params, X1, Y1, X2, Y2 = setup(case)
    G1 = loss_rows(params, X1, targets(Y1, model), model)
    G2 = loss_rows(params, X2, targets(Y2, model), model)
    K = jb.grad_gram(params, X1, Y1, model, X2, Y2)
    assert K.shape == (7, 5) and K.dtype == jnp.float64
    np.testing.assert_allclose(K, G1 @ G2.T, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(
        jb.grad_gram(params, X1, Y1, model), G1 @ G1.T, rtol=1e-10, atol=1e-12
    )
    # cosine similarities
    Gn1 = G1 / np.linalg.norm(G1, axis=1, keepdims=True)
    Gn2 = G2 / np.linalg.norm(G2, axis=1, keepdims=True)
    cos = jb.grad_gram(params, X1, Y1, model, X2, Y2, normalize=True)
    np.testing.assert_allclose(cos, Gn1 @ Gn2.T, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np.diag(jb.grad_gram(params, X1, Y1, model, normalize=True)), 1.0)


def test_grad_gram_chunks_equal_all_at_once(x64):
    model, params, X1, Y1, X2, Y2 = setup(CASES[1], m1=11)
    whole = jb.grad_gram(params, X1, Y1, model, X2, Y2)
    for chunk in (3, 50):  # with a remainder, larger than m1
        np.testing.assert_allclose(
            jb.grad_gram(params, X1, Y1, model, X2, Y2, chunk_size=chunk), whole, rtol=1e-12
        )
    np.testing.assert_allclose(
        jb.grad_gram(params, X1, Y1, model, normalize=True, chunk_size=np.int64(4)),
        jb.grad_gram(params, X1, Y1, model, normalize=True),
        rtol=1e-12,
    )


@pytest.mark.parametrize("chunk", [1, 4, 5, 12])
def test_grad_gram_blocks_match_stored_autodiff(chunk, x64):
    """Blocks that divide the rows, that overlap at the end, and a set paired with itself
    (only the blocks on and above the diagonal computed, the others mirrored)."""
    model, params, X1, Y1, X2, Y2 = setup(CASES[3], m1=13, m2=6)
    G1 = loss_rows(params, X1, targets(Y1, model), model)
    G2 = loss_rows(params, X2, targets(Y2, model), model)
    self_gram = jb.grad_gram(params, X1, Y1, model, chunk_size=chunk)
    np.testing.assert_allclose(self_gram, G1 @ G1.T, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(
        jb.grad_gram(params, X1, Y1, model, X2, Y2, chunk_size=chunk),
        G1 @ G2.T,
        rtol=1e-10,
        atol=1e-12,
    )


def test_block_edges_cover_every_row():
    for m in (1, 7, 512, 513, 1000, 5000):
        for chunk in (None, 1, 3, 512, 10_000):
            b = attribution.block_edge(m, chunk)
            count = -(-m // b)
            assert 1 <= b <= min(m, chunk or attribution.BLOCK)
            # the last block starts at m - b, overlapping the one before by < count rows
            assert (count - 1) * b < m <= count * b and count * b - m < count


def test_grad_gram_is_the_gradients_of_per_example_grads(x64):
    """Same gradients as jbackprop.per_example_grads; dropout is off, as at inference."""
    model, params, X1, Y1, _, _ = setup(CASES[3])
    G = jb.per_example_grads(params, X1, Y1, model)
    rows = jax.vmap(lambda g: ravel_pytree(g)[0])(G)
    np.testing.assert_allclose(jb.grad_gram(params, X1, Y1, model), rows @ rows.T, rtol=1e-10)
    dropped = dataclasses.replace(model, dropout=0.5)
    np.testing.assert_allclose(
        jb.grad_gram(params, X1, Y1, dropped), rows @ rows.T, rtol=1e-10, atol=1e-12
    )


def test_zero_gradient_has_cosine_zero(x64):
    model = jb.Model(sizes=(2, 2), hidden="relu", output="identity", cost="quadratic")
    params = ({"w": jnp.eye(2), "b": jnp.zeros(2)},)
    X = jnp.array([[1.0, 2.0], [3.0, -1.0]])
    Y = jnp.array([[1.0, 2.0], [0.0, 0.0]])  # the first example is fitted exactly
    cos = jb.grad_gram(params, X, Y, model, normalize=True)
    np.testing.assert_allclose(cos, [[0.0, 0.0], [0.0, 1.0]])


# --- empirical NTK -----------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES[::2], ids=case_id)
def test_empirical_ntk_matches_jacrev(case, x64):
    model, params, X1, _, X2, _ = setup(case)
    J1, J2 = jacobian_rows(params, X1, model), jacobian_rows(params, X2, model)
    n_out = model.sizes[-1]
    T = jb.empirical_ntk(params, X1, model, X2, chunk_size=3)
    assert T.shape == (7, 5, n_out, n_out)
    np.testing.assert_allclose(T, jnp.einsum("ajp,bkp->abjk", J1, J2), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(
        jb.empirical_ntk(params, X1, model, trace=True),
        jnp.einsum("ajp,bjp->ab", J1, J1),
        rtol=1e-10,
        atol=1e-12,
    )


def test_empirical_ntk_chunks_and_self_pairing(x64):
    model, params, X1, _, _, _ = setup(CASES[3], m1=9)
    whole = jb.empirical_ntk(params, X1, model)
    np.testing.assert_allclose(jb.empirical_ntk(params, X1, model, chunk_size=2), whole)
    np.testing.assert_allclose(jb.empirical_ntk(params, X1, model, X1), whole)
    # symmetric: Θ(x_i, x_j)_{kl} = Θ(x_j, x_i)_{lk}
    np.testing.assert_allclose(whole, jnp.transpose(whole, (1, 0, 3, 2)), rtol=1e-12)


# --- TracIn --------------------------------------------------------------------------------


def test_tracin_is_the_weighted_sum_over_checkpoints(tmp_path, x64):
    case = CASES[1]
    model, p0, X_tr, Y_tr, X_te, Y_te = setup(case, m1=8, m2=4)
    checkpoints = [setup(case, seed=s)[1] for s in (0, 1, 2)]
    etas = [0.5, 0.25, 0.125]
    direct = sum(
        eta
        * loss_rows(p, X_te, targets(Y_te, model), model)
        @ loss_rows(p, X_tr, targets(Y_tr, model), model).T
        for eta, p in zip(etas, checkpoints, strict=True)
    )
    S = attribution.tracin(checkpoints, X_tr, Y_tr, X_te, Y_te, model, etas)
    assert S.shape == (4, 8)
    np.testing.assert_allclose(S, direct, rtol=1e-10)
    # params stacked along a leading axis, as fit_many returns them
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *checkpoints)
    np.testing.assert_allclose(
        attribution.tracin(stacked, X_tr, Y_tr, X_te, Y_te, model, etas, chunk_size=3), direct
    )
    # paths to parameter files; etas None means 1 for every checkpoint
    paths = [
        jb.save_params(tmp_path / f"ck{i}.safetensors", p, model) for i, p in enumerate(checkpoints)
    ]
    unit = attribution.tracin([str(p) for p in paths], X_tr, Y_tr, X_te, Y_te, model)
    ones = sum(attribution.tracin([p], X_tr, Y_tr, X_te, Y_te, model) for p in checkpoints)
    np.testing.assert_allclose(unit, ones, rtol=1e-10)
    # one checkpoint is grad_gram of the test set against the training set
    np.testing.assert_allclose(
        attribution.tracin(p0, X_tr, Y_tr, X_te, Y_te, model, 2.0),
        2.0 * jb.grad_gram(p0, X_te, Y_te, model, X_tr, Y_tr),
        rtol=1e-12,
    )


# --- TRAK -----------------------------------------------------------------------------------


def margin(params, x, y, hidden):
    """TRAK's ``ln(p/(1-p))`` of the correct class, written from its definition."""
    p = jax.nn.softmax(ref_z(params, x, hidden))
    return jnp.log(p[y]) - jnp.log1p(-p[y])


@partial(jax.jit, static_argnames="hidden")
def margin_rows(params, X, Y, hidden):
    return flat_rows(lambda p, x, y: margin(p, x, y, hidden), params, X, Y)


@partial(jax.jit, static_argnames="hidden")
def correct_probability(params, X, Y, hidden):
    z = jax.vmap(lambda x: ref_z(params, x, hidden))(X)
    return jnp.take_along_axis(jax.nn.softmax(z), Y[:, None], axis=1)[:, 0]


def explicit_trak(models, X_tr, Y_tr, X_te, Y_te, model, damping):
    """Algorithm 1 of Park et al. with explicit (unprojected) feature matrices."""
    hidden = model.hidden.spec
    total, q = 0.0, 0.0
    for params in models:
        Phi, phi = margin_rows(params, X_tr, Y_tr, hidden), margin_rows(params, X_te, Y_te, hidden)
        lam = damping * np.trace(Phi @ Phi.T) / Phi.shape[0]
        total = total + phi @ np.linalg.solve(Phi.T @ Phi + lam * np.eye(Phi.shape[1]), Phi.T)
        q = q + 1.0 - np.asarray(correct_probability(params, X_tr, Y_tr, hidden))
    return (total / len(models)) * (q / len(models))[None, :]


@pytest.mark.slow
@pytest.mark.parametrize("case", [CASES[1], CASES[2]], ids=case_id)
def test_trak_matches_explicit_features(case, x64):
    model, _, X_tr, Y_tr, X_te, Y_te = setup(case, m1=9, m2=4)
    models = [setup(case, seed=s)[1] for s in (3, 4)]
    S = attribution.trak(models, X_tr, Y_tr, X_te, Y_te, model, damping=0.05)
    assert S.shape == (4, 9)
    want = explicit_trak(models, X_tr, Y_tr, X_te, Y_te, model, 0.05)
    np.testing.assert_allclose(S, want, rtol=1e-8, atol=1e-12)
    # one-hot targets name the same classes as labels
    one_hot = targets(Y_tr, model)
    np.testing.assert_allclose(
        attribution.trak(models, X_tr, one_hot, X_te, Y_te, model, 0.05, chunk_size=2),
        want,
        rtol=1e-8,
        atol=1e-12,
    )


def test_trak_single_sigmoid_unit(x64):
    model = jb.Model(sizes=(3, 4, 1), hidden="tanh", output="sigmoid", cost="cross_entropy")
    _, params, X_tr, _, X_te, _ = setup(((3, 4, 1), "tanh", "sigmoid", "cross_entropy"), m1=6, m2=2)
    Y_tr = np.array([[1.0], [0.0], [1.0], [1.0], [0.0], [0.0]])
    Y_te = np.array([[0.0], [1.0]])

    @jax.jit
    def reference(params):
        def f(p, x, y):  # ln(p/(1-p)) of the correct label: ±z
            return (2 * y[0] - 1) * ref_z(p, x, "tanh")[0]

        z = jax.vmap(lambda x: ref_z(params, x, "tanh")[0])(X_tr)
        q = jax.nn.sigmoid(-(2 * Y_tr[:, 0] - 1) * z)
        return flat_rows(f, params, X_tr, Y_tr), flat_rows(f, params, X_te, Y_te), q

    Phi, phi, q = map(np.asarray, reference(params))
    lam = 0.1 * np.trace(Phi @ Phi.T) / 6
    want = phi @ np.linalg.solve(Phi.T @ Phi + lam * np.eye(Phi.shape[1]), Phi.T) * q[None]
    S = attribution.trak([params], X_tr, Y_tr, X_te, Y_te, model, damping=0.1)
    np.testing.assert_allclose(S, want, rtol=1e-8, atol=1e-12)


# --- float32, jit ----------------------------------------------------------------------------


def test_float32_and_jit():
    model, params, X1, Y1, X2, Y2 = setup(CASES[2], dtype=np.float32)
    K = jb.grad_gram(params, X1, Y1, model, X2, Y2)
    T = jb.empirical_ntk(params, X1, model, X2, trace=True)
    S = attribution.tracin([params, params], X2, Y2, X1, Y1, model, [1.0, 2.0])
    R = attribution.trak([params], X2, Y2, X1, Y1, model, 0.1)
    for out in (K, T, S, R):
        assert out.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out)))

    @jax.jit
    def everything(params, X1, Y1, X2, Y2):
        return (
            jb.grad_gram(params, X1, Y1, model, X2, Y2),
            jb.empirical_ntk(params, X1, model, X2, trace=True),
            attribution.tracin([params, params], X2, Y2, X1, Y1, model, jnp.array([1.0, 2.0])),
            attribution.trak([params], X2, Y2, X1, Y1, model, 0.1),
        )

    for got, want in zip(everything(params, X1, Y1, X2, Y2), (K, T, S, R), strict=True):
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-5)
    np.testing.assert_allclose(S, 3.0 * K, rtol=1e-5)


# --- argument checks ---------------------------------------------------------------------------


def bad_calls():
    model, params, X1, Y1, X2, Y2 = setup(CASES[1], dtype=np.float32)
    linear = jb.Model(sizes=(4, 5, 3), hidden="tanh", output="identity", cost="quadratic")
    gram = jb.grad_gram
    tracin, trak = attribution.tracin, attribution.trak
    return [
        ("X1 has shape", lambda: gram(params, X1[:, :2], Y1, model)),
        ("X1 is empty", lambda: gram(params, X1[:0], Y1[:0], model)),
        ("Y1 holds class labels", lambda: gram(params, X1, Y1 + 3, model)),
        ("Y2 has shape", lambda: gram(params, X1, Y1, model, X2, Y2[:2])),
        ("X2 and Y2 must be given together", lambda: gram(params, X1, Y1, model, X2)),
        ("chunk_size must be", lambda: gram(params, X1, Y1, model, chunk_size=0)),
        ("chunk_size must be", lambda: gram(params, X1, Y1, model, chunk_size=True)),
        ("model must be a jbackprop.Model", lambda: gram(params, X1, Y1, (4, 5, 3))),
        ("params has 1 layers", lambda: gram(params[:1], X1, Y1, model)),
        ("X2 has shape", lambda: jb.empirical_ntk(params, X1, model, X2[:, :3])),
        ("chunk_size must be", lambda: jb.empirical_ntk(params, X1, model, chunk_size=2.5)),
        ("etas must be", lambda: tracin([params, params], X1, Y1, X2, Y2, model, [1.0])),
        ("etas must be", lambda: tracin([params], X1, Y1, X2, Y2, model, float("nan"))),
        ("checkpoints must be a non-empty list", lambda: tracin([], X1, Y1, X2, Y2, model)),
        ("checkpoints must be", lambda: tracin({"w": 1}, X1, Y1, X2, Y2, model)),
        (
            "checkpoints\\[1\\]: params has 1 layers",
            lambda: tracin([params, params[:1]], X1, Y1, X2, Y2, model),
        ),
        (
            "checkpoints\\[0\\]: parameter file",
            lambda: tracin(["/nonexistent.safetensors"], X1, Y1, X2, Y2, model),
        ),
        ("X_test has shape", lambda: tracin([params], X1, Y1, X2[:, :1], Y2, model)),
        ("Y_train has shape", lambda: tracin([params], X1, Y1[:3], X2, Y2, model)),
        ("damping must be finite and > 0", lambda: trak([params], X1, Y1, X2, Y2, model, 0.0)),
        ("damping must be finite and > 0", lambda: trak([params], X1, Y1, X2, Y2, model, -1.0)),
        ("trak needs a classifier", lambda: trak([params], X1, Y1, X2, Y2, linear)),
        (
            "params_list \\(stacked",
            lambda: trak(
                tuple({"w": l["w"][None, :, :2], "b": l["b"][None]} for l in params),
                X1,
                Y1,
                X2,
                Y2,
                model,
            ),
        ),
    ]


@pytest.mark.parametrize("index", range(len(bad_calls())))
def test_argument_errors_name_the_argument(index):
    message, call = bad_calls()[index]
    with pytest.raises(ValueError, match=message):
        call()


# --- the experiment ----------------------------------------------------------------------------


@pytest.mark.slow
def test_quick_experiment_end_to_end(tmp_path, mnist_dir, monkeypatch, capsys):
    from jbackprop.experiments.attribution import main

    monkeypatch.setenv("JBACKPROP_DATA", str(mnist_dir.parent))
    out = tmp_path / "run"
    assert main(["--quick", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    methods = [r["method"] for r in results["lds"]]
    assert methods == ["Grad-Dot", "Grad-Cos", "TracIn", "TRAK-1", "TRAK-5"]
    assert all(np.isfinite(r["lds"]) and -1 <= r["lds"] <= 1 for r in results["lds"])
    assert (
        results["grad_gram_speed"]["max_abs_diff"] <= 1e-4 * results["grad_gram_speed"]["max_abs"]
    )
    for name in ("results.md", "attribution.png", "ground_truth.npz", "scores.npz"):
        assert (out / name).stat().st_size > 0
    _, model = jb.load_params(out / "models" / "half_0.safetensors")
    assert model.sizes == tuple(results["setup"]["sizes"])
    assert "| TRAK-5 | 5 |" in capsys.readouterr().out
