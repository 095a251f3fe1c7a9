"""PyTorch and BackPACK on the same networks and minibatches; both optional.

Neither is a dependency of the project. They live in a separate virtual environment::

    python3 -m venv .venv-bench
    .venv-bench/bin/pip install -e . torch==2.13.0
    .venv-bench/bin/pip install --no-deps backpack-for-pytorch einops unfoldNd

``torch`` and ``backpack`` are imported inside the functions that use them, so the package
imports without them and the sections skip their rows with a note.
"""

from __future__ import annotations

import importlib.util
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from scripts.bench.setting import ETA, LMBDA

TORCH_MISSING = "torch not installed: its rows are skipped (see .venv-bench in benchmarks.md)"
BACKPACK_MISSING = (
    "backpack-for-pytorch not installed: its rows are skipped "
    "(pip install --no-deps backpack-for-pytorch einops unfoldNd, beside torch 2.13.0)"
)


def has_torch() -> bool:
    return importlib.util.find_spec("torch") is not None


def has_backpack() -> bool:
    return has_torch() and importlib.util.find_spec("backpack") is not None


def torch_label(threads: int) -> str:
    return f"PyTorch CPU, {threads} thread{'s' if threads > 1 else ''}"


def sigmoid_net(params):
    """``nn.Sequential`` of ``nn.Linear`` layers holding ``params``, sigmoid between them."""
    import torch
    from torch import nn

    layers = []
    for i, p in enumerate(params):
        lin = nn.Linear(p["w"].shape[1], p["w"].shape[0])
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(np.array(p["w"])))
            lin.bias.copy_(torch.from_numpy(np.array(p["b"])))
        layers.append(lin)
        if i < len(params) - 1:
            layers.append(nn.Sigmoid())
    return nn.Sequential(*layers)


def linears(net) -> list:
    from torch import nn

    return [m for m in net if isinstance(m, nn.Linear)]


def as_params(net) -> tuple:
    return tuple(
        {"w": jnp.asarray(m.weight.detach().numpy()), "b": jnp.asarray(m.bias.detach().numpy())}
        for m in linears(net)
    )


class TorchEpoch:
    """The same training in PyTorch on the CPU, one epoch per call, for the harness.

    BCE with logits summed over the outputs and averaged over the minibatch,
    ``torch.optim.SGD`` with ``weight_decay = lmbda/n`` on the weights only (the gradient of
    the L2 term), and jbackprop's permutation for the epoch key. An epoch stops after
    ``max_s`` seconds (PyTorch's thread pool degrades badly when the cores are
    oversubscribed); its time is then scaled to the whole epoch, and ``partial`` counts such
    epochs."""

    def __init__(self, params, X, Y, n: int, batch_size: int, threads: int, max_s: float):
        import torch

        self.bs, self.threads, self.max_s, self.partial = batch_size, threads, max_s, 0
        self.net = sigmoid_net(params)
        weights = [m.weight for m in linears(self.net)]
        biases = [m.bias for m in linears(self.net)]
        self.opt = torch.optim.SGD(
            [
                {"params": weights, "weight_decay": LMBDA / n},
                {"params": biases, "weight_decay": 0.0},
            ],
            lr=ETA,
        )
        self.X = torch.from_numpy(np.array(X))
        self.Y = torch.from_numpy(np.array(Y))

    def __call__(self, e: int, key: jax.Array) -> tuple[float, float]:
        import torch
        from torch.nn.functional import binary_cross_entropy_with_logits as bce

        torch.set_num_threads(self.threads)
        size = self.X.shape[0]
        perm = torch.from_numpy(np.array(jax.random.permutation(jax.random.split(key)[0], size)))
        net, opt, X, Y, bs = self.net, self.opt, self.X, self.Y, self.bs
        done = 0
        c0, t0 = time.process_time(), time.perf_counter()
        for start in range(0, size, bs):
            ids = perm[start : start + bs].long()
            opt.zero_grad(set_to_none=True)
            loss = bce(net(X[ids]), Y[ids], reduction="sum") / len(ids)
            loss.backward()
            opt.step()
            done += len(ids)
            if done % (50 * bs) == 0 and time.perf_counter() - t0 > self.max_s:
                break
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        if done < size:
            self.partial += 1
        return wall * size / done, cpu * size / done

    @property
    def params(self) -> tuple:
        return as_params(self.net)


class BackpackStats:
    """BackPACK's BatchL2Grad, SumGradSquared and Variance on the same network, all from
    one backward pass of the loss summed over the minibatch (so its individual gradients
    are exactly the ``g_i`` of jb.grad_stats). Called like the jitted functions it is
    timed beside, ``(params, X, Y)``, on minibatches registered first; the statistics stay
    on the module parameters until :meth:`results`."""

    def __init__(self, params, threads: int, plain: bool = False):
        import torch
        from backpack import extend

        # BackPACK's hooks on modules whose inputs need no gradient warn on every call
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        self.threads, self.plain = threads, plain
        self.net = extend(sigmoid_net(params))
        self.loss = extend(torch.nn.BCEWithLogitsLoss(reduction="sum"))
        self.tensors: dict[int, tuple] = {}

    @property
    def label(self) -> str:
        s = "s" if self.threads > 1 else ""
        if self.plain:
            return f"PyTorch backward, no extension ({self.threads} thread{s})"
        return f"BackPACK L2+SGS+Variance ({self.threads} thread{s})"

    def register(self, X, Y) -> None:
        import torch

        self.tensors[id(X)] = (torch.from_numpy(np.array(X)), torch.from_numpy(np.array(Y)))

    def __call__(self, params, X, Y) -> None:
        import torch
        from backpack import backpack
        from backpack.extensions import BatchL2Grad, SumGradSquared, Variance

        torch.set_num_threads(self.threads)
        xt, yt = self.tensors[id(X)]
        self.net.zero_grad(set_to_none=True)
        loss = self.loss(self.net(xt), yt)
        if self.plain:
            loss.backward()
            return
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
                for m in linears(self.net)
            )

        norms = jnp.sqrt(sum(jax.tree.leaves(tree("batch_l2"))))
        return norms, tree("sum_grad_squared"), tree("variance")


class BackpackGGN:
    """BackPACK's DiagGGNExact with CrossEntropyLoss (softmax and log-likelihood, the
    pairing it supports for several outputs), called on torch tensors ``(x, labels)``."""

    def __init__(self, params, threads: int):
        import torch
        from backpack import extend

        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        self.threads = threads
        self.net = extend(sigmoid_net(params))
        self.loss = extend(torch.nn.CrossEntropyLoss(reduction="mean"))

    def __call__(self, xt, yt) -> tuple:
        import torch
        from backpack import backpack
        from backpack.extensions import DiagGGNExact

        torch.set_num_threads(self.threads)
        self.net.zero_grad(set_to_none=True)
        with backpack(DiagGGNExact()):
            self.loss(self.net(xt), yt).backward()
        return tuple(
            {"w": m.weight.diag_ggn_exact.numpy(), "b": m.bias.diag_ggn_exact.numpy()}
            for m in linears(self.net)
        )
