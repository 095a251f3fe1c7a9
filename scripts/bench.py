#!/usr/bin/env python
"""Throughput of jbackprop's hand-written backprop against autodiff and PyTorch, on MNIST.

The network is the book's chapter-3 one: 784-100-10, sigmoid units, cross-entropy with L2
(lmbda 5, n = 50,000), plain SGD with eta 0.5, trained on the 50,000 MNIST training images
held on the device. Sections (``--only``, comma separated):

* ``train``: epochs of ``jb.fit``'s compiled epoch, of an independently written
  ``jax.grad`` epoch (same ``lax.scan``, shuffle and ``optax.sgd``) and of PyTorch on the
  CPU, at minibatch 10, 128 and 1000, measured alternately (one epoch of each in turn);
* ``ablate``: the same epoch with the hand-written step reformulated, to show which of the
  library's formulation choices cost time;
* ``pex``: training from stored per-example gradients (``jb.per_example_grads`` and
  ``jax.vmap(jax.grad)``) averaged per minibatch;
* ``dp``: a DP-SGD epoch with ``jb.clipped_grad`` against the non-private epoch and the
  stored route (``per_example_grads`` + ``optax.contrib.differentially_private_aggregate``);
* ``stats``: ``jb.grad_stats`` and ``jb.diag_ggn`` per call, against ``jb.grad``,
  statistics reduced from stored ``vmap(grad)`` per-example gradients and, when
  ``backpack`` is importable, BackPACK's BatchL2Grad + SumGradSquared + Variance (checked
  to agree with jbackprop's numbers before timing);
* ``many``: ``jb.fit_many`` with 8 models against training one;
* ``full`` (only with ``--full``): wall time of ``python -m jbackprop.experiments.mnist``
  for the chapter-3 run of 30 epochs.

Every target is checked as a ratio measured in the same run, and PASS/FAIL lines are
printed. PyTorch and BackPACK are optional: without them their rows are skipped with a note
(``pip install torch==2.13.0`` installs the CPU build on this machine; then
``pip install --no-deps backpack-for-pytorch einops unfoldNd``). Everything goes to
``--json`` (default ``runs/bench.json``).

    .venv/bin/python scripts/bench.py --full          # every section, 10-15 minutes
    .venv/bin/python scripts/bench.py --quick         # fewer epochs and calls, a few minutes
    .venv/bin/python scripts/bench.py --only train,dp --epochs 7
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jbackprop as jb
from jbackprop import data

SIZES = (784, 100, 10)
ETA = 0.5
LMBDA = 5.0
N_TRAIN = 50_000
BATCH_SIZES = (10, 128, 1000)
SECTIONS = ("train", "ablate", "pex", "dp", "stats", "ggn", "many", "multiproc", "full")
DP_CLIP, DP_NOISE = 1.0, 1.1

# Targets measured on this 2-core machine (examples/s at minibatch 10/128/1000); the
# stored-per-example row is checked as its ratio to the autodiff row of the same run.
TABLE_AUTODIFF = {10: 132e3, 128: 316e3, 1000: 377e3}
TABLE_STORED = {10: 99e3, 128: 72e3, 1000: 41e3}
TORCH_MISSING = (
    "torch not installed (pip install torch==2.13.0 installs the CPU build on this machine)"
)
JB = "jb.fit"
AD = "jax.grad of the cost"
PRIV = "jb.clipped_grad (private)"
STORED_OPTAX = "jb.per_example_grads + optax DP aggregate"


def torch_label(threads: int) -> str:
    return f"PyTorch CPU, {threads} thread{'s' if threads > 1 else ''}"


# --- helpers ---------------------------------------------------------------------------


def flop_per_example(sizes: tuple[int, ...]) -> int:
    """Forward (eq 3), eq 8 for the hidden layers and eq 10: 2 FLOP per multiply-add."""
    macs = sum(a * b for a, b in itertools.pairwise(sizes))
    back = sum(a * b for a, b in itertools.pairwise(sizes[1:]))
    return 2 * (2 * macs + back)


FLOP = flop_per_example(SIZES)


def clock(fn: Callable, *args) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - t0


class CpuClock:
    """Process CPU seconds (all threads) spent by the last timed call: a second view of
    the cost that other processes on a shared machine disturb less than wall time."""

    last = 0.0

    def __enter__(self):
        self.t0 = time.process_time()
        return self

    def __exit__(self, *exc):
        CpuClock.last = time.process_time() - self.t0


def median(xs) -> float:
    return float(statistics.median(xs))


def max_rel_err(a, b) -> float:
    """``max |a - b| / max |b|`` over every leaf of two pytrees."""
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    num = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(la, lb, strict=True))
    den = max(float(jnp.max(jnp.abs(y))) for y in lb)
    return num / den if den else num


def max_abs_diff(a, b) -> float:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(la, lb, strict=True))


def identical(a, b) -> bool:
    return all(
        bool(jnp.array_equal(x, y))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def l2_grads(grads, params, n):
    """Add the L2 term's gradient ``(lmbda/n) w`` to the weights (biases are not decayed)."""
    return tuple(
        {"w": g["w"] + (LMBDA / n) * p["w"], "b": g["b"]}
        for g, p in zip(grads, params, strict=True)
    )


def tree_mean0(tree):
    return jax.tree.map(lambda g: jnp.mean(g, axis=0), tree)


def load_loadavg() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def default_data_dir() -> str | None:
    """``$JBACKPROP_DATA``, else the ``shared/data`` folder beside the checkout (as in
    ``scripts/_env.sh``), else ``None`` (the library's own discovery)."""
    if os.environ.get("JBACKPROP_DATA"):
        return None
    beside = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    return str(beside) if beside.is_dir() else None


# --- the autodiff baseline, written independently of the library -----------------------


def ad_logits(params, x):
    """The sigmoid MLP's output pre-activations ``z^L`` for ``x`` of shape (..., 784)."""
    a = x
    for layer in params[:-1]:
        a = jax.nn.sigmoid(a @ layer["w"].T + layer["b"])
    return a @ params[-1]["w"].T + params[-1]["b"]


def ad_example_cost(params, x, y):
    """Cross-entropy of sigmoid outputs, written with log-sigmoid of the logits."""
    z = ad_logits(params, x)
    return -jnp.sum(y * jax.nn.log_sigmoid(z) + (1.0 - y) * jax.nn.log_sigmoid(-z), axis=-1)


def ad_cost(params, X, Y, n):
    l2 = sum(jnp.sum(layer["w"] ** 2) for layer in params)
    return jnp.mean(ad_example_cost(params, X, Y)) + LMBDA / (2.0 * n) * l2


ad_grad = jax.grad(ad_cost)
ad_per_example = jax.vmap(jax.grad(ad_example_cost), in_axes=(None, 0, 0))


def ad_stats(params, X, Y, n):
    """Gradient, per-example norms, sum of squares and variance from stored vmap(grad)."""
    G = ad_per_example(params, X, Y)
    return reduce_stats(G, params, n)


def sum0(g):
    """``Σ_i g_i`` over the leading (example) axis as a matrix-vector product ``1ᵀ G``.

    XLA:CPU runs ``jnp.sum(g, axis=0)`` on a stored ``(m, n_l, n_{l-1})`` array some 30-50x
    slower than this product (e.g. 154 ms against 4 ms for m=128 here), so the stored
    baselines use it to stay competitive."""
    m = g.shape[0]
    return (jnp.ones((m,), g.dtype) @ g.reshape(m, -1)).reshape(g.shape[1:])


