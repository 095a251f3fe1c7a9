"""The state of a training run between epochs: what :func:`jbackprop.fit` hands to
``on_epoch`` and what a checkpoint stores, kept apart from the training logic so that
saving and loading (``jbackprop.io``) need nothing but this type."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from jbackprop.model import Params

__all__ = ["TrainState"]


@dataclass(frozen=True)
class TrainState:
    """Everything needed to continue training after ``epoch`` epochs.

    Attributes:
      params: the parameters after ``epoch`` epochs, one ``{"w": (n_l, n_{l-1}),
        "b": (n_l,)}`` dict per layer.
      opt_state: the optimizer's state, as ``optimizer.update`` returned it.
      epoch: the number of epochs done.
      history: one record per epoch done, as :func:`jbackprop.fit` returns them.
      best_params: the parameters of the epoch with the best validation accuracy so far
        (the current ones when there is no validation set).
      best_epoch: that epoch's number.
    """

    params: Params
    opt_state: Any
    epoch: int
    history: tuple[dict[str, float], ...] = ()
    best_params: Params | None = None
    best_epoch: int = 0
