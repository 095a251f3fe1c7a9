"""Validation: ``Model`` configuration errors and bad arguments to the public functions.

Every bad argument must be a ``ValueError`` that names the problem, raised in Python
before any JAX kernel runs. The ``no_kernels`` fixture replaces the jitted kernels of
``jbackprop.network`` with functions that fail the test, so a check that comes too late
(or not at all) shows up as an ``AssertionError`` instead of the expected ``ValueError``.
"""

from __future__ import annotations

import itertools
import json
from functools import partial

import jax
import numpy as np
import pytest

import jbackprop as jb
from jbackprop import activations, costs, network
from jbackprop.model import Model

# ---------------------------------------------------------------- Model


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sizes": (3,)}, r"at least two entries .* got \(3,\)"),
        ({"sizes": ()}, "at least two entries"),
        ({"sizes": 5}, "sizes must be a sequence of layer widths, got 5"),
        ({"sizes": (3, 0, 2)}, r"every size must be a positive integer, got sizes \(3, 0, 2\)"),
        ({"sizes": (3, -4, 2)}, "every size must be a positive integer"),
        ({"sizes": (3, 2.5)}, "every size must be a positive integer"),
        ({"sizes": (3.0, 2)}, "every size must be a positive integer"),
        ({"sizes": (3, True)}, "every size must be a positive integer"),
        ({"sizes": (3, "4")}, "every size must be a positive integer"),
        ({"sizes": (2, 2), "hidden": "swish"}, "unknown activation 'swish'"),
        ({"sizes": (2, 2), "output": "gelu"}, "unknown activation 'gelu'"),
        ({"sizes": (2, 2), "cost": "hinge"}, "unknown cost 'hinge'"),
        (
            {"sizes": (2, 2), "output": "sigmoid", "cost": "log_likelihood"},
            "'log_likelihood' needs a 'softmax' output layer; got output 'sigmoid'",
        ),
        (
            {"sizes": (2, 2), "output": "identity", "cost": "cross_entropy"},
            r"'cross_entropy' needs outputs in \(0, 1\).*got output 'identity'",
        ),
        (
            {"sizes": (2, 2), "output": "relu", "cost": "cross_entropy"},
            "'cross_entropy' needs outputs in .*got output 'relu'",
        ),
        (
            {"sizes": (2, 2), "output": "tanh", "cost": "cross_entropy"},
            "'cross_entropy' needs outputs in .*got output 'tanh'",
        ),
        (
            {"sizes": (2, 3, 2), "hidden": "softmax"},
            "hidden activation 'softmax' is not elementwise; softmax is allowed only as the output",
        ),
        (
            {"sizes": (2, 1), "output": "softmax", "cost": "log_likelihood"},
            "softmax output needs at least 2 units",
        ),
        ({"sizes": (2, 3, 2), "dropout": 1.0}, r"dropout must be >= 0 and < 1, got 1.0"),
        ({"sizes": (2, 3, 2), "dropout": -0.1}, r"dropout must be >= 0 and < 1, got -0.1"),
        ({"sizes": (2, 2), "l2": -1.0}, r"l2 must be >= 0 and finite, got -1.0"),
        ({"sizes": (2, 2), "l1": -0.5}, r"l1 must be >= 0 and finite, got -0.5"),
        ({"sizes": (2, 2), "l2": float("inf")}, "l2 must be >= 0 and finite"),
        ({"sizes": (2, 2), "l1": float("nan")}, "l1 must be >= 0 and finite"),
        ({"sizes": (2, 2), "l2": "a lot"}, "l2 must be a number, got 'a lot'"),
    ],
)
def test_model_rejects(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Model(**kwargs)


def test_model_resolves_names_and_is_hashable():
    a = Model((3, 4, 2), hidden="leaky_relu(0.2)", output="softmax", cost="log_likelihood")
    b = Model(
        [3, 4, 2],
        hidden=activations.leaky_relu(0.2),
        output=activations.softmax,
        cost=costs.log_likelihood,
    )
    assert a == b and hash(a) == hash(b)
    assert a.sizes == (3, 4, 2) and isinstance(a.sizes, tuple)
    assert a.hidden == activations.leaky_relu(0.2) and a.cost is costs.log_likelihood
    assert a.num_layers == 2
    assert a.activation(1) == activations.leaky_relu(0.2)
    assert a.activation(2) is activations.softmax
    assert a != Model((3, 4, 2), hidden="leaky_relu(0.3)", output="softmax", cost="log_likelihood")
    assert Model((3, np.int64(4), 2)).sizes == (3, 4, 2)
    assert len({a, b, Model((3, 4, 2))}) == 2


def test_model_is_a_jit_static_argument_without_retracing():
    traces = []

    @partial(jax.jit, static_argnames="model")
    def first_width(x, model):
        traces.append(model)
        return x * model.sizes[0]

    assert float(first_width(1.0, Model((3, 2), l2=0.5))) == 3.0
    assert float(first_width(2.0, Model([3, 2], l2=0.5))) == 6.0  # equal model: cached
    assert len(traces) == 1
    first_width(1.0, Model((3, 2), l2=0.25))
    assert len(traces) == 2


@pytest.mark.parametrize(
    "model",
    [
        Model((784, 100, 10)),
        Model((3, 4, 4, 2), hidden="leaky_relu(0.2)", output="softmax", cost="log_likelihood"),
        Model((2, 5, 1), hidden="tanh", output="identity", cost="quadratic", l2=5.0, l1=0.1),
        Model((2, 5, 3), hidden=activations.leaky_relu(), dropout=0.25),
    ],
    ids=str,
)
def test_model_dict_round_trip(model):
    config = model.to_dict()
    assert Model.from_dict(config) == model
    assert Model.from_dict(json.loads(json.dumps(config))) == model


def test_model_from_dict_rejects_unknown_keys():
    config = {**Model((2, 2)).to_dict(), "momentum": 0.9}
    with pytest.raises(ValueError, match=r"unknown configuration keys \['momentum'\]"):
        Model.from_dict(config)


# ---------------------------------------------------------------- bad function arguments

MODEL = Model((3, 4, 2))


def params_for(sizes):
    return tuple(
        {"w": np.zeros((o, i), np.float32), "b": np.zeros(o, np.float32)}
        for i, o in itertools.pairwise(sizes)
    )


PARAMS = params_for(MODEL.sizes)
X = np.zeros((5, 3), np.float32)
LABELS = np.array([0, 1, 1, 0, 1])


def _kernel_reached(*args, **kwargs):
    raise AssertionError("a jitted kernel ran although the arguments were invalid")


@pytest.fixture
def no_kernels(monkeypatch):
    for name in ("_forward", "_backprop", "_per_example_grads", "_grad", "_cost"):
        monkeypatch.setattr(network, name, _kernel_reached)
    monkeypatch.setattr(network, "_value_and_grad", _kernel_reached)


MINIBATCH_FUNCTIONS = [jb.grad, jb.cost, jb.value_and_grad, jb.per_example_grads]


@pytest.mark.parametrize("fn", MINIBATCH_FUNCTIONS, ids=lambda f: f.__name__)
@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((PARAMS, np.zeros((5, 4)), LABELS), r"X has shape \(5, 4\), expected \(m, 3\)"),
        ((PARAMS, np.zeros(3), LABELS[:1]), r"X has shape \(3,\), expected \(m, 3\)"),
        ((PARAMS, np.zeros((0, 3)), LABELS[:0]), "X is empty"),
        ((PARAMS, X, np.zeros((5, 3))), r"Y has shape \(5, 3\), expected target vectors \(5, 2\)"),
        ((PARAMS, X, LABELS[:4]), r"Y has shape \(4,\), expected .* integer class labels \(5,\)"),
        ((PARAMS, X, np.array([0, 1, 2, 0, 1])), r"labels in \[0, 2\].*must lie in \[0, 1\]"),
        ((PARAMS, X, np.array([0, -1, 1, 0, 1])), r"labels in \[-1, 1\]"),
        (
            (params_for((3, 5, 2)), X, LABELS),
            r"params\[0\]\['w'\] \(layer 1\) has shape \(5, 3\), but the model with sizes "
            r"\(3, 4, 2\) expects \(4, 3\)",
        ),
        ((params_for((3, 2)), X, LABELS), "params has 1 layers but the model .* has 2"),
        ((params_for((3, 4, 4, 2)), X, LABELS), "params has 3 layers"),
        (({"w": 0, "b": 0}, X, LABELS), "params must be a tuple or list"),
        (((PARAMS[0], {"w": PARAMS[1]["w"]}), X, LABELS), r"params\[1\] \(layer 2\) must be a"),
        (
            ((PARAMS[0], {"w": PARAMS[1]["w"], "b": np.zeros(3)}), X, LABELS),
            r"params\[1\]\['b'\] \(layer 2\) has shape \(3,\).* expects \(2,\)",
        ),
    ],
)
def test_minibatch_functions_reject(fn, args, message, no_kernels):
    with pytest.raises(ValueError, match=message):
        fn(*args, MODEL)


