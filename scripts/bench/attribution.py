"""attribution: jb.grad_gram and jb.empirical_ntk against the stored-Jacobian routes.

The network is dattri's MNIST-10 + MLP one, 784-128-64-10 with ReLU units and a softmax
output (log-likelihood). ``grad_gram`` of ``--attr-examples`` training images with
themselves is timed against ``vmap(jax.grad)`` per-example gradients flattened and
multiplied (the route that stores every gradient), and ``empirical_ntk`` of 500 x 500
images against ``vmap(jax.jacrev)`` of ``z^L`` contracted with ``einsum``. Both pairs are
checked to agree before timing; calls alternate, compiled, median of three.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import jbackprop as jb
from scripts.bench.context import Context
from scripts.bench.harness import clock, median

MODEL = jb.Model((784, 128, 64, 10), hidden="relu", output="softmax", cost="log_likelihood")
TARGETS = {"grad_gram": 50.0, "empirical_ntk": 10.0}


def _cost(params, x, y):
    """One example's cost, written from scratch: -log softmax(z^L)_y."""
    a = x
    for layer in params[:-1]:
        a = jax.nn.relu(layer["w"] @ a + layer["b"])
    z = params[-1]["w"] @ a + params[-1]["b"]
    return -jax.nn.log_softmax(z)[y]


def _logits(params, x):
    a = x
    for layer in params[:-1]:
        a = jax.nn.relu(layer["w"] @ a + layer["b"])
    return params[-1]["w"] @ a + params[-1]["b"]


@jax.jit
def stored_gram(params, X, y):
    g = jax.vmap(jax.grad(_cost), in_axes=(None, 0, 0))(params, X, y)
    flat = jnp.concatenate([leaf.reshape(X.shape[0], -1) for leaf in jax.tree.leaves(g)], 1)
    return flat @ flat.T


@jax.jit
def stored_ntk(params, X1, X2):
    def jac(X):
        J = jax.vmap(jax.jacrev(_logits), in_axes=(None, 0))(params, X)
        return [leaf.reshape(X.shape[0], 10, -1) for leaf in jax.tree.leaves(J)]

    return sum(jnp.einsum("ikp,jlp->ijkl", a, b) for a, b in zip(jac(X1), jac(X2), strict=True))


def run(ctx: Context) -> None:
    print("\n== attribution: grad_gram and empirical_ntk against stored Jacobians ==", flush=True)
    s, report, m = ctx.setting, ctx.report, ctx.args.attr_examples
    params = jb.init_params(jax.random.key(0), MODEL)
    labels = jnp.argmax(s.Y, axis=1)
    X, y = s.X[:m], labels[:m]
    X1, X2 = s.X[:500], s.X[500:1000]
    gram = jax.jit(lambda p, X, y: jb.grad_gram(p, X, y, MODEL))
    ntk = jax.jit(lambda p, A, B: jb.empirical_ntk(p, A, MODEL, B))
    pairs = {
        "grad_gram": ((gram, (params, X, y)), (stored_gram, (params, X, y)), f"{m} x {m}"),
        "empirical_ntk": ((ntk, (params, X1, X2)), (stored_ntk, (params, X1, X2)), "500 x 500"),
    }
    for name, ((ours, a), (theirs, b), shape) in pairs.items():
        want, got = np.asarray(theirs(*b)), np.asarray(ours(*a))
        err = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
        t_ours, t_theirs = [], []
        for _ in range(3):
            t_ours.append(clock(ours, *a)[1])
            t_theirs.append(clock(theirs, *b)[1])
        t1, t2 = median(t_ours), median(t_theirs)
        report.add(
            {
                "section": "attribution",
                "quantity": name,
                "shape": shape,
                "jb_seconds": t1,
                "stored_seconds": t2,
                "max_rel_err": err,
            }
        )
        print(
            f"  {name:<14} {shape:<11} jb {t1:8.3f} s  stored {t2:8.3f} s  ({t2 / t1:.0f}x)  "
            f"agreement max rel err {err:.1e}",
            flush=True,
        )
        report.check(f"{name} {shape} faster than the stored route", t2 / t1, ">=", TARGETS[name])
