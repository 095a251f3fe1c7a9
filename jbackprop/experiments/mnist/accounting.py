"""The privacy of a run: its noise, its sampling, and the ε it has spent after every epoch.

A DP-SGD run (``--dp-clip``) is planned once the training-set size ``n`` is known: the
sampling (Poisson by default, the mechanism the accountants assume), the lot's sampling
rate ``q = batch-size / n`` and steps per epoch, and the noise multiplier ``σ``, given by
``--dp-noise`` or calibrated by :func:`jbackprop.privacy.calibrate_noise` so that the
whole run (its ``--epochs`` and the private PCA, if any) spends ``--dp-epsilon``.

The ε after epoch ``e`` is a function of ``(σ, q, e × steps per epoch, δ)`` and the PCA's
noise only, never of the data or of the training state, so a resumed run states exactly
the ε an uninterrupted one would: :meth:`Plan.epsilon` recomputes it from the plan.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

from jbackprop import privacy

DP_DELTA = 1e-5
DP_ACCOUNTANT = "rdp"
SAMPLINGS = ("poisson", "shuffle")


def sampling_of(args: argparse.Namespace) -> str:
    """How the run draws its minibatches: Poisson lots for DP-SGD unless ``--dp-sampling
    shuffle`` says otherwise; the shuffled minibatches of the book without DP-SGD."""
    if args.dp_clip is None:
        return "shuffle"
    return args.dp_sampling or "poisson"


def steps_per_epoch(sampling: str, n: int, batch_size: int) -> int:
    """Optimizer steps in one epoch: ``round(n / m)`` Poisson lots, or ``ceil(n / m)``
    shuffled minibatches (the remainder is a last, smaller one)."""
    if sampling == "poisson":
        return privacy.poisson_schedule(n, batch_size)[1]
    return -(-n // batch_size)


@dataclass(frozen=True)
class Plan:
    """Everything the ε of a DP-SGD run depends on.

    Attributes:
      clip: ``C`` or one bound per layer, as given to ``--dp-clip``.
      noise_multiplier: ``σ``, given or calibrated.
      target_epsilon: the ``--dp-epsilon`` it was calibrated to, or None.
      sampling: ``"poisson"`` or ``"shuffle"``.
      sample_rate: ``q = batch-size / n``.
      steps_per_epoch: lots (steps) per epoch.
      delta: the ``δ`` stated.
      accountant: ``"rdp"`` or ``"pld"``.
      pca: the ``--pca`` dimension, or None.
      pca_noise: the ``--dp-pca-noise``, or None.
    """

    clip: float | tuple[float, ...]
    noise_multiplier: float
    target_epsilon: float | None
    sampling: str
    sample_rate: float
    steps_per_epoch: int
    delta: float
    accountant: str
    pca: int | None
    pca_noise: float | None
    # ε by epochs done: every epoch's metrics.json lists all epochs so far, and a long run
    # would otherwise ask the accountant again for each of them, every epoch.
    _spent: dict[int, float | None] = field(
        default_factory=dict, init=False, compare=False, hash=False, repr=False
    )

    @property
    def unclaimed(self) -> str | None:
        """Why no ε is claimed for this run, or None when one is."""
        if self.sampling != "poisson":
            return (
                "shuffled minibatches: the accountants assume Poisson sampling "
                "(--dp-sampling poisson)"
            )
        if self.noise_multiplier == 0:
            return "no noise (--dp-noise 0): clipping alone is not private"
        return None

    def epsilon(self, epochs: int) -> float | None:
        """The ε spent after ``epochs`` epochs (the private PCA included); None when no ε
        is claimed.

        Args:
          epochs: epochs completed, at least 1.

        Returns:
          ``ε`` by :attr:`accountant` at :attr:`delta`, or None.
        """
        if self.unclaimed is not None:
            return None
        if epochs not in self._spent:
            self._spent[epochs] = privacy.epsilon(
                self.noise_multiplier,
                self.sample_rate,
                epochs * self.steps_per_epoch,
                self.delta,
                self.accountant,
                pca_noise=self.pca_noise,
            )
        return self._spent[epochs]

    def block(self, epochs: int) -> dict[str, Any]:
        """The ``privacy`` entry of ``metrics.json`` after ``epochs`` epochs.

        Args:
          epochs: epochs completed (0 before the first).

        Returns:
          A JSON-ready dict: the accountant and its ε after every epoch, δ, σ, ``q``,
          the steps, the clipping bounds, the sampling and the PCA's dimension and noise;
          ``claimed`` says whether the ε is a guarantee, and ``why_not`` why it is not.
        """
        eps = [self.epsilon(e) for e in range(1, epochs + 1)]
        return {
            "claimed": self.unclaimed is None,
            "why_not": self.unclaimed,
            "accountant": self.accountant,
            "epsilon": eps if self.unclaimed is None else None,
            "delta": self.delta,
            "noise_multiplier": self.noise_multiplier,
            "target_epsilon": self.target_epsilon,
            "sample_rate": self.sample_rate,
            "steps_per_epoch": self.steps_per_epoch,
            "steps": epochs * self.steps_per_epoch,
            "clip": list(self.clip) if isinstance(self.clip, tuple) else self.clip,
            "sampling": self.sampling,
            "pca": self.pca,
            "pca_noise": self.pca_noise,
        }


def plan(args: argparse.Namespace, n: int) -> Plan | None:
    """The privacy plan of a run on ``n`` training examples; None without ``--dp-clip``.

    Args:
      args: the parsed flags.
      n: the training-set size.

    Returns:
      The :class:`Plan`, with ``σ`` calibrated when ``--dp-epsilon`` is given.

    Raises:
      ValueError: ``--dp-epsilon`` cannot be reached (the private PCA alone spends it).
    """
    if args.dp_clip is None:
        return None
    sampling = sampling_of(args)
    delta = DP_DELTA if args.dp_delta is None else args.dp_delta
    accountant = args.dp_accountant or DP_ACCOUNTANT
    steps = steps_per_epoch(sampling, n, args.batch_size)
    q = args.batch_size / n
    pca_noise = args.dp_pca_noise if args.pca is not None else None
    sigma = args.dp_noise
    if args.dp_epsilon is not None:
        try:
            sigma = privacy.calibrate_noise(
                args.dp_epsilon, q, args.epochs * steps, delta, accountant, pca_noise=pca_noise
            )
        except ValueError as err:
            raise ValueError(f"--dp-epsilon {args.dp_epsilon}: {err}") from None
    clip = tuple(args.dp_clip) if isinstance(args.dp_clip, list) else args.dp_clip
    return Plan(
        clip=clip,
        noise_multiplier=float(sigma),
        target_epsilon=args.dp_epsilon,
        sampling=sampling,
        sample_rate=q,
        steps_per_epoch=steps,
        delta=delta,
        accountant=accountant,
        pca=args.pca,
        pca_noise=pca_noise,
    )
