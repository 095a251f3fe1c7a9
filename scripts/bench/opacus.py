"""opacus: a DP-SGD step of jbackprop against Opacus 1.6 on the CPU, 784-1000-10.

The network is 784-1000-10 with ReLU hidden units and a softmax output under the
log-likelihood cost (``jb.Model(hidden="relu", output="softmax", cost="log_likelihood")``;
in PyTorch ``nn.Linear``-``nn.ReLU``-``nn.Linear`` and ``F.cross_entropy`` on the logits),
float32, both started from the same weights. Every private step clips each example's whole
gradient to norm 1.0, adds Gaussian noise with multiplier 1.1 to the clipped sum and
divides by the (expected) lot size, then takes a plain SGD step (learning rate 0.1).

Opacus 1.6 (``PrivacyEngine.make_private``) runs in two modes: ``grad_sample_mode="hooks"``
(per-example gradients materialised by module hooks, then clipped by the ``DPOptimizer``)
and ``"ghost"`` (ghost clipping: per-example norms from the activations and output
gradients, then a second backward pass of the loss reweighted by the clip factors; its
``make_private`` also returns the criterion wrapper that runs both passes).

Three parts:

* agreement: same weights, same lot, noise multiplier 0: ``jb.clipped_grad`` against the
  gradient that Opacus's optimizer hands to SGD (after ``pre_step``: clipped, summed,
  divided by the lot size), in both modes; max abs difference;
* fixed-size steps at lot 600 and minibatch 128: one full step (forward, per-example
  clipping, noise, update) of every approach on fixed-size batches (``poisson_sampling=False``
  in Opacus), alternating in rounds, median seconds per step. jbackprop's step is one
  ``jax.jit`` of ``DPGradient`` and ``optax.sgd``, warm, timed with ``block_until_ready``;
  the same step with noise multiplier 0 (what drawing the noise costs), the non-private
  jbackprop step (``jb.grad``) and a non-private PyTorch step are references;
* Poisson-sampled steps: ``jb.fit``'s compiled epoch with ``sampling="poisson"`` and
  ``gradient=DPGradient(...)`` (``round(n / lot)`` steps) against Opacus's Poisson
  ``DPDataLoader`` over a ``TensorDataset`` (a fixed number of steps), examples actually
  drawn per second, data loading included as each library does it.

PyTorch runs with ``--torch-threads`` threads (the first of the list); XLA uses every core.
Process CPU seconds per step are kept beside wall seconds, so the CPU-time ratio gives the
comparison per core used.

Opacus is never a dependency of the project; it goes into ``.venv-bench`` beside torch::

    .venv-bench/bin/pip install "opacus==1.6.*" opt-einsum

Without torch or Opacus the section prints a note and skips.
"""

from __future__ import annotations

import importlib.util
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jbackprop as jb
from jbackprop.privacy import DPGradient
from jbackprop.training import train_epoch
from scripts.bench.context import Context
from scripts.bench.harness import median
from scripts.bench.setting import DP_CLIP, DP_NOISE

SIZES = (784, 1000, 10)
LOTS = (600, 128)
LR = 0.1
BATCHES = 8  # distinct fixed-size batches the timed steps cycle through
POISSON_STEPS = 3  # Opacus steps per timed call of the Poisson part

JB_PRIV = "jbackprop DPGradient step (jit)"
JB_PRIV0 = "jbackprop DPGradient, noise 0 (jit)"
JB_PLAIN = "jbackprop non-private step (jit)"
HOOKS = "Opacus 1.6 hooks"
GHOST = "Opacus 1.6 ghost clipping"
TORCH = "PyTorch non-private"
JB_POISSON = "jb.fit epoch, poisson, DPGradient"
HOOKS_POISSON = "Opacus 1.6 hooks, DPDataLoader"
GHOST_POISSON = "Opacus 1.6 ghost, DPDataLoader"

MISSING = (
    "torch or opacus not installed: the opacus section is skipped "
    '(.venv-bench/bin/pip install "opacus==1.6.*" opt-einsum)'
)


