"""jbackprop: hand-written backpropagation for fully-connected networks in JAX.

The lecture's equations as pure functions over explicit parameter pytrees::

    import jax, jbackprop as jb
    model = jb.Model(sizes=(784, 100, 10), l2=5.0)
    params = jb.init_params(jax.random.key(0), model)
    g = jb.grad(params, X, Y, model, n=50_000)

Conventions shared by the whole API (``help(jb.grad)`` and the others give the details):

* ``model``: a :class:`Model`. Its architecture (sizes, activations, cost,
  ``has_dropout``) is static and picks the compiled program; its ``l2``, ``l1`` and dropout
  rate are pytree leaves, traced inside ``jax.jit``, so changing them does not recompile.
* ``params``: a tuple with one ``{"w": (n_l, n_{l-1}), "b": (n_l,)}`` dict per layer
  (:func:`init_params`); a list works too and gives lists back. Their dtype is the dtype of
  the computation and of the arrays returned.
* ``X: (m, n_0)`` inputs; ``Y`` integer class labels ``(m,)`` or targets ``(m, n_L)``.
* ``n``: the training-set size of eqs 12-15, required when ``l2`` or ``l1`` is on.
* ``key``: the PRNG key drawing the dropout masks, required when the model has dropout;
  example ``i`` of a minibatch ``X`` uses ``jax.random.split(key, m)[i]``, the same in
  every function that takes both.

Where things are: the network and its gradients (:func:`init_params`, :func:`forward`,
:func:`backprop`, :func:`per_example_grads`, :func:`grad`, :func:`cost`,
:func:`value_and_grad`); quantities from one backward pass (:func:`grad_stats`,
:func:`noise_scale`, :func:`diag_ggn`, :func:`clipped_grad`, :func:`per_example_norms`,
:func:`grad_gram`, :func:`empirical_ntk`); training (:func:`fit`, :func:`fit_many`,
:func:`evaluate`, :func:`accuracy`); files (:func:`save_params`, :func:`load_params`); and
the submodules :mod:`~jbackprop.activations`, :mod:`~jbackprop.costs`,
:mod:`~jbackprop.regularizers`, :mod:`~jbackprop.privacy`, :mod:`~jbackprop.attribution`,
:mod:`~jbackprop.data` and :mod:`~jbackprop.interop`.
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
