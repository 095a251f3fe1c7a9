"""dattri's "MNIST-10 + MLP" benchmark: data, training recipe, ground truth and the LDS.

The benchmark (Deng et al., "dattri", NeurIPS 2024 Datasets and Benchmarks), as its code
defines it:

* data: the first 5,000 MNIST training images and the first 500 test images, normalised
  as ``(x - 0.1307) / 0.3081``;
* network: 784-128-64-10, ReLU, dropout 0.1 after each hidden layer, softmax output and
  the cross-entropy (log-likelihood) cost;
* training: SGD with momentum 0.9, learning rate 0.01, minibatch 64, 50 epochs;
* models to attribute with: 10 trained on the whole 5,000 images with different seeds
  (Grad-Dot and Grad-Cos use the first, TracIn all ten) and models trained on random
  halves of it (TRAK's ensemble);
* ground truth: 100 random subsets of half the training set (subset ``i`` drawn by
  ``numpy.random.default_rng(seed + i).choice(5000, 2500, replace=False)``), one model
  trained on each (``num_runs_per_subset`` defaults to 1); the target is minus the test
  example's cost under that model, dropout off;
* LDS: for each test example, Spearman's rank correlation over the subsets between the
  summed scores of the subset's training examples and the target; averaged over the test
  examples (NaNs, from constant columns, left out).

Departures (the library trains and initialises its own way): parameters start as
``jbackprop.init_params(scheme="scaled")`` draws them (weights ``N(0, 1/n_in)``, biases
``N(0, 1)``) instead of PyTorch's uniform ones, and the models trained on the whole set share
their minibatch order (``fit_many``'s shared shuffle) while their seeds set initialisation
and dropout.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy.stats import rankdata

import jbackprop as jb

MEAN, STD = 0.1307, 0.3081  # torchvision's MNIST normalisation, as dattri applies it


@dataclass(frozen=True)
class Setup:
    """The benchmark's sizes and recipe; :func:`quick` shrinks it for a smoke run."""

    n_train: int = 5000
    n_test: int = 500
    n_tune: int = 500  # further test images, only for choosing TRAK's damping
    subsets: int = 100
    runs_per_subset: int = 1
    models: int = 10
    epochs: int = 50
    batch_size: int = 64
    eta: float = 0.01
    momentum: float = 0.9
    dropout: float = 0.1
    sizes: tuple[int, ...] = (784, 128, 64, 10)
    seed: int = 0

    @property
    def model(self) -> jb.Model:
        return jb.Model(
            sizes=self.sizes,
            hidden="relu",
            output="softmax",
            cost="log_likelihood",
            dropout=self.dropout,
        )


def quick(setup: Setup) -> Setup:
    """A smoke-run version of ``setup``: a few hundred images, a few models and epochs."""
    return Setup(
        n_train=400,
        n_test=40,
        n_tune=40,
        subsets=8,
        runs_per_subset=1,
        models=5,
        epochs=2,
        batch_size=64,
        sizes=(784, 16, 8, 10),
        seed=setup.seed,
    )


@dataclass(frozen=True)
class Data:
    X: np.ndarray  # training images (n_train, 784), normalised
    Y: np.ndarray  # training labels (n_train,)
    X_test: np.ndarray  # benchmark test images, then the tuning images
    Y_test: np.ndarray


def load(setup: Setup, data_dir: str | None) -> Data:
    """The first ``n_train`` training and ``n_test + n_tune`` test images, normalised."""
    splits = jb.data.load("mnist", data_dir, progress=False)
    X, Y = splits.train
    X_test, Y_test = splits.test
    m_test = setup.n_test + setup.n_tune
    return Data(
        X=((X[: setup.n_train] - MEAN) / STD).astype(np.float32),
        Y=np.asarray(Y[: setup.n_train]),
        X_test=((X_test[:m_test] - MEAN) / STD).astype(np.float32),
        Y_test=np.asarray(Y_test[:m_test]),
    )


# --- training -------------------------------------------------------------------------


def train(setup: Setup, keys, X, Y):
    """``len(keys)`` models trained by dattri's recipe with :func:`jbackprop.fit_many`."""
    params, _ = jb.fit_many(
        keys,
        setup.model,
        (X, Y),
        setup.epochs,
        setup.batch_size,
        eta=setup.eta,
        optimizer=partial(optax.sgd, momentum=setup.momentum),
    )
    return jax.block_until_ready(params)


def unstack(stacked, k: int):
    """Model ``k`` of params stacked along a leading axis."""
    return tuple({n: v[k] for n, v in layer.items()} for layer in stacked)


