"""The benchmark's setting: the book's chapter-3 network, its hyperparameters and MNIST.

784-100-10 with sigmoid units, cross-entropy plus L2 (lmbda 5, n = 50,000), plain SGD with
eta 0.5, trained on the first 50,000 MNIST training images, held on the device.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from jax import Array

import jbackprop as jb
from jbackprop import data

SIZES = (784, 100, 10)
ETA = 0.5
LMBDA = 5.0
N_TRAIN = 50_000
BATCH_SIZES = (10, 128, 1000)
DP_CLIP, DP_NOISE = 1.0, 1.1


def flop_per_example(sizes: tuple[int, ...]) -> int:
    """Forward (eq 3), eq 8 for the hidden layers and eq 10: 2 FLOP per multiply-add."""
    macs = sum(a * b for a, b in itertools.pairwise(sizes))
    back = sum(a * b for a, b in itertools.pairwise(sizes[1:]))
    return 2 * (2 * macs + back)


FLOP = flop_per_example(SIZES)


def sigmoid_model(sizes: tuple[int, ...] = SIZES) -> jb.Model:
    """Sigmoid units, sigmoid outputs, cross-entropy and the L2 term, as in chapter 3."""
    return jb.Model(sizes=sizes, hidden="sigmoid", output="sigmoid", l2=LMBDA)


@dataclass(frozen=True)
class Setting:
    """The training set on the device, the network, its start and the optimizer."""

    model: jb.Model
    optimizer: optax.GradientTransformation
    X: Array  # (n, 784) float32
    Y: Array  # (n, 10) one-hot
    labels: Array  # (n,)
    params: jb.Params  # the start of every approach
    key: Array  # the shuffles: epoch e uses fold_in(key, e)

    @property
    def n(self) -> int:
        return int(self.X.shape[0])


def default_data_dir() -> str | None:
    """``None`` when ``$JBACKPROP_DATA`` is set (the library reads it), else the
    ``shared/data`` folder beside the checkout when there is one (as ``scripts/_env.sh``
    finds it), else ``None`` (the library's own discovery)."""
    if os.environ.get("JBACKPROP_DATA"):
        return None
    beside = Path(__file__).resolve().parents[2].parent / "shared" / "data"
    return str(beside) if beside.is_dir() else None


def load(data_dir: str | None, n_train: int = N_TRAIN) -> Setting:
    """MNIST's first ``n_train`` training images and the chapter-3 network."""
    x, labels = data.load("mnist", data_dir=data_dir, progress=False).train
    X = jax.device_put(jnp.asarray(x[:n_train]))
    labels = jnp.asarray(labels[:n_train])
    model = sigmoid_model()
    return Setting(
        model=model,
        optimizer=optax.sgd(ETA),
        X=X,
        Y=jax.nn.one_hot(labels, SIZES[-1], dtype=jnp.float32),
        labels=labels,
        params=jb.init_params(jax.random.key(0), model),
        key=jax.random.key(1),
    )
