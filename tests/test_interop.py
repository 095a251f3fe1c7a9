"""jbackprop.interop: Flax, Equinox and Haiku MLPs convert exactly, and agree with jbackprop.

For every library and several depths, activations, costs and dtypes: ``from_*`` then
``to_*`` gives the user's structure back bit for bit; ``jb.forward`` equals the module's own
apply (followed by the loss's softmax or sigmoid when the module returns logits); and
``jb.grad`` equals ``jax.grad`` of the loss written with the user's library.
"""

from __future__ import annotations

import functools
import importlib
import itertools
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jbackprop as jb

README = Path(__file__).resolve().parents[1] / "README.md"


def _library(name: str) -> Any:
    """Import an interop library; skip without it, except on CI, where that is a failure."""
    try:
        return importlib.import_module(name)
    except ImportError:
        message = f"{name} is not installed (pip install 'jbackprop[interop]')"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message}; CI must install it", pytrace=False)
        pytest.skip(message)


def _library_fixture(module: str):
    """A module-scoped fixture giving ``module``, or skipping the tests that ask for it."""
    return pytest.fixture(scope="module")(lambda: _library(module))


nn = _library_fixture("flax.linen")
nnx = _library_fixture("flax.nnx")
eqx = _library_fixture("equinox")
hk = _library_fixture("haiku")


# --- the cases: widths, hidden activation, cost, dtype, l2 ----------------------------

ACT = {
    "relu": jax.nn.relu,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "softplus": jax.nn.softplus,
    "leaky_relu(0.2)": functools.partial(jax.nn.leaky_relu, negative_slope=0.2),
}
LINK = {"log_likelihood": jax.nn.softmax, "cross_entropy": jax.nn.sigmoid}


class Case(NamedTuple):
    widths: tuple[int, ...]  # equal hidden widths, so eqx.nn.MLP can build every case
    hidden: str
    cost: str
    x64: bool
    l2: float = 0.0


CASES = [
    Case((5, 7, 3), "relu", "log_likelihood", False),
    Case((4, 6, 6, 2), "tanh", "cross_entropy", True, l2=0.3),
    Case((3, 2), "sigmoid", "quadratic", False),
    Case((5, 4, 4, 4, 3), "leaky_relu(0.2)", "quadratic", True, l2=1.0),
    Case((6, 5, 5, 4), "softplus", "log_likelihood", True),
]
IDS = [f"{len(c.widths) - 1}layers-{c.hidden}-{c.cost}-{'f64' if c.x64 else 'f32'}" for c in CASES]
# The quick tier converts the first two cases (float32 and float64, two costs); the full
# suite all five.
PARAMS = [c if i < 2 else pytest.param(c, marks=pytest.mark.slow) for i, c in enumerate(CASES)]


@pytest.fixture(params=PARAMS, ids=IDS)
def case(request):
    """The case, with 64-bit floats on for the float64 ones (and restored afterwards)."""
    with jax.enable_x64(request.param.x64):
        yield request.param


def data(case: Case, m: int = 16):
    # NumPy draws: eager jax.random calls would compile once per shape and dtype.
    rng = np.random.default_rng(7)
    dtype = np.float64 if case.x64 else np.float32
    X = rng.standard_normal((m, case.widths[0])).astype(dtype)
    n_out = case.widths[-1]
    if case.cost == "log_likelihood":
        Y = rng.integers(0, n_out, m)
    elif case.cost == "cross_entropy":
        Y = rng.uniform(size=(m, n_out)).astype(dtype)
    else:
        Y = rng.standard_normal((m, n_out)).astype(dtype)
    return jnp.asarray(X), jnp.asarray(Y)


def materialise(abstract, seed: int = 0):
    """Fill a library's abstract init (``jax.eval_shape``) with random values.

    The structure is exactly what the library's init builds; only the values differ. This
    skips compiling each library's random initialisers, the slowest part of these tests.
    """
    rng = np.random.default_rng(seed)

    def fill(x):
        if not isinstance(x, jax.ShapeDtypeStruct):
            return x
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.key(seed)
        if not jnp.issubdtype(x.dtype, jnp.floating):
            return jnp.zeros(x.shape, x.dtype)
        return jnp.asarray(0.7 * rng.standard_normal(x.shape), x.dtype)

    return jax.tree.map(fill, abstract)


