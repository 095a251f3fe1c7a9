"""Data attribution on dattri's "MNIST-10 + MLP" benchmark, scored by the LDS.

Run it as ``python -m jbackprop.experiments.attribution`` (``--help`` lists the flags;
``--quick`` is a small smoke run). It trains the benchmark's models with
:func:`jbackprop.fit_many`, retrains on 100 random half-size subsets for the ground truth,
attributes with gradient similarity (:func:`jbackprop.grad_gram`), TracIn and exact TRAK
(:mod:`jbackprop.attribution`) and writes the linear datamodeling scores, timings and a
figure into a run folder.

Modules, from the top down:

- :mod:`.cli`: the flags and :func:`main`;
- :mod:`.run`: one benchmark run, from training to the written results;
- :mod:`.protocol`: dattri's data, recipe, ground truth and LDS;
- :mod:`.report`: the markdown table and the figure.
"""

from jbackprop.experiments.attribution.cli import main, parser

__all__ = ["main", "parser"]