def half_subset(setup: Setup, k: int) -> np.ndarray:
    """The training half of TRAK's model ``k``, from a stream apart from the LDS subsets."""
    rng = np.random.default_rng([setup.seed, 1, k])
    return np.sort(rng.choice(setup.n_train, setup.n_train // 2, replace=False))


def lds_subset(setup: Setup, i: int) -> np.ndarray:
    """Ground-truth subset ``i``, drawn as dattri's ``retrain_lds`` draws it."""
    rng = np.random.default_rng(setup.seed + i)
    return rng.choice(setup.n_train, setup.n_train // 2, replace=False)


def _logits(params, x):
    """``z^L`` of one example, written out (the targets and the autodiff reference)."""
    a = x
    for l, layer in enumerate(params):
        z = layer["w"] @ a + layer["b"]
        a = jax.nn.relu(z) if l < len(params) - 1 else z
    return z


def _example_cost(params, x, y):
    return -jax.nn.log_softmax(_logits(params, x))[y]


_costs = jax.jit(jax.vmap(_example_cost, (None, 0, 0)))


def example_costs(params, X, Y) -> np.ndarray:
    """Each example's cost ``C_x = -ln a^L_y`` (dattri's per-example cross-entropy), from
    the logits with dropout off."""
    return np.asarray(_costs(params, jnp.asarray(X), jnp.asarray(Y)), np.float64)


@dataclass
class GroundTruth:
    subsets: np.ndarray  # (S, n_train // 2) training indices
    targets: np.ndarray  # (S, m_test): minus the test cost, averaged over the runs
    seconds: float


def ground_truth(setup: Setup, data: Data, log=print) -> GroundTruth:
    """Retrain on every subset (its runs together in one ``fit_many``) and record minus
    each test example's cost, as dattri's ``calculate_lds_ground_truth`` does."""
    start = time.perf_counter()
    subsets, targets = [], []
    base = jax.random.key(setup.seed + 2)
    for i in range(setup.subsets):
        idx = lds_subset(setup, i)
        keys = jax.random.split(jax.random.fold_in(base, i), setup.runs_per_subset)
        stacked = train(setup, keys, data.X[idx], data.Y[idx])
        costs = [
            example_costs(unstack(stacked, r), data.X_test, data.Y_test)
            for r in range(setup.runs_per_subset)
        ]
        subsets.append(idx)
        targets.append(-np.mean(costs, axis=0))
        if (i + 1) % 10 == 0 or i + 1 == setup.subsets:
            seconds = time.perf_counter() - start
            log(f"  ground truth: {i + 1}/{setup.subsets} subsets, {seconds:.0f} s")
    return GroundTruth(np.stack(subsets), np.stack(targets), time.perf_counter() - start)


# --- the metric -----------------------------------------------------------------------


def lds(scores: np.ndarray, subsets: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """The linear datamodeling score of every test example.

    Args:
      scores: ``(m_test, n_train)``, higher = the training example helps more.
      subsets: ``(S, n_train // 2)`` training indices of each retraining subset.
      targets: ``(S, m_test)``, the retrained models' outputs (minus the test cost).

    Returns ``(m_test,)`` Spearman correlations over the ``S`` subsets between the summed
    scores of each subset and the target (NaN where either is constant).
    """
    scores = np.asarray(scores, np.float64)
    mask = np.zeros((subsets.shape[0], scores.shape[1]))
    np.put_along_axis(mask, subsets, 1.0, axis=1)
    predicted = mask @ scores.T  # (S, m_test)
    a, b = rankdata(predicted, axis=0), rankdata(targets, axis=0)
    a, b = a - a.mean(axis=0), b - b.mean(axis=0)
    denom = np.sqrt(np.sum(a * a, axis=0) * np.sum(b * b, axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, np.sum(a * b, axis=0) / denom, np.nan)


def mean_lds(scores, subsets, targets) -> float:
    return float(np.nanmean(lds(scores, subsets, targets)))


# --- gradient inner products against stored autodiff gradients --------------------------


@jax.jit
def stored_gram(params, X1, Y1, X2, Y2):
    """``G1 G2ᵀ`` from stored per-example gradients ``vmap(jax.grad)``, flattened."""

    def flat(X, Y):
        g = jax.vmap(jax.grad(_example_cost), (None, 0, 0))(params, X, Y)
        return jnp.concatenate([leaf.reshape(X.shape[0], -1) for leaf in jax.tree.leaves(g)], 1)

    return flat(X1, Y1) @ flat(X2, Y2).T


def timed(fn, *args, repeat: int = 3, **kwargs):
    """``(result, first call's seconds, best later call's seconds)``."""
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args, **kwargs))
    first = time.perf_counter() - start
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args, **kwargs))
        best = min(best, time.perf_counter() - start)
    return out, first, best