def reduce_stats(G, params, n):
    """The statistics of jb.grad_stats from stored per-example gradients ``G``."""
    m = jax.tree.leaves(G)[0].shape[0]
    mean = jax.tree.map(lambda g: sum0(g) / m, G)
    sq = sum(jnp.sum(g.reshape(m, -1) ** 2, axis=1) for g in jax.tree.leaves(G))
    sum_sq = jax.tree.map(lambda g: sum0(g * g), G)
    var = jax.tree.map(lambda s, g: jnp.maximum(s / m - g**2, 0.0), sum_sq, mean)
    return l2_grads(mean, params, n), jnp.sqrt(sq), sum_sq, var


def stored_mean(G):
    """Materialise the per-example gradients (no fusion into a dot), then average them."""
    G = jax.lax.optimization_barrier(G)
    m = jax.tree.leaves(G)[0].shape[0]
    return jax.tree.map(lambda g: sum0(g) / m, G)


def dp_stored(G, key, clip=DP_CLIP, noise=DP_NOISE):
    """DP aggregation of stored per-example gradients written with fast reductions: norms
    over each example's row, ``Σ_i c_i g_i`` as ``cᵀ G``, noise, division by ``m``."""
    G = jax.lax.optimization_barrier(G)
    leaves, treedef = jax.tree.flatten(G)
    m = leaves[0].shape[0]
    norms = jnp.sqrt(sum(jnp.sum(g.reshape(m, -1) ** 2, axis=1) for g in leaves))
    c = clip / jnp.maximum(norms, clip)
    keys = jax.random.split(key, len(leaves))
    out = [
        (
            (c @ g.reshape(m, -1)).reshape(g.shape[1:])
            + clip * noise * jax.random.normal(k, g.shape[1:])
        )
        / m
        for g, k in zip(leaves, keys, strict=True)
    ]
    return jax.tree.unflatten(treedef, out)