def user_loss(case: Case, out, Y, kernels):
    """The loss a user writes around their module's output: optax's, with their own L2."""
    if case.cost == "log_likelihood":
        c = optax.softmax_cross_entropy_with_integer_labels(out, Y)
    elif case.cost == "cross_entropy":
        c = optax.sigmoid_binary_cross_entropy(out, Y).sum(-1)
    else:
        c = 0.5 * jnp.sum((out - Y) ** 2, axis=-1)
    penalty = sum(jnp.sum(k**2) for k in kernels)
    return c.mean() + case.l2 / (2 * len(Y)) * penalty


def expected_output(case: Case, out):
    return LINK.get(case.cost, lambda z: z)(out)


def tol(case: Case) -> dict[str, float]:
    return {"rtol": 1e-10, "atol": 1e-12} if case.x64 else {"rtol": 2e-5, "atol": 2e-6}


def assert_identical(a, b) -> None:
    """Same tree structure, dtypes and bits."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def assert_close(a, b, case: Case) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol(case))


def check_agreement(case: Case, params, model, X, Y, module_out, user_grads, to_user) -> None:
    """Forward equals the module's apply; jb.grad, written back, equals jax.grad."""
    assert model.sizes == case.widths
    dtype = jnp.float64 if case.x64 else jnp.float32
    assert all(leaf.dtype == dtype for leaf in jax.tree.leaves(params))
    np.testing.assert_allclose(
        np.asarray(jb.forward(params, X, model)),
        np.asarray(expected_output(case, module_out)),
        **tol(case),
    )
    assert_close(to_user(jb.grad(params, X, Y, model, n=len(X))), user_grads, case)


# --- Flax linen -----------------------------------------------------------------------


def linen_mlp(nn, widths, act, dtype=jnp.float32):
    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            for i, width in enumerate(widths[1:]):
                x = nn.Dense(width, dtype=dtype, param_dtype=dtype)(x)
                if i < len(widths) - 2:
                    x = act(x)
            return x  # logits: the loss applies softmax or sigmoid

    return MLP()


def init(module, input_shape):
    """A linen module's variables, from its abstract init (see :func:`materialise`)."""
    x = jax.ShapeDtypeStruct(input_shape, jnp.float32)
    return materialise(jax.eval_shape(module.init, jax.random.key(0), x))


@pytest.mark.slow
def test_flax_linen(nn, case):
    X, Y = data(case)
    module = linen_mlp(nn, case.widths, ACT[case.hidden], X.dtype)
    variables = materialise(jax.eval_shape(module.init, jax.random.key(0), X))
    params, model = jb.interop.from_flax(
        variables["params"], hidden=case.hidden, cost=case.cost, l2=case.l2
    )
    assert_identical(jb.interop.to_flax(params, like=variables["params"]), variables["params"])
    assert list(jb.interop.to_flax(params, like=variables["params"])) == list(variables["params"])

    def loss(p):
        kernels = [layer["kernel"] for layer in p.values()]
        return user_loss(case, module.apply({"params": p}, X), Y, kernels)

    check_agreement(
        case,
        params,
        model,
        X,
        Y,
        module.apply(variables, X),
        jax.jit(jax.grad(loss))(variables["params"]),
        lambda g: jb.interop.to_flax(g, like=variables["params"]),
    )


def test_flax_order_is_by_number_not_by_key_order(nn):
    # jax.tree.map rebuilds dicts with sorted keys: Dense_10 and Dense_11 before Dense_2.
    module = linen_mlp(nn, (3, *[4] * 11, 2), jnp.tanh)
    X = jax.random.normal(jax.random.key(1), (8, 3))
    variables = materialise(jax.eval_shape(module.init, jax.random.key(0), X))
    shuffled = jax.tree.map(lambda x: x, variables["params"])
    assert list(shuffled)[:3] == ["Dense_0", "Dense_1", "Dense_10"]
    params, model = jb.interop.from_flax(shuffled, hidden="tanh", cost="quadratic")
    assert model.num_layers == 12
    np.testing.assert_allclose(jb.forward(params, X, model), module.apply(variables, X), atol=1e-6)
    assert_identical(jb.interop.to_flax(params, like=shuffled), shuffled)


