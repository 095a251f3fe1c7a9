"""Property tests: hand-written backprop against autodiff and finite differences.

Hypothesis draws random networks (1-3 weight layers of 1-6 units, every hidden activation,
every valid output/cost pairing, L1/L2/dropout on or off, integer labels or target
vectors) and checks that

* ``jb.grad`` equals ``jax.grad(jb.cost)``, in float64 tightly and float32 loosely, both
  called eagerly and inside ``jax.jit``;
* the mean of ``jb.per_example_grads`` equals ``jb.grad`` of the unregularised model, and
  chunking does not change the per-example gradients;
* ``jb.grad`` agrees with central finite differences of ``jb.cost`` in float64.

Every new configuration compiles, so examples are few and shapes tiny.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jbackprop as jb

HIDDEN = ("sigmoid", "tanh", "relu", "softplus", "leaky_relu", jb.activations.leaky_relu(0.2))
PAIRINGS = (
    ("sigmoid", "cross_entropy"),
    ("softmax", "cross_entropy"),
    ("softmax", "log_likelihood"),
    ("identity", "quadratic"),
    ("sigmoid", "quadratic"),
    ("tanh", "quadratic"),
    ("softmax", "quadratic"),
)
TOLERANCE = {"float64": 1e-10, "float32": 1e-4}


@dataclasses.dataclass(frozen=True)
class Problem:
    """A drawn configuration; :meth:`build` makes its arrays in the requested dtype."""

    model: jb.Model
    m: int
    n: int
    targets: str  # "labels", "one_hot" or "soft"
    scheme: str
    seed: int

    def weight_scale(self, n_in: int) -> float:
        # init_params' two schemes, drawn with numpy: jax.random would compile per shape.
        return 1.0 / np.sqrt(n_in) if self.scheme == "scaled" else 1.0

    def build(self, dtype):
        model = self.model
        rng = np.random.default_rng(self.seed)
        params = tuple(
            {
                "w": jnp.asarray(rng.normal(size=(n_out, n_in)) * self.weight_scale(n_in), dtype),
                "b": jnp.asarray(rng.normal(size=n_out), dtype),
            }
            for n_in, n_out in zip(model.sizes[:-1], model.sizes[1:], strict=True)
        )
        X = jnp.asarray(rng.normal(size=(self.m, model.sizes[0])), dtype)
        k = model.sizes[-1]
        labels = rng.integers(0, k, self.m)
        if self.targets == "labels":
            Y = jnp.asarray(labels, jnp.int32)
        elif self.targets == "one_hot":
            Y = jnp.asarray(np.eye(k)[labels], dtype)
        elif model.cost.name == "log_likelihood":  # soft: a probability vector per row
            p = rng.gamma(1.0, size=(self.m, k))
            Y = jnp.asarray(p / p.sum(axis=1, keepdims=True), dtype)
        elif model.cost.name == "cross_entropy":  # soft: independent targets in (0, 1)
            Y = jnp.asarray(rng.uniform(size=(self.m, k)), dtype)
        else:  # quadratic: any real target
            Y = jnp.asarray(rng.normal(size=(self.m, k)), dtype)
        n = self.n if (model.l1 or model.l2) else None
        key = jax.random.key(self.seed + 1) if model.dropout else None
        return params, X, Y, n, key


strengths = st.one_of(st.just(0.0), st.floats(0.05, 5.0))


@st.composite
def problems(draw, min_m: int = 1) -> Problem:
    depth = draw(st.integers(1, 3))
    output, cost = draw(st.sampled_from(PAIRINGS))
    widths = [draw(st.integers(1, 6)) for _ in range(depth)]
    widths.append(draw(st.integers(2 if output == "softmax" else 1, 6)))
    model = jb.Model(
        sizes=tuple(widths),
        hidden=draw(st.sampled_from(HIDDEN)),
        output=output,
        cost=cost,
        l2=draw(strengths),
        l1=draw(strengths),
        dropout=draw(st.one_of(st.just(0.0), st.floats(0.1, 0.7))),
    )
    m = draw(st.integers(min_m, 5))
    return Problem(
        model=model,
        m=m,
        n=draw(st.integers(m, 100)),
        targets=draw(st.sampled_from(("labels", "one_hot", "soft"))),
        scheme=draw(st.sampled_from(("scaled", "normal"))),
        seed=draw(st.integers(0, 2**30)),
    )


def _both(params, X, Y, model, n, key):
    return jb.grad(params, X, Y, model, n, key), jax.grad(jb.cost)(params, X, Y, model, n, key)


_both_jit = jax.jit(_both, static_argnames="model")


@pytest.mark.slow
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@settings(settings.get_profile("jbackprop-core"), max_examples=4)
@given(problem=problems())
def test_grad_matches_autodiff(problem, dtype, jit, worst_grad_diff, max_abs_diff):
    with jax.enable_x64(dtype == "float64"):
        params, X, Y, n, key = problem.build(jnp.dtype(dtype))
        ours, autodiff = (_both_jit if jit else _both)(params, X, Y, problem.model, n, key)
        chex.assert_trees_all_equal_shapes_and_dtypes(ours, params)
        tol = TOLERANCE[dtype]
        chex.assert_trees_all_close(ours, autodiff, atol=tol, rtol=tol)
        diff = max_abs_diff(ours, autodiff)
    worst_grad_diff[dtype] = max(worst_grad_diff.get(dtype, 0.0), diff)


# A deterministic complement to the random draws: every output/cost pairing once, each
# with a different hidden activation and all regularisers on, in float64 under jit.
SWEEP = [
    jb.Model((3, 4, 3, k), hidden=h, output=o, cost=c, l2=1.5, l1=0.5, dropout=0.3)
    for (o, c), h, k in zip(PAIRINGS, (*HIDDEN, "tanh"), (1, 3, 2, 2, 3, 1, 4), strict=True)
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("model", "targets"),
    # Soft targets for the costs whose δ^L has a special form for them, labels otherwise.
    [(m, "labels" if m.cost.name == "quadratic" else "soft") for m in SWEEP],
    ids=lambda v: (
        f"{v.hidden.spec}-{v.output.name}-{v.cost.name}" if isinstance(v, jb.Model) else v
    ),
)
def test_grad_matches_autodiff_every_pairing(model, targets, worst_grad_diff, max_abs_diff):
    problem = Problem(model=model, m=4, n=20, targets=targets, scheme="normal", seed=7)
    with jax.enable_x64(True):
        params, X, Y, n, key = problem.build(jnp.float64)
        ours, autodiff = _both_jit(params, X, Y, model, n, key)
        chex.assert_trees_all_close(ours, autodiff, atol=1e-10, rtol=1e-10)
        diff = max_abs_diff(ours, autodiff)
    worst_grad_diff["float64"] = max(worst_grad_diff.get("float64", 0.0), diff)


@partial(jax.jit, static_argnames=("model", "chunk_size"))
def _per_example_checks(params, X, Y, model, key, chunk_size):
    unregularised = dataclasses.replace(model, l1=0.0, l2=0.0)
    return (
        jb.per_example_grads(params, X, Y, model, key),
        jb.per_example_grads(params, X, Y, model, key, chunk_size=chunk_size),
        jb.grad(params, X, Y, unregularised, key=key),
    )


@pytest.mark.slow
@settings(settings.get_profile("jbackprop-core"), max_examples=4)
@given(problem=problems(min_m=2), data=st.data())
def test_per_example_grads_mean_and_chunks(problem, data):
    chunk = data.draw(st.integers(1, problem.m - 1), label="chunk_size")
    with jax.enable_x64(True):
        params, X, Y, _, key = problem.build(jnp.float64)
        full, chunked, batch = _per_example_checks(params, X, Y, problem.model, key, chunk)
        chex.assert_tree_shape_prefix(full, (problem.m,))
        chex.assert_trees_all_close(chunked, full, atol=1e-12, rtol=1e-12)
        mean = jax.tree.map(lambda g: np.mean(np.asarray(g), axis=0), full)
        chex.assert_trees_all_close(mean, batch, atol=1e-12, rtol=1e-12)


def _directional_check(problem: Problem) -> None:
    params, X, Y, n, key = problem.build(jnp.float64)
    model = problem.model
    g = jax.tree.map(np.asarray, jb.grad(params, X, Y, model, n, key))
    params = jax.tree.map(np.asarray, params)  # perturb in numpy: no compile per shape
    rng = np.random.default_rng(problem.seed)
    h = 1e-5
    for _ in range(2):
        v = jax.tree.map(lambda p: rng.normal(size=p.shape), params)
        plus = jax.tree.map(lambda p, d: p + h * d, params, v)
        minus = jax.tree.map(lambda p, d: p - h * d, params, v)
        c_plus = float(jb.cost(plus, X, Y, model, n, key))
        c_minus = float(jb.cost(minus, X, Y, model, n, key))
        numeric = (c_plus - c_minus) / (2 * h)
        analytic = sum(
            np.vdot(a, b) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(v), strict=True)
        )
        np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-8)


@pytest.mark.slow
@settings(settings.get_profile("jbackprop-core"), max_examples=4)
@given(problem=problems())
def test_grad_matches_central_differences(problem):
    """The directional derivative along random directions, by central differences."""
    with jax.enable_x64(True):
        _directional_check(problem)