@pytest.mark.parametrize("fn", [jb.grad, jb.cost, jb.value_and_grad], ids=lambda f: f.__name__)
def test_n_required_and_positive_with_regularisation(fn, no_kernels):
    for reg in ({"l2": 5.0}, {"l1": 1.0}):
        with pytest.raises(
            ValueError, match=r"n \(the training-set size of eqs 12-13\) is required"
        ):
            fn(PARAMS, X, LABELS, Model((3, 4, 2), **reg))
    for bad in (0, -10):
        with pytest.raises(ValueError, match=f"n must be a positive training-set size, got {bad}"):
            fn(PARAMS, X, LABELS, Model((3, 4, 2), l2=5.0), n=bad)


@pytest.mark.parametrize("fn", MINIBATCH_FUNCTIONS, ids=lambda f: f.__name__)
def test_key_required_with_dropout(fn, no_kernels):
    with pytest.raises(ValueError, match=r"key is required: the model has dropout=0.5"):
        fn(PARAMS, X, LABELS, Model((3, 4, 2), dropout=0.5))


def test_backprop_rejects(no_kernels):
    with pytest.raises(ValueError, match=r"x has shape \(1, 3\), expected \(3,\)"):
        jb.backprop(PARAMS, np.zeros((1, 3)), 0, MODEL)
    with pytest.raises(ValueError, match=r"x has shape \(4,\), expected \(3,\)"):
        jb.backprop(PARAMS, np.zeros(4), 0, MODEL)
    with pytest.raises(ValueError, match=r"y holds class labels in \[2, 2\]"):
        jb.backprop(PARAMS, np.zeros(3), 2, MODEL)
    with pytest.raises(ValueError, match=r"y has shape \(3,\), expected target vectors \(2,\)"):
        jb.backprop(PARAMS, np.zeros(3), np.zeros(3), MODEL)
    with pytest.raises(ValueError, match="key is required"):
        jb.backprop(PARAMS, np.zeros(3), 0, Model((3, 4, 2), dropout=0.1))