def test_flax_named_layers_need_an_order(nn):
    class Net(nn.Module):
        def setup(self):
            self.hidden = nn.Dense(5)
            self.out = nn.Dense(2)

        def __call__(self, x):
            return self.out(jax.nn.relu(self.hidden(x)))

    X = jax.random.normal(jax.random.key(1), (8, 3))
    variables = materialise(jax.eval_shape(Net().init, jax.random.key(0), X))
    with pytest.raises(ValueError, match=r"cannot tell the order.*'hidden'.*'out'.*layers="):
        jb.interop.from_flax(variables["params"], hidden="relu", cost="quadratic")
    order = ["hidden", "out"]
    params, model = jb.interop.from_flax(
        variables["params"], hidden="relu", cost="quadratic", layers=order
    )
    np.testing.assert_allclose(jb.forward(params, X, model), Net().apply(variables, X), atol=1e-6)
    back = jb.interop.to_flax(params, like=variables["params"], layers=order)
    assert_identical(back, variables["params"])
    # The whole variables dict converts too: its path is params/hidden.
    whole, _ = jb.interop.from_flax(
        variables, hidden="relu", cost="quadratic", layers=["params/hidden", ("params", "out")]
    )
    assert_identical(whole, params)


def test_flax_frozen_dict_stays_frozen(nn):
    from flax.core import FrozenDict

    module = linen_mlp(nn, (3, 4, 2), jax.nn.relu)
    frozen = FrozenDict(init(module, (1, 3))["params"])
    params, _ = jb.interop.from_flax(frozen, hidden="relu", cost="quadratic")
    back = jb.interop.to_flax(params, like=frozen)
    assert isinstance(back, FrozenDict)
    assert_identical(back, frozen)


def test_to_flax_is_traceable(nn):
    module = linen_mlp(nn, (3, 4, 2), jax.nn.relu)
    X = jax.random.normal(jax.random.key(1), (8, 3))
    p = init(module, (8, 3))["params"]
    params, model = jb.interop.from_flax(p, hidden="relu", cost="quadratic")
    run = jax.jit(lambda q: module.apply({"params": jb.interop.to_flax(q, like=p)}, X))
    np.testing.assert_allclose(run(params), jb.forward(params, X, model), atol=1e-6)


# --- Flax nnx -------------------------------------------------------------------------


def nnx_mlp(nnx, widths, act, dtype=jnp.float32):
    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.layers = nnx.List(
                [
                    nnx.Linear(a, b, dtype=dtype, param_dtype=dtype, rngs=rngs)
                    for a, b in itertools.pairwise(widths)
                ]
            )
            self.dropout = nnx.Dropout(0.0, rngs=rngs)  # RNG state: not a parameter

        def __call__(self, x):
            for layer in self.layers[:-1]:
                x = act(layer(x))
            return self.layers[-1](x)

    graphdef, state = nnx.split(nnx.eval_shape(lambda: MLP(nnx.Rngs(0))))
    return nnx.merge(graphdef, materialise(state))


def test_flax_nnx(nnx, case):
    X, Y = data(case)
    module = nnx_mlp(nnx, case.widths, ACT[case.hidden], X.dtype)
    graphdef, state, rest = nnx.split(module, nnx.Param, ...)
    params, model = jb.interop.from_flax(module, hidden=case.hidden, cost=case.cost, l2=case.l2)
    assert_identical(jb.interop.to_flax(params, like=state), state)
    assert_identical(jb.interop.from_flax(state, hidden=case.hidden, cost=case.cost)[0], params)

    def loss(s):
        net = nnx.merge(graphdef, s, rest)
        return user_loss(case, net(X), Y, [layer.kernel[...] for layer in net.layers])

    check_agreement(
        case,
        params,
        model,
        X,
        Y,
        module(X),
        jax.jit(jax.grad(loss))(state),
        lambda g: jb.interop.to_flax(g, like=state),
    )