def available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("torch", "opacus"))


def relu_model() -> jb.Model:
    return jb.Model(sizes=SIZES, hidden="relu", output="softmax", cost="log_likelihood")


# --- PyTorch and Opacus -----------------------------------------------------------------


def torch_net(params):
    """``Linear-ReLU-Linear`` holding jbackprop's ``params`` (``w`` is ``(out, in)`` in both)."""
    import torch
    from torch import nn

    net = nn.Sequential(nn.Linear(SIZES[0], SIZES[1]), nn.ReLU(), nn.Linear(SIZES[1], SIZES[2]))
    with torch.no_grad():
        for lin, p in zip((net[0], net[2]), params, strict=True):
            lin.weight.copy_(torch.from_numpy(np.array(p["w"])))
            lin.bias.copy_(torch.from_numpy(np.array(p["b"])))
    return net


def private(params, X, labels, lot: int, mode: str, noise: float, poisson: bool, seed: int = 0):
    """``PrivacyEngine().make_private`` over a fresh copy of the network: ``(model, optimizer,
    criterion, loader)``; the criterion is Opacus's wrapper in ghost mode and
    ``F.cross_entropy`` in hooks mode."""
    import torch
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    net = torch_net(params)
    loader = DataLoader(TensorDataset(X, labels), batch_size=lot)
    made = PrivacyEngine().make_private(
        module=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=LR),
        criterion=torch.nn.CrossEntropyLoss(),
        data_loader=loader,
        noise_multiplier=noise,
        max_grad_norm=DP_CLIP,
        poisson_sampling=poisson,
        grad_sample_mode=mode,
        noise_generator=torch.Generator().manual_seed(seed),
    )
    if mode == "ghost":
        return made
    model, opt, loader = made
    return model, opt, torch.nn.functional.cross_entropy, loader


def opacus_step(model, opt, criterion) -> Callable:
    """One private step on ``(x, y)``: forward, per-example clipping (in the backward pass,
    or two of them for ghost clipping), noise and the SGD update."""

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        criterion(model(x), y).backward()
        opt.step()

    return step


def torch_step(params) -> Callable:
    import torch
    from torch.nn.functional import cross_entropy

    net = torch_net(params)
    opt = torch.optim.SGD(net.parameters(), lr=LR)

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        cross_entropy(net(x), y).backward()
        opt.step()

    return step


def opacus_grads(params, X, labels, mode: str) -> tuple:
    """The averaged clipped gradient Opacus's optimizer passes to SGD, noise multiplier 0,
    as jbackprop params."""
    model, opt, criterion, _ = private(params, X, labels, len(X), mode, 0.0, poisson=False)
    opt.zero_grad(set_to_none=True)
    criterion(model(X), labels).backward()
    opt.pre_step()  # clip, accumulate, add (zero) noise, divide by the lot size
    lins = [m for m in model.modules() if m.__class__.__name__ == "Linear"]
    return tuple(
        {"w": jnp.asarray(m.weight.grad.numpy()), "b": jnp.asarray(m.bias.grad.numpy())}
        for m in lins
    )


# --- jbackprop --------------------------------------------------------------------------


def jb_steps(model: jb.Model, n: int) -> dict[str, Callable]:
    """The jitted steps ``(params, opt_state, X, y, key)``: private, private without the
    noise (what the noise costs), and non-private."""
    opt = optax.sgd(LR)
    dp, dp0 = DPGradient(DP_CLIP, DP_NOISE), DPGradient(DP_CLIP, 0.0)

    def update(g, params, opt_state):
        updates, opt_state = opt.update(g, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    @jax.jit
    def private_step(params, opt_state, X, y, key):
        return update(dp(params, X, y, model, n, key), params, opt_state)

    @jax.jit
    def clip_step(params, opt_state, X, y, key):
        return update(dp0(params, X, y, model, n, key), params, opt_state)

    @jax.jit
    def plain_step(params, opt_state, X, y, key):
        del key
        return update(jb.grad(params, X, y, model, n), params, opt_state)

    return {JB_PRIV: private_step, JB_PRIV0: clip_step, JB_PLAIN: plain_step}


class JaxRunner:
    """A jitted step and its state, advanced one step per call on batch ``i``."""

    def __init__(self, step, params, batches, key):
        self.step, self.batches, self.key = step, batches, key
        self.state = (params, optax.sgd(LR).init(params))
        self.i = 0

    def __call__(self, i: int) -> None:
        self.i += 1
        k = jax.random.fold_in(self.key, self.i)
        self.state = jax.block_until_ready(self.step(*self.state, *self.batches[i], k))


class TorchRunner:
    def __init__(self, step, batches, threads: int):
        self.step, self.batches, self.threads = step, batches, threads

    def __call__(self, i: int) -> None:
        import torch

        torch.set_num_threads(self.threads)
        self.step(*self.batches[i])


@dataclass
class Timing:
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    examples: list[int] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)