def ad_diag_ggn(params, X, chunk: int = 100):
    """Diagonal GGN of sigmoid + cross-entropy, ``mean_i Σ_c h_ic (∂z_c/∂θ)²`` with
    ``h = σ(z)(1 - σ(z))``, from stored per-example Jacobians (``vmap(jacrev)``), in chunks."""
    m = X.shape[0]
    c = max(d for d in range(1, min(chunk, m) + 1) if m % d == 0)
    jac = jax.vmap(jax.jacrev(ad_logits), in_axes=(None, 0))

    def part(xs):
        J = jac(params, xs)  # leaves (c, 10, *shape)
        z = ad_logits(params, xs)
        h = jax.nn.sigmoid(z) * jax.nn.sigmoid(-z)
        return jax.tree.map(lambda j: jnp.einsum("ic,ic...->...", h, j**2), J)

    parts = jax.lax.map(part, X.reshape(m // c, c, -1))
    return jax.tree.map(lambda s: jnp.sum(s, axis=0) / m, parts)


# --- epochs ----------------------------------------------------------------------------


def make_epoch(step: Callable, batch_size: int, step_keys: bool = False) -> Callable:
    """A jitted epoch with jbackprop.training's scheme: ``k_perm, k = split(key)``, a
    permutation from ``k_perm``, a ``lax.scan`` over the full minibatches and the remainder
    as one last, smaller minibatch. ``step(params, state, Xb, Yb, key, n)`` does one update;
    ``key`` is a per-step key split from ``k`` when ``step_keys``, else ``None``."""

    @jax.jit
    def epoch(params, state, X, Y, key, n):
        k_perm, k_steps = jax.random.split(key)
        size = X.shape[0]
        steps, rem = divmod(size, batch_size)
        perm = jax.random.permutation(k_perm, size)
        keys = jax.random.split(k_steps, steps + 1) if step_keys else None

        def body(carry, xs):
            ids, k = xs
            return step(*carry, X[ids], Y[ids], k, n), None

        full = perm[: steps * batch_size].reshape(steps, batch_size)
        ks = None if keys is None else keys[:steps]
        (params, state), _ = jax.lax.scan(body, (params, state), (full, ks))
        if rem:
            ids = perm[steps * batch_size :]
            k = None if keys is None else keys[steps]
            params, state = step(params, state, X[ids], Y[ids], k, n)
        return params, state

    return epoch


def grad_step(grad_fn: Callable, optimizer) -> Callable:
    """One SGD step from ``grad_fn(params, Xb, Yb, key, n)``."""

    def step(params, opt_state, Xb, Yb, key, n):
        g = grad_fn(params, Xb, Yb, key, n)
        updates, opt_state = optimizer.update(g, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return step


class JaxRunner:
    """Runs one epoch per call from its own state, timing it with the data on the device."""

    def __init__(self, epoch: Callable, params, state, X, Y, n):
        self.epoch, self.params, self.state = epoch, params, state
        self.X, self.Y, self.n = X, Y, n

    def __call__(self, key) -> float:
        with CpuClock():
            (self.params, self.state), dt = clock(
                self.epoch, self.params, self.state, self.X, self.Y, key, self.n
            )
        return dt


def alternate(
    runners: dict[str, Callable], epochs: int, key, cpu: dict | None = None
) -> dict[str, list[float]]:
    """One warm-up (compiling) epoch, then ``epochs`` timed epochs of every runner in turn:
    a, b, c, a, b, c, ...; epoch ``e`` of every runner uses key ``fold_in(key, e)``.
    Returns wall seconds per runner; ``cpu``, when given, collects CPU seconds."""
    times: dict[str, list[float]] = {name: [] for name in runners}
    for e in range(1, epochs + 2):
        k = jax.random.fold_in(key, e)
        for name, run in runners.items():
            CpuClock.last = float("nan")
            dt = run(k)
            if e > 1:
                times[name].append(dt)
                if cpu is not None:
                    cpu.setdefault(name, []).append(CpuClock.last)
    return times


def throughput_row(section, approach, bs, times, n_examples, ref_eps=None, **extra):
    t = median(times)
    eps = n_examples / t
    row = {
        "section": section,
        "approach": approach,
        "minibatch": bs,
        "examples_per_s": eps,
        "ms_per_epoch": 1e3 * t,
        "gflop_per_s": eps * FLOP / 1e9,
        "epoch_seconds": times,
    }
    if ref_eps:
        row["ratio_to_autodiff"] = eps / ref_eps
    row.update(extra)
    return row


# --- PyTorch ----------------------------------------------------------------------------


def torch_available() -> bool:
    return importlib.util.find_spec("torch") is not None


class TorchRunner:
    """The same network and minibatches in PyTorch on the CPU: nn.Linear, BCE with logits
    summed over the outputs and averaged over the minibatch, torch.optim.SGD with
    weight_decay = lmbda/n on the weights only (the gradient of the L2 term).

    An epoch stops after ``max_s`` seconds (PyTorch's thread pool degrades badly when the
    machine's cores are oversubscribed); its time is then scaled to the whole epoch from
    the examples it did, and ``partial`` counts such epochs."""

    def __init__(self, params, X, Y, n, batch_size, threads, max_s):
        import torch
        from torch import nn

        self.torch, self.bs, self.threads, self.max_s = torch, batch_size, threads, max_s
        self.F = torch.nn.functional
        self.partial = 0
        layers = []
        for i, p in enumerate(params):
            lin = nn.Linear(p["w"].shape[1], p["w"].shape[0])
            with torch.no_grad():
                lin.weight.copy_(torch.from_numpy(np.array(p["w"])))
                lin.bias.copy_(torch.from_numpy(np.array(p["b"])))
            layers.append(lin)
            if i < len(params) - 1:
                layers.append(nn.Sigmoid())
        self.net = nn.Sequential(*layers)
        self.linears = [m for m in self.net if isinstance(m, nn.Linear)]
        self.opt = torch.optim.SGD(
            [
                {"params": [m.weight for m in self.linears], "weight_decay": LMBDA / n},
                {"params": [m.bias for m in self.linears], "weight_decay": 0.0},
            ],
            lr=ETA,
        )
        self.X = torch.from_numpy(np.array(X))
        self.Y = torch.from_numpy(np.array(Y))

    def __call__(self, key) -> float:
        torch, F = self.torch, self.F
        torch.set_num_threads(self.threads)
        size = self.X.shape[0]
        # the permutation of jbackprop.training's epoch for this key
        perm = np.array(jax.random.permutation(jax.random.split(key)[0], size))
        perm = torch.from_numpy(perm).long()
        net, opt, X, Y, bs = self.net, self.opt, self.X, self.Y, self.bs
        done = 0
        c0 = time.process_time()
        t0 = time.perf_counter()
        for start in range(0, size, bs):
            ids = perm[start : start + bs]
            xb, yb = X[ids], Y[ids]
            opt.zero_grad(set_to_none=True)
            loss = F.binary_cross_entropy_with_logits(net(xb), yb, reduction="sum") / len(ids)
            loss.backward()
            opt.step()
            done += len(ids)
            if done % (50 * bs) == 0 and time.perf_counter() - t0 > self.max_s:
                break
        dt = time.perf_counter() - t0
        CpuClock.last = (time.process_time() - c0) * size / done
        if done < size:
            self.partial += 1
        return dt * size / done

    def params(self):
        return tuple(
            {"w": jnp.asarray(m.weight.detach().numpy()), "b": jnp.asarray(m.bias.detach().numpy())}
            for m in self.linears
        )


class BackpackStats:
    """BackPACK's BatchL2Grad, SumGradSquared and Variance on the same network, all from
    one backward pass of the loss summed over the minibatch (so its individual gradients
    are exactly the ``g_i`` of jb.grad_stats). Calls return None; tensors stay on the
    module parameters."""

    LABEL = "BackPACK L2+SGS+Variance ({} thread{})"
    PLAIN = "PyTorch backward, no extension ({} thread{})"

    def __init__(self, params, threads):
        import torch
        from backpack import extend
        from torch import nn

        self.torch, self.threads = torch, threads
        # BackPACK's hooks on modules whose inputs need no gradient warn on every call
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        layers = []
        for i, p in enumerate(params):
            lin = nn.Linear(p["w"].shape[1], p["w"].shape[0])
            with torch.no_grad():
                lin.weight.copy_(torch.from_numpy(np.array(p["w"])))
                lin.bias.copy_(torch.from_numpy(np.array(p["b"])))
            layers.append(lin)
            if i < len(params) - 1:
                layers.append(nn.Sigmoid())
        self.net = extend(nn.Sequential(*layers))
        self.linears = [m for m in self.net if isinstance(m, nn.Linear)]
        self.loss = extend(nn.BCEWithLogitsLoss(reduction="sum"))
        self.tensors: dict[int, tuple] = {}

    def label(self, plain=False) -> str:
        fmt = self.PLAIN if plain else self.LABEL
        return fmt.format(self.threads, "s" if self.threads > 1 else "")

    def register(self, X, Y) -> None:
        t = self.torch
        self.tensors[id(X)] = (t.from_numpy(np.array(X)), t.from_numpy(np.array(Y)))

    def __call__(self, p, X, Y, plain=False):
        from backpack import backpack
        from backpack.extensions import BatchL2Grad, SumGradSquared, Variance

        self.torch.set_num_threads(self.threads)
        xt, yt = self.tensors[id(X)]
        self.net.zero_grad(set_to_none=True)
        loss = self.loss(self.net(xt), yt)
        if plain:
            loss.backward()
        else:
            with backpack(BatchL2Grad(), SumGradSquared(), Variance()):
                loss.backward()

    def results(self):
        """``(norms, sum_grad_squared, variance)`` shaped like jb.grad_stats' fields."""

        def tree(attr):
            return tuple(
                {
                    "w": jnp.asarray(getattr(m.weight, attr).detach().numpy()),
                    "b": jnp.asarray(getattr(m.bias, attr).detach().numpy()),
                }
                for m in self.linears
            )

        norms = jnp.sqrt(sum(jax.tree.leaves(tree("batch_l2"))))
        return norms, tree("sum_grad_squared"), tree("variance")


# --- the benchmark ---------------------------------------------------------------------


class Bench:
    def __init__(self, args):
        self.args = args
        self.rows: list[dict] = []
        self.checks: list[dict] = []
        self.notes: list[str] = []
        self.info: dict[str, Any] = {}
        self.model = jb.Model(sizes=SIZES, hidden="sigmoid", output="sigmoid", l2=LMBDA)
        self.opt = optax.sgd(ETA)
        splits = data.load("mnist", data_dir=args.data_dir, progress=False)
        x, labels = splits.train
        self.X = jax.device_put(jnp.asarray(x[:N_TRAIN]))
        self.labels = jnp.asarray(labels[:N_TRAIN])
        self.Y = jax.nn.one_hot(self.labels, SIZES[-1], dtype=jnp.float32)
        self.n = N_TRAIN
        self.p0 = jb.init_params(jax.random.key(0), self.model)
        self.key = jax.random.key(1)
        self.peak_samples: list[float] = []
        self._ad_epochs: dict[int, Callable] = {}

    # -- bookkeeping --

    def note(self, msg: str) -> None:
        print(f"  note: {msg}", flush=True)
        self.notes.append(msg)

    def check(self, name: str, value: float, op: str, target: float, detail: str = ""):
        ok = value >= target if op == ">=" else value <= target if op == "<=" else value < target
        rec = {"check": name, "value": value, "op": op, "target": target, "pass": bool(ok)}
        if detail:
            rec["detail"] = detail
        self.checks.append(rec)
        print(
            f"{'PASS' if ok else 'FAIL'}: {name}: {value:.3g} {op} {target:.3g}"
            + (f"  ({detail})" if detail else ""),
            flush=True,
        )

    def add(self, row: dict) -> dict:
        self.rows.append(row)
        return row

    # -- matmul peak --

    def matmul_sample(self, reps: int = 5) -> float:
        """Median GFLOP/s of a jitted float32 2048x2048 matmul."""
        if not hasattr(self, "_mm"):
            ka, kb = jax.random.split(jax.random.key(7))
            self._mm_args = (
                jax.random.normal(ka, (2048, 2048), jnp.float32),
                jax.random.normal(kb, (2048, 2048), jnp.float32),
            )
            self._mm = jax.jit(jnp.matmul)
            clock(self._mm, *self._mm_args)
        ts = [clock(self._mm, *self._mm_args)[1] for _ in range(reps)]
        g = 2 * 2048**3 / median(ts) / 1e9
        self.peak_samples.append(g)
        return g

    @property
    def peak(self) -> float:
        return median(self.peak_samples)

    # -- epoch factories --

    def ad_epoch(self, bs: int) -> Callable:
        if bs not in self._ad_epochs:
            step = grad_step(lambda p, X, Y, k, n: ad_grad(p, X, Y, n), self.opt)
            self._ad_epochs[bs] = make_epoch(step, bs)
        return self._ad_epochs[bs]

    def jax_runner(self, epoch):
        return JaxRunner(epoch, self.p0, self.opt.init(self.p0), self.X, self.Y, self.n)

    # -- sections --

    def section_train(self):
        print("\n== train: epochs of jb.fit, jax.grad and PyTorch, alternately ==", flush=True)
        try:
            from jbackprop.training import _epoch_fn
        except ImportError:
            _epoch_fn = None
        how = (
            "jbackprop: the cached jitted epoch jbackprop.training._epoch_fn(model, optimizer, "
            "batch_size, mesh=None, ...), built and called as jb.fit builds and calls it: "
            "(params, opt_state, X, Y, key data of fold_in(key, epoch), n); its result is "
            "checked bit-identical to jb.fit's"
            if _epoch_fn
            else "jbackprop: jb.fit history 'seconds' (includes fit's per-epoch evaluation "
            "of the training set), not interleaved"
        )
        print(f"  {how}", flush=True)
        self.info["jb_fit_timing"] = how
        has_torch = torch_available()
        if not has_torch:
            self.note(TORCH_MISSING)
        g_jb = jb.grad(self.p0, self.X[:128], self.Y[:128], self.model, self.n)
        g_ad = jax.jit(ad_grad)(self.p0, self.X[:128], self.Y[:128], self.n)
        err = max_rel_err(g_jb, g_ad)
        print(f"  jb.grad vs jax.grad of the independent cost: max rel err {err:.2e}", flush=True)
        self.info["grad_agreement_max_rel_err"] = err
        self.sample_peak_standalone()
        fit_kw = {"epochs": self.args.epochs + 1, "key": self.key, "n": self.n}
        for bs in BATCH_SIZES:
            runners: dict[str, Callable] = {}
            if _epoch_fn is not None:
                runners[JB] = self.jax_runner(
                    fit_epoch(_epoch_fn, self.model, self.opt, bs, self.key)
                )
            runners[AD] = self.jax_runner(self.ad_epoch(bs))
            for th in self.args.torch_threads if has_torch else ():
                runners[torch_label(th)] = TorchRunner(
                    self.p0, self.X, self.Y, self.n, bs, th, self.args.torch_max_s
                )
            runners["matmul"] = lambda k: self.matmul_sample(3)
            n_peak = len(self.peak_samples)
            cpu: dict[str, list[float]] = {}
            times = alternate(runners, self.args.epochs, self.key, cpu)
            del times["matmul"]
            peak_now = median(self.peak_samples[n_peak + 1 :])
            ad_params = runners[AD].params
            extras: dict[str, dict] = {}
            if _epoch_fn is not None:
                fit_params, hist = jb.fit(
                    self.p0, self.model, (self.X, self.Y), self.opt, batch_size=bs, **fit_kw
                )
                same = identical(fit_params, runners[JB].params)
                extras[JB] = {
                    "identical_to_fit": same,
                    "fit_history_seconds": [h["seconds"] for h in hist[1:]],
                }
                jb_params = runners[JB].params
                if not same:
                    self.note(f"minibatch {bs}: timed epochs did NOT reproduce jb.fit's params")
            else:
                jb_params, hist = jb.fit(
                    self.p0, self.model, (self.X, self.Y), self.opt, batch_size=bs, **fit_kw
                )
                times = {JB: [h["seconds"] for h in hist[1:]], **times}
                extras[JB] = {}
            extras[JB]["percent_of_matmul_peak"] = None  # filled below
            extras[JB]["matmul_peak_gflop_per_s"] = peak_now
            finals = {JB: jb_params, AD: ad_params}
            for th in self.args.torch_threads if has_torch else ():
                r = runners[torch_label(th)]
                finals[torch_label(th)] = r.params()
                extras[torch_label(th)] = {"partial_epochs": r.partial}
                if r.partial:
                    self.note(
                        f"{torch_label(th)}, minibatch {bs}: {r.partial} epochs cut at "
                        f"{self.args.torch_max_s} s and scaled to the whole epoch"
                    )
            for name, params in finals.items():
                extras.setdefault(name, {})
                extras[name]["train_accuracy"] = jb.accuracy(
                    params, self.X, self.labels, self.model
                )
                if name != AD:
                    extras[name]["max_abs_diff_to_autodiff_params"] = max_abs_diff(
                        params, ad_params
                    )
            self.epoch_rows("train", bs, times, cpu, extras)
            r = self.row("train", JB, bs)
            r["percent_of_matmul_peak"] = 100 * r["gflop_per_s"] / peak_now
            self.print_rows("train", bs)
            print(f"  (float32 matmul peak during these epochs: {peak_now:.1f} GFLOP/s)")
        self.train_checks(has_torch)

    def epoch_rows(self, section, bs, times, cpu, extras=None):
        """Rows for one minibatch size of an alternated run, ratios to the autodiff epoch."""
        extras = extras or {}
        ad_eps = N_TRAIN / median(times[AD]) if AD in times else None
        ad_cpu = median(cpu[AD]) if AD in cpu else None
        for name, t in times.items():
            row = throughput_row(section, name, bs, t, N_TRAIN, ad_eps, **extras.get(name, {}))
            if cpu.get(name):
                c = median(cpu[name])
                row["cpu_seconds"] = cpu[name]
                row["cpu_ms_per_epoch"] = 1e3 * c
                if ad_cpu:
                    row["cpu_ratio_to_autodiff"] = ad_cpu / c
            self.add(row)

    def sample_peak_standalone(self):
        if self.info.get("matmul_peak_standalone"):
            return
        g = [self.matmul_sample(5) for _ in range(5)]
        self.info["matmul_peak_standalone"] = median(g)
        print(f"  float32 2048x2048 matmul: {median(g):.1f} GFLOP/s (median)", flush=True)

    def row(self, section, approach, bs):
        for r in self.rows:
            if r["section"] == section and r["approach"] == approach and r["minibatch"] == bs:
                return r
        return None

    def train_checks(self, has_torch):
        for bs in BATCH_SIZES:
            r = self.row("train", JB, bs)
            self.check(
                f"jb.fit >= autodiff at minibatch {bs} (examples/s ratio)",
                r["ratio_to_autodiff"],
                ">=",
                1.0,
            )
        if has_torch and self.args.torch_threads:
            jb10 = self.row("train", JB, 10)["examples_per_s"]
            pts = [self.row("train", torch_label(th), 10) for th in self.args.torch_threads]
            best = max(pts, key=lambda r: r["examples_per_s"])
            self.check(
                "jb.fit >= 4x PyTorch at minibatch 10 (the faster PyTorch setting)",
                jb10 / best["examples_per_s"],
                ">=",
                4.0,
                f"against {best['approach']}: {best['examples_per_s'] / 1e3:.1f}k ex/s",
            )
        r = self.row("train", JB, 1000)
        self.check(
            "jb.fit >= 65% of float32 matmul peak at minibatch 1000",
            r["percent_of_matmul_peak"] / 100,
            ">=",
            0.65,
            f"{r['gflop_per_s']:.1f} of {r['matmul_peak_gflop_per_s']:.1f} GFLOP/s",
        )

    def print_rows(self, section, bs=None):
        for r in self.rows:
            if r["section"] != section or (bs is not None and r["minibatch"] != bs):
                continue
            ratio = r.get("ratio_to_autodiff", float("nan"))
            cpu = r.get("cpu_ratio_to_autodiff", float("nan"))
            print(
                f"  {r['approach']:<44} m={r['minibatch']:<5} "
                f"{r['examples_per_s'] / 1e3:7.1f}k ex/s {r['ms_per_epoch']:8.1f} ms/epoch "
                f"x{ratio:5.2f} (cpu x{cpu:5.2f}) {r['gflop_per_s']:6.1f} GFLOP/s",
                flush=True,
            )

    # -- ablation of the hand-written step --

    def section_ablate(self):
        print("\n== ablate: reformulations of the hand-written step ==", flush=True)
        try:
            from jbackprop.training import _epoch_fn
        except ImportError:
            self.note("ablate: jbackprop.training._epoch_fn not found; section skipped")
            return
        variants = {
            "as library (1ᵀδ/m, σ(z)σ(-z), δᵀa/m)": {},
            "bias: δ.sum(0)/m": {"bias_sum": True},
            "f' = a(1-a) from the forward pass": {"prime_from_a": True},
            "scale δ by 1/m before the products": {"scale_delta": True},
            "all three": {"bias_sum": True, "prime_from_a": True, "scale_delta": True},
        }
        for bs in BATCH_SIZES:
            runners = {
                JB: self.jax_runner(fit_epoch(_epoch_fn, self.model, self.opt, bs, self.key))
            }
            for name, kw in variants.items():
                step = grad_step(hand_grad(**kw), self.opt)
                runners[name] = self.jax_runner(make_epoch(step, bs))
            runners[AD] = self.jax_runner(self.ad_epoch(bs))
            cpu: dict[str, list[float]] = {}
            times = alternate(runners, self.args.epochs, self.key, cpu)
            lib = runners[JB].params
            extras = {
                name: {"max_abs_diff_to_library": max_abs_diff(r.params, lib)}
                for name, r in runners.items()
            }
            self.epoch_rows("ablate", bs, times, cpu, extras)
            self.print_rows("ablate", bs)

    # -- stored per-example gradients --

    def section_pex(self):
        print("\n== pex: training from stored per-example gradients ==", flush=True)
        print(
            "  stored = materialised behind an optimization_barrier, then averaged as 1ᵀG/m; "
            "'fused' = jnp.mean of them in the same jit, which XLA may turn into one product",
            flush=True,
        )
        have = hasattr(jb, "per_example_grads")
        if not have:
            self.note("jb.per_example_grads not present; its rows are skipped")
        model = self.model
        for bs in BATCH_SIZES:
            grads: dict[str, Callable] = {}
            if have:
                for cs in [None] + [c for c in self.args.chunks if c < bs]:
                    grads[f"jb.per_example_grads stored (chunk_size={cs})"] = (
                        lambda p, X, Y, k, n, cs=cs: l2_grads(
                            stored_mean(jb.per_example_grads(p, X, Y, model, chunk_size=cs)), p, n
                        )
                    )
                grads["jb.per_example_grads, jnp.mean (fused)"] = lambda p, X, Y, k, n: l2_grads(
                    tree_mean0(jb.per_example_grads(p, X, Y, model)), p, n
                )
            grads["vmap(jax.grad) stored"] = lambda p, X, Y, k, n: l2_grads(
                stored_mean(ad_per_example(p, X, Y)), p, n
            )
            runners = {
                name: self.jax_runner(make_epoch(grad_step(g, self.opt), bs))
                for name, g in grads.items()
            }
            runners[AD] = self.jax_runner(self.ad_epoch(bs))
            cpu: dict[str, list[float]] = {}
            times = alternate(runners, self.args.epochs, self.key, cpu)
            self.epoch_rows("pex", bs, times, cpu)
            self.print_rows("pex", bs)
        if not have:
            return
        for bs in BATCH_SIZES:
            label = "jb.per_example_grads stored (chunk_size={})"
            cands = [self.row("pex", label.format(cs), bs) for cs in [None, *self.args.chunks]]
            r = max((c for c in cands if c), key=lambda c: c["examples_per_s"])
            target = TABLE_STORED[bs] / TABLE_AUTODIFF[bs]
            self.check(
                f"per_example_grads stored >= the table's stored row at minibatch {bs} "
                "(ratio to autodiff)",
                r["ratio_to_autodiff"],
                ">=",
                target,
                f"{r['approach']}: {r['examples_per_s'] / 1e3:.0f}k ex/s here; table "
                f"{TABLE_STORED[bs] / 1e3:.0f}k = {target:.3f} x autodiff's "
                f"{TABLE_AUTODIFF[bs] / 1e3:.0f}k",
            )

    # -- DP-SGD --

    def section_dp(self):
        print("\n== dp: DP-SGD epochs at minibatch 128 ==", flush=True)
        if not hasattr(jb, "clipped_grad"):
            self.note("jb.clipped_grad not present; the dp section is skipped")
            return
        bs, model = 128, self.model
        X, Y = self.X[:bs], self.Y[:bs]
        # agreement: the stored route with optax's aggregate and the same noise key
        dp = optax.contrib.differentially_private_aggregate(DP_CLIP, DP_NOISE, jax.random.key(3))
        G = jb.per_example_grads(self.p0, X, Y, model)
        ref, _ = dp.update(G, dp.init(self.p0))
        ref = l2_grads(ref, self.p0, self.n)
        got = jb.clipped_grad(
            self.p0,
            X,
            Y,
            model,
            self.n,
            clip=DP_CLIP,
            noise_multiplier=DP_NOISE,
            noise_key=jax.random.key(3),
        )
        err = max_rel_err(got, ref)
        print(f"  clipped_grad vs per_example_grads + optax aggregate: max rel err {err:.2e}")
        self.info["dp_agreement_max_rel_err"] = err
        size = sum(x.size for x in jax.tree.leaves(self.p0))
        k = jax.random.key(5)
        per_call = {
            "threefry bits": (jax.jit(lambda k: jax.random.bits(k, (size,))), (k,)),
            "normal": (jax.jit(lambda k: jax.random.normal(k, (size,))), (k,)),
            "jb.grad": (
                jax.jit(lambda p, X, Y: jb.grad(p, X, Y, model, self.n)),
                (self.p0, X, Y),
            ),
        }
        noise_us = {}
        for name, (f, args) in per_call.items():
            clock(f, *args)
            noise_us[name] = 1e6 * median([clock(f, *args)[1] for _ in range(30)])
        self.info["dp_noise_us_per_step"] = noise_us
        print(
            f"  per step: {size} normal draws {noise_us['normal']:.0f} us (threefry bits alone "
            f"{noise_us['threefry bits']:.0f} us); jb.grad at m={bs} {noise_us['jb.grad']:.0f} us",
            flush=True,
        )

        def private(noise=DP_NOISE, rbg=False):
            def g(p, X, Y, k, n):
                if rbg:  # the same step key's bits, as a key of XLA's fast RngBitGenerator
                    k = jax.random.wrap_key_data(jax.random.bits(k, (4,), jnp.uint32), impl="rbg")
                return jb.clipped_grad(
                    p, X, Y, model, n, clip=DP_CLIP, noise_multiplier=noise, noise_key=k
                )

            return g

        def nonprivate(p, X, Y, k, n):
            return jb.grad(p, X, Y, model, n)

        def optax_step(pex: Callable):
            dp = optax.contrib.differentially_private_aggregate(
                DP_CLIP, DP_NOISE, jax.random.key(3)
            )

            def step(params, state, Xb, Yb, key, n):
                opt_state, dp_state = state
                agg, dp_state = dp.update(pex(params, Xb, Yb), dp_state)
                g = l2_grads(agg, params, n)
                updates, opt_state = self.opt.update(g, opt_state, params)
                return optax.apply_updates(params, updates), (opt_state, dp_state)

            return step, (self.opt.init(self.p0), dp.init(self.p0))

        def stored_fast(p, X, Y, k, n):
            return l2_grads(dp_stored(jb.per_example_grads(p, X, Y, model), k), p, n)

        steps = {
            "jb.grad (non-private)": nonprivate,
            PRIV: private(),
            "jb.clipped_grad, noise_multiplier=0": private(noise=0.0),
            "jb.clipped_grad, rbg noise key": private(rbg=True),
            "jb.per_example_grads stored, clip with 1ᵀ-products": stored_fast,
        }
        runners: dict[str, Callable] = {
            name: self.jax_runner(make_epoch(grad_step(g, self.opt), bs, step_keys=True))
            for name, g in steps.items()
        }
        for name, pex in (
            (STORED_OPTAX, lambda p, X, Y: jb.per_example_grads(p, X, Y, model)),
            ("vmap(jax.grad) + optax DP aggregate", lambda p, X, Y: ad_per_example(p, X, Y)),
        ):
            step, state = optax_step(pex)
            runners[name] = JaxRunner(
                make_epoch(step, bs, step_keys=True), self.p0, state, self.X, self.Y, self.n
            )
        runners[AD] = self.jax_runner(self.ad_epoch(bs))
        cpu: dict[str, list[float]] = {}
        times = alternate(runners, self.args.epochs, self.key, cpu)
        self.epoch_rows("dp", bs, times, cpu)
        self.print_rows("dp")
        t = {name: median(ts) for name, ts in times.items()}
        self.check(
            "DP epoch (jb.clipped_grad) within 1.5x of non-private (time ratio)",
            t[PRIV] / t["jb.grad (non-private)"],
            "<=",
            1.5,
        )
        self.check(
            "DP epoch >= 5x faster than per_example_grads + optax aggregate",
            t[STORED_OPTAX] / t[PRIV],
            ">=",
            5.0,
            f"{t['jb.per_example_grads stored, clip with 1ᵀ-products'] / t[PRIV]:.1f}x against "
            "the stored route written with fast reductions",
        )

    # -- gradient statistics and curvature, per call --

    def section_stats(self):
        print("\n== stats: time per call on random minibatches (jitted) ==", flush=True)
        model, n, p = self.model, self.n, self.p0
        have_stats, have_ggn = hasattr(jb, "grad_stats"), hasattr(jb, "diag_ggn")
        if not have_stats:
            self.note("jb.grad_stats not present; its rows are skipped")
        if not have_ggn:
            self.note("jb.diag_ggn not present; its rows are skipped")
        fns: dict[str, Callable] = {"jb.grad": jax.jit(lambda p, X, Y: jb.grad(p, X, Y, model, n))}
        if have_stats:
            fns["jb.grad_stats"] = jax.jit(lambda p, X, Y: jb.grad_stats(p, X, Y, model, n))
        fns["vmap(jax.grad) stored -> stats"] = jax.jit(lambda p, X, Y: ad_stats(p, X, Y, n))
        if hasattr(jb, "per_example_grads"):
            fns["jb.per_example_grads stored -> stats"] = jax.jit(
                lambda p, X, Y: reduce_stats(jb.per_example_grads(p, X, Y, model), p, n)
            )
        if have_ggn:
            fns["jb.diag_ggn"] = jax.jit(lambda p, X, Y: jb.diag_ggn(p, X, Y, model))
        fns["vmap(jacrev) stored -> diag GGN"] = jax.jit(lambda p, X, Y: ad_diag_ggn(p, X))
        bp = None
        if importlib.util.find_spec("backpack") is not None and have_stats:
            bp = BackpackStats(p, self.args.backpack_threads)
            fns[bp.label()] = bp
            fns[bp.label(plain=True)] = lambda p, X, Y: bp(p, X, Y, plain=True)
            self.note(
                "BackPACK 1.7.1's DiagGGNExact supports BCEWithLogitsLoss only for a single "
                "output unit, so it has no diag_ggn row for this 10-output network"
            )
        else:
            self.note(
                "BackPACK rows skipped (pip install --no-deps backpack-for-pytorch einops "
                "unfoldNd, beside torch 2.13.0, adds them)"
            )
        rng = np.random.default_rng(0)
        for bs in BATCH_SIZES:
            batches = []
            for _ in range(8):
                ids = jnp.asarray(rng.choice(N_TRAIN, bs, replace=False))
                batches.append(jax.block_until_ready((self.X[ids], self.Y[ids])))
                if bp is not None:
                    bp.register(*batches[-1])
            self.stats_agreement(fns, bs, *batches[0], bp)
            # warm up, then scale the calls per round so that every function gets time
            per_call = {}
            for name, f in fns.items():
                clock(f, p, *batches[0])
                per_call[name] = median([clock(f, p, *b)[1] for b in batches[1:4]])
            slowest = max(per_call.values())
            reps = {name: int(min(50, max(1, slowest / t))) for name, t in per_call.items()}
            samples: dict[str, list[float]] = {name: [] for name in fns}
            i = 0
            for _ in range(self.args.stats_rounds):
                for name, f in fns.items():
                    for _ in range(reps[name]):
                        samples[name].append(clock(f, p, *batches[i % len(batches)])[1])
                        i += 1
            t_grad = median(samples["jb.grad"])
            for name, ts in samples.items():
                t = median(ts)
                self.add(
                    {
                        "section": "stats",
                        "approach": name,
                        "minibatch": bs,
                        "us_per_call": 1e6 * t,
                        "examples_per_s": bs / t,
                        "ratio_to_jb_grad": t / t_grad,
                        "calls": len(ts),
                    }
                )
                print(
                    f"  {name:<40} m={bs:<5} {1e6 * t:10.1f} us/call  "
                    f"{t / t_grad:7.2f}x jb.grad  ({len(ts)} calls)",
                    flush=True,
                )
        for bs in BATCH_SIZES:
            if not have_stats:
                break
            gs = self.row("stats", "jb.grad_stats", bs)
            st = self.row("stats", "vmap(jax.grad) stored -> stats", bs)
            speedup = st["us_per_call"] / gs["us_per_call"]
            gs["speedup_vs_vmap_stored"] = speedup
            if bs == 128:
                self.check(
                    "grad_stats <= 1.5x jb.grad at minibatch 128 (time ratio)",
                    gs["ratio_to_jb_grad"],
                    "<=",
                    1.5,
                )
                self.check(
                    "grad_stats >= 5x faster than stored vmap(grad) statistics at minibatch 128",
                    speedup,
                    ">=",
                    5.0,
                )
        if have_ggn:
            for bs in BATCH_SIZES:
                gg = self.row("stats", "jb.diag_ggn", bs)
                ref = self.row("stats", "vmap(jacrev) stored -> diag GGN", bs)
                gg["speedup_vs_vmap_stored"] = ref["us_per_call"] / gg["us_per_call"]

    def stats_agreement(self, fns, bs, X, Y, bp=None):
        p = self.p0
        agree = {}
        ref = fns["vmap(jax.grad) stored -> stats"](p, X, Y)
        if "jb.grad_stats" in fns:
            s = fns["jb.grad_stats"](p, X, Y)
            agree["grad_stats.grad vs jb.grad"] = max_rel_err(s[0], fns["jb.grad"](p, X, Y))
            for i, what in enumerate(("grad", "norms", "sum_grad_squared", "variance")):
                agree[f"grad_stats.{what} vs vmap(grad)"] = max_rel_err(s[i], ref[i])
            if bp is not None:
                bp(p, X, Y)
                for i, what in enumerate(("norms", "sum_grad_squared", "variance"), start=1):
                    agree[f"grad_stats.{what} vs BackPACK"] = max_rel_err(s[i], bp.results()[i - 1])
        if "jb.diag_ggn" in fns:
            agree["diag_ggn vs vmap(jacrev)"] = max_rel_err(
                fns["jb.diag_ggn"](p, X, Y), fns["vmap(jacrev) stored -> diag GGN"](p, X, Y)
            )
        self.info.setdefault("stats_agreement_max_rel_err", {})[str(bs)] = agree
        if agree:
            worst = max(agree.values())
            print(f"  m={bs}: agreement with autodiff, worst max rel err {worst:.2e}", flush=True)
            if worst > 1e-3:
                self.note(f"stats at minibatch {bs} disagree with autodiff: {agree}")

    # -- several models at once --

    def section_many(self):
        print("\n== many: jb.fit_many, 8 models against one ==", flush=True)
        if not hasattr(jb, "fit_many"):
            self.note("jb.fit_many not present; the many section is skipped")
            return
        bs, epochs = 10, self.args.many_epochs
        data_ = (self.X, self.Y)

        def one():
            return jb.fit(self.p0, self.model, data_, self.opt, epochs, bs, self.key, n=self.n)

        try:
            call_k = fit_many_caller(self, bs, epochs)
        except Exception as err:  # an API this script does not know yet
            self.note(f"jb.fit_many could not be called: {type(err).__name__}: {err}")
            return
        runners = {"jb.fit, 1 model": one, "jb.fit_many, 1 model": lambda: call_k(1)}
        runners["jb.fit_many, 8 models"] = lambda: call_k(8)
        if "shared_shuffle" in inspect.signature(jb.fit_many).parameters:
            runners["jb.fit_many, 8 models, shared_shuffle=False"] = lambda: call_k(
                8, shared_shuffle=False
            )
        for f in runners.values():
            clock(f)  # compile
        times: dict[str, list[float]] = {name: [] for name in runners}
        for _ in range(self.args.many_rounds):
            for name, f in runners.items():
                times[name].append(clock(f)[1])
        for name, ts in times.items():
            t = median(ts)
            models = 8 if "8 models" in name else 1
            self.add(
                {
                    "section": "many",
                    "approach": name,
                    "minibatch": bs,
                    "epochs": epochs,
                    "wall_seconds": t,
                    "model_epochs_per_s": models * epochs / t,
                    "samples": ts,
                }
            )
            print(f"  {name:<44} {t:8.2f} s for {epochs} epochs (median)", flush=True)
        t = {name: median(ts) for name, ts in times.items()}
        self.check(
            "fit_many with 8 models < 4x the wall time of one model (jb.fit)",
            t["jb.fit_many, 8 models"] / t["jb.fit, 1 model"],
            "<",
            4.0,
        )

    # -- the GGN diagonal against BackPACK, on a softmax network --

    def section_ggn(self):
        """jb.diag_ggn against BackPACK's DiagGGNExact with CrossEntropyLoss (softmax and
        log-likelihood: the pairing BackPACK supports for several outputs), 784-100-10."""
        print("\n== ggn: jb.diag_ggn against BackPACK DiagGGNExact (softmax) ==", flush=True)
        if importlib.util.find_spec("backpack") is None or not hasattr(jb, "diag_ggn"):
            self.note("ggn section skipped: needs jb.diag_ggn and backpack-for-pytorch")
            return
        import torch
        from backpack import backpack, extend
        from backpack.extensions import DiagGGNExact
        from torch import nn

        model = jb.Model(SIZES, hidden="sigmoid", output="softmax", cost="log_likelihood")
        p = jb.init_params(jax.random.key(0), model)
        layers = []
        for i, layer in enumerate(p):
            lin = nn.Linear(layer["w"].shape[1], layer["w"].shape[0])
            with torch.no_grad():
                lin.weight.copy_(torch.from_numpy(np.array(layer["w"])))
                lin.bias.copy_(torch.from_numpy(np.array(layer["b"])))
            layers += [lin] + ([nn.Sigmoid()] if i < len(p) - 1 else [])
        net = extend(nn.Sequential(*layers))
        linears = [m for m in net if isinstance(m, nn.Linear)]
        loss_fn = extend(nn.CrossEntropyLoss(reduction="mean"))
        torch.set_num_threads(self.args.backpack_threads)
        ggn = jax.jit(lambda p, X, y: jb.diag_ggn(p, X, y, model))
        labels = jnp.argmax(self.Y, axis=1)
        rng = np.random.default_rng(1)

        def backpack_ggn(xt, yt):
            net.zero_grad(set_to_none=True)
            with backpack(DiagGGNExact()):
                loss_fn(net(xt), yt).backward()
            return tuple(
                {"w": m.weight.diag_ggn_exact.numpy(), "b": m.bias.diag_ggn_exact.numpy()}
                for m in linears
            )

        for bs in BATCH_SIZES:
            batches = []
            for _ in range(6):
                ids = np.asarray(rng.choice(N_TRAIN, bs, replace=False))
                X, y = self.X[ids], labels[ids]
                tensors = (torch.from_numpy(np.array(X)), torch.from_numpy(np.array(y)).long())
                batches.append((jax.block_until_ready((X, y)), tensors))
            (X, y), (xt, yt) = batches[0]
            err = max_rel_err(ggn(p, X, y), jax.tree.map(jnp.asarray, backpack_ggn(xt, yt)))
            self.info.setdefault("ggn_vs_backpack_max_rel_err", {})[str(bs)] = err
            t_jb = median([clock(ggn, p, *b[0])[1] for b in batches * 3])
            t_bp = median([clock(backpack_ggn, *b[1])[1] for b in batches * 3])
            for name, t in (("jb.diag_ggn", t_jb), ("BackPACK DiagGGNExact", t_bp)):
                self.add(
                    {
                        "section": "ggn",
                        "approach": name,
                        "minibatch": bs,
                        "us_per_call": 1e6 * t,
                        "ratio_to_backpack": t / t_bp,
                    }
                )
            print(
                f"  m={bs:<5} jb.diag_ggn {1e6 * t_jb:9.0f} us  BackPACK {1e6 * t_bp:9.0f} us "
                f"({t_bp / t_jb:.1f}x)  agreement max rel err {err:.1e}",
                flush=True,
            )
            self.check(f"diag_ggn faster than BackPACK at minibatch {bs}", t_bp / t_jb, ">=", 1.0)

    # -- several local processes --

    def section_multiproc(self):
        print("\n== multiproc: jb.fit over 1, 2 and 4 local processes, minibatch 1000 ==")
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_multiprocess import run as run_processes

        data_dir = self.args.data_dir or os.environ.get("JBACKPROP_DATA", "")
        if data_dir and (Path(data_dir) / "mnist").is_dir():
            data_dir = str(Path(data_dir) / "mnist")
        base = None
        for processes in (1, 2, 4):
            r = run_processes(processes, 1000, max(3, self.args.epochs), data_dir)
            base = base or r["examples_per_second"]
            r |= {"section": "multiproc", "approach": f"jb.fit, {processes} processes"}
            r["speedup"] = r["examples_per_second"] / base
            self.add(r)
            print(
                f"  {processes} processes: {r['examples_per_second']:10.0f} examples/s, "
                f"{1000 * r['median_seconds']:.0f} ms/epoch, {r['speedup']:.2f}x",
                flush=True,
            )

    # -- the whole chapter-3 run --

    def section_full(self):
        print("\n== full: python -m jbackprop.experiments.mnist, 30 epochs ==", flush=True)
        if importlib.util.find_spec("jbackprop.experiments.mnist") is None:
            self.note("jbackprop.experiments.mnist not present; --full skipped")
            return
        help_text = subprocess.run(
            [sys.executable, "-m", "jbackprop.experiments.mnist", "--help"],
            capture_output=True,
            text=True,
        ).stdout
        with tempfile.TemporaryDirectory() as tmp:
            wanted = [
                ("--epochs", ["30"]),
                ("--sizes", [str(s) for s in SIZES]),
                ("--batch-size", ["10"]),
                ("--eta", [str(ETA)]),
                ("--lmbda", [str(LMBDA)]),
                ("--out", [str(Path(tmp) / "run")]),
                ("--no-progress", []),
            ]
            if self.args.data_dir:
                wanted.append(("--data-dir", [self.args.data_dir]))
            cmd = [sys.executable, "-m", "jbackprop.experiments.mnist"]
            for flag, vals in wanted:
                if flag in help_text:
                    cmd += [flag, *vals]
            shown = " ".join(["python", *cmd[1:]])
            print(f"  $ {shown}", flush=True)
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            wall = time.perf_counter() - t0
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-5:]
        for line in tail:
            print(f"    {line}", flush=True)
        self.add(
            {
                "section": "full",
                "approach": "experiments.mnist, 30 epochs",
                "minibatch": 10,
                "wall_seconds": wall,
                "returncode": proc.returncode,
                "command": shown,
                "output_tail": tail,
            }
        )
        if proc.returncode != 0:
            self.note(f"experiments.mnist exited with {proc.returncode}")
        self.check("chapter-3 experiment, 30 epochs, wall time (s)", wall, "<", 30.0)

    # -- output --

    def meta(self) -> dict:
        meta = {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "jax": jax.__version__,
            "optax": optax.__version__,
            "jbackprop": getattr(jb, "__version__", "?"),
            "backend": jax.default_backend(),
            "devices": [str(d) for d in jax.devices()],
            "network": "784-100-10 sigmoid, cross-entropy + L2 (lmbda 5, n=50000), SGD eta 0.5",
            "flop_per_example": FLOP,
            "examples_per_epoch": N_TRAIN,
            "epochs_timed": self.args.epochs,
            "command": " ".join(["python", *sys.argv]),
            "loadavg": load_loadavg(),
        }
        if torch_available():
            import torch

            meta["torch"] = torch.__version__
        return meta


def fit_epoch(epoch_fn: Callable, model, optimizer, batch_size: int, key) -> Callable:
    """jb.fit's compiled epoch, built with the arguments jb.fit passes (no mesh, no custom
    gradient, no progress callback) and called with ``(params, opt_state, X, Y, key, n)``.

    Recent versions take the epoch key as raw key data plus its PRNG ``impl``, as fit
    does; older ones take the typed key itself."""
    names = list(inspect.signature(epoch_fn).parameters)
    typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    extra = {"mesh": None, "gradient": None, "progress": None}
    extra["impl"] = jax.random.key_impl(key) if typed else None
    args = [model, optimizer, batch_size]
    for name in names[3:]:
        if name not in extra:
            break
        args.append(extra[name])
    run = epoch_fn(*args)
    if "impl" not in names or not typed:
        return run

    def epoch(params, opt_state, X, Y, k, n):
        return run(params, opt_state, X, Y, jax.random.key_data(k), n)

    return epoch


def hand_grad(bias_sum=False, prime_from_a=False, scale_delta=False):
    """The hand-written minibatch gradient of the 784-100-10 network (eqs 3, 6-10, 13),
    with the formulation switches the ablation measures."""

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
        return l2_grads(tuple(grads), params, n)

    return g


def fit_many_caller(bench: Bench, bs: int, epochs: int) -> Callable[[int], Any]:
    """``call(k)`` trains ``k`` models of the chapter-3 setting with ``jb.fit_many``."""

    def call(k: int, **kw):
        keys = jax.random.split(jax.random.key(1), k)
        return jb.fit_many(
            keys, bench.model, (bench.X, bench.Y), epochs, bs, eta=ETA, lmbda=LMBDA, n=bench.n, **kw
        )

    jax.block_until_ready(call(1))  # fails here if the signature is not the expected one
    return call


def markdown_tables(rows) -> list[str]:
    """Markdown tables of every section, as benchmarks.md shows them."""
    out = []
    epoch_sections = [
        sec for sec in ("train", "ablate", "pex", "dp") if any(r["section"] == sec for r in rows)
    ]
    for sec in epoch_sections:
        out += [
            f"\n{sec}:\n",
            "| approach | minibatch | examples/s | ms/epoch | ratio to autodiff "
            "| CPU-time ratio | GFLOP/s |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in rows:
            if r["section"] == sec:
                out.append(
                    f"| {r['approach']} | {r['minibatch']} | {r['examples_per_s'] / 1e3:.1f}k | "
                    f"{r['ms_per_epoch']:.0f} | {r.get('ratio_to_autodiff', float('nan')):.2f} | "
                    f"{r.get('cpu_ratio_to_autodiff', float('nan')):.2f} | "
                    f"{r['gflop_per_s']:.1f} |"
                )
    if any(r["section"] == "stats" for r in rows):
        out += [
            "\nstats:\n",
            "| approach | minibatch | us/call | x jb.grad | calls |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for r in rows:
            if r["section"] == "stats":
                out.append(
                    f"| {r['approach']} | {r['minibatch']} | {r['us_per_call']:.0f} | "
                    f"{r['ratio_to_jb_grad']:.2f} | {r['calls']} |"
                )
    for r in rows:
        if r["section"] in ("many", "full"):
            out.append(f"{r['approach']}: {r['wall_seconds']:.2f} s")
    return out


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=5, help="timed epochs after one warm-up")
    ap.add_argument("--quick", action="store_true", help="fewer epochs and calls")
    ap.add_argument("--only", default=",".join(s for s in SECTIONS if s != "full"), help="sections")
    ap.add_argument("--full", action="store_true", help="also time the 30-epoch experiment")
    ap.add_argument("--json", default="runs/bench.json", help="where to write the results")
    ap.add_argument("--data-dir", default=default_data_dir(), help="folder with MNIST")
    ap.add_argument("--chunks", default="128,250", help="per_example_grads chunk sizes to measure")
    ap.add_argument(
        "--torch-threads",
        default="2,1",
        help="PyTorch thread counts to measure, comma separated ('' for none)",
    )
    ap.add_argument(
        "--torch-max-s", type=float, default=20.0, help="cut a PyTorch epoch after this long"
    )
    ap.add_argument("--stats-rounds", type=int, default=7)
    ap.add_argument("--backpack-threads", type=int, default=1, help="torch threads for BackPACK")
    ap.add_argument("--many-epochs", type=int, default=2)
    ap.add_argument("--many-rounds", type=int, default=3)
    args = ap.parse_args(argv)
    args.torch_threads = [int(t) for t in args.torch_threads.split(",") if t.strip()]
    args.chunks = [int(c) for c in args.chunks.split(",") if c.strip()]
    if args.quick:
        args.epochs = min(args.epochs, 2)
        args.stats_rounds = min(args.stats_rounds, 3)
        args.many_epochs, args.many_rounds = 1, 1
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    if args.full and "full" not in sections:
        sections.append("full")
    args.sections = sections
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    bench = Bench(args)
    meta = bench.meta()
    print(
        f"{meta['cpu']}, {meta['cores']} cores, jax {meta['jax']} ({meta['backend']}), "
        f"torch {meta.get('torch', 'not installed')}; load average {meta['loadavg']}",
        flush=True,
    )
    print(f"{FLOP / 1e6:.3f} MFLOP per example forward and backward", flush=True)
    for s in args.sections:
        getattr(bench, f"section_{s}")()
    if bench.peak_samples:
        bench.info["matmul_peak_gflop_per_s"] = bench.peak
    meta["loadavg_end"] = load_loadavg()
    result = {
        "meta": meta,
        "info": bench.info,
        "rows": bench.rows,
        "checks": bench.checks,
        "notes": bench.notes,
    }
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str))
    print(f"\nwrote {path}", flush=True)
    print("\n".join(markdown_tables(bench.rows)))
    passed = sum(c["pass"] for c in bench.checks)
    print(f"{passed} of {len(bench.checks)} targets met", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