def test_flax_nnx_module_written_back_is_new(nnx):
    module = nnx.Sequential(
        nnx.Linear(3, 5, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(5, 2, rngs=nnx.Rngs(1))
    )
    X = jax.random.normal(jax.random.key(1), (8, 3))
    before = module(X)
    params, model = jb.interop.from_flax(module, hidden="relu", cost="quadratic")
    doubled = jax.tree.map(lambda x: 2 * x, params)
    new = jb.interop.to_flax(doubled, like=module)
    assert type(new) is type(module) and new is not module
    np.testing.assert_array_equal(module(X), before)  # like is not modified
    np.testing.assert_allclose(new(X), jb.forward(doubled, X, model), atol=1e-5)


# --- Haiku ----------------------------------------------------------------------------


def test_haiku(hk, case):
    X, Y = data(case)
    net = hk.without_apply_rng(
        hk.transform(lambda x: hk.nets.MLP(case.widths[1:], activation=ACT[case.hidden])(x))
    )
    # Haiku takes the params' dtype from X.
    hk_params = materialise(jax.eval_shape(net.init, jax.random.key(0), X))
    params, model = jb.interop.from_haiku(hk_params, hidden=case.hidden, cost=case.cost, l2=case.l2)
    assert_identical(jb.interop.to_haiku(params, like=hk_params), hk_params)

    def loss(p):
        return user_loss(case, net.apply(p, X), Y, [layer["w"] for layer in p.values()])

    check_agreement(
        case,
        params,
        model,
        X,
        Y,
        net.apply(hk_params, X),
        jax.jit(jax.grad(loss))(hk_params),
        lambda g: jb.interop.to_haiku(g, like=hk_params),
    )


def test_haiku_bare_linear_names(hk):
    # Unnamed hk.Linear layers are "linear", "linear_1", ..., "linear_10".
    def f(x):
        for _ in range(11):
            x = jax.nn.sigmoid(hk.Linear(4)(x))
        return hk.Linear(2)(x)

    net = hk.without_apply_rng(hk.transform(f))
    X = jax.random.normal(jax.random.key(1), (8, 3))
    hk_params = materialise(jax.eval_shape(net.init, jax.random.key(0), X))
    assert {"linear", "linear_1", "linear_10", "linear_11"} <= set(hk_params)
    params, model = jb.interop.from_haiku(hk_params, hidden="sigmoid", cost="quadratic")
    np.testing.assert_allclose(jb.forward(params, X, model), net.apply(hk_params, X), atol=1e-6)


# --- Equinox --------------------------------------------------------------------------


def eqx_mlp(eqx, widths, act, dtype=jnp.float32, **kwargs):
    abstract = eqx.filter_eval_shape(
        eqx.nn.MLP,
        widths[0],
        widths[-1],
        widths[1] if len(widths) > 2 else 1,
        len(widths) - 2,
        activation=act,
        dtype=dtype,
        key=jax.random.key(0),
        **kwargs,
    )
    return materialise(abstract)


def eqx_arrays(eqx, tree):
    return eqx.filter(tree, eqx.is_array)


@pytest.mark.slow
def test_equinox(eqx, case):
    X, Y = data(case)
    mlp = eqx_mlp(eqx, case.widths, ACT[case.hidden], X.dtype)
    params, model = jb.interop.from_equinox(mlp, cost=case.cost, l2=case.l2)
    assert model.hidden.spec == (case.hidden if len(case.widths) > 2 else "identity")
    back = jb.interop.to_equinox(params, like=mlp)
    assert eqx.tree_equal(back, mlp)
    assert_identical(eqx_arrays(eqx, back), eqx_arrays(eqx, mlp))

    def loss(m):
        return user_loss(case, jax.vmap(m)(X), Y, [layer.weight for layer in m.layers])

    check_agreement(
        case,
        params,
        model,
        X,
        Y,
        jax.vmap(mlp)(X),
        eqx_arrays(eqx, eqx.filter_jit(eqx.filter_grad(loss))(mlp)),
        lambda g: eqx_arrays(eqx, jb.interop.to_equinox(g, like=mlp)),
    )


@pytest.mark.parametrize("depth", [1, 3])
def test_equinox_scan(eqx, depth):
    mlp = eqx_mlp(eqx, (3, *[5] * depth, 2), jax.nn.relu, scan=True)
    params, model = jb.interop.from_equinox(mlp, cost="log_likelihood")
    assert model.sizes == (3, *[5] * depth, 2)
    X = jax.random.normal(jax.random.key(1), (8, 3))
    np.testing.assert_allclose(
        jb.forward(params, X, model), jax.nn.softmax(jax.vmap(mlp)(X)), atol=1e-6
    )
    back = jb.interop.to_equinox(params, like=mlp)
    assert eqx.tree_equal(back, mlp)
    assert_identical(eqx_arrays(eqx, back), eqx_arrays(eqx, mlp))


def test_equinox_activations_recognised_by_value(eqx):
    mlp = eqx_mlp(eqx, (3, 4, 2), lambda z: jnp.maximum(z, 0.0))
    assert jb.interop.from_equinox(mlp, cost="quadratic")[1].hidden.spec == "relu"
    mlp = eqx_mlp(eqx, (3, 4, 2), jax.nn.relu, final_activation=jax.nn.sigmoid)
    params, model = jb.interop.from_equinox(mlp, cost="cross_entropy")
    assert (model.hidden.spec, model.output.spec) == ("relu", "sigmoid")
    X = jax.random.normal(jax.random.key(1), (8, 3))
    np.testing.assert_allclose(jb.forward(params, X, model), jax.vmap(mlp)(X), atol=1e-6)
    with pytest.raises(ValueError, match=r"output='softmax', but the MLP's final_activation"):
        jb.interop.from_equinox(mlp, cost="log_likelihood", output="softmax")
    # A logits MLP takes whichever output the loss applies.
    logits = eqx_mlp(eqx, (3, 4, 2), jax.nn.relu)
    assert jb.interop.from_equinox(logits, cost="quadratic", output="tanh")[1].output.spec == "tanh"


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda eqx: eqx_mlp(eqx, (3, 4, 2), jax.nn.gelu), r"activation .* does not compute"),
        (lambda eqx: eqx_mlp(eqx, (3, 4, 2), jax.nn.relu6), r"activation .* does not compute"),
        (lambda eqx: eqx_mlp(eqx, (3, 4, 2), eqx.nn.PReLU()), r"learnable activation"),
        (lambda eqx: eqx_mlp(eqx, (3, 4, 2), jax.nn.relu, use_bias=False), r"layers\[0\].*bias"),
        (
            lambda eqx: eqx_mlp(eqx, (3, 4, 2), jax.nn.relu, use_final_bias=False),
            r"layers\[1\].*no bias",
        ),
        (
            lambda eqx: eqx.filter_eval_shape(eqx.nn.MLP, 3, "scalar", 4, 1, key=jax.random.key(0)),
            r"out_size='scalar'",
        ),
        (lambda eqx: eqx.nn.Linear(3, 2, key=jax.random.key(0)), r"converts an equinox.nn.MLP"),
    ],
)
def test_equinox_refusals(eqx, build, message):
    with pytest.raises(ValueError, match=message):
        jb.interop.from_equinox(build(eqx), cost="quadratic")


