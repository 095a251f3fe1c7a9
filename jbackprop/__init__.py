"""jbackprop: hand-written backpropagation for fully-connected networks in JAX.

The lecture's equations as pure functions over explicit parameter pytrees::

    import jax, jbackprop as jb
    model = jb.Model(sizes=(784, 100, 10), l2=5.0)
    params = jb.init_params(jax.random.key(0), model)
    g = jb.grad(params, X, Y, model, n=50_000)
"""

from jbackprop import (
    activations,
    attribution,
    costs,
    curvature,
    data,
    interop,
    privacy,
    regularizers,
    stats,
    training,
)
from jbackprop.attribution import empirical_ntk, grad_gram
from jbackprop.curvature import diag_ggn
from jbackprop.io import load_params, save_params
from jbackprop.model import Model, Params
from jbackprop.network import (
    backprop,
    cost,
    forward,
    grad,
    init_params,
    per_example_grads,
    value_and_grad,
)
from jbackprop.privacy import DPGradient, clipped_grad, per_example_norms
from jbackprop.stats import GradStats, NoiseScale, grad_stats, noise_scale
from jbackprop.sweep import fit_many
from jbackprop.training import TrainingDiverged, TrainState, accuracy, evaluate, fit

__version__ = "0.1.0"

__all__ = [
    "DPGradient",
    "GradStats",
    "Model",
    "NoiseScale",
    "Params",
    "TrainState",
    "TrainingDiverged",
    "accuracy",
    "activations",
    "attribution",
    "backprop",
    "clipped_grad",
    "cost",
    "costs",
    "curvature",
    "data",
    "diag_ggn",
    "empirical_ntk",
    "evaluate",
    "fit",
    "fit_many",
    "forward",
    "grad",
    "grad_gram",
    "grad_stats",
    "init_params",
    "interop",
    "load_params",
    "noise_scale",
    "per_example_grads",
    "per_example_norms",
    "privacy",
    "regularizers",
    "save_params",
    "stats",
    "training",
    "value_and_grad",
]
