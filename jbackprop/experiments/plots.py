"""Pictures of a run: learning curves and gradient statistics (matplotlib, Agg backend)."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

__all__ = ["plot_grad_stats", "plot_learning_curves"]


def _save(fig, path: Path) -> None:
    """Write the PNG beside its final name, then rename: never a half-written picture."""
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def plot_learning_curves(path: Path, history: list[dict], title: str) -> None:
    """Cost and accuracy per epoch, training and validation."""
    epochs = [r["epoch"] for r in history]
    fig, (ax_cost, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for split, style, name in (("train", "-", "training"), ("val", "--", "validation")):
        if f"{split}_cost" in history[0]:
            ax_cost.plot(epochs, [r[f"{split}_cost"] for r in history], style, label=name)
            acc = [100 * r[f"{split}_accuracy"] for r in history]
            ax_acc.plot(epochs, acc, style, label=name)
    ax_cost.set(xlabel="epoch", ylabel="cost", title="cost")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for ax in (ax_cost, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    _save(fig, path)


def plot_grad_stats(path: Path, stats: list[dict], title: str) -> None:
    """Median per-example gradient norm and gradient noise scale per epoch."""
    epochs = [r["epoch"] for r in stats]
    fig, (ax_n, ax_b) = plt.subplots(1, 2, figsize=(10, 4))
    ax_n.plot(epochs, [r["median_grad_norm"] for r in stats], "o-")
    ax_n.set(xlabel="epoch", ylabel="median ‖g_i‖", title="per-example gradient norm")
    ax_b.semilogy(epochs, [r["noise_scale"] for r in stats], "o-")
    ax_b.set(xlabel="epoch", ylabel="B_simple (examples)", title="gradient noise scale")
    for ax in (ax_n, ax_b):
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    _save(fig, path)