# --- refusals for parameter dicts -----------------------------------------------------


def layer(n_in, n_out, dtype=np.float32, kernel="kernel", bias="bias"):
    return {kernel: np.ones((n_in, n_out), dtype), bias: np.zeros(n_out, dtype)}


def test_flax_refusals(nn):
    conv = init(nn.Conv(4, (3, 3)), (1, 8, 8, 1))["params"]
    with pytest.raises(ValueError, match=r"layer '<top level>'.*shape \(3, 3, 1, 4\)"):
        jb.interop.from_flax(conv, cost="quadratic")
    no_bias = init(nn.Dense(3, use_bias=False), (1, 2))["params"]
    with pytest.raises(ValueError, match=r"no bias \('bias'\).*use_bias=True"):
        jb.interop.from_flax({"Dense_0": no_bias}, cost="quadratic")
    norm = init(nn.LayerNorm(), (1, 3))["params"]
    with pytest.raises(
        ValueError, match=r"'LayerNorm_0/(bias|scale)' is not part of a dense layer"
    ):
        jb.interop.from_flax({"Dense_0": layer(2, 3), "LayerNorm_0": norm}, cost="quadratic")


@pytest.mark.parametrize(
    ("tree", "kwargs", "message"),
    [
        ({"Dense_0": layer(2, 3), "Dense_1": layer(4, 1)}, {}, r"do not chain: 'Dense_1' takes 4"),
        ({}, {}, r"found no Flax dense layer"),
        (
            {"Dense_0": layer(2, 3), "Dense_1": layer(3, 1, np.float64)},
            {},
            r"'Dense_1' holds float64 but layer 'Dense_0' holds float32",
        ),
        ({"Dense_0": layer(2, 3, np.int32)}, {}, r"holds int32, not floating-point"),
        ({"Dense_0": {**layer(2, 3), "lora": np.ones(2)}}, {}, r"holds \['lora'\] besides"),
        ({"Dense_0": layer(2, 3), "Dense_1": layer(3, 1)}, {"hidden": None}, r"hidden is required"),
        ({"Dense_0": layer(2, 3)}, {"layers": ["Dense_9"]}, r"layers names \['Dense_9'\], not"),
        (
            {"Dense_0": layer(2, 3), "Dense_1": layer(3, 1)},
            {"layers": ["Dense_0"]},
            r"layers leaves out \['Dense_1'\]",
        ),
        ({"Dense_0": layer(2, 3)}, {"sizes": (2, 3)}, r"\['sizes'\] are set by the converter"),
        ({"Dense_0": layer(2, 3)}, {"output": "relu", "cost": "log_likelihood"}, r"softmax"),
    ],
)
def test_dict_refusals(tree, kwargs, message):
    kwargs = {"hidden": "relu", "cost": "quadratic", **kwargs}
    with pytest.raises(ValueError, match=message):
        jb.interop.from_flax(tree, **kwargs)


