"""ablate: the hand-written step reformulated in the script, against jb.fit's epoch.

Which formulation choices cost time? The chapter-3 step is written out here (eqs 3, 6-10,
13, with row-major products ``X Wᵀ``, as the library wrote them when the section was
made) with three switches: the bias gradient as ``δ.sum(0)/m`` instead of
``1ᵀδ/m``, ``f' = a(1-a)`` from the forward pass instead of ``σ(z)σ(-z)``, and ``δ`` scaled
by ``1/m`` before the products. Every variant runs in the reference epoch, alternated with
the library's epoch and the ``jax.grad`` epoch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from scripts.bench import library, reference
from scripts.bench.context import Context
from scripts.bench.harness import alternate, sgd_runner
from scripts.bench.reference import AD
from scripts.bench.setting import BATCH_SIZES, FLOP, N_TRAIN

JB = "jb.fit epoch"
VARIANTS = {
    "script step (1ᵀδ/m, σ(z)σ(-z), δᵀa/m)": {},
    "bias: δ.sum(0)/m": {"bias_sum": True},
    "f' = a(1-a) from the forward pass": {"prime_from_a": True},
    "scale δ by 1/m before the products": {"scale_delta": True},
    "all three": {"bias_sum": True, "prime_from_a": True, "scale_delta": True},
}


def hand_grad(bias_sum: bool = False, prime_from_a: bool = False, scale_delta: bool = False):
    """The minibatch gradient of the 784-100-10 network with the formulation switches."""

    def g(params, X, Y, key, n):
        (l1, l2) = params
        m = X.shape[0]
        z1 = X @ l1["w"].T + l1["b"]
        a1 = jax.nn.sigmoid(z1)
        z2 = a1 @ l2["w"].T + l2["b"]
        d2 = jax.nn.sigmoid(z2) - Y
        prime = a1 * (1.0 - a1) if prime_from_a else jax.nn.sigmoid(z1) * jax.nn.sigmoid(-z1)
        d1 = (d2 @ l2["w"]) * prime
        grads = []
        for a, d in ((X, d1), (a1, d2)):
            if scale_delta:
                d = d / m
                gw = d.T @ a
                gb = d.sum(0) if bias_sum else jnp.ones((m,), d.dtype) @ d
            else:
                gw = d.T @ a / m
                gb = d.sum(0) / m if bias_sum else jnp.full((m,), 1.0 / m, d.dtype) @ d
            grads.append({"w": gw, "b": gb})
        return reference.l2_grads(tuple(grads), params, n)

    return g


def run(ctx: Context) -> None:
    print("\n== ablate: reformulations of the hand-written step ==", flush=True)
    s, report = ctx.setting, ctx.report
    for bs in BATCH_SIZES:
        epochs = {JB: library.epoch_fn(s.model, s.optimizer, bs, s.X, s.Y, s.n)}
        for name, kw in VARIANTS.items():
            step = reference.grad_step(hand_grad(**kw), s.optimizer)
            epochs[name] = reference.on_data(reference.make_epoch(step, bs), s.X, s.Y, s.n)
        epochs[AD] = reference.on_data(reference.ad_epoch(s.optimizer, bs), s.X, s.Y, s.n)
        runners = {name: sgd_runner(e, s.params, s.optimizer) for name, e in epochs.items()}
        samples = alternate(runners, ctx.args.epochs, s.key)
        lib = runners[JB].params
        extras = {
            name: {"max_abs_diff_to_library": reference.max_abs_diff(r.params, lib)}
            for name, r in runners.items()
        }
        report.epoch_rows("ablate", bs, samples, N_TRAIN, FLOP, AD, extras)
        report.print_rows("ablate", bs)