def rounds(runners: dict[str, Callable], nrounds: int, budget_s: float) -> dict[str, Timing]:
    """Two warm-up calls of every runner, then ``nrounds`` rounds in which every runner
    makes about ``budget_s`` seconds of calls in turn (at least one). A runner returns
    ``(examples, steps)`` of its call, or ``None`` for one step of the fixed batch size
    (recorded as ``(0, 1)``)."""
    per_call = {}
    for name, run in runners.items():
        run(0)
        t0 = time.perf_counter()
        run(1)
        per_call[name] = time.perf_counter() - t0
    reps = {name: max(1, min(50, round(budget_s / t))) for name, t in per_call.items()}
    out = {name: Timing() for name in runners}
    for r in range(nrounds):
        for name, run in runners.items():
            for j in range(reps[name]):
                c0, t0 = time.process_time(), time.perf_counter()
                got = run((r * 7 + j) % BATCHES) or (0, 1)
                out[name].wall.append(time.perf_counter() - t0)
                out[name].cpu.append(time.process_time() - c0)
                out[name].examples.append(got[0])
                out[name].steps.append(got[1])
    return out


# --- the section ------------------------------------------------------------------------


def agreement(ctx: Context, params, X, labels, model) -> None:
    """jb.clipped_grad against Opacus's clipped averaged gradient, noise 0, both modes."""
    import torch

    report = ctx.report
    m = LOTS[0]
    Xj, yj = X[:m], labels[:m]
    got = jb.clipped_grad(params, Xj, yj, model, clip=DP_CLIP, noise_multiplier=0.0)
    norms = np.asarray(jb.per_example_norms(params, Xj, yj, model))
    Xt = torch.from_numpy(np.array(Xj))
    yt = torch.from_numpy(np.array(yj)).long()
    scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(got))
    for mode in ("hooks", "ghost"):
        ref = opacus_grads(params, Xt, yt, mode)
        diff = max(
            float(jnp.max(jnp.abs(a - b)))
            for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True)
        )
        report.info[f"opacus_{mode}_max_abs_diff"] = diff
        print(
            f"  jb.clipped_grad vs Opacus {mode} clipped mean gradient, lot {m}, noise 0: "
            f"max abs diff {diff:.2e} (largest entry {scale:.2e})",
            flush=True,
        )
        report.check(
            f"jb.clipped_grad equals Opacus {mode} clipped gradient (max abs diff)",
            diff,
            "<=",
            1e-5 * max(scale, 1.0),
        )
    clipped = float(np.mean(norms > DP_CLIP))
    report.info["opacus_agreement_fraction_clipped"] = clipped
    print(
        f"  per-example norms {np.median(norms):.2f} median, {clipped:.0%} of the lot clipped "
        f"(C = {DP_CLIP})",
        flush=True,
    )