def test_forward_rejects(no_kernels):
    with pytest.raises(ValueError, match=r"x has shape \(2, 2\), expected \(3,\) or \(m, 3\)"):
        jb.forward(PARAMS, np.zeros((2, 2)), MODEL)
    with pytest.raises(ValueError, match=r"x has shape \(1, 1, 3\)"):
        jb.forward(PARAMS, np.zeros((1, 1, 3)), MODEL)
    with pytest.raises(ValueError, match="params has 1 layers"):
        jb.forward(params_for((3, 2)), np.zeros(3), MODEL)
    with pytest.raises(ValueError, match="x must be an array"):
        jb.forward(PARAMS, object(), MODEL)


def test_per_example_grads_rejects_bad_chunk_size(no_kernels):
    for bad in (0, -2, True, 2.5, "4"):
        with pytest.raises(ValueError, match="chunk_size must be a positive integer or None"):
            jb.per_example_grads(PARAMS, X, LABELS, MODEL, chunk_size=bad)


def test_errors_are_raised_while_tracing_under_jit(no_kernels):
    """Shape checks run on tracers too: under jax.jit the same ValueError, not an XLA error."""
    jitted = jax.jit(jb.grad, static_argnames="model")
    with pytest.raises(ValueError, match=r"X has shape \(5, 4\), expected \(m, 3\)"):
        jitted(PARAMS, np.zeros((5, 4), np.float32), LABELS, MODEL)
    with pytest.raises(ValueError, match=r"Y has shape \(5, 3\)"):
        jitted(PARAMS, X, np.zeros((5, 3), np.float32), MODEL)
    with pytest.raises(ValueError, match=r"params\[0\]\['w'\] \(layer 1\) has shape \(5, 3\)"):
        jitted(params_for((3, 5, 2)), X, LABELS, MODEL)
    with pytest.raises(ValueError, match="key is required"):
        jax.jit(jb.cost, static_argnames="model")(PARAMS, X, LABELS, Model((3, 4, 2), dropout=0.2))


def test_concrete_labels_closed_over_under_jit():
    """Labels captured by a user's jax.jit are concrete: range-checked, not staged out."""
    labels = jax.numpy.asarray(LABELS)
    g = jax.jit(lambda p: jb.grad(p, X, labels, MODEL))(PARAMS)
    np.testing.assert_allclose(g[0]["w"], jb.grad(PARAMS, X, labels, MODEL)[0]["w"])
    bad = labels + 1
    with pytest.raises(ValueError, match=r"class labels in \[1, 2\]"):
        jax.jit(lambda p: jb.grad(p, X, bad, MODEL))(PARAMS)


def test_init_params_rejects(no_kernels):
    with pytest.raises(ValueError, match="init_params: unknown scheme 'xavier'"):
        jb.init_params(jax.random.key(0), MODEL, scheme="xavier")
    with pytest.raises(ValueError, match=r"init_params: model must be a jbackprop\.Model"):
        jb.init_params(jax.random.key(0), (3, 4, 2))
