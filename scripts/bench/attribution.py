"""attribution: jb.grad_gram and jb.empirical_ntk against the stored-Jacobian routes, and
jb.attribution.trak on an ensemble.

The network is dattri's MNIST-10 + MLP one, 784-128-64-10 with ReLU units and a softmax
output (log-likelihood). ``grad_gram`` of ``--attr-examples`` training images with
themselves is timed against ``vmap(jax.grad)`` per-example gradients flattened and
multiplied (the route that stores every gradient), and ``empirical_ntk`` of 500 x 500
images against ``vmap(jax.jacrev)`` of ``z^L`` contracted with ``einsum``. Both pairs are
checked to agree before timing; calls alternate, compiled, median of three. ``trak`` of 10
models over 5,000 training and 500 test images is timed alone, median of three: its
explicit route would solve a 109,386-dimensional system per model.

Memory is measured twice per route: the bytes XLA's compiled program allocates (its
arguments, result and temporaries, from ``memory_analysis``), and the peak resident set
of a fresh process that builds the inputs and calls the route once (compilation
included), beside that of a process that only builds the inputs.
"""

from __future__ import annotations

import multiprocessing
import resource
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jbackprop as jb
from scripts.bench.context import Context
from scripts.bench.harness import clock, median

MODEL = jb.Model((784, 128, 64, 10), hidden="relu", output="softmax", cost="log_likelihood")
TARGETS = {"grad_gram": 50.0, "empirical_ntk": 10.0}
NTK_EXAMPLES = 500
TRAK_MODELS, TRAK_TRAIN, TRAK_TEST = 10, 5000, 500


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


@jax.jit
def jb_gram(params, X, y):
    return jb.grad_gram(params, X, y, MODEL)


@jax.jit
def jb_ntk(params, X1, X2):
    return jb.empirical_ntk(params, X1, MODEL, X2)


@jax.jit
def jb_trak(stacked, X_train, y_train, X_test, y_test):
    return jb.attribution.trak(stacked, X_train, y_train, X_test, y_test, MODEL)


def ensemble(count: int):
    """``count`` initialisations stacked along a leading axis, as fit_many returns them."""
    models = [jb.init_params(jax.random.key(k), MODEL) for k in range(count)]
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *models)


# What a route is called with, built the same way in this process and in a fresh one:
# (route, argument builder) by name; a builder takes the images and labels.
def _gram_args(X, y, m):
    return jb.init_params(jax.random.key(0), MODEL), X[:m], y[:m]


def _ntk_args(X, y, m):
    n = NTK_EXAMPLES
    return jb.init_params(jax.random.key(0), MODEL), X[:n], X[n : 2 * n]


def _trak_args(X, y, m):
    n = TRAK_TRAIN
    return ensemble(TRAK_MODELS), X[:n], y[:n], X[n : n + TRAK_TEST], y[n : n + TRAK_TEST]


ROUTES: dict[str, tuple[Callable | None, Callable]] = {
    "inputs only": (None, _gram_args),
    "grad_gram": (jb_gram, _gram_args),
    "stored_gram": (stored_gram, _gram_args),
    "empirical_ntk": (jb_ntk, _ntk_args),
    "stored_ntk": (stored_ntk, _ntk_args),
    "trak": (jb_trak, _trak_args),
}


def _peak_rss_child(name: str, X: np.ndarray, y: np.ndarray, m: int, out) -> None:
    fn, build = ROUTES[name]
    args = build(jnp.asarray(X), jnp.asarray(y), m)
    if fn is not None:
        jax.block_until_ready(fn(*args))
    out.put(high_water_gib())


def high_water_gib() -> float:
    """This process's peak resident set, in GiB. ``VmHWM`` belongs to the address space,
    which ``exec`` replaces; ``getrusage``'s ``ru_maxrss`` would carry over the parent's
    peak into a spawned child."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def peak_rss(name: str, X: np.ndarray, y: np.ndarray, m: int) -> float:
    """The peak resident set (GiB) of a fresh process that calls route ``name`` once."""
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    child = ctx.Process(target=_peak_rss_child, args=(name, X, y, m, out))
    child.start()
    gib = out.get()
    child.join()
    return gib


def compiled_bytes(fn: Callable, *args) -> int:
    """What XLA's compiled ``fn`` allocates: arguments, result and temporaries."""
    stats = fn.lower(*args).compile().memory_analysis()
    return stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes


def run(ctx: Context) -> None:
    print("\n== attribution: grad_gram and empirical_ntk against stored Jacobians ==", flush=True)
    s, report, m = ctx.setting, ctx.report, ctx.args.attr_examples
    labels = jnp.argmax(s.Y, axis=1)
    # Only what the routes read, in NumPy, for the fresh processes of peak_rss.
    needed = max(m, 2 * NTK_EXAMPLES, TRAK_TRAIN + TRAK_TEST)
    X_np, y_np = np.asarray(s.X[:needed]), np.asarray(labels[:needed])
    base = peak_rss("inputs only", X_np, y_np, m)
    print(f"  a process that only builds the inputs peaks at {base:.2f} GiB RSS", flush=True)
    pairs = {
        "grad_gram": ("stored_gram", f"{m} x {m}"),
        "empirical_ntk": ("stored_ntk", f"{NTK_EXAMPLES} x {NTK_EXAMPLES}"),
    }
    for name, (stored, shape) in pairs.items():
        (ours, build), theirs = ROUTES[name], ROUTES[stored][0]
        args = build(s.X, labels, m)
        want, got = np.asarray(theirs(*args)), np.asarray(ours(*args))
        err = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
        del want, got
        t_ours, t_theirs = [], []
        for _ in range(3):
            t_ours.append(clock(ours, *args)[1])
            t_theirs.append(clock(theirs, *args)[1])
        t1, t2 = median(t_ours), median(t_theirs)
        mem1, mem2 = compiled_bytes(ours, *args) / 2**30, compiled_bytes(theirs, *args) / 2**30
        rss1, rss2 = peak_rss(name, X_np, y_np, m), peak_rss(stored, X_np, y_np, m)
        report.add(
            {
                "section": "attribution",
                "quantity": name,
                "shape": shape,
                "jb_seconds": t1,
                "stored_seconds": t2,
                "jb_samples": t_ours,
                "stored_samples": t_theirs,
                "jb_compiled_gib": mem1,
                "stored_compiled_gib": mem2,
                "jb_peak_rss_gib": rss1,
                "stored_peak_rss_gib": rss2,
                "inputs_only_peak_rss_gib": base,
                "max_rel_err": err,
            }
        )
        print(
            f"  {name:<14} {shape:<11} jb {t1:8.3f} s  stored {t2:8.3f} s  ({t2 / t1:.0f}x)  "
            f"agreement max rel err {err:.1e}\n"
            f"  {'':<26} compiled {mem1:6.3f} GiB vs {mem2:6.3f} GiB; "
            f"peak RSS {rss1:5.2f} GiB vs {rss2:5.2f} GiB",
            flush=True,
        )
        report.check(f"{name} {shape} faster than the stored route", t2 / t1, ">=", TARGETS[name])

    args = _trak_args(s.X, labels, m)
    clock(jb_trak, *args)  # compiles
    times = [clock(jb_trak, *args)[1] for _ in range(3)]
    mem = compiled_bytes(jb_trak, *args) / 2**30
    rss = peak_rss("trak", X_np, y_np, m)
    shape = f"{TRAK_MODELS} x {TRAK_TRAIN} x {TRAK_TEST}"
    report.add(
        {
            "section": "attribution",
            "quantity": "trak",
            "shape": shape,
            "jb_seconds": median(times),
            "jb_samples": times,
            "jb_compiled_gib": mem,
            "jb_peak_rss_gib": rss,
            "inputs_only_peak_rss_gib": base,
        }
    )
    print(
        f"  {'trak':<14} {shape:<11} jb {median(times):8.3f} s  compiled {mem:6.3f} GiB; "
        f"peak RSS {rss:5.2f} GiB",
        flush=True,
    )
