"""dp: DP-SGD epochs at minibatch 128, private against non-private and the stored route.

The private epoch is jb.fit's own epoch with ``gradient=jbackprop.privacy.DPGradient(clip,
noise_multiplier)``: clip 1.0, noise multiplier 1.1, fresh noise every step. Its variants
(no noise; the noise key turned into one of XLA's RngBitGenerator; stored per-example
gradients clipped with ``cᵀG`` products) run in the same epoch as ``gradient=`` functions.
The stored routes with ``optax.contrib.differentially_private_aggregate`` keep the
aggregate's state, so they run in the reference epoch, as does ``jax.grad``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

import jbackprop as jb
from jbackprop.privacy import DPGradient
from scripts.bench import library, reference
from scripts.bench.context import Context
from scripts.bench.harness import EpochRunner, alternate, clock, median, sgd_runner
from scripts.bench.reference import AD, l2_grads
from scripts.bench.setting import DP_CLIP, DP_NOISE, FLOP, N_TRAIN

BS = 128
NONPRIVATE = "jb.fit epoch (non-private)"
PRIV = "jb.fit epoch, DPGradient (private)"
STORED_FAST = "jb.per_example_grads stored, clipped with cᵀG"
STORED_OPTAX = "jb.per_example_grads + optax DP aggregate"


def rbg_private(params, X, Y, model, n, key):
    """DPGradient's step with its noise key's bits rewrapped as an ``rbg`` key."""
    _, noise_key = jax.random.split(key)
    rbg = jax.random.wrap_key_data(jax.random.bits(noise_key, (4,), jnp.uint32), impl="rbg")
    return jb.clipped_grad(
        params, X, Y, model, n, clip=DP_CLIP, noise_multiplier=DP_NOISE, noise_key=rbg
    )


def stored_private(params, X, Y, model, n, key):
    """Stored per-example gradients, clipped, summed and noised with fast reductions."""
    G = jb.per_example_grads(params, X, Y, model)
    return l2_grads(reference.dp_stored(G, jax.random.split(key)[1]), params, n)


def optax_epoch(ctx: Context, per_example: Callable) -> EpochRunner:
    """Per-example gradients through optax's DP aggregate, then SGD, in the reference epoch."""
    s = ctx.setting
    dp = optax.contrib.differentially_private_aggregate(DP_CLIP, DP_NOISE, jax.random.key(3))

    def step(params, state, Xb, Yb, key, n):
        opt_state, dp_state = state
        agg, dp_state = dp.update(per_example(params, Xb, Yb), dp_state)
        updates, opt_state = s.optimizer.update(l2_grads(agg, params, n), opt_state, params)
        return optax.apply_updates(params, updates), (opt_state, dp_state)

    epoch = reference.on_data(reference.make_epoch(step, BS, step_keys=True), s.X, s.Y, s.n)
    return EpochRunner(epoch, s.params, (s.optimizer.init(s.params), dp.init(s.params)))


def agreement(ctx: Context) -> None:
    """clipped_grad against per_example_grads + optax's aggregate with the same noise key;
    and the time of one step's noise against one jb.grad call."""
    s, report = ctx.setting, ctx.report
    X, Y, key = s.X[:BS], s.Y[:BS], jax.random.key(3)
    dp = optax.contrib.differentially_private_aggregate(DP_CLIP, DP_NOISE, key)
    ref, _ = dp.update(jb.per_example_grads(s.params, X, Y, s.model), dp.init(s.params))
    got = jb.clipped_grad(
        s.params, X, Y, s.model, s.n, clip=DP_CLIP, noise_multiplier=DP_NOISE, noise_key=key
    )
    err = reference.max_rel_err(got, l2_grads(ref, s.params, s.n))
    print(f"  clipped_grad vs per_example_grads + optax aggregate: max rel err {err:.2e}")
    report.info["dp_agreement_max_rel_err"] = err
    size = sum(x.size for x in jax.tree.leaves(s.params))
    k = jax.random.key(5)
    calls = {
        "threefry bits": (jax.jit(lambda k: jax.random.bits(k, (size,))), (k,)),
        "normal": (jax.jit(lambda k: jax.random.normal(k, (size,))), (k,)),
        "jb.grad": (jax.jit(lambda p, X, Y: jb.grad(p, X, Y, s.model, s.n)), (s.params, X, Y)),
    }
    us = {}
    for name, (f, args) in calls.items():
        clock(f, *args)
        us[name] = 1e6 * median(clock(f, *args)[1] for _ in range(30))
    report.info["dp_noise_us_per_step"] = us
    print(
        f"  per step: {size} normal draws {us['normal']:.0f} us (threefry bits alone "
        f"{us['threefry bits']:.0f} us); jb.grad at m={BS} {us['jb.grad']:.0f} us",
        flush=True,
    )


def run(ctx: Context) -> None:
    print("\n== dp: DP-SGD epochs at minibatch 128 ==", flush=True)
    s, report = ctx.setting, ctx.report
    agreement(ctx)
    gradients = {
        NONPRIVATE: None,
        PRIV: DPGradient(DP_CLIP, DP_NOISE),
        "jb.fit epoch, DPGradient, noise_multiplier=0": DPGradient(DP_CLIP, 0.0),
        "jb.fit epoch, DP with an rbg noise key": rbg_private,
        STORED_FAST: stored_private,
    }
    runners = {
        name: sgd_runner(
            library.epoch_fn(s.model, s.optimizer, BS, s.X, s.Y, s.n, gradient=g),
            s.params,
            s.optimizer,
        )
        for name, g in gradients.items()
    }
    runners[STORED_OPTAX] = optax_epoch(ctx, lambda p, X, Y: jb.per_example_grads(p, X, Y, s.model))
    runners["vmap(jax.grad) + optax DP aggregate"] = optax_epoch(ctx, reference.per_example)
    runners[AD] = sgd_runner(
        reference.on_data(reference.ad_epoch(s.optimizer, BS), s.X, s.Y, s.n),
        s.params,
        s.optimizer,
    )
    samples = alternate(runners, ctx.args.epochs, s.key)
    report.epoch_rows("dp", BS, samples, N_TRAIN, FLOP, AD)
    report.print_rows("dp")
    t = {name: median(x.wall) for name, x in samples.items()}
    report.check(
        "DP epoch (DPGradient) within 1.5x of the non-private epoch (time ratio)",
        t[PRIV] / t[NONPRIVATE],
        "<=",
        1.5,
    )
    report.check(
        "DP epoch >= 5x faster than per_example_grads + optax aggregate",
        t[STORED_OPTAX] / t[PRIV],
        ">=",
        5.0,
        f"{t[STORED_FAST] / t[PRIV]:.1f}x against the stored route with fast reductions",
    )
