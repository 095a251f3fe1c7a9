"""Throughput of jbackprop's hand-written backprop against autodiff and PyTorch, on MNIST.

The network is the book's chapter-3 one: 784-100-10, sigmoid units, cross-entropy with L2
(lmbda 5, n = 50,000), plain SGD with eta 0.5, trained on the 50,000 MNIST training images
held on the device. Every section is one module of this package and uses jbackprop's
public API only; ``--only`` picks them (comma separated):

* ``train``: epochs of ``jb.fit``'s epoch, of an independently written ``jax.grad`` epoch
  (same ``lax.scan``, shuffle and ``optax.sgd``) and of PyTorch on the CPU, at minibatch
  10, 128 and 1000, measured alternately (one epoch of each in turn);
* ``ablate``: the same epoch with the hand-written step reformulated in the script;
* ``pex``: training from stored per-example gradients (``jb.per_example_grads`` and
  ``jax.vmap(jax.grad)``) averaged per minibatch;
* ``dp``: DP-SGD epochs (``jbackprop.privacy.DPGradient`` in jb.fit's epoch) against the
  non-private epoch and the stored route with ``optax.contrib``'s DP aggregate;
* ``stats``: ``jb.grad_stats`` and ``jb.diag_ggn`` per call, against ``jb.grad``, stored
  ``vmap(grad)`` statistics and BackPACK's BatchL2Grad + SumGradSquared + Variance;
* ``ggn``: ``jb.diag_ggn`` against BackPACK's DiagGGNExact on a softmax network;
* ``many``: ``jb.fit_many`` with 8 models against one ``jb.fit``, minibatch 10 and 128;
* ``multiproc``: ``jb.fit`` over 1, 2 and 4 local processes (gloo on loopback);
* ``scaling``: examples/s of jb.fit's epoch, the ``jax.grad`` epoch and PyTorch for
  widths 100, 1000 and 4096 and 1 to 4 hidden layers, minibatch 128;
* ``opacus``: a DP-SGD step of jbackprop (784-1000-10, ReLU and softmax, lot 600 and
  minibatch 128) against Opacus 1.6 in its ``hooks`` and ``ghost`` (ghost clipping) modes,
  with fixed-size and Poisson-sampled lots, and the clipped gradients compared at noise 0;
* ``full`` (only with ``--full``): wall time of ``python -m jbackprop.experiments.mnist``
  for the chapter-3 run of 30 epochs.

Every target is checked as a ratio measured in the same run and printed as a PASS/FAIL
line. PyTorch and BackPACK are optional and never dependencies of the project; without
them their rows are skipped with a note. They live in a separate virtual environment::

    python3 -m venv .venv-bench
    .venv-bench/bin/pip install -e . torch==2.13.0
    .venv-bench/bin/pip install --no-deps backpack-for-pytorch einops unfoldNd
    .venv-bench/bin/pip install "opacus==1.6.*" opt-einsum     # the opacus section

Run from the repository root (``.venv/bin/python`` works too, without the torch rows)::

    .venv-bench/bin/python -m scripts.bench --full        # every section, 15-20 minutes
    .venv-bench/bin/python -m scripts.bench --quick       # fewer epochs and calls
    .venv-bench/bin/python -m scripts.bench --only train,dp --epochs 7

Everything, every epoch's wall and CPU seconds included, goes to ``--json`` (default
``runs/bench.json``).
"""
