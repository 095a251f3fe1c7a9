"""What a run tells its user: the lines it prints, ``metrics.json``, and its plots' titles.

Every line of standard output comes from here, so the wording of a run lives in one
place. Errors are not printed here: they travel as exceptions to :func:`.cli.main`.

``metrics.json`` is for people and for analysis scripts, so its measured numbers are
rounded to :data:`DIGITS` significant digits (a float32 accuracy of ``0.9529999494552612``
is stored as ``0.953``). Nothing reads them back to continue training: ``--resume`` takes
the exact history from the checkpoint.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jbackprop.io import atomic_write

if TYPE_CHECKING:
    from jbackprop.experiments.mnist.accounting import Plan

DIGITS = 6
METRICS = "metrics.json"


# --- numbers for people ---------------------------------------------------------------


def rounded(value: Any) -> Any:
    """``value`` with every float rounded to :data:`DIGITS` significant digits.

    Dicts and lists are rounded element by element; integers, strings and ``None`` pass
    unchanged. Rounding twice gives the same number as rounding once.
    """
    if isinstance(value, float):
        return float(f"{value:.{DIGITS}g}")
    if isinstance(value, Mapping):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [rounded(v) for v in value]
    return value


def write_metrics(
    out: Path,
    config: Mapping[str, Any],
    history: Sequence[Mapping[str, float]],
    best_epoch: int,
    test_accuracy: float | None,
    seconds: float,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``out/metrics.json`` atomically; return its path.

    ``config`` (the flags as given) is stored exactly; the history, the test accuracy, the
    wall time and ``extra`` (already rounded by the caller where it holds measurements)
    are rounded for reading.
    """
    metrics = {
        "config": dict(config),
        "epochs": rounded(list(history)),
        "best_epoch": best_epoch,
        "test_accuracy": rounded(test_accuracy),
        "seconds": rounded(seconds),
    }
    metrics |= extra or {}
    path = out / METRICS
    atomic_write(path, (json.dumps(metrics, indent=2) + "\n").encode())
    return path


# --- titles ---------------------------------------------------------------------------


def title(hyper: Mapping[str, Any]) -> str:
    """A plot title naming the network and its hyperparameters.

    ``hyper`` maps flag names (``dataset``, ``sizes``, ``eta``, ``lmbda``, ...) to values:
    ``vars(args)``, with a sweep winner's values laid over it.
    """
    sizes = "-".join(map(str, hyper["sizes"]))
    if hyper.get("pca"):
        sizes = f"PCA {hyper['pca']}, {sizes}"
    eta = f"η={hyper['eta']}"
    if hyper.get("eta_end") is not None:
        eta += f"→{hyper['eta_end']}"
    parts = [eta, f"λ={hyper['lmbda']}"]
    if hyper.get("l1"):
        parts.append(f"L1 λ={hyper['l1']}")
    if hyper.get("dropout"):
        parts.append(f"dropout {hyper['dropout']}")
    parts.append(f"minibatch {hyper['batch_size']}")
    return (
        f"{hyper['dataset']} {sizes} {hyper['hidden']}/{hyper['output']} {hyper['cost']}, "
        + ", ".join(parts)
    )


def privacy_title(plan: Plan | None, epochs: int) -> str:
    """What a plot's title adds for a private run: σ, and the ε spent when one is claimed.

    Args:
      plan: the run's privacy plan, or None for a non-private run ("" then).
      epochs: epochs completed.

    Returns:
      A suffix for :func:`title`.
    """
    if plan is None:
        return ""
    text = f", σ={plan.noise_multiplier:.3g}"
    if plan.unclaimed is not None:
        return text + " (no ε claimed)"
    return text + f", ε={_eps(plan.epsilon(epochs))} (δ={plan.delta:g})"


def _eps(eps: float | None) -> str:
    return "inf" if eps is None or eps == float("inf") else f"{eps:.3g}"


# --- lines on standard output ---------------------------------------------------------


def _say(text: str) -> None:
    print(text, flush=True)


def run_folder(out: Path) -> None:
    _say(f"run folder: {out}")


def resuming(out: Path, epoch: int) -> None:
    _say(f"resuming {out} after epoch {epoch}")


def data_found(dataset: str, folder: Path) -> None:
    _say(f"data: {dataset} from {folder}")


def data_downloading(dataset: str, folder: Path, looked_in: Iterable[Path]) -> None:
    looked = ", ".join(str(d) for d in looked_in)
    _say(f"data: {dataset} is not on disk (looked in {looked}); downloading it into {folder}")


def grad_stats(record: Mapping[str, float]) -> None:
    _say(
        f"          median gradient norm {record['median_grad_norm']:.4g}  "
        f"noise scale B_simple {record['noise_scale']:.4g}"
    )