def test_haiku_refuses_a_linear_without_bias():
    tree = {"linear": {"w": np.ones((2, 3), np.float32)}}
    with pytest.raises(ValueError, match=r"layer 'linear' has no bias \('b'\).*with_bias=True"):
        jb.interop.from_haiku(tree, cost="quadratic")


def test_to_refuses_params_of_another_network():
    like = {"Dense_0": layer(2, 3), "Dense_1": layer(3, 1)}
    params, _ = jb.interop.from_flax(like, hidden="relu", cost="quadratic")
    with pytest.raises(ValueError, match=r"params has 1 layers but like holds 2"):
        jb.interop.to_flax(params[:1], like=like)
    wrong = (params[0], {"w": np.ones((2, 3), np.float32), "b": np.ones(2, np.float32)})
    with pytest.raises(ValueError, match=r"params\[1\]\['w'\] has shape \(2, 3\).*'Dense_1'"):
        jb.interop.to_flax(wrong, like=like)
    with pytest.raises(ValueError, match=r"one \{'w', 'b'\} dict per layer"):
        jb.interop.to_haiku({"w": 1}, like={"linear": layer(2, 3, kernel="w", bias="b")})


def test_model_options_pass_through():
    tree = {"Dense_0": layer(2, 3), "Dense_1": layer(3, 2)}
    _, model = jb.interop.from_flax(
        tree, hidden="leaky_relu(0.1)", cost="log_likelihood", l2=0.5, l1=0.1, dropout=0.2
    )
    assert (model.l2, model.l1, model.dropout) == (0.5, 0.1, 0.2)
    assert (model.hidden.spec, model.output.spec) == ("leaky_relu(0.1)", "softmax")


# --- optional dependencies ------------------------------------------------------------


def test_import_jbackprop_imports_no_interop_library():
    code = (
        "import sys, jbackprop; jbackprop.interop.from_haiku; "
        "print(sorted(m for m in ('flax', 'equinox', 'haiku') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_missing_library_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "equinox", None)  # makes `import equinox` fail
    with pytest.raises(ImportError, match=re.escape("pip install 'jbackprop[interop]'")):
        jb.interop.from_equinox(object(), cost="quadratic")


# --- the README's example -------------------------------------------------------------


@pytest.mark.slow
def test_readme_flax_example_runs(nn):
    match = re.search(r"<!-- interop-example -->\s*```python\n(.*?)```", README.read_text(), re.S)
    assert match, "README has no block marked <!-- interop-example -->"
    assert len(match[1].splitlines()) < 30
    namespace: dict = {}
    exec(compile(match[1], str(README), "exec"), namespace)
    history, acc = namespace["history"], namespace["flax_accuracy"]
    assert len(history) == namespace["epochs"]
    assert float(acc) == pytest.approx(history[-1]["train_accuracy"], abs=1e-6)
