"""Train and evaluate on MNIST or Fashion-MNIST from the command line.

Run it as ``python -m jbackprop.experiments.mnist`` or ``jbackprop-mnist``; ``--help``
lists the flags. The defaults are the book's chapter-3 network: 784-100-10, sigmoid,
cross-entropy, L2 with λ = 5.0, η = 0.5, minibatch 10, 30 epochs. Training uses the first
50,000 training images, validation the last 10,000; the test set is read only once, after
training, as the lecture insists (hyperparameters are chosen on the validation set).

The run folder ends up holding ``metrics.json``, ``learning_curves.png``,
``params.safetensors`` (read back with :func:`jbackprop.load_params`) and the last
``checkpoint.safetensors``, which ``--resume`` continues bit-identically.

Modules, from the top down:

- :mod:`.cli`: the flags and :func:`main` (exit statuses, one-line errors);
- :mod:`.run`: one training run with checkpoints, ``--resume`` and signal handling;
- :mod:`.sweep`: ``--sweep``, many configurations at once with :func:`jbackprop.fit_many`;
- :mod:`.config`: flags to model, optimizer, data and run folder, shared by both;
- :mod:`.report`: every printed line, ``metrics.json`` and the plots' titles.
"""

from jbackprop.experiments.mnist.cli import main, parse_args, parser

__all__ = ["main", "parse_args", "parser"]