def privacy_plan(plan: Plan, epochs: int) -> None:
    """Before training: the mechanism, its noise, and what is (or is not) claimed."""
    clip = ",".join(f"{c:g}" for c in plan.clip) if isinstance(plan.clip, tuple) else plan.clip
    sigma = f"σ = {plan.noise_multiplier:.4g}"
    if plan.target_epsilon is not None:
        sigma += f" (calibrated: ε = {plan.target_epsilon:g} after {epochs} epochs)"
    pca = ""
    if plan.pca is not None:
        pca = f"; private PCA to {plan.pca} dimensions, noise {plan.pca_noise:g}"
    lots = (
        f"Poisson-sampled lots (q = {plan.sample_rate:.4g})"
        if plan.sampling == "poisson"
        else "shuffled minibatches"
    )
    _say(f"DP-SGD: clip {clip}, {sigma}, {lots}, {plan.steps_per_epoch} steps per epoch{pca}")
    if plan.unclaimed is not None:
        _say(f"no ε is claimed for this run: {plan.unclaimed}")
    else:
        _say(f"privacy: ε at δ = {plan.delta:g} by the {plan.accountant.upper()} accountant")


def privacy_result(plan: Plan, epochs: int) -> None:
    """After training: the ``(ε, δ)`` the whole run spent, or that none is claimed."""
    if plan.unclaimed is not None:
        _say(f"privacy: no ε is claimed ({plan.unclaimed})")
        return
    steps = epochs * plan.steps_per_epoch
    pca = " and the private PCA" if plan.pca is not None else ""
    _say(
        f"privacy: (ε, δ) = ({_eps(plan.epsilon(epochs))}, {plan.delta:g}) by the "
        f"{plan.accountant.upper()} accountant, for {steps} steps{pca}"
    )


def test_result(test_accuracy: float, final_epoch: int, best_epoch: int | None) -> None:
    """The test accuracy; ``best_epoch`` None when nothing was validated."""
    best = "no validation" if best_epoch is None else f"best validation epoch {best_epoch}"
    _say(f"test accuracy {100 * test_accuracy:.2f}% (parameters of epoch {final_epoch}; {best})")


def outputs(out: Path, written: Iterable[Path | str]) -> None:
    """The closing line: every file the run wrote into its folder."""
    names = list(dict.fromkeys(Path(p).name for p in written))  # once each, in order
    _say(f"outputs in {out}/: {', '.join(names)}")


def sweep_start(count: int) -> None:
    _say(f"training {count} configurations at once")


def _hyper(values: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items())


def sweep_result(hyper: Mapping[str, Any], best_val_accuracy: float, best_epoch: int) -> None:
    _say(
        f"  {_hyper(hyper)}: best validation accuracy {100 * best_val_accuracy:.2f}% "
        f"(epoch {best_epoch})"
    )


def sweep_winner(hyper: Mapping[str, Any], test_accuracy: float) -> None:
    _say(f"winner: {_hyper(hyper)}\ntest accuracy of the winner {100 * test_accuracy:.2f}%")


class Progress:
    """A bar that fills during each epoch (on a terminal), then one line per epoch.

    ``step`` is called from inside the compiled epoch (through ``jax.debug.callback``) with
    the minibatch index; calling the object itself with an epoch's history record prints
    that epoch's line.
    """

    WIDTH = 30

    def __init__(
        self,
        total: int,
        enabled: bool,
        first_epoch: int = 1,
        privacy: Callable[[int], float | None] | None = None,
    ):
        self.total = total
        self.enabled = enabled and sys.stderr.isatty()
        self.epoch = first_epoch
        self.privacy = privacy  # epochs done -> ε spent, shown at the end of each line

    def step(self, i, steps) -> None:
        done = int(self.WIDTH * (int(i) + 1) / max(1, int(steps)))
        bar = "#" * done + "-" * (self.WIDTH - done)
        sys.stderr.write(f"\r\033[Kepoch {self.epoch}/{self.total} [{bar}]")
        sys.stderr.flush()

    def __call__(self, rec: Mapping[str, float]) -> None:
        self.clear()
        val = ""
        if "val_accuracy" in rec:
            val = f"  val cost {rec['val_cost']:.4f} acc {100 * rec['val_accuracy']:.2f}%"
        eps = ""
        if self.privacy is not None:
            eps = f"  ε {_eps(self.privacy(int(rec['epoch'])))}"
        _say(
            f"epoch {rec['epoch']:>3}/{self.total}  train cost {rec['train_cost']:.4f} "
            f"acc {100 * rec['train_accuracy']:.2f}%{val}  {rec['seconds']:.2f} s{eps}"
        )
        self.epoch = int(rec["epoch"]) + 1

    def clear(self) -> None:
        """Erase the bar, so that the next line starts on a clean terminal line."""
        if self.enabled:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