def print_table(rows: list[dict], title: str) -> None:
    print(f"  {title}", flush=True)
    head = (
        f"  {'approach':<36} {'m':>4} {'ms/step':>8} {'ex/s':>9} {'cpu ms':>8} "
        f"{'jb DP x':>8} {'jb DP x cpu':>11}"
    )
    print(head, flush=True)
    for r in rows:
        print(
            f"  {r['approach']:<36} {r['minibatch']:>4} {r['ms_per_step']:8.2f} "
            f"{r['examples_per_s']:9.0f} {r['cpu_ms_per_step']:8.2f} "
            f"{r['jb_dp_speedup']:8.1f} {r['jb_dp_cpu_speedup']:11.1f}",
            flush=True,
        )
    print(
        "  (jb DP x: jbackprop's private examples/s over this row's; jb DP x cpu: the same per "
        "process CPU second)",
        flush=True,
    )


def add_rows(ctx: Context, kind: str, lot: int, timing: dict[str, Timing], ref: str) -> list:
    """One row per approach: median wall and CPU seconds per step, examples per second, and
    how many times the examples per second of ``ref`` (jbackprop's private step) it is."""
    rows = []
    for name, t in timing.items():
        steps = sum(t.steps) / len(t.steps)  # the same in every call of a runner
        wall, cpu = median(t.wall) / steps, median(t.cpu) / steps
        examples = sum(t.examples) / sum(t.steps) if any(t.examples) else lot
        rows.append(
            {
                "section": "opacus",
                "kind": kind,
                "approach": name,
                "minibatch": lot,
                "ms_per_step": 1e3 * wall,
                "cpu_ms_per_step": 1e3 * cpu,
                "examples_per_step": examples,
                "examples_per_s": examples / wall,
                "step_seconds": t.wall,
                "cpu_seconds": t.cpu,
            }
        )
    base = next(r for r in rows if r["approach"] == ref)
    for r in rows:
        r["jb_dp_speedup"] = base["examples_per_s"] / r["examples_per_s"]
        r["jb_dp_cpu_speedup"] = (r["cpu_ms_per_step"] / r["examples_per_step"]) / (
            base["cpu_ms_per_step"] / base["examples_per_step"]
        )
        ctx.report.add(r)
    return rows


def fixed(ctx: Context, params, X, labels, model, lot: int, threads: int) -> list:
    import torch

    n = int(X.shape[0])
    xs = [X[i * lot : (i + 1) * lot] for i in range(BATCHES)]
    ys = [labels[i * lot : (i + 1) * lot] for i in range(BATCHES)]
    jbatches = list(zip(xs, ys, strict=True))
    tbatches = [
        (torch.from_numpy(np.array(x)), torch.from_numpy(np.array(y)).long()) for x, y in jbatches
    ]
    key = jax.random.key(7)
    runners: dict[str, Callable] = {
        name: JaxRunner(step, params, jbatches, key) for name, step in jb_steps(model, n).items()
    }
    Xt, yt = torch.cat([b[0] for b in tbatches]), torch.cat([b[1] for b in tbatches])
    for name, mode in ((HOOKS, "hooks"), (GHOST, "ghost")):
        model_t, opt, crit, _ = private(params, Xt, yt, lot, mode, DP_NOISE, poisson=False)
        runners[name] = TorchRunner(opacus_step(model_t, opt, crit), tbatches, threads)
    runners[TORCH] = TorchRunner(torch_step(params), tbatches, threads)
    nrounds = 3 if ctx.args.quick else 7
    timing = rounds(runners, nrounds, budget_s=0.4)
    return add_rows(ctx, "fixed", lot, timing, JB_PRIV)


class JbPoisson:
    """jb.fit's compiled Poisson epoch (``round(n / lot)`` steps) as one call."""

    def __init__(self, params, X, Y, model, lot: int, key):
        self.opt = optax.sgd(LR)
        self.state = (params, self.opt.init(params))
        self.X, self.Y, self.model, self.lot, self.key = X, Y, model, lot, key
        self.e = 0

    def __call__(self, i: int) -> tuple[int, int]:
        self.e += 1
        self.state = jax.block_until_ready(
            train_epoch(
                *self.state,
                self.model,
                self.X,
                self.Y,
                jax.random.fold_in(self.key, self.e),
                optimizer=self.opt,
                batch_size=self.lot,
                gradient=DPGradient(DP_CLIP, DP_NOISE),
                sampling="poisson",
            )
        )
        steps = round(self.X.shape[0] / self.lot)
        return steps * self.lot, steps  # expected examples: n q = lot per step


