"""Minibatch stochastic gradient descent (lecture, sections 2 and 4).

One epoch is one compiled program: a fresh shuffle of the training set from the PRNG key,
then a ``jax.lax.scan`` over the minibatches, each step feeding :func:`jbackprop.grad` to an
Optax optimizer. With ``optax.sgd(eta)`` a step is eq 4, and with L2 on it is eqs 15-16. A
remainder that does not fill a minibatch is used as one smaller, last minibatch, so every
example is visited every epoch.

With ``sampling="poisson"`` an epoch is instead ``round(n / m)`` steps, each over a Poisson
sample: every example enters independently with probability ``q = m / n``, as the privacy
accountants of :mod:`jbackprop.privacy` assume (:func:`run_poisson_epoch`).

The key of epoch ``e`` is ``fold_in(key, e)``: an epoch's shuffle (or samples) and dropout
masks depend on nothing but the key and the epoch number, which is what makes an interrupted
run resume bit-identically.

The epoch is written once, in :func:`run_epoch`; :func:`fit` compiles it for one model and
:func:`jbackprop.fit_many` vmaps it over many. The compiled program depends on the model's
architecture, the optimizer's definition and the minibatch size only: the regularisation
strengths and dropout rate of the :class:`~jbackprop.Model` are traced, and optimizers are
matched by what they compute (their functions and hyperparameters), not by object identity,
so ``fit(..., optax.sgd(0.5), ...)`` called again with a fresh ``optax.sgd(0.5)`` or another
``l2`` reuses the compiled epoch.

One concept to a module, each importing only those listed above it:

* ``training.devices``: the mesh, and placing data and state on it;
* ``training.metrics``: the cost and accuracy of a data set, one epoch's history record;
* ``training.epoch``: the optimizer step and one epoch over a shuffle;
* ``training.poisson``: one epoch of Poisson-sampled steps;
* ``training.compiled``: the compiled epoch for a setting, and the cache keeping it;
* ``training.loop``: :func:`fit`.
"""

# Besides the names of ``__all__``, the package's building blocks are importable from here
# (``x as x`` marks a re-export): the checks, the traceable evaluation and the compile cache
# that ``jbackprop.sweep`` shares, and the pieces of Poisson sampling.
from jbackprop.state import TrainState
from jbackprop.training.compiled import SAMPLINGS as SAMPLINGS
from jbackprop.training.compiled import cached as cached
from jbackprop.training.compiled import check_sampling as check_sampling
from jbackprop.training.compiled import fingerprint as fingerprint
from jbackprop.training.compiled import train_epoch
from jbackprop.training.epoch import run_epoch
from jbackprop.training.loop import check_fit_args as check_fit_args
from jbackprop.training.loop import check_optimizer as check_optimizer
from jbackprop.training.loop import fit
from jbackprop.training.metrics import TrainingDiverged, accuracy, evaluate
from jbackprop.training.metrics import evaluation as evaluation
from jbackprop.training.poisson import MaskedMean as MaskedMean
from jbackprop.training.poisson import poisson_capacity as poisson_capacity
from jbackprop.training.poisson import poisson_sample as poisson_sample
from jbackprop.training.poisson import run_poisson_epoch

__all__ = [
    "TrainState",
    "TrainingDiverged",
    "accuracy",
    "evaluate",
    "fit",
    "run_epoch",
    "run_poisson_epoch",
    "train_epoch",
]
