"""dp: DP-SGD epochs, private against non-private and the stored route.

The private epoch is jb.fit's own epoch with ``gradient=jbackprop.privacy.DPGradient(clip,
noise_multiplier)``: clip 1.0, noise multiplier 1.1, fresh noise every step, over Poisson
samples (``sampling="poisson"``, the sampling the accountant assumes), and over shuffled
minibatches. The targets compare the Poisson-sampled private epoch with jb.fit's plain
shuffled epoch, so they price sampling, clipping and noise together. Its variants
(no noise; the noise drawn by ``jax.random.normal`` as before ``jbackprop.noise``; the
noise key turned into one of XLA's RngBitGenerator; stored per-example gradients clipped
with ``cᵀG`` products) run in the same epoch as ``gradient=`` functions. The stored routes
with ``optax.contrib.differentially_private_aggregate`` keep the aggregate's state, so they
run in the reference epoch, as does ``jax.grad``. All of that at minibatch 128 on the
chapter-3 network; then the private and non-private epochs at lot 600 on 784-1000-10,
where the noise is ten times larger.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

import jbackprop as jb
from jbackprop.noise import normal
from jbackprop.privacy import DPGradient
from scripts.bench import library, reference
from scripts.bench.context import Context
from scripts.bench.harness import EpochRunner, alternate, clock, median, sgd_runner
from scripts.bench.reference import AD, l2_grads
from scripts.bench.setting import (
    DP_CLIP,
    DP_NOISE,
    FLOP,
    N_TRAIN,
    flop_per_example,
    sigmoid_model,
)

BS = 128
LOT, WIDE = 600, (784, 1000, 10)
NONPRIVATE = "jb.fit epoch (non-private)"
PRIV = "jb.fit epoch, DPGradient (private)"
POISSON = "jb.fit epoch, DPGradient, Poisson sampling"
POISSON_PLAIN = "jb.fit epoch, Poisson sampling (non-private)"
OLD_NOISE = "jb.fit epoch, DP with jax.random.normal noise"
STORED_FAST = "jb.per_example_grads stored, clipped with cᵀG"
STORED_OPTAX = "jb.per_example_grads + optax DP aggregate"


def rbg_private(params, X, Y, model, n, key):
    """DPGradient's step with its noise key's bits rewrapped as an ``rbg`` key."""
    _, noise_key = jax.random.split(key)
    rbg = jax.random.wrap_key_data(jax.random.bits(noise_key, (4,), jnp.uint32), impl="rbg")
    return jb.clipped_grad(
        params, X, Y, model, n, clip=DP_CLIP, noise_multiplier=DP_NOISE, noise_key=rbg
    )


def jax_normal_private(params, X, Y, model, n, key):
    """DPGradient's step with the noise drawn as before ``jbackprop.noise``: one
    ``jax.random.normal`` per leaf, from split keys as optax draws it."""
    _, noise_key = jax.random.split(key)
    g = jb.clipped_grad(params, X, Y, model, n, clip=DP_CLIP, noise_multiplier=0.0)
    leaves, treedef = jax.tree.flatten(g)
    keys = jax.random.split(noise_key, len(leaves) + 1)[1:]
    std = DP_CLIP * DP_NOISE / X.shape[0]
    noisy = [
        l + std * jax.random.normal(k, l.shape, l.dtype) for l, k in zip(leaves, keys, strict=True)
    ]
    return jax.tree.unflatten(treedef, noisy)


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


def noise_draws(ctx: Context) -> None:
    """One step's noise for each network, per draw: the threefry hashes ``jax.random``
    spends (one per number) and ``jbackprop.noise`` spends (one per pair),
    ``jax.random.normal`` and ``jbackprop.noise.normal`` over the parameters' leaves, and
    one jb.grad call at minibatch 128 for scale."""
    s, report = ctx.setting, ctx.report
    X, Y = s.X[:BS], s.Y[:BS]
    k = jax.random.key(5)
    out = {}
    for sizes in (s.model.sizes, WIDE):
        shapes = [l.shape for l in jax.tree.leaves(jb.init_params(k, sigmoid_model(sizes)))]
        p = sum(math.prod(sh) for sh in shapes)
        calls = {
            "threefry hashes, one per number": lambda k, p=p: jax.random.bits(k, (p,)),
            # an even count: XLA:CPU's threefry loop is several times slower over an odd one
            "threefry hashes, one per pair": lambda k, p=p: jax.random.bits(k, (-(-p // 16) * 8,)),
            "jax.random.normal": lambda k, shapes=shapes: [
                jax.random.normal(kk, sh)
                for kk, sh in zip(jax.random.split(k, len(shapes) + 1)[1:], shapes, strict=True)
            ],
            "jbackprop.noise.normal": lambda k, shapes=shapes: [
                normal(k, sh, stream=l) for l, sh in enumerate(shapes)
            ],
        }
        fns = {name: jax.jit(f) for name, f in calls.items()}
        us = {name: [] for name in fns}
        for f in fns.values():
            clock(f, k)
        for _ in range(30):  # interleaved, so that all see the same load
            for name, f in fns.items():
                us[name].append(1e6 * clock(f, k)[1])
        us = {name: median(t) for name, t in us.items()}
        label = "-".join(map(str, sizes))
        out[label] = us | {"numbers": p}
        print(f"  one step's noise on {label} ({p} numbers), median us per draw:")
        for name, t in us.items():
            print(f"    {name:<36} {t:8.0f} us  {p / t:6.1f}M numbers/s", flush=True)
    f = jax.jit(lambda p, X, Y: jb.grad(p, X, Y, s.model, s.n))
    clock(f, s.params, X, Y)
    out["jb.grad_us_m128"] = 1e6 * median(clock(f, s.params, X, Y)[1] for _ in range(30))
    print(f"  jb.grad at m={BS} on {'-'.join(map(str, s.model.sizes))}: "
          f"{out['jb.grad_us_m128']:.0f} us", flush=True)  # fmt: skip
    report.info["dp_noise_us_per_step"] = out


def agreement(ctx: Context) -> None:
    """clipped_grad against per_example_grads + optax's aggregate, noise off (the noise is
    drawn differently: same distribution, other numbers)."""
    s, report = ctx.setting, ctx.report
    X, Y, key = s.X[:BS], s.Y[:BS], jax.random.key(3)
    dp = optax.contrib.differentially_private_aggregate(DP_CLIP, 0.0, key)
    ref, _ = dp.update(jb.per_example_grads(s.params, X, Y, s.model), dp.init(s.params))
    got = jb.clipped_grad(s.params, X, Y, s.model, s.n, clip=DP_CLIP, noise_multiplier=0.0)
    err = reference.max_rel_err(got, l2_grads(ref, s.params, s.n))
    print(f"  clipped_grad vs per_example_grads + optax aggregate, no noise: max rel err {err:.2e}")
    report.info["dp_agreement_max_rel_err"] = err


def wide_lot(ctx: Context) -> None:
    """Private against non-private epochs at lot 600 on 784-1000-10 (83 steps)."""
    s, report = ctx.setting, ctx.report
    model = sigmoid_model(WIDE)
    params = jb.init_params(jax.random.key(0), model)
    gradients = {
        NONPRIVATE: None,
        PRIV: DPGradient(DP_CLIP, DP_NOISE),
        OLD_NOISE: jax_normal_private,
    }
    runners = private_runners(ctx, model, params, LOT, gradients)
    print(f"  lot {LOT} on 784-1000-10:", flush=True)
    samples = alternate(runners, ctx.args.epochs, s.key)
    report.epoch_rows("dp", LOT, samples, N_TRAIN, flop_per_example(WIDE), NONPRIVATE)
    report.print_rows("dp", LOT)
    check_private(ctx, samples, f"at lot {LOT} on 784-1000-10", 1.3)


def private_runners(ctx: Context, model, params, bs: int, gradients: dict) -> dict:
    """The shuffled epochs of ``gradients`` and the Poisson-sampled ones, private and not."""
    s = ctx.setting

    def runner(gradient, sampling="shuffle"):
        epoch = library.epoch_fn(model, s.optimizer, bs, s.X, s.Y, s.n, gradient, sampling)
        return sgd_runner(epoch, params, s.optimizer)

    runners = {name: runner(g) for name, g in gradients.items()}
    runners[POISSON] = runner(DPGradient(DP_CLIP, DP_NOISE), "poisson")
    runners[POISSON_PLAIN] = runner(None, "poisson")
    return runners


def check_private(ctx: Context, samples: dict, where: str, target: float) -> None:
    """The Poisson-sampled private epoch (sampling, clipping, noise) against jb.fit's plain
    shuffled epoch."""
    t = {name: median(x.wall) for name, x in samples.items()}
    ctx.report.check(
        f"DP epoch (DPGradient, Poisson sampling) {where} within {target:g}x of the non-private "
        "epoch (time ratio)",
        t[POISSON] / t[NONPRIVATE],
        "<=",
        target,
        f"{t[PRIV] / t[NONPRIVATE]:.2f}x shuffled, {t[POISSON] / t[POISSON_PLAIN]:.2f}x the "
        f"non-private Poisson epoch, {t[OLD_NOISE] / t[NONPRIVATE]:.2f}x shuffled with "
        "jax.random.normal noise",
    )


def run(ctx: Context) -> None:
    print("\n== dp: DP-SGD epochs at minibatch 128 and at lot 600 ==", flush=True)
    s, report = ctx.setting, ctx.report
    agreement(ctx)
    noise_draws(ctx)
    gradients = {
        NONPRIVATE: None,
        PRIV: DPGradient(DP_CLIP, DP_NOISE),
        "jb.fit epoch, DPGradient, noise_multiplier=0": DPGradient(DP_CLIP, 0.0),
        OLD_NOISE: jax_normal_private,
        "jb.fit epoch, DP with an rbg noise key": rbg_private,
        STORED_FAST: stored_private,
    }
    runners = private_runners(ctx, s.model, s.params, BS, gradients)
    runners[STORED_OPTAX] = optax_epoch(ctx, lambda p, X, Y: jb.per_example_grads(p, X, Y, s.model))
    runners["vmap(jax.grad) + optax DP aggregate"] = optax_epoch(ctx, reference.per_example)
    runners[AD] = sgd_runner(
        reference.on_data(reference.ad_epoch(s.optimizer, BS), s.X, s.Y, s.n),
        s.params,
        s.optimizer,
    )
    samples = alternate(runners, ctx.args.epochs, s.key)
    report.epoch_rows("dp", BS, samples, N_TRAIN, FLOP, AD)
    report.print_rows("dp", BS)
    check_private(ctx, samples, f"at minibatch {BS}", 1.5)
    t = {name: median(x.wall) for name, x in samples.items()}
    report.check(
        "DP epoch >= 5x faster than per_example_grads + optax aggregate",
        t[STORED_OPTAX] / t[PRIV],
        ">=",
        5.0,
        f"{t[STORED_FAST] / t[PRIV]:.1f}x against the stored route with fast reductions",
    )
    wide_lot(ctx)