class OpacusPoisson:
    """``POISSON_STEPS`` steps over Opacus's Poisson ``DPDataLoader``, as one call."""

    def __init__(self, step, loader, threads: int):
        self.step, self.loader, self.threads = step, loader, threads
        self.it = iter(loader)

    def __call__(self, i: int) -> tuple[int, int]:
        import torch

        torch.set_num_threads(self.threads)
        done = 0
        for _ in range(POISSON_STEPS):
            try:
                x, y = next(self.it)
            except StopIteration:
                self.it = iter(self.loader)
                x, y = next(self.it)
            self.step(x, y)
            done += len(x)
        return done, POISSON_STEPS


def poisson(ctx: Context, params, X, labels, model, lot: int, threads: int) -> list:
    import torch

    Y = jax.nn.one_hot(labels, SIZES[-1], dtype=X.dtype)
    runners: dict[str, Callable] = {
        JB_POISSON: JbPoisson(params, X, Y, model, lot, jax.random.key(11)),
    }
    Xt, yt = torch.from_numpy(np.array(X)), torch.from_numpy(np.array(labels)).long()
    for name, mode in ((HOOKS_POISSON, "hooks"), (GHOST_POISSON, "ghost")):
        model_t, opt, crit, loader = private(params, Xt, yt, lot, mode, DP_NOISE, poisson=True)
        runners[name] = OpacusPoisson(opacus_step(model_t, opt, crit), loader, threads)
    nrounds = 2 if ctx.args.quick else 3
    timing = rounds(runners, nrounds, budget_s=0.0)
    return add_rows(ctx, "poisson", lot, timing, JB_POISSON)


def run(ctx: Context) -> None:
    print("\n== opacus: DP-SGD steps against Opacus 1.6, 784-1000-10 ReLU/softmax ==", flush=True)
    report = ctx.report
    if not available():
        report.note(MISSING)
        return
    import opacus
    import torch

    warnings.filterwarnings("ignore", module="opacus")  # secure-RNG and accountant notices
    # Opacus's hooks on a first layer whose input needs no gradient warn on every call
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    threads = (ctx.args.torch_threads or [1])[0]
    torch.set_num_threads(threads)
    s = ctx.setting
    X, labels = s.X, s.labels.astype(jnp.int32)
    model = relu_model()
    params = jb.init_params(jax.random.key(0), model)
    report.info["opacus"] = {
        "opacus": opacus.__version__,
        "torch": torch.__version__,
        "torch_threads": threads,
        "sizes": SIZES,
        "clip": DP_CLIP,
        "noise_multiplier": DP_NOISE,
        "lr": LR,
    }
    print(
        f"  opacus {opacus.__version__}, torch {torch.__version__} with {threads} thread(s); "
        f"clip {DP_CLIP}, noise multiplier {DP_NOISE}, SGD lr {LR}, float32",
        flush=True,
    )
    agreement(ctx, params, X, labels, model)
    fixed_rows = {}
    for lot in LOTS:
        rows = fixed(ctx, params, X, labels, model, lot, threads)
        fixed_rows[lot] = {r["approach"]: r for r in rows}
        print_table(rows, f"fixed-size batches, m = {lot} (load {load()})")
    for lot in LOTS:
        rows = poisson(ctx, params, X, labels, model, lot, threads)
        print_table(rows, f"Poisson sampling, expected lot {lot} (load {load()})")
    for lot in LOTS:
        r = fixed_rows[lot]
        for name in (HOOKS, GHOST):
            report.check(
                f"jbackprop DP step >= 20x the examples/s of {name}, m={lot}",
                r[name]["jb_dp_speedup"],
                ">=",
                20.0,
                f"{r[name]['jb_dp_cpu_speedup']:.1f}x per CPU second",
            )


def load() -> str:
    from scripts.bench.harness import loadavg

    return " ".join(f"{x:.2f}" for x in loadavg())
